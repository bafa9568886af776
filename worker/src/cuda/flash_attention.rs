//! Causal grouped-query attention without the probabilities
//! (FlashAttention-2, kernels in `kernels/cuda/flash_attention.cu`): the
//! same result as [`crate::ops::attention`] and [`super::attention`], but
//! the forward pass keeps only `lse [sequences, n_heads, T]` (each row's
//! log-sum-exp of the scaled scores) instead of `probs [sequences, n_heads,
//! T, T]`, and the backward pass recomputes the probabilities tile by tile
//! from it. At 16 sequences of 1024 tokens and 16 heads that is 1 MiB per
//! layer instead of 1 GiB, and no pass writes or reads a `[T, T]` matrix.
//!
//! The products run on tensor cores (wmma TF32 fragments), so results
//! match [`super::attention::forward`]'s TF32 rounding, not the exact
//! kernels'. Any `head_dim` up to [`MAX_HEAD_DIM`] works; larger heads are
//! refused by [`supports`] and the caller keeps the GEMM path.

use super::attention::{AttentionGrads, document_starts};
use super::{Gpu, GpuError, Result, grid, int};
use crate::ops::attention::AttentionShape;
use moe_kernels::cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use moe_kernels::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use moe_kernels::registry::FLASH_ATTENTION;

/// The largest head the kernels take: their output fragments in registers
/// are sized for it (`FA_MAX_DIM`; 232–238 registers a thread in the
/// forward kernel at that size already).
pub const MAX_HEAD_DIM: usize = 128;

/// Threads per block in every tiled kernel (four warps; the kernels'
/// `FA_THREADS`).
const THREADS: u32 = 128;
/// Query rows per forward block and keys per forward tile (`FA_FWD_Q`,
/// `FA_FWD_K`).
const FORWARD_ROWS: usize = 64;
const FORWARD_KEYS: usize = 32;
/// Query rows and keys per backward tile (`FA_BWD`).
const BACKWARD_TILE: usize = 32;
/// Padding floats per staged row (`FA_PAD`).
const PAD: usize = 8;
/// Rows per block of the D-term kernel (one warp each).
const DELTA_WARPS: usize = 8;

/// Whether the flash kernels take `shape` (the head fits their tiles).
pub fn supports(shape: AttentionShape) -> bool {
    shape.head_dim > 0 && shape.head_dim <= MAX_HEAD_DIM
}

/// A staged row's stride in floats: `head_dim` padded to 16 (the wmma
/// tile), plus [`PAD`] (the kernels' `ld`).
fn row_stride(head_dim: usize) -> usize {
    head_dim.div_ceil(16) * 16 + PAD
}

/// Dynamic shared memory of each kernel, in bytes, as the kernels lay it
/// out (see their `fa_smem` carving).
fn forward_shared_bytes(head_dim: usize) -> usize {
    let ld = row_stride(head_dim);
    // qs [64][ld]; ks, vs [32][ld]; ss [64][32 + 8]; a factor per row [64].
    4 * ((FORWARD_ROWS + 2 * FORWARD_KEYS) * ld
        + FORWARD_ROWS * (FORWARD_KEYS + PAD)
        + FORWARD_ROWS)
}

/// The key/value and the query kernel alike (the outputs live in
/// registers): four `[32][ld]` tiles (k, v, q, dout), the scores and their
/// gradient `[32][32 + 8]`, lse and D `[32]`.
fn backward_shared_bytes(head_dim: usize) -> usize {
    let ld = row_stride(head_dim);
    4 * (4 * BACKWARD_TILE * ld + 2 * BACKWARD_TILE * (BACKWARD_TILE + PAD) + 2 * BACKWARD_TILE)
}

/// The number of sequences in `q`, after checking `shape` against it.
fn sequences(shape: AttentionShape, q_len: usize) -> Result<usize> {
    let b = super::attention::sequences(shape, q_len);
    if !supports(shape) {
        return Err(GpuError::Unsupported(format!(
            "flash attention with head_dim {} (at most {MAX_HEAD_DIM}); use the GEMM path",
            shape.head_dim
        )));
    }
    Ok(b)
}

/// The length of `lse` (and of the backward pass's D term) for `tokens`
/// query tokens: one value per (sequence, head, position).
pub fn lse_len(shape: AttentionShape, tokens: usize) -> usize {
    tokens * shape.n_heads
}

/// A kernel with `bytes` of dynamic shared memory: above the default
/// 48 KiB a block must opt in per function, up to the device's limit.
fn tiled_kernel(
    gpu: &Gpu,
    entry: &str,
    bytes: usize,
) -> Result<moe_kernels::cudarc::driver::CudaFunction> {
    let f = gpu.function(&FLASH_ATTENTION, entry)?;
    let limit = gpu
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
    if bytes > usize::try_from(limit).unwrap_or(0) {
        return Err(GpuError::Unsupported(format!(
            "{entry} needs {bytes} B of shared memory; this device grants a block {limit} B"
        )));
    }
    // Driver calls outside a launch want the context current on this thread
    // (cudarc binds it for launches and allocations, not for attributes).
    gpu.context().bind_to_thread()?;
    f.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        int(bytes),
    )?;
    Ok(f)
}

/// A `(tiles, heads, sequences)` grid of [`THREADS`]-thread blocks.
fn tiled_grid(tiles: usize, heads: usize, sequences: usize, bytes: usize) -> LaunchConfig {
    let dim = |n: usize| u32::try_from(n).expect("grid too large");
    LaunchConfig {
        grid_dim: (dim(tiles), dim(heads), dim(sequences)),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: u32::try_from(bytes).expect("shared memory"),
    }
}

/// As [`crate::ops::attention::forward`], the probabilities not kept:
/// `out [tokens, n_heads, head_dim]` and `lse [sequences, n_heads, T]`
/// overwritten (lse in natural-log units, of `scale · q·k`). `documents`:
/// each token's document start in its sequence (packed sequences), `None`
/// for plain causal attention.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    gpu: &Gpu,
    out: &mut CudaSlice<f32>,
    lse: &mut CudaSlice<f32>,
    q: &CudaSlice<f32>,
    k: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    shape: AttentionShape,
    documents: Option<&CudaSlice<i32>>,
) -> Result<()> {
    let b = sequences(shape, q.len())?;
    let kv_len = b * shape.seq_len * shape.n_kv_heads * shape.head_dim;
    assert!(
        k.len() == kv_len
            && v.len() == kv_len
            && out.len() == q.len()
            && lse.len() == lse_len(shape, b * shape.seq_len),
        "flash attention shapes"
    );
    if b == 0 {
        return Ok(());
    }
    let mut zeros = None;
    let starts = document_starts(gpu, documents, b * shape.seq_len, &mut zeros)?;
    let bytes = forward_shared_bytes(shape.head_dim);
    let f = tiled_kernel(gpu, "flash_attention_forward_f32", bytes)?;
    let (t, h, kv, d, scale) = dims(shape);
    let mut launch = gpu.stream().launch_builder(&f);
    launch
        .arg(out)
        .arg(lse)
        .arg(q)
        .arg(k)
        .arg(v)
        .arg(starts)
        .arg(&t)
        .arg(&h)
        .arg(&kv)
        .arg(&d)
        .arg(&scale);
    let tiles = shape.seq_len.div_ceil(FORWARD_ROWS);
    unsafe { launch.launch(tiled_grid(tiles, shape.n_heads, b, bytes)) }?;
    Ok(())
}

/// As [`crate::ops::attention::backward`] from the forward pass's `out`
/// and `lse` (the probabilities recomputed): adds into `grads`. `out` must
/// be the attention output in `q`'s layout, the D term `rowsum(dout ∘ out)`
/// standing in for `Σ_j p_j dp_j`; `documents` the forward pass's.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    gpu: &Gpu,
    grads: AttentionGrads<'_>,
    dout: &CudaSlice<f32>,
    q: &CudaSlice<f32>,
    k: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    out: &CudaSlice<f32>,
    lse: &CudaSlice<f32>,
    shape: AttentionShape,
    documents: Option<&CudaSlice<i32>>,
) -> Result<()> {
    let b = sequences(shape, q.len())?;
    assert!(
        dout.len() == q.len()
            && out.len() == q.len()
            && grads.q.len() == q.len()
            && grads.k.len() == k.len()
            && grads.v.len() == v.len()
            && k.len() == v.len()
            && k.len() == b * shape.seq_len * shape.n_kv_heads * shape.head_dim
            && lse.len() == lse_len(shape, b * shape.seq_len),
        "flash attention gradient shapes"
    );
    if b == 0 {
        return Ok(());
    }
    let (t, h, kv, d, scale) = dims(shape);

    let rows = lse.len();
    let mut delta = gpu.output::<f32>(rows)?;
    let f = gpu.function(&FLASH_ATTENTION, "flash_attention_backward_delta_f32")?;
    let b_i = int(b);
    let mut launch = gpu.stream().launch_builder(&f);
    launch
        .arg(&mut delta)
        .arg(dout)
        .arg(out)
        .arg(&b_i)
        .arg(&t)
        .arg(&h)
        .arg(&d);
    unsafe {
        launch.launch(grid(
            rows.div_ceil(DELTA_WARPS),
            (DELTA_WARPS * 32) as u32,
            0,
        ))
    }?;

    let mut zeros = None;
    let starts = document_starts(gpu, documents, b * shape.seq_len, &mut zeros)?;
    let tiles = shape.seq_len.div_ceil(BACKWARD_TILE);
    let bytes = backward_shared_bytes(shape.head_dim);
    let f = tiled_kernel(gpu, "flash_attention_backward_key_value_f32", bytes)?;
    let mut launch = gpu.stream().launch_builder(&f);
    launch
        .arg(grads.k)
        .arg(grads.v)
        .arg(dout)
        .arg(q)
        .arg(k)
        .arg(v)
        .arg(lse)
        .arg(&delta)
        .arg(starts)
        .arg(&t)
        .arg(&h)
        .arg(&kv)
        .arg(&d)
        .arg(&scale);
    unsafe { launch.launch(tiled_grid(tiles, shape.n_kv_heads, b, bytes)) }?;

    let f = tiled_kernel(gpu, "flash_attention_backward_query_f32", bytes)?;
    let mut launch = gpu.stream().launch_builder(&f);
    launch
        .arg(grads.q)
        .arg(dout)
        .arg(q)
        .arg(k)
        .arg(v)
        .arg(lse)
        .arg(&delta)
        .arg(starts)
        .arg(&t)
        .arg(&h)
        .arg(&kv)
        .arg(&d)
        .arg(&scale);
    unsafe { launch.launch(tiled_grid(tiles, shape.n_heads, b, bytes)) }?;
    Ok(())
}

fn dims(shape: AttentionShape) -> (i32, i32, i32, i32, f32) {
    (
        int(shape.seq_len),
        int(shape.n_heads),
        int(shape.n_kv_heads),
        int(shape.head_dim),
        1.0 / (shape.head_dim as f32).sqrt(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The launch sizes the kernels' shared memory as they carve it; at the
    /// largest head two blocks of every kernel share an A100's 164 KiB
    /// (167 936 B an SM, 1 KiB of it reserved per block).
    #[test]
    fn two_blocks_share_an_a100_sm_up_to_the_largest_head() {
        // At 128: ld 136; 128 rows of it, 64 (or 2 x 32) rows of 40, 64 floats.
        assert_eq!(forward_shared_bytes(128), 4 * (17_408 + 2_560 + 64));
        assert_eq!(backward_shared_bytes(128), 4 * (17_408 + 2_560 + 64));
        for d in 1..=MAX_HEAD_DIM {
            for bytes in [forward_shared_bytes(d), backward_shared_bytes(d)] {
                assert!(2 * (bytes + 1024) <= 167_936, "head_dim {d}: {bytes} B");
            }
        }
        // Tiny heads pad to one 16-wide tile.
        assert_eq!(row_stride(4), 24);
        assert_eq!(row_stride(16), 24);
        assert_eq!(row_stride(24), 40);
    }
}
