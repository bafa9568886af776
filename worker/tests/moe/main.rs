//! Tests of the MoE layer through the crate's public API.

mod balance;
mod dispatch;
mod gradients;
mod routing;
mod threads;

use moe_worker::moe::{GroupLimit, MoeConfig, MoeLayer, MoeParams, ScoreFunction};
use moe_worker::rng::SplitMix64;

/// The small layer most tests use: hidden 8, 8 experts of width 4, top-2, two
/// shared experts of width 3 (fused to width 6).
fn small_config(score_function: ScoreFunction, group_limit: Option<GroupLimit>) -> MoeConfig {
    MoeConfig {
        hidden: 8,
        n_routed_experts: 8,
        expert_hidden: 4,
        n_shared_experts: 2,
        shared_expert_hidden: 3,
        top_k: 2,
        score_function,
        group_limit,
        normalize_gates: false,
        routed_scaling_factor: 1.0,
        aux_loss_alpha: 0.0,
    }
}

/// A layer with N(0, std^2) weights from `seed`.
fn random_layer(config: &MoeConfig, seed: u64, std: f64) -> MoeLayer<f64> {
    let params = MoeParams::random(config, &mut SplitMix64::new(seed), std);
    MoeLayer::new(config.clone(), params).expect("test configs are valid")
}

fn random(n: usize, seed: u64) -> Vec<f64> {
    SplitMix64::new(seed).normal_vec(n, 1.0)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
