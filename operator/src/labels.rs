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
/// Role of a pod in the job (`worker`).
pub const ROLE: &str = "moe.dev/role";
pub const ROLE_WORKER: &str = "worker";

/// On an attempt Job: gang restarts counted against backoffLimit before this attempt.
pub const RESTARTS: &str = "moe.dev/restarts";
/// On an attempt Job: uncounted restarts (disruptions, ignored exit codes) before this attempt.
pub const DISRUPTIONS: &str = "moe.dev/disruptions";
/// On an attempt Job: hash of the worker config it was started with.
pub const CONFIG_HASH: &str = "moe.dev/config-hash";

/// Kueue's queue label: Kueue admits a suspended Job carrying it as one unit.
pub const KUEUE_QUEUE_NAME: &str = "kueue.x-k8s.io/queue-name";

/// Completion index annotation the Job controller sets on Indexed Job pods.
pub const JOB_COMPLETION_INDEX: &str = "batch.kubernetes.io/job-completion-index";

/// Label selector matching everything this operator manages.
pub fn managed_selector() -> String {
    format!("{MANAGED_BY}={MANAGED_BY_VALUE}")
}
