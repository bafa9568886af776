//! Fine-tuning from a pretrained model (`model.initFrom`): the training
//! model loaded from a Hugging Face Mixtral directory (the random tiny
//! model of `tests/fixtures/hf/mixtral`, made by `generate.py`) predicts
//! what `transformers` predicts for it, token for token (its logits in
//! `golden.json`), and `moe-worker train` starts from it.

use std::path::{Path, PathBuf};
use std::process::Command;

use moe_crds::ModelSpec;
use moe_worker::model::config::ModelConfig;
use moe_worker::model::pretrained;
use serde_json::{Value, json};

use crate::{config_json, scratch_dir};

const BINARY: &str = env!("CARGO_BIN_EXE_moe-worker");

fn fixture(name: &str) -> PathBuf {
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
    let dir = fixture("mixtral");
    let golden: Value =
        serde_json::from_slice(&std::fs::read(dir.join("golden.json")).unwrap()).unwrap();
    let model = load(&dir, &spec(json!({}))).expect("the training model holds Mixtral");
    let vocab = 400;
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
        // transformers and the worker compute in f32 from the same bf16
        // weights: measured 1.7-1.9e-6 (only the order of f32 sums
        // differs); a wrong RoPE layout or gate is off by O(1e-1).
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
    // OLMoE has attention biases and normalises its queries and keys; Qwen3
    // too; DeepSeek-V3 compresses keys and values: the training model has
    // none of them.
    for (name, lacking) in [
        ("olmoe", "attention biases"),
        ("qwen3_moe", "q/k norms"),
        ("deepseek_v3_plain", "multi-head latent attention"),
    ] {
        let err = load(&fixture(name), &spec(json!({}))).unwrap_err();
        assert!(
            err.contains("model.initFrom")
                && err.contains(&format!("the training model has no {lacking}")),
            "{name}: {err}"
        );
    }
}

#[test]
fn train_starts_from_the_pretrained_weights_and_a_resumed_run_from_its_checkpoint() {
    let run = |dir: &Path, init: bool| -> (Value, String) {
        let mut config = config_json(dir);
        config["model"] = mixtral_model(json!({}));
        // Text, through the pretrained model's own tokenizer (no
        // tokenizerFile: a fine-tuning job reads the model's); the random
        // run names a copy of it.
        std::fs::write(dir.join("corpus.txt"), "The quick brown fox. ".repeat(400)).unwrap();
        config["dataDir"] = dir.to_string_lossy().into();
        config["data"] = json!({"volume": {"claimName": "local", "path": "corpus.txt"},
                                "tokenizer": "huggingface"});
        if !init {
            std::fs::copy(
                fixture("mixtral").join("tokenizer.json"),
                dir.join("tok.json"),
            )
            .unwrap();
            config["data"]["tokenizerFile"] = "tok.json".into();
        }
        config["training"]["steps"] = 4.into();
        config["checkpoint"]["intervalSteps"] = 2.into();
        if init {
            config["initDir"] = fixture("mixtral").to_string_lossy().into();
        }
        let path = dir.join("config.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        let out = Command::new(BINARY)
            .args(["train", "--config"])
            .arg(&path)
            .env("MOE_STATUS_ADDR", "off")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        (serde_json::from_slice(&out.stdout).unwrap(), stderr)
    };
    let (scratch, stderr) = run(&scratch_dir("pretrained-none"), false);
    assert!(!stderr.contains("starting from the pretrained"), "{stderr}");
    let dir = scratch_dir("pretrained-init");
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
