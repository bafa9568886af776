//! A small model on the built-in corpus learns well beyond token frequencies.

use std::sync::atomic::AtomicBool;

use moe_worker::run;

use crate::{config_json, scratch_dir, worker_config};

#[test]
fn loss_falls_well_below_its_start_and_the_unigram_entropy() {
    let dir = scratch_dir("learning");
    let mut config = config_json(&dir);
    config["training"]["steps"] = 40.into();
    config["training"]["optimizer"]["learningRate"] = 0.01.into();
    config["checkpoint"]["intervalSteps"] = 1000.into();
    let summary = run::train(&worker_config(&config), &AtomicBool::new(false)).unwrap();
    let (initial, last) = (summary.initial_loss.unwrap(), summary.final_loss.unwrap());
    // Untrained, the model is near-uniform over 256 bytes: about ln 256 = 5.5 nats.
    assert!(initial > 5.0, "initial loss {initial}");
    assert!(last < 0.6 * initial, "loss {initial} -> {last}");
    assert!(
        last < summary.unigram_entropy,
        "final loss {last} is not below the unigram entropy {}",
        summary.unigram_entropy
    );
    assert_eq!(summary.steps, 40);
}
