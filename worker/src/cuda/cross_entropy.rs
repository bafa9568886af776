//! Softmax cross-entropy on the device; CPU reference: [`crate::ops::cross_entropy`].

use super::{Gpu, Result, grid, int};
use moe_kernels::cudarc::driver::{CudaSlice, PushKernelArg};
use moe_kernels::registry::CROSS_ENTROPY;

const THREADS: u32 = 512;

/// As [`crate::ops::cross_entropy::forward`].
pub fn forward(
    gpu: &Gpu,
    losses: &mut CudaSlice<f32>,
    probs: &mut CudaSlice<f32>,
    logits: &CudaSlice<f32>,
    targets: &CudaSlice<u32>,
    vocab: usize,
) -> Result<()> {
    let rows = targets.len();
    assert!(
        losses.len() == rows && logits.len() == rows * vocab && probs.len() == logits.len(),
        "cross-entropy shapes"
    );
    if rows == 0 {
        return Ok(());
    }
    let f = gpu.function(&CROSS_ENTROPY, "cross_entropy_forward_f32")?;
    let (rows_i, vocab_i) = (int(rows), int(vocab));
    let mut launch = gpu.stream().launch_builder(&f);
    launch
        .arg(losses)
        .arg(probs)
        .arg(logits)
        .arg(targets)
        .arg(&rows_i)
        .arg(&vocab_i);
    unsafe { launch.launch(grid(rows, THREADS, 0)) }?;
    Ok(())
}

/// As [`crate::ops::cross_entropy::backward`]: adds into `dlogits`, or with
/// `accumulate` false writes what it would add into zeros (no memset of the
/// `[rows, vocab]` gradient first).
pub fn backward(
    gpu: &Gpu,
    dlogits: &mut CudaSlice<f32>,
    dlosses: &CudaSlice<f32>,
    probs: &CudaSlice<f32>,
    targets: &CudaSlice<u32>,
    vocab: usize,
    accumulate: bool,
) -> Result<()> {
    let rows = targets.len();
    assert!(
        dlosses.len() == rows && probs.len() == rows * vocab && dlogits.len() == probs.len(),
        "cross-entropy gradient shapes"
    );
    if rows == 0 {
        return Ok(());
    }
    let f = gpu.function(&CROSS_ENTROPY, "cross_entropy_backward_f32")?;
    let (rows_i, vocab_i) = (int(rows), int(vocab));
    let accumulate = i32::from(accumulate);
    let mut launch = gpu.stream().launch_builder(&f);
    launch
        .arg(dlogits)
        .arg(dlosses)
        .arg(probs)
        .arg(targets)
        .arg(&rows_i)
        .arg(&vocab_i)
        .arg(&accumulate);
    unsafe { launch.launch(grid(rows, THREADS, 0)) }?;
    Ok(())
}
