//! The learning-rate schedule: linear warm-up, then cosine decay to the minimum.

use crate::settings::OptimizerSettings;

/// Learning rate of 0-based optimizer step `step` out of `total`.
///
/// Warm-up steps `0..warmup` ramp linearly to the peak, reaching it at the
/// last warm-up step (so step 0 is not wasted at zero); the remaining steps
/// follow half a cosine from the peak towards `min_learning_rate`.
pub fn learning_rate(settings: &OptimizerSettings, step: u64, total: u64) -> f64 {
    let (peak, floor, warmup) = (
        settings.learning_rate,
        settings.min_learning_rate,
        settings.warmup_steps,
    );
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / decay_steps as f64).min(1.0);
    floor + 0.5 * (peak - floor) * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> OptimizerSettings {
        OptimizerSettings {
            learning_rate: 1.0,
            min_learning_rate: 0.1,
            warmup_steps: 4,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.95,
            epsilon: 1e-8,
            grad_clip: 0.0,
        }
    }

    #[test]
    fn warms_up_linearly_then_decays_by_cosine_to_the_minimum() {
        let s = settings();
        let lr = |step| learning_rate(&s, step, 14);
        assert_eq!([lr(0), lr(1), lr(3)], [0.25, 0.5, 1.0]);
        assert_eq!(lr(4), 1.0);
        // Halfway through the 10 decay steps: the midpoint of peak and floor.
        assert!((lr(9) - 0.55).abs() < 1e-12);
        assert!(lr(13) > 0.1 && lr(13) < 0.13);
        let decay: Vec<f64> = (4..14).map(lr).collect();
        assert!(decay.windows(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn no_warmup_starts_at_the_peak() {
        let s = OptimizerSettings {
            warmup_steps: 0,
            ..settings()
        };
        assert_eq!(learning_rate(&s, 0, 10), 1.0);
    }
}
