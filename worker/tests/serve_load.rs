//! Finding the model in what a training run leaves behind, and clear
//! errors naming what is missing when there is none.

mod serve_support;

use moe_crds::ModelFormat;
use moe_worker::serve::load::{self, Detected, LoadError};
use serve_support::{TempDir, tiny_model, tiny_spec, write_checkpoint};

#[test]
fn a_run_a_checkpoint_directory_and_a_checkpoint_all_load() {
    let dir = TempDir::new("load-layouts");
    let model = tiny_model(21);
    let step_dir = write_checkpoint(&dir.0, &tiny_spec(), &model);
    let checkpoints = dir.0.join("checkpoints");
    for path in [&dir.0, &checkpoints, &step_dir] {
        assert_eq!(
            load::detect(path, None, None).unwrap(),
            Detected::Native(step_dir.clone()),
            "{}",
            path.display()
        );
        let loaded = load::load(path, Some(ModelFormat::Native), Some(0)).unwrap();
        let values = |m: &moe_worker::model::Model<f32>| -> Vec<Vec<f32>> {
            let tensors = m.tensors().into_iter().map(|t| t.values.to_vec());
            let biases = m.moe_layers().map(|l| l.selection_bias.clone());
            tensors.chain(biases).collect()
        };
        assert_eq!(
            values(loaded.model.native().expect("a worker checkpoint")),
            values(&model),
            "every weight and selection bias"
        );
        assert_eq!(loaded.step, 0);
    }
}

#[test]
fn missing_or_foreign_models_are_named() {
    let dir = TempDir::new("load-errors");
    let error = |path: &std::path::Path, format, step| {
        load::load(path, format, step).unwrap_err().to_string()
    };
    let absent = dir.0.join("absent");
    assert!(error(&absent, None, None).contains("does not exist"));
    let message = error(&dir.0, None, None);
    assert!(
        message.contains("manifest.json") && message.contains("config.json"),
        "{message}"
    );

    // A Hugging Face directory is recognised, and what it lacks is named.
    let hf = dir.0.join("hf");
    std::fs::create_dir_all(&hf).unwrap();
    std::fs::write(hf.join("config.json"), r#"{"model_type": "qwen2_moe"}"#).unwrap();
    std::fs::write(hf.join("model.safetensors"), b"").unwrap();
    assert_eq!(
        load::detect(&hf, None, None).unwrap(),
        Detected::HuggingFace(hf.clone())
    );
    let message = error(&hf, None, None);
    assert!(
        matches!(load::load(&hf, None, None), Err(LoadError::HuggingFace(_)))
            && message.contains("hidden_size is missing"),
        "{message}"
    );
    assert!(error(&hf, Some(ModelFormat::Native), None).contains("holds no model"));

    // A step that is not there, and a checkpoint with its state file gone.
    let step_dir = write_checkpoint(&dir.0, &tiny_spec(), &tiny_model(1));
    let message = error(&dir.0, None, Some(5));
    assert!(message.contains("step-00000005/manifest.json"), "{message}");
    std::fs::remove_file(step_dir.join("state.safetensors")).unwrap();
    let message = error(&dir.0, None, None);
    assert!(message.contains("state.safetensors"), "{message}");
}

/// The configuration's model (a service's `spec.model`, or its training
/// job's) must be the checkpoint's: another shape is refused before any
/// weight is served, naming every field that differs.
#[test]
fn a_checkpoint_of_another_model_than_configured_is_refused() {
    let dir = TempDir::new("load-shape");
    write_checkpoint(&dir.0, &tiny_spec(), &tiny_model(4));
    let loaded = load::load(&dir.0, None, None).unwrap();
    loaded
        .check_spec(&tiny_spec())
        .expect("the checkpoint's own model");
    // Balancing is how it was trained, not what is served.
    let mut rebalanced = tiny_spec();
    rebalanced.moe.balancing.sequence_aux_loss_coef = 0.5;
    loaded.check_spec(&rebalanced).expect("another balancing");
    let mut other = tiny_spec();
    other.hidden_size = 64;
    other.moe.experts = 8;
    let error = loaded.check_spec(&other).unwrap_err();
    assert!(matches!(error, LoadError::ModelMismatch { .. }));
    let message = error.to_string();
    for expected in [
        "hiddenSize: checkpoint 32, expected 64",
        "moe.experts: checkpoint 4, expected 8",
    ] {
        assert!(message.contains(expected), "{message}");
    }
    // The server refuses to start on it.
    let options = moe_worker::serve::ServeOptions {
        expected_model: Some(other),
        ..serve_support::options(&dir.0)
    };
    let metrics = moe_worker::serve::metrics::Metrics::new();
    let refused = moe_worker::serve::start_engine(loaded, &options, &metrics);
    assert!(
        matches!(&refused, Err(e) if e.to_string().contains("moe.experts")),
        "{:?}",
        refused.err()
    );
}

/// A checkpoint of a run that diverged (a NaN in a weight) is refused at
/// load naming the tensor, not served as NaN logits.
#[test]
fn non_finite_weights_are_refused_naming_the_tensor() {
    let dir = TempDir::new("load-nan");
    let mut model = tiny_model(3);
    model.weights.embedding[5] = f32::NAN;
    write_checkpoint(&dir.0, &tiny_spec(), &model);
    let message = load::load(&dir.0, None, None).unwrap_err().to_string();
    assert!(
        message.contains("embedding") && message.contains("non-finite"),
        "{message}"
    );
}
