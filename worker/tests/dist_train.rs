//! Data-parallel training against one process: ranks as threads over
//! loopback TCP, each a `Trainer` stepping with `step_with`, must train what
//! one `Trainer` does alone on the same global batch.

mod dist_support;

use dist_support::world;
use moe_worker::data::{DataLoader, load_tokens};
use moe_worker::settings::{TrainSettings, parse_worker_config};
use moe_worker::train::{StepReport, Trainer};
use serde_json::json;

const STEPS: usize = 4;

/// A small MoE model with every balancing mechanism on (selection-bias
/// updates read the summed expert loads; the aux loss is averaged), on
/// `ranks` data-parallel ranks with `micro` sequences per micro-batch.
fn settings(ranks: usize, global_batch: usize, micro: usize) -> TrainSettings {
    settings_in(ranks, global_batch, micro, json!({}))
}

/// [`settings`] with `training`'s fields in `training` added or replaced.
fn settings_in(
    ranks: usize,
    global_batch: usize,
    micro: usize,
    training: serde_json::Value,
) -> TrainSettings {
    let mut config = json!({
        "job": "local/dp",
        "model": {
            "hiddenSize": 32, "layers": 2, "denseLayers": 1, "denseHiddenSize": 64,
            "attentionHeads": 4, "kvHeads": 2, "seqLen": 32,
            "moe": {"experts": 4, "topK": 2, "sharedExperts": 1, "expertHiddenSize": 32,
                    "router": "sigmoid", "groups": 2, "topGroups": 2,
                    "balancing": {"auxLossFree": {"enabled": true, "biasUpdateRate": 0.01},
                                  "sequenceAuxLossCoef": 0.001}}
        },
        "data": {"builtin": {"corpus": "tiny"}},
        "training": {
            "steps": STEPS, "globalBatchSize": global_batch, "microBatchSize": micro, "seed": 7,
            "optimizer": {"learningRate": 0.01, "minLearningRate": 0.001, "warmupSteps": 1,
                          "gradClip": 1.0}
        },
        "parallelism": {"processesPerNode": ranks},
        "checkpoint": {"dir": "unused", "intervalSteps": 100, "keep": 1, "resume": "Never"},
        "device": "cpu",
        "outputDir": "unused"
    });
    for (field, value) in training.as_object().expect("training fields") {
        config["training"][field] = value.clone();
    }
    let config = parse_worker_config(&config.to_string()).expect("valid config");
    TrainSettings::from_config(&config).expect("valid settings")
}

fn trainer(settings: &TrainSettings) -> Trainer {
    let tokens = load_tokens(&settings.data, settings.model.vocab).expect("built-in corpus");
    let loader = DataLoader::new(
        tokens,
        settings.model.seq_len,
        settings.training.seed,
        "tiny",
    )
    .expect("loader");
    Trainer::new(settings.model.clone(), settings.training.clone(), loader)
}

/// Every weight tensor by name, in canonical order.
fn weights(trainer: &Trainer) -> Vec<(String, Vec<f32>)> {
    let model = trainer.model();
    model
        .weights
        .tensors(model.config())
        .iter()
        .map(|t| (t.name.clone(), t.values.to_vec()))
        .collect()
}

/// What a run ends with: each step's report, the weights, and the data
/// position a checkpoint would store.
struct Outcome {
    reports: Vec<StepReport>,
    weights: Vec<(String, Vec<f32>)>,
    position: moe_worker::data::DataPosition,
}

fn alone(settings: &TrainSettings) -> Outcome {
    let mut t = trainer(settings);
    let reports = (0..STEPS)
        .map(|_| t.step(&|| false).expect("not stopped"))
        .collect();
    Outcome {
        reports,
        weights: weights(&t),
        position: t.data_position(),
    }
}

/// One outcome per rank of a world of `ranks` threads.
fn data_parallel(settings: &TrainSettings, ranks: usize) -> Vec<Outcome> {
    world(ranks, |mut group| {
        let mut t = trainer(settings);
        let reports = (0..STEPS)
            .map(|_| {
                t.step_with(&|| false, &mut group)
                    .expect("collectives")
                    .expect("not stopped")
            })
            .collect();
        Outcome {
            reports,
            weights: weights(&t),
            position: t.data_position(),
        }
    })
}

fn bits(weights: &[(String, Vec<f32>)]) -> Vec<u32> {
    weights
        .iter()
        .flat_map(|(_, t)| t.iter().map(|v| v.to_bits()))
        .collect()
}

/// Checks replicas against one process trained on the same global batch.
///
/// Not bit-exact: the backward pass adds each micro-batch's contributions
/// into the running gradient sum one by one, so one process computes
/// `((g0 + g1) + g2) + g3` term by term while two ranks compute `g0 + g1`
/// and `g2 + g3` and then add those; the rounding differs from the second
/// micro-batch on, and Adam's normalisation amplifies it for small
/// gradients. What is exact:
/// - the replicas agree with each other bit for bit (deterministic ring);
/// - the first step's loss: the same windows through the same weights,
///   which proves the shards are exactly the single process's micro-batches;
/// - the data position after every step, and the expert loads (integers;
///   a routing tie flipped by rounding would change them, which these four
///   steps do not hit).
fn compare(one: &Outcome, replicas: &[Outcome]) {
    for (rank, replica) in replicas.iter().enumerate() {
        assert_eq!(
            bits(&replica.weights),
            bits(&replicas[0].weights),
            "rank {rank}: replicas must hold identical weights"
        );
        assert_eq!(replica.reports, replicas[0].reports, "rank {rank}: reports");
        assert_eq!(replica.position, one.position, "rank {rank}: data position");
    }
    let replica = &replicas[0];
    assert_eq!(
        replica.reports[0].loss.to_bits(),
        one.reports[0].loss.to_bits(),
        "first step's loss: the same windows must be read"
    );
    let mut worst_loss = 0f64;
    for (got, want) in replica.reports.iter().zip(&one.reports) {
        assert_eq!(got.step, want.step);
        assert_eq!(got.tokens, want.tokens, "tokens of the global batch");
        let flops_gap = (got.flops - want.flops).abs() / want.flops;
        assert!(
            flops_gap < 1e-12,
            "the world's FLOPs: {} vs {}",
            got.flops,
            want.flops
        );
        assert_eq!(got.expert_loads, want.expert_loads, "step {}", got.step);
        worst_loss = worst_loss.max((got.loss - want.loss).abs() / want.loss);
    }
    // Adam moves a weight by at most about the learning rate per step,
    // whatever the gradient's size: the sum of the rates bounds how far the
    // two runs could drift apart, and differences are measured against it.
    let budget: f64 = one.reports.iter().map(|r| r.learning_rate).sum();
    let (mut worst_weight, mut worst_at) = (0f64, String::new());
    let (mut squares, mut count) = (0f64, 0usize);
    for ((name, got), (_, want)) in replica.weights.iter().zip(&one.weights) {
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            let d = f64::from((a - b).abs()) / budget;
            squares += d * d;
            count += 1;
            if d > worst_weight {
                (worst_weight, worst_at) = (d, format!("{name}[{i}]: {a} vs {b}"));
            }
        }
    }
    let rms = (squares / count as f64).sqrt();
    eprintln!(
        "loss: largest relative difference {worst_loss:e}; weights: RMS difference {rms:e} and largest {worst_weight:e} of the Adam budget, at {worst_at}"
    );
    assert!(worst_loss < 1e-5, "loss relative difference {worst_loss:e}");
    // Typical weights agree to rounding; a few whose gradient is near zero
    // take Adam steps of a size set by that rounding (measured: at most
    // 1.3 % of the budget, RMS below 1e-4).
    assert!(
        rms < 1e-3,
        "RMS weight difference {rms:e} of the Adam budget"
    );
    assert!(
        worst_weight < 5e-2,
        "weight difference {worst_weight:e} of the Adam budget at {worst_at}"
    );
}

/// LoRA adapters (`training.lora`) train on two ranks as in one process:
/// the adapters' gradients come from the averaged weight gradients, so the
/// replicas' adapters, and the merged weights, stay identical.
#[test]
fn lora_ranks_match_one_process() {
    let lora = || json!({"lora": {"rank": 4, "targets": ["q_proj", "o_proj", "gate_proj", "down_proj"], "routedExperts": true}});
    let one = alone(&settings_in(1, 4, 2, lora()));
    let replicas = data_parallel(&settings_in(2, 4, 2, lora()), 2);
    compare(&one, &replicas);
    // Something was trained, and only the adapted tensors moved.
    let initial = weights(&trainer(&settings_in(1, 4, 2, lora())));
    let moved: Vec<&str> = replicas[0]
        .weights
        .iter()
        .zip(&initial)
        .filter(|((_, got), (_, was))| got != was)
        .map(|((name, _), _)| name.as_str())
        .collect();
    assert!(moved.contains(&"blocks.0.wq"), "{moved:?}");
    assert!(moved.contains(&"blocks.1.moe.experts_w1"), "{moved:?}");
    assert!(
        moved.iter().all(|name| ["wq", "wo", "w1", "w2"]
            .iter()
            .any(|leaf| name.ends_with(leaf))),
        "only the adapted projections move: {moved:?}"
    );
}

/// One micro-batch on each of two ranks vs two micro-batches in one process.
#[test]
fn two_ranks_of_one_micro_batch_match_one_process_of_two() {
    let one = alone(&settings(1, 4, 2));
    assert_eq!(one.reports[0].tokens, 4 * 32);
    compare(&one, &data_parallel(&settings(2, 4, 2), 2));
}

/// Two micro-batches on each of two ranks vs four in one process.
#[test]
fn two_ranks_of_two_micro_batches_match_one_process_of_four() {
    let one = alone(&settings(1, 8, 2));
    compare(&one, &data_parallel(&settings(2, 8, 2), 2));
}

/// Four ranks (a ring of four sums in another order again).
#[test]
fn four_ranks_match_one_process() {
    let one = alone(&settings(1, 8, 2));
    compare(&one, &data_parallel(&settings(4, 8, 2), 4));
}

/// Tensorwise FP8 over two ranks: each sees half the global batch, and the
/// ranks take the world's amaxes at the end of every step, so after a step
/// every rank keeps the amax histories one process training the whole batch
/// keeps, bit for bit (before the first update the weights are the same, and
/// each micro-batch's tensors are computed the same way on both). Without
/// the exchange each rank's activation histories would hold its own half's
/// largest values. Then the replicas train on in step: identical weights.
#[test]
fn tensorwise_fp8_ranks_keep_the_amax_histories_of_one_process() {
    let fp8 = || json!({"precision": {"fp8": {"enabled": true, "recipe": "tensorwise"}}});
    let mut one = trainer(&settings_in(1, 4, 2, fp8()));
    one.step(&|| false).expect("not stopped");
    let want = one.model().fp8_histories();
    assert!(
        want.iter().flatten().all(|h| h.len() <= 1) && want.iter().flatten().any(|h| h.len() == 1),
        "one step: at most one amax per history"
    );
    let replicas = world(2, |mut group| {
        let mut t = trainer(&settings_in(2, 4, 2, fp8()));
        t.step_with(&|| false, &mut group)
            .expect("collectives")
            .expect("not stopped");
        let histories = t.model().fp8_histories();
        for _ in 1..STEPS {
            t.step_with(&|| false, &mut group)
                .expect("collectives")
                .expect("not stopped");
        }
        (histories, weights(&t))
    });
    let as_bits = |histories: &[[Vec<f32>; 3]]| -> Vec<Vec<u32>> {
        histories
            .iter()
            .flatten()
            .map(|h| h.iter().map(|v| v.to_bits()).collect())
            .collect()
    };
    for (rank, (histories, weights)) in replicas.iter().enumerate() {
        assert_eq!(
            as_bits(histories),
            as_bits(&want),
            "rank {rank}: histories after step 1"
        );
        assert_eq!(
            bits(weights),
            bits(&replicas[0].1),
            "rank {rank}: weights after {STEPS} steps"
        );
    }
}
