//! The serving MoE layer on the GPU with its routed experts split over the
//! ranks of a replica: the device form of `serve/expert_parallel.rs`, with
//! the same contract, so a GPU rank and a CPU rank exchange the same rows
//! and every rank's cache and logits agree with one process's:
//!
//! ```text
//!  rows 0..n on every rank ─▶ rank q takes its slice (n/P rows, balanced)
//!    ─▶ router, top-k, dispatch, permute (device) ─▶ per-expert counts (host)
//!    ─▶ rows to their experts' ranks (exchange)  ┐ shared experts on the slice
//!                                                 ┘ (device, meanwhile)
//!    ─▶ gather into one batch per local expert ─▶ SwiGLU (cuBLASLt) ─▶ gather
//!       back to source order ─▶ rows back (exchange) ─▶ unpermute · gates
//!    ─▶ + the shared experts' output ─▶ all-gather ─▶ rows 0..n on every rank
//! ```
//!
//! Over NCCL the exchange runs on the communicator's stream, which waits
//! for an event recorded once the rows to send are written: the shared
//! experts, enqueued right after that event on the engine's stream, compute
//! while the rows travel (the overlap DeepSeek-V3's serving uses between its
//! dispatch and its shared expert).
//!
//! The pure decisions (the row split, counts per rank, the regrouping
//! orders) are `crate::serve::exchange_order`, tested on the CPU. The
//! exchanges go through [`DeviceExchange`]: device to device over an NCCL
//! group, through host memory over any other [`crate::dist::Collective`]
//! (TCP), which is also what lets two ranks share one GPU in a test (NCCL
//! refuses two ranks of a communicator on one device).
//!
//! A failed exchange is recorded (as on the CPU) and leaves zeros of the
//! expected shape; `DeviceEngine::step` collects it after the step. A CUDA
//! error returns at once: it is fatal for the replica.

use std::borrow::Borrow;
use std::ops::Range;

use super::matmul::Arithmetic::{self, Tf32};
use super::moe_layer::{ExpertMlps, RoutedWeights, expert_mlps, route_rows};
use super::serve::DeviceMoe;
use super::{Gpu, GpuError, Result, dispatch, int, vector};
use crate::dist::expert_parallel::ExpertParallel;
use crate::dist::{Collective, DistError};
use crate::moe::config::MoeConfig;
use crate::serve::exchange_order::{DevicePlan, row_split};
use moe_kernels::cudarc::driver::{CudaEvent, CudaSlice, CudaView, CudaViewMut};

/// How a rank's device rows reach the other ranks of its replica: over
/// the replica's [`ExpertParallel`] (which records the first failure and
/// counts the bytes, as for the CPU engine), device to device when its
/// group is an NCCL communicator, else through host memory (download,
/// exchange, upload: two PCIe copies and a stream synchronisation per
/// exchange; correct over any backend). Every rank must make the same
/// calls in the same order. Rows are `Option`s: `None` is zero rows (the
/// device allocates no empty buffer).
///
/// `E` holds the group: owned by a serving engine, borrowed (`&ExpertParallel`)
/// by a training step from the run that also checkpoints with it.
pub struct DeviceExchange<E: Borrow<ExpertParallel> = ExpertParallel> {
    ep: E,
    /// The group is an NCCL communicator: rows move device to device.
    nccl: bool,
}

impl<E: Borrow<ExpertParallel>> DeviceExchange<E> {
    /// The exchange over `ep`'s group, device to device over NCCL.
    pub fn new(ep: E) -> Self {
        let nccl = ep.borrow().with_group(|g| g.as_nccl().is_some());
        Self { ep, nccl }
    }

    fn ep(&self) -> &ExpertParallel {
        self.ep.borrow()
    }

    /// This rank in the group, which numbers ranks by expert slice.
    pub fn rank(&self) -> usize {
        self.ep().rank()
    }

    pub fn size(&self) -> usize {
        self.ep().size()
    }

    /// Routed experts per MoE layer, over the whole group.
    pub fn n_experts(&self) -> usize {
        self.ep().n_experts()
    }

    /// The routed experts this rank holds (of every MoE layer).
    pub fn local_experts(&self) -> Range<usize> {
        self.ep().local_experts()
    }

    /// `send[q·per + j]` rows go to rank `q` for its local expert `j`;
    /// returns `recv[s·per + j]`, what rank `s` sends for this rank's
    /// expert `j` (zeros after a failure). A few integers: through the
    /// group's host path whatever it is.
    pub fn exchange_counts(&mut self, send: &[usize]) -> Vec<usize> {
        self.ep().exchange_counts(send)
    }

    /// A zeroed buffer for `recv_rows` rows of `width` (`None` for none), to
    /// make before recording the event of an [`Overlapped`] exchange.
    pub fn receive_buffer(
        &self,
        gpu: &Gpu,
        recv_rows: &[usize],
        width: usize,
    ) -> Result<Option<CudaSlice<f32>>> {
        let total = recv_rows.iter().sum::<usize>() * width;
        Ok(if total > 0 {
            Some(gpu.zeros::<f32>(total)?)
        } else {
            None
        })
    }

    /// Sends `send_rows[q]` rows of `width` (consecutive in `send`) to rank
    /// `q`; returns the `recv_rows[s]` rows of each rank `s`, in rank order.
    /// `overlapped`: the device's later work (the shared experts) runs while
    /// the rows travel over NCCL; `None` waits for everything enqueued so far.
    pub fn exchange_rows(
        &mut self,
        gpu: &Gpu,
        send: Option<&CudaSlice<f32>>,
        send_rows: &[usize],
        recv_rows: &[usize],
        width: usize,
        overlapped: Option<Overlapped<'_>>,
    ) -> Result<Option<CudaSlice<f32>>> {
        if !self.nccl {
            let host = download_rows(gpu, send)?;
            return upload_rows(
                gpu,
                &self.ep().exchange_rows(&host, send_rows, recv_rows, width),
            );
        }
        self.ep().count_sent(send_rows, width);
        self.all_to_all(gpu, send, send_rows, recv_rows, width, overlapped)
    }

    /// Every rank's `rows` (`counts[q]` from rank `q`), in rank order, on
    /// every rank. Over NCCL: an all-to-all of this rank's rows to every rank.
    pub fn all_gather_rows(
        &mut self,
        gpu: &Gpu,
        rows: Option<&CudaSlice<f32>>,
        counts: &[usize],
        width: usize,
    ) -> Result<Option<CudaSlice<f32>>> {
        if !self.nccl {
            let host = download_rows(gpu, rows)?;
            return upload_rows(gpu, &self.ep().all_gather_rows(&host, counts, width));
        }
        let size = self.ep().size();
        let mine = counts[self.ep().rank()];
        self.ep().count_gathered(mine * width);
        // This rank's rows once per rank, so each receives them.
        let copies = match rows {
            Some(rows) if mine > 0 => {
                let n = mine * width;
                let mut copies = gpu.output::<f32>(n * size)?;
                for q in 0..size {
                    let mut segment = copies.slice_mut(q * n..(q + 1) * n);
                    gpu.stream().memcpy_dtod(&rows.slice(..n), &mut segment)?;
                }
                Some(copies)
            }
            _ => None,
        };
        self.all_to_all(gpu, copies.as_ref(), &vec![mine; size], counts, width, None)
    }

    /// The first exchange failure since the last call, if any.
    pub fn take_failure(&mut self) -> std::result::Result<(), DistError> {
        self.ep().take_failure()
    }

    /// Payload bytes sent so far: token exchanges, and rows all-gathered.
    pub fn bytes(&self) -> (u64, u64) {
        (self.ep().bytes_sent(), self.ep().bytes_gathered())
    }

    /// `send` (`send_rows[q]` rows of `width` for rank `q`, consecutive) to
    /// the other ranks over NCCL, device to device; the `recv_rows[s]` rows
    /// of each rank `s`, in rank order, once the overlapped exchange's event
    /// (else everything the device was given so far) is done. Zeros of that
    /// shape after a failure, recorded.
    fn all_to_all(
        &mut self,
        gpu: &Gpu,
        send: Option<&CudaSlice<f32>>,
        send_rows: &[usize],
        recv_rows: &[usize],
        width: usize,
        overlapped: Option<Overlapped<'_>>,
    ) -> Result<Option<CudaSlice<f32>>> {
        // NCCL runs on its own stream, which waits for the rows it sends to
        // be written, and no longer: what the device does after them runs
        // alongside the exchange. So the buffer NCCL writes must exist (and
        // be zeroed) before that point: a stream-ordered allocation made
        // after it could reuse memory that later work, freed since, still
        // reads.
        let now;
        let (mut recv, ready) = match overlapped {
            Some(Overlapped { recv, ready }) => (recv, ready),
            None => {
                let recv = self.receive_buffer(gpu, recv_rows, width)?;
                now = gpu.stream().record_event(None)?;
                (recv, &now)
            }
        };
        let total: usize = recv_rows.iter().sum::<usize>() * width;
        assert_eq!(
            recv.as_ref().map_or(0, |r| r.len()),
            total,
            "the receive buffer fits the rows to receive"
        );
        if self.ep().failed() {
            return Ok(recv);
        }
        // A side with no rows still needs a buffer to take an empty view of
        // (its counts are all zero).
        let (spare_in, mut spare_out);
        let send = match send {
            Some(rows) => rows.slice(..),
            None => {
                spare_in = gpu.zeros::<f32>(1)?;
                spare_in.slice(0..0)
            }
        };
        let elements = |rows: &[usize]| rows.iter().map(|r| r * width).collect::<Vec<_>>();
        let (send_counts, recv_counts) = (elements(send_rows), elements(recv_rows));
        let result = {
            let mut into = match recv.as_mut() {
                Some(out) => out.slice_mut(..),
                None => {
                    spare_out = gpu.zeros::<f32>(1)?;
                    spare_out.slice_mut(0..0)
                }
            };
            self.ep().with_group(|group| {
                nccl_all_to_all(
                    group,
                    "expert exchange",
                    ready,
                    &send,
                    &send_counts,
                    &mut into,
                    &recv_counts,
                )
            })
        };
        if let Err(e) = result {
            self.ep().record(e);
            if let Some(out) = recv.as_mut() {
                gpu.stream().memset_zeros(out)?;
            }
        }
        Ok(recv)
    }
}

/// An exchange whose rows travel while the device goes on with later work:
/// `ready` was recorded once the rows to send were written, and `recv`
/// (from [`DeviceExchange::receive_buffer`]) was made before it.
pub struct Overlapped<'e> {
    pub recv: Option<CudaSlice<f32>>,
    pub ready: &'e CudaEvent,
}

/// An all-to-all of device buffers over `group`, which must be an NCCL
/// communicator: its stream waits for `ready` (the rows to send written),
/// and no longer, so what the device does after that runs alongside. The
/// buffers' counts are in elements; `recv` must exist before `ready` was
/// recorded (see [`Overlapped`]).
pub(super) fn nccl_all_to_all(
    group: &mut dyn Collective,
    op: &'static str,
    ready: &CudaEvent,
    send: &CudaView<'_, f32>,
    send_counts: &[usize],
    recv: &mut CudaViewMut<'_, f32>,
    recv_counts: &[usize],
) -> std::result::Result<(), DistError> {
    let Some(nccl) = group.as_nccl() else {
        return Err(DistError::invalid(
            op,
            "the group is not an NCCL communicator",
        ));
    };
    nccl.stream()
        .wait(ready)
        .map_err(|e| DistError::invalid(op, format!("CUDA driver: {e}")))?;
    nccl.all_to_all_device(send, send_counts, recv, recv_counts)
}

fn download_rows(gpu: &Gpu, rows: Option<&CudaSlice<f32>>) -> Result<Vec<f32>> {
    rows.map_or_else(|| Ok(Vec::new()), |rows| gpu.download(rows))
}

fn upload_rows(gpu: &Gpu, rows: &[f32]) -> Result<Option<CudaSlice<f32>>> {
    if rows.is_empty() {
        return Ok(None);
    }
    gpu.upload(rows).map(Some)
}

/// The local experts' pass over the rows received from every rank.
pub(super) struct LocalExperts {
    /// One batch per local expert (expert-major), the MLPs' input.
    pub batches: CudaSlice<f32>,
    pub mlps: ExpertMlps,
    /// The outputs, in the order the rows were received (to send back).
    pub outputs: CudaSlice<f32>,
}

/// Each local expert's SwiGLU MLP on its rows of `received` (source-major,
/// as `plan` says; at least one row): regrouped into one batch per expert
/// by a gather, computed in `arithmetic`, and gathered back.
pub(super) fn local_experts(
    gpu: &Gpu,
    arithmetic: Arithmetic,
    config: &MoeConfig,
    weights: &RoutedWeights<'_>,
    plan: &DevicePlan,
    received: &CudaSlice<f32>,
) -> Result<LocalExperts> {
    let hidden = config.hidden;
    let batches = gather(gpu, received, &plan.to_batches_order(), hidden)?;
    let mlps = expert_mlps(gpu, arithmetic, config, weights, &batches, &plan.segments())?;
    let outputs = gather(gpu, &mlps.out, &plan.to_sources_order(), hidden)?;
    Ok(LocalExperts {
        batches,
        mlps,
        outputs,
    })
}

/// `out[o] = x[order[o]]` for rows of `width`, into a new buffer (`x` holds
/// at least one row: `order` is a permutation of its rows).
pub(super) fn gather(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    order: &[usize],
    width: usize,
) -> Result<CudaSlice<f32>> {
    let order: Vec<i32> = order.iter().map(|&i| int(i)).collect();
    let order = gpu.upload(&order)?;
    let mut out = gpu.output::<f32>(order.len() * width)?;
    vector::gather_rows(gpu, &mut out, x, &order, width)?;
    Ok(out)
}

/// The layer's output for `x: [rows, hidden]` (the same rows on every rank
/// of `exchange`, which must all call it at the same point; `moe` holds
/// this rank's experts), on every rank.
pub(super) fn forward(
    gpu: &Gpu,
    moe: &DeviceMoe,
    x: &CudaSlice<f32>,
    exchange: &mut DeviceExchange,
) -> Result<CudaSlice<f32>> {
    let config = moe.config();
    let hidden = config.hidden;
    let rows = x.len() / hidden;
    let (counts, mine) = row_split(rows, exchange.size(), exchange.rank());
    // This rank's slice, routed and sorted by expert (none: it routes
    // nothing, but still takes part in every exchange).
    let local = if mine.is_empty() {
        None
    } else {
        let slice = x.slice(mine.start * hidden..mine.end * hidden);
        Some(gpu.stream().clone_dtod(&slice)?)
    };
    let routed = match &local {
        Some(local) => Some(route_rows(gpu, config, &moe.weights(), local)?),
        None => None,
    };
    let load = routed
        .as_ref()
        .map_or_else(|| vec![0; config.n_routed_experts], |r| r.load.clone());
    let recv = exchange.exchange_counts(&load);
    let plan = DevicePlan::new(&load, recv, exchange.size()).map_err(GpuError::Unsupported)?;
    let into = exchange.receive_buffer(gpu, &plan.recv_rows(), hidden)?;
    // The rows to send are written; the shared experts on this slice need
    // nothing the exchanges bring, so they are enqueued now and computed
    // while the rows travel (over NCCL, on its own stream).
    let ready = gpu.stream().record_event(None)?;
    let shared = match &local {
        Some(local) if moe.has_shared() => {
            let mut shared = gpu.zeros::<f32>(local.len())?;
            moe.add_shared(gpu, local, &mut shared)?;
            Some(shared)
        }
        _ => None,
    };
    let received = exchange.exchange_rows(
        gpu,
        routed.as_ref().map(|r| &r.permuted),
        plan.send_rows(),
        &plan.recv_rows(),
        hidden,
        Some(Overlapped {
            recv: into,
            ready: &ready,
        }),
    )?;

    // The local experts on the rows they received, one batch each.
    let outputs = match &received {
        Some(received) if plan.received() > 0 => {
            let first = exchange.local_experts().start;
            for (j, _, n) in plan.segments() {
                moe.count_rows(first + j, n);
            }
            Some(local_experts(gpu, Tf32, config, &moe.weights(), &plan, received)?.outputs)
        }
        _ => None,
    };
    drop(received);
    let returned = exchange.exchange_rows(
        gpu,
        outputs.as_ref(),
        &plan.recv_rows(),
        plan.send_rows(),
        hidden,
        None,
    )?;
    drop(outputs);

    // Back in this rank's dispatch order: gated into its tokens, then the
    // shared experts' outputs on its slice added.
    let output = match (&local, &routed) {
        (Some(local), Some(routed)) => {
            let mut out = gpu.zeros::<f32>(local.len())?;
            if let Some(returned) = &returned {
                dispatch::unpermute(
                    gpu,
                    &mut out,
                    returned,
                    &routed.routing.gates,
                    &routed.dispatch,
                    hidden,
                )?;
            }
            if let Some(shared) = &shared {
                vector::add(gpu, &mut out, shared)?;
            }
            Some(out)
        }
        _ => None,
    };
    exchange
        .all_gather_rows(gpu, output.as_ref(), &counts, hidden)?
        .ok_or_else(|| {
            GpuError::Unsupported("an expert-parallel MoE layer over no rows".to_string())
        })
}
