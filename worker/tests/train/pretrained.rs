//! Fine-tuning from a pretrained model (`model.initFrom`): the training
//! model loaded from a Hugging Face Mixtral or Qwen3-MoE directory (the
//! random tiny models of `tests/fixtures/hf`, made by `generate.py`)
//! predicts what `transformers` predicts for it, token for token (its
//! logits in `golden.json`), and `moe-worker train` starts from it.

use std::path::{Path, PathBuf};

use moe_crds::ModelSpec;
use moe_worker::model::config::ModelConfig;
use moe_worker::model::pretrained;
use moe_worker::rng::SplitMix64;
use serde_json::{Value, json};

use crate::{config_json, scratch_dir};

pub(crate) fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

/// The job's `model` for the Mixtral fixture (its config.json, in the
/// CRD's words), patched by `patch`.
fn mixtral_model(patch: Value) -> Value {
    let mut model = json!({
        "vocabSize": 400, "hiddenSize": 64, "layers": 2, "attentionHeads": 4, "kvHeads": 2,
        "seqLen": 32, "ropeTheta": 1000000.0,
        "moe": {"experts": 4, "topK": 2, "expertHiddenSize": 32, "router": "softmax",
                "normalizeTopK": true}
    });
    moe_crds::fixtures::merge_patch(&mut model, &patch);
    model
}

fn spec(patch: Value) -> ModelSpec {
    serde_json::from_value(mixtral_model(patch)).expect("a valid ModelSpec")
}

/// The job's `model` for the Qwen3-MoE fixture: a dense first layer, heads
/// of 32 on a hidden size of 64, per-head q/k norms, ε 1e-6.
fn qwen3_spec(patch: Value) -> ModelSpec {
    serde_json::from_value(qwen3_model(patch)).expect("a valid ModelSpec")
}

/// [`qwen3_spec`] as JSON, for a worker config.
pub(crate) fn qwen3_model(patch: Value) -> Value {
    let mut model = json!({
        "vocabSize": 330, "hiddenSize": 64, "layers": 2, "denseLayers": 1,
        "denseHiddenSize": 64, "attentionHeads": 4, "kvHeads": 2, "headDim": 32,
        "qkNorm": "perHead", "normEpsilon": 1e-6, "seqLen": 32, "ropeTheta": 1000000.0,
        "moe": {"experts": 8, "topK": 2, "expertHiddenSize": 16, "router": "softmax",
                "normalizeTopK": true}
    });
    moe_crds::fixtures::merge_patch(&mut model, &patch);
    model
}

fn load(dir: &Path, spec: &ModelSpec) -> Result<moe_worker::model::Model<f32>, String> {
    let config = ModelConfig::from_spec(spec).map_err(|e| e.to_string())?;
    let experts = 0..config.moe.n_routed_experts;
    pretrained::load(dir, spec, config, experts).map_err(|e| e.to_string())
}

fn log_softmax(logits: &[f64]) -> Vec<f64> {
    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = logits.iter().map(|l| (l - max).exp()).sum();
    logits.iter().map(|l| l - max - sum.ln()).collect()
}

#[test]
fn a_mixtral_checkpoint_starts_the_training_model_where_transformers_is() {
    agrees_with_transformers("mixtral", &spec(json!({})));
}

#[test]
fn a_qwen3_moe_checkpoint_starts_the_training_model_where_transformers_is() {
    agrees_with_transformers("qwen3_moe", &qwen3_spec(json!({})));
}

/// The fixture `name` loaded as `spec` predicts transformers' logits.
fn agrees_with_transformers(name: &str, spec: &ModelSpec) {
    let dir = fixture(name);
    let golden: Value =
        serde_json::from_slice(&std::fs::read(dir.join("golden.json")).unwrap()).unwrap();
    let model = load(&dir, spec).expect("the training model holds the fixture");
    let vocab = spec.vocab_size as usize;
    let mut checked = 0;
    for prompt in golden["prompts"].as_array().unwrap() {
        let ids: Vec<u32> = serde_json::from_value(prompt["ids"].clone()).unwrap();
        let greedy: Vec<u32> = serde_json::from_value(prompt["greedy"].clone()).unwrap();
        let logits: Vec<Vec<f64>> = serde_json::from_value(prompt["logits"].clone()).unwrap();
        // The prompt and what transformers generated from it: logits row i
        // is its prediction after the prompt and i generated tokens.
        // One sequence of seqLen 32, padded at the end (causal attention:
        // what follows a position does not change its prediction).
        let mut tokens: Vec<u32> = ids
            .iter()
            .chain(&greedy[..logits.len() - 1])
            .copied()
            .collect();
        assert!(tokens.len() <= 32, "within seqLen");
        tokens.resize(32, 0);
        let targets = vec![0; 32];
        let pass = model.forward(&tokens, &targets);
        let probs = pass.next_token_probs();
        let mut worst = 0f64;
        for (i, row) in logits.iter().enumerate() {
            let at = ids.len() - 1 + i;
            let ours = &probs[at * vocab..(at + 1) * vocab];
            for (p, want) in ours.iter().zip(log_softmax(row)) {
                worst = worst.max((f64::from(*p).ln() - want).abs());
            }
            checked += 1;
        }
        eprintln!(
            "{:?}: worst log-probability difference {worst:.2e}",
            prompt["text"]
        );
        // transformers and the worker compute in f32 from the same
        // weights: measured 1.7-1.9e-6 for Mixtral (only the order of f32
        // sums differs); a wrong RoPE layout, norm or gate is off by O(1e-1).
        assert!(worst < 2e-5, "{:?}: {worst}", prompt["text"]);
    }
    assert!(checked >= 8, "{checked} positions checked");
}

#[test]
fn a_model_the_training_model_cannot_hold_or_a_different_shape_is_refused_naming_the_field() {
    let dir = fixture("mixtral");
    let err = load(&dir, &spec(json!({"hiddenSize": 128}))).unwrap_err();
    assert!(
        err.contains("model.hiddenSize")
            && err.contains("is 128, but the pretrained model's hidden_size is 64"),
        "{err}"
    );
    let err = load(&dir, &spec(json!({"moe": {"normalizeTopK": false}}))).unwrap_err();
    assert!(err.contains("model.moe.normalizeTopK"), "{err}");
    let err = load(&dir, &spec(json!({"moe": {"experts": 8}}))).unwrap_err();
    assert!(err.contains("model.moe.experts"), "{err}");
    // The fixture's max_position_embeddings is 256.
    let err = load(&dir, &spec(json!({"seqLen": 512}))).unwrap_err();
    assert!(
        err.contains("model.seqLen") && err.contains("at most 256 tokens"),
        "{err}"
    );
    // The fixtures of OLMoE and Qwen2-MoE have attention biases;
    // DeepSeek-V3 compresses keys and values: the training model has none
    // of them.
    for (name, lacking) in [
        ("olmoe", "attention biases"),
        ("qwen2_moe", "attention biases"),
        ("deepseek_v3_plain", "multi-head latent attention"),
    ] {
        let err = load(&fixture(name), &spec(json!({}))).unwrap_err();
        assert!(
            err.contains("model.initFrom")
                && err.contains(&format!("the training model has no {lacking}")),
            "{name}: {err}"
        );
    }
    // Qwen3's attention must be described as it is.
    let qwen3 = fixture("qwen3_moe");
    for (patch, field, words) in [
        (
            json!({"qkNorm": "whole"}),
            "model.qkNorm",
            "is whole, but the pretrained model's q/k norm (q_norm, k_norm) is perHead",
        ),
        (
            json!({"qkNorm": null}),
            "model.qkNorm",
            "is unset, but the pretrained model's q/k norm (q_norm, k_norm) is perHead",
        ),
        (
            json!({"headDim": null}),
            "model.headDim",
            "is 16, but the pretrained model's head_dim is 32",
        ),
        (
            json!({"normEpsilon": null}),
            "model.normEpsilon",
            "is 0.00001, but the pretrained model's rms_norm_eps is 0.000001",
        ),
    ] {
        let err = load(&qwen3, &qwen3_spec(patch.clone())).unwrap_err();
        assert!(err.contains(field) && err.contains(words), "{patch}: {err}");
    }
}

#[test]
fn train_starts_from_the_pretrained_weights_and_a_resumed_run_from_its_checkpoint() {
    starts_from_the_fixture_and_resumes("mixtral", mixtral_model(json!({})));
}

#[test]
fn train_starts_from_a_qwen3_moe_model_and_resumes_with_its_q_k_norms() {
    let model = serde_json::to_value(qwen3_spec(json!({}))).unwrap();
    starts_from_the_fixture_and_resumes("qwen3_moe", model);
}

fn starts_from_the_fixture_and_resumes(name: &str, model: Value) {
    let run = |dir: &Path, init: bool| -> (Value, String) {
        let mut config = config_json(dir);
        config["model"] = model.clone();
        // Text, through the pretrained model's own tokenizer (no
        // tokenizerFile: a fine-tuning job reads the model's); the random
        // run names a copy of it.
        std::fs::write(dir.join("corpus.txt"), "The quick brown fox. ".repeat(400)).unwrap();
        config["dataDir"] = dir.to_string_lossy().into();
        config["data"] = json!({"volume": {"claimName": "local", "path": "corpus.txt"},
                                "tokenizer": "huggingface"});
        if !init {
            std::fs::copy(fixture(name).join("tokenizer.json"), dir.join("tok.json")).unwrap();
            config["data"]["tokenizerFile"] = "tok.json".into();
        }
        config["training"]["steps"] = 4.into();
        config["checkpoint"]["intervalSteps"] = 2.into();
        if init {
            config["initDir"] = fixture(name).to_string_lossy().into();
        }
        let out = crate::train_binary(dir, &config);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        (serde_json::from_slice(&out.stdout).unwrap(), stderr)
    };
    let (scratch, stderr) = run(&scratch_dir(&format!("pretrained-none-{name}")), false);
    assert!(!stderr.contains("starting from the pretrained"), "{stderr}");
    let dir = scratch_dir(&format!("pretrained-init-{name}"));
    let (tuned, stderr) = run(&dir, true);
    assert!(
        stderr.contains("starting from the pretrained model's weights"),
        "{stderr}"
    );
    // The first batch's loss is the pretrained model's, not a random one's.
    assert_ne!(tuned["initialLoss"], scratch["initialLoss"]);
    let (first, last) = (
        tuned["initialLoss"].as_f64().unwrap(),
        tuned["finalLoss"].as_f64().unwrap(),
    );
    assert!(
        last < first,
        "fine-tuning lowers the loss: {first} → {last}"
    );
    // Again: it resumes from its own checkpoint, and reads no pretrained weights.
    let (_, stderr) = run(&dir, true);
    assert!(!stderr.contains("starting from the pretrained"), "{stderr}");
    assert!(stderr.contains("resuming"), "{stderr}");
}

#[test]
fn per_head_gains_map_onto_the_training_model_as_the_serving_engine_reads_them() {
    // The fixture's q/k norm gains are ones (transformers' init), which
    // hides how they are mapped: give them random values and hold the
    // training model to the serving engine, which reads them in Hugging
    // Face's RoPE layout (held to transformers with random gains by the
    // OLMoE fixture) where the training model permutes them.
    let mut rng = SplitMix64::new(5);
    let dir = edited_fixture(
        "qwen3_moe",
        |_| {},
        |name, data| {
            if name.ends_with("q_norm.weight") || name.ends_with("k_norm.weight") {
                *data = (0..data.len() / 4)
                    .flat_map(|_| (1.0 + 0.5 * rng.normal() as f32).to_le_bytes())
                    .collect();
            }
            true
        },
    );
    let worst = agrees_with_serving(&dir, &qwen3_spec(json!({})));
    eprintln!("Qwen3, random gains: worst log-probability difference {worst:.2e}");
}

#[test]
fn an_olmoe_model_maps_its_whole_projection_gains_as_serving_reads_them() {
    // OLMoE's release has neither attention biases nor clip_qkv; the
    // fixture has both (for serving's sake) and random q/k gains over the
    // whole projection. Without the two, the training model holds it.
    let dir = edited_fixture(
        "olmoe",
        |config| {
            config["attention_bias"] = false.into();
            config["clip_qkv"] = Value::Null;
        },
        |name, _| !name.ends_with(".bias"),
    );
    let spec: ModelSpec = serde_json::from_value(json!({
        "vocabSize": 330, "hiddenSize": 64, "layers": 2, "attentionHeads": 4, "kvHeads": 2,
        "qkNorm": "whole", "seqLen": 32, "ropeTheta": 10000.0,
        "moe": {"experts": 8, "topK": 2, "expertHiddenSize": 16, "router": "softmax"}
    }))
    .unwrap();
    let worst = agrees_with_serving(&dir, &spec);
    eprintln!("OLMoE: worst log-probability difference {worst:.2e}");
}

/// A copy of fixture `name` with its config.json edited by `config` and
/// each tensor's bytes by `tensor` (which drops the tensor by returning false).
fn edited_fixture(
    name: &str,
    config: impl FnOnce(&mut Value),
    mut tensor: impl FnMut(&str, &mut Vec<u8>) -> bool,
) -> PathBuf {
    use safetensors::tensor::{Dtype, TensorView};

    let dir = scratch_dir(&format!("pretrained-edited-{name}"));
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    let config_path = dir.join("config.json");
    let mut json: Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config(&mut json);
    std::fs::write(&config_path, serde_json::to_vec(&json).unwrap()).unwrap();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in tensors.tensors() {
        assert_eq!(view.dtype(), Dtype::F32, "{name}");
        let mut data = view.data().to_vec();
        if tensor(&name, &mut data) {
            owned.push((name, view.dtype(), view.shape().to_vec(), data));
        }
    }
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .map(|(name, dtype, shape, data)| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    dir
}

/// The model in `dir` loaded as `spec` against the serving engine's load of
/// it: the worst log-probability difference, which must be below 2e-5 (two
/// f32 forwards of the same weights; a gain or row in the wrong place is
/// off by O(1e-1)).
fn agrees_with_serving(dir: &Path, spec: &ModelSpec) -> f64 {
    let trained = load(dir, spec).expect("the training model holds it");
    let worst = crate::worst_against_served(&trained, dir);
    assert!(worst < 2e-5, "{}: {worst}", dir.display());
    worst
}

/// Pretraining, then fine-tuning from its checkpoint: `initDir` may name
/// one of our own checkpoints (another job's step directory) instead of a
/// Hugging Face model. The second run starts from exactly those weights
/// (at a zero learning rate its first checkpoint holds them, bit for bit)
/// but from step 0, with fresh data and optimizer state; another model
/// shape is refused naming the field that differs.
#[test]
fn train_starts_from_another_runs_checkpoint() {
    use moe_worker::checkpoint;
    use std::sync::atomic::AtomicBool;
    let pretrain = scratch_dir("init-checkpoint-pretrain");
    let mut config = config_json(&pretrain);
    config["training"]["steps"] = 3.into();
    config["model"]["moe"]["balancing"] = json!({"auxLossFree": {"enabled": false}});
    let settings =
        |c: &Value| -> moe_crds::WorkerConfig { serde_json::from_value(c.clone()).unwrap() };
    let first = moe_worker::run::train(&settings(&config), &AtomicBool::new(false)).unwrap();
    let source = first.checkpoint.expect("a final checkpoint");
    assert!(source.ends_with("step-00000003"));

    let tune = scratch_dir("init-checkpoint-tune");
    let mut tuned = config_json(&tune);
    tuned["model"] = config["model"].clone();
    tuned["model"]["initFrom"] = json!({"volume": {"claimName": "ckpt", "path": "runs"}});
    tuned["initDir"] = source.to_string_lossy().into();
    tuned["training"]["steps"] = 1.into();
    tuned["training"]["optimizer"] = json!({"learningRate": 0.0, "minLearningRate": 0.0});
    tuned["checkpoint"]["intervalSteps"] = 1.into();
    let second = moe_worker::run::train(&settings(&tuned), &AtomicBool::new(false)).unwrap();
    let started = second.checkpoint.expect("a checkpoint");
    assert!(
        started.ends_with("step-00000001"),
        "from step 0: {}",
        started.display()
    );
    let weights = |path: &Path| {
        let spec: ModelSpec = serde_json::from_value(config["model"].clone()).unwrap();
        let model = ModelConfig::from_spec(&spec).unwrap();
        let experts = 0..model.moe.n_routed_experts;
        let (_, m) = checkpoint::load_model_for_init(path, &spec, &model, experts).unwrap();
        m.tensors()
            .iter()
            .map(|t| t.values.to_vec())
            .collect::<Vec<_>>()
    };
    assert!(weights(&source) == weights(&started), "the weights moved");
    assert_ne!(second.initial_loss, None, "it trained a step of its own");

    let mut other = tuned.clone();
    other["model"]["hiddenSize"] = 48.into();
    other["checkpoint"]["dir"] = tune.join("other").to_string_lossy().into();
    let error = moe_worker::run::train(&settings(&other), &AtomicBool::new(false)).unwrap_err();
    assert!(
        error.to_string().contains("model.initFrom: checkpoint")
            && error
                .to_string()
                .contains("model.hiddenSize is 32 in the checkpoint but 48"),
        "{error}"
    );
}
