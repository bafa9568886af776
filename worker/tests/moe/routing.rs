//! Known-answer tests of expert selection and gate weights.

use moe_worker::moe::routing::{route, select_experts};
use moe_worker::moe::{GroupLimit, MoeConfig, ScoreFunction};

use crate::small_config;

fn softmax(logits: &[f64]) -> Vec<f64> {
    let exps: Vec<f64> = logits.iter().map(|z| z.exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

#[test]
fn top_k_picks_the_highest_scores_best_first_and_breaks_ties_by_index() {
    let config = MoeConfig {
        top_k: 3,
        ..small_config(ScoreFunction::Softmax, None)
    };
    let scores = [0.1, 0.7, 0.3, 0.9, 0.3, 0.0, 0.3, 0.2];
    assert_eq!(select_experts(&config, &scores), [3, 1, 2]);
}

#[test]
fn group_limit_restricts_experts_to_the_groups_with_the_best_top_two_sums() {
    // Four groups of two. Sums of each group's top two: 0.9, 0.95, 0.92, 0.2.
    let scores = [0.9, 0.0, 0.5, 0.45, 0.46, 0.46, 0.1, 0.1];
    let unlimited = small_config(ScoreFunction::Softmax, None);
    assert_eq!(select_experts(&unlimited, &scores), [0, 2]);
    // Groups 1 and 2 win, so expert 0 (the single best score) is out of reach;
    // experts 4 and 5 tie, and the lower index wins.
    let limited = small_config(
        ScoreFunction::Softmax,
        Some(GroupLimit {
            n_groups: 4,
            top_groups: 2,
        }),
    );
    assert_eq!(select_experts(&limited, &scores), [2, 4]);
    // One group only: group 1, both its experts, in score order.
    let one_group = small_config(
        ScoreFunction::Softmax,
        Some(GroupLimit {
            n_groups: 4,
            top_groups: 1,
        }),
    );
    assert_eq!(select_experts(&one_group, &scores), [2, 3]);
}

#[test]
fn softmax_gates_are_the_raw_scores_or_normalised_and_scaled() {
    let logits = [2.0, 1.0, 0.5, 0.0, -1.0, 0.0, 0.25, -0.5];
    let p = softmax(&logits);
    let bias = [0.0; 8];
    let raw = route(&small_config(ScoreFunction::Softmax, None), &logits, &bias);
    assert_eq!(raw.experts, [0, 1]);
    assert_close(&raw.gates, &[p[0], p[1]]);

    let config = MoeConfig {
        normalize_gates: true,
        routed_scaling_factor: 2.5,
        ..small_config(ScoreFunction::Softmax, None)
    };
    let normalised = route(&config, &logits, &bias);
    let sum = p[0] + p[1];
    assert_close(&normalised.gates, &[2.5 * p[0] / sum, 2.5 * p[1] / sum]);
}

#[test]
fn sigmoid_gates_are_always_normalised_then_scaled() {
    // sigmoid(ln 3) = 0.75, sigmoid(0) = 0.5; the rest are far below.
    let mut logits = [-5.0; 8];
    logits[6] = 3f64.ln();
    logits[2] = 0.0;
    let config = MoeConfig {
        routed_scaling_factor: 2.5,
        ..small_config(ScoreFunction::Sigmoid, None)
    };
    assert!(!config.normalize_gates);
    let routing = route(&config, &logits, &[0.0; 8]);
    assert_eq!(routing.experts, [6, 2]);
    // 2.5 * 0.75 / 1.25 and 2.5 * 0.5 / 1.25.
    assert_close(&routing.gates, &[1.5, 1.0]);
}

#[test]
fn selection_bias_changes_the_choice_but_not_the_gate_values() {
    let logits = [2.0, 1.0, 0.5, 0.0, -1.0, 0.0, 0.25, -0.5];
    let p = softmax(&logits);
    for normalize_gates in [false, true] {
        let config = MoeConfig {
            normalize_gates,
            ..small_config(ScoreFunction::Softmax, None)
        };
        let unbiased = route(&config, &logits, &[0.0; 8]);
        assert_eq!(unbiased.experts, [0, 1]);

        // A bias of 1 lifts expert 4 (the worst score) above every unbiased score.
        let mut bias = [0.0; 8];
        bias[4] = 1.0;
        let biased = route(&config, &logits, &bias);
        assert_eq!(biased.experts, [4, 0]);
        // Gates use the unbiased scores p[4], p[0], never p[4] + 1.
        let sum = if normalize_gates { p[4] + p[0] } else { 1.0 };
        assert_close(&biased.gates, &[p[4] / sum, p[0] / sum]);
        // Scores (which the gradient and balance loss use) ignore the bias too.
        assert_eq!(biased.scores, unbiased.scores);
    }
}

#[test]
fn selection_bias_also_steers_group_choice() {
    let scores = [0.9, 0.0, 0.5, 0.45, 0.46, 0.46, 0.1, 0.1];
    let config = small_config(
        ScoreFunction::Sigmoid,
        Some(GroupLimit {
            n_groups: 4,
            top_groups: 1,
        }),
    );
    assert_eq!(select_experts(&config, &scores), [2, 3]);
    // select_experts sees biased scores; +0.9 on expert 7 makes group 3 sum 1.1.
    let mut biased = scores;
    biased[7] += 0.9;
    assert_eq!(select_experts(&config, &biased), [7, 6]);
}

fn assert_close(got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-14, "got {got:?}, want {want:?}");
    }
}
