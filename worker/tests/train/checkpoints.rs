//! Checkpoints: exact resumption, crash leftovers, retention and refusals.

use std::fs;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use moe_worker::checkpoint::{self, Snapshot};
use moe_worker::data::{DataLoader, load_corpus, tokenizer};
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
    let tokens = tokenizer::encode(&load_corpus(&settings.data).unwrap());
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
        initial_loss: None,
        loss: None,
        model: trainer.model(),
        optimizer: trainer.optimizer(),
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
