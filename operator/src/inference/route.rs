//! The HTTPRoute (Kubernetes Gateway API, `gateway.networking.k8s.io/v1`)
//! that exposes a MoEInferenceService through a Gateway (`spec.route`).
//!
//! The type is the subset of HTTPRoute the operator writes and reads: the
//! Rust bindings of the Gateway API (`gateway-api` on crates.io) are built
//! against an older kube than this workspace's. Fields the apiserver
//! defaults (a parent's group and kind, a backend's weight) are left to it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{Client, CustomResource};
use moe_crds::MoEInferenceService;
use serde::{Deserialize, Serialize};

use super::build::{child_meta, child_name};

/// `HTTPRoute.spec`, as far as the operator sets it.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "HTTPRoute",
    plural = "httproutes",
    namespaced,
    status = "HttpRouteStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// What the Gateway controllers say of the route: one entry per parent.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct HttpRouteStatus {
    #[serde(default)]
    pub parents: Vec<ParentStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ParentStatus {
    pub parent_ref: ParentRef,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    #[serde(default)]
    pub matches: Vec<Match>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Match {
    pub path: PathMatch,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct PathMatch {
    #[serde(rename = "type")]
    pub type_: String,
    pub value: String,
}

/// A backend: the service's Service (the Gateway API's default kind, with
/// its port), or its InferencePool (group and kind named, no port).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct BackendRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Timeouts {
    pub request: String,
}

/// Fails, in words, unless the apiserver serves HTTPRoutes (`--gateway-api`
/// on a cluster without the Gateway API's CRDs).
pub async fn probe(client: &Client) -> anyhow::Result<()> {
    crate::reconcile::require_served::<HTTPRoute>(
        client,
        "--gateway-api",
        "install the Gateway API CRDs (standard channel) first",
    )
    .await
}

/// Why `svc` cannot be served as asked: a route without `--gateway-api`.
pub fn unsupported(svc: &MoEInferenceService, gateway_api: bool) -> Option<String> {
    (svc.spec.route.is_some() && !gateway_api).then(|| {
        "spec.route: this operator does not make HTTPRoutes; run it with --gateway-api \
         (chart value gatewayAPI.enabled) on a cluster with the Gateway API CRDs"
            .to_string()
    })
}

/// The `RouteAccepted` condition of a service, from its route as stored:
/// whether every Gateway it names accepted it and resolved its backend.
#[derive(Clone, Debug, PartialEq)]
pub struct Acceptance {
    pub accepted: bool,
    pub reason: String,
    pub message: String,
}

/// What the Gateway controllers said of `stored`, the route of `svc`.
pub fn acceptance(svc: &MoEInferenceService, stored: Option<&HTTPRoute>) -> Option<Acceptance> {
    let wanted = &svc.spec.route.as_ref()?.parent_refs;
    let parents = stored.map(|r| {
        r.status
            .as_ref()
            .map(|s| s.parents.as_slice())
            .unwrap_or_default()
    });
    Some(parents_acceptance(svc, wanted, parents, "HTTPRoute"))
}

/// Whether every Gateway in `wanted` accepted an object of the service
/// (its HTTPRoute, its InferencePool), from the `parents` its status
/// reports (`None`: the object does not exist yet): refused as soon as one
/// Gateway refuses it or cannot resolve its references (the first such
/// entry wins), accepted once all have, pending otherwise.
pub fn parents_acceptance(
    svc: &MoEInferenceService,
    wanted: &[moe_crds::RouteParent],
    parents: Option<&[ParentStatus]>,
    object: &str,
) -> Acceptance {
    let pending = |message: String| Acceptance {
        accepted: false,
        reason: "Pending".into(),
        message,
    };
    let Some(reported) = parents else {
        return pending(format!("creating the {object}"));
    };
    let ns = svc.metadata.namespace.clone().unwrap_or_default();
    let mut waiting = Vec::new();
    for parent in wanted {
        let parent_ns = parent.namespace.as_deref().unwrap_or(&ns);
        let label = format!("{parent_ns}/{}", parent.name);
        // A Gateway controller reports per parent (and listener); the
        // first entry for this Gateway that refuses wins.
        let entries: Vec<&ParentStatus> = reported
            .iter()
            .filter(|p| {
                p.parent_ref.name == parent.name
                    && p.parent_ref.namespace.as_deref().unwrap_or(&ns) == parent_ns
            })
            .collect();
        let refused = entries.iter().find_map(|p| {
            p.conditions.iter().find(|c| {
                matches!(c.type_.as_str(), "Accepted" | "ResolvedRefs") && c.status == "False"
            })
        });
        if let Some(c) = refused {
            return Acceptance {
                accepted: false,
                reason: c.reason.clone(),
                message: format!("Gateway {label}: {}", c.message),
            };
        }
        let accepted = entries.iter().any(|p| {
            p.conditions
                .iter()
                .any(|c| c.type_ == "Accepted" && c.status == "True")
        });
        if !accepted {
            waiting.push(label);
        }
    }
    if waiting.is_empty() {
        Acceptance {
            accepted: true,
            reason: "Accepted".into(),
            message: format!("accepted by {} Gateway(s)", wanted.len()),
        }
    } else {
        pending(format!(
            "waiting for the Gateway controller of {} to accept the {object}",
            waiting.join(", ")
        ))
    }
}

/// The route for `svc`, named as its Service; `None` without `spec.route`.
pub fn http_route(svc: &MoEInferenceService) -> Option<HTTPRoute> {
    let route = svc.spec.route.as_ref()?;
    let name = child_name(svc);
    Some(HTTPRoute {
        status: None,
        metadata: child_meta(svc, name.clone()),
        spec: HttpRouteSpec {
            parent_refs: route
                .parent_refs
                .iter()
                .map(|p| ParentRef {
                    name: p.name.clone(),
                    namespace: p.namespace.clone(),
                    section_name: p.section_name.clone(),
                })
                .collect(),
            hostnames: route.hostnames.clone(),
            rules: vec![Rule {
                matches: vec![Match {
                    path: PathMatch {
                        type_: "PathPrefix".into(),
                        value: route.path_prefix.clone(),
                    },
                }],
                backend_refs: vec![match &route.inference_pool {
                    None => BackendRef {
                        name,
                        port: Some(svc.spec.serving.port),
                        ..BackendRef::default()
                    },
                    Some(_) => BackendRef {
                        group: Some(super::pool::GROUP.into()),
                        kind: Some("InferencePool".into()),
                        name,
                        port: None,
                    },
                }],
                timeouts: route
                    .request_timeout
                    .clone()
                    .map(|request| Timeouts { request }),
            }],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::build::tests::service_fixture;

    #[test]
    fn the_route_sends_the_prefix_to_the_services_http_port() {
        assert!(http_route(&service_fixture(serde_json::json!({}))).is_none());
        let svc = service_fixture(serde_json::json!({"spec": {
            "serving": {"port": 8080},
            "route": {
                "parentRefs": [{"name": "public", "namespace": "gateways", "sectionName": "https"}],
                "hostnames": ["chat.example.com"],
                "pathPrefix": "/v1",
                "requestTimeout": "600s"
            }
        }}));
        let route = http_route(&svc).unwrap();
        let v = serde_json::to_value(&route).unwrap();
        assert_eq!(v["apiVersion"], "gateway.networking.k8s.io/v1");
        assert_eq!(v["kind"], "HTTPRoute");
        assert_eq!(v["metadata"]["name"], "chat");
        // The Gateway controllers' part is never written.
        assert!(v.get("status").is_none(), "{v}");
        assert_eq!(
            v["metadata"]["ownerReferences"][0]["kind"],
            "MoEInferenceService"
        );
        assert_eq!(
            v["spec"],
            serde_json::json!({
                "parentRefs": [{"name": "public", "namespace": "gateways", "sectionName": "https"}],
                "hostnames": ["chat.example.com"],
                "rules": [{
                    "matches": [{"path": {"type": "PathPrefix", "value": "/v1"}}],
                    "backendRefs": [{"name": "chat", "port": 8080}],
                    "timeouts": {"request": "600s"}
                }]
            })
        );
        // The backend is the Service the operator makes, on its HTTP port.
        let service = crate::inference::build::service(&svc);
        assert_eq!(service.metadata.name.as_deref(), Some("chat"));
        let http = &service.spec.unwrap().ports.unwrap()[0];
        assert_eq!((http.name.as_deref(), http.port), (Some("http"), 8080));
    }

    fn with_parents(svc: &MoEInferenceService, parents: serde_json::Value) -> HTTPRoute {
        let mut route = http_route(svc).unwrap();
        route.status =
            Some(serde_json::from_value(serde_json::json!({"parents": parents})).unwrap());
        route
    }

    fn reported(
        name: &str,
        ns: Option<&str>,
        conditions: &[(&str, &str, &str)],
    ) -> serde_json::Value {
        serde_json::json!({
            "parentRef": {"name": name, "namespace": ns},
            "controllerName": "example.com/gateway",
            "conditions": conditions.iter().map(|(t, s, r)| serde_json::json!({
                "type": t, "status": s, "reason": r, "message": format!("{r} said the gateway"),
                "lastTransitionTime": "2026-11-30T00:00:00Z"
            })).collect::<Vec<_>>()
        })
    }

    #[test]
    fn acceptance_needs_every_gateway_and_names_the_one_that_refuses() {
        let svc = service_fixture(serde_json::json!({"spec": {"route": {"parentRefs": [
            {"name": "public", "namespace": "gateways"}, {"name": "internal"}
        ]}}}));
        assert_eq!(
            acceptance(&service_fixture(serde_json::json!({})), None),
            None
        );
        let a = acceptance(&svc, None).unwrap();
        assert!(!a.accepted && a.reason == "Pending" && a.message == "creating the HTTPRoute");
        let a = acceptance(&svc, Some(&http_route(&svc).unwrap())).unwrap();
        assert_eq!(a.reason, "Pending");
        assert!(
            a.message.contains("gateways/public, serve/internal"),
            "{}",
            a.message
        );
        // One Gateway accepted; the other (same namespace, unnamed there) not yet.
        let half = with_parents(
            &svc,
            serde_json::json!([reported(
                "public",
                Some("gateways"),
                &[("Accepted", "True", "Accepted")]
            )]),
        );
        let a = acceptance(&svc, Some(&half)).unwrap();
        assert!(
            !a.accepted && a.message.contains("serve/internal") && !a.message.contains("public")
        );
        let both = with_parents(
            &svc,
            serde_json::json!([
                reported(
                    "public",
                    Some("gateways"),
                    &[
                        ("Accepted", "True", "Accepted"),
                        ("ResolvedRefs", "True", "ResolvedRefs")
                    ]
                ),
                reported("internal", None, &[("Accepted", "True", "Accepted")]),
            ]),
        );
        let a = acceptance(&svc, Some(&both)).unwrap();
        assert!(a.accepted && a.reason == "Accepted", "{a:?}");
        // A refusal, or a backend the Gateway cannot resolve, is the verdict.
        let refused = with_parents(
            &svc,
            serde_json::json!([
                reported(
                    "public",
                    Some("gateways"),
                    &[("Accepted", "False", "NotAllowedByListeners")]
                ),
                reported("internal", None, &[("Accepted", "True", "Accepted")]),
            ]),
        );
        let a = acceptance(&svc, Some(&refused)).unwrap();
        assert_eq!(
            (a.accepted, a.reason.as_str()),
            (false, "NotAllowedByListeners")
        );
        assert_eq!(
            a.message,
            "Gateway gateways/public: NotAllowedByListeners said the gateway"
        );
        let unresolved = with_parents(
            &svc,
            serde_json::json!([
                reported(
                    "public",
                    Some("gateways"),
                    &[("Accepted", "True", "Accepted")]
                ),
                reported(
                    "internal",
                    None,
                    &[
                        ("Accepted", "True", "Accepted"),
                        ("ResolvedRefs", "False", "BackendNotFound")
                    ]
                ),
            ]),
        );
        assert_eq!(
            acceptance(&svc, Some(&unresolved)).unwrap().reason,
            "BackendNotFound"
        );
    }

    #[test]
    fn a_route_needs_an_operator_that_makes_them() {
        let plain = service_fixture(serde_json::json!({}));
        let routed = service_fixture(
            serde_json::json!({"spec": {"route": {"parentRefs": [{"name": "public"}]}}}),
        );
        assert_eq!(unsupported(&plain, false), None);
        assert_eq!(unsupported(&routed, true), None);
        let why = unsupported(&routed, false).unwrap();
        assert!(
            why.starts_with("spec.route:") && why.contains("--gateway-api"),
            "{why}"
        );
        // The default prefix is the whole service.
        let route = http_route(&routed).unwrap();
        assert_eq!(route.spec.rules[0].matches[0].path.value, "/");
        assert_eq!(route.spec.rules[0].timeouts, None);
    }
}
