//! Delayed scaling, the tensorwise recipe kept for comparison with the
//! blockwise one (Transformer Engine's `DelayedScaling`): one scale per
//! tensor, taken from the largest amax seen over the last
//! [`HISTORY_LEN`] training steps rather than from the tensor itself, so a
//! GPU kernel knows the scale before it reads the tensor. The price is that
//! a tensor larger than anything in its history saturates at `448 × scale`.
//!
//! Scales change only between steps ([`DelayedScale::advance`]): every
//! micro-batch of a step, and the forward and backward GEMMs of each, use
//! the same scale. Until a tensor has any history (its first step, or after
//! a resume: histories are not checkpointed) it is scaled by its own amax.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::fp8::quantize::scale_for_amax;

/// Steps of amax history a delayed scale looks back over.
pub const HISTORY_LEN: usize = 16;

/// One tensor's amax history and the amax observed in the current step.
#[derive(Debug, Default)]
pub struct DelayedScale {
    /// Newest last; at most [`HISTORY_LEN`] entries.
    history: VecDeque<f32>,
    /// The bits of the largest amax observed this step. Amaxes are finite
    /// and non-negative, and for those f32 bit patterns order like the
    /// values, so `fetch_max` on the bits is a max of the values. Atomic so
    /// that the forward and backward passes (which only borrow the model)
    /// can record what they see.
    observed: AtomicU32,
}

impl Clone for DelayedScale {
    fn clone(&self) -> Self {
        Self {
            history: self.history.clone(),
            observed: AtomicU32::new(self.observed.load(Ordering::Relaxed)),
        }
    }
}

impl DelayedScale {
    /// The scale for a tensor whose own amax is `current`: from the history
    /// when there is one, else just in time from `current`.
    pub fn scale(&self, current: f32) -> f32 {
        let history_max = self.history.iter().copied().reduce(f32::max);
        scale_for_amax(history_max.unwrap_or(current))
    }

    /// Records a tensor's amax for the history; NaN and infinities are
    /// ignored so one bad step cannot poison 16 steps of scales.
    pub fn observe(&self, amax: f32) {
        if amax.is_finite() && amax > 0.0 {
            self.observed.fetch_max(amax.to_bits(), Ordering::Relaxed);
        }
    }

    /// The largest amax observed this step (0 when none was).
    pub fn observed(&self) -> f32 {
        f32::from_bits(self.observed.load(Ordering::Relaxed))
    }

    /// Ends a step: the step's amax (if the tensor was seen) joins the
    /// history, the oldest entry leaving once there are [`HISTORY_LEN`].
    pub fn advance(&mut self) {
        let observed = std::mem::take(self.observed.get_mut());
        if observed != 0 {
            if self.history.len() == HISTORY_LEN {
                self.history.pop_front();
            }
            self.history.push_back(f32::from_bits(observed));
        }
    }

    /// Forgets what was observed since the last step: forward passes that
    /// train nothing (an evaluation) must not steer the next scales.
    pub fn forget_observed(&mut self) {
        *self.observed.get_mut() = 0;
    }

    /// The amaxes of past steps, oldest first.
    pub fn history(&self) -> impl Iterator<Item = f32> + '_ {
        self.history.iter().copied()
    }
}

/// The three tensors of one linear layer's GEMMs that get their own scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The layer's input `x` (forward and weight gradient).
    Input,
    /// The weight `w` (forward and input gradient).
    Weight,
    /// The gradient of the layer's output (both backward GEMMs).
    GradOutput,
}

/// The delayed scales of one linear layer.
#[derive(Clone, Debug, Default)]
pub struct LinearScales {
    pub input: DelayedScale,
    pub weight: DelayedScale,
    pub grad_output: DelayedScale,
}

impl LinearScales {
    pub fn role(&self, role: Role) -> &DelayedScale {
        match role {
            Role::Input => &self.input,
            Role::Weight => &self.weight,
            Role::GradOutput => &self.grad_output,
        }
    }

    /// [`DelayedScale::advance`] for all three.
    pub fn advance(&mut self) {
        self.input.advance();
        self.weight.advance();
        self.grad_output.advance();
    }

    /// [`DelayedScale::forget_observed`] for all three.
    pub fn forget_observed(&mut self) {
        self.input.forget_observed();
        self.weight.forget_observed();
        self.grad_output.forget_observed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_history_the_tensor_scales_itself() {
        let scale = DelayedScale::default();
        assert_eq!(scale.scale(4.48), 0.01);
        scale.observe(4.48);
        assert_eq!(
            scale.scale(100.0),
            100.0 / 448.0,
            "no history until advance"
        );
    }

    #[test]
    fn the_scale_comes_from_the_largest_of_the_last_16_steps() {
        let mut scale = DelayedScale::default();
        scale.observe(1000.0);
        scale.advance();
        for step in 0..HISTORY_LEN - 1 {
            // Several observations in a step: their max counts.
            scale.observe(step as f32);
            scale.observe(0.5);
            scale.advance();
        }
        assert_eq!(scale.scale(1.0), 1000.0 / 448.0);
        scale.observe(2.0);
        scale.advance(); // pushes 1000 out
        assert_eq!(scale.history().count(), HISTORY_LEN);
        assert_eq!(scale.scale(1.0), 14.0 / 448.0);
    }

    #[test]
    fn unseen_steps_and_bad_amaxes_leave_the_history_alone() {
        let mut scale = DelayedScale::default();
        scale.advance();
        scale.observe(f32::NAN);
        scale.observe(f32::INFINITY);
        scale.observe(0.0);
        scale.advance();
        assert_eq!(scale.history().count(), 0);
        scale.observe(3.0);
        let copy = scale.clone();
        scale.advance();
        assert_eq!(scale.history().collect::<Vec<_>>(), [3.0]);
        let mut copy = copy;
        copy.advance();
        assert_eq!(
            copy.history().collect::<Vec<_>>(),
            [3.0],
            "clone keeps the observation"
        );
    }
}
