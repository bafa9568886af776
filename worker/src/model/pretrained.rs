//! Initial weights from a pretrained model (fine-tuning): a Hugging Face
//! model directory, as `save_pretrained` or the Hub leaves it, read by the
//! serving loader ([`crate::serve::hf`]) and mapped onto the training
//! model.
//!
//! The training model is the worker's own transformer: RMSNorm,
//! grouped-query attention without biases, optional q/k norms (per head
//! or whole), any head width, plain RoPE, SwiGLU experts routed by softmax
//! or sigmoid scores, ungated shared experts, dense leading layers. A model
//! it can hold starts from its weights (`MixtralForCausalLM`,
//! `Qwen3MoeForCausalLM`, `OlmoeForCausalLM` without clip_qkv); anything
//! else is refused, naming what the training model lacks. The job's
//! `model` must describe the same shape, field by field, or the refusal
//! names the field.
//!
//! One layout differs: Hugging Face's RoPE rotates pairs `(i, i + d/2)` of
//! each head (`rotate_half`), the worker's pairs `(2i, 2i + 1)`. Attention
//! only sees `q · k`, so permuting each head's query and key rows alike
//! (row `2i` ← `i`, row `2i + 1` ← `i + d/2`) makes the worker's rotation
//! the same as theirs, with the same frequency per pair. A q/k norm's gain
//! is permuted with its rows (RMS does not depend on the order).

use std::ops::Range;
use std::path::Path;

use moe_crds::{ModelSpec, QkNormSpec, RouterScore};

use crate::model::Model;
use crate::model::config::ModelConfig;
use crate::model::weights::{BlockWeights, DenseWeights, FeedForward, Weights};
use crate::moe::{MoeParams, ScoreFunction};
use crate::serve::hf::{self, HfConfig, QkNorm};
use crate::serve::model::{RopeLayout, ServeFfn};
use crate::settings::SettingsError;

/// The field errors of this module name.
const FIELD: &str = "model.initFrom";

/// The model in `dir`, holding routed experts `experts`, as the training
/// model `config` (made from `spec`) starts from it.
pub fn load(
    dir: &Path,
    spec: &ModelSpec,
    config: ModelConfig,
    experts: Range<usize>,
) -> Result<Model<f32>, SettingsError> {
    let invalid = |problem: String| SettingsError::new(FIELD, problem);
    // The config first: a model that does not fit is refused before any
    // weight is read.
    let hf_config = HfConfig::read(dir).map_err(|e| invalid(format!("{}: {e}", dir.display())))?;
    check_trainable(&hf_config).map_err(|what| {
        invalid(format!(
            "{}: the training model has no {what} ({:?})",
            dir.display(),
            hf_config.architecture
        ))
    })?;
    check_same_shape(spec, &config, &hf_config)?;
    let loaded = hf::load_experts(dir, Some(experts))
        .map_err(|e| invalid(format!("{}: {e}", dir.display())))?;
    let served = loaded.model;
    let head_dim = config.head_dim();
    let halves = served.config.rope_layout == RopeLayout::Halves;
    let rows = |w: Vec<f32>, heads: usize, width: usize| {
        if halves {
            interleave_rope_rows(&w, heads, head_dim, width)
        } else {
            w
        }
    };
    let mut biases = Vec::new();
    let blocks = served
        .blocks
        .into_iter()
        .map(|block| {
            let ffn = match block.ffn {
                ServeFfn::Dense(mlp) => FeedForward::Dense(DenseWeights {
                    w1: mlp.w1,
                    w3: mlp.w3,
                    w2: mlp.w2,
                }),
                ServeFfn::Moe { layer, .. } => {
                    biases.push(layer.selection_bias.clone());
                    FeedForward::Moe(layer.params)
                }
            };
            // A gain of a whole projection has a row per head's row; a
            // per-head gain is one head's.
            let (q_norm, k_norm) = match block.qk_norm {
                None => (Vec::new(), Vec::new()),
                Some((q, k)) => {
                    let heads = |gain: &[f32]| gain.len() / head_dim;
                    let (q_heads, k_heads) = (heads(&q), heads(&k));
                    (rows(q, q_heads, 1), rows(k, k_heads, 1))
                }
            };
            BlockWeights {
                attention_norm: block.attention_norm,
                wq: rows(block.wq, config.heads, config.hidden),
                wk: rows(block.wk, config.kv_heads, config.hidden),
                q_norm,
                k_norm,
                wv: block.wv,
                wo: block.wo,
                ffn_norm: block.ffn_norm,
                ffn,
            }
        })
        .collect();
    let weights: Weights<f32, MoeParams<f32>> = Weights {
        lm_head: served.lm_head.unwrap_or_else(|| served.embedding.clone()),
        embedding: served.embedding,
        blocks,
        final_norm: served.final_norm,
    };
    let mut model =
        Model::new(config, weights).map_err(|e| invalid(format!("{}: {e:?}", dir.display())))?;
    // DeepSeek-V3's `e_score_correction_bias` is an aux-loss-free
    // selection bias: it goes on being one.
    for (layer, bias) in model.moe_layers_mut().zip(biases) {
        layer.selection_bias = bias;
    }
    Ok(model)
}

/// What the training model lacks of `config`, if anything.
fn check_trainable(config: &HfConfig) -> Result<(), &'static str> {
    let lacks = [
        (config.latent.is_some(), "multi-head latent attention"),
        (config.qkv_bias || config.o_bias, "attention biases"),
        (config.clip_qkv.is_some(), "q/k/v clipping (clip_qkv)"),
        (config.shared_gated, "gated shared expert"),
        (config.rope_scaling.is_some(), "RoPE scaling"),
        (
            config.moe_layers.windows(2).any(|pair| pair[0] && !pair[1]),
            "dense layer after an MoE layer",
        ),
    ];
    match lacks.iter().find(|(lacking, _)| *lacking) {
        Some((_, what)) => Err(what),
        None => Ok(()),
    }
}

/// The job's `model` against the pretrained model's `config.json`, field
/// by field, each mismatch naming both.
fn check_same_shape(
    spec: &ModelSpec,
    config: &ModelConfig,
    hf: &HfConfig,
) -> Result<(), SettingsError> {
    let dense_layers = hf.moe_layers.iter().take_while(|moe| !**moe).count();
    let shared_experts = if hf.shared_hidden == 0 {
        0
    } else {
        hf.shared_hidden / hf.expert_hidden.max(1)
    };
    let router = match hf.score_function {
        ScoreFunction::Softmax => RouterScore::Softmax,
        ScoreFunction::Sigmoid => RouterScore::Sigmoid,
    };
    let (groups, top_groups) = hf
        .group_limit
        .map_or((1, 1), |g| (g.n_groups, g.top_groups));
    let qk_norm = |norm: Option<QkNormSpec>| match norm {
        None => "unset",
        Some(QkNormSpec::PerHead) => "perHead",
        Some(QkNormSpec::Whole) => "whole",
    };
    let hf_qk_norm = hf.qk_norm.map(|norm| match norm {
        QkNorm::PerHead => QkNormSpec::PerHead,
        QkNorm::Whole => QkNormSpec::Whole,
    });
    let pairs: [(&str, String, &str, String); 17] = [
        (
            "vocabSize",
            spec.vocab_size.to_string(),
            "vocab_size",
            hf.vocab.to_string(),
        ),
        (
            "hiddenSize",
            config.hidden.to_string(),
            "hidden_size",
            hf.hidden.to_string(),
        ),
        (
            "layers",
            config.layers.to_string(),
            "num_hidden_layers",
            hf.layers.to_string(),
        ),
        (
            "denseLayers",
            config.dense_layers.to_string(),
            "the layers before the first MoE layer",
            dense_layers.to_string(),
        ),
        (
            "attentionHeads",
            config.heads.to_string(),
            "num_attention_heads",
            hf.heads.to_string(),
        ),
        (
            "kvHeads",
            config.kv_heads.to_string(),
            "num_key_value_heads",
            hf.kv_heads.to_string(),
        ),
        (
            "headDim",
            config.head_dim.to_string(),
            "head_dim",
            hf.head_dim.to_string(),
        ),
        (
            "qkNorm",
            qk_norm(spec.qk_norm).to_string(),
            "q/k norm (q_norm, k_norm)",
            qk_norm(hf_qk_norm).to_string(),
        ),
        (
            "normEpsilon",
            config.norm_eps.to_string(),
            "rms_norm_eps",
            hf.norm_eps.to_string(),
        ),
        (
            "ropeTheta",
            config.rope_theta.to_string(),
            "rope_theta",
            hf.rope_theta.to_string(),
        ),
        (
            "moe.experts",
            config.moe.n_routed_experts.to_string(),
            "the number of routed experts",
            hf.experts.to_string(),
        ),
        (
            "moe.topK",
            config.moe.top_k.to_string(),
            "num_experts_per_tok",
            hf.top_k.to_string(),
        ),
        (
            "moe.expertHiddenSize",
            config.moe.expert_hidden.to_string(),
            "the routed experts' intermediate size",
            hf.expert_hidden.to_string(),
        ),
        (
            "moe.sharedExperts",
            config.moe.n_shared_experts.to_string(),
            "the shared experts",
            shared_experts.to_string(),
        ),
        (
            "moe.router",
            format!("{:?}", spec.moe.router).to_lowercase(),
            "the router's scores",
            format!("{router:?}").to_lowercase(),
        ),
        (
            "moe.groups",
            format!("{} (topGroups {})", spec.moe.groups, spec.moe.top_groups),
            "n_group (topk_group)",
            format!("{groups} (topGroups {top_groups})"),
        ),
        (
            "moe.routedScalingFactor",
            spec.moe.routed_scaling_factor.to_string(),
            "routed_scaling_factor",
            hf.routed_scaling_factor.to_string(),
        ),
    ];
    for (field, ours, theirs, value) in pairs {
        if ours != value {
            return Err(SettingsError::new(
                &format!("model.{field}"),
                format!("is {ours}, but the pretrained model's {theirs} is {value} ({FIELD})"),
            ));
        }
    }
    let normalizes = spec.moe.normalize_top_k || router == RouterScore::Sigmoid;
    if normalizes != (hf.norm_topk || router == RouterScore::Sigmoid) {
        return Err(SettingsError::new(
            "model.moe.normalizeTopK",
            format!(
                "is {}, but the pretrained model's norm_topk_prob is {} ({FIELD})",
                spec.moe.normalize_top_k, hf.norm_topk
            ),
        ));
    }
    // Within its context its sliding window (if any) is full attention, as
    // the training model's is; beyond it RoPE was never trained.
    if config.seq_len > hf.context {
        return Err(SettingsError::new(
            "model.seqLen",
            format!(
                "is {}, but the pretrained model attends over at most {} tokens \
                 (max_position_embeddings, or its sliding_window) ({FIELD})",
                config.seq_len, hf.context
            ),
        ));
    }
    if dense_layers > 0 && config.dense_hidden != hf.dense_hidden {
        return Err(SettingsError::new(
            "model.denseHiddenSize",
            format!(
                "is {}, but the pretrained model's intermediate_size is {} ({FIELD})",
                config.dense_hidden, hf.dense_hidden
            ),
        ));
    }
    Ok(())
}

/// `w` (`[heads × head_dim, width]`) with each head's rows reordered from
/// RoPE halves to RoPE pairs: row `2i` is row `i`, row `2i + 1` is row
/// `i + head_dim / 2`.
pub fn interleave_rope_rows(w: &[f32], heads: usize, head_dim: usize, width: usize) -> Vec<f32> {
    let half = head_dim / 2;
    reorder_head_rows(w, heads, head_dim, width, |row| {
        if row % 2 == 0 {
            row / 2
        } else {
            half + row / 2
        }
    })
}

/// `w` (`[heads × head_dim, width]`) with row `r` of each head taken from
/// that head's row `source(r)`.
pub(crate) fn reorder_head_rows(
    w: &[f32],
    heads: usize,
    head_dim: usize,
    width: usize,
    source: impl Fn(usize) -> usize,
) -> Vec<f32> {
    assert_eq!(
        w.len(),
        heads * head_dim * width,
        "a [heads × head_dim, width] matrix"
    );
    let mut out = Vec::with_capacity(w.len());
    for head in 0..heads {
        for row in 0..head_dim {
            let from = head * head_dim + source(row);
            out.extend_from_slice(&w[from * width..(from + 1) * width]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_rows_go_from_halves_to_pairs_head_by_head() {
        // 2 heads of 4 rows, 1 column: each row holds its index.
        let w: Vec<f32> = (0..8).map(|r| r as f32).collect();
        assert_eq!(
            interleave_rope_rows(&w, 2, 4, 1),
            vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
        );
    }
}
