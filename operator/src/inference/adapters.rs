//! `spec.adapters`: where each LoRA adapter's PEFT directory is, resolved
//! from its source (pure), and how the server pods get them: one read-only
//! volume per claim, at `/adapters/<k>`; a Hub adapter downloaded by an
//! init container of its own (`download-adapter-<i>`) into its cache claim
//! or an emptyDir at `/adapters/hub-<i>`, read through the pod's link to
//! the commit it fetched (`/run/moe/adapter-<i>`). Each adapter's directory
//! as the server sees it is written into the server's config.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{
    Container, PersistentVolumeClaimVolumeSource, Volume, VolumeMount,
};
use moe_crds::{
    AdapterVolume, HuggingFaceModel, MoEInferenceService, MoETrainingJob, OutputPhase,
    ServedAdapter, WorkerSpec,
};

use super::decide::{ModelState, reason};
use crate::hub::{ADAPTER_DOWNLOAD_PREFIX, Download, Fetches, PINNED_MOUNT, download_container};
use crate::pods::{BuildContext, empty_dir, mount};
use crate::training::checkpoints::{self, Unavailable};

/// Where the claims holding adapters are mounted, one directory each.
pub const ADAPTER_MOUNT: &str = "/adapters";
/// Under a training job's export, the directory its adapters are in
/// (unless it exported them alone: then at the top).
const EXPORT_ADAPTER_DIR: &str = "adapter";

/// An adapter, resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedAdapter {
    /// The model id requests name it by.
    pub name: String,
    pub place: AdapterPlace,
    /// What it is, for the server's config (a new one rolls the pods).
    pub revision: String,
}

/// Where an adapter's PEFT directory is.
#[derive(Clone, Debug, PartialEq)]
pub enum AdapterPlace {
    /// The directory `path` on a claim.
    Claim { claim_name: String, path: String },
    /// A Hub repo each pod downloads before its server starts.
    Hub(HuggingFaceModel),
}

/// Every adapter of `svc`, in the spec's order, given the training jobs
/// of its namespace by name; the first that cannot be served (yet, or
/// without a change) is why the service's model is not ready.
pub fn resolve(
    svc: &MoEInferenceService,
    job: impl Fn(&str) -> Option<Arc<MoETrainingJob>>,
) -> Result<Vec<ResolvedAdapter>, ModelState> {
    svc.spec
        .adapters
        .iter()
        .map(|adapter| resolve_one(adapter, &job))
        .collect()
}

fn resolve_one(
    adapter: &ServedAdapter,
    job: &impl Fn(&str) -> Option<Arc<MoETrainingJob>>,
) -> Result<ResolvedAdapter, ModelState> {
    let name = adapter.name.clone();
    if let Some(volume) = &adapter.volume {
        return Ok(on_volume(name, volume));
    }
    if let Some(hub) = &adapter.huggingface {
        return Ok(ResolvedAdapter {
            revision: format!("huggingface/{}@{}", hub.repo, hub.revision),
            place: AdapterPlace::Hub(hub.clone()),
            name,
        });
    }
    let Some(from) = &adapter.from_training_job else {
        return Err(ModelState::Broken {
            reason: reason::INVALID_SPEC,
            message: format!(
                "spec.adapters[{name}] needs exactly one source: fromTrainingJob, volume or \
                 huggingface"
            ),
        });
    };
    let found = job(&from.name);
    let then = format!("adapter {name} is served");
    let job = match checkpoints::available(&from.name, found.as_deref(), &then) {
        Ok((job, _)) => job,
        Err(Unavailable::Waiting { reason, message }) => {
            return Err(ModelState::Waiting { reason, message });
        }
        Err(Unavailable::Never { reason, message }) => {
            return Err(ModelState::Broken { reason, message });
        }
    };
    let incompatible = |why: &str| ModelState::Broken {
        reason: reason::MODEL_INCOMPATIBLE,
        message: format!("spec.adapters[{name}]: MoETrainingJob {} {why}", from.name),
    };
    if job.spec.training.lora.is_none() {
        return Err(incompatible(
            "trained no adapters (spec.training.lora unset): serve its model instead",
        ));
    }
    let Some(output) = job
        .spec
        .output
        .as_ref()
        .and_then(|o| o.huggingface.as_ref())
    else {
        return Err(incompatible(
            "exports no adapters (spec.output.huggingface unset): adapters are served from a job's export",
        ));
    };
    let exported = job.status.as_ref().and_then(|s| s.output.as_ref());
    match exported.map(|o| o.phase) {
        Some(OutputPhase::Exported) => {}
        Some(OutputPhase::Failed) => {
            return Err(ModelState::Broken {
                reason: reason::ADAPTER_EXPORT_FAILED,
                message: format!(
                    "spec.adapters[{name}]: the export of MoETrainingJob {} failed: {}",
                    from.name,
                    exported
                        .and_then(|o| o.message.as_deref())
                        .unwrap_or("its pod failed")
                ),
            });
        }
        _ => {
            return Err(ModelState::Waiting {
                reason: reason::WAITING_FOR_TRAINING_JOB,
                message: format!(
                    "MoETrainingJob {} is exporting its adapters; adapter {name} is served when the export is done",
                    from.name
                ),
            });
        }
    }
    let export = exported
        .map(|o| o.path.trim_matches('/'))
        .unwrap_or_default();
    let path = if output.adapter_only {
        export.to_owned()
    } else {
        format!("{export}/{EXPORT_ADAPTER_DIR}")
    };
    let uid: String = job
        .metadata
        .uid
        .as_deref()
        .unwrap_or_default()
        .chars()
        .take(8)
        .collect();
    Ok(ResolvedAdapter {
        revision: format!("moetrainingjob/{}/{uid}", from.name),
        place: AdapterPlace::Claim {
            claim_name: output.claim_name.clone(),
            path,
        },
        name,
    })
}

fn on_volume(name: String, volume: &AdapterVolume) -> ResolvedAdapter {
    let path = volume.path.trim_matches('/').to_owned();
    ResolvedAdapter {
        revision: format!("pvc/{}/{path}", volume.claim_name),
        place: AdapterPlace::Claim {
            claim_name: volume.claim_name.clone(),
            path,
        },
        name,
    }
}

/// The adapters as `moectl render` shows them without a cluster: a
/// training job's export on a claim named `<job>-export`.
pub fn as_rendered(svc: &MoEInferenceService) -> Vec<ResolvedAdapter> {
    svc.spec
        .adapters
        .iter()
        .map(|a| match resolve_one(a, &|_| None) {
            Ok(resolved) => resolved,
            Err(_) => {
                let job = a
                    .from_training_job
                    .as_ref()
                    .map_or("unknown", |j| j.name.as_str());
                ResolvedAdapter {
                    name: a.name.clone(),
                    place: AdapterPlace::Claim {
                        claim_name: format!("{job}-export"),
                        path: EXPORT_ADAPTER_DIR.into(),
                    },
                    revision: format!("moetrainingjob/{job}"),
                }
            }
        })
        .collect()
}

/// The claims the adapters are on, each once, in first-use order: claim
/// `k` is mounted at `/adapters/<k>` from volume `adapters-<k>`.
pub fn claims(adapters: &[ResolvedAdapter]) -> Vec<&str> {
    let mut claims: Vec<&str> = Vec::new();
    for adapter in adapters {
        if let AdapterPlace::Claim { claim_name, .. } = &adapter.place
            && !claims.contains(&claim_name.as_str())
        {
            claims.push(claim_name);
        }
    }
    claims
}

/// The Hub adapters, by their index in the spec.
fn downloads(adapters: &[ResolvedAdapter]) -> impl Iterator<Item = (usize, &HuggingFaceModel)> {
    adapters
        .iter()
        .enumerate()
        .filter_map(|(i, a)| match &a.place {
            AdapterPlace::Hub(hub) => Some((i, hub)),
            AdapterPlace::Claim { .. } => None,
        })
}

/// Whether some adapter is downloaded (the pod's links volume is needed).
pub fn downloads_any(adapters: &[ResolvedAdapter]) -> bool {
    downloads(adapters).next().is_some()
}

/// Adapter `i`'s download: its volume, where the volume is mounted, and
/// the pod's link to the commit it fetched.
fn download_paths(i: usize) -> (String, String, String) {
    (
        format!("adapter-download-{i}"),
        format!("{ADAPTER_MOUNT}/hub-{i}"),
        format!("{PINNED_MOUNT}/adapter-{i}"),
    )
}

/// Each adapter's name and directory as the server sees them.
pub fn dirs(adapters: &[ResolvedAdapter]) -> Vec<(String, String)> {
    let claims = claims(adapters);
    adapters
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let dir = match &a.place {
                AdapterPlace::Claim { claim_name, path } => {
                    let k = claims
                        .iter()
                        .position(|c| c == claim_name)
                        .expect("every adapter's claim is listed");
                    match path.as_str() {
                        "" => format!("{ADAPTER_MOUNT}/{k}"),
                        path => format!("{ADAPTER_MOUNT}/{k}/{path}"),
                    }
                }
                AdapterPlace::Hub(_) => download_paths(i).2,
            };
            (a.name.clone(), dir)
        })
        .collect()
}

/// The pod's volumes for the adapters: each claim's, read-only; each Hub
/// adapter's cache claim (written by its download) or emptyDir.
pub fn volumes(adapters: &[ResolvedAdapter]) -> Vec<Volume> {
    let claim = |name: String, claim: &str, read_only: bool| Volume {
        name,
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: claim.to_owned(),
            read_only: Some(read_only),
        }),
        ..Default::default()
    };
    let mut volumes: Vec<Volume> = claims(adapters)
        .into_iter()
        .enumerate()
        .map(|(k, c)| claim(format!("adapters-{k}"), c, true))
        .collect();
    for (i, hub) in downloads(adapters) {
        let (volume, _, _) = download_paths(i);
        volumes.push(match &hub.cache_claim_name {
            Some(c) => claim(volume, c, false),
            None => empty_dir(&volume, None, None),
        });
    }
    volumes
}

/// The server container's mounts of [`volumes`], all read-only.
pub fn server_mounts(adapters: &[ResolvedAdapter]) -> Vec<VolumeMount> {
    let claims = (0..claims(adapters).len()).map(|k| {
        mount(
            &format!("adapters-{k}"),
            &format!("{ADAPTER_MOUNT}/{k}"),
            true,
        )
    });
    let downloads = downloads(adapters).map(|(i, _)| {
        let (volume, at, _) = download_paths(i);
        mount(&volume, &at, true)
    });
    claims.chain(downloads).collect()
}

/// An init container per Hub adapter (`download-adapter-<i>`): `moe-worker
/// fetch --repo-type adapter` into its volume, linked for the server.
pub fn init_containers(
    ctx: &BuildContext,
    worker: &WorkerSpec,
    adapters: &[ResolvedAdapter],
) -> Vec<Container> {
    downloads(adapters)
        .map(|(i, hub)| {
            let (volume, at, link) = download_paths(i);
            download_container(
                ctx,
                worker,
                &Download {
                    container: &format!("{ADAPTER_DOWNLOAD_PREFIX}{i}"),
                    repo: &hub.repo,
                    revision: &hub.revision,
                    endpoint: hub.endpoint.as_deref(),
                    token_secret: hub.token_secret.as_ref(),
                    fetches: Fetches::Adapter,
                    volume: &volume,
                    mount_path: &at,
                    link: &link,
                },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::build::tests::service_fixture;
    use crate::inference::build::{self, ResolvedModel};
    use crate::pods::BuildContext;
    use serde_json::json;

    fn service() -> MoEInferenceService {
        service_fixture(json!({"spec": {
            "parallelism": {"processesPerPod": 1, "expertParallel": 1},
            "worker": {"device": "cpu"},
            "adapters": [
                {"name": "chat-sql", "fromTrainingJob": {"name": "tune"}},
                {"name": "chat-legal", "volume": {"claimName": "adapters", "path": "/legal/v2/"}},
                {"name": "chat-math", "volume": {"claimName": "adapters", "path": "math"}},
                {"name": "chat-hub", "huggingface": {"repo": "org/lora", "revision": "v2",
                                                    "tokenSecret": {"name": "hf"}}},
            ],
        }}))
    }

    /// A LoRA job in `phase` whose export is in `export` (`None`: not started).
    fn tune(phase: &str, export: Option<&str>, extra: serde_json::Value) -> Arc<MoETrainingJob> {
        let mut v = json!({
            "apiVersion": "moe.dev/v1alpha1", "kind": "MoETrainingJob",
            "metadata": {"name": "tune", "namespace": "serve", "uid": "0a1b2c3d4e5f"},
            "spec": {
                "model": {"hiddenSize": 64, "layers": 2, "attentionHeads": 4, "kvHeads": 2, "seqLen": 64,
                          "moe": {"experts": 8, "topK": 2, "expertHiddenSize": 32}},
                "training": {"steps": 100, "globalBatchSize": 8, "lora": {}},
                "checkpoint": {"claimName": "ckpt", "path": "runs"},
                "output": {"huggingface": {"claimName": "models", "path": "exports"}}
            },
            "status": {"phase": phase}
        });
        if let Some(phase) = export {
            v["status"]["output"] = json!({"phase": phase, "path": "exports/serve/tune",
                                           "architecture": "Qwen3MoeForCausalLM"});
        }
        moe_crds::fixtures::merge_patch(&mut v, &extra);
        Arc::new(serde_json::from_value(v).unwrap())
    }

    /// A claim adapter's claim and path (`("", "")` for a Hub one).
    fn place(adapter: &ResolvedAdapter) -> (&str, &str) {
        match &adapter.place {
            AdapterPlace::Claim { claim_name, path } => (claim_name, path),
            AdapterPlace::Hub(_) => ("", ""),
        }
    }

    fn resolved(job: Option<Arc<MoETrainingJob>>) -> Result<Vec<ResolvedAdapter>, ModelState> {
        resolve(&service(), |name| {
            assert_eq!(name, "tune");
            job.clone()
        })
    }

    #[test]
    fn an_exported_jobs_adapters_and_a_volumes_are_mounted_read_only_and_configured() {
        let adapters = resolved(Some(tune("Succeeded", Some("Exported"), json!({})))).unwrap();
        assert_eq!(
            adapters
                .iter()
                .map(|a| (a.name.as_str(), place(a)))
                .collect::<Vec<_>>(),
            [
                ("chat-sql", ("models", "exports/serve/tune/adapter")),
                ("chat-legal", ("adapters", "legal/v2")),
                ("chat-math", ("adapters", "math")),
                ("chat-hub", ("", "")),
            ]
        );
        // One volume per claim; the config names each adapter's directory.
        let svc = service();
        let model = ResolvedModel {
            adapters,
            ..build::tests::model()
        };
        let config = build::serving_config(&svc, &model);
        assert_eq!(
            config
                .adapters
                .iter()
                .map(|a| (a.name.as_str(), a.dir.as_str()))
                .collect::<Vec<_>>(),
            [
                ("chat-sql", "/adapters/0/exports/serve/tune/adapter"),
                ("chat-legal", "/adapters/1/legal/v2"),
                ("chat-math", "/adapters/1/math"),
                ("chat-hub", "/run/moe/adapter-3"),
            ]
        );
        assert_eq!(config.adapters[0].revision, "moetrainingjob/tune/0a1b2c3d");
        assert_eq!(config.adapters[3].revision, "huggingface/org/lora@v2");
        let template = build::pod_template(&svc, &BuildContext::default(), &model, None);
        let pod = template.spec.unwrap();
        let claims: Vec<(String, String, Option<bool>)> = pod
            .volumes
            .iter()
            .flatten()
            .filter(|v| v.name.starts_with("adapters-"))
            .map(|v| {
                let claim = v.persistent_volume_claim.as_ref().unwrap();
                (v.name.clone(), claim.claim_name.clone(), claim.read_only)
            })
            .collect();
        assert_eq!(
            claims,
            [
                ("adapters-0".into(), "models".into(), Some(true)),
                ("adapters-1".into(), "adapters".into(), Some(true)),
            ]
        );
        let mounts: Vec<(String, String, Option<bool>)> = pod.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .filter(|m| m.name.starts_with("adapters-"))
            .map(|m| (m.name.clone(), m.mount_path.clone(), m.read_only))
            .collect();
        assert_eq!(
            mounts,
            [
                ("adapters-0".into(), "/adapters/0".into(), Some(true)),
                ("adapters-1".into(), "/adapters/1".into(), Some(true)),
            ]
        );
        // The Hub adapter: its own init container fetches it into an
        // emptyDir with the token of its Secret, linked for the server,
        // which mounts both read-only and never sees the token.
        let init = pod.init_containers.as_ref().unwrap();
        assert_eq!(init.len(), 1);
        assert_eq!(init[0].name, "download-adapter-3");
        let command = init[0].command.as_ref().unwrap().join(" ");
        assert!(
            command.contains("fetch --repo-type adapter --repo org/lora --revision v2")
                && command.contains("--into /adapters/hub-3/huggingface")
                && command.contains("--link /run/moe/adapter-3"),
            "{command}"
        );
        let token = init[0].env.as_ref().unwrap()[0]
            .value_from
            .as_ref()
            .unwrap();
        assert_eq!(token.secret_key_ref.as_ref().unwrap().name, "hf");
        let volume = |name: &str| {
            pod.volumes
                .iter()
                .flatten()
                .find(|v| v.name == name)
                .cloned()
        };
        assert!(volume("adapter-download-3").unwrap().empty_dir.is_some());
        assert!(volume("pinned").is_some());
        let server = &pod.containers[0];
        let server_mounts: Vec<(&str, &str, Option<bool>)> = server
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.name.as_str(), m.mount_path.as_str(), m.read_only))
            .collect();
        for want in [
            ("adapter-download-3", "/adapters/hub-3", Some(true)),
            ("pinned", "/run/moe", Some(true)),
        ] {
            assert!(
                server_mounts.contains(&want),
                "{want:?} in {server_mounts:?}"
            );
        }
        assert!(server.env.iter().flatten().all(|e| e.name != "HF_TOKEN"));
        // With a cache claim, the download writes to the claim.
        let cached = service_fixture(json!({"spec": {"adapters": [{"name": "c",
            "huggingface": {"repo": "org/lora", "cacheClaimName": "hub-cache"}}]}}));
        let adapters = resolve(&cached, |_| None).unwrap();
        let claim = volumes(&adapters)[0]
            .persistent_volume_claim
            .clone()
            .unwrap();
        assert_eq!(
            (claim.claim_name.as_str(), claim.read_only),
            ("hub-cache", Some(false))
        );
        // Exported alone, the adapters are the export's top directory.
        let alone = tune(
            "Succeeded",
            Some("Exported"),
            json!({"spec": {"output": {"huggingface": {"adapterOnly": true}}}}),
        );
        assert_eq!(
            place(&resolved(Some(alone)).unwrap()[0]),
            ("models", "exports/serve/tune")
        );
    }

    #[test]
    fn a_job_not_done_waits_and_one_that_never_will_stalls_naming_why() {
        let waiting = |state: Result<Vec<ResolvedAdapter>, ModelState>| match state {
            Err(ModelState::Waiting { reason, message }) => (reason, message),
            other => panic!("not waiting: {other:?}"),
        };
        let broken = |state: Result<Vec<ResolvedAdapter>, ModelState>| match state {
            Err(ModelState::Broken { reason, message }) => (reason, message),
            other => panic!("not broken: {other:?}"),
        };
        let (why, _) = waiting(resolved(None));
        assert_eq!(why, reason::TRAINING_JOB_NOT_FOUND);
        let (why, _) = waiting(resolved(Some(tune("Running", None, json!({})))));
        assert_eq!(why, reason::WAITING_FOR_TRAINING_JOB);
        let (why, message) = waiting(resolved(Some(tune(
            "Succeeded",
            Some("Exporting"),
            json!({}),
        ))));
        assert_eq!(why, reason::WAITING_FOR_TRAINING_JOB);
        assert!(message.contains("exporting its adapters"), "{message}");

        let (why, _) = broken(resolved(Some(tune("Failed", None, json!({})))));
        assert_eq!(why, reason::TRAINING_JOB_FAILED);
        let failed = tune(
            "Succeeded",
            Some("Failed"),
            json!({"status": {"output": {"message": "disk full"}}}),
        );
        let (why, message) = broken(resolved(Some(failed)));
        assert_eq!(why, reason::ADAPTER_EXPORT_FAILED);
        assert!(
            message.contains("disk full") && message.contains("chat-sql"),
            "{message}"
        );
        let no_lora = tune(
            "Succeeded",
            Some("Exported"),
            json!({"spec": {"training": {"lora": null}}}),
        );
        let (why, message) = broken(resolved(Some(no_lora)));
        assert_eq!(why, reason::MODEL_INCOMPATIBLE);
        assert!(message.contains("spec.training.lora"), "{message}");
        let no_export = tune(
            "Succeeded",
            Some("Exported"),
            json!({"spec": {"output": null}}),
        );
        let (_, message) = broken(resolved(Some(no_export)));
        assert!(message.contains("spec.output.huggingface"), "{message}");

        // The model's own state comes first; a ready model waits for its adapters.
        let model = ModelState::Ready(Box::new(build::tests::model()));
        let waiting_model = ModelState::Waiting {
            reason: reason::WAITING_FOR_TRAINING_JOB,
            message: "the model's".into(),
        };
        assert_eq!(
            crate::inference::decide::with_adapters(waiting_model.clone(), resolved(None)),
            waiting_model
        );
        assert!(matches!(
            crate::inference::decide::with_adapters(model, resolved(None)),
            ModelState::Waiting {
                reason: reason::TRAINING_JOB_NOT_FOUND,
                ..
            }
        ));
    }
}
