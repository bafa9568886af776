//! Shared by the `serve_*` tests: a tiny random model written as a real
//! checkpoint, a server on a loopback ephemeral port, and a minimal
//! HTTP/1.1 client (blocking, one connection per request) so the tests
//! exercise the bytes a real client sends and reads.

#![allow(dead_code)] // each test file uses a different part

pub mod lora;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use moe_crds::ModelSpec;
use moe_worker::checkpoint::{self, Snapshot};
use moe_worker::data::DataPosition;
use moe_worker::model::{Model, ModelConfig};
use moe_worker::ops::packed_linear::WeightPrecision;
use moe_worker::rng::SplitMix64;
use moe_worker::serve::{self, ServeOptions, Server};
use moe_worker::settings::OptimizerSettings;
use moe_worker::train::AdamW;
use serde_json::Value;

/// The model's context: prompts and completions share it.
pub const CONTEXT: usize = 64;

pub fn tiny_spec() -> ModelSpec {
    spec_with_context(CONTEXT)
}

/// The tiny model's shape with a longer context (for requests that must
/// still be running while a test acts).
pub fn spec_with_context(context: usize) -> ModelSpec {
    serde_json::from_value(serde_json::json!({
        "vocabSize": 256,
        "hiddenSize": 32,
        "layers": 2,
        "denseLayers": 1,
        "attentionHeads": 4,
        "kvHeads": 2,
        "seqLen": context,
        "moe": {"experts": 4, "topK": 2, "sharedExperts": 1, "expertHiddenSize": 24, "router": "sigmoid"},
    }))
    .expect("a valid model spec")
}

/// A random model with non-zero selection biases (so routing is not trivially uniform).
pub fn tiny_model(seed: u64) -> Model<f32> {
    model_for(&tiny_spec(), seed)
}

pub fn model_for(spec: &ModelSpec, seed: u64) -> Model<f32> {
    let config = ModelConfig::from_spec(spec).expect("a valid config");
    let mut model = Model::<f32>::initial(config, seed);
    let mut rng = SplitMix64::new(seed ^ 0x5eed);
    for layer in model.moe_layers_mut() {
        layer.selection_bias = rng.normal_vec(layer.selection_bias.len(), 0.1);
    }
    model
}

/// A fresh directory under the system temp dir, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("moe-serve-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create a temp dir");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `model` as the training loop would, into `dir/checkpoints/`.
pub fn write_checkpoint(dir: &Path, spec: &ModelSpec, model: &Model<f32>) -> PathBuf {
    let optimizer = optimizer(model);
    checkpoint::save(
        &dir.join("checkpoints"),
        1,
        &snapshot(spec, model, &optimizer),
    )
    .expect("save a checkpoint")
}

/// A fresh optimizer for `model` (its moments are saved with the weights).
pub fn optimizer(model: &Model<f32>) -> AdamW {
    let settings = OptimizerSettings {
        learning_rate: 1e-3,
        min_learning_rate: 1e-4,
        warmup_steps: 0,
        weight_decay: 0.0,
        beta1: 0.9,
        beta2: 0.95,
        epsilon: 1e-8,
        grad_clip: 1.0,
    };
    AdamW::new(model.config(), settings)
}

/// What a checkpoint of `model` at the start of training holds.
pub fn snapshot<'a>(
    spec: &'a ModelSpec,
    model: &'a Model<f32>,
    optimizer: &'a AdamW,
) -> Snapshot<'a> {
    Snapshot {
        model_spec: spec,
        seed: 1,
        data: DataPosition {
            sequences: 0,
            rng_state: 0,
            conversations: 0,
        },
        tokenizer: moe_crds::Tokenizer::Byte,
        tokenizer_file: None,
        initial_loss: None,
        loss: None,
        eval_loss: None,
        patience: None,
        model,
        optimizer,
        lora: None,
    }
}

pub fn options(dir: &Path) -> ServeOptions {
    ServeOptions {
        model_dir: dir.to_path_buf(),
        format: None,
        checkpoint_step: None,
        model_name: Some("tiny".into()),
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        max_batch_tokens: 256,
        max_concurrent_requests: 64,
        max_queued_requests: 256,
        kv_cache_bytes: 8 << 20,
        page_size: 16,
        threads: 1,
        weights: WeightPrecision::F32,
        expected_model: None,
        expert_parallel: 1,
        redundant_experts: 0,
        rebalance_interval: std::time::Duration::from_secs(600),
        prefix_caching: true,
        device: moe_crds::Device::Cpu,
        adapters: Vec::new(),
    }
}

/// A server for a tiny model checkpointed into `dir`, loaded through the real loader.
pub fn start_server(dir: &TempDir, options: &ServeOptions) -> Server {
    start_server_for(dir, options, &tiny_spec())
}

pub fn start_server_for(dir: &TempDir, options: &ServeOptions, spec: &ModelSpec) -> Server {
    write_checkpoint(&dir.0, spec, &model_for(spec, 11));
    let loaded = serve::load::load(&dir.0, None, None).expect("load the checkpoint");
    Server::start(loaded, options).expect("start the server")
}

/// Waits until no KV page is held (the scheduler publishes after each step).
pub fn assert_kv_pages_return(server: &Server) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.engine.kv_pages_used() != 0 {
        assert!(
            Instant::now() < deadline,
            "{} KV pages still held",
            server.engine.kv_pages_used()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A response: status, headers (lower-cased names) and the de-chunked body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// [`Self::json`] of a 200 response (the body is shown otherwise).
    pub fn ok_json(&self) -> Value {
        assert_eq!(self.status, 200, "{}", String::from_utf8_lossy(&self.body));
        self.json()
    }

    /// The `data:` payloads of a server-sent event stream.
    pub fn events(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.body)
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
            .map(str::to_owned)
            .collect()
    }
}

/// Opens a connection and sends one request (`Connection: close`).
pub fn send(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    stream
}

/// One request, its whole response.
pub fn request(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Response {
    let mut stream = send(addr, method, path, body);
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read the response");
    parse(&raw)
}

pub fn post_json(addr: SocketAddr, path: &str, body: &Value) -> Response {
    request(addr, "POST", path, body.to_string().as_bytes())
}

fn parse(raw: &[u8]) -> Response {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response head");
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Response {
        status,
        headers,
        body,
    }
}

/// Decodes `Transfer-Encoding: chunked`: `<hex size>\r\n<data>\r\n`… `0\r\n\r\n`.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = raw.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_text = String::from_utf8_lossy(&raw[..end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .expect("a chunk size");
        if size == 0 {
            return out;
        }
        let data = end + 2;
        out.extend_from_slice(&raw[data..data + size]);
        raw = &raw[data + size + 2..];
    }
}

/// The text of a streamed completion or chat completion, and its finish reason.
pub fn streamed_text(response: &Response) -> (String, Option<String>) {
    let events = response.events();
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let mut text = String::new();
    let mut finish = None;
    for event in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(event).expect("a JSON chunk");
        assert!(chunk.get("error").is_none(), "error event: {chunk}");
        let choice = &chunk["choices"][0];
        let piece = choice["text"]
            .as_str()
            .or_else(|| choice["delta"]["content"].as_str())
            .unwrap_or("");
        text.push_str(piece);
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = Some(reason.to_owned());
        }
    }
    (text, finish)
}

/// The text of a non-streamed completion or chat completion.
pub fn full_text(response: &Response) -> String {
    let json = response.ok_json();
    let choice = &json["choices"][0];
    choice["text"]
        .as_str()
        .or_else(|| choice["message"]["content"].as_str())
        .expect("a text")
        .to_owned()
}
