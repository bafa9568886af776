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
#[inline]
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
    // [`finish_dot`]'s pairwise sums in registers, the same additions in
    // the same order: lanes i + 8 (the two vectors), i + 4 (the 128-bit
    // halves), i + 2, i + 1.
    let eight = _mm256_add_ps(low, high);
    let four = _mm_add_ps(
        _mm256_castps256_ps128(eight),
        _mm256_extractf128_ps::<1>(eight),
    );
    let two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    let one = _mm_add_ss(two, _mm_movehdup_ps(two));
    a[whole..]
        .iter()
        .zip(&b[whole..])
        .fold(_mm_cvtss_f32(one), |acc, (&x, &y)| x.mul_add(y, acc))
}

/// `out[i] = scale · dot_f32(q, row i)` for the `out.len()` rows of
/// `rows`, `stride` values apart (each row's first `q.len()` values): a
/// block of attention scores, each [`dot_f32`]'s bits.
pub(crate) fn scaled_dots(out: &mut [f32], q: &[f32], rows: &[f32], stride: usize, scale: f32) {
    let width = q.len();
    if let Some(last) = out.len().checked_sub(1) {
        assert!(
            rows.len() >= last * stride + width,
            "rows shorter than their count"
        );
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA checked.
        unsafe { scaled_dots_avx2(out, q, rows, stride, scale) };
        return;
    }
    for (i, s) in out.iter_mut().enumerate() {
        *s = scale * dot_f32(q, &rows[i * stride..i * stride + width]);
    }
}

/// [`scaled_dots`] with [`dot_f32_avx2`] inlined into the loop.
///
/// # Safety
/// AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scaled_dots_avx2(out: &mut [f32], q: &[f32], rows: &[f32], stride: usize, scale: f32) {
    let width = q.len();
    for (i, s) in out.iter_mut().enumerate() {
        // SAFETY: AVX2 and FMA (caller); equal lengths.
        *s = scale * unsafe { dot_f32_avx2(q, &rows[i * stride..i * stride + width]) };
    }
}

/// `out += Σ_i weights[i] · row i` over the `weights.len()` rows of
/// `rows`, `stride` values apart (each row's first `out.len()` values),
/// each output's terms added in row order, every product and sum rounded
/// apart (not fused): the bits of the plain loop
/// `for i { for d { out[d] += weights[i] * row[i][d] } }`. Attention's
/// weighted sum of values, page by page.
pub(crate) fn add_weighted_rows(out: &mut [f32], weights: &[f32], rows: &[f32], stride: usize) {
    let width = out.len();
    if let Some(last) = weights.len().checked_sub(1) {
        assert!(
            rows.len() >= last * stride + width,
            "rows shorter than their count"
        );
    }
    #[cfg(target_arch = "x86_64")]
    if width.is_multiple_of(8) && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 checked; the rows hold what the loop reads (asserted).
        unsafe { add_weighted_rows_avx2(out, weights, rows, stride) };
        return;
    }
    for (i, &w) in weights.iter().enumerate() {
        for (o, &x) in out.iter_mut().zip(&rows[i * stride..i * stride + width]) {
            *o += w * x;
        }
    }
}

/// [`add_weighted_rows`] for a width that is a multiple of 8: slabs of up
/// to 64 outputs kept in registers across all the rows.
///
/// # Safety
/// AVX2; `out.len() % 8 == 0`; row `i < weights.len()` has `out.len()`
/// values at `rows[i * stride..]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn add_weighted_rows_avx2(out: &mut [f32], weights: &[f32], rows: &[f32], stride: usize) {
    let mut slab = 0;
    while slab < out.len() {
        let vectors = ((out.len() - slab) / 8).min(8);
        // SAFETY (each arm): `vectors` vectors of 8 from `slab` are in
        // `out` and in every row (caller).
        unsafe {
            match vectors {
                8 => weighted_slab::<8>(out, weights, rows, stride, slab),
                7 => weighted_slab::<7>(out, weights, rows, stride, slab),
                6 => weighted_slab::<6>(out, weights, rows, stride, slab),
                5 => weighted_slab::<5>(out, weights, rows, stride, slab),
                4 => weighted_slab::<4>(out, weights, rows, stride, slab),
                3 => weighted_slab::<3>(out, weights, rows, stride, slab),
                2 => weighted_slab::<2>(out, weights, rows, stride, slab),
                _ => weighted_slab::<1>(out, weights, rows, stride, slab),
            }
        }
        slab += vectors * 8;
    }
}

/// Outputs `slab..slab + 8 V` of [`add_weighted_rows`].
///
/// # Safety
/// AVX2; those outputs exist in `out` and in every row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn weighted_slab<const V: usize>(
    out: &mut [f32],
    weights: &[f32],
    rows: &[f32],
    stride: usize,
    slab: usize,
) {
    use std::arch::x86_64::*;
    // SAFETY (every access): within `out` and the rows (caller).
    unsafe {
        let at = out.as_mut_ptr().add(slab);
        let mut acc: [__m256; V] = std::array::from_fn(|v| _mm256_loadu_ps(at.add(8 * v)));
        for (i, &w) in weights.iter().enumerate() {
            let w = _mm256_set1_ps(w);
            let row = rows.as_ptr().add(i * stride + slab);
            for (v, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_add_ps(*acc, _mm256_mul_ps(w, _mm256_loadu_ps(row.add(8 * v))));
            }
        }
        for (v, acc) in acc.iter().enumerate() {
            _mm256_storeu_ps(at.add(8 * v), *acc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// The block helpers give the bits of their plain loops, for widths
    /// around the 8- and 64-wide slabs and rows with gaps between them.
    #[test]
    fn attention_blocks_are_the_plain_loops_bits() {
        let mut rng = SplitMix64::new(21);
        for width in [8, 16, 24, 64, 72, 128, 136, 5] {
            let stride = width + 3;
            let count = 13;
            let rows: Vec<f32> = rng.normal_vec(count * stride, 1.0);
            let q: Vec<f32> = rng.normal_vec(width, 1.0);
            let mut scores = vec![0.0; count];
            scaled_dots(&mut scores, &q, &rows, stride, 0.125);
            for (i, s) in scores.iter().enumerate() {
                let want = 0.125 * dot_f32(&q, &rows[i * stride..i * stride + width]);
                assert_eq!(s.to_bits(), want.to_bits(), "width {width} row {i}");
            }
            let weights: Vec<f32> = rng.normal_vec(count, 1.0);
            let start: Vec<f32> = rng.normal_vec(width, 1.0);
            let mut got = start.clone();
            add_weighted_rows(&mut got, &weights, &rows, stride);
            let mut want = start;
            for (i, &w) in weights.iter().enumerate() {
                for (o, &x) in want.iter_mut().zip(&rows[i * stride..]) {
                    *o += w * x;
                }
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "width {width}");
        }
    }

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
