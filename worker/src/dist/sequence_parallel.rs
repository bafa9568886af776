//! The communication side of Ulysses sequence parallelism (Jacobs et al.,
//! DeepSpeed-Ulysses, 2023): the `sp` ranks of a sequence-parallel group
//! each hold a contiguous slice of every sequence's tokens, and attention,
//! the one layer that mixes tokens, switches layouts with an all-to-all:
//!
//! ```text
//! rank r: [B, L, heads, d]  (its L = seq_len/sp tokens, every head)
//!    ─▶ all-to-all ─▶ [B, seq_len, heads/sp, d]  (every token, heads r·heads/sp..)
//!    ─▶ causal attention on whole sequences for those heads
//!    ─▶ all-to-all ─▶ [B, L, heads, d]
//! ```
//!
//! Everything else (embedding, norms, MLP/MoE, head, loss) is token-wise and
//! runs on the slice as it is, except the MoE layers' sequence-wise balance
//! loss, whose per-sequence routing statistics the group sums
//! ([`SequenceParallel::sum_over_group`]). The packing is pure ([`HeadSplit`]); the
//! exchange goes through the group's [`Collective`], with failures recorded
//! rather than returned, as [`super::expert_parallel`] does, since the
//! model's passes return values, not `Result`s.

use std::cell::{Cell, RefCell};
use std::ops::Range;

use super::collective::Collective;
use super::error::DistError;
use crate::moe::sequences::Sequences;
use crate::scalar::Scalar;

/// One rank's sequence-parallel group and the slice of each sequence it holds.
pub struct SequenceParallel {
    /// Numbered by slice: group rank `r` holds tokens `r·L..(r+1)·L` of
    /// every sequence and, inside attention, heads `r·heads/sp..`.
    group: RefCell<Box<dyn Collective>>,
    /// Tokens of the sequences now split: the model's `seqLen`, or less
    /// for a micro-batch cut to its longest conversation
    /// ([`Self::set_seq_len`]); always a multiple of the group's size.
    seq_len: Cell<usize>,
    /// The model's `seqLen`.
    max_len: usize,
    failure: RefCell<Option<DistError>>,
    /// Payload bytes this rank sent to other ranks in layout switches.
    bytes_sent: Cell<u64>,
    /// Payload bytes of this rank's sums in [`Self::sum_over_group`].
    bytes_summed: Cell<u64>,
}

impl SequenceParallel {
    /// `group` as [`super::layout::make_groups`] builds it; `seq_len` must
    /// split evenly over it.
    pub fn new(group: Box<dyn Collective>, seq_len: usize) -> Result<Self, DistError> {
        let size = group.size();
        if size == 0 || seq_len == 0 || !seq_len.is_multiple_of(size) {
            return Err(DistError::invalid(
                "sequence_parallel",
                format!("sequences of {seq_len} tokens do not split over {size} ranks"),
            ));
        }
        Ok(Self {
            group: RefCell::new(group),
            seq_len: Cell::new(seq_len),
            max_len: seq_len,
            failure: RefCell::new(None),
            bytes_sent: Cell::new(0),
            bytes_summed: Cell::new(0),
        })
    }

    /// Ranks in the sequence-parallel group.
    pub fn size(&self) -> usize {
        self.group.borrow().size()
    }

    /// This rank's position in the group: which slice it holds.
    pub fn rank(&self) -> usize {
        self.group.borrow().rank()
    }

    /// Tokens of a whole sequence (of the micro-batch now split).
    pub fn seq_len(&self) -> usize {
        self.seq_len.get()
    }

    /// Splits sequences of `len` tokens from now on (a micro-batch cut to
    /// its longest conversation; every rank of the group cuts the same
    /// batch alike): a multiple of the group's size, at most `seqLen`.
    pub fn set_seq_len(&self, len: usize) {
        assert!(
            len > 0 && len <= self.max_len && len.is_multiple_of(self.size()),
            "sequences of {len} tokens over {} ranks (seqLen {})",
            self.size(),
            self.max_len
        );
        self.seq_len.set(len);
    }

    /// Tokens of each sequence this rank holds.
    pub fn local_len(&self) -> usize {
        self.seq_len() / self.size()
    }

    /// The positions (within a sequence) of this rank's tokens: RoPE must
    /// rotate them by these, not by their index in the slice.
    pub fn positions(&self) -> Range<usize> {
        let l = self.local_len();
        self.rank() * l..(self.rank() + 1) * l
    }

    /// This rank's slice of every sequence of `batch` (whole sequences).
    pub fn local_tokens<V: Copy>(&self, batch: &[V]) -> Vec<V> {
        slice_sequences(batch, self.seq_len(), self.positions())
    }

    /// How many of this rank's tokens of each sequence are real, from each
    /// sequence's real tokens (the rest padding at its end).
    pub fn local_real(&self, real: &[usize]) -> Vec<usize> {
        Sequences::padded(self.seq_len(), real.to_vec())
            .slice(self.positions())
            .into_real()
    }

    /// Payload bytes sent to other ranks by layout switches so far.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.get()
    }

    /// Payload bytes of this rank's values summed over the group so far
    /// (the balance loss's routing statistics; what the wire carries
    /// depends on the collective's algorithm).
    pub fn bytes_summed(&self) -> u64 {
        self.bytes_summed.get()
    }

    /// The first exchange failure since the last call, if any.
    pub fn take_failure(&self) -> Result<(), DistError> {
        match self.failure.borrow_mut().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Sequence-sharded `[B, L, heads, d]` (this rank's tokens) to
    /// head-sharded `[B, seq_len, heads/sp, d]` (this rank's heads).
    pub fn to_heads<T: Scalar>(&self, x: &[T], heads: usize, head_dim: usize) -> Vec<T> {
        let split = self.split(x.len(), heads, head_dim);
        let received = self.exchange(&split.pack_tokens(x), split.chunk());
        split.unpack_heads(&received)
    }

    /// The inverse of [`Self::to_heads`]: `[B, seq_len, heads/sp, d]` back
    /// to `[B, L, heads, d]`.
    pub fn to_tokens<T: Scalar>(&self, y: &[T], heads: usize, head_dim: usize) -> Vec<T> {
        let split = self.split(y.len(), heads, head_dim);
        let received = self.exchange(&split.pack_heads(y), split.chunk());
        split.unpack_tokens(&received)
    }

    /// Sums `values` over the group in place, every rank ending with the
    /// same bits: how each sequence's routing statistics, taken by each
    /// rank over its slice, become the whole sequence's. Left as they are
    /// after a failure (recorded like the exchanges'; later ones skipped).
    pub fn sum_over_group(&self, values: &mut [f32]) {
        if self.failure.borrow().is_some() || self.size() == 1 {
            return;
        }
        let bytes = size_of_val(values) as u64;
        self.bytes_summed.set(self.bytes_summed.get() + bytes);
        if let Err(e) = self.group.borrow_mut().all_reduce_sum(values) {
            self.failure.borrow_mut().get_or_insert(e);
        }
    }

    /// Runs `f` on the group: how the device's layout switches
    /// (`crate::cuda::sequence_parallel`) exchange device buffers.
    pub fn with_group<R>(&self, f: impl FnOnce(&mut dyn Collective) -> R) -> R {
        f(self.group.borrow_mut().as_mut())
    }

    /// Whether an exchange has failed (later ones are skipped).
    pub fn failed(&self) -> bool {
        self.failure.borrow().is_some()
    }

    /// Records an exchange's failure; the first one is kept.
    pub fn record(&self, error: DistError) {
        self.failure.borrow_mut().get_or_insert(error);
    }

    /// Counts a layout switch sending `chunk` f32 to every other rank.
    pub fn count_sent(&self, chunk: usize) {
        let sent = (chunk * (self.size() - 1) * size_of::<f32>()) as u64;
        self.bytes_sent.set(self.bytes_sent.get() + sent);
    }

    /// The packing of a layout switch of a `[tokens or sequence, heads,
    /// head_dim]` tensor of `len` values on this rank.
    pub fn split(&self, len: usize, heads: usize, head_dim: usize) -> HeadSplit {
        HeadSplit::new(len, self.local_len(), self.size(), heads, head_dim)
    }

    /// An all-to-all of `chunk` values to and from every rank. Zeros after
    /// a failure (and every later exchange is skipped).
    fn exchange<T: Scalar>(&self, send: &[T], chunk: usize) -> Vec<T> {
        let size = self.size();
        if self.failure.borrow().is_some() {
            return vec![T::ZERO; send.len()];
        }
        if size == 1 {
            return send.to_vec();
        }
        self.count_sent(chunk);
        // The wire carries f32; training runs in f32, so this is exact there.
        let send: Vec<f32> = send.iter().map(|v| v.to_f64() as f32).collect();
        let mut recv = vec![0f32; send.len()];
        let counts = vec![chunk; size];
        let result = self
            .group
            .borrow_mut()
            .all_to_all(&send, &counts, &mut recv, &counts);
        match result {
            Ok(()) => recv
                .into_iter()
                .map(|v| T::from_f64(f64::from(v)))
                .collect(),
            Err(e) => {
                let mut failure = self.failure.borrow_mut();
                failure.get_or_insert(e);
                vec![T::ZERO; send.len()]
            }
        }
    }
}

/// Tokens `positions` of every sequence of `seq_len` in `batch`.
pub fn slice_sequences<V: Copy>(batch: &[V], seq_len: usize, positions: Range<usize>) -> Vec<V> {
    assert!(
        seq_len > 0 && batch.len().is_multiple_of(seq_len) && positions.end <= seq_len,
        "a batch of whole sequences"
    );
    batch
        .chunks_exact(seq_len)
        .flat_map(|sequence| &sequence[positions.clone()])
        .copied()
        .collect()
}

/// The packing of one layout switch (pure). With `p` ranks, `L` tokens
/// per slice and `hp = heads / p` heads per rank, both directions send
/// every rank one chunk of `B·L·hp·d` values:
///
/// - tokens → heads: rank `r` sends rank `j` its tokens' heads
///   `j·hp..(j+1)·hp`; from rank `s` it receives heads `r·hp..` of tokens
///   `s·L..(s+1)·L`, which it places at those positions.
/// - heads → tokens: the reverse, chunk for chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadSplit {
    sequences: usize,
    local_len: usize,
    parts: usize,
    heads: usize,
    head_dim: usize,
}

impl HeadSplit {
    /// For a tensor of `len` values on one rank (either layout holds
    /// `B·L·heads·d`); `heads` must split over the `parts` ranks.
    pub fn new(len: usize, local_len: usize, parts: usize, heads: usize, head_dim: usize) -> Self {
        assert!(
            parts > 0 && heads.is_multiple_of(parts) && local_len * heads * head_dim > 0,
            "{heads} heads do not split over {parts} sequence-parallel ranks"
        );
        let per_sequence = local_len * heads * head_dim;
        assert!(
            len.is_multiple_of(per_sequence),
            "not whole slices of [{local_len}, {heads}, {head_dim}]"
        );
        Self {
            sequences: len / per_sequence,
            local_len,
            parts,
            heads,
            head_dim,
        }
    }

    /// Values of one token's heads on one rank (`heads / parts · head_dim`):
    /// every packing moves whole pieces of this width.
    pub fn piece(&self) -> usize {
        self.span()
    }

    /// The four packings as gathers of pieces ([`Self::piece`] values):
    /// `out[i] = in[order[i]]`, piece by piece, in the order of
    /// [`Self::pack_tokens`], [`Self::unpack_heads`], [`Self::pack_heads`]
    /// and [`Self::unpack_tokens`]. Each is the packing itself applied to the
    /// pieces' indices (the same split with one-value pieces), so the device
    /// moves exactly what the CPU moves.
    pub fn piece_orders(&self) -> [Vec<usize>; 4] {
        let pieces = Self {
            heads: self.parts,
            head_dim: 1,
            ..*self
        };
        let indices: Vec<usize> = (0..self.sequences * self.local_len * self.parts).collect();
        [
            pieces.pack_tokens(&indices),
            pieces.unpack_heads(&indices),
            pieces.pack_heads(&indices),
            pieces.unpack_tokens(&indices),
        ]
    }

    /// Values sent to (and received from) each rank.
    pub fn chunk(&self) -> usize {
        self.sequences * self.local_len * self.heads * self.head_dim / self.parts
    }

    /// Values of one token's heads on one rank: `hp · d`.
    fn span(&self) -> usize {
        self.heads / self.parts * self.head_dim
    }

    /// `[B, L, heads, d]` into one chunk per destination rank `j` holding
    /// `[B, L, hp, d]` of heads `j·hp..`.
    pub fn pack_tokens<T: Copy>(&self, x: &[T]) -> Vec<T> {
        let (span, width) = (self.span(), self.heads * self.head_dim);
        let mut out = Vec::with_capacity(x.len());
        for j in 0..self.parts {
            for token in x.chunks_exact(width) {
                out.extend_from_slice(&token[j * span..(j + 1) * span]);
            }
        }
        out
    }

    /// Chunks from each source rank `s` (`[B, L, hp, d]` of tokens
    /// `s·L..`) into `[B, p·L, hp, d]`.
    pub fn unpack_heads<T: Copy>(&self, received: &[T]) -> Vec<T> {
        let (span, l) = (self.span(), self.local_len);
        let seq_len = l * self.parts;
        let mut out = Vec::with_capacity(received.len());
        for b in 0..self.sequences {
            for t in 0..seq_len {
                let (s, local) = (t / l, t % l);
                let at = s * self.chunk() + (b * l + local) * span;
                out.extend_from_slice(&received[at..at + span]);
            }
        }
        out
    }

    /// `[B, p·L, hp, d]` into one chunk per destination rank `s` holding
    /// `[B, L, hp, d]` of its tokens `s·L..`.
    pub fn pack_heads<T: Copy>(&self, y: &[T]) -> Vec<T> {
        let (span, l) = (self.span(), self.local_len);
        let seq_len = l * self.parts;
        let mut out = Vec::with_capacity(y.len());
        for s in 0..self.parts {
            for b in 0..self.sequences {
                let at = (b * seq_len + s * l) * span;
                out.extend_from_slice(&y[at..at + l * span]);
            }
        }
        out
    }

    /// Chunks from each source rank `j` (`[B, L, hp, d]` of heads `j·hp..`)
    /// into `[B, L, heads, d]`.
    pub fn unpack_tokens<T: Copy>(&self, received: &[T]) -> Vec<T> {
        let span = self.span();
        let tokens = self.sequences * self.local_len;
        let mut out = Vec::with_capacity(received.len());
        for token in 0..tokens {
            for j in 0..self.parts {
                let at = j * self.chunk() + token * span;
                out.extend_from_slice(&received[at..at + span]);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The piece orders, expanded to values, are the packings themselves.
    #[test]
    fn piece_orders_gather_what_the_packings_move() {
        for (sequences, local_len, parts, heads, head_dim) in [
            (2, 3, 3, 6, 2),
            (1, 4, 2, 4, 5),
            (3, 1, 4, 8, 1),
            (2, 2, 1, 3, 4),
        ] {
            let len = sequences * local_len * heads * head_dim;
            let split = HeadSplit::new(len, local_len, parts, heads, head_dim);
            let values: Vec<u32> = (0..len as u32).map(|v| v * 7 + 1).collect();
            let piece = split.piece();
            let expand = |order: &[usize], input: &[u32]| -> Vec<u32> {
                order
                    .iter()
                    .flat_map(|&p| input[p * piece..(p + 1) * piece].iter().copied())
                    .collect()
            };
            let [pack_tokens, unpack_heads, pack_heads, unpack_tokens] = split.piece_orders();
            let case = (sequences, local_len, parts, heads, head_dim);
            assert_eq!(
                expand(&pack_tokens, &values),
                split.pack_tokens(&values),
                "{case:?}"
            );
            assert_eq!(
                expand(&unpack_heads, &values),
                split.unpack_heads(&values),
                "{case:?}"
            );
            assert_eq!(
                expand(&pack_heads, &values),
                split.pack_heads(&values),
                "{case:?}"
            );
            assert_eq!(
                expand(&unpack_tokens, &values),
                split.unpack_tokens(&values),
                "{case:?}"
            );
        }
    }

    /// Value at (sequence b, position t, head h, element e) of a full tensor.
    fn value(b: usize, t: usize, h: usize, e: usize) -> u32 {
        (b * 1_000_000 + t * 1000 + h * 10 + e) as u32
    }

    /// Three ranks, two sequences of 6 tokens, 6 heads of width 2: packing
    /// and a simulated all-to-all give each rank its heads of every token,
    /// and the way back restores each rank's slice exactly.
    #[test]
    fn tokens_to_heads_and_back_on_simulated_ranks() {
        let (p, b_n, seq, heads, d) = (3, 2, 6, 6, 2);
        let l = seq / p;
        let slice = |r: usize| -> Vec<u32> {
            let mut v = Vec::new();
            for b in 0..b_n {
                for t in r * l..(r + 1) * l {
                    for h in 0..heads {
                        v.extend((0..d).map(|e| value(b, t, h, e)));
                    }
                }
            }
            v
        };
        let split = HeadSplit::new(slice(0).len(), l, p, heads, d);
        let chunk = split.chunk();
        let sent: Vec<Vec<u32>> = (0..p).map(|r| split.pack_tokens(&slice(r))).collect();
        // All-to-all: rank r receives chunk r of every rank's send, in rank order.
        let exchange = |sent: &[Vec<u32>]| -> Vec<Vec<u32>> {
            (0..p)
                .map(|r| {
                    (0..p)
                        .flat_map(|s| sent[s][r * chunk..(r + 1) * chunk].to_vec())
                        .collect()
                })
                .collect()
        };
        let by_heads: Vec<Vec<u32>> = exchange(&sent)
            .iter()
            .map(|r| split.unpack_heads(r))
            .collect();
        let hp = heads / p;
        for (r, got) in by_heads.iter().enumerate() {
            let mut want = Vec::new();
            for b in 0..b_n {
                for t in 0..seq {
                    for h in r * hp..(r + 1) * hp {
                        want.extend((0..d).map(|e| value(b, t, h, e)));
                    }
                }
            }
            assert_eq!(got, &want, "rank {r}: heads of every token");
        }
        let back: Vec<Vec<u32>> = exchange(
            &by_heads
                .iter()
                .map(|y| split.pack_heads(y))
                .collect::<Vec<_>>(),
        );
        for (r, received) in back.iter().enumerate() {
            assert_eq!(
                split.unpack_tokens(received),
                slice(r),
                "rank {r}: round trip"
            );
        }
    }

    #[test]
    fn a_rank_slices_every_sequence_at_its_positions() {
        let batch: Vec<u32> = (0..12).collect();
        assert_eq!(slice_sequences(&batch, 6, 2..4), [2, 3, 8, 9]);
        assert_eq!(slice_sequences(&batch, 6, 0..6), batch);
    }
}
