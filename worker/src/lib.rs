//! The MoE worker: model, ops (a CPU reference and, behind `cuda`, a CUDA
//! launcher per op), training loop, checkpoints, collectives and serving.
//!
//! So far: the CPU reference ops ([`ops`]), the Mixture-of-Experts
//! feed-forward layer ([`moe`]) and the whole transformer ([`model`]), all
//! generic over `f32` (training) and `f64` (gradient checks) through
//! [`scalar::Scalar`]; and single-process training on the CPU ([`run`]):
//! config ([`settings`]), data ([`data`]), optimizer ([`train`]) and
//! checkpoints ([`checkpoint`]); and FP8 training emulated exactly on the
//! CPU ([`fp8`], wired into the model through [`linear`]).

pub mod checkpoint;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
pub mod dist;
pub mod fetch;
pub mod fp8;
pub mod gradcheck;
pub mod linear;
pub mod memory;
pub mod model;
pub mod moe;
pub mod ops;
pub mod rng;
pub mod run;
pub mod scalar;
pub mod serve;
pub mod settings;
pub mod status;
pub mod train;

/// Compute backends a worker can be built with, as reported by `moe-worker --version`.
pub fn backends() -> &'static [&'static str] {
    if moe_kernels::CUDA_ENABLED {
        &["cpu", "cuda"]
    } else {
        &["cpu"]
    }
}
