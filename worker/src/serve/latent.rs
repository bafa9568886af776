//! Multi-head latent attention (MLA, DeepSeek-V2/V3) in its absorbed form,
//! over a KV cache holding one latent per token.
//!
//! `transformers` expands every cached latent `c_kv` into per-head keys and
//! values (`kv_b_proj`) and runs ordinary attention. Per head `h`, with
//! `W_UK_h` and `W_UV_h` the key and value rows of `kv_b_proj`:
//!
//! ```text
//! score_t = q_nope_h · (W_UK_h c_t) + q_pe_h · k_pe_t = (W_UK_hᵀ q_nope_h) · c_t + q_pe_h · k_pe_t
//! out_h   = Σ_t p_t (W_UV_h c_t)                       = W_UV_h (Σ_t p_t c_t)
//! ```
//!
//! so the engine absorbs `W_UK_h` into the query once per token, scores
//! against the cached `[c_kv | k_pe]` directly, and applies `W_UV_h` once
//! to the weighted latent: nothing per head is cached or expanded per
//! position (`kv_lora_rank + qk_rope_head_dim` values per token and layer,
//! 576 in DeepSeek-V3, instead of 2 × 128 heads × 128).

use crate::ops::packed_linear::{PackedLinear, WeightPrecision};
use crate::ops::{rmsnorm, vector};
use crate::serve::kv_cache::{KvStore, PageId};
use crate::serve::model::{LatentShape, LatentWeights};

/// One block's latent attention, packed.
#[derive(Debug)]
pub(crate) struct LatentAttention {
    shape: LatentShape,
    heads: usize,
    /// `q_a_layernorm`'s gain and `q_b_proj`; `None`: the block's input
    /// projection gives the full query (`q_proj`).
    q_b: Option<(Vec<f32>, PackedLinear)>,
    kv_a_norm: Vec<f32>,
    /// Per head, `W_UK_hᵀ`: `q_nope` (`qk_nope`) to its `kv_lora_rank`-wide
    /// query against `c_kv`.
    absorb_k: Vec<PackedLinear>,
    /// Per head, `W_UV_h`: the weighted latent (`kv_lora_rank`) to the
    /// head's output (`v_head_dim`).
    expand_v: Vec<PackedLinear>,
}

impl LatentAttention {
    /// Splits `kv_b_proj` into the per-head absorbed matrices and packs them.
    pub fn pack(weights: LatentWeights, shape: &LatentShape, heads: usize) -> Self {
        let (nope, v, rank) = (shape.qk_nope_dim, shape.v_head_dim, shape.kv_lora_rank);
        let head_rows = (nope + v) * rank;
        assert_eq!(weights.kv_b.len(), heads * head_rows, "kv_b_proj's shape");
        let mut absorb_k = Vec::with_capacity(heads);
        let mut expand_v = Vec::with_capacity(heads);
        for head in weights.kv_b.chunks_exact(head_rows) {
            // `uk: [nope, rank]`, `uv: [v, rank]`, each `[out, in]` of kv_b.
            let (uk, uv) = head.split_at(nope * rank);
            let mut uk_t = vec![0.0; rank * nope];
            for (i, row) in uk.chunks_exact(rank).enumerate() {
                for (j, &w) in row.iter().enumerate() {
                    uk_t[j * nope + i] = w;
                }
            }
            absorb_k.push(PackedLinear::new(uk_t, nope, rank));
            expand_v.push(PackedLinear::new(uv.to_vec(), rank, v));
        }
        let q_b = weights.q_b.map(|(gain, w)| {
            let in_dim = gain.len();
            (
                gain,
                PackedLinear::new(w, in_dim, heads * shape.qk_head_dim()),
            )
        });
        Self {
            shape: shape.clone(),
            heads,
            q_b,
            kv_a_norm: weights.kv_a_norm,
            absorb_k,
            expand_v,
        }
    }

    /// Stores `q_b_proj` and the absorbed matrices at `precision` (FP8:
    /// the absorbed key matrices are `kv_b_proj`'s key rows transposed, so
    /// each of their scales covers one latent dimension of a head).
    pub fn round_to(&mut self, precision: WeightPrecision) {
        if let Some((_, q_b)) = &mut self.q_b {
            q_b.round_to(precision);
        }
        for linear in self.absorb_k.iter_mut().chain(&mut self.expand_v) {
            linear.round_to(precision);
        }
    }

    /// Bytes of the linear layers' weights, as stored.
    pub fn bytes(&self) -> usize {
        self.q_b.as_ref().map_or(0, |(_, q_b)| q_b.bytes())
            + self
                .absorb_k
                .iter()
                .chain(&self.expand_v)
                .map(PackedLinear::bytes)
                .sum::<usize>()
    }

    /// Width of the query part of the block's input projection row
    /// (`q_a_proj`'s or `q_proj`'s outputs), before the latent's.
    pub fn q_part(&self) -> usize {
        self.shape
            .q_lora_rank
            .unwrap_or(self.heads * self.shape.qk_head_dim())
    }

    /// From the block's input projection `projected: [n, q_part +
    /// latent_width]`, the absorbed queries `[n, heads, latent_width]`
    /// (per head `[W_UK_hᵀ q_nope | q_pe]`) and the latents `[n,
    /// latent_width]` (`[rmsnorm(c_kv) | k_pe]`); `q_pe` and `k_pe` still
    /// to be rotated.
    pub fn queries_and_latents(&self, projected: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
        let (q_part, width) = (self.q_part(), self.shape.latent_width());
        let rank = self.shape.kv_lora_rank;
        let n = projected.len() / (q_part + width);
        let mut q_in = Vec::with_capacity(n * q_part);
        let mut c_kv = Vec::with_capacity(n * rank);
        let mut k_pe = Vec::with_capacity(n * self.shape.qk_rope_dim);
        for row in projected.chunks_exact(q_part + width) {
            let (q, kv) = row.split_at(q_part);
            q_in.extend_from_slice(q);
            c_kv.extend_from_slice(&kv[..rank]);
            k_pe.extend_from_slice(&kv[rank..]);
        }
        let mut rstd = vec![0.0; n];
        let q = match &self.q_b {
            Some((gain, q_b)) => {
                let mut normed = vec![0.0; q_in.len()];
                rmsnorm::forward(&mut normed, &mut rstd, &q_in, gain, eps);
                let mut q = vec![0.0; n * q_b.out_dim()];
                q_b.forward(&mut q, &normed);
                q
            }
            None => q_in,
        };
        let mut normed = vec![0.0; c_kv.len()];
        rmsnorm::forward(&mut normed, &mut rstd, &c_kv, &self.kv_a_norm, eps);
        let mut latents = Vec::with_capacity(n * width);
        for (c, pe) in normed
            .chunks_exact(rank)
            .zip(k_pe.chunks_exact(self.shape.qk_rope_dim))
        {
            latents.extend_from_slice(c);
            latents.extend_from_slice(pe);
        }
        (self.absorb(&q), latents)
    }

    /// Queries `q: [n, heads, qk_nope + qk_rope]` to absorbed queries
    /// `[n, heads, kv_lora_rank + qk_rope]`: one GEMM per head over all rows.
    fn absorb(&self, q: &[f32]) -> Vec<f32> {
        let (nope, qk) = (self.shape.qk_nope_dim, self.shape.qk_head_dim());
        let (rank, width) = (self.shape.kv_lora_rank, self.shape.latent_width());
        let n = q.len() / (self.heads * qk);
        let mut queries = vec![0.0; n * self.heads * width];
        let mut q_nope = vec![0.0; n * nope];
        let mut absorbed = vec![0.0; n * rank];
        for (head, absorb) in self.absorb_k.iter().enumerate() {
            for (dst, row) in q_nope
                .chunks_exact_mut(nope)
                .zip(q.chunks_exact(qk * self.heads))
            {
                dst.copy_from_slice(&row[head * qk..head * qk + nope]);
            }
            absorb.forward(&mut absorbed, &q_nope);
            for ((dst, a), row) in queries
                .chunks_exact_mut(self.heads * width)
                .zip(absorbed.chunks_exact(rank))
                .zip(q.chunks_exact(qk * self.heads))
            {
                let dst = &mut dst[head * width..(head + 1) * width];
                dst[..rank].copy_from_slice(a);
                dst[rank..].copy_from_slice(&row[head * qk + nope..(head + 1) * qk]);
            }
        }
        queries
    }

    /// Causal attention of one absorbed query row (`[heads, latent_width]`,
    /// rotated) at `position` over the cached latents `0..=position`: each
    /// head's softmax-weighted sum of `c_kv` into `context: [heads,
    /// kv_lora_rank]`. Page by page, as grouped attention
    /// ([`super::engine::attend`]): every head shares the one latent row,
    /// and each value is computed as position by position, the same bits.
    pub fn attend(
        &self,
        context: &mut [f32],
        query: &[f32],
        cache: &KvStore,
        layer: usize,
        pages: &[PageId],
        position: usize,
    ) {
        let (rank, width) = (self.shape.kv_lora_rank, self.shape.latent_width());
        let scale = self.shape.softmax_scale as f32;
        let positions = position + 1;
        let mut scores = vec![0.0f32; positions];
        for (out, q) in context
            .chunks_exact_mut(rank)
            .zip(query.chunks_exact(width))
        {
            for (page, first, rows) in cache.spans(pages, positions) {
                let latents = cache.key_rows(layer, page, rows);
                vector::scaled_dots(&mut scores[first..first + rows], q, latents, width, scale);
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
            for (page, first, rows) in cache.spans(pages, positions) {
                let latents = cache.key_rows(layer, page, rows);
                vector::add_weighted_rows(out, &scores[first..first + rows], latents, width);
            }
        }
    }

    /// Weighted latents `contexts: [m, heads, kv_lora_rank]` to the
    /// attention output `[m, heads * v_head_dim]` (`o_proj`'s input).
    pub fn expand(&self, contexts: &[f32]) -> Vec<f32> {
        let (rank, v) = (self.shape.kv_lora_rank, self.shape.v_head_dim);
        let m = contexts.len() / (self.heads * rank);
        let mut out = vec![0.0; m * self.heads * v];
        let mut input = vec![0.0; m * rank];
        let mut values = vec![0.0; m * v];
        for (head, expand) in self.expand_v.iter().enumerate() {
            for (dst, row) in input
                .chunks_exact_mut(rank)
                .zip(contexts.chunks_exact(self.heads * rank))
            {
                dst.copy_from_slice(&row[head * rank..(head + 1) * rank]);
            }
            expand.forward(&mut values, &input);
            for (dst, value) in out
                .chunks_exact_mut(self.heads * v)
                .zip(values.chunks_exact(v))
            {
                dst[head * v..(head + 1) * v].copy_from_slice(value);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::random;
    use crate::serve::kv_cache::KvShape;

    fn f32s(n: usize, seed: u64) -> Vec<f32> {
        random(n, seed).into_iter().map(|v| v as f32).collect()
    }

    /// The absorbed form against the textbook one: every cached latent
    /// expanded into per-head keys `[W_UK_h c | k_pe]` and values `W_UV_h c`,
    /// then ordinary causal attention per head.
    #[test]
    fn absorbed_attention_is_attention_over_the_expanded_keys_and_values() {
        let shape = LatentShape {
            q_lora_rank: None,
            kv_lora_rank: 6,
            qk_nope_dim: 4,
            qk_rope_dim: 2,
            v_head_dim: 5,
            softmax_scale: 0.3,
        };
        let (heads, positions, page_size) = (3, 7, 4);
        let (rank, nope, qk, v) = (6, 4, 6, 5);
        let width = shape.latent_width();
        let kv_b = f32s(heads * (nope + v) * rank, 1);
        let weights = LatentWeights {
            q_b: None,
            kv_a_norm: vec![1.0; rank],
            kv_b: kv_b.clone(),
        };
        let attention = LatentAttention::pack(weights, &shape, heads);
        // Rotated queries `[heads, qk]` of the last position, latents per position.
        let q = f32s(heads * qk, 2);
        let latents = f32s(positions * width, 3);
        let kv_shape = KvShape {
            layers: 1,
            key_width: width,
            value_width: 0,
            page_size,
        };
        let pages = [1, 0];
        let mut cache = KvStore::new(kv_shape, 2);
        for (t, latent) in latents.chunks_exact(width).enumerate() {
            cache.write(0, &pages, t, latent, &[]);
        }
        let query = attention.absorb(&q);
        let mut context = vec![0.0; heads * rank];
        attention.attend(&mut context, &query, &cache, 0, &pages, positions - 1);
        let ours = attention.expand(&context);

        // The reference, in f64.
        let row = |m: &[f32], r: usize, cols: usize| -> Vec<f64> {
            m[r * cols..(r + 1) * cols]
                .iter()
                .map(|&x| x as f64)
                .collect()
        };
        let matvec = |rows: std::ops::Range<usize>, c: &[f64]| -> Vec<f64> {
            rows.map(|r| row(&kv_b, r, rank).iter().zip(c).map(|(a, b)| a * b).sum())
                .collect()
        };
        for h in 0..heads {
            let base = h * (nope + v);
            let qh = row(&q, h, qk);
            let mut scores = Vec::new();
            let mut values = Vec::new();
            for t in 0..positions {
                let latent = row(&latents, t, width);
                let (c, k_pe) = latent.split_at(rank);
                let mut key = matvec(base..base + nope, c);
                key.extend_from_slice(k_pe);
                let dot: f64 = qh.iter().zip(&key).map(|(a, b)| a * b).sum();
                scores.push(shape.softmax_scale * dot);
                values.push(matvec(base + nope..base + nope + v, c));
            }
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = weights.iter().sum();
            for d in 0..v {
                let want: f64 = weights
                    .iter()
                    .zip(&values)
                    .map(|(w, value)| w / sum * value[d])
                    .sum();
                let got = ours[h * v + d] as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "head {h}, dimension {d}: {got} vs {want}"
                );
            }
        }
    }

    /// With `q_lora_rank`, the query is `q_b(rmsnorm(q_a x))`; the latent
    /// is `[rmsnorm(c_kv) | k_pe]` with the gains applied.
    #[test]
    fn low_rank_queries_and_latents_are_normed_projections() {
        let shape = LatentShape {
            q_lora_rank: Some(3),
            kv_lora_rank: 2,
            qk_nope_dim: 2,
            qk_rope_dim: 2,
            v_head_dim: 1,
            softmax_scale: 1.0,
        };
        let heads = 1;
        // kv_b: W_UK = identity, W_UV = [1, 1]; q_b: [4, 3].
        let weights = LatentWeights {
            q_b: Some((vec![1.0, 2.0, 1.0], f32s(4 * 3, 4))),
            kv_a_norm: vec![2.0, 1.0],
            kv_b: vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0],
        };
        let q_b = weights.q_b.as_ref().unwrap().1.clone();
        let attention = LatentAttention::pack(weights, &shape, heads);
        // One row: q_a = [1, 1, 1] (rms 1), c_kv = [3, 4], k_pe = [5, 6].
        let projected = [1.0, 1.0, 1.0, 3.0, 4.0, 5.0, 6.0];
        let (queries, latents) = attention.queries_and_latents(&projected, 0.0);
        let rms = (12.5f32).sqrt();
        let expected = [2.0 * 3.0 / rms, 4.0 / rms, 5.0, 6.0];
        for (a, b) in latents.iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{latents:?}");
        }
        // q = q_b [1, 2, 1]; W_UK is the identity, so the absorbed query is q.
        let q: Vec<f32> = q_b
            .chunks_exact(3)
            .map(|w| w[0] + 2.0 * w[1] + w[2])
            .collect();
        for (a, b) in queries.iter().zip(&q) {
            assert!((a - b).abs() < 1e-5, "{queries:?} vs {q:?}");
        }
    }
}
