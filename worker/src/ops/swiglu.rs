//! SiLU and the SwiGLU gate (Shazeer, 2020): `h = silu(a) * b`, where `a` and
//! `b` are two projections of the same input (`w1` and `w3` in Llama/DeepSeek).

use crate::scalar::Scalar;

/// `silu(a) = a * sigmoid(a)`.
pub fn silu<T: Scalar>(a: T) -> T {
    a * a.sigmoid()
}

/// `d silu / da = s + a s (1 - s)` with `s = sigmoid(a)`.
pub fn silu_derivative<T: Scalar>(a: T) -> T {
    let s = a.sigmoid();
    s * (T::ONE + a * (T::ONE - s))
}

/// `h = silu(a) * b`, elementwise.
pub fn forward<T: Scalar>(h: &mut [T], a: &[T], b: &[T]) {
    assert!(a.len() == h.len() && b.len() == h.len(), "swiglu shapes");
    for ((hi, &ai), &bi) in h.iter_mut().zip(a).zip(b) {
        *hi = silu(ai) * bi;
    }
}

/// Adds `dh * b * silu'(a)` into `da` and `dh * silu(a)` into `db`.
pub fn backward<T: Scalar>(da: &mut [T], db: &mut [T], dh: &[T], a: &[T], b: &[T]) {
    let n = dh.len();
    assert!(
        da.len() == n && db.len() == n && a.len() == n && b.len() == n,
        "swiglu shapes"
    );
    for i in 0..n {
        da[i] += dh[i] * b[i] * silu_derivative(a[i]);
        db[i] += dh[i] * silu(a[i]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_gradient, random};

    #[test]
    fn silu_known_values() {
        assert_eq!(silu(0.0f64), 0.0);
        assert!((silu(1.0f64) - 1.0 / (1.0 + (-1.0f64).exp())).abs() < 1e-15);
        // Large negative inputs go to -0 rather than NaN; large positive ones to the identity.
        assert_eq!(silu(-1000.0f32), 0.0);
        assert_eq!(silu(1000.0f32), 1000.0);
    }

    #[test]
    fn backward_matches_finite_differences() {
        // Spread wide enough to cover both tails of the sigmoid.
        let a: Vec<f64> = random(12, 21).iter().map(|v| 3.0 * v).collect();
        let b = random(12, 22);
        let dh = random(12, 23);
        let loss = |a: &[f64], b: &[f64]| {
            let mut h = vec![0.0; a.len()];
            forward(&mut h, a, b);
            h.iter().zip(&dh).map(|(x, d)| x * d).sum::<f64>()
        };
        let (mut da, mut db) = (vec![0.0; 12], vec![0.0; 12]);
        backward(&mut da, &mut db, &dh, &a, &b);
        assert_gradient("da", &da, &a, |v| loss(v, &b));
        assert_gradient("db", &db, &b, |v| loss(&a, v));
    }
}
