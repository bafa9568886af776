//! The training-step benchmark: model FLOPs utilisation (MFU) of
//! [`super::trainer::DeviceTrainer`] on a ~1B-parameter MoE, next to the
//! same run's dense bf16 GEMM baseline.
//!
//! FLOPs per token as `crate::model::flops` counts them (PaLM's and llm.c's
//! rule); MFU divides those FLOPs per second by the bf16 dense peak.

use super::bench::{Figure, H200_BF16_DENSE_FLOPS, time_runs};
use super::model::AttentionKernel;
use super::trainer::DeviceTrainer;
use super::{Gpu, Result, attention, flash_attention, profile};
use crate::data::DataLoader;
use crate::linear::GemmPrecision;
use crate::model::{ActivationMemory, Gradients, Model, ModelConfig};
use crate::moe::Sequences;
use crate::ops::attention::AttentionShape;
use crate::settings::{OptimizerSettings, TrainingSettings};

/// About 1.5B parameters, 0.42B active: hidden 2048, 12 blocks (the first
/// dense), 32 routed experts of 512 (top-4) plus one shared of 1024, GQA
/// 16/4 heads, 32k vocabulary, sequences of 1024.
pub fn billion_config() -> ModelConfig {
    let spec: moe_crds::ModelSpec = serde_json::from_value(serde_json::json!({
        "vocabSize": 32768, "hiddenSize": 2048, "layers": 12, "denseLayers": 1,
        "denseHiddenSize": 5504, "attentionHeads": 16, "kvHeads": 4, "seqLen": 1024,
        "moe": {"experts": 32, "topK": 4, "sharedExperts": 1, "expertHiddenSize": 512,
                "router": "sigmoid", "groups": 4, "topGroups": 2, "routedScalingFactor": 2.5}
    }))
    .expect("a valid model spec");
    ModelConfig::from_spec(&spec).expect("a valid model config")
}

/// Weights drawn from a fast generator (scale 0.02, norm gains 1): the
/// benchmark needs plausible routing, not a particular initialisation, and
/// the CPU's Box–Muller over 1.5B values would cost device time.
fn quick_model(config: &ModelConfig) -> Model<f32> {
    let mut weights = Gradients::<f32>::zeros(config);
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let names: Vec<String> = weights
        .tensors(config)
        .iter()
        .map(|t| t.name.clone())
        .collect();
    for (tensor, name) in weights.tensors_mut().into_iter().zip(names) {
        if name.ends_with("norm") {
            tensor.fill(1.0);
            continue;
        }
        for v in tensor.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *v = 0.04 * (((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5);
        }
    }
    Model::new(config.clone(), weights).expect("weights shaped from the config")
}

/// One optimizer step per timed run: 16 sequences of 1024 tokens. The
/// figures, and what failed of the flash attention part (reported beside
/// them rather than losing them).
pub fn training_step_figures(gpu: &Gpu, dense_flops: f64) -> Result<(Vec<Figure>, Vec<String>)> {
    let config = billion_config();
    let model = quick_model(&config);
    let counted = crate::model::flops::training_flops(&config);
    let (total, active, flops_per_token) = (
        counted.parameters,
        counted.active as usize,
        counted.per_token,
    );
    let sequences = 16;
    let settings = TrainingSettings {
        steps: 1000,
        micro_batch: sequences,
        micro_steps: 1,
        optimizer: OptimizerSettings {
            learning_rate: 3e-4,
            min_learning_rate: 3e-5,
            warmup_steps: 0,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            epsilon: 1e-8,
            grad_clip: 1.0,
        },
        seed: 1,
        log_interval: 1,
        activation_memory: ActivationMemory::KeepAll,
        lora: None,
    };
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let corpus: Vec<u32> = (0..(1 << 22))
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % config.vocab as u64) as u32
        })
        .collect();
    let tokens = (sequences * config.seq_len) as f64;
    let (mut trainer, ms, loss) =
        timed_steps(gpu, &model, &settings, &corpus, AttentionKernel::Gemm)?;
    let tf32_phases = phase_figures(gpu, &mut trainer, "TF32")?;
    let achieved = flops_per_token * tokens / (ms * 1e-3);
    let params = format!(
        "MoE {:.2}B params ({:.2}B active), 16x1024 tokens",
        total as f64 / 1e9,
        active as f64 / 1e9
    );
    // A timed step: its tokens/s, the ratio to a baseline, and its MFU.
    // Each also printed when measured: a run cut short by its time limit
    // keeps the steps it timed in its log.
    let step_figure = |name: String, step_ms: f64, (baseline, ratio): (&str, f64)| {
        let figure = Figure {
            name,
            ms: step_ms,
            value: tokens / (step_ms * 1e-3),
            unit: "tok/s",
            ratio: Some((baseline.into(), ratio)),
            of_datasheet: Some(flops_per_token * tokens / (step_ms * 1e-3) / H200_BF16_DENSE_FLOPS),
        };
        announce(&figure);
        figure
    };
    let mut figures = vec![step_figure(
        format!("training step, {params}, TF32, GEMM attention (loss {loss:.3})"),
        ms,
        ("dense bf16 GEMM (model FLOP/s)", achieved / dense_flops),
    )];

    // Where the step's time goes: the forward pass alone, and attention
    // (forward and backward, every layer) on the same shapes.
    let batch: Vec<u32> = (0..sequences * config.seq_len)
        .map(|i| (i * 7919 % config.vocab) as u32)
        .collect();
    let forward_ms = time_runs(gpu, 1, 2, || {
        trainer.model().forward(gpu, &batch, &batch).map(drop)
    })?;
    figures.push(share("  of which forward pass", forward_ms, ms));
    let mut grads = super::model::DeviceGradients::zeros_like(gpu, trainer.model().weights())?;
    let forward_backward_ms = time_runs(gpu, 1, 2, || {
        let pass = trainer.model().forward(gpu, &batch, &batch)?;
        trainer.model().backward(gpu, &pass, &mut grads)
    })?;
    drop(grads);
    figures.push(share(
        "  of which backward pass",
        forward_backward_ms - forward_ms,
        ms,
    ));
    figures.push(share(
        "  of which optimizer (norm, clip, AdamW, balancing)",
        ms - forward_backward_ms,
        ms,
    ));
    // Inside the forward pass: one MoE layer (every MoE block), and the LM
    // head with the cross-entropy.
    let n = sequences * config.seq_len;
    // Random rows: identical ones would all choose the same experts, and
    // the MoE layer would time 4 large expert GEMMs instead of 32 as a
    // real batch spreads them.
    let x = gpu.upload(&super::bench::random_f32(n * config.hidden, 30))?;
    // The last block's feed-forward layer: an MoE layer's arithmetic.
    let linear = trainer.model().block_linears(config.layers - 1).1;
    let (moe_forward_ms, moe_backward_ms) =
        match trainer.model().weights().blocks.last().map(|b| &b.ffn) {
            Some(super::model::DeviceFeedForward::Moe(layer)) => {
                let whole = Sequences::whole(n, config.seq_len);
                let forward = time_runs(gpu, 1, 2, || {
                    layer.forward(gpu, linear, &x, &whole, None).map(drop)
                })?;
                let pass = layer.forward(gpu, linear, &x, &whole, None)?;
                let mut dx = gpu.zeros::<f32>(x.len())?;
                let mut grads = super::moe_layer::DeviceMoeGrads::zeros(gpu, layer)?;
                let backward = time_runs(gpu, 1, 2, || {
                    layer.backward(gpu, linear, &pass, &x, &x, &mut dx, &mut grads)
                })?;
                (forward, backward)
            }
            _ => (0.0, 0.0),
        };
    let moe_blocks = (config.layers - config.dense_layers) as f64;
    figures.push(share(
        "  of which MoE layer forwards (all MoE blocks)",
        moe_forward_ms * moe_blocks,
        ms,
    ));
    figures.push(share(
        "  of which MoE layer backwards (all MoE blocks)",
        moe_backward_ms * moe_blocks,
        ms,
    ));
    let targets = gpu.upload(&batch)?;
    let mut logits = gpu.output::<f32>(n * config.vocab)?;
    let mut probs = gpu.output::<f32>(n * config.vocab)?;
    let mut losses = gpu.output::<f32>(n)?;
    let head = trainer.model().head();
    let head_ms = time_runs(gpu, 1, 2, || {
        let w = &trainer.model().weights().lm_head;
        super::matmul::forward(gpu, head, &mut logits, &x, w, config.hidden, config.vocab)?;
        super::cross_entropy::forward(
            gpu,
            &mut losses,
            &mut probs,
            &logits,
            &targets,
            config.vocab,
        )
    })?;
    drop((logits, probs, losses, x));
    figures.push(share(
        "  of which LM head + cross-entropy forward",
        head_ms,
        ms,
    ));
    let shape = AttentionShape {
        seq_len: config.seq_len,
        n_heads: config.heads,
        n_kv_heads: config.kv_heads,
        head_dim: config.head_dim(),
    };
    let q = gpu.zeros::<f32>(n * config.hidden)?;
    let kv = gpu.zeros::<f32>(n * config.kv_width())?;
    let mut out = gpu.zeros::<f32>(n * config.hidden)?;
    let mut probs = gpu.zeros::<f32>(shape.probs_len(n))?;
    // Plain causal attention: every token's document starts at 0 (made
    // once, so the timings hold the kernels alone).
    let starts = gpu.zeros::<i32>(n)?;
    let attention_forward_ms = time_runs(gpu, 1, 2, || {
        attention::forward(
            gpu,
            &mut out,
            &mut probs,
            &q,
            &kv,
            &kv,
            shape,
            Some(&starts),
        )
    })?;
    let (mut dq, mut dk, mut dv) = (
        gpu.zeros(q.len())?,
        gpu.zeros(kv.len())?,
        gpu.zeros(kv.len())?,
    );
    let attention_backward_ms = time_runs(gpu, 1, 2, || {
        attention::backward(
            gpu,
            attention::AttentionGrads {
                q: &mut dq,
                k: &mut dk,
                v: &mut dv,
            },
            &out,
            &q,
            &kv,
            &kv,
            &probs,
            shape,
        )
    })?;
    let exact_forward_ms = time_runs(gpu, 1, 2, || {
        attention::forward_exact(gpu, &mut out, &mut probs, &q, &kv, &kv, shape)
    })?;
    let layers = config.layers as f64;
    figures.push(Figure {
        ratio: Some((
            "speed-up over the exact kernels".into(),
            exact_forward_ms / attention_forward_ms,
        )),
        ..share(
            "  of which attention forward (all layers)",
            attention_forward_ms * layers,
            ms,
        )
    });
    figures.push(share(
        "  of which attention backward (all layers)",
        attention_backward_ms * layers,
        ms,
    ));
    drop((probs, trainer));
    figures.extend(tf32_phases);

    // The same step with the linear layers' and the LM head's GEMMs in bf16
    // (`compute: bf16`), then with the linear layers in FP8 (blockwise,
    // the head in bf16: examples/training/h100-fp8.yaml's precision), from
    // the same weights on the same batches.
    let fp8 = GemmPrecision::Fp8(crate::fp8::Fp8Recipe::Blockwise);
    let tensorwise = GemmPrecision::Fp8(crate::fp8::Fp8Recipe::Tensorwise);
    let mut failures = Vec::new();
    let mut bf16_ms = f64::NAN;
    for (name, linears) in [
        ("bf16 GEMMs", GemmPrecision::Bf16),
        ("FP8 linear layers", fp8),
        ("FP8 linear layers, tensorwise", tensorwise),
    ] {
        let mut variant = config.clone();
        (variant.gemm_precision, variant.head_precision) = (linears, GemmPrecision::Bf16);
        let variant = quick_model(&variant);
        let (mut trainer, variant_ms, variant_loss) =
            timed_steps(gpu, &variant, &settings, &corpus, AttentionKernel::Gemm)?;
        let phases = phase_figures(gpu, &mut trainer, name)?;
        let grouped = (linears == GemmPrecision::Bf16)
            .then(|| grouped_expert_figures(gpu, &trainer, &config, n));
        drop((variant, trainer));
        if linears == GemmPrecision::Bf16 {
            bf16_ms = variant_ms;
        }
        figures.push(step_figure(
            format!("training step, {params}, {name} (loss {variant_loss:.3})"),
            variant_ms,
            ("the TF32 step (tok/s)", ms / variant_ms),
        ));
        figures.extend(phases);
        match grouped {
            Some(Ok(grouped)) => figures.extend(grouped),
            Some(Err(error)) => failures.push(format!("grouped expert GEMMs: {error}")),
            None => {}
        }
    }

    let flash = || -> Result<Vec<Figure>> {
        let mut figures = Vec::new();
        // The flash kernels on the GEMM path's shapes (lse instead of probs;
        // shares of the GEMM-attention step), then the whole step with them:
        // which attention is faster, for the default. Last while they are
        // unproven on a GPU, so that a fault in them cannot cost the figures above.
        let mut lse = gpu.zeros::<f32>(flash_attention::lse_len(shape, n))?;
        let flash_forward_ms = time_runs(gpu, 1, 2, || {
            flash_attention::forward(gpu, &mut out, &mut lse, &q, &kv, &kv, shape, Some(&starts))
        })?;
        let flash_backward_ms = time_runs(gpu, 1, 2, || {
            flash_attention::backward(
                gpu,
                attention::AttentionGrads {
                    q: &mut dq,
                    k: &mut dk,
                    v: &mut dv,
                },
                &out,
                &q,
                &kv,
                &kv,
                &out,
                &lse,
                shape,
                Some(&starts),
            )
        })?;
        figures.push(Figure {
            ratio: Some((
                "speed-up over the GEMM path".into(),
                attention_forward_ms / flash_forward_ms,
            )),
            ..share(
                "  attention forward with the flash kernels (all layers)",
                flash_forward_ms * layers,
                ms,
            )
        });
        figures.push(Figure {
            ratio: Some((
                "speed-up over the GEMM path".into(),
                attention_backward_ms / flash_backward_ms,
            )),
            ..share(
                "  attention backward with the flash kernels (all layers)",
                flash_backward_ms * layers,
                ms,
            )
        });
        drop((out, lse, q, kv, dq, dk, dv));
        let (flash_trainer, flash_ms, flash_loss) =
            timed_steps(gpu, &model, &settings, &corpus, AttentionKernel::Flash)?;
        drop((flash_trainer, model));
        figures.push(step_figure(
            format!("training step, {params}, TF32, flash attention (loss {flash_loss:.3})"),
            flash_ms,
            ("the GEMM-attention step (tok/s)", ms / flash_ms),
        ));
        // Every fast path at once, as a tuned job runs: bf16 GEMMs, flash
        // attention, and the routed experts grouped or over streams where
        // their checks passed (`moe-gpu-check` turns those on). Its MFU is
        // the figure; its phases say what is left.
        let mut best = config.clone();
        (best.gemm_precision, best.head_precision) = (GemmPrecision::Bf16, GemmPrecision::Bf16);
        let best = quick_model(&best);
        let (mut best_trainer, best_ms, best_loss) =
            timed_steps(gpu, &best, &settings, &corpus, AttentionKernel::Flash)?;
        let name = "bf16 GEMMs, flash attention";
        let phases = phase_figures(gpu, &mut best_trainer, name)?;
        drop((best_trainer, best));
        figures.push(step_figure(
            format!("training step, {params}, {name} (loss {best_loss:.3})"),
            best_ms,
            ("the bf16 GEMM-attention step (tok/s)", bf16_ms / best_ms),
        ));
        figures.extend(phases);
        Ok(figures)
    };
    match flash() {
        Ok(flash_figures) => figures.extend(flash_figures),
        Err(error) => failures.push(format!("training step, flash attention: {error}")),
    }
    Ok((figures, failures))
}

/// A trainer of `model` with `attention`'s kernels and the mean
/// milliseconds of its optimizer steps after warm-up (NVRTC, cuBLASLt
/// heuristics, allocator), with the last loss.
fn timed_steps<'g>(
    gpu: &'g Gpu,
    model: &Model<f32>,
    settings: &TrainingSettings,
    corpus: &[u32],
    attention: AttentionKernel,
) -> Result<(DeviceTrainer<'g>, f64, f64)> {
    let seq_len = model.config().seq_len;
    let data = DataLoader::new(corpus.to_vec(), seq_len, 1, "benchmark corpus")
        .expect("the corpus is longer than a window");
    let mut trainer = DeviceTrainer::new(gpu, model, settings.clone(), data)?;
    trainer.set_attention_kernel(attention);
    let mut loss = f64::NAN;
    let ms = time_runs(gpu, 2, 3, || {
        loss = trainer.step(&|| false)?.map_or(f64::NAN, |r| r.loss);
        Ok(())
    })?;
    Ok((trainer, ms, loss))
}

/// One more step of `trainer` with [`super::profile`] on: where its time
/// goes, phase by phase, as figures named after `name` — each phase's
/// milliseconds per step and share of the profiled step (a little slower
/// than an unprofiled one: two events a span), then what no span covers.
/// Phases under 0.5% of the step are left out.
fn phase_figures(gpu: &Gpu, trainer: &mut DeviceTrainer<'_>, name: &str) -> Result<Vec<Figure>> {
    gpu.profile_on();
    let step_ms = time_runs(gpu, 0, 1, || trainer.step(&|| false).map(drop));
    let spans = gpu.profile_off()?;
    let step_ms = step_ms?;
    let phases = profile::phases(&spans, 1);
    let covered: f64 = phases.iter().map(|p| p.ms).sum();
    let mut figures = vec![share(&format!("  {name}: profiled step"), step_ms, step_ms)];
    figures.extend(phases.iter().filter(|p| p.ms >= 0.005 * step_ms).map(|p| {
        share(
            &format!("    {} ({:.0} spans)", p.label, p.spans),
            p.ms,
            step_ms,
        )
    }));
    figures.push(share("    outside every span", step_ms - covered, step_ms));
    figures.iter().for_each(announce);
    Ok(figures)
}

/// Prints a figure as soon as it is measured (stderr, into gpu-check.log).
/// The last MoE block of a bf16 trainer, forward and backward on `tokens`
/// random rows (the step's shapes; random, so that the routing spreads
/// the rows over the experts as a real batch does), its routed experts'
/// GEMMs each way this GPU runs them: one per expert on the main stream,
/// spread over the expert streams ([`super::lanes`]), and cuBLASLt's
/// grouped GEMMs ([`super::expert_grouped`]); each ratio the speed-up over
/// the first. A way whose checks did not pass in this run (moe-gpu-check
/// turns it off then) is not measured.
fn grouped_expert_figures(
    gpu: &Gpu,
    trainer: &DeviceTrainer<'_>,
    config: &ModelConfig,
    tokens: usize,
) -> Result<Vec<Figure>> {
    let Some(super::model::DeviceFeedForward::Moe(layer)) =
        trainer.model().weights().blocks.last().map(|b| &b.ffn)
    else {
        return Ok(Vec::new());
    };
    let linear = trainer.model().block_linears(config.layers - 1).1;
    let values = tokens * config.hidden;
    let x = gpu.upload(&super::bench::random_f32(values, 31))?;
    let dy = gpu.upload(&super::bench::random_f32(values, 32))?;
    let mut dx = gpu.zeros::<f32>(values)?;
    let mut grads = super::moe_layer::DeviceMoeGrads::zeros(gpu, layer)?;
    let whole = Sequences::whole(tokens, config.seq_len);
    let mut pass = || -> Result<()> {
        let forward = layer.forward(gpu, linear, &x, &whole, None)?;
        layer.backward(gpu, linear, &forward, &x, &dy, &mut dx, &mut grads)
    };
    let (grouped_before, streams_before) = (gpu.set_grouped_gemm(false), gpu.set_expert_streams(1));
    let name = format!(
        "  MoE layer forward + backward, bf16, {} experts of {}, {tokens} tokens",
        config.moe.n_routed_experts, config.moe.expert_hidden
    );
    let grouped = match gpu.grouped_gemm_support() {
        Ok(_) if !grouped_before => Err("its checks did not pass in this run".to_string()),
        support => support.map(drop),
    };
    // (what, grouped, streams), the first the baseline.
    let mut ways = vec![("one GEMM per expert".to_string(), false, 1)];
    if streams_before > 1 {
        ways.push((
            format!("one GEMM per expert over {streams_before} streams"),
            false,
            streams_before,
        ));
    } else {
        eprintln!("bench: expert streams not measured: 1 stream asked for, or their checks failed");
    }
    match grouped {
        Ok(()) => ways.push(("grouped GEMMs".to_string(), true, 1)),
        Err(why) => eprintln!("bench: grouped expert GEMMs not measured: {why}"),
    }
    let mut figures: Vec<Figure> = Vec::new();
    let mut outcome = Ok(());
    for (what, grouped, streams) in ways {
        gpu.set_grouped_gemm(grouped);
        gpu.set_expert_streams(streams);
        let ms = match time_runs(gpu, 1, 3, &mut pass) {
            Ok(ms) => ms,
            Err(error) => {
                outcome = Err(error);
                break;
            }
        };
        let ratio = figures
            .first()
            .map(|base| ("one GEMM per expert".to_string(), base.ms / ms));
        let figure = Figure {
            name: format!("{name}: {what}"),
            ms,
            value: tokens as f64 / (ms * 1e-3),
            unit: "tok/s",
            ratio,
            of_datasheet: None,
        };
        announce(&figure);
        figures.push(figure);
    }
    gpu.set_grouped_gemm(grouped_before);
    gpu.set_expert_streams(streams_before);
    outcome.map(|()| figures)
}

fn announce(figure: &Figure) {
    eprintln!(
        "bench: {}: {:.3} ms, {:.1} {}{}",
        figure.name,
        figure.ms,
        figure.value,
        figure.unit,
        figure.of_datasheet.map_or(String::new(), |r| format!(
            ", {:.1}% of the datasheet",
            100.0 * r
        ))
    );
}

/// A part of the step: its milliseconds and its share of the step's.
fn share(name: &str, part_ms: f64, step_ms: f64) -> Figure {
    Figure {
        name: name.into(),
        ms: part_ms,
        value: 100.0 * part_ms / step_ms,
        unit: "% of step",
        ratio: None,
        of_datasheet: None,
    }
}
