//! f32 GEMMs through cuBLASLt with their plans cached: descriptors, layouts
//! and the heuristic's algorithm made once per shape, then reused. cudarc's
//! safe `matmul` builds all of them and asks the heuristic on every call
//! (tens of µs of host time), which is longer than an expert's GEMM runs
//! on an H200 (2048 × 512 × 2048 in ~15 µs): a training step issuing
//! thousands of them was bound by the host. For f32 operands the same
//! compute type (TF32) and the same first heuristic choice as cudarc's
//! path, so the same results; bf16 operands (the `compute: bf16` GEMMs)
//! multiply on bf16 tensor cores with f32 accumulation, output f32.

use super::{Gpu, GpuError, Result};
use moe_kernels::cudarc::cublaslt::{MatmulShared, result, sys};
use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of;
use std::sync::{Arc, Mutex};

/// The element type of a GEMM's A and B (C is always f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operands {
    /// f32, multiplied as TF32.
    F32,
    /// bf16, exact products, f32 accumulation.
    Bf16,
}

/// Everything that decides a plan: column-major `C[m, n] = op(A) op(B)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    pub operands: Operands,
    pub transa: bool,
    pub transb: bool,
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub lda: i64,
    pub ldb: i64,
    pub ldc: i64,
    /// `(count, stride_a, stride_b, stride_c)` for a strided batch.
    pub batch: Option<(i32, i64, i64, i64)>,
}

/// A shape's descriptors and algorithm. cuBLASLt only reads them in
/// `cublasLtMatmul`, so one plan serves any number of calls.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

// SAFETY: the handles are host-side descriptors, never mutated after the
// plan is built; cuBLASLt allows concurrent reads of them.
unsafe impl Send for Plan {}
unsafe impl Sync for Plan {}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each handle was created by cuBLASLt and is destroyed once.
        unsafe {
            for layout in [self.a, self.b, self.c] {
                if !layout.is_null() {
                    let _ = result::destroy_matrix_layout(layout);
                }
            }
            if !self.desc.is_null() {
                let _ = result::destroy_matmul_desc(self.desc);
            }
        }
    }
}

/// The alignment in bytes of a GEMM's A, B and C (= D) pointers, up to 256.
type Alignment = [u32; 3];

/// The plans made so far on one device, by shape and pointer alignment.
#[derive(Default)]
pub struct Plans(Mutex<HashMap<(Shape, Alignment), Arc<Plan>>>);

/// At most this many plans are kept. An expert's row count changes from
/// step to step, so over a long run the distinct shapes keep coming; when
/// the cache is full it starts over (a miss costs what every call cost
/// before plans were cached).
const MAX_PLANS: usize = 4096;

impl Plans {
    fn get(&self, gpu: &Gpu, shape: Shape, alignment: Alignment) -> Result<Arc<Plan>> {
        let mut plans = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(plan) = plans.get(&(shape, alignment)) {
            return Ok(plan.clone());
        }
        if plans.len() >= MAX_PLANS {
            plans.clear();
        }
        let plan = Arc::new(make_plan(gpu, shape, alignment)?);
        plans.insert((shape, alignment), plan.clone());
        Ok(plan)
    }
}

/// The largest power of two up to 256 dividing a device address: what
/// cuBLASLt may assume of a buffer (an expert's rows or a view into a
/// larger tensor start wherever they start).
pub(crate) fn alignment(address: u64) -> u32 {
    1 << address.trailing_zeros().min(8)
}

/// Tells the heuristic how A, B and C (= D) are aligned. By default it
/// assumes 256 bytes and may pick an algorithm that needs them; a view
/// starting elsewhere must exclude those.
///
/// # Safety
/// `pref` is a live preference descriptor.
pub(crate) unsafe fn set_alignments(
    pref: sys::cublasLtMatmulPreference_t,
    [a, b, c]: Alignment,
) -> Result<()> {
    use sys::cublasLtMatmulPreferenceAttributes_t as Pref;
    for (attribute, bytes) in [
        (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, a),
        (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, b),
        (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, c),
        (Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, c),
    ] {
        // SAFETY: the alignment attributes take a uint32 byte count.
        unsafe {
            result::set_matmul_pref_attribute(
                pref,
                attribute,
                (&bytes as *const u32).cast(),
                size_of::<u32>(),
            )
        }?;
    }
    Ok(())
}

fn layout(
    data_type: sys::cudaDataType_t,
    rows: u64,
    cols: u64,
    ld: i64,
    batch: Option<(i32, i64)>,
) -> Result<sys::cublasLtMatrixLayout_t> {
    let layout = result::create_matrix_layout(data_type, rows, cols, ld)?;
    if let Some((count, stride)) = batch {
        use sys::cublasLtMatrixLayoutAttribute_t as Attr;
        // SAFETY: the attributes take an int32 count and an int64 stride.
        unsafe {
            result::set_matrix_layout_attribute(
                layout,
                Attr::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                (&count as *const i32).cast(),
                size_of::<i32>(),
            )?;
            result::set_matrix_layout_attribute(
                layout,
                Attr::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                (&stride as *const i64).cast(),
                size_of::<i64>(),
            )?;
        }
    }
    Ok(layout)
}

fn make_plan(gpu: &Gpu, s: Shape, alignment: Alignment) -> Result<Plan> {
    let (a_rows, a_cols) = if s.transa { (s.k, s.m) } else { (s.m, s.k) };
    let (b_rows, b_cols) = if s.transb { (s.n, s.k) } else { (s.k, s.n) };
    use sys::cublasComputeType_t::{CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32};
    use sys::cudaDataType_t::{CUDA_R_16BF, CUDA_R_32F};
    let (compute, operand_type) = match s.operands {
        Operands::F32 => (CUBLAS_COMPUTE_32F_FAST_TF32, CUDA_R_32F),
        Operands::Bf16 => (CUBLAS_COMPUTE_32F, CUDA_R_16BF),
    };
    let mut plan = Plan {
        desc: result::create_matmul_desc(compute, CUDA_R_32F)?,
        a: std::ptr::null_mut(),
        b: std::ptr::null_mut(),
        c: std::ptr::null_mut(),
        // SAFETY: a plain C struct of integers, filled in by the heuristic below.
        algo: unsafe { std::mem::zeroed() },
    };
    let batch = |pick: fn((i32, i64, i64, i64)) -> i64| s.batch.map(|b| (b.0, pick(b)));
    plan.a = layout(operand_type, a_rows, a_cols, s.lda, batch(|b| b.1))?;
    plan.b = layout(operand_type, b_rows, b_cols, s.ldb, batch(|b| b.2))?;
    plan.c = layout(CUDA_R_32F, s.m, s.n, s.ldc, batch(|b| b.3))?;
    use sys::cublasLtMatmulDescAttributes_t as Attr;
    // SAFETY: cublasOperation_t is an int32 (N = 0, T = 1).
    unsafe {
        for (attr, trans) in [
            (Attr::CUBLASLT_MATMUL_DESC_TRANSA, s.transa),
            (Attr::CUBLASLT_MATMUL_DESC_TRANSB, s.transb),
        ] {
            let op = i32::from(trans);
            result::set_matmul_desc_attribute(
                plan.desc,
                attr,
                (&op as *const i32).cast(),
                size_of::<i32>(),
            )?;
        }
    }
    let pref = result::create_matmul_pref()?;
    let workspace_bytes = gpu.workspace()?.len() as u64;
    let handle = *gpu.blas()?.handle();
    // SAFETY: every descriptor is live; the preference takes a u64 byte count.
    let heuristic = unsafe {
        let set = result::set_matmul_pref_attribute(
            pref,
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            (&workspace_bytes as *const u64).cast(),
            size_of::<u64>(),
        )
        .map_err(GpuError::from)
        .and_then(|()| set_alignments(pref, alignment));
        let heuristic = set.and_then(|()| {
            result::get_matmul_algo_heuristic(
                handle, plan.desc, plan.a, plan.b, plan.c, plan.c, pref,
            )
            .map_err(GpuError::from)
        });
        let _ = result::destroy_matmul_pref(pref);
        heuristic
    }?;
    plan.algo = heuristic.algo;
    Ok(plan)
}

/// `C = A B (+ C)` for `shape`, through its cached plan.
///
/// # Safety
/// The pointers are device addresses of buffers of `shape.operands` (A, B)
/// and f32 (C) at least as large as `shape` describes, live until the
/// stream has run the GEMM.
pub unsafe fn matmul(
    gpu: &Gpu,
    shape: Shape,
    a: *const c_void,
    b: *const c_void,
    c: *mut c_void,
    accumulate: bool,
) -> Result<()> {
    let alignment = [a as u64, b as u64, c as u64].map(alignment);
    let plan = gpu.plans().get(gpu, shape, alignment)?;
    let handle = *gpu.blas()?.handle();
    // The main stream, or this thread's lane inside a fan-out (super::lanes).
    let (stream, workspace) = gpu.gemm_target()?;
    let (w, _w) = moe_kernels::cudarc::driver::DevicePtr::device_ptr(workspace, gpu.stream());
    let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
    // SAFETY: the plan's descriptors are live and describe the buffers the
    // caller passes (checked by its shape assertions); beta = 0 never reads C.
    unsafe {
        result::matmul(
            handle,
            plan.desc,
            (&alpha as *const f32).cast(),
            (&beta as *const f32).cast(),
            a,
            plan.a,
            b,
            plan.b,
            c as *const c_void,
            plan.c,
            c,
            plan.c,
            &plan.algo,
            w as *mut c_void,
            workspace.len(),
            stream as sys::cudaStream_t,
        )?;
    }
    Ok(())
}

/// Destroys cuBLASLt descriptors when the call ends, also on errors.
pub(crate) struct Descriptors {
    pub desc: sys::cublasLtMatmulDesc_t,
    pub layouts: Vec<sys::cublasLtMatrixLayout_t>,
    pub pref: sys::cublasLtMatmulPreference_t,
}

impl Drop for Descriptors {
    fn drop(&mut self) {
        // SAFETY: each handle was created by cuBLASLt and is destroyed once.
        unsafe {
            for &layout in &self.layouts {
                let _ = result::destroy_matrix_layout(layout);
            }
            if !self.pref.is_null() {
                let _ = result::destroy_matmul_pref(self.pref);
            }
            if !self.desc.is_null() {
                let _ = result::destroy_matmul_desc(self.desc);
            }
        }
    }
}
