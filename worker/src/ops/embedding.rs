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

/// Adds `dout[t, :]` into `dtable[tokens[t], :]`; repeated tokens accumulate.
pub fn backward<T: Scalar>(dtable: &mut [T], dout: &[T], tokens: &[u32], dim: usize) {
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
}
