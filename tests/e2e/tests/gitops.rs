//! GitOps health of MoETrainingJob on real objects from the real operator:
//! the verdict of the kstatus library (what Flux and kpt wait on) and of the
//! Argo CD health check in deploy/argocd/, run with gopher-lua as Argo CD runs
//! it. Both come from the `kstatus` harness tool (tests/cluster/go/kstatus,
//! built by tests/cluster/build.sh onto the PATH that .state/env sets).

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use moe_crds::{MoETrainingJob, TrainingPhase};
use moe_e2e::operator::{Operator, repo_root, sh};
use moe_e2e::{HOLD, TestNamespace, admin_client, eventually, gpu_job};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(90);
const FAIL: &str = "pod-container-running-failed.stage.kwok.x-k8s.io";
const CUSTOMIZATIONS: &str = "deploy/argocd/resource_customizations/moe.dev";

/// (kstatus status, kstatus message, Argo CD status, Argo CD message) of the live object.
fn verdicts(ns: &str, name: &str) -> Result<(String, String, String, String)> {
    let out = sh(&format!(
        "set -o pipefail; kubectl get moetrainingjob {name} -n {ns} -o json |
         kstatus --argocd-lua {CUSTOMIZATIONS}/MoETrainingJob/health.lua"
    ))?;
    let v: Value =
        serde_json::from_str(out.trim()).with_context(|| format!("kstatus said {out}"))?;
    let s = |p: &str| {
        v.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    Ok((
        s("/kstatus/status"),
        s("/kstatus/message"),
        s("/argocd/status"),
        s("/argocd/message"),
    ))
}

/// Asserts both verdicts (messages by substring).
fn expect(ns: &str, name: &str, when: &str, want: [&str; 4]) -> Result<()> {
    let (ks, km, ast, am) = verdicts(ns, name)?;
    ensure!(
        ks == want[0] && km.contains(want[1]) && ast == want[2] && am.contains(want[3]),
        "{when}: kstatus {ks} {km:?}, Argo CD {ast} {am:?}; want kstatus {} ~{:?}, Argo CD {} ~{:?}",
        want[0],
        want[1],
        want[2],
        want[3]
    );
    Ok(())
}

async fn wait_phase(jobs: &Api<MoETrainingJob>, name: &str, phase: TrainingPhase) -> Result<()> {
    eventually(&format!("{name} to be {phase:?}"), WAIT, || async {
        let j = jobs.get(name).await?;
        Ok((j.status.and_then(|s| s.phase) == Some(phase)).then_some(()))
    })
    .await
}

async fn restricted_ns(client: &Client, prefix: &str) -> Result<TestNamespace> {
    TestNamespace::create(
        client,
        prefix,
        &[("pod-security.kubernetes.io/enforce", "restricted")],
    )
    .await
}

async fn patch_pods(pods: &Api<Pod>, job: &str, patch: &Value) -> Result<usize> {
    let list = pods
        .list(&ListParams::default().labels(&format!("moe.dev/job-name={job}")))
        .await?
        .items;
    for p in &list {
        pods.patch(&p.name_any(), &PatchParams::default(), &Patch::Merge(patch))
            .await?;
    }
    Ok(list.len())
}

#[tokio::test]
async fn kstatus_and_argocd_verdicts_follow_a_job_through_its_life() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "gitops").await?;
    let n = ns.name.as_str();
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), n);
    let pods: Api<Pod> = Api::namespaced(client.clone(), n);
    moe_e2e::operator::install()?;

    // Just created, before any operator saw it: no status at all. kstatus
    // calls a custom resource without conditions Current (its documented
    // rule for unknown kinds); the Argo CD check waits for observedGeneration.
    // docs/operations.md gives Flux a healthCheckExprs that waits as well.
    jobs.create(&PostParams::default(), &gpu_job("life", 1, json!({})))
        .await?;
    expect(
        n,
        "life",
        "just created",
        [
            "Current",
            "Resource is current",
            "Progressing",
            "observe the resource",
        ],
    )?;

    let op = Operator::start(n).await?;
    // Pending: pods that no node can take.
    let nowhere = json!({"spec": {"placement": {"nodeSelector": {"moe.test/nowhere": "true"}}}});
    jobs.create(&PostParams::default(), &gpu_job("pending", 1, nowhere))
        .await?;
    wait_phase(&jobs, "pending", TrainingPhase::Pending).await?;
    expect(
        n,
        "pending",
        "pending",
        ["InProgress", "", "Progressing", ""],
    )?;

    wait_phase(&jobs, "life", TrainingPhase::Running).await?;
    expect(
        n,
        "life",
        "running",
        ["Current", "Resource is Ready", "Healthy", ""],
    )?;

    let suspend = |v: bool| json!({"spec": {"runPolicy": {"suspend": v}}});
    jobs.patch(
        "life",
        &PatchParams::default(),
        &Patch::Merge(&suspend(true)),
    )
    .await?;
    wait_phase(&jobs, "life", TrainingPhase::Suspended).await?;
    // Suspended is the declared state: Ready, so kstatus says Current (a
    // GitOps wait finishes); Argo CD tells it apart as Suspended.
    expect(
        n,
        "life",
        "suspended",
        ["Current", "Resource is Ready", "Suspended", ""],
    )?;

    // A spec change the operator has not seen yet: observedGeneration is behind.
    drop(op);
    jobs.patch(
        "life",
        &PatchParams::default(),
        &Patch::Merge(&suspend(false)),
    )
    .await?;
    let generation = jobs
        .get("life")
        .await?
        .metadata
        .generation
        .unwrap_or_default();
    expect(
        n,
        "life",
        "out of date",
        [
            "InProgress",
            &format!(
                "generation is {generation}, but latest observed generation is {}",
                generation - 1
            ),
            "Progressing",
            &format!("observe generation {generation}"),
        ],
    )?;

    let _op = Operator::start(n).await?;
    eventually("attempt 1 to run", WAIT, || async {
        let s = jobs.get("life").await?.status.unwrap_or_default();
        if s.attempt == 1 && s.phase == Some(TrainingPhase::Running) {
            return Ok(Some(()));
        }
        // Not yet: say where it is, so a timeout shows where it stuck.
        let states: Vec<String> = pods
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .map(|p| {
                let phase = p.status.as_ref().and_then(|s| s.phase.clone());
                let node = p.spec.as_ref().and_then(|s| s.node_name.clone());
                format!("{} {phase:?} on {node:?}", p.name_any())
            })
            .collect();
        bail!(
            "attempt {}, phase {:?}, restarts {}, disruptions {}; pods {states:?}",
            s.attempt,
            s.phase,
            s.restarts,
            s.disruptions
        )
    })
    .await?;
    expect(n, "life", "resumed", ["Current", "", "Healthy", ""])?;
    ensure!(
        patch_pods(
            &pods,
            "life",
            &json!({"metadata": {"labels": {HOLD: null}}})
        )
        .await?
            > 0
    );
    wait_phase(&jobs, "life", TrainingPhase::Succeeded).await?;
    expect(
        n,
        "life",
        "succeeded",
        ["Current", "Resource is Ready", "Healthy", ""],
    )?;

    // Failed: a FailJob rule matches a worker's exit code.
    let rule = json!({"spec": {"runPolicy": {"backoffLimit": 5, "failureRules": [
        {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [3]}}]}}});
    jobs.create(&PostParams::default(), &gpu_job("fail", 1, rule))
        .await?;
    wait_phase(&jobs, "fail", TrainingPhase::Running).await?;
    let fail = json!({"metadata": {
        "labels": {HOLD: null, FAIL: "true"},
        "annotations": {format!("{FAIL}/exit-code"): "3", format!("{FAIL}/delay"): "100ms"}
    }});
    ensure!(patch_pods(&pods, "fail", &fail).await? > 0);
    wait_phase(&jobs, "fail", TrainingPhase::Failed).await?;
    expect(n, "fail", "failed", ["Failed", "", "Degraded", ""])?;
    let (_, km, _, am) = verdicts(n, "fail")?;
    ensure!(
        km == am && !km.is_empty(),
        "both carry the Stalled message: {km:?} / {am:?}"
    );

    // Stalled: a spec that only the operator can refuse (a reserved variable).
    let reserved = json!({"spec": {"worker": {"env": [{"name": "MOE_ATTEMPT", "value": "7"}]}}});
    jobs.create(&PostParams::default(), &gpu_job("invalid", 1, reserved))
        .await?;
    eventually("invalid to be Stalled", WAIT, || async {
        let j = jobs.get("invalid").await?;
        let stalled = j.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Stalled" && c.status == "True" && c.reason == "InvalidSpec")
        });
        Ok(stalled.then_some(()))
    })
    .await?;
    expect(
        n,
        "invalid",
        "invalid spec",
        [
            "Failed",
            "reserved for the worker contract",
            "Degraded",
            "reserved for the worker contract",
        ],
    )?;

    ns.delete().await
}

/// The argocd-cm patch carries each kind's tested health.lua verbatim, and
/// every kind with a health.lua is in it.
#[test]
fn the_argocd_cm_patch_embeds_the_tested_health_checks() -> Result<()> {
    let root = repo_root();
    let cm: Value = serde_yaml::from_str(&std::fs::read_to_string(
        root.join("deploy/argocd/argocd-cm-health.yaml"),
    )?)?;
    let data = cm
        .get("data")
        .and_then(Value::as_object)
        .context("argocd-cm-health.yaml has data")?;
    let mut kinds = Vec::new();
    for entry in std::fs::read_dir(root.join(CUSTOMIZATIONS))? {
        let kind = entry?.file_name().to_string_lossy().into_owned();
        let lua =
            std::fs::read_to_string(root.join(CUSTOMIZATIONS).join(&kind).join("health.lua"))?;
        let key = format!("resource.customizations.health.moe.dev_{kind}");
        ensure!(
            data.get(&key).and_then(Value::as_str) == Some(lua.as_str()),
            "{key} in deploy/argocd/argocd-cm-health.yaml differs from {CUSTOMIZATIONS}/{kind}/health.lua"
        );
        kinds.push(key);
    }
    ensure!(!kinds.is_empty(), "no health checks under {CUSTOMIZATIONS}");
    for key in data.keys() {
        ensure!(kinds.contains(key), "{key} has no tested health.lua");
    }
    Ok(())
}
