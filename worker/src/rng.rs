//! A small seeded generator for parameter initialisation and tests.
//!
//! SplitMix64 (Steele, Lea and Flood, 2014): a 64-bit state, one add and a
//! mixing function per draw. It is not cryptographic; what matters here is
//! that a seed reproduces the same weights on every machine and backend.

use crate::scalar::Scalar;

/// A SplitMix64 stream.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The whole state: `SplitMix64::new(state)` continues the stream from
    /// here, which is how a data position is saved and restored.
    pub fn state(&self) -> u64 {
        self.state
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), with the 53 bits an `f64` mantissa holds.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [0, n); `n` must be positive. The modulo bias is below 2^-40
    /// for any `n` under 2^24, far below what initialisation or sampling notice.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// A standard normal draw (Box-Muller; one of the pair is discarded to keep
    /// the generator stateless beyond its counter).
    pub fn normal(&mut self) -> f64 {
        // 1 - u lies in (0, 1], so the logarithm is finite.
        let radius = (-2.0 * (1.0 - self.uniform()).ln()).sqrt();
        let angle = std::f64::consts::TAU * self.uniform();
        radius * angle.cos()
    }

    /// `n` draws from N(0, std^2).
    pub fn normal_vec<T: Scalar>(&mut self, n: usize, std: f64) -> Vec<T> {
        (0..n).map(|_| T::from_f64(std * self.normal())).collect()
    }

    /// Moves the stream past `n` [`Self::normal`] draws without making
    /// them, in O(1): the state is a counter and a normal takes two steps
    /// of it. So a rank can draw its slice of a tensor exactly as one
    /// process draws it, without the rest.
    pub fn skip_normals(&mut self, n: usize) {
        let steps = (n as u64).wrapping_mul(2);
        self.state = self
            .state
            .wrapping_add(steps.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    }
}

#[cfg(test)]
mod tests {
    use super::SplitMix64;

    #[test]
    fn same_seed_same_stream_and_different_seed_differs() {
        let a: Vec<u64> = {
            let mut r = SplitMix64::new(7);
            (0..4).map(|_| r.next_u64()).collect()
        };
        let mut r = SplitMix64::new(7);
        assert!(a.iter().all(|&v| v == r.next_u64()));
        assert_ne!(SplitMix64::new(8).next_u64(), a[0]);
    }

    #[test]
    fn skipping_normals_lands_where_drawing_them_does() {
        let mut drawn = SplitMix64::new(11);
        let all: Vec<f64> = drawn.normal_vec(10, 1.0);
        let mut skipped = SplitMix64::new(11);
        skipped.skip_normals(4);
        let middle: Vec<f64> = skipped.normal_vec(3, 1.0);
        assert_eq!(middle, all[4..7]);
        skipped.skip_normals(3);
        assert_eq!(skipped.state(), drawn.state());
    }

    #[test]
    fn normal_draws_have_unit_moments() {
        let mut r = SplitMix64::new(1);
        let n = 100_000;
        let draws: Vec<f64> = (0..n).map(|_| r.normal()).collect();
        let mean = draws.iter().sum::<f64>() / n as f64;
        let var = draws.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / n as f64;
        // Standard errors are 1/sqrt(n) ≈ 0.003 for the mean and ≈ 0.0045 for the variance.
        assert!(mean.abs() < 0.015, "mean {mean}");
        assert!((var - 1.0).abs() < 0.025, "variance {var}");
    }
}
