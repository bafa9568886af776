//! The routed experts' SwiGLU MLPs with each projection one cuBLASLt
//! grouped GEMM over every expert ([`super::grouped_gemm`]), in bf16:
//! [`super::moe_layer::expert_mlps`] and its backward take this path when
//! the library runs it ([`usable`]), and keep it bit-compatible in what it
//! computes — the same bf16 roundings of the same operands, f32
//! accumulation — so only the order of the f32 sums can differ.
//!
//! A layer's forward is two calls (gate and up together, then down) and
//! its backward five, where the per-expert loop issues three GEMMs per
//! expert forward and six backward (192 and 384 at 64 experts).

use super::grouped_gemm::{self, GroupedLt, Problem};
use super::matmul::{Arithmetic, Prepared};
use super::moe_layer::{DeviceMoeGrads, ExpertMlps, RoutedWeights, segment_rows};
use super::{Gpu, Result, swiglu};
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

/// [`super::moe_layer::expert_mlps`] in bf16 with grouped GEMMs.
pub(crate) fn forward(
    gpu: &Gpu,
    lt: &GroupedLt,
    c: &MoeConfig,
    weights: &RoutedWeights<'_>,
    permuted: &CudaSlice<f32>,
    segments: &[(usize, usize, usize)],
) -> Result<ExpertMlps> {
    let (hidden, inner) = (c.hidden, c.expert_hidden);
    let places = Places { hidden, inner };
    let rows = permuted.len() / hidden;
    let rows_of = segment_rows(gpu, rows, segments);
    let (mut a, mut b) = (rows_of(inner)?, rows_of(inner)?);
    // SwiGLU writes every element (zero where `a` and `b` are).
    let mut h = gpu.output::<f32>(rows * inner)?;
    let mut out = rows_of(hidden)?;
    let bf16 = Arithmetic::Bf16;
    let derive = |w| weights.derived(gpu, bf16, w);
    let (w1, w3, w2) = (
        derive(weights.w1)?,
        derive(weights.w3)?,
        derive(weights.w2)?,
    );
    let stream = gpu.stream();
    let gate_up_span = gpu.span_start("fwd.moe.gate_up")?;
    {
        let x = Prepared::of(gpu, bf16, permuted)?;
        let (x_at, _x) = x.rounded().device_ptr(stream);
        let (w1_at, _w1) = w1.rounded().device_ptr(stream);
        let (w3_at, _w3) = w3.rounded().device_ptr(stream);
        let (a_at, _a) = a.device_ptr_mut(stream);
        let (b_at, _b) = b.device_ptr_mut(stream);
        // SAFETY: every buffer outlives the call and is freed in stream order.
        unsafe {
            grouped(
                gpu,
                lt,
                segments,
                &[[a_at, x_at, w1_at], [b_at, x_at, w3_at]],
                |e, start, len| places.gate_up(e, start, len),
                false,
                true,
                false,
            )
        }?;
    }
    gpu.span_end(gate_up_span)?;
    gpu.span("fwd.moe.swiglu", || swiglu::forward(gpu, &mut h, &a, &b))?;
    let down_span = gpu.span_start("fwd.moe.down")?;
    {
        let h = Prepared::of(gpu, bf16, &h)?;
        let (h_at, _h) = h.rounded().device_ptr(stream);
        let (w2_at, _w2) = w2.rounded().device_ptr(stream);
        let (out_at, _out) = out.device_ptr_mut(stream);
        // SAFETY: as above.
        unsafe {
            grouped(
                gpu,
                lt,
                segments,
                &[[out_at, h_at, w2_at]],
                |e, start, len| places.down(e, start, len),
                false,
                true,
                false,
            )
        }?;
    }
    gpu.span_end(down_span)?;
    Ok(ExpertMlps { a, b, h, out })
}

/// [`super::moe_layer::expert_mlps_backward`] in bf16 with grouped GEMMs.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    gpu: &Gpu,
    lt: &GroupedLt,
    c: &MoeConfig,
    weights: &RoutedWeights<'_>,
    grads: &mut DeviceMoeGrads,
    dy: &CudaSlice<f32>,
    input: &CudaSlice<f32>,
    mlps: &ExpertMlps,
    segments: &[(usize, usize, usize)],
) -> Result<CudaSlice<f32>> {
    let (hidden, inner) = (c.hidden, c.expert_hidden);
    let places = Places { hidden, inner };
    let rows = input.len() / hidden;
    let rows_of = segment_rows(gpu, rows, segments);
    let bf16 = Arithmetic::Bf16;
    let derive = |w| weights.derived(gpu, bf16, w);
    let (w1, w3, w2) = (
        derive(weights.w1)?,
        derive(weights.w3)?,
        derive(weights.w2)?,
    );
    let stream = gpu.stream();
    let down_span = gpu.span_start("bwd.moe.down")?;
    let mut dh = rows_of(inner)?;
    {
        let (dy, h) = (
            Prepared::of(gpu, bf16, dy)?,
            Prepared::of(gpu, bf16, &mlps.h)?,
        );
        let (dy_at, _dy) = dy.rounded().device_ptr(stream);
        let (h_at, _h) = h.rounded().device_ptr(stream);
        let (w2_at, _w2) = w2.rounded().device_ptr(stream);
        let (dh_at, _dh) = dh.device_ptr_mut(stream);
        let (g2_at, _g2) = grads.w2.device_ptr_mut(stream);
        // SAFETY: every buffer outlives the calls and is freed in stream order.
        unsafe {
            // dh = dy @ w2 (w2 stored [hidden, inner]).
            grouped(
                gpu,
                lt,
                segments,
                &[[dh_at, dy_at, w2_at]],
                |e, start, len| places.down_input_grad(e, start, len),
                false,
                false,
                false,
            )?;
            // dw2 += dyᵀ @ h.
            grouped(
                gpu,
                lt,
                segments,
                &[[g2_at, dy_at, h_at]],
                |e, start, len| places.down_weight_grad(e, start, len),
                true,
                false,
                true,
            )?;
        }
    }
    gpu.span_end(down_span)?;
    let mut da = gpu.output::<f32>(rows * inner)?;
    let mut db = gpu.output::<f32>(rows * inner)?;
    gpu.span("bwd.moe.swiglu", || {
        swiglu::backward(gpu, &mut da, &mut db, &dh, &mlps.a, &mlps.b, false)
    })?;
    let gate_up_span = gpu.span_start("bwd.moe.gate_up")?;
    let mut dinput = rows_of(hidden)?;
    {
        let (x, da, db) = (
            Prepared::of(gpu, bf16, input)?,
            Prepared::of(gpu, bf16, &da)?,
            Prepared::of(gpu, bf16, &db)?,
        );
        let (x_at, _x) = x.rounded().device_ptr(stream);
        let (da_at, _da) = da.rounded().device_ptr(stream);
        let (db_at, _db) = db.rounded().device_ptr(stream);
        let (w1_at, _w1) = w1.rounded().device_ptr(stream);
        let (w3_at, _w3) = w3.rounded().device_ptr(stream);
        let (dx_at, _dx) = dinput.device_ptr_mut(stream);
        let (g1_at, _g1) = grads.w1.device_ptr_mut(stream);
        let (g3_at, _g3) = grads.w3.device_ptr_mut(stream);
        let dx = |e, start, len| places.up_input_grad(e, start, len);
        // SAFETY: as above.
        unsafe {
            // dx = da @ w1 + db @ w3 (each stored [inner, hidden]).
            grouped(
                gpu,
                lt,
                segments,
                &[[dx_at, da_at, w1_at]],
                dx,
                false,
                false,
                false,
            )?;
            grouped(
                gpu,
                lt,
                segments,
                &[[dx_at, db_at, w3_at]],
                dx,
                false,
                false,
                true,
            )?;
            // dw1 += daᵀ @ x and dw3 += dbᵀ @ x, in one call.
            grouped(
                gpu,
                lt,
                segments,
                &[[g1_at, da_at, x_at], [g3_at, db_at, x_at]],
                |e, start, len| places.up_weight_grad(e, start, len),
                true,
                false,
                true,
            )?;
        }
    }
    gpu.span_end(gate_up_span)?;
    Ok(dinput)
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
