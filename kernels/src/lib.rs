//! CUDA kernel sources for the worker, one family per file under `cuda/`,
//! compiled at run time by NVRTC (through `cudarc`, behind the `cuda`
//! feature) for the device's own architecture, so the worker image needs
//! only the CUDA libraries, never a compiler toolchain, and the CPU-only
//! build needs nothing at all.
//!
//! - [`registry`]: every family's id, source and entry points (always built);
//! - `toolkit`: where NVRTC, the headers and ptxas are found at run time;
//! - `compile`: the one NVRTC options builder (arch from the device);
//! - `cache`: the per-device module cache, each family compiled once;
//! - [`ptxas`]: the register and spill report of `ptxas -v`.

pub mod ptxas;
pub mod registry;

#[cfg(feature = "cuda")]
pub mod cache;
#[cfg(feature = "cuda")]
pub mod compile;
#[cfg(feature = "cuda")]
pub mod toolkit;

#[cfg(feature = "cuda")]
pub use cudarc;

/// Whether this build can launch CUDA kernels (the `cuda` feature).
pub const CUDA_ENABLED: bool = cfg!(feature = "cuda");
