//! `training.lora`: the adapters' gradients against central differences,
//! the merge against a naive product, and training runs: what moves, how it
//! resumes, what is refused.

use std::fs;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use moe_crds::LoraTarget;
use moe_worker::checkpoint;
use moe_worker::gradcheck::{STEP, max_scaled_error, numeric_gradient};
use moe_worker::model::{Gradients, Model};
use moe_worker::moe::ScoreFunction;
use moe_worker::rng::SplitMix64;
use moe_worker::run::{self, RunError};
use moe_worker::train::lora::{self, Adapter, Lora, LoraSettings};
use serde_json::{Value, json};

use crate::gradients::{moe, tiny_config};
use crate::{config_json, scratch_dir, worker_config};

const ALL: [LoraTarget; 7] = [
    LoraTarget::QProj,
    LoraTarget::KProj,
    LoraTarget::VProj,
    LoraTarget::OProj,
    LoraTarget::GateProj,
    LoraTarget::UpProj,
    LoraTarget::DownProj,
];

fn settings(rank: usize, routed_experts: bool) -> LoraSettings {
    LoraSettings {
        rank,
        alpha: 3.0,
        targets: ALL.to_vec(),
        routed_experts,
        rank_stabilized: false,
    }
}

fn to_f64(values: &[f32]) -> Vec<f64> {
    values.iter().map(|&v| f64::from(v)).collect()
}

/// Adapters on every projection of the tiny two-block model (dense, shared
/// and routed experts), with `B` drawn too (it starts at zero, which would
/// make `∂L/∂A` zero and prove nothing), then: the loss as a function of
/// each adapter's `A` and `B` through the merged f64 model, differenced
/// centrally, against the chain rule from the model's weight gradients.
#[test]
fn adapter_gradients_are_the_loss_derivatives_by_central_differences() {
    let config = tiny_config(moe(ScoreFunction::Softmax), 2, 1);
    let structure = Model::<f32>::initial(config.clone(), 3);
    let fresh = Lora::new(settings(2, true), &structure, 5);
    let mut rng = SplitMix64::new(11);
    let adapters: Vec<Adapter> = fresh
        .adapters()
        .iter()
        .map(|a| {
            let mut a = a.clone();
            for v in &mut a.b.values {
                *v = (0.3 * rng.normal()) as f32;
            }
            a
        })
        .collect();
    let names: Vec<&str> = adapters.iter().map(|a| a.name.as_str()).collect();
    for expected in [
        "blocks.0.wq",
        "blocks.0.dense.w1",
        "blocks.1.moe.experts_w2",
        "blocks.1.moe.shared_w3",
    ] {
        assert!(names.contains(&expected), "{names:?}");
    }
    assert!(!names.iter().any(|n| n.ends_with("router")), "{names:?}");
    let scale = fresh.settings().scale();

    let base = Model::<f64>::initial(config.clone(), 3);
    let tokens: Vec<u32> = (0..8).map(|_| rng.below(config.vocab) as u32).collect();
    let targets: Vec<u32> = (0..8).map(|_| rng.below(config.vocab) as u32).collect();
    let params: Vec<(Vec<f64>, Vec<f64>)> = adapters
        .iter()
        .map(|a| (to_f64(&a.a.values), to_f64(&a.b.values)))
        .collect();
    let merged = |params: &[(Vec<f64>, Vec<f64>)]| {
        let mut model = base.clone();
        let bases: Vec<Vec<f64>> = base.tensors().iter().map(|t| t.values.to_vec()).collect();
        let mut tensors = model.weights.tensors_mut();
        for (adapter, (a, b)) in adapters.iter().zip(params) {
            lora::merge(
                adapter,
                &bases[adapter.tensor],
                a,
                b,
                scale,
                tensors[adapter.tensor],
            );
        }
        model
    };
    let model = merged(&params);
    let pass = model.forward(&tokens, &targets);
    let selection: Vec<Vec<usize>> = pass.selected_experts().iter().map(|s| s.to_vec()).collect();
    let mut grads = Gradients::zeros(&config);
    model.backward(&pass, &mut grads);
    let weight_grads = grads.tensors(&config);

    let loss_with = |moved: &[(Vec<f64>, Vec<f64>)]| {
        let pass = merged(moved).forward(&tokens, &targets);
        assert_eq!(
            pass.selected_experts(),
            selection,
            "a step changed the top-k choice"
        );
        pass.loss()
    };
    for (i, adapter) in adapters.iter().enumerate() {
        let (a, b) = &params[i];
        let analytic = lora::project(adapter, a, b, weight_grads[adapter.tensor].values, scale);
        let numeric_a = numeric_gradient(a, STEP, |v| {
            let mut moved = params.clone();
            moved[i].0 = v.to_vec();
            loss_with(&moved)
        });
        let numeric_b = numeric_gradient(b, STEP, |v| {
            let mut moved = params.clone();
            moved[i].1 = v.to_vec();
            loss_with(&moved)
        });
        for (part, analytic, numeric) in
            [("A", &analytic.a, numeric_a), ("B", &analytic.b, numeric_b)]
        {
            assert!(
                numeric.iter().any(|g| g.abs() > 1e-4),
                "{}.{part}: gradient ~0 everywhere",
                adapter.name
            );
            let error = max_scaled_error(analytic, &numeric, 1e-3);
            assert!(
                error < 1e-6,
                "{}.{part}: scaled error {error:e}",
                adapter.name
            );
        }
    }
}

/// `merge` against the product written out, on a tensor of several
/// matrices (the routed experts'), in f64.
#[test]
fn the_merge_is_the_base_plus_the_scaled_product() {
    let config = tiny_config(moe(ScoreFunction::Sigmoid), 2, 1);
    let model = Model::<f32>::initial(config, 3);
    let fresh = Lora::new(settings(3, true), &model, 9);
    let adapter = fresh
        .adapters()
        .iter()
        .find(|a| a.name == "blocks.1.moe.experts_w2")
        .expect("the routed experts' down projection is adapted");
    assert_eq!(adapter.matrices, 4);
    let (n, rows, cols, r) = (adapter.matrices, adapter.rows, adapter.cols, 3);
    let mut rng = SplitMix64::new(2);
    let mut draw = |len: usize| -> Vec<f64> { (0..len).map(|_| rng.normal()).collect() };
    let (base, a, b) = (
        draw(n * rows * cols),
        draw(n * r * cols),
        draw(n * rows * r),
    );
    let mut out = vec![0.0; base.len()];
    lora::merge(adapter, &base, &a, &b, 0.75, &mut out);
    for k in 0..n {
        for o in 0..rows {
            for i in 0..cols {
                let product: f64 = (0..r)
                    .map(|j| b[(k * rows + o) * r + j] * a[(k * r + j) * cols + i])
                    .sum();
                let want = base[(k * rows + o) * cols + i] + 0.75 * product;
                let got = out[(k * rows + o) * cols + i];
                assert!(
                    (got - want).abs() < 1e-12,
                    "[{k}, {o}, {i}]: {got} vs {want}"
                );
            }
        }
    }
}

fn train(config: &Value) -> Result<run::Summary, RunError> {
    run::train(&worker_config(config), &AtomicBool::new(false))
}

/// The test config with adapters on three projections.
fn lora_config(dir: &Path) -> Value {
    let mut config = config_json(dir);
    config["training"]["lora"] =
        json!({"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"]});
    config["training"]["optimizer"]["learningRate"] = 0.02.into();
    config
}

fn manifest(checkpoint: &Path) -> checkpoint::Manifest {
    serde_json::from_slice(&fs::read(checkpoint.join("manifest.json")).unwrap()).unwrap()
}

fn state_bits(checkpoint: &Path) -> Vec<(String, Vec<u32>)> {
    let spec = manifest(checkpoint).model;
    let config = moe_worker::model::ModelConfig::from_spec(&spec).unwrap();
    let restored = checkpoint::load(checkpoint, &spec, &config).unwrap();
    let model = &restored.state.model;
    let mut bits: Vec<(String, Vec<u32>)> = model
        .tensors()
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.values.iter().map(|v| v.to_bits()).collect(),
            )
        })
        .collect();
    for layer in model.moe_layers() {
        bits.push((
            "selection_bias".into(),
            layer.selection_bias.iter().map(|v| v.to_bits()).collect(),
        ));
    }
    bits
}

/// A run with adapters: every tensor but the adapted ones, and the
/// selection biases, end as they started (step 0's model is the one
/// loaded: `B` starts at zero); the adapted ones end at `W₀ + s·B·A` of
/// the checkpoint's adapters; the loss falls.
#[test]
fn a_lora_run_trains_only_the_adapters_and_checkpoints_the_merged_model() {
    let dir = scratch_dir("lora-run");
    let mut config = lora_config(&dir);
    config["training"]["steps"] = 12.into();
    config["checkpoint"]["intervalSteps"] = 12.into();
    let summary = train(&config).unwrap();
    assert!(
        summary.final_loss.unwrap() < summary.initial_loss.unwrap() - 0.3,
        "the adapters learn: {:?} -> {:?}",
        summary.initial_loss,
        summary.final_loss
    );
    let final_checkpoint = summary.checkpoint.unwrap();
    let lora_file = manifest(&final_checkpoint)
        .lora
        .expect("the manifest names the adapters");
    assert_eq!(lora_file.settings.rank, 4);
    assert!(final_checkpoint.join(&lora_file.file).is_file());
    // The frozen weights' moments are not written: the adapters' are beside them.
    let state = fs::read(final_checkpoint.join("state.safetensors")).unwrap();
    let names: Vec<String> = safetensors::SafeTensors::deserialize(&state)
        .unwrap()
        .names()
        .into_iter()
        .map(str::to_owned)
        .collect();
    assert!(names.iter().any(|n| n.starts_with("weights/")), "{names:?}");
    assert!(!names.iter().any(|n| n.starts_with("adam_")), "{names:?}");

    // Step 0's model: the same run with no step taken.
    let mut at_start = lora_config(&scratch_dir("lora-run-start"));
    at_start["training"]["steps"] = 12.into();
    let settings =
        moe_worker::settings::TrainSettings::from_config(&worker_config(&at_start)).unwrap();
    let initial = Model::<f32>::initial(settings.model.clone(), settings.training.seed);
    let initial_bits: Vec<Vec<u32>> = initial
        .tensors()
        .iter()
        .map(|t| t.values.iter().map(|v| v.to_bits()).collect())
        .collect();

    let restored =
        checkpoint::load(&final_checkpoint, &settings.model_spec, &settings.model).unwrap();
    let adapters = restored
        .state
        .lora
        .expect("the checkpoint restores its adapters");
    let model = &restored.state.model;
    let adapted: Vec<&str> = adapters
        .adapters()
        .iter()
        .map(|a| a.name.as_str())
        .collect();
    assert_eq!(
        adapted,
        [
            "blocks.0.wq",
            "blocks.0.wv",
            "blocks.0.dense.w2",
            "blocks.1.wq",
            "blocks.1.wv",
            "blocks.1.moe.shared_w2"
        ]
    );
    for (index, tensor) in model.tensors().iter().enumerate() {
        let bits: Vec<u32> = tensor.values.iter().map(|v| v.to_bits()).collect();
        match adapters.adapters().iter().find(|a| a.tensor == index) {
            None => assert_eq!(bits, initial_bits[index], "{} is frozen", tensor.name),
            Some(adapter) => {
                assert_eq!(
                    adapter.base.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    initial_bits[index],
                    "{}: W₀ is the weights the run started from",
                    tensor.name
                );
                assert_ne!(bits, initial_bits[index], "{} moved", tensor.name);
                let mut want = vec![0f64; tensor.values.len()];
                lora::merge(
                    adapter,
                    &to_f64(&adapter.base),
                    &to_f64(&adapter.a.values),
                    &to_f64(&adapter.b.values),
                    2.0,
                    &mut want,
                );
                for (got, want) in tensor.values.iter().zip(&want) {
                    assert!(
                        (f64::from(*got) - want).abs() < 1e-6,
                        "{}: {got} is not W₀ + s·B·A = {want}",
                        tensor.name
                    );
                }
            }
        }
    }
    for (layer, initial) in model.moe_layers().zip(initial.moe_layers()) {
        assert_eq!(
            layer.selection_bias, initial.selection_bias,
            "selection biases are frozen"
        );
    }
}

/// Resuming from a LoRA checkpoint continues bit for bit: the run split at
/// step 3 ends with the straight run's merged weights and adapters.
#[test]
fn a_lora_run_resumes_bit_for_bit() {
    let straight_dir = scratch_dir("lora-straight");
    let straight = train(&lora_config(&straight_dir)).unwrap();
    let straight_end = straight.checkpoint.unwrap();

    let split_dir = scratch_dir("lora-split");
    let checkpoints = split_dir.join("checkpoints");
    fs::create_dir_all(&checkpoints).unwrap();
    let step_3 = straight_dir.join("checkpoints").join("step-00000003");
    crate::dist_support::copy_dir(&step_3, &checkpoints.join("step-00000003"));
    let split = train(&lora_config(&split_dir)).unwrap();
    let split_end = split.checkpoint.unwrap();
    let (split, straight) = (state_bits(&split_end), state_bits(&straight_end));
    let differing: Vec<&str> = split
        .iter()
        .zip(&straight)
        .filter(|(a, b)| a != b)
        .map(|((name, _), _)| name.as_str())
        .collect();
    assert!(
        differing.is_empty(),
        "the resumed run's {differing:?} differ"
    );
    assert_eq!(
        fs::read(split_end.join("lora.safetensors")).unwrap(),
        fs::read(straight_end.join("lora.safetensors")).unwrap(),
        "the adapters and their moments"
    );
}

/// A checkpoint whose adapters differ from `training.lora`, or a run
/// without adapters over a checkpoint with them (and the other way), is
/// refused naming `training.lora`; the routed experts' adapters under
/// expert parallelism, before anything is trained.
#[test]
fn mismatched_adapters_are_refused_naming_the_field() {
    let dir = scratch_dir("lora-mismatch");
    let mut config = lora_config(&dir);
    config["training"]["steps"] = 3.into();
    train(&config).unwrap();
    for (lora, says) in [
        (
            json!({"rank": 2, "alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"]}),
            "this run asks for",
        ),
        (Value::Null, "this run has no training.lora"),
    ] {
        let mut other = config.clone();
        other["training"]["steps"] = 6.into();
        other["training"]["lora"] = lora;
        let error = train(&other).unwrap_err().to_string();
        assert!(
            error.contains("training.lora") && error.contains(says),
            "{error}"
        );
    }
    let full_dir = scratch_dir("lora-over-full");
    let mut full = config_json(&full_dir);
    full["training"]["steps"] = 3.into();
    train(&full).unwrap();
    full["training"]["lora"] = lora_config(&full_dir)["training"]["lora"].clone();
    let error = train(&full).unwrap_err().to_string();
    assert!(
        error.contains("training.lora") && error.contains("model.initFrom"),
        "{error}"
    );

    let mut sharded = lora_config(&scratch_dir("lora-ep"));
    sharded["training"]["lora"]["routedExperts"] = true.into();
    sharded["parallelism"] = json!({"processesPerNode": 2, "expertParallel": 2});
    sharded["training"]["globalBatchSize"] = 4.into();
    let error = moe_worker::settings::TrainSettings::from_config(&worker_config(&sharded))
        .unwrap_err()
        .to_string();
    assert!(error.contains("training.lora.routedExperts"), "{error}");
}

/// The f32 tensors of a safetensors file, by name, with their shapes.
fn read_safetensors(path: &Path) -> std::collections::HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    file.tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}

/// The export of a LoRA run writes its merged model and, under `adapter/`,
/// the adapters alone in PEFT's layout. Held to the exported model: for
/// every adapted module, the run's starting weights exported the same way
/// plus `alpha / r · lora_B @ lora_A` are the merged weights (so names,
/// shapes and the RoPE row order of `q_proj`/`k_proj` are Hugging Face's),
/// and every other tensor is the starting one.
#[test]
fn the_export_of_a_lora_run_holds_its_adapters_in_peft_layout() {
    use moe_worker::checkpoint::CheckpointWeights;
    use moe_worker::model::hf_export::{self, ExportPrecision, ExportTokenizer};

    let dir = scratch_dir("lora-export");
    let mut config = config_json(&dir);
    // Named as a Hub model's fine-tuning (the weights start from the seed:
    // no initDir), so the adapter names its base.
    config["model"] = crate::pretrained::qwen3_model(json!({
        "moe": {"balancing": {"auxLossFree": {"enabled": false}}},
        "initFrom": {"huggingface": {"repo": "org/base", "revision": "v1"}}
    }));
    config["training"]["steps"] = 3.into();
    config["checkpoint"]["intervalSteps"] = 3.into();
    // Rank-stabilised: the merge and the export's reconstruction scale
    // by alpha / √rank.
    config["training"]["lora"] = json!({"rank": 3, "alpha": 6, "targets": ["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"], "routedExperts": true, "rankStabilized": true});
    config["training"]["optimizer"]["learningRate"] = 0.05.into();
    let summary = train(&config).unwrap();
    let merged_dir = dir.join("merged");
    let checkpoint = summary.checkpoint.unwrap();
    let weights = CheckpointWeights::open(&checkpoint).unwrap();
    let exported = hf_export::export(
        &weights,
        ExportTokenizer::Bytes,
        &merged_dir,
        ExportPrecision::F32,
        5_000_000_000,
    )
    .unwrap();
    assert!(
        exported
            .files
            .contains(&"adapter/adapter_model.safetensors".to_owned()),
        "{:?}",
        exported.files
    );

    // The adapters alone (`output.huggingface.adapterOnly`): the same
    // adapter files at the top, with the tokenizer, and no model.
    let alone_dir = dir.join("adapter-only");
    let alone = hf_export::export_with(
        &weights,
        ExportTokenizer::Bytes,
        &alone_dir,
        ExportPrecision::F32,
        5_000_000_000,
        hf_export::ExportContents::AdapterOnly,
    )
    .unwrap();
    assert_eq!(
        alone.files,
        [
            "tokenizer.json",
            "adapter_model.safetensors",
            "adapter_config.json"
        ]
        .map(String::from)
    );
    for file in ["adapter_model.safetensors", "adapter_config.json"] {
        assert!(
            fs::read(alone_dir.join(file)).unwrap()
                == fs::read(merged_dir.join("adapter").join(file)).unwrap(),
            "{file}"
        );
    }
    // The command the export pod runs, with `--adapter-only`.
    let by_command = dir.join("adapter-only-command");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moe-worker"))
        .args(["export", "--precision", "f32", "--adapter-only", "--model"])
        .arg(dir.join("checkpoints"))
        .arg("--out")
        .arg(&by_command)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!by_command.join("model.safetensors").exists());
    assert!(
        fs::read(by_command.join("adapter_model.safetensors")).unwrap()
            == fs::read(alone_dir.join("adapter_model.safetensors")).unwrap()
    );

    let settings =
        moe_worker::settings::TrainSettings::from_config(&worker_config(&config)).unwrap();
    let initial = Model::<f32>::initial(settings.model.clone(), settings.training.seed);
    let refused = hf_export::export_with(
        &initial,
        ExportTokenizer::Bytes,
        &dir.join("no-adapters"),
        ExportPrecision::F32,
        5_000_000_000,
        hf_export::ExportContents::AdapterOnly,
    )
    .unwrap_err()
    .to_string();
    assert!(
        refused.contains("output.huggingface.adapterOnly"),
        "{refused}"
    );
    let base_dir = dir.join("base");
    hf_export::export(
        &initial,
        ExportTokenizer::Bytes,
        &base_dir,
        ExportPrecision::F32,
        5_000_000_000,
    )
    .unwrap();

    let merged = read_safetensors(&merged_dir.join("model.safetensors"));
    let base = read_safetensors(&base_dir.join("model.safetensors"));
    let adapter = read_safetensors(&merged_dir.join("adapter").join("adapter_model.safetensors"));
    let adapter_config: Value = serde_json::from_slice(
        &fs::read(merged_dir.join("adapter").join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(adapter_config["peft_type"], "LORA");
    assert_eq!(adapter_config["r"], 3);
    assert_eq!(adapter_config["lora_alpha"], 6.0);
    assert_eq!(adapter_config["base_model_name_or_path"], "org/base");
    assert_eq!(adapter_config["use_rslora"], true);
    assert_eq!(adapter_config["revision"], "v1");
    let modules: Vec<String> = adapter_config["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_owned())
        .collect();
    for expected in [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.k_proj",
        "model.layers.1.mlp.experts.7.up_proj",
    ] {
        assert!(
            modules.contains(&expected.to_owned()),
            "{expected} in {modules:?}"
        );
    }
    assert!(
        !modules
            .iter()
            .any(|m| m.ends_with("v_proj") || m.ends_with("gate_proj")),
        "{modules:?}"
    );
    assert_eq!(adapter.len(), 2 * modules.len());

    let scale = 6.0 / 3f64.sqrt();
    for (name, (shape, values)) in &merged {
        let module = name.strip_suffix(".weight").unwrap();
        let (_, start) = &base[name];
        if !modules.contains(&module.to_owned()) {
            assert_eq!(values, start, "{name} is frozen");
            continue;
        }
        let (a_shape, a) = &adapter[&format!("base_model.model.{module}.lora_A.weight")];
        let (b_shape, b) = &adapter[&format!("base_model.model.{module}.lora_B.weight")];
        let (rows, cols) = (shape[0], shape[1]);
        assert_eq!(
            (a_shape.as_slice(), b_shape.as_slice()),
            ([3, cols].as_slice(), [rows, 3].as_slice())
        );
        let mut worst = 0f64;
        for o in 0..rows {
            for i in 0..cols {
                let product: f64 = (0..3)
                    .map(|j| f64::from(b[o * 3 + j]) * f64::from(a[j * cols + i]))
                    .sum();
                let want = f64::from(start[o * cols + i]) + scale * product;
                worst = worst.max((f64::from(values[o * cols + i]) - want).abs());
            }
        }
        assert!(
            worst < 1e-5,
            "{name}: merged − (W₀ + s·B·A) reaches {worst:e}"
        );
        assert!(b.iter().any(|&v| v != 0.0), "{module}: B was trained");
    }

    // Served beside its base, the exported adapter gives the merged
    // model's logits: training, export and serving agree, for the base
    // and merged exports (Hugging Face's RoPE halves) and for the initial
    // model and the run's checkpoint (the worker's RoPE pairs, into which
    // the adapter's q and k rows are put back).
    use moe_worker::serve::adapters::{self, AdapterSource};
    use moe_worker::serve::engine::{Chunk, Engine, Logits};
    use moe_worker::serve::{kv_cache::KvStore, load};
    let engine_of = |dir: &Path| {
        Engine::serve(
            load::load(dir, None, None)
                .unwrap()
                .model
                .into_serve_model(),
        )
    };
    let logits = |engine: &Engine, adapter| {
        let vocab = engine.config().vocab as u32;
        let tokens: Vec<u32> = (0..12).map(|i| (i * 29 + 3) % vocab).collect();
        let mut store = KvStore::new(engine.kv_shape(16), 1);
        let chunk = Chunk {
            pages: &[0],
            start: 0,
            tokens: &tokens,
            logits: Logits::All,
            adapter,
        };
        engine.step(&mut store, &[chunk]).unwrap()
    };
    let differ = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max)
    };
    let source = AdapterSource {
        name: "tuned".into(),
        dir: merged_dir.join("adapter"),
    };
    for (base, merged) in [
        (engine_of(&base_dir), engine_of(&merged_dir)),
        (Engine::new(initial.clone()), engine_of(&checkpoint)),
    ] {
        let adapter = adapters::load(&source, &base.adapter_shape()).unwrap();
        assert!(
            adapter.modules().iter().any(|m| m == "experts.up_proj"),
            "{:?}",
            adapter.modules()
        );
        let without = logits(&base, None);
        let served = base.with_adapters(vec![adapter]);
        let with = logits(&served, Some(0));
        let want = logits(&merged, None);
        let (worst, moved) = (differ(&with, &want), differ(&without, &want));
        assert!(
            worst < 1e-4 && moved > 100.0 * worst,
            "served vs merged {worst:e}, base vs merged {moved:e}"
        );
    }
}

/// A backward pass into gradients that keep only the adapted tensors
/// ([`Gradients::zeros_keeping`]: the rest empty, neither computed nor
/// held) gives those tensors, and nothing else, the very bits of a pass
/// into full gradients — in every GEMM arithmetic, through the dense
/// layer, the shared and the routed experts, the router, the norms and the
/// embedding; and zeroing reaches every kept tensor.
#[test]
fn frozen_gradients_are_skipped_and_the_kept_ones_are_unchanged() {
    use moe_worker::fp8::Fp8Recipe;
    use moe_worker::linear::GemmPrecision;
    let lora = LoraSettings {
        rank: 2,
        alpha: 2.0,
        targets: vec![LoraTarget::QProj, LoraTarget::OProj, LoraTarget::UpProj],
        routed_experts: true,
        rank_stabilized: false,
    };
    let precisions = [
        GemmPrecision::Fp32,
        GemmPrecision::Bf16,
        GemmPrecision::Fp8(Fp8Recipe::Blockwise),
    ];
    for precision in precisions {
        let mut config = tiny_config(moe(ScoreFunction::Sigmoid), 2, 1);
        config.gemm_precision = precision;
        let model = Model::<f32>::initial(config.clone(), 3);
        let mut rng = SplitMix64::new(4);
        let tokens: Vec<u32> = (0..8).map(|_| rng.below(config.vocab) as u32).collect();
        let targets: Vec<u32> = (0..8).map(|_| rng.below(config.vocab) as u32).collect();
        let pass = model.forward(&tokens, &targets);
        let mut full = Gradients::zeros(&config);
        model.backward(&pass, &mut full);
        let experts = 0..config.moe.n_routed_experts;
        let mut kept = Gradients::<f32>::zeros_keeping(&config, experts, |name| {
            lora.target_of(name).is_some()
        });
        model.backward(&pass, &mut kept);
        let mut adapted = 0;
        for (f, k) in full.tensors(&config).iter().zip(kept.tensors(&config)) {
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            if lora.target_of(&f.name).is_some() {
                assert!(f.values.iter().any(|&v| v != 0.0), "{}", f.name);
                assert_eq!(bits(f.values), bits(k.values), "{precision:?}: {}", f.name);
                adapted += 1;
            } else {
                assert!(k.values.is_empty(), "{precision:?}: {} is kept", f.name);
            }
        }
        // wq, wo of both blocks; the dense w3; the shared and routed w3.
        assert_eq!(adapted, 7, "{precision:?}");
        kept.zero();
        assert!(
            kept.tensors(&config)
                .iter()
                .all(|t| t.values.iter().all(|&v| v == 0.0))
        );
    }
}

/// Adapters on a model that starts from the seed's random weights are
/// almost surely a mistake (`model.initFrom` forgotten): the run says so.
#[test]
fn adapters_on_random_weights_are_warned_about() {
    let dir = scratch_dir("lora-random");
    let mut config = lora_config(&dir);
    config["training"]["steps"] = 2.into();
    let out = crate::train_binary_on(&dir, &config, 1);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("training.lora without model.initFrom"),
        "{stderr}"
    );
}
