//! The MoEInferenceService controller: thin I/O around the pure steps.
//!
//! reconcile = observe (stores; pods only while replicas are missing)
//!           → validate (pure, once per generation) → resolve model + decide (pure)
//!           → apply children (only fields that changed) → status (only if changed) → events
//!
//! Children and MoETrainingJobs are reflected into stores, so a reconcile with
//! nothing to do reads nothing from the API and writes nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::scheduling::v1alpha2::PodGroup;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use moe_crds::{MoEInferenceService, MoETrainingJob};
use tracing::{info, warn};

use super::adapters;
use super::build;
use super::decide::{
    ContainerFailure, DeploymentState, Downloads, ModelState, Observed, Plan, decide, reason,
    resolve_model, with_adapters,
};
use super::groups::{self, GroupPlan, GroupState};
use super::pool::{self, InferencePool};
use super::route::{self, HTTPRoute};
use super::validate::validate;
use crate::hub::{container_status, downloads_of, failure_of};
use crate::labels;
use crate::metrics::Metrics;
use crate::pods::BuildContext;
use crate::reconcile::{
    Backoff, Child, Error, api, apply_if_changed, apply_status, create_once, delete_if_present,
    publish, reflected,
};

/// Shared state of the controller.
pub struct Context {
    pub client: Client,
    pub build: BuildContext,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    config_maps: Store<ConfigMap>,
    services: Store<Service>,
    deployments: Store<Deployment>,
    pdbs: Store<PodDisruptionBudget>,
    hpas: Store<HorizontalPodAutoscaler>,
    stateful_sets: Store<StatefulSet>,
    training_jobs: Store<MoETrainingJob>,
    /// Reflected only with `--gateway-api`.
    routes: Option<Store<HTTPRoute>>,
    /// Reflected only with `--inference-pool`.
    pools: Option<Store<InferencePool>>,
    failures: Backoff<MoEInferenceService>,
    /// Validation verdict per object uid and generation: the spec only changes
    /// with the generation, and CEL compilation on every pod change would dominate CPU.
    verdicts: Mutex<HashMap<String, Verdict>>,
}

/// A validation result (`Some(message)` when invalid) and the generation it was computed for.
type Verdict = (Option<i64>, Option<String>);

/// Periodic resync: repairs anything a missed watch event left behind.
const RESYNC: Duration = Duration::from_secs(600);
/// The next look while server pods wait for quota or room.
const PENDING_POLL: Duration = Duration::from_secs(30);

/// Runs the controller until `shutdown` resolves. `namespace`: watch one namespace, or all.
pub async fn run(
    client: Client,
    namespace: Option<String>,
    build: BuildContext,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let children = watcher::Config::default().labels(&labels::managed_selector());
    let (config_maps, cm_stream) =
        reflected(api::<ConfigMap>(&client, &namespace), children.clone());
    let (services, svc_stream) = reflected(api::<Service>(&client, &namespace), children.clone());
    let (deployments, dep_stream) =
        reflected(api::<Deployment>(&client, &namespace), children.clone());
    let (pdbs, pdb_stream) = reflected(
        api::<PodDisruptionBudget>(&client, &namespace),
        children.clone(),
    );
    let (hpas, hpa_stream) = reflected(
        api::<HorizontalPodAutoscaler>(&client, &namespace),
        children.clone(),
    );
    let (stateful_sets, sts_stream) =
        reflected(api::<StatefulSet>(&client, &namespace), children.clone());
    let (routes, route_stream) = if build.gateway_api {
        let (store, stream) = reflected(api::<HTTPRoute>(&client, &namespace), children.clone());
        (Some(store), Some(stream))
    } else {
        (None, None)
    };
    let (pools, pool_stream) = if build.inference_pool {
        let (store, stream) = reflected(api::<InferencePool>(&client, &namespace), children);
        (Some(store), Some(stream))
    } else {
        (None, None)
    };
    // Training jobs: a service waiting for one reconciles when it changes.
    let (training_jobs, job_stream) = reflected(
        api::<MoETrainingJob>(&client, &namespace),
        watcher::Config::default(),
    );

    let controller = Controller::new(
        api::<MoEInferenceService>(&client, &namespace),
        watcher::Config::default().any_semantic(),
    );
    let services_store = controller.store();
    let ctx = Arc::new(Context {
        client: client.clone(),
        build,
        recorder,
        metrics,
        config_maps,
        services,
        deployments,
        pdbs,
        hpas,
        stateful_sets,
        training_jobs,
        routes,
        pools,
        failures: Backoff::default(),
        verdicts: Mutex::new(HashMap::new()),
    });
    let controller = match route_stream {
        Some(stream) => controller.owns_stream(stream),
        None => controller,
    };
    let controller = match pool_stream {
        Some(stream) => controller.owns_stream(stream),
        None => controller,
    };
    controller
        .owns_stream(cm_stream)
        .owns_stream(svc_stream)
        .owns_stream(dep_stream)
        .owns_stream(pdb_stream)
        .owns_stream(hpa_stream)
        .owns_stream(sts_stream)
        .watches_stream(job_stream, move |job: MoETrainingJob| {
            let ns = job.namespace();
            let name = job.name_any();
            services_store
                .state()
                .into_iter()
                .filter(|s| {
                    s.namespace() == ns
                        && (s
                            .spec
                            .model
                            .from_training_job
                            .as_ref()
                            .is_some_and(|f| f.name == name)
                            || s.spec.adapters.iter().any(|a| {
                                a.from_training_job.as_ref().is_some_and(|f| f.name == name)
                            }))
                })
                .map(|s| ObjectRef::from_obj(s.as_ref()))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "reconcile dispatch");
            }
        })
        .await;
}

fn error_policy(svc: Arc<MoEInferenceService>, err: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.failures.failed(svc.as_ref());
    warn!(service = %svc.name_any(), namespace = ?svc.namespace(), error = %err, retry_in = ?delay, "reconcile failed");
    ctx.metrics.reconcile_error(err.metric_label());
    Action::requeue(delay)
}

async fn reconcile(svc: Arc<MoEInferenceService>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&svc, &ctx).await;
    ctx.metrics.reconciled(started.elapsed());
    if result.is_ok() {
        ctx.failures.succeeded(svc.as_ref());
    }
    result
}

/// A child of `svc` named `name` from `store`, if `svc` controls it.
fn owned<K>(store: &Store<K>, svc: &MoEInferenceService, name: &str) -> Option<Arc<K>>
where
    K: Resource<DynamicType = ()> + Clone,
{
    let ns = svc.namespace().unwrap_or_default();
    let obj = store.get(&ObjectRef::new(name).within(&ns))?;
    let uid = svc.uid();
    obj.owner_references()
        .iter()
        .any(|o| Some(&o.uid) == uid.as_ref() && o.controller == Some(true))
        .then_some(obj)
}

async fn reconcile_inner(svc: &MoEInferenceService, ctx: &Context) -> Result<Action, Error> {
    if svc.meta().deletion_timestamp.is_some() {
        ctx.verdicts
            .lock()
            .expect("not poisoned")
            .remove(&svc.uid().unwrap_or_default());
        ctx.metrics.forget_inference(svc);
        // Children go with it by owner-reference garbage collection.
        return Ok(Action::await_change());
    }
    let ns = svc.namespace().unwrap_or_default();
    let invalid = verdict(ctx, svc);
    let job = svc
        .spec
        .model
        .from_training_job
        .as_ref()
        .and_then(|f| ctx.training_jobs.get(&ObjectRef::new(&f.name).within(&ns)));
    let model = with_adapters(
        resolve_model(svc, job.as_deref()),
        adapters::resolve(svc, |name| {
            ctx.training_jobs.get(&ObjectRef::new(name).within(&ns))
        }),
    );
    let grouped = svc.spec.parallelism.pods_per_replica > 1;
    // A Hub model's pods say which commit they downloaded.
    let revision = match &model {
        ModelState::Ready(m) if m.download.is_some() => Some(m.revision.clone()),
        _ => None,
    };
    let mut commits = BTreeMap::new();
    let mut group_plan = None;
    let (deployment, pending) = if grouped {
        // Replica groups: pods are listed every time (a failed pod restarts its
        // group), terminating ones too (what stopped them tells a failure from Kueue).
        let all = all_server_pods(ctx, svc, &ns).await?;
        let states = observe_groups(ctx, svc, &all);
        let pods = live(all);
        let gplan = match &model {
            ModelState::Ready(m) => {
                groups::plan_groups(svc, &states, &groups::revision(svc, &ctx.build, m))
            }
            _ => GroupPlan::default(),
        };
        let counts = (!states.is_empty()).then(|| gplan.counts.clone());
        group_plan = Some(gplan);
        if let Some(revision) = &revision {
            commits = commits_of(&pods, revision);
        }
        (counts, pending_of(&pods))
    } else {
        let name = build::child_name(svc);
        let deployment = owned(&ctx.deployments, svc, &name).map(|d| deployment_state(&d));
        // Pods are listed only when some are not ready or not updated, or
        // for a Hub model's commits.
        let short = deployment
            .as_ref()
            .is_some_and(|d| d.ready < svc.spec.replicas || d.updated < svc.spec.replicas);
        let pods = if short || (deployment.is_some() && revision.is_some()) {
            server_pods(ctx, svc, &ns).await?
        } else {
            Vec::new()
        };
        if let Some(revision) = &revision {
            commits = commits_of(&pods, revision);
        }
        let pending = if short {
            pending_of(&pods)
        } else {
            Pending::default()
        };
        (deployment, pending)
    };
    let mut plan = decide(
        svc,
        &Observed {
            invalid,
            model,
            deployment,
            unschedulable: pending.unschedulable,
            awaiting_admission: pending.awaiting_admission,
            downloads: pending.downloads,
            server_failures: pending.server_failures,
            commits,
            exhausted: group_plan.as_ref().and_then(|g| g.exhausted.clone()),
            pool: ctx.pools.as_ref().and_then(|store| {
                pool::acceptance(svc, owned(store, svc, &build::child_name(svc)).as_deref())
            }),
            route: ctx.routes.as_ref().and_then(|store| {
                route::acceptance(svc, owned(store, svc, &build::child_name(svc)).as_deref())
            }),
            now: Timestamp::now(),
        },
    );
    if let Some(g) = &group_plan
        && plan.apply.is_some()
    {
        plan.transitions.extend(g.transitions.iter().cloned());
    }
    apply_children(ctx, svc, &ns, &plan).await?;
    if let (Some(model), Some(gplan)) = (&plan.apply, &group_plan) {
        execute_groups(ctx, svc, &ns, model, gplan).await?;
    }
    let events = futures::future::join_all(plan.transitions.iter().map(|t| {
        publish(
            &ctx.recorder,
            &ctx.metrics,
            svc,
            t.warning,
            &t.reason,
            &t.message,
        )
    }));
    let write = async {
        if svc.status.as_ref() != Some(&plan.status) {
            apply_status(&ctx.client, &ctx.metrics, svc, &plan.status).await?;
        }
        Ok::<(), Error>(())
    };
    let (status, _) = futures::join!(write, events);
    status?;
    let reason = plan
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == moe_crds::condition::READY)
        .map(|c| c.reason.clone());
    ctx.metrics.observe_inference(svc, reason.as_deref());
    Ok(Action::requeue(requeue_after(reason.as_deref())))
}

/// How long until the next look without a change of a watched object. Pods
/// are not watched: while some wait (for quota, for room), what holds them
/// can change without a Deployment or StatefulSet event (Kueue admits a
/// pod the scheduler then cannot place), so look again soon.
fn requeue_after(ready_reason: Option<&str>) -> Duration {
    match ready_reason {
        Some(
            reason::WAITING_FOR_ADMISSION
            | reason::INSUFFICIENT_CAPACITY
            | reason::DOWNLOADING_MODEL
            | reason::DOWNLOAD_FAILED,
        ) => PENDING_POLL,
        _ => RESYNC,
    }
}

/// The writes of one reconcile are independent: issued together.
async fn apply_children(
    ctx: &Context,
    svc: &MoEInferenceService,
    ns: &str,
    plan: &Plan,
) -> Result<(), Error> {
    let Some(model) = &plan.apply else {
        return Ok(());
    };
    let (client, metrics) = (&ctx.client, ctx.metrics.as_ref());
    // The optional children: made while the spec asks for them, deleted
    // when it stops (a route or pool without its flag is an invalid spec,
    // and its store is not reflected).
    let hpa = optional_child(
        ctx,
        svc,
        ns,
        build::horizontal_pod_autoscaler(svc),
        Some(&ctx.hpas),
    );
    let http_route = optional_child(ctx, svc, ns, route::http_route(svc), ctx.routes.as_ref());
    let inference_pool =
        optional_child(ctx, svc, ns, pool::inference_pool(svc), ctx.pools.as_ref());
    // One-pod replicas: the Deployment. Groups: the headless Service of their pods
    // (the StatefulSets are created and replaced by [`execute_groups`]).
    let replicas = async {
        if svc.spec.parallelism.pods_per_replica > 1 {
            let pods_service = groups::pods_service(svc);
            apply_if_changed(client, metrics, ns, pods_service, &ctx.services).await
        } else {
            let deployment = build::deployment(svc, &ctx.build, model);
            apply_if_changed(client, metrics, ns, deployment, &ctx.deployments).await
        }
    };
    futures::try_join!(
        apply_if_changed(
            client,
            metrics,
            ns,
            build::config_map(svc, model),
            &ctx.config_maps
        ),
        apply_if_changed(client, metrics, ns, build::service(svc), &ctx.services),
        replicas,
        apply_if_changed(
            client,
            metrics,
            ns,
            build::pod_disruption_budget(svc),
            &ctx.pdbs
        ),
        hpa,
        http_route,
        inference_pool,
    )?;
    Ok(())
}

/// Applies `wanted` (an optional child named as the service: its HPA,
/// HTTPRoute, InferencePool); without it, deletes the operator's own one if
/// there is one (the spec no longer asks for it). Nothing without a store.
async fn optional_child<K: Child>(
    ctx: &Context,
    svc: &MoEInferenceService,
    ns: &str,
    wanted: Option<K>,
    store: Option<&Store<K>>,
) -> Result<(), Error> {
    let (client, metrics) = (&ctx.client, ctx.metrics.as_ref());
    let Some(store) = store else {
        return Ok(());
    };
    if let Some(child) = wanted {
        return apply_if_changed(client, metrics, ns, child, store).await;
    }
    let name = build::child_name(svc);
    if owned(store, svc, &name).is_some()
        && delete_if_present::<K>(client, metrics, ns, &name).await?
    {
        info!(
            service = %svc.name_any(),
            namespace = ns,
            kind = %K::kind(&()),
            "deleted, no longer in the spec"
        );
    }
    Ok(())
}

fn deployment_state(d: &Deployment) -> DeploymentState {
    let status = d.status.clone().unwrap_or_default();
    DeploymentState {
        generation: d.metadata.generation,
        observed_generation: status.observed_generation,
        desired: d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
        replicas: status.replicas.unwrap_or(0),
        ready: status.ready_replicas.unwrap_or(0),
        updated: status.updated_replicas.unwrap_or(0),
    }
}

/// The live server pods of `svc`. Listed only when needed: while replicas
/// are missing (to tell a capacity shortage from slow pods), and for groups.
async fn server_pods(
    ctx: &Context,
    svc: &MoEInferenceService,
    ns: &str,
) -> Result<Vec<Pod>, Error> {
    Ok(live(all_server_pods(ctx, svc, ns).await?))
}

/// The pods not being deleted.
fn live(pods: Vec<Pod>) -> Vec<Pod> {
    pods.into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

/// Every server pod of `svc`, terminating ones included.
async fn all_server_pods(
    ctx: &Context,
    svc: &MoEInferenceService,
    ns: &str,
) -> Result<Vec<Pod>, Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let selector = build::selector_labels(svc)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let list = pods.list(&ListParams::default().labels(&selector)).await?;
    ctx.metrics.api_call("list", "pods");
    Ok(list.items)
}

/// Why server pods are not placed yet.
#[derive(Default)]
struct Pending {
    /// The scheduler's messages for pods it cannot place.
    unschedulable: Vec<String>,
    /// Pods held by Kueue's admission gate (a queued service short of quota).
    awaiting_admission: i32,
    downloads: Downloads,
    server_failures: Vec<ContainerFailure>,
}

/// Kueue's scheduling gate on the pods it manages until it admits them.
const KUEUE_ADMISSION_GATE: &str = "kueue.x-k8s.io/admission";
/// The condition Kueue sets on the pods of a workload it stops (evicts,
/// preempts) before deleting them.
const KUEUE_TERMINATION_TARGET: &str = "TerminationTarget";

fn gated_by_kueue(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.scheduling_gates.as_ref())
        .is_some_and(|gates| gates.iter().any(|g| g.name == KUEUE_ADMISSION_GATE))
}

/// Going, with condition `type_` true (and reason `reason`, when given):
/// what says who is taking it.
fn going_with(pod: &Pod, type_: &str, reason: Option<&str>) -> bool {
    pod.metadata.deletion_timestamp.is_some()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| {
                cs.iter().any(|c| {
                    c.type_ == type_
                        && c.status == "True"
                        && reason.is_none_or(|r| c.reason.as_deref() == Some(r))
                })
            })
}

/// Going because the scheduler preempted it (its DisruptionTarget condition).
fn preempted_by_scheduler(pod: &Pod) -> bool {
    going_with(pod, "DisruptionTarget", Some("PreemptionByScheduler"))
}

fn stopped_by_kueue(pod: &Pod) -> bool {
    going_with(pod, KUEUE_TERMINATION_TARGET, None)
}

/// A member of a PodGroup (`spec.schedulingGroup`).
fn in_pod_group(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .is_some_and(|s| s.scheduling_group.is_some())
}

fn bound(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|s| s.node_name.is_some())
}

fn pending_of(pods: &[Pod]) -> Pending {
    Pending {
        unschedulable: unschedulable_of(pods),
        awaiting_admission: pods.iter().filter(|p| gated_by_kueue(p)).count() as i32,
        downloads: downloads_of(pods),
        server_failures: pods
            .iter()
            .filter_map(|p| failure_of(p, &container_status(p, build::SERVER_CONTAINER, false)?))
            .collect(),
    }
}

/// For a Hub model: which commit each server pod of model revision
/// `revision` downloaded, by commit ([`crate::hub::commits_of`]).
fn commits_of(pods: &[Pod], revision: &str) -> BTreeMap<String, Vec<String>> {
    crate::hub::commits_of(pods.iter().filter(|p| {
        p.annotations()
            .get(labels::MODEL_REVISION)
            .map(String::as_str)
            == Some(revision)
    }))
}

/// Why server pods are Pending, from the scheduler's PodScheduled condition.
fn unschedulable_of(pods: &[Pod]) -> Vec<String> {
    pods.iter()
        .filter_map(|p| {
            let c = crate::gang::unschedulable_condition(p)?;
            Some(c.message.clone().unwrap_or_else(|| "Unschedulable".into()))
        })
        .collect()
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A pod that failed or whose container restarted: its group's ranks cannot
/// continue without it (collectives span the group).
fn has_failed(pod: &Pod) -> bool {
    let Some(status) = pod.status.as_ref() else {
        return false;
    };
    status.phase.as_deref() == Some("Failed")
        || status
            .container_statuses
            .iter()
            .flatten()
            .any(|c| c.restart_count > 0)
}

/// The group StatefulSets `svc` owns, with their pods.
/// The groups as their StatefulSets and pods show them; `pods` includes
/// terminating ones, which count only to see that Kueue stopped a group.
fn observe_groups(ctx: &Context, svc: &MoEInferenceService, pods: &[Pod]) -> Vec<GroupState> {
    let uid = svc.uid();
    let ns = svc.namespace();
    let size = svc.spec.parallelism.pods_per_replica;
    let whole_preemption = ctx.build.workload_api() && ctx.build.workload_features.preemption;
    let mut out = Vec::new();
    for set in ctx.stateful_sets.state() {
        let owned = set
            .owner_references()
            .iter()
            .any(|o| Some(&o.uid) == uid.as_ref() && o.controller == Some(true));
        if set.namespace() != ns || !owned {
            continue;
        }
        let label = |k: &str| set.labels().get(k).and_then(|v| v.parse::<i32>().ok());
        let (Some(index), Some(incarnation)) = (label(labels::GROUP), label(labels::INCARNATION))
        else {
            continue;
        };
        let annotation = |k: &str| set.annotations().get(k).cloned();
        let group_pods: Vec<&Pod> = pods
            .iter()
            .filter(|p| {
                p.labels().get(labels::GROUP) == Some(&index.to_string())
                    && p.labels().get(labels::INCARNATION) == Some(&incarnation.to_string())
            })
            .collect();
        let formed = annotation(labels::FORMED_PODS);
        let health = group_health(&group_pods, formed.as_deref(), size, whole_preemption);
        out.push(GroupState {
            name: set.name_any(),
            index,
            incarnation,
            being_deleted: set.meta().deletion_timestamp.is_some(),
            revision: annotation(labels::REVISION).unwrap_or_default(),
            restarts: annotation(labels::RESTARTS)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            pods: health.pods,
            ready: health.ready,
            formed: formed.is_some(),
            failed: health.failed,
            stopped: health.stopped,
        });
    }
    out
}

/// What a group's pods say of it, pure.
#[derive(Debug, PartialEq)]
struct GroupHealth {
    /// Live pods, and those ready.
    pods: i32,
    ready: i32,
    /// A pod failed, restarted, or was replaced since the group formed.
    failed: bool,
    /// Kueue stopped it (preempted, evicted): its pods carry Kueue's
    /// TerminationTarget condition while they go, and come back gated by
    /// the StatefulSet. It waits to be admitted again: no failure. Or the
    /// scheduler preempted it whole (Workload API): its pods come back
    /// unbound, to wait until the gang fits again.
    stopped: bool,
}

/// `pods`: the group's pods, terminating ones included; `formed`: the uids
/// recorded when it first was whole and ready.
/// `whole_preemption`: the scheduler preempts a group whose pods name a
/// PodGroup all together (the operator's PodGroups under the Workload API,
/// where the cluster keeps their `disruptionMode`).
fn group_health(
    pods: &[&Pod],
    formed: Option<&str>,
    size: i32,
    whole_preemption: bool,
) -> GroupHealth {
    let (live, leaving): (Vec<&Pod>, Vec<&Pod>) = pods
        .iter()
        .partition(|p| p.metadata.deletion_timestamp.is_none());
    let formed_pod =
        |p: &Pod| formed.is_some_and(|uids| uids.split(',').any(|u| Some(u) == p.uid().as_deref()));
    // Preempted whole by the scheduler for pods of higher priority: every
    // pod goes (one marked going says so), and the StatefulSet brings them
    // back to wait, unbound, until the gang fits again. No failure either.
    let preempted = whole_preemption
        && (leaving
            .iter()
            .any(|p| in_pod_group(p) && preempted_by_scheduler(p))
            || (formed.is_some()
                && !live.is_empty()
                && leaving.is_empty()
                && live
                    .iter()
                    .all(|p| in_pod_group(p) && !bound(p) && !formed_pod(p))));
    let stopped = preempted
        || leaving.iter().any(|p| stopped_by_kueue(p))
        || (!live.is_empty() && live.iter().all(|p| gated_by_kueue(p)));
    // Every pod gone, none going: whoever took them, the StatefulSet brings
    // them back, and they tell (gated: Kueue stopped the group; not: a
    // failure). Judging now would restart a group Kueue stopped whose
    // marked pods this reconcile never saw.
    let undecided = live.is_empty() && leaving.is_empty();
    let replaced = !undecided
        && formed.is_some()
        && (live.len() < size as usize || live.iter().any(|p| !formed_pod(p)));
    GroupHealth {
        pods: live.len() as i32,
        ready: live.iter().filter(|p| is_ready(p)).count() as i32,
        failed: !stopped && (replaced || live.iter().any(|p| has_failed(p))),
        stopped,
    }
}

/// Deletes the group incarnations the plan retires, then creates the new
/// ones, and records which pods formed a group. Deleting first keeps the
/// rollout bounds true at every instant, not only once the reconcile is
/// done: the plan spends maxSurge and maxUnavailable counting the retired
/// groups as gone, and creating first let a watcher see one group more than
/// maxSurge allows (seen in the e2e surge test).
async fn execute_groups(
    ctx: &Context,
    svc: &MoEInferenceService,
    ns: &str,
    model: &build::ResolvedModel,
    plan: &GroupPlan,
) -> Result<(), Error> {
    let sets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
    let (client, metrics) = (&ctx.client, ctx.metrics.as_ref());
    for name in &plan.delete {
        // The group's PodGroup first: were the operator stopped between the
        // two, the StatefulSet still there brings it back to this point.
        if ctx.build.workload_api() {
            delete_if_present::<PodGroup>(client, metrics, ns, name).await?;
        }
        // The group goes now, its pods follow; its replacement need not wait.
        if delete_if_present::<StatefulSet>(client, metrics, ns, name).await? {
            info!(service = %svc.name_any(), namespace = ns, group = %name, "deleted replica group");
        }
    }
    for (group, restarts) in &plan.create {
        if let Some(pod_group) = groups::pod_group(svc, &ctx.build, *group) {
            create_once(client, metrics, ns, &pod_group).await?;
        }
        let set = groups::group_set(svc, &ctx.build, model, *group, *restarts);
        if create_once(client, metrics, ns, &set).await? {
            info!(service = %svc.name_any(), namespace = ns, group = group.index, incarnation = group.incarnation, "created replica group");
        }
    }
    // A group Kueue stopped forms anew when it is admitted again: its pods
    // then are new ones, which must not read as replacements.
    for name in &plan.unmark_formed {
        let patch = serde_json::json!({"metadata": {"annotations": {labels::FORMED_PODS: null}}});
        sets.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        ctx.metrics.api_call("patch", "statefulsets");
    }
    if !plan.mark_formed.is_empty() {
        let pods = server_pods(ctx, svc, ns).await?;
        for name in &plan.mark_formed {
            let Some(set) = ctx.stateful_sets.get(&ObjectRef::new(name).within(ns)) else {
                continue;
            };
            let (group, incarnation) = (
                set.labels().get(labels::GROUP).cloned(),
                set.labels().get(labels::INCARNATION).cloned(),
            );
            let mut uids: Vec<String> = pods
                .iter()
                .filter(|p| {
                    p.labels().get(labels::GROUP) == group.as_ref()
                        && p.labels().get(labels::INCARNATION) == incarnation.as_ref()
                })
                .filter_map(|p| p.uid())
                .collect();
            uids.sort();
            let patch = serde_json::json!({"metadata": {"annotations": {labels::FORMED_PODS: uids.join(",")}}});
            sets.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            ctx.metrics.api_call("patch", "statefulsets");
        }
    }
    Ok(())
}

/// [`validate`], once per generation of each object.
fn verdict(ctx: &Context, svc: &MoEInferenceService) -> Option<String> {
    let uid = svc.uid().unwrap_or_default();
    let generation = svc.metadata.generation;
    if let Some((g, v)) = ctx.verdicts.lock().expect("not poisoned").get(&uid)
        && *g == generation
    {
        return v.clone();
    }
    let invalid = validate(svc)
        .err()
        .or_else(|| route::unsupported(svc, ctx.build.gateway_api))
        .or_else(|| pool::unsupported(svc, ctx.build.inference_pool));
    ctx.verdicts
        .lock()
        .expect("not poisoned")
        .insert(uid, (generation, invalid.clone()));
    invalid
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_crds::contract::FetchReport;
    use serde_json::json;

    fn pod(uid: &str, extra: serde_json::Value) -> Pod {
        let mut v = json!({"metadata": {"name": format!("p-{uid}"), "uid": uid},
                           "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}});
        moe_crds::fixtures::merge_patch(&mut v, &extra);
        serde_json::from_value(v).unwrap()
    }

    /// The download init container's status, as the kubelet reports it.
    fn downloading(uid: &str, status: serde_json::Value) -> Pod {
        let mut s = json!({"name": build::DOWNLOAD_CONTAINER, "ready": false, "restartCount": 1,
                           "image": "w", "imageID": ""});
        moe_crds::fixtures::merge_patch(&mut s, &status);
        pod(
            uid,
            json!({"status": {"phase": "Pending", "initContainerStatuses": [s]}}),
        )
    }

    #[test]
    fn downloads_are_read_from_the_init_containers() {
        let refused = json!({"terminated": {"exitCode": 2, "reason": "Error",
                             "message": "the Hub answered 401 Unauthorized"}});
        let pods = [
            downloading("a", json!({"state": {"running": {}}})),
            // Failed last time, now waiting to be retried.
            downloading(
                "b",
                json!({"state": {"waiting": {"reason": "CrashLoopBackOff"}},
                                    "lastState": refused.clone()}),
            ),
            // Failed now, without a message: the kubelet's reason.
            downloading(
                "c",
                json!({"state": {"terminated": {"exitCode": 1, "reason": "Error"}}}),
            ),
            // Done (after an earlier failure): the server starts.
            downloading(
                "d",
                json!({"state": {"terminated": {"exitCode": 0}}, "lastState": refused}),
            ),
            // No download at all.
            pod("e", json!({})),
            // A Hub adapter's download, refused; another container's
            // failure is not a download's.
            pod(
                "f",
                json!({"status": {"phase": "Pending", "initContainerStatuses": [
                    {"name": "download-adapter-1", "ready": false, "restartCount": 0,
                     "image": "w", "imageID": "", "state": {"terminated": {"exitCode": 2,
                     "reason": "Error", "message": "org/lora at c0ffee holds adapter_model.bin only"}}},
                    {"name": "setup", "ready": false, "restartCount": 0, "image": "w",
                     "imageID": "", "state": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}}),
            ),
        ];
        let d = downloads_of(&pods);
        assert_eq!(d.running, 1);
        assert_eq!(
            d.failed,
            vec![
                ContainerFailure {
                    pod: "p-b".into(),
                    exit_code: 2,
                    message: "the Hub answered 401 Unauthorized".into()
                },
                ContainerFailure {
                    pod: "p-c".into(),
                    exit_code: 1,
                    message: "Error".into()
                },
                ContainerFailure {
                    pod: "p-f".into(),
                    exit_code: 2,
                    message: "org/lora at c0ffee holds adapter_model.bin only".into()
                },
            ]
        );
    }

    /// Which commit each pod downloaded: from a succeeded download's
    /// report, for pods of the current model revision only.
    #[test]
    fn commits_are_read_from_the_downloads_reports() {
        let report = |commit: &str| {
            serde_json::to_string(&FetchReport {
                repo: "org/moe".into(),
                commit: commit.into(),
                files: 3,
                bytes: 100,
                downloaded: 100,
            })
            .unwrap()
        };
        let done = |uid: &str, revision: &str, message: String| {
            let mut p = downloading(
                uid,
                json!({"state": {"terminated": {"exitCode": 0, "message": message}}}),
            );
            p.metadata.annotations = Some(BTreeMap::from([(
                labels::MODEL_REVISION.to_string(),
                revision.to_string(),
            )]));
            p
        };
        let current = "huggingface/org/moe@main";
        let pods = [
            done("b", current, report("c0ffee")),
            done("a", current, format!("{}\n", report("c0ffee"))),
            done("c", current, report("beef")),
            // Another model revision (a rollout's old pods): not counted.
            done("d", "huggingface/org/moe@v1", report("0ld")),
            // Not a report (a download from before the operator read them).
            done("e", current, "fetched".into()),
            // Still downloading.
            {
                let mut p = downloading("f", json!({"state": {"running": {}}}));
                p.metadata.annotations = done("x", current, String::new()).metadata.annotations;
                p
            },
        ];
        assert_eq!(
            commits_of(&pods, current),
            BTreeMap::from([
                ("beef".to_string(), vec!["p-c".to_string()]),
                (
                    "c0ffee".to_string(),
                    vec!["p-a".to_string(), "p-b".to_string()]
                ),
            ])
        );
        assert!(commits_of(&pods[..2], "huggingface/org/moe@v2").is_empty());
    }

    #[test]
    fn crashing_servers_are_read_from_their_containers() {
        let server = |uid: &str, status: serde_json::Value| {
            let mut s = json!({"name": build::SERVER_CONTAINER, "ready": false, "restartCount": 3,
                               "image": "w", "imageID": ""});
            moe_crds::fixtures::merge_patch(&mut s, &status);
            pod(uid, json!({"status": {"containerStatuses": [s]}}))
        };
        let crashed = json!({"terminated": {"exitCode": 2, "reason": "Error",
                             "message": "/models/moe-9b: no model there"}});
        let pending = pending_of(&[
            // Waiting to be restarted after an error: failing.
            server(
                "a",
                json!({"state": {"waiting": {"reason": "CrashLoopBackOff"}},
                               "lastState": crashed.clone()}),
            ),
            // Running again (loading, say) after an earlier crash: not failing now.
            server("b", json!({"state": {"running": {}}, "lastState": crashed})),
            // Another container's failure is not the server's.
            pod(
                "c",
                json!({"status": {"containerStatuses": [{"name": "sidecar", "ready": false,
                "restartCount": 1, "image": "w", "imageID": "",
                "state": {"terminated": {"exitCode": 1}}}]}}),
            ),
        ]);
        assert_eq!(
            pending.server_failures,
            vec![ContainerFailure {
                pod: "p-a".into(),
                exit_code: 2,
                message: "/models/moe-9b: no model there".into()
            }]
        );
    }

    fn health(pods: &[Pod], formed: Option<&str>) -> GroupHealth {
        group_health(&pods.iter().collect::<Vec<_>>(), formed, 2, false)
    }

    #[test]
    fn a_group_the_scheduler_preempts_whole_waits_without_failing() {
        let formed = Some("a,b");
        let whole = |pods: &[Pod]| group_health(&pods.iter().collect::<Vec<_>>(), formed, 2, true);
        let member = json!({"spec": {"containers": [], "schedulingGroup": {"podGroupName": "g"}, "nodeName": "n1"}});
        let mut going = json!({"metadata": {"deletionTimestamp": "2026-11-29T00:00:00Z"},
                               "status": {"conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}]}});
        moe_crds::fixtures::merge_patch(&mut going, &member);
        let leaving = [pod("a", going.clone()), pod("b", member.clone())];
        let h = whole(&leaving);
        assert!(h.stopped && !h.failed, "{h:?}");
        // Back from the StatefulSet, new and waiting for the gang to fit.
        let waiting = json!({"spec": {"containers": [], "schedulingGroup": {"podGroupName": "g"}},
                             "status": {"phase": "Pending", "conditions": []}});
        let back = [pod("c", waiting.clone()), pod("d", waiting.clone())];
        let h = whole(&back);
        assert!(h.stopped && !h.failed && h.ready == 0, "{h:?}");

        // Not under whole-group preemption (pod by pod, or the cluster
        // drops disruptionMode): the same is a failure, restarted.
        assert!(health(&leaving, formed).failed);
        assert!(health(&back, formed).failed);
        // A pod preempted out of no PodGroup, or a new pod already bound
        // beside a formed one: a failure still.
        let mut lone = going.clone();
        lone["spec"]["schedulingGroup"] = serde_json::Value::Null;
        assert!(whole(&[pod("a", lone), pod("b", member.clone())]).failed);
        assert!(whole(&[pod("a", member.clone()), pod("d", waiting)]).failed);
    }

    #[test]
    fn waiting_pods_are_looked_at_again_soon() {
        assert_eq!(requeue_after(Some("WaitingForAdmission")), PENDING_POLL);
        assert_eq!(requeue_after(Some("InsufficientCapacity")), PENDING_POLL);
        assert_eq!(requeue_after(Some("ReplicasReady")), RESYNC);
        assert_eq!(requeue_after(None), RESYNC);
    }

    #[test]
    fn a_replaced_pod_fails_the_group_but_kueue_stopping_it_does_not() {
        let formed = Some("a,b");
        let whole = [pod("a", json!({})), pod("b", json!({}))];
        assert_eq!(
            health(&whole, formed),
            GroupHealth {
                pods: 2,
                ready: 2,
                failed: false,
                stopped: false
            }
        );
        // A pod gone (killed, evicted, node lost): the group restarts.
        assert!(health(&whole[..1], formed).failed);
        // Every pod gone: judged when the StatefulSet brings them back.
        let h = health(&[], formed);
        assert!(!h.failed && !h.stopped && h.pods == 0, "{h:?}");
        let replaced = [pod("a", json!({})), pod("c", json!({}))];
        assert!(health(&replaced, formed).failed);
        // The same pods going, marked by Kueue: stopped, not failed.
        let going = json!({"metadata": {"deletionTimestamp": "2026-11-29T00:00:00Z"},
                           "status": {"conditions": [{"type": "TerminationTarget", "status": "True", "reason": "StoppedByKueue"}]}});
        let leaving = [pod("a", going.clone()), pod("b", going)];
        let h = health(&leaving, formed);
        assert!(h.stopped && !h.failed, "{h:?}");
        // A pod going without Kueue's mark, the other gone: a failure.
        let deleted = [pod(
            "a",
            json!({"metadata": {"deletionTimestamp": "2026-11-29T00:00:00Z"}}),
        )];
        assert!(health(&deleted, formed).failed);
        // Back from the StatefulSet, gated until Kueue readmits them: still stopped.
        let gated = json!({"spec": {"containers": [], "schedulingGates": [{"name": "kueue.x-k8s.io/admission"}]},
                           "status": {"phase": "Pending", "conditions": []}});
        let back = [pod("c", gated.clone()), pod("d", gated)];
        let h = health(&back, formed);
        assert!(h.stopped && !h.failed && h.ready == 0, "{h:?}");
        // One gated, one not: not Kueue's doing as a whole.
        let mixed = [
            pod("a", json!({})),
            pod(
                "d",
                json!({"spec": {"containers": [], "schedulingGates": [{"name": "kueue.x-k8s.io/admission"}]}}),
            ),
        ];
        assert!(health(&mixed, formed).failed);
    }
}
