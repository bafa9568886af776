//! `moe-worker`: the process each training or serving pod runs.

use std::process::ExitCode;

fn main() -> ExitCode {
    let arg = std::env::args().nth(1);
    match arg.as_deref() {
        Some("--version") => {
            println!(
                "moe-worker {} (backends: {})",
                env!("CARGO_PKG_VERSION"),
                moe_worker::backends().join(", ")
            );
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!(
                "moe-worker: training and serving are not implemented yet (see the worker issue); try --version"
            );
            ExitCode::from(2)
        }
    }
}
