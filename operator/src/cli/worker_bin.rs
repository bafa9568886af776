//! Finding the `moe-worker` executable for a local run. After `cargo build`
//! both binaries sit in `target/<profile>/`, so the one next to moectl is the
//! matching build; an explicit choice (flag or `MOE_WORKER_BIN`) wins.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::bail;

/// File name of the worker executable.
pub const WORKER: &str = "moe-worker";

/// The worker to run: `explicit` (from `--worker-bin` or `MOE_WORKER_BIN`)
/// if given, else a `moe-worker` next to the running moectl, else one on `PATH`.
pub fn locate(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        if !is_executable(path) {
            bail!(
                "worker binary {} (from --worker-bin or MOE_WORKER_BIN) is not an executable file",
                path.display()
            );
        }
        return Ok(path.to_path_buf());
    }
    let beside_moectl = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(WORKER)));
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(WORKER))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    beside_moectl
        .into_iter()
        .chain(on_path)
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "cannot find {WORKER}: pass --worker-bin or set MOE_WORKER_BIN, or build it \
                 next to moectl (cargo build -p moe-worker) or put it on PATH"
            )
        })
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
