//! Token-to-expert routing: affinity scores, (group-limited) top-k selection
//! with the load-balancing bias, and the gate weights.
//!
//! The selection bias only decides *which* experts a token reaches; the gate
//! weights come from the unbiased scores. That is what makes DeepSeek-V3's
//! balancing "auxiliary-loss-free": steering load never distorts the output
//! or the router's gradient.

use crate::memory::HeldBytes;
use crate::moe::config::{MoeConfig, ScoreFunction};
use crate::ops::softmax;
use crate::scalar::Scalar;

/// Added to the selected scores' sum before dividing by it, so sigmoid scores
/// that all underflow give zero gates rather than 0 / 0 (as DeepSeek-V3 does).
const NORMALIZE_EPS: f64 = 1e-20;

/// Where each token goes and with what weight.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing<T> {
    pub n_experts: usize,
    pub top_k: usize,
    /// Unbiased affinity scores, `[tokens, n_experts]`.
    pub scores: Vec<T>,
    /// Selected experts, `[tokens, top_k]`, best (by biased score) first.
    pub experts: Vec<usize>,
    /// Gate weight of each selected expert, `[tokens, top_k]`.
    pub gates: Vec<T>,
}

impl<T: Scalar> Routing<T> {
    pub fn tokens(&self) -> usize {
        self.experts.len() / self.top_k
    }

    /// Tokens routed to each expert (every token counts once for each of its k experts).
    pub fn expert_load(&self) -> Vec<usize> {
        let mut load = vec![0; self.n_experts];
        for &e in &self.experts {
            load[e] += 1;
        }
        load
    }
}

impl<T> HeldBytes for Routing<T> {
    fn held_bytes(&self) -> usize {
        self.scores.held_bytes() + self.experts.held_bytes() + self.gates.held_bytes()
    }
}

/// Routes every token: `logits: [tokens, n_routed_experts]` (from `x @ W_router^T`)
/// and `selection_bias: [n_routed_experts]`.
pub fn route<T: Scalar>(config: &MoeConfig, logits: &[T], selection_bias: &[T]) -> Routing<T> {
    let n_experts = config.n_routed_experts;
    assert_eq!(selection_bias.len(), n_experts, "selection bias shape");
    let scores = scores_forward(config.score_function, logits, n_experts);
    let tokens = scores.len() / n_experts;
    let mut experts = Vec::with_capacity(tokens * config.top_k);
    let mut gates = vec![T::ZERO; tokens * config.top_k];
    let mut biased = vec![T::ZERO; n_experts];
    for (row, token_gates) in scores
        .chunks_exact(n_experts)
        .zip(gates.chunks_exact_mut(config.top_k))
    {
        for ((b, &s), &bias) in biased.iter_mut().zip(row).zip(selection_bias) {
            *b = s + bias;
        }
        let selected = select_experts(config, &biased);
        gates_forward(config, row, &selected, token_gates);
        experts.extend(selected);
    }
    Routing {
        n_experts,
        top_k: config.top_k,
        scores,
        experts,
        gates,
    }
}

/// Per-expert affinity scores from router logits, `[tokens, n_experts]`.
pub fn scores_forward<T: Scalar>(
    function: ScoreFunction,
    logits: &[T],
    n_experts: usize,
) -> Vec<T> {
    let mut scores = vec![T::ZERO; logits.len()];
    match function {
        ScoreFunction::Softmax => softmax::forward(&mut scores, logits, n_experts),
        ScoreFunction::Sigmoid => {
            assert_eq!(logits.len() % n_experts, 0, "router logits shape");
            for (s, &z) in scores.iter_mut().zip(logits) {
                *s = z.sigmoid();
            }
        }
    }
    scores
}

/// Adds d loss / d logits given d loss / d scores.
pub fn scores_backward<T: Scalar>(
    function: ScoreFunction,
    dlogits: &mut [T],
    dscores: &[T],
    scores: &[T],
    n_experts: usize,
) {
    match function {
        ScoreFunction::Softmax => softmax::backward(dlogits, dscores, scores, n_experts),
        ScoreFunction::Sigmoid => {
            assert!(
                dlogits.len() == scores.len() && dscores.len() == scores.len(),
                "router score gradient shapes"
            );
            for ((dz, &ds), &s) in dlogits.iter_mut().zip(dscores).zip(scores) {
                *dz += ds * s * (T::ONE - s);
            }
        }
    }
}

/// The `top_k` experts for one token from its biased scores, best first; ties
/// go to the lower expert index. With a group limit, only experts in the
/// `top_groups` groups with the highest sum of their two best biased scores
/// are eligible.
pub fn select_experts<T: Scalar>(config: &MoeConfig, biased_scores: &[T]) -> Vec<usize> {
    let indexed = |range: std::ops::Range<usize>| range.map(|e| (e, biased_scores[e]));
    let best = match config.group_limit {
        None => top_k(indexed(0..biased_scores.len()), config.top_k),
        Some(limit) => {
            let size = biased_scores.len() / limit.n_groups;
            let group_scores = (0..limit.n_groups).map(|g| {
                let members = top_k(indexed(g * size..(g + 1) * size), 2);
                (g, members.into_iter().map(|(_, s)| s).sum::<T>())
            });
            let mut groups: Vec<usize> = top_k(group_scores, limit.top_groups)
                .into_iter()
                .map(|(g, _)| g)
                .collect();
            // Ascending, so equal scores in different groups still favour the lower index.
            groups.sort_unstable();
            top_k(
                groups
                    .into_iter()
                    .flat_map(|g| indexed(g * size..(g + 1) * size)),
                config.top_k,
            )
        }
    };
    best.into_iter().map(|(e, _)| e).collect()
}

/// The `k` candidates with the largest values, largest first; among equal
/// values the one yielded first wins. O(n k), which beats sorting for the
/// k <= 8 routing uses.
fn top_k<T: Scalar>(candidates: impl Iterator<Item = (usize, T)>, k: usize) -> Vec<(usize, T)> {
    let mut best: Vec<(usize, T)> = Vec::with_capacity(k + 1);
    for (index, value) in candidates {
        let position = best
            .iter()
            .position(|&(_, b)| value > b)
            .unwrap_or(best.len());
        if position < k {
            best.insert(position, (index, value));
            best.truncate(k);
        }
    }
    best
}

/// One token's gate weights: the unbiased scores of its `experts`, divided by
/// their sum when normalising, times the routed scaling factor.
pub fn gates_forward<T: Scalar>(
    config: &MoeConfig,
    scores: &[T],
    experts: &[usize],
    gates: &mut [T],
) {
    for (g, &e) in gates.iter_mut().zip(experts) {
        *g = scores[e];
    }
    let scale = T::from_f64(config.routed_scaling_factor);
    let scale = if config.normalizes_gates() {
        scale / (gates.iter().copied().sum::<T>() + T::from_f64(NORMALIZE_EPS))
    } else {
        scale
    };
    for g in gates.iter_mut() {
        *g *= scale;
    }
}

/// Adds one token's d loss / d scores given d loss / d gates.
///
/// With `g_j = c p_j / (S + eps)` and `S = sum_selected p`:
/// `d p_j = c (dg_j / (S + eps) - sum_i dg_i p_i / (S + eps)^2)`; without
/// normalisation simply `c dg_j`. Unselected experts get nothing here.
pub fn gates_backward<T: Scalar>(
    config: &MoeConfig,
    dscores: &mut [T],
    dgates: &[T],
    scores: &[T],
    experts: &[usize],
) {
    let scale = T::from_f64(config.routed_scaling_factor);
    if config.normalizes_gates() {
        let denominator =
            experts.iter().map(|&e| scores[e]).sum::<T>() + T::from_f64(NORMALIZE_EPS);
        let weighted: T = dgates
            .iter()
            .zip(experts)
            .map(|(&dg, &e)| dg * scores[e])
            .sum();
        let shared_term = weighted / (denominator * denominator);
        for (&dg, &e) in dgates.iter().zip(experts) {
            dscores[e] += scale * (dg / denominator - shared_term);
        }
    } else {
        for (&dg, &e) in dgates.iter().zip(experts) {
            dscores[e] += scale * dg;
        }
    }
}
