//! RMSNorm on the device; CPU reference: [`crate::ops::rmsnorm`].

use super::{Gpu, Result, grid, int};
use moe_kernels::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use moe_kernels::registry::RMSNORM;

const THREADS: u32 = 256;

/// As [`crate::ops::rmsnorm::forward`]: `out`, `rstd: [rows]` overwritten.
pub fn forward(
    gpu: &Gpu,
    out: &mut CudaSlice<f32>,
    rstd: &mut CudaSlice<f32>,
    x: &CudaSlice<f32>,
    weight: &CudaSlice<f32>,
    eps: f32,
) -> Result<()> {
    let dim = weight.len();
    let rows = x.len() / dim;
    assert!(
        x.len() == rows * dim && out.len() == x.len() && rstd.len() == rows,
        "rmsnorm shapes"
    );
    if rows == 0 {
        return Ok(());
    }
    let f = gpu.function(&RMSNORM, "rmsnorm_forward_f32")?;
    let (rows_i, dim_i) = (int(rows), int(dim));
    let mut launch = gpu.stream().launch_builder(&f);
    launch
        .arg(out)
        .arg(rstd)
        .arg(x)
        .arg(weight)
        .arg(&rows_i)
        .arg(&dim_i)
        .arg(&eps);
    unsafe { launch.launch(grid(rows, THREADS, 0)) }?;
    Ok(())
}

/// As [`crate::ops::rmsnorm::backward`]: adds into `dx` and `dweight`.
pub fn backward(
    gpu: &Gpu,
    dx: &mut CudaSlice<f32>,
    dweight: &mut CudaSlice<f32>,
    dout: &CudaSlice<f32>,
    x: &CudaSlice<f32>,
    weight: &CudaSlice<f32>,
    rstd: &CudaSlice<f32>,
) -> Result<()> {
    let dim = weight.len();
    let rows = rstd.len();
    assert!(
        x.len() == rows * dim
            && dx.len() == x.len()
            && dout.len() == x.len()
            && dweight.len() == dim,
        "rmsnorm gradient shapes"
    );
    if rows == 0 {
        return Ok(());
    }
    let (rows_i, dim_i) = (int(rows), int(dim));
    let input = gpu.function(&RMSNORM, "rmsnorm_backward_input_f32")?;
    let mut launch = gpu.stream().launch_builder(&input);
    launch
        .arg(dx)
        .arg(dout)
        .arg(x)
        .arg(weight)
        .arg(rstd)
        .arg(&rows_i)
        .arg(&dim_i);
    unsafe { launch.launch(grid(rows, THREADS, 0)) }?;
    // Chunks of 128 rows: at 16k tokens, 128 chunks x the columns' blocks
    // fill the GPU; the final pass adds 128 partials per column.
    let rows_per_chunk = 128;
    let chunks = rows.div_ceil(rows_per_chunk);
    let mut partials = gpu.output::<f32>(chunks * dim)?;
    let partial = gpu.function(&RMSNORM, "rmsnorm_backward_weight_partial_f32")?;
    let (chunk_rows_i, chunks_i) = (int(rows_per_chunk), int(chunks));
    let mut launch = gpu.stream().launch_builder(&partial);
    launch
        .arg(&mut partials)
        .arg(dout)
        .arg(x)
        .arg(rstd)
        .arg(&rows_i)
        .arg(&dim_i)
        .arg(&chunk_rows_i);
    let config = LaunchConfig {
        grid_dim: (dim.div_ceil(128) as u32, chunks as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { launch.launch(config) }?;
    let total = gpu.function(&RMSNORM, "rmsnorm_backward_weight_f32")?;
    let mut launch = gpu.stream().launch_builder(&total);
    launch
        .arg(dweight)
        .arg(&partials)
        .arg(&chunks_i)
        .arg(&dim_i);
    unsafe { launch.launch(grid(dim.div_ceil(128), 128, 0)) }?;
    Ok(())
}
