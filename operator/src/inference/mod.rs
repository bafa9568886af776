//! MoEInferenceService: builders, decisions and the controller, on the
//! machinery shared with training ([`crate::reconcile`], [`crate::pods`]).

pub mod adapters;
pub mod build;
pub mod controller;
pub mod decide;
pub mod groups;
pub mod pool;
pub mod route;
pub mod validate;
