//! CUDA kernel sources for the worker, one family per file, compiled at run
//! time by NVRTC (through `cudarc`, behind the `cuda` feature) so the worker
//! image needs only the CUDA runtime libraries, never a compiler toolchain.
//!
//! The kernel families land with the CUDA backend issue; this crate fixes the
//! place and the feature gate they live behind.

/// Whether this build can launch CUDA kernels (the `cuda` feature).
pub const CUDA_ENABLED: bool = cfg!(feature = "cuda");
