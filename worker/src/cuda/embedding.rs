//! Token embedding on the device; CPU reference: [`crate::ops::embedding`].

use super::{Gpu, Result, grid, int};
use crate::ops::embedding::TokenGroups;
use moe_kernels::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use moe_kernels::registry::EMBEDDING;

/// Columns per block of the backward kernel (one thread each).
const COLUMNS: u32 = 128;

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

/// As [`crate::ops::embedding::backward`]: adds into `dtable`, each row's
/// repeated tokens in token order, so the result has the CPU's bits.
///
/// Takes the tokens on the host: they are grouped by id here
/// ([`TokenGroups`], a stable sort of a step's tokens, well under a
/// millisecond at 16k) and uploaded, so the kernel can give each distinct id
/// its own threads without a device sort or float atomics.
pub fn backward(
    gpu: &Gpu,
    dtable: &mut CudaSlice<f32>,
    dout: &CudaSlice<f32>,
    tokens: &[u32],
    dim: usize,
) -> Result<()> {
    assert!(
        dim > 0 && dtable.len().is_multiple_of(dim) && dout.len() == tokens.len() * dim,
        "embedding gradient shapes"
    );
    let vocab = dtable.len() / dim;
    assert!(
        tokens.iter().all(|&t| (t as usize) < vocab),
        "token id beyond the embedding table"
    );
    if tokens.is_empty() {
        return Ok(());
    }
    let groups = TokenGroups::new(tokens);
    let column_blocks = u32::try_from(dim.div_ceil(COLUMNS as usize))
        .ok()
        .filter(|&blocks| blocks <= 65_535)
        .expect("embedding width beyond the grid's y limit");
    let (order, starts, ids) = (
        gpu.upload(&groups.order)?,
        gpu.upload(&groups.starts)?,
        gpu.upload(&groups.ids)?,
    );
    let f = gpu.function(&EMBEDDING, "embedding_backward_f32")?;
    let dim_i = int(dim);
    let mut launch = gpu.stream().launch_builder(&f);
    launch
        .arg(dtable)
        .arg(dout)
        .arg(&order)
        .arg(&starts)
        .arg(&ids)
        .arg(&dim_i);
    let config = LaunchConfig {
        grid_dim: (
            u32::try_from(groups.len()).expect("grid too large"),
            column_blocks,
            1,
        ),
        block_dim: (COLUMNS, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { launch.launch(config) }?;
    Ok(())
}
