//! GEMMs through cuBLASLt; CPU reference: [`crate::ops::matmul`]. Row-major
//! `out[rows, out] = x[rows, in] @ w[out, in]^T` is, read column-major,
//! `out^T = w x^T`: cuBLASLt's `C = op(A) B` with A = `w` transposed
//! (m = out_dim), B = `x` (n = rows), k = in_dim.
//!
//! f32 uses TF32 tensor cores (cudarc's choice, as llm.c and PyTorch's
//! default for matmuls): 10 mantissa bits per product, f32 accumulation.
//! [`Arithmetic::Bf16`] rounds both f32 operands to bf16 first (into
//! scratch buffers) and runs a bf16 GEMM with f32 accumulation and output:
//! twice TF32's tensor-core rate on Hopper, and the CPU's
//! [`crate::linear::Linear::Bf16`] up to the order of the f32 sums.

use super::{Gpu, Result, int, lt_plan, vector};
use crate::linear::GemmPrecision;
use half::bf16;
use moe_kernels::cudarc::cublaslt::{Matmul, MatmulConfig};
use moe_kernels::cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use moe_kernels::cudarc::driver::{LaunchConfig, PushKernelArg};
use moe_kernels::registry::GEMM;

/// How a GEMM multiplies its f32 operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arithmetic {
    /// TF32 tensor cores: the device's `GemmPrecision::Fp32`.
    Tf32,
    /// Operands rounded to bf16, exact products, f32 sums (`compute: bf16`).
    Bf16,
}

impl Arithmetic {
    /// The device arithmetic of a model's `precision`; `None` for FP8,
    /// which the device trainer does not run yet.
    pub fn of(precision: GemmPrecision) -> Option<Self> {
        match precision {
            GemmPrecision::Fp32 => Some(Self::Tf32),
            GemmPrecision::Bf16 => Some(Self::Bf16),
            GemmPrecision::Fp8(_) => None,
        }
    }
}

fn config(rows: usize, in_dim: usize, out_dim: usize, groups: usize) -> MatmulConfig {
    let batched = groups > 1;
    MatmulConfig {
        transa: true,
        transb: false,
        transc: false,
        m: out_dim as u64,
        n: rows as u64,
        k: in_dim as u64,
        alpha: 1.0,
        lda: in_dim as i64,
        ldb: in_dim as i64,
        beta: 0.0,
        ldc: out_dim as i64,
        stride_a: batched.then_some((out_dim * in_dim) as i64),
        stride_b: batched.then_some((rows * in_dim) as i64),
        stride_c: batched.then_some((rows * out_dim) as i64),
        stride_bias: None,
        batch_size: batched.then_some(groups as i32),
    }
}

/// `out (+)= x @ w^T` on views into larger buffers (an expert's rows and
/// weights inside the stacked tensors); with `accumulate`, adds into `out`
/// (cuBLASLt's beta = 1) instead of overwriting it.
#[allow(clippy::too_many_arguments)]
pub fn forward_view(
    gpu: &Gpu,
    arithmetic: Arithmetic,
    out: &mut CudaViewMut<'_, f32>,
    x: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    in_dim: usize,
    out_dim: usize,
    accumulate: bool,
) -> Result<()> {
    let rows = x.len() / in_dim;
    assert_eq!(x.len(), rows * in_dim, "matmul input shape");
    gemm(
        gpu,
        arithmetic,
        out,
        x,
        false,
        w,
        true,
        (rows, out_dim, in_dim),
        accumulate,
    )
}

/// As [`crate::ops::matmul::forward`], in `arithmetic`.
pub fn forward(
    gpu: &Gpu,
    arithmetic: Arithmetic,
    out: &mut CudaSlice<f32>,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    in_dim: usize,
    out_dim: usize,
) -> Result<()> {
    forward_view(
        gpu,
        arithmetic,
        &mut out.slice_mut(..),
        &x.slice(..),
        &w.slice(..),
        in_dim,
        out_dim,
        false,
    )
}

/// `groups` independent GEMMs of equal shape in bf16 (f32 accumulation):
/// `out[g] = x[g] @ w[g]^T` with `x: [groups, rows, in]`, `w: [groups, out, in]`
/// — the expert GEMM when every expert gets the same number of rows.
pub fn forward_grouped_bf16(
    gpu: &Gpu,
    out: &mut CudaSlice<bf16>,
    x: &CudaSlice<bf16>,
    w: &CudaSlice<bf16>,
    groups: usize,
    in_dim: usize,
    out_dim: usize,
) -> Result<()> {
    let rows = x.len() / (groups * in_dim);
    assert!(
        x.len() == groups * rows * in_dim
            && w.len() == groups * out_dim * in_dim
            && out.len() == groups * rows * out_dim,
        "grouped matmul shapes"
    );
    if rows == 0 {
        return Ok(());
    }
    let blas = gpu.blas()?;
    unsafe { blas.matmul(config(rows, in_dim, out_dim, groups), w, x, out, None, None) }?;
    Ok(())
}

/// As [`crate::ops::matmul::forward`], bit for bit: f32 on CUDA cores with
/// the CPU's operation order (see kernels/cuda/gemm.cu). For small GEMMs
/// whose consumers must not see last-bit differences (the router).
pub fn forward_exact(
    gpu: &Gpu,
    out: &mut CudaSlice<f32>,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    in_dim: usize,
    out_dim: usize,
) -> Result<()> {
    let rows = x.len() / in_dim;
    assert!(
        x.len() == rows * in_dim && w.len() == out_dim * in_dim && out.len() == rows * out_dim,
        "matmul shapes"
    );
    if rows == 0 || out_dim == 0 {
        return Ok(());
    }
    let f = gpu.function(&GEMM, "gemm_abt_f32_exact")?;
    let (m_i, n_i, k_i) = (int(rows), int(out_dim), int(in_dim));
    let config = LaunchConfig {
        grid_dim: (out_dim.div_ceil(32) as u32, rows.div_ceil(32) as u32, 1),
        block_dim: (32, 32, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = gpu.stream().launch_builder(&f);
    launch.arg(out).arg(x).arg(w).arg(&m_i).arg(&n_i).arg(&k_i);
    unsafe { launch.launch(config) }?;
    Ok(())
}

/// Row-major `c (+)= op_a(a) @ op_b(b)` with `op_a(a): [m, k]`, `op_b(b): [k, n]`;
/// `a_transposed` means `a` is stored `[k, m]`, `b_transposed` that `b` is
/// stored `[n, k]`. The backward GEMMs: `dx = dy @ w` (`w` as stored) and
/// `dw += dyᵀ @ x` (`dy` transposed), in `arithmetic`.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    gpu: &Gpu,
    arithmetic: Arithmetic,
    c: &mut CudaViewMut<'_, f32>,
    a: &CudaView<'_, f32>,
    a_transposed: bool,
    b: &CudaView<'_, f32>,
    b_transposed: bool,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) -> Result<()> {
    assert!(
        a.len() == m * k && b.len() == k * n && c.len() == m * n,
        "gemm shapes"
    );
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        // An empty sum: nothing to add, but an overwrite means zeros.
        if !accumulate {
            gpu.stream().memset_zeros(c)?;
        }
        return Ok(());
    }
    // Column-major, cᵀ [n, m] = op_b(b)ᵀ op_a(a)ᵀ: cuBLASLt's A is `b`, its B is `a`.
    let cfg = MatmulConfig {
        transa: b_transposed,
        transb: a_transposed,
        transc: false,
        m: n as u64,
        n: m as u64,
        k: k as u64,
        alpha: 1.0,
        lda: if b_transposed { k } else { n } as i64,
        ldb: if a_transposed { m } else { k } as i64,
        beta: if accumulate { 1.0 } else { 0.0 },
        ldc: n as i64,
        stride_a: None,
        stride_b: None,
        stride_c: None,
        stride_bias: None,
        batch_size: None,
    };
    plan_matmul(gpu, arithmetic, &cfg, b, a, c)
}

/// One operand of [`gemm_batched`]: a view at the first matrix, its
/// row-major leading dimension (values between consecutive stored rows),
/// the offset between consecutive matrices of the batch, and whether it is
/// stored transposed (as in [`gemm`]).
pub struct Operand<'a, 'b> {
    pub view: &'b CudaView<'a, f32>,
    pub ld: usize,
    pub batch_stride: usize,
    pub transposed: bool,
}

/// `batch` row-major GEMMs `c_i (+)= op(a_i) @ op(b_i)` (`[m, k] @ [k, n]`),
/// the i-th matrices `batch_stride` values after the first; `c` has
/// leading dimension `ldc` and batch stride `c_stride`. TF32 (attention's
/// score and value products, whatever the linear layers' arithmetic).
#[allow(clippy::too_many_arguments)]
pub fn gemm_batched(
    gpu: &Gpu,
    c: &mut CudaViewMut<'_, f32>,
    (ldc, c_stride): (usize, usize),
    a: Operand<'_, '_>,
    b: Operand<'_, '_>,
    (m, n, k): (usize, usize, usize),
    batch: usize,
    accumulate: bool,
) -> Result<()> {
    if m == 0 || n == 0 || batch == 0 {
        return Ok(());
    }
    // The last matrix's last element must lie inside each view.
    let last = |rows: usize, cols: usize, ld: usize, stride: usize| {
        (batch - 1) * stride + (rows - 1) * ld + cols
    };
    let (a_rows, a_cols) = if a.transposed { (k, m) } else { (m, k) };
    let (b_rows, b_cols) = if b.transposed { (n, k) } else { (k, n) };
    assert!(
        k > 0
            && a.view.len() >= last(a_rows, a_cols, a.ld, a.batch_stride)
            && b.view.len() >= last(b_rows, b_cols, b.ld, b.batch_stride)
            && c.len() >= last(m, n, ldc, c_stride),
        "batched gemm shapes"
    );
    // Column-major, cᵀ = op(b)ᵀ op(a)ᵀ: cuBLASLt's A is `b`, its B is `a`.
    let cfg = MatmulConfig {
        transa: b.transposed,
        transb: a.transposed,
        transc: false,
        m: n as u64,
        n: m as u64,
        k: k as u64,
        alpha: 1.0,
        lda: b.ld as i64,
        ldb: a.ld as i64,
        beta: if accumulate { 1.0 } else { 0.0 },
        ldc: ldc as i64,
        stride_a: Some(b.batch_stride as i64),
        stride_b: Some(a.batch_stride as i64),
        stride_c: Some(c_stride as i64),
        stride_bias: None,
        batch_size: Some(i32::try_from(batch).expect("batch exceeds i32")),
    };
    plan_matmul(gpu, Arithmetic::Tf32, &cfg, b.view, a.view, c)
}

/// Runs `cfg` (cudarc's description of an f32 GEMM) through a cached plan
/// ([`lt_plan`]): cuBLASLt's A is `a`, its B is `b`, as in `cfg`. In bf16
/// each operand's whole view is rounded into a scratch copy of the same
/// layout (strides and leading dimensions unchanged), freed in stream order.
fn plan_matmul(
    gpu: &Gpu,
    arithmetic: Arithmetic,
    cfg: &MatmulConfig,
    a: &CudaView<'_, f32>,
    b: &CudaView<'_, f32>,
    c: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let shape = lt_plan::Shape {
        operands: match arithmetic {
            Arithmetic::Tf32 => lt_plan::Operands::F32,
            Arithmetic::Bf16 => lt_plan::Operands::Bf16,
        },
        transa: cfg.transa,
        transb: cfg.transb,
        m: cfg.m,
        n: cfg.n,
        k: cfg.k,
        lda: cfg.lda,
        ldb: cfg.ldb,
        ldc: cfg.ldc,
        batch: cfg.batch_size.map(|count| {
            (
                count,
                cfg.stride_a.unwrap_or(0),
                cfg.stride_b.unwrap_or(0),
                cfg.stride_c.unwrap_or(0),
            )
        }),
    };
    let stream = gpu.stream();
    let (a16, b16) = match arithmetic {
        Arithmetic::Tf32 => (None, None),
        Arithmetic::Bf16 => (Some(rounded(gpu, a)?), Some(rounded(gpu, b)?)),
    };
    let (a_ptr, _a) = match &a16 {
        Some(a16) => a16.device_ptr(stream),
        None => a.device_ptr(stream),
    };
    let (b_ptr, _b) = match &b16 {
        Some(b16) => b16.device_ptr(stream),
        None => b.device_ptr(stream),
    };
    let (c_ptr, _c) = c.device_ptr_mut(stream);
    // SAFETY: the callers assert the views fit the shape (a bf16 copy has
    // its view's length); the views, copies and their stream records live
    // until the call has been enqueued.
    unsafe {
        lt_plan::matmul(
            gpu,
            shape,
            a_ptr as *const std::ffi::c_void,
            b_ptr as *const std::ffi::c_void,
            c_ptr as *mut std::ffi::c_void,
            cfg.beta != 0.0,
        )
    }
}

/// `x` rounded to bf16, in a new buffer of its length.
fn rounded(gpu: &Gpu, x: &CudaView<'_, f32>) -> Result<CudaSlice<bf16>> {
    let mut out = gpu.output::<bf16>(x.len())?;
    vector::to_bf16(gpu, &mut out.slice_mut(..), x)?;
    Ok(out)
}
