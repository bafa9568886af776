//! Playing the kubelet for one container of a pod: KWOK runs no
//! containers, so a test runs a pod's own `moe-worker` command itself and
//! reports how it ended through KWOK's annotations, which the stages of
//! `tests/cluster/kwok-stages.yaml` turn into the pod's status.

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

/// A test playing the kubelet for one container of a pod (KWOK runs none):
/// it runs the container's own `moe-worker` command with the worker built
/// here, gives it a termination-message file as the kubelet does, and
/// reports how it ended through KWOK's annotations
/// (`tests/cluster/kwok-stages.yaml`).
pub struct Kubelet {
    scratch: std::path::PathBuf,
}

impl Kubelet {
    /// A kubelet with its own scratch directory, removed when it is
    /// dropped. Tests run in parallel in one process and may share a
    /// `name` (one helper serving two tests), so the directory is also
    /// numbered: a test finishing first must not delete another's volumes.
    pub fn new(name: &str) -> Result<Self> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let scratch =
            std::env::temp_dir().join(format!("moe-e2e-{name}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&scratch)?;
        Ok(Self { scratch })
    }

    /// A path in the scratch directory (the container's volumes, here).
    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.scratch.join(name)
    }

    /// Runs `command` (`moe-worker …`) with only `env`: its exit code and
    /// termination message (its stderr when it wrote none).
    pub fn run(&self, command: &[String], env: &[(String, String)]) -> Result<(i32, String)> {
        let exited = self.run_for_output(command, env)?;
        Ok((exited.code, exited.message))
    }

    /// Runs `pod`'s download init container (`moe-worker fetch`) with the
    /// values of `flags` (`--into`, `--link`: its volumes) replaced by
    /// paths here.
    pub fn run_download(
        &self,
        pod: &Pod,
        flags: &[(&str, std::path::PathBuf)],
    ) -> Result<(i32, String)> {
        self.run_init(pod, None, flags)
    }

    /// [`Self::run_download`] of the init container `name` (`None`: the first).
    pub fn run_init(
        &self,
        pod: &Pod,
        name: Option<&str>,
        flags: &[(&str, std::path::PathBuf)],
    ) -> Result<(i32, String)> {
        let init = pod
            .spec
            .as_ref()
            .and_then(|s| s.init_containers.as_ref())
            .and_then(|c| c.iter().find(|c| name.is_none_or(|n| c.name == n)))
            .context("no such init container")?;
        let mut command = init.command.clone().unwrap_or_default();
        ensure!(command[..2] == ["moe-worker", "fetch"], "{command:?}");
        for (flag, path) in flags {
            let at = command
                .iter()
                .position(|a| a == flag)
                .with_context(|| format!("no {flag} in {command:?}"))?;
            command[at + 1] = path.display().to_string();
        }
        self.run(&command, &[])
    }

    /// `pod`'s main container as it would start here: its command and its
    /// plain environment (what a pod reads from the cluster, `valueFrom`,
    /// left out), with the config the operator mounts at
    /// [`moe_crds::contract::CONFIG_PATH`] read from `config` instead, and
    /// the worker's status endpoint off.
    pub fn main_container(pod: &Pod, config: &std::path::Path) -> Result<(Vec<String>, Env)> {
        let container = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .context("no container")?;
        let here = |text: &str| {
            text.replace(
                moe_crds::contract::CONFIG_PATH,
                &config.display().to_string(),
            )
        };
        let command = container
            .command
            .iter()
            .flatten()
            .map(|a| here(a))
            .collect();
        let env = container
            .env
            .iter()
            .flatten()
            .filter_map(|v| Some((v.name.clone(), here(v.value.as_ref()?))))
            .chain([("MOE_STATUS_ADDR".to_string(), "off".to_string())])
            .collect();
        Ok((command, env))
    }

    /// [`Self::run`], with what the command printed on stdout too.
    pub fn run_for_output(&self, command: &[String], env: &[(String, String)]) -> Result<Exited> {
        ensure!(
            command.first().map(String::as_str) == Some("moe-worker"),
            "{command:?}"
        );
        let log = self.path("termination-log");
        std::fs::write(&log, "")?;
        let out = std::process::Command::new(crate::operator::worker_binary()?)
            .args(&command[1..])
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("MOE_TERMINATION_LOG", &log)
            .output()?;
        let code = out.status.code().context("killed by a signal")?;
        let message = std::fs::read_to_string(&log)?;
        let message = if message.is_empty() {
            String::from_utf8_lossy(&out.stderr).into_owned()
        } else {
            message
        };
        Ok(Exited {
            code,
            message,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Starts `command` (`moe-worker serve …`, a container that keeps
    /// running) with only `env`; it is killed when the returned handle is
    /// dropped.
    pub fn start(&self, command: &[String], env: &[(String, String)]) -> Result<Running> {
        ensure!(
            command.first().map(String::as_str) == Some("moe-worker"),
            "{command:?}"
        );
        let child = std::process::Command::new(crate::operator::worker_binary()?)
            .args(&command[1..])
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("MOE_TERMINATION_LOG", self.path("termination-log"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(self.path("stderr"))?)
            .spawn()?;
        Ok(Running(child))
    }

    /// Tells KWOK how the `kind` (`init`, `crash`, `failed`, `succeeded`)
    /// container of `pod` ended.
    pub async fn report(
        &self,
        pods: &Api<Pod>,
        pod: &str,
        kind: &str,
        code: i32,
        message: &str,
    ) -> Result<()> {
        let patch = json!({"metadata": {"annotations": {
            format!("kwok.test/{kind}-exit-code"): code.to_string(),
            format!("kwok.test/{kind}-message"): message,
        }}});
        pods.patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    }
}

/// A container [`Kubelet::start`] started: killed when dropped.
pub struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A process's environment, by name and value.
pub type Env = Vec<(String, String)>;

/// How a command the kubelet ran ended.
pub struct Exited {
    pub code: i32,
    /// Its termination message (its stderr when it wrote none).
    pub message: String,
    pub stdout: String,
    pub stderr: String,
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}
