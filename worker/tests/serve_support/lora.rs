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
    /// Its Hugging Face path in the block: `self_attn.q_proj`,
    /// `mlp.gate_proj`, `mlp.experts.2.up_proj`, `mlp.shared_experts.down_proj`.
    pub module: String,
    /// `[RANK, cols]`.
    pub a: Vec<f32>,
    /// `[rows, RANK]`.
    pub b: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

fn random(chosen: Vec<(usize, String, usize, usize)>, seed: u64) -> Vec<Update> {
    let mut rng = SplitMix64::new(seed);
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

/// Every projection of layer 0 (dense: its MLP's too), and only v and o of
/// layer 1 (a MoE layer).
pub fn updates(model: &Model<f32>, seed: u64) -> Vec<Update> {
    let config = model.config();
    let (h, qw, kv, dh) = (
        config.hidden,
        config.q_width(),
        config.kv_width(),
        config.dense_hidden,
    );
    let chosen = [
        (0, "self_attn.q_proj", qw, h),
        (0, "self_attn.k_proj", kv, h),
        (0, "self_attn.v_proj", kv, h),
        (0, "self_attn.o_proj", h, qw),
        (0, "mlp.gate_proj", dh, h),
        (0, "mlp.up_proj", dh, h),
        (0, "mlp.down_proj", h, dh),
        (1, "self_attn.v_proj", kv, h),
        (1, "self_attn.o_proj", h, qw),
    ];
    random(
        chosen
            .into_iter()
            .map(|(l, m, r, c)| (l, m.to_owned(), r, c))
            .collect(),
        seed,
    )
}

/// Layer 1's (a MoE layer's) experts: every projection of routed expert 0,
/// the up projection of expert 2, and the shared experts' gate and down.
pub fn expert_updates(model: &Model<f32>, seed: u64) -> Vec<Update> {
    let config = model.config();
    let (h, eh, sh) = (
        config.hidden,
        config.moe.expert_hidden,
        config.moe.shared_hidden(),
    );
    let chosen = vec![
        (1, "mlp.experts.0.gate_proj".to_owned(), eh, h),
        (1, "mlp.experts.0.up_proj".to_owned(), eh, h),
        (1, "mlp.experts.0.down_proj".to_owned(), h, eh),
        (1, "mlp.experts.2.up_proj".to_owned(), eh, h),
        (1, "mlp.shared_experts.gate_proj".to_owned(), sh, h),
        (1, "mlp.shared_experts.down_proj".to_owned(), h, sh),
    ];
    random(chosen, seed)
}

/// `base` with each update folded in, naively: `W += scale · B·A`.
pub fn merged(base: &Model<f32>, updates: &[Update], scale: f32) -> Model<f32> {
    let mut model = base.clone();
    for u in updates {
        let block = &mut model.weights.blocks[u.layer];
        let (path, leaf) = u.module.rsplit_once('.').unwrap();
        let w: &mut [f32] = match (path, &mut block.ffn) {
            ("self_attn", _) => match leaf {
                "q_proj" => &mut block.wq,
                "k_proj" => &mut block.wk,
                "v_proj" => &mut block.wv,
                _ => &mut block.wo,
            },
            ("mlp", FeedForward::Dense(dense)) => match leaf {
                "gate_proj" => &mut dense.w1,
                "up_proj" => &mut dense.w3,
                _ => &mut dense.w2,
            },
            ("mlp.shared_experts", FeedForward::Moe(moe)) => match leaf {
                "gate_proj" => &mut moe.params.shared_w1,
                "up_proj" => &mut moe.params.shared_w3,
                _ => &mut moe.params.shared_w2,
            },
            (path, FeedForward::Moe(moe)) => {
                let e: usize = path.strip_prefix("mlp.experts.").unwrap().parse().unwrap();
                let size = u.rows * u.cols;
                let stacked = match leaf {
                    "gate_proj" => &mut moe.params.experts_w1,
                    "up_proj" => &mut moe.params.experts_w3,
                    _ => &mut moe.params.experts_w2,
                };
                &mut stacked[e * size..(e + 1) * size]
            }
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
        let b = if matches!(u.module.as_str(), "self_attn.q_proj" | "self_attn.k_proj") {
            halve_rope_rows(&u.b, u.rows / head_dim, head_dim, RANK)
        } else {
            u.b.clone()
        };
        let module = format!("base_model.model.model.layers.{}.{}", u.layer, u.module);
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
