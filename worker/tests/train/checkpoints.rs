//! Checkpoints: exact resumption, crash leftovers, retention and refusals.

use std::fs;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use moe_worker::checkpoint::{self, Snapshot};
use moe_worker::data::{DataLoader, load_tokens};
use moe_worker::run::{self, RunError};
use moe_worker::settings::TrainSettings;
use moe_worker::train::Trainer;
use serde_json::Value;

use crate::{config_json, scratch_dir, worker_config};

fn train(config: &Value) -> Result<run::Summary, RunError> {
    run::train(&worker_config(config), &AtomicBool::new(false))
}

fn state_bytes(checkpoint: &Path) -> Vec<u8> {
    fs::read(checkpoint.join("state.safetensors")).unwrap()
}

fn step_dirs(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// Six steps straight, against three steps, a checkpoint, a fresh process
/// state resumed from it, and three more: the same loss and the same bytes
/// of weights, AdamW moments and selection biases.
#[test]
fn resuming_is_bit_identical_to_training_straight_through() {
    let straight_dir = scratch_dir("resume-straight");
    let straight = train(&config_json(&straight_dir)).unwrap();
    let straight_checkpoint = straight.checkpoint.clone().unwrap();
    assert!(straight_checkpoint.ends_with("step-00000006"));

    let resumed_dir = scratch_dir("resume-split");
    let config = config_json(&resumed_dir);
    let settings = TrainSettings::from_config(&worker_config(&config)).unwrap();
    let tokens = load_tokens(&settings.data, settings.model.vocab).unwrap();
    let loader = DataLoader::new(
        tokens,
        settings.model.seq_len,
        settings.training.seed,
        "tiny",
    )
    .unwrap();
    let mut trainer = Trainer::new(settings.model.clone(), settings.training.clone(), loader);
    for _ in 0..3 {
        trainer.step(&|| false).unwrap();
    }
    let snapshot = Snapshot {
        model_spec: &settings.model_spec,
        seed: settings.training.seed,
        data: trainer.data_position(),
        tokenizer: moe_crds::Tokenizer::Byte,
        tokenizer_file: None,
        initial_loss: None,
        loss: None,
        eval_loss: None,
        patience: None,
        model: trainer.model(),
        optimizer: trainer.optimizer(),
        lora: trainer.lora(),
    };
    checkpoint::save(
        &settings.checkpoint.dir,
        settings.checkpoint.keep,
        &snapshot,
    )
    .unwrap();
    drop(trainer);

    let resumed = train(&config).unwrap();
    assert_eq!(resumed.steps, 6);
    assert_eq!(
        resumed.final_loss.unwrap().to_bits(),
        straight.final_loss.unwrap().to_bits()
    );
    let resumed_checkpoint = resumed.checkpoint.unwrap();
    assert!(resumed_checkpoint.ends_with("step-00000006"));
    assert!(state_bytes(&resumed_checkpoint) == state_bytes(&straight_checkpoint));
}

/// A `.tmp-step-*` directory is what a crash mid-write leaves: resume must
/// ignore it (even with a manifest inside) and the next save removes it.
#[test]
fn an_interrupted_write_is_ignored_and_cleaned_up() {
    let dir = scratch_dir("tmp-leftover");
    let mut config = config_json(&dir);
    train(&config).unwrap();
    let checkpoints = dir.join("checkpoints");
    let leftover = checkpoints.join(".tmp-step-00000009");
    fs::create_dir(&leftover).unwrap();
    fs::write(leftover.join("manifest.json"), "{\"step\": 9").unwrap();
    assert_eq!(
        checkpoint::newest(&checkpoints).unwrap().unwrap(),
        checkpoints.join("step-00000006")
    );

    config["training"]["steps"] = 7.into();
    let summary = train(&config).unwrap();
    assert_eq!(summary.steps, 7);
    // keep = 2: steps 6 and 7 remain; the leftover is gone.
    assert_eq!(step_dirs(&checkpoints), ["step-00000006", "step-00000007"]);
}

#[test]
fn a_corrupt_newest_checkpoint_is_an_error_naming_it() {
    let dir = scratch_dir("corrupt");
    let config = config_json(&dir);
    train(&config).unwrap();
    let newest = dir.join("checkpoints").join("step-00000006");

    let manifest = newest.join("manifest.json");
    let original = fs::read(&manifest).unwrap();
    fs::write(&manifest, &original[..original.len() / 2]).unwrap();
    let error = train(&config).unwrap_err().to_string();
    assert!(
        error.contains("step-00000006") && error.contains("manifest.json is not a valid manifest"),
        "{error}"
    );

    fs::write(&manifest, &original).unwrap();
    let state = newest.join("state.safetensors");
    let mut bytes = fs::read(&state).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    fs::write(&state, &bytes).unwrap();
    let error = train(&config).unwrap_err();
    assert!(matches!(error, RunError::Checkpoint(_)));
    let error = error.to_string();
    assert!(
        error.contains("state.safetensors does not match the checksum"),
        "{error}"
    );
}

#[test]
fn a_checkpoint_of_another_model_shape_is_refused() {
    let dir = scratch_dir("wrong-shape");
    let mut config = config_json(&dir);
    train(&config).unwrap();
    config["model"]["hiddenSize"] = 64.into();
    config["model"]["moe"]["experts"] = 8.into();
    let error = train(&config).unwrap_err().to_string();
    assert!(
        error.contains("different model shape")
            && error.contains("model.hiddenSize is 32 in the checkpoint but 64 in the config")
            && error.contains("model.moe.experts is 4 in the checkpoint but 8 in the config"),
        "{error}"
    );
}

#[test]
fn resume_never_starts_over_and_keep_bounds_the_checkpoints() {
    let dir = scratch_dir("never");
    let mut config = config_json(&dir);
    config["checkpoint"]["intervalSteps"] = 1.into();
    train(&config).unwrap();
    let checkpoints = dir.join("checkpoints");
    assert_eq!(step_dirs(&checkpoints), ["step-00000005", "step-00000006"]);
    // A corrupt checkpoint does not matter when resume is Never.
    fs::write(
        checkpoints.join("step-00000006").join("manifest.json"),
        "garbage",
    )
    .unwrap();
    config["checkpoint"]["resume"] = "Never".into();
    config["training"]["steps"] = 2.into();
    let summary = train(&config).unwrap();
    assert_eq!(summary.steps, 2);
    assert!(summary.initial_loss.unwrap() > 5.0);
    // The earlier run's later checkpoints are left alone, corrupt one included.
    assert_eq!(
        step_dirs(&checkpoints),
        [
            "step-00000001",
            "step-00000002",
            "step-00000005",
            "step-00000006"
        ]
    );
    assert_eq!(
        fs::read_to_string(checkpoints.join("step-00000006").join("manifest.json")).unwrap(),
        "garbage"
    );
}

fn loader(settings: &TrainSettings) -> DataLoader {
    let tokens = load_tokens(&settings.data, settings.model.vocab).unwrap();
    DataLoader::new(
        tokens,
        settings.model.seq_len,
        settings.training.seed,
        "tiny",
    )
    .unwrap()
}

fn snapshot<'a>(settings: &'a TrainSettings, trainer: &'a Trainer) -> Snapshot<'a> {
    Snapshot {
        model_spec: &settings.model_spec,
        seed: settings.training.seed,
        data: trainer.data_position(),
        tokenizer: moe_crds::Tokenizer::Byte,
        tokenizer_file: None,
        initial_loss: None,
        loss: None,
        eval_loss: None,
        patience: None,
        model: trainer.model(),
        optimizer: trainer.optimizer(),
        lora: trainer.lora(),
    }
}

/// Each tensor (weights, then both moments) as bits, by name.
fn all_bits(state: &moe_worker::train::TrainerState) -> Vec<(String, Vec<u32>)> {
    let config = state.model.config();
    let bits = |prefix: &str, tensors: Vec<moe_worker::model::NamedTensor<'_, f32>>| {
        tensors
            .into_iter()
            .map(|t| {
                let bits = t.values.iter().map(|v| v.to_bits()).collect();
                (format!("{prefix}{}", t.name), bits)
            })
            .collect::<Vec<_>>()
    };
    let mut all = bits("", state.model.tensors());
    all.extend(bits("m/", state.first_moment.tensors(config)));
    all.extend(bits("v/", state.second_moment.tensors(config)));
    all
}

/// Loading for a rank that holds only some routed experts (expert
/// parallelism): a sharded checkpoint (shards 0..2 and 2..4) is read into
/// states holding experts 1..3 (across both shards) and 2..4, whose values
/// must be the whole state's rows for them, bit for bit, weights and both
/// moments; the same from an unsharded checkpoint. Only the overlapping
/// shards are read: with shard 2..4 corrupted, a rank holding 0..2 still
/// loads, one holding 2..4 (or all) is refused naming the shard. A rank
/// holding 2..4 writes, from its own tensors, the same shard bytes as one
/// process does from its whole ones.
#[test]
fn a_rank_holding_some_experts_loads_and_writes_only_those() {
    let dir = scratch_dir("expert-shards");
    let config = config_json(&dir);
    let settings = TrainSettings::from_config(&worker_config(&config)).unwrap();
    let mut trainer = Trainer::new(
        settings.model.clone(),
        settings.training.clone(),
        loader(&settings),
    );
    trainer.step(&|| false).unwrap();
    let (spec, model) = (&settings.model_spec, &settings.model);

    // Sharded: two shards written from the whole model, as two ranks would.
    let sharded_dir = dir.join("sharded");
    let temporary = checkpoint::begin(&sharded_dir, 1).unwrap();
    let shot = snapshot(&settings, &trainer);
    let shards = vec![
        checkpoint::write_expert_shard(&temporary, &shot, 0..2).unwrap(),
        checkpoint::write_expert_shard(&temporary, &shot, 2..4).unwrap(),
    ];
    let sharded = checkpoint::commit(&sharded_dir, 1, &shot, &temporary, shards).unwrap();
    let plain = checkpoint::save(&dir.join("plain"), 1, &shot).unwrap();

    let whole = checkpoint::load(&sharded, spec, model).unwrap().state;
    let whole_bits = all_bits(&whole);
    assert_eq!(
        all_bits(&checkpoint::load(&plain, spec, model).unwrap().state),
        whole_bits
    );
    let per = settings.model.moe.expert_hidden * settings.model.hidden;
    for path in [&sharded, &plain] {
        for experts in [1..3, 2..4] {
            let part = checkpoint::load_experts(path, spec, model, experts.clone())
                .unwrap()
                .state;
            assert_eq!(part.model.held_experts(), experts);
            for ((name, got), (_, want)) in all_bits(&part).iter().zip(&whole_bits) {
                let want = if name.contains("moe.experts_") {
                    &want[experts.start * per..experts.end * per]
                } else {
                    want
                };
                assert_eq!(got, want, "{} {experts:?}: {name}", path.display());
            }
            // The model alone (serving, export): the same weights and
            // selection biases, the moments never decoded.
            let (_, alone) = checkpoint::load_model(path, spec, model, experts.clone()).unwrap();
            assert_eq!(alone.held_experts(), experts);
            for (got, want) in alone.tensors().iter().zip(part.model.tensors()) {
                assert_eq!(got.values, want.values, "{}: {}", path.display(), want.name);
            }
            let biases = |m: &moe_worker::model::Model<f32>| -> Vec<Vec<f32>> {
                m.moe_layers().map(|l| l.selection_bias.clone()).collect()
            };
            assert_eq!(biases(&alone), biases(&part.model));
        }
    }

    // A rank's own shard equals the one written from the whole model.
    let mut rank = Trainer::new_with_experts(
        settings.model.clone(),
        settings.training.clone(),
        loader(&settings),
        2..4,
    );
    rank.restore(
        checkpoint::load_experts(&plain, spec, model, 2..4)
            .unwrap()
            .state,
    );
    let again = checkpoint::begin(&dir.join("again"), 1).unwrap();
    let mine = checkpoint::write_expert_shard(&again, &snapshot(&settings, &rank), 2..4).unwrap();
    assert_eq!(
        fs::read(again.join(&mine.file)).unwrap(),
        fs::read(sharded.join(&mine.file)).unwrap()
    );
    assert!(checkpoint::write_expert_shard(&again, &snapshot(&settings, &rank), 0..2).is_err());

    // Corrupt shard 2..4: only its readers notice.
    let shard = sharded.join(checkpoint::expert_shard_name(&(2..4)));
    let mut bytes = fs::read(&shard).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    fs::write(&shard, &bytes).unwrap();
    checkpoint::load_experts(&sharded, spec, model, 0..2).expect("shard 2..4 is not read");
    checkpoint::load_model(&sharded, spec, model, 0..2).expect("shard 2..4 is not read");
    for experts in [2..4, 0..4] {
        let errors = [
            checkpoint::load_experts(&sharded, spec, model, experts.clone())
                .unwrap_err()
                .to_string(),
            checkpoint::load_model(&sharded, spec, model, experts)
                .unwrap_err()
                .to_string(),
        ];
        for error in errors {
            assert!(
                error.contains("experts-00002-00004.safetensors does not match the checksum"),
                "{error}"
            );
        }
    }
}
