//! The model as the serving engine runs it: the worker's own architecture
//! plus the options Hugging Face MoE models need, each off for the worker's
//! checkpoints (so their arithmetic is the training forward's, unchanged).
//!
//! | Option | Own checkpoints | Mixtral | Qwen2-MoE | Qwen3-MoE |
//! | --- | --- | --- | --- | --- |
//! | RoPE layout | [`RopeLayout::Interleaved`] | [`RopeLayout::Halves`] | halves | halves |
//! | RMSNorm epsilon | 1e-5 | `rms_norm_eps` | `rms_norm_eps` | `rms_norm_eps` |
//! | head dimension | hidden / heads | `head_dim` or hidden / heads | hidden / heads | `head_dim` |
//! | q/k/v (o) biases | none | none | q, k, v | `attention_bias` |
//! | q/k RMSNorm per head | no | no | no | yes |
//! | routing | spec | softmax, top-k, renormalised | softmax, top-k, `norm_topk_prob` | same |
//! | shared expert | ungated (DeepSeek) | none | sigmoid-gated | none |
//! | LM head | own | `lm_head` | `lm_head` | or tied to the embedding |

use crate::linear::Linears;
use crate::model::config::NORM_EPS;
use crate::model::{FeedForward, Model};
use crate::moe::MoeLayer;
use crate::moe::expert::SwiGluMlp;

/// How a head's dimensions are paired for the rotary embedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeLayout {
    /// Pairs `(2i, 2i + 1)`: RoFormer and the worker's own model.
    Interleaved,
    /// Pairs `(i, i + head_dim / 2)`: `rotate_half` in Hugging Face's Llama,
    /// Mixtral and Qwen.
    Halves,
}

/// The shape and the options of a served model.
#[derive(Clone, Debug, PartialEq)]
pub struct ServeConfig {
    /// Rows of the embedding and the LM head.
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Longest sequence served (the RoPE table's length).
    pub context: usize,
    pub rope_theta: f64,
    pub rope_layout: RopeLayout,
    pub norm_eps: f32,
}

impl ServeConfig {
    /// Width of the query projection (`heads * head_dim`, not always `hidden`).
    pub fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Width of the key and value projections.
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// A served model's weights, flat and row-major (`[out, in]` for linears).
#[derive(Clone, Debug)]
pub struct ServeModel {
    pub config: ServeConfig,
    /// `[vocab, hidden]`.
    pub embedding: Vec<f32>,
    pub blocks: Vec<ServeBlock>,
    /// `[hidden]`.
    pub final_norm: Vec<f32>,
    /// `[vocab, hidden]`; `None`: tied to the embedding.
    pub lm_head: Option<Vec<f32>>,
}

/// One transformer block.
#[derive(Clone, Debug)]
pub struct ServeBlock {
    /// `[hidden]`.
    pub attention_norm: Vec<f32>,
    /// `[q_width, hidden]`.
    pub wq: Vec<f32>,
    /// `[kv_width, hidden]`.
    pub wk: Vec<f32>,
    /// `[kv_width, hidden]`.
    pub wv: Vec<f32>,
    /// `[hidden, q_width]`.
    pub wo: Vec<f32>,
    pub bias: Option<AttentionBias>,
    /// RMSNorm gains `[head_dim]` applied to each query and key head before
    /// RoPE (Qwen3).
    pub qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    /// `[hidden]`.
    pub ffn_norm: Vec<f32>,
    pub ffn: ServeFfn,
}

/// Biases of the attention projections (`[q_width]`, `[kv_width]` twice, `[hidden]`).
#[derive(Clone, Debug)]
pub struct AttentionBias {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    /// Only Qwen3's `attention_bias` has one.
    pub o: Option<Vec<f32>>,
}

/// A block's feed-forward layer.
#[derive(Clone, Debug)]
pub enum ServeFfn {
    Dense(Mlp),
    Moe {
        /// The routed experts (and the worker's own ungated shared experts).
        layer: Box<MoeLayer<f32>>,
        /// Qwen2-MoE's shared expert, added as `sigmoid(gate · x) * mlp(x)`.
        gated_shared: Option<GatedShared>,
    },
}

/// A SwiGLU MLP: `w1, w3: [width, hidden]`, `w2: [hidden, width]`.
#[derive(Clone, Debug)]
pub struct Mlp {
    pub w1: Vec<f32>,
    pub w3: Vec<f32>,
    pub w2: Vec<f32>,
    pub width: usize,
}

impl Mlp {
    pub fn swiglu(&self, hidden: usize) -> SwiGluMlp<'_, f32> {
        SwiGluMlp {
            w1: &self.w1,
            w3: &self.w3,
            w2: &self.w2,
            model: hidden,
            hidden: self.width,
            linears: Linears::FP32,
        }
    }
}

/// A shared expert scaled by a sigmoid gate of its input.
#[derive(Clone, Debug)]
pub struct GatedShared {
    pub mlp: Mlp,
    /// `[hidden]` (a linear layer to one output).
    pub gate: Vec<f32>,
}

impl ServeModel {
    /// The LM head's weights, `[vocab, hidden]`.
    pub fn lm_head(&self) -> &[f32] {
        self.lm_head.as_deref().unwrap_or(&self.embedding)
    }

    /// Serves the worker's own model: its weights moved over, every option
    /// off, the context its training sequence length.
    pub fn from_native(model: Model<f32>) -> Self {
        let source = model.config().clone();
        let config = ServeConfig {
            vocab: source.vocab,
            hidden: source.hidden,
            layers: source.layers,
            heads: source.heads,
            kv_heads: source.kv_heads,
            head_dim: source.head_dim(),
            context: source.seq_len,
            rope_theta: source.rope_theta,
            rope_layout: RopeLayout::Interleaved,
            norm_eps: NORM_EPS as f32,
        };
        let weights = model.weights;
        let blocks = weights
            .blocks
            .into_iter()
            .map(|block| ServeBlock {
                attention_norm: block.attention_norm,
                wq: block.wq,
                wk: block.wk,
                wv: block.wv,
                wo: block.wo,
                bias: None,
                qk_norm: None,
                ffn_norm: block.ffn_norm,
                ffn: match block.ffn {
                    FeedForward::Dense(dense) => ServeFfn::Dense(Mlp {
                        w1: dense.w1,
                        w3: dense.w3,
                        w2: dense.w2,
                        width: source.dense_hidden,
                    }),
                    FeedForward::Moe(layer) => ServeFfn::Moe {
                        layer: Box::new(layer),
                        gated_shared: None,
                    },
                },
            })
            .collect();
        Self {
            config,
            embedding: weights.embedding,
            blocks,
            final_norm: weights.final_norm,
            lm_head: Some(weights.lm_head),
        }
    }
}
