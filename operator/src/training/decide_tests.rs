//! The gang-restart state machine, case by case, on inline specs.

use super::*;
use crate::training::init_source::InitSource;
use moe_crds::{ExitCodeOperator, ExitCodes, FailureRule, MoETrainingJobSpec};

fn job(yaml: &str) -> MoETrainingJob {
    let spec: MoETrainingJobSpec = serde_yaml::from_str(yaml).expect("spec parses");
    let mut job = MoETrainingJob::new("train", spec);
    job.metadata.namespace = Some("ns".into());
    job.metadata.uid = Some("uid-1".into());
    job.metadata.generation = Some(1);
    job
}

const SPEC: &str = r#"
model: {hiddenSize: 64, layers: 2, attentionHeads: 4, kvHeads: 2, seqLen: 64,
        moe: {experts: 8, topK: 2, expertHiddenSize: 32}}
training: {steps: 10, globalBatchSize: 8}
parallelism: {nodes: 4}
runPolicy: {backoffLimit: 2}
"#;

fn now() -> Timestamp {
    "2026-11-28T12:00:00Z".parse().unwrap()
}

fn observed(attempts: Vec<AttemptState>) -> Observed {
    Observed {
        attempts,
        now: now(),
        invalid: None,
        progress: None,
        spares: vec![],
        spares_show_room: true,
        export: None,
        init_source: InitSource::Settled,
    }
}

fn attempt(n: i32, outcome: AttemptOutcome, counters: Counters) -> AttemptState {
    AttemptState {
        attempt: n,
        name: format!("train-a{n}"),
        counters,
        being_deleted: false,
        outcome,
        nodes: 4,
        created: None,
        failed_at: None,
        unplaced: None,
        downloading: 0,
        data_commits: None,
        active: 4,
        ready: 4,
        succeeded: 0,
        failed: 0,
    }
}

/// The attempt a plan creates (number and counters), which every plan but
/// an elastic shrink makes of the whole gang.
fn created(plan: &Plan) -> Option<(i32, Counters)> {
    let new = plan.create?;
    assert_eq!(new.nodes, 4, "a new attempt asks for parallelism.nodes");
    Some((new.attempt, new.counters))
}

/// Feed a plan's status back into the job, as the status write would.
fn after(mut job: MoETrainingJob, plan: &Plan) -> MoETrainingJob {
    job.status = Some(plan.status.clone());
    job
}

fn condition(plan: &Plan, type_: &str) -> String {
    plan.status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.clone())
        .unwrap_or_default()
}

fn exit(code: i32) -> AttemptOutcome {
    AttemptOutcome::Failed {
        cause: FailureCause::ExitCode {
            pod: "train-a0-1-x".into(),
            code,
            message: None,
            download: false,
        },
    }
}

#[test]
fn a_new_job_creates_attempt_zero_and_is_pending() {
    let plan = decide(&job(SPEC), &observed(vec![]));
    assert_eq!(created(&plan), Some((0, Counters::default())));
    assert_eq!(plan.status.phase, Some(TrainingPhase::Pending));
    assert_eq!(condition(&plan, "Reconciling"), "True");
    assert_eq!(condition(&plan, "Ready"), "False");
    assert_eq!(plan.status.observed_generation, Some(1));
    assert_eq!(plan.status.workers.expected, 4);
    assert_eq!(plan.transitions.len(), 1);
}

#[test]
fn all_workers_ready_is_running_and_ready() {
    let j = job(SPEC);
    let plan = decide(
        &j,
        &observed(vec![attempt(
            0,
            AttemptOutcome::Running,
            Counters::default(),
        )]),
    );
    assert_eq!(created(&plan), None);
    assert!(plan.delete.is_empty());
    assert_eq!(plan.status.phase, Some(TrainingPhase::Running));
    assert_eq!(condition(&plan, "Ready"), "True");
    assert_eq!(condition(&plan, "Reconciling"), "False");
    assert_eq!(condition(&plan, "Stalled"), "False");
}

#[test]
fn partially_ready_gang_is_still_pending() {
    let mut a = attempt(0, AttemptOutcome::Running, Counters::default());
    a.ready = 3;
    let plan = decide(&job(SPEC), &observed(vec![a]));
    assert_eq!(plan.status.phase, Some(TrainingPhase::Pending));
    assert_eq!(plan.status.workers.ready, 3);
}

/// Pods downloading a Hub dataset: Pending with its own reason, looked at
/// again within 30 s (pods are not watched); then starting as usual.
#[test]
fn a_gang_downloading_its_dataset_is_pending_and_polled() {
    let j = job(SPEC);
    let mut a = attempt(0, AttemptOutcome::Running, Counters::default());
    (a.active, a.ready, a.downloading) = (4, 1, 3);
    let plan = decide(&j, &observed(vec![a.clone()]));
    assert_eq!(plan.status.phase, Some(TrainingPhase::Pending));
    let (reason, message) = reconciling(&plan);
    assert_eq!(reason, "DownloadingData");
    assert_eq!(
        message,
        "attempt 0: 3 download(s) from the Hub running, 1/4 ready"
    );
    assert!(
        plan.requeue_after
            .is_some_and(|d| d <= Duration::from_secs(30))
    );
    a.downloading = 0;
    let plan = decide(&after(j, &plan), &observed(vec![a]));
    assert_eq!(reconciling(&plan).0, "WorkersStarting");
}

/// The commits a Hub dataset's downloads resolved: set once every pod of
/// the attempt said, kept while the pods are not listed again, cleared when
/// the next attempt starts (its pods download again).
#[test]
fn the_attempts_data_commits_are_kept_once_known_and_cleared_with_the_next_attempt() {
    let j = job(SPEC);
    let mut a = attempt(0, AttemptOutcome::Running, Counters::default());
    a.data_commits = Some(vec!["c0ffee".into()]);
    let plan = decide(&j, &observed(vec![a.clone()]));
    assert_eq!(plan.status.data_commits, vec!["c0ffee"]);
    a.data_commits = None;
    let kept = decide(&after(j.clone(), &plan), &observed(vec![a]));
    assert_eq!(kept.status.data_commits, vec!["c0ffee"]);
    let next = attempt(1, AttemptOutcome::Running, Counters::default());
    let plan = decide(&after(j, &kept), &observed(vec![next]));
    assert!(plan.status.data_commits.is_empty());
}

fn reconciling(plan: &Plan) -> (String, String) {
    let c = plan
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Reconciling")
        .unwrap();
    (c.reason.clone(), c.message.clone())
}

#[test]
fn a_gang_the_scheduler_cannot_place_is_unschedulable_with_its_words_and_one_warning() {
    let j = job(SPEC);
    let mut a = attempt(0, AttemptOutcome::Running, Counters::default());
    (a.active, a.ready) = (4, 0);
    let starting = decide(&j, &observed(vec![a.clone()]));
    assert_eq!(reconciling(&starting).0, "WorkersStarting");

    a.unplaced = Some(Unplaced {
        message: "Unschedulable: 0/15 placements are available".into(),
        since: Some(now()),
        bound: None,
    });
    let plan = decide(&after(j.clone(), &starting), &observed(vec![a.clone()]));
    assert_eq!(plan.status.phase, Some(TrainingPhase::Pending));
    let (reason, message) = reconciling(&plan);
    assert_eq!(reason, "Unschedulable");
    assert!(
        message.contains("0/15 placements are available"),
        "{message}"
    );
    assert!(message.contains("all 4 worker pods"), "{message}");
    assert_eq!(plan.transitions.len(), 1);
    assert!(plan.transitions[0].warning);
    assert_eq!(plan.transitions[0].reason, "Unschedulable");

    // Once: the same verdict again is no new event.
    let again = decide(&after(j.clone(), &plan), &observed(vec![a.clone()]));
    assert!(again.transitions.is_empty());

    // From a fresh job (no phase yet): one event, a warning, not two.
    let fresh = decide(&j, &observed(vec![a.clone()]));
    assert_eq!(fresh.transitions.len(), 1);
    assert!(fresh.transitions[0].warning);

    // A gang once ready is judged by its pods, whatever the group said.
    a.ready = 4;
    let running = decide(&after(j, &plan), &observed(vec![a]));
    assert_eq!(running.status.phase, Some(TrainingPhase::Running));
}

const ELASTIC: &str = r#"
model: {hiddenSize: 64, layers: 2, attentionHeads: 4, kvHeads: 2, seqLen: 64,
        moe: {experts: 8, topK: 2, expertHiddenSize: 32}}
training: {steps: 10, globalBatchSize: 8}
parallelism: {nodes: 4, elastic: {minNodes: 1, shrinkAfterSeconds: 300}}
runPolicy: {backoffLimit: 2}
"#;

/// Attempt `n` of `nodes` pods, `bound` of them placed one by one, the rest
/// unschedulable for `waited` seconds.
fn unplaced(n: i32, nodes: i32, bound: Option<i32>, waited: i64) -> AttemptState {
    let mut a = attempt(n, AttemptOutcome::Running, Counters::default());
    (a.nodes, a.active, a.ready) = (nodes, nodes, 0);
    a.unplaced = Some(Unplaced {
        message: "0/3 nodes are available: 3 Insufficient nvidia.com/gpu".into(),
        since: Some(now() - k8s_openapi::jiff::SignedDuration::from_secs(waited)),
        bound,
    });
    a
}

#[test]
fn pods_the_scheduler_cannot_place_one_by_one_are_unschedulable_with_its_words() {
    let j = job(SPEC);
    let plan = decide(&j, &observed(vec![unplaced(0, 4, Some(3), 5000)]));
    assert_eq!(plan.status.phase, Some(TrainingPhase::Pending));
    let (reason, message) = reconciling(&plan);
    assert_eq!(reason, "Unschedulable");
    assert!(
        message.contains("1 of 4 worker pods cannot be scheduled (0/3 nodes are available: 3 Insufficient nvidia.com/gpu); 3 bound"),
        "{message}"
    );
    assert_eq!(plan.transitions.len(), 1);
    assert!(plan.transitions[0].warning);
    // Not elastic: it waits, however long, and looks again (pods are not watched).
    assert_eq!(plan.create, None);
    assert!(plan.delete.is_empty());
    assert_eq!(plan.requeue_after, Some(Duration::from_secs(30)));
}

#[test]
fn an_elastic_gang_waits_its_time_then_shrinks_to_the_valid_size_the_scheduler_bound() {
    let j = job(ELASTIC);
    // 100 of 300 s: it waits, and looks again when the wait is over.
    let early = decide(&j, &observed(vec![unplaced(0, 4, Some(3), 100)]));
    assert_eq!(early.create, None);
    assert!(early.delete.is_empty());
    assert_eq!(reconciling(&early).0, "Unschedulable");
    assert_eq!(early.requeue_after, Some(Duration::from_secs(30)));
    let late = decide(&j, &observed(vec![unplaced(0, 4, Some(3), 290)]));
    assert_eq!(late.requeue_after, Some(Duration::from_secs(10)));

    // 300 s: 3 pods were bound, but a global batch of 8 does not split over
    // 3 ranks; 2 it does.
    let plan = decide(&j, &observed(vec![unplaced(0, 4, Some(3), 300)]));
    assert_eq!(
        plan.create,
        Some(NewAttempt {
            attempt: 1,
            counters: Counters::default(),
            nodes: 2
        })
    );
    assert_eq!(plan.delete, vec!["train-a0".to_string()]);
    assert_eq!(plan.status.attempt, 1);
    assert_eq!(plan.status.workers.expected, 2);
    assert_eq!((plan.status.restarts, plan.status.disruptions), (0, 0));
    assert_eq!(plan.status.phase, Some(TrainingPhase::Pending));
    let (reason, message) = reconciling(&plan);
    assert_eq!(reason, "GangShrunk");
    assert!(
        message.contains("1 of 4 worker pods cannot be scheduled")
            && message.contains("for 300s, past parallelism.elastic.shrinkAfterSeconds (300s)")
            && message.contains("attempt 1 trains on 2 of 4 nodes"),
        "{message}"
    );
    let event = plan.transitions.iter().find(|t| t.reason == "GangShrunk");
    assert!(event.is_some_and(|t| !t.warning), "{:?}", plan.transitions);

    // The smaller attempt runs whole: Running, on 2.
    let mut shrunk = attempt(1, AttemptOutcome::Running, Counters::default());
    (shrunk.nodes, shrunk.active, shrunk.ready) = (2, 2, 2);
    let running = decide(&after(j.clone(), &plan), &observed(vec![shrunk.clone()]));
    assert_eq!(running.status.phase, Some(TrainingPhase::Running));
    assert_eq!(running.status.workers.expected, 2);
    assert!(reconciling(&running).1.contains("all 2 worker pod(s)"));
    assert_eq!(running.create, None);

    // It fails: the next attempt asks for all 4 again.
    shrunk.outcome = exit(1);
    let restarted = decide(&after(j, &running), &observed(vec![shrunk]));
    assert_eq!(
        created(&restarted),
        Some((
            2,
            Counters {
                restarts: 1,
                disruptions: 0
            }
        ))
    );
    assert_eq!(restarted.status.workers.expected, 4);
}

#[test]
fn the_wait_starts_once_the_replaced_attempts_pods_have_had_their_grace_period() {
    let j = job(ELASTIC);
    // Refused for 500 s, but the attempt is 400 s old: its predecessor's
    // pods may have held the room for its first 120 s (the workers' grace
    // period by default).
    let mut a = unplaced(1, 4, Some(2), 500);
    a.created = Some(now() - k8s_openapi::jiff::SignedDuration::from_secs(400));
    assert_eq!(decide(&j, &observed(vec![a.clone()])).create, None);
    // 420 s old: 300 s past the grace.
    a.created = Some(now() - k8s_openapi::jiff::SignedDuration::from_secs(420));
    assert_eq!(
        decide(&j, &observed(vec![a.clone()]))
            .create
            .map(|n| n.nodes),
        Some(2)
    );
    // The job's own grace period: 10 s.
    let quick = job(&format!(
        "{ELASTIC}worker: {{terminationGracePeriodSeconds: 10}}\n"
    ));
    a.created = Some(now() - k8s_openapi::jiff::SignedDuration::from_secs(400));
    assert_eq!(
        decide(&quick, &observed(vec![a])).create.map(|n| n.nodes),
        Some(2)
    );
}

/// `job`, its status saying it has been Running for `seconds`.
fn running_for(mut job: MoETrainingJob, seconds: i64) -> MoETrainingJob {
    let status = job.status.as_mut().expect("a status");
    assert_eq!(status.phase, Some(TrainingPhase::Running));
    for c in status
        .conditions
        .iter_mut()
        .filter(|c| c.type_ == "Running")
    {
        c.last_transition_time =
            Time(now() - k8s_openapi::jiff::SignedDuration::from_secs(seconds));
    }
    job
}

fn spare(attempt: i32, ready: i32) -> SpareState {
    SpareState {
        name: format!("train-a{attempt}-spare"),
        attempt,
        ready,
        being_deleted: false,
    }
}

#[test]
fn a_smaller_attempt_asks_for_spare_pods_and_grows_back_once_they_all_run() {
    let j = job(ELASTIC);
    let mut small = attempt(1, AttemptOutcome::Running, Counters::default());
    (small.nodes, small.active, small.ready) = (2, 2, 2);
    let mut obs = observed(vec![small.clone()]);

    // Running whole on 2 of 4, just now: it trains shrinkAfterSeconds
    // (300) before it asks for room.
    let just = after(j.clone(), &decide(&j, &obs));
    let plan = decide(&just, &obs);
    assert_eq!(plan.status.phase, Some(TrainingPhase::Running));
    assert_eq!(plan.spares, None);
    // Running for 300 s: it asks for spares for the other 2.
    let ran = running_for(just, 300);
    let want = Some(SpareRequest {
        attempt: 1,
        count: 2,
    });
    let plan = decide(&ran, &obs);
    assert_eq!(plan.spares, want);
    assert!(plan.create.is_none() && plan.delete.is_empty(), "{plan:?}");

    // One of them runs: it keeps asking.
    obs.spares = vec![spare(1, 1)];
    let plan = decide(&ran, &obs);
    assert_eq!(plan.spares, want);
    assert!(plan.create.is_none() && plan.delete.is_empty(), "{plan:?}");

    // Both run: the scheduler has room for the whole gang. Attempt 1 goes
    // (its pods checkpoint as they stop), and its spares; attempt 2 asks
    // for all 4, not counted.
    obs.spares = vec![spare(1, 2)];
    let plan = decide(&ran, &obs);
    assert_eq!(
        plan.create,
        Some(NewAttempt {
            attempt: 2,
            counters: Counters::default(),
            nodes: 4
        })
    );
    assert_eq!(plan.delete, vec!["train-a1", "train-a1-spare"]);
    assert_eq!(plan.spares, None);
    assert_eq!((plan.status.attempt, plan.status.workers.expected), (2, 4));
    assert_eq!((plan.status.restarts, plan.status.disruptions), (0, 0));
    let (reason, message) = reconciling(&plan);
    assert_eq!(reason, "GangGrown");
    assert!(
        message.contains("trained on 2 of 4 nodes")
            && message.contains("restarting on all 4 as attempt 2"),
        "{message}"
    );
    let event = plan.transitions.iter().find(|t| t.reason == "GangGrown");
    assert!(event.is_some_and(|t| !t.warning), "{:?}", plan.transitions);

    // The whole gang runs: an older attempt's spares left over go.
    let mut whole = attempt(2, AttemptOutcome::Running, Counters::default());
    (whole.active, whole.ready) = (4, 4);
    let mut obs = observed(vec![whole]);
    obs.spares = vec![spare(1, 2)];
    let plan = decide(&j, &obs);
    assert_eq!(plan.spares, None);
    assert_eq!(plan.delete, vec!["train-a1-spare"]);

    // No spares where they would not show room for the gang (the Workload
    // API, a required domain under Kueue), nor with grow: false.
    let mut obs = observed(vec![small.clone()]);
    obs.spares_show_room = false;
    assert_eq!(decide(&ran, &obs).spares, None);
    let mut fixed = job(&ELASTIC.replace(
        "shrinkAfterSeconds: 300",
        "shrinkAfterSeconds: 300, grow: false",
    ));
    fixed.status = ran.status.clone();
    assert_eq!(decide(&fixed, &observed(vec![small])).spares, None);
}

#[test]
fn a_gang_placed_whole_or_queued_shrinks_one_valid_size_at_a_time_down_to_min_nodes() {
    let j = job(ELASTIC);
    // All or nothing (no pod bound): 3 is not a valid size, 2 is.
    let plan = decide(&j, &observed(vec![unplaced(0, 4, None, 400)]));
    assert_eq!(plan.create.map(|n| n.nodes), Some(2));
    assert!(
        reconciling(&plan)
            .1
            .contains("cannot place all 4 worker pods at once")
    );
    // From 2: 1 (minNodes).
    let plan = decide(&j, &observed(vec![unplaced(1, 2, None, 400)]));
    assert_eq!(plan.create.map(|n| (n.attempt, n.nodes)), Some((2, 1)));
    // At minNodes it waits.
    let plan = decide(&j, &observed(vec![unplaced(2, 1, Some(0), 4000)]));
    assert_eq!(plan.create, None);
    assert_eq!(reconciling(&plan).0, "Unschedulable");

    // A gang Kueue has not admitted for the wait gives way too.
    let mut queued = unplaced(0, 4, None, 300);
    queued.outcome = AttemptOutcome::Queued;
    let plan = decide(&j, &observed(vec![queued.clone()]));
    assert_eq!(plan.create.map(|n| n.nodes), Some(2));
    assert!(
        reconciling(&plan)
            .1
            .contains("Kueue has not admitted the gang of 4"),
        "{:?}",
        reconciling(&plan)
    );
    queued.unplaced.as_mut().unwrap().since = Some(now());
    let waiting = decide(&j, &observed(vec![queued]));
    assert_eq!(waiting.create, None);
    assert_eq!(reconciling(&waiting).0, "WaitingForAdmission");
}

#[test]
fn an_unchanged_world_gives_an_identical_status_and_no_event() {
    let j = job(SPEC);
    let obs = observed(vec![attempt(
        0,
        AttemptOutcome::Running,
        Counters::default(),
    )]);
    let first = decide(&j, &obs);
    let second = decide(
        &after(j, &first),
        &Observed {
            now: "2026-11-28T12:05:00Z".parse().unwrap(),
            ..obs
        },
    );
    assert_eq!(
        second.status, first.status,
        "status must not churn (no write storms)"
    );
    assert!(second.transitions.is_empty());
}

#[test]
fn a_failed_pod_restarts_the_gang_as_the_next_attempt_counting_the_restart() {
    let j = job(SPEC);
    let plan = decide(
        &j,
        &observed(vec![attempt(0, exit(1), Counters::default())]),
    );
    assert_eq!(
        created(&plan),
        Some((
            1,
            Counters {
                restarts: 1,
                disruptions: 0
            }
        ))
    );
    assert_eq!(plan.delete, vec!["train-a0".to_string()]);
    assert_eq!(plan.status.phase, Some(TrainingPhase::Restarting));
    assert_eq!(plan.status.restarts, 1);
    assert_eq!(plan.status.attempt, 1);
    assert!(
        plan.transitions
            .iter()
            .any(|t| t.reason == "GangRestart" && t.message.contains("exited with code 1"))
    );
}

#[test]
fn restarts_stop_at_the_backoff_limit_and_the_job_fails() {
    let j = job(SPEC); // backoffLimit 2
    let plan = decide(
        &j,
        &observed(vec![attempt(
            2,
            exit(1),
            Counters {
                restarts: 2,
                disruptions: 0,
            },
        )]),
    );
    assert_eq!(created(&plan), None);
    assert!(
        plan.delete.is_empty(),
        "the attempt goes only once Failed is read back"
    );
    assert_eq!(plan.status.phase, Some(TrainingPhase::Failed));
    assert_eq!(condition(&plan, "Stalled"), "True");
    assert_eq!(condition(&plan, "Failed"), "True");
    let failed = plan
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Failed")
        .unwrap();
    assert_eq!(failed.reason, "BackoffLimitExceeded");
    assert!(plan.status.completion_time.is_some());
}

#[test]
fn disruptions_restart_without_using_the_budget() {
    let j = job(SPEC);
    let cause = FailureCause::Disruption {
        pod: "train-a2-0-x".into(),
        reason: "DeletionByTaintManager".into(),
    };
    let plan = decide(
        &j,
        &observed(vec![attempt(
            2,
            AttemptOutcome::Failed { cause },
            Counters {
                restarts: 2,
                disruptions: 0,
            },
        )]),
    );
    assert_eq!(
        created(&plan),
        Some((
            3,
            Counters {
                restarts: 2,
                disruptions: 1
            }
        ))
    );
    assert_eq!(plan.status.disruptions, 1);
    assert_eq!(plan.status.phase, Some(TrainingPhase::Restarting));
}

/// A failed download's exit.
fn download_exit(code: i32) -> AttemptOutcome {
    AttemptOutcome::Failed {
        cause: FailureCause::ExitCode {
            pod: "train-a0-1-x".into(),
            code,
            message: Some("download-model: fetching model.safetensors: connection refused".into()),
            download: true,
        },
    }
}

#[test]
fn a_download_that_failed_on_the_network_restarts_the_gang_uncounted_after_a_pause() {
    let j = job(SPEC);
    let mut a = attempt(0, download_exit(1), Counters::default());
    a.failed_at = Some(now() - k8s_openapi::jiff::SignedDuration::from_secs(10));
    let plan = decide(&j, &observed(vec![a.clone()]));
    assert_eq!((plan.create, plan.delete.len()), (None, 0), "it waits");
    assert_eq!(plan.status.phase, Some(TrainingPhase::Restarting));
    let (reason, message) = reconciling(&plan);
    assert_eq!(reason, "DownloadRetry");
    assert!(
        message.contains("connection refused")
            && message.contains("restarting the gang as attempt 1 in 20s (not counted)"),
        "{message}"
    );
    assert_eq!(plan.requeue_after, Some(Duration::from_secs(20)));

    // 30 s after the failure: the next attempt, a disruption, not a restart.
    a.failed_at = Some(now() - k8s_openapi::jiff::SignedDuration::from_secs(30));
    let plan = decide(&after(j.clone(), &plan), &observed(vec![a.clone()]));
    assert_eq!(
        created(&plan),
        Some((
            1,
            Counters {
                restarts: 0,
                disruptions: 1
            }
        ))
    );
    assert_eq!(plan.delete, vec!["train-a0"]);
    assert_eq!(reconciling(&plan).0, "DownloadRetry");

    // The worker's own exit 1, and a download the Hub refused (2), count, at once.
    for outcome in [exit(1), download_exit(2)] {
        let plan = decide(
            &j,
            &observed(vec![attempt(0, outcome, Counters::default())]),
        );
        assert_eq!(
            created(&plan),
            Some((
                1,
                Counters {
                    restarts: 1,
                    disruptions: 0
                }
            ))
        );
    }

    // A failure rule for the code decides instead.
    let mut strict = j.clone();
    strict.spec.run_policy.failure_rules = vec![FailureRule {
        action: FailureAction::FailJob,
        on_exit_codes: ExitCodes {
            operator: ExitCodeOperator::In,
            values: vec![1],
        },
    }];
    let plan = decide(&strict, &observed(vec![a]));
    assert_eq!(plan.status.phase, Some(TrainingPhase::Failed));
}

#[test]
fn failure_rules_decide_by_exit_code() {
    let mut j = job(SPEC);
    j.spec.run_policy.failure_rules = vec![
        FailureRule {
            action: FailureAction::FailJob,
            on_exit_codes: ExitCodes {
                operator: ExitCodeOperator::In,
                values: vec![3],
            },
        },
        FailureRule {
            action: FailureAction::Ignore,
            on_exit_codes: ExitCodes {
                operator: ExitCodeOperator::In,
                values: vec![137],
            },
        },
    ];
    let fatal = decide(
        &j,
        &observed(vec![attempt(0, exit(3), Counters::default())]),
    );
    assert_eq!(fatal.status.phase, Some(TrainingPhase::Failed));
    assert_eq!(created(&fatal), None);
    let ignored = decide(
        &j,
        &observed(vec![attempt(0, exit(137), Counters::default())]),
    );
    assert_eq!(
        created(&ignored),
        Some((
            1,
            Counters {
                restarts: 0,
                disruptions: 1
            }
        ))
    );
    let counted = decide(
        &j,
        &observed(vec![attempt(0, exit(1), Counters::default())]),
    );
    assert_eq!(
        created(&counted),
        Some((
            1,
            Counters {
                restarts: 1,
                disruptions: 0
            }
        ))
    );
}

#[test]
fn an_operator_restart_mid_switch_finishes_it_without_duplicates() {
    // The next attempt was created but the failed one not yet deleted.
    let j = job(SPEC);
    let counters = Counters {
        restarts: 1,
        disruptions: 0,
    };
    let plan = decide(
        &j,
        &observed(vec![
            attempt(0, exit(1), Counters::default()),
            attempt(1, AttemptOutcome::Running, counters),
        ]),
    );
    assert_eq!(created(&plan), None, "attempt 1 exists: nothing to create");
    assert_eq!(plan.delete, vec!["train-a0".to_string()]);
    assert_eq!(plan.status.attempt, 1);
    assert_eq!(
        plan.status.restarts, 1,
        "counters come from the attempt Job, not from a stale status"
    );
}

#[test]
fn suspend_deletes_the_attempt_and_resume_starts_the_next_one() {
    let mut j = job(SPEC);
    let running = decide(
        &j,
        &observed(vec![attempt(
            0,
            AttemptOutcome::Running,
            Counters::default(),
        )]),
    );
    j = after(j, &running);
    j.spec.run_policy.suspend = true;
    let suspended = decide(
        &j,
        &observed(vec![attempt(
            0,
            AttemptOutcome::Running,
            Counters::default(),
        )]),
    );
    assert_eq!(suspended.delete, vec!["train-a0".to_string()]);
    assert_eq!(suspended.status.phase, Some(TrainingPhase::Suspended));
    assert_eq!(condition(&suspended, "Suspended"), "True");
    assert_eq!(
        condition(&suspended, "Ready"),
        "True",
        "suspended is the declared state: kstatus Current"
    );
    assert_eq!(condition(&suspended, "Reconciling"), "False");
    assert_eq!(
        suspended.status.start_time, None,
        "the deadline clock stops"
    );

    j = after(j, &suspended);
    j.spec.run_policy.suspend = false;
    let resumed = decide(&j, &observed(vec![]));
    assert_eq!(
        created(&resumed),
        Some((1, Counters::default())),
        "a resume is a new attempt, not a counted restart"
    );
    assert!(resumed.transitions.iter().any(|t| t.reason == "Resumed"));

    // The status update's reconcile may come before the store has seen
    // attempt 1's Job: the same attempt again (its create answers 409),
    // never an attempt 2 beside it (seen in e2e on a loaded host).
    j = after(j, &resumed);
    let before_the_store = decide(&j, &observed(vec![]));
    assert_eq!(created(&before_the_store), Some((1, Counters::default())));
    assert_eq!(before_the_store.status.attempt, 1);
    assert!(before_the_store.delete.is_empty());
}

#[test]
fn a_queued_attempt_waits_for_admission() {
    let plan = decide(
        &job(SPEC),
        &observed(vec![attempt(
            0,
            AttemptOutcome::Queued,
            Counters::default(),
        )]),
    );
    assert_eq!(plan.status.phase, Some(TrainingPhase::Pending));
    let reconciling = plan
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Reconciling")
        .unwrap();
    assert_eq!(reconciling.reason, "WaitingForAdmission");
    assert_eq!(created(&plan), None);
}

#[test]
fn a_running_attempt_suspended_by_kueue_is_preempted_not_failed() {
    let running = decide(
        &job(SPEC),
        &observed(vec![attempt(
            0,
            AttemptOutcome::Running,
            Counters::default(),
        )]),
    );
    let j = after(job(SPEC), &running);
    let preempted = decide(
        &j,
        &observed(vec![attempt(
            0,
            AttemptOutcome::Queued,
            Counters::default(),
        )]),
    );
    assert_eq!(preempted.status.phase, Some(TrainingPhase::Pending));
    let reconciling = preempted
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Reconciling")
        .unwrap();
    assert_eq!(reconciling.reason, "Preempted");
    assert_eq!(created(&preempted), None);
    assert!(preempted.delete.is_empty());
    assert_eq!(
        (preempted.status.restarts, preempted.status.disruptions),
        (0, 0)
    );
    let event = &preempted.transitions[0];
    assert_eq!((event.reason.as_str(), event.warning), ("Preempted", false));
    // Still queued on the next look: still preempted, and no new Event.
    let j = after(j, &preempted);
    let still = decide(
        &j,
        &observed(vec![attempt(
            0,
            AttemptOutcome::Queued,
            Counters::default(),
        )]),
    );
    let reason = |p: &Plan| {
        p.status
            .conditions
            .iter()
            .find(|c| c.type_ == "Reconciling")
            .map(|c| c.reason.clone())
    };
    assert_eq!(reason(&still).as_deref(), Some("Preempted"));
    assert!(still.transitions.is_empty());
    // Admitted again: the same attempt runs.
    let j = after(j, &still);
    let back = decide(
        &j,
        &observed(vec![attempt(
            0,
            AttemptOutcome::Running,
            Counters::default(),
        )]),
    );
    assert_eq!(created(&back), None);
    assert_ne!(back.status.phase, Some(TrainingPhase::Pending));
}

#[test]
fn completion_succeeds_and_the_ttl_then_deletes_the_job() {
    let mut j = job(SPEC);
    j.spec.run_policy.ttl_seconds_after_finished = Some(60);
    let done = decide(
        &j,
        &observed(vec![attempt(
            0,
            AttemptOutcome::Complete,
            Counters::default(),
        )]),
    );
    assert_eq!(done.status.phase, Some(TrainingPhase::Succeeded));
    assert_eq!(condition(&done, "Ready"), "True");
    assert_eq!(done.requeue_after, Some(Duration::from_secs(60)));
    j = after(j, &done);
    let early = decide(
        &j,
        &Observed {
            now: "2026-11-28T12:00:30Z".parse().unwrap(),
            ..observed(vec![])
        },
    );
    assert!(!early.delete_self);
    assert_eq!(early.requeue_after, Some(Duration::from_secs(30)));
    let due = decide(
        &j,
        &Observed {
            now: "2026-11-28T12:01:00Z".parse().unwrap(),
            ..observed(vec![])
        },
    );
    assert!(due.delete_self);
}

/// A completed attempt's rank 0 leaves its last report (its termination
/// message): it replaces what the polls saw, which may predate the last
/// steps, and an early stop is said in the condition and the Event.
#[test]
fn completion_takes_rank_0s_last_report_and_names_an_early_stop() {
    let mut j = job(SPEC);
    let polled = TrainingProgress {
        step: 40,
        total_steps: 100,
        last_checkpoint_step: Some(40),
        ..TrainingProgress::default()
    };
    j.status = Some(MoETrainingJobStatus {
        phase: Some(TrainingPhase::Running),
        progress: Some(polled.clone()),
        ..MoETrainingJobStatus::default()
    });
    let complete = || {
        observed(vec![attempt(
            0,
            AttemptOutcome::Complete,
            Counters::default(),
        )])
    };
    // No report (a pod gone, or a worker that wrote none): the polls' stays.
    let done = decide(&j, &complete());
    assert_eq!(done.status.progress, Some(polled));
    assert_eq!(
        done.transitions[0].message,
        "training finished in attempt 0"
    );
    let last = TrainingProgress {
        step: 45,
        total_steps: 100,
        last_checkpoint_step: Some(45),
        stopped_early: true,
        ..TrainingProgress::default()
    };
    let done = decide(
        &j,
        &Observed {
            progress: Some(last.clone()),
            ..complete()
        },
    );
    assert_eq!(done.status.phase, Some(TrainingPhase::Succeeded));
    assert_eq!(done.status.progress, Some(last.clone()));
    assert!(
        done.transitions[0]
            .message
            .starts_with("training stopped early at step 45 of 100 in attempt 0"),
        "{:?}",
        done.transitions
    );
    let succeeded = done
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Succeeded");
    assert_eq!(
        succeeded.map(|c| c.message.as_str()),
        Some(done.transitions[0].message.as_str())
    );
    // With keepBest the message names the job's model.
    let mut keeping = j.clone();
    keeping.spec.training.evaluation = Some(
        serde_json::from_value(serde_json::json!({"intervalSteps": 5, "keepBest": true})).unwrap(),
    );
    let done = decide(
        &keeping,
        &Observed {
            progress: Some(TrainingProgress {
                best_checkpoint_step: Some(40),
                ..last
            }),
            ..complete()
        },
    );
    assert!(
        done.transitions[0].message.ends_with(
            "; its model is step 40's checkpoint, of the lowest held-out loss (training.evaluation.keepBest)"
        ),
        "{:?}",
        done.transitions
    );
}

const EXPORTED: &str = r#"
model: {hiddenSize: 64, layers: 2, attentionHeads: 4, kvHeads: 2, seqLen: 64, headDim: 32,
        qkNorm: perHead,
        moe: {experts: 8, topK: 2, expertHiddenSize: 32, router: softmax,
              balancing: {auxLossFree: {enabled: false}}}}
training: {steps: 10, globalBatchSize: 8}
parallelism: {nodes: 4}
checkpoint: {claimName: ckpt}
runPolicy: {ttlSecondsAfterFinished: 60}
output: {huggingface: {claimName: models, path: /exports/}}
"#;

#[test]
fn a_succeeded_job_exports_once_and_the_ttl_waits_for_the_export() {
    let mut j = succeeded(EXPORTED);

    // Past the TTL, but the export has not run: it starts, the job stays.
    let late: Timestamp = "2026-11-28T12:05:00Z".parse().unwrap();
    let at = |export: Option<ExportState>| Observed {
        now: late,
        export,
        ..observed(vec![])
    };
    let starting = decide(&j, &at(None));
    assert!(starting.export && !starting.delete_self);
    let output = starting.status.output.clone().expect("status.output");
    assert_eq!(
        (
            output.phase,
            output.path.as_str(),
            output.architecture.as_str()
        ),
        (
            OutputPhase::Exporting,
            "exports/ns/train",
            "Qwen3MoeForCausalLM"
        )
    );
    assert_eq!(starting.transitions[0].reason, "Exporting");
    j = after(j, &starting);
    let running = decide(&j, &at(Some(ExportState::Running)));
    assert!(running.export && !running.delete_self && running.transitions.is_empty());

    let exported = decide(&j, &at(Some(ExportState::Complete)));
    assert_eq!(
        exported.status.output.as_ref().map(|o| o.phase),
        Some(OutputPhase::Exported)
    );
    assert_eq!(exported.transitions[0].reason, "Exported");
    assert!(
        !exported.export && exported.delete_self,
        "now the TTL applies"
    );
    // Ended stays ended, its Job gone or not, and says so once.
    j = after(j, &exported);
    let again = decide(
        &j,
        &Observed {
            now: "2026-11-28T12:00:10Z".parse().unwrap(),
            ..at(None)
        },
    );
    assert!(!again.export && again.transitions.is_empty());
    assert_eq!(
        again.status.output.as_ref().map(|o| o.phase),
        Some(OutputPhase::Exported)
    );
}

/// `yaml`'s job once its first attempt completed and Succeeded was written.
fn succeeded(yaml: &str) -> MoETrainingJob {
    let j = job(yaml);
    let complete = attempt(0, AttemptOutcome::Complete, Counters::default());
    let done = decide(&j, &observed(vec![complete]));
    assert_eq!(done.status.phase, Some(TrainingPhase::Succeeded));
    assert!(!done.export, "the export waits for Succeeded to be written");
    after(j, &done)
}

#[test]
fn a_failed_export_says_why_and_keeps_the_job_succeeded() {
    let j = succeeded(EXPORTED);
    let failed = decide(
        &j,
        &Observed {
            export: Some(ExportState::Failed {
                message: Some("--model: no checkpoint".into()),
            }),
            ..observed(vec![])
        },
    );
    let output = failed.status.output.clone().expect("status.output");
    assert_eq!(output.phase, OutputPhase::Failed);
    assert_eq!(output.message.as_deref(), Some("--model: no checkpoint"));
    assert_eq!(failed.status.phase, Some(TrainingPhase::Succeeded));
    assert!(failed.transitions[0].warning && failed.transitions[0].reason == "ExportFailed");
    assert!(
        failed.transitions[0]
            .message
            .contains("--model: no checkpoint")
    );
    assert!(!failed.export);
}

#[test]
fn a_job_without_output_exports_nothing() {
    let later = decide(&succeeded(SPEC), &observed(vec![]));
    assert!(!later.export && later.status.output.is_none());
}

#[test]
fn the_active_deadline_fails_the_job() {
    let mut j = job(SPEC);
    j.spec.run_policy.active_deadline_seconds = Some(100);
    // Still starting (no progress polling yet): the next look is at the deadline.
    let mut starting = attempt(0, AttemptOutcome::Running, Counters::default());
    starting.ready = 2;
    let first = decide(&j, &observed(vec![starting]));
    assert_eq!(first.requeue_after, Some(Duration::from_secs(100)));
    j = after(j, &first);
    let late = decide(
        &j,
        &Observed {
            now: "2026-11-28T12:01:40Z".parse().unwrap(),
            ..observed(vec![attempt(
                0,
                AttemptOutcome::Running,
                Counters::default(),
            )])
        },
    );
    assert_eq!(late.status.phase, Some(TrainingPhase::Failed));
    assert!(late.delete.is_empty());
    // Once the Failed status is read back, the still-running attempt goes.
    let cleanup = decide(
        &after(j, &late),
        &observed(vec![attempt(
            0,
            AttemptOutcome::Running,
            Counters::default(),
        )]),
    );
    assert_eq!(cleanup.delete, vec!["train-a0".to_string()]);
    assert_eq!(created(&cleanup), None);
    let failed = late
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Failed")
        .unwrap();
    assert_eq!(failed.reason, "DeadlineExceeded");
}

#[test]
fn an_invalid_spec_stalls_without_failing_for_good() {
    let j = job(SPEC);
    let plan = decide(
        &j,
        &Observed {
            invalid: Some("spec.x: bad".into()),
            ..observed(vec![])
        },
    );
    assert_eq!(created(&plan), None);
    assert_eq!(condition(&plan, "Stalled"), "True");
    assert_eq!(condition(&plan, "Reconciling"), "False");
    assert_ne!(plan.status.phase, Some(TrainingPhase::Failed));
    assert_eq!(plan.transitions.len(), 1);
    // Reconciling it again changes nothing and emits nothing: no hot loop of events.
    let again = decide(
        &after(j, &plan),
        &Observed {
            invalid: Some("spec.x: bad".into()),
            ..observed(vec![])
        },
    );
    assert_eq!(again.status, plan.status);
    assert!(again.transitions.is_empty());
}

#[test]
fn stale_older_attempts_are_cleaned_up() {
    let plan = decide(
        &job(SPEC),
        &observed(vec![
            attempt(0, AttemptOutcome::Complete, Counters::default()),
            attempt(3, AttemptOutcome::Running, Counters::default()),
        ]),
    );
    assert_eq!(plan.delete, vec!["train-a0".to_string()]);
    assert_eq!(plan.status.attempt, 3);
}

#[test]
fn progress_from_rank_0_lands_in_the_status_but_a_new_timestamp_alone_does_not() {
    let j = job(SPEC);
    let report = super::super::progress::Report {
        step: 5,
        total_steps: 10,
        loss: Some(2.5),
        tokens_per_second: Some(100.0),
        seconds_per_step: None,
        mfu: None,
        last_checkpoint_step: None,
        best_checkpoint_step: None,
        expert_load: None,
        fabric: None,
        eval_loss: None,
        stopped_early: false,
    };
    let p = super::super::progress::to_status(&report, now());
    let running = vec![attempt(0, AttemptOutcome::Running, Counters::default())];
    let first = decide(
        &j,
        &Observed {
            progress: Some(p.clone()),
            ..observed(running.clone())
        },
    );
    assert_eq!(
        first.status.progress.as_ref().map(|p| p.display.as_str()),
        Some("5/10 (50%)")
    );
    assert_eq!(
        first.requeue_after,
        Some(super::super::progress::POLL_INTERVAL)
    );
    let later = super::super::progress::to_status(&report, "2026-11-28T12:00:30Z".parse().unwrap());
    let second = decide(
        &after(j, &first),
        &Observed {
            progress: Some(later),
            ..observed(running)
        },
    );
    assert_eq!(second.status, first.status);
}

#[test]
fn failing_a_job_never_lets_a_stale_reconcile_start_another_attempt() {
    // Reconciles may run on a copy of the resource older than the status just
    // written. The failing reconcile therefore keeps the failed attempt, so a
    // stale copy (still Running) sees the same failed attempt and decides the
    // same thing, instead of seeing no attempt and starting a new one.
    let mut j = job(SPEC);
    j.spec.run_policy.failure_rules = vec![FailureRule {
        action: FailureAction::FailJob,
        on_exit_codes: ExitCodes {
            operator: ExitCodeOperator::In,
            values: vec![3],
        },
    }];
    let running = decide(
        &j,
        &observed(vec![attempt(
            0,
            AttemptOutcome::Running,
            Counters::default(),
        )]),
    );
    let stale = after(j, &running);
    let failed = vec![attempt(0, exit(3), Counters::default())];
    let first = decide(&stale, &observed(failed.clone()));
    assert_eq!(first.status.phase, Some(TrainingPhase::Failed));
    assert!(first.delete.is_empty() && first.create.is_none());
    let again = decide(&stale, &observed(failed.clone()));
    assert_eq!(
        created(&again),
        None,
        "a stale copy must not start attempt 1"
    );
    let fresh = decide(&after(stale, &first), &observed(failed));
    assert_eq!(fresh.delete, vec!["train-a0".to_string()]);
    assert_eq!(created(&fresh), None);
}

fn at(time: &str) -> Timestamp {
    time.parse().unwrap()
}

fn report_at(step: i64, time: &str) -> TrainingProgress {
    let report = super::super::progress::Report {
        step,
        total_steps: 10,
        loss: Some(2.5),
        tokens_per_second: Some(100.0),
        seconds_per_step: None,
        mfu: None,
        last_checkpoint_step: None,
        best_checkpoint_step: None,
        expert_load: None,
        fabric: None,
        eval_loss: None,
        stopped_early: false,
    };
    super::super::progress::to_status(&report, at(time))
}

fn reason_of(plan: &Plan, type_: &str) -> String {
    plan.status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.reason.clone())
        .unwrap_or_default()
}

#[test]
fn the_hang_watchdog_restarts_a_gang_whose_rank_0_stops_advancing() {
    let mut j = job(SPEC);
    j.spec.run_policy.progress_deadline_seconds = Some(60);
    let running = || vec![attempt(0, AttemptOutcome::Running, Counters::default())];
    let look = |j: &MoETrainingJob, time: &str, progress: Option<TrainingProgress>| {
        decide(
            j,
            &Observed {
                now: at(time),
                progress,
                ..observed(running())
            },
        )
    };
    // 12:00:00 the gang runs; no report yet.
    let start = look(&j, "2026-11-28T12:00:00Z", None);
    assert_eq!(start.status.phase, Some(TrainingPhase::Running));
    assert_eq!(start.requeue_after, Some(Duration::from_secs(30)));
    j = after(j, &start);
    // 12:00:50 step 5 arrives: the clock starts again from it.
    let stepped = look(
        &j,
        "2026-11-28T12:00:50Z",
        Some(report_at(5, "2026-11-28T12:00:50Z")),
    );
    assert_eq!(created(&stepped), None);
    j = after(j, &stepped);
    // 12:01:40 still step 5: 50 s quiet, the next look is at the deadline.
    let quiet = look(
        &j,
        "2026-11-28T12:01:40Z",
        Some(report_at(5, "2026-11-28T12:01:40Z")),
    );
    assert_eq!(created(&quiet), None);
    assert_eq!(
        quiet.status, stepped.status,
        "an unchanged report is no write"
    );
    assert_eq!(quiet.requeue_after, Some(Duration::from_secs(10)));
    j = after(j, &quiet);
    // 12:01:50: 60 s without a new step. Hung: restarted, counted.
    let hung = look(
        &j,
        "2026-11-28T12:01:50Z",
        Some(report_at(5, "2026-11-28T12:01:50Z")),
    );
    assert_eq!(
        created(&hung),
        Some((
            1,
            Counters {
                restarts: 1,
                disruptions: 0
            }
        ))
    );
    assert_eq!(hung.delete, vec!["train-a0".to_string()]);
    assert_eq!(hung.status.phase, Some(TrainingPhase::Restarting));
    assert_eq!(reason_of(&hung, "Restarting"), "ProgressDeadlineExceeded");
    let event = hung.transitions.iter().find(|t| t.warning).unwrap();
    assert_eq!(event.reason, "ProgressDeadlineExceeded");
    assert!(
        event
            .message
            .contains("no progress for 60s (last at step 5)"),
        "{}",
        event.message
    );
    // The next attempt's clock starts when it runs, not at attempt 0's
    // last report (still in the status).
    j = after(j, &hung);
    let next = decide(
        &j,
        &Observed {
            now: at("2026-11-28T12:05:00Z"),
            ..observed(vec![attempt(
                1,
                AttemptOutcome::Running,
                Counters {
                    restarts: 1,
                    disruptions: 0,
                },
            )])
        },
    );
    assert_eq!(next.status.phase, Some(TrainingPhase::Running));
    assert_eq!(created(&next), None);
}

#[test]
fn a_gang_that_never_reports_is_hung_at_the_deadline_and_the_budget_still_bounds_it() {
    let mut j = job(SPEC);
    j.spec.run_policy.progress_deadline_seconds = Some(60);
    let counters = Counters {
        restarts: 2,
        disruptions: 0,
    };
    let running = || vec![attempt(2, AttemptOutcome::Running, counters)];
    let start = decide(&j, &observed(running()));
    j = after(j, &start);
    // Rank 0 does not answer: past the deadline it gets one more poll.
    let early = decide(
        &j,
        &Observed {
            now: at("2026-11-28T12:01:29Z"),
            ..observed(running())
        },
    );
    assert_eq!(early.status.phase, Some(TrainingPhase::Running));
    assert_eq!(early.requeue_after, Some(Duration::from_secs(1)));
    let hung = decide(
        &j,
        &Observed {
            now: at("2026-11-28T12:01:30Z"),
            ..observed(running())
        },
    );
    // backoffLimit 2 is spent: the job fails, saying why.
    assert_eq!(created(&hung), None);
    assert_eq!(hung.status.phase, Some(TrainingPhase::Failed));
    assert_eq!(reason_of(&hung, "Failed"), "BackoffLimitExceeded");
    let failed = hung
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Failed")
        .unwrap();
    assert!(
        failed.message.contains("no report from this attempt"),
        "{}",
        failed.message
    );
    // Without the watchdog the same silence is no verdict.
    j.spec.run_policy.progress_deadline_seconds = None;
    let unwatched = decide(
        &j,
        &Observed {
            now: at("2026-11-28T13:00:00Z"),
            ..observed(running())
        },
    );
    assert_eq!(unwatched.status.phase, Some(TrainingPhase::Running));
}

#[test]
fn a_restart_says_why_the_worker_exited_in_its_words_or_by_its_code() {
    let restart_message = |code: i32, message: Option<&str>| {
        let failed = AttemptOutcome::Failed {
            cause: FailureCause::ExitCode {
                pod: "train-a0-1-x".into(),
                code,
                message: message.map(Into::into),
                download: false,
            },
        };
        let plan = decide(
            &job(SPEC),
            &observed(vec![attempt(0, failed, Counters::default())]),
        );
        plan.transitions
            .iter()
            .find(|t| t.reason == "GangRestart" && t.warning)
            .map(|t| t.message.clone())
            .unwrap()
    };
    let worded = restart_message(4, Some("rank 3: fabric check: 812 MB/s is below 20000"));
    assert!(
        worded.contains("pod train-a0-1-x exited with code 4: rank 3: fabric check: 812 MB/s"),
        "{worded}"
    );
    let coded = restart_message(4, None);
    assert!(
        coded.contains("exited with code 4 (the gang's all-to-all bandwidth is below parallelism.fabricCheck.minAllToAllMBps)"),
        "{coded}"
    );
    assert!(restart_message(2, None).contains("(a configuration or data error)"));
    let plain = restart_message(137, None);
    assert!(plain.contains("exited with code 137;"), "{plain}");
}

#[test]
fn the_hang_watchdog_leaves_a_finishing_gang_alone() {
    let mut j = job(SPEC);
    j.spec.run_policy.progress_deadline_seconds = Some(60);
    let start = decide(
        &j,
        &observed(vec![attempt(
            0,
            AttemptOutcome::Running,
            Counters::default(),
        )]),
    );
    j = after(j, &start);
    let late = "2026-11-28T12:10:00Z";
    // The last step reported long ago: rank 0 writes the final checkpoint.
    let done = decide(
        &j,
        &Observed {
            now: at(late),
            progress: Some(report_at(10, "2026-11-28T12:00:10Z")),
            ..observed(vec![attempt(
                0,
                AttemptOutcome::Running,
                Counters::default(),
            )])
        },
    );
    assert_eq!(created(&done), None);
    assert_eq!(done.status.phase, Some(TrainingPhase::Running));
    // Some pods have completed: the gang is ending.
    let mut ending = attempt(0, AttemptOutcome::Running, Counters::default());
    (ending.ready, ending.succeeded) = (2, 2);
    let plan = decide(
        &j,
        &Observed {
            now: at(late),
            ..observed(vec![ending])
        },
    );
    assert_eq!(created(&plan), None);
    // A report of the last step from an earlier attempt does not spare the
    // next one: attempt 1 (resumed from a checkpoint) never reports.
    let mut earlier = j.clone();
    earlier.status.as_mut().unwrap().progress = Some(report_at(10, "2026-11-28T11:00:00Z"));
    earlier.status.as_mut().unwrap().phase = Some(TrainingPhase::Restarting);
    let next = || vec![attempt(1, AttemptOutcome::Running, Counters::default())];
    let runs = decide(&earlier, &observed(next()));
    assert_eq!(runs.status.phase, Some(TrainingPhase::Running));
    let silent = decide(
        &after(earlier, &runs),
        &Observed {
            now: at("2026-11-28T12:01:30Z"),
            ..observed(next())
        },
    );
    assert_eq!(silent.status.phase, Some(TrainingPhase::Restarting));
    // Mid-run, the same silence is a hang.
    let hung = decide(
        &j,
        &Observed {
            now: at(late),
            progress: Some(report_at(9, "2026-11-28T12:00:10Z")),
            ..observed(vec![attempt(
                0,
                AttemptOutcome::Running,
                Counters::default(),
            )])
        },
    );
    assert_eq!(hung.status.phase, Some(TrainingPhase::Restarting));
}

/// `model.initFrom.fromTrainingJob`: no attempt while the job it starts
/// from runs (Pending, `WaitingForTrainingJob`, looked at again); once it
/// resolves, the checkpoint is pinned in the status and the attempt comes
/// with the next reconcile (its ConfigMap rendered with it); one it cannot
/// start from stalls the job, naming why, until the spec changes.
#[test]
fn a_job_starting_from_another_waits_for_it_then_pins_its_checkpoint() {
    let j = job(SPEC);
    let waiting = decide(
        &j,
        &Observed {
            init_source: InitSource::Waiting {
                reason: "WaitingForTrainingJob",
                message: "MoETrainingJob pretrain is Running".into(),
            },
            ..observed(vec![])
        },
    );
    assert_eq!(created(&waiting), None);
    assert_eq!(waiting.status.phase, Some(TrainingPhase::Pending));
    assert_eq!(reason_of(&waiting, "Reconciling"), "WaitingForTrainingJob");
    assert_eq!(waiting.requeue_after, Some(Duration::from_secs(30)));
    assert_eq!(waiting.status.start_time, None, "no deadline clock yet");

    let at = moe_crds::InitCheckpoint {
        job: "ml/pretrain".into(),
        uid: "u".into(),
        step: 1000,
        claim_name: "ckpt".into(),
        path: "runs/ml/pretrain/checkpoints/step-00001000".into(),
    };
    let resolved = decide(
        &j,
        &Observed {
            init_source: InitSource::Ready(at.clone()),
            ..observed(vec![])
        },
    );
    assert_eq!(
        created(&resolved),
        None,
        "not with a ConfigMap rendered without it"
    );
    assert_eq!(resolved.status.init_checkpoint, Some(at));
    assert_eq!(resolved.requeue_after, Some(Duration::from_secs(1)));
    let started = decide(&after(j.clone(), &resolved), &observed(vec![]));
    assert_eq!(created(&started).map(|c| c.0), Some(0));

    let stalled = decide(
        &j,
        &Observed {
            init_source: InitSource::Unusable {
                reason: "ModelIncompatible",
                message: "spec.model must be MoETrainingJob pretrain's: model.hiddenSize is 64 there, 96 here".into(),
            },
            ..observed(vec![])
        },
    );
    assert_eq!(created(&stalled), None);
    assert_eq!(condition(&stalled, "Stalled"), "True");
    assert_eq!(reason_of(&stalled, "Stalled"), "ModelIncompatible");
    assert!(
        stalled
            .transitions
            .iter()
            .any(|t| t.warning && t.reason == "ModelIncompatible")
    );
}
