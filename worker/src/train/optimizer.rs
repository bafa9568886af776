//! AdamW (Loshchilov and Hutter, 2019) on FP32 master weights: Adam's
//! moment estimates with bias correction, and weight decay applied to the
//! weights directly rather than through the gradient, skipped for norm gains.

use std::ops::Range;

use crate::model::{Gradients, Model, ModelConfig};
use crate::settings::OptimizerSettings;

/// The optimizer's state: first and second moments shaped like the weights,
/// and the number of updates taken (for the bias correction).
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    settings: OptimizerSettings,
    pub first_moment: Gradients<f32>,
    pub second_moment: Gradients<f32>,
    pub updates: u64,
}

impl AdamW {
    pub fn new(config: &ModelConfig, settings: OptimizerSettings) -> Self {
        Self::with_experts(config, settings, 0..config.moe.n_routed_experts)
    }

    /// Moments for a model holding only routed experts `experts` (the state
    /// follows the weights: an expert-parallel rank keeps its experts' alone).
    pub fn with_experts(
        config: &ModelConfig,
        settings: OptimizerSettings,
        experts: Range<usize>,
    ) -> Self {
        Self {
            settings,
            first_moment: Gradients::zeros_with_experts(config, experts.clone()),
            second_moment: Gradients::zeros_with_experts(config, experts),
            updates: 0,
        }
    }

    /// One update of every weight of `model` with `grads * grad_scale` (the
    /// scale folds in the gradient-accumulation mean and norm clipping).
    pub fn update(
        &mut self,
        model: &mut Model<f32>,
        grads: &Gradients<f32>,
        grad_scale: f64,
        lr: f64,
    ) {
        self.updates += 1;
        let step = AdamWStep::new(&self.settings, self.updates, lr, grad_scale);
        let config = model.config().clone();
        let decays: Vec<bool> = model.tensors().iter().map(|t| t.kind.decays()).collect();
        let tensors = model
            .weights
            .tensors_mut()
            .into_iter()
            .zip(grads.tensors(&config))
            .zip(self.first_moment.tensors_mut())
            .zip(self.second_moment.tensors_mut())
            .zip(decays);
        for ((((weights, grad), m), v), decays) in tensors {
            let step = if decays { step } else { step.without_decay() };
            step.apply(weights, m, v, grad.values);
        }
    }
}

/// The scalars of one AdamW update, in f32 as the update computes them; the
/// CUDA kernel (kernels/cuda/adamw.cu) takes exactly these and does the same
/// operations in the same order, so both give the same bits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub epsilon: f32,
    /// `1 - lr * weight_decay`, or 1 for tensors that do not decay.
    pub decay_factor: f32,
    /// Bias corrections `1 - beta^t` for update number `t` (from 1).
    pub correction1: f32,
    pub correction2: f32,
    /// Multiplies every gradient (accumulation mean and norm clipping).
    pub grad_scale: f32,
}

impl AdamWStep {
    pub fn new(settings: &OptimizerSettings, update: u64, lr: f64, grad_scale: f64) -> Self {
        let t = update as i32;
        let lr32 = lr as f32;
        Self {
            lr: lr32,
            beta1: settings.beta1 as f32,
            beta2: settings.beta2 as f32,
            epsilon: settings.epsilon as f32,
            decay_factor: 1.0 - lr32 * settings.weight_decay as f32,
            correction1: (1.0 - settings.beta1.powi(t)) as f32,
            correction2: (1.0 - settings.beta2.powi(t)) as f32,
            grad_scale: grad_scale as f32,
        }
    }

    /// The same step for a tensor exempt from weight decay (norm gains).
    pub fn without_decay(self) -> Self {
        Self {
            decay_factor: 1.0,
            ..self
        }
    }

    /// Updates `weights` and both moments in place from `grads`.
    pub fn apply(&self, weights: &mut [f32], m: &mut [f32], v: &mut [f32], grads: &[f32]) {
        assert!(
            weights.len() == m.len() && m.len() == v.len() && v.len() == grads.len(),
            "AdamW tensor shapes"
        );
        let (b1, b2) = (self.beta1, self.beta2);
        for (((w, &g), m), v) in weights.iter_mut().zip(grads).zip(m).zip(v) {
            let g = g * self.grad_scale;
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            let step = (*m / self.correction1) / ((*v / self.correction2).sqrt() + self.epsilon);
            *w = *w * self.decay_factor - self.lr * step;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TensorKind;
    use crate::settings::OptimizerSettings;

    /// A tiny model: vocab 256 is forced by the byte tokenizer, the rest minimal.
    fn config() -> ModelConfig {
        let spec: moe_crds::ModelSpec = serde_json::from_value(serde_json::json!({
            "hiddenSize": 4, "layers": 1, "attentionHeads": 1, "kvHeads": 1, "seqLen": 2,
            "moe": {"experts": 2, "topK": 1, "expertHiddenSize": 2}
        }))
        .unwrap();
        ModelConfig::from_spec(&spec).unwrap()
    }

    fn settings() -> OptimizerSettings {
        OptimizerSettings {
            learning_rate: 0.1,
            min_learning_rate: 0.0,
            warmup_steps: 0,
            weight_decay: 0.5,
            beta1: 0.9,
            beta2: 0.95,
            epsilon: 1e-8,
            grad_clip: 0.0,
        }
    }

    /// The first bias-corrected Adam step moves each weight by `lr` against
    /// the sign of its gradient; decay shrinks matrices by `1 - lr * wd` and
    /// leaves norm gains alone.
    #[test]
    fn first_step_is_sign_descent_with_decoupled_decay_on_matrices_only() {
        let config = config();
        let mut model = Model::<f32>::initial(config.clone(), 1);
        let before = model.clone();
        let mut grads = Gradients::zeros(&config);
        for g in grads.tensors_mut() {
            for (i, v) in g.iter_mut().enumerate() {
                *v = if i % 2 == 0 { 3.0 } else { -0.01 };
            }
        }
        let mut adam = AdamW::new(&config, settings());
        adam.update(&mut model, &grads, 2.0, 0.1);
        for (old, new) in before.tensors().iter().zip(model.tensors()) {
            let decay = if old.kind == TensorKind::Matrix {
                0.95
            } else {
                1.0
            };
            for (i, (&w0, &w1)) in old.values.iter().zip(new.values).enumerate() {
                let sign = if i % 2 == 0 { 1.0 } else { -1.0 };
                let expected = w0 * decay - 0.1 * sign;
                assert!(
                    (w1 - expected).abs() < 1e-5,
                    "{} [{i}]: {w1} vs {expected}",
                    old.name
                );
            }
        }
        assert_eq!(adam.updates, 1);
    }
}
