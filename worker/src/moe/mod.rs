//! The Mixture-of-Experts feed-forward layer, DeepSeek-V3 style: fine-grained
//! routed experts plus always-on shared experts, softmax or sigmoid routing
//! (optionally group-limited), auxiliary-loss-free load balancing through a
//! selection bias, an optional sequence-wise balance loss, dropless dispatch.

pub mod balance;
pub mod config;
pub mod dispatch;
pub mod expert;
pub mod expert_parallel;
pub mod layer;
pub mod params;
pub mod placement;
pub mod routing;
pub mod sequences;

pub use config::{GroupLimit, MoeConfig, MoeConfigError, ScoreFunction};
pub use layer::{MoeForward, MoeLayer};
pub use params::MoeParams;
pub use sequences::Sequences;
