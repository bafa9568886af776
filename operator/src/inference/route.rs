//! The HTTPRoute (Kubernetes Gateway API, `gateway.networking.k8s.io/v1`)
//! that exposes a MoEInferenceService through a Gateway (`spec.route`).
//!
//! The type is the subset of HTTPRoute the operator writes and reads: the
//! Rust bindings of the Gateway API (`gateway-api` on crates.io) are built
//! against an older kube than this workspace's. Fields the apiserver
//! defaults (a parent's group and kind, a backend's weight) are left to it.

use kube::{Client, CustomResource, Resource};
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

/// A Service backend (the Gateway API's default kind).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct BackendRef {
    pub name: String,
    pub port: i32,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Timeouts {
    pub request: String,
}

/// Fails, in words, unless the apiserver serves HTTPRoutes (`--gateway-api`
/// on a cluster without the Gateway API's CRDs).
pub async fn probe(client: &Client) -> anyhow::Result<()> {
    let version = HTTPRoute::api_version(&());
    let served = crate::reconcile::served::<HTTPRoute>(client)
        .await
        .map_err(|e| anyhow::Error::new(e).context("discovering HTTPRoutes"))?;
    anyhow::ensure!(
        served,
        "--gateway-api: the apiserver does not serve {version} httproutes; install the Gateway API CRDs (standard channel) first"
    );
    Ok(())
}

/// Why `svc` cannot be served as asked: a route without `--gateway-api`.
pub fn unsupported(svc: &MoEInferenceService, gateway_api: bool) -> Option<String> {
    (svc.spec.route.is_some() && !gateway_api).then(|| {
        "spec.route: this operator does not make HTTPRoutes; run it with --gateway-api \
         (chart value gatewayAPI.enabled) on a cluster with the Gateway API CRDs"
            .to_string()
    })
}

/// The route for `svc`, named as its Service; `None` without `spec.route`.
pub fn http_route(svc: &MoEInferenceService) -> Option<HTTPRoute> {
    let route = svc.spec.route.as_ref()?;
    let name = child_name(svc);
    Some(HTTPRoute {
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
                backend_refs: vec![BackendRef {
                    name,
                    port: svc.spec.serving.port,
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
