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

/// Entropy of the token frequencies, in nats: the loss of the best model
/// that ignores context, so a trained model must end below it to have
/// learned anything beyond frequencies. Divide by `ln 2` for bits.
/// Any ids count, not only the byte tokenizer's (pre-tokenized data).
pub fn unigram_entropy(tokens: impl IntoIterator<Item = u32>) -> f64 {
    let mut counts = vec![0usize; VOCAB];
    for t in tokens {
        let t = t as usize;
        if t >= counts.len() {
            counts.resize(t + 1, 0);
        }
        counts[t] += 1;
    }
    let total = counts.iter().sum::<usize>() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total;
            -p * p.ln()
        })
        .sum()
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
        assert_eq!(unigram_entropy([7, 7, 7]), 0.0);
        // Four equally frequent tokens: ln 4 nats, 2 bits.
        let h = unigram_entropy([1, 2, 3, 4, 4, 3, 2, 1]);
        assert!((h - 4f64.ln()).abs() < 1e-12);
        assert!((h / std::f64::consts::LN_2 - 2.0).abs() < 1e-12);
        // Ids past the bytes' 256 count too.
        let h = unigram_entropy([50000, 70000, 50000, 70000]);
        assert!((h - 2f64.ln()).abs() < 1e-12);
        assert_eq!(unigram_entropy([]), 0.0);
    }
}
