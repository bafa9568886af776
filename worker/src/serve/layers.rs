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
use crate::moe::placement::ExpertPlacement;
use crate::moe::routing::{self, Routing};
use crate::ops::packed_linear::{PackedLinear, WeightPrecision};
use crate::ops::swiglu;
use crate::serve::adapters::{BlockAdapter, MlpAdapter};
use crate::serve::latent::LatentAttention;
use crate::serve::model::{AttentionBias, Mlp, ServeFfn, ServeModel};

/// Bytes before the weights in [`PackedMlp::to_bytes`].
const MLP_HEADER: usize = 9;

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
#[derive(Clone, Debug)]
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
    /// Expert-parallel serving: where every expert is, and this rank's
    /// copies of other ranks' experts.
    parallel: Option<RankExperts>,
}

/// An expert-parallel rank's view of a layer's [`ExpertPlacement`].
#[derive(Debug)]
struct RankExperts {
    rank: usize,
    placement: ExpertPlacement,
    /// This rank's replica slots (`placement.replicas_of(rank)`), filled.
    replicas: Vec<Option<PackedMlp>>,
    /// Token rows each replica slot computed since last taken.
    replica_rows: Vec<AtomicU64>,
    /// Rows this rank routed to each expert (all of them) since last
    /// taken: the load the next placement is chosen for.
    routed: Vec<AtomicU64>,
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
                            parallel: None,
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

    /// The weights as another rank's [`Self::from_bytes`] packs them again:
    /// `precision u8 | width u32 | hidden u32 | w13 | w2` (little-endian
    /// f32 values as the kernel multiplies them, see
    /// [`PackedLinear::weights`]), so the copy computes the same bits on
    /// whichever CPU it lands. Values rather than panels: two pods of a
    /// replica may pack differently (panels need AVX2 and FMA).
    pub fn to_bytes(&self) -> Vec<u8> {
        let precision: u8 = match self.w13.precision() {
            WeightPrecision::F32 => 0,
            WeightPrecision::Bf16 => 1,
            WeightPrecision::Fp8 => 2,
        };
        let (w13, w2) = (self.w13.weights(), self.w2.weights());
        let mut out = Vec::with_capacity(MLP_HEADER + 4 * (w13.len() + w2.len()));
        out.push(precision);
        out.extend_from_slice(&(self.width as u32).to_le_bytes());
        out.extend_from_slice(&(self.w13.in_dim() as u32).to_le_bytes());
        for v in w13.iter().chain(&w2) {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Reads one MLP [`Self::to_bytes`] wrote at the start of `bytes`, for
    /// a layer of `hidden`; returns it and the bytes it took.
    pub fn from_bytes(bytes: &[u8], hidden: usize) -> Result<(Self, usize), String> {
        let word = |at: usize| {
            bytes
                .get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        };
        let (Some(&precision), Some(width), Some(h)) = (bytes.first(), word(1), word(5)) else {
            return Err(format!("{} bytes are no expert's header", bytes.len()));
        };
        if h != hidden || width == 0 {
            return Err(format!(
                "an expert of hidden size {h} and width {width}, for a layer of hidden size {hidden}"
            ));
        }
        let precision = match precision {
            0 => WeightPrecision::F32,
            1 => WeightPrecision::Bf16,
            2 => WeightPrecision::Fp8,
            p => return Err(format!("unknown weight precision {p}")),
        };
        let values = 3 * width * hidden;
        let end = MLP_HEADER + 4 * values;
        let Some(body) = bytes.get(MLP_HEADER..end) else {
            return Err(format!(
                "an expert of {end} bytes, but {} arrived",
                bytes.len()
            ));
        };
        let w: Vec<f32> = body
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let (w13, w2) = w.split_at(2 * width * hidden);
        let mut mlp = Self {
            w13: PackedLinear::new(w13.to_vec(), hidden, 2 * width),
            w2: PackedLinear::new(w2.to_vec(), width, hidden),
            width,
        };
        mlp.round_to(precision);
        Ok((mlp, end))
    }

    fn round_to(&mut self, precision: WeightPrecision) {
        self.w13.round_to(precision);
        self.w2.round_to(precision);
    }

    /// `out = (silu(x w1ᵀ) * (x w3ᵀ)) w2ᵀ` for `x, out: [rows, hidden]`,
    /// with row `i`'s adapter (`adapters[i]`, if any; none when empty)
    /// adding its updates to the row's gate, up and down projections
    /// (`serve/adapters.rs`).
    pub fn forward_adapted(&self, out: &mut [f32], x: &[f32], adapters: &[Option<&MlpAdapter>]) {
        let w = self.width;
        let hidden = self.w13.in_dim();
        let rows = x.len() / hidden;
        let mut ab = vec![0.0; rows * 2 * w];
        self.w13.forward(&mut ab, x);
        let adapted = || {
            adapters
                .iter()
                .enumerate()
                .filter_map(|(i, a)| a.map(|a| (i, a)))
        };
        for (i, a) in adapted() {
            let (ab, x) = (
                &mut ab[i * 2 * w..(i + 1) * 2 * w],
                &x[i * hidden..(i + 1) * hidden],
            );
            for (low, offset) in [(&a.gate, 0), (&a.up, w)] {
                if let Some(low) = low {
                    low.add_rows(ab, 2 * w, offset, x);
                }
            }
        }
        let mut h = vec![0.0; rows * w];
        for (h, ab) in h.chunks_exact_mut(w).zip(ab.chunks_exact(2 * w)) {
            let (a, b) = ab.split_at(w);
            swiglu::forward_f32(h, a, b);
        }
        self.w2.forward(out, &h);
        for (i, a) in adapted() {
            if let Some(down) = &a.down {
                let out = &mut out[i * hidden..(i + 1) * hidden];
                down.add_rows(out, hidden, 0, &h[i * w..(i + 1) * w]);
            }
        }
    }

    /// Its hidden width (the gate's and up projection's outputs).
    pub fn width(&self) -> usize {
        self.width
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

    /// The rows each held expert computed since the last call (its
    /// replicas' included), for those that computed any: `(expert, rows)`,
    /// global expert indices, ascending.
    pub fn take_rows(&self) -> Vec<(usize, u64)> {
        let mut taken: Vec<(usize, u64)> = self
            .held
            .clone()
            .zip(&self.rows)
            .map(|(e, rows)| (e, rows.swap(0, Ordering::Relaxed)))
            .collect();
        if let Some(parallel) = &self.parallel {
            let replicas = parallel.placement.replicas_of(parallel.rank);
            for (e, rows) in replicas.iter().zip(&parallel.replica_rows) {
                if let Some(e) = *e {
                    taken.push((e, rows.swap(0, Ordering::Relaxed)));
                }
            }
            taken.sort_unstable_by_key(|&(e, _)| e);
            taken.dedup_by(|later, first| {
                let same = later.0 == first.0;
                if same {
                    first.1 += later.1;
                }
                same
            });
        }
        taken.retain(|&(_, rows)| rows > 0);
        taken
    }

    /// Makes this layer rank `rank`'s share of `placement` (its primaries
    /// must be what the layer holds); its replica slots start empty.
    pub fn set_placement(&mut self, rank: usize, placement: ExpertPlacement) -> Result<(), String> {
        let per = placement.primaries_per_rank();
        if self.held != (rank * per..(rank + 1) * per)
            || placement.experts() != self.config.n_routed_experts
        {
            return Err(format!(
                "the layer holds experts {:?} of {}, but rank {rank} of the placement owns {:?} of {}",
                self.held,
                self.config.n_routed_experts,
                rank * per..(rank + 1) * per,
                placement.experts()
            ));
        }
        if placement.replicas_of(rank).iter().any(Option::is_some) {
            return Err("a placement to start from has no replicas".into());
        }
        let redundant = placement.redundant();
        self.parallel = Some(RankExperts {
            rank,
            replicas: (0..redundant).map(|_| None).collect(),
            replica_rows: (0..redundant).map(|_| AtomicU64::new(0)).collect(),
            routed: (0..self.config.n_routed_experts)
                .map(|_| AtomicU64::new(0))
                .collect(),
            placement,
        });
        Ok(())
    }

    /// Where this layer's experts are (expert-parallel serving only).
    pub fn placement(&self) -> Option<&ExpertPlacement> {
        self.parallel.as_ref().map(|p| &p.placement)
    }

    /// The expert in this rank's slot `slot` ([`ExpertPlacement`]'s
    /// numbering: primaries, then replicas), if the slot is filled.
    pub fn slot(&self, slot: usize) -> Option<&PackedMlp> {
        let per = self.held.len();
        if slot < per {
            return self.experts.get(slot);
        }
        self.parallel
            .as_ref()
            .and_then(|p| p.replicas.get(slot - per))
            .and_then(Option::as_ref)
    }

    /// Counts `rows` token rows computed in this rank's slot `slot`.
    pub fn count_slot_rows(&self, slot: usize, rows: usize) {
        let per = self.held.len();
        if slot < per {
            self.rows[slot].fetch_add(rows as u64, Ordering::Relaxed);
        } else if let Some(parallel) = &self.parallel {
            parallel.replica_rows[slot - per].fetch_add(rows as u64, Ordering::Relaxed);
        }
    }

    /// Counts the rows this rank routed to each expert (`load[e]`).
    pub fn count_routed(&self, load: &[usize]) {
        if let Some(parallel) = &self.parallel {
            for (count, &rows) in parallel.routed.iter().zip(load) {
                count.fetch_add(rows as u64, Ordering::Relaxed);
            }
        }
    }

    /// The rows this rank routed to each expert since the last call.
    pub fn take_routed(&self) -> Vec<u64> {
        self.parallel.as_ref().map_or_else(Vec::new, |p| {
            p.routed
                .iter()
                .map(|c| c.swap(0, Ordering::Relaxed))
                .collect()
        })
    }

    /// This rank's copy of expert `e`, a primary or a replica, if it has one.
    pub fn copy_of(&self, e: usize) -> Option<&PackedMlp> {
        if self.held.contains(&e) {
            return Some(&self.experts[e - self.held.start]);
        }
        let parallel = self.parallel.as_ref()?;
        let replicas = parallel.placement.replicas_of(parallel.rank);
        let slot = replicas.iter().position(|&r| r == Some(e))?;
        parallel.replicas[slot].as_ref()
    }

    /// Moves to `placement`, with `replicas` the weights of this rank's
    /// replica slots in it (`None` for the empty ones).
    pub fn install(
        &mut self,
        placement: ExpertPlacement,
        replicas: Vec<Option<PackedMlp>>,
    ) -> Result<(), String> {
        let parallel = self
            .parallel
            .as_mut()
            .ok_or("only an expert-parallel layer has replicas")?;
        let slots = placement.replicas_of(parallel.rank);
        if slots.len() != replicas.len()
            || slots
                .iter()
                .zip(&replicas)
                .any(|(e, w)| e.is_some() != w.is_some())
        {
            return Err(format!(
                "replica slots {slots:?}, but weights for {:?}",
                replicas.iter().map(Option::is_some).collect::<Vec<_>>()
            ));
        }
        parallel.placement = placement;
        parallel.replicas = replicas;
        for rows in &parallel.replica_rows {
            rows.store(0, Ordering::Relaxed);
        }
        Ok(())
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

    /// The shared experts' (fused) width, if the layer has any.
    pub fn shared_width(&self) -> Option<usize> {
        self.shared
            .as_ref()
            .or(self.gated_shared.as_ref().map(|(mlp, _)| mlp))
            .map(PackedMlp::width)
    }

    /// The layer's output for `x: [tokens, hidden]` (unrelated tokens:
    /// routing is per token), with every routed expert held here, and
    /// token `t`'s adapter (`adapters[t]`, if any; none when empty) adding
    /// its updates to the projections of the routed experts it is sent to
    /// and of the shared experts.
    pub fn forward_adapted(&self, x: &[f32], adapters: &[Option<&BlockAdapter>]) -> Vec<f32> {
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
            let expert_adapters: Vec<Option<&MlpAdapter>> = match adapters.is_empty() {
                true => Vec::new(),
                false => slots
                    .iter()
                    .map(|&slot| adapters[dispatch.token(slot)].and_then(|a| a.experts.get(e)))
                    .collect(),
            };
            expert.forward_adapted(&mut expert_output, &input, &expert_adapters);
            self.count_rows(e, slots.len());
            self.add_routed(&mut output, &routing, &dispatch, e..e + 1, &expert_output);
        }
        let shared: Vec<Option<&MlpAdapter>> =
            adapters.iter().map(|a| a.map(|a| &a.shared)).collect();
        self.add_shared(x, &mut output, &shared);
        output
    }

    /// Adds the shared experts' output for `x` into `output` (after the
    /// routed experts', as the training layer does), with row `t`'s
    /// adapter (`adapters[t]`, if any; none when empty).
    pub fn add_shared(&self, x: &[f32], output: &mut [f32], adapters: &[Option<&MlpAdapter>]) {
        let hidden = self.config.hidden;
        let tokens = x.len() / hidden;
        if let Some(shared) = &self.shared {
            let mut shared_output = vec![0.0; x.len()];
            shared.forward_adapted(&mut shared_output, x, adapters);
            for (o, s) in output.iter_mut().zip(shared_output) {
                *o += s;
            }
        }
        // Qwen2-MoE: out += sigmoid(x · gate) * shared(x).
        if let Some((mlp, gate)) = &self.gated_shared {
            let mut shared_output = vec![0.0; x.len()];
            mlp.forward_adapted(&mut shared_output, x, adapters);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn random(n: usize, rng: &mut SplitMix64) -> Vec<f32> {
        (0..n).map(|_| (rng.uniform() * 2.0 - 1.0) as f32).collect()
    }

    /// An expert sent to another rank computes the sender's bits, at every
    /// precision (FP8 values are rounded again on arrival, to the same
    /// codes and scales).
    #[test]
    fn an_expert_copied_through_bytes_computes_the_same_bits() {
        let (hidden, width, rows) = (24, 40, 5);
        let mut rng = SplitMix64::new(9);
        let (w1, w3, w2) = (
            random(width * hidden, &mut rng),
            random(width * hidden, &mut rng),
            random(hidden * width, &mut rng),
        );
        let x = random(rows * hidden, &mut rng);
        for precision in [
            WeightPrecision::F32,
            WeightPrecision::Bf16,
            WeightPrecision::Fp8,
        ] {
            let mut mlp = PackedMlp::new(&w1, &w3, w2.clone(), hidden, width);
            mlp.round_to(precision);
            let mut bytes = mlp.to_bytes();
            bytes.extend_from_slice(b"next");
            let (copy, used) = PackedMlp::from_bytes(&bytes, hidden).unwrap();
            assert_eq!(used, bytes.len() - 4, "{precision:?}: one expert's bytes");
            assert_eq!(copy.w13.precision(), precision);
            assert_eq!(
                copy.w13.bytes(),
                mlp.w13.bytes(),
                "{precision:?}: stored alike"
            );
            let (mut want, mut got) = (vec![0.0; rows * hidden], vec![0.0; rows * hidden]);
            mlp.forward_adapted(&mut want, &x, &[]);
            copy.forward_adapted(&mut got, &x, &[]);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{precision:?}");
        }
    }

    #[test]
    fn bytes_that_are_no_expert_are_refused() {
        let mlp = PackedMlp::new(&[0.5; 8], &[0.25; 8], vec![1.0; 8], 4, 2);
        let bytes = mlp.to_bytes();
        let err = |b: &[u8], hidden| PackedMlp::from_bytes(b, hidden).unwrap_err();
        assert!(err(&bytes[..5], 4).contains("header"));
        assert!(err(&bytes[..bytes.len() - 1], 4).contains("arrived"));
        assert!(err(&bytes, 8).contains("hidden size 4"));
        let mut bad = bytes.clone();
        bad[0] = 7;
        assert!(err(&bad, 4).contains("precision 7"));
    }
}
