//! `model.initFrom.fromTrainingJob`: the checkpoint of another job a job
//! starts from (a pretraining run's, before fine-tuning). Resolved once,
//! when that job has Succeeded, and pinned in `status.initCheckpoint` for
//! every attempt.

use kube::ResourceExt;
use moe_crds::{InitCheckpoint, MoETrainingJob};

use super::checkpoints;

/// Condition reasons of a job that cannot start yet, or from that job at all.
pub mod reason {
    pub use crate::training::checkpoints::reason::*;
    pub const MODEL_INCOMPATIBLE: &str = "ModelIncompatible";
    pub const CHECKPOINT_NOT_FOUND: &str = "CheckpointNotFound";
}

/// Where a job's `model.initFrom.fromTrainingJob` stands.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum InitSource {
    /// Nothing to resolve: no `fromTrainingJob`, or the status has it.
    #[default]
    Settled,
    /// The checkpoint to start from.
    Ready(InitCheckpoint),
    /// That job has not succeeded (yet), or does not exist (yet).
    Waiting {
        reason: &'static str,
        message: String,
    },
    /// That job cannot be started from as the spec stands.
    Unusable {
        reason: &'static str,
        message: String,
    },
}

/// Where `job`'s `fromTrainingJob` stands, given that job (`source`, from
/// the same namespace, if it exists).
pub fn resolve(job: &MoETrainingJob, source: Option<&MoETrainingJob>) -> InitSource {
    let Some(from) = job
        .spec
        .model
        .init_from
        .as_ref()
        .and_then(|i| i.from_training_job.as_ref())
    else {
        return InitSource::Settled;
    };
    if job
        .status
        .as_ref()
        .is_some_and(|s| s.init_checkpoint.is_some())
    {
        return InitSource::Settled;
    }
    let unusable = |reason, message| InitSource::Unusable { reason, message };
    if from.name == job.name_any() {
        return unusable(
            reason::MODEL_INCOMPATIBLE,
            "spec.model.initFrom.fromTrainingJob names this job itself".into(),
        );
    }
    let then = "this job starts from its model";
    let (source, claim_name) = match checkpoints::available(&from.name, source, then) {
        Ok(available) => available,
        Err(checkpoints::Unavailable::Waiting { reason, message }) => {
            return InitSource::Waiting { reason, message };
        }
        Err(checkpoints::Unavailable::Never { reason, message }) => {
            return InitSource::Unusable { reason, message };
        }
    };
    let differences = model_differences(source, job);
    if !differences.is_empty() {
        return unusable(
            reason::MODEL_INCOMPATIBLE,
            format!(
                "spec.model must be MoETrainingJob {}'s: {}",
                from.name,
                differences.join("; ")
            ),
        );
    }
    if source.spec.data.tokenizer != job.spec.data.tokenizer {
        return unusable(
            reason::MODEL_INCOMPATIBLE,
            format!(
                "spec.data.tokenizer is {:?}, but MoETrainingJob {} trained on tokens of {:?}",
                job.spec.data.tokenizer, from.name, source.spec.data.tokenizer
            ),
        );
    }
    let field = "spec.model.initFrom.fromTrainingJob.checkpoint";
    let step = match checkpoints::pick(source, from.checkpoint, field) {
        Ok(step) => step,
        Err(message) => return unusable(reason::CHECKPOINT_NOT_FOUND, message),
    };
    InitSource::Ready(InitCheckpoint {
        job: format!("{}/{}", source.namespace().unwrap_or_default(), from.name),
        uid: source.uid().unwrap_or_default(),
        step,
        claim_name,
        path: format!(
            "{}/{}",
            checkpoints::dir_in_claim(source),
            moe_crds::contract::checkpoint_dir_name(u64::try_from(step).unwrap_or(0))
        ),
    })
}

/// Every field where `job`'s model differs from `source`'s (`initFrom`
/// aside), as `model.hiddenSize is 64 there, 48 here`.
fn model_differences(source: &MoETrainingJob, job: &MoETrainingJob) -> Vec<String> {
    source
        .spec
        .model
        .differences(&job.spec.model, false)
        .into_iter()
        .map(|(path, there, here)| format!("{path} is {there} there, {here} here"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_crds::fixtures::{merge_patch, valid_training_job};
    use serde_json::{Value, json};

    fn job(name: &str, patch: Value) -> MoETrainingJob {
        let mut v = valid_training_job();
        merge_patch(
            &mut v,
            &json!({"metadata": {"name": name, "namespace": "ml", "uid": format!("uid-{name}")}}),
        );
        merge_patch(&mut v, &patch);
        serde_json::from_value(v).expect("a valid job")
    }

    fn tuning(patch: Value) -> MoETrainingJob {
        let mut j = job(
            "sft",
            json!({"spec": {"model": {"initFrom": {"fromTrainingJob": {"name": "pretrain"}}}}}),
        );
        let mut v = serde_json::to_value(&j).unwrap();
        merge_patch(&mut v, &patch);
        j = serde_json::from_value(v).unwrap();
        j
    }

    fn pretrain(phase: &str, patch: Value) -> MoETrainingJob {
        let mut j = job(
            "pretrain",
            json!({"spec": {"checkpoint": {"claimName": "ckpt", "path": "runs", "intervalSteps": 100, "keep": 2},
                            "training": {"steps": 1000}},
                   "status": {"phase": phase}}),
        );
        let mut v = serde_json::to_value(&j).unwrap();
        merge_patch(&mut v, &patch);
        j = serde_json::from_value(v).unwrap();
        j
    }

    #[test]
    fn a_succeeded_job_of_the_same_model_is_started_from_at_its_model() {
        let source = pretrain("Succeeded", json!({}));
        let steps = source.spec.training.steps;
        let InitSource::Ready(at) = resolve(&tuning(json!({})), Some(&source)) else {
            panic!("{:?}", resolve(&tuning(json!({})), Some(&source)))
        };
        assert_eq!(at.job, "ml/pretrain");
        assert_eq!(at.uid, "uid-pretrain");
        assert_eq!((at.step, at.claim_name.as_str()), (steps, "ckpt"));
        assert_eq!(
            at.path,
            format!("runs/ml/pretrain/checkpoints/step-{steps:08}")
        );
        // A pinned step it keeps; one it does not is refused with those it has.
        let pinned = tuning(
            json!({"spec": {"model": {"initFrom": {"fromTrainingJob": {"checkpoint": 900}}}}}),
        );
        assert!(matches!(resolve(&pinned, Some(&source)), InitSource::Ready(at) if at.step == 900));
        let gone = tuning(
            json!({"spec": {"model": {"initFrom": {"fromTrainingJob": {"checkpoint": 1}}}}}),
        );
        let InitSource::Unusable { reason, message } = resolve(&gone, Some(&source)) else {
            panic!()
        };
        assert_eq!(reason, reason::CHECKPOINT_NOT_FOUND);
        assert!(message.starts_with("spec.model.initFrom.fromTrainingJob.checkpoint (1) is not a checkpoint MoETrainingJob pretrain keeps"), "{message}");
        // Resolved once: the status pins it.
        let mut settled = tuning(json!({}));
        settled.status = Some(moe_crds::MoETrainingJobStatus {
            init_checkpoint: Some(at),
            ..Default::default()
        });
        assert_eq!(resolve(&settled, Some(&source)), InitSource::Settled);
        assert_eq!(resolve(&job("plain", json!({})), None), InitSource::Settled);
    }

    #[test]
    fn a_job_not_yet_succeeded_is_waited_for_and_one_unusable_says_why() {
        let sft = tuning(json!({}));
        let waiting = |source: Option<&MoETrainingJob>| match resolve(&sft, source) {
            InitSource::Waiting { reason, message } => (reason, message),
            other => panic!("{other:?}"),
        };
        assert_eq!(waiting(None).0, reason::TRAINING_JOB_NOT_FOUND);
        let (reason, message) = waiting(Some(&pretrain("Running", json!({}))));
        assert_eq!(reason, reason::WAITING_FOR_TRAINING_JOB);
        assert!(message.contains("pretrain is Running"), "{message}");
        let unusable =
            |source: &MoETrainingJob, job: &MoETrainingJob| match resolve(job, Some(source)) {
                InitSource::Unusable { reason, message } => (reason, message),
                other => panic!("{other:?}"),
            };
        assert_eq!(
            unusable(&pretrain("Failed", json!({})), &sft).0,
            reason::TRAINING_JOB_FAILED
        );
        let in_pods = pretrain(
            "Succeeded",
            json!({"spec": {"checkpoint": {"claimName": null}}}),
        );
        assert_eq!(unusable(&in_pods, &sft).0, reason::MODEL_NOT_PERSISTED);
        let wider = tuning(json!({"spec": {"model": {"hiddenSize": 96}}}));
        let (reason, message) = unusable(&pretrain("Succeeded", json!({})), &wider);
        assert_eq!(reason, reason::MODEL_INCOMPATIBLE);
        let hidden = pretrain("Succeeded", json!({})).spec.model.hidden_size;
        assert!(
            message.ends_with(&format!("model.hiddenSize is {hidden} there, 96 here")),
            "{message}"
        );
        let itself =
            tuning(json!({"spec": {"model": {"initFrom": {"fromTrainingJob": {"name": "sft"}}}}}));
        assert_eq!(
            unusable(&pretrain("Succeeded", json!({})), &itself).0,
            reason::MODEL_INCOMPATIBLE
        );
    }
}
