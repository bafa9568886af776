//! Who sends which chunk to whom at each step of each algorithm: pure
//! functions of (rank, size, step), so the algorithms in
//! [`super::tcp`] stay short and the schedules are tested without sockets.
//!
//! Ring algorithms send every byte over each link once per phase, so their
//! time is `2·(p−1)/p · n / bandwidth` for an all-reduce, independent of `p`
//! — unlike a star through rank 0, whose links carry `p−1` times more.

/// `n` elements split into `parts` contiguous chunks whose sizes differ by
/// at most one (the first `n % parts` get the extra element). Some chunks are
/// empty when `n < parts`.
pub fn balanced_counts(n: usize, parts: usize) -> Vec<usize> {
    let (base, extra) = (n / parts, n % parts);
    (0..parts).map(|i| base + usize::from(i < extra)).collect()
}

/// Start offsets of chunks of the given sizes, plus the total at the end.
pub fn offsets(counts: &[usize]) -> Vec<usize> {
    let mut out = Vec::with_capacity(counts.len() + 1);
    let mut at = 0;
    out.push(0);
    for &c in counts {
        at += c;
        out.push(at);
    }
    out
}

/// `(a - b) mod m` without underflow, for ring positions.
fn back(a: usize, b: usize, m: usize) -> usize {
    (a + m - b % m) % m
}

/// Ring neighbours of `rank`: `(left, right)`. Data flows left → right.
pub fn ring_neighbours(rank: usize, size: usize) -> (usize, usize) {
    (back(rank, 1, size), (rank + 1) % size)
}

/// Ring reduce-scatter, step `0..size-1`: the chunk `rank` sends right and
/// the chunk it receives from the left (and adds its own values to). After
/// the last step rank `r` holds the complete sum of chunk `r`.
///
/// Chunk `c` starts at rank `c+1` and travels right, gaining one rank's
/// values per hop, so its sum is always taken in the same order —
/// `x[c+1] + x[c+2] + … + x[c]` — which makes results reproducible run to
/// run and identical on every rank (the all-gather copies, never re-adds).
pub fn reduce_scatter_step(rank: usize, size: usize, step: usize) -> (usize, usize) {
    (back(rank, 1 + step, size), back(rank, 2 + step, size))
}

/// Ring all-gather, step `0..size-1`, starting from rank `r` holding chunk
/// `r`: the chunk sent right and the chunk received from the left.
pub fn all_gather_step(rank: usize, size: usize, step: usize) -> (usize, usize) {
    (back(rank, step, size), back(rank, step + 1, size))
}

/// Pairwise exchange, step `1..size`: send to `rank + step`, receive from
/// `rank − step`. Every ordered pair meets exactly once, and at every step
/// each rank sends one message and receives one, so no rank is a hot spot.
pub fn pairwise_step(rank: usize, size: usize, step: usize) -> (usize, usize) {
    ((rank + step) % size, back(rank, step, size))
}

/// Dissemination barrier: in round `k` rank `r` signals `r + 2^k` and waits
/// for `r − 2^k`; after `ceil(log2 size)` rounds every rank has (transitively)
/// heard from every other. Returns `(to, from)` per round.
pub fn barrier_rounds(rank: usize, size: usize) -> Vec<(usize, usize)> {
    let mut rounds = Vec::new();
    let mut distance = 1;
    while distance < size {
        rounds.push(((rank + distance) % size, back(rank, distance, size)));
        distance *= 2;
    }
    rounds
}

/// Pipelined chain broadcast from `root` (root → root+1 → … → root−1):
/// `(from, to)` for `rank`, `None` at the chain's ends. With the payload cut
/// into segments, every link is busy at once and the time is about
/// `n / bandwidth + (size − 2) · segment / bandwidth`.
pub fn chain_links(rank: usize, size: usize, root: usize) -> (Option<usize>, Option<usize>) {
    let position = back(rank, root, size);
    let (left, right) = ring_neighbours(rank, size);
    (
        (position > 0).then_some(left),
        (position + 1 < size).then_some(right),
    )
}

/// 64-bit FNV-1a: a hash that is stable across builds and platforms (the
/// standard library's is not promised to be), for group ids and config hashes
/// that different processes must agree on.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The id frames of a group carry: a hash of its global ranks, in order.
pub fn group_id(members: &[usize]) -> u64 {
    let bytes: Vec<u8> = members
        .iter()
        .flat_map(|&r| (r as u64).to_le_bytes())
        .collect();
    fnv1a(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn balanced_counts_cover_n_and_differ_by_at_most_one() {
        for n in 0..20 {
            for p in 1..7 {
                let c = balanced_counts(n, p);
                assert_eq!(c.len(), p);
                assert_eq!(c.iter().sum::<usize>(), n);
                let (lo, hi) = (c.iter().min().unwrap(), c.iter().max().unwrap());
                assert!(hi - lo <= 1, "{n} over {p}: {c:?}");
            }
        }
        assert_eq!(offsets(&[2, 0, 3]), vec![0, 2, 2, 5]);
    }

    /// Runs the reduce-scatter schedule on sets of contributors: every rank
    /// must end holding its own chunk with every rank's contribution, and a
    /// rank must only ever receive what its left neighbour sent that step.
    #[test]
    fn ring_reduce_scatter_then_all_gather_reduces_everything_everywhere() {
        for p in 1..8 {
            // held[rank][chunk] = ranks whose values are summed in.
            let mut held: Vec<Vec<BTreeSet<usize>>> = (0..p)
                .map(|r| (0..p).map(|_| BTreeSet::from([r])).collect())
                .collect();
            for step in 0..p.saturating_sub(1) {
                let sent: Vec<(usize, BTreeSet<usize>)> = (0..p)
                    .map(|r| {
                        let (chunk, _) = reduce_scatter_step(r, p, step);
                        (chunk, held[r][chunk].clone())
                    })
                    .collect();
                for (r, chunks) in held.iter_mut().enumerate() {
                    let (left, _) = ring_neighbours(r, p);
                    let (_, recv) = reduce_scatter_step(r, p, step);
                    assert_eq!(sent[left].0, recv, "p={p} step={step} rank={r}");
                    chunks[recv].extend(sent[left].1.iter().copied());
                }
            }
            let all: BTreeSet<usize> = (0..p).collect();
            for (r, chunks) in held.iter().enumerate() {
                assert_eq!(chunks[r], all, "p={p}: rank {r} lacks part of its chunk");
            }
            // All-gather: rank r starts with chunk r only.
            let mut has: Vec<BTreeSet<usize>> = (0..p).map(|r| BTreeSet::from([r])).collect();
            for step in 0..p.saturating_sub(1) {
                let sent: Vec<usize> = (0..p).map(|r| all_gather_step(r, p, step).0).collect();
                for r in 0..p {
                    let (left, _) = ring_neighbours(r, p);
                    assert!(has[left].contains(&sent[left]), "sends a chunk it lacks");
                    let (_, recv) = all_gather_step(r, p, step);
                    assert_eq!(sent[left], recv);
                    has[r].insert(recv);
                }
            }
            assert!(has.iter().all(|h| *h == all), "p={p}: {has:?}");
        }
    }

    #[test]
    fn pairwise_meets_every_ordered_pair_once() {
        for p in 1..8 {
            let mut pairs = BTreeSet::new();
            for step in 1..p {
                for r in 0..p {
                    let (to, from) = pairwise_step(r, p, step);
                    assert_eq!(pairwise_step(from, p, step).0, r, "from must send to me");
                    assert!(pairs.insert((r, to)));
                }
            }
            assert_eq!(pairs.len(), p * (p - 1));
        }
    }

    #[test]
    fn barrier_and_chain_reach_every_rank() {
        for p in 1..9 {
            // Who has transitively heard from whom after all rounds.
            let mut heard: Vec<BTreeSet<usize>> = (0..p).map(|r| BTreeSet::from([r])).collect();
            let rounds: Vec<_> = (0..p).map(|r| barrier_rounds(r, p)).collect();
            let round_count = rounds[0].len();
            for k in 0..round_count {
                let round: Vec<(usize, usize)> =
                    rounds.iter().map(|per_rank| per_rank[k]).collect();
                let before = heard.clone();
                for (r, heard) in heard.iter_mut().enumerate() {
                    let from = round[r].1;
                    assert_eq!(round[from].0, r);
                    heard.extend(before[from].iter().copied());
                }
            }
            assert!(heard.iter().all(|h| h.len() == p), "p={p}");
            for root in 0..p {
                let mut reached = BTreeSet::from([root]);
                let mut at = root;
                while let (_, Some(next)) = chain_links(at, p, root) {
                    assert_eq!(chain_links(next, p, root).0, Some(at));
                    reached.insert(next);
                    at = next;
                }
                assert_eq!(reached.len(), p);
                assert_eq!(chain_links(root, p, root).0, None);
            }
        }
    }

    #[test]
    fn fnv1a_matches_the_published_test_vectors() {
        // From the FNV reference test suite.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
        assert_ne!(group_id(&[0, 1]), group_id(&[1, 0]));
    }
}
