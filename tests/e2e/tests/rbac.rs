//! The operator's permissions are exactly the chart's, and the chart grants
//! nothing the operator does not use, read from the apiserver's audit trail.
//!
//! The training, inference and gitops suites run the operator with the token
//! of the ServiceAccount that `helm install` of the chart created (see
//! `moe_e2e::operator::install`), and they pass: the chart grants enough.
//! `tests/cluster/up.sh` has the apiserver audit every request of that one
//! identity; this test then checks the converse: every (API group, resource,
//! verb) the chart's roles grant was used at least once, and no request was
//! refused. A rule the operator stopped needing, or a new call the chart lacks,
//! fails it.
//!
//! One check the apiserver makes is not a request of its own, so the audit
//! trail shows it only through the request that caused it: a server-side
//! apply that creates its object (a `patch` answered 201) is authorized as
//! `create` too.
//!
//! So it must run after those suites, on the same plane: `tests/run.sh` runs it
//! as its own phase (`cargo test -p moe-e2e --test rbac -- --ignored`).

use std::collections::BTreeSet;

use anyhow::{Context, Result, ensure};
use moe_e2e::operator::{HARNESS_VALUES, OPERATOR_NAMESPACE, RELEASE, SERVICE_ACCOUNT, sh};
use serde::Deserialize;
use serde_json::Value;

/// One permission: API group ("" for core), resource (`name/subresource`), verb.
type Permission = (String, String, String);

/// What the chart's roles grant the operator, rendered with the values the
/// harness installs it with.
fn granted() -> Result<BTreeSet<Permission>> {
    let yaml = sh(&format!(
        "helm template {RELEASE} charts/moe-operator --namespace {OPERATOR_NAMESPACE} \
           {HARNESS_VALUES} --show-only templates/rbac.yaml"
    ))?;
    let mut out = BTreeSet::new();
    for document in serde_yaml::Deserializer::from_str(&yaml) {
        let role = Value::deserialize(document)?;
        if !matches!(role["kind"].as_str(), Some("ClusterRole" | "Role")) {
            continue;
        }
        for rule in role["rules"].as_array().context("a role without rules")? {
            let strings = |key: &str| -> Vec<String> {
                rule[key]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            };
            for group in strings("apiGroups") {
                for resource in strings("resources") {
                    for verb in strings("verbs") {
                        out.insert((group.clone(), resource.clone(), verb));
                    }
                }
            }
        }
    }
    ensure!(out.len() >= 20, "too few rules rendered: {out:?}");
    Ok(out)
}

/// The requests of the operator's ServiceAccount in the audit log: those
/// that were allowed, and those refused (403 with the authorizer's
/// decision not "allow").
fn audited() -> Result<(BTreeSet<Permission>, BTreeSet<Permission>)> {
    let state = std::env::var("MOE_CLUSTER_STATE")
        .context("MOE_CLUSTER_STATE unset: source tests/cluster/.state/env")?;
    let path = format!("{state}/logs/audit.log");
    let log = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let user = format!("system:serviceaccount:{OPERATOR_NAMESPACE}:{SERVICE_ACCOUNT}");
    let (mut allowed, mut refused) = (BTreeSet::new(), BTreeSet::new());
    for line in log.lines() {
        let event: Value = serde_json::from_str(line)?;
        if event["user"]["username"].as_str() != Some(user.as_str()) {
            continue;
        }
        // Non-resource requests (discovery, /version) need no role rules.
        let Some(resource) = event["objectRef"]["resource"].as_str() else {
            continue;
        };
        let resource = match event["objectRef"]["subresource"].as_str() {
            Some(sub) => format!("{resource}/{sub}"),
            None => resource.to_string(),
        };
        let permission = (
            event["objectRef"]["apiGroup"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            resource,
            event["verb"].as_str().unwrap_or_default().to_string(),
        );
        let code = event["responseStatus"]["code"].as_u64();
        // Refused by RBAC: the authorizer's decision. A 403 it allowed came
        // from admission (an event created in a namespace being deleted, as
        // a test ends): not a missing rule, and the call was authorized.
        let decision = event["annotations"]["authorization.k8s.io/decision"].as_str();
        if code == Some(403) && decision != Some("allow") {
            refused.insert(permission);
            continue;
        }
        let (group, resource, verb) = permission.clone();
        allowed.insert(permission);
        if verb == "patch" && code == Some(201) {
            allowed.insert((group, resource, "create".to_string()));
        }
    }
    Ok((allowed, refused))
}

fn lines(set: &BTreeSet<Permission>) -> String {
    set.iter()
        .map(|(g, r, v)| format!("  {v} {r} (apiGroup {g:?})"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
#[ignore = "reads the audit trail of the training, inference and gitops suites: \
            tests/run.sh runs it after them with --ignored"]
async fn every_permission_the_chart_grants_is_used_and_none_is_refused() -> Result<()> {
    let granted = granted()?;
    let (allowed, refused) = audited()?;
    ensure!(
        !allowed.is_empty(),
        "no request of the operator's ServiceAccount in the audit log: \
         run the training and inference suites on this plane first"
    );
    ensure!(
        refused.is_empty(),
        "the apiserver refused the operator (the chart lacks these):\n{}",
        lines(&refused)
    );
    let beyond: BTreeSet<Permission> = allowed.difference(&granted).cloned().collect();
    ensure!(
        beyond.is_empty(),
        "allowed but not granted by the chart (another role grants them?):\n{}",
        lines(&beyond)
    );
    let unused: BTreeSet<Permission> = granted.difference(&allowed).cloned().collect();
    ensure!(
        unused.is_empty(),
        "the chart grants what the operator never used in the e2e suites \
         (remove it, or add the flow that needs it):\n{}",
        lines(&unused)
    );
    Ok(())
}
