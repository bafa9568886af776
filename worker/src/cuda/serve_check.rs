//! The GPU serving engine against the CPU's: the check group "serve" of
//! [`super::check`].
//!
//! Kernels first, each against the CPU engine's own code: the KV write
//! (a copy: bit-identical to [`KvStore::write`]), the paged attention
//! (against `serve::engine::attend`: different summation order and `expf`,
//! so within 1e-4 relative), the per-row RoPE (against `serve::engine::rotate`),
//! and the row helpers. Then whole models: the Hugging Face fixtures the
//! serving tests use (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) and a native
//! model with a dense first block, a shared expert and group-limited sigmoid
//! routing, each run through the same schedule of steps on the CPU
//! [`Engine`] and on the [`DeviceEngine`]: a prefill across page
//! boundaries, decodes, and mixed steps where one sequence prefills (in two
//! chunks) while the other decodes, with pages out of order.
//!
//! Logits bound: the device's projections run on TF32 tensor cores (10
//! mantissa bits per product, f32 sums) where the CPU's are exact f32, so
//! logits agree to about 1e-3 of their largest magnitude, not bit for bit;
//! the bound is 1e-2 of it (the training check's for gradients), while a
//! wrong index, page or transpose is off by O(1). The routers are exact f32
//! on both sides but see TF32-perturbed inputs, so a near-tie in top-k could
//! flip an expert: that shows as a logits failure, not hidden by the bound.
//! Greedy tokens must match except where the CPU's own two candidates are
//! closer than twice the bound (a near-tie TF32 may flip; counted and shown).
//!
//! Then the same schedule on each model split over an expert-parallel
//! replica of two device engines in this process (`serve_replica_check`).

use super::check::{Check, close, close_to_scale, exact};
use super::paged_attention::{self, StepIndex};
use super::rope::DeviceRope;
use super::serve::DeviceEngine;
use super::{Gpu, Result, vector};
use crate::model::{FeedForward, Model, ModelConfig};
use crate::ops::rope::RopeTable;
use crate::rng::SplitMix64;
use crate::serve::device::StepLayout;
use crate::serve::engine::{self, Chunk, Engine, Logits};
use crate::serve::kv_cache::{KvShape, KvStore, PageId, pages_for};
use crate::serve::model::{RopeLayout, ServeFfn, ServeModel};
use std::path::PathBuf;

/// The logits' bound, as a fraction of their largest magnitude (see above).
const LOGITS_BOUND: f64 = 1e-2;
/// Positions per page in the model schedules: small, so sequences cross
/// page boundaries within a few tokens.
pub(super) const PAGE_SIZE: usize = 4;

/// `(heads, kv_heads, head_dim, page size, sequence lengths, score scale)`.
type AttentionCase = (usize, usize, usize, usize, &'static [usize], f32);

pub fn check_serve(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    let cases: [AttentionCase; 6] = [
        (4, 2, 16, 3, &[11, 5, 9, 1], 1.0),
        (8, 2, 64, 16, &[40, 17, 16], 1.0),
        (4, 4, 128, 16, &[33, 2], 1.0),
        (2, 1, 256, 5, &[12, 21], 1.0),
        // Sharp scores (logits in the hundreds): the online softmax's rescaling.
        (4, 1, 64, 16, &[70, 3], 30.0),
        // A long decode: one row at position 999 over 63 pages.
        (4, 1, 64, 16, &[1000], 1.0),
    ];
    for (i, &(heads, kv_heads, head_dim, page_size, lengths, sharpness)) in cases.iter().enumerate()
    {
        checks.extend(attention_case(
            gpu,
            (heads, kv_heads, head_dim),
            page_size,
            lengths,
            sharpness,
            100 + i as u64,
        )?);
    }
    checks.extend(check_rope_positions(gpu)?);
    checks.extend(check_row_helpers(gpu)?);
    for (name, model) in models() {
        match model.and_then(|model| check_model(gpu, name, model).map_err(|e| e.to_string())) {
            Ok(results) => checks.extend(results),
            Err(error) => checks.push(Check {
                op: "serve.model",
                case: name.to_string(),
                passed: false,
                error,
                bound: "-".to_string(),
            }),
        }
    }
    // The same models as a replica of two ranks on this GPU.
    checks.extend(super::serve_replica_check::check_replicas(gpu, models()));
    Ok(checks)
}

/// Sequences of `lengths` on shuffled pages of `page_size`: every position's
/// key and value written by one `kv_write` (checked exact against
/// [`KvStore::write`]), then every row's paged attention (as a prefill: each
/// row up to its own position; the last row of each sequence is a decode),
/// once for all rows and once for each sequence's last row only.
fn attention_case(
    gpu: &Gpu,
    (heads, kv_heads, head_dim): (usize, usize, usize),
    page_size: usize,
    lengths: &[usize],
    sharpness: f32,
    seed: u64,
) -> Result<Vec<Check>> {
    let mut rng = SplitMix64::new(seed);
    let kv_width = kv_heads * head_dim;
    let q_width = heads * head_dim;
    let needed: usize = lengths.iter().map(|&l| pages_for(l, page_size)).sum();
    let pool = needed + 3;
    let mut ids: Vec<PageId> = (0..pool as PageId).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.below(i + 1));
    }
    let mut page_lists: Vec<Vec<PageId>> = Vec::new();
    let mut next = 0;
    for &length in lengths {
        let count = pages_for(length, page_size);
        page_lists.push(ids[next..next + count].to_vec());
        next += count;
    }
    let tokens: Vec<Vec<u32>> = lengths.iter().map(|&l| vec![0; l]).collect();
    let chunks: Vec<Chunk<'_>> = page_lists
        .iter()
        .zip(&tokens)
        .map(|(pages, tokens)| Chunk {
            pages,
            start: 0,
            tokens,
            logits: Logits::Last,
            adapter: None,
        })
        .collect();
    let layout = StepLayout::new(&chunks, page_size);
    let rows = layout.rows();
    let k: Vec<f32> = rng.normal_vec(rows * kv_width, 1.0);
    let v: Vec<f32> = rng.normal_vec(rows * kv_width, 1.0);
    let q: Vec<f32> = rng
        .normal_vec::<f32>(rows * q_width, 1.0)
        .into_iter()
        .map(|x| x * sharpness)
        .collect();

    // The CPU's cache, position by position, in row order.
    let shape = KvShape {
        layers: 1,
        key_width: kv_width,
        value_width: kv_width,
        page_size,
    };
    let mut store = KvStore::new(shape, pool);
    let mut sequence_of_row = Vec::with_capacity(rows);
    let mut r = 0;
    for (s, chunk) in chunks.iter().enumerate() {
        for position in 0..chunk.tokens.len() {
            let at = r * kv_width..(r + 1) * kv_width;
            store.write(0, chunk.pages, position, &k[at.clone()], &v[at]);
            sequence_of_row.push((s, position));
            r += 1;
        }
    }

    let pool_len = pool * page_size * kv_width;
    let (mut keys, mut values) = (gpu.zeros::<f32>(pool_len)?, gpu.zeros::<f32>(pool_len)?);
    let (k_d, v_d, slots) = (gpu.upload(&k)?, gpu.upload(&v)?, gpu.upload(&layout.slots)?);
    paged_attention::kv_write(gpu, &mut keys, &mut values, &k_d, &v_d, &slots)?;
    let case = format!(
        "h {heads}/{kv_heads} d {head_dim} page {page_size} len {lengths:?}{}",
        if sharpness == 1.0 { "" } else { " sharp" }
    );
    // The whole pools, unwritten rows (zeros) included, against the CPU
    // store read page by page: nothing written elsewhere either.
    let mut cpu_keys = Vec::with_capacity(pool_len);
    let mut cpu_values = Vec::with_capacity(pool_len);
    for page in 0..pool as PageId {
        for slot in 0..page_size {
            cpu_keys.extend_from_slice(store.key(0, &[page], slot));
            cpu_values.extend_from_slice(store.value(0, &[page], slot));
        }
    }
    let mut checks = vec![
        exact(
            "serve.kv_write.keys",
            &case,
            &bits(&gpu.download(&keys)?),
            &bits(&cpu_keys),
        ),
        exact(
            "serve.kv_write.values",
            &case,
            &bits(&gpu.download(&values)?),
            &bits(&cpu_values),
        ),
    ];

    let positions = gpu.upload(&layout.positions)?;
    let table_offsets = gpu.upload(&layout.table_offsets)?;
    let page_table = gpu.upload(&layout.page_table)?;
    let index = StepIndex {
        positions: &positions,
        table_offsets: &table_offsets,
        page_table: &page_table,
        page_size,
    };
    let q_d = gpu.upload(&q)?;
    let all: Vec<i32> = layout.all_rows();
    let last: Vec<i32> = layout.logit_rows.clone();
    for (which, query_rows) in [("every row", all), ("last rows", last)] {
        let mut expected = vec![0.0; query_rows.len() * q_width];
        for (out, &r) in expected.chunks_exact_mut(q_width).zip(&query_rows) {
            let (s, position) = sequence_of_row[r as usize];
            let q_row = &q[r as usize * q_width..(r as usize + 1) * q_width];
            engine::attend(
                out,
                q_row,
                (heads, kv_heads, head_dim),
                &store,
                0,
                chunks[s].pages,
                position,
            );
        }
        let rows_d = gpu.upload(&query_rows)?;
        let mut out = gpu.zeros::<f32>(query_rows.len() * q_width)?;
        paged_attention::paged_attention(
            gpu,
            &mut out,
            &q_d,
            &keys,
            &values,
            &rows_d,
            &index,
            (heads, kv_heads, head_dim),
        )?;
        // Outputs are convex mixes of unit-scale values: 2e-5 absolute. A
        // score `sharpness` times larger carries that much more rounding
        // (the dot products' summation orders differ), which the softmax
        // turns into weight errors of the same relative size.
        checks.push(close(
            "serve.paged_attention",
            &format!("{case}, {which}"),
            &gpu.download(&out)?,
            &expected,
            2e-5 * f64::from(sharpness),
            1e-4,
        ));
    }
    Ok(checks)
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// The per-row RoPE against the CPU engine's, both pairings, rows at
/// scattered positions (a step's mix of sequences).
fn check_rope_positions(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    let mut rng = SplitMix64::new(7);
    for (heads, head_dim, context) in [(4, 16, 64), (2, 128, 4096), (8, 64, 300)] {
        let table = RopeTable::<f32>::new(context, head_dim, 10_000.0);
        let device_table = DeviceRope::new(gpu, &table, head_dim)?;
        let rows = 37;
        let positions: Vec<i32> = (0..rows).map(|_| rng.below(context) as i32).collect();
        let x: Vec<f32> = rng.normal_vec(rows * heads * head_dim, 1.0);
        for layout in [RopeLayout::Interleaved, RopeLayout::Halves] {
            let mut expected = x.clone();
            let width = heads * head_dim;
            for (row, &p) in expected.chunks_exact_mut(width).zip(&positions) {
                engine::rotate(row, p as usize, head_dim, layout, &table);
            }
            let mut x_d = gpu.upload(&x)?;
            let positions_d = gpu.upload(&positions)?;
            let halves = layout == RopeLayout::Halves;
            device_table.forward_at(gpu, &mut x_d, &positions_d, heads, halves)?;
            checks.push(close(
                "serve.rope_positions",
                &format!("{layout:?} heads {heads} d {head_dim} context {context}"),
                &gpu.download(&x_d)?,
                &expected,
                1e-6,
                1e-5,
            ));
        }
    }
    Ok(checks)
}

/// Bias rows, clamp and gather (exact: one operation each, as on the CPU)
/// and the sigmoid-gated add (`expf` against Rust's `exp`).
fn check_row_helpers(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut rng = SplitMix64::new(11);
    let (rows, width) = (19, 72);
    let x: Vec<f32> = rng.normal_vec(rows * width, 2.0);
    let bias: Vec<f32> = rng.normal_vec(width, 1.0);
    let case = format!("{rows} x {width}");
    let mut checks = Vec::new();

    let mut expected = x.clone();
    for row in expected.chunks_exact_mut(width) {
        for (v, b) in row.iter_mut().zip(&bias) {
            *v += b;
        }
    }
    let mut x_d = gpu.upload(&x)?;
    vector::add_bias_rows(gpu, &mut x_d, &gpu.upload(&bias)?)?;
    checks.push(exact(
        "serve.add_bias_rows",
        &case,
        &bits(&gpu.download(&x_d)?),
        &bits(&expected),
    ));

    let clip = 1.5f32;
    let expected: Vec<f32> = x.iter().map(|v| v.clamp(-clip, clip)).collect();
    let mut x_d = gpu.upload(&x)?;
    vector::clamp(gpu, &mut x_d, clip)?;
    checks.push(exact(
        "serve.clamp",
        &case,
        &bits(&gpu.download(&x_d)?),
        &bits(&expected),
    ));

    let picked: Vec<i32> = vec![18, 0, 7, 7, 3];
    let expected: Vec<f32> = picked
        .iter()
        .flat_map(|&r| {
            x[r as usize * width..(r as usize + 1) * width]
                .iter()
                .copied()
        })
        .collect();
    let mut out = gpu.zeros::<f32>(picked.len() * width)?;
    vector::gather_rows(
        gpu,
        &mut out,
        &gpu.upload(&x)?,
        &gpu.upload(&picked)?,
        width,
    )?;
    checks.push(exact(
        "serve.gather_rows",
        &case,
        &bits(&gpu.download(&out)?),
        &bits(&expected),
    ));

    let shared: Vec<f32> = rng.normal_vec(rows * width, 1.0);
    let gate: Vec<f32> = rng.normal_vec(rows, 3.0);
    let mut expected = x.clone();
    for ((row, s), &g) in expected
        .chunks_exact_mut(width)
        .zip(shared.chunks_exact(width))
        .zip(&gate)
    {
        let g = 1.0 / (1.0 + (-g).exp());
        for (o, &v) in row.iter_mut().zip(s) {
            *o += g * v;
        }
    }
    let mut x_d = gpu.upload(&x)?;
    vector::add_sigmoid_gated(gpu, &mut x_d, &gpu.upload(&shared)?, &gpu.upload(&gate)?)?;
    checks.push(close(
        "serve.add_sigmoid_gated",
        &case,
        &gpu.download(&x_d)?,
        &expected,
        1e-6,
        1e-5,
    ));
    Ok(checks)
}

/// The models the schedule runs: a native one and the Hugging Face
/// fixtures (read from `worker/tests/fixtures/hf`, relative to the
/// repository root the GPU check runs from, or `$MOE_SERVE_FIXTURES`).
pub(super) fn models() -> Vec<(&'static str, std::result::Result<ServeModel, String>)> {
    let mut models = vec![("native", Ok(native_model()))];
    let root = std::env::var_os("MOE_SERVE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("worker/tests/fixtures/hf"));
    let root = if root.is_dir() {
        root
    } else {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/hf"))
    };
    for name in ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"] {
        let dir = root.join(name);
        let loaded = crate::serve::load::load(&dir, None, None)
            .map(|loaded| loaded.model.into_serve_model())
            .map_err(|e| format!("cannot load {}: {e}", dir.display()));
        models.push((name, loaded));
    }
    models
}

/// Three blocks (the first dense), GQA 4/2, MoE with 8 experts, top 2, a
/// shared expert and sigmoid routing limited to 2 of 4 groups, random
/// selection biases (so the biased top-k matters).
fn native_model() -> ServeModel {
    let spec: moe_crds::ModelSpec = serde_json::from_value(serde_json::json!({
        "vocabSize": 256, "hiddenSize": 64, "layers": 3, "denseLayers": 1,
        "denseHiddenSize": 96, "attentionHeads": 4, "kvHeads": 2, "seqLen": 64,
        "moe": {"experts": 8, "topK": 2, "sharedExperts": 1, "expertHiddenSize": 32,
                "router": "sigmoid", "groups": 4, "topGroups": 2, "routedScalingFactor": 2.0}
    }))
    .expect("a valid model spec");
    let config = ModelConfig::from_spec(&spec).expect("a valid model config");
    let mut model = Model::<f32>::initial(config, 3);
    let mut rng = SplitMix64::new(4);
    for block in &mut model.weights.blocks {
        if let FeedForward::Moe(layer) = &mut block.ffn {
            layer.selection_bias = rng.normal_vec(layer.selection_bias.len(), 0.01);
        }
    }
    let model = ServeModel::from_native(model);
    debug_assert!(
        model
            .blocks
            .iter()
            .any(|b| matches!(b.ffn, ServeFfn::Moe { .. }))
    );
    model
}

/// One sequence of the schedule: its pages and its tokens so far.
pub(super) struct Sequence {
    pub(super) pages: Vec<PageId>,
    pub(super) tokens: Vec<u32>,
    /// Positions already in the cache.
    pub(super) cached: usize,
}

/// What one run of the schedule found.
pub(super) struct Outcome {
    pub(super) steps: usize,
    pub(super) logits_passed: bool,
    pub(super) tokens_passed: bool,
    /// Greedy tokens that differ where the CPU's margin is within the bound.
    pub(super) near_ties: usize,
    /// The worst step's largest logits difference, as a fraction of its bound.
    pub(super) worst_ratio: f64,
    pub(super) worst: String,
    /// The two sequences as they ended (their pages and cached positions).
    pub(super) sequences: [Sequence; 2],
}

/// A step on one engine: its logits, or why it failed.
pub(super) type StepFn<'a> = dyn FnMut(&[Chunk<'_>]) -> std::result::Result<Vec<f32>, String> + 'a;

/// The schedule, step by step on `reference` (the CPU) and `candidate`
/// (the device): logits and greedy tokens compared, the reference's token
/// fed to both (so the steps stay the same). Pages out of order; sequence
/// A prefills 11 tokens over three pages, then decodes (into its fourth
/// page); B prefills 11 in a chunk of 6 without logits and one of 5 with,
/// each while A decodes, then both decode.
pub(super) fn run_schedule(
    name: &str,
    vocab: usize,
    reference: &mut StepFn<'_>,
    candidate: &mut StepFn<'_>,
) -> std::result::Result<Outcome, String> {
    let prompt = |seed: u64, len: usize| -> Vec<u32> {
        let mut rng = SplitMix64::new(seed);
        (0..len).map(|_| rng.below(vocab) as u32).collect()
    };
    let mut a = Sequence {
        pages: vec![9, 2, 14, 5, 0, 11],
        tokens: prompt(1, 11),
        cached: 0,
    };
    let mut b = Sequence {
        pages: vec![7, 13, 3, 1, 15],
        tokens: prompt(2, 11),
        cached: 0,
    };
    // Per step, B's new tokens and whether it wants logits (A runs every step).
    let schedule: [Option<(usize, bool)>; 9] = [
        None,
        None,
        None,
        None,
        None,
        Some((6, false)),
        Some((5, true)),
        Some((1, true)),
        Some((1, true)),
    ];
    let mut outcome = Outcome {
        steps: schedule.len(),
        logits_passed: true,
        tokens_passed: true,
        near_ties: 0,
        worst_ratio: 0.0,
        worst: String::new(),
        sequences: [
            Sequence {
                pages: Vec::new(),
                tokens: Vec::new(),
                cached: 0,
            },
            Sequence {
                pages: Vec::new(),
                tokens: Vec::new(),
                cached: 0,
            },
        ],
    };
    for (step, &b_part) in schedule.iter().enumerate() {
        // A: the whole prompt first, then the token sampled last step.
        let a_new = a.tokens.len() - a.cached;
        let mut chunks = vec![Chunk {
            pages: &a.pages,
            start: a.cached,
            tokens: &a.tokens[a.cached..a.cached + a_new],
            logits: Logits::Last,
            adapter: None,
        }];
        let mut owners = vec![0];
        if let Some((count, logits)) = b_part {
            chunks.push(Chunk {
                pages: &b.pages,
                start: b.cached,
                tokens: &b.tokens[b.cached..b.cached + count],
                logits: Logits::last_if(logits),
                adapter: None,
            });
            if logits {
                owners.push(1);
            }
        }
        let rows: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        let case = format!("{name} step {step} ({rows} rows)");
        let expected = reference(&chunks).map_err(|e| format!("{case}: CPU: {e}"))?;
        let got = candidate(&chunks).map_err(|e| format!("{case}: device: {e}"))?;
        if got.len() != expected.len() || expected.len() != owners.len() * vocab {
            return Err(format!(
                "{case}: {} logits from the device, {} from the CPU, {} rows of {vocab} wanted",
                got.len(),
                expected.len(),
                owners.len()
            ));
        }
        let check = close_to_scale("serve.model.logits", &case, &got, &expected, LOGITS_BOUND);
        let scale = expected
            .iter()
            .fold(0.0f64, |m, &v| m.max(f64::from(v).abs()));
        let bound = LOGITS_BOUND * scale.max(f64::MIN_POSITIVE);
        let ratio = max_abs_diff(&got, &expected) / bound;
        if ratio > outcome.worst_ratio || (!check.passed && outcome.logits_passed) {
            outcome.worst_ratio = outcome.worst_ratio.max(ratio);
            outcome.worst = format!("{case}: {}", check.error);
        }
        outcome.logits_passed &= check.passed;
        let mut next = Vec::new();
        for (cpu_row, gpu_row) in expected.chunks_exact(vocab).zip(got.chunks_exact(vocab)) {
            let (cpu_best, gpu_best) = (argmax(cpu_row), argmax(gpu_row));
            if cpu_best != gpu_best {
                if f64::from(cpu_row[cpu_best] - cpu_row[gpu_best]) <= 2.0 * bound {
                    outcome.near_ties += 1;
                } else {
                    outcome.tokens_passed = false;
                }
            }
            next.push(cpu_best as u32);
        }
        a.cached += a_new;
        if let Some((count, _)) = b_part {
            b.cached += count;
        }
        for (&owner, token) in owners.iter().zip(next) {
            let sequence = if owner == 0 { &mut a } else { &mut b };
            // Only a sequence past its prompt samples.
            if sequence.cached == sequence.tokens.len() {
                sequence.tokens.push(token);
            }
        }
    }
    outcome.sequences = [a, b];
    Ok(outcome)
}

/// The schedule on both engines ([`run_schedule`]), then every cached key
/// and value of both sequences compared.
fn check_model(gpu: &Gpu, name: &str, model: ServeModel) -> Result<Vec<Check>> {
    let vocab = model.config.vocab;
    let layers = model.config.layers;
    let cpu = Engine::serve(model.clone());
    let device = DeviceEngine::new(gpu, &model)?;
    let pages = 16;
    let mut store = KvStore::new(cpu.kv_shape(PAGE_SIZE), pages);
    let mut cache = device.cache(PAGE_SIZE, pages)?;
    let ran = run_schedule(
        name,
        vocab,
        &mut |chunks| cpu.step(&mut store, chunks).map_err(|e| e.to_string()),
        &mut |chunks| device.step(&mut cache, chunks).map_err(|e| e.to_string()),
    );
    let outcome = match ran {
        Ok(outcome) => outcome,
        Err(error) => {
            return Ok(vec![Check {
                op: "serve.model.step",
                case: name.to_string(),
                passed: false,
                error,
                bound: "-".to_string(),
            }]);
        }
    };
    let mut checks = outcome_checks(name, &outcome);
    // Every cached key and value of both sequences, every layer.
    let (mut got, mut expected) = (Vec::new(), Vec::new());
    let width = cpu.kv_shape(PAGE_SIZE).key_width;
    for layer in 0..layers {
        let (keys, values) = cache.layer(layer);
        let (keys, values) = (gpu.download(keys)?, gpu.download(values)?);
        for sequence in &outcome.sequences {
            for position in 0..sequence.cached {
                let page = sequence.pages[position / PAGE_SIZE] as usize;
                let slot = page * PAGE_SIZE + position % PAGE_SIZE;
                got.extend_from_slice(&keys[slot * width..(slot + 1) * width]);
                got.extend_from_slice(&values[slot * width..(slot + 1) * width]);
                expected.extend_from_slice(store.key(layer, &sequence.pages, position));
                expected.extend_from_slice(store.value(layer, &sequence.pages, position));
            }
        }
    }
    let positions: usize = outcome.sequences.iter().map(|s| s.cached).sum();
    checks.push(close_to_scale(
        "serve.model.kv_cache",
        &format!("{name}, {layers} layers, {positions} positions"),
        &got,
        &expected,
        LOGITS_BOUND,
    ));
    Ok(checks)
}

/// The logits and greedy-token checks of one schedule run.
pub(super) fn outcome_checks(name: &str, outcome: &Outcome) -> Vec<Check> {
    let case = format!("{name}, {} steps", outcome.steps);
    vec![
        Check {
            op: "serve.model.logits",
            case: case.clone(),
            passed: outcome.logits_passed,
            error: format!(
                "worst {:.0}% of bound: {}",
                outcome.worst_ratio * 100.0,
                outcome.worst
            ),
            bound: format!("{LOGITS_BOUND:.0e} x max|logits| per step (TF32)"),
        },
        Check {
            op: "serve.model.greedy",
            case,
            passed: outcome.tokens_passed,
            error: format!("{} near-tie flips", outcome.near_ties),
            bound: "equal unless the CPU's margin < 2 x the logits bound".to_string(),
        },
    ]
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).abs())
        .fold(0.0, f64::max)
}

/// The first index of the largest value.
fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The schedule itself, with the CPU engine on both sides (no GPU
    /// needed): every model loads, every step runs, and two copies of one
    /// engine agree to the bit, so the harness cannot fail the device for
    /// its own mistakes.
    #[test]
    fn the_schedule_runs_every_model_and_a_cpu_matches_itself() {
        for (name, model) in models() {
            let model = model.unwrap_or_else(|e| panic!("{name}: {e}"));
            let vocab = model.config.vocab;
            let (first, second) = (Engine::serve(model.clone()), Engine::serve(model));
            let mut stores = [
                KvStore::new(first.kv_shape(PAGE_SIZE), 16),
                KvStore::new(second.kv_shape(PAGE_SIZE), 16),
            ];
            let [one, two] = &mut stores;
            let outcome = run_schedule(
                name,
                vocab,
                &mut |chunks| first.step(one, chunks).map_err(|e| e.to_string()),
                &mut |chunks| second.step(two, chunks).map_err(|e| e.to_string()),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            assert!(outcome.logits_passed && outcome.tokens_passed, "{name}");
            assert_eq!((outcome.near_ties, outcome.worst_ratio), (0, 0.0), "{name}");
            // A: 11 prompt positions and 8 decodes; B: 11 and 2.
            let cached: Vec<usize> = outcome.sequences.iter().map(|s| s.cached).collect();
            assert_eq!(cached, [19, 13], "{name}");
            assert!(outcome_checks(name, &outcome).iter().all(|c| c.passed));
        }
    }
}
