//! The serving engine on the device: [`crate::serve::engine::Engine::step`]'s
//! contract (chunks of any sequences in, the wanted logits rows out) with
//! the weights in f32 device memory and the KV cache in a device page pool.
//!
//! The host keeps the bookkeeping: the scheduler's `PageAllocator` hands out
//! page ids exactly as for the CPU engine, and [`DeviceKvCache`] is indexed
//! by the same ids ([`KvShape`]'s layout, one pool per layer), so the runner
//! and the scheduler do not know which engine runs. Per step the rows'
//! tokens, positions, cache slots and page tables are uploaded
//! ([`StepLayout`]), every layer runs on the device, and only the logits
//! rows come back.
//!
//! Per block, as the CPU engine: RMSNorm → q, k, v (cuBLASLt, TF32) → biases
//! → q/k RMSNorm (per head or whole projection: the gain's width decides, as
//! on the CPU) → clip_qkv → RoPE at each row's position → the rows' keys
//! and values written into their pages → paged causal attention → o, its
//! bias and the residual → RMSNorm → dense SwiGLU MLP or MoE layer
//! (exact-f32 router, the training path's routing, dispatch and permute
//! kernels, experts on contiguous row segments, shared experts ungated or
//! sigmoid-gated) and the residual. The last block runs its attention
//! output and feed-forward for the logits rows only, as the CPU engine does.
//!
//! Grouped-query attention only: multi-head latent attention (DeepSeek-V3)
//! is refused by [`crate::serve::device::unsupported`] and served on the CPU.
//!
//! On a rank of an expert-parallel replica ([`DeviceEngine::expert_parallel`])
//! each MoE layer holds the rank's share of the routed experts and runs
//! `crate::cuda::serve_ep`'s layer, exchanging rows with the other ranks;
//! everything else is the same on every rank.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use super::matmul::Arithmetic::Tf32;
use super::moe_layer::{RoutedWeights, routed_experts};
use super::serve_ep::{self, DeviceExchange};
use super::{Gpu, GpuError, Result, embedding, matmul, paged_attention, rmsnorm, swiglu, vector};
use crate::moe::config::MoeConfig;
use crate::moe::layer::MoeLayer;
use crate::serve::device::{self, StepLayout};
use crate::serve::engine::{Chunk, StepError, check_chunks, rope_table};
use crate::serve::kv_cache::KvShape;
use crate::serve::model::{Mlp, RopeLayout, ServeConfig, ServeFfn, ServeModel};
use moe_kernels::cudarc::driver::CudaSlice;

use super::paged_attention::StepIndex;
use super::rope::DeviceRope;

/// The KV cache in device memory: per layer, a pool of `pages * page_size`
/// key rows and as many value rows (`kv_heads * head_dim` each), page `p`
/// holding rows `p * page_size..(p + 1) * page_size`: the CPU's
/// [`crate::serve::kv_cache::KvStore`] layout, a pool per layer.
pub struct DeviceKvCache {
    shape: KvShape,
    pages: usize,
    keys: Vec<CudaSlice<f32>>,
    values: Vec<CudaSlice<f32>>,
}

impl DeviceKvCache {
    /// A zeroed pool of `pages` pages of `shape`.
    pub fn new(gpu: &Gpu, shape: KvShape, pages: usize) -> Result<Self> {
        if shape.value_width != shape.key_width || shape.key_width == 0 {
            return Err(GpuError::Unsupported(
                "a KV cache without per-head values (latent attention)".into(),
            ));
        }
        if pages == 0 || !device::pool_fits(pages, shape.page_size) {
            return Err(GpuError::Unsupported(format!(
                "a KV pool of {pages} pages of {} positions (the kernels index at most 2^31 \
                 cache rows per layer)",
                shape.page_size
            )));
        }
        let len = pages * shape.page_size * shape.key_width;
        let mut keys = Vec::with_capacity(shape.layers);
        let mut values = Vec::with_capacity(shape.layers);
        for _ in 0..shape.layers {
            keys.push(gpu.zeros::<f32>(len)?);
            values.push(gpu.zeros::<f32>(len)?);
        }
        Ok(Self {
            shape,
            pages,
            keys,
            values,
        })
    }

    pub fn shape(&self) -> KvShape {
        self.shape
    }

    pub fn pages(&self) -> usize {
        self.pages
    }

    /// One layer's key and value pools, `[pages * page_size, key_width]`.
    pub fn layer(&self, layer: usize) -> (&CudaSlice<f32>, &CudaSlice<f32>) {
        (&self.keys[layer], &self.values[layer])
    }
}

/// A SwiGLU MLP on the device: `w1, w3: [width, hidden]`, `w2: [hidden, width]`.
struct DeviceMlp {
    w1: CudaSlice<f32>,
    w3: CudaSlice<f32>,
    w2: CudaSlice<f32>,
    width: usize,
}

impl DeviceMlp {
    fn upload(gpu: &Gpu, w1: &[f32], w3: &[f32], w2: &[f32], width: usize) -> Result<Self> {
        Ok(Self {
            w1: gpu.upload(w1)?,
            w3: gpu.upload(w3)?,
            w2: gpu.upload(w2)?,
            width,
        })
    }

    fn from_mlp(gpu: &Gpu, mlp: &Mlp) -> Result<Self> {
        Self::upload(gpu, &mlp.w1, &mlp.w3, &mlp.w2, mlp.width)
    }

    /// `(silu(x w1ᵀ) * (x w3ᵀ)) w2ᵀ` for `x: [rows, hidden]`.
    fn forward(&self, gpu: &Gpu, x: &CudaSlice<f32>, hidden: usize) -> Result<CudaSlice<f32>> {
        let rows = x.len() / hidden;
        let w = self.width;
        let mut a = gpu.output::<f32>(rows * w)?;
        let mut b = gpu.output::<f32>(rows * w)?;
        let mut h = gpu.output::<f32>(rows * w)?;
        matmul::forward(gpu, Tf32, &mut a, x, &self.w1, hidden, w)?;
        matmul::forward(gpu, Tf32, &mut b, x, &self.w3, hidden, w)?;
        swiglu::forward(gpu, &mut h, &a, &b)?;
        let mut out = gpu.output::<f32>(rows * hidden)?;
        matmul::forward(gpu, Tf32, &mut out, &h, &self.w2, w, hidden)?;
        Ok(out)
    }
}

/// A MoE feed-forward layer on the device, every routed expert held (or,
/// on a rank of an expert-parallel replica, its share: `crate::cuda::serve_ep`).
pub(super) struct DeviceMoe {
    config: MoeConfig,
    router: CudaSlice<f32>,
    selection_bias: CudaSlice<f32>,
    /// The routed experts' weights, stacked `[experts, width, hidden]` (w1,
    /// w3) and `[experts, hidden, width]` (w2), as `MoeParams` holds them.
    w1: CudaSlice<f32>,
    w3: CudaSlice<f32>,
    w2: CudaSlice<f32>,
    /// The worker's own fused, ungated shared experts.
    shared: Option<DeviceMlp>,
    /// Qwen2-MoE's shared expert and its one-output gate `[hidden]`.
    gated_shared: Option<(DeviceMlp, CudaSlice<f32>)>,
    /// Token rows each expert computed since last taken (the CPU layer's
    /// count, from the offsets read back to size the GEMMs).
    rows: Vec<AtomicU64>,
}

impl DeviceMoe {
    fn upload(gpu: &Gpu, layer: &MoeLayer<f32>, gated: Option<(&Mlp, &[f32])>) -> Result<Self> {
        let config = layer.config().clone();
        let p = &layer.params;
        let shared = match p.shared(&config) {
            Some(mlp) => Some(DeviceMlp::upload(gpu, mlp.w1, mlp.w3, mlp.w2, mlp.hidden)?),
            None => None,
        };
        let gated_shared = match gated {
            Some((mlp, gate)) => Some((DeviceMlp::from_mlp(gpu, mlp)?, gpu.upload(gate)?)),
            None => None,
        };
        Ok(Self {
            router: gpu.upload(&p.router)?,
            selection_bias: gpu.upload(&layer.selection_bias)?,
            w1: gpu.upload(&p.experts_w1)?,
            w3: gpu.upload(&p.experts_w3)?,
            w2: gpu.upload(&p.experts_w2)?,
            shared,
            gated_shared,
            rows: (0..config.n_routed_experts)
                .map(|_| AtomicU64::new(0))
                .collect(),
            config,
        })
    }

    pub(super) fn config(&self) -> &MoeConfig {
        &self.config
    }

    /// The router and the routed experts held (all, or a rank's share:
    /// then the stacked tensors' expert `j` is the share's `j`-th).
    pub(super) fn weights(&self) -> RoutedWeights<'_> {
        RoutedWeights {
            router: &self.router,
            selection_bias: &self.selection_bias,
            w1: &self.w1,
            w3: &self.w3,
            w2: &self.w2,
            // Serving multiplies in TF32: nothing is derived.
            derived: None,
        }
    }

    /// Counts `rows` token rows computed by expert `e` (global index).
    pub(super) fn count_rows(&self, e: usize, rows: usize) {
        if let Some(counter) = self.rows.get(e) {
            counter.fetch_add(rows as u64, Ordering::Relaxed);
        }
    }

    /// The layer's output for `x: [tokens, hidden]`: the routed experts'
    /// gated sum, then the shared experts added (the CPU's order of terms).
    fn forward(&self, gpu: &Gpu, x: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
        let routed = routed_experts(gpu, Tf32, &self.config, &self.weights(), x)?;
        for (e, &load) in routed.routed.load.iter().enumerate() {
            self.count_rows(e, load);
        }
        let mut output = routed.output;
        self.add_shared(gpu, x, &mut output)?;
        Ok(output)
    }

    /// Whether the layer has shared experts (ungated or gated).
    pub(super) fn has_shared(&self) -> bool {
        self.shared.is_some() || self.gated_shared.is_some()
    }

    /// Adds the shared experts' outputs for `x: [tokens, hidden]` into
    /// `output` (after the routed experts', as the CPU adds them).
    pub(super) fn add_shared(
        &self,
        gpu: &Gpu,
        x: &CudaSlice<f32>,
        output: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let hidden = self.config.hidden;
        let tokens = x.len() / hidden;
        if let Some(shared) = &self.shared {
            let out = shared.forward(gpu, x, hidden)?;
            vector::add(gpu, output, &out)?;
        }
        // Qwen2-MoE: out += sigmoid(x · gate) * shared(x); the one-output
        // gate in exact f32 like the router (the CPU's gate is f32 too).
        if let Some((mlp, gate)) = &self.gated_shared {
            let out = mlp.forward(gpu, x, hidden)?;
            let mut gates = gpu.output::<f32>(tokens)?;
            matmul::forward_exact(gpu, &mut gates, x, gate, hidden, 1)?;
            vector::add_sigmoid_gated(gpu, output, &out, &gates)?;
        }
        Ok(())
    }
}

enum DeviceFfn {
    Dense(DeviceMlp),
    Moe(Box<DeviceMoe>),
}

/// Biases of the attention projections.
struct DeviceBias {
    q: CudaSlice<f32>,
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
    o: Option<CudaSlice<f32>>,
}

struct DeviceBlock {
    attention_norm: CudaSlice<f32>,
    wq: CudaSlice<f32>,
    wk: CudaSlice<f32>,
    wv: CudaSlice<f32>,
    wo: CudaSlice<f32>,
    bias: Option<DeviceBias>,
    qk_norm: Option<(CudaSlice<f32>, CudaSlice<f32>)>,
    ffn_norm: CudaSlice<f32>,
    ffn: DeviceFfn,
}

/// A grouped-query-attention model, ready to serve on one GPU.
pub struct DeviceEngine<'g> {
    gpu: &'g Gpu,
    config: ServeConfig,
    /// `[vocab, hidden]`: the embedding table (and the LM head when tied).
    embedding: CudaSlice<f32>,
    /// `[vocab, hidden]`; `None`: tied to the embedding.
    lm_head: Option<CudaSlice<f32>>,
    final_norm: CudaSlice<f32>,
    blocks: Vec<DeviceBlock>,
    rope: DeviceRope,
    /// Expert-parallel serving: the replica's ranks holding the other
    /// experts (`crate::cuda::serve_ep`); `None`: every expert is here.
    /// Behind a lock so the engine stays `Sync`, as the CPU engine's.
    exchange: Option<Mutex<DeviceExchange>>,
    /// Whether steps compute logits (a follower rank's do not: the
    /// leader samples).
    logits: bool,
}

impl<'g> DeviceEngine<'g> {
    /// Uploads `model`'s weights (f32) and its RoPE table. Fails with
    /// [`GpuError::Unsupported`] naming why for a model the device engine
    /// does not run ([`device::unsupported`]), before touching the GPU.
    pub fn new(gpu: &'g Gpu, model: &ServeModel) -> Result<Self> {
        if let Some(why) = device::unsupported(model) {
            return Err(GpuError::Unsupported(why));
        }
        Self::upload(gpu, model)
    }

    /// One rank of an expert-parallel replica: `model` holds exactly
    /// `exchange`'s experts of every MoE layer (its share, loaded alone),
    /// and every rank of the replica runs the same steps in the same
    /// order. Refused as [`Self::new`] refuses, and for a share that is
    /// not this rank's.
    pub fn expert_parallel(
        gpu: &'g Gpu,
        model: &ServeModel,
        exchange: DeviceExchange,
    ) -> Result<Self> {
        let own = exchange.local_experts();
        if let Some(why) = device::unsupported_share(model, Some(&own)) {
            return Err(GpuError::Unsupported(why));
        }
        for (layer, block) in model.blocks.iter().enumerate() {
            if let ServeFfn::Moe { layer: moe, .. } = &block.ffn {
                let n = moe.config().n_routed_experts;
                if n != exchange.n_experts() {
                    return Err(GpuError::Unsupported(format!(
                        "layer {layer} has {n} routed experts; the expert-parallel group was \
                         made for {}",
                        exchange.n_experts()
                    )));
                }
            }
        }
        let mut engine = Self::upload(gpu, model)?;
        engine.exchange = Some(Mutex::new(exchange));
        Ok(engine)
    }

    /// Steps compute no logits (they return none): a follower's engine.
    pub fn without_logits(mut self) -> Self {
        self.logits = false;
        self
    }

    /// As [`crate::serve::engine::Engine::expert_parallel_bytes`].
    pub fn expert_parallel_bytes(&self) -> (u64, u64) {
        self.exchange.as_ref().map_or((0, 0), |m| {
            m.lock().unwrap_or_else(PoisonError::into_inner).bytes()
        })
    }

    fn upload(gpu: &'g Gpu, model: &ServeModel) -> Result<Self> {
        let config = model.config.clone();
        let blocks = model
            .blocks
            .iter()
            .map(|block| {
                Ok(DeviceBlock {
                    attention_norm: gpu.upload(&block.attention_norm)?,
                    wq: gpu.upload(&block.wq)?,
                    wk: gpu.upload(&block.wk)?,
                    wv: gpu.upload(&block.wv)?,
                    wo: gpu.upload(&block.wo)?,
                    bias: match &block.bias {
                        Some(b) => Some(DeviceBias {
                            q: gpu.upload(&b.q)?,
                            k: gpu.upload(&b.k)?,
                            v: gpu.upload(&b.v)?,
                            o: b.o.as_deref().map(|o| gpu.upload(o)).transpose()?,
                        }),
                        None => None,
                    },
                    qk_norm: match &block.qk_norm {
                        Some((q, k)) => Some((gpu.upload(q)?, gpu.upload(k)?)),
                        None => None,
                    },
                    ffn_norm: gpu.upload(&block.ffn_norm)?,
                    ffn: match &block.ffn {
                        ServeFfn::Dense(mlp) => DeviceFfn::Dense(DeviceMlp::from_mlp(gpu, mlp)?),
                        ServeFfn::Moe {
                            layer,
                            gated_shared,
                        } => DeviceFfn::Moe(Box::new(DeviceMoe::upload(
                            gpu,
                            layer,
                            gated_shared.as_ref().map(|g| (&g.mlp, g.gate.as_slice())),
                        )?)),
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let rope = DeviceRope::new(gpu, &rope_table(&config), config.head_dim)?;
        Ok(Self {
            gpu,
            embedding: gpu.upload(&model.embedding)?,
            lm_head: model
                .lm_head
                .as_deref()
                .map(|h| gpu.upload(h))
                .transpose()?,
            final_norm: gpu.upload(&model.final_norm)?,
            blocks,
            rope,
            config,
            exchange: None,
            logits: true,
        })
    }

    /// As [`crate::serve::engine::Engine::take_expert_rows`]: `(decoder
    /// layer, expert, rows)` since the last call, for experts with rows.
    pub fn take_expert_rows(&self) -> Vec<(usize, usize, u64)> {
        let mut taken = Vec::new();
        for (layer, block) in self.blocks.iter().enumerate() {
            if let DeviceFfn::Moe(moe) = &block.ffn {
                for (e, rows) in moe.rows.iter().enumerate() {
                    let n = rows.swap(0, Ordering::Relaxed);
                    if n > 0 {
                        taken.push((layer, e, n));
                    }
                }
            }
        }
        taken
    }

    pub fn config(&self) -> &ServeConfig {
        &self.config
    }

    /// Bytes of the weights on the device (all f32).
    pub fn weight_bytes(&self) -> usize {
        let mlp = |m: &DeviceMlp| m.w1.len() + m.w3.len() + m.w2.len();
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| {
                let bias = b.bias.as_ref().map_or(0, |x| {
                    x.q.len() + x.k.len() + x.v.len() + x.o.as_ref().map_or(0, |o| o.len())
                });
                let qk_norm = b.qk_norm.as_ref().map_or(0, |(q, k)| q.len() + k.len());
                let ffn = match &b.ffn {
                    DeviceFfn::Dense(m) => mlp(m),
                    DeviceFfn::Moe(moe) => {
                        moe.router.len()
                            + moe.selection_bias.len()
                            + moe.w1.len()
                            + moe.w3.len()
                            + moe.w2.len()
                            + moe.shared.as_ref().map_or(0, mlp)
                            + moe
                                .gated_shared
                                .as_ref()
                                .map_or(0, |(m, g)| mlp(m) + g.len())
                    }
                };
                b.attention_norm.len()
                    + b.wq.len()
                    + b.wk.len()
                    + b.wv.len()
                    + b.wo.len()
                    + b.ffn_norm.len()
                    + bias
                    + qk_norm
                    + ffn
            })
            .sum();
        let rest = self.embedding.len()
            + self.lm_head.as_ref().map_or(0, |h| h.len())
            + self.final_norm.len();
        (blocks + rest) * size_of::<f32>()
    }

    pub fn context(&self) -> usize {
        self.config.context
    }

    /// The cache's shape, as [`crate::serve::engine::Engine::kv_shape`].
    pub fn kv_shape(&self, page_size: usize) -> KvShape {
        let (key_width, value_width) = self.config.kv_row_widths();
        KvShape {
            layers: self.config.layers,
            key_width,
            value_width,
            page_size,
        }
    }

    /// A device cache of `pages` pages for this model.
    pub fn cache(&self, page_size: usize, pages: usize) -> Result<DeviceKvCache> {
        DeviceKvCache::new(self.gpu, self.kv_shape(page_size), pages)
    }

    /// As [`crate::serve::engine::Engine::step`]: writes every chunk's keys
    /// and values into `cache` and returns `[chunks with logits, vocab]`
    /// logits in chunk order. A CUDA failure is [`StepError::Device`] (fatal:
    /// the context may be lost).
    pub fn step(
        &self,
        cache: &mut DeviceKvCache,
        chunks: &[Chunk<'_>],
    ) -> std::result::Result<Vec<f32>, StepError> {
        let page_size = cache.shape().page_size;
        check_chunks(
            chunks,
            self.context(),
            self.config.vocab,
            page_size,
            cache.pages(),
            // Adapters are served by the CPU engine only (refused with
            // the options), so a chunk naming one is a bug.
            0,
        )?;
        let layout = StepLayout::new(chunks, page_size);
        // Nothing to run (every rank of a replica sees the same chunks, so
        // all skip the exchanges alike).
        if layout.rows() == 0 {
            return Ok(Vec::new());
        }
        let mut exchange = self
            .exchange
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(PoisonError::into_inner));
        let ran = self.run(cache, &layout, exchange.as_deref_mut());
        // A failed exchange first: the zeros it left may have led to
        // nothing worse, and its `peer` flag says which rank failed first.
        if let Some(exchange) = exchange.as_deref_mut()
            && let Err(e) = exchange.take_failure()
        {
            return Err(StepError::Collective {
                message: e.to_string(),
                peer: e.is_peer_failure(),
            });
        }
        ran.map_err(|e| StepError::Device(e.to_string()))
    }

    fn run(
        &self,
        cache: &mut DeviceKvCache,
        layout: &StepLayout,
        mut exchange: Option<&mut DeviceExchange>,
    ) -> Result<Vec<f32>> {
        let gpu = self.gpu;
        // The scheduler thread is not the one that opened the GPU.
        gpu.context().bind_to_thread()?;
        let config = &self.config;
        let (h, vocab, eps) = (config.hidden, config.vocab, config.norm_eps);
        let n = layout.rows();
        let tokens = gpu.upload(&layout.tokens)?;
        let positions = gpu.upload(&layout.positions)?;
        let slots = gpu.upload(&layout.slots)?;
        let table_offsets = gpu.upload(&layout.table_offsets)?;
        let page_table = gpu.upload(&layout.page_table)?;
        let all_rows = gpu.upload(&layout.all_rows())?;
        let wanted = layout.logit_rows.len();
        let logit_rows = if wanted > 0 {
            Some(gpu.upload(&layout.logit_rows)?)
        } else {
            None
        };
        let index = StepIndex {
            positions: &positions,
            table_offsets: &table_offsets,
            page_table: &page_table,
            page_size: cache.shape().page_size,
        };
        let mut x = gpu.output::<f32>(n * h)?;
        embedding::forward(gpu, &mut x, &tokens, &self.embedding, h)?;
        let last_layer = self.blocks.len().saturating_sub(1);
        for (layer, block) in self.blocks.iter().enumerate() {
            let mut normed = gpu.output::<f32>(n * h)?;
            let mut rstd = gpu.output::<f32>(n)?;
            rmsnorm::forward(gpu, &mut normed, &mut rstd, &x, &block.attention_norm, eps)?;
            // Past the last layer's cache write only the logits rows
            // matter: its attention output and feed-forward run for those.
            let query_rows = if layer == last_layer {
                match &logit_rows {
                    Some(rows) => rows,
                    None => {
                        // No logits wanted (a prompt's middle chunk): the
                        // keys and values are all this step leaves.
                        self.write_kv(block, layer, &normed, cache, &positions, &slots)?;
                        return Ok(Vec::new());
                    }
                }
            } else {
                &all_rows
            };
            let m = query_rows.len();
            let q = self.write_kv(block, layer, &normed, cache, &positions, &slots)?;
            let mut attention = gpu.output::<f32>(m * config.q_width())?;
            let (keys, values) = cache.layer(layer);
            paged_attention::paged_attention(
                gpu,
                &mut attention,
                &q,
                keys,
                values,
                query_rows,
                &index,
                (config.heads, config.kv_heads, config.head_dim),
            )?;
            let mut mid = gpu.output::<f32>(m * h)?;
            matmul::forward(
                gpu,
                Tf32,
                &mut mid,
                &attention,
                &block.wo,
                config.q_width(),
                h,
            )?;
            if let Some(o) = block.bias.as_ref().and_then(|b| b.o.as_ref()) {
                vector::add_bias_rows(gpu, &mut mid, o)?;
            }
            if m == n {
                vector::add(gpu, &mut mid, &x)?;
            } else {
                let mut residual = gpu.output::<f32>(m * h)?;
                vector::gather_rows(gpu, &mut residual, &x, query_rows, h)?;
                vector::add(gpu, &mut mid, &residual)?;
            }
            let mut normed = gpu.output::<f32>(m * h)?;
            let mut rstd = gpu.output::<f32>(m)?;
            rmsnorm::forward(gpu, &mut normed, &mut rstd, &mid, &block.ffn_norm, eps)?;
            let mut out = match &block.ffn {
                DeviceFfn::Dense(mlp) => mlp.forward(gpu, &normed, h)?,
                DeviceFfn::Moe(moe) => match exchange.as_deref_mut() {
                    Some(exchange) => serve_ep::forward(gpu, moe, &normed, exchange)?,
                    None => moe.forward(gpu, &normed)?,
                },
            };
            vector::add(gpu, &mut out, &mid)?;
            x = out;
        }
        let Some(logit_rows) = logit_rows else {
            return Ok(Vec::new());
        };
        if !self.logits {
            return Ok(Vec::new());
        }
        // The last block left only the logits rows in `x` (a model without
        // blocks has them all).
        if self.blocks.is_empty() {
            let mut rows = gpu.output::<f32>(wanted * h)?;
            vector::gather_rows(gpu, &mut rows, &x, &logit_rows, h)?;
            x = rows;
        }
        let mut normed = gpu.output::<f32>(wanted * h)?;
        let mut rstd = gpu.output::<f32>(wanted)?;
        rmsnorm::forward(gpu, &mut normed, &mut rstd, &x, &self.final_norm, eps)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embedding);
        let mut logits = gpu.output::<f32>(wanted * vocab)?;
        matmul::forward(gpu, Tf32, &mut logits, &normed, head, h, vocab)?;
        gpu.download(&logits)
    }

    /// q, k, v of every row (biased, q/k-normed, clipped, rotated); the
    /// keys and values written into the rows' cache slots of `layer`.
    /// Returns the queries, `[rows, q_width]`.
    fn write_kv(
        &self,
        block: &DeviceBlock,
        layer: usize,
        normed: &CudaSlice<f32>,
        cache: &mut DeviceKvCache,
        positions: &CudaSlice<i32>,
        slots: &CudaSlice<i32>,
    ) -> Result<CudaSlice<f32>> {
        let gpu = self.gpu;
        let config = &self.config;
        let (h, qw, kvw) = (config.hidden, config.q_width(), config.kv_width());
        let n = positions.len();
        let mut q = gpu.output::<f32>(n * qw)?;
        let mut k = gpu.output::<f32>(n * kvw)?;
        let mut v = gpu.output::<f32>(n * kvw)?;
        matmul::forward(gpu, Tf32, &mut q, normed, &block.wq, h, qw)?;
        matmul::forward(gpu, Tf32, &mut k, normed, &block.wk, h, kvw)?;
        matmul::forward(gpu, Tf32, &mut v, normed, &block.wv, h, kvw)?;
        if let Some(bias) = &block.bias {
            vector::add_bias_rows(gpu, &mut q, &bias.q)?;
            vector::add_bias_rows(gpu, &mut k, &bias.k)?;
            vector::add_bias_rows(gpu, &mut v, &bias.v)?;
        }
        // RMSNorm in chunks of the gain's width: per head (Qwen3) or over a
        // token's whole projection (OLMoE), as the CPU engine.
        if let Some((q_gain, k_gain)) = &block.qk_norm {
            q = norm_chunks(gpu, &q, q_gain, config.norm_eps)?;
            k = norm_chunks(gpu, &k, k_gain, config.norm_eps)?;
        }
        if let Some(clip) = config.clip_qkv {
            vector::clamp(gpu, &mut q, clip)?;
            vector::clamp(gpu, &mut k, clip)?;
            vector::clamp(gpu, &mut v, clip)?;
        }
        let halves = config.rope_layout == RopeLayout::Halves;
        self.rope
            .forward_at(gpu, &mut q, positions, config.heads, halves)?;
        self.rope
            .forward_at(gpu, &mut k, positions, config.kv_heads, halves)?;
        paged_attention::kv_write(
            gpu,
            &mut cache.keys[layer],
            &mut cache.values[layer],
            &k,
            &v,
            slots,
        )?;
        Ok(q)
    }
}

/// `values` RMS-normalised in chunks of `gain`'s width.
fn norm_chunks(
    gpu: &Gpu,
    values: &CudaSlice<f32>,
    gain: &CudaSlice<f32>,
    eps: f32,
) -> Result<CudaSlice<f32>> {
    let mut out = gpu.output::<f32>(values.len())?;
    let mut rstd = gpu.output::<f32>(values.len() / gain.len())?;
    rmsnorm::forward(gpu, &mut out, &mut rstd, values, gain, eps)?;
    Ok(out)
}
