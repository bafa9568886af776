//! When to write a status that changed: at once when something a reader
//! acts on changed (phase, condition status or reason, attempt, restarts,
//! generation, times), but at most every [`REFRESH_INTERVAL`] when only the
//! running tallies moved (worker counts, progress, condition messages).
//!
//! A gang coming up changes its Job's counts pod by pod; writing each step
//! would cost a status write per pod per job (a write storm at scale, and
//! roughly half the operator's API writes on the way to Running). Coalescing
//! them keeps every transition immediate and the tallies at most a few
//! seconds behind.

use moe_crds::MoETrainingJobStatus;
use std::time::Duration;

/// Least time between two writes that only refresh tallies.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusWrite {
    /// Nothing changed.
    Unchanged,
    Now,
    /// Only tallies changed and the last write was recent: write after this long.
    After(Duration),
}

/// `since_last_write`: time since this process last wrote this object's
/// status (`None`: never, e.g. after a restart — then writing is the safe choice).
pub fn status_write(
    old: Option<&MoETrainingJobStatus>,
    new: &MoETrainingJobStatus,
    since_last_write: Option<Duration>,
) -> StatusWrite {
    let Some(old) = old else {
        return StatusWrite::Now;
    };
    if old == new {
        return StatusWrite::Unchanged;
    }
    if without_tallies(old) != without_tallies(new) {
        return StatusWrite::Now;
    }
    match since_last_write {
        Some(elapsed) if elapsed < REFRESH_INTERVAL => {
            StatusWrite::After(REFRESH_INTERVAL - elapsed)
        }
        _ => StatusWrite::Now,
    }
}

/// The status with the fields that merely count or narrate cleared.
fn without_tallies(status: &MoETrainingJobStatus) -> MoETrainingJobStatus {
    let mut s = status.clone();
    s.workers.active = 0;
    s.workers.ready = 0;
    s.workers.succeeded = 0;
    s.workers.failed = 0;
    s.progress = None;
    for c in &mut s.conditions {
        c.message.clear();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use moe_crds::{TrainingPhase, WorkerCounts};

    fn status(
        phase: TrainingPhase,
        reason: &str,
        ready: i32,
        message: &str,
    ) -> MoETrainingJobStatus {
        MoETrainingJobStatus {
            observed_generation: Some(1),
            phase: Some(phase),
            attempt: 1,
            workers: WorkerCounts {
                expected: 4,
                active: 4,
                ready,
                ..Default::default()
            },
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "False".into(),
                reason: reason.into(),
                message: message.into(),
                observed_generation: Some(1),
                last_transition_time: Time(Default::default()),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn tallies_alone_wait_for_the_refresh_interval() {
        let old = status(TrainingPhase::Pending, "WorkersStarting", 1, "1/4 ready");
        let new = status(TrainingPhase::Pending, "WorkersStarting", 2, "2/4 ready");
        let two = Duration::from_secs(2);
        assert_eq!(
            status_write(Some(&old), &new, Some(two)),
            StatusWrite::After(REFRESH_INTERVAL - two)
        );
        assert_eq!(
            status_write(Some(&old), &new, Some(REFRESH_INTERVAL)),
            StatusWrite::Now
        );
        // Never written by this process (a restart): write.
        assert_eq!(status_write(Some(&old), &new, None), StatusWrite::Now);
    }

    #[test]
    fn transitions_are_written_at_once() {
        let old = status(TrainingPhase::Pending, "WorkersStarting", 3, "3/4 ready");
        let running = status(
            TrainingPhase::Running,
            "AllWorkersRunning",
            4,
            "all running",
        );
        let recently = Some(Duration::from_millis(10));
        assert_eq!(
            status_write(Some(&old), &running, recently),
            StatusWrite::Now
        );
        let reason = status(
            TrainingPhase::Pending,
            "WaitingForAdmission",
            3,
            "3/4 ready",
        );
        assert_eq!(
            status_write(Some(&old), &reason, recently),
            StatusWrite::Now
        );
        let mut restarted = old.clone();
        restarted.restarts = 1;
        assert_eq!(
            status_write(Some(&old), &restarted, recently),
            StatusWrite::Now
        );
        assert_eq!(status_write(None, &old, recently), StatusWrite::Now);
    }

    #[test]
    fn an_unchanged_status_is_not_written() {
        let old = status(
            TrainingPhase::Running,
            "AllWorkersRunning",
            4,
            "all running",
        );
        assert_eq!(
            status_write(Some(&old), &old.clone(), None),
            StatusWrite::Unchanged
        );
    }
}
