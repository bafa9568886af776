//! GPU benchmarks, each reported with its ratio to a baseline measured in
//! the same run (the machines are shared; a ratio travels, a bare figure
//! does not): GEMM throughput against cuBLASLt's dense bf16 GEMM, and the
//! memory-bound MoE kernels against a device-to-device copy.
//!
//! Bandwidth counts the bytes each kernel reads and writes as issued (a
//! token row permuted to k experts is read k times), over the measured time.

use super::{Gpu, Result, dispatch, fp8, matmul, routing};
use crate::fp8::quantize::TileShape;
use crate::moe::config::{GroupLimit, MoeConfig, ScoreFunction};
use half::bf16;
use moe_kernels::cudarc::driver::CudaSlice;
use moe_kernels::cudarc::driver::sys::CUevent_flags;

/// H200 SXM datasheet figures, for context next to the measured baselines.
pub const H200_HBM_BYTES_PER_S: f64 = 4.8e12;
pub const H200_BF16_DENSE_FLOPS: f64 = 989e12;

/// One measured figure.
#[derive(Clone, Debug, PartialEq)]
pub struct Figure {
    pub name: String,
    /// Milliseconds per run (mean over the timed runs).
    pub ms: f64,
    pub value: f64,
    pub unit: &'static str,
    /// `value` over the same-run baseline's, with the baseline's name.
    pub ratio: Option<(String, f64)>,
    /// `value` over the datasheet's figure.
    pub of_datasheet: Option<f64>,
}

/// Mean milliseconds of `f` over `runs` runs after three warm-ups, by CUDA events.
pub fn time_ms(gpu: &Gpu, runs: usize, f: impl FnMut() -> Result<()>) -> Result<f64> {
    time_runs(gpu, 3, runs, f)
}

/// Mean milliseconds of `f` over `runs` runs after `warmups`, by CUDA events.
pub fn time_runs(
    gpu: &Gpu,
    warmups: usize,
    runs: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warmups {
        f()?;
    }
    let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let start = gpu.stream().record_event(flags)?;
    for _ in 0..runs {
        f()?;
    }
    let end = gpu.stream().record_event(flags)?;
    end.synchronize()?;
    Ok(f64::from(start.elapsed_ms(&end)?) / runs as f64)
}

/// Uniform values in [-1, 1) from a fast generator (benchmark data only).
pub(crate) fn random_f32(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect()
}

fn upload_random_bf16(gpu: &Gpu, n: usize, seed: u64) -> Result<CudaSlice<bf16>> {
    let values: Vec<bf16> = random_f32(n, seed)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    gpu.upload(&values)
}

/// Runs every benchmark; figures in the order printed, and the benchmarks
/// that failed with their errors.
pub fn run_all(gpu: &Gpu) -> Result<(Vec<Figure>, Vec<String>)> {
    let mut figures = Vec::new();
    let mut failures = Vec::new();

    // Baseline 1: device-to-device copy of 2 GiB.
    let n = 1usize << 29;
    let src = gpu.zeros::<f32>(n)?;
    let mut dst = gpu.output::<f32>(n)?;
    let copy_ms = time_ms(gpu, 10, || Ok(gpu.stream().memcpy_dtod(&src, &mut dst)?))?;
    drop((src, dst));
    let copy_bw = 2.0 * (n * 4) as f64 / (copy_ms * 1e-3);
    figures.push(Figure {
        name: "copy d2d 2 GiB (baseline)".into(),
        ms: copy_ms,
        value: copy_bw / 1e9,
        unit: "GB/s",
        ratio: None,
        of_datasheet: Some(copy_bw / H200_HBM_BYTES_PER_S),
    });

    // Baseline 2: cuBLASLt dense bf16 GEMM 8192^3.
    let s = 8192;
    let (x, w) = (
        upload_random_bf16(gpu, s * s, 1)?,
        upload_random_bf16(gpu, s * s, 2)?,
    );
    let mut out = gpu.output::<bf16>(s * s)?;
    let dense_ms = time_ms(gpu, 10, || {
        matmul::forward_grouped_bf16(gpu, &mut out, &x, &w, 1, s, s)
    })?;
    drop((x, w, out));
    let dense = 2.0 * (s * s * s) as f64 / (dense_ms * 1e-3);
    figures.push(Figure {
        name: "cuBLASLt bf16 GEMM 8192^3 (baseline)".into(),
        ms: dense_ms,
        value: dense / 1e12,
        unit: "TFLOP/s",
        ratio: None,
        of_datasheet: Some(dense / H200_BF16_DENSE_FLOPS),
    });

    // Grouped expert GEMM, DeepGEMM's shape: 4 groups x 8192 rows, N 4096, K 7168.
    let (groups, rows, n_out, k) = (4, 8192, 4096, 7168);
    let x = upload_random_bf16(gpu, groups * rows * k, 3)?;
    let w = upload_random_bf16(gpu, groups * n_out * k, 4)?;
    let mut out = gpu.output::<bf16>(groups * rows * n_out)?;
    let grouped_ms = time_ms(gpu, 10, || {
        matmul::forward_grouped_bf16(gpu, &mut out, &x, &w, groups, k, n_out)
    })?;
    drop((x, w, out));
    let grouped = 2.0 * (groups * rows * n_out * k) as f64 / (grouped_ms * 1e-3);
    figures.push(Figure {
        name: "cuBLASLt bf16 grouped GEMM 4x8192 N4096 K7168".into(),
        ms: grouped_ms,
        value: grouped / 1e12,
        unit: "TFLOP/s",
        ratio: Some(("dense GEMM".into(), grouped / dense)),
        of_datasheet: Some(grouped / H200_BF16_DENSE_FLOPS),
    });

    // These may meet an unsupported configuration (cuBLASLt's FP8 block
    // scales need CUDA 12.9+ on Hopper): report it and go on.
    match fp8_gemm_figures(gpu, dense) {
        Ok(f) => figures.extend(f),
        Err(error) => failures.push(format!("fp8 grouped GEMM: {error}")),
    }
    match routing_figures(gpu, copy_bw) {
        Ok(f) => figures.extend(f),
        Err(error) => failures.push(format!("routing/dispatch: {error}")),
    }

    match super::train_bench::training_step_figures(gpu, dense) {
        Ok((f, failed)) => {
            figures.extend(f);
            failures.extend(failed);
        }
        Err(error) => failures.push(format!("training step: {error}")),
    }

    // FP8 1x128 quantisation of a [16384, 7168] f32 activation.
    let (rows, cols) = (16_384, 7168);
    let m = gpu.upload(&random_f32(rows * cols, 5))?;
    let quant_ms = time_ms(gpu, 10, || {
        fp8::quantize(gpu, &m, rows, cols, TileShape::ROW).map(drop)
    })?;
    let bytes = (rows * cols * 5 + rows * cols.div_ceil(128) * 4) as f64;
    figures.push(bandwidth(
        "fp8 quantize 1x128 [16384, 7168] f32",
        quant_ms,
        bytes,
        copy_bw,
    ));
    Ok((figures, failures))
}

fn bandwidth(name: &str, ms: f64, bytes: f64, copy_bw: f64) -> Figure {
    let bw = bytes / (ms * 1e-3);
    Figure {
        name: name.into(),
        ms,
        value: bw / 1e9,
        unit: "GB/s",
        ratio: Some(("copy".into(), bw / copy_bw)),
        of_datasheet: Some(bw / H200_HBM_BYTES_PER_S),
    }
}

/// Router + dispatch + permute + unpermute on DeepSeek-V3's shapes: hidden
/// 7168 (bf16 rows), 256 experts, top-8, groups 8/4, 4096 tokens.
fn routing_figures(gpu: &Gpu, copy_bw: f64) -> Result<Vec<Figure>> {
    let (tokens, experts, top_k, hidden) = (4096, 256, 8, 7168);
    let config = MoeConfig {
        hidden,
        n_routed_experts: experts,
        expert_hidden: 2048,
        n_shared_experts: 1,
        shared_expert_hidden: 2048,
        top_k,
        score_function: ScoreFunction::Sigmoid,
        group_limit: Some(GroupLimit {
            n_groups: 8,
            top_groups: 4,
        }),
        normalize_gates: true,
        routed_scaling_factor: 2.5,
        aux_loss_alpha: 0.0,
    };
    let rows = tokens * top_k;
    let row_bytes = hidden * 2;
    let logits = gpu.upload(&random_f32(tokens * experts, 6))?;
    let bias = gpu.upload(
        &random_f32(experts, 7)
            .iter()
            .map(|b| 0.01 * b)
            .collect::<Vec<_>>(),
    )?;
    let x = upload_random_bf16(gpu, tokens * hidden, 8)?;
    let mut xp = gpu.output::<bf16>(rows * hidden)?;
    let mut out = gpu.output::<bf16>(tokens * hidden)?;

    let routed = routing::route(gpu, &config, &logits, &bias)?;
    let dispatched = dispatch::dispatch(gpu, &routed.experts, top_k, experts)?;
    let router_ms = time_ms(gpu, 20, || {
        routing::route(gpu, &config, &logits, &bias).map(drop)
    })?;
    let dispatch_ms = time_ms(gpu, 20, || {
        dispatch::dispatch(gpu, &routed.experts, top_k, experts).map(drop)
    })?;
    let permute_ms = time_ms(gpu, 20, || {
        dispatch::permute(gpu, &mut xp, &x, &dispatched, hidden)
    })?;
    // The permuted rows stand in for the expert outputs.
    let unpermute_ms = time_ms(gpu, 20, || {
        dispatch::unpermute_bf16(gpu, &mut out, &xp, &routed.gates, &dispatched, hidden)
    })?;
    let all_ms = time_ms(gpu, 20, || {
        let routed = routing::route(gpu, &config, &logits, &bias)?;
        let dispatched = dispatch::dispatch(gpu, &routed.experts, top_k, experts)?;
        dispatch::permute(gpu, &mut xp, &x, &dispatched, hidden)?;
        dispatch::unpermute_bf16(gpu, &mut out, &xp, &routed.gates, &dispatched, hidden)
    })?;

    let router_bytes = (2 * tokens * experts * 4 + rows * 8) as f64;
    let dispatch_bytes = (3 * rows * 4 + 2 * rows * 4) as f64;
    let permute_bytes = (2 * rows * row_bytes + rows * 4) as f64;
    let unpermute_bytes = (rows * row_bytes + tokens * row_bytes + rows * 8) as f64;
    let all_bytes = router_bytes + dispatch_bytes + permute_bytes + unpermute_bytes;
    Ok(vec![
        bandwidth(
            "router top-8 of 256, groups 8/4, 4096 tok",
            router_ms,
            router_bytes,
            copy_bw,
        ),
        bandwidth(
            "dispatch (count, scan, scatter)",
            dispatch_ms,
            dispatch_bytes,
            copy_bw,
        ),
        bandwidth(
            "permute bf16 hidden 7168 -> 32768 rows",
            permute_ms,
            permute_bytes,
            copy_bw,
        ),
        bandwidth(
            "unpermute+combine bf16 -> 4096 tok",
            unpermute_ms,
            unpermute_bytes,
            copy_bw,
        ),
        bandwidth(
            "router+dispatch+permute+unpermute",
            all_ms,
            all_bytes,
            copy_bw,
        ),
    ])
}

/// The grouped expert GEMM in FP8 (cuBLASLt block scales, bf16 output) on
/// DeepGEMM's shape, operands quantised once beforehand; and the
/// quantisation itself.
fn fp8_gemm_figures(gpu: &Gpu, dense_flops: f64) -> Result<Vec<Figure>> {
    let (groups, rows, n_out, k) = (4, 8192, 4096, 7168);
    let mut xs = Vec::new();
    let mut ws = Vec::new();
    for g in 0..groups {
        let x = gpu.upload(&random_f32(rows * k, 10 + g as u64))?;
        let w = gpu.upload(&random_f32(n_out * k, 20 + g as u64))?;
        let layout = fp8::ScaleLayout::Cublaslt;
        xs.push(fp8::quantize_with_layout(
            gpu,
            &x,
            rows,
            k,
            TileShape::ROW,
            layout,
        )?);
        ws.push(fp8::quantize_with_layout(
            gpu,
            &w,
            n_out,
            k,
            TileShape::BLOCK,
            layout,
        )?);
    }
    let mut outs = (0..groups)
        .map(|_| gpu.output::<bf16>(rows * n_out))
        .collect::<Result<Vec<_>>>()?;
    let ms = time_ms(gpu, 10, || {
        for ((out, x), w) in outs.iter_mut().zip(&xs).zip(&ws) {
            super::fp8_gemm::gemm_abt(gpu, out, x, w)?;
        }
        Ok(())
    })?;
    let flops = 2.0 * (groups * rows * n_out * k) as f64 / (ms * 1e-3);
    Ok(vec![Figure {
        name: "cuBLASLt fp8 block-scaled grouped GEMM 4x8192 N4096 K7168".into(),
        ms,
        value: flops / 1e12,
        unit: "TFLOP/s",
        ratio: Some(("dense bf16 GEMM".into(), flops / dense_flops)),
        of_datasheet: Some(flops / (2.0 * H200_BF16_DENSE_FLOPS)),
    }])
}
