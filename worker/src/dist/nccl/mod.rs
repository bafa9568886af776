//! The NCCL backend of [`Collective`](super::Collective) (feature `cuda`).
//!
//! ```text
//! rank 0: ncclGetUniqueId ─▶ rendezvous blob ─▶ roster ─▶ every rank: ncclCommInitRankConfig
//!         (non-blocking) ─▶ world  ─▶ new_group: ncclCommSplit (SP / EP / DP groups)
//! every operation: enqueue on the backend's stream ─▶ watch (async error + event) ─▶ abort past the deadline
//! ```
//!
//! The pure parts build and are tested everywhere: the id's trip through
//! the rendezvous blob ([`id`]), what each call moves ([`plan`]) and the
//! timeout logic ([`watchdog`]). The communicator itself
//! ([`NcclCollective`]) needs the `cuda` feature, the driver and
//! `libnccl` at run time. See `docs/distributed.md`.

pub mod id;
pub mod plan;
pub mod watchdog;

#[cfg(feature = "cuda")]
pub mod collective;
#[cfg(feature = "cuda")]
mod comm;
#[cfg(feature = "cuda")]
mod setup;

#[cfg(feature = "cuda")]
pub use collective::NcclCollective;
#[cfg(feature = "cuda")]
pub use comm::{MIN_VERSION, nccl_library};
#[cfg(feature = "cuda")]
pub use setup::NcclSetup;
