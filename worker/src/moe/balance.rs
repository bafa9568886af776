//! Expert load balancing: DeepSeek-V3's auxiliary-loss-free selection bias,
//! its optional sequence-wise balance loss (over whole sequences, or over
//! slices of them whose statistics a sequence-parallel group sums), and the
//! imbalance metric.

use crate::memory::HeldBytes;
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
    let sequences = routing.tokens() / seq_len;
    let per_token = alpha / (seq_len * sequences) as f64;
    let mut sequence_start = 0;
    for_each_sequence(routing, seq_len, |scores, fractions| {
        let dscores = &mut dscores[sequence_start..sequence_start + scores.len()];
        add_sequence_score_gradient(dscores, scores, fractions, per_token);
        sequence_start += scores.len();
    });
}

/// Adds one sequence's (or slice's) share of the balance loss's gradient:
/// `dL/ds'_{i,t} = per_token · f_i` for each of its score rows, taken
/// through the normalisation `s' = s / sum_j s_j`.
fn add_sequence_score_gradient<T: Scalar>(
    dscores: &mut [T],
    scores: &[T],
    fractions: &[f64],
    per_token: f64,
) {
    let n_experts = fractions.len();
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
}

/// Each sequence's routing statistics over the tokens of it a rank holds
/// (`slice_len` consecutive tokens per sequence, the whole sequence
/// without sequence parallelism): per expert, how many of those tokens
/// selected it and the sum of their normalised scores `s'`. Statistics of
/// disjoint slices of a sequence add up to the whole sequence's, so a
/// sequence-parallel group sums them ([`Self::values_mut`], an all-reduce)
/// and every rank then holds the whole sequences' `f_i` and `P_i`.
#[derive(Clone, Debug, PartialEq)]
pub struct SequenceRoutingSums {
    n_experts: usize,
    top_k: usize,
    /// Per sequence, `n_experts` selection counts, then `n_experts` score
    /// sums. f32, the collectives' type: counts stay exact below 2^24.
    values: Vec<f32>,
}

impl SequenceRoutingSums {
    /// The statistics of `routing`'s tokens, `slice_len` per sequence.
    pub fn of<T: Scalar>(routing: &Routing<T>, slice_len: usize) -> Self {
        let (n_experts, top_k) = (routing.n_experts, routing.top_k);
        assert!(
            slice_len > 0 && routing.tokens().is_multiple_of(slice_len),
            "tokens must split into whole slices of sequences"
        );
        let sequences = routing
            .scores
            .chunks_exact(slice_len * n_experts)
            .zip(routing.experts.chunks_exact(slice_len * top_k));
        let mut values = Vec::with_capacity(routing.tokens() / slice_len * 2 * n_experts);
        let mut score_sums = vec![0.0; n_experts];
        for (scores, experts) in sequences {
            let counts_start = values.len();
            values.resize(counts_start + n_experts, 0.0);
            for &e in experts {
                values[counts_start + e] += 1.0;
            }
            score_sums.fill(0.0);
            for row in scores.chunks_exact(n_experts) {
                let sum: T = row.iter().copied().sum();
                for (total, &s) in score_sums.iter_mut().zip(row) {
                    *total += (s / sum).to_f64();
                }
            }
            values.extend(score_sums.iter().map(|&s| s as f32));
        }
        Self {
            n_experts,
            top_k,
            values,
        }
    }

    /// Every value, for summing over a sequence-parallel group in place.
    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.values
    }

    pub fn sequences(&self) -> usize {
        self.values.len() / (2 * self.n_experts)
    }

    /// Each sequence's `(selection counts, score sums)`.
    fn per_sequence(&self) -> impl Iterator<Item = (&[f32], &[f32])> {
        self.values
            .chunks_exact(2 * self.n_experts)
            .map(|v| v.split_at(self.n_experts))
    }

    /// Each sequence's `f_i = N / (K T) · count_i`, `[sequences, n_experts]`,
    /// for sequences of `seq_len` (`T`) tokens: the statistics must be the
    /// whole sequences'.
    pub fn fractions(&self, seq_len: usize) -> Vec<f64> {
        let scale = self.n_experts as f64 / (self.top_k * seq_len) as f64;
        self.per_sequence()
            .flat_map(|(counts, _)| counts.iter().map(move |&c| scale * f64::from(c)))
            .collect()
    }

    /// [`sequence_balance_loss`] from the whole sequences' statistics:
    /// `alpha · sum_i f_i P_i` with `P_i = score_sum_i / T`, averaged over
    /// the sequences.
    pub fn loss(&self, seq_len: usize, alpha: f64) -> f64 {
        let fractions = self.fractions(seq_len);
        let sum: f64 = self
            .per_sequence()
            .zip(fractions.chunks_exact(self.n_experts))
            .map(|((_, score_sums), f)| {
                f.iter()
                    .zip(score_sums)
                    .map(|(&f, &s)| f * f64::from(s))
                    .sum::<f64>()
            })
            .sum();
        alpha * sum / (seq_len * self.sequences()) as f64
    }
}

/// The balance loss of a rank holding a slice of each sequence, from the
/// whole sequences' statistics: its value, and what its backward pass
/// needs ([`Self::add_score_gradient`]).
#[derive(Clone, Debug, PartialEq)]
pub struct SlicedBalanceLoss {
    /// The whole sequences' loss: the same on every rank of the group.
    pub loss: f64,
    /// The whole sequences' `f_i`, `[sequences, n_experts]`.
    fractions: Vec<f64>,
    /// `dL/ds'_{i,t} / f_i` for this rank's tokens, see [`Self::new`].
    per_token: f64,
    slice_len: usize,
}

impl HeldBytes for SlicedBalanceLoss {
    fn held_bytes(&self) -> usize {
        self.fractions.held_bytes()
    }
}

impl SlicedBalanceLoss {
    /// From `whole`, the statistics summed over the `parts` ranks holding
    /// `seq_len / parts` tokens of each sequence each.
    ///
    /// Every rank reports the whole loss `L`, so the ranks' mean is `L`.
    /// Their gradients are averaged too, though, and each rank only
    /// back-propagates through its own tokens, so each takes
    /// `parts · dL/ds'` for them: `alpha f_i / (L B)` with `L` the slice
    /// length, just as each rank's cross-entropy is the mean over its slice.
    pub fn new(whole: &SequenceRoutingSums, seq_len: usize, parts: usize, alpha: f64) -> Self {
        assert!(
            parts > 0 && seq_len.is_multiple_of(parts),
            "sequences split evenly over the ranks"
        );
        let slice_len = seq_len / parts;
        Self {
            loss: whole.loss(seq_len, alpha),
            fractions: whole.fractions(seq_len),
            per_token: alpha / (slice_len * whole.sequences()) as f64,
            slice_len,
        }
    }

    /// Adds this rank's share of the loss's gradient with respect to its
    /// tokens' scores (`routing`, `slice_len` tokens per sequence) into `dscores`.
    pub fn add_score_gradient<T: Scalar>(&self, dscores: &mut [T], routing: &Routing<T>) {
        let n_experts = routing.n_experts;
        assert_eq!(
            dscores.len(),
            routing.scores.len(),
            "router score gradient shape"
        );
        let rows = self.slice_len * n_experts;
        assert_eq!(
            routing.scores.len(),
            rows * self.fractions.len() / n_experts,
            "the slices the statistics were taken over"
        );
        let slices = dscores
            .chunks_exact_mut(rows)
            .zip(routing.scores.chunks_exact(rows))
            .zip(self.fractions.chunks_exact(n_experts));
        for ((dscores, scores), fractions) in slices {
            add_sequence_score_gradient(dscores, scores, fractions, self.per_token);
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    const N_EXPERTS: usize = 6;
    const TOP_K: usize = 2;

    /// `tokens` tokens with sigmoid scores, each sent to its two best experts.
    fn routing(tokens: usize, seed: u64) -> Routing<f32> {
        let logits: Vec<f32> = SplitMix64::new(seed).normal_vec(tokens * N_EXPERTS, 1.5);
        let scores: Vec<f32> = logits.iter().map(|&z| 1.0 / (1.0 + (-z).exp())).collect();
        let mut experts = Vec::with_capacity(tokens * TOP_K);
        for row in scores.chunks_exact(N_EXPERTS) {
            let mut order: Vec<usize> = (0..N_EXPERTS).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            experts.extend(&order[..TOP_K]);
        }
        Routing {
            n_experts: N_EXPERTS,
            top_k: TOP_K,
            scores,
            experts,
            gates: vec![0.0; tokens * TOP_K],
        }
    }

    /// Rank `r` of `parts`' slice of every sequence of `seq_len` tokens.
    fn slice(whole: &Routing<f32>, seq_len: usize, parts: usize, r: usize) -> Routing<f32> {
        let l = seq_len / parts;
        let rows = |values: &[f32], width: usize| -> Vec<f32> {
            values
                .chunks_exact(seq_len * width)
                .flat_map(|s| s[r * l * width..(r + 1) * l * width].to_vec())
                .collect()
        };
        let experts = whole
            .experts
            .chunks_exact(seq_len * TOP_K)
            .flat_map(|s| s[r * l * TOP_K..(r + 1) * l * TOP_K].to_vec())
            .collect();
        Routing {
            scores: rows(&whole.scores, N_EXPERTS),
            experts,
            gates: rows(&whole.gates, TOP_K),
            ..whole.clone()
        }
    }

    fn relative(a: f64, b: f64) -> f64 {
        (a - b).abs() / b.abs().max(1e-30)
    }

    /// Three sequences of 12 tokens split over 1, 2, 3 and 4 simulated
    /// ranks: each rank's slice statistics, summed as the group's
    /// all-reduce sums them, give the whole sequences' loss, and each
    /// rank's score gradients, averaged over the ranks as training averages
    /// them, are the whole sequences' gradient at its tokens. Without the
    /// sum (each rank on its slice alone) both are wrong.
    #[test]
    fn slice_statistics_summed_over_ranks_give_the_whole_sequences_loss_and_gradient() {
        let (seq_len, sequences, alpha) = (12, 3, 0.01);
        let whole = routing(seq_len * sequences, 5);
        let want_loss = f64::from(sequence_balance_loss(&whole, seq_len, alpha));
        let mut want_grad = vec![0f32; whole.scores.len()];
        sequence_balance_loss_backward(&mut want_grad, &whole, seq_len, alpha);
        for parts in [1, 2, 3, 4] {
            let slices: Vec<Routing<f32>> = (0..parts)
                .map(|r| slice(&whole, seq_len, parts, r))
                .collect();
            let local: Vec<SequenceRoutingSums> = slices
                .iter()
                .map(|s| SequenceRoutingSums::of(s, seq_len / parts))
                .collect();
            let mut summed = local[0].clone();
            for other in &local[1..] {
                for (v, &o) in summed.values_mut().iter_mut().zip(&other.values) {
                    *v += o;
                }
            }
            let (mut worst_loss, mut worst_grad) = (0f64, 0f64);
            for (r, part) in slices.iter().enumerate() {
                let loss = SlicedBalanceLoss::new(&summed, seq_len, parts, alpha);
                worst_loss = worst_loss.max(relative(loss.loss, want_loss));
                let mut grad = vec![0f32; part.scores.len()];
                loss.add_score_gradient(&mut grad, part);
                let want = slice(
                    &Routing {
                        scores: want_grad.clone(),
                        ..whole.clone()
                    },
                    seq_len,
                    parts,
                    r,
                )
                .scores;
                for (&g, &w) in grad.iter().zip(&want) {
                    let averaged = f64::from(g) / parts as f64;
                    worst_grad = worst_grad.max((averaged - f64::from(w)).abs());
                }
            }
            let scale = want_grad.iter().fold(0f32, |m, g| m.max(g.abs()));
            eprintln!(
                "{parts} ranks: loss off by {worst_loss:.1e} relative, gradient by {worst_grad:.1e} (largest {scale:.1e})"
            );
            assert!(
                worst_loss < 1e-6,
                "{parts} ranks: loss off by {worst_loss:e}"
            );
            assert!(
                worst_grad <= 1e-6 * f64::from(scale),
                "{parts} ranks: gradient off by {worst_grad:e} (largest {scale:e})"
            );
            if parts > 1 {
                let alone = SlicedBalanceLoss::new(&local[0], seq_len, parts, alpha);
                assert!(
                    relative(alone.loss, want_loss) > 1e-2,
                    "{parts} ranks: a slice's own statistics should not give the whole loss"
                );
            }
        }
    }

    /// The whole sequence's statistics reproduce the single-rank loss.
    #[test]
    fn whole_sequence_statistics_give_the_single_rank_loss() {
        let whole = routing(16, 9);
        for seq_len in [4, 8, 16] {
            let sums = SequenceRoutingSums::of(&whole, seq_len);
            let want = f64::from(sequence_balance_loss(&whole, seq_len, 0.3));
            assert!(relative(sums.loss(seq_len, 0.3), want) < 1e-6, "{seq_len}");
        }
    }
}
