//! The device model and trainer against the CPU's, whole steps at a time:
//! the check group "training" of [`super::check`].
//!
//! The device's GEMMs run on TF32 tensor cores (10 mantissa bits per
//! product) while the CPU's are exact f32, so the two agree to about 1e-3,
//! not bit for bit; a wrong index, transpose or missing term is off by O(1).
//! The router's GEMM is exact on both sides, but its input differs in the
//! last bits, so a near-tie in top-k could in principle flip: the check
//! compares the expert loads exactly and reports such a flip as a failure
//! rather than hiding it behind a loose bound.

use super::check::{Check, bits, close, close_to_scale, exact};
use super::model::DeviceTensors;
use super::model::{AttentionKernel, DeviceModel};
use super::trainer::DeviceTrainer;
use super::{Gpu, Result};
use crate::data::DataLoader;
use crate::linear::GemmPrecision;
use crate::model::{ActivationMemory, Gradients, Model, ModelConfig};
use crate::rng::SplitMix64;
use crate::settings::{OptimizerSettings, TrainingSettings};
use crate::train::{StepReport, Trainer};

/// Three blocks (one dense, two MoE with a shared expert, sigmoid routing
/// limited to 2 of 4 groups, bias balancing on), grouped-query attention.
pub(crate) fn config() -> ModelConfig {
    config_with(serde_json::json!({}))
}

/// [`config`] with q/k norms (`"perHead"` or `"whole"`), heads of 24 (q
/// 96 wide on a hidden size of 64) and an RMSNorm epsilon of 1e-6.
pub(crate) fn qk_norm_config(qk_norm: &str) -> ModelConfig {
    config_with(serde_json::json!({"headDim": 24, "qkNorm": qk_norm, "normEpsilon": 1e-6}))
}

/// [`config`]'s spec with `extra`'s fields added.
fn config_with(extra: serde_json::Value) -> ModelConfig {
    let mut spec = serde_json::json!({
        "vocabSize": 256, "hiddenSize": 64, "layers": 3, "denseLayers": 1,
        "denseHiddenSize": 96, "attentionHeads": 4, "kvHeads": 2, "seqLen": 32,
        "moe": {"experts": 8, "topK": 2, "sharedExperts": 1, "expertHiddenSize": 32,
                "router": "sigmoid", "groups": 4, "topGroups": 2, "routedScalingFactor": 2.0}
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    let spec: moe_crds::ModelSpec = serde_json::from_value(spec).expect("a valid model spec");
    ModelConfig::from_spec(&spec).expect("a valid model config")
}

/// The initial model of `config` (one with q/k norms), its q and k gains
/// moved away from their initial 1 so that a backward pass that dropped a
/// gain's factor, or a forward pass that skipped a norm, is off by O(1).
fn qk_norm_model(config: ModelConfig, seed: u64) -> Model<f32> {
    let mut model = Model::<f32>::initial(config, seed);
    let mut rng = SplitMix64::new(seed + 1);
    for block in &mut model.weights.blocks {
        assert!(!block.q_norm.is_empty(), "the config has q/k norms");
        for gain in [&mut block.q_norm, &mut block.k_norm] {
            for g in gain.iter_mut() {
                *g += 0.5 * rng.normal() as f32;
            }
        }
    }
    model
}

fn settings() -> TrainingSettings {
    TrainingSettings {
        steps: 3,
        micro_batch: 4,
        micro_steps: 2,
        optimizer: OptimizerSettings {
            learning_rate: 3e-3,
            min_learning_rate: 3e-4,
            warmup_steps: 1,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            epsilon: 1e-8,
            grad_clip: 1.0,
        },
        seed: 7,
        log_interval: 1,
        activation_memory: ActivationMemory::KeepAll,
        lora: None,
    }
}

/// Random tokens: a corpus the model cannot memorise in three steps, so the
/// gradients stay large and informative.
fn corpus() -> Vec<u32> {
    let mut rng = SplitMix64::new(5);
    (0..4096).map(|_| rng.below(256) as u32).collect()
}

/// A micro-batch of the check corpus's windows cut into documents of 1 to
/// 12 tokens, as `data.packing` lays conversations out, the last 5 tokens
/// of each sequence padding.
fn packed_batch(config: &ModelConfig, settings: &TrainingSettings) -> crate::data::Batch {
    let mut batch = loader(config, settings).next_batch(settings.micro_batch);
    let mut rng = SplitMix64::new(9);
    let t_len = config.seq_len;
    let mut starts = Vec::with_capacity(batch.inputs.len());
    for s in 0..settings.micro_batch {
        let mut start = 0;
        for t in 0..t_len {
            if t == t_len - 5 || (t < t_len - 5 && t > start && rng.below(6) == 0) {
                start = t;
            }
            starts.push(start as u32);
        }
        // A document's last target is the next one's first token: not its own.
        for t in 1..t_len {
            if starts[s * t_len + t] as usize == t {
                batch.targets[s * t_len + t - 1] = crate::ops::cross_entropy::IGNORED;
            }
        }
        batch.targets[s * t_len + t_len - 5..(s + 1) * t_len]
            .fill(crate::ops::cross_entropy::IGNORED);
        batch.real[s] = t_len - 5;
    }
    batch.documents = Some(starts);
    batch
}

/// A micro-batch of the check corpus's windows as conversations of 21, 14,
/// 9 and 5 tokens padded to `seqLen` (32) as the data loader pads them,
/// then cut to the longest ([`crate::data::Batch::trim_padding`], what
/// both trainers run): sequences of 21 tokens.
fn cut_batch(config: &ModelConfig, settings: &TrainingSettings) -> crate::data::Batch {
    let mut batch = loader(config, settings).next_batch(settings.micro_batch);
    let t_len = config.seq_len;
    for s in 0..settings.micro_batch {
        let real = [21, 14, 9, 5][s % 4];
        let sequence = s * t_len..(s + 1) * t_len;
        let last = batch.inputs[sequence.start + real - 1];
        batch.inputs[sequence.start + real..sequence.end].fill(last);
        batch.targets[sequence.start + real..sequence.end].fill(crate::ops::cross_entropy::IGNORED);
        batch.real[s] = real;
    }
    batch.trim_padding();
    assert_eq!(batch.seq_len, 21, "cut to the longest conversation");
    batch
}

fn loader(config: &ModelConfig, settings: &TrainingSettings) -> DataLoader {
    DataLoader::new(corpus(), config.seq_len, settings.seed, "check corpus")
        .expect("the corpus is longer than a window")
}

/// FP8 with the tensorwise recipe in the whole model: one batch (each
/// tensor scaled by its own amax: no history yet) against the CPU's
/// tensorwise model, then one optimizer step of each trainer
/// (`tensorwise_histories`).
pub fn check_training_tensorwise(gpu: &Gpu) -> Result<Vec<Check>> {
    let (config, settings) = (config(), settings());
    let mut tensorwise = config;
    (tensorwise.gemm_precision, tensorwise.head_precision) = (
        GemmPrecision::Fp8(crate::fp8::Fp8Recipe::Tensorwise),
        GemmPrecision::Bf16,
    );
    let tensorwise = Model::<f32>::initial(tensorwise, settings.seed);
    let mut checks = one_batch(
        gpu,
        &tensorwise,
        &settings,
        "3 blocks, one batch, FP8 tensorwise",
        AttentionKernel::Gemm,
        Agreement::Quantised,
    )?;
    checks.extend(tensorwise_histories(gpu, &tensorwise, &settings)?);
    Ok(checks)
}

/// One optimizer step of the CPU and the device trainer of a tensorwise
/// FP8 `model`, then every linear layer's amax histories side by side:
/// each weight's history holds that weight's amax, the same bits on both
/// sides (the weights start equal), which holds only if the device numbers
/// its linear layers as the CPU does; the activations' and output
/// gradients' amaxes within 2e-2 (they went through TF32 attention on one
/// side). A tensor one side saw and the other did not (an expert a near-tie
/// left empty on one side) is skipped; every attention projection is seen.
fn tensorwise_histories(
    gpu: &Gpu,
    model: &Model<f32>,
    settings: &TrainingSettings,
) -> Result<Vec<Check>> {
    let config = model.config().clone();
    let mut cpu = Trainer::new(config.clone(), settings.clone(), loader(&config, settings));
    let mut device = DeviceTrainer::new(gpu, model, settings.clone(), loader(&config, settings))?;
    cpu.step(&|| false).expect("never stopped");
    device.step(&|| false)?.expect("never stopped");
    let host = cpu.model().fp8_histories();
    let ours = match device.model().delayed_scales() {
        Some(scales) => scales.histories(gpu)?,
        None => Vec::new(),
    };
    let case = "3 blocks, tensorwise, after step 1";
    let mut checks = vec![exact(
        "trainer.fp8_linear_layers",
        case,
        &[ours.len()],
        &[host.len()],
    )];
    let (mut weights, mut weights_want) = (Vec::<u32>::new(), Vec::<u32>::new());
    let (mut others, mut others_want) = (Vec::<f32>::new(), Vec::<f32>::new());
    for (device_layer, host_layer) in ours.iter().zip(&host) {
        for (role, (d, h)) in device_layer.iter().zip(host_layer).enumerate() {
            if d.is_empty() || h.is_empty() {
                continue;
            }
            if role == 1 {
                weights.extend(bits(d));
                weights_want.extend(bits(h));
            } else {
                others.extend(d);
                others_want.extend(h);
            }
        }
    }
    let attention_seen = weights.len() >= 4 * config.layers;
    checks.push(exact(
        "trainer.fp8_weight_histories",
        &format!(
            "{case}: {} weights (every projection: {attention_seen})",
            weights.len()
        ),
        &weights,
        &weights_want,
    ));
    checks.push(exact(
        "trainer.fp8_projections_seen",
        case,
        &[attention_seen],
        &[true],
    ));
    // Each amax within 2e-2 of its own value (an amax is positive).
    checks.push(close(
        "trainer.fp8_activation_histories",
        &format!("{case}: {} amaxes", others.len()),
        &others,
        &others_want,
        0.0,
        2e-2,
    ));
    Ok(checks)
}

/// How close one batch on the device must come to the CPU's.
#[derive(Clone, Copy)]
enum Agreement {
    /// The same expert loads, every gradient within 1e-2 of its largest
    /// value: TF32 or bf16 GEMMs against the CPU's exact or bf16 ones.
    Close,
    /// FP8: the device quantises what it computed, and an activation a
    /// last bit away from the CPU's can land on the other side of an E4M3
    /// rounding boundary (1/16 apart), so a router near-tie may send a
    /// token elsewhere. Loads within 5% of the slots, each gradient within
    /// 3e-2 in relative L2 (a wrong tiling or transposition is O(1) off).
    Quantised,
}

/// One forward and backward of `model` on the CPU and the device, on the
/// same batch: the losses, the expert loads and every gradient; attention
/// on the device by `attention`'s kernels.
fn one_batch(
    gpu: &Gpu,
    model: &Model<f32>,
    settings: &TrainingSettings,
    case: &str,
    attention: AttentionKernel,
    agreement: Agreement,
) -> Result<Vec<Check>> {
    let batch = loader(model.config(), settings).next_batch(settings.micro_batch);
    one_batch_of(gpu, model, &batch, case, attention, agreement)
}

/// [`one_batch`] on `batch`.
fn one_batch_of(
    gpu: &Gpu,
    model: &Model<f32>,
    batch: &crate::data::Batch,
    case: &str,
    attention: AttentionKernel,
    agreement: Agreement,
) -> Result<Vec<Check>> {
    let config = model.config();
    let mut checks = Vec::new();
    // The batch's padding and packed documents too, on both sides.
    let (memory, one, mean) = (
        ActivationMemory::KeepAll,
        crate::model::Parallel::default(),
        crate::ops::cross_entropy::LossScale::PassMean,
    );
    let cpu = model
        .forward_parallel(batch, memory, one, mean)
        .expect("one process");
    let mut cpu_grads = Gradients::zeros(config);
    model.backward(&cpu, &mut cpu_grads);
    let mut device = DeviceModel::upload(gpu, model)?;
    device.set_attention_kernel(attention);
    let pass = device.forward_parallel(gpu, batch, memory, one, mean)?;
    let mut grads = super::model::DeviceGradients::zeros_like(gpu, device.weights())?;
    device.backward(gpu, &pass, &mut grads)?;
    checks.push(close_to_scale(
        "model.cross_entropy",
        case,
        &[pass.cross_entropy as f32],
        &[cpu.cross_entropy as f32],
        1e-4,
    ));
    if config.moe.aux_loss_alpha > 0.0 {
        checks.push(close_to_scale(
            "model.aux_loss",
            case,
            &[pass.aux_loss as f32],
            &[cpu.aux_loss as f32],
            1e-4,
        ));
    }
    let (device_loads, cpu_loads) = (pass.expert_loads(), cpu.expert_loads());
    checks.push(match agreement {
        Agreement::Close => exact("model.expert_loads", case, &device_loads, &cpu_loads),
        Agreement::Quantised => mostly_equal(
            "model.expert_loads",
            case,
            &device_loads.concat(),
            &cpu_loads.concat(),
            0.05,
        ),
    });
    let host_grads = grads.to_host(gpu, config)?;
    for (d, c) in host_grads
        .tensors(config)
        .iter()
        .zip(cpu_grads.tensors(config))
    {
        let case = format!("{case}: {}", d.name);
        checks.push(match agreement {
            Agreement::Close => close_to_scale("model.grad", &case, d.values, c.values, 1e-2),
            Agreement::Quantised => close_in_l2("model.grad", &case, d.values, c.values, 3e-2),
        });
    }
    debug_assert_eq!(grads.tensors().len(), host_grads.tensors(config).len());
    Ok(checks)
}

/// Activation checkpointing on the device: each block recomputed from its
/// input in the backward pass runs the same kernels on the same values, so
/// the loss, the loads and every gradient keep their bits (as on the CPU).
fn recomputed_blocks(
    gpu: &Gpu,
    model: &Model<f32>,
    settings: &TrainingSettings,
    attention: AttentionKernel,
) -> Result<Vec<Check>> {
    let config = model.config();
    let batch = loader(config, settings).next_batch(settings.micro_batch);
    let mut device = DeviceModel::upload(gpu, model)?;
    device.set_attention_kernel(attention);
    let mut runs = Vec::new();
    for memory in [ActivationMemory::KeepAll, ActivationMemory::RecomputeBlocks] {
        let pass = device.forward_with(gpu, &batch.inputs, &batch.targets, memory)?;
        let mut grads = super::model::DeviceGradients::zeros_like(gpu, device.weights())?;
        device.backward(gpu, &pass, &mut grads)?;
        let values: Vec<u32> = grads
            .to_host(gpu, config)?
            .tensors(config)
            .iter()
            .flat_map(|t| t.values.iter().map(|v| v.to_bits()))
            .collect();
        runs.push((pass.cross_entropy.to_bits(), pass.expert_loads(), values));
    }
    let case = &format!("3 blocks, recomputed vs kept, {attention:?} attention");
    let (kept, recomputed) = (&runs[0], &runs[1]);
    Ok(vec![
        exact("checkpointing.loss", case, &[recomputed.0], &[kept.0]),
        exact("checkpointing.loads", case, &recomputed.1, &kept.1),
        exact("checkpointing.grads", case, &recomputed.2, &kept.2),
    ])
}

pub fn check_training(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    let (config, settings) = (config(), settings());
    let model = Model::<f32>::initial(config.clone(), settings.seed);

    // One forward/backward on the same batch: loss, loads and every gradient;
    // again with DeepSeek-V3's sequence-wise balance loss beside the bias.
    let gemm = AttentionKernel::Gemm;
    checks.extend(one_batch(
        gpu,
        &model,
        &settings,
        "3 blocks, one batch",
        gemm,
        Agreement::Close,
    )?);
    // Supervised fine-tuning: a third of the targets left out of the loss.
    let mut sft = loader(&config, &settings).next_batch(settings.micro_batch);
    for target in sft.targets.iter_mut().step_by(3) {
        *target = crate::ops::cross_entropy::IGNORED;
    }
    checks.extend(one_batch_of(
        gpu,
        &model,
        &sft,
        "3 blocks, one batch, a third of the targets ignored",
        gemm,
        Agreement::Close,
    )?);
    // Packed sequences (data.packing): documents of 1 to 12 tokens, each
    // attending only to itself with RoPE from its start, the last one's
    // tail padding (left out of the loss, the loads and the balance loss),
    // with either attention kernel.
    for kernel in [gemm, AttentionKernel::Flash] {
        checks.extend(one_batch_of(
            gpu,
            &model,
            &packed_batch(&config, &settings),
            &format!("3 blocks, one batch, packed documents, {kernel:?} attention"),
            kernel,
            Agreement::Close,
        )?);
    }
    // Conversations padded to seqLen, the batch cut to its longest (as the
    // trainers run one): sequences of 21 of the model's 32 positions
    // through every kernel, with either attention kernel.
    for kernel in [gemm, AttentionKernel::Flash] {
        checks.extend(one_batch_of(
            gpu,
            &model,
            &cut_batch(&config, &settings),
            &format!("3 blocks, one batch cut to its longest conversation, {kernel:?} attention"),
            kernel,
            Agreement::Close,
        )?);
    }
    let mut balanced = config.clone();
    balanced.moe.aux_loss_alpha = 0.001;
    let balanced = Model::<f32>::initial(balanced, settings.seed);
    checks.extend(one_batch(
        gpu,
        &balanced,
        &settings,
        "3 blocks, one batch, balance loss",
        gemm,
        Agreement::Close,
    )?);

    // The linear layers' and the LM head's GEMMs in bf16 (`compute: bf16`)
    // on both sides: the same rounded operands, so the bounds that hold
    // TF32 against exact f32 hold with room to spare.
    let mut bf16 = config.clone();
    (bf16.gemm_precision, bf16.head_precision) = (GemmPrecision::Bf16, GemmPrecision::Bf16);
    let bf16 = Model::<f32>::initial(bf16, settings.seed);
    checks.extend(one_batch(
        gpu,
        &bf16,
        &settings,
        "3 blocks, one batch, bf16 GEMMs",
        gemm,
        Agreement::Close,
    )?);

    // FP8 linear layers (blockwise, DeepSeek-V3's recipe) with a bf16 LM
    // head, as examples/training/h100-fp8.yaml asks, against the CPU's
    // FP8 emulation.
    let mut fp8 = config.clone();
    (fp8.gemm_precision, fp8.head_precision) = (
        GemmPrecision::Fp8(crate::fp8::Fp8Recipe::Blockwise),
        GemmPrecision::Bf16,
    );
    let fp8 = Model::<f32>::initial(fp8, settings.seed);
    checks.extend(one_batch(
        gpu,
        &fp8,
        &settings,
        "3 blocks, one batch, FP8 linear layers",
        gemm,
        Agreement::Quantised,
    )?);

    checks.extend(recomputed_blocks(gpu, &model, &settings, gemm)?);

    // q/k norms (per head as Qwen3, over the whole projection as OLMoE)
    // with heads wider than hidden / heads and a non-default epsilon: one
    // batch each, the same bounds; activation checkpointing recomputing
    // the norms; two trainer steps, whose gradients and AdamW moments list
    // the gains where the host does.
    let per_head = qk_norm_model(qk_norm_config("perHead"), settings.seed);
    let whole = qk_norm_model(qk_norm_config("whole"), settings.seed);
    for (model, case) in [
        (
            &per_head,
            "3 blocks, one batch, per-head q/k norms, 4 heads of 24, eps 1e-6",
        ),
        (
            &whole,
            "3 blocks, one batch, whole q/k norms, 4 heads of 24, eps 1e-6",
        ),
    ] {
        checks.extend(one_batch(
            gpu,
            model,
            &settings,
            case,
            gemm,
            Agreement::Close,
        )?);
    }
    checks.extend(recomputed_blocks(gpu, &per_head, &settings, gemm)?);
    checks.extend(trainer_steps(gpu, &whole, &settings, "whole q/k norms", 2)?);

    // Two steps of bf16 trainers: a step's GEMMs round each weight once
    // (WeightCache) and the optimizer must make them round it again (a
    // stale copy would replay the first step's weights in the second).
    let mut cpu_bf16 = Trainer::new(
        bf16.config().clone(),
        settings.clone(),
        loader(&config, &settings),
    );
    let mut device_bf16 =
        DeviceTrainer::new(gpu, &bf16, settings.clone(), loader(&config, &settings))?;
    for step in 1..=2 {
        let cpu = cpu_bf16.step(&|| false).expect("never stopped");
        let device = device_bf16.step(&|| false)?.expect("never stopped");
        checks.push(close_to_scale(
            "trainer.loss",
            &format!("bf16 GEMMs, step {step}"),
            &[device.loss as f32],
            &[cpu.loss as f32],
            1e-3,
        ));
    }
    drop((cpu_bf16, device_bf16));

    // Three optimizer steps of each trainer from the same start. After the
    // first, the weights differ in the last bits, so a router near-tie may
    // send a token elsewhere: loads are compared to within 1% of the slots.
    let mut cpu_trainer =
        Trainer::new(config.clone(), settings.clone(), loader(&config, &settings));
    let mut device_trainer =
        DeviceTrainer::new(gpu, &model, settings.clone(), loader(&config, &settings))?;
    let lr = settings.optimizer.learning_rate as f32;
    for step in 1..=settings.steps {
        let case = format!("step {step}");
        let cpu = cpu_trainer.step(&|| false).expect("never stopped");
        let device = device_trainer.step(&|| false)?.expect("never stopped");
        checks.extend(steps_agree(&case, &device, &cpu));
        let flat = |loads: &[Vec<usize>]| loads.concat();
        checks.push(mostly_equal(
            "trainer.expert_loads",
            &case,
            &flat(&device.expert_loads),
            &flat(&cpu.expert_loads),
            0.01,
        ));
        // AdamW moves a weight by about lr whatever its gradient's size, so
        // a tiny gradient whose sign TF32 flips moves it by up to 2 lr the
        // other way: compare the updates, and allow a few such weights.
        let mut after = Model::<f32>::initial(config.clone(), settings.seed);
        device_trainer.model().download_into(gpu, &mut after)?;
        // From the same weights (step 1) a flip is rare: 0.03% measured on
        // an H200. After that the two runs drift apart step by step (1.1%,
        // then 2.4% measured; relative L2 of the updates 3e-2 throughout).
        let budget = if step == 1 { 0.001 } else { 0.05 };
        checks.push(updates_agree(
            &case,
            &updates(&after, &model),
            &updates(cpu_trainer.model(), &model),
            0.1 * lr,
            budget,
        ));
    }

    checks.extend(lora_steps(gpu, &model, &settings)?);

    // The flash attention kernels in the whole model, the same bounds as
    // the GEMM path's; last while they are opt-in and unproven on a GPU, so
    // that a fault in them cannot cost the checks above.
    checks.extend(one_batch(
        gpu,
        &model,
        &settings,
        "3 blocks, one batch, flash attention",
        AttentionKernel::Flash,
        Agreement::Close,
    )?);
    checks.extend(recomputed_blocks(
        gpu,
        &model,
        &settings,
        AttentionKernel::Flash,
    )?);
    checks.extend(one_batch(
        gpu,
        &per_head,
        &settings,
        "3 blocks, one batch, per-head q/k norms, 4 heads of 24, flash attention",
        AttentionKernel::Flash,
        Agreement::Close,
    )?);
    Ok(checks)
}

/// `steps` steps of the CPU and the device trainer from `model`: each
/// step's loss within 1e-3 of the CPU's, its gradient norm within 1e-2.
fn trainer_steps(
    gpu: &Gpu,
    model: &Model<f32>,
    settings: &TrainingSettings,
    case: &str,
    steps: usize,
) -> Result<Vec<Check>> {
    let config = model.config();
    let mut cpu = Trainer::new(config.clone(), settings.clone(), loader(config, settings));
    cpu.start_from(model.clone());
    let mut device = DeviceTrainer::new(gpu, model, settings.clone(), loader(config, settings))?;
    let mut checks = Vec::new();
    for step in 1..=steps {
        let cpu = cpu.step(&|| false).expect("never stopped");
        let ours = device.step(&|| false)?.expect("never stopped");
        checks.extend(steps_agree(&format!("{case}, step {step}"), &ours, &cpu));
    }
    Ok(checks)
}

/// Two optimizer steps of the CPU and the device trainer training LoRA
/// adapters (rank 4 on every projection, the routed experts' too) from
/// the same start: losses and the adapters' norms as the trainer steps
/// above; the adapters' values compared as updates are (`B` starts at
/// zero, so after step 1 it is its update); every tensor not adapted, and
/// the selection biases, still the start's bits on the device (a missed
/// freeze moves them by about lr).
fn lora_steps(gpu: &Gpu, model: &Model<f32>, settings: &TrainingSettings) -> Result<Vec<Check>> {
    use crate::train::lora::LoraSettings;
    use moe_crds::LoraTarget::{DownProj, GateProj, KProj, OProj, QProj, UpProj, VProj};
    let settings = TrainingSettings {
        lora: Some(LoraSettings {
            rank: 4,
            alpha: 8.0,
            targets: vec![QProj, KProj, VProj, OProj, GateProj, UpProj, DownProj],
            routed_experts: true,
            rank_stabilized: false,
        }),
        ..settings.clone()
    };
    let config = model.config().clone();
    let trainer = || {
        let mut t = Trainer::new(config.clone(), settings.clone(), loader(&config, &settings));
        t.start_from(model.clone());
        t
    };
    let (mut cpu, mut host) = (trainer(), trainer());
    let mut device = DeviceTrainer::new(gpu, model, settings.clone(), loader(&config, &settings))?;
    let values = |t: &Trainer| -> Vec<f32> {
        t.lora()
            .expect("a LoRA trainer")
            .adapters()
            .iter()
            .flat_map(|a| a.a.values.iter().chain(&a.b.values))
            .copied()
            .collect()
    };
    let start = values(&cpu);
    let changes =
        |now: Vec<f32>| -> Vec<f32> { now.iter().zip(&start).map(|(n, s)| n - s).collect() };
    let adapted: Vec<usize> = cpu
        .lora()
        .expect("a LoRA trainer")
        .adapters()
        .iter()
        .map(|a| a.tensor)
        .collect();
    let frozen = |m: &Model<f32>| -> Vec<u32> {
        let mut kept: Vec<u32> = m
            .tensors()
            .iter()
            .enumerate()
            .filter(|(i, _)| !adapted.contains(i))
            .flat_map(|(_, t)| bits(t.values))
            .collect();
        kept.extend(m.moe_layers().flat_map(|l| bits(&l.selection_bias)));
        kept
    };
    let lr = settings.optimizer.learning_rate as f32;
    let mut checks = Vec::new();
    for step in 1..=2 {
        let case = format!("LoRA rank 4 on every projection, step {step}");
        let theirs = cpu.step(&|| false).expect("never stopped");
        let ours = device.step(&|| false)?.expect("never stopped");
        checks.extend(steps_agree(&case, &ours, &theirs));
        device.download_into(&mut host)?;
        let budget = if step == 1 { 0.001 } else { 0.05 };
        checks.push(updates_agree(
            &case,
            &changes(values(&host)),
            &changes(values(&cpu)),
            0.1 * lr,
            budget,
        ));
        checks.push(exact(
            "trainer.lora_frozen",
            &case,
            &frozen(host.model()),
            &frozen(model),
        ));
    }
    Ok(checks)
}

/// A device step's report against the CPU's: the loss within 1e-3, the
/// gradient norm within 1e-2 (TF32 against exact f32).
fn steps_agree(case: &str, ours: &StepReport, theirs: &StepReport) -> [Check; 2] {
    [
        close_to_scale(
            "trainer.loss",
            case,
            &[ours.loss as f32],
            &[theirs.loss as f32],
            1e-3,
        ),
        close_to_scale(
            "trainer.grad_norm",
            case,
            &[ours.grad_norm as f32],
            &[theirs.grad_norm as f32],
            1e-2,
        ),
    ]
}

/// Every weight's change from `start`, all tensors in canonical order.
fn updates(now: &Model<f32>, start: &Model<f32>) -> Vec<f32> {
    now.tensors()
        .iter()
        .zip(start.tensors())
        .flat_map(|(a, b)| a.values.iter().zip(b.values).map(|(x, y)| x - y))
        .collect()
}

/// Passes when at most `budget` of the weights' updates differ by more
/// than `tolerance`; reports the fraction and the relative L2 difference.
fn updates_agree(case: &str, gpu: &[f32], cpu: &[f32], tolerance: f32, budget: f64) -> Check {
    let differing = gpu
        .iter()
        .zip(cpu)
        .filter(|(g, c)| (*g - *c).abs() > tolerance)
        .count();
    let fraction = differing as f64 / cpu.len().max(1) as f64;
    let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
    let relative = norm(&mut gpu.iter().zip(cpu).map(|(g, c)| f64::from(g - c)))
        / norm(&mut cpu.iter().map(|&c| f64::from(c))).max(f64::MIN_POSITIVE);
    Check {
        op: "trainer.weight_updates",
        case: case.to_string(),
        passed: gpu.len() == cpu.len() && fraction <= budget,
        error: format!(
            "{differing} of {} ({:.3}%) off by > {tolerance:.0e}; relative L2 {relative:.2e}",
            cpu.len(),
            100.0 * fraction
        ),
        bound: format!("<= {:.1}% of the weights", 100.0 * budget),
    }
}

/// Counts equal but for at most `fraction` of their total moved.
fn mostly_equal(
    op: &'static str,
    case: &str,
    gpu: &[usize],
    cpu: &[usize],
    fraction: f64,
) -> Check {
    let total: usize = cpu.iter().sum();
    let moved: usize = gpu
        .iter()
        .zip(cpu)
        .map(|(g, c)| g.abs_diff(*c))
        .sum::<usize>()
        / 2;
    Check {
        op,
        case: case.to_string(),
        passed: gpu.len() == cpu.len() && moved as f64 <= fraction * total as f64,
        error: format!("{moved} of {total} moved; gpu {gpu:?} cpu {cpu:?}"),
        bound: format!("<= {:.0}% moved", 100.0 * fraction),
    }
}

/// `gpu` within `fraction` of `cpu` in relative L2 norm.
fn close_in_l2(op: &'static str, case: &str, gpu: &[f32], cpu: &[f32], fraction: f64) -> Check {
    let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
    let difference = norm(&mut gpu.iter().zip(cpu).map(|(g, c)| f64::from(g - c)));
    let relative = difference / norm(&mut cpu.iter().map(|&c| f64::from(c))).max(f64::MIN_POSITIVE);
    Check {
        op,
        case: case.to_string(),
        passed: gpu.len() == cpu.len() && relative <= fraction,
        error: format!("relative L2 {relative:.2e}"),
        bound: format!("<= {fraction:.0e} relative L2"),
    }
}
