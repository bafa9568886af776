//! Training FLOPs per token of a model, and model FLOPs utilisation (MFU).
//!
//! As PaLM (appendix B) and llm.c count them: 6 per active parameter
//! (forward 2, backward 4; the embedding lookup excluded, the LM head
//! included; routed experts counted `top_k / experts` of their size), plus
//! `12 · layers · heads · head_dim · seq_len` for attention's score and
//! value products. MFU divides the FLOPs a run does per second by what its GPUs
//! could do at their dense bf16 peak.

use super::config::ModelConfig;

/// Parameters of a config and the training FLOPs one token costs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelFlops {
    /// Every parameter, all routed experts included.
    pub parameters: usize,
    /// Parameters one token uses, the embedding excluded.
    pub active: f64,
    /// At the config's `seqLen`: [`Self::per_token_at`] of it.
    pub per_token: f64,
    /// Attention's score and value products per token and position
    /// attended over (`12 · layers · heads · head_dim`).
    pub attention_per_position: f64,
}

impl ModelFlops {
    /// Training FLOPs of a token in a sequence of `len` positions (a
    /// micro-batch cut to its longest conversation attends over fewer).
    pub fn per_token_at(&self, len: usize) -> f64 {
        6.0 * self.active + self.attention_per_position * len as f64
    }
}

/// Counted from the config's shapes (an expert-parallel rank that holds a
/// slice of the experts counts the whole model, as its gang trains it).
pub fn training_flops(c: &ModelConfig) -> ModelFlops {
    let (h, v, q, kv) = (c.hidden, c.vocab, c.q_width(), c.kv_width());
    let moe = &c.moe;
    let qk_norms = c.qk_norm_widths().map_or(0, |(q, k)| q + k);
    let attention = 2 * q * h + 2 * kv * h + 2 * h + qk_norms; // wq, wo, wk, wv, norms
    let dense = 3 * c.dense_hidden * h;
    let shared = 3 * moe.shared_hidden() * h;
    let routed_one = 3 * moe.expert_hidden * h;
    let router = moe.n_routed_experts * h;
    let moe_layers = c.layers - c.dense_layers;
    let head = h + v * h; // final norm, LM head
    let common =
        c.layers * attention + c.dense_layers * dense + moe_layers * (router + shared) + head;
    let parameters = v * h + common + moe_layers * moe.n_routed_experts * routed_one;
    let active = common as f64 + (moe_layers * moe.top_k * routed_one) as f64;
    let attention_per_position = 12.0 * (c.layers * q) as f64;
    let flops = ModelFlops {
        parameters,
        active,
        per_token: 0.0,
        attention_per_position,
    };
    ModelFlops {
        per_token: flops.per_token_at(c.seq_len),
        ..flops
    }
}

/// Dense bf16 peak FLOP/s of one GPU, from its CUDA device name (the
/// datasheet figures without sparsity); `None` for a GPU not listed.
pub fn bf16_dense_peak(device: &str) -> Option<f64> {
    let name = device.to_ascii_uppercase();
    let has = |part: &str| name.contains(part);
    Some(if has("B200") {
        2.25e15
    } else if has("H100") && has("PCIE") {
        756e12
    } else if has("H100") && has("NVL") {
        835e12
    } else if has("H100") || has("H200") || has("H800") {
        989e12
    } else if has("A100") || has("A800") {
        312e12
    } else {
        return None;
    })
}

/// MFU of a gang of `gpus` GPUs with dense bf16 peak `peak` each doing
/// `flops_per_second` of model FLOPs (the whole gang's: its steps'
/// [`batch_flops`] over their time).
pub fn mfu(flops_per_second: f64, gpus: usize, peak: f64) -> f64 {
    flops_per_second / (gpus as f64 * peak)
}

/// The training FLOPs of a micro-batch as it runs: each of its tokens at
/// the length it attends over — the batch's own (cut to its longest
/// conversation, or the model's `seqLen`), or with sequence parallelism
/// the whole sequence its slice belongs to (`sequence_parallel` slices).
pub fn batch_flops(
    flops: &ModelFlops,
    batch: &crate::data::Batch,
    sequence_parallel: usize,
) -> f64 {
    batch.inputs.len() as f64 * flops.per_token_at(batch.seq_len * sequence_parallel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Gradients, Model};

    fn config(json: serde_json::Value) -> ModelConfig {
        let spec: moe_crds::ModelSpec = serde_json::from_value(json).expect("a spec");
        ModelConfig::from_spec(&spec).expect("a config")
    }

    /// The reference: a model built from the config, its tensors summed
    /// (routed ones at `top_k / experts`), as the GPU benchmark counted.
    fn counted(c: &ModelConfig) -> (usize, f64) {
        let model = Model::new(c.clone(), Gradients::<f32>::zeros(c)).unwrap();
        let fraction = c.moe.top_k as f64 / c.moe.n_routed_experts as f64;
        let mut total = 0;
        let mut active = 0.0;
        for t in model.tensors() {
            total += t.values.len();
            if t.name != "embedding" {
                let routed = t.name.contains("moe.experts_");
                active += t.values.len() as f64 * if routed { fraction } else { 1.0 };
            }
        }
        (total, active)
    }

    #[test]
    fn the_count_from_shapes_matches_the_tensors_of_a_built_model() {
        for json in [
            serde_json::json!({"vocabSize": 300, "hiddenSize": 64, "layers": 3, "denseLayers": 1,
                "denseHiddenSize": 96, "attentionHeads": 4, "kvHeads": 2, "seqLen": 32,
                "moe": {"experts": 8, "topK": 2, "sharedExperts": 1, "expertHiddenSize": 48}}),
            serde_json::json!({"vocabSize": 256, "hiddenSize": 32, "layers": 2, "attentionHeads": 4,
                "kvHeads": 4, "seqLen": 16, "moe": {"experts": 4, "topK": 1, "expertHiddenSize": 16}}),
            // Qwen3's shape: heads wider than hidden / heads, q/k norms.
            serde_json::json!({"vocabSize": 256, "hiddenSize": 32, "layers": 2, "attentionHeads": 4,
                "kvHeads": 2, "headDim": 16, "qkNorm": "perHead", "seqLen": 16,
                "moe": {"experts": 4, "topK": 1, "expertHiddenSize": 16}}),
            serde_json::json!({"vocabSize": 256, "hiddenSize": 32, "layers": 2, "attentionHeads": 4,
                "kvHeads": 2, "qkNorm": "whole", "seqLen": 16,
                "moe": {"experts": 4, "topK": 1, "expertHiddenSize": 16}}),
        ] {
            let c = config(json);
            let f = training_flops(&c);
            let (total, active) = counted(&c);
            assert_eq!(f.parameters, total);
            assert!((f.active - active).abs() < 1e-6, "{} vs {active}", f.active);
            let scores = 12.0 * (c.layers * c.heads * c.head_dim * c.seq_len) as f64;
            assert_eq!(f.per_token, 6.0 * f.active + scores);
        }
    }

    /// A cut micro-batch's tokens attend over its own length; a
    /// sequence-parallel slice's over its whole sequence.
    #[test]
    fn a_batch_costs_its_tokens_at_the_length_they_attend_over() {
        let c = config(serde_json::json!({
            "hiddenSize": 64, "layers": 2, "attentionHeads": 4, "kvHeads": 2, "seqLen": 128,
            "moe": {"experts": 8, "topK": 2, "expertHiddenSize": 32}
        }));
        let f = training_flops(&c);
        assert_eq!(f.per_token_at(128), f.per_token);
        let scores = |len: usize| 12.0 * (2 * 4 * 16 * len) as f64;
        assert_eq!(f.per_token_at(40), 6.0 * f.active + scores(40));
        let batch = |seq_len: usize, rows: usize| crate::data::Batch {
            seq_len,
            inputs: vec![0; rows * seq_len],
            targets: vec![0; rows * seq_len],
            real: vec![seq_len; rows],
            documents: None,
        };
        assert_eq!(
            batch_flops(&f, &batch(40, 3), 1),
            120.0 * f.per_token_at(40)
        );
        assert_eq!(batch_flops(&f, &batch(32, 2), 4), 64.0 * f.per_token);
    }

    #[test]
    fn mfu_is_model_flops_over_the_gangs_peak() {
        let f = ModelFlops {
            parameters: 0,
            active: 1e9,
            per_token: 6e9,
            attention_per_position: 0.0,
        };
        // 8 H200s at 989 TFLOP/s training 52,750 tokens/s: 6e9 × 52750 / 7.912e15 = 4 %.
        let peak = bf16_dense_peak("NVIDIA H200").unwrap();
        assert!((mfu(f.per_token * 52_750.0, 8, peak) - 0.04).abs() < 1e-4);
        assert_eq!(bf16_dense_peak("NVIDIA H100 80GB HBM3"), Some(989e12));
        assert_eq!(bf16_dense_peak("NVIDIA H100 PCIe"), Some(756e12));
        assert_eq!(bf16_dense_peak("NVIDIA A100-SXM4-80GB"), Some(312e12));
        assert_eq!(bf16_dense_peak("NVIDIA GeForce RTX 4090"), None);
    }
}
