//! The linear layer without bias: `out = x @ w^T`, `w` stored `[out_dim, in_dim]`
//! as in llm.c and PyTorch.
//! Zero rows (an expert no token was routed to) is valid and does nothing.
//!
//! Every output sums its products in ascending order of the inner index,
//! one fused multiply-add per product in f32 (one rounding; two in f64, see
//! [`Scalar::gemm_mul_add`]), starting from zero (forward) or from the
//! gradient already there (backward). The CUDA backend's exact router GEMM
//! repeats these operations bit for bit.
//!
//! In `f32` on a CPU with AVX2 and FMA (any x86-64 since 2013-15) all three GEMMs
//! run on [`packed_gemm`], a blocked, packed kernel that performs exactly
//! those operations in that order, many outputs at a time; otherwise (and
//! always in `f64`, the gradient checks' type) on the portable loops below.
//! Both give the same bits (tested), so results do not depend on the CPU.

use std::any::TypeId;

use crate::ops::packed_gemm::{self, Start, Strided};
use crate::ops::vector::gemm_axpy;
use crate::scalar::Scalar;

/// `values` seen as `f32` when `T` is `f32` and the packed GEMM can run.
fn packed_f32<T: Scalar>(values: &[T]) -> Option<&[f32]> {
    if TypeId::of::<T>() != TypeId::of::<f32>() || !packed_gemm::available() {
        return None;
    }
    // SAFETY: T is f32 (same TypeId), so the slice already holds f32s.
    Some(unsafe { std::slice::from_raw_parts(values.as_ptr().cast(), values.len()) })
}

/// The mutable form of [`packed_f32`].
fn packed_f32_mut<T: Scalar>(values: &mut [T]) -> Option<&mut [f32]> {
    if TypeId::of::<T>() != TypeId::of::<f32>() || !packed_gemm::available() {
        return None;
    }
    // SAFETY: as in `packed_f32`; the borrow is moved into the result.
    Some(unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast(), values.len()) })
}

fn strided(data: &[f32], row_stride: usize, col_stride: usize) -> Strided<'_> {
    Strided {
        data,
        row_stride,
        col_stride,
    }
}

/// Rows of `x` processed together, so each row of `w^T` is loaded once per
/// tile rather than once per row.
const ROW_TILE: usize = 4;

/// `out[r, o] = sum_i x[r, i] * w[o, i]` for `x: [rows, in_dim]`,
/// `w: [out_dim, in_dim]`, `out: [rows, out_dim]`.
pub fn forward<T: Scalar>(out: &mut [T], x: &[T], w: &[T], in_dim: usize, out_dim: usize) {
    let rows = rows_of(x, in_dim, out_dim);
    assert_eq!(w.len(), out_dim * in_dim, "matmul weight shape");
    assert_eq!(out.len(), rows * out_dim, "matmul output shape");
    if rows == 0 {
        return;
    }
    if let (Some(out), Some(x), Some(w)) = (packed_f32_mut(out), packed_f32(x), packed_f32(w)) {
        if rows == 1 {
            // One row (a decode step): stream the weights once, no packing.
            packed_gemm::gemv(out, x, w);
            return;
        }
        // B(i, o) = w[o, i].
        let (a, b) = (strided(x, in_dim, 1), strided(w, 1, in_dim));
        // Sums start from zero in the kernel: no pass to zero `out` first.
        packed_gemm::gemm(rows, out_dim, in_dim, a, b, out, Start::Zero);
        return;
    }
    out.fill(T::ZERO);
    portable_forward(out, x, w, in_dim, out_dim);
}

/// [`forward`]'s loops after `out` is zeroed: rows of `x` times the
/// transpose of `w` (built once per call, a small cost next to `rows` times
/// as many multiply-adds), so the inner loop is an `axpy` over an output row,
/// which vectorises, where a dot product's single running sum would be one
/// long dependency chain.
fn portable_forward<T: Scalar>(out: &mut [T], x: &[T], w: &[T], in_dim: usize, out_dim: usize) {
    let w_t = transpose(w, out_dim, in_dim);
    for (x_tile, out_tile) in x
        .chunks(ROW_TILE * in_dim)
        .zip(out.chunks_mut(ROW_TILE * out_dim))
    {
        for (i, w_t_row) in w_t.chunks_exact(out_dim).enumerate() {
            for (x_row, out_row) in x_tile
                .chunks_exact(in_dim)
                .zip(out_tile.chunks_exact_mut(out_dim))
            {
                gemm_axpy(out_row, x_row[i], w_t_row);
            }
        }
    }
}

/// `m: [rows, cols]` transposed to `[cols, rows]`.
fn transpose<T: Scalar>(m: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut t = vec![T::ZERO; m.len()];
    for (r, row) in m.chunks_exact(cols).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            t[c * rows + r] = v;
        }
    }
    t
}

/// Adds `dout @ w` into `dx` and `dout^T @ x` into `dw`; an empty `dw` (a
/// frozen weight's: `training.lora`) skips the weight-gradient GEMM.
pub fn backward<T: Scalar>(
    dx: &mut [T],
    dw: &mut [T],
    dout: &[T],
    x: &[T],
    w: &[T],
    in_dim: usize,
    out_dim: usize,
) {
    assert_eq!(dx.len(), x.len(), "matmul input gradient shape");
    backward_input(dx, dout, w, in_dim, out_dim);
    if !dw.is_empty() {
        backward_weight(dw, dout, x, in_dim, out_dim);
    }
}

/// Adds `dout @ w` into `dx: [rows, in_dim]` (the input-gradient GEMM alone).
pub fn backward_input<T: Scalar>(dx: &mut [T], dout: &[T], w: &[T], in_dim: usize, out_dim: usize) {
    let rows = rows_of(dx, in_dim, out_dim);
    assert_eq!(w.len(), out_dim * in_dim, "matmul weight shape");
    assert_eq!(dout.len(), rows * out_dim, "matmul output gradient shape");
    if let (Some(dx), Some(dout), Some(w)) = (packed_f32_mut(dx), packed_f32(dout), packed_f32(w)) {
        let (a, b) = (strided(dout, out_dim, 1), strided(w, in_dim, 1));
        packed_gemm::gemm(rows, in_dim, out_dim, a, b, dx, Start::FromC);
        return;
    }
    portable_backward_input(dx, dout, w, in_dim, out_dim);
}

fn portable_backward_input<T: Scalar>(
    dx: &mut [T],
    dout: &[T],
    w: &[T],
    in_dim: usize,
    out_dim: usize,
) {
    for (dx_row, dout_row) in dx.chunks_exact_mut(in_dim).zip(dout.chunks_exact(out_dim)) {
        for (&d, w_row) in dout_row.iter().zip(w.chunks_exact(in_dim)) {
            gemm_axpy(dx_row, d, w_row);
        }
    }
}

/// Adds `dout^T @ x` into `dw: [out_dim, in_dim]` (the weight-gradient GEMM alone).
pub fn backward_weight<T: Scalar>(
    dw: &mut [T],
    dout: &[T],
    x: &[T],
    in_dim: usize,
    out_dim: usize,
) {
    let rows = rows_of(x, in_dim, out_dim);
    assert_eq!(dw.len(), out_dim * in_dim, "matmul weight gradient shape");
    assert_eq!(dout.len(), rows * out_dim, "matmul output gradient shape");
    if let (Some(dw), Some(dout), Some(x)) = (packed_f32_mut(dw), packed_f32(dout), packed_f32(x)) {
        // A(o, r) = dout[r, o]; the sum runs over the rows.
        let (a, b) = (strided(dout, 1, out_dim), strided(x, in_dim, 1));
        packed_gemm::gemm(out_dim, in_dim, rows, a, b, dw, Start::FromC);
        return;
    }
    portable_backward_weight(dw, dout, x, in_dim, out_dim);
}

fn portable_backward_weight<T: Scalar>(
    dw: &mut [T],
    dout: &[T],
    x: &[T],
    in_dim: usize,
    out_dim: usize,
) {
    // Output-major so one row of `dw` stays in cache while every row of `x` streams past.
    for (o, dw_row) in dw.chunks_exact_mut(in_dim).enumerate() {
        for (x_row, dout_row) in x.chunks_exact(in_dim).zip(dout.chunks_exact(out_dim)) {
            gemm_axpy(dw_row, dout_row[o], x_row);
        }
    }
}

fn rows_of<T>(x: &[T], in_dim: usize, out_dim: usize) -> usize {
    assert!(
        in_dim > 0 && out_dim > 0,
        "matmul dimensions must be positive"
    );
    assert_eq!(
        x.len() % in_dim,
        0,
        "matmul input length is not a multiple of in_dim"
    );
    x.len() / in_dim
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_gradient, random};

    #[test]
    fn forward_matches_hand_computed_product() {
        // x = [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]] (5 rows: one full tile and a remainder),
        // w = [[1, 0], [0, 1], [1, -1]].
        let x: Vec<f64> = (1..=10).map(f64::from).collect();
        let w = [1.0, 0.0, 0.0, 1.0, 1.0, -1.0];
        let mut out = vec![0.0; 15];
        forward(&mut out, &x, &w, 2, 3);
        let expected = [
            1., 2., -1., 3., 4., -1., 5., 6., -1., 7., 8., -1., 9., 10., -1.,
        ];
        assert_eq!(out, expected);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (rows, in_dim, out_dim) = (6, 5, 3);
        let x = random(rows * in_dim, 1);
        let w = random(out_dim * in_dim, 2);
        let dout = random(rows * out_dim, 3);
        let mut dx = vec![0.0; x.len()];
        let mut dw = vec![0.0; w.len()];
        backward(&mut dx, &mut dw, &dout, &x, &w, in_dim, out_dim);
        let loss = |x: &[f64], w: &[f64]| {
            let mut out = vec![0.0; rows * out_dim];
            forward(&mut out, x, w, in_dim, out_dim);
            out.iter().zip(&dout).map(|(o, d)| o * d).sum::<f64>()
        };
        assert_gradient("dx", &dx, &x, |v| loss(v, &w));
        assert_gradient("dw", &dw, &w, |v| loss(&x, v));
    }

    #[test]
    fn backward_accumulates_into_existing_gradients() {
        let x = random(8, 4);
        let w = random(6, 5);
        let dout = random(12, 6);
        let (mut dx, mut dw) = (vec![0.0; 8], vec![0.0; 6]);
        backward(&mut dx, &mut dw, &dout, &x, &w, 2, 3);
        let (mut dx2, mut dw2) = (dx.clone(), dw.clone());
        backward(&mut dx2, &mut dw2, &dout, &x, &w, 2, 3);
        for (once, twice) in dx.iter().chain(&dw).zip(dx2.iter().chain(&dw2)) {
            assert!((2.0 * once - twice).abs() < 1e-12);
        }
    }

    /// The f32 GEMMs as dispatched (the packed kernel on AVX2 CPUs) give the
    /// portable loops' bits, on shapes past the packed kernel's tile and
    /// block edges (tails in every dimension, two `KC` blocks), gradients
    /// accumulating into non-zero buffers.
    #[test]
    fn f32_gemms_give_the_portable_loops_bits() {
        let mut rng = crate::rng::SplitMix64::new(7);
        for (rows, in_dim, out_dim) in [(101, 300, 70), (7, 5, 17), (1, 513, 1), (1, 300, 37)] {
            let x: Vec<f32> = rng.normal_vec(rows * in_dim, 1.0);
            let w: Vec<f32> = rng.normal_vec(out_dim * in_dim, 1.0);
            let dout: Vec<f32> = rng.normal_vec(rows * out_dim, 1.0);
            let dx0: Vec<f32> = rng.normal_vec(x.len(), 1.0);
            let dw0: Vec<f32> = rng.normal_vec(w.len(), 1.0);

            let mut out = vec![f32::NAN; rows * out_dim];
            forward(&mut out, &x, &w, in_dim, out_dim);
            let (mut dx, mut dw) = (dx0.clone(), dw0.clone());
            backward(&mut dx, &mut dw, &dout, &x, &w, in_dim, out_dim);

            let mut expected_out = vec![0.0f32; rows * out_dim];
            portable_forward(&mut expected_out, &x, &w, in_dim, out_dim);
            let (mut expected_dx, mut expected_dw) = (dx0, dw0);
            portable_backward_input(&mut expected_dx, &dout, &w, in_dim, out_dim);
            portable_backward_weight(&mut expected_dw, &dout, &x, in_dim, out_dim);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
            let shape = format!("{rows}x{in_dim}x{out_dim}");
            assert_eq!(bits(&out), bits(&expected_out), "forward {shape}");
            assert_eq!(bits(&dx), bits(&expected_dx), "backward_input {shape}");
            assert_eq!(bits(&dw), bits(&expected_dw), "backward_weight {shape}");
        }
    }

    #[test]
    fn no_rows_is_a_no_op() {
        let mut out: Vec<f32> = vec![];
        forward(&mut out, &[], &[1.0; 6], 2, 3);
        let mut dw = vec![0.0f32; 6];
        backward(&mut [], &mut dw, &[], &[], &[1.0; 6], 2, 3);
        assert!(dw.iter().all(|&g| g == 0.0));
    }
}
