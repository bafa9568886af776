//! Pure builders (no client): the objects a MoETrainingJob becomes.
//!
//! ```text
//! MoETrainingJob <name>
//!  ├── ConfigMap <name>-config      worker config (config.json), the worker contract
//!  ├── Service   <name>             headless; pod DNS <name>-a<N>-<index>.<name>
//!  └── Job       <name>-a<N>        Indexed, one pod per node, backoffLimit 0:
//!       └── Pod  <name>-a<N>-<i>-*  one failed pod fails the attempt (gang)
//! ```
//!
//! `moectl render` prints exactly these, so users can review what the operator will create.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement,
    PodFailurePolicyOnPodConditionsPattern, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort,
    EmptyDirVolumeSource, EnvVar, EnvVarSource, NodeAffinity, NodeSelector,
    NodeSelectorRequirement, NodeSelectorTerm, ObjectFieldSelector,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec,
    ResourceRequirements, SeccompProfile, SecurityContext, Service, ServicePort, ServiceSpec,
    Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use moe_crds::contract::{self, CONFIG_PATH, COORDINATOR_PORT, METRICS_PORT, env};
use moe_crds::{CheckpointConfig, Device, MoETrainingJob, WorkerConfig};

use crate::labels;

/// Operator-wide settings the builders need (from the chart's values).
#[derive(Clone, Debug)]
pub struct BuildContext {
    /// Worker image used when `spec.worker.image` is unset.
    pub default_worker_image: String,
}

impl Default for BuildContext {
    fn default() -> Self {
        Self {
            default_worker_image: format!(
                "ghcr.io/moe-operator/moe-worker:{}",
                env!("CARGO_PKG_VERSION")
            ),
        }
    }
}

/// Where the checkpoint volume is mounted in worker containers.
pub const STATE_MOUNT: &str = "/var/lib/moe";
/// Where a `data.volume` claim is mounted (read-only).
pub const DATA_MOUNT: &str = "/data";
const CONTAINER: &str = "worker";
/// UID/GID of the worker (the distroless `nonroot` user).
const WORKER_UID: i64 = 65532;

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

/// The worker config, resolved for paths inside the container.
pub fn worker_config(job: &MoETrainingJob) -> WorkerConfig {
    let spec = &job.spec;
    let ns = job.namespace().unwrap_or_default();
    let base = [
        STATE_MOUNT,
        spec.checkpoint.path.trim_matches('/'),
        &ns,
        &job.name_any(),
    ]
    .iter()
    .filter(|p| !p.is_empty())
    .cloned()
    .collect::<Vec<_>>()
    .join("/");
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
        data_dir: spec.data.volume.as_ref().map(|v| {
            let p = v.path.trim_matches('/');
            if p.is_empty() {
                DATA_MOUNT.to_string()
            } else {
                format!("{DATA_MOUNT}/{p}")
            }
        }),
        output_dir: base,
    }
}

/// The config file's text, and a short hash of it (stamped on attempt Jobs).
pub fn worker_config_json(job: &MoETrainingJob) -> (String, String) {
    let text =
        serde_json::to_string_pretty(&worker_config(job)).expect("WorkerConfig always serialises");
    let hash = fnv1a64(text.as_bytes());
    (text, format!("{hash:016x}"))
}

/// FNV-1a: a stable, dependency-free content hash; not for security.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
    })
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

/// The Indexed Job of one attempt: `nodes` pods, each running
/// `processesPerNode` worker processes.
pub fn attempt_job(
    job: &MoETrainingJob,
    ctx: &BuildContext,
    attempt: i32,
    counters: Counters,
) -> Job {
    let spec = &job.spec;
    let nodes = spec.parallelism.nodes;
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
            template: pod_template(job, ctx, attempt),
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

/// How long worker pods stay on a NotReady or unreachable node before they
/// are evicted. A gang cannot make progress without every rank, so waiting
/// the cluster default (300 s) only delays the restart on healthy nodes.
pub const NODE_LOSS_TOLERATION_SECONDS: i64 = 30;

fn pod_template(job: &MoETrainingJob, ctx: &BuildContext, attempt: i32) -> PodTemplateSpec {
    let spec = &job.spec;
    let worker = &spec.worker;
    let mut pod_labels = worker.pod_metadata.labels.clone();
    pod_labels.extend(child_labels(job));
    pod_labels.insert(labels::ATTEMPT.into(), attempt.to_string());
    pod_labels.insert(labels::ROLE.into(), labels::ROLE_WORKER.into());
    let annotations = (!worker.pod_metadata.annotations.is_empty())
        .then(|| worker.pod_metadata.annotations.clone());

    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(pod_labels),
            annotations,
            ..Default::default()
        }),
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            subdomain: Some(service_name(job)),
            service_account_name: worker.service_account_name.clone(),
            // Workers never talk to the API: progress is read from rank 0 by the operator.
            automount_service_account_token: Some(false),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(WORKER_UID),
                run_as_group: Some(WORKER_UID),
                fs_group: Some(WORKER_UID),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            node_selector: (!spec.placement.node_selector.is_empty())
                .then(|| spec.placement.node_selector.clone()),
            affinity: affinity(job),
            tolerations: tolerations(job),
            priority_class_name: spec.placement.priority_class_name.clone(),
            scheduler_name: spec.placement.scheduler_name.clone(),
            containers: vec![container(job, ctx, attempt)],
            volumes: Some(volumes(job)),
            ..Default::default()
        }),
    }
}

/// The user's affinity, with the GPU type ANDed into every required node selector term.
fn affinity(job: &MoETrainingJob) -> Option<Affinity> {
    let placement = &job.spec.placement;
    let Some(gpu) = placement.gpu_type else {
        return placement.affinity.clone();
    };
    let requirement = NodeSelectorRequirement {
        key: "nvidia.com/gpu.product".into(),
        operator: "In".into(),
        values: Some(vec![gpu.product_label().into()]),
    };
    let mut affinity = placement.affinity.clone().unwrap_or_default();
    let node = affinity
        .node_affinity
        .get_or_insert_with(NodeAffinity::default);
    let required = node
        .required_during_scheduling_ignored_during_execution
        .get_or_insert_with(|| NodeSelector {
            node_selector_terms: vec![],
        });
    if required.node_selector_terms.is_empty() {
        required
            .node_selector_terms
            .push(NodeSelectorTerm::default());
    }
    for term in &mut required.node_selector_terms {
        term.match_expressions
            .get_or_insert_with(Vec::new)
            .push(requirement.clone());
    }
    Some(affinity)
}

fn tolerations(job: &MoETrainingJob) -> Option<Vec<Toleration>> {
    let mut out = job.spec.placement.tolerations.clone();
    for key in [
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
    ] {
        if !out.iter().any(|t| t.key.as_deref() == Some(key)) {
            out.push(Toleration {
                key: Some(key.into()),
                operator: Some("Exists".into()),
                effect: Some("NoExecute".into()),
                toleration_seconds: Some(NODE_LOSS_TOLERATION_SECONDS),
                ..Default::default()
            });
        }
    }
    if job.spec.worker.device == Device::Cuda
        && !out
            .iter()
            .any(|t| t.key.as_deref() == Some("nvidia.com/gpu"))
    {
        out.push(Toleration {
            key: Some("nvidia.com/gpu".into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        });
    }
    (!out.is_empty()).then_some(out)
}

fn container(job: &MoETrainingJob, ctx: &BuildContext, attempt: i32) -> Container {
    let worker = &job.spec.worker;
    let mut resources = worker.resources.clone().unwrap_or_default();
    if worker.device == Device::Cuda {
        // One process per GPU: the GPU count follows processesPerNode, whatever the user wrote.
        let gpus = Quantity(job.spec.parallelism.processes_per_node.to_string());
        resources
            .limits
            .get_or_insert_with(BTreeMap::new)
            .insert("nvidia.com/gpu".into(), gpus.clone());
        if let Some(requests) = resources.requests.as_mut() {
            requests.insert("nvidia.com/gpu".into(), gpus);
        }
    }
    let mut mounts = vec![
        mount("config", "/etc/moe", true),
        mount("state", STATE_MOUNT, false),
        mount("shm", "/dev/shm", false),
        mount("tmp", "/tmp", false),
    ];
    if job.spec.data.volume.is_some() {
        mounts.push(mount("data", DATA_MOUNT, true));
    }
    Container {
        name: CONTAINER.into(),
        image: Some(
            worker
                .image
                .clone()
                .unwrap_or_else(|| ctx.default_worker_image.clone()),
        ),
        image_pull_policy: worker.image_pull_policy.map(|p| p.as_str().to_string()),
        command: Some(vec![
            "moe-worker".into(),
            "train".into(),
            "--config".into(),
            CONFIG_PATH.into(),
        ]),
        env: Some(env_vars(job, attempt)),
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
        resources: Some(ResourceRequirements { ..resources }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            ..Default::default()
        }),
        volume_mounts: Some(mounts),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..Default::default()
    }
}

fn plain(name: &str, value: impl ToString) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.to_string()),
        ..Default::default()
    }
}

/// The worker environment contract ([`contract::env`]), then NCCL settings, then the user's env.
pub fn env_vars(job: &MoETrainingJob, attempt: i32) -> Vec<EnvVar> {
    let p = &job.spec.parallelism;
    let mut out = vec![
        plain(env::WORLD_SIZE, p.world_size()),
        plain(env::NODES, p.nodes),
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
    let nccl = &job.spec.worker.nccl;
    if let Some(v) = &nccl.socket_ifname {
        out.push(plain("NCCL_SOCKET_IFNAME", v));
    }
    if let Some(v) = &nccl.ib_hca {
        out.push(plain("NCCL_IB_HCA", v));
    }
    if let Some(v) = nccl.debug {
        out.push(plain(
            "NCCL_DEBUG",
            serde_json::to_value(v)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
        ));
    }
    out.extend(nccl.env.iter().map(|(k, v)| plain(k, v)));
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
    out
}

fn empty_dir(name: &str, medium: Option<&str>, size: Option<String>) -> Volume {
    Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: medium.map(String::from),
            size_limit: size.map(Quantity),
        }),
        ..Default::default()
    }
}

/// Kind and API version of the owner, for selecting children by owner reference.
pub fn owner_api_version() -> String {
    MoETrainingJob::api_version(&()).to_string()
}
