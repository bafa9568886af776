//! Dropless dispatch: the (token, k) assignments grouped by expert, so each
//! expert runs one dense batch over exactly the tokens routed to it.
//!
//! This is the layout expert parallelism sends across devices (all-to-all by
//! expert) and the one a grouped GEMM consumes; no token is ever dropped for
//! capacity.

use crate::memory::HeldBytes;

/// Assignments sorted by expert (a counting sort, so stable: tokens stay in order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dispatch {
    top_k: usize,
    /// `offsets[e]..offsets[e + 1]` indexes `slots` for expert `e`.
    offsets: Vec<usize>,
    /// Flat routing indices `token * top_k + j`: where the gate lives and,
    /// divided by `top_k`, the token.
    slots: Vec<usize>,
}

impl Dispatch {
    /// Groups `experts: [tokens, top_k]` (from [`crate::moe::routing::Routing`]) by expert.
    pub fn new(experts: &[usize], top_k: usize, n_experts: usize) -> Self {
        let mut offsets = vec![0; n_experts + 1];
        for &e in experts {
            offsets[e + 1] += 1;
        }
        for e in 0..n_experts {
            offsets[e + 1] += offsets[e];
        }
        let mut next = offsets.clone();
        let mut slots = vec![0; experts.len()];
        for (slot, &e) in experts.iter().enumerate() {
            slots[next[e]] = slot;
            next[e] += 1;
        }
        Self {
            top_k,
            offsets,
            slots,
        }
    }

    /// The flat routing indices (`token * top_k + j`) assigned to `expert`, by token.
    pub fn slots(&self, expert: usize) -> &[usize] {
        &self.slots[self.offsets[expert]..self.offsets[expert + 1]]
    }

    /// The token a flat routing index belongs to.
    pub fn token(&self, slot: usize) -> usize {
        slot / self.top_k
    }

    /// Tokens routed to each expert.
    pub fn load(&self) -> Vec<usize> {
        self.offsets.windows(2).map(|w| w[1] - w[0]).collect()
    }
}

impl HeldBytes for Dispatch {
    fn held_bytes(&self) -> usize {
        self.offsets.held_bytes() + self.slots.held_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::Dispatch;

    #[test]
    fn groups_assignments_by_expert_in_token_order() {
        // Three tokens, top-2: t0 -> (2, 0), t1 -> (0, 3), t2 -> (2, 3); expert 1 idle.
        let dispatch = Dispatch::new(&[2, 0, 0, 3, 2, 3], 2, 4);
        assert_eq!(dispatch.slots(0), [1, 2]);
        assert_eq!(dispatch.slots(1), [] as [usize; 0]);
        assert_eq!(dispatch.slots(2), [0, 4]);
        assert_eq!(dispatch.slots(3), [3, 5]);
        assert_eq!(
            dispatch
                .slots(3)
                .iter()
                .map(|&s| dispatch.token(s))
                .collect::<Vec<_>>(),
            [1, 2]
        );
        assert_eq!(dispatch.load(), [2, 0, 2, 2]);
    }
}
