//! The local launcher with real processes: this test binary re-runs itself
//! as each rank (the `rank_process` test, which does nothing unless the
//! launcher set `CHILD`). One rank exits mid-training; the launcher must
//! name it, and every other rank must exit non-zero by itself within the
//! collective timeout.

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use moe_worker::dist::launch::{
    LaunchReport, LocalLaunch, PEER_FAILED_EXIT_CODE, RankExit, free_local_port, launch,
};
use moe_worker::dist::{Collective, DistEnv, TcpCollective, TcpSetup};

/// Set on the rank processes; names the rank that dies ("none" for none).
const CHILD: &str = "MOE_DIST_TEST_DIE_RANK";
const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(2);
const DYING_EXIT_CODE: i32 = 7;

/// The rank process: ten all-reduces, checked; the dying rank exits after
/// the third. A collective failing because of a peer exits
/// [`PEER_FAILED_EXIT_CODE`], anything else 1, as the worker is to do.
#[test]
fn rank_process() {
    let Ok(die) = std::env::var(CHILD) else {
        return; // run by the test harness itself: not a rank
    };
    let fail = |what: String| -> ! {
        eprintln!("{what}");
        std::process::exit(1)
    };
    let env = DistEnv::from_env().unwrap_or_else(|e| fail(format!("bad env: {e}")));
    // As a pod would: listening on all interfaces, so the store must hand
    // out the address it saw each rank connect from.
    let setup = TcpSetup::from_env(&env, 1, Duration::from_secs(20), COLLECTIVE_TIMEOUT);
    let mut c =
        TcpCollective::connect(setup).unwrap_or_else(|e| fail(format!("rank {}: {e}", env.rank)));
    for step in 0..10 {
        if step == 3 && die == env.rank.to_string() {
            std::process::exit(DYING_EXIT_CODE);
        }
        let mut data = vec![(env.rank + step) as f32; 50_000];
        if let Err(e) = c.all_reduce_sum(&mut data) {
            eprintln!("rank {} step {step}: {e}", env.rank);
            std::process::exit(if e.is_peer_failure() {
                PEER_FAILED_EXIT_CODE
            } else {
                1
            });
        }
        let want: usize = (0..env.world_size).map(|r| r + step).sum();
        if data.iter().any(|&v| v != want as f32) {
            fail(format!("rank {} step {step}: wrong sum", env.rank));
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    // Done before the harness prints its summary: a rank's "test result"
    // line in the parent's output would be counted as the parent's
    // (tests/run.sh totals those lines), and could split the parent's own.
    std::process::exit(0);
}

fn run(ranks: usize, die: &str) -> LaunchReport {
    // What a pod with `ranks` GPUs sees: the launcher's environment.
    let coordinator = format!("127.0.0.1:{}", free_local_port().expect("free port"));
    let vars = [
        ("MOE_WORLD_SIZE", ranks.to_string()),
        ("MOE_PROCS_PER_NODE", ranks.to_string()),
        ("MOE_NODE_RANK", "0".to_string()),
        ("MOE_COORDINATOR", coordinator),
    ];
    let env = DistEnv::from_lookup(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()))
        .expect("launcher env");
    assert!(env.launcher);
    // Quiet: the harness prints nothing per test before it runs, so a rank
    // writes only whole lines ("running 1 test", its own errors).
    let args = [
        "rank_process",
        "--exact",
        "--nocapture",
        "--quiet",
        "--test-threads=1",
    ];
    let mut plan = LocalLaunch::from_env(
        &env,
        std::env::current_exe().expect("test binary path"),
        args.map(Into::into).to_vec(),
        COLLECTIVE_TIMEOUT + Duration::from_secs(3),
    );
    plan.env.push((CHILD.into(), die.into()));
    launch(&plan, &AtomicBool::new(false)).expect("launch")
}

#[test]
fn a_healthy_local_launch_succeeds_on_every_rank() {
    let report = run(3, "none");
    assert_eq!(
        report.exits,
        vec![RankExit::Exited(Some(0)); 3],
        "{}",
        report.summary()
    );
    assert_eq!(report.exit_code(), 0);
}

#[test]
fn the_launcher_names_the_rank_that_died_and_the_others_exit_non_zero_in_time() {
    let started = Instant::now();
    let report = run(3, "1");
    let took = started.elapsed();
    assert_eq!(
        report.first_failure,
        Some((1, RankExit::Exited(Some(DYING_EXIT_CODE)))),
        "{}",
        report.summary()
    );
    // The others noticed and exited non-zero themselves, as echoes of rank
    // 1's failure: not killed by the launcher, not 0.
    for r in [0, 2] {
        assert_eq!(
            report.exits[r],
            RankExit::Exited(Some(PEER_FAILED_EXIT_CODE)),
            "rank {r}: {}",
            report.summary()
        );
    }
    assert_eq!(report.exit_code(), DYING_EXIT_CODE);
    assert!(
        report
            .summary()
            .contains("rank 1 failed: it exited with code 7"),
        "{}",
        report.summary()
    );
    // Three steps of ~30 ms, then at most the collective timeout.
    assert!(took < Duration::from_secs(8), "took {took:?}");
}
