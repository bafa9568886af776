//! The fabric check (`parallelism.fabricCheck`): before training, every
//! rank of the gang exchanges a message with every other in an all-to-all
//! (the pattern of expert dispatch), one warm-up and [`TIMED`] timed
//! rounds, and the gang agrees on the slowest rank's time. A gang placed
//! on a degraded fabric (a link down, RDMA fallen back to TCP without a
//! word) then fails in seconds, naming its figure, instead of training for
//! days at a fraction of its speed.
//!
//! The figure is the bus bandwidth as NCCL's tests count it for an
//! all-to-all: `message bytes / time × (ranks − 1) / ranks`, comparable
//! across gang sizes (it approaches the per-rank link bandwidth). On NCCL
//! the message lives in device memory, so the figure is the fabric's and
//! not a host copy's.

use std::time::Instant;

use super::collective::Collective;
use super::error::DistError;

/// Timed rounds after the warm-up.
pub const TIMED: usize = 5;

/// What the check measured; every rank holds the same.
#[derive(Clone, Debug, PartialEq)]
pub struct FabricReport {
    pub ranks: usize,
    /// Bytes each rank sent per round (`message` rounded down to a multiple
    /// of the ranks).
    pub message_bytes: usize,
    /// The slowest rank's mean time per round.
    pub seconds: f64,
    /// Bus bandwidth in MB/s (10⁶ bytes).
    pub bus_mbps: f64,
}

impl FabricReport {
    fn new(ranks: usize, message_bytes: usize, seconds: f64) -> Self {
        let share = (ranks - 1) as f64 / ranks as f64;
        Self {
            ranks,
            message_bytes,
            seconds,
            bus_mbps: message_bytes as f64 / seconds.max(1e-9) * share / 1e6,
        }
    }

    /// `Err` with the sentence to exit on when the figure is under `floor` MB/s.
    pub fn check(&self, floor: Option<i64>) -> Result<(), String> {
        match floor {
            Some(floor) if self.bus_mbps < floor as f64 => Err(format!(
                "fabric check: all-to-all bus bandwidth {:.0} MB/s over {} ranks ({} bytes per rank, {:.3} ms per round) is below parallelism.fabricCheck.minAllToAllMBps ({floor})",
                self.bus_mbps,
                self.ranks,
                self.message_bytes,
                self.seconds * 1e3
            )),
            _ => Ok(()),
        }
    }
}

/// Measures the all-to-all of `message_bytes` per rank over `world` (every
/// rank calls it). The warm-up round's data is checked: rank `r` receives
/// from rank `p` bytes that say `p`, so a fabric that corrupts data fails
/// here too.
pub fn measure_all_to_all(
    world: &mut dyn Collective,
    message_bytes: usize,
) -> Result<FabricReport, DistError> {
    let ranks = world.size();
    let per_peer = (message_bytes / ranks).max(1);
    let seconds = time_rounds(world, per_peer)?;
    // Everyone waits for the slowest link: agree on the worst time.
    let mut worst = [seconds as f32];
    world.all_reduce_max(&mut worst)?;
    Ok(FabricReport::new(ranks, per_peer * ranks, worst[0] as f64))
}

/// Rank `rank`'s message: segment `p` (for rank `p`) says `rank`.
fn message(rank: usize, ranks: usize, per_peer: usize) -> Vec<u8> {
    vec![rank as u8; per_peer * ranks]
}

fn check_received(recv: &[u8], per_peer: usize) -> Result<(), DistError> {
    for (from, segment) in recv.chunks(per_peer).enumerate() {
        if let Some(at) = segment.iter().position(|&b| b != from as u8) {
            return Err(DistError::invalid(
                "fabric check",
                format!(
                    "byte {at} received from rank {from} is {}, not {}: the fabric corrupts data",
                    segment[at], from as u8
                ),
            ));
        }
    }
    Ok(())
}

/// This rank's mean time per timed round.
fn time_rounds(world: &mut dyn Collective, per_peer: usize) -> Result<f64, DistError> {
    #[cfg(feature = "cuda")]
    if let Some(nccl) = world.as_nccl() {
        return time_rounds_on_device(nccl, per_peer);
    }
    let (rank, ranks) = (world.rank(), world.size());
    let counts = vec![per_peer; ranks];
    let send = message(rank, ranks, per_peer);
    let mut recv = vec![0u8; send.len()];
    world.all_to_all_bytes(&send, &counts, &mut recv, &counts)?;
    check_received(&recv, per_peer)?;
    world.barrier()?;
    let started = Instant::now();
    for _ in 0..TIMED {
        world.all_to_all_bytes(&send, &counts, &mut recv, &counts)?;
    }
    Ok(started.elapsed().as_secs_f64() / TIMED as f64)
}

/// [`time_rounds`] between device buffers (each round is watched to its
/// end on the communicator's stream).
#[cfg(feature = "cuda")]
fn time_rounds_on_device(
    nccl: &mut super::nccl::NcclCollective,
    per_peer: usize,
) -> Result<f64, DistError> {
    let (rank, ranks) = (nccl.rank(), nccl.size());
    let counts = vec![per_peer; ranks];
    let stream = std::sync::Arc::clone(nccl.stream());
    let device = |e: moe_kernels::cudarc::driver::DriverError| {
        DistError::invalid("fabric check", e.to_string())
    };
    let send = stream
        .clone_htod(&message(rank, ranks, per_peer))
        .map_err(device)?;
    let mut recv = stream.alloc_zeros::<u8>(per_peer * ranks).map_err(device)?;
    nccl.all_to_all_device(&send, &counts, &mut recv, &counts)?;
    check_received(&stream.clone_dtoh(&recv).map_err(device)?, per_peer)?;
    nccl.barrier()?;
    let started = Instant::now();
    for _ in 0..TIMED {
        nccl.all_to_all_device(&send, &counts, &mut recv, &counts)?;
    }
    Ok(started.elapsed().as_secs_f64() / TIMED as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_bandwidth_counts_only_the_bytes_that_cross_the_fabric() {
        // 4 MB per rank in 1 ms, a quarter of it to itself: 3000 MB/s.
        let r = FabricReport::new(4, 4_000_000, 0.001);
        assert!((r.bus_mbps - 3000.0).abs() < 1e-6, "{r:?}");
        assert!(r.check(Some(3000)).is_ok() && r.check(Some(3001)).is_err());
    }

    #[test]
    fn a_corrupted_byte_is_named_with_its_sender() {
        let mut recv = [message(0, 3, 4), message(1, 3, 4), message(2, 3, 4)]
            .iter()
            .map(|m| m[..4].to_vec())
            .collect::<Vec<_>>()
            .concat();
        assert!(check_received(&recv, 4).is_ok());
        recv[6] = 7;
        let err = check_received(&recv, 4).unwrap_err().to_string();
        assert!(
            err.contains("byte 2 received from rank 1 is 7, not 1"),
            "{err}"
        );
    }
}
