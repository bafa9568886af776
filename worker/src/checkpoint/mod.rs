//! Checkpoints: one directory per optimizer step under `checkpoint.dir`.
//!
//! A checkpoint is written into `.tmp-step-N`, every file fsynced, the
//! manifest written last, then the directory renamed to `step-N` (zero
//! padded) and the parent fsynced. A crash at any point leaves either a
//! complete `step-*` directory or a `.tmp-*` one, which loading ignores and
//! the next save removes. Loading never falls back silently: a newest
//! checkpoint that is corrupt or belongs to another model shape is an error.
//!
//! With expert parallelism the save is split between ranks ([`begin`],
//! [`write_expert_shard`], [`commit`]): rank 0 makes the temporary
//! directory, each owner of a slice of the routed experts writes its shard
//! into it, and once every shard is written rank 0 writes the state file
//! (everything else) and the manifest naming the shards with their sizes
//! and checksums, then renames. The manifest is still the commit point, so
//! a crash of any rank leaves a `.tmp-*` directory, never a half checkpoint.
//! Loading for a rank that holds only some routed experts ([`load_experts`])
//! reads just the shards holding them (or their rows of an unsharded
//! state file), whatever expert parallelism wrote it: resuming with
//! another one reshards, and no rank ever holds every expert.

mod manifest;
mod state_file;

use std::fmt;
use std::fs::{self, File};
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use moe_crds::{ModelSpec, Tokenizer};

use crate::data::DataPosition;
use crate::model::{Model, ModelConfig};
use crate::train::lora::{Lora, LoraSettings};
use crate::train::{AdamW, TrainerState};

pub use manifest::{ExpertShard, FORMAT_VERSION, LoraFile, Manifest};

const MANIFEST: &str = "manifest.json";
/// The Hugging Face tokenizer the run's tokens came from, copied in (when
/// the run has one) so the checkpoint can be served on its own.
pub const TOKENIZER: &str = "tokenizer.json";

const STATE: &str = "state.safetensors";
const LORA: &str = "lora.safetensors";
const PREFIX: &str = "step-";
const TEMPORARY_PREFIX: &str = ".tmp-";

#[derive(Debug)]
pub enum CheckpointError {
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    Corrupt {
        path: PathBuf,
        problem: String,
    },
    /// The checkpoint's model differs from the config's; each entry names a field.
    ModelMismatch {
        path: PathBuf,
        differences: Vec<String>,
    },
}

impl fmt::Display for CheckpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io { path, error } => write!(f, "checkpoint I/O on {}: {error}", path.display()),
            Self::Corrupt { path, problem } => write!(
                f,
                "checkpoint {} is corrupt: {problem}; remove it to resume from an older one, or set checkpoint.resume to Never",
                path.display()
            ),
            Self::ModelMismatch { path, differences } => write!(
                f,
                "checkpoint {} was written for a different model shape: {}; use another checkpoint.dir or set checkpoint.resume to Never",
                path.display(),
                differences.join("; ")
            ),
        }
    }
}

impl std::error::Error for CheckpointError {}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |error| CheckpointError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// What a checkpoint records besides the tensors.
#[derive(Clone, Debug)]
pub struct Snapshot<'a> {
    pub model_spec: &'a ModelSpec,
    pub seed: u64,
    pub data: DataPosition,
    pub tokenizer: Tokenizer,
    /// The run's `tokenizer.json`, when it has one ([`TOKENIZER`]).
    pub tokenizer_file: Option<&'a Path>,
    pub initial_loss: Option<f64>,
    pub loss: Option<f64>,
    /// The held-out loss at this step, if it was evaluated.
    pub eval_loss: Option<f64>,
    /// Where `training.evaluation.patience` stands, with one.
    pub patience: Option<crate::settings::Patience>,
    pub model: &'a Model<f32>,
    pub optimizer: &'a AdamW,
    /// `training.lora`'s adapters (`model` then holds the merged weights).
    pub lora: Option<&'a Lora>,
}

impl Snapshot<'_> {
    /// The moments a checkpoint keeps of the weights: none when only
    /// adapters were trained (theirs are in the adapters' file).
    fn moments(&self) -> state_file::Moments<'_> {
        self.lora
            .is_none()
            .then_some([&self.optimizer.first_moment, &self.optimizer.second_moment])
    }
}

/// A loaded checkpoint.
#[derive(Clone, Debug)]
pub struct Restored {
    pub path: PathBuf,
    pub manifest: Manifest,
    pub state: TrainerState,
}

/// The directory name of step `step`.
pub fn step_dir_name(step: u64) -> String {
    moe_crds::contract::checkpoint_dir_name(step)
}

/// Which complete checkpoints a save leaves (of those up to its step).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// The newest this many (`checkpoint.keep`).
    pub newest: usize,
    /// And the one with the lowest held-out loss ([`best`];
    /// `training.evaluation.keepBest`).
    pub best: bool,
}

impl From<usize> for Retention {
    fn from(newest: usize) -> Self {
        Self {
            newest,
            best: false,
        }
    }
}

/// Writes the checkpoint of step `snapshot.optimizer.updates` under `dir`
/// (replacing one of the same step), then deletes the complete checkpoints
/// up to that step that `keep` does not retain. Returns its path.
pub fn save(
    dir: &Path,
    keep: impl Into<Retention>,
    snapshot: &Snapshot<'_>,
) -> Result<PathBuf, CheckpointError> {
    let temporary = begin(dir, snapshot.optimizer.updates)?;
    commit(dir, keep, snapshot, &temporary, Vec::new())
}

/// Where the checkpoint of `step` is assembled before its rename.
pub fn temporary_dir(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("{TEMPORARY_PREFIX}{}", step_dir_name(step)))
}

/// The file holding routed experts `experts` of a sharded checkpoint.
pub fn expert_shard_name(experts: &Range<usize>) -> String {
    format!(
        "experts-{:05}-{:05}.safetensors",
        experts.start, experts.end
    )
}

/// The first part of a save (rank 0 alone): removes leftover temporaries and
/// makes an empty [`temporary_dir`] for `step`.
pub fn begin(dir: &Path, step: u64) -> Result<PathBuf, CheckpointError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    remove_temporaries(dir)?;
    let temporary = temporary_dir(dir, step);
    fs::create_dir(&temporary).map_err(io(&temporary))?;
    Ok(temporary)
}

/// An expert owner's part of a sharded save, after [`begin`]: experts
/// `experts` of every routed-expert tensor (weights and moments) into
/// `temporary`, fsynced. Returns the manifest's entry for it.
pub fn write_expert_shard(
    temporary: &Path,
    snapshot: &Snapshot<'_>,
    experts: Range<usize>,
) -> Result<ExpertShard, CheckpointError> {
    let bytes = state_file::encode_experts(snapshot.model, snapshot.moments(), experts.clone())
        .map_err(|problem| CheckpointError::Corrupt {
            path: temporary.to_path_buf(),
            problem,
        })?;
    let file = expert_shard_name(&experts);
    write_synced(&temporary.join(&file), &bytes)?;
    Ok(ExpertShard {
        file,
        first: experts.start,
        end: experts.end,
        bytes: bytes.len() as u64,
        fnv1a: manifest::fnv1a(&bytes),
    })
}

/// The last part of a save (rank 0, once every shard in `shards` is
/// written): the state file (without the routed experts when there are
/// shards), the manifest last, the rename, and pruning as in [`save`].
pub fn commit(
    dir: &Path,
    keep: impl Into<Retention>,
    snapshot: &Snapshot<'_>,
    temporary: &Path,
    expert_shards: Vec<ExpertShard>,
) -> Result<PathBuf, CheckpointError> {
    let step = snapshot.optimizer.updates;
    let final_path = dir.join(step_dir_name(step));
    let corrupt = |problem: String| CheckpointError::Corrupt {
        path: temporary.to_path_buf(),
        problem,
    };
    let n_experts = snapshot.model.config().moe.n_routed_experts;
    if !expert_shards.is_empty() {
        shards_cover(&expert_shards, n_experts).map_err(corrupt)?;
    }
    let state = state_file::encode(
        snapshot.model,
        snapshot.moments(),
        !expert_shards.is_empty(),
    )
    .map_err(corrupt)?;
    write_synced(&temporary.join(STATE), &state)?;
    let lora = match snapshot.lora {
        Some(lora) => {
            let bytes = state_file::encode_lora(lora).map_err(corrupt)?;
            write_synced(&temporary.join(LORA), &bytes)?;
            Some(LoraFile {
                settings: lora.settings().spec(),
                file: LORA.to_owned(),
                bytes: bytes.len() as u64,
                fnv1a: manifest::fnv1a(&bytes),
            })
        }
        None => None,
    };
    if let Some(tokenizer) = snapshot.tokenizer_file {
        // The tokenizer as `tokenizer.json`, its companions by their names.
        for (file, name) in crate::data::tokenizer_files(tokenizer) {
            let bytes = fs::read(&file).map_err(io(&file))?;
            write_synced(&temporary.join(name.unwrap_or(TOKENIZER)), &bytes)?;
        }
    }
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        step,
        model: snapshot.model_spec.clone(),
        seed: snapshot.seed,
        data: snapshot.data,
        tokenizer: snapshot.tokenizer,
        initial_loss: snapshot.initial_loss,
        loss: snapshot.loss,
        eval_loss: snapshot.eval_loss,
        patience: snapshot.patience,
        state_file: STATE.to_owned(),
        state_bytes: state.len() as u64,
        state_fnv1a: manifest::fnv1a(&state),
        expert_shards,
        lora,
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("a manifest always serialises");
    write_synced(&temporary.join(MANIFEST), &json)?;
    sync_dir(temporary)?;
    if final_path.exists() {
        // Same step from an earlier run (resume Never): move it aside first so
        // a crash in between still leaves one complete checkpoint or a `.tmp-*`.
        let replaced = dir.join(format!(
            "{TEMPORARY_PREFIX}replaced-{}",
            step_dir_name(step)
        ));
        fs::rename(&final_path, &replaced).map_err(io(&final_path))?;
        fs::rename(temporary, &final_path).map_err(io(&final_path))?;
        fs::remove_dir_all(&replaced).map_err(io(&replaced))?;
    } else {
        fs::rename(temporary, &final_path).map_err(io(&final_path))?;
    }
    sync_dir(dir)?;
    prune(dir, step, keep.into())?;
    Ok(final_path)
}

/// Whether the shards hold experts `0..n_experts`, each once, in order.
fn shards_cover(shards: &[ExpertShard], n_experts: usize) -> Result<(), String> {
    let mut next = 0;
    for shard in shards {
        if shard.first != next || shard.end <= shard.first {
            return Err(format!(
                "expert shard {} holds experts {}..{} where {next}.. was expected",
                shard.file, shard.first, shard.end
            ));
        }
        next = shard.end;
    }
    if next != n_experts {
        return Err(format!(
            "the expert shards end at expert {next} of {n_experts}"
        ));
    }
    Ok(())
}

/// The complete checkpoint up to `step` whose manifest records the lowest
/// held-out loss (the earliest of equals: a later one is no improvement),
/// as `(step, path)`; `None` if none records one.
pub fn best(dir: &Path, step: u64) -> Result<Option<(u64, PathBuf)>, CheckpointError> {
    let mut complete = complete_checkpoints(dir)?;
    complete.retain(|(s, _)| *s <= step);
    complete.sort_by_key(|(s, _)| *s);
    let mut best: Option<(f64, u64, PathBuf)> = None;
    for (s, path) in complete {
        let Some(loss) = read_manifest(&path)?.eval_loss else {
            continue;
        };
        if best.as_ref().is_none_or(|(b, _, _)| loss < *b) {
            best = Some((loss, s, path));
        }
    }
    Ok(best.map(|(_, s, path)| (s, path)))
}

/// The newest complete checkpoint under `dir` (a `step-N` directory with a
/// manifest), if any; `.tmp-*` directories are ignored. A missing `dir` has none.
pub fn newest(dir: &Path) -> Result<Option<PathBuf>, CheckpointError> {
    Ok(complete_checkpoints(dir)?
        .into_iter()
        .max_by_key(|(step, _)| *step)
        .map(|(_, path)| path))
}

/// Loads the checkpoint at `path` for a run of `model_spec` (`config` its
/// checked form), refusing a different model shape and anything corrupt.
pub fn load(
    path: &Path,
    model_spec: &ModelSpec,
    config: &ModelConfig,
) -> Result<Restored, CheckpointError> {
    load_experts(path, model_spec, config, 0..config.moe.n_routed_experts)
}

/// [`load`] into a state holding only routed experts `experts` (an
/// expert-parallel rank's): of a sharded checkpoint only the shards
/// overlapping them are read and checked.
pub fn load_experts(
    path: &Path,
    model_spec: &ModelSpec,
    config: &ModelConfig,
    experts: Range<usize>,
) -> Result<Restored, CheckpointError> {
    let corrupt = corruption(path);
    let manifest = checked_manifest(path, model_spec)?;
    let state = verified_state(path, &manifest)?;
    let sharded = !manifest.expert_shards.is_empty();
    // A LoRA run's weights were frozen: only its adapters have moments.
    let with_moments = manifest.lora.is_none();
    let mut state = state_file::decode(
        &state,
        config,
        manifest.step,
        manifest.data,
        sharded,
        experts.clone(),
        with_moments,
    )
    .map_err(|problem| corrupt(format!("{}: {problem}", manifest.state_file)))?;
    for shard in needed_shards(&manifest, config, &experts).map_err(&corrupt)? {
        let bytes = verified(path, &shard.file, shard.bytes, &shard.fnv1a)?;
        state_file::decode_experts_into(&bytes, shard.first..shard.end, &mut state, with_moments)
            .map_err(|problem| corrupt(format!("{}: {problem}", shard.file)))?;
    }
    if let Some(file) = &manifest.lora {
        let settings = LoraSettings::from_spec(&file.settings)
            .map_err(|e| corrupt(format!("{MANIFEST}: its lora: {e}")))?;
        let bytes = verified(path, &file.file, file.bytes, &file.fnv1a)?;
        let lora = state_file::decode_lora(&bytes, settings, &state.model)
            .map_err(|problem| corrupt(format!("{}: {problem}", file.file)))?;
        state.lora = Some(lora);
    }
    Ok(Restored {
        path: path.to_path_buf(),
        manifest,
        state,
    })
}

/// The model alone (weights and selection biases) of the checkpoint in
/// `path`, holding routed experts `experts`, with its manifest: what
/// serving and export read. The optimizer moments (two thirds of the state
/// file) are never decoded, and the files are mapped rather than read, so
/// the memory it takes is the model's.
pub fn load_model(
    path: &Path,
    model_spec: &ModelSpec,
    config: &ModelConfig,
    experts: Range<usize>,
) -> Result<(Manifest, Model<f32>), CheckpointError> {
    let manifest = checked_manifest(path, model_spec)?;
    model_of(path, manifest, config, experts)
}

/// Whether `path` holds a checkpoint of ours (a manifest), rather than,
/// say, a Hugging Face model directory.
pub fn is_checkpoint(path: &Path) -> bool {
    path.join(MANIFEST).is_file()
}

/// [`load_model`] for a new run of `model_spec` to start from
/// (`model.initFrom`): the checkpoint's model must be the same but for
/// `initFrom` itself (a pretraining job's has none, the fine-tuning job's
/// names the checkpoint).
pub fn load_model_for_init(
    path: &Path,
    model_spec: &ModelSpec,
    config: &ModelConfig,
    experts: Range<usize>,
) -> Result<(Manifest, Model<f32>), CheckpointError> {
    let manifest = read_manifest(path)?;
    let differences = manifest::model_differences(&manifest.model, model_spec, false);
    if !differences.is_empty() {
        return Err(CheckpointError::ModelMismatch {
            path: path.to_path_buf(),
            differences,
        });
    }
    model_of(path, manifest, config, experts)
}

/// The model of the checkpoint at `path`, whose `manifest` was read and
/// checked, its files verified against it.
fn model_of(
    path: &Path,
    manifest: Manifest,
    config: &ModelConfig,
    experts: Range<usize>,
) -> Result<(Manifest, Model<f32>), CheckpointError> {
    let corrupt = corruption(path);
    let state = verified_state(path, &manifest)?;
    let sharded = !manifest.expert_shards.is_empty();
    let mut model = state_file::decode_model(&state, config, sharded, experts.clone())
        .map_err(|problem| corrupt(format!("{}: {problem}", manifest.state_file)))?;
    drop(state);
    for shard in needed_shards(&manifest, config, &experts).map_err(&corrupt)? {
        let bytes = verified(path, &shard.file, shard.bytes, &shard.fnv1a)?;
        state_file::decode_expert_weights_into(&bytes, shard.first..shard.end, &mut model)
            .map_err(|problem| corrupt(format!("{}: {problem}", shard.file)))?;
    }
    Ok((manifest, model))
}

/// The weights of the checkpoint in `path`, read one tensor at a time out
/// of its mapped files (its state file and expert shards, each checked
/// against the manifest first): what export reads, holding one tensor
/// where [`load_model`] holds the model.
pub struct CheckpointWeights {
    path: PathBuf,
    manifest: Manifest,
    config: ModelConfig,
    state: state_file::MappedTensors,
    /// Expert shards, with the experts each holds and its file name (none
    /// unsharded).
    shards: Vec<(Range<usize>, String, state_file::MappedTensors)>,
    /// `training.lora`'s adapters, with the file holding them.
    lora: Option<(LoraSettings, String, state_file::MappedTensors)>,
}

impl CheckpointWeights {
    /// The checkpoint in `path`, of the model its manifest records.
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        let corrupt = corruption(path);
        let manifest = read_manifest(path)?;
        let config = &ModelConfig::from_spec(&manifest.model)
            .map_err(|e| corrupt(format!("{MANIFEST}: its model: {e}")))?;
        let state = state_file::MappedTensors::new(verified_state(path, &manifest)?)
            .map_err(|problem| corrupt(format!("{}: {problem}", manifest.state_file)))?;
        let every = 0..config.moe.n_routed_experts;
        let mut shards = Vec::new();
        for shard in needed_shards(&manifest, config, &every).map_err(&corrupt)? {
            let map = verified(path, &shard.file, shard.bytes, &shard.fnv1a)?;
            let tensors = state_file::MappedTensors::new(map)
                .map_err(|problem| corrupt(format!("{}: {problem}", shard.file)))?;
            shards.push((shard.first..shard.end, shard.file.clone(), tensors));
        }
        let lora = match &manifest.lora {
            Some(file) => {
                let settings = LoraSettings::from_spec(&file.settings)
                    .map_err(|e| corrupt(format!("{MANIFEST}: its lora: {e}")))?;
                let map = verified(path, &file.file, file.bytes, &file.fnv1a)?;
                let tensors = state_file::MappedTensors::new(map)
                    .map_err(|problem| corrupt(format!("{}: {problem}", file.file)))?;
                Some((settings, file.file.clone(), tensors))
            }
            None => None,
        };
        Ok(Self {
            path: path.to_path_buf(),
            manifest,
            config: config.clone(),
            state,
            shards,
            lora,
        })
    }

    /// `training.lora` of the run, when it trained adapters.
    pub fn lora(&self) -> Option<&LoraSettings> {
        self.lora.as_ref().map(|(settings, _, _)| settings)
    }

    /// Matrices `matrices` of the adapter on model tensor `name`: its `A`
    /// (`part` "a", whole shape `[n, rank, cols]`) or `B` ("b", `[n, rows,
    /// rank]`), `n` the tensor's matrices (its routed experts, or 1).
    pub fn adapter(
        &self,
        name: &str,
        part: &str,
        shape: &[usize],
        matrices: Range<usize>,
    ) -> Result<Vec<f32>, CheckpointError> {
        let Some((_, file, tensors)) = &self.lora else {
            return Err(corruption(&self.path)(format!(
                "the checkpoint has no adapters, asked for {name}/{part}"
            )));
        };
        tensors
            .adapter_rows(name, part, shape, matrices)
            .map_err(|problem| self.corrupt(file, problem))
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Tensor `name` of the model (any but a routed expert's), of `shape`.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, CheckpointError> {
        let rows = 0..shape.first().copied().unwrap_or(1);
        self.state
            .weight_rows(name, shape, rows)
            .map_err(|problem| self.corrupt(&self.manifest.state_file, problem))
    }

    /// Routed expert `expert`'s part of expert tensor `name`, whose whole
    /// shape (every expert along the first dimension) is `shape`.
    pub fn expert(
        &self,
        name: &str,
        shape: &[usize],
        expert: usize,
    ) -> Result<Vec<f32>, CheckpointError> {
        if self.shards.is_empty() {
            return self
                .state
                .weight_rows(name, shape, expert..expert + 1)
                .map_err(|problem| self.corrupt(&self.manifest.state_file, problem));
        }
        // The shards cover every expert once (checked at open).
        let (held, file, shard) = self
            .shards
            .iter()
            .find(|(held, _, _)| held.contains(&expert))
            .ok_or_else(|| {
                corruption(&self.path)(format!("no expert shard holds expert {expert}"))
            })?;
        let mut local = shape.to_vec();
        local[0] = held.len();
        let row = expert - held.start;
        shard
            .weight_rows(name, &local, row..row + 1)
            .map_err(|problem| self.corrupt(file, problem))
    }

    /// Each MoE layer's selection biases, in order.
    pub fn selection_biases(&self) -> Result<Vec<Vec<f32>>, CheckpointError> {
        let experts = self.config.moe.n_routed_experts;
        (self.config.dense_layers..self.config.layers)
            .map(|block| {
                self.state
                    .selection_bias(block, experts)
                    .map_err(|problem| self.corrupt(&self.manifest.state_file, problem))
            })
            .collect()
    }

    fn corrupt(&self, file: &str, problem: String) -> CheckpointError {
        corruption(&self.path)(format!("{file}: {problem}"))
    }
}

fn corruption(path: &Path) -> impl Fn(String) -> CheckpointError + '_ {
    move |problem| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        problem,
    }
}

/// The manifest of the checkpoint in `path`, of this format and of a model
/// that is `model_spec`.
fn checked_manifest(path: &Path, model_spec: &ModelSpec) -> Result<Manifest, CheckpointError> {
    let manifest = read_manifest(path)?;
    let differences = manifest::model_differences(&manifest.model, model_spec, true);
    if !differences.is_empty() {
        return Err(CheckpointError::ModelMismatch {
            path: path.to_path_buf(),
            differences,
        });
    }
    Ok(manifest)
}

/// The manifest of the checkpoint in `path`, of this format.
fn read_manifest(path: &Path) -> Result<Manifest, CheckpointError> {
    let corrupt = corruption(path);
    let manifest_path = path.join(MANIFEST);
    let json = fs::read(&manifest_path).map_err(io(&manifest_path))?;
    let manifest: Manifest = serde_json::from_slice(&json)
        .map_err(|e| corrupt(format!("{MANIFEST} is not a valid manifest: {e}")))?;
    if manifest.format_version != FORMAT_VERSION {
        return Err(corrupt(format!(
            "format version {} is not the supported {FORMAT_VERSION}",
            manifest.format_version
        )));
    }
    Ok(manifest)
}

/// The expert shards holding any of `experts`, once the shards are checked
/// to cover every expert exactly once (none for an unsharded checkpoint).
fn needed_shards<'m>(
    manifest: &'m Manifest,
    config: &ModelConfig,
    experts: &Range<usize>,
) -> Result<Vec<&'m manifest::ExpertShard>, String> {
    if manifest.expert_shards.is_empty() {
        return Ok(Vec::new());
    }
    shards_cover(&manifest.expert_shards, config.moe.n_routed_experts)?;
    Ok(manifest
        .expert_shards
        .iter()
        .filter(|s| s.first < experts.end && experts.start < s.end)
        .collect())
}

/// The state file of the checkpoint in `path`, checked against `manifest`.
fn verified_state(path: &Path, manifest: &Manifest) -> Result<memmap2::Mmap, CheckpointError> {
    verified(
        path,
        &manifest.state_file,
        manifest.state_bytes,
        &manifest.state_fnv1a,
    )
}

/// `file` of the checkpoint in `path`, mapped read-only once its size and
/// checksum are the manifest's.
fn verified(
    path: &Path,
    file: &str,
    bytes: u64,
    fnv1a: &str,
) -> Result<memmap2::Mmap, CheckpointError> {
    let file_path = path.join(file);
    let opened = File::open(&file_path).map_err(io(&file_path))?;
    // SAFETY: read-only; a checkpoint's files are written whole into a
    // temporary directory that is then renamed into place, and never
    // written again (pruning removes the whole directory, which leaves an
    // open map valid on Linux).
    let map = unsafe { memmap2::Mmap::map(&opened) }.map_err(io(&file_path))?;
    if map.len() as u64 != bytes || manifest::fnv1a(&map) != fnv1a {
        return Err(corruption(path)(format!(
            "{file} does not match the checksum and size in {MANIFEST}"
        )));
    }
    Ok(map)
}

/// `(step, path)` of every `step-N` directory holding a manifest.
fn complete_checkpoints(dir: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(dir)(e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry.map_err(io(dir))?.path();
        let step = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(step) = step
            && path.join(MANIFEST).is_file()
        {
            found.push((step, path));
        }
    }
    Ok(found)
}

fn remove_temporaries(dir: &Path) -> Result<(), CheckpointError> {
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        let is_temporary = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(TEMPORARY_PREFIX));
        if is_temporary {
            tracing::info!(path = %path.display(), "removing an incomplete checkpoint");
            fs::remove_dir_all(&path).map_err(io(&path))?;
        }
    }
    Ok(())
}

/// Keeps what `keep` retains of the checkpoints up to `step`, the one just
/// written. Later steps can only be an earlier run's (resume Never); they
/// are left alone.
fn prune(dir: &Path, step: u64, keep: Retention) -> Result<(), CheckpointError> {
    let best = match keep.best {
        true => best(dir, step)?.map(|(s, _)| s),
        false => None,
    };
    let mut complete = complete_checkpoints(dir)?;
    complete.retain(|(s, _)| *s <= step);
    complete.sort_by_key(|(s, _)| std::cmp::Reverse(*s));
    for (i, (s, path)) in complete.into_iter().enumerate() {
        // The best, when older than the newest, is kept besides them.
        if i >= keep.newest && Some(s) != best {
            fs::remove_dir_all(&path).map_err(io(&path))?;
        }
    }
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut file = File::create(path).map_err(io(path))?;
    file.write_all(bytes).map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

/// Makes a directory's entries (new files, a rename) durable.
fn sync_dir(path: &Path) -> Result<(), CheckpointError> {
    File::open(path)
        .and_then(|dir| dir.sync_all())
        .map_err(io(path))
}
