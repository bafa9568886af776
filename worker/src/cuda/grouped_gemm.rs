//! Many GEMMs of different shapes in one cuBLASLt call: the grouped GEMM
//! that cuBLASLt gained in CUDA 13.x, whose shapes, leading dimensions
//! and matrix addresses it reads from device arrays. The routed experts'
//! GEMMs use it ([`super::expert_grouped`]): one launch for every expert's
//! gate and up projections instead of two per expert, so a layer's small
//! per-expert GEMMs (an expert of 512 columns fills half an H200's SMs)
//! run side by side, and the host issues a handful of calls per layer
//! where it issued hundreds.
//!
//! Availability is decided at run time ([`decide`]): the grouped layouts
//! exist from cuBLASLt 13.1, but on Hopper cuBLASLt has grouped algorithms
//! for bf16 only from 13.4 (13.3 on Blackwell; Transformer Engine gates
//! its grouped GEMM the same way). Older libraries and other GPUs keep the
//! per-expert loop, which is also the reference the GPU checks hold this
//! path to. Until a GPU run has passed those checks the path is opt-in:
//! `MOE_CUDA_GROUPED_GEMM=1` ([`enabled`]).
//!
//! Conventions as [`super::matmul::gemm`]: row-major `c[m, n] (+)= op_a(a)
//! @ op_b(b)`, which cuBLASLt (column-major) computes as `cᵀ = op(b)ᵀ
//! op(a)ᵀ`: its A is our `b`, its B our `a`, its (M, N, K) our (n, m, k).

use super::{Gpu, GpuError, Result};
use moe_kernels::cudarc::cublaslt::{MatmulShared, result, sys};
use moe_kernels::cudarc::driver::DevicePtr;
use std::ffi::{c_int, c_void};
use std::mem::size_of;

/// The worker's environment variable that turns the grouped path on
/// (`1`, `on`, `true`) where the library runs it.
pub const ENABLE_VAR: &str = "MOE_CUDA_GROUPED_GEMM";

/// Whether `value` (the environment variable's) turns the grouped path on;
/// anything but the words for on and off is an error naming it.
pub fn enabled(value: Option<&str>) -> std::result::Result<bool, String> {
    match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        None | Some("" | "0" | "off" | "false") => Ok(false),
        Some("1" | "on" | "true") => Ok(true),
        Some(other) => Err(format!(
            "{ENABLE_VAR}={other}: expected 1 (grouped expert GEMMs where cuBLASLt runs them) or 0"
        )),
    }
}

/// One GEMM of a group, row-major: `c[m, n] (+)= op_a(a)[m, k] @ op_b(b)[k, n]`,
/// the operands contiguous (leading dimension = their row length) at these
/// device addresses: `a` and `b` bf16, `c` f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Problem {
    pub c: u64,
    pub a: u64,
    pub b: u64,
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// Whether this library and GPU run grouped GEMMs: `Err` says why not.
/// `arch` is the kernels' target (`sm_90a`), `version` cuBLASLt's
/// (`major * 10000 + minor * 100 + patch`).
pub fn decide(arch: &str, version: usize) -> std::result::Result<(), String> {
    let sm: usize = arch
        .trim_start_matches("sm_")
        .trim_end_matches(|c: char| c.is_ascii_alphabetic())
        .parse()
        .map_err(|_| format!("unknown architecture {arch}"))?;
    if !(90..=110).contains(&sm) {
        return Err(format!(
            "{arch}: cuBLASLt's grouped GEMM runs on Hopper and Blackwell (sm_90 to sm_110)"
        ));
    }
    let first = if sm < 100 { 130_400 } else { 130_300 };
    if version < first {
        return Err(format!(
            "cuBLASLt {} has no grouped bf16 GEMM on {arch} (from {})",
            version_string(version),
            version_string(first)
        ));
    }
    Ok(())
}

/// `130402` as `13.4.2`.
pub fn version_string(version: usize) -> String {
    format!(
        "{}.{}.{}",
        version / 10_000,
        version / 100 % 100,
        version % 100
    )
}

/// The entry points cudarc's CUDA 13.0 bindings lack, found in the loaded
/// cuBLASLt: the grouped layout's constructor, and the layout and
/// preference setters taking the grouped attributes (numbers those
/// bindings' enums have no variant for), declared with plain integers.
pub struct GroupedLt {
    create_layout: CreateLayout,
    set_layout: SetAttribute<sys::cublasLtMatrixLayout_t>,
    set_preference: SetAttribute<sys::cublasLtMatmulPreference_t>,
    version: usize,
}

type CreateLayout = unsafe extern "C" fn(
    *mut sys::cublasLtMatrixLayout_t,
    u32,
    c_int,
    *const c_void,
    *const c_void,
    *const c_void,
) -> u32;
type SetAttribute<Descriptor> = unsafe extern "C" fn(Descriptor, u32, *const c_void, usize) -> u32;

/// cuBLASLt 13.x's `cublasLtMatrixLayoutAttribute_t` for grouped layouts:
/// the integer width of the rows and columns arrays and of the leading
/// dimensions array. Set explicitly to 32 bits (`CUBLASLT_INTEGER_WIDTH_32`
/// = 0): Transformer Engine passes int32 arrays and PyTorch int64 ones, so
/// the default is not something to rely on.
const LAYOUT_GROUPED_ROWS_COLS_INTEGER_WIDTH: u32 = 12;
const LAYOUT_GROUPED_LD_INTEGER_WIDTH: u32 = 13;
const INTEGER_WIDTH_32: u32 = 0;

/// cuBLASLt 13.x's `cublasLtMatmulPreferenceAttributes_t` for grouped GEMMs:
/// the average K, and the average rows and columns of D, which the
/// heuristic uses in place of shapes it cannot read from the device.
const PREF_GROUPED_AVERAGE_REDUCTION_DIM: u32 = 13;
const PREF_GROUPED_DESC_D_AVERAGE_ROWS: u32 = 14;
const PREF_GROUPED_DESC_D_AVERAGE_COLS: u32 = 15;

impl GroupedLt {
    /// The grouped GEMM on a GPU of `arch`, or why it is not used.
    pub fn probe(arch: &str) -> std::result::Result<Self, String> {
        // SAFETY: only called once cuBLASLt has loaded (a handle exists).
        let version = unsafe { sys::cublasLtGetVersion() };
        decide(arch, version)?;
        // SAFETY: the library is cuBLASLt; each symbol is looked up by its
        // C name and given the signature of cublasLt.h (13.1+), with enums
        // as the 32-bit integers they are.
        unsafe {
            let library = sys::culib();
            let create_layout = *library
                .get::<CreateLayout>(b"cublasLtGroupedMatrixLayoutCreate\0")
                .map_err(|e| format!("cuBLASLt lacks cublasLtGroupedMatrixLayoutCreate: {e}"))?;
            let set_layout = *library
                .get::<SetAttribute<sys::cublasLtMatrixLayout_t>>(
                    b"cublasLtMatrixLayoutSetAttribute\0",
                )
                .map_err(|e| format!("cuBLASLt lacks cublasLtMatrixLayoutSetAttribute: {e}"))?;
            let set_preference = *library
                .get::<SetAttribute<sys::cublasLtMatmulPreference_t>>(
                    b"cublasLtMatmulPreferenceSetAttribute\0",
                )
                .map_err(|e| format!("cuBLASLt lacks cublasLtMatmulPreferenceSetAttribute: {e}"))?;
            Ok(Self {
                create_layout,
                set_layout,
                set_preference,
                version,
            })
        }
    }

    pub fn version(&self) -> usize {
        self.version
    }
}

/// Where each array lies in [`Packed::bytes`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Offsets {
    pub a_ptrs: usize,
    pub b_ptrs: usize,
    pub d_ptrs: usize,
    pub a_rows: usize,
    pub a_cols: usize,
    pub b_rows: usize,
    pub b_cols: usize,
    pub d_rows: usize,
    pub d_cols: usize,
    pub alpha: usize,
    pub beta: usize,
}

/// A group of problems as cuBLASLt reads it, in one buffer (one upload):
/// the address arrays of its A, B and D (= C: in place), each 16-byte
/// aligned as cuBLASLt requires, then the int32 rows and columns of each
/// (contiguous, so each one's leading dimension is its rows), then alpha
/// and beta (one of each: Hopper takes a single scalar for the group).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Packed {
    pub bytes: Vec<u8>,
    pub at: Offsets,
    pub groups: usize,
    pub transa: bool,
    pub transb: bool,
    /// The average rows and columns of D and the average K.
    pub average: (i64, i64, i64),
}

/// The column-major description of `problems` (none empty).
pub(crate) fn pack(
    problems: &[Problem],
    a_transposed: bool,
    b_transposed: bool,
    accumulate: bool,
) -> Packed {
    let groups = problems.len();
    let mut bytes = Vec::new();
    let mut place = |values: &[u8], align: usize| {
        bytes.resize(bytes.len().next_multiple_of(align), 0);
        let at = bytes.len();
        bytes.extend_from_slice(values);
        at
    };
    let addresses = |pick: fn(&Problem) -> u64| -> Vec<u8> {
        problems
            .iter()
            .flat_map(|p| pick(p).to_ne_bytes())
            .collect()
    };
    let ints = |pick: &dyn Fn(&Problem) -> usize| -> Vec<u8> {
        problems
            .iter()
            .flat_map(|p| {
                let value = i32::try_from(pick(p)).expect("a grouped GEMM dimension exceeds i32");
                value.to_ne_bytes()
            })
            .collect()
    };
    // cuBLASLt's operands: A = our b (op T when b is stored transposed),
    // B = our a; (M, N, K) = (n, m, k). Stored column-major, op(A) is
    // M × K, so A is K × M when transposed; op(B) is K × N.
    let (transa, transb) = (b_transposed, a_transposed);
    let a_dims = move |p: &Problem| if transa { (p.k, p.n) } else { (p.n, p.k) };
    let b_dims = move |p: &Problem| if transb { (p.m, p.k) } else { (p.k, p.m) };
    let at = Offsets {
        a_ptrs: place(&addresses(|p| p.b), 16),
        b_ptrs: place(&addresses(|p| p.a), 16),
        d_ptrs: place(&addresses(|p| p.c), 16),
        a_rows: place(&ints(&|p| a_dims(p).0), 16),
        a_cols: place(&ints(&|p| a_dims(p).1), 16),
        b_rows: place(&ints(&|p| b_dims(p).0), 16),
        b_cols: place(&ints(&|p| b_dims(p).1), 16),
        d_rows: place(&ints(&|p| p.n), 16),
        d_cols: place(&ints(&|p| p.m), 16),
        alpha: place(&1.0f32.to_ne_bytes(), 16),
        beta: place(&(if accumulate { 1.0f32 } else { 0.0 }).to_ne_bytes(), 4),
    };
    let mean = |pick: fn(&Problem) -> usize| {
        let total: usize = problems.iter().map(pick).sum();
        (total.div_ceil(groups.max(1)) as i64).max(1)
    };
    Packed {
        bytes,
        at,
        groups,
        transa,
        transb,
        average: (mean(|p| p.n), mean(|p| p.m), mean(|p| p.k)),
    }
}

/// Whether every matrix of `problems` starts 16-byte aligned and has a
/// leading dimension of whole 16 bytes (bf16 `a` and `b`, f32 `c`), as
/// cuBLASLt's grouped GEMM requires.
pub(crate) fn aligned(problems: &[Problem], a_transposed: bool, b_transposed: bool) -> bool {
    problems.iter().all(|p| {
        let a_ld = if a_transposed { p.m } else { p.k };
        let b_ld = if b_transposed { p.k } else { p.n };
        [p.a, p.b, p.c].iter().all(|address| address % 16 == 0)
            && (a_ld * 2) % 16 == 0
            && (b_ld * 2) % 16 == 0
            && (p.n * 4) % 16 == 0
    })
}

fn status(code: u32, what: &str) -> Result<()> {
    if code == 0 {
        Ok(())
    } else {
        Err(GpuError::Grouped(format!(
            "{what} failed with cuBLAS status {code}"
        )))
    }
}

/// Every problem's `c (+)= op_a(a) @ op_b(b)` in one grouped bf16 GEMM
/// (f32 accumulation and output). Empty problems are dropped; a problem
/// with `k == 0` must not be given (its overwrite would need zeros).
///
/// # Safety
/// Each problem's addresses are device buffers (bf16 `a` and `b`, f32 `c`)
/// at least as large as its shape, live until the stream has run the GEMM;
/// they pass [`aligned`].
pub(crate) unsafe fn gemm_bf16(
    gpu: &Gpu,
    lt: &GroupedLt,
    problems: &[Problem],
    a_transposed: bool,
    b_transposed: bool,
    accumulate: bool,
) -> Result<()> {
    let problems: Vec<Problem> = problems
        .iter()
        .filter(|p| p.m > 0 && p.n > 0)
        .copied()
        .collect();
    if problems.is_empty() {
        return Ok(());
    }
    assert!(
        problems.iter().all(|p| p.k > 0),
        "a grouped GEMM problem with K = 0"
    );
    debug_assert!(aligned(&problems, a_transposed, b_transposed));
    let packed = pack(&problems, a_transposed, b_transposed, accumulate);
    // Freed in stream order once the GEMM that reads it has run.
    let arrays = gpu.upload(&packed.bytes)?;
    let stream = gpu.stream();
    let (base, _arrays) = arrays.device_ptr(stream);
    let at = |offset: usize| (base + offset as u64) as *const c_void;
    let groups = c_int::try_from(packed.groups).expect("group count exceeds i32");
    use sys::cudaDataType_t::{CUDA_R_16BF, CUDA_R_32F};
    // Destroyed however the call ends (cuBLASLt copies what it needs at
    // enqueue).
    let mut d = super::lt_plan::Descriptors {
        layouts: Vec::new(),
        desc: std::ptr::null_mut(),
        pref: std::ptr::null_mut(),
    };
    let o = packed.at;
    for (data_type, rows, cols) in [
        (CUDA_R_16BF, o.a_rows, o.a_cols),
        (CUDA_R_16BF, o.b_rows, o.b_cols),
        (CUDA_R_32F, o.d_rows, o.d_cols),
    ] {
        let mut layout = std::ptr::null_mut();
        // SAFETY: the arrays are int32 device arrays of `groups` entries;
        // contiguous matrices, so the leading dimensions are the rows.
        let code = unsafe {
            (lt.create_layout)(
                &mut layout,
                data_type as u32,
                groups,
                at(rows),
                at(cols),
                at(rows),
            )
        };
        status(code, "cublasLtGroupedMatrixLayoutCreate")?;
        d.layouts.push(layout);
        for attribute in [
            LAYOUT_GROUPED_ROWS_COLS_INTEGER_WIDTH,
            LAYOUT_GROUPED_LD_INTEGER_WIDTH,
        ] {
            // SAFETY: a live layout; the widths are cublasLtIntegerWidth_t, an int32.
            let code = unsafe {
                (lt.set_layout)(
                    layout,
                    attribute,
                    (&INTEGER_WIDTH_32 as *const u32).cast(),
                    size_of::<u32>(),
                )
            };
            status(code, "cublasLtMatrixLayoutSetAttribute (integer width)")?;
        }
    }
    use sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
    d.desc = result::create_matmul_desc(CUBLAS_COMPUTE_32F, CUDA_R_32F)?;
    use sys::cublasLtMatmulDescAttributes_t as Attr;
    // SAFETY: cublasOperation_t and cublasLtPointerMode_t are int32s
    // (N = 0, T = 1; DEVICE = 1: alpha and beta are read from the arrays).
    unsafe {
        for (attribute, value) in [
            (Attr::CUBLASLT_MATMUL_DESC_TRANSA, i32::from(packed.transa)),
            (Attr::CUBLASLT_MATMUL_DESC_TRANSB, i32::from(packed.transb)),
            (Attr::CUBLASLT_MATMUL_DESC_POINTER_MODE, 1),
        ] {
            result::set_matmul_desc_attribute(
                d.desc,
                attribute,
                (&value as *const i32).cast(),
                size_of::<i32>(),
            )?;
        }
    }
    d.pref = result::create_matmul_pref()?;
    let workspace = gpu.workspace()?;
    let workspace_bytes = workspace.len() as u64;
    let (rows, cols, depth) = packed.average;
    use sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES;
    // SAFETY: the workspace size is a uint64, the averages int64s.
    unsafe {
        for (attribute, value) in [
            (
                CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES as u32,
                workspace_bytes as i64,
            ),
            (PREF_GROUPED_DESC_D_AVERAGE_ROWS, rows),
            (PREF_GROUPED_DESC_D_AVERAGE_COLS, cols),
            (PREF_GROUPED_AVERAGE_REDUCTION_DIM, depth),
        ] {
            let code = (lt.set_preference)(
                d.pref,
                attribute,
                (&value as *const i64).cast(),
                size_of::<i64>(),
            );
            status(code, "cublasLtMatmulPreferenceSetAttribute")?;
        }
    }
    let handle = *gpu.blas()?.handle();
    let (a, b, c) = (d.layouts[0], d.layouts[1], d.layouts[2]);
    // SAFETY: the descriptors are live and describe the uploaded arrays.
    let heuristic =
        unsafe { result::get_matmul_algo_heuristic(handle, d.desc, a, b, c, c, d.pref) }
            .map_err(|e| GpuError::Grouped(format!("no grouped GEMM algorithm: {e}")))?;
    let (w, _w) = workspace.device_ptr(stream);
    // SAFETY: A, B and D are device arrays of addresses (the caller
    // vouches for the matrices behind them), alpha and beta device
    // scalars; C = D in place (beta = 0 never reads it).
    unsafe {
        result::matmul(
            handle,
            d.desc,
            at(o.alpha),
            at(o.beta),
            at(o.a_ptrs),
            a,
            at(o.b_ptrs),
            b,
            at(o.d_ptrs),
            c,
            at(o.d_ptrs) as *mut c_void,
            c,
            &heuristic.algo,
            w as *mut c_void,
            workspace.len(),
            stream.cu_stream() as sys::cudaStream_t,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hopper_needs_cublaslt_13_4_and_blackwell_13_3() {
        assert_eq!(decide("sm_90a", 130_400), Ok(()));
        assert_eq!(decide("sm_90a", 130_502), Ok(()));
        assert_eq!(decide("sm_100a", 130_300), Ok(()));
        let old = decide("sm_90a", 130_002).expect_err("13.0 on Hopper");
        assert!(old.contains("13.0.2") && old.contains("13.4.0"), "{old}");
        assert!(decide("sm_100a", 130_200).is_err());
        let ampere = decide("sm_80", 130_400).expect_err("Ampere");
        assert!(ampere.contains("sm_80"), "{ampere}");
        assert!(decide("gfx90a", 130_400).is_err());
    }

    #[test]
    fn the_grouped_path_is_opt_in_and_a_stray_setting_is_refused() {
        for off in [None, Some(""), Some("0"), Some("off"), Some("FALSE")] {
            assert_eq!(enabled(off), Ok(false), "{off:?}");
        }
        for on in ["1", "on", "true", " True "] {
            assert_eq!(enabled(Some(on)), Ok(true), "{on}");
        }
        let error = enabled(Some("yes please")).expect_err("not a switch");
        assert!(
            error.contains(ENABLE_VAR) && error.contains("yes please"),
            "{error}"
        );
    }

    /// cuBLASLt's documented semantics, run on the host over `memory`
    /// (addresses are byte offsets into it, 4 bytes per value: the bf16
    /// operands stand in as f32 here): for each group, column-major
    /// `D = alpha op(A) op(B) + beta C` with every matrix's leading
    /// dimension its rows, C = D.
    fn run_packed(packed: &Packed, memory: &mut [f32]) {
        let read = |at: usize, i: usize, width: usize| -> u64 {
            let start = at + i * width;
            let mut raw = [0u8; 8];
            raw[..width].copy_from_slice(&packed.bytes[start..start + width]);
            u64::from_ne_bytes(raw)
        };
        let o = packed.at;
        let scalar = |at: usize| f32::from_ne_bytes(packed.bytes[at..at + 4].try_into().unwrap());
        let (alpha, beta) = (scalar(o.alpha), scalar(o.beta));
        for g in 0..packed.groups {
            let (a, b, d) = (
                read(o.a_ptrs, g, 8) as usize / 4,
                read(o.b_ptrs, g, 8) as usize / 4,
                read(o.d_ptrs, g, 8) as usize / 4,
            );
            let dims = |at: usize| read(at, g, 4) as usize;
            let (a_rows, a_cols) = (dims(o.a_rows), dims(o.a_cols));
            let (b_rows, b_cols) = (dims(o.b_rows), dims(o.b_cols));
            let (m, n) = (dims(o.d_rows), dims(o.d_cols));
            // op(A) is M x K, op(B) K x N.
            let (op_a_rows, k) = if packed.transa {
                (a_cols, a_rows)
            } else {
                (a_rows, a_cols)
            };
            let (op_b_rows, op_b_cols) = if packed.transb {
                (b_cols, b_rows)
            } else {
                (b_rows, b_cols)
            };
            assert_eq!((op_a_rows, op_b_rows, op_b_cols), (m, k, n), "group {g}");
            let op_a = |i: usize, l: usize| {
                if packed.transa {
                    memory[a + l + i * a_rows]
                } else {
                    memory[a + i + l * a_rows]
                }
            };
            let op_b = |l: usize, j: usize| {
                if packed.transb {
                    memory[b + j + l * b_rows]
                } else {
                    memory[b + l + j * b_rows]
                }
            };
            let mut out = vec![0.0f32; m * n];
            for j in 0..n {
                for i in 0..m {
                    let sum: f32 = (0..k).map(|l| op_a(i, l) * op_b(l, j)).sum();
                    out[i + j * m] = alpha * sum + beta * memory[d + i + j * m];
                }
            }
            memory[d..d + m * n].copy_from_slice(&out);
        }
    }

    /// Row-major `c[m, n] (+)= op_a(a) @ op_b(b)`, the plain loops.
    fn reference(memory: &mut [f32], p: &Problem, a_t: bool, b_t: bool, accumulate: bool) {
        let (a, b, c) = (p.a as usize / 4, p.b as usize / 4, p.c as usize / 4);
        for i in 0..p.m {
            for j in 0..p.n {
                let sum: f32 = (0..p.k)
                    .map(|l| {
                        let x = if a_t {
                            memory[a + l * p.m + i]
                        } else {
                            memory[a + i * p.k + l]
                        };
                        let y = if b_t {
                            memory[b + j * p.k + l]
                        } else {
                            memory[b + l * p.n + j]
                        };
                        x * y
                    })
                    .sum();
                let out = &mut memory[c + i * p.n + j];
                *out = if accumulate { *out + sum } else { sum };
            }
        }
    }

    #[test]
    fn the_packed_description_is_the_row_major_gemm_of_every_problem() {
        // Uneven problems (an expert with one row, K from 1 up) in every
        // orientation the expert layers use, overwriting and adding.
        let shapes = [(1, 3, 2), (5, 2, 4), (3, 4, 1), (7, 1, 3)];
        for (a_t, b_t) in [(false, true), (false, false), (true, false)] {
            for accumulate in [false, true] {
                let mut next = 0u64;
                let mut take = |values: usize| {
                    let at = next;
                    next += (values * 4) as u64;
                    at
                };
                let problems: Vec<Problem> = shapes
                    .iter()
                    .map(|&(m, n, k)| Problem {
                        a: take(m * k),
                        b: take(k * n),
                        c: take(m * n),
                        m,
                        n,
                        k,
                    })
                    .collect();
                let values = next as usize / 4;
                let memory: Vec<f32> = (0..values)
                    .map(|i| ((i * 7919) % 23) as f32 - 11.0)
                    .collect();
                let packed = pack(&problems, a_t, b_t, accumulate);
                let mut got = memory.clone();
                run_packed(&packed, &mut got);
                let mut want = memory;
                for p in &problems {
                    reference(&mut want, p, a_t, b_t, accumulate);
                }
                assert_eq!(got, want, "a_t {a_t} b_t {b_t} accumulate {accumulate}");
            }
        }
    }

    #[test]
    fn the_arrays_are_aligned_and_the_averages_are_those_of_d_and_k() {
        let problems = [
            Problem {
                c: 0,
                a: 0,
                b: 0,
                m: 3,
                n: 8,
                k: 10,
            },
            Problem {
                c: 0,
                a: 0,
                b: 0,
                m: 6,
                n: 8,
                k: 20,
            },
        ];
        let packed = pack(&problems, false, true, false);
        let o = packed.at;
        for at in [o.a_ptrs, o.b_ptrs, o.d_ptrs, o.a_rows, o.b_rows, o.d_rows] {
            assert_eq!(at % 16, 0);
        }
        // D is cuBLASLt's n x m: rows n = 8, columns the mean m = 4.5 -> 5.
        assert_eq!(packed.average, (8, 5, 15));
        assert_eq!((packed.transa, packed.transb), (true, false));
        assert_eq!(
            f32::from_ne_bytes(packed.bytes[o.beta..o.beta + 4].try_into().unwrap()),
            0.0
        );
    }

    #[test]
    fn misaligned_matrices_are_refused() {
        let p = Problem {
            c: 256,
            a: 512,
            b: 1024,
            m: 4,
            n: 8,
            k: 16,
        };
        assert!(aligned(&[p], false, true));
        assert!(!aligned(&[Problem { a: 514, ..p }], false, true));
        // A bf16 row of 12 values is 24 bytes: not whole 16 bytes.
        assert!(!aligned(&[Problem { k: 12, ..p }], false, true));
        assert!(!aligned(&[Problem { n: 6, ..p }], false, false));
    }
}
