//! One SwiGLU MLP (a routed expert, or the fused shared experts) applied to a
//! batch of rows: `out = (silu(x @ w1^T) * (x @ w3^T)) @ w2^T`.

use crate::linear::Linears;
use crate::memory::HeldBytes;
use crate::ops::swiglu;
use crate::scalar::Scalar;

/// Positions of the three matrices in an MLP's [`Linears`].
pub(crate) const W1: usize = 0;
pub(crate) const W3: usize = 1;
pub(crate) const W2: usize = 2;

/// Linear layers in one MLP.
pub const MLP_LINEARS: usize = 3;

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
    /// How the three GEMMs compute, in the order `w1, w3, w2`.
    pub linears: Linears<'a>,
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

impl<T> HeldBytes for SwiGluActivations<T> {
    fn held_bytes(&self) -> usize {
        self.a.held_bytes() + self.b.held_bytes() + self.h.held_bytes()
    }
}

impl<'a, T> SwiGluMlp<'a, T> {
    /// The same MLP with its GEMMs computed as `linears` (`w1, w3, w2`) say.
    pub fn with_linears(self, linears: Linears<'a>) -> Self {
        Self { linears, ..self }
    }
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
        let l = self.linears;
        l.get(W1)
            .forward(&mut acts.a, x, self.w1, self.model, self.hidden);
        l.get(W3)
            .forward(&mut acts.b, x, self.w3, self.model, self.hidden);
        swiglu::forward(&mut acts.h, &acts.a, &acts.b);
        l.get(W2)
            .forward(out, &acts.h, self.w2, self.hidden, self.model);
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
        let l = self.linears;
        l.get(W2).backward(
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
        l.get(W1)
            .backward(dx, grads.w1, &da, x, self.w1, self.model, self.hidden);
        l.get(W3)
            .backward(dx, grads.w3, &db, x, self.w3, self.model, self.hidden);
    }
}
