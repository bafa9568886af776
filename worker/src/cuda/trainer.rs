//! Training on the device; CPU reference: [`crate::train::Trainer`], whose
//! step this repeats operation for operation: gradient accumulation over
//! micro-batches, the global gradient norm (f64, fixed order) and clipping,
//! AdamW with the same schedule (the kernel is bit-identical to the CPU
//! update), and the aux-loss-free selection-bias update after every step.
//! Weights, gradients and both moments stay on the device; only the losses,
//! the expert loads and the norm's partial sums come back each step.

use super::data_parallel::{self, ParallelError};
use super::lora::DeviceLora;
use super::model::{DeviceGradients, DeviceModel, DeviceTensors};
use super::{Gpu, Result, adamw, vector};
use crate::data::{DataLoader, DataPosition};
use crate::dist::expert_parallel;
use crate::dist::sequence_parallel::SequenceParallel;
use crate::dist::{Collective, Solo, data_parallel as host_parallel};
use crate::model::{Gradients, Model, ModelConfig, Parallel};
use crate::moe::balance;
use crate::settings::TrainingSettings;
use crate::train::optimizer::AdamWStep;
use crate::train::{Evaluation, Shard, StepReport, Trainer, draw_step, lay_out_batch, schedule};

/// A micro-batch cut to its longest conversation keeps a whole number of
/// 64 positions (the flash kernels' tile): a few shapes for cuBLASLt's
/// plans and the allocator, not one per length.
const CUT_MULTIPLE: usize = 64;

/// The model, its gradients and AdamW moments on one device, and the data stream.
pub struct DeviceTrainer<'g> {
    gpu: &'g Gpu,
    settings: TrainingSettings,
    model: DeviceModel,
    grads: DeviceGradients,
    /// AdamW's first and second moments of the weights; none when only
    /// `training.lora`'s adapters train (theirs are in `lora`).
    moments: Option<(DeviceGradients, DeviceGradients)>,
    lora: Option<DeviceLora>,
    /// Whether AdamW's weight decay applies, per tensor in canonical order.
    decays: Vec<bool>,
    /// Whether a tensor is a routed experts' (held for this rank's experts
    /// only under expert parallelism), per tensor in canonical order.
    expert_tensors: Vec<bool>,
    /// Each MoE layer's selection bias, kept on the host too: the balancing
    /// update is a sign step per expert, done here and uploaded.
    selection_biases: Vec<Vec<f32>>,
    updates: u64,
    data: DataLoader,
}

impl<'g> DeviceTrainer<'g> {
    /// Moves `model` (step 0, zero moments; with `training.lora`, fresh
    /// adapters on it, as [`Trainer::new`] makes them) to the device.
    pub fn new(
        gpu: &'g Gpu,
        model: &Model<f32>,
        settings: TrainingSettings,
        data: DataLoader,
    ) -> Result<Self> {
        let lora = settings
            .lora
            .clone()
            .map(|lora| crate::train::lora::Lora::new(lora, model, settings.seed));
        Self::with_adapters(gpu, model, lora.as_ref(), settings, data)
    }

    /// [`Self::new`] with `lora`'s adapters (and their moments), if any:
    /// then the weights have no moments of their own.
    fn with_adapters(
        gpu: &'g Gpu,
        model: &Model<f32>,
        lora: Option<&crate::train::lora::Lora>,
        settings: TrainingSettings,
        data: DataLoader,
    ) -> Result<Self> {
        let device = DeviceModel::upload(gpu, model)?;
        let zeros = || DeviceGradients::zeros_like(gpu, device.weights());
        let moments = match lora {
            None => Some((zeros()?, zeros()?)),
            Some(_) => None,
        };
        Ok(Self {
            grads: zeros()?,
            moments,
            lora: lora.map(|lora| DeviceLora::upload(gpu, lora)).transpose()?,
            decays: model.tensors().iter().map(|t| t.kind.decays()).collect(),
            expert_tensors: model
                .tensors()
                .iter()
                .map(|t| expert_parallel::is_expert_tensor(&t.name))
                .collect(),
            selection_biases: model
                .moe_layers()
                .map(|l| l.selection_bias.clone())
                .collect(),
            model: device,
            gpu,
            settings,
            updates: 0,
            data,
        })
    }

    /// Takes over from `host` (fresh or restored from a checkpoint): its
    /// weights, moments, step count, settings and data position.
    pub fn resume(gpu: &'g Gpu, host: &Trainer) -> Result<Self> {
        let mut trainer = Self::with_adapters(
            gpu,
            host.model(),
            host.lora(),
            host.settings().clone(),
            host.data().clone(),
        )?;
        let config = host.model().config().clone();
        let optimizer = host.optimizer();
        if let Some((first, second)) = &mut trainer.moments {
            first.upload_from(gpu, host_values(&optimizer.first_moment, &config))?;
            second.upload_from(gpu, host_values(&optimizer.second_moment, &config))?;
        }
        trainer.updates = optimizer.updates;
        Ok(trainer)
    }

    /// Brings `host` up to date (weights, selection biases, moments, step
    /// count, data position), e.g. to write a checkpoint from it.
    pub fn download_into(&self, host: &mut Trainer) -> Result<()> {
        let gpu = self.gpu;
        let (model, optimizer, data) = host.parts_mut();
        self.model.download_into(gpu, model)?;
        for (layer, bias) in model.moe_layers_mut().zip(&self.selection_biases) {
            layer.selection_bias.clone_from(bias);
        }
        if let Some((first, second)) = &self.moments {
            first.download_into(gpu, optimizer.first_moment.tensors_mut())?;
            second.download_into(gpu, optimizer.second_moment.tensors_mut())?;
        }
        optimizer.updates = self.updates;
        data.restore(self.data.position());
        if let (Some(device), Some(lora)) = (&self.lora, host.lora_mut()) {
            device.download_into(gpu, lora)?;
        }
        Ok(())
    }

    pub fn model(&self) -> &DeviceModel {
        &self.model
    }

    /// Runs attention with `kernel` from the next step on (the benchmark
    /// times both kernels; a run takes `MOE_CUDA_ATTENTION` at upload).
    pub fn set_attention_kernel(&mut self, kernel: super::model::AttentionKernel) {
        self.model.set_attention_kernel(kernel);
    }

    /// The gradients of the last step, before scaling (as the CPU
    /// trainer's): the mean over micro-batches times `micro_steps`.
    pub fn grads(&self) -> &DeviceGradients {
        &self.grads
    }

    pub fn data_position(&self) -> DataPosition {
        self.data.position()
    }

    /// Optimizer steps completed.
    pub fn steps_done(&self) -> u64 {
        self.updates
    }

    /// One optimizer step, as [`crate::train::Trainer::step`]; `None` when
    /// `stop` answered true before a micro-batch (the partial step is
    /// discarded, data position included).
    pub fn step(&mut self, stop: &dyn Fn() -> bool) -> Result<Option<StepReport>> {
        self.step_parallel(stop, &mut Solo).map_err(|e| match e {
            ParallelError::Gpu(e) => e,
            ParallelError::Dist(e) => unreachable!("a world of one never fails a collective: {e}"),
        })
    }

    /// One optimizer step as a rank of the data-parallel `world`, as
    /// [`crate::train::Trainer::step_parallel`] without sequence or expert
    /// parallelism: this rank's share of the global batch, the gradients
    /// averaged over the ranks ([`data_parallel::all_reduce_mean`]), the
    /// expert loads summed and the loss averaged, so every rank takes the
    /// same update. A world of one is [`Self::step`].
    pub fn step_parallel(
        &mut self,
        stop: &dyn Fn() -> bool,
        world: &mut dyn Collective,
    ) -> std::result::Result<Option<StepReport>, ParallelError> {
        self.step_with(stop, world, Parallel::default())
    }

    /// As [`Trainer::evaluate_parallel`]: the mean loss over `eval`'s
    /// held-out sequences, forward passes only, every rank of `world` at
    /// the same step; the tensorwise FP8 amaxes they observed forgotten.
    pub fn evaluate_with(
        &mut self,
        eval: &mut Evaluation,
        world: &mut dyn Collective,
        parallel: Parallel<'_>,
    ) -> std::result::Result<f64, ParallelError> {
        let gpu = self.gpu;
        let sp = parallel.sequence.map_or(1, SequenceParallel::size);
        let shard = Shard {
            rank: world.rank() / sp,
            ranks: world.size() / sp,
        };
        let (mut step, micro_steps) =
            eval.draw(&self.settings, shard, parallel.sequence, Some(&mut *world))?;
        let mut loss = 0.0;
        for batch in &mut step.batches {
            lay_out_batch(batch, parallel, CUT_MULTIPLE);
            let memory = crate::model::ActivationMemory::RecomputeBlocks;
            let pass = self
                .model
                .forward_parallel(gpu, batch, memory, parallel, step.loss)?;
            loss += pass.cross_entropy;
        }
        if world.size() > 1 {
            loss = host_parallel::mean(world, loss)?;
        }
        if let Some(scales) = self.model.delayed_scales_mut() {
            let zeros = vec![0.0; scales.observed(gpu)?.len()];
            scales.set_observed(gpu, &zeros)?;
        }
        Ok(loss / micro_steps as f64)
    }

    /// [`Self::step_parallel`] spread over `parallel`'s groups as well, as
    /// [`crate::train::Trainer::step_parallel`]: with expert parallelism
    /// (× data parallelism over `world`) this trainer holds its rank's
    /// experts, the replicated weights' gradients are averaged over `world`
    /// and the owned experts' over their replicas
    /// ([`data_parallel::reduce_expert_parallel`]); with sequence
    /// parallelism the ranks of a sequence group read the same sequences
    /// (one data shard) and each trains on its slice of every sequence,
    /// the gradients still averaged over `world`. The expert loads are
    /// summed over `world`.
    pub fn step_with(
        &mut self,
        stop: &dyn Fn() -> bool,
        world: &mut dyn Collective,
        parallel: Parallel<'_>,
    ) -> std::result::Result<Option<StepReport>, ParallelError> {
        let gpu = self.gpu;
        let settings = &self.settings;
        let start = self.data.position();
        let sp = parallel.sequence.map_or(1, SequenceParallel::size);
        let shard = Shard {
            rank: world.rank() / sp,
            ranks: world.size() / sp,
        };
        gpu.span("step.zero_grads", || self.grads.zero(gpu))?;
        let mut drawn = draw_step(
            &mut self.data,
            settings,
            shard,
            parallel.sequence,
            Some(&mut *world),
        )?;
        let (mut loss, mut aux_loss, mut tokens) = (0.0, 0.0, 0);
        let (model_flops, mut flops) = (
            crate::model::flops::training_flops(self.model.config()),
            0.0,
        );
        let mut expert_loads: Vec<Vec<usize>> = Vec::new();
        // Over NCCL the last micro-batch's backward pass overlaps the
        // gradients' all-reduce (the earlier ones only accumulate). Not with
        // sequence or expert parallelism: their exchanges run on other
        // communicators during the backward pass, and NCCL operations of two
        // communicators in flight at once may deadlock; expert parallelism
        // also reduces its two kinds of tensors over two groups.
        // With adapters only their gradients are exchanged, after the pass.
        let plain =
            parallel.sequence.is_none() && parallel.experts.is_none() && self.lora.is_none();
        let overlap = plain && shard.ranks > 1 && world.as_nccl().is_some();
        for (micro_step, batch) in drawn.batches.iter_mut().enumerate() {
            if stop() {
                self.data.restore(start);
                return Ok(None);
            }
            // The batch's tokens as drawn: the same however it is run.
            tokens += batch.inputs.len() / sp;
            lay_out_batch(batch, parallel, CUT_MULTIPLE);
            flops += crate::model::flops::batch_flops(&model_flops, batch, sp);
            let pass = self.model.forward_parallel(
                gpu,
                batch,
                settings.activation_memory,
                parallel,
                drawn.loss,
            )?;
            match world.as_nccl() {
                Some(nccl) if overlap && micro_step + 1 == settings.micro_steps => {
                    let mut mean = data_parallel::OverlappedMean::new(gpu, nccl);
                    self.model.backward_handing_over(
                        gpu,
                        &pass,
                        &mut self.grads,
                        parallel,
                        &mut |tensors| {
                            mean.start(tensors);
                            Ok(())
                        },
                    )?;
                    mean.finish()?;
                }
                _ => self.model.backward_handing_over(
                    gpu,
                    &pass,
                    &mut self.grads,
                    parallel,
                    &mut |_| Ok(()),
                )?,
            }
            loss += pass.cross_entropy;
            aux_loss += pass.aux_loss;
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
        let norm_span = gpu.span_start("step.grad_norm")?;
        let squares = match (&mut self.lora, parallel.experts) {
            // Only adapters train: their gradients, from this rank's weight
            // gradients, are all a step exchanges, over `world` (they sit on
            // replicated tensors only), as the CPU trainer's are.
            (Some(lora), _) => {
                lora.gradients(gpu, &self.grads.tensors())?;
                data_parallel::all_reduce_mean(gpu, world, &mut lora.grads_mut())?;
                lora.sum_squares(gpu)?
            }
            (None, Some(ep)) => data_parallel::reduce_expert_parallel(
                gpu,
                world,
                ep,
                &mut self.grads.tensors_mut(),
                &self.expert_tensors,
            )?,
            (None, None) => {
                // Over the whole world: the ranks of a sequence group hold
                // gradients of different slices of the same sequences.
                if world.size() > 1 && !overlap {
                    data_parallel::all_reduce_mean(gpu, world, &mut self.grads.tensors_mut())?;
                }
                vector::sum_squares(gpu, &self.grads.tensors())?
            }
        };
        gpu.span_end(norm_span)?;
        if world.size() > 1 {
            host_parallel::sum_counts(world, &mut expert_loads)?;
            // Means of the ranks' means: every rank has as many micro-batches
            // (of as many tokens).
            loss = host_parallel::mean(world, loss / micro_steps)? * micro_steps;
            aux_loss = host_parallel::mean(world, aux_loss / micro_steps)? * micro_steps;
            tokens *= world.size();
            flops = host_parallel::sum(world, flops)?;
            // Tensorwise FP8: every rank's histories take the world's amaxes,
            // as the CPU trainer's do (3 floats per linear layer, through
            // host memory once a step).
            if let Some(scales) = self.model.delayed_scales_mut() {
                let mut amaxes = scales.observed(gpu)?;
                world.all_reduce_max(&mut amaxes)?;
                scales.set_observed(gpu, &amaxes)?;
            }
        }
        let grad_norm = squares.sqrt() / micro_steps;
        let clip = settings.optimizer.grad_clip;
        let clip_scale = if clip > 0.0 && grad_norm > clip {
            clip / grad_norm
        } else {
            1.0
        };
        let step = self.updates;
        let lr = schedule::learning_rate(&settings.optimizer, step, settings.steps);
        self.updates += 1;
        let update = AdamWStep::new(
            &settings.optimizer,
            self.updates,
            lr,
            clip_scale / micro_steps,
        );
        let adamw_span = gpu.span_start("step.adamw")?;
        if let Some(lora) = &mut self.lora {
            // Only the adapters move; the model takes their merge.
            lora.update(gpu, &update)?;
            lora.merge_into(gpu, self.model.weights_mut().tensors_mut())?;
        } else if let Some((first, second)) = &mut self.moments {
            let tensors = self
                .model
                .weights_mut()
                .tensors_mut()
                .into_iter()
                .zip(self.grads.tensors())
                .zip(first.tensors_mut())
                .zip(second.tensors_mut())
                .zip(&self.decays);
            for ((((weights, grad), m), v), &decays) in tensors {
                let update = if decays {
                    update
                } else {
                    update.without_decay()
                };
                adamw::apply(gpu, &update, weights, m, v, grad)?;
            }
        }
        gpu.span_end(adamw_span)?;
        // The selection biases are frozen with the rest of the model when
        // adapters train.
        if let (Some(rate), None) = (self.model.config().bias_update_rate, &self.lora) {
            let rate = rate as f32;
            for ((layer, bias), load) in self
                .model
                .moe_layers_mut()
                .zip(&mut self.selection_biases)
                .zip(&expert_loads)
            {
                balance::update_selection_bias(bias, load, rate);
                layer.set_selection_bias(gpu, bias)?;
            }
        }
        // Tensorwise FP8: the step's amaxes join their histories.
        self.model.advance_fp8_scales(gpu)?;
        Ok(Some(StepReport {
            step: step + 1,
            loss: loss / micro_steps,
            aux_loss: aux_loss / micro_steps,
            learning_rate: lr,
            grad_norm,
            tokens,
            trained_tokens: drawn.trained,
            expert_loads,
            flops,
        }))
    }
}

fn host_values<'a>(g: &'a Gradients<f32>, config: &ModelConfig) -> Vec<&'a [f32]> {
    g.tensors(config).into_iter().map(|t| t.values).collect()
}
