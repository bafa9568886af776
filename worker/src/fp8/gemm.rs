//! A linear layer `out = x @ wᵀ` whose three GEMMs run in FP8, emulated on
//! the CPU exactly up to the order of f32 accumulation.
//!
//! Each GEMM quantises both operands to E4M3 (see [`Fp8Matrix`]), then
//! computes `Σ_k dequant(a)[m, k] · dequant(b)[n, k]` in f32 with the
//! existing [`matmul`] loops. That is what a Hopper FP8 GEMM with FP32
//! promotion computes (DeepSeek-V3 §3.3.2): the tensor cores multiply the
//! E4M3 codes exactly, partial sums over each 128-wide K slice are promoted
//! to FP32 and multiplied by the two operands' scales of that slice. The only
//! differences are where f32 rounding happens (here: once per dequantised
//! value, at 2^-24, and along an ascending-k sum; there: inside the
//! tensor-core accumulator and at each promotion), all far below E4M3's
//! 2^-4. The quantised operands themselves (codes and scales) are exact, so
//! a CUDA kernel's quantisation can be checked against [`Fp8Matrix`] bit for
//! bit and its GEMM output to an f32 accumulation tolerance.
//!
//! The tiles always run along each GEMM's inner (K) dimension, as in
//! DeepSeek-V3, so one scale multiplies a whole K slice of a dot product:
//! - forward `x @ wᵀ` (K = in_dim): `x` in 1×128 tiles, `w` in 128×128 blocks;
//! - input gradient `dout @ w` (K = out_dim): `dout` in 1×128 tiles, `w` in
//!   the same blocks (a square block is a block of `wᵀ` too);
//! - weight gradient `doutᵀ @ x` (K = tokens): `dout` and `x` both in 128×1
//!   tiles, i.e. 128 tokens of one column.
//!
//! The inputs are the f32 master values each time: the weights are
//! re-quantised from the f32 master weights, the saved f32 activations are
//! quantised for the weight gradient in their 128×1 tiling.

use crate::fp8::delayed::{LinearScales, Role};
use crate::fp8::quantize::{Fp8Matrix, TileShape, amax};
use crate::ops::matmul;
use crate::scalar::Scalar;

/// How an FP8 linear layer scales its operands.
#[derive(Clone, Copy, Debug)]
pub enum Scaling<'a> {
    /// Just in time, per tile: each 1×128 or 128×1 activation and gradient
    /// tile and each 128×128 weight block by its own amax (DeepSeek-V3).
    Blockwise,
    /// One delayed scale per tensor, from the layer's amax histories.
    Tensorwise(&'a LinearScales),
}

impl Scaling<'_> {
    /// `m: [rows, cols]` as the operand `role` of a GEMM, tiled `tile` when blockwise.
    pub fn quantize<T: Scalar>(
        self,
        role: Role,
        m: &[T],
        rows: usize,
        cols: usize,
        tile: TileShape,
    ) -> Fp8Matrix {
        match self {
            Self::Blockwise => Fp8Matrix::quantize(m, rows, cols, tile),
            Self::Tensorwise(scales) => {
                let current = amax(m);
                let delayed = scales.role(role);
                delayed.observe(current);
                Fp8Matrix::quantize_with_scale(m, rows, cols, delayed.scale(current))
            }
        }
    }
}

/// `out = x @ wᵀ` with `x: [rows, in_dim]` and `w: [out_dim, in_dim]` in FP8.
pub fn forward<T: Scalar>(
    scaling: Scaling<'_>,
    out: &mut [T],
    x: &[T],
    w: &[T],
    in_dim: usize,
    out_dim: usize,
) {
    let rows = rows_of(x, in_dim);
    let x8 = scaling.quantize(Role::Input, x, rows, in_dim, TileShape::ROW);
    let w8 = scaling.quantize(Role::Weight, w, out_dim, in_dim, TileShape::BLOCK);
    matmul::forward(out, &x8.dequantize(), &w8.dequantize(), in_dim, out_dim);
}

/// Adds `dout @ w` into `dx` and `doutᵀ @ x` into `dw`, both GEMMs in FP8.
#[allow(clippy::too_many_arguments)] // the shape of `matmul::backward` plus the scaling
pub fn backward<T: Scalar>(
    scaling: Scaling<'_>,
    dx: &mut [T],
    dw: &mut [T],
    dout: &[T],
    x: &[T],
    w: &[T],
    in_dim: usize,
    out_dim: usize,
) {
    let rows = rows_of(x, in_dim);
    assert_eq!(dx.len(), x.len(), "matmul input gradient shape");
    assert_eq!(dout.len(), rows * out_dim, "matmul output gradient shape");
    let dout_rows = scaling.quantize(Role::GradOutput, dout, rows, out_dim, TileShape::ROW);
    let w8 = scaling.quantize(Role::Weight, w, out_dim, in_dim, TileShape::BLOCK);
    matmul::backward_input(
        dx,
        &dout_rows.dequantize(),
        &w8.dequantize(),
        in_dim,
        out_dim,
    );
    // Quantised even for a frozen weight (an empty `dw`), so the tensorwise
    // recipe observes the same amaxes either way.
    let dout_columns = scaling.quantize(Role::GradOutput, dout, rows, out_dim, TileShape::COLUMN);
    let x_columns = scaling.quantize(Role::Input, x, rows, in_dim, TileShape::COLUMN);
    if dw.is_empty() {
        return;
    }
    matmul::backward_weight(
        dw,
        &dout_columns.dequantize(),
        &x_columns.dequantize(),
        in_dim,
        out_dim,
    );
}

fn rows_of<T>(x: &[T], in_dim: usize) -> usize {
    assert!(
        in_dim > 0 && x.len().is_multiple_of(in_dim),
        "matmul input is not [rows, in_dim]"
    );
    x.len() / in_dim
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// E4M3's worst relative rounding error in its normal range: half an
    /// ulp of 2^-3 at the bottom of a binade.
    const UNIT_ROUNDOFF: f64 = 1.0 / 16.0;

    fn normal(n: usize, seed: u64) -> Vec<f32> {
        SplitMix64::new(seed).normal_vec(n, 1.0)
    }

    /// `out[m, n] = Σ_k a[m, k] b[n, k]`, the plain triple loop in f32.
    fn naive_abt(a: &[f32], b: &[f32], k: usize) -> Vec<f32> {
        let (m, n) = (a.len() / k, b.len() / k);
        let mut out = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut sum = 0.0f32;
                for p in 0..k {
                    sum += a[i * k + p] * b[j * k + p];
                }
                out[i * n + j] = sum;
            }
        }
        out
    }

    /// The same in f64 from f32 inputs: an exact-enough FP32 reference.
    fn exact_abt(a: &[f32], b: &[f32], k: usize) -> Vec<f64> {
        let (m, n) = (a.len() / k, b.len() / k);
        let mut out = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|p| f64::from(a[i * k + p]) * f64::from(b[j * k + p]))
                    .sum();
            }
        }
        out
    }

    fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let mut t = vec![0.0; m.len()];
        for r in 0..rows {
            for c in 0..cols {
                t[c * rows + r] = m[r * cols + c];
            }
        }
        t
    }

    /// Panics unless `got` is `expected` to 1e-6 of the magnitude sum of each dot product.
    fn assert_matches_naive(what: &str, got: &[f32], expected: &[f32], a: &[f32], b: &[f32]) {
        assert_eq!(got.len(), expected.len(), "{what}");
        let magnitude: f32 = a.iter().chain(b).map(|v| v.abs()).fold(0.0, f32::max);
        for (i, (&g, &e)) in got.iter().zip(expected).enumerate() {
            let tolerance = 1e-6 * (e.abs() + magnitude * magnitude);
            assert!((g - e).abs() <= tolerance, "{what}[{i}]: {g} vs {e}");
        }
    }

    #[test]
    fn forward_is_the_f32_product_of_the_dequantised_operands() {
        // K = 130: one full 128-wide tile and a 2-wide tail; out_dim 130 gives tail blocks.
        let (rows, in_dim, out_dim) = (5, 130, 130);
        let x = normal(rows * in_dim, 1);
        let w: Vec<f32> = normal(out_dim * in_dim, 2)
            .iter()
            .map(|v| v * 0.02)
            .collect();
        let mut out = vec![0.0f32; rows * out_dim];
        forward(Scaling::Blockwise, &mut out, &x, &w, in_dim, out_dim);
        let xd = Fp8Matrix::quantize(&x, rows, in_dim, TileShape::ROW).dequantize::<f32>();
        let wd = Fp8Matrix::quantize(&w, out_dim, in_dim, TileShape::BLOCK).dequantize::<f32>();
        assert_matches_naive("out", &out, &naive_abt(&xd, &wd, in_dim), &xd, &wd);
    }

    #[test]
    fn backward_gemms_are_f32_products_of_inner_dimension_tiles() {
        let (rows, in_dim, out_dim) = (130, 70, 131);
        let x = normal(rows * in_dim, 3);
        let w = normal(out_dim * in_dim, 4);
        let dout = normal(rows * out_dim, 5);
        let mut dx = vec![0.0f32; x.len()];
        let mut dw = vec![0.0f32; w.len()];
        backward(
            Scaling::Blockwise,
            &mut dx,
            &mut dw,
            &dout,
            &x,
            &w,
            in_dim,
            out_dim,
        );
        // dx = dout @ w: K = out_dim; as A @ Bᵀ with B = wᵀ.
        let dout_rows = Fp8Matrix::quantize(&dout, rows, out_dim, TileShape::ROW).dequantize();
        let wd = Fp8Matrix::quantize(&w, out_dim, in_dim, TileShape::BLOCK).dequantize();
        let wd_t = transpose(&wd, out_dim, in_dim);
        let dx_naive = naive_abt(&dout_rows, &wd_t, out_dim);
        assert_matches_naive("dx", &dx, &dx_naive, &dout_rows, &wd_t);
        // dw = doutᵀ @ x: K = rows (tokens), both in 128×1 tiles.
        let dout_cols = Fp8Matrix::quantize(&dout, rows, out_dim, TileShape::COLUMN).dequantize();
        let x_cols = Fp8Matrix::quantize(&x, rows, in_dim, TileShape::COLUMN).dequantize();
        let (a, b) = (
            transpose(&dout_cols, rows, out_dim),
            transpose(&x_cols, rows, in_dim),
        );
        assert_matches_naive("dw", &dw, &naive_abt(&a, &b, rows), &a, &b);
    }

    /// The largest error quantisation can cause in each output of `a @ bᵀ`,
    /// from E4M3's rounding: a value `v` of a tile with scale `s` is off by
    /// at most `2^-4 |v|` in the normal range and `2^-10 s` (half a
    /// subnormal step) below it, plus f32 roundings (the division, the
    /// dequantising multiply: a few 2^-24, taken as 2^-21). Then
    /// `|âb̂ - ab| ≤ |a| e_b + |b| e_a + e_a e_b`, summed over k, plus the
    /// f32 accumulation of the FP8 sum (at most `k 2^-24 Σ|âb̂|`).
    fn worst_case_errors(
        a: &Fp8Matrix,
        a_values: &[f32],
        b: &Fp8Matrix,
        b_values: &[f32],
    ) -> Vec<f64> {
        let k = a.cols();
        let error = |m: &Fp8Matrix, values: &[f32], r: usize, c: usize| {
            let v = f64::from(values[r * k + c]).abs();
            (UNIT_ROUNDOFF + 2f64.powi(-21)) * v + 2f64.powi(-10) * f64::from(m.scale_at(r, c))
        };
        let mut bounds = Vec::with_capacity(a.rows() * b.rows());
        for i in 0..a.rows() {
            for j in 0..b.rows() {
                let (mut bound, mut magnitude) = (0.0, 0.0);
                for p in 0..k {
                    let (av, bv) = (
                        f64::from(a_values[i * k + p]).abs(),
                        f64::from(b_values[j * k + p]).abs(),
                    );
                    let (ea, eb) = (error(a, a_values, i, p), error(b, b_values, j, p));
                    bound += av * eb + bv * ea + ea * eb;
                    magnitude += (av + ea) * (bv + eb);
                }
                bounds.push(bound + k as f64 * 2f64.powi(-24) * magnitude);
            }
        }
        bounds
    }

    /// Root-mean-square of `got - reference` over that of `reference`.
    fn relative_rms(got: &[f32], reference: &[f64]) -> f64 {
        let error: f64 = got
            .iter()
            .zip(reference)
            .map(|(&g, &r)| (f64::from(g) - r).powi(2))
            .sum();
        let norm: f64 = reference.iter().map(|r| r * r).sum();
        (error / norm).sqrt()
    }

    /// The relative RMS error of an FP8 GEMM of independent zero-mean
    /// operands, from E4M3's rounding.
    ///
    /// Rounding to a grid of spacing `u` leaves an error spread evenly over
    /// `±u/2`, of mean square `u²/12`. E4M3's spacing at `v` is between
    /// `2^-4 |v|` (top of a binade) and `2^-3 |v|` (bottom), so each
    /// operand's relative mean square error `ρ²` lies in `[1/3072, 1/768]`.
    /// In `Σ_k a_k b_k` the independent errors add up in mean square:
    /// `E[δ²] = Σ_k (b_k² ρ_a² a_k² + a_k² ρ_b² b_k²) = (ρ_a² + ρ_b²) E[out²]`,
    /// so the relative RMS error is `sqrt(ρ_a² + ρ_b²)`: in
    /// `[sqrt(2/3072), sqrt(2/768)] = [0.0255, 0.051]`. (Values below a
    /// tile's subnormal threshold, `amax / 28672`, are too rare in Gaussian
    /// tiles to matter; each tile's amax itself is exact, 1 value in 128.)
    fn expected_relative_rms() -> (f64, f64) {
        ((2.0f64 / 3072.0).sqrt(), (2.0f64 / 768.0).sqrt())
    }

    #[test]
    fn forward_error_against_fp32_is_within_e4m3_rounding() {
        let (rows, in_dim, out_dim) = (64, 300, 192);
        let x = normal(rows * in_dim, 6);
        // Weights at a realistic scale, with some spread between blocks.
        let w: Vec<f32> = normal(out_dim * in_dim, 7)
            .iter()
            .enumerate()
            .map(|(i, v)| v * 0.02 * (1.0 + (i / 1000) as f32))
            .collect();
        let mut out = vec![0.0f32; rows * out_dim];
        forward(Scaling::Blockwise, &mut out, &x, &w, in_dim, out_dim);
        let reference = exact_abt(&x, &w, in_dim);
        let x8 = Fp8Matrix::quantize(&x, rows, in_dim, TileShape::ROW);
        let w8 = Fp8Matrix::quantize(&w, out_dim, in_dim, TileShape::BLOCK);
        let bounds = worst_case_errors(&x8, &x, &w8, &w);
        for (i, ((&o, &r), &b)) in out.iter().zip(&reference).zip(&bounds).enumerate() {
            assert!(
                (f64::from(o) - r).abs() <= b,
                "out[{i}] = {o}, fp32 {r}, bound {b}"
            );
        }
        let rms = relative_rms(&out, &reference);
        let (low, high) = expected_relative_rms();
        assert!(
            (low..=high).contains(&rms),
            "relative RMS error {rms}, expected in [{low}, {high}]"
        );
    }

    #[test]
    fn backward_error_against_fp32_is_within_e4m3_rounding() {
        let (rows, in_dim, out_dim) = (256, 96, 160);
        let x = normal(rows * in_dim, 8);
        let w = normal(out_dim * in_dim, 9);
        let dout: Vec<f32> = normal(rows * out_dim, 10)
            .iter()
            .map(|v| v * 1e-4)
            .collect();
        let (mut dx, mut dw) = (vec![0.0f32; x.len()], vec![0.0f32; w.len()]);
        backward(
            Scaling::Blockwise,
            &mut dx,
            &mut dw,
            &dout,
            &x,
            &w,
            in_dim,
            out_dim,
        );
        let w_t = transpose(&w, out_dim, in_dim);
        let (dout_t, x_t) = (transpose(&dout, rows, out_dim), transpose(&x, rows, in_dim));
        let (low, high) = expected_relative_rms();
        for (what, got, reference) in [
            ("dx", &dx, exact_abt(&dout, &w_t, out_dim)),
            ("dw", &dw, exact_abt(&dout_t, &x_t, rows)),
        ] {
            let rms = relative_rms(got, &reference);
            assert!(
                (low..=high).contains(&rms),
                "{what}: relative RMS error {rms}"
            );
        }
    }

    #[test]
    fn tensorwise_uses_and_records_delayed_scales() {
        let (rows, in_dim, out_dim) = (4, 8, 3);
        let x: Vec<f32> = (0..rows * in_dim).map(|i| i as f32 / 10.0).collect();
        let w = vec![0.5f32; out_dim * in_dim];
        let mut scales = LinearScales::default();
        // Step 1: no history, so each tensor is scaled by its own amax.
        let mut out = vec![0.0f32; rows * out_dim];
        forward(
            Scaling::Tensorwise(&scales),
            &mut out,
            &x,
            &w,
            in_dim,
            out_dim,
        );
        let xd = Fp8Matrix::quantize_with_scale(&x, rows, in_dim, amax(&x) / 448.0).dequantize();
        assert_matches_naive("out", &out, &naive_abt(&xd, &w, in_dim), &xd, &w);
        scales.advance();
        assert_eq!(scales.input.history().collect::<Vec<_>>(), [amax(&x)]);
        assert_eq!(scales.weight.history().collect::<Vec<_>>(), [0.5]);
        // Step 2: an input twice as large is scaled from the history and saturates at its amax.
        let doubled: Vec<f32> = x.iter().map(|v| 2.0 * v).collect();
        forward(
            Scaling::Tensorwise(&scales),
            &mut out,
            &doubled,
            &w,
            in_dim,
            out_dim,
        );
        let saturated = Fp8Matrix::quantize_with_scale(&doubled, rows, in_dim, amax(&x) / 448.0)
            .dequantize::<f32>();
        assert!(saturated.iter().all(|v| v.abs() <= amax(&x) * 1.000_001));
        assert_matches_naive(
            "out",
            &out,
            &naive_abt(&saturated, &w, in_dim),
            &saturated,
            &w,
        );
    }

    #[test]
    fn no_rows_is_a_no_op_for_both_recipes() {
        let w = normal(6, 11);
        let mut scales = LinearScales::default();
        for scaling in [Scaling::Blockwise, Scaling::Tensorwise(&scales)] {
            let mut out: Vec<f32> = vec![];
            forward(scaling, &mut out, &[], &w, 2, 3);
            let mut dw = vec![0.0f32; 6];
            backward(scaling, &mut [], &mut dw, &[], &[], &w, 2, 3);
            assert!(dw.iter().all(|&g| g == 0.0));
        }
        scales.advance();
        assert_eq!(
            scales.input.history().count(),
            0,
            "an empty input has no amax"
        );
        assert_eq!(scales.grad_output.history().count(), 0);
    }
}
