//! Every CUDA op against its CPU reference, on random inputs and on the
//! edge cases that break kernels: one token or row, tail tiles, uneven and
//! empty experts, saturating and non-finite FP8 inputs. Run by
//! `moe-gpu-check` on a GPU host (kernels/gpu-check.sh); each case reports
//! its worst error next to its bound.
//!
//! Bounds: ops that repeat the CPU's operations in its order (AdamW, FP8
//! quantisation, dispatch, permute) must agree exactly; the others differ
//! by the order of float sums and by `expf` vs Rust's `exp`, a few ulps,
//! hence `|gpu - cpu| <= atol + rtol |cpu|` with rtol around 1e-5; the GEMMs
//! run on tensor cores (TF32 and bf16 inputs) and are bounded relative to
//! the output's largest magnitude.

use super::fp8::ScaleLayout;
use super::matmul::Arithmetic;
use super::{
    Gpu, Result, adamw, attention, cross_entropy, dispatch, embedding, flash_attention, fp8,
    matmul, rmsnorm, rope, routing, swiglu,
};
use crate::fp8::quantize::{Fp8Matrix, TILE, TileShape};
use crate::linear::{GemmPrecision, Linears};
use crate::moe::Sequences;
use crate::moe::config::{GroupLimit, MoeConfig, ScoreFunction};
use crate::moe::dispatch::Dispatch;
use crate::ops;
use crate::rng::SplitMix64;
use crate::settings::OptimizerSettings;
use crate::train::optimizer::AdamWStep;
use half::bf16;
use moe_kernels::cudarc::driver::CudaSlice;
use std::fmt;

/// The outcome of one op on one case.
#[derive(Clone, Debug, PartialEq)]
pub struct Check {
    pub op: &'static str,
    pub case: String,
    pub passed: bool,
    /// The worst disagreement, in the bound's terms.
    pub error: String,
    pub bound: String,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:<22} {:<40} error {:<28} bound {}",
            if self.passed { "PASS" } else { "FAIL" },
            self.op,
            self.case,
            self.error,
            self.bound
        )
    }
}

/// `|gpu - cpu| <= atol + rtol |cpu|` everywhere (NaN only where the CPU has NaN).
pub fn close(
    op: &'static str,
    case: &str,
    gpu: &[f32],
    cpu: &[f32],
    atol: f64,
    rtol: f64,
) -> Check {
    let mut worst = 0.0f64;
    let mut worst_abs = 0.0f64;
    let mut passed = gpu.len() == cpu.len();
    for (&g, &c) in gpu.iter().zip(cpu) {
        if g.is_nan() || c.is_nan() {
            passed &= g.is_nan() && c.is_nan();
            continue;
        }
        let abs = (f64::from(g) - f64::from(c)).abs();
        let ratio = abs / (atol + rtol * f64::from(c).abs());
        worst_abs = worst_abs.max(abs);
        worst = worst.max(ratio);
    }
    Check {
        op,
        case: case.to_string(),
        passed: passed && worst <= 1.0,
        error: format!("max |d| {worst_abs:.2e} ({:.0}% of bound)", worst * 100.0),
        bound: format!("atol {atol:.0e} + rtol {rtol:.0e}"),
    }
}

/// Bounded by a fraction of the reference's largest magnitude (GEMMs on
/// tensor cores, whose per-product rounding scales with the output).
pub(crate) fn close_to_scale(
    op: &'static str,
    case: &str,
    gpu: &[f32],
    cpu: &[f32],
    fraction: f64,
) -> Check {
    let scale = cpu.iter().fold(0.0f64, |m, &v| m.max(f64::from(v).abs()));
    let mut check = close(
        op,
        case,
        gpu,
        cpu,
        fraction * scale.max(f64::MIN_POSITIVE),
        0.0,
    );
    check.bound = format!("{fraction:.0e} x max|ref| ({scale:.2e})");
    check
}

/// Equal element for element (floats by their bits).
pub fn exact<T: PartialEq + fmt::Debug>(
    op: &'static str,
    case: &str,
    gpu: &[T],
    cpu: &[T],
) -> Check {
    let mismatches: Vec<usize> = (0..gpu.len().max(cpu.len()))
        .filter(|&i| gpu.get(i) != cpu.get(i))
        .collect();
    let error = match mismatches.first() {
        None => "identical".to_string(),
        Some(&i) => format!(
            "{} of {} differ; first [{i}] gpu {:?} cpu {:?}",
            mismatches.len(),
            cpu.len(),
            gpu.get(i),
            cpu.get(i)
        ),
    };
    Check {
        op,
        case: case.to_string(),
        passed: mismatches.is_empty(),
        error,
        bound: "bit-identical".to_string(),
    }
}

pub(super) fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    SplitMix64::new(seed).normal_vec(n, 1.0)
}

type CheckGroup<G = Gpu> = fn(&G) -> Result<Vec<Check>>;

/// Every check group, by op family.
pub const GROUPS: &[(&str, CheckGroup)] = &[
    ("rmsnorm", check_rmsnorm),
    ("swiglu", check_swiglu),
    ("cross_entropy", check_cross_entropy),
    ("rope", check_rope),
    ("adamw", check_adamw),
    ("routing+dispatch", check_routing_and_dispatch),
    ("fp8 quantize", check_fp8),
    ("fp8 gemm", check_fp8_gemm),
    ("fp8 gemm cublaslt", check_fp8_gemm_cublaslt),
    ("matmul", check_matmul),
    ("attention", check_attention),
    ("embedding", check_embedding),
    ("data-parallel mean", check_divide),
    ("moe layer", check_moe_layer),
    (
        "expert parallel",
        super::moe_ep_check::check_expert_parallel,
    ),
    (
        "sequence parallel",
        super::ulysses_check::check_sequence_parallel,
    ),
    ("training", super::train_check::check_training),
    ("serve", super::serve_check::check_serve),
    ("nccl", super::nccl_check::check_nccl),
    // Last while their kernels are unproven on a GPU: a fault there (an
    // illegal address poisons the context) cannot cost the other groups.
    ("fp8 tensorwise", check_fp8_tensorwise),
    (
        "expert streams",
        super::expert_gemm_check::check_expert_streams,
    ),
    ("grouped gemm", super::expert_gemm_check::check_grouped_gemm),
    ("flash attention", check_flash_attention),
];

/// The groups whose names contain one of `filters` (every group when there
/// are none), in [`GROUPS`]' order; a filter that names no group is an
/// error listing them, so a typo cannot pass by checking nothing.
pub fn select_groups(
    filters: &[String],
) -> std::result::Result<Vec<(&'static str, CheckGroup)>, String> {
    if let Some(unknown) = filters
        .iter()
        .find(|f| !GROUPS.iter().any(|(name, _)| name.contains(f.as_str())))
    {
        let names: Vec<&str> = GROUPS.iter().map(|(name, _)| *name).collect();
        return Err(format!(
            "no check group matches {unknown:?}; the groups: {}",
            names.join(", ")
        ));
    }
    Ok(GROUPS
        .iter()
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())))
        .copied()
        .collect())
}

/// The groups of `groups` that come after the one named `after` (the
/// rest of a run whose CUDA context was lost there); an error when no
/// group has that name.
pub fn groups_after(
    groups: Vec<(&'static str, CheckGroup)>,
    after: &str,
) -> std::result::Result<Vec<(&'static str, CheckGroup)>, String> {
    let at = GROUPS
        .iter()
        .position(|(name, _)| *name == after)
        .ok_or_else(|| format!("--after {after:?}: no check group has that name"))?;
    let later = |name: &str| GROUPS.iter().position(|(n, _)| *n == name) > Some(at);
    Ok(groups.into_iter().filter(|(name, _)| later(name)).collect())
}

/// How [`run_groups`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum GroupsEnd {
    /// Every group ran.
    Finished,
    /// The named group left the CUDA context unusable (an illegal address
    /// or a kernel fault is sticky: every later call on the context fails),
    /// so the groups after it did not run here; `moe-gpu-check` runs them
    /// in a fresh process.
    ContextLost(&'static str),
}

/// Runs `groups`, handing each group's checks to `done` as soon as it
/// ends (with its wall time), so a run cut short still reports the groups
/// it finished. A CUDA error inside a group (a launch failure, an
/// unsupported cuBLASLt configuration) or a panic fails that group with
/// the error and the run goes on, so one broken op cannot hide the others'
/// results — unless the GPU no longer answers ([`Gpu::healthy`]): then the
/// run stops there and says so.
pub fn run_groups(
    gpu: &Gpu,
    groups: &[(&'static str, CheckGroup)],
    done: impl FnMut(&str, &[Check], std::time::Duration),
) -> (Vec<Check>, GroupsEnd) {
    run_groups_on(gpu, groups, |gpu| gpu.healthy().is_ok(), done)
}

/// [`run_groups`] on any context, with its health probe (a unit-testable
/// seam: the decisions do not need a GPU).
fn run_groups_on<G>(
    context: &G,
    groups: &[(&'static str, CheckGroup<G>)],
    healthy: impl Fn(&G) -> bool,
    mut done: impl FnMut(&str, &[Check], std::time::Duration),
) -> (Vec<Check>, GroupsEnd) {
    let mut checks = Vec::new();
    for &(name, group) in groups {
        let started = std::time::Instant::now();
        let whole_group = |error: String| Check {
            op: name,
            case: "(whole group)".to_string(),
            passed: false,
            error,
            bound: "-".to_string(),
        };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| group(context)));
        let (results, faulted) = match outcome {
            Ok(Ok(results)) => (results, false),
            Ok(Err(error)) => (vec![whole_group(format!("CUDA error: {error}"))], true),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)");
                (vec![whole_group(format!("panic: {message}"))], true)
            }
        };
        done(name, &results, started.elapsed());
        checks.extend(results);
        if faulted && !healthy(context) {
            return (checks, GroupsEnd::ContextLost(name));
        }
    }
    (checks, GroupsEnd::Finished)
}

fn check_rmsnorm(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for (rows, dim) in [(1, 7), (33, 1024), (5, 4097), (256, 7168)] {
        let case = format!("rows {rows} dim {dim}");
        let (x, w) = (random(rows * dim, 1), random(dim, 2));
        let (dout, dx0, dw0) = (random(rows * dim, 3), random(rows * dim, 4), random(dim, 5));
        let eps = 1e-6;
        let (mut out, mut rstd) = (vec![0.0; rows * dim], vec![0.0; rows]);
        ops::rmsnorm::forward(&mut out, &mut rstd, &x, &w, eps);
        let (mut dx, mut dw) = (dx0.clone(), dw0.clone());
        ops::rmsnorm::backward(&mut dx, &mut dw, &dout, &x, &w, &rstd);

        let (x_d, w_d, dout_d) = (gpu.upload(&x)?, gpu.upload(&w)?, gpu.upload(&dout)?);
        let (mut out_d, mut rstd_d) = (gpu.zeros(rows * dim)?, gpu.zeros(rows)?);
        rmsnorm::forward(gpu, &mut out_d, &mut rstd_d, &x_d, &w_d, eps)?;
        let (mut dx_d, mut dw_d) = (gpu.upload(&dx0)?, gpu.upload(&dw0)?);
        rmsnorm::backward(gpu, &mut dx_d, &mut dw_d, &dout_d, &x_d, &w_d, &rstd_d)?;
        checks.push(close(
            "rmsnorm.forward",
            &case,
            &gpu.download(&out_d)?,
            &out,
            1e-6,
            1e-5,
        ));
        checks.push(close(
            "rmsnorm.rstd",
            &case,
            &gpu.download(&rstd_d)?,
            &rstd,
            0.0,
            1e-5,
        ));
        checks.push(close(
            "rmsnorm.backward.dx",
            &case,
            &gpu.download(&dx_d)?,
            &dx,
            1e-5,
            1e-4,
        ));
        // dweight sums over rows: error grows with sqrt(rows).
        checks.push(close(
            "rmsnorm.backward.dweight",
            &case,
            &gpu.download(&dw_d)?,
            &dw,
            1e-4,
            1e-4,
        ));
    }
    Ok(checks)
}

fn check_swiglu(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for n in [1usize, 1000, 1 << 20] {
        let case = format!("n {n}");
        let (a, b, dh) = (random(n, 6), random(n, 7), random(n, 8));
        let (da0, db0) = (random(n, 9), random(n, 10));
        let mut h = vec![0.0; n];
        ops::swiglu::forward(&mut h, &a, &b);
        let (mut da, mut db) = (da0.clone(), db0.clone());
        ops::swiglu::backward(&mut da, &mut db, &dh, &a, &b);
        let (a_d, b_d, dh_d) = (gpu.upload(&a)?, gpu.upload(&b)?, gpu.upload(&dh)?);
        let mut h_d = gpu.zeros(n)?;
        swiglu::forward(gpu, &mut h_d, &a_d, &b_d)?;
        let (mut da_d, mut db_d) = (gpu.upload(&da0)?, gpu.upload(&db0)?);
        swiglu::backward(gpu, &mut da_d, &mut db_d, &dh_d, &a_d, &b_d, true)?;
        // Without accumulate: what adding into zeros gives, whatever the
        // buffers held (here the previous call's sums).
        let (mut da_new, mut db_new) = (vec![0.0; n], vec![0.0; n]);
        ops::swiglu::backward(&mut da_new, &mut db_new, &dh, &a, &b);
        let (mut da_over, mut db_over) = (da_d.clone(), db_d.clone());
        swiglu::backward(gpu, &mut da_over, &mut db_over, &dh_d, &a_d, &b_d, false)?;
        for (name, got, want) in [
            ("swiglu.backward.da, overwrite", &da_over, &da_new),
            ("swiglu.backward.db, overwrite", &db_over, &db_new),
        ] {
            checks.push(close(name, &case, &gpu.download(got)?, want, 1e-6, 1e-5));
        }
        checks.push(close(
            "swiglu.forward",
            &case,
            &gpu.download(&h_d)?,
            &h,
            1e-6,
            1e-5,
        ));
        checks.push(close(
            "swiglu.backward.da",
            &case,
            &gpu.download(&da_d)?,
            &da,
            1e-6,
            1e-5,
        ));
        checks.push(close(
            "swiglu.backward.db",
            &case,
            &gpu.download(&db_d)?,
            &db,
            1e-6,
            1e-5,
        ));
    }
    Ok(checks)
}

fn check_cross_entropy(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for (rows, vocab) in [(1, 2), (17, 256), (8, 50_257)] {
        let case = format!("rows {rows} vocab {vocab}");
        let logits: Vec<f32> = random(rows * vocab, 11).iter().map(|v| 3.0 * v).collect();
        let mut rng = SplitMix64::new(12);
        let targets: Vec<u32> = (0..rows).map(|_| rng.below(vocab) as u32).collect();
        let dlosses = vec![1.0 / rows as f32; rows];
        let dz0 = random(rows * vocab, 13);
        // The reference in f64: an f32 sum of 50k exponentials in one
        // sequential chain (the CPU op) is itself off by ~6e-5 relative
        // (measured on an H200 run against the device's tree sum).
        let wide = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
        let narrow = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let (mut losses, mut probs) = (vec![0.0f64; rows], vec![0.0f64; rows * vocab]);
        ops::cross_entropy::forward(&mut losses, &mut probs, &wide(&logits), &targets, vocab);
        let mut dz = wide(&dz0);
        ops::cross_entropy::backward(&mut dz, &wide(&dlosses), &probs, &targets, vocab);
        let (losses, probs, dz) = (narrow(&losses), narrow(&probs), narrow(&dz));

        let (z_d, t_d, dl_d) = (
            gpu.upload(&logits)?,
            gpu.upload(&targets)?,
            gpu.upload(&dlosses)?,
        );
        let (mut losses_d, mut probs_d) = (gpu.zeros(rows)?, gpu.zeros(rows * vocab)?);
        cross_entropy::forward(gpu, &mut losses_d, &mut probs_d, &z_d, &t_d, vocab)?;
        let mut dz_d = gpu.upload(&dz0)?;
        cross_entropy::backward(gpu, &mut dz_d, &dl_d, &probs_d, &t_d, vocab, true)?;
        // Without accumulate: the gradient alone, over whatever was there.
        let mut dz_new = vec![0.0f64; rows * vocab];
        ops::cross_entropy::backward(
            &mut dz_new,
            &wide(&dlosses),
            &wide(&gpu.download(&probs_d)?),
            &targets,
            vocab,
        );
        let mut dz_over = dz_d.clone();
        cross_entropy::backward(gpu, &mut dz_over, &dl_d, &probs_d, &t_d, vocab, false)?;
        checks.push(close(
            "cross_entropy.backward, overwrite",
            &case,
            &gpu.download(&dz_over)?,
            &narrow(&dz_new),
            1e-6,
            1e-5,
        ));
        checks.push(close(
            "cross_entropy.loss",
            &case,
            &gpu.download(&losses_d)?,
            &losses,
            1e-5,
            1e-5,
        ));
        checks.push(close(
            "cross_entropy.probs",
            &case,
            &gpu.download(&probs_d)?,
            &probs,
            1e-7,
            1e-5,
        ));
        checks.push(close(
            "cross_entropy.backward",
            &case,
            &gpu.download(&dz_d)?,
            &dz,
            1e-6,
            1e-5,
        ));
    }
    Ok(checks)
}

fn check_rope(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for (seq_len, sequences, heads, head_dim) in [(16, 2, 4, 64), (5, 1, 3, 2), (1, 1, 1, 128)] {
        let case = format!("seq {seq_len} x{sequences} heads {heads} dim {head_dim}");
        let table = ops::rope::RopeTable::<f32>::new(seq_len, head_dim, 10_000.0);
        let x = random(seq_len * sequences * heads * head_dim, 14);
        let mut forward = x.clone();
        table.forward(&mut forward, heads);
        let mut back = forward.clone();
        table.backward(&mut back, heads);
        let device = rope::DeviceRope::new(gpu, &table, head_dim)?;
        let mut x_d = gpu.upload(&x)?;
        device.forward(gpu, &mut x_d, heads)?;
        checks.push(close(
            "rope.forward",
            &case,
            &gpu.download(&x_d)?,
            &forward,
            1e-6,
            1e-5,
        ));
        device.backward(gpu, &mut x_d, heads)?;
        checks.push(close(
            "rope.backward",
            &case,
            &gpu.download(&x_d)?,
            &back,
            1e-6,
            1e-5,
        ));
    }
    // A sequence-parallel rank's slices: positions 8..12 of sequences of 16.
    let (heads, head_dim, positions) = (4, 64, 8..12);
    let table = ops::rope::RopeTable::<f32>::new(16, head_dim, 10_000.0);
    let x = random(2 * positions.len() * heads * head_dim, 15);
    let (mut forward, device) = (x.clone(), rope::DeviceRope::new(gpu, &table, head_dim)?);
    table.forward_at(&mut forward, heads, positions.clone());
    let mut back = forward.clone();
    table.backward_at(&mut back, heads, positions.clone());
    let mut x_d = gpu.upload(&x)?;
    device.forward_slice(gpu, &mut x_d, heads, positions.clone())?;
    let case = "slices 8..12 of 16, x2";
    checks.push(close(
        "rope.forward_slice",
        case,
        &gpu.download(&x_d)?,
        &forward,
        1e-6,
        1e-5,
    ));
    device.backward_slice(gpu, &mut x_d, heads, positions)?;
    checks.push(close(
        "rope.backward_slice",
        case,
        &gpu.download(&x_d)?,
        &back,
        1e-6,
        1e-5,
    ));
    Ok(checks)
}

fn check_adamw(gpu: &Gpu) -> Result<Vec<Check>> {
    let settings = OptimizerSettings {
        learning_rate: 3e-3,
        min_learning_rate: 0.0,
        warmup_steps: 0,
        weight_decay: 0.1,
        beta1: 0.9,
        beta2: 0.95,
        epsilon: 1e-8,
        grad_clip: 1.0,
    };
    let mut checks = Vec::new();
    for (n, decays) in [(1usize, true), (100_003, true), (4099, false)] {
        let case = format!("n {n} decay {decays} 3 steps");
        let mut w = random(n, 15);
        let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
        let mut w_d = gpu.upload(&w)?;
        let (mut m_d, mut v_d) = (gpu.zeros(n)?, gpu.zeros(n)?);
        for update in 1..=3u64 {
            let grads = random(n, 16 + update);
            let step = AdamWStep::new(&settings, update, 3e-3 / update as f64, 0.7);
            let step = if decays { step } else { step.without_decay() };
            step.apply(&mut w, &mut m, &mut v, &grads);
            adamw::apply(
                gpu,
                &step,
                &mut w_d,
                &mut m_d,
                &mut v_d,
                &gpu.upload(&grads)?,
            )?;
        }
        checks.push(exact(
            "adamw.weights",
            &case,
            &bits(&gpu.download(&w_d)?),
            &bits(&w),
        ));
        checks.push(exact(
            "adamw.moments",
            &case,
            &bits(&gpu.download(&m_d)?),
            &bits(&m),
        ));
        checks.push(exact(
            "adamw.second_moments",
            &case,
            &bits(&gpu.download(&v_d)?),
            &bits(&v),
        ));
    }
    Ok(checks)
}

/// DeepSeek-style routing in miniature: sigmoid scores, top-4 of 16
/// experts limited to 2 of 4 groups, normalised gates scaled by 2.5, and a
/// shared expert.
pub(crate) fn deepseek_style_config() -> MoeConfig {
    let mut c = moe_config(
        16,
        4,
        ScoreFunction::Sigmoid,
        Some(GroupLimit {
            n_groups: 4,
            top_groups: 2,
        }),
        true,
        2.5,
    );
    c.n_shared_experts = 1;
    c.shared_expert_hidden = 48;
    c
}

pub(crate) fn moe_config(
    experts: usize,
    top_k: usize,
    score_function: ScoreFunction,
    group_limit: Option<GroupLimit>,
    normalize_gates: bool,
    routed_scaling_factor: f64,
) -> MoeConfig {
    MoeConfig {
        hidden: 64,
        n_routed_experts: experts,
        expert_hidden: 32,
        n_shared_experts: 0,
        shared_expert_hidden: 0,
        top_k,
        score_function,
        group_limit,
        normalize_gates,
        routed_scaling_factor,
        aux_loss_alpha: 0.0,
    }
}

fn check_routing_and_dispatch(gpu: &Gpu) -> Result<Vec<Check>> {
    let deepseek = GroupLimit {
        n_groups: 8,
        top_groups: 4,
    };
    // Skewed bias: experts 0-3 favoured, 40-63 never chosen (empty).
    let skewed: Vec<f32> = (0..64)
        .map(|e| match e {
            0..4 => 1.0,
            40.. => -10.0,
            _ => 0.0,
        })
        .collect();
    let cases = [
        (
            "softmax E8 k2",
            moe_config(8, 2, ScoreFunction::Softmax, None, false, 1.0),
            64,
            vec![0.0; 8],
        ),
        (
            "one token softmax E16 k4 norm",
            moe_config(16, 4, ScoreFunction::Softmax, None, true, 1.0),
            1,
            vec![0.0; 16],
        ),
        (
            "deepseek-v3 E256 k8 g8/4",
            moe_config(256, 8, ScoreFunction::Sigmoid, Some(deepseek), true, 2.5),
            4096,
            random(256, 20).iter().map(|b| 0.01 * b).collect(),
        ),
        (
            "uneven+empty E64 k6",
            moe_config(64, 6, ScoreFunction::Sigmoid, None, true, 1.0),
            333,
            skewed,
        ),
    ];
    let mut checks = Vec::new();
    for (name, config, tokens, bias) in cases {
        let e = config.n_routed_experts;
        let logits = random(tokens * e, 21);
        let cpu = crate::moe::routing::route(&config, &logits, &bias);
        let device = routing::route(gpu, &config, &gpu.upload(&logits)?, &gpu.upload(&bias)?)?;
        let experts: Vec<i32> = gpu.download(&device.experts)?;
        let cpu_experts: Vec<i32> = cpu.experts.iter().map(|&x| x as i32).collect();
        checks.push(exact("routing.experts", name, &experts, &cpu_experts));
        checks.push(close(
            "routing.scores",
            name,
            &gpu.download(&device.scores)?,
            &cpu.scores,
            1e-7,
            1e-5,
        ));
        checks.push(close(
            "routing.gates",
            name,
            &gpu.download(&device.gates)?,
            &cpu.gates,
            1e-7,
            1e-5,
        ));
        // Dispatch from the CPU's choice, so a routing mismatch above cannot hide here.
        checks.extend(check_dispatch(
            gpu,
            name,
            &cpu.experts,
            &cpu.gates,
            config.top_k,
            e,
        )?);
    }
    Ok(checks)
}

fn check_dispatch(
    gpu: &Gpu,
    name: &str,
    experts: &[usize],
    gates: &[f32],
    top_k: usize,
    n_experts: usize,
) -> Result<Vec<Check>> {
    let cpu = Dispatch::new(experts, top_k, n_experts);
    let cpu_slot_of_row: Vec<i32> = (0..n_experts)
        .flat_map(|e| cpu.slots(e).iter().map(|&s| s as i32))
        .collect();
    let mut cpu_offsets = vec![0i32];
    for load in cpu.load() {
        cpu_offsets.push(cpu_offsets.last().unwrap() + load as i32);
    }
    let experts_i32: Vec<i32> = experts.iter().map(|&e| e as i32).collect();
    let device = dispatch::dispatch(gpu, &gpu.upload(&experts_i32)?, top_k, n_experts)?;
    let slot_of_row = gpu.download(&device.slot_of_row)?;
    let row_of_slot = gpu.download(&device.row_of_slot)?;
    let mut checks = vec![
        exact(
            "dispatch.offsets",
            name,
            &gpu.download(&device.offsets)?,
            &cpu_offsets,
        ),
        exact("dispatch.slot_of_row", name, &slot_of_row, &cpu_slot_of_row),
    ];
    let mut inverse = vec![-1i32; cpu_slot_of_row.len()];
    for (row, &slot) in cpu_slot_of_row.iter().enumerate() {
        inverse[slot as usize] = row as i32;
    }
    checks.push(exact("dispatch.row_of_slot", name, &row_of_slot, &inverse));

    // Naive references for the data movement: index arithmetic only.
    let hidden = 64;
    let tokens = experts.len() / top_k;
    let rows = experts.len();
    let x = random(tokens * hidden, 30);
    let y = random(rows * hidden, 31);
    let dout = random(tokens * hidden, 32);
    let row = |slot: usize| inverse[slot] as usize;
    let mut xp = vec![0.0f32; rows * hidden];
    for (r, chunk) in xp.chunks_exact_mut(hidden).enumerate() {
        let token = cpu_slot_of_row[r] as usize / top_k;
        chunk.copy_from_slice(&x[token * hidden..][..hidden]);
    }
    let mut out = vec![0.0f32; tokens * hidden];
    let mut dy = vec![0.0f32; rows * hidden];
    let mut dgates = vec![0.0f32; rows];
    let mut dx = vec![0.0f32; tokens * hidden];
    for t in 0..tokens {
        for j in 0..top_k {
            let slot = t * top_k + j;
            let r = row(slot);
            for i in 0..hidden {
                out[t * hidden + i] += gates[slot] * y[r * hidden + i];
                dy[r * hidden + i] += gates[slot] * dout[t * hidden + i];
                dgates[slot] += dout[t * hidden + i] * y[r * hidden + i];
                dx[t * hidden + i] += xp[r * hidden + i];
            }
        }
    }
    let gates_d = gpu.upload(gates)?;
    let mut xp_d = gpu.zeros(rows * hidden)?;
    dispatch::permute(gpu, &mut xp_d, &gpu.upload(&x)?, &device, hidden)?;
    checks.push(exact(
        "dispatch.permute",
        name,
        &bits(&gpu.download(&xp_d)?),
        &bits(&xp),
    ));
    // The permute's backward gathers each token's rows: with xp as the
    // incoming gradient it must give top_k copies of x summed (dx above).
    let mut dx_d = gpu.zeros(tokens * hidden)?;
    dispatch::permute_backward(gpu, &mut dx_d, &xp_d, &device, hidden)?;
    checks.push(close(
        "dispatch.permute_backward",
        name,
        &gpu.download(&dx_d)?,
        &dx,
        1e-6,
        1e-6,
    ));
    let y_d = gpu.upload(&y)?;
    let mut out_d = gpu.zeros(tokens * hidden)?;
    dispatch::unpermute(gpu, &mut out_d, &y_d, &gates_d, &device, hidden)?;
    checks.push(close(
        "dispatch.unpermute",
        name,
        &gpu.download(&out_d)?,
        &out,
        1e-6,
        1e-5,
    ));
    // Written over garbage without accumulate; a second pass with it doubles.
    let (mut dy_d, mut dgates_d) = (
        gpu.upload(&random(rows * hidden, 31))?,
        gpu.upload(&random(rows, 32))?,
    );
    let dout_d = gpu.upload(&dout)?;
    dispatch::unpermute_backward(
        gpu,
        &mut dy_d,
        &mut dgates_d,
        &dout_d,
        &y_d,
        &gates_d,
        &device,
        hidden,
        false,
    )?;
    let (mut dy2_d, mut dgates2_d) = (dy_d.clone(), dgates_d.clone());
    dispatch::unpermute_backward(
        gpu,
        &mut dy2_d,
        &mut dgates2_d,
        &dout_d,
        &y_d,
        &gates_d,
        &device,
        hidden,
        true,
    )?;
    let twice = |v: &[f32]| v.iter().map(|x| 2.0 * x).collect::<Vec<f32>>();
    checks.push(close(
        "dispatch.unpermute_backward.dy, accumulate",
        name,
        &gpu.download(&dy2_d)?,
        &twice(&dy),
        1e-6,
        1e-5,
    ));
    checks.push(close(
        "dispatch.unpermute_backward.dgates, accumulate",
        name,
        &gpu.download(&dgates2_d)?,
        &twice(&dgates),
        1e-5,
        1e-5,
    ));
    checks.push(close(
        "dispatch.unpermute_backward.dy",
        name,
        &gpu.download(&dy_d)?,
        &dy,
        1e-6,
        1e-5,
    ));
    checks.push(close(
        "dispatch.unpermute_backward.dgates",
        name,
        &gpu.download(&dgates_d)?,
        &dgates,
        1e-5,
        1e-5,
    ));
    // bf16: the same sums of bf16 inputs, rounded once to bf16 at the end.
    let y_bf: Vec<bf16> = y.iter().map(|&v| bf16::from_f32(v)).collect();
    let mut out_bf_ref = vec![0.0f32; tokens * hidden];
    for t in 0..tokens {
        for j in 0..top_k {
            let slot = t * top_k + j;
            for i in 0..hidden {
                out_bf_ref[t * hidden + i] += gates[slot] * y_bf[row(slot) * hidden + i].to_f32();
            }
        }
    }
    let mut out_bf_d = gpu.zeros::<bf16>(tokens * hidden)?;
    dispatch::unpermute_bf16(
        gpu,
        &mut out_bf_d,
        &gpu.upload(&y_bf)?,
        &gates_d,
        &device,
        hidden,
    )?;
    let out_bf: Vec<f32> = gpu
        .download(&out_bf_d)?
        .iter()
        .map(|v| v.to_f32())
        .collect();
    checks.push(close(
        "dispatch.unpermute_bf16",
        name,
        &out_bf,
        &out_bf_ref,
        1e-6,
        1.0 / 256.0,
    ));
    Ok(checks)
}

/// The quantisers' test matrices: `(name, values, rows, cols)`.
fn fp8_matrices() -> [(&'static str, Vec<f32>, usize, usize); 4] {
    // Edge rows: all zeros; an infinity (saturates, scale 1); a NaN (kept,
    // ignored by amax); tiny values near f32's normal limit; a row of
    // values that land on E4M3's rounding midpoints after scaling.
    let cols = 256;
    let mut edge = random(5 * cols, 40);
    edge[..cols].fill(0.0);
    edge[cols + 3] = f32::INFINITY;
    edge[2 * cols + 7] = f32::NAN;
    for v in &mut edge[3 * cols..4 * cols] {
        *v *= 1e-36;
    }
    for (i, v) in edge[4 * cols..].iter_mut().enumerate() {
        *v = 448.0 * (i as f32 - 128.0) / 128.0 + 0.5;
    }
    [
        ("random 3x300 (tail tile)", random(3 * 300, 41), 3, 300),
        ("random 64x1024", random(64 * 1024, 42), 64, 1024),
        ("edge rows 5x256", edge, 5, cols),
        (
            "random 300x260 (tail blocks)",
            random(300 * 260, 43),
            300,
            260,
        ),
    ]
}

fn check_fp8(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for (name, m, rows, cols) in fp8_matrices() {
        for (tile_name, tile) in [
            ("1x128", TileShape::ROW),
            ("128x128", TileShape::BLOCK),
            ("128x1", TileShape::COLUMN),
        ] {
            let cpu = Fp8Matrix::quantize(&m, rows, cols, tile);
            let layouts: &[(&str, ScaleLayout)] = if tile == TileShape::COLUMN {
                &[("", ScaleLayout::RowMajor)]
            } else {
                &[
                    ("", ScaleLayout::RowMajor),
                    (" cublaslt", ScaleLayout::Cublaslt),
                ]
            };
            for &(layout_name, layout) in layouts {
                let device =
                    fp8::quantize_with_layout(gpu, &gpu.upload(&m)?, rows, cols, tile, layout)?;
                let case = format!("{tile_name}{layout_name} {name}");
                checks.push(exact(
                    "fp8.codes",
                    &case,
                    &gpu.download(&device.codes)?,
                    cpu.codes(),
                ));
                checks.push(exact(
                    "fp8.scales",
                    &case,
                    &bits(&device.row_major_scales(gpu)?),
                    &bits(cpu.scales()),
                ));
            }
        }
        // The FP8 GEMMs' K-major operands, padded to whole K slices: as
        // stored (1×128 tiles, 128×128 blocks) and transposed (the stored
        // matrix's 128×1 tiles and its blocks).
        for (tile_name, tile, transposed, cpu_tile) in [
            ("1x128", TileShape::ROW, false, TileShape::ROW),
            ("128x128", TileShape::BLOCK, false, TileShape::BLOCK),
            ("1x128 transposed", TileShape::ROW, true, TileShape::COLUMN),
            (
                "128x128 transposed",
                TileShape::BLOCK,
                true,
                TileShape::BLOCK,
            ),
        ] {
            let cpu = Fp8Matrix::quantize(&m, rows, cols, cpu_tile);
            let operand = stored_operand(rows, cols, transposed);
            let device = fp8::quantize_operand(
                gpu,
                &gpu.upload(&m)?.slice(..),
                operand,
                tile,
                ScaleLayout::Cublaslt,
            )?;
            let case = format!("operand {tile_name} {name}");
            checks.extend(operand_codes(gpu, &case, &device, transposed, cpu.codes())?);
            let (_, scales) = operand_as_stored(gpu, &device, transposed)?;
            let expected: Vec<f32> = scales.iter().map(|&(r, c)| cpu.scale_at(r, c)).collect();
            checks.push(exact(
                "fp8.operand_scales",
                &case,
                &bits(&device.row_major_scales(gpu)?),
                &bits(&expected),
            ));
        }
    }
    Ok(checks)
}

/// The FP8 GEMM operand of a stored `[rows, cols]` matrix, quantised along
/// its rows or (`transposed`) its columns, padded as [`matmul::gemm`] pads.
fn stored_operand(rows: usize, cols: usize, transposed: bool) -> fp8::Operand {
    let (op_rows, op_cols) = if transposed {
        (cols, rows)
    } else {
        (rows, cols)
    };
    fp8::Operand {
        rows: op_rows,
        cols: op_cols,
        transposed,
        stride: op_cols.next_multiple_of(TILE),
        padded_rows: op_rows.next_multiple_of(matmul::FP8_ROWS),
    }
}

/// An FP8 GEMM operand's codes in the stored matrix's orientation against
/// `want` (the CPU's), and its padding against zeros.
fn operand_codes(
    gpu: &Gpu,
    case: &str,
    device: &fp8::DeviceFp8,
    transposed: bool,
    want: &[u8],
) -> Result<[Check; 2]> {
    let (codes, _) = operand_as_stored(gpu, device, transposed)?;
    let (rows, cols, stride) = (device.rows, device.cols, device.stride);
    let padded_codes = device.padded_rows * stride - rows * cols;
    Ok([
        exact("fp8.operand_codes", case, &codes, want),
        exact(
            "fp8.operand_padding",
            case,
            &padding(&gpu.download(&device.codes)?, rows, cols, stride),
            &vec![0u8; padded_codes],
        ),
    ])
}

/// Codes, and for each scale an element of the stored matrix its tile covers.
type StoredOperand = (Vec<u8>, Vec<(usize, usize)>);

/// A [`fp8::quantize_operand`] result back in the stored matrix's
/// orientation: its codes without the padding, and for each of its scales
/// (row-major over its own tile grid) an element of the stored matrix that
/// the scale's tile covers.
fn operand_as_stored(
    gpu: &Gpu,
    device: &fp8::DeviceFp8,
    transposed: bool,
) -> Result<StoredOperand> {
    let (rows, cols, stride) = (device.rows, device.cols, device.stride);
    let padded = gpu.download(&device.codes)?;
    let at = |r: usize, c: usize| padded[r * stride + c];
    let codes = if transposed {
        (0..cols)
            .flat_map(|c| (0..rows).map(move |r| (r, c)))
            .map(|(r, c)| at(r, c))
            .collect()
    } else {
        (0..rows)
            .flat_map(|r| (0..cols).map(move |c| (r, c)))
            .map(|(r, c)| at(r, c))
            .collect()
    };
    let tile_rows = if device.tile == TileShape::BLOCK {
        rows.div_ceil(TILE)
    } else {
        rows
    };
    let row_step = device.tile.rows;
    let scales = (0..tile_rows)
        .flat_map(|i| (0..cols.div_ceil(TILE)).map(move |j| (i * row_step, j * TILE)))
        .map(|(r, c)| if transposed { (c, r) } else { (r, c) })
        .collect();
    Ok((codes, scales))
}

/// The codes between `cols` and `stride` of every row, and every code of
/// the rows past `rows`.
fn padding(codes: &[u8], rows: usize, cols: usize, stride: usize) -> Vec<u8> {
    codes
        .chunks(stride)
        .enumerate()
        .flat_map(|(r, row)| row[if r < rows { cols } else { 0 }..].iter().copied())
        .collect()
}

/// The FP8 forward GEMM against [`crate::fp8::gemm::forward`]: identical
/// quantised operands, so only the f32 summation order differs.
fn check_fp8_gemm(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for (rows, in_dim, out_dim) in [(1, 128, 128), (70, 300, 200), (256, 512, 384)] {
        let case = format!("{rows}x{in_dim} -> {out_dim}");
        let (x, w) = (random(rows * in_dim, 60), random(out_dim * in_dim, 61));
        let mut expected = vec![0.0f32; rows * out_dim];
        crate::fp8::gemm::forward(
            crate::fp8::gemm::Scaling::Blockwise,
            &mut expected,
            &x,
            &w,
            in_dim,
            out_dim,
        );
        let a = fp8::quantize(gpu, &gpu.upload(&x)?, rows, in_dim, TileShape::ROW)?;
        let b = fp8::quantize(gpu, &gpu.upload(&w)?, out_dim, in_dim, TileShape::BLOCK)?;
        let mut out = gpu.zeros(rows * out_dim)?;
        fp8::gemm_abt(gpu, &mut out, &a, &b)?;
        checks.push(close_to_scale(
            "fp8.gemm_abt",
            &case,
            &gpu.download(&out)?,
            &expected,
            1e-5,
        ));
    }
    Ok(checks)
}

/// cuBLASLt's block-scaled FP8 GEMM against the CPU emulation on the same
/// quantised operands (shapes within cuBLASLt's FP8 alignment rules).
fn check_fp8_gemm_cublaslt(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    // K blocks per row 2, 3, 5 (padded scale rows) and 8 (unpadded).
    for (rows, in_dim, out_dim) in [
        (128, 256, 256),
        (64, 384, 256),
        (32, 640, 384),
        (256, 1024, 512),
    ] {
        let case = format!("{rows}x{in_dim} -> {out_dim}");
        let (x, w) = (random(rows * in_dim, 62), random(out_dim * in_dim, 63));
        let mut expected = vec![0.0f32; rows * out_dim];
        crate::fp8::gemm::forward(
            crate::fp8::gemm::Scaling::Blockwise,
            &mut expected,
            &x,
            &w,
            in_dim,
            out_dim,
        );
        let layout = ScaleLayout::Cublaslt;
        let a =
            fp8::quantize_with_layout(gpu, &gpu.upload(&x)?, rows, in_dim, TileShape::ROW, layout)?;
        let b = fp8::quantize_with_layout(
            gpu,
            &gpu.upload(&w)?,
            out_dim,
            in_dim,
            TileShape::BLOCK,
            layout,
        )?;
        let mut out = gpu.zeros::<f32>(rows * out_dim)?;
        super::fp8_gemm::gemm_abt(gpu, &mut out, &a, &b)?;
        // Hopper's FP8 tensor cores keep about 14 bits while they add up
        // the products of a 128-wide K slice (DeepSeek-V3, section 3.3.2);
        // the slices are promoted to f32 and scaled. Measured on an H200:
        // 1.9e-4 x max|ref| at K = 1024. A layout or scale mistake is off
        // by O(1).
        checks.push(close_to_scale(
            "fp8.gemm_abt_cublaslt",
            &case,
            &gpu.download(&out)?,
            &expected,
            1e-3,
        ));
    }
    Ok(checks)
}

/// One attention case on the host: random inputs, the CPU's forward pass
/// and its gradients added into random starting gradients.
struct AttentionCase {
    sequences: usize,
    shape: crate::ops::attention::AttentionShape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
    out: Vec<f32>,
    probs: Vec<f32>,
    /// The gradients' starting values, and after the CPU's backward pass.
    grads0: [Vec<f32>; 3],
    grads: [Vec<f32>; 3],
    /// Packed sequences: each token's document start (else every start 0).
    documents: Option<Vec<u32>>,
}

impl AttentionCase {
    fn new(sequences: usize, shape: crate::ops::attention::AttentionShape) -> Self {
        Self::with_documents(sequences, shape, None)
    }

    /// [`Self::new`] on sequences packing documents of 1 to 40 tokens
    /// (training's `data.packing`), drawn from `seed`.
    fn packed(sequences: usize, shape: crate::ops::attention::AttentionShape, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let mut starts = Vec::with_capacity(sequences * shape.seq_len);
        for _ in 0..sequences {
            let mut start = 0;
            for t in 0..shape.seq_len {
                if (t > start && rng.below(13) == 0) || t - start >= 40 {
                    start = t;
                }
                starts.push(start as u32);
            }
        }
        Self::with_documents(sequences, shape, Some(starts))
    }

    fn with_documents(
        sequences: usize,
        shape: crate::ops::attention::AttentionShape,
        documents: Option<Vec<u32>>,
    ) -> Self {
        use crate::ops::attention::{Qkv, QkvGrads};
        let tokens = sequences * shape.seq_len;
        let q_len = tokens * shape.n_heads * shape.head_dim;
        let kv_len = tokens * shape.n_kv_heads * shape.head_dim;
        let (q, k, v) = (random(q_len, 70), random(kv_len, 71), random(kv_len, 72));
        let dout = random(q_len, 73);
        let (mut out, mut probs) = (vec![0.0; q_len], vec![0.0; shape.probs_len(tokens)]);
        let qkv = Qkv {
            q: &q,
            k: &k,
            v: &v,
        };
        ops::attention::forward(&mut out, &mut probs, qkv, shape, documents.as_deref());
        let grads0 = [random(q_len, 74), random(kv_len, 75), random(kv_len, 76)];
        let mut grads = grads0.clone();
        let [dq, dk, dv] = &mut grads;
        ops::attention::backward(
            QkvGrads {
                q: dq,
                k: dk,
                v: dv,
            },
            &dout,
            qkv,
            &probs,
            shape,
            documents.as_deref(),
        );
        Self {
            sequences,
            shape,
            q,
            k,
            v,
            dout,
            out,
            probs,
            grads0,
            grads,
            documents,
        }
    }

    /// The document starts on the device, as the kernels take them.
    fn device_documents(&self, gpu: &Gpu) -> Result<Option<CudaSlice<i32>>> {
        self.documents
            .as_ref()
            .map(|starts| {
                let starts: Vec<i32> = starts.iter().map(|&s| s as i32).collect();
                gpu.upload(&starts)
            })
            .transpose()
    }

    fn name(&self) -> String {
        let s = self.shape;
        let packed = if self.documents.is_some() {
            " packed"
        } else {
            ""
        };
        format!(
            "B{} T{} H{}/{} D{}{packed}",
            self.sequences, s.seq_len, s.n_heads, s.n_kv_heads, s.head_dim
        )
    }

    /// Each row's log-sum-exp of `scale · q·k` over keys at or before it,
    /// `[sequences, n_heads, T]`, in f64 from the inputs.
    fn lse(&self) -> Vec<f32> {
        let s = self.shape;
        let (t_len, d) = (s.seq_len, s.head_dim);
        let group = s.n_heads / s.n_kv_heads;
        let scale = 1.0 / (d as f64).sqrt();
        let mut lse = Vec::with_capacity(self.sequences * s.n_heads * t_len);
        for b in 0..self.sequences {
            for h in 0..s.n_heads {
                for t in 0..t_len {
                    let q_at = ((b * t_len + t) * s.n_heads + h) * d;
                    let first = self
                        .documents
                        .as_ref()
                        .map_or(0, |starts| starts[b * t_len + t] as usize);
                    let scores: Vec<f64> = (first..=t)
                        .map(|j| {
                            let k_at = ((b * t_len + j) * s.n_kv_heads + h / group) * d;
                            scale
                                * (0..d)
                                    .map(|i| {
                                        f64::from(self.q[q_at + i]) * f64::from(self.k[k_at + i])
                                    })
                                    .sum::<f64>()
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = scores.iter().map(|x| (x - max).exp()).sum();
                    lse.push((max + sum.ln()) as f32);
                }
            }
        }
        lse
    }
}

fn check_attention(gpu: &Gpu) -> Result<Vec<Check>> {
    use crate::ops::attention::AttentionShape;
    let mut checks = Vec::new();
    let shapes = [
        (
            1,
            AttentionShape {
                seq_len: 1,
                n_heads: 1,
                n_kv_heads: 1,
                head_dim: 8,
            },
        ),
        (
            2,
            AttentionShape {
                seq_len: 37,
                n_heads: 4,
                n_kv_heads: 2,
                head_dim: 32,
            },
        ),
        (
            1,
            AttentionShape {
                seq_len: 128,
                n_heads: 8,
                n_kv_heads: 1,
                head_dim: 64,
            },
        ),
    ];
    // Plain causal, and the second shape again over packed documents
    // (training's data.packing) on the path that takes them.
    let cases = shapes
        .iter()
        .map(|&(sequences, shape)| AttentionCase::new(sequences, shape))
        .chain([AttentionCase::packed(shapes[1].0, shapes[1].1, 79)]);
    for c in cases {
        let shape = c.shape;
        let [dq0, dk0, dv0] = &c.grads0;
        let [dq, dk, dv] = &c.grads;
        let (q_d, k_d, v_d) = (gpu.upload(&c.q)?, gpu.upload(&c.k)?, gpu.upload(&c.v)?);
        let documents = c.device_documents(gpu)?;
        for path in ATTENTION_PATHS {
            if documents.is_some() && !path.documents {
                continue;
            }
            let case = format!("{} {}", c.name(), path.name);
            let (mut out_d, mut probs_d) = (gpu.zeros(c.out.len())?, gpu.zeros(c.probs.len())?);
            let (q, k, v, docs) = (&q_d, &k_d, &v_d, documents.as_ref());
            (path.forward)(gpu, &mut out_d, &mut probs_d, q, k, v, shape, docs)?;
            let (mut dq_d, mut dk_d, mut dv_d) =
                (gpu.upload(dq0)?, gpu.upload(dk0)?, gpu.upload(dv0)?);
            (path.backward)(
                gpu,
                attention::AttentionGrads {
                    q: &mut dq_d,
                    k: &mut dk_d,
                    v: &mut dv_d,
                },
                &gpu.upload(&c.dout)?,
                &q_d,
                &k_d,
                &v_d,
                &probs_d,
                shape,
            )?;
            let results = [
                ("attention.forward", gpu.download(&out_d)?, &c.out, 1e-5),
                ("attention.probs", gpu.download(&probs_d)?, &c.probs, 1e-6),
                ("attention.backward.dq", gpu.download(&dq_d)?, dq, 1e-4),
                ("attention.backward.dk", gpu.download(&dk_d)?, dk, 1e-4),
                ("attention.backward.dv", gpu.download(&dv_d)?, dv, 1e-4),
            ];
            for (op, got, want, atol) in results {
                checks.push(match path.tf32 {
                    false => close(op, &case, &got, want, atol, 1e-4),
                    // The products' inputs rounded to TF32's 10 mantissa bits.
                    true => close_to_scale(op, &case, &got, want, 1e-2),
                });
            }
        }
    }
    Ok(checks)
}

/// The flash kernels ([`flash_attention`]) against the CPU: one token;
/// lengths that end inside a forward (64) and a backward (32) tile and span
/// several; groups of 1, 2, 4 and 8 query heads per kv head; heads of 128,
/// 64, 32, 8 and of sizes the 16-wide tiles pad (12, 6: the 4-float loads
/// and the scalar ones); several sequences. lse against the host's f64
/// log-sum-exp, and the backward pass twice for the same bits (no atomics).
fn check_flash_attention(gpu: &Gpu) -> Result<Vec<Check>> {
    use crate::ops::attention::AttentionShape;
    let shape = |seq_len, n_heads, n_kv_heads, head_dim| AttentionShape {
        seq_len,
        n_heads,
        n_kv_heads,
        head_dim,
    };
    let cases = [
        (1, shape(1, 1, 1, 8)),
        (2, shape(37, 4, 2, 32)),
        (1, shape(128, 8, 1, 64)),
        (3, shape(100, 4, 4, 64)),
        (2, shape(130, 8, 2, 128)),
        (2, shape(65, 4, 1, 8)),
        (1, shape(70, 2, 2, 12)),
        (2, shape(33, 2, 1, 6)),
    ];
    let mut checks = Vec::new();
    for (index, (sequences, shape)) in cases.into_iter().enumerate() {
        // Every other case packs documents (training's data.packing).
        let c = match index % 2 {
            0 => AttentionCase::new(sequences, shape),
            _ => AttentionCase::packed(sequences, shape, 80 + index as u64),
        };
        let case = c.name();
        let [dq0, dk0, dv0] = &c.grads0;
        let [dq, dk, dv] = &c.grads;
        let (q_d, k_d, v_d) = (gpu.upload(&c.q)?, gpu.upload(&c.k)?, gpu.upload(&c.v)?);
        let documents = c.device_documents(gpu)?;
        let tokens = sequences * shape.seq_len;
        let mut out_d = gpu.zeros(c.out.len())?;
        let mut lse_d = gpu.zeros(flash_attention::lse_len(shape, tokens))?;
        let (q, k, v) = (&q_d, &k_d, &v_d);
        let docs = documents.as_ref();
        flash_attention::forward(gpu, &mut out_d, &mut lse_d, q, k, v, shape, docs)?;
        let dout_d = gpu.upload(&c.dout)?;
        let backward = || -> Result<[Vec<f32>; 3]> {
            let (mut dq_d, mut dk_d, mut dv_d) =
                (gpu.upload(dq0)?, gpu.upload(dk0)?, gpu.upload(dv0)?);
            flash_attention::backward(
                gpu,
                attention::AttentionGrads {
                    q: &mut dq_d,
                    k: &mut dk_d,
                    v: &mut dv_d,
                },
                &dout_d,
                &q_d,
                &k_d,
                &v_d,
                &out_d,
                &lse_d,
                shape,
                documents.as_ref(),
            )?;
            Ok([
                gpu.download(&dq_d)?,
                gpu.download(&dk_d)?,
                gpu.download(&dv_d)?,
            ])
        };
        let first = backward()?;
        let again = backward()?;
        let [dq_g, dk_g, dv_g] = &first;
        // Scores of O(1) off by TF32's rounding of q and k (about 1e-3 at
        // D = 128); a lost key, a wrong scale or base is off by O(0.1).
        checks.push(close(
            "flash_attention.lse",
            &case,
            &gpu.download(&lse_d)?,
            &c.lse(),
            1e-2,
            1e-3,
        ));
        let results = [
            ("flash_attention.forward", gpu.download(&out_d)?, &c.out),
            ("flash_attention.backward.dq", dq_g.clone(), dq),
            ("flash_attention.backward.dk", dk_g.clone(), dk),
            ("flash_attention.backward.dv", dv_g.clone(), dv),
        ];
        for (op, got, want) in results {
            // As the GEMM path: the products' inputs rounded to TF32.
            checks.push(close_to_scale(op, &case, &got, want, 1e-2));
        }
        checks.push(exact(
            "flash_attention.backward",
            &format!("{case} rerun"),
            &bits(&first.concat()),
            &bits(&again.concat()),
        ));
    }
    Ok(checks)
}

type AttentionForward = fn(
    &Gpu,
    &mut CudaSlice<f32>,
    &mut CudaSlice<f32>,
    &CudaSlice<f32>,
    &CudaSlice<f32>,
    &CudaSlice<f32>,
    crate::ops::attention::AttentionShape,
    Option<&CudaSlice<i32>>,
) -> Result<()>;
type AttentionBackward = fn(
    &Gpu,
    attention::AttentionGrads<'_>,
    &CudaSlice<f32>,
    &CudaSlice<f32>,
    &CudaSlice<f32>,
    &CudaSlice<f32>,
    &CudaSlice<f32>,
    crate::ops::attention::AttentionShape,
) -> Result<()>;

/// The two device attention paths, each checked against the CPU.
struct AttentionPath {
    name: &'static str,
    forward: AttentionForward,
    backward: AttentionBackward,
    tf32: bool,
    /// Whether it takes packed documents (training runs the other path).
    documents: bool,
}

const ATTENTION_PATHS: [AttentionPath; 2] = [
    AttentionPath {
        name: "exact",
        forward: |gpu, out, probs, q, k, v, shape, _| {
            attention::forward_exact(gpu, out, probs, q, k, v, shape)
        },
        backward: attention::backward_exact,
        tf32: false,
        documents: false,
    },
    AttentionPath {
        name: "tensor cores",
        forward: attention::forward,
        backward: attention::backward,
        tf32: true,
        documents: true,
    },
];

fn check_embedding(gpu: &Gpu) -> Result<Vec<Check>> {
    // A vocabulary larger than every batch (most rows get no gradient and
    // must keep their bits); a width of two column blocks, the second partial.
    let (vocab, dim) = (256, 160);
    let cases: [(&str, Vec<u32>); 5] = [
        ("one token", vec![7]),
        ("repeated", vec![1, 5, 1, 255, 0, 5, 5, 1]),
        // One group of 21: the kernel's batches of eight and its remainder.
        ("every token one id", vec![3; 21]),
        (
            "all distinct",
            (0..64).map(|i| (i * 37 + 11) % 256).collect(),
        ),
        // A third of the tokens one id, as frequent words are in text.
        (
            "skewed",
            (0..1000u32)
                .map(|i| if i % 3 == 0 { 5 } else { (i * 7919) % 256 })
                .collect(),
        ),
    ];
    let mut checks = Vec::new();
    for (name, tokens) in cases {
        let case = format!("{name}, {} tokens", tokens.len());
        let table = random(vocab * dim, 80);
        let dout = random(tokens.len() * dim, 81);
        let dtable0 = random(vocab * dim, 82);
        let mut out = vec![0.0; tokens.len() * dim];
        ops::embedding::forward(&mut out, &tokens, &table, dim);
        let mut dtable = dtable0.clone();
        ops::embedding::backward(&mut dtable, &dout, &tokens, dim);
        let tokens_d = gpu.upload(&tokens)?;
        let mut out_d = gpu.zeros(out.len())?;
        embedding::forward(gpu, &mut out_d, &tokens_d, &gpu.upload(&table)?, dim)?;
        let mut dtable_d = gpu.upload(&dtable0)?;
        embedding::backward(gpu, &mut dtable_d, &gpu.upload(&dout)?, &tokens, dim)?;
        checks.push(exact(
            "embedding.forward",
            &case,
            &bits(&gpu.download(&out_d)?),
            &bits(&out),
        ));
        // Each row's additions in the same (token) order, the rows summed
        // in parallel on the device: identical bits.
        checks.push(exact(
            "embedding.backward",
            &case,
            &bits(&gpu.download(&dtable_d)?),
            &bits(&dtable),
        ));
    }
    Ok(checks)
}

/// The data-parallel mean's division (`sum / ranks`), bit for bit as the
/// CPU's: ranks that are and are not powers of two, values that round.
fn check_divide(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    let sums = random(70_001, 90);
    for ranks in [2usize, 3, 7, 64] {
        let mut x = gpu.upload(&sums)?;
        super::vector::divide(gpu, &mut x, ranks as f32)?;
        let expected: Vec<f32> = sums.iter().map(|v| v / ranks as f32).collect();
        checks.push(exact(
            "vector.divide",
            &format!("{} values / {ranks}", sums.len()),
            &bits(&gpu.download(&x)?),
            &bits(&expected),
        ));
    }
    Ok(checks)
}

fn check_matmul(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for (rows, in_dim, out_dim) in [(100, 512, 384), (1, 64, 32), (0, 64, 32)] {
        let case = format!("f32/tf32 {rows}x{in_dim} -> {out_dim}");
        let (x, w) = (random(rows * in_dim, 50), random(out_dim * in_dim, 51));
        let mut out = vec![0.0; rows * out_dim];
        ops::matmul::forward(&mut out, &x, &w, in_dim, out_dim);
        let mut out_d = gpu.zeros(rows * out_dim)?;
        let x_d = if rows == 0 {
            gpu.zeros(0)?
        } else {
            gpu.upload(&x)?
        };
        matmul::forward(
            gpu,
            Arithmetic::Tf32,
            &mut out_d,
            &x_d,
            &gpu.upload(&w)?,
            in_dim,
            out_dim,
        )?;
        checks.push(close_to_scale(
            "matmul.forward",
            &case,
            &gpu.download(&out_d)?,
            &out,
            1e-2,
        ));
        let mut exact_d = gpu.zeros(rows * out_dim)?;
        matmul::forward_exact(gpu, &mut exact_d, &x_d, &gpu.upload(&w)?, in_dim, out_dim)?;
        checks.push(exact(
            "matmul.forward_exact",
            &case,
            &bits(&gpu.download(&exact_d)?),
            &bits(&out),
        ));
    }
    checks.extend(check_bf16_linear(gpu)?);
    checks.extend(check_fp8_linear(gpu)?);
    let (groups, rows, in_dim, out_dim) = (3, 64, 256, 128);
    let round = |v: Vec<f32>| -> Vec<bf16> { v.into_iter().map(bf16::from_f32).collect() };
    let (x, w) = (
        round(random(groups * rows * in_dim, 52)),
        round(random(groups * out_dim * in_dim, 53)),
    );
    let mut expected = Vec::new();
    for g in 0..groups {
        let xg: Vec<f32> = x[g * rows * in_dim..][..rows * in_dim]
            .iter()
            .map(|v| v.to_f32())
            .collect();
        let wg: Vec<f32> = w[g * out_dim * in_dim..][..out_dim * in_dim]
            .iter()
            .map(|v| v.to_f32())
            .collect();
        let mut out = vec![0.0; rows * out_dim];
        ops::matmul::forward(&mut out, &xg, &wg, in_dim, out_dim);
        expected.extend(out);
    }
    let mut out_d = gpu.zeros::<bf16>(groups * rows * out_dim)?;
    matmul::forward_grouped_bf16(
        gpu,
        &mut out_d,
        &gpu.upload(&x)?,
        &gpu.upload(&w)?,
        groups,
        in_dim,
        out_dim,
    )?;
    let out: Vec<f32> = gpu.download(&out_d)?.iter().map(|v| v.to_f32()).collect();
    checks.push(close_to_scale(
        "matmul.grouped_bf16",
        "3 groups 64x256 -> 128",
        &out,
        &expected,
        1e-2,
    ));
    Ok(checks)
}

/// A linear layer's three GEMMs in bf16 (`compute: bf16`) against the CPU's
/// [`Linear::Bf16`](crate::linear::Linear::Bf16): the same operands rounded
/// the same way and exact products, so only the order of the f32 sums
/// differs (about 1e-7 of the largest output; TF32 on the unrounded
/// operands would be 1e-3 off, and a truncating cast 1e-3 too).
fn check_bf16_linear(gpu: &Gpu) -> Result<Vec<Check>> {
    let shapes = [(100, 512, 384, 0), (1, 64, 32, 0), (37, 130, 6, 0)];
    check_linear(gpu, GemmPrecision::Bf16, Arithmetic::Bf16, &shapes, 1e-5)
}

/// A linear layer's three GEMMs in FP8 (`fp8.enabled`, blockwise) against
/// the CPU's [`crate::fp8::gemm`]: the device quantises each operand along
/// its GEMM's K as the CPU does (1×128 activation tiles, 128×128 weight
/// blocks, the weight gradient's 128×1 token tiles; see
/// [`matmul::gemm`]), so only the tensor cores' accumulation differs
/// (1.9e-4 of the largest output measured for the forward GEMM; a wrong
/// tiling, scale layout or transposition is off by O(1)). Shapes with a K
/// that is not a multiple of 128 (zero-padded slices), a single row, an
/// odd output width, and outputs at an unaligned offset (through the
/// scratch path).
fn check_fp8_linear(gpu: &Gpu) -> Result<Vec<Check>> {
    let shapes = [
        (256, 512, 384, 0),
        (130, 300, 200, 0),
        (1, 64, 48, 0),
        (37, 136, 6, 1),
        (200, 2048, 512, 3),
    ];
    let precision = GemmPrecision::Fp8(crate::fp8::Fp8Recipe::Blockwise);
    check_linear(gpu, precision, Arithmetic::Fp8, &shapes, 1e-3)
}

/// `forward`, then `backward` adding onto non-zero gradients (as the
/// trainer accumulates), of one linear layer `(rows, in, out)` on the CPU
/// in `precision` and through [`matmul`] in `arithmetic`, the device's
/// outputs `offset` values into their buffers; each within `fraction` of
/// the largest reference value.
fn check_linear(
    gpu: &Gpu,
    precision: GemmPrecision,
    arithmetic: Arithmetic<'_>,
    shapes: &[(usize, usize, usize, usize)],
    fraction: f64,
) -> Result<Vec<Check>> {
    let linear = Linears::new(precision, &[]).get(0);
    let mut checks = Vec::new();
    for &shape in shapes {
        checks.extend(linear_step(gpu, linear, arithmetic, shape, 1.0, fraction)?);
    }
    Ok(checks)
}

/// One step of [`check_linear`] for one shape, its inputs scaled by `gain`.
fn linear_step(
    gpu: &Gpu,
    linear: crate::linear::Linear<'_>,
    arithmetic: Arithmetic<'_>,
    (rows, in_dim, out_dim, offset): (usize, usize, usize, usize),
    gain: f32,
    fraction: f64,
) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    let case = format!("{arithmetic:?} {rows}x{in_dim} -> {out_dim}, offset {offset}, gain {gain}");
    let scaled = |v: Vec<f32>| v.into_iter().map(|x| gain * x).collect::<Vec<f32>>();
    let (x, w) = (
        scaled(random(rows * in_dim, 54)),
        random(out_dim * in_dim, 55),
    );
    let dout = scaled(random(rows * out_dim, 56));
    let mut out = vec![0.0; rows * out_dim];
    linear.forward(&mut out, &x, &w, in_dim, out_dim);
    let (dx0, dw0) = (random(x.len(), 57), random(w.len(), 58));
    let (mut dx, mut dw) = (dx0.clone(), dw0.clone());
    linear.backward(&mut dx, &mut dw, &dout, &x, &w, in_dim, out_dim);

    let (x_d, w_d, dout_d) = (gpu.upload(&x)?, gpu.upload(&w)?, gpu.upload(&dout)?);
    let (x_v, w_v, dout_v) = (x_d.slice(..), w_d.slice(..), dout_d.slice(..));
    // Each output `offset` values into a buffer of its own.
    let placed = |values: &[f32]| {
        let mut buffer = vec![0.0f32; offset];
        buffer.extend_from_slice(values);
        gpu.upload(&buffer)
    };
    let mut out_d = placed(&vec![0.0; out.len()])?;
    matmul::forward_view(
        gpu,
        arithmetic,
        &mut out_d.slice_mut(offset..),
        &x_v,
        &w_v,
        in_dim,
        out_dim,
        false,
    )?;
    let (mut dx_d, mut dw_d) = (placed(&dx0)?, placed(&dw0)?);
    matmul::gemm(
        gpu,
        arithmetic,
        &mut dx_d.slice_mut(offset..),
        &dout_v,
        false,
        &w_v,
        false,
        (rows, in_dim, out_dim),
        true,
    )?;
    matmul::gemm(
        gpu,
        arithmetic,
        &mut dw_d.slice_mut(offset..),
        &dout_v,
        true,
        &x_v,
        false,
        (out_dim, in_dim, rows),
        true,
    )?;
    for (op, device, host) in [
        ("matmul.linear_forward", &out_d, &out),
        ("matmul.linear_input_grad", &dx_d, &dx),
        ("matmul.linear_weight_grad", &dw_d, &dw),
    ] {
        checks.push(close_to_scale(
            op,
            &case,
            &gpu.download(device)?[offset..],
            host,
            fraction,
        ));
    }
    Ok(checks)
}

/// The tensorwise FP8 recipe (delayed scales on the device): its operands,
/// a linear layer over two steps, and the whole model
/// ([`super::train_check::check_training_tensorwise`]). A group of its own,
/// run late while its kernels are unproven on a GPU.
fn check_fp8_tensorwise(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for (name, m, rows, cols) in fp8_matrices() {
        // The tensorwise recipe's operands, as stored and transposed: the
        // scale of a tensor without history (its own amax, as
        // `DelayedScale::scale`), the codes `Fp8Matrix::quantize_with_scale`'s.
        for transposed in [false, true] {
            let scales = super::fp8_delayed::DelayedScales::new(gpu, 1)?;
            let m_d = gpu.upload(&m)?;
            let operand = stored_operand(rows, cols, transposed);
            let role = crate::fp8::Role::Input;
            let scale = scales.scale(gpu, 0, role, &m_d.slice(..))?;
            let want_scale =
                crate::fp8::DelayedScale::default().scale(crate::fp8::quantize::amax(&m));
            let case = format!(
                "tensorwise operand{} {name}",
                if transposed { " transposed" } else { "" }
            );
            checks.push(exact(
                "fp8.delayed_scale",
                &case,
                &bits(&gpu.download(&scale)?),
                &bits(&[want_scale]),
            ));
            let device = fp8::quantize_operand_tensorwise(gpu, &m_d.slice(..), operand, scale)?;
            let cpu = Fp8Matrix::quantize_with_scale(&m, rows, cols, want_scale);
            checks.extend(operand_codes(gpu, &case, &device, transposed, cpu.codes())?);
        }
    }
    checks.extend(check_fp8_tensorwise_linear(gpu)?);
    checks.extend(super::train_check::check_training_tensorwise(gpu)?);
    Ok(checks)
}

/// A linear layer's three GEMMs in FP8 with the tensorwise recipe against
/// the CPU's, for two steps: the first scales each tensor by its own amax
/// (no history yet), the second by the first's history, with inputs twice
/// as large (so the activations and gradients saturate at 448 × their
/// delayed scale, as on the CPU). After each step the device's amax
/// histories (input, weight, output gradient) equal the CPU's bit for bit.
fn check_fp8_tensorwise_linear(gpu: &Gpu) -> Result<Vec<Check>> {
    use super::fp8_delayed::DelayedScales;
    use crate::fp8::{LinearScales, Role};
    let precision = GemmPrecision::Fp8(crate::fp8::Fp8Recipe::Tensorwise);
    let mut checks = Vec::new();
    for shape in [(256, 512, 384, 0), (130, 300, 200, 0), (37, 136, 6, 1)] {
        let mut host = vec![LinearScales::default()];
        let mut device = DelayedScales::new(gpu, 1)?;
        for (step, gain) in [(1, 1.0f32), (2, 2.0)] {
            let linear = Linears::new(precision, &host).get(0);
            let arithmetic = Arithmetic::Fp8Delayed(&device, 0);
            checks.extend(linear_step(gpu, linear, arithmetic, shape, gain, 1e-3)?);
            host[0].advance();
            device.advance(gpu)?;
            for (name, role) in [
                ("input", Role::Input),
                ("weight", Role::Weight),
                ("output gradient", Role::GradOutput),
            ] {
                let want: Vec<f32> = host[0].role(role).history().collect();
                let got = device.history(gpu, 0, role)?;
                checks.push(exact(
                    "fp8.delayed_history",
                    &format!("{shape:?} step {step}, {name}"),
                    &bits(&got),
                    &bits(&want),
                ));
            }
        }
    }
    Ok(checks)
}

/// The whole MoE layer forward against the CPU layer: DeepSeek-style
/// routing with a shared expert, uneven loads from a skewed selection bias.
fn check_moe_layer(gpu: &Gpu) -> Result<Vec<Check>> {
    use crate::moe::layer::MoeLayer;
    use crate::moe::params::MoeParams;
    let mut checks = Vec::new();
    let configs = [
        ("sigmoid E16 k4 g4/2 +shared", deepseek_style_config()),
        (
            "softmax E8 k2 no shared",
            moe_config(8, 2, ScoreFunction::Softmax, None, false, 1.0),
        ),
        // DeepSeek-V3's small sequence-wise balance loss beside the bias:
        // its value and its gradient through the router, over padded
        // sequences (the padding left out of it and of the loads).
        ("sigmoid E8 k2 +balance loss, padded", {
            let mut c = moe_config(8, 2, ScoreFunction::Sigmoid, None, true, 1.0);
            c.aux_loss_alpha = 0.01;
            c
        }),
        ("softmax E8 k2 +balance loss, padded", {
            let mut c = moe_config(8, 2, ScoreFunction::Softmax, None, false, 1.0);
            c.aux_loss_alpha = 0.01;
            c
        }),
    ];
    for (name, config) in configs {
        let params = MoeParams::random(&config, &mut SplitMix64::new(90), 0.1);
        let mut layer = MoeLayer::new(config.clone(), params).expect("valid layer");
        // Skew: expert 0 favoured, the last one never chosen (an empty expert).
        let last = config.n_routed_experts - 1;
        layer.selection_bias[0] = 0.3;
        layer.selection_bias[last] = -10.0;
        let (seq_len, tokens) = (16, 64);
        let sequences = if config.aux_loss_alpha > 0.0 {
            Sequences::padded(seq_len, vec![16, 9, 16, 1])
        } else {
            Sequences::whole(tokens, seq_len)
        };
        let x = random(tokens * config.hidden, 91);
        let cpu = layer.forward_in(Linears::FP32, &x, &sequences, None);
        let device = super::moe_layer::DeviceMoeLayer::upload(gpu, &layer)?;
        let x_d = gpu.upload(&x)?;
        let forward = device.forward(gpu, Arithmetic::Tf32, &x_d, &sequences, None)?;
        checks.push(close_to_scale(
            "moe_layer.aux_loss",
            name,
            &[forward.aux_loss as f32],
            &[cpu.aux_loss],
            1e-5,
        ));
        checks.push(exact(
            "moe_layer.load",
            name,
            forward.expert_load(),
            &cpu.expert_load(),
        ));
        checks.push(close_to_scale(
            "moe_layer.output",
            name,
            &gpu.download(&forward.output)?,
            &cpu.output,
            1e-2,
        ));
        // Backward: the same dout on both sides, gradients accumulated from zero
        // (dx from a non-zero start, to check that it adds).
        let dout = random(tokens * config.hidden, 92);
        let dx0 = random(tokens * config.hidden, 93);
        let mut dx = dx0.clone();
        let mut grads = MoeParams::zeros(&config);
        layer.backward(&cpu, &x, &dout, &mut dx, &mut grads);
        let x_d = gpu.upload(&x)?;
        let mut dx_d = gpu.upload(&dx0)?;
        let mut grads_d = super::moe_layer::DeviceMoeGrads::zeros(gpu, &device)?;
        device.backward(
            gpu,
            Arithmetic::Tf32,
            &forward,
            &x_d,
            &gpu.upload(&dout)?,
            &mut dx_d,
            &mut grads_d,
        )?;
        let pairs = [
            ("moe_layer.backward.dx", &dx_d, &dx),
            ("moe_layer.backward.router", &grads_d.router, &grads.router),
            (
                "moe_layer.backward.experts_w1",
                &grads_d.w1,
                &grads.experts_w1,
            ),
            (
                "moe_layer.backward.experts_w3",
                &grads_d.w3,
                &grads.experts_w3,
            ),
            (
                "moe_layer.backward.experts_w2",
                &grads_d.w2,
                &grads.experts_w2,
            ),
            (
                "moe_layer.backward.shared_w1",
                &grads_d.shared_w1,
                &grads.shared_w1,
            ),
            (
                "moe_layer.backward.shared_w3",
                &grads_d.shared_w3,
                &grads.shared_w3,
            ),
            (
                "moe_layer.backward.shared_w2",
                &grads_d.shared_w2,
                &grads.shared_w2,
            ),
        ];
        for (op, device_grad, cpu_grad) in pairs {
            if !cpu_grad.is_empty() {
                checks.push(close_to_scale(
                    op,
                    name,
                    &gpu.download(device_grad)?,
                    cpu_grad,
                    1e-2,
                ));
            }
        }
    }
    Ok(checks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::GpuError;

    #[test]
    fn close_bounds_each_element_by_atol_plus_rtol() {
        let cpu = [1.0f32, -2.0, 100.0];
        assert!(close("op", "case", &[1.0, -2.0, 100.0], &cpu, 0.0, 0.0).passed);
        // 100 * 1e-3 = 0.1 allowed on the last element, 1e-3 on the first.
        assert!(close("op", "case", &[1.0005, -2.0, 100.09], &cpu, 0.0, 1e-3).passed);
        assert!(!close("op", "case", &[1.002, -2.0, 100.0], &cpu, 0.0, 1e-3).passed);
        // A NaN passes only where the reference has one; lengths must agree.
        assert!(!close("op", "case", &[f32::NAN, -2.0, 100.0], &cpu, 1.0, 0.0).passed);
        assert!(close("op", "case", &[f32::NAN], &[f32::NAN], 0.0, 0.0).passed);
        assert!(!close("op", "case", &[1.0], &cpu, 1.0, 1.0).passed);
    }

    #[test]
    fn groups_are_selected_by_name_and_a_stray_filter_is_refused() {
        let all = select_groups(&[]).expect("no filter");
        assert_eq!(all.len(), GROUPS.len());
        let fp8: Vec<&str> = select_groups(&["fp8".into()])
            .expect("fp8 groups")
            .iter()
            .map(|(name, _)| *name)
            .collect();
        assert_eq!(
            fp8,
            [
                "fp8 quantize",
                "fp8 gemm",
                "fp8 gemm cublaslt",
                "fp8 tensorwise"
            ]
        );
        let picked = select_groups(&["flash".into(), "rmsnorm".into()]).expect("two");
        let names: Vec<&str> = picked.iter().map(|(name, _)| *name).collect();
        assert_eq!(names, ["rmsnorm", "flash attention"], "in GROUPS' order");
        let error = select_groups(&["flahs".into()]).expect_err("a typo");
        assert!(
            error.contains("flahs") && error.contains("flash attention"),
            "{error}"
        );
    }

    #[test]
    fn a_failed_or_panicking_group_fails_alone_unless_the_context_is_lost() {
        type Probe = std::cell::Cell<bool>;
        fn passes(_: &Probe) -> Result<Vec<Check>> {
            Ok(vec![exact("op", "case", &[1], &[1])])
        }
        fn errs(_: &Probe) -> Result<Vec<Check>> {
            Err(GpuError::Unsupported("no such configuration".into()))
        }
        fn panics(_: &Probe) -> Result<Vec<Check>> {
            panic!("index out of bounds")
        }
        fn faults(context: &Probe) -> Result<Vec<Check>> {
            context.set(false);
            Err(GpuError::Unsupported("illegal address".into()))
        }
        let groups: [(&'static str, CheckGroup<Probe>); 5] = [
            ("a", passes),
            ("b", errs),
            ("c", panics),
            ("d", faults),
            ("e", passes),
        ];
        let mut reported = Vec::new();
        let (checks, end) = run_groups_on(
            &Probe::new(true),
            &groups,
            |context| context.get(),
            |name, results, _| reported.push((name.to_string(), results.len())),
        );
        // Each failure is its group's alone while the context answers; the
        // fault in "d" stops the run before "e".
        let names: Vec<&str> = reported.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "d"]);
        assert_eq!(end, GroupsEnd::ContextLost("d"));
        let failed: Vec<(&str, &str)> = checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| (c.op, c.error.as_str()))
            .collect();
        assert_eq!(
            failed,
            [
                (
                    "b",
                    "CUDA error: not supported on the device yet: no such configuration"
                ),
                ("c", "panic: index out of bounds"),
                (
                    "d",
                    "CUDA error: not supported on the device yet: illegal address"
                ),
            ]
        );
        let (_, end) = run_groups_on(&Probe::new(true), &groups[..3], |c| c.get(), |_, _, _| {});
        assert_eq!(end, GroupsEnd::Finished);
    }

    #[test]
    fn the_rest_of_a_run_is_the_groups_after_the_one_named() {
        let rest = |filters: &[&str], after: &str| {
            let picked = select_groups(&filters.iter().map(|f| f.to_string()).collect::<Vec<_>>())
                .expect("known groups");
            groups_after(picked, after)
                .map(|groups| groups.iter().map(|(name, _)| *name).collect::<Vec<_>>())
        };
        assert_eq!(
            rest(&[], "grouped gemm").expect("a group"),
            ["flash attention"]
        );
        // The first run's filters still hold; "fp8 gemm" is not "fp8 gemm cublaslt".
        assert_eq!(
            rest(&["fp8"], "fp8 gemm").expect("a group"),
            ["fp8 gemm cublaslt", "fp8 tensorwise"]
        );
        assert_eq!(
            rest(&[], "flash attention").expect("the last"),
            Vec::<&str>::new()
        );
        assert!(
            rest(&[], "fp8")
                .expect_err("not a whole name")
                .contains("fp8")
        );
    }

    #[test]
    fn exact_reports_the_first_difference() {
        assert!(exact("op", "case", &[1, 2, 3], &[1, 2, 3]).passed);
        let check = exact("op", "case", &[1, 5, 3, 9], &[1, 2, 3, 4]);
        assert!(!check.passed);
        assert!(
            check.error.starts_with("2 of 4 differ; first [1]"),
            "{}",
            check.error
        );
        // Floats compared by bits: -0.0 differs from 0.0.
        assert!(!exact("op", "case", &bits(&[-0.0]), &bits(&[0.0])).passed);
    }
}
