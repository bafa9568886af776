//! Expert load balancing: DeepSeek-V3's auxiliary-loss-free selection bias,
//! its optional sequence-wise balance loss (over whole sequences, or over
//! slices of them whose statistics a sequence-parallel group sums), and the
//! imbalance metric.

use crate::memory::HeldBytes;
use crate::moe::routing::Routing;
use crate::moe::sequences::Sequences;
use crate::scalar::Scalar;
use std::ops::Range;

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

/// DeepSeek-V3's sequence-wise balance loss, averaged over `sequences`:
///
/// `L = alpha * sum_i f_i P_i`, with `f_i = N / (K T) * #{t : i selected for t}`
/// and `P_i = mean_t s'_{i,t}`, where `s'_{i,t} = s_{i,t} / sum_j s_{j,t}`
/// (`N` experts, `K` = top-k, `T` the sequence's real tokens: its padding
/// counts in neither). `f` counts the biased selection and is treated as a
/// constant; the gradient flows through `P`.
pub fn sequence_balance_loss<T: Scalar>(
    routing: &Routing<T>,
    sequences: &Sequences,
    alpha: f64,
) -> T {
    let mut loss = 0.0;
    let n_experts = routing.n_experts;
    for_each_sequence(routing, sequences, |range, fractions| {
        let (real, rows) = (range.len(), range.start * n_experts..range.end * n_experts);
        let mut sum = 0.0;
        for row in routing.scores[rows].chunks_exact(n_experts) {
            let total: T = row.iter().copied().sum();
            sum += row
                .iter()
                .zip(fractions)
                .map(|(&s, &f)| f * (s / total).to_f64())
                .sum::<f64>();
        }
        loss += sum / real as f64;
    });
    T::from_f64(alpha * loss / sequences.count() as f64)
}

/// Adds the gradient of [`sequence_balance_loss`] with respect to the scores into `dscores`.
///
/// `dL/ds'_{i,t} = alpha f_i / (T B)` for `B` sequences (nothing for
/// padding); through the normalisation
/// `ds_{i,t} = (ds'_{i,t} - sum_j ds'_{j,t} s'_{j,t}) / sum_j s_{j,t}`.
pub fn sequence_balance_loss_backward<T: Scalar>(
    dscores: &mut [T],
    routing: &Routing<T>,
    sequences: &Sequences,
    alpha: f64,
) {
    assert_eq!(
        dscores.len(),
        routing.scores.len(),
        "router score gradient shape"
    );
    let n_experts = routing.n_experts;
    let count = sequences.count() as f64;
    for_each_sequence(routing, sequences, |range, fractions| {
        let per_token = alpha / (range.len() as f64 * count);
        let rows = range.start * n_experts..range.end * n_experts;
        let scores = &routing.scores[rows.clone()];
        add_sequence_score_gradient(&mut dscores[rows], scores, fractions, per_token);
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
/// (its slice under sequence parallelism, the whole sequence without):
/// per expert, how many of the real ones selected it and the sum of their
/// normalised scores `s'`, and how many are real. Statistics of disjoint
/// slices of a sequence add up to the whole sequence's, so a
/// sequence-parallel group sums them ([`Self::values_mut`], an all-reduce)
/// and every rank then holds the whole sequences' `f_i`, `P_i` and `T`.
#[derive(Clone, Debug, PartialEq)]
pub struct SequenceRoutingSums {
    n_experts: usize,
    top_k: usize,
    /// Per sequence, `n_experts` selection counts, `n_experts` score sums,
    /// then the real tokens. f32, the collectives' type: counts stay exact
    /// below 2^24.
    values: Vec<f32>,
}

impl SequenceRoutingSums {
    /// The statistics of `routing`'s tokens, laid out as `slices` says.
    pub fn of<T: Scalar>(routing: &Routing<T>, slices: &Sequences) -> Self {
        let (n_experts, top_k) = (routing.n_experts, routing.top_k);
        assert_eq!(
            routing.tokens(),
            slices.tokens(),
            "tokens must split into whole slices of sequences"
        );
        let mut values = Vec::with_capacity(slices.count() * (2 * n_experts + 1));
        let mut score_sums = vec![0.0; n_experts];
        for range in slices.real_ranges() {
            let counts_start = values.len();
            values.resize(counts_start + n_experts, 0.0);
            for &e in &routing.experts[range.start * top_k..range.end * top_k] {
                values[counts_start + e] += 1.0;
            }
            score_sums.fill(0.0);
            let scores = &routing.scores[range.start * n_experts..range.end * n_experts];
            for row in scores.chunks_exact(n_experts) {
                let sum: T = row.iter().copied().sum();
                for (total, &s) in score_sums.iter_mut().zip(row) {
                    *total += (s / sum).to_f64();
                }
            }
            values.extend(score_sums.iter().map(|&s| s as f32));
            values.push(range.len() as f32);
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
        self.values.len() / (2 * self.n_experts + 1)
    }

    /// Each sequence's `(selection counts, score sums, real tokens)`.
    fn per_sequence(&self) -> impl Iterator<Item = (&[f32], &[f32], f32)> {
        self.values.chunks_exact(2 * self.n_experts + 1).map(|v| {
            let (counts, rest) = v.split_at(self.n_experts);
            (counts, &rest[..self.n_experts], rest[self.n_experts])
        })
    }

    /// Each sequence's `f_i = N / (K T) · count_i`, `[sequences, n_experts]`
    /// (zeros for a sequence without real tokens): the statistics must be
    /// the whole sequences'.
    pub fn fractions(&self) -> Vec<f64> {
        let n = self.n_experts as f64;
        let top_k = self.top_k as f64;
        self.per_sequence()
            .flat_map(|(counts, _, real)| {
                let scale = if real > 0.0 {
                    n / (top_k * f64::from(real))
                } else {
                    0.0
                };
                counts.iter().map(move |&c| scale * f64::from(c))
            })
            .collect()
    }

    /// [`sequence_balance_loss`] from the whole sequences' statistics:
    /// `alpha · sum_i f_i P_i` with `P_i = score_sum_i / T`, averaged over
    /// the sequences.
    pub fn loss(&self, alpha: f64) -> f64 {
        let fractions = self.fractions();
        let sum: f64 = self
            .per_sequence()
            .zip(fractions.chunks_exact(self.n_experts))
            .filter(|((_, _, real), _)| *real > 0.0)
            .map(|((_, score_sums, real), f)| {
                let weighted: f64 = f
                    .iter()
                    .zip(score_sums)
                    .map(|(&f, &s)| f * f64::from(s))
                    .sum();
                weighted / f64::from(real)
            })
            .sum();
        alpha * sum / self.sequences() as f64
    }

    /// Each sequence's real tokens.
    fn real(&self) -> impl Iterator<Item = f64> + '_ {
        self.per_sequence().map(|(_, _, real)| f64::from(real))
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
    /// `dL/ds'_{i,t} / f_i` for this rank's tokens of each sequence, see [`Self::new`].
    per_token: Vec<f64>,
}

impl HeldBytes for SlicedBalanceLoss {
    fn held_bytes(&self) -> usize {
        self.fractions.held_bytes() + self.per_token.held_bytes()
    }
}

impl SlicedBalanceLoss {
    /// From `whole`, the statistics summed over the `parts` ranks holding
    /// a slice of each sequence each.
    ///
    /// Every rank reports the whole loss `L`, so the ranks' mean is `L`.
    /// Their gradients are averaged too, though, and each rank only
    /// back-propagates through its own tokens, so each takes
    /// `parts · dL/ds'` for them: `parts · alpha f_i / (T B)`.
    pub fn new(whole: &SequenceRoutingSums, parts: usize, alpha: f64) -> Self {
        assert!(parts > 0, "a group of no ranks");
        let count = whole.sequences() as f64;
        let per_token = whole
            .real()
            .map(|real| {
                if real > 0.0 {
                    parts as f64 * alpha / (real * count)
                } else {
                    0.0
                }
            })
            .collect();
        Self {
            loss: whole.loss(alpha),
            fractions: whole.fractions(),
            per_token,
        }
    }

    /// Adds this rank's share of the loss's gradient with respect to its
    /// tokens' scores (`routing`, laid out as `slices`) into `dscores`.
    pub fn add_score_gradient<T: Scalar>(
        &self,
        dscores: &mut [T],
        routing: &Routing<T>,
        slices: &Sequences,
    ) {
        let n_experts = routing.n_experts;
        assert_eq!(
            dscores.len(),
            routing.scores.len(),
            "router score gradient shape"
        );
        assert!(
            routing.tokens() == slices.tokens() && slices.count() == self.per_token.len(),
            "the slices the statistics were taken over"
        );
        let sequences = slices
            .real_ranges()
            .zip(self.fractions.chunks_exact(n_experts))
            .zip(&self.per_token);
        for ((range, fractions), &per_token) in sequences {
            let rows = range.start * n_experts..range.end * n_experts;
            add_sequence_score_gradient(
                &mut dscores[rows.clone()],
                &routing.scores[rows],
                fractions,
                per_token,
            );
        }
    }
}

/// Calls `visit(tokens, f)` per sequence with real tokens, with the range
/// of its `T` real tokens and each expert's `f_i` (its selection count
/// among them scaled by `N / (K T)`).
fn for_each_sequence<T: Scalar>(
    routing: &Routing<T>,
    sequences: &Sequences,
    mut visit: impl FnMut(Range<usize>, &[f64]),
) {
    let (n_experts, top_k) = (routing.n_experts, routing.top_k);
    assert_eq!(
        routing.tokens(),
        sequences.tokens(),
        "tokens must split into whole sequences"
    );
    let mut fractions = vec![0.0; n_experts];
    for range in sequences.real_ranges().filter(|r| !r.is_empty()) {
        let scale = n_experts as f64 / (top_k * range.len()) as f64;
        fractions.fill(0.0);
        for &e in &routing.experts[range.start * top_k..range.end * top_k] {
            fractions[e] += scale;
        }
        visit(range, &fractions);
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

    /// The tokens `range` of `whole`: a routing of its own.
    fn rows(whole: &Routing<f32>, range: std::ops::Range<usize>) -> Routing<f32> {
        Routing {
            scores: whole.scores[range.start * N_EXPERTS..range.end * N_EXPERTS].to_vec(),
            experts: whole.experts[range.start * TOP_K..range.end * TOP_K].to_vec(),
            gates: whole.gates[range.start * TOP_K..range.end * TOP_K].to_vec(),
            ..whole.clone()
        }
    }

    /// Padded sequences' loss and gradient are those of their real tokens
    /// alone: each sequence's real rows, taken as one unpadded sequence,
    /// the losses averaged over the sequences. The padding gets no
    /// gradient, and moving its routing changes nothing.
    #[test]
    fn padding_counts_in_neither_the_loss_nor_its_gradient() {
        let (seq_len, alpha) = (12, 0.01);
        let real = vec![12, 7, 1, 5];
        let sequences = Sequences::padded(seq_len, real.clone());
        let mut padded = routing(seq_len * real.len(), 3);
        let loss = f64::from(sequence_balance_loss(&padded, &sequences, alpha));
        let mut grad = vec![0f32; padded.scores.len()];
        sequence_balance_loss_backward(&mut grad, &padded, &sequences, alpha);

        let mut want_loss = 0.0;
        for (s, range) in sequences.real_ranges().enumerate() {
            let alone = rows(&padded, range.clone());
            let one = Sequences::whole(range.len(), range.len());
            want_loss += f64::from(sequence_balance_loss(&alone, &one, alpha)) / real.len() as f64;
            let mut want = vec![0f32; alone.scores.len()];
            sequence_balance_loss_backward(&mut want, &alone, &one, alpha / real.len() as f64);
            let got = &grad[range.start * N_EXPERTS..range.end * N_EXPERTS];
            for (&g, &w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-6 * w.abs().max(1e-3),
                    "sequence {s}: {g} vs {w}"
                );
            }
            let padding = range.end * N_EXPERTS..(s + 1) * seq_len * N_EXPERTS;
            assert!(
                grad[padding].iter().all(|&g| g == 0.0),
                "sequence {s}'s padding"
            );
        }
        assert!(relative(loss, want_loss) < 1e-6, "{loss} vs {want_loss}");

        // The padding's scores and choices are not read.
        for range in sequences.real_ranges() {
            let padding = range.end..range.start + seq_len;
            padded.experts[padding.start * TOP_K..padding.end * TOP_K].fill(0);
            padded.scores[padding.start * N_EXPERTS..padding.end * N_EXPERTS].fill(0.9);
        }
        let moved = f64::from(sequence_balance_loss(&padded, &sequences, alpha));
        assert_eq!(moved.to_bits(), loss.to_bits());
        // Counted as whole sequences, the same routing gives another loss.
        let unmasked = f64::from(sequence_balance_loss(
            &padded,
            &Sequences::whole(padded.tokens(), seq_len),
            alpha,
        ));
        assert!(relative(unmasked, loss) > 1e-2, "{unmasked} vs {loss}");
    }

    /// Three sequences of 12 tokens split over 1, 2, 3 and 4 simulated
    /// ranks, whole and padded: each rank's slice statistics, summed as the
    /// group's all-reduce sums them, give the whole sequences' loss, and
    /// each rank's score gradients, averaged over the ranks as training
    /// averages them, are the whole sequences' gradient at its tokens.
    /// Without the sum (each rank on its slice alone) both are wrong.
    #[test]
    fn slice_statistics_summed_over_ranks_give_the_whole_sequences_loss_and_gradient() {
        let (seq_len, alpha) = (12, 0.01);
        for real in [vec![12, 12, 12], vec![12, 5, 9]] {
            let sequences = Sequences::padded(seq_len, real.clone());
            let whole = routing(sequences.tokens(), 5);
            let want_loss = f64::from(sequence_balance_loss(&whole, &sequences, alpha));
            let mut want_grad = vec![0f32; whole.scores.len()];
            sequence_balance_loss_backward(&mut want_grad, &whole, &sequences, alpha);
            for parts in [1, 2, 3, 4] {
                let l = seq_len / parts;
                let layouts: Vec<Sequences> = (0..parts)
                    .map(|r| sequences.slice(r * l..(r + 1) * l))
                    .collect();
                let slices: Vec<Routing<f32>> = (0..parts)
                    .map(|r| slice(&whole, seq_len, parts, r))
                    .collect();
                let local: Vec<SequenceRoutingSums> = slices
                    .iter()
                    .zip(&layouts)
                    .map(|(s, layout)| SequenceRoutingSums::of(s, layout))
                    .collect();
                let mut summed = local[0].clone();
                for other in &local[1..] {
                    for (v, &o) in summed.values_mut().iter_mut().zip(&other.values) {
                        *v += o;
                    }
                }
                let (mut worst_loss, mut worst_grad) = (0f64, 0f64);
                for (r, part) in slices.iter().enumerate() {
                    let loss = SlicedBalanceLoss::new(&summed, parts, alpha);
                    worst_loss = worst_loss.max(relative(loss.loss, want_loss));
                    let mut grad = vec![0f32; part.scores.len()];
                    loss.add_score_gradient(&mut grad, part, &layouts[r]);
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
                    "{real:?}, {parts} ranks: loss off by {worst_loss:.1e} relative, gradient by {worst_grad:.1e} (largest {scale:.1e})"
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
                    let alone = SlicedBalanceLoss::new(&local[0], parts, alpha);
                    assert!(
                        relative(alone.loss, want_loss) > 1e-2,
                        "{parts} ranks: a slice's own statistics should not give the whole loss"
                    );
                }
            }
        }
    }

    /// The whole sequence's statistics reproduce the single-rank loss.
    #[test]
    fn whole_sequence_statistics_give_the_single_rank_loss() {
        let whole = routing(16, 9);
        for sequences in [
            Sequences::whole(16, 4),
            Sequences::whole(16, 8),
            Sequences::whole(16, 16),
            Sequences::padded(8, vec![3, 8]),
        ] {
            let sums = SequenceRoutingSums::of(&whole, &sequences);
            let want = f64::from(sequence_balance_loss(&whole, &sequences, 0.3));
            assert!(relative(sums.loss(0.3), want) < 1e-6, "{sequences:?}");
        }
    }
}
