//! Types shared by both custom resources: where pods go, what they run, and
//! the kstatus-compatible condition vocabulary.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, EnvVar, PodResourceClaim, ResourceRequirements, Toleration,
};
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// GPU models the operator knows how to place on. Each maps to the value of
/// the `nvidia.com/gpu.product` node label that GPU feature discovery sets.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum GpuType {
    /// NVIDIA H100 80GB HBM3 (SXM). Hopper: FP8 tensor cores.
    H100,
    /// NVIDIA H200 141GB HBM3e (SXM). Hopper: FP8 tensor cores.
    H200,
    /// NVIDIA A100 80GB (SXM4). Ampere: no FP8.
    A100,
}

impl GpuType {
    /// The `nvidia.com/gpu.product` label value of nodes with this GPU.
    pub fn product_label(self) -> &'static str {
        match self {
            GpuType::H100 => "NVIDIA-H100-80GB-HBM3",
            GpuType::H200 => "NVIDIA-H200",
            GpuType::A100 => "NVIDIA-A100-SXM4-80GB",
        }
    }

    /// Hopper GPUs have FP8 (E4M3/E5M2) tensor cores; the FP8 recipe needs them.
    pub fn supports_fp8(self) -> bool {
        matches!(self, GpuType::H100 | GpuType::H200)
    }
}

/// Where worker pods are scheduled.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// GPU model to run on. Adds a required node affinity on
    /// `nvidia.com/gpu.product`. Unset: any node that satisfies `nodeSelector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_type: Option<GpuType>,
    /// Extra node labels every worker node must carry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations added to worker pods. The toleration for the
    /// `nvidia.com/gpu` taint is added automatically for CUDA workers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Affinity merged into worker pods (the GPU-type node affinity is added to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// PriorityClass of worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Scheduler that places worker pods (e.g. a gang scheduler). Default: the cluster default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler_name: Option<String>,
    /// Kueue LocalQueue. A training job's attempt Job is created suspended
    /// with the `kueue.x-k8s.io/queue-name` label, so Kueue admits the whole
    /// gang at once; an inference service's Deployment or replica-group
    /// StatefulSets carry the label, so Kueue admits each replica (a group's
    /// pods together) and its pods wait, gated, until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub queue_name: Option<String>,
    /// Keep the gang inside one domain of a node label (a block, a rack, an
    /// NVLink domain), so its collectives stay on the fast fabric. With
    /// `queueName`, Kueue's topology-aware scheduling places the whole gang
    /// at admission; without it, pod affinity keeps every pod with the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<TopologyPlacement>,
}

/// A node label whose values name topology domains (e.g.
/// `topology.moe.dev/block`), and whether one domain is a must or a wish.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.required) != has(self.preferred)")
    .message("set exactly one of placement.topology.required and placement.topology.preferred"))]
pub struct TopologyPlacement {
    /// Every pod in one domain of this label; the gang waits until one
    /// domain can hold it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 316), regex(pattern = LABEL_KEY))]
    pub required: Option<String>,
    /// One domain of this label if one can hold the gang, else as few as
    /// possible (Kueue), or one if the scheduler finds room (pod affinity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 316), regex(pattern = LABEL_KEY))]
    pub preferred: Option<String>,
    /// Training with Kueue: the nodes of each expert-parallel group (the
    /// all-to-all's members, `expertParallel / processesPerNode` consecutive
    /// nodes) in one domain of this narrower label (a rack, an NVLink
    /// domain), inside the gang's domain. Kueue's topology-aware scheduling
    /// places the groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 316), regex(pattern = LABEL_KEY))]
    pub expert_groups: Option<String>,
}

/// A Kubernetes label key: an optional DNS-subdomain prefix and `/`, then a name.
const LABEL_KEY: &str = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$";

impl TopologyPlacement {
    /// The node label, and whether the gang must share one of its domains.
    pub fn key(&self) -> Option<(&str, bool)> {
        match (&self.required, &self.preferred) {
            (Some(key), _) => Some((key, true)),
            (None, Some(key)) => Some((key, false)),
            (None, None) => None,
        }
    }
}

/// Compute device of the worker processes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// One process per GPU; kernels compiled at run time by NVRTC; NCCL collectives.
    #[default]
    Cuda,
    /// CPU reference implementation with TCP collectives (tests, demos, clusters without GPUs).
    Cpu,
}

/// Where a CUDA worker pod's GPUs come from.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum GpuAllocation {
    /// The device plugin: the operator requests `nvidia.com/gpu`, one per process.
    #[default]
    DevicePlugin,
    /// Dynamic Resource Allocation: a claim of `resourceClaims` (e.g. of
    /// NVIDIA's DRA driver's `gpu.nvidia.com` class) holds the pod's GPUs, and
    /// the operator requests no `nvidia.com/gpu`.
    ResourceClaims,
}

/// NCCL settings passed to CUDA workers as environment variables.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NcclSettings {
    /// `NCCL_SOCKET_IFNAME`: network interface(s) for bootstrap and socket transport.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_ifname: Option<String>,
    /// `NCCL_IB_HCA`: InfiniBand/RoCE adapters to use (e.g. `mlx5`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ib_hca: Option<String>,
    /// `NCCL_DEBUG`: NCCL log level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debug: Option<NcclDebug>,
    /// Further `NCCL_*` variables, verbatim. Keys must start with `NCCL_`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

/// Values of `NCCL_DEBUG`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum NcclDebug {
    Version,
    Warn,
    Info,
    Trace,
}

/// Labels and annotations added to every worker pod (for example, for
/// service meshes, cost attribution or test fault injection).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodMetadata {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The worker container and its pod.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.cpuThreads) || self.device == 'cpu'")
        .message("cpuThreads applies to CPU workers (device: cpu); a CUDA worker computes on its GPU")
        .field_path(".cpuThreads"),
    validation = Rule::new("self.gpuAllocation == 'DevicePlugin' || (self.device == 'cuda' && has(self.resourceClaims) && size(self.resourceClaims) > 0)")
        .message("gpuAllocation ResourceClaims is for CUDA workers whose GPUs a claim of resourceClaims holds: name that claim")
        .field_path(".gpuAllocation"),
    validation = Rule::new("!has(self.resourceClaims) || self.resourceClaims.all(c, has(c.resourceClaimName) != has(c.resourceClaimTemplateName))")
        .message("each of resourceClaims names exactly one of resourceClaimName and resourceClaimTemplateName")
        .field_path(".resourceClaims"),
)]
pub struct WorkerSpec {
    /// Worker image. Unset: the operator's default worker image (chart value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,
    /// Image pull policy of the worker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// Compute device of the worker processes.
    #[serde(default)]
    pub device: Device,
    /// Threads of each worker process on the CPU (`device: cpu`): its large
    /// GEMMs split across them, with results the same to the bit. Default:
    /// the container's whole CPUs (its `cpu` limit, else its request) over
    /// the processes per pod, at least 1; 1 when `resources` name no CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub cpu_threads: Option<i32>,
    /// Resources of the worker container (one per pod). For CUDA workers the
    /// operator sets `nvidia.com/gpu` to the processes per pod
    /// (`parallelism.processesPerNode` in training, `processesPerPod` in serving).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Dynamic Resource Allocation: claims of every worker pod (Kubernetes'
    /// `PodResourceClaim`), each given to the worker container. A
    /// `resourceClaimTemplateName` gives each pod a claim of its own (e.g. a
    /// channel of an NVIDIA ComputeDomain for multi-node NVLink, an RDMA NIC);
    /// a `resourceClaimName` is one claim all pods share. The scheduler places
    /// a pod only where its claims can be allocated.
    /// Names are unique: a list map keyed by `name`, as in a Pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub resource_claims: Vec<PodResourceClaim>,
    /// Where a CUDA worker's GPUs come from: the device plugin
    /// (`nvidia.com/gpu`, set by the operator to the processes per pod), or
    /// a claim of `resourceClaims` (the claim must hold as many GPUs as the
    /// pod runs processes; the operator cannot see into it).
    #[serde(default)]
    pub gpu_allocation: GpuAllocation,
    /// Extra environment variables. Names of the worker contract (`MOE_*`) are reserved,
    /// except the CUDA worker's tuning variables (`MOE_CUDA_*`, docs/cuda.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// NCCL settings (CUDA workers).
    #[serde(default)]
    pub nccl: NcclSettings,
    /// Size of the memory-backed `/dev/shm` volume (NCCL and data loaders need more than the runtime's 64Mi).
    #[serde(default = "default_shm_size")]
    pub shm_size: String,
    /// Extra labels and annotations for worker pods. Keys under `moe.dev/` are reserved.
    #[serde(default)]
    pub pod_metadata: PodMetadata,
    /// ServiceAccount of worker pods. Default: the namespace's `default`, with no token mounted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// How long a stopping pod has after SIGTERM before it is killed. A
    /// training worker uses it to write a checkpoint at its next step (a
    /// suspend, a preemption, an elastic gang growing): give it a step plus
    /// a checkpoint write. A server finishes the requests in flight. Default:
    /// 120 for training, 60 for serving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 86400))]
    pub termination_grace_period_seconds: Option<i64>,
}

impl Default for WorkerSpec {
    fn default() -> Self {
        Self {
            image: None,
            image_pull_policy: None,
            device: Device::default(),
            cpu_threads: None,
            resources: None,
            resource_claims: Vec::new(),
            gpu_allocation: GpuAllocation::default(),
            env: Vec::new(),
            nccl: NcclSettings::default(),
            shm_size: default_shm_size(),
            pod_metadata: PodMetadata::default(),
            service_account_name: None,
            termination_grace_period_seconds: None,
        }
    }
}

fn default_shm_size() -> String {
    "8Gi".into()
}

/// Container image pull policy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// Condition types, kstatus-compatible: `Ready` is the summary; `Reconciling`
/// and `Stalled` are "abnormal-true" conditions that kstatus, Flux and Argo CD read.
pub mod condition {
    pub const READY: &str = "Ready";
    pub const RECONCILING: &str = "Reconciling";
    pub const STALLED: &str = "Stalled";
    /// Serving: enough replicas are ready to serve (Deployment semantics).
    pub const AVAILABLE: &str = "Available";
    /// Serving: working toward the spec (creating, updating, waiting for a model or capacity).
    pub const PROGRESSING: &str = "Progressing";
    /// Serving: serving, but with fewer ready replicas than asked for.
    pub const DEGRADED: &str = "Degraded";
}
