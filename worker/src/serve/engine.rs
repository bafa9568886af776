//! The inference forward pass with a paged KV cache: any mix of sequences,
//! each contributing a chunk of new tokens (a whole prompt, a piece of one,
//! or the one token sampled last step), run through the model together.
//!
//! It reuses the training model's weights and ops and repeats the training
//! forward's arithmetic in the same order, so a prefill followed by
//! one-token decodes reproduces the full-sequence logits (tested against
//! [`crate::model::Model::forward`]). Every op works row by row (the GEMMs
//! sum each output in a fixed order whatever the row count, routing is per
//! token, attention per sequence), so a sequence's logits do not depend on
//! what else is in the batch: batching is invisible to the bit.

use crate::model::Model;
use crate::ops::rope::RopeTable;
use crate::ops::{embedding, matmul, rmsnorm};
use crate::serve::kv_cache::{KvShape, KvStore, PageId};
use crate::serve::model::{RopeLayout, ServeConfig, ServeFfn, ServeModel};

/// One sequence's share of a step.
#[derive(Clone, Copy, Debug)]
pub struct Chunk<'a> {
    /// The sequence's pages, in position order; they must cover every
    /// position up to `start + tokens.len()`.
    pub pages: &'a [PageId],
    /// Position of `tokens[0]`; positions before it are already cached.
    pub start: usize,
    pub tokens: &'a [u32],
    /// Whether to compute the next-token logits after the chunk's last token.
    pub logits: bool,
}

/// Why a step cannot run; the scheduler's checks make these unreachable,
/// and they are errors rather than panics so a bug fails one step, not the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepError {
    EmptyChunk,
    BeyondContext { position: usize, context: usize },
    TokenOutOfVocabulary(u32),
    NotEnoughPages { position: usize, pages: usize },
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
        }
    }
}

impl std::error::Error for StepError {}

/// The model, ready to serve.
#[derive(Debug)]
pub struct Engine {
    model: ServeModel,
    rope: RopeTable<f32>,
}

impl Engine {
    /// Serves the worker's own `model` with a context of its training
    /// sequence length (the positions RoPE was trained on).
    pub fn new(model: Model<f32>) -> Self {
        Self::serve(ServeModel::from_native(model))
    }

    /// Serves any model, with a context of `model.config.context`.
    pub fn serve(model: ServeModel) -> Self {
        let config = &model.config;
        let rope = RopeTable::new(config.context, config.head_dim, config.rope_theta);
        Self { model, rope }
    }

    pub fn config(&self) -> &ServeConfig {
        &self.model.config
    }

    /// Longest sequence (prompt and completion) the engine runs.
    pub fn context(&self) -> usize {
        self.config().context
    }

    pub fn kv_shape(&self, page_size: usize) -> KvShape {
        KvShape {
            layers: self.config().layers,
            kv_width: self.config().kv_width(),
            page_size,
        }
    }

    /// Runs one step: writes every chunk's keys and values into `cache` and
    /// returns `[chunks with logits, vocab]` logits, in chunk order.
    pub fn step(&self, cache: &mut KvStore, chunks: &[Chunk<'_>]) -> Result<Vec<f32>, StepError> {
        let config = self.config();
        let (h, qw, kv, vocab) = (
            config.hidden,
            config.q_width(),
            config.kv_width(),
            config.vocab,
        );
        let head_dim = config.head_dim;
        self.check(cache, chunks)?;
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
        let mut x = vec![0.0; n * h];
        embedding::forward(&mut x, &tokens, &self.model.embedding, h);
        let eps = config.norm_eps;
        let mut normed = vec![0.0; n * h];
        let mut rstd = vec![0.0; n];
        for (layer, block) in self.model.blocks.iter().enumerate() {
            // Attention: x + Wo attention(rope(Wq n), rope(Wk n), Wv n).
            rmsnorm::forward(&mut normed, &mut rstd, &x, &block.attention_norm, eps);
            let mut q = vec![0.0; n * qw];
            let mut k = vec![0.0; n * kv];
            let mut v = vec![0.0; n * kv];
            matmul::forward(&mut q, &normed, &block.wq, h, qw);
            matmul::forward(&mut k, &normed, &block.wk, h, kv);
            matmul::forward(&mut v, &normed, &block.wv, h, kv);
            if let Some(bias) = &block.bias {
                add_bias(&mut q, &bias.q);
                add_bias(&mut k, &bias.k);
                add_bias(&mut v, &bias.v);
            }
            // Qwen3: q = q_norm(q), k = k_norm(k) per head, before RoPE.
            if let Some((q_gain, k_gain)) = &block.qk_norm {
                for (values, gain) in [(&mut q, q_gain), (&mut k, k_gain)] {
                    let input = values.clone();
                    let mut head_rstd = vec![0.0; input.len() / head_dim];
                    rmsnorm::forward(values, &mut head_rstd, &input, gain, eps);
                }
            }
            for (r, &(c, position)) in rows.iter().enumerate() {
                self.rotate(&mut q[r * qw..(r + 1) * qw], position);
                self.rotate(&mut k[r * kv..(r + 1) * kv], position);
                let (kr, vr) = (&k[r * kv..(r + 1) * kv], &v[r * kv..(r + 1) * kv]);
                cache.write(layer, chunks[c].pages, position, kr, vr);
            }
            let mut attention = vec![0.0; n * qw];
            for (r, &(c, position)) in rows.iter().enumerate() {
                let out = &mut attention[r * qw..(r + 1) * qw];
                self.attend(
                    out,
                    &q[r * qw..(r + 1) * qw],
                    cache,
                    layer,
                    chunks[c].pages,
                    position,
                );
            }
            let mut mid = vec![0.0; n * h];
            matmul::forward(&mut mid, &attention, &block.wo, qw, h);
            if let Some(o) = block.bias.as_ref().and_then(|b| b.o.as_ref()) {
                add_bias(&mut mid, o);
            }
            add_into(&mut mid, &x);

            // Feed-forward: mid + ffn(rmsnorm(mid)).
            rmsnorm::forward(&mut normed, &mut rstd, &mid, &block.ffn_norm, eps);
            let mut out = match &block.ffn {
                ServeFfn::Dense(mlp) => {
                    let mut out = vec![0.0; n * h];
                    mlp.swiglu(h).forward(&mut out, &normed);
                    out
                }
                // Rows are unrelated tokens here, so each is its own
                // "sequence" for the (training-only) balance loss.
                ServeFfn::Moe {
                    layer,
                    gated_shared,
                } => {
                    let mut out = layer.forward(&normed, 1).output;
                    // Qwen2-MoE: out += sigmoid(x · gate) * shared(x).
                    if let Some(shared) = gated_shared {
                        let mut shared_out = vec![0.0; n * h];
                        shared.mlp.swiglu(h).forward(&mut shared_out, &normed);
                        let mut gate = vec![0.0; n];
                        matmul::forward(&mut gate, &normed, &shared.gate, h, 1);
                        for ((row, shared_row), &g) in out
                            .chunks_exact_mut(h)
                            .zip(shared_out.chunks_exact(h))
                            .zip(&gate)
                        {
                            let g = 1.0 / (1.0 + (-g).exp());
                            for (o, &s) in row.iter_mut().zip(shared_row) {
                                *o += g * s;
                            }
                        }
                    }
                    out
                }
            };
            add_into(&mut out, &mid);
            x = out;
        }
        // Final norm and LM head, only for the rows that want logits.
        let mut last_rows = Vec::new();
        let mut row = 0;
        for chunk in chunks {
            row += chunk.tokens.len();
            if chunk.logits {
                last_rows.extend_from_slice(&x[(row - 1) * h..row * h]);
            }
        }
        let m = last_rows.len() / h;
        let mut final_normed = vec![0.0; m * h];
        let mut final_rstd = vec![0.0; m];
        rmsnorm::forward(
            &mut final_normed,
            &mut final_rstd,
            &last_rows,
            &self.model.final_norm,
            eps,
        );
        let mut logits = vec![0.0; m * vocab];
        matmul::forward(&mut logits, &final_normed, self.model.lm_head(), h, vocab);
        Ok(logits)
    }

    fn check(&self, cache: &KvStore, chunks: &[Chunk<'_>]) -> Result<(), StepError> {
        let (context, vocab) = (self.context(), self.config().vocab);
        let page_size = cache.shape().page_size;
        for chunk in chunks {
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
        }
        Ok(())
    }

    /// RoPE at `position` for one token's heads (as [`RopeTable::forward`]
    /// does for token `position` of a training sequence), pairing the
    /// dimensions as the model's layout says.
    fn rotate(&self, x: &mut [f32], position: usize) {
        let head_dim = self.config().head_dim;
        let pairs = head_dim / 2;
        let angles = position * pairs..(position + 1) * pairs;
        let (cos, sin) = (&self.rope.cos()[angles.clone()], &self.rope.sin()[angles]);
        for head in x.chunks_exact_mut(head_dim) {
            match self.config().rope_layout {
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

    /// Causal grouped-query attention of one query row at `position` over
    /// the cached positions `0..=position`, in the training op's order:
    /// scaled dot products, a max-shifted softmax, then the weighted sum of
    /// values in ascending position.
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
        let head_dim = config.head_dim;
        let group = config.heads / config.kv_heads;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let mut scores = vec![0.0f32; position + 1];
        for (head, (out, q)) in out
            .chunks_exact_mut(head_dim)
            .zip(q.chunks_exact(head_dim))
            .enumerate()
        {
            let kv = (head / group) * head_dim..(head / group + 1) * head_dim;
            for (t, s) in scores.iter_mut().enumerate() {
                let key = &cache.key(layer, pages, t)[kv.clone()];
                *s = scale * q.iter().zip(key).fold(0.0, |acc, (&a, &b)| acc + a * b);
            }
            let max = scores.iter().fold(scores[0], |m, &s| m.max(s));
            let mut sum = 0.0;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            for s in scores.iter_mut() {
                *s /= sum;
            }
            out.fill(0.0);
            for (t, &p) in scores.iter().enumerate() {
                let value = &cache.value(layer, pages, t)[kv.clone()];
                for (o, &vi) in out.iter_mut().zip(value) {
                    *o += p * vi;
                }
            }
        }
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
