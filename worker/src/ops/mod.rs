//! The CPU reference ops, one module per op, each a `forward` and a
//! `backward` over plain row-major slices with explicit dimensions.
//!
//! Conventions, shared so a CUDA launcher per op can slot in beside each
//! function with the same signature:
//! - the leading dimension (rows: tokens) is implied by the slice lengths;
//!   mismatched lengths are a caller bug and panic;
//! - `forward` overwrites its outputs;
//! - `backward` *adds* into its gradient outputs (as llm.c does), so a tensor
//!   used twice (a residual, the input of two projections) collects both
//!   contributions; callers zero gradients once per step. The one exception
//!   is RoPE, a pure rotation, whose backward rotates the gradient in place.

pub mod attention;
pub mod cross_entropy;
pub mod embedding;
pub mod matmul;
mod packed_gemm;
pub mod packed_linear;
pub mod rmsnorm;
pub mod rope;
pub mod softmax;
pub mod swiglu;
pub(crate) mod vector;

#[cfg(test)]
pub(crate) mod testing;

/// The threads a large product may be split across: the current rayon
/// pool's, or one outside a pool (the serving engine and the trainer run in
/// one only with `--threads` above 1). [`packed_gemm`] and [`packed_linear`]
/// cap this by what their work allows.
pub(crate) fn pool_threads() -> usize {
    if rayon::current_thread_index().is_none() {
        1
    } else {
        rayon::current_num_threads()
    }
}

/// `work(i, item)` for every item, its results in the items' order: across
/// the rayon pool when there is one ([`pool_threads`]) and more than one
/// item, else in order on this thread. For independent pieces of work
/// (sequences of attention, experts of a MoE layer) whose arithmetic does
/// not depend on where it runs, so the bits do not depend on the threads.
pub(crate) fn pool_map<I: Send, R: Send>(
    items: Vec<I>,
    work: impl Fn(usize, I) -> R + Sync + Send,
) -> Vec<R> {
    if pool_threads() > 1 && items.len() > 1 {
        use rayon::prelude::*;
        items
            .into_par_iter()
            .enumerate()
            .map(|(i, item)| work(i, item))
            .collect()
    } else {
        items
            .into_iter()
            .enumerate()
            .map(|(i, item)| work(i, item))
            .collect()
    }
}
