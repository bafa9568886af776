//! A succeeded MoETrainingJob's checkpoints as other objects refer to them
//! (`model.fromTrainingJob` of a service, `model.initFrom.fromTrainingJob`
//! of another job): where they are on its claim, which steps it keeps, and
//! which one is its model.

use kube::ResourceExt;
use moe_crds::{MoETrainingJob, TrainingPhase};

use super::build;

/// Condition reasons of an object whose model is another job's, while that
/// job's model is not there, or never will be.
pub mod reason {
    pub const WAITING_FOR_TRAINING_JOB: &str = "WaitingForTrainingJob";
    pub const TRAINING_JOB_NOT_FOUND: &str = "TrainingJobNotFound";
    pub const TRAINING_JOB_FAILED: &str = "TrainingJobFailed";
    pub const MODEL_NOT_PERSISTED: &str = "ModelNotPersisted";
}

/// Why a job's model cannot be taken (yet).
#[derive(Clone, Debug, PartialEq)]
pub enum Unavailable {
    /// Not yet: the job does not exist yet, or has not succeeded.
    Waiting {
        reason: &'static str,
        message: String,
    },
    /// Not as the spec stands: the job failed, or kept no checkpoints.
    Never {
        reason: &'static str,
        message: String,
    },
}

/// The job named `name` (`job`, if it exists) once its model can be taken,
/// with the claim holding its checkpoints; else why not. `then` says what
/// waits for it (`serving starts`).
pub fn available<'a>(
    name: &str,
    job: Option<&'a MoETrainingJob>,
    then: &str,
) -> Result<(&'a MoETrainingJob, String), Unavailable> {
    let Some(job) = job else {
        return Err(Unavailable::Waiting {
            reason: reason::TRAINING_JOB_NOT_FOUND,
            message: format!("MoETrainingJob {name} does not exist (yet) in this namespace"),
        });
    };
    match job.status.as_ref().and_then(|s| s.phase) {
        Some(TrainingPhase::Succeeded) => {}
        Some(TrainingPhase::Failed) => {
            return Err(Unavailable::Never {
                reason: reason::TRAINING_JOB_FAILED,
                message: format!("MoETrainingJob {name} failed: it has no final checkpoint"),
            });
        }
        other => {
            let phase = other.map_or("Pending".to_string(), |p| format!("{p:?}"));
            return Err(Unavailable::Waiting {
                reason: reason::WAITING_FOR_TRAINING_JOB,
                message: format!("MoETrainingJob {name} is {phase}; {then} when it has Succeeded"),
            });
        }
    }
    match job.spec.checkpoint.claim_name.clone() {
        Some(claim) => Ok((job, claim)),
        None => Err(Unavailable::Never {
            reason: reason::MODEL_NOT_PERSISTED,
            message: format!(
                "MoETrainingJob {name} keeps its checkpoints in an emptyDir (spec.checkpoint.claimName unset): nothing of it survives"
            ),
        }),
    }
}

/// Where the job's checkpoints are inside its checkpoint claim: it writes
/// under `<mount>/<path>/<namespace>/<name>/checkpoints`.
pub fn dir_in_claim(job: &MoETrainingJob) -> String {
    let dir = build::worker_config(job).checkpoint.dir;
    dir.strip_prefix(build::STATE_MOUNT)
        .unwrap_or(&dir)
        .trim_matches('/')
        .to_string()
}

/// The step `requested` (named by `field`) if the job keeps it, else the
/// job's model ([`model_checkpoint`]); `Err` says which steps it keeps. The
/// step is pinned by whoever asks: "the newest in the directory" would
/// change under them if the directory changed.
pub fn pick(job: &MoETrainingJob, requested: Option<i64>, field: &str) -> Result<i64, String> {
    let Some(step) = requested else {
        return Ok(model_checkpoint(job));
    };
    let kept = kept_checkpoints(job);
    if kept.contains(&step) {
        return Ok(step);
    }
    Err(format!(
        "{field} ({step}) is not a checkpoint MoETrainingJob {} keeps: it has steps {} (every checkpoint.intervalSteps ({}) and the final step, the newest checkpoint.keep ({}))",
        job.name_any(),
        kept.iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        job.spec.checkpoint.interval_steps,
        job.spec.checkpoint.keep
    ))
}

/// The step of a succeeded job's final checkpoint: as rank 0 last reported
/// it (earlier than `training.steps` when `training.evaluation.patience`
/// stopped it), else its last step.
fn final_checkpoint(job: &MoETrainingJob) -> i64 {
    job.status
        .as_ref()
        .and_then(|s| s.progress.as_ref())
        .and_then(|p| p.last_checkpoint_step)
        .unwrap_or(job.spec.training.steps)
}

/// The job's model: its best checkpoint with `training.evaluation.keepBest`,
/// else its final one (what a service serves and a job starts from unless
/// they pin a step).
pub fn model_checkpoint(job: &MoETrainingJob) -> i64 {
    build::best_checkpoint(job).unwrap_or_else(|| final_checkpoint(job))
}

/// The checkpoint steps a finished job leaves on its claim, oldest first: the
/// worker saves every `checkpoint.intervalSteps` and at the final step, and
/// keeps the newest `checkpoint.keep` (and its best, with
/// `training.evaluation.keepBest`).
pub fn kept_checkpoints(job: &MoETrainingJob) -> Vec<i64> {
    let last = final_checkpoint(job).clamp(0, job.spec.training.steps.max(0));
    let interval = job.spec.checkpoint.interval_steps.max(1);
    let mut saved: Vec<i64> = (1..=last / interval).map(|k| k * interval).collect();
    if saved.last() != Some(&last) && last > 0 {
        saved.push(last);
    }
    let keep = usize::try_from(job.spec.checkpoint.keep.max(1)).unwrap_or(1);
    let mut kept = saved.split_off(saved.len().saturating_sub(keep));
    // The best is kept besides the newest (it may also be a step saved as
    // the run stopped, off the interval).
    if let Some(best) = build::best_checkpoint(job)
        && !kept.contains(&best)
    {
        kept.push(best);
        kept.sort_unstable();
    }
    kept
}
