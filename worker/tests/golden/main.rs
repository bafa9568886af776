//! The MoE layer and one whole model step against golden files written by
//! PyTorch's autograd (`generate.py` in this directory; see its docstring).
//!
//! The fixtures are committed: this test needs no torch, and a missing or
//! unreadable fixture fails it. Each fixture carries its model config
//! (metadata key `config`), its float64 weights and inputs, the routing
//! PyTorch chose, and float64 outputs and gradients.
//!
//! Tolerances, per element type of the Rust run, as the worst error of a
//! tensor divided by that tensor's largest reference magnitude:
//! - `f64`: [`F64_TOLERANCE`]. Both sides compute the same function in
//!   float64 with different summation orders; measured worst 2.4e-15 (model
//!   step), 7e-16 (MoE block).
//! - `f32`: [`F32_TOLERANCE`]. Rust rounds weights and inputs to f32 and
//!   computes in f32 (training's precision); measured worst 4.5e-7 (model
//!   step), 2.3e-7 (MoE block): a few f32 ulps (6e-8) through the depth of
//!   the computation.
//!
//! A wrong term (a missing transpose, gate, scale or residual) is off by
//! 1e-2 or more relative.

mod fixture;

use fixture::Fixture;
use moe_worker::linear::GemmPrecision;
use moe_worker::model::{Gradients, Model, ModelConfig};
use moe_worker::moe::{GroupLimit, MoeConfig, MoeLayer, MoeParams, ScoreFunction};
use moe_worker::scalar::Scalar;
use serde_json::Value;

const F64_TOLERANCE: f64 = 1e-12;
const F32_TOLERANCE: f64 = 5e-6;

fn tolerance<T: Scalar>() -> f64 {
    if std::mem::size_of::<T>() == 8 {
        F64_TOLERANCE
    } else {
        F32_TOLERANCE
    }
}

/// Worst `|got - want|` over the tensor, relative to its largest `|want|`
/// (absolute for an all-zero reference, such as the weights of an expert no
/// token reached, whose gradient must then be exactly zero).
fn scaled_error<T: Scalar>(got: &[T], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "tensor lengths");
    let scale = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
    let worst = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (g, w)| m.max((g.to_f64() - w).abs()));
    if scale > 0.0 { worst / scale } else { worst }
}

/// Asserts `got` matches the fixture's `name` within the type's tolerance; returns the error.
fn assert_matches<T: Scalar>(fixture: &Fixture, name: &str, got: &[T]) -> f64 {
    let error = scaled_error(got, &fixture.f64(name));
    let tolerance = tolerance::<T>();
    assert!(
        error <= tolerance,
        "{}: {name} differs from PyTorch by {error:e} (scaled; tolerance {tolerance:e})",
        fixture.name()
    );
    error
}

fn convert<T: Scalar>(values: &[f64]) -> Vec<T> {
    values.iter().map(|&v| T::from_f64(v)).collect()
}

fn moe_config(json: &Value) -> MoeConfig {
    let count = |key: &str| json[key].as_u64().expect(key) as usize;
    let number = |key: &str| json[key].as_f64().expect(key);
    MoeConfig {
        hidden: count("hidden"),
        n_routed_experts: count("n_routed_experts"),
        expert_hidden: count("expert_hidden"),
        n_shared_experts: count("n_shared_experts"),
        shared_expert_hidden: count("shared_expert_hidden"),
        top_k: count("top_k"),
        score_function: match json["score_function"].as_str() {
            Some("softmax") => ScoreFunction::Softmax,
            Some("sigmoid") => ScoreFunction::Sigmoid,
            other => panic!("score_function {other:?}"),
        },
        group_limit: json["group_limit"].as_object().map(|limit| GroupLimit {
            n_groups: limit["n_groups"].as_u64().unwrap() as usize,
            top_groups: limit["top_groups"].as_u64().unwrap() as usize,
        }),
        normalize_gates: json["normalize_gates"].as_bool().expect("normalize_gates"),
        routed_scaling_factor: number("routed_scaling_factor"),
        aux_loss_alpha: number("aux_loss_alpha"),
    }
}

fn model_config(json: &Value) -> ModelConfig {
    let count = |key: &str| json[key].as_u64().expect(key) as usize;
    ModelConfig {
        vocab: count("vocab"),
        hidden: count("hidden"),
        layers: count("layers"),
        dense_layers: count("dense_layers"),
        dense_hidden: count("dense_hidden"),
        heads: count("heads"),
        kv_heads: count("kv_heads"),
        head_dim: count("hidden") / count("heads"),
        norm_eps: moe_worker::model::config::NORM_EPS,
        qk_norm: None,
        seq_len: count("seq_len"),
        rope_theta: json["rope_theta"].as_f64().expect("rope_theta"),
        moe: moe_config(&json["moe"]),
        bias_update_rate: None,
        gemm_precision: GemmPrecision::Fp32,
        head_precision: GemmPrecision::Fp32,
    }
}

/// The MoE tensors under `prefix` in the Rust layout (shared experts fused).
fn moe_params<T: Scalar>(fixture: &Fixture, config: &MoeConfig, prefix: &str) -> MoeParams<T> {
    let mut params = MoeParams::zeros(config);
    let MoeParams {
        router,
        experts_w1,
        experts_w3,
        experts_w2,
        shared_w1,
        shared_w3,
        shared_w2,
        ..
    } = &mut params;
    let tensors = [
        ("router", router),
        ("experts_w1", experts_w1),
        ("experts_w3", experts_w3),
        ("experts_w2", experts_w2),
        ("shared_w1", shared_w1),
        ("shared_w3", shared_w3),
        ("shared_w2", shared_w2),
    ];
    for (name, values) in tensors {
        *values = convert(&fixture.f64(&format!("{prefix}{name}")));
    }
    assert!(
        params.matches(config),
        "{}: MoE tensor shapes",
        fixture.name()
    );
    params
}

fn check_moe_block<T: Scalar>() -> f64 {
    let fixture = Fixture::load("moe_block.safetensors");
    let config = moe_config(&fixture.config());
    let seq_len = fixture.config()["seq_len"].as_u64().unwrap() as usize;
    let params = moe_params::<T>(&fixture, &config, "");
    let mut layer = MoeLayer::new(config.clone(), params).expect("the fixture's config is valid");
    let x: Vec<T> = convert(&fixture.f64("x"));
    let dout: Vec<T> = convert(&fixture.f64("dout"));

    // Without the fixture's selection bias some token picks other experts:
    // so the match below also proves the bias steers selection only.
    let unbiased = layer.forward(&x, seq_len);
    assert_ne!(unbiased.routing.experts, fixture.indices("experts"));
    layer.selection_bias = convert(&fixture.f64("selection_bias"));

    let pass = layer.forward(&x, seq_len);
    assert_eq!(
        pass.routing.experts,
        fixture.indices("experts"),
        "top-k choice"
    );
    let mut worst = assert_matches(&fixture, "output", &pass.output);
    worst = worst.max(assert_matches(&fixture, "aux_loss", &[pass.aux_loss]));

    let mut dx = vec![T::ZERO; x.len()];
    let mut grads = MoeParams::zeros(&config);
    layer.backward(&pass, &x, &dout, &mut dx, &mut grads);
    worst = worst.max(assert_matches(&fixture, "grad.x", &dx));
    let expected = moe_params::<f64>(&fixture, &config, "grad.");
    let pairs = [
        ("router", &grads.router, &expected.router),
        ("experts_w1", &grads.experts_w1, &expected.experts_w1),
        ("experts_w3", &grads.experts_w3, &expected.experts_w3),
        ("experts_w2", &grads.experts_w2, &expected.experts_w2),
        ("shared_w1", &grads.shared_w1, &expected.shared_w1),
        ("shared_w3", &grads.shared_w3, &expected.shared_w3),
        ("shared_w2", &grads.shared_w2, &expected.shared_w2),
    ];
    for (name, got, want) in pairs {
        let error = scaled_error(got, want);
        assert!(
            error <= tolerance::<T>(),
            "grad.{name} differs from PyTorch by {error:e}"
        );
        worst = worst.max(error);
    }
    worst
}

fn check_model_step<T: Scalar>() -> f64 {
    let fixture = Fixture::load("model_step.safetensors");
    let config = model_config(&fixture.config());
    let mut weights = Gradients::<T>::zeros(&config);
    let names: Vec<String> = weights
        .tensors(&config)
        .into_iter()
        .map(|t| t.name)
        .collect();
    for (values, name) in weights.tensors_mut().into_iter().zip(&names) {
        *values = convert(&fixture.f64(name));
    }
    let mut model = Model::new(config.clone(), weights).expect("the fixture fits its config");
    let moe_blocks: Vec<usize> = (0..config.layers)
        .filter(|&b| config.is_moe_block(b))
        .collect();
    for (layer, block) in model.moe_layers_mut().zip(&moe_blocks) {
        layer.selection_bias = convert(&fixture.f64(&format!("blocks.{block}.moe.selection_bias")));
    }
    let tokens = fixture.indices("tokens");
    let targets = fixture.indices("targets");
    let as_ids = |v: Vec<usize>| v.into_iter().map(|t| t as u32).collect::<Vec<u32>>();
    let pass = model.forward(&as_ids(tokens), &as_ids(targets));

    for (experts, block) in pass.selected_experts().into_iter().zip(&moe_blocks) {
        let name = format!("blocks.{block}.moe.experts");
        assert_eq!(experts, fixture.indices(&name), "{name}");
    }
    let mut worst = assert_matches(
        &fixture,
        "cross_entropy",
        &[T::from_f64(pass.cross_entropy)],
    );
    worst = worst.max(assert_matches(
        &fixture,
        "aux_loss",
        &[T::from_f64(pass.aux_loss)],
    ));

    let mut grads = Gradients::zeros(&config);
    model.backward(&pass, &mut grads);
    let grad_tensors = grads.tensors(&config);
    // Every gradient the fixture holds is checked, and every Rust tensor has one.
    let mut in_fixture = fixture.names_with_prefix("grad.");
    let mut in_rust: Vec<String> = grad_tensors
        .iter()
        .map(|t| format!("grad.{}", t.name))
        .collect();
    in_fixture.sort();
    in_rust.sort();
    assert_eq!(in_rust, in_fixture, "gradient tensors");
    for tensor in &grad_tensors {
        let name = format!("grad.{}", tensor.name);
        worst = worst.max(assert_matches(&fixture, &name, tensor.values));
    }
    worst
}

#[test]
fn moe_block_forward_and_backward_match_pytorch_in_f64() {
    let worst = check_moe_block::<f64>();
    eprintln!("MoE block, f64: worst scaled error {worst:e}");
}

#[test]
fn moe_block_forward_and_backward_match_pytorch_in_f32() {
    let worst = check_moe_block::<f32>();
    eprintln!("MoE block, f32: worst scaled error {worst:e}");
}

#[test]
fn model_step_loss_and_every_gradient_match_pytorch_in_f64() {
    let worst = check_model_step::<f64>();
    eprintln!("model step, f64: worst scaled error {worst:e}");
}

#[test]
fn model_step_loss_and_every_gradient_match_pytorch_in_f32() {
    let worst = check_model_step::<f32>();
    eprintln!("model step, f32: worst scaled error {worst:e}");
}

/// The comparison is not vacuous: one wrong gradient element, at the f32
/// tolerance's scale, fails it.
#[test]
fn a_perturbed_gradient_fails_the_comparison() {
    let fixture = Fixture::load("model_step.safetensors");
    let want = fixture.f64("grad.blocks.1.moe.router");
    let mut got = want.clone();
    let scale = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
    got[3] += 10.0 * F32_TOLERANCE * scale;
    assert!(scaled_error(&got, &want) > F32_TOLERANCE);
    assert_eq!(scaled_error(&want, &want), 0.0);
}
