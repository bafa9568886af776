//! Names of the labels, annotations and field manager the operator writes.
//! One place, so builders, selectors, tests and docs agree.

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "moe-operator";

/// `app.kubernetes.io/managed-by` on every child; the operator's watches select on it.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "moe-operator";
/// Name of the owning MoETrainingJob, on every child and worker pod.
pub const JOB_NAME: &str = "moe.dev/job-name";
/// Attempt number, on attempt Jobs and their pods.
pub const ATTEMPT: &str = "moe.dev/attempt";
/// Role of a pod in the job (`worker`) or service (`server`).
pub const ROLE: &str = "moe.dev/role";
pub const ROLE_WORKER: &str = "worker";
pub const ROLE_SERVER: &str = "server";
/// Spare pods of an elastic training job (a Job of them per smaller
/// attempt): they hold the room for the nodes the attempt lacks.
pub const ROLE_SPARE: &str = "spare";
/// The pod that writes a succeeded training job's Hugging Face export.
pub const ROLE_EXPORT: &str = "export";
/// The attempt a spare Job asks room for, on the Job and its pods (not
/// [`ATTEMPT`]: nothing that reads an attempt's workers must find them).
pub const SPARE_FOR_ATTEMPT: &str = "moe.dev/spare-for-attempt";
/// Name of the owning MoEInferenceService, on every child and server pod.
pub const SERVICE_NAME: &str = "moe.dev/service-name";
/// Index of a server pod's replica group (`podsPerReplica > 1`), on its StatefulSet and pods.
pub const GROUP: &str = "moe.dev/group";
/// Incarnation of a replica group: a restart or rollout replaces the group by the next one.
pub const INCARNATION: &str = "moe.dev/incarnation";
/// On a group StatefulSet: hash of its pod template (a different one is replaced).
pub const REVISION: &str = "moe.dev/revision";
/// On a group StatefulSet: the uids of its pods when all were first ready. A
/// pod missing from it later is a replacement, so the group restarts as a
/// whole. (Uids, not a time: no clock skew between operator and apiserver.)
pub const FORMED_PODS: &str = "moe.dev/formed-pods";
/// Pod index label the StatefulSet controller sets; index 0 leads a group.
pub const POD_INDEX: &str = "apps.kubernetes.io/pod-index";
/// On a server pod template: the model revision it serves (a change rolls the replicas).
pub const MODEL_REVISION: &str = "moe.dev/model-revision";

/// On an attempt Job: gang restarts counted against backoffLimit before this attempt.
pub const RESTARTS: &str = "moe.dev/restarts";
/// On an attempt Job: uncounted restarts (disruptions, ignored exit codes) before this attempt.
pub const DISRUPTIONS: &str = "moe.dev/disruptions";
/// On an attempt Job: hash of the worker config it was started with.
pub const CONFIG_HASH: &str = "moe.dev/config-hash";

/// Kueue's queue label: Kueue admits a suspended Job carrying it as one unit.
pub const KUEUE_QUEUE_NAME: &str = "kueue.x-k8s.io/queue-name";
/// On a queued pod template: Kueue's topology-aware scheduling puts every pod
/// in one domain of the named node label (required) or as few as it can (preferred).
pub const KUEUE_REQUIRED_TOPOLOGY: &str = "kueue.x-k8s.io/podset-required-topology";
pub const KUEUE_PREFERRED_TOPOLOGY: &str = "kueue.x-k8s.io/podset-preferred-topology";
/// On a queued pod template: every `KUEUE_SLICE_SIZE` consecutive pods in one
/// domain of the named (narrower) node label.
pub const KUEUE_SLICE_TOPOLOGY: &str = "kueue.x-k8s.io/podset-slice-required-topology";
pub const KUEUE_SLICE_SIZE: &str = "kueue.x-k8s.io/podset-slice-size";

/// Completion index annotation the Job controller sets on Indexed Job pods.
pub const JOB_COMPLETION_INDEX: &str = "batch.kubernetes.io/job-completion-index";

/// Label selector matching everything this operator manages.
pub fn managed_selector() -> String {
    format!("{MANAGED_BY}={MANAGED_BY_VALUE}")
}
