//! The inference forward pass with a paged KV cache: any mix of sequences,
//! each contributing a chunk of new tokens (a whole prompt, a piece of one,
//! or the one token sampled last step), run through the model together.
//!
//! It runs the training model's weights (packed once for the GEMM kernel,
//! `serve/layers.rs`) and repeats the training forward's
//! arithmetic in the same order, so a prefill followed by
//! one-token decodes reproduces the full-sequence logits (tested against
//! [`crate::model::Model::forward`]). Every op works row by row (the GEMMs
//! sum each output in a fixed order whatever the row count, routing is per
//! token, attention per sequence), so a sequence's logits do not depend on
//! what else is in the batch: batching is invisible to the bit.

use std::sync::{Mutex, PoisonError};

use crate::dist::DistError;
use crate::dist::expert_parallel::ExpertParallel;
use crate::model::Model;
use crate::moe::placement::ExpertPlacement;
use crate::ops::packed_linear::WeightPrecision;
use crate::ops::rope::RopeTable;
use crate::ops::{rmsnorm, vector};
use crate::serve::adapters::{Adapter, AdapterShape, BlockAdapter, FfnShape, LowRank, MlpAdapter};
use crate::serve::expert_parallel;
use crate::serve::kv_cache::{KvShape, KvStore, PageId};
use crate::serve::latent::LatentAttention;
use crate::serve::layers::{Block, Ffn, Layers};
use crate::serve::model::{RopeLayout, ServeConfig, ServeModel};
use crate::serve::rebalance::{self, LayerRebalance};

/// One sequence's share of a step.
#[derive(Clone, Copy, Debug)]
pub struct Chunk<'a> {
    /// The sequence's pages, in position order; they must cover every
    /// position up to `start + tokens.len()`.
    pub pages: &'a [PageId],
    /// Position of `tokens[0]`; positions before it are already cached.
    pub start: usize,
    pub tokens: &'a [u32],
    /// Which of the chunk's rows return their next-token logits.
    pub logits: Logits,
    /// The engine's adapter its rows run with (`serve/adapters.rs`);
    /// `None`: the base model.
    pub adapter: Option<usize>,
}

/// The rows of a [`Chunk`] whose next-token logits a step returns, in row
/// order: none (a prefill chunk before the prompt's end), the last (the
/// next token is sampled from it), or every row (the prompt's own
/// log-probabilities: row `i` scores token `i + 1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    None,
    Last,
    All,
}

impl Logits {
    /// `Last` when the chunk's next token is sampled, else `None`.
    pub fn last_if(sample: bool) -> Self {
        if sample { Self::Last } else { Self::None }
    }

    /// The wanted rows of a chunk of `len` rows, as offsets in it.
    pub fn rows(self, len: usize) -> std::ops::Range<usize> {
        match self {
            Self::None => 0..0,
            Self::Last => len.saturating_sub(1)..len,
            Self::All => 0..len,
        }
    }
}

/// Why a step cannot run; the scheduler's checks make these unreachable,
/// and they are errors rather than panics so a bug fails one step, not the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepError {
    EmptyChunk,
    BeyondContext {
        position: usize,
        context: usize,
    },
    TokenOutOfVocabulary(u32),
    NotEnoughPages {
        position: usize,
        pages: usize,
    },
    /// A page id beyond the cache (only a corrupt plan from the leader).
    NoSuchPage {
        page: PageId,
        pages: usize,
    },
    /// An adapter index beyond the engine's adapters.
    NoSuchAdapter {
        adapter: usize,
        adapters: usize,
    },
    /// An expert-parallel exchange failed: the replica is broken (`peer`:
    /// because another rank failed), and no later step can run.
    Collective {
        message: String,
        peer: bool,
    },
    /// The GPU failed (a CUDA or cuBLASLt error): its context may be
    /// unusable, so no later step runs either.
    Device(String),
}

impl StepError {
    fn collective(error: &DistError) -> Self {
        Self::Collective {
            message: error.to_string(),
            peer: error.is_peer_failure(),
        }
    }

    /// Whether the engine can run no further step (its replica is broken).
    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::Collective { .. } | Self::Device(_))
    }
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::EmptyChunk => write!(f, "a chunk without tokens"),
            Self::BeyondContext { position, context } => {
                write!(f, "position {position} is beyond the context of {context}")
            }
            Self::TokenOutOfVocabulary(t) => write!(f, "token {t} is beyond the vocabulary"),
            Self::NotEnoughPages { position, pages } => {
                write!(f, "position {position} is beyond the {pages} pages held")
            }
            Self::NoSuchPage { page, pages } => {
                write!(f, "KV page {page} is beyond the cache's {pages} pages")
            }
            Self::NoSuchAdapter { adapter, adapters } => {
                write!(
                    f,
                    "adapter {adapter} is beyond the engine's {adapters} adapters"
                )
            }
            Self::Collective { message, .. } => {
                write!(f, "the expert-parallel exchange failed: {message}")
            }
            Self::Device(message) => write!(f, "the GPU failed: {message}"),
        }
    }
}

impl std::error::Error for StepError {}

/// The model, ready to serve.
#[derive(Debug)]
pub struct Engine {
    config: ServeConfig,
    layers: Layers,
    rope: RopeTable<f32>,
    /// With more than one thread: the pool a step runs in, whose threads
    /// share each large GEMM's output columns (same bits as one thread).
    pool: Option<rayon::ThreadPool>,
    /// Expert-parallel serving: the replica's ranks holding the other
    /// experts (`serve/expert_parallel.rs`); `None`: every expert is here.
    parallel: Option<Parallel>,
    /// Whether steps compute logits (a follower rank's do not: the
    /// leader samples).
    logits: bool,
    /// The low-rank adapters chunks may name (`serve/adapters.rs`).
    adapters: Vec<Adapter>,
}

/// The exchanges, behind a lock so the engine stays `Sync` (a step runs
/// inside its thread pool); only the step's thread takes it.
struct Parallel(Mutex<ExpertParallel>);

impl std::fmt::Debug for Parallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ep = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("ExpertParallel")
            .field("rank", &ep.rank())
            .field("size", &ep.size())
            .field("experts", &ep.local_experts())
            .finish()
    }
}

impl Engine {
    /// Serves the worker's own `model` with a context of its training
    /// sequence length (the positions RoPE was trained on).
    pub fn new(model: Model<f32>) -> Self {
        Self::serve(ServeModel::from_native(model))
    }

    /// Serves any model, with a context of `model.config.context`. Its
    /// weights are packed for the GEMM kernel here, once.
    pub fn serve(model: ServeModel) -> Self {
        let config = model.config.clone();
        let rope = rope_table(&config);
        let layers = Layers::pack(model);
        Self {
            config,
            layers,
            rope,
            pool: None,
            parallel: None,
            logits: true,
            adapters: Vec::new(),
        }
    }

    /// Serves `adapters` beside the base model: a chunk naming adapter `i`
    /// runs with `adapters[i]`'s updates (loaded for [`Self::adapter_shape`]).
    pub fn with_adapters(mut self, adapters: Vec<Adapter>) -> Self {
        self.adapters = adapters;
        self
    }

    /// What adapters for this model are loaded for.
    pub fn adapter_shape(&self) -> AdapterShape {
        AdapterShape {
            config: self.config.clone(),
            ffn: self
                .layers
                .blocks
                .iter()
                .map(|b| match &b.ffn {
                    Ffn::Dense(mlp) => FfnShape::Dense { width: mlp.width() },
                    Ffn::Moe(moe) => FfnShape::Moe {
                        experts: moe.config().n_routed_experts,
                        expert_width: moe.config().expert_hidden,
                        shared_width: moe.shared_width(),
                    },
                })
                .collect(),
        }
    }

    /// Stores the linear layers' weights at `precision` (see
    /// [`Layers::round_to`] for which ones).
    pub fn with_weights(mut self, precision: WeightPrecision) -> Self {
        self.layers.round_to(precision);
        self
    }

    /// Bytes of the linear layers' weights as stored.
    pub fn weight_bytes(&self) -> usize {
        self.layers.linear_bytes()
    }

    /// Serves as one rank of an expert-parallel replica: its model holds
    /// exactly `ep`'s experts of every MoE layer, and every rank of `ep`
    /// runs the same steps in the same order. Each MoE layer gets
    /// `replica_slots` more slots on this rank (and on every other),
    /// empty until [`Self::rebalance_experts`] fills them with copies of
    /// the busiest experts.
    pub fn with_expert_parallel(
        mut self,
        ep: ExpertParallel,
        replica_slots: usize,
    ) -> Result<Self, String> {
        let own = ep.local_experts();
        for (layer, block) in self.layers.blocks.iter_mut().enumerate() {
            if let Ffn::Moe(moe) = &mut block.ffn {
                let n = moe.config().n_routed_experts;
                if n != ep.n_experts() {
                    return Err(format!(
                        "layer {layer} has {n} routed experts; the expert-parallel group was made for {}",
                        ep.n_experts()
                    ));
                }
                if moe.held() != own {
                    return Err(format!(
                        "layer {layer} holds experts {:?}, but rank {} of {} owns {own:?}",
                        moe.held(),
                        ep.rank(),
                        ep.size()
                    ));
                }
                let others = n - n / ep.size();
                if replica_slots > others {
                    return Err(format!(
                        "{replica_slots} expert copies per rank, but a rank can only hold copies \
                         of the other ranks' {others} experts (redundantExperts at most {} for \
                         {n} experts on {} ranks)",
                        others * ep.size(),
                        ep.size()
                    ));
                }
                let placement = ExpertPlacement::primaries(ep.size(), n, replica_slots)?;
                moe.set_placement(ep.rank(), placement)?;
            }
        }
        self.parallel = Some(Parallel(Mutex::new(ep)));
        Ok(self)
    }

    /// Chooses every MoE layer's replicas again for the load routed since
    /// the last call, and moves their weights (`serve/rebalance.rs`). Every
    /// rank of the replica must call it at the same point between steps.
    /// A failure breaks the replica, as a failed step's exchange does.
    pub fn rebalance_experts(&mut self) -> Result<Vec<LayerRebalance>, StepError> {
        let Some(parallel) = &self.parallel else {
            return Ok(Vec::new());
        };
        let ep = parallel.0.lock().unwrap_or_else(PoisonError::into_inner);
        rebalance::rebalance(&mut self.layers, &ep).map_err(|e| StepError::collective(&e))
    }

    /// Steps compute no logits (they return none): a follower's engine.
    pub fn without_logits(mut self) -> Self {
        self.logits = false;
        self
    }

    /// Payload bytes this rank sent in expert-parallel steps so far: the
    /// token exchanges (dispatch and combine), and its rows all-gathered.
    pub fn expert_parallel_bytes(&self) -> (u64, u64) {
        self.parallel.as_ref().map_or((0, 0), |p| {
            let ep = p.0.lock().unwrap_or_else(PoisonError::into_inner);
            (ep.bytes_sent(), ep.bytes_gathered())
        })
    }

    /// Token rows each routed expert held here computed since the last
    /// call: `(decoder layer, expert, rows)`, for the experts that computed
    /// any (the expert load `/metrics` counts).
    pub fn take_expert_rows(&self) -> Vec<(usize, usize, u64)> {
        let mut taken = Vec::new();
        for (layer, block) in self.layers.blocks.iter().enumerate() {
            if let Ffn::Moe(moe) = &block.ffn {
                taken.extend(
                    moe.take_rows()
                        .into_iter()
                        .map(|(e, rows)| (layer, e, rows)),
                );
            }
        }
        taken
    }

    /// Runs each step on `threads` threads (1: on the caller's alone).
    pub fn with_threads(mut self, threads: usize) -> std::io::Result<Self> {
        self.pool = if threads > 1 {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("moe-serve-math-{i}"))
                .build()
                .map_err(std::io::Error::other)?;
            Some(pool)
        } else {
            None
        };
        Ok(self)
    }

    pub fn config(&self) -> &ServeConfig {
        &self.config
    }

    /// Longest sequence (prompt and completion) the engine runs.
    pub fn context(&self) -> usize {
        self.config().context
    }

    pub fn kv_shape(&self, page_size: usize) -> KvShape {
        let (key_width, value_width) = self.config().kv_row_widths();
        KvShape {
            layers: self.config().layers,
            key_width,
            value_width,
            page_size,
        }
    }

    /// Runs one step: writes every chunk's keys and values into `cache` and
    /// returns `[chunks with logits, vocab]` logits, in chunk order (none
    /// [`Self::without_logits`]). Expert-parallel, every rank of the
    /// replica must run the same steps, and an exchange failure is
    /// [`StepError::Collective`].
    pub fn step(&self, cache: &mut KvStore, chunks: &[Chunk<'_>]) -> Result<Vec<f32>, StepError> {
        match &self.pool {
            Some(pool) => pool.install(|| self.step_here(cache, chunks)),
            None => self.step_here(cache, chunks),
        }
    }

    /// [`Self::step`] on the calling thread (inside the pool, if any).
    fn step_here(&self, cache: &mut KvStore, chunks: &[Chunk<'_>]) -> Result<Vec<f32>, StepError> {
        let config = self.config();
        let (h, vocab) = (config.hidden, config.vocab);
        self.check(cache, chunks)?;
        let parallel = self
            .parallel
            .as_ref()
            .map(|p| p.0.lock().unwrap_or_else(PoisonError::into_inner));
        let ep = parallel.as_deref();
        // Each row's sequence and position.
        let rows: Vec<(usize, usize)> = chunks
            .iter()
            .enumerate()
            .flat_map(|(c, chunk)| (0..chunk.tokens.len()).map(move |i| (c, chunk.start + i)))
            .collect();
        let n = rows.len();
        let tokens: Vec<u32> = chunks
            .iter()
            .flat_map(|c| c.tokens.iter().copied())
            .collect();
        // The rows that want logits, in order.
        let mut logit_rows = Vec::new();
        let mut first = 0;
        for chunk in chunks {
            let len = chunk.tokens.len();
            logit_rows.extend(chunk.logits.rows(len).map(|r| first + r));
            first += len;
        }
        let mut x = vec![0.0; n * h];
        self.layers.embed(&mut x, &tokens);
        let eps = config.norm_eps;
        let mut normed = vec![0.0; n * h];
        let mut rstd = vec![0.0; n];
        let adapted = chunks.iter().any(|c| c.adapter.is_some());
        for (layer, block) in self.layers.blocks.iter().enumerate() {
            // Each row's adapter of this block; empty when no chunk has one.
            let row_adapters: Vec<Option<&BlockAdapter>> = if adapted {
                rows.iter()
                    .map(|&(c, _)| chunks[c].adapter.map(|a| &self.adapters[a].blocks[layer]))
                    .collect()
            } else {
                Vec::new()
            };
            // Attention: x + Wo attention(rope(Wq n), rope(Wk n), Wv n).
            rmsnorm::forward(&mut normed, &mut rstd, &x, &block.attention_norm, eps);
            // Every row's keys and values are cached by the attention;
            // past the last layer's cache write only the rows whose logits
            // are wanted matter, so the last layer's attention output and
            // feed-forward run for those alone (in a prefill, one row of
            // the prompt's).
            let last = layer + 1 == self.layers.blocks.len();
            let out_rows: Vec<usize> = if last {
                logit_rows.clone()
            } else {
                (0..x.len() / h).collect()
            };
            let m = out_rows.len();
            let at = Rows {
                rows: &rows,
                out_rows: &out_rows,
                chunks,
                layer,
                adapters: &row_adapters,
            };
            let out_adapters: Vec<Option<&BlockAdapter>> = match row_adapters.is_empty() {
                true => Vec::new(),
                false => out_rows.iter().map(|&r| row_adapters[r]).collect(),
            };
            let attention = match &block.latent {
                None => self.grouped_attention(block, &normed, cache, &at),
                Some(latent) => self.latent_attention(latent, block, &normed, cache, &at),
            };
            let mut mid = vec![0.0; m * h];
            block.wo.forward(&mut mid, &attention);
            add_updates(
                &out_adapters,
                &attention,
                &mut mid,
                &[(|b| b.o.as_ref(), 0)],
            );
            if let Some(o) = block.bias.as_ref().and_then(|b| b.o.as_ref()) {
                add_bias(&mut mid, o);
            }
            for (mid, &r) in mid.chunks_exact_mut(h).zip(&out_rows) {
                add_into(mid, &x[r * h..(r + 1) * h]);
            }
            normed.truncate(m * h);
            rstd.truncate(m);

            // Feed-forward: mid + ffn(rmsnorm(mid)). Rows are unrelated
            // tokens here; routing is per token.
            rmsnorm::forward(&mut normed, &mut rstd, &mid, &block.ffn_norm, eps);
            let mut out = match &block.ffn {
                Ffn::Dense(mlp) => {
                    let mut out = vec![0.0; m * h];
                    let mlps: Vec<Option<&MlpAdapter>> =
                        out_adapters.iter().map(|a| a.map(|a| &a.mlp)).collect();
                    mlp.forward_adapted(&mut out, &normed, &mlps);
                    out
                }
                Ffn::Moe(moe) => match ep {
                    Some(ep) => expert_parallel::forward(moe, &normed, ep, &out_adapters),
                    None => moe.forward_adapted(&normed, &out_adapters),
                },
            };
            add_into(&mut out, &mid);
            x = out;
        }
        if let Some(ep) = ep {
            ep.take_failure().map_err(|e| StepError::collective(&e))?;
        }
        if !self.logits {
            return Ok(Vec::new());
        }
        // Final norm and LM head. The last block left only the rows that
        // want logits in `x` (a model without blocks has them all).
        let last_rows = if self.layers.blocks.is_empty() {
            logit_rows
                .iter()
                .flat_map(|&r| x[r * h..(r + 1) * h].iter().copied())
                .collect()
        } else {
            x
        };
        let m = last_rows.len() / h;
        let mut final_normed = vec![0.0; m * h];
        let mut final_rstd = vec![0.0; m];
        rmsnorm::forward(
            &mut final_normed,
            &mut final_rstd,
            &last_rows,
            &self.layers.final_norm,
            eps,
        );
        let mut logits = vec![0.0; m * vocab];
        self.layers.lm_head.forward(&mut logits, &final_normed);
        Ok(logits)
    }

    /// Grouped-query attention for one block: q, k, v of every row
    /// (biased, q/k-normed, rotated), the keys and values cached, then the
    /// attention outputs `[out rows, q_width]`.
    fn grouped_attention(
        &self,
        block: &Block,
        normed: &[f32],
        cache: &mut KvStore,
        at: &Rows<'_>,
    ) -> Vec<f32> {
        let config = self.config();
        let (qw, kv) = (config.q_width(), config.kv_width());
        let n = at.rows.len();
        let eps = config.norm_eps;
        let qkv_width = qw + 2 * kv;
        // One product for q, k and v: row r is [q | k | v].
        let mut qkv = vec![0.0; n * qkv_width];
        block.qkv.forward(&mut qkv, normed);
        add_updates(
            at.adapters,
            normed,
            &mut qkv,
            &[
                (|b| b.q.as_ref(), 0),
                (|b| b.k.as_ref(), qw),
                (|b| b.v.as_ref(), qw + kv),
            ],
        );
        let mut q = Vec::with_capacity(n * qw);
        let mut k = Vec::with_capacity(n * kv);
        let mut v = Vec::with_capacity(n * kv);
        for row in qkv.chunks_exact(qkv_width) {
            q.extend_from_slice(&row[..qw]);
            k.extend_from_slice(&row[qw..qw + kv]);
            v.extend_from_slice(&row[qw + kv..]);
        }
        if let Some(bias) = &block.bias {
            add_bias(&mut q, &bias.q);
            add_bias(&mut k, &bias.k);
            add_bias(&mut v, &bias.v);
        }
        // q = q_norm(q), k = k_norm(k) before RoPE, in chunks of the
        // gain's width: per head (Qwen3, `[head_dim]`) or over a token's
        // whole projection (OLMoE, `[q_width]` / `[kv_width]`).
        if let Some((q_gain, k_gain)) = &block.qk_norm {
            for (values, gain) in [(&mut q, q_gain), (&mut k, k_gain)] {
                let input = values.clone();
                let mut chunk_rstd = vec![0.0; input.len() / gain.len()];
                rmsnorm::forward(values, &mut chunk_rstd, &input, gain, eps);
            }
        }
        // OLMoE's clip_qkv: after the norms, before RoPE, as transformers
        // clamps them.
        if let Some(clip) = config.clip_qkv {
            for value in q.iter_mut().chain(&mut k).chain(&mut v) {
                *value = value.clamp(-clip, clip);
            }
        }
        for (r, &(c, position)) in at.rows.iter().enumerate() {
            self.rotate(&mut q[r * qw..(r + 1) * qw], position);
            self.rotate(&mut k[r * kv..(r + 1) * kv], position);
            let (kr, vr) = (&k[r * kv..(r + 1) * kv], &v[r * kv..(r + 1) * kv]);
            cache.write(at.layer, at.chunks[c].pages, position, kr, vr);
        }
        at.each_out_row(qw, |out, r, pages, position| {
            self.attend(
                out,
                &q[r * qw..(r + 1) * qw],
                cache,
                at.layer,
                pages,
                position,
            );
        })
    }

    /// Multi-head latent attention for one block (`serve/latent.rs`): the
    /// absorbed queries and the latents of every row, `q_pe` and `k_pe`
    /// rotated, the latents cached, then the attention outputs `[out rows,
    /// heads * v_head_dim]`.
    fn latent_attention(
        &self,
        latent: &LatentAttention,
        block: &Block,
        normed: &[f32],
        cache: &mut KvStore,
        at: &Rows<'_>,
    ) -> Vec<f32> {
        let config = self.config();
        let shape = config
            .latent
            .as_ref()
            .expect("a latent block has a latent shape");
        let (rank, width, heads) = (shape.kv_lora_rank, shape.latent_width(), config.heads);
        let n = at.rows.len();
        let mut projected = vec![0.0; n * block.qkv.out_dim()];
        block.qkv.forward(&mut projected, normed);
        let (mut queries, mut latents) = latent.queries_and_latents(&projected, config.norm_eps);
        let query_width = heads * width;
        // RoPE on the rotated parts only; with `rope_interleave`
        // transformers also permutes q_pe and k_pe alike, which leaves
        // their dot products (all they are used for) unchanged.
        for (r, &(c, position)) in at.rows.iter().enumerate() {
            for head in queries[r * query_width..(r + 1) * query_width].chunks_exact_mut(width) {
                self.rotate(&mut head[rank..], position);
            }
            let row = &mut latents[r * width..(r + 1) * width];
            self.rotate(&mut row[rank..], position);
            cache.write(at.layer, at.chunks[c].pages, position, row, &[]);
        }
        let contexts = at.each_out_row(heads * rank, |context, r, pages, position| {
            let query = &queries[r * query_width..(r + 1) * query_width];
            latent.attend(context, query, cache, at.layer, pages, position);
        });
        latent.expand(&contexts)
    }

    fn check(&self, cache: &KvStore, chunks: &[Chunk<'_>]) -> Result<(), StepError> {
        let (context, vocab) = (self.context(), self.config().vocab);
        check_chunks(
            chunks,
            context,
            vocab,
            cache.shape().page_size,
            cache.pages(),
            self.adapters.len(),
        )
    }

    /// RoPE at `position` for one token's heads (see [`rotate`]).
    fn rotate(&self, x: &mut [f32], position: usize) {
        let config = self.config();
        rotate(x, position, config.head_dim, config.rope_layout, &self.rope);
    }

    /// [`attend`] with this model's heads.
    fn attend(
        &self,
        out: &mut [f32],
        q: &[f32],
        cache: &KvStore,
        layer: usize,
        pages: &[PageId],
        position: usize,
    ) {
        let config = self.config();
        let heads = (config.heads, config.kv_heads, config.head_dim);
        attend(out, q, heads, cache, layer, pages, position);
    }
}

/// One projection of an adapter's block.
type Projection = fn(&BlockAdapter) -> Option<&LowRank>;

/// Adds to row `i` of `out` the updates that row `i`'s adapter (if any)
/// makes to its `projections` of row `i` of `x`, each at its offset in
/// `out`'s row. `adapters` empty: no row has one.
fn add_updates(
    adapters: &[Option<&BlockAdapter>],
    x: &[f32],
    out: &mut [f32],
    projections: &[(Projection, usize)],
) {
    if adapters.is_empty() {
        return;
    }
    let (width, stride) = (x.len() / adapters.len(), out.len() / adapters.len());
    for (i, block) in adapters.iter().enumerate() {
        let Some(block) = block else { continue };
        for &(pick, offset) in projections {
            if let Some(low) = pick(block) {
                let out = &mut out[i * stride..(i + 1) * stride];
                low.add_rows(out, stride, offset, &x[i * width..(i + 1) * width]);
            }
        }
    }
}

/// Where one layer's rows stand in a step.
struct Rows<'a> {
    /// Each row's chunk and position.
    rows: &'a [(usize, usize)],
    /// The rows whose attention output is needed.
    out_rows: &'a [usize],
    chunks: &'a [Chunk<'a>],
    layer: usize,
    /// Each row's adapter of this block (empty: none has one).
    adapters: &'a [Option<&'a BlockAdapter>],
}

impl Rows<'_> {
    /// `[out rows, width]`: `fill(out, row, its pages, its position)` for
    /// each row whose output is needed, in order.
    fn each_out_row(
        &self,
        width: usize,
        mut fill: impl FnMut(&mut [f32], usize, &[PageId], usize),
    ) -> Vec<f32> {
        let mut outputs = vec![0.0; self.out_rows.len() * width];
        for (out, &r) in outputs.chunks_exact_mut(width).zip(self.out_rows) {
            let (c, position) = self.rows[r];
            fill(out, r, self.chunks[c].pages, position);
        }
        outputs
    }
}

/// Adds `bias` to every row of `rows`.
fn add_bias(rows: &mut [f32], bias: &[f32]) {
    for row in rows.chunks_exact_mut(bias.len()) {
        add_into(row, bias);
    }
}

fn add_into(target: &mut [f32], addend: &[f32]) {
    for (t, &a) in target.iter_mut().zip(addend) {
        *t += a;
    }
}

/// The RoPE table a model's attention rotates with: its context's
/// positions over the rotated width (the head, or MLA's `qk_rope_head_dim`,
/// its `head_dim`), YaRN's frequencies where it has them.
pub(crate) fn rope_table(config: &ServeConfig) -> RopeTable<f32> {
    match &config.rope_scaling {
        None => RopeTable::new(config.context, config.head_dim, config.rope_theta),
        Some(yarn) => RopeTable::from_frequencies(
            config.context,
            &yarn.inv_freq(config.head_dim, config.rope_theta),
            yarn.attention_factor(),
        ),
    }
}

/// Refuses a step the scheduler would never plan (an empty chunk, a
/// position beyond the context or the pages held, a token beyond the
/// vocabulary, a page beyond the cache's `pages`): the checks every engine
/// makes before touching its cache.
pub(crate) fn check_chunks(
    chunks: &[Chunk<'_>],
    context: usize,
    vocab: usize,
    page_size: usize,
    pages: usize,
    adapters: usize,
) -> Result<(), StepError> {
    for chunk in chunks {
        if let Some(adapter) = chunk.adapter.filter(|&a| a >= adapters) {
            return Err(StepError::NoSuchAdapter { adapter, adapters });
        }
        let end = chunk.start + chunk.tokens.len();
        if chunk.tokens.is_empty() {
            return Err(StepError::EmptyChunk);
        }
        if end > context {
            return Err(StepError::BeyondContext {
                position: end - 1,
                context,
            });
        }
        if end > chunk.pages.len() * page_size {
            return Err(StepError::NotEnoughPages {
                position: end - 1,
                pages: chunk.pages.len(),
            });
        }
        if let Some(&t) = chunk.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(StepError::TokenOutOfVocabulary(t));
        }
        if let Some(&page) = chunk.pages.iter().find(|&&p| p as usize >= pages) {
            return Err(StepError::NoSuchPage { page, pages });
        }
    }
    Ok(())
}

/// Causal grouped-query attention of one query row at `position` over
/// the cached positions `0..=position`: scaled dot products (in
/// [`vector::dot_f32`]'s order, not the training op's chain: the same
/// values to rounding), a max-shifted softmax, then the weighted sum of
/// values in ascending position. `(heads, kv_heads, head_dim)` shape `q`
/// and `out` (`heads * head_dim`) and the cached rows (`kv_heads * head_dim`).
/// Also the reference the device's paged attention is checked against.
///
/// Page by page, for the query heads that share a key/value head: a page's
/// rows are consecutive, so positions map to rows once per page, not once
/// per position and head, a page stays in L1 while the group's heads read
/// it, and the weighted sum keeps a head's outputs in registers across a
/// page's rows ([`vector::scaled_dots`], [`vector::add_weighted_rows`]).
/// Every value is computed as it was one head and one position at a time
/// (each score, then each output's sum in ascending position), so the
/// results are those bits.
pub(crate) fn attend(
    out: &mut [f32],
    q: &[f32],
    (heads, kv_heads, head_dim): (usize, usize, usize),
    cache: &KvStore,
    layer: usize,
    pages: &[PageId],
    position: usize,
) {
    let group = heads / kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let positions = position + 1;
    let (key_width, value_width) = (cache.shape().key_width, cache.shape().value_width);
    // Head g of the group: scores[g * positions..][..positions].
    let mut scores = vec![0.0f32; group * positions];
    for kv_head in 0..kv_heads {
        let kv = kv_head * head_dim..(kv_head + 1) * head_dim;
        let heads_here = kv_head * group * head_dim..(kv_head + 1) * group * head_dim;
        let q_group = &q[heads_here.clone()];
        for (page, first, rows) in cache.spans(pages, positions) {
            let keys = &cache.key_rows(layer, page, rows)[kv.start..];
            for (g, q) in q_group.chunks_exact(head_dim).enumerate() {
                let scores = &mut scores[g * positions + first..][..rows];
                vector::scaled_dots(scores, q, keys, key_width, scale);
            }
        }
        for scores in scores.chunks_exact_mut(positions) {
            let max = scores.iter().fold(scores[0], |m, &s| m.max(s));
            let mut sum = 0.0;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            for s in scores.iter_mut() {
                *s /= sum;
            }
        }
        let out_group = &mut out[heads_here];
        out_group.fill(0.0);
        for (page, first, rows) in cache.spans(pages, positions) {
            let values = &cache.value_rows(layer, page, rows)[kv.start..];
            for (g, out) in out_group.chunks_exact_mut(head_dim).enumerate() {
                let weights = &scores[g * positions + first..][..rows];
                vector::add_weighted_rows(out, weights, values, value_width);
            }
        }
    }
}

/// RoPE at `position` for one token's heads (`x`: whole heads of
/// `head_dim`), as [`RopeTable::forward`] does for token `position` of a
/// training sequence, pairing the dimensions as `layout` says. Also the
/// reference the device's per-row rotation is checked against.
pub(crate) fn rotate(
    x: &mut [f32],
    position: usize,
    head_dim: usize,
    layout: RopeLayout,
    rope: &RopeTable<f32>,
) {
    let pairs = head_dim / 2;
    let angles = position * pairs..(position + 1) * pairs;
    let (cos, sin) = (&rope.cos()[angles.clone()], &rope.sin()[angles]);
    for head in x.chunks_exact_mut(head_dim) {
        match layout {
            RopeLayout::Interleaved => {
                for ((pair, &c), &s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
                    let (a, b) = (pair[0], pair[1]);
                    pair[0] = a * c - b * s;
                    pair[1] = a * s + b * c;
                }
            }
            // x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1).
            RopeLayout::Halves => {
                let (first, second) = head.split_at_mut(pairs);
                for (((a, b), &c), &s) in first.iter_mut().zip(second).zip(cos).zip(sin) {
                    let (x1, x2) = (*a, *b);
                    *a = x1 * c - x2 * s;
                    *b = x2 * c + x1 * s;
                }
            }
        }
    }
}
