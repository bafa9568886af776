//! The inner loops the ops share.

use crate::scalar::Scalar;

pub(crate) fn dot<T: Scalar>(a: &[T], b: &[T]) -> T {
    a.iter().zip(b).fold(T::ZERO, |acc, (&x, &y)| acc + x * y)
}

/// `y += alpha * x`.
pub(crate) fn axpy<T: Scalar>(y: &mut [T], alpha: T, x: &[T]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

/// `y += alpha * x` with the GEMMs' multiply-add ([`Scalar::gemm_mul_add`]):
/// the portable loops of [`crate::ops::matmul`], which must give the AVX2
/// kernel's bits.
pub(crate) fn gemm_axpy<T: Scalar>(y: &mut [T], alpha: T, x: &[T]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi = alpha.gemm_mul_add(xi, *yi);
    }
}

/// `Σ a[i] b[i]` for f32 in 16 interleaved partial sums (AVX2 and FMA where
/// the CPU has them, else the same order in portable code), added up in a
/// fixed order: not [`dot`]'s sequential chain, whose four-cycle add
/// latency per element made serving's attention scores a sixteenth of a
/// prefill. The result depends only on `a` and `b`.
pub(crate) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot lengths");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA checked; equal lengths.
        return unsafe { dot_f32_avx2(a, b) };
    }
    let mut lanes = [0.0f32; 16];
    let whole = a.len() / 16 * 16;
    for (x, y) in a[..whole].chunks_exact(16).zip(b[..whole].chunks_exact(16)) {
        for ((lane, &x), &y) in lanes.iter_mut().zip(x).zip(y) {
            *lane = x.mul_add(y, *lane);
        }
    }
    finish_dot(lanes, &a[whole..], &b[whole..])
}

/// The partial sums added pairwise (lane `i` with `i + 8`, then `i + 4`,
/// then `i + 2`, then `i + 1`), then the tail in order.
fn finish_dot(mut lanes: [f32; 16], a: &[f32], b: &[f32]) -> f32 {
    for width in [8, 4, 2, 1] {
        for i in 0..width {
            lanes[i] += lanes[i + width];
        }
    }
    a.iter()
        .zip(b)
        .fold(lanes[0], |acc, (&x, &y)| x.mul_add(y, acc))
}

/// # Safety
/// AVX2 and FMA; equal lengths.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let (mut low, mut high) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let whole = a.len() / 16 * 16;
    for (x, y) in a[..whole].chunks_exact(16).zip(b[..whole].chunks_exact(16)) {
        // SAFETY: each chunk holds 16 values.
        unsafe {
            low = _mm256_fmadd_ps(
                _mm256_loadu_ps(x.as_ptr()),
                _mm256_loadu_ps(y.as_ptr()),
                low,
            );
            high = _mm256_fmadd_ps(
                _mm256_loadu_ps(x.as_ptr().add(8)),
                _mm256_loadu_ps(y.as_ptr().add(8)),
                high,
            );
        }
    }
    let mut lanes = [0.0f32; 16];
    // SAFETY: `lanes` holds 16 values.
    unsafe {
        _mm256_storeu_ps(lanes.as_mut_ptr(), low);
        _mm256_storeu_ps(lanes.as_mut_ptr().add(8), high);
    }
    finish_dot(lanes, &a[whole..], &b[whole..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// The vector and portable orders agree to the bit, and both are close
    /// to the sum in f64, for lengths around the 16-wide blocks.
    #[test]
    fn dot_f32_is_one_order_everywhere_and_accurate() {
        let mut rng = SplitMix64::new(8);
        for n in [0, 1, 7, 15, 16, 17, 64, 100, 128] {
            let a: Vec<f32> = rng.normal_vec(n, 1.0);
            let b: Vec<f32> = rng.normal_vec(n, 1.0);
            let got = dot_f32(&a, &b);
            let mut lanes = [0.0f32; 16];
            let whole = n / 16 * 16;
            for (i, (&x, &y)) in a[..whole].iter().zip(&b[..whole]).enumerate() {
                lanes[i % 16] = x.mul_add(y, lanes[i % 16]);
            }
            assert_eq!(
                got.to_bits(),
                finish_dot(lanes, &a[whole..], &b[whole..]).to_bits(),
                "n = {n}"
            );
            let exact: f64 = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| f64::from(x) * f64::from(y))
                .sum();
            let magnitude: f64 = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| f64::from(x * y).abs())
                .sum();
            assert!(
                (f64::from(got) - exact).abs() <= 1e-6 * magnitude.max(1e-30),
                "n = {n}"
            );
        }
    }
}
