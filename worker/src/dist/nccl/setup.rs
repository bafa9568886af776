//! From the operator's environment to an NCCL world: rank 0 makes the
//! NCCL unique id and registers it as its rendezvous blob; every rank gets
//! it in the roster (the same store, admission checks and error messages
//! as the TCP backend) and initialises its communicator with it.

use std::time::Duration;

use super::NcclCollective;
use super::collective::new_id;
use super::id;
use crate::dist::env::DistEnv;
use crate::dist::error::DistError;
use crate::dist::rendezvous::{self, Registration, Store};

/// Everything one rank needs to join the world over NCCL.
pub struct NcclSetup {
    pub rank: usize,
    pub world_size: usize,
    pub attempt: u64,
    /// [`crate::dist::config_hash`] of the worker config.
    pub config_hash: u64,
    /// `host:port` of rank 0's rendezvous store.
    pub coordinator: String,
    /// Rank 0 only: an already bound store (tests); `None` binds one at
    /// the coordinator's port.
    pub store: Option<Store>,
    /// The GPU: one process per GPU, so the local rank.
    pub device: usize,
    /// The rendezvous, and then NCCL's own initialisation, each get this.
    pub rendezvous_timeout: Duration,
    /// The bound on every collective.
    pub collective_timeout: Duration,
}

impl NcclSetup {
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
            device: env.local_rank,
            rendezvous_timeout,
            collective_timeout,
        }
    }
}

impl NcclCollective {
    /// Rendezvous, then NCCL's initialisation: the world group. Checks the
    /// driver and NCCL first, so a host without them fails before it
    /// registers (and rank 0 before it opens the store).
    pub fn connect(setup: NcclSetup) -> Result<Self, DistError> {
        super::collective::driver_present()?;
        super::comm::nccl_library()?;
        let blob = if setup.rank == 0 {
            id::encode(&new_id()?)
        } else {
            Vec::new()
        };
        let registration = Registration {
            rank: setup.rank,
            world_size: setup.world_size,
            config_hash: setup.config_hash,
            attempt: setup.attempt,
            // NCCL finds its peers itself (through rank 0's bootstrap
            // listener, named in the id); nothing to listen on here.
            listen: String::new(),
            blob,
        };
        let roster = rendezvous::join(
            &setup.coordinator,
            &registration,
            setup.store,
            setup.rendezvous_timeout,
        )?;
        let id = id::from_roster(&roster)?;
        Self::init(
            setup.device,
            setup.rank,
            setup.world_size,
            &id,
            setup.rendezvous_timeout,
            setup.collective_timeout,
        )
    }
}
