//! API types of the moe-operator custom resources (`moe.dev/v1alpha1`).
//!
//! This crate holds only types and pure helpers (defaults, CEL rules, label
//! and condition names); it never talks to a cluster, so the operator,
//! `moectl` and tests share one definition of the API. The CRD YAML under
//! `deploy/crds/` is generated from these types (`moectl crds`) and a test
//! fails when the committed copy is stale.

pub mod common;
pub mod contract;
pub mod fixtures;
pub mod inference;
pub mod training;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

pub use common::*;
pub use contract::{CheckpointConfig, ServingAdapter, ServingConfig, TrainedWith, WorkerConfig};
pub use inference::*;
pub use training::*;

/// API group of every moe-operator resource.
pub const GROUP: &str = "moe.dev";
/// The one served (and stored) version.
pub const VERSION: &str = "v1alpha1";

/// `group/version`, as written in `apiVersion`.
pub fn api_version() -> String {
    format!("{GROUP}/{VERSION}")
}

/// Every CRD this project defines, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![MoETrainingJob::crd(), MoEInferenceService::crd()]
}

/// The CRDs as one multi-document YAML stream, as committed under `deploy/crds/`.
pub fn crds_yaml() -> String {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd).expect("a CRD always serialises"));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn api_version_joins_group_and_version() {
        assert_eq!(super::api_version(), "moe.dev/v1alpha1");
    }
}
