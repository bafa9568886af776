//! The MoE transformer: token embedding, `layers` pre-norm blocks (causal
//! grouped-query attention with RoPE, then a dense SwiGLU or MoE
//! feed-forward layer), a final RMSNorm, the LM head and the mean
//! cross-entropy of next-token prediction, with a hand-written backward pass.

mod attention_core;
mod block;
pub mod config;
pub mod flops;
pub mod hf_export;
pub mod pretrained;
mod recompute;
mod scales;
pub mod weights;

use std::fmt;
use std::ops::Range;

use crate::data::Batch;
use crate::dist::DistError;
use crate::dist::expert_parallel::ExpertParallel;
use crate::dist::sequence_parallel::SequenceParallel;
use crate::fp8::DelayedScale;
use crate::linear::{Linear, Linears};
use crate::memory::HeldBytes;
pub(crate) use crate::model::attention_core::PackedDocuments;
use crate::model::block::{BlockContext, FeedForwardPass};
use crate::model::recompute::BlockActivations;
use crate::model::scales::BlockScales;
use crate::moe::{MoeLayer, MoeParams, Sequences};
use crate::ops::cross_entropy::{self, LossScale};
use crate::ops::rope::RopeTable;
use crate::ops::{embedding, rmsnorm};
use crate::rng::SplitMix64;
use crate::scalar::Scalar;

pub use config::ModelConfig;
// The device model numbers its linear layers as the CPU does.
pub use recompute::ActivationMemory;
#[cfg(feature = "cuda")]
pub(crate) use scales::{ATTENTION_LINEARS, WK, WO, WQ, WV};
pub use weights::{FeedForward, Gradients, NamedTensor, TensorBytes, TensorKind, Weights};

/// The model: its shape, weights (with the MoE layers' selection biases) and RoPE table.
#[derive(Clone, Debug)]
pub struct Model<T> {
    config: ModelConfig,
    pub weights: Weights<T, MoeLayer<T>>,
    rope: RopeTable<T>,
    /// Per block; holds delayed scales only for the tensorwise FP8 recipe.
    /// Not checkpointed: a resumed run rebuilds its amax histories.
    scales: Vec<BlockScales>,
}

/// Why weights do not fit a model config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShapeMismatch {
    /// Different blocks, or a dense feed-forward layer where the config has MoE (or back).
    Layout,
    /// One tensor (by canonical name) has the wrong number of values.
    Tensor {
        name: String,
        expected: usize,
        found: usize,
    },
}

impl fmt::Display for ShapeMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Layout => write!(
                f,
                "the blocks (count, dense or MoE, routed experts held) differ from what the model config implies"
            ),
            Self::Tensor {
                name,
                expected,
                found,
            } => write!(
                f,
                "tensor {name} has {found} values, but the model config implies {expected}"
            ),
        }
    }
}

impl std::error::Error for ShapeMismatch {}

/// What a pass's tokens are besides whole sequences; the default: every
/// token real, each sequence one document.
#[derive(Clone, Copy, Default)]
pub(crate) struct BatchLayout<'a> {
    /// Each sequence's (or this rank's slice's) real tokens, the rest padding.
    pub real: Option<&'a [usize]>,
    /// Packed sequences: per token of the whole sequences, where its
    /// document starts ([`Batch::documents`]).
    pub documents: Option<&'a [u32]>,
    /// Tokens per sequence (or slice) when not the model's `seqLen` (or a
    /// sequence-parallel rank's share of it): a batch whose common padding
    /// was cut ([`Batch::trim_padding`]).
    pub seq_len: Option<usize>,
}

impl<'a> BatchLayout<'a> {
    /// Tokens per sequence (or slice) of a pass of `config` laid out so: a
    /// sequence-parallel rank's share of `seqLen`, else the batch's length
    /// (cut to its longest sequence), else `seqLen`.
    pub(crate) fn seq_len_of(
        &self,
        config: &ModelConfig,
        sequence: Option<&SequenceParallel>,
    ) -> usize {
        match (sequence, self.seq_len) {
            (Some(sp), len) => {
                assert!(
                    len.is_none_or(|l| l == sp.local_len()),
                    "a sequence-parallel rank's slices are whole shares of seqLen"
                );
                sp.local_len()
            }
            (None, Some(len)) => {
                assert!(
                    (1..=config.seq_len).contains(&len),
                    "sequences of {len} tokens for a model of seqLen {}",
                    config.seq_len
                );
                len
            }
            (None, None) => config.seq_len,
        }
    }

    /// `batch`'s padding, documents and length.
    pub(crate) fn of(batch: &'a Batch) -> Self {
        Self {
            real: Some(&batch.real),
            documents: batch.documents.as_deref(),
            seq_len: Some(batch.seq_len),
        }
    }
}

/// How a pass is spread over ranks; the default is one process.
#[derive(Clone, Copy, Default)]
pub struct Parallel<'a> {
    /// Each sequence split over these ranks (Ulysses): the pass gets this
    /// rank's slice of every sequence.
    pub sequence: Option<&'a SequenceParallel>,
    /// The MoE layers' routed experts spread over these ranks.
    pub experts: Option<&'a ExpertParallel>,
}

impl Parallel<'_> {
    /// The first exchange failure of a pass, from either group.
    fn take_failure(&self) -> Result<(), DistError> {
        if let Some(sp) = self.sequence {
            sp.take_failure()?;
        }
        if let Some(ep) = self.experts {
            ep.take_failure()?;
        }
        Ok(())
    }
}

/// A forward pass: the losses and every activation the backward pass needs.
#[derive(Clone, Debug)]
pub struct ForwardPass<T> {
    tokens: Vec<u32>,
    /// How the tokens split into sequences, and which are padding.
    sequences: Sequences,
    /// A packed batch's documents.
    documents: Option<PackedDocuments>,
    /// With ignored ones replaced by 0 (see `loss_weights`).
    targets: Vec<u32>,
    /// Each position's weight in `cross_entropy` (0 for an ignored target).
    loss_weights: Vec<T>,
    blocks: Vec<BlockActivations<T>>,
    final_input: Vec<T>,
    final_normed: Vec<T>,
    final_rstd: Vec<T>,
    probs: Vec<T>,
    /// Next-token cross-entropy, in nats: the mean over the trained
    /// targets, or the pass's share of its step's ([`LossScale`]).
    pub cross_entropy: f64,
    /// Sum of the MoE layers' sequence-wise balance losses (0 when off);
    /// with sequence parallelism, the whole sequences' (the same on every
    /// rank of the group).
    pub aux_loss: f64,
}

impl<T> ForwardPass<T> {
    /// The training objective the backward pass differentiates.
    pub fn loss(&self) -> f64 {
        self.cross_entropy + self.aux_loss
    }

    /// Each MoE block's routing choice, `[tokens, top_k]` expert indices:
    /// a gradient check uses it to confirm a nudge did not change the
    /// (piecewise constant) selection.
    pub fn selected_experts(&self) -> Vec<&[usize]> {
        self.blocks
            .iter()
            .filter_map(BlockActivations::selected_experts)
            .collect()
    }

    /// Tokens routed to each expert, one list per MoE block in order.
    pub fn expert_loads(&self) -> Vec<Vec<usize>> {
        self.blocks
            .iter()
            .filter_map(BlockActivations::expert_load)
            .collect()
    }

    /// The next-token distribution at every position, `[tokens, vocab]`
    /// (the softmax of the logits): what serving's cached forward must reproduce.
    pub fn next_token_probs(&self) -> &[T] {
        &self.probs
    }

    /// Bytes of activations this pass holds for the backward pass: every
    /// buffer it owns (token ids and the final softmax included), counted by
    /// capacity. With [`ActivationMemory::RecomputeBlocks`] the backward pass
    /// additionally holds one recomputed block at a time.
    pub fn activation_bytes(&self) -> usize {
        let blocks: usize = self.block_activation_bytes().iter().sum();
        blocks
            + self.tokens.held_bytes()
            + self.targets.held_bytes()
            + self.loss_weights.held_bytes()
            + self.final_input.held_bytes()
            + self.final_normed.held_bytes()
            + self.final_rstd.held_bytes()
            + self.probs.held_bytes()
    }

    /// The part of [`Self::activation_bytes`] each block holds, in block order.
    pub fn block_activation_bytes(&self) -> Vec<usize> {
        self.blocks.iter().map(HeldBytes::held_bytes).collect()
    }
}

impl<T: Scalar> Model<T> {
    /// Freshly initialised weights, deterministic in `seed` (see [`weights::initial_weights`]).
    pub fn initial(config: ModelConfig, seed: u64) -> Self {
        let experts = 0..config.moe.n_routed_experts;
        Self::initial_with_experts(config, seed, experts)
    }

    /// [`Self::initial`] holding only routed experts `experts` (an
    /// expert-parallel rank's), with the values [`Self::initial`] gives them.
    pub fn initial_with_experts(config: ModelConfig, seed: u64, experts: Range<usize>) -> Self {
        let mut rng = SplitMix64::new(seed);
        let weights = weights::initial_weights_with_experts(&config, &mut rng, experts);
        Self::new(config, weights).expect("initial weights are shaped from the config")
    }

    /// A model from given weights (with zero selection biases), checking
    /// every tensor's size. The MoE layers may hold only some routed
    /// experts ([`MoeParams::experts`]), the same ones in every layer.
    pub fn new(
        config: ModelConfig,
        weights: Weights<T, MoeParams<T>>,
    ) -> Result<Self, ShapeMismatch> {
        check_shapes(&config, &weights)?;
        let blocks = weights
            .blocks
            .into_iter()
            .map(|block| {
                let ffn = match block.ffn {
                    FeedForward::Dense(dense) => FeedForward::Dense(dense),
                    FeedForward::Moe(params) => FeedForward::Moe(
                        MoeLayer::new(config.moe.clone(), params)
                            .map_err(|_| ShapeMismatch::Layout)?,
                    ),
                };
                Ok(weights::BlockWeights {
                    attention_norm: block.attention_norm,
                    wq: block.wq,
                    wk: block.wk,
                    wv: block.wv,
                    wo: block.wo,
                    q_norm: block.q_norm,
                    k_norm: block.k_norm,
                    ffn_norm: block.ffn_norm,
                    ffn,
                })
            })
            .collect::<Result<_, ShapeMismatch>>()?;
        let rope = RopeTable::new(config.seq_len, config.head_dim(), config.rope_theta);
        let scales = BlockScales::for_model(&config);
        Ok(Self {
            weights: Weights {
                embedding: weights.embedding,
                blocks,
                final_norm: weights.final_norm,
                lm_head: weights.lm_head,
            },
            config,
            rope,
            scales,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The routed experts this model's MoE layers hold.
    pub fn held_experts(&self) -> Range<usize> {
        self.weights.held_experts()
    }

    /// Every trainable tensor in canonical order.
    pub fn tensors(&self) -> Vec<NamedTensor<'_, T>> {
        self.weights.tensors(&self.config)
    }

    /// The MoE layers in block order.
    pub fn moe_layers(&self) -> impl Iterator<Item = &MoeLayer<T>> {
        self.weights.blocks.iter().filter_map(|b| match &b.ffn {
            FeedForward::Moe(layer) => Some(layer),
            FeedForward::Dense(_) => None,
        })
    }

    pub fn moe_layers_mut(&mut self) -> impl Iterator<Item = &mut MoeLayer<T>> {
        self.weights
            .blocks
            .iter_mut()
            .filter_map(|b| match &mut b.ffn {
                FeedForward::Moe(layer) => Some(layer),
                FeedForward::Dense(_) => None,
            })
    }

    /// The aux-loss-free balancing step after an optimizer step, given each
    /// MoE layer's load over the step; nothing when it is disabled.
    pub fn update_selection_biases(&mut self, loads: &[Vec<usize>]) {
        if let Some(rate) = self.config.bias_update_rate {
            let rate = T::from_f64(rate);
            for (layer, load) in self.moe_layers_mut().zip(loads) {
                layer.update_selection_bias(load, rate);
            }
        }
    }

    /// The tensorwise FP8 recipe's amax histories (input, weight, output
    /// gradient; oldest first) of every linear layer, numbered as the
    /// blocks hand them out; empty for the other precisions.
    pub fn fp8_histories(&self) -> Vec<[Vec<f32>; 3]> {
        self.scales
            .iter()
            .flat_map(BlockScales::layers)
            .map(|l| [&l.input, &l.weight, &l.grad_output].map(|s| s.history().collect()))
            .collect()
    }

    /// The amaxes observed this step (input, weight, output gradient of
    /// every linear layer, as [`Self::fp8_histories`] lists them; 0 for a
    /// tensor not seen); empty for the other precisions.
    pub fn fp8_observed(&self) -> Vec<f32> {
        self.scales
            .iter()
            .flat_map(BlockScales::layers)
            .flat_map(|l| [&l.input, &l.weight, &l.grad_output].map(DelayedScale::observed))
            .collect()
    }

    /// Observes `amaxes` (laid out as [`Self::fp8_observed`]): the
    /// world's, after an all-reduce max, so that every rank's histories
    /// are the ones a single process would keep.
    pub fn observe_fp8(&self, amaxes: &[f32]) {
        let scales: Vec<&DelayedScale> = self
            .scales
            .iter()
            .flat_map(BlockScales::layers)
            .flat_map(|l| [&l.input, &l.weight, &l.grad_output])
            .collect();
        assert_eq!(scales.len(), amaxes.len(), "one amax per scaled tensor");
        for (scale, &amax) in scales.into_iter().zip(amaxes) {
            scale.observe(amax);
        }
    }

    /// Ends a training step for the tensorwise FP8 recipe: the amaxes the
    /// step's passes observed join each tensor's history, setting the next
    /// step's scales. Nothing for the other precisions.
    pub fn advance_fp8_scales(&mut self) {
        for block in &mut self.scales {
            block.advance();
        }
    }

    /// Forgets the FP8 amaxes observed since the last step: forward passes
    /// that train nothing (an evaluation) must not steer the next scales.
    pub fn forget_fp8_observed(&mut self) {
        for block in &mut self.scales {
            block.forget_observed();
        }
    }

    fn context<'a>(
        &'a self,
        parallel: Parallel<'a>,
        sequences: &'a Sequences,
        documents: Option<&'a PackedDocuments>,
    ) -> BlockContext<'a, T> {
        BlockContext {
            config: &self.config,
            rope: &self.rope,
            experts: parallel.experts,
            sequence: parallel.sequence,
            sequences,
            documents,
        }
    }

    /// Runs the model on `tokens` (whole sequences of `seq_len`), predicting
    /// `targets` (the next token at each position), keeping every
    /// activation. Every id must be below the vocabulary size; the data
    /// loader guarantees both.
    pub fn forward(&self, tokens: &[u32], targets: &[u32]) -> ForwardPass<T> {
        self.forward_with(tokens, targets, ActivationMemory::KeepAll)
    }

    /// [`Self::forward`], keeping what `memory` says for the backward pass.
    pub fn forward_with(
        &self,
        tokens: &[u32],
        targets: &[u32],
        memory: ActivationMemory,
    ) -> ForwardPass<T> {
        self.forward_in(
            tokens,
            targets,
            BatchLayout::default(),
            memory,
            Parallel::default(),
            LossScale::PassMean,
        )
    }

    /// [`Self::forward_with`] on this rank's tokens, with the MoE layers'
    /// routed experts spread over `experts` (this rank computes its own
    /// experts for every rank's tokens). Every rank of the group must call
    /// it at the same point; the pass must be differentiated with
    /// [`Self::backward_expert_parallel`] and the same group.
    pub fn forward_expert_parallel(
        &self,
        tokens: &[u32],
        targets: &[u32],
        memory: ActivationMemory,
        experts: &ExpertParallel,
    ) -> Result<ForwardPass<T>, DistError> {
        let parallel = Parallel {
            experts: Some(experts),
            ..Parallel::default()
        };
        let pass = self.forward_in(
            tokens,
            targets,
            BatchLayout::default(),
            memory,
            parallel,
            LossScale::PassMean,
        );
        parallel.take_failure()?;
        Ok(pass)
    }

    /// [`Self::forward_with`] on `batch` as one rank of `parallel`'s
    /// groups: with sequence parallelism the batch holds this rank's slice
    /// of each sequence ([`SequenceParallel::local_tokens`]), and
    /// [`ForwardPass::cross_entropy`] weighs its trained targets as `loss`
    /// says (the mean over them, or a trainer's share of its step's). Its
    /// padding is left out of the MoE layers' loads and balance loss. Every
    /// rank of the groups must call it at the same point; the pass must be
    /// differentiated with [`Self::backward_parallel`] and the same groups.
    pub fn forward_parallel(
        &self,
        batch: &Batch,
        memory: ActivationMemory,
        parallel: Parallel<'_>,
        loss: LossScale,
    ) -> Result<ForwardPass<T>, DistError> {
        let pass = self.forward_in(
            &batch.inputs,
            &batch.targets,
            BatchLayout::of(batch),
            memory,
            parallel,
            loss,
        );
        parallel.take_failure()?;
        Ok(pass)
    }

    /// The forward pass of sequences laid out as `layout` says.
    fn forward_in(
        &self,
        tokens: &[u32],
        targets: &[u32],
        layout: BatchLayout<'_>,
        memory: ActivationMemory,
        parallel: Parallel<'_>,
        loss: LossScale,
    ) -> ForwardPass<T> {
        let config = &self.config;
        let (h, vocab) = (config.hidden, config.vocab);
        let seq_len = layout.seq_len_of(config, parallel.sequence);
        assert!(
            tokens.len() == targets.len() && tokens.len().is_multiple_of(seq_len),
            "tokens and targets must be the same whole number of sequences (or slices)"
        );
        assert!(
            tokens.iter().all(|&t| (t as usize) < vocab)
                && targets
                    .iter()
                    .all(|&t| (t as usize) < vocab || t == cross_entropy::IGNORED),
            "token id beyond the vocabulary"
        );
        let n = tokens.len();
        let sequences = match layout.real {
            Some(real) => Sequences::padded(seq_len, real.to_vec()),
            None => Sequences::whole(n, seq_len),
        };
        assert_eq!(sequences.tokens(), n, "a real-token count per sequence");
        let (weights, targets) = cross_entropy::target_weights(targets, loss);
        let weights: Vec<T> = weights.into_iter().map(T::from_f64).collect();
        let mut x = vec![T::ZERO; n * h];
        embedding::forward(&mut x, tokens, &self.weights.embedding, h);
        let documents = layout.documents.map(|starts| {
            let here = parallel
                .sequence
                .map_or(0..config.seq_len, SequenceParallel::positions);
            PackedDocuments::new(starts.to_vec(), config.seq_len, here)
        });
        let context = self.context(parallel, &sequences, documents.as_ref());
        let mut blocks = Vec::with_capacity(config.layers);
        let precision = config.gemm_precision;
        let mut aux_loss = 0.0;
        for (block, scales) in self.weights.blocks.iter().zip(&self.scales) {
            let (output, pass) = context.forward(block, scales.linears(precision), x);
            match &pass.ffn {
                FeedForwardPass::Moe(moe) => aux_loss += moe.aux_loss.to_f64(),
                FeedForwardPass::MoeParallel(moe) => aux_loss += moe.aux_loss.to_f64(),
                FeedForwardPass::Dense(_) => {}
            }
            blocks.push(BlockActivations::keep(pass, memory));
            x = output;
        }
        let mut final_normed = vec![T::ZERO; n * h];
        let mut final_rstd = vec![T::ZERO; n];
        rmsnorm::forward(
            &mut final_normed,
            &mut final_rstd,
            &x,
            &self.weights.final_norm,
            T::from_f64(config.norm_eps),
        );
        let mut logits = vec![T::ZERO; n * vocab];
        self.head()
            .forward(&mut logits, &final_normed, &self.weights.lm_head, h, vocab);
        let mut losses = vec![T::ZERO; n];
        let mut probs = vec![T::ZERO; n * vocab];
        cross_entropy::forward(&mut losses, &mut probs, &logits, &targets, vocab);
        // The mean over the positions with a target (every one, unless
        // some are ignored: a prompt's tokens in supervised fine-tuning),
        // or this pass's share of its step's.
        let cross_entropy = losses
            .iter()
            .zip(&weights)
            .map(|(l, w)| l.to_f64() * w.to_f64())
            .sum::<f64>();
        ForwardPass {
            tokens: tokens.to_vec(),
            sequences,
            documents,
            targets,
            loss_weights: weights,
            blocks,
            final_input: x,
            final_normed,
            final_rstd,
            probs,
            cross_entropy,
            aux_loss,
        }
    }

    /// Adds the gradient of [`ForwardPass::loss`] with respect to every weight into `grads`.
    pub fn backward(&self, pass: &ForwardPass<T>, grads: &mut Gradients<T>) {
        self.backward_in(pass, grads, Parallel::default());
    }

    /// The backward pass of [`Self::forward_expert_parallel`]: the gradient
    /// of this rank's loss for the replicated weights; for the routed
    /// experts this rank owns, the gradient of every rank's loss (their
    /// tokens were computed here); the other experts' gradients untouched.
    pub fn backward_expert_parallel(
        &self,
        pass: &ForwardPass<T>,
        grads: &mut Gradients<T>,
        experts: &ExpertParallel,
    ) -> Result<(), DistError> {
        let parallel = Parallel {
            experts: Some(experts),
            ..Parallel::default()
        };
        self.backward_parallel(pass, grads, parallel)
    }

    /// The backward pass of [`Self::forward_parallel`]: the gradient of
    /// this rank's loss (the mean over its tokens) for the replicated
    /// weights, including what its tokens contributed through attention to
    /// other ranks' tokens (the layout switches carry it back to them); for
    /// owned routed experts, see [`Self::backward_expert_parallel`]. The
    /// balance loss counts like the cross-entropy: its gradient is this
    /// rank's slice's share scaled to a whole sequence, so the ranks' mean
    /// is the whole sequences' gradient.
    pub fn backward_parallel(
        &self,
        pass: &ForwardPass<T>,
        grads: &mut Gradients<T>,
        parallel: Parallel<'_>,
    ) -> Result<(), DistError> {
        self.backward_in(pass, grads, parallel);
        parallel.take_failure()
    }

    /// How the LM head computes its GEMMs ([`ModelConfig::head_precision`]).
    fn head(&self) -> Linear<'static> {
        Linears::new(self.config.head_precision, &[]).get(0)
    }

    fn backward_in(&self, pass: &ForwardPass<T>, grads: &mut Gradients<T>, parallel: Parallel<'_>) {
        let config = &self.config;
        let (h, vocab, n) = (config.hidden, config.vocab, pass.tokens.len());
        let mut dlogits = vec![T::ZERO; n * vocab];
        cross_entropy::backward(
            &mut dlogits,
            &pass.loss_weights,
            &pass.probs,
            &pass.targets,
            vocab,
        );
        let mut dfinal_normed = vec![T::ZERO; n * h];
        self.head().backward(
            &mut dfinal_normed,
            &mut grads.lm_head,
            &dlogits,
            &pass.final_normed,
            &self.weights.lm_head,
            h,
            vocab,
        );
        let mut dres = vec![T::ZERO; n * h];
        rmsnorm::backward(
            &mut dres,
            &mut grads.final_norm,
            &dfinal_normed,
            &pass.final_input,
            &self.weights.final_norm,
            &pass.final_rstd,
        );
        let context = self.context(parallel, &pass.sequences, pass.documents.as_ref());
        let precision = config.gemm_precision;
        let layers = self
            .weights
            .blocks
            .iter()
            .zip(&self.scales)
            .zip(&pass.blocks)
            .zip(&mut grads.blocks);
        for (((block, scales), activations), block_grads) in layers.rev() {
            let linears = scales.linears(precision);
            // A checkpointed block is rerun from its input; the rerun's
            // activations live only until the block's backward is done.
            let recomputed;
            let block_pass = match activations {
                BlockActivations::Kept(pass) => pass,
                BlockActivations::Checkpointed { input, .. } => {
                    recomputed = context.forward(block, linears, input.clone()).1;
                    &recomputed
                }
            };
            context.backward(block, linears, block_pass, &mut dres, block_grads);
        }
        embedding::backward(&mut grads.embedding, &dres, &pass.tokens, h);
    }
}

/// Compares every tensor's name and length against what `config` implies
/// for the routed experts the weights hold.
fn check_shapes<T: Scalar>(
    config: &ModelConfig,
    weights: &Weights<T, MoeParams<T>>,
) -> Result<(), ShapeMismatch> {
    // The listing names q/k norm gains only when the config has them;
    // gains it would not list must not exist.
    if config.qk_norm.is_none()
        && weights
            .blocks
            .iter()
            .any(|b| !b.q_norm.is_empty() || !b.k_norm.is_empty())
    {
        return Err(ShapeMismatch::Layout);
    }
    let held = weights.held_experts();
    let same_experts = weights.blocks.iter().all(|b| match &b.ffn {
        FeedForward::Moe(p) => p.experts == held,
        FeedForward::Dense(_) => true,
    });
    if !same_experts || held.end > config.moe.n_routed_experts {
        return Err(ShapeMismatch::Layout);
    }
    let expected = Gradients::<T>::zeros_with_experts(config, held);
    let (want, got) = (expected.tensors(config), weights.tensors(config));
    let same_layout =
        want.len() == got.len() && want.iter().zip(&got).all(|(w, g)| w.name == g.name);
    if !same_layout {
        return Err(ShapeMismatch::Layout);
    }
    match want
        .iter()
        .zip(&got)
        .find(|(w, g)| w.values.len() != g.values.len())
    {
        Some((w, g)) => Err(ShapeMismatch::Tensor {
            name: w.name.clone(),
            expected: w.values.len(),
            found: g.values.len(),
        }),
        None => Ok(()),
    }
}
