//! `MoEInferenceService`: a Mixture-of-Experts model served by `replicas`
//! identical replicas behind one stable Service, each replica spread over
//! `podsPerReplica × processesPerPod` GPUs with expert parallelism.
//!
//! It shares placement, the worker container and the condition vocabulary
//! with `MoETrainingJob` (`crate::common`), and can serve a training job's
//! checkpoint directly (`model.fromTrainingJob`). The `/scale` subresource
//! makes `kubectl scale`, HPA and KEDA work on it. As for training, every spec
//! that can never run is rejected at admission by CEL rules naming the field.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Placement, WorkerSpec};

/// Longest `metadata.name`. Children are `<name>` (Service, Deployment, PDB,
/// HPA), `<name>-config`, `<name>-pods`, and for multi-pod replicas the
/// StatefulSets `<name>-g<group>-<incarnation>`, whose names must leave room
/// for the 11 characters of their revision-hash label value (≤ 52 in all:
/// 4-digit groups and 5-digit incarnations fit), and whose pods
/// `<name>-g<group>-<incarnation>-<index>` must fit a 63-character DNS label.
pub const MAX_SERVICE_NAME_LEN: usize = 40;

/// Specification of a MoEInferenceService.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "moe.dev",
    version = "v1alpha1",
    kind = "MoEInferenceService",
    plural = "moeinferenceservices",
    shortname = "mis",
    category = "moe",
    namespaced,
    cel,
    status = "MoEInferenceServiceStatus",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Available", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Up-to-date", type_ = "integer", json_path = ".status.updatedReplicas"),
    printcolumn(name = "URL", type_ = "string", json_path = ".status.url", priority = 1),
    printcolumn(name = "Model", type_ = "string", json_path = ".status.modelRevision", priority = 1),
    printcolumn(name = "Commit", type_ = "string", json_path = ".status.modelCommit", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 40")
        .message("metadata.name must be at most 40 characters: replica group StatefulSets <name>-g<group>-<incarnation> and their pods must fit DNS labels"),
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')")
        .message("metadata.name must be a DNS-1035 label (lowercase letters, digits and '-', starting with a letter): it names the Service"),
    // The base model is served under the service's name.
    validation = Rule::new("!has(self.spec.adapters) || self.spec.adapters.all(a, a.name != self.metadata.name)")
        .message("spec.adapters: an adapter cannot be named as the service, whose name requests use for the base model")
        .field_path(".spec.adapters"),
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    // A scale request (kubectl scale, HPA) outside the autoscaling bounds is
    // refused rather than silently clamped, so the owner of `replicas` sees it.
    validation = Rule::new("!has(self.autoscaling) || (self.replicas >= self.autoscaling.minReplicas && self.replicas <= self.autoscaling.maxReplicas)")
        .message("replicas must be within autoscaling.minReplicas and autoscaling.maxReplicas")
        .field_path(".replicas"),
    // FP8 tensor cores exist on Hopper only; the CPU worker stores FP8 weights
    // and computes in f32.
    validation = Rule::new("self.serving.precision != 'fp8' || self.worker.device == 'cpu' || (has(self.placement.gpuType) && self.placement.gpuType in ['H100', 'H200'])")
        .message("serving.precision fp8 needs Hopper GPUs: set placement.gpuType to H100 or H200 (or worker.device to cpu, which stores FP8 weights and computes in f32)")
        .field_path(".serving.precision"),
    // Kueue holds the replicas' quota in that queue; moving them to another
    // queue is a new service (Kueue refuses the label's change on a running group).
    // `has()` on both sides: the rule also runs on status writes.
    validation = Rule::new("has(self.placement.queueName) == has(oldSelf.placement.queueName) && (!has(self.placement.queueName) || self.placement.queueName == oldSelf.placement.queueName)")
        .message("placement.queueName is immutable: create a new service to serve from another queue")
        .field_path(".placement.queueName"),
    validation = Rule::new("!has(self.adapters) || size(self.adapters) == 0 || self.worker.device == 'cpu'")
        .message("adapters are served on the CPU for now (worker.device cpu): serve a merged model on GPUs (a training job's export writes it beside its adapters)")
        .field_path(".adapters"),
    validation = Rule::new("!has(self.parallelism.expertLoadBalancing) || self.worker.device == 'cpu'")
        .message("parallelism.expertLoadBalancing is not implemented on worker.device cuda yet: the GPU engine holds no expert copies")
        .field_path(".parallelism.expertLoadBalancing"),
    validation = Rule::new("!has(self.placement.topology) || !has(self.placement.topology.expertGroups)")
        .message("placement.topology.expertGroups applies to training jobs: a replica group is already one expert-parallel group")
        .field_path(".placement.topology.expertGroups"),
    validation = Rule::new("!has(self.placement.topology) || self.parallelism.podsPerReplica > 1")
        .message("placement.topology keeps the pods of one replica group in one domain: it needs parallelism.podsPerReplica > 1")
        .field_path(".placement.topology"),
    // One-pod replicas are a Deployment, multi-pod ones StatefulSet groups:
    // switching is a different topology, not an update.
    validation = Rule::new("self.parallelism.podsPerReplica == oldSelf.parallelism.podsPerReplica")
        .message("parallelism.podsPerReplica is immutable: create a new service to change between one-pod and multi-pod replicas")
        .field_path(".parallelism.podsPerReplica"),
    // A rolling update must be allowed to take a replica down or add one.
    validation = Rule::new("self.rollout.maxUnavailable + self.rollout.maxSurge >= 1")
        .message("rollout.maxUnavailable and rollout.maxSurge cannot both be 0: a rollout could never progress")
        .field_path(".rollout.maxUnavailable"),
)]
pub struct MoEInferenceServiceSpec {
    /// Which weights to serve.
    pub model: ModelSource,
    /// LoRA adapters served beside the model, each a model of its own
    /// name: a request whose `model` names an adapter runs the base model
    /// with the adapter's update, and one batch mixes requests for any of
    /// them (`/v1/models` lists them with the base model as `parent`).
    /// Names are unique: a list map keyed by `name`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub adapters: Vec<ServedAdapter>,
    /// Serving replicas; each is one complete copy of the model. The `/scale`
    /// subresource reads and writes it (kubectl scale, HPA, KEDA).
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 10000))]
    pub replicas: i32,
    /// How one replica is split over pods and GPUs.
    #[serde(default)]
    pub parallelism: ServingParallelism,
    /// The HTTP server of each replica.
    #[serde(default)]
    pub serving: ServingSpec,
    /// A HorizontalPodAutoscaler (owned by the operator) that moves `replicas`
    /// through the `/scale` subresource. Unset: `replicas` is left to you.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    /// How replicas are replaced when the model, config or image changes.
    #[serde(default)]
    pub rollout: RolloutSpec,
    /// Where server pods are scheduled. With `queueName`, Kueue admits each
    /// replica (a multi-pod replica's pods as one group) within the queue's quota.
    #[serde(default)]
    pub placement: Placement,
    /// The server container and its pod.
    #[serde(default)]
    pub worker: WorkerSpec,
    /// Exposes the service through a Gateway (Kubernetes Gateway API): the
    /// operator creates and owns an HTTPRoute to its Service. Needs the
    /// operator's `--gateway-api` (chart value `gatewayAPI.enabled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<RouteSpec>,
}

/// The HTTPRoute of a service: every request under `pathPrefix` for
/// `hostnames`, on the listed Gateways, goes to the service's replicas.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.pathPrefix.startsWith('/')")
        .message("route.pathPrefix must start with '/'")
        .field_path(".pathPrefix"),
)]
pub struct RouteSpec {
    /// The Gateways (or other Gateway API parents) the route attaches to.
    #[schemars(length(min = 1, max = 32))]
    pub parent_refs: Vec<RouteParent>,
    /// Host names the route answers for. Empty: those of the listeners.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub hostnames: Vec<String>,
    /// Requests whose path starts with this go to the service.
    #[serde(default = "root_path")]
    #[schemars(length(min = 1, max = 1024))]
    pub path_prefix: String,
    /// How long the gateway may take to answer a request, a Gateway API
    /// duration (`300s`, `10m`): completions stream for minutes, longer
    /// than many gateways' default. Unset: the gateway's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"))]
    pub request_timeout: Option<String>,
    /// Let an endpoint picker choose the replica for each request (by queue
    /// depth, KV-cache use, prefix affinity): the operator makes an
    /// InferencePool of the Gateway API Inference Extension over the
    /// replicas, and the route sends to it instead of the Service. The
    /// picker is yours to run. Unset: the Service balances requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference_pool: Option<RouteInferencePool>,
}

/// The InferencePool a route sends to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteInferencePool {
    /// The endpoint picker (EPP) the Gateway asks.
    pub endpoint_picker: EndpointPicker,
}

/// An endpoint picker's Service in the service's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPicker {
    /// The picker's Service.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Its gRPC (ext-proc) port.
    #[serde(default = "picker_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// What the Gateway does when the picker does not answer: `FailClose`
    /// refuses the request, `FailOpen` sends it to any replica.
    #[serde(default)]
    pub failure_mode: PickerFailureMode,
}

fn picker_port() -> i32 {
    9002
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PickerFailureMode {
    #[default]
    FailClose,
    FailOpen,
}

impl PickerFailureMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FailClose => "FailClose",
            Self::FailOpen => "FailOpen",
        }
    }
}

/// A Gateway API `ParentReference`: a Gateway by default.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteParent {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Unset: the service's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
    /// A listener of the Gateway. Unset: every listener that allows the route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub section_name: Option<String>,
}

fn root_path() -> String {
    "/".into()
}

fn one() -> i32 {
    1
}

/// Where the weights come from. Exactly one source.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.fromTrainingJob) ? 1 : 0) + (has(self.volume) ? 1 : 0) + (has(self.huggingface) ? 1 : 0) == 1")
    .message("model needs exactly one source: fromTrainingJob, volume or huggingface"))]
pub struct ModelSource {
    /// A MoETrainingJob in the same namespace: its checkpoint claim, path and
    /// model shape are carried over. Serving starts once the job has Succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_training_job: Option<TrainingJobModel>,
    /// Weights on a PersistentVolumeClaim, mounted read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<ModelVolume>,
    /// A model on the Hugging Face Hub (or a mirror), downloaded by each
    /// server pod's init container before the server starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huggingface: Option<HuggingFaceModel>,
}

/// A LoRA adapter served beside the model. Exactly one source.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.fromTrainingJob) ? 1 : 0) + (has(self.volume) ? 1 : 0) + (has(self.huggingface) ? 1 : 0) == 1")
    .message("each adapter needs exactly one source: fromTrainingJob, volume or huggingface"))]
pub struct ServedAdapter {
    /// The model id requests name to use it (`"model": "<name>"`).
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    )]
    pub name: String,
    /// The adapters a MoETrainingJob (same namespace) trained with
    /// `training.lora` and exported with `output.huggingface`: served once
    /// its export is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_training_job: Option<AdapterTrainingJob>,
    /// A PEFT adapter directory (`adapter_config.json`,
    /// `adapter_model.safetensors`) on a PersistentVolumeClaim, mounted
    /// read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<AdapterVolume>,
    /// A PEFT adapter on the Hugging Face Hub (or a mirror): its
    /// `adapter_config.json` and `adapter_model.safetensors`, downloaded by
    /// each server pod's init container before the server starts, as
    /// `model.huggingface` is (a token from a Secret, a cache claim).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huggingface: Option<HuggingFaceModel>,
}

/// A training job whose export holds the adapters.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdapterTrainingJob {
    /// Name of the MoETrainingJob.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
}

/// An adapter on a volume.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdapterVolume {
    /// The claim holding the adapter.
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,
    /// The adapter's directory inside the claim.
    #[serde(default)]
    #[schemars(length(max = 1024))]
    pub path: String,
}

/// A Hugging Face Hub model: `config.json`, the tokenizer and the safetensors
/// shards of one commit, each checked against the Hub's hash.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HuggingFaceModel {
    /// `organization/name`, e.g. `Qwen/Qwen3-30B-A3B-FP8`.
    #[schemars(
        length(min = 3, max = 200),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
    )]
    pub repo: String,
    /// A branch, tag or commit. A commit pins the weights; a branch is
    /// resolved when each pod starts, so pods started after a push serve the
    /// new commit.
    #[serde(default = "main_revision")]
    #[schemars(length(min = 1, max = 200), regex(pattern = r"^[A-Za-z0-9._-]+$"))]
    pub revision: String,
    /// A key of a Secret in the object's namespace holding a Hub token, for
    /// gated and private models (given to the download only, as `HF_TOKEN`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret: Option<SecretKey>,
    /// A claim to keep the files on, shared by the pods (ReadWriteMany when
    /// they run on several nodes) and across restarts: each commit is
    /// downloaded once. Unset: every pod downloads into an emptyDir of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub cache_claim_name: Option<String>,
    /// The Hub's address (a mirror, or a Hub inside the cluster). Default:
    /// `https://huggingface.co`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = r"^https?://[^\s]+$"))]
    pub endpoint: Option<String>,
}

fn main_revision() -> String {
    "main".into()
}

/// One key of a Secret in the object's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKey {
    /// The Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Its key. Default: `token`.
    #[serde(default = "token_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn token_key() -> String {
    "token".into()
}

/// A training job's checkpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainingJobModel {
    /// Name of the MoETrainingJob (same namespace).
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Step of the checkpoint. Unset: the job's model once it Succeeded
    /// (its best checkpoint with `training.evaluation.keepBest`, else its
    /// final one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub checkpoint: Option<i64>,
}

/// Weights on a volume.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelVolume {
    /// The claim holding the weights.
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,
    /// Directory of the weights inside the claim.
    #[serde(default)]
    pub path: String,
    /// Layout of the weights.
    #[serde(default)]
    pub format: ModelFormat,
}

/// Layout of weights on a volume.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    /// A moe-worker checkpoint directory (manifest + per-rank shards).
    #[default]
    Native,
    /// A Hugging Face MoE checkpoint (`config.json` + safetensors shards).
    Huggingface,
}

/// How one replica is laid out: `podsPerReplica` pods of `processesPerPod`
/// worker processes (one per GPU), experts split over `expertParallel` ranks.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.podsPerReplica * self.processesPerPod == self.expertParallel")
        .message("parallelism.expertParallel must equal the processes (GPUs) per replica, podsPerReplica × processesPerPod: each process serves its share of the experts")
        .field_path(".expertParallel"),
    validation = Rule::new("!has(self.expertLoadBalancing) || (self.expertParallel > 1 && self.expertLoadBalancing.redundantExperts % self.expertParallel == 0)")
        .message("parallelism.expertLoadBalancing.redundantExperts must be a multiple of expertParallel, which must be above 1: every rank of a replica gets the same number of slots for copies of other ranks' experts")
        .field_path(".expertLoadBalancing.redundantExperts"),
)]
pub struct ServingParallelism {
    /// Worker processes per pod: one per GPU for CUDA workers.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 64))]
    pub processes_per_pod: i32,
    /// Pods per replica (more than one: a multi-node group whose pod 0 leads).
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 64))]
    pub pods_per_replica: i32,
    /// Ranks the experts of each MoE layer are split across within a replica.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 4096))]
    pub expert_parallel: i32,
    /// Copies of the busiest experts on other ranks, chosen again from the
    /// observed load every `intervalSeconds` (DeepSeek-V3's redundant
    /// experts): unset, each expert lives on one rank only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_load_balancing: Option<ExpertLoadBalancing>,
}

/// Redundant experts: each rank of a replica gets
/// `redundantExperts / expertParallel` more expert slots, filled with copies
/// of the experts the router sends the most tokens to, so a hot expert's
/// work is shared by several ranks instead of making one the whole
/// replica's bottleneck.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExpertLoadBalancing {
    /// Expert slots added per MoE layer over the whole replica, a multiple
    /// of `expertParallel` (every rank holds the same number). Each costs
    /// one expert's weights of memory on its rank once filled.
    #[schemars(range(min = 1, max = 4096))]
    pub redundant_experts: i32,
    /// How often the copies are chosen again from the load routed since the
    /// last choice (the replica pauses for the weights to move).
    #[serde(default = "default_rebalance_interval")]
    #[schemars(range(min = 10, max = 86400))]
    pub interval_seconds: i32,
}

fn default_rebalance_interval() -> i32 {
    600
}

impl Default for ServingParallelism {
    fn default() -> Self {
        Self {
            processes_per_pod: 1,
            pods_per_replica: 1,
            expert_parallel: 1,
            expert_load_balancing: None,
        }
    }
}

impl ServingParallelism {
    /// Worker processes (GPUs for CUDA) of one replica.
    pub fn ranks_per_replica(&self) -> i32 {
        self.pods_per_replica * self.processes_per_pod
    }
}

/// The HTTP server of each replica.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.port != 9400 && self.port != 29400")
        .message("serving.port must not be 9400 (worker metrics) or 29400 (rendezvous)")
        .field_path(".port"),
)]
pub struct ServingSpec {
    /// Port of the HTTP API (and of the health endpoints the probes read).
    /// Workers run as non-root without capabilities, so it must be ≥ 1024.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1024, max = 65535))]
    pub port: i32,
    /// Tokens batched into one forward pass, over all running requests.
    #[serde(default = "default_batch_tokens")]
    #[schemars(range(min = 1, max = 1048576))]
    pub max_batch_tokens: i32,
    /// Requests a replica runs at once; more wait in its queue.
    #[serde(default = "default_concurrency")]
    #[schemars(range(min = 1, max = 65536))]
    pub max_concurrent_requests: i32,
    /// Numeric precision of the weights and GEMMs.
    #[serde(default)]
    pub precision: ServingPrecision,
    /// How long a replica may take to load its weights and become healthy
    /// before it is restarted. MoE checkpoints are large: loading one can take
    /// many minutes, and a probe that kills it early never lets it finish.
    #[serde(default = "default_startup")]
    #[schemars(range(min = 60, max = 86400))]
    pub startup_timeout_seconds: i32,
    /// Reuse the KV cache of a prompt's prefix that was computed before (a
    /// shared system prompt, the earlier turns of a conversation): only
    /// the new tokens are prefilled. Results are the same either way;
    /// `false` computes every prompt whole.
    #[serde(default = "default_true")]
    pub prefix_caching: bool,
}

impl Default for ServingSpec {
    fn default() -> Self {
        Self {
            port: default_port(),
            max_batch_tokens: default_batch_tokens(),
            max_concurrent_requests: default_concurrency(),
            precision: ServingPrecision::default(),
            startup_timeout_seconds: default_startup(),
            prefix_caching: true,
        }
    }
}

pub(crate) fn default_true() -> bool {
    true
}

fn default_port() -> i32 {
    crate::contract::SERVING_PORT as i32
}
fn default_batch_tokens() -> i32 {
    8192
}
fn default_concurrency() -> i32 {
    64
}
fn default_startup() -> i32 {
    1800
}

/// Serving precision.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ServingPrecision {
    #[default]
    Bf16,
    Fp32,
    /// FP8 (E4M3) weights for the projections, experts and LM head: Hopper
    /// GPUs, or on CPU workers a quarter of f32's bytes (a power-of-two scale
    /// per output row, f32 arithmetic).
    Fp8,
}

/// Autoscaling through an operator-owned HorizontalPodAutoscaler whose target
/// is this resource's `/scale` subresource.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas")
    .message("autoscaling.minReplicas must be at most autoscaling.maxReplicas")
    .field_path(".minReplicas"))]
pub struct AutoscalingSpec {
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 10000))]
    pub min_replicas: i32,
    #[schemars(range(min = 1, max = 10000))]
    pub max_replicas: i32,
    /// In-flight requests per replica the autoscaler aims for (the worker's
    /// `moe_serving_inflight_requests` metric, through a custom metrics adapter).
    #[schemars(range(min = 1, max = 65536))]
    pub target_concurrency: i32,
}

/// Rolling update of the replicas.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Replicas that may be unavailable during an update. The default (1, with
    /// maxSurge 0) needs no spare GPUs.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 10000))]
    pub max_unavailable: i32,
    /// Replicas that may be created above `replicas` during an update (needs
    /// spare GPUs for their pods).
    #[serde(default)]
    #[schemars(range(min = 0, max = 10000))]
    pub max_surge: i32,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            max_unavailable: 1,
            max_surge: 0,
        }
    }
}

/// Observed state of a MoEInferenceService.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MoEInferenceServiceStatus {
    /// `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Replicas that exist (old and new), for the `/scale` subresource.
    #[serde(default)]
    pub replicas: i32,
    /// Replicas whose every pod is ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Replicas running the current spec (model, config and image).
    #[serde(default)]
    pub updated_replicas: i32,
    /// Label selector of the server pods, for the `/scale` subresource (HPA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// In-cluster URL of the stable endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The model being rolled out: `moetrainingjob/<name>@<step|latest>` or
    /// `pvc/<claim>/<path>`, with the format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_revision: Option<String>,
    /// For a Hub model: the commit the server pods downloaded its revision
    /// as (a branch is resolved when each pod starts). Unset while no pod has
    /// reported one, and while pods disagree (then `Degraded` is true with
    /// reason `ModelCommitSkew`, naming each commit's pods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_commit: Option<String>,
    /// kstatus conditions (`Ready`, `Reconciling`, `Stalled`) and
    /// `Available`, `Progressing`, `Degraded`, each with a classified reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
