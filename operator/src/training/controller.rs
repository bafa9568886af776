//! The MoETrainingJob controller: thin I/O around the pure steps.
//!
//! reconcile = observe (stores; pods only while an attempt starts or
//!             after it failed)
//!           → validate (pure) → decide (pure) → build (pure)
//!           → apply children → create/delete attempts → status (only if changed) → events

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    ConfigMap, ContainerStateTerminated, ContainerStatus, Pod, Service,
};
use k8s_openapi::api::scheduling::v1alpha2::PodGroup;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use moe_crds::{MoETrainingJob, MoETrainingJobStatus, TrainingPhase};
use tracing::{info, warn};

use super::build::{self, BuildContext, Counters};
use super::decide::{
    AttemptOutcome, AttemptState, ExportState, FailureCause, Observed, Plan, SpareState, decide,
};
use super::init_source;
use super::pacing::{self, StatusWrite};
use super::progress;
use super::validate::validate;
use crate::gang;
use crate::hub;
use crate::labels;
use crate::metrics::Metrics;
pub use crate::reconcile::Error;
use crate::reconcile::{
    Backoff, api, apply_if_changed, apply_status, create_once, delete_if_present, reflected,
};

/// Shared state of the controller.
pub struct Context {
    pub client: Client,
    pub build: BuildContext,
    pub jobs: Store<Job>,
    pub config_maps: Store<ConfigMap>,
    pub services: Store<Service>,
    /// The attempts' PodGroups, when the Workload API schedules gangs.
    pub pod_groups: Option<Store<PodGroup>>,
    /// Every MoETrainingJob (the controller's own cache): the jobs others
    /// start from (`model.initFrom.fromTrainingJob`).
    pub training_jobs: Store<MoETrainingJob>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Consecutive failures per object, for exponential backoff.
    failures: Backoff<MoETrainingJob>,
    /// Validation verdict per object uid and generation: the spec only
    /// changes with the generation, and compiling the CEL rules on every
    /// reconcile (each pod status change triggers one) would dominate CPU.
    verdicts: Mutex<HashMap<String, Verdict>>,
    /// When this process last wrote each object's status (by uid), to pace
    /// tally-only updates (see [`super::pacing`]).
    status_writes: Mutex<HashMap<String, Instant>>,
    /// Rank 0's pod IP per (uid, attempt). An attempt's pods are never
    /// replaced (a failed pod fails the attempt), so one lookup per attempt
    /// serves every progress poll; a list per poll cost the apiserver more
    /// than everything else the operator does.
    rank0_ips: Mutex<HashMap<(String, i32), String>>,
}

/// Periodic resync: repairs anything a missed watch event left behind.
const RESYNC: Duration = Duration::from_secs(600);

/// Runs the controller until `shutdown` resolves. `namespace`: watch one namespace, or all.
pub async fn run(
    client: Client,
    namespace: Option<String>,
    build: BuildContext,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    // Children are watched with a label selector and reflected into stores, so
    // reconcile reads them from memory: no API reads, and no writes when nothing changed.
    let children = watcher::Config::default().labels(&labels::managed_selector());
    let (jobs, job_stream) = reflected(api::<Job>(&client, &namespace), children.clone());
    let (config_maps, cm_stream) =
        reflected(api::<ConfigMap>(&client, &namespace), children.clone());
    let (services, svc_stream) = reflected(api::<Service>(&client, &namespace), children.clone());
    // The scheduler's verdict on a gang is on its PodGroup: watched only when
    // the operator makes them (the API may not be served otherwise).
    let (pod_groups, pg_stream) = if build.workload_api() {
        let (store, stream) = reflected(api::<PodGroup>(&client, &namespace), children);
        (Some(store), stream.boxed())
    } else {
        (None, futures::stream::pending().boxed())
    };

    // One watch of MoETrainingJobs feeds both what the controller reconciles
    // and what wakes a job waiting on another (`model.initFrom.
    // fromTrainingJob`): the store is updated before either subscriber
    // sees an object, so a woken job reads the other one as it now is.
    let (jobs_store, writer) = reflector::store_shared(SHARED_STREAM_BUFFER);
    let (roots, sources) = match (writer.subscribe(), writer.subscribe()) {
        (Some(roots), Some(sources)) => (roots, sources),
        _ => unreachable!("a shared store hands out subscribers"),
    };
    let root_watch = watcher(
        api::<MoETrainingJob>(&client, &namespace),
        watcher::Config::default().any_semantic(),
    )
    .default_backoff()
    .reflect_shared(writer)
    .for_each(|event| async move {
        if let Err(error) = event {
            warn!(%error, "watching MoETrainingJobs (retrying with backoff)");
        }
    });
    let controller = Controller::for_shared_stream(roots, jobs_store.clone());
    let ctx = Arc::new(Context {
        client: client.clone(),
        build,
        jobs,
        config_maps,
        services,
        pod_groups,
        training_jobs: jobs_store.clone(),
        recorder,
        metrics,
        failures: Backoff::default(),
        verdicts: Mutex::new(HashMap::new()),
        status_writes: Mutex::new(HashMap::new()),
        rank0_ips: Mutex::new(HashMap::new()),
    });
    let reconciling = controller
        .owns_stream(job_stream)
        .owns_stream(cm_stream)
        .owns_stream(svc_stream)
        .owns_stream(pg_stream)
        // A job starting from another reconciles when that one ends; its
        // poll (INIT_SOURCE_POLL) only backs this up.
        .watches_shared_stream(sources, move |source| waiting_on(&jobs_store, &source))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                // ObjectNotFound and friends: the object went away; nothing to do.
                tracing::debug!(error = %e, "reconcile dispatch");
            }
        });
    // The controller ends on shutdown; the watch only with it.
    tokio::select! {
        () = reconciling => {}
        () = root_watch => {}
    }
}

/// How many MoETrainingJob events the shared watch holds for a subscriber
/// that is behind before the watch waits for it.
const SHARED_STREAM_BUFFER: usize = 1024;

fn error_policy(job: Arc<MoETrainingJob>, err: &Error, ctx: Arc<Context>) -> Action {
    // 1s, 2s, 4s, ... capped at 5 minutes.
    let delay = ctx.failures.failed(job.as_ref());
    warn!(job = %job.name_any(), namespace = ?job.namespace(), error = %err, retry_in = ?delay, "reconcile failed");
    ctx.metrics.reconcile_error(err.metric_label());
    Action::requeue(delay)
}

async fn reconcile(job: Arc<MoETrainingJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&job, &ctx).await;
    ctx.metrics.reconciled(started.elapsed());
    if result.is_ok() {
        ctx.failures.succeeded(job.as_ref());
    }
    result
}

async fn reconcile_inner(job: &MoETrainingJob, ctx: &Context) -> Result<Action, Error> {
    if job.meta().deletion_timestamp.is_some() {
        let uid = job.uid().unwrap_or_default();
        ctx.verdicts.lock().expect("not poisoned").remove(&uid);
        ctx.status_writes.lock().expect("not poisoned").remove(&uid);
        ctx.rank0_ips
            .lock()
            .expect("not poisoned")
            .retain(|(owner, _), _| *owner != uid);
        // Children go with it by owner-reference garbage collection.
        return Ok(Action::await_change());
    }
    let ns = job.namespace().unwrap_or_default();
    let invalid = verdict(ctx, job);
    let attempts = observe_attempts(ctx, job, &ns).await?;
    let progress = read_progress(ctx, job, &ns, &attempts).await?;
    let export = observe_export(ctx, job, &ns).await?;
    let plan = decide(
        job,
        &Observed {
            attempts,
            now: Timestamp::now(),
            invalid: invalid.clone(),
            progress,
            spares: observe_spares(ctx, job, &ns),
            init_source: init_source::resolve(job, init_source_job(ctx, job, &ns).as_deref()),
            spares_show_room: gang::spares_show_room(
                ctx.build
                    .gang(&job.spec.placement, job.spec.parallelism.nodes),
                &job.spec.placement,
            ),
            export,
        },
    );

    let finished = plan.status.phase.is_some_and(|p| p.is_finished());
    // The writes of one reconcile are independent of each other: issue them
    // together, so a busy apiserver costs one round trip, not five.
    let children = async {
        if invalid.is_none() && !finished && !plan.delete_self {
            futures::try_join!(
                apply_if_changed(
                    &ctx.client,
                    &ctx.metrics,
                    &ns,
                    build::config_map(job),
                    &ctx.config_maps
                ),
                apply_if_changed(
                    &ctx.client,
                    &ctx.metrics,
                    &ns,
                    build::service(job),
                    &ctx.services
                ),
            )?;
        }
        Ok::<(), Error>(())
    };
    futures::try_join!(children, execute(ctx, job, &ns, &plan))?;
    if plan.delete_self {
        return Ok(Action::await_change());
    }
    let events = futures::future::join_all(
        plan.transitions
            .iter()
            .map(|t| publish(ctx, job, t.warning, &t.reason, &t.message)),
    );
    let (status, _) = futures::join!(write_status(ctx, job, &plan.status), events);
    let status_deferred = status?;
    ctx.metrics.observe_phase(job, plan.status.phase);
    let requeue_after = match (plan.requeue_after, status_deferred) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Ok(match requeue_after {
        Some(d) => Action::requeue(d.min(RESYNC)),
        None => Action::requeue(RESYNC),
    })
}

/// The jobs that start from `source` (`model.initFrom.fromTrainingJob`)
/// and have not pinned its checkpoint yet, once `source` has ended (what
/// they wait for): most events are running jobs' progress, which wake none.
fn waiting_on(
    store: &Store<MoETrainingJob>,
    source: &MoETrainingJob,
) -> Vec<ObjectRef<MoETrainingJob>> {
    let ended = source
        .status
        .as_ref()
        .and_then(|s| s.phase)
        .is_some_and(TrainingPhase::is_finished);
    if !ended {
        return Vec::new();
    }
    let (ns, name) = (source.namespace(), source.name_any());
    store
        .state()
        .into_iter()
        .filter(|j| {
            j.namespace() == ns
                && j.status
                    .as_ref()
                    .is_none_or(|s| s.init_checkpoint.is_none())
                && j.spec
                    .model
                    .init_from
                    .as_ref()
                    .and_then(|i| i.from_training_job.as_ref())
                    .is_some_and(|f| f.name == name)
        })
        .map(|j| ObjectRef::from_obj(j.as_ref()))
        .collect()
}

/// The job `job`'s `model.initFrom.fromTrainingJob` names, from the cache.
fn init_source_job(ctx: &Context, job: &MoETrainingJob, ns: &str) -> Option<Arc<MoETrainingJob>> {
    let from = job
        .spec
        .model
        .init_from
        .as_ref()?
        .from_training_job
        .as_ref()?;
    ctx.training_jobs
        .get(&ObjectRef::new(&from.name).within(ns))
}

/// A validation result and the generation it was computed for.
struct Verdict {
    generation: Option<i64>,
    invalid: Option<String>,
}

/// [`validate`], once per generation of each object.
fn verdict(ctx: &Context, job: &MoETrainingJob) -> Option<String> {
    let uid = job.uid().unwrap_or_default();
    let generation = job.metadata.generation;
    if let Some(v) = ctx.verdicts.lock().expect("not poisoned").get(&uid)
        && v.generation == generation
    {
        return v.invalid.clone();
    }
    let invalid = validate(job).err();
    let verdict = Verdict {
        generation,
        invalid: invalid.clone(),
    };
    ctx.verdicts
        .lock()
        .expect("not poisoned")
        .insert(uid, verdict);
    invalid
}

/// Progress from rank 0 of the current attempt, once its whole gang is up;
/// once it has completed, rank 0's last report (its termination message).
async fn read_progress(
    ctx: &Context,
    job: &MoETrainingJob,
    ns: &str,
    attempts: &[AttemptState],
) -> Result<Option<moe_crds::TrainingProgress>, Error> {
    let Some(cur) = attempts
        .iter()
        .filter(|a| !a.being_deleted)
        .max_by_key(|a| a.attempt)
    else {
        return Ok(None);
    };
    let rank0 = || {
        format!(
            "{}={},{}={},{}=0",
            labels::JOB_NAME,
            job.name_any(),
            labels::ATTEMPT,
            cur.attempt,
            labels::JOB_COMPLETION_INDEX
        )
    };
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    match cur.outcome {
        AttemptOutcome::Running if cur.ready >= cur.nodes => {}
        // Read once: the status says Succeeded after this reconcile.
        AttemptOutcome::Complete
            if job.status.as_ref().and_then(|s| s.phase) != Some(TrainingPhase::Succeeded) =>
        {
            let list = pods.list(&ListParams::default().labels(&rank0())).await?;
            ctx.metrics.api_call("list", "pods");
            let report = list.items.iter().find_map(progress::final_report);
            return Ok(report.map(|r| progress::to_status(&r, Timestamp::now())));
        }
        _ => return Ok(None),
    }
    let key = (job.uid().unwrap_or_default(), cur.attempt);
    let cached = ctx
        .rank0_ips
        .lock()
        .expect("not poisoned")
        .get(&key)
        .cloned();
    let ip = match cached {
        Some(ip) => ip,
        None => {
            // From the apiserver's watch cache (resourceVersion 0), not a
            // quorum read through etcd: any pod that is ready has its IP there.
            let list = pods
                .list(&ListParams::default().labels(&rank0()).match_any())
                .await?;
            ctx.metrics.api_call("list", "pods");
            let ip = list
                .items
                .iter()
                .find_map(|p| p.status.as_ref()?.pod_ip.clone());
            let Some(ip) = ip else { return Ok(None) };
            ctx.rank0_ips
                .lock()
                .expect("not poisoned")
                .insert(key, ip.clone());
            ip
        }
    };
    let report = progress::fetch(&ip, moe_crds::contract::METRICS_PORT).await;
    Ok(report.map(|r| progress::to_status(&r, Timestamp::now())))
}

/// Whether `candidate` is a child Job of `job` (its controller) in `ns`.
fn owned_by(candidate: &Job, job: &MoETrainingJob, ns: &str) -> bool {
    let uid = job.uid();
    candidate.namespace().as_deref() == Some(ns)
        && candidate
            .owner_references()
            .iter()
            .any(|o| Some(&o.uid) == uid.as_ref() && o.controller == Some(true))
}

/// The export Job of `job`, from the store; a failed one's pod is read
/// for its message. Not looked at once `status.output` says it ended:
/// the decision keeps what it recorded.
async fn observe_export(
    ctx: &Context,
    job: &MoETrainingJob,
    ns: &str,
) -> Result<Option<ExportState>, Error> {
    let ended = job
        .status
        .as_ref()
        .and_then(|s| s.output.as_ref())
        .is_some_and(|o| o.phase != moe_crds::OutputPhase::Exporting);
    if ended {
        return Ok(None);
    }
    let Some(export) = ctx
        .jobs
        .get(&ObjectRef::new(&build::export_job_name(job)).within(ns))
        .filter(|j| owned_by(j, job, ns))
    else {
        return Ok(None);
    };
    let has = |t: &str| {
        export
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == t && c.status == "True"))
    };
    if has("Complete") {
        return Ok(Some(ExportState::Complete));
    }
    if !(has("Failed") || has("FailureTarget")) {
        return Ok(Some(ExportState::Running));
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let selector = format!(
        "{}={},{}={}",
        labels::JOB_NAME,
        job.name_any(),
        labels::ROLE,
        labels::ROLE_EXPORT
    );
    let list = pods.list(&ListParams::default().labels(&selector)).await?;
    ctx.metrics.api_call("list", "pods");
    Ok(Some(ExportState::Failed {
        message: list.items.iter().find_map(termination_message),
    }))
}

/// The spare Jobs of `job`, from the store.
fn observe_spares(ctx: &Context, job: &MoETrainingJob, ns: &str) -> Vec<SpareState> {
    ctx.jobs
        .state()
        .iter()
        .filter(|j| owned_by(j, job, ns))
        .filter(|j| j.labels().get(labels::ROLE).map(String::as_str) == Some(labels::ROLE_SPARE))
        .filter_map(|j| {
            Some(SpareState {
                name: j.name_any(),
                attempt: j.labels().get(labels::SPARE_FOR_ATTEMPT)?.parse().ok()?,
                ready: j.status.as_ref().and_then(|s| s.ready).unwrap_or(0),
                being_deleted: j.meta().deletion_timestamp.is_some(),
            })
        })
        .collect()
}

/// The attempt Jobs of `job`, from the store. An attempt's pods are listed
/// only while it starts (which the scheduler cannot place, their downloads)
/// or until every pod has reported its Hub dataset's commit, and once it failed.
async fn observe_attempts(
    ctx: &Context,
    job: &MoETrainingJob,
    ns: &str,
) -> Result<Vec<AttemptState>, Error> {
    let mut out = Vec::new();
    for j in ctx.jobs.state() {
        if !owned_by(&j, job, ns) {
            continue;
        }
        let Some(attempt) = j.labels().get(labels::ATTEMPT).and_then(|a| a.parse().ok()) else {
            continue;
        };
        let annotation = |k: &str| {
            j.annotations()
                .get(k)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let status = j.status.clone().unwrap_or_default();
        let suspended = j.spec.as_ref().and_then(|s| s.suspend) == Some(true);
        let has = |t: &str| {
            status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == t && c.status == "True")
        };
        let outcome = if has("Complete") {
            AttemptOutcome::Complete
        } else if has("Failed") || has("FailureTarget") {
            let cause = failure_cause(ctx, ns, &job.name_any(), attempt, &status).await?;
            AttemptOutcome::Failed {
                cause: while_suspended(cause, suspended),
            }
        } else if suspended {
            AttemptOutcome::Queued
        } else {
            AttemptOutcome::Running
        };
        let nodes = j
            .spec
            .as_ref()
            .and_then(|s| s.completions)
            .unwrap_or(job.spec.parallelism.nodes);
        // The scheduler's verdict on the attempt's gang, while it is not
        // placed whole (or Kueue's, while it has not admitted it). A gang
        // with a PodGroup is placed whole, and the group has the verdict;
        // the pods of others are placed one by one, and have theirs.
        let pod_group = ctx
            .pod_groups
            .as_ref()
            .and_then(|store| store.get(&ObjectRef::new(&j.name_any()).within(ns)));
        let mut unplaced = match outcome {
            AttemptOutcome::Queued => Some(gang::Unplaced {
                message: "waiting in its queue".into(),
                since: suspended_since(&j),
                bound: None,
            }),
            _ => pod_group.as_deref().and_then(gang::unplaced_group),
        };
        // While the attempt's pods start (pods are read: which the
        // scheduler cannot place, a Hub dataset's downloads), and until
        // every pod has said which commit of a Hub dataset it fetched.
        let known = job
            .status
            .as_ref()
            .is_some_and(|s| s.attempt == attempt && !s.data_commits.is_empty());
        let hub_data = job.spec.data.huggingface.is_some();
        let starting = status.ready.unwrap_or(0) + status.succeeded.unwrap_or(0) < nodes;
        let (downloading, data_commits) =
            if outcome == AttemptOutcome::Running && (starting || (hub_data && !known)) {
                // Polled while the attempt starts: the watch cache's copy is
                // fresh enough and costs etcd no read per poll.
                let pods = attempt_pods(ctx, ns, &job.name_any(), attempt, Read::Cached).await?;
                if pod_group.is_none() && starting {
                    unplaced = gang::unplaced_pods(&pods);
                }
                let reports = hub::commits_of(&pods);
                let reported: usize = reports.values().map(Vec::len).sum();
                (
                    hub::downloads_of(&pods).running,
                    (hub_data && reported >= nodes as usize).then(|| reports.into_keys().collect()),
                )
            } else {
                (0, None)
            };
        out.push(AttemptState {
            attempt,
            name: j.name_any(),
            nodes,
            created: j.metadata.creation_timestamp.as_ref().map(|t| t.0),
            failed_at: status
                .conditions
                .iter()
                .flatten()
                .filter(|c| {
                    (c.type_ == "Failed" || c.type_ == "FailureTarget") && c.status == "True"
                })
                .filter_map(|c| c.last_transition_time.as_ref().map(|t| t.0))
                .min(),
            unplaced,
            downloading,
            data_commits,
            counters: Counters {
                restarts: annotation(labels::RESTARTS),
                disruptions: annotation(labels::DISRUPTIONS),
            },
            being_deleted: j.meta().deletion_timestamp.is_some(),
            outcome,
            active: status.active.unwrap_or(0),
            ready: status.ready.unwrap_or(0),
            succeeded: status.succeeded.unwrap_or(0),
            failed: status.failed.unwrap_or(0),
        });
    }
    Ok(out)
}

/// Since when a queued attempt's Job has been suspended (its `Suspended`
/// condition), else since it was created.
fn suspended_since(job: &Job) -> Option<Timestamp> {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| {
            cs.iter()
                .find(|c| c.type_ == "Suspended" && c.status == "True")
        })
        .and_then(|c| c.last_transition_time.as_ref())
        .or(job.metadata.creation_timestamp.as_ref())
        .map(|t| t.0)
}

/// Why a failed attempt failed: the pod failure policy rule that failed the
/// Job, as the Job controller recorded it; without one, a disrupted pod
/// explains everything (other ranks then fail on collective timeouts), else
/// the first failed worker's exit code.
async fn failure_cause(
    ctx: &Context,
    ns: &str,
    name: &str,
    attempt: i32,
    status: &k8s_openapi::api::batch::v1::JobStatus,
) -> Result<FailureCause, Error> {
    Ok(classify_failure(
        &attempt_pods(ctx, ns, name, attempt, Read::Fresh).await?,
        status,
    ))
}

/// How current a list must be.
enum Read {
    /// A quorum read: what etcd holds now (a failure's pods, read once).
    Fresh,
    /// The apiserver's watch cache (polls while an attempt starts).
    Cached,
}

/// The pods of attempt `attempt` of job `name`.
async fn attempt_pods(
    ctx: &Context,
    ns: &str,
    name: &str,
    attempt: i32,
    read: Read,
) -> Result<Vec<Pod>, Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let selector = format!("{}={name},{}={attempt}", labels::JOB_NAME, labels::ATTEMPT);
    let params = ListParams::default().labels(&selector);
    let params = match read {
        Read::Fresh => params,
        Read::Cached => params.match_any(),
    };
    let list = pods.list(&params).await?;
    ctx.metrics.api_call("list", "pods");
    Ok(list.items)
}

/// A gang that failed while its Job was suspended (Kueue preempting or
/// evicting it) failed of the suspension: the Job controller stopped its
/// pods, whatever their exit codes say. Under load the Job controller can
/// count those exits against the pod failure policy before it sees the
/// suspension; the operator counts them as a disruption, never a restart.
pub fn while_suspended(cause: FailureCause, suspended: bool) -> FailureCause {
    if !suspended {
        return cause;
    }
    match cause {
        FailureCause::Disruption { .. } => cause,
        FailureCause::ExitCode { pod, code, .. } => FailureCause::Disruption {
            pod,
            reason: format!("exit code {code} while Kueue suspended the Job"),
        },
        FailureCause::Unknown { message } => FailureCause::Disruption {
            pod: "?".into(),
            reason: format!("{message}, while Kueue suspended the Job"),
        },
    }
}

/// Pure part of [`failure_cause`].
///
/// The Job controller's own verdict comes first: when a rule of the gang's
/// pod failure policy failed the Job, its condition names the pod and what
/// matched, judged when that pod failed. The pods as listed now are a later
/// picture: the gang's teardown follows the failure, and a pod deleted then
/// may carry a `DisruptionTarget` of its own, which must not turn a worker's
/// exit code into an uncounted disruption (an operator that was down during
/// the failure sees only that later picture).
pub fn classify_failure(
    pods: &[Pod],
    job_status: &k8s_openapi::api::batch::v1::JobStatus,
) -> FailureCause {
    if let Some(verdict) = job_status
        .conditions
        .iter()
        .flatten()
        .find(|c| {
            (c.type_ == "Failed" || c.type_ == "FailureTarget")
                && c.status == "True"
                && c.reason.as_deref() == Some(POD_FAILURE_POLICY)
        })
        .and_then(|c| c.message.as_deref())
    {
        let listed = |name: &str| pods.iter().find(|p| p.name_any() == name);
        return match classify_job_message(verdict) {
            // The message says only "DisruptionTarget"; the pod, if still
            // listed, says which disruption (preemption, eviction...).
            FailureCause::Disruption { pod, reason } => FailureCause::Disruption {
                reason: listed(&pod).and_then(disruption).unwrap_or(reason),
                pod,
            },
            // The pod, if still listed, says why it exited.
            FailureCause::ExitCode {
                pod,
                code,
                download,
                ..
            } => FailureCause::ExitCode {
                message: listed(&pod).and_then(termination_message),
                pod,
                code,
                download,
            },
            cause => cause,
        };
    }
    for pod in pods {
        if let Some(reason) = disruption(pod) {
            return FailureCause::Disruption {
                pod: pod.name_any(),
                reason,
            };
        }
    }
    // Pods the Job controller deleted while tearing the gang down fail too
    // (killed); they are echoes of the cause, so they count only if nothing else failed.
    let (undeleted, deleted): (Vec<&Pod>, Vec<&Pod>) = pods
        .iter()
        .partition(|p| p.metadata.deletion_timestamp.is_none());
    let candidates = if undeleted.iter().any(|p| exit_code(p).is_some()) {
        undeleted
    } else {
        deleted
    };
    let mut failed: Vec<(&Pod, (i32, bool))> = candidates
        .into_iter()
        .filter_map(|p| Some((p, exit_code(p)?)))
        .collect();
    // The earliest failure is the cause; later ones are usually its echo.
    failed.sort_by_key(|(p, _)| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|cs| cs.first())
            .and_then(|c| c.state.as_ref()?.terminated.as_ref()?.finished_at.clone())
            .map(|t| t.0)
    });
    if let Some((pod, (code, download))) = failed.first() {
        return FailureCause::ExitCode {
            pod: pod.name_any(),
            code: *code,
            message: termination_message(pod),
            download: *download,
        };
    }
    // The pods are gone (e.g. evicted from a lost node and removed): the Job's
    // pod failure policy message still names the pod and what matched.
    let condition = job_status
        .conditions
        .iter()
        .flatten()
        .find(|c| (c.type_ == "Failed" || c.type_ == "FailureTarget") && c.status == "True");
    let text = condition
        .and_then(|c| c.message.clone().or_else(|| c.reason.clone()))
        .unwrap_or_default();
    classify_job_message(&text)
}

/// Reads the Job controller's pod-failure-policy message, e.g. "Pod ns/p has
/// condition DisruptionTarget matching FailJob rule at index 0" or "Container
/// worker for pod ns/p failed with exit code 3 matching FailJob rule at index 1".
fn classify_job_message(text: &str) -> FailureCause {
    let pod = text
        .split_whitespace()
        .skip_while(|w| !w.eq_ignore_ascii_case("pod"))
        .nth(1)
        .unwrap_or("?");
    let pod = pod.rsplit('/').next().unwrap_or(pod).to_string();
    if text.contains("condition DisruptionTarget") {
        return FailureCause::Disruption {
            pod,
            reason: "DisruptionTarget".into(),
        };
    }
    if let Some(code) = text
        .split("exit code ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
    {
        // "Container <name> for pod <ns>/<pod> failed with exit code <n> ..."
        let container = text
            .split_whitespace()
            .skip_while(|w| !w.eq_ignore_ascii_case("container"))
            .nth(1);
        return FailureCause::ExitCode {
            pod,
            code,
            message: None,
            download: container.is_some_and(hub::is_download_container),
        };
    }
    let message = if text.is_empty() {
        "Job failed for an unknown reason".into()
    } else {
        format!("Job failed: {text}")
    };
    FailureCause::Unknown { message }
}

/// The reason the Job controller gives a condition set by a pod failure policy rule.
const POD_FAILURE_POLICY: &str = "PodFailurePolicy";

/// Why a pod was disrupted, if its `DisruptionTarget` condition is true.
fn disruption(pod: &Pod) -> Option<String> {
    let conditions = pod.status.as_ref()?.conditions.as_ref()?;
    let c = conditions
        .iter()
        .find(|c| c.type_ == "DisruptionTarget" && c.status == "True")?;
    Some(
        c.reason
            .clone()
            .unwrap_or_else(|| "DisruptionTarget".into()),
    )
}

/// The last line of the termination message of a pod's failed container
/// (what the worker wrote to `/dev/termination-log`, or with
/// `FallbackToLogsOnError` its last log line), at most 300 characters.
fn termination_message(pod: &Pod) -> Option<String> {
    const MAX: usize = 300;
    let st = pod.status.as_ref()?;
    let failed = |c: &ContainerStatus| failed_run(c)?.message.clone();
    // The worker's, else a failed download's (its init container), named so.
    let message = st
        .container_statuses
        .iter()
        .flatten()
        .find_map(failed)
        .or_else(|| {
            st.init_container_statuses
                .iter()
                .flatten()
                .find_map(|c| Some(format!("{}: {}", c.name, failed(c)?)))
        })?;
    let line = message
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())?;
    Some(match line.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}…", &line[..end]),
        None => line.to_string(),
    })
}

/// A container's run that ended with a non-zero exit code, if it did.
fn failed_run(c: &ContainerStatus) -> Option<&ContainerStateTerminated> {
    c.state
        .as_ref()?
        .terminated
        .as_ref()
        .filter(|t| t.exit_code != 0)
}

/// The non-zero exit code of a pod's terminated container, if any, and
/// whether that container was a download (an init container).
fn exit_code(pod: &Pod) -> Option<(i32, bool)> {
    let st = pod.status.as_ref()?;
    let failed = |c: &ContainerStatus| Some(failed_run(c)?.exit_code);
    // A failed init container (a Hub download) fails the pod before the
    // worker runs.
    st.container_statuses
        .iter()
        .flatten()
        .find_map(|c| Some((failed(c)?, false)))
        .or_else(|| {
            st.init_container_statuses
                .iter()
                .flatten()
                .find_map(|c| Some((failed(c)?, hub::is_download_container(&c.name))))
        })
}

async fn execute(ctx: &Context, job: &MoETrainingJob, ns: &str, plan: &Plan) -> Result<(), Error> {
    let (client, metrics) = (&ctx.client, ctx.metrics.as_ref());
    if let Some(new) = plan.create {
        let attempt = new.attempt;
        if let Some(pod_group) = build::pod_group(job, &ctx.build, attempt, new.nodes) {
            create_once(client, metrics, ns, &pod_group).await?;
        }
        let child = build::attempt_job(job, &ctx.build, new);
        if create_once(client, metrics, ns, &child).await? {
            info!(job = %job.name_any(), namespace = ns, attempt, "created attempt");
        }
    }
    // Kept while wanted: built and created only when the store lacks it.
    if let Some(spares) = plan.spares
        && ctx
            .jobs
            .get(&ObjectRef::new(&build::spare_job_name(job, spares.attempt)).within(ns))
            .is_none()
    {
        let child = build::spare_job(job, &ctx.build, spares.attempt, spares.count);
        if create_once(client, metrics, ns, &child).await? {
            info!(job = %job.name_any(), namespace = ns, attempt = spares.attempt, count = spares.count, "created spare pods");
        }
    }
    if plan.export
        && ctx
            .jobs
            .get(&ObjectRef::new(&build::export_job_name(job)).within(ns))
            .is_none()
        && let Some(child) = build::export_job(job, &ctx.build)
        && create_once(client, metrics, ns, &child).await?
    {
        info!(job = %job.name_any(), namespace = ns, "created the export");
    }
    for name in &plan.delete {
        // The attempt's PodGroup first: were the operator stopped between the
        // two, the Job still there brings it back to this point.
        if ctx.build.workload_api() {
            delete_if_present::<PodGroup>(client, metrics, ns, name).await?;
        }
        // The attempt Job goes now, its pods follow; the next attempt need not wait.
        if delete_if_present::<Job>(client, metrics, ns, name).await? {
            info!(job = %job.name_any(), namespace = ns, child = %name, "deleted attempt");
        }
    }
    if plan.delete_self
        && delete_if_present::<MoETrainingJob>(client, metrics, ns, &job.name_any()).await?
    {
        info!(job = %job.name_any(), namespace = ns, "deleted after ttlSecondsAfterFinished");
    }
    Ok(())
}

async fn write_status(
    ctx: &Context,
    job: &MoETrainingJob,
    status: &MoETrainingJobStatus,
) -> Result<Option<Duration>, Error> {
    let uid = job.uid().unwrap_or_default();
    let since_last_write = ctx
        .status_writes
        .lock()
        .expect("not poisoned")
        .get(&uid)
        .map(Instant::elapsed);
    match pacing::status_write(job.status.as_ref(), status, since_last_write) {
        StatusWrite::Unchanged => return Ok(None),
        // The requeue writes it (or a newer status) once the interval is over.
        StatusWrite::After(wait) => return Ok(Some(wait)),
        StatusWrite::Now => {}
    }
    apply_status(&ctx.client, &ctx.metrics, job, status).await?;
    ctx.status_writes
        .lock()
        .expect("not poisoned")
        .insert(uid, Instant::now());
    Ok(None)
}

async fn publish(ctx: &Context, job: &MoETrainingJob, warning: bool, reason: &str, message: &str) {
    crate::reconcile::publish(&ctx.recorder, &ctx.metrics, job, warning, reason, message).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gang_that_fails_while_suspended_is_a_disruption_not_an_exit() {
        let exit = || FailureCause::ExitCode {
            pod: "j-a0-1".into(),
            code: 137,
            message: None,
            download: false,
        };
        assert_eq!(while_suspended(exit(), false), exit());
        let FailureCause::Disruption { pod, reason } = while_suspended(exit(), true) else {
            panic!("not a disruption")
        };
        assert_eq!(pod, "j-a0-1");
        assert!(
            reason.contains("137") && reason.contains("suspended"),
            "{reason}"
        );
        let unknown = FailureCause::Unknown {
            message: "Job failed: BackoffLimitExceeded".into(),
        };
        assert!(matches!(
            while_suspended(unknown, true),
            FailureCause::Disruption { .. }
        ));
        let disrupted = FailureCause::Disruption {
            pod: "p".into(),
            reason: "PreemptionByScheduler".into(),
        };
        assert_eq!(while_suspended(disrupted.clone(), true), disrupted);
    }

    #[test]
    fn job_failure_messages_are_classified() {
        assert_eq!(
            classify_job_message(
                "Pod ns/train-a0-1-abcde has condition DisruptionTarget matching FailJob rule at index 0"
            ),
            FailureCause::Disruption {
                pod: "train-a0-1-abcde".into(),
                reason: "DisruptionTarget".into()
            }
        );
        assert_eq!(
            classify_job_message(
                "Container worker for pod ns/train-a0-2-xyz failed with exit code 3 matching FailJob rule at index 1"
            ),
            FailureCause::ExitCode {
                pod: "train-a0-2-xyz".into(),
                code: 3,
                message: None,
                download: false,
            }
        );
        assert_eq!(
            classify_job_message(
                "Container download-model for pod ns/train-a0-0-xyz failed with exit code 1 matching FailJob rule at index 1"
            ),
            FailureCause::ExitCode {
                pod: "train-a0-0-xyz".into(),
                code: 1,
                message: None,
                download: true,
            }
        );
        assert!(matches!(
            classify_job_message("Job has reached the specified backoff limit"),
            FailureCause::Unknown { .. }
        ));
    }

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).expect("a pod")
    }

    /// Pod 0 exited 4 (a fabric below its floor, saying so); pod 1 was deleted by the gang's teardown afterwards
    /// and carries a `DisruptionTarget` from that.
    fn failed_then_torn_down() -> Vec<Pod> {
        vec![
            pod(serde_json::json!({
                "metadata": {"name": "mid-a0-0-x"},
                "status": {"containerStatuses": [{
                    "name": "worker", "image": "w", "imageID": "", "ready": false, "restartCount": 0,
                    "state": {"terminated": {"exitCode": 4, "finishedAt": "2026-11-29T10:00:00Z",
                        "message": "rank 0: fabric check: all-to-all bus bandwidth 812 MB/s is below 20000\n"}}
                }]}
            })),
            pod(serde_json::json!({
                "metadata": {"name": "mid-a0-1-y", "deletionTimestamp": "2026-11-29T10:00:01Z"},
                "status": {"conditions": [{
                    "type": "DisruptionTarget", "status": "True", "reason": "DeletionByPodGC"
                }]}
            })),
        ]
    }

    fn job_failed(reason: &str, message: &str) -> k8s_openapi::api::batch::v1::JobStatus {
        serde_json::from_value(serde_json::json!({"conditions": [
            {"type": "FailureTarget", "status": "True", "reason": reason, "message": message},
            {"type": "Failed", "status": "True", "reason": reason, "message": message},
        ]}))
        .expect("a job status")
    }

    #[test]
    fn the_job_controllers_policy_verdict_outranks_a_later_teardown() {
        let pods = failed_then_torn_down();
        let verdict = job_failed(
            POD_FAILURE_POLICY,
            "Container worker for pod ns/mid-a0-0-x failed with exit code 4 matching FailJob rule at index 1",
        );
        assert_eq!(
            classify_failure(&pods, &verdict),
            FailureCause::ExitCode {
                pod: "mid-a0-0-x".into(),
                code: 4,
                message: Some(
                    "rank 0: fabric check: all-to-all bus bandwidth 812 MB/s is below 20000".into()
                ),
                download: false,
            }
        );
        // Without a policy verdict the pods decide, the disruption first.
        let other = job_failed(
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit",
        );
        assert_eq!(
            classify_failure(&pods, &other),
            FailureCause::Disruption {
                pod: "mid-a0-1-y".into(),
                reason: "DeletionByPodGC".into()
            }
        );
    }

    /// A Hub dataset's download that failed fails the pod before the
    /// worker runs (restartPolicy Never; the Job's backoff limit, not the
    /// worker's rule, fails the attempt): the cause is the init container's
    /// exit code and words, named as the download's.
    #[test]
    fn a_failed_download_is_the_cause_in_its_own_words() {
        let pods = [pod(serde_json::json!({
            "metadata": {"name": "big-a0-1-z"},
            "status": {
                "phase": "Failed",
                "initContainerStatuses": [{
                    "name": "download", "image": "w", "imageID": "", "ready": false, "restartCount": 0,
                    "state": {"terminated": {"exitCode": 2, "finishedAt": "2026-11-29T10:00:00Z",
                        "message": "resolving org/corpus at main: the Hub answered 401 Unauthorized"}}
                }],
                "containerStatuses": [{
                    "name": "worker", "image": "w", "imageID": "", "ready": false, "restartCount": 0,
                    "state": {"waiting": {"reason": "PodInitializing"}}
                }]
            }
        }))];
        let status = job_failed(
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit",
        );
        assert_eq!(
            classify_failure(&pods, &status),
            FailureCause::ExitCode {
                pod: "big-a0-1-z".into(),
                code: 2,
                message: Some(
                    "download: resolving org/corpus at main: the Hub answered 401 Unauthorized"
                        .into()
                ),
                download: true,
            }
        );
    }

    #[test]
    fn a_disruption_verdict_takes_its_reason_from_the_pod_when_listed() {
        let pods = failed_then_torn_down();
        let verdict = job_failed(
            POD_FAILURE_POLICY,
            "Pod ns/mid-a0-1-y has condition DisruptionTarget matching FailJob rule at index 0",
        );
        assert_eq!(
            classify_failure(&pods, &verdict),
            FailureCause::Disruption {
                pod: "mid-a0-1-y".into(),
                reason: "DeletionByPodGC".into()
            }
        );
        // The pod gone: the message alone.
        assert_eq!(
            classify_failure(&[], &verdict),
            FailureCause::Disruption {
                pod: "mid-a0-1-y".into(),
                reason: "DisruptionTarget".into()
            }
        );
    }
}
