//! Serving a LoRA adapter beside its base model (`serve/adapters.rs`)
//! against serving the merged model `W₀ + s·B·A`: the update computed
//! row by row from the adapter's files must give the logits of the
//! weights it was folded into here, naively, for prefill and cached
//! decoding alike, while base-model rows in the same step stay the base
//! model's to the bit.

mod serve_support;

use std::path::Path;

use moe_worker::model::Model;
use moe_worker::serve::adapters::{self, Adapter, AdapterSource};
use moe_worker::serve::engine::{Chunk, Engine, Logits};
use moe_worker::serve::kv_cache::KvStore;
use moe_worker::serve::{ServeOptions, Server};
use safetensors::{Dtype, tensor::TensorView};
use serde_json::json;
use serve_support::lora::{RANK, expert_updates, merged, updates, write_peft};
use serve_support::{TempDir, post_json, request, tiny_model};

const PAGE_SIZE: usize = 4;

fn load(dir: &Path, name: &str, engine: &Engine) -> Result<Adapter, String> {
    adapters::load(
        &AdapterSource {
            name: name.into(),
            dir: dir.to_path_buf(),
        },
        &engine.adapter_shape(),
    )
}

/// Every sequence's next-token logits at every position, each sequence
/// fed in the chunks `split` gives (all sequences share each step).
fn logits(
    engine: &Engine,
    sequences: &[(&[u32], Option<usize>)],
    split: &[usize],
) -> Vec<Vec<f32>> {
    let pages_each = 64 / PAGE_SIZE;
    let mut store = KvStore::new(engine.kv_shape(PAGE_SIZE), pages_each * sequences.len());
    let pages: Vec<Vec<u32>> = (0..sequences.len())
        .map(|s| ((s * pages_each) as u32..((s + 1) * pages_each) as u32).collect())
        .collect();
    let mut out = vec![Vec::new(); sequences.len()];
    let mut start = 0;
    for &len in split {
        let chunks: Vec<Chunk<'_>> = sequences
            .iter()
            .zip(&pages)
            .map(|(&(tokens, adapter), pages)| Chunk {
                pages,
                start,
                tokens: &tokens[start..start + len],
                logits: Logits::All,
                adapter,
            })
            .collect();
        let step = engine.step(&mut store, &chunks).expect("a valid step");
        let vocab = engine.config().vocab;
        for (s, rows) in step.chunks_exact(len * vocab).enumerate() {
            out[s].extend_from_slice(rows);
        }
        start += len;
    }
    out
}

fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

#[test]
fn an_adapter_served_beside_its_base_gives_the_merged_models_logits() {
    let base = tiny_model(21);
    let head_dim = base.config().head_dim;
    // Attention, a dense MLP, routed experts and the shared experts.
    let mut updates = updates(&base, 5);
    updates.extend(expert_updates(&base, 7));
    let tmp = TempDir::new("adapters-merged");
    for (name, alpha, rslora) in [("plain", 8.0, false), ("rs", 8.0, true)] {
        let dir = tmp.0.join(name);
        write_peft(&dir, &updates, head_dim, alpha, rslora);
        let scale = if rslora {
            alpha / (RANK as f64).sqrt()
        } else {
            alpha / RANK as f64
        } as f32;
        let reference = Engine::new(merged(&base, &updates, scale));
        let plain = Engine::new(base.clone());
        let adapter = load(&dir, name, &plain).expect("the adapter loads");
        assert_eq!(
            adapter.modules(),
            [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
                "experts.gate_proj",
                "experts.up_proj",
                "experts.down_proj",
                "shared_experts.gate_proj",
                "shared_experts.down_proj",
            ]
        );
        let served = Engine::new(base.clone()).with_adapters(vec![adapter]);

        let tokens: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % 256).collect();
        let other: Vec<u32> = (0..12).map(|i| (i * 11 + 90) % 256).collect();
        // A prefill, then a chunk, then single-token decodes (cached keys
        // and values computed with the adapter), beside a base-model
        // sequence in every step.
        let split = [5, 4, 1, 1, 1];
        let mixed = logits(&served, &[(&tokens, Some(0)), (&other, None)], &split);
        let want = logits(&reference, &[(&tokens, None)], &split);
        let worst = max_difference(&mixed[0], &want[0]);
        assert!(
            worst < 1e-4,
            "{name}: adapter vs merged logits differ by {worst}"
        );
        let without = logits(&plain, &[(&tokens, None)], &split);
        let moved = max_difference(&mixed[0], &without[0]);
        assert!(
            moved > 1e-2,
            "{name}: the adapter changed the logits by only {moved}"
        );
        // The base-model rows of the mixed steps are the base model's bits.
        let alone = logits(&plain, &[(&other, None)], &split);
        assert_eq!(
            mixed[1], alone[0],
            "{name}: a base row depends on its batch"
        );
    }
}

#[test]
fn adapters_serving_cannot_compute_are_refused_naming_what() {
    let base = tiny_model(21);
    let head_dim = base.config().head_dim;
    let engine = Engine::new(base.clone());
    let shape = engine.adapter_shape();
    let tmp = TempDir::new("adapters-refused");
    let mut updates = updates(&base, 6);

    // The router: named, with what to do instead.
    let dir = tmp.0.join("mlp");
    write_peft(&dir, &updates, head_dim, 8.0, false);
    let weights = dir.join("adapter_model.safetensors");
    let mut tensors = safetensors::SafeTensors::deserialize(&std::fs::read(&weights).unwrap())
        .unwrap()
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.shape().to_vec(), view.data().to_vec()))
        .collect::<Vec<_>>();
    let gate = "base_model.model.model.layers.1.mlp.gate.lora_A.weight";
    tensors.push((gate.into(), vec![RANK, 32], vec![0; RANK * 32 * 4]));
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &weights).unwrap();
    let e = load(&dir, "mlp", &engine).unwrap_err();
    assert!(e.contains(gate) && e.contains("merged model"), "{e}");

    // A B without its A, a wrong rank, a layer the model lacks.
    updates[8].layer = 7;
    let dir = tmp.0.join("layer");
    write_peft(&dir, &updates, head_dim, 8.0, false);
    let e = load(&dir, "layer", &engine).unwrap_err();
    assert!(e.contains("layers.7.self_attn.o_proj"), "{e}");
    // A MoE layer's MLP projection names no module of the model.
    updates[8].layer = 1;
    updates[6].layer = 1;
    let dir = tmp.0.join("moe-mlp");
    write_peft(&dir, &updates, head_dim, 8.0, false);
    let e = load(&dir, "moe-mlp", &engine).unwrap_err();
    assert!(e.contains("layers.1.mlp.down_proj"), "{e}");

    // Config fields that change the arithmetic.
    let dir = tmp.0.join("config");
    updates = self::updates(&base, 6);
    write_peft(&dir, &updates, head_dim, 8.0, false);
    let path = dir.join("adapter_config.json");
    let good: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for (field, value, said) in [
        ("use_dora", json!(true), "use_dora"),
        ("r", json!(8), "the config implies [8, "),
        ("bias", json!("lora_only"), "bias"),
        ("modules_to_save", json!(["lm_head"]), "modules_to_save"),
        ("rank_pattern", json!({"q_proj": 2}), "rank_pattern"),
        ("peft_type", json!("IA3"), "IA3"),
    ] {
        let mut config_json = good.clone();
        config_json[field] = value;
        std::fs::write(&path, config_json.to_string()).unwrap();
        let e = load(&dir, "config", &engine).unwrap_err();
        assert!(e.contains(said) && e.contains("\"config\""), "{field}: {e}");
    }
    std::fs::write(&path, good.to_string()).unwrap();
    load(&dir, "config", &engine).expect("the restored config loads");

    // Names must tell the models apart.
    let source = |name: &str| AdapterSource {
        name: name.into(),
        dir: dir.clone(),
    };
    let e = adapters::load_all(&[source("tiny")], "tiny", &shape).unwrap_err();
    assert!(e.contains("used twice"), "{e}");
    let e = adapters::load_all(&[source("a"), source("a")], "tiny", &shape).unwrap_err();
    assert!(e.contains("used twice"), "{e}");
    assert_eq!(
        adapters::load_all(&[source("a"), source("b")], "tiny", &shape)
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn the_server_serves_adapters_by_name_beside_the_model() {
    let spec = serve_support::tiny_spec();
    let base = tiny_model(21);
    let updates = updates(&base, 5);
    let tmp = TempDir::new("adapters-http");
    let adapter_dir = tmp.0.join("sql");
    write_peft(&adapter_dir, &updates, base.config().head_dim, 8.0, false);
    let start = |dir: &Path, model: &Model<f32>, adapters: Vec<AdapterSource>| {
        serve_support::write_checkpoint(dir, &spec, model);
        let loaded = moe_worker::serve::load::load(dir, None, None).expect("load");
        let options = ServeOptions {
            adapters,
            ..serve_support::options(dir)
        };
        Server::start(loaded, &options)
    };
    let sql = AdapterSource {
        name: "tiny-sql".into(),
        dir: adapter_dir.clone(),
    };
    let server = start(&tmp.0.join("base"), &base, vec![sql.clone()]).expect("serve");
    let merged = start(
        &tmp.0.join("merged"),
        &merged(&base, &updates, 8.0 / RANK as f32),
        Vec::new(),
    )
    .expect("serve the merged model");

    let models = request(server.addr, "GET", "/v1/models", b"").ok_json();
    let listed: Vec<(&str, &str)> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap(),
                m["parent"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(listed, [("tiny", ""), ("tiny-sql", "tiny")]);

    let complete = |addr, model: &str| {
        let body = json!({"model": model, "prompt": "The ", "max_tokens": 12, "temperature": 0});
        post_json(addr, "/v1/completions", &body).ok_json()
    };
    let adapted = complete(server.addr, "tiny-sql");
    let want = complete(merged.addr, "tiny");
    assert_eq!(adapted["model"], "tiny-sql");
    assert_eq!(adapted["choices"][0]["text"], want["choices"][0]["text"]);
    let plain = complete(server.addr, "tiny");
    assert_eq!(plain["model"], "tiny");
    assert_ne!(plain["choices"][0]["text"], adapted["choices"][0]["text"]);
    let missing = post_json(
        server.addr,
        "/v1/completions",
        &json!({"model": "tiny-math", "prompt": "a"}),
    );
    assert_eq!(missing.status, 404);
    // Each model's requests are counted under its name.
    let metrics = String::from_utf8(request(server.addr, "GET", "/metrics", b"").body).unwrap();
    for line in [
        "moe_serving_model_requests_total{model=\"tiny-sql\"} 1",
        "moe_serving_model_requests_total{model=\"tiny\"} 1",
        // What an endpoint picker's LoRA affinity reads.
        "moe_serving_lora_requests_info{max_lora=\"1\",running_lora_adapters=\"tiny-sql\",\
         waiting_lora_adapters=\"\"} ",
    ] {
        assert!(metrics.contains(line), "{line} not in {metrics}");
    }

    // Where adapters are not computed, the server does not start.
    let refused = |options: ServeOptions| {
        let dir = tmp.0.join("base");
        let loaded = moe_worker::serve::load::load(&dir, None, None).expect("load");
        match Server::start(loaded, &options) {
            Ok(_) => panic!("served adapters where they are not computed"),
            Err(e) => e.to_string(),
        }
    };
    let base_options = ServeOptions {
        adapters: vec![sql],
        ..serve_support::options(&tmp.0.join("base"))
    };
    let e = refused(ServeOptions {
        device: moe_crds::Device::Cuda,
        ..base_options
    });
    assert!(e.contains("tiny-sql") && e.contains("cuda"), "{e}");
}
