//! Causal scaled dot-product attention with grouped-query heads (Ainslie et
//! al., 2023): `n_heads` query heads share `n_kv_heads` key/value heads, query
//! head `h` reading key/value head `h / (n_heads / n_kv_heads)`. Queries and
//! keys arrive already projected and rotated (see [`crate::ops::rope`]).
//!
//! Naive O(T^2) per head with the probabilities kept for the backward pass,
//! as in llm.c; a flash-style kernel is the CUDA backend's business.
//!
//! A packed sequence holds several documents (fine-tuning conversations,
//! [`crate::data::DataLoader`]): `documents` then gives each token the
//! position in its sequence where its document starts, and a query sees
//! only the keys from there to itself, never an earlier document's.

use crate::ops::vector::{axpy, dot};
use crate::scalar::Scalar;

/// Sequence and head layout. Tokens are whole sequences of `seq_len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub seq_len: usize,
    pub n_heads: usize,
    /// Must divide `n_heads`; equal to it is plain multi-head attention.
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    /// Sequences in a batch of `q: [tokens, n_heads, head_dim]`.
    fn sequences(&self, q_len: usize) -> usize {
        assert!(
            self.seq_len > 0
                && self.head_dim > 0
                && self.n_kv_heads > 0
                && self.n_heads.is_multiple_of(self.n_kv_heads),
            "attention shape {self:?}"
        );
        let sequence_width = self.seq_len * self.n_heads * self.head_dim;
        assert!(
            q_len.is_multiple_of(sequence_width),
            "queries are not whole sequences"
        );
        q_len / sequence_width
    }

    /// Lengths of one sequence's queries (and outputs), keys (and values)
    /// and probabilities.
    fn per_sequence(&self) -> (usize, usize, usize) {
        let tokens = self.seq_len;
        (
            tokens * self.n_heads * self.head_dim,
            tokens * self.n_kv_heads * self.head_dim,
            self.probs_len(tokens),
        )
    }

    /// Length of the stored probabilities: `[sequences, n_heads, seq_len, seq_len]`.
    pub fn probs_len(&self, tokens: usize) -> usize {
        tokens * self.n_heads * self.seq_len
    }
}

/// Queries `[tokens, n_heads, head_dim]`, keys and values `[tokens, n_kv_heads, head_dim]`.
#[derive(Clone, Copy, Debug)]
pub struct Qkv<'a, T> {
    pub q: &'a [T],
    pub k: &'a [T],
    pub v: &'a [T],
}

/// Gradient buffers shaped like [`Qkv`].
#[derive(Debug)]
pub struct QkvGrads<'a, T> {
    pub q: &'a mut [T],
    pub k: &'a mut [T],
    pub v: &'a mut [T],
}

/// Index helper: the start of (token, head) in a `[tokens, heads, head_dim]` tensor.
struct Layout {
    heads: usize,
    head_dim: usize,
}

impl Layout {
    fn at(&self, token: usize, head: usize) -> std::ops::Range<usize> {
        let start = (token * self.heads + head) * self.head_dim;
        start..start + self.head_dim
    }
}

/// `out: [tokens, n_heads, head_dim]` and the attention probabilities
/// `probs: [sequences, n_heads, seq_len, seq_len]` (zero above the
/// diagonal, and before each token's document's start: `documents`, per
/// token, `None` when each sequence is one document).
pub fn forward<T: Scalar>(
    out: &mut [T],
    probs: &mut [T],
    qkv: Qkv<'_, T>,
    shape: AttentionShape,
    documents: Option<&[u32]>,
) {
    let sequences = shape.sequences(qkv.q.len());
    check_lengths(&qkv, shape, sequences);
    check_documents(documents, shape, sequences);
    assert!(
        out.len() == qkv.q.len() && probs.len() == shape.probs_len(sequences * shape.seq_len),
        "attention output shapes"
    );
    let (q_len, kv_len, probs_len) = shape.per_sequence();
    // Sequences share nothing they write, and each is computed in one order
    // wherever it runs: across the pool with `--threads`, the same bits.
    let parts = out.chunks_mut(q_len).zip(probs.chunks_mut(probs_len));
    super::pool_map(parts.collect(), |b, (out, probs)| {
        let (q, kv) = (b * q_len..(b + 1) * q_len, b * kv_len..(b + 1) * kv_len);
        let qkv = Qkv {
            q: &qkv.q[q],
            k: &qkv.k[kv.clone()],
            v: &qkv.v[kv],
        };
        let starts = sequence_starts(documents, shape, b);
        forward_sequence(out, probs, qkv, shape, &starts);
    });
}

/// Sequence `b`'s first visible key per query: its document's start.
fn sequence_starts(documents: Option<&[u32]>, shape: AttentionShape, b: usize) -> Vec<usize> {
    let t = shape.seq_len;
    match documents {
        Some(starts) => starts[b * t..(b + 1) * t]
            .iter()
            .map(|&s| s as usize)
            .collect(),
        None => vec![0; t],
    }
}

fn check_documents(documents: Option<&[u32]>, shape: AttentionShape, sequences: usize) {
    if let Some(starts) = documents {
        assert_eq!(
            starts.len(),
            sequences * shape.seq_len,
            "a document start per token"
        );
        assert!(
            starts
                .chunks_exact(shape.seq_len)
                .all(|s| s.iter().enumerate().all(|(t, &start)| start as usize <= t)),
            "a token's document starts at or before it"
        );
    }
}

/// [`forward`] of one sequence: `out` and `q` hold its `[seq_len, n_heads,
/// head_dim]`, `k` and `v` its `[seq_len, n_kv_heads, head_dim]`, `probs`
/// its `[n_heads, seq_len, seq_len]`; query `t` sees keys `starts[t]..=t`.
fn forward_sequence<T: Scalar>(
    out: &mut [T],
    probs: &mut [T],
    qkv: Qkv<'_, T>,
    shape: AttentionShape,
    starts: &[usize],
) {
    let (t_len, hd) = (shape.seq_len, shape.head_dim);
    let (q_layout, kv_layout) = layouts(shape);
    let scale = T::ONE / T::from_usize(hd).sqrt();
    let group = shape.n_heads / shape.n_kv_heads;
    out.fill(T::ZERO);
    probs.fill(T::ZERO);
    for h in 0..shape.n_heads {
        let kv_head = h / group;
        for t in 0..t_len {
            let q = &qkv.q[q_layout.at(t, h)];
            let (first, row_start) = (starts[t], (h * t_len + t) * t_len);
            let row = &mut probs[row_start + first..row_start + t + 1];
            for (t2, p) in (first..).zip(row.iter_mut()) {
                *p = scale * dot(q, &qkv.k[kv_layout.at(t2, kv_head)]);
            }
            softmax_in_place(row);
            let out_row = &mut out[q_layout.at(t, h)];
            for (t2, &p) in (first..).zip(row.iter()) {
                let v = &qkv.v[kv_layout.at(t2, kv_head)];
                for (o, &vi) in out_row.iter_mut().zip(v) {
                    *o += p * vi;
                }
            }
        }
    }
}

/// Adds the gradients of `q`, `k` and `v` into `grads` given `dout`.
///
/// Per query row: `dp_j = dout . v_j`; through the softmax
/// `ds_j = p_j (dp_j - sum_i p_i dp_i)`; then `dq += scale ds_j k_j`,
/// `dk_j += scale ds_j q` and `dv_j += p_j dout`. Key/value gradients of a
/// shared head collect every query head in its group.
pub fn backward<T: Scalar>(
    grads: QkvGrads<'_, T>,
    dout: &[T],
    qkv: Qkv<'_, T>,
    probs: &[T],
    shape: AttentionShape,
    documents: Option<&[u32]>,
) {
    let sequences = shape.sequences(qkv.q.len());
    check_lengths(&qkv, shape, sequences);
    check_documents(documents, shape, sequences);
    assert!(
        dout.len() == qkv.q.len()
            && grads.q.len() == qkv.q.len()
            && grads.k.len() == qkv.k.len()
            && grads.v.len() == qkv.v.len()
            && probs.len() == shape.probs_len(sequences * shape.seq_len),
        "attention gradient shapes"
    );
    let (q_len, kv_len, probs_len) = shape.per_sequence();
    let grads = grads
        .q
        .chunks_mut(q_len)
        .zip(grads.k.chunks_mut(kv_len))
        .zip(grads.v.chunks_mut(kv_len));
    super::pool_map(grads.collect(), |b, ((dq, dk), dv)| {
        let (q, kv) = (b * q_len..(b + 1) * q_len, b * kv_len..(b + 1) * kv_len);
        let qkv_here = Qkv {
            q: &qkv.q[q.clone()],
            k: &qkv.k[kv.clone()],
            v: &qkv.v[kv],
        };
        backward_sequence(
            QkvGrads {
                q: dq,
                k: dk,
                v: dv,
            },
            &dout[q],
            qkv_here,
            &probs[b * probs_len..(b + 1) * probs_len],
            shape,
            &sequence_starts(documents, shape, b),
        );
    });
}

/// [`backward`] of one sequence, its slices laid out as in [`forward_sequence`].
fn backward_sequence<T: Scalar>(
    grads: QkvGrads<'_, T>,
    dout: &[T],
    qkv: Qkv<'_, T>,
    probs: &[T],
    shape: AttentionShape,
    starts: &[usize],
) {
    let (t_len, hd) = (shape.seq_len, shape.head_dim);
    let (q_layout, kv_layout) = layouts(shape);
    let scale = T::ONE / T::from_usize(hd).sqrt();
    let group = shape.n_heads / shape.n_kv_heads;
    let mut dscores = vec![T::ZERO; t_len];
    for h in 0..shape.n_heads {
        let kv_head = h / group;
        for t in 0..t_len {
            let (first, row_start) = (starts[t], (h * t_len + t) * t_len);
            let p_row = &probs[row_start + first..row_start + t + 1];
            let dout_row = &dout[q_layout.at(t, h)];
            let ds = &mut dscores[first..t + 1];
            for (t2, d) in (first..).zip(ds.iter_mut()) {
                *d = dot(dout_row, &qkv.v[kv_layout.at(t2, kv_head)]);
            }
            let projection: T = ds.iter().zip(p_row).map(|(&d, &p)| d * p).sum();
            for (d, &p) in ds.iter_mut().zip(p_row) {
                *d = scale * p * (*d - projection);
            }
            let q = &qkv.q[q_layout.at(t, h)];
            for (t2, (&d, &p)) in (first..).zip(ds.iter().zip(p_row)) {
                let kv = kv_layout.at(t2, kv_head);
                axpy(&mut grads.q[q_layout.at(t, h)], d, &qkv.k[kv.clone()]);
                axpy(&mut grads.k[kv.clone()], d, q);
                axpy(&mut grads.v[kv], p, dout_row);
            }
        }
    }
}

fn layouts(shape: AttentionShape) -> (Layout, Layout) {
    let q = Layout {
        heads: shape.n_heads,
        head_dim: shape.head_dim,
    };
    let kv = Layout {
        heads: shape.n_kv_heads,
        head_dim: shape.head_dim,
    };
    (q, kv)
}

fn check_lengths<T>(qkv: &Qkv<'_, T>, shape: AttentionShape, sequences: usize) {
    let kv_len = sequences * shape.seq_len * shape.n_kv_heads * shape.head_dim;
    assert!(
        qkv.k.len() == kv_len && qkv.v.len() == kv_len,
        "key/value shapes"
    );
}

/// Softmax of a row already holding the scores; the causal prefix is never empty.
fn softmax_in_place<T: Scalar>(row: &mut [T]) {
    let max = row.iter().fold(row[0], |m, &s| m.max(s));
    let mut sum = T::ZERO;
    for s in row.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    for s in row.iter_mut() {
        *s /= sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::rope::RopeTable;
    use crate::ops::testing::{assert_gradient, random};

    /// Two sequences of three tokens, four query heads sharing two key/value heads.
    const GQA: AttentionShape = AttentionShape {
        seq_len: 3,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 4,
    };
    const TOKENS: usize = 6;

    fn run(q: &[f64], k: &[f64], v: &[f64], shape: AttentionShape) -> (Vec<f64>, Vec<f64>) {
        let mut out = vec![0.0; q.len()];
        let mut probs = vec![0.0; shape.probs_len(q.len() / (shape.n_heads * shape.head_dim))];
        forward(&mut out, &mut probs, Qkv { q, k, v }, shape, None);
        (out, probs)
    }

    fn qkv_lengths(shape: AttentionShape) -> (usize, usize) {
        (
            TOKENS * shape.n_heads * shape.head_dim,
            TOKENS * shape.n_kv_heads * shape.head_dim,
        )
    }

    #[test]
    fn first_token_sees_only_itself_and_future_tokens_change_nothing_before_them() {
        let (q_len, kv_len) = qkv_lengths(GQA);
        let (q, k, v) = (random(q_len, 71), random(kv_len, 72), random(kv_len, 73));
        let (out, probs) = run(&q, &k, &v, GQA);
        let kv_width = GQA.n_kv_heads * GQA.head_dim;
        // Token 0 of each sequence: every head outputs its key/value head's v exactly.
        for b in 0..2 {
            for h in 0..GQA.n_heads {
                let v_row = &v[b * 3 * kv_width + (h / 2) * 4..][..4];
                assert_eq!(&out[(b * 3 * GQA.n_heads + h) * 4..][..4], v_row);
            }
        }
        // Probability rows sum to 1 over the causal prefix and are 0 beyond it.
        for (i, row) in probs.chunks_exact(3).enumerate() {
            let t = i % 3;
            assert!((row[..=t].iter().sum::<f64>() - 1.0).abs() < 1e-15);
            assert!(row[t + 1..].iter().all(|&p| p == 0.0));
        }
        // Changing the last token's key and value leaves the first two tokens' output alone.
        let (mut k2, mut v2) = (k.clone(), v.clone());
        for i in 2 * kv_width..3 * kv_width {
            k2[i] += 1.0;
            v2[i] -= 1.0;
        }
        let (out2, _) = run(&q, &k2, &v2, GQA);
        let q_width = GQA.n_heads * GQA.head_dim;
        assert_eq!(out2[..2 * q_width], out[..2 * q_width]);
        assert_ne!(
            out2[2 * q_width..3 * q_width],
            out[2 * q_width..3 * q_width]
        );
    }

    #[test]
    fn grouped_query_heads_equal_multi_head_with_repeated_key_value_heads() {
        let (q_len, kv_len) = qkv_lengths(GQA);
        let (q, k, v) = (random(q_len, 74), random(kv_len, 75), random(kv_len, 76));
        let repeat = |kv: &[f64]| -> Vec<f64> {
            kv.chunks_exact(4)
                .flat_map(|head| head.iter().chain(head).copied())
                .collect()
        };
        let mha = AttentionShape {
            n_kv_heads: 4,
            ..GQA
        };
        let (gqa_out, _) = run(&q, &k, &v, GQA);
        let (mha_out, _) = run(&q, &repeat(&k), &repeat(&v), mha);
        assert_eq!(gqa_out, mha_out);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (q_len, kv_len) = qkv_lengths(GQA);
        let (q, k, v) = (random(q_len, 77), random(kv_len, 78), random(kv_len, 79));
        let dout = random(q_len, 80);
        let loss = |q: &[f64], k: &[f64], v: &[f64]| {
            let (out, _) = run(q, k, v, GQA);
            out.iter().zip(&dout).map(|(a, b)| a * b).sum::<f64>()
        };
        let (_, probs) = run(&q, &k, &v, GQA);
        let (mut dq, mut dk, mut dv) = (vec![0.0; q_len], vec![0.0; kv_len], vec![0.0; kv_len]);
        let grads = QkvGrads {
            q: &mut dq,
            k: &mut dk,
            v: &mut dv,
        };
        backward(
            grads,
            &dout,
            Qkv {
                q: &q,
                k: &k,
                v: &v,
            },
            &probs,
            GQA,
            None,
        );
        assert_gradient("dq", &dq, &q, |x| loss(x, &k, &v));
        assert_gradient("dk", &dk, &k, |x| loss(&q, x, &v));
        assert_gradient("dv", &dv, &v, |x| loss(&q, &k, x));
    }

    /// RoPE on queries and keys, then attention: the composition the model
    /// uses, with the gradient carried back through the rotation.
    #[test]
    fn rotary_attention_backward_matches_finite_differences() {
        let (q_len, kv_len) = qkv_lengths(GQA);
        let (q, k, v) = (random(q_len, 81), random(kv_len, 82), random(kv_len, 83));
        let dout = random(q_len, 84);
        let rope = RopeTable::new(GQA.seq_len, GQA.head_dim, 10.0);
        let rotated = |q: &[f64], k: &[f64]| {
            let (mut q, mut k) = (q.to_vec(), k.to_vec());
            rope.forward(&mut q, GQA.n_heads);
            rope.forward(&mut k, GQA.n_kv_heads);
            (q, k)
        };
        let loss = |q: &[f64], k: &[f64]| {
            let (q, k) = rotated(q, k);
            let (out, _) = run(&q, &k, &v, GQA);
            out.iter().zip(&dout).map(|(a, b)| a * b).sum::<f64>()
        };
        let (q_rot, k_rot) = rotated(&q, &k);
        let (_, probs) = run(&q_rot, &k_rot, &v, GQA);
        let (mut dq, mut dk, mut dv) = (vec![0.0; q_len], vec![0.0; kv_len], vec![0.0; kv_len]);
        let grads = QkvGrads {
            q: &mut dq,
            k: &mut dk,
            v: &mut dv,
        };
        backward(
            grads,
            &dout,
            Qkv {
                q: &q_rot,
                k: &k_rot,
                v: &v,
            },
            &probs,
            GQA,
            None,
        );
        rope.backward(&mut dq, GQA.n_heads);
        rope.backward(&mut dk, GQA.n_kv_heads);
        assert_gradient("dq", &dq, &q, |x| loss(x, &k));
        assert_gradient("dk", &dk, &k, |x| loss(&q, x));
    }

    /// One sequence of 9 tokens packing three documents (4, 3 and 2 tokens),
    /// RoPE counting from each document's start: the output is each
    /// document's run as a sequence of its own, and the gradients (through
    /// the rotation) match central differences.
    #[test]
    fn packed_documents_attend_as_sequences_of_their_own() {
        let shape = AttentionShape { seq_len: 9, ..GQA };
        let lengths = [4, 3, 2];
        let starts: Vec<u32> = [0, 0, 0, 0, 4, 4, 4, 7, 7].to_vec();
        let positions: Vec<u32> = (0..9).map(|t| t - starts[t as usize]).collect();
        let (qw, kw) = (
            shape.n_heads * shape.head_dim,
            shape.n_kv_heads * shape.head_dim,
        );
        let (q, k, v) = (random(9 * qw, 91), random(9 * kw, 92), random(9 * kw, 93));
        let dout = random(9 * qw, 94);
        let rope = RopeTable::new(9, shape.head_dim, 10.0);
        let packed = |q: &[f64], k: &[f64], v: &[f64]| {
            let (mut q, mut k) = (q.to_vec(), k.to_vec());
            rope.forward_positions(&mut q, shape.n_heads, &positions);
            rope.forward_positions(&mut k, shape.n_kv_heads, &positions);
            let mut out = vec![0.0; q.len()];
            let mut probs = vec![0.0; shape.probs_len(9)];
            let qkv = Qkv { q: &q, k: &k, v };
            forward(&mut out, &mut probs, qkv, shape, Some(&starts));
            (out, probs, q, k)
        };
        let (out, probs, q_rot, k_rot) = packed(&q, &k, &v);
        let mut at = 0;
        for len in lengths {
            let alone = AttentionShape {
                seq_len: len,
                ..shape
            };
            let table = RopeTable::new(len, shape.head_dim, 10.0);
            let (mut q1, mut k1) = (
                q[at * qw..(at + len) * qw].to_vec(),
                k[at * kw..(at + len) * kw].to_vec(),
            );
            table.forward(&mut q1, shape.n_heads);
            table.forward(&mut k1, shape.n_kv_heads);
            let (want, _) = run(&q1, &k1, &v[at * kw..(at + len) * kw], alone);
            let got = &out[at * qw..(at + len) * qw];
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-12, "document at {at}: {g} vs {w}");
            }
            at += len;
        }
        let loss = |q: &[f64], k: &[f64], v: &[f64]| {
            let (out, ..) = packed(q, k, v);
            out.iter().zip(&dout).map(|(a, b)| a * b).sum::<f64>()
        };
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        let grads = QkvGrads {
            q: &mut dq,
            k: &mut dk,
            v: &mut dv,
        };
        let qkv = Qkv {
            q: &q_rot,
            k: &k_rot,
            v: &v,
        };
        backward(grads, &dout, qkv, &probs, shape, Some(&starts));
        rope.backward_positions(&mut dq, shape.n_heads, &positions);
        rope.backward_positions(&mut dk, shape.n_kv_heads, &positions);
        assert_gradient("dq", &dq, &q, |x| loss(x, &k, &v));
        assert_gradient("dk", &dk, &k, |x| loss(&q, x, &v));
        assert_gradient("dv", &dv, &v, |x| loss(&q, &k, x));
    }

    /// Forward and backward over 5 sequences in a pool of 3 threads give the
    /// bits of one thread: each sequence is computed whole, in one order,
    /// by whichever thread takes it.
    #[test]
    fn a_pool_of_threads_gives_the_bits_of_one() {
        let shape = AttentionShape { seq_len: 9, ..GQA };
        let tokens = 5 * shape.seq_len;
        let q_len = tokens * shape.n_heads * shape.head_dim;
        let kv_len = tokens * shape.n_kv_heads * shape.head_dim;
        let q: Vec<f32> = random(q_len, 1).iter().map(|&x| x as f32).collect();
        let k: Vec<f32> = random(kv_len, 2).iter().map(|&x| x as f32).collect();
        let v: Vec<f32> = random(kv_len, 3).iter().map(|&x| x as f32).collect();
        let dout: Vec<f32> = random(q_len, 4).iter().map(|&x| x as f32).collect();
        let pass = || {
            let qkv = Qkv {
                q: &q,
                k: &k,
                v: &v,
            };
            let mut out = vec![0.0; q_len];
            let mut probs = vec![0.0; shape.probs_len(tokens)];
            forward(&mut out, &mut probs, qkv, shape, None);
            let (mut dq, mut dk, mut dv) = (vec![0.0; q_len], vec![0.0; kv_len], vec![0.0; kv_len]);
            let grads = QkvGrads {
                q: &mut dq,
                k: &mut dk,
                v: &mut dv,
            };
            backward(grads, &dout, qkv, &probs, shape, None);
            [out, probs, dq, dk, dv].map(|x| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>())
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .expect("a pool of three");
        assert_eq!(pool.install(crate::ops::pool_threads), 3);
        let one = pass();
        assert!(
            one[0].iter().any(|&bits| bits != 0),
            "the outputs are not all zero"
        );
        for (name, (pooled, alone)) in ["out", "probs", "dq", "dk", "dv"]
            .iter()
            .zip(pool.install(pass).iter().zip(&one))
        {
            assert!(pooled == alone, "{name} differs between 3 threads and 1");
        }
    }
}
