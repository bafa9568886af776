//! LoRA adapters for the serving tests: random updates of a model's
//! projections, written as PEFT saves them, and the model they were folded
//! into, naively (the reference an adapter served beside its base is
//! checked against).

use std::path::Path;

use moe_worker::model::hf_export::halve_rope_rows;
use moe_worker::model::{FeedForward, Model};
use moe_worker::rng::SplitMix64;
use safetensors::{Dtype, tensor::TensorView};
use serde_json::json;

pub const RANK: usize = 4;

/// One adapted projection, with `B` in the worker's row order.
pub struct Update {
    pub layer: usize,
    pub module: &'static str,
    /// `[RANK, cols]`.
    pub a: Vec<f32>,
    /// `[rows, RANK]`.
    pub b: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

pub fn updates(model: &Model<f32>, seed: u64) -> Vec<Update> {
    let config = model.config();
    let (h, qw, kv, dh) = (
        config.hidden,
        config.q_width(),
        config.kv_width(),
        config.dense_hidden,
    );
    let mut rng = SplitMix64::new(seed);
    // Every projection of layer 0 (dense: its MLP's too), and only v and
    // o of layer 1 (a MoE layer).
    let chosen = [
        (0, "q_proj", qw, h),
        (0, "k_proj", kv, h),
        (0, "v_proj", kv, h),
        (0, "o_proj", h, qw),
        (0, "gate_proj", dh, h),
        (0, "up_proj", dh, h),
        (0, "down_proj", h, dh),
        (1, "v_proj", kv, h),
        (1, "o_proj", h, qw),
    ];
    chosen
        .into_iter()
        .map(|(layer, module, rows, cols)| Update {
            layer,
            module,
            a: rng.normal_vec(RANK * cols, 0.3),
            b: rng.normal_vec(rows * RANK, 0.3),
            rows,
            cols,
        })
        .collect()
}

/// `base` with each update folded in, naively: `W += scale · B·A`.
pub fn merged(base: &Model<f32>, updates: &[Update], scale: f32) -> Model<f32> {
    let mut model = base.clone();
    for u in updates {
        let block = &mut model.weights.blocks[u.layer];
        let dense = match &mut block.ffn {
            FeedForward::Dense(dense) => Some(dense),
            FeedForward::Moe(_) => None,
        };
        let w = match (u.module, dense) {
            ("q_proj", _) => &mut block.wq,
            ("k_proj", _) => &mut block.wk,
            ("v_proj", _) => &mut block.wv,
            ("o_proj", _) => &mut block.wo,
            ("gate_proj", Some(dense)) => &mut dense.w1,
            ("up_proj", Some(dense)) => &mut dense.w3,
            ("down_proj", Some(dense)) => &mut dense.w2,
            _ => unreachable!("{} of layer {}", u.module, u.layer),
        };
        for i in 0..u.rows {
            for j in 0..u.cols {
                let delta: f32 = (0..RANK)
                    .map(|k| u.b[i * RANK + k] * u.a[k * u.cols + j])
                    .sum();
                w[i * u.cols + j] += scale * delta;
            }
        }
    }
    model
}

/// The adapter as PEFT saves it: Hugging Face module names, q's and k's
/// `B` rows in RoPE halves (what the export writes), F32.
pub fn write_peft(dir: &Path, updates: &[Update], head_dim: usize, alpha: f64, rslora: bool) {
    std::fs::create_dir_all(dir).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for u in updates {
        let b = if matches!(u.module, "q_proj" | "k_proj") {
            halve_rope_rows(&u.b, u.rows / head_dim, head_dim, RANK)
        } else {
            u.b.clone()
        };
        let parent = match u.module {
            "gate_proj" | "up_proj" | "down_proj" => "mlp",
            _ => "self_attn",
        };
        let module = format!(
            "base_model.model.model.layers.{}.{parent}.{}",
            u.layer, u.module
        );
        for (part, shape, values) in [
            ("lora_A", vec![RANK, u.cols], &u.a),
            ("lora_B", vec![u.rows, RANK], &b),
        ] {
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            tensors.push((format!("{module}.{part}.weight"), shape, bytes));
        }
    }
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            (
                name.clone(),
                TensorView::new(Dtype::F32, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("adapter_model.safetensors")).unwrap();
    let config = json!({
        "peft_type": "LORA", "r": RANK, "lora_alpha": alpha, "use_rslora": rslora,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "bias": "none",
        "lora_dropout": 0.0, "fan_in_fan_out": false, "use_dora": false,
        "modules_to_save": null, "rank_pattern": {}, "alpha_pattern": {},
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
}
