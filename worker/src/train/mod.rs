//! Training steps: gradient accumulation over micro-batches, global norm
//! clipping, AdamW with a warm-up + cosine schedule, and the MoE
//! selection-bias update (and, for tensorwise FP8, the amax-history update)
//! after every optimizer step; alone ([`Trainer::step`]) or as one rank of
//! a data-, expert- and sequence-parallel gang ([`Trainer::step_parallel`]).

pub mod balance;
pub mod lora;
pub mod optimizer;
pub mod schedule;

use std::ops::Range;

use crate::data::{Batch, DataLoader, DataPosition};
use crate::dist::expert_parallel::{self, ExpertParallel};
use crate::dist::sequence_parallel::SequenceParallel;
use crate::dist::{Collective, DistError, data_parallel};
use crate::model::{Gradients, Model, ModelConfig, Parallel, TensorBytes, flops};
use crate::ops::cross_entropy::{LossScale, trained_targets};
use crate::settings::TrainingSettings;

use lora::Lora;
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
    /// Tokens of the step's global batch (every replica's).
    pub tokens: usize,
    /// Those of them whose next token is in the loss: every one for text;
    /// the assistant's, for conversations (the rest are context and padding).
    pub trained_tokens: usize,
    /// Tokens routed to each expert over the step (by every replica), one
    /// list per MoE block.
    pub expert_loads: Vec<Vec<usize>>,
    /// Model FLOPs of the step as it ran (every replica's): each
    /// micro-batch's tokens at the length they attended over
    /// ([`crate::model::flops::batch_flops`]), so a micro-batch cut to its
    /// longest conversation counts what it computed, not its padding. What
    /// MFU divides by the time.
    pub flops: f64,
}

/// The model, its optimizer and the data stream, advanced one step at a time.
#[derive(Clone, Debug)]
pub struct Trainer {
    settings: TrainingSettings,
    model: Model<f32>,
    optimizer: AdamW,
    data: DataLoader,
    grads: Gradients<f32>,
    /// `training.lora`: the adapters trained instead of the model.
    lora: Option<Lora>,
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
    /// The adapters of a `training.lora` run (`model` holds the merged weights).
    pub lora: Option<Lora>,
}

impl Trainer {
    /// Step 0: weights initialised from `settings.seed`, data at the start of its order.
    pub fn new(config: ModelConfig, settings: TrainingSettings, data: DataLoader) -> Self {
        let experts = 0..config.moe.n_routed_experts;
        Self::new_with_experts(config, settings, data, experts)
    }

    /// [`Self::new`] for a rank of an expert-parallel group: the MoE layers
    /// hold only routed experts `experts` (the rank's own; see
    /// [`crate::dist::layout::Layout::local_experts`]), and so do the
    /// gradients and both AdamW moments. Those experts start with the
    /// values one process gives them.
    pub fn new_with_experts(
        config: ModelConfig,
        settings: TrainingSettings,
        data: DataLoader,
        experts: Range<usize>,
    ) -> Self {
        let model = Model::initial_with_experts(config.clone(), settings.seed, experts.clone());
        let optimizer = AdamW::with_experts(&config, settings.optimizer, experts.clone());
        let lora = settings
            .lora
            .clone()
            .map(|lora| Lora::new(lora, &model, settings.seed));
        // With adapters only the adapted weights' gradients are needed
        // (the adapters' come from them): the frozen ones are neither
        // computed nor held.
        let grads = match &settings.lora {
            Some(lora) => {
                Gradients::zeros_keeping(&config, experts, |name| lora.target_of(name).is_some())
            }
            None => Gradients::zeros_with_experts(&config, experts),
        };
        Self {
            grads,
            settings,
            model,
            optimizer,
            data,
            lora,
        }
    }

    /// Starts from `model` (pretrained weights) instead of the seed's: at
    /// step 0, with zero moments. It holds this trainer's experts.
    pub fn start_from(&mut self, model: Model<f32>) {
        assert_eq!(
            model.held_experts(),
            self.held_experts(),
            "a pretrained model holds this trainer's experts"
        );
        assert_eq!(
            self.optimizer.updates, 0,
            "only a fresh trainer starts over"
        );
        // The adapters go on the weights the run starts from.
        if let Some(lora) = &mut self.lora {
            *lora = Lora::new(lora.settings().clone(), &model, self.settings.seed);
        }
        self.model = model;
    }

    /// The routed experts this trainer holds (weights, gradients, moments).
    pub fn held_experts(&self) -> Range<usize> {
        self.model.held_experts()
    }

    /// Bytes this trainer holds in weights, gradients and both AdamW
    /// moments, routed experts apart: with expert parallelism `ep` the
    /// routed experts' part is `1/ep` of one process's.
    pub fn state_bytes(&self) -> TensorBytes {
        let weights = self.model.weights.tensor_bytes() + self.grads.tensor_bytes();
        match &self.lora {
            None => {
                weights
                    + self.optimizer.first_moment.tensor_bytes()
                    + self.optimizer.second_moment.tensor_bytes()
            }
            // The weights' moments are allocated zeroed and never written
            // (nor checkpointed), so their pages are never mapped in.
            Some(lora) => {
                weights
                    + TensorBytes {
                        routed_experts: 0,
                        replicated: lora.bytes(),
                    }
            }
        }
    }

    /// Continues from a checkpoint's state, which must hold the same routed
    /// experts as this trainer ([`crate::checkpoint::load`] reads those),
    /// and adapters exactly when this trainer has them (their settings are
    /// this trainer's: [`Self::restorable`]).
    pub fn restore(&mut self, state: TrainerState) {
        assert_eq!(
            state.model.held_experts(),
            self.held_experts(),
            "a restored state holds this trainer's experts"
        );
        assert_eq!(
            state.lora.is_some(),
            self.lora.is_some(),
            "a restored state has adapters exactly when this trainer trains them"
        );
        self.lora = state.lora;
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

    /// The adapters, when `training.lora` trains them.
    pub fn lora(&self) -> Option<&Lora> {
        self.lora.as_ref()
    }

    /// The adapters' gradients from this rank's weight gradients, when
    /// adapters train.
    fn adapter_gradients(&self) -> Option<Vec<lora::AdapterGrads<f32>>> {
        self.lora
            .as_ref()
            .map(|lora| lora.gradients(&self.grads, self.model.config()))
    }

    /// The adapters, for a device trainer bringing this host copy up to date.
    pub fn lora_mut(&mut self) -> Option<&mut Lora> {
        self.lora.as_mut()
    }

    /// Whether `state` can continue this trainer's run as far as adapters
    /// go: none on either side, or the same `training.lora`. The problem,
    /// if not, names `training.lora`.
    pub fn restorable(&self, state: &TrainerState) -> Result<(), String> {
        match (&self.lora, &state.lora) {
            (None, None) => Ok(()),
            (Some(_), None) => Err("the checkpoint was trained without training.lora, this run trains adapters: start LoRA from it with model.initFrom instead".to_owned()),
            (None, Some(_)) => Err("the checkpoint holds training.lora adapters, this run has no training.lora".to_owned()),
            // The checkpoint's adapters are laid out for its settings on
            // this model (`checkpoint::load`), so equal settings suffice.
            (Some(mine), Some(theirs)) if mine.settings() != theirs.settings() => Err(format!(
                "the checkpoint's adapters were trained with {:?}, this run asks for {:?}",
                theirs.settings().spec(),
                mine.settings().spec()
            )),
            (Some(_), Some(_)) => Ok(()),
        }
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
        let start = self.data.position();
        let step = draw_step(&mut self.data, &self.settings, Shard::WHOLE, None, None)
            .expect("a single process has no peers to fail");
        let accumulated = self
            .accumulate(stop, step, start, Parallel::default())
            .expect("a single process has no peers to fail")?;
        let grads = self.adapter_gradients();
        let grad_norm = match &grads {
            Some(grads) => lora::global_norm(grads),
            None => global_norm(&self.grads, self.model.config()),
        };
        Some(self.apply(accumulated, grad_norm, grads))
    }

    /// One optimizer step as one data-parallel replica of `dp`'s ranks:
    /// this rank's shard of the global batch ([`Shard`]), then, before the
    /// norm, clipping and update, the gradients averaged over `dp`
    /// (bucketed), the expert loads summed (so every replica's selection
    /// biases move alike) and the losses averaged. Every rank must call it
    /// at the same step; with a world of one it is [`Self::step`].
    ///
    /// `stop` as for [`Self::step`], but a rank that stops mid-step leaves
    /// its peers waiting in the reduction: distributed runs pass a `stop`
    /// that is false and agree on stopping between steps instead.
    ///
    /// After an `Err` (a peer failed) the step is half done: the trainer
    /// must not step again, only be dropped (the run restarts from its
    /// last checkpoint).
    pub fn step_with(
        &mut self,
        stop: &dyn Fn() -> bool,
        dp: &mut dyn Collective,
    ) -> Result<Option<StepReport>, DistError> {
        self.step_parallel(stop, dp, Parallel::default())
    }

    /// [`Self::step_with`] with the MoE layers' routed experts spread over
    /// `experts` (expert parallelism × data parallelism over `world`): every
    /// rank of `world` reads its own shard of the batch; the replicated
    /// weights' gradients are averaged over `world`, the owned experts' over
    /// their replicas; the expert loads summed over `world` (the router and
    /// the selection biases are replicated, and see every token).
    pub fn step_expert_parallel(
        &mut self,
        stop: &dyn Fn() -> bool,
        world: &mut dyn Collective,
        experts: &ExpertParallel,
    ) -> Result<Option<StepReport>, DistError> {
        let parallel = Parallel {
            experts: Some(experts),
            ..Parallel::default()
        };
        self.step_parallel(stop, world, parallel)
    }

    /// [`Self::step_expert_parallel`] with each sequence split over
    /// `parallel.sequence` (Ulysses; its groups are blocks of consecutive
    /// ranks of `world`, as [`crate::dist::layout`] makes them): the ranks of
    /// a sequence group read the same sequences (one data-parallel shard)
    /// and each trains on its slice of every sequence. Every rank's loss is
    /// the mean over as many tokens, so the world's mean of them is the
    /// global batch's mean, and the world's mean of the ranks' gradients is
    /// its gradient: replicated weights are still averaged over `world`.
    /// The sequence-wise balance loss is the whole sequences' on every rank
    /// of a group (their statistics summed over it), and each rank's
    /// gradient of it is scaled like its cross-entropy's, so both means hold
    /// for it too ([`crate::moe::balance::SlicedBalanceLoss`]).
    pub fn step_parallel(
        &mut self,
        stop: &dyn Fn() -> bool,
        world: &mut dyn Collective,
        parallel: Parallel<'_>,
    ) -> Result<Option<StepReport>, DistError> {
        let sp = parallel.sequence.map_or(1, SequenceParallel::size);
        let shard = Shard {
            rank: world.rank() / sp,
            ranks: world.size() / sp,
        };
        let start = self.data.position();
        let step = draw_step(
            &mut self.data,
            &self.settings,
            shard,
            parallel.sequence,
            Some(world),
        )?;
        let Some(mut acc) = self.accumulate(stop, step, start, parallel)? else {
            return Ok(None);
        };
        let bucket = data_parallel::BUCKET_FLOATS;
        // Only adapters train: their gradients, from this rank's weight
        // gradients, are all a step exchanges (the projection is linear, so
        // the ranks' mean of them is the mean gradient's): messages the
        // size of the adapters, not of the model. They sit on replicated
        // tensors only (no routed expert's under expert parallelism), so
        // the mean is over `world`, as the replicated weights' is.
        let mut adapter_grads = self.adapter_gradients();
        let grad_norm = match (&mut adapter_grads, parallel.experts) {
            (Some(grads), _) => {
                let mut flat: Vec<&mut Vec<f32>> = grads
                    .iter_mut()
                    .flat_map(|g| [&mut g.a, &mut g.b])
                    .collect();
                data_parallel::all_reduce_mean(world, &mut flat, bucket)?;
                lora::global_norm(grads)
            }
            (None, None) => {
                data_parallel::all_reduce_mean(world, &mut self.grads.tensors_mut(), bucket)?;
                global_norm(&self.grads, self.model.config())
            }
            (None, Some(ep)) => {
                let config = self.model.config();
                let is_expert: Vec<bool> = self
                    .grads
                    .tensors(config)
                    .iter()
                    .map(|t| expert_parallel::is_expert_tensor(&t.name))
                    .collect();
                // The owned experts, within whatever the tensors hold (just
                // those when the trainer was made for this rank).
                let held = self.grads.held_experts();
                let owned = ep.local_experts();
                assert!(
                    held.start <= owned.start && owned.end <= held.end,
                    "the trainer holds experts {held:?}, not its own {owned:?}"
                );
                let local = owned.start - held.start..owned.end - held.start;
                let (mut replicated, mut slices) = (Vec::new(), Vec::new());
                for (tensor, expert) in self.grads.tensors_mut().into_iter().zip(is_expert) {
                    if expert {
                        let per_expert = tensor.len() / held.len();
                        slices.push(&mut tensor[local.start * per_expert..local.end * per_expert]);
                    } else {
                        replicated.push(tensor.as_mut_slice());
                    }
                }
                expert_parallel::reduce_gradients(world, ep, &mut replicated, &mut slices, bucket)?;
                // Replicated weights count once, each owned slice once per group.
                let owned_sq = ep.with_group(|g| data_parallel::sum(g, sum_of_squares(&slices)))?;
                (sum_of_squares(&replicated) + owned_sq).sqrt()
            }
        };
        if world.size() > 1 {
            data_parallel::sum_counts(world, &mut acc.expert_loads)?;
            // Means of the ranks' means: every rank has as many micro-batches.
            let micro_steps = self.settings.micro_steps as f64;
            acc.loss = data_parallel::mean(world, acc.loss / micro_steps)? * micro_steps;
            acc.aux_loss = data_parallel::mean(world, acc.aux_loss / micro_steps)? * micro_steps;
            acc.tokens *= world.size();
            acc.flops = data_parallel::sum(world, acc.flops)?;
            // Tensorwise FP8: every rank's histories take the world's
            // amaxes (each rank saw its own shard, slice or experts), so
            // they are the ones one process would keep.
            let mut amaxes = self.model.fp8_observed();
            if !amaxes.is_empty() {
                world.all_reduce_max(&mut amaxes)?;
                self.model.observe_fp8(&amaxes);
            }
        }
        Ok(Some(self.apply(acc, grad_norm, adapter_grads)))
    }

    /// The mean loss over `eval`'s held-out sequences (forward passes
    /// only, nothing trained), in one process.
    pub fn evaluate(&mut self, eval: &mut Evaluation) -> f64 {
        self.evaluate_in(eval, Shard::WHOLE, None, Parallel::default())
            .expect("a single process has no peers to fail")
    }

    /// [`Self::evaluate`] as one rank of `world` with `parallel`'s groups,
    /// every rank at the same step: each reads its shard of the held-out
    /// batches (its slice of each sequence), and the loss is the mean over
    /// all their trained targets, the same on every rank.
    pub fn evaluate_parallel(
        &mut self,
        eval: &mut Evaluation,
        world: &mut dyn Collective,
        parallel: Parallel<'_>,
    ) -> Result<f64, DistError> {
        let sp = parallel.sequence.map_or(1, SequenceParallel::size);
        let shard = Shard {
            rank: world.rank() / sp,
            ranks: world.size() / sp,
        };
        self.evaluate_in(eval, shard, Some(world), parallel)
    }

    fn evaluate_in(
        &mut self,
        eval: &mut Evaluation,
        shard: Shard,
        mut world: Option<&mut dyn Collective>,
        parallel: Parallel<'_>,
    ) -> Result<f64, DistError> {
        let (mut step, micro_steps) = eval.draw(
            &self.settings,
            shard,
            parallel.sequence,
            world.as_mut().map(|w| &mut **w as &mut dyn Collective),
        )?;
        let mut loss = 0.0;
        for batch in &mut step.batches {
            lay_out_batch(batch, parallel, 1);
            // Only the forward pass: each block's input is all it need keep.
            let memory = crate::model::ActivationMemory::RecomputeBlocks;
            let pass = self
                .model
                .forward_parallel(batch, memory, parallel, step.loss)?;
            loss += pass.cross_entropy;
        }
        if let Some(world) = world
            && world.size() > 1
        {
            loss = data_parallel::mean(world, loss)?;
        }
        // Tensorwise FP8 observed these passes' amaxes: not training's.
        self.model.forget_fp8_observed();
        Ok(loss / micro_steps as f64)
    }

    /// This rank's micro-batches of one step: gradients summed into
    /// `self.grads`, losses and loads summed. `None` when `stop` interrupted
    /// it (the data position is then back at `start`, the step's start).
    fn accumulate(
        &mut self,
        stop: &dyn Fn() -> bool,
        mut step: StepBatches,
        start: DataPosition,
        parallel: Parallel<'_>,
    ) -> Result<Option<Accumulated>, DistError> {
        let memory = self.settings.activation_memory;
        let model_flops = flops::training_flops(self.model.config());
        let sp = parallel.sequence.map_or(1, SequenceParallel::size);
        self.grads.zero();
        let mut acc = Accumulated {
            trained_tokens: step.trained,
            ..Accumulated::default()
        };
        for batch in &mut step.batches {
            if stop() {
                self.data.restore(start);
                return Ok(None);
            }
            // This rank's tokens as drawn (its slices' with sequence
            // parallelism): the same however they are run.
            acc.tokens += batch.inputs.len() / sp;
            lay_out_batch(batch, parallel, 1);
            acc.flops += flops::batch_flops(&model_flops, batch, sp);
            let pass = self
                .model
                .forward_parallel(batch, memory, parallel, step.loss)?;
            self.model
                .backward_parallel(&pass, &mut self.grads, parallel)?;
            acc.loss += pass.cross_entropy;
            acc.aux_loss += pass.aux_loss;
            let loads = pass.expert_loads();
            if acc.expert_loads.is_empty() {
                acc.expert_loads = loads;
            } else {
                for (total, layer) in acc.expert_loads.iter_mut().zip(loads) {
                    for (t, l) in total.iter_mut().zip(layer) {
                        *t += l;
                    }
                }
            }
        }
        Ok(Some(acc))
    }

    /// Ends a step whose gradient sum (over this rank's micro-batches,
    /// averaged over the replicas) is in `self.grads`: clipping, the update,
    /// the selection biases and FP8 scales.
    /// `grad_norm` is the L2 norm of that sum: with adapters, of theirs
    /// (`lora_grads`, the same on every rank), which is what the step trains.
    fn apply(
        &mut self,
        acc: Accumulated,
        grad_norm: f64,
        lora_grads: Option<Vec<lora::AdapterGrads<f32>>>,
    ) -> StepReport {
        let settings = &self.settings;
        let micro_steps = settings.micro_steps as f64;
        // Each micro-batch's gradient is of its own mean loss; their mean is the step's.
        let grad_norm = grad_norm / micro_steps;
        let clip = settings.optimizer.grad_clip;
        let clip_scale = if clip > 0.0 && grad_norm > clip {
            clip / grad_norm
        } else {
            1.0
        };
        let step = self.optimizer.updates;
        let lr = schedule::learning_rate(&settings.optimizer, step, settings.steps);
        match (&mut self.lora, lora_grads) {
            (Some(lora), Some(grads)) => {
                // Only the adapters move; the model takes their merge.
                self.optimizer.updates += 1;
                let update = optimizer::AdamWStep::new(
                    &settings.optimizer,
                    self.optimizer.updates,
                    lr,
                    clip_scale / micro_steps,
                );
                lora.update(update, &grads);
                lora.merge_into(&mut self.model);
            }
            _ => {
                self.optimizer
                    .update(&mut self.model, &self.grads, clip_scale / micro_steps, lr);
                self.model.update_selection_biases(&acc.expert_loads);
            }
        }
        self.model.advance_fp8_scales();
        StepReport {
            step: step + 1,
            loss: acc.loss / micro_steps,
            aux_loss: acc.aux_loss / micro_steps,
            learning_rate: lr,
            grad_norm,
            tokens: acc.tokens,
            trained_tokens: acc.trained_tokens,
            expert_loads: acc.expert_loads,
            flops: acc.flops,
        }
    }
}

/// Which part of every step's global batch a data-parallel rank reads.
///
/// Every rank holds the same data stream (same seed, same position) and, at
/// each step, goes through the windows of the whole global batch: rank `r`
/// of `n` reads windows `[r·k, (r+1)·k)`, `k` being its share (micro-steps ×
/// micro-batch), and skips the others' (skipping only draws the offsets).
/// So the ranks together read exactly the micro-batches one process would,
/// and the stream's position after a step is the same on every rank: a
/// checkpoint's data position does not depend on the rank or the world size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub ranks: usize,
}

impl Shard {
    /// A single process reads the whole batch.
    pub const WHOLE: Self = Self { rank: 0, ranks: 1 };
}

/// `training.evaluation`'s held-out stream: the same sequences every
/// time it is read, `batches` global batches of them.
#[derive(Clone, Debug)]
pub struct Evaluation {
    data: DataLoader,
    start: DataPosition,
    batches: usize,
}

impl Evaluation {
    pub fn new(data: DataLoader, batches: usize) -> Self {
        Self {
            start: data.position(),
            data,
            batches,
        }
    }

    /// `shard`'s micro-batches of the whole evaluation, as one step of
    /// `batches` times the training's micro-steps ([`draw_step`]: the loss
    /// the mean over every trained target however it is split), and how
    /// many micro-steps that is.
    pub(crate) fn draw(
        &mut self,
        settings: &TrainingSettings,
        shard: Shard,
        sequence: Option<&SequenceParallel>,
        world: Option<&mut dyn Collective>,
    ) -> Result<(StepBatches, usize), DistError> {
        self.data.restore(self.start);
        let settings = TrainingSettings {
            micro_steps: settings.micro_steps * self.batches,
            ..settings.clone()
        };
        let step = draw_step(&mut self.data, &settings, shard, sequence, world)?;
        Ok((step, settings.micro_steps))
    }
}

/// Lays a drawn micro-batch (whole sequences) out for this rank's pass:
/// cuts the padding every sequence has ([`Batch::trim_padding_to`]; not
/// when [`KEEP_PADDING`] says not to) to a whole number of `multiple`
/// tokens per rank, then with sequence parallelism keeps this rank's slice
/// of each sequence. The ranks of a sequence group hold the same batch, so
/// they cut it alike; the group then splits sequences of the cut length
/// ([`SequenceParallel::set_seq_len`]) for this micro-batch's passes.
pub(crate) fn lay_out_batch(batch: &mut Batch, parallel: Parallel<'_>, multiple: usize) {
    let sp = parallel.sequence.map_or(1, SequenceParallel::size);
    if cutting_padding() {
        batch.trim_padding_to(multiple * sp);
    }
    if let Some(sp) = parallel.sequence {
        sp.set_seq_len(batch.seq_len);
        batch.inputs = sp.local_tokens(&batch.inputs);
        batch.targets = sp.local_tokens(&batch.targets);
        batch.real = sp.local_real(&batch.real);
        batch.seq_len = sp.local_len();
    }
}

/// Whether micro-batches are grouped by length and cut to their longest
/// sequence (unless [`KEEP_PADDING`]).
fn cutting_padding() -> bool {
    static CUT: std::sync::LazyLock<bool> =
        std::sync::LazyLock::new(|| std::env::var_os(KEEP_PADDING).is_none_or(|v| v != "1"));
    *CUT
}

/// A step's micro-batches regrouped so that each holds sequences of about
/// one length, longest first (a stable sort of the step's sequences by real
/// tokens): the same sequences, so the same step (its loss is the mean
/// over all their trained targets, its gradient their sum, up to the order
/// of sums), but each micro-batch cut to a length close to its sequences'
/// own ([`Batch::trim_padding`]) rather than to the longest of a random
/// few. Packed sequences (documents) and unpadded ones are left as drawn.
fn group_by_length(batches: Vec<Batch>, micro_batch: usize) -> Vec<Batch> {
    let padded = batches
        .iter()
        .any(|b| b.real.iter().any(|&r| r < b.seq_len));
    if batches.len() < 2 || !padded || batches.iter().any(|b| b.documents.is_some()) {
        return batches;
    }
    let seq_len = batches[0].seq_len;
    let mut sequences: Vec<(usize, &[u32], &[u32])> = batches
        .iter()
        .flat_map(|b| {
            b.real
                .iter()
                .zip(b.inputs.chunks_exact(b.seq_len))
                .zip(b.targets.chunks_exact(b.seq_len))
                .map(|((&real, inputs), targets)| (real, inputs, targets))
        })
        .collect();
    sequences.sort_by_key(|&(real, _, _)| std::cmp::Reverse(real));
    sequences
        .chunks(micro_batch)
        .map(|group| Batch {
            seq_len,
            inputs: group.iter().flat_map(|s| s.1).copied().collect(),
            targets: group.iter().flat_map(|s| s.2).copied().collect(),
            real: group.iter().map(|s| s.0).collect(),
            documents: None,
        })
        .collect()
}

/// `MOE_KEEP_PADDING=1` keeps every sequence at `seqLen`, padding and
/// all: the baseline `worker/benches/sft_packing.sh` measures against.
pub const KEEP_PADDING: &str = "MOE_KEEP_PADDING";

/// A rank's micro-batches of one step, and how their trained targets weigh
/// in its loss.
pub struct StepBatches {
    pub batches: Vec<Batch>,
    pub loss: LossScale,
    /// Trained targets in the whole step (every rank's).
    pub trained: usize,
}

/// Draws `shard`'s micro-batches of the next step from `data` (skipping the
/// other shards' windows, so the stream ends the step where one process's
/// would), each sequence sliced to this rank's part under `sequence`, and
/// agrees with `world` (every rank of the step; `None`: this process alone)
/// on how many trained targets the whole step has: the loss is the mean
/// over all of them ([`LossScale::step_share`]), not a mean of each
/// micro-batch's and each rank's means — the two differ when micro-batches
/// hold different numbers of trained targets (supervised fine-tuning), and
/// only the first is independent of how the batch is split.
pub fn draw_step(
    data: &mut DataLoader,
    settings: &TrainingSettings,
    shard: Shard,
    sequence: Option<&SequenceParallel>,
    world: Option<&mut dyn Collective>,
) -> Result<StepBatches, DistError> {
    let share = settings.micro_steps * settings.micro_batch;
    let batches: Vec<Batch> =
        if data.pads() && cutting_padding() && shard.ranks * settings.micro_steps > 1 {
            // The whole step (every shard's), grouped by length alike on
            // every layout; this shard's are every `ranks`-th group, so each
            // rank gets long and short ones alike.
            let step: Vec<Batch> = (0..shard.ranks * settings.micro_steps)
                .map(|_| data.next_batch(settings.micro_batch))
                .collect();
            group_by_length(step, settings.micro_batch)
                .into_iter()
                .skip(shard.rank)
                .step_by(shard.ranks)
                .collect()
        } else {
            data.skip(shard.rank * share);
            let mine = (0..settings.micro_steps)
                .map(|_| data.next_batch(settings.micro_batch))
                .collect();
            data.skip(shard.ranks.saturating_sub(shard.rank + 1) * share);
            mine
        };
    // Whole sequences: each rank cuts and slices its micro-batches as it
    // runs them ([`lay_out_batch`]). Every rank of a sequence group holds
    // the same ones, so only the group's first counts their targets.
    let counts = sequence.is_none_or(|sp| sp.rank() == 0);
    let here: usize = match counts {
        true => batches.iter().map(|b| trained_targets(&b.targets)).sum(),
        false => 0,
    };
    let (trained, ranks) = match world {
        Some(world) if world.size() > 1 => {
            let mut counts = [vec![here]];
            data_parallel::sum_counts(world, &mut counts)?;
            (counts[0][0], world.size())
        }
        _ => (here, 1),
    };
    Ok(StepBatches {
        batches,
        loss: LossScale::step_share(trained, ranks, settings.micro_steps),
        trained,
    })
}

/// What a rank's micro-batches sum to over one step.
#[derive(Default)]
struct Accumulated {
    loss: f64,
    aux_loss: f64,
    tokens: usize,
    /// The whole step's, every rank's (known before it runs).
    trained_tokens: usize,
    /// Per MoE block, per expert.
    expert_loads: Vec<Vec<usize>>,
    /// This rank's model FLOPs, then (after the step) every rank's.
    flops: f64,
}

/// Sum of every value squared, in `f64`.
fn sum_of_squares(tensors: &[&mut [f32]]) -> f64 {
    tensors
        .iter()
        .flat_map(|t| t.iter())
        .map(|&v| f64::from(v) * f64::from(v))
        .sum()
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
