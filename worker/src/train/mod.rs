//! Single-process training: gradient accumulation over micro-batches,
//! global norm clipping, AdamW with a warm-up + cosine schedule, and the MoE
//! selection-bias update (and, for tensorwise FP8, the amax-history update)
//! after every optimizer step.

pub mod optimizer;
pub mod schedule;

use crate::data::{DataLoader, DataPosition};
use crate::model::{Gradients, Model, ModelConfig};
use crate::settings::TrainingSettings;

pub use optimizer::AdamW;

/// What one optimizer step did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// 1-based: the number of optimizer steps completed after this one.
    pub step: u64,
    /// Mean next-token cross-entropy over the step's micro-batches, in nats.
    pub loss: f64,
    /// Mean sequence-wise balance loss (0 when off).
    pub aux_loss: f64,
    pub learning_rate: f64,
    /// Global L2 norm of the mean gradient, before clipping.
    pub grad_norm: f64,
    pub tokens: usize,
    /// Tokens routed to each expert over the step, one list per MoE block.
    pub expert_loads: Vec<Vec<usize>>,
}

/// The model, its optimizer and the data stream, advanced one step at a time.
#[derive(Clone, Debug)]
pub struct Trainer {
    settings: TrainingSettings,
    model: Model<f32>,
    optimizer: AdamW,
    data: DataLoader,
    grads: Gradients<f32>,
}

/// Everything a checkpoint restores.
#[derive(Clone, Debug)]
pub struct TrainerState {
    pub model: Model<f32>,
    pub first_moment: Gradients<f32>,
    pub second_moment: Gradients<f32>,
    /// Optimizer steps completed.
    pub step: u64,
    pub data: DataPosition,
}

impl Trainer {
    /// Step 0: weights initialised from `settings.seed`, data at the start of its order.
    pub fn new(config: ModelConfig, settings: TrainingSettings, data: DataLoader) -> Self {
        let model = Model::initial(config.clone(), settings.seed);
        let optimizer = AdamW::new(&config, settings.optimizer);
        Self {
            grads: Gradients::zeros(&config),
            settings,
            model,
            optimizer,
            data,
        }
    }

    /// Continues from a checkpoint's state.
    pub fn restore(&mut self, state: TrainerState) {
        self.model = state.model;
        self.optimizer.first_moment = state.first_moment;
        self.optimizer.second_moment = state.second_moment;
        self.optimizer.updates = state.step;
        self.data.restore(state.data);
    }

    pub fn model(&self) -> &Model<f32> {
        &self.model
    }

    pub fn settings(&self) -> &TrainingSettings {
        &self.settings
    }

    pub fn data(&self) -> &DataLoader {
        &self.data
    }

    /// The model, optimizer and data stream, for a device trainer that
    /// keeps this one as its host copy (checkpoints are written from it).
    pub fn parts_mut(&mut self) -> (&mut Model<f32>, &mut AdamW, &mut DataLoader) {
        (&mut self.model, &mut self.optimizer, &mut self.data)
    }

    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    pub fn data_position(&self) -> DataPosition {
        self.data.position()
    }

    /// Optimizer steps completed.
    pub fn steps_done(&self) -> u64 {
        self.optimizer.updates
    }

    /// One optimizer step. `stop` is asked before each micro-batch; when it
    /// answers true the partial step is discarded (data position included)
    /// and `None` returned, leaving the trainer exactly at the last step.
    pub fn step(&mut self, stop: &dyn Fn() -> bool) -> Option<StepReport> {
        let settings = &self.settings;
        let start = self.data.position();
        for g in self.grads.tensors_mut() {
            g.fill(0.0);
        }
        let (mut loss, mut aux_loss, mut tokens) = (0.0, 0.0, 0);
        let mut expert_loads: Vec<Vec<usize>> = Vec::new();
        for _ in 0..settings.micro_steps {
            if stop() {
                self.data.restore(start);
                return None;
            }
            let batch = self.data.next_batch(settings.micro_batch);
            let pass =
                self.model
                    .forward_with(&batch.inputs, &batch.targets, settings.activation_memory);
            self.model.backward(&pass, &mut self.grads);
            loss += pass.cross_entropy;
            aux_loss += pass.aux_loss;
            tokens += batch.inputs.len();
            let loads = pass.expert_loads();
            if expert_loads.is_empty() {
                expert_loads = loads;
            } else {
                for (total, layer) in expert_loads.iter_mut().zip(loads) {
                    for (t, l) in total.iter_mut().zip(layer) {
                        *t += l;
                    }
                }
            }
        }
        let micro_steps = settings.micro_steps as f64;
        // Each micro-batch's gradient is of its own mean loss; their mean is the step's.
        let grad_norm = global_norm(&self.grads, self.model.config()) / micro_steps;
        let clip = settings.optimizer.grad_clip;
        let clip_scale = if clip > 0.0 && grad_norm > clip {
            clip / grad_norm
        } else {
            1.0
        };
        let step = self.optimizer.updates;
        let lr = schedule::learning_rate(&settings.optimizer, step, settings.steps);
        self.optimizer
            .update(&mut self.model, &self.grads, clip_scale / micro_steps, lr);
        self.model.update_selection_biases(&expert_loads);
        self.model.advance_fp8_scales();
        Some(StepReport {
            step: step + 1,
            loss: loss / micro_steps,
            aux_loss: aux_loss / micro_steps,
            learning_rate: lr,
            grad_norm,
            tokens,
            expert_loads,
        })
    }
}

/// L2 norm over every gradient value, accumulated in `f64`.
fn global_norm(grads: &Gradients<f32>, config: &ModelConfig) -> f64 {
    grads
        .tensors(config)
        .iter()
        .flat_map(|t| t.values)
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt()
}
