//! How a gang of pods (a training attempt, a serving replica group) is
//! scheduled all at once, and kept in one topology domain.
//!
//! Three mechanisms, one per gang, chosen by [`mechanism`]:
//! - **Kueue** (`placement.queueName`): Kueue admits the whole gang against
//!   its queue's quota, and places it by its pod-set topology annotations.
//! - **Workload API** (the operator's `--gang-scheduling=workload-api`, on
//!   clusters with Kubernetes' Workload-Aware Scheduling: the
//!   `GenericWorkload` and `GangScheduling` feature gates, and
//!   `TopologyAwareWorkloadScheduling` for a topology): the operator creates a
//!   standalone `PodGroup` (`scheduling.k8s.io/v1alpha2`) with a gang policy
//!   of the gang's size and the required topology as its constraint; the pods
//!   name it in `spec.schedulingGroup`. The scheduler then binds all of them
//!   or none, in one domain it picks for the whole group, and (with
//!   `WorkloadAwarePreemption`) preempts gangs whole, at their pods'
//!   priority. Which optional fields the cluster keeps is probed at start
//!   ([`probe`]): a disabled gate drops its field silently.
//! - **Scheduler** (neither): pods are placed one by one; a topology is pod
//!   affinity to the gang's first pod, so a domain too small for the gang
//!   leaves the rest Pending while the first ones hold their nodes.

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{Pod, PodCondition, PodSchedulingGroup};
use k8s_openapi::api::scheduling::v1alpha2::{
    GangSchedulingPolicy, PodGroup, PodGroupSchedulingConstraints, PodGroupSchedulingPolicy,
    PodGroupSpec, TopologyConstraint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use moe_crds::Placement;

use crate::labels;

/// The operator-wide choice of gang scheduler for gangs that no queue admits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum GangScheduling {
    /// Pods are placed one by one (a topology by pod affinity).
    #[default]
    None,
    /// Kubernetes' Workload API: a gang PodGroup per gang.
    WorkloadApi,
}

/// What the cluster keeps of a PodGroup's optional fields: each is behind
/// a feature gate of its own, and the apiserver drops a disabled one
/// silently, so the operator asks it once, at start ([`probe`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkloadFeatures {
    /// `schedulingConstraints.topology` (TopologyAwareWorkloadScheduling).
    /// Without it, `placement.topology.required` is pod affinity again.
    pub topology: bool,
    /// `priorityClassName` and `disruptionMode` (WorkloadAwarePreemption):
    /// a gang of higher priority preempts whole gangs of lower priority.
    pub preemption: bool,
}

impl Default for WorkloadFeatures {
    /// All of them: what `moectl render` shows.
    fn default() -> Self {
        Self {
            topology: true,
            preemption: true,
        }
    }
}

/// What places one gang.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    Kueue,
    WorkloadApi,
    Scheduler,
}

/// The mechanism for a gang of `pods` pods under `placement`. A queue wins:
/// Kueue admits the gang as one unit and places it itself, and a second
/// all-or-nothing gate behind its admission could only hold what it admitted.
/// A gang of one needs no group.
pub fn mechanism(placement: &Placement, gang_scheduling: GangScheduling, pods: i32) -> Mechanism {
    if placement.queue_name.is_some() {
        Mechanism::Kueue
    } else if gang_scheduling == GangScheduling::WorkloadApi && pods > 1 {
        Mechanism::WorkloadApi
    } else {
        Mechanism::Scheduler
    }
}

/// Whether the pods of a gang take pod affinity to its first pod for
/// `placement.topology`: when the scheduler places them one by one, and for
/// a preferred topology under the Workload API (a PodGroup's constraint is
/// required only). Kueue places a queued gang itself.
pub fn pod_affinity(
    mechanism: Mechanism,
    placement: &Placement,
    features: WorkloadFeatures,
) -> bool {
    match mechanism {
        Mechanism::Kueue => false,
        Mechanism::Scheduler => true,
        Mechanism::WorkloadApi => required_topology(placement).is_none() || !features.topology,
    }
}

/// Whether spare pods that run show that the whole gang would now be
/// placed, so that a smaller attempt of an elastic job may grow back:
/// where the scheduler places the gang pod by pod (the spares take the
/// gang's pod affinity, so they run in its domain); where Kueue admits it,
/// queued like the gang (Kueue admits them only when its quota holds them,
/// and the scheduler then binds them); and under the Workload API, whose
/// scheduler binds them pod by pod beside the smaller attempt (they are in
/// no PodGroup), so once all run the nodes they hold and the attempt's are
/// room for the whole gang. Not when the gang needs one domain of a
/// required topology that Kueue or the PodGroup picks: the spares would
/// land in a domain of their own, maybe not the gang's, and prove nothing.
pub fn spares_show_room(mechanism: Mechanism, placement: &Placement) -> bool {
    match mechanism {
        Mechanism::Scheduler => true,
        Mechanism::Kueue | Mechanism::WorkloadApi => required_topology(placement).is_none(),
    }
}

fn required_topology(placement: &Placement) -> Option<&str> {
    placement
        .topology
        .as_ref()
        .and_then(|t| t.key())
        .filter(|(_, required)| *required)
        .map(|(key, _)| key)
}

/// The standalone PodGroup of a gang (`metadata`: its name, labels and
/// owner): all `pods` pods or none, in one domain of the required topology
/// (a preferred one has no place in the API: its pods keep their weighted
/// pod affinity). Preempted whole (`disruptionMode: PodGroup`): a gang
/// missing one pod is no use, so a gang of higher priority takes all of a
/// lower one's nodes or none; its priority is its pods'.
pub fn pod_group(
    metadata: ObjectMeta,
    placement: &Placement,
    pods: i32,
    features: WorkloadFeatures,
) -> PodGroup {
    let topology = required_topology(placement)
        .filter(|_| features.topology)
        .map(|key| PodGroupSchedulingConstraints {
            topology: Some(vec![TopologyConstraint {
                key: key.to_string(),
            }]),
        });
    PodGroup {
        metadata,
        spec: PodGroupSpec {
            scheduling_policy: PodGroupSchedulingPolicy {
                gang: Some(GangSchedulingPolicy { min_count: pods }),
                ..Default::default()
            },
            scheduling_constraints: topology,
            disruption_mode: features.preemption.then(|| DISRUPT_WHOLE.to_string()),
            priority_class_name: placement
                .priority_class_name
                .clone()
                .filter(|_| features.preemption),
            ..Default::default()
        },
        status: None,
    }
}

/// `disruptionMode` of a PodGroup whose pods are preempted together.
const DISRUPT_WHOLE: &str = "PodGroup";

/// A pod's reference to its gang's PodGroup.
pub fn scheduling_group(pod_group: &str) -> PodSchedulingGroup {
    PodSchedulingGroup {
        pod_group_name: Some(pod_group.to_string()),
    }
}

/// The scheduler's word on a PodGroup it could not place (its
/// `PodGroupScheduled` condition false), or `None` while it has not tried
/// or once the group is placed.
pub fn unschedulable(pod_group: &PodGroup) -> Option<String> {
    unplaced_group(pod_group).map(|u| u.message)
}

/// A gang the scheduler has not placed whole.
#[derive(Clone, Debug, PartialEq)]
pub struct Unplaced {
    /// The scheduler's words (the first unschedulable pod's, for pods placed one by one).
    pub message: String,
    /// Since when it has said so: the condition's transition (the earliest pod's).
    pub since: Option<Timestamp>,
    /// Pods bound to a node so far; `None` for a gang placed all at once
    /// (the Workload API binds none until it can bind every one).
    pub bound: Option<i32>,
}

/// [`unschedulable`], with when the scheduler first said so.
pub fn unplaced_group(pod_group: &PodGroup) -> Option<Unplaced> {
    let condition = pod_group
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "PodGroupScheduled")?;
    (condition.status == "False").then(|| Unplaced {
        message: if condition.message.is_empty() {
            condition.reason.clone()
        } else {
            format!("{}: {}", condition.reason, condition.message)
        },
        since: Some(condition.last_transition_time.0),
        bound: None,
    })
}

/// A gang whose pods the scheduler places one by one, while some of them
/// it cannot place: `None` when no pod is unschedulable.
pub fn unplaced_pods<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> Option<Unplaced> {
    let mut bound = 0;
    let mut first: Option<Unplaced> = None;
    for pod in pods {
        if pod.spec.as_ref().is_some_and(|s| s.node_name.is_some()) {
            bound += 1;
        }
        let Some(c) = unschedulable_condition(pod) else {
            continue;
        };
        let since = c.last_transition_time.as_ref().map(|t| t.0);
        match &mut first {
            None => {
                first = Some(Unplaced {
                    message: c.message.clone().unwrap_or_else(|| "Unschedulable".into()),
                    since,
                    bound: None,
                })
            }
            // The gang has waited since its first pod was refused.
            Some(u) => {
                u.since = match (u.since, since) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
        }
    }
    first.map(|u| Unplaced {
        bound: Some(bound),
        ..u
    })
}

/// A pod's `PodScheduled` condition while the scheduler finds no node for it.
pub fn unschedulable_condition(pod: &Pod) -> Option<&PodCondition> {
    pod.status.as_ref()?.conditions.as_ref()?.iter().find(|c| {
        c.type_ == "PodScheduled"
            && c.status == "False"
            && c.reason.as_deref() == Some("Unschedulable")
    })
}

/// The API group and version of PodGroups.
const API_VERSION: &str = "scheduling.k8s.io/v1alpha2";

/// What the cluster's Workload API supports: fails, saying what the cluster
/// lacks, unless the apiserver serves PodGroups; then a server-side dry run
/// of a PodGroup in `namespace` with every optional field shows which ones
/// it keeps (nothing is stored).
pub async fn probe(client: &Client, namespace: &str) -> anyhow::Result<WorkloadFeatures> {
    crate::reconcile::require_served::<PodGroup>(
        client,
        "--gang-scheduling=workload-api",
        &format!(
            "it needs the GenericWorkload feature gate and --runtime-config={API_VERSION}=true \
             (and the scheduler the GangScheduling gate)"
        ),
    )
    .await?;
    let all = WorkloadFeatures::default();
    let placement: Placement = serde_json::from_value(serde_json::json!({
        "topology": {"required": "kubernetes.io/hostname"}
    }))
    .expect("a valid placement");
    let meta = ObjectMeta {
        generate_name: Some("moe-operator-probe-".into()),
        ..Default::default()
    };
    let params = PostParams {
        dry_run: true,
        field_manager: Some(labels::FIELD_MANAGER.into()),
    };
    let api: Api<PodGroup> = Api::namespaced(client.clone(), namespace);
    let kept = api
        .create(&params, &pod_group(meta, &placement, 1, all))
        .await
        .context("a dry-run PodGroup (to learn which fields the cluster keeps)")?;
    Ok(WorkloadFeatures {
        topology: kept
            .spec
            .scheduling_constraints
            .and_then(|c| c.topology)
            .is_some_and(|t| !t.is_empty()),
        preemption: kept.spec.disruption_mode.as_deref() == Some(DISRUPT_WHOLE),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::scheduling::v1alpha2::PodGroupStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    fn placement(v: serde_json::Value) -> Placement {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_queue_wins_then_the_workload_api_for_gangs_of_two_or_more() {
        let queued = placement(serde_json::json!({"queueName": "gpus"}));
        let plain = placement(serde_json::json!({}));
        use GangScheduling::*;
        assert_eq!(mechanism(&queued, WorkloadApi, 4), Mechanism::Kueue);
        assert_eq!(mechanism(&queued, None, 4), Mechanism::Kueue);
        assert_eq!(mechanism(&plain, WorkloadApi, 4), Mechanism::WorkloadApi);
        assert_eq!(mechanism(&plain, WorkloadApi, 1), Mechanism::Scheduler);
        assert_eq!(mechanism(&plain, None, 4), Mechanism::Scheduler);
    }

    #[test]
    fn spares_show_room_pod_by_pod_and_elsewhere_without_a_required_domain() {
        let plain = placement(serde_json::json!({"queueName": "gpus"}));
        let preferred = placement(serde_json::json!({
            "queueName": "gpus", "topology": {"preferred": "topology.moe.dev/rack"}
        }));
        let required = placement(serde_json::json!({
            "queueName": "gpus", "topology": {"required": "topology.moe.dev/rack"}
        }));
        assert!(spares_show_room(Mechanism::Kueue, &plain));
        assert!(spares_show_room(Mechanism::Kueue, &preferred));
        assert!(!spares_show_room(Mechanism::Kueue, &required));
        assert!(spares_show_room(Mechanism::Scheduler, &required));
        assert!(spares_show_room(Mechanism::WorkloadApi, &preferred));
        assert!(!spares_show_room(Mechanism::WorkloadApi, &required));
    }

    #[test]
    fn the_pod_group_is_a_gang_of_all_pods_in_one_required_domain() {
        let meta = ObjectMeta {
            name: Some("j-a0".into()),
            ..Default::default()
        };
        let required =
            placement(serde_json::json!({"topology": {"required": "topology.moe.dev/rack"}}));
        let pg = pod_group(meta.clone(), &required, 3, WorkloadFeatures::default());
        assert_eq!(pg.spec.scheduling_policy.gang.unwrap().min_count, 3);
        assert_eq!(pg.spec.scheduling_policy.basic, None);
        let topology = pg.spec.scheduling_constraints.unwrap().topology.unwrap();
        assert_eq!(topology[0].key, "topology.moe.dev/rack");
        assert_eq!(pg.metadata.name.as_deref(), Some("j-a0"));

        // A preferred topology is no constraint; no topology neither.
        let preferred =
            placement(serde_json::json!({"topology": {"preferred": "topology.moe.dev/rack"}}));
        let pg = pod_group(meta.clone(), &preferred, 3, WorkloadFeatures::default());
        assert_eq!(pg.spec.scheduling_constraints, Option::None);
        let pg = pod_group(
            meta,
            &placement(serde_json::json!({})),
            3,
            WorkloadFeatures::default(),
        );
        assert_eq!(pg.spec.scheduling_constraints, Option::None);
    }

    #[test]
    fn a_gang_is_preempted_whole_at_its_pods_priority_where_the_cluster_can() {
        let meta = ObjectMeta::default();
        let urgent = placement(serde_json::json!({
            "priorityClassName": "urgent",
            "topology": {"required": "topology.moe.dev/rack"}
        }));
        let all = WorkloadFeatures::default();
        let pg = pod_group(meta.clone(), &urgent, 4, all);
        assert_eq!(pg.spec.disruption_mode.as_deref(), Some("PodGroup"));
        assert_eq!(pg.spec.priority_class_name.as_deref(), Some("urgent"));
        assert!(!pod_affinity(Mechanism::WorkloadApi, &urgent, all));

        // A cluster without the gates would drop the fields: none are sent,
        // and the required topology is the pods' affinity again.
        let bare = WorkloadFeatures {
            topology: false,
            preemption: false,
        };
        let pg = pod_group(meta, &urgent, 4, bare);
        assert_eq!(pg.spec.disruption_mode, Option::None);
        assert_eq!(pg.spec.priority_class_name, Option::None);
        assert_eq!(pg.spec.scheduling_constraints, Option::None);
        assert!(pod_affinity(Mechanism::WorkloadApi, &urgent, bare));
        assert!(!pod_affinity(Mechanism::Kueue, &urgent, all));
        assert!(pod_affinity(Mechanism::Scheduler, &urgent, all));
    }

    fn with_condition(status: &str, reason: &str, message: &str) -> PodGroup {
        PodGroup {
            status: Some(PodGroupStatus {
                conditions: Some(vec![Condition {
                    type_: "PodGroupScheduled".into(),
                    status: status.into(),
                    reason: reason.into(),
                    message: message.into(),
                    last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
                    observed_generation: None,
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn only_a_false_scheduled_condition_is_unschedulable() {
        assert_eq!(unschedulable(&PodGroup::default()), Option::None);
        assert_eq!(
            unschedulable(&with_condition("True", "Scheduled", "")),
            Option::None
        );
        assert_eq!(
            unschedulable(&with_condition(
                "False",
                "Unschedulable",
                "0/15 placements are available"
            ))
            .as_deref(),
            Some("Unschedulable: 0/15 placements are available")
        );
        assert_eq!(
            unschedulable(&with_condition("False", "SchedulerError", "")).as_deref(),
            Some("SchedulerError")
        );
    }
}
