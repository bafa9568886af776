//! Ulysses sequence parallelism against one process, ranks as threads over
//! loopback TCP: the sequence ↔ head layout switch (with RoPE at the
//! slices' true positions) round trip, whole training steps on 1 rank, 2
//! ranks (sequence parallel 2), 4 ranks (sequence parallel 2 × expert
//! parallel 2, and sequence parallel 2 × data parallel 2), with and without
//! DeepSeek-V3's sequence-wise balance loss, activation checkpointing, and
//! checkpoints resumed with another sequence parallelism.

mod dist_support;

use moe_worker::data::{Corpus, DataLoader, held_out_start, load_tokens};
use moe_worker::dist::expert_parallel::{ExpertParallel, is_expert_tensor};
use moe_worker::dist::layout::{Layout, make_groups};
use moe_worker::dist::sequence_parallel::{SequenceParallel, slice_sequences};
use moe_worker::dist::{Collective, TcpCollective};
use moe_worker::model::Parallel;
use moe_worker::ops::rope::RopeTable;
use moe_worker::rng::SplitMix64;
use moe_worker::settings::{TrainSettings, parse_worker_config};
use moe_worker::train::{Evaluation, StepReport, Trainer};
use serde_json::{Value, json};

use dist_support::{copy_dir, world};

const STEPS: usize = 4;

/// This rank's sequence group (and expert groups when `ep` > 1), as the
/// worker makes them from the shared layout.
fn groups(
    world: &TcpCollective,
    sp: usize,
    ep: usize,
    seq_len: usize,
) -> (SequenceParallel, Option<ExpertParallel>) {
    let layout = Layout::new(world.size(), sp, ep).expect("layout");
    let g = make_groups(world, &layout).expect("groups");
    let sequence = SequenceParallel::new(g.sequence, seq_len).expect("sequence group");
    let experts = (ep > 1)
        .then(|| ExpertParallel::new(g.expert, g.expert_replicas, 4).expect("expert groups"));
    (sequence, experts)
}

/// Two sequence groups of 2 ranks ({0,1}, {2,3}), each with its own two
/// sequences of 8 tokens, 4 query and 2 key/value heads of width 4. Each
/// rank rotates its slice at the slice's positions and switches it to
/// heads: it must hold exactly what one process gets by rotating the whole
/// sequences and keeping this rank's heads (so the positions are the
/// global ones: with the slice's own indices, rank 1's tokens would turn by
/// 0..4 instead of 4..8 and differ). The way back restores the slice, and
/// the byte counter counts what left for the other rank.
#[test]
fn tokens_to_heads_round_trip_with_rope_at_global_positions() {
    let (seq_len, sequences, d, theta) = (8, 2, 4, 100.0);
    let rope = RopeTable::<f32>::new(seq_len, d, theta);
    let full = |group: usize, heads: usize| -> Vec<f32> {
        SplitMix64::new(10 + group as u64 * 7 + heads as u64)
            .normal_vec(sequences * seq_len * heads * d, 1.0)
    };
    let results = world(4, |c| {
        let (sp, _) = groups(&c, 2, 1, seq_len);
        let group = c.rank() / 2;
        let mut out = Vec::new();
        for heads in [4, 2] {
            let (w, at) = (heads * d, sp.positions());
            let mut local =
                slice_sequences(&full(group, heads), seq_len * w, at.start * w..at.end * w);
            rope.forward_at(&mut local, heads, sp.positions());
            let by_heads = sp.to_heads(&local, heads, d);
            let back = sp.to_tokens(&by_heads, heads, d);
            out.push((heads, local, by_heads, back));
        }
        sp.take_failure().expect("exchanges");
        (c.rank(), sp.positions(), out, sp.bytes_sent())
    });
    for (rank, positions, out, bytes) in &results {
        assert_eq!(
            *positions,
            (rank % 2) * 4..(rank % 2) * 4 + 4,
            "rank {rank}"
        );
        let mut sent = 0;
        for (heads, local, by_heads, back) in out {
            let mut rotated = full(rank / 2, *heads);
            rope.forward(&mut rotated, *heads);
            let hp = heads / 2;
            let mine: Vec<f32> = rotated
                .chunks_exact(d)
                .enumerate()
                .filter(|(i, _)| (i % heads) / hp == rank % 2)
                .flat_map(|(_, v)| v.to_vec())
                .collect();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(by_heads),
                bits(&mine),
                "rank {rank}, {heads} heads: rotated heads of every token"
            );
            assert_eq!(back, local, "rank {rank}, {heads} heads: round trip");
            sent += 2 * local.len() / 2;
        }
        // Each switch sends half of the tensor to the other rank, as f32.
        assert_eq!(*bytes as usize, sent * 4, "rank {rank}");
    }
}

/// The sequence-wise balance loss's coefficient where a test turns it on:
/// large enough that its gradient moves the router visibly (the test checks
/// that a group not summing its statistics fails).
const AUX: f64 = 0.01;

/// A small MoE model with aux-loss-free balancing, 4 routed experts, 4
/// query and 2 key/value heads, on `ranks` ranks split `sp` × `ep`.
fn config(ranks: usize, sp: usize, ep: usize, recompute: bool) -> Value {
    config_with_aux(ranks, sp, ep, recompute, 0.0)
}

/// [`config`] with the sequence-wise balance loss's coefficient `aux` (0: off).
fn config_with_aux(ranks: usize, sp: usize, ep: usize, recompute: bool, aux: f64) -> Value {
    json!({
        "job": "local/sp",
        "model": {
            "hiddenSize": 32, "layers": 2, "denseLayers": 1, "denseHiddenSize": 64,
            "attentionHeads": 4, "kvHeads": 2, "seqLen": 32,
            "moe": {"experts": 4, "topK": 2, "sharedExperts": 1, "expertHiddenSize": 32,
                    "router": "sigmoid", "groups": 2, "topGroups": 2,
                    "balancing": {"auxLossFree": {"enabled": true, "biasUpdateRate": 0.01},
                                  "sequenceAuxLossCoef": aux}}
        },
        "data": {"builtin": {"corpus": "tiny"}},
        "training": {
            "steps": STEPS, "globalBatchSize": 4, "microBatchSize": 1, "seed": 7,
            "logIntervalSteps": 1, "activationCheckpointing": recompute,
            "optimizer": {"learningRate": 0.01, "minLearningRate": 0.001, "warmupSteps": 1,
                          "gradClip": 1.0}
        },
        "parallelism": {"processesPerNode": ranks, "sequenceParallel": sp, "expertParallel": ep},
        "checkpoint": {"dir": "unused", "intervalSteps": 100, "keep": 1, "resume": "Never"},
        "device": "cpu",
        "outputDir": "unused"
    })
}

fn settings(ranks: usize, sp: usize, ep: usize, recompute: bool, aux: f64) -> TrainSettings {
    settings_of(config_with_aux(ranks, sp, ep, recompute, aux))
}

fn settings_of(config: Value) -> TrainSettings {
    let config = parse_worker_config(&config.to_string()).expect("valid config");
    TrainSettings::from_config(&config).expect("valid settings")
}

/// Which of the corpus's next tokens a run trains on.
#[derive(Clone, Copy, Debug)]
enum Targets {
    /// Every one (pre-training).
    All,
    /// Short "answers" between longer "prompts", as supervised fine-tuning
    /// trains on conversations: each window, and each rank's slice of one,
    /// holds its own number of trained targets, some none.
    Answers,
    /// Conversations of 4 to 43 tokens whose last third is the answer:
    /// each sequence is one from its start, most padded, some cut.
    Conversations,
    /// The same conversations packed several to a sequence (`data.packing`).
    PackedConversations,
}

/// A trainer holding routed experts `experts` (all of them, or an
/// expert-parallel rank's own), on the tiny corpus's `targets`.
fn trainer(settings: &TrainSettings, experts: std::ops::Range<usize>, targets: Targets) -> Trainer {
    let tokens = load_tokens(&settings.data, settings.model.vocab).expect("built-in corpus");
    let tokens = match targets {
        Targets::All => tokens,
        Targets::Answers => {
            let mut rng = SplitMix64::new(5);
            let mut trained = Vec::with_capacity(tokens.len());
            while trained.len() < tokens.len() {
                trained.extend(std::iter::repeat_n(false, 3 + rng.below(40)));
                trained.extend(std::iter::repeat_n(true, 1 + rng.below(12)));
            }
            trained.truncate(tokens.len());
            Corpus::with_trained(tokens.iter().collect(), trained)
        }
        Targets::Conversations | Targets::PackedConversations => {
            let mut rng = SplitMix64::new(6);
            let (mut trained, mut conversations) = (vec![false; tokens.len()], Vec::new());
            let mut start = 0;
            loop {
                let len = 4 + rng.below(40);
                if start + len > tokens.len() {
                    break;
                }
                trained[start + len - len / 3..start + len].fill(true);
                conversations.push(start..start + len);
                start += len;
            }
            Corpus::with_conversations(tokens.iter().collect(), trained, conversations)
        }
    };
    let loader = DataLoader::new(
        tokens,
        settings.model.seq_len,
        settings.training.seed,
        "tiny",
    )
    .expect("loader");
    let loader = match targets {
        Targets::PackedConversations => loader.packed(),
        _ => loader,
    };
    Trainer::new_with_experts(
        settings.model.clone(),
        settings.training.clone(),
        loader,
        experts,
    )
}

/// What one rank ends with: its reports, and the weights it holds (the
/// expert tensors only for its own experts, the rest `None`).
struct Outcome {
    reports: Vec<StepReport>,
    weights: Vec<(String, Vec<Option<f32>>)>,
    bytes: u64,
    /// Payload bytes of the balance loss's statistics summed over the group.
    summed: u64,
}

/// The trainer's weights laid out as one process's (4 experts), `None`
/// where an expert is not held here.
fn held_weights(trainer: &Trainer) -> Vec<(String, Vec<Option<f32>>)> {
    let model = trainer.model();
    let held = trainer.held_experts();
    model
        .weights
        .tensors(model.config())
        .iter()
        .map(|t| {
            if !is_expert_tensor(&t.name) {
                return (t.name.clone(), t.values.iter().copied().map(Some).collect());
            }
            let per = t.values.len() / held.len();
            let values = (0..4 * per)
                .map(|i| {
                    held.contains(&(i / per))
                        .then(|| t.values[i - held.start * per])
                })
                .collect();
            (t.name.clone(), values)
        })
        .collect()
}

fn alone(aux: f64) -> Outcome {
    alone_with(&settings(1, 1, 1, false, aux))
}

fn alone_with(settings: &TrainSettings) -> Outcome {
    alone_on(settings, Targets::All)
}

fn alone_on(settings: &TrainSettings, targets: Targets) -> Outcome {
    let mut t = trainer(settings, 0..4, targets);
    let reports = (0..STEPS)
        .map(|_| t.step(&|| false).expect("not stopped"))
        .collect();
    Outcome {
        reports,
        weights: held_weights(&t),
        bytes: 0,
        summed: 0,
    }
}

fn parallel_run(ranks: usize, sp: usize, ep: usize, recompute: bool, aux: f64) -> Vec<Outcome> {
    parallel_run_with(ranks, sp, ep, &settings(ranks, sp, ep, recompute, aux))
}

fn parallel_run_with(ranks: usize, sp: usize, ep: usize, settings: &TrainSettings) -> Vec<Outcome> {
    parallel_run_on(ranks, sp, ep, settings, Targets::All)
}

fn parallel_run_on(
    ranks: usize,
    sp: usize,
    ep: usize,
    settings: &TrainSettings,
    targets: Targets,
) -> Vec<Outcome> {
    world(ranks, |mut c| {
        let (sequence, experts) = groups(&c, sp, ep, settings.model.seq_len);
        let parallel = Parallel {
            sequence: Some(&sequence),
            experts: experts.as_ref(),
        };
        let owned = experts.as_ref().map_or(0..4, ExpertParallel::local_experts);
        let mut t = trainer(settings, owned, targets);
        let reports = (0..STEPS)
            .map(|_| {
                t.step_parallel(&|| false, &mut c, parallel)
                    .expect("collectives")
                    .expect("not stopped")
            })
            .collect();
        Outcome {
            reports,
            weights: held_weights(&t),
            bytes: sequence.bytes_sent(),
            summed: sequence.bytes_summed(),
        }
    })
}

/// Every weight once: each value from the ranks holding it, which must
/// agree bit for bit.
fn assemble(ranks: &[Outcome]) -> Vec<(String, Vec<f32>)> {
    let held: Vec<_> = ranks.iter().map(|r| r.weights.as_slice()).collect();
    dist_support::assemble(&held)
}

/// Measures `ranks` against one process. The forward pass computes the
/// same rows (token-wise GEMMs on fewer rows, the same per-head attention
/// on whole sequences), but the loss is a mean of the ranks' means and the
/// gradients are sums over other groupings (a weight's gradient summed per
/// rank over its slice, then over the ranks), so the runs differ by
/// rounding, as data parallelism does; the tolerances are data
/// parallelism's (docs/distributed.md). The first loss is bit-equal: the
/// per-token losses are the same f32 values, and their f64 sums (exact for
/// 32 f32 values of one magnitude) are divided by powers of two only.
fn compare(what: &str, one: &Outcome, ranks: &[Outcome]) {
    compare_within(what, one, ranks, 0.0);
}

/// [`compare`], the first losses within `first_loss` relative (0: bit-equal).
fn compare_within(what: &str, one: &Outcome, ranks: &[Outcome], first_loss: f64) {
    let reports: Vec<&[StepReport]> = ranks.iter().map(|r| r.reports.as_slice()).collect();
    let (got, want) = (assemble(ranks), assemble(std::slice::from_ref(one)));
    dist_support::compare_within(what, &one.reports, &reports, &got, &want, first_loss);
}

/// Bytes a rank sends per step, by the Ulysses count: per layer and
/// micro-batch, q, k, v and the output forward, d out, d q, d k, d v
/// backward, each `(sp−1)/sp` of the rank's `[tokens, width]` slice, as f32.
fn ulysses_bytes(sp: usize, micro_steps: usize) -> u64 {
    let (layers, tokens, h, kv) = (2, 32 / sp, 32, 16);
    let per_layer = 2 * (2 * h + 2 * kv) * tokens * (sp - 1) / sp * 4;
    (layers * per_layer * micro_steps * STEPS) as u64
}

#[test]
fn sequence_parallel_training_matches_one_process() {
    let one = alone(0.0);
    let sp2 = parallel_run(2, 2, 1, false, 0.0);
    compare("SP 2", &one, &sp2);
    for o in &sp2 {
        assert_eq!(o.bytes, ulysses_bytes(2, 4), "SP 2 bytes");
    }
    let sp2_ep2 = parallel_run(4, 2, 2, false, 0.0);
    compare("SP 2 × EP 2", &one, &sp2_ep2);
    for o in &sp2_ep2 {
        assert_eq!(o.bytes, ulysses_bytes(2, 2), "SP 2 × EP 2 bytes");
    }
    compare("SP 2 × DP 2", &one, &parallel_run(4, 2, 1, false, 0.0));
}

#[test]
fn sequence_parallel_training_with_q_k_norms_and_wide_heads_matches_one_process() {
    // Qwen3's attention: heads of 12 on a hidden size of 32 (q is 48 wide),
    // each normed per head before RoPE, on every rank's slice of tokens.
    let patched = |ranks: usize, sp: usize, ep: usize| {
        let mut config = config(ranks, sp, ep, false);
        config["model"]["headDim"] = 12.into();
        config["model"]["qkNorm"] = "perHead".into();
        settings_of(config)
    };
    let one = alone_with(&patched(1, 1, 1));
    assert!(one.weights.iter().any(|(name, _)| name.ends_with("q_norm")));
    compare(
        "SP 2, q/k norms",
        &one,
        &parallel_run_with(2, 2, 1, &patched(2, 2, 1)),
    );
    compare(
        "SP 2 × EP 2, q/k norms",
        &one,
        &parallel_run_with(4, 2, 2, &patched(4, 2, 2)),
    );
}

/// Supervised fine-tuning trains on answers alone, and every micro-batch
/// and every rank's slice of a sequence holds its own number of their
/// tokens (some none). A step's loss is still the mean over every trained
/// target of its global batch: one process taking the batch of 4 in one
/// pass (whose own mean is that, by definition) is the reference, and four
/// micro-batches, sequence parallelism (with expert or data parallelism)
/// and data parallelism alone must train like it. A mean of each pass's
/// mean instead (what a pass computes alone) over-weighs a short answer's
/// tokens: the first step's loss is then 27 % off with four micro-batches,
/// 40 % with SP 2 (measured).
#[test]
fn fine_tuning_on_answers_trains_the_global_batchs_mean_however_it_is_split() {
    let sft = |ranks: usize, sp: usize, ep: usize, micro_batch: usize| {
        let mut config = config(ranks, sp, ep, false);
        config["training"]["microBatchSize"] = micro_batch.into();
        settings_of(config)
    };
    let whole = alone_on(&sft(1, 1, 1, 4), Targets::Answers);
    let micro = alone_on(&sft(1, 1, 1, 1), Targets::Answers);
    compare_within("4 micro-batches", &whole, &[micro], 1e-12);
    for (what, ranks, sp, ep) in [
        ("SP 2", 2, 2, 1),
        ("SP 2 × EP 2", 4, 2, 2),
        ("SP 2 × DP 2", 4, 2, 1),
        ("DP 2", 2, 1, 1),
    ] {
        let run = parallel_run_on(ranks, sp, ep, &sft(ranks, sp, ep, 1), Targets::Answers);
        compare_within(what, &whole, &run, 1e-12);
    }
}

/// The worst relative gap between a parallel run's balance losses and one
/// process's, over the steps (every rank reports the same, see [`compare`]).
fn worst_aux_gap(one: &Outcome, ranks: &[Outcome]) -> f64 {
    ranks[0]
        .reports
        .iter()
        .zip(&one.reports)
        .map(|(got, want)| (got.aux_loss - want.aux_loss).abs() / want.aux_loss)
        .fold(0.0, f64::max)
}

/// DeepSeek-V3's sequence-wise balance loss under sequence parallelism:
/// each rank routes only its slice of every sequence, the group sums the
/// slices' selection counts and normalised-score sums, and every rank gets
/// the whole sequences' `f_i` and `P_i`. Against one process with the same
/// coefficient: the cross-entropy, expert loads and weights within data
/// parallelism's tolerances ([`compare`]), and the balance loss every step
/// within 10⁻⁵ relative (its statistics cross the wire as f32). A group that
/// did not sum them would report each slice's loss and train on each
/// slice's `f_i`. The sums cost `(2 × experts + 1) × sequences × 4` bytes per
/// MoE layer and micro-batch (counts, score sums and the real tokens; one
/// MoE layer and one sequence per micro-batch here).
#[test]
fn sequence_parallel_training_with_the_sequence_wise_aux_loss_matches_one_process() {
    let one = alone(AUX);
    assert!(
        one.reports.iter().all(|r| r.aux_loss > 0.0),
        "the balance loss is on"
    );
    for (what, ranks, ep) in [("SP 2", 2, 1), ("SP 2 × EP 2", 4, 2), ("SP 2 × DP 2", 4, 1)] {
        let run = parallel_run(ranks, 2, ep, false, AUX);
        let aux_gap = worst_aux_gap(&one, &run);
        eprintln!(
            "{what}, aux loss {AUX}: balance losses differ by at most {aux_gap:.2e} relative"
        );
        assert!(
            aux_gap <= 1e-5,
            "{what}: balance losses differ by {aux_gap:e}"
        );
        compare(&format!("{what}, aux loss {AUX}"), &one, &run);
        // Micro-batches of 1 of the global batch of 4, over ranks / sp shards.
        let micro_steps = 4 / (ranks / 2);
        for o in &run {
            assert_eq!(
                o.summed,
                (micro_steps * STEPS * (2 * 4 + 1) * 4) as u64,
                "{what}: bytes summed"
            );
        }
    }
}

/// Fine-tuning on conversations padded to the sequence (some cut), with
/// the balance loss and aux-loss-free biases: each rank's slice of a
/// sequence holds its own share of the padding (the second slice of a
/// short conversation nothing but padding), which the MoE layers leave out
/// of the loads and the balance loss, and the group's sums of real tokens
/// give every rank the whole sequences' `T`. Against one process: the
/// expert loads exactly, the balance loss within 10⁻⁵. A rank that counted
/// its slice as all real would report other loads. Packed several to a
/// sequence, the conversations attend within themselves over the whole
/// sequence each rank's heads see, and RoPE turns each rank's slice from
/// its documents' starts: the same again.
#[test]
fn padded_conversations_balance_alike_however_they_are_split() {
    let sft = |ranks: usize, sp: usize, ep: usize| {
        settings_of(config_with_aux(ranks, sp, ep, false, AUX))
    };
    let trained = |one: &Outcome| one.reports.iter().map(|r| r.trained_tokens).sum::<usize>();
    let mut trained_alone = Vec::new();
    for targets in [Targets::Conversations, Targets::PackedConversations] {
        let one = alone_on(&sft(1, 1, 1), targets);
        trained_alone.push(trained(&one));
        for (what, ranks, sp, ep) in [
            ("SP 2", 2, 2, 1),
            ("SP 2 × EP 2", 4, 2, 2),
            ("DP 2", 2, 1, 1),
        ] {
            let settings = sft(ranks, sp, ep);
            let run = parallel_run_on(ranks, sp, ep, &settings, targets);
            if matches!(targets, Targets::Conversations) {
                // Each micro-batch is cut to its longest conversation (to
                // whole slices): fewer FLOPs than its tokens as drawn cost.
                let full = moe_worker::model::flops::training_flops(&settings.model).per_token;
                let report = &run[0].reports[0];
                assert!(
                    report.flops < 0.9 * report.tokens as f64 * full,
                    "{what}: {} FLOPs for {} tokens drawn",
                    report.flops,
                    report.tokens
                );
            }
            let aux_gap = worst_aux_gap(&one, &run);
            eprintln!("{what}, {targets:?}: balance losses differ by at most {aux_gap:.2e}");
            assert!(
                aux_gap <= 1e-5,
                "{what}: balance losses differ by {aux_gap:e}"
            );
            compare_within(&format!("{what}, {targets:?}"), &one, &run, 1e-12);
        }
    }
    // Packed, the same steps train more of the conversations' answers.
    assert!(
        trained_alone[1] > trained_alone[0],
        "trained tokens: {trained_alone:?}"
    );
}

/// Activation checkpointing reruns each block's forward pass, layout
/// switches and the balance loss's sums included, in the backward pass:
/// the same values, so the same bits.
#[test]
fn sequence_parallelism_with_activation_checkpointing_trains_the_same_bits() {
    let kept = parallel_run(2, 2, 1, false, AUX);
    let recomputed = parallel_run(2, 2, 1, true, AUX);
    for (k, r) in kept.iter().zip(&recomputed) {
        assert_eq!(k.reports, r.reports);
        for ((name, a), (_, b)) in k.weights.iter().zip(&r.weights) {
            let bits =
                |v: &[Option<f32>]| v.iter().map(|x| x.map(f32::to_bits)).collect::<Vec<_>>();
            assert_eq!(bits(a), bits(b), "{name}");
        }
        // The forward's switches and sums happen twice.
        assert_eq!(r.bytes, k.bytes / 2 * 3);
        assert_eq!(r.summed, k.summed * 2);
    }
}

/// Runs `moe_worker::run::train_as` on `ranks` threads with a checkpoint
/// every 2 steps; returns each step's loss from rank 0's metrics.
fn train_run(
    ranks: usize,
    sp: usize,
    ep: usize,
    root: &std::path::Path,
    run: &str,
) -> Vec<(u64, f64)> {
    let mut config = config(ranks, sp, ep, false);
    config["checkpoint"] = json!({
        "dir": root.join(run).join("checkpoints").to_string_lossy(),
        "intervalSteps": 2, "keep": 10, "resume": "Auto"
    });
    config["outputDir"] = root.join(run).to_string_lossy().into();
    let config = parse_worker_config(&config.to_string()).expect("valid config");
    let stop = std::sync::atomic::AtomicBool::new(false);
    world(ranks, |mut c| {
        moe_worker::run::train_as(&config, &stop, None, &mut c, Default::default())
            .expect("training")
    });
    let metrics = std::fs::read_to_string(root.join(run).join("metrics.jsonl")).expect("metrics");
    metrics
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("a JSON line");
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

/// Sequence-parallel ranks hold replicated weights, so their checkpoints
/// are today's: one state file from rank 0 (plus expert shards only with
/// expert parallelism). An SP 2 run's step-2 checkpoint resumed with SP 1
/// (one process) and with SP 2 × EP 2 continues like the uninterrupted run:
/// step 3's loss bit-equal (the same weights and tokens, see [`compare`]),
/// step 4's within rounding.
#[test]
fn sequence_parallel_checkpoints_resume_with_another_parallelism() {
    let root = std::env::temp_dir().join(format!("moe-sp-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let reference = train_run(2, 2, 1, &root, "sp2");
    assert_eq!(reference.len(), STEPS);
    let saved = root.join("sp2/checkpoints/step-00000002");
    let files: Vec<String> = std::fs::read_dir(&saved)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        files.iter().all(|f| !f.starts_with("experts-")),
        "an unsharded checkpoint: {files:?}"
    );
    for (ranks, sp, ep, run) in [(1, 1, 1, "sp2-to-sp1"), (4, 2, 2, "sp2-to-sp2xep2")] {
        copy_dir(&saved, &root.join(run).join("checkpoints/step-00000002"));
        let resumed = train_run(ranks, sp, ep, &root, run);
        assert_eq!(
            resumed.iter().map(|r| r.0).collect::<Vec<_>>(),
            [3, 4],
            "{run}"
        );
        let next = (resumed[0].1 - reference[2].1).abs() / reference[2].1;
        let after = (resumed[1].1 - reference[3].1).abs() / reference[3].1;
        eprintln!("{run}: step 3 loss differs by {next:.2e}, step 4 by {after:.2e}");
        assert_eq!(
            resumed[0].1.to_bits(),
            reference[2].1.to_bits(),
            "{run}: step 3 loss differs by {next:e}"
        );
        assert!(after <= 1e-5, "{run}: step 4 loss differs by {after:e}");
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// `training.evaluation` over ranks: each reads its shard of the held-out
/// sequences (its slice of each, under SP) and the loss is the mean over
/// all their targets, so SP 2, SP 2 × EP 2 and DP 2 report one process's
/// held-out loss, on text and on padded conversations, every rank the same.
#[test]
fn the_held_out_loss_is_one_processs_however_the_ranks_split_it() {
    let evaluation = |settings: &TrainSettings, targets: Targets| {
        let t = trainer(settings, 0..4, targets);
        let corpus = t.data().corpus().clone();
        let start = held_out_start(&corpus, 20);
        let (seq_len, seed) = (settings.model.seq_len, settings.training.seed);
        let mut data =
            DataLoader::new_in(corpus.clone(), start..corpus.len(), seq_len, seed, "tiny")
                .expect("held-out data");
        if let Targets::PackedConversations = targets {
            data = data.packed();
        }
        Evaluation::new(data, 2)
    };
    for targets in [
        Targets::All,
        Targets::Conversations,
        Targets::PackedConversations,
    ] {
        let one_settings = settings(1, 1, 1, false, AUX);
        let mut alone = trainer(&one_settings, 0..4, targets);
        let want = alone.evaluate(&mut evaluation(&one_settings, targets));
        for (what, ranks, sp, ep) in [
            ("SP 2", 2, 2, 1),
            ("SP 2 × EP 2", 4, 2, 2),
            ("DP 2", 2, 1, 1),
        ] {
            let s = settings(ranks, sp, ep, false, AUX);
            let losses = world(ranks, |mut c| {
                let (sequence, experts) = groups(&c, sp, ep, s.model.seq_len);
                let parallel = Parallel {
                    sequence: Some(&sequence),
                    experts: experts.as_ref(),
                };
                let owned = experts.as_ref().map_or(0..4, ExpertParallel::local_experts);
                let mut t = trainer(&s, owned, targets);
                let mut eval = evaluation(&s, targets);
                t.evaluate_parallel(&mut eval, &mut c, parallel)
                    .expect("collectives")
            });
            eprintln!(
                "{what}, {targets:?}: held-out loss {} vs one process {want}",
                losses[0]
            );
            for loss in &losses {
                assert_eq!(
                    loss.to_bits(),
                    losses[0].to_bits(),
                    "{what}: every rank the same"
                );
            }
            assert!(
                (losses[0] - want).abs() <= 1e-6 * want,
                "{what}, {targets:?}: {} vs {want}",
                losses[0]
            );
        }
    }
}
