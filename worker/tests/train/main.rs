//! Tests of the whole model, training, checkpoints and the `moe-worker` binary.

mod activation_checkpointing;
mod checkpoints;
mod cli;
mod data_parallel;
#[path = "../dist_support/mod.rs"]
mod dist_support;
mod elastic;
mod evaluation;
mod export;
mod gradients;
mod learning;
mod lora;
mod precision;
mod pretrained;
mod sequences;
mod sft;
mod sigkill;

use std::path::{Path, PathBuf};

use moe_crds::WorkerConfig;
use serde_json::{Value, json};

/// A worker config as JSON: a small model on the built-in corpus, with
/// checkpoints and outputs under `dir`. Tests patch fields of the returned value.
fn config_json(dir: &Path) -> Value {
    json!({
        "job": "local/test",
        "model": {
            "hiddenSize": 32, "layers": 2, "denseLayers": 1, "denseHiddenSize": 64,
            "attentionHeads": 4, "kvHeads": 2, "seqLen": 32,
            "moe": {"experts": 4, "topK": 2, "sharedExperts": 1, "expertHiddenSize": 32,
                    "router": "sigmoid", "groups": 2, "topGroups": 2,
                    "balancing": {"auxLossFree": {"enabled": true, "biasUpdateRate": 0.01},
                                  "sequenceAuxLossCoef": 0.001}}
        },
        "data": {"builtin": {"corpus": "tiny"}},
        "training": {
            "steps": 6, "globalBatchSize": 4, "microBatchSize": 2, "seed": 7, "logIntervalSteps": 2,
            "optimizer": {"learningRate": 0.01, "minLearningRate": 0.001, "warmupSteps": 2}
        },
        "parallelism": {},
        "checkpoint": {"dir": dir.join("checkpoints"), "intervalSteps": 3, "keep": 2, "resume": "Auto"},
        "device": "cpu",
        "outputDir": dir.join("out")
    })
}

fn worker_config(value: &Value) -> WorkerConfig {
    serde_json::from_value(value.clone()).expect("test configs are valid WorkerConfigs")
}

/// A fresh, empty directory for one test under Cargo's per-target scratch space.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("train-tests")
        .join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).expect("scratch directory is removable");
    }
    std::fs::create_dir_all(&dir).expect("scratch directory is creatable");
    dir
}

/// Each `metrics.jsonl` line of the run writing into `dir` as (step, loss), in file order.
fn logged_steps(dir: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(dir.join("out").join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

/// A checkpoint's state file, byte for byte.
fn state(checkpoint: &Path) -> Vec<u8> {
    std::fs::read(checkpoint.join("state.safetensors")).unwrap()
}

/// The worst log-probability difference between `model` and the serving
/// engine's load of the Hugging Face directory `dir`, on random tokens.
pub(crate) fn worst_against_served(model: &moe_worker::model::Model<f32>, dir: &Path) -> f64 {
    use moe_worker::serve::engine::{Chunk, Engine, Logits};
    use moe_worker::serve::kv_cache::{KvStore, pages_for};

    let vocab = model.config().vocab;
    let mut rng = moe_worker::rng::SplitMix64::new(3);
    let tokens: Vec<u32> = (0..32).map(|_| rng.below(vocab) as u32).collect();
    let pass = model.forward(&tokens, &tokens);
    let served = moe_worker::serve::load::load(dir, None, None).unwrap();
    let engine = Engine::serve(served.model.into_serve_model());
    let pages: Vec<u32> = (0..pages_for(tokens.len(), 16) as u32).collect();
    let mut store = KvStore::new(engine.kv_shape(16), pages.len());
    let chunk = Chunk {
        pages: &pages,
        start: 0,
        tokens: &tokens,
        logits: Logits::All,
        adapter: None,
    };
    let logits = engine.step(&mut store, &[chunk]).unwrap();
    let mut worst = 0f64;
    for (at, row) in logits.chunks_exact(vocab).enumerate() {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l)) as f64;
        let sum: f64 = row.iter().map(|&l| (l as f64 - max).exp()).sum();
        let ours = &pass.next_token_probs()[at * vocab..(at + 1) * vocab];
        for (p, &l) in ours.iter().zip(row) {
            let want = l as f64 - max - sum.ln();
            worst = worst.max((f64::from(*p).ln() - want).abs());
        }
    }
    worst
}

/// `moe-worker train` on `config`, written to `dir/config.json` (the
/// status endpoint off): how it exited.
pub(crate) fn train_binary(dir: &Path, config: &Value) -> std::process::Output {
    train_binary_on(dir, config, 1)
}

/// [`train_binary`] as a pod of `ranks` local ranks (`config` must say as
/// many `processesPerNode`) runs it: the launcher and its ranks.
pub(crate) fn train_binary_on(dir: &Path, config: &Value, ranks: usize) -> std::process::Output {
    train_binary_with(dir, config, ranks, &[])
}

/// [`train_binary_on`] with `env` set too.
pub(crate) fn train_binary_with(
    dir: &Path,
    config: &Value,
    ranks: usize,
    env: &[(&str, &str)],
) -> std::process::Output {
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_vec_pretty(config).unwrap()).unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_moe-worker"));
    command
        .args(["train", "--config"])
        .arg(&path)
        .env("MOE_STATUS_ADDR", "off")
        .envs(env.iter().copied());
    if ranks > 1 {
        let port = moe_worker::dist::launch::free_local_port().unwrap();
        command
            .env("MOE_WORLD_SIZE", ranks.to_string())
            .env("MOE_PROCS_PER_NODE", ranks.to_string())
            .env("MOE_NODE_RANK", "0")
            .env("MOE_COORDINATOR", format!("127.0.0.1:{port}"));
    }
    command.output().unwrap()
}
