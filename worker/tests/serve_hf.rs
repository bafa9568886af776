//! Hugging Face MoE models served exactly as `transformers` runs them.
//!
//! `tests/fixtures/hf/` holds tiny random-weight Mixtral-, Qwen2-MoE-,
//! Qwen3-MoE-, DeepSeek-V3- and OLMoE-style models (one of them block-scaled FP8) in
//! Hugging Face format and what `transformers`
//! computes from them (`golden.json`), written by `generate.py` there. Each
//! is loaded with the serving loader and must give, for every prompt:
//! the same token ids, the same greedy tokens, logits within
//! [`LOGIT_TOLERANCE`] at every step (a prefill, then one-token decodes from
//! the KV cache), and the chat template's exact text and ids.

mod serve_support;

use std::path::{Path, PathBuf};

use moe_crds::ModelFormat;
use moe_worker::serve::engine::{Chunk, Engine, Logits};
use moe_worker::serve::kv_cache::{KvStore, pages_for};
use moe_worker::serve::load::{self, Detected, LoadError, LoadedModel};
use moe_worker::serve::text::{TextAssembler, Tokenizer};
use moe_worker::serve::{ServeOptions, Server};
use serde::Deserialize;
use serve_support::{TempDir, full_text, post_json};

/// Largest difference allowed between a logit and `transformers`'. Both
/// compute in f32 from the same weights, in different orders: the
/// differences measured are ~1e-6 (printed by the test).
const LOGIT_TOLERANCE: f32 = 1e-4;
const GOLDEN_FORMAT: &str = "moe-worker-hf-golden";
const GOLDEN_VERSION: u32 = 1;
const PAGE_SIZE: usize = 16;

#[derive(Deserialize)]
struct Golden {
    format: String,
    version: u32,
    transformers: String,
    prompts: Vec<GoldenPrompt>,
    chat: GoldenChat,
}

#[derive(Deserialize)]
struct GoldenPrompt {
    text: String,
    ids: Vec<u32>,
    greedy: Vec<u32>,
    logits: Vec<Vec<f32>>,
    completion: String,
}

#[derive(Deserialize)]
struct GoldenChat {
    messages: Vec<Message>,
    rendered: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: String,
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

fn golden(dir: &Path) -> Golden {
    let path = dir.join("golden.json");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let golden: Golden = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "{} is stale or corrupt ({e}); re-run tests/fixtures/hf/generate.py",
            path.display()
        )
    });
    assert!(
        golden.format == GOLDEN_FORMAT && golden.version == GOLDEN_VERSION,
        "{} is {} v{}, expected {GOLDEN_FORMAT} v{GOLDEN_VERSION}; re-run tests/fixtures/hf/generate.py",
        path.display(),
        golden.format,
        golden.version
    );
    golden
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy decoding on the engine: the prompt prefilled in one chunk, then
/// one token per step; returns each step's logits.
fn greedy(engine: &Engine, prompt: &[u32], steps: usize) -> Vec<Vec<f32>> {
    let total = prompt.len() + steps;
    let pages: Vec<u32> = (0..pages_for(total, PAGE_SIZE) as u32).collect();
    let mut store = KvStore::new(engine.kv_shape(PAGE_SIZE), pages.len());
    let mut tokens = prompt.to_vec();
    let mut all = Vec::new();
    let mut start = 0;
    for _ in 0..steps {
        let chunk = Chunk {
            pages: &pages,
            start,
            tokens: &tokens[start..],
            logits: Logits::Last,
            adapter: None,
        };
        let logits = engine.step(&mut store, &[chunk]).expect("a valid step");
        start = tokens.len();
        tokens.push(argmax(&logits));
        all.push(logits);
    }
    all
}

/// Checks one fixture against its golden file; returns the largest logit difference.
fn check_fixture(name: &str) -> f32 {
    let dir = fixture(name);
    let golden = golden(&dir);
    assert_eq!(
        load::detect(&dir, None, None).unwrap(),
        Detected::HuggingFace(dir.clone())
    );
    let LoadedModel {
        model, tokenizer, ..
    } = load::load(&dir, None, None).unwrap_or_else(|e| panic!("{name}: {e}"));
    let engine = Engine::serve(model.into_serve_model());
    let mut worst = 0.0f32;
    for prompt in &golden.prompts {
        let what = format!("{name}, prompt {:?}", prompt.text);
        assert_eq!(
            tokenizer.encode(&prompt.text).unwrap(),
            prompt.ids,
            "{what}: token ids"
        );
        let logits = greedy(&engine, &prompt.ids, prompt.greedy.len());
        for (step, (ours, theirs)) in logits.iter().zip(&prompt.logits).enumerate() {
            assert_eq!(ours.len(), theirs.len(), "{what}: vocabulary");
            let diff = ours
                .iter()
                .zip(theirs)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            worst = worst.max(diff);
            assert!(
                diff <= LOGIT_TOLERANCE,
                "{what}: step {step}: logits differ by {diff:e} (> {LOGIT_TOLERANCE:e})"
            );
            assert_eq!(
                argmax(ours),
                prompt.greedy[step],
                "{what}: greedy token of step {step}"
            );
        }
        // The streamed text: token bytes joined, special tokens silent.
        let mut text = TextAssembler::new(Vec::new());
        let mut completion = String::new();
        for &token in &prompt.greedy {
            completion.push_str(&text.push(&tokenizer.token_bytes(token)).text);
        }
        completion.push_str(&text.finish());
        assert_eq!(completion, prompt.completion, "{what}: completion text");
    }
    // The chat template, as apply_chat_template(add_generation_prompt=True).
    let messages: Vec<(String, String)> = golden
        .chat
        .messages
        .iter()
        .map(|m| (m.role.clone(), m.content.clone()))
        .collect();
    let Tokenizer::HuggingFace(hf) = &tokenizer else {
        panic!("{name}: not a Hugging Face tokenizer");
    };
    assert_eq!(
        hf.render_chat(&messages).unwrap(),
        golden.chat.rendered,
        "{name}: chat template"
    );
    assert_eq!(
        tokenizer.encode_chat(&messages).unwrap(),
        golden.chat.ids,
        "{name}: chat ids"
    );
    println!(
        "{name}: largest logit difference from transformers {} is {worst:e}",
        golden.transformers
    );
    worst
}

#[test]
fn mixtral_matches_transformers() {
    check_fixture("mixtral");
}

#[test]
fn qwen2_moe_matches_transformers() {
    check_fixture("qwen2_moe");
}

#[test]
fn qwen3_moe_matches_transformers() {
    check_fixture("qwen3_moe");
}

/// Multi-head latent attention with a low-rank query, YaRN with both
/// mscales, interleaved RoPE, sigmoid group-limited routing with a
/// selection bias, a dense first layer and an ungated shared expert.
#[test]
fn deepseek_v3_matches_transformers() {
    check_fixture("deepseek_v3");
    // The cache holds the latent: kv_lora_rank + qk_rope_head_dim values
    // per token and layer, no values.
    let loaded = load::load(&fixture("deepseek_v3"), None, None).unwrap();
    let engine = Engine::serve(loaded.model.into_serve_model());
    let shape = engine.kv_shape(PAGE_SIZE);
    assert_eq!((shape.key_width, shape.value_width), (32 + 8, 0));
    assert_eq!(shape.page_bytes(), 3 * PAGE_SIZE * (32 + 8) * 4);
}

/// DeepSeek-V3 with a full-rank `q_proj`, plain RoPE in halves and no
/// expert groups.
#[test]
fn deepseek_v3_without_q_lora_matches_transformers() {
    check_fixture("deepseek_v3_plain");
}

/// DeepSeek's released FP8 format: `F8_E4M3` projections with per-block
/// `weight_scale_inv` (16 × 16 blocks, partial at the edges), sharded;
/// dequantized at load, they must give what `transformers` computes with
/// the weights torch dequantized.
#[test]
fn deepseek_v3_fp8_matches_transformers_on_the_dequantized_weights() {
    check_fixture("deepseek_v3_fp8");
}

/// OLMoE: q_norm / k_norm over the whole q and k projections (random
/// gains, so a per-head norm would differ), `clip_qkv` 1.5 clamping some of
/// q, k and v, grouped-query attention, softmax top-2 of 8 without
/// renormalising, q/k/v/o biases, tied embeddings, F32 weights.
#[test]
fn olmoe_matches_transformers() {
    check_fixture("olmoe");
}

/// A copy of a fixture, to break.
fn copy_fixture(name: &str, into: &TempDir) -> PathBuf {
    let dir = into.0.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    dir
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
}

fn load_error(dir: &Path) -> String {
    match load::load(dir, None, None) {
        Err(e @ LoadError::HuggingFace(_)) => e.to_string(),
        Err(e) => panic!("not a Hugging Face error: {e}"),
        Ok(_) => panic!("{} loaded", dir.display()),
    }
}

#[test]
fn what_cannot_be_served_is_named() {
    let tmp = TempDir::new("hf-errors");
    let dir = copy_fixture("mixtral", &tmp);
    edit_config(&dir, |c| {
        c["architectures"] = serde_json::json!(["DbrxForCausalLM"])
    });
    let message = load_error(&dir);
    assert!(
        message.contains("DbrxForCausalLM") && message.contains("MixtralForCausalLM"),
        "{message}"
    );

    // A config implying a third layer: its tensors are named as missing.
    let dir = copy_fixture("qwen2_moe", &tmp);
    edit_config(&dir, |c| c["num_hidden_layers"] = serde_json::json!(3));
    let message = load_error(&dir);
    assert!(
        message.contains("model.layers.2.self_attn.q_proj.weight") && message.contains("more"),
        "{message}"
    );

    let dir = copy_fixture("qwen3_moe", &tmp);
    edit_config(&dir, |c| {
        c["rope_parameters"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0})
    });
    assert!(load_error(&dir).contains("yarn"));

    // OLMoE's norms are sized by hidden_size: any other head_dim is refused
    // by name; clip_qkv is clipped only where transformers does (OLMoE).
    let dir = copy_fixture("olmoe", &tmp);
    edit_config(&dir, |c| c["head_dim"] = serde_json::json!(32));
    assert!(load_error(&dir).contains("head_dim 32"));
    edit_config(&dir, |c| {
        c.as_object_mut().unwrap().remove("head_dim");
        c["clip_qkv"] = serde_json::json!(-1.0)
    });
    assert!(load_error(&dir).contains("clip_qkv is -1"));
    let dir = copy_fixture("mixtral", &tmp);
    edit_config(&dir, |c| c["clip_qkv"] = serde_json::json!(8.0));
    assert!(load_error(&dir).contains("clip_qkv"));

    // FP8 weights need the config's block size; other quantization is named.
    let dir = copy_fixture("deepseek_v3_fp8", &tmp);
    edit_config(&dir, |c| {
        c.as_object_mut().unwrap().remove("quantization_config");
    });
    let message = load_error(&dir);
    assert!(
        message.contains("F8_E4M3") && message.contains("no quantization_config"),
        "{message}"
    );
    edit_config(&dir, |c| {
        c["quantization_config"] = serde_json::json!({"quant_method": "awq", "bits": 4})
    });
    assert!(load_error(&dir).contains("quant_method is \"awq\""));

    // The format can be forced: a Hugging Face directory is no worker checkpoint.
    let message = load::load(&fixture("mixtral"), Some(ModelFormat::Native), None)
        .unwrap_err()
        .to_string();
    assert!(message.contains("holds no model"), "{message}");
    assert!(load::load(&fixture("mixtral"), Some(ModelFormat::Huggingface), None).is_ok());
}

#[test]
fn a_hugging_face_model_answers_over_http() {
    let dir = fixture("qwen2_moe");
    let golden = golden(&dir);
    let options = ServeOptions {
        model_name: Some("qwen".into()),
        ..serve_support::options(&dir)
    };
    let server = Server::start(load::load(&dir, None, None).unwrap(), &options).unwrap();
    let prompt = &golden.prompts[0];
    let body = serde_json::json!({
        "model": "qwen", "prompt": prompt.text, "max_tokens": prompt.greedy.len(),
        "temperature": 0,
    });
    let response = post_json(server.addr, "/v1/completions", &body);
    let json = response.ok_json();
    assert_eq!(json["usage"]["prompt_tokens"], prompt.ids.len());
    assert_eq!(full_text(&response), prompt.completion);

    // `/tokenize` gives transformers' ids: the prompt's, and the chat
    // template's (`apply_chat_template`); `/detokenize` the text back.
    let tokens = post_json(
        server.addr,
        "/tokenize",
        &serde_json::json!({"prompt": prompt.text}),
    )
    .ok_json();
    assert_eq!(tokens["tokens"], serde_json::json!(prompt.ids));
    let messages: Vec<serde_json::Value> = golden
        .chat
        .messages
        .iter()
        .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
        .collect();
    let chat = post_json(
        server.addr,
        "/tokenize",
        &serde_json::json!({"messages": messages}),
    )
    .ok_json();
    assert_eq!(chat["tokens"], serde_json::json!(golden.chat.ids));
    let text = post_json(
        server.addr,
        "/detokenize",
        &serde_json::json!({"tokens": prompt.greedy}),
    )
    .ok_json();
    assert_eq!(text["prompt"], prompt.completion);

    // A chat: the template's prompt; the reply ends at an end-of-sequence
    // token or at max_tokens.
    let body = serde_json::json!({
        "model": "qwen", "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": 4, "temperature": 0,
    });
    post_json(server.addr, "/v1/chat/completions", &body).ok_json();
}

/// `log_softmax(logits)` in f64: the reference the served log-probabilities
/// are checked against, from `transformers`' logits.
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &l| m.max(f64::from(l)));
    let sum: f64 = logits.iter().map(|&l| (f64::from(l) - max).exp()).sum();
    logits
        .iter()
        .map(|&l| f64::from(l) - max - sum.ln())
        .collect()
}

/// Fixture `name`'s golden file, a server of it (the model named `name`)
/// and its tokenizer.
fn serve_fixture(name: &str) -> (Golden, Server, Tokenizer) {
    let dir = fixture(name);
    let options = ServeOptions {
        model_name: Some(name.into()),
        ..serve_support::options(&dir)
    };
    let loaded = load::load(&dir, None, None).unwrap();
    let tokenizer = loaded.tokenizer.clone();
    let server = Server::start(loaded, &options).unwrap();
    (golden(&dir), server, tokenizer)
}

/// The largest difference between a `top_logprobs` entry (text →
/// log-probability) and `reference`'s `top` likeliest tokens, which it
/// must hold exactly (tokens with the same text share a key, the
/// likelier's).
fn alternatives_error(
    alternatives: &serde_json::Map<String, serde_json::Value>,
    reference: &[f64],
    top: usize,
    text_of: &dyn Fn(u32) -> String,
) -> f64 {
    let mut order: Vec<usize> = (0..reference.len()).collect();
    order.sort_by(|&a, &b| reference[b].total_cmp(&reference[a]));
    let mut seen = Vec::new();
    let mut worst = 0.0f64;
    for &id in &order[..top] {
        let text = text_of(id as u32);
        if !seen.contains(&text) {
            let value = alternatives[&text].as_f64().unwrap();
            worst = worst.max((value - reference[id]).abs());
            seen.push(text);
        }
    }
    assert_eq!(alternatives.len(), seen.len());
    worst
}

#[test]
fn logprobs_are_the_log_softmax_of_the_transformers_logits() {
    let (golden, server, tokenizer) = serve_fixture("mixtral");
    let text_of = |id: u32| String::from_utf8_lossy(&tokenizer.token_bytes(id)).into_owned();
    let mut worst = 0.0f64;
    for prompt in &golden.prompts {
        let top = 3;
        let body = serde_json::json!({
            "model": "mixtral", "prompt": prompt.ids, "max_tokens": prompt.greedy.len(),
            "temperature": 0, "logprobs": top,
        });
        let response = post_json(server.addr, "/v1/completions", &body);
        let json = response.ok_json();
        let logprobs = &json["choices"][0]["logprobs"];
        let token_logprobs = logprobs["token_logprobs"].as_array().unwrap();
        assert_eq!(token_logprobs.len(), prompt.greedy.len());
        for (step, (&token, logits)) in prompt.greedy.iter().zip(&prompt.logits).enumerate() {
            let reference = log_softmax(logits);
            let got = token_logprobs[step].as_f64().unwrap();
            worst = worst.max((got - reference[token as usize]).abs());
            // The alternatives: transformers' `top` likeliest.
            let alternatives = logprobs["top_logprobs"][step].as_object().unwrap();
            worst = worst.max(alternatives_error(alternatives, &reference, top, &text_of));
            assert_eq!(logprobs["tokens"][step], text_of(token));
        }
        // Streamed, the same tokens and values arrive spread over the chunks.
        let body = serde_json::json!({
            "model": "mixtral", "prompt": prompt.ids, "max_tokens": prompt.greedy.len(),
            "temperature": 0, "logprobs": top, "stream": true,
        });
        let streamed: Vec<serde_json::Value> = post_json(server.addr, "/v1/completions", &body)
            .events()
            .iter()
            .filter(|e| *e != "[DONE]")
            .filter_map(|e| {
                let chunk: serde_json::Value = serde_json::from_str(e).unwrap();
                let logprobs = chunk["choices"][0]["logprobs"].clone();
                (!logprobs.is_null()).then_some(logprobs)
            })
            .collect();
        let streamed_values: Vec<&serde_json::Value> = streamed
            .iter()
            .flat_map(|l| l["token_logprobs"].as_array().unwrap())
            .collect();
        assert_eq!(streamed_values, token_logprobs.iter().collect::<Vec<_>>());
        let offsets: Vec<&serde_json::Value> = streamed
            .iter()
            .flat_map(|l| l["text_offset"].as_array().unwrap())
            .collect();
        assert_eq!(
            offsets,
            logprobs["text_offset"]
                .as_array()
                .unwrap()
                .iter()
                .collect::<Vec<_>>()
        );
    }
    eprintln!("largest log-probability difference from transformers: {worst:e}");
    assert!(worst < 1e-4, "{worst}");

    // Chat: a `content` entry per token, each with its bytes and alternatives.
    let body = serde_json::json!({
        "model": "mixtral", "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": 3, "temperature": 0, "logprobs": true, "top_logprobs": 2,
    });
    let response = post_json(server.addr, "/v1/chat/completions", &body);
    let json = response.ok_json();
    let content = json["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert!(!content.is_empty() && content.len() <= 3);
    for entry in content {
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        // Greedy: the chosen token is the likeliest.
        assert_eq!(top[0]["logprob"], entry["logprob"]);
        assert!(entry["bytes"].is_array());
    }
}

/// `echo` with `logprobs` scores the prompt, as evaluation harnesses ask
/// (lm-evaluation-harness: token ids, a batch of prompts, `max_tokens` 0
/// or 1): each golden prompt followed by its greedy tokens is sent as the
/// prompt, and the log-probability of greedy token `j` given what precedes
/// it is `transformers`' `log_softmax(logits[j])` at that token.
#[test]
fn prompt_logprobs_are_the_log_softmax_of_the_transformers_logits() {
    let (golden, server, tokenizer) = serve_fixture("mixtral");
    let text_of = |id: u32| String::from_utf8_lossy(&tokenizer.token_bytes(id)).into_owned();
    let top = 3;
    // Each prompt with its greedy tokens but the last (scored, not generated).
    let scored: Vec<Vec<u32>> = golden
        .prompts
        .iter()
        .map(|p| [&p.ids[..], &p.greedy[..p.greedy.len() - 1]].concat())
        .collect();
    let score = |prompts: serde_json::Value, max_tokens: usize, stream: bool| {
        let body = serde_json::json!({
            "model": "mixtral", "prompt": prompts, "echo": true, "logprobs": top,
            "max_tokens": max_tokens, "temperature": 0, "stream": stream,
        });
        post_json(server.addr, "/v1/completions", &body)
    };
    let mut worst = 0.0f64;
    let mut alone = Vec::new();
    for (prompt, full) in golden.prompts.iter().zip(&scored) {
        // Twice: the second finds the prompt's pages cached and must still
        // compute every row (cached rows have no logits).
        for _ in 0..2 {
            let json = score(serde_json::json!(full), 0, false).ok_json();
            let choice = &json["choices"][0];
            assert_eq!(choice["finish_reason"], "length");
            assert_eq!(json["usage"]["completion_tokens"], 0);
            assert_eq!(json["usage"]["prompt_tokens"], full.len());
            assert_eq!(json["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
            let expected_text: String = full.iter().map(|&id| text_of(id)).collect();
            assert_eq!(choice["text"], expected_text);
            let logprobs = &choice["logprobs"];
            let values = logprobs["token_logprobs"].as_array().unwrap();
            assert_eq!(values.len(), full.len());
            assert!(values[0].is_null() && logprobs["top_logprobs"][0].is_null());
            for (t, &id) in full.iter().enumerate() {
                assert_eq!(logprobs["tokens"][t], text_of(id), "token {t}");
            }
            for (t, value) in values.iter().enumerate().skip(1) {
                let v = value.as_f64().unwrap();
                assert!(v <= 0.0 && v.is_finite(), "token {t}: {v}");
            }
            for (j, logits) in prompt.logits[..prompt.greedy.len() - 1].iter().enumerate() {
                let at = prompt.ids.len() + j;
                let reference = log_softmax(logits);
                let got = values[at].as_f64().unwrap();
                worst = worst.max((got - reference[prompt.greedy[j] as usize]).abs());
                let alternatives = logprobs["top_logprobs"][at].as_object().unwrap();
                worst = worst.max(alternatives_error(alternatives, &reference, top, &text_of));
                // Greedy tokens: the chosen one is the likeliest (the
                // harness's `is_greedy`).
                let best = alternatives
                    .values()
                    .map(|v| v.as_f64().unwrap())
                    .fold(f64::NEG_INFINITY, f64::max);
                assert_eq!(got, best, "token {at}");
            }
            alone.push(logprobs.clone());
        }
    }
    eprintln!("largest prompt log-probability difference from transformers: {worst:e}");
    assert!(worst < 1e-4, "{worst}");

    // The harness's shape: every prompt in one request, as token lists,
    // max_tokens 1 (the last entry, the generated token, is dropped): each
    // choice, in prompt order, holds what the prompt alone gave.
    let json = score(serde_json::json!(scored), 1, false).ok_json();
    let choices = json["choices"].as_array().unwrap();
    assert_eq!(choices.len(), scored.len());
    let mut prompt_tokens = 0;
    for (i, full) in scored.iter().enumerate() {
        assert_eq!(choices[i]["index"], i);
        let logprobs = &choices[i]["logprobs"];
        for key in ["tokens", "token_logprobs", "top_logprobs"] {
            let got = logprobs[key].as_array().unwrap();
            assert_eq!(got.len(), full.len() + 1, "{key}");
            assert_eq!(got[..full.len()], alone[2 * i][key].as_array().unwrap()[..]);
        }
        // The generated token is the prompt's last greedy token.
        let prompt = &golden.prompts[i];
        let last = *prompt.greedy.last().unwrap();
        assert_eq!(logprobs["tokens"][full.len()], text_of(last));
        prompt_tokens += full.len();
    }
    assert_eq!(json["usage"]["prompt_tokens"], prompt_tokens);
    assert_eq!(json["usage"]["completion_tokens"], scored.len());

    // Streamed: the echo chunk carries the prompt's log-probabilities, the
    // generated token's follow; together they are the whole response's.
    let streamed = score(serde_json::json!(scored[0]), 1, true);
    assert_eq!(streamed.status, 200);
    let events = streamed.events();
    let chunks: Vec<serde_json::Value> = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let first = &chunks[0]["choices"][0];
    let expected_text: String = scored[0].iter().map(|&id| text_of(id)).collect();
    assert_eq!(first["text"], expected_text);
    assert_eq!(first["logprobs"], alone[0]);
    let values: Vec<serde_json::Value> = chunks
        .iter()
        .flat_map(|c| {
            c["choices"][0]["logprobs"]["token_logprobs"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(
        values[..],
        choices[0]["logprobs"]["token_logprobs"].as_array().unwrap()[..]
    );
    let offsets: Vec<serde_json::Value> = chunks
        .iter()
        .flat_map(|c| {
            c["choices"][0]["logprobs"]["text_offset"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(
        offsets[..],
        choices[0]["logprobs"]["text_offset"].as_array().unwrap()[..]
    );
    serve_support::assert_kv_pages_return(&server);
}

#[test]
fn an_end_of_sequence_token_ends_the_completion() {
    // A greedy token (not the first, and new at its step) declared
    // end-of-sequence in generation_config.json: the completion stops
    // there, without its text.
    let tmp = TempDir::new("hf-eos");
    let dir = copy_fixture("qwen2_moe", &tmp);
    let golden = golden(&dir);
    let (prompt, step) = golden
        .prompts
        .iter()
        .find_map(|p| {
            let step = (1..p.greedy.len()).find(|&k| !p.greedy[..k].contains(&p.greedy[k]))?;
            Some((p, step))
        })
        .expect("a greedy token new at its step");
    let eos = prompt.greedy[step];
    let generation = serde_json::json!({"eos_token_id": [eos]});
    std::fs::write(
        dir.join("generation_config.json"),
        serde_json::to_vec(&generation).unwrap(),
    )
    .unwrap();
    let loaded = load::load(&dir, None, None).unwrap();
    let bytes: Vec<u8> = prompt.greedy[..step]
        .iter()
        .flat_map(|&t| loaded.tokenizer.token_bytes(t))
        .collect();
    let options = ServeOptions {
        model_name: Some("qwen".into()),
        ..serve_support::options(&dir)
    };
    let server = Server::start(loaded, &options).unwrap();
    let body = serde_json::json!({
        "model": "qwen", "prompt": prompt.text, "max_tokens": 8, "temperature": 0,
    });
    let response = post_json(server.addr, "/v1/completions", &body);
    let json = response.json();
    assert_eq!(json["choices"][0]["finish_reason"], "stop", "{json}");
    assert_eq!(json["usage"]["completion_tokens"], step + 1, "{json}");
    assert_eq!(full_text(&response), String::from_utf8_lossy(&bytes));

    // vLLM's `ignore_eos` (what benchmark clients send): the greedy tokens
    // go on through the end-of-sequence token, which adds no text but is
    // counted and scored (its log-probability names it), to max_tokens.
    let ignoring = serde_json::json!({
        "model": "qwen", "prompt": prompt.text, "max_tokens": prompt.greedy.len(),
        "temperature": 0, "ignore_eos": true, "logprobs": 1,
    });
    let json = post_json(server.addr, "/v1/completions", &ignoring).json();
    let choice = &json["choices"][0];
    assert_eq!(choice["finish_reason"], "length", "{json}");
    assert_eq!(json["usage"]["completion_tokens"], prompt.greedy.len());
    assert_eq!(
        choice["logprobs"]["tokens"].as_array().unwrap().len(),
        prompt.greedy.len()
    );
    let tokenizer = load::load(&dir, None, None).unwrap().tokenizer;
    assert_eq!(
        choice["logprobs"]["tokens"][step],
        *String::from_utf8_lossy(&tokenizer.token_bytes(eos))
    );
    let text: Vec<u8> = prompt
        .greedy
        .iter()
        .filter(|&&t| t != eos)
        .flat_map(|&t| tokenizer.token_bytes(t))
        .collect();
    assert_eq!(choice["text"], *String::from_utf8_lossy(&text));

    // `min_tokens`: the end-of-sequence token cannot be drawn before it, so
    // the greedy step that chose it takes the next likeliest token instead.
    let at_least = serde_json::json!({
        "model": "qwen", "prompt": prompt.text, "max_tokens": prompt.greedy.len(),
        "temperature": 0, "min_tokens": step + 2, "logprobs": 2,
    });
    let json = post_json(server.addr, "/v1/completions", &at_least).json();
    let logprobs = &json["choices"][0]["logprobs"];
    let generated = json["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert!(generated >= step + 2, "{json}");
    assert!(
        json["choices"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with(&*String::from_utf8_lossy(&bytes))
    );
    // At the step, the chosen token is the second of the alternatives (the
    // likeliest, end-of-sequence, was banned).
    let top = logprobs["top_logprobs"][step].as_object().unwrap();
    let chosen = logprobs["token_logprobs"][step].as_f64().unwrap();
    let best = top
        .values()
        .map(|v| v.as_f64().unwrap())
        .fold(f64::NEG_INFINITY, f64::max);
    assert!(chosen < best, "{logprobs}");
    let bad = serde_json::json!({"prompt": "x", "max_tokens": 2, "min_tokens": 3});
    let response = post_json(server.addr, "/v1/completions", &bad);
    assert_eq!(response.status, 400);
    assert_eq!(response.json()["error"]["param"], "min_tokens");
}

#[test]
fn a_chat_template_can_refuse_a_conversation() {
    // Mixtral's template raises an exception unless roles alternate.
    let loaded = load::load(&fixture("mixtral"), None, None).unwrap();
    let messages = [("assistant".to_owned(), "Hi".to_owned())];
    let error = loaded.tokenizer.encode_chat(&messages).unwrap_err();
    assert!(error.contains("roles must alternate"), "{error}");

    let options = ServeOptions {
        model_name: Some("mixtral".into()),
        ..serve_support::options(&fixture("mixtral"))
    };
    let server = Server::start(loaded, &options).unwrap();
    let body = serde_json::json!({
        "model": "mixtral", "messages": [{"role": "assistant", "content": "Hi"}],
    });
    let response = post_json(server.addr, "/v1/chat/completions", &body);
    assert_eq!(response.status, 400);
    let json = response.json();
    assert_eq!(json["error"]["param"], "messages", "{json}");
}
