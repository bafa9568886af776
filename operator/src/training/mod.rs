//! MoETrainingJob: builders, decisions and the controller.

pub mod build;
pub mod checkpoints;
pub mod controller;
pub mod decide;
pub mod init_source;
pub mod pacing;
pub mod progress;
pub mod validate;
