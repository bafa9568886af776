//! SwiGLU's gate on the device; CPU reference: [`crate::ops::swiglu`].

use super::{Gpu, Result, elementwise};
use moe_kernels::cudarc::driver::{CudaSlice, PushKernelArg};
use moe_kernels::registry::SWIGLU;

/// As [`crate::ops::swiglu::forward`]: `h = silu(a) * b`.
pub fn forward(
    gpu: &Gpu,
    h: &mut CudaSlice<f32>,
    a: &CudaSlice<f32>,
    b: &CudaSlice<f32>,
) -> Result<()> {
    let n = a.len();
    assert!(b.len() == n && h.len() == n, "swiglu shapes");
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(&SWIGLU, "swiglu_forward_f32")?;
    let mut launch = gpu.stream().launch_builder(&f);
    launch.arg(h).arg(a).arg(b).arg(&n);
    unsafe { launch.launch(elementwise(n)) }?;
    Ok(())
}

/// As [`crate::ops::swiglu::backward`]: adds into `da` and `db`, or with
/// `accumulate` false writes what it would add into zeros (the same values,
/// so callers skip the memset of buffers they would only zero for it).
pub fn backward(
    gpu: &Gpu,
    da: &mut CudaSlice<f32>,
    db: &mut CudaSlice<f32>,
    dh: &CudaSlice<f32>,
    a: &CudaSlice<f32>,
    b: &CudaSlice<f32>,
    accumulate: bool,
) -> Result<()> {
    let n = a.len();
    assert!(
        b.len() == n && dh.len() == n && da.len() == n && db.len() == n,
        "swiglu gradient shapes"
    );
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(&SWIGLU, "swiglu_backward_f32")?;
    let mut launch = gpu.stream().launch_builder(&f);
    let accumulate = i32::from(accumulate);
    launch
        .arg(da)
        .arg(db)
        .arg(dh)
        .arg(a)
        .arg(b)
        .arg(&n)
        .arg(&accumulate);
    unsafe { launch.launch(elementwise(n)) }?;
    Ok(())
}
