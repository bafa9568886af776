//! The TCP backend: a full mesh of connections made at rendezvous, ring
//! all-reduce (reduce-scatter then all-gather), ring all-gather, pairwise
//! all-to-all, a pipelined chain broadcast and a dissemination barrier —
//! no operation funnels data through one rank.

mod connect;
mod mesh;

use std::sync::{Arc, Mutex, PoisonError};

pub use connect::TcpSetup;

use super::collective::{Collective, check_counts, check_own_count};
use super::error::DistError;
use super::schedule::{self, offsets};
use mesh::{Mesh, Op, OpKind, Payload};

/// Payloads travel in frames of at most this many bytes. Rings and the
/// broadcast chain forward each segment as soon as it arrives (every link
/// works at once, and summing overlaps the transfer), and buffers this small
/// are reused by the allocator instead of being mapped and faulted in afresh
/// (measured: 64 MiB all-reduce in one frame per step ran at a third of the
/// speed). Large enough that per-frame costs (a header, a channel send) vanish.
const SEGMENT: usize = 256 << 10;
const SEGMENT_FLOATS: usize = SEGMENT / size_of::<f32>();

/// A group of ranks over the TCP mesh (the world, or a sub-group of it).
pub struct TcpCollective {
    mesh: Arc<Mutex<Mesh>>,
    /// Global ranks, by group rank.
    members: Vec<usize>,
    /// This rank's group rank.
    rank: usize,
    /// [`schedule::group_id`] of `members`.
    id: u64,
}

impl TcpCollective {
    fn over(mesh: Arc<Mutex<Mesh>>, members: Vec<usize>, global_rank: usize) -> Option<Self> {
        let rank = members.iter().position(|&m| m == global_rank)?;
        Some(Self {
            id: schedule::group_id(&members),
            mesh,
            members,
            rank,
        })
    }

    /// Global ranks of this group's members, by group rank.
    pub fn members(&self) -> &[usize] {
        &self.members
    }

    /// Runs `body` as collective `kind`. Any failure aborts the mesh, so the
    /// peers' blocked reads fail now rather than at their timeouts.
    fn run<T>(
        &self,
        kind: OpKind,
        body: impl FnOnce(&mut Op, usize, usize) -> Result<T, DistError>,
    ) -> Result<T, DistError> {
        let mut mesh = self.mesh.lock().unwrap_or_else(PoisonError::into_inner);
        let result = mesh
            .begin(kind, self.id, &self.members)
            .and_then(|mut op| body(&mut op, self.rank, self.members.len()));
        if let Err(e) = &result
            && !matches!(e, DistError::Aborted { .. })
        {
            mesh.abort(e.to_string());
        }
        result
    }

    /// Ring all-reduce: reduce-scatter over balanced chunks, then all-gather.
    fn all_reduce(
        &self,
        kind: OpKind,
        data: &mut [f32],
        combine: fn(f32, f32) -> f32,
    ) -> Result<(), DistError> {
        let size = self.members.len();
        if size == 1 {
            return Ok(());
        }
        let bounds = offsets(&schedule::balanced_counts(data.len(), size));
        self.run(kind, |op, rank, size| {
            let mine = ring_reduce_scatter(op, rank, size, data, &bounds, combine)?;
            data[bounds[rank]..bounds[rank + 1]].copy_from_slice(&mine);
            let byte_bounds: Vec<usize> = bounds.iter().map(|b| b * size_of::<f32>()).collect();
            ring_all_gather(op, rank, size, bytemuck::cast_slice_mut(data), &byte_bounds)
        })
    }

    fn check_counts(&self, op: OpKind, counts: &[usize], total: usize) -> Result<(), DistError> {
        check_counts(op.name(), counts, self.members.len(), total)
    }
}

/// Ring reduce-scatter of `input` split at `bounds` (chunk `c` is
/// `bounds[c]..bounds[c+1]`): returns the sum of this rank's chunk. Each
/// segment is forwarded as soon as it is summed, so the ring is a pipeline.
fn ring_reduce_scatter(
    op: &mut Op,
    rank: usize,
    size: usize,
    input: &[f32],
    bounds: &[usize],
    combine: fn(f32, f32) -> f32,
) -> Result<Vec<f32>, DistError> {
    let chunk = |c: usize| &input[bounds[c]..bounds[c + 1]];
    let (left, right) = schedule::ring_neighbours(rank, size);
    let (first, _) = schedule::reduce_scatter_step(rank, size, 0);
    for segment in chunk(first).chunks(SEGMENT_FLOATS) {
        op.send(right, Payload::Floats(segment.to_vec()))?;
    }
    // The chunk received in each step but the last is sent on in the next,
    // so it needs a buffer the writer can own; the last step's is kept, so
    // it goes through one reused buffer straight into the result.
    for step in 0..size - 2 {
        let (_, recv) = schedule::reduce_scatter_step(rank, size, step);
        for mine in chunk(recv).chunks(SEGMENT_FLOATS) {
            let mut partial = op.recv_floats(left, mine.len())?;
            for (acc, value) in partial.iter_mut().zip(mine) {
                *acc = combine(*acc, *value);
            }
            op.send(right, Payload::Floats(partial))?;
        }
    }
    let (_, last) = schedule::reduce_scatter_step(rank, size, size - 2);
    debug_assert_eq!(last, rank, "the last step delivers this rank's own chunk");
    let mut reduced = Vec::with_capacity(chunk(last).len());
    let mut scratch = vec![0f32; SEGMENT_FLOATS.min(chunk(last).len())];
    for mine in chunk(last).chunks(SEGMENT_FLOATS) {
        let partial = &mut scratch[..mine.len()];
        op.recv_into(left, bytemuck::cast_slice_mut(partial))?;
        reduced.extend(
            partial
                .iter()
                .zip(mine)
                .map(|(acc, value)| combine(*acc, *value)),
        );
    }
    Ok(reduced)
}

/// Ring all-gather in place: this rank's chunk is already in `data`. Each
/// received segment is forwarded at once, as in [`ring_reduce_scatter`].
fn ring_all_gather(
    op: &mut Op,
    rank: usize,
    size: usize,
    data: &mut [u8],
    bounds: &[usize],
) -> Result<(), DistError> {
    let (left, right) = schedule::ring_neighbours(rank, size);
    let (own, _) = schedule::all_gather_step(rank, size, 0);
    for segment in data[bounds[own]..bounds[own + 1]].chunks(SEGMENT) {
        op.send(right, Payload::Bytes(segment.to_vec()))?;
    }
    for step in 0..size - 1 {
        let (_, recv) = schedule::all_gather_step(rank, size, step);
        let forward = step + 2 < size;
        for segment in data[bounds[recv]..bounds[recv + 1]].chunks_mut(SEGMENT) {
            op.recv_into(left, segment)?;
            if forward {
                op.send(right, Payload::Bytes(segment.to_vec()))?;
            }
        }
    }
    Ok(())
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.members.len()
    }

    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), DistError> {
        self.all_reduce(OpKind::AllReduce, data, |a, b| a + b)
    }

    fn all_reduce_max(&mut self, data: &mut [f32]) -> Result<(), DistError> {
        self.all_reduce(OpKind::AllReduceMax, data, f32::max)
    }

    fn reduce_scatter_sum(
        &mut self,
        input: &[f32],
        counts: &[usize],
        output: &mut [f32],
    ) -> Result<(), DistError> {
        let kind = OpKind::ReduceScatter;
        self.check_counts(kind, counts, input.len())?;
        check_own_count(kind.name(), "output", output.len(), counts[self.rank])?;
        if self.members.len() == 1 {
            output.copy_from_slice(input);
            return Ok(());
        }
        let bounds = offsets(counts);
        self.run(kind, |op, rank, size| {
            let mine = ring_reduce_scatter(op, rank, size, input, &bounds, |a, b| a + b)?;
            output.copy_from_slice(&mine);
            Ok(())
        })
    }

    fn all_gather_bytes(
        &mut self,
        input: &[u8],
        counts: &[usize],
        output: &mut [u8],
    ) -> Result<(), DistError> {
        let kind = OpKind::AllGather;
        self.check_counts(kind, counts, output.len())?;
        check_own_count(kind.name(), "input", input.len(), counts[self.rank])?;
        let bounds = offsets(counts);
        output[bounds[self.rank]..bounds[self.rank + 1]].copy_from_slice(input);
        if self.members.len() == 1 {
            return Ok(());
        }
        self.run(kind, |op, rank, size| {
            ring_all_gather(op, rank, size, output, &bounds)
        })
    }

    fn all_to_all_bytes(
        &mut self,
        send: &[u8],
        send_counts: &[usize],
        recv: &mut [u8],
        recv_counts: &[usize],
    ) -> Result<(), DistError> {
        let kind = OpKind::AllToAll;
        self.check_counts(kind, send_counts, send.len())?;
        self.check_counts(kind, recv_counts, recv.len())?;
        let me = self.rank;
        if send_counts[me] != recv_counts[me] {
            return Err(DistError::invalid(
                kind.name(),
                format!(
                    "this rank sends itself {} but expects {}",
                    send_counts[me], recv_counts[me]
                ),
            ));
        }
        let (out, inn) = (offsets(send_counts), offsets(recv_counts));
        recv[inn[me]..inn[me + 1]].copy_from_slice(&send[out[me]..out[me + 1]]);
        if self.members.len() == 1 {
            return Ok(());
        }
        self.run(kind, |op, rank, size| {
            for step in 1..size {
                let (to, from) = schedule::pairwise_step(rank, size, step);
                for segment in send[out[to]..out[to + 1]].chunks(SEGMENT) {
                    op.send(to, Payload::Bytes(segment.to_vec()))?;
                }
                for segment in recv[inn[from]..inn[from + 1]].chunks_mut(SEGMENT) {
                    op.recv_into(from, segment)?;
                }
            }
            Ok(())
        })
    }

    fn broadcast_bytes(&mut self, data: &mut [u8], root: usize) -> Result<(), DistError> {
        let kind = OpKind::Broadcast;
        let size = self.members.len();
        if root >= size {
            return Err(DistError::invalid(
                kind.name(),
                format!("root {root} in a group of {size}"),
            ));
        }
        if size == 1 {
            return Ok(());
        }
        self.run(kind, |op, rank, size| {
            let (from, to) = schedule::chain_links(rank, size, root);
            for segment in data.chunks_mut(SEGMENT) {
                if let Some(from) = from {
                    op.recv_into(from, segment)?;
                }
                if let Some(to) = to {
                    op.send(to, Payload::Bytes(segment.to_vec()))?;
                }
            }
            Ok(())
        })
    }

    fn barrier(&mut self) -> Result<(), DistError> {
        if self.members.len() == 1 {
            return Ok(());
        }
        self.run(OpKind::Barrier, |op, rank, size| {
            for (to, from) in schedule::barrier_rounds(rank, size) {
                op.send(to, Payload::Bytes(Vec::new()))?;
                op.recv_into(from, &mut [])?;
            }
            Ok(())
        })
    }

    fn set_timeout(&mut self, timeout: std::time::Duration) -> Result<(), DistError> {
        if timeout.is_zero() {
            return Err(DistError::invalid("set_timeout", "a zero timeout"));
        }
        self.mesh
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .set_timeout(timeout)
    }

    fn new_group(&self, ranks: &[usize]) -> Result<Box<dyn Collective>, DistError> {
        let size = self.members.len();
        let invalid = |detail: String| DistError::invalid("new_group", detail);
        if let Some(&bad) = ranks.iter().find(|&&r| r >= size) {
            return Err(invalid(format!("rank {bad} in a group of {size}")));
        }
        let mut seen = vec![false; size];
        for &r in ranks {
            if std::mem::replace(&mut seen[r], true) {
                return Err(invalid(format!("rank {r} listed twice")));
            }
        }
        let members: Vec<usize> = ranks.iter().map(|&r| self.members[r]).collect();
        let global = self.members[self.rank];
        let group = Self::over(Arc::clone(&self.mesh), members, global).ok_or_else(|| {
            invalid(format!(
                "rank {} is not in {ranks:?}; only members create a group",
                self.rank
            ))
        })?;
        Ok(Box::new(group))
    }
}
