//! Kueue's objects for tests, through the real Kueue that `up.sh` runs:
//! ResourceFlavors over the pools only Kueue's tests reach (`nodes.sh`), a
//! ClusterQueue per test namespace, its LocalQueue, and a Topology of the
//! fake nodes' block and rack labels. Cluster-scoped objects are named after
//! the test namespace and removed by [`KueueSetup::delete`].

use anyhow::Result;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

/// Kueue's pools of fake nodes (`tests/cluster/nodes.sh`). A ClusterQueue's
/// quota is the test's own, the nodes are shared: the tests of one test
/// binary run at once (binaries one after another), so within a binary each
/// test takes its own pool. training.rs: quota test `QUOTA_POOL`, topology
/// test `TAS_POOL`, examples `SPARE_POOL`; inference.rs: group admission
/// `QUOTA_POOL`, preemption `SPARE_POOL`, examples `TAS_POOL`.
pub const QUOTA_POOL: &str = "kueue-quota";
pub const SPARE_POOL: &str = "kueue-spare";
pub const TAS_POOL: &str = "kueue-tas";
/// 4 nodes, for the elastic job that Kueue admits only once it has shrunk
/// to its quota, and that grows back when the quota does.
pub const ELASTIC_KUEUE_POOL: &str = "kueue-elastic";

/// The fake cluster's topology levels, widest first.
pub const LEVELS: [&str; 3] = [
    "topology.moe.dev/block",
    "topology.moe.dev/rack",
    "kubernetes.io/hostname",
];

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("kueue.x-k8s.io", "v1beta2", kind),
        plural,
    )
}

fn cluster_api(client: &Client, kind: &str, plural: &str) -> Api<DynamicObject> {
    Api::all_with(client.clone(), &resource(kind, plural))
}

/// Server-side apply of one Kueue object (cluster-scoped unless `namespace`).
async fn apply(client: &Client, namespace: Option<&str>, object: Value) -> Result<()> {
    let kind = object["kind"].as_str().unwrap_or_default().to_string();
    let plural = match kind.as_str() {
        "Topology" => "topologies".to_string(),
        k => format!("{}s", k.to_lowercase()),
    };
    let ar = resource(&kind, &plural);
    let api: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let params = PatchParams::apply("moe-e2e").force();
    api.patch(name, &params, &Patch::Apply(&object)).await?;
    Ok(())
}

/// What one test set up in Kueue: a flavor over `pool`, a ClusterQueue that
/// only the test's namespace may use, with `gpus` of quota, and a LocalQueue
/// of it in that namespace ([`KueueSetup::QUEUE`] unless named otherwise).
pub struct KueueSetup {
    client: Client,
    name: String,
    topology: bool,
}

impl KueueSetup {
    /// The LocalQueue jobs name in `placement.queueName`.
    pub const QUEUE: &'static str = "gpus";

    /// `topology`: the flavor carries a Topology of [`LEVELS`], so Kueue
    /// places each admitted gang (topology-aware scheduling).
    pub async fn create(
        client: &Client,
        namespace: &str,
        pool: &str,
        gpus: u32,
        topology: bool,
    ) -> Result<Self> {
        Self::with_queue(client, namespace, Self::QUEUE, pool, gpus, topology).await
    }

    /// As [`KueueSetup::create`], with the LocalQueue named `queue`.
    pub async fn with_queue(
        client: &Client,
        namespace: &str,
        queue: &str,
        pool: &str,
        gpus: u32,
        topology: bool,
    ) -> Result<Self> {
        let name = namespace.to_string();
        if topology {
            let levels: Vec<Value> = LEVELS.iter().map(|l| json!({"nodeLabel": l})).collect();
            apply(
                client,
                None,
                json!({
                    "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Topology",
                    "metadata": {"name": name},
                    "spec": {"levels": levels}
                }),
            )
            .await?;
        }
        let mut flavor = json!({
            "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor",
            "metadata": {"name": name},
            "spec": {
                "nodeLabels": {"node.moe.dev/pool": pool},
                "tolerations": [{"key": "moe.dev/pool", "operator": "Equal", "value": pool, "effect": "NoSchedule"}]
            }
        });
        if topology {
            flavor["spec"]["topologyName"] = json!(name);
        }
        apply(client, None, flavor).await?;
        let setup = Self {
            client: client.clone(),
            name,
            topology,
        };
        setup.set_gpus(gpus).await?;
        apply(
            client,
            Some(namespace),
            json!({
                "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
                "metadata": {"name": queue, "namespace": namespace},
                "spec": {"clusterQueue": setup.name}
            }),
        )
        .await?;
        Ok(setup)
    }

    /// (Re)writes the ClusterQueue, only the test namespace's, with `gpus`
    /// of quota: Kueue admits what waits as soon as the quota fits it.
    pub async fn set_gpus(&self, gpus: u32) -> Result<()> {
        let name = &self.name;
        let queue = json!({
            "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue",
            "metadata": {"name": name},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}},
                "preemption": {"withinClusterQueue": "LowerPriority"},
                "resourceGroups": [{
                    "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                    "flavors": [{"name": name, "resources": [
                        {"name": "cpu", "nominalQuota": "1000"},
                        {"name": "memory", "nominalQuota": "10Ti"},
                        {"name": "nvidia.com/gpu", "nominalQuota": gpus.to_string()}
                    ]}]
                }]
            }
        });
        apply(&self.client, None, queue).await
    }

    /// The Workloads Kueue made for the namespace's jobs, by owning Job name.
    pub async fn workloads(&self) -> Result<Vec<(String, DynamicObject)>> {
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            &self.name,
            &resource("Workload", "workloads"),
        );
        let list = api.list(&Default::default()).await?.items;
        Ok(list
            .into_iter()
            .map(|w| {
                let owner = w
                    .owner_references()
                    .first()
                    .map(|o| o.name.clone())
                    .unwrap_or_default();
                (owner, w)
            })
            .collect())
    }

    /// Removes the cluster-scoped objects (the namespace's go with it).
    pub async fn delete(self) -> Result<()> {
        let dp = DeleteParams::default();
        for (kind, plural) in [
            ("ClusterQueue", "clusterqueues"),
            ("ResourceFlavor", "resourceflavors"),
        ] {
            let _ = cluster_api(&self.client, kind, plural)
                .delete(&self.name, &dp)
                .await;
        }
        if self.topology {
            let _ = cluster_api(&self.client, "Topology", "topologies")
                .delete(&self.name, &dp)
                .await;
        }
        Ok(())
    }
}

/// Whether a Workload is admitted (its `Admitted` condition is True).
pub fn admitted(workload: &DynamicObject) -> bool {
    workload.data["status"]["conditions"]
        .as_array()
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Admitted" && c["status"] == "True")
        })
}
