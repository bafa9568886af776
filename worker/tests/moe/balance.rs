//! Load balancing: the selection-bias update and the balance loss.

use moe_worker::moe::Sequences;
use moe_worker::moe::balance::{load_imbalance, sequence_balance_loss, update_selection_bias};
use moe_worker::moe::routing::Routing;
use moe_worker::moe::{MoeConfig, ScoreFunction};

use crate::{random, random_layer, small_config};

#[test]
fn bias_moves_by_rate_towards_the_mean_load() {
    let mut bias = [0.0f32, 0.5, 0.0, -1.0];
    // Mean load 2.5: under-loaded experts go up, over-loaded ones down.
    update_selection_bias(&mut bias, &[1, 4, 2, 3], 0.25);
    assert_eq!(bias, [0.25, 0.25, 0.25, -1.25]);
    // Exactly at the mean: unchanged.
    update_selection_bias(&mut bias, &[2, 2, 2, 2], 0.25);
    assert_eq!(bias, [0.25, 0.25, 0.25, -1.25]);
}

#[test]
fn imbalance_is_max_over_mean() {
    assert_eq!(load_imbalance(&[2, 2, 2, 2]), 1.0);
    assert_eq!(load_imbalance(&[8, 0, 0, 0]), 4.0);
    assert_eq!(load_imbalance(&[3, 1, 2, 2]), 1.5);
    assert_eq!(load_imbalance(&[0, 0]), 1.0);
}

/// A fixed, skewed batch routed again and again: without updates the load
/// never changes; with them the bias should pull it towards uniform.
#[test]
fn bias_updates_reduce_load_imbalance_on_a_skewed_batch() {
    let config = MoeConfig {
        n_routed_experts: 16,
        top_k: 2,
        ..small_config(ScoreFunction::Sigmoid, None)
    };
    let mut layer = random_layer(&config, 800, 0.2);
    // Every token shares one direction, so the router favours the same few experts.
    let tokens = 512;
    let common = random(config.hidden, 801);
    let noise = random(tokens * config.hidden, 802);
    let x: Vec<f64> = noise
        .iter()
        .enumerate()
        .map(|(i, n)| 3.0 * common[i % config.hidden] + n)
        .collect();

    let unbalanced = load_imbalance(&layer.forward(&x, tokens).expert_load());
    assert!(
        unbalanced > 3.0,
        "the batch is not skewed enough to test anything: {unbalanced}"
    );

    // DeepSeek-V3 uses 1e-3 over many thousands of steps; 1e-2 converges
    // within this test's 100 steps (scores are sigmoids in (0, 1)).
    let (steps, rate) = (100, 1e-2);
    let mut recent = Vec::new();
    for step in 0..steps {
        let load = layer.forward(&x, tokens).expert_load();
        if step >= steps - 20 {
            recent.push(load_imbalance(&load));
        }
        layer.update_selection_bias(&load, rate);
    }
    // Sign updates oscillate around balance, so judge the last 20 steps as a whole.
    let worst_recent = recent.iter().copied().fold(0.0, f64::max);
    assert!(
        worst_recent < 1.0 + 0.25 * (unbalanced - 1.0),
        "imbalance {unbalanced} without updates, up to {worst_recent} with them"
    );
}

#[test]
fn balance_loss_known_answers() {
    let alpha = 0.3;
    // 4 experts, top-1, 4 tokens.
    let uniform = Routing {
        n_experts: 4,
        top_k: 1,
        scores: vec![0.25; 16],
        experts: vec![0, 1, 2, 3],
        gates: vec![0.25; 4],
    };
    // f_i = 1 and P_i = 1/4 for all i: alpha * 4 * 1/4.
    assert!(
        (sequence_balance_loss(&uniform, &Sequences::whole(4, 4), alpha) - alpha).abs() < 1e-15
    );

    // Every token to expert 0 with score 0.7: f = (4, 0, 0, 0), P_0 = 0.7.
    let mut skewed_scores = vec![0.1; 16];
    for t in 0..4 {
        skewed_scores[t * 4] = 0.7;
    }
    let skewed = Routing {
        scores: skewed_scores,
        experts: vec![0; 4],
        ..uniform.clone()
    };
    assert!(
        (sequence_balance_loss(&skewed, &Sequences::whole(4, 4), alpha) - alpha * 4.0 * 0.7).abs()
            < 1e-15
    );

    // Tokens 0-1 to expert 0, tokens 2-3 to expert 1, each with score 0.7.
    // As one sequence of 4: f = (2, 2, 0, 0), P = (0.4, 0.4, 0.1, 0.1), loss 1.6 alpha.
    // As two sequences of 2, each is fully skewed: f = (4, 0, 0, 0), P_0 = 0.7,
    // loss 2.8 alpha each, and the batch loss is their mean.
    let mut split_scores = vec![0.1; 16];
    for (t, e) in [(0, 0), (1, 0), (2, 1), (3, 1)] {
        split_scores[t * 4 + e] = 0.7;
    }
    let split = Routing {
        scores: split_scores,
        experts: vec![0, 0, 1, 1],
        ..uniform.clone()
    };
    assert!(
        (sequence_balance_loss(&split, &Sequences::whole(4, 4), alpha) - alpha * 1.6).abs() < 1e-15
    );
    assert!(
        (sequence_balance_loss(&split, &Sequences::whole(4, 2), alpha) - alpha * 2.8).abs() < 1e-15
    );
    // As one sequence of 4 whose last two tokens are padding: only tokens
    // 0-1 count, so T = 2 and it is fully skewed again, 2.8 alpha.
    let padded = Sequences::padded(4, vec![2]);
    assert!((sequence_balance_loss(&split, &padded, alpha) - alpha * 2.8).abs() < 1e-15);
}
