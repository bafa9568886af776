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

/// [`forward`] for f32 with a vectorised `exp` on CPUs with AVX2 and FMA:
/// serving's SwiGLU, where the scalar `exp` was ~6% of a prefill. Within a
/// few ulp of [`forward`] (tested), not its bits; training keeps [`forward`],
/// whose bits its gradient tests pin.
pub fn forward_f32(h: &mut [f32], a: &[f32], b: &[f32]) {
    assert!(a.len() == h.len() && b.len() == h.len(), "swiglu shapes");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        let vectors = h.len() / 8 * 8;
        // SAFETY: AVX2 and FMA checked; the three slices hold `vectors` values.
        unsafe { forward_avx2(&mut h[..vectors], &a[..vectors], &b[..vectors]) };
        forward(&mut h[vectors..], &a[vectors..], &b[vectors..]);
        return;
    }
    forward(h, a, b);
}

/// `h = a / (1 + exp(-a)) * b`, 8 at a time. `exp(x)` for `x` clamped to
/// where it is a normal f32: `x = n ln 2 + r` with `|r| <= ln 2 / 2`, `exp(r)`
/// by its Taylor polynomial to degree 7 (the first term left out is below
/// 6e-9, a tenth of an ulp), times `2^n` put into the exponent bits.
///
/// # Safety
/// AVX2 and FMA; equal lengths, a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_avx2(h: &mut [f32], a: &[f32], b: &[f32]) {
    use std::arch::x86_64::*;
    let ln2_hi = _mm256_set1_ps(0.693_359_4);
    let ln2_lo = _mm256_set1_ps(-2.121_944_4e-4);
    // 1/7!, 1/6!, ..., 1/1!, 1/0!: Horner's order.
    let taylor = [
        1.0 / 5040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ]
    .map(|c| _mm256_set1_ps(c));
    let one = _mm256_set1_ps(1.0);
    for ((h, a), b) in h
        .chunks_exact_mut(8)
        .zip(a.chunks_exact(8))
        .zip(b.chunks_exact(8))
    {
        // SAFETY: each chunk holds 8 values.
        let (va, vb) = unsafe { (_mm256_loadu_ps(a.as_ptr()), _mm256_loadu_ps(b.as_ptr())) };
        let x = _mm256_min_ps(
            _mm256_max_ps(
                _mm256_sub_ps(_mm256_setzero_ps(), va),
                _mm256_set1_ps(-87.0),
            ),
            _mm256_set1_ps(88.0),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, ln2_lo, _mm256_fnmadd_ps(n, ln2_hi, x));
        let mut p = taylor[0];
        for &c in &taylor[1..] {
            p = _mm256_fmadd_ps(p, r, c);
        }
        let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        )));
        let e = _mm256_mul_ps(p, scale);
        let silu = _mm256_div_ps(va, _mm256_add_ps(one, e));
        // SAFETY: the chunk holds 8 values.
        unsafe { _mm256_storeu_ps(h.as_mut_ptr(), _mm256_mul_ps(silu, vb)) };
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

    /// The vectorised SwiGLU against the scalar one computed in f64: a few
    /// ulp everywhere, the tails included.
    #[test]
    fn the_f32_forward_is_within_a_few_ulp() {
        let mut a: Vec<f32> = random(4096, 31).iter().map(|v| 12.0 * *v as f32).collect();
        a.extend([
            0.0, -0.0, 1e-30, -1e-30, 30.0, -30.0, 87.5, -87.5, 100.0, -100.0, 1e4, -1e4,
        ]);
        a.extend((0..4).map(|i| i as f32 * 0.1)); // a ragged tail
        let b: Vec<f32> = random(a.len(), 32).iter().map(|v| *v as f32).collect();
        let mut h = vec![f32::NAN; a.len()];
        forward_f32(&mut h, &a, &b);
        for ((&h, &a), &b) in h.iter().zip(&a).zip(&b) {
            let exact = silu(f64::from(a)) * f64::from(b);
            let error = (f64::from(h) - exact).abs();
            // 4 ulp of the result, or (far in the negative tail, where silu
            // underflows) a value indistinguishable from 0.
            assert!(
                error <= 4.0 * f64::from(f32::EPSILON) * exact.abs() || error < 1e-30,
                "silu({a}) * {b}: {h} vs {exact}"
            );
        }
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
