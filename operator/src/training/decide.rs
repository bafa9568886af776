//! Pure decision logic (no client): from what is observed about a
//! MoETrainingJob and its attempt Jobs, decide what to create or delete,
//! the new status, and which transitions deserve an Event.
//!
//! All state needed to decide lives in the API: the attempt number is in the
//! child Job's name and labels, the restart counters in its annotations. So an
//! operator restarted at any point makes the same decision again, and never
//! creates a duplicate attempt.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use moe_crds::condition::{READY, RECONCILING, STALLED};
use moe_crds::{
    FailureAction, MoETrainingJob, MoETrainingJobStatus, OutputPhase, OutputStatus, TrainingPhase,
    TrainingProgress, WorkerCounts,
};

use super::build::Counters;
pub use super::build::NewAttempt;
use super::init_source::InitSource;
pub use crate::gang::Unplaced;
// The condition upsert is shared with the serving controller.
use crate::reconcile::set_condition as set;

/// What is known about one attempt Job.
#[derive(Clone, Debug, PartialEq)]
pub struct AttemptState {
    pub attempt: i32,
    pub name: String,
    /// Counters the attempt was started with.
    pub counters: Counters,
    pub being_deleted: bool,
    pub outcome: AttemptOutcome,
    /// The attempt's gang size: `parallelism.nodes`, or fewer once an
    /// elastic job shrank it.
    pub nodes: i32,
    /// When its Job was created.
    pub created: Option<Timestamp>,
    /// When its Job failed (its `FailureTarget` or `Failed` condition, the
    /// earlier), once it has.
    pub failed_at: Option<Timestamp>,
    /// Why the attempt's gang is not placed, while it is not: the
    /// scheduler's words (its PodGroup's condition under the Workload API,
    /// else its pods'), or Kueue not admitting it.
    pub unplaced: Option<Unplaced>,
    /// Worker pods whose init container is downloading `data.huggingface`
    /// (read while the attempt runs with pods not ready).
    pub downloading: i32,
    /// The distinct commits the attempt's pods downloaded `data.huggingface`
    /// as, once every pod has reported one (listed until then).
    pub data_commits: Option<Vec<String>>,
    pub active: i32,
    pub ready: i32,
    pub succeeded: i32,
    pub failed: i32,
}

/// Where an attempt Job stands.
#[derive(Clone, Debug, PartialEq)]
pub enum AttemptOutcome {
    /// Created suspended, waiting for Kueue to admit it.
    Queued,
    Running,
    Complete,
    /// The Job failed; `cause` says why, from its pods.
    Failed {
        cause: FailureCause,
    },
}

/// Why an attempt failed, as read from its pods.
#[derive(Clone, Debug, PartialEq)]
pub enum FailureCause {
    /// A pod was disrupted (preemption, eviction, node loss): not the job's fault.
    Disruption { pod: String, reason: String },
    /// A worker container exited non-zero; `message` is the last line of
    /// its termination message (the error the worker exited on), if any.
    ExitCode {
        pod: String,
        code: i32,
        message: Option<String>,
        /// The container was a download (an init container), not the worker.
        download: bool,
    },
    /// The Job failed without a failed pod to explain it (e.g. a pod deleted by hand).
    Unknown { message: String },
}

/// Everything the decision needs besides the resource itself.
#[derive(Clone, Debug)]
pub struct Observed {
    pub attempts: Vec<AttemptState>,
    pub now: Timestamp,
    /// An error that makes the spec unrunnable although the apiserver accepted it.
    pub invalid: Option<String>,
    /// Training progress just read from rank 0, if it answered.
    pub progress: Option<TrainingProgress>,
    /// The job's spare Jobs (an elastic job's smaller attempts ask for room).
    pub spares: Vec<SpareState>,
    /// Whether spare pods that run show that the whole gang would be
    /// placed ([`crate::gang::spares_show_room`]): then a smaller attempt
    /// asks for them, and grows once they run.
    pub spares_show_room: bool,
    /// The export Job (`output.huggingface`), if there is one.
    pub export: Option<ExportState>,
    /// Where `model.initFrom.fromTrainingJob` stands.
    pub init_source: InitSource,
}

/// Where the export Job of a succeeded job stands.
#[derive(Clone, Debug, PartialEq)]
pub enum ExportState {
    Running,
    Complete,
    /// Its pod failed; the last line of its termination message, if any.
    Failed {
        message: Option<String>,
    },
}

/// A spare Job: pods holding room for the nodes a smaller attempt lacks.
#[derive(Clone, Debug, PartialEq)]
pub struct SpareState {
    pub name: String,
    /// The attempt it asks room for.
    pub attempt: i32,
    /// Its pods running (so bound, their image pulled).
    pub ready: i32,
    pub being_deleted: bool,
}

/// Spare pods a smaller attempt asks for (its spare Job).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpareRequest {
    pub attempt: i32,
    pub count: i32,
}

/// A transition worth a Kubernetes Event.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    pub warning: bool,
    pub reason: String,
    pub message: String,
}

/// The outcome of one reconcile decision.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Attempt Job to create.
    pub create: Option<NewAttempt>,
    /// Attempt Jobs (and spare Jobs) to delete (names).
    pub delete: Vec<String>,
    /// The spare Job to have (created if missing); any other is deleted.
    pub spares: Option<SpareRequest>,
    /// Have the export Job (created if missing).
    pub export: bool,
    /// Delete the MoETrainingJob itself (TTL after finishing).
    pub delete_self: bool,
    pub status: MoETrainingJobStatus,
    pub transitions: Vec<Transition>,
    /// Look again after this long even if nothing changes (deadline, TTL, pending work).
    pub requeue_after: Option<Duration>,
}

impl Plan {
    /// Look again within `after` (sooner if something else wants sooner).
    /// Whether `elapsed` seconds fall short of `wait`; if so, look again
    /// when they will not.
    fn still_waiting(&mut self, elapsed: f64, wait: f64) -> bool {
        let left = wait - elapsed;
        if left > 0.0 {
            self.look_again_within(Duration::from_secs_f64(left.max(1.0)));
        }
        left > 0.0
    }

    fn look_again_within(&mut self, after: Duration) {
        self.requeue_after = Some(self.requeue_after.map_or(after, |d| d.min(after)));
    }
}

/// How often a job waiting for the job it starts from looks at it again
/// (a pretraining run takes hours; this costs no API call: the job is read
/// from the operator's cache).
pub const INIT_SOURCE_POLL: Duration = Duration::from_secs(30);

/// Decide the next step for `job` given what was `observed`.
pub fn decide(job: &MoETrainingJob, observed: &Observed) -> Plan {
    let mut plan = decide_attempts(job, observed);
    // Spare Jobs the plan does not keep go: their attempt ended, grew, or
    // is the whole gang again.
    for spare in &observed.spares {
        let wanted = plan.spares.is_some_and(|r| r.attempt == spare.attempt);
        if !wanted && !spare.being_deleted {
            plan.delete.push(spare.name.clone());
        }
    }
    plan
}

fn decide_attempts(job: &MoETrainingJob, observed: &Observed) -> Plan {
    let old = job.status.clone().unwrap_or_default();
    let mut plan = Plan {
        create: None,
        delete: vec![],
        spares: None,
        export: false,
        delete_self: false,
        status: MoETrainingJobStatus {
            observed_generation: job.metadata.generation,
            ..old.clone()
        },
        transitions: vec![],
        requeue_after: None,
    };
    let spec = &job.spec;
    let now = Time(observed.now);

    // The newest attempt that is not already going away is the current one;
    // older ones are leftovers of a restart and are deleted.
    let current = observed
        .attempts
        .iter()
        .filter(|a| !a.being_deleted)
        .max_by_key(|a| a.attempt);
    let newest_attempt = observed.attempts.iter().map(|a| a.attempt).max();
    for a in &observed.attempts {
        if !a.being_deleted && Some(a.attempt) != current.map(|c| c.attempt) {
            plan.delete.push(a.name.clone());
        }
    }
    let counters = current.map(|c| c.counters).unwrap_or(Counters {
        restarts: old.restarts,
        disruptions: old.disruptions,
    });
    plan.status.restarts = counters.restarts;
    plan.status.disruptions = counters.disruptions;
    plan.status.workers.expected = spec.parallelism.nodes;

    if let Some(message) = &observed.invalid {
        // Stalled, not Failed: fixing the spec (a new generation) lets it run.
        plan.delete.extend(current.map(|c| c.name.clone()));
        let phase = old
            .phase
            .filter(|p| !p.is_finished())
            .unwrap_or(TrainingPhase::Pending);
        stall(&mut plan, &old, phase, "InvalidSpec", message, &now);
        return plan;
    }

    if old.phase.is_some_and(TrainingPhase::is_finished) {
        return finished(
            job,
            &old,
            current,
            observed.export.as_ref(),
            plan,
            observed.now,
        );
    }

    if spec.run_policy.suspend {
        plan.delete.extend(current.map(|c| c.name.clone()));
        plan.status.workers = WorkerCounts {
            expected: spec.parallelism.nodes,
            ..Default::default()
        };
        // The deadline clock stops while suspended and restarts on resume.
        plan.status.start_time = None;
        set_phase(
            &mut plan,
            &old,
            TrainingPhase::Suspended,
            "Suspended",
            "suspended: no worker pods run",
            &now,
        );
        return plan;
    }

    // model.initFrom.fromTrainingJob: no attempt until the checkpoint it
    // starts from is known, then pinned in the status for every attempt.
    match &observed.init_source {
        InitSource::Settled => {}
        InitSource::Ready(at) => {
            plan.status.init_checkpoint = Some(at.clone());
            let message = format!(
                "starting from step {} of MoETrainingJob {}",
                at.step, at.job
            );
            set_phase(
                &mut plan,
                &old,
                TrainingPhase::Pending,
                "InitCheckpointResolved",
                &message,
                &now,
            );
            // This reconcile's ConfigMap was rendered without it: the next
            // one renders it with it and starts the attempt.
            plan.look_again_within(Duration::from_secs(1));
            return plan;
        }
        InitSource::Waiting { reason, message } => {
            set_phase(
                &mut plan,
                &old,
                TrainingPhase::Pending,
                reason,
                message,
                &now,
            );
            plan.look_again_within(INIT_SOURCE_POLL);
            return plan;
        }
        InitSource::Unusable { reason, message } => {
            // Stalled, not Failed: pointing the spec elsewhere lets it run.
            stall(
                &mut plan,
                &old,
                TrainingPhase::Pending,
                reason,
                message,
                &now,
            );
            plan.look_again_within(INIT_SOURCE_POLL);
            return plan;
        }
    }

    // Deadline, measured from the start of the current (unsuspended) run.
    let start = old.start_time.clone().unwrap_or_else(|| now.clone());
    plan.status.start_time = Some(start.clone());
    if let Some(limit) = spec.run_policy.active_deadline_seconds {
        let elapsed = observed.now.duration_since(start.0).as_secs_f64();
        if elapsed >= limit as f64 {
            let msg = format!("ran longer than runPolicy.activeDeadlineSeconds ({limit}s)");
            fail(&mut plan, &old, "DeadlineExceeded", &msg, &now);
            return plan;
        }
        plan.requeue_after =
            Some(Duration::from_secs_f64(limit as f64 - elapsed).max(Duration::from_secs(1)));
    }

    let Some(cur) = current else {
        // No attempt in the store: start one. A fresh job starts at 0, a
        // resumed one at the next number. Otherwise the status names the
        // attempt this run already started: an earlier reconcile created its
        // Job and the store has not seen it yet (a resume, then the status
        // update's own reconcile arriving first), so the same number again
        // (its create answers 409) rather than a second attempt beside it.
        let attempt = match (newest_attempt, old.phase) {
            (Some(n), _) => n + 1,
            (None, None) => 0,
            (None, Some(TrainingPhase::Suspended)) => old.attempt + 1,
            (None, Some(_)) => old.attempt,
        };
        plan.create = Some(NewAttempt {
            attempt,
            counters,
            nodes: spec.parallelism.nodes,
        });
        plan.status.attempt = attempt;
        plan.status.data_commits = Vec::new();
        plan.status.workers = WorkerCounts {
            expected: spec.parallelism.nodes,
            ..Default::default()
        };
        if old.phase == Some(TrainingPhase::Suspended) {
            plan.transitions.push(info(
                "Resumed",
                format!("resumed: starting attempt {attempt}"),
            ));
        }
        let msg = format!(
            "attempt {attempt}: creating {} worker pod(s)",
            spec.parallelism.nodes
        );
        set_phase(
            &mut plan,
            &old,
            TrainingPhase::Pending,
            "AttemptCreated",
            &msg,
            &now,
        );
        return plan;
    };

    // What the current attempt's downloads resolved (kept once known).
    plan.status.data_commits = match &cur.data_commits {
        Some(commits) => commits.clone(),
        None if old.attempt == cur.attempt => old.data_commits.clone(),
        None => Vec::new(),
    };
    plan.status.attempt = cur.attempt;
    plan.status.workers = WorkerCounts {
        expected: cur.nodes,
        active: cur.active,
        ready: cur.ready,
        succeeded: cur.succeeded,
        failed: cur.failed,
    };
    if shrink(job, &old, cur, observed.now, &mut plan) {
        return plan;
    }
    match &cur.outcome {
        AttemptOutcome::Queued => {
            // Kueue suspends a running attempt's Job to preempt (or evict)
            // it: the same attempt waits to be admitted again. Not a failure,
            // so nothing is counted; the reason says what happened, and
            // stays until the gang runs again.
            let ran = old.attempt == cur.attempt
                && (old.phase == Some(TrainingPhase::Running)
                    || reconciling_reason(&old) == Some(PREEMPTED));
            let (reason, msg) = if ran {
                (
                    PREEMPTED,
                    format!(
                        "attempt {}: Kueue suspended the running gang (preempted or evicted); waiting to be admitted again",
                        cur.attempt
                    ),
                )
            } else {
                (
                    "WaitingForAdmission",
                    format!(
                        "attempt {}: waiting for Kueue to admit the gang",
                        cur.attempt
                    ),
                )
            };
            set_phase(&mut plan, &old, TrainingPhase::Pending, reason, &msg, &now);
        }
        AttemptOutcome::Running => {
            let all_up = cur.ready + cur.succeeded >= cur.nodes;
            if let Some(p) = &observed.progress {
                // The report's time alone changing is no reason to write the status.
                let same = old.progress.as_ref().is_some_and(|o| {
                    TrainingProgress {
                        update_time: o.update_time.clone(),
                        ..p.clone()
                    } == *o
                });
                if !same {
                    plan.status.progress = Some(p.clone());
                }
            }
            if all_up {
                if let Some(limit) = spec.run_policy.progress_deadline_seconds {
                    let (since, step) = progress_clock(&old, &plan.status, cur.attempt, &now);
                    let quiet = observed.now.duration_since(since.0).as_secs_f64();
                    // A gang past its last step (by this attempt's own
                    // report) is finishing: the final checkpoint, pods
                    // completing. No step will come, and none is missing.
                    let total = plan.status.progress.as_ref().map_or(0, |p| p.total_steps);
                    let finishing =
                        cur.succeeded > 0 || step.is_some_and(|s| total > 0 && s >= total);
                    // A report that shows no new step is the verdict; no
                    // answer at all (a poll that timed out on a loaded node)
                    // gets one more poll first.
                    let deadline = if observed.progress.is_some() {
                        limit as f64
                    } else {
                        limit as f64 + super::progress::POLL_INTERVAL.as_secs_f64()
                    };
                    if quiet >= deadline && !finishing {
                        let last = step.map_or("no report from this attempt".into(), |s| {
                            format!("last at step {s}")
                        });
                        let why = format!(
                            "rank 0 reported no progress for {}s ({last}), past runPolicy.progressDeadlineSeconds ({limit}s): hung",
                            quiet.round()
                        );
                        restart(
                            job,
                            &old,
                            cur,
                            (FailureAction::Count, why),
                            PROGRESS_DEADLINE,
                            &mut plan,
                            &now,
                        );
                        return plan;
                    }
                    if !finishing {
                        let left = Duration::from_secs_f64((deadline - quiet).max(1.0));
                        plan.look_again_within(left);
                    }
                }
                // Poll rank 0 for progress while the gang runs.
                plan.look_again_within(super::progress::POLL_INTERVAL);
                if grow(job, &old, cur, observed, &mut plan, &now) {
                    return plan;
                }
                let msg = format!(
                    "attempt {}: all {} worker pod(s) running",
                    cur.attempt, cur.nodes
                );
                set_phase(
                    &mut plan,
                    &old,
                    TrainingPhase::Running,
                    "AllWorkersRunning",
                    &msg,
                    &now,
                );
            } else if let Some(unplaced) = &cur.unplaced {
                let msg = format!("attempt {}: {}", cur.attempt, unplaced_words(cur, unplaced));
                set_phase(
                    &mut plan,
                    &old,
                    TrainingPhase::Pending,
                    UNSCHEDULABLE,
                    &msg,
                    &now,
                );
                // A warning event when it starts (set_phase records one only
                // when the phase changes).
                if reconciling_reason(&old) != Some(UNSCHEDULABLE) {
                    match plan.transitions.last_mut() {
                        Some(t) if t.reason == UNSCHEDULABLE => t.warning = true,
                        _ => plan.transitions.push(warning(UNSCHEDULABLE, msg)),
                    }
                }
                // Pods are not watched: one being bound changes nothing the
                // operator watches until it is ready.
                plan.look_again_within(POD_POLL);
            } else {
                let (attempt, ready, nodes) = (cur.attempt, cur.ready + cur.succeeded, cur.nodes);
                let (reason, msg) = if cur.downloading > 0 {
                    (
                        DOWNLOADING_DATA,
                        format!(
                            "attempt {attempt}: {} download(s) from the Hub running, \
                             {ready}/{nodes} ready",
                            cur.downloading
                        ),
                    )
                } else {
                    (
                        "WorkersStarting",
                        format!("attempt {attempt}: {ready}/{nodes} worker pod(s) ready"),
                    )
                };
                set_phase(&mut plan, &old, TrainingPhase::Pending, reason, &msg, &now);
                // Pods are not watched: a download starting or ending changes
                // nothing the operator watches, so it looks again meanwhile.
                if cur.downloading > 0 || super::build::downloads(job) {
                    plan.look_again_within(POD_POLL);
                }
            }
        }
        AttemptOutcome::Complete => {
            plan.status.completion_time = Some(now.clone());
            // Rank 0's last report: the final step and checkpoint, which the
            // polls while it ran may have missed.
            if let Some(p) = &observed.progress {
                plan.status.progress = Some(p.clone());
            }
            let mut msg = match plan.status.progress.as_ref().filter(|p| p.stopped_early) {
                Some(p) => format!(
                    "training stopped early at step {} of {} in attempt {}: the held-out loss stopped improving (training.evaluation.patience)",
                    p.step, p.total_steps, cur.attempt
                ),
                None => format!("training finished in attempt {}", cur.attempt),
            };
            let keeps_best = spec
                .training
                .evaluation
                .as_ref()
                .is_some_and(|e| e.keep_best);
            let best = plan
                .status
                .progress
                .as_ref()
                .and_then(|p| p.best_checkpoint_step);
            if let (true, Some(best)) = (keeps_best, best) {
                msg.push_str(&format!(
                    "; its model is step {best}'s checkpoint, of the lowest held-out loss (training.evaluation.keepBest)"
                ));
            }
            set_phase(
                &mut plan,
                &old,
                TrainingPhase::Succeeded,
                "Succeeded",
                &msg,
                &now,
            );
            if let Some(ttl) = spec.run_policy.ttl_seconds_after_finished {
                plan.requeue_after = Some(Duration::from_secs(ttl.max(0) as u64));
            } else {
                plan.requeue_after = None;
            }
        }
        AttemptOutcome::Failed { cause } => restart_or_fail(job, &old, cur, cause, &mut plan, &now),
    }
    plan
}

/// Apply the failure policy to a failed attempt: restart the gang (counted
/// or not) or fail the job.
fn restart_or_fail(
    job: &MoETrainingJob,
    old: &MoETrainingJobStatus,
    cur: &AttemptState,
    cause: &FailureCause,
    plan: &mut Plan,
    now: &Time,
) {
    let policy = &job.spec.run_policy;
    let verdict = match cause {
        FailureCause::Disruption { pod, reason } => (
            FailureAction::Ignore,
            format!("pod {pod} was disrupted ({reason})"),
        ),
        FailureCause::ExitCode {
            pod,
            code,
            message,
            download,
        } => {
            let rule = policy
                .failure_rules
                .iter()
                .find(|r| r.on_exit_codes.matches(*code));
            // A download that gave up on the network or the disk, after
            // retrying each file, failed of the cluster, not of the job.
            let transient = *download && *code == crate::hub::TRANSIENT_EXIT_CODE;
            let meaning = if transient {
                Some("the download's network or disk failed")
            } else {
                exit_meaning(*code)
            };
            let why = match (message, meaning) {
                (Some(m), _) => format!(": {m}"),
                (None, Some(meaning)) => format!(" ({meaning})"),
                (None, None) => String::new(),
            };
            let action = rule.map(|r| r.action).unwrap_or(if transient {
                FailureAction::Ignore
            } else {
                FailureAction::Count
            });
            let why = format!("pod {pod} exited with code {code}{why}");
            if transient && action == FailureAction::Ignore {
                // Not counted, but not at once either: a Hub that is down
                // would otherwise have the gang recreated every few seconds.
                let wait = DOWNLOAD_RETRY_DELAY.as_secs_f64();
                let elapsed = cur
                    .failed_at
                    .map_or(wait, |since| now.0.duration_since(since).as_secs_f64());
                if plan.still_waiting(elapsed, wait) {
                    let msg = format!(
                        "attempt {} failed: {why}; restarting the gang as attempt {} in {}s (not counted)",
                        cur.attempt,
                        cur.attempt + 1,
                        (wait - elapsed).ceil()
                    );
                    set_phase(
                        plan,
                        old,
                        TrainingPhase::Restarting,
                        DOWNLOAD_RETRY,
                        &msg,
                        now,
                    );
                    return;
                }
                return restart(job, old, cur, (action, why), DOWNLOAD_RETRY, plan, now);
            }
            (action, why)
        }
        FailureCause::Unknown { message } => (FailureAction::Count, message.clone()),
    };
    restart(job, old, cur, verdict, "GangRestart", plan, now);
}

/// What the worker's exit codes mean (`moe-worker`'s contract), for a
/// failure whose pod left no termination message.
fn exit_meaning(code: i32) -> Option<&'static str> {
    match code {
        2 => Some("a configuration or data error"),
        3 => Some("another rank failed first"),
        moe_crds::contract::FABRIC_BELOW_FLOOR_EXIT_CODE => {
            Some("the gang's all-to-all bandwidth is below parallelism.fabricCheck.minAllToAllMBps")
        }
        _ => None,
    }
}

/// Restart the gang as the next attempt, counted or not as `action` says,
/// or fail the job (a `FailJob` action, or no restarts left). `reason`
/// names the restart in its condition and Event.
fn restart(
    job: &MoETrainingJob,
    old: &MoETrainingJobStatus,
    cur: &AttemptState,
    (action, why): (FailureAction, String),
    reason: &str,
    plan: &mut Plan,
    now: &Time,
) {
    let policy = &job.spec.run_policy;
    let mut next = cur.counters;
    match action {
        FailureAction::FailJob => {
            let msg = format!(
                "attempt {}: {why}, which a failure rule marks fatal",
                cur.attempt
            );
            return fail(plan, old, "FailureRuleMatched", &msg, now);
        }
        FailureAction::Ignore => next.disruptions += 1,
        FailureAction::Count => {
            if next.restarts >= policy.backoff_limit {
                let msg = format!(
                    "attempt {}: {why}; no restarts left (runPolicy.backoffLimit is {})",
                    cur.attempt, policy.backoff_limit
                );
                return fail(plan, old, "BackoffLimitExceeded", &msg, now);
            }
            next.restarts += 1;
        }
    }
    // The next attempt is created before the failed one is deleted, so an
    // operator restart in between finds both and simply finishes the switch.
    let attempt = cur.attempt + 1;
    plan.create = Some(NewAttempt {
        attempt,
        counters: next,
        nodes: job.spec.parallelism.nodes,
    });
    plan.delete.push(cur.name.clone());
    plan.status.attempt = attempt;
    plan.status.restarts = next.restarts;
    plan.status.disruptions = next.disruptions;
    plan.status.workers = WorkerCounts {
        expected: job.spec.parallelism.nodes,
        ..Default::default()
    };
    let counted = if action == FailureAction::Count {
        "counted"
    } else {
        "not counted"
    };
    let msg = format!(
        "attempt {} failed: {why}; restarting the gang as attempt {attempt} ({counted})",
        cur.attempt
    );
    plan.transitions.push(warning(reason, msg.clone()));
    set_phase(plan, old, TrainingPhase::Restarting, reason, &msg, now);
}

/// What keeps the attempt's gang from being placed, in words.
fn unplaced_words(cur: &AttemptState, unplaced: &Unplaced) -> String {
    let why = &unplaced.message;
    match (&cur.outcome, unplaced.bound) {
        (AttemptOutcome::Queued, _) => {
            format!("Kueue has not admitted the gang of {} ({why})", cur.nodes)
        }
        // Pods placed one by one: those bound hold their nodes meanwhile.
        (_, Some(bound)) => format!(
            "{} of {} worker pods cannot be scheduled ({why}); {bound} bound",
            cur.nodes - bound,
            cur.nodes
        ),
        // All or nothing: no pod of the gang is bound while the
        // scheduler finds no place for every one of them.
        (_, None) => format!(
            "the scheduler cannot place all {} worker pods at once ({why}); none is bound until it can",
            cur.nodes
        ),
    }
}

/// An elastic job's attempt whose gang has waited unplaced for
/// `shrinkAfterSeconds` gives way to a smaller attempt, down to `minNodes`:
/// as many nodes as the scheduler bound pods (when it places them one by
/// one), else one fewer than now (a gang placed whole, or one Kueue has not
/// admitted), and the largest such size whose layout is valid. Nothing is
/// counted: the gang never ran whole. Returns whether it planned one;
/// before the wait is over it asks to look again when it is.
fn shrink(
    job: &MoETrainingJob,
    old: &MoETrainingJobStatus,
    cur: &AttemptState,
    now: Timestamp,
    plan: &mut Plan,
) -> bool {
    let spec = &job.spec;
    let (Some(elastic), Some(unplaced)) = (&spec.parallelism.elastic, &cur.unplaced) else {
        return false;
    };
    let running_whole =
        cur.outcome == AttemptOutcome::Running && cur.ready + cur.succeeded >= cur.nodes;
    if cur.nodes <= elastic.min_nodes
        || running_whole
        || !matches!(
            cur.outcome,
            AttemptOutcome::Queued | AttemptOutcome::Running
        )
    {
        return false;
    }
    // Counted from the first refusal, but not before the pods of the attempt
    // this one replaced have had their grace period to leave (a grown
    // gang's predecessor checkpoints as it stops; the workers' grace is the
    // job's): the room they hold is not the cluster's verdict.
    let predecessor_gone = cur.created.map(|t| {
        t + k8s_openapi::jiff::SignedDuration::from_secs(super::build::grace_seconds(job))
    });
    let since = match (unplaced.since, predecessor_gone) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let waited = since.map_or(0.0, |since| {
        now.duration_since(since).as_secs_f64().max(0.0)
    });
    let wait = f64::from(elastic.shrink_after_seconds);
    if plan.still_waiting(waited, wait) {
        return false;
    }
    let fits = unplaced.bound.unwrap_or(cur.nodes - 1).min(cur.nodes - 1);
    let Some(nodes) = (elastic.min_nodes..=fits.max(elastic.min_nodes))
        .rev()
        .find(|&n| layout_fits(job, n))
    else {
        return false;
    };
    let attempt = cur.attempt + 1;
    plan.create = Some(NewAttempt {
        attempt,
        counters: cur.counters,
        nodes,
    });
    plan.delete.push(cur.name.clone());
    plan.status.attempt = attempt;
    plan.status.data_commits = Vec::new();
    plan.status.workers = WorkerCounts {
        expected: nodes,
        ..Default::default()
    };
    let msg = format!(
        "attempt {}: {} for {}s, past parallelism.elastic.shrinkAfterSeconds ({}s); attempt {attempt} trains on {nodes} of {} nodes (not counted as a restart)",
        cur.attempt,
        unplaced_words(cur, unplaced),
        waited.round(),
        elastic.shrink_after_seconds,
        spec.parallelism.nodes
    );
    plan.transitions.push(info(GANG_SHRUNK, msg.clone()));
    set_phase(
        plan,
        old,
        TrainingPhase::Pending,
        GANG_SHRUNK,
        &msg,
        &Time(now),
    );
    true
}

/// A smaller attempt of an elastic job that runs whole asks for spare pods
/// for the nodes it lacks; once they all run, the scheduler has room for the
/// whole gang, and the attempt gives way to one on `parallelism.nodes`
/// (deleted, its pods checkpoint at their next step as they stop). Only
/// where spares that run prove it ([`Observed::spares_show_room`]).
/// Returns whether it grew.
fn grow(
    job: &MoETrainingJob,
    old: &MoETrainingJobStatus,
    cur: &AttemptState,
    observed: &Observed,
    plan: &mut Plan,
    now: &Time,
) -> bool {
    let spec = &job.spec;
    let missing = spec.parallelism.nodes - cur.nodes;
    let Some(elastic) = spec.parallelism.elastic.as_ref().filter(|e| e.grow) else {
        return false;
    };
    if missing <= 0 || !observed.spares_show_room || cur.succeeded > 0 {
        return false;
    }
    // A smaller attempt trains `shrinkAfterSeconds` before it asks for
    // room: a gang that grew into room taken again meanwhile shrinks after
    // that long, so a grow-and-shrink cycle costs at least twice the wait,
    // never a restart every few seconds.
    let running = running_since(old, cur.attempt, now);
    let ran = observed.now.duration_since(running.0).as_secs_f64();
    let wait = f64::from(elastic.shrink_after_seconds);
    if plan.still_waiting(ran, wait) {
        return false;
    }
    let ready = observed
        .spares
        .iter()
        .find(|s| s.attempt == cur.attempt && !s.being_deleted)
        .map_or(0, |s| s.ready);
    if ready < missing {
        plan.spares = Some(SpareRequest {
            attempt: cur.attempt,
            count: missing,
        });
        return false;
    }
    let attempt = cur.attempt + 1;
    plan.create = Some(NewAttempt {
        attempt,
        counters: cur.counters,
        nodes: spec.parallelism.nodes,
    });
    plan.delete.push(cur.name.clone());
    plan.status.attempt = attempt;
    plan.status.data_commits = Vec::new();
    plan.status.workers = WorkerCounts {
        expected: spec.parallelism.nodes,
        ..Default::default()
    };
    let msg = format!(
        "attempt {}: trained on {} of {} nodes, and {missing} spare pod(s) now run for the rest; stopping it (it checkpoints at its next step) and restarting on all {} as attempt {attempt} (not counted as a restart)",
        cur.attempt, cur.nodes, spec.parallelism.nodes, spec.parallelism.nodes
    );
    plan.transitions.push(info(GANG_GROWN, msg.clone()));
    set_phase(plan, old, TrainingPhase::Pending, GANG_GROWN, &msg, now);
    true
}

/// Whether `job` can train on `nodes` nodes: its rules (the CRD's CEL, the
/// same the apiserver ran) hold for that size.
fn layout_fits(job: &MoETrainingJob, nodes: i32) -> bool {
    let mut sized = job.clone();
    sized.spec.parallelism.nodes = nodes;
    sized.spec.parallelism.elastic = None;
    sized.validate_cel().is_ok()
}

/// When the hang watchdog's clock last started for attempt `attempt`: the
/// later of the gang becoming Running and rank 0's last new report
/// (`status.progress.updateTime` moves only when the report changes), with
/// that report's step if it is the later one.
fn progress_clock(
    old: &MoETrainingJobStatus,
    new: &MoETrainingJobStatus,
    attempt: i32,
    now: &Time,
) -> (Time, Option<i64>) {
    let running = running_since(old, attempt, now);
    match &new.progress {
        Some(p) if p.update_time.as_ref().is_some_and(|t| t.0 > running.0) => {
            (p.update_time.clone().unwrap_or(running), Some(p.step))
        }
        _ => (running, None),
    }
}

/// When attempt `attempt` became Running: the `Running` condition's
/// transition, if the status already says this attempt runs; else now (it
/// becomes Running in this reconcile). A Kueue preemption in between makes
/// it Pending, so the clock restarts when the gang is readmitted.
fn running_since(old: &MoETrainingJobStatus, attempt: i32, now: &Time) -> Time {
    if old.phase != Some(TrainingPhase::Running) || old.attempt != attempt {
        return now.clone();
    }
    old.conditions
        .iter()
        .find(|c| c.type_ == "Running" && c.status == "True")
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone())
}

fn finished(
    job: &MoETrainingJob,
    old: &MoETrainingJobStatus,
    current: Option<&AttemptState>,
    export: Option<&ExportState>,
    mut plan: Plan,
    now: Timestamp,
) -> Plan {
    let exporting = old.phase == Some(TrainingPhase::Succeeded)
        && job
            .spec
            .output
            .as_ref()
            .is_some_and(|o| o.huggingface.is_some());
    if exporting {
        decide_export(job, old, export, &mut plan);
        // The TTL waits for the export: deleting the job would take its
        // Job (and its pod) with it.
        let done = plan
            .status
            .output
            .as_ref()
            .is_some_and(|o| o.phase != OutputPhase::Exporting);
        if !done {
            return plan;
        }
    }
    // A failed job keeps no pods; a succeeded one keeps its completed Job for
    // the record. The attempt is deleted only here, once the Failed status is
    // what we read back: deleting it in the same reconcile that fails the job
    // let a reconcile on a not-yet-updated copy of the resource see "running,
    // no attempt" and start a new one (seen in e2e).
    if old.phase == Some(TrainingPhase::Failed) {
        plan.delete.extend(current.map(|c| c.name.clone()));
    }
    if let (Some(ttl), Some(done)) = (
        job.spec.run_policy.ttl_seconds_after_finished,
        &old.completion_time,
    ) {
        let due = done.0.as_second() + ttl as i64;
        if now.as_second() >= due {
            plan.delete_self = true;
        } else {
            plan.requeue_after = Some(Duration::from_secs((due - now.as_second()) as u64));
        }
    }
    plan
}

/// The Hugging Face export of a succeeded job: its Job is had until it
/// ends; `status.output` says how it stands. An ended export stays ended,
/// even if its Job is deleted afterwards.
fn decide_export(
    job: &MoETrainingJob,
    old: &MoETrainingJobStatus,
    export: Option<&ExportState>,
    plan: &mut Plan,
) {
    let before = old.output.clone();
    let ended = before
        .as_ref()
        .is_some_and(|o| o.phase != OutputPhase::Exporting);
    if ended {
        return;
    }
    let mut output = OutputStatus {
        phase: OutputPhase::Exporting,
        path: super::build::export_path(job),
        architecture: job.spec.model.export_architecture().into(),
        message: None,
    };
    let at = format!("{} as {}", output.path, output.architecture);
    match export {
        None | Some(ExportState::Running) => {
            plan.export = true;
            if before.is_none() {
                plan.transitions.push(Transition {
                    warning: false,
                    reason: "Exporting".into(),
                    message: format!("exporting the trained model to {at}"),
                });
            }
        }
        Some(ExportState::Complete) => {
            output.phase = OutputPhase::Exported;
            plan.transitions.push(Transition {
                warning: false,
                reason: "Exported".into(),
                message: format!("exported the trained model to {at}"),
            });
        }
        Some(ExportState::Failed { message }) => {
            output.phase = OutputPhase::Failed;
            output.message = message.clone();
            plan.transitions.push(warning(
                "ExportFailed",
                format!(
                    "the export to {at} failed: {}",
                    message.as_deref().unwrap_or("see the export pod")
                ),
            ));
        }
    }
    plan.status.output = Some(output);
}

fn fail(plan: &mut Plan, old: &MoETrainingJobStatus, reason: &str, message: &str, now: &Time) {
    plan.status.completion_time = Some(now.clone());
    plan.status.workers = WorkerCounts {
        expected: plan.status.workers.expected,
        ..Default::default()
    };
    set_phase(plan, old, TrainingPhase::Failed, reason, message, now);
}

/// `phase`, Stalled (not Ready, not Reconciling) for `reason`: a job that
/// will not get anywhere until its spec changes. The warning Event comes
/// once, when it stalls.
fn stall(
    plan: &mut Plan,
    old: &MoETrainingJobStatus,
    phase: TrainingPhase,
    reason: &str,
    message: &str,
    now: &Time,
) {
    set_phase(plan, old, phase, reason, message, now);
    plan.transitions.clear();
    let generation = plan.status.observed_generation;
    for (type_, on) in [(READY, false), (RECONCILING, false), (STALLED, true)] {
        set(
            &mut plan.status.conditions,
            type_,
            on,
            reason,
            message,
            generation,
            now,
        );
    }
    if !has_true(old, STALLED) {
        plan.transitions.push(warning(reason, message.into()));
    }
}

fn has_true(status: &MoETrainingJobStatus, type_: &str) -> bool {
    status
        .conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

fn info(reason: &str, message: String) -> Transition {
    Transition {
        warning: false,
        reason: reason.into(),
        message,
    }
}

fn warning(reason: &str, message: String) -> Transition {
    Transition {
        warning: true,
        reason: reason.into(),
        message,
    }
}

/// Reason of a queued attempt that Kueue suspended after it had run.
const PREEMPTED: &str = "Preempted";
/// A gang the scheduler cannot place whole (Workload API).
const UNSCHEDULABLE: &str = "Unschedulable";
/// Pending while worker pods download `data.huggingface`.
const DOWNLOADING_DATA: &str = "DownloadingData";
/// How often a job whose pods download is looked at again.
const POD_POLL: Duration = Duration::from_secs(30);
/// A gang restarted after a download failed on the network or the disk.
const DOWNLOAD_RETRY: &str = "DownloadRetry";
/// How long after such a failure the next attempt starts.
const DOWNLOAD_RETRY_DELAY: Duration = Duration::from_secs(30);
/// An elastic job's gang gave way to a smaller one.
const GANG_SHRUNK: &str = "GangShrunk";
/// A smaller attempt gave way to the whole gang.
const GANG_GROWN: &str = "GangGrown";
/// A running gang that the hang watchdog restarted.
const PROGRESS_DEADLINE: &str = "ProgressDeadlineExceeded";

fn reconciling_reason(status: &MoETrainingJobStatus) -> Option<&str> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == RECONCILING && c.status == "True")
        .map(|c| c.reason.as_str())
}

/// Set the phase and derive every condition from it; record a transition when the phase changes.
fn set_phase(
    plan: &mut Plan,
    old: &MoETrainingJobStatus,
    phase: TrainingPhase,
    reason: &str,
    message: &str,
    now: &Time,
) {
    use TrainingPhase::*;
    plan.status.phase = Some(phase);
    if old.phase != Some(phase) {
        let warn = phase == Failed;
        plan.transitions.push(Transition {
            warning: warn,
            reason: reason.into(),
            message: message.into(),
        });
    }
    let generation = plan.status.observed_generation;
    let conds = &mut plan.status.conditions;
    let is = |p: &[TrainingPhase]| p.contains(&phase);
    // kstatus: Ready is the summary; Reconciling while working toward
    // running; Stalled when it will not get there without a change. A
    // suspended job is where its spec says it should be, so it is Ready:
    // kstatus then calls it Current (a GitOps `wait` on it finishes rather
    // than timing out), while the Suspended condition keeps it apart for
    // Argo CD and people.
    set(
        conds,
        READY,
        is(&[Running, Succeeded, Suspended]),
        reason,
        message,
        generation,
        now,
    );
    set(
        conds,
        RECONCILING,
        is(&[Pending, Restarting]),
        reason,
        message,
        generation,
        now,
    );
    set(
        conds,
        STALLED,
        is(&[Failed]),
        reason,
        message,
        generation,
        now,
    );
    set(conds, "Created", true, reason, message, generation, now);
    set(
        conds,
        "Running",
        is(&[Running]),
        reason,
        message,
        generation,
        now,
    );
    set(
        conds,
        "Restarting",
        is(&[Restarting]),
        reason,
        message,
        generation,
        now,
    );
    set(
        conds,
        "Suspended",
        is(&[Suspended]),
        reason,
        message,
        generation,
        now,
    );
    set(
        conds,
        "Succeeded",
        is(&[Succeeded]),
        reason,
        message,
        generation,
        now,
    );
    set(
        conds,
        "Failed",
        is(&[Failed]),
        reason,
        message,
        generation,
        now,
    );
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
