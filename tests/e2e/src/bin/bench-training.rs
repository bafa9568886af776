//! Control-plane benchmark of the MoETrainingJob operator (docs/benchmarks.md).
//!
//! Applies N MoETrainingJobs of 4 workers each to the fake H100 pool and
//! measures the time until all are Running; then, in the same run, applies
//! the same pods as N plain Indexed Jobs (what the operator builds, without
//! the operator) — the Kubernetes floor — and reports the ratio. Also:
//! reconcile latency p50/p99, API writes per reconcile in steady state, and
//! the operator's peak RSS.
//!
//! ```sh
//! tests/cluster/up.sh && source tests/cluster/.state/env
//! cargo build --release -p moe-operator -p moe-e2e
//! MOE_OPERATOR_BIN=target/release/moe-operator target/release/bench-training --jobs 100
//! ```

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use futures::future::try_join_all;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use moe_crds::{MoETrainingJob, TrainingPhase};
use moe_e2e::operator::{Operator, sh};
use moe_e2e::{TestNamespace, admin_client, metric_sum};
use moe_operator::training::build::{self, BuildContext, Counters};
use serde_json::json;

const WORKERS: i32 = 4;

struct Args {
    jobs: usize,
}

fn args() -> Result<Args> {
    let mut jobs = 100;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--jobs" => jobs = it.next().context("--jobs N")?.parse()?,
            other => anyhow::bail!("unknown argument {other} (usage: bench-training [--jobs N])"),
        }
    }
    Ok(Args { jobs })
}

/// A job of 4 nodes × 1 GPU whose pods KWOK holds Running.
fn training_job(name: &str) -> MoETrainingJob {
    serde_json::from_value(json!({
        "apiVersion": "moe.dev/v1alpha1", "kind": "MoETrainingJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"hiddenSize": 64, "layers": 2, "attentionHeads": 4, "kvHeads": 4, "seqLen": 64,
                      "moe": {"experts": 8, "topK": 2, "expertHiddenSize": 32}},
            "training": {"steps": 100, "globalBatchSize": WORKERS},
            "parallelism": {"nodes": WORKERS, "processesPerNode": 1},
            "placement": {"gpuType": "H100"},
            "worker": {"podMetadata": {"labels": {"kwok.test/hold": "true"}}}
        }
    }))
    .expect("valid job")
}

/// The attempt Job the operator would build for `name`, as a standalone Job.
fn plain_job(name: &str, ns: &str) -> Job {
    let mut job = training_job(name);
    job.metadata.namespace = Some(ns.into());
    job.metadata.uid = Some("00000000-0000-0000-0000-000000000000".into());
    let attempt = build::NewAttempt {
        attempt: 0,
        counters: Counters::default(),
        nodes: job.spec.parallelism.nodes,
    };
    let mut child = build::attempt_job(&job, &BuildContext::default(), attempt);
    child.metadata.owner_references = None;
    child
}

async fn wait_all(
    what: &str,
    timeout: Duration,
    mut done: impl AsyncFnMut() -> Result<usize>,
    n: usize,
) -> Result<()> {
    let start = Instant::now();
    loop {
        let k = done().await?;
        if k >= n {
            return Ok(());
        }
        ensure!(
            start.elapsed() < timeout,
            "{what}: only {k}/{n} after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Quantile from a Prometheus histogram's cumulative buckets (upper bound of the bucket).
fn histogram_quantile(metrics: &str, name: &str, q: f64) -> Option<f64> {
    let mut buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}_bucket")))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    buckets
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(le, _)| *le)
}

/// CPU seconds (user + system) a process has used so far, from /proc.
fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces, so split after ')').
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some(ticks / 100.0)
}

/// CPU seconds used so far by every control-plane process (etcd, apiserver,
/// controller-manager, scheduler, KWOK) listed in the harness's state.
fn cpu_seconds() -> f64 {
    let dir = std::env::var("MOE_CLUSTER_STATE").unwrap_or_else(|_| "tests/cluster/.state".into());
    std::fs::read_dir(format!("{dir}/pids"))
        .into_iter()
        .flatten()
        .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path()).ok())
        .filter_map(|pid| process_cpu_seconds(pid.trim().parse().ok()?))
        .sum()
}

fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

async fn operator_run(client: &Client, n: usize) -> Result<(Duration, Operator)> {
    let ns = TestNamespace::create(client, "bench-mtj", &[]).await?;
    let op = Operator::start(&ns.name).await?;
    let api: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let start = Instant::now();
    try_join_all((0..n).map(|i| {
        let api = api.clone();
        async move {
            api.create(&PostParams::default(), &training_job(&format!("b{i}")))
                .await
        }
    }))
    .await?;
    wait_all(
        "MoETrainingJobs Running",
        Duration::from_secs(600),
        async || {
            let list = api.list(&ListParams::default()).await?;
            Ok(list
                .items
                .iter()
                .filter(|j| j.status.as_ref().and_then(|s| s.phase) == Some(TrainingPhase::Running))
                .count())
        },
        n,
    )
    .await?;
    Ok((start.elapsed(), op))
}

/// The floor: the attempt Jobs applied directly; with `children`, each with
/// the ConfigMap its pods mount and the headless Service their rendezvous
/// address resolves through — every object the operator creates, without
/// the operator (the like-for-like floor).
async fn plain_run(client: &Client, n: usize, children: bool) -> Result<Duration> {
    let ns = TestNamespace::create(client, "bench-job", &[]).await?;
    let api: Api<Job> = Api::namespaced(client.clone(), &ns.name);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let start = Instant::now();
    try_join_all((0..n).map(|i| {
        let (api, config_maps, services) = (api.clone(), config_maps.clone(), services.clone());
        let name = format!("b{i}");
        let job = plain_job(&name, &ns.name);
        let mut owner = training_job(&name);
        owner.metadata.namespace = Some(ns.name.clone());
        owner.metadata.uid = Some("00000000-0000-0000-0000-000000000000".into());
        async move {
            if children {
                let mut cm = build::config_map(&owner);
                cm.metadata.owner_references = None;
                let mut svc = build::service(&owner);
                svc.metadata.owner_references = None;
                let pp = PostParams::default();
                futures::try_join!(
                    config_maps.create(&pp, &cm),
                    services.create(&pp, &svc),
                    api.create(&pp, &job),
                )?;
            } else {
                api.create(&PostParams::default(), &job).await?;
            }
            Ok::<(), kube::Error>(())
        }
    }))
    .await?;
    wait_all(
        "plain Jobs with all pods ready",
        Duration::from_secs(600),
        async || {
            let list = api.list(&ListParams::default()).await?;
            Ok(list
                .items
                .iter()
                .filter(|j| j.status.as_ref().and_then(|s| s.ready) == Some(WORKERS))
                .count())
        },
        n,
    )
    .await?;
    let took = start.elapsed();
    delete_and_wait(client, ns).await?;
    Ok(took)
}

/// Deletes a run's namespace and waits until it is gone: tearing down 400
/// pods and their Jobs is heavy control-plane work, and letting it overlap
/// the next run handicapped whichever run came next (measured: 34 s vs 69 s
/// for the same floor).
async fn delete_and_wait(client: &Client, ns: TestNamespace) -> Result<()> {
    let name = ns.name.clone();
    ns.delete().await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    wait_all(
        "namespace deleted",
        Duration::from_secs(600),
        async || Ok(usize::from(namespaces.get_opt(&name).await?.is_none())),
        1,
    )
    .await
}

#[tokio::main]
async fn main() -> Result<()> {
    let Args { jobs: n } = args()?;
    let client = admin_client().await?;
    // Enough fake H100 nodes for 2 × N × 4 one-GPU pods at once, plus the e2e pool.
    let nodes = (2 * n * WORKERS as usize).div_ceil(8) + 24;
    sh(&format!(
        "tests/cluster/nodes.sh {nodes} | kubectl apply -f - >/dev/null"
    ))?;
    sh("kubectl wait --for=condition=Ready node -l type=kwok --timeout=300s >/dev/null")?;

    // Floors first, then the operator, then the floors again in reverse
    // order: the machine is shared and noisy, so each floor is the mean of a
    // run before and a run after, around the operator's.
    let cpu0 = cpu_seconds();
    let jobs_a = plain_run(&client, n, false).await?;
    let cpu1 = cpu_seconds();
    let full_a = plain_run(&client, n, true).await?;
    let cpu2 = cpu_seconds();
    let (with_operator, op) = operator_run(&client, n).await?;
    let cpu3 = cpu_seconds();
    let operator_cpu = op.pid().and_then(process_cpu_seconds).unwrap_or(f64::NAN);

    // Steady state: touch every job (a metadata change triggers a reconcile) and count writes.
    let metrics = op.metrics().await?;
    let (writes0, reconciles0) = (
        metric_sum(&metrics, "moe_operator_api_writes_total"),
        metric_sum(&metrics, "moe_operator_reconciles_total"),
    );
    let ns = op.name.trim_start_matches("operator-").to_string();
    let api: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns);
    for j in api.list(&ListParams::default()).await?.items {
        let touch = json!({"metadata": {"annotations": {"bench/touch": "1"}}});
        api.patch(
            &j.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&touch),
        )
        .await?;
    }
    let mut metrics = op.metrics().await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric_sum(&metrics, "moe_operator_reconciles_total") < reconciles0 + n as f64
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
        metrics = op.metrics().await?;
    }
    let steady_reconciles = metric_sum(&metrics, "moe_operator_reconciles_total") - reconciles0;
    let steady_writes = metric_sum(&metrics, "moe_operator_api_writes_total") - writes0;
    let p50 = histogram_quantile(&metrics, "moe_operator_reconcile_duration_seconds", 0.5)
        .unwrap_or(f64::NAN);
    let p99 = histogram_quantile(&metrics, "moe_operator_reconcile_duration_seconds", 0.99)
        .unwrap_or(f64::NAN);
    let rss = op.pid().and_then(peak_rss_mib).unwrap_or(f64::NAN);
    // The floors after the operator start from a clean cluster too.
    delete_and_wait(&client, TestNamespace::from_name(&client, &ns)).await?;
    let full_b = plain_run(&client, n, true).await?;
    let jobs_b = plain_run(&client, n, false).await?;
    let jobs_floor = (jobs_a + jobs_b) / 2;
    let floor = (full_a + full_b) / 2;

    println!(
        "jobs: {n} MoETrainingJobs × {WORKERS} workers ({} pods)",
        n * WORKERS as usize
    );
    println!(
        "time to all Running, operator:     {:>8.2} s",
        with_operator.as_secs_f64()
    );
    println!(
        "time to all ready, Jobs+ConfigMaps+Services applied directly: {:>8.2} s  (mean of {:.2} s before and {:.2} s after)",
        floor.as_secs_f64(),
        full_a.as_secs_f64(),
        full_b.as_secs_f64()
    );
    println!(
        "time to all ready, plain Jobs alone:                           {:>8.2} s  (mean of {:.2} s before and {:.2} s after)",
        jobs_floor.as_secs_f64(),
        jobs_a.as_secs_f64(),
        jobs_b.as_secs_f64()
    );
    println!(
        "overhead ratio (operator / same objects applied directly): {:>8.3}  (target ≤ 1.15)",
        with_operator.as_secs_f64() / floor.as_secs_f64()
    );
    println!(
        "overhead ratio (operator / plain Jobs alone):              {:>8.3}",
        with_operator.as_secs_f64() / jobs_floor.as_secs_f64()
    );
    println!(
        "control-plane CPU seconds: plain Jobs {:.1}, Jobs+children {:.1}, operator path {:.1} (+ operator process {:.1})",
        cpu1 - cpu0,
        cpu2 - cpu1,
        cpu3 - cpu2,
        operator_cpu
    );
    println!(
        "reconcile latency p50 / p99:       ≤ {:.4} s / ≤ {:.4} s  (histogram bucket bounds)",
        p50, p99
    );
    println!(
        "steady-state writes per reconcile: {:>8.3}  ({steady_writes} writes in {steady_reconciles} reconciles; target 0)",
        if steady_reconciles > 0.0 {
            steady_writes / steady_reconciles
        } else {
            f64::NAN
        }
    );
    println!("operator peak RSS:                 {rss:>8.1} MiB");
    Ok(())
}
