//! The mesh: one TCP connection to every other rank, shared by the world and
//! every group made from it. Each connection has a writer thread fed by a
//! queue, so a send never blocks the caller: ring steps "send right, receive
//! left" on blocking sockets would otherwise deadlock once a payload exceeds
//! the socket buffers. Receives run on the caller's thread, bounded by the
//! operation's deadline.

use std::collections::HashMap;
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::dist::error::DistError;
use crate::dist::frame::{HEADER_LEN, Header, ReadError, read_exact_by};

/// A payload owned by the writer queue. `f32` data stays in a `Vec<f32>` so
/// a received buffer can be summed into and forwarded without re-copying.
pub(crate) enum Payload {
    Bytes(Vec<u8>),
    Floats(Vec<f32>),
}

impl Payload {
    fn as_bytes(&self) -> &[u8] {
        match self {
            Self::Bytes(b) => b,
            Self::Floats(f) => bytemuck::cast_slice(f),
        }
    }
}

struct Outgoing {
    header: [u8; HEADER_LEN],
    payload: Payload,
}

/// One peer: the socket read on the caller's thread, and its writer thread.
struct Link {
    socket: TcpStream,
    queue: Option<Sender<Outgoing>>,
    /// Why the writer stopped, if it failed.
    failure: Arc<Mutex<Option<String>>>,
    writer: Option<JoinHandle<()>>,
}

impl Link {
    fn new(socket: TcpStream, write_timeout: Duration) -> Result<Self, DistError> {
        let mut write_half = socket
            .try_clone()
            .map_err(|e| DistError::io("cannot clone a peer socket", e))?;
        // A peer that stops reading fails the write instead of blocking the
        // writer forever (and with it, the drop that joins it).
        write_half
            .set_write_timeout(Some(write_timeout))
            .map_err(|e| DistError::io("cannot set a peer socket's write timeout", e))?;
        let (queue, outgoing) = mpsc::channel::<Outgoing>();
        let failure = Arc::new(Mutex::new(None));
        let failed = Arc::clone(&failure);
        let writer = thread::Builder::new()
            .name("moe-dist-writer".into())
            .spawn(move || write_loop(&mut write_half, &outgoing, &failed))
            .map_err(|e| DistError::io("cannot start a peer writer thread", e))?;
        Ok(Self {
            socket,
            queue: Some(queue),
            failure,
            writer: Some(writer),
        })
    }

    fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn write_loop(
    socket: &mut TcpStream,
    outgoing: &Receiver<Outgoing>,
    failure: &Mutex<Option<String>>,
) {
    for out in outgoing {
        let written = socket
            .write_all(&out.header)
            .and_then(|()| socket.write_all(out.payload.as_bytes()));
        if let Err(e) = written {
            *failure.lock().unwrap_or_else(PoisonError::into_inner) =
                Some(format!("send failed: {e}"));
            // Wakes this rank's reader of the same socket with an error too.
            let _ = socket.shutdown(Shutdown::Both);
            return;
        }
    }
}

pub(crate) struct Mesh {
    /// By global rank; `None` at `rank`.
    links: Vec<Option<Link>>,
    /// Collectives run so far, per group id (see [`Header::seq`]).
    sequences: HashMap<u64, u64>,
    /// Set by the first failed collective.
    broken: Option<String>,
    timeout: Duration,
}

impl Mesh {
    /// `sockets[r]` connects to global rank `r` (`None` for this rank).
    pub fn new(sockets: Vec<Option<TcpStream>>, timeout: Duration) -> Result<Self, DistError> {
        let links = sockets
            .into_iter()
            .map(|s| s.map(|s| Link::new(s, timeout)).transpose())
            .collect::<Result<_, _>>()?;
        Ok(Self {
            links,
            sequences: HashMap::new(),
            broken: None,
            timeout,
        })
    }

    /// Starts collective `op` on `group` (global ranks `members`).
    pub fn begin<'m>(
        &'m mut self,
        op: OpKind,
        group: u64,
        members: &'m [usize],
    ) -> Result<Op<'m>, DistError> {
        if let Some(cause) = &self.broken {
            return Err(DistError::Aborted {
                cause: cause.clone(),
            });
        }
        let seq = self.sequences.entry(group).or_insert(0);
        let this = *seq;
        *seq += 1;
        let deadline = Instant::now() + self.timeout;
        Ok(Op {
            mesh: self,
            kind: op,
            group,
            seq: this,
            members,
            deadline,
        })
    }

    /// Sets the bound of later collectives, and the writers' send timeout
    /// with it (a socket option, shared with the writer's handle): a writer
    /// must wait for a slow peer as long as a collective may.
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<(), DistError> {
        for link in self.links.iter().flatten() {
            link.socket
                .set_write_timeout(Some(timeout))
                .map_err(|e| DistError::io("cannot set a peer socket's write timeout", e))?;
        }
        self.timeout = timeout;
        Ok(())
    }

    /// Marks the mesh failed and shuts every connection down, so peers
    /// blocked on this rank see the failure now, not at their timeout —
    /// and the ones blocked on them in turn.
    pub fn abort(&mut self, cause: String) {
        if self.broken.is_some() {
            return;
        }
        for link in self.links.iter().flatten() {
            let _ = link.socket.shutdown(Shutdown::Both);
        }
        self.broken = Some(cause);
    }
}

impl Drop for Mesh {
    /// Flushes what the writers still hold (a peer may need this rank's last
    /// frames to finish the last collective), then closes the connections.
    fn drop(&mut self) {
        for link in self.links.iter_mut().flatten() {
            link.queue = None;
        }
        for link in self.links.iter_mut().flatten() {
            if let Some(writer) = link.writer.take() {
                let _ = writer.join();
            }
        }
    }
}

/// The collectives, as numbered in frame headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OpKind {
    AllReduce = 1,
    ReduceScatter = 2,
    AllGather = 3,
    AllToAll = 4,
    Broadcast = 5,
    Barrier = 6,
    AllReduceMax = 7,
}

impl OpKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::AllReduce => "all_reduce",
            Self::ReduceScatter => "reduce_scatter",
            Self::AllGather => "all_gather",
            Self::AllToAll => "all_to_all",
            Self::Broadcast => "broadcast",
            Self::Barrier => "barrier",
            Self::AllReduceMax => "all_reduce_max",
        }
    }

    fn from_code(code: u32) -> Option<Self> {
        [
            Self::AllReduce,
            Self::ReduceScatter,
            Self::AllGather,
            Self::AllToAll,
            Self::Broadcast,
            Self::Barrier,
            Self::AllReduceMax,
        ]
        .into_iter()
        .find(|k| *k as u32 == code)
    }
}

/// One collective in progress: sends and receives addressed by group rank.
pub(crate) struct Op<'m> {
    mesh: &'m mut Mesh,
    kind: OpKind,
    group: u64,
    seq: u64,
    members: &'m [usize],
    deadline: Instant,
}

impl Op<'_> {
    fn header(&self, len: usize) -> Header {
        Header {
            op: self.kind as u32,
            group: self.group,
            seq: self.seq,
            len: len as u64,
        }
    }

    fn link(&self, peer: usize) -> Result<&Link, DistError> {
        self.mesh.links[peer].as_ref().ok_or_else(|| {
            DistError::invalid(
                self.kind.name(),
                format!("rank {peer} has no link to itself"),
            )
        })
    }

    /// Queues `payload` for group rank `to`; returns at once.
    pub fn send(&mut self, to: usize, payload: Payload) -> Result<(), DistError> {
        let peer = self.members[to];
        let header = self.header(payload.as_bytes().len()).encode();
        let link = self.link(peer)?;
        let lost = |detail: String| DistError::PeerLost {
            op: self.kind.name(),
            peer,
            detail,
        };
        if let Some(failure) = link.failure() {
            return Err(lost(failure));
        }
        let queue = link
            .queue
            .as_ref()
            .ok_or_else(|| lost("connection closed".into()))?;
        queue
            .send(Outgoing { header, payload })
            .map_err(|_| lost(link.failure().unwrap_or_else(|| "writer stopped".into())))
    }

    /// Receives the frame group rank `from` sent in this collective into
    /// `dst`, which must be exactly the payload's size.
    pub fn recv_into(&mut self, from: usize, dst: &mut [u8]) -> Result<(), DistError> {
        let peer = self.members[from];
        let (kind, deadline, timeout) = (self.kind, self.deadline, self.mesh.timeout);
        let expected = self.header(dst.len());
        let link = self.mesh.links[peer].as_mut().ok_or_else(|| {
            DistError::invalid(kind.name(), format!("rank {peer} has no link to itself"))
        })?;
        let failed = |e: ReadError, link: &Link| match e {
            ReadError::TimedOut => DistError::Timeout {
                op: kind.name(),
                peer: Some(peer),
                after: timeout,
            },
            other => DistError::PeerLost {
                op: kind.name(),
                peer,
                // The writer's error, if it failed first, says more than the reader's.
                detail: link.failure().unwrap_or_else(|| other.detail()),
            },
        };
        let mut raw = [0u8; HEADER_LEN];
        if let Err(e) = read_exact_by(&mut link.socket, &mut raw, deadline) {
            return Err(failed(e, link));
        }
        let got = Header::decode(&raw).map_err(|detail| DistError::Protocol {
            op: kind.name(),
            detail: format!("from rank {peer}: {detail}"),
        })?;
        if got != expected {
            return Err(DistError::Protocol {
                op: kind.name(),
                detail: mismatch(peer, &got, &expected),
            });
        }
        if let Err(e) = read_exact_by(&mut link.socket, dst, deadline) {
            return Err(failed(e, link));
        }
        Ok(())
    }

    /// Receives `n` floats from group rank `from` into a new buffer.
    pub fn recv_floats(&mut self, from: usize, n: usize) -> Result<Vec<f32>, DistError> {
        let mut out = vec![0f32; n];
        self.recv_into(from, bytemuck::cast_slice_mut(&mut out))?;
        Ok(out)
    }
}

/// Explains a frame that is not the expected one, most telling field first.
fn mismatch(peer: usize, got: &Header, want: &Header) -> String {
    let name = |code: u32| OpKind::from_code(code).map_or("an unknown operation", OpKind::name);
    if got.group != want.group || got.op != want.op || got.seq != want.seq {
        format!(
            "rank {peer} sent data for {} #{} on group {:016x}, but this rank is in {} #{} on group {:016x}: ranks called collectives in different orders",
            name(got.op),
            got.seq,
            got.group,
            name(want.op),
            want.seq,
            want.group
        )
    } else {
        format!(
            "rank {peer} sent {} bytes where this rank expects {}: ranks passed different counts or lengths",
            got.len, want.len
        )
    }
}
