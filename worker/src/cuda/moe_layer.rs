//! The MoE feed-forward layer's forward pass on the device; CPU reference:
//! [`crate::moe::layer::MoeLayer::forward`]. Router GEMM → fused routing
//! kernel → dispatch (counting sort) → permute → each expert's SwiGLU MLP on
//! its contiguous segment of rows (cuBLASLt, TF32) → unpermute with the gates
//! → plus the shared experts. Dropless: every routed row is computed.

use super::{Gpu, Result, dispatch, matmul, routing, swiglu};
use crate::moe::config::MoeConfig;
use crate::moe::layer::MoeLayer;
use moe_kernels::cudarc::driver::CudaSlice;

/// A layer's weights and selection bias on the device.
pub struct DeviceMoeLayer {
    pub config: MoeConfig,
    router: CudaSlice<f32>,
    w1: CudaSlice<f32>,
    w3: CudaSlice<f32>,
    w2: CudaSlice<f32>,
    shared_w1: CudaSlice<f32>,
    shared_w3: CudaSlice<f32>,
    shared_w2: CudaSlice<f32>,
    selection_bias: CudaSlice<f32>,
}

/// The forward pass's output and what a backward pass will need.
pub struct DeviceMoeForward {
    /// `[tokens, hidden]`.
    pub output: CudaSlice<f32>,
    pub routing: routing::DeviceRouting,
    pub dispatch: dispatch::DeviceDispatch,
    /// Rows per expert, read back once per pass to size the expert GEMMs.
    pub load: Vec<usize>,
    /// Expert-major activations, `[tokens * top_k, ...]`.
    pub permuted: CudaSlice<f32>,
    pub a: CudaSlice<f32>,
    pub b: CudaSlice<f32>,
    pub h: CudaSlice<f32>,
    pub expert_out: CudaSlice<f32>,
}

impl DeviceMoeLayer {
    pub fn upload(gpu: &Gpu, layer: &MoeLayer<f32>) -> Result<Self> {
        let p = &layer.params;
        Ok(Self {
            config: layer.config().clone(),
            router: gpu.upload(&p.router)?,
            w1: gpu.upload(&p.experts_w1)?,
            w3: gpu.upload(&p.experts_w3)?,
            w2: gpu.upload(&p.experts_w2)?,
            shared_w1: gpu.upload(&p.shared_w1)?,
            shared_w3: gpu.upload(&p.shared_w3)?,
            shared_w2: gpu.upload(&p.shared_w2)?,
            selection_bias: gpu.upload(&layer.selection_bias)?,
        })
    }

    /// Runs the layer on `x: [tokens, hidden]` (hidden a multiple of 4: rows
    /// are permuted as 16-byte vectors).
    pub fn forward(&self, gpu: &Gpu, x: &CudaSlice<f32>) -> Result<DeviceMoeForward> {
        let c = &self.config;
        let (hidden, inner, n_experts, top_k) =
            (c.hidden, c.expert_hidden, c.n_routed_experts, c.top_k);
        let tokens = x.len() / hidden;
        let rows = tokens * top_k;

        let mut logits = gpu.zeros::<f32>(tokens * n_experts)?;
        // Exact f32, as the CPU: a TF32 logit could flip a near-tie in top-k.
        matmul::forward_exact(gpu, &mut logits, x, &self.router, hidden, n_experts)?;
        let routing = routing::route(gpu, c, &logits, &self.selection_bias)?;
        let dispatch = dispatch::dispatch(gpu, &routing.experts, top_k, n_experts)?;
        let offsets: Vec<i32> = gpu.download(&dispatch.offsets)?;
        let load: Vec<usize> = offsets.windows(2).map(|w| (w[1] - w[0]) as usize).collect();

        let mut permuted = gpu.zeros::<f32>(rows * hidden)?;
        dispatch::permute(gpu, &mut permuted, x, &dispatch, hidden)?;
        let mut a = gpu.zeros::<f32>(rows * inner)?;
        let mut b = gpu.zeros::<f32>(rows * inner)?;
        let mut h = gpu.zeros::<f32>(rows * inner)?;
        let mut expert_out = gpu.zeros::<f32>(rows * hidden)?;
        let weights = inner * hidden;
        for (e, &start) in offsets.iter().take(n_experts).enumerate() {
            let (start, len) = (start as usize, load[e]);
            if len == 0 {
                continue;
            }
            let xe = permuted.slice(start * hidden..(start + len) * hidden);
            let w1 = self.w1.slice(e * weights..(e + 1) * weights);
            let w3 = self.w3.slice(e * weights..(e + 1) * weights);
            matmul::forward_view(
                gpu,
                &mut a.slice_mut(start * inner..(start + len) * inner),
                &xe,
                &w1,
                hidden,
                inner,
                false,
            )?;
            matmul::forward_view(
                gpu,
                &mut b.slice_mut(start * inner..(start + len) * inner),
                &xe,
                &w3,
                hidden,
                inner,
                false,
            )?;
        }
        swiglu::forward(gpu, &mut h, &a, &b)?;
        for (e, &start) in offsets.iter().take(n_experts).enumerate() {
            let (start, len) = (start as usize, load[e]);
            if len == 0 {
                continue;
            }
            let he = h.slice(start * inner..(start + len) * inner);
            let w2 = self.w2.slice(e * weights..(e + 1) * weights);
            matmul::forward_view(
                gpu,
                &mut expert_out.slice_mut(start * hidden..(start + len) * hidden),
                &he,
                &w2,
                inner,
                hidden,
                false,
            )?;
        }
        let mut output = gpu.zeros::<f32>(tokens * hidden)?;
        dispatch::unpermute(
            gpu,
            &mut output,
            &expert_out,
            &routing.gates,
            &dispatch,
            hidden,
        )?;

        let shared = c.shared_hidden();
        if shared > 0 {
            let mut sa = gpu.zeros::<f32>(tokens * shared)?;
            let mut sb = gpu.zeros::<f32>(tokens * shared)?;
            let mut sh = gpu.zeros::<f32>(tokens * shared)?;
            matmul::forward(gpu, &mut sa, x, &self.shared_w1, hidden, shared)?;
            matmul::forward(gpu, &mut sb, x, &self.shared_w3, hidden, shared)?;
            swiglu::forward(gpu, &mut sh, &sa, &sb)?;
            // output += shared(x), accumulated by the GEMM itself.
            matmul::forward_view(
                gpu,
                &mut output.slice_mut(..),
                &sh.slice(..),
                &self.shared_w2.slice(..),
                shared,
                hidden,
                true,
            )?;
        }
        Ok(DeviceMoeForward {
            output,
            routing,
            dispatch,
            load,
            permuted,
            a,
            b,
            h,
            expert_out,
        })
    }
}
