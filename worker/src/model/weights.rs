//! The model's trainable tensors, and (with the same layout) their gradients
//! and optimizer moments. One listing, [`Weights::tensors`], fixes the order
//! and names every consumer (optimizer, checkpoint, gradient check) uses.

use std::ops::Range;

use crate::dist::expert_parallel::is_expert_tensor;
use crate::linear::Linears;
use crate::memory::HeldBytes;
use crate::model::config::ModelConfig;
use crate::moe::expert::{SwiGluGrads, SwiGluMlp};
use crate::moe::{MoeConfig, MoeLayer, MoeParams};
use crate::rng::SplitMix64;
use crate::scalar::Scalar;

/// Every trainable tensor, flat and row-major. `M` is the MoE feed-forward
/// part: a [`MoeLayer`] (weights plus selection bias) in the model, bare
/// [`MoeParams`] in a gradient.
#[derive(Clone, Debug, PartialEq)]
pub struct Weights<T, M> {
    /// `[vocab, hidden]`.
    pub embedding: Vec<T>,
    pub blocks: Vec<BlockWeights<T, M>>,
    /// `[hidden]`.
    pub final_norm: Vec<T>,
    /// `[vocab, hidden]`.
    pub lm_head: Vec<T>,
}

/// One transformer block.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockWeights<T, M> {
    /// `[hidden]`.
    pub attention_norm: Vec<T>,
    /// `[q_width = heads * head_dim, hidden]`.
    pub wq: Vec<T>,
    /// `[kv_heads * head_dim, hidden]`.
    pub wk: Vec<T>,
    /// `[kv_heads * head_dim, hidden]`.
    pub wv: Vec<T>,
    /// `[hidden, q_width]`.
    pub wo: Vec<T>,
    /// The q and k norms' gains ([`ModelConfig::qk_norm_widths`]); empty
    /// when the model has none.
    pub q_norm: Vec<T>,
    pub k_norm: Vec<T>,
    /// `[hidden]`.
    pub ffn_norm: Vec<T>,
    pub ffn: FeedForward<T, M>,
}

/// A block's feed-forward layer.
#[derive(Clone, Debug, PartialEq)]
pub enum FeedForward<T, M> {
    Dense(DenseWeights<T>),
    Moe(M),
}

/// A dense SwiGLU MLP: `w1, w3: [dense_hidden, hidden]`, `w2: [hidden, dense_hidden]`.
#[derive(Clone, Debug, PartialEq)]
pub struct DenseWeights<T> {
    pub w1: Vec<T>,
    pub w3: Vec<T>,
    pub w2: Vec<T>,
}

impl<T> DenseWeights<T> {
    pub fn mlp(&self, config: &ModelConfig) -> SwiGluMlp<'_, T> {
        SwiGluMlp {
            w1: &self.w1,
            w3: &self.w3,
            w2: &self.w2,
            model: config.hidden,
            hidden: config.dense_hidden,
            linears: Linears::FP32,
        }
    }

    pub fn grads(&mut self) -> SwiGluGrads<'_, T> {
        SwiGluGrads {
            w1: &mut self.w1,
            w3: &mut self.w3,
            w2: &mut self.w2,
        }
    }
}

/// Access to the trainable MoE tensors, whichever `M` holds them.
pub trait MoeTensors<T> {
    fn moe_params(&self) -> &MoeParams<T>;
    fn moe_params_mut(&mut self) -> &mut MoeParams<T>;
}

impl<T> MoeTensors<T> for MoeParams<T> {
    fn moe_params(&self) -> &MoeParams<T> {
        self
    }
    fn moe_params_mut(&mut self) -> &mut MoeParams<T> {
        self
    }
}

impl<T> MoeTensors<T> for MoeLayer<T> {
    fn moe_params(&self) -> &MoeParams<T> {
        &self.params
    }
    fn moe_params_mut(&mut self) -> &mut MoeParams<T> {
        &mut self.params
    }
}

/// Whether AdamW's weight decay applies: to matrices, not to norm gains
/// (the model has no biases; the MoE selection bias is not trained by gradients).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorKind {
    Matrix,
    Norm,
}

impl TensorKind {
    pub fn decays(self) -> bool {
        self == TensorKind::Matrix
    }
}

/// One tensor of a [`Weights`] listing.
#[derive(Debug)]
pub struct NamedTensor<'a, T> {
    /// Stable across runs: `blocks.3.moe.experts_w1`.
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: TensorKind,
    pub values: &'a [T],
}

impl<T: Scalar, M: MoeTensors<T>> Weights<T, M> {
    /// Every tensor in canonical order, with its name, shape and kind.
    /// Shared-expert tensors are left out when the model has none.
    pub fn tensors(&self, config: &ModelConfig) -> Vec<NamedTensor<'_, T>> {
        use TensorKind::{Matrix, Norm};
        let (h, v, q, kv) = (
            config.hidden,
            config.vocab,
            config.q_width(),
            config.kv_width(),
        );
        let mut list = vec![named(
            "embedding".into(),
            vec![v, h],
            Matrix,
            &self.embedding,
        )];
        for (i, block) in self.blocks.iter().enumerate() {
            let p = |name: &str| format!("blocks.{i}.{name}");
            list.extend([
                named(p("attention_norm"), vec![h], Norm, &block.attention_norm),
                named(p("wq"), vec![q, h], Matrix, &block.wq),
                named(p("wk"), vec![kv, h], Matrix, &block.wk),
                named(p("wv"), vec![kv, h], Matrix, &block.wv),
                named(p("wo"), vec![h, q], Matrix, &block.wo),
            ]);
            if let Some((q_gain, k_gain)) = config.qk_norm_widths() {
                list.extend([
                    named(p("q_norm"), vec![q_gain], Norm, &block.q_norm),
                    named(p("k_norm"), vec![k_gain], Norm, &block.k_norm),
                ]);
            }
            list.push(named(p("ffn_norm"), vec![h], Norm, &block.ffn_norm));
            match &block.ffn {
                FeedForward::Dense(dense) => {
                    let d = config.dense_hidden;
                    list.extend([
                        named(p("dense.w1"), vec![d, h], Matrix, &dense.w1),
                        named(p("dense.w3"), vec![d, h], Matrix, &dense.w3),
                        named(p("dense.w2"), vec![h, d], Matrix, &dense.w2),
                    ]);
                }
                FeedForward::Moe(moe) => {
                    for (name, shape, values) in moe_tensors(&config.moe, moe.moe_params()) {
                        list.push(named(p(&format!("moe.{name}")), shape, Matrix, values));
                    }
                }
            }
        }
        list.push(named("final_norm".into(), vec![h], Norm, &self.final_norm));
        list.push(named("lm_head".into(), vec![v, h], Matrix, &self.lm_head));
        list
    }

    /// The routed experts the MoE layers hold (the same in every layer):
    /// all of them, or an expert-parallel rank's own. `0..0` without MoE layers.
    pub fn held_experts(&self) -> Range<usize> {
        self.blocks
            .iter()
            .find_map(|b| match &b.ffn {
                FeedForward::Moe(moe) => Some(moe.moe_params().experts.clone()),
                FeedForward::Dense(_) => None,
            })
            .unwrap_or(0..0)
    }

    /// The same tensors as [`Self::tensors`], in the same order, mutably.
    pub fn tensors_mut(&mut self) -> Vec<&mut Vec<T>> {
        let mut list = vec![&mut self.embedding];
        for block in &mut self.blocks {
            list.push(&mut block.attention_norm);
            list.push(&mut block.wq);
            list.push(&mut block.wk);
            list.push(&mut block.wv);
            list.push(&mut block.wo);
            // Present exactly when the config has q/k norms (see `tensors`).
            if !block.q_norm.is_empty() {
                list.push(&mut block.q_norm);
                list.push(&mut block.k_norm);
            }
            list.push(&mut block.ffn_norm);
            match &mut block.ffn {
                FeedForward::Dense(dense) => {
                    list.push(&mut dense.w1);
                    list.push(&mut dense.w3);
                    list.push(&mut dense.w2);
                }
                FeedForward::Moe(moe) => {
                    let p = moe.moe_params_mut();
                    list.extend([
                        &mut p.router,
                        &mut p.experts_w1,
                        &mut p.experts_w3,
                        &mut p.experts_w2,
                    ]);
                    if !p.shared_w1.is_empty() {
                        list.extend([&mut p.shared_w1, &mut p.shared_w3, &mut p.shared_w2]);
                    }
                }
            }
        }
        list.push(&mut self.final_norm);
        list.push(&mut self.lm_head);
        list
    }
}

/// Bytes held by a set of tensors (by capacity), split as expert
/// parallelism splits them: the routed experts' tensors, which each rank
/// of an expert-parallel group holds only its slice of, and the rest,
/// which every rank holds whole.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TensorBytes {
    pub routed_experts: usize,
    pub replicated: usize,
}

impl std::ops::Add for TensorBytes {
    type Output = Self;
    fn add(self, other: Self) -> Self {
        Self {
            routed_experts: self.routed_experts + other.routed_experts,
            replicated: self.replicated + other.replicated,
        }
    }
}

impl<T, M: MoeTensors<T>> Weights<T, M> {
    /// What these tensors hold, routed experts apart (MoE selection biases,
    /// not being tensors of this listing, are not counted).
    pub fn tensor_bytes(&self) -> TensorBytes {
        let mut bytes = TensorBytes {
            routed_experts: 0,
            replicated: self.embedding.held_bytes()
                + self.final_norm.held_bytes()
                + self.lm_head.held_bytes(),
        };
        for block in &self.blocks {
            bytes.replicated += [
                &block.attention_norm,
                &block.wq,
                &block.wk,
                &block.wv,
                &block.wo,
                &block.q_norm,
                &block.k_norm,
                &block.ffn_norm,
            ]
            .iter()
            .map(|t| t.held_bytes())
            .sum::<usize>();
            match &block.ffn {
                FeedForward::Dense(dense) => {
                    bytes.replicated +=
                        dense.w1.held_bytes() + dense.w3.held_bytes() + dense.w2.held_bytes();
                }
                FeedForward::Moe(moe) => {
                    let p = moe.moe_params();
                    let experts = p.routed_expert_bytes();
                    bytes.routed_experts += experts;
                    bytes.replicated += p.held_bytes() - experts;
                }
            }
        }
        bytes
    }
}

fn named<T>(name: String, shape: Vec<usize>, kind: TensorKind, values: &[T]) -> NamedTensor<'_, T> {
    NamedTensor {
        name,
        shape,
        kind,
        values,
    }
}

/// The MoE tensors with their names and shapes, shared experts only when present.
fn moe_tensors<'a, T>(
    config: &MoeConfig,
    p: &'a MoeParams<T>,
) -> Vec<(&'static str, Vec<usize>, &'a [T])> {
    let (h, n, e) = (config.hidden, p.experts.len(), config.expert_hidden);
    let mut list = vec![
        (
            "router",
            vec![config.n_routed_experts, h],
            p.router.as_slice(),
        ),
        ("experts_w1", vec![n, e, h], &p.experts_w1),
        ("experts_w3", vec![n, e, h], &p.experts_w3),
        ("experts_w2", vec![n, h, e], &p.experts_w2),
    ];
    let s = config.shared_hidden();
    if s > 0 {
        list.push(("shared_w1", vec![s, h], &p.shared_w1));
        list.push(("shared_w3", vec![s, h], &p.shared_w3));
        list.push(("shared_w2", vec![h, s], &p.shared_w2));
    }
    list
}

/// Gradients (and optimizer moments): the weights' layout with plain MoE tensors.
pub type Gradients<T> = Weights<T, MoeParams<T>>;

impl<T: Scalar> Weights<T, MoeParams<T>> {
    /// All zeros, shaped for `config`.
    pub fn zeros(config: &ModelConfig) -> Self {
        Self::zeros_with_experts(config, 0..config.moe.n_routed_experts)
    }

    /// [`Self::zeros`] with the MoE layers holding only routed experts
    /// `experts` (an expert-parallel rank's).
    pub fn zeros_with_experts(config: &ModelConfig, experts: Range<usize>) -> Self {
        let (h, v) = (config.hidden, config.vocab);
        let zeros = |n: usize| vec![T::ZERO; n];
        let (q_gain, k_gain) = config.qk_norm_widths().unwrap_or((0, 0));
        let blocks = (0..config.layers)
            .map(|i| BlockWeights {
                attention_norm: zeros(h),
                wq: zeros(config.q_width() * h),
                wk: zeros(config.kv_width() * h),
                wv: zeros(config.kv_width() * h),
                wo: zeros(h * config.q_width()),
                q_norm: zeros(q_gain),
                k_norm: zeros(k_gain),
                ffn_norm: zeros(h),
                ffn: if config.is_moe_block(i) {
                    FeedForward::Moe(MoeParams::zeros_with_experts(&config.moe, experts.clone()))
                } else {
                    let d = config.dense_hidden * h;
                    FeedForward::Dense(DenseWeights {
                        w1: zeros(d),
                        w3: zeros(d),
                        w2: zeros(d),
                    })
                },
            })
            .collect();
        Self {
            embedding: zeros(v * h),
            blocks,
            final_norm: zeros(h),
            lm_head: zeros(v * h),
        }
    }
}

impl<T: Scalar> Weights<T, MoeParams<T>> {
    /// [`Self::zeros_with_experts`] keeping only the tensors `keep` names
    /// (as [`Weights::tensors`] names them): the others are left empty, a
    /// frozen weight's gradient, which every backward routine skips
    /// (`training.lora`: neither computed nor held).
    pub fn zeros_keeping(
        config: &ModelConfig,
        experts: Range<usize>,
        keep: impl Fn(&str) -> bool,
    ) -> Self {
        let mut grads = Self::zeros_with_experts(config, experts);
        // Listed before any is emptied: `tensors_mut` leaves out empty q/k
        // gains and shared experts, `tensors` goes by the config.
        let kept: Vec<bool> = grads
            .tensors(config)
            .iter()
            .map(|t| keep(&t.name))
            .collect();
        for (tensor, kept) in grads.tensors_mut().into_iter().zip(kept) {
            if !kept {
                *tensor = Vec::new();
            }
        }
        grads
    }

    /// Zeroes every tensor. Unlike a loop over [`Self::tensors_mut`], which
    /// tells an absent q/k gain or shared expert by its being empty, this
    /// reaches every one when some are kept empty ([`Self::zeros_keeping`]).
    pub fn zero(&mut self) {
        let mut all = vec![&mut self.embedding, &mut self.final_norm, &mut self.lm_head];
        for block in &mut self.blocks {
            all.extend([
                &mut block.attention_norm,
                &mut block.wq,
                &mut block.wk,
                &mut block.wv,
                &mut block.wo,
                &mut block.q_norm,
                &mut block.k_norm,
                &mut block.ffn_norm,
            ]);
            match &mut block.ffn {
                FeedForward::Dense(dense) => {
                    all.extend([&mut dense.w1, &mut dense.w3, &mut dense.w2])
                }
                FeedForward::Moe(p) => all.extend([
                    &mut p.router,
                    &mut p.experts_w1,
                    &mut p.experts_w3,
                    &mut p.experts_w2,
                    &mut p.shared_w1,
                    &mut p.shared_w3,
                    &mut p.shared_w2,
                ]),
            }
        }
        for tensor in all {
            tensor.fill(T::ZERO);
        }
    }
}

/// Initial weights, drawn in canonical order from `rng`.
///
/// Embeddings N(0, 1) (the residual stream starts at unit scale, which every
/// RMSNorm expects); input projections, the router and the LM head
/// N(0, 1/fan_in) so outputs start at unit scale; projections back into the
/// residual stream (`wo`, `w2`) additionally scaled by 1/sqrt(2 layers)
/// (GPT-2) so the stream's variance stays bounded as blocks add to it; norm
/// gains 1.
pub fn initial_weights<T: Scalar>(
    config: &ModelConfig,
    rng: &mut SplitMix64,
) -> Weights<T, MoeParams<T>> {
    initial_weights_with_experts(config, rng, 0..config.moe.n_routed_experts)
}

/// [`initial_weights`] holding only routed experts `experts`, each with the
/// values [`initial_weights`] gives it: the stream skips the other experts'
/// draws instead of making them, so no rank ever holds a full-size expert
/// tensor, not even while it starts.
pub fn initial_weights_with_experts<T: Scalar>(
    config: &ModelConfig,
    rng: &mut SplitMix64,
    experts: Range<usize>,
) -> Weights<T, MoeParams<T>> {
    let mut weights = Weights::zeros_with_experts(config, experts.clone());
    let n_experts = config.moe.n_routed_experts;
    let per_expert = crate::moe::params::expert_size(&config.moe);
    let residual_scale = 1.0 / (2.0 * config.layers as f64).sqrt();
    let tensors: Vec<(Vec<usize>, TensorKind, String)> = weights
        .tensors(config)
        .into_iter()
        .map(|t| (t.shape, t.kind, t.name))
        .collect();
    for (values, (shape, kind, name)) in weights.tensors_mut().into_iter().zip(tensors) {
        match kind {
            TensorKind::Norm => values.fill(T::ONE),
            TensorKind::Matrix => {
                let fan_in = *shape.last().expect("matrices have a shape");
                let std = if name == "embedding" {
                    1.0
                } else if name.ends_with("wo") || name.ends_with("w2") {
                    residual_scale / (fan_in as f64).sqrt()
                } else {
                    1.0 / (fan_in as f64).sqrt()
                };
                if is_expert_tensor(&name) {
                    rng.skip_normals(experts.start * per_expert);
                    *values = rng.normal_vec(values.len(), std);
                    rng.skip_normals((n_experts - experts.end) * per_expert);
                } else {
                    *values = rng.normal_vec(values.len(), std);
                }
            }
        }
    }
    weights
}
