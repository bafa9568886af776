//! Causal grouped-query attention on the device; CPU reference:
//! [`crate::ops::attention`], with the same `probs` layout kept for the
//! backward pass. Two paths: [`forward`]/[`backward`] put the score and
//! value products on the tensor cores (batched cuBLASLt GEMMs over
//! head-major copies of q, k and v, TF32), what the model runs; and
//! [`forward_exact`]/[`backward_exact`], one warp per row on CUDA cores in
//! exact f32, the reference-grade kernels the fast path is checked beside.

use super::matmul::{self, Operand};
use super::{Gpu, Result, elementwise, grid, int};
use crate::ops::attention::AttentionShape;
use moe_kernels::cudarc::driver::{CudaSlice, CudaView, PushKernelArg};
use moe_kernels::registry::ATTENTION;

/// Query (or key) rows per block: one warp each.
const WARPS: usize = 8;

/// The number of sequences in `q_len` query values of `shape` (asserting
/// whole sequences and whole query-head groups).
pub(super) fn sequences(shape: AttentionShape, q_len: usize) -> usize {
    let width = shape.seq_len * shape.n_heads * shape.head_dim;
    assert!(
        width > 0 && q_len.is_multiple_of(width) && shape.n_heads.is_multiple_of(shape.n_kv_heads),
        "attention shape {shape:?} for {q_len} query values"
    );
    q_len / width
}

/// Checks a forward pass's buffers against `shape`; the number of sequences.
fn forward_sequences(
    shape: AttentionShape,
    out: &CudaSlice<f32>,
    probs: &CudaSlice<f32>,
    q: &CudaSlice<f32>,
    k: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
) -> usize {
    let b = sequences(shape, q.len());
    let kv_len = b * shape.seq_len * shape.n_kv_heads * shape.head_dim;
    assert!(
        k.len() == kv_len
            && v.len() == kv_len
            && out.len() == q.len()
            && probs.len() == shape.probs_len(b * shape.seq_len),
        "attention shapes"
    );
    b
}

/// Checks a backward pass's buffers against `shape`; the number of sequences.
fn backward_sequences(
    shape: AttentionShape,
    grads: &AttentionGrads<'_>,
    dout: &CudaSlice<f32>,
    q: &CudaSlice<f32>,
    k: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    probs: &CudaSlice<f32>,
) -> usize {
    let b = sequences(shape, q.len());
    assert!(
        dout.len() == q.len()
            && grads.q.len() == q.len()
            && grads.k.len() == k.len()
            && grads.v.len() == v.len()
            && probs.len() == shape.probs_len(b * shape.seq_len),
        "attention gradient shapes"
    );
    b
}

/// As [`crate::ops::attention::forward`] in exact f32 (CUDA cores, 85% of
/// a training step's time at sequence length 1024): `out` and `probs`
/// overwritten.
pub fn forward_exact(
    gpu: &Gpu,
    out: &mut CudaSlice<f32>,
    probs: &mut CudaSlice<f32>,
    q: &CudaSlice<f32>,
    k: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    shape: AttentionShape,
) -> Result<()> {
    let b = forward_sequences(shape, out, probs, q, k, v);
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

/// As [`crate::ops::attention::backward`] in exact f32: adds into `grads`.
#[allow(clippy::too_many_arguments)]
pub fn backward_exact(
    gpu: &Gpu,
    grads: AttentionGrads<'_>,
    dout: &CudaSlice<f32>,
    q: &CudaSlice<f32>,
    k: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    probs: &CudaSlice<f32>,
    shape: AttentionShape,
) -> Result<()> {
    let b = backward_sequences(shape, &grads, dout, q, k, v, probs);
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

/// Token-major `[sequences, seq_len, heads, head_dim]` to head-major
/// `[sequences, heads, seq_len, head_dim]`, so that every head's rows are
/// one strided matrix for the batched GEMMs.
fn to_head_major(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    sequences: usize,
    shape: AttentionShape,
    heads: usize,
) -> Result<CudaSlice<f32>> {
    let mut out = gpu.output::<f32>(x.len())?;
    let f = gpu.function(&ATTENTION, "attention_to_head_major_f32")?;
    let (b, t, h, d) = (
        int(sequences),
        int(shape.seq_len),
        int(heads),
        int(shape.head_dim),
    );
    let mut launch = gpu.stream().launch_builder(&f);
    launch.arg(&mut out).arg(x).arg(&b).arg(&t).arg(&h).arg(&d);
    unsafe { launch.launch(elementwise(x.len())) }?;
    Ok(out)
}

/// The inverse of [`to_head_major`], overwriting `dst` or adding into it.
fn to_token_major(
    gpu: &Gpu,
    dst: &mut CudaSlice<f32>,
    x: &CudaSlice<f32>,
    sequences: usize,
    shape: AttentionShape,
    heads: usize,
    accumulate: bool,
) -> Result<()> {
    let f = gpu.function(&ATTENTION, "attention_to_token_major_f32")?;
    let (b, t, h, d) = (
        int(sequences),
        int(shape.seq_len),
        int(heads),
        int(shape.head_dim),
    );
    let accumulate = i32::from(accumulate);
    let mut launch = gpu.stream().launch_builder(&f);
    launch
        .arg(dst)
        .arg(x)
        .arg(&b)
        .arg(&t)
        .arg(&h)
        .arg(&d)
        .arg(&accumulate);
    unsafe { launch.launch(elementwise(x.len())) }?;
    Ok(())
}

/// Head-major operands, batched over (sequence, kv head) for one member
/// `r` of each query-head group: query head `kv * group + r` meets kv head
/// `kv`, so query-side matrices step `group` heads per batch entry.
struct Layout {
    sequences: usize,
    t: usize,
    d: usize,
    group: usize,
    /// Sequences × kv heads: the batch of every GEMM.
    batch: usize,
}

impl Layout {
    fn new(shape: AttentionShape, sequences: usize) -> Self {
        Self {
            sequences,
            t: shape.seq_len,
            d: shape.head_dim,
            group: shape.n_heads / shape.n_kv_heads,
            batch: sequences * shape.n_kv_heads,
        }
    }

    /// A query-side `[T, D]` operand (q, out, dout, dq) for group member `r`.
    fn query<'a, 'b>(&self, view: &'b CudaView<'a, f32>, transposed: bool) -> Operand<'a, 'b> {
        Operand {
            view,
            ld: self.d,
            batch_stride: self.group * self.t * self.d,
            transposed,
        }
    }

    /// A kv-side `[T, D]` operand (k, v).
    fn key<'a, 'b>(&self, view: &'b CudaView<'a, f32>, transposed: bool) -> Operand<'a, 'b> {
        Operand {
            view,
            ld: self.d,
            batch_stride: self.t * self.d,
            transposed,
        }
    }

    /// A `[T, T]` probability-shaped operand (probs, dscores).
    fn square<'a, 'b>(&self, view: &'b CudaView<'a, f32>, transposed: bool) -> Operand<'a, 'b> {
        Operand {
            view,
            ld: self.t,
            batch_stride: self.group * self.t * self.t,
            transposed,
        }
    }

    fn query_offset(&self, r: usize) -> usize {
        r * self.t * self.d
    }

    fn square_offset(&self, r: usize) -> usize {
        r * self.t * self.t
    }
}

/// `square[b, h] = query[b, h] · key[b, kv(h)]ᵀ` for every head (`[T, T]`
/// per head, overwritten): the scores `q kᵀ`, and in the backward pass the
/// probabilities' gradient `dout vᵀ`.
fn query_key_products(
    gpu: &Gpu,
    l: &Layout,
    square: &mut CudaSlice<f32>,
    query: &CudaSlice<f32>,
    key: &CudaView<'_, f32>,
) -> Result<()> {
    let (t, d) = (l.t, l.d);
    for r in 0..l.group {
        let query_r = query.slice(l.query_offset(r)..);
        let mut square_r = square.slice_mut(l.square_offset(r)..);
        matmul::gemm_batched(
            gpu,
            &mut square_r,
            (t, l.group * t * t),
            l.query(&query_r, false),
            l.key(key, true),
            (t, t, d),
            l.batch,
            false,
        )?;
    }
    Ok(())
}

fn warp_rows(
    gpu: &Gpu,
    entry: &str,
    buffer: &mut CudaSlice<f32>,
    probs: Option<&CudaSlice<f32>>,
    rows: usize,
    seq_len: usize,
    scale: f32,
) -> Result<()> {
    let f = gpu.function(&ATTENTION, entry)?;
    let t = int(seq_len);
    let mut launch = gpu.stream().launch_builder(&f);
    launch.arg(buffer);
    if let Some(probs) = probs {
        launch.arg(probs);
    }
    launch.arg(&rows).arg(&t).arg(&scale);
    unsafe { launch.launch(grid(rows.div_ceil(WARPS), (WARPS * 32) as u32, 0)) }?;
    Ok(())
}

/// Each of `tokens` tokens' document start in its sequence: `documents`
/// (a packed batch's, `[sequences * T]`), or zeros (plain causal
/// attention) made in `zeros`.
pub(crate) fn document_starts<'a>(
    gpu: &Gpu,
    documents: Option<&'a CudaSlice<i32>>,
    tokens: usize,
    zeros: &'a mut Option<CudaSlice<i32>>,
) -> Result<&'a CudaSlice<i32>> {
    match documents {
        Some(starts) => {
            assert_eq!(starts.len(), tokens, "a document start per token");
            Ok(starts)
        }
        None => Ok(zeros.insert(gpu.zeros::<i32>(tokens)?)),
    }
}

/// As [`crate::ops::attention::forward`], the products on tensor cores
/// (TF32): `out` and `probs` overwritten; `documents` as for
/// [`super::flash_attention::forward`] (the probabilities before a token's
/// document start are 0).
#[allow(clippy::too_many_arguments)]
pub fn forward(
    gpu: &Gpu,
    out: &mut CudaSlice<f32>,
    probs: &mut CudaSlice<f32>,
    q: &CudaSlice<f32>,
    k: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    shape: AttentionShape,
    documents: Option<&CudaSlice<i32>>,
) -> Result<()> {
    let b = forward_sequences(shape, out, probs, q, k, v);
    let rows = b * shape.n_heads * shape.seq_len;
    if rows == 0 {
        return Ok(());
    }
    let l = Layout::new(shape, b);
    let (t, d) = (l.t, l.d);
    let qh = to_head_major(gpu, q, b, shape, shape.n_heads)?;
    let kh = to_head_major(gpu, k, b, shape, shape.n_kv_heads)?;
    let vh = to_head_major(gpu, v, b, shape, shape.n_kv_heads)?;
    let mut oh = gpu.output::<f32>(q.len())?;
    let (kh_v, vh_v) = (kh.slice(..), vh.slice(..));
    // Raw scores q kᵀ into probs, then the causal softmax in place.
    query_key_products(gpu, &l, probs, &qh, &kh_v)?;
    let scale = 1.0 / (d as f32).sqrt();
    let mut zeros = None;
    let starts = document_starts(gpu, documents, b * t, &mut zeros)?;
    let f = gpu.function(&ATTENTION, "attention_softmax_causal_f32")?;
    let (t_i, heads_i) = (int(t), int(shape.n_heads));
    let mut launch = gpu.stream().launch_builder(&f);
    launch
        .arg(&mut *probs)
        .arg(starts)
        .arg(&rows)
        .arg(&t_i)
        .arg(&heads_i)
        .arg(&scale);
    unsafe { launch.launch(grid(rows.div_ceil(WARPS), (WARPS * 32) as u32, 0)) }?;
    for r in 0..l.group {
        let p_r = probs.slice(l.square_offset(r)..);
        let mut o_r = oh.slice_mut(l.query_offset(r)..);
        matmul::gemm_batched(
            gpu,
            &mut o_r,
            (d, l.group * t * d),
            l.square(&p_r, false),
            l.key(&vh_v, false),
            (t, d, t),
            l.batch,
            false,
        )?;
    }
    to_token_major(gpu, out, &oh, l.sequences, shape, shape.n_heads, false)
}

/// As [`crate::ops::attention::backward`], the products on tensor cores
/// (TF32): adds into `grads`.
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
    let b = backward_sequences(shape, &grads, dout, q, k, v, probs);
    let rows = b * shape.n_heads * shape.seq_len;
    if rows == 0 {
        return Ok(());
    }
    let l = Layout::new(shape, b);
    let (t, d) = (l.t, l.d);
    let (heads, kv_heads) = (shape.n_heads, shape.n_kv_heads);
    let qh = to_head_major(gpu, q, b, shape, heads)?;
    let kh = to_head_major(gpu, k, b, shape, kv_heads)?;
    let vh = to_head_major(gpu, v, b, shape, kv_heads)?;
    let doh = to_head_major(gpu, dout, b, shape, heads)?;
    let (kh_v, vh_v) = (kh.slice(..), vh.slice(..));

    // d(probs) = dout vᵀ, then the softmax's backward in place: dscores.
    let mut dscores = gpu.output::<f32>(probs.len())?;
    query_key_products(gpu, &l, &mut dscores, &doh, &vh_v)?;
    let scale = 1.0 / (d as f32).sqrt();
    warp_rows(
        gpu,
        "attention_softmax_backward_f32",
        &mut dscores,
        Some(probs),
        rows,
        t,
        scale,
    )?;

    // dq = dscores k; dk = Σ_group dscoresᵀ q; dv = Σ_group probsᵀ dout,
    // the group's heads added in order (deterministic, no atomics).
    let mut dqh = gpu.output::<f32>(q.len())?;
    let mut dkh = gpu.zeros::<f32>(k.len())?;
    let mut dvh = gpu.zeros::<f32>(v.len())?;
    for r in 0..l.group {
        let ds_r = dscores.slice(l.square_offset(r)..);
        let p_r = probs.slice(l.square_offset(r)..);
        let (q_r, do_r) = (
            qh.slice(l.query_offset(r)..),
            doh.slice(l.query_offset(r)..),
        );
        let mut dq_r = dqh.slice_mut(l.query_offset(r)..);
        matmul::gemm_batched(
            gpu,
            &mut dq_r,
            (d, l.group * t * d),
            l.square(&ds_r, false),
            l.key(&kh_v, false),
            (t, d, t),
            l.batch,
            false,
        )?;
        let kv_c = (d, t * d);
        matmul::gemm_batched(
            gpu,
            &mut dkh.slice_mut(..),
            kv_c,
            l.square(&ds_r, true),
            l.query(&q_r, false),
            (t, d, t),
            l.batch,
            true,
        )?;
        matmul::gemm_batched(
            gpu,
            &mut dvh.slice_mut(..),
            kv_c,
            l.square(&p_r, true),
            l.query(&do_r, false),
            (t, d, t),
            l.batch,
            true,
        )?;
    }
    to_token_major(gpu, grads.q, &dqh, l.sequences, shape, heads, true)?;
    to_token_major(gpu, grads.k, &dkh, l.sequences, shape, kv_heads, true)?;
    to_token_major(gpu, grads.v, &dvh, l.sequences, shape, kv_heads, true)
}
