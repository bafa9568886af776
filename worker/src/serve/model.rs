//! The model as the serving engine runs it: the worker's own architecture
//! plus the options Hugging Face MoE models need, each off for the worker's
//! checkpoints (so their arithmetic is the training forward's, unchanged).
//!
//! | Option | Own checkpoints | Mixtral | Qwen2-MoE | Qwen3-MoE | DeepSeek-V3 | OLMoE |
//! | --- | --- | --- | --- | --- | --- | --- |
//! | attention | grouped-query | grouped-query | grouped-query | grouped-query | latent ([`LatentShape`]) | grouped-query |
//! | RoPE layout | [`RopeLayout::Interleaved`] | [`RopeLayout::Halves`] | halves | halves | `rope_interleave` | halves |
//! | RoPE scaling | none | none | none | none | YaRN or none | none |
//! | RMSNorm epsilon | 1e-5 | `rms_norm_eps` | `rms_norm_eps` | `rms_norm_eps` | `rms_norm_eps` | `rms_norm_eps` |
//! | head dimension | hidden / heads | `head_dim` or hidden / heads | hidden / heads | `head_dim` | `qk_rope_head_dim` (the rotated part) | hidden / heads |
//! | q/k/v (o) biases | none | none | q, k, v | `attention_bias` | none | `attention_bias` |
//! | q/k RMSNorm | no | no | no | per head | no | whole projection |
//! | q/k/v clipping | no | no | no | no | no | `clip_qkv` |
//! | routing | spec | softmax, top-k, renormalised | softmax, top-k, `norm_topk_prob` | same | sigmoid, bias, groups, scaled | softmax, top-k, `norm_topk_prob` |
//! | shared expert | ungated (DeepSeek) | none | sigmoid-gated | none | ungated | none |
//! | LM head | own | `lm_head` | `lm_head` | or tied to the embedding | `lm_head` | or tied |

use crate::linear::Linears;
use crate::model::{FeedForward, Model};
use crate::moe::MoeLayer;
use crate::moe::expert::SwiGluMlp;
use crate::serve::yarn::Yarn;

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
    /// YaRN's frequencies and attention factor instead of plain RoPE's.
    pub rope_scaling: Option<Yarn>,
    pub norm_eps: f32,
    /// q, k and v clamped to `±clip` after projection, bias and q/k norm,
    /// before RoPE (OLMoE's `clip_qkv`); `None`: unclamped.
    pub clip_qkv: Option<f32>,
    /// Multi-head latent attention (every block's); `None`: grouped-query.
    pub latent: Option<LatentShape>,
}

/// The shape of DeepSeek's multi-head latent attention (MLA).
///
/// Keys and values are expanded per head from one compressed latent per
/// token, `c_kv` (`kv_lora_rank` wide, RMS-normed), plus one rotated key
/// part `k_pe` (`qk_rope_head_dim`) shared by every head; only those two are
/// cached. A head's query is `[q_nope | q_pe]` (`qk_nope_head_dim +
/// qk_rope_head_dim`), its value `v_head_dim` wide.
#[derive(Clone, Debug, PartialEq)]
pub struct LatentShape {
    /// Rank of the query's low-rank factorisation (`q_a_proj`, `q_b_proj`);
    /// `None`: one full-rank `q_proj`.
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_dim: usize,
    pub qk_rope_dim: usize,
    pub v_head_dim: usize,
    /// The softmax scale: `1/sqrt(qk_nope + qk_rope)`, times YaRN's
    /// `mscale(factor, mscale_all_dim)²` in DeepSeek-V3.
    pub softmax_scale: f64,
}

impl LatentShape {
    /// One head's query (and expanded key) width.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_dim + self.qk_rope_dim
    }

    /// One token's cached latent, `[c_kv | k_pe]`.
    pub fn latent_width(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_dim
    }
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

    /// The widths of one position's cached key and value rows in one layer.
    pub fn kv_row_widths(&self) -> (usize, usize) {
        match &self.latent {
            None => (self.kv_width(), self.kv_width()),
            Some(latent) => (latent.latent_width(), 0),
        }
    }

    /// Width of the attention output `o_proj` reads.
    pub fn attention_width(&self) -> usize {
        match &self.latent {
            None => self.q_width(),
            Some(latent) => self.heads * latent.v_head_dim,
        }
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
///
/// With latent attention ([`Self::latent`]) `wq` is `q_a_proj`
/// (`[q_lora_rank, hidden]`) or the full `q_proj` (`[heads * qk_head_dim,
/// hidden]`), `wk` is `kv_a_proj_with_mqa` (`[kv_lora_rank + qk_rope,
/// hidden]`), `wv` is empty and `wo` is `[hidden, heads * v_head_dim]`.
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
    /// Multi-head latent attention's other weights.
    pub latent: Option<LatentWeights>,
    pub bias: Option<AttentionBias>,
    /// RMSNorm gains applied to the queries and keys before RoPE: `[head_dim]`
    /// each, per head (Qwen3), or `[q_width]` and `[kv_width]`, over a
    /// token's whole projection (OLMoE). The engine normalises in chunks of
    /// the gain's width, so the widths alone select the two.
    pub qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    /// `[hidden]`.
    pub ffn_norm: Vec<f32>,
    pub ffn: ServeFfn,
}

/// The weights of multi-head latent attention besides `wq`, `wk`, `wo`
/// (see [`ServeBlock`]), as `transformers` names them.
#[derive(Clone, Debug)]
pub struct LatentWeights {
    /// `q_a_layernorm`'s gain `[q_lora_rank]` and `q_b_proj`
    /// `[heads * qk_head_dim, q_lora_rank]`; `None`: `wq` is a full `q_proj`.
    pub q_b: Option<(Vec<f32>, Vec<f32>)>,
    /// `kv_a_layernorm`'s gain, `[kv_lora_rank]`.
    pub kv_a_norm: Vec<f32>,
    /// `kv_b_proj`, `[heads * (qk_nope + v_head_dim), kv_lora_rank]`: per
    /// head, the rows expanding `c_kv` to the key's unrotated part, then
    /// those expanding it to the value.
    pub kv_b: Vec<f32>,
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
            head_dim: source.head_dim,
            context: source.seq_len,
            rope_theta: source.rope_theta,
            rope_layout: RopeLayout::Interleaved,
            rope_scaling: None,
            norm_eps: source.norm_eps as f32,
            clip_qkv: None,
            latent: None,
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
                latent: None,
                bias: None,
                // The gains' widths say per head or whole, as in a
                // Hugging Face model.
                qk_norm: source
                    .qk_norm
                    .is_some()
                    .then_some((block.q_norm, block.k_norm)),
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
