//! The communication side of expert parallelism: a rank's expert-parallel
//! group (the ranks it exchanges tokens with) and its expert-replica group
//! (the ranks holding the same experts, over which their gradients are
//! averaged), the token all-to-all the MoE layer calls
//! ([`crate::moe::expert_parallel`]), and the gradient reduction that treats
//! dense and expert parameters differently.
//!
//! The model's forward and backward passes are plain functions that return
//! values, not `Result`s, and an all-to-all happens inside every MoE layer.
//! Rather than thread a `Result` through every block, an exchange that fails
//! records the error and returns zeros of the expected shape; every later
//! exchange of the pass is skipped, and the caller collects the error with
//! [`ExpertParallel::take_failure`] once the pass is done
//! ([`crate::model::Model::forward_expert_parallel`]). The communicator is
//! aborted by the first failure anyway, so the peers fail fast too.

use std::cell::{Cell, RefCell};
use std::ops::Range;

use super::collective::Collective;
use super::error::DistError;
use super::layout::Layout;
use crate::scalar::Scalar;

/// One rank's expert-parallel groups and its slice of the routed experts.
pub struct ExpertParallel {
    /// The ranks that own the other experts, numbered by expert slice:
    /// group rank `q` owns experts `q·per..(q+1)·per`.
    group: RefCell<Box<dyn Collective>>,
    /// The ranks holding the same experts (one per expert-parallel group).
    replicas: RefCell<Box<dyn Collective>>,
    n_experts: usize,
    failure: RefCell<Option<DistError>>,
    /// Payload bytes this rank sent to other ranks in token exchanges.
    bytes_sent: Cell<u64>,
    /// Payload bytes of this rank's rows in [`Self::all_gather_rows`],
    /// counted once per other rank.
    bytes_gathered: Cell<u64>,
}

impl ExpertParallel {
    /// `group` numbers the ranks by the expert slice they own (as
    /// [`super::layout::make_groups`] builds it); `n_experts` routed experts
    /// per MoE layer must split evenly over it.
    pub fn new(
        group: Box<dyn Collective>,
        replicas: Box<dyn Collective>,
        n_experts: usize,
    ) -> Result<Self, DistError> {
        let size = group.size();
        if size == 0 || !n_experts.is_multiple_of(size) {
            return Err(DistError::invalid(
                "expert_parallel",
                format!(
                    "{n_experts} routed experts do not split over {size} expert-parallel ranks"
                ),
            ));
        }
        Ok(Self {
            group: RefCell::new(group),
            replicas: RefCell::new(replicas),
            n_experts,
            failure: RefCell::new(None),
            bytes_sent: Cell::new(0),
            bytes_gathered: Cell::new(0),
        })
    }

    /// This rank's groups in `world` for `layout` (sequence parallel 1).
    pub fn from_world(
        world: &dyn Collective,
        layout: &Layout,
        n_experts: usize,
    ) -> Result<Self, DistError> {
        let groups = super::layout::make_groups(world, layout)?;
        Self::new(groups.expert, groups.expert_replicas, n_experts)
    }

    /// Ranks in the expert-parallel group.
    pub fn size(&self) -> usize {
        self.group.borrow().size()
    }

    /// This rank's position in the expert-parallel group.
    pub fn rank(&self) -> usize {
        self.group.borrow().rank()
    }

    pub fn n_experts(&self) -> usize {
        self.n_experts
    }

    /// Experts each rank of the group owns.
    pub fn experts_per_rank(&self) -> usize {
        self.n_experts / self.size()
    }

    /// The routed experts this rank owns (of every MoE layer).
    pub fn local_experts(&self) -> Range<usize> {
        let per = self.experts_per_rank();
        let q = self.rank();
        q * per..(q + 1) * per
    }

    /// Payload bytes sent to other ranks by token exchanges so far.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.get()
    }

    /// Payload bytes of this rank's rows gathered by the other ranks so far
    /// ([`Self::all_gather_rows`]: its rows, once per other rank).
    pub fn bytes_gathered(&self) -> u64 {
        self.bytes_gathered.get()
    }

    /// The first exchange failure since the last call, if any.
    pub fn take_failure(&self) -> Result<(), DistError> {
        match self.failure.borrow_mut().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Runs `f` on the expert-parallel group (for reductions outside the layer).
    pub fn with_group<R>(&self, f: impl FnOnce(&mut dyn Collective) -> R) -> R {
        f(self.group.borrow_mut().as_mut())
    }

    /// Runs `f` on the expert-replica group.
    pub fn with_replicas<R>(&self, f: impl FnOnce(&mut dyn Collective) -> R) -> R {
        f(self.replicas.borrow_mut().as_mut())
    }

    /// Keeps the first failure: later exchanges of the step are skipped and
    /// [`Self::take_failure`] reports it (also for exchanges made on the
    /// device, `cuda::serve_ep`).
    pub(crate) fn record(&self, error: DistError) {
        let mut failure = self.failure.borrow_mut();
        if failure.is_none() {
            *failure = Some(error);
        }
    }

    pub(crate) fn failed(&self) -> bool {
        self.failure.borrow().is_some()
    }

    /// Counts the payload an exchange of `send_rows[q]` rows of `width` to
    /// each rank `q` sends to the others (nothing once failed: the
    /// exchanges after a failure move nothing).
    pub(crate) fn count_sent(&self, send_rows: &[usize], width: usize) {
        if self.failed() {
            return;
        }
        let own = self.rank();
        let sent: usize = send_rows
            .iter()
            .enumerate()
            .filter(|&(q, _)| q != own)
            .map(|(_, &r)| r)
            .sum();
        self.bytes_sent
            .set(self.bytes_sent.get() + (sent * width * size_of::<f32>()) as u64);
    }

    /// Counts `values` of this rank gathered by every other rank.
    pub(crate) fn count_gathered(&self, values: usize) {
        if self.failed() {
            return;
        }
        let others = self.size().saturating_sub(1);
        self.bytes_gathered
            .set(self.bytes_gathered.get() + (values * others * size_of::<f32>()) as u64);
    }

    /// Tells every rank how many rows each peer will send it per expert
    /// slot (its experts, or with serving's replicas more slots per rank):
    /// `send[q·per + j]` rows go to rank `q` for its slot `j`; returns
    /// `recv[s·per + j]`, the rows rank `s` sends for this rank's slot `j`.
    /// All zeros after a failure.
    pub fn exchange_counts(&self, send: &[usize]) -> Vec<usize> {
        let size = self.size();
        assert!(send.len().is_multiple_of(size), "the same slots per rank");
        let per = send.len() / size;
        let mut recv = vec![0u8; send.len() * 8];
        if !self.failed() {
            let bytes: Vec<u8> = send
                .iter()
                .flat_map(|&c| (c as u64).to_le_bytes())
                .collect();
            let counts = vec![per * 8; size];
            let result = self
                .group
                .borrow_mut()
                .all_to_all_bytes(&bytes, &counts, &mut recv, &counts);
            if let Err(e) = result {
                self.record(e);
                recv.fill(0);
            }
        }
        recv.chunks_exact(8)
            .map(|b| {
                let mut word = [0u8; 8];
                word.copy_from_slice(b);
                u64::from_le_bytes(word) as usize
            })
            .collect()
    }

    /// Sends `send_rows[q]` rows of `width` values to rank `q` (consecutive
    /// in `send`) and returns the `recv_rows[s]` rows from each rank `s`, in
    /// rank order. Zeros of that shape after a failure.
    pub fn exchange_rows<T: Scalar>(
        &self,
        send: &[T],
        send_rows: &[usize],
        recv_rows: &[usize],
        width: usize,
    ) -> Vec<T> {
        let total: usize = recv_rows.iter().sum();
        if self.failed() {
            return vec![T::ZERO; total * width];
        }
        self.count_sent(send_rows, width);
        // The wire carries f32; training runs in f32, so this is exact there.
        let send: Vec<f32> = send.iter().map(|v| v.to_f64() as f32).collect();
        let mut recv = vec![0f32; total * width];
        let elements = |rows: &[usize]| rows.iter().map(|r| r * width).collect::<Vec<_>>();
        let result = self.group.borrow_mut().all_to_all(
            &send,
            &elements(send_rows),
            &mut recv,
            &elements(recv_rows),
        );
        match result {
            Ok(()) => recv
                .into_iter()
                .map(|v| T::from_f64(f64::from(v)))
                .collect(),
            Err(e) => {
                self.record(e);
                vec![T::ZERO; total * width]
            }
        }
    }
}

impl ExpertParallel {
    /// Every rank's `rows` (rank `q` contributes `counts[q]` rows of
    /// `width` values), concatenated in rank order on every rank: how
    /// expert-parallel serving gives each rank the whole batch again after
    /// a layer whose rows it split (`serve/expert_parallel.rs`). Recorded
    /// like the exchanges: zeros of that shape after a failure.
    pub fn all_gather_rows(&self, rows: &[f32], counts: &[usize], width: usize) -> Vec<f32> {
        let total: usize = counts.iter().sum();
        if self.failed() {
            return vec![0.0; total * width];
        }
        self.count_gathered(rows.len());
        let elements: Vec<usize> = counts.iter().map(|r| r * width).collect();
        let mut out = vec![0.0; total * width];
        let result = self
            .group
            .borrow_mut()
            .all_gather(rows, &elements, &mut out);
        if let Err(e) = result {
            self.record(e);
            out.fill(0.0);
        }
        out
    }
}

/// Whether a tensor (by canonical name) is a routed-expert tensor, sharded
/// by expert-parallel rank; everything else is replicated on every rank.
pub fn is_expert_tensor(name: &str) -> bool {
    ["experts_w1", "experts_w3", "experts_w2"]
        .iter()
        .any(|t| name.ends_with(&format!("moe.{t}")))
}

/// The mean gradient over the whole world's data, each parameter reduced
/// over the ranks holding it: `replicated` (dense, router, shared experts)
/// averaged over `world`; `experts` (this rank's slices of the routed-expert
/// tensors) summed over the expert replicas and divided by the world size,
/// because each slice already sums the contributions of every rank of its
/// expert-parallel group (their tokens were computed here).
pub fn reduce_gradients(
    world: &mut dyn Collective,
    experts: &ExpertParallel,
    replicated: &mut [&mut [f32]],
    expert_slices: &mut [&mut [f32]],
    bucket_floats: usize,
) -> Result<(), DistError> {
    let world_size = world.size();
    super::data_parallel::all_reduce_scaled(world, replicated, bucket_floats, world_size)?;
    experts.with_replicas(|replicas| {
        super::data_parallel::all_reduce_scaled(replicas, expert_slices, bucket_floats, world_size)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_tensors_are_told_by_name() {
        assert!(is_expert_tensor("blocks.1.moe.experts_w1"));
        assert!(is_expert_tensor("blocks.0.moe.experts_w2"));
        assert!(!is_expert_tensor("blocks.0.moe.shared_w1"));
        assert!(!is_expert_tensor("blocks.0.moe.router"));
        assert!(!is_expert_tensor("blocks.0.dense.w1"));
    }
}
