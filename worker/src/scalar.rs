//! The element type every op is generic over.
//!
//! Training runs in `f32`; the same code instantiated at `f64` is what the
//! finite-difference gradient checks run, so the checks test the very loops
//! that train rather than a separate reference.

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Div, DivAssign, Mul, MulAssign, Neg, Sub, SubAssign};

/// A real floating-point number: the arithmetic and the few functions the ops need.
pub trait Scalar:
    Copy
    + Default
    + PartialOrd
    + Debug
    + Send
    + Sync
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Sum
{
    const ZERO: Self;
    const ONE: Self;

    /// Rounds an `f64` to this type (exact for `f64`).
    fn from_f64(value: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    /// `self * a + b` as the GEMMs compute it ([`crate::ops::matmul`]):
    /// fused, one rounding, for f32 (the AVX2 kernel's FMA, and the CUDA
    /// exact router's); two roundings for f64, the gradient checks' type,
    /// whose GEMMs no other path has to match and where a software fused
    /// multiply-add would only cost time.
    fn gemm_mul_add(self, a: Self, b: Self) -> Self;
    /// The larger of the two; `self` when they compare equal or either is NaN.
    fn max(self, other: Self) -> Self;
    /// The nearest bf16 value (ties to even), as the device's
    /// `__float2bfloat16_rn` rounds an f32; for f64 from the f64 value.
    fn round_bf16(self) -> Self;

    /// Counts (token counts, dimensions) as a scalar, for means.
    fn from_usize(value: usize) -> Self {
        Self::from_f64(value as f64)
    }

    /// The logistic function 1 / (1 + e^-x), written so it cannot overflow.
    fn sigmoid(self) -> Self {
        if self >= Self::ZERO {
            Self::ONE / (Self::ONE + (-self).exp())
        } else {
            let e = self.exp();
            e / (Self::ONE + e)
        }
    }
}

macro_rules! impl_scalar {
    ($t:ty, $bf16_from:ident, $bf16_to:ident) => {
        impl Scalar for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;

            fn from_f64(value: f64) -> Self {
                value as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn gemm_mul_add(self, a: Self, b: Self) -> Self {
                if std::mem::size_of::<$t>() == 4 {
                    self.mul_add(a, b)
                } else {
                    self * a + b
                }
            }
            fn max(self, other: Self) -> Self {
                if other > self { other } else { self }
            }
            fn round_bf16(self) -> Self {
                half::bf16::$bf16_from(self).$bf16_to()
            }
        }
    };
}

impl_scalar!(f32, from_f32, to_f32);
impl_scalar!(f64, from_f64, to_f64);

#[cfg(test)]
mod tests {
    use super::Scalar;

    #[test]
    fn sigmoid_is_finite_and_symmetric_at_extremes() {
        for x in [-1000.0f64, -30.0, -1.0, 0.0, 1.0, 30.0, 1000.0] {
            let s = Scalar::sigmoid(x);
            assert!(s.is_finite(), "sigmoid({x}) = {s}");
            assert!((s + Scalar::sigmoid(-x) - 1.0).abs() < 1e-15, "x = {x}");
        }
        assert_eq!(Scalar::sigmoid(0.0f32), 0.5);
    }

    /// Round to nearest even on the bits: add just under half an ulp of
    /// bf16 plus the kept part's lowest bit, then truncate.
    fn rne(v: f32) -> f32 {
        let bits = v.to_bits();
        f32::from_bits(bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) & 0xffff_0000)
    }

    #[test]
    fn bf16_rounding_is_to_nearest_even_including_just_off_ties() {
        let tie_down = 1.0 + 2f32.powi(-8); // halfway between 1 and 1 + 2^-7
        let tie_up = 1.0 + 3.0 * 2f32.powi(-8);
        let above_tie = f32::from_bits(tie_down.to_bits() + 1); // one f32 ulp past the tie
        assert_eq!(Scalar::round_bf16(tie_down), 1.0);
        assert_eq!(Scalar::round_bf16(tie_up), 1.0 + 2f32.powi(-6));
        assert_eq!(Scalar::round_bf16(above_tie), 1.0 + 2f32.powi(-7));
        let mut x = 0x9e37_79b9u32;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let v = f32::from_bits(x);
            if v.is_finite() && rne(v).is_finite() {
                assert_eq!(Scalar::round_bf16(v).to_bits(), rne(v).to_bits(), "{v:e}");
            }
        }
    }
}
