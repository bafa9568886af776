//! Hugging Face model directories: `config.json`, safetensors weights (one
//! file or shards with an index), `tokenizer.json` with its config and chat
//! template, `generation_config.json`; for Mixtral-, Qwen2-MoE- and
//! Qwen3-MoE-style models ([`config::Architecture`]).
//!
//! The weights are mapped onto the serving engine's [`ServeModel`], whose
//! options (RoPE halves, biases, q/k norms, the gated shared expert, …)
//! reproduce `transformers`' forward; `tests/serve_hf.rs` checks it against
//! `transformers`' logits for tiny random models.

pub mod config;
pub mod tokenizer;
pub mod weights;

use std::collections::HashSet;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::moe::{MoeConfig, MoeLayer, MoeParams, ScoreFunction};
use crate::serve::model::{
    AttentionBias, GatedShared, Mlp, RopeLayout, ServeBlock, ServeConfig, ServeFfn, ServeModel,
};

pub use config::{Architecture, HfConfig};
pub use tokenizer::HfTokenizer;
use weights::TensorStore;

/// Why a Hugging Face model cannot be served; each names the file or tensor.
#[derive(Debug)]
pub enum HfError {
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A file is not what it should be, or asks for what is not implemented.
    Invalid { path: PathBuf, problem: String },
    /// Tensors the config implies are in no weight file.
    MissingTensors { dir: PathBuf, names: String },
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
}

impl HfError {
    fn io(path: &Path, error: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            error,
        }
    }
}

impl fmt::Display for HfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io { path, error } => write!(f, "cannot read {}: {error}", path.display()),
            Self::Invalid { path, problem } => write!(f, "{}: {problem}", path.display()),
            Self::MissingTensors { dir, names } => write!(
                f,
                "{}: the weights lack tensors the config implies: {names}",
                dir.display()
            ),
            Self::Shape {
                name,
                expected,
                found,
            } => write!(
                f,
                "tensor {name} has shape {found:?}, but the config implies {expected:?}"
            ),
        }
    }
}

impl std::error::Error for HfError {}

/// A Hugging Face model, ready for the engine.
#[derive(Debug)]
pub struct HfModel {
    pub config: HfConfig,
    pub model: ServeModel,
    pub tokenizer: HfTokenizer,
}

/// Loads the model in `dir`.
pub fn load(dir: &Path) -> Result<HfModel, HfError> {
    load_experts(dir, None)
}

/// Loads the model in `dir` holding only routed experts `experts` of each
/// MoE layer (an expert-parallel rank's; `None`: all). The other experts'
/// tensors are never read.
pub fn load_experts(dir: &Path, experts: Option<Range<usize>>) -> Result<HfModel, HfError> {
    let config = HfConfig::read(dir)?;
    let held = experts.unwrap_or(0..config.experts);
    if held.start > held.end || held.end > config.experts {
        return Err(HfError::Invalid {
            path: dir.join("config.json"),
            problem: format!(
                "experts {held:?} asked for, but the model has {}",
                config.experts
            ),
        });
    }
    let tokenizer = HfTokenizer::read(dir, &config.eos)?;
    let skip = other_experts(&config, &held);
    let mut store = TensorStore::read_except(dir, &skip)?;
    let model = build(&config, &mut store, dir, &held)?;
    let left = store.left();
    if !left.is_empty() {
        tracing::warn!(tensors = ?left, "tensors in the weight files that the model does not use");
    }
    Ok(HfModel {
        config,
        model,
        tokenizer,
    })
}

/// The tensor names of one layer, by architecture.
struct Names {
    prefix: String,
    architecture: Architecture,
}

impl Names {
    fn attn(&self, part: &str) -> String {
        format!("{}.self_attn.{part}", self.prefix)
    }

    fn norm(&self, which: &str) -> String {
        format!("{}.{which}.weight", self.prefix)
    }

    fn router(&self) -> String {
        match self.architecture {
            Architecture::Mixtral => format!("{}.block_sparse_moe.gate.weight", self.prefix),
            _ => format!("{}.mlp.gate.weight", self.prefix),
        }
    }

    /// Expert `e`'s gate (w1), up (w3) and down (w2) projections.
    fn expert(&self, e: usize) -> [String; 3] {
        match self.architecture {
            Architecture::Mixtral => {
                let p = format!("{}.block_sparse_moe.experts.{e}", self.prefix);
                [
                    format!("{p}.w1.weight"),
                    format!("{p}.w3.weight"),
                    format!("{p}.w2.weight"),
                ]
            }
            _ => self.mlp(&format!("mlp.experts.{e}")),
        }
    }

    /// A Qwen-style MLP's gate, up and down projections under `path`.
    fn mlp(&self, path: &str) -> [String; 3] {
        let p = format!("{}.{path}", self.prefix);
        [
            format!("{p}.gate_proj.weight"),
            format!("{p}.up_proj.weight"),
            format!("{p}.down_proj.weight"),
        ]
    }
}

/// The tensors of the routed experts outside `held`, in every MoE layer.
fn other_experts(config: &HfConfig, held: &Range<usize>) -> HashSet<String> {
    (0..config.layers)
        .filter(|&layer| config.moe_layers[layer])
        .flat_map(|layer| {
            let n = layer_names(config, layer);
            (0..config.experts)
                .filter(|e| !held.contains(e))
                .flat_map(move |e| n.expert(e))
        })
        .collect()
}

/// Every tensor name `config` implies with routed experts `held`, for one
/// error naming all the missing ones.
fn expected_names(config: &HfConfig, held: &Range<usize>) -> Vec<String> {
    let mut names = vec![
        "model.embed_tokens.weight".to_owned(),
        "model.norm.weight".into(),
    ];
    if !config.tie_embeddings {
        names.push("lm_head.weight".into());
    }
    for layer in 0..config.layers {
        let n = layer_names(config, layer);
        names.push(n.norm("input_layernorm"));
        names.push(n.norm("post_attention_layernorm"));
        for p in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            names.push(n.attn(&format!("{p}.weight")));
        }
        if config.qkv_bias {
            names.extend(["q_proj", "k_proj", "v_proj"].map(|p| n.attn(&format!("{p}.bias"))));
        }
        if config.o_bias {
            names.push(n.attn("o_proj.bias"));
        }
        if config.qk_norm {
            names.extend([n.attn("q_norm.weight"), n.attn("k_norm.weight")]);
        }
        if config.moe_layers[layer] {
            names.push(n.router());
            for e in held.clone() {
                names.extend(n.expert(e));
            }
            if config.shared_hidden > 0 {
                names.extend(n.mlp("mlp.shared_expert"));
                names.push(format!("{}.mlp.shared_expert_gate.weight", n.prefix));
            }
        } else {
            names.extend(n.mlp("mlp"));
        }
    }
    names
}

fn layer_names(config: &HfConfig, layer: usize) -> Names {
    Names {
        prefix: format!("model.layers.{layer}"),
        architecture: config.architecture,
    }
}

fn build(
    config: &HfConfig,
    store: &mut TensorStore,
    dir: &Path,
    held: &Range<usize>,
) -> Result<ServeModel, HfError> {
    store.require(dir, &expected_names(config, held))?;
    let (h, v) = (config.hidden, config.vocab);
    let (qw, kv) = (
        config.heads * config.head_dim,
        config.kv_heads * config.head_dim,
    );
    let embedding = store.take("model.embed_tokens.weight", &[v, h])?;
    let lm_head = if config.tie_embeddings {
        None
    } else {
        Some(store.take("lm_head.weight", &[v, h])?)
    };
    let final_norm = store.take("model.norm.weight", &[h])?;
    let mut blocks = Vec::with_capacity(config.layers);
    for layer in 0..config.layers {
        let n = layer_names(config, layer);
        let mut take = |name: String, shape: &[usize]| store.take(&name, shape);
        let attention_norm = take(n.norm("input_layernorm"), &[h])?;
        let ffn_norm = take(n.norm("post_attention_layernorm"), &[h])?;
        let wq = take(n.attn("q_proj.weight"), &[qw, h])?;
        let wk = take(n.attn("k_proj.weight"), &[kv, h])?;
        let wv = take(n.attn("v_proj.weight"), &[kv, h])?;
        let wo = take(n.attn("o_proj.weight"), &[h, qw])?;
        let bias = if config.qkv_bias {
            Some(AttentionBias {
                q: take(n.attn("q_proj.bias"), &[qw])?,
                k: take(n.attn("k_proj.bias"), &[kv])?,
                v: take(n.attn("v_proj.bias"), &[kv])?,
                o: if config.o_bias {
                    Some(take(n.attn("o_proj.bias"), &[h])?)
                } else {
                    None
                },
            })
        } else {
            None
        };
        let d = config.head_dim;
        let qk_norm = if config.qk_norm {
            Some((
                take(n.attn("q_norm.weight"), &[d])?,
                take(n.attn("k_norm.weight"), &[d])?,
            ))
        } else {
            None
        };
        let mut mlp = |names: [String; 3], width: usize| -> Result<Mlp, HfError> {
            let [w1, w3, w2] = names;
            Ok(Mlp {
                w1: store.take(&w1, &[width, h])?,
                w3: store.take(&w3, &[width, h])?,
                w2: store.take(&w2, &[h, width])?,
                width,
            })
        };
        let ffn = if config.moe_layers[layer] {
            let experts = held
                .clone()
                .map(|e| mlp(n.expert(e), config.expert_hidden))
                .collect::<Result<Vec<_>, _>>()?;
            let gated_shared = if config.shared_hidden > 0 {
                let shared = mlp(n.mlp("mlp.shared_expert"), config.shared_hidden)?;
                let gate_name = format!("{}.mlp.shared_expert_gate.weight", n.prefix);
                Some(GatedShared {
                    mlp: shared,
                    gate: store.take(&gate_name, &[1, h])?,
                })
            } else {
                None
            };
            let router = store.take(&n.router(), &[config.experts, h])?;
            ServeFfn::Moe {
                layer: Box::new(moe_layer(config, router, held.clone(), experts)?),
                gated_shared,
            }
        } else {
            ServeFfn::Dense(mlp(n.mlp("mlp"), config.dense_hidden)?)
        };
        blocks.push(ServeBlock {
            attention_norm,
            wq,
            wk,
            wv,
            wo,
            bias,
            qk_norm,
            ffn_norm,
            ffn,
        });
    }
    Ok(ServeModel {
        config: ServeConfig {
            vocab: v,
            hidden: h,
            layers: config.layers,
            heads: config.heads,
            kv_heads: config.kv_heads,
            head_dim: config.head_dim,
            context: config.context,
            rope_theta: config.rope_theta,
            rope_layout: RopeLayout::Halves,
            norm_eps: config.norm_eps as f32,
        },
        embedding,
        blocks,
        final_norm,
        lm_head,
    })
}

/// The routed experts as the worker's MoE layer: softmax scores, top-k,
/// renormalised when `norm_topk_prob` (Mixtral always), no scaling, no
/// group limit, a zero selection bias. (`torch.topk` breaks exact ties
/// differently from the worker; random weights make them improbable.)
/// `experts` are those of `held`, in order.
fn moe_layer(
    config: &HfConfig,
    router: Vec<f32>,
    held: Range<usize>,
    experts: Vec<Mlp>,
) -> Result<MoeLayer<f32>, HfError> {
    let moe = MoeConfig {
        hidden: config.hidden,
        n_routed_experts: config.experts,
        expert_hidden: config.expert_hidden,
        n_shared_experts: 0,
        shared_expert_hidden: 0,
        top_k: config.top_k,
        score_function: ScoreFunction::Softmax,
        group_limit: None,
        normalize_gates: config.norm_topk,
        routed_scaling_factor: 1.0,
        aux_loss_alpha: 0.0,
    };
    let size = held.len() * config.expert_hidden * config.hidden;
    let mut params = MoeParams {
        experts: held,
        router,
        experts_w1: Vec::with_capacity(size),
        experts_w3: Vec::with_capacity(size),
        experts_w2: Vec::with_capacity(size),
        shared_w1: Vec::new(),
        shared_w3: Vec::new(),
        shared_w2: Vec::new(),
    };
    for expert in experts {
        params.experts_w1.extend(expert.w1);
        params.experts_w3.extend(expert.w3);
        params.experts_w2.extend(expert.w2);
    }
    MoeLayer::new(moe, params).map_err(|e| HfError::Invalid {
        path: PathBuf::from("config.json"),
        problem: format!("the MoE layer is invalid: {e}"),
    })
}
