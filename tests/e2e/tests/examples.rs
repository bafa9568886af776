//! The examples that span both kinds: `examples/train-then-serve/`, a
//! MoETrainingJob and the MoEInferenceService that serves its checkpoint
//! (`model.fromTrainingJob`), applied as the files are, to the real control
//! plane with the operator running under the chart's ServiceAccount and RBAC.
//! (tests/training.rs and tests/inference.rs apply the one-kind examples.)

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::api::Api;
use moe_crds::{MoEInferenceService, MoETrainingJob, TrainingPhase};
use moe_e2e::operator::{Operator, moectl_binary, repo_root, run, sh};
use moe_e2e::{TestNamespace, admin_client, bound_claim, eventually};
use serde::Deserialize;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(90);
const DIR: &str = "examples/train-then-serve";

async fn restricted_ns(client: &Client, prefix: &str) -> Result<TestNamespace> {
    TestNamespace::create(
        client,
        prefix,
        &[("pod-security.kubernetes.io/enforce", "restricted")],
    )
    .await
}

fn condition(svc: &MoEInferenceService, type_: &str) -> Option<(String, String)> {
    svc.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// What `kubectl apply -f examples/train-then-serve/` does, one file at a
/// time in its order (serving.yaml sorts first): the service, applied before
/// its job exists, waits with no replicas; the job runs (KWOK completes its
/// pod at once); the service then serves the job's final checkpoint from the
/// job's claim, with the job's model shape.
#[tokio::test]
async fn the_train_then_serve_example_serves_the_jobs_checkpoint() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "ex-train-serve").await?;
    let _op = Operator::start(&ns.name).await?;
    bound_claim(&ns.name, "moe-checkpoints").await?;
    let serving = format!("{DIR}/serving.yaml");
    let training = format!("{DIR}/training.yaml");

    // What the README tells users to run first.
    let out = run(Command::new(moectl_binary()?)
        .arg("validate")
        .args([&serving, &training])
        .current_dir(repo_root()))
    .context("moectl validate")?;
    for file in [&serving, &training] {
        ensure!(out.contains(&format!("{file}: ok\n")), "{out}");
    }

    sh(&format!("kubectl apply -f {serving} -n {}", ns.name))?;
    let services: Api<MoEInferenceService> = Api::namespaced(client.clone(), &ns.name);
    let name = "tiny-chat-trained";
    eventually("the service to wait for its job", WAIT, || async {
        let s = services.get(name).await?;
        Ok(
            (condition(&s, "Progressing") == Some(("True".into(), "TrainingJobNotFound".into())))
                .then_some(()),
        )
    })
    .await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    ensure!(
        deployments.get_opt(name).await?.is_none(),
        "no replicas before the model exists"
    );

    sh(&format!("kubectl apply -f {training} -n {}", ns.name))?;
    let jobs: Api<MoETrainingJob> = Api::namespaced(client.clone(), &ns.name);
    eventually("tiny-train to succeed", WAIT, || async {
        let j = jobs.get("tiny-train").await?;
        Ok((j.status.and_then(|s| s.phase) == Some(TrainingPhase::Succeeded)).then_some(()))
    })
    .await?;
    let ready = eventually("the service to be Ready", WAIT, || async {
        let s = services.get(name).await?;
        let ready = condition(&s, "Ready").is_some_and(|(status, _)| status == "True");
        Ok((ready && s.status.as_ref().is_some_and(|st| st.ready_replicas == 1)).then_some(s))
    })
    .await?;
    let revision = ready
        .status
        .and_then(|s| s.model_revision)
        .unwrap_or_default();
    ensure!(
        revision.starts_with("moetrainingjob/tiny-train/"),
        "revision {revision}"
    );

    // Served from the job's claim, read-only, at the job's checkpoint directory.
    let pod = deployments
        .get(name)
        .await?
        .spec
        .and_then(|s| s.template.spec)
        .context("pod spec")?;
    let claim = pod
        .volumes
        .unwrap_or_default()
        .into_iter()
        .find(|v| v.name == "model")
        .and_then(|v| v.persistent_volume_claim)
        .context("model volume")?;
    ensure!(
        claim.claim_name == "moe-checkpoints" && claim.read_only == Some(true),
        "{claim:?}"
    );
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let data = config_maps
        .get(&format!("{name}-config"))
        .await?
        .data
        .unwrap_or_default();
    let config: Value = serde_json::from_str(data.get("config.json").context("config.json")?)?;
    ensure!(
        config["modelDir"]
            == json!(format!(
                "/models/checkpoints/{}/tiny-train/checkpoints",
                ns.name
            )),
        "config {config}"
    );
    ensure!(
        config["model"]["moe"]["experts"] == json!(8) && config["model"]["layers"] == json!(3),
        "the job's model shape is carried over: {config}"
    );
    ns.delete().await
}

/// `examples/kueue/queues.yaml` is accepted by the real Kueue (its CRDs' schemas
/// and its webhooks, in a server-side dry run) and names every queue that a
/// queued example asks for.
#[tokio::test]
async fn the_kueue_example_is_valid_and_holds_every_queue_the_examples_name() -> Result<()> {
    let client = admin_client().await?;
    let ns = restricted_ns(&client, "ex-kueue").await?;
    let file = repo_root().join("examples/kueue/queues.yaml");
    let out = sh(&format!(
        "kubectl apply --dry-run=server -n {} -f {}",
        ns.name,
        file.display()
    ))?;
    for object in [
        "topology.kueue.x-k8s.io/gpu-network",
        "resourceflavor.kueue.x-k8s.io/h100",
        "clusterqueue.kueue.x-k8s.io/gpus",
        "localqueue.kueue.x-k8s.io/team-a",
        "localqueue.kueue.x-k8s.io/serving",
    ] {
        ensure!(out.contains(object), "{object} not applied: {out}");
    }
    let text = std::fs::read_to_string(&file)?;
    let local_queues: Vec<String> = serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).map_err(anyhow::Error::from))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .filter(|o| o["kind"] == "LocalQueue")
        .filter_map(|o| o["metadata"]["name"].as_str().map(String::from))
        .collect();
    let mut asked = Vec::new();
    for dir in [
        "examples/training",
        "examples/inference",
        "examples/train-then-serve",
    ] {
        for entry in std::fs::read_dir(repo_root().join(dir))? {
            let v: Value = serde_yaml::from_str(&std::fs::read_to_string(entry?.path())?)?;
            if let Some(q) = v["spec"]["placement"]["queueName"].as_str() {
                asked.push(q.to_string());
            }
        }
    }
    ensure!(asked.len() >= 2, "queued examples: {asked:?}");
    ensure!(
        asked.iter().all(|q| local_queues.contains(q)),
        "examples ask for {asked:?}; examples/kueue has {local_queues:?}"
    );
    ns.delete().await
}
