//! Where this process stands in the gang, from the environment the operator
//! (or `moectl run --local`) sets: see `moe_crds::contract::env`.

use std::fmt;
use std::time::Duration;

use moe_crds::contract::env;

/// Set by the worker's own launcher on each local rank it spawns; see
/// [`env::LOCAL_RANK`].
pub const LOCAL_RANK: &str = env::LOCAL_RANK;

/// Optional, in seconds: how long the rendezvous may wait for every rank
/// (default 600: pods of a gang can start minutes apart), which also bounds
/// the wait for rank 0's checkpoint writes.
pub const RENDEZVOUS_TIMEOUT: &str = "MOE_RENDEZVOUS_TIMEOUT_SECONDS";
/// Optional, in seconds: the bound on every collective (default 300), so
/// the time a rank's death takes to end the others. Tests set it short.
pub const COLLECTIVE_TIMEOUT: &str = "MOE_COLLECTIVE_TIMEOUT_SECONDS";

/// The GPU of local rank `local_rank` on a node with `devices` GPUs: its
/// own when there are enough (the operator asks for one per process),
/// else the ranks take turns over the GPUs (several processes on one GPU:
/// the one-GPU data-parallel check, over TCP).
pub fn gpu_ordinal(local_rank: usize, devices: usize) -> usize {
    if devices == 0 {
        local_rank
    } else {
        local_rank % devices
    }
}

/// This process's place in the gang.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DistEnv {
    pub world_size: usize,
    /// Global rank: `node_rank × procs_per_node + local_rank`.
    pub rank: usize,
    pub node_rank: usize,
    pub procs_per_node: usize,
    pub local_rank: usize,
    /// Several local ranks and no [`LOCAL_RANK`]: this process is not a rank
    /// but starts them ([`super::launch`]), as torchrun does.
    pub launcher: bool,
    /// `host:port` of rank 0's rendezvous store.
    pub coordinator: String,
    pub attempt: u64,
}

/// A missing or malformed variable, named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvError(pub String);

impl fmt::Display for EnvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EnvError {}

impl DistEnv {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, EnvError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads variables through `lookup` (pure, for tests). Without
    /// `MOE_WORLD_SIZE` the process is a world of one: single-process runs
    /// need no variables at all.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, EnvError> {
        let number = |name: &str, default: Option<u64>| -> Result<u64, EnvError> {
            match lookup(name) {
                Some(v) => v
                    .trim()
                    .parse()
                    .map_err(|_| EnvError(format!("{name}={v:?} is not a non-negative integer"))),
                None => default.ok_or_else(|| EnvError(format!("{name} is not set"))),
            }
        };
        let distributed = lookup(env::WORLD_SIZE).is_some();
        let world_size = number(env::WORLD_SIZE, Some(1))? as usize;
        let node_rank = number(env::NODE_RANK, Some(0))? as usize;
        let procs_per_node = number(env::PROCS_PER_NODE, Some(1))? as usize;
        let local_rank = number(LOCAL_RANK, Some(0))? as usize;
        let launcher = procs_per_node > 1 && lookup(LOCAL_RANK).is_none();
        let attempt = number(env::ATTEMPT, Some(0))?;
        let coordinator = match lookup(env::COORDINATOR) {
            Some(c) => c,
            None if !distributed || world_size == 1 => "127.0.0.1:0".into(),
            None => return Err(EnvError(format!("{} is not set", env::COORDINATOR))),
        };
        if world_size == 0 || procs_per_node == 0 {
            return Err(EnvError(format!(
                "{}={world_size} and {}={procs_per_node} must be positive",
                env::WORLD_SIZE,
                env::PROCS_PER_NODE
            )));
        }
        if local_rank >= procs_per_node {
            return Err(EnvError(format!(
                "{LOCAL_RANK}={local_rank} but {}={procs_per_node}",
                env::PROCS_PER_NODE
            )));
        }
        let rank = node_rank * procs_per_node + local_rank;
        if rank >= world_size {
            return Err(EnvError(format!(
                "rank {rank} ({}={node_rank} × {}={procs_per_node} + {LOCAL_RANK}={local_rank}) is not below {}={world_size}",
                env::NODE_RANK,
                env::PROCS_PER_NODE,
                env::WORLD_SIZE
            )));
        }
        Ok(Self {
            world_size,
            rank,
            node_rank,
            procs_per_node,
            local_rank,
            launcher,
            coordinator,
            attempt,
        })
    }
}

/// How long a rank waits for its peers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub rendezvous: Duration,
    pub collective: Duration,
    /// The other ranks' wait while rank 0 writes a checkpoint (slow disks,
    /// big models): the rendezvous timeout.
    pub checkpoint: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            rendezvous: Duration::from_secs(600),
            collective: Duration::from_secs(300),
            checkpoint: Duration::from_secs(600),
        }
    }
}

impl Timeouts {
    /// Reads [`RENDEZVOUS_TIMEOUT`] and [`COLLECTIVE_TIMEOUT`].
    pub fn from_env() -> Result<Self, EnvError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the variables through `lookup` (pure, for tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, EnvError> {
        let seconds = |name: &str, default: Duration| match lookup(name) {
            None => Ok(default),
            Some(v) => match v.trim().parse::<f64>() {
                Ok(s) if s.is_finite() && s > 0.0 && s < 1e9 => Ok(Duration::from_secs_f64(s)),
                _ => Err(EnvError(format!(
                    "{name}={v:?} is not a positive number of seconds"
                ))),
            },
        };
        let defaults = Self::default();
        let rendezvous = seconds(RENDEZVOUS_TIMEOUT, defaults.rendezvous)?;
        Ok(Self {
            rendezvous,
            collective: seconds(COLLECTIVE_TIMEOUT, defaults.collective)?,
            checkpoint: rendezvous,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_local_rank_gets_its_gpu_or_takes_turns() {
        assert_eq!(gpu_ordinal(3, 8), 3);
        assert_eq!(
            (0..4).map(|r| gpu_ordinal(r, 2)).collect::<Vec<_>>(),
            [0, 1, 0, 1]
        );
        assert_eq!(gpu_ordinal(1, 1), 0);
        // No count (no driver): the rank's own, whose opening then fails.
        assert_eq!(gpu_ordinal(2, 0), 2);
    }
    use std::collections::HashMap;

    fn read(vars: &[(&str, &str)]) -> Result<DistEnv, EnvError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        DistEnv::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn rank_comes_from_node_rank_and_local_rank() {
        let e = read(&[
            (env::WORLD_SIZE, "8"),
            (env::NODE_RANK, "1"),
            (env::PROCS_PER_NODE, "4"),
            (LOCAL_RANK, "2"),
            (env::COORDINATOR, "job-a3-0.job:29400"),
            (env::ATTEMPT, "3"),
        ])
        .unwrap();
        assert_eq!((e.rank, e.world_size, e.attempt), (6, 8, 3));
        assert!(!e.launcher);
        assert_eq!(e.coordinator, "job-a3-0.job:29400");
    }

    #[test]
    fn no_variables_is_a_world_of_one_and_bad_ones_are_named() {
        let solo = read(&[]).unwrap();
        assert_eq!((solo.rank, solo.world_size, solo.launcher), (0, 1, false));
        let pod = read(&[
            (env::WORLD_SIZE, "8"),
            (env::PROCS_PER_NODE, "4"),
            (env::COORDINATOR, "x:1"),
        ])
        .unwrap();
        assert!(
            pod.launcher,
            "4 local ranks and no {LOCAL_RANK}: start them"
        );
        let err = read(&[(env::WORLD_SIZE, "2"), (env::NODE_RANK, "0")]).unwrap_err();
        assert!(err.0.contains(env::COORDINATOR), "{err}");
        let err = read(&[(env::WORLD_SIZE, "two")]).unwrap_err();
        assert!(err.0.contains("MOE_WORLD_SIZE=\"two\""), "{err}");
        let err = read(&[
            (env::WORLD_SIZE, "2"),
            (env::NODE_RANK, "2"),
            (env::COORDINATOR, "x:1"),
        ])
        .unwrap_err();
        assert!(err.0.contains("is not below MOE_WORLD_SIZE=2"), "{err}");
    }

    #[test]
    fn timeouts_default_to_minutes_and_read_seconds() {
        let none = Timeouts::from_lookup(|_| None).unwrap();
        assert_eq!(none, Timeouts::default());
        let short =
            Timeouts::from_lookup(|k| (k == COLLECTIVE_TIMEOUT).then(|| "1.5".into())).unwrap();
        assert_eq!(short.collective, Duration::from_millis(1500));
        assert_eq!(short.rendezvous, Duration::from_secs(600));
        let err =
            Timeouts::from_lookup(|k| (k == RENDEZVOUS_TIMEOUT).then(|| "0".into())).unwrap_err();
        assert!(err.0.contains(RENDEZVOUS_TIMEOUT), "{err}");
    }
}
