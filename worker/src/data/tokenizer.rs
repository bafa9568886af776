//! The byte-level tokenizer: every byte is its own token, so any file is
//! valid input and the vocabulary is exactly 256.

/// Distinct tokens the tokenizer produces.
pub const VOCAB: usize = 256;

pub fn encode(bytes: &[u8]) -> Vec<u32> {
    bytes.iter().map(|&b| u32::from(b)).collect()
}

/// The bytes back; ids above 255 (a larger model vocabulary) become `None`.
pub fn decode(tokens: &[u32]) -> Option<Vec<u8>> {
    tokens.iter().map(|&t| u8::try_from(t).ok()).collect()
}

/// How often each id occurs in a stream of tokens (any ids, not only the
/// byte tokenizer's: pre-tokenized data too).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenCounts {
    /// `counts[id]`; at least [`VOCAB`] long.
    counts: Vec<usize>,
}

impl TokenCounts {
    pub fn of(tokens: impl IntoIterator<Item = u32>) -> Self {
        let mut counts = vec![0usize; VOCAB];
        for t in tokens {
            let t = t as usize;
            if t >= counts.len() {
                counts.resize(t + 1, 0);
            }
            counts[t] += 1;
        }
        Self { counts }
    }

    pub fn total(&self) -> usize {
        self.counts.iter().sum()
    }

    /// The largest id that occurs.
    pub fn max_id(&self) -> Option<u32> {
        self.counts.iter().rposition(|&c| c > 0).map(|id| id as u32)
    }

    /// Entropy of the token frequencies, in nats: the loss of the best model
    /// that ignores context, so a trained model must end below it to have
    /// learned anything beyond frequencies. Divide by `ln 2` for bits.
    pub fn unigram_entropy(&self) -> f64 {
        let total = self.total() as f64;
        self.counts
            .iter()
            .filter(|&&c| c > 0)
            .map(|&c| {
                let p = c as f64 / total;
                -p * p.ln()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_byte() {
        let bytes: Vec<u8> = (0..=255).collect();
        let tokens = encode(&bytes);
        assert_eq!(tokens[200], 200);
        assert_eq!(decode(&tokens), Some(bytes));
        assert_eq!(decode(&[256]), None);
    }

    #[test]
    fn entropy_of_known_distributions() {
        assert_eq!(TokenCounts::of([7, 7, 7]).unigram_entropy(), 0.0);
        // Four equally frequent tokens: ln 4 nats, 2 bits.
        let h = TokenCounts::of([1, 2, 3, 4, 4, 3, 2, 1]).unigram_entropy();
        assert!((h - 4f64.ln()).abs() < 1e-12);
        assert!((h / std::f64::consts::LN_2 - 2.0).abs() < 1e-12);
        // Ids past the bytes' 256 count too.
        let h = TokenCounts::of([50000, 70000, 50000, 70000]).unigram_entropy();
        assert!((h - 2f64.ln()).abs() < 1e-12);
        assert_eq!(TokenCounts::of([]).unigram_entropy(), 0.0);
        let counts = TokenCounts::of([3, 70000, 3]);
        assert_eq!((counts.max_id(), counts.total()), (Some(70000), 3));
        assert_eq!(TokenCounts::of([]).max_id(), None);
    }
}
