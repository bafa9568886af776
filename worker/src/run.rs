//! `moe-worker train`: one training run from a worker config, with
//! metrics, checkpoints, resumption and graceful stopping; alone or as one
//! rank of a data- and expert-parallel gang ([`train_as`]).

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::Serialize;

use moe_crds::{FabricMeasurement, WorkerConfig};

use crate::checkpoint::{self, CheckpointError, Snapshot};
use crate::data::{self, DataError, DataLoader};
use crate::dist::env::Timeouts;
use crate::dist::expert_parallel::ExpertParallel;
use crate::dist::layout::{self, Layout};
use crate::dist::sequence_parallel::SequenceParallel;
use crate::dist::{Collective, DistEnv, DistError, Solo, preflight};
use crate::model::{Parallel, flops};
use crate::settings::{Patience, SettingsError, TrainSettings};
use crate::status::Progress;
use crate::train::Evaluation;
use crate::train::balance::Balance;
use crate::train::{StepReport, Trainer};

/// File in `outputDir` with one JSON object per logged step.
pub const METRICS_FILE: &str = "metrics.jsonl";

#[derive(Debug)]
pub enum RunError {
    Settings(SettingsError),
    Data(DataError),
    Checkpoint(CheckpointError),
    Output {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The GPU: missing, or a CUDA or cuBLASLt failure.
    Device(String),
    /// The gang: rendezvous, or a collective failing (often because
    /// another rank died).
    Dist(DistError),
    /// The fabric check measured the gang's all-to-all below its floor.
    Fabric(String),
}

impl RunError {
    /// 2 for a config or data problem another attempt cannot fix (an
    /// operator failure rule can fail the job on it); 3
    /// ([`crate::dist::launch::PEER_FAILED_EXIT_CODE`]) when another rank's
    /// failure caused this one, so a launcher blames that rank instead; 4
    /// ([`moe_crds::contract::FABRIC_BELOW_FLOOR_EXIT_CODE`]) for a fabric
    /// below `parallelism.fabricCheck`'s floor; 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Settings(_) | Self::Data(_) => 2,
            Self::Fabric(_) => moe_crds::contract::FABRIC_BELOW_FLOOR_EXIT_CODE as u8,
            Self::Dist(e) if e.is_peer_failure() => PEER_FAILED,
            Self::Checkpoint(_) | Self::Output { .. } | Self::Device(_) | Self::Dist(_) => 1,
        }
    }
}

/// [`crate::dist::launch::PEER_FAILED_EXIT_CODE`] as an exit status.
const PEER_FAILED: u8 = crate::dist::launch::PEER_FAILED_EXIT_CODE as u8;

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Settings(e) => write!(f, "invalid config: {e}"),
            Self::Data(e) => write!(f, "training data: {e}"),
            Self::Checkpoint(e) => e.fmt(f),
            Self::Output { path, error } => write!(f, "cannot write {}: {error}", path.display()),
            Self::Device(e) => write!(f, "GPU: {e}"),
            Self::Dist(e) => write!(f, "distributed training: {e}"),
            Self::Fabric(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for RunError {}

impl From<SettingsError> for RunError {
    fn from(e: SettingsError) -> Self {
        Self::Settings(e)
    }
}

impl From<DataError> for RunError {
    fn from(e: DataError) -> Self {
        Self::Data(e)
    }
}

#[cfg(feature = "cuda")]
impl From<crate::cuda::GpuError> for RunError {
    fn from(e: crate::cuda::GpuError) -> Self {
        match e {
            // A tuning variable the worker cannot run with: a configuration
            // error (exit 2) that another attempt would meet again.
            crate::cuda::GpuError::Settings(problem) => {
                Self::Settings(SettingsError::new("worker environment", problem))
            }
            e => Self::Device(e.to_string()),
        }
    }
}

#[cfg(feature = "cuda")]
impl From<crate::cuda::data_parallel::ParallelError> for RunError {
    fn from(error: crate::cuda::data_parallel::ParallelError) -> Self {
        match error {
            crate::cuda::data_parallel::ParallelError::Gpu(e) => e.into(),
            crate::cuda::data_parallel::ParallelError::Dist(e) => e.into(),
        }
    }
}

impl From<DistError> for RunError {
    fn from(e: DistError) -> Self {
        Self::Dist(e)
    }
}

impl From<CheckpointError> for RunError {
    fn from(e: CheckpointError) -> Self {
        Self::Checkpoint(e)
    }
}

/// The one-line result printed on stdout.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// Optimizer steps completed (over all attempts).
    pub steps: u64,
    /// Cross-entropy of the last step, in nats.
    pub final_loss: Option<f64>,
    /// The loss on held-out data at the run's last evaluation
    /// (`training.evaluation`), in nats.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// Cross-entropy of the run's first step (kept across resumes), in nats.
    pub initial_loss: Option<f64>,
    /// Unigram entropy of the training tokens, in nats (comparable with the losses).
    pub unigram_entropy: f64,
    pub unigram_entropy_bits: f64,
    /// Training throughput of this process.
    pub tokens_per_second: f64,
    pub wall_seconds: f64,
    /// The newest checkpoint written or resumed from.
    pub checkpoint: Option<PathBuf>,
    /// `training.evaluation.keepBest`: the checkpoint with the lowest
    /// held-out loss, the run's model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_checkpoint: Option<PathBuf>,
    /// Stopped early by SIGTERM or SIGINT.
    pub interrupted: bool,
    /// Stopped early by `training.evaluation.patience`: the held-out loss
    /// stopped improving (the run succeeded, checkpointed at that step).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub stopped_early: bool,
    /// Rank 0's last report (what `/progress` served last): the final step,
    /// checkpoint and losses, for the pod's termination message.
    #[serde(skip)]
    pub report: Progress,
}

/// One `metrics.jsonl` line.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MetricsLine {
    step: u64,
    loss: f64,
    aux_loss: f64,
    lr: f64,
    grad_norm: f64,
    /// The step's tokens whose next token is in the loss (every one for
    /// text; the assistant's for conversations).
    trained_tokens: usize,
    #[serde(flatten)]
    pace: Pace,
    /// The most tokens any expert of any MoE layer received in the step.
    expert_load_max: usize,
    /// Tokens per expert if perfectly balanced (`tokens * topK / experts`).
    expert_load_mean: f64,
    /// The worst MoE layer's `max load / mean − 1` ([`Balance`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    expert_load_max_violation: Option<f64>,
    /// The loss on held-out data, on a step `training.evaluation` evaluated.
    #[serde(skip_serializing_if = "Option::is_none")]
    eval_loss: Option<f64>,
}

/// How fast a logging interval went: in its `metrics.jsonl` line, and in
/// rank 0's reports until the next one.
#[derive(Serialize, Clone, Copy, Debug)]
#[serde(rename_all = "camelCase")]
struct Pace {
    tokens_per_second: f64,
    /// Wall time per step, checkpoint writes included (what an estimate
    /// of the time left needs).
    #[serde(skip_serializing_if = "Option::is_none")]
    seconds_per_step: Option<f64>,
    /// Model FLOPs utilisation of the gang's GPUs (`crate::model::flops`).
    #[serde(skip_serializing_if = "Option::is_none")]
    mfu: Option<f64>,
}

/// Trains as `config` says until `training.steps` or until `stop` is set
/// (SIGTERM/SIGINT), checkpointing every `intervalSteps`, at the end and on stop.
pub fn train(config: &WorkerConfig, stop: &AtomicBool) -> Result<Summary, RunError> {
    train_reporting(config, stop, None)
}

/// [`train`], also publishing progress on `board` (rank 0's status endpoint).
pub fn train_reporting(
    config: &WorkerConfig,
    stop: &AtomicBool,
    board: Option<&crate::status::Board>,
) -> Result<Summary, RunError> {
    train_as(config, stop, board, &mut Solo, Timeouts::default())
}

/// `config` as this gang runs it. An elastic job's operator may start an
/// attempt on fewer pods than `parallelism.nodes`, down to
/// `parallelism.elastic.minNodes`, when the whole gang could not be placed;
/// the gang's environment (`MOE_WORLD_SIZE`) says how many, and the config
/// (one ConfigMap for every attempt) is read with that many nodes. Any
/// other size is left for [`gang_settings`] to refuse.
pub fn sized_for_gang(mut config: WorkerConfig, env: &DistEnv) -> WorkerConfig {
    let p = &config.parallelism;
    let Some(elastic) = &p.elastic else {
        return config;
    };
    let per_node = p.processes_per_node.max(1) as usize;
    if !env.world_size.is_multiple_of(per_node) {
        return config;
    }
    let nodes = (env.world_size / per_node) as i32;
    if (elastic.min_nodes..=p.nodes).contains(&nodes) {
        tracing::info!(
            nodes,
            of = p.nodes,
            "training on fewer nodes than parallelism.nodes: the operator shrank this elastic gang"
        );
        config.parallelism.nodes = nodes;
    }
    config
}

/// The settings of `config`, checked against the gang this process belongs
/// to: before a launcher starts any rank, and in every rank.
pub fn gang_settings(config: &WorkerConfig, env: &DistEnv) -> Result<TrainSettings, RunError> {
    let settings = TrainSettings::from_config(config)?;
    if settings.world_size != env.world_size {
        return Err(SettingsError::new(
            "parallelism",
            format!(
                "asks for {} ranks (nodes {} × processesPerNode {}), but this process was started as one of {} ({}; unset means 1): start multi-rank runs with `moectl run --local` or the operator",
                settings.world_size,
                config.parallelism.nodes,
                config.parallelism.processes_per_node,
                env.world_size,
                moe_crds::contract::env::WORLD_SIZE
            ),
        )
        .into());
    }
    Ok(settings)
}

/// One rank of a data-parallel run over `dp` (every rank calls it with the
/// same config; [`Solo`] for a single process). Every rank trains its shard
/// of each step's batch and holds identical weights after it; rank 0 alone
/// writes checkpoints and metrics and publishes on `board`. All ranks
/// resume from the same checkpoint, and stop at the same step boundary
/// when any of them is asked to. While rank 0 writes a checkpoint the
/// others wait up to `timeouts.checkpoint`, then `timeouts.collective` again.
pub fn train_as(
    config: &WorkerConfig,
    stop: &AtomicBool,
    board: Option<&crate::status::Board>,
    dp: &mut dyn Collective,
    timeouts: Timeouts,
) -> Result<Summary, RunError> {
    let started = Instant::now();
    let settings = TrainSettings::from_config(config)?;
    if settings.world_size != dp.size() {
        return Err(SettingsError::new(
            "parallelism",
            format!(
                "asks for {} ranks, but the gang has {}",
                settings.world_size,
                dp.size()
            ),
        )
        .into());
    }
    let gang = Gang {
        leader: dp.rank() == 0,
        timeouts,
    };
    // Before anything else: a gang on a degraded fabric stops in seconds.
    let fabric = match &config.parallelism.fabric_check {
        Some(check) if dp.size() > 1 => Some(fabric_check(dp, check, board)?),
        _ => None,
    };
    let tokens = data::load_tokens(&settings.data, settings.model.vocab)?;
    let unigram_entropy = tokens.counts().unigram_entropy();
    let source = data::describe(&settings.data);
    tracing::info!(
        job = %settings.job,
        data = %source,
        tokens = tokens.len(),
        unigram_entropy_nats = unigram_entropy,
        "loaded training data"
    );
    let cut = tokens.conversations().map(|all| {
        let seq_len = settings.model.seq_len;
        (
            all.len(),
            all.iter().filter(|c| c.len() > seq_len + 1).count(),
        )
    });
    // training.evaluation: files of their own, or the last share of the
    // data, never trained on.
    let (held_out, held_out_part) = match &settings.evaluation {
        Some(e) => match &e.source {
            Some(files) => {
                let corpus = data::load_tokens(files, settings.model.vocab)?;
                let all = 0..corpus.len();
                (None, Some((corpus, all, data::describe(files))))
            }
            None => {
                let start = data::held_out_start(&tokens, e.held_out_percent);
                let part = start..tokens.len();
                let what = format!("{source} (its held-out part, training.evaluation)");
                (Some(start), Some((tokens.clone(), part, what)))
            }
        },
        None => (None, None),
    };
    let training_part = 0..held_out.unwrap_or(tokens.len());
    let (seq_len, seed) = (settings.model.seq_len, settings.training.seed);
    let mut loader = DataLoader::new_in(tokens, training_part, seq_len, seed, &source)?;
    if settings.packing {
        loader = loader.packed();
    }
    let mut evaluation = match (&settings.evaluation, held_out_part) {
        (Some(e), Some((corpus, part, held_out_source))) => {
            let mut data =
                DataLoader::new_in(corpus, part.clone(), seq_len, seed, &held_out_source)?;
            if settings.packing {
                data = data.packed();
            }
            tracing::info!(
                data = %held_out_source,
                held_out_tokens = part.len(),
                held_out_conversations = data.conversations_in_reach(),
                every_steps = e.interval,
                sequences = e.batches
                    * settings.training.micro_batch
                    * settings.training.micro_steps
                    * (settings.world_size / settings.sequence_parallel),
                "evaluation on held-out data, never trained on: the same sequences each time"
            );
            Some(Evaluation::new(data, e.batches))
        }
        _ => None,
    };
    match (cut, loader.conversations_in_reach(), loader.packing_fill()) {
        (Some((conversations, cut)), Some(in_reach), Some((sequences, real))) => {
            let tokens = sequences * settings.model.seq_len;
            tracing::info!(
                conversations,
                cut,
                without_answer_in_reach = conversations - in_reach,
                sequences_per_epoch = sequences,
                real_tokens_percent = format!("{:.1}", 100.0 * real as f64 / tokens as f64),
                "conversations packed into sequences (data.packing): as many whole ones as fit, each attending only to itself; longer ones cut to model.seqLen; those cut before their first answer are never drawn"
            );
        }
        (Some((conversations, cut)), Some(in_reach), None) => {
            tracing::info!(
                conversations,
                cut,
                without_answer_in_reach = conversations - in_reach,
                "one conversation per sequence: longer ones cut to model.seqLen, shorter ones padded; those cut before their first answer are never drawn"
            );
        }
        _ => {}
    }
    // The groups first (making them needs no communication): with expert
    // parallelism each rank holds, resumes, computes and checkpoints only
    // its own routed experts. With sequence parallelism each rank trains on
    // its slice of every sequence; the weights stay replicated, so
    // checkpoints do not change.
    let (sp, ep) = (settings.sequence_parallel, settings.expert_parallel);
    let (mut sequence, mut experts) = (None, None);
    if sp > 1 || ep > 1 {
        let layout = Layout::new(dp.size(), sp, ep)
            .map_err(|e| SettingsError::new("parallelism", e.to_string()))?;
        let groups = layout::make_groups(dp, &layout)?;
        if sp > 1 {
            sequence = Some(SequenceParallel::new(
                groups.sequence,
                settings.model.seq_len,
            )?);
        }
        if ep > 1 {
            let n_experts = settings.model.moe.n_routed_experts;
            experts = Some(ExpertParallel::new(
                groups.expert,
                groups.expert_replicas,
                n_experts,
            )?);
        }
    }
    let held = experts
        .as_ref()
        .map_or(0..settings.model.moe.n_routed_experts, |e| {
            e.local_experts()
        });
    let mut host = Trainer::new_with_experts(
        settings.model.clone(),
        settings.training.clone(),
        loader,
        held.clone(),
    );
    let bytes = host.state_bytes();
    tracing::info!(
        rank = dp.rank(),
        experts = ?held,
        routed_expert_bytes = bytes.routed_experts,
        replicated_bytes = bytes.replicated,
        "weights, gradients and AdamW moments held by this rank"
    );

    // A fresh run of a fine-tuning job starts from the pretrained weights;
    // a resumed one from its checkpoint (read below).
    let resuming = settings.checkpoint.resume
        && matches!(checkpoint::newest(&settings.checkpoint.dir), Ok(Some(_)));
    if let (Some(dir), false) = (&settings.init_dir, resuming) {
        let model = match checkpoint::is_checkpoint(dir) {
            true => init_from_checkpoint(&settings, dir, held.clone())?,
            false => {
                let model = crate::model::pretrained::load(
                    dir,
                    &settings.model_spec,
                    settings.model.clone(),
                    held.clone(),
                )?;
                tracing::info!(dir = %dir.display(), experts = ?held, "starting from the pretrained model's weights");
                model
            }
        };
        host.start_from(model);
    }

    if let Some(lora) = host.lora() {
        let values: usize = host.model().tensors().iter().map(|t| t.values.len()).sum();
        tracing::info!(
            adapters = lora.adapters().len(),
            rank = lora.settings().rank,
            trained_values = lora.trainable_parameters(),
            model_values = values,
            trained_percent = format!(
                "{:.2}",
                100.0 * lora.trainable_parameters() as f64 / values as f64
            ),
            "training.lora: low-rank adapters trained, every other weight frozen"
        );
        if gang.leader && settings.model_spec.init_from.is_none() {
            tracing::warn!(
                "training.lora without model.initFrom: the frozen model is the seed's random weights, which adapters can only nudge; name a pretrained model (or another job's) in model.initFrom"
            );
        }
    }
    let mut run = RunState::default();
    if settings.checkpoint.resume {
        resume(&settings, &mut host, &mut run)?;
        same_step_everywhere(dp, host.steps_done())?;
    } else if let (true, Ok(Some(path))) =
        (gang.leader, checkpoint::newest(&settings.checkpoint.dir))
    {
        tracing::warn!(
            newest = %path.display(),
            "checkpoint.resume is Never: existing checkpoints are not loaded; this run's replace those of the same step"
        );
    }
    let parallel = Parallel {
        sequence: sequence.as_ref(),
        experts: experts.as_ref(),
    };
    let experts = parallel.experts;
    let metrics_path = settings.output_dir.join(METRICS_FILE);
    // Rank 0 writes the run's outputs; the others only train.
    let mut metrics = if gang.leader {
        fs::create_dir_all(&settings.output_dir).map_err(|error| RunError::Output {
            path: settings.output_dir.clone(),
            error,
        })?;
        Some(open_append(&metrics_path)?)
    } else {
        None
    };
    // MFU needs the GPU's peak; a CPU run reports none.
    #[cfg(feature = "cuda")]
    let (mut trainer, peak) = match settings.device {
        moe_crds::Device::Cuda => {
            let gpu = open_gpu()?;
            let peak = gpu.name().ok().and_then(|n| flops::bf16_dense_peak(&n));
            (Backend::cuda(gpu, host)?, peak)
        }
        moe_crds::Device::Cpu => (Backend::Cpu(Box::new(host)), None),
    };
    #[cfg(not(feature = "cuda"))]
    let (mut trainer, peak) = (Backend::Cpu(Box::new(host)), None::<f64>);
    let gpus = dp.size();

    let training_started = Instant::now();
    let resumed_at = trainer.steps_done();
    let (mut tokens_done, mut interval) = (0usize, Interval::new());
    let total_steps = settings.training.steps;
    let mut interrupted = false;
    let mut stopped_early = false;
    // The last logging interval's, kept for the reports between.
    let mut last_pace: Option<Pace> = None;
    // Rank 0's report, as `/progress` serves it; the last one ends the run
    // (the pod's termination message: what the operator reads of a job that
    // succeeded, when no poll may follow the last steps).
    let mut reported = Progress {
        step: trainer.steps_done(),
        total_steps,
        last_checkpoint_step: run.saved_step,
        best_checkpoint_step: run.best_step(),
        fabric: fabric.clone(),
        eval_loss: run.last_eval,
        ..Progress::default()
    };
    // A single process stops between micro-batches; ranks must stop at the
    // same step boundary, which they agree on before each step.
    let solo = dp.size() == 1;
    let stop_within_step = || solo && stop.load(Ordering::Relaxed);
    while trainer.steps_done() < total_steps {
        if any_rank_stopping(dp, stop)? {
            interrupted = true;
            break;
        }
        let Some(report) = trainer.step(&stop_within_step, dp, parallel)? else {
            interrupted = true;
            break;
        };
        run.initial_loss.get_or_insert(report.loss);
        run.last_loss = Some(report.loss);
        let eval_loss = match (&mut evaluation, &settings.evaluation) {
            (Some(eval), Some(e)) if e.due(report.step, total_steps) => {
                let loss = trainer.evaluate(eval, dp, parallel)?;
                tracing::info!(
                    step = report.step,
                    eval_loss = loss,
                    "evaluated on held-out data"
                );
                (run.last_eval, run.evaluated_step) = (Some(loss), Some(report.step));
                // Every rank has the same loss, so every rank stops alike.
                if let Some(n) = e.patience
                    && run.patience.exhausted_after(loss, n)
                {
                    tracing::info!(
                        step = report.step,
                        evaluations = n,
                        "stopping early: the held-out loss has not improved on its best (training.evaluation.patience)"
                    );
                    stopped_early = true;
                }
                Some(loss)
            }
            _ => None,
        };
        tokens_done += report.tokens;
        interval.tokens += report.tokens;
        interval.flops += report.flops;
        interval.steps += 1;
        let balance = Balance::of(
            &report.expert_loads,
            report.tokens,
            settings.model.moe.top_k,
            settings.model.dense_layers,
        );
        if report.step.is_multiple_of(settings.training.log_interval)
            || report.step == total_steps
            || eval_loss.is_some()
        {
            let pace = interval.pace(peak, gpus);
            let line = MetricsLine {
                eval_loss,
                ..metrics_line(&report, pace, &settings, &balance)
            };
            interval = Interval::new();
            last_pace = Some(pace);
            if let Some(metrics) = &mut metrics {
                tracing::info!(
                    step = report.step,
                    loss = report.loss,
                    lr = report.learning_rate,
                    grad_norm = report.grad_norm,
                    tokens_per_second = pace.tokens_per_second,
                    "step"
                );
                write_line(metrics, &metrics_path, &line)?;
            }
        }
        // Every step, not only logged ones: the operator's hang watchdog
        // (runPolicy.progressDeadlineSeconds) reads a step that stops
        // moving as a hung gang.
        reported = Progress {
            step: report.step,
            total_steps,
            loss: Some(report.loss),
            tokens_per_second: last_pace.map(|p| p.tokens_per_second),
            seconds_per_step: last_pace.and_then(|p| p.seconds_per_step),
            mfu: last_pace.and_then(|p| p.mfu),
            last_checkpoint_step: run.saved_step,
            best_checkpoint_step: run.best_step(),
            expert_load: balance.as_ref().map(Balance::worst),
            fabric: fabric.clone(),
            eval_loss: run.last_eval,
            stopped_early: false,
        };
        if let Some(board) = board {
            board.publish(reported.clone());
            if let Some(balance) = &balance {
                board.publish_balance(balance);
            }
        }
        if report
            .step
            .is_multiple_of(settings.checkpoint.interval_steps)
            || report.step == total_steps
        {
            save(&settings, &mut trainer, &mut run, &gang, dp, experts)?;
            reported.last_checkpoint_step = run.saved_step;
            reported.best_checkpoint_step = run.best_step();
            if let Some(board) = board {
                board.publish(reported.clone());
            }
        }
        if stopped_early {
            break;
        }
    }
    if interrupted {
        tracing::info!(
            step = trainer.steps_done(),
            "stop requested: checkpointing and exiting"
        );
    }
    let unsaved = trainer.steps_done() > 0 && run.saved_step != Some(trainer.steps_done());
    if (interrupted || stopped_early) && unsaved {
        save(&settings, &mut trainer, &mut run, &gang, dp, experts)?;
        reported.last_checkpoint_step = run.saved_step;
        reported.best_checkpoint_step = run.best_step();
    }
    reported.stopped_early = stopped_early;
    if let Some(board) = board {
        board.publish(reported.clone());
    }
    let training_seconds = training_started.elapsed().as_secs_f64();
    if let Some(ep) = experts {
        // Each rank's own traffic: the tokens it routes depend on its data.
        let steps = (trainer.steps_done() - resumed_at).max(1);
        tracing::info!(
            rank = dp.rank(),
            steps,
            bytes_per_step = ep.bytes_sent() / steps,
            "expert-parallel token exchange: payload bytes this rank sent to other ranks"
        );
    }
    if let Some(sp) = parallel.sequence {
        // The same on every rank: each switch sends (sp-1)/sp of a tensor.
        let steps = (trainer.steps_done() - resumed_at).max(1);
        tracing::info!(
            rank = dp.rank(),
            steps,
            bytes_per_step = sp.bytes_sent() / steps,
            "sequence-parallel attention all-to-alls: payload bytes this rank sent to other ranks"
        );
        if sp.bytes_summed() > 0 {
            tracing::info!(
                rank = dp.rank(),
                steps,
                bytes_per_step = sp.bytes_summed() / steps,
                "sequence-parallel balance-loss statistics: payload bytes this rank summed over its group"
            );
        }
    }
    Ok(Summary {
        steps: trainer.steps_done(),
        final_loss: run.last_loss,
        eval_loss: run.last_eval,
        initial_loss: run.initial_loss,
        unigram_entropy,
        unigram_entropy_bits: unigram_entropy / std::f64::consts::LN_2,
        tokens_per_second: if training_seconds > 0.0 {
            tokens_done as f64 / training_seconds
        } else {
            0.0
        },
        wall_seconds: started.elapsed().as_secs_f64(),
        checkpoint: run.checkpoint,
        best_checkpoint: run.best.map(|(_, path)| path),
        interrupted,
        stopped_early,
        report: reported,
    })
}

/// The trainer a run drives: the CPU's, or the GPU's with the CPU one as
/// the host copy that checkpoints are written from and restored into.
enum Backend {
    Cpu(Box<Trainer>),
    #[cfg(feature = "cuda")]
    Cuda {
        host: Box<Trainer>,
        device: Box<crate::cuda::trainer::DeviceTrainer<'static>>,
    },
}

impl Backend {
    /// Moves `host` (fresh or resumed) onto the GPU.
    #[cfg(feature = "cuda")]
    fn cuda(gpu: &'static crate::cuda::Gpu, host: Trainer) -> Result<Self, RunError> {
        let device = crate::cuda::trainer::DeviceTrainer::resume(gpu, &host)?;
        Ok(Self::Cuda {
            host: Box::new(host),
            device: Box::new(device),
        })
    }

    fn steps_done(&self) -> u64 {
        match self {
            Self::Cpu(trainer) => trainer.steps_done(),
            #[cfg(feature = "cuda")]
            Self::Cuda { device, .. } => device.steps_done(),
        }
    }

    /// One step as a rank of `dp` (with sequences and the routed experts
    /// spread over `parallel`'s groups, if given).
    fn step(
        &mut self,
        stop: &dyn Fn() -> bool,
        dp: &mut dyn Collective,
        parallel: Parallel<'_>,
    ) -> Result<Option<StepReport>, RunError> {
        match self {
            Self::Cpu(trainer) => Ok(trainer.step_parallel(stop, dp, parallel)?),
            #[cfg(feature = "cuda")]
            Self::Cuda { device, .. } => Ok(device.step_with(stop, dp, parallel)?),
        }
    }

    /// The loss on `eval`'s held-out sequences as a rank of `dp`.
    fn evaluate(
        &mut self,
        eval: &mut Evaluation,
        dp: &mut dyn Collective,
        parallel: Parallel<'_>,
    ) -> Result<f64, RunError> {
        match self {
            Self::Cpu(trainer) => Ok(trainer.evaluate_parallel(eval, dp, parallel)?),
            #[cfg(feature = "cuda")]
            Self::Cuda { device, .. } => Ok(device.evaluate_with(eval, dp, parallel)?),
        }
    }

    /// The trainer to checkpoint from, brought up to date with the GPU's.
    fn host_state(&mut self) -> Result<&Trainer, RunError> {
        match self {
            Self::Cpu(trainer) => Ok(trainer),
            #[cfg(feature = "cuda")]
            Self::Cuda { host, device } => {
                device.download_into(host)?;
                Ok(host)
            }
        }
    }
}

/// The pod's GPU ([`crate::cuda::open_process_gpu`]).
#[cfg(feature = "cuda")]
fn open_gpu() -> Result<&'static crate::cuda::Gpu, RunError> {
    let (gpu, ordinal) = crate::cuda::open_process_gpu()?;
    // Every kernel family compiled now, side by side, rather than one by one
    // as the first step meets them.
    let compiled = std::time::Instant::now();
    gpu.warm_up()?;
    tracing::info!(
        seconds = compiled.elapsed().as_secs_f64(),
        "kernels compiled and loaded"
    );
    tracing::info!(
        device = %gpu.name().unwrap_or_default(),
        arch = gpu.arch(),
        ordinal,
        libraries = %gpu.libraries(),
        "training on the GPU"
    );
    Ok(gpu)
}

/// What the run carries besides the trainer.
#[derive(Default)]
struct RunState {
    initial_loss: Option<f64>,
    last_loss: Option<f64>,
    /// The loss on held-out data at the last evaluation (of this attempt,
    /// or the checkpoint's it resumed from), and its step.
    last_eval: Option<f64>,
    evaluated_step: Option<u64>,
    checkpoint: Option<PathBuf>,
    saved_step: Option<u64>,
    /// `training.evaluation.keepBest`: the checkpoint with the lowest
    /// held-out loss so far (rank 0's view, after each save).
    best: Option<(u64, PathBuf)>,
    /// `training.evaluation.patience`'s count, restored on resume.
    patience: Patience,
}

impl RunState {
    fn best_step(&self) -> Option<u64> {
        self.best.as_ref().map(|(step, _)| *step)
    }
}

/// Tokens, model FLOPs and time since the last metrics line.
struct Interval {
    started: Instant,
    tokens: usize,
    /// As the steps ran ([`StepReport::flops`]): padding cut is not counted.
    flops: f64,
    steps: u64,
}

impl Interval {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            tokens: 0,
            flops: 0.0,
            steps: 0,
        }
    }

    /// The interval's pace; its MFU on `gpus` GPUs of dense bf16 peak
    /// `peak` (when known).
    fn pace(&self, peak: Option<f64>, gpus: usize) -> Pace {
        let seconds = self.started.elapsed().as_secs_f64();
        let per_second = |amount: f64| if seconds > 0.0 { amount / seconds } else { 0.0 };
        Pace {
            tokens_per_second: per_second(self.tokens as f64),
            seconds_per_step: (self.steps > 0).then(|| seconds / self.steps as f64),
            mfu: peak.map(|peak| flops::mfu(per_second(self.flops), gpus, peak)),
        }
    }
}

/// Loads the newest complete checkpoint, if there is one.
fn resume(
    settings: &TrainSettings,
    trainer: &mut Trainer,
    run: &mut RunState,
) -> Result<(), RunError> {
    let Some(path) = checkpoint::newest(&settings.checkpoint.dir)? else {
        tracing::info!(dir = %settings.checkpoint.dir.display(), "no checkpoint: starting from step 0");
        return Ok(());
    };
    // Only the shards holding this rank's experts are read.
    let held = trainer.held_experts();
    let restored = checkpoint::load_experts(&path, &settings.model_spec, &settings.model, held)?;
    let manifest = &restored.manifest;
    if manifest.seed != settings.training.seed {
        tracing::warn!(
            checkpoint_seed = manifest.seed,
            config_seed = settings.training.seed,
            "training.seed differs from the checkpoint's; continuing with the checkpoint's data position"
        );
    }
    tracing::info!(checkpoint = %path.display(), step = manifest.step, "resuming");
    run.initial_loss = manifest.initial_loss;
    run.last_loss = manifest.loss;
    if manifest.eval_loss.is_some() {
        (run.last_eval, run.evaluated_step) = (manifest.eval_loss, Some(manifest.step));
    }
    run.patience = manifest.patience.unwrap_or_default();
    run.saved_step = Some(manifest.step);
    run.checkpoint = Some(restored.path);
    if settings.checkpoint.keep_best {
        run.best = checkpoint::best(&settings.checkpoint.dir, manifest.step)?;
    }
    trainer.restorable(&restored.state).map_err(|problem| {
        SettingsError::new(
            "training.lora",
            format!(
                "cannot resume from checkpoint {}: {problem}; use another checkpoint.dir or set checkpoint.resume to Never",
                path.display()
            ),
        )
    })?;
    trainer.restore(restored.state);
    Ok(())
}

/// The weights of our own checkpoint at `dir` (another job's, e.g. a
/// pretraining run's final step), for `model.initFrom`: the same model,
/// its tokens from the same tokenizer; its optimizer state, step and data
/// position are not carried over.
fn init_from_checkpoint(
    settings: &TrainSettings,
    dir: &Path,
    experts: std::ops::Range<usize>,
) -> Result<crate::model::Model<f32>, RunError> {
    let invalid = |problem: String| SettingsError::new("model.initFrom", problem);
    let (manifest, model) = match checkpoint::load_model_for_init(
        dir,
        &settings.model_spec,
        &settings.model,
        experts,
    ) {
        Err(checkpoint::CheckpointError::ModelMismatch { path, differences }) => {
            return Err(invalid(format!(
                "checkpoint {} is of another model: {}",
                path.display(),
                differences.join("; ")
            ))
            .into());
        }
        loaded => loaded?,
    };
    let tokenizer = settings.data.tokenizer();
    if manifest.tokenizer != tokenizer {
        return Err(invalid(format!(
            "checkpoint {} was trained on tokens of the {:?} tokenizer, data.tokenizer is {tokenizer:?}",
            dir.display(),
            manifest.tokenizer
        ))
        .into());
    }
    tracing::info!(checkpoint = %dir.display(), step = manifest.step, "starting from a checkpoint's weights");
    Ok(model)
}

/// This rank's part in a data-parallel run.
struct Gang {
    /// Rank 0: writes checkpoints and metrics.
    leader: bool,
    timeouts: Timeouts,
}

/// Whether any rank was asked to stop (SIGTERM): one tiny all-reduce per
/// step, so that every rank stops after the same step and rank 0's last
/// checkpoint is of a step every rank completed.
fn any_rank_stopping(dp: &mut dyn Collective, stop: &AtomicBool) -> Result<bool, DistError> {
    let mut flag = [if stop.load(Ordering::Relaxed) {
        1.0
    } else {
        0.0
    }];
    if dp.size() > 1 {
        dp.all_reduce_max(&mut flag)?;
    }
    Ok(flag[0] > 0.0)
}

/// Fails unless every rank resumed at the same step: ranks that read
/// different checkpoints (a directory not shared between nodes, say) would
/// otherwise train different models without noticing.
fn same_step_everywhere(dp: &mut dyn Collective, step: u64) -> Result<(), RunError> {
    let size = dp.size();
    if size == 1 {
        return Ok(());
    }
    let mut all = vec![0u8; 8 * size];
    dp.all_gather_bytes(&step.to_le_bytes(), &vec![8; size], &mut all)?;
    let steps: Vec<u64> = all
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
        .collect();
    if steps.iter().any(|&s| s != step) {
        return Err(SettingsError::new(
            "checkpoint.dir",
            format!(
                "the ranks resumed from different steps {steps:?} (by rank): every rank must see the same checkpoint directory"
            ),
        )
        .into());
    }
    Ok(())
}

/// Rank 0 writes a checkpoint; the others wait for it at a barrier, so no
/// rank runs ahead of a checkpoint that may still fail, and the wait is
/// bounded by the checkpoint timeout rather than the (short) collective one.
/// With expert parallelism the owners of the routed experts write their
/// shards first ([`save_sharded`]).
fn save(
    settings: &TrainSettings,
    backend: &mut Backend,
    run: &mut RunState,
    gang: &Gang,
    dp: &mut dyn Collective,
    experts: Option<&ExpertParallel>,
) -> Result<(), RunError> {
    if let Some(ep) = experts {
        dp.set_timeout(gang.timeouts.checkpoint)?;
        save_sharded(settings, backend, run, gang, dp, ep)?;
        dp.set_timeout(gang.timeouts.collective)?;
        return Ok(());
    }
    if gang.leader {
        let dir = &settings.checkpoint.dir;
        let temporary = checkpoint::begin(dir, backend.steps_done())?;
        write_checkpoint(settings, backend, run, &temporary, Vec::new())?;
    } else {
        run.saved_step = Some(backend.steps_done());
    }
    if dp.size() > 1 {
        dp.set_timeout(gang.timeouts.checkpoint)?;
        dp.barrier()?;
        dp.set_timeout(gang.timeouts.collective)?;
    }
    Ok(())
}

/// A sharded checkpoint: rank 0 makes the temporary directory; the first
/// expert-parallel group (world ranks `0..ep`, rank `q` owning the `q`-th
/// slice of the experts; the other groups hold identical replicas) writes
/// one shard each and tells rank 0 its size and checksum; rank 0 writes the
/// rest and the manifest, the commit point, last. A rank failing anywhere
/// fails the save for all (its peers see it leave), and no manifest names a
/// shard that was not completely written.
fn save_sharded(
    settings: &TrainSettings,
    backend: &mut Backend,
    run: &mut RunState,
    gang: &Gang,
    dp: &mut dyn Collective,
    ep: &ExpertParallel,
) -> Result<(), RunError> {
    let (dir, step) = (&settings.checkpoint.dir, backend.steps_done());
    let temporary = if gang.leader {
        checkpoint::begin(dir, step)?
    } else {
        checkpoint::temporary_dir(dir, step)
    };
    dp.barrier()?;
    // first, end, bytes, checksum: what the manifest records of a shard.
    let mut entry = [0u64; 4];
    if dp.rank() < ep.size() {
        let trainer = backend.host_state()?;
        let shard = checkpoint::write_expert_shard(
            &temporary,
            &snapshot(settings, trainer, run),
            ep.local_experts(),
        )?;
        let checksum = u64::from_str_radix(&shard.fnv1a, 16).unwrap_or_default();
        entry = [shard.first as u64, shard.end as u64, shard.bytes, checksum];
    }
    let mine: Vec<u8> = entry.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut all = vec![0u8; 32 * dp.size()];
    dp.all_gather_bytes(&mine, &vec![32; dp.size()], &mut all)?;
    if gang.leader {
        let shards = all
            .chunks_exact(32)
            .take(ep.size())
            .map(|b| {
                let word = |i: usize| {
                    u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().unwrap_or_default())
                };
                let experts = word(0) as usize..word(1) as usize;
                checkpoint::ExpertShard {
                    file: checkpoint::expert_shard_name(&experts),
                    first: experts.start,
                    end: experts.end,
                    bytes: word(2),
                    fnv1a: format!("{:016x}", word(3)),
                }
            })
            .collect();
        write_checkpoint(settings, backend, run, &temporary, shards)?;
    } else {
        run.saved_step = Some(step);
    }
    dp.barrier()?;
    Ok(())
}

/// What a checkpoint records of `trainer` and the run.
fn snapshot<'a>(settings: &'a TrainSettings, trainer: &'a Trainer, run: &RunState) -> Snapshot<'a> {
    Snapshot {
        model_spec: &settings.model_spec,
        seed: settings.training.seed,
        data: trainer.data_position(),
        tokenizer: settings.data.tokenizer(),
        tokenizer_file: settings.data.tokenizer_file(),
        initial_loss: run.initial_loss,
        loss: run.last_loss,
        // Only a loss of this very step ranks the checkpoint.
        eval_loss: run
            .last_eval
            .filter(|_| run.evaluated_step == Some(trainer.steps_done())),
        patience: settings
            .evaluation
            .as_ref()
            .and_then(|e| e.patience)
            .map(|_| run.patience),
        model: trainer.model(),
        optimizer: trainer.optimizer(),
        lora: trainer.lora(),
    }
}

/// Rank 0's part of a save: everything but `expert_shards`, then the manifest.
fn write_checkpoint(
    settings: &TrainSettings,
    backend: &mut Backend,
    run: &mut RunState,
    temporary: &Path,
    expert_shards: Vec<checkpoint::ExpertShard>,
) -> Result<(), RunError> {
    let trainer = backend.host_state()?;
    let path = checkpoint::commit(
        &settings.checkpoint.dir,
        settings.checkpoint.retention(),
        &snapshot(settings, trainer, run),
        temporary,
        expert_shards,
    )?;
    tracing::info!(checkpoint = %path.display(), "checkpoint written");
    run.saved_step = Some(trainer.steps_done());
    run.checkpoint = Some(path);
    if settings.checkpoint.keep_best {
        run.best = checkpoint::best(&settings.checkpoint.dir, trainer.steps_done())?;
    }
    Ok(())
}

/// Runs `parallelism.fabricCheck` on every rank: rank 0 logs the figure
/// and publishes it; every rank fails alike below the floor.
fn fabric_check(
    dp: &mut dyn Collective,
    check: &moe_crds::FabricCheck,
    board: Option<&crate::status::Board>,
) -> Result<FabricMeasurement, RunError> {
    let bytes = (check.message_mib.max(1) as usize) << 20;
    let report = preflight::measure_all_to_all(dp, bytes)?;
    let measured = FabricMeasurement {
        all_to_all_mbps: report.bus_mbps.round() as i64,
        ranks: report.ranks as i32,
        message_bytes: report.message_bytes as i64,
    };
    if dp.rank() == 0 {
        tracing::info!(
            bus_mbps = measured.all_to_all_mbps,
            ranks = report.ranks,
            message_bytes = report.message_bytes,
            round_ms = report.seconds * 1e3,
            floor_mbps = check.min_all_to_all_mbps,
            "fabric check: all-to-all"
        );
        if let Some(board) = board {
            board.publish(Progress {
                fabric: Some(measured.clone()),
                ..board.progress()
            });
        }
    }
    report
        .check(check.min_all_to_all_mbps)
        .map_err(RunError::Fabric)?;
    Ok(measured)
}

fn metrics_line(
    report: &StepReport,
    pace: Pace,
    settings: &TrainSettings,
    balance: &Option<Balance>,
) -> MetricsLine {
    let moe = &settings.model.moe;
    MetricsLine {
        step: report.step,
        loss: report.loss,
        aux_loss: report.aux_loss,
        lr: report.learning_rate,
        grad_norm: report.grad_norm,
        trained_tokens: report.trained_tokens,
        pace,
        expert_load_max: report
            .expert_loads
            .iter()
            .flatten()
            .copied()
            .max()
            .unwrap_or(0),
        expert_load_mean: (report.tokens * moe.top_k) as f64 / moe.n_routed_experts as f64,
        expert_load_max_violation: balance.as_ref().map(|b| b.worst().max_violation),
        eval_loss: None,
    }
}

fn open_append(path: &Path) -> Result<File, RunError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|error| RunError::Output {
            path: path.to_path_buf(),
            error,
        })
}

fn write_line(file: &mut File, path: &Path, line: &MetricsLine) -> Result<(), RunError> {
    let json = serde_json::to_string(line).expect("metrics always serialise");
    writeln!(file, "{json}").map_err(|error| RunError::Output {
        path: path.to_path_buf(),
        error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_crds::ElasticSpec;

    fn gang(world_size: usize) -> DistEnv {
        DistEnv {
            world_size,
            rank: 0,
            node_rank: 0,
            procs_per_node: 2,
            local_rank: 0,
            launcher: false,
            coordinator: "rank0:29400".into(),
            attempt: 1,
        }
    }

    fn config(elastic: Option<ElasticSpec>) -> WorkerConfig {
        let mut config: WorkerConfig = serde_json::from_value(serde_json::json!({
            "job": "local/test",
            "model": {"hiddenSize": 32, "layers": 2, "attentionHeads": 4, "kvHeads": 2, "seqLen": 32,
                      "moe": {"experts": 4, "topK": 2, "expertHiddenSize": 32}},
            "data": {"builtin": {"corpus": "tiny"}},
            "training": {"steps": 6, "globalBatchSize": 8, "microBatchSize": 1},
            "parallelism": {"nodes": 4, "processesPerNode": 2},
            "checkpoint": {"dir": "ckpt", "intervalSteps": 3, "keep": 2, "resume": "Auto"},
            "device": "cpu",
            "outputDir": "out"
        }))
        .expect("a valid WorkerConfig");
        config.parallelism.elastic = elastic;
        config
    }

    #[test]
    fn an_elastic_gang_reads_the_config_with_the_nodes_its_attempt_has() {
        let elastic = Some(ElasticSpec {
            min_nodes: 2,
            shrink_after_seconds: 300,
            grow: true,
        });
        // 2 nodes × 2 processes: the shrunk attempt trains, on 2 nodes.
        let sized = sized_for_gang(config(elastic.clone()), &gang(4));
        assert_eq!(sized.parallelism.nodes, 2);
        let settings = gang_settings(&sized, &gang(4)).expect("a 2-node gang trains");
        assert_eq!(settings.world_size, 4);
        // The whole gang reads it unchanged.
        assert_eq!(
            sized_for_gang(config(elastic.clone()), &gang(8))
                .parallelism
                .nodes,
            4
        );
        // Below minNodes, or not whole nodes: unchanged, and refused.
        for world in [2, 5] {
            let sized = sized_for_gang(config(elastic.clone()), &gang(world));
            assert_eq!(sized.parallelism.nodes, 4, "world {world}");
            let err = gang_settings(&sized, &gang(world)).unwrap_err().to_string();
            assert!(err.contains("asks for 8 ranks"), "{err}");
        }
    }

    #[test]
    fn a_fixed_gang_is_held_to_its_nodes() {
        let sized = sized_for_gang(config(None), &gang(4));
        assert_eq!(sized.parallelism.nodes, 4);
        let err = gang_settings(&sized, &gang(4)).unwrap_err().to_string();
        assert!(err.contains("asks for 8 ranks (nodes 4"), "{err}");
    }
}
