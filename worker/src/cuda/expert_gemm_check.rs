//! The routed experts' GEMMs as the layer runs them for speed, against
//! the plain per-expert loop on the main stream they replace.
//!
//! Expert streams ([`super::lanes`]): a MoE layer's forward and backward
//! in TF32 and bf16 with the per-expert GEMMs spread over four streams and
//! on the main stream alone must agree bit for bit (every GEMM runs the
//! same cuBLASLt plan on the same operands; only where it runs differs),
//! twice over, so that a missing wait shows as a difference; first, one
//! stream twice, the baseline that makes such a difference mean that.
//!
//! Grouped GEMMs ([`super::grouped_gemm`]), on a GPU whose cuBLASLt runs
//! them (the report's header says whether this one does, and why not; the
//! group checks nothing without them):
//! - Each orientation the expert layers use, on uneven problems (one row,
//!   odd row counts), against [`matmul::gemm`] in bf16 problem by
//!   problem: the same bf16 operands and f32 accumulation, so only the
//!   order of the sums differs (bound 1e-5 of the largest output, as the
//!   bf16 linear layer's against the CPU; a wrong layout or address is off
//!   by O(1)).
//! - A MoE layer's forward and backward in bf16 with the grouped GEMMs
//!   and with the loop: the same routing, outputs and gradients within
//!   1e-2 of their scale (an f32 sum in a different order can round an
//!   activation to the neighbouring bf16 before the next GEMM).

use super::check::{Check, bits, close_to_scale, deepseek_style_config, exact};
use super::grouped_gemm::{self, GroupedLt, Problem};
use super::matmul::{self, Arithmetic, Prepared};
use super::moe_layer::{DeviceMoeGrads, DeviceMoeLayer};
use super::{Gpu, Result};
use crate::moe::Sequences;
use crate::moe::layer::MoeLayer;
use crate::moe::params::MoeParams;
use crate::rng::SplitMix64;
use moe_kernels::cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

fn random(n: usize, seed: u64) -> Vec<f32> {
    SplitMix64::new(seed).normal_vec(n, 1.0)
}

pub fn check_grouped_gemm(gpu: &Gpu) -> Result<Vec<Check>> {
    let Ok(lt) = gpu.grouped_gemm_support() else {
        return Ok(Vec::new());
    };
    let mut checks = check_orientations(gpu, lt)?;
    checks.extend(check_moe_layer(gpu)?);
    Ok(checks)
}

/// One operand set of a problem on the device: f32 values, and the c it
/// starts from (a grouped call adds into it when accumulating).
struct Case {
    a: CudaSlice<f32>,
    b: CudaSlice<f32>,
    c0: Vec<f32>,
    shape: (usize, usize, usize),
}

fn check_orientations(gpu: &Gpu, lt: &GroupedLt) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    // (name, a transposed, b transposed, accumulate, shapes (m, n, k)):
    // the expert layers' forward (x @ wᵀ), input gradient (dy @ w) and
    // weight gradient (dyᵀ @ x, K over an expert's rows).
    type Orientation = (&'static str, bool, bool, bool, [(usize, usize, usize); 3]);
    let orientations: [Orientation; 3] = [
        (
            "x @ wT",
            false,
            true,
            false,
            [(1, 64, 128), (37, 96, 128), (300, 64, 128)],
        ),
        (
            "dy @ w",
            false,
            false,
            false,
            [(1, 64, 96), (37, 64, 96), (300, 64, 96)],
        ),
        (
            "dyT @ x (+=)",
            true,
            false,
            true,
            [(64, 32, 1), (64, 32, 37), (64, 32, 300)],
        ),
    ];
    for (name, a_t, b_t, accumulate, shapes) in orientations {
        let mut seed = 700;
        let mut next = || {
            seed += 1;
            seed
        };
        let cases: Vec<Case> = shapes
            .iter()
            .map(|&(m, n, k)| {
                Ok(Case {
                    a: gpu.upload(&random(m * k, next()))?,
                    b: gpu.upload(&random(k * n, next()))?,
                    c0: random(m * n, next()),
                    shape: (m, n, k),
                })
            })
            .collect::<Result<_>>()?;
        // The loop: one bf16 GEMM per problem.
        let mut want = Vec::new();
        for case in &cases {
            let mut c = gpu.upload(&case.c0)?;
            matmul::gemm(
                gpu,
                Arithmetic::Bf16,
                &mut c.slice_mut(..),
                &case.a,
                a_t,
                &case.b,
                b_t,
                case.shape,
                accumulate,
            )?;
            want.push(gpu.download(&c)?);
        }
        // The same problems in one grouped call.
        let rounded: Vec<(Prepared, Prepared)> = cases
            .iter()
            .map(|case| {
                Ok((
                    Prepared::of(gpu, Arithmetic::Bf16, &case.a)?,
                    Prepared::of(gpu, Arithmetic::Bf16, &case.b)?,
                ))
            })
            .collect::<Result<_>>()?;
        let mut outputs: Vec<CudaSlice<f32>> = cases
            .iter()
            .map(|case| gpu.upload(&case.c0))
            .collect::<Result<_>>()?;
        {
            let stream = gpu.stream();
            let mut guards = Vec::new();
            let mut problems = Vec::new();
            for ((case, (a, b)), c) in cases.iter().zip(&rounded).zip(&mut outputs) {
                let (a_at, a_guard) = a.rounded().device_ptr(stream);
                let (b_at, b_guard) = b.rounded().device_ptr(stream);
                let (c_at, c_guard) = c.device_ptr_mut(stream);
                guards.push((a_guard, b_guard, c_guard));
                let (m, n, k) = case.shape;
                problems.push(Problem {
                    c: c_at,
                    a: a_at,
                    b: b_at,
                    m,
                    n,
                    k,
                });
            }
            assert!(grouped_gemm::aligned(&problems, a_t, b_t));
            // SAFETY: every buffer is live until after the download below.
            unsafe { grouped_gemm::gemm_bf16(gpu, lt, &problems, a_t, b_t, accumulate) }?;
        }
        for ((case, out), want) in cases.iter().zip(&outputs).zip(&want) {
            let (m, n, k) = case.shape;
            checks.push(close_to_scale(
                "grouped_gemm.bf16",
                &format!("{name} {m}x{n}x{k} of {} in one call", cases.len()),
                &gpu.download(out)?,
                want,
                1e-5,
            ));
        }
    }
    Ok(checks)
}

/// The layer's outputs and gradients in `arithmetic`.
fn layer_pass(
    gpu: &Gpu,
    arithmetic: Arithmetic<'_>,
    device: &DeviceMoeLayer,
    x: &[f32],
    dout: &[f32],
    seq_len: usize,
) -> Result<Vec<(&'static str, Vec<f32>)>> {
    let x_d = gpu.upload(x)?;
    let sequences = Sequences::whole(x.len() / device.config.hidden, seq_len);
    let forward = device.forward(gpu, arithmetic, &x_d, &sequences, None)?;
    let mut dx = gpu.zeros::<f32>(x.len())?;
    let mut grads = DeviceMoeGrads::zeros(gpu, device)?;
    device.backward(
        gpu,
        arithmetic,
        &forward,
        &x_d,
        &gpu.upload(dout)?,
        &mut dx,
        &mut grads,
    )?;
    Ok(vec![
        ("output", gpu.download(&forward.output)?),
        ("dx", gpu.download(&dx)?),
        ("experts_w1", gpu.download(&grads.w1)?),
        ("experts_w3", gpu.download(&grads.w3)?),
        ("experts_w2", gpu.download(&grads.w2)?),
        ("router", gpu.download(&grads.router)?),
    ])
}

/// [`layer_pass`] with the grouped GEMMs on or off and `streams` expert
/// streams, the GPU's settings restored after.
#[allow(clippy::too_many_arguments)]
fn layer_pass_with(
    gpu: &Gpu,
    arithmetic: Arithmetic<'_>,
    device: &DeviceMoeLayer,
    x: &[f32],
    dout: &[f32],
    seq_len: usize,
    grouped: bool,
    streams: usize,
) -> Result<Vec<(&'static str, Vec<f32>)>> {
    let (grouped_before, streams_before) = (
        gpu.set_grouped_gemm(grouped),
        gpu.set_expert_streams(streams),
    );
    let result = layer_pass(gpu, arithmetic, device, x, dout, seq_len);
    gpu.set_grouped_gemm(grouped_before);
    gpu.set_expert_streams(streams_before);
    result
}

/// The deepseek-style check layer (16 experts of 32, top-4, hidden 64)
/// with uneven loads and an empty expert, as the TF32 layer check.
fn skewed_layer(gpu: &Gpu, seed: u64) -> Result<(MoeLayer<f32>, DeviceMoeLayer)> {
    let config = deepseek_style_config();
    let params = MoeParams::random(&config, &mut SplitMix64::new(seed), 0.1);
    let mut layer = MoeLayer::new(config.clone(), params).expect("valid layer");
    let last = config.n_routed_experts - 1;
    layer.selection_bias[0] = 0.3;
    layer.selection_bias[last] = -10.0;
    let device = DeviceMoeLayer::upload(gpu, &layer)?;
    Ok((layer, device))
}

pub fn check_expert_streams(gpu: &Gpu) -> Result<Vec<Check>> {
    let (layer, device) = skewed_layer(gpu, 730)?;
    let hidden = layer.config().hidden;
    // 1024 tokens × top-4: enough rows for the loop to fan out.
    let (seq_len, tokens) = (256, 1024);
    assert!(tokens * layer.config().top_k >= super::lanes::MIN_ROWS);
    let x = random(tokens * hidden, 731);
    let dout = random(tokens * hidden, 732);
    let mut checks = Vec::new();
    for (name, arithmetic) in [("tf32", Arithmetic::Tf32), ("bf16", Arithmetic::Bf16)] {
        let main = layer_pass_with(gpu, arithmetic, &device, &x, &dout, seq_len, false, 1)?;
        // The baseline: the kernels sum in fixed orders and cuBLASLt runs a
        // cached algorithm, so one stream twice gives the same bits. Were it
        // not so, a difference below would not be a missing wait.
        let again = layer_pass_with(gpu, arithmetic, &device, &x, &dout, seq_len, false, 1)?;
        for ((what, got), (_, want)) in again.iter().zip(&main) {
            checks.push(exact(
                "expert_streams.baseline",
                &format!("{name} {what}, 1 stream twice"),
                &bits(got),
                &bits(want),
            ));
        }
        for run in 1..=2 {
            let lanes = layer_pass_with(gpu, arithmetic, &device, &x, &dout, seq_len, false, 4)?;
            for ((what, got), (_, want)) in lanes.iter().zip(&main) {
                checks.push(exact(
                    "expert_streams.moe_layer",
                    &format!("{name} {what}, 4 streams vs 1, run {run}"),
                    &bits(got),
                    &bits(want),
                ));
            }
        }
    }
    Ok(checks)
}

fn check_moe_layer(gpu: &Gpu) -> Result<Vec<Check>> {
    let (layer, device) = skewed_layer(gpu, 720)?;
    let hidden = layer.config().hidden;
    let (seq_len, tokens) = (16, 64);
    let x = random(tokens * hidden, 721);
    let dout = random(tokens * hidden, 722);
    let bf16 = Arithmetic::Bf16;
    let looped = layer_pass_with(gpu, bf16, &device, &x, &dout, seq_len, false, 1)?;
    let grouped = layer_pass_with(gpu, bf16, &device, &x, &dout, seq_len, true, 1)?;
    Ok(grouped
        .iter()
        .zip(&looped)
        .map(|((name, got), (_, want))| {
            close_to_scale(
                "grouped_gemm.moe_layer",
                &format!("bf16 E16 k4 {name} vs per-expert loop"),
                got,
                want,
                1e-2,
            )
        })
        .collect())
}
