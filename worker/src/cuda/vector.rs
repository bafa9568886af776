//! Whole-buffer helpers of the device training step (kernels/cuda/vector.cu).

use super::{Gpu, Result, elementwise, grid};
use moe_kernels::cudarc::driver::{CudaSlice, PushKernelArg};
use moe_kernels::registry::VECTOR;

/// Threads per block of `sum_squares_f32` (its shared scratch is this wide).
const SUM_THREADS: usize = 256;
/// At most this many partial sums per tensor.
const MAX_SUM_BLOCKS: usize = 1024;

/// `out += a`, elementwise.
pub fn add(gpu: &Gpu, out: &mut CudaSlice<f32>, a: &CudaSlice<f32>) -> Result<()> {
    let n = out.len();
    assert_eq!(a.len(), n, "add shapes");
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(&VECTOR, "add_f32")?;
    let mut launch = gpu.stream().launch_builder(&f);
    launch.arg(out).arg(a).arg(&n);
    unsafe { launch.launch(elementwise(n)) }?;
    Ok(())
}

/// The sum of squares of every value of every tensor, accumulated in f64 in
/// a fixed order (the same bits every run): one partial per block, the
/// partials added on the host. One read-back for all the tensors.
pub fn sum_squares(gpu: &Gpu, tensors: &[&CudaSlice<f32>]) -> Result<f64> {
    let blocks: Vec<usize> = tensors
        .iter()
        .map(|t| t.len().div_ceil(SUM_THREADS).clamp(1, MAX_SUM_BLOCKS))
        .collect();
    let mut partials = gpu.zeros::<f64>(blocks.iter().sum::<usize>().max(1))?;
    let f = gpu.function(&VECTOR, "sum_squares_f32")?;
    let mut at = 0;
    for (tensor, &count) in tensors.iter().zip(&blocks) {
        let n = tensor.len();
        if n > 0 {
            let mut out = partials.slice_mut(at..at + count);
            let mut launch = gpu.stream().launch_builder(&f);
            launch.arg(&mut out).arg(*tensor).arg(&n);
            unsafe { launch.launch(grid(count, SUM_THREADS as u32, 0)) }?;
        }
        at += count;
    }
    Ok(gpu.download(&partials)?.iter().sum())
}
