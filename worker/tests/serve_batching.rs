//! Continuous batching is invisible, and holds up under load: the same
//! greedy request gives the same tokens alone and among 32 concurrent ones;
//! 64 concurrent streaming clients (a fixed count, each with a fixed
//! length) all finish without an error and every KV page is returned.

mod serve_support;

use std::sync::{Arc, Barrier};
use std::time::Instant;

use serde_json::json;
use serve_support::{
    TempDir, assert_kv_pages_return, full_text, options, post_json, start_server, streamed_text,
};

#[test]
fn a_request_gets_the_same_tokens_alone_and_among_32() {
    let dir = TempDir::new("batching");
    let mut opts = options(&dir.0);
    // Small enough that prompts are split across steps and mixed with decodes.
    opts.max_batch_tokens = 48;
    let server = start_server(&dir, &opts);
    let addr = server.addr;
    let probe = json!({"prompt": "Batching must be invisible", "max_tokens": 30, "temperature": 0});
    let alone = full_text(&post_json(addr, "/v1/completions", &probe));
    assert!(!alone.is_empty());

    // 32 at once: 8 copies of the probe among 24 others of varied lengths,
    // some streaming, released together so they share steps.
    let barrier = Arc::new(Barrier::new(32));
    let clients: Vec<_> = (0..32)
        .map(|i| {
            let barrier = Arc::clone(&barrier);
            let probe = probe.clone();
            std::thread::spawn(move || {
                let body = if i % 4 == 0 {
                    probe
                } else {
                    json!({
                        "prompt": "other ".repeat(1 + i % 7),
                        "max_tokens": 5 + i * 2 % 23,
                        "temperature": 0.8,
                        "seed": i,
                        "stream": i % 2 == 1,
                    })
                };
                barrier.wait();
                (i, post_json(addr, "/v1/completions", &body))
            })
        })
        .collect();
    for client in clients {
        let (i, response) = client.join().expect("a client thread");
        assert_eq!(response.status, 200, "client {i}");
        if i % 4 == 0 {
            assert_eq!(
                full_text(&response),
                alone,
                "client {i}: the probe changed in a batch"
            );
        }
    }
    assert_kv_pages_return(&server);
}

#[test]
fn sixty_four_streaming_clients_finish_cleanly() {
    const CLIENTS: usize = 64;
    const TOKENS: usize = 16;
    let dir = TempDir::new("load");
    let server = start_server(&dir, &options(&dir.0));
    let addr = server.addr;
    let started = Instant::now();
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                let (path, body) = if i % 2 == 0 {
                    (
                        "/v1/completions",
                        json!({"prompt": format!("client {i} says"), "max_tokens": TOKENS, "stream": true, "seed": i}),
                    )
                } else {
                    (
                        "/v1/chat/completions",
                        json!({"messages": [{"role": "user", "content": format!("hi from {i}")}],
                               "max_tokens": TOKENS, "stream": true, "temperature": 0}),
                    )
                };
                barrier.wait();
                let response = post_json(addr, path, &body);
                assert_eq!(response.status, 200, "client {i}");
                streamed_text(&response)
            })
        })
        .collect();
    for (i, client) in clients.into_iter().enumerate() {
        let (_, finish) = client
            .join()
            .unwrap_or_else(|_| panic!("client {i} failed"));
        assert_eq!(finish.as_deref(), Some("length"), "client {i}");
    }
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "{CLIENTS} streaming clients × {TOKENS} tokens in {seconds:.2} s ({:.0} tokens/s, debug build)",
        (CLIENTS * TOKENS) as f64 / seconds
    );
    assert_kv_pages_return(&server);
    assert_eq!(server.engine.kv_pages_used(), 0);
    let metrics = server.metrics.render();
    assert!(
        metrics
            .lines()
            .any(|l| l == "moe_serving_generation_tokens_total 1024"),
        "every client got all its tokens:\n{metrics}"
    );
}
