//! The Helm chart against the real control plane, with the pinned helm:
//! `helm install` creates what the operator needs (the operator process then
//! runs a job with exactly the chart's ServiceAccount, RBAC and Deployment
//! arguments), `helm upgrade` upgrades the CRD schema, and `helm uninstall`
//! with `crds.keep` keeps the CRDs and the users' jobs.
//! (`charts/check.sh` covers lint, template and the values schema without a cluster.)
//!
//! KWOK's fake nodes run no containers: the Deployment's pods are admitted
//! (Pod Security "restricted"), scheduled and marked Ready, but the operator
//! itself runs as a local process, as in tests/training.rs. `helm test` runs
//! too, with this test playing the hook pod's kubelet (see
//! `helm_test_passes_only_when_the_operator_answers_readyz`).

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
use moe_e2e::{HOLD, TestNamespace, admin_client, eventually, release_job, token_kubeconfig};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(90);
const CRD: &str = "moetrainingjobs.moe.dev";

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
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        Self::start_at(
            namespace,
            deployment,
            service_account,
            &format!("127.0.0.1:{port}"),
        )
        .await
    }

    /// Like [`ChartOperator::start`], serving HTTP at `addr`: a pod's IP and
    /// port, to play that pod (KWOK gives pods loopback IPs).
    async fn start_at(
        namespace: &str,
        deployment: &str,
        service_account: &str,
        addr: &str,
    ) -> Result<Self> {
        let state = state_dir()?;
        let args: Vec<String> = serde_json::from_str(&sh(&format!(
            "kubectl get deployment {deployment} -n {namespace} -o jsonpath='{{.spec.template.spec.containers[0].args}}'"
        ))?)?;
        let args: Vec<String> = args
            .into_iter()
            .map(|a| {
                if a.starts_with("--http-addr=") {
                    format!("--http-addr={addr}")
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
                Ok(sh(&format!("curl -sf http://{addr}/readyz"))
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
    // (the ServiceMonitor and PodMonitor CRDs) or what names objects outside it.
    let values = format!(
        "-f charts/moe-operator/ci/full-values.yaml --set serviceMonitor.enabled=false \
         --set workerPodMonitors.enabled=false \
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
    release_job(&user_pods, "chart").await?;
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

/// Annotation through which a test reports the exit code of a `helm test`
/// hook pod's command (stage test-pod-helm-test-exit, tests/cluster/kwok-stages.yaml).
const EXIT_CODE: &str = "kwok.test/exit-code";

/// Where the Service that `url` names (`http://<service>.<namespace>.svc:<port>/…`)
/// sends a connection, as cluster DNS and kube-proxy would: a Ready pod of the
/// Service's selector, at the container port its `targetPort` names. (Not the
/// EndpointSlice: the apiserver refuses loopback addresses there, and KWOK's
/// pod IPs are loopback ones.) Returns `host:port` as written in the URL and
/// the `ip:port` it resolves to.
async fn resolve_service(client: &Client, url: &str) -> Result<(String, String)> {
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let authority = url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .with_context(|| format!("no host in {url}"))?;
    let (host, port) = authority
        .split_once(':')
        .with_context(|| format!("no port in {url}"))?;
    let port: i32 = port.parse()?;
    let mut labels = host.split('.');
    let (Some(name), Some(namespace), Some("svc")) = (labels.next(), labels.next(), labels.next())
    else {
        bail!("{host} is not a Service name (<service>.<namespace>.svc)");
    };
    let service = Api::<Service>::namespaced(client.clone(), namespace)
        .get(name)
        .await?;
    let spec = service.spec.context("Service without spec")?;
    let target = spec
        .ports
        .unwrap_or_default()
        .into_iter()
        .find(|p| p.port == port)
        .with_context(|| format!("Service {name} has no port {port}"))?
        .target_port
        .unwrap_or(IntOrString::Int(port));
    let selector = spec
        .selector
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods = Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&selector))
        .await?;
    for pod in pods.items {
        let ready = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone());
        let (true, Some(ip)) = (ready, ip) else {
            continue;
        };
        let target_port = match &target {
            IntOrString::Int(p) => Some(*p),
            IntOrString::String(named) => pod.spec.as_ref().and_then(|s| {
                s.containers
                    .iter()
                    .flat_map(|c| c.ports.iter().flatten())
                    .find(|p| p.name.as_deref() == Some(named.as_str()))
                    .map(|p| p.container_port)
            }),
        };
        if let Some(target_port) = target_port {
            return Ok((authority.to_string(), format!("{ip}:{target_port}")));
        }
    }
    bail!("Service {name} has no Ready pod serving {target:?}")
}

/// Plays the kubelet for the one `helm test` hook pod of `release` that KWOK
/// holds Running: runs its container's command here (read from the Pod that
/// Helm created, one URL argument's Service name resolved by [`resolve_service`]),
/// and reports the exit code on the pod, which then ends Succeeded or Failed.
/// Returns the exit code and the command's output.
async fn run_hook_pod(client: &Client, namespace: &str, release: &str) -> Result<(i32, String)> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let selector = format!("app.kubernetes.io/instance={release},app.kubernetes.io/component=test");
    let pod = eventually("the helm test pod to run", WAIT, || async {
        Ok(pods
            .list(&ListParams::default().labels(&selector))
            .await?
            .items
            .into_iter()
            .find(|p| {
                p.metadata.deletion_timestamp.is_none()
                    && !p.annotations().contains_key(EXIT_CODE)
                    && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
            }))
    })
    .await?;
    ensure!(
        pod.annotations().get("helm.sh/hook").map(String::as_str) == Some("test"),
        "not a helm test hook: {:?}",
        pod.annotations()
    );
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.clone())
        .unwrap_or_default();
    let [container] = containers.as_slice() else {
        bail!("the hook pod has {} containers, not 1", containers.len());
    };
    let mut argv: Vec<String> = container
        .command
        .iter()
        .flatten()
        .chain(container.args.iter().flatten())
        .cloned()
        .collect();
    for arg in argv.iter_mut().filter(|a| a.starts_with("http://")) {
        let (authority, endpoint) = resolve_service(client, arg).await?;
        *arg = arg.replacen(&authority, &endpoint, 1);
    }
    let (program, args) = argv.split_first().context("the hook has no command")?;
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {argv:?}"))?;
    let code = out.status.code().unwrap_or(128);
    let output = format!(
        "{argv:?} exited {code}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let patch = json!({"metadata": {"annotations": {EXIT_CODE: code.to_string()}}});
    pods.patch(
        &pod.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok((code, output))
}

/// `helm test <release>`, with the hook pod run by [`run_hook_pod`]: the exit
/// status of `helm test`, its output, and the hook command's exit code and output.
async fn helm_test(
    client: &Client,
    namespace: &str,
    release: &str,
) -> Result<(bool, String, i32, String)> {
    let helm = Command::new("helm")
        .args([
            "test",
            release,
            "--namespace",
            namespace,
            "--timeout",
            "90s",
        ])
        .current_dir(repo_root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let hook = run_hook_pod(client, namespace, release).await;
    let out = tokio::task::spawn_blocking(move || helm.wait_with_output()).await??;
    let (code, hook_output) = hook?;
    let helm_output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), helm_output, code, hook_output))
}

/// `helm test` run against an installed release, its verdict decided by the
/// real operator process. KWOK's fake nodes run no containers, so nothing
/// would execute the hook pod: the test plays its kubelet ([`run_hook_pod`]),
/// running the pod's own command (GNU wget here, busybox's in the image: same
/// flags) against the address the Service resolves to, and the exit code
/// becomes the pod's outcome through a KWOK stage that decides nothing by
/// itself. The operator process plays the Deployment's pod at that pod's IP
/// and port, with the Deployment's arguments and the chart's ServiceAccount.
/// First nothing answers there (KWOK marks the pod Ready all the same, so only
/// the command can tell): `helm test` must fail. Then, with the operator
/// running, it must pass.
#[tokio::test]
async fn helm_test_passes_only_when_the_operator_answers_readyz() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "chart-test").await?;
    let release = ns.name.clone();
    // Its own namespace only (a cluster-wide operator would act on other
    // tests' objects), and no CRDs: other tests' releases own them.
    sh(&format!(
        "helm install {release} charts/moe-operator -n {release} --set crds.enabled=false \
           --set watchNamespace={release} --set image.tag=e2e --wait --timeout 120s"
    ))
    .context("helm install")?;

    let (passed, helm_out, code, hook_out) = helm_test(&client, &release, &release).await?;
    ensure!(
        !passed && code != 0,
        "helm test passed with no operator answering: {helm_out}\n{hook_out}"
    );
    ensure!(
        helm_out.contains(&format!("pod {release}-moe-operator-test-ready failed")),
        "{helm_out}"
    );

    let (_, endpoint) = resolve_service(
        &client,
        &format!("http://{release}-moe-operator.{release}.svc:8080/readyz"),
    )
    .await?;
    let op = ChartOperator::start_at(
        &release,
        &format!("{release}-moe-operator"),
        &format!("{release}-moe-operator"),
        &endpoint,
    )
    .await?;
    let (passed, helm_out, code, hook_out) = helm_test(&client, &release, &release).await?;
    ensure!(
        passed && code == 0,
        "helm test failed with the operator answering: {helm_out}\n{hook_out}"
    );
    ensure!(helm_out.contains("Phase:          Succeeded"), "{helm_out}");
    ensure!(hook_out.ends_with("exited 0: ok"), "{hook_out}");
    drop(op);

    sh(&format!(
        "helm uninstall {release} -n {release} --wait --timeout 60s"
    ))?;
    ns.delete().await
}
