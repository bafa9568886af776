//! The serving engine's paged KV cache kernels (kernels/cuda/paged_attention.cu);
//! CPU references: [`crate::serve::kv_cache::KvStore::write`] and the CPU
//! engine's attention ([`crate::serve::engine`]'s `attend`). The per-step
//! index arrays come from [`crate::serve::device::StepLayout`].

use super::{Gpu, Result, elementwise, int};
use crate::serve::device::{PAGED_ATTENTION_MAX_HEAD_DIM, paged_attention_launch};
use moe_kernels::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use moe_kernels::registry::PAGED_ATTENTION;

/// Stores row `r` of `k` and `v` (`[rows, width]`) as cache row `slots[r]`
/// of one layer's `keys` and `values` pools (`[pool rows, width]`). Exact.
pub fn kv_write(
    gpu: &Gpu,
    keys: &mut CudaSlice<f32>,
    values: &mut CudaSlice<f32>,
    k: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    slots: &CudaSlice<i32>,
) -> Result<()> {
    let rows = slots.len();
    let width = k.len().checked_div(rows).unwrap_or(0);
    assert!(
        k.len() == rows * width && v.len() == k.len() && keys.len() == values.len(),
        "KV write shapes"
    );
    if k.is_empty() {
        return Ok(());
    }
    assert!(keys.len().is_multiple_of(width), "KV pool rows");
    let f = gpu.function(&PAGED_ATTENTION, "kv_write_f32")?;
    let (rows_i, width_i) = (int(rows), int(width));
    let mut launch = gpu.stream().launch_builder(&f);
    launch
        .arg(keys)
        .arg(values)
        .arg(k)
        .arg(v)
        .arg(slots)
        .arg(&rows_i)
        .arg(&width_i);
    unsafe { launch.launch(elementwise(k.len())) }?;
    Ok(())
}

/// The index arrays of one step (uploaded once, used by every layer).
pub struct StepIndex<'a> {
    /// `[rows]`: each row's position in its sequence.
    pub positions: &'a CudaSlice<i32>,
    /// `[rows]`: where each row's sequence's pages start in `page_table`.
    pub table_offsets: &'a CudaSlice<i32>,
    /// The step's sequences' pages, concatenated.
    pub page_table: &'a CudaSlice<i32>,
    pub page_size: usize,
}

/// The attention shape: `(heads, kv_heads, head_dim)`.
pub type Heads = (usize, usize, usize);

/// Causal grouped-query attention over the paged cache: `out[o]` is the
/// attention output (`[heads * head_dim]`) of row `query_rows[o]` of `q`
/// (`[rows, heads * head_dim]`, rotated), over its sequence's cached
/// positions up to its own, scaled by `1/sqrt(head_dim)` as the CPU engine.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
    gpu: &Gpu,
    out: &mut CudaSlice<f32>,
    q: &CudaSlice<f32>,
    keys: &CudaSlice<f32>,
    values: &CudaSlice<f32>,
    query_rows: &CudaSlice<i32>,
    index: &StepIndex<'_>,
    (heads, kv_heads, head_dim): Heads,
) -> Result<()> {
    let q_width = heads * head_dim;
    assert!(
        head_dim <= PAGED_ATTENTION_MAX_HEAD_DIM
            && kv_heads > 0
            && heads.is_multiple_of(kv_heads)
            && q.len() == index.positions.len() * q_width
            && out.len() == query_rows.len() * q_width
            && keys.len() == values.len()
            && keys.len().is_multiple_of(kv_heads * head_dim),
        "paged attention shapes"
    );
    if out.is_empty() {
        return Ok(());
    }
    let f = gpu.function(&PAGED_ATTENTION, "paged_attention_f32")?;
    let (grid_dim, block_dim) = paged_attention_launch(query_rows.len(), heads);
    let (heads_i, kv_heads_i, dim_i, page_i) = (
        int(heads),
        int(kv_heads),
        int(head_dim),
        int(index.page_size),
    );
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut launch = gpu.stream().launch_builder(&f);
    launch
        .arg(out)
        .arg(q)
        .arg(keys)
        .arg(values)
        .arg(query_rows)
        .arg(index.positions)
        .arg(index.table_offsets)
        .arg(index.page_table)
        .arg(&heads_i)
        .arg(&kv_heads_i)
        .arg(&dim_i)
        .arg(&page_i)
        .arg(&scale);
    let config = LaunchConfig {
        grid_dim,
        block_dim,
        shared_mem_bytes: 0,
    };
    unsafe { launch.launch(config) }?;
    Ok(())
}
