//! Redundant experts for an expert-parallel group, chosen from the load the
//! router produced (DeepSeek-V3's serving deployment, arXiv 2412.19437
//! §3.4: hot experts are duplicated onto other GPUs, and the duplicates are
//! chosen again from observed statistics every so often).
//!
//! Rank `q` keeps its primary experts `q·per..(q+1)·per`, which never move,
//! and has `redundant` more slots, each empty or holding a copy of an expert
//! some other rank owns. The rows that a rank routes to an expert are split
//! evenly over the expert's copies, so a hot expert's work is shared by
//! several ranks, and every copy computes each row as the primary would
//! (same weights, one row at a time): where a row is computed never changes
//! its bits.
//!
//! [`ExpertPlacement::balanced`] fills the slots greedily, one copy at a
//! time: of every (expert, rank) pair where the rank has a free slot and no
//! copy of the expert yet, it takes the one that leaves the expected rank
//! loads best — lowest maximum, then lowest sum of squares — and stops when
//! no copy improves them. A rank's expected load is the sum over what it
//! holds of `load(e) / copies(e)`. It is a pure function of the loads, so
//! the same loads give the same placement wherever it runs.

/// Where the routed experts of one MoE layer live on `ranks` ranks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertPlacement {
    ranks: usize,
    /// Primary experts per rank.
    per: usize,
    /// Replica slots per rank.
    redundant: usize,
    /// Rank-major: rank `q`'s slot `j` is `replicas[q·redundant + j]`.
    replicas: Vec<Option<usize>>,
    /// Per expert, its copies as physical slots (`rank · slots_per_rank +
    /// slot`): the primary first, then the replicas in slot order.
    copies: Vec<Vec<usize>>,
}

impl ExpertPlacement {
    /// `experts` split over `ranks` with `redundant` empty slots per rank.
    pub fn primaries(ranks: usize, experts: usize, redundant: usize) -> Result<Self, String> {
        Self::new(ranks, experts, redundant, vec![None; ranks * redundant])
    }

    /// A placement with the given replicas (rank-major, `redundant` per
    /// rank), checked: every replica names an expert of the layer.
    pub fn new(
        ranks: usize,
        experts: usize,
        redundant: usize,
        replicas: Vec<Option<usize>>,
    ) -> Result<Self, String> {
        if ranks == 0 || !experts.is_multiple_of(ranks) {
            return Err(format!(
                "{experts} routed experts do not split evenly over {ranks} ranks"
            ));
        }
        if replicas.len() != ranks * redundant {
            return Err(format!(
                "{} replica slots, but {ranks} ranks with {redundant} each",
                replicas.len()
            ));
        }
        if let Some(e) = replicas.iter().flatten().find(|&&e| e >= experts) {
            return Err(format!(
                "a replica of expert {e}, but the layer has {experts}"
            ));
        }
        let per = experts / ranks;
        let slots = per + redundant;
        let mut copies: Vec<Vec<usize>> = (0..experts)
            .map(|e| vec![e / per * slots + e % per])
            .collect();
        for (i, replica) in replicas.iter().enumerate() {
            if let Some(e) = *replica {
                copies[e].push(i / redundant * slots + per + i % redundant);
            }
        }
        Ok(Self {
            ranks,
            per,
            redundant,
            replicas,
            copies,
        })
    }

    /// The placement whose replicas balance `load` (rows routed to each
    /// expert) best, greedily (see the module comment).
    pub fn balanced(load: &[u64], ranks: usize, redundant: usize) -> Result<Self, String> {
        let empty = Self::primaries(ranks, load.len(), redundant)?;
        let per = empty.per;
        let mut replicas = empty.replicas;
        let mut counts = vec![1usize; load.len()];
        // held[q][e]: copies of expert e on rank q.
        let mut held = vec![vec![false; load.len()]; ranks];
        for (e, _) in load.iter().enumerate() {
            held[e / per][e] = true;
        }
        let mut free = vec![redundant; ranks];
        let mut loads = expected_loads(&held, &counts, load);
        let mut score = Score::of(loads.iter().copied());
        loop {
            let mut best: Option<(Score, usize, usize)> = None;
            for e in 0..load.len() {
                for q in 0..ranks {
                    if free[q] == 0 || held[q][e] {
                        continue;
                    }
                    let candidate = Score::of(with_copy(&loads, &held, &counts, load, e, q));
                    if best
                        .as_ref()
                        .is_none_or(|(b, _, _)| candidate.better_than(b))
                    {
                        best = Some((candidate, e, q));
                    }
                }
            }
            let Some((candidate, e, q)) = best.filter(|(c, _, _)| c.better_than(&score)) else {
                break;
            };
            loads = with_copy(&loads, &held, &counts, load, e, q).collect();
            score = candidate;
            replicas[q * redundant + (redundant - free[q])] = Some(e);
            free[q] -= 1;
            held[q][e] = true;
            counts[e] += 1;
        }
        Self::new(ranks, load.len(), redundant, replicas)
    }

    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// Routed experts of the layer.
    pub fn experts(&self) -> usize {
        self.copies.len()
    }

    /// Primary experts per rank.
    pub fn primaries_per_rank(&self) -> usize {
        self.per
    }

    /// Replica slots per rank.
    pub fn redundant(&self) -> usize {
        self.redundant
    }

    /// Slots per rank: its primaries, then its replica slots.
    pub fn slots_per_rank(&self) -> usize {
        self.per + self.redundant
    }

    /// The replicas, rank-major (`redundant` per rank; `None`: empty).
    pub fn replicas(&self) -> &[Option<usize>] {
        &self.replicas
    }

    /// Rank `rank`'s replica slots.
    pub fn replicas_of(&self, rank: usize) -> &[Option<usize>] {
        &self.replicas[rank * self.redundant..(rank + 1) * self.redundant]
    }

    /// The expert in rank `rank`'s slot `slot` (primaries first).
    pub fn slot_expert(&self, rank: usize, slot: usize) -> Option<usize> {
        if slot < self.per {
            Some(rank * self.per + slot)
        } else {
            self.replicas[rank * self.redundant + slot - self.per]
        }
    }

    /// Copies of expert `e` (its primary included).
    pub fn copies(&self, e: usize) -> usize {
        self.copies[e].len()
    }

    /// The physical slot (`rank · slots_per_rank + slot`) that computes the
    /// `i`-th row rank `source` routes to expert `e`: its copies take turns,
    /// each source starting at a different one, so every copy gets an even
    /// share of every source's rows (to within one).
    pub fn physical_slot(&self, e: usize, i: usize, source: usize) -> usize {
        let copies = &self.copies[e];
        copies[(i + source) % copies.len()]
    }

    /// Each rank's expected rows for `load` rows per expert (each expert's
    /// rows split evenly over its copies).
    pub fn rank_loads(&self, load: &[u64]) -> Vec<f64> {
        let mut out = vec![0.0; self.ranks];
        for (e, slots) in self.copies.iter().enumerate() {
            let share = load[e] as f64 / slots.len() as f64;
            for &slot in slots {
                out[slot / self.slots_per_rank()] += share;
            }
        }
        out
    }

    /// The busiest rank's expected rows over the mean's (1: perfectly even;
    /// also 1 without load): what the whole replica waits for in a step.
    pub fn imbalance(&self, load: &[u64]) -> f64 {
        imbalance(&self.rank_loads(load))
    }
}

/// Max over mean of `loads` (1 when they are all zero).
pub fn imbalance(loads: &[f64]) -> f64 {
    let total: f64 = loads.iter().sum();
    if total <= 0.0 {
        return 1.0;
    }
    let max = loads.iter().copied().fold(0.0, f64::max);
    max * loads.len() as f64 / total
}

/// Rank loads when rank `q` holds `held[q]` and expert `e` has `counts[e]` copies.
fn expected_loads(held: &[Vec<bool>], counts: &[usize], load: &[u64]) -> Vec<f64> {
    held.iter()
        .map(|experts| {
            experts
                .iter()
                .enumerate()
                .filter(|&(_, &h)| h)
                .map(|(e, _)| load[e] as f64 / counts[e] as f64)
                .sum()
        })
        .collect()
}

/// `loads` after one more copy of expert `e`, on rank `q`, rank by rank:
/// its holders' shares shrink, `q` gains one. Lazy, so the greedy scores
/// every candidate without building its loads.
fn with_copy<'a>(
    loads: &'a [f64],
    held: &'a [Vec<bool>],
    counts: &[usize],
    load: &[u64],
    e: usize,
    q: usize,
) -> impl Iterator<Item = f64> + 'a {
    let rows = load[e] as f64;
    let (before, after) = (rows / counts[e] as f64, rows / (counts[e] + 1) as f64);
    loads
        .iter()
        .zip(held)
        .enumerate()
        .map(move |(r, (&l, rank))| {
            let shrunk = if rank[e] { after - before } else { 0.0 };
            let gained = if r == q { after } else { 0.0 };
            l + shrunk + gained
        })
}

/// How good a set of rank loads is: lower maximum first, then a lower sum
/// of squares (more even below the maximum).
#[derive(Clone, Debug)]
struct Score {
    max: f64,
    squares: f64,
}

impl Score {
    fn of(loads: impl IntoIterator<Item = f64>) -> Self {
        loads.into_iter().fold(
            Self {
                max: 0.0,
                squares: 0.0,
            },
            |s, l| Self {
                max: s.max.max(l),
                squares: s.squares + l * l,
            },
        )
    }

    /// Strictly better, ignoring differences within rounding (so a copy
    /// that changes nothing is not taken).
    fn better_than(&self, other: &Self) -> bool {
        let below = |a: f64, b: f64| a < b - 1e-9 * b.abs().max(1.0);
        below(self.max, other.max)
            || (!below(other.max, self.max) && below(self.squares, other.squares))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row of expert `e`'s load is computed somewhere it is held.
    fn check_consistent(p: &ExpertPlacement) {
        for e in 0..p.experts() {
            for source in 0..p.ranks() {
                for i in 0..2 * p.copies(e) {
                    let slot = p.physical_slot(e, i, source);
                    let (rank, j) = (slot / p.slots_per_rank(), slot % p.slots_per_rank());
                    assert_eq!(p.slot_expert(rank, j), Some(e), "slot {slot} holds {e}");
                }
            }
        }
    }

    #[test]
    fn without_load_no_slot_is_filled() {
        let p = ExpertPlacement::balanced(&[0; 8], 4, 2).unwrap();
        assert_eq!(p, ExpertPlacement::primaries(4, 8, 2).unwrap());
        assert!(p.replicas().iter().all(Option::is_none));
        assert_eq!(p.imbalance(&[0; 8]), 1.0);
        check_consistent(&p);
    }

    #[test]
    fn a_hot_expert_is_copied_and_the_ranks_even_out() {
        // Rank 0 owns experts 0, 1; rank 1 owns 2, 3. Expert 0 is hot.
        let load = [100, 10, 10, 10];
        let before = ExpertPlacement::primaries(2, 4, 1).unwrap();
        assert_eq!(before.rank_loads(&load), vec![110.0, 20.0]);
        let p = ExpertPlacement::balanced(&load, 2, 1).unwrap();
        // Expert 0 goes to rank 1 (110, 20 → 60, 70); then rank 0's slot
        // takes a rank-1 expert, halving it (→ 65, 65).
        assert_eq!(p.replicas(), &[Some(2), Some(0)]);
        assert_eq!(p.rank_loads(&load), vec![65.0, 65.0]);
        assert!((p.imbalance(&load) - 1.0).abs() < 1e-12);
        assert!(before.imbalance(&load) > 1.69);
        check_consistent(&p);
    }

    #[test]
    fn copies_that_would_not_help_are_not_made() {
        // Even load: any copy raises some rank above the others.
        let p = ExpertPlacement::balanced(&[5; 8], 4, 1).unwrap();
        assert!(p.replicas().iter().all(Option::is_none));
    }

    #[test]
    fn no_rank_holds_two_copies_of_an_expert_and_no_expert_more_copies_than_ranks() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for round in 0..200 {
            let ranks = 2 + round % 4;
            let experts = ranks * (1 + round % 3);
            let redundant = 1 + round % 3;
            let load: Vec<u64> = (0..experts)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    // Skewed: a few heavy experts, many light ones.
                    (state % 1000).pow(3) / 1_000_000
                })
                .collect();
            let p = ExpertPlacement::balanced(&load, ranks, redundant).unwrap();
            check_consistent(&p);
            for q in 0..ranks {
                let mut seen: Vec<usize> = (0..p.slots_per_rank())
                    .filter_map(|j| p.slot_expert(q, j))
                    .collect();
                let n = seen.len();
                seen.sort_unstable();
                seen.dedup();
                assert_eq!(seen.len(), n, "rank {q} holds an expert twice: {p:?}");
            }
            for e in 0..experts {
                assert!(p.copies(e) <= ranks);
            }
            let before = ExpertPlacement::primaries(ranks, experts, redundant).unwrap();
            assert!(
                p.imbalance(&load) <= before.imbalance(&load) + 1e-12,
                "{load:?}: {} > {}",
                p.imbalance(&load),
                before.imbalance(&load)
            );
        }
    }

    /// The greedy against every way of filling the slots, on layers small
    /// enough to enumerate: a greedy need not find the best maximum in
    /// general, but on these (DeepSeek-style skew) it does.
    #[test]
    fn the_greedy_finds_the_best_placement_of_small_skewed_layers() {
        let cases: [(&[u64], usize, usize); 4] = [
            (&[100, 10, 10, 10], 2, 1),
            (&[90, 50, 5, 5, 30, 1], 3, 1),
            (&[400, 1, 1, 1, 1, 1, 1, 1], 4, 1),
            (&[60, 60, 1, 1, 1, 1], 3, 1),
        ];
        for (load, ranks, redundant) in cases {
            let greedy = ExpertPlacement::balanced(load, ranks, redundant).unwrap();
            let best = best_max(load, ranks, redundant);
            let got = greedy.rank_loads(load).into_iter().fold(0.0, f64::max);
            assert!(
                (got - best).abs() < 1e-9,
                "{load:?}: greedy {got}, best {best}"
            );
        }
    }

    /// The lowest expected maximum over every filling of the slots.
    fn best_max(load: &[u64], ranks: usize, redundant: usize) -> f64 {
        let slots = ranks * redundant;
        let choices = load.len() + 1;
        let mut best = f64::INFINITY;
        for code in 0..choices.pow(slots as u32) {
            let replicas: Vec<Option<usize>> = (0..slots)
                .map(|s| {
                    let c = code / choices.pow(s as u32) % choices;
                    (c < load.len()).then_some(c)
                })
                .collect();
            if let Ok(p) = ExpertPlacement::new(ranks, load.len(), redundant, replicas) {
                best = best.min(p.rank_loads(load).into_iter().fold(0.0, f64::max));
            }
        }
        best
    }

    /// A copy's loads, as the greedy updates them, equal the loads
    /// recomputed from scratch with the copy added.
    #[test]
    fn a_copys_loads_match_recomputing_them() {
        let load = [90u64, 50, 5, 5, 30, 1];
        let held = vec![
            vec![true, true, false, false, false, true],
            vec![false, false, true, true, false, false],
            vec![false, false, false, false, true, true],
        ];
        let counts = [1, 1, 1, 1, 1, 2];
        let loads = expected_loads(&held, &counts, &load);
        for e in 0..load.len() {
            for q in (0..3).filter(|&q| !held[q][e]) {
                let mut held_then = held.clone();
                held_then[q][e] = true;
                let mut counts_then = counts;
                counts_then[e] += 1;
                let want = expected_loads(&held_then, &counts_then, &load);
                let got: Vec<f64> = with_copy(&loads, &held, &counts, &load, e, q).collect();
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() < 1e-9, "{e} on {q}: {got:?} vs {want:?}");
                }
            }
        }
    }

    #[test]
    fn invalid_placements_are_refused() {
        assert!(ExpertPlacement::primaries(3, 8, 1).is_err());
        assert!(ExpertPlacement::new(2, 4, 1, vec![Some(4), None]).is_err());
        assert!(ExpertPlacement::new(2, 4, 1, vec![None]).is_err());
    }
}
