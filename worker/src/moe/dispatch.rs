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
    fn rows_move_between_tokens_and_slots() {
        // Two tokens, top-2, hidden 2: t0 -> (1, 0), t1 -> (1, 0).
        let dispatch = Dispatch::new(&[1, 0, 1, 0], 2, 2);
        let x = [1.0, 2.0, 3.0, 4.0];
        let order = [1, 3, 0, 2]; // expert 0's slots, then expert 1's
        let gathered = dispatch.gather_rows(&x, order.into_iter(), 2);
        assert_eq!(gathered, [1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]);
        // Gated combine: token t gets the gates of its slots times their rows.
        let rows = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0];
        let gates = [0.5, 0.25, 2.0, 1.0]; // by slot
        let pairs = || order.into_iter().zip(rows.chunks_exact(2));
        let mut out = [0.0; 4];
        dispatch.add_rows(&mut out, pairs(), Some(&gates));
        // t0: slot 1 (gate 0.25) row [10, 20], slot 0 (gate 0.5) row [50, 60];
        // t1: slot 3 (gate 1) row [30, 40], slot 2 (gate 2) row [70, 80].
        assert_eq!(out, [27.5, 35.0, 170.0, 200.0]);
        let mut sum = [1.0; 4];
        dispatch.add_rows(&mut sum, pairs(), None);
        assert_eq!(sum, [61.0, 81.0, 101.0, 121.0]);
        // The combine's backward: dy = gate * dout_row, d gate = dout_row . y.
        let dout = [1.0, -1.0, 2.0, 0.5];
        let mut dy = [0.0; 8];
        let triples = order
            .into_iter()
            .zip(rows.chunks_exact(2))
            .zip(dy.chunks_exact_mut(2))
            .map(|((slot, y), dy)| (slot, y, dy));
        let dgates = dispatch.gate_backward(triples, &dout, &gates);
        assert_eq!(dgates, [-10.0, 80.0, -10.0, 180.0]);
        assert_eq!(dy, [0.25, -0.25, 2.0, 0.5, 0.5, -0.5, 4.0, 1.0]);
    }

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
