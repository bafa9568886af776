//! Serving with bfloat16 or FP8 weights (`--precision bf16|fp8`): the
//! engine must compute exactly what f32 serving computes on the same model
//! with its weights rounded beforehand — every projection, expert and LM
//! head rounded (FP8: each output row with its own power-of-two scale), the
//! routers, gates, norms and embedding table not — so the only change is
//! the rounding of those weights, never the arithmetic around them. Checked
//! on the worker's own model and the Hugging Face fixtures (Mixtral,
//! Qwen2-MoE with its gated shared expert, Qwen3-MoE with q/k norms,
//! DeepSeek-V3 with latent attention, OLMoE with whole-width q/k norms and
//! clip_qkv), over a prefill and decode steps.

mod serve_support;

use std::path::Path;

use moe_worker::ops::packed_linear::{PackedLinear, WeightPrecision};
use moe_worker::serve::engine::{Chunk, Engine, Logits};
use moe_worker::serve::kv_cache::{KvStore, pages_for};
use moe_worker::serve::load;
use moe_worker::serve::model::{LatentShape, Mlp, ServeFfn, ServeModel};
use serve_support::tiny_model;

const PAGE_SIZE: usize = 16;

/// Round to the nearest bfloat16, ties to even (finite values), in f32.
fn bf16(v: f32) -> f32 {
    let bits = v.to_bits();
    f32::from_bits(bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) & 0xffff_0000)
}

/// Rounds `w: [rows, in_dim]` as `precision` stores it.
fn round(w: &mut [f32], in_dim: usize, precision: WeightPrecision) {
    match precision {
        WeightPrecision::F32 => {}
        WeightPrecision::Bf16 => w.iter_mut().for_each(|v| *v = bf16(*v)),
        // Each row with its own power-of-two scale: the library's
        // quantization (checked against an f64 reference in
        // `ops::packed_linear`), read back row by row.
        WeightPrecision::Fp8 if w.is_empty() => {}
        WeightPrecision::Fp8 => {
            let rows = w.len() / in_dim;
            let mut linear = PackedLinear::new(w.to_vec(), in_dim, rows);
            linear.round_to_fp8();
            for (o, row) in w.chunks_exact_mut(in_dim).enumerate() {
                linear.row(o, row);
            }
        }
    }
}

/// `kv_b_proj`, `[heads × (nope + v), rank]`, as the served absorbed
/// matrices store it: each head's value rows as they are, its key rows
/// transposed (`[rank, nope]`, so FP8 scales each latent dimension's
/// column of them).
fn round_kv_b(kv_b: &mut [f32], shape: &LatentShape, precision: WeightPrecision) {
    let (nope, v, rank) = (shape.qk_nope_dim, shape.v_head_dim, shape.kv_lora_rank);
    for head in kv_b.chunks_exact_mut((nope + v) * rank) {
        let (keys, values) = head.split_at_mut(nope * rank);
        round(values, rank, precision);
        let mut transposed: Vec<f32> = (0..rank * nope)
            .map(|at| keys[(at % nope) * rank + at / nope])
            .collect();
        round(&mut transposed, nope, precision);
        for (at, &w) in transposed.iter().enumerate() {
            keys[(at % nope) * rank + at / nope] = w;
        }
    }
}

fn round_mlp(mlp: &mut Mlp, hidden: usize, precision: WeightPrecision) {
    round(&mut mlp.w1, hidden, precision);
    round(&mut mlp.w3, hidden, precision);
    round(&mut mlp.w2, mlp.width, precision);
}

/// `model` with the weights `precision` stores rounded.
fn rounded(mut model: ServeModel, precision: WeightPrecision) -> ServeModel {
    let hidden = model.config.hidden;
    let latent_shape = model.config.latent.clone();
    for block in &mut model.blocks {
        for w in [&mut block.wq, &mut block.wk, &mut block.wv] {
            round(w, hidden, precision);
        }
        // `[hidden, heads × head_dim]`, or MLA's `[hidden, heads × v_head_dim]`.
        let attention_width = block.wo.len() / hidden;
        round(&mut block.wo, attention_width, precision);
        // MLA: q_b_proj, and kv_b_proj, whose per-head absorbed matrices
        // are its values rearranged.
        if let (Some(latent), Some(shape)) = (&mut block.latent, &latent_shape) {
            if let Some((gain, q_b)) = &mut latent.q_b {
                round(q_b, gain.len(), precision);
            }
            round_kv_b(&mut latent.kv_b, shape, precision);
        }
        match &mut block.ffn {
            ServeFfn::Dense(mlp) => round_mlp(mlp, hidden, precision),
            ServeFfn::Moe {
                layer,
                gated_shared,
            } => {
                let expert_hidden = layer.config().expert_hidden;
                let p = &mut layer.params;
                round(&mut p.experts_w1, hidden, precision);
                round(&mut p.experts_w3, hidden, precision);
                round(&mut p.experts_w2, expert_hidden, precision);
                round(&mut p.shared_w1, hidden, precision);
                round(&mut p.shared_w3, hidden, precision);
                let shared_hidden = p.shared_w2.len() / hidden;
                round(&mut p.shared_w2, shared_hidden.max(1), precision);
                if let Some(g) = gated_shared {
                    round_mlp(&mut g.mlp, hidden, precision);
                }
            }
        }
    }
    match &mut model.lm_head {
        Some(head) => round(head, hidden, precision),
        // Tied: the LM head is the embedding, looked up rounded too.
        None => round(&mut model.embedding, hidden, precision),
    }
    model
}

/// Logits of a prefill of `tokens[..prefill]` and one-token decodes of the rest.
fn logits(engine: &Engine, tokens: &[u32], prefill: usize) -> Vec<Vec<f32>> {
    let mut store = KvStore::new(engine.kv_shape(PAGE_SIZE), 8);
    let pages: Vec<u32> = (0..pages_for(tokens.len(), PAGE_SIZE) as u32).collect();
    let mut out = Vec::new();
    let mut start = 0;
    for len in std::iter::once(prefill).chain(std::iter::repeat_n(1, tokens.len() - prefill)) {
        let chunk = Chunk {
            pages: &pages,
            start,
            tokens: &tokens[start..start + len],
            logits: Logits::Last,
            adapter: None,
        };
        out.push(engine.step(&mut store, &[chunk]).expect("a valid step"));
        start += len;
    }
    out
}

fn bits(v: &[Vec<f32>]) -> Vec<Vec<u32>> {
    v.iter()
        .map(|l| l.iter().map(|x| x.to_bits()).collect())
        .collect()
}

/// The bits of f32 serving on the rounded weights, and a half (bf16) or a
/// quarter (FP8) of the bytes. `rounds_something`: whether the weights are
/// not values of that precision already (the Mixtral and DeepSeek-V3
/// fixtures' are bf16: `generate.py` stores them in BF16).
fn check(name: &str, model: ServeModel, precision: WeightPrecision, rounds_something: bool) {
    let vocab = model.config.vocab as u32;
    let tokens: Vec<u32> = (0..20u32).map(|i| (i * 37 + 5) % vocab).collect();
    let f32_engine = Engine::serve(model.clone());
    let reference = Engine::serve(rounded(model.clone(), precision));
    let engine = Engine::serve(model).with_weights(precision);
    let expected = bits(&logits(&reference, &tokens, 13));
    let got = bits(&logits(&engine, &tokens, 13));
    let first_difference = got.iter().zip(&expected).position(|(a, b)| a != b);
    assert_eq!(first_difference, None, "{name} {precision:?}: step");
    let unrounded = bits(&logits(&f32_engine, &tokens, 13));
    if rounds_something {
        assert_ne!(unrounded, expected, "{name}: rounding changed nothing");
    } else {
        assert_eq!(unrounded, expected, "{name}: {precision:?}-exact weights");
    }
    let (full, reduced) = (f32_engine.weight_bytes(), engine.weight_bytes());
    // Plus the routers' and gates' f32 bytes (a few percent of these tiny
    // models, padded to 16 outputs) and FP8's scale per output (4 bytes per
    // row of 32–64 weights here).
    let (above, below) = match precision {
        WeightPrecision::Bf16 => (full / 2, full * 55 / 100),
        _ => (full / 4, full * 35 / 100),
    };
    assert!(
        reduced > above && reduced < below,
        "{name}: {reduced} bytes of {precision:?} weights for {full} of f32"
    );
}

fn check_all(precision: WeightPrecision, bf16_fixture_rounds: bool) {
    check(
        "native",
        ServeModel::from_native(tiny_model(11)),
        precision,
        true,
    );
    for (name, rounds_something) in [
        ("mixtral", bf16_fixture_rounds),
        ("qwen2_moe", true),
        ("qwen3_moe", true),
        ("deepseek_v3", bf16_fixture_rounds),
        ("deepseek_v3_plain", true),
        // F32 weights; its q/k norm gains and biases stay f32 (not linears).
        ("olmoe", true),
    ] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/hf")
            .join(name);
        let loaded = load::load(&dir, None, None).unwrap_or_else(|e| panic!("{name}: {e}"));
        check(
            name,
            loaded.model.into_serve_model(),
            precision,
            rounds_something,
        );
    }
}

#[test]
fn bf16_weights_serve_the_bits_of_f32_serving_on_rounded_weights() {
    check_all(WeightPrecision::Bf16, false);
}

#[test]
fn fp8_weights_serve_the_bits_of_f32_serving_on_dequantized_weights() {
    check_all(WeightPrecision::Fp8, true);
}
