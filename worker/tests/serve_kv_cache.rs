//! The serving forward with a paged KV cache against the training forward:
//! a prompt prefilled (whole or in chunks) and then decoded one token at a
//! time must give, at every position, the next-token distribution
//! `Model::forward` computes over the whole sequence at once; and a
//! sequence's logits must not depend on what else shares its step.

mod serve_support;

use moe_worker::rng::SplitMix64;
use moe_worker::serve::engine::{Chunk, Engine, Logits, StepError};
use moe_worker::serve::kv_cache::{KvStore, pages_for};
use moe_worker::serve::prefix_cache::PagePool;
use serve_support::{CONTEXT, model_for, spec_with_context, tiny_model};

const PAGE_SIZE: usize = 4;
const VOCAB: usize = 256;

fn random_tokens(n: usize, seed: u64) -> Vec<u32> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| rng.below(VOCAB) as u32).collect()
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l));
    let exps: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

/// The next-token logits after each position, fed in chunks of the given
/// sizes (the first chunk is the prefill, the rest whatever follows).
fn incremental_logits(
    engine: &Engine,
    store: &mut KvStore,
    pages: &[u32],
    tokens: &[u32],
    chunks: &[usize],
) -> Vec<(usize, Vec<f32>)> {
    let mut out = Vec::new();
    let mut start = 0;
    for &len in chunks {
        let chunk = Chunk {
            pages,
            start,
            tokens: &tokens[start..start + len],
            logits: Logits::Last,
            adapter: None,
        };
        let logits = engine.step(store, &[chunk]).expect("a valid step");
        start += len;
        out.push((start - 1, logits));
    }
    assert_eq!(start, tokens.len());
    out
}

/// Chunk sizes: a prefill of `prefill` tokens, then single-token decodes.
fn prefill_then_decode(prefill: usize, total: usize) -> Vec<usize> {
    std::iter::once(prefill)
        .chain(std::iter::repeat_n(1, total - prefill))
        .collect()
}

#[test]
fn cached_decoding_reproduces_the_full_sequence_forward() {
    let model = tiny_model(3);
    let tokens = random_tokens(CONTEXT, 4);
    // The training forward: probabilities of the next token at every position.
    let reference = model.forward(&tokens, &tokens);
    let reference = reference.next_token_probs();
    let engine = Engine::new(model);
    let mut pool = PagePool::new(64, PAGE_SIZE, false);
    let mut store = KvStore::new(engine.kv_shape(PAGE_SIZE), 64);
    let schedules = [
        prefill_then_decode(1, CONTEXT),
        prefill_then_decode(13, CONTEXT),
        // Chunked prefill with sizes that straddle page boundaries.
        vec![3, 7, 5, 9, 1, 1, 2, 36],
    ];
    let mut worst = 0.0f32;
    for schedule in schedules {
        // Fresh pages, deliberately out of order, for each schedule.
        let mut pages = pool.allocate(pages_for(CONTEXT, PAGE_SIZE)).unwrap();
        pages.reverse();
        for (position, logits) in
            incremental_logits(&engine, &mut store, &pages, &tokens, &schedule)
        {
            let probs = softmax(&logits);
            let expected = &reference[position * VOCAB..(position + 1) * VOCAB];
            for (token, (p, q)) in probs.iter().zip(expected).enumerate() {
                let diff = (p - q).abs();
                worst = worst.max(diff);
                assert!(
                    diff <= 1e-6 + 1e-5 * q.abs(),
                    "schedule {schedule:?}, position {position}, token {token}: {p} vs {q}"
                );
            }
        }
        pool.release(&pages).unwrap();
    }
    eprintln!("largest probability difference: {worst:e}");
    assert_eq!(pool.used(), 0);
}

#[test]
fn q_k_norms_wide_heads_and_a_norm_epsilon_serve_as_they_train() {
    // The serving engine (held to transformers' Qwen3 and OLMoE by the
    // fixtures' goldens) against the training forward, on the shapes
    // fine-tuning brings: q/k norms per head or whole, heads wider than
    // hidden / heads, an epsilon large enough to move every norm.
    for (patch, seed) in [
        (
            serde_json::json!({"headDim": 12, "qkNorm": "perHead", "normEpsilon": 0.05}),
            11,
        ),
        (
            serde_json::json!({"qkNorm": "whole", "normEpsilon": 0.05}),
            12,
        ),
    ] {
        let mut spec = serde_json::to_value(spec_with_context(CONTEXT)).unwrap();
        moe_crds::fixtures::merge_patch(&mut spec, &patch);
        let mut model = model_for(&serde_json::from_value(spec).unwrap(), seed);
        let mut rng = SplitMix64::new(seed);
        for block in &mut model.weights.blocks {
            assert!(!block.q_norm.is_empty(), "{patch}: the model has q/k norms");
            for gain in [&mut block.q_norm, &mut block.k_norm] {
                *gain = gain.iter().map(|_| 1.0 + rng.normal() as f32).collect();
            }
        }
        let tokens = random_tokens(CONTEXT, seed);
        let reference = model.forward(&tokens, &tokens);
        let reference = reference.next_token_probs().to_vec();
        let engine = Engine::new(model);
        let mut store = KvStore::new(engine.kv_shape(PAGE_SIZE), 64);
        let pages: Vec<u32> = (0..pages_for(CONTEXT, PAGE_SIZE) as u32).collect();
        let schedule = prefill_then_decode(40, CONTEXT);
        for (position, logits) in
            incremental_logits(&engine, &mut store, &pages, &tokens, &schedule)
        {
            let probs = softmax(&logits);
            let expected = &reference[position * VOCAB..(position + 1) * VOCAB];
            for (p, q) in probs.iter().zip(expected) {
                assert!(
                    (p - q).abs() <= 1e-6 + 1e-5 * q.abs(),
                    "{patch}, position {position}: {p} vs {q}"
                );
            }
        }
    }
}

#[test]
fn a_sequence_computes_the_same_bits_alone_and_in_a_batch() {
    let engine = Engine::new(tiny_model(5));
    let shape = engine.kv_shape(PAGE_SIZE);
    let prompts: Vec<Vec<u32>> = (0..5)
        .map(|i| random_tokens(3 + 7 * i, 100 + i as u64))
        .collect();
    let pages_each = pages_for(CONTEXT, PAGE_SIZE);

    // Alone: each sequence in its own store.
    let alone: Vec<Vec<f32>> = prompts
        .iter()
        .map(|prompt| {
            let mut store = KvStore::new(shape, pages_each);
            let pages: Vec<u32> = (0..pages_each as u32).collect();
            let chunk = Chunk {
                pages: &pages,
                start: 0,
                tokens: prompt,
                logits: Logits::Last,
                adapter: None,
            };
            engine.step(&mut store, &[chunk]).unwrap()
        })
        .collect();

    // Together: all prefills in one step, sharing one store.
    let mut store = KvStore::new(shape, pages_each * prompts.len());
    let page_tables: Vec<Vec<u32>> = (0..prompts.len())
        .map(|s| {
            (0..pages_each)
                .map(|p| (p * prompts.len() + s) as u32)
                .collect()
        })
        .collect();
    let chunks: Vec<Chunk<'_>> = prompts
        .iter()
        .zip(&page_tables)
        .map(|(prompt, pages)| Chunk {
            pages,
            start: 0,
            tokens: prompt,
            logits: Logits::Last,
            adapter: None,
        })
        .collect();
    let together = engine.step(&mut store, &chunks).unwrap();
    for (i, logits) in alone.iter().enumerate() {
        assert_eq!(
            logits[..],
            together[i * VOCAB..(i + 1) * VOCAB],
            "sequence {i} differs in a batch"
        );
    }
}

/// With `--threads`, the large GEMMs split their output columns across a
/// pool: the logits keep their bits. The model is wide enough that they split.
#[test]
fn threads_compute_the_same_bits_as_one() {
    let mut spec = serde_json::to_value(spec_with_context(CONTEXT)).unwrap();
    spec["hiddenSize"] = 256.into();
    spec["moe"]["expertHiddenSize"] = 512.into();
    let spec = serde_json::from_value(spec).unwrap();
    let one = Engine::new(model_for(&spec, 8));
    let three = Engine::new(model_for(&spec, 8)).with_threads(3).unwrap();
    let shape = one.kv_shape(PAGE_SIZE);
    let prompts = [random_tokens(29, 1), random_tokens(1, 2)];
    let pages: Vec<Vec<u32>> = (0..2u32)
        .map(|s| (0..16).map(|p| 2 * p + s).collect())
        .collect();
    let mut logits = Vec::new();
    for engine in [&one, &three] {
        let mut store = KvStore::new(shape, 32);
        let step = |start: usize, tokens: [&[u32]; 2], store: &mut KvStore| {
            let chunks: Vec<Chunk<'_>> = (0..2)
                .map(|s| Chunk {
                    pages: &pages[s],
                    start: if s == 0 { start } else { start.min(1) },
                    tokens: tokens[s],
                    logits: Logits::Last,
                    adapter: None,
                })
                .collect();
            engine.step(store, &chunks).unwrap()
        };
        // A prefill beside a one-token prompt, then a decode step of both.
        let first = step(0, [&prompts[0], &prompts[1]], &mut store);
        let next = step(29, [&[7], &[9]], &mut store);
        logits.push([first, next]);
    }
    assert_eq!(logits[0], logits[1]);
}

/// A prompt's middle chunk wants no logits: the last layer then runs its
/// feed-forward on no rows, and the cache still gets every position (the
/// next chunk's logits are those of the whole prompt at once).
#[test]
fn a_chunk_without_logits_still_fills_the_cache() {
    let engine = Engine::new(tiny_model(7));
    let tokens = random_tokens(20, 9);
    let pages: Vec<u32> = (0..pages_for(CONTEXT, PAGE_SIZE) as u32).collect();
    let chunk = |start: usize, end: usize, logits: bool| Chunk {
        pages: &pages,
        start,
        tokens: &tokens[start..end],
        logits: Logits::last_if(logits),
        adapter: None,
    };
    let mut store = KvStore::new(engine.kv_shape(PAGE_SIZE), pages.len());
    assert!(
        engine
            .step(&mut store, &[chunk(0, 12, false)])
            .unwrap()
            .is_empty()
    );
    let chunked = engine.step(&mut store, &[chunk(12, 20, true)]).unwrap();
    let mut store = KvStore::new(engine.kv_shape(PAGE_SIZE), pages.len());
    let whole = engine.step(&mut store, &[chunk(0, 20, true)]).unwrap();
    assert_eq!(chunked, whole);
}

/// `Logits::All` (a scored prompt) returns every row's logits, each the
/// bits that prompt's prefix alone gives with `Logits::Last`, beside a
/// sequence that wants only its last row's.
#[test]
fn every_row_of_a_scored_chunk_is_the_logits_of_its_prefix() {
    let engine = Engine::new(tiny_model(8));
    let tokens = random_tokens(13, 4);
    let other = random_tokens(5, 5);
    let each = pages_for(CONTEXT, PAGE_SIZE);
    let pages: Vec<u32> = (0..each as u32).collect();
    let other_pages: Vec<u32> = (each as u32..2 * each as u32).collect();
    let mut store = KvStore::new(engine.kv_shape(PAGE_SIZE), 2 * each);
    let chunks = [
        Chunk {
            pages: &other_pages,
            start: 0,
            tokens: &other,
            logits: Logits::Last,
            adapter: None,
        },
        Chunk {
            pages: &pages,
            start: 0,
            tokens: &tokens,
            logits: Logits::All,
            adapter: None,
        },
    ];
    let all = engine.step(&mut store, &chunks).unwrap();
    assert_eq!(all.len(), (1 + tokens.len()) * VOCAB);
    let prefix = |len: usize, tokens: &[u32], pages: &[u32]| {
        let mut store = KvStore::new(engine.kv_shape(PAGE_SIZE), 2 * each);
        let chunk = Chunk {
            pages,
            start: 0,
            tokens: &tokens[..len],
            logits: Logits::Last,
            adapter: None,
        };
        engine.step(&mut store, &[chunk]).unwrap()
    };
    assert_eq!(all[..VOCAB], prefix(other.len(), &other, &other_pages)[..]);
    for row in 0..tokens.len() {
        assert_eq!(
            all[(1 + row) * VOCAB..(2 + row) * VOCAB],
            prefix(row + 1, &tokens, &pages)[..],
            "row {row}"
        );
    }
}

#[test]
fn impossible_steps_are_errors_not_panics() {
    let engine = Engine::new(tiny_model(6));
    let mut store = KvStore::new(engine.kv_shape(PAGE_SIZE), 2);
    let pages = [0, 1];
    let step = |store: &mut KvStore, start: usize, tokens: &[u32]| {
        let chunk = Chunk {
            pages: &pages,
            start,
            tokens,
            logits: Logits::Last,
            adapter: None,
        };
        engine.step(store, &[chunk]).map(|_| ())
    };
    assert_eq!(step(&mut store, 0, &[]), Err(StepError::EmptyChunk));
    assert_eq!(
        step(&mut store, 0, &[1; 9]),
        Err(StepError::NotEnoughPages {
            position: 8,
            pages: 2
        })
    );
    assert_eq!(
        step(&mut store, CONTEXT, &[1]),
        Err(StepError::BeyondContext {
            position: CONTEXT,
            context: CONTEXT
        })
    );
    assert_eq!(
        step(&mut store, 0, &[256]),
        Err(StepError::TokenOutOfVocabulary(256))
    );
}
