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

use crate::fp8::{Fp8Recipe, LinearScales, Scaling, gemm};
use crate::ops::matmul;
use crate::scalar::Scalar;

/// The arithmetic of the FP8-eligible GEMMs (`training.precision.fp8`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GemmPrecision {
    #[default]
    Fp32,
    Fp8(Fp8Recipe),
}

/// How one linear layer `out = x @ wᵀ` computes its GEMMs.
#[derive(Clone, Copy, Debug)]
pub enum Linear<'a> {
    /// [`matmul`], unchanged.
    Fp32,
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
            Self::Fp8(scaling) => gemm::forward(scaling, out, x, w, in_dim, out_dim),
        }
    }

    /// Adds `dout @ w` into `dx` and `doutᵀ @ x` into `dw`, as [`matmul::backward`].
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
