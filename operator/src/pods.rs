//! Pure pieces of worker pods shared by every kind the operator runs
//! (training attempts, serving replicas): Pod Security "restricted" contexts,
//! GPU placement (affinity, tolerations, GPU limits), NCCL environment and
//! small volume/env helpers. One copy, so a training pod and a serving pod on
//! the same pool are placed and locked down the same way.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, EmptyDirVolumeSource, EnvVar, NodeAffinity, NodeSelector,
    NodeSelectorRequirement, NodeSelectorTerm, PodAffinity, PodAffinityTerm, PodResourceClaim,
    PodSecurityContext, ResourceClaim, ResourceRequirements, SeccompProfile, SecurityContext,
    Toleration, Volume, VolumeMount, WeightedPodAffinityTerm,
};
use k8s_openapi::api::scheduling::v1alpha2::PodGroup;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use moe_crds::contract::env;

pub use crate::gang::{GangScheduling, Mechanism, WorkloadFeatures};
use moe_crds::{Device, GpuAllocation, NcclSettings, Placement, TopologyPlacement, WorkerSpec};

/// Operator-wide settings the builders need (from the chart's values).
#[derive(Clone, Debug)]
pub struct BuildContext {
    /// Worker image used when `spec.worker.image` is unset.
    pub default_worker_image: String,
    /// How gangs that no queue admits are scheduled ([`crate::gang`]).
    pub gang_scheduling: GangScheduling,
    /// What the cluster's Workload API keeps of a PodGroup, under
    /// `GangScheduling::WorkloadApi` ([`crate::gang::probe`]).
    pub workload_features: WorkloadFeatures,
    /// Whether the operator makes HTTPRoutes for `spec.route`
    /// (`--gateway-api`; [`crate::inference::route`]).
    pub gateway_api: bool,
    /// Whether it makes InferencePools for `spec.route.inferencePool`
    /// (`--inference-pool`; [`crate::inference::pool`]).
    pub inference_pool: bool,
}

impl Default for BuildContext {
    fn default() -> Self {
        Self {
            default_worker_image: format!(
                "ghcr.io/moe-operator/moe-worker:{}",
                env!("CARGO_PKG_VERSION")
            ),
            gang_scheduling: GangScheduling::None,
            workload_features: WorkloadFeatures::default(),
            gateway_api: false,
            inference_pool: false,
        }
    }
}

impl BuildContext {
    /// What schedules a gang of `pods` pods placed by `placement`.
    pub fn gang(&self, placement: &Placement, pods: i32) -> Mechanism {
        crate::gang::mechanism(placement, self.gang_scheduling, pods)
    }

    /// Whether the operator makes PodGroups (`--gang-scheduling=workload-api`).
    pub fn workload_api(&self) -> bool {
        self.gang_scheduling == GangScheduling::WorkloadApi
    }

    /// Whether a gang placed by `mechanism` keeps `placement.topology` by pod affinity.
    pub fn pod_affinity(&self, mechanism: Mechanism, placement: &Placement) -> bool {
        crate::gang::pod_affinity(mechanism, placement, self.workload_features)
    }

    /// The PodGroup of a gang of `pods` pods under the Workload API.
    pub fn pod_group(&self, metadata: ObjectMeta, placement: &Placement, pods: i32) -> PodGroup {
        crate::gang::pod_group(metadata, placement, pods, self.workload_features)
    }

    /// The image of a worker: its own, else the operator's default.
    pub fn image(&self, worker: &WorkerSpec) -> String {
        worker
            .image
            .clone()
            .unwrap_or_else(|| self.default_worker_image.clone())
    }
}

/// UID/GID of the worker (the distroless `nonroot` user).
pub const WORKER_UID: i64 = 65532;

/// How long worker pods stay on a NotReady or unreachable node before they
/// are evicted. A gang cannot make progress without every rank, and a server
/// on a lost node takes no traffic, so waiting the cluster default (300 s)
/// only delays the replacement on healthy nodes.
pub const NODE_LOSS_TOLERATION_SECONDS: i64 = 30;

/// Pod-level half of Pod Security "restricted": non-root, RuntimeDefault seccomp.
pub fn pod_security_context() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(WORKER_UID),
        run_as_group: Some(WORKER_UID),
        fs_group: Some(WORKER_UID),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Container-level half: no privilege escalation, no capabilities, read-only root.
pub fn container_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        ..Default::default()
    }
}

/// The user's affinity, with the GPU type ANDed into every required node
/// selector term, and, when `gang` names the labels of pods that must share a
/// topology domain (`placement.topology` placed by the scheduler, not by
/// Kueue), the pod affinity that keeps them together.
pub fn affinity(
    placement: &Placement,
    gang: Option<&BTreeMap<String, String>>,
) -> Option<Affinity> {
    let mut affinity = node_affinity(placement);
    if let (Some(topology), Some(gang)) = (&placement.topology, gang) {
        add_topology_affinity(
            affinity.get_or_insert_with(Affinity::default),
            topology,
            gang,
        );
    }
    affinity
}

/// The pod-set annotation by which Kueue's topology-aware scheduling places
/// a queued gang in one domain of `placement.topology` (as few as it can
/// for `preferred`); none without a queue or a topology.
pub fn kueue_topology_annotation(placement: &Placement) -> Option<(String, String)> {
    placement.queue_name.as_ref()?;
    let (key, required) = placement.topology.as_ref()?.key()?;
    let annotation = if required {
        crate::labels::KUEUE_REQUIRED_TOPOLOGY
    } else {
        crate::labels::KUEUE_PREFERRED_TOPOLOGY
    };
    Some((annotation.to_string(), key.to_string()))
}

/// Every pod of the gang in the domain of the first: a pod that matches its own
/// required term may start a domain when no other pod matches yet (the
/// scheduler's rule for a gang's first pod); the rest follow it there. The
/// scheduler places pods one by one, so a domain too small for the gang leaves
/// the rest Pending: Kueue (`queueName`) places the gang as a whole instead.
fn add_topology_affinity(
    affinity: &mut Affinity,
    topology: &TopologyPlacement,
    gang: &BTreeMap<String, String>,
) {
    let Some((key, required)) = topology.key() else {
        return;
    };
    let term = PodAffinityTerm {
        label_selector: Some(LabelSelector {
            match_labels: Some(gang.clone()),
            ..Default::default()
        }),
        topology_key: key.to_string(),
        ..Default::default()
    };
    let pod = affinity
        .pod_affinity
        .get_or_insert_with(PodAffinity::default);
    if required {
        pod.required_during_scheduling_ignored_during_execution
            .get_or_insert_with(Vec::new)
            .push(term);
    } else {
        pod.preferred_during_scheduling_ignored_during_execution
            .get_or_insert_with(Vec::new)
            .push(WeightedPodAffinityTerm {
                weight: 100,
                pod_affinity_term: term,
            });
    }
}

fn node_affinity(placement: &Placement) -> Option<Affinity> {
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

/// The user's tolerations, plus a short node-loss toleration and, for CUDA
/// workers, the `nvidia.com/gpu` taint of GPU pools.
pub fn tolerations(placement: &Placement, device: Device) -> Option<Vec<Toleration>> {
    let mut out = placement.tolerations.clone();
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
    if device == Device::Cuda
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

/// The pod's DRA claims (`worker.resourceClaims`), none when there are none.
pub fn resource_claims(worker: &WorkerSpec) -> Option<Vec<PodResourceClaim>> {
    (!worker.resource_claims.is_empty()).then(|| worker.resource_claims.clone())
}

/// The worker's resources, with `nvidia.com/gpu` = `processes` for CUDA
/// workers whose GPUs come from the device plugin (one process per GPU,
/// whatever the user wrote), and each of the pod's DRA claims.
pub fn resources(worker: &WorkerSpec, processes: i32) -> ResourceRequirements {
    let mut resources = worker.resources.clone().unwrap_or_default();
    // The pod's DRA claims are the worker container's (the only container).
    for claim in &worker.resource_claims {
        let claims = resources.claims.get_or_insert_with(Vec::new);
        if !claims.iter().any(|c| c.name == claim.name) {
            claims.push(ResourceClaim {
                name: claim.name.clone(),
                request: None,
            });
        }
    }
    if worker.device == Device::Cuda && worker.gpu_allocation == GpuAllocation::DevicePlugin {
        let gpus = Quantity(processes.to_string());
        resources
            .limits
            .get_or_insert_with(BTreeMap::new)
            .insert("nvidia.com/gpu".into(), gpus.clone());
        if let Some(requests) = resources.requests.as_mut() {
            requests.insert("nvidia.com/gpu".into(), gpus);
        }
    }
    resources
}

/// `NCCL_*` variables from the NCCL settings, in a stable order.
pub fn nccl_env(nccl: &NcclSettings) -> Vec<EnvVar> {
    let mut out = Vec::new();
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
    out
}

pub fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..Default::default()
    }
}

pub fn plain(name: &str, value: impl ToString) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.to_string()),
        ..Default::default()
    }
}

pub fn empty_dir(name: &str, medium: Option<&str>, size: Option<String>) -> Volume {
    Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: medium.map(String::from),
            size_limit: size.map(Quantity),
        }),
        ..Default::default()
    }
}

/// FNV-1a: a stable, dependency-free content hash; not for security.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The worker container's command: `moe-worker <subcommand>` on the
/// mounted config, with `--threads` for CPU workers that get more than one
/// ([`cpu_threads`]). `processes` is the worker processes per pod.
pub fn worker_command(subcommand: &str, worker: &WorkerSpec, processes: i32) -> Vec<String> {
    let mut command = vec![
        "moe-worker".to_string(),
        subcommand.to_string(),
        "--config".to_string(),
        moe_crds::contract::CONFIG_PATH.to_string(),
    ];
    if let Some(threads) = cpu_threads(worker, processes).filter(|&t| t > 1) {
        command.extend(["--threads".to_string(), threads.to_string()]);
    }
    command
}

/// Threads of each CPU worker process: `spec.worker.cpuThreads` when set;
/// otherwise the container's whole CPUs — its CPU limit (the CFS quota it
/// can never exceed), else its request (the share it is guaranteed) —
/// shared among the pod's `processes`, at least 1. `None` for CUDA
/// workers, and where the resources name no CPU (a pod without a CPU
/// request may get anything from nothing to the whole node, so it stays
/// on the worker's default of one thread).
pub fn cpu_threads(worker: &WorkerSpec, processes: i32) -> Option<i32> {
    if worker.device != Device::Cpu {
        return None;
    }
    if worker.cpu_threads.is_some() {
        return worker.cpu_threads;
    }
    let resources = worker.resources.as_ref()?;
    let cpu = |list: &Option<BTreeMap<String, Quantity>>| list.as_ref()?.get("cpu").cloned();
    let millis = cpu_millis(&cpu(&resources.limits).or_else(|| cpu(&resources.requests))?)?;
    let per_process = millis / (1000 * i64::from(processes.max(1)));
    Some(per_process.clamp(1, 256) as i32)
}

/// A CPU quantity in millicores ("2" → 2000, "1500m" → 1500, "2.5" → 2500,
/// "1k" → 1 000 000), rounded down; `None` if it does not parse or is
/// negative. The apiserver validates the syntax when the pod is created;
/// this only has to read what it accepts for CPUs, which never carry binary
/// suffixes or exponents in practice, so those read as unknown.
pub fn cpu_millis(quantity: &Quantity) -> Option<i64> {
    let text = quantity.0.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let scale_millis: f64 = match suffix {
        "" => 1e3,
        "m" => 1.0,
        "k" => 1e6,
        "M" => 1e9,
        _ => return None,
    };
    let value: f64 = number.parse().ok()?;
    (value.is_finite() && value >= 0.0).then(|| (value * scale_millis).floor() as i64)
}

/// The worker's own tuning variables, which a resource may set in
/// `spec.worker.env` although they share the contract's `MOE_` prefix: the
/// CUDA worker's opt-in kernels and GEMM paths (`MOE_CUDA_ATTENTION`,
/// `MOE_CUDA_GROUPED_GEMM`, `MOE_CUDA_EXPERT_STREAMS`) and where it finds
/// the CUDA headers (`MOE_CUDA_HOME`). The operator never sets them, and
/// the worker refuses a value it does not understand at startup.
pub const TUNING_PREFIX: &str = "MOE_CUDA_";

/// Checks of the worker spec that CEL cannot express cheaply: names reserved
/// for the worker contract, `NCCL_*` keys, the reserved label prefix.
/// `Err(message naming the field)`.
pub fn check_worker(worker: &WorkerSpec) -> Result<(), String> {
    for (i, var) in worker.env.iter().enumerate() {
        let tuning = var.name.starts_with(TUNING_PREFIX);
        if env::RESERVED.contains(&var.name.as_str()) || (var.name.starts_with("MOE_") && !tuning) {
            return Err(format!(
                "spec.worker.env[{i}].name: {} is reserved for the worker contract (MOE_*; \
                 the tuning variables {TUNING_PREFIX}* may be set)",
                var.name
            ));
        }
    }
    for key in worker.nccl.env.keys() {
        if !key.starts_with("NCCL_") {
            return Err(format!(
                "spec.worker.nccl.env: {key} is not an NCCL_* variable"
            ));
        }
    }
    for key in worker
        .pod_metadata
        .labels
        .keys()
        .chain(worker.pod_metadata.annotations.keys())
    {
        if key.starts_with("moe.dev/") {
            return Err(format!(
                "spec.worker.podMetadata: {key} uses the reserved moe.dev/ prefix"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_dra_claim_of_the_pod_is_the_worker_container_s_once() {
        let worker: WorkerSpec = serde_json::from_value(serde_json::json!({
            "device": "cuda",
            "resources": {"claims": [{"name": "nic"}]},
            "resourceClaims": [
                {"name": "imex", "resourceClaimTemplateName": "domain-channel"},
                {"name": "nic", "resourceClaimName": "shared-nic"}
            ]
        }))
        .unwrap();
        let claims = resource_claims(&worker).unwrap();
        assert_eq!(claims.len(), 2);
        assert_eq!(
            claims[0].resource_claim_template_name.as_deref(),
            Some("domain-channel")
        );
        let container = resources(&worker, 8);
        let names: Vec<&str> = container
            .claims
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            names,
            ["nic", "imex"],
            "the user's own entry is kept, none twice"
        );
        // The GPUs still come from the device plugin.
        assert_eq!(
            container.limits.unwrap()["nvidia.com/gpu"],
            Quantity("8".into())
        );
        // GPUs from a claim: no device-plugin request.
        let mut from_claim = worker.clone();
        from_claim.gpu_allocation = GpuAllocation::ResourceClaims;
        let container = resources(&from_claim, 8);
        assert!(
            container
                .limits
                .is_none_or(|l| !l.contains_key("nvidia.com/gpu"))
        );
        assert_eq!(container.claims.map(|c| c.len()), Some(2));
        assert_eq!(resource_claims(&WorkerSpec::default()), None);
        assert_eq!(resources(&WorkerSpec::default(), 1).claims, None);
    }

    fn with_cpu(limit: Option<&str>, request: Option<&str>) -> WorkerSpec {
        let list = |cpu: Option<&str>| {
            cpu.map(|cpu| BTreeMap::from([("cpu".to_string(), Quantity(cpu.into()))]))
        };
        WorkerSpec {
            device: Device::Cpu,
            resources: Some(ResourceRequirements {
                limits: list(limit),
                requests: list(request),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn cpu_quantities_read_as_millicores() {
        let millis = |q: &str| cpu_millis(&Quantity(q.into()));
        assert_eq!(millis("2"), Some(2000));
        assert_eq!(millis("1500m"), Some(1500));
        assert_eq!(millis("2.5"), Some(2500));
        assert_eq!(millis("0.1"), Some(100));
        assert_eq!(millis("1k"), Some(1_000_000));
        assert_eq!(millis("+3"), Some(3000));
        assert_eq!(millis("2Gi"), None);
        assert_eq!(millis("lots"), None);
        assert_eq!(millis(""), None);
    }

    #[test]
    fn cpu_threads_follow_the_cpus_each_process_gets() {
        // The limit is what the process can use; the request only when no limit is set.
        assert_eq!(cpu_threads(&with_cpu(Some("8"), Some("2")), 1), Some(8));
        assert_eq!(cpu_threads(&with_cpu(None, Some("6")), 1), Some(6));
        // Shared among the pod's processes, whole CPUs only, never below one.
        assert_eq!(cpu_threads(&with_cpu(Some("8"), None), 2), Some(4));
        assert_eq!(cpu_threads(&with_cpu(Some("3500m"), None), 1), Some(3));
        assert_eq!(cpu_threads(&with_cpu(Some("500m"), None), 1), Some(1));
        assert_eq!(cpu_threads(&with_cpu(Some("3"), None), 4), Some(1));
        // No CPU named, or an unreadable one: the worker's default.
        assert_eq!(cpu_threads(&with_cpu(None, None), 1), None);
        assert_eq!(cpu_threads(&with_cpu(Some("2Gi"), None), 1), None);
        assert_eq!(
            cpu_threads(
                &WorkerSpec {
                    device: Device::Cpu,
                    ..Default::default()
                },
                1
            ),
            None
        );
        // The field wins over the resources; CUDA workers compute on their GPUs.
        let mut asked = with_cpu(Some("8"), None);
        asked.cpu_threads = Some(2);
        assert_eq!(cpu_threads(&asked, 1), Some(2));
        let mut gpu = with_cpu(Some("8"), None);
        gpu.device = Device::Cuda;
        assert_eq!(cpu_threads(&gpu, 1), None);
    }

    #[test]
    fn the_worker_command_passes_threads_only_above_one() {
        let mut worker = WorkerSpec::default();
        assert_eq!(
            worker_command("train", &worker, 1),
            ["moe-worker", "train", "--config", "/etc/moe/config.json"]
        );
        let derived = with_cpu(Some("4"), None);
        assert_eq!(worker_command("train", &derived, 4).len(), 4);
        assert_eq!(
            &worker_command("train", &derived, 2)[4..],
            ["--threads", "2"]
        );
        worker.device = moe_crds::Device::Cpu;
        worker.cpu_threads = Some(4);
        assert_eq!(
            worker_command("serve", &worker, 1),
            [
                "moe-worker",
                "serve",
                "--config",
                "/etc/moe/config.json",
                "--threads",
                "4"
            ]
        );
    }
}
