//! `config.json` of a Hugging Face MoE model, read into what the serving
//! engine needs; anything it would compute differently is refused by name.
//!
//! Mirrors `MixtralConfig`, `Qwen2MoeConfig` and `Qwen3MoeConfig` in
//! `transformers` (<https://github.com/huggingface/transformers/tree/main/src/transformers/models>),
//! in both their older (`rope_theta`, `rope_scaling`) and newer
//! (`rope_parameters`) spellings.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::serve::hf::HfError;

/// The architectures this worker serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// Softmax top-k routing renormalised over the chosen experts, no shared expert.
    Mixtral,
    /// Softmax top-k (`norm_topk_prob`), a sigmoid-gated shared expert, q/k/v biases.
    Qwen2Moe,
    /// Softmax top-k (`norm_topk_prob`), q/k RMSNorm, an explicit `head_dim`.
    Qwen3Moe,
}

impl Architecture {
    pub const SUPPORTED: &str = "MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM";

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "MixtralForCausalLM" | "mixtral" => Some(Self::Mixtral),
            "Qwen2MoeForCausalLM" | "qwen2_moe" => Some(Self::Qwen2Moe),
            "Qwen3MoeForCausalLM" | "qwen3_moe" => Some(Self::Qwen3Moe),
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
    pub norm_eps: f64,
    pub tie_embeddings: bool,
    pub experts: usize,
    pub top_k: usize,
    /// Width of each routed expert.
    pub expert_hidden: usize,
    /// Width of the dense MLP of non-MoE layers (Qwen's `intermediate_size`).
    pub dense_hidden: usize,
    /// Width of Qwen2-MoE's shared expert (0: none).
    pub shared_hidden: usize,
    pub norm_topk: bool,
    /// q/k/v biases (Qwen2 always, Qwen3 with `attention_bias`).
    pub qkv_bias: bool,
    /// An output-projection bias (Qwen3 with `attention_bias`).
    pub o_bias: bool,
    pub qk_norm: bool,
    /// Per layer: MoE (else a dense MLP).
    pub moe_layers: Vec<bool>,
    /// `eos_token_id`, one or several.
    pub eos: Vec<u32>,
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
        let rope_theta = rope_theta(&f, architecture)?;
        let hidden = f.positive("hidden_size")?;
        let heads = f.positive("num_attention_heads")?;
        let kv_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(heads);
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None => hidden / heads,
        };
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
        let experts = match f.opt_usize("num_local_experts")? {
            Some(n) => n,
            None => f.positive("num_experts")?,
        };
        let top_k = f.positive("num_experts_per_tok")?;
        if top_k > experts {
            return Err(f.invalid(format!(
                "num_experts_per_tok {top_k} is more than the {experts} experts"
            )));
        }
        let (expert_hidden, dense_hidden, shared_hidden, norm_topk) = match architecture {
            Architecture::Mixtral => (f.positive("intermediate_size")?, 0, 0, true),
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
        };
        let moe_layers = match architecture {
            Architecture::Mixtral => vec![true; layers],
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
            Architecture::Mixtral => (false, false),
            Architecture::Qwen2Moe => (f.bool_or("qkv_bias", true)?, false),
            Architecture::Qwen3Moe => (attention_bias, attention_bias),
        };
        if architecture == Architecture::Mixtral && attention_bias {
            return Err(f.invalid("attention_bias is true; Mixtral has no attention biases".into()));
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
            norm_eps: f.f64_or("rms_norm_eps", 1e-6)?,
            tie_embeddings: f.bool_or("tie_word_embeddings", false)?,
            experts,
            top_k,
            expert_hidden,
            dense_hidden,
            shared_hidden,
            norm_topk,
            qkv_bias,
            o_bias,
            qk_norm: architecture == Architecture::Qwen3Moe,
            moe_layers,
            eos: token_ids(f.get("eos_token_id")),
        })
    }
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

/// The RoPE base; any scaling (YaRN, linear, dynamic, …) is refused.
fn rope_theta(f: &Fields<'_>, architecture: Architecture) -> Result<f64, HfError> {
    let default_theta = match architecture {
        Architecture::Mixtral => 1e6,
        _ => 10_000.0,
    };
    let mut theta = f.f64_or("rope_theta", default_theta)?;
    for key in ["rope_scaling", "rope_parameters"] {
        let Some(params) = f.get(key) else { continue };
        let kind = params
            .get("rope_type")
            .or_else(|| params.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        if kind != "default" {
            return Err(f.invalid(format!(
                "{key} asks for {kind:?} RoPE scaling, which this worker does not implement \
                 (only plain RoPE)"
            )));
        }
        if let Some(t) = params.get("rope_theta").and_then(Value::as_f64) {
            theta = t;
        }
    }
    if !(theta.is_finite() && theta >= 1.0) {
        return Err(f.invalid(format!("rope_theta {theta} must be at least 1")));
    }
    Ok(theta)
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
        c["architectures"] = json!(["DeepseekV3ForCausalLM"]);
        assert!(read(c).unwrap_err().contains("DeepseekV3ForCausalLM"));
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
