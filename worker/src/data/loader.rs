//! Training windows drawn at seeded random offsets.
//!
//! Each sequence starts at a uniformly random token, so every offset (not
//! just multiples of `seq_len`) is seen. The whole position in the stream
//! is the generator's state plus a count, which a checkpoint stores: a
//! resumed run draws exactly the windows the uninterrupted run would have.

use serde::{Deserialize, Serialize};

use crate::data::{Corpus, DataError};
use crate::rng::SplitMix64;

/// Mixed into the training seed so the data order is not the same stream
/// as the weight initialisation.
const DATA_STREAM: u64 = 0xDA7A_0D3E_5EED_0001;

/// Where the stream stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataPosition {
    /// Sequences drawn so far (for logs; the state alone determines the future).
    pub sequences: u64,
    /// The SplitMix64 state that draws the next offset.
    pub rng_state: u64,
}

/// `inputs[i]` is followed by `targets[i]` in the corpus; both `[sequences * seq_len]`.
/// A target the model is not trained to predict (a prompt's token, in
/// supervised fine-tuning) is [`crate::ops::cross_entropy::IGNORED`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
}

#[derive(Clone, Debug)]
pub struct DataLoader {
    tokens: Corpus,
    seq_len: usize,
    sequences: u64,
    rng: SplitMix64,
}

impl DataLoader {
    /// A stream over `tokens` from the start of `seed`'s order. `source`
    /// names the data in the error when it is shorter than one window.
    pub fn new(
        tokens: impl Into<Corpus>,
        seq_len: usize,
        seed: u64,
        source: &str,
    ) -> Result<Self, DataError> {
        let tokens = tokens.into();
        if tokens.len() <= seq_len {
            return Err(DataError::TooShort {
                source: source.to_owned(),
                tokens: tokens.len(),
                needed: seq_len + 1,
            });
        }
        Ok(Self {
            tokens,
            seq_len,
            sequences: 0,
            rng: SplitMix64::new(seed ^ DATA_STREAM),
        })
    }

    pub fn position(&self) -> DataPosition {
        DataPosition {
            sequences: self.sequences,
            rng_state: self.rng.state(),
        }
    }

    /// Continues from a saved position.
    pub fn restore(&mut self, position: DataPosition) {
        self.sequences = position.sequences;
        self.rng = SplitMix64::new(position.rng_state);
    }

    /// The next `sequences` windows.
    pub fn next_batch(&mut self, sequences: usize) -> Batch {
        let n = sequences * self.seq_len;
        let mut batch = Batch {
            inputs: Vec::with_capacity(n),
            targets: Vec::with_capacity(n),
        };
        // Starts in 0..len - seq_len, so the last target is in bounds.
        let starts = self.tokens.len() - self.seq_len;
        let mut window = Vec::with_capacity(self.seq_len + 1);
        for _ in 0..sequences {
            let start = self.rng.below(starts);
            window.clear();
            self.tokens
                .extend_window(start, self.seq_len + 1, &mut window);
            batch.inputs.extend_from_slice(&window[..self.seq_len]);
            batch
                .targets
                .extend(window[1..].iter().enumerate().map(|(i, &t)| {
                    if self.tokens.is_trained(start + 1 + i) {
                        t
                    } else {
                        crate::ops::cross_entropy::IGNORED
                    }
                }));
        }
        self.sequences += sequences as u64;
        batch
    }

    /// Advances past the next `sequences` windows without reading them:
    /// a data-parallel rank skips the windows of the other ranks' shards
    /// (see [`crate::train::Shard`]). Draws exactly what [`Self::next_batch`]
    /// would, so the position afterwards is the same.
    pub fn skip(&mut self, sequences: usize) {
        let starts = self.tokens.len() - self.seq_len;
        for _ in 0..sequences {
            self.rng.below(starts);
        }
        self.sequences += sequences as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_inputs_shifted_and_restore_replays_the_stream() {
        let tokens: Vec<u32> = (0..100).collect();
        let mut loader = DataLoader::new(tokens, 5, 3, "test").unwrap();
        let first = loader.next_batch(2);
        for (input, target) in first.inputs.iter().zip(&first.targets) {
            assert_eq!(input + 1, *target);
        }
        let saved = loader.position();
        assert_eq!(saved.sequences, 2);
        let next = loader.next_batch(4);
        loader.restore(saved);
        assert_eq!(loader.next_batch(4), next);
        assert_ne!(next.inputs[..5], first.inputs[..5]);
    }

    #[test]
    fn skipping_lands_where_reading_does() {
        let tokens: Vec<u32> = (0..100).collect();
        let mut read = DataLoader::new(tokens, 5, 3, "test").unwrap();
        let mut skipped = read.clone();
        read.next_batch(3);
        skipped.skip(3);
        assert_eq!(skipped.position(), read.position());
        assert_eq!(skipped.next_batch(2), read.next_batch(2));
    }

    #[test]
    fn targets_the_corpus_does_not_train_are_ignored() {
        let tokens: Vec<u32> = (0..100).collect();
        // Tokens 10..20 and 50..60 are trained (assistant turns).
        let trained = (0..100).map(|i| (10..20).contains(&i) || (50..60).contains(&i));
        let corpus = Corpus::with_trained(tokens, trained.collect());
        let mut loader = DataLoader::new(corpus, 5, 3, "test").unwrap();
        let batch = loader.next_batch(40);
        let mut seen = (0, 0);
        for (input, target) in batch.inputs.iter().zip(&batch.targets) {
            let next = input + 1;
            if (10..20).contains(&next) || (50..60).contains(&next) {
                assert_eq!(*target, next);
                seen.0 += 1;
            } else {
                assert_eq!(*target, crate::ops::cross_entropy::IGNORED);
                seen.1 += 1;
            }
        }
        assert!(seen.0 > 0 && seen.1 > 0, "{seen:?}");
    }

    #[test]
    fn too_short_corpus_is_an_error() {
        let error = DataLoader::new(vec![1, 2, 3], 3, 0, "corpus x").unwrap_err();
        assert!(
            error.to_string().contains("corpus x has 3 tokens"),
            "{error}"
        );
    }
}
