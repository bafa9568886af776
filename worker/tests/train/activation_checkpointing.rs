//! Activation checkpointing (`training.activationCheckpointing`): the same
//! losses and weights bit for bit, and fewer activation bytes held.

use moe_worker::data::{DataLoader, load_tokens};
use moe_worker::linear::GemmPrecision;
use moe_worker::model::{ActivationMemory, Model, ModelConfig};
use moe_worker::moe::{MoeConfig, ScoreFunction};
use moe_worker::rng::SplitMix64;
use moe_worker::settings::TrainSettings;
use moe_worker::train::Trainer;
use serde_json::Value;

use crate::{config_json, scratch_dir, worker_config};

/// Trains `steps` steps; returns each step's (loss, grad norm) and the final weights' bits.
fn train(config: &Value, steps: usize) -> (Vec<(f64, f64)>, Vec<Vec<u32>>) {
    let settings = TrainSettings::from_config(&worker_config(config)).unwrap();
    let tokens = load_tokens(&settings.data, settings.model.vocab).unwrap();
    let loader = DataLoader::new(
        tokens,
        settings.model.seq_len,
        settings.training.seed,
        "tiny",
    )
    .unwrap();
    let mut trainer = Trainer::new(settings.model.clone(), settings.training.clone(), loader);
    let reports = (0..steps)
        .map(|_| {
            let report = trainer.step(&|| false).unwrap();
            (report.loss, report.grad_norm)
        })
        .collect();
    let mut weights: Vec<Vec<u32>> = trainer
        .model()
        .tensors()
        .iter()
        .map(|t| t.values.iter().map(|v| v.to_bits()).collect())
        .collect();
    weights.extend(
        trainer
            .model()
            .moe_layers()
            .map(|l| l.selection_bias.iter().map(|v| v.to_bits()).collect()),
    );
    (reports, weights)
}

fn assert_identical_with_and_without(name: &str, patch: impl Fn(&mut Value)) {
    let mut config = config_json(&scratch_dir(name));
    patch(&mut config);
    let mut checkpointed = config.clone();
    checkpointed["training"]["activationCheckpointing"] = true.into();
    let settings = TrainSettings::from_config(&worker_config(&checkpointed)).unwrap();
    assert_eq!(
        settings.training.activation_memory,
        ActivationMemory::RecomputeBlocks,
        "the flag reaches the trainer"
    );
    let (losses, weights) = train(&config, 4);
    let (losses_checkpointed, weights_checkpointed) = train(&checkpointed, 4);
    assert_eq!(losses, losses_checkpointed, "{name}: losses and grad norms");
    assert!(
        weights == weights_checkpointed,
        "{name}: weights differ after 4 steps"
    );
}

#[test]
fn losses_and_weights_are_bit_identical_with_checkpointing() {
    assert_identical_with_and_without("recompute-fp32", |_| {});
}

/// Tensorwise FP8 records each tensor's amax in the forward pass: a rerun
/// records it again, which must not change the next step's scales.
#[test]
fn losses_and_weights_are_bit_identical_with_checkpointing_and_tensorwise_fp8() {
    assert_identical_with_and_without("recompute-fp8", |c| {
        c["training"]["precision"] =
            serde_json::json!({"fp8": {"enabled": true, "recipe": "tensorwise"}});
    });
}

/// The shapes of `examples/training/tiny.yaml` (one micro-batch of 8 sequences).
fn tiny_example_config() -> ModelConfig {
    ModelConfig {
        vocab: 256,
        hidden: 64,
        layers: 3,
        dense_layers: 1,
        dense_hidden: 256,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        norm_eps: moe_worker::model::config::NORM_EPS,
        qk_norm: None,
        seq_len: 64,
        rope_theta: 10_000.0,
        moe: MoeConfig {
            hidden: 64,
            n_routed_experts: 8,
            expert_hidden: 128,
            n_shared_experts: 1,
            shared_expert_hidden: 128,
            top_k: 2,
            score_function: ScoreFunction::Sigmoid,
            group_limit: None,
            normalize_gates: true,
            routed_scaling_factor: 1.0,
            aux_loss_alpha: 0.0,
        },
        bias_update_rate: None,
        gemm_precision: GemmPrecision::Fp32,
        head_precision: GemmPrecision::Fp32,
    }
}

#[test]
fn checkpointing_holds_fewer_activation_bytes() {
    let config = tiny_example_config();
    let model = Model::<f32>::initial(config.clone(), 1);
    let mut rng = SplitMix64::new(2);
    let n = 8 * config.seq_len;
    let tokens: Vec<u32> = (0..n).map(|_| rng.below(config.vocab) as u32).collect();
    let targets: Vec<u32> = (0..n).map(|_| rng.below(config.vocab) as u32).collect();

    let kept = model.forward_with(&tokens, &targets, ActivationMemory::KeepAll);
    let checkpointed = model.forward_with(&tokens, &targets, ActivationMemory::RecomputeBlocks);
    assert_eq!(kept.loss(), checkpointed.loss());
    let full = kept.activation_bytes();
    let held = checkpointed.activation_bytes();
    // The backward pass reruns one block at a time on top of what is held.
    let largest_block = *kept.block_activation_bytes().iter().max().unwrap();
    let peak = held + largest_block;
    eprintln!(
        "activation bytes, tiny example shapes, 512 tokens: kept {full}, checkpointed {held} held, \
         {peak} peak during backward ({:.1}% of kept)",
        100.0 * peak as f64 / full as f64
    );
    // Each checkpointed block holds its input, [tokens, hidden] f32.
    let inputs = config.layers * n * config.hidden * 4;
    assert!(held >= inputs, "{held} < the blocks' inputs {inputs}");
    assert!(peak < full, "peak {peak} is not below {full}");
}
