//! The InferencePool (Gateway API Inference Extension,
//! `inference.networking.k8s.io/v1`) that puts a MoEInferenceService's
//! replicas behind an endpoint picker (`spec.route.inferencePool`): the
//! Gateway asks the picker which replica takes each request (by queue
//! depth, KV-cache use, prefix affinity) instead of balancing blindly, and
//! the service's HTTPRoute sends to the pool rather than to its Service.
//!
//! As for the HTTPRoute (`route.rs`), the type is the subset the operator
//! writes; the picker itself (its Deployment, Service and configuration) is
//! the user's, e.g. from the Inference Extension's chart, pointed at this
//! pool and at the worker's metric names (docs/inference-services.md).

use kube::{Client, CustomResource};
use moe_crds::MoEInferenceService;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use super::build::{child_meta, child_name, selector_labels};
use super::route::{Acceptance, ParentStatus, parents_acceptance};

/// The Inference Extension's API group (the HTTPRoute backend's too).
pub const GROUP: &str = "inference.networking.k8s.io";

/// `InferencePool.spec`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "inference.networking.k8s.io",
    version = "v1",
    kind = "InferencePool",
    plural = "inferencepools",
    namespaced,
    status = "InferencePoolStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct InferencePoolSpec {
    pub selector: PoolSelector,
    pub target_ports: Vec<PoolPort>,
    pub endpoint_picker_ref: EndpointPickerRef,
}

/// What the Gateway controllers say of the pool: one entry per Gateway.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct InferencePoolStatus {
    #[serde(default)]
    pub parents: Vec<ParentStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PoolSelector {
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct PoolPort {
    pub number: i32,
}

/// The picker's Service (the API's default kind) and port.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPickerRef {
    pub name: String,
    pub port: PoolPort,
    pub failure_mode: String,
}

/// Fails, in words, unless the apiserver serves InferencePools.
pub async fn probe(client: &Client) -> anyhow::Result<()> {
    crate::reconcile::require_served::<InferencePool>(
        client,
        "--inference-pool",
        "install the Gateway API Inference Extension CRDs first",
    )
    .await
}

/// Why `svc` cannot be served as asked: a pool without `--inference-pool`.
pub fn unsupported(svc: &MoEInferenceService, inference_pool: bool) -> Option<String> {
    let wants = svc
        .spec
        .route
        .as_ref()
        .is_some_and(|r| r.inference_pool.is_some());
    (wants && !inference_pool).then(|| {
        "spec.route.inferencePool: this operator does not make InferencePools; run it with \
         --inference-pool (chart value gatewayAPI.inferencePool) on a cluster with the Gateway \
         API Inference Extension CRDs"
            .to_string()
    })
}

/// The `InferencePoolAccepted` condition of a service with a pool: what
/// the Gateways its route attaches to say of `stored`, its pool.
pub fn acceptance(svc: &MoEInferenceService, stored: Option<&InferencePool>) -> Option<Acceptance> {
    let route = svc.spec.route.as_ref()?;
    route.inference_pool.as_ref()?;
    let parents = stored.map(|p| {
        p.status
            .as_ref()
            .map(|s| s.parents.as_slice())
            .unwrap_or_default()
    });
    Some(parents_acceptance(
        svc,
        &route.parent_refs,
        parents,
        "InferencePool",
    ))
}

/// The pool for `svc`, named as its Service: the pods that take requests
/// (one-pod replicas, or each group's leader) on the serving port.
pub fn inference_pool(svc: &MoEInferenceService) -> Option<InferencePool> {
    let picker = svc.spec.route.as_ref()?.inference_pool.as_ref()?;
    let mut labels = selector_labels(svc);
    if svc.spec.parallelism.pods_per_replica > 1 {
        labels.insert(crate::labels::POD_INDEX.into(), "0".into());
    }
    Some(InferencePool {
        status: None,
        metadata: child_meta(svc, child_name(svc)),
        spec: InferencePoolSpec {
            selector: PoolSelector {
                match_labels: labels,
            },
            target_ports: vec![PoolPort {
                number: svc.spec.serving.port,
            }],
            endpoint_picker_ref: EndpointPickerRef {
                name: picker.endpoint_picker.name.clone(),
                port: PoolPort {
                    number: picker.endpoint_picker.port,
                },
                failure_mode: picker.endpoint_picker.failure_mode.as_str().into(),
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::build::tests::service_fixture;
    use crate::inference::route::http_route;

    fn routed(extra: serde_json::Value) -> MoEInferenceService {
        let mut spec = serde_json::json!({"spec": {
            "serving": {"port": 8080},
            "route": {"parentRefs": [{"name": "public"}]}
        }});
        moe_crds::fixtures::merge_patch(&mut spec, &extra);
        service_fixture(spec)
    }

    #[test]
    fn the_pool_takes_the_serving_pods_and_the_route_sends_to_it() {
        let plain = routed(serde_json::json!({}));
        assert!(inference_pool(&plain).is_none());
        let backend =
            serde_json::to_value(&http_route(&plain).unwrap().spec.rules[0].backend_refs).unwrap();
        assert_eq!(backend, serde_json::json!([{"name": "chat", "port": 8080}]));

        let svc = routed(serde_json::json!({"spec": {"route": {
            "inferencePool": {"endpointPicker": {"name": "chat-epp"}}
        }}}));
        let v = serde_json::to_value(inference_pool(&svc).unwrap()).unwrap();
        assert_eq!(v["apiVersion"], "inference.networking.k8s.io/v1");
        assert_eq!(v["metadata"]["name"], "chat");
        assert_eq!(
            v["metadata"]["ownerReferences"][0]["kind"],
            "MoEInferenceService"
        );
        assert_eq!(
            v["spec"],
            serde_json::json!({
                "selector": {"matchLabels": {
                    "moe.dev/role": "server", "moe.dev/service-name": "chat"
                }},
                "targetPorts": [{"number": 8080}],
                "endpointPickerRef": {"name": "chat-epp", "port": {"number": 9002}, "failureMode": "FailClose"}
            })
        );
        let backend =
            serde_json::to_value(&http_route(&svc).unwrap().spec.rules[0].backend_refs).unwrap();
        assert_eq!(
            backend,
            serde_json::json!([{"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "chat"}])
        );
        // Replica groups: only each group's leader takes requests.
        let groups = routed(serde_json::json!({"spec": {
            "parallelism": {"processesPerPod": 4, "podsPerReplica": 2, "expertParallel": 8},
            "route": {"inferencePool": {"endpointPicker": {"name": "epp", "port": 9100, "failureMode": "FailOpen"}}}
        }}));
        let v = serde_json::to_value(inference_pool(&groups).unwrap()).unwrap();
        assert_eq!(
            v["spec"]["selector"]["matchLabels"]["apps.kubernetes.io/pod-index"],
            "0"
        );
        assert_eq!(
            v["spec"]["endpointPickerRef"],
            serde_json::json!({"name": "epp", "port": {"number": 9100}, "failureMode": "FailOpen"})
        );
        // What the Gateways say of it becomes InferencePoolAccepted.
        assert_eq!(acceptance(&plain, None), None, "no pool, no condition");
        let pending = acceptance(&svc, None).unwrap();
        assert_eq!(
            (pending.accepted, pending.reason.as_str()),
            (false, "Pending")
        );
        assert_eq!(pending.message, "creating the InferencePool");
        let says = |status: &str, reason: &str| -> InferencePool {
            let mut pool = inference_pool(&svc).unwrap();
            pool.status = serde_json::from_value(serde_json::json!({"parents": [{
                "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "public"},
                "conditions": [{"type": "Accepted", "status": status, "reason": reason,
                                "message": "said the Gateway", "lastTransitionTime": "2026-11-30T00:00:00Z"}]
            }]}))
            .unwrap();
            pool
        };
        let accepted = acceptance(&svc, Some(&says("True", "Accepted"))).unwrap();
        assert!(accepted.accepted, "{accepted:?}");
        let refused = acceptance(&svc, Some(&says("False", "NotSupportedByGateway"))).unwrap();
        assert_eq!(
            (
                refused.accepted,
                refused.reason.as_str(),
                refused.message.as_str()
            ),
            (
                false,
                "NotSupportedByGateway",
                "Gateway serve/public: said the Gateway"
            )
        );
        let silent = acceptance(&svc, Some(&inference_pool(&svc).unwrap())).unwrap();
        assert!(
            silent
                .message
                .contains("serve/public to accept the InferencePool"),
            "{silent:?}"
        );
        // Without --inference-pool the spec cannot be honoured, and says why.
        assert!(
            unsupported(&svc, false)
                .unwrap()
                .contains("--inference-pool")
        );
        assert_eq!(unsupported(&svc, true), None);
        assert_eq!(unsupported(&plain, false), None);
    }
}
