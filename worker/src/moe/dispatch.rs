//! Dropless dispatch: the (token, k) assignments grouped by expert, so each
//! expert runs one dense batch over exactly the tokens routed to it.
//!
//! This is the layout expert parallelism sends across devices (all-to-all by
//! expert) and the one a grouped GEMM consumes; no token is ever dropped for
//! capacity.

use crate::memory::HeldBytes;
use crate::scalar::Scalar;

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

    /// The token rows of `slots` from `x: [tokens, hidden]`, one after
    /// another: an expert's input batch, or what a rank sends its owners.
    pub fn gather_rows<T: Copy>(
        &self,
        x: &[T],
        slots: impl Iterator<Item = usize>,
        hidden: usize,
    ) -> Vec<T> {
        let mut rows = Vec::new();
        for slot in slots {
            rows.extend_from_slice(token_row(x, self.token(slot), hidden));
        }
        rows
    }

    /// Adds each `(slot, row)`'s row into its token's row of `out`,
    /// multiplied by the slot's gate when `gates` are given (the combine
    /// step), in the iterator's order: by expert, so a token's experts in
    /// ascending order, as every path of the layer adds them.
    pub fn add_rows<'a, T: Scalar + 'a>(
        &self,
        out: &mut [T],
        rows: impl Iterator<Item = (usize, &'a [T])>,
        gates: Option<&[T]>,
    ) {
        for (slot, y) in rows {
            let out_row = token_row_mut(out, self.token(slot), y.len());
            match gates {
                Some(gates) => {
                    let gate = gates[slot];
                    for (o, &v) in out_row.iter_mut().zip(y) {
                        *o += gate * v;
                    }
                }
                None => {
                    for (o, &v) in out_row.iter_mut().zip(y) {
                        *o += v;
                    }
                }
            }
        }
    }

    /// The backward pass of the gated combine for each `(slot, y, dy)`:
    /// writes `dy = gate · dout_row` (the gradient of the expert's output
    /// row `y`) and returns d loss / d gate = `dout_row · y`, one per slot.
    pub fn gate_backward<'a, T: Scalar + 'a>(
        &self,
        rows: impl Iterator<Item = (usize, &'a [T], &'a mut [T])>,
        dout: &[T],
        gates: &[T],
    ) -> Vec<T> {
        rows.map(|(slot, y, dy)| {
            let dout_row = token_row(dout, self.token(slot), y.len());
            let gate = gates[slot];
            for (dyi, &d) in dy.iter_mut().zip(dout_row) {
                *dyi = gate * d;
            }
            dout_row.iter().zip(y).map(|(&d, &v)| d * v).sum()
        })
        .collect()
    }
}

fn token_row<T>(m: &[T], token: usize, hidden: usize) -> &[T] {
    &m[token * hidden..(token + 1) * hidden]
}

fn token_row_mut<T>(m: &mut [T], token: usize, hidden: usize) -> &mut [T] {
    &mut m[token * hidden..(token + 1) * hidden]
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
