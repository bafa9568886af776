//! Rotary position embedding (Su et al., RoFormer, 2021), applied to queries
//! and keys so their dot product depends on the relative position only.
//!
//! Each head's vector is split into consecutive pairs `(2i, 2i + 1)` (the
//! RoFormer / original Llama layout), and pair `i` at position `p` is rotated
//! by `p * theta^(-2i / head_dim)`.

use std::ops::Range;

use crate::scalar::Scalar;

/// Cosines and sines per (position, pair), computed in `f64` once per shape.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeTable<T> {
    seq_len: usize,
    head_dim: usize,
    cos: Vec<T>,
    sin: Vec<T>,
}

impl<T: Scalar> RopeTable<T> {
    /// For positions `0..seq_len` and an even `head_dim` (`theta` is 10 000 in
    /// Llama 2, 500 000 in Llama 3).
    pub fn new(seq_len: usize, head_dim: usize, theta: f64) -> Self {
        assert!(
            head_dim > 0 && head_dim.is_multiple_of(2),
            "RoPE needs an even head_dim"
        );
        let pairs = head_dim / 2;
        let mut cos = Vec::with_capacity(seq_len * pairs);
        let mut sin = Vec::with_capacity(seq_len * pairs);
        for position in 0..seq_len {
            for i in 0..pairs {
                let angle = position as f64 * theta.powf(-2.0 * i as f64 / head_dim as f64);
                cos.push(T::from_f64(angle.cos()));
                sin.push(T::from_f64(angle.sin()));
            }
        }
        Self {
            seq_len,
            head_dim,
            cos,
            sin,
        }
    }

    /// For positions `0..seq_len` with pair `i` turning at `inv_freq[i]`
    /// radians per position, cosines and sines times `scale` (YaRN's
    /// attention factor, `serve/yarn.rs`: both queries and keys are rotated,
    /// so their dot products grow by `scale²`).
    pub fn from_frequencies(seq_len: usize, inv_freq: &[f64], scale: f64) -> Self {
        assert!(!inv_freq.is_empty(), "RoPE needs at least one pair");
        let mut cos = Vec::with_capacity(seq_len * inv_freq.len());
        let mut sin = Vec::with_capacity(seq_len * inv_freq.len());
        for position in 0..seq_len {
            for &f in inv_freq {
                let angle = position as f64 * f;
                cos.push(T::from_f64(angle.cos() * scale));
                sin.push(T::from_f64(angle.sin() * scale));
            }
        }
        Self {
            seq_len,
            head_dim: 2 * inv_freq.len(),
            cos,
            sin,
        }
    }

    /// Cosines, `[seq_len, head_dim / 2]` (what a device-side rotation uploads).
    pub fn cos(&self) -> &[T] {
        &self.cos
    }

    /// Sines, `[seq_len, head_dim / 2]`.
    pub fn sin(&self) -> &[T] {
        &self.sin
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Rotates `x: [tokens, heads, head_dim]` in place; token `t` is at
    /// position `t % seq_len` (the batch is whole sequences).
    pub fn forward(&self, x: &mut [T], heads: usize) {
        self.rotate(x, heads, 0..self.seq_len, T::ONE);
    }

    /// The backward pass, in place on the gradient: a rotation's Jacobian is
    /// the rotation itself, so its transpose rotates by the opposite angle.
    pub fn backward(&self, dx: &mut [T], heads: usize) {
        self.rotate(dx, heads, 0..self.seq_len, -T::ONE);
    }

    /// [`Self::forward`] on the same slice `positions` of every sequence
    /// (a sequence-parallel rank's tokens): token `t` is at position
    /// `positions.start + t % positions.len()`, its place in the whole
    /// sequence, so queries and keys of different ranks still see their
    /// true relative positions.
    pub fn forward_at(&self, x: &mut [T], heads: usize, positions: Range<usize>) {
        self.rotate(x, heads, positions, T::ONE);
    }

    /// The backward pass of [`Self::forward_at`].
    pub fn backward_at(&self, dx: &mut [T], heads: usize, positions: Range<usize>) {
        self.rotate(dx, heads, positions, -T::ONE);
    }

    /// Rotates `x: [tokens, heads, head_dim]` in place, token `t` at
    /// `positions[t]`: a packed sequence's tokens at their places in their
    /// own documents (each starts again at 0).
    pub fn forward_positions(&self, x: &mut [T], heads: usize, positions: &[u32]) {
        self.rotate_each(x, heads, positions, T::ONE);
    }

    /// The backward pass of [`Self::forward_positions`].
    pub fn backward_positions(&self, dx: &mut [T], heads: usize, positions: &[u32]) {
        self.rotate_each(dx, heads, positions, -T::ONE);
    }

    fn rotate_each(&self, x: &mut [T], heads: usize, positions: &[u32], direction: T) {
        assert_eq!(
            x.len(),
            positions.len() * heads * self.head_dim,
            "a RoPE position per token"
        );
        assert!(
            positions.iter().all(|&p| (p as usize) < self.seq_len),
            "RoPE positions beyond the table's {}",
            self.seq_len
        );
        self.rotate_tokens(x, heads, |t| positions[t] as usize, direction);
    }

    fn rotate(&self, x: &mut [T], heads: usize, positions: Range<usize>, direction: T) {
        let token_width = heads * self.head_dim;
        let span = positions.len();
        assert!(
            span > 0 && positions.end <= self.seq_len,
            "RoPE positions {positions:?} beyond the table's {}",
            self.seq_len
        );
        assert!(
            token_width > 0 && x.len().is_multiple_of(token_width * span),
            "RoPE input is not whole sequences of [heads, head_dim] tokens"
        );
        self.rotate_tokens(x, heads, |t| positions.start + t % span, direction);
    }

    /// Rotates each `[heads, head_dim]` token `t` of `x` by `position(t)`.
    fn rotate_tokens(
        &self,
        x: &mut [T],
        heads: usize,
        position: impl Fn(usize) -> usize,
        direction: T,
    ) {
        let pairs = self.head_dim / 2;
        let token_width = heads * self.head_dim;
        for (t, token) in x.chunks_exact_mut(token_width).enumerate() {
            let position = position(t);
            let angles = position * pairs..(position + 1) * pairs;
            let (cos, sin) = (&self.cos[angles.clone()], &self.sin[angles]);
            for head in token.chunks_exact_mut(self.head_dim) {
                for ((pair, &c), &s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
                    let s = direction * s;
                    let (a, b) = (pair[0], pair[1]);
                    pair[0] = a * c - b * s;
                    pair[1] = a * s + b * c;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_gradient, random};

    #[test]
    fn a_table_from_frequencies_is_the_plain_table_scaled() {
        let (seq_len, head_dim, theta) = (5, 6, 100.0f64);
        let plain = RopeTable::<f64>::new(seq_len, head_dim, theta);
        let inv_freq: Vec<f64> = (0..head_dim / 2)
            .map(|i| theta.powf(-2.0 * i as f64 / head_dim as f64))
            .collect();
        let scaled = RopeTable::<f64>::from_frequencies(seq_len, &inv_freq, 2.0);
        assert_eq!((scaled.seq_len(), scaled.cos().len()), (5, 15));
        for (a, b) in scaled
            .cos()
            .iter()
            .zip(plain.cos())
            .chain(scaled.sin().iter().zip(plain.sin()))
        {
            assert!((a - 2.0 * b).abs() < 1e-12);
        }
    }

    #[test]
    fn position_zero_is_identity_and_first_pair_turns_by_the_position() {
        let table = RopeTable::<f64>::new(3, 4, 10_000.0);
        // One sequence of three tokens, two heads of width 4: every head of a
        // token turns by that token's position.
        let mut x = [1.0, 0.0, 1.0, 0.0].repeat(6);
        table.forward(&mut x, 2);
        assert_eq!(x[..8], [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]);
        for head in x[16..].chunks_exact(4) {
            // Pair 0 has frequency 1: position 2 turns (1, 0) by 2 radians.
            assert_eq!(head[..2], [2f64.cos(), 2f64.sin()]);
            // Pair 1 has frequency 10000^(-1/2) = 0.01.
            assert!((head[2] - 0.02f64.cos()).abs() < 1e-15);
            assert!((head[3] - 0.02f64.sin()).abs() < 1e-15);
        }
    }

    #[test]
    fn relative_position_is_all_queries_and_keys_see() {
        // <R(p) q, R(p + d) k> is the same for every p.
        let table = RopeTable::<f64>::new(8, 6, 100.0);
        let (q, k) = (random(6, 61), random(6, 62));
        let at = |position: usize, v: &[f64]| {
            let mut seq = vec![0.0; 8 * 6];
            seq[position * 6..(position + 1) * 6].copy_from_slice(v);
            table.forward(&mut seq, 1);
            seq[position * 6..(position + 1) * 6].to_vec()
        };
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let reference = dot(&at(0, &q), &at(3, &k));
        for p in 1..5 {
            assert!((dot(&at(p, &q), &at(p + 3, &k)) - reference).abs() < 1e-12);
        }
    }

    /// A sequence-parallel rank's slice, rotated at its positions, is the
    /// whole sequence's rotation at those tokens; backward undoes it.
    #[test]
    fn a_slice_turns_by_its_positions_in_the_sequence() {
        let table = RopeTable::<f64>::new(8, 4, 10.0);
        // Two sequences of 8 tokens, 2 heads of width 4.
        let x = random(2 * 8 * 8, 65);
        let mut whole = x.clone();
        table.forward(&mut whole, 2);
        let slice = |v: &[f64]| -> Vec<f64> {
            v.chunks_exact(64)
                .flat_map(|sequence| sequence[5 * 8..7 * 8].to_vec())
                .collect()
        };
        let mut part = slice(&x);
        table.forward_at(&mut part, 2, 5..7);
        assert_eq!(part, slice(&whole));
        table.backward_at(&mut part, 2, 5..7);
        for (a, b) in part.iter().zip(slice(&x)) {
            assert!((a - b).abs() < 1e-12);
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        // Two sequences of 3 tokens, 2 heads of width 4.
        let table = RopeTable::<f64>::new(3, 4, 10.0);
        let x = random(2 * 3 * 2 * 4, 63);
        let dout = random(x.len(), 64);
        let loss = |x: &[f64]| {
            let mut y = x.to_vec();
            table.forward(&mut y, 2);
            y.iter().zip(&dout).map(|(a, b)| a * b).sum::<f64>()
        };
        let mut dx = dout.clone();
        table.backward(&mut dx, 2);
        assert_gradient("dx", &dx, &x, loss);
    }
}
