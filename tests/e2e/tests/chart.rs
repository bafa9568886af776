//! The Helm chart against the real control plane, with the pinned helm:
//! `helm install` creates what the operator needs (the operator process then
//! runs a job with exactly the chart's ServiceAccount, RBAC and Deployment
//! arguments), `helm upgrade` upgrades the CRD schema, and `helm uninstall`
//! with `crds.keep` keeps the CRDs and the users' jobs.
//! (`charts/check.sh` covers lint, template and the values schema without a cluster.)
//!
//! KWOK's fake nodes run no containers: the Deployment's pods are admitted
//! (Pod Security "restricted"), scheduled and marked Ready, but the operator
//! itself runs as a local process, as in tests/training.rs.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, CustomResourceExt, ResourceExt};
use moe_crds::{MoETrainingJob, TrainingPhase};
use moe_e2e::operator::{repo_root, sh};
use moe_e2e::{TestNamespace, admin_client, eventually, token_kubeconfig};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(90);
const CRD: &str = "moetrainingjobs.moe.dev";
const HOLD: &str = "kwok.test/hold";

async fn restricted_ns(client: &Client, prefix: &str) -> Result<TestNamespace> {
    TestNamespace::create(
        client,
        prefix,
        &[("pod-security.kubernetes.io/enforce", "restricted")],
    )
    .await
}

fn state_dir() -> Result<PathBuf> {
    Ok(PathBuf::from(std::env::var("MOE_CLUSTER_STATE").context(
        "MOE_CLUSTER_STATE unset: source tests/cluster/.state/env",
    )?))
}

/// A copy of the chart as an older release would have shipped it: its CRD
/// lacks `spec.runPolicy.ttlSecondsAfterFinished`.
fn old_chart(dir: &std::path::Path) -> Result<PathBuf> {
    let chart = dir.join("moe-operator-old");
    sh(&format!(
        "rm -rf '{0}' && cp -r charts/moe-operator '{0}'",
        chart.display()
    ))?;
    let mut crd = serde_json::to_value(MoETrainingJob::crd())?;
    let run_policy = crd
        .pointer_mut("/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/runPolicy/properties")
        .and_then(Value::as_object_mut)
        .context("the CRD has spec.runPolicy")?;
    ensure!(
        run_policy.remove("ttlSecondsAfterFinished").is_some(),
        "the current CRD has spec.runPolicy.ttlSecondsAfterFinished"
    );
    std::fs::write(
        chart.join("templates/crd-moetrainingjobs.yaml"),
        serde_yaml::to_string(&crd)?,
    )?;
    Ok(chart)
}

/// A 2-node H100 job whose pods KWOK holds Running, deleted an hour after it finishes.
fn job_manifest(name: &str, namespace: &str) -> Value {
    json!({
        "apiVersion": "moe.dev/v1alpha1",
        "kind": "MoETrainingJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"hiddenSize": 64, "layers": 2, "attentionHeads": 8, "kvHeads": 8, "seqLen": 64,
                      "moe": {"experts": 16, "topK": 2, "sharedExperts": 1, "expertHiddenSize": 32}},
            "training": {"steps": 100, "globalBatchSize": 16},
            "parallelism": {"nodes": 2, "processesPerNode": 8, "expertParallel": 8},
            "placement": {"gpuType": "H100"},
            "worker": {"podMetadata": {"labels": {HOLD: "true"}}},
            "runPolicy": {"ttlSecondsAfterFinished": 3600}
        }
    })
}

/// `kubectl create` with strict field validation, as GitOps tools apply.
fn kubectl_create(manifest: &Value) -> Result<String> {
    sh(&format!(
        "kubectl create --validate=strict -f - 2>&1 <<'EOF'\n{manifest}\nEOF"
    ))
}

/// The operator binary built by `cargo build -p moe-operator`.
fn operator_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var("MOE_OPERATOR_BIN")
        .ok()
        .filter(|p| !p.is_empty())
    {
        return Ok(p.into());
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("target"));
    let bin = target.join("debug/moe-operator");
    ensure!(
        bin.exists(),
        "{} is missing: run `cargo build -p moe-operator` first",
        bin.display()
    );
    Ok(bin)
}

/// The operator as the chart's Deployment would run it, as a local process:
/// the Deployment's own arguments (only the HTTP address moved to loopback)
/// and a token of the chart's ServiceAccount. Killed on drop.
struct ChartOperator {
    child: Child,
    pid_file: PathBuf,
}

impl ChartOperator {
    async fn start(namespace: &str, deployment: &str, service_account: &str) -> Result<Self> {
        let state = state_dir()?;
        let args: Vec<String> = serde_json::from_str(&sh(&format!(
            "kubectl get deployment {deployment} -n {namespace} -o jsonpath='{{.spec.template.spec.containers[0].args}}'"
        ))?)?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let args: Vec<String> = args
            .into_iter()
            .map(|a| {
                if a.starts_with("--http-addr=") {
                    format!("--http-addr=127.0.0.1:{port}")
                } else {
                    a
                }
            })
            .collect();
        let token = sh(&format!(
            "kubectl create token {service_account} --namespace {namespace} --duration=1h"
        ))?;
        let name = format!("operator-chart-{namespace}");
        let kubeconfig = state.join(format!("{name}.kubeconfig"));
        std::fs::write(
            &kubeconfig,
            serde_json::to_string_pretty(&token_kubeconfig(token.trim())?)?,
        )?;
        let log = std::fs::File::create(state.join("logs").join(format!("{name}.log")))?;
        let child = Command::new(operator_binary()?)
            .args(&args)
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAMESPACE", namespace)
            .env("POD_NAME", &name)
            .env("RUST_LOG", "info,moe_operator=debug")
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()?;
        let pid_file = state.join("pids").join(&name);
        std::fs::write(&pid_file, child.id().to_string())?;
        let op = Self { child, pid_file };
        eventually(
            "the operator to serve /readyz",
            Duration::from_secs(30),
            || async {
                Ok(sh(&format!("curl -sf http://127.0.0.1:{port}/readyz"))
                    .ok()
                    .filter(|b| b == "ok")
                    .map(|_| ()))
            },
        )
        .await?;
        Ok(op)
    }
}

impl Drop for ChartOperator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

async fn wait_phase(jobs: &Api<MoETrainingJob>, name: &str, phase: TrainingPhase) -> Result<()> {
    eventually(&format!("{name} to be {phase:?}"), WAIT, || async {
        let j = jobs.get(name).await?;
        Ok((j.status.and_then(|s| s.phase) == Some(phase)).then_some(()))
    })
    .await
}

#[tokio::test]
async fn install_runs_a_job_upgrade_upgrades_the_crd_and_uninstall_keeps_crds_and_jobs()
-> Result<()> {
    let client = admin_client().await?;
    let rel = restricted_ns(&client, "chart").await?;
    let users = restricted_ns(&client, "chart-jobs").await?;
    let release = rel.name.clone();
    let deployment = format!("{release}-moe-operator");
    let service_account = "moe-operator-full"; // ci/full-values.yaml
    let tmp = state_dir()?.join(format!("chart-{release}"));
    std::fs::create_dir_all(&tmp)?;
    let old = old_chart(&tmp)?;

    // Every value of ci/full-values.yaml, except what this cluster lacks
    // (the ServiceMonitor CRD) or what names objects outside it.
    let values = format!(
        "-f charts/moe-operator/ci/full-values.yaml --set serviceMonitor.enabled=false \
         --set priorityClassName= --set crds.keep=true --set watchNamespace={users} \
         --set image.digest= --set image.tag=e2e \
         --set workerImage.repository=moe-worker --set workerImage.tag=chart-e2e",
        users = users.name
    );
    // The CRDs may already exist (applied with kubectl by other tests, or kept
    // by an earlier run): Helm adopts an object that carries its release's
    // ownership metadata, as docs/install.md says. Every moe.dev CRD: the
    // chart installs them all.
    sh(&format!(
        "set -euo pipefail
         for crd in $(kubectl get crd -o name | grep '[.]moe[.]dev$'); do
           kubectl label $crd app.kubernetes.io/managed-by=Helm --overwrite >/dev/null
           kubectl annotate $crd meta.helm.sh/release-name={release} \
             meta.helm.sh/release-namespace={release} --overwrite >/dev/null
         done
         helm install {release} '{old}' -n {release} {values} --wait --timeout 120s",
        old = old.display()
    ))
    .context("helm install of the old chart")?;

    // The old schema does not know the field: strict validation refuses it.
    let job = job_manifest("chart", &users.name);
    let refused = eventually("the old CRD schema to be served", WAIT, || async {
        Ok(match kubectl_create(&job) {
            Ok(out) => Some(Err(anyhow::anyhow!(
                "the old schema accepted the field: {out}"
            ))),
            Err(e) if format!("{e:#}").contains("unknown field") => Some(Ok(e)),
            Err(_) => None, // not served yet
        })
    })
    .await??;
    ensure!(
        format!("{refused:#}")
            .contains(r#"unknown field "spec.runPolicy.ttlSecondsAfterFinished""#),
        "unexpected refusal: {refused:#}"
    );

    // The Deployment's pods passed Pod Security "restricted" and are Ready.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &release);
    let ready = pods
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={release}")))
        .await?
        .items
        .into_iter()
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count();
    ensure!(ready == 2, "{ready} of the 2 operator replicas are Ready");

    // What GitOps tools wait on (Flux's HelmRelease health is kstatus): every
    // object of the release, and the CRD, is Current.
    let verdicts = sh(&format!(
        "set -o pipefail
         {{ kubectl get deployment,service,serviceaccount,poddisruptionbudget,networkpolicy,role,rolebinding \
              -n {release} -l app.kubernetes.io/instance={release} -o json
            kubectl get crd {CRD} -o json; }} | kstatus"
    ))?;
    let lines: Vec<&str> = verdicts.lines().collect();
    ensure!(lines.len() >= 8, "too few objects: {verdicts}");
    for line in lines {
        ensure!(
            line.contains(r#""kstatus":{"status":"Current""#),
            "not Current: {line}"
        );
    }

    // watchNamespace: the operator may act in the users' namespace only.
    let who = format!("system:serviceaccount:{release}:{service_account}");
    let cluster_roles = sh(&format!(
        "kubectl get clusterrole,clusterrolebinding -l app.kubernetes.io/instance={release} -o name"
    ))?;
    ensure!(
        cluster_roles.trim().is_empty(),
        "cluster-wide RBAC: {cluster_roles}"
    );
    let can = |verb: &str, ns: &str| {
        sh(&format!(
            "kubectl auth can-i {verb} moetrainingjobs.moe.dev --as={who} -n {ns} || true"
        ))
        .map(|o| o.trim().to_string())
    };
    ensure!(
        can("watch", &users.name)? == "yes",
        "the operator can watch its namespace"
    );
    ensure!(
        can("watch", "default")? == "no",
        "the operator is confined to its namespace"
    );

    sh(&format!(
        "helm upgrade {release} charts/moe-operator -n {release} {values} --wait --timeout 120s"
    ))
    .context("helm upgrade to the current chart")?;
    eventually("the new CRD schema to accept the field", WAIT, || async {
        Ok(kubectl_create(&job).ok())
    })
    .await?;

    // The operator, with the chart's ServiceAccount, RBAC and arguments.
    let op = ChartOperator::start(&release, &deployment, service_account).await?;
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &users.name);
    wait_phase(&jobs, "chart", TrainingPhase::Running).await?;
    let children: Api<Job> = Api::namespaced(client.clone(), &users.name);
    let child = children.get("chart-a0").await?;
    let image = child
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|s| s.containers.first().and_then(|c| c.image.clone()));
    ensure!(
        image.as_deref() == Some("moe-worker:chart-e2e"),
        "the worker image comes from the chart's workerImage value, got {image:?}"
    );
    let user_pods: Api<Pod> = Api::namespaced(client.clone(), &users.name);
    for p in user_pods
        .list(&ListParams::default().labels("moe.dev/job-name=chart"))
        .await?
        .items
    {
        let patch = json!({"metadata": {"labels": {HOLD: null}}});
        user_pods
            .patch(
                &p.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
    }
    wait_phase(&jobs, "chart", TrainingPhase::Succeeded).await?;
    drop(op);

    sh(&format!(
        "helm uninstall {release} -n {release} --wait --timeout 60s"
    ))?;
    eventually("uninstall to remove the release's objects", WAIT, || async {
        let left = sh(&format!(
            "kubectl get clusterrole,clusterrolebinding -l app.kubernetes.io/instance={release} -o name;
             kubectl get all,role,rolebinding,serviceaccount,pdb,networkpolicy -n {release} \
               -l app.kubernetes.io/instance={release} -o name
             kubectl get role,rolebinding -n {users} -l app.kubernetes.io/instance={release} -o name",
            users = users.name
        ))?;
        Ok(left.trim().is_empty().then_some(()))
    })
    .await?;
    let kept = sh(&format!(
        "kubectl get crd {CRD} -o jsonpath='{{.metadata.annotations}}'"
    ))
    .context("crds.keep: the CRD survives uninstall")?;
    ensure!(
        kept.contains(r#""helm.sh/resource-policy":"keep""#),
        "annotations {kept}"
    );
    let still = jobs
        .get("chart")
        .await
        .context("the user's job survives uninstall")?;
    ensure!(
        still.status.and_then(|s| s.phase) == Some(TrainingPhase::Succeeded),
        "the job's status is intact"
    );

    std::fs::remove_dir_all(&tmp)?;
    users.delete().await?;
    rel.delete().await
}

/// Pods the chart makes pass Pod Security "restricted" at admission: the
/// helm test pod is created (server-side dry run) in a restricted namespace,
/// and the Deployment draws no Pod Security warning.
#[tokio::test]
async fn the_chart_pods_pass_pod_security_restricted() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "chart-pss").await?;
    let out = sh(&format!(
        "set -euo pipefail
         helm template moe charts/moe-operator -n {ns} --show-only templates/tests/test-ready.yaml |
           kubectl create --dry-run=server -n {ns} -f - 2>&1
         helm template moe charts/moe-operator -n {ns} -f charts/moe-operator/ci/full-values.yaml \
           --set serviceMonitor.enabled=false --show-only templates/deployment.yaml |
           kubectl create --dry-run=server -n {ns} -f - 2>&1",
        ns = ns.name
    ))?;
    ensure!(
        out.contains("pod/moe-moe-operator-test-ready created (server dry run)"),
        "{out}"
    );
    ensure!(
        out.contains("deployment.apps/moe-moe-operator created (server dry run)"),
        "{out}"
    );
    if out.contains("PodSecurity") {
        bail!("Pod Security warnings: {out}");
    }
    ns.delete().await
}
