//! Rendezvous: rank 0 hosts a small TCP store at the coordinator address;
//! every rank (rank 0 too, over loopback) registers its rank, world size,
//! config hash and attempt, plus where its backend listens and an opaque blob
//! (later the 128-byte NCCL unique id). When all `world_size` ranks have
//! registered, the store sends everyone the roster in rank order and exits.
//!
//! It fails fast and says why: a rank whose world size, config hash, attempt
//! or protocol differs from rank 0's, a rank number out of range or taken
//! twice, or ranks missing at the deadline end the rendezvous for every
//! rank, each receiving the same explanation.

mod store;

use std::net::{TcpStream, ToSocketAddrs};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use store::{Store, StoreHandle};

use super::error::DistError;
use super::frame::{read_message, write_message};

/// Bumped when the messages below change, so mixed versions fail clearly.
const PROTOCOL: u32 = 1;
/// Extra wait for the store's verdict beyond this rank's own timeout: the
/// store's deadline may be a little later than the client's (it started later).
const VERDICT_GRACE: Duration = Duration::from_secs(1);
/// Pause between connection attempts while rank 0 is not up yet.
const RETRY: Duration = Duration::from_millis(50);

/// What one rank tells the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub rank: usize,
    pub world_size: usize,
    /// Hash of the worker config ([`super::config_hash`]): pods given
    /// different configs must not train together.
    pub config_hash: u64,
    /// `MOE_ATTEMPT`: pods of different gang attempts must not meet.
    pub attempt: u64,
    /// `host:port` where this rank's backend accepts peers. An unspecified
    /// IP (`0.0.0.0`) is replaced by the address the store sees the rank
    /// connect from.
    pub listen: String,
    /// Opaque backend data passed to every rank (the NCCL unique id).
    pub blob: Vec<u8>,
}

/// What the store expects of every registration: rank 0's own values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expectation {
    pub world_size: usize,
    pub config_hash: u64,
    pub attempt: u64,
}

impl From<&Registration> for Expectation {
    fn from(r: &Registration) -> Self {
        Self {
            world_size: r.world_size,
            config_hash: r.config_hash,
            attempt: r.attempt,
        }
    }
}

/// One rank's entry in the roster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub addr: String,
    pub blob: Vec<u8>,
}

/// The rendezvous result, the same on every rank.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Roster {
    /// Chosen by the store; mesh connections carry it, so a connection from
    /// another gang (or attempt) is refused.
    pub session: u64,
    /// By rank.
    pub peers: Vec<Peer>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Hello {
    protocol: u32,
    little_endian: bool,
    rank: usize,
    world_size: usize,
    config_hash: u64,
    attempt: u64,
    listen: String,
    blob: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
enum Verdict {
    Roster { session: u64, peers: Vec<Peer> },
    Rejected { reason: String },
}

/// Registers with the store at `coordinator` (`host:port`, retried until
/// it answers: rank 0 may start last) and waits for the roster.
pub fn register(
    coordinator: &str,
    registration: &Registration,
    timeout: Duration,
) -> Result<Roster, DistError> {
    let started = Instant::now();
    let deadline = started + timeout;
    let unreachable = |detail: String| DistError::Unreachable {
        coordinator: coordinator.to_string(),
        waited: started.elapsed(),
        detail,
    };
    let mut stream = connect_by(coordinator, deadline).map_err(unreachable)?;
    let connected = Instant::now();
    let hello = Hello {
        protocol: PROTOCOL,
        little_endian: cfg!(target_endian = "little"),
        rank: registration.rank,
        world_size: registration.world_size,
        config_hash: registration.config_hash,
        attempt: registration.attempt,
        listen: registration.listen.clone(),
        blob: registration.blob.clone(),
    };
    write_message(&mut stream, &hello).map_err(|e| unreachable(e.to_string()))?;
    match read_message::<Verdict>(&mut stream, connected + timeout + VERDICT_GRACE) {
        Ok(Verdict::Roster { session, peers }) if peers.len() == registration.world_size => {
            Ok(Roster { session, peers })
        }
        Ok(Verdict::Roster { peers, .. }) => Err(DistError::Rejected {
            reason: format!(
                "the store sent a roster of {} ranks for world size {}",
                peers.len(),
                registration.world_size
            ),
        }),
        Ok(Verdict::Rejected { reason }) => Err(DistError::Rejected { reason }),
        Err(e) => Err(unreachable(format!(
            "no verdict after registering: {}",
            e.detail()
        ))),
    }
}

/// Connects to `addr`, retrying refused connections and failed name
/// lookups (the coordinator's DNS name appears only once its pod exists).
pub(crate) fn connect_by(addr: &str, deadline: Instant) -> Result<TcpStream, String> {
    let mut last = String::from("no attempt made");
    loop {
        match addr.to_socket_addrs() {
            Ok(candidates) => {
                for candidate in candidates {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    match TcpStream::connect_timeout(&candidate, left.min(Duration::from_secs(2))) {
                        Ok(stream) => {
                            // Collective frames are often small; do not let Nagle delay them.
                            let _ = stream.set_nodelay(true);
                            return Ok(stream);
                        }
                        Err(e) => last = format!("{candidate}: {e}"),
                    }
                }
            }
            Err(e) => last = format!("cannot resolve {addr}: {e}"),
        }
        if Instant::now() + RETRY >= deadline {
            return Err(last);
        }
        thread::sleep(RETRY);
    }
}

/// The whole rendezvous for one rank: rank 0 serves `store` (or, if `None`,
/// binds one on all interfaces at the coordinator's port) and registers with
/// it like everyone else.
pub fn join(
    coordinator: &str,
    registration: &Registration,
    store: Option<Store>,
    timeout: Duration,
) -> Result<Roster, DistError> {
    if registration.rank != 0 {
        if store.is_some() {
            return Err(DistError::invalid(
                "rendezvous",
                format!(
                    "rank {} was given a store; only rank 0 hosts it",
                    registration.rank
                ),
            ));
        }
        return register(coordinator, registration, timeout);
    }
    let store = match store {
        Some(store) => store,
        None => {
            let port = coordinator
                .rsplit_once(':')
                .and_then(|(_, port)| port.parse::<u16>().ok())
                .ok_or_else(|| {
                    DistError::invalid(
                        "rendezvous",
                        format!("coordinator {coordinator:?} is not host:port"),
                    )
                })?;
            // Dual-stack where the host has IPv6 (IPv6-only clusters),
            // else IPv4.
            Store::bind(("::", port)).or_else(|_| Store::bind(("0.0.0.0", port)))?
        }
    };
    let handle = store.spawn(Expectation::from(registration), timeout);
    let roster = register(coordinator, registration, timeout);
    // The store's own error is the more precise one (typed timeout, with
    // the missing ranks); the client's says the same in words.
    match (handle.wait(), roster) {
        (Ok(()), roster) => roster,
        (Err(store_error), _) => Err(store_error),
    }
}
