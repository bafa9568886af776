//! `moectl`: the command line for moe-operator users.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "moectl",
    version,
    about = "Command line for moe-operator (MoETrainingJob, MoEInferenceService)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print what this build of moe-operator can do so far.
    Status,
    /// Print the CustomResourceDefinitions as YAML (what `deploy/crds/` holds).
    Crds,
}

fn main() {
    match Cli::parse().command {
        Command::Crds => print!("{}", moe_crds::crds_yaml()),
        Command::Status => {
            println!(
                "moe-operator {} — API group {}",
                env!("CARGO_PKG_VERSION"),
                moe_crds::api_version()
            );
            println!(
                "  test control plane: tests/cluster/up.sh (etcd, kube-apiserver, KCM, scheduler, KWOK GPU pool)"
            );
            println!(
                "  not yet: CRDs, operator, local training run (`moectl run --local`), serving"
            );
        }
    }
}
