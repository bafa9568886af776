//! A `moe-worker train` process killed with SIGKILL mid-training (no signal
//! handler runs, no final checkpoint) and started again with the same
//! command resumes from its newest checkpoint and ends exactly where an
//! uninterrupted run ends: same final loss, same weights and optimizer state.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use moe_worker::checkpoint;
use serde_json::Value;

use crate::{config_json, logged_steps, scratch_dir, state};

const BINARY: &str = env!("CARGO_BIN_EXE_moe-worker");
const STEPS: u64 = 12;
const INTERVAL: u64 = 3;

fn config(dir: &Path) -> std::path::PathBuf {
    let mut config = config_json(dir);
    config["training"]["steps"] = STEPS.into();
    config["training"]["logIntervalSteps"] = 1.into();
    config["checkpoint"]["intervalSteps"] = INTERVAL.into();
    config["checkpoint"]["keep"] = 2.into();
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    path
}

fn command(config: &Path) -> Command {
    let mut command = Command::new(BINARY);
    command
        .args(["train", "--config"])
        .arg(config)
        .env("MOE_STATUS_ADDR", "off");
    command
}

fn run_to_end(config: &Path) -> (Value, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = command(config).output().unwrap();
    let stderr = String::from_utf8_lossy(&stderr).into_owned();
    assert!(status.success(), "{stderr}");
    (serde_json::from_slice(&stdout).unwrap(), stderr)
}

#[test]
fn a_run_killed_with_sigkill_resumes_and_ends_bit_identical() {
    let straight_dir = scratch_dir("sigkill-straight");
    let (straight, _) = run_to_end(&config(&straight_dir));
    assert_eq!(straight["steps"], STEPS);

    let dir = scratch_dir("sigkill-killed");
    let config = config(&dir);
    let mut child = command(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill between checkpoints, once the first one is complete and at least
    // one more step has run: the step(s) after it are lost and must be redone.
    let first_checkpoint = dir
        .join("checkpoints")
        .join(format!("step-{INTERVAL:08}"))
        .join("manifest.json");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let logged = logged_steps(&dir).len() as u64;
        if first_checkpoint.is_file() && logged > INTERVAL && !logged.is_multiple_of(INTERVAL) {
            break;
        }
        assert!(
            logged < STEPS - 1,
            "the run got too close to its end before the kill"
        );
        assert!(Instant::now() < deadline, "no checkpoint within 120 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL on Unix
    let killed = child.wait_with_output().unwrap();
    assert_eq!(killed.status.signal(), Some(9), "{:?}", killed.status);
    assert!(killed.stdout.is_empty(), "a killed run prints no summary");
    let before_kill = logged_steps(&dir);
    let last_logged = before_kill.last().unwrap().0;
    assert!(last_logged < STEPS);

    // Usually the checkpoint of the last multiple of INTERVAL; one a step
    // later if the kill raced a checkpoint to its end.
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
    assert!(
        (INTERVAL..=last_logged).contains(&resumed_from),
        "{}",
        newest.display()
    );

    let (resumed, stderr) = run_to_end(&config);
    // It resumed from the newest checkpoint written before the kill, not from scratch.
    let resume_line = stderr
        .lines()
        .find(|l| l.contains("resuming"))
        .unwrap_or_else(|| panic!("no resume logged:\n{stderr}"));
    assert!(
        resume_line.contains(&format!("step-{resumed_from:08}"))
            && resume_line.contains(&format!("step={resumed_from}")),
        "{resume_line}"
    );
    assert_eq!(resumed["steps"], STEPS);
    assert_eq!(
        resumed["finalLoss"].as_f64().unwrap().to_bits(),
        straight["finalLoss"].as_f64().unwrap().to_bits(),
        "final loss: resumed {} vs uninterrupted {}",
        resumed["finalLoss"],
        straight["finalLoss"]
    );
    assert_eq!(resumed["initialLoss"], straight["initialLoss"]);
    let final_checkpoint = format!("step-{STEPS:08}");
    assert!(
        state(&dir.join("checkpoints").join(&final_checkpoint))
            == state(&straight_dir.join("checkpoints").join(&final_checkpoint)),
        "weights, moments or selection biases differ"
    );
    // The steps redone after the kill repeat the first attempt's losses, and
    // every step's loss is the uninterrupted run's.
    let straight_losses: Vec<(u64, f64)> = logged_steps(&straight_dir);
    for (step, loss) in logged_steps(&dir) {
        let expected = straight_losses[step as usize - 1];
        assert_eq!((step, loss.to_bits()), (expected.0, expected.1.to_bits()));
    }
    let redone = last_logged - resumed_from;
    assert_eq!(logged_steps(&dir).len() as u64, STEPS + redone);
}
