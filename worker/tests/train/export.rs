//! `moe-worker export`: the training model written as a Hugging Face model
//! directory. The serving engine's Hugging Face loader, held to
//! `transformers` on Mixtral, Qwen3-MoE and OLMoE by the fixtures' goldens,
//! reads each export back and must predict what the training model
//! predicts; the fine-tuning loader must get the very weights back.

use std::path::Path;
use std::process::Command;

use moe_crds::ModelSpec;
use moe_worker::model::Model;
use moe_worker::model::config::ModelConfig;
use moe_worker::model::hf_export::{self, ExportError, ExportPrecision, ExportTokenizer};
use moe_worker::model::pretrained;
use moe_worker::rng::SplitMix64;
use moe_worker::scalar::Scalar;
use serde_json::{Value, json};

use crate::{config_json, scratch_dir, worst_against_served};

const BINARY: &str = env!("CARGO_BIN_EXE_moe-worker");

/// A small softmax-routed model, `patch` merged into its spec.
fn spec(patch: Value) -> ModelSpec {
    let mut model = json!({
        "vocabSize": 300, "hiddenSize": 32, "layers": 2, "attentionHeads": 4, "kvHeads": 2,
        "seqLen": 32, "ropeTheta": 10000.0,
        "moe": {"experts": 4, "topK": 2, "expertHiddenSize": 24, "router": "softmax",
                "normalizeTopK": true}
    });
    moe_crds::fixtures::merge_patch(&mut model, &patch);
    serde_json::from_value(model).expect("a valid ModelSpec")
}

/// A random model of `spec`, its norm gains moved off 1 (so a gain in the
/// wrong place shows).
fn random_model(spec: &ModelSpec, seed: u64) -> Model<f32> {
    let config = ModelConfig::from_spec(spec).unwrap();
    let mut model = Model::<f32>::initial(config, seed);
    let mut rng = SplitMix64::new(seed);
    for block in &mut model.weights.blocks {
        for gain in [
            &mut block.attention_norm,
            &mut block.ffn_norm,
            &mut block.q_norm,
            &mut block.k_norm,
        ] {
            for g in gain.iter_mut() {
                *g = 1.0 + 0.5 * rng.normal() as f32;
            }
        }
    }
    model
}

#[test]
fn each_architecture_exports_what_the_training_model_computes() {
    for (name, patch, architecture) in [
        ("mixtral", json!({}), "MixtralForCausalLM"),
        (
            "qwen3",
            // Wide heads, a dense first layer, unnormalised gates.
            json!({"headDim": 12, "qkNorm": "perHead", "normEpsilon": 1e-6, "denseLayers": 1,
                   "denseHiddenSize": 40, "moe": {"normalizeTopK": false}}),
            "Qwen3MoeForCausalLM",
        ),
        (
            "olmoe",
            json!({"qkNorm": "whole", "moe": {"normalizeTopK": false}}),
            "OlmoeForCausalLM",
        ),
    ] {
        let spec = spec(patch);
        let model = random_model(&spec, 7);
        let out = scratch_dir(&format!("export-{name}")).join("hf");
        // A shard limit small enough to split the model over several files.
        let exported = hf_export::export(
            &model,
            ExportTokenizer::Bytes,
            &out,
            ExportPrecision::F32,
            40_000,
        )
        .unwrap();
        assert_eq!(exported.architecture.class_name(), architecture);
        assert!(
            exported.files.len() > 3
                && exported
                    .files
                    .contains(&"model.safetensors.index.json".into()),
            "{name}: {:?}",
            exported.files
        );
        let config: Value =
            serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["architectures"][0], architecture);

        let worst = worst_against_served(&model, &out);
        eprintln!("{name}: worst log-probability difference {worst:.2e}");
        // Two f32 forwards of the same weights; a row, gain or expert in
        // the wrong place is off by O(1e-1).
        assert!(worst < 2e-5, "{name}: {worst}");

        // And the fine-tuning loader gets the very weights back.
        let config = ModelConfig::from_spec(&spec).unwrap();
        let experts = 0..config.moe.n_routed_experts;
        let back = pretrained::load(&out, &spec, config, experts).unwrap();
        for (got, want) in back.tensors().iter().zip(model.tensors()) {
            assert!(
                got.name == want.name && got.values == want.values,
                "{name}: the round trip changed {}",
                want.name
            );
        }
    }
}

#[test]
fn a_bf16_export_holds_the_weights_rounded_to_nearest_even() {
    let spec = spec(json!({"headDim": 12, "qkNorm": "perHead"}));
    let model = random_model(&spec, 8);
    let out = scratch_dir("export-bf16").join("hf");
    let exported = hf_export::export(
        &model,
        ExportTokenizer::Bytes,
        &out,
        ExportPrecision::Bf16,
        5_000_000_000,
    )
    .unwrap();
    assert_eq!(
        exported.files,
        ["model.safetensors", "config.json", "tokenizer.json"]
    );
    // The byte tokenizer, written as Hugging Face's byte-level BPE
    // (read by the `tokenizers` crate): one id per byte, and back.
    let tokenizer = moe_worker::serve::load::load(&out, None, None)
        .unwrap()
        .tokenizer;
    let text = "naïve café 🙂 \t\n数字 <|im_end|>";
    let ids = tokenizer.encode(text).unwrap();
    assert_eq!(ids, text.bytes().map(u32::from).collect::<Vec<_>>());
    let bytes: Vec<u8> = ids
        .iter()
        .flat_map(|&id| tokenizer.token_bytes(id))
        .collect();
    assert_eq!(bytes, text.as_bytes());
    let config = ModelConfig::from_spec(&spec).unwrap();
    let back = pretrained::load(&out, &spec, config, 0..4).unwrap();
    let rounded: Vec<Vec<f32>> = model
        .tensors()
        .iter()
        .map(|t| t.values.iter().map(|v| v.round_bf16()).collect())
        .collect();
    let read: Vec<Vec<f32>> = back.tensors().iter().map(|t| t.values.to_vec()).collect();
    assert_eq!(read, rounded);
}

#[test]
fn what_no_architecture_computes_is_refused_naming_the_field() {
    let refused = |model: &Model<f32>| -> String {
        let out = scratch_dir("export-refused").join("hf");
        let err = hf_export::export(
            model,
            ExportTokenizer::None,
            &out,
            ExportPrecision::F32,
            1 << 30,
        )
        .unwrap_err();
        assert!(matches!(err, ExportError::Unexportable { .. }), "{err}");
        assert!(!out.exists(), "nothing is written");
        err.to_string()
    };
    for (patch, field) in [
        (json!({"moe": {"router": "sigmoid"}}), "model.moe.router"),
        (
            json!({"moe": {"sharedExperts": 1}}),
            "model.moe.sharedExperts",
        ),
        (
            json!({"moe": {"groups": 2, "topGroups": 1}}),
            "model.moe.groups",
        ),
        (
            json!({"moe": {"routedScalingFactor": 2.5}}),
            "model.moe.routedScalingFactor",
        ),
        (json!({"denseLayers": 1}), "model.denseLayers"),
        (
            json!({"moe": {"normalizeTopK": false}}),
            "model.moe.normalizeTopK",
        ),
        (json!({"qkNorm": "whole", "headDim": 16}), "model.headDim"),
    ] {
        let spec = spec(patch.clone());
        let model = random_model(&spec, 1);
        let err = refused(&model);
        assert!(err.starts_with(field), "{patch}: {err}");
    }
    // A selection bias the model was trained with.
    let spec = spec(json!({}));
    let mut model = random_model(&spec, 1);
    model.moe_layers_mut().next().unwrap().selection_bias[2] = 0.25;
    let err = refused(&model);
    assert!(
        err.starts_with("model.moe.balancing.auxLossFree")
            && err.contains("auxLossFree.enabled false"),
        "{err}"
    );
}

/// Exports the newest checkpoint under `run` from memory (the model loaded
/// whole, as serving loads it) into `to`, and checks that `exported` (what
/// `moe-worker export` wrote from the checkpoint's files) is the same,
/// file by file, byte by byte.
fn same_as_from_memory(run: &Path, exported: &Path, to: &Path) {
    let loaded = moe_worker::serve::load::load(run, None, None).unwrap();
    let model = loaded.model.native().expect("a worker checkpoint");
    let tokenizer = loaded.path.join(moe_worker::checkpoint::TOKENIZER);
    let tokenizer = if tokenizer.is_file() {
        ExportTokenizer::File(&tokenizer)
    } else {
        ExportTokenizer::Bytes
    };
    let from_memory =
        hf_export::export(model, tokenizer, to, ExportPrecision::Bf16, 5_000_000_000).unwrap();
    for file in &from_memory.files {
        assert!(
            std::fs::read(exported.join(file)).unwrap() == std::fs::read(to.join(file)).unwrap(),
            "{file} differs"
        );
    }
}

/// A run with expert parallelism checkpoints each rank's experts in a shard
/// of its own: the command reads each expert out of its shard.
#[test]
fn export_reads_each_expert_from_its_shard() {
    let dir = scratch_dir("export-sharded");
    let mut config = config_json(&dir);
    config["model"] = crate::pretrained::qwen3_model(
        json!({"moe": {"balancing": {"auxLossFree": {"enabled": false}}}}),
    );
    config["training"]["steps"] = 2.into();
    config["training"]["optimizer"]["warmupSteps"] = 1.into();
    config["checkpoint"]["intervalSteps"] = 2.into();
    config["parallelism"] = json!({"processesPerNode": 2, "expertParallel": 2});
    let out = crate::train_binary_on(&dir, &config, 2);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let checkpoint = dir.join("checkpoints").join("step-00000002");
    assert!(
        std::fs::read_dir(&checkpoint).unwrap().any(|f| f
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("experts-")),
        "an expert-sharded checkpoint"
    );
    let hf = dir.join("hf");
    let out = Command::new(BINARY)
        .args(["export", "--model"])
        .arg(dir.join("checkpoints"))
        .arg("--out")
        .arg(&hf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    same_as_from_memory(&dir.join("checkpoints"), &hf, &dir.join("hf-memory"));
}

#[test]
fn export_writes_a_fine_tuned_run_for_transformers_and_refuses_to_overwrite() {
    let dir = scratch_dir("export-cli");
    let fixture = crate::pretrained::fixture("qwen3_moe");
    let mut config = config_json(&dir);
    config["model"] = crate::pretrained::qwen3_model(
        json!({"moe": {"balancing": {"auxLossFree": {"enabled": false}}}}),
    );
    std::fs::write(dir.join("corpus.txt"), "The quick brown fox. ".repeat(400)).unwrap();
    config["dataDir"] = dir.to_string_lossy().into();
    config["data"] = json!({"volume": {"claimName": "local", "path": "corpus.txt"},
                            "tokenizer": "huggingface"});
    config["initDir"] = fixture.to_string_lossy().into();
    config["training"]["steps"] = 4.into();
    config["checkpoint"]["intervalSteps"] = 4.into();
    let out = crate::train_binary(&dir, &config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let export = |to: &Path| {
        Command::new(BINARY)
            .args(["export", "--model"])
            .arg(dir.join("checkpoints"))
            .arg("--out")
            .arg(to)
            .output()
            .unwrap()
    };
    let hf = dir.join("hf");
    let out = export(&hf);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["architecture"], "Qwen3MoeForCausalLM");
    assert_eq!(summary["step"], 4);
    // The run's tokenizer went with it, with its chat template (the
    // fine-tuned model's checkpoint kept the pretrained model's): the
    // export serves text and chats as the pretrained model did.
    let files = summary["files"].as_array().unwrap();
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        assert!(files.contains(&name.into()), "{name}: {files:?}");
    }
    let exported = moe_worker::serve::load::load(&hf, None, None)
        .unwrap()
        .tokenizer;
    let pretrained = moe_worker::serve::load::load(&fixture, None, None)
        .unwrap()
        .tokenizer;
    assert_eq!(
        exported.encode("The quick brown fox.").unwrap(),
        pretrained.encode("The quick brown fox.").unwrap()
    );
    let chat = [("user".to_owned(), "Hello!".to_owned())];
    assert_eq!(
        exported.encode_chat(&chat).unwrap(),
        pretrained.encode_chat(&chat).unwrap()
    );
    assert_ne!(
        exported.encode_chat(&chat).unwrap(),
        exported
            .encode(&moe_worker::serve::text::transcript(&chat))
            .unwrap(),
        "the chat template, not the plain transcript"
    );
    let config: Value =
        serde_json::from_slice(&std::fs::read(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");
    assert_eq!(config["head_dim"], 32);
    assert_eq!(config["rms_norm_eps"], 1e-6);
    assert_eq!(config["mlp_only_layers"], json!([0]));

    // The command reads the checkpoint's files a tensor at a time; the
    // model loaded whole and exported from memory writes the same bytes.
    same_as_from_memory(&dir.join("checkpoints"), &hf, &dir.join("hf-memory"));

    // Not over what is there.
    let again = export(&hf);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already exists"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}
