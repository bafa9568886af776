//! Expert-parallel serving: one replica as 2 or 4 ranks, each holding
//! `1/P` of every MoE layer's routed experts, the leader (rank 0) planning
//! and sampling, the followers running its steps (docs/serving.md).
//!
//! - The same scripted steps (several concurrent sequences, chunked
//!   prefills, decodes, a freed sequence's page reused, skewed routing
//!   that leaves ranks without rows) give rank 0 the single process's
//!   logits to the bit, and so the same greedy tokens, for 1, 2 and 4
//!   ranks, with native checkpoints (unsharded and sharded as training
//!   writes them) and the Hugging Face fixtures. Ranks load only
//!   their own experts: their copies of the model lack the others'.
//! - Over HTTP, in-process: a leader and its followers answer completions
//!   (with log-probabilities) exactly as one server does.
//! - A follower that dies fails the leader (readiness 503, requests 503)
//!   and the other followers within the collective timeout.
//! - `moe-worker serve` as the operator starts it: a two-rank launch
//!   answers like one process, reports its collective bytes, stops cleanly
//!   on SIGTERM; a SIGKILLed rank ends the launch within the timeout, the
//!   launcher naming it; and as two "pods" with their own probes.

mod dist_support;
mod serve_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use moe_crds::{
    Device, ExpertLoadBalancing, ModelFormat, ServingConfig, ServingParallelism, ServingPrecision,
};
use moe_worker::checkpoint;
use moe_worker::dist::Collective;
use moe_worker::dist::env::Timeouts;
use moe_worker::dist::launch::free_local_port;
use moe_worker::model::Model;
use moe_worker::ops::packed_linear::WeightPrecision;
use moe_worker::rng::SplitMix64;
use moe_worker::serve::engine::{Chunk, Engine, Logits};
use moe_worker::serve::kv_cache::{KvStore, PageId};
use moe_worker::serve::load::{self, LoadedModel};
use moe_worker::serve::lockstep::{self, Lockstep, Message, StepPlan};
use moe_worker::serve::metrics::Metrics;
use moe_worker::serve::rebalance::LayerRebalance;
use moe_worker::serve::replica::{self, Joined};
use moe_worker::serve::{self, ServeOptions, Server};
use serde_json::{Value, json};

use serve_support::{TempDir, full_text, model_for, post_json, request, streamed_text};

const BINARY: &str = env!("CARGO_BIN_EXE_moe-worker");
const PAGE_SIZE: usize = 16;
/// Tags this test's processes (to find a rank's pid).
const MARKER: &str = "MOE_TEST_EP_SERVE";
/// Short, so a hung rank fails the others fast (a dead one does at once).
const COLLECTIVE_TIMEOUT_SECONDS: u64 = 3;

/// 8 routed experts (2 per rank at 4 ranks), a shared expert, 3 layers of
/// which the first is dense.
fn spec8() -> moe_crds::ModelSpec {
    serde_json::from_value(json!({
        "vocabSize": 256, "hiddenSize": 32, "layers": 3, "denseLayers": 1,
        "attentionHeads": 4, "kvHeads": 2, "seqLen": 64,
        "moe": {"experts": 8, "topK": 2, "sharedExperts": 1, "expertHiddenSize": 24, "router": "sigmoid"},
    }))
    .unwrap()
}

/// Random selection biases: uneven loads.
fn model8(seed: u64) -> Model<f32> {
    model_for(&spec8(), seed)
}

/// Every token's two experts are 5 and 7 (sigmoid scores lie in (0, 1); a
/// bias of 10 outweighs any), so at 4 ranks ranks 0 and 1 own no expert
/// that receives a row, and at 2 ranks rank 0 none.
fn skewed_model8(seed: u64) -> Model<f32> {
    let mut model = model8(seed);
    for layer in model.moe_layers_mut() {
        layer.selection_bias.fill(0.0);
        layer.selection_bias[5] = 10.0;
        layer.selection_bias[7] = 10.0;
    }
    model
}

fn timeouts(collective: Duration) -> Timeouts {
    Timeouts {
        rendezvous: Duration::from_secs(30),
        collective,
        checkpoint: Duration::from_secs(30),
    }
}

fn options(dir: &Path) -> ServeOptions {
    ServeOptions {
        kv_cache_bytes: 4 << 20,
        page_size: PAGE_SIZE,
        ..serve_support::options(dir)
    }
}

/// Writes `model` as expert-parallel training does with `shards` expert
/// shards (`checkpoint::{begin, write_expert_shard, commit}`), into
/// `dir/checkpoints/`.
fn write_sharded(dir: &Path, model: &Model<f32>, shards: usize) -> PathBuf {
    let spec = spec8();
    let optimizer = serve_support::optimizer(model);
    let snapshot = serve_support::snapshot(&spec, model, &optimizer);
    let checkpoints = dir.join("checkpoints");
    let temporary = checkpoint::begin(&checkpoints, optimizer.updates).unwrap();
    let per = 8 / shards;
    let written = (0..shards)
        .map(|s| checkpoint::write_expert_shard(&temporary, &snapshot, s * per..(s + 1) * per))
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    checkpoint::commit(&checkpoints, 1, &snapshot, &temporary, written).unwrap()
}

/// A copy of a sharded checkpoint without the shards that hold none of
/// `experts`: a rank that loads from it proves it reads only its own.
fn without_other_shards(checkpoint: &Path, experts: &Range<usize>, to: &Path) -> PathBuf {
    let target = to.join(checkpoint.file_name().unwrap());
    std::fs::create_dir_all(&target).unwrap();
    for entry in std::fs::read_dir(checkpoint).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        if let Some(range) = name
            .strip_prefix("experts-")
            .and_then(|r| r.strip_suffix(".safetensors"))
        {
            let (a, b) = range.split_once('-').unwrap();
            let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
            if b <= experts.start || experts.end <= a {
                continue;
            }
        }
        std::fs::copy(entry.path(), target.join(&name)).unwrap();
    }
    target
}

/// A copy of a Hugging Face model directory with an index whose other
/// experts' tensors point at a shard that does not exist: loading it reads
/// only `experts`' tensors, or fails naming the missing shard.
fn hf_without_other_experts(dir: &Path, experts: &Range<usize>, to: &Path) -> PathBuf {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
    let index_path = to.join("model.safetensors.index.json");
    let mut index: Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let map = index["weight_map"].as_object_mut().unwrap();
    let mut moved = 0;
    for (name, file) in map.iter_mut() {
        let expert = name
            .split(".experts.")
            .nth(1)
            .and_then(|rest| rest.split('.').next())
            .and_then(|e| e.parse::<usize>().ok());
        if expert.is_some_and(|e| !experts.contains(&e)) {
            *file = json!("not-on-this-rank.safetensors");
            moved += 1;
        }
    }
    assert!(moved > 0, "the fixture's experts are named as expected");
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    to.to_path_buf()
}

/// One sequence of the script.
struct Seq {
    prompt: Vec<u32>,
    /// Prompt tokens fed per step.
    chunk: usize,
    pages: Vec<PageId>,
    first_step: usize,
    max_new: usize,
    tokens: Vec<u32>,
    cached: usize,
    done: bool,
}

/// What rank 0 computed: every logits row (step, sequence, row), and each
/// sequence's greedy completion.
#[derive(Debug, PartialEq)]
struct Trace {
    rows: Vec<(usize, usize, Vec<u32>)>,
    completions: Vec<Vec<u32>>,
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Runs the script through `step`: five sequences of different lengths,
/// prefills whole and chunked, decodes, one sequence starting late, one
/// reusing a finished sequence's page; up to four sequences per step.
fn drive(vocab: usize, mut step: impl FnMut(&[Chunk<'_>]) -> Vec<f32>) -> Trace {
    let mut rng = SplitMix64::new(77);
    let mut prompt = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| (rng.next_u64() % vocab.min(256) as u64) as u32)
            .collect()
    };
    let mut seqs = vec![
        (prompt(13), 13, vec![5, 2], 0, 10),
        (prompt(5), 5, vec![7], 0, 6),
        (prompt(20), 7, vec![0, 9], 0, 6),
        (prompt(30), 16, vec![3, 4, 8], 2, 5),
        // Page 7 again: sequence 1 has finished by then.
        (prompt(3), 3, vec![7], 9, 12),
    ]
    .into_iter()
    .map(|(prompt, chunk, pages, first_step, max_new)| Seq {
        tokens: prompt.clone(),
        prompt,
        chunk,
        pages,
        first_step,
        max_new,
        cached: 0,
        done: false,
    })
    .collect::<Vec<_>>();
    let mut rows = Vec::new();
    let mut step_no = 0;
    while seqs.iter().any(|s| !s.done) {
        assert!(step_no < 100, "the script does not end");
        // (sequence, start, len, logits)
        let mut work = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            if s.done || step_no < s.first_step {
                continue;
            }
            let (len, logits) = if s.cached < s.prompt.len() {
                let len = s.chunk.min(s.prompt.len() - s.cached);
                (len, s.cached + len == s.prompt.len())
            } else {
                (1, true)
            };
            work.push((i, s.cached, len, logits));
        }
        if !work.is_empty() {
            let chunks: Vec<Chunk<'_>> = work
                .iter()
                .map(|&(i, start, len, logits)| Chunk {
                    pages: &seqs[i].pages,
                    start,
                    tokens: &seqs[i].tokens[start..start + len],
                    logits: Logits::last_if(logits),
                    adapter: None,
                })
                .collect();
            let logits = step(&chunks);
            let wanted = work.iter().filter(|w| w.3).count();
            assert_eq!(logits.len(), wanted * vocab, "step {step_no}");
            let mut at = logits.chunks_exact(vocab);
            for &(i, _, len, wants) in &work {
                let s = &mut seqs[i];
                s.cached += len;
                if wants {
                    let row = at.next().unwrap();
                    rows.push((step_no, i, row.iter().map(|v| v.to_bits()).collect()));
                    s.tokens.push(argmax(row));
                    if s.tokens.len() - s.prompt.len() == s.max_new {
                        s.done = true;
                    }
                }
            }
        }
        step_no += 1;
    }
    Trace {
        rows,
        completions: seqs
            .iter()
            .map(|s| s.tokens[s.prompt.len()..].to_vec())
            .collect(),
    }
}

/// The script on one process holding every expert.
fn single(loaded: LoadedModel) -> Trace {
    single_with(loaded, WeightPrecision::F32)
}

fn single_with(loaded: LoadedModel, weights: WeightPrecision) -> Trace {
    let engine = Engine::serve(loaded.model.into_serve_model()).with_weights(weights);
    let vocab = engine.config().vocab;
    let mut store = KvStore::new(engine.kv_shape(PAGE_SIZE), 16);
    drive(vocab, |chunks| engine.step(&mut store, chunks).unwrap())
}

/// The script on a replica of `ranks` (threads over loopback TCP), each
/// rank loading its experts with `load(rank, experts)`: rank 0 plans and
/// broadcasts each step as the server does, the others follow.
fn replica_trace(
    ranks: usize,
    experts: usize,
    options: &ServeOptions,
    load: &(dyn Fn(usize, Range<usize>) -> LoadedModel + Sync),
) -> Trace {
    replica_trace_rebalancing(ranks, experts, options, load, None).trace
}

/// What [`replica_trace_rebalancing`] saw on the leader.
struct Rebalanced {
    trace: Trace,
    /// Each rebalance's report.
    reports: Vec<Vec<LayerRebalance>>,
    /// Rows rank 0 computed per (layer, expert) after the first rebalance.
    rows_after: std::collections::BTreeMap<(usize, usize), u64>,
}

/// [`replica_trace`], the leader having every rank choose its expert copies
/// again after every `rebalance_every` steps (as its runner does on its
/// clock); with what each rebalance reported.
fn replica_trace_rebalancing(
    ranks: usize,
    experts: usize,
    options: &ServeOptions,
    load: &(dyn Fn(usize, Range<usize>) -> LoadedModel + Sync),
    rebalance_every: Option<usize>,
) -> Rebalanced {
    let traces = dist_support::world(ranks, |world| {
        let rank = world.rank();
        let share = replica::experts_of(rank, ranks, experts).unwrap();
        let loaded = load(rank, share);
        let timeouts = timeouts(Duration::from_secs(20));
        let joined = replica::join(Box::new(world), loaded, options, &timeouts).unwrap();
        if rank > 0 {
            replica::follow(joined, &Metrics::new()).unwrap();
            return None;
        }
        let Joined {
            mut engine,
            mut lockstep,
            kv_pages,
            page_size,
            ..
        } = joined;
        let vocab = engine.config().vocab;
        let mut store = KvStore::new(engine.kv_shape(page_size), kv_pages);
        let (mut steps, mut reports) = (0, Vec::new());
        let mut rows_after = std::collections::BTreeMap::new();
        let trace = drive(vocab, |chunks| {
            let plan = StepPlan::from_chunks(chunks, page_size);
            lockstep.send(&Message::Step(plan)).unwrap();
            let logits = engine.step(&mut store, chunks).unwrap();
            for (layer, expert, rows) in engine.take_expert_rows() {
                if !reports.is_empty() {
                    *rows_after.entry((layer, expert)).or_insert(0) += rows;
                }
            }
            steps += 1;
            if rebalance_every.is_some_and(|every| steps % every == 0) {
                lockstep.send(&Message::Rebalance).unwrap();
                reports.push(engine.rebalance_experts().unwrap());
            }
            logits
        });
        lockstep.send(&Message::Stop).unwrap();
        let (exchanged, gathered) = engine.expert_parallel_bytes();
        eprintln!(
            "{ranks} ranks: rank 0 exchanged {exchanged} and gathered {gathered} bytes, plans {}",
            lockstep.bytes_sent()
        );
        Some(Rebalanced {
            trace,
            reports,
            rows_after,
        })
    });
    traces.into_iter().next().unwrap().unwrap()
}

/// A leader gone right after its Stop (its barrier frame never sent, as
/// when a process ends with that frame still queued) ends a follower
/// cleanly; a leader gone after a heartbeat is a failure.
#[test]
fn a_follower_told_to_stop_ends_cleanly_when_the_leader_is_already_gone() {
    for (message, clean) in [(Message::Stop, true), (Message::Idle, false)] {
        let outcomes = dist_support::world(2, |mut world| {
            if world.rank() == 0 {
                let mut header = lockstep::encode_header(&message, 0);
                world.broadcast_bytes(&mut header, 0).unwrap();
                // Dropped here: the connection closes without the barrier.
                return None;
            }
            let mut follower = Lockstep::new(Box::new(world), Duration::from_secs(60));
            Some(follower.receive().map_err(|e| e.to_string()))
        });
        let received = outcomes[1].clone().unwrap();
        if clean {
            assert_eq!(received, Ok(message), "a stop with its leader gone");
        } else {
            let error = received.expect_err("a heartbeat with its leader gone");
            assert!(error.contains("rank 0"), "{error}");
        }
    }
}

fn assert_same(what: &str, got: &Trace, want: &Trace) {
    assert_eq!(got.completions, want.completions, "{what}: greedy tokens");
    assert_eq!(got.rows.len(), want.rows.len(), "{what}: logits rows");
    for ((step, seq, g), (_, _, w)) in got.rows.iter().zip(&want.rows) {
        let differ = g.iter().zip(w).filter(|(a, b)| a != b).count();
        assert_eq!(
            differ, 0,
            "{what}: step {step}, sequence {seq}: {differ} logits differ from one process"
        );
    }
}

#[test]
fn native_checkpoints_give_one_process_logits_on_2_and_4_ranks() {
    for (name, model) in [("random", model8(3)), ("skewed", skewed_model8(4))] {
        let dir = TempDir::new(&format!("ep-native-{name}"));
        serve_support::write_checkpoint(&dir.0, &spec8(), &model);
        let options = options(&dir.0);
        let want = single(load::load(&dir.0, None, None).unwrap());
        assert_eq!(
            want.rows.len(),
            10 + 6 + 6 + 5 + 12,
            "a row per generated token"
        );
        for ranks in [1, 2, 4] {
            let got = replica_trace(ranks, 8, &options, &|_, experts| {
                load::load_experts(&dir.0, None, None, Some(experts)).unwrap()
            });
            assert_same(&format!("{name} model, {ranks} ranks"), &got, &want);
        }
    }
}

/// Redundant experts: every few steps the leader has the ranks choose
/// copies of the busiest experts and move their weights. Where a row is
/// computed never changes its bits, so rank 0 still has one process's
/// logits — with f32 weights and with FP8 ones, whose copies travel as
/// values and are rounded again on arrival. With every token routed to
/// experts 5 and 7 (the skewed model), the copies take the load off the
/// two ranks that own them: at 4 ranks (one slot each) the four ranks
/// share it evenly, at 2 ranks (one slot each) the idle rank takes half
/// of one hot expert, and its own slot stays empty (no copy of an idle
/// expert helps).
#[test]
fn redundant_experts_even_out_hot_experts_and_keep_one_process_logits() {
    let dir = TempDir::new("ep-redundant");
    serve_support::write_checkpoint(&dir.0, &spec8(), &skewed_model8(4));
    for weights in [WeightPrecision::F32, WeightPrecision::Fp8] {
        let want = single_with(load::load(&dir.0, None, None).unwrap(), weights);
        for (ranks, served, chosen) in [(4, 2.0, 1.0), (2, 2.0, 1.5)] {
            let options = ServeOptions {
                weights,
                expert_parallel: ranks,
                redundant_experts: ranks,
                ..options(&dir.0)
            };
            let Rebalanced {
                trace,
                reports,
                rows_after,
            } = replica_trace_rebalancing(
                ranks,
                8,
                &options,
                &|_, experts| load::load_experts(&dir.0, None, None, Some(experts)).unwrap(),
                Some(3),
            );
            let what = format!("{weights:?} weights, {ranks} ranks with copies");
            assert_same(&what, &trace, &want);
            // Rank 0 owns no hot expert, yet computes rows of one: its copy.
            let copied: u64 = rows_after
                .iter()
                .filter(|((_, e), _)| [5, 7].contains(e))
                .map(|(_, rows)| rows)
                .sum();
            assert!(copied > 0, "{what}: rank 0 computed {rows_after:?}");
            assert!(reports.len() >= 5, "{what}: {} rebalances", reports.len());
            // Two MoE layers (the first of three is dense).
            let first = &reports[0];
            assert_eq!(first.iter().map(|l| l.layer).collect::<Vec<_>>(), [1, 2]);
            for layer in first {
                let routed: u64 = layer.load.iter().sum();
                assert!(routed > 0, "{what}: layer {} routed nothing", layer.layer);
                assert_eq!(
                    layer.load[5] + layer.load[7],
                    routed,
                    "{what}: only 5 and 7"
                );
                assert!((layer.before - served).abs() < 1e-9, "{what}: {layer:?}");
                assert!((layer.after - chosen).abs() < 1e-9, "{what}: {layer:?}");
                assert_eq!(layer.moved, ranks / 2, "{what}: copies of 5 and 7 moved");
            }
            // From then on the copies serve: the windows are as chosen, and
            // nothing moves again (the same load picks the same copies).
            for later in &reports[1..] {
                for layer in later.iter().filter(|l| l.load.iter().sum::<u64>() > 0) {
                    assert!((layer.before - chosen).abs() < 1e-9, "{what}: {layer:?}");
                    assert_eq!(layer.moved, 0, "{what}: {layer:?}");
                }
            }
        }
    }
}

/// BF16 weights on every rank: the bits of one process serving bf16.
#[test]
fn bf16_weights_give_one_process_logits_on_2_ranks() {
    let dir = TempDir::new("ep-bf16");
    serve_support::write_checkpoint(&dir.0, &spec8(), &model8(5));
    let options = ServeOptions {
        weights: WeightPrecision::Bf16,
        ..options(&dir.0)
    };
    let want = single_with(
        load::load(&dir.0, None, None).unwrap(),
        WeightPrecision::Bf16,
    );
    let f32_trace = single(load::load(&dir.0, None, None).unwrap());
    assert!(
        want.rows
            .iter()
            .zip(&f32_trace.rows)
            .any(|(a, b)| a.2 != b.2),
        "bf16 weights changed no logit"
    );
    let got = replica_trace(2, 8, &options, &|_, experts| {
        load::load_experts(&dir.0, None, None, Some(experts)).unwrap()
    });
    assert_same("bf16 weights, 2 ranks", &got, &want);
}

#[test]
fn sharded_checkpoints_are_served_each_rank_reading_only_its_shards() {
    let dir = TempDir::new("ep-sharded");
    let model = model8(5);
    let checkpoint = write_sharded(&dir.0, &model, 2);
    let options = options(&dir.0);
    let want = single(load::load(&dir.0, None, None).unwrap());
    // One process reads both shards; equal to the unsharded form.
    let plain = TempDir::new("ep-sharded-plain");
    serve_support::write_checkpoint(&plain.0, &spec8(), &model);
    assert_same(
        "sharded vs unsharded, one process",
        &single(load::load(&plain.0, None, None).unwrap()),
        &want,
    );
    let whole = replica::routed_expert_bytes(
        &load::load(&dir.0, None, None)
            .unwrap()
            .model
            .into_serve_model(),
    );
    for ranks in [2, 4] {
        let copies = TempDir::new(&format!("ep-sharded-copies-{ranks}"));
        let got = replica_trace(ranks, 8, &options, &|rank, experts| {
            let own = without_other_shards(&checkpoint, &experts, &copies.0.join(rank.to_string()));
            let loaded = load::load_experts(&own, None, None, Some(experts.clone())).unwrap();
            // It holds exactly its experts: 1/ranks of the routed bytes.
            let model = loaded.model.native().unwrap();
            assert!(model.moe_layers().all(|l| l.params.experts == experts));
            let held: usize = model
                .moe_layers()
                .map(|l| l.params.routed_expert_bytes())
                .sum();
            assert_eq!(held * ranks, whole, "rank {rank} of {ranks}");
            loaded
        });
        assert_same(&format!("sharded checkpoint, {ranks} ranks"), &got, &want);
    }
    // Without its shard a rank cannot load: the copies above were partial.
    let experts = 0..2;
    let partial = without_other_shards(&checkpoint, &(4..8), &dir.0.join("partial"));
    let error = load::load_experts(&partial, None, None, Some(experts)).unwrap_err();
    assert!(error.to_string().contains("experts-00000-00004"), "{error}");
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

#[test]
fn hugging_face_models_give_one_process_logits_on_2_and_4_ranks() {
    for (name, experts) in [
        ("mixtral", 4),
        ("qwen2_moe", 8),
        ("qwen3_moe", 8),
        ("deepseek_v3", 8),
        ("deepseek_v3_fp8", 8),
        ("olmoe", 8),
    ] {
        let dir = fixture(name);
        let options = options(&dir);
        let want = single(load::load(&dir, None, None).unwrap());
        for ranks in [2, 4] {
            let copies = TempDir::new(&format!("ep-hf-{name}-{ranks}"));
            let got = replica_trace(ranks, experts, &options, &|rank, share| {
                // The sharded fixtures: each rank's copy lacks the other
                // experts' shard (FP8 scales included), so reading one
                // would fail.
                let source = if matches!(name, "qwen2_moe" | "deepseek_v3_fp8") {
                    hf_without_other_experts(&dir, &share, &copies.0.join(rank.to_string()))
                } else {
                    dir.clone()
                };
                load::load_experts(&source, None, None, Some(share)).unwrap()
            });
            assert_same(&format!("{name}, {ranks} ranks"), &got, &want);
        }
    }
    // Reading every expert from such a copy fails, naming the shard.
    let copy = TempDir::new("ep-hf-missing");
    let partial = hf_without_other_experts(&fixture("qwen2_moe"), &(0..4), &copy.0);
    let error = load::load(&partial, None, None).unwrap_err().to_string();
    assert!(error.contains("not-on-this-rank.safetensors"), "{error}");
}

/// Completion requests: greedy, several lengths, log-probabilities, one
/// streamed, one with a stop string, one scoring its prompt (echo with
/// logprobs and max_tokens 0: every prompt row's logits, [`SCORED`]).
fn requests() -> Vec<Value> {
    let prompts = [
        "The ",
        "a",
        "hello there",
        "zz",
        "0123456789",
        "MoE!",
        "q",
        "the brown dog",
    ];
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut body = json!({"prompt": p, "max_tokens": 6 + 3 * i, "temperature": 0});
            if i % 3 == 0 {
                body["logprobs"] = json!(3);
            }
            if i == 5 {
                body["stream"] = json!(true);
            }
            if i == 6 {
                body["stop"] = json!(["e"]);
            }
            if i == 7 {
                body = json!({"prompt": p, "max_tokens": 0, "echo": true, "logprobs": 2});
            }
            body
        })
        .collect()
}

/// Rows of the scored request's prompt ("the brown dog", byte tokens).
const SCORED: f64 = 13.0;

/// A prompt spanning two whole pages and part of a third.
fn long_request() -> Value {
    let prompt: String = "pages of a shared prefix "
        .repeat(3)
        .chars()
        .take(2 * PAGE_SIZE + 5)
        .collect();
    json!({"prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 2})
}

/// A completion's choices (text, log-probabilities, finish reason), or a
/// streamed one's text.
fn answer(addr: SocketAddr, body: &Value) -> Value {
    let response = post_json(addr, "/v1/completions", body);
    if body["stream"] == json!(true) {
        let (text, finish) = streamed_text(&response);
        return json!({"text": text, "finish": finish});
    }
    full_text(&response);
    response.json()["choices"].clone()
}

/// Every request at once, from its own thread.
fn answers(addr: SocketAddr) -> Vec<Value> {
    let requests = requests();
    std::thread::scope(|scope| {
        let handles: Vec<_> = requests
            .iter()
            .map(|body| scope.spawn(move || answer(addr, body)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn a_leader_and_its_followers_answer_like_one_server_over_http() {
    let dir = TempDir::new("ep-http");
    serve_support::write_checkpoint(&dir.0, &spec8(), &model8(21));
    let options = options(&dir.0);
    let one = Server::start(load::load(&dir.0, None, None).unwrap(), &options).unwrap();
    let want: Vec<Value> = requests().iter().map(|b| answer(one.addr, b)).collect();
    let want_long = answer(one.addr, &long_request());
    answer(one.addr, &long_request());
    let one_metrics = String::from_utf8(request(one.addr, "GET", "/metrics", b"").body).unwrap();
    let want_load = expert_load(&one_metrics);
    // Every token fed passes the MoE layer 1 (2 experts each); the last
    // layer computes only the rows whose logits are wanted: those sampled
    // from, and every row of the scored prompt.
    let layer_total = |layer| -> f64 {
        want_load
            .iter()
            .filter(|((l, _), _)| *l == layer)
            .map(|(_, n)| n)
            .sum()
    };
    assert_eq!(
        layer_total(1),
        2.0 * metric(&one_metrics, "moe_serving_batch_tokens_sum")
    );
    assert_eq!(
        layer_total(2),
        2.0 * (metric(&one_metrics, "moe_serving_generation_tokens_total") + SCORED)
    );
    drop(one);
    let (leader_load, follower_load) = (Mutex::default(), Mutex::default());
    let outcomes = dist_support::world(2, |world| {
        let rank = world.rank();
        let experts = replica::experts_of(rank, 2, 8).unwrap();
        let loaded = load::load_experts(&dir.0, None, None, Some(experts)).unwrap();
        let timeouts = timeouts(Duration::from_secs(20));
        if rank > 0 {
            let metrics = Metrics::new();
            let followed = serve::follow(Box::new(world), loaded, &options, &timeouts, &metrics);
            // A follower's /metrics: the steps it ran and what it sent.
            let text = metrics.render();
            for kind in ["expert_exchange", "all_gather"] {
                let line = format!("moe_serving_collective_bytes_total{{kind=\"{kind}\"}} ");
                let sent: u64 = text
                    .lines()
                    .find_map(|l| l.strip_prefix(&line))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                assert!(sent > 0, "rank {rank} counts its {kind} bytes:\n{text}");
            }
            let steps = text
                .lines()
                .find_map(|l| l.strip_prefix("moe_serving_batch_tokens_count "))
                .and_then(|v| v.parse::<u64>().ok());
            assert!(steps > Some(0), "rank {rank} counts its steps:\n{text}");
            *follower_load.lock().unwrap() = expert_load(&text);
            return followed.map(|()| Vec::new());
        }
        let server = Server::start_leader(Box::new(world), loaded, &options, &timeouts).unwrap();
        assert_eq!(request(server.addr, "GET", "/readyz", b"").status, 200);
        let mut got = answers(server.addr);
        // A prompt of several pages, twice: the second reuses the first's
        // pages, which the followers hold too (they ran the steps that
        // filled them), and answers the same.
        for round in 0..2 {
            let response = post_json(server.addr, "/v1/completions", &long_request()).json();
            let cached = &response["usage"]["prompt_tokens_details"]["cached_tokens"];
            let want = if round == 0 { 0 } else { 2 * PAGE_SIZE };
            assert_eq!(cached.as_u64(), Some(want as u64), "round {round}");
            got.push(response["choices"].clone());
        }
        let metrics = String::from_utf8(request(server.addr, "GET", "/metrics", b"").body).unwrap();
        *leader_load.lock().unwrap() = expert_load(&metrics);
        for kind in ["plan", "expert_exchange", "all_gather"] {
            let line = format!("moe_serving_collective_bytes_total{{kind=\"{kind}\"}}");
            assert!(metrics.contains(&line), "{kind} bytes counted:\n{metrics}");
        }
        server.engine.shutdown(Duration::from_secs(10));
        Ok(got)
    });
    let mut outcomes = outcomes.into_iter();
    let got = outcomes.next().unwrap().unwrap();
    assert_eq!(got.len(), want.len() + 2);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "request {i}");
    }
    for g in &got[want.len()..] {
        assert_eq!(g, &want_long, "the long prompt");
    }
    // The expert load: each rank counts the rows its own experts computed
    // (0–3 on the leader, 4–7 on the follower), and together they are the
    // single process's, expert by expert.
    let (leader_load, follower_load) = (
        leader_load.into_inner().unwrap(),
        follower_load.into_inner().unwrap(),
    );
    assert!(leader_load.keys().all(|&(_, e)| e < 4), "{leader_load:?}");
    assert!(
        follower_load.keys().all(|&(_, e)| e >= 4),
        "{follower_load:?}"
    );
    let mut together = leader_load;
    together.extend(follower_load);
    assert_eq!(together, want_load);
    for follower in outcomes {
        follower.expect("the follower exits cleanly when the leader stops");
    }
}

/// LoRA adapters on an expert-parallel replica: every rank loads them and
/// runs the same attention and dense layers with them (each plan names its
/// chunks' adapters), so a replica of 2 answers requests for an adapter
/// and for the base model as one process does, to the bit. A rank that
/// loaded other adapters is refused at the join, naming them.
#[test]
fn adapters_on_a_replica_answer_like_one_process_and_every_rank_must_load_them() {
    use moe_worker::serve::adapters::AdapterSource;
    use serve_support::lora::{expert_updates, updates, write_peft};
    let dir = TempDir::new("ep-lora");
    let model = model8(21);
    serve_support::write_checkpoint(&dir.0, &spec8(), &model);
    let adapter = dir.0.join("adapter");
    write_peft(
        &adapter,
        &updates(&model, 5),
        model.config().head_dim,
        8.0,
        false,
    );
    // Another adapting layer 1's routed and shared experts: its rows carry
    // their index to the rank of their expert.
    let experts = dir.0.join("experts-adapter");
    write_peft(
        &experts,
        &expert_updates(&model, 6),
        model.config().head_dim,
        8.0,
        false,
    );
    let options = ServeOptions {
        adapters: vec![
            AdapterSource {
                name: "tiny-sql".into(),
                dir: adapter,
            },
            AdapterSource {
                name: "tiny-moe".into(),
                dir: experts,
            },
        ],
        ..options(&dir.0)
    };
    let bodies: Vec<Value> = ["tiny-sql", "tiny", "tiny-moe", "tiny-sql", "tiny-moe"]
        .iter()
        .map(|model| {
            json!({"model": model, "prompt": "the quick brown fox", "max_tokens": 8,
                   "temperature": 0, "logprobs": 2})
        })
        .collect();
    let one = Server::start(load::load(&dir.0, None, None).unwrap(), &options).unwrap();
    let want: Vec<Value> = bodies.iter().map(|b| answer(one.addr, b)).collect();
    drop(one);
    assert_ne!(want[0], want[1], "the adapter changes the completion");
    assert_ne!(
        want[2], want[1],
        "the experts' adapter changes the completion"
    );
    assert_eq!((&want[0], &want[2]), (&want[3], &want[4]));

    let replica = |leader: &ServeOptions, follower: &ServeOptions| {
        dist_support::world(2, |world| {
            let rank = world.rank();
            let experts = replica::experts_of(rank, 2, 8).unwrap();
            let loaded = load::load_experts(&dir.0, None, None, Some(experts)).unwrap();
            let timeouts = timeouts(Duration::from_secs(20));
            if rank > 0 {
                let metrics = Metrics::new();
                return serve::follow(Box::new(world), loaded, follower, &timeouts, &metrics)
                    .map(|()| Vec::new())
                    .map_err(|e| e.to_string());
            }
            let server = Server::start_leader(Box::new(world), loaded, leader, &timeouts)
                .map_err(|e| e.to_string())?;
            // All at once: steps mix the adapters' rows and the base model's.
            let got = std::thread::scope(|scope| {
                let handles: Vec<_> = bodies
                    .iter()
                    .map(|body| scope.spawn(move || answer(server.addr, body)))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            server.engine.shutdown(Duration::from_secs(10));
            Ok(got)
        })
    };
    let mut outcomes = replica(&options, &options).into_iter();
    let got = outcomes.next().unwrap().unwrap();
    assert_eq!(got, want);
    for follower in outcomes {
        follower.expect("the follower exits cleanly when the leader stops");
    }

    let without = ServeOptions {
        adapters: Vec::new(),
        ..options.clone()
    };
    for outcome in replica(&options, &without) {
        let e = outcome.unwrap_err();
        assert!(e.contains("adapters (names and weights)"), "{e}");
    }
}

#[derive(Debug)]
enum Ended {
    Leader {
        after: Duration,
        readyz: u16,
        submit: u16,
    },
    Follower {
        after: Duration,
        exit_code: u8,
    },
    Died,
}

#[test]
fn a_follower_that_dies_fails_the_leader_and_the_others_within_the_timeout() {
    let dir = TempDir::new("ep-death");
    serve_support::write_checkpoint(&dir.0, &spec8(), &model8(8));
    let options = options(&dir.0);
    let timeout = Duration::from_secs(2);
    let died_at: Mutex<Option<Instant>> = Mutex::new(None);
    let served = std::sync::atomic::AtomicBool::new(false);
    let since_death = || {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(at) = *died_at.lock().unwrap() {
                return at.elapsed();
            }
            assert!(Instant::now() < deadline, "rank 3 never died");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let ended = dist_support::world_with_timeout(4, timeout, |world| {
        let rank = world.rank();
        let experts = replica::experts_of(rank, 4, 8).unwrap();
        let loaded = load::load_experts(&dir.0, None, None, Some(experts)).unwrap();
        let timeouts = timeouts(timeout);
        match rank {
            0 => {
                let server =
                    Server::start_leader(Box::new(world), loaded, &options, &timeouts).unwrap();
                assert_eq!(request(server.addr, "GET", "/readyz", b"").status, 200);
                // It served before the death.
                full_text(&post_json(
                    server.addr,
                    "/v1/completions",
                    &json!({"prompt": "ab", "max_tokens": 3, "temperature": 0}),
                ));
                served.store(true, std::sync::atomic::Ordering::Release);
                while server.engine.failure().is_none() {
                    std::thread::sleep(Duration::from_millis(2));
                }
                let after = since_death();
                let readyz = request(server.addr, "GET", "/readyz", b"").status;
                let submit = post_json(
                    server.addr,
                    "/v1/completions",
                    &json!({"prompt": "ab", "max_tokens": 3}),
                )
                .status;
                Ended::Leader {
                    after,
                    readyz,
                    submit,
                }
            }
            3 => {
                let joined = replica::join(Box::new(world), loaded, &options, &timeouts).unwrap();
                // Follows the leader's steps until it has served a request,
                // then dies between two of its messages.
                let Joined {
                    engine,
                    mut lockstep,
                    kv_pages,
                    page_size,
                    ..
                } = joined;
                let mut store = KvStore::new(engine.kv_shape(page_size), kv_pages);
                while !served.load(std::sync::atomic::Ordering::Acquire) {
                    if let Message::Step(plan) = lockstep.receive().unwrap() {
                        engine.step(&mut store, &plan.chunks()).unwrap();
                    }
                }
                drop((engine, lockstep));
                *died_at.lock().unwrap() = Some(Instant::now());
                Ended::Died
            }
            _ => {
                let error = serve::follow(
                    Box::new(world),
                    loaded,
                    &options,
                    &timeouts,
                    &Metrics::new(),
                )
                .expect_err("a follower fails when a peer dies");
                Ended::Follower {
                    after: since_death(),
                    exit_code: error.exit_code(),
                }
            }
        }
    });
    eprintln!("{ended:?}");
    for end in ended {
        match end {
            Ended::Leader {
                after,
                readyz,
                submit,
            } => {
                assert!(after < timeout, "the leader noticed after {after:?}");
                assert_eq!((readyz, submit), (503, 503), "not ready, refusing requests");
            }
            Ended::Follower { after, exit_code } => {
                assert!(after < timeout, "a follower noticed after {after:?}");
                assert_eq!(exit_code, 3, "a peer's failure");
            }
            Ended::Died => {}
        }
    }
}

// ---- `moe-worker serve` processes ----

/// GET `path`: the status, or `None` when nothing answers.
fn status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let head = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    String::from_utf8_lossy(&raw)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
}

fn wait_ready(addr: SocketAddr, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while status(addr, "/readyz") != Some(200) {
        if let Ok(Some(exit)) = child.try_wait() {
            // Its log says why (a taken port, a refused rendezvous, …).
            let mut log = String::new();
            if let Some(stderr) = child.stderr.as_mut() {
                let _ = stderr.read_to_string(&mut log);
            }
            panic!("the server exited before it was ready: {exit}\n{log}");
        }
        assert!(Instant::now() < deadline, "not ready within 120 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A checkpoint of the 8-expert model, sharded as EP-2 training writes it.
fn served_model(name: &str) -> TempDir {
    let dir = TempDir::new(name);
    write_sharded(&dir.0, &model8(31), 2);
    dir
}

/// What an operator's pod of a one-pod, two-process replica runs: the
/// config it renders and the environment it sets (no `MOE_COORDINATOR`
/// for a one-pod replica), on loopback.
fn launch_two_ranks(model: &Path, port: u16, marker: &str) -> Child {
    launch_two_ranks_with(model, port, marker, None)
}

/// [`launch_two_ranks`] with `parallelism.expertLoadBalancing`.
fn launch_two_ranks_with(
    model: &Path,
    port: u16,
    marker: &str,
    balancing: Option<ExpertLoadBalancing>,
) -> Child {
    let config = ServingConfig {
        service: "test/ep".into(),
        model_dir: model.display().to_string(),
        format: ModelFormat::Native,
        checkpoint_step: None,
        model: None,
        trained: None,
        parallelism: ServingParallelism {
            processes_per_pod: 2,
            pods_per_replica: 1,
            expert_parallel: 2,
            expert_load_balancing: balancing,
        },
        port,
        max_batch_tokens: 256,
        max_concurrent_requests: 16,
        precision: ServingPrecision::Fp32,
        device: Device::Cpu,
        prefix_caching: true,
        adapters: Vec::new(),
    };
    let path = model.join(format!("serving-{marker}.json"));
    std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
    Command::new(BINARY)
        .args([
            "serve",
            "--host",
            "127.0.0.1",
            "--kv-cache-mib",
            "4",
            "--config",
        ])
        .arg(&path)
        .env("MOE_WORLD_SIZE", "2")
        .env("MOE_NODES", "1")
        .env("MOE_NODE_RANK", "0")
        .env("MOE_PROCS_PER_NODE", "2")
        .env("MOE_SERVICE", "test/ep")
        .env("MOE_STATUS_ADDR", "off")
        .env(
            "MOE_COLLECTIVE_TIMEOUT_SECONDS",
            COLLECTIVE_TIMEOUT_SECONDS.to_string(),
        )
        .env("MOE_RENDEZVOUS_TIMEOUT_SECONDS", "60")
        .env(MARKER, marker)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `name{labels} value` from Prometheus text.
/// `moe_serving_expert_tokens_total` by (layer, expert).
fn expert_load(text: &str) -> std::collections::BTreeMap<(usize, usize), f64> {
    let labels = |l: &str, name: &str| -> usize {
        let at = l.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
        l[at..].split('"').next().unwrap().parse().unwrap()
    };
    text.lines()
        .filter(|l| l.starts_with("moe_serving_expert_tokens_total{"))
        .map(|l| {
            let value = l.rsplit(' ').next().unwrap().parse().unwrap();
            ((labels(l, "layer"), labels(l, "expert")), value)
        })
        .collect()
}

/// What one process serving the model in `dir` (named `ep`, as the
/// launched ranks name it) answers to [`requests`].
fn one_process_answers(dir: &Path) -> Vec<Value> {
    let options = ServeOptions {
        model_name: Some("ep".into()),
        ..options(dir)
    };
    let one = Server::start(load::load(dir, None, None).unwrap(), &options).unwrap();
    answers(one.addr)
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{series} not in:\n{text}"))
}

#[test]
fn a_two_process_replica_answers_like_one_process_and_stops_on_sigterm() {
    let dir = served_model("ep-launch");
    let want = one_process_answers(&dir.0);
    let port = free_local_port().unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut launcher = launch_two_ranks(&dir.0, port, "answers");
    wait_ready(addr, &mut launcher);
    let got = answers(addr);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "request {i}");
    }
    let text = String::from_utf8(request(addr, "GET", "/metrics", b"").body).unwrap();
    let steps = metric(&text, "moe_serving_batch_size_count");
    let tokens = metric(&text, "moe_serving_batch_tokens_sum");
    let bytes = |kind: &str| {
        metric(
            &text,
            &format!("moe_serving_collective_bytes_total{{kind=\"{kind}\"}}"),
        )
    };
    let (plan, exchange, gather) = (bytes("plan"), bytes("expert_exchange"), bytes("all_gather"));
    eprintln!(
        "2 ranks, {steps} steps, {tokens} tokens: per step, rank 0 sent {:.0} plan, {:.0} \
         exchange and {:.0} all-gather bytes ({:.0} per token)",
        plan / steps,
        exchange / steps,
        gather / steps,
        (plan + exchange + gather) / tokens
    );
    assert!(steps > 0.0 && plan > 0.0 && exchange > 0.0 && gather > 0.0);

    // SIGTERM reaches the launcher only (as in a pod); it forwards it, the
    // leader stops its followers, and every process exits 0.
    // SAFETY: kill(2) reads no memory; the launcher is our live child.
    assert_eq!(
        unsafe { libc::kill(launcher.id() as i32, libc::SIGTERM) },
        0
    );
    let out = launcher.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("all 2 local ranks succeeded"), "{stderr}");
    assert!(
        stderr.contains("the leader stopped the replica"),
        "the follower was told: {stderr}"
    );
}

/// With `expertLoadBalancing` in the operator's config, the leader has the
/// ranks choose their expert copies on its clock (here every second):
/// answers stay one process's across rebalances, which the leader's
/// metrics count, with each MoE layer's imbalance as served and as chosen.
#[test]
fn a_two_process_replica_with_expert_copies_rebalances_on_its_clock() {
    let dir = served_model("ep-rebalance");
    let want = one_process_answers(&dir.0);
    let port = free_local_port().unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let balancing = ExpertLoadBalancing {
        redundant_experts: 2,
        interval_seconds: 1,
    };
    let mut launcher = launch_two_ranks_with(&dir.0, port, "rebalance", Some(balancing));
    wait_ready(addr, &mut launcher);
    // The first requests run before the interval has passed, the second
    // after: a rebalance runs between two of their steps.
    for round in 0..2 {
        if round > 0 {
            std::thread::sleep(Duration::from_millis(1200));
        }
        for (i, (g, w)) in answers(addr).iter().zip(&want).enumerate() {
            assert_eq!(g, w, "round {round}, request {i}");
        }
    }
    let text = String::from_utf8(request(addr, "GET", "/metrics", b"").body).unwrap();
    assert!(metric(&text, "moe_serving_expert_rebalances_total") >= 1.0);
    for layer in [1, 2] {
        for placement in ["served", "chosen"] {
            let imbalance = metric(
                &text,
                &format!(
                    "moe_serving_expert_load_imbalance{{layer=\"{layer}\",placement=\"{placement}\"}}"
                ),
            );
            assert!((1.0..=2.0).contains(&imbalance), "{placement}: {imbalance}");
        }
    }
    // SAFETY: kill(2) reads no memory; the launcher is our live child.
    assert_eq!(
        unsafe { libc::kill(launcher.id() as i32, libc::SIGTERM) },
        0
    );
    let out = launcher.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("expert copies chosen again"))
        .collect();
    eprintln!("{}", lines.join("\n"));
    assert!(!lines.is_empty(), "{stderr}");
}

#[test]
fn a_killed_rank_ends_the_launch_within_the_timeout_and_is_named() {
    let dir = served_model("ep-kill");
    let port = free_local_port().unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut launcher = launch_two_ranks(&dir.0, port, "killed");
    wait_ready(addr, &mut launcher);
    full_text(&post_json(
        addr,
        "/v1/completions",
        &json!({"prompt": "The ", "max_tokens": 4, "temperature": 0}),
    ));
    let victim = dist_support::rank_pid(MARKER, "killed", 1).expect("rank 1's process");
    // SAFETY: kill(2) reads no memory; `victim` is a live child of the launcher.
    assert_eq!(unsafe { libc::kill(victim, libc::SIGKILL) }, 0);
    let killed_at = Instant::now();
    let out = launcher.wait_with_output().unwrap();
    let took = killed_at.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("rank 1 failed: it was killed by a signal; then rank 0 exited with code 3"),
        "the launcher names the dead rank; rank 0 exits 3 by itself:\n{stderr}"
    );
    assert!(
        took < Duration::from_secs(COLLECTIVE_TIMEOUT_SECONDS),
        "the launch ended {took:?} after the kill"
    );
    eprintln!("the launch ended {took:?} after rank 1 was killed");
}

/// Two pods of one replica, as the operator's StatefulSet starts them:
/// `MOE_NODE_RANK` 0 and 1, one process each, the leader's coordinator.
#[test]
fn as_two_pods_the_follower_answers_probes_and_its_death_ends_the_leader() {
    let dir = served_model("ep-pods");
    let coordinator = format!("127.0.0.1:{}", free_local_port().unwrap());
    let ports = [free_local_port().unwrap(), free_local_port().unwrap()];
    let mut pods: Vec<Child> = (0..2)
        .map(|node| {
            Command::new(BINARY)
                .args(["serve", "--host", "127.0.0.1", "--expert-parallel", "2"])
                .args(["--kv-cache-mib", "4", "--port", &ports[node].to_string()])
                .arg("--model")
                .arg(&dir.0)
                .env("MOE_WORLD_SIZE", "2")
                .env("MOE_NODES", "2")
                .env("MOE_NODE_RANK", node.to_string())
                .env("MOE_PROCS_PER_NODE", "1")
                .env("MOE_COORDINATOR", &coordinator)
                .env("MOE_STATUS_ADDR", "off")
                .env(
                    "MOE_COLLECTIVE_TIMEOUT_SECONDS",
                    COLLECTIVE_TIMEOUT_SECONDS.to_string(),
                )
                .env("MOE_RENDEZVOUS_TIMEOUT_SECONDS", "60")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let leader: SocketAddr = ([127, 0, 0, 1], ports[0]).into();
    let follower: SocketAddr = ([127, 0, 0, 1], ports[1]).into();
    wait_ready(leader, &mut pods[0]);
    wait_ready(follower, &mut pods[1]);
    assert_eq!(status(follower, "/healthz"), Some(200));
    let elsewhere = request(follower, "GET", "/v1/models", b"");
    assert_eq!(elsewhere.status, 404);
    assert!(String::from_utf8_lossy(&elsewhere.body).contains("rank 0 serves the API"));
    full_text(&post_json(
        leader,
        "/v1/completions",
        &json!({"prompt": "The ", "max_tokens": 4, "temperature": 0}),
    ));
    let mut follower_pod = pods.pop().unwrap();
    follower_pod.kill().unwrap(); // SIGKILL
    let _ = follower_pod.wait();
    let killed_at = Instant::now();
    let out = pods.pop().unwrap().wait_with_output().unwrap();
    let took = killed_at.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "a peer's failure:\n{stderr}");
    assert!(
        took < Duration::from_secs(COLLECTIVE_TIMEOUT_SECONDS),
        "the leader exited {took:?} after its follower died"
    );
    assert!(stderr.contains("rank 1"), "{stderr}");
}

/// Refused before any rank starts (exit 2, naming why): an expert count the
/// replica does not divide, a world that is not the expert-parallel size,
/// and (from the operator's config) ranks beyond the expert split.
#[test]
fn layouts_that_cannot_be_served_are_refused_before_any_rank_starts() {
    let dir = served_model("ep-refused");
    let run = |args: &[&str], vars: &[(&str, &str)]| {
        let out = Command::new(BINARY)
            .args(["serve", "--host", "127.0.0.1", "--port", "0", "--model"])
            .arg(&dir.0)
            .args(args)
            .env("MOE_STATUS_ADDR", "off")
            .envs(vars.iter().copied())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = run(&["--expert-parallel", "3"], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("expertParallel 3 does not divide the model's 8 routed experts"),
        "{stderr}"
    );
    assert!(!stderr.contains("launching local ranks"), "{stderr}");
    let (code, stderr) = run(
        &["--expert-parallel", "2"],
        &[("MOE_WORLD_SIZE", "4"), ("MOE_PROCS_PER_NODE", "4")],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("MOE_WORLD_SIZE=4 but expertParallel is 2"),
        "{stderr}"
    );
    let config = serde_json::to_value(ServingConfig {
        service: "test/ep".into(),
        model_dir: dir.0.display().to_string(),
        format: ModelFormat::Native,
        checkpoint_step: None,
        model: None,
        trained: None,
        parallelism: ServingParallelism {
            processes_per_pod: 4,
            pods_per_replica: 1,
            expert_parallel: 2,
            expert_load_balancing: None,
        },
        port: 0,
        max_batch_tokens: 256,
        max_concurrent_requests: 16,
        precision: ServingPrecision::Fp32,
        device: Device::Cpu,
        prefix_caching: true,
        adapters: Vec::new(),
    })
    .unwrap();
    let path = dir.0.join("refused.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let out = Command::new(BINARY)
        .args(["serve", "--config"])
        .arg(&path)
        .env("MOE_STATUS_ADDR", "off")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("parallelism.expertParallel is 2 but a replica has 4 ranks"),
        "{stderr}"
    );
}

/// By hand (docs/serving.md): `--expert-parallel 2` and no gang
/// environment starts both ranks here, rendezvousing on loopback.
#[test]
fn by_hand_expert_parallel_starts_its_ranks_on_this_machine() {
    let dir = served_model("ep-by-hand");
    let body = json!({"prompt": "The ", "max_tokens": 20, "temperature": 0, "logprobs": 2});
    let want = {
        let one = Server::start(load::load(&dir.0, None, None).unwrap(), &options(&dir.0)).unwrap();
        answer(one.addr, &body)
    };
    let port = free_local_port().unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut launcher = Command::new(BINARY)
        .args(["serve", "--host", "127.0.0.1", "--expert-parallel", "2"])
        .args([
            "--kv-cache-mib",
            "4",
            "--port",
            &port.to_string(),
            "--model",
        ])
        .arg(&dir.0)
        .env("MOE_STATUS_ADDR", "off")
        .env_remove("MOE_WORLD_SIZE")
        .env_remove("MOE_COORDINATOR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_ready(addr, &mut launcher);
    assert_eq!(answer(addr, &body), want);
    // SAFETY: kill(2) reads no memory; the launcher is our live child.
    assert_eq!(
        unsafe { libc::kill(launcher.id() as i32, libc::SIGTERM) },
        0
    );
    let out = launcher.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("all 2 local ranks succeeded"), "{stderr}");
}
