//! Softmax cross-entropy over a vocabulary, fused as in llm.c: the backward
//! of `-ln softmax(z)[target]` is simply `softmax(z) - onehot(target)`, which
//! is both cheaper and better conditioned than chaining the two backwards.

use crate::ops::softmax;
use crate::scalar::Scalar;

/// A target the loss leaves out: a prompt's token in supervised
/// fine-tuning, which the model reads but is not trained to produce.
pub const IGNORED: u32 = u32::MAX;

/// How the trained targets of one forward pass weigh in the loss it
/// reports and differentiates.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum LossScale {
    /// The mean over this pass's own trained targets.
    #[default]
    PassMean,
    /// Each trained target weighs this much: a trainer's share of the
    /// mean over a whole step's batch ([`LossScale::step_share`]).
    PerTarget(f64),
}

impl LossScale {
    /// The scale that makes a step's loss the mean over every trained
    /// target of its global batch, whatever the micro-batches, data- and
    /// sequence-parallel ranks it is split into: `trained` of them in the
    /// whole step, over `ranks` ranks whose gradients are averaged, each
    /// running `micro_steps` passes whose gradients are averaged. So a
    /// pass of few assistant tokens (supervised fine-tuning) weighs less
    /// than one of many, as in the whole batch's mean, not as much (a
    /// mean of means over-weighs short answers). With every target
    /// trained and equal passes it is each pass's own mean.
    pub fn step_share(trained: usize, ranks: usize, micro_steps: usize) -> Self {
        Self::PerTarget(if trained == 0 {
            0.0
        } else {
            (ranks * micro_steps) as f64 / trained as f64
        })
    }
}

/// The positions with a target (not [`IGNORED`]).
pub fn trained_targets(targets: &[u32]) -> usize {
    targets.iter().filter(|&&t| t != IGNORED).count()
}

/// Each position's weight in the loss — the mean's `1 / (positions with a
/// target)` or `scale`'s, 0 where the target is [`IGNORED`] (all 0 when
/// every one is) — and the targets with the ignored ones replaced by 0, a
/// valid id whose weight 0 keeps it out of the loss and its gradient.
pub fn target_weights(targets: &[u32], scale: LossScale) -> (Vec<f64>, Vec<u32>) {
    let share = match scale {
        LossScale::PerTarget(share) => share,
        LossScale::PassMean => match trained_targets(targets) {
            0 => 0.0,
            counted => 1.0 / counted as f64,
        },
    };
    targets
        .iter()
        .map(|&t| if t == IGNORED { (0.0, 0) } else { (share, t) })
        .unzip()
}

/// For each row of `logits: [rows, vocab]`: `probs[r, :] = softmax(logits[r, :])`
/// and `losses[r] = -ln probs[r, targets[r]]`. Targets must be below `vocab`.
pub fn forward<T: Scalar>(
    losses: &mut [T],
    probs: &mut [T],
    logits: &[T],
    targets: &[u32],
    vocab: usize,
) {
    assert_eq!(losses.len(), targets.len(), "cross-entropy loss shape");
    assert_eq!(
        logits.len(),
        targets.len() * vocab,
        "cross-entropy logits shape"
    );
    softmax::forward(probs, logits, vocab);
    for ((loss, p_row), &target) in losses
        .iter_mut()
        .zip(probs.chunks_exact(vocab))
        .zip(targets)
    {
        *loss = -p_row[target as usize].ln();
    }
}

/// Adds `dlosses[r] * (probs[r, :] - onehot(targets[r]))` into `dlogits`.
/// For a mean over rows, pass `dlosses[r] = 1 / rows`.
pub fn backward<T: Scalar>(
    dlogits: &mut [T],
    dlosses: &[T],
    probs: &[T],
    targets: &[u32],
    vocab: usize,
) {
    assert_eq!(
        dlosses.len(),
        targets.len(),
        "cross-entropy loss gradient shape"
    );
    assert_eq!(
        probs.len(),
        targets.len() * vocab,
        "cross-entropy probs shape"
    );
    assert_eq!(
        dlogits.len(),
        probs.len(),
        "cross-entropy logits gradient shape"
    );
    let rows = dlogits
        .chunks_exact_mut(vocab)
        .zip(probs.chunks_exact(vocab));
    for (((dz_row, p_row), &dloss), &target) in rows.zip(dlosses).zip(targets) {
        for (dz, &p) in dz_row.iter_mut().zip(p_row) {
            *dz += dloss * p;
        }
        dz_row[target as usize] -= dloss;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_gradient, random};
    use crate::rng::SplitMix64;

    #[test]
    fn ignored_targets_take_no_share_of_the_mean() {
        let (weights, targets) = target_weights(&[3, IGNORED, 5, IGNORED], LossScale::PassMean);
        assert_eq!(weights, [0.5, 0.0, 0.5, 0.0]);
        assert_eq!(targets, [3, 0, 5, 0]);
        let (weights, _) = target_weights(&[IGNORED; 3], LossScale::PassMean);
        assert_eq!(weights, [0.0; 3]);
        let (weights, _) = target_weights(&[IGNORED, 1, 2], LossScale::PerTarget(0.25));
        assert_eq!(weights, [0.0, 0.25, 0.25]);
    }

    #[test]
    fn a_steps_share_weighs_every_trained_target_of_its_batch_alike() {
        // Two ranks of two micro-batches each, 1 + 3 + 0 + 4 trained targets.
        let passes: [&[u32]; 4] = [
            &[IGNORED, 7, IGNORED, IGNORED],
            &[1, 2, 3, IGNORED],
            &[IGNORED; 4],
            &[4, 5, 6, 7],
        ];
        let trained: usize = passes.iter().map(|p| trained_targets(p)).sum();
        assert_eq!(trained, 8);
        let scale = LossScale::step_share(trained, 2, 2);
        // The trainers average over ranks and micro-batches: each target
        // then weighs 1/8, as in the whole batch's mean.
        let weight_of_each: Vec<f64> = passes
            .iter()
            .flat_map(|p| target_weights(p, scale).0)
            .filter(|&w| w != 0.0)
            .map(|w| w / 4.0)
            .collect();
        assert_eq!(weight_of_each, [0.125; 8]);
        // Every target trained, equal passes: each pass's own mean.
        let full = [1u32, 2, 3, 4];
        assert_eq!(
            target_weights(&full, LossScale::step_share(16, 2, 2)),
            target_weights(&full, LossScale::PassMean)
        );
        assert_eq!(LossScale::step_share(0, 2, 2), LossScale::PerTarget(0.0));
    }

    #[test]
    fn uniform_logits_give_ln_vocab() {
        let (mut losses, mut probs) = ([0.0f64; 2], [0.0; 8]);
        forward(&mut losses, &mut probs, &[0.5; 8], &[0, 3], 4);
        for loss in losses {
            assert!((loss - 4f64.ln()).abs() < 1e-15);
        }
    }

    #[test]
    fn backward_matches_finite_differences_of_the_mean_loss() {
        let (rows, vocab) = (5, 7);
        let logits = random(rows * vocab, 41);
        let mut rng = SplitMix64::new(42);
        let targets: Vec<u32> = (0..rows).map(|_| rng.below(vocab) as u32).collect();
        let mean_loss = |z: &[f64]| {
            let (mut losses, mut probs) = (vec![0.0; rows], vec![0.0; z.len()]);
            forward(&mut losses, &mut probs, z, &targets, vocab);
            losses.iter().sum::<f64>() / rows as f64
        };
        let (mut losses, mut probs) = (vec![0.0; rows], vec![0.0; logits.len()]);
        forward(&mut losses, &mut probs, &logits, &targets, vocab);
        let mut dlogits = vec![0.0; logits.len()];
        backward(
            &mut dlogits,
            &vec![1.0 / rows as f64; rows],
            &probs,
            &targets,
            vocab,
        );
        assert_gradient("dlogits", &dlogits, &logits, mean_loss);
    }
}
