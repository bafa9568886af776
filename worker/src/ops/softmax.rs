//! Row-wise softmax, shifted by the row maximum so `exp` cannot overflow.

use crate::scalar::Scalar;

/// `probs[r, :] = softmax(logits[r, :])` over rows of width `dim`.
pub fn forward<T: Scalar>(probs: &mut [T], logits: &[T], dim: usize) {
    check_shapes(logits.len(), probs.len(), dim);
    for (p_row, z_row) in probs.chunks_exact_mut(dim).zip(logits.chunks_exact(dim)) {
        let max = z_row.iter().fold(z_row[0], |m, &z| m.max(z));
        let mut sum = T::ZERO;
        for (p, &z) in p_row.iter_mut().zip(z_row) {
            *p = (z - max).exp();
            sum += *p;
        }
        // sum >= 1: the maximum contributes exp(0).
        let inv_sum = T::ONE / sum;
        for p in p_row.iter_mut() {
            *p *= inv_sum;
        }
    }
}

/// Adds `p * (dp - sum(dp * p))` into `dlogits`, row by row (the softmax
/// Jacobian `diag(p) - p p^T` applied to `dprobs`).
pub fn backward<T: Scalar>(dlogits: &mut [T], dprobs: &[T], probs: &[T], dim: usize) {
    check_shapes(probs.len(), dprobs.len(), dim);
    assert_eq!(dlogits.len(), probs.len(), "softmax logit gradient shape");
    let rows = dlogits
        .chunks_exact_mut(dim)
        .zip(dprobs.chunks_exact(dim))
        .zip(probs.chunks_exact(dim));
    for ((dz_row, dp_row), p_row) in rows {
        let projection: T = dp_row.iter().zip(p_row).map(|(&dp, &p)| dp * p).sum();
        for ((dz, &dp), &p) in dz_row.iter_mut().zip(dp_row).zip(p_row) {
            *dz += p * (dp - projection);
        }
    }
}

fn check_shapes(input_len: usize, output_len: usize, dim: usize) {
    assert!(dim > 0, "softmax width must be positive");
    assert!(
        input_len.is_multiple_of(dim) && output_len == input_len,
        "softmax shapes"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_gradient, random};

    #[test]
    fn forward_is_shift_invariant_and_survives_huge_logits() {
        let mut p = [0.0f32; 3];
        // Unshifted, exp(1000) overflows f32; shifted, this is softmax([0, 1, 0]).
        forward(&mut p, &[1000.0, 1001.0, 1000.0], 3);
        let e = 1f32.exp();
        for (got, want) in p
            .iter()
            .zip([1.0 / (2.0 + e), e / (2.0 + e), 1.0 / (2.0 + e)])
        {
            assert!((got - want).abs() < 1e-6, "{p:?}");
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (rows, dim) = (3, 5);
        let logits = random(rows * dim, 31);
        let dprobs = random(rows * dim, 32);
        let loss = |z: &[f64]| {
            let mut p = vec![0.0; z.len()];
            forward(&mut p, z, dim);
            p.iter().zip(&dprobs).map(|(a, b)| a * b).sum::<f64>()
        };
        let mut probs = vec![0.0; logits.len()];
        forward(&mut probs, &logits, dim);
        let mut dlogits = vec![0.0; logits.len()];
        backward(&mut dlogits, &dprobs, &probs, dim);
        assert_gradient("dlogits", &dlogits, &logits, loss);
    }
}
