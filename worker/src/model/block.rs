//! One pre-norm transformer block:
//! `mid = x + Wo attention(rope(Wq n1), rope(Wk n1), Wv n1)` with `n1 = rmsnorm(x)`,
//! then `out = mid + ffn(rmsnorm(mid))`, the feed-forward layer dense or MoE.
//! With q/k norms (`model.qkNorm`), `Wq n1` and `Wk n1` are RMS-normed
//! before RoPE: per head or over the whole projection, as the gains' width says.

use crate::dist::expert_parallel::ExpertParallel;
use crate::dist::sequence_parallel::SequenceParallel;
use crate::memory::HeldBytes;
use crate::model::attention_core::{Attended, PackedDocuments};
use crate::model::config::ModelConfig;
use crate::model::scales::{BlockLinears, WK, WO, WQ, WV};
use crate::model::weights::{BlockWeights, FeedForward};
use crate::moe::expert::SwiGluActivations;
use crate::moe::expert_parallel::{self, ExpertParallelForward};
use crate::moe::routing::Routing;
use crate::moe::{MoeForward, MoeLayer, MoeParams, Sequences};
use crate::ops::attention::Qkv;
use crate::ops::rmsnorm;
use crate::ops::rope::RopeTable;
use crate::scalar::Scalar;

/// The block's activations, kept for its backward pass.
#[derive(Clone, Debug)]
pub(crate) struct BlockPass<T> {
    input: Vec<T>,
    attention_normed: Vec<T>,
    attention_rstd: Vec<T>,
    /// q and k as projected, before their norms, when the model has them.
    qk_norm: Option<QkNormPass<T>>,
    /// Queries and keys after RoPE, as attention saw them (with sequence
    /// parallelism: this rank's heads of every token).
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    attention_out: Vec<T>,
    probs: Vec<T>,
    /// The residual stream between the two sublayers.
    mid: Vec<T>,
    ffn_normed: Vec<T>,
    ffn_rstd: Vec<T>,
    pub(crate) ffn: FeedForwardPass<T>,
}

/// What the q/k norms' backward pass needs: their inputs and reciprocal RMS.
#[derive(Clone, Debug)]
struct QkNormPass<T> {
    q: Vec<T>,
    k: Vec<T>,
    q_rstd: Vec<T>,
    k_rstd: Vec<T>,
}

#[derive(Clone, Debug)]
pub(crate) enum FeedForwardPass<T> {
    Dense(SwiGluActivations<T>),
    Moe(MoeForward<T>),
    /// An MoE layer whose routed experts are spread over an expert-parallel group.
    MoeParallel(ExpertParallelForward<T>),
}

impl<T> FeedForwardPass<T> {
    /// The routing and this rank's per-expert load, for an MoE layer.
    pub fn routing(&self) -> Option<(&Routing<T>, Vec<usize>)> {
        match self {
            Self::Dense(_) => None,
            Self::Moe(pass) => Some((&pass.routing, pass.expert_load())),
            Self::MoeParallel(pass) => Some((&pass.routing, pass.expert_load())),
        }
    }
}

impl<T> BlockPass<T> {
    /// The block's input: all activation checkpointing keeps of the block.
    pub fn into_input(self) -> Vec<T> {
        self.input
    }
}

impl<T> HeldBytes for BlockPass<T> {
    fn held_bytes(&self) -> usize {
        let ffn = match &self.ffn {
            FeedForwardPass::Dense(activations) => activations.held_bytes(),
            FeedForwardPass::Moe(pass) => pass.held_bytes(),
            FeedForwardPass::MoeParallel(pass) => pass.held_bytes(),
        };
        [
            &self.input,
            &self.attention_normed,
            &self.attention_rstd,
            &self.q,
            &self.k,
            &self.v,
            &self.attention_out,
            &self.probs,
            &self.mid,
            &self.ffn_normed,
            &self.ffn_rstd,
        ]
        .iter()
        .map(|v| v.held_bytes())
        .sum::<usize>()
            + ffn
            + self.qk_norm.as_ref().map_or(0, |n| {
                n.q.held_bytes() + n.k.held_bytes() + n.q_rstd.held_bytes() + n.k_rstd.held_bytes()
            })
    }
}

/// Everything a block needs besides its weights.
pub(crate) struct BlockContext<'a, T> {
    pub config: &'a ModelConfig,
    pub rope: &'a RopeTable<T>,
    /// Where the MoE layers' routed experts live: here, or spread over this group.
    pub experts: Option<&'a ExpertParallel>,
    /// Whole sequences here, or this rank's slice of each (Ulysses).
    pub sequence: Option<&'a SequenceParallel>,
    /// The pass's sequences (or this rank's slices), and their padding.
    pub sequences: &'a Sequences,
    /// A packed batch's documents: attention stays within each.
    pub documents: Option<&'a PackedDocuments>,
}

impl<T: Scalar> BlockContext<'_, T> {
    /// Runs the block on `input: [tokens, hidden]` (whole sequences, or
    /// this rank's slice of each); returns its output.
    pub fn forward(
        &self,
        block: &BlockWeights<T, MoeLayer<T>>,
        linears: BlockLinears<'_>,
        input: Vec<T>,
    ) -> (Vec<T>, BlockPass<T>) {
        let config = self.config;
        let (h, qw, kv) = (config.hidden, config.q_width(), config.kv_width());
        let tokens = input.len() / h;
        let eps = T::from_f64(config.norm_eps);

        let mut attention_normed = vec![T::ZERO; input.len()];
        let mut attention_rstd = vec![T::ZERO; tokens];
        rmsnorm::forward(
            &mut attention_normed,
            &mut attention_rstd,
            &input,
            &block.attention_norm,
            eps,
        );
        let mut q = vec![T::ZERO; tokens * qw];
        let mut k = vec![T::ZERO; tokens * kv];
        let mut v = vec![T::ZERO; tokens * kv];
        let projections = linears.attention;
        let x = &attention_normed;
        projections.get(WQ).forward(&mut q, x, &block.wq, h, qw);
        projections.get(WK).forward(&mut k, x, &block.wk, h, kv);
        projections.get(WV).forward(&mut v, x, &block.wv, h, kv);
        let (q, k, qk_norm) = match config.qk_norm {
            None => (q, k, None),
            Some(_) => {
                let (q_normed, q_rstd) = norm_chunks(&q, &block.q_norm, eps);
                let (k_normed, k_rstd) = norm_chunks(&k, &block.k_norm, eps);
                let pass = QkNormPass {
                    q,
                    k,
                    q_rstd,
                    k_rstd,
                };
                (q_normed, k_normed, Some(pass))
            }
        };
        let Attended {
            q,
            k,
            v,
            probs,
            out: attention_out,
        } = self.attend(q, k, v);
        let mut mid = vec![T::ZERO; tokens * h];
        projections
            .get(WO)
            .forward(&mut mid, &attention_out, &block.wo, qw, h);
        add_into(&mut mid, &input);

        let mut ffn_normed = vec![T::ZERO; mid.len()];
        let mut ffn_rstd = vec![T::ZERO; tokens];
        rmsnorm::forward(&mut ffn_normed, &mut ffn_rstd, &mid, &block.ffn_norm, eps);
        let (mut output, ffn) = match &block.ffn {
            FeedForward::Dense(dense) => {
                let mut out = vec![T::ZERO; mid.len()];
                let mlp = dense.mlp(config).with_linears(linears.ffn);
                let activations = mlp.forward(&mut out, &ffn_normed);
                (out, FeedForwardPass::Dense(activations))
            }
            FeedForward::Moe(layer) => match self.experts {
                None => {
                    let mut pass =
                        layer.forward_in(linears.ffn, &ffn_normed, self.sequences, self.sequence);
                    (std::mem::take(&mut pass.output), FeedForwardPass::Moe(pass))
                }
                Some(ep) => {
                    let mut pass = expert_parallel::forward_in(
                        layer,
                        ep,
                        linears.ffn,
                        &ffn_normed,
                        self.sequences,
                        self.sequence,
                    );
                    let output = std::mem::take(&mut pass.output);
                    (output, FeedForwardPass::MoeParallel(pass))
                }
            },
        };
        add_into(&mut output, &mid);
        let pass = BlockPass {
            input,
            attention_normed,
            attention_rstd,
            qk_norm,
            q,
            k,
            v,
            attention_out,
            probs,
            mid,
            ffn_normed,
            ffn_rstd,
            ffn,
        };
        (output, pass)
    }

    /// Turns `dres` from d loss / d output into d loss / d input, adding the
    /// weight gradients into `grads`.
    pub fn backward(
        &self,
        block: &BlockWeights<T, MoeLayer<T>>,
        linears: BlockLinears<'_>,
        pass: &BlockPass<T>,
        dres: &mut [T],
        grads: &mut BlockWeights<T, MoeParams<T>>,
    ) {
        let config = self.config;
        let (h, qw, kv) = (config.hidden, config.q_width(), config.kv_width());

        // The feed-forward sublayer; the residual path passes `dres` through unchanged.
        let mut dffn_normed = vec![T::ZERO; dres.len()];
        match (&block.ffn, &pass.ffn, &mut grads.ffn) {
            (FeedForward::Dense(dense), FeedForwardPass::Dense(acts), FeedForward::Dense(g)) => {
                dense.mlp(config).with_linears(linears.ffn).backward(
                    &mut dffn_normed,
                    g.grads(),
                    dres,
                    &pass.ffn_normed,
                    acts,
                );
            }
            (FeedForward::Moe(layer), FeedForwardPass::Moe(moe_pass), FeedForward::Moe(g)) => {
                layer.backward_with(
                    linears.ffn,
                    moe_pass,
                    &pass.ffn_normed,
                    dres,
                    &mut dffn_normed,
                    g,
                );
            }
            (
                FeedForward::Moe(layer),
                FeedForwardPass::MoeParallel(moe_pass),
                FeedForward::Moe(g),
            ) => {
                let ep = self
                    .experts
                    .expect("an expert-parallel pass is differentiated with its group");
                expert_parallel::backward(
                    layer,
                    ep,
                    linears.ffn,
                    moe_pass,
                    &pass.ffn_normed,
                    dres,
                    &mut dffn_normed,
                    g,
                );
            }
            _ => unreachable!("a block's weights, activations and gradients share one layout"),
        }
        rmsnorm::backward(
            dres,
            &mut grads.ffn_norm,
            &dffn_normed,
            &pass.mid,
            &block.ffn_norm,
            &pass.ffn_rstd,
        );

        // The attention sublayer.
        let mut dattention = vec![T::ZERO; dres.len() / h * qw];
        let projections = linears.attention;
        projections.get(WO).backward(
            &mut dattention,
            &mut grads.wo,
            dres,
            &pass.attention_out,
            &block.wo,
            qw,
            h,
        );
        let qkv = Qkv {
            q: &pass.q,
            k: &pass.k,
            v: &pass.v,
        };
        let (mut dq, mut dk, dv) = self.attend_backward(qkv, &pass.probs, &dattention);
        if let Some(norms) = &pass.qk_norm {
            let mut dq_projected = vec![T::ZERO; dq.len()];
            let mut dk_projected = vec![T::ZERO; dk.len()];
            rmsnorm::backward(
                &mut dq_projected,
                &mut grads.q_norm,
                &dq,
                &norms.q,
                &block.q_norm,
                &norms.q_rstd,
            );
            rmsnorm::backward(
                &mut dk_projected,
                &mut grads.k_norm,
                &dk,
                &norms.k,
                &block.k_norm,
                &norms.k_rstd,
            );
            (dq, dk) = (dq_projected, dk_projected);
        }
        let mut dnormed = vec![T::ZERO; dres.len()];
        let x = &pass.attention_normed;
        let dx = &mut dnormed;
        projections
            .get(WQ)
            .backward(dx, &mut grads.wq, &dq, x, &block.wq, h, qw);
        projections
            .get(WK)
            .backward(dx, &mut grads.wk, &dk, x, &block.wk, h, kv);
        projections
            .get(WV)
            .backward(dx, &mut grads.wv, &dv, x, &block.wv, h, kv);
        rmsnorm::backward(
            dres,
            &mut grads.attention_norm,
            &dnormed,
            &pass.input,
            &block.attention_norm,
            &pass.attention_rstd,
        );
    }
}

/// `x` RMS-normed in chunks of `gain`'s width (a head, or a whole
/// projection), with each chunk's reciprocal RMS.
fn norm_chunks<T: Scalar>(x: &[T], gain: &[T], eps: T) -> (Vec<T>, Vec<T>) {
    let mut normed = vec![T::ZERO; x.len()];
    let mut rstd = vec![T::ZERO; x.len() / gain.len()];
    rmsnorm::forward(&mut normed, &mut rstd, x, gain, eps);
    (normed, rstd)
}

fn add_into<T: Scalar>(target: &mut [T], addend: &[T]) {
    for (t, &a) in target.iter_mut().zip(addend) {
        *t += a;
    }
}
