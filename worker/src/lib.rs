//! The MoE worker: model, ops (a CPU reference and, behind `cuda`, a CUDA
//! launcher per op), training loop, checkpoints, collectives and serving.
//!
//! So far: the CPU reference ops ([`ops`]: matmul, RMSNorm, SwiGLU, softmax,
//! cross-entropy, embedding, RoPE, causal grouped-query attention) and the
//! Mixture-of-Experts feed-forward layer ([`moe`]), all generic over `f32`
//! (training) and `f64` (gradient checks) through [`scalar::Scalar`].

pub mod gradcheck;
pub mod moe;
pub mod ops;
pub mod rng;
pub mod scalar;

/// Compute backends a worker can be built with, as reported by `moe-worker --version`.
pub fn backends() -> &'static [&'static str] {
    if moe_kernels::CUDA_ENABLED {
        &["cpu", "cuda"]
    } else {
        &["cpu"]
    }
}
