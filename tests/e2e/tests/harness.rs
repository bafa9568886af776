//! Proof that the test control plane is real: admission, scheduling of GPUs,
//! the Job and garbage-collector controllers, RBAC with ServiceAccount tokens,
//! and KWOK's failure injection all behave as on a production cluster.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Result, ensure};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use moe_e2e::{TestNamespace, admin_client, api_message, api_status, eventually, token_client};
use serde_json::json;

const H100: &str = "NVIDIA-H100-80GB-HBM3";

fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn gpu_job(
    name: &str,
    completions: i32,
    pod_labels: serde_json::Value,
    pod_annotations: serde_json::Value,
) -> Job {
    serde_json::from_value(json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "completionMode": "Indexed",
            "completions": completions,
            "parallelism": completions,
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": pod_labels, "annotations": pod_annotations},
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": {"nvidia.com/gpu.product": H100},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "containers": [{
                        "name": "worker",
                        "image": "moe-worker:e2e",
                        "resources": {"limits": {"nvidia.com/gpu": "8"}}
                    }]
                }
            }
        }
    }))
    .expect("valid Job")
}

fn job_condition(job: &Job, type_: &str) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == type_ && c.status == "True"))
}

async fn job_pods(pods: &Api<Pod>, job: &str) -> Result<Vec<Pod>> {
    Ok(pods
        .list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}")))
        .await?
        .items)
}

#[tokio::test]
async fn fake_gpu_pool_is_ready_with_eight_gpus_per_node() -> Result<()> {
    let client = admin_client().await?;
    let nodes = Api::<Node>::all(client);
    let h100 = nodes
        .list(&ListParams::default().labels(&format!("nvidia.com/gpu.product={H100}")))
        .await?
        .items;
    ensure!(
        h100.len() >= 16,
        "expected at least 16 H100 nodes, found {}",
        h100.len()
    );
    for node in &h100 {
        let name = node.metadata.name.as_deref().unwrap_or_default();
        ensure!(node_ready(node), "{name} is not Ready");
        let alloc = node
            .status
            .as_ref()
            .and_then(|s| s.allocatable.as_ref())
            .cloned()
            .unwrap_or_default();
        ensure!(
            alloc.get("nvidia.com/gpu").map(|q| q.0.as_str()) == Some("8"),
            "{name}: allocatable {alloc:?}"
        );
        let taints = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        ensure!(
            taints
                .iter()
                .any(|t| t.key == "nvidia.com/gpu" && t.effect == "NoSchedule"),
            "{name} lacks the GPU taint"
        );
        let labels = node.metadata.labels.clone().unwrap_or_default();
        for key in ["topology.moe.dev/block", "topology.moe.dev/rack"] {
            ensure!(
                labels.contains_key(key),
                "{name} lacks topology label {key}"
            );
        }
    }
    let cpu = nodes
        .list(&ListParams::default().labels("node.moe.dev/pool=cpu"))
        .await?
        .items;
    ensure!(
        !cpu.is_empty() && cpu.iter().all(node_ready),
        "CPU-only nodes missing or not Ready"
    );
    ensure!(
        cpu.iter().all(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.allocatable.as_ref())
                .is_none_or(|a| !a.contains_key("nvidia.com/gpu"))
        }),
        "a CPU-only node advertises GPUs"
    );
    Ok(())
}

#[tokio::test]
async fn restricted_namespace_rejects_privileged_pod_and_admits_compliant_one() -> Result<()> {
    let client = admin_client().await?;
    let ns = TestNamespace::create(
        &client,
        "psa",
        &[("pod-security.kubernetes.io/enforce", "restricted")],
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);

    let privileged: Pod = serde_json::from_value(json!({
        "metadata": {"name": "privileged"},
        "spec": {"containers": [{"name": "c", "image": "busybox", "securityContext": {"privileged": true}}]}
    }))?;
    let err = pods
        .create(&PostParams::default(), &privileged)
        .await
        .expect_err("privileged pod must be rejected");
    ensure!(
        api_status(&err) == Some(403),
        "expected 403 Forbidden, got {err}"
    );
    let msg = api_message(&err);
    ensure!(
        msg.contains("violates PodSecurity \"restricted"),
        "unexpected rejection: {msg}"
    );
    ensure!(
        msg.contains("privileged"),
        "rejection does not name the privileged field: {msg}"
    );

    let compliant: Pod = serde_json::from_value(json!({
        "metadata": {"name": "compliant"},
        "spec": {
            "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "c", "image": "busybox", "securityContext": {
                "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}, "runAsUser": 1000
            }}]
        }
    }))?;
    pods.create(&PostParams::default(), &compliant).await?;
    ns.delete().await
}

#[tokio::test]
async fn indexed_gpu_job_lands_on_h100_pool_and_completes() -> Result<()> {
    let client = admin_client().await?;
    let ns = TestNamespace::create(&client, "gpujob", &[]).await?;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);

    // Held Running, all four pods hold their 8 GPUs at once: KWOK would
    // otherwise complete each at once and free its node for the next.
    jobs.create(
        &PostParams::default(),
        &gpu_job("train", 4, json!({"kwok.test/hold": "true"}), json!({})),
    )
    .await?;
    let running = eventually(
        "4 pods running at once",
        Duration::from_secs(120),
        || async {
            let ps = job_pods(&pods, "train").await?;
            let up = ps
                .iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .count();
            Ok((up == 4).then_some(ps))
        },
    )
    .await?;
    let mut nodes = BTreeMap::new();
    for pod in &running {
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        ensure!(
            node.starts_with("gpu-h100-"),
            "pod {:?} ran on {node}",
            pod.metadata.name
        );
        let index = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("batch.kubernetes.io/job-completion-index"));
        nodes.insert(index.cloned().unwrap_or_default(), node);
    }
    // 8 GPUs per pod and 8 per node: the scheduler must spread them one per node.
    let distinct: std::collections::BTreeSet<_> = nodes.values().collect();
    ensure!(distinct.len() == 4, "pods shared nodes: {nodes:?}");
    ensure!(
        nodes.keys().cloned().collect::<Vec<_>>() == ["0", "1", "2", "3"],
        "indices {nodes:?}"
    );

    // Released, they complete, and so does the Job.
    for pod in &running {
        let patch = json!({"metadata": {"labels": {"kwok.test/hold": null}}});
        pods.patch(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    }
    eventually(
        "Job train to complete",
        Duration::from_secs(120),
        || async { Ok(job_condition(&jobs.get("train").await?, "Complete").then_some(())) },
    )
    .await?;
    let done = job_pods(&pods, "train").await?;
    ensure!(done.len() == 4, "expected 4 pods, found {}", done.len());
    ensure!(
        done.iter()
            .all(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded")),
        "not every pod succeeded"
    );

    // Negative control: without the GPU toleration nothing fits, so the taint is real.
    let mut untolerated = gpu_job("no-toleration", 1, json!({}), json!({}));
    untolerated
        .spec
        .as_mut()
        .unwrap()
        .template
        .spec
        .as_mut()
        .unwrap()
        .tolerations = None;
    jobs.create(&PostParams::default(), &untolerated).await?;
    let pod = eventually(
        "the untolerated pod to be reported unschedulable",
        Duration::from_secs(60),
        || async {
            let ps = job_pods(&pods, "no-toleration").await?;
            Ok(ps.into_iter().find(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| {
                        cs.iter().any(|c| {
                            c.type_ == "PodScheduled"
                                && c.status == "False"
                                && c.reason.as_deref() == Some("Unschedulable")
                        })
                    })
            }))
        },
    )
    .await?;
    ensure!(
        pod.spec.and_then(|s| s.node_name).is_none(),
        "untolerated pod was bound"
    );
    ns.delete().await
}

#[tokio::test]
async fn kwok_holds_a_pod_running_then_fails_it_with_a_chosen_exit_code() -> Result<()> {
    let client = admin_client().await?;
    let ns = TestNamespace::create(&client, "chaos", &[]).await?;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);

    let annotations = json!({"pod-container-running-failed.stage.kwok.x-k8s.io/exit-code": "42",
                             "pod-container-running-failed.stage.kwok.x-k8s.io/delay": "100ms"});
    jobs.create(
        &PostParams::default(),
        &gpu_job("held", 1, json!({"kwok.test/hold": "true"}), annotations),
    )
    .await?;
    let pod = eventually("the held pod to run", Duration::from_secs(60), || async {
        let ps = job_pods(&pods, "held").await?;
        Ok(ps
            .into_iter()
            .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")))
    })
    .await?;
    let name = pod.metadata.name.clone().unwrap();
    // Held: still Running a while later, where pod-complete would have finished it at once.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let phase = pods.get(&name).await?.status.and_then(|s| s.phase);
    ensure!(phase.as_deref() == Some("Running"), "held pod is {phase:?}");

    // Swap the hold label for the failure label in one patch.
    let patch = json!({"metadata": {"labels": {"kwok.test/hold": null,
                                               "pod-container-running-failed.stage.kwok.x-k8s.io": "true"}}});
    pods.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let failed = eventually("the pod to fail", Duration::from_secs(60), || async {
        let p = pods.get(&name).await?;
        Ok((p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed")).then_some(p))
    })
    .await?;
    let code = failed
        .status
        .and_then(|s| s.container_statuses)
        .and_then(|cs| cs.into_iter().next())
        .and_then(|c| c.state)
        .and_then(|s| s.terminated)
        .map(|t| t.exit_code);
    ensure!(code == Some(42), "exit code {code:?}");
    eventually("Job held to fail", Duration::from_secs(60), || async {
        Ok(job_condition(&jobs.get("held").await?, "Failed").then_some(()))
    })
    .await?;
    ns.delete().await
}

#[tokio::test]
async fn deleting_an_owner_garbage_collects_its_dependents() -> Result<()> {
    let client = admin_client().await?;
    let ns = TestNamespace::create(&client, "gc", &[]).await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let owner = cms
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: ObjectMeta {
                    name: Some("owner".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await?;
    let dependent = ConfigMap {
        metadata: ObjectMeta {
            name: Some("dependent".into()),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "ConfigMap".into(),
                name: "owner".into(),
                uid: owner.metadata.uid.clone().unwrap(),
                ..Default::default()
            }]),
            ..Default::default()
        },
        ..Default::default()
    };
    cms.create(&PostParams::default(), &dependent).await?;
    cms.delete("owner", &DeleteParams::background()).await?;
    // The garbage collector works from its own informers: allow for its resync.
    eventually(
        "dependent to be garbage-collected",
        Duration::from_secs(90),
        || async { Ok(cms.get_opt("dependent").await?.is_none().then_some(())) },
    )
    .await?;
    ns.delete().await
}

#[tokio::test]
async fn serviceaccount_token_with_narrow_role_is_refused_outside_it() -> Result<()> {
    let client = admin_client().await?;
    let ns = TestNamespace::create(&client, "rbac", &[]).await?;
    let other = TestNamespace::create(&client, "rbac-other", &[]).await?;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns.name);
    sas.create(
        &PostParams::default(),
        &ServiceAccount {
            metadata: ObjectMeta {
                name: Some("reader".into()),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await?;
    let role = Role {
        metadata: ObjectMeta {
            name: Some("configmap-reader".into()),
            ..Default::default()
        },
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["configmaps".into()]),
            verbs: vec!["get".into(), "list".into()],
            ..Default::default()
        }]),
    };
    Api::<Role>::namespaced(client.clone(), &ns.name)
        .create(&PostParams::default(), &role)
        .await?;
    let binding = RoleBinding {
        metadata: ObjectMeta {
            name: Some("reader".into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: "configmap-reader".into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: "reader".into(),
            namespace: Some(ns.name.clone()),
            ..Default::default()
        }]),
    };
    Api::<RoleBinding>::namespaced(client.clone(), &ns.name)
        .create(&PostParams::default(), &binding)
        .await?;

    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let issued = sas
        .create_token_request("reader", &PostParams::default(), &request)
        .await?;
    let token = issued.status.and_then(|s| s.token).unwrap_or_default();
    ensure!(!token.is_empty(), "TokenRequest returned no token");
    let sa = token_client(&token).await?;

    // Inside the Role: allowed (RBAC may take a moment to see the new binding).
    let own: Api<ConfigMap> = Api::namespaced(sa.clone(), &ns.name);
    eventually(
        "the bound token to list ConfigMaps",
        Duration::from_secs(30),
        || async { Ok(own.list(&ListParams::default()).await.ok().map(|_| ())) },
    )
    .await?;
    // Outside it: another resource, and the same resource in another namespace.
    let secrets = Api::<Secret>::namespaced(sa.clone(), &ns.name)
        .list(&ListParams::default())
        .await;
    let err = secrets.expect_err("secrets must be refused");
    ensure!(api_status(&err) == Some(403), "secrets: {err}");
    ensure!(
        api_message(&err).contains(&format!("system:serviceaccount:{}:reader", ns.name)),
        "{}",
        api_message(&err)
    );
    let elsewhere = Api::<ConfigMap>::namespaced(sa.clone(), &other.name)
        .list(&ListParams::default())
        .await;
    ensure!(api_status(&elsewhere.expect_err("other namespace must be refused")) == Some(403));
    let write = own
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: ObjectMeta {
                    name: Some("nope".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await;
    ensure!(api_status(&write.expect_err("create must be refused")) == Some(403));
    other.delete().await?;
    ns.delete().await
}

#[tokio::test]
async fn a_node_can_be_made_not_ready_and_recover() -> Result<()> {
    let client = admin_client().await?;
    let nodes = Api::<Node>::all(client);
    // cpu-2 is the pool's designated chaos node: no other harness test schedules onto it by name.
    let name = "cpu-2";
    let set = |v: Option<&str>| json!({"metadata": {"labels": {"node-not-ready.stage.kwok.x-k8s.io": v}}});
    nodes
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(&set(Some("true"))),
        )
        .await?;
    eventually(
        "cpu-2 to turn NotReady",
        Duration::from_secs(60),
        || async { Ok((!node_ready(&nodes.get(name).await?)).then_some(())) },
    )
    .await?;
    // The node-lifecycle controller reacts to it like to a real node loss.
    eventually(
        "the not-ready taint on cpu-2",
        Duration::from_secs(60),
        || async {
            let n = nodes.get(name).await?;
            let taints = n.spec.and_then(|s| s.taints).unwrap_or_default();
            Ok(taints
                .iter()
                .any(|t| t.key == "node.kubernetes.io/not-ready")
                .then_some(()))
        },
    )
    .await?;
    nodes
        .patch(name, &PatchParams::default(), &Patch::Merge(&set(None)))
        .await?;
    eventually(
        "cpu-2 to be Ready again",
        Duration::from_secs(60),
        || async { Ok(node_ready(&nodes.get(name).await?).then_some(())) },
    )
    .await?;
    Ok(())
}
