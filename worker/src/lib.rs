//! The MoE worker: model, ops (a CPU reference and, behind `cuda`, a CUDA
//! launcher per op), training loop, checkpoints, collectives and serving.
//!
//! Only the crate boundary exists so far; see the worker issue for the plan.

/// Compute backends a worker can be built with, as reported by `moe-worker --version`.
pub fn backends() -> &'static [&'static str] {
    if moe_kernels::CUDA_ENABLED {
        &["cpu", "cuda"]
    } else {
        &["cpu"]
    }
}
