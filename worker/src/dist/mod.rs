//! Distributed training's communication layer (issue #7): the rendezvous
//! that forms a gang ([`rendezvous`]), the [`Collective`] operations ranks
//! use to exchange tensors, and the TCP backend ([`tcp`]) for CPUs, tests
//! and clusters without GPUs; the NCCL backend ([`nccl`], feature `cuda`)
//! implements the same trait for GPUs.
//!
//! ```text
//!  rank 0: Store (coordinator:29400) ◀── register(rank, world, config hash, attempt, listen addr, blob)
//!                                    ──▶ roster (every rank's addr + blob)        ── every rank
//!  mesh: rank r connects to 0..r, accepts r+1..n  →  Collective (world) → new_group(SP / EP / DP ranks)
//! ```
//!
//! See `docs/distributed.md` for the algorithms, failure behaviour and
//! measured bandwidth.

pub mod backend;
pub mod collective;
pub mod data_parallel;
pub mod env;
pub mod error;
pub mod expert_parallel;
mod frame;
pub mod launch;
pub mod layout;
pub mod nccl;
pub mod preflight;
pub mod rendezvous;
pub mod schedule;
pub mod sequence_parallel;
pub mod solo;
pub mod tcp;

pub use collective::{Collective, exchange_counts};
pub use env::DistEnv;
pub use error::DistError;
pub use solo::Solo;
pub use tcp::{TcpCollective, TcpSetup};

/// The config hash ranks compare at rendezvous: FNV-1a of the config's
/// canonical JSON (field order is fixed by the struct, so equal configs hash
/// equal on every rank and build).
pub fn config_hash(config: &moe_crds::WorkerConfig) -> u64 {
    // A WorkerConfig always serialises; hash an empty document if not.
    let json = serde_json::to_vec(config).unwrap_or_default();
    schedule::fnv1a(&json)
}
