//! MoETrainingJob end to end: the real operator binary, with its own
//! ServiceAccount token and the chart's RBAC, against the real control plane.
//! Each test has its own Pod Security "restricted" namespace and operator.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::resource::v1::{ResourceClaim, ResourceClaimTemplate};
use k8s_openapi::api::scheduling::v1alpha2::PodGroup;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use moe_crds::fixtures::{invalid_training_jobs, merge_patch, valid_training_job};
use moe_crds::{MoETrainingJob, TrainingPhase};
use moe_e2e::hub::FakeHub;
use moe_e2e::kubelet::Kubelet;
use moe_e2e::kueue::{ELASTIC_KUEUE_POOL, KueueSetup, QUOTA_POOL, SPARE_POOL, TAS_POOL, admitted};
use moe_e2e::operator::{Operator, install, operator_can, sh};
use moe_e2e::{
    DRA_CLASS, DRA_POOL, ELASTIC_POOL, GANG_ELASTIC_POOL, GANG_POOL, HOLD, TestNamespace,
    UrgentClass, WORKLOAD_API, admin_client, api_message, bound_claim, eventually, gpu_job,
    metric_sum, on_pool, rejection_problems, rendered_config,
};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(90);
const FAIL: &str = "pod-container-running-failed.stage.kwok.x-k8s.io";

async fn restricted_ns(client: &Client, prefix: &str) -> Result<TestNamespace> {
    TestNamespace::create(
        client,
        prefix,
        &[("pod-security.kubernetes.io/enforce", "restricted")],
    )
    .await
}

async fn wait_phase(
    jobs: &Api<MoETrainingJob>,
    name: &str,
    phase: TrainingPhase,
) -> Result<MoETrainingJob> {
    eventually(&format!("{name} to be {phase:?}"), WAIT, || async {
        let j = jobs.get(name).await?;
        let now = j.status.as_ref().and_then(|s| s.phase);
        Ok((now == Some(phase)).then_some(j))
    })
    .await
}

/// " (deleting)" for an object being deleted.
fn deleting(object: &impl ResourceExt) -> &'static str {
    if object.meta().deletion_timestamp.is_some() {
        " (deleting)"
    } else {
        ""
    }
}

async fn pods_of(pods: &Api<Pod>, job: &str, attempt: i32) -> Result<Vec<Pod>> {
    let sel = format!("moe.dev/job-name={job},moe.dev/attempt={attempt}");
    Ok(pods.list(&ListParams::default().labels(&sel)).await?.items)
}

fn env_of(pod: &Pod, name: &str) -> Option<String> {
    let c = pod.spec.as_ref()?.containers.first()?;
    let var = c.env.as_ref()?.iter().find(|e| e.name == name)?;
    var.value.clone().or_else(|| {
        var.value_from
            .as_ref()?
            .field_ref
            .as_ref()
            .map(|f| format!("fieldRef:{}", f.field_path))
    })
}

fn condition<'a>(
    job: &'a MoETrainingJob,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    job.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// Fail a held pod with `code` through KWOK's failure stage.
async fn fail_pod(pods: &Api<Pod>, name: &str, code: i32) -> Result<()> {
    let patch = json!({"metadata": {
        "labels": {HOLD: null, FAIL: "true"},
        "annotations": {format!("{FAIL}/exit-code"): code.to_string(), format!("{FAIL}/delay"): "100ms"}
    }});
    pods.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

async fn release_pods(pods: &Api<Pod>, list: &[Pod]) -> Result<()> {
    for p in list {
        let patch = json!({"metadata": {"labels": {HOLD: null}}});
        pods.patch(
            &p.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    }
    Ok(())
}

/// Waits for an Event of `reason` about `name`. The operator writes the
/// status and records the Event at once, so a test that saw the status may
/// look before the Event is there.
async fn wait_event(client: &Client, ns: &str, name: &str, reason: &str) -> Result<()> {
    eventually(&format!("a {reason} event about {name}"), WAIT, || async {
        let reasons = event_reasons(client, ns, name).await?;
        Ok(reasons.iter().any(|r| r == reason).then_some(()))
    })
    .await
}

async fn event_reasons(client: &Client, ns: &str, name: &str) -> Result<Vec<String>> {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let list = events.list(&ListParams::default()).await?;
    Ok(list
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter_map(|e| e.reason)
        .collect())
}

#[tokio::test]
async fn gpu_job_lands_on_h100_pool_runs_and_succeeds() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mtj-run").await?;
    let op = Operator::start(&ns.name).await?;
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    jobs.create(&PostParams::default(), &gpu_job("train", 2, json!({})))
        .await?;

    let running = wait_phase(&jobs, "train", TrainingPhase::Running).await?;
    let status = running.status.clone().unwrap();
    ensure!(
        status.observed_generation == running.metadata.generation,
        "observedGeneration lags"
    );
    ensure!(
        status.workers.ready == 2 && status.workers.expected == 2,
        "workers {:?}",
        status.workers
    );
    ensure!(
        condition(&running, "Ready").is_some_and(|c| c.status == "True"),
        "not Ready"
    );
    ensure!(condition(&running, "Reconciling").is_some_and(|c| c.status == "False"));

    let list = pods_of(&pods, "train", 0).await?;
    ensure!(list.len() == 2, "{} pods", list.len());
    for pod in &list {
        let spec = pod.spec.as_ref().unwrap();
        let node = spec.node_name.clone().unwrap_or_default();
        ensure!(
            node.starts_with("gpu-h100-"),
            "{} on {node}",
            pod.name_any()
        );
        ensure!(env_of(pod, "MOE_WORLD_SIZE").as_deref() == Some("16"));
        ensure!(env_of(pod, "MOE_NODES").as_deref() == Some("2"));
        ensure!(env_of(pod, "MOE_PROCS_PER_NODE").as_deref() == Some("8"));
        ensure!(env_of(pod, "MOE_ATTEMPT").as_deref() == Some("0"));
        ensure!(env_of(pod, "MOE_COORDINATOR").as_deref() == Some("train-a0-0.train:29400"));
        ensure!(
            env_of(pod, "MOE_NODE_RANK").as_deref()
                == Some(
                    "fieldRef:metadata.annotations['batch.kubernetes.io/job-completion-index']"
                )
        );
        let c = &spec.containers[0];
        let gpus = c
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get("nvidia.com/gpu"));
        ensure!(
            gpus.map(|q| q.0.as_str()) == Some("8"),
            "gpu limit {gpus:?}"
        );
        let tolerations = spec.tolerations.clone().unwrap_or_default();
        ensure!(
            tolerations
                .iter()
                .any(|t| t.key.as_deref() == Some("nvidia.com/gpu")),
            "no GPU toleration"
        );
        let volumes: Vec<_> = spec
            .volumes
            .iter()
            .flatten()
            .map(|v| v.name.as_str())
            .collect();
        for v in ["config", "state", "shm", "tmp"] {
            ensure!(volumes.contains(&v), "volume {v} missing: {volumes:?}");
        }
        ensure!(
            spec.automount_service_account_token == Some(false),
            "workers must not get API tokens"
        );
        ensure!(spec.subdomain.as_deref() == Some("train"));
    }
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns.name)
        .get("train-config")
        .await?;
    let config: Value = serde_json::from_str(&cm.data.unwrap()["config.json"])?;
    ensure!(
        config["parallelism"]["expertParallel"] == 8,
        "config {config}"
    );
    ensure!(
        config["checkpoint"]["dir"]
            .as_str()
            .is_some_and(|d| d.ends_with("/train/checkpoints"))
    );
    let svc = Api::<Service>::namespaced(client.clone(), &ns.name)
        .get("train")
        .await?;
    ensure!(
        svc.spec.and_then(|s| s.cluster_ip).as_deref() == Some("None"),
        "Service is not headless"
    );

    // Steady state: a reconcile with nothing to change makes no API writes.
    let writes_before = metric_sum(&op.metrics().await?, "moe_operator_api_writes_total");
    let reconciles_before = metric_sum(&op.metrics().await?, "moe_operator_reconciles_total");
    let nudge = json!({"metadata": {"annotations": {"e2e/nudge": "1"}}});
    jobs.patch("train", &PatchParams::default(), &Patch::Merge(&nudge))
        .await?;
    eventually("a reconcile after the nudge", WAIT, || async {
        Ok(
            (metric_sum(&op.metrics().await?, "moe_operator_reconciles_total") > reconciles_before)
                .then_some(()),
        )
    })
    .await?;
    let writes_after = metric_sum(&op.metrics().await?, "moe_operator_api_writes_total");
    ensure!(
        writes_after == writes_before,
        "steady-state reconcile wrote: {writes_before} -> {writes_after}"
    );

    release_pods(&pods, &list).await?;
    let done = wait_phase(&jobs, "train", TrainingPhase::Succeeded).await?;
    ensure!(done.status.as_ref().unwrap().completion_time.is_some());
    ensure!(condition(&done, "Succeeded").is_some_and(|c| c.status == "True"));
    for r in ["AttemptCreated", "AllWorkersRunning", "Succeeded"] {
        wait_event(&client, &ns.name, "train", r).await?;
    }
    ns.delete().await
}

#[tokio::test]
async fn a_failed_pod_restarts_the_gang_until_the_backoff_limit() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mtj-gang").await?;
    let _op = Operator::start(&ns.name).await?;
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let k8s_jobs: Api<Job> = Api::namespaced(client.clone(), &ns.name);
    jobs.create(&PostParams::default(), &gpu_job("gang", 2, json!({})))
        .await?;
    wait_phase(&jobs, "gang", TrainingPhase::Running).await?;

    let first = pods_of(&pods, "gang", 0).await?;
    fail_pod(&pods, &first[1].name_any(), 1).await?;
    // The whole gang restarts as attempt 1; the failure is counted.
    let restarted = eventually("attempt 1 to run", WAIT, || async {
        let j = jobs.get("gang").await?;
        let s = j.status.clone().unwrap_or_default();
        Ok((s.attempt == 1 && s.phase == Some(TrainingPhase::Running)).then_some(j))
    })
    .await?;
    ensure!(restarted.status.as_ref().unwrap().restarts == 1);
    eventually("attempt 0's Job to be deleted", WAIT, || async {
        Ok(k8s_jobs.get_opt("gang-a0").await?.is_none().then_some(()))
    })
    .await?;
    let second = pods_of(&pods, "gang", 1).await?;
    ensure!(second.len() == 2, "attempt 1 has {} pods", second.len());
    ensure!(
        second
            .iter()
            .all(|p| env_of(p, "MOE_ATTEMPT").as_deref() == Some("1"))
    );
    ensure!(
        second
            .iter()
            .all(|p| env_of(p, "MOE_COORDINATOR").as_deref() == Some("gang-a1-0.gang:29400"))
    );

    // backoffLimit is 1: the next failure ends the job.
    fail_pod(&pods, &second[0].name_any(), 7).await?;
    let failed = wait_phase(&jobs, "gang", TrainingPhase::Failed).await?;
    let cond = condition(&failed, "Failed").unwrap();
    ensure!(
        cond.reason == "BackoffLimitExceeded",
        "reason {}",
        cond.reason
    );
    ensure!(
        cond.message.contains("exited with code 7"),
        "message {}",
        cond.message
    );
    ensure!(condition(&failed, "Stalled").is_some_and(|c| c.status == "True"));
    ensure!(
        k8s_jobs.get_opt("gang-a2").await?.is_none(),
        "no attempt after the limit"
    );
    eventually("no worker pods left", WAIT, || async {
        let left = pods
            .list(&ListParams::default().labels("moe.dev/job-name=gang"))
            .await?
            .items;
        Ok(left
            .iter()
            .all(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Running"))
            .then_some(()))
    })
    .await?;
    wait_event(&client, &ns.name, "gang", "GangRestart").await?;
    wait_event(&client, &ns.name, "gang", "BackoffLimitExceeded").await?;
    ns.delete().await
}

#[tokio::test]
async fn a_failure_rule_fails_the_job_at_once() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mtj-rule").await?;
    let _op = Operator::start(&ns.name).await?;
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let rule = json!({"spec": {"runPolicy": {"backoffLimit": 5, "failureRules": [
        {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [3]}}]}}});
    jobs.create(&PostParams::default(), &gpu_job("rule", 1, rule))
        .await?;
    wait_phase(&jobs, "rule", TrainingPhase::Running).await?;
    let list = pods_of(&pods, "rule", 0).await?;
    fail_pod(&pods, &list[0].name_any(), 3).await?;
    let failed = wait_phase(&jobs, "rule", TrainingPhase::Failed).await?;
    let cond = condition(&failed, "Failed").unwrap();
    ensure!(
        cond.reason == "FailureRuleMatched",
        "reason {}",
        cond.reason
    );
    ensure!(failed.status.unwrap().restarts == 0);
    ns.delete().await
}

#[tokio::test]
async fn node_loss_restarts_the_gang_without_using_the_budget() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mtj-node").await?;
    let _op = Operator::start(&ns.name).await?;
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let nodes: Api<Node> = Api::all(client.clone());
    // Pin to the last H100 node so this test's chaos cannot hit other tests' pods.
    let pin = json!({"spec": {"runPolicy": {"backoffLimit": 0},
        "placement": {"nodeSelector": {"kubernetes.io/hostname": "gpu-h100-15"}}}});
    jobs.create(&PostParams::default(), &gpu_job("nodeloss", 1, pin))
        .await?;
    wait_phase(&jobs, "nodeloss", TrainingPhase::Running).await?;
    let node = "gpu-h100-15";
    let set = |v: Option<&str>| json!({"metadata": {"labels": {"node-not-ready.stage.kwok.x-k8s.io": v}}});
    nodes
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(&set(Some("true"))),
        )
        .await?;
    // NotReady → NoExecute taint → eviction after the workers' 30 s toleration → gang restart.
    let restarted = eventually("a disruption restart", Duration::from_secs(150), || async {
        let j = jobs.get("nodeloss").await?;
        let s = j.status.clone().unwrap_or_default();
        Ok((s.attempt >= 1).then_some(j))
    })
    .await;
    nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(&set(None)))
        .await?;
    let restarted = restarted?;
    let s = restarted.status.unwrap();
    ensure!(
        s.restarts == 0 && s.disruptions == 1,
        "restarts {} disruptions {}",
        s.restarts,
        s.disruptions
    );
    ensure!(
        s.phase != Some(TrainingPhase::Failed),
        "backoffLimit 0 must not fail a disrupted job"
    );
    ns.delete().await
}

#[tokio::test]
async fn suspend_removes_the_pods_and_resume_starts_a_new_attempt() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mtj-susp").await?;
    let _op = Operator::start(&ns.name).await?;
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    jobs.create(&PostParams::default(), &gpu_job("susp", 1, json!({})))
        .await?;
    wait_phase(&jobs, "susp", TrainingPhase::Running).await?;

    let suspend = |v: bool| json!({"spec": {"runPolicy": {"suspend": v}}});
    jobs.patch(
        "susp",
        &PatchParams::default(),
        &Patch::Merge(&suspend(true)),
    )
    .await?;
    let suspended = wait_phase(&jobs, "susp", TrainingPhase::Suspended).await?;
    ensure!(condition(&suspended, "Suspended").is_some_and(|c| c.status == "True"));
    eventually("the pods to go", WAIT, || async {
        Ok(pods
            .list(&ListParams::default().labels("moe.dev/job-name=susp"))
            .await?
            .items
            .is_empty()
            .then_some(()))
    })
    .await?;
    // Suspended, the model may change; running, it may not (CEL transition rule).
    let edit = json!({"spec": {"model": {"layers": 3}}});
    jobs.patch("susp", &PatchParams::default(), &Patch::Merge(&edit))
        .await?;

    jobs.patch(
        "susp",
        &PatchParams::default(),
        &Patch::Merge(&suspend(false)),
    )
    .await?;
    let resumed = eventually("attempt 1 to run", WAIT, || async {
        let j = jobs.get("susp").await?;
        let s = j.status.clone().unwrap_or_default();
        Ok((s.attempt == 1 && s.phase == Some(TrainingPhase::Running)).then_some(j))
    })
    .await?;
    ensure!(
        resumed.status.as_ref().unwrap().restarts == 0,
        "a resume is not a counted restart"
    );
    let edit = json!({"spec": {"model": {"layers": 4}}});
    let err = jobs
        .patch("susp", &PatchParams::default(), &Patch::Merge(&edit))
        .await
        .expect_err("immutable");
    ensure!(
        api_message(&err).contains("model is immutable while the job is not suspended"),
        "{err}"
    );
    ns.delete().await
}

#[tokio::test]
async fn deleting_a_job_garbage_collects_its_children() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mtj-gc").await?;
    let _op = Operator::start(&ns.name).await?;
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    jobs.create(&PostParams::default(), &gpu_job("gc", 1, json!({})))
        .await?;
    wait_phase(&jobs, "gc", TrainingPhase::Running).await?;
    jobs.delete("gc", &DeleteParams::background()).await?;
    let (cms, svcs, k8s_jobs, pods) = (
        Api::<ConfigMap>::namespaced(client.clone(), &ns.name),
        Api::<Service>::namespaced(client.clone(), &ns.name),
        Api::<Job>::namespaced(client.clone(), &ns.name),
        Api::<Pod>::namespaced(client.clone(), &ns.name),
    );
    eventually(
        "children to be garbage-collected",
        Duration::from_secs(120),
        || async {
            let gone = cms.get_opt("gc-config").await?.is_none()
                && svcs.get_opt("gc").await?.is_none()
                && k8s_jobs.get_opt("gc-a0").await?.is_none()
                && pods
                    .list(&ListParams::default().labels("moe.dev/job-name=gc"))
                    .await?
                    .items
                    .is_empty();
            Ok(gone.then_some(()))
        },
    )
    .await?;
    ns.delete().await
}

/// A two-pod gang's namespace and the APIs the operator-restart tests use.
struct Gang {
    ns: TestNamespace,
    jobs: Api<MoETrainingJob>,
    pods: Api<Pod>,
    k8s_jobs: Api<Job>,
}

/// A two-pod GPU job `name` (backoffLimit 3) Running, then its operator
/// stopped: what happens next happens while no operator runs.
async fn running_gang_then_operator_down(prefix: &str, name: &str) -> Result<Gang> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, prefix).await?;
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let k8s_jobs: Api<Job> = Api::namespaced(client.clone(), &ns.name);
    let op = Operator::start(&ns.name).await?;
    let job = gpu_job(name, 2, json!({"spec": {"runPolicy": {"backoffLimit": 3}}}));
    jobs.create(&PostParams::default(), &job).await?;
    wait_phase(&jobs, name, TrainingPhase::Running).await?;
    drop(op);
    Ok(Gang {
        ns,
        jobs,
        pods,
        k8s_jobs,
    })
}

/// Waits for the attempt Job `name` to carry `Failed=True`.
async fn attempt_job_failed(k8s_jobs: &Api<Job>, name: &str) -> Result<()> {
    eventually(&format!("Job {name} to fail"), WAIT, || async {
        let j = k8s_jobs.get(name).await?;
        let failed = j
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Failed" && c.status == "True");
        Ok(failed.then_some(()))
    })
    .await
}

/// The cause of a failed attempt is the Job controller's pod-failure-policy
/// verdict, judged when the first pod failed, not the pods as a restarted
/// operator lists them later: here the gang's other pod is held in its
/// teardown (a finalizer) and carries a `DisruptionTarget` by then, which
/// must not turn a worker's exit code into an uncounted disruption.
#[tokio::test]
async fn a_teardown_disruption_does_not_hide_the_exit_that_failed_the_gang() -> Result<()> {
    let Gang {
        ns,
        jobs,
        pods,
        k8s_jobs,
    } = running_gang_then_operator_down("mtj-verdict", "verdict").await?;

    // Pod 1 is held in its teardown; pod 0 fails and fails the Job.
    let list = pods_of(&pods, "verdict", 0).await?;
    let (failing, held) = (list[0].name_any(), list[1].name_any());
    const TEST_HOLD: &str = "moe.test/hold-teardown";
    let hold = json!({"metadata": {"finalizers": [TEST_HOLD]}});
    pods.patch(&held, &PatchParams::default(), &Patch::Merge(&hold))
        .await?;
    let outcome = async {
        fail_pod(&pods, &failing, 1).await?;
        attempt_job_failed(&k8s_jobs, "verdict-a0").await?;
        // What a teardown may leave on a pod: a disruption condition.
        let disrupted = json!({"status": {"conditions": [{
            "type": "DisruptionTarget", "status": "True", "reason": "DeletionByPodGC",
            "message": "added by the test", "lastTransitionTime": "2026-01-01T00:00:00Z"
        }]}});
        pods.patch_status(
            &held,
            &PatchParams::default(),
            &Patch::Strategic(&disrupted),
        )
        .await?;
        let _op = Operator::start(&ns.name).await?;
        eventually("attempt 1", WAIT, || async {
            let s = jobs.get("verdict").await?.status.unwrap_or_default();
            Ok((s.attempt == 1).then_some((s.restarts, s.disruptions)))
        })
        .await
    }
    .await;
    // Release the held pod whatever happened, so the namespace can go.
    let release = json!({"metadata": {"finalizers": null}});
    pods.patch(&held, &PatchParams::default(), &Patch::Merge(&release))
        .await?;
    let (restarts, disruptions) = outcome?;
    ensure!(
        (restarts, disruptions) == (1, 0),
        "restarts {restarts}, disruptions {disruptions}: the exit code of {failing} must count"
    );
    ns.delete().await
}

#[tokio::test]
async fn an_operator_restart_mid_flight_loses_nothing_and_duplicates_nothing() -> Result<()> {
    let Gang {
        ns,
        jobs,
        pods,
        k8s_jobs,
    } = running_gang_then_operator_down("mtj-restart", "mid").await?;

    // While no operator runs, a worker fails and the attempt's Job fails.
    let list = pods_of(&pods, "mid", 0).await?;
    fail_pod(&pods, &list[0].name_any(), 1).await?;
    attempt_job_failed(&k8s_jobs, "mid-a0").await?;

    let _op = Operator::start(&ns.name).await?;
    eventually("attempt 1 to run", WAIT, || async {
        let s = jobs.get("mid").await?.status.unwrap_or_default();
        if s.attempt == 1 && s.phase == Some(TrainingPhase::Running) && s.restarts == 1 {
            return Ok(Some(()));
        }
        // Not yet: say what there is, so a timeout shows where it stuck.
        let attempts = k8s_jobs
            .list(&ListParams::default().labels("moe.dev/job-name=mid"))
            .await?
            .items
            .iter()
            .map(|j| format!("{}{}", j.name_any(), deleting(j)))
            .collect::<Vec<_>>();
        let new_pods = pods_of(&pods, "mid", 1)
            .await?
            .iter()
            .map(|p| {
                let phase = p.status.as_ref().and_then(|s| s.phase.clone());
                let node = p.spec.as_ref().and_then(|s| s.node_name.clone());
                format!("{} {phase:?} on {node:?}", p.name_any())
            })
            .collect::<Vec<_>>();
        // And why the operator counted what it did: its events on the job
        // (GangRestart names the cause and whether it was counted).
        let events: Api<Event> = Api::namespaced(admin_client().await?, &ns.name);
        let reasons: Vec<String> = events
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("mid"))
            .map(|e| format!("{}: {}", e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
            .collect();
        bail!(
            "attempt {}, phase {:?}, restarts {}, disruptions {}; Jobs {attempts:?}; attempt-1 pods {new_pods:?}; events {reasons:?}",
            s.attempt,
            s.phase,
            s.restarts,
            s.disruptions
        )
    })
    .await?;
    // Give a duplicate every chance to appear, then check there is none.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let all = k8s_jobs
        .list(&ListParams::default().labels("moe.dev/job-name=mid"))
        .await?
        .items;
    let names: Vec<_> = all
        .iter()
        .filter(|j| j.metadata.deletion_timestamp.is_none())
        .map(|j| j.name_any())
        .collect();
    ensure!(names == ["mid-a1"], "attempt Jobs: {names:?}");
    ensure!(pods_of(&pods, "mid", 1).await?.len() == 2);
    ns.delete().await
}

fn queued(extra: Value) -> Value {
    let mut v = json!({"spec": {"placement": {"queueName": KueueSetup::QUEUE}}});
    merge_patch(&mut v, &extra);
    v
}

fn topology(kind: &str, key: &str) -> Value {
    json!({"spec": {"placement": {"topology": {kind: key}}}})
}

/// The value of node label `key` on the node of each pod (scheduled pods only).
async fn node_label_of(client: &Client, pods: &[Pod], key: &str) -> Result<Vec<String>> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut out = Vec::new();
    for p in pods {
        let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            continue;
        };
        let labels = nodes.get(&node).await?.labels().clone();
        out.push(labels.get(key).cloned().unwrap_or_default());
    }
    Ok(out)
}

/// Every pod of the newest attempt scheduled, and their nodes' values of label `key`.
async fn placed(
    client: &Client,
    pods: &Api<Pod>,
    job: &str,
    nodes: usize,
    key: &str,
) -> Result<Vec<String>> {
    eventually(&format!("{job}'s {nodes} pods scheduled"), WAIT, || async {
        // The newest attempt's: Kueue's topology-aware scheduling fails a
        // pod it finds on a node outside its assignment (seen under load),
        // which restarts the gang; the next attempt must be placed as well.
        let all = pods
            .list(&ListParams::default().labels(&format!("moe.dev/job-name={job}")))
            .await?
            .items;
        let attempt = |p: &Pod| -> i32 {
            p.labels()
                .get("moe.dev/attempt")
                .and_then(|a| a.parse().ok())
                .unwrap_or(0)
        };
        let newest = all.iter().map(attempt).max().unwrap_or(0);
        let list: Vec<Pod> = all
            .into_iter()
            .filter(|p| attempt(p) == newest && p.metadata.deletion_timestamp.is_none())
            .collect();
        let values = node_label_of(client, &list, key).await?;
        Ok((list.len() == nodes && values.len() == nodes).then_some(values))
    })
    .await
}

fn all_same(values: &[String]) -> bool {
    values.windows(2).all(|w| w[0] == w[1]) && !values.is_empty()
}

async fn waits_for_admission(jobs: &Api<MoETrainingJob>, name: &str) -> Result<()> {
    pending_because(jobs, name, "WaitingForAdmission").await
}

async fn pending_because(jobs: &Api<MoETrainingJob>, name: &str, reason: &str) -> Result<()> {
    eventually(
        &format!("{name} to be Pending ({reason})"),
        WAIT,
        || async {
            let j = jobs.get(name).await?;
            let pending = j.status.as_ref().and_then(|s| s.phase) == Some(TrainingPhase::Pending);
            Ok(
                (pending && condition(&j, "Reconciling").is_some_and(|c| c.reason == reason))
                    .then_some(()),
            )
        },
    )
    .await
}

/// An elastic job Kueue cannot admit whole (quota for 2 of its 4 nodes):
/// after the wait the operator asks for 2, which Kueue admits, and it runs;
/// its spares wait in the queue until the quota grows, and it grows back.
#[tokio::test]
async fn an_elastic_gang_kueue_cannot_admit_shrinks_to_its_quota_and_grows_back_with_it()
-> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mtj-kueue-elastic").await?;
    let kueue = KueueSetup::create(&client, &ns.name, ELASTIC_KUEUE_POOL, 16, false).await?;
    let _op = Operator::start(&ns.name).await?;
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let k8s_jobs: Api<Job> = Api::namespaced(client.clone(), &ns.name);
    let elastic = queued(json!({"spec": {
        "parallelism": {"elastic": {"minNodes": 1, "shrinkAfterSeconds": 5}},
        "worker": {"terminationGracePeriodSeconds": 5}
    }}));
    jobs.create(&PostParams::default(), &gpu_job("wide", 4, elastic))
        .await?;
    waits_for_admission(&jobs, "wide").await?;
    ensure!(
        pods_of(&pods, "wide", 0).await?.is_empty(),
        "not admitted: no pods"
    );
    running_uncounted_on(&jobs, "wide", 1, 2).await?;
    wait_event(&client, &ns.name, "wide", "GangShrunk").await?;
    // Kueue's flavor put the shrunk gang on its pool.
    let pools = placed(&client, &pods, "wide", 2, "node.moe.dev/pool").await?;
    ensure!(pools.iter().all(|p| p == ELASTIC_KUEUE_POOL), "{pools:?}");

    // Attempt 1 asks for room for the other 2 nodes in the queue: a spare
    // Job, suspended, that Kueue does not admit while the attempt holds
    // the whole quota (the pool's 2 free nodes notwithstanding).
    let spare = eventually("the spare Job, queued", WAIT, || async {
        Ok(k8s_jobs.get_opt("wide-a1-spare").await?)
    })
    .await?;
    ensure!(
        spare
            .labels()
            .get("kueue.x-k8s.io/queue-name")
            .map(String::as_str)
            == Some(KueueSetup::QUEUE),
        "{:?}",
        spare.labels()
    );
    let spare_pods = || async {
        let sel = "moe.dev/job-name=wide,moe.dev/role=spare";
        Ok::<_, anyhow::Error>(pods.list(&ListParams::default().labels(sel)).await?.items)
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(
        spare_pods().await?.is_empty(),
        "no spare pod before Kueue admits them"
    );
    ensure!(
        k8s_jobs
            .get("wide-a1-spare")
            .await?
            .spec
            .and_then(|s| s.suspend)
            == Some(true)
    );
    ensure!(jobs.get("wide").await?.status.unwrap_or_default().attempt == 1);

    // The quota grows to the whole gang's: Kueue admits the spares, they
    // run, and the gang grows back to 4 as attempt 2, not counted, admitted
    // by Kueue in turn once the smaller attempt and the spares are gone.
    kueue.set_gpus(32).await?;
    running_uncounted_on(&jobs, "wide", 2, 4).await?;
    wait_event(&client, &ns.name, "wide", "GangGrown").await?;
    let pools = placed(&client, &pods, "wide", 4, "node.moe.dev/pool").await?;
    ensure!(pools.iter().all(|p| p == ELASTIC_KUEUE_POOL), "{pools:?}");
    for pod in &pods_of(&pods, "wide", 2).await? {
        ensure!(env_of(pod, "MOE_NODES").as_deref() == Some("4"));
    }
    gone(&k8s_jobs, "wide-a1-spare").await?;
    kueue.delete().await?;
    ns.delete().await
}

#[tokio::test]
async fn kueue_admits_gangs_within_quota_and_a_preempted_gang_waits_without_a_restart() -> Result<()>
{
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mtj-kueue").await?;
    // 32 GPUs of quota over the 4-node pool only Kueue's flavor tolerates.
    let kueue = KueueSetup::create(&client, &ns.name, QUOTA_POOL, 32, false).await?;
    let _op = Operator::start(&ns.name).await?;
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let k8s_jobs: Api<Job> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let pp = PostParams::default();

    // The first gang takes the whole quota; Kueue, not the operator, starts it.
    jobs.create(&pp, &gpu_job("first", 4, queued(json!({}))))
        .await?;
    wait_phase(&jobs, "first", TrainingPhase::Running).await?;
    let child = k8s_jobs.get("first-a0").await?;
    ensure!(
        child
            .labels()
            .get("kueue.x-k8s.io/queue-name")
            .map(String::as_str)
            == Some(KueueSetup::QUEUE)
    );
    ensure!(child.spec.as_ref().and_then(|s| s.suspend) == Some(false));
    // Kueue's flavor put the gang on its pool (node labels and toleration injected at admission).
    let pools = placed(&client, &pods, "first", 4, "node.moe.dev/pool").await?;
    ensure!(pools.iter().all(|p| p == QUOTA_POOL), "first on {pools:?}");

    // No quota left: the second gang waits whole, not a pod of it created.
    jobs.create(&pp, &gpu_job("second", 2, queued(json!({}))))
        .await?;
    waits_for_admission(&jobs, "second").await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(pods_of(&pods, "second", 0).await?.is_empty());
    let workloads = kueue.workloads().await?;
    ensure!(
        workloads
            .iter()
            .any(|(job, w)| job == "second-a0" && !admitted(w)),
        "second's Workload: {:?}",
        workloads
            .iter()
            .map(|(j, w)| (j, admitted(w)))
            .collect::<Vec<_>>()
    );

    // A gang of higher priority preempts the first: Kueue suspends its Job,
    // which the operator reports as preempted, with no restart counted.
    // Under load the Job controller may first fail the suspended Job on its
    // stopped pods' exit codes (a race inside Kubernetes): then the operator
    // restarts it as a disruption, still counting nothing, and the next
    // attempt waits for admission. Either way nothing is lost or counted.
    let class = UrgentClass::create(&client, &ns.name).await?;
    let urgent = queued(json!({"spec": {"placement": {"priorityClassName": class.name}}}));
    jobs.create(&pp, &gpu_job("urgent", 2, urgent)).await?;
    wait_phase(&jobs, "urgent", TrainingPhase::Running).await?;
    let attempt = eventually("first to be preempted", WAIT, || async {
        let j = jobs.get("first").await?;
        let status = j.status.clone().unwrap_or_default();
        let pending = status.phase == Some(TrainingPhase::Pending);
        let reason = condition(&j, "Reconciling").map(|c| c.reason.clone());
        Ok(match (pending, reason.as_deref(), status.attempt) {
            (true, Some("Preempted"), 0) if status.disruptions == 0 => Some(0),
            (true, Some("WaitingForAdmission"), 1) if status.disruptions == 1 => Some(1),
            _ => None,
        })
    })
    .await?;
    let expected = if attempt == 0 {
        "Preempted"
    } else {
        "GangRestart"
    };
    wait_event(&client, &ns.name, "first", expected).await?;
    eventually("the preempted gang's pods to go", WAIT, || async {
        Ok(pods_of(&pods, "first", 0).await?.is_empty().then_some(()))
    })
    .await?;
    let first = jobs.get("first").await?;
    let status = first.status.clone().unwrap_or_default();
    ensure!(
        status.attempt == attempt && status.restarts == 0,
        "a preemption is no restart: {status:?}"
    );
    // The second fits beside the urgent one (16 + 16 GPUs).
    wait_phase(&jobs, "second", TrainingPhase::Running).await?;

    // When both finish, Kueue admits the first again: the same attempt resumes.
    release_pods(&pods, &pods_of(&pods, "urgent", 0).await?).await?;
    release_pods(&pods, &pods_of(&pods, "second", 0).await?).await?;
    wait_phase(&jobs, "urgent", TrainingPhase::Succeeded).await?;
    wait_phase(&jobs, "second", TrainingPhase::Succeeded).await?;
    let first = wait_phase(&jobs, "first", TrainingPhase::Running).await?;
    let status = first.status.unwrap_or_default();
    ensure!(
        status.attempt == attempt && status.restarts == 0,
        "{status:?}"
    );
    let running = pods_of(&pods, "first", attempt).await?;
    ensure!(
        node_label_of(&client, &running, "node.moe.dev/pool")
            .await?
            .iter()
            .filter(|p| *p == QUOTA_POOL)
            .count()
            == 4
    );

    class.delete().await?;
    ns.delete().await?;
    kueue.delete().await
}

#[tokio::test]
async fn kueue_places_each_gang_in_one_topology_domain() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mtj-tas").await?;
    // Quota beyond the pool's 64 GPUs: whatever waits here waits for room in a domain.
    let kueue = KueueSetup::create(&client, &ns.name, TAS_POOL, 128, true).await?;
    let _op = Operator::start(&ns.name).await?;
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let pp = PostParams::default();
    let [block, rack, _] = moe_e2e::kueue::LEVELS;

    // A rack holds 2 nodes: a 3-node gang that must share one waits, whole,
    // with 8 nodes free.
    let too_wide = gpu_job("too-wide", 3, queued(topology("required", rack)));
    jobs.create(&pp, &too_wide).await?;
    waits_for_admission(&jobs, "too-wide").await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(pods_of(&pods, "too-wide", 0).await?.is_empty());
    jobs.delete("too-wide", &DeleteParams::default()).await?;

    // A block holds 4 nodes in 2 racks: one gang fills one block.
    jobs.create(
        &pp,
        &gpu_job("blocky", 4, queued(topology("required", block))),
    )
    .await?;
    wait_phase(&jobs, "blocky", TrainingPhase::Running).await?;
    let blocky = placed(&client, &pods, "blocky", 4, block).await?;
    ensure!(all_same(&blocky), "blocky across blocks: {blocky:?}");

    // A 2-node gang in one rack: only the other block has a free one.
    jobs.create(
        &pp,
        &gpu_job("racky", 2, queued(topology("required", rack))),
    )
    .await?;
    wait_phase(&jobs, "racky", TrainingPhase::Running).await?;
    let racks = placed(&client, &pods, "racky", 2, rack).await?;
    ensure!(all_same(&racks), "racky across racks: {racks:?}");
    let racky_block = placed(&client, &pods, "racky", 2, block).await?;
    ensure!(
        racky_block[0] != blocky[0],
        "racky shares {} with blocky",
        blocky[0]
    );

    // Expert-parallel groups of 2 nodes (16 ranks of 8 per node), each in one
    // rack, the gang in one block: Kueue's slices of consecutive pods.
    let dp = DeleteParams::default();
    jobs.delete("blocky", &dp).await?;
    jobs.delete("racky", &dp).await?;
    eventually("the pool to empty", WAIT, || async {
        let left = pods.list(&ListParams::default()).await?.items;
        Ok(left.is_empty().then_some(()))
    })
    .await?;
    let sliced = json!({"spec": {
        "parallelism": {"expertParallel": 16},
        "placement": {"topology": {"required": block, "expertGroups": rack}}
    }});
    jobs.create(&pp, &gpu_job("sliced", 4, queued(sliced)))
        .await?;
    wait_phase(&jobs, "sliced", TrainingPhase::Running).await?;
    placed(&client, &pods, "sliced", 4, rack).await?;
    let attempt = jobs
        .get("sliced")
        .await?
        .status
        .map(|s| s.attempt)
        .unwrap_or(0);
    let mut by_index: Vec<(i32, Pod)> = pods_of(&pods, "sliced", attempt)
        .await?
        .into_iter()
        .map(|p| {
            let index = p.labels().get("batch.kubernetes.io/job-completion-index");
            (index.and_then(|i| i.parse().ok()).unwrap_or(-1), p)
        })
        .collect();
    by_index.sort_by_key(|(i, _)| *i);
    let ordered: Vec<Pod> = by_index.into_iter().map(|(_, p)| p).collect();
    let racks = node_label_of(&client, &ordered, rack).await?;
    let blocks = node_label_of(&client, &ordered, block).await?;
    ensure!(all_same(&blocks), "sliced across blocks: {blocks:?}");
    ensure!(
        racks[0] == racks[1] && racks[2] == racks[3] && racks[0] != racks[2],
        "expert groups (nodes 0-1, 2-3) by rack: {racks:?}"
    );
    // Kueue took the slices from the pod template (not a lucky placement).
    let workloads = kueue.workloads().await?;
    let child = format!("sliced-a{attempt}");
    let (_, workload) = workloads
        .iter()
        .find(|(job, _)| *job == child)
        .ok_or_else(|| anyhow::anyhow!("no Workload for {child}"))?;
    let request = &workload.data["spec"]["podSets"][0]["topologyRequest"];
    ensure!(
        request["podSetSliceRequiredTopology"] == rack && request["podSetSliceSize"] == 2,
        "topology request {request}"
    );

    ns.delete().await?;
    kueue.delete().await
}

#[tokio::test]
async fn topology_without_kueue_keeps_the_gang_with_its_first_pod() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mtj-affinity").await?;
    let _op = Operator::start(&ns.name).await?;
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let rack = moe_e2e::kueue::LEVELS[1];
    jobs.create(
        &PostParams::default(),
        &gpu_job("together", 3, topology("required", rack)),
    )
    .await?;
    wait_phase(&jobs, "together", TrainingPhase::Running).await?;
    let racks = placed(&client, &pods, "together", 3, rack).await?;
    ensure!(all_same(&racks), "one gang across racks: {racks:?}");
    ns.delete().await
}

/// How many pods of `job`'s first attempt exist, and how many are bound to a node.
async fn bound(pods: &Api<Pod>, job: &str) -> Result<(usize, usize)> {
    bound_in(pods, job, 0).await
}

/// [`bound`] for attempt `attempt`.
async fn bound_in(pods: &Api<Pod>, job: &str, attempt: i32) -> Result<(usize, usize)> {
    let list = pods_of(pods, job, attempt).await?;
    let bound = list
        .iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some())
        .count();
    Ok((list.len(), bound))
}

/// A pod that takes a whole node of the elastic pool (8 GPUs), as another
/// team's workload would.
fn blocker(name: &str) -> Pod {
    blocker_on(ELASTIC_POOL, name)
}

/// [`blocker`] on `pool`.
fn blocker_on(pool: &str, name: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {HOLD: "true"}},
        "spec": {
            "nodeSelector": {"node.moe.dev/pool": pool},
            "tolerations": [
                {"key": "moe.dev/pool", "operator": "Equal", "value": pool, "effect": "NoSchedule"},
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
            "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "other", "image": "registry.example/other:1",
                "resources": {"limits": {"nvidia.com/gpu": "8"}},
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}
            }]
        }
    }))
    .expect("a valid pod")
}

/// Waits for `name` to run `attempt` on `nodes` ready pods, with nothing
/// counted (no restart, no disruption).
async fn running_uncounted_on(
    jobs: &Api<MoETrainingJob>,
    name: &str,
    attempt: i32,
    nodes: i32,
) -> Result<()> {
    let j = eventually(
        &format!("{name} to run attempt {attempt} on {nodes} nodes"),
        WAIT,
        || async {
            let j = jobs.get(name).await?;
            let s = j.status.clone().unwrap_or_default();
            Ok((s.phase == Some(TrainingPhase::Running) && s.attempt == attempt).then_some(j))
        },
    )
    .await?;
    let s = j.status.unwrap_or_default();
    ensure!(
        s.workers.expected == nodes && s.workers.ready == nodes,
        "{:?}",
        s.workers
    );
    ensure!((s.restarts, s.disruptions) == (0, 0), "{s:?}");
    Ok(())
}

#[tokio::test]
async fn an_elastic_gang_shrinks_to_the_room_there_is_and_grows_back_when_there_is_more()
-> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mtj-elastic").await?;
    let _op = Operator::start(&ns.name).await?;
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let k8s_jobs: Api<Job> = Api::namespaced(client.clone(), &ns.name);
    let pp = PostParams::default();

    // Two of the pool's four nodes are taken.
    for name in ["other-0", "other-1"] {
        pods.create(&pp, &blocker(name)).await?;
    }
    eventually("the other pods running", WAIT, || async {
        let mut running = 0;
        for name in ["other-0", "other-1"] {
            let p = pods.get(name).await?;
            running += usize::from(p.status.and_then(|s| s.phase).as_deref() == Some("Running"));
        }
        Ok((running == 2).then_some(()))
    })
    .await?;

    // 4 nodes of 8 GPUs asked for: the scheduler binds two pods one by one
    // and says why it cannot place the others.
    // (A short grace period: the wait starts after it, and KWOK's pods
    // leave at once.)
    let elastic = json!({"spec": {
        "parallelism": {"elastic": {"minNodes": 1, "shrinkAfterSeconds": 10}},
        "worker": {"terminationGracePeriodSeconds": 5}
    }});
    jobs.create(&pp, &gpu_job("big", 4, on_pool(ELASTIC_POOL, elastic)))
        .await?;
    let message = eventually(
        "big to say 2 of its 4 pods cannot be scheduled",
        WAIT,
        || async {
            let j = jobs.get("big").await?;
            let c = condition(&j, "Reconciling");
            Ok(c.filter(|c| {
                c.reason == "Unschedulable"
                    && c.message.contains("2 of 4 worker pods cannot be scheduled")
            })
            .map(|c| c.message.clone()))
        },
    )
    .await?;
    ensure!(message.contains("Insufficient nvidia.com/gpu"), "{message}");
    ensure!(message.contains("2 bound"), "{message}");
    wait_event(&client, &ns.name, "big", "Unschedulable").await?;

    // Past the wait the next attempt asks for 2 nodes (3 would not split
    // the global batch of 32), not counted as a restart, and runs.
    running_uncounted_on(&jobs, "big", 1, 2).await?;
    wait_event(&client, &ns.name, "big", "GangShrunk").await?;
    let a1 = k8s_jobs.get("big-a1").await?;
    ensure!(
        a1.spec.as_ref().and_then(|s| s.completions) == Some(2),
        "{:?}",
        a1.spec
    );
    let running = pods_of(&pods, "big", 1).await?;
    ensure!(running.len() == 2, "{} pods", running.len());
    for pod in &running {
        // 2 nodes × 8 processes: the worker reads the config with 2 nodes.
        ensure!(env_of(pod, "MOE_WORLD_SIZE").as_deref() == Some("16"));
        ensure!(env_of(pod, "MOE_NODES").as_deref() == Some("2"));
    }

    // Attempt 1 asks for room for the other 2 nodes: two spare pods, which
    // the scheduler cannot place while the other pods hold the nodes.
    let spare_pods = || async {
        let sel = "moe.dev/job-name=big,moe.dev/role=spare,moe.dev/spare-for-attempt=1";
        Ok::<_, anyhow::Error>(pods.list(&ListParams::default().labels(sel)).await?.items)
    };
    let spares = eventually("2 spare pods, unscheduled", WAIT, || async {
        let spares = spare_pods().await?;
        let waiting = spares
            .iter()
            .filter(|p| p.spec.as_ref().is_some_and(|s| s.node_name.is_none()))
            .count();
        Ok((spares.len() == 2 && waiting == 2).then_some(spares))
    })
    .await?;
    let command = spares[0]
        .spec
        .as_ref()
        .and_then(|s| s.containers[0].command.clone());
    ensure!(
        command == Some(vec!["moe-worker".into(), "hold".into()]),
        "{command:?}"
    );
    ensure!(jobs.get("big").await?.status.unwrap_or_default().attempt == 1);

    // The other pods finish: the spares run, and the gang grows back to 4
    // as attempt 2, not counted, the spares gone.
    for name in ["other-0", "other-1"] {
        pods.delete(name, &DeleteParams::default()).await?;
    }
    running_uncounted_on(&jobs, "big", 2, 4).await?;
    wait_event(&client, &ns.name, "big", "GangGrown").await?;
    for pod in &pods_of(&pods, "big", 2).await? {
        ensure!(env_of(pod, "MOE_WORLD_SIZE").as_deref() == Some("32"));
    }
    gone(&k8s_jobs, "big-a1-spare").await
}

/// Waits for Job `name` to be gone.
async fn gone(jobs: &Api<Job>, name: &str) -> Result<()> {
    eventually(&format!("{name} gone"), WAIT, || async {
        Ok(jobs.get_opt(name).await?.is_none().then_some(()))
    })
    .await
}

/// Under the Workload API a gang is bound whole or not at all: a 4-node
/// elastic gang on a 4-node pool where other pods hold 2 nodes is bound
/// nowhere, shrinks to 2 (one fewer would be 3, which does not split its
/// global batch), and asks for its 2 missing nodes with spare pods, which
/// are in no PodGroup and wait, unscheduled. Once the other pods are gone
/// the spares run, and the gang grows back to 4, its PodGroup of 4 bound
/// whole.
#[tokio::test]
async fn under_the_workload_api_an_elastic_gang_shrinks_to_the_room_there_is_and_grows_back()
-> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mtj-gang-elastic").await?;
    let _op = Operator::start_with(&ns.name, &WORKLOAD_API).await?;
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let groups: Api<PodGroup> = Api::namespaced(client.clone(), &ns.name);
    let pp = PostParams::default();
    for name in ["other-0", "other-1"] {
        pods.create(&pp, &blocker_on(GANG_ELASTIC_POOL, name))
            .await?;
    }
    let elastic = json!({"spec": {
        "parallelism": {"elastic": {"minNodes": 1, "shrinkAfterSeconds": 5}},
        "worker": {"terminationGracePeriodSeconds": 5}
    }});
    jobs.create(
        &pp,
        &gpu_job("wide", 4, on_pool(GANG_ELASTIC_POOL, elastic)),
    )
    .await?;
    running_uncounted_on(&jobs, "wide", 1, 2).await?;
    wait_event(&client, &ns.name, "wide", "GangShrunk").await?;
    let spares = eventually("2 spare pods, unscheduled", WAIT, || async {
        let sel = "moe.dev/job-name=wide,moe.dev/role=spare,moe.dev/spare-for-attempt=1";
        let spares = pods.list(&ListParams::default().labels(sel)).await?.items;
        let waiting = spares
            .iter()
            .filter(|p| p.spec.as_ref().is_some_and(|s| s.node_name.is_none()))
            .count();
        Ok((spares.len() == 2 && waiting == 2).then_some(spares))
    })
    .await?;
    ensure!(
        spares.iter().all(|p| p
            .spec
            .as_ref()
            .is_some_and(|s| s.scheduling_group.is_none())),
        "spares join no PodGroup"
    );

    for name in ["other-0", "other-1"] {
        pods.delete(name, &DeleteParams::default()).await?;
    }
    running_uncounted_on(&jobs, "wide", 2, 4).await?;
    wait_event(&client, &ns.name, "wide", "GangGrown").await?;
    ensure!(bound_in(&pods, "wide", 2).await? == (4, 4));
    let group = groups.get("wide-a2").await?;
    ensure!(
        group
            .spec
            .scheduling_policy
            .gang
            .as_ref()
            .map(|g| g.min_count)
            == Some(4),
        "{:?}",
        group.spec
    );
    ns.delete().await
}

#[tokio::test]
async fn the_workload_api_binds_a_gang_whole_or_not_at_all() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mtj-gang").await?;
    let _op = Operator::start_with(&ns.name, &WORKLOAD_API).await?;
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let groups: Api<PodGroup> = Api::namespaced(client.clone(), &ns.name);
    let pp = PostParams::default();
    let rack = moe_e2e::kueue::LEVELS[1];

    // The 5-node pool has a rack of 2 and a rack of 3: a 3-node gang that
    // must share a rack has one place. The scheduler picks it for the whole
    // group; pod by pod, the first pod could take the small rack and strand
    // the third.
    jobs.create(
        &pp,
        &gpu_job("rack", 3, on_pool(GANG_POOL, topology("required", rack))),
    )
    .await?;
    wait_phase(&jobs, "rack", TrainingPhase::Running).await?;
    let racks = placed(&client, &pods, "rack", 3, rack).await?;
    ensure!(
        racks.iter().all(|r| r == "rack-gang-1"),
        "the gang is not in the one rack of 3: {racks:?}"
    );
    let group = groups.get("rack-a0").await?;
    ensure!(
        group
            .spec
            .scheduling_policy
            .gang
            .as_ref()
            .map(|g| g.min_count)
            == Some(3),
        "rack-a0: {:?}",
        group.spec
    );

    // Two nodes are left, a 4-node gang needs four: none of its pods is
    // bound (pod by pod, two would be, holding their GPUs for nothing), and
    // the job says why, in the scheduler's words.
    jobs.create(&pp, &gpu_job("whole", 4, on_pool(GANG_POOL, json!({}))))
        .await?;
    pending_because(&jobs, "whole", "Unschedulable").await?;
    let j = jobs.get("whole").await?;
    let message = condition(&j, "Reconciling").map(|c| c.message.clone());
    ensure!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("all 4 worker pods")),
        "{message:?}"
    );
    let (created, on_nodes) = eventually("whole's 4 pods created", WAIT, || async {
        let (created, on_nodes) = bound(&pods, "whole").await?;
        Ok((created == 4).then_some((created, on_nodes)))
    })
    .await?;
    ensure!(
        on_nodes == 0,
        "{on_nodes} of {created} pods bound: not all or nothing"
    );
    wait_event(&client, &ns.name, "whole", "Unschedulable").await?;

    // The first gang finishes: its nodes free, the second is bound whole.
    release_pods(&pods, &pods_of(&pods, "rack", 0).await?).await?;
    wait_phase(&jobs, "rack", TrainingPhase::Succeeded).await?;
    wait_phase(&jobs, "whole", TrainingPhase::Running).await?;
    ensure!(bound(&pods, "whole").await? == (4, 4));

    // One node is free. A 3-node gang of higher priority preempts the
    // 4-node one, whole (its PodGroup carries the pods' priority and
    // disruptionMode PodGroup): a disruption, so a restart that is not
    // counted, and the next attempt waits for room, bound nowhere.
    let class = UrgentClass::create(&client, &ns.name).await?;
    let urgent = on_pool(
        GANG_POOL,
        json!({"spec": {"placement": {"priorityClassName": class.name}}}),
    );
    jobs.create(&pp, &gpu_job("urgent", 3, urgent)).await?;
    let preempted = async {
        wait_phase(&jobs, "urgent", TrainingPhase::Running).await?;
        let status = eventually("whole's gang preempted and restarted", WAIT, || async {
            let status = jobs.get("whole").await?.status.unwrap_or_default();
            Ok((status.attempt >= 1).then_some(status))
        })
        .await?;
        ensure!(
            status.disruptions >= 1 && status.restarts == 0,
            "a preemption is a disruption, not a counted restart: {status:?}"
        );
        pending_because(&jobs, "whole", "Unschedulable").await
    }
    .await;
    class.delete().await?;
    preempted?;
    ns.delete().await
}

#[tokio::test]
async fn dra_claims_give_each_worker_pod_an_allocated_device() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mtj-dra").await?;
    let _op = Operator::start(&ns.name).await?;
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let claims: Api<ResourceClaim> = Api::namespaced(client.clone(), &ns.name);
    let templates: Api<ResourceClaimTemplate> = Api::namespaced(client.clone(), &ns.name);
    let pp = PostParams::default();
    // One device of the fake driver's class per pod (the DRA pool has one per node).
    templates
        .create(
            &pp,
            &serde_json::from_value(json!({
                "metadata": {"name": "fabric"},
                "spec": {"spec": {"devices": {"requests": [
                    {"name": "nic", "exactly": {"deviceClassName": DRA_CLASS}}
                ]}}}
            }))?,
        )
        .await?;
    let wired = |nodes| {
        gpu_job(
            "",
            nodes,
            on_pool(
                DRA_POOL,
                json!({"spec": {"worker": {"resourceClaims": [{"name": "nic", "resourceClaimTemplateName": "fabric"}]}}}),
            ),
        )
    };
    let mut first = wired(2);
    first.metadata.name = Some("wired".into());
    jobs.create(&pp, &first).await?;
    wait_phase(&jobs, "wired", TrainingPhase::Running).await?;
    // Each pod has a claim of its own, allocated a device on its own node by
    // the scheduler, reserved for it; the worker container names the claim.
    let list = pods_of(&pods, "wired", 0).await?;
    ensure!(list.len() == 2);
    for pod in &list {
        let spec = pod.spec.as_ref().unwrap();
        let container = &spec.containers[0];
        ensure!(
            container
                .resources
                .as_ref()
                .and_then(|r| r.claims.as_ref())
                .is_some_and(|c| c[0].name == "nic"),
            "{:?}",
            container.resources
        );
        let name = pod
            .status
            .as_ref()
            .and_then(|s| s.resource_claim_statuses.as_ref())
            .and_then(|s| s.first())
            .and_then(|s| s.resource_claim_name.clone())
            .context("no claim made for the pod")?;
        let claim = claims.get(&name).await?;
        let status = claim.status.unwrap_or_default();
        let results = status
            .allocation
            .and_then(|a| a.devices)
            .and_then(|d| d.results)
            .unwrap_or_default();
        ensure!(
            results.len() == 1
                && results[0].driver == DRA_CLASS
                && Some(&results[0].pool) == spec.node_name.as_ref(),
            "{} on {:?}: {results:?}",
            pod.name_any(),
            spec.node_name
        );
        ensure!(
            status
                .reserved_for
                .iter()
                .flatten()
                .any(|r| r.name == pod.name_any()),
            "the claim is not reserved for its pod"
        );
    }

    // Both devices are taken: a third pod with a claim waits, then starts
    // once the first gang is done and its claims are freed.
    let mut second = wired(1);
    second.metadata.name = Some("later".into());
    jobs.create(&pp, &second).await?;
    eventually("later's pod unschedulable for its claim", WAIT, || async {
        let list = pods_of(&pods, "later", 0).await?;
        let waiting = list.iter().any(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "PodScheduled" && c.status == "False")
                })
        });
        Ok(waiting.then_some(()))
    })
    .await?;
    release_pods(&pods, &list).await?;
    wait_phase(&jobs, "wired", TrainingPhase::Succeeded).await?;
    wait_phase(&jobs, "later", TrainingPhase::Running).await?;

    // GPUs from a claim (NVIDIA's DRA driver, played here by the fake
    // class): the pod requests no nvidia.com/gpu, and runs where its claim
    // is allocated.
    let mut own = wired(1);
    own.metadata.name = Some("claimed-gpus".into());
    own.spec.worker.gpu_allocation = moe_crds::GpuAllocation::ResourceClaims;
    jobs.create(&pp, &own).await?;
    wait_phase(&jobs, "claimed-gpus", TrainingPhase::Running).await?;
    let pod = pods_of(&pods, "claimed-gpus", 0).await?.remove(0);
    let resources = pod.spec.unwrap().containers[0]
        .resources
        .clone()
        .unwrap_or_default();
    ensure!(
        resources
            .limits
            .is_none_or(|l| !l.contains_key("nvidia.com/gpu")),
        "GPUs requested from the device plugin too"
    );
    ns.delete().await
}

#[tokio::test]
async fn deadline_fails_a_job_and_ttl_deletes_a_finished_one() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mtj-time").await?;
    let _op = Operator::start(&ns.name).await?;
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    jobs.create(
        &PostParams::default(),
        &gpu_job(
            "slow",
            1,
            json!({"spec": {"runPolicy": {"activeDeadlineSeconds": 3}}}),
        ),
    )
    .await?;
    // Not held: KWOK completes the pods at once, and the TTL then removes the job.
    let quick = json!({"spec": {"runPolicy": {"ttlSecondsAfterFinished": 0}, "worker": {"podMetadata": null}}});
    jobs.create(&PostParams::default(), &gpu_job("quick", 1, quick))
        .await?;
    let failed = wait_phase(&jobs, "slow", TrainingPhase::Failed).await?;
    ensure!(condition(&failed, "Failed").is_some_and(|c| c.reason == "DeadlineExceeded"));
    eventually("quick to be deleted by its TTL", WAIT, || async {
        Ok(jobs.get_opt("quick").await?.is_none().then_some(()))
    })
    .await?;
    ns.delete().await
}

#[tokio::test]
async fn invalid_specs_are_rejected_by_the_apiserver_naming_the_field() -> Result<()> {
    install()?;
    let client = admin_client().await?;
    let ns = TestNamespace::create(&client, "mtj-invalid", &[]).await?;
    let cases = invalid_training_jobs();
    ensure!(cases.len() >= 15, "the table has {} cases", cases.len());
    let problems = rejection_problems(
        &client,
        &ns.name,
        "MoETrainingJob",
        valid_training_job(),
        &cases,
    )
    .await?;
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    ns.delete().await
}

#[tokio::test]
async fn the_operator_role_is_least_privilege() -> Result<()> {
    install()?;
    let can = operator_can;
    for (verb, resource) in [
        ("create", "jobs.batch"),
        ("delete", "jobs.batch"),
        ("list", "pods"),
        ("patch", "configmaps"),
        ("patch", "moetrainingjobs.moe.dev/status"),
    ] {
        ensure!(can(verb, resource), "the operator needs {verb} {resource}");
    }
    for (verb, resource) in [
        ("get", "secrets"),
        ("list", "secrets"),
        ("create", "pods"),
        ("delete", "pods"),
        ("update", "moetrainingjobs.moe.dev"),
        ("patch", "nodes"),
        ("create", "clusterrolebindings"),
    ] {
        ensure!(
            !can(verb, resource),
            "the operator must not {verb} {resource}"
        );
    }
    ensure!(sh("kubectl get clusterrole moe-moe-operator -o name")?.contains("moe-moe-operator"));
    Ok(())
}

#[tokio::test]
async fn every_example_runs_on_the_fake_cluster() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mtj-examples").await?;
    let _op = Operator::start(&ns.name).await?;
    for claim in ["moe-data", "moe-checkpoints", "moe-models"] {
        bound_claim(&ns.name, claim).await?;
    }
    let dir = moe_e2e::operator::repo_root().join("examples/training");
    let mut files: Vec<_> = std::fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.sort();
    ensure!(files.len() >= 3, "examples: {files:?}");
    let mut kueue = None;
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    for file in &files {
        let mut job: MoETrainingJob = serde_yaml::from_str(&std::fs::read_to_string(file)?)?;
        job.metadata.namespace = Some(ns.name.clone());
        let name = job.name_any();
        let queued = job.spec.placement.queue_name.is_some();
        let cpu = job.spec.worker.device == moe_crds::Device::Cpu;
        let topology = job.spec.placement.topology.as_ref().and_then(|t| t.key());
        let topology = topology.map(|(key, _)| key.to_string());
        if topology.is_some() {
            // Held Running until the whole gang is placed: the scheduler keeps
            // a pod with the gang's pods that are still there, and KWOK would
            // complete each one at once.
            job.spec
                .worker
                .pod_metadata
                .labels
                .insert(HOLD.into(), "true".into());
        }
        jobs.create(&PostParams::default(), &job).await?;
        if let Some(key) = &topology {
            wait_phase(&jobs, &name, TrainingPhase::Running).await?;
            let list = pods_of(&pods, &name, 0).await?;
            let domains = node_label_of(&client, &list, key).await?;
            ensure!(
                domains.len() as i32 == job.spec.parallelism.nodes && all_same(&domains),
                "{name}: across domains of {key}: {domains:?}"
            );
            release_pods(&pods, &list).await?;
        }
        if let Some(queue) = &job.spec.placement.queue_name {
            // The queue the example names, in the real Kueue, over its own pool.
            ensure!(kueue.is_none(), "{name}: one queued example per namespace");
            kueue = Some(
                KueueSetup::with_queue(&client, &ns.name, queue, SPARE_POOL, 32, false).await?,
            );
        }
        // KWOK completes the pods at once: the job runs to Succeeded.
        wait_phase(&jobs, &name, TrainingPhase::Succeeded).await?;
        let list = pods_of(&pods, &name, 0).await?;
        ensure!(
            list.len() as i32 == job.spec.parallelism.nodes,
            "{name}: {} pods",
            list.len()
        );
        for pod in &list {
            let node = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default();
            // A GPU job without a gpuType may land on any untainted GPU pool
            // (the scheduler spreads by load: A100s when the H100s are busy).
            let pinned = job.spec.placement.gpu_type.is_some();
            let want = match (cpu, queued, pinned) {
                (true, _, _) => "cpu-",
                (false, true, _) => "gpu-kueue-spare-",
                (false, false, true) => "gpu-h100-",
                (false, false, false) => "gpu-",
            };
            ensure!(
                node.starts_with(want),
                "{name}: pod {} on {node}",
                pod.name_any()
            );
        }
    }
    ns.delete().await?;
    match kueue {
        Some(k) => k.delete().await,
        None => Ok(()),
    }
}

#[tokio::test]
async fn of_two_replicas_only_the_lease_holder_acts_and_the_other_takes_over() -> Result<()> {
    use k8s_openapi::api::coordination::v1::Lease;
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mtj-ha").await?;
    let a = Operator::start_replica(&ns.name, Some("a")).await?;
    let b = Operator::start_replica(&ns.name, Some("b")).await?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), moe_e2e::operator::OPERATOR_NAMESPACE);
    let lease = format!("e2e-{}", ns.name);
    let holder = eventually("a lease holder", WAIT, || async {
        Ok(leases
            .get_opt(&lease)
            .await?
            .and_then(|l| l.spec?.holder_identity))
    })
    .await?;
    ensure!(holder == a.name || holder == b.name, "holder {holder}");
    let (leader, standby) = if holder == a.name { (a, b) } else { (b, a) };

    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    jobs.create(&PostParams::default(), &gpu_job("ha", 1, json!({})))
        .await?;
    wait_phase(&jobs, "ha", TrainingPhase::Running).await?;
    let reconciles = |m: &str| metric_sum(m, "moe_operator_reconciles_total");
    ensure!(
        reconciles(&leader.metrics().await?) > 0.0,
        "the leader did not reconcile"
    );
    ensure!(
        reconciles(&standby.metrics().await?) == 0.0,
        "the standby reconciled while not leading"
    );

    // The leader goes away; the standby takes the Lease once it expires, and acts.
    let standby_name = standby.name.clone();
    drop(leader);
    eventually(
        "the standby to take the lease",
        Duration::from_secs(60),
        || async {
            let l = leases.get(&lease).await?;
            Ok(
                (l.spec.and_then(|s| s.holder_identity).as_deref() == Some(standby_name.as_str()))
                    .then_some(()),
            )
        },
    )
    .await?;
    jobs.patch(
        "ha",
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"runPolicy": {"suspend": true}}})),
    )
    .await?;
    wait_phase(&jobs, "ha", TrainingPhase::Suspended).await?;
    // The counter moves when a reconcile returns, just after its status
    // write: read it until it has (a single read raced the write once).
    eventually("the standby's reconciles to count", WAIT, || async {
        Ok((reconciles(&standby.metrics().await?) > 0.0).then_some(()))
    })
    .await?;
    ns.delete().await
}

/// Plays rank 0's worker of `job`'s attempt 0: answers `/progress` on its
/// pod's IP as moe-worker does, with `body()` per request. KWOK pod IPs come
/// from a loopback range (`up.sh`), so the test process can hold them.
async fn play_rank_0(
    pods: &Api<Pod>,
    job: &str,
    body: impl Fn() -> String + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rank0 = pods_of(pods, job, 0).await?;
    let ip = rank0
        .iter()
        .find(|p| p.labels().get("batch.kubernetes.io/job-completion-index") == Some(&"0".into()))
        .and_then(|p| p.status.as_ref()?.pod_ip.clone())
        .unwrap_or_default();
    ensure!(
        ip.starts_with("127."),
        "KWOK pod IPs come from a loopback range (up.sh); got {ip:?}"
    );
    let listener = tokio::net::TcpListener::bind((ip.as_str(), 9400)).await?;
    Ok(tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf).await;
            let body = body();
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(reply.as_bytes()).await;
        }
    }))
}

#[tokio::test]
async fn progress_is_read_from_rank_0_into_the_status() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mtj-progress").await?;
    let _op = Operator::start(&ns.name).await?;
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    jobs.create(&PostParams::default(), &gpu_job("prog", 2, json!({})))
        .await?;
    wait_phase(&jobs, "prog", TrainingPhase::Running).await?;
    let server = play_rank_0(&pods, "prog", || {
        r#"{"step":42,"totalSteps":100,"loss":1.23456,"tokensPerSecond":5000.4,"secondsPerStep":36.0,"mfu":0.41234,"lastCheckpointStep":40,"expertLoad":{"maxViolation":0.41234,"layer":1},"fabric":{"allToAllMBps":41250,"ranks":16,"messageBytes":67108864},"evalLoss":1.87654}"#.into()
    })
    .await?;
    let progress = eventually(
        "progress in the status",
        Duration::from_secs(60),
        || async { Ok(jobs.get("prog").await?.status.and_then(|s| s.progress)) },
    )
    .await;
    server.abort();
    let progress = progress?;
    // 58 steps of 36 s left.
    ensure!(
        progress.display == "42/100 (42%, ETA 34m48s)"
            && progress.estimated_remaining_seconds == Some(2088)
            && progress.mfu == Some(0.412),
        "{progress:?}"
    );
    ensure!(
        progress.loss == Some(1.2346)
            && progress.eval_loss == Some(1.8765)
            && progress.last_checkpoint_step == Some(40),
        "{progress:?}"
    );
    ensure!(
        progress
            .expert_load
            .as_ref()
            .is_some_and(|e| e.max_violation == 0.412 && e.layer == 1),
        "{progress:?}"
    );
    ensure!(
        progress
            .fabric
            .as_ref()
            .is_some_and(|f| f.all_to_all_mbps == 41250 && f.ranks == 16),
        "{progress:?}"
    );
    let table = sh(&format!("kubectl get mtj prog -n {} --no-headers", ns.name))?;
    ensure!(
        table.contains("42/100 (42%, ETA 34m48s)"),
        "printer column: {table}"
    );
    ns.delete().await
}

#[tokio::test]
async fn a_gang_whose_rank_0_stops_advancing_is_restarted_as_hung() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mtj-hang").await?;
    let op = Operator::start(&ns.name).await?;
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let job = gpu_job(
        "hang",
        2,
        json!({"spec": {"runPolicy": {"progressDeadlineSeconds": 30}}}),
    );
    jobs.create(&PostParams::default(), &job).await?;
    wait_phase(&jobs, "hang", TrainingPhase::Running).await?;
    // A step every 5 s for 45 s, longer than the deadline, then none: a
    // collective that never returns.
    let started = std::time::Instant::now();
    let advancing = Duration::from_secs(45);
    let server = play_rank_0(&pods, "hang", move || {
        let step = started.elapsed().min(advancing).as_secs() / 5;
        format!(r#"{{"step":{step},"totalSteps":100}}"#)
    })
    .await?;
    let outcome = async {
        tokio::time::sleep(advancing - Duration::from_secs(3)).await;
        let before = jobs.get_status("hang").await?.status.unwrap_or_default();
        ensure!(
            before.attempt == 0 && before.phase == Some(TrainingPhase::Running),
            "a gang that reports new steps is not hung: {before:?}"
        );
        let next = eventually(
            "the hung gang restarted",
            Duration::from_secs(120),
            || async {
                let s = jobs.get_status("hang").await?.status.unwrap_or_default();
                Ok((s.attempt == 1).then_some(s))
            },
        )
        .await?;
        ensure!(next.restarts == 1, "a hang is counted: {next:?}");
        wait_event(&client, &ns.name, "hang", "ProgressDeadlineExceeded").await?;
        // What an alert on hung gangs reads.
        let metrics = op.metrics().await?;
        ensure!(
            metrics.contains(
                r#"moe_operator_warnings_total{kind="MoETrainingJob",reason="ProgressDeadlineExceeded"} 1"#
            ),
            "{metrics}"
        );
        Ok(())
    }
    .await;
    server.abort();
    outcome?;
    ns.delete().await
}

/// A tiny CPU job of one pod training on `data.huggingface` from `hub`,
/// its download held (KWOK keeps the init container running until the test
/// reports how it ended).
fn hub_data_job(name: &str, hub: &str, extra: Value) -> MoETrainingJob {
    let mut job = json!({"spec": {
        "model": {"hiddenSize": 32, "layers": 2, "attentionHeads": 4, "kvHeads": 2, "seqLen": 32,
                  "moe": {"experts": 4, "topK": 2, "sharedExperts": 0, "expertHiddenSize": 32}},
        "training": {"steps": 3, "globalBatchSize": 4, "microBatchSize": 2},
        "parallelism": {"nodes": 1, "processesPerNode": 1, "expertParallel": 1},
        "placement": {"gpuType": null},
        "data": {"builtin": null,
                 "huggingface": {"repo": "moe-tests/two-letters", "path": "train", "endpoint": hub}},
        "worker": {"device": "cpu", "podMetadata": {"labels": {HOLD: null, "kwok.test/init": "hold"}}},
        "runPolicy": {"backoffLimit": 0}
    }});
    merge_patch(&mut job, &extra);
    gpu_job(name, 1, job)
}

/// The attempt's pod once its download runs (KWOK holds it there).
async fn downloading_pod(pods: &Api<Pod>, job: &str) -> Result<Pod> {
    eventually("the pod's download to run", WAIT, || async {
        let list = pods_of(pods, job, 0).await?;
        Ok(list.into_iter().find(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.init_container_statuses.as_ref())
                .and_then(|c| c.first())
                .and_then(|c| c.state.as_ref())
                .is_some_and(|s| s.running.is_some())
        }))
    })
    .await
}

/// Plays the kubelet for `pod`'s worker: its own command (the real
/// `moe-worker train`) with the config the operator rendered for `job`,
/// its paths moved to `kubelet`'s scratch: `link` (`dataDir`, `initDir`),
/// which must name the pod's link under `/run/moe`, becomes the link the
/// test's download made at `pinned/<its name>`. It must exit 0; returns how
/// it exited and its summary.
async fn run_rendered_worker(
    client: &Client,
    ns: &str,
    job: &str,
    kubelet: &Kubelet,
    pod: &Pod,
    link: &str,
) -> Result<(moe_e2e::kubelet::Exited, Value)> {
    let mut config = rendered_config(client, ns, job).await?;
    let in_pod = config[link].as_str().unwrap_or_default().to_string();
    let name = in_pod
        .strip_prefix("/run/moe/")
        .with_context(|| format!("{link} is {in_pod:?}, not a pod's link"))?;
    config[link] = json!(kubelet.path("pinned").join(name));
    config["checkpoint"]["dir"] = json!(kubelet.path("state"));
    config["outputDir"] = json!(kubelet.path("out"));
    let config_path = kubelet.path("config.json");
    std::fs::write(&config_path, config.to_string())?;
    let (command, mut env) = Kubelet::main_container(pod, &config_path)?;
    // The one value a pod reads from the cluster: its rank (from the Job's index).
    env.push(("MOE_NODE_RANK".to_string(), "0".to_string()));
    let trained = kubelet.run_for_output(&command, &env)?;
    ensure!(
        trained.code == 0,
        "exit {}: {}",
        trained.code,
        trained.message
    );
    let summary: Value = serde_json::from_str(
        trained
            .stdout
            .lines()
            .last()
            .context("the worker printed no summary")?,
    )?;
    Ok((trained, summary))
}

/// Runs the pod's init container's own command (the real `moe-worker
/// fetch`) with its volumes in `kubelet`'s scratch directory: the claim at
/// `claim/`, the pod's link at `pinned/data`.
fn run_download(kubelet: &Kubelet, pod: &Pod) -> Result<(i32, String)> {
    kubelet.run_download(
        pod,
        &[
            ("--into", kubelet.path("claim")),
            ("--link", kubelet.path("pinned").join("data")),
        ],
    )
}

/// A Hub dataset, end to end. The test plays the kubelet for the attempt's
/// pod: it runs the init container's own command (the real `moe-worker
/// fetch`, against a fake Hub) and then the worker container's own command
/// (the real `moe-worker train`) with the config the operator rendered,
/// its volumes in a scratch directory. The worker trains on the files under
/// `data.huggingface.path`, through the pod's link: the text there has two
/// letters, so the unigram entropy it reports is ln 2 (reading the `val/`
/// split or the README too would change it; that the download takes only
/// `train/` is worker/tests/fetch.rs's to show). Meanwhile the job says
/// `DownloadingData`; reported done, the pod runs and the job succeeds.
#[tokio::test]
async fn a_hub_dataset_is_downloaded_by_the_pod_and_the_rendered_config_trains_on_it() -> Result<()>
{
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mtj-hub").await?;
    let _op = Operator::start(&ns.name).await?;
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let text = |pattern: &str, n: usize| pattern.repeat(n).into_bytes();
    let hub = FakeHub::start(
        &"da7a".repeat(10),
        vec![
            ("README.md".into(), b"# a corpus of two letters".to_vec()),
            ("train/part-0.txt".into(), text("ab", 3000)),
            ("train/more/part-1.txt".into(), text("ba", 3000)),
            ("val/part-0.txt".into(), text("xyz", 1000)),
        ],
    )?;
    // Held Running once started, so its commit can be read before it ends.
    let held = json!({"spec": {"worker": {"podMetadata": {"labels": {HOLD: "true"}}}}});
    jobs.create(
        &PostParams::default(),
        &hub_data_job("corpus", &hub.endpoint, held),
    )
    .await?;
    let pod = downloading_pod(&pods, "corpus").await?;
    pending_because(&jobs, "corpus", "DownloadingData").await?;

    let kubelet = Kubelet::new("hub-data")?;
    let (code, report) = run_download(&kubelet, &pod)?;
    ensure!(code == 0, "exit {code}: {report}");
    let (_, summary) =
        run_rendered_worker(&client, &ns.name, "corpus", &kubelet, &pod, "dataDir").await?;
    ensure!(summary["steps"] == json!(3), "{summary}");
    let entropy = summary["unigramEntropy"].as_f64().context("no entropy")?;
    ensure!(
        (entropy - std::f64::consts::LN_2).abs() < 1e-3,
        "trained on other tokens than train/'s: unigram entropy {entropy}"
    );

    kubelet
        .report(&pods, &pod.name_any(), "init", 0, &report)
        .await?;
    eventually("the job to name the data's commit", WAIT, || async {
        let j = jobs.get("corpus").await?;
        let commits = j.status.map(|s| s.data_commits).unwrap_or_default();
        Ok((commits == vec!["da7a".repeat(10)]).then_some(()))
    })
    .await?;
    moe_e2e::release_job(&pods, "corpus").await?;
    wait_phase(&jobs, "corpus", TrainingPhase::Succeeded).await?;
    ns.delete().await
}

/// Fine-tuning, end to end. The test plays the kubelet for the attempt's
/// pod: it runs the pod's `download-model` init container (the real
/// `moe-worker fetch`, against a fake Hub holding the tiny random Mixtral of
/// worker/tests/fixtures/hf/mixtral) and then the worker with the config
/// the operator rendered, which starts from those weights (that they are
/// transformers' model is worker/tests/train/pretrained.rs's to show).
#[tokio::test]
async fn a_pretrained_model_is_downloaded_by_the_pod_and_the_worker_starts_from_it() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mtj-tune").await?;
    let _op = Operator::start(&ns.name).await?;
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../worker/tests/fixtures/hf/mixtral");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&fixture)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .context("a file name")?;
        files.push((name.to_string(), std::fs::read(&path)?));
    }
    let hub = FakeHub::start(&"0de1".repeat(10), files)?;
    let job = gpu_job(
        "tune",
        1,
        json!({"spec": {
            "model": {"vocabSize": 400, "hiddenSize": 64, "layers": 2, "attentionHeads": 4,
                      "kvHeads": 2, "seqLen": 32, "ropeTheta": 1000000.0,
                      "moe": {"experts": 4, "topK": 2, "sharedExperts": 0, "expertHiddenSize": 32,
                              "router": "softmax", "normalizeTopK": true},
                      "initFrom": {"huggingface": {"repo": "moe-tests/tiny-mixtral",
                                                   "endpoint": hub.endpoint}}},
            "training": {"steps": 3, "globalBatchSize": 4, "microBatchSize": 2},
            "parallelism": {"nodes": 1, "processesPerNode": 1, "expertParallel": 1},
            "placement": {"gpuType": null},
            "worker": {"device": "cpu", "podMetadata": {"labels": {HOLD: null, "kwok.test/init": "hold"}}},
            "runPolicy": {"backoffLimit": 0}
        }}),
    );
    jobs.create(&PostParams::default(), &job).await?;
    let pod = downloading_pod(&pods, "tune").await?;
    pending_because(&jobs, "tune", "DownloadingData").await?;

    let kubelet = Kubelet::new("hub-model")?;
    let (code, report) = kubelet.run_init(
        &pod,
        Some("download-model"),
        &[
            ("--into", kubelet.path("claim")),
            ("--link", kubelet.path("pinned").join("init")),
        ],
    )?;
    ensure!(code == 0, "exit {code}: {report}");
    let (trained, summary) =
        run_rendered_worker(&client, &ns.name, "tune", &kubelet, &pod, "initDir").await?;
    ensure!(
        trained
            .stderr
            .contains("starting from the pretrained model's weights"),
        "{}",
        trained.stderr
    );
    ensure!(summary["steps"] == json!(3), "{summary}");
    ns.delete().await
}

/// `output.huggingface`, end to end. The test plays the kubelet for the
/// attempt's pod (the real `moe-worker train` with the config the operator
/// rendered, its checkpoint claim in a scratch directory), lets the job
/// succeed, and then for the export pod the operator creates: its own
/// command (the real `moe-worker export`), the checkpoint claim read where
/// the worker wrote it. The directory it leaves is a Hugging Face model the
/// serving loader reads; reported done, the job says `Exported` and where.
#[tokio::test]
async fn a_succeeded_job_exports_its_model_for_hugging_face() -> Result<()> {
    exports_for_hugging_face("mtj-export", json!({})).await
}

/// The same with `training.lora` left at its defaults (admitted as the
/// apiserver fills them in, rendered into the worker's config as given):
/// the export holds the merged model and, under `adapter/`, the adapters
/// in PEFT's layout on each layer's attention projections.
#[tokio::test]
async fn a_lora_jobs_export_holds_its_adapters_for_peft() -> Result<()> {
    exports_for_hugging_face("mtj-export-lora", json!({"lora": {}})).await
}

/// [`a_succeeded_job_exports_its_model_for_hugging_face`], `training`
/// merged into the job's.
async fn exports_for_hugging_face(namespace: &str, training: serde_json::Value) -> Result<()> {
    let lora = training.get("lora").is_some();
    let mut training_spec = json!({"steps": 3, "globalBatchSize": 4, "microBatchSize": 2});
    moe_crds::fixtures::merge_patch(&mut training_spec, &training);
    let client = admin_client().await?;
    let ns = restricted_ns(&client, namespace).await?;
    let _op = Operator::start(&ns.name).await?;
    for claim in ["ckpt", "models"] {
        bound_claim(&ns.name, claim).await?;
    }
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let job = exporting_job(
        "hf",
        json!({"vocabSize": 256, "hiddenSize": 32, "layers": 2, "attentionHeads": 4,
               "kvHeads": 2, "headDim": 12, "qkNorm": "perHead", "seqLen": 32,
               "moe": {"experts": 4, "topK": 2, "sharedExperts": 0, "expertHiddenSize": 16,
                       "router": "softmax", "balancing": {"auxLossFree": {"enabled": false}}}}),
        training_spec,
    );
    jobs.create(&PostParams::default(), &job).await?;
    let kubelet = Kubelet::new(namespace)?;
    train_here(&client, &ns.name, &kubelet, "hf").await?;

    let export = running_export_pod(&pods, "hf").await?;
    let exporting = jobs.get("hf").await?;
    let output_status = exporting
        .status
        .and_then(|s| s.output)
        .context("no status.output")?;
    ensure!(
        output_status.path == format!("exports/{}/hf", ns.name)
            && output_status.architecture == "Qwen3MoeForCausalLM",
        "{output_status:?}"
    );
    let spec = export.spec.as_ref().context("no spec")?;
    ensure!(
        spec.containers[0]
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .is_some(),
        "the export pod's memory is bounded"
    );
    let exported = kubelet.run_for_output(&export_command_here(&kubelet, &export)?, &[])?;
    ensure!(exported.code == 0, "export: {}", exported.message);
    let model_dir = kubelet.path("models").join(&output_status.path);
    let loaded = exported_config(&model_dir)?;
    ensure!(
        loaded["architectures"][0] == "Qwen3MoeForCausalLM" && loaded["head_dim"] == 12,
        "{loaded}"
    );
    for file in ["model.safetensors", "tokenizer.json"] {
        ensure!(
            model_dir.join(file).is_file(),
            "no {file} in {}",
            model_dir.display()
        );
    }
    let adapter = model_dir.join("adapter").join("adapter_config.json");
    ensure!(
        adapter.is_file() == lora,
        "adapter/ exported: {}",
        adapter.is_file()
    );
    if lora {
        let config: serde_json::Value = serde_json::from_slice(&std::fs::read(&adapter)?)?;
        ensure!(
            config["peft_type"] == "LORA"
                && config["r"] == 8
                && config["target_modules"]
                    .as_array()
                    .is_some_and(|m| m.len() == 8 && m[0] == "model.layers.0.self_attn.q_proj"),
            "{config}"
        );
    }
    moe_e2e::release_job(&pods, "hf").await?;
    eventually("the job to say Exported", WAIT, || async {
        let j = jobs.get("hf").await?;
        let output = j.status.and_then(|s| s.output);
        Ok(output.filter(|o| o.phase == moe_crds::OutputPhase::Exported))
    })
    .await?;
    wait_event(&client, &ns.name, "hf", "Exported").await?;
    ns.delete().await
}

/// `spec.adapters` end to end: a LoRA job fine-tunes the repository's tiny
/// Qwen3-MoE (`model.initFrom.volume`) and exports its adapters; a service
/// serving that model with the job's adapters waits for the export, then
/// its pod mounts the export's claim read-only and its config names the
/// adapter's directory. The test plays the kubelet for the training, the
/// export and the server: the real `moe-worker serve`, with the pod's
/// command and the config the operator rendered, its claims here, lists
/// the adapter beside the model and answers a completion in its name.
/// (That the adapter's arithmetic is the merged model's is
/// worker/tests/serve_adapters.rs's to show.)
#[tokio::test]
async fn a_lora_jobs_adapters_are_served_beside_its_base_model() -> Result<()> {
    use moe_crds::MoEInferenceService;
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mtj-adapters").await?;
    let _op = Operator::start(&ns.name).await?;
    for claim in ["ckpt", "models", "base"] {
        bound_claim(&ns.name, claim).await?;
    }
    let kubelet = Kubelet::new(&ns.name)?;
    // The base model on its claim.
    let fixture = moe_e2e::operator::repo_root().join("worker/tests/fixtures/hf/qwen3_moe");
    let base = kubelet.path("base").join("qwen3");
    std::fs::create_dir_all(&base)?;
    for file in std::fs::read_dir(&fixture)? {
        let file = file?;
        std::fs::copy(file.path(), base.join(file.file_name()))?;
    }
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let services: Api<MoEInferenceService> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    // tiny-lora.yaml's model, shorter.
    let job = exporting_job(
        "tune",
        json!({"vocabSize": 330, "hiddenSize": 64, "layers": 2, "denseLayers": 1,
               "denseHiddenSize": 64, "attentionHeads": 4, "kvHeads": 2, "headDim": 32,
               "qkNorm": "perHead", "normEpsilon": 1.0e-6, "seqLen": 32, "ropeTheta": 1000000,
               "moe": {"experts": 8, "topK": 2, "sharedExperts": 0, "expertHiddenSize": 16,
                       "router": "softmax", "normalizeTopK": true,
                       "balancing": {"auxLossFree": {"enabled": false}}},
               "initFrom": {"volume": {"claimName": "base", "path": "qwen3"}}}),
        json!({"steps": 2, "globalBatchSize": 2, "microBatchSize": 2,
               "lora": {"targets": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]}}),
    );
    jobs.create(&PostParams::default(), &job).await?;
    let service: MoEInferenceService = serde_json::from_value(json!({
        "apiVersion": "moe.dev/v1alpha1", "kind": "MoEInferenceService",
        "metadata": {"name": "chat"},
        "spec": {
            "model": {"volume": {"claimName": "base", "path": "qwen3", "format": "huggingface"}},
            "adapters": [{"name": "chat-tuned", "fromTrainingJob": {"name": "tune"}}],
            "serving": {"precision": "fp32", "startupTimeoutSeconds": 120},
            "worker": {"device": "cpu"}
        }
    }))?;
    services.create(&PostParams::default(), &service).await?;
    // Until the job has exported, the service waits, naming it.
    eventually("the service to wait for the job", WAIT, || async {
        let s = services.get("chat").await?;
        let conditions = s.status.map(|s| s.conditions).unwrap_or_default();
        Ok(conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .filter(|c| c.reason == "WaitingForTrainingJob" && c.message.contains("tune"))
            .cloned())
    })
    .await?;

    // The job's worker, then its export, played here.
    train_here(&client, &ns.name, &kubelet, "tune").await?;
    let export = running_export_pod(&pods, "tune").await?;
    let exported = kubelet.run_for_output(&export_command_here(&kubelet, &export)?, &[])?;
    ensure!(exported.code == 0, "export: {}", exported.message);
    moe_e2e::release_job(&pods, "tune").await?;

    // Then the service's pod mounts the export, read-only.
    let server = eventually("the server pod", WAIT, || async {
        let list = pods
            .list(&ListParams::default().labels("moe.dev/service-name=chat"))
            .await?;
        Ok(list.items.into_iter().next())
    })
    .await?;
    let spec = server.spec.as_ref().context("no spec")?;
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "adapters-0")
        .and_then(|v| v.persistent_volume_claim.as_ref())
        .context("no adapters-0 volume")?;
    ensure!(
        volume.claim_name == "models" && volume.read_only == Some(true),
        "{volume:?}"
    );
    let mut config = rendered_config(&client, &ns.name, "chat").await?;
    let adapter_dir = format!("/adapters/0/exports/{}/tune/adapter", ns.name);
    ensure!(
        config["adapters"][0]["name"] == "chat-tuned"
            && config["adapters"][0]["dir"] == adapter_dir,
        "{config}"
    );
    // The server, its claims here.
    config["modelDir"] = json!(kubelet.path("base").join("qwen3"));
    config["adapters"][0]["dir"] = json!(
        kubelet
            .path("models")
            .join(format!("exports/{}/tune/adapter", ns.name))
    );
    let config_path = kubelet.path("server.json");
    std::fs::write(&config_path, config.to_string())?;
    let (mut command, env) = Kubelet::main_container(&server, &config_path)?;
    ensure!(command[..2] == ["moe-worker", "serve"], "{command:?}");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    command.extend(["--host", "127.0.0.1", "--port", &port.to_string()].map(String::from));
    let _running = kubelet.start(&command, &env)?;
    let url = format!("http://127.0.0.1:{port}");
    let models = eventually("the server to list its models", WAIT, || async {
        Ok(
            match moe_e2e::operator::http_request("GET", &format!("{url}/v1/models"), None).await {
                Ok((200, body)) => Some(serde_json::from_str::<Value>(&body)?),
                _ => None,
            },
        )
    })
    .await?;
    let listed: Vec<(&str, &str)> = models["data"]
        .as_array()
        .context("no data")?
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap_or_default(),
                m["parent"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    ensure!(listed == [("chat", ""), ("chat-tuned", "chat")], "{models}");
    let body = json!({"model": "chat-tuned", "prompt": "Hello", "max_tokens": 4, "temperature": 0});
    let (status, reply) = moe_e2e::operator::http_request(
        "POST",
        &format!("{url}/v1/completions"),
        Some(&body.to_string()),
    )
    .await?;
    let reply: Value = serde_json::from_str(&reply)?;
    ensure!(
        status == 200 && reply["model"] == "chat-tuned" && reply["usage"]["completion_tokens"] == 4,
        "{status}: {reply}"
    );
    ns.delete().await
}

/// A run that `training.evaluation.patience` stops early, end to end. The
/// test plays the kubelet for the worker pod: the real `moe-worker train`
/// with the config the operator rendered (at a zero learning rate the
/// held-out loss never improves on its first value, so a patience of 2
/// stops it after step 3 of 6), then reports how the container ended with
/// the termination message the worker wrote. No poll of `/progress` saw
/// the run: the operator reads the final step and checkpoint from that
/// message and says the job stopped early. With `keepBest` the first
/// checkpoint (step 2: every later loss only ties) is the job's model, kept
/// besides the newest (`keep: 1`): a service of the job serves step 2.
#[tokio::test]
async fn a_job_that_stops_early_is_read_from_rank_0s_termination_message_and_serves_its_best()
-> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mtj-early").await?;
    let _op = Operator::start(&ns.name).await?;
    bound_claim(&ns.name, "ckpt").await?;
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let job = gpu_job(
        "early",
        1,
        json!({"spec": {
            "model": {"hiddenSize": 32, "layers": 2, "attentionHeads": 4, "kvHeads": 2, "seqLen": 32,
                      "moe": {"experts": 4, "topK": 2, "sharedExperts": 0, "expertHiddenSize": 32,
                              "balancing": {"auxLossFree": {"enabled": false}}}},
            "training": {"steps": 6, "globalBatchSize": 4, "microBatchSize": 2,
                         "optimizer": {"learningRate": 0.0, "minLearningRate": 0.0},
                         "evaluation": {"intervalSteps": 1, "batches": 1, "patience": 2,
                                        "keepBest": true}},
            "parallelism": {"nodes": 1, "processesPerNode": 1, "expertParallel": 1},
            "placement": {"gpuType": null},
            "checkpoint": {"claimName": "ckpt", "path": "runs", "intervalSteps": 2, "keep": 1},
            "worker": {"device": "cpu"},
            "runPolicy": {"backoffLimit": 0}
        }}),
    );
    jobs.create(&PostParams::default(), &job).await?;
    wait_phase(&jobs, "early", TrainingPhase::Running).await?;
    let kubelet = Kubelet::new("early")?;
    let pod = pods_of(&pods, "early", 0)
        .await?
        .into_iter()
        .next()
        .context("no worker pod")?;
    let mut config = rendered_config(&client, &ns.name, "early").await?;
    for path in ["/outputDir", "/checkpoint/dir"] {
        let here = on_claims_here(
            &kubelet,
            config
                .pointer(path)
                .and_then(Value::as_str)
                .unwrap_or_default(),
        );
        *config.pointer_mut(path).context(path)? = json!(here);
    }
    let config_path = kubelet.path("config.json");
    std::fs::write(&config_path, config.to_string())?;
    let (command, mut env) = Kubelet::main_container(&pod, &config_path)?;
    env.push(("MOE_NODE_RANK".to_string(), "0".to_string()));
    let trained = kubelet.run_for_output(&command, &env)?;
    ensure!(trained.code == 0, "train: {}", trained.message);
    let summary: Value = serde_json::from_str(trained.stdout.lines().last().unwrap_or_default())?;
    ensure!(
        summary["stoppedEarly"] == json!(true) && summary["steps"] == json!(3),
        "{summary}"
    );
    kubelet
        .report(&pods, &pod.name_any(), "succeeded", 0, &trained.message)
        .await?;

    let done = wait_phase(&jobs, "early", TrainingPhase::Succeeded).await?;
    let status = done.status.unwrap_or_default();
    let progress = status.progress.context("no status.progress")?;
    let eval_loss = summary["evalLoss"].as_f64().context("no evalLoss")?;
    ensure!(
        progress.step == 3
            && progress.total_steps == 6
            && progress.last_checkpoint_step == Some(3)
            && progress.best_checkpoint_step == Some(2)
            && progress.stopped_early
            && progress.display == "3/6 (50%, stopped early)"
            && progress.eval_loss == Some((eval_loss * 1e4).round() / 1e4),
        "{progress:?} from {}",
        trained.message
    );
    let succeeded = status.conditions.iter().find(|c| c.type_ == "Succeeded");
    ensure!(
        succeeded.is_some_and(|c| c
            .message
            .starts_with("training stopped early at step 3 of 6 in attempt 0")),
        "{succeeded:?}"
    );
    wait_event(&client, &ns.name, "early", "Succeeded").await?;

    // A service of the job serves its best checkpoint: step 2.
    let services: Api<moe_crds::MoEInferenceService> = Api::namespaced(client.clone(), &ns.name);
    let service: moe_crds::MoEInferenceService = serde_json::from_value(json!({
        "apiVersion": "moe.dev/v1alpha1",
        "kind": "MoEInferenceService",
        "metadata": {"name": "served"},
        "spec": {"model": {"fromTrainingJob": {"name": "early"}}, "replicas": 1,
                 "worker": {"device": "cpu"}}
    }))?;
    services.create(&PostParams::default(), &service).await?;
    let revision = eventually("the service's model revision", WAIT, || async {
        Ok(services
            .get("served")
            .await?
            .status
            .and_then(|s| s.model_revision))
    })
    .await?;
    ensure!(revision.ends_with("@step-2"), "{revision}");
    let checkpoints = kubelet
        .path("ckpt")
        .join(format!("runs/{}/early/checkpoints", ns.name));
    let mut kept: Vec<String> = std::fs::read_dir(&checkpoints)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    kept.sort();
    ensure!(
        kept == ["step-00000002", "step-00000003"],
        "the best and the newest are on the claim: {kept:?}"
    );
    ns.delete().await
}

/// `model.initFrom.fromTrainingJob`, end to end: a fine-tuning job of a
/// pretraining job's model waits (Pending, `WaitingForTrainingJob`, no
/// attempt) while that one runs; once it has Succeeded, the checkpoint it
/// starts from is pinned in `status.initCheckpoint`, and its pods mount
/// that job's claim read-only with the step's directory as `initDir`. A
/// job of another model shape stalls, naming the field. (The worker
/// starting from such a checkpoint: `worker/tests/train/pretrained.rs`.)
#[tokio::test]
async fn a_job_starting_from_another_waits_for_it_and_mounts_its_pinned_checkpoint() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mtj-chain").await?;
    let _op = Operator::start(&ns.name).await?;
    bound_claim(&ns.name, "ckpt").await?;
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let cpu = |extra: Value| {
        let mut spec = json!({"spec": {
            "training": {"steps": 10, "globalBatchSize": 4, "microBatchSize": 2},
            "parallelism": {"nodes": 1, "processesPerNode": 1, "expertParallel": 1},
            "placement": {"gpuType": null},
            "worker": {"device": "cpu"}
        }});
        merge_patch(&mut spec, &extra);
        spec
    };
    let pretrain = gpu_job(
        "pretrain",
        1,
        cpu(
            json!({"spec": {"checkpoint": {"claimName": "ckpt", "path": "runs", "intervalSteps": 5}}}),
        ),
    );
    jobs.create(&PostParams::default(), &pretrain).await?;
    wait_phase(&jobs, "pretrain", TrainingPhase::Running).await?;
    let from = json!({"initFrom": {"fromTrainingJob": {"name": "pretrain"}}});
    let tune = gpu_job("tune", 1, cpu(json!({"spec": {"model": from}})));
    jobs.create(&PostParams::default(), &tune).await?;
    let wider = gpu_job(
        "wider",
        1,
        cpu(json!({"spec": {"model": {"hiddenSize": 96, "initFrom": from["initFrom"]}}})),
    );
    jobs.create(&PostParams::default(), &wider).await?;
    eventually("tune to wait for pretrain", WAIT, || async {
        let j = jobs.get("tune").await?;
        Ok(condition(&j, "Reconciling")
            .is_some_and(|c| {
                c.reason == "WaitingForTrainingJob" && c.message.contains("pretrain is Running")
            })
            .then_some(()))
    })
    .await?;
    let k8s_jobs: Api<Job> = Api::namespaced(client.clone(), &ns.name);
    let attempts = |name: &str| {
        let k8s_jobs = k8s_jobs.clone();
        let selector = format!("moe.dev/job-name={name}");
        async move {
            Ok::<_, anyhow::Error>(
                k8s_jobs
                    .list(&ListParams::default().labels(&selector))
                    .await?
                    .items
                    .len(),
            )
        }
    };
    ensure!(
        attempts("tune").await? == 0,
        "no attempt while pretrain runs"
    );

    moe_e2e::release_job(&pods, "pretrain").await?;
    wait_phase(&jobs, "pretrain", TrainingPhase::Succeeded).await?;
    // Woken by pretrain's end, not by its 30 s poll.
    let at = eventually(
        "tune's pinned checkpoint",
        Duration::from_secs(15),
        || async {
            Ok(jobs
                .get("tune")
                .await?
                .status
                .and_then(|s| s.init_checkpoint))
        },
    )
    .await?;
    let path = format!("runs/{}/pretrain/checkpoints/step-00000010", ns.name);
    ensure!(
        at.step == 10
            && at.claim_name == "ckpt"
            && at.path == path
            && at.job == format!("{}/pretrain", ns.name),
        "{at:?}"
    );
    let pod = eventually("tune's worker pod", WAIT, || async {
        Ok(pods_of(&pods, "tune", 0).await?.into_iter().next())
    })
    .await?;
    let claim = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .and_then(|v| v.iter().find(|v| v.name == "init"))
        .and_then(|v| v.persistent_volume_claim.clone())
        .context("no init claim")?;
    ensure!(
        claim.claim_name == "ckpt" && claim.read_only == Some(true),
        "{claim:?}"
    );
    let config = rendered_config(&client, &ns.name, "tune").await?;
    ensure!(
        config["initDir"] == json!(format!("/init/{path}")),
        "{config}"
    );

    let stalled = eventually("wider to stall", Duration::from_secs(90), || async {
        let j = jobs.get("wider").await?;
        Ok(condition(&j, "Stalled")
            .filter(|c| c.status == "True" && c.reason == "ModelIncompatible")
            .map(|c| c.message.clone()))
    })
    .await?;
    ensure!(
        stalled.contains("model.hiddenSize is 64 there, 96 here"),
        "{stalled}"
    );
    ensure!(
        attempts("wider").await? == 0,
        "no attempt for a model it cannot start from"
    );
    wait_event(&client, &ns.name, "wider", "ModelIncompatible").await?;
    ns.delete().await
}

/// An export that fails (the test plays the kubelet: the export pod's own
/// command, the real `moe-worker export`, finds no checkpoint on the claim)
/// leaves the job Succeeded and says why in `status.output` and an Event.
#[tokio::test]
async fn a_failed_export_says_why_in_the_exports_words() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mtj-export-fail").await?;
    let _op = Operator::start(&ns.name).await?;
    for claim in ["ckpt", "models"] {
        bound_claim(&ns.name, claim).await?;
    }
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let job = gpu_job(
        "lost",
        1,
        json!({"spec": {
            "model": {"moe": {"sharedExperts": 0, "router": "softmax", "normalizeTopK": true,
                              "balancing": {"auxLossFree": {"enabled": false}}}},
            "parallelism": {"nodes": 1, "processesPerNode": 8, "expertParallel": 8},
            "checkpoint": {"claimName": "ckpt"},
            "output": {"huggingface": {"claimName": "models"}}
        }}),
    );
    jobs.create(&PostParams::default(), &job).await?;
    wait_phase(&jobs, "lost", TrainingPhase::Running).await?;
    // The gang ends without having written a checkpoint to export.
    moe_e2e::release_job(&pods, "lost").await?;
    wait_phase(&jobs, "lost", TrainingPhase::Succeeded).await?;
    let export = running_export_pod(&pods, "lost").await?;
    let kubelet = Kubelet::new("export-fail")?;
    std::fs::create_dir_all(kubelet.path("ckpt"))?;
    let (code, message) = kubelet.run(&export_command_here(&kubelet, &export)?, &[])?;
    ensure!(code == 2, "exit {code}: {message}");
    kubelet
        .report(&pods, &export.name_any(), "failed", code, &message)
        .await?;
    let output = eventually("status.output to say Failed", WAIT, || async {
        let j = jobs.get("lost").await?;
        let output = j.status.and_then(|s| s.output);
        Ok(output.filter(|o| o.phase == moe_crds::OutputPhase::Failed))
    })
    .await?;
    let said = output.message.unwrap_or_default();
    ensure!(
        said.contains("--model") && message.contains(&said),
        "status.output.message {said:?}; the export said {message:?}"
    );
    ensure!(
        jobs.get("lost").await?.status.and_then(|s| s.phase) == Some(TrainingPhase::Succeeded),
        "the job stays Succeeded"
    );
    wait_event(&client, &ns.name, "lost", "ExportFailed").await?;
    ns.delete().await
}

/// The export pod of job `job`, once it runs (held Running: the worker's
/// pod labels hold it).
async fn running_export_pod(pods: &Api<Pod>, job: &str) -> Result<Pod> {
    eventually("the export pod to run", WAIT, || async {
        let selector = format!("moe.dev/job-name={job},moe.dev/role=export");
        let list = pods.list(&ListParams::default().labels(&selector)).await?;
        Ok(list
            .into_iter()
            .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")))
    })
    .await
}

/// A one-process CPU job `name` of `model` and `training` that checkpoints
/// on claim `ckpt` (under `runs/`) and exports on claim `models` (under
/// `exports/`), with no restarts.
fn exporting_job(name: &str, model: Value, training: Value) -> MoETrainingJob {
    gpu_job(
        name,
        1,
        json!({"spec": {
            "model": model,
            "training": training,
            "parallelism": {"nodes": 1, "processesPerNode": 1, "expertParallel": 1},
            "placement": {"gpuType": null},
            "checkpoint": {"claimName": "ckpt", "path": "runs"},
            "output": {"huggingface": {"claimName": "models", "path": "exports"}},
            "worker": {"device": "cpu"},
            "runPolicy": {"backoffLimit": 0}
        }}),
    )
}

/// Plays the kubelet for job `name`'s worker: the real `moe-worker train`
/// with the config the operator rendered, its claims on `kubelet`'s
/// scratch ([`on_claims_here`]); then releases the pod and waits for the
/// job to succeed.
async fn train_here(client: &Client, ns: &str, kubelet: &Kubelet, name: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), ns);
    let pod = eventually("the worker pod", WAIT, || async {
        Ok(pods_of(&pods, name, 0).await?.into_iter().next())
    })
    .await?;
    let mut config = rendered_config(client, ns, name).await?;
    for pointer in ["/outputDir", "/checkpoint/dir", "/initDir"] {
        if let Some(path) = config.pointer(pointer).and_then(Value::as_str) {
            let moved = on_claims_here(kubelet, path);
            *config.pointer_mut(pointer).context(pointer)? = json!(moved);
        }
    }
    let config_path = kubelet.path("config.json");
    std::fs::write(&config_path, config.to_string())?;
    let (command, mut env) = Kubelet::main_container(&pod, &config_path)?;
    env.push(("MOE_NODE_RANK".to_string(), "0".to_string()));
    let trained = kubelet.run_for_output(&command, &env)?;
    ensure!(trained.code == 0, "train: {}", trained.message);
    moe_e2e::release_job(&pods, name).await?;
    wait_phase(&jobs, name, TrainingPhase::Succeeded).await?;
    Ok(())
}

/// A path in a training or export pod moved onto `kubelet`'s scratch: the
/// checkpoint claim (mounted at /var/lib/moe) at `ckpt/`, the output claim
/// (/output) at `models/`, the claim of `model.initFrom.volume` (/init) at
/// `base/`.
fn on_claims_here(kubelet: &Kubelet, arg: &str) -> String {
    for (mount, scratch) in [
        ("/var/lib/moe", "ckpt"),
        ("/output", "models"),
        ("/init", "base"),
    ] {
        if let Some(rest) = arg.strip_prefix(mount) {
            return format!("{}{rest}", kubelet.path(scratch).display());
        }
    }
    arg.to_string()
}

/// The export pod's own command (`moe-worker export`), its claims here.
fn export_command_here(kubelet: &Kubelet, export: &Pod) -> Result<Vec<String>> {
    let container = &export.spec.as_ref().context("no spec")?.containers[0];
    let command: Vec<String> = container
        .command
        .iter()
        .flatten()
        .map(|a| on_claims_here(kubelet, a))
        .collect();
    ensure!(command[..2] == ["moe-worker", "export"], "{command:?}");
    Ok(command)
}

/// The exported `config.json` (the e2e crate links no worker code: that
/// the directory loads as a model is worker/tests/train/export.rs's to show).
fn exported_config(dir: &std::path::Path) -> Result<Value> {
    Ok(serde_json::from_slice(&std::fs::read(
        dir.join("config.json"),
    )?)?)
}

/// A Hub dataset the Hub refuses (no token for a gated dataset): the test
/// plays the kubelet for the download (the real `moe-worker fetch`, exit 2)
/// and reports it; the pod fails before the worker runs, and the job, out
/// of restarts, fails in the download's words, naming the field to set.
#[tokio::test]
async fn a_hub_dataset_the_hub_refuses_fails_the_job_in_the_downloads_words() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mtj-hub-refused").await?;
    let _op = Operator::start(&ns.name).await?;
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let hub = FakeHub::refusing()?;
    jobs.create(
        &PostParams::default(),
        &hub_data_job("gated", &hub.endpoint, json!({})),
    )
    .await?;
    let pod = downloading_pod(&pods, "gated").await?;
    let kubelet = Kubelet::new("hub-refused")?;
    let (code, message) = run_download(&kubelet, &pod)?;
    ensure!(code == 2, "exit {code}: {message}");
    kubelet
        .report(&pods, &pod.name_any(), "init", code, &message)
        .await?;
    let failed = wait_phase(&jobs, "gated", TrainingPhase::Failed).await?;
    let message = &condition(&failed, "Failed").context("no Failed")?.message;
    ensure!(
        message.contains(&format!(
            "pod {} exited with code 2: download:",
            pod.name_any()
        )) && message.contains("401")
            && message.contains("data.huggingface.tokenSecret"),
        "{message}"
    );
    ns.delete().await
}

/// A Hub dataset's download that gives up on the network (nothing listens
/// at the endpoint): the real `moe-worker fetch` exits 1, the test reports
/// it, and the gang is restarted 30 s later as the next attempt, not
/// counted: with `backoffLimit: 0` a counted restart would fail the job.
#[tokio::test]
async fn a_download_the_network_fails_restarts_the_gang_uncounted_after_a_pause() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mtj-hub-down").await?;
    let _op = Operator::start(&ns.name).await?;
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    jobs.create(
        &PostParams::default(),
        &hub_data_job("offline", "http://127.0.0.1:1", json!({})),
    )
    .await?;
    let pod = downloading_pod(&pods, "offline").await?;
    let kubelet = Kubelet::new("hub-down")?;
    let (code, message) = run_download(&kubelet, &pod)?;
    ensure!(code == 1, "exit {code}: {message}");
    kubelet
        .report(&pods, &pod.name_any(), "init", code, &message)
        .await?;
    let waiting = eventually("the job to wait to retry", WAIT, || async {
        let j = jobs.get("offline").await?;
        Ok(condition(&j, "Reconciling")
            .filter(|c| c.reason == "DownloadRetry")
            .map(|c| c.message.clone()))
    })
    .await?;
    ensure!(
        waiting.contains(&format!(
            "pod {} exited with code 1: download:",
            pod.name_any()
        )) && waiting.contains("(not counted)"),
        "{waiting}"
    );
    let j = eventually("attempt 1", WAIT, || async {
        let j = jobs.get("offline").await?;
        Ok((j.status.as_ref().is_some_and(|s| s.attempt == 1)).then_some(j))
    })
    .await?;
    let s = j.status.unwrap_or_default();
    ensure!((s.restarts, s.disruptions) == (0, 1), "{s:?}");
    ensure!(s.phase != Some(TrainingPhase::Failed), "{s:?}");
    wait_event(&client, &ns.name, "offline", "DownloadRetry").await?;
    ns.delete().await
}

/// `moectl run --local` of `example` (under examples/training) in `workdir`,
/// from the repository root as a user runs it: its stderr and summary.
fn run_example_locally(example: &str, workdir: &std::path::Path) -> Result<(String, Value)> {
    let out = std::process::Command::new(moe_e2e::operator::moectl_binary()?)
        .args([
            "run",
            "--local",
            &format!("examples/training/{example}"),
            "--workdir",
        ])
        .arg(workdir)
        .current_dir(moe_e2e::operator::repo_root())
        .env("MOE_STATUS_ADDR", "off")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(out.status.success(), "moectl failed: {stderr}");
    let summary = String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find(|l| l.contains("finalLoss"))
        .map(serde_json::from_str)
        .transpose()?
        .unwrap_or(Value::Null);
    Ok((stderr, summary))
}

/// The first run of a fine-tuning example: it starts from the pretrained
/// model, lowers the loss by more than `nats`, and exports the model as
/// `architecture` (the work directory playing the output claim); the
/// export's files.
fn fine_tunes_and_exports(
    example: &str,
    name: &str,
    workdir: &std::path::Path,
    nats: f64,
    architecture: &str,
) -> Result<std::path::PathBuf> {
    let (stderr, summary) = run_example_locally(example, workdir)?;
    ensure!(
        stderr.contains("starting from the pretrained model's weights"),
        "{stderr}"
    );
    let (first, last) = (
        summary["initialLoss"].as_f64().context("no initial loss")?,
        summary["finalLoss"].as_f64().context("no final loss")?,
    );
    ensure!(last < first - nats, "the loss went from {first} to {last}");
    let exported = workdir.join("exports/local").join(name);
    let config: Value = serde_json::from_slice(&std::fs::read(exported.join("config.json"))?)?;
    ensure!(config["architectures"][0] == architecture, "{config}");
    ensure!(
        exported.join("tokenizer.json").is_file(),
        "no tokenizer in the export"
    );
    Ok(exported)
}

/// The fine-tuning example as a user runs it, from the repository root:
/// `moectl run --local` starts the worker from the pretrained model on the
/// "claim" (the tiny Mixtral of the fixtures), reads the docs through its
/// tokenizer, lowers the loss and exports the model; a second run resumes
/// from the first's checkpoint. (No cluster: moectl and the worker.)
#[tokio::test]
async fn the_fine_tuning_example_runs_locally_from_the_pretrained_model() -> Result<()> {
    let workdir = std::env::temp_dir().join(format!("moe-e2e-finetune-{}", std::process::id()));
    fine_tunes_and_exports(
        "tiny-finetune.yaml",
        "tiny-finetune",
        &workdir,
        1.0,
        "MixtralForCausalLM",
    )?;
    let (stderr, _) = run_example_locally("tiny-finetune.yaml", &workdir)?;
    ensure!(!stderr.contains("starting from the pretrained"), "{stderr}");
    ensure!(stderr.contains("exists, not exporting again"), "{stderr}");
    let _ = std::fs::remove_dir_all(&workdir);
    Ok(())
}

/// The supervised fine-tuning example as a user runs it: the tiny Qwen3-MoE
/// of the fixtures trained on the repository's conversations, the loss on
/// the assistant's turns, exported with its chat template. (No cluster.)
#[tokio::test]
async fn the_sft_example_runs_locally_and_exports_a_chat_model() -> Result<()> {
    let workdir = std::env::temp_dir().join(format!("moe-e2e-sft-{}", std::process::id()));
    let exported = fine_tunes_and_exports(
        "tiny-sft.yaml",
        "tiny-sft",
        &workdir,
        3.0,
        "Qwen3MoeForCausalLM",
    )?;
    ensure!(
        exported.join("chat_template.jinja").is_file(),
        "the export has no chat template"
    );
    let _ = std::fs::remove_dir_all(&workdir);
    Ok(())
}

/// `moectl run --local` on a job with a Hub dataset: moectl runs the pods'
/// download itself (the real `moe-worker fetch`, against a fake Hub), keeps
/// the files in the work directory, and the worker trains through the
/// run's link to the commit — on the two-letter text of `train/` only.
/// (No cluster: moectl and the worker, as a user runs them.)
#[tokio::test]
async fn a_local_run_downloads_its_hub_dataset_first() -> Result<()> {
    let text = |pattern: &str, n: usize| pattern.repeat(n).into_bytes();
    let commit = "10ca1".repeat(8);
    let hub = FakeHub::start(
        &commit,
        vec![
            ("train/part-0.txt".into(), text("ab", 3000)),
            ("val/part-0.txt".into(), text("xyz", 1000)),
        ],
    )?;
    let dir = std::env::temp_dir().join(format!("moe-e2e-local-hub-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut job = hub_data_job("local-corpus", &hub.endpoint, json!({}));
    job.spec.worker.pod_metadata = Default::default();
    std::fs::write(dir.join("job.yaml"), serde_yaml::to_string(&job)?)?;
    let out = std::process::Command::new(moe_e2e::operator::moectl_binary()?)
        .args(["run", "--local", "job.yaml"])
        .current_dir(&dir)
        .env("MOE_STATUS_ADDR", "off")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(out.status.success(), "moectl failed: {stderr}");
    let link = dir.join("runs/local-corpus/data");
    ensure!(
        std::fs::read_link(&link)?
            == dir
                .join("runs/huggingface/datasets/moe-tests/two-letters")
                .join(&commit),
        "{}",
        link.display()
    );
    ensure!(!link.join("val").exists(), "only train/ is downloaded");
    let summary: Value = serde_json::from_str(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .rev()
            .find(|l| l.contains("unigramEntropy"))
            .with_context(|| format!("no summary; stderr: {stderr}"))?,
    )?;
    let entropy = summary["unigramEntropy"].as_f64().context("no entropy")?;
    ensure!(
        (entropy - std::f64::consts::LN_2).abs() < 1e-3,
        "unigram entropy {entropy}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
