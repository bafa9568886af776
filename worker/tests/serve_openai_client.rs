//! A model trained by `moe-worker train` (what `moectl run --local` runs),
//! served by `moe-worker serve`, used through the OpenAI Python client the
//! way users already call OpenAI: models, completions, chat, streaming chat
//! and a 404 (worker/tests/openai-client/check.py).
//!
//! The client comes from `worker/tests/openai-client/setup.sh` (tests/run.sh
//! runs it). Without it the test fails under `CI=true` and is skipped,
//! saying so, elsewhere.

mod serve_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use moe_worker::serve::{self, Server};
use serve_support::{TempDir, options};

/// Keep in step with OPENAI_VERSION in worker/tests/openai-client/setup.sh.
const OPENAI_VERSION: &str = "3.57.0";

/// Where setup.sh installed the client, if it did.
fn client_site() -> Option<PathBuf> {
    let cache = std::env::var_os("MOE_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/moe-operator")))?;
    let site = cache.join(format!("openai-{OPENAI_VERSION}"));
    site.join(".complete").exists().then_some(site)
}

/// A few steps of a tiny model on the built-in corpus, as a local run does.
fn train(dir: &Path) {
    let config = serde_json::json!({
        "job": "local/openai-client",
        "model": {
            "hiddenSize": 32, "layers": 2, "denseLayers": 1, "denseHiddenSize": 64,
            "attentionHeads": 4, "kvHeads": 2, "seqLen": 64,
            "moe": {"experts": 4, "topK": 2, "sharedExperts": 1, "expertHiddenSize": 32}
        },
        "data": {"builtin": {"corpus": "tiny"}},
        "training": {"steps": 4, "globalBatchSize": 4, "microBatchSize": 2, "seed": 3,
                     "logIntervalSteps": 2},
        "parallelism": {},
        "checkpoint": {"dir": dir.join("checkpoints"), "intervalSteps": 4, "keep": 1, "resume": "Auto"},
        "device": "cpu",
        "outputDir": dir.join("out")
    });
    let path = dir.join("config.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_moe-worker"))
        .args(["train", "--config"])
        .arg(&path)
        .env("MOE_STATUS_ADDR", "off")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "training: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_openai_python_client_talks_to_a_locally_trained_model() {
    let Some(site) = client_site() else {
        let setup = "worker/tests/openai-client/setup.sh";
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "the OpenAI client is not installed: run {setup}"
        );
        eprintln!("skipped: the OpenAI client is not installed (run {setup})");
        return;
    };
    let dir = TempDir::new("openai-client");
    train(&dir.0);
    let loaded = serve::load::load(&dir.0, None, None).expect("load the trained run");
    let server = Server::start(loaded, &options(&dir.0)).expect("start the server");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai-client/check.py");
    let output = Command::new("python3")
        .arg(&script)
        .arg(format!("http://{}/v1", server.addr))
        .arg("tiny")
        .env("PYTHONPATH", &site)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "the OpenAI client failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&output.stdout).trim());
}
