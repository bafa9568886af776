//! MoEInferenceService end to end: the real operator binary, with its own
//! ServiceAccount token and the chart's RBAC, against the real control plane
//! (KWOK makes Deployment pods Running and Ready, as a kubelet would once the
//! probes pass). Each test has its own Pod Security "restricted" namespace and
//! operator.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::scheduling::v1alpha2::PodGroup;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use moe_crds::fixtures::{invalid_inference_services, merge_patch, valid_inference_service};
use moe_crds::{MoEInferenceService, MoETrainingJob, TrainingPhase};
use moe_e2e::hub::FakeHub;
use moe_e2e::kubelet::Kubelet;
use moe_e2e::kueue::{KueueSetup, QUOTA_POOL, SPARE_POOL, TAS_POOL};
use moe_e2e::operator::{Operator, install, operator_can, sh};
use moe_e2e::{
    GANG_POOL, HOLD, TestNamespace, UrgentClass, WORKLOAD_API, admin_client, bound_claim,
    eventually, gpu_job, metric_sum, on_pool, rejection_problems, release_job, rendered_config,
};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(90);
/// A KWOK stage of the test plane fails the readiness of Running pods with this label.
const NOT_READY: &str = "kwok.test/not-ready";
const SELECTOR: &str = "moe.dev/role=server,moe.dev/service-name";

async fn restricted_ns(client: &Client, prefix: &str) -> Result<TestNamespace> {
    TestNamespace::create(
        client,
        prefix,
        &[("pod-security.kubernetes.io/enforce", "restricted")],
    )
    .await
}

/// A service of `replicas` one-pod replicas with 8 H100s each, from a volume.
fn gpu_service(name: &str, replicas: i32, extra: Value) -> MoEInferenceService {
    let mut v = json!({
        "apiVersion": "moe.dev/v1alpha1",
        "kind": "MoEInferenceService",
        "metadata": {"name": name},
        "spec": {
            "model": {"volume": {"claimName": "moe-models", "path": "moe-9b"}},
            "replicas": replicas,
            "parallelism": {"processesPerPod": 8, "expertParallel": 8},
            "placement": {"gpuType": "H100"},
            "worker": {"image": "moe-worker:v1"}
        }
    });
    merge_patch(&mut v, &extra);
    serde_json::from_value(v).expect("valid MoEInferenceService")
}

fn condition<'a>(
    svc: &'a MoEInferenceService,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    svc.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// Waits until Ready is True with `ready` ready and updated replicas, for the current generation.
async fn wait_ready(
    api: &Api<MoEInferenceService>,
    name: &str,
    ready: i32,
) -> Result<MoEInferenceService> {
    eventually(
        &format!("{name} to be Ready with {ready} replicas"),
        WAIT,
        || async {
            let s = api.get(name).await?;
            let st = s.status.clone().unwrap_or_default();
            Ok((condition(&s, "Ready").is_some_and(|c| c.status == "True")
                && st.observed_generation == s.metadata.generation
                && st.ready_replicas == ready
                && st.updated_replicas == ready
                && st.replicas == ready)
                .then_some(s))
        },
    )
    .await
}

async fn server_pods(pods: &Api<Pod>, name: &str) -> Result<Vec<Pod>> {
    let list = pods
        .list(&ListParams::default().labels(&format!("{SELECTOR}={name}")))
        .await?;
    Ok(list
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect())
}

fn node_of(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default()
}

/// (kstatus status, Argo CD status, Argo CD message) of the live object: the
/// kstatus library's verdict (Flux, kpt) and the shipped Argo CD health check,
/// run with gopher-lua by the `kstatus` harness tool (as tests/gitops.rs does).
fn verdicts(ns: &str, name: &str) -> Result<(String, String, String)> {
    let out = sh(&format!(
        "set -o pipefail; kubectl get moeinferenceservice {name} -n {ns} -o json |
         kstatus --argocd-lua deploy/argocd/resource_customizations/moe.dev/MoEInferenceService/health.lua"
    ))?;
    let v: Value =
        serde_json::from_str(out.trim()).with_context(|| format!("kstatus said {out}"))?;
    let s = |p: &str| {
        v.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    Ok((
        s("/kstatus/status"),
        s("/argocd/status"),
        s("/argocd/message"),
    ))
}

fn expect_verdicts(ns: &str, name: &str, kstatus: &str, argocd: &str, message: &str) -> Result<()> {
    let (k, a, m) = verdicts(ns, name)?;
    ensure!(
        k == kstatus && a == argocd && m.contains(message),
        "{name}: kstatus {k}, Argo CD {a} {m:?}; want {kstatus}, {argocd} ~{message:?}"
    );
    Ok(())
}

/// Waits for an Event of `reason` about `name`. The operator writes the
/// status and records the Event at once, so a test that saw the status may
/// look before the Event is there.
async fn wait_event(client: &Client, ns: &str, name: &str, reason: &str) -> Result<()> {
    eventually(&format!("a {reason} event about {name}"), WAIT, || async {
        let reasons = event_reasons(client, ns, name).await?;
        Ok(reasons.iter().any(|r| r == reason).then_some(()))
    })
    .await
}

async fn event_reasons(client: &Client, ns: &str, name: &str) -> Result<Vec<String>> {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let list = events.list(&ListParams::default()).await?;
    Ok(list
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter_map(|e| e.reason)
        .collect())
}

#[tokio::test]
async fn every_example_is_served_on_the_fake_cluster() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mis-examples").await?;
    // As the harness installs it: with the Gateway API and InferencePools
    // (examples have a route, one behind an endpoint picker).
    let _op = Operator::start_with(&ns.name, &["--gateway-api", "--inference-pool"]).await?;
    bound_claim(&ns.name, "moe-models").await?;
    let dir = moe_e2e::operator::repo_root().join("examples/inference");
    let mut files: Vec<_> = std::fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.sort();
    ensure!(files.len() >= 3, "examples: {files:?}");
    let api: Api<MoEInferenceService> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns.name);
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &ns.name);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns.name);
    let mut kueue = None;
    for file in &files {
        let mut svc: MoEInferenceService = serde_yaml::from_str(&std::fs::read_to_string(file)?)?;
        svc.metadata.namespace = Some(ns.name.clone());
        let name = svc.name_any();
        let cpu = svc.spec.worker.device == moe_crds::Device::Cpu;
        let queued = svc.spec.placement.queue_name.is_some();
        if let Some(queue) = &svc.spec.placement.queue_name {
            // The queue the example names, in the real Kueue, over the pool
            // of its topology-aware scheduling.
            ensure!(kueue.is_none(), "{name}: one queued example per namespace");
            kueue =
                Some(KueueSetup::with_queue(&client, &ns.name, queue, TAS_POOL, 64, true).await?);
        }
        api.create(&PostParams::default(), &svc).await?;
        let ready = wait_ready(&api, &name, svc.spec.replicas).await?;
        if svc.spec.route.is_some() {
            eventually(&format!("{name}: its HTTPRoute"), WAIT, || async {
                http_route(&ns.name, &name)
            })
            .await?;
        }
        if svc
            .spec
            .route
            .as_ref()
            .is_some_and(|r| r.inference_pool.is_some())
        {
            eventually(&format!("{name}: its InferencePool"), WAIT, || async {
                inference_pool(&ns.name, &name)
            })
            .await?;
        }
        let status = ready.status.clone().unwrap_or_default();
        ensure!(
            status.url.as_deref() == Some(&format!("http://{name}.{}.svc:8000", ns.name)),
            "{name}: url {:?}",
            status.url
        );
        // Multi-pod replicas: only the leaders (pod index 0) take requests.
        let leaders = if svc.spec.parallelism.pods_per_replica > 1 {
            "apps.kubernetes.io/pod-index=0,"
        } else {
            ""
        };
        ensure!(
            status.selector.as_deref() == Some(&format!("{leaders}{SELECTOR}={name}")),
            "{name}: selector {:?}",
            status.selector
        );
        ensure!(condition(&ready, "Available").is_some_and(|c| c.status == "True"));
        ensure!(condition(&ready, "Reconciling").is_some_and(|c| c.status == "False"));
        ensure!(condition(&ready, "Stalled").is_some_and(|c| c.status == "False"));
        // The children, each owned by the service.
        let svc_obj = services.get(&name).await?;
        let port = svc_obj
            .spec
            .as_ref()
            .and_then(|s| s.ports.clone())
            .unwrap_or_default();
        ensure!(
            port.iter()
                .any(|p| p.name.as_deref() == Some("http") && p.port == 8000)
        );
        let per_replica = svc.spec.parallelism.pods_per_replica;
        if per_replica == 1 {
            let dep = deployments.get(&name).await?;
            ensure!(dep.spec.as_ref().and_then(|s| s.replicas) == Some(svc.spec.replicas));
        } else {
            let groups = groups_of(&sets, &name).await?;
            ensure!(
                groups.len() as i32 == svc.spec.replicas,
                "{name}: groups {groups:?}"
            );
        }
        // Every pod of every replica. Eventually: a full suite runs other
        // queued tests beside this one, and a group's pod that Kueue stops
        // and readmits is away for a moment while the service still says
        // Ready (it keeps its incarnation; docs/inference-services.md).
        let want = svc.spec.replicas * per_replica;
        let live = eventually(&format!("{name}: {want} server pods"), WAIT, || async {
            let live = server_pods(&pods, &name).await?;
            Ok((live.len() as i32 == want).then_some(live))
        })
        .await?;
        ensure!(pdbs.get_opt(&name).await?.is_some(), "{name}: no PDB");
        ensure!(
            hpas.get_opt(&name).await?.is_some() == svc.spec.autoscaling.is_some(),
            "{name}: HPA iff autoscaling"
        );
        // `placement.topology`: each group's pods in one domain of the label.
        if let Some((key, _)) = svc.spec.placement.topology.as_ref().and_then(|t| t.key()) {
            let nodes: Api<Node> = Api::all(client.clone());
            let mut domains: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for pod in &live {
                let group = pod
                    .labels()
                    .get("moe.dev/group")
                    .cloned()
                    .unwrap_or_default();
                let domain = nodes.get(&node_of(pod)).await?.labels().get(key).cloned();
                domains
                    .entry(group)
                    .or_default()
                    .insert(domain.unwrap_or_default());
            }
            ensure!(
                domains.values().all(|d| d.len() == 1),
                "{name}: groups across domains of {key}: {domains:?}"
            );
        }
        for pod in live {
            let node = node_of(&pod);
            let want = match (cpu, queued) {
                (true, _) => "cpu-",
                (false, true) => "gpu-kueue-tas-",
                (false, false) => "gpu-h100-",
            };
            ensure!(
                node.starts_with(want),
                "{name}: pod {} on {node}",
                pod.name_any()
            );
        }
        wait_event(&client, &ns.name, &name, "ReplicasReady").await?;
    }
    ns.delete().await?;
    match kueue {
        Some(k) => k.delete().await,
        None => Ok(()),
    }
}

#[tokio::test]
async fn scale_subresource_image_rollout_and_autoscaler_lifecycle() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mis-scale").await?;
    let op = Operator::start(&ns.name).await?;
    bound_claim(&ns.name, "moe-models").await?;
    let api: Api<MoEInferenceService> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &ns.name);
    api.create(&PostParams::default(), &gpu_service("chat", 2, json!({})))
        .await?;
    wait_ready(&api, "chat", 2).await?;

    // An unchanged world: a reconcile (triggered by an annotation) writes nothing.
    // Ready is reported as soon as the pods are; the Deployments' own status
    // (available replicas, their Progressing condition) may still move for a
    // moment after, and the operator rightly records that. So first wait until
    // no write has happened for two seconds: the world is unchanged from then on.
    let writes = |m: &str| metric_sum(m, "moe_operator_api_writes_total");
    let mut before = writes(&op.metrics().await?);
    let mut quiet = 0;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = writes(&op.metrics().await?);
        quiet = if now == before { quiet + 1 } else { 0 };
        before = now;
        if quiet == 2 {
            break;
        }
    }
    ensure!(quiet == 2, "the operator kept writing for 30 s after Ready");
    let touch = json!({"metadata": {"annotations": {"e2e/touch": "1"}}});
    api.patch("chat", &PatchParams::default(), &Patch::Merge(&touch))
        .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = writes(&op.metrics().await?);
    ensure!(
        after == before,
        "a no-op reconcile wrote {} times",
        after - before
    );

    // kubectl scale goes through the /scale subresource to spec.replicas and the Deployment.
    sh(&format!(
        "kubectl scale -n {} mis/chat --replicas=3",
        ns.name
    ))?;
    let scale = sh(&format!(
        "kubectl get -n {} mis/chat --subresource=scale -o jsonpath='{{.spec.replicas}} {{.status.selector}}'",
        ns.name
    ))?;
    ensure!(scale.starts_with("3 "), "scale: {scale}");
    wait_ready(&api, "chat", 3).await?;
    let dep = deployments.get("chat").await?;
    ensure!(dep.spec.as_ref().and_then(|s| s.replicas) == Some(3));
    // The scale subresource's selector finds exactly the server pods.
    let selector = scale
        .trim()
        .split_once(' ')
        .map(|(_, s)| s.to_string())
        .unwrap_or_default();
    let selected = pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .items;
    ensure!(
        selected
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .count()
            == 3,
        "selector {selector} selects {} pods",
        selected.len()
    );

    // A new image rolls the replicas, never more than replicas + maxSurge (0) at once.
    let image = json!({"spec": {"worker": {"image": "moe-worker:v2"}}});
    api.patch("chat", &PatchParams::default(), &Patch::Merge(&image))
        .await?;
    let most = std::sync::atomic::AtomicUsize::new(0);
    eventually("the rollout to v2 to finish", WAIT, || async {
        let live = server_pods(&pods, "chat").await?;
        most.fetch_max(live.len(), std::sync::atomic::Ordering::Relaxed);
        let s = api.get("chat").await?;
        let all_new = !live.is_empty()
            && live.iter().all(|p| {
                p.spec.as_ref().map(|s| s.containers[0].image.as_deref())
                    == Some(Some("moe-worker:v2"))
            });
        let ready = condition(&s, "Ready").is_some_and(|c| c.status == "True")
            && s.status.as_ref().and_then(|st| st.observed_generation) == s.metadata.generation;
        Ok((all_new && live.len() == 3 && ready).then_some(()))
    })
    .await?;
    let most = most.into_inner();
    ensure!(
        most <= 3,
        "the rollout ran {most} pods at once (replicas 3, maxSurge 0)"
    );
    wait_event(&client, &ns.name, "chat", "Updating").await?;

    // A new model rolls the replicas too, and the status says which one is served.
    let model = json!({"spec": {"model": {"volume": {"path": "moe-9b-v2"}}}});
    api.patch("chat", &PatchParams::default(), &Patch::Merge(&model))
        .await?;
    eventually("the rollout to the new model to finish", WAIT, || async {
        let s = api.get("chat").await?;
        let revision = s.status.as_ref().and_then(|st| st.model_revision.clone());
        let live = server_pods(&pods, "chat").await?;
        let on_new = live.len() == 3
            && live.iter().all(|p| {
                p.annotations()
                    .get("moe.dev/model-revision")
                    .map(String::as_str)
                    == Some("pvc/moe-models/moe-9b-v2 (native)")
            });
        let ready = condition(&s, "Ready").is_some_and(|c| c.status == "True")
            && s.status.as_ref().and_then(|st| st.observed_generation) == s.metadata.generation;
        Ok(
            (on_new && ready && revision.as_deref() == Some("pvc/moe-models/moe-9b-v2 (native)"))
                .then_some(()),
        )
    })
    .await?;

    // Autoscaling: the operator's HPA targets the service's /scale; replicas
    // outside its bounds are refused, naming the field; switching it off deletes the HPA.
    let auto = json!({"spec": {"autoscaling": {"minReplicas": 2, "maxReplicas": 4, "targetConcurrency": 16}}});
    api.patch("chat", &PatchParams::default(), &Patch::Merge(&auto))
        .await?;
    let hpa = eventually("the HPA", WAIT, || async {
        hpas.get_opt("chat").await.map_err(Into::into)
    })
    .await?;
    ensure!(hpa.spec.scale_target_ref.kind == "MoEInferenceService");
    ensure!(hpa.spec.max_replicas == 4);
    let err = sh(&format!(
        "kubectl scale -n {} mis/chat --replicas=5",
        ns.name
    ))
    .expect_err("replicas above autoscaling.maxReplicas");
    ensure!(
        format!("{err:#}").contains("spec.replicas"),
        "the rejection names the field: {err:#}"
    );
    let off = json!({"spec": {"autoscaling": null}});
    api.patch("chat", &PatchParams::default(), &Patch::Merge(&off))
        .await?;
    eventually("the HPA to be deleted", WAIT, || async {
        Ok(hpas.get_opt("chat").await?.is_none().then_some(()))
    })
    .await?;
    ns.delete().await
}

/// Sets the autoscaling metric of every live server pod of `name` to `value`
/// in the test plane's custom metrics adapter (what a metrics pipeline would
/// report from the workers' `/metrics`).
fn set_inflight(ns: &str, pods: &[Pod], value: i64) -> Result<()> {
    let url = std::env::var("MOE_METRICS_WRITE_URL")
        .context("MOE_METRICS_WRITE_URL unset: source tests/cluster/.state/env")?;
    for pod in pods {
        sh(&format!(
            "curl -fsS -XPOST -H 'Content-Type: application/json' --data-raw '\"{value}\"' \
             {url}/namespaces/{ns}/pods/{}/{}",
            pod.name_any(),
            moe_operator::inference::build::CONCURRENCY_METRIC
        ))?;
    }
    Ok(())
}

/// Whether the last write of `spec.replicas` came through the `/scale`
/// subresource from the controller-manager (the HPA), per managedFields.
fn scaled_by_hpa(svc: &MoEInferenceService) -> bool {
    svc.metadata.managed_fields.iter().flatten().any(|f| {
        f.subresource.as_deref() == Some("scale")
            && f.manager
                .as_deref()
                .is_some_and(|m| m.starts_with("kube-controller-manager"))
    })
}

#[tokio::test]
async fn an_hpa_scales_the_service_up_and_down_through_its_scale_subresource() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mis-hpa").await?;
    let _op = Operator::start(&ns.name).await?;
    bound_claim(&ns.name, "moe-models").await?;
    let api: Api<MoEInferenceService> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &ns.name);
    let auto = json!({"spec": {"autoscaling": {"minReplicas": 1, "maxReplicas": 4, "targetConcurrency": 16}}});
    api.create(&PostParams::default(), &gpu_service("chat", 1, auto))
        .await?;
    wait_ready(&api, "chat", 1).await?;
    let start = std::time::Instant::now();

    // 64 requests in flight per replica, 16 wanted: the HPA asks for 4 replicas
    // (its maximum) through /scale, and the operator follows with pods. Every
    // pod reports the load (new ones too, as soon as they exist).
    let up = eventually("the HPA to scale chat to 4 replicas", WAIT, || async {
        let live = server_pods(&pods, "chat").await?;
        set_inflight(&ns.name, &live, 64)?;
        let s = api.get("chat").await?;
        let st = s.status.clone().unwrap_or_default();
        Ok((s.spec.replicas == 4 && st.ready_replicas == 4 && live.len() == 4).then_some(s))
    })
    .await?;
    let scaled_up = start.elapsed();
    ensure!(
        scaled_by_hpa(&up),
        "replicas were not written through /scale by the HPA: {:?}",
        up.metadata.managed_fields
    );
    let dep = deployments.get("chat").await?;
    ensure!(
        dep.spec.as_ref().and_then(|s| s.replicas) == Some(4),
        "the Deployment follows spec.replicas"
    );
    let hpa = hpas.get("chat").await?;
    let hpa_status = hpa.status.clone().unwrap_or_default();
    ensure!(
        hpa_status.desired_replicas == 4,
        "HPA status {hpa_status:?}"
    );
    wait_ready(&api, "chat", 4).await?;

    // Load falls to 1 per replica: after the (test plane's 10 s) downscale
    // stabilization the HPA goes back to its minimum.
    let down_from = std::time::Instant::now();
    eventually("the HPA to scale chat back to 1 replica", WAIT, || async {
        let live = server_pods(&pods, "chat").await?;
        set_inflight(&ns.name, &live, 1)?;
        let s = api.get("chat").await?;
        Ok((s.spec.replicas == 1 && live.len() == 1).then_some(()))
    })
    .await?;
    wait_ready(&api, "chat", 1).await?;
    let rescaled = event_reasons(&client, &ns.name, "chat")
        .await?
        .iter()
        .filter(|r| *r == "SuccessfulRescale")
        .count();
    ensure!(
        rescaled >= 2,
        "{rescaled} SuccessfulRescale events of the HPA"
    );
    eprintln!(
        "hpa: 1 -> 4 replicas ready in {scaled_up:?}, 4 -> 1 in {:?}",
        down_from.elapsed()
    );
    ns.delete().await
}

/// Sets or removes `kwok.test/not-ready` on a pod: a KWOK stage then fails
/// (or passes again) its readiness, as a kubelet's readiness probe would.
async fn set_not_ready(pods: &Api<Pod>, name: &str, not_ready: bool) -> Result<()> {
    let value = if not_ready {
        json!("true")
    } else {
        Value::Null
    };
    let patch = json!({"metadata": {"labels": {NOT_READY: value}}});
    pods.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// A Hub model (`model.huggingface`) whose download the Hub refuses. The
/// test plays the kubelet for the server pod's init container: KWOK holds
/// it running (tests/cluster/kwok-stages.yaml), and the service says
/// `DownloadingModel`; then the test runs the init container's own command
/// (the real `moe-worker fetch`, against a Hub that answers 401) and reports
/// its exit code and termination message through KWOK, and the service is
/// `Stalled` with reason `DownloadFailed` in the worker's words (a token is
/// needed), never Ready.
#[tokio::test]
async fn a_hub_download_the_hub_refuses_stalls_the_service_in_the_workers_words() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mis-hub").await?;
    let _op = Operator::start(&ns.name).await?;
    let api: Api<MoEInferenceService> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let hub = FakeHub::refusing()?.endpoint;
    let svc = gpu_service(
        "gated",
        1,
        json!({"spec": {
            "model": {"volume": null, "huggingface": {"repo": "moe-tests/gated-moe", "endpoint": hub}},
            "worker": {"podMetadata": {"labels": {"kwok.test/init": "hold"}}}
        }}),
    );
    api.create(&PostParams::default(), &svc).await?;
    let reason = |s: &MoEInferenceService, type_: &str| {
        condition(s, type_)
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
            .unwrap_or_default()
    };
    eventually(
        "the service to say the model is downloading",
        WAIT,
        || async {
            let s = api.get("gated").await?;
            Ok((reason(&s, "Ready").1 == "DownloadingModel").then_some(()))
        },
    )
    .await?;

    // The kubelet's part: run the init container's command, as the pod would.
    let pod = server_pods(&pods, "gated")
        .await?
        .into_iter()
        .next()
        .context("no server pod")?;
    let kubelet = Kubelet::new("hub")?;
    // The volume's mount point, here a scratch directory.
    let (code, message) = kubelet.run_download(&pod, &[("--into", kubelet.path("models"))])?;
    ensure!(code == 2, "exit {code}: {message}");
    kubelet
        .report(&pods, &pod.name_any(), "init", code, &message)
        .await?;
    // Pods are not watched: the operator looks again within 30 s while a
    // download runs; a touch of the service has it look now.
    let touch = json!({"metadata": {"annotations": {"e2e.moe.dev/touch": "1"}}});
    api.patch("gated", &PatchParams::default(), &Patch::Merge(&touch))
        .await?;
    let stalled = eventually("the service to stall on the download", WAIT, || async {
        let s = api.get("gated").await?;
        Ok((reason(&s, "Stalled").1 == "DownloadFailed").then_some(s))
    })
    .await?;
    let (status, _, message) = reason(&stalled, "Ready");
    ensure!(status == "False");
    ensure!(reason(&stalled, "Stalled").0 == "True");
    ensure!(
        message.contains("exit code 2")
            && message.contains("401")
            && message.contains("model.huggingface.tokenSecret"),
        "{message}"
    );
    wait_event(&client, &ns.name, "gated", "DownloadFailed").await?;
    ns.delete().await
}

/// A Hub model on a branch that moves while the replicas start. The test
/// plays the kubelet for each server pod's init container: it runs the
/// pod's own `moe-worker fetch` against a Hub whose `main` it moves between
/// the two pods (both on one claim, here a scratch directory), and reports
/// each exit through KWOK (`test-pod-init-done`), with the worker's report of
/// the commit as the termination message. Both replicas serve, but two
/// commits: the service is Degraded (`ModelCommitSkew`, naming each commit's
/// pod) and has no `modelCommit`. The older pod deleted, its replacement
/// fetches the branch's commit, and the service has one commit again.
#[tokio::test]
async fn replicas_that_downloaded_two_commits_of_a_branch_degrade_the_service() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mis-commits").await?;
    let _op = Operator::start(&ns.name).await?;
    let api: Api<MoEInferenceService> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let (old, new) = ("c0ffee".repeat(6) + "abcd", "beef".repeat(10));
    // Each commit holds a config.json of its own: all a fetch needs.
    let config = |commit: &str| {
        vec![(
            "config.json".to_string(),
            json!({"model_type": "moe-test", "commit": commit})
                .to_string()
                .into_bytes(),
        )]
    };
    let hub = FakeHub::start(&old, config(&old))?;
    let svc = gpu_service(
        "chat",
        2,
        json!({"spec": {
            "model": {"volume": null, "huggingface": {"repo": "moe-tests/moving-moe", "endpoint": hub.endpoint}},
            "worker": {"podMetadata": {"labels": {"kwok.test/init": "hold"}}}
        }}),
    );
    api.create(&PostParams::default(), &svc).await?;
    let kubelet = Kubelet::new("commits")?;
    // Runs pod `name`'s init container as the kubelet would, and reports it.
    let fetch_for = |pod: Pod| {
        let kubelet = &kubelet;
        let pods = &pods;
        async move {
            // One claim for every pod; a link of each pod's own.
            let (code, message) = kubelet.run_download(
                &pod,
                &[
                    ("--into", kubelet.path("claim")),
                    ("--link", kubelet.path(&pod.name_any()).join("model")),
                ],
            )?;
            ensure!(code == 0, "exit {code}: {message}");
            kubelet
                .report(pods, &pod.name_any(), "init", code, &message)
                .await?;
            anyhow::Ok(message)
        }
    };
    let downloading = || async {
        let list = server_pods(&pods, "chat").await?;
        anyhow::Ok(
            list.into_iter()
                .filter(|p| {
                    p.annotations().get("kwok.test/init-exit-code").is_none()
                        && p.status
                            .as_ref()
                            .and_then(|s| s.init_container_statuses.as_ref())
                            .and_then(|c| c.first())
                            .and_then(|c| c.state.as_ref())
                            .is_some_and(|s| s.running.is_some())
                })
                .collect::<Vec<_>>(),
        )
    };
    let started = eventually("both pods to be downloading", WAIT, || async {
        let list = downloading().await?;
        Ok((list.len() == 2).then_some(list))
    })
    .await?;
    let (first, second) = (started[0].name_any(), started[1].name_any());
    let report = fetch_for(started[0].clone()).await?;
    ensure!(report.contains(&old), "{report}");
    hub.push(&new, config(&new));
    let report = fetch_for(started[1].clone()).await?;
    ensure!(report.contains(&new), "{report}");

    let skewed = eventually(
        "the service to be degraded by two commits",
        WAIT,
        || async {
            let s = api.get("chat").await?;
            let ready = condition(&s, "Ready").is_some_and(|c| c.status == "True");
            let skew = condition(&s, "Degraded")
                .is_some_and(|c| c.status == "True" && c.reason == "ModelCommitSkew");
            Ok((ready && skew).then_some(s))
        },
    )
    .await?;
    let message = &condition(&skewed, "Degraded")
        .context("no Degraded")?
        .message;
    ensure!(
        message.contains(&format!("{} (pod {first})", &old[..12]))
            && message.contains(&format!("{} (pod {second})", &new[..12])),
        "{message}"
    );
    ensure!(
        skewed
            .status
            .as_ref()
            .and_then(|s| s.model_commit.clone())
            .is_none()
    );
    wait_event(&client, &ns.name, "chat", "ModelCommitSkew").await?;

    // The older pod goes; its replacement downloads what `main` names now.
    pods.delete(&first, &DeleteParams::default()).await?;
    let replacement = eventually("a replacement pod to be downloading", WAIT, || async {
        let list = downloading().await?;
        Ok(list
            .into_iter()
            .find(|p| p.name_any() != first && p.name_any() != second))
    })
    .await?;
    let report = fetch_for(replacement).await?;
    ensure!(report.contains(&new), "{report}");
    eventually("the service to serve one commit", WAIT, || async {
        let s = api.get("chat").await?;
        let one = s.status.as_ref().and_then(|s| s.model_commit.as_deref()) == Some(new.as_str());
        let degraded = condition(&s, "Degraded").is_some_and(|c| c.status == "True");
        Ok((one && !degraded).then_some(()))
    })
    .await?;
    ns.delete().await
}

/// A server that cannot load its model. The test plays the kubelet: it
/// runs the server container's own command (the real `moe-worker serve`)
/// with the pod's own environment and the config the operator rendered,
/// on a machine without the model, and reports the exit through KWOK
/// (`test-pod-crashloop`). The service is `Stalled`, reason
/// `ServerFailing`, in the worker's words, and `Degraded` while the other
/// replica serves.
#[tokio::test]
async fn a_server_that_cannot_load_its_model_stalls_the_service_in_the_workers_words() -> Result<()>
{
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mis-crash").await?;
    let _op = Operator::start(&ns.name).await?;
    bound_claim(&ns.name, "moe-models").await?;
    let api: Api<MoEInferenceService> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let cpu = json!({"spec": {
        "parallelism": {"processesPerPod": 1, "expertParallel": 1},
        "placement": {"gpuType": null},
        "worker": {"device": "cpu"}
    }});
    api.create(&PostParams::default(), &gpu_service("chat", 2, cpu))
        .await?;
    wait_ready(&api, "chat", 2).await?;
    let pod = server_pods(&pods, "chat")
        .await?
        .into_iter()
        .next()
        .context("no server pod")?;
    // The config the pod mounts, here in a scratch directory.
    let config = rendered_config(&client, &ns.name, "chat").await?;
    let kubelet = Kubelet::new("crash")?;
    let config_path = kubelet.path("config.json");
    std::fs::write(&config_path, config.to_string())?;
    let (mut args, env) = Kubelet::main_container(&pod, &config_path)?;
    ensure!(args[..2] == ["moe-worker", "serve"], "{args:?}");
    let port = moe_worker_free_port()?;
    args.extend([
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        port.to_string(),
    ]);
    let (code, message) = kubelet.run(&args, &env)?;
    ensure!(code == 2, "exit {code}: {message}");
    kubelet
        .report(&pods, &pod.name_any(), "crash", code, &message)
        .await?;
    let stalled = eventually(
        "the service to stall on the failing server",
        WAIT,
        || async {
            let s = api.get("chat").await?;
            Ok(condition(&s, "Stalled")
                .is_some_and(|c| c.status == "True" && c.reason == "ServerFailing")
                .then_some(s))
        },
    )
    .await?;
    let ready = condition(&stalled, "Ready").context("no Ready")?;
    ensure!(ready.status == "False", "{ready:?}");
    ensure!(
        ready.message.contains(&pod.name_any())
            && ready.message.contains("exit code 2")
            && ready
                .message
                .contains("model directory /models/moe-9b does not exist"),
        "{}",
        ready.message
    );
    ensure!(condition(&stalled, "Degraded").is_some_and(|c| c.status == "True"));
    wait_event(&client, &ns.name, "chat", "ServerFailing").await?;
    ns.delete().await
}

/// A LoRA adapter on the Hub (`adapters[].huggingface`), end to end: each
/// server pod's init container `download-adapter-0` (the real `moe-worker
/// fetch --repo-type adapter`, played here against a Hub on loopback)
/// brings the adapter's config and safetensors and links them for the
/// server; the real server, run with the pod's command and the config the
/// operator rendered (its volumes here), serves it by name beside the
/// model it adapts, which comes from a claim.
#[tokio::test]
async fn a_hub_adapter_is_downloaded_by_its_pods_and_served_by_name() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mis-hub-adapter").await?;
    let _op = Operator::start(&ns.name).await?;
    bound_claim(&ns.name, "moe-models").await?;
    let fixtures = moe_e2e::operator::repo_root().join("worker/tests/fixtures/hf");
    let files = |dir: &std::path::Path| -> Result<Vec<(String, Vec<u8>)>> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .context("a file")?
                .to_string_lossy()
                .into_owned();
            files.push((name, std::fs::read(&path)?));
        }
        Ok(files)
    };
    let mut adapter = files(&fixtures.join("qwen3_moe_lora"))?;
    adapter.push(("README.md".into(), b"# a tiny adapter".to_vec()));
    let hub = FakeHub::start(&("c0ffee".repeat(6) + "abcd"), adapter)?;
    let kubelet = Kubelet::new(&ns.name)?;
    // The base model on its claim.
    let base = kubelet.path("models").join("qwen3");
    std::fs::create_dir_all(&base)?;
    for (name, bytes) in files(&fixtures.join("qwen3_moe"))? {
        std::fs::write(base.join(name), bytes)?;
    }
    let api: Api<MoEInferenceService> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let svc: MoEInferenceService = serde_json::from_value(json!({
        "apiVersion": "moe.dev/v1alpha1", "kind": "MoEInferenceService",
        "metadata": {"name": "chat"},
        "spec": {
            "model": {"volume": {"claimName": "moe-models", "path": "qwen3", "format": "huggingface"}},
            "adapters": [{"name": "chat-tuned",
                          "huggingface": {"repo": "moe-tests/qwen3-moe-lora", "endpoint": hub.endpoint}}],
            "serving": {"precision": "fp32", "startupTimeoutSeconds": 120},
            "worker": {"device": "cpu", "podMetadata": {"labels": {"kwok.test/init": "hold"}}}
        }
    }))?;
    api.create(&PostParams::default(), &svc).await?;
    let pod = eventually("the pod to be downloading its adapter", WAIT, || async {
        let list = server_pods(&pods, "chat").await?;
        Ok(list.into_iter().find(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.init_container_statuses.as_ref())
                .and_then(|c| c.first())
                .is_some_and(|c| {
                    c.name == "download-adapter-0"
                        && c.state.as_ref().is_some_and(|s| s.running.is_some())
                })
        }))
    })
    .await?;
    let link = kubelet.path("pinned").join("adapter-0");
    let (code, message) = kubelet.run_init(
        &pod,
        Some("download-adapter-0"),
        &[("--into", kubelet.path("hub")), ("--link", link.clone())],
    )?;
    ensure!(code == 0, "exit {code}: {message}");
    kubelet
        .report(&pods, &pod.name_any(), "init", code, &message)
        .await?;
    ensure!(
        link.join("adapter_model.safetensors").is_file() && !link.join("README.md").exists(),
        "{}",
        link.display()
    );

    // The server, its volumes here.
    let mut config = rendered_config(&client, &ns.name, "chat").await?;
    ensure!(
        config["adapters"][0]["dir"] == "/run/moe/adapter-0"
            && config["adapters"][0]["revision"] == "huggingface/moe-tests/qwen3-moe-lora@main",
        "{config}"
    );
    config["modelDir"] = json!(base);
    config["adapters"][0]["dir"] = json!(link);
    let config_path = kubelet.path("config.json");
    std::fs::write(&config_path, config.to_string())?;
    let (mut command, env) = Kubelet::main_container(&pod, &config_path)?;
    ensure!(env.iter().all(|(name, _)| name != "HF_TOKEN"));
    let port = moe_worker_free_port()?;
    command.extend(["--host", "127.0.0.1", "--port", &port.to_string()].map(String::from));
    let _server = kubelet.start(&command, &env)?;
    let url = format!("http://127.0.0.1:{port}/v1/completions");
    let body = json!({"model": "chat-tuned", "prompt": "Hello", "max_tokens": 4, "temperature": 0});
    let reply = eventually(
        "the server to answer in the adapter's name",
        WAIT,
        || async {
            Ok(
                match moe_e2e::operator::http_request("POST", &url, Some(&body.to_string())).await {
                    Ok((200, reply)) => Some(serde_json::from_str::<Value>(&reply)?),
                    _ => None,
                },
            )
        },
    )
    .await?;
    ensure!(
        reply["model"] == "chat-tuned" && reply["usage"]["completion_tokens"] == 4,
        "{reply}"
    );
    ns.delete().await
}

/// A free loopback port for a process the test runs.
fn moe_worker_free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[tokio::test]
async fn one_pod_replicas_that_cannot_get_ready_degrade_the_service() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mis-degraded").await?;
    let _op = Operator::start(&ns.name).await?;
    bound_claim(&ns.name, "moe-models").await?;
    let api: Api<MoEInferenceService> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    // 3 one-pod replicas (a Deployment), maxUnavailable 1 (the default).
    api.create(&PostParams::default(), &gpu_service("chat", 3, json!({})))
        .await?;
    wait_ready(&api, "chat", 3).await?;
    let mut names: Vec<String> = server_pods(&pods, "chat")
        .await?
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    names.sort();
    let conditions = |s: &MoEInferenceService| {
        ["Ready", "Available", "Degraded", "Progressing"].map(|t| {
            condition(s, t)
                .map(|c| (c.status.clone(), c.reason.clone()))
                .unwrap_or_default()
        })
    };
    let pair = |a: &str, b: &str| (a.to_string(), b.to_string());

    // One replica fails its readiness probe: still Available (within
    // maxUnavailable), but Degraded, with the reason.
    set_not_ready(&pods, &names[0], true).await?;
    let s = eventually("chat to be Degraded with 2 of 3 ready", WAIT, || async {
        let s = api.get("chat").await?;
        Ok((conditions(&s)[2] == pair("True", "PodsNotReady")).then_some(s))
    })
    .await?;
    let c = conditions(&s);
    ensure!(
        c[0] == pair("False", "PodsNotReady")
            && c[1] == pair("True", "MinimumReplicasAvailable")
            && c[3] == pair("True", "PodsNotReady"),
        "conditions {c:?}"
    );
    let message = condition(&s, "Degraded")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    ensure!(message == "2 of 3 replicas ready", "message: {message}");
    ensure!(s.status.as_ref().map(|st| st.ready_replicas) == Some(2));
    expect_verdicts(
        &ns.name,
        "chat",
        "InProgress",
        "Progressing",
        "2 of 3 replicas ready",
    )?;

    // A second one: below replicas − maxUnavailable, so no longer Available.
    set_not_ready(&pods, &names[1], true).await?;
    let s = eventually("chat to be unavailable with 1 of 3 ready", WAIT, || async {
        let s = api.get("chat").await?;
        Ok((conditions(&s)[1] == pair("False", "PodsNotReady")).then_some(s))
    })
    .await?;
    let c = conditions(&s);
    ensure!(
        c[0] == pair("False", "PodsNotReady") && c[2] == pair("True", "PodsNotReady"),
        "conditions {c:?}"
    );
    let message = condition(&s, "Available")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    ensure!(message == "1 of 3 replicas ready", "message: {message}");
    wait_event(&client, &ns.name, "chat", "PodsNotReady").await?;

    // The probes pass again: Ready, not Degraded.
    for name in &names[..2] {
        set_not_ready(&pods, name, false).await?;
    }
    let s = wait_ready(&api, "chat", 3).await?;
    let c = conditions(&s);
    ensure!(
        c[1] == pair("True", "MinimumReplicasAvailable") && c[2].0 == "False",
        "conditions {c:?}"
    );
    ns.delete().await
}

#[tokio::test]
async fn from_a_running_training_job_it_waits_then_serves_the_checkpoint() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mis-train").await?;
    let _op = Operator::start(&ns.name).await?;
    bound_claim(&ns.name, "ckpt").await?;
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let api: Api<MoEInferenceService> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let job: MoETrainingJob = serde_json::from_value(json!({
        "apiVersion": "moe.dev/v1alpha1", "kind": "MoETrainingJob",
        "metadata": {"name": "train"},
        "spec": {
            "model": {"hiddenSize": 64, "layers": 2, "attentionHeads": 8, "kvHeads": 8, "seqLen": 64,
                      "moe": {"experts": 16, "topK": 2, "expertHiddenSize": 32}},
            "training": {"steps": 100, "globalBatchSize": 8,
                         "precision": {"fp8": {"enabled": true, "recipe": "tensorwise"}}},
            "parallelism": {"nodes": 1, "processesPerNode": 8, "expertParallel": 8},
            "checkpoint": {"claimName": "ckpt", "path": "runs"},
            "placement": {"gpuType": "H100"},
            "worker": {"podMetadata": {"labels": {HOLD: "true"}}}
        }
    }))?;
    jobs.create(&PostParams::default(), &job).await?;
    eventually("train to be Running", WAIT, || async {
        let j = jobs.get("train").await?;
        Ok((j.status.and_then(|s| s.phase) == Some(TrainingPhase::Running)).then_some(()))
    })
    .await?;
    let svc = gpu_service(
        "chat",
        1,
        json!({"spec": {"model": {"volume": null, "fromTrainingJob": {"name": "train"}}}}),
    );
    api.create(&PostParams::default(), &svc).await?;
    let waiting = eventually("chat to wait for the training job", WAIT, || async {
        let s = api.get("chat").await?;
        Ok(condition(&s, "Progressing")
            .is_some_and(|c| c.status == "True" && c.reason == "WaitingForTrainingJob")
            .then_some(s))
    })
    .await?;
    let message = condition(&waiting, "Progressing")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    ensure!(message.contains("train is Running"), "message: {message}");
    ensure!(condition(&waiting, "Ready").is_some_and(|c| c.status == "False"));
    ensure!(condition(&waiting, "Stalled").is_some_and(|c| c.status == "False"));
    expect_verdicts(
        &ns.name,
        "chat",
        "InProgress",
        "Progressing",
        "train is Running",
    )?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        deployments.get_opt("chat").await?.is_none(),
        "no replicas while the model does not exist (no crash loop)"
    );

    // The job finishes: the service serves its checkpoint, from its claim.
    release_job(&pods, "train").await?;
    let ready = wait_ready(&api, "chat", 1).await?;
    expect_verdicts(
        &ns.name,
        "chat",
        "Current",
        "Healthy",
        "1 of 1 replicas ready",
    )?;
    let revision = ready
        .status
        .and_then(|s| s.model_revision)
        .unwrap_or_default();
    ensure!(
        revision.starts_with("moetrainingjob/train/"),
        "revision {revision}"
    );
    let dep = deployments.get("chat").await?;
    let pod = dep.spec.and_then(|s| s.template.spec).context("pod spec")?;
    let claim = pod
        .volumes
        .unwrap_or_default()
        .into_iter()
        .find(|v| v.name == "model")
        .and_then(|v| v.persistent_volume_claim)
        .context("model volume")?;
    ensure!(claim.claim_name == "ckpt" && claim.read_only == Some(true));
    let cm: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let config = cm.get("chat-config").await?.data.unwrap_or_default();
    let config: Value = serde_json::from_str(config.get("config.json").context("config.json")?)?;
    ensure!(
        config["modelDir"] == json!(format!("/models/runs/{}/train/checkpoints", ns.name)),
        "config {config}"
    );
    ensure!(
        config["model"]["moe"]["experts"] == json!(16),
        "the model shape is carried over"
    );
    // Besides the shape: the final step (pinned, not "the newest in the
    // directory"), the job's tokenizer and precision.
    ensure!(
        config["checkpointStep"] == json!(100) && revision.ends_with("@step-100"),
        "config {config}, revision {revision}"
    );
    let trained = &config["trained"];
    ensure!(
        trained["job"] == json!(format!("{}/train", ns.name))
            && trained["step"] == json!(100)
            && trained["tokenizer"] == json!("byte")
            && trained["precision"]["fp8"]["enabled"] == json!(true)
            && trained["precision"]["fp8"]["recipe"] == json!("tensorwise"),
        "trained {trained}"
    );

    // A step the job never kept is refused with the steps it has, instead of
    // servers crash-looping on a missing checkpoint.
    let gone = gpu_service(
        "gone",
        1,
        json!({"spec": {"model": {"volume": null, "fromTrainingJob": {"name": "train", "checkpoint": 50}}}}),
    );
    api.create(&PostParams::default(), &gone).await?;
    let s = eventually("gone to stall on its checkpoint", WAIT, || async {
        let s = api.get("gone").await?;
        Ok(condition(&s, "Stalled")
            .is_some_and(|c| c.status == "True" && c.reason == "CheckpointNotFound")
            .then_some(s))
    })
    .await?;
    let message = condition(&s, "Stalled")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    ensure!(
        message.starts_with("spec.model.fromTrainingJob.checkpoint (50)")
            && message.contains("steps 100"),
        "message: {message}"
    );
    ensure!(
        deployments.get_opt("gone").await?.is_none(),
        "nothing runs for a checkpoint that does not exist"
    );
    ns.delete().await
}

#[tokio::test]
async fn no_gpus_to_land_on_and_unsupported_specs_are_classified() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mis-capacity").await?;
    let _op = Operator::start(&ns.name).await?;
    bound_claim(&ns.name, "moe-models").await?;
    let api: Api<MoEInferenceService> = Api::namespaced(client.clone(), &ns.name);
    // The fake cluster has no H200 nodes: the pods stay Pending, Unschedulable.
    let h200 = json!({"spec": {"placement": {"gpuType": "H200"}}});
    api.create(&PostParams::default(), &gpu_service("chat", 1, h200))
        .await?;
    let s = eventually("chat to report insufficient capacity", WAIT, || async {
        let s = api.get("chat").await?;
        Ok(condition(&s, "Ready")
            .is_some_and(|c| c.status == "False" && c.reason == "InsufficientCapacity")
            .then_some(s))
    })
    .await?;
    let message = condition(&s, "Ready")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    ensure!(
        message.contains("cannot be scheduled"),
        "message: {message}"
    );
    ensure!(condition(&s, "Progressing").is_some_and(|c| c.status == "True"));
    ensure!(condition(&s, "Available").is_some_and(|c| c.status == "False"));
    let events: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    let warned = events
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .any(|e| {
            e.reason.as_deref() == Some("InsufficientCapacity")
                && e.type_.as_deref() == Some("Warning")
        });
    ensure!(warned, "no InsufficientCapacity warning event");
    expect_verdicts(
        &ns.name,
        "chat",
        "InProgress",
        "Progressing",
        "cannot be scheduled",
    )?;

    // What the operator refuses to run is Stalled, naming the field: kstatus Failed, Argo CD Degraded.
    let reserved = json!({"spec": {"worker": {"env": [{"name": "MOE_SERVICE", "value": "x"}]}}});
    api.create(
        &PostParams::default(),
        &gpu_service("reserved", 1, reserved),
    )
    .await?;
    let s = eventually("reserved to stall", WAIT, || async {
        let s = api.get("reserved").await?;
        Ok(condition(&s, "Stalled")
            .is_some_and(|c| c.status == "True" && c.reason == "InvalidSpec")
            .then_some(s))
    })
    .await?;
    let message = condition(&s, "Stalled")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    ensure!(
        message.starts_with("spec.worker.env[0].name"),
        "message: {message}"
    );
    expect_verdicts(&ns.name, "reserved", "Failed", "Degraded", "reserved")?;
    ensure!(
        Api::<Deployment>::namespaced(client.clone(), &ns.name)
            .get_opt("reserved")
            .await?
            .is_none(),
        "nothing runs for a stalled spec"
    );
    ns.delete().await
}

/// (group index, incarnation) of the group StatefulSets of `name` that are not being deleted.
async fn groups_of(sets: &Api<StatefulSet>, name: &str) -> Result<Vec<(String, String)>> {
    let list = sets
        .list(&ListParams::default().labels(&format!("moe.dev/service-name={name}")))
        .await?;
    let mut out: Vec<(String, String)> = list
        .items
        .iter()
        .filter(|s| s.metadata.deletion_timestamp.is_none())
        .map(|s| {
            let l = |k: &str| s.labels().get(k).cloned().unwrap_or_default();
            (l("moe.dev/group"), l("moe.dev/incarnation"))
        })
        .collect();
    out.sort();
    Ok(out)
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[tokio::test]
async fn the_workload_api_places_each_replica_group_whole_or_not_at_all() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mis-gang").await?;
    let _op = Operator::start_with(&ns.name, &WORKLOAD_API).await?;
    bound_claim(&ns.name, "moe-models").await?;
    let api: Api<MoEInferenceService> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let groups: Api<PodGroup> = Api::namespaced(client.clone(), &ns.name);
    let rack = moe_e2e::kueue::LEVELS[1];
    // Replicas of 3 pods, each replica in one rack, on the pool with a rack
    // of 3 and a rack of 2: one replica fits; the other must bind no pod
    // (pod by pod, two of its three would sit on the small rack).
    let spec = on_pool(
        GANG_POOL,
        json!({"spec": {
            "parallelism": {"processesPerPod": 8, "podsPerReplica": 3, "expertParallel": 24},
            "placement": {"topology": {"required": rack}}
        }}),
    );
    api.create(&PostParams::default(), &gpu_service("chat", 2, spec))
        .await?;
    let of_group = |list: &[Pod], g: &str| -> Vec<Pod> {
        list.iter()
            .filter(|p| p.labels().get("moe.dev/group").map(String::as_str) == Some(g))
            .cloned()
            .collect()
    };
    let (placed, waiting) = eventually(
        "one group bound whole, the other not at all",
        WAIT,
        || async {
            let list = server_pods(&pods, "chat").await?;
            let (g0, g1) = (of_group(&list, "0"), of_group(&list, "1"));
            let bound = |g: &[Pod]| g.iter().filter(|p| !node_of(p).is_empty()).count();
            Ok(
                (g0.len() == 3 && g1.len() == 3 && bound(&g0) + bound(&g1) == 3)
                    .then(|| if bound(&g0) == 3 { (g0, g1) } else { (g1, g0) }),
            )
        },
    )
    .await?;
    ensure!(
        waiting.iter().all(|p| node_of(p).is_empty()),
        "a group is partly bound: {:?}",
        waiting.iter().map(node_of).collect::<Vec<_>>()
    );
    let nodes: Api<Node> = Api::all(client.clone());
    for p in &placed {
        let node = nodes.get(&node_of(p)).await?;
        ensure!(node.labels().get(rack).map(String::as_str) == Some("rack-gang-1"));
    }
    for name in ["chat-g0-0", "chat-g1-0"] {
        let group = groups.get(name).await?;
        ensure!(group.spec.scheduling_policy.gang.map(|g| g.min_count) == Some(3));
    }
    let svc = eventually("one replica ready, short of capacity", WAIT, || async {
        let s = api.get("chat").await?;
        let short = condition(&s, "Ready").is_some_and(|c| c.reason == "InsufficientCapacity");
        Ok((short && s.status.as_ref().is_some_and(|st| st.ready_replicas == 1)).then_some(s))
    })
    .await?;
    let message = condition(&svc, "Ready").map(|c| c.message.clone());
    ensure!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("cannot be scheduled")),
        "{message:?}"
    );

    // Down to one replica: group 1 goes, with its PodGroup, whichever of the
    // two it was; group 0 then serves from the rack of 3, bound whole.
    api.patch(
        "chat",
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"replicas": 1}})),
    )
    .await?;
    eventually(
        "chat-g1-0's PodGroup deleted with its group",
        WAIT,
        || async {
            Ok(match groups.get_opt("chat-g1-0").await? {
                None => Some(()),
                Some(g) => g.metadata.deletion_timestamp.map(|_| ()),
            })
        },
    )
    .await?;
    wait_ready(&api, "chat", 1).await?;
    let group0 = of_group(&server_pods(&pods, "chat").await?, "0");
    ensure!(group0.len() == 3);
    for p in &group0 {
        let node = nodes.get(&node_of(p)).await?;
        ensure!(node.labels().get(rack).map(String::as_str) == Some("rack-gang-1"));
    }
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns.name);
    wait_formed(&sets, "chat", 0, 0).await?;

    // A 4-node training gang of higher priority needs the group's nodes: the
    // scheduler preempts the group whole. It waits, unbound, as the same
    // incarnation (no GroupRestart), and serves again once the gang is done.
    let class = UrgentClass::create(&client, &ns.name).await?;
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let urgent = on_pool(
        GANG_POOL,
        json!({"spec": {"placement": {"priorityClassName": class.name}}}),
    );
    let preempted = async {
        jobs.create(&PostParams::default(), &gpu_job("urgent", 4, urgent))
            .await?;
        eventually(
            "the gang to run and the group to wait, kept",
            WAIT,
            || async {
                let job = jobs.get("urgent").await?;
                let running = job.status.and_then(|s| s.phase) == Some(TrainingPhase::Running);
                let live = of_group(&server_pods(&pods, "chat").await?, "0");
                let waiting = live.len() == 3 && live.iter().all(|p| node_of(p).is_empty());
                Ok((running && waiting).then_some(()))
            },
        )
        .await?;
        ensure!(groups_of(&sets, "chat").await? == pairs(&[("0", "0")]));
        release_job(&pods, "urgent").await?;
        wait_ready(&api, "chat", 1).await?;
        ensure!(groups_of(&sets, "chat").await? == pairs(&[("0", "0")]));
        ensure!(
            !event_reasons(&client, &ns.name, "chat")
                .await?
                .contains(&"GroupRestart".to_string()),
            "a preemption counted as a group restart"
        );
        Ok(())
    }
    .await;
    class.delete().await?;
    preempted?;
    ns.delete().await
}

#[tokio::test]
async fn multi_pod_replica_groups_are_created_restarted_scaled_and_rolled_whole() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mis-groups").await?;
    let _op = Operator::start(&ns.name).await?;
    bound_claim(&ns.name, "moe-models").await?;
    let api: Api<MoEInferenceService> = Api::namespaced(client.clone(), &ns.name);
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    // Each replica: 2 pods × 8 H100s, experts split 16 ways across both.
    let grouped = json!({"spec": {"parallelism": {"processesPerPod": 8, "podsPerReplica": 2, "expertParallel": 16}}});
    api.create(&PostParams::default(), &gpu_service("chat", 2, grouped))
        .await?;
    let ready = wait_ready(&api, "chat", 2).await?;
    ensure!(
        groups_of(&sets, "chat").await? == pairs(&[("0", "0"), ("1", "0")]),
        "groups: {:?}",
        groups_of(&sets, "chat").await?
    );
    // Leaders (pod index 0) take requests and are what /scale selects.
    let selector = ready.status.and_then(|s| s.selector).unwrap_or_default();
    ensure!(
        selector.contains("apps.kubernetes.io/pod-index=0"),
        "selector {selector}"
    );
    let leaders = pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .items;
    ensure!(leaders.len() == 2, "{} leaders", leaders.len());
    let all = server_pods(&pods, "chat").await?;
    ensure!(all.len() == 4, "{} pods", all.len());
    for pod in &all {
        ensure!(
            node_of(pod).starts_with("gpu-h100-"),
            "{} on {}",
            pod.name_any(),
            node_of(pod)
        );
        let env = pod
            .spec
            .as_ref()
            .map(|s| s.containers[0].env.clone().unwrap_or_default())
            .unwrap_or_default();
        let group = pod
            .labels()
            .get("moe.dev/group")
            .cloned()
            .unwrap_or_default();
        let coordinator = env
            .iter()
            .find(|e| e.name == "MOE_COORDINATOR")
            .and_then(|e| e.value.clone());
        ensure!(
            coordinator == Some(format!("chat-g{group}-0-0.chat-pods:29400")),
            "{}: coordinator {coordinator:?}",
            pod.name_any()
        );
    }
    // The groups are recorded as formed before a failure can be told from a start.
    eventually("both groups to be formed", WAIT, || async {
        let list = sets
            .list(&ListParams::default().labels("moe.dev/service-name=chat"))
            .await?;
        Ok((list.items.len() == 2
            && list
                .items
                .iter()
                .all(|s| s.annotations().contains_key("moe.dev/formed-pods")))
        .then_some(()))
    })
    .await?;

    // One pod of group 1 goes (as a kubelet would kill it): the whole group is replaced.
    pods.delete("chat-g1-0-1", &DeleteParams::default()).await?;
    eventually("group 1 to be replaced by incarnation 1", WAIT, || async {
        Ok((groups_of(&sets, "chat").await? == pairs(&[("0", "0"), ("1", "1")])).then_some(()))
    })
    .await?;
    let restarted = sets.get("chat-g1-1").await?;
    ensure!(
        restarted
            .annotations()
            .get("moe.dev/restarts")
            .map(String::as_str)
            == Some("1"),
        "restarts {:?}",
        restarted.annotations()
    );
    wait_ready(&api, "chat", 2).await?;
    wait_event(&client, &ns.name, "chat", "GroupRestart").await?;

    // Scaling adds a group; a new image replaces every group, whole.
    sh(&format!(
        "kubectl scale -n {} mis/chat --replicas=3",
        ns.name
    ))?;
    wait_ready(&api, "chat", 3).await?;
    let image = json!({"spec": {"worker": {"image": "moe-worker:v2"}}});
    api.patch("chat", &PatchParams::default(), &Patch::Merge(&image))
        .await?;
    eventually("every group to run v2", WAIT, || async {
        let s = api.get("chat").await?;
        let groups = groups_of(&sets, "chat").await?;
        let live = server_pods(&pods, "chat").await?;
        let all_new = live.len() == 6
            && live.iter().all(|p| {
                p.spec
                    .as_ref()
                    .and_then(|s| s.containers[0].image.clone())
                    .as_deref()
                    == Some("moe-worker:v2")
            });
        let ready = condition(&s, "Ready").is_some_and(|c| c.status == "True")
            && s.status.as_ref().and_then(|st| st.observed_generation) == s.metadata.generation;
        Ok(
            (all_new && ready && groups == pairs(&[("0", "1"), ("1", "2"), ("2", "1")]))
                .then_some(()),
        )
    })
    .await?;
    ns.delete().await
}

/// Ready leader pods of `name` (one per serving replica group), not being deleted.
async fn serving_leaders(pods: &Api<Pod>, name: &str) -> Result<usize> {
    let list = pods
        .list(
            &ListParams::default()
                .labels(&format!("apps.kubernetes.io/pod-index=0,{SELECTOR}={name}")),
        )
        .await?;
    Ok(list
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count())
}

#[tokio::test]
async fn group_rollouts_surge_within_max_surge_and_never_drop_below_max_unavailable() -> Result<()>
{
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mis-surge").await?;
    let _op = Operator::start(&ns.name).await?;
    bound_claim(&ns.name, "moe-models").await?;
    let api: Api<MoEInferenceService> = Api::namespaced(client.clone(), &ns.name);
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    // 2 groups of 2 pods; a rollout may add 1 group and take none away.
    let spec = json!({"spec": {
        "parallelism": {"processesPerPod": 8, "podsPerReplica": 2, "expertParallel": 16},
        "rollout": {"maxUnavailable": 0, "maxSurge": 1}}});
    api.create(&PostParams::default(), &gpu_service("chat", 2, spec))
        .await?;
    wait_ready(&api, "chat", 2).await?;
    ensure!(groups_of(&sets, "chat").await? == pairs(&[("0", "0"), ("1", "0")]));

    // The new revision's pods cannot get ready until the test lets them (a
    // KWOK stage fails their readiness), so every step of the rollout can be seen.
    let new_revision =
        json!({"spec": {"worker": {"podMetadata": {"labels": {NOT_READY: "true"}}}}});
    api.patch(
        "chat",
        &PatchParams::default(),
        &Patch::Merge(&new_revision),
    )
    .await?;
    // Each poll checks the bounds: at most replicas + maxSurge groups, at
    // least replicas − maxUnavailable serving. Violations are collected (a
    // failed check inside `eventually` would only be retried).
    let violations = std::sync::Mutex::new(Vec::<String>::new());
    let bounded = || async {
        let groups = groups_of(&sets, "chat").await?;
        let serving = serving_leaders(&pods, "chat").await?;
        if groups.len() > 3 || serving < 2 {
            violations
                .lock()
                .expect("not poisoned")
                .push(format!("{serving} serving, groups {groups:?}"));
        }
        Ok::<_, anyhow::Error>(groups)
    };
    let release = |group: &'static str| {
        let pods = pods.clone();
        async move {
            for p in pods
                .list(&ListParams::default().labels(&format!(
                    "{SELECTOR}=chat,moe.dev/group={group},{NOT_READY}=true"
                )))
                .await?
                .items
            {
                set_not_ready(&pods, &p.name_any(), false).await?;
            }
            Ok::<_, anyhow::Error>(())
        }
    };
    // Group 0 surges: its successor comes up beside it, the old one keeps serving.
    eventually("group 0 to surge", WAIT, || async {
        let groups = bounded().await?;
        Ok((groups == pairs(&[("0", "0"), ("0", "1"), ("1", "0")])).then_some(()))
    })
    .await?;
    // The status follows once the operator has seen the new group (it is
    // written after the group is created, so it may lag a watcher of the
    // StatefulSets by a moment); the bounds keep being checked meanwhile.
    // Progressing says Updating, or InsufficientCapacity while the other
    // suites' pods fill the fake GPU nodes and the successor waits for one
    // (seen once in CI: 12 suites run at once); a rollout either way.
    eventually("the mid-surge status", WAIT, || async {
        bounded().await?;
        let s = api.get("chat").await?;
        let surging = condition(&s, "Progressing")
            .is_some_and(|c| c.reason == "Updating" || c.reason == "InsufficientCapacity")
            && condition(&s, "Available").is_some_and(|c| c.status == "True")
            && s.status.as_ref().map(|st| (st.replicas, st.ready_replicas)) == Some((3, 2));
        Ok(surging.then_some(()))
    })
    .await?;
    // While the successor is not ready, the surge budget is spent: nothing else moves.
    for _ in 0..6 {
        let groups = bounded().await?;
        ensure!(
            groups == pairs(&[("0", "0"), ("0", "1"), ("1", "0")]),
            "the rollout went on past maxSurge: {groups:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The successor gets ready: the old group 0 goes and group 1 surges.
    // (Released on every poll: a pod of the group may be created after a
    // release went by.)
    eventually("group 1 to surge", WAIT, || async {
        release("0").await?;
        let groups = bounded().await?;
        Ok((groups == pairs(&[("0", "1"), ("1", "0"), ("1", "1")])).then_some(()))
    })
    .await?;
    eventually("the rollout to finish", WAIT, || async {
        release("1").await?;
        bounded().await?;
        let s = api.get("chat").await?;
        let ready = condition(&s, "Ready").is_some_and(|c| c.status == "True")
            && s.status.as_ref().and_then(|st| st.observed_generation) == s.metadata.generation;
        Ok(
            (ready && groups_of(&sets, "chat").await? == pairs(&[("0", "1"), ("1", "1")]))
                .then_some(()),
        )
    })
    .await?;
    let violations = violations.into_inner().expect("not poisoned");
    ensure!(
        violations.is_empty(),
        "outside maxSurge 1 / maxUnavailable 0: {violations:?}"
    );
    ns.delete().await
}

/// Waits until group `index` runs as `incarnation`, formed (all its pods once ready).
async fn wait_formed(
    sets: &Api<StatefulSet>,
    name: &str,
    index: i32,
    incarnation: i32,
) -> Result<()> {
    let set = format!("{name}-g{index}-{incarnation}");
    eventually(&format!("{set} to be formed"), WAIT, || async {
        Ok(sets
            .get_opt(&set)
            .await?
            .filter(|s| s.annotations().contains_key("moe.dev/formed-pods"))
            .map(|_| ()))
    })
    .await
}

#[tokio::test]
async fn group_restarts_survive_an_operator_restart_and_stop_at_the_limit() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mis-limit").await?;
    let mut op = Some(Operator::start(&ns.name).await?);
    bound_claim(&ns.name, "moe-models").await?;
    let api: Api<MoEInferenceService> = Api::namespaced(client.clone(), &ns.name);
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let grouped = json!({"spec": {"parallelism": {"processesPerPod": 8, "podsPerReplica": 2, "expertParallel": 16}}});
    api.create(&PostParams::default(), &gpu_service("chat", 1, grouped))
        .await?;
    wait_formed(&sets, "chat", 0, 0).await?;
    let limit = moe_operator::inference::groups::MAX_GROUP_RESTARTS;
    for restart in 1..=limit {
        if restart == 3 {
            // The operator goes away while a pod fails, and comes back: the
            // restart count lives in the API, and nothing is duplicated.
            drop(op.take());
            pods.delete(
                &format!("chat-g0-{}-1", restart - 1),
                &DeleteParams::default(),
            )
            .await?;
            op = Some(Operator::start(&ns.name).await?);
        } else {
            pods.delete(
                &format!("chat-g0-{}-1", restart - 1),
                &DeleteParams::default(),
            )
            .await?;
        }
        wait_formed(&sets, "chat", 0, restart).await?;
        let set = sets.get(&format!("chat-g0-{restart}")).await?;
        ensure!(
            set.annotations().get("moe.dev/restarts") == Some(&restart.to_string()),
            "incarnation {restart}: {:?}",
            set.annotations()
        );
        ensure!(
            groups_of(&sets, "chat").await? == pairs(&[("0", &restart.to_string())]),
            "one group, incarnation {restart}: {:?}",
            groups_of(&sets, "chat").await?
        );
    }
    // One failure more: the group is left alone and the service says why.
    pods.delete(&format!("chat-g0-{limit}-1"), &DeleteParams::default())
        .await?;
    let s = eventually("chat to stop at the restart limit", WAIT, || async {
        let s = api.get("chat").await?;
        Ok(condition(&s, "Stalled")
            .is_some_and(|c| c.status == "True" && c.reason == "GroupRestartLimit")
            .then_some(s))
    })
    .await?;
    ensure!(condition(&s, "Degraded").is_some_and(|c| c.status == "True"));
    expect_verdicts(&ns.name, "chat", "Failed", "Degraded", "restarts")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        groups_of(&sets, "chat").await? == pairs(&[("0", &limit.to_string())]),
        "no incarnation past the limit: {:?}",
        groups_of(&sets, "chat").await?
    );
    drop(op);
    ns.delete().await
}

#[tokio::test]
async fn deleting_a_service_garbage_collects_its_children() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mis-gc").await?;
    let _op = Operator::start(&ns.name).await?;
    bound_claim(&ns.name, "moe-models").await?;
    let api: Api<MoEInferenceService> = Api::namespaced(client.clone(), &ns.name);
    let auto = json!({"spec": {"autoscaling": {"minReplicas": 1, "maxReplicas": 2, "targetConcurrency": 8}}});
    api.create(&PostParams::default(), &gpu_service("chat", 1, auto))
        .await?;
    wait_ready(&api, "chat", 1).await?;
    api.delete("chat", &DeleteParams::foreground()).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    eventually("every child to be garbage-collected", WAIT, || async {
        let left = [
            Api::<Deployment>::namespaced(client.clone(), &ns.name)
                .get_opt("chat")
                .await?
                .is_some(),
            Api::<Service>::namespaced(client.clone(), &ns.name)
                .get_opt("chat")
                .await?
                .is_some(),
            Api::<ConfigMap>::namespaced(client.clone(), &ns.name)
                .get_opt("chat-config")
                .await?
                .is_some(),
            Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns.name)
                .get_opt("chat")
                .await?
                .is_some(),
            Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), &ns.name)
                .get_opt("chat")
                .await?
                .is_some(),
            !server_pods(&pods, "chat").await?.is_empty(),
        ];
        Ok((!left.iter().any(|l| *l)).then_some(()))
    })
    .await?;
    ns.delete().await
}

/// The object `name` of `resource` (a kubectl resource name) as the
/// apiserver stores it, read as JSON: the kinds this workspace has no type for.
fn stored(resource: &str, ns: &str, name: &str) -> Result<Option<Value>> {
    let out = sh(&format!("kubectl get {resource} -n {ns} -o json"))?;
    let list: Value = serde_json::from_str(&out)?;
    Ok(list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["metadata"]["name"] == name)
        .cloned())
}

/// The service's HTTPRoute as the apiserver stores it.
fn http_route(ns: &str, name: &str) -> Result<Option<Value>> {
    stored("httproutes.gateway.networking.k8s.io", ns, name)
}

#[tokio::test]
async fn a_route_exposes_the_service_through_a_gateway_and_goes_with_it() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mis-route").await?;
    let _op = Operator::start_with(&ns.name, &["--gateway-api"]).await?;
    bound_claim(&ns.name, "moe-models").await?;
    let api: Api<MoEInferenceService> = Api::namespaced(client.clone(), &ns.name);
    let route = json!({"spec": {"route": {
        "parentRefs": [{"name": "public", "namespace": "gateways", "sectionName": "https"}],
        "hostnames": ["chat.example.com"],
        "pathPrefix": "/v1",
        "requestTimeout": "600s"
    }}});
    api.create(&PostParams::default(), &gpu_service("chat", 1, route))
        .await?;
    wait_ready(&api, "chat", 1).await?;
    let stored = eventually("the HTTPRoute", WAIT, || async {
        http_route(&ns.name, "chat")
    })
    .await?;
    // Accepted by the Gateway API's own schema and CEL rules, which
    // defaulted the parent's kind: a route a Gateway controller can attach.
    let spec = &stored["spec"];
    ensure!(
        spec["parentRefs"][0]["name"] == "public"
            && spec["parentRefs"][0]["kind"] == "Gateway"
            && spec["parentRefs"][0]["sectionName"] == "https"
            && spec["hostnames"] == json!(["chat.example.com"]),
        "{spec}"
    );
    let rule = &spec["rules"][0];
    ensure!(
        rule["matches"][0]["path"] == json!({"type": "PathPrefix", "value": "/v1"})
            && rule["backendRefs"][0]["name"] == "chat"
            && rule["backendRefs"][0]["port"] == 8000
            && rule["timeouts"]["request"] == "600s",
        "{rule}"
    );
    ensure!(
        stored["metadata"]["ownerReferences"][0]["kind"] == "MoEInferenceService",
        "{stored}"
    );
    // The backend is the service's own Service, on its HTTP port.
    let service = Api::<Service>::namespaced(client.clone(), &ns.name)
        .get("chat")
        .await?;
    let port = &service.spec.unwrap_or_default().ports.unwrap_or_default()[0];
    ensure!(port.port == 8000 && port.name.as_deref() == Some("http"));
    // No Gateway controller runs here: the route waits to be accepted.
    let route_condition = |want: &'static str, reason: &'static str| {
        let api = api.clone();
        async move {
            eventually(
                &format!("RouteAccepted {want} ({reason})"),
                WAIT,
                || async {
                    let s = api.get("chat").await?;
                    Ok(condition(&s, "RouteAccepted")
                        .filter(|c| c.status == want && c.reason == reason)
                        .map(|c| c.message.clone()))
                },
            )
            .await
        }
    };
    let waiting = route_condition("False", "Pending").await?;
    ensure!(waiting.contains("gateways/public"), "{waiting}");
    // Play the Gateway's controller: it accepts the route, then refuses it.
    let gateway_says = |status: &str, reason: &str| {
        let patch = json!({"status": {"parents": [{
            "parentRef": {"name": "public", "namespace": "gateways", "sectionName": "https"},
            "controllerName": "example.com/gateway-controller",
            "conditions": [{"type": "Accepted", "status": status, "reason": reason,
                            "message": format!("{reason}, said the test as the Gateway controller"),
                            "lastTransitionTime": "2026-11-30T00:00:00Z", "observedGeneration": 1}]
        }]}});
        sh(&format!(
            "kubectl patch httproute chat -n {} --subresource=status --type=merge -p '{patch}'",
            ns.name
        ))
    };
    gateway_says("True", "Accepted")?;
    route_condition("True", "Accepted").await?;
    gateway_says("False", "NotAllowedByListeners")?;
    let refused = route_condition("False", "NotAllowedByListeners").await?;
    ensure!(refused.contains("Gateway gateways/public"), "{refused}");
    // Deleted by hand, it comes back.
    sh(&format!(
        "kubectl delete httproute chat -n {} --wait",
        ns.name
    ))?;
    eventually("the HTTPRoute to be restored", WAIT, || async {
        http_route(&ns.name, "chat")
    })
    .await?;
    // Out of the spec, it goes.
    api.patch(
        "chat",
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"route": null}})),
    )
    .await?;
    eventually("the HTTPRoute and its condition to go", WAIT, || async {
        let gone = http_route(&ns.name, "chat")?.is_none()
            && condition(&api.get("chat").await?, "RouteAccepted").is_none();
        Ok(gone.then_some(()))
    })
    .await?;
    ns.delete().await
}

/// The service's InferencePool as the apiserver stores it.
fn inference_pool(ns: &str, name: &str) -> Result<Option<Value>> {
    stored("inferencepools.inference.networking.k8s.io", ns, name)
}

/// `route.inferencePool`: an InferencePool over the replica groups' leaders,
/// accepted by the Inference Extension's own schema and CEL rules, which
/// the HTTPRoute (accepted by the Gateway API's) sends to; out of the spec,
/// the pool goes and the route sends to the Service again. An operator
/// without `--inference-pool` refuses the spec, naming the flag.
#[tokio::test]
async fn an_inference_pool_puts_the_replicas_behind_an_endpoint_picker() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mis-pool").await?;
    let op = Operator::start_with(&ns.name, &["--gateway-api", "--inference-pool"]).await?;
    bound_claim(&ns.name, "moe-models").await?;
    let api: Api<MoEInferenceService> = Api::namespaced(client.clone(), &ns.name);
    let spec = json!({"spec": {
        "parallelism": {"processesPerPod": 4, "podsPerReplica": 2, "expertParallel": 8},
        "route": {
            "parentRefs": [{"name": "public", "namespace": "gateways"}],
            "inferencePool": {"endpointPicker": {"name": "chat-epp", "failureMode": "FailOpen"}}
        }
    }});
    api.create(&PostParams::default(), &gpu_service("chat", 2, spec))
        .await?;
    wait_ready(&api, "chat", 2).await?;
    let pool = eventually("the InferencePool", WAIT, || async {
        inference_pool(&ns.name, "chat")
    })
    .await?;
    ensure!(
        pool["spec"]["selector"]["matchLabels"]
            == json!({"moe.dev/role": "server", "moe.dev/service-name": "chat",
                      "apps.kubernetes.io/pod-index": "0"})
            && pool["spec"]["targetPorts"] == json!([{"number": 8000}])
            && pool["spec"]["endpointPickerRef"]["name"] == "chat-epp"
            && pool["spec"]["endpointPickerRef"]["port"]["number"] == 9002
            && pool["spec"]["endpointPickerRef"]["failureMode"] == "FailOpen"
            && pool["metadata"]["ownerReferences"][0]["kind"] == "MoEInferenceService",
        "{pool}"
    );
    // The pool selects exactly the pods that take requests: each group's leader.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let selected =
        pods.list(&ListParams::default().labels(
            "moe.dev/role=server,moe.dev/service-name=chat,apps.kubernetes.io/pod-index=0",
        ))
        .await?;
    ensure!(
        selected.items.len() == 2,
        "{} leaders",
        selected.items.len()
    );
    let route = eventually("the HTTPRoute", WAIT, || async {
        http_route(&ns.name, "chat")
    })
    .await?;
    ensure!(
        route["spec"]["rules"][0]["backendRefs"][0]
            == json!({"group": "inference.networking.k8s.io", "kind": "InferencePool",
                      "name": "chat", "weight": 1}),
        "{route}"
    );
    // No Gateway controller runs here: the pool waits to be accepted. Play
    // one: it accepts the pool, and the service says so.
    let pool_condition = |want: &'static str, reason: &'static str| {
        let api = api.clone();
        async move {
            eventually(
                &format!("InferencePoolAccepted {want} ({reason})"),
                WAIT,
                || async {
                    let s = api.get("chat").await?;
                    Ok(condition(&s, "InferencePoolAccepted")
                        .filter(|c| c.status == want && c.reason == reason)
                        .map(|c| c.message.clone()))
                },
            )
            .await
        }
    };
    let waiting = pool_condition("False", "Pending").await?;
    ensure!(waiting.contains("gateways/public"), "{waiting}");
    let accepted = json!({"status": {"parents": [{
        "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway",
                      "name": "public", "namespace": "gateways"},
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                        "message": "accepted, said the test as the Gateway controller",
                        "lastTransitionTime": "2026-11-30T00:00:00Z", "observedGeneration": 1}]
    }]}});
    sh(&format!(
        "kubectl patch inferencepool chat -n {} --subresource=status --type=merge -p '{accepted}'",
        ns.name
    ))?;
    pool_condition("True", "Accepted").await?;
    // Deleted by hand, it comes back.
    sh(&format!(
        "kubectl delete inferencepool chat -n {} --wait",
        ns.name
    ))?;
    eventually("the InferencePool to be restored", WAIT, || async {
        inference_pool(&ns.name, "chat")
    })
    .await?;
    // Out of the spec: the pool goes, the route sends to the Service again.
    api.patch(
        "chat",
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"route": {"inferencePool": null}}})),
    )
    .await?;
    eventually(
        "the pool to go and the route to send to the Service",
        WAIT,
        || async {
            let backend = http_route(&ns.name, "chat")?
                .map(|r| r["spec"]["rules"][0]["backendRefs"][0].clone());
            let service =
                json!({"group": "", "kind": "Service", "name": "chat", "port": 8000, "weight": 1});
            let condition_gone =
                condition(&api.get("chat").await?, "InferencePoolAccepted").is_none();
            Ok((inference_pool(&ns.name, "chat")?.is_none()
                && backend == Some(service)
                && condition_gone)
                .then_some(()))
        },
    )
    .await?;
    drop(op);

    // An operator that does not make pools says so.
    let _plain = Operator::start_with(&ns.name, &["--gateway-api"]).await?;
    api.patch(
        "chat",
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"route": {
            "inferencePool": {"endpointPicker": {"name": "chat-epp"}}
        }}})),
    )
    .await?;
    let stalled = eventually(
        "the service to stall without --inference-pool",
        WAIT,
        || async {
            let s = api.get("chat").await?;
            Ok(condition(&s, "Stalled")
                .filter(|c| c.status == "True" && c.reason == "InvalidSpec")
                .map(|c| c.message.clone()))
        },
    )
    .await?;
    ensure!(stalled.contains("--inference-pool"), "{stalled}");
    ns.delete().await
}

#[tokio::test]
async fn invalid_services_are_rejected_by_the_apiserver_naming_the_field() -> Result<()> {
    install()?;
    let client = admin_client().await?;
    let ns = TestNamespace::create(&client, "mis-invalid", &[]).await?;
    let cases = invalid_inference_services();
    ensure!(cases.len() >= 10, "the table has {} cases", cases.len());
    let problems = rejection_problems(
        &client,
        &ns.name,
        "MoEInferenceService",
        valid_inference_service(),
        &cases,
    )
    .await?;
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    ns.delete().await
}

#[tokio::test]
async fn the_operator_role_covers_serving_with_least_privilege() -> Result<()> {
    install()?;
    let can = operator_can;
    for (verb, resource) in [
        ("watch", "moeinferenceservices.moe.dev"),
        ("patch", "moeinferenceservices.moe.dev/status"),
        ("patch", "deployments.apps"),
        ("create", "deployments.apps"),
        ("patch", "poddisruptionbudgets.policy"),
        ("patch", "horizontalpodautoscalers.autoscaling"),
        ("delete", "horizontalpodautoscalers.autoscaling"),
        ("create", "statefulsets.apps"),
        ("delete", "statefulsets.apps"),
        ("watch", "httproutes.gateway.networking.k8s.io"),
        ("patch", "httproutes.gateway.networking.k8s.io"),
        ("delete", "httproutes.gateway.networking.k8s.io"),
    ] {
        ensure!(can(verb, resource), "the operator needs {verb} {resource}");
    }
    for (verb, resource) in [
        ("delete", "deployments.apps"),
        ("delete", "poddisruptionbudgets.policy"),
        ("update", "moeinferenceservices.moe.dev"),
        ("delete", "moeinferenceservices.moe.dev"),
        ("update", "moeinferenceservices.moe.dev/scale"),
        ("delete", "pods"),
        ("get", "secrets"),
        ("patch", "gateways.gateway.networking.k8s.io"),
    ] {
        ensure!(
            !can(verb, resource),
            "the operator must not {verb} {resource}"
        );
    }
    Ok(())
}

/// A held training gang of `nodes` × 8 GPUs in the test's queue, at priority `class`.
fn queued_gpu_job(name: &str, nodes: i32, class: &str) -> MoETrainingJob {
    let placement = json!({"queueName": KueueSetup::QUEUE, "priorityClassName": class});
    gpu_job(name, nodes, json!({"spec": {"placement": placement}}))
}

/// Replica groups of 2 pods × 8 GPUs, queued in the test's LocalQueue.
fn queued_groups() -> Value {
    json!({"spec": {
        "parallelism": {"processesPerPod": 8, "podsPerReplica": 2, "expertParallel": 16},
        "placement": {"queueName": KueueSetup::QUEUE}
    }})
}

/// Whether Kueue's admission gate holds the pod.
fn gated(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.scheduling_gates.as_ref())
        .is_some_and(|g| g.iter().any(|g| g.name == "kueue.x-k8s.io/admission"))
}

#[tokio::test]
async fn kueue_admits_each_replica_group_whole_within_the_queue_quota() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mis-kueue").await?;
    // Quota for one group: 2 pods of 8 GPUs.
    let kueue = KueueSetup::create(&client, &ns.name, QUOTA_POOL, 16, false).await?;
    let _op = Operator::start(&ns.name).await?;
    bound_claim(&ns.name, "moe-models").await?;
    let api: Api<MoEInferenceService> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let grouped = queued_groups();
    api.create(&PostParams::default(), &gpu_service("queued", 2, grouped))
        .await?;

    // One group serves; the other waits whole: both its pods gated, neither on a node.
    let waiting = eventually("one group admitted, the other waiting", WAIT, || async {
        let s = api.get("queued").await?;
        let ready = s.status.as_ref().map(|s| s.ready_replicas);
        let waiting = condition(&s, "Ready").is_some_and(|c| c.reason == "WaitingForAdmission");
        let live = server_pods(&pods, "queued").await?;
        let (held, running): (Vec<_>, Vec<_>) = live.into_iter().partition(gated);
        Ok(
            (ready == Some(1) && waiting && held.len() == 2 && running.len() == 2)
                .then_some((held, running)),
        )
    })
    .await?;
    let (held, running) = waiting;
    let group = |p: &Pod| p.labels().get("moe.dev/group").cloned();
    ensure!(
        group(&held[0]) == group(&held[1]),
        "gated pods of two groups"
    );
    ensure!(
        group(&running[0]) == group(&running[1]),
        "admitted pods of two groups"
    );
    ensure!(group(&held[0]) != group(&running[0]));
    ensure!(
        held.iter().all(|p| node_of(p).is_empty()),
        "a gated pod was placed"
    );
    ensure!(
        running
            .iter()
            .all(|p| node_of(p).starts_with("gpu-kueue-quota-")),
        "admitted pods off Kueue's pool: {:?}",
        running.iter().map(node_of).collect::<Vec<_>>()
    );
    let s = api.get("queued").await?;
    ensure!(condition(&s, "Degraded").is_some_and(|c| c.status == "True"));
    // Kueue's unit of admission is the group: one Workload of 2 pods per
    // group, not one per pod (which could admit half of each group).
    let mut sizes: Vec<i64> = kueue
        .workloads()
        .await?
        .iter()
        .map(|(_, w)| {
            let sets = w.data["spec"]["podSets"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            sets.iter().map(|p| p["count"].as_i64().unwrap_or(0)).sum()
        })
        .collect();
    sizes.sort();
    ensure!(
        sizes == [2, 2],
        "Workload sizes {sizes:?}: want one of 2 per group"
    );

    // The queue's quota grows: Kueue admits the waiting group.
    kueue.set_gpus(32).await?;
    wait_ready(&api, "queued", 2).await?;

    // One-pod replicas (a Deployment): each pod waits for its own admission,
    // here for the groups' quota (the whole pool) to come free.
    let single = json!({"spec": {"placement": {"queueName": KueueSetup::QUEUE}}});
    api.create(&PostParams::default(), &gpu_service("single", 1, single))
        .await?;
    eventually("the one-pod replica to wait for quota", WAIT, || async {
        let s = api.get("single").await?;
        let waiting = condition(&s, "Ready").is_some_and(|c| c.reason == "WaitingForAdmission");
        let live = server_pods(&pods, "single").await?;
        Ok((waiting && live.len() == 1 && gated(&live[0])).then_some(()))
    })
    .await?;
    api.delete("queued", &DeleteParams::default()).await?;
    wait_ready(&api, "single", 1).await?;
    ns.delete().await?;
    kueue.delete().await
}

#[tokio::test]
async fn a_serving_group_kueue_preempts_waits_and_comes_back_without_a_restart() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "mis-preempt").await?;
    // Quota for one group of 2 pods × 8 GPUs, which a higher priority may take.
    let kueue = KueueSetup::create(&client, &ns.name, SPARE_POOL, 16, false).await?;
    let _op = Operator::start(&ns.name).await?;
    bound_claim(&ns.name, "moe-models").await?;
    let api: Api<MoEInferenceService> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns.name);
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    let pp = PostParams::default();
    let grouped = queued_groups();
    api.create(&pp, &gpu_service("low", 1, grouped)).await?;
    wait_ready(&api, "low", 1).await?;
    wait_formed(&sets, "low", 0, 0).await?;

    // A training gang of higher priority takes the quota: Kueue stops the group.
    let class = UrgentClass::create(&client, &ns.name).await?;
    let urgent = queued_gpu_job("urgent", 2, &class.name);
    jobs.create(&pp, &urgent).await?;
    eventually(
        "the gang to run and the group to wait, kept",
        WAIT,
        || async {
            let job = jobs.get("urgent").await?;
            let running = job.status.and_then(|s| s.phase) == Some(TrainingPhase::Running);
            let s = api.get("low").await?;
            let waiting = condition(&s, "Ready").is_some_and(|c| c.reason == "WaitingForAdmission");
            let live = server_pods(&pods, "low").await?;
            Ok((running && waiting && live.len() == 2 && live.iter().all(gated)).then_some(()))
        },
    )
    .await?;
    let set = sets.get("low-g0-0").await?;
    ensure!(
        set.annotations()
            .get("moe.dev/restarts")
            .map(String::as_str)
            == Some("0")
    );
    ensure!(
        sets.get_opt("low-g0-1").await?.is_none(),
        "the group was replaced"
    );

    // The gang finishes: Kueue admits the group again, the same incarnation.
    release_job(&pods, "urgent").await?;
    wait_ready(&api, "low", 1).await?;
    ensure!(groups_of(&sets, "low").await? == [("0".to_string(), "0".to_string())]);
    ensure!(
        !event_reasons(&client, &ns.name, "low")
            .await?
            .contains(&"GroupRestart".to_string()),
        "a preemption counted as a group restart"
    );
    class.delete().await?;
    ns.delete().await?;
    kueue.delete().await
}
