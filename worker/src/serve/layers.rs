//! The served model's weights as the engine runs them: every linear layer
//! packed once for the GEMM kernel ([`PackedLinear`]), projections that
//! read the same input stacked into one (`q, k, v`; `w1, w3`), and the MoE
//! feed-forward without the training layer's saved activations.
//!
//! The arithmetic is the training forward's, in its order: each GEMM output
//! has [`crate::ops::matmul::forward`]'s bits, the experts' outputs are
//! scatter-added gate × value in expert order, then the shared expert — as
//! [`crate::moe::MoeLayer::forward`] does — so the serving tests against the
//! training forward and `transformers` hold unchanged.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::moe::config::MoeConfig;
use crate::moe::dispatch::Dispatch;
use crate::moe::routing::{self, Routing};
use crate::ops::packed_linear::{PackedLinear, WeightPrecision};
use crate::ops::swiglu;
use crate::serve::latent::LatentAttention;
use crate::serve::model::{AttentionBias, Mlp, ServeFfn, ServeModel};

/// The whole model, packed.
#[derive(Debug)]
pub(crate) struct Layers {
    /// `[vocab, hidden]`; `None`: tied, rows read from [`Self::lm_head`].
    embedding: Option<Vec<f32>>,
    pub blocks: Vec<Block>,
    pub final_norm: Vec<f32>,
    pub lm_head: PackedLinear,
}

/// One transformer block.
#[derive(Debug)]
pub(crate) struct Block {
    pub attention_norm: Vec<f32>,
    /// `q, k, v` stacked: output row `[q_width | kv_width | kv_width]`
    /// (latent attention: `[q_a or q | kv_a]`).
    pub qkv: PackedLinear,
    pub wo: PackedLinear,
    /// Multi-head latent attention's other weights (DeepSeek).
    pub latent: Option<LatentAttention>,
    pub bias: Option<AttentionBias>,
    pub qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    pub ffn_norm: Vec<f32>,
    pub ffn: Ffn,
}

#[derive(Debug)]
pub(crate) enum Ffn {
    Dense(PackedMlp),
    Moe(Box<Moe>),
}

/// A SwiGLU MLP with `w1` and `w3` stacked.
#[derive(Debug)]
pub(crate) struct PackedMlp {
    w13: PackedLinear,
    w2: PackedLinear,
    width: usize,
}

/// A MoE feed-forward layer.
#[derive(Debug)]
pub(crate) struct Moe {
    config: MoeConfig,
    router: PackedLinear,
    selection_bias: Vec<f32>,
    /// The routed experts held (global indices): all of them, or an
    /// expert-parallel rank's slice (`serve/expert_parallel.rs`).
    held: Range<usize>,
    /// The held experts, in order.
    experts: Vec<PackedMlp>,
    /// The worker's own fused, ungated shared experts.
    shared: Option<PackedMlp>,
    /// Qwen2-MoE's shared expert and its one-output gate.
    gated_shared: Option<(PackedMlp, PackedLinear)>,
    /// Token rows each held expert computed since they were last taken
    /// ([`Moe::take_rows`]): the expert load `/metrics` shows.
    rows: Vec<AtomicU64>,
}

impl Layers {
    /// Packs `model`'s weights, block by block (each block's plain weights
    /// are freed as it is packed, so loading needs little more than the
    /// model's own size).
    pub fn pack(model: ServeModel) -> Self {
        let config = model.config;
        let (h, attention_width) = (config.hidden, config.attention_width());
        let blocks = model
            .blocks
            .into_iter()
            .map(|block| Block {
                attention_norm: block.attention_norm,
                qkv: PackedLinear::stacked(&[&block.wq, &block.wk, &block.wv], h),
                wo: PackedLinear::new(block.wo, attention_width, h),
                latent: block.latent.map(|weights| {
                    let shape = config
                        .latent
                        .as_ref()
                        .expect("latent attention weights come with a latent shape");
                    LatentAttention::pack(weights, shape, config.heads)
                }),
                bias: block.bias,
                qk_norm: block.qk_norm,
                ffn_norm: block.ffn_norm,
                ffn: match block.ffn {
                    ServeFfn::Dense(mlp) => Ffn::Dense(PackedMlp::from_mlp(mlp, h)),
                    ServeFfn::Moe {
                        layer,
                        gated_shared,
                    } => {
                        let moe_config = layer.config().clone();
                        let params = &layer.params;
                        let held = params.experts.clone();
                        let experts = held
                            .clone()
                            .map(|e| {
                                let mlp = params.expert(&moe_config, e);
                                PackedMlp::new(mlp.w1, mlp.w3, mlp.w2.to_vec(), h, mlp.hidden)
                            })
                            .collect();
                        let shared = params.shared(&moe_config).map(|mlp| {
                            PackedMlp::new(mlp.w1, mlp.w3, mlp.w2.to_vec(), h, mlp.hidden)
                        });
                        Ffn::Moe(Box::new(Moe {
                            router: PackedLinear::new(
                                layer.params.router.clone(),
                                h,
                                moe_config.n_routed_experts,
                            ),
                            selection_bias: layer.selection_bias.clone(),
                            rows: held.clone().map(|_| AtomicU64::new(0)).collect(),
                            held,
                            experts,
                            shared,
                            gated_shared: gated_shared.map(|g| {
                                (
                                    PackedMlp::from_mlp(g.mlp, h),
                                    PackedLinear::new(g.gate, h, 1),
                                )
                            }),
                            config: moe_config,
                        }))
                    }
                },
            })
            .collect();
        let (embedding, lm_head) = match model.lm_head {
            Some(head) => (
                Some(model.embedding),
                PackedLinear::new(head, h, config.vocab),
            ),
            None => (None, PackedLinear::new(model.embedding, h, config.vocab)),
        };
        Self {
            embedding,
            blocks,
            final_norm: model.final_norm,
            lm_head,
        }
    }

    /// Stores the weights of every projection, expert and the LM head at
    /// `precision` (a tied embedding is then looked up rounded too). The
    /// routers and Qwen2-MoE's shared-expert gate stay f32: a few outputs
    /// each, negligible bytes, and the router's scores decide which experts
    /// run — DeepSeek-V3 and vLLM keep them in full precision as well.
    pub fn round_to(&mut self, precision: WeightPrecision) {
        for block in &mut self.blocks {
            block.qkv.round_to(precision);
            block.wo.round_to(precision);
            if let Some(latent) = &mut block.latent {
                latent.round_to(precision);
            }
            match &mut block.ffn {
                Ffn::Dense(mlp) => mlp.round_to(precision),
                Ffn::Moe(moe) => {
                    for expert in &mut moe.experts {
                        expert.round_to(precision);
                    }
                    if let Some(shared) = &mut moe.shared {
                        shared.round_to(precision);
                    }
                    if let Some((shared, _gate)) = &mut moe.gated_shared {
                        shared.round_to(precision);
                    }
                }
            }
        }
        self.lm_head.round_to(precision);
    }

    /// Bytes of the linear layers' weights, as stored.
    pub fn linear_bytes(&self) -> usize {
        let mlp = |m: &PackedMlp| m.w13.bytes() + m.w2.bytes();
        let blocks: usize = self
            .blocks
            .iter()
            .map(|block| {
                block.qkv.bytes()
                    + block.wo.bytes()
                    + block.latent.as_ref().map_or(0, LatentAttention::bytes)
                    + match &block.ffn {
                        Ffn::Dense(m) => mlp(m),
                        Ffn::Moe(moe) => {
                            moe.router.bytes()
                                + moe.experts.iter().map(mlp).sum::<usize>()
                                + moe.shared.as_ref().map_or(0, mlp)
                                + moe
                                    .gated_shared
                                    .as_ref()
                                    .map_or(0, |(m, gate)| mlp(m) + gate.bytes())
                        }
                    }
            })
            .sum();
        blocks + self.lm_head.bytes()
    }

    /// `out[t, ..]` = the embedding of `tokens[t]` (each below the vocabulary).
    pub fn embed(&self, out: &mut [f32], tokens: &[u32]) {
        let hidden = self.lm_head.in_dim();
        for (row, &token) in out.chunks_exact_mut(hidden).zip(tokens) {
            let t = token as usize;
            match &self.embedding {
                Some(table) => row.copy_from_slice(&table[t * hidden..(t + 1) * hidden]),
                None => self.lm_head.row(t, row),
            }
        }
    }
}

impl PackedMlp {
    fn new(w1: &[f32], w3: &[f32], w2: Vec<f32>, hidden: usize, width: usize) -> Self {
        Self {
            w13: PackedLinear::stacked(&[w1, w3], hidden),
            w2: PackedLinear::new(w2, width, hidden),
            width,
        }
    }

    fn from_mlp(mlp: Mlp, hidden: usize) -> Self {
        Self::new(&mlp.w1, &mlp.w3, mlp.w2, hidden, mlp.width)
    }

    fn round_to(&mut self, precision: WeightPrecision) {
        self.w13.round_to(precision);
        self.w2.round_to(precision);
    }

    /// `out = (silu(x w1ᵀ) * (x w3ᵀ)) w2ᵀ` for `x, out: [rows, hidden]`.
    pub fn forward(&self, out: &mut [f32], x: &[f32]) {
        let w = self.width;
        let rows = x.len() / self.w13.in_dim();
        let mut ab = vec![0.0; rows * 2 * w];
        self.w13.forward(&mut ab, x);
        let mut h = vec![0.0; rows * w];
        for (h, ab) in h.chunks_exact_mut(w).zip(ab.chunks_exact(2 * w)) {
            let (a, b) = ab.split_at(w);
            swiglu::forward_f32(h, a, b);
        }
        self.w2.forward(out, &h);
    }
}

impl Moe {
    pub fn config(&self) -> &MoeConfig {
        &self.config
    }

    /// The routed experts this layer holds (global indices).
    pub fn held(&self) -> Range<usize> {
        self.held.clone()
    }

    /// Held routed expert `e` (a global index).
    pub fn expert(&self, e: usize) -> &PackedMlp {
        assert!(
            self.held.contains(&e),
            "expert {e} is not held here (this layer holds experts {:?})",
            self.held
        );
        &self.experts[e - self.held.start]
    }

    /// Routes `x: [tokens, hidden]`: each token's experts and gates, and the
    /// assignments grouped by expert.
    pub fn route(&self, x: &[f32]) -> (Routing<f32>, Dispatch) {
        let n_experts = self.config.n_routed_experts;
        let tokens = x.len() / self.config.hidden;
        let mut logits = vec![0.0; tokens * n_experts];
        self.router.forward(&mut logits, x);
        let routing = routing::route(&self.config, &logits, &self.selection_bias);
        let dispatch = Dispatch::new(&routing.experts, self.config.top_k, n_experts);
        (routing, dispatch)
    }

    /// Counts `rows` token rows computed by held expert `e`.
    pub fn count_rows(&self, e: usize, rows: usize) {
        self.rows[e - self.held.start].fetch_add(rows as u64, Ordering::Relaxed);
    }

    /// The rows each held expert computed since the last call, for those
    /// that computed any: `(expert, rows)`, global expert indices.
    pub fn take_rows(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.held
            .clone()
            .zip(&self.rows)
            .map(|(e, rows)| (e, rows.swap(0, Ordering::Relaxed)))
            .filter(|&(_, rows)| rows > 0)
    }

    /// Adds `gate · y` into each assignment's token row of `output`, where
    /// `rows` holds one output row `y` per assignment of `experts`, in
    /// dispatch order (by expert, then token). Called once per expert or
    /// once for all, a token's row sums its experts in ascending order.
    pub fn add_routed(
        &self,
        output: &mut [f32],
        routing: &Routing<f32>,
        dispatch: &Dispatch,
        experts: Range<usize>,
        rows: &[f32],
    ) {
        let hidden = self.config.hidden;
        let slots = experts.flat_map(|e| dispatch.slots(e).iter().copied());
        for (slot, y) in slots.zip(rows.chunks_exact(hidden)) {
            let gate = routing.gates[slot];
            let token = dispatch.token(slot);
            for (o, &v) in output[token * hidden..(token + 1) * hidden]
                .iter_mut()
                .zip(y)
            {
                *o += gate * v;
            }
        }
    }

    /// The layer's output for `x: [tokens, hidden]` (unrelated tokens:
    /// routing is per token), with every routed expert held here.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let hidden = self.config.hidden;
        assert_eq!(
            self.held,
            0..self.config.n_routed_experts,
            "a layer holding some experts runs expert-parallel"
        );
        let (routing, dispatch) = self.route(x);
        let mut output = vec![0.0; x.len()];
        let mut input = Vec::new();
        for (e, expert) in self.held.clone().zip(&self.experts) {
            let slots = dispatch.slots(e);
            if slots.is_empty() {
                continue;
            }
            input.clear();
            for &slot in slots {
                let token = dispatch.token(slot);
                input.extend_from_slice(&x[token * hidden..(token + 1) * hidden]);
            }
            let mut expert_output = vec![0.0; input.len()];
            expert.forward(&mut expert_output, &input);
            self.count_rows(e, slots.len());
            self.add_routed(&mut output, &routing, &dispatch, e..e + 1, &expert_output);
        }
        self.add_shared(x, &mut output);
        output
    }

    /// Adds the shared experts' output for `x` into `output` (after the
    /// routed experts', as the training layer does).
    pub fn add_shared(&self, x: &[f32], output: &mut [f32]) {
        let hidden = self.config.hidden;
        let tokens = x.len() / hidden;
        if let Some(shared) = &self.shared {
            let mut shared_output = vec![0.0; x.len()];
            shared.forward(&mut shared_output, x);
            for (o, s) in output.iter_mut().zip(shared_output) {
                *o += s;
            }
        }
        // Qwen2-MoE: out += sigmoid(x · gate) * shared(x).
        if let Some((mlp, gate)) = &self.gated_shared {
            let mut shared_output = vec![0.0; x.len()];
            mlp.forward(&mut shared_output, x);
            let mut gates = vec![0.0; tokens];
            gate.forward(&mut gates, x);
            for ((row, shared_row), &g) in output
                .chunks_exact_mut(hidden)
                .zip(shared_output.chunks_exact(hidden))
                .zip(&gates)
            {
                let g = 1.0 / (1.0 + (-g).exp());
                for (o, &s) in row.iter_mut().zip(shared_row) {
                    *o += g * s;
                }
            }
        }
    }
}
