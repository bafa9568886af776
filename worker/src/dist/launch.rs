//! The local launcher: one child process per local rank (one per GPU in a
//! pod; every rank for `moectl run --local`), each given its place in the
//! gang through the environment, and the first failure reported by rank.
//!
//! Failure propagation needs no signalling from here: when a rank dies its
//! peers' collectives fail (closed connections, aborts cascading, at worst
//! the collective timeout) and they exit non-zero by themselves. The
//! launcher waits `grace` (the collective timeout plus a margin) for that,
//! then kills whatever is left, so it never hangs either.
//!
//! The cascade takes milliseconds, so which rank exited first says little
//! about which one caused it. Ranks that fail only because a peer failed
//! exit with [`PEER_FAILED_EXIT_CODE`]; the launcher blames the first rank
//! that failed any other way (falling back to the first echo).

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use moe_crds::contract::env;

use super::env::{DistEnv, LOCAL_RANK};
use super::error::DistError;

/// How often children are polled.
const POLL: Duration = Duration::from_millis(20);

/// The exit code of a rank that fails because another rank failed (a
/// [`DistError::is_peer_failure`] error): an echo of the cause, not the
/// cause. Distinct from the worker's 1 (I/O) and 2 (configuration).
pub const PEER_FAILED_EXIT_CODE: i32 = 3;

/// What to start, and where this node stands in the gang.
#[derive(Clone, Debug)]
pub struct LocalLaunch {
    /// The worker binary (usually `std::env::current_exe()`).
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub world_size: usize,
    pub node_rank: usize,
    pub procs_per_node: usize,
    pub coordinator: String,
    pub attempt: u64,
    /// Extra variables for every rank (on top of this process's own, which
    /// the ranks inherit, and the rank variables, which win).
    pub env: Vec<(OsString, OsString)>,
    /// After the first failure, how long the others may take to exit on
    /// their own before they are killed: the collective timeout plus a margin.
    pub grace: Duration,
}

/// How one local rank ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RankExit {
    /// Exit code, or `None` when killed by a signal.
    Exited(Option<i32>),
    /// Still running `grace` after the first failure or a stop, so killed.
    Killed,
}

impl RankExit {
    fn success(&self) -> bool {
        *self == Self::Exited(Some(0))
    }

    fn is_echo(&self) -> bool {
        *self == Self::Exited(Some(PEER_FAILED_EXIT_CODE))
    }
}

impl fmt::Display for RankExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exited(Some(code)) => write!(f, "exited with code {code}"),
            Self::Exited(None) => f.write_str("was killed by a signal"),
            Self::Killed => f.write_str("was killed by the launcher after the grace period"),
        }
    }
}

/// The outcome of a launch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchReport {
    /// By local rank.
    pub exits: Vec<RankExit>,
    /// The rank blamed: the first seen failing other than as an echo of
    /// another's failure (else the first echo), by global rank, and how.
    pub first_failure: Option<(usize, RankExit)>,
    /// Global rank of local rank 0.
    pub first_rank: usize,
}

impl LaunchReport {
    /// 0 when every rank succeeded; else the first failed rank's code (1
    /// when it had none), so an operator failure rule sees the cause's code.
    pub fn exit_code(&self) -> i32 {
        match &self.first_failure {
            None => 0,
            Some((_, RankExit::Exited(Some(code)))) => *code,
            Some(_) => 1,
        }
    }

    /// One line for the log: the rank blamed and how the rest ended.
    pub fn summary(&self) -> String {
        match &self.first_failure {
            None => format!("all {} local ranks succeeded", self.exits.len()),
            Some((rank, how)) => {
                let others: Vec<String> = self
                    .exits
                    .iter()
                    .enumerate()
                    .map(|(i, e)| (self.first_rank + i, e))
                    .filter(|(r, _)| r != rank)
                    .map(|(r, e)| format!("rank {r} {e}"))
                    .collect();
                format!("rank {rank} failed: it {how}; then {}", others.join(", "))
            }
        }
    }
}

impl LocalLaunch {
    /// Re-runs `program args` (this worker's own command line) once per
    /// local rank of `env`'s node.
    pub fn from_env(env: &DistEnv, program: PathBuf, args: Vec<OsString>, grace: Duration) -> Self {
        Self {
            program,
            args,
            world_size: env.world_size,
            node_rank: env.node_rank,
            procs_per_node: env.procs_per_node,
            coordinator: env.coordinator.clone(),
            attempt: env.attempt,
            env: Vec::new(),
            grace,
        }
    }
}

/// Starts every local rank and waits for them. When `stop` is set (the
/// launcher got SIGTERM or SIGINT) every rank gets SIGTERM, on which the
/// workers agree on a step, checkpoint and exit 0; ranks still running
/// `grace` later are killed. Kubernetes signals only the container's main
/// process, and `moectl run --local` only the worker it started, so without
/// forwarding the ranks would never hear of the stop.
pub fn launch(plan: &LocalLaunch, stop: &AtomicBool) -> Result<LaunchReport, DistError> {
    let first_rank = plan.node_rank * plan.procs_per_node;
    let mut children: Vec<Child> = Vec::with_capacity(plan.procs_per_node);
    for local in 0..plan.procs_per_node {
        let spawned = Command::new(&plan.program)
            .args(&plan.args)
            .envs(plan.env.iter().map(|(k, v)| (k, v)))
            .env(env::WORLD_SIZE, plan.world_size.to_string())
            .env(env::NODE_RANK, plan.node_rank.to_string())
            .env(env::PROCS_PER_NODE, plan.procs_per_node.to_string())
            .env(LOCAL_RANK, local.to_string())
            .env(env::COORDINATOR, &plan.coordinator)
            .env(env::ATTEMPT, plan.attempt.to_string())
            .spawn();
        match spawned {
            Ok(child) => children.push(child),
            Err(e) => {
                for started in &mut children {
                    let _ = started.kill();
                    let _ = started.wait();
                }
                return Err(DistError::io(
                    format!(
                        "cannot start local rank {local} ({})",
                        plan.program.display()
                    ),
                    e,
                ));
            }
        }
    }
    let mut exits: Vec<Option<RankExit>> = vec![None; children.len()];
    // In the order seen.
    let mut failures: Vec<(usize, RankExit)> = Vec::new();
    let mut kill_at: Option<Instant> = None;
    let mut forwarded = false;
    while exits.iter().any(Option::is_none) {
        for (local, child) in children.iter_mut().enumerate() {
            if exits[local].is_some() {
                continue;
            }
            let status: Option<ExitStatus> = match child.try_wait() {
                Ok(status) => status,
                Err(e) => {
                    tracing::warn!(local, error = %e, "launcher: cannot poll a local rank; killing it");
                    let _ = child.kill();
                    child.wait().ok()
                }
            };
            if let Some(status) = status {
                let exit = RankExit::Exited(status.code());
                if !exit.success() {
                    tracing::error!(rank = first_rank + local, %exit, "local rank failed");
                    failures.push((first_rank + local, exit.clone()));
                    kill_at.get_or_insert_with(|| Instant::now() + plan.grace);
                }
                exits[local] = Some(exit);
            }
        }
        if stop.load(Ordering::Relaxed) && !forwarded {
            forwarded = true;
            for (local, child) in children.iter().enumerate() {
                if exits[local].is_none() {
                    terminate(child);
                }
            }
            kill_at.get_or_insert_with(|| Instant::now() + plan.grace);
        }
        let overdue = kill_at.is_some_and(|at| Instant::now() >= at);
        if overdue {
            for (local, child) in children.iter_mut().enumerate() {
                if exits[local].is_none() {
                    let _ = child.kill();
                    let _ = child.wait();
                    exits[local] = Some(RankExit::Killed);
                }
            }
        }
        thread::sleep(POLL);
    }
    let first_failure = failures
        .iter()
        .find(|(_, exit)| !exit.is_echo())
        .or(failures.first())
        .cloned();
    Ok(LaunchReport {
        exits: exits.into_iter().flatten().collect(),
        first_failure,
        first_rank,
    })
}

/// Sends SIGTERM to a child that has not been reaped.
fn terminate(child: &Child) {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        return;
    };
    // SAFETY: kill(2) reads no memory of ours. The caller only passes
    // children whose exit `try_wait` has not collected, so the pid still
    // names this child (a zombie at worst), never a reused one.
    unsafe { libc::kill(pid, libc::SIGTERM) };
}

/// A free TCP port on loopback for a local run's coordinator. The port is
/// released before rank 0 binds it, so another process could take it in
/// between; a local run that loses that race fails at rendezvous and can be
/// rerun.
pub fn free_local_port() -> Result<u16, DistError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| DistError::io("cannot find a free port for the coordinator", e))
}
