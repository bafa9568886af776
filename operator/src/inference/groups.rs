//! Replica groups (`podsPerReplica > 1`): a replica spans several pods that
//! must run together (one model sharded over nodes), so a group is created,
//! replaced and restarted as a whole.
//!
//! ```text
//! Service     <name>-pods          headless: pod DNS <name>-g<i>-<k>-<j>.<name>-pods
//! StatefulSet <name>-g<i>-<k>      group i, incarnation k: podsPerReplica pods, Parallel,
//!   └── Pod   <name>-g<i>-<k>-<j>  OnDelete (never rolled pod by pod); pod 0 leads
//! ```
//!
//! A failed pod, or a new revision of the pod template, replaces the whole
//! group: incarnation k+1 is created *before* k is deleted, as training
//! creates attempt N+1 before deleting N, so every counter lives in the API
//! (the restart count in an annotation of the newest incarnation) and an
//! operator restarted at any point decides the same again. In a rollout within
//! `maxSurge`, k even keeps serving until k+1 is ready ([`plan_groups`]).
//! Restarts of a group are bounded ([`MAX_GROUP_RESTARTS`]); past it the group
//! is left alone and the service reports `GroupRestartLimit`.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::scheduling::v1alpha2::PodGroup;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use moe_crds::MoEInferenceService;
use moe_crds::contract::COORDINATOR_PORT;

use super::build::{self, Group, ResolvedModel};
use super::decide::{DeploymentState, Transition};
use crate::gang::Mechanism;
use crate::labels;
use crate::pods::{BuildContext, fnv1a64};

/// Whole-group restarts allowed per group index before it is left alone
/// (a group that keeps failing, e.g. on a broken node or a bad checkpoint,
/// must not recreate forever).
pub const MAX_GROUP_RESTARTS: i32 = 5;

/// Headless Service: stable DNS names for group pods, published before they
/// are ready so the ranks of a group can rendezvous while loading.
pub fn pods_service(svc: &MoEInferenceService) -> Service {
    Service {
        metadata: build::child_meta(svc, build::pods_service_name(svc)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(build::selector_labels(svc)),
            publish_not_ready_addresses: Some(true),
            ports: Some(vec![ServicePort {
                name: Some("rendezvous".into()),
                port: COORDINATOR_PORT.into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Hash of the group pod template without its group-specific parts: groups
/// whose StatefulSet carries another revision are replaced.
pub fn revision(svc: &MoEInferenceService, ctx: &BuildContext, model: &ResolvedModel) -> String {
    let template = build::pod_template(svc, ctx, model, None);
    let mut text = serde_json::to_string(&template).expect("a pod template serialises");
    // The topology shapes only the groups' templates (their pod affinity):
    // a change of it replaces the groups too. Appended only when set, so
    // groups without one keep the revision they were created with.
    if let Some(topology) = &svc.spec.placement.topology {
        text.push_str(&serde_json::to_string(topology).expect("a topology serialises"));
    }
    format!("{:016x}", fnv1a64(text.as_bytes()))
}

fn group_labels(svc: &MoEInferenceService, g: Group) -> BTreeMap<String, String> {
    let mut out = build::selector_labels(svc);
    out.insert(labels::GROUP.into(), g.index.to_string());
    out.insert(labels::INCARNATION.into(), g.incarnation.to_string());
    out
}

/// The PodGroup of one group incarnation, named as its StatefulSet, when the
/// Workload API schedules gangs ([`crate::gang`]); owned by the service, and
/// deleted with the incarnation.
pub fn pod_group(svc: &MoEInferenceService, ctx: &BuildContext, g: Group) -> Option<PodGroup> {
    let pods = svc.spec.parallelism.pods_per_replica;
    (ctx.gang(&svc.spec.placement, pods) == Mechanism::WorkloadApi).then(|| {
        let mut meta = build::child_meta(svc, build::group_set_name(svc, g));
        meta.labels
            .get_or_insert_with(BTreeMap::new)
            .extend(group_labels(svc, g));
        ctx.pod_group(meta, &svc.spec.placement, pods)
    })
}

/// The StatefulSet of one group incarnation.
pub fn group_set(
    svc: &MoEInferenceService,
    ctx: &BuildContext,
    model: &ResolvedModel,
    g: Group,
    restarts: i32,
) -> StatefulSet {
    let mut meta = build::queued_meta(svc, build::group_set_name(svc, g));
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .extend(group_labels(svc, g));
    meta.annotations = Some(BTreeMap::from([
        (labels::REVISION.into(), revision(svc, ctx, model)),
        (labels::RESTARTS.into(), restarts.to_string()),
        (labels::MODEL_REVISION.into(), model.revision.clone()),
    ]));
    StatefulSet {
        metadata: meta,
        spec: Some(StatefulSetSpec {
            replicas: Some(svc.spec.parallelism.pods_per_replica),
            service_name: Some(build::pods_service_name(svc)),
            // All ranks start at once: they rendezvous with each other.
            pod_management_policy: Some("Parallel".into()),
            // Never rolled pod by pod: a group with ranks of two revisions
            // cannot work; the operator replaces whole groups.
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("OnDelete".into()),
                ..Default::default()
            }),
            selector: LabelSelector {
                match_labels: Some(group_labels(svc, g)),
                ..Default::default()
            },
            template: build::pod_template(svc, ctx, model, Some(g)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// What is known about one group incarnation (its StatefulSet and pods).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GroupState {
    pub name: String,
    pub index: i32,
    pub incarnation: i32,
    pub being_deleted: bool,
    pub revision: String,
    pub restarts: i32,
    /// Live pods and ready pods.
    pub pods: i32,
    pub ready: i32,
    /// Whether it was once complete and ready (`moe.dev/formed-pods` set).
    pub formed: bool,
    /// A pod failed, restarted, or was replaced after the group formed.
    pub failed: bool,
    /// Kueue stopped the group (its pods are going with Kueue's
    /// TerminationTarget condition, or are all back and gated): it waits for
    /// admission, which is no failure.
    pub stopped: bool,
}

/// What to do with the groups.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GroupPlan {
    /// Group incarnations to create, with the restart count they carry.
    pub create: Vec<(Group, i32)>,
    /// StatefulSets to delete (with their pods).
    pub delete: Vec<String>,
    /// StatefulSets whose pods are all ready for the first time.
    pub mark_formed: Vec<String>,
    /// StatefulSets of formed groups Kueue stopped: formed anew once readmitted.
    pub unmark_formed: Vec<String>,
    /// The replica counts, as the Deployment's would be.
    pub counts: DeploymentState,
    /// Set when a group is out of restarts.
    pub exhausted: Option<String>,
    pub transitions: Vec<Transition>,
}

/// Decides creations, replacements and deletions of groups, pure.
///
/// A rollout (a group whose revision is not `revision`) honours
/// `rollout.maxSurge` and `rollout.maxUnavailable` as a Deployment does, per
/// whole group: a *surged* group gets its successor while it keeps serving
/// (deleted only once the successor is ready, at most `maxSurge` groups above
/// `replicas` at once); a group replaced *in place* is deleted as its
/// successor is created (at most `maxUnavailable` groups missing at once,
/// counting groups that are not ready anyway). Both budgets are used together.
/// A group that does not serve (not ready, failed) is replaced at once: that
/// costs no availability.
pub fn plan_groups(svc: &MoEInferenceService, groups: &[GroupState], revision: &str) -> GroupPlan {
    let replicas = svc.spec.replicas.max(0);
    let size = svc.spec.parallelism.pods_per_replica;
    let (max_unavailable, max_surge) = (
        svc.spec.rollout.max_unavailable.max(0),
        svc.spec.rollout.max_surge.max(0),
    );
    let mut plan = GroupPlan::default();
    let live: Vec<&GroupState> = groups.iter().filter(|g| !g.being_deleted).collect();
    let healthy = |g: &GroupState| !g.failed && g.pods == size && g.ready == size;
    let current = |i: i32| {
        live.iter()
            .filter(|g| g.index == i)
            .max_by_key(|g| g.incarnation)
            .copied()
    };
    // The serving predecessor of a surged group: the newest older incarnation,
    // kept while it is healthy and its successor is not ready yet. The state
    // is all in the API (incarnations, readiness), so a restarted operator
    // keeps the same one.
    let predecessor = |i: i32| {
        let c = current(i)?;
        if healthy(c) {
            return None;
        }
        live.iter()
            .filter(|g| g.index == i && g.incarnation < c.incarnation)
            .max_by_key(|g| g.incarnation)
            .copied()
            .filter(|p| healthy(p))
    };
    // Scale-down and leftovers: groups past `replicas`, older incarnations
    // other than a serving predecessor.
    for g in &live {
        let newest = current(g.index).is_some_and(|c| c.incarnation == g.incarnation);
        let kept = predecessor(g.index).is_some_and(|p| p.incarnation == g.incarnation);
        if g.index >= replicas || !(newest || kept) {
            plan.delete.push(g.name.clone());
        }
    }
    let serving = |i: i32| current(i).is_some_and(healthy) || predecessor(i).is_some();
    let mut unavailable = (0..replicas).filter(|&i| !serving(i)).count() as i32;
    let mut surged = (0..replicas).filter(|&i| predecessor(i).is_some()).count() as i32;
    let (mut ready, mut updated) = (0, 0);
    for i in 0..replicas {
        if serving(i) {
            ready += 1;
        }
        let Some(c) = current(i) else {
            // Incarnations only grow, even across deletions still in flight.
            let seen = groups.iter().filter(|g| g.index == i);
            let next = seen.clone().map(|g| g.incarnation + 1).max().unwrap_or(0);
            let restarts = seen.map(|g| g.restarts).max().unwrap_or(0);
            plan.create.push((
                Group {
                    index: i,
                    incarnation: next,
                },
                restarts,
            ));
            continue;
        };
        let next = Group {
            index: i,
            incarnation: c.incarnation + 1,
        };
        if c.revision != revision {
            // A new revision replaces the group (a failed or out-of-restarts
            // one too: the change is the fix, so its restart budget starts
            // again). A serving group goes only within the budgets.
            if !healthy(c) {
                plan.create.push((next, 0));
                plan.delete.push(c.name.clone());
            } else if surged < max_surge {
                surged += 1;
                plan.create.push((next, 0));
            } else if unavailable < max_unavailable {
                unavailable += 1;
                plan.create.push((next, 0));
                plan.delete.push(c.name.clone());
            }
            continue;
        }
        if c.failed {
            if c.restarts >= MAX_GROUP_RESTARTS {
                plan.exhausted.get_or_insert_with(|| {
                    format!(
                        "replica group {i} failed after {} restarts (limit {MAX_GROUP_RESTARTS}); left as is until the spec changes",
                        c.restarts
                    )
                });
                continue;
            }
            plan.create.push((next, c.restarts + 1));
            plan.delete.push(c.name.clone());
            plan.transitions.push(Transition {
                warning: true,
                reason: "GroupRestart".into(),
                message: format!(
                    "a pod of replica group {i} failed: recreating the group (restart {} of {MAX_GROUP_RESTARTS})",
                    c.restarts + 1
                ),
            });
            continue;
        }
        updated += 1;
        if c.stopped && c.formed {
            plan.unmark_formed.push(c.name.clone());
        }
        if healthy(c) && !c.formed {
            plan.mark_formed.push(c.name.clone());
        }
    }
    plan.counts = DeploymentState {
        generation: Some(0),
        observed_generation: Some(0),
        desired: replicas,
        // Every live incarnation: old ones being replaced and surged ones included.
        replicas: live.len() as i32,
        // Replica indices with a serving group (a new incarnation or the
        // predecessor it surged from).
        ready,
        updated,
    };
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(replicas: i32) -> MoEInferenceService {
        serde_json::from_value(json!({
            "apiVersion": "moe.dev/v1alpha1", "kind": "MoEInferenceService",
            "metadata": {"name": "chat", "namespace": "serve", "uid": "u-1", "generation": 1},
            "spec": {"model": {"volume": {"claimName": "w"}}, "replicas": replicas,
                     "parallelism": {"processesPerPod": 8, "podsPerReplica": 2, "expertParallel": 16},
                     "placement": {"gpuType": "H100"}}
        }))
        .unwrap()
    }

    fn group(index: i32, incarnation: i32, ready: i32) -> GroupState {
        GroupState {
            name: format!("chat-g{index}-{incarnation}"),
            index,
            incarnation,
            revision: "r1".into(),
            pods: 2,
            ready,
            formed: ready == 2,
            ..Default::default()
        }
    }

    #[test]
    fn missing_groups_are_created_and_extra_ones_deleted() {
        let plan = plan_groups(&svc(2), &[group(1, 3, 2), group(2, 0, 2)], "r1");
        assert_eq!(
            plan.create,
            vec![(
                Group {
                    index: 0,
                    incarnation: 0
                },
                0
            )]
        );
        assert_eq!(plan.delete, vec!["chat-g2-0".to_string()]);
        assert_eq!(plan.counts.ready, 1);
    }

    #[test]
    fn a_failed_group_is_replaced_whole_then_left_past_the_limit() {
        let mut g = group(0, 4, 1);
        g.failed = true;
        g.restarts = 2;
        let plan = plan_groups(&svc(1), &[g.clone()], "r1");
        assert_eq!(
            plan.create,
            vec![(
                Group {
                    index: 0,
                    incarnation: 5
                },
                3
            )]
        );
        assert_eq!(plan.delete, vec!["chat-g0-4".to_string()]);
        assert!(plan.transitions[0].warning);
        // The new incarnation exists before the old one is gone: no duplicate.
        let mut next = group(0, 5, 0);
        next.restarts = 3;
        let mut going = g.clone();
        going.being_deleted = true;
        let plan = plan_groups(&svc(1), &[going, next], "r1");
        assert!(plan.create.is_empty() && plan.delete.is_empty(), "{plan:?}");
        // Out of restarts: left alone, and said so.
        g.restarts = MAX_GROUP_RESTARTS;
        let plan = plan_groups(&svc(1), &[g], "r1");
        assert!(plan.create.is_empty() && plan.delete.is_empty());
        assert!(plan.exhausted.is_some());
    }

    #[test]
    fn a_new_revision_replaces_groups_within_max_unavailable() {
        let groups = [group(0, 0, 2), group(1, 0, 2), group(2, 0, 2)];
        let plan = plan_groups(&svc(3), &groups, "r2");
        assert_eq!(plan.create.len(), 1, "maxUnavailable 1: {plan:?}");
        assert_eq!(plan.delete, vec!["chat-g0-0".to_string()]);
        assert_eq!(plan.counts.updated, 0);
        // The replacement not ready yet: nothing else is touched.
        let groups = [group(0, 1, 0), group(1, 0, 2), group(2, 0, 2)];
        let mut g0 = groups[0].clone();
        g0.revision = "r2".into();
        let plan = plan_groups(&svc(3), &[g0, groups[1].clone(), groups[2].clone()], "r2");
        assert!(plan.create.is_empty(), "{plan:?}");
    }

    fn rollout(replicas: i32, max_unavailable: i32, max_surge: i32) -> MoEInferenceService {
        let mut s = svc(replicas);
        s.spec.rollout.max_unavailable = max_unavailable;
        s.spec.rollout.max_surge = max_surge;
        s
    }

    fn at(mut g: GroupState, revision: &str) -> GroupState {
        g.revision = revision.into();
        g
    }

    fn created(plan: &GroupPlan) -> Vec<(i32, i32)> {
        plan.create
            .iter()
            .map(|(g, _)| (g.index, g.incarnation))
            .collect()
    }

    #[test]
    fn max_surge_rolls_groups_by_adding_a_successor_before_removing_the_old_one() {
        let s = rollout(3, 0, 1);
        let old = [group(0, 0, 2), group(1, 0, 2), group(2, 0, 2)];
        // One successor above `replicas`, nothing deleted (maxUnavailable 0).
        let plan = plan_groups(&s, &old, "r2");
        assert_eq!(created(&plan), vec![(0, 1)], "{plan:?}");
        assert!(plan.delete.is_empty(), "{plan:?}");
        assert_eq!(plan.counts.ready, 3);
        // While the successor loads, the old group keeps serving and the
        // surge budget is spent: nothing else moves.
        let loading = [
            old[0].clone(),
            at(group(0, 1, 0), "r2"),
            old[1].clone(),
            old[2].clone(),
        ];
        let plan = plan_groups(&s, &loading, "r2");
        assert!(plan.create.is_empty() && plan.delete.is_empty(), "{plan:?}");
        assert_eq!(
            (plan.counts.replicas, plan.counts.ready, plan.counts.updated),
            (4, 3, 1)
        );
        // The successor is ready: the old group goes, and the next one surges.
        let ready = [
            old[0].clone(),
            at(group(0, 1, 2), "r2"),
            old[1].clone(),
            old[2].clone(),
        ];
        let plan = plan_groups(&s, &ready, "r2");
        assert_eq!(plan.delete, vec!["chat-g0-0".to_string()]);
        assert_eq!(created(&plan), vec![(1, 1)]);
        // A successor that fails restarts (bounded) while its predecessor still serves.
        let mut failed = at(group(0, 1, 1), "r2");
        failed.failed = true;
        let plan = plan_groups(
            &s,
            &[old[0].clone(), failed, old[1].clone(), old[2].clone()],
            "r2",
        );
        assert_eq!(
            plan.create,
            vec![(
                Group {
                    index: 0,
                    incarnation: 2
                },
                1
            )]
        );
        assert_eq!(plan.delete, vec!["chat-g0-1".to_string()]);
        assert_eq!(plan.counts.ready, 3, "g0-0 still serves");
    }

    #[test]
    fn max_surge_and_max_unavailable_are_spent_together() {
        let old = [group(0, 0, 2), group(1, 0, 2), group(2, 0, 2)];
        let plan = plan_groups(&rollout(3, 1, 1), &old, "r2");
        // Group 0 surges (kept), group 1 is replaced in place, group 2 waits.
        assert_eq!(created(&plan), vec![(0, 1), (1, 1)]);
        assert_eq!(plan.delete, vec!["chat-g1-0".to_string()]);
        // maxUnavailable 0 and no surge left: a serving group is never deleted.
        let plan = plan_groups(
            &rollout(3, 0, 1),
            &[
                old[0].clone(),
                at(group(0, 1, 0), "r2"),
                old[1].clone(),
                old[2].clone(),
            ],
            "r2",
        );
        assert!(
            !plan
                .delete
                .iter()
                .any(|n| n == "chat-g1-0" || n == "chat-g2-0"),
            "{plan:?}"
        );
        // A group that does not serve anyway is replaced at once, budget or not.
        let mut broken = group(2, 0, 1);
        broken.failed = true;
        let plan = plan_groups(
            &rollout(3, 0, 1),
            &[
                old[0].clone(),
                at(group(0, 1, 0), "r2"),
                old[1].clone(),
                broken,
            ],
            "r2",
        );
        assert_eq!(created(&plan), vec![(2, 1)]);
        assert_eq!(plan.delete, vec!["chat-g2-0".to_string()]);
    }

    #[test]
    fn scaling_down_mid_surge_removes_both_incarnations_of_dropped_groups() {
        let groups = [group(0, 0, 2), group(1, 0, 2), at(group(1, 1, 0), "r2")];
        let plan = plan_groups(&rollout(1, 0, 1), &groups, "r2");
        assert_eq!(
            plan.delete,
            vec!["chat-g1-0".to_string(), "chat-g1-1".to_string()]
        );
        assert_eq!(created(&plan), vec![(0, 1)]);
    }

    #[test]
    fn a_group_kueue_stopped_waits_to_form_anew_without_a_restart() {
        let mut g = group(0, 0, 0);
        g.formed = true;
        g.stopped = true;
        let plan = plan_groups(&svc(1), &[g.clone()], "r1");
        assert_eq!(plan.unmark_formed, vec!["chat-g0-0".to_string()]);
        assert!(plan.create.is_empty() && plan.delete.is_empty());
        assert!(plan.transitions.is_empty(), "no GroupRestart");
        assert_eq!((plan.counts.ready, plan.counts.updated), (0, 1));
        // Readmitted, its new pods ready: formed again, with them.
        let mut back = group(0, 0, 2);
        back.formed = false;
        let plan = plan_groups(&svc(1), &[back], "r1");
        assert_eq!(plan.mark_formed, vec!["chat-g0-0".to_string()]);
        assert!(plan.unmark_formed.is_empty());
    }

    #[test]
    fn a_group_that_became_ready_is_marked_formed() {
        let mut g = group(0, 0, 2);
        g.formed = false;
        let plan = plan_groups(&svc(1), &[g], "r1");
        assert_eq!(plan.mark_formed, vec!["chat-g0-0".to_string()]);
        assert_eq!(plan.counts.ready, 1);
    }

    fn model() -> ResolvedModel {
        ResolvedModel {
            claim_name: Some("w".into()),
            download: None,
            path: String::new(),
            format: moe_crds::ModelFormat::Native,
            checkpoint_step: None,
            model: None,
            trained: None,
            adapters: Vec::new(),
            revision: "pvc/w/".into(),
        }
    }

    #[test]
    fn a_topology_change_is_a_new_revision_and_a_queue_labels_each_group() {
        let ctx = BuildContext::default();
        let plain = svc(1);
        let mut placed = svc(1);
        placed.spec.placement.topology =
            serde_json::from_value(json!({"required": "topology.moe.dev/rack"})).unwrap();
        let mut elsewhere = placed.clone();
        elsewhere.spec.placement.topology =
            serde_json::from_value(json!({"required": "topology.moe.dev/block"})).unwrap();
        let revisions = [&plain, &placed, &elsewhere].map(|s| revision(s, &ctx, &model()));
        assert_ne!(revisions[0], revisions[1]);
        assert_ne!(revisions[1], revisions[2]);
        // Without a topology the revision is what it was before topologies
        // existed: the template's hash alone (groups are not replaced on upgrade).
        let template = build::pod_template(&plain, &ctx, &model(), None);
        let text = serde_json::to_string(&template).unwrap();
        assert_eq!(revisions[0], format!("{:016x}", fnv1a64(text.as_bytes())));

        let mut queued = svc(1);
        queued.spec.placement.queue_name = Some("serving".into());
        let g = Group {
            index: 0,
            incarnation: 0,
        };
        let set = group_set(&queued, &ctx, &model(), g, 0);
        assert_eq!(
            set.metadata
                .labels
                .unwrap()
                .get(labels::KUEUE_QUEUE_NAME)
                .map(String::as_str),
            Some("serving")
        );
    }

    #[test]
    fn under_the_workload_api_each_group_incarnation_is_one_pod_group() {
        let ctx = BuildContext {
            gang_scheduling: crate::gang::GangScheduling::WorkloadApi,
            ..Default::default()
        };
        let mut s = svc(1);
        s.spec.placement.topology =
            serde_json::from_value(json!({"required": "topology.moe.dev/rack"})).unwrap();
        let g = Group {
            index: 1,
            incarnation: 7,
        };
        let pg = pod_group(&s, &ctx, g).expect("a 2-pod group has a PodGroup");
        assert_eq!(pg.metadata.name.as_deref(), Some("chat-g1-7"));
        assert_eq!(
            pg.spec.scheduling_policy.gang.as_ref().unwrap().min_count,
            2
        );
        assert!(pg.spec.scheduling_constraints.is_some());
        let set = group_set(&s, &ctx, &model(), g, 0);
        let pod = set.spec.unwrap().template.spec.unwrap();
        assert_eq!(
            pod.scheduling_group.unwrap().pod_group_name.as_deref(),
            Some("chat-g1-7")
        );
        assert!(pod.affinity.and_then(|a| a.pod_affinity).is_none());
        // Switching the operator to the Workload API replaces no group: the
        // revision is the group-free template's.
        assert_eq!(
            revision(&s, &ctx, &model()),
            revision(&s, &BuildContext::default(), &model())
        );
        // Not under the default, nor with a queue.
        assert!(pod_group(&s, &BuildContext::default(), g).is_none());
        s.spec.placement.queue_name = Some("serving".into());
        assert!(pod_group(&s, &ctx, g).is_none());
    }

    #[test]
    fn group_pods_rendezvous_with_their_leader() {
        let s = svc(1);
        let model = model();
        let g = Group {
            index: 1,
            incarnation: 7,
        };
        let set = group_set(&s, &BuildContext::default(), &model, g, 2);
        assert_eq!(set.metadata.name.as_deref(), Some("chat-g1-7"));
        let spec = set.spec.unwrap();
        assert_eq!(spec.replicas, Some(2));
        assert_eq!(spec.service_name.as_deref(), Some("chat-pods"));
        let env = spec.template.spec.unwrap().containers[0]
            .env
            .clone()
            .unwrap();
        let coordinator = env.iter().find(|e| e.name == "MOE_COORDINATOR").unwrap();
        assert_eq!(
            coordinator.value.as_deref(),
            Some("chat-g1-7-0.chat-pods:29400")
        );
        let rank = env.iter().find(|e| e.name == "MOE_NODE_RANK").unwrap();
        assert!(rank.value_from.is_some());
        assert_eq!(
            build::selector_string(&s),
            "apps.kubernetes.io/pod-index=0,moe.dev/role=server,moe.dev/service-name=chat"
        );
    }
}
