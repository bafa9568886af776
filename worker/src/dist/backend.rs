//! Which [`Collective`](super::Collective) a rank builds (pure): a world
//! of one needs none ([`Solo`](super::Solo)); ranks that train on the GPU
//! talk over NCCL; CPU ranks over TCP. [`BACKEND`] can ask GPU ranks for
//! TCP (their tensors then go through host memory): ranks sharing one GPU,
//! which NCCL refuses, or GPUs whose NCCL cannot run.

use moe_crds::Device;

/// Optional: `tcp` or `nccl`, the backend of a world of several ranks in
/// place of the device's (`nccl` on CPU ranks is refused: NCCL needs GPUs).
pub const BACKEND: &str = "MOE_COLLECTIVE_BACKEND";

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

/// [`choose`], unless `requested` (the value of [`BACKEND`]) names another
/// backend for a world of several ranks.
pub fn choose_with(
    world_size: usize,
    device: Device,
    requested: Option<&str>,
) -> Result<Backend, String> {
    let chosen = choose(world_size, device);
    match (chosen, requested.map(str::trim)) {
        (Backend::Solo, _) | (_, None | Some("")) => Ok(chosen),
        (_, Some("tcp")) => Ok(Backend::Tcp),
        (_, Some("nccl")) if device == Device::Cuda => Ok(Backend::Nccl),
        (_, Some("nccl")) => Err(format!(
            "{BACKEND} is nccl, but this job runs on the CPU (device: cpu); NCCL needs GPUs"
        )),
        (_, Some(other)) => Err(format!(
            "{BACKEND} is {other:?}; use tcp or nccl (or leave it unset)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backend_can_be_asked_for_by_name() {
        assert_eq!(choose_with(4, Device::Cuda, None), Ok(Backend::Nccl));
        assert_eq!(choose_with(4, Device::Cuda, Some("tcp")), Ok(Backend::Tcp));
        assert_eq!(
            choose_with(4, Device::Cuda, Some("nccl")),
            Ok(Backend::Nccl)
        );
        assert_eq!(choose_with(4, Device::Cpu, Some("tcp")), Ok(Backend::Tcp));
        assert_eq!(choose_with(1, Device::Cuda, Some("tcp")), Ok(Backend::Solo));
        assert_eq!(choose_with(2, Device::Cpu, Some("")), Ok(Backend::Tcp));
        assert!(
            choose_with(2, Device::Cpu, Some("nccl"))
                .unwrap_err()
                .contains("NCCL needs GPUs")
        );
        assert!(
            choose_with(2, Device::Cuda, Some("gloo"))
                .unwrap_err()
                .contains("\"gloo\"")
        );
    }

    #[test]
    fn one_rank_needs_no_backend_gpus_use_nccl_cpus_tcp() {
        assert_eq!(choose(1, Device::Cuda), Backend::Solo);
        assert_eq!(choose(1, Device::Cpu), Backend::Solo);
        assert_eq!(choose(4, Device::Cuda), Backend::Nccl);
        assert_eq!(choose(4, Device::Cpu), Backend::Tcp);
    }
}
