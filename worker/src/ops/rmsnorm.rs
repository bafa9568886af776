//! RMSNorm (Zhang and Sennrich, 2019): `y = x / rms(x) * g`, with
//! `rms(x) = sqrt(mean(x^2) + eps)`; no mean subtraction and no bias.

use crate::scalar::Scalar;

/// Normalises each `dim`-wide row of `x` into `out`, scaled by `weight: [dim]`.
/// Stores each row's `1 / rms` in `rstd: [rows]` for the backward pass.
pub fn forward<T: Scalar>(out: &mut [T], rstd: &mut [T], x: &[T], weight: &[T], eps: T) {
    let dim = weight.len();
    check_shapes(x, dim, rstd.len());
    assert_eq!(out.len(), x.len(), "rmsnorm output shape");
    let inv_dim = T::ONE / T::from_usize(dim);
    for ((out_row, x_row), r) in out
        .chunks_exact_mut(dim)
        .zip(x.chunks_exact(dim))
        .zip(rstd.iter_mut())
    {
        let mean_square = x_row.iter().map(|&v| v * v).sum::<T>() * inv_dim;
        *r = T::ONE / (mean_square + eps).sqrt();
        for ((o, &v), &g) in out_row.iter_mut().zip(x_row).zip(weight) {
            *o = v * *r * g;
        }
    }
}

/// Adds the input and weight gradients.
///
/// With `r = 1 / rms(x)` and `n = dim`: `dr/dx_j = -r^3 x_j / n`, so
/// `dx_j = r (g_j dy_j - x_j r^2 mean_i(g_i dy_i x_i))` and `dg_j = sum_rows dy_j x_j r`.
pub fn backward<T: Scalar>(
    dx: &mut [T],
    dweight: &mut [T],
    dout: &[T],
    x: &[T],
    weight: &[T],
    rstd: &[T],
) {
    let dim = weight.len();
    check_shapes(x, dim, rstd.len());
    assert_eq!(dx.len(), x.len(), "rmsnorm input gradient shape");
    assert_eq!(dout.len(), x.len(), "rmsnorm output gradient shape");
    // Empty for a frozen gain (`training.lora`): its gradient is not kept.
    let frozen = dweight.is_empty();
    assert!(
        frozen || dweight.len() == dim,
        "rmsnorm weight gradient shape"
    );
    let inv_dim = T::ONE / T::from_usize(dim);
    let rows = dx
        .chunks_exact_mut(dim)
        .zip(dout.chunks_exact(dim))
        .zip(x.chunks_exact(dim));
    for (((dx_row, dy_row), x_row), &r) in rows.zip(rstd) {
        let projection = dy_row
            .iter()
            .zip(x_row)
            .zip(weight)
            .map(|((&dy, &v), &g)| g * dy * v)
            .sum::<T>()
            * inv_dim;
        let r2 = r * r;
        for (j, dxj) in dx_row.iter_mut().enumerate() {
            *dxj += r * (weight[j] * dy_row[j] - x_row[j] * r2 * projection);
            if !frozen {
                dweight[j] += dy_row[j] * x_row[j] * r;
            }
        }
    }
}

fn check_shapes<T>(x: &[T], dim: usize, rows: usize) {
    assert!(dim > 0, "rmsnorm dimension must be positive");
    assert_eq!(
        x.len(),
        rows * dim,
        "rmsnorm input shape (rows from rstd, dim from weight)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_gradient, random};

    const EPS: f64 = 1e-5;

    #[test]
    fn forward_gives_unit_rms_rows_times_weight() {
        let x = [3.0, 4.0, 0.0, 0.0, -2.0, 2.0];
        let weight = [1.0, 2.0];
        let (mut out, mut rstd) = ([0.0; 6], [0.0; 3]);
        forward(&mut out, &mut rstd, &x, &weight, 0.0);
        // Row 0: rms = sqrt((9 + 16) / 2).
        let r0 = 1.0 / 12.5f64.sqrt();
        assert_eq!(rstd[0], r0);
        assert_eq!(out[..2], [3.0 * r0, 8.0 * r0]);
        assert_eq!(out[4..], [-1.0, 2.0]);
        // An all-zero row with eps = 0 gives 1 / 0 = inf and 0 * inf = NaN; eps > 0 avoids it.
        forward(&mut out, &mut rstd, &x, &weight, 1e-6);
        assert_eq!(out[2..4], [0.0, 0.0]);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (rows, dim) = (4, 6);
        let x = random(rows * dim, 11);
        let weight = random(dim, 12);
        let dout = random(rows * dim, 13);
        let loss = |x: &[f64], weight: &[f64]| {
            let (mut out, mut rstd) = (vec![0.0; rows * dim], vec![0.0; rows]);
            forward(&mut out, &mut rstd, x, weight, EPS);
            out.iter().zip(&dout).map(|(o, d)| o * d).sum::<f64>()
        };
        let (mut out, mut rstd) = (vec![0.0; rows * dim], vec![0.0; rows]);
        forward(&mut out, &mut rstd, &x, &weight, EPS);
        let (mut dx, mut dweight) = (vec![0.0; x.len()], vec![0.0; dim]);
        backward(&mut dx, &mut dweight, &dout, &x, &weight, &rstd);
        assert_gradient("dx", &dx, &x, |v| loss(v, &weight));
        assert_gradient("dweight", &dweight, &weight, |v| loss(&x, v));
    }
}
