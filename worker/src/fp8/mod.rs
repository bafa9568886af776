//! FP8 training emulated exactly on the CPU, DeepSeek-V3 style: the
//! reference the CUDA FP8 kernels are checked against.
//!
//! - [`e4m3`]: the E4M3 number format, round-to-nearest-even and saturating;
//! - [`quantize`]: matrices of E4M3 codes with one f32 scale per tile
//!   (1×128 activation tiles, 128×128 weight blocks);
//! - [`delayed`]: the tensorwise recipe's amax histories;
//! - [`gemm`]: a linear layer's forward and backward GEMMs in FP8.
//!
//! Only GEMM inputs are FP8. Master weights, gradients, optimizer state,
//! activations between ops and every non-GEMM op stay f32; which GEMMs use
//! FP8 is decided by the model (see [`crate::linear`]).

pub mod delayed;
pub mod e4m3;
pub mod gemm;
pub mod quantize;

pub use delayed::{DelayedScale, LinearScales, Role};
pub use gemm::Scaling;
pub use quantize::{Fp8Matrix, TILE, TileShape};

/// How FP8 operands are scaled (`training.precision.fp8.recipe`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fp8Recipe {
    /// Just-in-time scales per 1×128 tile and 128×128 weight block.
    #[default]
    Blockwise,
    /// One delayed scale per tensor from a 16-step amax history.
    Tensorwise,
}
