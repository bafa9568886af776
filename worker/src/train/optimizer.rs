//! AdamW (Loshchilov and Hutter, 2019) on FP32 master weights: Adam's
//! moment estimates with bias correction, and weight decay applied to the
//! weights directly rather than through the gradient, skipped for norm gains.

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
        Self {
            settings,
            first_moment: Gradients::zeros(config),
            second_moment: Gradients::zeros(config),
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
        let s = self.settings;
        self.updates += 1;
        let t = self.updates as i32;
        let (b1, b2) = (s.beta1 as f32, s.beta2 as f32);
        let correction1 = (1.0 - s.beta1.powi(t)) as f32;
        let correction2 = (1.0 - s.beta2.powi(t)) as f32;
        let (lr, eps, scale) = (lr as f32, s.epsilon as f32, grad_scale as f32);
        let config = model.config().clone();
        let decays: Vec<bool> = model.tensors().iter().map(|t| t.kind.decays()).collect();
        let decay_factor = 1.0 - lr * s.weight_decay as f32;
        let tensors = model
            .weights
            .tensors_mut()
            .into_iter()
            .zip(grads.tensors(&config))
            .zip(self.first_moment.tensors_mut())
            .zip(self.second_moment.tensors_mut())
            .zip(decays);
        for ((((weights, grad), m), v), decays) in tensors {
            let decay = if decays { decay_factor } else { 1.0 };
            let per_value = weights
                .iter_mut()
                .zip(grad.values)
                .zip(m.iter_mut())
                .zip(v.iter_mut());
            for (((w, &g), m), v) in per_value {
                let g = g * scale;
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                let step = (*m / correction1) / ((*v / correction2).sqrt() + eps);
                *w = *w * decay - lr * step;
            }
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
