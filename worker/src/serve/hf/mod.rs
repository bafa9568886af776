//! Hugging Face model directories: `config.json`, safetensors weights (one
//! file or shards with an index; F32, F16, BF16, or block-scaled FP8
//! dequantized at load), `tokenizer.json` with its config and chat
//! template, `generation_config.json`; for Mixtral-, Qwen2-MoE-,
//! Qwen3-MoE-, DeepSeek-V3- and OLMoE-style models ([`config::Architecture`]).
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

use crate::moe::{MoeConfig, MoeLayer, MoeParams};
use crate::serve::model::{
    AttentionBias, GatedShared, LatentWeights, Mlp, RopeLayout, ServeBlock, ServeConfig, ServeFfn,
    ServeModel,
};

pub use config::{Architecture, Fp8Blocks, HfConfig, QkNorm};
pub use tokenizer::HfTokenizer;
pub(crate) use tokenizer::byte_level_chars;
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
    let mut store = TensorStore::read_except(dir, &skip, config.fp8)?;
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

    /// DeepSeek-V3's router selection bias.
    fn selection_bias(&self) -> String {
        format!("{}.mlp.gate.e_score_correction_bias", self.prefix)
    }

    /// The shared expert's MLP path (Qwen2-MoE: one gated; DeepSeek: ungated).
    fn shared(&self) -> &'static str {
        match self.architecture {
            Architecture::DeepseekV3 => "mlp.shared_experts",
            _ => "mlp.shared_expert",
        }
    }

    fn shared_gate(&self) -> String {
        format!("{}.mlp.shared_expert_gate.weight", self.prefix)
    }

    /// Multi-head latent attention's tensors: the query's (`q_a_proj`,
    /// `q_a_layernorm`, `q_b_proj`, or `q_proj` without `q_lora_rank`),
    /// then the latent's and the output's.
    fn latent(&self, low_rank_q: bool) -> Vec<String> {
        let q: &[&str] = if low_rank_q {
            &["q_a_proj", "q_a_layernorm", "q_b_proj"]
        } else {
            &["q_proj"]
        };
        q.iter()
            .chain(&[
                "kv_a_proj_with_mqa",
                "kv_a_layernorm",
                "kv_b_proj",
                "o_proj",
            ])
            .map(|p| self.attn(&format!("{p}.weight")))
            .collect()
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
        match &config.latent {
            Some(latent) => names.extend(n.latent(latent.q_lora_rank.is_some())),
            None => {
                for p in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                    names.push(n.attn(&format!("{p}.weight")));
                }
            }
        }
        if config.qkv_bias {
            names.extend(["q_proj", "k_proj", "v_proj"].map(|p| n.attn(&format!("{p}.bias"))));
        }
        if config.o_bias {
            names.push(n.attn("o_proj.bias"));
        }
        if config.qk_norm.is_some() {
            names.extend([n.attn("q_norm.weight"), n.attn("k_norm.weight")]);
        }
        if config.moe_layers[layer] {
            names.push(n.router());
            if config.selection_bias {
                names.push(n.selection_bias());
            }
            for e in held.clone() {
                names.extend(n.expert(e));
            }
            if config.shared_hidden > 0 {
                names.extend(n.mlp(n.shared()));
                if config.shared_gated {
                    names.push(n.shared_gate());
                }
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
    let heads = config.heads;
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
        let (wq, wk, wv, wo, latent) = match &config.latent {
            None => (
                take(n.attn("q_proj.weight"), &[qw, h])?,
                take(n.attn("k_proj.weight"), &[kv, h])?,
                take(n.attn("v_proj.weight"), &[kv, h])?,
                take(n.attn("o_proj.weight"), &[h, qw])?,
                None,
            ),
            Some(shape) => {
                let qk = heads * shape.qk_head_dim();
                let (wq, q_b) = match shape.q_lora_rank {
                    Some(rank) => (
                        take(n.attn("q_a_proj.weight"), &[rank, h])?,
                        Some((
                            take(n.attn("q_a_layernorm.weight"), &[rank])?,
                            take(n.attn("q_b_proj.weight"), &[qk, rank])?,
                        )),
                    ),
                    None => (take(n.attn("q_proj.weight"), &[qk, h])?, None),
                };
                let rank = shape.kv_lora_rank;
                let wk = take(
                    n.attn("kv_a_proj_with_mqa.weight"),
                    &[shape.latent_width(), h],
                )?;
                let weights = LatentWeights {
                    q_b,
                    kv_a_norm: take(n.attn("kv_a_layernorm.weight"), &[rank])?,
                    kv_b: take(
                        n.attn("kv_b_proj.weight"),
                        &[heads * (shape.qk_nope_dim + shape.v_head_dim), rank],
                    )?,
                };
                let wo = take(n.attn("o_proj.weight"), &[h, heads * shape.v_head_dim])?;
                (wq, wk, Vec::new(), wo, Some(weights))
            }
        };
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
        let qk_norm = match config.qk_norm {
            None => None,
            Some(norm) => {
                // The gains' widths say how the engine normalises: per head
                // (Qwen3) or over the whole projection (OLMoE).
                let (q_gain, k_gain) = match norm {
                    QkNorm::PerHead => (config.head_dim, config.head_dim),
                    QkNorm::Whole => (qw, kv),
                };
                Some((
                    take(n.attn("q_norm.weight"), &[q_gain])?,
                    take(n.attn("k_norm.weight"), &[k_gain])?,
                ))
            }
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
            let shared = if config.shared_hidden > 0 {
                Some(mlp(n.mlp(n.shared()), config.shared_hidden)?)
            } else {
                None
            };
            let (gated_shared, ungated_shared) = match shared {
                Some(shared) if config.shared_gated => (
                    Some(GatedShared {
                        mlp: shared,
                        gate: store.take(&n.shared_gate(), &[1, h])?,
                    }),
                    None,
                ),
                shared => (None, shared),
            };
            let router = store.take(&n.router(), &[config.experts, h])?;
            let mut layer = moe_layer(config, router, held.clone(), experts, ungated_shared)?;
            if config.selection_bias {
                layer.selection_bias = store.take(&n.selection_bias(), &[config.experts])?;
            }
            ServeFfn::Moe {
                layer: Box::new(layer),
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
            latent,
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
            // DeepSeek's `rope_interleave`: transformers rotates pairs
            // (2i, 2i + 1) and writes them out in halves; q_pe and k_pe are
            // permuted alike and only meet in dot products, so rotating in
            // place is the same attention.
            rope_layout: if config.rope_interleave {
                RopeLayout::Interleaved
            } else {
                RopeLayout::Halves
            },
            rope_scaling: config.rope_scaling.clone(),
            norm_eps: config.norm_eps as f32,
            clip_qkv: config.clip_qkv.map(|c| c as f32),
            latent: config.latent.clone(),
        },
        embedding,
        blocks,
        final_norm,
        lm_head,
    })
}

/// The routed experts as the worker's MoE layer: Mixtral and Qwen softmax
/// scores, top-k, renormalised when `norm_topk_prob` (Mixtral always), no
/// scaling, no group limit; DeepSeek-V3 sigmoid scores, group-limited top-k
/// with the selection bias (set by the caller), renormalised, times
/// `routed_scaling_factor`, plus its ungated shared experts `shared` (one
/// MLP of their summed width). (`torch.topk` breaks exact ties differently
/// from the worker; random weights make them improbable.) `experts` are
/// those of `held`, in order.
fn moe_layer(
    config: &HfConfig,
    router: Vec<f32>,
    held: Range<usize>,
    experts: Vec<Mlp>,
    shared: Option<Mlp>,
) -> Result<MoeLayer<f32>, HfError> {
    let moe = MoeConfig {
        hidden: config.hidden,
        n_routed_experts: config.experts,
        expert_hidden: config.expert_hidden,
        n_shared_experts: usize::from(shared.is_some()),
        shared_expert_hidden: shared.as_ref().map_or(0, |s| s.width),
        top_k: config.top_k,
        score_function: config.score_function,
        group_limit: config.group_limit,
        normalize_gates: config.norm_topk,
        routed_scaling_factor: config.routed_scaling_factor,
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
    if let Some(shared) = shared {
        params.shared_w1 = shared.w1;
        params.shared_w3 = shared.w3;
        params.shared_w2 = shared.w2;
    }
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
