//! The worker config (`moe_crds::WorkerConfig`, JSON) read strictly and
//! turned into checked training settings: every error names the field.
//!
//! The operator validates jobs at admission, but the worker is also run by
//! hand and by other tools, so it re-checks everything it relies on and
//! rejects what it cannot honour rather than silently ignoring it.

use std::fmt;
use std::path::{Path, PathBuf};

use moe_crds::{
    ComputePrecision, Device, Fp8Recipe, ModelSpec, ResumePolicy, Tokenizer, WorkerConfig,
};

use crate::fp8;
use crate::linear::GemmPrecision;
use crate::model::{ActivationMemory, ModelConfig};

/// Why a worker config cannot be run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SettingsError {
    /// Not JSON, a wrong type, a missing required field, or an unknown
    /// top-level field (serde's message names it).
    Parse(String),
    /// Fields (dotted paths) that no part of `WorkerConfig` knows.
    UnknownFields(Vec<String>),
    /// A field whose value the worker cannot run with.
    Invalid { field: String, problem: String },
}

impl SettingsError {
    pub fn new(field: &str, problem: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.to_owned(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for SettingsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Parse(message) => write!(
                f,
                "the worker config is not a valid WorkerConfig: {message}"
            ),
            Self::UnknownFields(fields) => {
                write!(
                    f,
                    "unknown field(s) in the worker config: {}",
                    fields.join(", ")
                )
            }
            Self::Invalid { field, problem } => write!(f, "{field}: {problem}"),
        }
    }
}

impl std::error::Error for SettingsError {}

/// `Err` naming `field` unless `condition` holds.
pub(crate) fn require(condition: bool, field: &str, problem: String) -> Result<(), SettingsError> {
    if condition {
        Ok(())
    } else {
        Err(SettingsError::new(field, problem))
    }
}

/// A count that must be at least 1.
pub(crate) fn positive<I>(field: &str, value: I) -> Result<usize, SettingsError>
where
    I: Copy + fmt::Display + TryInto<usize>,
{
    match value.try_into() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(SettingsError::new(
            field,
            format!("is {value}, but must be at least 1"),
        )),
    }
}

/// Parses a worker config, rejecting unknown fields at any depth.
///
/// Only `WorkerConfig` itself denies unknown fields in its serde derive; the
/// nested API types accept them (the API server prunes unknown fields before
/// they get there). A misspelt `topk` in a hand-written config would
/// otherwise silently fall back to a default, so every ignored key is
/// collected and reported by its path.
pub fn parse_worker_config(json: &str) -> Result<WorkerConfig, SettingsError> {
    let mut unknown = Vec::new();
    let mut deserializer = serde_json::Deserializer::from_str(json);
    let config: WorkerConfig =
        serde_ignored::deserialize(&mut deserializer, |path| unknown.push(path.to_string()))
            .map_err(|e| SettingsError::Parse(e.to_string()))?;
    deserializer
        .end()
        .map_err(|e| SettingsError::Parse(e.to_string()))?;
    if unknown.is_empty() {
        Ok(config)
    } else {
        Err(SettingsError::UnknownFields(unknown))
    }
}

/// Reads and parses the config file at `path`.
pub fn read_worker_config(path: &Path) -> Result<WorkerConfig, SettingsError> {
    let json = std::fs::read_to_string(path)
        .map_err(|e| SettingsError::Parse(format!("cannot read {}: {e}", path.display())))?;
    parse_worker_config(&json)
}

/// Everything a training run needs, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainSettings {
    pub job: String,
    /// Ranks (`parallelism.nodes × processesPerNode`): `world_size /
    /// sequence_parallel` data-parallel shards of the batch.
    pub world_size: usize,
    /// `parallelism.sequenceParallel`: ranks each sequence is split over
    /// (Ulysses; blocks of consecutive ranks, see [`crate::dist::layout`]).
    /// Dividing the world size, the sequence length and the (key/value)
    /// heads, checked.
    pub sequence_parallel: usize,
    /// `parallelism.expertParallel`: ranks the routed experts are split
    /// over (blocks of consecutive ranks; see [`crate::dist::layout`]).
    /// Dividing the world size and the expert count, checked.
    pub expert_parallel: usize,
    /// Where the model trains: the CPU, or the pod's GPU (feature `cuda`).
    pub device: Device,
    /// As given, for checkpoint manifests (a resumed run must match it).
    pub model_spec: ModelSpec,
    pub model: ModelConfig,
    pub training: TrainingSettings,
    pub data: DataSource,
    /// `data.packing`: several conversations per sequence (format chat).
    pub packing: bool,
    /// `training.evaluation`: the loss on held-out data, now and then.
    pub evaluation: Option<EvaluationSettings>,
    pub checkpoint: CheckpointSettings,
    pub output_dir: PathBuf,
    /// The pretrained model a fresh run starts from ([`crate::model::pretrained`]).
    pub init_dir: Option<PathBuf>,
}

/// `training.evaluation`, as counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EvaluationSettings {
    /// Steps between evaluations (the last step is always evaluated).
    pub interval: u64,
    /// Percent of the data held out of training (without `source`).
    pub held_out_percent: usize,
    /// Global batches each evaluation reads.
    pub batches: usize,
    /// `training.evaluation.path`: files of their own to evaluate on,
    /// read as the training data is; `None`: a held-out share.
    pub source: Option<DataSource>,
    /// `training.evaluation.patience`: evaluations in a row without a new
    /// best held-out loss that stop the run.
    pub patience: Option<usize>,
}

impl EvaluationSettings {
    /// Whether the run evaluates after `step` of `steps`.
    pub fn due(&self, step: u64, steps: u64) -> bool {
        step.is_multiple_of(self.interval) || step == steps
    }
}

/// The early stop `training.evaluation.patience` asks for: the best
/// held-out loss so far, and the evaluations since it. Checkpoints carry
/// it, so a resumed run counts on where it stood.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Patience {
    best: Option<f64>,
    since_best: usize,
}

impl Patience {
    /// Records an evaluation's loss; whether `patience` evaluations in a
    /// row have now not beaten the best (an equal loss is no progress).
    pub fn exhausted_after(&mut self, loss: f64, patience: usize) -> bool {
        match self.best {
            Some(best) if loss >= best => self.since_best += 1,
            _ => (self.best, self.since_best) = (Some(loss), 0),
        }
        self.since_best >= patience
    }
}

/// Optimisation settings, as counts and plain floats.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingSettings {
    pub steps: u64,
    /// Sequences per forward/backward pass.
    pub micro_batch: usize,
    /// Forward/backward passes per optimizer step (gradient accumulation)
    /// on each data-parallel rank: `globalBatchSize / (microBatchSize ×
    /// ranks)`.
    pub micro_steps: usize,
    pub optimizer: OptimizerSettings,
    pub seed: u64,
    pub log_interval: u64,
    /// `training.activationCheckpointing`: recompute each block's
    /// activations in the backward pass instead of keeping them.
    pub activation_memory: ActivationMemory,
    /// `training.lora`: adapters trained instead of the model.
    pub lora: Option<crate::train::lora::LoraSettings>,
}

/// AdamW and its schedule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OptimizerSettings {
    pub learning_rate: f64,
    pub min_learning_rate: f64,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub epsilon: f64,
    /// Global gradient-norm limit; 0 turns clipping off.
    pub grad_clip: f64,
}

/// Where training tokens come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataSource {
    /// A corpus built into the worker, by name (text, one token per byte).
    Builtin(String),
    /// Text: a file, or a directory whose files are read in name order,
    /// one token per byte.
    Volume(PathBuf),
    /// Token ids (`data.tokenizer: pretokenized`): a file or a directory
    /// of them, as [`crate::data::tokens`] reads them; `token_bytes` is
    /// `data.tokenBytes` when set, `tokenizer_file` the tokenizer that
    /// produced them, when given.
    Tokens {
        path: PathBuf,
        token_bytes: Option<usize>,
        tokenizer_file: Option<PathBuf>,
    },
    /// Text through the Hugging Face tokenizer in `tokenizer_file`
    /// (`data.tokenizer: huggingface`), file by file; with `chat`
    /// (`data.format: chat`) conversations through its chat template, only
    /// the assistant's turns trained.
    HuggingFace {
        path: PathBuf,
        tokenizer_file: PathBuf,
        chat: bool,
    },
}

impl DataSource {
    /// How this source's data becomes tokens.
    pub fn tokenizer(&self) -> Tokenizer {
        match self {
            Self::Builtin(_) | Self::Volume(_) => Tokenizer::Byte,
            Self::Tokens { .. } => Tokenizer::Pretokenized,
            Self::HuggingFace { .. } => Tokenizer::Huggingface,
        }
    }

    /// The `tokenizer.json` the tokens come from, when there is one: each
    /// checkpoint keeps a copy, for serving.
    pub fn tokenizer_file(&self) -> Option<&Path> {
        match self {
            Self::Tokens { tokenizer_file, .. } => tokenizer_file.as_deref(),
            Self::HuggingFace { tokenizer_file, .. } => Some(tokenizer_file),
            Self::Builtin(_) | Self::Volume(_) => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointSettings {
    pub dir: PathBuf,
    pub interval_steps: u64,
    pub keep: usize,
    /// `training.evaluation.keepBest`: the checkpoint with the lowest
    /// held-out loss is kept besides the newest `keep`.
    pub keep_best: bool,
    pub resume: bool,
}

impl CheckpointSettings {
    /// Which checkpoints a save leaves.
    pub fn retention(&self) -> crate::checkpoint::Retention {
        crate::checkpoint::Retention {
            newest: self.keep,
            best: self.keep_best,
        }
    }
}

impl TrainSettings {
    /// Checks `config` and converts it; the error names the first bad field.
    pub fn from_config(config: &WorkerConfig) -> Result<Self, SettingsError> {
        let world_size = world_ranks(config)?;
        let mut model = ModelConfig::from_spec(&config.model)?;
        let sequence_parallel = sequence_parallel(config, world_size, &model)?;
        let expert_parallel = expert_parallel(config, world_size, sequence_parallel, &model)?;
        (model.gemm_precision, model.head_precision) = gemm_precision(config);
        let training = training_settings(config, world_size, sequence_parallel)?;
        if let Some(lora) = &training.lora {
            require(
                !lora.routed_experts || expert_parallel == 1,
                "training.lora.routedExperts",
                format!(
                    "is set with parallelism.expertParallel {expert_parallel}, but the routed experts' adapters are not sharded: use expertParallel 1"
                ),
            )?;
        }
        if config.device == Device::Cuda {
            check_cuda(config)?;
        }
        Ok(Self {
            device: config.device,
            world_size,
            sequence_parallel,
            expert_parallel,
            job: config.job.clone(),
            model_spec: config.model.clone(),
            model,
            training,
            data: data_source(config)?,
            packing: packing(config)?,
            evaluation: evaluation_settings(config)?,
            checkpoint: checkpoint_settings(config)?,
            output_dir: PathBuf::from(&config.output_dir),
            init_dir: config.init_dir.as_ref().map(PathBuf::from),
        })
    }
}

/// `training.evaluation`; its `path` read as `data`'s own path would be.
fn evaluation_settings(config: &WorkerConfig) -> Result<Option<EvaluationSettings>, SettingsError> {
    let Some(e) = &config.training.evaluation else {
        return Ok(None);
    };
    let source = match &e.path {
        None => None,
        Some(path) => {
            let mut beside = config.clone();
            match (&mut beside.data.volume, &mut beside.data.huggingface) {
                (Some(volume), _) => volume.path = path.clone(),
                (_, Some(hub)) => hub.path = path.clone(),
                _ => {
                    return Err(SettingsError::new(
                        "training.evaluation.path",
                        "is a file or directory beside the training data: it needs data.volume or data.huggingface",
                    ));
                }
            }
            Some(data_source(&beside)?)
        }
    };
    Ok(Some(EvaluationSettings {
        interval: e.interval_steps.max(1) as u64,
        held_out_percent: e.held_out_percent.clamp(1, 50) as usize,
        batches: e.batches.max(1) as usize,
        source,
        patience: e.patience.map(|p| p.max(1) as usize),
    }))
}

/// `data.packing`, which only conversations have use for.
fn packing(config: &WorkerConfig) -> Result<bool, SettingsError> {
    let packing = config.data.packing;
    require(
        !packing || config.data.format == moe_crds::DataFormat::Chat,
        "data.packing",
        "packs conversations several to a sequence: it needs format chat".to_owned(),
    )?;
    Ok(packing)
}

/// `parallelism`: the number of ranks.
fn world_ranks(config: &WorkerConfig) -> Result<usize, SettingsError> {
    let p = &config.parallelism;
    let nodes = positive("parallelism.nodes", p.nodes)?;
    let per_node = positive("parallelism.processesPerNode", p.processes_per_node)?;
    Ok(nodes * per_node)
}

/// `parallelism.sequenceParallel`: it must divide the world (sequence
/// groups are blocks of consecutive ranks), the sequence (each rank holds
/// `seqLen / sequenceParallel` tokens of each) and, since attention runs
/// sharded by head, the query and key/value heads; the same rules as the
/// CRD's, naming the same fields. (The sequence-wise balance loss works:
/// the group sums each sequence's routing statistics.)
fn sequence_parallel(
    config: &WorkerConfig,
    world_size: usize,
    model: &ModelConfig,
) -> Result<usize, SettingsError> {
    let field = "parallelism.sequenceParallel";
    let sp = positive(field, config.parallelism.sequence_parallel)?;
    crate::dist::layout::Layout::new(world_size, sp, 1).map_err(|e| {
        SettingsError::new(
            field,
            format!("is {sp}, but {e} (nodes × processesPerNode)"),
        )
    })?;
    let sharded = [
        (
            "model.seqLen",
            model.seq_len,
            "each rank holds seqLen / sequenceParallel tokens of every sequence",
        ),
        (
            "model.attentionHeads",
            model.heads,
            "attention is sharded by head",
        ),
        (
            "model.kvHeads",
            model.kv_heads,
            "attention is sharded by head, key/value heads too",
        ),
    ];
    for (name, value, why) in sharded {
        require(
            value.is_multiple_of(sp),
            name,
            format!(
                "is {value}, but it is not divisible by parallelism.sequenceParallel {sp} ({why})"
            ),
        )?;
    }
    Ok(sp)
}

/// `parallelism.expertParallel`: it must divide the world (expert groups
/// are blocks of consecutive ranks; the rest is data parallel) and the
/// routed experts (each rank owns `experts / expertParallel` of each layer).
fn expert_parallel(
    config: &WorkerConfig,
    world_size: usize,
    sequence_parallel: usize,
    model: &ModelConfig,
) -> Result<usize, SettingsError> {
    let field = "parallelism.expertParallel";
    let ep = positive(field, config.parallelism.expert_parallel)?;
    crate::dist::layout::Layout::new(world_size, sequence_parallel, ep).map_err(|e| {
        SettingsError::new(
            field,
            format!("is {ep}, but {e} (nodes × processesPerNode)"),
        )
    })?;
    let experts = model.moe.n_routed_experts;
    require(
        experts.is_multiple_of(ep),
        field,
        format!(
            "is {ep}, but it does not divide model.moe.experts {experts}: each rank owns experts / expertParallel routed experts of every layer"
        ),
    )?;
    Ok(ep)
}

/// `device: cuda` needs a worker built with CUDA, and the device trainer
/// ([`crate::cuda::trainer`]) does not yet do everything the CPU one does:
/// each gap is an error naming the setting, before any GPU is touched.
fn check_cuda(config: &WorkerConfig) -> Result<(), SettingsError> {
    // First, so that a CPU-only build says it too. Data, expert and
    // sequence parallelism run on the device trainer.
    require(
        moe_kernels::CUDA_ENABLED,
        "device",
        "is cuda, but this worker was built without CUDA (backends: cpu); use the CUDA worker image or device: cpu".to_owned(),
    )?;
    require(
        config.model.hidden_size % 4 == 0,
        "model.hiddenSize",
        format!(
            "is {}, but the CUDA trainer moves token rows as 16-byte vectors: use a multiple of 4",
            config.model.hidden_size
        ),
    )
}

/// The ranks of a sequence group read the same sequences, so the global
/// batch is split between `world_size / sequence_parallel` data-parallel shards.
fn training_settings(
    config: &WorkerConfig,
    world_size: usize,
    sequence_parallel: usize,
) -> Result<TrainingSettings, SettingsError> {
    let shards = world_size / sequence_parallel;
    let spec = &config.training;
    let steps = positive("training.steps", spec.steps)? as u64;
    let global_batch = positive("training.globalBatchSize", spec.global_batch_size)?;
    let micro_batch = positive("training.microBatchSize", spec.micro_batch_size)?;
    require(
        global_batch.is_multiple_of(micro_batch),
        "training.globalBatchSize",
        format!("{global_batch} is not a multiple of training.microBatchSize {micro_batch}"),
    )?;
    // The global batch is split evenly: every rank runs as many
    // micro-batches, so the ranks' mean gradient is the batch's.
    require(
        global_batch.is_multiple_of(micro_batch * shards),
        "training.globalBatchSize",
        format!(
            "{global_batch} does not split into {shards} data-parallel ranks (parallelism: nodes × processesPerNode / sequenceParallel) of whole micro-batches of training.microBatchSize {micro_batch}: use a multiple of {}",
            micro_batch * shards
        ),
    )?;
    let seed = u64::try_from(spec.seed).map_err(|_| {
        SettingsError::new(
            "training.seed",
            format!("is {}, but must not be negative", spec.seed),
        )
    })?;
    let log_interval = positive("training.logIntervalSteps", spec.log_interval_steps)? as u64;
    Ok(TrainingSettings {
        steps,
        micro_batch,
        micro_steps: global_batch / (micro_batch * shards),
        optimizer: optimizer_settings(config, steps)?,
        seed,
        log_interval,
        activation_memory: if spec.activation_checkpointing {
            ActivationMemory::RecomputeBlocks
        } else {
            ActivationMemory::KeepAll
        },
        lora: spec
            .lora
            .as_ref()
            .map(crate::train::lora::LoraSettings::from_spec)
            .transpose()?,
    })
}

/// The GEMM arithmetic from `training.precision`: the linear layers' and
/// the LM head's. FP8 applies to the linear layers only; `compute` to every
/// GEMM not in FP8. Both run on the CPU too: FP8 emulated exactly (see
/// [`crate::fp8`]), bf16 as rounded operands (see [`crate::linear`]).
fn gemm_precision(config: &WorkerConfig) -> (GemmPrecision, GemmPrecision) {
    let precision = &config.training.precision;
    let compute = match precision.compute {
        ComputePrecision::Fp32 => GemmPrecision::Fp32,
        ComputePrecision::Bf16 => GemmPrecision::Bf16,
    };
    if !precision.fp8.enabled {
        return (compute, compute);
    }
    let recipe = match precision.fp8.recipe {
        Fp8Recipe::Blockwise => fp8::Fp8Recipe::Blockwise,
        Fp8Recipe::Tensorwise => fp8::Fp8Recipe::Tensorwise,
    };
    (GemmPrecision::Fp8(recipe), compute)
}

fn optimizer_settings(
    config: &WorkerConfig,
    steps: u64,
) -> Result<OptimizerSettings, SettingsError> {
    let spec = &config.training.optimizer;
    let in_range = |field: &str, value: f64, low: f64, high: f64| {
        require(
            value.is_finite() && (low..=high).contains(&value),
            field,
            format!("is {value}, but must be in [{low}, {high}]"),
        )
    };
    in_range(
        "training.optimizer.learningRate",
        spec.learning_rate,
        0.0,
        10.0,
    )?;
    in_range(
        "training.optimizer.minLearningRate",
        spec.min_learning_rate,
        0.0,
        spec.learning_rate,
    )?;
    in_range(
        "training.optimizer.weightDecay",
        spec.weight_decay,
        0.0,
        1.0,
    )?;
    // A beta of exactly 1 never updates the moment and divides by zero in the bias correction.
    in_range("training.optimizer.beta1", spec.beta1, 0.0, 0.999_999)?;
    in_range("training.optimizer.beta2", spec.beta2, 0.0, 0.999_999)?;
    in_range("training.optimizer.epsilon", spec.epsilon, 0.0, 1.0)?;
    in_range("training.optimizer.gradClip", spec.grad_clip, 0.0, f64::MAX)?;
    let warmup_steps = u64::try_from(spec.warmup_steps).unwrap_or(u64::MAX);
    require(
        warmup_steps <= steps,
        "training.optimizer.warmupSteps",
        format!(
            "is {}, but must be in 0..={steps} (training.steps)",
            spec.warmup_steps
        ),
    )?;
    Ok(OptimizerSettings {
        learning_rate: spec.learning_rate,
        min_learning_rate: spec.min_learning_rate,
        warmup_steps,
        weight_decay: spec.weight_decay,
        beta1: spec.beta1,
        beta2: spec.beta2,
        epsilon: spec.epsilon,
        grad_clip: spec.grad_clip,
    })
}

fn data_source(config: &WorkerConfig) -> Result<DataSource, SettingsError> {
    // The files' path inside the claim, or inside the Hub dataset's commit
    // (which its download links at `dataDir`).
    let files = match (&config.data.volume, &config.data.huggingface) {
        (Some(volume), None) => Some(("data.volume", volume.path.as_str())),
        (None, Some(hub)) => Some(("data.huggingface", hub.path.as_str())),
        (None, None) => None,
        (Some(_), Some(_)) => {
            return Err(SettingsError::new(
                "data",
                "needs exactly one source: builtin, volume or huggingface",
            ));
        }
    };
    match (&config.data.builtin, files) {
        (Some(_), None) if config.data.tokenizer != Tokenizer::Byte => Err(SettingsError::new(
            "data.tokenizer",
            "reads its files from data.volume or data.huggingface; the built-in corpus is byte text",
        )),
        (Some(builtin), None) => Ok(DataSource::Builtin(builtin.corpus.clone())),
        (None, Some((source, within))) => {
            let dir = config.data_dir.as_deref().ok_or_else(|| {
                SettingsError::new(
                    "dataDir",
                    format!("is not set, but {source} needs the directory its files are in"),
                )
            })?;
            // Paths are inside the claim even when written with a leading '/'.
            let inside = |path: &str| Path::new(dir).join(path.trim_start_matches('/'));
            let path = inside(within);
            // Unset, a fine-tuning job's tokenizer is the pretrained model's.
            let tokenizer_file = config
                .data
                .tokenizer_file
                .as_deref()
                .map(inside)
                .or_else(|| {
                    let init = config.init_dir.as_deref()?;
                    (config.data.tokenizer != Tokenizer::Byte)
                        .then(|| Path::new(init).join(PRETRAINED_TOKENIZER))
                });
            match config.data.tokenizer {
                Tokenizer::Byte if tokenizer_file.is_some() => Err(SettingsError::new(
                    "data.tokenizerFile",
                    "is for tokenizer huggingface or pretokenized, not byte text",
                )),
                Tokenizer::Byte => Ok(DataSource::Volume(path)),
                Tokenizer::Huggingface => Ok(DataSource::HuggingFace {
                    path,
                    chat: config.data.format == moe_crds::DataFormat::Chat,
                    tokenizer_file: tokenizer_file.ok_or_else(|| {
                        SettingsError::new(
                            "data.tokenizerFile",
                            "is not set, but tokenizer huggingface needs its tokenizer.json (or model.initFrom's)",
                        )
                    })?,
                }),
                Tokenizer::Pretokenized => {
                    let token_bytes = match config.data.token_bytes {
                        None => None,
                        Some(width @ (2 | 4)) => Some(width as usize),
                        Some(width) => {
                            return Err(SettingsError::new(
                                "data.tokenBytes",
                                format!(
                                    "is {width}; token ids are 2 (uint16) or 4 (uint32) bytes wide"
                                ),
                            ));
                        }
                    };
                    Ok(DataSource::Tokens {
                        path,
                        token_bytes,
                        tokenizer_file,
                    })
                }
            }
        }
        _ => Err(SettingsError::new(
            "data",
            "needs exactly one source: builtin, volume or huggingface",
        )),
    }
}

/// The tokenizer a pretrained model's directory holds.
const PRETRAINED_TOKENIZER: &str = "tokenizer.json";

fn checkpoint_settings(config: &WorkerConfig) -> Result<CheckpointSettings, SettingsError> {
    let spec = &config.checkpoint;
    require(
        !spec.dir.is_empty(),
        "checkpoint.dir",
        "must not be empty".to_owned(),
    )?;
    let interval_steps = positive("checkpoint.intervalSteps", spec.interval_steps)? as u64;
    let evaluation = config.training.evaluation.as_ref();
    let keep_best = evaluation.is_some_and(|e| e.keep_best);
    if let Some(e) = evaluation.filter(|e| e.keep_best) {
        let every = e.interval_steps.max(1) as u64;
        require(
            interval_steps.is_multiple_of(every),
            "training.evaluation.keepBest",
            format!(
                "needs every checkpoint evaluated: checkpoint.intervalSteps ({interval_steps}) must be a multiple of training.evaluation.intervalSteps ({every})"
            ),
        )?;
    }
    Ok(CheckpointSettings {
        dir: PathBuf::from(&spec.dir),
        interval_steps,
        keep: positive("checkpoint.keep", spec.keep)?,
        keep_best,
        resume: spec.resume == ResumePolicy::Auto,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn config(patch: impl FnOnce(&mut Value)) -> WorkerConfig {
        let mut value = json!({
            "job": "local/test",
            "model": {"hiddenSize": 32, "layers": 2, "attentionHeads": 4, "kvHeads": 2, "seqLen": 32,
                      "moe": {"experts": 4, "topK": 2, "expertHiddenSize": 32}},
            "data": {"builtin": {"corpus": "tiny"}},
            "training": {"steps": 6, "globalBatchSize": 8, "microBatchSize": 2},
            "parallelism": {},
            "checkpoint": {"dir": "ckpt", "intervalSteps": 3, "keep": 2, "resume": "Auto"},
            "device": "cpu",
            "outputDir": "out"
        });
        patch(&mut value);
        serde_json::from_value(value).expect("a valid WorkerConfig")
    }

    fn refusal(patch: impl FnOnce(&mut Value)) -> (String, String) {
        match TrainSettings::from_config(&config(patch)) {
            Err(SettingsError::Invalid { field, problem }) => (field, problem),
            other => panic!("expected a refusal naming a field, got {other:?}"),
        }
    }

    #[test]
    fn the_tokenizer_decides_how_a_volume_is_read() {
        let volume = |tokenizer: &str, bytes: Option<i32>| {
            config(|c| {
                c["data"] = json!({"volume": {"claimName": "d", "path": "/shards"},
                                   "tokenizer": tokenizer, "tokenBytes": bytes});
                c["dataDir"] = "/data".into();
            })
        };
        let text = TrainSettings::from_config(&volume("byte", None)).unwrap();
        assert_eq!(text.data, DataSource::Volume("/data/shards".into()));
        assert_eq!(text.data.tokenizer(), Tokenizer::Byte);
        let ids = TrainSettings::from_config(&volume("pretokenized", Some(4))).unwrap();
        assert_eq!(
            ids.data,
            DataSource::Tokens {
                path: "/data/shards".into(),
                token_bytes: Some(4),
                tokenizer_file: None,
            }
        );
        let hf = TrainSettings::from_config(&config(|c| {
            c["data"] = json!({"volume": {"claimName": "d", "path": "text"},
                               "tokenizer": "huggingface", "tokenizerFile": "/tok/tokenizer.json"});
            c["dataDir"] = "/data".into();
        }))
        .unwrap();
        assert_eq!(
            hf.data,
            DataSource::HuggingFace {
                path: "/data/text".into(),
                tokenizer_file: "/data/tok/tokenizer.json".into(),
                chat: false,
            }
        );
        assert_eq!(
            hf.data.tokenizer_file(),
            Some(Path::new("/data/tok/tokenizer.json"))
        );
        assert_eq!(ids.data.tokenizer(), Tokenizer::Pretokenized);
        // A Hub dataset: `path` and the tokenizer inside the pod's link to
        // the commit its download fetched (the operator's `dataDir`).
        let hub = TrainSettings::from_config(&config(|c| {
            c["data"] = json!({"huggingface": {"repo": "org/corpus", "path": "sample/10BT"},
                               "tokenizer": "pretokenized", "tokenizerFile": "gpt2/tokenizer.json"});
            c["dataDir"] = "/run/moe/data".into();
        }))
        .unwrap();
        assert_eq!(
            hub.data,
            DataSource::Tokens {
                path: "/run/moe/data/sample/10BT".into(),
                token_bytes: None,
                tokenizer_file: Some("/run/moe/data/gpt2/tokenizer.json".into()),
            }
        );
        // Fine-tuning: without a tokenizerFile, the pretrained model's
        // tokenizer, for text and for ids (a checkpoint records it); none
        // for byte text.
        let tuned = |tokenizer: &str| {
            TrainSettings::from_config(&config(|c| {
                c["data"] =
                    json!({"volume": {"claimName": "d", "path": "text"}, "tokenizer": tokenizer});
                c["dataDir"] = "/data".into();
                c["initDir"] = "/run/moe/init".into();
            }))
            .unwrap()
            .data
        };
        let theirs = Path::new("/run/moe/init/tokenizer.json");
        assert_eq!(tuned("huggingface").tokenizer_file(), Some(theirs));
        assert_eq!(tuned("pretokenized").tokenizer_file(), Some(theirs));
        assert_eq!(tuned("byte").tokenizer_file(), None);
        let (field, problem) = refusal(|c| c["data"]["tokenizer"] = "pretokenized".into());
        assert_eq!(field, "data.tokenizer");
        assert!(problem.contains("data.volume"), "{problem}");
        let odd = TrainSettings::from_config(&volume("pretokenized", Some(3)));
        assert!(
            matches!(odd, Err(SettingsError::Invalid { ref field, .. }) if field == "data.tokenBytes"),
            "{odd:?}"
        );
    }

    #[test]
    fn pure_data_parallelism_splits_the_global_batch_between_the_ranks() {
        let one = TrainSettings::from_config(&config(|_| {})).unwrap();
        assert_eq!((one.world_size, one.training.micro_steps), (1, 4));
        let four = TrainSettings::from_config(&config(|c| {
            c["parallelism"] = json!({"nodes": 2, "processesPerNode": 2});
        }))
        .unwrap();
        assert_eq!((four.world_size, four.training.micro_steps), (4, 1));
    }

    #[test]
    fn impossible_parallel_sizes_and_uneven_splits_are_refused_by_field() {
        let (field, problem) = refusal(|c| {
            c["parallelism"] = json!({"nodes": 2, "expertParallel": 4});
        });
        assert_eq!(field, "parallelism.expertParallel");
        assert!(
            problem.contains("expert parallel 4 does not divide the world size 2"),
            "{problem}"
        );
        let (field, problem) = refusal(|c| {
            c["parallelism"] = json!({"processesPerNode": 3, "expertParallel": 3});
            c["training"]["globalBatchSize"] = 6.into();
        });
        assert_eq!(field, "parallelism.expertParallel");
        assert!(
            problem.contains("does not divide model.moe.experts 4"),
            "{problem}"
        );
        // 8 sequences do not make whole micro-batches of 2 on each of 8 ranks.
        let (field, problem) = refusal(|c| c["parallelism"]["processesPerNode"] = 8.into());
        assert_eq!(field, "training.globalBatchSize");
        assert!(problem.contains("use a multiple of 16"), "{problem}");
        // The tensorwise recipe's amaxes are shared between ranks (a max
        // over the world each step): accepted with several.
        let tensorwise = TrainSettings::from_config(&config(|c| {
            c["parallelism"]["nodes"] = 2.into();
            c["training"]["precision"] = json!({"fp8": {"enabled": true, "recipe": "tensorwise"}});
        }))
        .expect("tensorwise FP8 on two nodes");
        assert_eq!(tensorwise.world_size, 2);
    }

    #[test]
    fn expert_parallelism_splits_the_experts_and_the_rest_is_data_parallel() {
        let ep = TrainSettings::from_config(&config(|c| {
            c["parallelism"] = json!({"nodes": 2, "processesPerNode": 2, "expertParallel": 2});
        }))
        .unwrap();
        assert_eq!(
            (ep.world_size, ep.expert_parallel, ep.training.micro_steps),
            (4, 2, 1)
        );
    }

    /// Ulysses splits every sequence, then the heads: each must divide, and
    /// the data-parallel shards are the world over the sequence groups.
    #[test]
    fn sequence_parallelism_splits_sequences_and_heads_or_is_refused_by_field() {
        let sp = TrainSettings::from_config(&config(|c| {
            c["parallelism"] =
                json!({"processesPerNode": 4, "sequenceParallel": 2, "expertParallel": 2});
        }))
        .unwrap();
        assert_eq!(
            (sp.world_size, sp.sequence_parallel, sp.expert_parallel),
            (4, 2, 2)
        );
        // 8 sequences over 2 data-parallel shards of micro-batches of 2.
        assert_eq!(sp.training.micro_steps, 2);
        type Patch = fn(&mut Value);
        let cases: [(Patch, &str, &str); 5] = [
            (
                |c| c["parallelism"] = json!({"processesPerNode": 3, "sequenceParallel": 2}),
                "parallelism.sequenceParallel",
                "sequence parallel 2 does not divide the world size 3",
            ),
            (
                |c| {
                    c["model"]["seqLen"] = 30.into();
                    c["parallelism"] = json!({"processesPerNode": 4, "sequenceParallel": 4});
                },
                "model.seqLen",
                "is 30, but it is not divisible by parallelism.sequenceParallel 4",
            ),
            (
                |c| {
                    c["model"]["attentionHeads"] = 2.into();
                    c["model"]["kvHeads"] = 1.into();
                    c["parallelism"] = json!({"processesPerNode": 4, "sequenceParallel": 4});
                },
                "model.attentionHeads",
                "is 2, but it is not divisible by parallelism.sequenceParallel 4",
            ),
            (
                |c| c["parallelism"] = json!({"processesPerNode": 4, "sequenceParallel": 4}),
                "model.kvHeads",
                "is 2, but it is not divisible by parallelism.sequenceParallel 4",
            ),
            (
                |c| {
                    c["training"]["globalBatchSize"] = 2.into();
                    c["parallelism"] = json!({"processesPerNode": 4, "sequenceParallel": 2});
                },
                "training.globalBatchSize",
                "does not split into 2 data-parallel ranks",
            ),
        ];
        for (patch, want_field, want_problem) in cases {
            let (field, problem) = refusal(patch);
            assert_eq!(field, want_field, "{problem}");
            assert!(problem.contains(want_problem), "{field}: {problem}");
        }
    }

    /// The sequence-wise balance loss under sequence parallelism (alone and
    /// with expert parallelism) is accepted: the group sums each sequence's
    /// routing statistics.
    #[test]
    fn sequence_parallelism_accepts_the_sequence_wise_balance_loss() {
        for parallelism in [
            json!({"processesPerNode": 2, "sequenceParallel": 2}),
            json!({"processesPerNode": 4, "sequenceParallel": 2, "expertParallel": 2}),
        ] {
            let settings = TrainSettings::from_config(&config(|c| {
                c["model"]["moe"]["balancing"] = json!({"sequenceAuxLossCoef": 0.001});
                c["parallelism"] = parallelism.clone();
            }))
            .unwrap_or_else(|e| panic!("{parallelism}: {e}"));
            assert_eq!(settings.sequence_parallel, 2);
            assert_eq!(settings.model.moe.aux_loss_alpha, 0.001);
        }
    }

    /// The device trainer runs FP8 with either recipe (a CPU-only build
    /// refuses the device, naming it).
    #[test]
    fn cuda_runs_fp8_with_either_recipe() {
        for (recipe, want) in [
            ("blockwise", fp8::Fp8Recipe::Blockwise),
            ("tensorwise", fp8::Fp8Recipe::Tensorwise),
        ] {
            let settings = TrainSettings::from_config(&config(|c| {
                c["device"] = "cuda".into();
                c["training"]["precision"] = json!({"fp8": {"enabled": true, "recipe": recipe}});
            }));
            match (moe_kernels::CUDA_ENABLED, settings) {
                (true, Ok(settings)) => {
                    assert_eq!(settings.model.gemm_precision, GemmPrecision::Fp8(want))
                }
                (false, Err(SettingsError::Invalid { field, .. })) => {
                    assert_eq!(field, "device", "{recipe}");
                }
                (cuda, other) => panic!("{recipe}, CUDA build {cuda}: {other:?}"),
            }
        }
    }

    /// The device trainer runs data, expert and sequence parallelism (a
    /// CPU-only build then refuses the device itself, naming it).
    #[test]
    fn every_parallelism_runs_on_cuda() {
        for parallelism in [
            json!({"processesPerNode": 2}),
            json!({"processesPerNode": 4, "expertParallel": 2}),
            json!({"processesPerNode": 4, "sequenceParallel": 2}),
        ] {
            let settings = TrainSettings::from_config(&config(|c| {
                c["device"] = "cuda".into();
                c["parallelism"] = parallelism.clone();
            }));
            match (moe_kernels::CUDA_ENABLED, settings) {
                (true, Ok(settings)) => assert!(settings.world_size > 1, "{parallelism}"),
                (false, Err(SettingsError::Invalid { field, problem })) => {
                    assert_eq!(field, "device", "{parallelism}: {problem}");
                }
                (cuda, other) => panic!("{parallelism}, CUDA build {cuda}: {other:?}"),
            }
        }
    }
}

#[cfg(test)]
mod patience_tests {
    use super::Patience;

    #[test]
    fn patience_runs_out_after_that_many_evaluations_without_a_new_best() {
        let mut p = Patience::default();
        let losses = [3.0, 2.5, 2.6, 2.5, 2.4, 2.45, 2.41, 2.4];
        let exhausted: Vec<bool> = losses.iter().map(|&l| p.exhausted_after(l, 2)).collect();
        // 2.6 and 2.5 do not beat 2.5; 2.4 does; 2.45 and 2.41 do not.
        assert_eq!(
            exhausted,
            [false, false, false, true, false, false, true, true]
        );
    }
}
