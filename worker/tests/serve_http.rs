//! The HTTP API end to end on loopback: bad input gets 4xx OpenAI-style
//! errors and the server keeps answering; streaming and non-streaming give
//! the same text; a full queue gets 429 with Retry-After; a client that hangs
//! up mid-stream gets its request cancelled and its KV pages returned.

mod serve_support;

use std::io::Read;
use std::time::{Duration, Instant};

use serde_json::json;
use serve_support::{
    CONTEXT, TempDir, assert_kv_pages_return, full_text, options, post_json, request, send,
    spec_with_context, start_server, start_server_for, streamed_text,
};

#[test]
fn bad_input_gets_openai_errors_and_the_server_keeps_serving() {
    let dir = TempDir::new("bad-input");
    let server = start_server(&dir, &options(&dir.0));
    let addr = server.addr;
    let long_prompt = "x".repeat(CONTEXT);
    let cases: Vec<(&str, &str, Vec<u8>, u16)> = vec![
        (
            "malformed JSON",
            "/v1/completions",
            b"{\"prompt\": \"a\",".to_vec(),
            400,
        ),
        ("not an object", "/v1/completions", b"[1, 2]".to_vec(), 400),
        (
            "no prompt",
            "/v1/completions",
            b"{\"model\": \"tiny\"}".to_vec(),
            400,
        ),
        (
            "invalid UTF-8",
            "/v1/completions",
            b"{\"prompt\": \"\xff\xfe\"}".to_vec(),
            400,
        ),
        (
            "unknown model",
            "/v1/completions",
            json!({"model": "gpt-9", "prompt": "a"})
                .to_string()
                .into_bytes(),
            404,
        ),
        (
            "prompt longer than the context",
            "/v1/completions",
            json!({"model": "tiny", "prompt": long_prompt})
                .to_string()
                .into_bytes(),
            400,
        ),
        (
            "negative max_tokens",
            "/v1/completions",
            json!({"prompt": "a", "max_tokens": -1})
                .to_string()
                .into_bytes(),
            400,
        ),
        (
            "zero max_tokens",
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "a"}], "max_tokens": 0})
                .to_string()
                .into_bytes(),
            400,
        ),
        (
            "no messages",
            "/v1/chat/completions",
            json!({"messages": []}).to_string().into_bytes(),
            400,
        ),
        (
            "temperature out of range",
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "a"}], "temperature": 7})
                .to_string()
                .into_bytes(),
            400,
        ),
        ("unknown endpoint", "/v1/embeddings", b"{}".to_vec(), 404),
    ];
    for (what, path, body, status) in cases {
        let response = request(addr, "POST", path, &body);
        assert_eq!(
            response.status,
            status,
            "{what}: {:?}",
            String::from_utf8_lossy(&response.body)
        );
        let error = &response.json()["error"];
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()) && error["type"].is_string(),
            "{what}: not an OpenAI error body: {error}"
        );
    }
    let too_long = request(
        addr,
        "POST",
        "/v1/completions",
        json!({"prompt": "x".repeat(CONTEXT)})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(too_long.json()["error"]["code"], "context_length_exceeded");

    // Still serving.
    let ok = post_json(
        addr,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0}),
    );
    assert!(!full_text(&ok).is_empty());
    assert_eq!(
        ok.json()["usage"],
        json!({
            "prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9,
            "prompt_tokens_details": {"cached_tokens": 0},
        })
    );
    assert_kv_pages_return(&server);
}

#[test]
fn models_probes_and_metrics_answer() {
    let dir = TempDir::new("endpoints");
    let server = start_server(&dir, &options(&dir.0));
    let models = request(server.addr, "GET", "/v1/models", b"");
    assert_eq!(models.status, 200);
    assert_eq!(models.json()["data"][0]["id"], "tiny");
    assert_eq!(models.json()["data"][0]["max_model_len"], CONTEXT);
    assert_eq!(
        models.json()["data"][0]["root"],
        dir.0.display().to_string(),
        "a model on disk: its directory"
    );
    for probe in ["/health", "/healthz", "/readyz"] {
        assert_eq!(
            request(server.addr, "GET", probe, b"").status,
            200,
            "{probe}"
        );
    }
    post_json(
        server.addr,
        "/v1/completions",
        &json!({"prompt": "ab", "max_tokens": 3}),
    );
    let metrics = request(server.addr, "GET", "/metrics", b"");
    let text = String::from_utf8_lossy(&metrics.body);
    for line in [
        "moe_serving_prompt_tokens_total 2",
        "moe_serving_generation_tokens_total 3",
        "moe_serving_inflight_requests 0",
        "moe_serving_kv_cache_pages_used 0",
        "moe_serving_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 1",
        "moe_serving_time_to_first_token_seconds_count 1",
        "moe_serving_inter_token_latency_seconds_count 2",
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
    }
}

#[test]
fn streaming_gives_the_same_text_as_a_single_response() {
    let dir = TempDir::new("streaming");
    let server = start_server(&dir, &options(&dir.0));
    let bodies = [
        (
            "/v1/completions",
            json!({"prompt": "The quick brown", "max_tokens": 24, "temperature": 0}),
        ),
        // Seeded sampling is as reproducible as greedy decoding.
        (
            "/v1/completions",
            json!({"prompt": "Once", "max_tokens": 24, "temperature": 0.9, "top_p": 0.9, "top_k": 40, "seed": 7}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "temperature": 0}),
        ),
    ];
    for (path, body) in bodies {
        let single = post_json(server.addr, path, &body);
        let mut streaming = body.clone();
        streaming["stream"] = json!(true);
        let streamed = post_json(server.addr, path, &streaming);
        assert_eq!(streamed.status, 200);
        assert!(
            streamed
                .header("content-type")
                .is_some_and(|t| t.starts_with("text/event-stream"))
        );
        let (text, finish) = streamed_text(&streamed);
        assert_eq!(text, full_text(&single), "{path} {body}");
        assert_eq!(
            finish.as_deref(),
            single.json()["choices"][0]["finish_reason"].as_str()
        );
        // stream_options.include_usage: a last chunk, no choices, the usage.
        streaming["stream_options"] = json!({"include_usage": true});
        let with_usage = post_json(server.addr, path, &streaming);
        assert_eq!(streamed_text(&with_usage).0, text);
        let events = with_usage.events();
        let last: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        assert_eq!(last["choices"], json!([]), "{last}");
        // The same counts (the streamed request may have found the single
        // one's prompt in the prefix cache, which only the details show).
        for count in ["prompt_tokens", "completion_tokens", "total_tokens"] {
            assert_eq!(
                last["usage"][count],
                single.json()["usage"][count],
                "{count}"
            );
        }
        assert!(last["usage"]["prompt_tokens_details"]["cached_tokens"].is_u64());
    }
    // A stop string ends the text before it, in both forms.
    let unstopped = full_text(&post_json(
        server.addr,
        "/v1/completions",
        &json!({"prompt": "abc", "max_tokens": 30, "temperature": 0}),
    ));
    let chars: Vec<char> = unstopped.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 1].iter().collect();
    let expected = &unstopped[..unstopped.find(&stop).unwrap()];
    let body = json!({"prompt": "abc", "max_tokens": 30, "temperature": 0, "stop": [stop]});
    let single = post_json(server.addr, "/v1/completions", &body);
    assert_eq!(full_text(&single), expected);
    assert_eq!(single.json()["choices"][0]["finish_reason"], "stop");
    let mut streaming = body;
    streaming["stream"] = json!(true);
    let (text, finish) = streamed_text(&post_json(server.addr, "/v1/completions", &streaming));
    assert_eq!((text.as_str(), finish.as_deref()), (expected, Some("stop")));
    assert_kv_pages_return(&server);
}

/// Reads from `stream` until `needle` appears.
fn read_until(stream: &mut std::net::TcpStream, needle: &[u8]) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !seen.windows(needle.len()).any(|w| w == needle) {
        let n = stream.read(&mut buf).expect("read");
        assert!(n > 0, "closed before {:?}", String::from_utf8_lossy(needle));
        seen.extend_from_slice(&buf[..n]);
    }
    seen
}

fn metric(server: &moe_worker::serve::Server, name: &str) -> f64 {
    let metrics = request(server.addr, "GET", "/metrics", b"");
    let text = String::from_utf8_lossy(&metrics.body).to_string();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

#[test]
fn a_full_queue_gets_429_and_a_hang_up_cancels() {
    // A long context, so the first request is still generating (thousands
    // of tokens) while the test fills the queue and hangs up.
    const LONG: usize = 4096;
    let dir = TempDir::new("backpressure");
    let mut opts = options(&dir.0);
    opts.max_concurrent_requests = 1;
    opts.max_queued_requests = 1;
    let server = start_server_for(&dir, &opts, &spec_with_context(LONG));
    let long =
        json!({"prompt": "a", "max_tokens": LONG, "temperature": 0, "stream": true}).to_string();
    let mut running = send(server.addr, "POST", "/v1/completions", long.as_bytes());
    read_until(&mut running, b"data: ");
    // Its pages are held while it runs: the KV-cache use an endpoint picker
    // reads is their share of the cache (one render; a step may take a page
    // between two of its gauges).
    let text = String::from_utf8(request(server.addr, "GET", "/metrics", b"").body).unwrap();
    let gauge = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    let (used, total) = (
        gauge("moe_serving_kv_cache_pages_used"),
        gauge("moe_serving_kv_cache_pages_total"),
    );
    let usage = gauge("moe_serving_kv_cache_usage_ratio");
    assert!(
        used > 0.0 && usage > 0.0 && usage <= 1.0,
        "{used} pages, usage {usage}"
    );
    assert!(
        (usage * total - used).abs() <= 1.0,
        "{usage} × {total} vs {used}"
    );
    // The second waits in the queue (its response head comes at once)...
    let mut queued = send(server.addr, "POST", "/v1/completions", long.as_bytes());
    read_until(&mut queued, b"\r\n\r\n");
    // ...and the third finds the queue full.
    let refused = post_json(
        server.addr,
        "/v1/completions",
        &json!({"prompt": "a", "max_tokens": 1}),
    );
    assert_eq!(refused.status, 429);
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(refused.json()["error"]["type"], "rate_limit_error");

    // Both clients hang up mid-stream: their requests are cancelled long
    // before either could have generated all its tokens.
    drop(running);
    drop(queued);
    assert_kv_pages_return(&server);
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&server, "moe_serving_inflight_requests") != 0.0 {
        assert!(Instant::now() < deadline, "requests still in flight");
        std::thread::sleep(Duration::from_millis(20));
    }
    let generated = metric(&server, "moe_serving_generation_tokens_total");
    assert!(
        generated < (LONG - 1) as f64,
        "{generated} tokens: the first request ran to its end"
    );
    let ok = post_json(
        server.addr,
        "/v1/completions",
        &json!({"prompt": "a", "max_tokens": 2}),
    );
    assert_eq!(ok.status, 200);
    assert_kv_pages_return(&server);
}

#[test]
fn several_choices_sample_as_separate_requests_and_share_the_prompt() {
    let dir = TempDir::new("choices");
    let server = start_server_for(&dir, &options(&dir.0), &spec_with_context(256));
    // Four whole pages of 16 tokens and part of a fifth.
    let prompt = "Several choices share one prompt: n completions of the same text, sampled.";
    let body = |seed: u64, n: usize| json!({"prompt": prompt, "max_tokens": 12, "temperature": 1.0, "seed": seed, "n": n});
    let cached = "moe_serving_prompt_tokens_cached_total";
    let before = metric(&server, cached);
    let many = post_json(server.addr, "/v1/completions", &body(40, 3)).json();
    // Choices 1 and 2 were submitted once choice 0 had its prompt in the
    // cache, and prefilled only its last, partial page.
    let prompt_tokens = many["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(prompt_tokens, prompt.len() as u64);
    assert_eq!(
        metric(&server, cached) - before,
        2.0 * ((prompt_tokens - 1) / 16 * 16) as f64
    );
    assert_eq!(many["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let choices = many["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    let mut completion_tokens = 0;
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i);
        // Choice i draws as a request of its own with the seed plus i.
        let alone = post_json(server.addr, "/v1/completions", &body(40 + i as u64, 1)).json();
        assert_eq!(choice["text"], alone["choices"][0]["text"], "choice {i}");
        completion_tokens += alone["usage"]["completion_tokens"].as_u64().unwrap();
    }
    assert_ne!(
        choices[0]["text"], choices[1]["text"],
        "different seeds, different samples"
    );
    assert_eq!(many["usage"]["completion_tokens"], completion_tokens);
    assert_eq!(
        many["usage"]["total_tokens"],
        prompt_tokens + completion_tokens
    );

    // Streamed, as a chat: each choice's role chunk, pieces tagged with
    // their index, a finish per choice, then the usage of all.
    let chat = json!({
        "messages": [{"role": "user", "content": prompt}], "max_tokens": 10, "temperature": 0.7,
        "seed": 9, "n": 2, "logprobs": true, "stream": true, "stream_options": {"include_usage": true},
    });
    let streamed = post_json(server.addr, "/v1/chat/completions", &chat);
    let events = streamed.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<serde_json::Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let mut texts = [String::new(), String::new()];
    let (mut roles, mut finishes, mut logprobs) = ([0; 2], [0; 2], [0; 2]);
    for chunk in &chunks[..chunks.len() - 1] {
        let choice = &chunk["choices"][0];
        let i = choice["index"].as_u64().unwrap() as usize;
        texts[i].push_str(choice["delta"]["content"].as_str().unwrap_or(""));
        roles[i] += usize::from(choice["delta"]["role"] == "assistant");
        finishes[i] += usize::from(choice["finish_reason"].is_string());
        logprobs[i] += choice["logprobs"]["content"].as_array().map_or(0, Vec::len);
    }
    assert_eq!((roles, finishes), ([1, 1], [1, 1]));
    let usage = &chunks[chunks.len() - 1]["usage"];
    let whole = {
        let mut chat = chat.clone();
        chat["stream"] = json!(false);
        post_json(server.addr, "/v1/chat/completions", &chat).json()
    };
    for (i, text) in texts.iter().enumerate() {
        assert_eq!(
            text,
            whole["choices"][i]["message"]["content"].as_str().unwrap()
        );
        assert_eq!(
            logprobs[i],
            whole["choices"][i]["logprobs"]["content"]
                .as_array()
                .unwrap()
                .len()
        );
    }
    assert_eq!(
        usage["completion_tokens"],
        whole["usage"]["completion_tokens"]
    );
    assert_kv_pages_return(&server);
}

#[test]
fn logit_bias_and_penalties_change_the_draw_as_asked() {
    let dir = TempDir::new("bias");
    let server = start_server(&dir, &options(&dir.0));
    let chat = |extra: serde_json::Value| {
        let mut body = json!({
            "messages": [{"role": "user", "content": "the dog"}], "max_tokens": 12,
            "temperature": 0, "logprobs": true,
        });
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let response = post_json(server.addr, "/v1/chat/completions", &body);
        // The tiny model's tokens are bytes: each token's id is its byte.
        let content = response.ok_json()["choices"][0]["logprobs"]["content"].clone();
        content
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["bytes"][0].as_u64().unwrap())
            .collect::<Vec<u64>>()
    };
    let plain = chat(json!({}));
    // The greedy first token, forbidden: another comes instead.
    let first = plain[0];
    let biased = chat(json!({"logit_bias": {first.to_string(): -100}}));
    assert_ne!(biased[0], first);
    // Any token, pushed up by 100, is drawn every time.
    let forced = chat(json!({"logit_bias": {"120": 100}}));
    assert_eq!(forced, vec![120; 12]);
    // A strong frequency penalty stops the greedy text from repeating a
    // token as often as it does without.
    let most = |tokens: &[u64]| {
        let mut counts = std::collections::HashMap::new();
        for t in tokens {
            *counts.entry(t).or_insert(0) += 1;
        }
        counts.into_values().max().unwrap()
    };
    let penalised = chat(json!({"frequency_penalty": 2.0, "presence_penalty": 2.0}));
    assert!(
        most(&penalised) < most(&plain).max(2),
        "{plain:?} → {penalised:?}"
    );
}

#[test]
fn choices_that_do_not_fit_the_queue_get_429_and_are_cancelled() {
    let dir = TempDir::new("choices-queue");
    let opts = moe_worker::serve::ServeOptions {
        max_concurrent_requests: 1,
        max_queued_requests: 2,
        ..options(&dir.0)
    };
    let server = start_server_for(&dir, &opts, &spec_with_context(512));
    // Choice 0 runs (one slot; 400 tokens, long enough that it is still
    // running when the others are submitted right after its first token),
    // choices 1 and 2 fill the queue, choice 3 finds it full.
    let body = json!({"prompt": "queue", "max_tokens": 400, "temperature": 0, "n": 4});
    let response = post_json(server.addr, "/v1/completions", &body);
    assert_eq!(
        response.status,
        429,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    assert!(response.header("retry-after").is_some());
    assert_kv_pages_return(&server);
    // Within the queue's room, the same request is answered.
    let fits = json!({"prompt": "queue", "max_tokens": 4, "temperature": 0, "n": 3});
    let response = post_json(server.addr, "/v1/completions", &fits);
    assert_eq!(response.status, 200);
    assert_eq!(response.json()["choices"].as_array().unwrap().len(), 3);
}

#[test]
fn echo_puts_the_prompt_before_each_choice() {
    let dir = TempDir::new("echo");
    let server = start_server(&dir, &options(&dir.0));
    let plain = json!({"prompt": "the cat ", "max_tokens": 6, "temperature": 0});
    let completion = full_text(&post_json(server.addr, "/v1/completions", &plain));
    let mut echo = plain.clone();
    echo["echo"] = json!(true);
    echo["n"] = json!(2);
    let reply = post_json(server.addr, "/v1/completions", &echo).json();
    for choice in reply["choices"].as_array().unwrap() {
        assert_eq!(
            choice["text"].as_str().unwrap(),
            format!("the cat {completion}")
        );
    }
    // Streamed: the prompt first, then the same pieces.
    echo["n"] = json!(1);
    echo["stream"] = json!(true);
    let (text, _) = streamed_text(&post_json(server.addr, "/v1/completions", &echo));
    assert_eq!(text, format!("the cat {completion}"));
    // Token ids echo as their text.
    let ids: Vec<u32> = b"the cat ".iter().map(|&b| u32::from(b)).collect();
    let by_ids = json!({"prompt": ids, "max_tokens": 6, "temperature": 0, "echo": true});
    assert_eq!(
        full_text(&post_json(server.addr, "/v1/completions", &by_ids)),
        format!("the cat {completion}")
    );
    // A chat has no echo.
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "echo": true});
    let refused = post_json(server.addr, "/v1/chat/completions", &chat);
    assert_eq!(
        (refused.status, refused.json()["error"]["param"].clone()),
        (400, json!("echo"))
    );
}

/// A batch of prompts: `n` choices each, prompt after prompt (OpenAI's
/// `index` order), each the completion its prompt gets alone; the usage
/// counts each prompt once and every choice's tokens.
#[test]
fn a_batch_of_prompts_is_answered_prompt_by_prompt() {
    let dir = TempDir::new("batch-prompts");
    let server = start_server(&dir, &options(&dir.0));
    let prompts = ["the cat ", "a dog and ", "x"];
    let alone: Vec<String> = prompts
        .iter()
        .map(|p| {
            let body = json!({"prompt": p, "max_tokens": 5, "temperature": 0});
            full_text(&post_json(server.addr, "/v1/completions", &body))
        })
        .collect();
    let body = json!({"prompt": prompts, "max_tokens": 5, "temperature": 0, "n": 2, "echo": true});
    let json = post_json(server.addr, "/v1/completions", &body).ok_json();
    let choices = json["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 6);
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i);
        let p = i / 2;
        assert_eq!(
            choice["text"],
            format!("{}{}", prompts[p], alone[p]),
            "choice {i}"
        );
    }
    let prompt_tokens: usize = prompts.iter().map(|p| p.len()).sum();
    assert_eq!(json["usage"]["prompt_tokens"], prompt_tokens);
    assert_eq!(json["usage"]["completion_tokens"], 6 * 5);
    // Streamed: every choice's pieces, tagged with its index.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let events = post_json(server.addr, "/v1/completions", &streamed).events();
    let mut texts = vec![String::new(); 6];
    let mut usage = serde_json::Value::Null;
    for event in events.iter().filter(|e| *e != "[DONE]") {
        let chunk: serde_json::Value = serde_json::from_str(event).unwrap();
        if let Some(choice) = chunk["choices"].as_array().unwrap().first() {
            let i = choice["index"].as_u64().unwrap() as usize;
            texts[i].push_str(choice["text"].as_str().unwrap());
        } else {
            usage = chunk["usage"].clone();
        }
    }
    for (i, text) in texts.iter().enumerate() {
        assert_eq!(
            *text,
            format!("{}{}", prompts[i / 2], alone[i / 2]),
            "choice {i}"
        );
    }
    assert_eq!(usage["prompt_tokens"], prompt_tokens);
    // Scoring only (echo, logprobs, max_tokens 0): no token generated.
    let scoring = json!({"prompt": prompts, "max_tokens": 0, "echo": true, "logprobs": 0});
    let json = post_json(server.addr, "/v1/completions", &scoring).ok_json();
    for (p, choice) in json["choices"].as_array().unwrap().iter().enumerate() {
        assert_eq!(choice["text"], prompts[p]);
        assert_eq!(choice["finish_reason"], "length");
        let values = choice["logprobs"]["token_logprobs"].as_array().unwrap();
        assert_eq!(values.len(), prompts[p].len());
    }
    assert_eq!(json["usage"]["completion_tokens"], 0);
    // Every prompt token after each prompt's first was scored.
    let scored: usize = prompts.iter().map(|p| p.len() - 1).sum();
    assert_eq!(
        metric(&server, "moe_serving_prompt_tokens_scored_total"),
        scored as f64
    );
    // Scoring may fill the whole context; generating from there may not.
    let full = "x".repeat(CONTEXT);
    let scoring = json!({"prompt": full, "max_tokens": 0, "echo": true, "logprobs": 0});
    let json = post_json(server.addr, "/v1/completions", &scoring).ok_json();
    let values = json["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap();
    assert_eq!(values.len(), CONTEXT);
    let generating = json!({"prompt": full, "max_tokens": 1, "echo": true, "logprobs": 0});
    let response = post_json(server.addr, "/v1/completions", &generating);
    assert_eq!(response.status, 400);
    assert_eq!(response.json()["error"]["code"], "context_length_exceeded");
    assert_kv_pages_return(&server);
}

/// vLLM's tokenizer endpoints: a prompt or a chat's messages tokenised as
/// the generating endpoints do, and ids back to text; bad input named.
#[test]
fn the_tokenizer_endpoints_round_trip() {
    let dir = TempDir::new("tokenize");
    let server = start_server(&dir, &options(&dir.0));
    let json = post_json(server.addr, "/tokenize", &json!({"prompt": "the cat"})).ok_json();
    let ids: Vec<u64> = b"the cat".iter().map(|&b| u64::from(b)).collect();
    assert_eq!(json["tokens"], json!(ids));
    assert_eq!(json["count"], 7);
    assert_eq!(json["max_model_len"], CONTEXT);
    // A chat: the transcript the chat endpoint sends (no template here).
    let chat = json!({"messages": [{"role": "user", "content": "hi"}]});
    let json = post_json(server.addr, "/tokenize", &chat).ok_json();
    let transcript: Vec<u64> = b"user: hi\nassistant:"
        .iter()
        .map(|&b| u64::from(b))
        .collect();
    assert_eq!(json["tokens"], json!(transcript));
    let back = post_json(server.addr, "/detokenize", &json!({"tokens": ids})).ok_json();
    assert_eq!(back["prompt"], "the cat");
    for (path, body, status, param) in [
        ("/tokenize", json!({}), 400, json!("prompt")),
        (
            "/tokenize",
            json!({"prompt": "a", "messages": []}),
            400,
            json!("prompt"),
        ),
        ("/tokenize", json!({"messages": []}), 400, json!("messages")),
        (
            "/detokenize",
            json!({"tokens": [1, 100000]}),
            400,
            json!("tokens"),
        ),
        ("/detokenize", json!({"tokens": [-1]}), 400, json!("tokens")),
        (
            "/tokenize",
            json!({"model": "other", "prompt": "a"}),
            404,
            json!("model"),
        ),
    ] {
        let response = post_json(server.addr, path, &body);
        assert_eq!(response.status, status, "{path} {body}");
        assert_eq!(response.json()["error"]["param"], param, "{path} {body}");
    }
}
