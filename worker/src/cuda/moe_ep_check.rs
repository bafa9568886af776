//! The check group "expert parallel": the training MoE layer split over an
//! expert-parallel group on the device ([`super::moe_ep`]) against the CPU's
//! single-process layer, forward and backward.
//!
//! Two ranks run in this process, each on its own thread with its own
//! tokens (different counts, so the exchanges are uneven) and half the
//! routed experts, over a loopback TCP world (rows staged through host
//! memory, as ranks sharing one GPU exchange them); then one rank over an
//! NCCL world of one (the device-to-device path, every row sent to itself).
//! The reference is independent of the CPU's expert-parallel code: the
//! whole layer on each rank's tokens alone gives that rank's output, input
//! gradient, router and shared-expert gradients and expert loads; an
//! expert's weight gradient is the sum over the ranks' tokens, so rank
//! `q`'s share is the sum of every rank's whole-layer gradient over `q`'s
//! experts. The device's expert GEMMs are TF32 against the CPU's exact f32:
//! the bounds are the single-rank layer check's.

use std::ops::Range;
use std::time::Duration;

use super::check::{Check, close_to_scale, deepseek_style_config, exact, moe_config};
use super::matmul::Arithmetic;
use super::moe_layer::{DeviceMoeGrads, DeviceMoeLayer};
use super::serve_ep::DeviceExchange;
use super::serve_replica_check::{loopback_world, on_rank_threads};
use super::{Gpu, GpuError, Result};
use crate::dist::expert_parallel::ExpertParallel;
use crate::dist::nccl::NcclCollective;
use crate::dist::{Collective, Solo};
use crate::moe::Sequences;
use crate::moe::config::ScoreFunction;
use crate::moe::layer::MoeLayer;
use crate::moe::params::MoeParams;
use crate::rng::SplitMix64;

const SEQ_LEN: usize = 16;

/// What one rank computed, downloaded.
struct RankResult {
    output: Vec<f32>,
    load: Vec<usize>,
    aux_loss: f64,
    dx: Vec<f32>,
    grads: [Vec<f32>; 7],
}

/// Names of [`RankResult::grads`], in [`grads_of`]'s order.
const GRADS: [&str; 7] = [
    "router",
    "experts_w1",
    "experts_w3",
    "experts_w2",
    "shared_w1",
    "shared_w3",
    "shared_w2",
];

fn grads_of(p: &MoeParams<f32>) -> [&Vec<f32>; 7] {
    [
        &p.router,
        &p.experts_w1,
        &p.experts_w3,
        &p.experts_w2,
        &p.shared_w1,
        &p.shared_w3,
        &p.shared_w2,
    ]
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    SplitMix64::new(seed).normal_vec(n, 1.0)
}

/// `layer` holding only routed experts `experts`: what a rank uploads.
fn share_of(layer: &MoeLayer<f32>, experts: &Range<usize>) -> MoeLayer<f32> {
    let mut share = layer.clone();
    share.params.keep_experts(layer.config(), experts.clone());
    share
}

/// The layers checked: DeepSeek-style routing with a shared expert and
/// uneven loads (an empty expert), and softmax routing with the
/// sequence-wise balance loss.
fn layers() -> Vec<(&'static str, MoeLayer<f32>)> {
    let deepseek = deepseek_style_config();
    let mut balanced = moe_config(8, 2, ScoreFunction::Softmax, None, false, 1.0);
    balanced.aux_loss_alpha = 0.01;
    [
        ("sigmoid E16 k4 g4/2 +shared", deepseek),
        ("softmax E8 k2 +balance loss", balanced),
    ]
    .into_iter()
    .map(|(name, config)| {
        let params = MoeParams::random(&config, &mut SplitMix64::new(95), 0.1);
        let mut layer = MoeLayer::new(config.clone(), params).expect("a valid layer");
        // Expert 0 favoured, the last never chosen: uneven loads, an empty expert.
        let last = config.n_routed_experts - 1;
        layer.selection_bias[0] = 0.3;
        layer.selection_bias[last] = -10.0;
        (name, layer)
    })
    .collect()
}

pub fn check_expert_parallel(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for (name, layer) in layers() {
        // Rank 0: 4 sequences, rank 1: 3.
        let tokens = [4 * SEQ_LEN, 3 * SEQ_LEN];
        let worlds = loopback_world(tokens.len())
            .map_err(|e| GpuError::Unsupported(e.to_string()))?
            .into_iter()
            .map(|w| Box::new(w) as Box<dyn Collective + Send>)
            .collect();
        checks.extend(check_over(
            gpu,
            &format!("{name}, 2 ranks over TCP"),
            &layer,
            &tokens,
            worlds,
        )?);
        let nccl = NcclCollective::single(gpu.context(), Duration::from_secs(60))
            .map_err(|e| GpuError::Unsupported(e.to_string()))?;
        checks.extend(check_over(
            gpu,
            &format!("{name}, 1 rank over NCCL"),
            &layer,
            &[4 * SEQ_LEN],
            vec![Box::new(nccl)],
        )?);
    }
    Ok(checks)
}

/// Every rank of `worlds` (rank order) on its own thread, `tokens[rank]`
/// tokens each, against the CPU layer.
fn check_over(
    gpu: &Gpu,
    case: &str,
    layer: &MoeLayer<f32>,
    tokens: &[usize],
    worlds: Vec<Box<dyn Collective + Send>>,
) -> Result<Vec<Check>> {
    let c = layer.config();
    let (hidden, experts, size) = (c.hidden, c.n_routed_experts, worlds.len());
    let per = experts / size;
    let xs: Vec<Vec<f32>> = (0..size)
        .map(|r| random(tokens[r] * hidden, 100 + r as u64))
        .collect();
    let douts: Vec<Vec<f32>> = (0..size)
        .map(|r| random(tokens[r] * hidden, 200 + r as u64))
        .collect();
    // dx from a non-zero start, to check that it adds.
    let dx0s: Vec<Vec<f32>> = (0..size)
        .map(|r| random(tokens[r] * hidden, 300 + r as u64))
        .collect();

    let run_rank = |rank: usize, world: Box<dyn Collective + Send>| {
        let run = || -> std::result::Result<RankResult, String> {
            let text = |e: &dyn std::fmt::Display| e.to_string();
            let ep = ExpertParallel::new(world, Box::new(Solo), experts).map_err(|e| text(&e))?;
            let mut exchange = DeviceExchange::new(ep);
            let own = rank * per..(rank + 1) * per;
            let device =
                DeviceMoeLayer::upload(gpu, &share_of(layer, &own)).map_err(|e| text(&e))?;
            let x = gpu.upload(&xs[rank]).map_err(|e| text(&e))?;
            let sequences = Sequences::whole(xs[rank].len() / layer.config().hidden, SEQ_LEN);
            let pass = device
                .forward_expert_parallel(gpu, Arithmetic::Tf32, &x, &sequences, None, &mut exchange)
                .map_err(|e| text(&e))?;
            let mut dx = gpu.upload(&dx0s[rank]).map_err(|e| text(&e))?;
            let dout = gpu.upload(&douts[rank]).map_err(|e| text(&e))?;
            let mut grads = DeviceMoeGrads::zeros(gpu, &device).map_err(|e| text(&e))?;
            device
                .backward_expert_parallel(
                    gpu,
                    Arithmetic::Tf32,
                    &pass,
                    &x,
                    &dout,
                    &mut dx,
                    &mut grads,
                    &mut exchange,
                )
                .map_err(|e| text(&e))?;
            exchange.take_failure().map_err(|e| text(&e))?;
            let down = |t| gpu.download(t).map_err(|e| text(&e));
            Ok(RankResult {
                output: down(&pass.output)?,
                load: pass.expert_load().to_vec(),
                aux_loss: pass.aux_loss,
                dx: down(&dx)?,
                grads: [
                    down(&grads.router)?,
                    down(&grads.w1)?,
                    down(&grads.w3)?,
                    down(&grads.w2)?,
                    down(&grads.shared_w1)?,
                    down(&grads.shared_w3)?,
                    down(&grads.shared_w2)?,
                ],
            })
        };
        run()
    };
    let results = on_rank_threads(worlds, &run_rank);

    // The reference: the whole layer on each rank's tokens.
    let cpu: Vec<_> = (0..size)
        .map(|r| {
            let pass = layer.forward(&xs[r], SEQ_LEN);
            let mut dx = dx0s[r].clone();
            let mut grads = MoeParams::zeros(c);
            layer.backward(&pass, &xs[r], &douts[r], &mut dx, &mut grads);
            (pass, dx, grads)
        })
        .collect();
    let expert_size = c.expert_hidden * hidden;
    let mut checks = Vec::new();
    for (rank, result) in results.into_iter().enumerate() {
        let case = format!("{case}, rank {rank}");
        let got = match result {
            Ok(got) => got,
            Err(error) => {
                checks.push(Check {
                    op: "expert_parallel.run",
                    case,
                    passed: false,
                    error,
                    bound: "-".into(),
                });
                continue;
            }
        };
        let (pass, dx, grads) = &cpu[rank];
        checks.push(exact(
            "expert_parallel.load",
            &case,
            &got.load,
            &pass.expert_load(),
        ));
        checks.push(close_to_scale(
            "expert_parallel.aux_loss",
            &case,
            &[got.aux_loss as f32],
            &[pass.aux_loss],
            1e-5,
        ));
        checks.push(close_to_scale(
            "expert_parallel.output",
            &case,
            &got.output,
            &pass.output,
            1e-2,
        ));
        checks.push(close_to_scale(
            "expert_parallel.dx",
            &case,
            &got.dx,
            dx,
            1e-2,
        ));
        let own = rank * per * expert_size..(rank + 1) * per * expert_size;
        for (i, (name, device)) in GRADS.iter().zip(&got.grads).enumerate() {
            let expected: Vec<f32> = if name.starts_with("experts_") {
                // Every rank's rows reached this rank's experts.
                let mut sum = vec![0.0f32; own.len()];
                for (_, _, g) in &cpu {
                    for (s, v) in sum.iter_mut().zip(&grads_of(g)[i][own.clone()]) {
                        *s += v;
                    }
                }
                sum
            } else {
                grads_of(grads)[i].clone()
            };
            checks.push(close_to_scale(
                "expert_parallel.grad",
                &format!("{case}: {name}"),
                device,
                &expected,
                1e-2,
            ));
        }
    }
    Ok(checks)
}
