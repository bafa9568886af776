//! The transformer's shape, mapped from the API's `ModelSpec` and checked once
//! so the forward and backward passes can rely on it.

use moe_crds::{ModelSpec, QkNormSpec, RouterScore};

use crate::linear::GemmPrecision;
use crate::moe::{GroupLimit, MoeConfig, ScoreFunction};
use crate::settings::{SettingsError, positive, require};

/// RMSNorm's default epsilon (Llama's value); small enough not to matter for
/// rows of unit scale, large enough to keep an all-zero row finite.
pub const NORM_EPS: f64 = 1e-5;

/// How queries and keys are RMS-normed after their projections, before
/// RoPE (`model.qkNorm`): it bounds the attention logits, which keeps
/// training stable at large learning rates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkNorm {
    /// Each head on its own, gains `[head_dim]` shared by the heads (Qwen3).
    PerHead,
    /// A token's whole projection at once, gains `[heads * head_dim]` and
    /// `[kv_heads * head_dim]` (OLMoE).
    Whole,
}

/// Shape and hyperparameters of the whole model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    /// The first `dense_layers` blocks use a dense SwiGLU feed-forward layer.
    pub dense_layers: usize,
    pub dense_hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// Width of each attention head: `hidden / heads` unless the spec says
    /// otherwise (Qwen3 widens it), so q is `heads * head_dim` wide.
    pub head_dim: usize,
    /// RMSNorm's epsilon, in every norm of the model.
    pub norm_eps: f64,
    pub qk_norm: Option<QkNorm>,
    pub seq_len: usize,
    pub rope_theta: f64,
    /// The feed-forward layer of every block from `dense_layers` on.
    pub moe: MoeConfig,
    /// Step of the aux-loss-free selection-bias update; `None` when disabled.
    pub bias_update_rate: Option<f64>,
    /// The arithmetic of the attention projections' and the MLPs' GEMMs
    /// (`training.precision.fp8`; see [`crate::linear`]). Not part of the
    /// `ModelSpec`: [`Self::from_spec`] leaves it f32.
    pub gemm_precision: GemmPrecision,
    /// The arithmetic of the LM head's GEMMs: `training.precision.compute`
    /// (f32 or bf16; FP8 never applies to it, as in DeepSeek-V3). The
    /// router's GEMM is always f32: top-k must see exact scores.
    pub head_precision: GemmPrecision,
}

impl ModelConfig {
    /// Maps and checks `spec`; the error names the offending field.
    pub fn from_spec(spec: &ModelSpec) -> Result<Self, SettingsError> {
        let hidden = positive("model.hiddenSize", spec.hidden_size)?;
        let heads = positive("model.attentionHeads", spec.attention_heads)?;
        let kv_heads = positive("model.kvHeads", spec.kv_heads)?;
        let layers = positive("model.layers", spec.layers)?;
        let dense_layers = usize::try_from(spec.dense_layers).unwrap_or(usize::MAX);
        let dense_hidden = match spec.dense_hidden_size {
            Some(size) => positive("model.denseHiddenSize", size)?,
            None => 4 * hidden,
        };
        let seq_len = positive("model.seqLen", spec.seq_len)?;
        require(
            spec.vocab_size >= 256,
            "model.vocabSize",
            format!(
                "is {}, but the byte-level tokenizer needs at least 256",
                spec.vocab_size
            ),
        )?;
        let head_dim = match spec.head_dim {
            Some(dim) => positive("model.headDim", dim)?,
            None => {
                require(
                    hidden.is_multiple_of(heads),
                    "model.hiddenSize",
                    format!(
                        "{hidden} is not divisible by model.attentionHeads {heads} (or set model.headDim)"
                    ),
                )?;
                hidden / heads
            }
        };
        require(
            head_dim.is_multiple_of(2),
            if spec.head_dim.is_some() {
                "model.headDim"
            } else {
                "model.hiddenSize"
            },
            format!("the head dimension {head_dim} must be even for rotary embeddings"),
        )?;
        let norm_eps = spec.norm_epsilon.unwrap_or(NORM_EPS);
        require(
            norm_eps.is_finite() && norm_eps > 0.0 && norm_eps < 1.0,
            "model.normEpsilon",
            format!("is {norm_eps}, but must be in (0, 1)"),
        )?;
        require(
            heads.is_multiple_of(kv_heads),
            "model.kvHeads",
            format!("model.attentionHeads {heads} is not a multiple of kvHeads {kv_heads}"),
        )?;
        require(
            dense_layers < layers,
            "model.denseLayers",
            format!(
                "is {}, but must be in 0..{layers} (at least one MoE layer)",
                spec.dense_layers
            ),
        )?;
        require(
            seq_len >= 2,
            "model.seqLen",
            format!("is {seq_len}, but must be at least 2"),
        )?;
        require(
            spec.rope_theta.is_finite() && spec.rope_theta >= 1.0,
            "model.ropeTheta",
            format!("is {}, but must be finite and at least 1", spec.rope_theta),
        )?;
        let (moe, bias_update_rate) = moe_config(spec, hidden)?;
        Ok(Self {
            vocab: spec.vocab_size as usize,
            hidden,
            layers,
            dense_layers,
            dense_hidden,
            heads,
            kv_heads,
            head_dim,
            norm_eps,
            qk_norm: spec.qk_norm.map(|norm| match norm {
                QkNormSpec::PerHead => QkNorm::PerHead,
                QkNormSpec::Whole => QkNorm::Whole,
            }),
            seq_len,
            rope_theta: spec.rope_theta,
            moe,
            bias_update_rate,
            gemm_precision: GemmPrecision::Fp32,
            head_precision: GemmPrecision::Fp32,
        })
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Width of the query projection (and of attention's output).
    pub fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Width of the key and value projections.
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// The widths of the q and k norms' gains, when the model has them.
    pub fn qk_norm_widths(&self) -> Option<(usize, usize)> {
        self.qk_norm.map(|norm| match norm {
            QkNorm::PerHead => (self.head_dim, self.head_dim),
            QkNorm::Whole => (self.q_width(), self.kv_width()),
        })
    }

    pub fn is_moe_block(&self, block: usize) -> bool {
        block >= self.dense_layers
    }
}

/// The MoE layer's config and the selection-bias rate from `spec.moe`.
///
/// Shared experts have the routed experts' width (the API has one
/// `expertHiddenSize`). Softmax gates are not renormalised over the chosen
/// experts (DeepSeek-V2); sigmoid gates always are (DeepSeek-V3).
fn moe_config(spec: &ModelSpec, hidden: usize) -> Result<(MoeConfig, Option<f64>), SettingsError> {
    let moe = &spec.moe;
    let experts = positive("model.moe.experts", moe.experts)?;
    let top_k = positive("model.moe.topK", moe.top_k)?;
    let expert_hidden = positive("model.moe.expertHiddenSize", moe.expert_hidden_size)?;
    let groups = positive("model.moe.groups", moe.groups)?;
    let top_groups = positive("model.moe.topGroups", moe.top_groups)?;
    let shared = usize::try_from(moe.shared_experts).map_err(|_| {
        SettingsError::new(
            "model.moe.sharedExperts",
            format!("is {}, but must not be negative", moe.shared_experts),
        )
    })?;
    require(
        top_k <= experts,
        "model.moe.topK",
        format!("{top_k} is more than model.moe.experts {experts}"),
    )?;
    require(
        experts.is_multiple_of(groups),
        "model.moe.groups",
        format!("{groups} does not divide model.moe.experts {experts}"),
    )?;
    require(
        top_groups <= groups,
        "model.moe.topGroups",
        format!("{top_groups} is more than model.moe.groups {groups}"),
    )?;
    require(
        top_k <= top_groups * (experts / groups),
        "model.moe.topK",
        format!(
            "{top_k} is more than the {} experts left after group-limited routing (topGroups × experts / groups)",
            top_groups * (experts / groups)
        ),
    )?;
    let finite_non_negative = |field: &str, value: f64| {
        require(
            value.is_finite() && value >= 0.0,
            field,
            format!("is {value}, but must be finite and non-negative"),
        )
    };
    finite_non_negative("model.moe.routedScalingFactor", moe.routed_scaling_factor)?;
    let balancing = &moe.balancing;
    finite_non_negative(
        "model.moe.balancing.sequenceAuxLossCoef",
        balancing.sequence_aux_loss_coef,
    )?;
    finite_non_negative(
        "model.moe.balancing.auxLossFree.biasUpdateRate",
        balancing.aux_loss_free.bias_update_rate,
    )?;
    let score_function = match moe.router {
        RouterScore::Softmax => ScoreFunction::Softmax,
        RouterScore::Sigmoid => ScoreFunction::Sigmoid,
    };
    let config = MoeConfig {
        hidden,
        n_routed_experts: experts,
        expert_hidden,
        n_shared_experts: shared,
        shared_expert_hidden: expert_hidden,
        top_k,
        score_function,
        group_limit: (groups > 1).then_some(GroupLimit {
            n_groups: groups,
            top_groups,
        }),
        normalize_gates: moe.normalize_top_k,
        routed_scaling_factor: moe.routed_scaling_factor,
        aux_loss_alpha: balancing.sequence_aux_loss_coef,
    };
    config
        .validate()
        .map_err(|e| SettingsError::new("model.moe", e.to_string()))?;
    let rate = balancing
        .aux_loss_free
        .enabled
        .then_some(balancing.aux_loss_free.bias_update_rate);
    Ok((config, rate))
}
