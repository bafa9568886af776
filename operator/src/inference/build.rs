//! Pure builders (no client): the objects a MoEInferenceService becomes.
//!
//! ```text
//! MoEInferenceService <name>
//!  ├── ConfigMap  <name>-config   server config (config.json), the serving contract
//!  ├── Service    <name>          ClusterIP: the stable endpoint, ready pods only
//!  ├── Deployment <name>          one pod per replica (podsPerReplica == 1), rolling
//!  │    └── Pod   <name>-*        updates within rollout.maxUnavailable/maxSurge
//!  ├── PodDisruptionBudget <name> voluntary evictions one replica at a time (at least)
//!  └── HorizontalPodAutoscaler <name>  (autoscaling set) scales this resource's /scale
//! ```
//!
//! Pod placement and Pod Security come from [`crate::pods`], shared with
//! training. `moectl render` prints exactly these objects.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec,
    MetricIdentifier, MetricSpec, MetricTarget, PodsMetricSource,
};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, PersistentVolumeClaimVolumeSource, PodSpec,
    PodTemplateSpec, Probe, Service, ServicePort, ServiceSpec, Volume,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use moe_crds::contract::{
    self, CONFIG_PATH, COORDINATOR_PORT, HEALTH_PATH, METRICS_PORT, READY_PATH, env,
};
use moe_crds::{
    MoEInferenceService, ModelFormat, ModelSpec, ServingAdapter, ServingConfig, TrainedWith,
};

use super::adapters::{self, ResolvedAdapter};

use crate::gang::{self, Mechanism};
pub use crate::hub::HUB_DIR;
use crate::hub::{Download, PINNED_MOUNT, PINNED_VOLUME};
use crate::labels;
use crate::pods::{
    BuildContext, affinity, container_security_context, empty_dir, fnv1a64,
    kueue_topology_annotation, mount, nccl_env, plain, pod_security_context, resource_claims,
    resources, tolerations,
};

/// Where the model claim is mounted (read-only) in server containers.
pub const MODEL_MOUNT: &str = "/models";
pub const SERVER_CONTAINER: &str = "server";
pub use crate::hub::DOWNLOAD_CONTAINER;
/// The worker's metric the autoscaler reads (through a custom metrics adapter).
pub const CONCURRENCY_METRIC: &str = "moe_serving_inflight_requests";
/// Probe period of the startup probe; its failure threshold is the startup budget divided by it.
const STARTUP_PERIOD_SECONDS: i32 = 10;
/// A server pod's time to finish the requests in flight after SIGTERM,
/// unless `worker.terminationGracePeriodSeconds` says otherwise.
const SERVER_GRACE_SECONDS: i64 = 60;

/// The model a service serves, resolved from its source.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedModel {
    /// The claim holding the weights; `None`: an emptyDir that
    /// [`Self::download`] fills.
    pub claim_name: Option<String>,
    /// A Hub model each pod's init container downloads into the model
    /// volume (read-write for it only) before the server starts.
    pub download: Option<moe_crds::HuggingFaceModel>,
    /// Directory of the weights inside the claim.
    pub path: String,
    pub format: ModelFormat,
    /// Checkpoint step to load (unset: the newest; a training job's is always pinned).
    pub checkpoint_step: Option<i64>,
    /// Model shape when known ahead (a training job's).
    pub model: Option<ModelSpec>,
    /// What else a training job's checkpoint carries (tokenizer, precision, step).
    pub trained: Option<TrainedWith>,
    /// Shown in `status.modelRevision` and stamped on the pod template, so a
    /// new model rolls the replicas.
    pub revision: String,
    /// `spec.adapters`, resolved (`inference/adapters.rs`).
    pub adapters: Vec<ResolvedAdapter>,
}

impl ResolvedModel {
    /// Whether the pod downloads something (the model, an adapter), and so
    /// holds the links to what it fetched.
    pub fn pinned(&self) -> bool {
        self.download.is_some() || adapters::downloads_any(&self.adapters)
    }

    /// Directory of the weights inside the container: a downloaded model's
    /// is the pod's own link to the commit its download resolved.
    pub fn dir(&self) -> String {
        if self.download.is_some() {
            return PINNED_MODEL_LINK.to_string();
        }
        let p = self.path.trim_matches('/');
        if p.is_empty() {
            MODEL_MOUNT.to_string()
        } else {
            format!("{MODEL_MOUNT}/{p}")
        }
    }
}

pub fn config_map_name(svc: &MoEInferenceService) -> String {
    format!("{}-config", svc.name_any())
}

/// The Service, Deployment, PDB and HPA share the resource's name.
pub fn child_name(svc: &MoEInferenceService) -> String {
    svc.name_any()
}

/// Labels selecting the server pods of `svc` (Service, Deployment, PDB, `/scale`).
pub fn selector_labels(svc: &MoEInferenceService) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::SERVICE_NAME.to_string(), svc.name_any()),
        (labels::ROLE.to_string(), labels::ROLE_SERVER.to_string()),
    ])
}

/// Labels of the pods that take requests: every server pod, or with replica
/// groups only the leaders (index 0). The stable Service and `/scale` select them.
pub fn serving_labels(svc: &MoEInferenceService) -> BTreeMap<String, String> {
    let mut out = selector_labels(svc);
    if svc.spec.parallelism.pods_per_replica > 1 {
        out.insert(labels::POD_INDEX.into(), "0".into());
    }
    out
}

/// [`serving_labels`] as a label selector string, for `status.selector`.
pub fn selector_string(svc: &MoEInferenceService) -> String {
    serving_labels(svc)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The stable in-cluster URL of the service.
pub fn url(svc: &MoEInferenceService) -> String {
    format!(
        "http://{}.{}.svc:{}",
        child_name(svc),
        svc.namespace().unwrap_or_default(),
        svc.spec.serving.port
    )
}

pub fn child_meta(svc: &MoEInferenceService, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: svc.namespace(),
        labels: Some(BTreeMap::from([
            (labels::MANAGED_BY.into(), labels::MANAGED_BY_VALUE.into()),
            (labels::SERVICE_NAME.into(), svc.name_any()),
        ])),
        owner_references: Some(vec![
            svc.controller_owner_ref(&())
                .expect("a MoEInferenceService read from the API has a name and uid"),
        ]),
        ..Default::default()
    }
}

/// [`child_meta`], with Kueue's queue label when the service is queued: on
/// the Deployment and the group StatefulSets, the objects Kueue admits.
pub fn queued_meta(svc: &MoEInferenceService, name: String) -> ObjectMeta {
    let mut meta = child_meta(svc, name);
    if let Some(queue) = &svc.spec.placement.queue_name {
        meta.labels
            .get_or_insert_with(BTreeMap::new)
            .insert(labels::KUEUE_QUEUE_NAME.into(), queue.clone());
    }
    meta
}

/// The server config, resolved for paths inside the container.
pub fn serving_config(svc: &MoEInferenceService, model: &ResolvedModel) -> ServingConfig {
    let spec = &svc.spec;
    ServingConfig {
        service: format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any()),
        model_dir: model.dir(),
        format: model.format,
        checkpoint_step: model.checkpoint_step,
        model: model.model.clone(),
        trained: model.trained.clone(),
        parallelism: spec.parallelism.clone(),
        // The schema bounds the port to 1024..=65535.
        port: u16::try_from(spec.serving.port).unwrap_or(contract::SERVING_PORT),
        max_batch_tokens: spec.serving.max_batch_tokens,
        max_concurrent_requests: spec.serving.max_concurrent_requests,
        precision: spec.serving.precision,
        device: spec.worker.device,
        prefix_caching: spec.serving.prefix_caching,
        adapters: adapters::dirs(&model.adapters)
            .into_iter()
            .zip(&model.adapters)
            .map(|((name, dir), a)| ServingAdapter {
                name,
                dir,
                revision: a.revision.clone(),
            })
            .collect(),
    }
}

/// The config file's text, and a short hash of it (stamped on the pod template).
pub fn serving_config_json(svc: &MoEInferenceService, model: &ResolvedModel) -> (String, String) {
    let text = serde_json::to_string_pretty(&serving_config(svc, model))
        .expect("ServingConfig always serialises");
    let hash = fnv1a64(text.as_bytes());
    (text, format!("{hash:016x}"))
}

pub fn config_map(svc: &MoEInferenceService, model: &ResolvedModel) -> ConfigMap {
    let (text, _) = serving_config_json(svc, model);
    ConfigMap {
        metadata: child_meta(svc, config_map_name(svc)),
        data: Some(BTreeMap::from([("config.json".to_string(), text)])),
        ..Default::default()
    }
}

/// The stable endpoint: a ClusterIP Service over the ready server pods.
pub fn service(svc: &MoEInferenceService) -> Service {
    Service {
        metadata: child_meta(svc, child_name(svc)),
        spec: Some(ServiceSpec {
            selector: Some(serving_labels(svc)),
            ports: Some(vec![
                ServicePort {
                    name: Some("http".into()),
                    port: svc.spec.serving.port,
                    target_port: Some(IntOrString::String("http".into())),
                    ..Default::default()
                },
                ServicePort {
                    name: Some("metrics".into()),
                    port: METRICS_PORT.into(),
                    target_port: Some(IntOrString::String("metrics".into())),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The replicas, one pod each, rolled within `rollout`.
pub fn deployment(
    svc: &MoEInferenceService,
    ctx: &BuildContext,
    model: &ResolvedModel,
) -> Deployment {
    let spec = &svc.spec;
    let mut meta = queued_meta(svc, child_name(svc));
    meta.annotations = Some(BTreeMap::from([(
        labels::MODEL_REVISION.into(),
        model.revision.clone(),
    )]));
    Deployment {
        metadata: meta,
        spec: Some(DeploymentSpec {
            replicas: Some(spec.replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(svc)),
                ..Default::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_unavailable: Some(IntOrString::Int(spec.rollout.max_unavailable)),
                    max_surge: Some(IntOrString::Int(spec.rollout.max_surge)),
                }),
            }),
            // The Deployment reports ProgressDeadlineExceeded past this; a
            // replica may legitimately spend the whole startup budget loading.
            progress_deadline_seconds: Some(spec.serving.startup_timeout_seconds + 600),
            template: pod_template(svc, ctx, model, None),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One incarnation of one replica group (`podsPerReplica > 1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Group {
    pub index: i32,
    pub incarnation: i32,
}

/// The server pod template: of the Deployment (`group` None) or of one group's StatefulSet.
pub fn pod_template(
    svc: &MoEInferenceService,
    ctx: &BuildContext,
    model: &ResolvedModel,
    group: Option<Group>,
) -> PodTemplateSpec {
    let spec = &svc.spec;
    let worker = &spec.worker;
    let (_, config_hash) = serving_config_json(svc, model);
    let mut pod_labels = worker.pod_metadata.labels.clone();
    pod_labels.insert(labels::MANAGED_BY.into(), labels::MANAGED_BY_VALUE.into());
    pod_labels.extend(selector_labels(svc));
    // The pods of one incarnation of one group: what `placement.topology`
    // keeps in one domain (a one-pod replica has nothing to keep together).
    let gang = group.map(|g| {
        let mut gang = selector_labels(svc);
        gang.insert(labels::GROUP.into(), g.index.to_string());
        gang.insert(labels::INCARNATION.into(), g.incarnation.to_string());
        gang
    });
    if let Some(gang) = &gang {
        pod_labels.extend(gang.clone());
    }
    let mut annotations = worker.pod_metadata.annotations.clone();
    // Queued: Kueue admits the replica (a group's pods as one pod group) and,
    // with a topology, places it in one domain itself (no pod affinity then).
    // The Deployment's pods carry the queue themselves (Kueue would copy it
    // there); a group's take it from their StatefulSet, as one pod group.
    let queue = spec.placement.queue_name.as_ref();
    if let (Some(queue), None) = (queue, group) {
        pod_labels.insert(labels::KUEUE_QUEUE_NAME.into(), queue.clone());
    }
    // A group without a queue: all its pods or none, through its PodGroup
    // when the Workload API schedules gangs (crate::gang); a one-pod replica
    // is no gang.
    let gang_pods = group.map_or(1, |_| spec.parallelism.pods_per_replica);
    let mechanism = ctx.gang(&spec.placement, gang_pods);
    annotations.extend(kueue_topology_annotation(&spec.placement));
    // The config's hash and the model revision: a change to either rolls the replicas.
    annotations.insert(labels::CONFIG_HASH.into(), config_hash);
    annotations.insert(labels::MODEL_REVISION.into(), model.revision.clone());
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(pod_labels),
            annotations: Some(annotations),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            service_account_name: worker.service_account_name.clone(),
            // Servers never talk to the API.
            automount_service_account_token: Some(false),
            // Many Services in a namespace would otherwise become many env vars.
            enable_service_links: Some(false),
            // Time to finish the requests in flight after SIGTERM.
            termination_grace_period_seconds: Some(
                worker
                    .termination_grace_period_seconds
                    .unwrap_or(SERVER_GRACE_SECONDS),
            ),
            security_context: Some(pod_security_context()),
            node_selector: (!spec.placement.node_selector.is_empty())
                .then(|| spec.placement.node_selector.clone()),
            affinity: affinity(
                &spec.placement,
                gang.as_ref()
                    .filter(|_| ctx.pod_affinity(mechanism, &spec.placement)),
            ),
            scheduling_group: group
                .filter(|_| mechanism == Mechanism::WorkloadApi)
                .map(|g| gang::scheduling_group(&group_set_name(svc, g))),
            tolerations: tolerations(&spec.placement, worker.device),
            priority_class_name: spec.placement.priority_class_name.clone(),
            scheduler_name: spec.placement.scheduler_name.clone(),
            init_containers: Some(
                model
                    .download
                    .iter()
                    .map(|hub| {
                        crate::hub::download_container(
                            ctx,
                            worker,
                            &Download {
                                container: DOWNLOAD_CONTAINER,
                                repo: &hub.repo,
                                revision: &hub.revision,
                                endpoint: hub.endpoint.as_deref(),
                                token_secret: hub.token_secret.as_ref(),
                                fetches: crate::hub::Fetches::Model,
                                volume: "model",
                                mount_path: MODEL_MOUNT,
                                link: PINNED_MODEL_LINK,
                            },
                        )
                    })
                    .chain(adapters::init_containers(ctx, worker, &model.adapters))
                    .collect::<Vec<_>>(),
            )
            .filter(|c| !c.is_empty()),
            containers: vec![container(svc, ctx, group, model)],
            volumes: Some(volumes(svc, model)),
            resource_claims: resource_claims(worker),
            ..Default::default()
        }),
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(5),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

fn container(
    svc: &MoEInferenceService,
    ctx: &BuildContext,
    group: Option<Group>,
    model: &ResolvedModel,
) -> Container {
    let spec = &svc.spec;
    let worker = &spec.worker;
    // Startup: the whole load budget (liveness waits until it succeeds, so a
    // long MoE load is never killed by it). Liveness: a minute of silence.
    // Readiness: only a replica that has loaded its weights takes traffic.
    let startup_failures = (spec.serving.startup_timeout_seconds + STARTUP_PERIOD_SECONDS - 1)
        / STARTUP_PERIOD_SECONDS;
    Container {
        name: SERVER_CONTAINER.into(),
        image: Some(ctx.image(worker)),
        image_pull_policy: worker.image_pull_policy.map(|p| p.as_str().to_string()),
        command: Some(crate::pods::worker_command(
            "serve",
            worker,
            spec.parallelism.processes_per_pod,
        )),
        env: Some(env_vars(svc, group)),
        ports: Some(
            [
                Some(ContainerPort {
                    name: Some("http".into()),
                    container_port: spec.serving.port,
                    ..Default::default()
                }),
                Some(ContainerPort {
                    name: Some("metrics".into()),
                    container_port: METRICS_PORT.into(),
                    ..Default::default()
                }),
                // The group leader's rendezvous store.
                group.map(|_| ContainerPort {
                    name: Some("rendezvous".into()),
                    container_port: COORDINATOR_PORT.into(),
                    ..Default::default()
                }),
            ]
            .into_iter()
            .flatten()
            .collect(),
        ),
        startup_probe: Some(http_probe(
            HEALTH_PATH,
            STARTUP_PERIOD_SECONDS,
            startup_failures,
        )),
        liveness_probe: Some(http_probe(HEALTH_PATH, 10, 6)),
        readiness_probe: Some(http_probe(READY_PATH, 5, 3)),
        resources: Some(resources(worker, spec.parallelism.processes_per_pod)),
        security_context: Some(container_security_context()),
        volume_mounts: Some(
            [
                Some(mount("config", "/etc/moe", true)),
                Some(mount("model", MODEL_MOUNT, true)),
                model
                    .pinned()
                    .then(|| mount(PINNED_VOLUME, PINNED_MOUNT, true)),
                Some(mount("shm", "/dev/shm", false)),
                Some(mount("tmp", "/tmp", false)),
            ]
            .into_iter()
            .flatten()
            .chain(adapters::server_mounts(&model.adapters))
            .collect(),
        ),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    }
}

/// The link the download points at the commit it fetched, and the server
/// reads: a pod serves the commit its own download resolved, even when
/// another pod on a shared claim moves the revision's link to a newer one
/// later, or its server container restarts (which does not rerun the
/// download). Which commit that was, the download's termination message
/// says (`status.modelCommit`).
pub const PINNED_MODEL_LINK: &str = "/run/moe/model";

/// The worker environment contract (a one-pod replica, or a pod of a group:
/// its rank from the StatefulSet pod index, the leader as coordinator), then
/// NCCL, then the user's env.
pub fn env_vars(svc: &MoEInferenceService, group: Option<Group>) -> Vec<EnvVar> {
    let p = &svc.spec.parallelism;
    let mut out = vec![
        plain(env::WORLD_SIZE, p.ranks_per_replica()),
        plain(env::NODES, p.pods_per_replica),
    ];
    match group {
        None => out.push(plain(env::NODE_RANK, 0)),
        Some(g) => {
            out.push(EnvVar {
                name: env::NODE_RANK.into(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: format!("metadata.labels['{}']", labels::POD_INDEX),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            });
            out.push(plain(
                env::COORDINATOR,
                format!(
                    "{}-0.{}:{COORDINATOR_PORT}",
                    group_set_name(svc, g),
                    pods_service_name(svc)
                ),
            ));
        }
    }
    out.extend([
        plain(env::PROCS_PER_NODE, p.processes_per_pod),
        plain(env::CONFIG, CONFIG_PATH),
        plain(
            env::SERVICE,
            format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any()),
        ),
    ]);
    out.extend(nccl_env(&svc.spec.worker.nccl));
    out.extend(svc.spec.worker.env.iter().cloned());
    out
}

/// Name of the headless Service giving group pods stable DNS names.
pub fn pods_service_name(svc: &MoEInferenceService) -> String {
    format!("{}-pods", svc.name_any())
}

/// Name of one group incarnation's StatefulSet; its pods are `<this>-<index>`.
pub fn group_set_name(svc: &MoEInferenceService, g: Group) -> String {
    format!("{}-g{}-{}", svc.name_any(), g.index, g.incarnation)
}

fn volumes(svc: &MoEInferenceService, model: &ResolvedModel) -> Vec<Volume> {
    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: config_map_name(svc),
                ..Default::default()
            }),
            ..Default::default()
        },
        match &model.claim_name {
            Some(claim) => Volume {
                name: "model".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.clone(),
                    // The download writes it; the server's mount is read-only.
                    read_only: Some(model.download.is_none()),
                }),
                ..Default::default()
            },
            None => empty_dir("model", None, None),
        },
        empty_dir(
            "shm",
            Some("Memory"),
            Some(svc.spec.worker.shm_size.clone()),
        ),
        empty_dir("tmp", None, None),
    ];
    if model.pinned() {
        volumes.push(empty_dir(PINNED_VOLUME, None, None));
    }
    volumes.extend(adapters::volumes(&model.adapters));
    volumes
}

/// Voluntary evictions (drains) take at most `max(1, rollout.maxUnavailable)`
/// replicas at a time; a replica that is not ready anyway may always go, so a
/// broken pod never blocks a drain.
pub fn pod_disruption_budget(svc: &MoEInferenceService) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: child_meta(svc, child_name(svc)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(svc.spec.rollout.max_unavailable.max(1))),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(svc)),
                ..Default::default()
            }),
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The autoscaler, when `spec.autoscaling` is set. Its target is this
/// resource's `/scale` subresource, not the Deployment: it moves
/// `spec.replicas`, which the operator carries to the Deployment, so one
/// field owns the replica count whoever changes it (HPA, kubectl scale, GitOps).
pub fn horizontal_pod_autoscaler(svc: &MoEInferenceService) -> Option<HorizontalPodAutoscaler> {
    let a = svc.spec.autoscaling.as_ref()?;
    Some(HorizontalPodAutoscaler {
        metadata: child_meta(svc, child_name(svc)),
        spec: HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some(MoEInferenceService::api_version(&()).into()),
                kind: MoEInferenceService::kind(&()).into(),
                name: svc.name_any(),
            },
            min_replicas: Some(a.min_replicas),
            max_replicas: a.max_replicas,
            metrics: Some(vec![MetricSpec {
                type_: "Pods".into(),
                pods: Some(PodsMetricSource {
                    metric: MetricIdentifier {
                        name: CONCURRENCY_METRIC.into(),
                        selector: None,
                    },
                    target: MetricTarget {
                        type_: "AverageValue".into(),
                        average_value: Some(Quantity(a.target_concurrency.to_string())),
                        ..Default::default()
                    },
                }),
                ..Default::default()
            }]),
            ..Default::default()
        },
        ..Default::default()
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use moe_crds::Device;

    pub fn service_fixture(extra: serde_json::Value) -> MoEInferenceService {
        let mut v = serde_json::json!({
            "apiVersion": "moe.dev/v1alpha1", "kind": "MoEInferenceService",
            "metadata": {"name": "chat", "namespace": "serve", "uid": "u-1", "generation": 1},
            "spec": {
                "model": {"volume": {"claimName": "weights", "path": "/moe/9b/"}},
                "replicas": 2,
                "parallelism": {"processesPerPod": 8, "expertParallel": 8},
                "placement": {"gpuType": "H100"}
            }
        });
        moe_crds::fixtures::merge_patch(&mut v, &extra);
        serde_json::from_value(v).unwrap()
    }

    pub fn model() -> ResolvedModel {
        ResolvedModel {
            claim_name: Some("weights".into()),
            download: None,
            path: "moe/9b".into(),
            format: ModelFormat::Native,
            checkpoint_step: None,
            model: None,
            trained: None,
            adapters: Vec::new(),
            revision: "pvc/weights/moe/9b".into(),
        }
    }

    /// A Hub model: resolved to its revision's directory, downloaded by an
    /// init container (the image, restricted Pod Security, the token from
    /// its Secret only) into the model volume, which the server then reads.
    #[test]
    fn a_hub_model_is_downloaded_by_an_init_container_before_the_server_starts() {
        use crate::inference::decide::{ModelState, resolve_model};
        let hub = |extra: serde_json::Value| {
            let mut source = serde_json::json!({"repo": "Qwen/Qwen3-30B-A3B-FP8"});
            moe_crds::fixtures::merge_patch(&mut source, &extra);
            let svc = service_fixture(
                serde_json::json!({"spec": {"model": {"volume": null, "huggingface": source}}}),
            );
            let ModelState::Ready(model) = resolve_model(&svc, None) else {
                panic!("a Hub model needs nothing resolved first")
            };
            (svc, *model)
        };
        let (svc, model) = hub(serde_json::json!({
            "revision": "v1.0", "tokenSecret": {"name": "hf"}, "cacheClaimName": "hub-cache",
            "endpoint": "http://hub.internal"
        }));
        assert_eq!(model.revision, "huggingface/Qwen/Qwen3-30B-A3B-FP8@v1.0");
        // The server reads its pod's own link to the commit its download
        // resolved, not the revision's link on the (shared) claim.
        let config = serving_config(&svc, &model);
        assert_eq!(config.model_dir, PINNED_MODEL_LINK);
        assert_eq!(config.format, ModelFormat::Huggingface);
        let pod = pod_spec(&svc, &model);
        let init = pod.init_containers.as_ref().unwrap();
        assert_eq!(init.len(), 1);
        let download = &init[0];
        assert_eq!(download.name, DOWNLOAD_CONTAINER);
        assert_eq!(download.image, pod.containers[0].image);
        assert_eq!(
            download.command.as_ref().unwrap().join(" "),
            "moe-worker fetch --repo Qwen/Qwen3-30B-A3B-FP8 --revision v1.0 --into \
             /models/huggingface --link /run/moe/model --endpoint http://hub.internal"
        );
        let env = download.env.as_ref().unwrap();
        assert_eq!(env.len(), 1, "the token and nothing else: {env:?}");
        let secret = env[0]
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!(
            (
                env[0].name.as_str(),
                secret.name.as_str(),
                secret.key.as_str()
            ),
            ("HF_TOKEN", "hf", "token")
        );
        assert_eq!(
            download.security_context,
            Some(container_security_context())
        );
        let writable = |c: &Container, volume: &str| {
            c.volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .find(|m| m.name == volume)
                .map(|m| (m.mount_path.clone(), m.read_only != Some(true)))
        };
        for (volume, at) in [("model", "/models"), ("pinned", "/run/moe")] {
            assert_eq!(writable(download, volume), Some((at.into(), true)));
            assert_eq!(
                writable(&pod.containers[0], volume),
                Some((at.into(), false)),
                "the server only reads {volume}"
            );
        }
        let pinned = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "pinned")
            .unwrap();
        assert!(pinned.empty_dir.is_some(), "one link per pod: {pinned:?}");
        let volume = model_volume(&pod);
        let claim = volume.persistent_volume_claim.as_ref().unwrap();
        assert_eq!(
            (claim.claim_name.as_str(), claim.read_only),
            ("hub-cache", Some(false))
        );
        // The server's token is not in the server's environment either.
        assert!(
            pod.containers[0]
                .env
                .as_ref()
                .unwrap()
                .iter()
                .all(|e| e.name != "HF_TOKEN")
        );

        // No claim: each pod downloads into its own emptyDir; a public model
        // needs no token.
        let (svc, model) = hub(serde_json::json!({}));
        assert_eq!(model.path, "huggingface/Qwen/Qwen3-30B-A3B-FP8/main");
        let pod = pod_spec(&svc, &model);
        let volume = model_volume(&pod);
        assert!(volume.empty_dir.is_some() && volume.persistent_volume_claim.is_none());
        assert_eq!(pod.init_containers.as_ref().unwrap()[0].env, None);
        // A volume's pods have no init container, and no link.
        let svc = service_fixture(serde_json::json!({}));
        let pod = pod_spec(&svc, &model_of(&svc));
        assert_eq!(pod.init_containers, None);
        assert!(pod.volumes.iter().flatten().all(|v| v.name != "pinned"));
    }

    /// The Deployment's pod spec for `svc` serving `model`.
    fn pod_spec(svc: &MoEInferenceService, model: &ResolvedModel) -> PodSpec {
        deployment(svc, &BuildContext::default(), model)
            .spec
            .unwrap()
            .template
            .spec
            .unwrap()
    }

    fn model_volume(pod: &PodSpec) -> &Volume {
        pod.volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "model")
            .unwrap()
    }

    fn model_of(svc: &MoEInferenceService) -> ResolvedModel {
        match crate::inference::decide::resolve_model(svc, None) {
            crate::inference::decide::ModelState::Ready(m) => *m,
            _ => panic!("a volume resolves at once"),
        }
    }

    #[test]
    fn deployment_places_one_replica_per_pod_on_the_gpu_pool() {
        let svc = service_fixture(serde_json::json!({}));
        let d = deployment(&svc, &BuildContext::default(), &model());
        let spec = d.spec.unwrap();
        assert_eq!(spec.replicas, Some(2));
        let ru = spec.strategy.unwrap().rolling_update.unwrap();
        assert_eq!(ru.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(ru.max_surge, Some(IntOrString::Int(0)));
        let pod = spec.template.spec.unwrap();
        let c = &pod.containers[0];
        assert_eq!(
            c.resources.as_ref().unwrap().limits.as_ref().unwrap()["nvidia.com/gpu"],
            Quantity("8".into())
        );
        let tolerations = pod.tolerations.unwrap();
        assert!(
            tolerations
                .iter()
                .any(|t| t.key.as_deref() == Some("nvidia.com/gpu"))
        );
        let terms = pod
            .affinity
            .unwrap()
            .node_affinity
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .unwrap()
            .node_selector_terms;
        assert_eq!(
            terms[0].match_expressions.as_ref().unwrap()[0].values,
            Some(vec!["NVIDIA-H100-80GB-HBM3".to_string()])
        );
        assert_eq!(pod.security_context.unwrap().run_as_non_root, Some(true));
        assert_eq!(
            c.security_context
                .as_ref()
                .unwrap()
                .read_only_root_filesystem,
            Some(true)
        );
        // The selector selects the template's pods.
        let selector = spec.selector.match_labels.unwrap();
        let pod_labels = spec.template.metadata.unwrap().labels.unwrap();
        assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
    }

    #[test]
    fn topology_keeps_each_group_incarnation_together() {
        let svc = service_fixture(serde_json::json!({"spec": {
            "parallelism": {"processesPerPod": 4, "podsPerReplica": 2, "expertParallel": 8},
            "placement": {"topology": {"required": "topology.moe.dev/rack"}}
        }}));
        let g = Group {
            index: 1,
            incarnation: 4,
        };
        let t = pod_template(&svc, &BuildContext::default(), &model(), Some(g));
        let terms = t
            .spec
            .unwrap()
            .affinity
            .unwrap()
            .pod_affinity
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .unwrap();
        assert_eq!(terms[0].topology_key, "topology.moe.dev/rack");
        let selected = terms[0]
            .label_selector
            .clone()
            .unwrap()
            .match_labels
            .unwrap();
        let own = t.metadata.unwrap().labels.unwrap();
        assert!(selected.iter().all(|(k, v)| own.get(k) == Some(v)));
        assert_eq!(selected[labels::GROUP], "1");
        assert_eq!(selected[labels::INCARNATION], "4");
        assert_eq!(selected[labels::SERVICE_NAME], "chat");
        // A one-pod replica's template (the Deployment's) has nothing to keep together.
        let t = pod_template(&svc, &BuildContext::default(), &model(), None);
        assert_eq!(t.spec.unwrap().affinity.unwrap().pod_affinity, None);
    }

    #[test]
    fn a_queued_service_is_admitted_by_kueue_replica_by_replica() {
        let svc =
            service_fixture(serde_json::json!({"spec": {"placement": {"queueName": "serving"}}}));
        let d = deployment(&svc, &BuildContext::default(), &model());
        let queue = |labels: Option<&BTreeMap<String, String>>| {
            labels.and_then(|l| l.get(labels::KUEUE_QUEUE_NAME).cloned())
        };
        assert_eq!(
            queue(d.metadata.labels.as_ref()).as_deref(),
            Some("serving")
        );
        let template = d.spec.unwrap().template;
        assert_eq!(
            queue(template.metadata.as_ref().unwrap().labels.as_ref()).as_deref(),
            Some("serving")
        );
        // A queued group: Kueue places it in one domain; no pod affinity of ours.
        let svc = service_fixture(serde_json::json!({"spec": {
            "parallelism": {"processesPerPod": 4, "podsPerReplica": 2, "expertParallel": 8},
            "placement": {"queueName": "serving", "topology": {"required": "topology.moe.dev/rack"}}
        }}));
        let g = Group {
            index: 0,
            incarnation: 0,
        };
        let t = pod_template(&svc, &BuildContext::default(), &model(), Some(g));
        let annotations = t.metadata.unwrap().annotations.unwrap();
        assert_eq!(
            annotations
                .get(labels::KUEUE_REQUIRED_TOPOLOGY)
                .map(String::as_str),
            Some("topology.moe.dev/rack")
        );
        assert_eq!(t.spec.unwrap().affinity.unwrap().pod_affinity, None);
        // Not queued: no label anywhere.
        let svc = service_fixture(serde_json::json!({}));
        let d = deployment(&svc, &BuildContext::default(), &model());
        assert_eq!(queue(d.metadata.labels.as_ref()), None);
    }

    #[test]
    fn startup_probe_covers_the_whole_load_budget() {
        let svc = service_fixture(
            serde_json::json!({"spec": {"serving": {"startupTimeoutSeconds": 1805}}}),
        );
        let d = deployment(&svc, &BuildContext::default(), &model());
        let c = d.spec.unwrap().template.spec.unwrap().containers.remove(0);
        let startup = c.startup_probe.unwrap();
        let budget = startup.period_seconds.unwrap() * startup.failure_threshold.unwrap();
        assert!(budget >= 1805, "startup budget {budget}s");
        assert_eq!(startup.http_get.unwrap().path.as_deref(), Some(HEALTH_PATH));
        assert_eq!(
            c.readiness_probe.unwrap().http_get.unwrap().path.as_deref(),
            Some(READY_PATH)
        );
    }

    #[test]
    fn servers_have_a_minute_to_finish_requests_after_sigterm_unless_the_service_says() {
        let grace = |patch| {
            let d = deployment(&service_fixture(patch), &BuildContext::default(), &model());
            d.spec
                .unwrap()
                .template
                .spec
                .unwrap()
                .termination_grace_period_seconds
        };
        assert_eq!(grace(serde_json::json!({})), Some(60));
        let long = serde_json::json!({"spec": {"worker": {"terminationGracePeriodSeconds": 300}}});
        assert_eq!(grace(long), Some(300));
    }

    #[test]
    fn a_new_model_revision_changes_the_pod_template() {
        let svc = service_fixture(serde_json::json!({}));
        let a = deployment(&svc, &BuildContext::default(), &model());
        let mut other = model();
        other.revision = "pvc/weights/moe/9b-v2".into();
        other.path = "moe/9b-v2".into();
        let b = deployment(&svc, &BuildContext::default(), &other);
        assert_ne!(a.spec.unwrap().template, b.spec.unwrap().template);
    }

    #[test]
    fn config_points_at_the_mounted_model() {
        let svc = service_fixture(serde_json::json!({}));
        let config = serving_config(&svc, &model());
        assert_eq!(config.model_dir, "/models/moe/9b");
        assert_eq!(config.port, 8000);
        assert_eq!(config.device, Device::Cuda);
        assert!(config.prefix_caching, "on unless the spec turns it off");
        let off =
            service_fixture(serde_json::json!({"spec": {"serving": {"prefixCaching": false}}}));
        assert!(!serving_config(&off, &model()).prefix_caching);
    }

    #[test]
    fn hpa_targets_the_scale_subresource_only_with_autoscaling() {
        let svc = service_fixture(serde_json::json!({}));
        assert!(horizontal_pod_autoscaler(&svc).is_none());
        let svc = service_fixture(serde_json::json!({"spec": {"autoscaling":
            {"minReplicas": 1, "maxReplicas": 4, "targetConcurrency": 16}}}));
        let hpa = horizontal_pod_autoscaler(&svc).unwrap().spec;
        assert_eq!(hpa.scale_target_ref.kind, "MoEInferenceService");
        assert_eq!(hpa.max_replicas, 4);
    }

    #[test]
    fn pdb_allows_at_least_one_eviction() {
        let svc = service_fixture(
            serde_json::json!({"spec": {"rollout": {"maxUnavailable": 0, "maxSurge": 1}}}),
        );
        let pdb = pod_disruption_budget(&svc).spec.unwrap();
        assert_eq!(pdb.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(
            selector_string(&svc),
            "moe.dev/role=server,moe.dev/service-name=chat"
        );
    }
}
