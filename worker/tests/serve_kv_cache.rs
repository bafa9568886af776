//! The serving forward with a paged KV cache against the training forward:
//! a prompt prefilled (whole or in chunks) and then decoded one token at a
//! time must give, at every position, the next-token distribution
//! `Model::forward` computes over the whole sequence at once; and a
//! sequence's logits must not depend on what else shares its step.

mod serve_support;

use moe_worker::rng::SplitMix64;
use moe_worker::serve::engine::{Chunk, Engine, StepError};
use moe_worker::serve::kv_cache::{KvStore, PageAllocator, pages_for};
use serve_support::{CONTEXT, tiny_model};

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
            logits: true,
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
    let mut pool = PageAllocator::new(64);
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
        pool.free(&pages).unwrap();
    }
    eprintln!("largest probability difference: {worst:e}");
    assert_eq!(pool.used(), 0);
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
                logits: true,
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
            logits: true,
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
            logits: true,
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
