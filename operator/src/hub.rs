//! Downloads from the Hugging Face Hub, shared by both kinds: a serving
//! pod's model (`MoEInferenceService.spec.model.huggingface`) and a training
//! pod's data (`MoETrainingJob.spec.data.huggingface`). Each pod's init
//! container `download` runs `moe-worker fetch` into a volume (a cache claim
//! or an emptyDir) and points a pod-local link at the commit it fetched;
//! the main container reads the link. How the downloads stand is read back
//! from the init containers' statuses.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, ContainerStatus, EnvVar, EnvVarSource, Pod, ResourceRequirements, SecretKeySelector,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use moe_crds::contract::FetchReport;
use moe_crds::{SecretKey, WorkerSpec};

use crate::pods::{BuildContext, container_security_context, mount};

/// The init container that downloads (a served model, a training job's
/// dataset).
pub const DOWNLOAD_CONTAINER: &str = "download";
/// The init container that downloads the pretrained model a training job
/// starts from (`model.initFrom`), beside its dataset's.
pub const MODEL_DOWNLOAD_CONTAINER: &str = "download-model";
/// The directory under a volume's mount point that downloads go into.
pub const HUB_DIR: &str = "huggingface";
/// A pod-local volume (an emptyDir) holding the links to what was fetched,
/// mounted here (read-write for the download, read-only for the rest).
pub const PINNED_VOLUME: &str = "pinned";
pub const PINNED_MOUNT: &str = "/run/moe";

/// The init containers that download a serving pod's Hub adapters
/// (`adapters[].huggingface`) are this and the adapter's index.
pub const ADAPTER_DOWNLOAD_PREFIX: &str = "download-adapter-";

/// Whether the container `name` is one of the downloads.
pub fn is_download_container(name: &str) -> bool {
    name == DOWNLOAD_CONTAINER
        || name == MODEL_DOWNLOAD_CONTAINER
        || name.starts_with(ADAPTER_DOWNLOAD_PREFIX)
}

/// What a download takes from its repo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fetches {
    /// A model: what serving reads.
    Model,
    /// A dataset's files or directories.
    Dataset(Vec<String>),
    /// A PEFT adapter: its config and safetensors.
    Adapter,
}

/// One pod's download.
pub struct Download<'a> {
    /// The init container's name.
    pub container: &'a str,
    pub repo: &'a str,
    pub revision: &'a str,
    pub endpoint: Option<&'a str>,
    pub token_secret: Option<&'a SecretKey>,
    pub fetches: Fetches,
    /// The volume the files go on, and where it is mounted.
    pub volume: &'a str,
    pub mount_path: &'a str,
    /// The link (under [`PINNED_MOUNT`]) to the fetched commit.
    pub link: &'a str,
}

/// The init container running `moe-worker fetch` for `download`: the
/// worker's image and Pod Security, the token from its Secret and nothing
/// else of the worker's environment.
pub fn download_container(ctx: &BuildContext, worker: &WorkerSpec, d: &Download) -> Container {
    let mut command: Vec<String> = ["moe-worker", "fetch"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    match &d.fetches {
        Fetches::Model => {}
        Fetches::Dataset(_) => command.extend(["--repo-type".into(), "dataset".into()]),
        Fetches::Adapter => command.extend(["--repo-type".into(), "adapter".into()]),
    }
    command.extend([
        "--repo".into(),
        d.repo.into(),
        "--revision".into(),
        d.revision.into(),
        "--into".into(),
        format!("{}/{HUB_DIR}", d.mount_path),
        "--link".into(),
        d.link.into(),
    ]);
    if let Fetches::Dataset(include) = &d.fetches {
        for path in include {
            command.extend(["--include".into(), path.clone()]);
        }
    }
    if let Some(endpoint) = d.endpoint {
        command.extend(["--endpoint".to_string(), endpoint.to_string()]);
    }
    let token = d.token_secret.map(|secret| EnvVar {
        name: "HF_TOKEN".into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.name.clone(),
                key: secret.key.clone(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    Container {
        name: d.container.into(),
        image: Some(ctx.image(worker)),
        image_pull_policy: worker.image_pull_policy.map(|p| p.as_str().to_string()),
        command: Some(command),
        env: token.map(|t| vec![t]),
        // Network and disk bound: a core hashes faster than a link delivers.
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("500m".into())),
                ("memory".to_string(), Quantity("256Mi".into())),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_string(),
                Quantity("1Gi".into()),
            )])),
            ..Default::default()
        }),
        security_context: Some(container_security_context()),
        volume_mounts: Some(vec![
            mount(d.volume, d.mount_path, false),
            mount(PINNED_VOLUME, PINNED_MOUNT, false),
            mount("tmp", "/tmp", false),
        ]),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    }
}

/// A container of a pod that exited with an error, as the kubelet reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct ContainerFailure {
    pub pod: String,
    pub exit_code: i32,
    /// The worker's words (its termination message).
    pub message: String,
}

/// Pods' downloads: their init containers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Downloads {
    /// Downloading now.
    pub running: i32,
    /// Failed last time (and retried by the kubelet, with back-off).
    pub failed: Vec<ContainerFailure>,
}

/// The worker's exit code for what no restart can fix: a configuration or
/// model it cannot use, a download the Hub refused.
pub const UNFIXABLE_EXIT_CODE: i32 = 2;
/// The download's exit code for what a later try may fix (the network, the
/// disk), after its own retries.
pub const TRANSIENT_EXIT_CODE: i32 = 1;

/// `pod`'s status of container `name` (an init container's with `init`).
pub fn container_status(pod: &Pod, name: &str, init: bool) -> Option<ContainerStatus> {
    let status = pod.status.as_ref()?;
    let all = if init {
        status.init_container_statuses.as_ref()
    } else {
        status.container_statuses.as_ref()
    };
    all?.iter().find(|c| c.name == name).cloned()
}

/// The container's failure, if it is not running and exited with an error:
/// now, or last time and waiting to be restarted (CrashLoopBackOff). Its
/// termination message is the worker's words; without one, the kubelet's
/// reason.
pub fn failure_of(pod: &Pod, status: &ContainerStatus) -> Option<ContainerFailure> {
    let state = status.state.as_ref();
    if state.and_then(|s| s.running.as_ref()).is_some() {
        return None;
    }
    let t = state
        .and_then(|s| s.terminated.as_ref())
        .or_else(|| {
            status
                .last_state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
        })
        .filter(|t| t.exit_code != 0)?;
    Some(ContainerFailure {
        pod: pod.metadata.name.clone().unwrap_or_default(),
        exit_code: t.exit_code,
        message: t
            .message
            .clone()
            .or_else(|| t.reason.clone())
            .unwrap_or_default(),
    })
}

/// The pods' downloads, from their init containers' statuses: one running,
/// or one whose last run failed (its exit code and termination message,
/// which the worker writes).
pub fn downloads_of(pods: &[Pod]) -> Downloads {
    let mut downloads = Downloads::default();
    for pod in pods {
        let statuses = pod
            .status
            .as_ref()
            .and_then(|s| s.init_container_statuses.clone())
            .unwrap_or_default();
        for status in statuses
            .into_iter()
            .filter(|s| is_download_container(&s.name))
        {
            if status
                .state
                .as_ref()
                .and_then(|s| s.running.as_ref())
                .is_some()
            {
                downloads.running += 1;
            } else if let Some(failure) = failure_of(pod, &status) {
                downloads.failed.push(failure);
            }
        }
    }
    downloads
}

/// Which commit each pod's download fetched, by commit (pods sorted by
/// name): a pod says so in its download's termination message (a
/// [`FetchReport`]) once the download succeeded.
pub fn commits_of<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> BTreeMap<String, Vec<String>> {
    let mut commits: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for pod in pods {
        let report = container_status(pod, DOWNLOAD_CONTAINER, true)
            .and_then(|s| s.state?.terminated)
            .filter(|t| t.exit_code == 0)
            .and_then(|t| serde_json::from_str::<FetchReport>(t.message?.trim()).ok());
        if let Some(report) = report {
            commits
                .entry(report.commit)
                .or_default()
                .push(pod.metadata.name.clone().unwrap_or_default());
        }
    }
    for pods in commits.values_mut() {
        pods.sort();
    }
    commits
}
