//! `spec.adapters`: where each LoRA adapter's PEFT directory is, resolved
//! from its source (pure), and how the server pods mount them: one
//! read-only volume per claim, at `/adapters/<k>`, the adapter's directory
//! inside it written into the server's config.

use std::sync::Arc;

use moe_crds::{AdapterVolume, MoEInferenceService, MoETrainingJob, OutputPhase, ServedAdapter};

use super::decide::{ModelState, reason};
use crate::training::checkpoints::{self, Unavailable};

/// Where the claims holding adapters are mounted, one directory each.
pub const ADAPTER_MOUNT: &str = "/adapters";
/// Under a training job's export, the directory its adapters are in
/// (unless it exported them alone: then at the top).
const EXPORT_ADAPTER_DIR: &str = "adapter";

/// An adapter's PEFT directory on a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedAdapter {
    /// The model id requests name it by.
    pub name: String,
    pub claim_name: String,
    /// The directory inside the claim.
    pub path: String,
    /// What it is, for `status.modelRevision` (a new one rolls the pods).
    pub revision: String,
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
        .map(|adapter| resolve_one(adapter, svc.spec.parallelism.expert_parallel, &job))
        .collect()
}

/// `adapter` for a replica of `expert_parallel` ranks.
fn resolve_one(
    adapter: &ServedAdapter,
    expert_parallel: i32,
    job: &impl Fn(&str) -> Option<Arc<MoETrainingJob>>,
) -> Result<ResolvedAdapter, ModelState> {
    let name = adapter.name.clone();
    if let Some(volume) = &adapter.volume {
        return Ok(on_volume(name, volume));
    }
    let Some(from) = &adapter.from_training_job else {
        return Err(ModelState::Broken {
            reason: reason::INVALID_SPEC,
            message: format!(
                "spec.adapters[{name}] needs exactly one source: fromTrainingJob or volume"
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
    let Some(lora) = &job.spec.training.lora else {
        return Err(incompatible(
            "trained no adapters (spec.training.lora unset): serve its model instead",
        ));
    };
    // The server would refuse them at the join (rows cross ranks to their
    // experts without their adapters): said here, before any pod starts.
    if lora.routed_experts && expert_parallel > 1 {
        return Err(incompatible(
            "trained adapters of the routed experts (spec.training.lora.routedExperts), which an \
             expert-parallel replica does not serve yet: serve them with \
             parallelism.expertParallel 1, or serve the job's merged model",
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
        claim_name: output.claim_name.clone(),
        path,
        name,
    })
}

fn on_volume(name: String, volume: &AdapterVolume) -> ResolvedAdapter {
    let path = volume.path.trim_matches('/').to_owned();
    ResolvedAdapter {
        revision: format!("pvc/{}/{path}", volume.claim_name),
        claim_name: volume.claim_name.clone(),
        path,
        name,
    }
}

/// The adapters as `moectl render` shows them without a cluster: a
/// training job's export on a claim named `<job>-export`.
pub fn as_rendered(svc: &MoEInferenceService) -> Vec<ResolvedAdapter> {
    svc.spec
        .adapters
        .iter()
        .map(|a| match (&a.volume, &a.from_training_job) {
            (Some(volume), _) => on_volume(a.name.clone(), volume),
            (None, job) => {
                let job = job.as_ref().map_or("unknown", |j| j.name.as_str());
                ResolvedAdapter {
                    name: a.name.clone(),
                    claim_name: format!("{job}-export"),
                    path: EXPORT_ADAPTER_DIR.into(),
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
        if !claims.contains(&adapter.claim_name.as_str()) {
            claims.push(&adapter.claim_name);
        }
    }
    claims
}

/// The volume of claim `k`.
pub fn volume_name(k: usize) -> String {
    format!("adapters-{k}")
}

/// Where claim `k` is mounted.
pub fn mount_path(k: usize) -> String {
    format!("{ADAPTER_MOUNT}/{k}")
}

/// Each adapter's name and directory as the server sees them.
pub fn dirs(adapters: &[ResolvedAdapter]) -> Vec<(String, String)> {
    let claims = claims(adapters);
    adapters
        .iter()
        .map(|a| {
            let k = claims
                .iter()
                .position(|c| *c == a.claim_name)
                .expect("every adapter's claim is listed");
            let dir = match a.path.as_str() {
                "" => mount_path(k),
                path => format!("{}/{path}", mount_path(k)),
            };
            (a.name.clone(), dir)
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
                .map(|a| (a.name.as_str(), a.claim_name.as_str(), a.path.as_str()))
                .collect::<Vec<_>>(),
            [
                ("chat-sql", "models", "exports/serve/tune/adapter"),
                ("chat-legal", "adapters", "legal/v2"),
                ("chat-math", "adapters", "math"),
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
            ]
        );
        assert_eq!(config.adapters[0].revision, "moetrainingjob/tune/0a1b2c3d");
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
        // Exported alone, the adapters are the export's top directory.
        let alone = tune(
            "Succeeded",
            Some("Exported"),
            json!({"spec": {"output": {"huggingface": {"adapterOnly": true}}}}),
        );
        assert_eq!(resolved(Some(alone)).unwrap()[0].path, "exports/serve/tune");
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
        // Routed experts' adapters: one process serves them, a replica of
        // several ranks does not.
        let routed = tune(
            "Succeeded",
            Some("Exported"),
            json!({"spec": {"training": {"lora": {"routedExperts": true}}}}),
        );
        assert!(resolved(Some(routed.clone())).is_ok());
        let mut replica = service();
        replica.spec.parallelism.expert_parallel = 2;
        let (why, message) = broken(resolve(&replica, |_| Some(routed.clone())));
        assert_eq!(why, reason::MODEL_INCOMPATIBLE);
        assert!(message.contains("routedExperts"), "{message}");

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
