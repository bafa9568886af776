//! The collective operations every backend provides (TCP and NCCL),
//! on host memory. Counts are per rank of the group, in elements (bytes for
//! the `_bytes` variants). Every call must be made by every rank of the group,
//! in the same order, with the same counts; a mismatch is detected and
//! reported, never summed into the wrong place.
//!
//! Every operation is bounded by the backend's collective timeout and
//! returns [`DistError`] — a dead, hung or misbehaving peer never blocks a
//! rank forever and never panics it. After an operation fails the
//! communicator (and every group made from it) is aborted: its remaining
//! peers fail fast instead of waiting out their own timeouts.

use super::error::DistError;

pub trait Collective: Send {
    /// This rank's index in the group, `0..size()`.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn size(&self) -> usize;

    /// Element-wise sum over all ranks, in place; every rank ends with
    /// bit-identical values, summed in an order that is the same every run.
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), DistError>;

    /// Element-wise maximum over all ranks, in place (FP8 amax histories
    /// must agree across data-parallel replicas, or their scales diverge).
    fn all_reduce_max(&mut self, data: &mut [f32]) -> Result<(), DistError>;

    /// Element-wise sum of `input` (`counts.iter().sum()` long, the same
    /// layout on every rank) over all ranks; rank `r` receives segment `r`
    /// (`counts[r]` elements) into `output`.
    fn reduce_scatter_sum(
        &mut self,
        input: &[f32],
        counts: &[usize],
        output: &mut [f32],
    ) -> Result<(), DistError>;

    /// Concatenates every rank's `input` (`counts[r]` bytes from rank `r`)
    /// into `output`, in rank order, on every rank.
    fn all_gather_bytes(
        &mut self,
        input: &[u8],
        counts: &[usize],
        output: &mut [u8],
    ) -> Result<(), DistError>;

    /// Rank `r` sends segment `p` of `send` (`send_counts[p]` bytes) to rank
    /// `p`, and receives `recv_counts[p]` bytes from rank `p` into segment `p`
    /// of `recv`. Counts may be uneven and zero ([`exchange_counts`] tells a
    /// rank how much it will receive).
    fn all_to_all_bytes(
        &mut self,
        send: &[u8],
        send_counts: &[usize],
        recv: &mut [u8],
        recv_counts: &[usize],
    ) -> Result<(), DistError>;

    /// Copies `root`'s `data` into every rank's `data` (same length everywhere).
    fn broadcast_bytes(&mut self, data: &mut [u8], root: usize) -> Result<(), DistError>;

    /// Returns once every rank of the group has called it.
    fn barrier(&mut self) -> Result<(), DistError>;

    /// Bounds every later collective of this communicator (for TCP, of every
    /// group sharing its connections). The bound counts from this rank's
    /// entry, so a peer arriving late counts against it: widen it around a
    /// step where one rank is known to be slow (rank 0 writing a checkpoint)
    /// rather than making every collective wait that long for a dead peer.
    fn set_timeout(&mut self, timeout: std::time::Duration) -> Result<(), DistError>;

    /// A sub-communicator over `ranks` (indices in this group, in the order
    /// that numbers the new group). Called by the members only; they must
    /// list the same ranks in the same order.
    fn new_group(&self, ranks: &[usize]) -> Result<Box<dyn Collective>, DistError>;

    /// The NCCL communicator behind this collective, if it is one: the
    /// device trainer then reduces its gradients where they are, on the
    /// GPU, instead of through host memory.
    #[cfg(feature = "cuda")]
    fn as_nccl(&mut self) -> Option<&mut crate::dist::nccl::NcclCollective> {
        None
    }

    /// [`Collective::all_gather_bytes`] of `f32`s.
    fn all_gather(
        &mut self,
        input: &[f32],
        counts: &[usize],
        output: &mut [f32],
    ) -> Result<(), DistError> {
        self.all_gather_bytes(
            bytemuck::cast_slice(input),
            &in_bytes(counts),
            bytemuck::cast_slice_mut(output),
        )
    }

    /// [`Collective::all_to_all_bytes`] of `f32`s.
    fn all_to_all(
        &mut self,
        send: &[f32],
        send_counts: &[usize],
        recv: &mut [f32],
        recv_counts: &[usize],
    ) -> Result<(), DistError> {
        self.all_to_all_bytes(
            bytemuck::cast_slice(send),
            &in_bytes(send_counts),
            bytemuck::cast_slice_mut(recv),
            &in_bytes(recv_counts),
        )
    }

    /// [`Collective::broadcast_bytes`] of `f32`s.
    fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<(), DistError> {
        self.broadcast_bytes(bytemuck::cast_slice_mut(data), root)
    }
}

fn in_bytes(counts: &[usize]) -> Vec<usize> {
    counts.iter().map(|c| c * size_of::<f32>()).collect()
}

/// Tells every rank how many elements each peer will send it in an
/// all-to-all whose send counts only the senders know (expert-parallel
/// dispatch): returns `recv_counts`.
pub fn exchange_counts(
    collective: &mut dyn Collective,
    send_counts: &[usize],
) -> Result<Vec<usize>, DistError> {
    let size = collective.size();
    if send_counts.len() != size {
        return Err(DistError::invalid(
            "exchange_counts",
            format!("{} send counts for {size} ranks", send_counts.len()),
        ));
    }
    let send: Vec<u8> = send_counts
        .iter()
        .flat_map(|&c| (c as u64).to_le_bytes())
        .collect();
    let mut recv = vec![0u8; send.len()];
    let eight = vec![8; size];
    collective.all_to_all_bytes(&send, &eight, &mut recv, &eight)?;
    Ok(recv
        .chunks_exact(8)
        .map(|b| {
            let mut word = [0u8; 8];
            word.copy_from_slice(b);
            u64::from_le_bytes(word) as usize
        })
        .collect())
}

/// Checks a split before any byte moves (every backend, so a mismatch reads
/// the same whichever one runs): one count per member of a group of `group`,
/// summing to the `total` the buffer holds.
pub fn check_counts(
    op: &'static str,
    counts: &[usize],
    group: usize,
    total: usize,
) -> Result<(), DistError> {
    if counts.len() != group {
        return Err(DistError::invalid(
            op,
            format!("{} counts for a group of {group}", counts.len()),
        ));
    }
    let sum: usize = counts.iter().sum();
    if sum != total {
        return Err(DistError::invalid(
            op,
            format!("counts sum to {sum} but the buffer holds {total}"),
        ));
    }
    Ok(())
}

/// Checks that this rank's own part (`what`: its input or output, `len`
/// elements) holds the count the split gives it.
pub fn check_own_count(
    op: &'static str,
    what: &str,
    len: usize,
    count: usize,
) -> Result<(), DistError> {
    if len != count {
        return Err(DistError::invalid(
            op,
            format!("{what} holds {len} but this rank's count is {count}"),
        ));
    }
    Ok(())
}
