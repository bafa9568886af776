//! Ulysses layout switches on the device: the CPU's
//! [`SequenceParallel::to_heads`] and [`SequenceParallel::to_tokens`] over
//! device buffers, so a sequence-parallel rank's attention runs on its GPU.
//!
//! The packings are the CPU's own ([`HeadSplit::piece_orders`]: the pure
//! packing functions applied to piece indices), done as row gathers of one
//! piece (`heads / sp · head_dim` values) each; the all-to-all of equal
//! chunks goes device to device when the group is an NCCL communicator
//! (its stream waits for an event recorded once the packed rows are
//! written), through host memory otherwise (TCP: ranks sharing a GPU). Data
//! movement only, so the device's results are the CPU's bit for bit. A
//! failed exchange is recorded in the [`SequenceParallel`] and leaves zeros,
//! as on the CPU; the trainer takes it after the step.

use moe_kernels::cudarc::driver::CudaSlice;

use super::serve_ep::{gather, nccl_all_to_all};
use super::{Gpu, Result};
use crate::dist::sequence_parallel::{HeadSplit, SequenceParallel};

/// Sequence-sharded `[B, L, heads, d]` (this rank's tokens) to head-sharded
/// `[B, seq_len, heads/sp, d]` (this rank's heads), as
/// [`SequenceParallel::to_heads`].
pub fn to_heads(
    gpu: &Gpu,
    sp: &SequenceParallel,
    x: &CudaSlice<f32>,
    heads: usize,
    head_dim: usize,
) -> Result<CudaSlice<f32>> {
    let split = sp.split(x.len(), heads, head_dim);
    let [pack, unpack, _, _] = split.piece_orders();
    switch(gpu, sp, &split, x, &pack, &unpack)
}

/// The inverse of [`to_heads`], as [`SequenceParallel::to_tokens`].
pub fn to_tokens(
    gpu: &Gpu,
    sp: &SequenceParallel,
    y: &CudaSlice<f32>,
    heads: usize,
    head_dim: usize,
) -> Result<CudaSlice<f32>> {
    let split = sp.split(y.len(), heads, head_dim);
    let [_, _, pack, unpack] = split.piece_orders();
    switch(gpu, sp, &split, y, &pack, &unpack)
}

/// Pack (a gather), exchange one chunk with every rank, unpack (a gather).
fn switch(
    gpu: &Gpu,
    sp: &SequenceParallel,
    split: &HeadSplit,
    x: &CudaSlice<f32>,
    pack: &[usize],
    unpack: &[usize],
) -> Result<CudaSlice<f32>> {
    if x.is_empty() {
        return Ok(gpu.stream().clone_dtod(x)?);
    }
    let piece = split.piece();
    let packed = gather(gpu, x, pack, piece)?;
    let received = exchange(gpu, sp, packed, split.chunk())?;
    gather(gpu, &received, unpack, piece)
}

/// An all-to-all of `chunk` values to and from every rank of `sp`'s group.
/// Zeros after a failure (recorded; later exchanges are skipped).
fn exchange(
    gpu: &Gpu,
    sp: &SequenceParallel,
    send: CudaSlice<f32>,
    chunk: usize,
) -> Result<CudaSlice<f32>> {
    let size = sp.size();
    if size == 1 {
        return Ok(send);
    }
    if sp.failed() {
        return gpu.zeros::<f32>(send.len());
    }
    sp.count_sent(chunk);
    let counts = vec![chunk; size];
    let nccl = sp.with_group(|g| g.as_nccl().is_some());
    if !nccl {
        let host = gpu.download(&send)?;
        let mut recv = vec![0f32; host.len()];
        if let Err(e) = sp.with_group(|g| g.all_to_all(&host, &counts, &mut recv, &counts)) {
            sp.record(e);
            recv.fill(0.0);
        }
        return gpu.upload(&recv);
    }
    // The receive buffer exists before the event NCCL's stream waits for.
    let mut recv = gpu.zeros::<f32>(send.len())?;
    let ready = gpu.stream().record_event(None)?;
    let result = sp.with_group(|group| {
        let send = send.slice(..);
        let mut into = recv.slice_mut(..);
        let op = "sequence exchange";
        nccl_all_to_all(group, op, &ready, &send, &counts, &mut into, &counts)
    });
    if let Err(e) = result {
        sp.record(e);
        gpu.stream().memset_zeros(&mut recv)?;
    }
    Ok(recv)
}
