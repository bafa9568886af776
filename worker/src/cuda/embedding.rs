//! Token embedding on the device; CPU reference: [`crate::ops::embedding`].

use super::{Gpu, Result, grid, int};
use moe_kernels::cudarc::driver::{CudaSlice, PushKernelArg};
use moe_kernels::registry::EMBEDDING;

/// As [`crate::ops::embedding::forward`].
pub fn forward(
    gpu: &Gpu,
    out: &mut CudaSlice<f32>,
    tokens: &CudaSlice<u32>,
    table: &CudaSlice<f32>,
    dim: usize,
) -> Result<()> {
    assert!(
        dim > 0 && table.len().is_multiple_of(dim) && out.len() == tokens.len() * dim,
        "embedding shapes"
    );
    if tokens.is_empty() {
        return Ok(());
    }
    let f = gpu.function(&EMBEDDING, "embedding_forward_f32")?;
    let (n_i, dim_i) = (int(tokens.len()), int(dim));
    let mut launch = gpu.stream().launch_builder(&f);
    launch.arg(out).arg(tokens).arg(table).arg(&n_i).arg(&dim_i);
    unsafe { launch.launch(grid(tokens.len(), 128, 0)) }?;
    Ok(())
}

/// As [`crate::ops::embedding::backward`]: adds into `dtable`, repeated
/// tokens in token order.
pub fn backward(
    gpu: &Gpu,
    dtable: &mut CudaSlice<f32>,
    dout: &CudaSlice<f32>,
    tokens: &CudaSlice<u32>,
    dim: usize,
) -> Result<()> {
    assert!(
        dim > 0 && dtable.len().is_multiple_of(dim) && dout.len() == tokens.len() * dim,
        "embedding gradient shapes"
    );
    if tokens.is_empty() {
        return Ok(());
    }
    let f = gpu.function(&EMBEDDING, "embedding_backward_f32")?;
    let (n_i, dim_i) = (int(tokens.len()), int(dim));
    let mut launch = gpu.stream().launch_builder(&f);
    launch
        .arg(dtable)
        .arg(dout)
        .arg(tokens)
        .arg(&n_i)
        .arg(&dim_i);
    unsafe { launch.launch(grid(dim.div_ceil(128), 128, 0)) }?;
    Ok(())
}
