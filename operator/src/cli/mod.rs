//! What `moectl` does, as library code so the binary stays a thin argument
//! parser: read manifests, check them as the apiserver and the operator
//! would, render the objects the operator creates, and run training locally
//! with the same worker config and environment contract as on a cluster.

pub mod check;
pub mod gang;
pub mod local_run;
pub mod manifest;
pub mod render;
pub mod schema;
pub mod worker_bin;
