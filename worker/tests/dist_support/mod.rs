//! Shared by the parallel-training tests (`dist_train`,
//! `dist_expert_parallel`, `dist_sequence_parallel`) and expert-parallel
//! serving (`serve_expert_parallel`): ranks as threads of one TCP world on
//! loopback, and the comparison of a parallel run with one process.

#![allow(dead_code)] // each test file uses a different part

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;
use std::thread;
use std::time::Duration;

use moe_worker::dist::rendezvous::Store;
use moe_worker::dist::{TcpCollective, TcpSetup};
use moe_worker::train::StepReport;

/// Runs `body` on one thread per rank of a TCP world of `ranks`.
pub fn world<T: Send>(ranks: usize, body: impl Fn(TcpCollective) -> T + Sync) -> Vec<T> {
    world_with_timeout(ranks, Duration::from_secs(20), body)
}

/// [`world`] with every collective bounded by `collective_timeout`.
pub fn world_with_timeout<T: Send>(
    ranks: usize,
    collective_timeout: Duration,
    body: impl Fn(TcpCollective) -> T + Sync,
) -> Vec<T> {
    let store = Store::bind("127.0.0.1:0").expect("bind store");
    let coordinator: SocketAddr = store.local_addr().expect("store address");
    let store = Mutex::new(Some(store));
    thread::scope(|scope| {
        let handles: Vec<_> = (0..ranks)
            .map(|rank| {
                let setup = TcpSetup {
                    rank,
                    world_size: ranks,
                    attempt: 0,
                    config_hash: 1,
                    coordinator: coordinator.to_string(),
                    store: if rank == 0 {
                        store.lock().unwrap().take()
                    } else {
                        None
                    },
                    listen: "127.0.0.1:0".parse().unwrap(),
                    rendezvous_timeout: Duration::from_secs(20),
                    collective_timeout,
                };
                let body = &body;
                scope.spawn(move || body(TcpCollective::connect(setup).expect("connect")))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    })
}

/// Copies the files of `from` (a checkpoint directory) into `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// A named tensor as one rank holds it: `None` where the rank does not hold
/// the element.
pub type HeldTensor = (String, Vec<Option<f32>>);

/// Weights laid out as one process's, from what each rank holds (`None`
/// where it does not hold an element: the experts of other ranks). Every
/// element must be held by some rank, and ranks holding the same element
/// must agree to the bit.
pub fn assemble(held: &[&[HeldTensor]]) -> Vec<(String, Vec<f32>)> {
    let mut whole: Vec<(String, Vec<Option<f32>>)> = held[0]
        .iter()
        .map(|(n, t)| (n.clone(), vec![None; t.len()]))
        .collect();
    for (rank, weights) in held.iter().enumerate() {
        for ((name, acc), (_, values)) in whole.iter_mut().zip(weights.iter()) {
            for (i, (a, v)) in acc.iter_mut().zip(values).enumerate() {
                if let Some(v) = v {
                    if let Some(a) = a {
                        assert_eq!(
                            a.to_bits(),
                            v.to_bits(),
                            "rank {rank}: {name}[{i}] differs between holders"
                        );
                    }
                    *a = Some(*v);
                }
            }
        }
    }
    whole
        .into_iter()
        .map(|(n, t)| {
            let t = t
                .into_iter()
                .map(|v| v.expect("every weight is held by some rank"))
                .collect();
            (n, t)
        })
        .collect()
}

/// How far a parallel run ended from one process: relative loss gaps
/// (first step, worst step) and weight gaps as a share of Adam's budget
/// (the sum of the learning rates: how far any weight could move), RMS and
/// worst.
pub struct Drift {
    pub first_loss: f64,
    pub worst_loss: f64,
    pub rms: f64,
    pub worst: f64,
}

/// Compares a parallel run (`reports` of every rank, `got`: its weights
/// assembled as one process lays them out) with one process (`one`,
/// `want`), asserting the tolerances every parallelism is held to
/// (docs/distributed.md): every rank reports the same steps; the same tokens
/// and expert loads per step; the first step's loss to the bit (same tokens,
/// same weights, same rows); losses within 1e-5 relative; weights within an
/// RMS of 1e-3 and a worst of 5% of Adam's budget. The forward passes
/// compute the same rows, but gradients are summed in another grouping, so
/// the runs differ by rounding, which Adam amplifies for small gradients.
pub fn compare(
    what: &str,
    one: &[StepReport],
    ranks: &[&[StepReport]],
    got: &[(String, Vec<f32>)],
    want: &[(String, Vec<f32>)],
) -> Drift {
    compare_within(what, one, ranks, got, want, 0.0)
}

/// [`compare`], the first step's losses within `first_loss` relative (0:
/// bit-equal): a loss weighted by a share that is no power of two (fine-
/// tuning's mean over its trained targets) is summed in another order.
pub fn compare_within(
    what: &str,
    one: &[StepReport],
    ranks: &[&[StepReport]],
    got: &[(String, Vec<f32>)],
    want: &[(String, Vec<f32>)],
    first_loss_tolerance: f64,
) -> Drift {
    for (rank, reports) in ranks.iter().enumerate() {
        assert_eq!(*reports, ranks[0], "{what} rank {rank}: reports");
    }
    let reports = ranks[0];
    let mut worst_loss = 0f64;
    for (g, w) in reports.iter().zip(one) {
        assert_eq!(g.step, w.step);
        assert_eq!(g.tokens, w.tokens, "{what}: tokens of the global batch");
        assert_eq!(
            g.trained_tokens, w.trained_tokens,
            "{what}: trained tokens of the global batch"
        );
        assert_eq!(
            g.expert_loads, w.expert_loads,
            "{what}: step {} loads",
            g.step
        );
        worst_loss = worst_loss.max((g.loss - w.loss).abs() / w.loss);
    }
    let first_loss = (reports[0].loss - one[0].loss).abs() / one[0].loss;
    let budget: f64 = one.iter().map(|r| r.learning_rate).sum();
    let (mut worst, mut worst_at, mut squares, mut count) = (0f64, String::new(), 0f64, 0usize);
    for ((name, g), (_, w)) in got.iter().zip(want) {
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            let d = f64::from((a - b).abs()) / budget;
            squares += d * d;
            count += 1;
            if d > worst {
                (worst, worst_at) = (d, format!("{name}[{i}]: {a} vs {b}"));
            }
        }
    }
    let rms = (squares / count as f64).sqrt();
    eprintln!(
        "{what}: first loss {first_loss:.2e}, worst loss {worst_loss:.2e} relative; weights RMS {rms:.2e}, worst {worst:.2e} of Adam's budget ({worst_at})"
    );
    if first_loss_tolerance == 0.0 {
        assert_eq!(
            reports[0].loss.to_bits(),
            one[0].loss.to_bits(),
            "{what}: the first step's loss (same tokens, same weights, same rows) differs by {first_loss:e}"
        );
    }
    assert!(
        first_loss <= first_loss_tolerance,
        "{what}: the first step's loss (same tokens, same weights, same rows) differs by {first_loss:e}"
    );
    assert!(
        worst_loss <= 1e-5,
        "{what}: losses differ by {worst_loss:e}"
    );
    assert!(rms <= 1e-3, "{what}: weights differ by an RMS of {rms:e}");
    assert!(worst <= 0.05, "{what}: {worst_at} differs by {worst:e}");
    Drift {
        first_loss,
        worst_loss,
        rms,
        worst,
    }
}

/// The pid of the process whose environment carries `{var}={value}` and
/// `MOE_LOCAL_RANK={rank}`: one rank of a launch a test marked.
pub fn rank_pid(var: &str, value: &str, rank: usize) -> Option<i32> {
    let want = [format!("{var}={value}"), format!("MOE_LOCAL_RANK={rank}")];
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let environ = std::fs::read(entry.path().join("environ")).ok()?;
            let vars: Vec<&[u8]> = environ.split(|&b| b == 0).collect();
            want.iter()
                .all(|w| vars.contains(&w.as_bytes()))
                .then_some(pid)
        })
}
