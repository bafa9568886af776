//! `training.evaluation`: the loss on held-out data, never trained on.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use moe_worker::data::{DataLoader, held_out_start, load_tokens};
use moe_worker::model::Model;
use moe_worker::ops::cross_entropy::IGNORED;
use moe_worker::run;
use moe_worker::settings::TrainSettings;
use moe_worker::train::{Evaluation, Trainer};
use serde_json::{Value, json};

use crate::{config_json, scratch_dir, worker_config};

fn with_evaluation(dir: &Path, interval: u64) -> Value {
    let mut config = config_json(dir);
    config["training"]["evaluation"] = json!({"intervalSteps": interval, "heldOutPercent": 10});
    config
}

/// Each `metrics.jsonl` line of `dir`, parsed.
fn lines(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("out").join(run::METRICS_FILE))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Every second step of six and the last, the held-out loss lands in that
/// step's `metrics.jsonl` line and the summary; training on the rest of
/// the text brings it down.
#[test]
fn the_held_out_loss_is_reported_every_interval_and_falls() {
    let dir = scratch_dir("eval-interval");
    let mut config = with_evaluation(&dir, 2);
    config["training"]["logIntervalSteps"] = 3.into();
    let summary = run::train(&worker_config(&config), &AtomicBool::new(false)).unwrap();
    let evaluated: Vec<(u64, f64)> = lines(&dir)
        .iter()
        .filter_map(|l| Some((l["step"].as_u64()?, l["evalLoss"].as_f64()?)))
        .collect();
    eprintln!("{evaluated:?}");
    assert_eq!(evaluated.iter().map(|e| e.0).collect::<Vec<_>>(), [2, 4, 6]);
    // Logged steps 3 and 6, and the evaluated 2 and 4 too.
    let logged: Vec<u64> = lines(&dir)
        .iter()
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(logged, [2, 3, 4, 6]);
    assert_eq!(summary.eval_loss, Some(evaluated[2].1));
    assert!(evaluated[2].1 < evaluated[0].1, "{evaluated:?}");
}

/// Evaluating after every step trains exactly what evaluating only at the
/// end does — the same losses and the same checkpoint bytes — in f32 and
/// with tensorwise FP8, whose forward passes record amaxes for the next
/// scales (an evaluation's must be forgotten).
#[test]
fn evaluating_changes_nothing_in_training() {
    for fp8 in [false, true] {
        let run_every = |interval: u64| {
            let dir = scratch_dir(&format!("eval-every-{interval}-{fp8}"));
            let mut config = with_evaluation(&dir, interval);
            config["training"]["logIntervalSteps"] = 1.into();
            if fp8 {
                config["training"]["precision"] =
                    json!({"fp8": {"enabled": true, "recipe": "tensorwise"}});
            }
            let summary = run::train(&worker_config(&config), &AtomicBool::new(false)).unwrap();
            let losses: Vec<u64> = lines(&dir)
                .iter()
                .map(|l| l["loss"].as_f64().unwrap().to_bits())
                .collect();
            let state =
                std::fs::read(summary.checkpoint.unwrap().join("state.safetensors")).unwrap();
            (losses, state, summary.eval_loss.unwrap())
        };
        let (every, every_state, every_eval) = run_every(1);
        let (end, end_state, end_eval) = run_every(100);
        assert_eq!(every, end, "fp8 {fp8}: the training losses");
        assert!(
            every_state == end_state,
            "fp8 {fp8}: the checkpoints differ"
        );
        assert_eq!(every_eval.to_bits(), end_eval.to_bits(), "fp8 {fp8}");
    }
}

/// The evaluation's loss is the mean cross-entropy over every target of
/// its held-out sequences, computed here in one pass of the same model over
/// all of them; it reads the same sequences every time; and the held-out
/// part is the text's last tenth, which training never draws from.
#[test]
fn the_evaluation_is_the_mean_loss_over_the_held_out_sequences() {
    let dir = scratch_dir("eval-mean");
    let config = with_evaluation(&dir, 2);
    let settings = TrainSettings::from_config(&worker_config(&config)).unwrap();
    let corpus = load_tokens(&settings.data, settings.model.vocab).unwrap();
    let start = held_out_start(&corpus, 10);
    assert_eq!(start, corpus.len() - corpus.len() / 10);
    let (seq_len, seed) = (settings.model.seq_len, settings.training.seed);
    let held_out =
        DataLoader::new_in(corpus.clone(), start..corpus.len(), seq_len, seed, "tiny").unwrap();
    let mut training = DataLoader::new_in(corpus.clone(), 0..start, seq_len, seed, "tiny").unwrap();
    let global = settings.training.micro_batch * settings.training.micro_steps;

    // Every training window ends before the held-out part; every held-out
    // window starts in it (their ids are the corpus's at those positions).
    let positions = |batch: &moe_worker::data::Batch| -> Vec<Vec<u32>> {
        batch.inputs.chunks(seq_len).map(<[u32]>::to_vec).collect()
    };
    let text: Vec<u32> = corpus.iter().collect();
    let found = |window: &[u32]| {
        (0..text.len() - seq_len)
            .filter(|&p| text[p..p + seq_len] == *window)
            .collect::<Vec<_>>()
    };
    for window in positions(&training.next_batch(50)) {
        assert!(found(&window).iter().any(|&p| p + seq_len < start));
    }
    let mut reference = held_out.clone();
    let batch = reference.next_batch(global);
    for window in positions(&batch) {
        assert!(found(&window).iter().any(|&p| p >= start));
    }

    let model = Model::<f32>::initial(settings.model.clone(), seed);
    let want = model.forward(&batch.inputs, &batch.targets).cross_entropy;
    assert!(batch.targets.iter().all(|&t| t != IGNORED));
    let mut trainer = Trainer::new(settings.model.clone(), settings.training.clone(), training);
    let mut eval = Evaluation::new(held_out, 1);
    let got = trainer.evaluate(&mut eval);
    assert!((got - want).abs() <= 1e-6 * want, "{got} vs {want}");
    assert_eq!(trainer.evaluate(&mut eval).to_bits(), got.to_bits());
}

/// `training.evaluation.path`: files beside the training data, read as it
/// is, evaluated whole, while training reads all of `data`. With a zero
/// learning rate and no bias update the weights stay the seed's, so the
/// reported loss is the initial model's on those files: computed here.
#[test]
fn a_path_of_its_own_is_evaluated_instead_of_a_held_out_share() {
    let dir = scratch_dir("eval-path");
    let text: Vec<u8> = moe_worker::data::tiny::corpus().to_vec();
    std::fs::create_dir_all(dir.join("corpus")).unwrap();
    std::fs::write(dir.join("corpus/train.txt"), &text[..text.len() * 3 / 4]).unwrap();
    std::fs::write(dir.join("val.txt"), &text[text.len() * 3 / 4..]).unwrap();
    let mut config = config_json(&dir);
    config["dataDir"] = dir.to_string_lossy().into();
    config["data"] = json!({"volume": {"claimName": "local", "path": "corpus"}});
    config["training"]["steps"] = 2.into();
    config["training"]["optimizer"] = json!({"learningRate": 0.0, "minLearningRate": 0.0});
    config["model"]["moe"]["balancing"] = json!({"auxLossFree": {"enabled": false}});
    config["training"]["evaluation"] = json!({"intervalSteps": 1, "path": "val.txt"});
    let settings = TrainSettings::from_config(&worker_config(&config)).unwrap();
    let source = settings
        .evaluation
        .as_ref()
        .unwrap()
        .source
        .clone()
        .unwrap();
    assert_eq!(
        source,
        moe_worker::settings::DataSource::Volume(dir.join("val.txt"))
    );
    let summary = run::train(&worker_config(&config), &AtomicBool::new(false)).unwrap();

    let held_out = load_tokens(&source, settings.model.vocab).unwrap();
    assert_eq!(held_out.len(), text.len() - text.len() * 3 / 4);
    let (seq_len, seed) = (settings.model.seq_len, settings.training.seed);
    let eval_data = DataLoader::new(held_out, seq_len, seed, "val").unwrap();
    let training = DataLoader::new(
        load_tokens(&settings.data, settings.model.vocab).unwrap(),
        seq_len,
        seed,
        "train",
    )
    .unwrap();
    let mut trainer = Trainer::new(settings.model.clone(), settings.training.clone(), training);
    let want = trainer.evaluate(&mut Evaluation::new(eval_data, 1));
    assert_eq!(summary.eval_loss.map(f64::to_bits), Some(want.to_bits()));
}

/// `training.evaluation.patience`: with a zero learning rate the held-out
/// loss never improves on its first value, so with a patience of 2 the run
/// evaluates after steps 1, 2 and 3 and stops there, checkpointed and
/// successful, instead of running its 6 steps.
#[test]
fn a_run_stops_early_once_the_held_out_loss_stops_improving() {
    let dir = scratch_dir("eval-patience");
    let mut config = with_evaluation(&dir, 1);
    config["training"]["evaluation"]["patience"] = 2.into();
    config["training"]["optimizer"] = json!({"learningRate": 0.0, "minLearningRate": 0.0});
    config["model"]["moe"]["balancing"] = json!({"auxLossFree": {"enabled": false}});
    let summary = run::train(&worker_config(&config), &AtomicBool::new(false)).unwrap();
    assert!(summary.stopped_early && !summary.interrupted);
    assert_eq!(summary.steps, 3);
    assert!(summary.checkpoint.unwrap().ends_with("step-00000003"));
    // Rank 0's last report (the pod's termination message) says so too.
    let report = &summary.report;
    assert!(report.stopped_early, "{report:?}");
    assert_eq!((report.step, report.total_steps), (3, 6));
    assert_eq!(report.last_checkpoint_step, Some(3));
    assert_eq!(report.eval_loss, summary.eval_loss);
    assert_eq!(report.loss, summary.final_loss);
    let evaluated: Vec<f64> = lines(&dir)
        .iter()
        .filter_map(|l| l["evalLoss"].as_f64())
        .collect();
    assert_eq!(evaluated.len(), 3);
    assert!(
        evaluated.iter().all(|&l| l == evaluated[0]),
        "{evaluated:?}"
    );
    // Learning, the same run goes on to its last step.
    let dir = scratch_dir("eval-patience-learning");
    let mut config = with_evaluation(&dir, 1);
    config["training"]["evaluation"]["patience"] = 2.into();
    let summary = run::train(&worker_config(&config), &AtomicBool::new(false)).unwrap();
    assert!(!summary.stopped_early);
    assert_eq!(summary.steps, 6);
    let report = &summary.report;
    assert!(!report.stopped_early, "{report:?}");
    assert_eq!((report.step, report.last_checkpoint_step), (6, Some(6)));
}

/// The checkpoint steps under `dir`'s checkpoint directory, oldest first.
fn checkpoint_steps(dir: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(dir.join("checkpoints"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().ok()?;
            name.strip_prefix("step-")?.parse().ok()
        })
        .collect();
    steps.sort_unstable();
    steps
}

/// `training.evaluation.keepBest`: every checkpoint records its step's
/// held-out loss, and the one with the lowest (the earliest of equals) is
/// kept besides the newest `checkpoint.keep` and named the run's model.
/// At a zero learning rate every evaluation ties, so the first checkpoint
/// stays the best while `keep: 1` prunes every other; learning, the best is
/// the lowest of the metrics' losses at checkpointed steps.
#[test]
fn keep_best_keeps_the_checkpoint_with_the_lowest_held_out_loss() {
    let run_with = |name: &str, learning: bool, patience: Option<i32>| {
        let dir = scratch_dir(name);
        let mut config = with_evaluation(&dir, 1);
        config["training"]["evaluation"]["keepBest"] = true.into();
        if let Some(p) = patience {
            config["training"]["evaluation"]["patience"] = p.into();
        }
        config["checkpoint"]["intervalSteps"] = 2.into();
        config["checkpoint"]["keep"] = 1.into();
        if !learning {
            config["training"]["optimizer"] = json!({"learningRate": 0.0, "minLearningRate": 0.0});
            config["model"]["moe"]["balancing"] = json!({"auxLossFree": {"enabled": false}});
        }
        let summary = run::train(&worker_config(&config), &AtomicBool::new(false)).unwrap();
        (dir, summary)
    };
    let (dir, summary) = run_with("keep-best-ties", false, None);
    assert_eq!(
        checkpoint_steps(&dir),
        [2, 6],
        "the best (2) and the newest (6)"
    );
    assert!(summary.best_checkpoint.unwrap().ends_with("step-00000002"));
    assert_eq!(summary.report.best_checkpoint_step, Some(2));
    assert_eq!(summary.report.last_checkpoint_step, Some(6));

    // With patience, as early stopping is used: stopped at 3, the model is 2's.
    let (dir, summary) = run_with("keep-best-patience", false, Some(2));
    assert!(summary.stopped_early);
    assert_eq!(checkpoint_steps(&dir), [2, 3]);
    assert_eq!(summary.report.best_checkpoint_step, Some(2));

    let (dir, summary) = run_with("keep-best-learning", true, None);
    let at_checkpoints: Vec<(u64, f64)> = lines(&dir)
        .iter()
        .filter_map(|l| Some((l["step"].as_u64()?, l["evalLoss"].as_f64()?)))
        .filter(|(step, _)| step % 2 == 0)
        .collect();
    let best = at_checkpoints
        .iter()
        .fold(None::<(u64, f64)>, |b, &(s, l)| match b {
            Some((_, bl)) if bl <= l => b,
            _ => Some((s, l)),
        })
        .unwrap();
    eprintln!("{at_checkpoints:?}: best {best:?}");
    assert_eq!(summary.report.best_checkpoint_step, Some(best.0));
    let mut kept = vec![best.0, 6];
    kept.dedup();
    assert_eq!(checkpoint_steps(&dir), kept);
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(dir.join(format!("checkpoints/step-{:08}/manifest.json", best.0))).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["evalLoss"].as_f64(), Some(best.1));
}

/// Without every checkpoint evaluated there is no best to rank: refused.
#[test]
fn keep_best_needs_every_checkpoint_evaluated() {
    let dir = scratch_dir("keep-best-refused");
    let mut config = with_evaluation(&dir, 2);
    config["training"]["evaluation"]["keepBest"] = true.into();
    let error = run::train(&worker_config(&config), &AtomicBool::new(false)).unwrap_err();
    assert!(
        error.to_string().contains(
            "training.evaluation.keepBest: needs every checkpoint evaluated: checkpoint.intervalSteps (3) must be a multiple of training.evaluation.intervalSteps (2)"
        ),
        "{error}"
    );
}

/// A resumed run counts `training.evaluation.patience` on from where its
/// checkpoint stood. At a zero learning rate no evaluation improves on the
/// first: a patience of 3 stops a 6-step run after step 4. Run 2 steps
/// first (evaluated after 1 and 2, checkpointed at 2), then resumed to 6:
/// it stops after step 4 too; counting afresh it would run to 6.
#[test]
fn a_resumed_run_counts_patience_on_from_its_checkpoint() {
    let config = |dir: &Path, steps: u64| {
        let mut config = with_evaluation(dir, 1);
        config["training"]["steps"] = steps.into();
        config["training"]["evaluation"]["patience"] = 3.into();
        config["training"]["optimizer"] = json!({"learningRate": 0.0, "minLearningRate": 0.0});
        config["model"]["moe"]["balancing"] = json!({"auxLossFree": {"enabled": false}});
        config["checkpoint"]["intervalSteps"] = 2.into();
        worker_config(&config)
    };
    let straight = scratch_dir("patience-straight");
    let summary = run::train(&config(&straight, 6), &AtomicBool::new(false)).unwrap();
    assert!(summary.stopped_early);
    assert_eq!(summary.steps, 4);

    let resumed = scratch_dir("patience-resumed");
    let first = run::train(&config(&resumed, 2), &AtomicBool::new(false)).unwrap();
    assert!(!first.stopped_early);
    let summary = run::train(&config(&resumed, 6), &AtomicBool::new(false)).unwrap();
    assert!(summary.stopped_early, "{summary:?}");
    assert_eq!(summary.steps, 4);
}
