//! Prefix caching through the HTTP API: a prompt that starts with tokens
//! served before reuses their KV pages (reported as OpenAI's
//! `usage.prompt_tokens_details.cached_tokens` and counted in `/metrics`),
//! and gives exactly what a server without the cache gives: the same text
//! and the same log-probabilities, to the last bit.

mod serve_support;

use moe_worker::serve::{ServeOptions, Server};
use serde_json::{Value, json};
use serve_support::{
    TempDir, assert_kv_pages_return, options, post_json, spec_with_context, start_server_for,
};

const SYSTEM: &str = "You are a terse assistant for a mixture-of-experts cluster. \
                      Answer in one short sentence. ";

/// The tiny model with room for a system prompt and a second turn.
fn start(dir: &TempDir, options: &ServeOptions) -> Server {
    start_server_for(dir, options, &spec_with_context(256))
}

/// A 200 response's body.
fn answered(addr: std::net::SocketAddr, path: &str, body: &Value) -> Value {
    let response = post_json(addr, path, body);
    assert_eq!(
        response.status,
        200,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    response.json()
}

fn completion(addr: std::net::SocketAddr, prompt: &str) -> Value {
    let body = json!({
        "prompt": prompt, "max_tokens": 24, "temperature": 0, "logprobs": 3,
    });
    answered(addr, "/v1/completions", &body)
}

fn cached(reply: &Value) -> u64 {
    reply["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("usage.prompt_tokens_details.cached_tokens")
}

fn prompt_tokens(reply: &Value) -> u64 {
    reply["usage"]["prompt_tokens"].as_u64().unwrap()
}

/// What must not change with the cache: the text and every log-probability.
fn output(reply: &Value) -> (&Value, &Value) {
    let choice = &reply["choices"][0];
    (&choice["text"], &choice["logprobs"])
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
}

#[test]
fn shared_prefixes_are_reused_and_change_no_bit_of_the_output() {
    let (dir, plain_dir) = (TempDir::new("prefix-cache"), TempDir::new("prefix-plain"));
    let opts = options(&dir.0);
    let page = opts.page_size as u64;
    let server = start(&dir, &opts);
    let plain = start(
        &plain_dir,
        &ServeOptions {
            prefix_caching: false,
            ..options(&plain_dir.0)
        },
    );
    let questions = ["What does a router do?", "Why split the experts?"];
    let mut replies = Vec::new();
    for q in questions {
        let prompt = format!("{SYSTEM}{q}");
        let reply = completion(server.addr, &prompt);
        let reference = completion(plain.addr, &prompt);
        assert_eq!(output(&reply), output(&reference), "{q}");
        assert_eq!(
            cached(&reference),
            0,
            "a server without the cache computes it all"
        );
        replies.push(reply);
    }
    // The first computed everything; the second reused the system prompt's
    // whole pages (one token per byte, so it is the prompt less the question).
    assert_eq!(cached(&replies[0]), 0);
    let system_tokens = prompt_tokens(&replies[0]) - questions[0].len() as u64;
    assert!(system_tokens >= 2 * page, "the system prompt spans pages");
    assert_eq!(cached(&replies[1]), system_tokens / page * page);

    // The same prompt again: all of it but the last token's page.
    let again = completion(server.addr, &format!("{SYSTEM}{}", questions[1]));
    assert_eq!(output(&again), output(&replies[1]));
    let whole = prompt_tokens(&again);
    assert_eq!(cached(&again), (whole - 1) / page * page);

    // A second turn resends the first with its answer: the pages the
    // answer filled (generated tokens) are reused too. The first turn as a
    // chat, whose log-probabilities carry each token's bytes (the tiny
    // model's tokens are bytes, not all of them UTF-8); the second as the
    // token ids of the whole conversation.
    let chat = json!({
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi?"}],
        "max_tokens": 24, "temperature": 0, "logprobs": true,
    });
    let first_turn = post_json(server.addr, "/v1/chat/completions", &chat).json();
    let mut conversation: Vec<u64> = format!("system: {SYSTEM}\nuser: Hi?\nassistant:")
        .bytes()
        .map(u64::from)
        .collect();
    assert_eq!(prompt_tokens(&first_turn), conversation.len() as u64);
    for token in first_turn["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
    {
        conversation.extend(
            token["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap()),
        );
    }
    let generated = first_turn["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(
        conversation.len() as u64,
        prompt_tokens(&first_turn) + generated
    );
    // Every position but the last sampled token's was computed.
    let computed = conversation.len() as u64 - 1;
    conversation.extend(b"\nuser: And the gate?\nassistant:".map(u64::from));
    let body = |prompt: &Vec<u64>| json!({"prompt": prompt, "max_tokens": 24, "temperature": 0, "logprobs": 3});
    let turn = post_json(server.addr, "/v1/completions", &body(&conversation)).json();
    let reference = post_json(plain.addr, "/v1/completions", &body(&conversation)).json();
    assert_eq!(output(&turn), output(&reference));
    assert_eq!(cached(&turn), computed / page * page);
    assert!(
        cached(&turn) > prompt_tokens(&first_turn),
        "the answer's pages were reused"
    );

    // Streaming reports it too, and the metrics add it all up.
    let body = json!({
        "prompt": format!("{SYSTEM}{}", questions[0]), "max_tokens": 4, "temperature": 0,
        "stream": true, "stream_options": {"include_usage": true},
    });
    let streamed = post_json(server.addr, "/v1/completions", &body);
    let usage: Value = streamed
        .events()
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .find(|e| e["usage"].is_object())
        .expect("a usage chunk");
    let streamed_cached = cached(&usage);
    assert!(streamed_cached >= system_tokens / page * page);

    assert_kv_pages_return(&server);
    let metrics =
        String::from_utf8(serve_support::request(server.addr, "GET", "/metrics", b"").body)
            .unwrap();
    let total = [&replies[1], &again, &first_turn, &turn]
        .iter()
        .map(|r| cached(r))
        .sum::<u64>()
        + streamed_cached;
    assert_eq!(
        metric(&metrics, "moe_serving_prompt_tokens_cached_total"),
        total as f64
    );
    assert!(metric(&metrics, "moe_serving_kv_cache_pages_cached") > 0.0);
    assert_eq!(metric(&metrics, "moe_serving_kv_cache_pages_used"), 0.0);
}

#[test]
fn cached_pages_give_way_to_new_requests_when_the_cache_is_full() {
    // A cache of 8 pages of 16 positions (2 layers × (16 key + 16 value)
    // f32 per position: 4 KiB a page); each request needs 6 of them.
    let dir = TempDir::new("prefix-evict");
    let opts = ServeOptions {
        kv_cache_bytes: 8 * 4096,
        ..options(&dir.0)
    };
    let server = start(&dir, &opts);
    assert_eq!(server.engine.kv_pages_total(), 8);
    let prompts: Vec<String> = (0..4)
        .map(|i| {
            format!(
                "{i}{i}{i} {}",
                "the same words after a new start ".repeat(3)
            )[..70]
                .to_owned()
        })
        .collect();
    let first: Vec<Value> = prompts.iter().map(|p| completion(server.addr, p)).collect();
    assert!(
        first
            .iter()
            .all(|r| prompt_tokens(r) > 4 * 16 && cached(r) == 0)
    );
    // Each request took pages cached by the ones before (the oldest
    // first): the first prompt's are gone, so served again it is computed
    // whole, and answers the same.
    let again = completion(server.addr, &prompts[0]);
    assert_eq!(cached(&again), 0);
    assert_eq!(output(&again), output(&first[0]));
    // Once more: now its pages are the newest, and reused.
    assert!(cached(&completion(server.addr, &prompts[0])) >= 4 * 16);
    assert_kv_pages_return(&server);
}

#[test]
fn a_chat_through_a_hugging_face_template_reuses_its_earlier_turns() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/qwen3_moe");
    let start_with = |prefix_caching| {
        let options = ServeOptions {
            model_name: Some("qwen".into()),
            prefix_caching,
            ..options(&dir)
        };
        let loaded = moe_worker::serve::load::load(&dir, None, None).unwrap();
        Server::start(loaded, &options).unwrap()
    };
    let (server, plain) = (start_with(true), start_with(false));
    let page = options(&dir).page_size as u64;
    let chat = |addr, messages: &Value| {
        let body = json!({
            "messages": messages, "max_tokens": 12, "temperature": 0,
            "logprobs": true, "top_logprobs": 2,
        });
        answered(addr, "/v1/chat/completions", &body)
    };
    let mut messages = json!([
        {"role": "system", "content": "You route tokens to experts. Answer in one short line, and name the field to change."},
        {"role": "user", "content": "Which field sets the experts per token?"},
    ]);
    let first = chat(server.addr, &messages);
    assert_eq!(first["choices"], chat(plain.addr, &messages)["choices"]);
    // The second turn: the template renders the first turn again, then the
    // answer and the new question; the first turn's prompt is reused.
    let answer = first["choices"][0]["message"]["content"].clone();
    let list = messages.as_array_mut().unwrap();
    list.push(json!({"role": "assistant", "content": answer}));
    list.push(json!({"role": "user", "content": "And the shared experts?"}));
    let second = chat(server.addr, &messages);
    assert_eq!(second["choices"], chat(plain.addr, &messages)["choices"]);
    let first_prompt = prompt_tokens(&first);
    assert!(
        cached(&second) >= first_prompt / page * page,
        "cached {} of {}, the first turn's prompt had {first_prompt}",
        cached(&second),
        prompt_tokens(&second)
    );
}

#[test]
fn concurrent_requests_sharing_prefixes_in_a_small_cache_answer_as_without_it() {
    // 24 pages of 16 positions; each request needs 6 (a ~70-token prompt
    // and 16 tokens): at most four run at once, the rest wait, and pages
    // are shared, released, cached and evicted while others hold them.
    let (dir, plain_dir) = (
        TempDir::new("prefix-stress"),
        TempDir::new("prefix-stress-plain"),
    );
    let server = start(
        &dir,
        &ServeOptions {
            kv_cache_bytes: 24 * 4096,
            ..options(&dir.0)
        },
    );
    assert_eq!(server.engine.kv_pages_total(), 24);
    let plain = start(
        &plain_dir,
        &ServeOptions {
            prefix_caching: false,
            ..options(&plain_dir.0)
        },
    );
    let systems = [
        "System A: answer about routing, in one line, and name the field. ",
        "System B: answer about experts, in one line, and name the limit. ",
        "System C: answer about caching, in one line, and name the page. ",
    ];
    let prompts: Vec<String> = (0..30)
        .map(|i| format!("{}Q{i}?", systems[i % systems.len()]))
        .collect();
    let body = |prompt: &str| json!({"prompt": prompt, "max_tokens": 16, "temperature": 0});
    let want: Vec<Value> = prompts
        .iter()
        .map(|p| answered(plain.addr, "/v1/completions", &body(p))["choices"][0]["text"].clone())
        .collect();
    let got: Vec<(Value, u64)> = std::thread::scope(|scope| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                let body = body(p);
                let addr = server.addr;
                scope.spawn(move || {
                    let reply = answered(addr, "/v1/completions", &body);
                    (reply["choices"][0]["text"].clone(), cached(&reply))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, ((text, _), want)) in got.iter().zip(&want).enumerate() {
        assert_eq!(text, want, "request {i}");
    }
    assert!(
        got.iter().filter(|(_, cached)| *cached > 0).count() >= 10,
        "most requests found their system prompt cached: {:?}",
        got.iter().map(|(_, c)| c).collect::<Vec<_>>()
    );
    assert_kv_pages_return(&server);
}
