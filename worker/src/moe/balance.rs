//! Expert load balancing: DeepSeek-V3's auxiliary-loss-free selection bias,
//! its optional sequence-wise balance loss, and the imbalance metric.

use crate::moe::routing::Routing;
use crate::scalar::Scalar;

/// After a step, nudges each expert's selection bias towards the mean load:
/// `bias_e += rate * sign(mean_load - load_e)` (no change at exactly the mean).
/// Overloaded experts become less attractive to the top-k selection, idle
/// ones more, without touching gate weights or gradients.
pub fn update_selection_bias<T: Scalar>(bias: &mut [T], load: &[usize], rate: T) {
    assert_eq!(bias.len(), load.len(), "selection bias and load shapes");
    if load.is_empty() {
        return;
    }
    // Compare load_e * n against the total rather than against a rounded mean.
    let total: usize = load.iter().sum();
    let n = load.len();
    for (b, &l) in bias.iter_mut().zip(load) {
        match (l * n).cmp(&total) {
            std::cmp::Ordering::Less => *b += rate,
            std::cmp::Ordering::Greater => *b -= rate,
            std::cmp::Ordering::Equal => {}
        }
    }
}

/// Max load over mean load: 1 when perfectly balanced, `n_experts` when one
/// expert takes everything. 1 for an empty or all-zero load.
pub fn load_imbalance(load: &[usize]) -> f64 {
    let total: usize = load.iter().sum();
    match load.iter().max() {
        Some(&max) if total > 0 => max as f64 * load.len() as f64 / total as f64,
        _ => 1.0,
    }
}

/// DeepSeek-V3's sequence-wise balance loss, averaged over the sequences of
/// `seq_len` consecutive tokens in `routing`:
///
/// `L = alpha * sum_i f_i P_i`, with `f_i = N / (K T) * #{t : i selected for t}`
/// and `P_i = mean_t s'_{i,t}`, where `s'_{i,t} = s_{i,t} / sum_j s_{j,t}`
/// (`N` experts, `K` = top-k, `T` = `seq_len`). `f` counts the biased
/// selection and is treated as a constant; the gradient flows through `P`.
pub fn sequence_balance_loss<T: Scalar>(routing: &Routing<T>, seq_len: usize, alpha: f64) -> T {
    let mut loss = 0.0;
    for_each_sequence(routing, seq_len, |scores, fractions| {
        for row in scores.chunks_exact(routing.n_experts) {
            let sum: T = row.iter().copied().sum();
            loss += row
                .iter()
                .zip(fractions)
                .map(|(&s, &f)| f * (s / sum).to_f64())
                .sum::<f64>();
        }
    });
    let sequences = routing.tokens() / seq_len;
    T::from_f64(alpha * loss / (seq_len * sequences) as f64)
}

/// Adds the gradient of [`sequence_balance_loss`] with respect to the scores into `dscores`.
///
/// `dL/ds'_{i,t} = alpha f_i / (T B)` for `B` sequences; through the
/// normalisation `ds_{i,t} = (ds'_{i,t} - sum_j ds'_{j,t} s'_{j,t}) / sum_j s_{j,t}`.
pub fn sequence_balance_loss_backward<T: Scalar>(
    dscores: &mut [T],
    routing: &Routing<T>,
    seq_len: usize,
    alpha: f64,
) {
    assert_eq!(
        dscores.len(),
        routing.scores.len(),
        "router score gradient shape"
    );
    let n_experts = routing.n_experts;
    let sequences = routing.tokens() / seq_len;
    let per_token = alpha / (seq_len * sequences) as f64;
    let mut sequence_start = 0;
    for_each_sequence(routing, seq_len, |scores, fractions| {
        let dscores = &mut dscores[sequence_start..sequence_start + scores.len()];
        for (row, drow) in scores
            .chunks_exact(n_experts)
            .zip(dscores.chunks_exact_mut(n_experts))
        {
            let sum: T = row.iter().copied().sum();
            let projection: f64 = row
                .iter()
                .zip(fractions)
                .map(|(&s, &f)| f * (s / sum).to_f64())
                .sum();
            for (d, &f) in drow.iter_mut().zip(fractions) {
                *d += T::from_f64(per_token * (f - projection)) / sum;
            }
        }
        sequence_start += scores.len();
    });
}

/// Calls `visit(scores, f)` per sequence, with the sequence's score rows and
/// each expert's `f_i` (its selection count scaled by `N / (K T)`).
fn for_each_sequence<T: Scalar>(
    routing: &Routing<T>,
    seq_len: usize,
    mut visit: impl FnMut(&[T], &[f64]),
) {
    let (n_experts, top_k) = (routing.n_experts, routing.top_k);
    assert!(
        seq_len > 0 && routing.tokens().is_multiple_of(seq_len),
        "tokens must split into whole sequences"
    );
    let scale = n_experts as f64 / (top_k * seq_len) as f64;
    let mut fractions = vec![0.0; n_experts];
    let sequences = routing
        .scores
        .chunks_exact(seq_len * n_experts)
        .zip(routing.experts.chunks_exact(seq_len * top_k));
    for (scores, experts) in sequences {
        fractions.fill(0.0);
        for &e in experts {
            fractions[e] += scale;
        }
        visit(scores, &fractions);
    }
}
