//! Pure pieces of worker pods shared by every kind the operator runs
//! (training attempts, serving replicas): Pod Security "restricted" contexts,
//! GPU placement (affinity, tolerations, GPU limits), NCCL environment and
//! small volume/env helpers. One copy, so a training pod and a serving pod on
//! the same pool are placed and locked down the same way.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, EmptyDirVolumeSource, EnvVar, NodeAffinity, NodeSelector,
    NodeSelectorRequirement, NodeSelectorTerm, PodSecurityContext, ResourceRequirements,
    SeccompProfile, SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use moe_crds::contract::env;
use moe_crds::{Device, NcclSettings, Placement, WorkerSpec};

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

impl BuildContext {
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

/// The user's affinity, with the GPU type ANDed into every required node selector term.
pub fn affinity(placement: &Placement) -> Option<Affinity> {
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

/// The worker's resources, with `nvidia.com/gpu` = `processes` for CUDA
/// workers: one process per GPU, whatever the user wrote.
pub fn resources(worker: &WorkerSpec, processes: i32) -> ResourceRequirements {
    let mut resources = worker.resources.clone().unwrap_or_default();
    if worker.device == Device::Cuda {
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
/// mounted config, with `--threads` when the spec asks CPU workers for
/// more than one (`spec.worker.cpuThreads`).
pub fn worker_command(subcommand: &str, worker: &WorkerSpec) -> Vec<String> {
    let mut command = vec![
        "moe-worker".to_string(),
        subcommand.to_string(),
        "--config".to_string(),
        moe_crds::contract::CONFIG_PATH.to_string(),
    ];
    if let Some(threads) = worker.cpu_threads {
        command.extend(["--threads".to_string(), threads.to_string()]);
    }
    command
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
    fn the_worker_command_passes_cpu_threads_only_when_asked() {
        let mut worker = WorkerSpec::default();
        assert_eq!(
            worker_command("train", &worker),
            ["moe-worker", "train", "--config", "/etc/moe/config.json"]
        );
        worker.device = moe_crds::Device::Cpu;
        worker.cpu_threads = Some(4);
        assert_eq!(
            worker_command("serve", &worker),
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
