//! `moectl`: the command line for moe-operator users. The work is done in
//! [`moe_operator::cli`]; this file parses arguments and maps outcomes to
//! exit codes.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use moe_operator::cli::check::{Checker, Manifest, load_job, load_manifest};
use moe_operator::cli::render::{RenderOptions, render, render_inference};
use moe_operator::cli::{local_run, manifest, worker_bin};
use moe_operator::gang::GangScheduling;

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
    /// Check MoETrainingJob and MoEInferenceService manifests as the apiserver and the operator would.
    ///
    /// Checks unknown fields, schema bounds, the CEL rules and the operator's
    /// own checks, after applying defaults. Prints `FILE: ok` or one `FILE: kind/name: problem` line per problem;
    /// exits 1 if any document is invalid.
    Validate {
        /// Manifests (multi-document YAML allowed); `-` reads standard input.
        #[arg(required = true)]
        files: Vec<String>,
    },
    /// Print the objects the operator creates for a job (one attempt) or a service.
    ///
    /// For a MoETrainingJob: the ConfigMap with the worker config, the
    /// headless Service and the attempt Job (and with `output.huggingface`
    /// the export Job it runs once it succeeds). For a MoEInferenceService: the
    /// ConfigMap, Service, Deployment, PodDisruptionBudget and (with
    /// autoscaling) HorizontalPodAutoscaler. A multi-document YAML stream from
    /// the operator's own builders; the uid in owner references is a placeholder.
    Render {
        /// The manifest (one MoETrainingJob or MoEInferenceService); `-` reads standard input.
        file: String,
        /// Attempt number: 0 is the first, each gang restart adds one.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i32).range(0..))]
        attempt: i32,
        /// Namespace (default: the manifest's, else `default`).
        #[arg(long)]
        namespace: Option<String>,
        /// The operator's default worker image, used when `spec.worker.image` is unset.
        #[arg(long)]
        worker_image: Option<String>,
        /// The operator's `--gang-scheduling`: with `workload-api`, a gang's
        /// PodGroup is rendered too.
        #[arg(long, value_enum, default_value_t = GangScheduling::None)]
        gang_scheduling: GangScheduling,
    },
    /// Train a MoETrainingJob on this machine.
    ///
    /// Writes the worker config the operator would, with paths under
    /// `<workdir>/<name>/`, and runs one `moe-worker train` per node with the
    /// operator's environment contract. Worker logs go to stderr; the
    /// worker's final JSON summary is the last line on stdout. SIGINT and
    /// SIGTERM are forwarded; the exit status is the workers'.
    Run {
        /// Run on this machine (the only mode so far).
        #[arg(long, required = true)]
        local: bool,
        /// The manifest (one MoETrainingJob); `-` reads standard input.
        file: String,
        /// Directory holding one run directory per job (`<workdir>/<name>/`).
        #[arg(long, default_value = "runs")]
        workdir: PathBuf,
        /// The moe-worker executable (default: next to moectl, else on PATH).
        #[arg(long, env = "MOE_WORKER_BIN")]
        worker_bin: Option<PathBuf>,
        /// Threads sharing each large CPU GEMM in every worker process
        /// (`moe-worker train --threads`). Default: what the job's pods would
        /// get (`spec.worker.cpuThreads`, else the worker's CPU limit or
        /// request per process, else 1). The results are the same to the bit
        /// with any count.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
        threads: Option<u16>,
    },
}

fn main() -> ExitCode {
    let outcome = match Cli::parse().command {
        Command::Crds => {
            print!("{}", moe_crds::crds_yaml());
            Ok(ExitCode::SUCCESS)
        }
        Command::Status => {
            status();
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { files } => validate(&files),
        Command::Render {
            file,
            attempt,
            namespace,
            worker_image,
            gang_scheduling,
        } => load_manifest(&file)
            .and_then(|manifest| {
                let options = RenderOptions {
                    attempt,
                    namespace,
                    worker_image,
                    gang_scheduling,
                };
                Ok(match manifest {
                    Manifest::Training(job) => render(*job, &options)?,
                    Manifest::Inference(svc) => render_inference(*svc, &options)?,
                })
            })
            .and_then(|yaml| {
                // Not print!: a closed pipe (`| head`) is an error to report, not a panic.
                std::io::stdout().write_all(yaml.as_bytes())?;
                Ok(ExitCode::SUCCESS)
            }),
        Command::Run {
            local: _,
            file,
            workdir,
            worker_bin,
            threads,
        } => load_job(&file).and_then(|job| {
            let worker = worker_bin::locate(worker_bin.as_deref())?;
            local_run::run(&job, &workdir, &worker, threads).map(ExitCode::from)
        }),
    };
    outcome.unwrap_or_else(|e| {
        eprintln!("moectl: {e:#}");
        ExitCode::FAILURE
    })
}

/// Checks every document of every file, reporting each; fails if any is invalid.
fn validate(files: &[String]) -> anyhow::Result<ExitCode> {
    let checker = Checker::new()?;
    let mut all_valid = true;
    for file in files {
        let documents = match documents_of(file) {
            Ok(documents) => documents,
            Err(e) => {
                println!("{e:#}");
                all_valid = false;
                continue;
            }
        };
        let several = documents.len() > 1;
        for document in documents {
            match checker.check_any(document) {
                Ok(manifest) if several => println!("{file}: {}: ok", manifest.object()),
                Ok(_) => println!("{file}: ok"),
                Err(rejection) => {
                    println!("{}", rejection.report(file));
                    all_valid = false;
                }
            }
        }
    }
    Ok(if all_valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The documents of `file`; none at all is an error, since validating
/// nothing is most likely a mistake.
fn documents_of(file: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let documents = manifest::read(file)
        .and_then(|text| manifest::documents(&text))
        .with_context(|| file.to_string())?;
    if documents.is_empty() {
        anyhow::bail!("{file}: no documents");
    }
    Ok(documents)
}

fn status() {
    println!(
        "moe-operator {} — API group {}",
        env!("CARGO_PKG_VERSION"),
        moe_crds::api_version()
    );
    println!(
        "  test control plane: tests/cluster/up.sh (etcd, kube-apiserver, KCM, scheduler, KWOK GPU pool)"
    );
    println!("  moectl: crds, validate, render, run --local (with its Hub downloads and export)");
    println!(
        "  operator: MoETrainingJob (gang attempts, restarts, elastic gangs, Kueue, fine-tuning, jobs starting from jobs, \
         the Hugging Face export), MoEInferenceService (replica groups, expert parallelism, \
         autoscaling, routes)"
    );
    println!(
        "  worker: train, serve, fetch, export (CPU; CUDA compile-checked beyond what docs/cuda.md measured)"
    );
    println!("  not yet: submitting to a cluster from moectl");
}
