//! From a rendezvous to a connected mesh: every rank listens before it
//! registers (its address goes into the roster), then connects to every
//! lower rank and accepts every higher one. Each connection opens with a
//! handshake naming the session and the connecting rank, so strays (another
//! gang, an older attempt, a port scanner) are turned away.

use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::TcpCollective;
use super::mesh::Mesh;
use crate::dist::env::DistEnv;
use crate::dist::error::DistError;
use crate::dist::frame::read_exact_by;
use crate::dist::rendezvous::{self, Registration, Roster, Store, connect_by};

/// "MOEH": first field of a mesh handshake.
const HANDSHAKE_MAGIC: u32 = 0x4d4f_4548;
const HANDSHAKE_LEN: usize = 16;

/// Everything one rank needs to join the world over TCP.
pub struct TcpSetup {
    pub rank: usize,
    pub world_size: usize,
    pub attempt: u64,
    /// [`crate::dist::config_hash`] of the worker config.
    pub config_hash: u64,
    /// `host:port` of rank 0's rendezvous store.
    pub coordinator: String,
    /// Rank 0 only: an already bound store (tests bind port 0). `None` on
    /// rank 0 binds all interfaces at the coordinator's port.
    pub store: Option<Store>,
    /// Where this rank accepts its peers: an IP with port 0 (any free port).
    pub listen: SocketAddr,
    /// How long the rendezvous may take, and then the mesh connections.
    pub rendezvous_timeout: Duration,
    /// The bound on every collective.
    pub collective_timeout: Duration,
}

impl TcpSetup {
    /// This rank's setup from the environment the operator gives worker
    /// pods: rank 0 binds the store on all interfaces at the coordinator's
    /// port, and every rank listens on all interfaces (the store tells the
    /// others the address it saw the rank connect from).
    pub fn from_env(
        env: &DistEnv,
        config_hash: u64,
        rendezvous_timeout: Duration,
        collective_timeout: Duration,
    ) -> Self {
        Self {
            rank: env.rank,
            world_size: env.world_size,
            attempt: env.attempt,
            config_hash,
            coordinator: env.coordinator.clone(),
            store: None,
            listen: SocketAddr::from(([0, 0, 0, 0], 0)),
            rendezvous_timeout,
            collective_timeout,
        }
    }
}

impl TcpCollective {
    /// Rendezvous, then connect the mesh: the world group.
    pub fn connect(setup: TcpSetup) -> Result<Self, DistError> {
        let listener = TcpListener::bind(setup.listen)
            .map_err(|e| DistError::io(format!("cannot listen on {}", setup.listen), e))?;
        let listen = listener
            .local_addr()
            .map_err(|e| DistError::io("mesh listener address", e))?;
        let registration = Registration {
            rank: setup.rank,
            world_size: setup.world_size,
            config_hash: setup.config_hash,
            attempt: setup.attempt,
            listen: listen.to_string(),
            blob: Vec::new(),
        };
        let roster = rendezvous::join(
            &setup.coordinator,
            &registration,
            setup.store,
            setup.rendezvous_timeout,
        )?;
        // Its own window: every rank got the roster at about the same time,
        // however long the rendezvous waited for the slowest pod.
        let deadline = Instant::now() + setup.rendezvous_timeout;
        Self::from_roster(
            setup.rank,
            &roster,
            &listener,
            deadline,
            setup.collective_timeout,
        )
    }

    /// Connects the mesh described by `roster` (this rank listens on
    /// `listener`, whose address it registered).
    pub fn from_roster(
        rank: usize,
        roster: &Roster,
        listener: &TcpListener,
        deadline: Instant,
        collective_timeout: Duration,
    ) -> Result<Self, DistError> {
        let size = roster.peers.len();
        let give_up = AtomicBool::new(false);
        let (incoming, outgoing) = thread::scope(|scope| {
            // Accept while connecting: with many ranks, connections to a
            // rank that is not accepting yet could overflow its backlog.
            let acceptor = scope
                .spawn(|| accept_higher(listener, rank, size, roster.session, deadline, &give_up));
            let outgoing = connect_lower(rank, roster, deadline);
            if outgoing.is_err() {
                give_up.store(true, Ordering::Relaxed);
            }
            let incoming = acceptor.join().unwrap_or_else(|_| {
                Err(DistError::Rejected {
                    reason: "the mesh acceptor thread panicked".into(),
                })
            });
            (incoming, outgoing)
        });
        let mut sockets: Vec<Option<TcpStream>> = outgoing?;
        sockets.extend(incoming?);
        let mesh = Mesh::new(sockets, collective_timeout)?;
        let members = (0..size).collect();
        Self::over(Arc::new(Mutex::new(mesh)), members, rank).ok_or_else(|| {
            DistError::invalid("connect", format!("rank {rank} not in a world of {size}"))
        })
    }
}

fn handshake(session: u64, rank: usize) -> [u8; HANDSHAKE_LEN] {
    let mut out = [0u8; HANDSHAKE_LEN];
    out[0..4].copy_from_slice(&HANDSHAKE_MAGIC.to_le_bytes());
    out[4..8].copy_from_slice(&(rank as u32).to_le_bytes());
    out[8..16].copy_from_slice(&session.to_le_bytes());
    out
}

/// Sockets to ranks `0..rank` (this rank connects), then `None` for itself.
fn connect_lower(
    rank: usize,
    roster: &Roster,
    deadline: Instant,
) -> Result<Vec<Option<TcpStream>>, DistError> {
    let mut sockets = Vec::with_capacity(rank + 1);
    for (peer, entry) in roster.peers.iter().enumerate().take(rank) {
        let mut stream =
            connect_by(&entry.addr, deadline).map_err(|detail| DistError::PeerLost {
                op: "connect",
                peer,
                detail: format!("cannot connect to {}: {detail}", entry.addr),
            })?;
        stream
            .write_all(&handshake(roster.session, rank))
            .map_err(|e| DistError::PeerLost {
                op: "connect",
                peer,
                detail: e.to_string(),
            })?;
        sockets.push(Some(stream));
    }
    sockets.push(None);
    Ok(sockets)
}

/// Sockets from ranks `rank+1..size`, in rank order.
fn accept_higher(
    listener: &TcpListener,
    rank: usize,
    size: usize,
    session: u64,
    deadline: Instant,
    give_up: &AtomicBool,
) -> Result<Vec<Option<TcpStream>>, DistError> {
    let mut slots: Vec<Option<TcpStream>> = (rank + 1..size).map(|_| None).collect();
    listener
        .set_nonblocking(true)
        .map_err(|e| DistError::io("mesh listener", e))?;
    while slots.iter().any(Option::is_none) {
        if Instant::now() >= deadline || give_up.load(Ordering::Relaxed) {
            let missing: Vec<usize> = (0..slots.len())
                .filter(|&i| slots[i].is_none())
                .map(|i| rank + 1 + i)
                .collect();
            return Err(DistError::Rejected {
                reason: format!("ranks {missing:?} did not connect to rank {rank} in time"),
            });
        }
        let (mut stream, from) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(2));
                continue;
            }
            Err(e) => return Err(DistError::io("mesh accept", e)),
        };
        let mut raw = [0u8; HANDSHAKE_LEN];
        let read = stream
            .set_nonblocking(false)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                read_exact_by(
                    &mut stream,
                    &mut raw,
                    deadline.min(Instant::now() + Duration::from_secs(5)),
                )
                .map_err(|e| e.detail())
            });
        let word = |i: usize| u32::from_le_bytes([raw[i], raw[i + 1], raw[i + 2], raw[i + 3]]);
        let mut session_bytes = [0u8; 8];
        session_bytes.copy_from_slice(&raw[8..16]);
        let peer = word(4) as usize;
        let valid = read.is_ok()
            && word(0) == HANDSHAKE_MAGIC
            && u64::from_le_bytes(session_bytes) == session
            && peer > rank
            && peer < size
            && slots[peer - rank - 1].is_none();
        if !valid {
            tracing::warn!(%from, "mesh: refused a connection that is not a peer of this session");
            continue;
        }
        let _ = stream.set_nodelay(true);
        slots[peer - rank - 1] = Some(stream);
    }
    Ok(slots)
}
