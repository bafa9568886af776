//! Finite-difference gradient checking, the ground truth every hand-written
//! backward is held to (in this crate's tests, and later for the CUDA ops).
//!
//! Central differences in `f64`: the truncation error is O(h^2) and the
//! rounding error about `f64::EPSILON * |loss| / h`; [`STEP`] balances the two
//! for losses of order 1-100, leaving errors near 1e-9 relative to the gradient.

/// Default step for [`numeric_gradient`].
pub const STEP: f64 = 1e-5;

/// d loss / d values, by central differences: each element moved by ±`step`
/// in turn (the others held fixed), and `loss` evaluated on the moved copy.
pub fn numeric_gradient(
    values: &[f64],
    step: f64,
    mut loss: impl FnMut(&[f64]) -> f64,
) -> Vec<f64> {
    let mut moved = values.to_vec();
    (0..values.len())
        .map(|i| {
            moved[i] = values[i] + step;
            let up = loss(&moved);
            moved[i] = values[i] - step;
            let down = loss(&moved);
            moved[i] = values[i];
            (up - down) / (2.0 * step)
        })
        .collect()
}

/// The largest elementwise disagreement, each scaled by the larger magnitude
/// of the pair or by `floor`, whichever is larger. The floor keeps entries
/// whose true gradient is (near) zero from turning rounding noise into a huge
/// relative error; set it near the typical gradient magnitude.
///
/// Returns 0 for empty inputs. The slices must have the same length.
pub fn max_scaled_error(analytic: &[f64], numeric: &[f64], floor: f64) -> f64 {
    assert_eq!(analytic.len(), numeric.len(), "gradient lengths differ");
    analytic
        .iter()
        .zip(numeric)
        .map(|(&a, &n)| (a - n).abs() / floor.max(a.abs()).max(n.abs()))
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_a_known_gradient_and_flags_a_wrong_one() {
        // loss = sum x_i^3, gradient 3 x_i^2.
        let x = [0.5, -1.5, 2.0];
        let numeric = numeric_gradient(&x, STEP, |v| v.iter().map(|a| a * a * a).sum());
        let exact: Vec<f64> = x.iter().map(|a| 3.0 * a * a).collect();
        assert!(max_scaled_error(&exact, &numeric, 1.0) < 1e-9);
        let wrong: Vec<f64> = x.iter().map(|a| 3.0 * a * a * 1.001).collect();
        assert!(max_scaled_error(&wrong, &numeric, 1.0) > 1e-4);
    }
}
