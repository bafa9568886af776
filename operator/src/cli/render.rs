//! `moectl render`: the objects the operator creates for one attempt of a
//! job, from the same builders ([`crate::training::build`]), so users can
//! review them (or diff two versions of a job) without a cluster.

use kube::ResourceExt;
use moe_crds::MoETrainingJob;
use serde::Serialize;

use crate::training::build::{self, BuildContext, Counters};

/// Stands in for the uid the apiserver assigns, which owner references
/// need; all zeros so that nobody mistakes it for a real object's.
pub const PLACEHOLDER_UID: &str = "00000000-0000-0000-0000-000000000000";
/// Namespace of a job whose manifest names none, as `kubectl apply` would use.
pub const DEFAULT_NAMESPACE: &str = "default";

/// What the cluster would otherwise decide.
#[derive(Clone, Debug, Default)]
pub struct RenderOptions {
    /// Attempt number (0 for the first; one more per gang restart).
    pub attempt: i32,
    /// Overrides the manifest's namespace.
    pub namespace: Option<String>,
    /// The operator's default worker image, used when `spec.worker.image` is unset.
    pub worker_image: Option<String>,
}

/// The ConfigMap, Service and attempt Job, as one multi-document YAML stream.
pub fn render(mut job: MoETrainingJob, options: &RenderOptions) -> serde_yaml::Result<String> {
    let namespace = options
        .namespace
        .clone()
        .or_else(|| job.namespace())
        .unwrap_or_else(|| DEFAULT_NAMESPACE.into());
    job.metadata.namespace = Some(namespace);
    job.metadata.uid = Some(PLACEHOLDER_UID.into());
    let context = match &options.worker_image {
        Some(image) => BuildContext {
            default_worker_image: image.clone(),
        },
        None => BuildContext::default(),
    };
    let mut out = String::new();
    push_document(&mut out, &build::config_map(&job))?;
    push_document(&mut out, &build::service(&job))?;
    push_document(
        &mut out,
        &build::attempt_job(&job, &context, options.attempt, Counters::default()),
    )?;
    Ok(out)
}

fn push_document(out: &mut String, object: &impl Serialize) -> serde_yaml::Result<()> {
    out.push_str("---\n");
    out.push_str(&serde_yaml::to_string(object)?);
    Ok(())
}
