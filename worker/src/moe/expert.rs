//! One SwiGLU MLP (a routed expert, or the fused shared experts) applied to a
//! batch of rows: `out = (silu(x @ w1^T) * (x @ w3^T)) @ w2^T`.

use crate::ops::{matmul, swiglu};
use crate::scalar::Scalar;

/// Borrowed weights of one MLP: `w1, w3: [hidden, model]`, `w2: [model, hidden]`.
#[derive(Clone, Copy, Debug)]
pub struct SwiGluMlp<'a, T> {
    pub w1: &'a [T],
    pub w3: &'a [T],
    pub w2: &'a [T],
    /// Input and output width.
    pub model: usize,
    /// Intermediate width.
    pub hidden: usize,
}

/// Gradient buffers matching a [`SwiGluMlp`]'s weights.
#[derive(Debug)]
pub struct SwiGluGrads<'a, T> {
    pub w1: &'a mut [T],
    pub w3: &'a mut [T],
    pub w2: &'a mut [T],
}

/// What the backward pass needs from the forward, each `[rows, hidden]`:
/// the two projections and the gated product.
#[derive(Clone, Debug, PartialEq)]
pub struct SwiGluActivations<T> {
    pub a: Vec<T>,
    pub b: Vec<T>,
    pub h: Vec<T>,
}

impl<T: Scalar> SwiGluMlp<'_, T> {
    /// Writes `out: [rows, model]` for `x: [rows, model]`.
    pub fn forward(&self, out: &mut [T], x: &[T]) -> SwiGluActivations<T> {
        let rows = x.len() / self.model;
        let mut acts = SwiGluActivations {
            a: vec![T::ZERO; rows * self.hidden],
            b: vec![T::ZERO; rows * self.hidden],
            h: vec![T::ZERO; rows * self.hidden],
        };
        matmul::forward(&mut acts.a, x, self.w1, self.model, self.hidden);
        matmul::forward(&mut acts.b, x, self.w3, self.model, self.hidden);
        swiglu::forward(&mut acts.h, &acts.a, &acts.b);
        matmul::forward(out, &acts.h, self.w2, self.hidden, self.model);
        acts
    }

    /// Adds the input gradient into `dx` and the weight gradients into `grads`.
    pub fn backward(
        &self,
        dx: &mut [T],
        grads: SwiGluGrads<'_, T>,
        dout: &[T],
        x: &[T],
        acts: &SwiGluActivations<T>,
    ) {
        let n = acts.h.len();
        let mut dh = vec![T::ZERO; n];
        matmul::backward(
            &mut dh,
            grads.w2,
            dout,
            &acts.h,
            self.w2,
            self.hidden,
            self.model,
        );
        let (mut da, mut db) = (vec![T::ZERO; n], vec![T::ZERO; n]);
        swiglu::backward(&mut da, &mut db, &dh, &acts.a, &acts.b);
        matmul::backward(dx, grads.w1, &da, x, self.w1, self.model, self.hidden);
        matmul::backward(dx, grads.w3, &db, x, self.w3, self.model, self.hidden);
    }
}
