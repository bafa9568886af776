//! What each NCCL call moves, worked out before any call (pure). NCCL's
//! collectives take one count for every rank, and it has no all-to-all
//! with uneven splits, so:
//!
//! - an all-to-all is one grouped `ncclSend`/`ncclRecv` per peer with
//!   something to move ([`all_to_all`]); this rank's own segment is a local
//!   copy, and zero counts make no call on either side (the sender and the
//!   receiver hold the same count, so both skip);
//! - an uneven reduce-scatter or all-gather runs on segments padded to the
//!   largest count ([`Padded`]): `p · max` elements instead of `Σ counts`,
//!   which for the balanced splits training makes is the same or nearly.

use std::ops::Range;

use crate::dist::collective::check_counts;
use crate::dist::error::DistError;
use crate::dist::schedule::offsets;

/// One peer's share of an all-to-all: `send` of the send buffer goes to
/// `peer`, `recv` of the receive buffer comes from it (either may be empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transfer {
    pub peer: usize,
    pub send: Range<usize>,
    pub recv: Range<usize>,
}

/// An all-to-all as NCCL runs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllToAll {
    /// This rank's own segment: `send[local.0]` is copied to `recv[local.1]`.
    pub local: (Range<usize>, Range<usize>),
    /// One entry per other peer with anything to send or receive.
    pub transfers: Vec<Transfer>,
}

/// The plan for rank `rank` of a group of `send_counts.len()`, checking
/// the counts against the buffers first (nothing is sent on a mismatch).
pub fn all_to_all(
    rank: usize,
    send_counts: &[usize],
    send_len: usize,
    recv_counts: &[usize],
    recv_len: usize,
) -> Result<AllToAll, DistError> {
    let size = send_counts.len();
    check_counts("all_to_all", send_counts, size, send_len)?;
    check_counts("all_to_all", recv_counts, size, recv_len)?;
    if rank >= size {
        return Err(DistError::invalid(
            "all_to_all",
            format!("rank {rank} in a group of {size}"),
        ));
    }
    if send_counts[rank] != recv_counts[rank] {
        return Err(DistError::invalid(
            "all_to_all",
            format!(
                "this rank sends itself {} but expects {}",
                send_counts[rank], recv_counts[rank]
            ),
        ));
    }
    let (out, inn) = (offsets(send_counts), offsets(recv_counts));
    let transfers = (0..size)
        .filter(|&p| p != rank && (send_counts[p] > 0 || recv_counts[p] > 0))
        .map(|p| Transfer {
            peer: p,
            send: out[p]..out[p + 1],
            recv: inn[p]..inn[p + 1],
        })
        .collect();
    Ok(AllToAll {
        local: (out[rank]..out[rank + 1], inn[rank]..inn[rank + 1]),
        transfers,
    })
}

/// Segments of uneven `counts` laid out `stride` (the largest count) apart,
/// so NCCL's equal-count reduce-scatter and all-gather can carry them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Padded {
    counts: Vec<usize>,
    stride: usize,
}

impl Padded {
    pub fn new(counts: &[usize]) -> Self {
        Self {
            counts: counts.to_vec(),
            stride: counts.iter().copied().max().unwrap_or(0),
        }
    }

    /// Elements per rank in the padded layout (NCCL's `count`).
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Elements of the whole padded buffer.
    pub fn len(&self) -> usize {
        self.stride * self.counts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the layout is the packed one already (equal counts).
    pub fn is_identity(&self) -> bool {
        self.counts.iter().all(|&c| c == self.stride)
    }

    /// `packed` (segments back to back) in the padded layout, zeros between.
    pub fn pad<T: Copy + Default>(&self, packed: &[T]) -> Vec<T> {
        let mut padded = vec![T::default(); self.len()];
        let mut at = 0;
        for (r, &count) in self.counts.iter().enumerate() {
            padded[r * self.stride..r * self.stride + count]
                .copy_from_slice(&packed[at..at + count]);
            at += count;
        }
        padded
    }

    /// The segments of `padded` back to back into `packed`.
    pub fn unpad<T: Copy>(&self, padded: &[T], packed: &mut [T]) {
        let mut at = 0;
        for (r, &count) in self.counts.iter().enumerate() {
            packed[at..at + count]
                .copy_from_slice(&padded[r * self.stride..r * self.stride + count]);
            at += count;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulates every rank's plan and delivers each transfer: every rank
    /// ends with exactly what the all-to-all's definition says, for uneven
    /// counts with zeros, and a zero-count pair makes no transfer.
    #[test]
    fn grouped_send_recv_delivers_every_segment_once() {
        let size = 4;
        // counts[s][d]: what rank s sends rank d.
        let counts = [[2, 0, 3, 1], [0, 0, 1, 0], [5, 2, 0, 0], [1, 1, 1, 4]];
        let send: Vec<Vec<u32>> = (0..size)
            .map(|s| {
                (0..size)
                    .flat_map(|d| (0..counts[s][d]).map(move |i| (s * 100 + d * 10 + i) as u32))
                    .collect()
            })
            .collect();
        let plans: Vec<AllToAll> = (0..size)
            .map(|r| {
                let send_counts: Vec<usize> = counts[r].to_vec();
                let recv_counts: Vec<usize> = (0..size).map(|s| counts[s][r]).collect();
                let recv_len = recv_counts.iter().sum();
                all_to_all(r, &send_counts, send[r].len(), &recv_counts, recv_len).unwrap()
            })
            .collect();
        for (r, plan) in plans.iter().enumerate() {
            let total: usize = (0..size).map(|s| counts[s][r]).sum();
            let mut recv = vec![u32::MAX; total];
            recv[plan.local.1.clone()].copy_from_slice(&send[r][plan.local.0.clone()]);
            for t in &plan.transfers {
                // The peer's matching send must be the same length.
                let theirs = plans[t.peer]
                    .transfers
                    .iter()
                    .find(|u| u.peer == r)
                    .expect("a transfer one way has one the other way");
                assert_eq!(theirs.send.len(), t.recv.len());
                recv[t.recv.clone()].copy_from_slice(&send[t.peer][theirs.send.clone()]);
            }
            let expected: Vec<u32> = (0..size)
                .flat_map(|s| (0..counts[s][r]).map(move |i| (s * 100 + r * 10 + i) as u32))
                .collect();
            assert_eq!(recv, expected, "rank {r}");
        }
        // Ranks 1 and 0 exchange nothing either way: no transfer planned.
        assert!(plans[1].transfers.iter().all(|t| t.peer != 0));
        assert!(plans[0].transfers.iter().all(|t| t.peer != 1));
    }

    #[test]
    fn mismatched_counts_are_refused_before_any_call() {
        let e = |r: Result<AllToAll, DistError>| r.unwrap_err().to_string();
        assert!(e(all_to_all(0, &[1, 2], 4, &[1, 1], 2)).contains("sum to 3"));
        assert!(e(all_to_all(0, &[1, 2], 3, &[1], 1)).contains("1 counts for a group of 2"));
        assert!(e(all_to_all(0, &[1, 2], 3, &[2, 1], 3)).contains("sends itself 1 but expects 2"));
        assert!(e(all_to_all(2, &[1, 2], 3, &[1, 2], 3)).contains("rank 2 in a group of 2"));
    }

    #[test]
    fn padding_round_trips_uneven_counts() {
        let padded = Padded::new(&[2, 0, 3]);
        assert_eq!((padded.stride(), padded.len()), (3, 9));
        assert!(!padded.is_identity());
        let packed = [1, 2, 3, 4, 5];
        let wide = padded.pad(&packed);
        assert_eq!(wide, [1, 2, 0, 0, 0, 0, 3, 4, 5]);
        let mut back = [0; 5];
        padded.unpad(&wide, &mut back);
        assert_eq!(back, packed);
        assert!(Padded::new(&[4, 4]).is_identity());
        assert!(Padded::new(&[0, 0]).is_empty());
    }
}
