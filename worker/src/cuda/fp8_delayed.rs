//! The tensorwise FP8 recipe's delayed scales on the device; CPU reference:
//! [`crate::fp8::delayed`]. Every scaled tensor (each FP8 linear layer's
//! input, weight and output gradient, [`Role`]) keeps its amax history and
//! the amax observed this step in device memory, so a GEMM learns its
//! operand's scale without a read-back: one kernel takes the operand's
//! amax, one thread turns history (or, without one, that amax) into the
//! scale and records the observation, and the quantiser reads the scale
//! (`fp8_quantize_1x128*_f32`'s `tensor_scale`). [`DelayedScales::advance`]
//! ends a step. Not checkpointed, as on the CPU: a resumed run rebuilds
//! its histories.
//!
//! Linear layers are numbered as the CPU numbers them
//! (the CPU model's `BlockScales`): per block the attention projections
//! `wq, wk, wv, wo`, then the feed-forward layer's (`w1, w3, w2` of a dense
//! MLP; of each routed expert in order, then of the shared experts).

use super::{Gpu, Result, elementwise, grid};
use crate::fp8::delayed::{HISTORY_LEN, Role};
use moe_kernels::cudarc::driver::{CudaSlice, CudaView, PushKernelArg};
use moe_kernels::registry::FP8;

/// The delayed scales of `linears` linear layers, three tensors each.
pub struct DelayedScales {
    linears: usize,
    /// `[tensors, HISTORY_LEN]`, newest last.
    histories: CudaSlice<f32>,
    /// `[tensors]`: entries of each history in use.
    lengths: CudaSlice<i32>,
    /// `[tensors]`: bits of the largest amax observed this step (0: none).
    /// The scale kernel writes it through a shared reference: the passes
    /// observe while they only borrow the model, as the CPU's atomics do,
    /// and one stream orders every access.
    observed: CudaSlice<u32>,
}

impl std::fmt::Debug for DelayedScales {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DelayedScales({} linear layers)", self.linears)
    }
}

fn tensor(linear: usize, role: Role) -> usize {
    3 * linear
        + match role {
            Role::Input => 0,
            Role::Weight => 1,
            Role::GradOutput => 2,
        }
}

impl DelayedScales {
    /// Fresh scales (no history) for `linears` linear layers.
    pub fn new(gpu: &Gpu, linears: usize) -> Result<Self> {
        let tensors = 3 * linears;
        Ok(Self {
            linears,
            histories: gpu.zeros(tensors * HISTORY_LEN)?,
            lengths: gpu.zeros(tensors)?,
            observed: gpu.zeros(tensors)?,
        })
    }

    pub fn linears(&self) -> usize {
        self.linears
    }

    /// The scale of `x` as `linear`'s `role` tensor, in a one-value buffer
    /// for the quantiser: from its history, or from `x`'s own amax while it
    /// has none (`DelayedScale::scale`); `x`'s amax is observed for the
    /// history (`DelayedScale::observe`).
    pub fn scale(
        &self,
        gpu: &Gpu,
        linear: usize,
        role: Role,
        x: &CudaView<'_, f32>,
    ) -> Result<CudaSlice<f32>> {
        assert!(linear < self.linears, "linear {linear} of {}", self.linears);
        let t = tensor(linear, role);
        let mut amax = gpu.zeros::<u32>(1)?;
        let n = x.len();
        if n > 0 {
            let f = gpu.function(&FP8, "fp8_amax_f32")?;
            let mut launch = gpu.stream().launch_builder(&f);
            launch.arg(&mut amax).arg(x).arg(&n);
            unsafe { launch.launch(elementwise(n)) }?;
        }
        let mut scale = gpu.output::<f32>(1)?;
        let f = gpu.function(&FP8, "fp8_delayed_scale_f32")?;
        let (observed, history, length) = (
            self.observed.slice(t..t + 1),
            self.histories.slice(t * HISTORY_LEN..(t + 1) * HISTORY_LEN),
            self.lengths.slice(t..t + 1),
        );
        let mut launch = gpu.stream().launch_builder(&f);
        launch
            .arg(&mut scale)
            .arg(&observed)
            .arg(&history)
            .arg(&length)
            .arg(&amax);
        unsafe { launch.launch(grid(1, 32, 0)) }?;
        Ok(scale)
    }

    /// The amaxes observed this step, one per tensor (input, weight, output
    /// gradient of each linear layer; 0 for a tensor not seen): the CPU
    /// model's `fp8_observed` layout.
    pub fn observed(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        Ok(gpu
            .download(&self.observed)?
            .into_iter()
            .map(f32::from_bits)
            .collect())
    }

    /// Replaces the amaxes observed this step by `amaxes` (as
    /// [`Self::observed`] lists them): the world's, each at least this
    /// rank's, after an all-reduce max.
    pub fn set_observed(&mut self, gpu: &Gpu, amaxes: &[f32]) -> Result<()> {
        assert_eq!(amaxes.len(), 3 * self.linears, "one amax per scaled tensor");
        let bits: Vec<u32> = amaxes.iter().map(|a| a.to_bits()).collect();
        Ok(gpu.stream().memcpy_htod(&bits, &mut self.observed)?)
    }

    /// Ends a training step (`DelayedScale::advance` for every tensor).
    pub fn advance(&mut self, gpu: &Gpu) -> Result<()> {
        let tensors = 3 * self.linears;
        if tensors == 0 {
            return Ok(());
        }
        let f = gpu.function(&FP8, "fp8_advance_histories")?;
        let tensors_i = super::int(tensors);
        let mut launch = gpu.stream().launch_builder(&f);
        launch
            .arg(&mut self.histories)
            .arg(&mut self.lengths)
            .arg(&mut self.observed)
            .arg(&tensors_i);
        unsafe { launch.launch(grid(tensors.div_ceil(256), 256, 0)) }?;
        Ok(())
    }

    /// Every linear layer's histories (input, weight, output gradient;
    /// oldest first), as [`crate::model::Model::fp8_histories`] lists them.
    pub fn histories(&self, gpu: &Gpu) -> Result<Vec<[Vec<f32>; 3]>> {
        let (lengths, histories) = (gpu.download(&self.lengths)?, gpu.download(&self.histories)?);
        let history = |t: usize| histories[t * HISTORY_LEN..][..lengths[t] as usize].to_vec();
        Ok((0..self.linears)
            .map(|linear| {
                [Role::Input, Role::Weight, Role::GradOutput]
                    .map(|role| history(tensor(linear, role)))
            })
            .collect())
    }

    /// `linear`'s `role` history, oldest first (for checks).
    pub fn history(&self, gpu: &Gpu, linear: usize, role: Role) -> Result<Vec<f32>> {
        let t = tensor(linear, role);
        let length = gpu.download(&self.lengths)?[t] as usize;
        let histories = gpu.download(&self.histories)?;
        Ok(histories[t * HISTORY_LEN..t * HISTORY_LEN + length].to_vec())
    }
}
