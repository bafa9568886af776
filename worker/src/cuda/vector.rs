//! Whole-buffer helpers of the device training step and serving engine
//! (kernels/cuda/vector.cu).

use super::{Gpu, Result, elementwise, grid, int};
use half::bf16;
use moe_kernels::cudarc::driver::{CudaSlice, CudaView, CudaViewMut, PushKernelArg};
use moe_kernels::registry::VECTOR;

/// Threads per block of `sum_squares_f32` (its shared scratch is this wide).
const SUM_THREADS: usize = 256;
/// At most this many partial sums per tensor.
const MAX_SUM_BLOCKS: usize = 1024;

/// `out += a`, elementwise.
pub fn add(gpu: &Gpu, out: &mut CudaSlice<f32>, a: &CudaSlice<f32>) -> Result<()> {
    let n = out.len();
    assert_eq!(a.len(), n, "add shapes");
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(&VECTOR, "add_f32")?;
    let mut launch = gpu.stream().launch_builder(&f);
    launch.arg(out).arg(a).arg(&n);
    unsafe { launch.launch(elementwise(n)) }?;
    Ok(())
}

/// `out = x` rounded to bf16 (nearest, ties to even: the CPU's
/// [`crate::scalar::Scalar::round_bf16`]), elementwise.
pub fn to_bf16(gpu: &Gpu, out: &mut CudaViewMut<'_, bf16>, x: &CudaView<'_, f32>) -> Result<()> {
    let n = x.len();
    assert_eq!(out.len(), n, "to_bf16 shapes");
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(&VECTOR, "to_bf16_f32")?;
    let mut launch = gpu.stream().launch_builder(&f);
    launch.arg(out).arg(x).arg(&n);
    unsafe { launch.launch(elementwise(n)) }?;
    Ok(())
}

/// `x /= d`, elementwise (the data-parallel mean of a gradient sum; the
/// CPU's [`crate::dist::data_parallel`] divides the same way).
pub fn divide(gpu: &Gpu, x: &mut CudaSlice<f32>, d: f32) -> Result<()> {
    let n = x.len();
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(&VECTOR, "divide_f32")?;
    let mut launch = gpu.stream().launch_builder(&f);
    launch.arg(x).arg(&n).arg(&d);
    unsafe { launch.launch(elementwise(n)) }?;
    Ok(())
}

/// The sum of squares of every value of every tensor, accumulated in f64 in
/// a fixed order (the same bits every run): one partial per block, the
/// partials added on the host. One read-back for all the tensors.
pub fn sum_squares(gpu: &Gpu, tensors: &[&CudaSlice<f32>]) -> Result<f64> {
    let blocks: Vec<usize> = tensors
        .iter()
        .map(|t| t.len().div_ceil(SUM_THREADS).clamp(1, MAX_SUM_BLOCKS))
        .collect();
    let mut partials = gpu.zeros::<f64>(blocks.iter().sum::<usize>().max(1))?;
    let f = gpu.function(&VECTOR, "sum_squares_f32")?;
    let mut at = 0;
    for (tensor, &count) in tensors.iter().zip(&blocks) {
        let n = tensor.len();
        if n > 0 {
            let mut out = partials.slice_mut(at..at + count);
            let mut launch = gpu.stream().launch_builder(&f);
            launch.arg(&mut out).arg(*tensor).arg(&n);
            unsafe { launch.launch(grid(count, SUM_THREADS as u32, 0)) }?;
        }
        at += count;
    }
    Ok(gpu.download(&partials)?.iter().sum())
}

/// `x[r, ..] += bias` for every row of `x: [rows, bias.len()]`.
pub fn add_bias_rows(gpu: &Gpu, x: &mut CudaSlice<f32>, bias: &CudaSlice<f32>) -> Result<()> {
    let (n, width) = (x.len(), bias.len());
    assert!(
        width > 0 && n.is_multiple_of(width),
        "bias rows: [rows, width]"
    );
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(&VECTOR, "add_bias_rows_f32")?;
    let width_i = int(width);
    let mut launch = gpu.stream().launch_builder(&f);
    launch.arg(x).arg(bias).arg(&n).arg(&width_i);
    unsafe { launch.launch(elementwise(n)) }?;
    Ok(())
}

/// `x = clamp(x, -limit, limit)`, elementwise.
pub fn clamp(gpu: &Gpu, x: &mut CudaSlice<f32>, limit: f32) -> Result<()> {
    let n = x.len();
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(&VECTOR, "clamp_f32")?;
    let mut launch = gpu.stream().launch_builder(&f);
    launch.arg(x).arg(&n).arg(&limit);
    unsafe { launch.launch(elementwise(n)) }?;
    Ok(())
}

/// `out[o, ..] = x[rows[o], ..]` for rows of `width` values.
pub fn gather_rows(
    gpu: &Gpu,
    out: &mut CudaSlice<f32>,
    x: &CudaSlice<f32>,
    rows: &CudaSlice<i32>,
    width: usize,
) -> Result<()> {
    assert!(
        width > 0 && out.len() == rows.len() * width && x.len().is_multiple_of(width),
        "gather shapes"
    );
    if out.is_empty() {
        return Ok(());
    }
    let n = out.len();
    let f = gpu.function(&VECTOR, "gather_rows_f32")?;
    let (rows_i, width_i) = (int(rows.len()), int(width));
    let mut launch = gpu.stream().launch_builder(&f);
    launch.arg(out).arg(x).arg(rows).arg(&rows_i).arg(&width_i);
    unsafe { launch.launch(elementwise(n)) }?;
    Ok(())
}

/// `out[r, ..] += sigmoid(gate[r]) * shared[r, ..]` (Qwen2-MoE's gated
/// shared expert) for `out, shared: [rows, width]`, `gate: [rows]`.
pub fn add_sigmoid_gated(
    gpu: &Gpu,
    out: &mut CudaSlice<f32>,
    shared: &CudaSlice<f32>,
    gate: &CudaSlice<f32>,
) -> Result<()> {
    let n = out.len();
    let rows = gate.len();
    assert!(
        shared.len() == n && rows > 0 && n.is_multiple_of(rows),
        "gated add shapes"
    );
    let f = gpu.function(&VECTOR, "add_sigmoid_gated_f32")?;
    let width_i = int(n / rows);
    let mut launch = gpu.stream().launch_builder(&f);
    launch.arg(out).arg(shared).arg(gate).arg(&n).arg(&width_i);
    unsafe { launch.launch(elementwise(n)) }?;
    Ok(())
}

/// `x *= s`, elementwise (a LoRA adapter's gradient scaled by alpha / rank,
/// as [`crate::train::lora::project`] scales it).
pub fn scale(gpu: &Gpu, x: &mut CudaSlice<f32>, s: f32) -> Result<()> {
    let n = x.len();
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(&VECTOR, "scale_f32")?;
    let mut launch = gpu.stream().launch_builder(&f);
    launch.arg(x).arg(&n).arg(&s);
    unsafe { launch.launch(elementwise(n)) }?;
    Ok(())
}

/// `w = base + s·w`, elementwise, `w` holding the product `B·A`: a LoRA
/// merge `W₀ + s·B·A`, the CPU's [`crate::train::lora::merge`] sum.
pub fn lora_merge(gpu: &Gpu, w: &mut CudaSlice<f32>, base: &CudaSlice<f32>, s: f32) -> Result<()> {
    let n = w.len();
    assert_eq!(base.len(), n, "LoRA merge shapes");
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(&VECTOR, "lora_merge_f32")?;
    let mut launch = gpu.stream().launch_builder(&f);
    launch.arg(w).arg(base).arg(&n).arg(&s);
    unsafe { launch.launch(elementwise(n)) }?;
    Ok(())
}
