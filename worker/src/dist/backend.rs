//! Which [`Collective`](super::Collective) a rank builds (pure): a world
//! of one needs none ([`Solo`](super::Solo)); ranks that train on the GPU
//! talk over NCCL; CPU ranks over TCP.

use moe_crds::Device;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Solo,
    Tcp,
    Nccl,
}

pub fn choose(world_size: usize, device: Device) -> Backend {
    match (world_size, device) {
        (0 | 1, _) => Backend::Solo,
        (_, Device::Cuda) => Backend::Nccl,
        (_, Device::Cpu) => Backend::Tcp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rank_needs_no_backend_gpus_use_nccl_cpus_tcp() {
        assert_eq!(choose(1, Device::Cuda), Backend::Solo);
        assert_eq!(choose(1, Device::Cpu), Backend::Solo);
        assert_eq!(choose(4, Device::Cuda), Backend::Nccl);
        assert_eq!(choose(4, Device::Cpu), Backend::Tcp);
    }
}
