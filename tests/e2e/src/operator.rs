//! Runs the real `moe-operator` binary as a local process against the test
//! control plane, authenticated with the token of the ServiceAccount that a
//! real `helm install` of the chart created, so it has exactly the RBAC the
//! chart grants (the one copy of it; tests/rbac.rs checks from the apiserver's
//! audit trail that all of it is used). A Pod cannot run it on KWOK's fake
//! nodes, so the process stands in for the Deployment's container.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

/// The chart values the harness installs the operator's RBAC with (its
/// defaults, but the CRDs and with `gangScheduling=workload-api` and
/// `gatewayAPI.enabled` and `.inferencePool`, whose PodGroup, HTTPRoute and
/// InferencePool rules the Workload API and route tests use); tests/rbac.rs
/// renders the same.
pub const HARNESS_VALUES: &str = "--set crds.enabled=false --set gangScheduling=workload-api --set gatewayAPI.enabled=true --set gatewayAPI.inferencePool=true";

/// Namespace and ServiceAccount the chart installs the operator with.
pub const OPERATOR_NAMESPACE: &str = "moe-system";
pub const RELEASE: &str = "moe";
pub const SERVICE_ACCOUNT: &str = "moe-moe-operator";

/// The repository root (this crate lives in tests/e2e).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root exists")
}

fn state_dir() -> Result<PathBuf> {
    Ok(PathBuf::from(std::env::var("MOE_CLUSTER_STATE").context(
        "MOE_CLUSTER_STATE unset: source tests/cluster/.state/env",
    )?))
}

/// Runs a command, failing with its output when it fails.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `sh -c` with the test environment (pinned kubectl/helm first on PATH).
pub fn sh(script: &str) -> Result<String> {
    run(Command::new("bash")
        .arg("-c")
        .arg(script)
        .current_dir(repo_root()))
}

static INSTALL: Once = Once::new();

/// Installs the CRDs (generated YAML) and the chart (release [`RELEASE`] in
/// [`OPERATOR_NAMESPACE`], [`HARNESS_VALUES`]), once per test process.
///
/// The chart goes in with `helm upgrade --install`, as users install it, so
/// the ServiceAccount and RBAC the operator runs with are what Helm created.
/// Its CRD templates are off (`crds.enabled=false`): tests/chart.rs installs
/// releases that own the CRDs, and a CRD can belong to one release only. The
/// CRDs applied here are the same generated YAML (crds/tests/generated_yaml.rs).
/// Several test processes may share one plane: a lock file serialises their
/// installs, since Helm refuses a second operation on a release in progress.
pub fn install() -> Result<()> {
    let mut result = Ok(());
    INSTALL.call_once(|| {
        // Namespaces that failed tests of earlier runs left behind (for
        // inspection) would keep holding fake GPUs: remove them first. Only
        // those of test processes that are gone: several suites (training,
        // inference, the benchmark) may share one plane at the same time.
        result = sh(&format!(
            "set -euo pipefail
             kubectl get namespace -l '{run},{run}!={pid}' \
               -o jsonpath='{{range .items[*]}}{{.metadata.name}} {{.metadata.labels.moe\\.dev/e2e-run}}{{\"\\n\"}}{{end}}' |
             while read -r ns owner; do
               [ -n \"$ns\" ] && ! kill -0 \"$owner\" 2>/dev/null && kubectl delete namespace --wait=false \"$ns\" >/dev/null || true
             done
             kubectl apply --server-side --force-conflicts -f deploy/crds/moe-crds.yaml >/dev/null
             kubectl wait --for=condition=Established crd/moetrainingjobs.moe.dev crd/moeinferenceservices.moe.dev --timeout=60s >/dev/null
             kubectl create namespace {OPERATOR_NAMESPACE} --dry-run=client -o yaml | kubectl apply -f - >/dev/null
             exec 9>\"$MOE_CLUSTER_STATE/helm-{RELEASE}.lock\"
             flock 9
             if ! helm status {RELEASE} --namespace {OPERATOR_NAMESPACE} >/dev/null 2>&1; then
               # A plane started before the harness installed with Helm has
               # these objects from `kubectl apply`: let the release adopt them.
               for what in serviceaccount/{SERVICE_ACCOUNT} clusterrole/{RELEASE}-moe-operator \
                   clusterrolebinding/{RELEASE}-moe-operator role/{RELEASE}-moe-operator-leader-election \
                   rolebinding/{RELEASE}-moe-operator-leader-election; do
                 kubectl get $what -n {OPERATOR_NAMESPACE} >/dev/null 2>&1 || continue
                 kubectl label $what -n {OPERATOR_NAMESPACE} app.kubernetes.io/managed-by=Helm --overwrite >/dev/null
                 kubectl annotate $what -n {OPERATOR_NAMESPACE} meta.helm.sh/release-name={RELEASE} \
                   meta.helm.sh/release-namespace={OPERATOR_NAMESPACE} --overwrite >/dev/null
               done
             fi
             helm upgrade --install {RELEASE} charts/moe-operator --namespace {OPERATOR_NAMESPACE} \
               {HARNESS_VALUES} --history-max 3 >/dev/null",
            run = crate::RUN_LABEL,
            pid = std::process::id()
        ))
        .map(|_| ());
    });
    result
}

/// The operator binary built by `cargo build -p moe-operator` (tests/run.sh does).
fn operator_binary() -> Result<PathBuf> {
    debug_binary("moe-operator", "moe-operator", "MOE_OPERATOR_BIN")
}

/// `moectl`, built beside the operator by `cargo build -p moe-operator`.
pub fn moectl_binary() -> Result<PathBuf> {
    debug_binary("moectl", "moe-operator", "MOE_MOECTL_BIN")
}

/// The worker binary built by `cargo build -p moe-worker` (tests/run.sh
/// does): what a test playing the kubelet runs a pod's command with.
pub fn worker_binary() -> Result<PathBuf> {
    debug_binary("moe-worker", "moe-worker", "MOE_WORKER_BIN")
}

fn debug_binary(name: &str, package: &str, override_var: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var(override_var).ok().filter(|p| !p.is_empty()) {
        return Ok(p.into());
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("target"));
    let bin = target.join("debug").join(name);
    if !bin.exists() {
        bail!(
            "{} is missing: run `cargo build -p {package}` first (tests/run.sh does)",
            bin.display()
        );
    }
    Ok(bin)
}

/// A running operator process; killed on drop.
pub struct Operator {
    child: Child,
    pub name: String,
    pub http: String,
    pid_file: PathBuf,
}

impl Operator {
    /// Starts an operator that watches only `namespace`, with its own Lease,
    /// so tests run side by side without sharing an operator.
    pub async fn start(namespace: &str) -> Result<Self> {
        Self::start_replica(namespace, None).await
    }

    /// Like [`Operator::start`], with more command-line flags.
    pub async fn start_with(namespace: &str, flags: &[&str]) -> Result<Self> {
        Self::launch(namespace, None, flags).await
    }

    /// Like [`Operator::start`], as one of several replicas sharing the
    /// namespace's Lease: only the holder acts.
    pub async fn start_replica(namespace: &str, replica: Option<&str>) -> Result<Self> {
        Self::launch(namespace, replica, &[]).await
    }

    async fn launch(namespace: &str, replica: Option<&str>, flags: &[&str]) -> Result<Self> {
        install()?;
        let state = state_dir()?;
        let name = match replica {
            Some(r) => format!("operator-{namespace}-{r}"),
            None => format!("operator-{namespace}"),
        };
        let token = sh(&format!(
            "kubectl create token {SERVICE_ACCOUNT} --namespace {OPERATOR_NAMESPACE} --duration=2h"
        ))?;
        let kubeconfig = state.join(format!("{name}.kubeconfig"));
        std::fs::write(
            &kubeconfig,
            serde_json::to_string_pretty(&crate::token_kubeconfig(token.trim())?)?,
        )?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        // Appended to: a test that restarts its operator keeps both runs' logs.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(state.join("logs").join(format!("{name}.log")))?;
        let child = Command::new(operator_binary()?)
            .args([
                "--watch-namespace",
                namespace,
                "--lease-namespace",
                OPERATOR_NAMESPACE,
            ])
            .args([
                "--lease-name",
                &format!("e2e-{namespace}"),
                "--identity",
                &name,
            ])
            .args([
                "--http-addr",
                &format!("127.0.0.1:{port}"),
                "--log-format",
                "text",
            ])
            .args(flags)
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info,moe_operator=debug")
            .env("MOE_WORKER_IMAGE", "moe-worker:e2e")
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()?;
        let pid_file = state.join("pids").join(&name);
        std::fs::write(&pid_file, child.id().to_string())?;
        let op = Self {
            child,
            name,
            http: format!("http://127.0.0.1:{port}"),
            pid_file,
        };
        crate::eventually(
            "the operator to serve /readyz",
            Duration::from_secs(30),
            || async {
                Ok(http_get(&format!("{}/readyz", op.http))
                    .await
                    .ok()
                    .filter(|b| b == "ok")
                    .map(|_| ()))
            },
        )
        .await?;
        Ok(op)
    }

    /// The operator's Prometheus metrics.
    pub async fn metrics(&self) -> Result<String> {
        http_get(&format!("{}/metrics", self.http)).await
    }

    /// The operator's process id.
    pub fn pid(&self) -> Option<u32> {
        Some(self.child.id())
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

/// A minimal HTTP/1.0 GET on loopback (enough for /readyz and /metrics).
async fn http_get(url: &str) -> Result<String> {
    let (status, body) = http_request("GET", url, None).await?;
    ensure!(status == 200, "{url}: status {status}: {body}");
    Ok(body)
}

/// A minimal HTTP/1.0 request on loopback, `body` sent as JSON: the
/// status and the body of the response.
pub async fn http_request(method: &str, url: &str, body: Option<&str>) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").context("http only")?;
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let mut stream = tokio::net::TcpStream::connect(host).await?;
    let content = body.map_or(String::new(), |b| {
        format!(
            "content-type: application/json\r\ncontent-length: {}\r\n",
            b.len()
        )
    });
    stream
        .write_all(
            format!(
                "{method} {path} HTTP/1.0\r\nHost: {host}\r\n{content}\r\n{}",
                body.unwrap_or_default()
            )
            .as_bytes(),
        )
        .await?;
    let mut buf = String::new();
    stream.read_to_string(&mut buf).await?;
    let (head, body) = buf
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{url}: no status in {head:?}"))?;
    Ok((status, body.to_string()))
}

/// Whether the operator's ServiceAccount may `verb` `resource` in every
/// namespace (`resource` may name a subresource: `moetrainingjobs.moe.dev/status`).
pub fn operator_can(verb: &str, resource: &str) -> bool {
    let sa = format!("system:serviceaccount:{OPERATOR_NAMESPACE}:{SERVICE_ACCOUNT}");
    let (resource, sub) = resource
        .split_once('/')
        .map_or((resource, None), |(r, s)| (r, Some(s)));
    let mut args = vec![
        "auth",
        "can-i",
        verb,
        resource,
        "--all-namespaces",
        "--as",
        &sa,
    ];
    if let Some(sub) = sub {
        args.extend(["--subresource", sub]);
    }
    // `kubectl auth can-i` exits 1 for "no"; the answer is on stdout either way.
    let out = std::process::Command::new("kubectl")
        .args(&args)
        .output()
        .expect("kubectl runs");
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}
