//! `moectl` as users run it: the built binary, on the examples, the shared
//! table of invalid jobs, and (for `run --local`) fake workers written as
//! shell scripts that record what they were given.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use moe_crds::WorkerConfig;
use moe_crds::contract::env;
use serde::Deserialize;
use serde_json::{Value, json};

const CONTRACT: [&str; 8] = [
    env::WORLD_SIZE,
    env::NODES,
    env::NODE_RANK,
    env::PROCS_PER_NODE,
    env::COORDINATOR,
    env::ATTEMPT,
    env::CONFIG,
    env::JOB,
];

fn moectl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_moectl"))
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn tiny() -> PathBuf {
    repo("examples/training/tiny.yaml")
}

/// An empty directory of this test's own.
fn scratch(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("moectl")
        .join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn yaml_documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap())
        .collect()
}

fn write_yaml(path: &Path, value: &Value) {
    std::fs::write(path, serde_yaml::to_string(value).unwrap()).unwrap();
}

#[test]
fn validate_accepts_every_example() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo("examples/training"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    let output = moectl().arg("validate").args(&files).output().unwrap();
    let text = stdout(&output);
    assert!(output.status.success(), "{text}{}", stderr(&output));
    for file in &files {
        assert!(
            text.contains(&format!("{}: ok\n", file.display())),
            "{text}"
        );
    }
}

/// `training.lora` with every default (attention targets, no routed
/// experts) is valid: a rule reading an unset optional field would fail
/// here as on the apiserver (no schema default fills it), whatever serde
/// defaults would say.
#[test]
fn validate_accepts_adapters_left_at_their_defaults() {
    let mut job = moe_crds::fixtures::valid_training_job();
    moe_crds::fixtures::merge_patch(
        &mut job,
        &serde_json::json!({"spec": {"training": {"lora": {}}, "worker": {"device": "cpu"}}}),
    );
    let file = scratch("lora-defaults").join("job.yaml");
    write_yaml(&file, &job);
    let output = moectl().arg("validate").arg(&file).output().unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
}

#[test]
fn validate_rejects_every_invalid_case_naming_its_field_and_reason() {
    let cases = moe_crds::fixtures::invalid_training_jobs();
    let dir = scratch("invalid-cases");
    let files: Vec<PathBuf> = (0..cases.len())
        .map(|i| dir.join(format!("case-{i:02}.yaml")))
        .collect();
    for (case, file) in cases.iter().zip(&files) {
        write_yaml(file, &case.object);
    }
    write_yaml(
        &dir.join("base.yaml"),
        &moe_crds::fixtures::valid_training_job(),
    );

    let output = moectl()
        .arg("validate")
        .arg(dir.join("base.yaml"))
        .args(&files)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(
        text.contains("base.yaml: ok\n"),
        "the base must be valid: {text}"
    );
    for (case, file) in cases.iter().zip(&files) {
        let prefix = format!("{}: ", file.display());
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(&prefix)).collect();
        assert!(
            lines
                .iter()
                .any(|line| case.expect.iter().all(|e| line.contains(e.as_str()))),
            "{}: no line has all of {:?}: {lines:#?}",
            case.name,
            case.expect
        );
    }
}

#[test]
fn validate_reads_a_stream_from_stdin_and_names_an_unknown_field() {
    let mut misspelt: Value =
        serde_yaml::from_str(&std::fs::read_to_string(tiny()).unwrap()).unwrap();
    let moe = misspelt["spec"]["model"]["moe"].as_object_mut().unwrap();
    let top_k = moe.remove("topK").unwrap();
    moe.insert("topk".into(), top_k);
    misspelt["metadata"]["name"] = json!("misspelt");
    let stream = format!(
        "---\n{}---\n{}",
        std::fs::read_to_string(tiny()).unwrap(),
        serde_yaml::to_string(&misspelt).unwrap()
    );

    let mut child = moectl()
        .args(["validate", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), stream.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();

    assert_eq!(output.status.code(), Some(1));
    let text = stdout(&output);
    assert!(text.contains("-: MoETrainingJob/tiny: ok\n"), "{text}");
    assert!(
        text.contains(
            "-: MoETrainingJob/misspelt: spec.model.moe.topk: unknown field (did you mean topK?)\n"
        ),
        "{text}"
    );
}

fn contract_env(job: &Job) -> Vec<(String, Option<String>)> {
    let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    pod.containers[0]
        .env
        .iter()
        .flatten()
        .filter(|var| CONTRACT.contains(&var.name.as_str()))
        .map(|var| (var.name.clone(), var.value.clone()))
        .collect()
}

fn value_of<'a>(env: &'a [(String, Option<String>)], name: &str) -> Option<&'a str> {
    env.iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| v.as_deref())
}

#[test]
fn render_prints_the_config_map_service_and_attempt_job() {
    let output = moectl().arg("render").arg(tiny()).output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let docs = yaml_documents(&stdout(&output));
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["ConfigMap", "Service", "Job"]);

    let config_map: ConfigMap = serde_json::from_value(docs[0].clone()).unwrap();
    let service: Service = serde_json::from_value(docs[1].clone()).unwrap();
    let job: Job = serde_json::from_value(docs[2].clone()).unwrap();
    assert_eq!(config_map.metadata.name.as_deref(), Some("tiny-config"));
    assert_eq!(service.metadata.name.as_deref(), Some("tiny"));
    assert_eq!(job.metadata.name.as_deref(), Some("tiny-a0"));
    for meta in [&config_map.metadata, &service.metadata, &job.metadata] {
        assert_eq!(meta.namespace.as_deref(), Some("default"));
        let owner = &meta.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
            (
                "MoETrainingJob",
                "tiny",
                "00000000-0000-0000-0000-000000000000"
            )
        );
    }

    let config: WorkerConfig =
        serde_json::from_str(&config_map.data.unwrap()["config.json"]).unwrap();
    assert_eq!(config.job, "default/tiny");
    assert_eq!(config.training.steps, 300);

    let env = contract_env(&job);
    let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, CONTRACT, "every contract variable, in order");
    assert_eq!(value_of(&env, env::WORLD_SIZE), Some("1"));
    assert_eq!(value_of(&env, env::ATTEMPT), Some("0"));
    assert_eq!(
        value_of(&env, env::COORDINATOR),
        Some("tiny-a0-0.tiny:29400")
    );
    assert_eq!(value_of(&env, env::CONFIG), Some("/etc/moe/config.json"));
    assert_eq!(value_of(&env, env::JOB), Some("default/tiny"));
}

#[test]
fn render_takes_the_attempt_namespace_and_worker_image() {
    let output = moectl()
        .arg("render")
        .arg(tiny())
        .args([
            "--attempt",
            "2",
            "--namespace",
            "ml",
            "--worker-image",
            "registry.test/worker:dev",
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let docs = yaml_documents(&stdout(&output));
    let job: Job = serde_json::from_value(docs[2].clone()).unwrap();
    assert_eq!(job.metadata.name.as_deref(), Some("tiny-a2"));
    assert_eq!(job.metadata.namespace.as_deref(), Some("ml"));
    let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(
        pod.containers[0].image.as_deref(),
        Some("registry.test/worker:dev")
    );
    let env = contract_env(&job);
    assert_eq!(value_of(&env, env::ATTEMPT), Some("2"));
    assert_eq!(
        value_of(&env, env::COORDINATOR),
        Some("tiny-a2-0.tiny:29400")
    );
    assert_eq!(value_of(&env, env::JOB), Some("ml/tiny"));
}

#[test]
fn render_shows_the_export_job_of_a_job_with_a_hugging_face_output() {
    let output = moectl()
        .arg("render")
        .arg(repo("examples/training/qwen3-30b-a3b-finetune.yaml"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let docs = yaml_documents(&stdout(&output));
    let export = docs
        .iter()
        .find(|d| d["metadata"]["name"] == "qwen3-30b-a3b-sft-export")
        .expect("the export Job");
    let command: Vec<&str> = export["spec"]["template"]["spec"]["containers"][0]["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        command[..6],
        [
            "moe-worker",
            "export",
            "--model",
            "/var/lib/moe/qwen3-30b-a3b-sft/research/qwen3-30b-a3b-sft/checkpoints",
            "--out",
            "/output/exports/research/qwen3-30b-a3b-sft"
        ]
    );
}

#[test]
fn render_shows_the_pod_group_of_a_gang_under_the_workload_api() {
    let job = repo("examples/training/h100-fp8.yaml");
    let render = |flags: &[&str]| {
        let output = moectl()
            .arg("render")
            .arg(&job)
            .args(flags)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", stderr(&output));
        yaml_documents(&stdout(&output))
    };
    let kinds = |docs: &[Value]| -> Vec<String> {
        docs.iter()
            .map(|d| d["kind"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(kinds(&render(&[])), ["ConfigMap", "Service", "Job"]);
    let docs = render(&["--gang-scheduling", "workload-api"]);
    assert_eq!(kinds(&docs), ["ConfigMap", "Service", "PodGroup", "Job"]);
    let name = docs[2]["metadata"]["name"].as_str().unwrap();
    let nodes = docs[3]["spec"]["parallelism"].as_i64().unwrap();
    assert_eq!(
        docs[2]["spec"]["schedulingPolicy"]["gang"]["minCount"].as_i64(),
        Some(nodes)
    );
    assert_eq!(
        docs[3]["spec"]["template"]["spec"]["schedulingGroup"]["podGroupName"].as_str(),
        Some(name)
    );
}

#[test]
fn render_shows_a_pod_group_per_replica_group_under_the_workload_api() {
    let output = moectl()
        .arg("render")
        .arg(repo("examples/inference/h100-2node-ep16.yaml"))
        .args(["--gang-scheduling", "workload-api"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let docs = yaml_documents(&stdout(&output));
    let sets: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "StatefulSet").collect();
    let groups: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "PodGroup").collect();
    assert!(!sets.is_empty());
    assert_eq!(groups.len(), sets.len());
    for (set, group) in sets.iter().zip(&groups) {
        let name = set["metadata"]["name"].as_str().unwrap();
        assert_eq!(group["metadata"]["name"].as_str(), Some(name));
        assert_eq!(
            group["spec"]["schedulingPolicy"]["gang"]["minCount"],
            set["spec"]["replicas"]
        );
        assert_eq!(
            set["spec"]["template"]["spec"]["schedulingGroup"]["podGroupName"].as_str(),
            Some(name)
        );
    }
}

#[test]
fn render_refuses_an_invalid_job() {
    let dir = scratch("render-invalid");
    let mut job: Value = serde_yaml::from_str(&std::fs::read_to_string(tiny()).unwrap()).unwrap();
    job["spec"]["parallelism"]["nodes"] = json!(0);
    let file = dir.join("job.yaml");
    write_yaml(&file, &job);
    let output = moectl().arg("render").arg(&file).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(stdout(&output).is_empty());
    assert!(
        stderr(&output).contains("spec.parallelism.nodes: Invalid value: 0"),
        "{}",
        stderr(&output)
    );
}

/// A fake `moe-worker` in `dir`: it records its arguments and contract
/// environment in `<dir>/rank-<MOE_NODE_RANK>`, then runs `body`.
fn fake_worker(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("fake-worker");
    let script = format!(
        "#!/bin/sh\n\
         out={dir}/rank-$MOE_NODE_RANK\n\
         echo \"args=$*\" > $out.tmp\n\
         env | grep '^MOE_' | sort >> $out.tmp\n\
         mv $out.tmp $out\n\
         {body}\n",
        dir = dir.display()
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn recorded(dir: &Path, rank: i32) -> String {
    std::fs::read_to_string(dir.join(format!("rank-{rank}"))).unwrap()
}

/// tiny.yaml as a gang of two nodes (with a batch that two ranks divide).
/// `moectl run --local <flags> <job>` in `dir` with `worker` as moe-worker.
fn run_local(dir: &Path, worker: &Path, flags: &[&str], job: &Path) -> Output {
    moectl()
        .args(["run", "--local"])
        .args(flags)
        .arg(job)
        .arg("--worker-bin")
        .arg(worker)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn two_node_job(dir: &Path) -> PathBuf {
    let mut job: Value = serde_yaml::from_str(&std::fs::read_to_string(tiny()).unwrap()).unwrap();
    job["spec"]["parallelism"]["nodes"] = json!(2);
    job["spec"]["training"]["microBatchSize"] = json!(4);
    let file = dir.join("two-nodes.yaml");
    write_yaml(&file, &job);
    file
}

#[test]
fn run_local_gives_the_worker_the_contract_and_a_local_config() {
    let dir = scratch("run-local");
    let worker = fake_worker(
        &dir,
        "echo 'step 1/300 loss 5.5' >&2\necho '{\"step\":300,\"loss\":1.25}'",
    );
    let output = run_local(&dir, &worker, &[], &tiny());
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        stdout(&output).lines().last(),
        Some("{\"step\":300,\"loss\":1.25}")
    );
    assert!(
        stderr(&output).contains("step 1/300 loss 5.5"),
        "worker stderr passes through"
    );

    let record = recorded(&dir, 0);
    let coordinator = record
        .lines()
        .find_map(|l| l.strip_prefix("MOE_COORDINATOR=127.0.0.1:"))
        .expect("a local coordinator");
    assert!(coordinator.parse::<u16>().is_ok(), "{record}");
    for line in [
        "args=train --config runs/tiny/config.json",
        "MOE_ATTEMPT=0",
        "MOE_CONFIG=runs/tiny/config.json",
        "MOE_JOB=local/tiny",
        "MOE_NODES=1",
        "MOE_NODE_RANK=0",
        "MOE_PROCS_PER_NODE=1",
        "MOE_TERMINATION_LOG=runs/tiny/termination-log",
        "MOE_WORLD_SIZE=1",
    ] {
        assert!(record.lines().any(|l| l == line), "{line} not in {record}");
    }

    let config: WorkerConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("runs/tiny/config.json")).unwrap())
            .unwrap();
    assert_eq!(config.job, "local/tiny");
    assert_eq!(config.checkpoint.dir, "runs/tiny/checkpoints");
    assert_eq!(config.checkpoint.interval_steps, 100);
    assert_eq!(config.output_dir, "runs/tiny");
    assert_eq!(config.training.steps, 300);
}

#[test]
fn run_local_hands_the_thread_count_to_every_worker() {
    let dir = scratch("run-local-threads");
    let worker = fake_worker(&dir, "echo '{}'");
    // The worker's arguments from a local run of `job` with `flags`.
    let worker_args = |flags: &[&str], job: &Path| {
        let output = run_local(&dir, &worker, flags, job);
        assert!(output.status.success(), "{}", stderr(&output));
        let record = recorded(&dir, 0);
        let args = record.lines().find_map(|l| l.strip_prefix("args="));
        args.expect("the worker's arguments").to_string()
    };
    assert_eq!(
        worker_args(&["--threads", "2"], &tiny()),
        "train --config runs/tiny/config.json --threads 2"
    );
    // Without the flag, each worker gets what its pod would: here the
    // container's CPU limit of 3 over one process.
    let mut job: Value = serde_yaml::from_str(&std::fs::read_to_string(tiny()).unwrap()).unwrap();
    job["spec"]["worker"]["resources"] = json!({"limits": {"cpu": "3"}});
    let limited = dir.join("limited.yaml");
    write_yaml(&limited, &job);
    assert_eq!(
        worker_args(&[], &limited),
        "train --config runs/tiny/config.json --threads 3"
    );

    let refused = moectl()
        .args(["run", "--local", "--threads", "0"])
        .arg(tiny())
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("--threads"),
        "{}",
        stderr(&refused)
    );
}

#[test]
fn run_local_stops_the_gang_and_fails_when_a_rank_fails() {
    let dir = scratch("run-local-failure");
    let job = two_node_job(&dir);
    // Rank 1 fails as on a configuration error; rank 0 would run for a minute.
    let worker = fake_worker(&dir, "[ \"$MOE_NODE_RANK\" = 1 ] && exit 3\nexec sleep 60");
    let started = Instant::now();
    let output = run_local(&dir, &worker, &[], &job);
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "rank 0 was not stopped: {:?}",
        started.elapsed()
    );
    let (rank0, rank1) = (recorded(&dir, 0), recorded(&dir, 1));
    for (record, rank) in [(&rank0, "0"), (&rank1, "1")] {
        assert!(
            record.contains(&format!("MOE_NODE_RANK={rank}\n")),
            "{record}"
        );
        assert!(record.contains("MOE_WORLD_SIZE=2\n"), "{record}");
        assert!(record.contains("MOE_NODES=2\n"), "{record}");
    }
    let coordinator = |r: &str| {
        r.lines()
            .find(|l| l.starts_with("MOE_COORDINATOR="))
            .map(String::from)
    };
    assert_eq!(
        coordinator(&rank0),
        coordinator(&rank1),
        "one coordinator for the gang"
    );
}

#[test]
fn run_local_forwards_sigterm_and_exits_with_the_workers_status() {
    let dir = scratch("run-local-sigterm");
    // Like the real worker: on SIGTERM, checkpoint (here: a marker file),
    // print the summary and exit 0. Unsignalled, it gives up after 10 s with
    // status 7, so a broken forwarder fails the test instead of hanging it.
    let worker = fake_worker(
        &dir,
        &format!(
            "trap 'touch {dir}/stopped; echo \"{{\\\"stopped\\\":true}}\"; exit 0' TERM\n\
             touch {dir}/ready\n\
             for _ in $(seq 100); do sleep 0.1; done\n\
             exit 7",
            dir = dir.display()
        ),
    );
    let child = moectl()
        .args(["run", "--local"])
        .arg(tiny())
        .arg("--worker-bin")
        .arg(&worker)
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !dir.join("ready").exists() {
        assert!(Instant::now() < deadline, "the worker never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) reads no memory; the pid is our unreaped child's.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(dir.join("stopped").exists(), "the worker got no SIGTERM");
    assert_eq!(stdout(&output).lines().last(), Some("{\"stopped\":true}"));
}

#[test]
fn run_local_says_when_there_is_no_worker() {
    let dir = scratch("run-local-no-worker");
    let output = moectl()
        .args(["run", "--local"])
        .arg(tiny())
        .env("MOE_WORKER_BIN", dir.join("missing"))
        .current_dir(&dir)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("missing"), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("MOE_WORKER_BIN"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn validate_and_render_understand_inference_services() {
    let dir = scratch("inference");
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo("examples/inference"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 2, "{files:?}");
    let cases = moe_crds::fixtures::invalid_inference_services();
    let bad: Vec<PathBuf> = (0..cases.len())
        .map(|i| dir.join(format!("case-{i:02}.yaml")))
        .collect();
    for (case, file) in cases.iter().zip(&bad) {
        write_yaml(file, &case.object);
    }
    let base = dir.join("base.yaml");
    write_yaml(&base, &moe_crds::fixtures::valid_inference_service());
    let output = moectl()
        .arg("validate")
        .args(&files)
        .arg(&base)
        .args(&bad)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let text = stdout(&output);
    for file in files.iter().chain([&base]) {
        assert!(
            text.contains(&format!("{}: ok\n", file.display())),
            "{text}"
        );
    }
    for (case, file) in cases.iter().zip(&bad) {
        let prefix = format!("{}: ", file.display());
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(&prefix)).collect();
        assert!(
            lines
                .iter()
                .any(|line| case.expect.iter().all(|e| line.contains(e.as_str()))),
            "{}: no line has all of {:?}: {lines:#?}",
            case.name,
            case.expect
        );
    }

    // render: ConfigMap, Service, Deployment, PDB, (autoscaling) HPA and (route) HTTPRoute.
    let output = moectl()
        .args(["render", "--namespace", "serve"])
        .arg(repo("examples/inference/h100-ep8.yaml"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let docs = yaml_documents(&stdout(&output));
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        [
            "ConfigMap",
            "Service",
            "Deployment",
            "PodDisruptionBudget",
            "HorizontalPodAutoscaler",
            "HTTPRoute"
        ]
    );
    assert_eq!(
        docs[5]["spec"]["rules"][0]["backendRefs"][0],
        json!({"name": "moe-9b-chat", "port": 8000})
    );
    let pod = &docs[2]["spec"]["template"]["spec"];
    assert_eq!(
        pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"],
        json!("8")
    );
    assert!(
        docs.iter()
            .all(|d| d["metadata"]["namespace"] == json!("serve"))
    );

    // Behind an endpoint picker: the route sends to the InferencePool over the server pods.
    let output = moectl()
        .arg("render")
        .arg(repo("examples/inference/gateway-epp.yaml"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let docs = yaml_documents(&stdout(&output));
    let route = docs.iter().find(|d| d["kind"] == "HTTPRoute").unwrap();
    let pool = docs.iter().find(|d| d["kind"] == "InferencePool").unwrap();
    assert_eq!(
        route["spec"]["rules"][0]["backendRefs"][0],
        json!({"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "moe-ep8-epp"})
    );
    assert_eq!(
        pool["spec"]["selector"]["matchLabels"],
        json!({"moe.dev/role": "server", "moe.dev/service-name": "moe-ep8-epp"})
    );
    assert_eq!(pool["spec"]["endpointPickerRef"]["name"], "moe-epp");

    // Multi-pod replicas: a headless Service and a StatefulSet per group instead of the Deployment.
    let output = moectl()
        .arg("render")
        .arg(repo("examples/inference/h100-2node-ep16.yaml"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let docs = yaml_documents(&stdout(&output));
    let names: Vec<String> = docs
        .iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap(),
                d["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            "ConfigMap/moe-big-chat-config",
            "Service/moe-big-chat",
            "Service/moe-big-chat-pods",
            "StatefulSet/moe-big-chat-g0-0",
            "StatefulSet/moe-big-chat-g1-0",
            "PodDisruptionBudget/moe-big-chat"
        ]
    );
    assert_eq!(docs[3]["spec"]["replicas"], json!(2));
}
