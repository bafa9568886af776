//! The serving MoE layer with its routed experts split over the ranks of a
//! replica. Attention, the dense layers and every rank's KV cache are
//! replicated (each rank runs the same step on the same rows), so each MoE
//! layer starts with the whole step's rows on every rank:
//!
//! ```text
//!  rows 0..n on every rank ─▶ rank q takes its slice (n/P rows, balanced)
//!    ─▶ route its slice ─▶ rows by expert (Dispatch) ─▶ all-to-all (uneven)
//!    ─▶ owned experts: rows from rank 0, 1, … as one batch ─▶ SwiGLU
//!    ─▶ reverse all-to-all ─▶ gate · row added at its token, expert order
//!    ─▶ + shared experts (slice) ─▶ all-gather ─▶ rows 0..n on every rank
//! ```
//!
//! The exchanges are training's ([`ExpertParallel`], [`ExchangePlan`]), so
//! a backend of the [`crate::dist::Collective`] trait (TCP today, NCCL
//! later) serves as it trains. Every GEMM computes each row alone, and a
//! token's row sums its experts' gated outputs in ascending expert order
//! ([`Moe::add_routed`], shared with the single-process layer), then the
//! shared experts: so the output is the single process's to the bit, for
//! any rank count and any split of the rows.
//!
//! A failed exchange is recorded in the [`ExpertParallel`] and the layer
//! returns zeros; [`crate::serve::engine::Engine::step`] collects the
//! failure after the step.

use crate::dist::expert_parallel::ExpertParallel;
use crate::dist::schedule::balanced_counts;
use crate::moe::expert_parallel::{ExchangePlan, dispatch_order};
use crate::serve::adapters::{BlockAdapter, MlpAdapter};
use crate::serve::layers::Moe;

/// The layer's output for `x: [rows, hidden]` (the same rows on every rank
/// of `ep`, which must all call it at the same point), on every rank, with
/// row `r`'s adapter (`adapters[r]`, the same on every rank; none when
/// empty) adding its updates to the experts it is routed to and to the
/// shared experts. A row sent to another rank's expert carries its index
/// in the step as one more value, by which that rank finds its adapter
/// (only in steps where some row's adapter adapts experts: every rank
/// sees the same rows, so all agree on the rows' width).
pub(crate) fn forward(
    moe: &Moe,
    x: &[f32],
    ep: &ExpertParallel,
    adapters: &[Option<&BlockAdapter>],
) -> Vec<f32> {
    let config = moe.config();
    let (hidden, n_experts) = (config.hidden, config.n_routed_experts);
    let placement = moe
        .placement()
        .expect("an expert-parallel layer has a placement");
    let rows = x.len() / hidden;
    // Every rank has the same rows: with none, all skip the exchanges alike.
    if rows == 0 {
        return Vec::new();
    }
    let counts = balanced_counts(rows, ep.size());
    let first: usize = counts[..ep.rank()].iter().sum();
    let mine = &x[first * hidden..(first + counts[ep.rank()]) * hidden];

    let (routing, dispatch) = moe.route(mine);
    // The load the next choice of copies reads; without slots for copies
    // nothing reads it.
    if placement.redundant() > 0 {
        moe.count_routed(&dispatch.load());
    }
    // Each assignment, in dispatch order (by expert, then token), goes to
    // the copy of its expert that computes it; rows are sent by copy.
    let assignments: Vec<usize> = dispatch_order(&dispatch, n_experts).collect();
    let copy: Vec<usize> = (0..n_experts)
        .flat_map(|e| {
            (0..dispatch.slots(e).len()).map(move |i| placement.physical_slot(e, i, ep.rank()))
        })
        .collect();
    let mut load = vec![0; ep.size() * placement.slots_per_rank()];
    for &c in &copy {
        load[c] += 1;
    }
    // Dispatch positions in sending order (stable: by token within a copy).
    // Without copies every expert is its own slot, in expert order: the
    // dispatch order already is the sending order, and nothing is moved.
    let in_order = copy.is_sorted();
    let mut order: Vec<usize> = (0..copy.len()).collect();
    if !in_order {
        order.sort_by_key(|&k| copy[k]);
    }
    let plan = ExchangePlan::new(&load, ep.exchange_counts(&load), ep.size());
    let indexed = adapters
        .iter()
        .any(|a| a.is_some_and(BlockAdapter::adapts_experts));
    let width = hidden + usize::from(indexed);
    let mut send = Vec::with_capacity(order.len() * width);
    for &k in &order {
        let token = dispatch.token(assignments[k]);
        send.extend_from_slice(&mine[token * hidden..(token + 1) * hidden]);
        if indexed {
            // Exact: a step's rows number far fewer than 2^24.
            send.push((first + token) as f32);
        }
    }
    let received = ep.exchange_rows(&send, plan.send_rows(), &plan.recv_rows(), width);
    drop(send);

    let outputs: Vec<Vec<f32>> = plan
        .to_batches(&received, width)
        .into_iter()
        .enumerate()
        .map(|(slot, batch)| {
            let (input, expert_adapters) = match indexed {
                false => (batch, Vec::new()),
                true => {
                    let expert = placement.slot_expert(ep.rank(), slot);
                    let mut input = Vec::with_capacity(batch.len() / width * hidden);
                    let mut rows = Vec::with_capacity(batch.len() / width);
                    for row in batch.chunks_exact(width) {
                        input.extend_from_slice(&row[..hidden]);
                        let adapter = adapters.get(row[hidden] as usize).copied().flatten();
                        rows.push(adapter.zip(expert).and_then(|(a, e)| a.experts.get(e)));
                    }
                    (input, rows)
                }
            };
            let mut out = vec![0.0; input.len()];
            if !input.is_empty() {
                moe.slot(slot)
                    .expect("rows arrive only for a filled slot")
                    .forward_adapted(&mut out, &input, &expert_adapters);
                moe.count_slot_rows(slot, input.len() / hidden);
            }
            out
        })
        .collect();
    drop(received);
    let back = plan.to_sources(&outputs, hidden);
    let combined = ep.exchange_rows(&back, &plan.recv_rows(), plan.send_rows(), hidden);
    // Back into dispatch order, which is the order the sums take.
    let in_dispatch_order = if in_order {
        combined
    } else {
        let mut rows = vec![0.0; combined.len()];
        for (row, &k) in combined.chunks_exact(hidden).zip(&order) {
            rows[k * hidden..(k + 1) * hidden].copy_from_slice(row);
        }
        rows
    };

    let mut output = vec![0.0; mine.len()];
    moe.add_routed(
        &mut output,
        &routing,
        &dispatch,
        0..n_experts,
        &in_dispatch_order,
    );
    let shared: Vec<Option<&MlpAdapter>> = match adapters.is_empty() {
        true => Vec::new(),
        false => adapters[first..first + counts[ep.rank()]]
            .iter()
            .map(|a| a.map(|a| &a.shared))
            .collect(),
    };
    moe.add_shared(mine, &mut output, &shared);
    ep.all_gather_rows(&output, &counts, hidden)
}
