//! `moectl render`: the objects the operator creates for one attempt of a
//! job (or for a service), from the same builders ([`crate::training::build`]), so users can
//! review them (or diff two versions of a job) without a cluster.

use kube::ResourceExt;
use moe_crds::{MoEInferenceService, MoETrainingJob};
use serde::Serialize;

use crate::gang::GangScheduling;
use crate::inference::build as serving;
use crate::inference::decide::{ModelState, resolve_model};
use crate::inference::{adapters, groups};
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
    /// The operator's `--gang-scheduling`.
    pub gang_scheduling: GangScheduling,
}

impl RenderOptions {
    fn context(&self) -> BuildContext {
        let default = BuildContext::default();
        BuildContext {
            default_worker_image: self
                .worker_image
                .clone()
                .unwrap_or(default.default_worker_image),
            gang_scheduling: self.gang_scheduling,
            ..default
        }
    }
}

/// The ConfigMap, Service and attempt Job (and, with `output.huggingface`,
/// the export Job the job runs once it succeeds), as one multi-document
/// YAML stream.
pub fn render(mut job: MoETrainingJob, options: &RenderOptions) -> serde_yaml::Result<String> {
    let namespace = options
        .namespace
        .clone()
        .or_else(|| job.namespace())
        .unwrap_or_else(|| DEFAULT_NAMESPACE.into());
    job.metadata.namespace = Some(namespace);
    job.metadata.uid = Some(PLACEHOLDER_UID.into());
    let context = options.context();
    let mut out = String::new();
    push_document(&mut out, &build::config_map(&job))?;
    push_document(&mut out, &build::service(&job))?;
    let nodes = job.spec.parallelism.nodes;
    if let Some(pod_group) = build::pod_group(&job, &context, options.attempt, nodes) {
        push_document(&mut out, &pod_group)?;
    }
    let attempt = build::NewAttempt {
        attempt: options.attempt,
        counters: Counters::default(),
        nodes,
    };
    push_document(&mut out, &build::attempt_job(&job, &context, attempt))?;
    if let Some(export) = build::export_job(&job, &context) {
        push_document(&mut out, &export)?;
    }
    Ok(out)
}

fn push_document(out: &mut String, object: &impl Serialize) -> serde_yaml::Result<()> {
    out.push_str("---\n");
    out.push_str(&serde_yaml::to_string(object)?);
    Ok(())
}

/// The children of a MoEInferenceService: ConfigMap, Service, Deployment (or,
/// for multi-pod replicas, the headless Service and a StatefulSet per group),
/// PodDisruptionBudget, (with autoscaling) the HorizontalPodAutoscaler and
/// (with `route`) the HTTPRoute. A `fromTrainingJob` model needs the job (the cluster has it; a file does
/// not): the model is rendered as the operator resolves it once the job has
/// Succeeded, with its checkpoint claim shown as `<job>-checkpoints`.
pub fn render_inference(
    mut svc: MoEInferenceService,
    options: &RenderOptions,
) -> serde_yaml::Result<String> {
    let namespace = options
        .namespace
        .clone()
        .or_else(|| svc.namespace())
        .unwrap_or_else(|| DEFAULT_NAMESPACE.into());
    svc.metadata.namespace = Some(namespace);
    svc.metadata.uid = Some(PLACEHOLDER_UID.into());
    let context = options.context();
    let model = match resolve_model(&svc, None) {
        ModelState::Ready(m) => *m,
        _ => {
            let job = svc.spec.model.from_training_job.clone().unwrap_or_else(|| {
                moe_crds::TrainingJobModel {
                    name: "unknown".into(),
                    checkpoint: None,
                }
            });
            serving::ResolvedModel {
                claim_name: Some(format!("{}-checkpoints", job.name)),
                download: None,
                path: String::new(),
                format: moe_crds::ModelFormat::Native,
                checkpoint_step: job.checkpoint,
                model: None,
                // Known only from the live job, which render does not read.
                trained: None,
                revision: format!(
                    "moetrainingjob/{}@{}",
                    job.name,
                    job.checkpoint
                        .map_or("latest".to_string(), |s| format!("step-{s}"))
                ),
                adapters: Vec::new(),
            }
        }
    };
    let model = serving::ResolvedModel {
        adapters: adapters::as_rendered(&svc),
        ..model
    };
    let mut out = String::new();
    push_document(&mut out, &serving::config_map(&svc, &model))?;
    push_document(&mut out, &serving::service(&svc))?;
    if svc.spec.parallelism.pods_per_replica > 1 {
        // Replica groups: the headless Service of their pods and the first
        // incarnation of each group's StatefulSet.
        push_document(&mut out, &groups::pods_service(&svc))?;
        for index in 0..svc.spec.replicas {
            let group = serving::Group {
                index,
                incarnation: 0,
            };
            if let Some(pod_group) = groups::pod_group(&svc, &context, group) {
                push_document(&mut out, &pod_group)?;
            }
            push_document(
                &mut out,
                &groups::group_set(&svc, &context, &model, group, 0),
            )?;
        }
    } else {
        push_document(&mut out, &serving::deployment(&svc, &context, &model))?;
    }
    push_document(&mut out, &serving::pod_disruption_budget(&svc))?;
    if let Some(hpa) = serving::horizontal_pod_autoscaler(&svc) {
        push_document(&mut out, &hpa)?;
    }
    if let Some(route) = crate::inference::route::http_route(&svc) {
        push_document(&mut out, &route)?;
    }
    if let Some(pool) = crate::inference::pool::inference_pool(&svc) {
        push_document(&mut out, &pool)?;
    }
    Ok(out)
}
