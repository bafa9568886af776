//! The whole model's backward pass against central differences in f64,
//! for every parameter tensor.

use moe_worker::data::Batch;
use moe_worker::gradcheck::{STEP, max_scaled_error, numeric_gradient};
use moe_worker::linear::GemmPrecision;
use moe_worker::model::config::QkNorm;
use moe_worker::model::{ActivationMemory, Gradients, Model, ModelConfig, Parallel};
use moe_worker::moe::{GroupLimit, MoeConfig, ScoreFunction};
use moe_worker::ops::cross_entropy::{IGNORED, LossScale};
use moe_worker::rng::SplitMix64;

/// Worst scaled error tolerated; see `FLOOR`. Measured worst case over these
/// tests: 6e-8 (h = 1e-5 balances truncation and rounding). A missing or
/// wrong term in any backward shows up at 1e-3 or more.
const TOLERANCE: f64 = 1e-6;
/// The mean loss over 8 tokens gives gradients of order 1e-3 to 1e-1; below
/// the floor errors count as absolute. Rounding in the central differences
/// is about `f64::EPSILON * loss / STEP` ≈ 1e-10, far below `FLOOR * TOLERANCE`.
const FLOOR: f64 = 1e-3;

/// Two blocks (dense then MoE) over a 16-token vocabulary: every tensor kind
/// the model has, small enough to difference each of its ~2 000 weights.
pub(crate) fn tiny_config(moe: MoeConfig, heads: usize, kv_heads: usize) -> ModelConfig {
    ModelConfig {
        vocab: 16,
        hidden: 8,
        layers: 2,
        dense_layers: 1,
        dense_hidden: 12,
        heads,
        kv_heads,
        head_dim: 8 / heads,
        norm_eps: moe_worker::model::config::NORM_EPS,
        qk_norm: None,
        seq_len: 4,
        rope_theta: 100.0,
        moe,
        bias_update_rate: Some(0.01),
        gemm_precision: GemmPrecision::Fp32,
        head_precision: GemmPrecision::Fp32,
    }
}

pub(crate) fn moe(score_function: ScoreFunction) -> MoeConfig {
    MoeConfig {
        hidden: 8,
        n_routed_experts: 4,
        expert_hidden: 6,
        n_shared_experts: 1,
        shared_expert_hidden: 6,
        top_k: 2,
        score_function,
        group_limit: None,
        normalize_gates: false,
        routed_scaling_factor: 1.0,
        aux_loss_alpha: 0.0,
    }
}

fn check_model(config: ModelConfig, seed: u64) {
    check_model_ignoring(config, seed, &[]);
}

/// [`check_model`] with the targets at `ignored` positions left out of the
/// loss (supervised fine-tuning's prompt tokens).
fn check_model_ignoring(config: ModelConfig, seed: u64, ignored: &[usize]) {
    check_model_padded(config, seed, ignored, None);
}

/// [`check_model_ignoring`] on two sequences whose `real` tokens are
/// followed by padding (left out of the MoE layers' balance loss).
fn check_model_padded(config: ModelConfig, seed: u64, ignored: &[usize], real: Option<[usize; 2]>) {
    let mut model = Model::<f64>::initial(config.clone(), seed);
    let mut rng = SplitMix64::new(seed + 1);
    // Gains away from their initial 1, so a backward pass that forgot a
    // gain's factor is off.
    for block in &mut model.weights.blocks {
        for gain in [&mut block.q_norm, &mut block.k_norm] {
            for g in gain.iter_mut() {
                *g += 0.5 * rng.normal();
            }
        }
    }
    // Two sequences of four tokens.
    let tokens: Vec<u32> = (0..8).map(|_| rng.below(config.vocab) as u32).collect();
    let mut targets: Vec<u32> = (0..8).map(|_| rng.below(config.vocab) as u32).collect();
    for &i in ignored {
        targets[i] = IGNORED;
    }
    let batch = Batch {
        seq_len: 4,
        inputs: tokens.clone(),
        targets: targets.clone(),
        real: real.map_or(vec![4, 4], |r| r.to_vec()),
        documents: None,
    };
    let forward = |model: &Model<f64>| match real {
        None => model.forward(&tokens, &targets),
        Some(_) => model
            .forward_parallel(
                &batch,
                ActivationMemory::KeepAll,
                Parallel::default(),
                LossScale::PassMean,
            )
            .expect("one process"),
    };
    let pass = forward(&model);
    if !ignored.is_empty() {
        // The mean over the other positions: what the same model's loss is
        // on them alone, position by position.
        let probs = pass.next_token_probs();
        let counted: Vec<usize> = (0..8).filter(|i| !ignored.contains(i)).collect();
        let mean = counted
            .iter()
            .map(|&i| -probs[i * config.vocab + targets[i] as usize].ln())
            .sum::<f64>()
            / counted.len() as f64;
        assert!(
            (pass.cross_entropy - mean).abs() < 1e-12,
            "{} vs {mean}",
            pass.cross_entropy
        );
    }
    let selection: Vec<Vec<usize>> = pass.selected_experts().iter().map(|s| s.to_vec()).collect();
    if config.moe.aux_loss_alpha > 0.0 {
        assert!(pass.aux_loss > 0.0);
    }
    let mut grads = Gradients::zeros(&config);
    model.backward(&pass, &mut grads);

    let loss_with = |index: usize, values: &[f64]| {
        let mut moved = model.clone();
        *moved.weights.tensors_mut()[index] = values.to_vec();
        let pass = forward(&moved);
        assert_eq!(
            pass.selected_experts(),
            selection,
            "a finite-difference step changed the top-k choice"
        );
        pass.loss()
    };
    let tensors = model.tensors();
    assert!(tensors.iter().any(|t| t.name.contains(".dense.")));
    assert!(tensors.iter().any(|t| t.name.contains(".moe.shared_w2")));
    for (index, (tensor, grad)) in tensors.iter().zip(grads.tensors(&config)).enumerate() {
        let numeric = numeric_gradient(tensor.values, STEP, |v| loss_with(index, v));
        assert!(
            numeric.iter().any(|g| g.abs() > FLOOR),
            "{}: gradient is ~0 everywhere",
            tensor.name
        );
        let error = max_scaled_error(grad.values, &numeric, FLOOR);
        assert!(error < TOLERANCE, "{}: scaled error {error:e}", tensor.name);
    }
}

#[test]
fn sigmoid_routing_with_groups_balance_loss_and_grouped_query_heads() {
    let moe = MoeConfig {
        group_limit: Some(GroupLimit {
            n_groups: 2,
            top_groups: 1,
        }),
        routed_scaling_factor: 2.5,
        aux_loss_alpha: 0.1,
        ..moe(ScoreFunction::Sigmoid)
    };
    check_model(tiny_config(moe, 2, 1), 10);
}

#[test]
fn per_head_qk_norms_on_heads_wider_than_hidden_over_heads() {
    // Qwen3's attention: 2 heads of 6 (q is 12 wide on a hidden size of 8),
    // one k/v head, each head RMS-normed with a shared gain of 6.
    let config = ModelConfig {
        head_dim: 6,
        qk_norm: Some(QkNorm::PerHead),
        norm_eps: 1e-2,
        ..tiny_config(moe(ScoreFunction::Softmax), 2, 1)
    };
    assert_eq!(config.q_width(), 12);
    check_model(config, 30);
}

#[test]
fn ignored_targets_leave_the_loss_and_its_gradient() {
    // Supervised fine-tuning: the prompt's positions predict nothing trained.
    check_model_ignoring(
        tiny_config(moe(ScoreFunction::Softmax), 2, 1),
        50,
        &[0, 1, 2, 5],
    );
}

#[test]
fn padding_leaves_the_balance_loss_and_its_gradient() {
    // A conversation of 2 tokens padded to the sequence's 4: its padding
    // is out of the loss (ignored targets) and out of the balance loss.
    let moe = MoeConfig {
        aux_loss_alpha: 0.1,
        ..moe(ScoreFunction::Sigmoid)
    };
    check_model_padded(tiny_config(moe, 2, 1), 60, &[6, 7], Some([4, 2]));
}

#[test]
fn whole_projection_qk_norms() {
    // OLMoE's: q and k normed over a token's whole projection.
    let config = ModelConfig {
        qk_norm: Some(QkNorm::Whole),
        ..tiny_config(moe(ScoreFunction::Sigmoid), 2, 1)
    };
    check_model(config, 40);
}

#[test]
fn softmax_routing_with_multi_head_attention() {
    check_model(tiny_config(moe(ScoreFunction::Softmax), 2, 2), 20);
}
