//! The two inner loops the ops share.

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
