//! LoRA adapters on the device; CPU reference: [`crate::train::lora`], whose
//! reparameterisation this repeats: the adapters' gradients from the
//! weights' (`∂L/∂B = s·G·Aᵀ`, `∂L/∂A = s·Bᵀ·G`), AdamW on `A` and `B`
//! alone (the same kernel and scalars as the weights'), and the merge
//! `W = W₀ + s·B·A` written into the model after each update. The three
//! products are batched TF32 GEMMs over a tensor's matrices (its routed
//! experts, or one); the scaling and the merge's sum are the CPU's
//! operations in the CPU's order (`scale_f32`, `lora_merge_f32`).

use moe_kernels::cudarc::driver::CudaSlice;

use super::matmul::{self, Operand};
use super::{Gpu, Result, adamw, vector};
use crate::train::lora::Lora;
use crate::train::optimizer::AdamWStep;

/// One model tensor's adapters and their AdamW state, on the device.
struct DeviceAdapter {
    /// The tensor's place in the model's canonical order.
    tensor: usize,
    matrices: usize,
    rows: usize,
    cols: usize,
    base: CudaSlice<f32>,
    a: [CudaSlice<f32>; 3],
    b: [CudaSlice<f32>; 3],
    grad_a: CudaSlice<f32>,
    grad_b: CudaSlice<f32>,
}

/// Every adapter of a `training.lora` run, on the device.
pub struct DeviceLora {
    rank: usize,
    scale: f32,
    adapters: Vec<DeviceAdapter>,
}

impl DeviceLora {
    /// `lora`'s adapters, values and moments, uploaded.
    pub fn upload(gpu: &Gpu, lora: &Lora) -> Result<Self> {
        let adapters = lora
            .adapters()
            .iter()
            .map(|adapter| {
                let param = |p: &crate::train::lora::Param| -> Result<[CudaSlice<f32>; 3]> {
                    Ok([gpu.upload(&p.values)?, gpu.upload(&p.m)?, gpu.upload(&p.v)?])
                };
                Ok(DeviceAdapter {
                    tensor: adapter.tensor,
                    matrices: adapter.matrices,
                    rows: adapter.rows,
                    cols: adapter.cols,
                    base: gpu.upload(&adapter.base)?,
                    grad_a: gpu.zeros(adapter.a.values.len())?,
                    grad_b: gpu.zeros(adapter.b.values.len())?,
                    a: param(&adapter.a)?,
                    b: param(&adapter.b)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            rank: lora.settings().rank,
            scale: lora.settings().scale() as f32,
            adapters,
        })
    }

    /// Brings `lora` (the host copy checkpoints are written from) up to
    /// date: `A`, `B` and their moments.
    pub fn download_into(&self, gpu: &Gpu, lora: &mut Lora) -> Result<()> {
        for (device, (host_a, host_b)) in self.adapters.iter().zip(lora.adapters_mut()) {
            for (from, to) in [(&device.a, host_a), (&device.b, host_b)] {
                gpu.stream()
                    .memcpy_dtoh(&from[0], to.values.as_mut_slice())?;
                gpu.stream().memcpy_dtoh(&from[1], to.m.as_mut_slice())?;
                gpu.stream().memcpy_dtoh(&from[2], to.v.as_mut_slice())?;
            }
        }
        gpu.synchronize()
    }

    /// The adapters' gradients from the weights' (`grads`, every tensor in
    /// canonical order), as [`Lora::gradients`], into [`Self::grads_mut`].
    pub fn gradients(&mut self, gpu: &Gpu, grads: &[&CudaSlice<f32>]) -> Result<()> {
        let r = self.rank;
        for adapter in &mut self.adapters {
            let (n, rows, cols) = (adapter.matrices, adapter.rows, adapter.cols);
            let g = grads[adapter.tensor].slice(..);
            let (a, b) = (adapter.a[0].slice(..), adapter.b[0].slice(..));
            // ∂B [rows, r] = G [rows, cols] @ Aᵀ (A stored [r, cols]).
            matmul::gemm_batched(
                gpu,
                &mut adapter.grad_b.slice_mut(..),
                (r, rows * r),
                Operand {
                    view: &g,
                    ld: cols,
                    batch_stride: rows * cols,
                    transposed: false,
                },
                Operand {
                    view: &a,
                    ld: cols,
                    batch_stride: r * cols,
                    transposed: true,
                },
                (rows, r, cols),
                n,
                false,
            )?;
            // ∂A [r, cols] = Bᵀ (B stored [rows, r]) @ G [rows, cols].
            matmul::gemm_batched(
                gpu,
                &mut adapter.grad_a.slice_mut(..),
                (cols, r * cols),
                Operand {
                    view: &b,
                    ld: r,
                    batch_stride: rows * r,
                    transposed: true,
                },
                Operand {
                    view: &g,
                    ld: cols,
                    batch_stride: rows * cols,
                    transposed: false,
                },
                (r, cols, rows),
                n,
                false,
            )?;
            vector::scale(gpu, &mut adapter.grad_a, self.scale)?;
            vector::scale(gpu, &mut adapter.grad_b, self.scale)?;
        }
        Ok(())
    }

    /// Every adapter's gradients (`A`'s, then `B`'s), for the ranks' mean.
    pub fn grads_mut(&mut self) -> Vec<&mut CudaSlice<f32>> {
        self.adapters
            .iter_mut()
            .flat_map(|a| [&mut a.grad_a, &mut a.grad_b])
            .collect()
    }

    /// The sum of the squares of every adapter gradient (the step's norm,
    /// before the micro-step mean).
    pub fn sum_squares(&self, gpu: &Gpu) -> Result<f64> {
        let all: Vec<&CudaSlice<f32>> = self
            .adapters
            .iter()
            .flat_map(|a| [&a.grad_a, &a.grad_b])
            .collect();
        vector::sum_squares(gpu, &all)
    }

    /// One AdamW update of every `A` and `B` from the gradients
    /// [`Self::gradients`] left.
    pub fn update(&mut self, gpu: &Gpu, step: &AdamWStep) -> Result<()> {
        for adapter in &mut self.adapters {
            let [a, a_m, a_v] = &mut adapter.a;
            adamw::apply(gpu, step, a, a_m, a_v, &adapter.grad_a)?;
            let [b, b_m, b_v] = &mut adapter.b;
            adamw::apply(gpu, step, b, b_m, b_v, &adapter.grad_b)?;
        }
        Ok(())
    }

    /// Writes `W₀ + s·B·A` into each adapted tensor of `weights` (every
    /// tensor of the model in canonical order).
    pub fn merge_into(&self, gpu: &Gpu, mut weights: Vec<&mut CudaSlice<f32>>) -> Result<()> {
        let r = self.rank;
        for adapter in &self.adapters {
            let (n, rows, cols) = (adapter.matrices, adapter.rows, adapter.cols);
            let w = &mut *weights[adapter.tensor];
            let (a, b) = (adapter.a[0].slice(..), adapter.b[0].slice(..));
            // B·A [rows, cols] into the weight, then W₀ + s·(B·A) in place.
            matmul::gemm_batched(
                gpu,
                &mut w.slice_mut(..),
                (cols, rows * cols),
                Operand {
                    view: &b,
                    ld: r,
                    batch_stride: rows * r,
                    transposed: false,
                },
                Operand {
                    view: &a,
                    ld: cols,
                    batch_stride: r * cols,
                    transposed: false,
                },
                (rows, cols, r),
                n,
                false,
            )?;
            vector::lora_merge(gpu, w, &adapter.base, self.scale)?;
        }
        Ok(())
    }
}
