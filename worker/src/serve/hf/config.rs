//! `config.json` of a Hugging Face MoE model, read into what the serving
//! engine needs; anything it would compute differently is refused by name.
//!
//! Mirrors `MixtralConfig`, `Qwen2MoeConfig`, `Qwen3MoeConfig`,
//! `DeepseekV3Config` and `OlmoeConfig` in `transformers`
//! (<https://github.com/huggingface/transformers/tree/main/src/transformers/models>),
//! in both their older (`rope_theta`, `rope_scaling`) and newer
//! (`rope_parameters`) spellings.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::moe::{GroupLimit, ScoreFunction};
use crate::serve::hf::HfError;
use crate::serve::model::LatentShape;
use crate::serve::yarn::Yarn;

/// The architectures this worker serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// Softmax top-k routing renormalised over the chosen experts, no shared expert.
    Mixtral,
    /// Softmax top-k (`norm_topk_prob`), a sigmoid-gated shared expert, q/k/v biases.
    Qwen2Moe,
    /// Softmax top-k (`norm_topk_prob`), q/k RMSNorm, an explicit `head_dim`.
    Qwen3Moe,
    /// Multi-head latent attention, YaRN, dense first layers, sigmoid
    /// group-limited routing with a selection bias, ungated shared experts.
    DeepseekV3,
    /// Softmax top-k (`norm_topk_prob`), q/k RMSNorm over the whole
    /// projection (not per head), optional `clip_qkv`, no shared expert.
    Olmoe,
}

/// How q and k are RMS-normed before RoPE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkNorm {
    /// Each head on its own, gains `[head_dim]` (Qwen3).
    PerHead,
    /// The whole projection of a token at once, gains `[heads * head_dim]`
    /// and `[kv_heads * head_dim]` (OLMoE).
    Whole,
}

impl Architecture {
    pub const SUPPORTED: &str = "MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, \
         DeepseekV3ForCausalLM, OlmoeForCausalLM";

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "MixtralForCausalLM" | "mixtral" => Some(Self::Mixtral),
            "Qwen2MoeForCausalLM" | "qwen2_moe" => Some(Self::Qwen2Moe),
            "Qwen3MoeForCausalLM" | "qwen3_moe" => Some(Self::Qwen3Moe),
            "DeepseekV3ForCausalLM" | "deepseek_v3" => Some(Self::DeepseekV3),
            "OlmoeForCausalLM" | "olmoe" => Some(Self::Olmoe),
            _ => None,
        }
    }
}

/// What a model's `config.json` says, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct HfConfig {
    pub architecture: Architecture,
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// `max_position_embeddings`, or the sliding window when it is shorter
    /// (within the window, sliding-window attention is full attention).
    pub context: usize,
    pub rope_theta: f64,
    /// YaRN (DeepSeek-V3); `None`: plain RoPE.
    pub rope_scaling: Option<Yarn>,
    /// RoPE pairs `(2i, 2i + 1)` (DeepSeek's `rope_interleave`), else
    /// `(i, i + d/2)`.
    pub rope_interleave: bool,
    pub norm_eps: f64,
    pub tie_embeddings: bool,
    pub experts: usize,
    pub top_k: usize,
    /// Width of each routed expert.
    pub expert_hidden: usize,
    /// Width of the dense MLP of non-MoE layers (Qwen's `intermediate_size`).
    pub dense_hidden: usize,
    /// Width of the shared expert (0: none): Qwen2-MoE's, or DeepSeek's
    /// `n_shared_experts` fused into one.
    pub shared_hidden: usize,
    /// Whether the shared expert is sigmoid-gated (Qwen2-MoE).
    pub shared_gated: bool,
    pub norm_topk: bool,
    /// Softmax (Mixtral, Qwen) or sigmoid (DeepSeek-V3) router scores.
    pub score_function: ScoreFunction,
    /// DeepSeek-V3's `n_group` / `topk_group` (`None`: one group).
    pub group_limit: Option<GroupLimit>,
    pub routed_scaling_factor: f64,
    /// Whether the router has a selection bias (`e_score_correction_bias`).
    pub selection_bias: bool,
    /// Multi-head latent attention (DeepSeek-V3); `head_dim` is then its
    /// `qk_rope_head_dim`, as in `transformers`.
    pub latent: Option<LatentShape>,
    /// q/k/v biases (Qwen2 always, Qwen3 with `attention_bias`).
    pub qkv_bias: bool,
    /// An output-projection bias (Qwen3 with `attention_bias`).
    pub o_bias: bool,
    /// q/k RMSNorm before RoPE (Qwen3 per head, OLMoE whole); `None`: none.
    pub qk_norm: Option<QkNorm>,
    /// OLMoE's `clip_qkv`: q, k and v clamped to `±clip` after projection
    /// (and q/k norm), before RoPE.
    pub clip_qkv: Option<f64>,
    /// Per layer: MoE (else a dense MLP).
    pub moe_layers: Vec<bool>,
    /// `eos_token_id`, one or several.
    pub eos: Vec<u32>,
    /// `quantization_config` of a block-scaled FP8 checkpoint (`None`: the
    /// weights are unquantized).
    pub fp8: Option<Fp8Blocks>,
}

/// A block-scaled FP8 checkpoint (DeepSeek-V3's release, Qwen's `-FP8`
/// models): each quantized `[out, in]` weight is `F8_E4M3` with a
/// `weight_scale_inv` of `[ceil(out / rows), ceil(in / cols)]`, one scale
/// per block, edge blocks partial.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fp8Blocks {
    /// `weight_block_size[0]`: the output rows one scale covers.
    pub rows: usize,
    /// `weight_block_size[1]`: the input columns one scale covers.
    pub cols: usize,
}

/// Reads one field of `config.json`.
struct Fields<'a> {
    path: &'a Path,
    json: &'a Value,
}

impl Fields<'_> {
    fn invalid(&self, problem: String) -> HfError {
        HfError::Invalid {
            path: self.path.to_path_buf(),
            problem,
        }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.json.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str) -> Result<usize, HfError> {
        self.opt_usize(key)?
            .ok_or_else(|| self.invalid(format!("{key} is missing")))
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>, HfError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.invalid(format!("{key} is {v}, not a count"))),
        }
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>, HfError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.invalid(format!("{key} is {v}, not a number"))),
        }
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64, HfError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.invalid(format!("{key} is {v}, not a number"))),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool, HfError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.invalid(format!("{key} is {v}, not true or false"))),
        }
    }

    fn positive(&self, key: &str) -> Result<usize, HfError> {
        let n = self.usize(key)?;
        if n == 0 {
            return Err(self.invalid(format!("{key} is 0")));
        }
        Ok(n)
    }
}

/// Token ids from a number or a list of numbers (`eos_token_id`).
pub fn token_ids(value: Option<&Value>) -> Vec<u32> {
    let one = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
    match value {
        Some(Value::Array(items)) => items.iter().filter_map(one).collect(),
        Some(v) => one(v).into_iter().collect(),
        None => Vec::new(),
    }
}

impl HfConfig {
    /// Reads and checks `dir/config.json`.
    pub fn read(dir: &Path) -> Result<Self, HfError> {
        let path: PathBuf = dir.join("config.json");
        let bytes = std::fs::read(&path).map_err(|error| HfError::io(&path, error))?;
        let json: Value = serde_json::from_slice(&bytes).map_err(|e| HfError::Invalid {
            path: path.clone(),
            problem: format!("not JSON: {e}"),
        })?;
        Self::from_json(&path, &json)
    }

    pub fn from_json(path: &Path, json: &Value) -> Result<Self, HfError> {
        let f = Fields { path, json };
        let architecture = architecture(&f)?;
        if let Some(act) = f.get("hidden_act").and_then(Value::as_str)
            && act != "silu"
        {
            return Err(f.invalid(format!(
                "hidden_act is {act:?}; this worker's MLPs use \"silu\" (SwiGLU)"
            )));
        }
        let (rope_theta, rope_scaling) = rope(&f, architecture)?;
        let hidden = f.positive("hidden_size")?;
        let heads = f.positive("num_attention_heads")?;
        let latent = match architecture {
            Architecture::DeepseekV3 => Some(latent_shape(&f, rope_scaling.as_ref())?),
            _ => None,
        };
        // MLA expands keys and values to every head (num_key_value_heads
        // plays no part in its arithmetic).
        let kv_heads = match &latent {
            Some(_) => heads,
            None => f.opt_usize("num_key_value_heads")?.unwrap_or(heads),
        };
        let head_dim = match (&latent, f.opt_usize("head_dim")?) {
            (Some(latent), _) => latent.qk_rope_dim,
            (None, Some(d)) => d,
            (None, None) => hidden / heads,
        };
        // OLMoE sizes q_norm by hidden_size and k_norm by (hidden_size /
        // heads) * kv_heads, so its q projection must be exactly hidden wide.
        // (Checked: a huge head_dim must be refused, not overflow.)
        if architecture == Architecture::Olmoe && head_dim.checked_mul(heads) != Some(hidden) {
            return Err(f.invalid(format!(
                "head_dim {head_dim} times num_attention_heads {heads} is not hidden_size \
                 {hidden}; OLMoE's q_norm and k_norm are sized for hidden_size / heads"
            )));
        }
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(f.invalid(format!("the head dimension {head_dim} is not even")));
        }
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(f.invalid(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )));
        }
        let layers = f.positive("num_hidden_layers")?;
        let mut context = f.positive("max_position_embeddings")?;
        let window = match architecture {
            Architecture::Mixtral => f.opt_usize("sliding_window")?,
            _ if f.bool_or("use_sliding_window", false)? => Some(f.positive("sliding_window")?),
            _ => None,
        };
        if let Some(window) = window.filter(|&w| w < context) {
            tracing::warn!(
                window,
                max_position_embeddings = context,
                "sliding-window attention: the context is capped at the window, where it is full attention"
            );
            context = window;
        }
        let experts = match architecture {
            Architecture::DeepseekV3 => f.positive("n_routed_experts")?,
            _ => match f.opt_usize("num_local_experts")? {
                Some(n) => n,
                None => f.positive("num_experts")?,
            },
        };
        let top_k = f.positive("num_experts_per_tok")?;
        if top_k > experts {
            return Err(f.invalid(format!(
                "num_experts_per_tok {top_k} is more than the {experts} experts"
            )));
        }
        let (expert_hidden, dense_hidden, shared_hidden, norm_topk) = match architecture {
            Architecture::Mixtral => (f.positive("intermediate_size")?, 0, 0, true),
            Architecture::Olmoe => (
                f.positive("intermediate_size")?,
                0,
                0,
                f.bool_or("norm_topk_prob", false)?,
            ),
            Architecture::Qwen2Moe => (
                f.positive("moe_intermediate_size")?,
                f.usize("intermediate_size")?,
                f.usize("shared_expert_intermediate_size")?,
                f.bool_or("norm_topk_prob", false)?,
            ),
            Architecture::Qwen3Moe => (
                f.positive("moe_intermediate_size")?,
                f.usize("intermediate_size")?,
                0,
                f.bool_or("norm_topk_prob", true)?,
            ),
            Architecture::DeepseekV3 => {
                let width = f.positive("moe_intermediate_size")?;
                let shared = f.opt_usize("n_shared_experts")?.unwrap_or(1);
                (
                    width,
                    f.usize("intermediate_size")?,
                    shared * width,
                    f.bool_or("norm_topk_prob", true)?,
                )
            }
        };
        let routing = routing(&f, architecture, experts, top_k, norm_topk)?;
        let moe_layers = match architecture {
            Architecture::Mixtral | Architecture::Olmoe => vec![true; layers],
            Architecture::DeepseekV3 => {
                let dense = f.opt_usize("first_k_dense_replace")?.unwrap_or(3);
                (0..layers).map(|i| i >= dense).collect()
            }
            Architecture::Qwen2Moe | Architecture::Qwen3Moe => {
                let step = f.opt_usize("decoder_sparse_step")?.unwrap_or(1).max(1);
                let dense: Vec<usize> = match f.get("mlp_only_layers") {
                    None => Vec::new(),
                    Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
                        f.invalid(format!("mlp_only_layers is {v}, not a list of layers"))
                    })?,
                };
                (0..layers)
                    .map(|i| !dense.contains(&i) && (i + 1).is_multiple_of(step))
                    .collect()
            }
        };
        if moe_layers.iter().any(|m| !m) && dense_hidden == 0 {
            return Err(f.invalid("intermediate_size is missing for the dense layers".into()));
        }
        let attention_bias = f.bool_or("attention_bias", false)?;
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Mixtral | Architecture::DeepseekV3 => (false, false),
            Architecture::Qwen2Moe => (f.bool_or("qkv_bias", true)?, false),
            // Both bias q, k, v and o with attention_bias.
            Architecture::Qwen3Moe | Architecture::Olmoe => (attention_bias, attention_bias),
        };
        let clip_qkv = match f.opt_f64("clip_qkv")? {
            Some(clip) if architecture != Architecture::Olmoe => {
                return Err(f.invalid(format!(
                    "clip_qkv is {clip}; this worker clips q, k and v only for OLMoE"
                )));
            }
            Some(clip) if !(clip.is_finite() && clip > 0.0) => {
                return Err(f.invalid(format!("clip_qkv is {clip}, not a positive finite number")));
            }
            clip => clip,
        };
        if architecture == Architecture::Mixtral && attention_bias {
            return Err(f.invalid("attention_bias is true; Mixtral has no attention biases".into()));
        }
        if architecture == Architecture::DeepseekV3 && attention_bias {
            return Err(f.invalid(
                "attention_bias is true; this worker serves DeepSeek-V3's attention without \
                 biases (as the released models have it)"
                    .into(),
            ));
        }
        Ok(Self {
            architecture,
            vocab: f.positive("vocab_size")?,
            hidden,
            layers,
            heads,
            kv_heads,
            head_dim,
            context,
            rope_theta,
            rope_scaling,
            rope_interleave: architecture == Architecture::DeepseekV3
                && f.bool_or("rope_interleave", true)?,
            norm_eps: f.f64_or("rms_norm_eps", 1e-6)?,
            tie_embeddings: f.bool_or("tie_word_embeddings", false)?,
            experts,
            top_k,
            expert_hidden,
            dense_hidden,
            shared_hidden,
            shared_gated: architecture == Architecture::Qwen2Moe,
            norm_topk,
            score_function: routing.score_function,
            group_limit: routing.group_limit,
            routed_scaling_factor: routing.routed_scaling_factor,
            selection_bias: architecture == Architecture::DeepseekV3,
            latent,
            qkv_bias,
            o_bias,
            qk_norm: match architecture {
                Architecture::Qwen3Moe => Some(QkNorm::PerHead),
                Architecture::Olmoe => Some(QkNorm::Whole),
                _ => None,
            },
            clip_qkv,
            moe_layers,
            eos: token_ids(f.get("eos_token_id")),
            fp8: quantization(&f)?,
        })
    }
}

/// `quantization_config`: `None` without one; block-scaled FP8 read as
/// `transformers`' fine-grained FP8 (E4M3 weights, dynamic activation
/// scaling: the weights dequantized are the model); any other scheme is
/// refused by field and value, since serving it as unquantized would be wrong.
fn quantization(f: &Fields<'_>) -> Result<Option<Fp8Blocks>, HfError> {
    let Some(q) = f.get("quantization_config") else {
        return Ok(None);
    };
    let field = |key: &str| q.get(key).filter(|v| !v.is_null());
    let refuse = |key: &str, value: &Value, reads: &str| {
        f.invalid(format!(
            "quantization_config.{key} is {value}; this worker reads {reads}"
        ))
    };
    let method = field("quant_method").unwrap_or(&Value::Null);
    if method.as_str() != Some("fp8") {
        return Err(refuse(
            "quant_method",
            method,
            "only \"fp8\" (block-scaled E4M3) quantized checkpoints",
        ));
    }
    for (key, accepted) in [
        ("fmt", "e4m3"),
        ("activation_scheme", "dynamic"),
        ("expert_dtype", "fp8"),
    ] {
        // Case-insensitive, as transformers lowercases activation_scheme.
        if let Some(value) = field(key)
            && !value
                .as_str()
                .is_some_and(|v| v.eq_ignore_ascii_case(accepted))
        {
            return Err(refuse(
                key,
                value,
                &format!("only {accepted:?} FP8 checkpoints"),
            ));
        }
    }
    let block = field("weight_block_size").ok_or_else(|| {
        f.invalid(
            "quantization_config.weight_block_size is missing; this worker reads only \
             block-scaled FP8 checkpoints (per-tensor scales are not implemented)"
                .into(),
        )
    })?;
    let positive = |v: &Value| {
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n > 0)
    };
    if let Some([rows, cols]) = block.as_array().map(Vec::as_slice)
        && let (Some(rows), Some(cols)) = (positive(rows), positive(cols))
    {
        return Ok(Some(Fp8Blocks { rows, cols }));
    }
    Err(refuse(
        "weight_block_size",
        block,
        "a block size of two positive integers [rows, columns]",
    ))
}

fn architecture(f: &Fields<'_>) -> Result<Architecture, HfError> {
    let named: Vec<&str> = match f.get("architectures") {
        Some(Value::Array(names)) => names.iter().filter_map(Value::as_str).collect(),
        _ => f
            .get("model_type")
            .and_then(Value::as_str)
            .into_iter()
            .collect(),
    };
    match named.as_slice() {
        [name] => Architecture::from_name(name).ok_or_else(|| {
            f.invalid(format!(
                "names architecture {name}, which this worker cannot serve (it serves {})",
                Architecture::SUPPORTED
            ))
        }),
        [] => Err(f.invalid(format!(
            "names no architecture (architectures or model_type: one of {})",
            Architecture::SUPPORTED
        ))),
        names => Err(f.invalid(format!(
            "names several architectures {names:?}; expected one of {}",
            Architecture::SUPPORTED
        ))),
    }
}

/// The RoPE base and scaling: YaRN for DeepSeek-V3, any other scaling
/// (linear, dynamic, …, or YaRN elsewhere) refused.
fn rope(f: &Fields<'_>, architecture: Architecture) -> Result<(f64, Option<Yarn>), HfError> {
    let default_theta = match architecture {
        Architecture::Mixtral => 1e6,
        _ => 10_000.0,
    };
    let mut theta = f.f64_or("rope_theta", default_theta)?;
    let mut yarn = None;
    for key in ["rope_scaling", "rope_parameters"] {
        let Some(params) = f.get(key) else { continue };
        let kind = params
            .get("rope_type")
            .or_else(|| params.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        match kind {
            "default" => {}
            "yarn" if architecture == Architecture::DeepseekV3 => {
                yarn = Some(yarn_parameters(f, key, params)?);
            }
            _ => {
                let only = match architecture {
                    Architecture::DeepseekV3 => "plain RoPE and YaRN",
                    _ => "only plain RoPE for this architecture",
                };
                return Err(f.invalid(format!(
                    "{key} asks for {kind:?} RoPE scaling, which this worker does not implement \
                     ({only})"
                )));
            }
        }
        if let Some(t) = params.get("rope_theta").and_then(Value::as_f64) {
            theta = t;
        }
    }
    if !(theta.is_finite() && theta >= 1.0) {
        return Err(f.invalid(format!("rope_theta {theta} must be at least 1")));
    }
    Ok((theta, yarn))
}

/// YaRN's parameters with `transformers`' defaults: `factor` from the two
/// contexts when absent, the original context `max_position_embeddings`
/// when absent, `beta_fast` 32 and `beta_slow` 1 when absent or 0.
fn yarn_parameters(f: &Fields<'_>, key: &str, params: &Value) -> Result<Yarn, HfError> {
    let number = |name: &str| -> Result<Option<f64>, HfError> {
        match params.get(name).filter(|v| !v.is_null()) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| f.invalid(format!("{key}.{name} is {v}, not a number"))),
        }
    };
    let context = f.positive("max_position_embeddings")? as f64;
    let original_context = match number("original_max_position_embeddings")? {
        Some(n) => n,
        None => f
            .opt_f64("original_max_position_embeddings")?
            .unwrap_or(context),
    };
    let factor = number("factor")?.unwrap_or(context / original_context);
    if !(factor > 0.0 && original_context >= 1.0) {
        return Err(f.invalid(format!(
            "{key}: YaRN needs a positive factor ({factor}) and original_max_position_embeddings \
             ({original_context})"
        )));
    }
    let or_default =
        |value: Option<f64>, default: f64| value.filter(|&v| v != 0.0).unwrap_or(default);
    let truncate = match params.get("truncate").filter(|v| !v.is_null()) {
        None => true,
        Some(v) => v
            .as_bool()
            .ok_or_else(|| f.invalid(format!("{key}.truncate is {v}, not true or false")))?,
    };
    Ok(Yarn {
        factor,
        original_context,
        beta_fast: or_default(number("beta_fast")?, 32.0),
        beta_slow: or_default(number("beta_slow")?, 1.0),
        mscale: number("mscale")?,
        mscale_all_dim: number("mscale_all_dim")?,
        attention_factor: number("attention_factor")?,
        truncate,
    })
}

/// DeepSeek-V3's attention shape and softmax scale
/// (`DeepseekV3Attention.scaling`: `yarn_apply_mscale`).
fn latent_shape(f: &Fields<'_>, yarn: Option<&Yarn>) -> Result<LatentShape, HfError> {
    let qk_nope_dim = f.positive("qk_nope_head_dim")?;
    let qk_rope_dim = f.positive("qk_rope_head_dim")?;
    if !qk_rope_dim.is_multiple_of(2) {
        return Err(f.invalid(format!("qk_rope_head_dim {qk_rope_dim} is not even")));
    }
    let q_lora_rank = f.opt_usize("q_lora_rank")?;
    if q_lora_rank == Some(0) {
        return Err(f.invalid("q_lora_rank is 0 (null means a full-rank q_proj)".into()));
    }
    let qk_head_dim = (qk_nope_dim + qk_rope_dim) as f64;
    Ok(LatentShape {
        q_lora_rank,
        kv_lora_rank: f.positive("kv_lora_rank")?,
        qk_nope_dim,
        qk_rope_dim,
        v_head_dim: f.positive("v_head_dim")?,
        softmax_scale: qk_head_dim.powf(-0.5) * yarn.map_or(1.0, Yarn::softmax_scale_factor),
    })
}

/// How the router scores and picks experts.
struct Routing {
    score_function: ScoreFunction,
    group_limit: Option<GroupLimit>,
    routed_scaling_factor: f64,
}

/// DeepSeek-V3: sigmoid scores always renormalised over the chosen experts
/// (the worker's sigmoid router does, so `norm_topk_prob` false is
/// refused), `n_group` / `topk_group` (transformers' defaults 8 and 4),
/// `routed_scaling_factor` (default 2.5). The others: softmax, unscaled.
fn routing(
    f: &Fields<'_>,
    architecture: Architecture,
    experts: usize,
    top_k: usize,
    norm_topk: bool,
) -> Result<Routing, HfError> {
    if architecture != Architecture::DeepseekV3 {
        return Ok(Routing {
            score_function: ScoreFunction::Softmax,
            group_limit: None,
            routed_scaling_factor: 1.0,
        });
    }
    if !norm_topk {
        return Err(f.invalid(
            "norm_topk_prob is false; this worker's sigmoid routing always renormalises the \
             chosen experts' scores"
                .into(),
        ));
    }
    let n_group = f.opt_usize("n_group")?.unwrap_or(8);
    let topk_group = f.opt_usize("topk_group")?.unwrap_or(4);
    if n_group == 0 || !experts.is_multiple_of(n_group) {
        return Err(f.invalid(format!(
            "n_group {n_group} does not divide the {experts} routed experts"
        )));
    }
    if topk_group == 0 || topk_group > n_group || topk_group * (experts / n_group) < top_k {
        return Err(f.invalid(format!(
            "topk_group {topk_group} of n_group {n_group} cannot reach num_experts_per_tok {top_k}"
        )));
    }
    let routed_scaling_factor = f.f64_or("routed_scaling_factor", 2.5)?;
    if !(routed_scaling_factor.is_finite() && routed_scaling_factor >= 0.0) {
        return Err(f.invalid(format!(
            "routed_scaling_factor {routed_scaling_factor} is not a finite, non-negative number"
        )));
    }
    Ok(Routing {
        score_function: ScoreFunction::Sigmoid,
        // One group is every expert: no limit.
        group_limit: (n_group > 1).then_some(GroupLimit {
            n_groups: n_group,
            top_groups: topk_group,
        }),
        routed_scaling_factor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(json: Value) -> Result<HfConfig, String> {
        HfConfig::from_json(Path::new("config.json"), &json).map_err(|e| e.to_string())
    }

    fn mixtral() -> Value {
        json!({
            "architectures": ["MixtralForCausalLM"], "vocab_size": 300, "hidden_size": 64,
            "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
            "max_position_embeddings": 128, "rope_theta": 1e6, "rms_norm_eps": 1e-5,
            "sliding_window": null, "eos_token_id": 2
        })
    }

    #[test]
    fn old_and_new_rope_spellings_read_alike() {
        let old = read(mixtral()).unwrap();
        let mut new = mixtral();
        new.as_object_mut().unwrap().remove("rope_theta");
        new["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 1e6});
        assert_eq!(read(new).unwrap(), old);
        assert_eq!(
            (old.head_dim, old.context, old.eos.as_slice()),
            (16, 128, &[2][..])
        );
    }

    #[test]
    fn what_cannot_be_served_is_named() {
        let mut c = mixtral();
        c["architectures"] = json!(["DbrxForCausalLM"]);
        assert!(read(c).unwrap_err().contains("DbrxForCausalLM"));
        let mut c = mixtral();
        c["rope_scaling"] = json!({"type": "yarn", "factor": 4.0});
        assert!(read(c).unwrap_err().contains("rope_scaling"));
        let mut c = mixtral();
        c["hidden_act"] = json!("gelu");
        assert!(read(c).unwrap_err().contains("hidden_act"));
        let mut c = mixtral();
        c.as_object_mut().unwrap().remove("num_experts_per_tok");
        assert!(
            read(c)
                .unwrap_err()
                .contains("num_experts_per_tok is missing")
        );
    }

    fn deepseek_v3() -> Value {
        json!({
            "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 300, "hidden_size": 64,
            "intermediate_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 3,
            "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 8,
            "n_shared_experts": 2, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
            "routed_scaling_factor": 2.5, "norm_topk_prob": true, "first_k_dense_replace": 1,
            "q_lora_rank": 24, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8, "v_head_dim": 16, "max_position_embeddings": 256,
            "head_dim": 8, "rope_interleave": true, "eos_token_id": 1,
            "rope_scaling": {"type": "yarn", "factor": 4.0, "mscale": 1.0,
                "mscale_all_dim": 0.8, "original_max_position_embeddings": 64},
            "rope_theta": 10000.0
        })
    }

    #[test]
    fn deepseek_v3_reads_its_attention_rope_and_routing() {
        let c = read(deepseek_v3()).unwrap();
        let latent = c.latent.clone().unwrap();
        assert_eq!(
            (
                latent.q_lora_rank,
                latent.kv_lora_rank,
                latent.latent_width()
            ),
            (Some(24), 32, 40)
        );
        assert_eq!((c.head_dim, c.kv_heads, c.experts), (8, 4, 8));
        // DeepSeek-V3's scale: 1/sqrt(24) * (0.1 * 0.8 * ln 4 + 1)².
        let m = 0.1 * 0.8 * 4f64.ln() + 1.0;
        assert!((latent.softmax_scale - m * m / 24f64.sqrt()).abs() < 1e-12);
        let yarn = c.rope_scaling.clone().unwrap();
        assert_eq!((yarn.factor, yarn.original_context), (4.0, 64.0));
        assert_eq!((yarn.beta_fast, yarn.beta_slow), (32.0, 1.0));
        assert!(c.rope_interleave && c.selection_bias && !c.shared_gated);
        assert_eq!(c.moe_layers, [false, true, true]);
        assert_eq!(
            (c.expert_hidden, c.shared_hidden, c.dense_hidden),
            (16, 32, 64)
        );
        assert_eq!(c.score_function, ScoreFunction::Sigmoid);
        assert_eq!(
            c.group_limit,
            Some(GroupLimit {
                n_groups: 4,
                top_groups: 2
            })
        );
        assert_eq!(c.routed_scaling_factor, 2.5);

        // The newer spelling reads alike; a null q_lora_rank is a full q_proj.
        let mut new = deepseek_v3();
        let map = new.as_object_mut().unwrap();
        let mut rope = map.remove("rope_scaling").unwrap();
        rope["rope_type"] = json!("yarn");
        rope["rope_theta"] = map.remove("rope_theta").unwrap();
        map.insert("rope_parameters".into(), rope);
        map.insert("q_lora_rank".into(), Value::Null);
        let new = read(new).unwrap();
        assert_eq!(new.rope_scaling, c.rope_scaling);
        assert_eq!(new.latent.unwrap().q_lora_rank, None);
    }

    #[test]
    fn what_deepseek_v3_cannot_serve_is_named() {
        for (key, value, named) in [
            ("norm_topk_prob", json!(false), "norm_topk_prob"),
            ("attention_bias", json!(true), "attention_bias"),
            ("n_group", json!(3), "n_group"),
            ("topk_group", json!(5), "topk_group"),
            ("qk_rope_head_dim", json!(7), "qk_rope_head_dim"),
            ("kv_lora_rank", json!(0), "kv_lora_rank"),
            (
                "rope_scaling",
                json!({"type": "linear", "factor": 2.0}),
                "linear",
            ),
        ] {
            let mut c = deepseek_v3();
            c[key] = value;
            let error = read(c).unwrap_err();
            assert!(error.contains(named), "{key}: {error}");
        }
        let mut c = deepseek_v3();
        c.as_object_mut().unwrap().remove("v_head_dim");
        assert!(read(c).unwrap_err().contains("v_head_dim is missing"));
        // YaRN stays refused where transformers' model would not apply it as DeepSeek does.
        let mut c = mixtral();
        c["rope_scaling"] = json!({"type": "yarn", "factor": 4.0});
        assert!(read(c).unwrap_err().contains("only plain RoPE"));
    }

    #[test]
    fn block_scaled_fp8_is_read_and_other_quantization_named() {
        assert_eq!(read(deepseek_v3()).unwrap().fp8, None);
        let mut c = deepseek_v3();
        c["quantization_config"] = json!({
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [128, 64], "modules_to_not_convert": ["lm_head"]
        });
        assert_eq!(
            read(c).unwrap().fp8,
            Some(Fp8Blocks {
                rows: 128,
                cols: 64
            })
        );
        for (key, value, named) in [
            ("quant_method", json!("gptq"), "quant_method is \"gptq\""),
            ("fmt", json!("e5m2"), "fmt is \"e5m2\""),
            (
                "activation_scheme",
                json!("static"),
                "activation_scheme is \"static\"",
            ),
            ("expert_dtype", json!("fp4"), "expert_dtype is \"fp4\""),
            (
                "weight_block_size",
                json!([128]),
                "weight_block_size is [128]",
            ),
            (
                "weight_block_size",
                json!([128, 0]),
                "weight_block_size is [128,0]",
            ),
            (
                "weight_block_size",
                json!(null),
                "weight_block_size is missing",
            ),
        ] {
            let mut c = deepseek_v3();
            c["quantization_config"] = json!({
                "quant_method": "fp8", "weight_block_size": [128, 128]
            });
            c["quantization_config"][key] = value;
            let error = read(c).unwrap_err();
            assert!(error.contains(named), "{key}: {error}");
        }
    }

    fn olmoe() -> Value {
        json!({
            "architectures": ["OlmoeForCausalLM"], "vocab_size": 300, "hidden_size": 64,
            "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_experts": 8, "num_experts_per_tok": 2,
            "norm_topk_prob": false, "attention_bias": false, "clip_qkv": null,
            "max_position_embeddings": 128, "rope_theta": 10000.0, "eos_token_id": 2
        })
    }

    #[test]
    fn olmoe_reads_its_norms_clipping_and_routing() {
        let c = read(olmoe()).unwrap();
        assert_eq!(c.architecture, Architecture::Olmoe);
        assert_eq!((c.head_dim, c.kv_heads, c.experts, c.top_k), (16, 2, 8, 2));
        assert_eq!((c.expert_hidden, c.shared_hidden), (16, 0));
        assert_eq!(c.qk_norm, Some(QkNorm::Whole));
        assert_eq!(c.clip_qkv, None);
        assert!(!c.norm_topk && !c.qkv_bias && !c.o_bias);
        assert_eq!(c.moe_layers, [true, true]);
        let mut c = olmoe();
        c["clip_qkv"] = json!(8.0);
        c["attention_bias"] = json!(true);
        c["norm_topk_prob"] = json!(true);
        let c = read(c).unwrap();
        assert_eq!(c.clip_qkv, Some(8.0));
        assert!(c.norm_topk && c.qkv_bias && c.o_bias);
        for (key, value, named) in [
            ("clip_qkv", json!(0.0), "clip_qkv is 0"),
            ("head_dim", json!(32), "head_dim 32"),
            (
                "rope_scaling",
                json!({"type": "linear", "factor": 2.0}),
                "linear",
            ),
        ] {
            let mut c = olmoe();
            c[key] = value;
            let error = read(c).unwrap_err();
            assert!(error.contains(named), "{key}: {error}");
        }
        let mut c = mixtral();
        c["clip_qkv"] = json!(8.0);
        assert!(read(c).unwrap_err().contains("clip_qkv is 8"));
    }

    #[test]
    fn a_sliding_window_caps_the_context() {
        let mut c = mixtral();
        c["sliding_window"] = json!(64);
        assert_eq!(read(c).unwrap().context, 64);
    }

    #[test]
    fn qwen_layers_follow_the_sparse_step_and_dense_list() {
        let c = json!({
            "architectures": ["Qwen2MoeForCausalLM"], "vocab_size": 300, "hidden_size": 64,
            "intermediate_size": 64, "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 32, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_experts": 8, "num_experts_per_tok": 2,
            "max_position_embeddings": 128, "decoder_sparse_step": 2, "mlp_only_layers": [3],
            "eos_token_id": [2, 0]
        });
        let c = read(c).unwrap();
        assert_eq!(c.moe_layers, [false, true, false, false]);
        assert!(c.qkv_bias && !c.norm_topk && c.shared_hidden == 32);
        assert_eq!(c.eos, [2, 0]);
    }
}
