//! Which ranks form which groups, from the job's parallel sizes (pure).
//!
//! The world of `nodes × processesPerNode` ranks is `dp × sp`: sequence
//! parallel groups are blocks of `sp` consecutive ranks, so the heaviest
//! traffic (an all-to-all per attention layer) stays inside a node when
//! `sp` divides `processesPerNode`. Expert parallel groups are blocks of
//! `ep` consecutive ranks, carved from the same world: for the MoE layer
//! every rank just holds different tokens, whether they differ by sequence
//! position (SP) or by sample (DP).
//!
//! Gradients are reduced over the ranks holding the same parameters:
//! dense parameters over the whole world (SP ranks hold the same weights and
//! see different tokens), expert parameters over the ranks at the same
//! position of every EP group.
//!
//! ```text
//! world 8, sp 2, ep 4:   ranks   0 1 | 2 3 | 4 5 | 6 7    sequence groups
//!                                0 1   2 3 | 4 5   6 7    expert groups
//!                        expert replicas {0,4} {1,5} {2,6} {3,7}
//! ```

use std::fmt;

use super::collective::Collective;
use super::error::DistError;

/// The parallel sizes, checked against each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    world: usize,
    sp: usize,
    ep: usize,
}

/// Sizes that do not fit together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayoutError(pub String);

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LayoutError {}

impl Layout {
    pub fn new(
        world: usize,
        sequence_parallel: usize,
        expert_parallel: usize,
    ) -> Result<Self, LayoutError> {
        let (sp, ep) = (sequence_parallel, expert_parallel);
        if world == 0 || sp == 0 || ep == 0 {
            return Err(LayoutError(format!(
                "world size {world}, sequence parallel {sp} and expert parallel {ep} must be positive"
            )));
        }
        for (name, size) in [("sequence parallel", sp), ("expert parallel", ep)] {
            if !world.is_multiple_of(size) {
                return Err(LayoutError(format!(
                    "{name} {size} does not divide the world size {world}"
                )));
            }
        }
        Ok(Self { world, sp, ep })
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Data-parallel degree: how many full sequences are processed at once.
    pub fn data_parallel(&self) -> usize {
        self.world / self.sp
    }

    /// The ranks splitting `rank`'s sequences.
    pub fn sequence_group(&self, rank: usize) -> Vec<usize> {
        block(rank, self.sp)
    }

    /// The ranks `rank` exchanges tokens with for its experts.
    pub fn expert_group(&self, rank: usize) -> Vec<usize> {
        block(rank, self.ep)
    }

    /// The ranks holding the same experts as `rank` (one per expert group):
    /// its expert gradients are averaged over these.
    pub fn expert_replicas(&self, rank: usize) -> Vec<usize> {
        (rank % self.ep..self.world).step_by(self.ep).collect()
    }

    /// Which of the `experts` experts (per layer) `rank` holds.
    pub fn local_experts(&self, rank: usize, experts: usize) -> std::ops::Range<usize> {
        let per_rank = experts / self.ep;
        let position = rank % self.ep;
        position * per_rank..(position + 1) * per_rank
    }
}

/// Consecutive blocks of `size` ranks: the one holding `rank`.
fn block(rank: usize, size: usize) -> Vec<usize> {
    let start = rank - rank % size;
    (start..start + size).collect()
}

/// The communicators one rank trains with.
pub struct Groups {
    pub sequence: Box<dyn Collective>,
    pub expert: Box<dyn Collective>,
    pub expert_replicas: Box<dyn Collective>,
}

/// Makes this rank's groups from the world communicator (creating a group
/// needs no communication over TCP; every member makes its own handle).
pub fn make_groups(world: &dyn Collective, layout: &Layout) -> Result<Groups, DistError> {
    let rank = world.rank();
    if world.size() != layout.world {
        return Err(DistError::invalid(
            "make_groups",
            format!(
                "a layout for {} ranks on a world of {}",
                layout.world,
                world.size()
            ),
        ));
    }
    Ok(Groups {
        sequence: world.new_group(&layout.sequence_group(rank))?,
        expert: world.new_group(&layout.expert_group(rank))?,
        expert_replicas: world.new_group(&layout.expert_replicas(rank))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Every family of groups partitions the world, each rank is in its own
    /// group, and an expert-replica group meets every expert group once.
    #[test]
    fn groups_partition_the_world_and_replicas_cross_every_expert_group() {
        for world in 1..=16 {
            for sp in (1..=world).filter(|s| world % s == 0) {
                for ep in (1..=world).filter(|e| world % e == 0) {
                    let layout = Layout::new(world, sp, ep).unwrap();
                    type Family = fn(&Layout, usize) -> Vec<usize>;
                    let families: [(Family, usize); 3] = [
                        (Layout::sequence_group, sp),
                        (Layout::expert_group, ep),
                        (Layout::expert_replicas, world / ep),
                    ];
                    for (family, size) in families {
                        let groups: BTreeSet<Vec<usize>> =
                            (0..world).map(|r| family(&layout, r)).collect();
                        let covered: Vec<usize> = groups.iter().flatten().copied().collect();
                        assert_eq!(
                            covered.len(),
                            world,
                            "world {world} sp {sp} ep {ep}: overlap"
                        );
                        assert_eq!(covered.iter().collect::<BTreeSet<_>>().len(), world);
                        for r in 0..world {
                            let g = family(&layout, r);
                            assert!(g.contains(&r) && g.len() == size);
                        }
                    }
                    for r in 0..world {
                        let replicas = layout.expert_replicas(r);
                        let expert_groups: BTreeSet<Vec<usize>> =
                            replicas.iter().map(|&q| layout.expert_group(q)).collect();
                        assert_eq!(expert_groups.len(), replicas.len());
                        for &q in &replicas {
                            assert_eq!(
                                layout.local_experts(q, 8 * ep),
                                layout.local_experts(r, 8 * ep)
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_documented_example_and_bad_sizes() {
        let l = Layout::new(8, 2, 4).unwrap();
        assert_eq!(l.sequence_group(5), [4, 5]);
        assert_eq!(l.expert_group(5), [4, 5, 6, 7]);
        assert_eq!(l.expert_replicas(5), [1, 5]);
        assert_eq!(l.local_experts(5, 16), 4..8);
        assert_eq!(l.data_parallel(), 4);
        assert!(
            Layout::new(6, 4, 1)
                .unwrap_err()
                .0
                .contains("sequence parallel 4 does not divide the world size 6")
        );
        assert!(
            Layout::new(6, 1, 4)
                .unwrap_err()
                .0
                .contains("expert parallel 4")
        );
        assert!(Layout::new(4, 0, 1).is_err());
    }
}
