//! The fabric check (`parallelism.fabricCheck`) over a real TCP world of
//! threads on loopback: every rank agrees on one figure, and a floor above
//! it is refused with the figure in the message.

mod dist_support;

use dist_support::world;
use moe_worker::dist::preflight::{FabricReport, measure_all_to_all};

#[test]
fn every_rank_agrees_on_the_slowest_ranks_all_to_all_bandwidth() {
    // 1 MiB per rank over 3 ranks: 349525 bytes to each, itself included.
    let reports: Vec<FabricReport> = world(3, |mut c| measure_all_to_all(&mut c, 1 << 20).unwrap());
    let first = &reports[0];
    assert!(reports.iter().all(|r| r == first), "{reports:?}");
    assert_eq!((first.ranks, first.message_bytes), (3, 349_525 * 3));
    assert!(first.seconds > 0.0 && first.bus_mbps > 0.0, "{first:?}");
    // The figure is NCCL's all-to-all bus bandwidth, from the agreed time.
    let expected = first.message_bytes as f64 / first.seconds * (2.0 / 3.0) / 1e6;
    assert!(
        (first.bus_mbps - expected).abs() <= 1e-9 * expected,
        "{first:?}"
    );
    // Loopback moves far more than 1 MB/s, and never 10¹² MB/s.
    assert_eq!(first.check(Some(1)), Ok(()));
    assert_eq!(first.check(None), Ok(()));
    let refused = first.check(Some(1_000_000_000_000)).unwrap_err();
    assert!(
        refused.contains("over 3 ranks")
            && refused.contains("below parallelism.fabricCheck.minAllToAllMBps (1000000000000)"),
        "{refused}"
    );
}

#[test]
fn a_message_smaller_than_the_gang_still_sends_a_byte_to_each_rank() {
    let reports = world(4, |mut c| measure_all_to_all(&mut c, 2).unwrap());
    assert!(reports.iter().all(|r| r.message_bytes == 4), "{reports:?}");
}
