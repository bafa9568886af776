//! The one error type of the distributed layer. Every failure names the
//! operation and, where one is to blame, the peer, so the log line that ends a
//! rank says which rank to look at.

use std::fmt;
use std::io;
use std::time::Duration;

#[derive(Debug)]
pub enum DistError {
    /// The rendezvous store refused this rank, or the whole rendezvous
    /// failed (a mismatched or missing rank); `reason` is the store's words.
    Rejected { reason: String },
    /// Not every rank registered with the store in time.
    RendezvousTimeout {
        waited: Duration,
        registered: usize,
        world_size: usize,
        missing: Vec<usize>,
    },
    /// The rendezvous store at `coordinator` could not be reached or did not
    /// answer in time.
    Unreachable {
        coordinator: String,
        waited: Duration,
        detail: String,
    },
    /// A collective did not finish within the collective timeout, waiting
    /// on `peer` (a global rank). NCCL does not say which peer a stuck
    /// operation waits for, so its timeouts carry `None`.
    Timeout {
        op: &'static str,
        peer: Option<usize>,
        after: Duration,
    },
    /// A peer's connection closed or failed during a collective: the peer
    /// died, or failed itself and aborted.
    PeerLost {
        op: &'static str,
        peer: usize,
        detail: String,
    },
    /// A peer sent something this rank did not expect: ranks called
    /// different collectives, on different groups, or with different counts.
    Protocol { op: &'static str, detail: String },
    /// The caller's arguments are inconsistent (a bug in the caller).
    InvalidArgument { op: &'static str, detail: String },
    /// A local socket operation failed outside a collective (binding,
    /// connecting the mesh).
    Io { context: String, error: io::Error },
    /// An earlier collective failed; the communicator cannot be trusted any
    /// more (peers may be half-way through it) and must be rebuilt.
    Aborted { cause: String },
    /// The communication library failed or is missing (NCCL: a CUDA error,
    /// a network error, no `libnccl`). `remote` when NCCL blames another
    /// rank (`ncclRemoteError`): then it is a peer failure.
    Library {
        op: &'static str,
        detail: String,
        remote: bool,
    },
}

impl DistError {
    pub(crate) fn io(context: impl Into<String>, error: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            error,
        }
    }

    pub fn invalid(op: &'static str, detail: impl Into<String>) -> Self {
        Self::InvalidArgument {
            op,
            detail: detail.into(),
        }
    }

    /// True for failures caused by another rank (dead, hung or aborted),
    /// as opposed to this rank's own arguments or sockets.
    pub fn is_peer_failure(&self) -> bool {
        matches!(
            self,
            Self::Timeout { .. }
                | Self::PeerLost { .. }
                | Self::Aborted { .. }
                | Self::Library { remote: true, .. }
        )
    }
}

impl fmt::Display for DistError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rejected { reason } => write!(f, "rendezvous failed: {reason}"),
            Self::RendezvousTimeout {
                waited,
                registered,
                world_size,
                missing,
            } => write!(
                f,
                "rendezvous timed out after {waited:?}: {registered} of {world_size} ranks registered; missing ranks {missing:?}"
            ),
            Self::Unreachable {
                coordinator,
                waited,
                detail,
            } => write!(
                f,
                "rendezvous store at {coordinator} did not answer within {waited:?}: {detail}"
            ),
            Self::Timeout {
                op,
                peer: Some(peer),
                after,
            } => write!(
                f,
                "{op} timed out after {after:?} waiting for rank {peer} (dead, hung, or not calling the same collective)"
            ),
            Self::Timeout {
                op,
                peer: None,
                after,
            } => write!(
                f,
                "{op} timed out after {after:?}: a rank of the group is dead, hung, or not calling the same collective (NCCL does not say which)"
            ),
            Self::PeerLost { op, peer, detail } => {
                write!(f, "{op}: lost the connection to rank {peer}: {detail}")
            }
            Self::Protocol { op, detail } => write!(f, "{op}: {detail}"),
            Self::InvalidArgument { op, detail } => write!(f, "{op}: invalid arguments: {detail}"),
            Self::Io { context, error } => write!(f, "{context}: {error}"),
            Self::Aborted { cause } => write!(
                f,
                "communicator aborted by an earlier failure ({cause}); it must be rebuilt"
            ),
            Self::Library { op, detail, .. } => write!(f, "{op}: {detail}"),
        }
    }
}

impl std::error::Error for DistError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { error, .. } => Some(error),
            _ => None,
        }
    }
}
