//! The contract between the operator and the worker: the one JSON config file
//! the operator renders into a ConfigMap (mounted at [`CONFIG_PATH`]), and
//! the environment variables that tell each pod where it stands in the gang.
//! Both sides use these definitions, so they cannot drift apart.

use serde::{Deserialize, Serialize};

use crate::common::Device;
use crate::inference::{ModelFormat, ServingParallelism, ServingPrecision};
use crate::training::{
    DataSpec, ModelSpec, ParallelismSpec, PrecisionSpec, ResumePolicy, Tokenizer, TrainingSpec,
};

/// Environment variables set on every worker container.
pub mod env {
    /// Total worker processes (nodes × processes per node).
    pub const WORLD_SIZE: &str = "MOE_WORLD_SIZE";
    /// Worker pods (nodes).
    pub const NODES: &str = "MOE_NODES";
    /// Index of this pod in the gang, 0-based; rank of local process `i` is
    /// `NODE_RANK × PROCS_PER_NODE + i`. From the Indexed Job completion index.
    pub const NODE_RANK: &str = "MOE_NODE_RANK";
    /// Worker processes in this pod (one per GPU for CUDA workers).
    pub const PROCS_PER_NODE: &str = "MOE_PROCS_PER_NODE";
    /// `host:port` of rank 0's rendezvous store.
    pub const COORDINATOR: &str = "MOE_COORDINATOR";
    /// Attempt number, from 0; bumped on every gang restart. Ranks of different
    /// attempts refuse to rendezvous with each other.
    pub const ATTEMPT: &str = "MOE_ATTEMPT";
    /// Path of the worker config file (JSON, [`super::WorkerConfig`]).
    pub const CONFIG: &str = "MOE_CONFIG";
    /// `namespace/name` of the MoETrainingJob, for logs and metrics.
    pub const JOB: &str = "MOE_JOB";
    /// `namespace/name` of the MoEInferenceService a server pod belongs to.
    pub const SERVICE: &str = "MOE_SERVICE";

    /// Set by the worker's own launcher on each local rank it starts (one
    /// per GPU; every rank of `moectl run --local`), never by the operator,
    /// which starts one process per pod. Its absence with `PROCS_PER_NODE`
    /// above 1 is what makes a worker the launcher, so users may not set it.
    pub const LOCAL_RANK: &str = "MOE_LOCAL_RANK";

    /// Optional: where rank 0 serves `/progress` and `/metrics` (default
    /// `0.0.0.0:<METRICS_PORT>`; `off` disables). Local runs use loopback.
    pub const STATUS_ADDR: &str = "MOE_STATUS_ADDR";

    /// Optional: where the worker writes why it failed (default
    /// [`super::TERMINATION_LOG`]; tests point it elsewhere).
    pub const TERMINATION_LOG: &str = "MOE_TERMINATION_LOG";

    /// Every name above but STATUS_ADDR: user-supplied `worker.env` may not set them.
    pub const RESERVED: &[&str] = &[
        WORLD_SIZE,
        NODES,
        NODE_RANK,
        PROCS_PER_NODE,
        COORDINATOR,
        ATTEMPT,
        CONFIG,
        JOB,
        SERVICE,
        LOCAL_RANK,
    ];
}

/// The file Kubernetes reports as a container's termination message: the
/// worker writes the error it exits on there, and the operator quotes it in
/// the restart's Event.
pub const TERMINATION_LOG: &str = "/dev/termination-log";

/// Where the operator mounts the worker config inside the container.
pub const CONFIG_PATH: &str = "/etc/moe/config.json";
/// Port of rank 0's rendezvous store (exposed by the headless Service).
pub const COORDINATOR_PORT: u16 = 29400;
/// Port of the worker's Prometheus `/metrics` and progress endpoint.
pub const METRICS_PORT: u16 = 9400;

/// The directory of a job's checkpoint of `step` inside its checkpoint
/// directory (what the worker writes, and what others point at).
pub fn checkpoint_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The worker's exit code when `parallelism.fabricCheck` measured the gang's
/// all-to-all below its floor (0 done; 1 I/O, checkpoint or device error; 2
/// config or data error; 3 another rank failed first).
pub const FABRIC_BELOW_FLOOR_EXIT_CODE: i32 = 4;
/// Default port of a server's HTTP API (`spec.serving.port`), which also
/// answers [`HEALTH_PATH`] and [`READY_PATH`].
pub const SERVING_PORT: u16 = 8000;
/// Liveness of a server: 200 once the process is up (also while it loads).
/// The startup probe reads it too, so a long load is never killed early.
pub const HEALTH_PATH: &str = "/healthz";
/// Readiness of a server: 200 only when its replica's weights are loaded and
/// it accepts requests; the Service sends traffic only to ready pods.
pub const READY_PATH: &str = "/readyz";

/// What `moe-worker fetch` reports once a Hub model is in place: on stdout,
/// and as the init container's termination message, where the operator
/// reads which commit each pod's download resolved its revision to
/// (`status.modelCommit`, and the `ModelCommitSkew` condition when pods
/// disagree).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FetchReport {
    /// `organization/name`.
    pub repo: String,
    /// The commit the revision named when the pod fetched it.
    pub commit: String,
    /// Files the model has, and their bytes.
    pub files: usize,
    pub bytes: u64,
    /// Bytes this fetch downloaded (0: the cache held them all).
    pub downloaded: u64,
}

/// The resolved configuration a worker runs: everything about the model and
/// training from the MoETrainingJob, with defaults filled in and paths made
/// absolute for inside the container (or the local run directory).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkerConfig {
    /// `namespace/name` of the job (for logs; `local/<name>` for local runs).
    pub job: String,
    pub model: ModelSpec,
    pub data: DataSpec,
    pub training: TrainingSpec,
    pub parallelism: ParallelismSpec,
    pub checkpoint: CheckpointConfig,
    pub device: Device,
    /// Where a `volume` data source's claim is mounted (read-only): the
    /// worker reads `data.volume.path` and `data.tokenizerFile` inside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<String>,
    /// Directory for `metrics.jsonl` and other run outputs (rank 0 writes).
    pub output_dir: String,
    /// A pretrained model's directory (Hugging Face layout) the first
    /// attempt starts from instead of random weights (`model.initFrom`);
    /// a resumed run loads its checkpoint instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_dir: Option<String>,
}

/// Checkpoint settings as the worker sees them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Directory holding this job's checkpoints (one subdirectory per step).
    pub dir: String,
    pub interval_steps: i64,
    pub keep: i32,
    pub resume: ResumePolicy,
}

/// What a served checkpoint carries over from the MoETrainingJob that wrote it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrainedWith {
    /// `namespace/name` of the MoETrainingJob.
    pub job: String,
    /// The job's uid: a job deleted and recreated under the same name is another model.
    pub uid: String,
    /// The step of the checkpoint served (the job's final one unless one was chosen).
    pub step: i64,
    /// The tokenizer the job trained with: prompts must be tokenized the same way.
    pub tokenizer: Tokenizer,
    /// The job's numeric precision (compute, FP8 recipe): FP8 serving reuses its scaling recipe.
    pub precision: PrecisionSpec,
}

/// The resolved configuration a server (`moe-worker serve`) runs, rendered by
/// the operator into the MoEInferenceService's ConfigMap.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServingConfig {
    /// `namespace/name` of the MoEInferenceService.
    pub service: String,
    /// Directory of the weights, as mounted (read-only).
    pub model_dir: String,
    pub format: ModelFormat,
    /// Checkpoint step to load; unset: the newest complete one in `modelDir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_step: Option<i64>,
    /// The model shape, when known before loading (carried over from the
    /// training job); otherwise read from the checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelSpec>,
    /// How the weights were trained, when they are a MoETrainingJob's
    /// (`model.fromTrainingJob`): what the server needs besides the shape to
    /// read and serve them as they were trained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trained: Option<TrainedWith>,
    pub parallelism: ServingParallelism,
    pub port: u16,
    pub max_batch_tokens: i32,
    pub max_concurrent_requests: i32,
    pub precision: ServingPrecision,
    pub device: Device,
    /// `spec.serving.prefixCaching` (absent in older configs: on).
    #[serde(default = "crate::inference::default_true")]
    pub prefix_caching: bool,
    /// `spec.adapters`, each's PEFT directory as mounted (read-only), in
    /// the spec's order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adapters: Vec<ServingAdapter>,
}

/// One adapter the server loads beside the model.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServingAdapter {
    /// The model id requests name to use it.
    pub name: String,
    /// Its PEFT directory, as mounted.
    pub dir: String,
    /// Where it came from (`moetrainingjob/<name>/<uid>`, `pvc/<claim>/<path>`):
    /// part of the config, so a new adapter at the same path rolls the pods.
    pub revision: String,
}
