//! Causal grouped-query attention on the device; CPU reference:
//! [`crate::ops::attention`], with the same `probs` layout kept for the
//! backward pass.

use super::{Gpu, Result, grid, int};
use crate::ops::attention::AttentionShape;
use moe_kernels::cudarc::driver::{CudaSlice, PushKernelArg};
use moe_kernels::registry::ATTENTION;

/// Query (or key) rows per block: one warp each.
const WARPS: usize = 8;

fn sequences(shape: AttentionShape, q_len: usize) -> usize {
    let width = shape.seq_len * shape.n_heads * shape.head_dim;
    assert!(
        width > 0 && q_len.is_multiple_of(width) && shape.n_heads.is_multiple_of(shape.n_kv_heads),
        "attention shape {shape:?} for {q_len} query values"
    );
    q_len / width
}

/// As [`crate::ops::attention::forward`]: `out` and `probs` overwritten.
pub fn forward(
    gpu: &Gpu,
    out: &mut CudaSlice<f32>,
    probs: &mut CudaSlice<f32>,
    q: &CudaSlice<f32>,
    k: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    shape: AttentionShape,
) -> Result<()> {
    let b = sequences(shape, q.len());
    let kv_len = b * shape.seq_len * shape.n_kv_heads * shape.head_dim;
    assert!(
        k.len() == kv_len
            && v.len() == kv_len
            && out.len() == q.len()
            && probs.len() == shape.probs_len(b * shape.seq_len),
        "attention shapes"
    );
    let rows = b * shape.n_heads * shape.seq_len;
    if rows == 0 {
        return Ok(());
    }
    let f = gpu.function(&ATTENTION, "attention_forward_f32")?;
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    let (b_i, t_i, h_i, kv_i, d_i) = dims(shape, b);
    let mut launch = gpu.stream().launch_builder(&f);
    launch
        .arg(out)
        .arg(probs)
        .arg(q)
        .arg(k)
        .arg(v)
        .arg(&b_i)
        .arg(&t_i)
        .arg(&h_i)
        .arg(&kv_i)
        .arg(&d_i)
        .arg(&scale);
    unsafe { launch.launch(grid(rows.div_ceil(WARPS), (WARPS * 32) as u32, 0)) }?;
    Ok(())
}

/// Gradients of the attention inputs.
pub struct AttentionGrads<'a> {
    pub q: &'a mut CudaSlice<f32>,
    pub k: &'a mut CudaSlice<f32>,
    pub v: &'a mut CudaSlice<f32>,
}

/// As [`crate::ops::attention::backward`]: adds into `grads`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    gpu: &Gpu,
    grads: AttentionGrads<'_>,
    dout: &CudaSlice<f32>,
    q: &CudaSlice<f32>,
    k: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    probs: &CudaSlice<f32>,
    shape: AttentionShape,
) -> Result<()> {
    let b = sequences(shape, q.len());
    assert!(
        dout.len() == q.len()
            && grads.q.len() == q.len()
            && grads.k.len() == k.len()
            && grads.v.len() == v.len()
            && probs.len() == shape.probs_len(b * shape.seq_len),
        "attention gradient shapes"
    );
    let rows = b * shape.n_heads * shape.seq_len;
    if rows == 0 {
        return Ok(());
    }
    let mut dscores = gpu.zeros::<f32>(probs.len())?;
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    let (b_i, t_i, h_i, kv_i, d_i) = dims(shape, b);
    let query = gpu.function(&ATTENTION, "attention_backward_query_f32")?;
    let mut launch = gpu.stream().launch_builder(&query);
    launch
        .arg(grads.q)
        .arg(&mut dscores)
        .arg(dout)
        .arg(q)
        .arg(k)
        .arg(v)
        .arg(probs)
        .arg(&b_i)
        .arg(&t_i)
        .arg(&h_i)
        .arg(&kv_i)
        .arg(&d_i)
        .arg(&scale);
    unsafe { launch.launch(grid(rows.div_ceil(WARPS), (WARPS * 32) as u32, 0)) }?;
    let kv_rows = b * shape.n_kv_heads * shape.seq_len;
    let key_value = gpu.function(&ATTENTION, "attention_backward_key_value_f32")?;
    let mut launch = gpu.stream().launch_builder(&key_value);
    launch
        .arg(grads.k)
        .arg(grads.v)
        .arg(dout)
        .arg(q)
        .arg(probs)
        .arg(&dscores)
        .arg(&b_i)
        .arg(&t_i)
        .arg(&h_i)
        .arg(&kv_i)
        .arg(&d_i);
    unsafe { launch.launch(grid(kv_rows.div_ceil(WARPS), (WARPS * 32) as u32, 0)) }?;
    Ok(())
}

fn dims(shape: AttentionShape, sequences: usize) -> (i32, i32, i32, i32, i32) {
    (
        int(sequences),
        int(shape.seq_len),
        int(shape.n_heads),
        int(shape.n_kv_heads),
        int(shape.head_dim),
    )
}
