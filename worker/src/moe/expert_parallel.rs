//! The MoE layer with its routed experts split over an expert-parallel
//! group ([`ExpertParallel`]): rank `q` of the group owns experts
//! `q·per..(q+1)·per`, and its layer need hold no others
//! ([`MoeParams::experts`]); the router, the shared experts and everything
//! outside the layer are replicated.
//!
//! ```text
//! forward:  route own tokens ─▶ rows sorted by expert (Dispatch) ─▶ all-to-all (uneven) ─▶
//!           per owned expert: rows from rank 0, 1, … as one batch ─▶ SwiGLU ─▶
//!           reverse all-to-all ─▶ gate · row scatter-added at its token
//! backward: d row = gate · dout ─▶ all-to-all ─▶ expert backward (weight grads here) ─▶
//!           reverse all-to-all of d input ─▶ scatter-added at its token
//! ```
//!
//! Routing, the gates' and the router's gradients stay with the rank that
//! owns the token; only expert rows travel. Each owned expert runs the same
//! single-rank compute ([`MoeLayer::expert`]) on the rows it received, so
//! whatever makes that fast makes this fast. Rows are added into a token's
//! output in the same expert order as on one rank, so the forward pass of
//! one rank and of many agree to the bit when each row's GEMM does; the
//! weight gradients sum the same rows in a different grouping (rounding).

use crate::dist::expert_parallel::ExpertParallel;
use crate::dist::sequence_parallel::SequenceParallel;
use crate::linear::Linears;
use crate::memory::HeldBytes;
use crate::moe::balance::SlicedBalanceLoss;
use crate::moe::dispatch::Dispatch;
use crate::moe::expert::SwiGluActivations;
use crate::moe::layer::MoeLayer;
use crate::moe::params::MoeParams;
use crate::moe::routing::{self, Routing};
use crate::moe::sequences::Sequences;
use crate::ops::matmul;
use crate::scalar::Scalar;

/// Who sends how many rows to whom in one layer's exchanges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExchangePlan {
    /// Experts per rank.
    per: usize,
    /// Rows this rank sends to each rank of the group (its dispatch, split
    /// at the owners' expert boundaries).
    send_rows: Vec<usize>,
    /// `recv[s·per + j]`: rows rank `s` sends for this rank's expert `j`.
    recv: Vec<usize>,
}

impl ExchangePlan {
    /// From this rank's per-expert load and what the peers said they send.
    pub fn new(load: &[usize], recv: Vec<usize>, size: usize) -> Self {
        let per = load.len() / size;
        assert_eq!(per * size, load.len(), "experts split evenly");
        assert_eq!(
            recv.len(),
            load.len(),
            "a count per source and local expert"
        );
        let send_rows = load.chunks_exact(per).map(|c| c.iter().sum()).collect();
        Self {
            per,
            send_rows,
            recv,
        }
    }

    /// Rows this rank sends to each rank.
    pub fn send_rows(&self) -> &[usize] {
        &self.send_rows
    }

    /// Rows this rank receives from each rank.
    pub fn recv_rows(&self) -> Vec<usize> {
        self.recv
            .chunks_exact(self.per)
            .map(|c| c.iter().sum())
            .collect()
    }

    /// Experts per rank.
    pub fn per(&self) -> usize {
        self.per
    }

    /// `recv[s·per + j]`: rows rank `s` sends for this rank's expert `j`.
    pub fn recv(&self) -> &[usize] {
        &self.recv
    }

    /// Rows of each local expert's batch (from every source).
    pub fn batch_rows(&self) -> Vec<usize> {
        (0..self.per)
            .map(|j| self.recv.iter().skip(j).step_by(self.per).sum())
            .collect()
    }

    /// Received rows (source-major: rank 0's rows of expert 0, 1, …, then
    /// rank 1's) regrouped into one batch per local expert (expert-major:
    /// expert 0's rows from rank 0, 1, …).
    pub fn to_batches<T: Copy>(&self, rows: &[T], width: usize) -> Vec<Vec<T>> {
        let mut batches: Vec<Vec<T>> = self
            .batch_rows()
            .iter()
            .map(|&r| Vec::with_capacity(r * width))
            .collect();
        let mut at = 0;
        for source in self.recv.chunks_exact(self.per) {
            for (batch, &n) in batches.iter_mut().zip(source) {
                batch.extend_from_slice(&rows[at..at + n * width]);
                at += n * width;
            }
        }
        assert_eq!(at, rows.len(), "received rows match the plan");
        batches
    }

    /// The inverse of [`Self::to_batches`]: each batch's rows back to the
    /// rank they came from, in the order it sent them.
    pub fn to_sources<T: Copy>(&self, batches: &[Vec<T>], width: usize) -> Vec<T> {
        let mut rows = Vec::with_capacity(self.recv.iter().sum::<usize>() * width);
        let mut taken = vec![0; self.per];
        for source in self.recv.chunks_exact(self.per) {
            for ((batch, at), &n) in batches.iter().zip(&mut taken).zip(source) {
                rows.extend_from_slice(&batch[*at..*at + n * width]);
                *at += n * width;
            }
        }
        rows
    }
}

/// One owned expert's batch: its input rows and activations.
#[derive(Clone, Debug)]
struct LocalExpert<T> {
    input: Vec<T>,
    activations: SwiGluActivations<T>,
}

/// The expert-parallel forward pass and everything its backward needs.
#[derive(Clone, Debug)]
pub struct ExpertParallelForward<T> {
    /// `[tokens, hidden]`, this rank's tokens.
    pub output: Vec<T>,
    pub routing: Routing<T>,
    pub dispatch: Dispatch,
    /// As [`crate::moe::MoeForward::aux_loss`].
    pub aux_loss: T,
    /// As in [`crate::moe::MoeForward`]: the sequences and their padding.
    sequences: Sequences,
    /// As in [`crate::moe::MoeForward`]: the whole sequences' balance
    /// statistics under sequence parallelism.
    sliced_balance: Option<SlicedBalanceLoss>,
    plan: ExchangePlan,
    /// The expert outputs for this rank's assignments, in dispatch order
    /// (by expert, then token), as they came back.
    combined: Vec<T>,
    /// The owned experts' batches, in expert order.
    local: Vec<LocalExpert<T>>,
    shared: Option<SwiGluActivations<T>>,
}

impl<T> ExpertParallelForward<T> {
    /// Real tokens this rank routed to each expert (every expert, not just
    /// its own; padding is computed, but not counted).
    pub fn expert_load(&self) -> Vec<usize> {
        if self.sequences.is_padded() {
            let r = &self.routing;
            self.sequences.real_load(&r.experts, r.top_k, r.n_experts)
        } else {
            self.dispatch.load()
        }
    }
}

impl<T> HeldBytes for ExpertParallelForward<T> {
    fn held_bytes(&self) -> usize {
        let local: usize = self
            .local
            .iter()
            .map(|e| e.input.held_bytes() + e.activations.held_bytes())
            .sum();
        self.output.held_bytes()
            + self.routing.held_bytes()
            + self.dispatch.held_bytes()
            + self.combined.held_bytes()
            + local
            + self.local.held_bytes()
            + self.shared.held_bytes()
            + self.sliced_balance.held_bytes()
    }
}

/// Flat routing indices in dispatch order: expert 0's by token, then expert 1's, …
pub(crate) fn dispatch_order(
    dispatch: &Dispatch,
    n_experts: usize,
) -> impl Iterator<Item = usize> + '_ {
    (0..n_experts).flat_map(move |e| dispatch.slots(e).iter().copied())
}

/// [`MoeLayer::forward_with`] with the routed experts spread over `ep`.
/// Every rank of the group must call it at the same point, each with its
/// own tokens (any number, zero included).
pub fn forward<T: Scalar>(
    layer: &MoeLayer<T>,
    ep: &ExpertParallel,
    linears: Linears<'_>,
    x: &[T],
    seq_len: usize,
) -> ExpertParallelForward<T> {
    let sequences = Sequences::whole(x.len() / layer.config().hidden, seq_len);
    forward_in(layer, ep, linears, x, &sequences, None)
}

/// [`forward`] on `sequences` (padding left out of the loads and the
/// balance loss), which, with `sequence`, are this rank's slices. Routing happens here, on this
/// rank's tokens, before any row is dispatched, so the balance loss's
/// statistics are this rank's slices' and `sequence`'s group (not the
/// expert-parallel one) sums them ([`MoeLayer::aux_loss_in`]).
pub(crate) fn forward_in<T: Scalar>(
    layer: &MoeLayer<T>,
    ep: &ExpertParallel,
    linears: Linears<'_>,
    x: &[T],
    sequences: &Sequences,
    sequence: Option<&SequenceParallel>,
) -> ExpertParallelForward<T> {
    let config = layer.config();
    let (hidden, n_experts) = (config.hidden, config.n_routed_experts);
    assert_eq!(
        n_experts,
        ep.n_experts(),
        "expert-parallel group built for this model"
    );
    assert_eq!(x.len() % hidden, 0, "MoE input is not [tokens, hidden]");
    assert!(
        layer.params.holds(&ep.local_experts()),
        "this rank's layer holds experts {:?}, not its own {:?}",
        layer.params.experts,
        ep.local_experts()
    );
    let tokens = x.len() / hidden;
    assert_eq!(
        tokens,
        sequences.tokens(),
        "MoE input is not whole sequences of seq_len tokens"
    );

    let mut logits = vec![T::ZERO; tokens * n_experts];
    matmul::forward(&mut logits, x, &layer.params.router, hidden, n_experts);
    let routing = routing::route(config, &logits, &layer.selection_bias);
    let dispatch = Dispatch::new(&routing.experts, config.top_k, n_experts);

    // Dispatch: rows by expert, so each owner's rows are one contiguous run.
    let load = dispatch.load();
    let plan = ExchangePlan::new(&load, ep.exchange_counts(&load), ep.size());
    let send = dispatch.gather_rows(x, dispatch_order(&dispatch, n_experts), hidden);
    let received = ep.exchange_rows(&send, plan.send_rows(), &plan.recv_rows(), hidden);
    drop(send);

    let mut outputs = Vec::with_capacity(ep.experts_per_rank());
    let mut local = Vec::with_capacity(ep.experts_per_rank());
    for (e, input) in ep.local_experts().zip(plan.to_batches(&received, hidden)) {
        let mut out = vec![T::ZERO; input.len()];
        let activations = layer.expert(linears, e).forward(&mut out, &input);
        outputs.push(out);
        local.push(LocalExpert { input, activations });
    }

    // Combine: the reverse exchange brings back one output row per row sent.
    let back = plan.to_sources(&outputs, hidden);
    let combined = ep.exchange_rows(&back, &plan.recv_rows(), plan.send_rows(), hidden);
    let mut output = vec![T::ZERO; x.len()];
    let rows = dispatch_order(&dispatch, n_experts).zip(combined.chunks_exact(hidden));
    dispatch.add_rows(&mut output, rows, Some(&routing.gates));

    let shared = layer.shared_forward(linears, x, &mut output);
    let (aux_loss, sliced_balance) = layer.aux_loss_in(&routing, sequences, sequence);
    ExpertParallelForward {
        output,
        routing,
        dispatch,
        aux_loss,
        sequences: sequences.clone(),
        sliced_balance,
        plan,
        combined,
        local,
        shared,
    }
}

/// [`MoeLayer::backward_with`] for a pass of [`forward`]: adds d loss / d x
/// into `dx`, the gradients of the replicated weights into `grads`, and the
/// owned experts' weight gradients (from every rank's tokens) into their
/// slices of `grads` (which, like the layer, may hold only those); any
/// other experts' slices are left alone.
#[allow(clippy::too_many_arguments)] // MoeLayer::backward_with's, plus the group
pub fn backward<T: Scalar>(
    layer: &MoeLayer<T>,
    ep: &ExpertParallel,
    linears: Linears<'_>,
    pass: &ExpertParallelForward<T>,
    x: &[T],
    dout: &[T],
    dx: &mut [T],
    grads: &mut MoeParams<T>,
) {
    let config = layer.config();
    let (hidden, n_experts) = (config.hidden, config.n_routed_experts);
    assert!(
        dout.len() == x.len() && dx.len() == x.len(),
        "MoE gradient shapes"
    );
    assert!(
        grads.holds(&ep.local_experts()),
        "the gradients hold this rank's experts"
    );
    let (routing, dispatch, plan) = (&pass.routing, &pass.dispatch, &pass.plan);

    // d gate = dout_row · expert_row here, where the token lives; the
    // expert's output rows get gate · dout_row, sent to their owners.
    let mut dgates = vec![T::ZERO; routing.gates.len()];
    let mut dsend = vec![T::ZERO; pass.combined.len()];
    let rows = dispatch_order(dispatch, n_experts)
        .zip(pass.combined.chunks_exact(hidden))
        .zip(dsend.chunks_exact_mut(hidden))
        .map(|((slot, y), dy)| (slot, y, dy));
    let slot_dgates = dispatch.gate_backward(rows, dout, &routing.gates);
    for (slot, dgate) in dispatch_order(dispatch, n_experts).zip(slot_dgates) {
        dgates[slot] = dgate;
    }
    let dreceived = ep.exchange_rows(&dsend, plan.send_rows(), &plan.recv_rows(), hidden);
    drop(dsend);

    let mut dinputs = Vec::with_capacity(pass.local.len());
    let batches = plan.to_batches(&dreceived, hidden);
    for ((e, expert), dy) in ep.local_experts().zip(&pass.local).zip(batches) {
        let mut dinput = vec![T::ZERO; expert.input.len()];
        layer.expert(linears, e).backward(
            &mut dinput,
            grads.expert_grads(config, e),
            &dy,
            &expert.input,
            &expert.activations,
        );
        dinputs.push(dinput);
    }
    let back = plan.to_sources(&dinputs, hidden);
    let dx_rows = ep.exchange_rows(&back, &plan.recv_rows(), plan.send_rows(), hidden);
    let rows = dispatch_order(dispatch, n_experts).zip(dx_rows.chunks_exact(hidden));
    dispatch.add_rows(dx, rows, None);

    if let (Some(mlp), Some(activations)) = (layer.shared(linears), &pass.shared) {
        mlp.backward(dx, grads.shared_grads(), dout, x, activations);
    }
    layer.router_backward(
        routing,
        &pass.sequences,
        pass.sliced_balance.as_ref(),
        x,
        &dgates,
        dx,
        &mut grads.router,
    );
}

#[cfg(test)]
mod tests {
    use super::ExchangePlan;

    #[test]
    fn batches_regroup_rows_by_expert_and_sources_undo_it() {
        // 3 ranks, 2 experts each; this rank receives, per source and local
        // expert: rank 0 (1, 0), rank 1 (2, 1), rank 2 (0, 0).
        let load = [1, 0, 0, 2, 5, 0];
        let plan = ExchangePlan::new(&load, vec![1, 0, 2, 1, 0, 0], 3);
        assert_eq!(plan.send_rows(), [1, 2, 5]);
        assert_eq!(plan.recv_rows(), [1, 3, 0]);
        assert_eq!(plan.batch_rows(), [3, 1]);
        // Rows of width 2, labelled source*10 + row.
        let rows = [0, 0, 10, 10, 11, 11, 12, 12];
        let batches = plan.to_batches(&rows, 2);
        assert_eq!(batches, [vec![0, 0, 10, 10, 11, 11], vec![12, 12]]);
        assert_eq!(plan.to_sources(&batches, 2), rows);
    }
}
