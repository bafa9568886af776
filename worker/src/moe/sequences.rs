//! How a pass's tokens split into sequences, and which of them are real.
//!
//! A fine-tuning sequence is one conversation from its start, padded at the
//! end when it is shorter than `model.seqLen` ([`crate::data::DataLoader`]).
//! The padding goes through every layer like any token (causal attention
//! keeps it out of every real position and its targets are ignored), but it
//! must not count where tokens are *counted*: the expert loads the
//! auxiliary-loss-free bias follows and the sequence-wise balance loss. A
//! short conversation's padding repeats one token, so every padding token
//! picks the same experts: counted, they would look overloaded and be pushed
//! away from every real token, and the balance loss would be taken over a
//! sequence that is mostly one repeated token.

use std::ops::Range;

/// A pass's tokens as sequences of [`Self::seq_len`] consecutive tokens
/// (under sequence parallelism: this rank's slice of each), of which the
/// first [`Self::real`] of each are real and the rest padding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sequences {
    seq_len: usize,
    real: Vec<usize>,
}

impl Sequences {
    /// `tokens` tokens in whole sequences of `seq_len`, none padded.
    pub fn whole(tokens: usize, seq_len: usize) -> Self {
        assert!(
            seq_len > 0 && tokens.is_multiple_of(seq_len),
            "tokens must split into whole sequences of seq_len"
        );
        Self {
            seq_len,
            real: vec![seq_len; tokens / seq_len],
        }
    }

    /// Sequences of `seq_len` tokens, the first `real[s]` of sequence `s`
    /// real and the rest padding.
    pub fn padded(seq_len: usize, real: Vec<usize>) -> Self {
        assert!(seq_len > 0, "sequences of no tokens");
        assert!(
            real.iter().all(|&r| r <= seq_len),
            "a sequence with more real tokens than its {seq_len}"
        );
        Self { seq_len, real }
    }

    /// Tokens of each sequence, padding included.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// How many sequences.
    pub fn count(&self) -> usize {
        self.real.len()
    }

    /// Every token, padding included.
    pub fn tokens(&self) -> usize {
        self.seq_len * self.real.len()
    }

    /// Each sequence's real tokens, from its start.
    pub fn real(&self) -> &[usize] {
        &self.real
    }

    /// [`Self::real`], taken.
    pub fn into_real(self) -> Vec<usize> {
        self.real
    }

    /// Whether any sequence has padding.
    pub fn is_padded(&self) -> bool {
        self.real.iter().any(|&r| r < self.seq_len)
    }

    /// Each sequence's real tokens as a range of token indices.
    pub fn real_ranges(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        let len = self.seq_len;
        self.real
            .iter()
            .enumerate()
            .map(move |(s, &r)| s * len..s * len + r)
    }

    /// The slice of each sequence at `positions` (a sequence-parallel
    /// rank's): its length, and how many of its tokens are real.
    pub fn slice(&self, positions: Range<usize>) -> Self {
        assert!(
            positions.start < positions.end && positions.end <= self.seq_len,
            "a slice {positions:?} within sequences of {}",
            self.seq_len
        );
        let real = self
            .real
            .iter()
            .map(|&r| r.clamp(positions.start, positions.end) - positions.start)
            .collect();
        Self {
            seq_len: positions.len(),
            real,
        }
    }

    /// Tokens routed to each of `n_experts` experts by the real tokens,
    /// from `experts: [tokens, top_k]`.
    pub fn real_load(&self, experts: &[usize], top_k: usize, n_experts: usize) -> Vec<usize> {
        assert_eq!(experts.len(), self.tokens() * top_k, "routing shape");
        let mut load = vec![0; n_experts];
        for range in self.real_ranges() {
            for &e in &experts[range.start * top_k..range.end * top_k] {
                load[e] += 1;
            }
        }
        load
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_hold_the_real_tokens_at_their_positions() {
        let sequences = Sequences::padded(8, vec![8, 5, 0, 3]);
        assert!(sequences.is_padded());
        assert!(!Sequences::whole(16, 8).is_padded());
        let slices: Vec<Sequences> = (0..4).map(|r| sequences.slice(r * 2..r * 2 + 2)).collect();
        let real: Vec<&[usize]> = slices.iter().map(Sequences::real).collect();
        assert_eq!(
            real,
            [
                &[2, 2, 0, 2][..],
                &[2, 2, 0, 1],
                &[2, 1, 0, 0],
                &[2, 0, 0, 0]
            ]
        );
        // The slices' real tokens add up to the whole sequences'.
        for (s, &want) in sequences.real().iter().enumerate() {
            assert_eq!(slices.iter().map(|x| x.real()[s]).sum::<usize>(), want);
        }
    }

    #[test]
    fn the_load_counts_only_real_tokens() {
        // Two sequences of 3 tokens, top-1; the second's last token is padding.
        let sequences = Sequences::padded(3, vec![3, 2]);
        let experts = [0, 1, 1, 2, 2, 2];
        assert_eq!(sequences.real_load(&experts, 1, 3), [1, 2, 2]);
        let whole = Sequences::whole(6, 3);
        assert_eq!(whole.real_load(&experts, 1, 3), [1, 2, 3]);
    }
}
