//! The linear layers that may run their GEMMs in FP8, and how they do.
//!
//! DeepSeek-V3 runs the GEMMs of its linear layers in FP8 and keeps the
//! embedding, the LM head, the MoE router, the norms and attention itself
//! in higher precision. The model follows that: the attention projections
//! (`wq`, `wk`, `wv`, `wo`) and the SwiGLU MLPs (routed and shared experts,
//! and the dense feed-forward layers, which are the same MLP) take a
//! [`Linear`]; every other matmul calls [`matmul`] directly and is always f32.
//! With [`GemmPrecision::Fp32`] a [`Linear`] is exactly [`matmul`]: the f32
//! model computes bit for bit what it did before FP8 existed.
//!
//! [`GemmPrecision::Bf16`] (`training.precision.compute: bf16`) is what
//! mixed-precision training does with f32 master weights: each GEMM reads
//! its two operands rounded to bf16 (to nearest, ties to even) and
//! accumulates and writes f32, as a bf16 tensor-core GEMM with f32 output
//! does; the optimizer updates the f32 weights. The products of two bf16
//! values are exact in f32, so a device GEMM on the same rounded operands
//! differs from this emulation only in the order of its f32 sums.

use crate::fp8::{Fp8Recipe, LinearScales, Scaling, gemm};
use crate::ops::matmul;
use crate::scalar::Scalar;

/// The arithmetic of a linear layer's GEMMs (`training.precision`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GemmPrecision {
    #[default]
    Fp32,
    /// bf16 operands, f32 accumulation and output (`compute: bf16`).
    Bf16,
    /// E4M3 operands with scales (`fp8.enabled`).
    Fp8(Fp8Recipe),
}

/// How one linear layer `out = x @ wᵀ` computes its GEMMs.
#[derive(Clone, Copy, Debug)]
pub enum Linear<'a> {
    /// [`matmul`], unchanged.
    Fp32,
    /// [`matmul`] on the operands rounded to bf16 (see the module's notes).
    Bf16,
    /// [`gemm`]: both operands of each GEMM in E4M3.
    Fp8(Scaling<'a>),
}

impl Linear<'_> {
    /// `out = x @ wᵀ`, as [`matmul::forward`].
    pub fn forward<T: Scalar>(
        self,
        out: &mut [T],
        x: &[T],
        w: &[T],
        in_dim: usize,
        out_dim: usize,
    ) {
        match self {
            Self::Fp32 => matmul::forward(out, x, w, in_dim, out_dim),
            Self::Bf16 => matmul::forward(out, &to_bf16(x), &to_bf16(w), in_dim, out_dim),
            Self::Fp8(scaling) => gemm::forward(scaling, out, x, w, in_dim, out_dim),
        }
    }

    /// Adds `dout @ w` into `dx` and `doutᵀ @ x` into `dw`, as
    /// [`matmul::backward`]; an empty `dw` (a frozen weight) skips the
    /// weight-gradient GEMM.
    #[allow(clippy::too_many_arguments)] // matmul::backward's shape
    pub fn backward<T: Scalar>(
        self,
        dx: &mut [T],
        dw: &mut [T],
        dout: &[T],
        x: &[T],
        w: &[T],
        in_dim: usize,
        out_dim: usize,
    ) {
        match self {
            Self::Fp32 => matmul::backward(dx, dw, dout, x, w, in_dim, out_dim),
            Self::Bf16 => {
                let dout = to_bf16(dout);
                matmul::backward_input(dx, &dout, &to_bf16(w), in_dim, out_dim);
                if !dw.is_empty() {
                    matmul::backward_weight(dw, &dout, &to_bf16(x), in_dim, out_dim);
                }
            }
            Self::Fp8(scaling) => gemm::backward(scaling, dx, dw, dout, x, w, in_dim, out_dim),
        }
    }
}

/// A fixed, ordered group of linear layers (a block's attention
/// projections, an MLP's three matrices, all of an MoE layer's experts),
/// with the delayed scales of each when the recipe is tensorwise.
#[derive(Clone, Copy, Debug)]
pub struct Linears<'a> {
    precision: GemmPrecision,
    /// One per layer of the group for the tensorwise recipe; otherwise unused.
    scales: &'a [LinearScales],
}

impl<'a> Linears<'a> {
    /// Every layer in f32.
    pub const FP32: Linears<'static> = Linears {
        precision: GemmPrecision::Fp32,
        scales: &[],
    };

    /// A group computing in `precision`; `scales` must hold one entry per
    /// layer when that is FP8 with the tensorwise recipe.
    pub fn new(precision: GemmPrecision, scales: &'a [LinearScales]) -> Self {
        Self { precision, scales }
    }

    /// Layer `i` of the group.
    pub fn get(self, i: usize) -> Linear<'a> {
        match self.precision {
            GemmPrecision::Fp32 => Linear::Fp32,
            GemmPrecision::Bf16 => Linear::Bf16,
            GemmPrecision::Fp8(Fp8Recipe::Blockwise) => Linear::Fp8(Scaling::Blockwise),
            GemmPrecision::Fp8(Fp8Recipe::Tensorwise) => {
                Linear::Fp8(Scaling::Tensorwise(&self.scales[i]))
            }
        }
    }

    /// Layers `start..start + len` as a group of their own.
    pub fn sub(self, start: usize, len: usize) -> Self {
        let scales = match self.precision {
            GemmPrecision::Fp8(Fp8Recipe::Tensorwise) => &self.scales[start..start + len],
            _ => self.scales,
        };
        Self { scales, ..self }
    }
}

/// A copy of `m` with every value rounded to bf16 ([`Scalar::round_bf16`]).
fn to_bf16<T: Scalar>(m: &[T]) -> Vec<T> {
    m.iter().map(|&v| v.round_bf16()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn fp32_linear_is_matmul_bit_for_bit() {
        let (rows, in_dim, out_dim) = (7, 130, 9);
        let mut rng = SplitMix64::new(3);
        let x: Vec<f32> = rng.normal_vec(rows * in_dim, 1.0);
        let w: Vec<f32> = rng.normal_vec(out_dim * in_dim, 0.1);
        let dout: Vec<f32> = rng.normal_vec(rows * out_dim, 1.0);
        let linear = Linears::FP32.sub(0, 1).get(0);
        let (mut out, mut expected) = (vec![0.0f32; rows * out_dim], vec![0.0f32; rows * out_dim]);
        linear.forward(&mut out, &x, &w, in_dim, out_dim);
        matmul::forward(&mut expected, &x, &w, in_dim, out_dim);
        assert_eq!(out, expected);
        let (mut dx, mut dw) = (vec![0.5f32; x.len()], vec![0.25f32; w.len()]);
        let (mut dx_expected, mut dw_expected) = (dx.clone(), dw.clone());
        linear.backward(&mut dx, &mut dw, &dout, &x, &w, in_dim, out_dim);
        matmul::backward(
            &mut dx_expected,
            &mut dw_expected,
            &dout,
            &x,
            &w,
            in_dim,
            out_dim,
        );
        assert_eq!((dx, dw), (dx_expected, dw_expected));
    }

    /// `Σ_k a[m, k] b[n, k]` in f64 over the bf16 roundings of the f32
    /// operands, each rounded by bit arithmetic (not [`Scalar::round_bf16`]).
    fn bf16_reference(a: &[f32], b: &[f32], k: usize) -> Vec<f64> {
        let round = |v: f32| {
            let bits = v.to_bits();
            f64::from(f32::from_bits(
                bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) & 0xffff_0000,
            ))
        };
        let (m, n) = (a.len() / k, b.len() / k);
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|p| round(a[i * k + p]) * round(b[j * k + p]))
                    .sum();
            }
        }
        out
    }

    fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| m[(i % rows) * cols + i / rows])
            .collect()
    }

    /// Largest gap from the reference relative to the largest |product| sum:
    /// f32 accumulation over k terms stays within about k · 2^-24 of it.
    fn relative_gap(got: &[f32], reference: &[f64], scale: f64) -> f64 {
        got.iter()
            .zip(reference)
            .map(|(&g, &r)| (f64::from(g) - r).abs() / scale)
            .fold(0.0, f64::max)
    }

    #[test]
    fn bf16_linear_multiplies_the_rounded_operands_in_f32() {
        let (rows, in_dim, out_dim) = (9, 70, 11);
        let mut rng = SplitMix64::new(5);
        let x: Vec<f32> = rng.normal_vec(rows * in_dim, 1.0);
        let w: Vec<f32> = rng.normal_vec(out_dim * in_dim, 0.1);
        let dout: Vec<f32> = rng.normal_vec(rows * out_dim, 1.0);
        let scale = |a: &[f32], b: &[f32], k: usize| {
            let abs = |m: &[f32]| m.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
            f64::from(abs(a) * abs(b)) * k as f64
        };
        let bf16 = Linears::new(GemmPrecision::Bf16, &[]).get(0);

        let mut out = vec![0.0f32; rows * out_dim];
        bf16.forward(&mut out, &x, &w, in_dim, out_dim);
        let forward = bf16_reference(&x, &w, in_dim);
        assert!(relative_gap(&out, &forward, scale(&x, &w, in_dim)) < 1e-7);

        // Gradients add into what is there, as matmul::backward does.
        let (mut dx, mut dw) = (vec![0.5f32; x.len()], vec![0.25f32; w.len()]);
        bf16.backward(&mut dx, &mut dw, &dout, &x, &w, in_dim, out_dim);
        let dx_reference: Vec<f64> =
            bf16_reference(&dout, &transpose(&w, out_dim, in_dim), out_dim)
                .iter()
                .map(|v| v + 0.5)
                .collect();
        let dw_reference: Vec<f64> = bf16_reference(
            &transpose(&dout, rows, out_dim),
            &transpose(&x, rows, in_dim),
            rows,
        )
        .iter()
        .map(|v| v + 0.25)
        .collect();
        assert!(relative_gap(&dx, &dx_reference, scale(&dout, &w, out_dim)) < 1e-7);
        assert!(relative_gap(&dw, &dw_reference, scale(&dout, &x, rows)) < 1e-7);

        // The rounding is live: the f32 product is a bf16 ulp or so away.
        let mut exact = vec![0.0f32; rows * out_dim];
        matmul::forward(&mut exact, &x, &w, in_dim, out_dim);
        let gap = relative_gap(&exact, &forward, scale(&x, &w, in_dim));
        assert!(gap > 1e-5 && gap < 1e-2, "f32 vs bf16 operands: {gap}");
    }

    #[test]
    fn tensorwise_groups_hand_each_layer_its_own_scales() {
        let scales = vec![LinearScales::default(); 6];
        let group = Linears::new(GemmPrecision::Fp8(Fp8Recipe::Tensorwise), &scales);
        let Linear::Fp8(Scaling::Tensorwise(layer)) = group.sub(3, 3).get(1) else {
            panic!("a tensorwise group gives tensorwise layers");
        };
        assert!(std::ptr::eq(layer, &scales[4]));
        let blockwise = Linears::new(GemmPrecision::Fp8(Fp8Recipe::Blockwise), &[]);
        assert!(matches!(
            blockwise.sub(6, 3).get(2),
            Linear::Fp8(Scaling::Blockwise)
        ));
    }
}
