//! AdamW on the device; CPU reference: [`AdamWStep::apply`], whose operations
//! the kernel repeats in the same order with explicit rounding, so the two
//! agree bit for bit.

use super::{Gpu, Result, elementwise};
use crate::train::optimizer::AdamWStep;
use moe_kernels::cudarc::driver::{CudaSlice, PushKernelArg};
use moe_kernels::registry::ADAMW;

/// Updates `weights` and both moments in place from `grads`.
pub fn apply(
    gpu: &Gpu,
    step: &AdamWStep,
    weights: &mut CudaSlice<f32>,
    m: &mut CudaSlice<f32>,
    v: &mut CudaSlice<f32>,
    grads: &CudaSlice<f32>,
) -> Result<()> {
    let n = weights.len();
    assert!(
        m.len() == n && v.len() == n && grads.len() == n,
        "AdamW tensor shapes"
    );
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(&ADAMW, "adamw_f32")?;
    let mut launch = gpu.stream().launch_builder(&f);
    launch
        .arg(weights)
        .arg(m)
        .arg(v)
        .arg(grads)
        .arg(&n)
        .arg(&step.lr)
        .arg(&step.beta1)
        .arg(&step.beta2)
        .arg(&step.epsilon)
        .arg(&step.decay_factor)
        .arg(&step.correction1)
        .arg(&step.correction2)
        .arg(&step.grad_scale);
    unsafe { launch.launch(elementwise(n)) }?;
    Ok(())
}
