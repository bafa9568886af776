//! The I/O machinery every controller of the operator shares: reflector
//! stores of children, server-side apply that writes only when something
//! changed, status apply, Events, per-object exponential backoff, and the
//! condition upsert whose `lastTransitionTime` moves only on a flip. One copy,
//! so the training and serving controllers keep the same write discipline
//! (zero API writes when nothing changed) and the same failure behaviour.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::warn;

use crate::labels;
use crate::metrics::Metrics;

/// Errors of one reconcile; all are transient API failures and retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "conflict",
            Error::Kube(kube::Error::Api(_)) => "api",
            Error::Kube(_) => "transport",
        }
    }
}

/// An `Api` of a namespaced kind in one namespace, or in all.
pub fn api<K>(client: &Client, ns: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// A watch of one child kind reflected into a store (managed fields dropped:
/// they are most of an object's size and never read), and the stream of
/// changed objects that triggers reconciles of their owners.
pub fn reflected<K>(
    api: Api<K>,
    config: watcher::Config,
) -> (
    Store<K>,
    impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store::<K>();
    let stream = watcher(api, config)
        .default_backoff()
        .modify(|o| o.managed_fields_mut().clear())
        .reflect(writer)
        .touched_objects();
    (store, stream)
}

/// Consecutive reconcile failures per object, for exponential backoff.
pub struct Backoff<K: Resource<DynamicType = ()>> {
    failures: Mutex<HashMap<ObjectRef<K>, u32>>,
}

impl<K: Resource<DynamicType = ()>> Default for Backoff<K> {
    fn default() -> Self {
        Self {
            failures: Mutex::new(HashMap::new()),
        }
    }
}

impl<K> Backoff<K>
where
    K: Resource<DynamicType = ()>,
    ObjectRef<K>: Hash + Eq,
{
    /// Records a failure of `obj`; the delay before its retry: 1 s, 2 s, 4 s, …, capped at 5 minutes.
    pub fn failed(&self, obj: &K) -> Duration {
        let n = {
            let mut failures = self.failures.lock().expect("not poisoned");
            let n = failures.entry(ObjectRef::from_obj(obj)).or_insert(0);
            *n = n.saturating_add(1);
            *n
        };
        Duration::from_secs(1u64 << (n - 1).min(8)).min(Duration::from_secs(300))
    }

    /// A successful reconcile starts the count again.
    pub fn succeeded(&self, obj: &K) {
        self.failures
            .lock()
            .expect("not poisoned")
            .remove(&ObjectRef::from_obj(obj));
    }
}

/// A namespaced kind the controllers create, apply, delete or patch the
/// status of: every child object and both custom resources.
pub trait Child:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + serde::Serialize
    + serde::de::DeserializeOwned
    + std::fmt::Debug
{
}

impl<K> Child for K where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug
{
}

/// Whether the apiserver serves `K` (its group version lists the resource):
/// how the optional integrations check the cluster at start.
pub async fn served<K>(client: &Client) -> Result<bool, kube::Error>
where
    K: Resource<DynamicType = ()>,
{
    match client.list_api_group_resources(&K::api_version(&())).await {
        Ok(list) => Ok(list.resources.iter().any(|r| r.name == K::plural(&()))),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Fails, in words, unless the apiserver serves `K`: what an optional
/// integration checks at start. `flag` turned it on; `remedy` says what the
/// cluster needs.
pub async fn require_served<K>(client: &Client, flag: &str, remedy: &str) -> anyhow::Result<()>
where
    K: Resource<DynamicType = ()>,
{
    let (version, plural) = (K::api_version(&()), K::plural(&()));
    let found = served::<K>(client)
        .await
        .map_err(|e| anyhow::Error::new(e).context(format!("discovering {plural}")))?;
    anyhow::ensure!(
        found,
        "{flag}: the apiserver does not serve {version} {plural}; {remedy}"
    );
    Ok(())
}

/// Server-side apply `desired` unless the stored copy already has every field it sets.
pub async fn apply_if_changed<K>(
    client: &Client,
    metrics: &Metrics,
    ns: &str,
    desired: K,
    store: &Store<K>,
) -> Result<(), Error>
where
    K: Child,
{
    let name = desired.name_any();
    let current = store.get(&ObjectRef::new(&name).within(ns));
    let want = serde_json::to_value(&desired).expect("objects serialise");
    if let Some(cur) = current {
        let have = serde_json::to_value(cur.as_ref()).expect("objects serialise");
        if is_subset(&want, &have) {
            return Ok(());
        }
    }
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let mut body = want;
    body["apiVersion"] = json!(K::api_version(&()));
    body["kind"] = json!(K::kind(&()));
    api.patch(
        &name,
        &PatchParams::apply(labels::FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    metrics.api_call("apply", &K::plural(&()));
    Ok(())
}

/// Creates `object` in `ns`; one already there (an earlier reconcile made
/// it before the store saw it) is fine. Returns whether this call created it.
pub async fn create_once<K>(
    client: &Client,
    metrics: &Metrics,
    ns: &str,
    object: &K,
) -> Result<bool, Error>
where
    K: Child,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let params = PostParams {
        field_manager: Some(labels::FIELD_MANAGER.into()),
        ..Default::default()
    };
    let created = match api.create(&params, object).await {
        Ok(_) => true,
        Err(kube::Error::Api(s)) if s.code == 409 => false,
        Err(e) => return Err(e.into()),
    };
    metrics.api_call("create", &K::plural(&()));
    Ok(created)
}

/// Deletes `name` in `ns` in the background (its dependents follow; a
/// successor need not wait); one already gone is fine. Returns whether
/// this call deleted it.
pub async fn delete_if_present<K>(
    client: &Client,
    metrics: &Metrics,
    ns: &str,
    name: &str,
) -> Result<bool, Error>
where
    K: Child,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let deleted = match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => true,
        Err(kube::Error::Api(s)) if s.code == 404 => false,
        Err(e) => return Err(e.into()),
    };
    metrics.api_call("delete", &K::plural(&()));
    Ok(deleted)
}

/// Whether every field set in `want` has the same value in `have` (server
/// defaults may add more). Lists must match element by element.
pub fn is_subset(want: &serde_json::Value, have: &serde_json::Value) -> bool {
    use serde_json::Value::*;
    match (want, have) {
        (Object(w), Object(h)) => w
            .iter()
            .all(|(k, v)| v.is_null() || h.get(k).is_some_and(|hv| is_subset(v, hv))),
        (Array(w), Array(h)) => w.len() == h.len() && w.iter().zip(h).all(|(a, b)| is_subset(a, b)),
        (w, h) => w == h,
    }
}

/// Server-side apply of `obj`'s status. Callers compare first: an unchanged
/// status is never written.
pub async fn apply_status<K>(
    client: &Client,
    metrics: &Metrics,
    obj: &K,
    status: &impl serde::Serialize,
) -> Result<(), Error>
where
    K: Child,
{
    let api: Api<K> = Api::namespaced(client.clone(), &obj.namespace().unwrap_or_default());
    let body = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(labels::FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    metrics.api_call("apply", &format!("{}/status", K::plural(&())));
    Ok(())
}

/// Records an Event on `obj`. Best effort: a failure to record one must not fail the reconcile.
pub async fn publish<K>(
    recorder: &Recorder,
    metrics: &Metrics,
    obj: &K,
    warning: bool,
    reason: &str,
    message: &str,
) where
    K: Resource<DynamicType = ()>,
{
    let event = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(message.chars().take(1024).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &obj.object_ref(&())).await {
        warn!(error = %e, reason, "could not publish event");
    }
    metrics.api_call("create", "events");
    if warning {
        metrics.warning(&K::kind(&()), reason);
    }
}

/// Upsert a condition; `lastTransitionTime` moves only when the status flips,
/// so an unchanged world produces an identical status (and no write).
pub fn set_condition(
    conds: &mut Vec<Condition>,
    type_: &str,
    on: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) {
    let status = if on { "True" } else { "False" };
    let new = Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: now.clone(),
    };
    match conds.iter_mut().find(|c| c.type_ == type_) {
        Some(c) if c.status == status => {
            c.reason = new.reason;
            c.message = new.message;
            c.observed_generation = generation;
        }
        Some(c) => *c = new,
        None => conds.push(new),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subset_ignores_server_defaults_but_not_changes() {
        let want = serde_json::json!({"spec": {"ports": [{"name": "a", "port": 1}]}});
        let have = serde_json::json!({"spec": {"ports": [{"name": "a", "port": 1, "protocol": "TCP"}], "type": "ClusterIP"}});
        assert!(is_subset(&want, &have));
        let changed =
            serde_json::json!({"spec": {"ports": [{"name": "a", "port": 2, "protocol": "TCP"}]}});
        assert!(!is_subset(&want, &changed));
        let more = serde_json::json!({"spec": {"ports": [{"name": "a", "port": 1}, {"name": "b", "port": 2}]}});
        assert!(!is_subset(&want, &more));
    }

    #[test]
    fn a_condition_keeps_its_transition_time_until_it_flips() {
        let t0 = Time(k8s_openapi::jiff::Timestamp::from_second(0).unwrap());
        let t1 = Time(k8s_openapi::jiff::Timestamp::from_second(60).unwrap());
        let mut conds = vec![];
        set_condition(&mut conds, "Ready", false, "A", "a", Some(1), &t0);
        set_condition(&mut conds, "Ready", false, "B", "b", Some(2), &t1);
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0].last_transition_time, t0);
        assert_eq!(conds[0].reason, "B");
        set_condition(&mut conds, "Ready", true, "C", "c", Some(2), &t1);
        assert_eq!(conds[0].last_transition_time, t1);
        assert_eq!(conds[0].status, "True");
    }
}
