//! Helpers shared by the ops' unit tests.

use crate::gradcheck::{STEP, max_scaled_error, numeric_gradient};
use crate::rng::SplitMix64;

/// Worst scaled disagreement tolerated between a hand-written backward and
/// central differences, both in `f64`. With [`STEP`] the measured error on
/// these small, smooth losses is 1e-11 to 3e-9; 1e-7 leaves headroom for
/// other seeds while any real bug (a missing term, a wrong index) shows up
/// at 1e-3 or more.
pub const GRADIENT_TOLERANCE: f64 = 1e-7;

/// Magnitude below which gradient entries are compared absolutely: the
/// ops' gradients here are of order 0.1-1.
const GRADIENT_FLOOR: f64 = 1e-2;

/// `n` standard-normal `f64`s from `seed`.
pub fn random(n: usize, seed: u64) -> Vec<f64> {
    SplitMix64::new(seed).normal_vec(n, 1.0)
}

/// Panics unless `analytic` matches the central-difference gradient of `loss` at `at`.
pub fn assert_gradient(what: &str, analytic: &[f64], at: &[f64], loss: impl FnMut(&[f64]) -> f64) {
    let numeric = numeric_gradient(at, STEP, loss);
    let error = max_scaled_error(analytic, &numeric, GRADIENT_FLOOR);
    assert!(
        error < GRADIENT_TOLERANCE,
        "{what}: scaled error {error:e}\nanalytic {analytic:?}\nnumeric  {numeric:?}"
    );
}
