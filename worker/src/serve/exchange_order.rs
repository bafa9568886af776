//! The host-side decisions of the GPU's expert-parallel MoE layer
//! (`crate::cuda::serve_ep`, feature `cuda`), as plain functions so the CPU
//! build tests them: which rows a rank routes, how many rows go to and come
//! from each rank, and the index arrays that regroup received rows into one
//! batch per local expert and back.
//!
//! The contract is the CPU replica's (`serve/expert_parallel.rs`): rank `q`
//! routes its balanced slice of the step's rows, sends each routed row to
//! the rank owning its expert (experts of rank `r` are the contiguous range
//! `r·per..(r+1)·per`, so rows sorted by expert are already grouped by
//! destination), receives rows source-major (rank 0's rows of local expert
//! 0, 1, …, then rank 1's), runs them expert-major, and returns them in the
//! order they came. The orders below are [`ExchangePlan::to_batches`] and
//! [`ExchangePlan::to_sources`] as gathers, so the device moves each row
//! once with a gather kernel instead of copying segment by segment.
//!
//! [`ExchangePlan::to_batches`]: crate::moe::expert_parallel::ExchangePlan::to_batches
//! [`ExchangePlan::to_sources`]: crate::moe::expert_parallel::ExchangePlan::to_sources

use std::ops::Range;

use crate::dist::schedule::balanced_counts;
use crate::moe::expert_parallel::ExchangePlan;

/// The rows each rank routes of a step's `rows` (balanced, as the CPU
/// replica splits them), and this rank's range of them.
pub fn row_split(rows: usize, size: usize, rank: usize) -> (Vec<usize>, Range<usize>) {
    let counts = balanced_counts(rows, size.max(1));
    let first: usize = counts.iter().take(rank).sum();
    let mine = counts.get(rank).copied().unwrap_or(0);
    (counts, first..first + mine)
}

/// Who sends how many rows to whom in one layer's exchanges (the CPU
/// replica's [`ExchangePlan`], built only from shapes that agree), and in
/// what order the received rows are computed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevicePlan(ExchangePlan);

impl DevicePlan {
    /// From this rank's per-expert `load` (every routed expert, global
    /// order) and what the peers said they send (`recv`, from
    /// [`crate::dist::expert_parallel::ExpertParallel::exchange_counts`]),
    /// for a group of `size` ranks. An error (never a panic) when the
    /// shapes disagree: the layer then fails the step.
    pub fn new(load: &[usize], recv: Vec<usize>, size: usize) -> Result<Self, String> {
        if size == 0 || load.is_empty() || !load.len().is_multiple_of(size) {
            return Err(format!(
                "{} routed experts do not split over {size} ranks",
                load.len()
            ));
        }
        if recv.len() != load.len() {
            return Err(format!(
                "{} receive counts for {} experts: one per source rank and local expert",
                recv.len(),
                load.len()
            ));
        }
        Ok(Self(ExchangePlan::new(load, recv, size)))
    }

    /// Rows this rank sends to each rank.
    pub fn send_rows(&self) -> &[usize] {
        self.0.send_rows()
    }

    /// Rows this rank receives from each rank.
    pub fn recv_rows(&self) -> Vec<usize> {
        self.0.recv_rows()
    }

    /// Rows received in all.
    pub fn received(&self) -> usize {
        self.0.recv().iter().sum()
    }

    /// Rows of each local expert's batch (from every source).
    pub fn batch_rows(&self) -> Vec<usize> {
        self.0.batch_rows()
    }

    /// `(local expert, first row, rows)` of each local expert with rows, in
    /// the expert-major batch layout.
    pub fn segments(&self) -> Vec<(usize, usize, usize)> {
        let mut at = 0;
        let mut segments = Vec::new();
        for (j, rows) in self.batch_rows().into_iter().enumerate() {
            if rows > 0 {
                segments.push((j, at, rows));
            }
            at += rows;
        }
        segments
    }

    /// For each row of the expert-major batches, the received row
    /// (source-major) it is: `batches[b] = received[order[b]]`.
    pub fn to_batches_order(&self) -> Vec<usize> {
        let (recv, per) = (self.0.recv(), self.0.per());
        // Where source s's rows for expert j start among the received rows.
        let mut starts = vec![0; recv.len()];
        let mut at = 0;
        for (start, &n) in starts.iter_mut().zip(recv) {
            *start = at;
            at += n;
        }
        let sources = recv.len() / per;
        let mut order = Vec::with_capacity(at);
        for j in 0..per {
            for s in 0..sources {
                let i = s * per + j;
                order.extend(starts[i]..starts[i] + recv[i]);
            }
        }
        order
    }

    /// The inverse of [`Self::to_batches_order`]: for each row in the order
    /// received (which is the order to send the outputs back in), its row
    /// of the batches: `back[i] = batches[order[i]]`.
    pub fn to_sources_order(&self) -> Vec<usize> {
        let forward = self.to_batches_order();
        let mut order = vec![0; forward.len()];
        for (b, &i) in forward.iter().enumerate() {
            order[i] = b;
        }
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn rows_split_as_the_cpu_replica_splits_them() {
        assert_eq!(row_split(5, 2, 0), (vec![3, 2], 0..3));
        assert_eq!(row_split(5, 2, 1), (vec![3, 2], 3..5));
        // A decode of one row on four ranks: three route nothing.
        assert_eq!(row_split(1, 4, 0), (vec![1, 0, 0, 0], 0..1));
        assert_eq!(row_split(1, 4, 3), (vec![1, 0, 0, 0], 1..1));
        assert_eq!(row_split(0, 2, 1), (vec![0, 0], 0..0));
        // Never a panic on a bad size or rank.
        assert_eq!(row_split(3, 0, 0), (vec![3], 0..3));
        assert_eq!(row_split(3, 2, 5).1, 3..3);
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(DevicePlan::new(&[1, 2, 3], vec![0; 3], 2).is_err());
        assert!(DevicePlan::new(&[1, 2], vec![0; 3], 2).is_err());
        assert!(DevicePlan::new(&[], vec![], 1).is_err());
        assert!(DevicePlan::new(&[1, 2], vec![0; 2], 0).is_err());
    }

    /// The orders agree with the CPU replica's regrouping
    /// ([`ExchangePlan::to_batches`], [`ExchangePlan::to_sources`]) on rows
    /// tagged with their index, for random counts with many zeros.
    #[test]
    fn orders_match_the_cpu_regrouping() {
        let mut rng = SplitMix64::new(7);
        for case in 0..200 {
            let size = 1 + rng.below(4);
            let per = 1 + rng.below(3);
            let experts = size * per;
            let count = |rng: &mut SplitMix64| {
                if rng.below(3) == 0 { 0 } else { rng.below(5) }
            };
            let load: Vec<usize> = (0..experts).map(|_| count(&mut rng)).collect();
            let recv: Vec<usize> = (0..experts).map(|_| count(&mut rng)).collect();
            let plan = DevicePlan::new(&load, recv.clone(), size).unwrap();
            let reference = ExchangePlan::new(&load, recv, size);
            assert_eq!(plan.send_rows(), reference.send_rows(), "case {case}");
            assert_eq!(plan.recv_rows(), reference.recv_rows(), "case {case}");
            assert_eq!(plan.batch_rows(), reference.batch_rows(), "case {case}");

            // Rows of width 2 tagged with their received index.
            let width = 2;
            let received: Vec<usize> = (0..plan.received()).flat_map(|i| [i, i + 1000]).collect();
            let batches: Vec<usize> = reference
                .to_batches(&received, width)
                .into_iter()
                .flatten()
                .collect();
            let gathered: Vec<usize> = plan
                .to_batches_order()
                .iter()
                .flat_map(|&i| [received[i * width], received[i * width + 1]])
                .collect();
            assert_eq!(gathered, batches, "case {case}: to batches");

            // Batch rows tagged with their batch index, sent back.
            let tagged: Vec<usize> = (0..plan.received()).collect();
            let mut at = 0;
            let per_batch: Vec<Vec<usize>> = plan
                .batch_rows()
                .iter()
                .map(|&n| {
                    at += n;
                    tagged[at - n..at].to_vec()
                })
                .collect();
            let expected = reference.to_sources(&per_batch, 1);
            let order = plan.to_sources_order();
            let back: Vec<usize> = order.iter().map(|&b| tagged[b]).collect();
            assert_eq!(back, expected, "case {case}: to sources");

            // Segments tile the batches in local-expert order.
            let mut next = 0;
            for (j, first, rows) in plan.segments() {
                assert!(first >= next && rows > 0, "case {case}");
                assert_eq!(rows, plan.batch_rows()[j], "case {case}");
                next = first + rows;
            }
            assert!(next <= plan.received(), "case {case}");
        }
    }
}
