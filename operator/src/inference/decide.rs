//! Pure decisions (no client) for a MoEInferenceService: resolve the model
//! source, and from the observed Deployment and pods compute the status —
//! kstatus `Ready`/`Reconciling`/`Stalled` plus `Available`/`Progressing`/
//! `Degraded`, each with a classified reason — and the transitions that
//! deserve an Event. Everything needed is in the API objects, so a restarted
//! operator decides the same again.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use moe_crds::condition::{AVAILABLE, DEGRADED, PROGRESSING, READY, RECONCILING, STALLED};
use moe_crds::{MoEInferenceService, MoEInferenceServiceStatus, MoETrainingJob, TrainedWith};

use super::adapters::ResolvedAdapter;
use super::build::{self, ResolvedModel};
use crate::reconcile::set_condition;
use crate::training::checkpoints;

/// Reasons of the Ready condition (and of the others where they apply).
pub mod reason {
    pub const READY: &str = "ReplicasReady";
    pub const SCALED_TO_ZERO: &str = "ScaledToZero";
    pub const CREATING: &str = "Creating";
    pub const UPDATING: &str = "Updating";
    pub const PODS_NOT_READY: &str = "PodsNotReady";
    pub const INSUFFICIENT_CAPACITY: &str = "InsufficientCapacity";
    pub const WAITING_FOR_ADMISSION: &str = "WaitingForAdmission";
    pub use crate::training::checkpoints::reason::{
        MODEL_NOT_PERSISTED, TRAINING_JOB_FAILED, TRAINING_JOB_NOT_FOUND, WAITING_FOR_TRAINING_JOB,
    };
    pub const MODEL_INCOMPATIBLE: &str = "ModelIncompatible";
    /// A training job's export, which `spec.adapters` serves from, failed.
    pub const ADAPTER_EXPORT_FAILED: &str = "AdapterExportFailed";
    pub const CHECKPOINT_NOT_FOUND: &str = "CheckpointNotFound";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const GROUP_RESTART_LIMIT: &str = "GroupRestartLimit";
    pub const DOWNLOADING_MODEL: &str = "DownloadingModel";
    pub const DOWNLOAD_FAILED: &str = "DownloadFailed";
    pub const SERVER_FAILING: &str = "ServerFailing";
    /// Degraded: pods serve different commits of a Hub model's revision.
    pub const MODEL_COMMIT_SKEW: &str = "ModelCommitSkew";
}

/// Where the model stands.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelState {
    /// Servable (boxed: a training job's model carries its whole shape and precision).
    Ready(Box<ResolvedModel>),
    /// Not yet (e.g. the training job is still running): Progressing.
    Waiting {
        reason: &'static str,
        message: String,
    },
    /// Never without a change: Stalled.
    Broken {
        reason: &'static str,
        message: String,
    },
}

/// `model` with the service's resolved `adapters` (`inference/adapters.rs`):
/// ready only when both are, else the model's reason first.
pub fn with_adapters(
    model: ModelState,
    adapters: Result<Vec<ResolvedAdapter>, ModelState>,
) -> ModelState {
    match (model, adapters) {
        (ModelState::Ready(mut model), Ok(adapters)) => {
            model.adapters = adapters;
            ModelState::Ready(model)
        }
        (ModelState::Ready(_), Err(state)) => state,
        (state, _) => state,
    }
}

/// The model of `svc`, given the training job it names (if it names one and it exists).
pub fn resolve_model(svc: &MoEInferenceService, job: Option<&MoETrainingJob>) -> ModelState {
    let source = &svc.spec.model;
    if let Some(v) = &source.volume {
        let path = v.path.trim_matches('/').to_string();
        return ModelState::Ready(Box::new(ResolvedModel {
            claim_name: Some(v.claim_name.clone()),
            download: None,
            revision: format!(
                "pvc/{}/{path} ({})",
                v.claim_name,
                serde_json::to_value(v.format)
                    .ok()
                    .and_then(|f| f.as_str().map(String::from))
                    .unwrap_or_default()
            ),
            path,
            format: v.format,
            checkpoint_step: None,
            model: None,
            trained: None,
            adapters: Vec::new(),
        }));
    }
    if let Some(hub) = &source.huggingface {
        return ModelState::Ready(Box::new(ResolvedModel {
            claim_name: hub.cache_claim_name.clone(),
            download: Some(hub.clone()),
            path: format!("{}/{}/{}", build::HUB_DIR, hub.repo, hub.revision),
            format: moe_crds::ModelFormat::Huggingface,
            checkpoint_step: None,
            model: None,
            trained: None,
            adapters: Vec::new(),
            revision: format!("huggingface/{}@{}", hub.repo, hub.revision),
        }));
    }
    let Some(from) = &source.from_training_job else {
        // The CEL rule requires one source; an object that got past it anyway is invalid.
        return ModelState::Broken {
            reason: reason::INVALID_SPEC,
            message: "spec.model needs exactly one source: fromTrainingJob, volume or huggingface"
                .into(),
        };
    };
    let (job, claim) = match checkpoints::available(&from.name, job, "serving starts") {
        Ok(available) => available,
        Err(checkpoints::Unavailable::Waiting { reason, message }) => {
            return ModelState::Waiting { reason, message };
        }
        Err(checkpoints::Unavailable::Never { reason, message }) => {
            return ModelState::Broken { reason, message };
        }
    };
    if job.spec.data.tokenizer == moe_crds::Tokenizer::Pretokenized
        && job.spec.data.tokenizer_file.is_none()
    {
        return ModelState::Broken {
            reason: reason::MODEL_INCOMPATIBLE,
            message: format!(
                "MoETrainingJob {} trained on pre-tokenized data (spec.data.tokenizer: pretokenized) without spec.data.tokenizerFile: its checkpoints carry no tokenizer, so a server could turn neither prompts into its token ids nor its ids into text",
                from.name
            ),
        };
    }
    let experts = job.spec.model.moe.experts;
    let ep = svc.spec.parallelism.expert_parallel;
    // checked_rem: a zero from an object that bypassed the schema must not panic.
    if experts.checked_rem(ep) != Some(0) {
        return ModelState::Broken {
            reason: reason::MODEL_INCOMPATIBLE,
            message: format!(
                "spec.parallelism.expertParallel ({ep}) must divide the {experts} experts of MoETrainingJob {}",
                from.name
            ),
        };
    }
    // A rank's copies are of the other ranks' experts, each at most once.
    if let Some(balancing) = &svc.spec.parallelism.expert_load_balancing {
        let others = experts - experts / ep;
        let per_rank = balancing.redundant_experts / ep;
        if per_rank > others {
            return ModelState::Broken {
                reason: reason::MODEL_INCOMPATIBLE,
                message: format!(
                    "spec.parallelism.expertLoadBalancing.redundantExperts ({}) gives each of the {ep} ranks {per_rank} copies, but a rank can hold copies of only the other ranks' {others} experts of MoETrainingJob {} (redundantExperts at most {})",
                    balancing.redundant_experts,
                    from.name,
                    others * ep
                ),
            };
        }
    }
    let path = checkpoints::dir_in_claim(job);
    let step = match checkpoints::pick(
        job,
        from.checkpoint,
        "spec.model.fromTrainingJob.checkpoint",
    ) {
        Ok(step) => step,
        Err(message) => {
            return ModelState::Broken {
                reason: reason::CHECKPOINT_NOT_FOUND,
                message,
            };
        }
    };
    let uid = job.uid().unwrap_or_default();
    let short_uid: String = uid.chars().take(8).collect();
    ModelState::Ready(Box::new(ResolvedModel {
        claim_name: Some(claim),
        download: None,
        path,
        format: moe_crds::ModelFormat::Native,
        checkpoint_step: Some(step),
        model: Some(job.spec.model.clone()),
        trained: Some(TrainedWith {
            job: format!("{}/{}", job.namespace().unwrap_or_default(), from.name),
            uid,
            step,
            tokenizer: job.spec.data.tokenizer,
            precision: job.spec.training.precision.clone(),
        }),
        revision: format!("moetrainingjob/{}/{short_uid}@step-{step}", from.name),
        adapters: Vec::new(),
    }))
}

/// The owned Deployment, as far as the decision needs it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeploymentState {
    pub generation: Option<i64>,
    pub observed_generation: Option<i64>,
    /// `spec.replicas` of the Deployment.
    pub desired: i32,
    /// Pods of every revision.
    pub replicas: i32,
    pub ready: i32,
    pub updated: i32,
}

/// Everything the decision needs besides the resource itself.
#[derive(Clone, Debug)]
pub struct Observed {
    /// An error that makes the spec unrunnable although the apiserver accepted it.
    pub invalid: Option<String>,
    pub model: ModelState,
    pub deployment: Option<DeploymentState>,
    /// Messages of server pods the scheduler cannot place.
    pub unschedulable: Vec<String>,
    /// Server pods Kueue has not admitted yet (`placement.queueName`).
    pub awaiting_admission: i32,
    /// How the server pods' downloads of a Hub model stand.
    pub downloads: Downloads,
    /// Server containers that exited with an error and wait to be
    /// restarted (CrashLoopBackOff), with the worker's words.
    pub server_failures: Vec<ContainerFailure>,
    /// For a Hub model: the commits the current model revision's server pods
    /// downloaded (their init containers' reports), each with those pods.
    pub commits: BTreeMap<String, Vec<String>>,
    /// Set when a replica group is out of restarts (`podsPerReplica > 1`).
    pub exhausted: Option<String>,
    /// What the Gateway controllers say of the service's HTTPRoute
    /// (`spec.route`, under `--gateway-api`).
    pub route: Option<super::route::Acceptance>,
    /// What they say of its InferencePool (`spec.route.inferencePool`,
    /// under `--inference-pool`).
    pub pool: Option<super::route::Acceptance>,
    pub now: Timestamp,
}

// How pods' downloads and failing containers are read is shared with training.
pub use crate::hub::{ContainerFailure, Downloads, UNFIXABLE_EXIT_CODE};

/// Ready's verdict while server pods download a Hub model: failing (stalled
/// when the Hub refused: a token or the spec must change), or downloading.
fn download_verdict(downloads: &Downloads) -> Option<Verdict> {
    if let Some(f) = downloads.failed.first() {
        return Some(Verdict {
            ready: false,
            stalled: f.exit_code == UNFIXABLE_EXIT_CODE,
            reason: reason::DOWNLOAD_FAILED,
            message: format!(
                "{} server pod(s) cannot download the model; pod {}: exit code {}: {}",
                downloads.failed.len(),
                f.pod,
                f.exit_code,
                f.message.trim()
            ),
        });
    }
    (downloads.running > 0).then(|| {
        progressing(
            reason::DOWNLOADING_MODEL,
            format!(
                "{} server pod(s) are downloading the model",
                downloads.running
            ),
        )
    })
}

/// Ready's verdict while server containers crash: stalled when the worker
/// said no restart can fix it (exit code 2: the model or the configuration).
fn server_verdict(failures: &[ContainerFailure]) -> Option<Verdict> {
    let f = failures.first()?;
    Some(Verdict {
        ready: false,
        stalled: f.exit_code == UNFIXABLE_EXIT_CODE,
        reason: reason::SERVER_FAILING,
        message: format!(
            "{} server pod(s) keep failing; pod {}: exit code {}: {}",
            failures.len(),
            f.pod,
            f.exit_code,
            f.message.trim()
        ),
    })
}

/// A transition worth a Kubernetes Event.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    pub warning: bool,
    pub reason: String,
    pub message: String,
}

/// The outcome of one decision.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub status: MoEInferenceServiceStatus,
    pub transitions: Vec<Transition>,
    /// Apply the children (ConfigMap, Service, Deployment, PDB, HPA) for this model.
    pub apply: Option<ResolvedModel>,
}

/// The condition that says whether the Gateways took the service's HTTPRoute.
pub const ROUTE_ACCEPTED: &str = "RouteAccepted";
/// The condition that says whether the Gateways took the service's InferencePool.
pub const INFERENCE_POOL_ACCEPTED: &str = "InferencePoolAccepted";

/// What the service is doing, in one word (the Ready condition's reason).
struct Verdict {
    ready: bool,
    stalled: bool,
    reason: &'static str,
    message: String,
}

pub fn decide(svc: &MoEInferenceService, observed: &Observed) -> Plan {
    let old = svc.status.clone().unwrap_or_default();
    let now = Time(observed.now);
    let generation = svc.metadata.generation;
    let desired = svc.spec.replicas;
    let dep = observed.deployment.clone();
    let counts = dep.clone().unwrap_or_default();

    let mut apply = None;
    let verdict = if let Some(invalid) = &observed.invalid {
        stalled(reason::INVALID_SPEC, invalid.clone())
    } else {
        match &observed.model {
            ModelState::Broken { reason, message } => stalled(reason, message.clone()),
            ModelState::Waiting { reason, message } => progressing(reason, message.clone()),
            ModelState::Ready(model) => {
                apply = Some(model.as_ref().clone());
                match &observed.exhausted {
                    // Will not recover without a change (a new revision or a deletion).
                    Some(message) => stalled(reason::GROUP_RESTART_LIMIT, message.clone()),
                    None => replicas_verdict(desired, dep.as_ref(), observed),
                }
            }
        }
    };

    let model_revision = match &observed.model {
        ModelState::Ready(m) => Some(m.revision.clone()),
        _ => old.model_revision.clone(),
    };
    let status = MoEInferenceServiceStatus {
        observed_generation: generation,
        replicas: counts.replicas,
        ready_replicas: counts.ready,
        updated_replicas: counts.updated,
        selector: Some(build::selector_string(svc)),
        url: Some(build::url(svc)),
        model_revision: model_revision.clone(),
        model_commit: model_commit(&old, &model_revision, &observed.commits),
        conditions: old.conditions.clone(),
    };
    let mut plan = Plan {
        status,
        transitions: vec![],
        apply,
    };

    let reconciling = !verdict.ready && !verdict.stalled;
    // Available: the service takes traffic with at most maxUnavailable replicas missing.
    let floor = (desired - svc.spec.rollout.max_unavailable).max(1);
    let available = desired > 0 && counts.ready >= floor && observed.invalid.is_none();
    // Degraded: serving, but below the asked-for capacity outside a rollout.
    let degraded = verdict.reason == reason::GROUP_RESTART_LIMIT
        || (!verdict.ready
            && counts.ready > 0
            && matches!(
                verdict.reason,
                reason::PODS_NOT_READY
                    | reason::INSUFFICIENT_CAPACITY
                    | reason::WAITING_FOR_ADMISSION
                    | reason::DOWNLOADING_MODEL
                    | reason::DOWNLOAD_FAILED
                    | reason::SERVER_FAILING
            ));
    let (r, m) = (verdict.reason, verdict.message.as_str());
    let conds = &mut plan.status.conditions;
    set_condition(conds, READY, verdict.ready, r, m, generation, &now);
    set_condition(conds, RECONCILING, reconciling, r, m, generation, &now);
    set_condition(conds, STALLED, verdict.stalled, r, m, generation, &now);
    let (ar, am) = if available {
        (
            "MinimumReplicasAvailable",
            format!(
                "{} of {desired} replicas ready (at most {} may be unavailable)",
                counts.ready, svc.spec.rollout.max_unavailable
            ),
        )
    } else {
        (r, m.to_string())
    };
    set_condition(conds, AVAILABLE, available, ar, &am, generation, &now);
    set_condition(conds, PROGRESSING, reconciling, r, m, generation, &now);
    // Pods serving two commits of one revision are degraded too: requests
    // get different weights by the replica they land on.
    let skew = commit_skew(svc, &observed.commits).filter(|_| !degraded);
    match &skew {
        Some(message) => {
            let before = conds
                .iter()
                .find(|c| c.type_ == DEGRADED)
                .map(|c| c.reason.clone());
            set_condition(
                conds,
                DEGRADED,
                true,
                reason::MODEL_COMMIT_SKEW,
                message,
                generation,
                &now,
            );
            if before.as_deref() != Some(reason::MODEL_COMMIT_SKEW) {
                plan.transitions.push(Transition {
                    warning: true,
                    reason: reason::MODEL_COMMIT_SKEW.into(),
                    message: message.clone(),
                });
            }
        }
        None => set_condition(conds, DEGRADED, degraded, r, m, generation, &now),
    }
    // Apart from Ready: the replicas serve through their Service whatever a
    // Gateway makes of the route.
    for (type_, acceptance) in [
        (ROUTE_ACCEPTED, &observed.route),
        (INFERENCE_POOL_ACCEPTED, &observed.pool),
    ] {
        match acceptance {
            Some(a) => set_condition(
                conds, type_, a.accepted, &a.reason, &a.message, generation, &now,
            ),
            None => conds.retain(|c| c.type_ != type_),
        }
    }

    // An Event when the summary (Ready's status and reason) changes.
    let before = old
        .conditions
        .iter()
        .find(|c| c.type_ == READY)
        .map(|c| (c.status.clone(), c.reason.clone()));
    let after = Some((
        if verdict.ready { "True" } else { "False" }.to_string(),
        r.to_string(),
    ));
    if before != after {
        plan.transitions.push(Transition {
            warning: verdict.stalled || r == reason::INSUFFICIENT_CAPACITY,
            reason: r.into(),
            message: m.into(),
        });
    }
    plan
}

/// `status.modelCommit`: the one commit the pods of the model revision
/// downloaded; with no pod reporting, the last one seen for the same
/// revision; none when they disagree (or the revision changed).
fn model_commit(
    old: &MoEInferenceServiceStatus,
    revision: &Option<String>,
    commits: &BTreeMap<String, Vec<String>>,
) -> Option<String> {
    match commits.len() {
        0 => old
            .model_commit
            .clone()
            .filter(|_| old.model_revision == *revision),
        1 => commits.keys().next().cloned(),
        _ => None,
    }
}

/// What to say when the server pods downloaded different commits of the
/// model's revision (a branch moved while they started).
fn commit_skew(
    svc: &MoEInferenceService,
    commits: &BTreeMap<String, Vec<String>>,
) -> Option<String> {
    if commits.len() < 2 {
        return None;
    }
    let hub = svc.spec.model.huggingface.as_ref()?;
    let each: Vec<String> = commits
        .iter()
        .map(|(commit, pods)| {
            let short = &commit[..commit.len().min(12)];
            format!(
                "{short} (pod{} {})",
                if pods.len() == 1 { "" } else { "s" },
                pods.join(", ")
            )
        })
        .collect();
    Some(format!(
        "server pods serve {} commits of {} at {:?}, which moved while they started: {}; \
         pin model.huggingface.revision to one commit, or delete the pods of the older one",
        commits.len(),
        hub.repo,
        hub.revision,
        each.join(", ")
    ))
}

fn stalled(reason: &'static str, message: String) -> Verdict {
    Verdict {
        ready: false,
        stalled: true,
        reason,
        message,
    }
}

fn progressing(reason: &'static str, message: String) -> Verdict {
    Verdict {
        ready: false,
        stalled: false,
        reason,
        message,
    }
}

/// Classifies the replicas: creating, updating, short of capacity, pods not
/// ready, or ready.
fn replicas_verdict(desired: i32, dep: Option<&DeploymentState>, observed: &Observed) -> Verdict {
    let Some(d) = dep else {
        return progressing(reason::CREATING, "creating the replicas".into());
    };
    let unschedulable = &observed.unschedulable;
    // Pods Kueue has not admitted are not short of nodes but of quota: the
    // queue's, which frees when other workloads finish or the quota grows.
    let awaiting = observed.awaiting_admission;
    let admission = || {
        progressing(
            reason::WAITING_FOR_ADMISSION,
            format!("{awaiting} server pod(s) wait for Kueue to admit them (their queue's quota)"),
        )
    };
    let stale = d.observed_generation < d.generation || d.desired != desired;
    let rolling = stale || d.updated < desired || d.replicas > desired;
    let capacity = || {
        progressing(
            reason::INSUFFICIENT_CAPACITY,
            format!(
                "{} server pod(s) cannot be scheduled: {}",
                unschedulable.len(),
                unschedulable.first().map(String::as_str).unwrap_or("")
            ),
        )
    };
    if rolling {
        // A rollout that cannot place its new pods is short of capacity, not just slow.
        if awaiting > 0 && !stale {
            return admission();
        }
        if !unschedulable.is_empty() && !stale {
            return capacity();
        }
        if let Some(verdict) = download_verdict(&observed.downloads)
            .or_else(|| server_verdict(&observed.server_failures))
            .filter(|_| !stale)
        {
            return verdict;
        }
        return progressing(
            reason::UPDATING,
            format!(
                "rolling out: {} of {desired} replicas updated, {} ready",
                d.updated, d.ready
            ),
        );
    }
    if desired == 0 {
        return Verdict {
            ready: true,
            stalled: false,
            reason: reason::SCALED_TO_ZERO,
            message: "scaled to 0 replicas".into(),
        };
    }
    if d.ready < desired {
        if awaiting > 0 {
            return admission();
        }
        if !unschedulable.is_empty() {
            return capacity();
        }
        if let Some(verdict) = download_verdict(&observed.downloads)
            .or_else(|| server_verdict(&observed.server_failures))
        {
            return verdict;
        }
        return progressing(
            reason::PODS_NOT_READY,
            format!("{} of {desired} replicas ready", d.ready),
        );
    }
    Verdict {
        ready: true,
        stalled: false,
        reason: reason::READY,
        message: format!("{desired} of {desired} replicas ready"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::training::checkpoints::kept_checkpoints;
    use serde_json::json;

    fn svc(extra: serde_json::Value) -> MoEInferenceService {
        let mut v = json!({
            "apiVersion": "moe.dev/v1alpha1", "kind": "MoEInferenceService",
            "metadata": {"name": "chat", "namespace": "serve", "uid": "u-1", "generation": 3},
            "spec": {"model": {"volume": {"claimName": "weights"}}, "replicas": 3}
        });
        moe_crds::fixtures::merge_patch(&mut v, &extra);
        serde_json::from_value(v).unwrap()
    }

    fn job(phase: Option<&str>, claim: Option<&str>) -> MoETrainingJob {
        let mut v = json!({
            "apiVersion": "moe.dev/v1alpha1", "kind": "MoETrainingJob",
            "metadata": {"name": "train", "namespace": "serve", "uid": "0123456789ab"},
            "spec": {
                "model": {"hiddenSize": 64, "layers": 2, "attentionHeads": 4, "kvHeads": 2, "seqLen": 64,
                          "moe": {"experts": 8, "topK": 2, "expertHiddenSize": 32}},
                "training": {"steps": 1000, "globalBatchSize": 8,
                             "precision": {"compute": "bf16", "fp8": {"enabled": true, "recipe": "tensorwise"}}},
                "checkpoint": {"path": "ckpt", "intervalSteps": 300, "keep": 3}
            }
        });
        if let Some(c) = claim {
            v["spec"]["checkpoint"]["claimName"] = json!(c);
        }
        if let Some(p) = phase {
            v["status"] = json!({"phase": p});
        }
        serde_json::from_value(v).unwrap()
    }

    fn observed(model: ModelState, dep: Option<DeploymentState>) -> Observed {
        Observed {
            invalid: None,
            model,
            deployment: dep,
            unschedulable: vec![],
            awaiting_admission: 0,
            downloads: Downloads::default(),
            server_failures: Vec::new(),
            commits: BTreeMap::new(),
            exhausted: None,
            route: None,
            pool: None,
            now: Timestamp::from_second(1_000).unwrap(),
        }
    }

    fn dep(desired: i32, replicas: i32, ready: i32, updated: i32) -> DeploymentState {
        DeploymentState {
            generation: Some(2),
            observed_generation: Some(2),
            desired,
            replicas,
            ready,
            updated,
        }
    }

    fn condition<'a>(
        plan: &'a Plan,
        t: &str,
    ) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        plan.status
            .conditions
            .iter()
            .find(|c| c.type_ == t)
            .unwrap()
    }

    fn message_of<'a>(plan: &'a Plan, t: &str) -> &'a str {
        &condition(plan, t).message
    }

    fn cond<'a>(plan: &'a Plan, t: &str) -> (&'a str, &'a str) {
        let c = condition(plan, t);
        (c.status.as_str(), c.reason.as_str())
    }

    fn ready_model(s: &MoEInferenceService) -> ModelState {
        resolve_model(s, None)
    }

    #[test]
    fn route_acceptance_is_its_own_condition_and_leaves_with_the_route() {
        let s = svc(json!({}));
        let serving = || observed(ready_model(&s), Some(dep(3, 3, 3, 3)));
        let refused = Observed {
            route: Some(super::super::route::Acceptance {
                accepted: false,
                reason: "NotAllowedByListeners".into(),
                message: "Gateway gateways/public: no listener allows this namespace".into(),
            }),
            ..serving()
        };
        let plan = decide(&s, &refused);
        assert_eq!(
            cond(&plan, ROUTE_ACCEPTED),
            ("False", "NotAllowedByListeners")
        );
        // The replicas serve through their Service whatever the Gateway says.
        assert_eq!(cond(&plan, READY).0, "True");
        let mut routed = s.clone();
        routed.status = Some(plan.status.clone());
        let unrouted = decide(&routed, &serving());
        assert!(
            unrouted
                .status
                .conditions
                .iter()
                .all(|c| c.type_ != ROUTE_ACCEPTED)
        );
    }

    #[test]
    fn a_running_training_job_keeps_the_service_progressing_naming_it() {
        let s =
            svc(json!({"spec": {"model": {"volume": null, "fromTrainingJob": {"name": "train"}}}}));
        let running = job(Some("Running"), Some("ckpt"));
        let model = resolve_model(&s, Some(&running));
        let ModelState::Waiting { reason, message } = &model else {
            panic!("{model:?}")
        };
        assert_eq!(*reason, reason::WAITING_FOR_TRAINING_JOB);
        assert!(message.contains("train is Running"), "{message}");
        let plan = decide(&s, &observed(model, None));
        assert!(plan.apply.is_none(), "no replicas before the model exists");
        assert_eq!(cond(&plan, PROGRESSING), ("True", "WaitingForTrainingJob"));
        assert_eq!(cond(&plan, READY), ("False", "WaitingForTrainingJob"));
        assert_eq!(cond(&plan, STALLED).0, "False");
        assert_eq!(plan.transitions.len(), 1);
        assert!(!plan.transitions[0].warning);
        // Missing job: waiting as well, with its own reason.
        assert!(matches!(
            resolve_model(&s, None),
            ModelState::Waiting {
                reason: reason::TRAINING_JOB_NOT_FOUND,
                ..
            }
        ));
    }

    #[test]
    fn a_succeeded_training_job_is_served_from_its_checkpoint_claim() {
        let s = svc(
            json!({"spec": {"model": {"volume": null, "fromTrainingJob": {"name": "train", "checkpoint": 600}}}}),
        );
        let ModelState::Ready(m) =
            resolve_model(&s, Some(&job(Some("Succeeded"), Some("ckpt-pvc"))))
        else {
            panic!()
        };
        assert_eq!(m.claim_name.as_deref(), Some("ckpt-pvc"));
        assert_eq!(m.path, "ckpt/serve/train/checkpoints");
        assert_eq!(m.dir(), "/models/ckpt/serve/train/checkpoints");
        assert_eq!(m.checkpoint_step, Some(600));
        assert_eq!(m.revision, "moetrainingjob/train/01234567@step-600");
        assert_eq!(m.model.unwrap().moe.experts, 8);
        // Besides the shape: the job, the step, its tokenizer and precision.
        let trained = m.trained.unwrap();
        assert_eq!(
            (trained.job.as_str(), trained.uid.as_str(), trained.step),
            ("serve/train", "0123456789ab", 600)
        );
        assert_eq!(trained.tokenizer, moe_crds::Tokenizer::Byte);
        assert!(trained.precision.fp8.enabled);
        assert_eq!(
            trained.precision.fp8.recipe,
            moe_crds::Fp8Recipe::Tensorwise
        );
        assert_eq!(trained.precision.compute, moe_crds::ComputePrecision::Bf16);
    }

    #[test]
    fn the_served_step_is_pinned_to_one_the_job_keeps() {
        let latest =
            svc(json!({"spec": {"model": {"volume": null, "fromTrainingJob": {"name": "train"}}}}));
        // Unset: the final checkpoint, as the job reports it (else its last step).
        let mut done = job(Some("Succeeded"), Some("c"));
        let ModelState::Ready(m) = resolve_model(&latest, Some(&done)) else {
            panic!()
        };
        assert_eq!(m.checkpoint_step, Some(1000));
        assert_eq!(m.revision, "moetrainingjob/train/01234567@step-1000");
        // Saved every 300 steps and at 1000, the newest 3 kept: 600, 900, 1000.
        assert_eq!(kept_checkpoints(&done), vec![600, 900, 1000]);
        // Stopped early (training.evaluation.patience) at step 990.
        done.status.as_mut().unwrap().progress = Some(moe_crds::TrainingProgress {
            last_checkpoint_step: Some(990),
            stopped_early: true,
            ..Default::default()
        });
        let ModelState::Ready(m) = resolve_model(&latest, Some(&done)) else {
            panic!()
        };
        assert_eq!(m.checkpoint_step, Some(990));
        assert_eq!(kept_checkpoints(&done), vec![600, 900, 990]);
        for gone in [300, 500, 1000, 1200] {
            let s = svc(
                json!({"spec": {"model": {"volume": null, "fromTrainingJob": {"name": "train", "checkpoint": gone}}}}),
            );
            let ModelState::Broken { reason, message } = resolve_model(&s, Some(&done)) else {
                panic!("step {gone}")
            };
            assert_eq!(reason, reason::CHECKPOINT_NOT_FOUND);
            assert!(
                message.starts_with(&format!("spec.model.fromTrainingJob.checkpoint ({gone})"))
                    && message.contains("600, 900, 990"),
                "{message}"
            );
        }
        // training.evaluation.keepBest: the best checkpoint is the job's
        // model, kept besides the newest.
        done.spec.training.evaluation =
            Some(serde_json::from_value(json!({"intervalSteps": 100, "keepBest": true})).unwrap());
        done.status.as_mut().unwrap().progress = Some(moe_crds::TrainingProgress {
            last_checkpoint_step: Some(1000),
            best_checkpoint_step: Some(300),
            ..Default::default()
        });
        let ModelState::Ready(m) = resolve_model(&latest, Some(&done)) else {
            panic!()
        };
        assert_eq!(m.checkpoint_step, Some(300));
        assert_eq!(kept_checkpoints(&done), vec![300, 600, 900, 1000]);
        let pinned = svc(
            json!({"spec": {"model": {"volume": null, "fromTrainingJob": {"name": "train", "checkpoint": 1000}}}}),
        );
        let ModelState::Ready(m) = resolve_model(&pinned, Some(&done)) else {
            panic!()
        };
        assert_eq!(
            m.checkpoint_step,
            Some(1000),
            "a pinned step is served as pinned"
        );
    }

    #[test]
    fn unservable_training_jobs_stall_with_a_reason() {
        let s =
            svc(json!({"spec": {"model": {"volume": null, "fromTrainingJob": {"name": "train"}}}}));
        let failed = resolve_model(&s, Some(&job(Some("Failed"), Some("c"))));
        assert!(matches!(
            failed,
            ModelState::Broken {
                reason: reason::TRAINING_JOB_FAILED,
                ..
            }
        ));
        let no_claim = resolve_model(&s, Some(&job(Some("Succeeded"), None)));
        assert!(matches!(
            no_claim,
            ModelState::Broken {
                reason: reason::MODEL_NOT_PERSISTED,
                ..
            }
        ));
        let mut pretokenized = job(Some("Succeeded"), Some("c"));
        pretokenized.spec.data.tokenizer = moe_crds::Tokenizer::Pretokenized;
        let ModelState::Broken { reason, message } = resolve_model(&s, Some(&pretokenized)) else {
            panic!("a job without a tokenizer is not servable")
        };
        assert_eq!(reason, reason::MODEL_INCOMPATIBLE);
        assert!(
            message.contains("spec.data.tokenizer: pretokenized"),
            "{message}"
        );
        // Named, the tokenizer travels with the checkpoints.
        pretokenized.spec.data.tokenizer_file = Some("gpt2/tokenizer.json".into());
        assert!(matches!(
            resolve_model(&s, Some(&pretokenized)),
            ModelState::Ready(_)
        ));
        let experts = job(Some("Succeeded"), Some("c")).spec.model.moe.experts;
        let copies = |redundant: i32| {
            svc(
                json!({"spec": {"model": {"volume": null, "fromTrainingJob": {"name": "train"}},
                "parallelism": {"processesPerPod": 2, "expertParallel": 2,
                                "expertLoadBalancing": {"redundantExperts": redundant}}}}),
            )
        };
        // Each of 2 ranks can copy the other's experts/2, not more.
        assert!(matches!(
            resolve_model(&copies(experts), Some(&job(Some("Succeeded"), Some("c")))),
            ModelState::Ready(_)
        ));
        let ModelState::Broken { reason, message } = resolve_model(
            &copies(experts + 2),
            Some(&job(Some("Succeeded"), Some("c"))),
        ) else {
            panic!("more copies per rank than other ranks' experts")
        };
        assert_eq!(reason, reason::MODEL_INCOMPATIBLE);
        assert!(
            message.contains(&format!("(redundantExperts at most {experts})")),
            "{message}"
        );
        let s16 = svc(
            json!({"spec": {"model": {"volume": null, "fromTrainingJob": {"name": "train"}},
                                      "parallelism": {"processesPerPod": 16, "expertParallel": 16}}}),
        );
        let ModelState::Broken { reason, message } =
            resolve_model(&s16, Some(&job(Some("Succeeded"), Some("c"))))
        else {
            panic!()
        };
        assert_eq!(reason, reason::MODEL_INCOMPATIBLE);
        assert!(
            message.starts_with("spec.parallelism.expertParallel"),
            "{message}"
        );
        let plan = decide(
            &s16,
            &observed(
                resolve_model(&s16, Some(&job(Some("Succeeded"), Some("c")))),
                None,
            ),
        );
        assert_eq!(cond(&plan, STALLED), ("True", "ModelIncompatible"));
        assert_eq!(cond(&plan, RECONCILING).0, "False");
        assert!(plan.transitions[0].warning);
    }

    #[test]
    fn replicas_are_classified() {
        let s = svc(json!({}));
        let m = ready_model(&s);
        let plan = decide(&s, &observed(m.clone(), None));
        assert_eq!(cond(&plan, READY), ("False", "Creating"));
        assert!(plan.apply.is_some());

        let plan = decide(&s, &observed(m.clone(), Some(dep(3, 3, 1, 3))));
        assert_eq!(cond(&plan, READY), ("False", "PodsNotReady"));
        assert_eq!(cond(&plan, DEGRADED), ("True", "PodsNotReady"));
        assert_eq!(
            cond(&plan, AVAILABLE).0,
            "False",
            "1 ready < 3 - maxUnavailable 1"
        );

        let plan = decide(&s, &observed(m.clone(), Some(dep(3, 3, 2, 3))));
        assert_eq!(cond(&plan, AVAILABLE), ("True", "MinimumReplicasAvailable"));

        let mut o = observed(m.clone(), Some(dep(3, 3, 0, 3)));
        o.unschedulable = vec!["0/29 nodes are available: 24 Insufficient nvidia.com/gpu".into()];
        let plan = decide(&s, &o);
        assert_eq!(cond(&plan, READY), ("False", "InsufficientCapacity"));
        assert_eq!(cond(&plan, DEGRADED).0, "False", "nothing serves yet");
        assert!(plan.transitions[0].warning);

        // Queued and short of quota: Kueue's gate, not the scheduler, holds
        // them (even when the scheduler would have no room either).
        let mut o = observed(m.clone(), Some(dep(3, 3, 1, 3)));
        o.awaiting_admission = 2;
        o.unschedulable = vec!["0/29 nodes are available".into()];
        let plan = decide(&s, &o);
        assert_eq!(cond(&plan, READY), ("False", "WaitingForAdmission"));
        assert_eq!(cond(&plan, DEGRADED), ("True", "WaitingForAdmission"));
        assert!(
            !plan.transitions[0].warning,
            "waiting for quota is no fault"
        );

        // A Hub model: pods downloading, then one whose download the Hub
        // refused (stalled: a token must change), then one that lost its
        // connection (the kubelet retries: progressing).
        let mut o = observed(m.clone(), Some(dep(3, 3, 1, 3)));
        o.downloads.running = 2;
        let plan = decide(&s, &o);
        assert_eq!(cond(&plan, READY), ("False", "DownloadingModel"));
        assert_eq!(cond(&plan, STALLED).0, "False");
        o.downloads.failed = vec![ContainerFailure {
            pod: "chat-7d9-x2".into(),
            exit_code: 2,
            message:
                "resolving org/m at main: the Hub answered 401 Unauthorized (gated or private: …)\n"
                    .into(),
        }];
        let plan = decide(&s, &o);
        assert_eq!(cond(&plan, READY), ("False", "DownloadFailed"));
        assert_eq!(cond(&plan, STALLED), ("True", "DownloadFailed"));
        let message = message_of(&plan, READY);
        assert!(
            message.contains("pod chat-7d9-x2: exit code 2: resolving org/m"),
            "{message}"
        );
        assert!(plan.transitions[0].warning);
        o.downloads.failed[0].exit_code = 1;
        let plan = decide(&s, &o);
        assert_eq!(cond(&plan, READY), ("False", "DownloadFailed"));
        assert_eq!(
            cond(&plan, STALLED).0,
            "False",
            "a network failure is retried"
        );

        // Server containers crashing: the worker's words, stalled when it
        // said a restart cannot help (exit 2), Degraded while others serve.
        let mut o = observed(m.clone(), Some(dep(3, 3, 2, 3)));
        o.server_failures = vec![ContainerFailure {
            pod: "chat-7d9-x3".into(),
            exit_code: 2,
            message: "/models/moe-9b: no model there\n".into(),
        }];
        let plan = decide(&s, &o);
        assert_eq!(cond(&plan, READY), ("False", "ServerFailing"));
        assert_eq!(cond(&plan, STALLED), ("True", "ServerFailing"));
        assert_eq!(cond(&plan, DEGRADED), ("True", "ServerFailing"));
        let message = message_of(&plan, READY);
        assert_eq!(
            message,
            "1 server pod(s) keep failing; pod chat-7d9-x3: exit code 2: /models/moe-9b: no model there"
        );
        o.server_failures[0].exit_code = 137;
        let plan = decide(&s, &o);
        assert_eq!(cond(&plan, READY), ("False", "ServerFailing"));
        assert_eq!(
            cond(&plan, STALLED).0,
            "False",
            "killed (OOM?): restarts may help"
        );

        let plan = decide(&s, &observed(m.clone(), Some(dep(3, 4, 3, 1))));
        assert_eq!(cond(&plan, READY), ("False", "Updating"));
        assert_eq!(cond(&plan, PROGRESSING), ("True", "Updating"));
        assert_eq!(cond(&plan, AVAILABLE).0, "True");

        // The Deployment has not seen the new replica count yet.
        let plan = decide(&s, &observed(m.clone(), Some(dep(2, 2, 2, 2))));
        assert_eq!(cond(&plan, READY), ("False", "Updating"));

        let plan = decide(&s, &observed(m.clone(), Some(dep(3, 3, 3, 3))));
        assert_eq!(cond(&plan, READY), ("True", "ReplicasReady"));
        assert_eq!(cond(&plan, RECONCILING).0, "False");
        assert_eq!(cond(&plan, PROGRESSING).0, "False");
        assert_eq!(plan.status.ready_replicas, 3);
        assert_eq!(plan.status.observed_generation, Some(3));
        assert_eq!(
            plan.status.selector.as_deref(),
            Some("moe.dev/role=server,moe.dev/service-name=chat")
        );
        assert_eq!(
            plan.status.url.as_deref(),
            Some("http://chat.serve.svc:8000")
        );

        let zero = svc(json!({"spec": {"replicas": 0}}));
        let plan = decide(&zero, &observed(m, Some(dep(0, 0, 0, 0))));
        assert_eq!(cond(&plan, READY), ("True", "ScaledToZero"));
        assert_eq!(cond(&plan, AVAILABLE), ("False", "ScaledToZero"));
    }

    #[test]
    fn an_unchanged_world_gives_an_identical_status_and_no_event() {
        let mut s = svc(json!({}));
        let o = observed(ready_model(&s), Some(dep(3, 3, 3, 3)));
        let first = decide(&s, &o);
        assert_eq!(first.transitions.len(), 1);
        s.status = Some(first.status.clone());
        let mut later = o.clone();
        later.now = Timestamp::from_second(5_000).unwrap();
        let second = decide(&s, &later);
        assert_eq!(second.status, first.status);
        assert!(second.transitions.is_empty());
    }

    /// Pods of a Hub model that downloaded different commits of its branch
    /// serve, but the service is Degraded, naming each commit's pods (once
    /// as a Warning); one commit is `status.modelCommit`, kept while no pod
    /// reports, dropped with the revision.
    #[test]
    fn pods_serving_two_commits_of_a_branch_degrade_the_service() {
        let s = svc(json!({"spec": {"model": {"volume": null,
                                              "huggingface": {"repo": "org/moe"}}}}));
        let m = resolve_model(&s, None);
        let mut o = observed(m, Some(dep(3, 3, 3, 3)));
        let a = "c0ffee".repeat(6) + "abcd";
        let b = "beef".repeat(10);
        o.commits = BTreeMap::from([(a.clone(), vec!["chat-1".into(), "chat-2".into()])]);
        let plan = decide(&s, &o);
        assert_eq!(cond(&plan, READY), ("True", "ReplicasReady"));
        assert_eq!(cond(&plan, DEGRADED).0, "False");
        assert_eq!(plan.status.model_commit.as_deref(), Some(a.as_str()));

        let mut s2 = s.clone();
        s2.status = Some(plan.status.clone());
        o.commits.insert(b.clone(), vec!["chat-3".into()]);
        let plan = decide(&s2, &o);
        assert_eq!(cond(&plan, READY), ("True", "ReplicasReady"), "they serve");
        assert_eq!(cond(&plan, DEGRADED), ("True", "ModelCommitSkew"));
        assert_eq!(plan.status.model_commit, None);
        let message = message_of(&plan, DEGRADED);
        assert_eq!(
            message,
            "server pods serve 2 commits of org/moe at \"main\", which moved while they \
             started: beefbeefbeef (pod chat-3), c0ffeec0ffee (pods chat-1, chat-2); pin \
             model.huggingface.revision to one commit, or delete the pods of the older one"
        );
        assert_eq!(plan.transitions.len(), 1);
        assert!(plan.transitions[0].warning);
        assert_eq!(plan.transitions[0].reason, "ModelCommitSkew");
        // Said once, not on every reconcile.
        s2.status = Some(plan.status.clone());
        assert!(decide(&s2, &o).transitions.is_empty());

        // The old pod replaced: one commit again.
        o.commits = BTreeMap::from([(b.clone(), vec!["chat-3".into(), "chat-4".into()])]);
        let plan = decide(&s2, &o);
        assert_eq!(cond(&plan, DEGRADED).0, "False");
        assert_eq!(plan.status.model_commit.as_deref(), Some(b.as_str()));
        // No pod reporting (pods listed only for a Hub model; scaled to
        // zero): the last commit stays, for the same revision only.
        s2.status = Some(plan.status.clone());
        o.commits.clear();
        assert_eq!(
            decide(&s2, &o).status.model_commit.as_deref(),
            Some(b.as_str())
        );
        let pinned = svc(json!({"spec": {"model": {"volume": null,
            "huggingface": {"repo": "org/moe", "revision": "v2"}}}}));
        let mut pinned_now = pinned.clone();
        pinned_now.status = s2.status.clone();
        let o = observed(resolve_model(&pinned, None), Some(dep(3, 3, 3, 3)));
        assert_eq!(decide(&pinned_now, &o).status.model_commit, None);
    }

    #[test]
    fn an_invalid_spec_stalls_and_applies_nothing() {
        let s = svc(json!({}));
        let mut o = observed(ready_model(&s), None);
        o.invalid = Some("spec.parallelism.podsPerReplica: not supported".into());
        let plan = decide(&s, &o);
        assert!(plan.apply.is_none());
        assert_eq!(cond(&plan, STALLED), ("True", "InvalidSpec"));
        assert_eq!(cond(&plan, READY).0, "False");
    }
}
