//! Routing on the device; CPU reference: [`crate::moe::routing::route`]. One
//! fused kernel: scores, biased group-limited top-k and gates, one warp per
//! token.

use super::{Gpu, Result, grid, int};
use crate::moe::config::{MoeConfig, ScoreFunction};
use moe_kernels::cudarc::driver::{CudaSlice, PushKernelArg};
use moe_kernels::registry::ROUTER;

/// Tokens (warps) per block.
const WARPS: usize = 4;

/// [`crate::moe::routing::Routing`] on the device; experts as `i32`.
pub struct DeviceRouting {
    pub n_experts: usize,
    pub top_k: usize,
    /// `[tokens, n_experts]`, unbiased.
    pub scores: CudaSlice<f32>,
    /// `[tokens, top_k]`, best first.
    pub experts: CudaSlice<i32>,
    /// `[tokens, top_k]`.
    pub gates: CudaSlice<f32>,
}

impl DeviceRouting {
    pub fn tokens(&self) -> usize {
        self.experts.len() / self.top_k
    }
}

/// As [`crate::moe::routing::route`]: `logits: [tokens, n_routed_experts]`,
/// `selection_bias: [n_routed_experts]`.
pub fn route(
    gpu: &Gpu,
    config: &MoeConfig,
    logits: &CudaSlice<f32>,
    selection_bias: &CudaSlice<f32>,
) -> Result<DeviceRouting> {
    let n_experts = config.n_routed_experts;
    let top_k = config.top_k;
    assert_eq!(selection_bias.len(), n_experts, "selection bias shape");
    assert_eq!(logits.len() % n_experts, 0, "router logits shape");
    assert!(top_k <= n_experts, "top_k exceeds the experts");
    let tokens = logits.len() / n_experts;
    let (n_groups, top_groups) = config
        .group_limit
        .map_or((1, 1), |limit| (limit.n_groups, limit.top_groups));
    // Lane g scores group g, and the group mask is one 32-bit word.
    assert!(
        n_groups <= 32,
        "group-limited routing supports at most 32 groups"
    );
    let shared = WARPS * n_experts * std::mem::size_of::<f32>();
    assert!(
        shared <= 48 * 1024,
        "too many experts for one block's shared memory"
    );
    // The kernel writes every score, expert and gate of every token.
    let mut routing = DeviceRouting {
        n_experts,
        top_k,
        scores: gpu.output(tokens * n_experts)?,
        experts: gpu.output(tokens * top_k)?,
        gates: gpu.output(tokens * top_k)?,
    };
    if tokens == 0 {
        return Ok(routing);
    }
    let f = gpu.function(&ROUTER, "router_topk_f32")?;
    let sigmoid = i32::from(config.score_function == ScoreFunction::Sigmoid);
    let normalize = i32::from(config.normalizes_gates());
    let scaling = config.routed_scaling_factor as f32;
    let (tokens_i, experts_i, k_i, groups_i, top_groups_i) = (
        int(tokens),
        int(n_experts),
        int(top_k),
        int(n_groups),
        int(top_groups),
    );
    let mut launch = gpu.stream().launch_builder(&f);
    launch
        .arg(&mut routing.scores)
        .arg(&mut routing.experts)
        .arg(&mut routing.gates)
        .arg(logits)
        .arg(selection_bias)
        .arg(&tokens_i)
        .arg(&experts_i)
        .arg(&k_i)
        .arg(&sigmoid)
        .arg(&groups_i)
        .arg(&top_groups_i)
        .arg(&normalize)
        .arg(&scaling);
    let config = grid(tokens.div_ceil(WARPS), (WARPS * 32) as u32, shared as u32);
    unsafe { launch.launch(config) }?;
    Ok(routing)
}

/// The routing backward: d loss / d gates → d loss / d logits (overwritten),
/// as [`crate::moe::routing::gates_backward`] then
/// [`crate::moe::routing::scores_backward`], fused. The sequence-wise
/// balance loss's gradient is added by the layer after it
/// ([`super::moe_layer`]).
pub fn backward(
    gpu: &Gpu,
    config: &MoeConfig,
    dlogits: &mut CudaSlice<f32>,
    dgates: &CudaSlice<f32>,
    routing: &DeviceRouting,
) -> Result<()> {
    let tokens = routing.tokens();
    assert!(
        dlogits.len() == routing.scores.len() && dgates.len() == routing.gates.len(),
        "routing gradient shapes"
    );
    if tokens == 0 {
        return Ok(());
    }
    let f = gpu.function(&ROUTER, "router_backward_f32")?;
    let sigmoid = i32::from(config.score_function == ScoreFunction::Sigmoid);
    let normalize = i32::from(config.normalizes_gates());
    let scaling = config.routed_scaling_factor as f32;
    let (tokens_i, experts_i, k_i) = (int(tokens), int(routing.n_experts), int(routing.top_k));
    let mut launch = gpu.stream().launch_builder(&f);
    launch
        .arg(dlogits)
        .arg(dgates)
        .arg(&routing.scores)
        .arg(&routing.experts)
        .arg(&tokens_i)
        .arg(&experts_i)
        .arg(&k_i)
        .arg(&sigmoid)
        .arg(&normalize)
        .arg(&scaling);
    unsafe { launch.launch(grid(tokens.div_ceil(WARPS), (WARPS * 32) as u32, 0)) }?;
    Ok(())
}
