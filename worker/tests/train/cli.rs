//! The `moe-worker train` binary: config errors name the field and exit 2;
//! a run prints a JSON summary and writes metrics; SIGTERM checkpoints and exits 0.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{config_json, scratch_dir};

const BINARY: &str = env!("CARGO_BIN_EXE_moe-worker");

fn write_config(dir: &Path, config: &Value) -> std::path::PathBuf {
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_vec_pretty(config).unwrap()).unwrap();
    path
}

fn run(dir: &Path, config: &Value) -> Output {
    let path = write_config(dir, config);
    Command::new(BINARY)
        .args(["train", "--config"])
        .arg(path)
        .output()
        .unwrap()
}

/// Runs a config that must be rejected; returns its stderr.
fn rejected(name: &str, patch: impl FnOnce(&mut Value)) -> String {
    let dir = scratch_dir(name);
    let mut config = config_json(&dir);
    patch(&mut config);
    let output = run(&dir, &config);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(2), "{name}: {stderr}");
    assert!(output.stdout.is_empty(), "{name}: printed a summary");
    stderr
}

#[test]
fn unknown_fields_are_named_at_any_depth() {
    let nested = rejected("unknown-nested", |c| {
        c["model"]["moe"]["topk"] = 2.into();
        c["training"]["optimizer"]["lr"] = 0.1.into();
    });
    assert!(
        nested.contains("unknown field(s)")
            && nested.contains("model.moe.topk")
            && nested.contains("training.optimizer.lr"),
        "{nested}"
    );
    let top = rejected("unknown-top", |c| c["bogus"] = true.into());
    assert!(top.contains("unknown field `bogus`"), "{top}");
}

#[test]
fn impossible_shapes_name_the_field() {
    type Patch = fn(&mut Value);
    let cases: [(&str, Patch, &str); 5] = [
        (
            "heads",
            |c| c["model"]["hiddenSize"] = 30.into(),
            "model.hiddenSize: 30 is not divisible by model.attentionHeads 4",
        ),
        (
            "top-k",
            |c| c["model"]["moe"]["topK"] = 5.into(),
            "model.moe.topK: 5 is more than model.moe.experts 4",
        ),
        (
            "batch",
            |c| c["training"]["globalBatchSize"] = 5.into(),
            "training.globalBatchSize: 5 is not a multiple of training.microBatchSize 2",
        ),
        (
            "negative",
            |c| c["model"]["layers"] = (-1).into(),
            "model.layers: is -1, but must be at least 1",
        ),
        (
            "world",
            |c| c["parallelism"]["nodes"] = 2.into(),
            "parallelism: asks for 2 ranks (nodes 2 × processesPerNode 1), but this process was started as one of 1 (MOE_WORLD_SIZE",
        ),
    ];
    for (name, patch, expected) in cases {
        let stderr = rejected(name, patch);
        assert!(stderr.contains(expected), "{name}: {stderr}");
    }
}

/// Parallelism sizes that do not fit
/// together (key/value heads that do not split over the sequence-parallel
/// ranks), are refused naming the field, before any rank would start (the
/// process is started as a launcher of two local ranks here, which must not
/// launch anything).
#[test]
fn unimplemented_parallelism_is_refused_naming_the_field() {
    type Patch = fn(&mut Value);
    let cases: [(&str, Patch, &str); 2] = [
        (
            "sp-kv-heads",
            |c| {
                c["parallelism"]["sequenceParallel"] = 2.into();
                c["model"]["kvHeads"] = 1.into();
            },
            "model.kvHeads: is 1, but it is not divisible by parallelism.sequenceParallel 2 (attention is sharded by head",
        ),
        (
            "ep",
            |c| c["parallelism"]["expertParallel"] = 4.into(),
            "parallelism.expertParallel: is 4, but expert parallel 4 does not divide the world size 2",
        ),
    ];
    for (name, patch, expected) in cases {
        let dir = scratch_dir(&format!("parallelism-{name}"));
        let mut config = config_json(&dir);
        config["parallelism"]["processesPerNode"] = 2.into();
        patch(&mut config);
        let output = Command::new(BINARY)
            .args(["train", "--config"])
            .arg(write_config(&dir, &config))
            .env("MOE_WORLD_SIZE", "2")
            .env("MOE_PROCS_PER_NODE", "2")
            .env("MOE_COORDINATOR", "127.0.0.1:1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{name}: {stderr}");
        assert!(stderr.contains(expected), "{name}: {stderr}");
        assert!(
            !stderr.contains("launching"),
            "{name}: launched ranks: {stderr}"
        );
    }
}

/// A CPU-only worker asked for the GPU says so and names the field, before
/// looking for a driver.
#[cfg(not(feature = "cuda"))]
#[test]
fn device_cuda_on_a_cpu_only_worker_names_the_field() {
    let stderr = rejected("cuda", |c| c["device"] = "cuda".into());
    assert!(
        stderr.contains("device: is cuda, but this worker was built without CUDA (backends: cpu)"),
        "{stderr}"
    );
}

#[test]
fn an_unreadable_data_volume_is_a_clear_error() {
    let stderr = rejected("volume", |c| {
        c["data"] =
            serde_json::json!({"volume": {"claimName": "data", "path": "missing/corpus.txt"}});
        c["dataDir"] = "/nonexistent-data-dir".into();
    });
    assert!(
        stderr.contains("data.volume: cannot read /nonexistent-data-dir/missing/corpus.txt"),
        "{stderr}"
    );
}

#[test]
fn a_run_on_a_data_volume_prints_a_summary_and_writes_metrics() {
    let dir = scratch_dir("cli-run");
    let data = dir.join("data");
    std::fs::create_dir_all(data.join("b")).unwrap();
    std::fs::write(data.join("a.txt"), "the cat sat on the mat. ".repeat(40)).unwrap();
    std::fs::write(
        data.join("b").join("c.txt"),
        "a dog ran in the fog. ".repeat(40),
    )
    .unwrap();
    let mut config = config_json(&dir);
    config["data"] = serde_json::json!({"volume": {"claimName": "data", "path": ""}});
    config["dataDir"] = data.to_str().unwrap().into();
    config["training"]["steps"] = 4.into();
    let output = run(&dir, &config);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let summary: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["steps"], 4);
    for key in [
        "finalLoss",
        "initialLoss",
        "unigramEntropy",
        "tokensPerSecond",
        "wallSeconds",
    ] {
        assert!(
            summary[key].as_f64().is_some_and(f64::is_finite),
            "{key}: {summary}"
        );
    }
    assert!(
        summary["checkpoint"]
            .as_str()
            .unwrap()
            .ends_with("step-00000004")
    );

    let metrics = std::fs::read_to_string(dir.join("out").join("metrics.jsonl")).unwrap();
    let lines: Vec<Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // logIntervalSteps = 2: steps 2 and 4.
    assert_eq!(lines.len(), 2, "{metrics}");
    assert_eq!(lines[1]["step"], 4);
    for key in [
        "loss",
        "lr",
        "gradNorm",
        "tokensPerSecond",
        "expertLoadMax",
        "expertLoadMean",
        "expertLoadMaxViolation",
        "secondsPerStep",
    ] {
        assert!(lines[1][key].as_f64().is_some(), "{key}: {metrics}");
    }
    // 4 sequences of 32 tokens, top-2 of 4 experts: 64 per expert on average.
    assert_eq!(lines[1]["expertLoadMean"], 64.0);
    // Every layer has the same fair share, so the worst layer's violation
    // is the busiest expert anywhere over it.
    let max = lines[1]["expertLoadMax"].as_f64().unwrap();
    let violation = lines[1]["expertLoadMaxViolation"].as_f64().unwrap();
    assert!((violation - (max / 64.0 - 1.0)).abs() < 1e-12, "{metrics}");
}

/// llm.c's shard format: a header of 256 little-endian int32 (magic,
/// version 1 for uint16 ids, the count), then the ids.
fn llm_c_shard(ids: &[u16]) -> Vec<u8> {
    let mut header = [0i32; 256];
    header[..3].copy_from_slice(&[20240520, 1, ids.len() as i32]);
    let mut bytes: Vec<u8> = header.iter().flat_map(|h| h.to_le_bytes()).collect();
    bytes.extend(ids.iter().flat_map(|id| id.to_le_bytes()));
    bytes
}

#[test]
fn a_run_on_pre_tokenized_shards_learns_ids_past_the_bytes() {
    let dir = scratch_dir("cli-pretokenized");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    // A cycle of 12 ids, most of them beyond a byte's 256, over two shards.
    let cycle: [u16; 12] = [300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 5, 260];
    let ids: Vec<u16> = cycle.iter().copied().cycle().take(12 * 120).collect();
    let (first, second) = ids.split_at(12 * 50);
    std::fs::write(data.join("shard-000.bin"), llm_c_shard(first)).unwrap();
    std::fs::write(data.join("shard-001.bin"), llm_c_shard(second)).unwrap();
    let mut config = config_json(&dir);
    config["data"] = serde_json::json!({"volume": {"claimName": "data", "path": ""},
                                        "tokenizer": "pretokenized"});
    config["dataDir"] = data.to_str().unwrap().into();
    config["model"]["vocabSize"] = 320.into();
    config["training"]["steps"] = 30.into();
    let output = run(&dir, &config);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let summary: Value = serde_json::from_slice(&output.stdout).unwrap();
    // Twelve ids, equally frequent: the counts include those past 255.
    let entropy = summary["unigramEntropy"].as_f64().unwrap();
    assert!((entropy - 12f64.ln()).abs() < 1e-9, "{summary}");
    let (initial, last) = (
        summary["initialLoss"].as_f64().unwrap(),
        summary["finalLoss"].as_f64().unwrap(),
    );
    assert!(last < 0.5 * initial, "did not learn the cycle: {summary}");
    assert!(stderr.contains("(pre-tokenized)"), "{stderr}");
    let checkpoint = summary["checkpoint"].as_str().unwrap();
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(Path::new(checkpoint).join("manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["tokenizer"], "pretokenized");

    // A server has no tokenizer for these ids, and says so (rather than
    // serving: a server that started is stopped and fails the test).
    let mut server = Command::new(BINARY)
        .args(["serve", "--port", "0", "--model", checkpoint])
        .env("MOE_STATUS_ADDR", "off")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = server.kill();
    let served = server.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&served.stderr);
    assert!(
        served.status.code().is_some_and(|code| code != 0),
        "{stderr}"
    );
    assert!(stderr.contains("pre-tokenized data"), "{stderr}");

    // An id the model has no embedding for is refused, naming where it is.
    let refused = rejected("cli-pretokenized-vocab", |c| {
        c["data"] = config["data"].clone();
        c["dataDir"] = config["dataDir"].clone();
        c["model"]["vocabSize"] = 300.into();
    });
    assert!(
        refused.contains("token 0 is id 300, but model.vocabSize is 300"),
        "{refused}"
    );
}

/// One HTTP/1.1 request to `port` on this host; the response body, once
/// the server answers (retried while it is still starting).
fn http(port: u16, method: &str, path: &str, body: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .ok()?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).ok()?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).ok()?;
    let (status, rest) = raw.split_once("\r\n")?;
    let body = rest.split_once("\r\n\r\n")?.1;
    status.contains(" 200 ").then(|| body.to_string())
}

#[test]
fn a_run_through_a_hugging_face_tokenizer_keeps_it_for_serving() {
    let dir = scratch_dir("cli-hf-tokenizer");
    let text = dir.join("data").join("text");
    std::fs::create_dir_all(&text).unwrap();
    let documents = [
        "the cat sat on the mat. ".repeat(30),
        "a dog ran in the fog. ".repeat(30),
    ];
    for (i, document) in documents.iter().enumerate() {
        std::fs::write(text.join(format!("doc-{i}.txt")), document).unwrap();
    }
    // The tokenizer lies among the text files: it must not be read as text.
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/mixtral/tokenizer.json");
    std::fs::copy(&fixture, text.join("tokenizer.json")).unwrap();
    // Its special tokens and chat template beside it travel with it (and
    // are not text to train on).
    for companion in ["tokenizer_config.json", "chat_template.jinja"] {
        std::fs::copy(fixture.with_file_name(companion), text.join(companion)).unwrap();
    }
    let mut config = config_json(&dir);
    config["data"] = serde_json::json!({"volume": {"claimName": "data", "path": "text"},
                                        "tokenizer": "huggingface",
                                        "tokenizerFile": "text/tokenizer.json"});
    config["dataDir"] = dir.join("data").to_str().unwrap().into();
    config["model"]["vocabSize"] = 400.into();
    let output = run(&dir, &config);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");

    // The tokens are the tokenizer's, file by file with its special tokens.
    let hf = tokenizers::Tokenizer::from_file(&fixture).unwrap();
    let expected: usize = documents
        .iter()
        .map(|d| hf.encode(d.as_str(), true).unwrap().get_ids().len())
        .sum();
    assert!(
        stderr.contains(&format!("tokens={expected} ")),
        "expected {expected} tokens: {stderr}"
    );
    let summary: Value = serde_json::from_slice(&output.stdout).unwrap();
    // Tokenized side by side in a pool of 3, the same ids train the same bits.
    let pooled_dir = scratch_dir("cli-hf-tokenizer-threads");
    let mut pooled = config_json(&pooled_dir);
    pooled["data"] = config["data"].clone();
    pooled["dataDir"] = config["dataDir"].clone();
    pooled["model"]["vocabSize"] = 400.into();
    let pooled = Command::new(BINARY)
        .args(["train", "--threads", "3", "--config"])
        .arg(write_config(&pooled_dir, &pooled))
        .output()
        .unwrap();
    let pooled: Value = serde_json::from_slice(&pooled.stdout).unwrap();
    for key in ["initialLoss", "finalLoss"] {
        assert_eq!(pooled[key], summary[key], "{key}");
    }
    let checkpoint = Path::new(summary["checkpoint"].as_str().unwrap());
    assert_eq!(
        std::fs::read(checkpoint.join("tokenizer.json")).unwrap(),
        std::fs::read(&fixture).unwrap(),
        "the checkpoint keeps the tokenizer"
    );
    for companion in ["tokenizer_config.json", "chat_template.jinja"] {
        assert_eq!(
            std::fs::read(checkpoint.join(companion)).unwrap(),
            std::fs::read(fixture.with_file_name(companion)).unwrap(),
            "the checkpoint keeps {companion}"
        );
    }
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(checkpoint.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["tokenizer"], "huggingface");

    // Served from the checkpoint alone, prompts go through that tokenizer.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Command::new(BINARY)
        .args(["serve", "--host", "127.0.0.1", "--served-model-name", "m"])
        .args(["--port", &port.to_string(), "--model"])
        .arg(checkpoint)
        .env("MOE_STATUS_ADDR", "off")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let prompt = "the cat sat";
    let request = serde_json::json!({"model": "m", "prompt": prompt, "max_tokens": 2}).to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut answer = None;
    while answer.is_none() && Instant::now() < deadline {
        answer = http(port, "POST", "/v1/completions", &request);
        if answer.is_none() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // A chat goes through the template: Mixtral's, by hand, for one turn.
    let chat = serde_json::json!({"model": "m",
                                  "messages": [{"role": "user", "content": "hello there"}]});
    let chat = http(port, "POST", "/tokenize", &chat.to_string());
    let _ = server.kill();
    let _ = server.wait();
    let chat: Value = serde_json::from_str(&chat.expect("the server tokenized")).unwrap();
    let rendered = hf.encode("<s>[INST] hello there [/INST]", false).unwrap();
    assert_eq!(chat["count"], rendered.get_ids().len(), "{chat}");
    let answer: Value = serde_json::from_str(&answer.expect("the server answered")).unwrap();
    let prompt_ids = hf.encode(prompt, true).unwrap().get_ids().len();
    assert_eq!(answer["usage"]["prompt_tokens"], prompt_ids, "{answer}");
    assert_ne!(
        prompt_ids,
        prompt.len(),
        "the byte tokenizer would count the same"
    );

    // Token ids are not text: a binary file is refused, named.
    std::fs::write(text.join("ids.bin"), [0xffu8, 0xfe, 0x00, 0x01]).unwrap();
    let refused = rejected("cli-hf-tokenizer-binary", |c| {
        c["data"] = config["data"].clone();
        c["dataDir"] = config["dataDir"].clone();
        c["model"]["vocabSize"] = 400.into();
    });
    assert!(refused.contains("ids.bin is not UTF-8 text"), "{refused}");
}

#[test]
fn sigterm_checkpoints_and_exits_zero() {
    let dir = scratch_dir("sigterm");
    let mut config = config_json(&dir);
    config["training"]["steps"] = 100_000.into();
    config["training"]["logIntervalSteps"] = 1.into();
    config["checkpoint"]["intervalSteps"] = 100_000.into();
    let path = write_config(&dir, &config);
    let child = Command::new(BINARY)
        .args(["train", "--config"])
        .arg(path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let metrics = dir.join("out").join("metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&metrics).is_ok_and(|m| m.lines().count() >= 2) {
        assert!(
            Instant::now() < deadline,
            "no training progress within 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let stopped_at = Instant::now();
    let output = child.wait_with_output().unwrap();
    assert!(
        stopped_at.elapsed() < Duration::from_secs(10),
        "slow to stop"
    );
    assert!(output.status.success(), "{:?}", output.status);
    let summary: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["interrupted"], true);
    let steps = summary["steps"].as_u64().unwrap();
    assert!(steps >= 2);
    let expected = format!("step-{steps:08}");
    assert!(
        summary["checkpoint"].as_str().unwrap().ends_with(&expected),
        "{summary}"
    );
    assert!(
        dir.join("checkpoints")
            .join(expected)
            .join("manifest.json")
            .is_file()
    );
}

#[test]
fn rank_0_serves_its_progress_while_training() {
    use std::io::{Read, Write};
    let dir = scratch_dir("status");
    let mut config = config_json(&dir);
    config["training"]["steps"] = 100_000.into();
    // No step is logged: the report still moves every step (the
    // operator's hang watchdog reads it).
    config["training"]["logIntervalSteps"] = 100_000.into();
    config["checkpoint"]["intervalSteps"] = 100_000.into();
    let path = write_config(&dir, &config);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(BINARY)
        .args(["train", "--config"])
        .arg(path)
        .env("MOE_NODE_RANK", "0")
        .env("MOE_STATUS_ADDR", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let get = |path: &str| -> Option<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out.split("\r\n\r\n").nth(1)?.to_string())
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let progress = loop {
        let p: Option<Value> = get("/progress").and_then(|b| serde_json::from_str(&b).ok());
        if let Some(p) = p.filter(|p| p["step"].as_u64().unwrap_or(0) >= 2) {
            break p;
        }
        assert!(Instant::now() < deadline, "no progress served within 60 s");
        std::thread::sleep(Duration::from_millis(100));
    };
    let metrics = get("/metrics").unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(progress["totalSteps"], 100_000, "{progress}");
    assert!(
        progress["loss"].as_f64().is_some_and(f64::is_finite),
        "{progress}"
    );
    assert!(metrics.contains("moe_worker_step "), "{metrics}");
    // The test model's one MoE layer is decoder layer 1 (after a dense one).
    let worst = &progress["expertLoad"];
    assert!(
        worst["maxViolation"].as_f64().is_some_and(|v| v >= 0.0) && worst["layer"] == 1,
        "{progress}"
    );
    assert!(
        metrics.contains(r#"moe_worker_expert_load_max_violation{layer="1"}"#),
        "{metrics}"
    );
}

/// `--threads` runs training inside a thread pool (the large GEMMs split
/// across it, `ops::packed_gemm`): the same summary and the same logged
/// losses as one thread, to the bit; a count of 0 is refused by the flag
/// parser before anything starts. The dense MLP is widened so that its
/// GEMMs (128 tokens × 256 × 1024: 33.5M multiply-adds, twice the split
/// threshold) do split in two; the test config's own are too small to.
#[test]
fn threads_change_nothing_but_the_speed() {
    let mut summaries = Vec::new();
    for threads in ["1", "3"] {
        let dir = scratch_dir(&format!("threads-{threads}"));
        let mut config = config_json(&dir);
        config["model"]["hiddenSize"] = 256.into();
        config["model"]["denseHiddenSize"] = 1024.into();
        config["model"]["seqLen"] = 64.into();
        config["training"]["steps"] = 3.into();
        config["training"]["logIntervalSteps"] = 1.into();
        let path = write_config(&dir, &config);
        let output = Command::new(BINARY)
            .args(["train", "--threads", threads, "--config"])
            .arg(path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "--threads {threads}: {stderr}");
        let summary: Value = serde_json::from_slice(&output.stdout).expect("a JSON summary");
        let losses: Vec<u64> = crate::logged_steps(&dir)
            .into_iter()
            .map(|(_, loss)| loss.to_bits())
            .collect();
        assert!(!losses.is_empty(), "--threads {threads}: no metrics logged");
        summaries.push((summary["finalLoss"].as_f64().map(f64::to_bits), losses));
    }
    assert_eq!(summaries[0], summaries[1]);
    let refused = Command::new(BINARY)
        .args(["train", "--threads", "0", "--config", "/nonexistent"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--threads"));
}

/// `moe-worker hold` (an elastic job's spare pods): it runs until stopped,
/// then exits 0, as a pod's container must to leave when deleted.
#[test]
fn hold_runs_until_stopped_and_exits_zero() {
    let mut child = Command::new(BINARY)
        .arg("hold")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(child.try_wait().unwrap().is_none(), "it held");
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: kill(2) reads no memory; the child is not reaped yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "still holding 5 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
}
