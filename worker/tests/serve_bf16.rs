//! Serving with bfloat16 weights (`--precision bf16`): the engine must
//! compute exactly what f32 serving computes on the same model with its
//! weights rounded to bfloat16 beforehand — every projection, expert and
//! LM head rounded, the routers, gates, norms and embedding table not —
//! so the only change is the rounding of those weights, never the
//! arithmetic around them. Checked on the worker's own model and the
//! Hugging Face fixtures (Mixtral, Qwen2-MoE with its gated shared expert,
//! Qwen3-MoE with q/k norms), over a prefill and decode steps.

mod serve_support;

use std::path::Path;

use moe_worker::ops::packed_linear::WeightPrecision;
use moe_worker::serve::engine::{Chunk, Engine};
use moe_worker::serve::kv_cache::{KvStore, pages_for};
use moe_worker::serve::load;
use moe_worker::serve::model::{Mlp, ServeFfn, ServeModel};
use serve_support::tiny_model;

const PAGE_SIZE: usize = 16;

/// Round to the nearest bfloat16, ties to even (finite values), in f32.
fn round(v: f32) -> f32 {
    let bits = v.to_bits();
    f32::from_bits(bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) & 0xffff_0000)
}

fn round_all(values: &mut [f32]) {
    values.iter_mut().for_each(|v| *v = round(*v));
}

fn round_mlp(mlp: &mut Mlp) {
    round_all(&mut mlp.w1);
    round_all(&mut mlp.w3);
    round_all(&mut mlp.w2);
}

/// `model` with the weights `--precision bf16` stores as bfloat16 rounded.
fn rounded(mut model: ServeModel) -> ServeModel {
    for block in &mut model.blocks {
        for w in [&mut block.wq, &mut block.wk, &mut block.wv, &mut block.wo] {
            round_all(w);
        }
        match &mut block.ffn {
            ServeFfn::Dense(mlp) => round_mlp(mlp),
            ServeFfn::Moe {
                layer,
                gated_shared,
            } => {
                let p = &mut layer.params;
                for w in [
                    &mut p.experts_w1,
                    &mut p.experts_w3,
                    &mut p.experts_w2,
                    &mut p.shared_w1,
                    &mut p.shared_w3,
                    &mut p.shared_w2,
                ] {
                    round_all(w);
                }
                if let Some(g) = gated_shared {
                    round_mlp(&mut g.mlp);
                }
            }
        }
    }
    match &mut model.lm_head {
        Some(head) => round_all(head),
        // Tied: the LM head is the embedding, looked up rounded too.
        None => round_all(&mut model.embedding),
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
            logits: true,
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

/// The bits of f32 serving on the rounded weights, and half the bytes.
/// `rounds_something`: whether the weights are not bfloat16 values already
/// (the Mixtral fixture's are: `generate.py` stores it in BF16).
fn check(name: &str, model: ServeModel, rounds_something: bool) {
    let vocab = model.config.vocab as u32;
    let tokens: Vec<u32> = (0..20u32).map(|i| (i * 37 + 5) % vocab).collect();
    let f32_engine = Engine::serve(model.clone());
    let reference = Engine::serve(rounded(model.clone()));
    let bf16_engine = Engine::serve(model).with_weights(WeightPrecision::Bf16);
    let expected = bits(&logits(&reference, &tokens, 13));
    let got = bits(&logits(&bf16_engine, &tokens, 13));
    let first_difference = got.iter().zip(&expected).position(|(a, b)| a != b);
    assert_eq!(first_difference, None, "{name}: bf16 serving, step");
    let unrounded = bits(&logits(&f32_engine, &tokens, 13));
    if rounds_something {
        assert_ne!(unrounded, expected, "{name}: rounding changed nothing");
    } else {
        assert_eq!(unrounded, expected, "{name}: bf16-exact weights");
    }
    let (full, half) = (f32_engine.weight_bytes(), bf16_engine.weight_bytes());
    assert!(
        // Half, plus half the routers' and gates' f32 bytes (a few percent
        // of these tiny models, padded to 16 outputs).
        half > full / 2 && half < full * 55 / 100,
        "{name}: {half} bytes of bf16 weights for {full} of f32"
    );
}

#[test]
fn bf16_weights_serve_the_bits_of_f32_serving_on_rounded_weights() {
    check("native", ServeModel::from_native(tiny_model(11)), true);
    for (name, rounds_something) in [("mixtral", false), ("qwen2_moe", true), ("qwen3_moe", true)] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/hf")
            .join(name);
        let loaded = load::load(&dir, None, None).unwrap_or_else(|e| panic!("{name}: {e}"));
        check(name, loaded.model.into_serve_model(), rounds_something);
    }
}
