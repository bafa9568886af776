//! The fast FP8 GEMM: cuBLASLt's block-scaled E4M3 matmul on Hopper (CUDA
//! 12.9+), DeepSeek-V3's recipe — activations with one f32 scale per 1×128
//! tile (`VEC128_32F`), weights with one per 128×128 block
//! (`BLK128x128_32F`), f32 accumulation. cudarc's safe cuBLASLt API covers
//! only f32/f16/bf16, so this drives the `result`/`sys` layer directly.
//!
//! Numerics reference: [`super::fp8::gemm_abt`] (same quantised operands,
//! CUDA cores), itself checked against the CPU emulation.
//!
//! Layout, in cuBLASLt's column-major terms for row-major
//! `out[rows, n] = x[rows, k] @ w[n, k]^T`: A = `w` read transposed
//! (m = n, the "TN" form FP8 requires), B = `x`, D = `out`. Both operands'
//! scales in [`ScaleLayout::Cublaslt`]: the weight's `[n / 128, k / 128]`
//! row-major with rows padded to 4 K blocks, the activation's one row per K
//! slice, `[k / 128, rows]`.
//!
//! The same call serves the three GEMMs of an FP8 linear layer
//! ([`super::matmul`] with `Arithmetic::Fp8`): `w` is a weight in 128×128
//! blocks for the forward and input-gradient GEMMs, and an activation in
//! 1×128 tiles (`VEC128` on both operands, DeepSeek-V3's 1×128 × 1×128
//! recipe) for the weight gradient, whose K runs over the tokens. With the
//! tensorwise recipe both operands carry one scale each
//! ([`ScaleLayout::Tensor`]) and the GEMM takes them as scalars
//! (`SCALAR_32F`), the codes laid out as for the blockwise one.

use super::fp8::{DeviceFp8, ScaleLayout};
use super::{Gpu, GpuError, Result, lt_plan};
use crate::fp8::quantize::TileShape;
use half::bf16;
use moe_kernels::cudarc::cublaslt::{MatmulShared, result, sys};
use moe_kernels::cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr};
use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of;
use std::sync::Mutex;

/// An output element type cuBLASLt can write from an FP8 GEMM.
pub trait Fp8Output: DeviceRepr {
    const DATA_TYPE: sys::cudaDataType_t;
}

impl Fp8Output for f32 {
    const DATA_TYPE: sys::cudaDataType_t = sys::cudaDataType_t::CUDA_R_32F;
}

impl Fp8Output for bf16 {
    const DATA_TYPE: sys::cudaDataType_t = sys::cudaDataType_t::CUDA_R_16BF;
}

/// What decides an FP8 GEMM's algorithm: its shape, scale modes, output
/// type and how its code and output pointers are aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct AlgoKey {
    m: u64,
    n: u64,
    k: u64,
    ld: usize,
    /// cuBLASLt's scale modes of A and B.
    modes: (i32, i32),
    output: u32,
    alignment: [u32; 3],
}

/// The heuristic's algorithm for each FP8 GEMM made so far on one device:
/// asking costs tens of µs of host time, longer than an expert's GEMM runs
/// (the f32 and bf16 GEMMs cache whole plans, [`lt_plan`]; an FP8 GEMM's
/// descriptor carries its operands' scale pointers, so only the algorithm
/// is kept and the cheap descriptors are made per call).
#[derive(Default)]
pub struct Fp8Algos(Mutex<HashMap<AlgoKey, sys::cublasLtMatmulAlgo_t>>);

impl Fp8Algos {
    fn get(&self, key: AlgoKey) -> Option<sys::cublasLtMatmulAlgo_t> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .copied()
    }

    fn insert(&self, key: AlgoKey, algo: sys::cublasLtMatmulAlgo_t) {
        let mut algos = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Expert row counts change from step to step: start over when full.
        if algos.len() >= 4096 {
            algos.clear();
        }
        algos.insert(key, algo);
    }
}

unsafe fn set_desc<T>(
    desc: sys::cublasLtMatmulDesc_t,
    attribute: sys::cublasLtMatmulDescAttributes_t,
    value: &T,
) -> Result<()> {
    // SAFETY: `value` lives for the call and has the attribute's size.
    unsafe {
        result::set_matmul_desc_attribute(
            desc,
            attribute,
            (value as *const T).cast::<c_void>(),
            size_of::<T>(),
        )
    }?;
    Ok(())
}

/// `out[rows, n] = x[rows, k] @ w[n, k]^T` from FP8 operands: `x` quantised
/// 1×128 with outer-major scales, `w` quantised 128×128.
pub fn gemm_abt<O: Fp8Output>(
    gpu: &Gpu,
    out: &mut CudaSlice<O>,
    x: &DeviceFp8,
    w: &DeviceFp8,
) -> Result<()> {
    gemm_abt_into(gpu, out, w.padded_rows, x, w)
}

/// [`gemm_abt`] into `out` with `ld` values per row (`ld >= w.padded_rows`,
/// a multiple of 4 for f32: cuBLASLt wants 16-byte aligned columns), `x`
/// in 1×128 tiles, `w` in 128×128 blocks or 1×128 tiles, both with
/// cuBLASLt's scale layout and the same code stride (K padded to 128-wide
/// slices). The operands' padded rows count: `out` is `[x.padded_rows, ld]`.
pub fn gemm_abt_into<O: Fp8Output, D: DevicePtrMut<O>>(
    gpu: &Gpu,
    out: &mut D,
    ld: usize,
    x: &DeviceFp8,
    w: &DeviceFp8,
) -> Result<()> {
    let tensorwise = x.layout == ScaleLayout::Tensor && w.layout == ScaleLayout::Tensor;
    assert!(
        tensorwise
            || (x.tile == TileShape::ROW
                && (w.tile == TileShape::BLOCK || w.tile == TileShape::ROW)
                && x.layout == ScaleLayout::Cublaslt
                && w.layout == ScaleLayout::Cublaslt),
        "cuBLASLt FP8 operands: both with one tensor scale, or x 1x128 and w 128x128 or 1x128 with cuBLASLt's scale layout"
    );
    assert!(
        x.cols == w.cols
            && x.stride == w.stride
            && ld >= w.padded_rows
            && (x.padded_rows == 0 || out.len() >= (x.padded_rows - 1) * ld + w.padded_rows),
        "fp8 GEMM shapes"
    );
    let (m, n, k) = (w.padded_rows as u64, x.padded_rows as u64, x.stride as u64);
    if m == 0 || n == 0 {
        return Ok(());
    }
    let blas = gpu.blas()?;
    let workspace = gpu.workspace()?;
    let stream = gpu.stream();
    let (a_ptr, _a) = w.codes.device_ptr(stream);
    let (b_ptr, _b) = x.codes.device_ptr(stream);
    let (a_scale, _as) = w.scales.device_ptr(stream);
    let (b_scale, _bs) = x.scales.device_ptr(stream);
    let (d_ptr, _d) = out.device_ptr_mut(stream);
    let (w_ptr, _w) = workspace.device_ptr(stream);
    let workspace_bytes = workspace.len();

    let mut descriptors = lt_plan::Descriptors {
        desc: result::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )?,
        layouts: Vec::new(),
        pref: std::ptr::null_mut(),
    };
    use sys::cublasLtMatmulDescAttributes_t as Attr;
    use sys::cublasLtMatmulMatrixScale_t as Mode;
    let desc = descriptors.desc;
    let modes = if tensorwise {
        let scalar = Mode::CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F as i32;
        (scalar, scalar)
    } else {
        let vec128 = Mode::CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F as i32;
        let a_mode = if w.tile == TileShape::BLOCK {
            Mode::CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F as i32
        } else {
            vec128
        };
        (a_mode, vec128)
    };
    // SAFETY: attribute values have the types cuBLASLt documents (int32
    // enums, device pointers); the pointers outlive the call.
    unsafe {
        // cublasOperation_t: CUBLAS_OP_N = 0, CUBLAS_OP_T = 1.
        set_desc(desc, Attr::CUBLASLT_MATMUL_DESC_TRANSA, &1i32)?;
        set_desc(desc, Attr::CUBLASLT_MATMUL_DESC_TRANSB, &0i32)?;
        set_desc(desc, Attr::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &modes.0)?;
        set_desc(desc, Attr::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &modes.1)?;
        set_desc(
            desc,
            Attr::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
            &(a_scale as *const c_void),
        )?;
        set_desc(
            desc,
            Attr::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
            &(b_scale as *const c_void),
        )?;
    }
    let e4m3 = sys::cudaDataType_t::CUDA_R_8F_E4M3;
    let a_layout = result::create_matrix_layout(e4m3, k, m, k as i64)?;
    descriptors.layouts.push(a_layout);
    let b_layout = result::create_matrix_layout(e4m3, k, n, k as i64)?;
    descriptors.layouts.push(b_layout);
    let d_layout = result::create_matrix_layout(O::DATA_TYPE, m, n, ld as i64)?;
    descriptors.layouts.push(d_layout);
    let handle = *blas.handle();
    let key = AlgoKey {
        m,
        n,
        k,
        ld,
        modes,
        output: O::DATA_TYPE as u32,
        alignment: [a_ptr, b_ptr, d_ptr].map(lt_plan::alignment),
    };
    let cached = gpu.fp8_algos().get(key);
    let algo = match cached {
        Some(algo) => algo,
        None => {
            descriptors.pref = result::create_matmul_pref()?;
            let bytes = workspace_bytes as u64;
            // SAFETY: every descriptor is live; the preference takes a u64
            // byte count and the alignments.
            let heuristic = unsafe {
                result::set_matmul_pref_attribute(
                    descriptors.pref,
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    (&bytes as *const u64).cast::<c_void>(),
                    size_of::<u64>(),
                )?;
                lt_plan::set_alignments(descriptors.pref, key.alignment)?;
                result::get_matmul_algo_heuristic(
                    handle,
                    desc,
                    a_layout,
                    b_layout,
                    d_layout,
                    d_layout,
                    descriptors.pref,
                )
                .map_err(GpuError::from)?
            };
            gpu.fp8_algos().insert(key, heuristic.algo);
            heuristic.algo
        }
    };
    // SAFETY: every descriptor is live; buffers are device allocations of
    // the sizes the layouts describe; beta = 0 so C is never read.
    unsafe {
        let (alpha, beta) = (1.0f32, 0.0f32);
        result::matmul(
            handle,
            desc,
            (&alpha as *const f32).cast(),
            (&beta as *const f32).cast(),
            a_ptr as *const c_void,
            a_layout,
            b_ptr as *const c_void,
            b_layout,
            d_ptr as *const c_void,
            d_layout,
            d_ptr as *mut c_void,
            d_layout,
            &algo,
            w_ptr as *mut c_void,
            workspace_bytes,
            stream.cu_stream() as sys::cudaStream_t,
        )?;
    }
    Ok(())
}
