//! Supervising the worker processes of a local run as a gang, as the attempt
//! Job does on a cluster: the first process to fail stops the others, and the
//! run ends with that failure's exit status. SIGINT and SIGTERM are forwarded,
//! so workers checkpoint and exit as they do when their pod is deleted.

use std::ffi::OsStr;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};

/// How long the rest of a failed gang gets to exit before being killed: the
/// default terminationGracePeriodSeconds of a pod.
const GRACE: Duration = Duration::from_secs(30);
/// How often exits are checked for (std has no asynchronous wait).
const POLL: Duration = Duration::from_millis(100);

/// Runs `program args` once per entry of `members` (the environment of each
/// node rank) until all have exited; returns the exit status for moectl: 0,
/// or that of the first member to fail (128 + N when killed by signal N).
///
/// Node rank 0's stdout is moectl's, so its final JSON summary is moectl's
/// last stdout line; the others' stdout goes to stderr with all the logs.
pub fn run(
    program: &Path,
    args: &[&OsStr],
    members: &[Vec<(String, String)>],
) -> anyhow::Result<u8> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(supervise(program, args, members))
}

async fn supervise(
    program: &Path,
    args: &[&OsStr],
    members: &[Vec<(String, String)>],
) -> anyhow::Result<u8> {
    // Handlers first: a signal arriving before them would kill moectl and
    // orphan the workers.
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut gang = Gang::spawn(program, args, members)?;
    let mut tick = tokio::time::interval(POLL);
    while !gang.running.is_empty() {
        tokio::select! {
            _ = interrupt.recv() => gang.signal_all(libc::SIGINT),
            _ = terminate.recv() => gang.signal_all(libc::SIGTERM),
            _ = tick.tick() => {}
        }
        gang.reap()?;
    }
    Ok(gang.failure.unwrap_or(0))
}

struct Gang {
    /// Node rank and process of every member not yet reaped.
    running: Vec<(usize, Child)>,
    /// Exit status of the first member that failed.
    failure: Option<u8>,
    /// When the members still running after a failure get SIGKILL.
    kill_at: Option<Instant>,
}

impl Gang {
    fn spawn(
        program: &Path,
        args: &[&OsStr],
        members: &[Vec<(String, String)>],
    ) -> anyhow::Result<Self> {
        let mut gang = Gang {
            running: Vec::with_capacity(members.len()),
            failure: None,
            kill_at: None,
        };
        for (rank, env) in members.iter().enumerate() {
            let stdout = if rank == 0 {
                Stdio::inherit()
            } else {
                Stdio::from(io::stderr().as_fd().try_clone_to_owned()?)
            };
            let child = Command::new(program)
                .args(args)
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null())
                .stdout(stdout)
                // Their own process group: a Ctrl-C in the terminal reaches
                // moectl only, which forwards it exactly once.
                .process_group(0)
                .spawn()
                .with_context(|| format!("cannot start {}", program.display()))?;
            gang.running.push((rank, child));
        }
        Ok(gang)
    }

    /// Signals every member not yet reaped.
    fn signal_all(&self, signal: libc::c_int) {
        for (_, child) in &self.running {
            let Ok(pid) = libc::pid_t::try_from(child.id()) else {
                continue;
            };
            // SAFETY: kill(2) reads no memory of ours. The child is not
            // reaped yet (`reap` drops it from `running` when it is), so its
            // pid cannot have been reused by another process.
            unsafe { libc::kill(pid, signal) };
        }
    }

    /// Collects exited members; on the first failure, stops the others.
    fn reap(&mut self) -> io::Result<()> {
        let mut i = 0;
        while i < self.running.len() {
            let Some(status) = self.running[i].1.try_wait()? else {
                i += 1;
                continue;
            };
            let (rank, _) = self.running.remove(i);
            let code = exit_code(status);
            if code != 0 && self.failure.is_none() {
                self.failure = Some(code);
                if !self.running.is_empty() {
                    eprintln!("moectl: node rank {rank} {status}; stopping the other ranks");
                    self.signal_all(libc::SIGTERM);
                    self.kill_at = Some(Instant::now() + GRACE);
                }
            }
        }
        if self.kill_at.is_some_and(|at| Instant::now() >= at) {
            self.kill_at = None;
            for (_, child) in &mut self.running {
                child.kill()?;
            }
        }
        Ok(())
    }
}

impl Drop for Gang {
    /// On an early return (a member that cannot start, a failed wait), no
    /// worker outlives moectl.
    fn drop(&mut self) {
        for (_, child) in &mut self.running {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The shell's convention: the exit code, or 128 + the signal that killed it.
fn exit_code(status: ExitStatus) -> u8 {
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    u8::try_from(code).unwrap_or(1)
}
