//! Pure builders (no client): the objects a MoETrainingJob becomes.
//!
//! ```text
//! MoETrainingJob <name>
//!  ├── ConfigMap <name>-config      worker config (config.json), the worker contract
//!  ├── Service   <name>             headless; pod DNS <name>-a<N>-<index>.<name>
//!  ├── Job       <name>-a<N>        Indexed, one pod per node, backoffLimit 0:
//!  │    └── Pod  <name>-a<N>-<i>-*  one failed pod fails the attempt (gang)
//!  └── PodGroup  <name>-a<N>        with --gang-scheduling=workload-api and no
//!                                   queue: the scheduler binds all pods or none
//! ```
//!
//! `moectl render` prints exactly these, so users can review what the operator will create.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement,
    PodFailurePolicyOnPodConditionsPattern, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    ObjectFieldSelector, PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec, Service,
    ServicePort, ServiceSpec, Volume,
};
use k8s_openapi::api::scheduling::v1alpha2::PodGroup;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use moe_crds::contract::{self, COORDINATOR_PORT, METRICS_PORT, env};
use moe_crds::{CheckpointConfig, MoETrainingJob, WorkerConfig};

use crate::gang::{self, Mechanism};
use crate::hub;
use crate::labels;
pub use crate::pods::{BuildContext, NODE_LOSS_TOLERATION_SECONDS};
use crate::pods::{
    affinity, container_security_context, empty_dir, fnv1a64, kueue_topology_annotation, mount,
    nccl_env, plain, pod_security_context, resource_claims, resources, tolerations,
};

/// Where the checkpoint volume is mounted in worker containers.
pub const STATE_MOUNT: &str = "/var/lib/moe";
/// Where a `data.volume` claim is mounted (read-only), or a Hub dataset's
/// volume (its cache claim or an emptyDir, written by the download only).
pub const DATA_MOUNT: &str = "/data";
/// The link a Hub dataset's download points at the commit it fetched: the
/// worker reads `data.huggingface.path` and `data.tokenizerFile` inside it,
/// so every restart of a pod trains on the commit that pod downloaded.
pub const PINNED_DATA_LINK: &str = "/run/moe/data";
/// Where a pretrained model (`model.initFrom.huggingface`) is downloaded
/// (its volume: the cache claim or an emptyDir), and the link its download
/// points at the commit it fetched, which the worker starts from.
pub const INIT_MOUNT: &str = "/init";
pub const PINNED_INIT_LINK: &str = "/run/moe/init";
const CONTAINER: &str = "worker";
/// A worker pod's time after SIGTERM (to checkpoint at its next step),
/// unless `worker.terminationGracePeriodSeconds` says otherwise.
const WORKER_GRACE_SECONDS: i64 = 120;

/// How long `job`'s worker pods have after SIGTERM before they are killed.
pub fn grace_seconds(job: &MoETrainingJob) -> i64 {
    job.spec
        .worker
        .termination_grace_period_seconds
        .unwrap_or(WORKER_GRACE_SECONDS)
}

pub fn config_map_name(job: &MoETrainingJob) -> String {
    format!("{}-config", job.name_any())
}

pub fn service_name(job: &MoETrainingJob) -> String {
    job.name_any()
}

pub fn attempt_job_name(job: &MoETrainingJob, attempt: i32) -> String {
    format!("{}-a{attempt}", job.name_any())
}

/// The coordinator (rank 0's rendezvous store) of an attempt, by stable pod DNS name.
pub fn coordinator(job: &MoETrainingJob, attempt: i32) -> String {
    format!(
        "{}-0.{}:{COORDINATOR_PORT}",
        attempt_job_name(job, attempt),
        service_name(job)
    )
}

/// `parts` joined by `/`, the empty ones (and the slashes around each) left out.
fn join_path(parts: &[&str]) -> String {
    parts
        .iter()
        .map(|p| p.trim_matches('/'))
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("/")
}

/// The job's directory in the checkpoint volume, as mounted in its pods:
/// `<STATE_MOUNT>/<checkpoint.path>/<namespace>/<name>`.
fn state_dir(job: &MoETrainingJob) -> String {
    let ns = job.namespace().unwrap_or_default();
    let dir = join_path(&[&job.spec.checkpoint.path, &ns, &job.name_any()]);
    format!("{STATE_MOUNT}/{dir}")
}

/// The worker config, resolved for paths inside the container.
pub fn worker_config(job: &MoETrainingJob) -> WorkerConfig {
    let spec = &job.spec;
    let ns = job.namespace().unwrap_or_default();
    let base = state_dir(job);
    WorkerConfig {
        job: format!("{ns}/{}", job.name_any()),
        model: spec.model.clone(),
        data: spec.data.clone(),
        training: spec.training.clone(),
        parallelism: spec.parallelism.clone(),
        checkpoint: CheckpointConfig {
            dir: format!("{base}/checkpoints"),
            interval_steps: spec.checkpoint.interval_steps,
            keep: spec.checkpoint.keep,
            resume: spec.checkpoint.resume,
        },
        device: spec.worker.device,
        // Where the claim is mounted: the worker finds `data.volume.path`
        // and `data.tokenizerFile` inside it (as `moectl run --local` does
        // in the current directory).
        data_dir: match (&spec.data.volume, &spec.data.huggingface) {
            (Some(_), _) => Some(DATA_MOUNT.to_string()),
            (None, Some(_)) => Some(PINNED_DATA_LINK.to_string()),
            (None, None) => None,
        },
        output_dir: base,
        init_dir: spec.model.init_from.as_ref().map(|init| {
            // The claim is mounted at /init; the model is at `path` in it.
            let in_claim = |path: &str| {
                [INIT_MOUNT, path.trim_matches('/')]
                    .iter()
                    .filter(|p| !p.is_empty())
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("/")
            };
            match (&init.volume, &init.from_training_job) {
                (Some(volume), _) => in_claim(&volume.path),
                // The other job's checkpoint, once resolved (no attempt
                // starts before); unresolved, an empty directory that a
                // worker refuses rather than training from scratch.
                (None, Some(_)) => in_claim(
                    job.status
                        .as_ref()
                        .and_then(|s| s.init_checkpoint.as_ref())
                        .map_or("", |at| at.path.as_str()),
                ),
                (None, None) => PINNED_INIT_LINK.to_string(),
            }
        }),
    }
}

/// The config file's text, and a short hash of it (stamped on attempt Jobs).
pub fn worker_config_json(job: &MoETrainingJob) -> (String, String) {
    let text =
        serde_json::to_string_pretty(&worker_config(job)).expect("WorkerConfig always serialises");
    let hash = fnv1a64(text.as_bytes());
    (text, format!("{hash:016x}"))
}

fn owner_ref(job: &MoETrainingJob) -> OwnerReference {
    job.controller_owner_ref(&())
        .expect("a MoETrainingJob read from the API has a name and uid")
}

fn child_labels(job: &MoETrainingJob) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::MANAGED_BY.into(), labels::MANAGED_BY_VALUE.into()),
        (labels::JOB_NAME.into(), job.name_any()),
    ])
}

fn child_meta(job: &MoETrainingJob, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: job.namespace(),
        labels: Some(child_labels(job)),
        owner_references: Some(vec![owner_ref(job)]),
        ..Default::default()
    }
}

pub fn config_map(job: &MoETrainingJob) -> ConfigMap {
    let (text, _) = worker_config_json(job);
    ConfigMap {
        metadata: child_meta(job, config_map_name(job)),
        data: Some(BTreeMap::from([("config.json".to_string(), text)])),
        ..Default::default()
    }
}

/// Headless Service giving worker pods stable DNS names. Not-ready addresses
/// are published so ranks can rendezvous before any of them is Ready.
pub fn service(job: &MoETrainingJob) -> Service {
    let selector = BTreeMap::from([
        (labels::JOB_NAME.to_string(), job.name_any()),
        (labels::ROLE.to_string(), labels::ROLE_WORKER.to_string()),
    ]);
    Service {
        metadata: child_meta(job, service_name(job)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(selector),
            publish_not_ready_addresses: Some(true),
            ports: Some(vec![
                ServicePort {
                    name: Some("rendezvous".into()),
                    port: COORDINATOR_PORT.into(),
                    ..Default::default()
                },
                ServicePort {
                    name: Some("metrics".into()),
                    port: METRICS_PORT.into(),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Counters carried from attempt to attempt on the attempt Job itself, so
/// they survive an operator restart between creating a Job and writing status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub restarts: i32,
    pub disruptions: i32,
}

/// An attempt Job to create.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewAttempt {
    pub attempt: i32,
    pub counters: Counters,
    /// Worker pods: `parallelism.nodes`, unless an elastic job shrinks.
    pub nodes: i32,
}

/// The Indexed Job of one attempt: `nodes` pods, each running
/// `processesPerNode` worker processes.
pub fn attempt_job(job: &MoETrainingJob, ctx: &BuildContext, new: NewAttempt) -> Job {
    let spec = &job.spec;
    let NewAttempt {
        attempt,
        counters,
        nodes,
    } = new;
    let (_, config_hash) = worker_config_json(job);

    let mut meta = child_meta(job, attempt_job_name(job, attempt));
    let job_labels = meta.labels.get_or_insert_with(BTreeMap::new);
    job_labels.insert(labels::ATTEMPT.into(), attempt.to_string());
    if let Some(queue) = &spec.placement.queue_name {
        job_labels.insert(labels::KUEUE_QUEUE_NAME.into(), queue.clone());
    }
    meta.annotations = Some(BTreeMap::from([
        (labels::RESTARTS.into(), counters.restarts.to_string()),
        (labels::DISRUPTIONS.into(), counters.disruptions.to_string()),
        (labels::CONFIG_HASH.into(), config_hash),
    ]));

    Job {
        metadata: meta,
        spec: Some(JobSpec {
            completion_mode: Some("Indexed".into()),
            completions: Some(nodes),
            parallelism: Some(nodes),
            // Gang semantics: the first failed pod fails the attempt, and the
            // Job controller stops the others. The operator decides what next.
            backoff_limit: Some(0),
            pod_failure_policy: Some(gang_failure_policy()),
            // Queued jobs start suspended; Kueue admits the whole gang by
            // unsuspending. The operator never writes `suspend` afterwards.
            suspend: spec.placement.queue_name.as_ref().map(|_| true),
            template: pod_template(job, ctx, attempt, nodes),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Fail the attempt on the first disrupted or failed pod. backoffLimit 0
/// alone would too; the rules make the Job's Failed condition name the pod
/// and the exit code or disruption, which the operator reads when the pod
/// itself is already gone (e.g. evicted from a lost node).
fn gang_failure_policy() -> PodFailurePolicy {
    PodFailurePolicy {
        rules: vec![
            PodFailurePolicyRule {
                action: "FailJob".into(),
                on_pod_conditions: Some(vec![PodFailurePolicyOnPodConditionsPattern {
                    type_: "DisruptionTarget".into(),
                    status: Some("True".into()),
                }]),
                ..Default::default()
            },
            PodFailurePolicyRule {
                action: "FailJob".into(),
                on_exit_codes: Some(PodFailurePolicyOnExitCodesRequirement {
                    container_name: Some(CONTAINER.into()),
                    operator: "NotIn".into(),
                    values: vec![0],
                }),
                ..Default::default()
            },
        ],
    }
}

/// The PodGroup of one attempt, named as its Job, when the Workload API
/// schedules the gang ([`crate::gang`]); owned by the MoETrainingJob, and
/// deleted with the attempt.
pub fn pod_group(
    job: &MoETrainingJob,
    ctx: &BuildContext,
    attempt: i32,
    nodes: i32,
) -> Option<PodGroup> {
    (ctx.gang(&job.spec.placement, nodes) == Mechanism::WorkloadApi).then(|| {
        let mut meta = child_meta(job, attempt_job_name(job, attempt));
        meta.labels
            .get_or_insert_with(BTreeMap::new)
            .insert(labels::ATTEMPT.into(), attempt.to_string());
        ctx.pod_group(meta, &job.spec.placement, nodes)
    })
}

fn pod_template(
    job: &MoETrainingJob,
    ctx: &BuildContext,
    attempt: i32,
    nodes: i32,
) -> PodTemplateSpec {
    let spec = &job.spec;
    let worker = &spec.worker;
    let mut pod_labels = worker.pod_metadata.labels.clone();
    pod_labels.extend(child_labels(job));
    pod_labels.insert(labels::ATTEMPT.into(), attempt.to_string());
    pod_labels.insert(labels::ROLE.into(), labels::ROLE_WORKER.into());
    let mut annotations = worker.pod_metadata.annotations.clone();
    // All pods or none, in one topology domain: a queued job's gang is
    // admitted and placed by Kueue (its pod-set annotations); another's by
    // the scheduler, as one PodGroup of the Workload API, or pod by pod, each
    // following the attempt's first pod (pod affinity). See crate::gang.
    let mechanism = ctx.gang(&spec.placement, nodes);
    let queued = mechanism == Mechanism::Kueue;
    annotations.extend(kueue_topology_annotation(&spec.placement));
    // Expert-parallel groups are blocks of consecutive ranks, so of
    // consecutive nodes (completion indices): Kueue keeps each block of
    // `expertParallel / processesPerNode` pods in one narrower domain.
    if let Some(slice) = spec
        .placement
        .topology
        .as_ref()
        .and_then(|t| t.expert_groups.as_ref())
        && queued
    {
        let nodes = spec.parallelism.expert_parallel / spec.parallelism.processes_per_node;
        annotations.insert(labels::KUEUE_SLICE_TOPOLOGY.into(), slice.clone());
        annotations.insert(labels::KUEUE_SLICE_SIZE.into(), nodes.to_string());
    }
    let gang = BTreeMap::from([
        (labels::JOB_NAME.to_string(), job.name_any()),
        (labels::ATTEMPT.to_string(), attempt.to_string()),
    ]);

    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(pod_labels),
            annotations: (!annotations.is_empty()).then_some(annotations),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            subdomain: Some(service_name(job)),
            service_account_name: worker.service_account_name.clone(),
            // Workers never talk to the API: progress is read from rank 0 by the operator.
            automount_service_account_token: Some(false),
            // SIGTERM makes a worker checkpoint at its next step, then exit.
            termination_grace_period_seconds: Some(grace_seconds(job)),
            security_context: Some(pod_security_context()),
            node_selector: (!spec.placement.node_selector.is_empty())
                .then(|| spec.placement.node_selector.clone()),
            affinity: affinity(
                &spec.placement,
                ctx.pod_affinity(mechanism, &spec.placement)
                    .then_some(&gang),
            ),
            scheduling_group: (mechanism == Mechanism::WorkloadApi)
                .then(|| gang::scheduling_group(&attempt_job_name(job, attempt))),
            tolerations: tolerations(&spec.placement, worker.device),
            priority_class_name: spec.placement.priority_class_name.clone(),
            scheduler_name: spec.placement.scheduler_name.clone(),
            init_containers: init_containers(job, ctx),
            containers: vec![container(job, ctx, attempt, nodes)],
            volumes: Some(volumes(job)),
            resource_claims: resource_claims(worker),
            ..Default::default()
        }),
    }
}

/// The spare Job of a smaller attempt of an elastic job: `count` pods with
/// a worker's resources and placement (its node selector, tolerations,
/// priority, and the pod affinity that keeps the attempt in one domain),
/// running `moe-worker hold` and nothing else. When they all run, the
/// scheduler has room for the whole gang, and the operator restarts it on
/// every node. They mount nothing and join nothing (no subdomain, no
/// PodGroup); their container pulls the worker image, so the node has it
/// when the grown gang lands there. A queued job's spares are queued too
/// (suspended, with its queue and preferred topology), so they run only
/// once Kueue's quota holds them beside the attempt.
pub fn spare_job(job: &MoETrainingJob, ctx: &BuildContext, attempt: i32, count: i32) -> Job {
    let placement = &job.spec.placement;
    let mut meta = child_meta(job, spare_job_name(job, attempt));
    let job_labels = meta.labels.get_or_insert_with(BTreeMap::new);
    job_labels.insert(labels::ROLE.into(), labels::ROLE_SPARE.into());
    job_labels.insert(labels::SPARE_FOR_ATTEMPT.into(), attempt.to_string());
    if let Some(queue) = &placement.queue_name {
        job_labels.insert(labels::KUEUE_QUEUE_NAME.into(), queue.clone());
    }
    let mut template = pod_template(job, ctx, attempt, job.spec.parallelism.nodes);
    if let Some(meta) = template.metadata.as_mut() {
        let pod_labels = meta.labels.get_or_insert_with(BTreeMap::new);
        pod_labels.remove(labels::ATTEMPT);
        pod_labels.insert(labels::ROLE.into(), labels::ROLE_SPARE.into());
        pod_labels.insert(labels::SPARE_FOR_ATTEMPT.into(), attempt.to_string());
        meta.annotations = kueue_topology_annotation(placement).map(|a| BTreeMap::from([a]));
    }
    if let Some(pod) = template.spec.as_mut() {
        let worker = &job.spec.worker;
        pod.subdomain = None;
        pod.scheduling_group = None;
        pod.init_containers = None;
        pod.volumes = None;
        pod.containers = vec![Container {
            name: "spare".into(),
            image: Some(ctx.image(worker)),
            image_pull_policy: worker.image_pull_policy.map(|p| p.as_str().to_string()),
            command: Some(vec!["moe-worker".into(), "hold".into()]),
            resources: Some(resources(worker, job.spec.parallelism.processes_per_node)),
            security_context: Some(container_security_context()),
            ..Default::default()
        }];
    }
    Job {
        metadata: meta,
        spec: Some(JobSpec {
            completions: Some(count),
            parallelism: Some(count),
            // A spare that fails is replaced; they hold until deleted.
            backoff_limit: Some(count.saturating_mul(4)),
            suspend: placement.queue_name.as_ref().map(|_| true),
            template,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Where the export Job mounts `output.huggingface.claimName`.
pub const EXPORT_MOUNT: &str = "/output";

pub fn export_job_name(job: &MoETrainingJob) -> String {
    format!("{}-export", job.name_any())
}

/// The exported model's directory inside `output.huggingface.claimName`:
/// `<path>/<namespace>/<name>`.
pub fn export_path(job: &MoETrainingJob) -> String {
    let path = job
        .spec
        .output
        .as_ref()
        .and_then(|o| o.huggingface.as_ref())
        .map_or("", |hf| hf.path.as_str());
    let ns = job.namespace().unwrap_or_default();
    join_path(&[path, &ns, &job.name_any()])
}

/// The export pod's memory: the export reads the checkpoint a tensor at a
/// time (`moe-worker export`), so it holds one shard being encoded (at most
/// [`EXPORT_SHARD_BYTES`], or one larger tensor), and the tensor being
/// read with its reordered copy: a shard and twelve bytes per value of the
/// largest tensor bound it, and 1 GiB of room. Not the model's size.
fn export_memory(model: &moe_crds::ModelSpec) -> u64 {
    EXPORT_SHARD_BYTES + 12 * largest_tensor(model) + (1 << 30)
}

/// Shards of 2 GB.
const EXPORT_SHARD_BYTES: u64 = 2_000_000_000;

/// Values of the largest tensor of `model`: the embedding or the head
/// (`vocab × hidden`) in any model that has one of them larger than the
/// rest.
fn largest_tensor(model: &moe_crds::ModelSpec) -> u64 {
    let n = |v: i32| u64::try_from(v).unwrap_or(0);
    let h = n(model.hidden_size);
    let heads = n(model.attention_heads).max(1);
    let d = model.head_dim.map_or(h / heads, n);
    let dense_hidden = model.dense_hidden_size.map_or(4 * h, n);
    let moe = &model.moe;
    [
        n(model.vocab_size),
        heads * d,
        dense_hidden,
        n(moe.experts),
        n(moe.expert_hidden_size),
    ]
    .into_iter()
    .max()
    .unwrap_or(0)
        * h
}

/// The export pod's command (`moe-worker export`), its paths in the pod:
/// the job's checkpoints on the checkpoint claim, `<path>/<namespace>/<name>`
/// on the output claim; `None` without `output.huggingface`.
pub fn export_command(job: &MoETrainingJob) -> Option<Vec<String>> {
    let output = job.spec.output.as_ref()?.huggingface.as_ref()?;
    let precision = match output.precision {
        moe_crds::ExportPrecision::Bf16 => "bf16",
        moe_crds::ExportPrecision::Fp32 => "f32",
    };
    let mut command = vec![
        "moe-worker".to_string(),
        "export".into(),
        "--model".into(),
        format!("{}/checkpoints", state_dir(job)),
        "--out".into(),
        format!("{EXPORT_MOUNT}/{}", export_path(job)),
        "--precision".into(),
        precision.into(),
        // The pod's memory holds one shard being encoded (export_memory).
        "--shard-size-mb".into(),
        (EXPORT_SHARD_BYTES / 1_000_000).to_string(),
    ];
    // Pinned only to the best: else the newest is the final checkpoint,
    // even if no report of it reached the status.
    if let Some(step) = best_checkpoint(job) {
        command.extend(["--checkpoint-step".to_string(), step.to_string()]);
    }
    if output.adapter_only {
        command.push("--adapter-only".into());
    }
    Some(command)
}

/// With `training.evaluation.keepBest`, the step of the checkpoint with the
/// lowest held-out loss, as rank 0 last reported it: the job's model.
pub fn best_checkpoint(job: &MoETrainingJob) -> Option<i64> {
    let evaluation = job.spec.training.evaluation.as_ref()?;
    if !evaluation.keep_best {
        return None;
    }
    job.status.as_ref()?.progress.as_ref()?.best_checkpoint_step
}

/// The export Job of a succeeded job with `output.huggingface`: one pod
/// running `moe-worker export` from the job's model (its newest checkpoint,
/// or its best with `training.evaluation.keepBest`; the checkpoint
/// claim, read-only) into the output claim. It runs on any node (it needs
/// no GPU) with the worker's image and pod labels, restricted like the
/// workers; `None` without `output.huggingface`.
pub fn export_job(job: &MoETrainingJob, ctx: &BuildContext) -> Option<Job> {
    use k8s_openapi::api::core::v1::ResourceRequirements;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    let output = job.spec.output.as_ref()?.huggingface.as_ref()?;
    let checkpoint_claim = job.spec.checkpoint.claim_name.clone()?;
    let command = export_command(job)?;
    let worker = &job.spec.worker;
    let mut meta = child_meta(job, export_job_name(job));
    let job_labels = meta.labels.get_or_insert_with(BTreeMap::new);
    job_labels.insert(labels::ROLE.into(), labels::ROLE_EXPORT.into());
    let mut pod_labels = worker.pod_metadata.labels.clone();
    pod_labels.extend(child_labels(job));
    pod_labels.insert(labels::ROLE.into(), labels::ROLE_EXPORT.into());
    let resources = output.resources.clone().unwrap_or_else(|| {
        let bytes = export_memory(&job.spec.model);
        let memory = Quantity(format!("{}Mi", bytes.div_ceil(1 << 20)));
        ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("1".into())),
                ("memory".to_string(), memory.clone()),
            ])),
            limits: Some(BTreeMap::from([("memory".to_string(), memory)])),
            ..Default::default()
        }
    });
    let claim = |name: &str, claim: &str, read_only: bool| Volume {
        name: name.into(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: claim.into(),
            read_only: read_only.then_some(true),
        }),
        ..Default::default()
    };
    let template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(pod_labels),
            annotations: (!worker.pod_metadata.annotations.is_empty())
                .then(|| worker.pod_metadata.annotations.clone()),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            service_account_name: worker.service_account_name.clone(),
            automount_service_account_token: Some(false),
            security_context: Some(pod_security_context()),
            priority_class_name: job.spec.placement.priority_class_name.clone(),
            containers: vec![Container {
                name: "export".into(),
                image: Some(ctx.image(worker)),
                image_pull_policy: worker.image_pull_policy.map(|p| p.as_str().to_string()),
                command: Some(command),
                resources: Some(resources),
                security_context: Some(container_security_context()),
                // The error it exits on, for status.output.message.
                termination_message_policy: Some("FallbackToLogsOnError".into()),
                volume_mounts: Some(vec![
                    mount("state", STATE_MOUNT, true),
                    mount("output", EXPORT_MOUNT, false),
                    mount("tmp", "/tmp", false),
                ]),
                ..Default::default()
            }],
            volumes: Some(vec![
                claim("state", &checkpoint_claim, true),
                claim("output", &output.claim_name, false),
                empty_dir("tmp", None, None),
            ]),
            ..Default::default()
        }),
    };
    Some(Job {
        metadata: meta,
        spec: Some(JobSpec {
            completions: Some(1),
            parallelism: Some(1),
            // An export that fails says why; running it again changes nothing.
            backoff_limit: Some(0),
            template,
            ..Default::default()
        }),
        ..Default::default()
    })
}

pub fn spare_job_name(job: &MoETrainingJob, attempt: i32) -> String {
    format!("{}-spare", attempt_job_name(job, attempt))
}

/// The downloads a pod runs before the worker: a Hub dataset's, a
/// pretrained model's.
pub fn init_containers(job: &MoETrainingJob, ctx: &BuildContext) -> Option<Vec<Container>> {
    let spec = &job.spec;
    let data = spec
        .data
        .huggingface
        .as_ref()
        .map(|hub| download_container(job, ctx, hub));
    let model = pretrained_hub(job).map(|hub| {
        hub::download_container(
            ctx,
            &spec.worker,
            &hub::Download {
                container: hub::MODEL_DOWNLOAD_CONTAINER,
                repo: &hub.repo,
                revision: &hub.revision,
                endpoint: hub.endpoint.as_deref(),
                token_secret: hub.token_secret.as_ref(),
                fetches: crate::hub::Fetches::Model,
                volume: "init",
                mount_path: INIT_MOUNT,
                link: PINNED_INIT_LINK,
            },
        )
    });
    let all: Vec<Container> = data.into_iter().chain(model).collect();
    (!all.is_empty()).then_some(all)
}

/// Whether `job`'s pods download from the Hub (then they hold the links to
/// what they fetched on a pod-local volume).
pub fn downloads(job: &MoETrainingJob) -> bool {
    job.spec.data.huggingface.is_some() || pretrained_hub(job).is_some()
}

/// The Hub model a fine-tuning job starts from, if it comes from the Hub.
fn pretrained_hub(job: &MoETrainingJob) -> Option<&moe_crds::HuggingFaceModel> {
    job.spec.model.init_from.as_ref()?.huggingface.as_ref()
}

/// The init container that downloads a Hub dataset's files (its `path`,
/// the tokenizer and `training.evaluation.path`) into the data volume
/// before the worker starts.
pub fn download_container(
    job: &MoETrainingJob,
    ctx: &BuildContext,
    hub: &moe_crds::HuggingFaceDataset,
) -> Container {
    let evaluation = job.spec.training.evaluation.as_ref();
    let include = std::iter::once(hub.path.clone())
        .chain(job.spec.data.tokenizer_file.clone())
        .chain(evaluation.and_then(|e| e.path.clone()))
        .map(|p| p.trim_matches('/').to_string())
        .collect();
    hub::download_container(
        ctx,
        &job.spec.worker,
        &hub::Download {
            container: hub::DOWNLOAD_CONTAINER,
            repo: &hub.repo,
            revision: &hub.revision,
            endpoint: hub.endpoint.as_deref(),
            token_secret: hub.token_secret.as_ref(),
            fetches: crate::hub::Fetches::Dataset(include),
            volume: "data",
            mount_path: DATA_MOUNT,
            link: PINNED_DATA_LINK,
        },
    )
}

fn container(job: &MoETrainingJob, ctx: &BuildContext, attempt: i32, nodes: i32) -> Container {
    let worker = &job.spec.worker;
    // One process per GPU: the GPU count follows processesPerNode, whatever the user wrote.
    let resources = resources(worker, job.spec.parallelism.processes_per_node);
    let mut mounts = vec![
        mount("config", "/etc/moe", true),
        mount("state", STATE_MOUNT, false),
        mount("shm", "/dev/shm", false),
        mount("tmp", "/tmp", false),
    ];
    if job.spec.data.volume.is_some() || job.spec.data.huggingface.is_some() {
        mounts.push(mount("data", DATA_MOUNT, true));
    }
    if job.spec.model.init_from.is_some() {
        mounts.push(mount("init", INIT_MOUNT, true));
    }
    if downloads(job) {
        mounts.push(mount(hub::PINNED_VOLUME, hub::PINNED_MOUNT, true));
    }
    Container {
        name: CONTAINER.into(),
        image: Some(ctx.image(worker)),
        image_pull_policy: worker.image_pull_policy.map(|p| p.as_str().to_string()),
        command: Some(crate::pods::worker_command(
            "train",
            worker,
            job.spec.parallelism.processes_per_node,
        )),
        env: Some(env_vars(job, attempt, nodes)),
        ports: Some(vec![
            ContainerPort {
                name: Some("rendezvous".into()),
                container_port: COORDINATOR_PORT.into(),
                ..Default::default()
            },
            ContainerPort {
                name: Some("metrics".into()),
                container_port: METRICS_PORT.into(),
                ..Default::default()
            },
        ]),
        resources: Some(resources),
        security_context: Some(container_security_context()),
        volume_mounts: Some(mounts),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    }
}

/// The worker environment contract ([`contract::env`]), then NCCL settings, then the user's env.
/// `nodes`: the attempt's gang (`parallelism.nodes`, unless an elastic job
/// shrank it; the worker reads the config with as many).
pub fn env_vars(job: &MoETrainingJob, attempt: i32, nodes: i32) -> Vec<EnvVar> {
    let p = &job.spec.parallelism;
    let mut out = vec![
        plain(env::WORLD_SIZE, nodes * p.processes_per_node),
        plain(env::NODES, nodes),
        EnvVar {
            name: env::NODE_RANK.into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: format!("metadata.annotations['{}']", labels::JOB_COMPLETION_INDEX),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
        plain(env::PROCS_PER_NODE, p.processes_per_node),
        plain(env::COORDINATOR, coordinator(job, attempt)),
        plain(env::ATTEMPT, attempt),
        plain(env::CONFIG, contract::CONFIG_PATH),
        plain(
            env::JOB,
            format!("{}/{}", job.namespace().unwrap_or_default(), job.name_any()),
        ),
    ];
    out.extend(nccl_env(&job.spec.worker.nccl));
    out.extend(job.spec.worker.env.iter().cloned());
    out
}

fn volumes(job: &MoETrainingJob) -> Vec<Volume> {
    let spec = &job.spec;
    let mut out = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: config_map_name(job),
                ..Default::default()
            }),
            ..Default::default()
        },
        match &spec.checkpoint.claim_name {
            Some(claim) => Volume {
                name: "state".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            None => empty_dir("state", None, None),
        },
        empty_dir("shm", Some("Memory"), Some(spec.worker.shm_size.clone())),
        empty_dir("tmp", None, None),
    ];
    if let Some(data) = &spec.data.volume {
        out.push(Volume {
            name: "data".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: data.claim_name.clone(),
                read_only: Some(true),
            }),
            ..Default::default()
        });
    }
    if let Some(hub) = &spec.data.huggingface {
        out.push(download_volume("data", hub.cache_claim_name.as_ref()));
    }
    let read_only_claim = |claim_name: &str| Volume {
        name: "init".into(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: claim_name.into(),
            read_only: Some(true),
        }),
        ..Default::default()
    };
    match spec
        .model
        .init_from
        .as_ref()
        .map(|i| (&i.huggingface, &i.volume, &i.from_training_job))
    {
        Some((Some(hub), _, _)) => out.push(download_volume("init", hub.cache_claim_name.as_ref())),
        Some((None, Some(volume), _)) => out.push(read_only_claim(&volume.claim_name)),
        // The other job's checkpoint claim, once resolved.
        Some((None, None, Some(_))) => out.push(
            match job.status.as_ref().and_then(|s| s.init_checkpoint.as_ref()) {
                Some(at) => read_only_claim(&at.claim_name),
                None => empty_dir("init", None, None),
            },
        ),
        _ => {}
    }
    if downloads(job) {
        out.push(empty_dir(hub::PINNED_VOLUME, None, None));
    }
    out
}

/// The volume a download writes (the worker's mount of it is read-only):
/// the cache claim shared by the pods, else an emptyDir of the pod's own.
fn download_volume(name: &str, cache_claim: Option<&String>) -> Volume {
    match cache_claim {
        Some(claim) => Volume {
            name: name.into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                read_only: Some(false),
            }),
            ..Default::default()
        },
        None => empty_dir(name, None, None),
    }
}

/// Kind and API version of the owner, for selecting children by owner reference.
pub fn owner_api_version() -> String {
    MoETrainingJob::api_version(&()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodAffinity;

    fn job(placement: serde_json::Value) -> MoETrainingJob {
        let mut v = moe_crds::fixtures::valid_training_job();
        moe_crds::fixtures::merge_patch(
            &mut v,
            &serde_json::json!({"metadata": {"name": "big", "namespace": "ml", "uid": "u-1"}, "spec": {"placement": placement}}),
        );
        serde_json::from_value(v).unwrap()
    }

    /// Attempt `attempt` of the whole gang.
    fn whole(job: &MoETrainingJob, attempt: i32) -> NewAttempt {
        NewAttempt {
            attempt,
            counters: Counters::default(),
            nodes: job.spec.parallelism.nodes,
        }
    }

    fn template(job: &MoETrainingJob) -> PodTemplateSpec {
        attempt_job(job, &BuildContext::default(), whole(job, 3))
            .spec
            .unwrap()
            .template
    }

    fn pod_affinity(t: &PodTemplateSpec) -> Option<PodAffinity> {
        t.spec.as_ref()?.affinity.as_ref()?.pod_affinity.clone()
    }

    fn workload_api() -> BuildContext {
        BuildContext {
            gang_scheduling: crate::gang::GangScheduling::WorkloadApi,
            ..Default::default()
        }
    }

    #[test]
    fn the_export_reads_the_newest_checkpoint_and_writes_the_output_claim() {
        let mut v = moe_crds::fixtures::valid_training_job();
        moe_crds::fixtures::merge_patch(
            &mut v,
            &serde_json::json!({"metadata": {"name": "sft", "namespace": "ml", "uid": "u-1"},
            "spec": {
                "checkpoint": {"claimName": "ckpt", "path": "/runs/"},
                "output": {"huggingface": {"claimName": "models", "path": "exports/",
                                           "precision": "fp32"}},
                "worker": {"podMetadata": {"labels": {"team": "nlp"}}}
            }}),
        );
        let j: MoETrainingJob = serde_json::from_value(v).unwrap();
        assert_eq!(export_path(&j), "exports/ml/sft");
        let export = export_job(&j, &BuildContext::default()).expect("an export Job");
        assert_eq!(export.metadata.name.as_deref(), Some("sft-export"));
        let spec = export.spec.unwrap();
        assert_eq!(spec.backoff_limit, Some(0));
        let pod = spec.template.spec.unwrap();
        let labels = spec.template.metadata.unwrap().labels.unwrap();
        assert_eq!(labels.get("team").map(String::as_str), Some("nlp"));
        assert_eq!(
            labels.get(labels::ROLE).map(String::as_str),
            Some(labels::ROLE_EXPORT)
        );
        let container = &pod.containers[0];
        assert_eq!(
            container.command.as_ref().unwrap().join(" "),
            "moe-worker export --model /var/lib/moe/runs/ml/sft/checkpoints \
             --out /output/exports/ml/sft --precision f32 --shard-size-mb 2000"
        );
        // Where the workers wrote their checkpoints.
        assert_eq!(
            worker_config(&j).checkpoint.dir,
            "/var/lib/moe/runs/ml/sft/checkpoints"
        );
        let claims: Vec<(String, bool)> = pod
            .volumes
            .iter()
            .flatten()
            .filter_map(|v| {
                let c = v.persistent_volume_claim.as_ref()?;
                Some((c.claim_name.clone(), c.read_only == Some(true)))
            })
            .collect();
        assert_eq!(claims, [("ckpt".into(), true), ("models".into(), false)]);
        assert_eq!(pod.automount_service_account_token, Some(false));
        // training.evaluation.keepBest: the best checkpoint, as reported.
        let mut best = j.clone();
        best.spec.training.evaluation = Some(
            serde_json::from_value(serde_json::json!({"intervalSteps": 10, "keepBest": true}))
                .unwrap(),
        );
        assert!(
            export_command(&best)
                .unwrap()
                .ends_with(&["--shard-size-mb".into(), "2000".into()])
        );
        best.status = Some(moe_crds::MoETrainingJobStatus {
            progress: Some(moe_crds::TrainingProgress {
                best_checkpoint_step: Some(40),
                last_checkpoint_step: Some(90),
                ..Default::default()
            }),
            ..Default::default()
        });
        assert!(
            export_command(&best)
                .unwrap()
                .join(" ")
                .ends_with("--shard-size-mb 2000 --checkpoint-step 40")
        );
        // output.huggingface.adapterOnly: a LoRA run's adapters alone.
        let mut adapters = j.clone();
        if let Some(output) = adapters
            .spec
            .output
            .as_mut()
            .and_then(|o| o.huggingface.as_mut())
        {
            output.adapter_only = true;
        }
        assert!(
            export_command(&adapters)
                .unwrap()
                .join(" ")
                .ends_with("--shard-size-mb 2000 --adapter-only")
        );
        assert!(
            pod.tolerations.is_none() && pod.node_selector.is_none(),
            "no GPU"
        );
        // A shard, twelve bytes per value of the largest tensor (the
        // embedding: vocab × hidden), 1 GiB: far below the model's size.
        let largest = u64::try_from(j.spec.model.vocab_size * j.spec.model.hidden_size).unwrap();
        let memory = &container
            .resources
            .as_ref()
            .unwrap()
            .limits
            .as_ref()
            .unwrap()["memory"];
        assert_eq!(
            memory.0,
            format!(
                "{}Mi",
                (2_000_000_000 + 12 * largest + (1 << 30)).div_ceil(1 << 20)
            )
        );
        // Without output.huggingface, no export.
        assert!(export_job(&job(serde_json::json!({})), &BuildContext::default()).is_none());
    }

    #[test]
    fn workers_have_two_minutes_to_checkpoint_after_sigterm_unless_the_job_says() {
        let grace = |j: &MoETrainingJob| template(j).spec.unwrap().termination_grace_period_seconds;
        let mut j = job(serde_json::json!({}));
        assert_eq!(grace(&j), Some(120));
        j.spec.worker.termination_grace_period_seconds = Some(900);
        assert_eq!(grace(&j), Some(900));
    }

    #[test]
    fn a_pretrained_model_is_downloaded_by_its_own_init_container_beside_the_datasets() {
        let mut v = moe_crds::fixtures::valid_training_job();
        moe_crds::fixtures::merge_patch(
            &mut v,
            &serde_json::json!({"metadata": {"name": "tune", "namespace": "ml", "uid": "u-1"},
            "spec": {
                "model": {"initFrom": {"huggingface": {"repo": "org/base", "revision": "v1",
                    "tokenSecret": {"name": "hf"}, "cacheClaimName": "models"}}},
                "data": {"builtin": null, "huggingface": {"repo": "org/corpus", "path": "train"}}
            }}),
        );
        let j: MoETrainingJob = serde_json::from_value(v).unwrap();
        assert_eq!(
            worker_config(&j).init_dir.as_deref(),
            Some(PINNED_INIT_LINK)
        );
        let t = template(&j);
        let spec = t.spec.as_ref().unwrap();
        let init = spec.init_containers.as_ref().unwrap();
        let names: Vec<&str> = init.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [hub::DOWNLOAD_CONTAINER, hub::MODEL_DOWNLOAD_CONTAINER]
        );
        let model = &init[1];
        assert_eq!(
            model.command.as_ref().unwrap().join(" "),
            "moe-worker fetch --repo org/base --revision v1 --into /init/huggingface --link /run/moe/init"
        );
        let token = model
            .env
            .as_ref()
            .and_then(|e| e.first())
            .and_then(|e| e.value_from.as_ref());
        assert_eq!(
            token
                .and_then(|t| t.secret_key_ref.as_ref())
                .map(|s| s.name.as_str()),
            Some("hf")
        );
        let mounts = |c: &Container| -> Vec<(String, String, bool)> {
            c.volume_mounts
                .iter()
                .flatten()
                .map(|m| {
                    (
                        m.name.clone(),
                        m.mount_path.clone(),
                        m.read_only == Some(true),
                    )
                })
                .collect()
        };
        assert!(mounts(model).contains(&("init".into(), INIT_MOUNT.into(), false)));
        let worker = mounts(&spec.containers[0]);
        assert!(
            worker.contains(&("init".into(), INIT_MOUNT.into(), true)),
            "{worker:?}"
        );
        // One pod-local volume of links, for both downloads.
        let volumes: Vec<&str> = spec
            .volumes
            .iter()
            .flatten()
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(
            volumes.iter().filter(|v| **v == hub::PINNED_VOLUME).count(),
            1
        );
        assert_eq!(
            worker.iter().filter(|m| m.0 == hub::PINNED_VOLUME).count(),
            1
        );
        let claim = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "init")
            .and_then(|v| v.persistent_volume_claim.clone())
            .unwrap();
        assert_eq!(
            (claim.claim_name.as_str(), claim.read_only),
            ("models", Some(false))
        );
    }

    #[test]
    fn a_pretrained_model_on_a_claim_is_mounted_read_only_and_read_in_place() {
        let mut j = job(serde_json::json!({}));
        j.spec.model.init_from = Some(
            serde_json::from_value(serde_json::json!({
                "volume": {"claimName": "models", "path": "/mixtral-8x7b/"}}))
            .unwrap(),
        );
        assert_eq!(
            worker_config(&j).init_dir.as_deref(),
            Some("/init/mixtral-8x7b")
        );
        let t = template(&j);
        let spec = t.spec.as_ref().unwrap();
        // Nothing to download, so no link either.
        assert!(spec.init_containers.is_none());
        let volumes: Vec<&Volume> = spec.volumes.iter().flatten().collect();
        assert!(volumes.iter().all(|v| v.name != hub::PINNED_VOLUME));
        let claim = volumes
            .iter()
            .find(|v| v.name == "init")
            .and_then(|v| v.persistent_volume_claim.clone())
            .unwrap();
        assert_eq!(
            (claim.claim_name.as_str(), claim.read_only),
            ("models", Some(true))
        );
        let mount = spec.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "init")
            .unwrap();
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            (INIT_MOUNT, Some(true))
        );
    }

    /// `model.initFrom.fromTrainingJob`: the other job's claim, read-only,
    /// and its pinned checkpoint (`status.initCheckpoint`) as `initDir`;
    /// unresolved (no attempt starts then), an empty directory a worker
    /// would refuse rather than train from scratch.
    #[test]
    fn a_job_starting_from_another_reads_its_pinned_checkpoint_from_its_claim() {
        let mut j = job(serde_json::json!({}));
        j.spec.model.init_from = Some(
            serde_json::from_value(serde_json::json!({"fromTrainingJob": {"name": "pretrain"}}))
                .unwrap(),
        );
        let init_volume = |j: &MoETrainingJob| {
            template(j)
                .spec
                .unwrap()
                .volumes
                .into_iter()
                .flatten()
                .find(|v| v.name == "init")
                .unwrap()
        };
        assert_eq!(worker_config(&j).init_dir.as_deref(), Some(INIT_MOUNT));
        assert!(init_volume(&j).empty_dir.is_some());
        j.status = Some(moe_crds::MoETrainingJobStatus {
            init_checkpoint: Some(moe_crds::InitCheckpoint {
                job: "ml/pretrain".into(),
                uid: "u".into(),
                step: 1000,
                claim_name: "ckpt".into(),
                path: "runs/ml/pretrain/checkpoints/step-00001000".into(),
            }),
            ..Default::default()
        });
        assert_eq!(
            worker_config(&j).init_dir.as_deref(),
            Some("/init/runs/ml/pretrain/checkpoints/step-00001000")
        );
        let claim = init_volume(&j).persistent_volume_claim.unwrap();
        assert_eq!(
            (claim.claim_name.as_str(), claim.read_only),
            ("ckpt", Some(true))
        );
        assert!(template(&j).spec.unwrap().init_containers.is_none());
    }

    #[test]
    fn a_spare_job_asks_for_a_workers_room_and_runs_nothing() {
        let mut j = job(serde_json::json!({
            "nodeSelector": {"pool": "a"},
            "topology": {"required": "topology.moe.dev/rack"}
        }));
        j.spec.parallelism.nodes = 4;
        let ctx = BuildContext::default();
        let spare = spare_job(&j, &ctx, 1, 2);
        assert_eq!(spare.name_any(), "big-a1-spare");
        let job_labels = spare.labels().clone();
        assert_eq!(job_labels.get(labels::ROLE).unwrap(), labels::ROLE_SPARE);
        assert_eq!(job_labels.get(labels::SPARE_FOR_ATTEMPT).unwrap(), "1");
        assert!(!job_labels.contains_key(labels::ATTEMPT));
        let spec = spare.spec.unwrap();
        assert_eq!((spec.completions, spec.parallelism), (Some(2), Some(2)));
        let pod_labels = spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .clone()
            .unwrap();
        // Not one of the attempt's workers: nothing that reads those finds it.
        assert!(!pod_labels.contains_key(labels::ATTEMPT));
        assert_eq!(pod_labels.get(labels::ROLE).unwrap(), labels::ROLE_SPARE);
        let pod = spec.template.spec.unwrap();
        let worker = attempt_job(&j, &ctx, whole(&j, 1))
            .spec
            .unwrap()
            .template
            .spec
            .unwrap();
        // The worker's room and place: resources, node selector, tolerations,
        // priority, and the affinity to attempt 1's workers (one rack).
        assert_eq!(pod.containers.len(), 1);
        let c = &pod.containers[0];
        assert_eq!(c.command, Some(vec!["moe-worker".into(), "hold".into()]));
        assert_eq!(c.image, worker.containers[0].image);
        assert_eq!(c.resources, worker.containers[0].resources);
        assert_eq!(c.security_context, worker.containers[0].security_context);
        assert_eq!(pod.node_selector, worker.node_selector);
        assert_eq!(pod.tolerations, worker.tolerations);
        assert_eq!(pod.priority_class_name, worker.priority_class_name);
        assert_eq!(pod.security_context, worker.security_context);
        let selects = pod_affinity(&PodTemplateSpec {
            metadata: None,
            spec: Some(pod.clone()),
        })
        .and_then(|a| a.required_during_scheduling_ignored_during_execution)
        .and_then(|terms| terms.first()?.label_selector.clone()?.match_labels);
        assert_eq!(
            selects
                .and_then(|m| m.get(labels::ATTEMPT).cloned())
                .as_deref(),
            Some("1")
        );
        // Nothing else: no volumes, no download, no rendezvous name.
        assert!(pod.volumes.is_none() && pod.init_containers.is_none() && pod.subdomain.is_none());
        // Not queued: created to be scheduled.
        assert_eq!(spec.suspend, None);
        assert!(!job_labels.contains_key(labels::KUEUE_QUEUE_NAME));
    }

    /// A queued job's spares wait for Kueue like its attempts: suspended in
    /// its queue, with its preferred topology, so they run only when the
    /// quota holds them beside the attempt.
    #[test]
    fn a_queued_jobs_spares_wait_in_its_queue() {
        let mut j = job(serde_json::json!({
            "queueName": "gpus",
            "topology": {"preferred": "topology.moe.dev/block"}
        }));
        j.spec.parallelism.nodes = 4;
        let spare = spare_job(&j, &BuildContext::default(), 1, 2);
        assert_eq!(
            spare
                .labels()
                .get(labels::KUEUE_QUEUE_NAME)
                .map(String::as_str),
            Some("gpus")
        );
        let spec = spare.spec.unwrap();
        assert_eq!(spec.suspend, Some(true));
        let annotations = spec.template.metadata.unwrap().annotations.unwrap();
        assert_eq!(
            annotations,
            BTreeMap::from([(
                labels::KUEUE_PREFERRED_TOPOLOGY.to_string(),
                "topology.moe.dev/block".to_string()
            )])
        );
    }

    /// The worker reads `data.volume.path` and `tokenizerFile` inside
    /// `dataDir` (worker/src/settings.rs), so `dataDir` is where the claim
    /// is mounted, not the path within it (which it once was: the worker
    /// then looked for `/data/<path>/<path>`).
    #[test]
    fn the_data_claim_is_mounted_at_the_data_dir_the_worker_reads_paths_in() {
        let mut v = moe_crds::fixtures::valid_training_job();
        moe_crds::fixtures::merge_patch(
            &mut v,
            &serde_json::json!({"metadata": {"name": "big", "namespace": "ml", "uid": "u-1"},
                "spec": {"data": {"builtin": null,
                    "volume": {"claimName": "corpus", "path": "/fineweb10B/"},
                    "tokenizer": "pretokenized", "tokenizerFile": "gpt2/tokenizer.json"}}}),
        );
        let j: MoETrainingJob = serde_json::from_value(v).unwrap();
        let config = worker_config(&j);
        assert_eq!(config.data_dir.as_deref(), Some(DATA_MOUNT));
        assert_eq!(config.data.volume.as_ref().unwrap().path, "/fineweb10B/");
        let t = template(&j);
        let spec = t.spec.as_ref().unwrap();
        let mount = spec.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "data")
            .unwrap();
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            (DATA_MOUNT, Some(true))
        );
        let claim = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "data")
            .and_then(|v| v.persistent_volume_claim.as_ref())
            .unwrap();
        assert_eq!(claim.claim_name, "corpus");
    }

    /// A Hub dataset: each pod's init container downloads the path and the
    /// tokenizer (the token from its Secret only) into the data volume and
    /// links the commit; the worker reads through the link, read-only.
    #[test]
    fn a_hub_dataset_is_downloaded_by_an_init_container_and_read_through_the_pods_link() {
        let hub_job = |hub: serde_json::Value| {
            let mut v = moe_crds::fixtures::valid_training_job();
            moe_crds::fixtures::merge_patch(
                &mut v,
                &serde_json::json!({"metadata": {"name": "big", "namespace": "ml", "uid": "u-1"},
                    "spec": {"data": {"builtin": null, "huggingface": hub,
                        "tokenizer": "pretokenized", "tokenizerFile": "/gpt2/tokenizer.json"}}}),
            );
            serde_json::from_value::<MoETrainingJob>(v).unwrap()
        };
        let j = hub_job(serde_json::json!({"repo": "org/corpus", "revision": "v2",
            "path": "sample/10BT", "tokenSecret": {"name": "hf"}, "cacheClaimName": "hub-cache",
            "endpoint": "http://hub.internal"}));
        assert_eq!(
            worker_config(&j).data_dir.as_deref(),
            Some(PINNED_DATA_LINK)
        );
        let t = template(&j);
        let spec = t.spec.as_ref().unwrap();
        let init = spec.init_containers.as_ref().unwrap();
        assert_eq!(init.len(), 1);
        let download = &init[0];
        assert_eq!(download.name, hub::DOWNLOAD_CONTAINER);
        assert_eq!(download.image, spec.containers[0].image);
        assert_eq!(
            download.command.as_ref().unwrap().join(" "),
            "moe-worker fetch --repo-type dataset --repo org/corpus --revision v2 --into \
             /data/huggingface --link /run/moe/data --include sample/10BT --include \
             gpt2/tokenizer.json --endpoint http://hub.internal"
        );
        let env = download.env.as_ref().unwrap();
        assert_eq!(env.len(), 1, "the token and nothing else: {env:?}");
        let secret = env[0]
            .value_from
            .as_ref()
            .and_then(|v| v.secret_key_ref.as_ref())
            .unwrap();
        assert_eq!((secret.name.as_str(), secret.key.as_str()), ("hf", "token"));
        assert!(
            spec.containers[0]
                .env
                .iter()
                .flatten()
                .all(|e| e.name != "HF_TOKEN")
        );
        let mount_of = |c: &Container, volume: &str| {
            c.volume_mounts
                .iter()
                .flatten()
                .find(|m| m.name == volume)
                .map(|m| (m.mount_path.clone(), m.read_only == Some(true)))
        };
        for (volume, at) in [("data", DATA_MOUNT), ("pinned", "/run/moe")] {
            assert_eq!(mount_of(download, volume), Some((at.into(), false)));
            assert_eq!(
                mount_of(&spec.containers[0], volume),
                Some((at.into(), true)),
                "the worker only reads {volume}"
            );
        }
        let volume = |name: &str| {
            spec.volumes
                .iter()
                .flatten()
                .find(|v| v.name == name)
                .unwrap()
                .clone()
        };
        let claim = volume("data").persistent_volume_claim.unwrap();
        assert_eq!(
            (claim.claim_name.as_str(), claim.read_only),
            ("hub-cache", Some(false))
        );
        assert!(volume("pinned").empty_dir.is_some());

        // No cache claim: each pod downloads into an emptyDir of its own.
        let j = hub_job(serde_json::json!({"repo": "org/corpus", "path": "train.bin"}));
        let t = template(&j);
        let spec = t.spec.as_ref().unwrap();
        let data = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "data")
            .unwrap();
        assert!(data.empty_dir.is_some() && data.persistent_volume_claim.is_none());
        let init = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!(init.env, None);
        assert!(
            init.command
                .as_ref()
                .unwrap()
                .join(" ")
                .contains("--revision main")
        );
    }

    #[test]
    fn under_the_workload_api_the_attempt_is_one_pod_group_in_one_required_domain() {
        let j = job(serde_json::json!({"topology": {"required": "topology.moe.dev/rack"}}));
        let ctx = workload_api();
        let pg = pod_group(&j, &ctx, 3, j.spec.parallelism.nodes)
            .expect("a gang of 2 nodes has a PodGroup");
        assert_eq!(pg.metadata.name.as_deref(), Some("big-a3"));
        assert_eq!(pg.metadata.namespace.as_deref(), Some("ml"));
        assert_eq!(pg.metadata.labels.as_ref().unwrap()[labels::ATTEMPT], "3");
        assert_eq!(pg.metadata.owner_references.as_ref().unwrap()[0].uid, "u-1");
        assert_eq!(
            pg.spec.scheduling_policy.gang.as_ref().unwrap().min_count,
            2
        );
        let t = attempt_job(&j, &ctx, whole(&j, 3)).spec.unwrap().template;
        let spec = t.spec.as_ref().unwrap();
        assert_eq!(
            spec.scheduling_group
                .as_ref()
                .unwrap()
                .pod_group_name
                .as_deref(),
            Some("big-a3")
        );
        // The group's constraint places the gang: no pod affinity on top.
        assert_eq!(pod_affinity(&t), None);

        // A preferred topology is no constraint of a PodGroup: the pods keep
        // their weighted wish.
        let j = job(serde_json::json!({"topology": {"preferred": "topology.moe.dev/rack"}}));
        let t = attempt_job(&j, &ctx, whole(&j, 0)).spec.unwrap().template;
        assert!(t.spec.as_ref().unwrap().scheduling_group.is_some());
        assert!(
            pod_affinity(&t)
                .unwrap()
                .preferred_during_scheduling_ignored_during_execution
                .is_some()
        );
    }

    #[test]
    fn a_queue_or_the_default_makes_no_pod_group() {
        let queued = job(serde_json::json!({"queueName": "gpus"}));
        assert!(pod_group(&queued, &workload_api(), 0, queued.spec.parallelism.nodes).is_none());
        let t = attempt_job(&queued, &workload_api(), whole(&queued, 0))
            .spec
            .unwrap()
            .template;
        assert!(t.spec.unwrap().scheduling_group.is_none());
        let plain = job(serde_json::json!({}));
        assert!(
            pod_group(
                &plain,
                &BuildContext::default(),
                0,
                plain.spec.parallelism.nodes
            )
            .is_none()
        );
        assert!(template(&plain).spec.unwrap().scheduling_group.is_none());
    }

    #[test]
    fn a_required_topology_keeps_the_attempt_with_its_first_pod() {
        let t = template(&job(
            serde_json::json!({"topology": {"required": "topology.moe.dev/block"}}),
        ));
        let terms = pod_affinity(&t)
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .unwrap();
        assert_eq!(terms.len(), 1);
        assert_eq!(terms[0].topology_key, "topology.moe.dev/block");
        let selected = terms[0]
            .label_selector
            .as_ref()
            .unwrap()
            .match_labels
            .clone()
            .unwrap();
        // This attempt's pods, all of them, and no other attempt's.
        let own = t.metadata.as_ref().unwrap().labels.clone().unwrap();
        assert!(selected.iter().all(|(k, v)| own.get(k) == Some(v)));
        assert_eq!(selected[labels::JOB_NAME], "big");
        assert_eq!(selected[labels::ATTEMPT], "3");
        // The GPU type's node affinity is still there.
        let node = t.spec.unwrap().affinity.unwrap().node_affinity.unwrap();
        assert!(
            node.required_during_scheduling_ignored_during_execution
                .is_some()
        );
    }

    #[test]
    fn a_preferred_topology_is_a_weighted_wish() {
        let t = template(&job(
            serde_json::json!({"topology": {"preferred": "topology.moe.dev/rack"}}),
        ));
        let affinity = pod_affinity(&t).unwrap();
        assert!(
            affinity
                .required_during_scheduling_ignored_during_execution
                .is_none()
        );
        let wishes = affinity
            .preferred_during_scheduling_ignored_during_execution
            .unwrap();
        assert_eq!(wishes.len(), 1);
        assert_eq!(wishes[0].weight, 100);
        assert_eq!(
            wishes[0].pod_affinity_term.topology_key,
            "topology.moe.dev/rack"
        );
    }

    #[test]
    fn a_queued_topology_is_left_to_kueue() {
        let t = template(&job(serde_json::json!({
            "queueName": "gpus",
            "topology": {"required": "topology.moe.dev/block"}
        })));
        assert_eq!(pod_affinity(&t), None);
        let annotations = t.metadata.unwrap().annotations.unwrap();
        assert_eq!(
            annotations
                .get(labels::KUEUE_REQUIRED_TOPOLOGY)
                .map(String::as_str),
            Some("topology.moe.dev/block")
        );
        assert!(!annotations.contains_key(labels::KUEUE_PREFERRED_TOPOLOGY));

        let t = template(&job(serde_json::json!({
            "queueName": "gpus",
            "topology": {"preferred": "topology.moe.dev/rack"}
        })));
        let annotations = t.metadata.unwrap().annotations.unwrap();
        assert_eq!(
            annotations
                .get(labels::KUEUE_PREFERRED_TOPOLOGY)
                .map(String::as_str),
            Some("topology.moe.dev/rack")
        );
    }

    #[test]
    fn expert_groups_become_kueue_slices_of_whole_nodes() {
        let mut j = job(serde_json::json!({
            "queueName": "gpus",
            "topology": {"required": "topology.moe.dev/block", "expertGroups": "topology.moe.dev/rack"}
        }));
        j.spec.parallelism.nodes = 4;
        j.spec.parallelism.processes_per_node = 8;
        j.spec.parallelism.expert_parallel = 16;
        let annotations = template(&j).metadata.unwrap().annotations.unwrap();
        assert_eq!(
            annotations
                .get(labels::KUEUE_SLICE_TOPOLOGY)
                .map(String::as_str),
            Some("topology.moe.dev/rack")
        );
        // 16 ranks of 8 per node: each expert group is 2 consecutive nodes.
        assert_eq!(
            annotations
                .get(labels::KUEUE_SLICE_SIZE)
                .map(String::as_str),
            Some("2")
        );
        assert_eq!(
            annotations
                .get(labels::KUEUE_REQUIRED_TOPOLOGY)
                .map(String::as_str),
            Some("topology.moe.dev/block")
        );
    }

    #[test]
    fn without_topology_there_is_no_pod_affinity_or_annotation() {
        let t = template(&job(serde_json::json!({"queueName": "gpus"})));
        assert_eq!(pod_affinity(&t), None);
        assert_eq!(t.metadata.unwrap().annotations, None);
    }
}
