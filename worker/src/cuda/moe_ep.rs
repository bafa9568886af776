//! The training MoE layer with its routed experts split over an
//! expert-parallel group, on the device: the device form of
//! [`crate::moe::expert_parallel`] (the CPU trainer's), with the same
//! contract, so a rank's tokens and an owner's experts meet the same rows:
//!
//! ```text
//! forward:  router, top-k, dispatch, permute (this rank's tokens) ─▶ counts (host)
//!           ─▶ rows to their experts' owners ┐ shared experts on this rank's tokens
//!                                             ┘ (device, meanwhile)
//!           ─▶ one batch per local expert ─▶ SwiGLU ─▶ back to source order
//!           ─▶ rows back ─▶ unpermute · gates ─▶ + the shared experts' output
//! backward: d row = gate · dout, d gate (unpermute's backward) ─▶ rows to the
//!           owners ┐ shared experts' backward (meanwhile)
//!                  ┘
//!           ─▶ expert backward per local batch (weight gradients here)
//!           ─▶ d input rows back ─▶ added at their tokens ─▶ router backward
//! ```
//!
//! Routing, the gates' and the router's gradients stay with the rank that
//! owns the token; only expert rows travel, through the serving replicas'
//! [`DeviceExchange`] (device to device over NCCL, whose stream waits only
//! for an event recorded once the rows to send are written, so the shared
//! experts compute while the rows travel; through host memory over TCP).
//! The regrouping orders are [`DevicePlan`]'s, tested on the CPU against the
//! CPU layer's [`crate::moe::expert_parallel::ExchangePlan`]. A failed
//! exchange is recorded in the exchange's `ExpertParallel` (zeros of the
//! expected shape travel on), as the CPU trainer records it, and the trainer
//! takes it after the step.

use std::borrow::Borrow;

use moe_kernels::cudarc::driver::CudaSlice;

use super::matmul::Arithmetic;
use super::moe_layer::{
    BalanceLoss, DeviceMoeGrads, DeviceMoeLayer, ExpertMlps, Routed, combine_backward,
    expert_mlps_backward, route_rows,
};
use super::serve_ep::{DeviceExchange, LocalExperts, Overlapped, gather, local_experts};
use super::{Gpu, GpuError, Result, dispatch, vector};
use crate::dist::expert_parallel::ExpertParallel;
use crate::dist::sequence_parallel::SequenceParallel;
use crate::moe::Sequences;
use crate::serve::exchange_order::DevicePlan;

/// An expert-parallel forward pass and what its backward pass needs.
pub struct DeviceExpertParallelForward {
    /// `[tokens, hidden]`, this rank's tokens.
    pub output: CudaSlice<f32>,
    /// This rank's tokens routed and sorted by expert (every expert).
    routed: Routed,
    plan: DevicePlan,
    /// The local experts' input rows (expert-major batches) and their
    /// activations; `None` when no rank sent this rank a row.
    local: Option<(CudaSlice<f32>, ExpertMlps)>,
    /// The expert outputs of this rank's rows, in its dispatch order, as
    /// they came back (the gates' gradients need them).
    combined: CudaSlice<f32>,
    shared: Option<[CudaSlice<f32>; 3]>,
    /// The sequence-wise balance loss of this rank's sequences.
    pub aux_loss: f64,
    balance: Option<BalanceLoss>,
    /// Real tokens this rank routed to each expert ([`Routed::real_load`]).
    load: Vec<usize>,
}

impl DeviceExpertParallelForward {
    /// Real tokens this rank routed to each expert (every expert, not only
    /// its own; padding is computed, not counted).
    pub fn expert_load(&self) -> &[usize] {
        &self.load
    }
}

impl DeviceMoeLayer {
    /// As [`crate::moe::expert_parallel::forward`]: this layer holds its
    /// rank's share of the routed experts; every rank of `exchange` calls
    /// it at the same point with its own tokens (at least one sequence, or
    /// slice of one under `sequence`).
    pub fn forward_expert_parallel<E: Borrow<ExpertParallel>>(
        &self,
        gpu: &Gpu,
        arithmetic: Arithmetic,
        x: &CudaSlice<f32>,
        sequences: &Sequences,
        sequence: Option<&SequenceParallel>,
        exchange: &mut DeviceExchange<E>,
    ) -> Result<DeviceExpertParallelForward> {
        let c = &self.config;
        let hidden = c.hidden;
        assert!(
            self.experts == exchange.local_experts() && c.n_routed_experts == exchange.n_experts(),
            "the layer holds experts {:?}; the exchange gives this rank {:?} of {}",
            self.experts,
            exchange.local_experts(),
            exchange.n_experts()
        );
        assert!(!x.is_empty(), "an expert-parallel training rank has tokens");
        let routed = route_rows(gpu, c, &self.weights(), x)?;
        let recv = exchange.exchange_counts(&routed.load);
        let plan =
            DevicePlan::new(&routed.load, recv, exchange.size()).map_err(GpuError::Unsupported)?;
        let into = exchange.receive_buffer(gpu, &plan.recv_rows(), hidden)?;
        let mut shared_out = gpu.zeros::<f32>(x.len())?;
        // The rows to send are written; the shared experts need nothing the
        // exchanges bring, so they compute while the rows travel.
        let ready = gpu.stream().record_event(None)?;
        let shared = self.shared_forward(gpu, arithmetic, x, &mut shared_out)?;
        let received = exchange.exchange_rows(
            gpu,
            Some(&routed.permuted),
            plan.send_rows(),
            &plan.recv_rows(),
            hidden,
            Some(Overlapped {
                recv: into,
                ready: &ready,
            }),
        )?;

        // The local experts on the rows they received, one batch each.
        let (local, outputs) = match received {
            Some(received) if plan.received() > 0 => {
                let LocalExperts {
                    batches,
                    mlps,
                    outputs,
                } = local_experts(
                    gpu,
                    self.routed(arithmetic),
                    c,
                    &self.weights(),
                    &plan,
                    &received,
                )?;
                (Some((batches, mlps)), Some(outputs))
            }
            _ => (None, None),
        };
        let combined = exchange
            .exchange_rows(
                gpu,
                outputs.as_ref(),
                &plan.recv_rows(),
                plan.send_rows(),
                hidden,
                None,
            )?
            .ok_or_else(|| {
                GpuError::Unsupported("no expert rows came back for routed tokens".into())
            })?;
        drop(outputs);

        let mut output = gpu.output::<f32>(x.len())?;
        dispatch::unpermute(
            gpu,
            &mut output,
            &combined,
            &routed.routing.gates,
            &routed.dispatch,
            hidden,
        )?;
        if shared.is_some() {
            vector::add(gpu, &mut output, &shared_out)?;
        }
        let balance = if c.aux_loss_alpha > 0.0 {
            Some(BalanceLoss::of(
                gpu,
                c,
                &routed.routing,
                sequences,
                sequence,
            )?)
        } else {
            None
        };
        let load = routed.real_load(gpu, sequences)?;
        Ok(DeviceExpertParallelForward {
            output,
            aux_loss: balance.as_ref().map_or(0.0, |b| b.loss(c.aux_loss_alpha)),
            routed,
            plan,
            local,
            combined,
            shared,
            balance,
            load,
        })
    }

    /// As [`crate::moe::expert_parallel::backward`]: adds d loss / d x into
    /// `dx`, the router's and shared experts' gradients into `grads`, and
    /// this rank's experts' weight gradients, from every rank's rows, into
    /// its share of `grads`. Every rank calls it at the same point.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_expert_parallel<E: Borrow<ExpertParallel>>(
        &self,
        gpu: &Gpu,
        arithmetic: Arithmetic,
        pass: &DeviceExpertParallelForward,
        x: &CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        grads: &mut DeviceMoeGrads,
        exchange: &mut DeviceExchange<E>,
    ) -> Result<()> {
        let c = &self.config;
        let hidden = c.hidden;
        let (routed, plan) = (&pass.routed, &pass.plan);

        // d gate here, where the token lives; d row = gate · dout, sent to
        // the row's owner.
        let (dy, dgates) = combine_backward(gpu, routed, dout, &pass.combined, hidden)?;
        let into = exchange.receive_buffer(gpu, &plan.recv_rows(), hidden)?;
        let ready = gpu.stream().record_event(None)?;
        // The shared experts' backward needs nothing the exchanges bring.
        if let Some(shared) = &pass.shared {
            self.shared_backward(gpu, arithmetic, shared, x, dout, dx, grads)?;
        }
        let dreceived = exchange.exchange_rows(
            gpu,
            Some(&dy),
            plan.send_rows(),
            &plan.recv_rows(),
            hidden,
            Some(Overlapped {
                recv: into,
                ready: &ready,
            }),
        )?;
        drop(dy);

        // The local experts' backward on every rank's rows.
        let dback = match (&pass.local, dreceived) {
            (Some((batches, mlps)), Some(dreceived)) => {
                let dbatches = gather(gpu, &dreceived, &plan.to_batches_order(), hidden)?;
                drop(dreceived);
                let dinput = expert_mlps_backward(
                    gpu,
                    self.routed(arithmetic),
                    c,
                    &self.weights(),
                    grads,
                    &dbatches,
                    batches,
                    mlps,
                    &plan.segments(),
                )?;
                Some(gather(gpu, &dinput, &plan.to_sources_order(), hidden)?)
            }
            _ => None,
        };
        let dx_rows = exchange.exchange_rows(
            gpu,
            dback.as_ref(),
            &plan.recv_rows(),
            plan.send_rows(),
            hidden,
            None,
        )?;
        drop(dback);
        if let Some(dx_rows) = &dx_rows {
            dispatch::permute_backward(gpu, dx, dx_rows, &routed.dispatch, hidden)?;
        }
        self.router_backward(
            gpu,
            &routed.routing,
            pass.balance.as_ref(),
            &dgates,
            x,
            dx,
            grads,
        )
    }
}
