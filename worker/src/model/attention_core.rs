//! The core of a block's attention sublayer, between the projections: RoPE,
//! then causal attention over whole sequences, for one process or as one
//! rank of a Ulysses sequence-parallel group ([`SequenceParallel`]).
//!
//! A sequence-parallel rank projects and rotates only its slice of each
//! sequence (at the slice's true positions), switches q, k and v to the
//! head-sharded layout, attends over whole sequences for its heads, and
//! switches the output back; the backward pass mirrors it (`dout` to heads,
//! `dq`, `dk`, `dv` back to tokens). The projections, the residual and
//! everything else in the block stay token-wise on the slice.

use std::ops::Range;

use crate::dist::sequence_parallel::SequenceParallel;
use crate::model::block::BlockContext;
use crate::ops::attention::{self, AttentionShape, Qkv, QkvGrads};
use crate::scalar::Scalar;

/// A packed batch's documents, as attention and RoPE need them.
#[derive(Clone, Debug)]
pub(crate) struct PackedDocuments {
    /// Per token of the whole sequences, where its document starts in its
    /// sequence: attention sees whole sequences, under sequence parallelism too.
    starts: Vec<u32>,
    /// Per token this rank holds, its position in its document: RoPE
    /// turns it by that, as if the document were a sequence of its own.
    positions: Vec<u32>,
}

impl PackedDocuments {
    /// From the whole sequences' document `starts` (of `seq_len` tokens
    /// each), for a rank holding positions `here` of each sequence.
    pub(crate) fn new(starts: Vec<u32>, seq_len: usize, here: Range<usize>) -> Self {
        assert!(
            seq_len > 0 && starts.len().is_multiple_of(seq_len),
            "a document start per token of whole sequences"
        );
        // Documents follow one another: the CUDA flash kernels skip tiles
        // by a tile's first start, which holds only if starts never fall.
        assert!(
            starts
                .chunks_exact(seq_len)
                .all(|s| s.windows(2).all(|w| w[0] <= w[1])),
            "document starts never decrease along a sequence"
        );
        let positions = starts
            .chunks_exact(seq_len)
            .flat_map(|s| here.clone().map(move |p| p as u32 - s[p]))
            .collect();
        Self { starts, positions }
    }

    /// Per token of the whole sequences, where its document starts.
    pub(crate) fn starts(&self) -> &[u32] {
        &self.starts
    }

    /// Per token this rank holds, its position in its document.
    pub(crate) fn positions(&self) -> &[u32] {
        &self.positions
    }
}

/// What attention saw and produced.
pub(crate) struct Attended<T> {
    /// Queries, keys and values as attention saw them: rotated, and with
    /// sequence parallelism, this rank's heads of every token.
    pub q: Vec<T>,
    pub k: Vec<T>,
    pub v: Vec<T>,
    /// `[sequences, heads here, seq_len, seq_len]`.
    pub probs: Vec<T>,
    /// `[tokens here, heads, head_dim]`: this rank's tokens, every head.
    pub out: Vec<T>,
}

impl<T: Scalar> BlockContext<'_, T> {
    /// The shape attention runs at: whole sequences (the group's current
    /// length when split over ranks, else the batch's), this rank's heads.
    fn attention_shape(&self) -> AttentionShape {
        let sp = self.sequence.map_or(1, SequenceParallel::size);
        AttentionShape {
            seq_len: match self.sequence {
                Some(sp) => sp.seq_len(),
                None => self.sequences.seq_len(),
            },
            n_heads: self.config.heads / sp,
            n_kv_heads: self.config.kv_heads / sp,
            head_dim: self.config.head_dim(),
        }
    }

    /// Per token of the whole sequences, where its document starts (a
    /// packed batch's), for attention.
    fn document_starts(&self) -> Option<&[u32]> {
        self.documents.map(PackedDocuments::starts)
    }

    /// RoPE on this rank's tokens, at their positions in the sequence
    /// (in their documents, for a packed one).
    fn rotate(&self, x: &mut [T], heads: usize) {
        match (self.documents, self.sequence) {
            (Some(d), _) => self.rope.forward_positions(x, heads, d.positions()),
            (None, None) => self.rope.forward_at(x, heads, 0..self.sequences.seq_len()),
            (None, Some(sp)) => self.rope.forward_at(x, heads, sp.positions()),
        }
    }

    fn rotate_back(&self, dx: &mut [T], heads: usize) {
        match (self.documents, self.sequence) {
            (Some(d), _) => self.rope.backward_positions(dx, heads, d.positions()),
            (None, None) => self
                .rope
                .backward_at(dx, heads, 0..self.sequences.seq_len()),
            (None, Some(sp)) => self.rope.backward_at(dx, heads, sp.positions()),
        }
    }

    /// Rotates the projected `q: [tokens, heads, d]` and `k`, `v: [tokens,
    /// kv_heads, d]` of this rank's tokens and attends.
    pub(crate) fn attend(&self, mut q: Vec<T>, mut k: Vec<T>, v: Vec<T>) -> Attended<T> {
        let (heads, kv_heads, d) = (
            self.config.heads,
            self.config.kv_heads,
            self.config.head_dim(),
        );
        self.rotate(&mut q, heads);
        self.rotate(&mut k, kv_heads);
        let (q, k, v) = match self.sequence {
            None => (q, k, v),
            Some(sp) => (
                sp.to_heads(&q, heads, d),
                sp.to_heads(&k, kv_heads, d),
                sp.to_heads(&v, kv_heads, d),
            ),
        };
        let shape = self.attention_shape();
        let mut out = vec![T::ZERO; q.len()];
        let mut probs = vec![T::ZERO; shape.probs_len(q.len() / (shape.n_heads * d))];
        attention::forward(
            &mut out,
            &mut probs,
            Qkv {
                q: &q,
                k: &k,
                v: &v,
            },
            shape,
            self.document_starts(),
        );
        let out = match self.sequence {
            None => out,
            Some(sp) => sp.to_tokens(&out, heads, d),
        };
        Attended {
            q,
            k,
            v,
            probs,
            out,
        }
    }

    /// The backward pass of [`Self::attend`]: d q, k, v (before RoPE) of
    /// this rank's tokens from `dout: [tokens here, heads, d]`. `qkv` and
    /// `probs` are [`Attended`]'s.
    pub(crate) fn attend_backward(
        &self,
        qkv: Qkv<'_, T>,
        probs: &[T],
        dout: &[T],
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (heads, kv_heads, d) = (
            self.config.heads,
            self.config.kv_heads,
            self.config.head_dim(),
        );
        let dout_heads;
        let dout = match self.sequence {
            None => dout,
            Some(sp) => {
                dout_heads = sp.to_heads(dout, heads, d);
                &dout_heads
            }
        };
        let mut dq = vec![T::ZERO; qkv.q.len()];
        let mut dk = vec![T::ZERO; qkv.k.len()];
        let mut dv = vec![T::ZERO; qkv.v.len()];
        attention::backward(
            QkvGrads {
                q: &mut dq,
                k: &mut dk,
                v: &mut dv,
            },
            dout,
            qkv,
            probs,
            self.attention_shape(),
            self.document_starts(),
        );
        let (mut dq, mut dk, dv) = match self.sequence {
            None => (dq, dk, dv),
            Some(sp) => (
                sp.to_tokens(&dq, heads, d),
                sp.to_tokens(&dk, kv_heads, d),
                sp.to_tokens(&dv, kv_heads, d),
            ),
        };
        self.rotate_back(&mut dq, heads);
        self.rotate_back(&mut dk, kv_heads);
        (dq, dk, dv)
    }
}
