//! `moe-worker train` as a two-rank data-parallel job on this machine, as
//! `moectl run --local` starts it: one process with `MOE_PROCS_PER_NODE=2`
//! launches the ranks. It trains what one process trains (within rounding);
//! when a rank is SIGKILLed the other exits 3 within the collective timeout,
//! the launcher names the dead rank, and rerunning resumes from the last
//! complete checkpoint and ends bit-identical to an uninterrupted run.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use moe_worker::checkpoint;
use moe_worker::dist::launch::free_local_port;
use serde_json::Value;

use crate::{config_json, logged_steps, scratch_dir, state};

const BINARY: &str = env!("CARGO_BIN_EXE_moe-worker");
const STEPS: u64 = 24;
const INTERVAL: u64 = 4;
/// Short, so a rank whose peer hangs (rather than dies) fails fast; a dead
/// peer's closed sockets fail it at once anyway.
const COLLECTIVE_TIMEOUT_SECONDS: u64 = 3;
/// Set on the launcher (and so inherited by its ranks) to find this test's
/// rank processes among the machine's.
const MARKER: &str = "MOE_TEST_DP_RUN";

fn config(dir: &Path, ranks: usize) -> PathBuf {
    let mut config = config_json(dir);
    config["training"]["steps"] = STEPS.into();
    config["training"]["globalBatchSize"] = 4.into();
    config["training"]["microBatchSize"] = 2.into();
    config["training"]["logIntervalSteps"] = 1.into();
    config["checkpoint"]["intervalSteps"] = INTERVAL.into();
    config["checkpoint"]["keep"] = 3.into();
    config["parallelism"]["processesPerNode"] = ranks.into();
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    path
}

/// What a pod (or `moectl run --local`) starts: the launcher of `ranks`
/// local ranks, tagged with `marker`.
fn command(config: &Path, ranks: usize, marker: &str) -> Command {
    let mut command = Command::new(BINARY);
    command
        .args(["train", "--config"])
        .arg(config)
        .env("MOE_STATUS_ADDR", "off")
        .env(MARKER, marker)
        .env(
            "MOE_COLLECTIVE_TIMEOUT_SECONDS",
            COLLECTIVE_TIMEOUT_SECONDS.to_string(),
        )
        .env("MOE_RENDEZVOUS_TIMEOUT_SECONDS", "30");
    if ranks > 1 {
        let port = free_local_port().unwrap();
        command
            .env("MOE_WORLD_SIZE", ranks.to_string())
            .env("MOE_PROCS_PER_NODE", ranks.to_string())
            .env("MOE_NODE_RANK", "0")
            .env("MOE_COORDINATOR", format!("127.0.0.1:{port}"));
    }
    command
}

fn run_to_end(config: &Path, ranks: usize) -> (Value, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = command(config, ranks, "run-to-end").output().unwrap();
    let stderr = String::from_utf8_lossy(&stderr).into_owned();
    assert!(status.success(), "{stderr}");
    let stdout = String::from_utf8(stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "one summary, rank 0's: {stdout}");
    (serde_json::from_str(&stdout).unwrap(), stderr)
}

#[test]
fn a_two_rank_local_run_trains_like_one_process_and_resumes_after_a_rank_dies() {
    // One process, and two ranks, each to the end.
    let alone_dir = scratch_dir("dp-alone");
    let (alone, _) = run_to_end(&config(&alone_dir, 1), 1);
    let straight_dir = scratch_dir("dp-straight");
    let (straight, stderr) = run_to_end(&config(&straight_dir, 2), 2);
    assert!(stderr.contains("all 2 local ranks succeeded"), "{stderr}");
    assert_eq!(straight["steps"], STEPS);
    // The same global batches: losses within rounding (see tests/dist_train.rs
    // for why not bit-exact), the first step's exactly.
    let (one, two) = (logged_steps(&alone_dir), logged_steps(&straight_dir));
    assert_eq!(one.len(), STEPS as usize);
    assert_eq!(two.len(), STEPS as usize, "only rank 0 writes metrics");
    assert_eq!(one[0].1.to_bits(), two[0].1.to_bits(), "step 1 loss");
    for ((step, a), (_, b)) in one.iter().zip(&two) {
        assert!((a - b).abs() / a < 1e-4, "step {step}: {a} vs {b}");
    }
    assert_eq!(alone["initialLoss"], straight["initialLoss"]);

    // Two ranks again; rank 1 is SIGKILLed after the first checkpoint.
    let dir = scratch_dir("dp-killed");
    let config = config(&dir, 2);
    let launcher = command(&config, 2, "killed")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let first_checkpoint = dir
        .join("checkpoints")
        .join(format!("step-{INTERVAL:08}"))
        .join("manifest.json");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !(first_checkpoint.is_file() && logged_steps(&dir).len() as u64 > INTERVAL) {
        assert!(Instant::now() < deadline, "no checkpoint within 120 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    let victim = crate::dist_support::rank_pid(MARKER, "killed", 1).expect("rank 1's process");
    // SAFETY: kill(2) reads no memory; `victim` is a live child of the launcher.
    assert_eq!(unsafe { libc::kill(victim, libc::SIGKILL) }, 0);
    let killed_at = Instant::now();
    let killed = launcher.wait_with_output().unwrap();
    let took = killed_at.elapsed();
    let stderr = String::from_utf8_lossy(&killed.stderr).into_owned();
    assert_ne!(killed.status.code(), Some(0), "{stderr}");
    assert!(killed.stdout.is_empty(), "a failed run prints no summary");
    assert!(
        stderr.contains("rank 1 failed: it was killed by a signal; then rank 0 exited with code 3"),
        "the launcher names the dead rank, and rank 0 exits 3 by itself:\n{stderr}"
    );
    assert!(
        took < Duration::from_secs(COLLECTIVE_TIMEOUT_SECONDS + 2),
        "rank 0 took {took:?} to notice"
    );
    eprintln!("the launcher exited {took:?} after rank 1 was killed");
    let last_logged = logged_steps(&dir).last().unwrap().0;
    assert!(
        last_logged < STEPS,
        "the kill came too late to test anything"
    );

    // Rerun: both ranks resume from the newest complete checkpoint and end
    // where the uninterrupted two-rank run ended, bit for bit.
    let newest = checkpoint::newest(&dir.join("checkpoints"))
        .unwrap()
        .unwrap();
    let resumed_from: u64 = newest
        .to_str()
        .unwrap()
        .rsplit("step-")
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((INTERVAL..=last_logged).contains(&resumed_from));
    let (resumed, stderr) = run_to_end(&config, 2);
    let resumes: Vec<&str> = stderr.lines().filter(|l| l.contains("resuming")).collect();
    assert_eq!(resumes.len(), 2, "both ranks resume:\n{stderr}");
    for line in resumes {
        assert!(line.contains(&format!("step={resumed_from}")), "{line}");
    }
    assert_eq!(resumed["steps"], STEPS);
    assert_eq!(resumed["finalLoss"], straight["finalLoss"]);
    let last = format!("step-{STEPS:08}");
    assert!(
        state(&dir.join("checkpoints").join(&last))
            == state(&straight_dir.join("checkpoints").join(&last)),
        "weights, moments or selection biases differ from the uninterrupted run"
    );
}

/// SIGTERM reaches the launcher only (as in a pod); it forwards it, the
/// ranks agree on a step, rank 0 checkpoints it, and everyone exits 0.
/// Rank 0 (a child of the launcher) leaves its last report as the pod's
/// termination message: the step and checkpoint it stopped at.
#[test]
fn sigterm_to_the_launcher_stops_both_ranks_at_one_step_with_a_checkpoint() {
    let dir = scratch_dir("dp-sigterm");
    let log = dir.join("termination-log");
    std::fs::write(&log, "").unwrap();
    let launcher = command(&config(&dir, 2), 2, "sigterm")
        .env("MOE_TERMINATION_LOG", &log)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while logged_steps(&dir).len() < 2 {
        assert!(Instant::now() < deadline, "no step logged within 120 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = i32::try_from(launcher.id()).unwrap();
    // SAFETY: kill(2) reads no memory; the launcher is not reaped yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let output = launcher.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let summary: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["interrupted"], true, "{summary}");
    let steps = summary["steps"].as_u64().unwrap();
    assert!(steps < STEPS, "stopped at {steps}");
    let newest = checkpoint::newest(&dir.join("checkpoints"))
        .unwrap()
        .unwrap();
    assert!(
        newest.ends_with(format!("step-{steps:08}")),
        "{}",
        newest.display()
    );
    assert!(stderr.contains("all 2 local ranks succeeded"), "{stderr}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&log).unwrap()).unwrap();
    assert_eq!(report["step"], steps, "{report}");
    assert_eq!(report["lastCheckpointStep"], steps, "{report}");
    assert_eq!(report["totalSteps"], STEPS, "{report}");
    assert_eq!(report["loss"], summary["finalLoss"], "{report}");
}

/// `parallelism.fabricCheck`: the ranks measure their all-to-all before
/// training. Above the floor they train; below it every rank exits 4 before
/// the first step, and the message (the figure and the floor) is what
/// Kubernetes will show as the container's termination message.
#[test]
fn a_fabric_below_its_floor_stops_the_gang_before_training_with_code_4() {
    let with_floor = |name: &str, floor: i64| {
        let dir = scratch_dir(name);
        let path = config(&dir, 2);
        let mut c: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        c["training"]["steps"] = 2.into();
        c["parallelism"]["fabricCheck"] =
            serde_json::json!({"messageMiB": 1, "minAllToAllMBps": floor});
        std::fs::write(&path, serde_json::to_vec(&c).unwrap()).unwrap();
        (dir, path)
    };
    // Loopback moves more than 1 MB/s: the check passes and says so.
    let (_, path) = with_floor("dp-fabric-ok", 1);
    let (summary, stderr) = run_to_end(&path, 2);
    assert_eq!(summary["steps"], 2, "{summary}");
    assert!(stderr.contains("fabric check: all-to-all"), "{stderr}");

    // No machine moves 10¹² MB/s.
    let (dir, path) = with_floor("dp-fabric-floor", 1_000_000_000_000);
    let log = dir.join("termination-log");
    std::fs::write(&log, "").unwrap();
    let out = command(&path, 2, "fabric-floor")
        .env("MOE_TERMINATION_LOG", &log)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    let message = std::fs::read_to_string(&log).unwrap();
    assert!(
        message.starts_with("rank ")
            && message.contains("fabric check: all-to-all bus bandwidth")
            && message.contains("over 2 ranks")
            && message.contains("below parallelism.fabricCheck.minAllToAllMBps (1000000000000)"),
        "{message}"
    );
    assert!(
        checkpoint::newest(&dir.join("checkpoints"))
            .unwrap()
            .is_none(),
        "nothing trained"
    );
}
