//! Helpers for end-to-end tests against the real control plane that
//! `tests/cluster/up.sh` starts (kube-apiserver, etcd, controller-manager,
//! scheduler, KWOK). Run them with `tests/run.sh` or, with the plane up:
//!
//! ```sh
//! source tests/cluster/.state/env && cargo test -p moe-e2e
//! ```
//!
//! Every test makes its own namespace, so tests run in parallel and a failed
//! run leaves its objects behind for inspection until `down.sh`.

pub mod hub;
pub mod kubelet;
pub mod kueue;
pub mod operator;

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// The admin client of the test control plane, from `KUBECONFIG`.
///
/// Fails with a message that says how to start the plane when none is running.
pub async fn admin_client() -> Result<Client> {
    let path = std::env::var("KUBECONFIG").context(
        "KUBECONFIG is not set: start the control plane with tests/cluster/up.sh, \
         then `source tests/cluster/.state/env` (tests/run.sh does both)",
    )?;
    let kubeconfig = Kubeconfig::read_from(&path).with_context(|| format!("reading {path}"))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    let client = Client::try_from(config)?;
    client.apiserver_version().await.with_context(|| {
        format!("no apiserver answers for {path}: is tests/cluster/up.sh running?")
    })?;
    Ok(client)
}

/// A kubeconfig that authenticates with a bearer `token` (e.g. a ServiceAccount
/// token from the TokenRequest API) against the same apiserver and CA as the
/// admin kubeconfig, and carries nothing else of the admin's identity.
pub fn token_kubeconfig(token: &str) -> Result<serde_json::Value> {
    let path = std::env::var("KUBECONFIG").context("KUBECONFIG is not set")?;
    let admin = Kubeconfig::read_from(&path)?;
    let cluster = admin
        .clusters
        .first()
        .and_then(|c| c.cluster.clone())
        .context("admin kubeconfig has no cluster")?;
    Ok(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {
            "server": cluster.server,
            "certificate-authority-data": cluster.certificate_authority_data,
        }}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }))
}

/// A client for [`token_kubeconfig`].
pub async fn token_client(token: &str) -> Result<Client> {
    let kubeconfig: Kubeconfig = serde_json::from_value(token_kubeconfig(token)?)?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// Label on every test namespace: the pid of the test process that made it.
pub const RUN_LABEL: &str = "moe.dev/e2e-run";

/// A namespace made for one test, named `<prefix>-<unique suffix>`.
pub struct TestNamespace {
    pub name: String,
    client: Client,
}

impl TestNamespace {
    /// Creates the namespace with the given labels (e.g. Pod Security levels).
    pub async fn create(client: &Client, prefix: &str, labels: &[(&str, &str)]) -> Result<Self> {
        let suffix = format!("{:x}", std::process::id() ^ (unique() as u32));
        let name = format!("{prefix}-{suffix}");
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .chain([(RUN_LABEL.to_string(), std::process::id().to_string())])
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await?;
        Ok(Self {
            name,
            client: client.clone(),
        })
    }

    /// A handle on an existing namespace.
    pub fn from_name(client: &Client, name: &str) -> Self {
        Self {
            name: name.into(),
            client: client.clone(),
        }
    }

    /// Deletes the namespace (and, through the namespace controller, what is in it).
    /// Called at the end of a passing test; a failing one leaves it for inspection.
    pub async fn delete(self) -> Result<()> {
        Api::<Namespace>::all(self.client)
            .delete(&self.name, &DeleteParams::background())
            .await?;
        Ok(())
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    nanos.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ n.wrapping_mul(0xBF58_476D_1CE4_E5B9)
}

/// Polls `check` every 250 ms until it returns `Some`, or fails after `timeout`
/// saying what was awaited and what `check` last saw.
///
/// Polling (rather than a watch) keeps each wait independent of watch-cache
/// timing; every check is a fresh read from the apiserver.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if start.elapsed() > timeout {
            match last_error {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {what}; last error: {e:#}")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The HTTP status code of an apiserver error, if `err` is one.
pub fn api_status(err: &kube::Error) -> Option<u16> {
    match err {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// The apiserver's message of an error, or its display form.
pub fn api_message(err: &kube::Error) -> String {
    match err {
        kube::Error::Api(status) => status.message.clone(),
        other => other.to_string(),
    }
}

/// Sum of the Prometheus samples whose line starts with `prefix` (all label sets).
pub fn metric_sum(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Dry-run creates `base` of `kind` (moe.dev/v1alpha1) in `ns`, which must be
/// accepted, so each rejection below is its case's own doing; then each case.
/// Returns one line per case that was accepted, refused with a status other
/// than 422, or refused without naming every text the case expects.
pub async fn rejection_problems(
    client: &Client,
    ns: &str,
    kind: &str,
    base: serde_json::Value,
    cases: &[moe_crds::fixtures::InvalidCase],
) -> Result<Vec<String>> {
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk("moe.dev", "v1alpha1", kind));
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &resource);
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    api.create(&dry, &serde_json::from_value(base)?)
        .await
        .with_context(|| format!("the valid base {kind} was refused"))?;
    let mut problems = vec![];
    for case in cases {
        let obj: DynamicObject = serde_json::from_value(case.object.clone())?;
        match api.create(&dry, &obj).await {
            Ok(_) => problems.push(format!("{}: accepted", case.name)),
            Err(e) => {
                let msg = api_message(&e);
                if api_status(&e) != Some(422) {
                    problems.push(format!("{}: status {:?}: {msg}", case.name, api_status(&e)));
                }
                for want in &case.expect {
                    if !msg.contains(want.as_str()) {
                        problems.push(format!("{}: {msg:?} lacks {want:?}", case.name));
                    }
                }
            }
        }
    }
    Ok(problems)
}

/// The config the operator rendered for the job or service `name`: its
/// ConfigMap `<name>-config`'s `config.json` (a worker's or a server's).
pub async fn rendered_config(client: &Client, ns: &str, name: &str) -> Result<serde_json::Value> {
    let config_map = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), ns)
        .get(&format!("{name}-config"))
        .await?;
    Ok(serde_json::from_str(
        config_map
            .data
            .as_ref()
            .and_then(|d| d.get("config.json"))
            .context("no config.json")?,
    )?)
}

/// A bound PersistentVolumeClaim `name` (a static PV pre-bound to it).
pub async fn bound_claim(ns: &str, name: &str) -> Result<()> {
    operator::sh(&format!(
        "set -euo pipefail
         cat <<EOF | kubectl apply -f - >/dev/null
apiVersion: v1
kind: PersistentVolume
metadata: {{name: {ns}-{name}}}
spec:
  capacity: {{storage: 1Ti}}
  accessModes: [ReadWriteMany]
  storageClassName: ''
  persistentVolumeReclaimPolicy: Delete
  hostPath: {{path: /tmp/{ns}-{name}}}
  claimRef: {{namespace: {ns}, name: {name}}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: {name}, namespace: {ns}}}
spec:
  accessModes: [ReadWriteMany]
  storageClassName: ''
  volumeName: {ns}-{name}
  resources: {{requests: {{storage: 1Ti}}}}
EOF
         kubectl wait --for=jsonpath='{{.status.phase}}'=Bound pvc/{name} -n {ns} --timeout=60s >/dev/null
         # The test plane runs no pvc-protection controller: its finalizer would
         # never be removed and would hold the namespace in Terminating forever.
         kubectl patch pvc/{name} -n {ns} --type=merge -p '{{\"metadata\":{{\"finalizers\":null}}}}' >/dev/null"
    ))?;
    Ok(())
}

/// The label a KWOK stage of the test plane holds a Running pod by: remove it
/// to let a Job pod complete (`tests/cluster/kwok-stages.yaml`).
pub const HOLD: &str = "kwok.test/hold";

/// A GPU job of `nodes` × 8 ranks whose pods KWOK holds Running until released.
pub fn gpu_job(name: &str, nodes: i32, extra: serde_json::Value) -> moe_crds::MoETrainingJob {
    let mut v = serde_json::json!({
        "apiVersion": "moe.dev/v1alpha1",
        "kind": "MoETrainingJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"hiddenSize": 64, "layers": 2, "attentionHeads": 8, "kvHeads": 8, "seqLen": 64,
                      "moe": {"experts": 16, "topK": 2, "sharedExperts": 1, "expertHiddenSize": 32}},
            "training": {"steps": 100, "globalBatchSize": nodes * 8},
            "parallelism": {"nodes": nodes, "processesPerNode": 8, "expertParallel": 8},
            "placement": {"gpuType": "H100"},
            "worker": {"podMetadata": {"labels": {HOLD: "true"}}},
            "runPolicy": {"backoffLimit": 1}
        }
    });
    moe_crds::fixtures::merge_patch(&mut v, &extra);
    serde_json::from_value(v).expect("valid MoETrainingJob")
}

/// The pool of fake nodes for the scheduler's own gang scheduling
/// (`tests/cluster/nodes.sh`: 5 nodes, a rack of 2 and a rack of 3); each
/// test binary has one test on it.
pub const GANG_POOL: &str = "gang";

/// The operator flag that schedules gangs through the Workload API.
pub const WORKLOAD_API: [&str; 2] = ["--gang-scheduling", "workload-api"];

/// The pool of 4 fake nodes (`tests/cluster/nodes.sh`) for the elastic
/// job test, which crowds it with pods of its own; one test uses it.
pub const ELASTIC_POOL: &str = "elastic";

/// The same for the elastic job under the Workload API.
pub const GANG_ELASTIC_POOL: &str = "gang-elastic";

/// The pool of fake nodes with a device of the fake DRA driver each
/// (`tests/cluster/nodes.sh`: 2 nodes, DeviceClass [`DRA_CLASS`]).
pub const DRA_POOL: &str = "dra";
pub const DRA_CLASS: &str = "fabric.moe.dev";

/// A `spec.placement` patch onto a tainted test pool (its label and taint),
/// merged with `extra`.
pub fn on_pool(pool: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut v = serde_json::json!({"spec": {"placement": {
        "nodeSelector": {"node.moe.dev/pool": pool},
        "tolerations": [{"key": "moe.dev/pool", "operator": "Equal", "value": pool, "effect": "NoSchedule"}]
    }}});
    moe_crds::fixtures::merge_patch(&mut v, &extra);
    v
}

/// A PriorityClass (value 1000) named after a test's namespace, for a gang
/// of higher priority. It is cluster-scoped: the test deletes it at the end.
pub struct UrgentClass {
    pub name: String,
    api: Api<k8s_openapi::api::scheduling::v1::PriorityClass>,
}

impl UrgentClass {
    pub async fn create(client: &Client, namespace: &str) -> Result<Self> {
        let name = format!("{namespace}-urgent");
        let api = Api::all(client.clone());
        let class = serde_json::from_value(serde_json::json!({
            "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
            "metadata": {"name": name}, "value": 1000
        }))?;
        api.create(&PostParams::default(), &class).await?;
        Ok(Self { name, api })
    }

    pub async fn delete(self) -> Result<()> {
        self.api
            .delete(&self.name, &DeleteParams::default())
            .await?;
        Ok(())
    }
}

/// Lets the pods of training job `job` that KWOK holds Running ([`HOLD`]) complete.
pub async fn release_job(pods: &Api<k8s_openapi::api::core::v1::Pod>, job: &str) -> Result<()> {
    let list = pods
        .list(&kube::api::ListParams::default().labels(&format!("moe.dev/job-name={job}")))
        .await?;
    let patch = serde_json::json!({"metadata": {"labels": {HOLD: null}}});
    for p in list.items {
        let name = p.metadata.name.unwrap_or_default();
        pods.patch(
            &name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await?;
    }
    Ok(())
}
