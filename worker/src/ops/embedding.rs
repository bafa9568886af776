//! Token embedding lookup: row `tokens[t]` of `table: [vocab, dim]`.

use crate::scalar::Scalar;

/// `out[t, :] = table[tokens[t], :]`. Tokens must be below the table's row count.
pub fn forward<T: Scalar>(out: &mut [T], tokens: &[u32], table: &[T], dim: usize) {
    assert!(
        dim > 0 && table.len().is_multiple_of(dim),
        "embedding table shape"
    );
    assert_eq!(out.len(), tokens.len() * dim, "embedding output shape");
    for (out_row, &token) in out.chunks_exact_mut(dim).zip(tokens) {
        let start = token as usize * dim;
        out_row.copy_from_slice(&table[start..start + dim]);
    }
}

/// Adds `dout[t, :]` into `dtable[tokens[t], :]`; repeated tokens
/// accumulate. An empty `dtable` (a frozen table's) takes nothing.
pub fn backward<T: Scalar>(dtable: &mut [T], dout: &[T], tokens: &[u32], dim: usize) {
    if dtable.is_empty() {
        return;
    }
    assert!(
        dim > 0 && dtable.len().is_multiple_of(dim),
        "embedding table gradient shape"
    );
    assert_eq!(
        dout.len(),
        tokens.len() * dim,
        "embedding output gradient shape"
    );
    for (dout_row, &token) in dout.chunks_exact(dim).zip(tokens) {
        let start = token as usize * dim;
        for (d, &g) in dtable[start..start + dim].iter_mut().zip(dout_row) {
            *d += g;
        }
    }
}

/// A batch's token positions grouped by id, for a backward pass that gives
/// each distinct id its own threads (`cuda::embedding::backward`): group `g`
/// is id `ids[g]`, at positions `order[starts[g]..starts[g + 1]]`, in token
/// order. Groups come in ascending id order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenGroups {
    /// Positions `0..n`, stably sorted by token id.
    pub order: Vec<u32>,
    /// Where each group starts in `order`, then `order.len()`.
    pub starts: Vec<u32>,
    /// Each group's token id, ascending.
    pub ids: Vec<u32>,
}

impl TokenGroups {
    /// Groups `tokens` (at most `u32::MAX` of them) by id, each id's
    /// positions in their original order.
    pub fn new(tokens: &[u32]) -> Self {
        let n = u32::try_from(tokens.len()).expect("more than u32::MAX tokens");
        let mut order: Vec<u32> = (0..n).collect();
        // Stable: equal ids keep their token order, which the sums keep.
        order.sort_by_key(|&position| tokens[position as usize]);
        let (mut starts, mut ids) = (Vec::new(), Vec::new());
        for (k, &position) in order.iter().enumerate() {
            let id = tokens[position as usize];
            if ids.last() != Some(&id) {
                starts.push(k as u32);
                ids.push(id);
            }
        }
        starts.push(n);
        Self { order, starts, ids }
    }

    /// Distinct token ids.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// [`backward`] through `groups` (of `dout`'s tokens), one id at a time: the
/// device kernel's order of additions, the same as [`backward`]'s for each
/// row, so the two agree bit for bit.
pub fn backward_grouped<T: Scalar>(dtable: &mut [T], dout: &[T], groups: &TokenGroups, dim: usize) {
    assert!(
        dim > 0 && dtable.len().is_multiple_of(dim),
        "embedding table gradient shape"
    );
    assert_eq!(
        dout.len(),
        groups.order.len() * dim,
        "embedding output gradient shape"
    );
    for (g, &id) in groups.ids.iter().enumerate() {
        let positions = &groups.order[groups.starts[g] as usize..groups.starts[g + 1] as usize];
        let row = &mut dtable[id as usize * dim..(id as usize + 1) * dim];
        for (col, d) in row.iter_mut().enumerate() {
            let mut sum = *d;
            for &position in positions {
                sum += dout[position as usize * dim + col];
            }
            *d = sum;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_gradient, random};

    #[test]
    fn forward_copies_rows() {
        let table = [0.0, 1.0, 10.0, 11.0, 20.0, 21.0];
        let mut out = [0.0; 6];
        forward(&mut out, &[2, 0, 2], &table, 2);
        assert_eq!(out, [20.0, 21.0, 0.0, 1.0, 20.0, 21.0]);
    }

    #[test]
    fn backward_matches_finite_differences_with_repeated_tokens() {
        let (vocab, dim) = (4, 3);
        let tokens = [1, 3, 1, 0];
        let table = random(vocab * dim, 51);
        let dout = random(tokens.len() * dim, 52);
        let loss = |table: &[f64]| {
            let mut out = vec![0.0; dout.len()];
            forward(&mut out, &tokens, table, dim);
            out.iter().zip(&dout).map(|(a, b)| a * b).sum::<f64>()
        };
        let mut dtable = vec![0.0; table.len()];
        backward(&mut dtable, &dout, &tokens, dim);
        // Token 2 never occurs: its rows must stay exactly zero (the check below also covers it).
        assert!(dtable[6..9].iter().all(|&g| g == 0.0));
        assert_gradient("dtable", &dtable, &table, loss);
    }

    #[test]
    fn groups_keep_each_ids_positions_in_token_order() {
        let groups = TokenGroups::new(&[1, 5, 1, 255, 0, 5, 5, 1]);
        assert_eq!(groups.ids, [0, 1, 5, 255]);
        assert_eq!(groups.starts, [0, 1, 4, 7, 8]);
        assert_eq!(groups.order, [4, 0, 2, 7, 1, 5, 6, 3]);
    }

    #[test]
    fn groups_edge_cases() {
        let empty = TokenGroups::new(&[]);
        assert!(empty.is_empty());
        assert_eq!((empty.order.len(), empty.starts), (0, vec![0]));
        let one = TokenGroups::new(&[42]);
        assert_eq!(
            (one.order, one.starts, one.ids),
            (vec![0], vec![0, 1], vec![42])
        );
        let same = TokenGroups::new(&[3; 21]);
        assert_eq!(same.ids, [3]);
        assert_eq!(same.starts, [0, 21]);
        assert_eq!(same.order, (0..21).collect::<Vec<_>>());
        let distinct: Vec<u32> = (0..64).map(|i| (i * 37 + 11) % 256).collect();
        let groups = TokenGroups::new(&distinct);
        assert_eq!(groups.len(), 64);
        assert_eq!(groups.starts, (0..=64).collect::<Vec<_>>());
        assert!(groups.ids.windows(2).all(|w| w[0] < w[1]));
        for (&position, &id) in groups.order.iter().zip(&groups.ids) {
            assert_eq!(distinct[position as usize], id);
        }
    }

    /// The grouped order (the device kernel's) gives the per-token order's
    /// bits, including for ids repeated many times and rows never touched.
    #[test]
    fn grouped_backward_is_bit_identical_to_backward() {
        let (vocab, dim) = (300usize, 5);
        let mut cases: Vec<Vec<u32>> = vec![vec![], vec![7], vec![9; 37]];
        cases.push((0..100).map(|i| (i * 7 + 3) % vocab as u32).collect());
        // Skewed, as text is: a third of the tokens one id.
        cases.push(
            (0..1000u32)
                .map(|i| {
                    if i % 3 == 0 {
                        5
                    } else {
                        (i * 7919) % vocab as u32
                    }
                })
                .collect(),
        );
        for tokens in cases {
            let dout: Vec<f32> =
                crate::rng::SplitMix64::new(60).normal_vec(tokens.len() * dim, 1.0);
            let dtable0: Vec<f32> = crate::rng::SplitMix64::new(61).normal_vec(vocab * dim, 1.0);
            let mut expected = dtable0.clone();
            backward(&mut expected, &dout, &tokens, dim);
            let mut grouped = dtable0.clone();
            backward_grouped(&mut grouped, &dout, &TokenGroups::new(&tokens), dim);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&grouped), bits(&expected), "{} tokens", tokens.len());
        }
    }
}
