//! `moe-worker`: the process each training or serving pod runs.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use clap::{Parser, Subcommand};
use moe_crds::contract::{CONFIG_PATH, env};

/// `--version` output: the crate version and the compiled-in backends.
const VERSION: &str = if moe_kernels::CUDA_ENABLED {
    concat!(env!("CARGO_PKG_VERSION"), " (backends: cpu, cuda)")
} else {
    concat!(env!("CARGO_PKG_VERSION"), " (backends: cpu)")
};

#[derive(Parser)]
#[command(name = "moe-worker", version = VERSION, about = "Trains Mixture-of-Experts transformers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train as the worker config says; prints a one-line JSON summary on stdout.
    Train {
        /// The worker config (JSON). Default: $MOE_CONFIG, else /etc/moe/config.json.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    match cli.command {
        Command::Train { config } => train(config),
    }
}

fn train(config: Option<PathBuf>) -> ExitCode {
    let path = config
        .or_else(|| std::env::var_os(env::CONFIG).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(CONFIG_PATH));
    let config = match moe_worker::settings::read_worker_config(&path) {
        Ok(config) => config,
        Err(e) => return fail(&format!("{}: {e}", path.display()), 2),
    };
    // SIGTERM (pod deletion, preemption) and SIGINT set the flag; training
    // checkpoints at the next step boundary and exits 0.
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(e) = signal_hook::flag::register(signal, Arc::clone(&stop)) {
            return fail(
                &format!("cannot install the handler for signal {signal}: {e}"),
                1,
            );
        }
    }
    let board = status_board();
    match moe_worker::run::train_reporting(&config, &stop, board.as_ref()) {
        Ok(summary) => {
            println!(
                "{}",
                serde_json::to_string(&summary).expect("the summary always serialises")
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e.to_string(), e.exit_code()),
    }
}

/// Rank 0 serves `/progress` and `/metrics` (default `0.0.0.0:9400`, or
/// `MOE_STATUS_ADDR`; `off` disables it). A port already taken (e.g. two local
/// runs at once) only costs the endpoint, never the training run.
fn status_board() -> Option<moe_worker::status::Board> {
    let rank0 = std::env::var(env::NODE_RANK).map_or(true, |r| r == "0");
    let addr = std::env::var(env::STATUS_ADDR)
        .unwrap_or_else(|_| format!("0.0.0.0:{}", moe_crds::contract::METRICS_PORT));
    if !rank0 || addr == "off" {
        return None;
    }
    let board = moe_worker::status::Board::default();
    match board.serve(&addr) {
        Ok(bound) => tracing::info!(%bound, "serving /progress and /metrics"),
        Err(e) => tracing::warn!(%addr, error = %e, "status endpoint not available"),
    }
    Some(board)
}

fn fail(message: &str, code: u8) -> ExitCode {
    tracing::error!("{message}");
    eprintln!("moe-worker: {message}");
    ExitCode::from(code)
}
