//! The routed experts' projections, each one cuBLASLt grouped GEMM over
//! every expert ([`super::grouped_gemm`]), in bf16:
//! [`super::moe_layer::expert_mlps`] and its backward call these in place
//! of their per-expert loops when the library runs them ([`usable`]), on
//! the same operands — the same bf16 roundings, f32 accumulation — so only
//! the order of the f32 sums can differ.
//!
//! A layer's forward is two calls (gate and up together, then down) and
//! its backward five, where the per-expert loop issues three GEMMs per
//! expert forward and six backward (192 and 384 at 64 experts).

use super::grouped_gemm::{self, GroupedLt, Problem};
use super::matmul::{Arithmetic, Derived, Prepared};
use super::{Gpu, Result};
use crate::moe::config::MoeConfig;
use moe_kernels::cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

/// Bytes per operand value (bf16) and per output value (f32).
const OPERAND: u64 = 2;
const OUTPUT: u64 = 4;

/// The grouped GEMM, when the routed experts of `c` in `arithmetic` can
/// use it: bf16 operands (cuBLASLt groups neither TF32 nor our FP8
/// layouts), rows of whole 16 bytes (hidden and expert widths multiples
/// of 8), and a library and GPU that run it.
pub(crate) fn usable<'g>(
    gpu: &'g Gpu,
    arithmetic: Arithmetic<'_>,
    c: &MoeConfig,
) -> Option<&'g GroupedLt> {
    if arithmetic != Arithmetic::Bf16
        || !c.hidden.is_multiple_of(8)
        || !c.expert_hidden.is_multiple_of(8)
    {
        return None;
    }
    gpu.grouped_gemm().ok()
}

/// Where a segment's problem lies: offsets in values from the bases of
/// `c`, `a` and `b`, and its `(m, n, k)`.
type Place = ([usize; 3], (usize, usize, usize));

/// Where each projection's GEMM for expert `e`'s rows `start..start + len`
/// lies, for rows of `hidden` values and experts `inner` wide: activations
/// and their gradients are `[rows, width]`, the weights `[experts, inner,
/// hidden]` (w1, w3) and `[experts, hidden, inner]` (w2), as stored.
#[derive(Clone, Copy)]
struct Places {
    hidden: usize,
    inner: usize,
}

impl Places {
    fn of(c: &MoeConfig) -> Self {
        Self {
            hidden: c.hidden,
            inner: c.expert_hidden,
        }
    }

    /// `a|b[rows] = x[rows] @ w1|w3[e]ᵀ`.
    fn gate_up(self, e: usize, start: usize, len: usize) -> Place {
        let Self { hidden, inner } = self;
        (
            [start * inner, start * hidden, e * inner * hidden],
            (len, inner, hidden),
        )
    }

    /// `out[rows] = h[rows] @ w2[e]ᵀ`.
    fn down(self, e: usize, start: usize, len: usize) -> Place {
        let Self { hidden, inner } = self;
        (
            [start * hidden, start * inner, e * inner * hidden],
            (len, hidden, inner),
        )
    }

    /// `dh[rows] = dy[rows] @ w2[e]`.
    fn down_input_grad(self, e: usize, start: usize, len: usize) -> Place {
        self.gate_up(e, start, len)
    }

    /// `dw2[e] += dy[rows]ᵀ @ h[rows]`.
    fn down_weight_grad(self, e: usize, start: usize, len: usize) -> Place {
        let Self { hidden, inner } = self;
        (
            [e * inner * hidden, start * hidden, start * inner],
            (hidden, inner, len),
        )
    }

    /// `dx[rows] (+)= da|db[rows] @ w1|w3[e]`.
    fn up_input_grad(self, e: usize, start: usize, len: usize) -> Place {
        self.down(e, start, len)
    }

    /// `dw1|dw3[e] += da|db[rows]ᵀ @ x[rows]`.
    fn up_weight_grad(self, e: usize, start: usize, len: usize) -> Place {
        let Self { hidden, inner } = self;
        (
            [e * inner * hidden, start * inner, start * hidden],
            (inner, hidden, len),
        )
    }
}

/// One grouped GEMM: for every `[c, a, b]` of `bases` (device addresses;
/// `a`, `b` bf16, `c` f32) and every `(expert, first row, rows)` of
/// `segments`, the problem `place` puts there.
///
/// # Safety
/// The bases are live buffers large enough for every problem placed in
/// them, enqueued on the GPU's stream before they can be freed.
#[allow(clippy::too_many_arguments)]
unsafe fn grouped(
    gpu: &Gpu,
    lt: &GroupedLt,
    segments: &[(usize, usize, usize)],
    bases: &[[u64; 3]],
    place: impl Fn(usize, usize, usize) -> Place,
    a_transposed: bool,
    b_transposed: bool,
    accumulate: bool,
) -> Result<()> {
    let place = &place;
    let problems: Vec<Problem> = bases
        .iter()
        .flat_map(|&[c, a, b]| {
            segments.iter().map(move |&(e, start, len)| {
                let ([oc, oa, ob], (m, n, k)) = place(e, start, len);
                Problem {
                    c: c + oc as u64 * OUTPUT,
                    a: a + oa as u64 * OPERAND,
                    b: b + ob as u64 * OPERAND,
                    m,
                    n,
                    k,
                }
            })
        })
        .collect();
    assert!(
        grouped_gemm::aligned(&problems, a_transposed, b_transposed),
        "grouped expert GEMMs need 16-byte aligned rows"
    );
    // SAFETY: the caller vouches for the bases; `place` keeps each problem
    // inside its expert's rows and weights.
    unsafe { grouped_gemm::gemm_bf16(gpu, lt, &problems, a_transposed, b_transposed, accumulate) }
}

/// Gate and up for every expert in one call: `a|b[rows] = x[rows] @
/// w1|w3[e]ᵀ` ([`super::moe_layer::expert_mlps`]'s first GEMMs).
pub(crate) fn gate_up(
    gpu: &Gpu,
    lt: &GroupedLt,
    c: &MoeConfig,
    segments: &[(usize, usize, usize)],
    x: &Prepared<'_>,
    [w1, w3]: [&Derived; 2],
    [a, b]: [&mut CudaSlice<f32>; 2],
) -> Result<()> {
    let places = Places::of(c);
    let stream = gpu.stream();
    let (x_at, _x) = x.rounded().device_ptr(stream);
    let (w1_at, _w1) = w1.rounded().device_ptr(stream);
    let (w3_at, _w3) = w3.rounded().device_ptr(stream);
    let (a_at, _a) = a.device_ptr_mut(stream);
    let (b_at, _b) = b.device_ptr_mut(stream);
    let bases = [[a_at, x_at, w1_at], [b_at, x_at, w3_at]];
    // SAFETY: every buffer outlives the call and is freed in stream order.
    unsafe {
        grouped(
            gpu,
            lt,
            segments,
            &bases,
            |e, s, l| places.gate_up(e, s, l),
            false,
            true,
            false,
        )
    }
}

/// Down for every expert: `out[rows] = h[rows] @ w2[e]ᵀ`.
pub(crate) fn down(
    gpu: &Gpu,
    lt: &GroupedLt,
    c: &MoeConfig,
    segments: &[(usize, usize, usize)],
    h: &Prepared<'_>,
    w2: &Derived,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let places = Places::of(c);
    let stream = gpu.stream();
    let (h_at, _h) = h.rounded().device_ptr(stream);
    let (w2_at, _w2) = w2.rounded().device_ptr(stream);
    let (out_at, _out) = out.device_ptr_mut(stream);
    // SAFETY: as in gate_up.
    unsafe {
        grouped(
            gpu,
            lt,
            segments,
            &[[out_at, h_at, w2_at]],
            |e, s, l| places.down(e, s, l),
            false,
            true,
            false,
        )
    }
}

/// Down's backward: `dh = dy @ w2[e]` and `dw2[e] += dyᵀ @ h`, a call each.
#[allow(clippy::too_many_arguments)]
pub(crate) fn down_backward(
    gpu: &Gpu,
    lt: &GroupedLt,
    c: &MoeConfig,
    segments: &[(usize, usize, usize)],
    dy: &Prepared<'_>,
    h: &Prepared<'_>,
    w2: &Derived,
    dh: &mut CudaSlice<f32>,
    dw2: &mut CudaSlice<f32>,
) -> Result<()> {
    let places = Places::of(c);
    let stream = gpu.stream();
    let (dy_at, _dy) = dy.rounded().device_ptr(stream);
    let (h_at, _h) = h.rounded().device_ptr(stream);
    let (w2_at, _w2) = w2.rounded().device_ptr(stream);
    let (dh_at, _dh) = dh.device_ptr_mut(stream);
    let (g2_at, _g2) = dw2.device_ptr_mut(stream);
    // SAFETY: as in gate_up.
    unsafe {
        let input_grad = |e, s, l| places.down_input_grad(e, s, l);
        grouped(
            gpu,
            lt,
            segments,
            &[[dh_at, dy_at, w2_at]],
            input_grad,
            false,
            false,
            false,
        )?;
        let weight_grad = |e, s, l| places.down_weight_grad(e, s, l);
        grouped(
            gpu,
            lt,
            segments,
            &[[g2_at, dy_at, h_at]],
            weight_grad,
            true,
            false,
            true,
        )
    }
}

/// Gate and up's backward: `dx = da @ w1[e] + db @ w3[e]` (two calls, the
/// second adding), then `dw1|dw3[e] += da|dbᵀ @ x` in one.
#[allow(clippy::too_many_arguments)]
pub(crate) fn up_backward(
    gpu: &Gpu,
    lt: &GroupedLt,
    c: &MoeConfig,
    segments: &[(usize, usize, usize)],
    x: &Prepared<'_>,
    [da, db]: [&Prepared<'_>; 2],
    [w1, w3]: [&Derived; 2],
    dx: &mut CudaSlice<f32>,
    [dw1, dw3]: [&mut CudaSlice<f32>; 2],
) -> Result<()> {
    let places = Places::of(c);
    let stream = gpu.stream();
    let (x_at, _x) = x.rounded().device_ptr(stream);
    let (da_at, _da) = da.rounded().device_ptr(stream);
    let (db_at, _db) = db.rounded().device_ptr(stream);
    let (w1_at, _w1) = w1.rounded().device_ptr(stream);
    let (w3_at, _w3) = w3.rounded().device_ptr(stream);
    let (dx_at, _dx) = dx.device_ptr_mut(stream);
    let (g1_at, _g1) = dw1.device_ptr_mut(stream);
    let (g3_at, _g3) = dw3.device_ptr_mut(stream);
    let input_grad = |e, s, l| places.up_input_grad(e, s, l);
    let weight_grad = |e, s, l| places.up_weight_grad(e, s, l);
    // SAFETY: as in gate_up.
    unsafe {
        grouped(
            gpu,
            lt,
            segments,
            &[[dx_at, da_at, w1_at]],
            input_grad,
            false,
            false,
            false,
        )?;
        grouped(
            gpu,
            lt,
            segments,
            &[[dx_at, db_at, w3_at]],
            input_grad,
            false,
            false,
            true,
        )?;
        let bases = [[g1_at, da_at, x_at], [g3_at, db_at, x_at]];
        grouped(gpu, lt, segments, &bases, weight_grad, true, false, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each projection's places: every expert's problem reads and writes
    /// inside its own rows and weights, and a projection's problems cover
    /// its output once (each segment's rows, or each expert with rows).
    #[test]
    fn each_projection_covers_its_output_once_and_stays_inside_its_buffers() {
        let (hidden, inner, rows, experts) = (16, 8, 10, 4);
        let places = Places { hidden, inner };
        let size = inner * hidden;
        let segments = [(0, 0, 3), (2, 3, 1), (3, 4, 6)];
        let (activations, wide, weights) = (rows * inner, rows * hidden, experts * size);
        // (name, place, the lengths of c, a and b)
        type Projection = fn(Places, usize, usize, usize) -> Place;
        let cases: [(&str, Projection, [usize; 3]); 6] = [
            ("gate/up", Places::gate_up, [activations, wide, weights]),
            ("down", Places::down, [wide, activations, weights]),
            ("dh", Places::down_input_grad, [activations, wide, weights]),
            (
                "dw2",
                Places::down_weight_grad,
                [weights, wide, activations],
            ),
            ("dx", Places::up_input_grad, [wide, activations, weights]),
            (
                "dw1/dw3",
                Places::up_weight_grad,
                [weights, activations, wide],
            ),
        ];
        for (name, place, [c_len, a_len, b_len]) in cases {
            let mut written = vec![0u32; c_len];
            for &(e, start, len) in &segments {
                let ([oc, oa, ob], (m, n, k)) = place(places, e, start, len);
                assert!(oc + m * n <= c_len, "{name}: c overruns");
                assert!(oa + m * k <= a_len, "{name}: a overruns");
                assert!(ob + k * n <= b_len, "{name}: b overruns");
                for w in &mut written[oc..oc + m * n] {
                    *w += 1;
                }
            }
            assert!(written.iter().all(|&w| w <= 1), "{name}: written twice");
            let covered = written.iter().filter(|&&w| w == 1).count();
            let expected = if c_len == weights {
                segments.len() * size
            } else {
                c_len
            };
            assert_eq!(covered, expected, "{name}");
        }
    }
}
