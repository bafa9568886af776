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
//! [`Arithmetic::Fp8`] quantises both operands to E4M3 with block scales
//! and runs cuBLASLt's block-scaled FP8 GEMM (see [`gemm`]): the CPU's
//! [`crate::fp8::gemm`] on the same codes and scales.
//! [`Arithmetic::Fp8Delayed`] does the same with one delayed scale per
//! tensor (the tensorwise recipe, [`super::fp8_delayed`]).
//!
//! An operand read by several GEMMs is rounded or quantised once for all
//! of them ([`Prepared`]); a weight, once per optimizer step
//! ([`WeightCache`]).

use super::fp8::{self, DeviceFp8, ScaleLayout};
use super::fp8_delayed::DelayedScales;
use super::{Gpu, Result, fp8_gemm, int, lt_plan, vector};
use crate::fp8::Role;
use crate::fp8::{Fp8Recipe, TILE, TileShape};
use crate::linear::GemmPrecision;
use half::bf16;
use moe_kernels::cudarc::cublaslt::{Matmul, MatmulConfig};
use moe_kernels::cudarc::driver::{
    CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, SyncOnDrop,
};
use moe_kernels::cudarc::driver::{LaunchConfig, PushKernelArg};
use moe_kernels::registry::GEMM;
use std::cell::RefCell;
use std::ops::Range;
use std::rc::Rc;

/// How a GEMM multiplies its f32 operands.
#[derive(Clone, Copy, Debug)]
pub enum Arithmetic<'a> {
    /// TF32 tensor cores: the device's `GemmPrecision::Fp32`.
    Tf32,
    /// Operands rounded to bf16, exact products, f32 sums (`compute: bf16`).
    Bf16,
    /// E4M3 operands with just-in-time block scales, f32 accumulation and
    /// output (`fp8.enabled` with the blockwise recipe).
    Fp8,
    /// E4M3 operands with one delayed scale per tensor (the tensorwise
    /// recipe): linear layer `.1`'s scales in `.0` — or, as a group's
    /// arithmetic, the group's first linear layer (see [`Self::at`]).
    Fp8Delayed(&'a DelayedScales, usize),
}

impl PartialEq for Arithmetic<'_> {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Fp8Delayed(a, i), Self::Fp8Delayed(b, j)) => std::ptr::eq(*a, *b) && i == j,
            _ => std::mem::discriminant(self) == std::mem::discriminant(other),
        }
    }
}

impl Eq for Arithmetic<'_> {}

impl Arithmetic<'static> {
    /// The device arithmetic of a model's `precision`; `None` for FP8's
    /// tensorwise recipe, whose arithmetic names its delayed scales
    /// ([`Arithmetic::Fp8Delayed`]).
    pub fn of(precision: GemmPrecision) -> Option<Self> {
        match precision {
            GemmPrecision::Fp32 => Some(Self::Tf32),
            GemmPrecision::Bf16 => Some(Self::Bf16),
            GemmPrecision::Fp8(Fp8Recipe::Blockwise) => Some(Self::Fp8),
            GemmPrecision::Fp8(Fp8Recipe::Tensorwise) => None,
        }
    }
}

impl Arithmetic<'_> {
    /// Linear layer `i` of a group (or the group starting there) computing
    /// in this arithmetic: the same arithmetic, but for delayed scales the
    /// `i`-th layer's (layers are numbered as [`DelayedScales`] says).
    pub fn at(self, i: usize) -> Self {
        match self {
            Self::Fp8Delayed(scales, first) => Self::Fp8Delayed(scales, first + i),
            other => other,
        }
    }

    fn is_fp8(self) -> bool {
        matches!(self, Self::Fp8 | Self::Fp8Delayed(..))
    }
}

/// A GEMM operand: a view of its f32 values and, when several GEMMs read
/// them ([`Prepared`]), what those make of them once: the bf16 rounding in
/// [`Arithmetic::Bf16`], the FP8 quantisations in [`Arithmetic::Fp8`].
/// Without it each GEMM rounds or quantises its own scratch copy. A
/// `&CudaView<f32>` or `&CudaSlice<f32>` converts into one.
pub struct Input<'a> {
    values: CudaView<'a, f32>,
    bf16: Option<CudaView<'a, bf16>>,
    /// The quantisations made of this range so far, and the range.
    fp8: Option<(&'a Fp8Memo, Range<usize>)>,
}

/// FP8 operands made from ranges of one buffer, by range, layout and (for
/// delayed scales, each linear layer scaling its input its own way) the
/// linear layer and role.
type Fp8Memo = RefCell<Vec<(Fp8Key, Rc<DeviceFp8>)>>;
type Fp8Key = (Range<usize>, fp8::Operand, Fp8Scaling);

/// How an FP8 operand is scaled: per tile, or by a linear layer's delayed
/// scale for the role it plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fp8Scaling {
    Tiles(TileShape),
    Delayed(usize, Role),
}

impl Input<'_> {
    /// In bf16 without a given rounding, a scratch copy rounded here.
    fn copy_unless_rounded(&self, gpu: &Gpu, bf16: bool) -> Result<Option<CudaSlice<bf16>>> {
        match (bf16, &self.bf16) {
            (true, None) => Ok(Some(rounded(gpu, &self.values)?)),
            _ => Ok(None),
        }
    }

    /// Where the GEMM reads the operand: `copy` if one was made, else in
    /// bf16 the given rounding, else the f32 values.
    fn device_ptr<'s>(
        &'s self,
        copy: Option<&'s CudaSlice<bf16>>,
        bf16: bool,
        stream: &'s CudaStream,
    ) -> (u64, SyncOnDrop<'s>) {
        match (copy, &self.bf16) {
            (Some(copy), _) => copy.device_ptr(stream),
            (None, Some(given)) if bf16 => given.device_ptr(stream),
            _ => self.values.device_ptr(stream),
        }
    }

    /// The operand quantised as `operand`, scaled as `scaling` says
    /// (delayed scales from `scales`): made once per range, layout and
    /// scaling when the values are [`Prepared`], else here.
    fn quantized(
        &self,
        gpu: &Gpu,
        operand: fp8::Operand,
        scaling: Fp8Scaling,
        scales: Option<&DelayedScales>,
    ) -> Result<Rc<DeviceFp8>> {
        let make = || match scaling {
            Fp8Scaling::Tiles(tile) => {
                fp8::quantize_operand(gpu, &self.values, operand, tile, ScaleLayout::Cublaslt)
            }
            Fp8Scaling::Delayed(linear, role) => {
                let scales = scales.expect("delayed scaling has its scales");
                let scale = scales.scale(gpu, linear, role, &self.values)?;
                fp8::quantize_operand_tensorwise(gpu, &self.values, operand, scale)
            }
        };
        let Some((memo, range)) = &self.fp8 else {
            return Ok(Rc::new(make()?));
        };
        let key = (range.clone(), operand, scaling);
        if let Some((_, made)) = memo.borrow().iter().find(|(k, _)| *k == key) {
            return Ok(Rc::clone(made));
        }
        let made = Rc::new(make()?);
        memo.borrow_mut().push((key, Rc::clone(&made)));
        Ok(made)
    }
}

impl Clone for Input<'_> {
    fn clone(&self) -> Self {
        Self {
            values: self.values.slice(..),
            bf16: self.bf16.as_ref().map(|rounded| rounded.slice(..)),
            fp8: self.fp8.clone(),
        }
    }
}

impl<'a> From<&CudaView<'a, f32>> for Input<'a> {
    fn from(values: &CudaView<'a, f32>) -> Self {
        Self {
            values: values.slice(..),
            bf16: None,
            fp8: None,
        }
    }
}

impl<'a> From<&'a CudaSlice<f32>> for Input<'a> {
    fn from(values: &'a CudaSlice<f32>) -> Self {
        Self {
            values: values.slice(..),
            bf16: None,
            fp8: None,
        }
    }
}

/// An f32 buffer that several GEMMs read (or read slices of), with what
/// they make of it made once: an activation feeding the q, k and v
/// projections and their weight gradients, an expert's rows feeding its
/// gate and up projections, a gradient feeding both the input and the
/// weight gradient. In bf16 its rounding, made here; in FP8 each
/// quantisation a GEMM asks of a range, kept for the next GEMM asking the
/// same (the forward and the weight gradient quantise along different K,
/// the q, k and v projections along the same). Each would otherwise read
/// 4 bytes a value and write 1–2 for its own copy: at an expert GEMM's
/// shapes as much memory time as its multiply. Nothing in TF32.
pub struct Prepared<'a> {
    values: &'a CudaSlice<f32>,
    derived: Derived,
}

impl<'a> Prepared<'a> {
    pub fn of(gpu: &Gpu, arithmetic: Arithmetic<'_>, values: &'a CudaSlice<f32>) -> Result<Self> {
        Ok(Self {
            values,
            derived: Derived::of(gpu, arithmetic, values)?,
        })
    }

    /// The operand `values[range]`.
    pub fn input(&self, range: Range<usize>) -> Input<'_> {
        self.derived.input(self.values, range)
    }

    /// The whole buffer as an operand.
    pub fn whole(&self) -> Input<'_> {
        self.input(0..self.values.len())
    }

    /// The bf16 rounding of the whole buffer ([`Arithmetic::Bf16`] only).
    pub(crate) fn rounded(&self) -> &CudaSlice<bf16> {
        self.derived.rounded()
    }
}

/// What GEMMs make of one f32 buffer, kept apart from it: its bf16
/// rounding (made at once) or its FP8 quantisations (each made by the first
/// GEMM asking for it). [`Prepared`] pairs it with the buffer for one
/// pass; [`WeightCache`] keeps a weight's for a whole optimizer step.
pub struct Derived {
    len: usize,
    bf16: Option<CudaSlice<bf16>>,
    fp8: Option<Fp8Memo>,
}

impl Derived {
    pub fn of(gpu: &Gpu, arithmetic: Arithmetic<'_>, values: &CudaSlice<f32>) -> Result<Self> {
        let (bf16, fp8) = match arithmetic {
            Arithmetic::Bf16 => (Some(rounded(gpu, &values.slice(..))?), None),
            Arithmetic::Fp8 | Arithmetic::Fp8Delayed(..) => (None, Some(RefCell::default())),
            Arithmetic::Tf32 => (None, None),
        };
        Ok(Self {
            len: values.len(),
            bf16,
            fp8,
        })
    }

    /// The bf16 rounding, made when derived in [`Arithmetic::Bf16`].
    pub(crate) fn rounded(&self) -> &CudaSlice<bf16> {
        self.bf16
            .as_ref()
            .expect("a bf16 rounding is derived in Arithmetic::Bf16 only")
    }

    /// All of `values` as an operand (see [`Self::input`]).
    pub fn whole<'a>(&'a self, values: &'a CudaSlice<f32>) -> Input<'a> {
        self.input(values, 0..values.len())
    }

    /// The operand `values[range]`; `values` must be the buffer this was
    /// made from, unchanged since.
    pub fn input<'a>(&'a self, values: &'a CudaSlice<f32>, range: Range<usize>) -> Input<'a> {
        assert_eq!(values.len(), self.len, "derived from another buffer");
        Input {
            values: values.slice(range.clone()),
            bf16: self
                .bf16
                .as_ref()
                .map(|rounded| rounded.slice(range.clone())),
            fp8: self.fp8.as_ref().map(|memo| (memo, range)),
        }
    }
}

/// The weights' [`Derived`] operands, made by a step's first GEMM reading
/// each weight and kept for its others: with gradient accumulation a weight
/// feeds two GEMMs per micro-batch, and in bf16 or FP8 each would round or
/// quantise it again (6 bytes of memory traffic a value in bf16, as long
/// as an expert GEMM's multiply). Keyed by the weight's device address;
/// whoever can change the weights owns the cache and clears it
/// ([`Self::clear`] takes `&mut`), so nothing derived from old values is
/// ever read. Costs the derived copies' memory (a bf16 copy of every
/// weight, or its FP8 codes in both orientations) until the next clear.
#[derive(Default)]
pub struct WeightCache(RefCell<Vec<(u64, Rc<Derived>)>>);

impl WeightCache {
    /// `w`'s derived operands in `arithmetic` (nothing made in TF32).
    pub fn get(
        &self,
        gpu: &Gpu,
        arithmetic: Arithmetic<'_>,
        w: &CudaSlice<f32>,
    ) -> Result<Rc<Derived>> {
        if arithmetic == Arithmetic::Tf32 {
            return Ok(Rc::new(Derived::of(gpu, arithmetic, w)?));
        }
        let address = {
            let (ptr, _record) = w.device_ptr(gpu.stream());
            ptr
        };
        if let Some((_, derived)) = self.0.borrow().iter().find(|(a, _)| *a == address) {
            return Ok(Rc::clone(derived));
        }
        let derived = Rc::new(Derived::of(gpu, arithmetic, w)?);
        self.0.borrow_mut().push((address, Rc::clone(&derived)));
        Ok(derived)
    }

    /// Forgets every weight's derived operands (the weights changed).
    pub fn clear(&mut self) {
        self.0.get_mut().clear();
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
pub fn forward_view<'x, 'w>(
    gpu: &Gpu,
    arithmetic: Arithmetic<'_>,
    out: &mut CudaViewMut<'_, f32>,
    x: impl Into<Input<'x>>,
    w: impl Into<Input<'w>>,
    in_dim: usize,
    out_dim: usize,
    accumulate: bool,
) -> Result<()> {
    let x = x.into();
    let rows = x.values.len() / in_dim;
    assert_eq!(x.values.len(), rows * in_dim, "matmul input shape");
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
pub fn forward<'x, 'w>(
    gpu: &Gpu,
    arithmetic: Arithmetic<'_>,
    out: &mut CudaSlice<f32>,
    x: impl Into<Input<'x>>,
    w: impl Into<Input<'w>>,
    in_dim: usize,
    out_dim: usize,
) -> Result<()> {
    forward_view(
        gpu,
        arithmetic,
        &mut out.slice_mut(..),
        x,
        w,
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
///
/// [`Arithmetic::Fp8`] takes the operands' roles from that pattern, the
/// only three a linear layer has: `b` is the weight unless `a` is
/// transposed (see [`gemm_fp8`]).
#[allow(clippy::too_many_arguments)]
pub fn gemm<'a, 'b>(
    gpu: &Gpu,
    arithmetic: Arithmetic<'_>,
    c: &mut CudaViewMut<'_, f32>,
    a: impl Into<Input<'a>>,
    a_transposed: bool,
    b: impl Into<Input<'b>>,
    b_transposed: bool,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) -> Result<()> {
    let (a, b) = (a.into(), b.into());
    assert!(
        a.values.len() == m * k && b.values.len() == k * n && c.len() == m * n,
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
    if arithmetic.is_fp8() {
        return gemm_fp8(
            gpu,
            arithmetic,
            c,
            &a,
            a_transposed,
            &b,
            b_transposed,
            (m, n, k),
            accumulate,
        );
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
    plan_matmul(gpu, Arithmetic::Tf32, &cfg, b.view.into(), a.view.into(), c)
}

/// Runs `cfg` (cudarc's description of an f32 GEMM) through a cached plan
/// ([`lt_plan`]): cuBLASLt's A is `a`, its B is `b`, as in `cfg`. In bf16
/// an operand without its rounding ([`Input`]) has its whole view rounded
/// into a scratch copy of the same layout (strides and leading dimensions
/// unchanged), freed in stream order.
fn plan_matmul(
    gpu: &Gpu,
    arithmetic: Arithmetic<'_>,
    cfg: &MatmulConfig,
    a: Input<'_>,
    b: Input<'_>,
    c: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let shape = lt_plan::Shape {
        operands: match arithmetic {
            Arithmetic::Tf32 => lt_plan::Operands::F32,
            Arithmetic::Bf16 => lt_plan::Operands::Bf16,
            Arithmetic::Fp8 | Arithmetic::Fp8Delayed(..) => {
                unreachable!("FP8 GEMMs go through gemm_fp8")
            }
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
    let bf16 = arithmetic == Arithmetic::Bf16;
    let (a_copy, b_copy) = (
        a.copy_unless_rounded(gpu, bf16)?,
        b.copy_unless_rounded(gpu, bf16)?,
    );
    // A copy is rounded on the main stream and freed there at once: a lane
    // (super::lanes) could read it before it is made or after it is reused.
    assert!(
        !(gpu.on_lane() && (a_copy.is_some() || b_copy.is_some())),
        "a GEMM on an expert lane must be given operands rounded before the fan-out"
    );
    let (a_ptr, _a) = a.device_ptr(a_copy.as_ref(), bf16, stream);
    let (b_ptr, _b) = b.device_ptr(b_copy.as_ref(), bf16, stream);
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

/// The rows of an FP8 GEMM operand are padded to a multiple of this: every
/// row of its 1×128 scales then starts 64-byte aligned, and M and N are
/// multiples of 16 (the shapes the block-scaled GEMM was measured on; what
/// cuBLASLt requires of them is not documented, and zero rows are harmless).
pub(crate) const FP8_ROWS: usize = 16;

/// [`gemm`] in FP8, DeepSeek-V3's blockwise recipe as the CPU's
/// [`crate::fp8::gemm`] runs it: both operands quantised along K from their
/// f32 values, written K-major (what cuBLASLt's FP8 GEMM reads) —
/// `op(a)` in 1×128 tiles; `op(b)` in 128×128 blocks when it is a weight
/// (the forward `x @ wᵀ` and the input gradient `dy @ w`, where `a` is
/// stored as is), in 1×128 tiles when it is an activation (the weight
/// gradient `dyᵀ @ x`, the only pattern with `a` transposed, whose K runs
/// over the tokens: the CPU's 128×1 tiles) — then cuBLASLt's block-scaled
/// GEMM. K is padded with zero codes to whole 128-wide slices (cuBLASLt's
/// FP8 operands want 16-byte aligned columns; a zero adds nothing), and
/// each operand's rows to a multiple of [`FP8_ROWS`] (zero rows). The
/// result is written straight into `c` when it overwrites 16-byte aligned
/// rows and needs no padding, else into an aligned scratch moved or added
/// into `c`.
#[allow(clippy::too_many_arguments)]
fn gemm_fp8(
    gpu: &Gpu,
    arithmetic: Arithmetic<'_>,
    c: &mut CudaViewMut<'_, f32>,
    a: &Input<'_>,
    a_transposed: bool,
    b: &Input<'_>,
    b_transposed: bool,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) -> Result<()> {
    assert!(
        !(a_transposed && b_transposed),
        "an FP8 GEMM is a linear layer's forward, input or weight gradient; none has both operands transposed"
    );
    assert!(
        !gpu.on_lane(),
        "FP8 GEMMs quantise on the main stream: they never run on an expert lane"
    );
    let stride = k.next_multiple_of(TILE);
    let (m16, n16) = (m.next_multiple_of(FP8_ROWS), n.next_multiple_of(FP8_ROWS));
    // The roles of `a` and `b`, from the pattern: forward `x @ wᵀ`, input
    // gradient `dy @ w`, weight gradient `dyᵀ @ x`.
    let (a_role, b_role) = match (a_transposed, b_transposed) {
        (false, true) => (Role::Input, Role::Weight),
        (false, false) => (Role::GradOutput, Role::Weight),
        (true, _) => (Role::GradOutput, Role::Input),
    };
    let b_tile = if a_transposed {
        TileShape::ROW
    } else {
        TileShape::BLOCK
    };
    let (a_scaling, b_scaling, scales) = match arithmetic {
        Arithmetic::Fp8Delayed(scales, linear) => (
            Fp8Scaling::Delayed(linear, a_role),
            Fp8Scaling::Delayed(linear, b_role),
            Some(scales),
        ),
        _ => (
            Fp8Scaling::Tiles(TileShape::ROW),
            Fp8Scaling::Tiles(b_tile),
            None,
        ),
    };
    let a8 = a.quantized(
        gpu,
        fp8::Operand {
            rows: m,
            cols: k,
            transposed: a_transposed,
            stride,
            padded_rows: m16,
        },
        a_scaling,
        scales,
    )?;
    let b8 = b.quantized(
        gpu,
        fp8::Operand {
            rows: n,
            cols: k,
            transposed: !b_transposed,
            stride,
            padded_rows: n16,
        },
        b_scaling,
        scales,
    )?;
    let aligned = {
        let (ptr, _record) = c.device_ptr_mut(gpu.stream());
        ptr % 16 == 0
    };
    if aligned && (m16, n16) == (m, n) && !accumulate {
        return fp8_gemm::gemm_abt_into(gpu, c, n, &a8, &b8);
    }
    let mut scratch = gpu.output::<f32>(m16 * n16)?;
    fp8_gemm::gemm_abt_into(gpu, &mut scratch, n16, &a8, &b8)?;
    fp8::unpad_rows(gpu, c, &scratch, (m, n, n16), accumulate)
}
