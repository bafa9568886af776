//! Data parallelism for the device trainer: after each rank's micro-batches,
//! every gradient tensor becomes its mean over the data-parallel ranks, so
//! identical updates keep identical weights. CPU reference:
//! [`crate::dist::data_parallel::all_reduce_mean`], whose division this
//! repeats (`sum / ranks`, not a multiplication by the reciprocal).
//!
//! Over NCCL the tensors are reduced where they are, on the device. Over
//! any other backend (TCP: ranks that share a GPU, as the one-GPU check
//! runs them, or hosts without NCCL) they go through host memory and the
//! CPU trainer's bucketed all-reduce.

use moe_kernels::cudarc::driver::CudaSlice;

use super::{Gpu, GpuError, vector};
use crate::dist::data_parallel::{self, BUCKET_FLOATS};
use crate::dist::expert_parallel::{self, ExpertParallel};
use crate::dist::nccl::NcclCollective;
use crate::dist::nccl::collective::{InFlight, Reduce};
use crate::dist::{Collective, DistError};

/// Why a data-parallel step or reduction failed: the device, or the collective (whose error says
/// whether another rank failed first).
#[derive(Debug, thiserror::Error)]
pub enum ParallelError {
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    Dist(#[from] DistError),
}

impl From<moe_kernels::cudarc::driver::DriverError> for ParallelError {
    fn from(error: moe_kernels::cudarc::driver::DriverError) -> Self {
        Self::Gpu(error.into())
    }
}

/// Replaces each of `tensors` by its mean over the ranks of `world`; every
/// rank passes tensors of the same lengths in the same order.
pub fn all_reduce_mean(
    gpu: &Gpu,
    world: &mut dyn Collective,
    tensors: &mut [&mut CudaSlice<f32>],
) -> Result<(), ParallelError> {
    let ranks = world.size();
    if ranks == 1 {
        return Ok(());
    }
    if let Some(nccl) = world.as_nccl() {
        return mean_over_nccl(gpu, nccl, tensors);
    }
    let mut host = tensors
        .iter()
        .map(|t| gpu.download(t))
        .collect::<Result<Vec<_>, _>>()?;
    data_parallel::all_reduce_mean(
        world,
        &mut host.iter_mut().collect::<Vec<_>>(),
        BUCKET_FLOATS,
    )?;
    for (tensor, values) in tensors.iter_mut().zip(&host) {
        gpu.stream().memcpy_htod(values, *tensor)?;
    }
    Ok(())
}

/// The gradients of an expert-parallel step, reduced as the CPU trainer
/// reduces them ([`expert_parallel::reduce_gradients`]): the replicated
/// tensors averaged over `world`, this rank's routed-expert tensors (flagged
/// by `is_expert`, in `tensors`' order) summed over their replicas and
/// divided by the world size. Returns the squared global norm: the
/// replicated tensors once, each expert slice once per expert-parallel
/// group (summed over it). Over NCCL the tensors are reduced where they
/// are (one group of all-reduces per communicator, one after the other);
/// over any other backend through host memory.
pub fn reduce_expert_parallel(
    gpu: &Gpu,
    world: &mut dyn Collective,
    ep: &ExpertParallel,
    tensors: &mut [&mut CudaSlice<f32>],
    is_expert: &[bool],
) -> Result<f64, ParallelError> {
    assert_eq!(tensors.len(), is_expert.len(), "a flag per gradient tensor");
    let world_size = world.size();
    let replicas_on_device = ep.with_replicas(|r| r.size() == 1 || r.as_nccl().is_some());
    if let Some(nccl) = world.as_nccl().filter(|_| replicas_on_device) {
        let (mut replicated, mut experts): (Vec<_>, Vec<_>) = (Vec::new(), Vec::new());
        for (tensor, &expert) in tensors.iter_mut().zip(is_expert) {
            if expert {
                experts.push(&mut **tensor);
            } else {
                replicated.push(&mut **tensor);
            }
        }
        // NCCL runs on its own stream: the backward pass that wrote the
        // gradients must be done first; each call returns once its sums are.
        gpu.synchronize()?;
        nccl.all_reduce_device_many(&mut replicated, Reduce::Sum)?;
        ep.with_replicas(|r| match r.as_nccl() {
            Some(replicas) => replicas.all_reduce_device_many(&mut experts, Reduce::Sum),
            None => Ok(()),
        })?;
        for tensor in replicated.iter_mut().chain(experts.iter_mut()) {
            vector::divide(gpu, tensor, world_size as f32)?;
        }
        let owned = vector::sum_squares(gpu, &shared(&experts))?;
        let owned = ep.with_group(|g| data_parallel::sum(g, owned))?;
        return Ok(vector::sum_squares(gpu, &shared(&replicated))? + owned);
    }
    let mut host = tensors
        .iter()
        .map(|t| gpu.download(t))
        .collect::<Result<Vec<_>, _>>()?;
    let (mut replicated, mut experts) = (Vec::new(), Vec::new());
    for (values, &expert) in host.iter_mut().zip(is_expert) {
        if expert {
            experts.push(values.as_mut_slice());
        } else {
            replicated.push(values.as_mut_slice());
        }
    }
    expert_parallel::reduce_gradients(world, ep, &mut replicated, &mut experts, BUCKET_FLOATS)?;
    let squares = |list: &[&mut [f32]]| -> f64 {
        list.iter()
            .flat_map(|t| t.iter())
            .map(|&v| f64::from(v) * f64::from(v))
            .sum()
    };
    let owned = ep.with_group(|g| data_parallel::sum(g, squares(&experts)))?;
    let norm_squared = squares(&replicated) + owned;
    for (tensor, values) in tensors.iter_mut().zip(&host) {
        gpu.stream().memcpy_htod(values, *tensor)?;
    }
    Ok(norm_squared)
}

/// The tensors of `list`, read-only.
fn shared<'a>(list: &'a [&mut CudaSlice<f32>]) -> Vec<&'a CudaSlice<f32>> {
    list.iter().map(|t| &**t).collect()
}

/// The data-parallel mean over NCCL, overlapped with the backward pass
/// (DDP's bucketed reduction): each group of gradient tensors the pass
/// hands over ([`super::model::DeviceModel::backward_handing_over`]) starts
/// summing on NCCL's stream as soon as the compute stream reaches the point
/// where it was handed over (an event), while the pass goes on computing
/// the earlier blocks' gradients; [`Self::finish`] waits for every sum and
/// divides. The same sums and divisions as [`mean_over_nccl`], in groups.
pub(crate) struct OverlappedMean<'a> {
    gpu: &'a Gpu,
    nccl: &'a NcclCollective,
    in_flight: Vec<InFlight<'a>>,
    /// The first failure to start a group; later groups are not started.
    failed: Option<ParallelError>,
}

impl<'a> OverlappedMean<'a> {
    pub fn new(gpu: &'a Gpu, nccl: &'a NcclCollective) -> Self {
        Self {
            gpu,
            nccl,
            in_flight: Vec::new(),
            failed: None,
        }
    }

    /// Starts summing `tensors` once the compute stream has run what is
    /// enqueued on it so far (their last writes).
    pub fn start(&mut self, tensors: Vec<&'a mut CudaSlice<f32>>) {
        if self.failed.is_some() {
            return;
        }
        let started = (|| -> Result<InFlight<'a>, ParallelError> {
            let ready = self.gpu.stream().record_event(None)?;
            self.nccl.stream().wait(&ready)?;
            Ok(self.nccl.start_all_reduce_many(tensors, Reduce::Sum)?)
        })();
        match started {
            Ok(op) => self.in_flight.push(op),
            Err(error) => self.failed = Some(error),
        }
    }

    /// Waits for every sum started and makes each tensor its mean.
    pub fn finish(self) -> Result<(), ParallelError> {
        if let Some(error) = self.failed {
            return Err(error);
        }
        let ranks = self.nccl.size() as f32;
        for op in self.in_flight {
            for tensor in op.finish()? {
                vector::divide(self.gpu, tensor, ranks)?;
            }
        }
        Ok(())
    }
}

/// The NCCL arm of [`all_reduce_mean`], for any group size (the GPU check
/// runs it with a world of one, the only NCCL world one GPU can host).
pub(crate) fn mean_over_nccl(
    gpu: &Gpu,
    nccl: &mut NcclCollective,
    tensors: &mut [&mut CudaSlice<f32>],
) -> Result<(), ParallelError> {
    let ranks = nccl.size() as f32;
    // NCCL runs on its own stream: the backward pass that wrote the
    // gradients must be done first. The collective returns once its
    // stream has finished, so the divisions after it see the sums.
    gpu.synchronize()?;
    // One NCCL group for every tensor: one wait, not one per tensor.
    nccl.all_reduce_device_many(tensors, Reduce::Sum)?;
    for tensor in tensors.iter_mut() {
        vector::divide(gpu, tensor, ranks)?;
    }
    Ok(())
}
