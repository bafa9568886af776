//! Exporting the training model as a Hugging Face model directory
//! (`moe-worker export`): `config.json`, safetensors shards (with
//! `model.safetensors.index.json` when there are several) and the run's
//! `tokenizer.json`, as `save_pretrained` writes them, so a trained or
//! fine-tuned model leaves for `transformers`, vLLM or SGLang.
//!
//! The inverse of [`super::pretrained`]: the architecture is the one that
//! computes what the training model computes — Qwen3-MoE for per-head q/k
//! norms, OLMoE for whole-projection ones, Mixtral for neither — and each
//! head's query and key rows (and q/k gains) go back from RoPE pairs to
//! Hugging Face's halves. A model none of them computes (sigmoid routers,
//! shared experts, expert groups, a routed scaling factor, a selection bias
//! it was trained with) is refused, naming the field, rather than exported
//! as a model that would route differently.

use std::borrow::Cow;
use std::fs;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use serde_json::{Value, json};

use crate::model::Model;
use crate::model::config::{ModelConfig, QkNorm};
use crate::moe::ScoreFunction;
use crate::train::lora::LoraSettings;

/// The number type of the exported weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportPrecision {
    /// bfloat16, rounded to nearest even (what releases ship; half the bytes).
    Bf16,
    /// The f32 master weights, exactly.
    F32,
}

impl ExportPrecision {
    fn dtype(self) -> Dtype {
        match self {
            Self::Bf16 => Dtype::BF16,
            Self::F32 => Dtype::F32,
        }
    }

    fn width(self) -> usize {
        match self {
            Self::Bf16 => 2,
            Self::F32 => 4,
        }
    }

    fn torch_name(self) -> &'static str {
        match self {
            Self::Bf16 => "bfloat16",
            Self::F32 => "float32",
        }
    }

    fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            Self::Bf16 => values
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
            Self::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

/// The `transformers` architecture a model is exported as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HfArchitecture {
    Mixtral,
    Qwen3Moe,
    Olmoe,
}

impl HfArchitecture {
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Mixtral => "MixtralForCausalLM",
            Self::Qwen3Moe => "Qwen3MoeForCausalLM",
            Self::Olmoe => "OlmoeForCausalLM",
        }
    }

    fn model_type(self) -> &'static str {
        match self {
            Self::Mixtral => "mixtral",
            Self::Qwen3Moe => "qwen3_moe",
            Self::Olmoe => "olmoe",
        }
    }
}

/// Why a model cannot be exported: the field of the job's `model` that no
/// architecture has, and why.
#[derive(Debug)]
pub enum ExportError {
    Unexportable {
        field: &'static str,
        reason: String,
    },
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    Safetensors(String),
    /// The weights could not be read (a checkpoint's file), or hold
    /// non-finite values.
    Source(String),
}

impl std::fmt::Display for ExportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unexportable { field, reason } => write!(
                f,
                "{field}: {reason}; no Hugging Face architecture computes this model \
                 (Mixtral, Qwen3-MoE and OLMoE route by softmax to unshared, ungrouped experts)"
            ),
            Self::Io { path, error } => write!(f, "{}: {error}", path.display()),
            Self::Safetensors(e) => write!(f, "writing safetensors: {e}"),
            Self::Source(e) => write!(f, "reading the weights: {e}"),
        }
    }
}

impl std::error::Error for ExportError {}

fn unexportable(field: &'static str, reason: String) -> ExportError {
    ExportError::Unexportable { field, reason }
}

/// The architecture that computes the model of `source` exactly, or the
/// field that keeps any from doing so.
pub fn architecture_for(source: &dyn ExportSource) -> Result<HfArchitecture, ExportError> {
    let c = source.config();
    let moe = &c.moe;
    if moe.score_function != ScoreFunction::Softmax {
        return Err(unexportable(
            "model.moe.router",
            "is sigmoid (DeepSeek-V3's, whose latent attention the training model does not have)"
                .into(),
        ));
    }
    if moe.n_shared_experts > 0 {
        return Err(unexportable(
            "model.moe.sharedExperts",
            format!("is {}", moe.n_shared_experts),
        ));
    }
    if let Some(limit) = &moe.group_limit {
        return Err(unexportable(
            "model.moe.groups",
            format!("is {} (topGroups {})", limit.n_groups, limit.top_groups),
        ));
    }
    if moe.routed_scaling_factor != 1.0 {
        return Err(unexportable(
            "model.moe.routedScalingFactor",
            format!("is {}", moe.routed_scaling_factor),
        ));
    }
    if let Some((layer, _)) = source
        .selection_biases()?
        .iter()
        .enumerate()
        .find(|(_, bias)| bias.iter().any(|&b| b != 0.0))
    {
        return Err(unexportable(
            "model.moe.balancing.auxLossFree",
            format!(
                "trained a selection bias (MoE layer {layer} routes with a non-zero one); a \
                 model exported without it would route differently: fine-tune with \
                 auxLossFree.enabled false"
            ),
        ));
    }
    let architecture = match c.qk_norm {
        Some(QkNorm::PerHead) => HfArchitecture::Qwen3Moe,
        Some(QkNorm::Whole) => HfArchitecture::Olmoe,
        None => HfArchitecture::Mixtral,
    };
    if c.dense_layers > 0 && architecture != HfArchitecture::Qwen3Moe {
        return Err(unexportable(
            "model.denseLayers",
            format!(
                "is {} (only Qwen3-MoE, with qkNorm perHead, has dense layers)",
                c.dense_layers
            ),
        ));
    }
    if architecture == HfArchitecture::Mixtral && !moe.normalize_gates {
        return Err(unexportable(
            "model.moe.normalizeTopK",
            "is false (Mixtral always renormalises the chosen experts' gates)".into(),
        ));
    }
    if architecture == HfArchitecture::Olmoe && c.q_width() != c.hidden {
        return Err(unexportable(
            "model.headDim",
            format!(
                "is {}, but OLMoE's heads are hiddenSize / attentionHeads = {} wide",
                c.head_dim,
                c.hidden / c.heads
            ),
        ));
    }
    Ok(architecture)
}

/// `config.json` for `config` as `architecture`.
fn hf_config(
    config: &ModelConfig,
    architecture: HfArchitecture,
    precision: ExportPrecision,
) -> Value {
    let moe = &config.moe;
    let mut json = json!({
        "architectures": [architecture.class_name()],
        "model_type": architecture.model_type(),
        "vocab_size": config.vocab,
        "hidden_size": config.hidden,
        "num_hidden_layers": config.layers,
        "num_attention_heads": config.heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        // What it was trained at: RoPE beyond it was never seen.
        "max_position_embeddings": config.seq_len,
        "rms_norm_eps": config.norm_eps,
        // Both spellings: transformers 5 reads rope_parameters, older
        // readers rope_theta.
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "num_experts_per_tok": moe.top_k,
        "hidden_act": "silu",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "tie_word_embeddings": false,
        "torch_dtype": precision.torch_name(),
        "use_cache": true,
    });
    let fields = json.as_object_mut().expect("an object");
    let mut set = |key: &str, value: Value| {
        fields.insert(key.into(), value);
    };
    match architecture {
        HfArchitecture::Mixtral => {
            set("num_local_experts", moe.n_routed_experts.into());
            set("intermediate_size", moe.expert_hidden.into());
            set("sliding_window", Value::Null);
        }
        HfArchitecture::Qwen3Moe => {
            set("num_experts", moe.n_routed_experts.into());
            set("moe_intermediate_size", moe.expert_hidden.into());
            set("intermediate_size", config.dense_hidden.into());
            set("norm_topk_prob", moe.normalize_gates.into());
            set("decoder_sparse_step", 1.into());
            set(
                "mlp_only_layers",
                (0..config.dense_layers).collect::<Vec<_>>().into(),
            );
            set("use_sliding_window", false.into());
            set("sliding_window", Value::Null);
        }
        HfArchitecture::Olmoe => {
            set("num_experts", moe.n_routed_experts.into());
            set("intermediate_size", moe.expert_hidden.into());
            set("norm_topk_prob", moe.normalize_gates.into());
            set("clip_qkv", Value::Null);
        }
    }
    json
}

/// One exported tensor: its Hugging Face name and shape, and where its
/// values come from (read when its shard is written, so an export holds
/// one shard's bytes and one tensor's values, never the model).
#[derive(Clone, Debug, PartialEq)]
struct HfTensor {
    name: String,
    shape: Vec<usize>,
    source: Source,
}

/// A tensor of the training model (its name in `Weights::tensors` and the
/// checkpoint, and its whole shape), whole or one routed expert's part, with
/// each head's rows turned from RoPE pairs to halves when `halve` says the
/// rows' width.
#[derive(Clone, Debug, PartialEq)]
struct Source {
    tensor: String,
    shape: Vec<usize>,
    expert: Option<usize>,
    halve: Option<usize>,
}

/// The weights an export reads, one tensor at a time: a model in memory
/// ([`Model`]), or a checkpoint's mapped files
/// ([`crate::checkpoint::CheckpointWeights`]).
pub trait ExportSource {
    fn config(&self) -> &ModelConfig;
    /// Tensor `name` of the model (not a routed expert's), of `shape`.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Cow<'_, [f32]>, ExportError>;
    /// Routed expert `expert`'s part of expert tensor `name` (whole shape
    /// `shape`, every expert along its first dimension).
    fn expert(
        &self,
        name: &str,
        shape: &[usize],
        expert: usize,
    ) -> Result<Cow<'_, [f32]>, ExportError>;
    /// Each MoE layer's selection biases, in order.
    fn selection_biases(&self) -> Result<Vec<Vec<f32>>, ExportError>;
    /// `training.lora` of the run, when the weights are merged with adapters.
    fn lora(&self) -> Option<&LoraSettings> {
        None
    }
    /// The Hub model the run started from (`model.initFrom.huggingface`),
    /// as repository and revision: what its adapters apply to.
    fn base_model(&self) -> Option<(&str, &str)> {
        None
    }
    /// Matrices `matrices` of the `A` (`part` "a", whole shape `[n, rank,
    /// cols]`) or `B` ("b", `[n, rows, rank]`) of the adapter on tensor `name`.
    fn adapter(
        &self,
        name: &str,
        part: &str,
        _shape: &[usize],
        _matrices: Range<usize>,
    ) -> Result<Cow<'_, [f32]>, ExportError> {
        Err(ExportError::Source(format!(
            "no adapters to read {name}/{part} from"
        )))
    }
}

impl ExportSource for Model<f32> {
    fn config(&self) -> &ModelConfig {
        Model::config(self)
    }

    fn tensor(&self, name: &str, _shape: &[usize]) -> Result<Cow<'_, [f32]>, ExportError> {
        named(self, name).map(Cow::Borrowed)
    }

    fn expert(
        &self,
        name: &str,
        _shape: &[usize],
        expert: usize,
    ) -> Result<Cow<'_, [f32]>, ExportError> {
        let held = self.held_experts();
        if !held.contains(&expert) {
            return Err(ExportError::Source(format!(
                "the model holds experts {held:?}, not {expert}"
            )));
        }
        let values = named(self, name)?;
        let per = values.len() / held.len();
        let at = (expert - held.start) * per;
        Ok(Cow::Borrowed(&values[at..at + per]))
    }

    fn selection_biases(&self) -> Result<Vec<Vec<f32>>, ExportError> {
        Ok(self
            .moe_layers()
            .map(|layer| layer.selection_bias.clone())
            .collect())
    }
}

/// The values of `model`'s tensor `name`.
fn named<'m>(model: &'m Model<f32>, name: &str) -> Result<&'m [f32], ExportError> {
    model
        .weights
        .tensors(model.config())
        .into_iter()
        .find(|t| t.name == name)
        .map(|t| t.values)
        .ok_or_else(|| ExportError::Source(format!("the model has no tensor {name}")))
}

impl ExportSource for crate::checkpoint::CheckpointWeights {
    fn config(&self) -> &ModelConfig {
        crate::checkpoint::CheckpointWeights::config(self)
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Cow<'_, [f32]>, ExportError> {
        crate::checkpoint::CheckpointWeights::tensor(self, name, shape)
            .map(Cow::Owned)
            .map_err(|e| ExportError::Source(e.to_string()))
    }

    fn expert(
        &self,
        name: &str,
        shape: &[usize],
        expert: usize,
    ) -> Result<Cow<'_, [f32]>, ExportError> {
        crate::checkpoint::CheckpointWeights::expert(self, name, shape, expert)
            .map(Cow::Owned)
            .map_err(|e| ExportError::Source(e.to_string()))
    }

    fn selection_biases(&self) -> Result<Vec<Vec<f32>>, ExportError> {
        crate::checkpoint::CheckpointWeights::selection_biases(self)
            .map_err(|e| ExportError::Source(e.to_string()))
    }

    fn lora(&self) -> Option<&LoraSettings> {
        crate::checkpoint::CheckpointWeights::lora(self)
    }

    fn base_model(&self) -> Option<(&str, &str)> {
        let hub = self
            .manifest()
            .model
            .init_from
            .as_ref()?
            .huggingface
            .as_ref()?;
        Some((&hub.repo, &hub.revision))
    }

    fn adapter(
        &self,
        name: &str,
        part: &str,
        shape: &[usize],
        matrices: Range<usize>,
    ) -> Result<Cow<'_, [f32]>, ExportError> {
        crate::checkpoint::CheckpointWeights::adapter(self, name, part, shape, matrices)
            .map(Cow::Owned)
            .map_err(|e| ExportError::Source(e.to_string()))
    }
}

impl HfTensor {
    /// Its values, read from `source` and rearranged as Hugging Face lays
    /// them out; non-finite ones refused (a diverged run's checkpoint).
    fn values<'s>(
        &self,
        source: &'s dyn ExportSource,
        head_dim: usize,
    ) -> Result<Cow<'s, [f32]>, ExportError> {
        let from = &self.source;
        let values = match from.expert {
            Some(e) => source.expert(&from.tensor, &from.shape, e)?,
            None => source.tensor(&from.tensor, &from.shape)?,
        };
        if values.iter().any(|v| !v.is_finite()) {
            return Err(ExportError::Source(format!(
                "tensor {} holds non-finite values (NaN or infinity): the run diverged, or \
                 the checkpoint is corrupt",
                from.tensor
            )));
        }
        Ok(match from.halve {
            Some(width) => Cow::Owned(halve_rope_rows(
                &values,
                values.len() / (head_dim * width),
                head_dim,
                width,
            )),
            None => values,
        })
    }
}

/// Every tensor of a model of `config` under its Hugging Face name, in the
/// order `save_pretrained` shards them (embedding, layers, final norm,
/// head), with the training model's tensor each comes from.
fn hf_tensors(config: &ModelConfig, architecture: HfArchitecture) -> Vec<HfTensor> {
    let (h, v, qw, kv) = (
        config.hidden,
        config.vocab,
        config.q_width(),
        config.kv_width(),
    );
    // A tensor of the training model, whole (halved by rows of `halve`).
    let whole = |tensor: String, shape: Vec<usize>, halve: Option<usize>| Source {
        tensor,
        shape,
        expert: None,
        halve,
    };
    let mut out = Vec::new();
    // The exported shape is the source's (one expert's part of it).
    let mut push = |name: String, source: Source| {
        let skip = usize::from(source.expert.is_some());
        out.push(HfTensor {
            name,
            shape: source.shape[skip..].to_vec(),
            source,
        });
    };
    push(
        "model.embed_tokens.weight".into(),
        whole("embedding".into(), vec![v, h], None),
    );
    for i in 0..config.layers {
        let p = format!("model.layers.{i}");
        let attn = format!("{p}.self_attn");
        let ours = |name: &str| format!("blocks.{i}.{name}");
        for (theirs, name, shape, halve) in [
            ("input_layernorm", "attention_norm", vec![h], None),
            ("self_attn.q_proj", "wq", vec![qw, h], Some(h)),
            ("self_attn.k_proj", "wk", vec![kv, h], Some(h)),
            ("self_attn.v_proj", "wv", vec![kv, h], None),
            ("self_attn.o_proj", "wo", vec![h, qw], None),
        ] {
            push(
                format!("{p}.{theirs}.weight"),
                whole(ours(name), shape, halve),
            );
        }
        if let Some((q, k)) = config.qk_norm_widths() {
            push(
                format!("{attn}.q_norm.weight"),
                whole(ours("q_norm"), vec![q], Some(1)),
            );
            push(
                format!("{attn}.k_norm.weight"),
                whole(ours("k_norm"), vec![k], Some(1)),
            );
        }
        push(
            format!("{p}.post_attention_layernorm.weight"),
            whole(ours("ffn_norm"), vec![h], None),
        );
        if i < config.dense_layers {
            let dh = config.dense_hidden;
            for (theirs, name, shape) in [
                ("gate_proj", "dense.w1", vec![dh, h]),
                ("up_proj", "dense.w3", vec![dh, h]),
                ("down_proj", "dense.w2", vec![h, dh]),
            ] {
                push(
                    format!("{p}.mlp.{theirs}.weight"),
                    whole(ours(name), shape, None),
                );
            }
            continue;
        }
        let (n, eh) = (config.moe.n_routed_experts, config.moe.expert_hidden);
        let (moe, names) = match architecture {
            HfArchitecture::Mixtral => (format!("{p}.block_sparse_moe"), ["w1", "w3", "w2"]),
            _ => (format!("{p}.mlp"), ["gate_proj", "up_proj", "down_proj"]),
        };
        push(
            format!("{moe}.gate.weight"),
            whole(ours("moe.router"), vec![n, h], None),
        );
        for e in 0..n {
            for (theirs, name, shape) in [
                (names[0], "moe.experts_w1", vec![n, eh, h]),
                (names[1], "moe.experts_w3", vec![n, eh, h]),
                (names[2], "moe.experts_w2", vec![n, h, eh]),
            ] {
                let source = Source {
                    expert: Some(e),
                    ..whole(ours(name), shape, None)
                };
                push(format!("{moe}.experts.{e}.{theirs}.weight"), source);
            }
        }
    }
    push(
        "model.norm.weight".into(),
        whole("final_norm".into(), vec![h], None),
    );
    push(
        "lm_head.weight".into(),
        whole("lm_head".into(), vec![v, h], None),
    );
    out
}

/// `w` (`[heads × head_dim, width]`) with each head's rows reordered from
/// RoPE pairs to RoPE halves: row `i` is row `2i`, row `i + head_dim / 2`
/// is row `2i + 1` (the inverse of [`super::pretrained::interleave_rope_rows`]).
pub fn halve_rope_rows(w: &[f32], heads: usize, head_dim: usize, width: usize) -> Vec<f32> {
    let half = head_dim / 2;
    super::pretrained::reorder_head_rows(w, heads, head_dim, width, |row| {
        if row < half {
            2 * row
        } else {
            2 * (row - half) + 1
        }
    })
}

/// The tokenizer an export carries.
#[derive(Clone, Copy, Debug)]
pub enum ExportTokenizer<'a> {
    /// None (a run on pre-tokenized ids without their tokenizer).
    None,
    /// The run's `tokenizer.json`, copied with the files beside it that
    /// say its special tokens and chat template (`tokenizer_config.json`,
    /// `chat_template.jinja`).
    File(&'a Path),
    /// The worker's byte tokenizer (id = byte), written as the equivalent
    /// byte-level BPE without merges.
    Bytes,
}

/// A `tokenizer.json` that encodes text as the worker's byte tokenizer
/// does, one id per byte, and decodes back: GPT-2's byte-level BPE with
/// its 256 byte characters as the vocabulary (id = byte) and no merges.
pub fn byte_tokenizer_json() -> Value {
    let vocab: serde_json::Map<String, Value> = crate::serve::hf::byte_level_chars()
        .into_iter()
        .enumerate()
        .map(|(id, c)| (c.to_string(), id.into()))
        .collect();
    let byte_level = json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false
    });
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": []
        }
    })
}

/// What [`export`] wrote.
#[derive(Debug)]
pub struct Exported {
    pub architecture: HfArchitecture,
    /// The files written, by name, in `out`.
    pub files: Vec<String>,
    /// Bytes of tensor data over all shards.
    pub tensor_bytes: u64,
}

/// What an export writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportContents {
    /// The model (merged, for a LoRA run, with its adapters under
    /// [`ADAPTER_DIR`]).
    Model,
    /// A LoRA run's adapters alone, in PEFT's layout, with the tokenizer:
    /// what `PeftModel.from_pretrained(base, out)` reads.
    AdapterOnly,
}

/// Writes the model of `source` into the new directory `out` (refused if
/// it exists), with `tokenizer` beside the weights, reading one tensor at
/// a time: it holds one shard's bytes and one tensor's values. The files are written into a
/// sibling directory that is renamed to `out` once complete: an
/// interrupted export leaves no half-written model.
/// Shards hold at most `shard_bytes` of tensor data (a larger tensor gets
/// one to itself).
pub fn export(
    source: &dyn ExportSource,
    tokenizer: ExportTokenizer<'_>,
    out: &Path,
    precision: ExportPrecision,
    shard_bytes: u64,
) -> Result<Exported, ExportError> {
    export_with(
        source,
        tokenizer,
        out,
        precision,
        shard_bytes,
        ExportContents::Model,
    )
}

/// [`export`] of `contents`: the model, or a LoRA run's adapters alone
/// (refused, naming `output.huggingface.adapterOnly`, for a run without).
pub fn export_with(
    source: &dyn ExportSource,
    tokenizer: ExportTokenizer<'_>,
    out: &Path,
    precision: ExportPrecision,
    shard_bytes: u64,
    contents: ExportContents,
) -> Result<Exported, ExportError> {
    let architecture = architecture_for(source)?;
    let adapter_only = contents == ExportContents::AdapterOnly;
    if adapter_only && source.lora().is_none() {
        return Err(unexportable(
            "output.huggingface.adapterOnly",
            "the run trained no adapters (training.lora): export its model instead".into(),
        ));
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |error| ExportError::Io { path, error }
    };
    if out.exists() {
        return Err(ExportError::Io {
            path: out.to_path_buf(),
            error: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "already exists; export writes a new directory",
            ),
        });
    }
    let partial = partial_dir(out);
    if partial.exists() {
        fs::remove_dir_all(&partial).map_err(io(&partial))?;
    }
    fs::create_dir_all(&partial).map_err(io(&partial))?;

    let config = source.config();
    let tensors = hf_tensors(config, architecture);
    // Adapters alone: no model shards, no config.json.
    let shards = match adapter_only {
        true => Vec::new(),
        false => plan_shards(&tensors, precision, shard_bytes),
    };
    let n = shards.len();
    let file_name = |i: usize| {
        if n == 1 {
            "model.safetensors".to_owned()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        }
    };
    let mut files = Vec::new();
    let mut weight_map = serde_json::Map::new();
    let mut tensor_bytes = 0u64;
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_owned(),
        "pt".to_owned(),
    )]));
    for (i, shard) in shards.iter().enumerate() {
        let name = file_name(i);
        let encoded: Vec<(&str, Vec<usize>, Vec<u8>)> = shard
            .iter()
            .map(|&t| {
                let t = &tensors[t];
                let values = t.values(source, config.head_dim)?;
                Ok((t.name.as_str(), t.shape.clone(), precision.encode(&values)))
            })
            .collect::<Result<_, ExportError>>()?;
        let views = encoded
            .iter()
            .map(|(name, shape, bytes)| {
                tensor_bytes += bytes.len() as u64;
                weight_map.insert((*name).to_owned(), file_name(i).into());
                TensorView::new(precision.dtype(), shape.clone(), bytes)
                    .map(|view| (*name, view))
                    .map_err(|e| ExportError::Safetensors(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let path = partial.join(&name);
        safetensors::serialize_to_file(views, metadata.clone(), &path)
            .map_err(|e| ExportError::Safetensors(format!("{}: {e}", path.display())))?;
        files.push(name);
    }
    if n > 1 {
        let index = json!({
            "metadata": {"total_size": tensor_bytes},
            "weight_map": weight_map,
        });
        write_json(&partial.join("model.safetensors.index.json"), &index)?;
        files.push("model.safetensors.index.json".into());
    }
    if !adapter_only {
        write_json(
            &partial.join("config.json"),
            &hf_config(config, architecture, precision),
        )?;
        files.push("config.json".into());
    }
    match tokenizer {
        ExportTokenizer::None => {}
        ExportTokenizer::File(tokenizer) => {
            for (from, name) in crate::data::tokenizer_files(tokenizer) {
                let name = name.unwrap_or("tokenizer.json");
                fs::copy(&from, partial.join(name)).map_err(io(&from))?;
                files.push(name.into());
            }
        }
        ExportTokenizer::Bytes => {
            write_json(&partial.join("tokenizer.json"), &byte_tokenizer_json())?;
            files.push("tokenizer.json".into());
        }
    }
    if let Some(lora) = source.lora() {
        // Beside the model in a directory of their own, or alone at the top.
        let (dir, prefix) = match adapter_only {
            true => (partial.clone(), String::new()),
            false => (partial.join(ADAPTER_DIR), format!("{ADAPTER_DIR}/")),
        };
        if !adapter_only {
            fs::create_dir(&dir).map_err(io(&dir))?;
        }
        for file in write_adapter(source, lora, &tensors, precision, &dir)? {
            files.push(format!("{prefix}{file}"));
        }
    }
    // safetensors writes through a private temporary file (mode 0600):
    // give the shards the permissions the umask gave the JSON config, so
    // whoever may read the config may read the weights.
    let config_path = partial.join(match adapter_only {
        true => "adapter_config.json",
        false => "config.json",
    });
    let permissions = fs::metadata(&config_path)
        .map_err(io(&config_path))?
        .permissions();
    for file in files.iter().filter(|f| f.ends_with(".safetensors")) {
        let path = partial.join(file);
        fs::set_permissions(&path, permissions.clone()).map_err(io(&path))?;
    }
    for file in &files {
        let path = partial.join(file);
        fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(io(&path))?;
    }
    fs::rename(&partial, out).map_err(io(out))?;
    Ok(Exported {
        architecture,
        files,
        tensor_bytes,
    })
}

/// The directory of an export holding the adapters alone (PEFT's layout).
pub const ADAPTER_DIR: &str = "adapter";

/// The adapters of a `training.lora` run in PEFT's layout, into `dir`:
/// `adapter_model.safetensors` (`base_model.model.<module>.lora_A.weight`
/// `[r, in]` and `lora_B.weight` `[out, r]` for each adapted module of
/// `tensors`, rows as Hugging Face orders them) and `adapter_config.json`
/// (the modules by their full names, so nothing else matches; the Hub
/// model the run started from, if it did). They apply to the weights the
/// run started from, not to the merged ones exported beside them. Returns
/// the files written.
fn write_adapter(
    source: &dyn ExportSource,
    lora: &LoraSettings,
    tensors: &[HfTensor],
    precision: ExportPrecision,
    dir: &Path,
) -> Result<Vec<String>, ExportError> {
    let (r, head_dim) = (lora.rank, source.config().head_dim);
    let mut encoded: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut modules = Vec::new();
    for t in tensors {
        let from = &t.source;
        if lora.target_of(&from.tensor).is_none() {
            continue;
        }
        // Whole tensors were stored as one matrix of `[1, rows, cols]`.
        let (n, rows, cols) = match from.shape[..] {
            [n, rows, cols] => (n, rows, cols),
            [rows, cols] => (1, rows, cols),
            _ => unreachable!("adapted tensors are matrices"),
        };
        let m = from.expert.unwrap_or(0);
        let a = source.adapter(&from.tensor, "a", &[n, r, cols], m..m + 1)?;
        let b = source.adapter(&from.tensor, "b", &[n, rows, r], m..m + 1)?;
        // The weight's rows reordered (RoPE pairs to halves) are B's rows
        // reordered: P·(W₀ + s·B·A) = P·W₀ + s·(P·B)·A.
        let b = match from.halve {
            Some(_) => Cow::Owned(halve_rope_rows(&b, rows / head_dim, head_dim, r)),
            None => b,
        };
        let module = t.name.strip_suffix(".weight").unwrap_or(&t.name);
        for (part, shape, values) in [("lora_A", vec![r, cols], &a), ("lora_B", vec![rows, r], &b)]
        {
            encoded.push((
                format!("base_model.model.{module}.{part}.weight"),
                shape,
                precision.encode(values),
            ));
        }
        modules.push(module.to_owned());
    }
    let views = encoded
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(precision.dtype(), shape.clone(), bytes)
                .map(|view| (name.as_str(), view))
                .map_err(|e| ExportError::Safetensors(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let weights = dir.join("adapter_model.safetensors");
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_owned(),
        "pt".to_owned(),
    )]));
    safetensors::serialize_to_file(views, metadata, &weights)
        .map_err(|e| ExportError::Safetensors(format!("{}: {e}", weights.display())))?;
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": lora.alpha,
        "target_modules": modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": lora.rank_stabilized,
        "use_dora": false,
        "inference_mode": true,
        "base_model_name_or_path": source.base_model().map(|(repo, _)| repo),
        "revision": source.base_model().map(|(_, revision)| revision),
    });
    write_json(&dir.join("adapter_config.json"), &config)?;
    Ok(vec![
        "adapter_model.safetensors".to_owned(),
        "adapter_config.json".to_owned(),
    ])
}

/// Where the files are written before the rename: `.<name>.partial` beside `out`.
fn partial_dir(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "export".into());
    out.with_file_name(format!(".{name}.partial"))
}

fn write_json(path: &Path, value: &Value) -> Result<(), ExportError> {
    let io = |error| ExportError::Io {
        path: path.to_path_buf(),
        error,
    };
    let mut file = fs::File::create(path).map_err(io)?;
    let mut text = serde_json::to_vec_pretty(value).expect("JSON values serialize");
    text.push(b'\n');
    file.write_all(&text).map_err(io)
}

/// Tensors (by index) grouped into shards of at most `limit` bytes, in order.
fn plan_shards(tensors: &[HfTensor], precision: ExportPrecision, limit: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut used = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let bytes = (t.shape.iter().product::<usize>() * precision.width()) as u64;
        let last = shards.last_mut().expect("never empty");
        if !last.is_empty() && used + bytes > limit {
            shards.push(vec![i]);
            used = bytes;
        } else {
            last.push(i);
            used += bytes;
        }
    }
    shards
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::pretrained::interleave_rope_rows;

    #[test]
    fn halving_rope_rows_undoes_interleaving_them() {
        let w: Vec<f32> = (0..3 * 8 * 2).map(|v| v as f32).collect();
        let pairs = interleave_rope_rows(&w, 3, 8, 2);
        assert_ne!(pairs, w);
        assert_eq!(halve_rope_rows(&pairs, 3, 8, 2), w);
        // Row 1 of the halves layout is row 2 of the pairs layout.
        let one: Vec<f32> = (0..4).map(|r| r as f32).collect();
        assert_eq!(halve_rope_rows(&one, 1, 4, 1), vec![0.0, 2.0, 1.0, 3.0]);
    }

    fn tensor(len: usize) -> HfTensor {
        HfTensor {
            name: String::new(),
            shape: vec![len],
            source: Source {
                tensor: String::new(),
                shape: vec![len],
                expert: None,
                halve: None,
            },
        }
    }

    /// The plan names the training model's tensors itself (it reads a
    /// checkpoint without building the model): every one of them, with its
    /// shape, and each routed expert's part of the expert tensors once.
    #[test]
    fn the_plan_reads_every_tensor_of_the_model_once() {
        let spec: moe_crds::ModelSpec = serde_json::from_value(json!({
            "vocabSize": 260, "hiddenSize": 16, "layers": 3, "denseLayers": 1,
            "denseHiddenSize": 24, "attentionHeads": 4, "kvHeads": 2, "headDim": 8,
            "qkNorm": "perHead", "seqLen": 8,
            "moe": {"experts": 4, "topK": 2, "expertHiddenSize": 8, "router": "softmax",
                    "normalizeTopK": true}
        }))
        .unwrap();
        let config = ModelConfig::from_spec(&spec).unwrap();
        let model = Model::<f32>::initial(config.clone(), 1);
        let mut want: Vec<(String, Vec<usize>)> = model
            .tensors()
            .into_iter()
            .map(|t| (t.name, t.shape))
            .collect();
        let plan = hf_tensors(&config, HfArchitecture::Qwen3Moe);
        let mut got: Vec<(String, Vec<usize>)> = Vec::new();
        let mut parts = std::collections::BTreeMap::<String, Vec<usize>>::new();
        for t in &plan {
            let s = &t.source;
            let read = (s.tensor.clone(), s.shape.clone());
            if !got.contains(&read) {
                got.push(read);
            }
            if let Some(e) = s.expert {
                parts.entry(s.tensor.clone()).or_default().push(e);
            }
            // What is written is what is read: one expert's part, or all.
            let read_len: usize = s.shape.iter().product::<usize>() / s.expert.map_or(1, |_| 4);
            assert_eq!(t.shape.iter().product::<usize>(), read_len, "{}", t.name);
        }
        want.sort();
        got.sort();
        assert_eq!(got, want);
        assert_eq!(
            parts.len(),
            3 * 2,
            "3 expert tensors in each of 2 MoE layers"
        );
        assert!(parts.values().all(|e| e == &[0, 1, 2, 3]), "{parts:?}");
    }

    #[test]
    fn shards_fill_up_to_the_limit_and_a_large_tensor_gets_its_own() {
        let tensors = [tensor(10), tensor(10), tensor(30), tensor(5), tensor(5)];
        // bf16: 20, 20, 60, 10, 10 bytes against a limit of 40.
        assert_eq!(
            plan_shards(&tensors, ExportPrecision::Bf16, 40),
            vec![vec![0, 1], vec![2], vec![3, 4]]
        );
        assert_eq!(
            plan_shards(&tensors, ExportPrecision::F32, 1 << 20),
            vec![vec![0, 1, 2, 3, 4]]
        );
    }
}
