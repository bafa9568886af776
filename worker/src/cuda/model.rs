//! The whole transformer on the device; CPU reference: [`crate::model::Model`]
//! (forward, backward, same block structure and canonical tensor order).
//! Every op is one of this backend's launchers, each checked against its CPU
//! op in [`super::check`]; this module only composes them, and the check's
//! "training" group compares whole steps with the CPU trainer.
//!
//! Precision: f32 storage, GEMMs on TF32 tensor cores (the router's in exact
//! f32, see [`super::moe_layer`]). FP8 GEMM recipes and activation
//! checkpointing are CPU-only for now and refused by [`DeviceModel::upload`]
//! with a clear error.

use super::fp8_delayed::DelayedScales;
use super::matmul::{Arithmetic, Derived, Input, Prepared, WeightCache};
use super::moe_ep::DeviceExpertParallelForward;
use super::moe_layer::{DeviceMoeForward, DeviceMoeGrads, DeviceMoeLayer};
use super::rope::DeviceRope;
use super::sequence_parallel as ulysses;
use super::serve_ep::DeviceExchange;
use super::{
    Gpu, GpuError, Result, attention, cross_entropy, embedding, flash_attention, matmul, rmsnorm,
    swiglu, vector,
};
use crate::data::Batch;
use crate::dist::sequence_parallel::SequenceParallel;
use crate::fp8::Fp8Recipe;
use crate::linear::GemmPrecision;
use crate::model::{
    ATTENTION_LINEARS, ActivationMemory, BatchLayout, FeedForward, Gradients, Model, ModelConfig,
    PackedDocuments, Parallel, WK, WO, WQ, WV,
};
use crate::moe::expert::{MLP_LINEARS, W1, W2, W3};
use crate::moe::{MoeLayer, Sequences};
use crate::ops::attention::AttentionShape;
use crate::ops::cross_entropy::LossScale;
use crate::ops::rope::RopeTable;
use moe_kernels::cudarc::driver::CudaSlice;
use std::ops::Range;
use std::rc::Rc;

/// A set of device tensors listed in the CPU's canonical order.
pub trait DeviceTensors {
    fn tensors(&self) -> Vec<&CudaSlice<f32>>;
    fn tensors_mut(&mut self) -> Vec<&mut CudaSlice<f32>>;
}

/// [`crate::model::Weights`] on the device: `M` is the MoE part, a
/// [`DeviceMoeLayer`] for the weights and [`DeviceMoeGrads`] for
/// gradients and optimizer moments.
pub struct DeviceWeights<M> {
    pub embedding: CudaSlice<f32>,
    pub blocks: Vec<DeviceBlock<M>>,
    pub final_norm: CudaSlice<f32>,
    pub lm_head: CudaSlice<f32>,
}

pub struct DeviceBlock<M> {
    pub attention_norm: CudaSlice<f32>,
    pub wq: CudaSlice<f32>,
    pub wk: CudaSlice<f32>,
    pub wv: CudaSlice<f32>,
    pub wo: CudaSlice<f32>,
    /// The q and k norms' gains (`q_norm`, `k_norm`), when the model has
    /// them ([`ModelConfig::qk_norm_widths`]); listed after `wo`, as the host does.
    pub qk_norm: Option<(CudaSlice<f32>, CudaSlice<f32>)>,
    pub ffn_norm: CudaSlice<f32>,
    pub ffn: DeviceFeedForward<M>,
}

pub enum DeviceFeedForward<M> {
    Dense {
        w1: CudaSlice<f32>,
        w3: CudaSlice<f32>,
        w2: CudaSlice<f32>,
    },
    Moe(M),
}

/// Gradients (and AdamW moments) of a [`DeviceModel`].
pub type DeviceGradients = DeviceWeights<DeviceMoeGrads>;

impl<M: DeviceTensors> DeviceTensors for DeviceWeights<M> {
    fn tensors(&self) -> Vec<&CudaSlice<f32>> {
        let mut list = vec![&self.embedding];
        for b in &self.blocks {
            list.extend(b.tensors());
        }
        list.extend([&self.final_norm, &self.lm_head]);
        list
    }

    fn tensors_mut(&mut self) -> Vec<&mut CudaSlice<f32>> {
        let mut list = vec![&mut self.embedding];
        for b in &mut self.blocks {
            list.extend(b.tensors_mut());
        }
        list.extend([&mut self.final_norm, &mut self.lm_head]);
        list
    }
}

impl<M: DeviceTensors> DeviceTensors for DeviceBlock<M> {
    fn tensors(&self) -> Vec<&CudaSlice<f32>> {
        let mut list = vec![&self.attention_norm, &self.wq, &self.wk, &self.wv, &self.wo];
        if let Some((q_norm, k_norm)) = &self.qk_norm {
            list.extend([q_norm, k_norm]);
        }
        list.push(&self.ffn_norm);
        match &self.ffn {
            DeviceFeedForward::Dense { w1, w3, w2 } => list.extend([w1, w3, w2]),
            DeviceFeedForward::Moe(moe) => list.extend(moe.tensors()),
        }
        list
    }

    fn tensors_mut(&mut self) -> Vec<&mut CudaSlice<f32>> {
        let mut list = vec![
            &mut self.attention_norm,
            &mut self.wq,
            &mut self.wk,
            &mut self.wv,
            &mut self.wo,
        ];
        if let Some((q_norm, k_norm)) = &mut self.qk_norm {
            list.extend([q_norm, k_norm]);
        }
        list.push(&mut self.ffn_norm);
        match &mut self.ffn {
            DeviceFeedForward::Dense { w1, w3, w2 } => list.extend([w1, w3, w2]),
            DeviceFeedForward::Moe(moe) => list.extend(moe.tensors_mut()),
        }
        list
    }
}

impl<M: DeviceTensors> DeviceWeights<M> {
    /// Copies every tensor into `host`'s, in canonical order (the caller
    /// checked the layouts agree).
    pub fn download_into(&self, gpu: &Gpu, host: Vec<&mut Vec<f32>>) -> Result<()> {
        let device = self.tensors();
        assert_eq!(device.len(), host.len(), "device and host tensor lists");
        for (d, h) in device.into_iter().zip(host) {
            gpu.stream().memcpy_dtoh(d, h.as_mut_slice())?;
        }
        gpu.synchronize()
    }

    /// Overwrites every tensor with `host`'s, in canonical order.
    pub fn upload_from(&mut self, gpu: &Gpu, host: Vec<&[f32]>) -> Result<()> {
        let device = self.tensors_mut();
        assert_eq!(device.len(), host.len(), "device and host tensor lists");
        for (d, h) in device.into_iter().zip(host) {
            gpu.stream().memcpy_htod(h, d)?;
        }
        Ok(())
    }

    /// Zeroes every tensor (gradients before a step).
    pub fn zero(&mut self, gpu: &Gpu) -> Result<()> {
        for t in self.tensors_mut() {
            gpu.stream().memset_zeros(t)?;
        }
        Ok(())
    }
}

impl DeviceGradients {
    /// Zeros shaped like `weights`.
    pub fn zeros_like(gpu: &Gpu, weights: &DeviceWeights<DeviceMoeLayer>) -> Result<Self> {
        let zeros = |t: &CudaSlice<f32>| gpu.zeros::<f32>(t.len());
        let blocks = weights
            .blocks
            .iter()
            .map(|b| {
                Ok(DeviceBlock {
                    attention_norm: zeros(&b.attention_norm)?,
                    wq: zeros(&b.wq)?,
                    wk: zeros(&b.wk)?,
                    wv: zeros(&b.wv)?,
                    wo: zeros(&b.wo)?,
                    qk_norm: match &b.qk_norm {
                        Some((q, k)) => Some((zeros(q)?, zeros(k)?)),
                        None => None,
                    },
                    ffn_norm: zeros(&b.ffn_norm)?,
                    ffn: match &b.ffn {
                        DeviceFeedForward::Dense { w1, w3, w2 } => DeviceFeedForward::Dense {
                            w1: zeros(w1)?,
                            w3: zeros(w3)?,
                            w2: zeros(w2)?,
                        },
                        DeviceFeedForward::Moe(layer) => {
                            DeviceFeedForward::Moe(DeviceMoeGrads::zeros(gpu, layer)?)
                        }
                    },
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            embedding: zeros(&weights.embedding)?,
            blocks,
            final_norm: zeros(&weights.final_norm)?,
            lm_head: zeros(&weights.lm_head)?,
        })
    }

    /// Copies the gradients into a host [`Gradients`] of the same layout.
    pub fn to_host(&self, gpu: &Gpu, config: &ModelConfig) -> Result<Gradients<f32>> {
        let mut host = Gradients::zeros(config);
        self.download_into(gpu, host.tensors_mut())?;
        Ok(host)
    }
}

/// The model on the device: weights (MoE selection biases included), the
/// RoPE table and the attention kernels it runs.
pub struct DeviceModel {
    config: ModelConfig,
    /// Private, so that every change goes through [`Self::weights_mut`],
    /// which forgets what GEMMs derived from them.
    weights: DeviceWeights<DeviceMoeLayer>,
    /// The attention, dense and LM head weights as the step's GEMMs read
    /// them in bf16 or FP8 (the MoE layers keep their own).
    derived: WeightCache,
    rope: DeviceRope,
    attention: AttentionKernel,
    /// The tensorwise FP8 recipe's delayed scales of every linear layer;
    /// `None` for the other precisions.
    scales: Option<DelayedScales>,
    /// Each block's first linear layer in the delayed scales' numbering.
    linear_bases: Vec<usize>,
}

/// Each block's first linear layer, numbered as the CPU model's delayed
/// scales are (attention's four projections, then the feed-forward
/// layer's), and how many there are.
fn linear_layout(config: &ModelConfig) -> (Vec<usize>, usize) {
    let mut next = 0;
    let bases = (0..config.layers)
        .map(|block| {
            let base = next;
            next += ATTENTION_LINEARS
                + if config.is_moe_block(block) {
                    MoeLayer::<f32>::linear_count(&config.moe)
                } else {
                    MLP_LINEARS
                };
            base
        })
        .collect();
    (bases, next)
}

/// Which kernels run attention on the device. Both give the CPU's result
/// up to TF32 rounding; they differ in what the forward pass keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttentionKernel {
    /// Batched cuBLASLt GEMMs ([`attention`]), the probabilities
    /// `[sequences, heads, T, T]` kept for the backward pass. The default
    /// until a GPU run has checked and timed the flash kernels.
    #[default]
    Gemm,
    /// FlashAttention-2 style tiles ([`flash_attention`]): only each row's
    /// log-sum-exp kept, the probabilities recomputed in the backward pass.
    /// Heads the kernels do not take (above 128) run the GEMM path.
    Flash,
}

impl AttentionKernel {
    /// `MOE_CUDA_ATTENTION=flash` opts the device model into the flash
    /// kernels (`gemm` or unset: the GEMM path).
    pub const ENV: &str = "MOE_CUDA_ATTENTION";

    /// The kernel `MOE_CUDA_ATTENTION` asks for; an unknown value is a
    /// settings error naming it (as the other `MOE_CUDA_*` variables).
    pub fn from_env() -> Result<Self> {
        Self::parse(std::env::var(Self::ENV).ok().as_deref()).map_err(GpuError::Settings)
    }

    /// The kernel `value` (the variable's) asks for.
    pub fn parse(value: Option<&str>) -> std::result::Result<Self, String> {
        match value.map(str::trim) {
            Some("flash") => Ok(Self::Flash),
            Some("gemm" | "") | None => Ok(Self::Gemm),
            Some(other) => Err(format!(
                "{}={other}: expected flash or gemm (the default)",
                Self::ENV
            )),
        }
    }
}

/// What attention keeps for its backward pass, by kernel.
enum AttentionSaved {
    /// The GEMM path's probabilities `[sequences, heads, T, T]`.
    Probs(CudaSlice<f32>),
    /// The flash path's `lse [sequences, heads, T]`, and under sequence
    /// parallelism the output in the attention call's (whole-sequence,
    /// this rank's heads) layout, which the backward pass's D term reads;
    /// without it `attention_out` is that output.
    Flash {
        lse: CudaSlice<f32>,
        out_heads: Option<CudaSlice<f32>>,
    },
}

/// One block's activations, kept for its backward pass.
struct BlockPass {
    input: CudaSlice<f32>,
    attention_normed: CudaSlice<f32>,
    attention_rstd: CudaSlice<f32>,
    /// q and k as projected, before their norms, when the model has them.
    qk_norm: Option<QkNormPass>,
    /// Queries and keys after RoPE (with sequence parallelism: this
    /// rank's heads of every token).
    q: CudaSlice<f32>,
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
    attention_out: CudaSlice<f32>,
    attention: AttentionSaved,
    mid: CudaSlice<f32>,
    ffn_normed: CudaSlice<f32>,
    ffn_rstd: CudaSlice<f32>,
    ffn: FeedForwardPass,
}

/// What the q/k norms' backward pass needs: their inputs and each chunk's
/// reciprocal RMS.
struct QkNormPass {
    q: CudaSlice<f32>,
    k: CudaSlice<f32>,
    q_rstd: CudaSlice<f32>,
    k_rstd: CudaSlice<f32>,
}

enum FeedForwardPass {
    /// SwiGLU's `a = x w1ᵀ`, `b = x w3ᵀ`, `h = silu(a) b`.
    Dense([CudaSlice<f32>; 3]),
    Moe(Box<DeviceMoeForward>),
    /// An MoE layer whose routed experts are split over an expert-parallel group.
    MoeExpertParallel(Box<DeviceExpertParallelForward>),
}

/// What a forward pass keeps of one block: every activation, or (activation
/// checkpointing) only the block's input, the rest recomputed by the
/// backward pass (the same kernels on the same input: the same bits).
enum StoredBlock {
    Kept(Box<BlockPass>),
    Input(CudaSlice<f32>),
}

/// How a pass's tokens are laid out: sequences (or this rank's slices of
/// them) and their padding, and where each token's document starts.
struct PassLayout {
    sequences: Sequences,
    /// Each token of the whole sequences' document start, for attention:
    /// a packed batch's ([`PackedDocuments`]), or zeros (plain causal),
    /// made once a pass for every layer's forward and backward.
    starts: CudaSlice<i32>,
    /// A packed batch's: each of this rank's tokens' position in its
    /// document, for RoPE.
    positions: Option<CudaSlice<i32>>,
}

/// A forward pass on the device: the loss and what the backward pass needs.
pub struct DeviceForward {
    /// On the host: the embedding backward groups them by id there.
    tokens: Vec<u32>,
    /// How the tokens split into sequences, which are padding, and a
    /// packed batch's documents.
    layout: PassLayout,
    /// Ignored targets replaced by 0 (weighted 0: `loss_weights`).
    targets: CudaSlice<u32>,
    /// Each position's share of the mean cross-entropy, as the CPU model's.
    loss_weights: Vec<f32>,
    blocks: Vec<StoredBlock>,
    /// Tokens routed to each expert, one list per MoE block in order.
    loads: Vec<Vec<usize>>,
    final_input: CudaSlice<f32>,
    final_normed: CudaSlice<f32>,
    final_rstd: CudaSlice<f32>,
    probs: CudaSlice<f32>,
    /// Mean next-token cross-entropy, in nats.
    pub cross_entropy: f64,
    /// The MoE blocks' sequence-wise balance losses, summed (0 without it).
    pub aux_loss: f64,
}

impl DeviceForward {
    /// Tokens routed to each expert, one list per MoE block in order.
    pub fn expert_loads(&self) -> Vec<Vec<usize>> {
        self.loads.clone()
    }
}

/// What the device path does not do yet, as an error naming the setting.
fn unsupported(config: &ModelConfig) -> Option<String> {
    // The LM head never runs FP8 (settings give it the compute precision).
    if Arithmetic::of(config.head_precision).is_none() {
        return Some(format!(
            "LM head precision {:?} on CUDA: the head runs TF32 or bf16 GEMMs",
            config.head_precision
        ));
    }
    if !config.hidden.is_multiple_of(4) {
        return Some(format!(
            "hidden size {} on CUDA: rows are permuted as 16-byte vectors, so it must be a multiple of 4",
            config.hidden
        ));
    }
    None
}

impl DeviceModel {
    /// Copies `model` to the device.
    pub fn upload(gpu: &Gpu, model: &Model<f32>) -> Result<Self> {
        let config = model.config().clone();
        if let Some(reason) = unsupported(&config) {
            return Err(GpuError::Unsupported(reason));
        }
        let w = &model.weights;
        let blocks = w
            .blocks
            .iter()
            .map(|b| {
                Ok(DeviceBlock {
                    attention_norm: gpu.upload(&b.attention_norm)?,
                    wq: gpu.upload(&b.wq)?,
                    wk: gpu.upload(&b.wk)?,
                    wv: gpu.upload(&b.wv)?,
                    wo: gpu.upload(&b.wo)?,
                    qk_norm: match config.qk_norm {
                        Some(_) => Some((gpu.upload(&b.q_norm)?, gpu.upload(&b.k_norm)?)),
                        None => None,
                    },
                    ffn_norm: gpu.upload(&b.ffn_norm)?,
                    ffn: match &b.ffn {
                        FeedForward::Dense(d) => DeviceFeedForward::Dense {
                            w1: gpu.upload(&d.w1)?,
                            w3: gpu.upload(&d.w3)?,
                            w2: gpu.upload(&d.w2)?,
                        },
                        FeedForward::Moe(layer) => {
                            DeviceFeedForward::Moe(DeviceMoeLayer::upload(gpu, layer)?)
                        }
                    },
                })
            })
            .collect::<Result<_>>()?;
        let table = RopeTable::new(config.seq_len, config.head_dim(), config.rope_theta);
        let attention = AttentionKernel::from_env()?;
        if attention == AttentionKernel::Flash {
            // Said once per upload, so a run's log shows which kernels it timed.
            if config.head_dim() <= flash_attention::MAX_HEAD_DIM {
                tracing::info!(
                    "attention on the flash kernels ({}=flash)",
                    AttentionKernel::ENV
                );
            } else {
                tracing::warn!(
                    head_dim = config.head_dim(),
                    "{}=flash, but the flash kernels take heads up to {}: attention runs the GEMM path",
                    AttentionKernel::ENV,
                    flash_attention::MAX_HEAD_DIM
                );
            }
        }
        let (linear_bases, linears) = linear_layout(&config);
        let scales = match config.gemm_precision {
            GemmPrecision::Fp8(Fp8Recipe::Tensorwise) => Some(DelayedScales::new(gpu, linears)?),
            _ => None,
        };
        Ok(Self {
            derived: WeightCache::default(),
            scales,
            linear_bases,
            rope: DeviceRope::new(gpu, &table, config.head_dim())?,
            weights: DeviceWeights {
                embedding: gpu.upload(&w.embedding)?,
                blocks,
                final_norm: gpu.upload(&w.final_norm)?,
                lm_head: gpu.upload(&w.lm_head)?,
            },
            config,
            attention,
        })
    }

    /// The attention kernels this model runs ([`AttentionKernel::from_env`]
    /// at upload).
    pub fn attention_kernel(&self) -> AttentionKernel {
        self.attention
    }

    /// Runs attention with `kernel` from now on (checks and benchmarks
    /// compare the two on one model).
    pub fn set_attention_kernel(&mut self, kernel: AttentionKernel) {
        self.attention = kernel;
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// How block `block`'s linear layers multiply: its attention
    /// projections (`wq, wk, wv, wo`, [`Arithmetic::at`] 0 to 3) and its
    /// feed-forward layer's (dense `w1, w3, w2`; a MoE layer's as
    /// [`DeviceMoeLayer::forward`] numbers them).
    pub(crate) fn block_linears(&self, block: usize) -> (Arithmetic<'_>, Arithmetic<'_>) {
        match &self.scales {
            Some(scales) => {
                let base = self.linear_bases[block];
                (
                    Arithmetic::Fp8Delayed(scales, base),
                    Arithmetic::Fp8Delayed(scales, base + ATTENTION_LINEARS),
                )
            }
            None => {
                let linear = Arithmetic::of(self.config.gemm_precision).expect("checked at upload");
                (linear, linear)
            }
        }
    }

    /// The weights on the device.
    pub fn weights(&self) -> &DeviceWeights<DeviceMoeLayer> {
        &self.weights
    }

    /// The weights, to change: what GEMMs derived from them is forgotten
    /// (the MoE layers' through their `tensors_mut`).
    pub fn weights_mut(&mut self) -> &mut DeviceWeights<DeviceMoeLayer> {
        self.derived.clear();
        &mut self.weights
    }

    /// `w`, one of this model's attention, dense or LM head weights, as
    /// GEMMs in `arithmetic` read it (made once until the weights change).
    fn weight(
        &self,
        gpu: &Gpu,
        arithmetic: Arithmetic<'_>,
        w: &CudaSlice<f32>,
    ) -> Result<Rc<Derived>> {
        self.derived.get(gpu, arithmetic, w)
    }

    /// The tensorwise FP8 recipe's delayed scales, if the model trains with it.
    pub fn delayed_scales(&self) -> Option<&DelayedScales> {
        self.scales.as_ref()
    }

    /// The delayed scales, to share this step's amaxes with other ranks
    /// (what the GEMMs derived from the weights stays: the scales change
    /// only at [`Self::advance_fp8_scales`]).
    pub fn delayed_scales_mut(&mut self) -> Option<&mut DelayedScales> {
        self.scales.as_mut()
    }

    /// Ends a training step for the tensorwise FP8 recipe (as
    /// [`Model::advance_fp8_scales`]); nothing for the other precisions.
    pub fn advance_fp8_scales(&mut self, gpu: &Gpu) -> Result<()> {
        // The weights' FP8 codes were scaled by the scales that change now.
        self.derived.clear();
        for layer in self.moe_layers_mut() {
            layer.forget_derived();
        }
        match &mut self.scales {
            Some(scales) => scales.advance(gpu),
            None => Ok(()),
        }
    }

    /// How the LM head's GEMMs multiply.
    pub(crate) fn head(&self) -> Arithmetic<'static> {
        Arithmetic::of(self.config.head_precision).expect("checked at upload")
    }

    /// Copies the weights back into `model` (same config), e.g. to checkpoint.
    pub fn download_into(&self, gpu: &Gpu, model: &mut Model<f32>) -> Result<()> {
        self.weights.download_into(gpu, model.weights.tensors_mut())
    }

    /// The MoE layers in block order.
    pub fn moe_layers_mut(&mut self) -> impl Iterator<Item = &mut DeviceMoeLayer> {
        self.weights
            .blocks
            .iter_mut()
            .filter_map(|b| match &mut b.ffn {
                DeviceFeedForward::Moe(layer) => Some(layer),
                DeviceFeedForward::Dense { .. } => None,
            })
    }

    /// The shape attention runs at: whole sequences (the model's `seqLen`
    /// when split over ranks, else the batch's), this rank's heads.
    fn attention_shape(
        &self,
        sequence: Option<&SequenceParallel>,
        sequences: &Sequences,
    ) -> AttentionShape {
        let sp = sequence.map_or(1, SequenceParallel::size);
        AttentionShape {
            seq_len: match sequence {
                Some(sp) => sp.seq_len(),
                None => sequences.seq_len(),
            },
            n_heads: self.config.heads / sp,
            n_kv_heads: self.config.kv_heads / sp,
            head_dim: self.config.head_dim(),
        }
    }

    /// The positions of this rank's tokens in each sequence: all of them
    /// (the batch's, cut to its longest), or a sequence-parallel rank's
    /// slice (RoPE rotates by these).
    fn positions(
        &self,
        sequence: Option<&SequenceParallel>,
        sequences: &Sequences,
    ) -> Range<usize> {
        sequence.map_or(0..sequences.seq_len(), SequenceParallel::positions)
    }

    /// As [`Model::forward`]: `tokens` and `targets` whole sequences, every
    /// id below the vocabulary size.
    pub fn forward(&self, gpu: &Gpu, tokens: &[u32], targets: &[u32]) -> Result<DeviceForward> {
        self.forward_with(gpu, tokens, targets, ActivationMemory::KeepAll)
    }

    /// [`Self::forward`], keeping every activation or (`RecomputeBlocks`,
    /// `training.activationCheckpointing`) each block's input only.
    pub fn forward_with(
        &self,
        gpu: &Gpu,
        tokens: &[u32],
        targets: &[u32],
        memory: ActivationMemory,
    ) -> Result<DeviceForward> {
        self.forward_in(
            gpu,
            tokens,
            targets,
            BatchLayout::default(),
            memory,
            Parallel::default(),
            LossScale::PassMean,
        )
    }

    /// [`Self::forward_with`] spread over `parallel`'s groups, as
    /// [`Model::forward_parallel`]: with sequence parallelism `tokens` and
    /// `targets` are this rank's slice of each sequence and attention
    /// switches to whole sequences of this rank's heads (Ulysses); with
    /// expert parallelism this model holds its rank's share of the routed
    /// experts. Every rank of a group runs the same layers at the same time.
    /// The trained targets weigh in the loss as `loss` says; the batch's
    /// padding is left out of the MoE layers' loads and balance loss.
    pub fn forward_parallel(
        &self,
        gpu: &Gpu,
        batch: &Batch,
        memory: ActivationMemory,
        parallel: Parallel<'_>,
        loss: LossScale,
    ) -> Result<DeviceForward> {
        let (tokens, targets) = (&batch.inputs, &batch.targets);
        self.forward_in(
            gpu,
            tokens,
            targets,
            BatchLayout::of(batch),
            memory,
            parallel,
            loss,
        )
    }

    /// The forward pass; `real`: each sequence's (or slice's) real tokens,
    /// `None` when none is padded.
    #[allow(clippy::too_many_arguments)] // forward_parallel's, the batch taken apart
    fn forward_in(
        &self,
        gpu: &Gpu,
        tokens: &[u32],
        targets: &[u32],
        layout: BatchLayout<'_>,
        memory: ActivationMemory,
        parallel: Parallel<'_>,
        loss: LossScale,
    ) -> Result<DeviceForward> {
        let c = &self.config;
        let (h, vocab) = (c.hidden, c.vocab);
        let seq_len = layout.seq_len_of(c, parallel.sequence);
        assert!(
            tokens.len() == targets.len() && tokens.len().is_multiple_of(seq_len),
            "tokens and targets must be the same whole number of sequences (or slices)"
        );
        assert!(
            tokens.iter().all(|&t| (t as usize) < vocab)
                && targets
                    .iter()
                    .all(|&t| (t as usize) < vocab || t == crate::ops::cross_entropy::IGNORED),
            "token id beyond the vocabulary"
        );
        let n = tokens.len();
        let sequences = match layout.real {
            Some(real) => Sequences::padded(seq_len, real.to_vec()),
            None => Sequences::whole(n, seq_len),
        };
        assert_eq!(sequences.tokens(), n, "a real-token count per sequence");
        let ints = |v: &[u32]| -> Vec<i32> { v.iter().map(|&x| super::int(x as usize)).collect() };
        let (starts, positions) = match layout.documents {
            Some(starts) => {
                let host = PackedDocuments::new(
                    starts.to_vec(),
                    c.seq_len,
                    self.positions(parallel.sequence, &sequences),
                );
                let positions = gpu.upload(&ints(host.positions()))?;
                (gpu.upload(&ints(host.starts()))?, Some(positions))
            }
            // Attention sees whole sequences, under sequence parallelism too.
            None => {
                let whole = parallel.sequence.map_or(seq_len, |_| c.seq_len);
                (gpu.zeros::<i32>(sequences.count() * whole)?, None)
            }
        };
        let layout = PassLayout {
            sequences,
            starts,
            positions,
        };
        let (weights, targets) = crate::ops::cross_entropy::target_weights(targets, loss);
        let (tokens_d, targets) = (gpu.upload(tokens)?, gpu.upload(&targets)?);
        let mut x = gpu.output::<f32>(n * h)?;
        gpu.span("fwd.embedding", || {
            embedding::forward(gpu, &mut x, &tokens_d, &self.weights.embedding, h)
        })?;
        let mut blocks = Vec::with_capacity(c.layers);
        let (mut loads, mut aux_loss) = (Vec::new(), 0.0);
        for (index, block) in self.weights.blocks.iter().enumerate() {
            let (output, pass) = self.block_forward(gpu, index, block, x, parallel, &layout)?;
            match &pass.ffn {
                FeedForwardPass::Moe(moe) => {
                    loads.push(moe.expert_load().to_vec());
                    aux_loss += moe.aux_loss;
                }
                FeedForwardPass::MoeExpertParallel(moe) => {
                    loads.push(moe.expert_load().to_vec());
                    aux_loss += moe.aux_loss;
                }
                FeedForwardPass::Dense(_) => {}
            }
            blocks.push(match memory {
                ActivationMemory::KeepAll => StoredBlock::Kept(Box::new(pass)),
                ActivationMemory::RecomputeBlocks => StoredBlock::Input(pass.input),
            });
            x = output;
        }
        let head_span = gpu.span_start("fwd.head")?;
        let mut final_normed = gpu.output::<f32>(n * h)?;
        let mut final_rstd = gpu.output::<f32>(n)?;
        let w = &self.weights;
        rmsnorm::forward(
            gpu,
            &mut final_normed,
            &mut final_rstd,
            &x,
            &w.final_norm,
            c.norm_eps as f32,
        )?;
        let mut logits = gpu.output::<f32>(n * vocab)?;
        let head = self.head();
        let lm_head = self.weight(gpu, head, &w.lm_head)?;
        let lm_head = lm_head.whole(&w.lm_head);
        matmul::forward(gpu, head, &mut logits, &final_normed, lm_head, h, vocab)?;
        let mut losses = gpu.output::<f32>(n)?;
        let mut probs = gpu.output::<f32>(n * vocab)?;
        cross_entropy::forward(gpu, &mut losses, &mut probs, &logits, &targets, vocab)?;
        drop(logits);
        gpu.span_end(head_span)?;
        // The mean over the positions with a target, as the CPU model's.
        let cross_entropy = gpu
            .download(&losses)?
            .iter()
            .zip(&weights)
            .map(|(&l, w)| f64::from(l) * w)
            .sum::<f64>();
        let loss_weights = weights.into_iter().map(|w| w as f32).collect();
        Ok(DeviceForward {
            aux_loss,
            tokens: tokens.to_vec(),
            layout,
            targets,
            loss_weights,
            blocks,
            loads,
            final_input: x,
            final_normed,
            final_rstd,
            probs,
            cross_entropy,
        })
    }

    fn block_forward(
        &self,
        gpu: &Gpu,
        index: usize,
        block: &DeviceBlock<DeviceMoeLayer>,
        input: CudaSlice<f32>,
        parallel: Parallel<'_>,
        layout: &PassLayout,
    ) -> Result<(CudaSlice<f32>, BlockPass)> {
        let sequences = &layout.sequences;
        let c = &self.config;
        let (h, qw, kv) = (c.hidden, c.q_width(), c.kv_width());
        let tokens = input.len() / h;
        let eps = c.norm_eps as f32;

        let mut attention_normed = gpu.output::<f32>(tokens * h)?;
        let mut attention_rstd = gpu.output::<f32>(tokens)?;
        gpu.span("fwd.attention.norm", || {
            rmsnorm::forward(
                gpu,
                &mut attention_normed,
                &mut attention_rstd,
                &input,
                &block.attention_norm,
                eps,
            )
        })?;
        let mut q = gpu.output::<f32>(tokens * qw)?;
        let mut k = gpu.output::<f32>(tokens * kv)?;
        let mut v = gpu.output::<f32>(tokens * kv)?;
        let (attention_linears, ffn_linears) = self.block_linears(index);
        let at = |i| attention_linears.at(i);
        gpu.span("fwd.attention.qkv", || {
            let x = Prepared::of(gpu, attention_linears, &attention_normed)?;
            for (out, w, linear, width) in [
                (&mut q, &block.wq, WQ, qw),
                (&mut k, &block.wk, WK, kv),
                (&mut v, &block.wv, WV, kv),
            ] {
                let derived = self.weight(gpu, at(linear), w)?;
                matmul::forward(gpu, at(linear), out, x.whole(), derived.whole(w), h, width)?;
            }
            Ok(())
        })?;
        // q/k norms before RoPE, in chunks of the gains' width (a head, or
        // a token's whole projection), as the CPU block.
        let (mut q, mut k, qk_norm) = match &block.qk_norm {
            None => (q, k, None),
            Some((q_gain, k_gain)) => gpu.span("fwd.attention.qk_norm", || {
                let (q_normed, q_rstd) = norm_chunks(gpu, &q, q_gain, eps)?;
                let (k_normed, k_rstd) = norm_chunks(gpu, &k, k_gain, eps)?;
                let pass = QkNormPass {
                    q,
                    k,
                    q_rstd,
                    k_rstd,
                };
                Ok((q_normed, k_normed, Some(pass)))
            })?,
        };
        let sequence = parallel.sequence;
        let positions = self.positions(sequence, &layout.sequences);
        gpu.span("fwd.attention.rope", || match &layout.positions {
            // A packed batch: each token at its place in its document.
            Some(at) => {
                self.rope.forward_positions(gpu, &mut q, at, c.heads)?;
                self.rope.forward_positions(gpu, &mut k, at, c.kv_heads)
            }
            None => {
                self.rope
                    .forward_slice(gpu, &mut q, c.heads, positions.clone())?;
                self.rope.forward_slice(gpu, &mut k, c.kv_heads, positions)
            }
        })?;
        let core_span = gpu.span_start("fwd.attention.core")?;
        // Sequence parallelism: whole sequences of this rank's heads.
        let (q, k, v) = match sequence {
            None => (q, k, v),
            Some(sp) => {
                let d = c.head_dim();
                (
                    ulysses::to_heads(gpu, sp, &q, c.heads, d)?,
                    ulysses::to_heads(gpu, sp, &k, c.kv_heads, d)?,
                    ulysses::to_heads(gpu, sp, &v, c.kv_heads, d)?,
                )
            }
        };
        let shape = self.attention_shape(sequence, &layout.sequences);
        let mut attention_out = gpu.output::<f32>(q.len())?;
        let rows = q.len() / (shape.n_heads * shape.head_dim);
        let starts = Some(&layout.starts);
        let out = &mut attention_out;
        let saved = if self.attention == AttentionKernel::Flash && flash_attention::supports(shape)
        {
            let mut lse = gpu.output::<f32>(flash_attention::lse_len(shape, rows))?;
            flash_attention::forward(gpu, out, &mut lse, &q, &k, &v, shape, starts)?;
            AttentionSaved::Flash {
                lse,
                out_heads: None,
            }
        } else {
            let mut probs = gpu.output::<f32>(shape.probs_len(rows))?;
            attention::forward(gpu, out, &mut probs, &q, &k, &v, shape, starts)?;
            AttentionSaved::Probs(probs)
        };
        let (attention_out, attention) = match (sequence, saved) {
            (None, saved) => (attention_out, saved),
            (Some(sp), saved) => {
                let tokens_out =
                    ulysses::to_tokens(gpu, sp, &attention_out, c.heads, c.head_dim())?;
                let saved = match saved {
                    AttentionSaved::Flash { lse, .. } => AttentionSaved::Flash {
                        lse,
                        out_heads: Some(attention_out),
                    },
                    probs => probs,
                };
                (tokens_out, saved)
            }
        };
        gpu.span_end(core_span)?;
        // mid = input + attention_out woᵀ, the GEMM adding onto a copy of the input.
        let out_span = gpu.span_start("fwd.attention.out")?;
        let mut mid = gpu.stream().clone_dtod(&input)?;
        matmul::forward_view(
            gpu,
            at(WO),
            &mut mid.slice_mut(..),
            &attention_out.slice(..),
            self.weight(gpu, at(WO), &block.wo)?.whole(&block.wo),
            qw,
            h,
            true,
        )?;
        gpu.span_end(out_span)?;

        let mut ffn_normed = gpu.output::<f32>(tokens * h)?;
        let mut ffn_rstd = gpu.output::<f32>(tokens)?;
        gpu.span("fwd.ffn.norm", || {
            rmsnorm::forward(
                gpu,
                &mut ffn_normed,
                &mut ffn_rstd,
                &mid,
                &block.ffn_norm,
                eps,
            )
        })?;
        let (output, ffn) = match &block.ffn {
            DeviceFeedForward::Dense { w1, w3, w2 } => {
                let dense_span = gpu.span_start("fwd.ffn.dense")?;
                let d = c.dense_hidden;
                let mut a = gpu.output::<f32>(tokens * d)?;
                let mut b = gpu.output::<f32>(tokens * d)?;
                let mut hh = gpu.output::<f32>(tokens * d)?;
                let x = Prepared::of(gpu, ffn_linears, &ffn_normed)?;
                let at = |i| ffn_linears.at(i);
                let (w1d, w3d) = (self.weight(gpu, at(W1), w1)?, self.weight(gpu, at(W3), w3)?);
                matmul::forward(gpu, at(W1), &mut a, x.whole(), w1d.whole(w1), h, d)?;
                matmul::forward(gpu, at(W3), &mut b, x.whole(), w3d.whole(w3), h, d)?;
                drop(x);
                swiglu::forward(gpu, &mut hh, &a, &b)?;
                let mut out = gpu.stream().clone_dtod(&mid)?;
                matmul::forward_view(
                    gpu,
                    at(W2),
                    &mut out.slice_mut(..),
                    &hh.slice(..),
                    self.weight(gpu, at(W2), w2)?.whole(w2),
                    d,
                    h,
                    true,
                )?;
                gpu.span_end(dense_span)?;
                (out, FeedForwardPass::Dense([a, b, hh]))
            }
            DeviceFeedForward::Moe(layer) => {
                let sequence = parallel.sequence;
                match parallel.experts {
                    None => {
                        let mut pass =
                            layer.forward(gpu, ffn_linears, &ffn_normed, sequences, sequence)?;
                        let mut out = std::mem::replace(&mut pass.output, gpu.zeros::<f32>(0)?);
                        gpu.span("fwd.ffn.residual", || vector::add(gpu, &mut out, &mid))?;
                        (out, FeedForwardPass::Moe(Box::new(pass)))
                    }
                    Some(ep) => {
                        let mut exchange = DeviceExchange::new(ep);
                        let mut pass = layer.forward_expert_parallel(
                            gpu,
                            ffn_linears,
                            &ffn_normed,
                            sequences,
                            sequence,
                            &mut exchange,
                        )?;
                        let mut out = std::mem::replace(&mut pass.output, gpu.zeros::<f32>(0)?);
                        gpu.span("fwd.ffn.residual", || vector::add(gpu, &mut out, &mid))?;
                        (out, FeedForwardPass::MoeExpertParallel(Box::new(pass)))
                    }
                }
            }
        };
        let pass = BlockPass {
            input,
            attention_normed,
            attention_rstd,
            qk_norm,
            q,
            k,
            v,
            attention_out,
            attention,
            mid,
            ffn_normed,
            ffn_rstd,
            ffn,
        };
        Ok((output, pass))
    }

    /// As [`Model::backward`]: adds the gradient of the pass's mean
    /// cross-entropy with respect to every weight into `grads`.
    pub fn backward(
        &self,
        gpu: &Gpu,
        pass: &DeviceForward,
        grads: &mut DeviceGradients,
    ) -> Result<()> {
        self.backward_handing_over(gpu, pass, grads, Parallel::default(), &mut |_| Ok(()))
    }

    /// [`Self::backward`], handing each group of gradient tensors to
    /// `done` as soon as the pass has enqueued its last write to them: the
    /// LM head's and the final norm's first, then each block's from the
    /// last to the first, the embedding's last (the same order on every
    /// rank). The writes may still be running on the stream. Data
    /// parallelism starts reducing them there, overlapping the rest of the
    /// pass.
    pub fn backward_handing_over<'a>(
        &self,
        gpu: &Gpu,
        pass: &DeviceForward,
        grads: &'a mut DeviceGradients,
        parallel: Parallel<'_>,
        done: &mut dyn FnMut(Vec<&'a mut CudaSlice<f32>>) -> Result<()>,
    ) -> Result<()> {
        let DeviceWeights {
            embedding: grad_embedding,
            blocks: grad_blocks,
            final_norm: grad_final_norm,
            lm_head: grad_lm_head,
        } = grads;
        let c = &self.config;
        let (h, vocab, n) = (c.hidden, c.vocab, pass.tokens.len());
        let w = &self.weights;
        let head_span = gpu.span_start("bwd.head")?;
        // Written whole by the cross-entropy backward: no 4·n·vocab-byte memset.
        let mut dlogits = gpu.output::<f32>(n * vocab)?;
        let mean = gpu.upload(&pass.loss_weights)?;
        cross_entropy::backward(
            gpu,
            &mut dlogits,
            &mean,
            &pass.probs,
            &pass.targets,
            vocab,
            false,
        )?;
        let mut dfinal_normed = gpu.output::<f32>(n * h)?;
        linear_backward(
            gpu,
            self.head(),
            &mut dfinal_normed,
            false,
            grad_lm_head,
            &dlogits,
            (&pass.final_normed).into(),
            self.weight(gpu, self.head(), &w.lm_head)?.whole(&w.lm_head),
            (h, vocab),
        )?;
        drop(dlogits);
        let mut dres = gpu.zeros::<f32>(n * h)?;
        rmsnorm::backward(
            gpu,
            &mut dres,
            grad_final_norm,
            &dfinal_normed,
            &pass.final_input,
            &w.final_norm,
            &pass.final_rstd,
        )?;
        gpu.span_end(head_span)?;
        done(vec![grad_lm_head, grad_final_norm])?;
        for (index, ((block, stored), block_grads)) in w
            .blocks
            .iter()
            .zip(&pass.blocks)
            .zip(grad_blocks.iter_mut())
            .enumerate()
            .rev()
        {
            // A checkpointed block is recomputed from its input, one block at
            // a time: only its activations are alive at once.
            let recomputed;
            let block_pass = match stored {
                StoredBlock::Kept(block_pass) => block_pass,
                StoredBlock::Input(input) => {
                    let input = gpu.stream().clone_dtod(input)?;
                    recomputed = self
                        .block_forward(gpu, index, block, input, parallel, &pass.layout)?
                        .1;
                    &recomputed
                }
            };
            let linears = self.block_linears(index);
            self.block_backward(
                gpu,
                linears,
                block,
                block_pass,
                &mut dres,
                block_grads,
                parallel,
                &pass.layout,
            )?;
            done(block_grads.tensors_mut())?;
        }
        gpu.span("bwd.embedding", || {
            embedding::backward(gpu, grad_embedding, &dres, &pass.tokens, h)
        })?;
        done(vec![grad_embedding])
    }

    #[allow(clippy::too_many_arguments)]
    fn block_backward(
        &self,
        gpu: &Gpu,
        (attention_linears, ffn_linears): (Arithmetic<'_>, Arithmetic<'_>),
        block: &DeviceBlock<DeviceMoeLayer>,
        pass: &BlockPass,
        dres: &mut CudaSlice<f32>,
        grads: &mut DeviceBlock<DeviceMoeGrads>,
        parallel: Parallel<'_>,
        layout: &PassLayout,
    ) -> Result<()> {
        let c = &self.config;
        let (h, qw, kv) = (c.hidden, c.q_width(), c.kv_width());
        let tokens = dres.len() / h;

        // The feed-forward sublayer; the residual passes `dres` through.
        let mut dffn_normed = gpu.zeros::<f32>(tokens * h)?;
        match (&block.ffn, &pass.ffn, &mut grads.ffn) {
            (
                DeviceFeedForward::Dense { w1, w3, w2 },
                FeedForwardPass::Dense([a, b, hh]),
                DeviceFeedForward::Dense {
                    w1: g1,
                    w3: g3,
                    w2: g2,
                },
            ) => {
                let dense_span = gpu.span_start("bwd.ffn.dense")?;
                let d = c.dense_hidden;
                let mut dh = gpu.output::<f32>(tokens * d)?;
                let at = |i| ffn_linears.at(i);
                let w2d = self.weight(gpu, at(W2), w2)?;
                let w2 = w2d.whole(w2);
                linear_backward(gpu, at(W2), &mut dh, false, g2, dres, hh.into(), w2, (d, h))?;
                let mut da = gpu.output::<f32>(tokens * d)?;
                let mut db = gpu.output::<f32>(tokens * d)?;
                swiglu::backward(gpu, &mut da, &mut db, &dh, a, b, false)?;
                let x = Prepared::of(gpu, ffn_linears, &pass.ffn_normed)?;
                let dx = &mut dffn_normed;
                let (w1d, w3d) = (self.weight(gpu, at(W1), w1)?, self.weight(gpu, at(W3), w3)?);
                let (w1, w3) = (w1d.whole(w1), w3d.whole(w3));
                linear_backward(gpu, at(W1), dx, true, g1, &da, x.whole(), w1, (h, d))?;
                linear_backward(gpu, at(W3), dx, true, g3, &db, x.whole(), w3, (h, d))?;
                gpu.span_end(dense_span)?;
            }
            (
                DeviceFeedForward::Moe(layer),
                FeedForwardPass::Moe(moe_pass),
                DeviceFeedForward::Moe(g),
            ) => {
                layer.backward(
                    gpu,
                    ffn_linears,
                    moe_pass,
                    &pass.ffn_normed,
                    dres,
                    &mut dffn_normed,
                    g,
                )?;
            }
            (
                DeviceFeedForward::Moe(layer),
                FeedForwardPass::MoeExpertParallel(moe_pass),
                DeviceFeedForward::Moe(g),
            ) => {
                let ep = parallel
                    .experts
                    .expect("an expert-parallel pass's backward has its group");
                layer.backward_expert_parallel(
                    gpu,
                    ffn_linears,
                    moe_pass,
                    &pass.ffn_normed,
                    dres,
                    &mut dffn_normed,
                    g,
                    &mut DeviceExchange::new(ep),
                )?;
            }
            _ => unreachable!("a block's weights, activations and gradients share one layout"),
        }
        let norm_span = gpu.span_start("bwd.ffn.norm")?;
        rmsnorm::backward(
            gpu,
            dres,
            &mut grads.ffn_norm,
            &dffn_normed,
            &pass.mid,
            &block.ffn_norm,
            &pass.ffn_rstd,
        )?;
        gpu.span_end(norm_span)?;
        drop(dffn_normed);

        // The attention sublayer.
        let out_span = gpu.span_start("bwd.attention.out")?;
        let mut dattention = gpu.output::<f32>(tokens * qw)?;
        linear_backward(
            gpu,
            attention_linears.at(WO),
            &mut dattention,
            false,
            &mut grads.wo,
            dres,
            (&pass.attention_out).into(),
            self.weight(gpu, attention_linears.at(WO), &block.wo)?
                .whole(&block.wo),
            (qw, h),
        )?;
        gpu.span_end(out_span)?;
        let core_span = gpu.span_start("bwd.attention.core")?;
        let sequence = parallel.sequence;
        let d = c.head_dim();
        let dattention = match sequence {
            None => dattention,
            Some(sp) => ulysses::to_heads(gpu, sp, &dattention, c.heads, d)?,
        };
        let mut dq = gpu.zeros::<f32>(pass.q.len())?;
        let mut dk = gpu.zeros::<f32>(pass.k.len())?;
        let mut dv = gpu.zeros::<f32>(pass.v.len())?;
        let grads_qkv = attention::AttentionGrads {
            q: &mut dq,
            k: &mut dk,
            v: &mut dv,
        };
        let shape = self.attention_shape(sequence, &layout.sequences);
        match &pass.attention {
            AttentionSaved::Probs(probs) => attention::backward(
                gpu,
                grads_qkv,
                &dattention,
                &pass.q,
                &pass.k,
                &pass.v,
                probs,
                shape,
            )?,
            AttentionSaved::Flash { lse, out_heads } => flash_attention::backward(
                gpu,
                grads_qkv,
                &dattention,
                &pass.q,
                &pass.k,
                &pass.v,
                out_heads.as_ref().unwrap_or(&pass.attention_out),
                lse,
                shape,
                Some(&layout.starts),
            )?,
        }
        drop(dattention);
        let (mut dq, mut dk, dv) = match sequence {
            None => (dq, dk, dv),
            Some(sp) => (
                ulysses::to_tokens(gpu, sp, &dq, c.heads, d)?,
                ulysses::to_tokens(gpu, sp, &dk, c.kv_heads, d)?,
                ulysses::to_tokens(gpu, sp, &dv, c.kv_heads, d)?,
            ),
        };
        gpu.span_end(core_span)?;
        let positions = self.positions(sequence, &layout.sequences);
        gpu.span("bwd.attention.rope", || match &layout.positions {
            Some(at) => {
                self.rope.backward_positions(gpu, &mut dq, at, c.heads)?;
                self.rope.backward_positions(gpu, &mut dk, at, c.kv_heads)
            }
            None => {
                self.rope
                    .backward_slice(gpu, &mut dq, c.heads, positions.clone())?;
                self.rope
                    .backward_slice(gpu, &mut dk, c.kv_heads, positions)
            }
        })?;
        // Through the q/k norms (before RoPE in the forward pass): their
        // input gradients into fresh zeros (the kernel adds), their gains'
        // gradients added into the block's, as the CPU block.
        let (dq, dk) = match (&pass.qk_norm, &block.qk_norm, &mut grads.qk_norm) {
            (None, None, None) => (dq, dk),
            (Some(norms), Some((q_gain, k_gain)), Some((dq_gain, dk_gain))) => {
                gpu.span("bwd.attention.qk_norm", || {
                    let mut dq_projected = gpu.zeros::<f32>(dq.len())?;
                    let mut dk_projected = gpu.zeros::<f32>(dk.len())?;
                    rmsnorm::backward(
                        gpu,
                        &mut dq_projected,
                        dq_gain,
                        &dq,
                        &norms.q,
                        q_gain,
                        &norms.q_rstd,
                    )?;
                    rmsnorm::backward(
                        gpu,
                        &mut dk_projected,
                        dk_gain,
                        &dk,
                        &norms.k,
                        k_gain,
                        &norms.k_rstd,
                    )?;
                    Ok((dq_projected, dk_projected))
                })?
            }
            _ => unreachable!("a block's weights, activations and gradients share one layout"),
        };
        let qkv_span = gpu.span_start("bwd.attention.qkv")?;
        let mut dnormed = gpu.output::<f32>(tokens * h)?;
        // The normed input feeds the three weight gradients.
        let x = Prepared::of(gpu, attention_linears, &pass.attention_normed)?;
        for (linear, d, dw, weight, width) in [
            (WQ, &dq, &mut grads.wq, &block.wq, qw),
            (WK, &dk, &mut grads.wk, &block.wk, kv),
            (WV, &dv, &mut grads.wv, &block.wv, kv),
        ] {
            let arithmetic = attention_linears.at(linear);
            let derived = self.weight(gpu, arithmetic, weight)?;
            // wq's input gradient overwrites dnormed; wk's and wv's add to it.
            let accumulate = linear != WQ;
            let (x, w) = (x.whole(), derived.whole(weight));
            linear_backward(
                gpu,
                arithmetic,
                &mut dnormed,
                accumulate,
                dw,
                d,
                x,
                w,
                (h, width),
            )?;
        }
        drop(x);
        gpu.span_end(qkv_span)?;
        gpu.span("bwd.attention.norm", || {
            rmsnorm::backward(
                gpu,
                dres,
                &mut grads.attention_norm,
                &dnormed,
                &pass.input,
                &block.attention_norm,
                &pass.attention_rstd,
            )
        })
    }
}

/// `values` RMS-normed in chunks of `gain`'s width (a head, or a whole
/// projection), with each chunk's reciprocal RMS.
fn norm_chunks(
    gpu: &Gpu,
    values: &CudaSlice<f32>,
    gain: &CudaSlice<f32>,
    eps: f32,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    let mut out = gpu.output::<f32>(values.len())?;
    let mut rstd = gpu.output::<f32>(values.len() / gain.len())?;
    rmsnorm::forward(gpu, &mut out, &mut rstd, values, gain, eps)?;
    Ok((out, rstd))
}

/// The backward pass of `y = x wᵀ` (`x: [rows, in]`, `w: [out, in]`):
/// `dx (+)= dy w` (added when `accumulate_dx`, else overwritten) and
/// `dw += dyᵀ x`; `dy`, read by both, rounded once in bf16.
#[allow(clippy::too_many_arguments)]
fn linear_backward(
    gpu: &Gpu,
    arithmetic: Arithmetic,
    dx: &mut CudaSlice<f32>,
    accumulate_dx: bool,
    dw: &mut CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    x: Input<'_>,
    w: Input<'_>,
    (in_dim, out_dim): (usize, usize),
) -> Result<()> {
    let rows = dy.len() / out_dim;
    let dy = Prepared::of(gpu, arithmetic, dy)?;
    matmul::gemm(
        gpu,
        arithmetic,
        &mut dx.slice_mut(..),
        dy.whole(),
        false,
        w,
        false,
        (rows, in_dim, out_dim),
        accumulate_dx,
    )?;
    matmul::gemm(
        gpu,
        arithmetic,
        &mut dw.slice_mut(..),
        dy.whole(),
        true,
        x,
        false,
        (out_dim, in_dim, rows),
        true,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attention_kernel_is_gemm_unless_flash_and_a_stray_value_is_refused() {
        for gemm in [None, Some(""), Some("gemm")] {
            assert_eq!(AttentionKernel::parse(gemm), Ok(AttentionKernel::Gemm));
        }
        assert_eq!(
            AttentionKernel::parse(Some("flash")),
            Ok(AttentionKernel::Flash)
        );
        let error = AttentionKernel::parse(Some("flash2")).expect_err("unknown");
        assert!(
            error.contains(AttentionKernel::ENV) && error.contains("flash2"),
            "{error}"
        );
    }

    /// The device numbers its linear layers as the CPU model hands out its
    /// delayed scales: as many in all, each block's run of them starting
    /// where the previous block's ended (the dense block's 4 + 3, each MoE
    /// block's 4 + 3 per routed expert + 3 for the shared experts).
    #[test]
    fn linear_layers_are_numbered_as_the_cpu_numbers_them() {
        let mut config = super::super::train_check::config();
        config.gemm_precision = GemmPrecision::Fp8(Fp8Recipe::Tensorwise);
        let (bases, total) = linear_layout(&config);
        let cpu = Model::<f32>::initial(config.clone(), 1)
            .fp8_histories()
            .len();
        assert_eq!(total, cpu);
        let moe = ATTENTION_LINEARS + MLP_LINEARS * (config.moe.n_routed_experts + 1);
        assert_eq!(bases, [0, 7, 7 + moe]);
        assert_eq!(total, 7 + 2 * moe);
        // q/k norms are no linear layers: the numbering stays the CPU's.
        for qk_norm in ["perHead", "whole"] {
            let mut config = super::super::train_check::qk_norm_config(qk_norm);
            config.gemm_precision = GemmPrecision::Fp8(Fp8Recipe::Tensorwise);
            let cpu = Model::<f32>::initial(config.clone(), 1)
                .fp8_histories()
                .len();
            assert_eq!(
                linear_layout(&config),
                (vec![0, 7, 7 + moe], cpu),
                "{qk_norm}"
            );
        }
    }

    /// q/k norms, heads wider than hidden / heads and a non-default
    /// epsilon run on the device: the check group "training"'s configs
    /// pass the upload's refusal; the refusals that remain still refuse.
    #[test]
    fn q_k_norms_and_wide_heads_are_not_refused() {
        for qk_norm in ["perHead", "whole"] {
            let config = super::super::train_check::qk_norm_config(qk_norm);
            assert!(config.qk_norm.is_some() && config.q_width() != config.hidden);
            assert_eq!(config.norm_eps, 1e-6);
            assert_eq!(unsupported(&config), None, "{qk_norm}");
        }
        let mut fp8_head = super::super::train_check::qk_norm_config("perHead");
        fp8_head.head_precision = GemmPrecision::Fp8(Fp8Recipe::Tensorwise);
        assert!(unsupported(&fp8_head).is_some());
    }
}
