//! Choosing an expert-parallel replica's redundant experts again from the
//! load of the last window ([`crate::moe::placement`]). Every rank calls
//! [`rebalance`] at the same point between two steps (the leader's plan
//! says when: `serve/lockstep.rs`'s `Rebalance`), and per MoE layer:
//!
//! ```text
//!  all-reduce: rows each rank routed to each expert     ─▶ the window's load, on every rank
//!  rank 0: ExpertPlacement::balanced(load) ─▶ broadcast ─▶ one placement, on every rank
//!  all-to-all of weights: a new replica's from its expert's primary owner
//!  (a copy the rank holds already is reused)            ─▶ install
//! ```
//!
//! Only replicas move; primaries never do, so a rank always has what it
//! needs to send, and a replica's weights come from one place. A copy
//! computes each row's bits as the primary does (the weights travel as the
//! values the kernel multiplies: [`PackedMlp::to_bytes`]), so a rebalance
//! never changes a completion.

use crate::dist::DistError;
use crate::dist::collective::exchange_counts;
use crate::dist::expert_parallel::ExpertParallel;
use crate::moe::placement::ExpertPlacement;
use crate::serve::layers::{Ffn, Layers, PackedMlp};

const OP: &str = "expert rebalance";
/// A replica slot left empty, on the wire.
const EMPTY: u32 = u32::MAX;

/// What one MoE layer's rebalance did.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerRebalance {
    /// The decoder layer.
    pub layer: usize,
    /// Rows routed to each expert in the window, over the whole replica.
    pub load: Vec<u64>,
    /// The window's busiest rank over the mean, as placed then (expected:
    /// each expert's rows split evenly over its copies).
    pub before: f64,
    /// The same load as the new placement would have spread it.
    pub after: f64,
    /// Replica slots whose weights came from another rank (replica-wide).
    pub moved: usize,
    /// Weight bytes this rank sent.
    pub bytes_sent: u64,
}

/// Where a rank's replica slot gets its weights from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Empty,
    /// The rank holds a copy already (this slot's, or another of its slots').
    Here(usize),
    /// Expert `.1` from its primary owner, rank `.0`.
    Peer(usize, usize),
}

fn source(old: &ExpertPlacement, new: &ExpertPlacement, rank: usize, slot: usize) -> Source {
    let Some(e) = new.replicas_of(rank)[slot] else {
        return Source::Empty;
    };
    let owner = e / new.primaries_per_rank();
    if owner == rank || old.replicas_of(rank).contains(&Some(e)) {
        Source::Here(e)
    } else {
        Source::Peer(owner, e)
    }
}

/// Rebalances every MoE layer of `layers` over `ep` (see the module
/// comment). Every rank of the replica must call it at the same point.
pub(crate) fn rebalance(
    layers: &mut Layers,
    ep: &ExpertParallel,
) -> Result<Vec<LayerRebalance>, DistError> {
    let mut report = Vec::new();
    for (layer, block) in layers.blocks.iter_mut().enumerate() {
        let Ffn::Moe(moe) = &mut block.ffn else {
            continue;
        };
        let old = moe
            .placement()
            .ok_or_else(|| DistError::invalid(OP, "the layer is not expert-parallel"))?
            .clone();
        if old.redundant() == 0 {
            continue;
        }
        let (size, me, hidden) = (ep.size(), ep.rank(), moe.config().hidden);
        let mut sums: Vec<f32> = moe.take_routed().iter().map(|&r| r as f32).collect();
        ep.with_group(|g| g.all_reduce_sum(&mut sums))?;
        let load: Vec<u64> = sums.iter().map(|&v| v.max(0.0).round() as u64).collect();

        let mut wire = vec![0u8; old.replicas().len() * 4];
        if me == 0 {
            let chosen = ExpertPlacement::balanced(&load, size, old.redundant())
                .map_err(|e| DistError::invalid(OP, e))?;
            for (bytes, replica) in wire.chunks_exact_mut(4).zip(chosen.replicas()) {
                let word = replica.map_or(EMPTY, |e| e as u32);
                bytes.copy_from_slice(&word.to_le_bytes());
            }
        }
        ep.with_group(|g| g.broadcast_bytes(&mut wire, 0))?;
        let replicas = wire
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .map(|w| (w != EMPTY).then_some(w as usize))
            .collect();
        let new = ExpertPlacement::new(size, old.experts(), old.redundant(), replicas)
            .map_err(|e| DistError::invalid(OP, e))?;

        // Weights this rank owns that a new replica elsewhere needs, by
        // destination, in the destination's slot order.
        let mut send = Vec::new();
        let mut send_counts = vec![0; size];
        let mut moved = 0;
        for (q, count) in send_counts.iter_mut().enumerate() {
            for slot in 0..old.redundant() {
                let Source::Peer(owner, e) = source(&old, &new, q, slot) else {
                    continue;
                };
                moved += 1;
                if owner == me {
                    let held = moe.copy_of(e).ok_or_else(|| {
                        DistError::invalid(OP, format!("rank {me} owns expert {e} but lacks it"))
                    })?;
                    let bytes = held.to_bytes();
                    *count += bytes.len();
                    send.extend_from_slice(&bytes);
                }
            }
        }
        let recv_counts = ep.with_group(|g| exchange_counts(g, &send_counts))?;
        let mut recv = vec![0u8; recv_counts.iter().sum()];
        ep.with_group(|g| g.all_to_all_bytes(&send, &send_counts, &mut recv, &recv_counts))?;

        // Each source's segment holds its experts for this rank's slots, in
        // slot order.
        let mut at: Vec<usize> = recv_counts
            .iter()
            .scan(0, |end, &n| {
                let start = *end;
                *end += n;
                Some(start)
            })
            .collect();
        let mut weights = Vec::with_capacity(old.redundant());
        for slot in 0..old.redundant() {
            weights.push(match source(&old, &new, me, slot) {
                Source::Empty => None,
                Source::Here(e) => Some(moe.copy_of(e).cloned().ok_or_else(|| {
                    DistError::invalid(OP, format!("rank {me} should hold expert {e}"))
                })?),
                Source::Peer(owner, e) => {
                    let end = at[owner] + recv_counts[owner];
                    let (mlp, used) = PackedMlp::from_bytes(&recv[at[owner]..end], hidden)
                        .map_err(|problem| {
                            DistError::invalid(
                                OP,
                                format!("expert {e} from rank {owner}: {problem}"),
                            )
                        })?;
                    at[owner] += used;
                    Some(mlp)
                }
            });
        }
        if let Some(owner) = (0..size).find(|&s| at[s] != recv_counts[..=s].iter().sum::<usize>()) {
            return Err(DistError::invalid(
                OP,
                format!("rank {owner} sent weights this rank did not expect"),
            ));
        }
        report.push(LayerRebalance {
            layer,
            before: old.imbalance(&load),
            after: new.imbalance(&load),
            load,
            moved,
            bytes_sent: send.len() as u64,
        });
        moe.install(new, weights)
            .map_err(|e| DistError::invalid(OP, e))?;
    }
    Ok(report)
}
