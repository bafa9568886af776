//! Finding and loading the model to serve.
//!
//! `--model` may name any of the directories a training run leaves, from
//! the most to the least specific:
//! - a checkpoint (`step-N/`, holding `manifest.json`);
//! - a checkpoint directory (`checkpoints/`, holding `step-N/` directories:
//!   the newest, or the step asked for);
//! - a run directory (`runs/tiny/`, holding `checkpoints/`).
//!
//! or a Hugging Face model directory (`config.json` naming a `model_type` or
//! `architectures`, next to `*.safetensors`), loaded by [`crate::serve::hf`].

use std::fmt;
use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};

use moe_crds::{ModelFormat, ModelSpec};

use crate::checkpoint::{self, CheckpointError, Manifest};
use crate::model::{Model, ModelConfig};
use crate::serve::hf::{self, HfError};
use crate::serve::model::ServeModel;
use crate::serve::text::Tokenizer;

/// A model ready for the engine, with what the API reports about it.
#[derive(Debug)]
pub struct LoadedModel {
    pub model: LoadedWeights,
    pub tokenizer: Tokenizer,
    /// The checkpoint or model directory the weights came from.
    pub path: PathBuf,
    /// Training step of the checkpoint (0 for a Hugging Face model).
    pub step: u64,
    /// The model spec a worker checkpoint's manifest records.
    pub spec: Option<ModelSpec>,
}

impl LoadedModel {
    /// Refuses a checkpoint whose model is not `expected` (the service's
    /// `spec.model`, or its training job's), naming every field that differs.
    /// A Hugging Face model has no spec to compare: its `config.json` is the
    /// shape.
    pub fn check_spec(&self, expected: &ModelSpec) -> Result<(), LoadError> {
        let Some(spec) = &self.spec else {
            return Ok(());
        };
        let (mut found, mut wanted) = (
            serde_json::to_value(spec).unwrap_or_default(),
            serde_json::to_value(expected).unwrap_or_default(),
        );
        // How the experts were balanced while training is no part of the
        // model that is served.
        for spec in [&mut found, &mut wanted] {
            if let Some(moe) = spec.get_mut("moe").and_then(|m| m.as_object_mut()) {
                moe.remove("balancing");
            }
        }
        let mut differences = Vec::new();
        differing_fields("", &found, &wanted, &mut differences);
        if differences.is_empty() {
            Ok(())
        } else {
            Err(LoadError::ModelMismatch {
                path: self.path.clone(),
                differences,
            })
        }
    }
}

/// Appends `path: checkpoint <found>, expected <wanted>` for every leaf
/// that differs (a field only one side has counts as `null` on the other).
fn differing_fields(
    path: &str,
    found: &serde_json::Value,
    wanted: &serde_json::Value,
    out: &mut Vec<String>,
) {
    use serde_json::Value;
    match (found, wanted) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                let field = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                let (x, y) = (
                    a.get(key).unwrap_or(&Value::Null),
                    b.get(key).unwrap_or(&Value::Null),
                );
                differing_fields(&field, x, y, out);
            }
        }
        (a, b) if a != b => out.push(format!("{path}: checkpoint {a}, expected {b}")),
        _ => {}
    }
}

/// The weights, as the format has them.
#[derive(Debug)]
pub enum LoadedWeights {
    /// A worker checkpoint: the training model.
    Native(Box<Model<f32>>),
    /// A Hugging Face model, already in the serving engine's form (boxed: it
    /// is larger than the pointer the other variant holds).
    HuggingFace(Box<ServeModel>),
}

impl LoadedWeights {
    /// The training model, for a worker checkpoint.
    pub fn native(&self) -> Option<&Model<f32>> {
        match self {
            Self::Native(model) => Some(model),
            Self::HuggingFace(_) => None,
        }
    }

    /// The model as the engine serves it.
    pub fn into_serve_model(self) -> ServeModel {
        match self {
            Self::Native(model) => ServeModel::from_native(*model),
            Self::HuggingFace(model) => *model,
        }
    }
}

/// Why no model could be loaded; each names the path and what is missing.
#[derive(Debug)]
pub enum LoadError {
    NotFound(PathBuf),
    /// Nothing in the directory looks like a model.
    Unrecognised(PathBuf),
    /// A checkpoint directory without the step asked for.
    NoSuchStep {
        dir: PathBuf,
        step: u64,
    },
    /// The manifest's model spec fails the model's checks.
    InvalidModel {
        path: PathBuf,
        problem: String,
    },
    /// The checkpoint's model is not the one the configuration expects.
    ModelMismatch {
        path: PathBuf,
        differences: Vec<String>,
    },
    Checkpoint(CheckpointError),
    HuggingFace(HfError),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotFound(path) => write!(f, "model directory {} does not exist", path.display()),
            Self::Unrecognised(path) => write!(
                f,
                "{} holds no model: expected manifest.json (a checkpoint), step-N/manifest.json \
                 (a checkpoint directory), checkpoints/step-N/manifest.json (a run directory), \
                 or config.json with *.safetensors (Hugging Face)",
                path.display()
            ),
            Self::NoSuchStep { dir, step } => write!(
                f,
                "{} has no complete checkpoint of step {step} ({}/manifest.json is missing)",
                dir.display(),
                checkpoint::step_dir_name(*step)
            ),
            Self::InvalidModel { path, problem } => {
                write!(
                    f,
                    "{}: the manifest's model is invalid: {problem}",
                    path.display()
                )
            }
            Self::ModelMismatch { path, differences } => write!(
                f,
                "{}: the checkpoint's model is not the configured model: {}",
                path.display(),
                differences.join("; ")
            ),
            Self::Checkpoint(e) => e.fmt(f),
            Self::HuggingFace(e) => write!(f, "Hugging Face model: {e}"),
        }
    }
}

impl std::error::Error for LoadError {}

impl From<CheckpointError> for LoadError {
    fn from(e: CheckpointError) -> Self {
        Self::Checkpoint(e)
    }
}

/// What a directory holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Detected {
    /// A worker checkpoint (the `step-N` directory itself).
    Native(PathBuf),
    HuggingFace(PathBuf),
}

/// Finds the model in `dir`: the checkpoint of `step`, else the newest.
/// `format`, when given, skips the other format's detection.
pub fn detect(
    dir: &Path,
    format: Option<ModelFormat>,
    step: Option<u64>,
) -> Result<Detected, LoadError> {
    if !dir.is_dir() {
        return Err(LoadError::NotFound(dir.to_path_buf()));
    }
    if format != Some(ModelFormat::Huggingface) {
        if let Some(path) = native_checkpoint(dir, step)? {
            return Ok(Detected::Native(path));
        }
        if format == Some(ModelFormat::Native) {
            return Err(LoadError::Unrecognised(dir.to_path_buf()));
        }
    }
    if is_hugging_face(dir) {
        return Ok(Detected::HuggingFace(dir.to_path_buf()));
    }
    Err(LoadError::Unrecognised(dir.to_path_buf()))
}

/// Detects and loads the model in `dir`.
pub fn load(
    dir: &Path,
    format: Option<ModelFormat>,
    step: Option<u64>,
) -> Result<LoadedModel, LoadError> {
    load_experts(dir, format, step, None)
}

/// [`load`] holding only routed experts `experts` of every MoE layer (an
/// expert-parallel rank's share; `None`: all). The other experts are never
/// decoded: of a sharded checkpoint only the shards overlapping `experts`
/// are read, of a Hugging Face model only their tensors.
pub fn load_experts(
    dir: &Path,
    format: Option<ModelFormat>,
    step: Option<u64>,
    experts: Option<Range<usize>>,
) -> Result<LoadedModel, LoadError> {
    match detect(dir, format, step)? {
        Detected::Native(path) => load_native(&path, experts),
        Detected::HuggingFace(path) => load_hugging_face(&path, experts),
    }
}

/// What a model is, read from its config alone (no weights): for checks
/// before any rank loads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSummary {
    /// The checkpoint or model directory [`load`] would read.
    pub path: PathBuf,
    /// Routed experts per MoE layer.
    pub experts: usize,
}

/// Finds the model in `dir` as [`load`] would and reads its summary.
pub fn summary(
    dir: &Path,
    format: Option<ModelFormat>,
    step: Option<u64>,
) -> Result<ModelSummary, LoadError> {
    match detect(dir, format, step)? {
        Detected::Native(path) => {
            let (_, config) = read_manifest(&path)?;
            Ok(ModelSummary {
                path,
                experts: config.moe.n_routed_experts,
            })
        }
        Detected::HuggingFace(path) => {
            let config = hf::HfConfig::read(&path).map_err(LoadError::HuggingFace)?;
            Ok(ModelSummary {
                path,
                experts: config.experts,
            })
        }
    }
}

/// The checkpoint directory to load in `dir`, if `dir` is one of the
/// worker's layouts.
fn native_checkpoint(dir: &Path, step: Option<u64>) -> Result<Option<PathBuf>, LoadError> {
    if dir.join("manifest.json").is_file() {
        return Ok(Some(dir.to_path_buf()));
    }
    for checkpoints in [dir.to_path_buf(), dir.join("checkpoints")] {
        let found = match step {
            Some(step) => {
                let path = checkpoints.join(checkpoint::step_dir_name(step));
                if path.join("manifest.json").is_file() {
                    Some(path)
                } else if checkpoint::newest(&checkpoints)?.is_some() {
                    return Err(LoadError::NoSuchStep {
                        dir: checkpoints,
                        step,
                    });
                } else {
                    None
                }
            }
            None => checkpoint::newest(&checkpoints)?,
        };
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

fn is_hugging_face(dir: &Path) -> bool {
    let config = fs::read(dir.join("config.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok());
    let names_an_architecture =
        config.is_some_and(|c| c.get("model_type").is_some() || c.get("architectures").is_some());
    let has_weights = fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            e.file_name().to_str().is_some_and(|n| {
                n.ends_with(".safetensors") || n.ends_with(".safetensors.index.json")
            })
        })
    });
    names_an_architecture && has_weights
}

/// A checkpoint's manifest and its model's checked config.
fn read_manifest(path: &Path) -> Result<(Manifest, ModelConfig), LoadError> {
    let manifest_path = path.join("manifest.json");
    let bytes = fs::read(&manifest_path).map_err(|error| CheckpointError::Io {
        path: manifest_path.clone(),
        error,
    })?;
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Corrupt {
            path: path.to_path_buf(),
            problem: format!("manifest.json is not a valid manifest: {e}"),
        })?;
    let config = ModelConfig::from_spec(&manifest.model).map_err(|e| LoadError::InvalidModel {
        path: path.to_path_buf(),
        problem: e.to_string(),
    })?;
    Ok((manifest, config))
}

/// Loads a worker checkpoint for serving: the model spec from its manifest,
/// the weights and selection biases from its state file (and the shards
/// holding `experts`, when it is sharded).
fn load_native(path: &Path, experts: Option<Range<usize>>) -> Result<LoadedModel, LoadError> {
    let (manifest, config) = read_manifest(path)?;
    let tokenizer = native_tokenizer(path, &manifest)?;
    let n_experts = config.moe.n_routed_experts;
    let experts = experts.unwrap_or(0..n_experts);
    if experts.start > experts.end || experts.end > n_experts {
        return Err(LoadError::InvalidModel {
            path: path.to_path_buf(),
            problem: format!("experts {experts:?} asked for, but the model has {n_experts}"),
        });
    }
    // The weights alone: the optimizer moments beside them are never decoded.
    let (_, model) = checkpoint::load_model(path, &manifest.model, &config, experts)?;
    // A diverged run checkpoints NaNs as faithfully as weights: served,
    // they would make every logit NaN without an error.
    if let Some(tensor) = model
        .tensors()
        .into_iter()
        .find(|t| t.values.iter().any(|v| !v.is_finite()))
    {
        return Err(LoadError::InvalidModel {
            path: path.to_path_buf(),
            problem: format!(
                "tensor {} holds non-finite values (NaN or infinity): the run that wrote this \
                 checkpoint diverged, or the checkpoint is corrupt",
                tensor.name
            ),
        });
    }
    Ok(LoadedModel {
        model: LoadedWeights::Native(Box::new(model)),
        tokenizer,
        path: path.to_path_buf(),
        step: manifest.step,
        spec: Some(manifest.model),
    })
}

/// The tokenizer a checkpoint was trained with: the `tokenizer.json` the
/// run kept in it ([`checkpoint::TOKENIZER`]), else bytes — unless the run
/// read pre-tokenized ids without naming their tokenizer, which leaves
/// nothing to turn prompts into them or them into text.
/// The tokenizer of the worker checkpoint in `path`: its `tokenizer.json`,
/// else the byte tokenizer it was trained with; refused when it was
/// trained on ids from a tokenizer it does not carry.
pub fn native_tokenizer(path: &Path, manifest: &Manifest) -> Result<Tokenizer, LoadError> {
    use moe_crds::Tokenizer as Trained;
    if path.join(checkpoint::TOKENIZER).is_file() {
        let tokenizer = hf::HfTokenizer::read(path, &[]).map_err(LoadError::HuggingFace)?;
        return Ok(Tokenizer::HuggingFace(std::sync::Arc::new(tokenizer)));
    }
    let problem = match manifest.tokenizer {
        Trained::Byte => return Ok(Tokenizer::Bytes),
        Trained::Pretokenized => {
            "was trained on pre-tokenized data (data.tokenizer: pretokenized) without \
             data.tokenizerFile: its token ids came from a tokenizer the checkpoint does not \
             carry, so the server could turn neither prompts into them nor them into text"
        }
        Trained::Huggingface => {
            "was trained with a Hugging Face tokenizer, but its copy (tokenizer.json) is missing"
        }
    };
    Err(LoadError::InvalidModel {
        path: path.to_path_buf(),
        problem: problem.into(),
    })
}

/// Loads a Hugging Face model directory (see [`crate::serve::hf`]).
fn load_hugging_face(path: &Path, experts: Option<Range<usize>>) -> Result<LoadedModel, LoadError> {
    let loaded = hf::load_experts(path, experts).map_err(LoadError::HuggingFace)?;
    tracing::info!(
        architecture = ?loaded.config.architecture,
        layers = loaded.config.layers,
        experts = loaded.config.experts,
        vocab = loaded.config.vocab,
        "Hugging Face model read"
    );
    Ok(LoadedModel {
        model: LoadedWeights::HuggingFace(Box::new(loaded.model)),
        tokenizer: Tokenizer::HuggingFace(std::sync::Arc::new(loaded.tokenizer)),
        path: path.to_path_buf(),
        step: 0,
        spec: None,
    })
}
