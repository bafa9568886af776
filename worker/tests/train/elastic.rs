//! An elastic job (`parallelism.elastic`) as the operator runs it after
//! shrinking it: `moe-worker train` started as a gang of fewer nodes than
//! `parallelism.nodes` (the attempt's `MOE_WORLD_SIZE`) trains with the
//! config's global batch, checkpoints, and the whole gang resumes from that
//! checkpoint and ends where a run on every node all along ends (within
//! rounding: the ranks sum their gradients in another order).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use moe_worker::dist::launch::free_local_port;
use serde_json::Value;

use crate::{config_json, logged_steps, scratch_dir};

const BINARY: &str = env!("CARGO_BIN_EXE_moe-worker");
const STEPS: u64 = 12;
const INTERVAL: u64 = 4;

fn config(dir: &Path) -> PathBuf {
    let mut config = config_json(dir);
    config["training"]["steps"] = STEPS.into();
    config["training"]["globalBatchSize"] = 4.into();
    config["training"]["microBatchSize"] = 2.into();
    config["training"]["logIntervalSteps"] = 1.into();
    config["checkpoint"]["intervalSteps"] = INTERVAL.into();
    config["checkpoint"]["keep"] = 3.into();
    config["parallelism"] =
        serde_json::json!({"nodes": 2, "processesPerNode": 1, "elastic": {"minNodes": 1}});
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    path
}

/// The pods of an attempt of `nodes` nodes, one process each, as the
/// operator's environment starts them.
fn gang(config: &Path, nodes: usize) -> Vec<Child> {
    let coordinator = format!("127.0.0.1:{}", free_local_port().unwrap());
    (0..nodes)
        .map(|node| {
            Command::new(BINARY)
                .args(["train", "--config"])
                .arg(config)
                .env("MOE_STATUS_ADDR", "off")
                .env("MOE_WORLD_SIZE", nodes.to_string())
                .env("MOE_NODES", nodes.to_string())
                .env("MOE_PROCS_PER_NODE", "1")
                .env("MOE_NODE_RANK", node.to_string())
                .env("MOE_COORDINATOR", &coordinator)
                .env("MOE_RENDEZVOUS_TIMEOUT_SECONDS", "30")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

/// Every pod's exit; rank 0's summary and everyone's stderr.
fn finish(pods: Vec<Child>) -> (Value, String) {
    let mut summary = Value::Null;
    let mut stderr = String::new();
    for (node, pod) in pods.into_iter().enumerate() {
        let out = pod.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "node {node}: {err}");
        if node == 0 {
            summary = serde_json::from_slice(&out.stdout).unwrap();
        }
        stderr.push_str(&err);
    }
    (summary, stderr)
}

#[test]
fn a_shrunk_gang_trains_the_global_batch_and_the_whole_gang_resumes_from_its_checkpoint() {
    let whole_dir = scratch_dir("elastic-whole");
    let (whole, _) = finish(gang(&config(&whole_dir), 2));
    assert_eq!(whole["steps"], STEPS);

    // One node of two: it trains (it was refused before elastic), on the
    // same global batch, until stopped after its first checkpoint.
    let dir = scratch_dir("elastic-shrunk");
    let config = config(&dir);
    let mut shrunk = gang(&config, 1);
    let deadline = Instant::now() + Duration::from_secs(120);
    while (logged_steps(&dir).len() as u64) < INTERVAL + 1 {
        assert!(Instant::now() < deadline, "no checkpoint within 120 s");
        if let Some(status) = shrunk[0].try_wait().unwrap() {
            panic!("the one-node gang exited {status} before its first checkpoint");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = i32::try_from(shrunk[0].id()).unwrap();
    // SAFETY: kill(2) reads no memory; the process is not reaped yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let (stopped, stderr) = finish(std::mem::take(&mut shrunk));
    assert!(
        stderr.contains("training on fewer nodes than parallelism.nodes")
            && stderr.contains("of=2"),
        "{stderr}"
    );
    assert_eq!(stopped["interrupted"], true, "{stopped}");
    let stopped_at = stopped["steps"].as_u64().unwrap();
    assert!(
        (INTERVAL + 1..STEPS).contains(&stopped_at),
        "stopped at {stopped_at}"
    );
    // Its losses are the whole gang's, step for step, so far.
    let (one, two) = (logged_steps(&dir), logged_steps(&whole_dir));
    for ((step, a), (_, b)) in one.iter().zip(&two) {
        assert!((a - b).abs() / a < 1e-4, "step {step}: {a} vs {b}");
    }

    // The whole gang again: both nodes resume from the shrunk gang's
    // checkpoint and end where the whole gang ended.
    let (resumed, stderr) = finish(gang(&config, 2));
    let resumes: Vec<&str> = stderr.lines().filter(|l| l.contains("resuming")).collect();
    assert_eq!(resumes.len(), 2, "both nodes resume:\n{stderr}");
    for line in resumes {
        assert!(line.contains(&format!("step={stopped_at}")), "{line}");
    }
    assert_eq!(resumed["steps"], STEPS);
    let (a, b) = (
        resumed["finalLoss"].as_f64().unwrap(),
        whole["finalLoss"].as_f64().unwrap(),
    );
    assert!(
        (a - b).abs() / b < 1e-4,
        "final loss {a} vs the whole gang's {b}"
    );
}
