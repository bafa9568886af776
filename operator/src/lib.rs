//! The moe-operator: controllers that reconcile MoETrainingJob and
//! MoEInferenceService into Kubernetes objects, plus what `moectl` shares
//! with them. It never depends on the worker or kernels crates, so its image
//! carries no CUDA.

pub mod cli;
pub mod gang;
pub mod hub;
pub mod inference;
pub mod labels;
pub mod metrics;
pub mod pods;
pub mod reconcile;
pub mod server;
pub mod training;
