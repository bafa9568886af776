//! Rotary position embedding on the device; CPU reference: [`crate::ops::rope`].
//! The cos/sin table is the CPU's own ([`RopeTable`]), uploaded once.

use super::{Gpu, Result, elementwise, int};
use crate::ops::rope::RopeTable;
use moe_kernels::cudarc::driver::{CudaSlice, PushKernelArg};
use moe_kernels::registry::ROPE;
use std::ops::Range;

/// A [`RopeTable`] on the device.
pub struct DeviceRope {
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    seq_len: usize,
    head_dim: usize,
}

impl DeviceRope {
    pub fn new(gpu: &Gpu, table: &RopeTable<f32>, head_dim: usize) -> Result<Self> {
        Ok(Self {
            cos: gpu.upload(table.cos())?,
            sin: gpu.upload(table.sin())?,
            seq_len: table.seq_len(),
            head_dim,
        })
    }

    /// As [`RopeTable::forward`]: rotates `x: [tokens, heads, head_dim]` in place.
    pub fn forward(&self, gpu: &Gpu, x: &mut CudaSlice<f32>, heads: usize) -> Result<()> {
        self.rotate(gpu, x, heads, 0..self.seq_len, 1.0)
    }

    /// As [`RopeTable::forward_at`]: `x` holds slices of every sequence at
    /// `positions` (a sequence-parallel rank's tokens).
    pub fn forward_slice(
        &self,
        gpu: &Gpu,
        x: &mut CudaSlice<f32>,
        heads: usize,
        positions: Range<usize>,
    ) -> Result<()> {
        self.rotate(gpu, x, heads, positions, 1.0)
    }

    /// As [`RopeTable::backward_at`].
    pub fn backward_slice(
        &self,
        gpu: &Gpu,
        dx: &mut CudaSlice<f32>,
        heads: usize,
        positions: Range<usize>,
    ) -> Result<()> {
        self.rotate(gpu, dx, heads, positions, -1.0)
    }

    /// As [`RopeTable::forward_positions`]: `x: [tokens, heads, head_dim]`,
    /// token `t` at `positions[t]` (a packed batch's tokens, each at its
    /// place in its document), pairs interleaved.
    pub fn forward_positions(
        &self,
        gpu: &Gpu,
        x: &mut CudaSlice<f32>,
        positions: &CudaSlice<i32>,
        heads: usize,
    ) -> Result<()> {
        self.rotate_rows(gpu, x, positions, heads, false, 1.0)
    }

    /// As [`RopeTable::backward_positions`].
    pub fn backward_positions(
        &self,
        gpu: &Gpu,
        dx: &mut CudaSlice<f32>,
        positions: &CudaSlice<i32>,
        heads: usize,
    ) -> Result<()> {
        self.rotate_rows(gpu, dx, positions, heads, false, -1.0)
    }

    /// The serving engine's rotation (`serve::engine`'s `rotate`): rotates
    /// `x: [rows, heads, head_dim]` in place, row `r` at `positions[r]`
    /// (each below the table's length), pairing dimensions in halves
    /// (`rotate_half`) or interleaved as `halves` says.
    pub fn forward_at(
        &self,
        gpu: &Gpu,
        x: &mut CudaSlice<f32>,
        positions: &CudaSlice<i32>,
        heads: usize,
        halves: bool,
    ) -> Result<()> {
        self.rotate_rows(gpu, x, positions, heads, halves, 1.0)
    }

    /// Row `r` of `x` turned by `direction ×` its position's angles.
    fn rotate_rows(
        &self,
        gpu: &Gpu,
        x: &mut CudaSlice<f32>,
        positions: &CudaSlice<i32>,
        heads: usize,
        halves: bool,
        direction: f32,
    ) -> Result<()> {
        let rows = positions.len();
        assert_eq!(
            x.len(),
            rows * heads * self.head_dim,
            "RoPE input is not [rows, heads, head_dim]"
        );
        if x.is_empty() {
            return Ok(());
        }
        let pairs = x.len() / 2;
        let f = gpu.function(&ROPE, "rope_positions_f32")?;
        let (rows_i, heads_i, dim_i, halves_i) =
            (int(rows), int(heads), int(self.head_dim), i32::from(halves));
        let mut launch = gpu.stream().launch_builder(&f);
        launch
            .arg(x)
            .arg(&self.cos)
            .arg(&self.sin)
            .arg(positions)
            .arg(&rows_i)
            .arg(&heads_i)
            .arg(&dim_i)
            .arg(&halves_i)
            .arg(&direction);
        unsafe { launch.launch(elementwise(pairs)) }?;
        Ok(())
    }

    /// As [`RopeTable::backward`]: rotates the gradient back in place.
    pub fn backward(&self, gpu: &Gpu, dx: &mut CudaSlice<f32>, heads: usize) -> Result<()> {
        self.rotate(gpu, dx, heads, 0..self.seq_len, -1.0)
    }

    fn rotate(
        &self,
        gpu: &Gpu,
        x: &mut CudaSlice<f32>,
        heads: usize,
        positions: Range<usize>,
        direction: f32,
    ) -> Result<()> {
        let token_width = heads * self.head_dim;
        let span = positions.len();
        assert!(
            span > 0 && positions.end <= self.seq_len,
            "RoPE positions {positions:?} beyond the table's {}",
            self.seq_len
        );
        assert!(
            token_width > 0 && x.len().is_multiple_of(token_width * span),
            "RoPE input is not whole sequences (or slices) of [heads, head_dim] tokens"
        );
        let tokens = x.len() / token_width;
        if tokens == 0 {
            return Ok(());
        }
        let pairs = x.len() / 2;
        let f = gpu.function(&ROPE, "rope_f32")?;
        let (tokens_i, heads_i, dim_i, first_i, span_i) = (
            int(tokens),
            int(heads),
            int(self.head_dim),
            int(positions.start),
            int(span),
        );
        let mut launch = gpu.stream().launch_builder(&f);
        launch
            .arg(x)
            .arg(&self.cos)
            .arg(&self.sin)
            .arg(&tokens_i)
            .arg(&heads_i)
            .arg(&dim_i)
            .arg(&first_i)
            .arg(&span_i)
            .arg(&direction);
        unsafe { launch.launch(elementwise(pairs)) }?;
        Ok(())
    }
}
