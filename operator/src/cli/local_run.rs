//! `moectl run --local`: train on this machine as a cluster would. The worker
//! config comes from the operator's builder with its paths moved into a run
//! directory, the environment from the operator's contract with the values a
//! pod learns from the cluster (its node rank, the coordinator) made local,
//! and one worker process per node rank runs as a gang.

use std::ffi::OsStr;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};

use anyhow::Context;
use kube::ResourceExt;
use moe_crds::contract::env;
use moe_crds::{MoETrainingJob, WorkerConfig};

use crate::cli::gang;
use crate::training::{build, progress};

/// Stands for the namespace in `MOE_JOB` and the config's `job`.
pub const LOCAL_NAMESPACE: &str = "local";
/// A local run is always the first attempt; re-running resumes from its checkpoints.
const ATTEMPT: i32 = 0;

/// Where a local run keeps its files, and the config its workers read.
#[derive(Clone, Debug)]
pub struct LocalRun {
    /// `<workdir>/<name>`: config.json, the worker's outputs and `checkpoints/`.
    pub dir: PathBuf,
    /// `<dir>/config.json`, passed as `--config` and `MOE_CONFIG`.
    pub config_path: String,
    pub config: WorkerConfig,
    /// `<dir>/termination-log`: node rank 0's termination message, as a
    /// pod's; a run that succeeds leaves rank 0's last report there.
    pub termination_log: PathBuf,
}

impl LocalRun {
    /// The run of `job` under `workdir`. Paths stay relative when `workdir`
    /// is: workers start in moectl's current directory.
    pub fn plan(job: &MoETrainingJob, workdir: &Path) -> anyhow::Result<Self> {
        let dir = workdir.join(job.name_any());
        let text = |path: &Path| {
            path.to_str()
                .map(String::from)
                .with_context(|| format!("{} is not valid UTF-8", path.display()))
        };
        let mut config = build::worker_config(job);
        config.job = format!("{LOCAL_NAMESPACE}/{}", job.name_any());
        config.checkpoint.dir = text(&dir.join("checkpoints"))?;
        config.output_dir = text(&dir)?;
        // The current directory plays the claim: the worker reads
        // `<dataDir>/<volume.path>` (and `tokenizerFile` the same way), so
        // a volume's path is taken relative to where moectl runs.
        config.data_dir = job.spec.data.volume.as_ref().map(|_| ".".to_string());
        // A Hub dataset, a pretrained model: downloaded first
        // ([`Self::download_commands`]), read through the run's links to
        // the commits, as a pod reads its own.
        if job.spec.data.huggingface.is_some() {
            config.data_dir = Some(text(&dir.join("data"))?);
        }
        // A pretrained model on a volume is at its path from here, as data is.
        config.init_dir = match job
            .spec
            .model
            .init_from
            .as_ref()
            .map(|i| (&i.volume, &i.from_training_job))
        {
            Some((Some(volume), _)) => Some(match volume.path.trim_start_matches('/') {
                "" => ".".to_string(),
                path => path.to_string(),
            }),
            Some((None, Some(from))) => Some(text(&local_checkpoint(workdir, from)?)?),
            Some((None, None)) => Some(text(&dir.join("init"))?),
            None => None,
        };
        Ok(Self {
            config_path: text(&dir.join("config.json"))?,
            termination_log: dir.join("termination-log"),
            dir,
            config,
        })
    }

    /// What downloads a Hub dataset and a pretrained model before the
    /// workers start: the commands of the pods' init containers (`moe-worker
    /// fetch`, without the worker's name), each with the files kept under
    /// `<workdir>/huggingface` (shared by the runs there: a commit is
    /// downloaded once) and its link in the run (`data`, `init`), each named
    /// by the field it fetches. The token, if any, is `HF_TOKEN` from
    /// moectl's environment (a local run reads no Secret).
    pub fn download_commands(
        &self,
        job: &MoETrainingJob,
        workdir: &Path,
    ) -> anyhow::Result<Vec<(&'static str, Vec<String>)>> {
        let into = workdir
            .join(crate::hub::HUB_DIR)
            .to_str()
            .map(String::from)
            .with_context(|| format!("{} is not valid UTF-8", workdir.display()))?;
        let pod = build::init_containers(job, &crate::pods::BuildContext::default());
        let mut out = Vec::new();
        for init in pod.into_iter().flatten() {
            let (field, link) = if init.name == crate::hub::MODEL_DOWNLOAD_CONTAINER {
                ("model.initFrom.huggingface", &self.config.init_dir)
            } else {
                ("data.huggingface", &self.config.data_dir)
            };
            let mut command = init.command.unwrap_or_default();
            for (flag, value) in [
                ("--into", into.clone()),
                ("--link", link.clone().unwrap_or_default()),
            ] {
                if let Some(at) = command.iter().position(|a| a == flag) {
                    command[at + 1] = value;
                }
            }
            out.push((field, command.split_off(1)));
        }
        Ok(out)
    }

    /// What exports the trained model when the job has
    /// `output.huggingface`: the export pod's command (`moe-worker export`,
    /// without the worker's name) reading this run's checkpoints, and the
    /// directory it writes. The work directory plays the output claim:
    /// `<workdir>/<path>/local/<name>`, as a pod writes `<path>/<namespace>/<name>`.
    pub fn export_command(
        &self,
        job: &MoETrainingJob,
        workdir: &Path,
    ) -> anyhow::Result<Option<(Vec<String>, PathBuf)>> {
        let mut local = job.clone();
        local.metadata.namespace = Some(LOCAL_NAMESPACE.into());
        let Some(mut command) = build::export_command(&local) else {
            return Ok(None);
        };
        let out = workdir.join(build::export_path(&local));
        for (flag, value) in [
            ("--model", self.config.checkpoint.dir.clone()),
            (
                "--out",
                out.to_str()
                    .map(String::from)
                    .with_context(|| format!("{} is not valid UTF-8", out.display()))?,
            ),
        ] {
            if let Some(at) = command.iter().position(|a| a == flag) {
                command[at + 1] = value;
            }
        }
        Ok(Some((command.split_off(1), out)))
    }

    /// The environment of node rank `node_rank`: the operator's
    /// ([`build::env_vars`]), with the pod-specific values made local.
    /// Variables a pod reads from the cluster (`valueFrom`) are left out;
    /// see [`unresolvable_env`].
    pub fn worker_env(
        &self,
        job: &MoETrainingJob,
        node_rank: i32,
        coordinator: &str,
    ) -> Vec<(String, String)> {
        build::env_vars(job, ATTEMPT, job.spec.parallelism.nodes)
            .into_iter()
            .filter_map(|var| {
                let value = match var.name.as_str() {
                    env::NODE_RANK => node_rank.to_string(),
                    env::COORDINATOR => coordinator.to_string(),
                    env::CONFIG => self.config_path.clone(),
                    env::JOB => self.config.job.clone(),
                    _ => var.value?,
                };
                Some((var.name, value))
            })
            // Rank 0's status endpoint on loopback only: a laptop is not a pod network.
            .chain((node_rank == 0).then(|| {
                (
                    env::STATUS_ADDR.to_string(),
                    format!("127.0.0.1:{}", moe_crds::contract::METRICS_PORT),
                )
            }))
            .chain((node_rank == 0).then(|| {
                (
                    env::TERMINATION_LOG.to_string(),
                    self.termination_log.to_string_lossy().into_owned(),
                )
            }))
            .collect()
    }

    /// `job` as the operator sees it once the run succeeded: its
    /// `status.progress` from rank 0's last report (the termination
    /// message), which says which checkpoint is the job's model
    /// (`training.evaluation.keepBest`); `job` as is without one.
    pub fn finished(&self, job: &MoETrainingJob) -> MoETrainingJob {
        let report = std::fs::read_to_string(&self.termination_log)
            .ok()
            .and_then(|text| serde_json::from_str(text.trim()).ok());
        let mut finished = job.clone();
        if let Some(report) = report {
            let progress = progress::to_status(&report, k8s_openapi::jiff::Timestamp::now());
            finished
                .status
                .get_or_insert_with(Default::default)
                .progress = Some(progress);
        }
        finished
    }
}

/// `model.initFrom.fromTrainingJob` here: that job's local run in the same
/// work directory (`moectl run --local` it first), at the step named, else
/// at its model as its last report says (its best checkpoint with
/// `training.evaluation.keepBest`, else its final one), else its newest.
fn local_checkpoint(workdir: &Path, from: &moe_crds::TrainingJobModel) -> anyhow::Result<PathBuf> {
    let run = workdir.join(&from.name);
    let checkpoints = run.join("checkpoints");
    let named = |step: i64| {
        checkpoints.join(moe_crds::contract::checkpoint_dir_name(
            u64::try_from(step).unwrap_or(0),
        ))
    };
    let reported = || -> Option<i64> {
        let text = std::fs::read_to_string(run.join("termination-log")).ok()?;
        let report: progress::Report = serde_json::from_str(text.trim()).ok()?;
        report.best_checkpoint_step.or(report.last_checkpoint_step)
    };
    let newest = || -> Option<PathBuf> {
        std::fs::read_dir(&checkpoints)
            .ok()?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| {
                n.strip_prefix("step-")
                    .is_some_and(|s| s.parse::<u64>().is_ok())
            })
            .max()
            .map(|n| checkpoints.join(n))
    };
    let path = match from.checkpoint.or_else(reported) {
        Some(step) => named(step),
        None => newest().with_context(|| {
            format!(
                "model.initFrom.fromTrainingJob: {} has no checkpoint: run `moectl run --local` on MoETrainingJob {} first",
                checkpoints.display(),
                from.name
            )
        })?,
    };
    anyhow::ensure!(
        path.is_dir(),
        "model.initFrom.fromTrainingJob: {} does not exist: run `moectl run --local` on MoETrainingJob {} first",
        path.display(),
        from.name
    );
    Ok(path)
}

/// Names of the job's extra worker variables that take their value from the
/// cluster (secrets, fields), which a local run cannot resolve.
pub fn unresolvable_env(job: &MoETrainingJob) -> Vec<&str> {
    job.spec
        .worker
        .env
        .iter()
        .filter(|var| var.value.is_none() && var.value_from.is_some())
        .map(|var| var.name.as_str())
        .collect()
}

/// Writes the run's config and runs the gang of workers to completion
/// (each with `threads` GEMM threads when given, else as many as its pod
/// would get: [`crate::pods::cpu_threads`]); returns moectl's exit
/// status (see [`gang::run`]).
pub fn run(
    job: &MoETrainingJob,
    workdir: &Path,
    worker: &Path,
    threads: Option<u16>,
) -> anyhow::Result<u8> {
    let run = LocalRun::plan(job, workdir)?;
    std::fs::create_dir_all(&run.dir)
        .with_context(|| format!("cannot create {}", run.dir.display()))?;
    let config = serde_json::to_string_pretty(&run.config)? + "\n";
    std::fs::write(&run.config_path, config)
        .with_context(|| format!("cannot write {}", run.config_path))?;
    for (field, download) in run.download_commands(job, workdir)? {
        eprintln!(
            "moectl: downloading {field}: {} {}",
            worker.display(),
            download.join(" ")
        );
        let status = std::process::Command::new(worker)
            .args(&download)
            .status()
            .with_context(|| format!("cannot run {}", worker.display()))?;
        if !status.success() {
            // The worker said why (exit 2: the Hub refused or a path is wrong).
            return Ok(status.code().map_or(1, |c| c.clamp(1, 255) as u8));
        }
    }
    for name in unresolvable_env(job) {
        eprintln!(
            "moectl: warning: worker env {name} uses valueFrom, which a local run cannot resolve; left unset"
        );
    }
    let coordinator = format!("{}:{}", Ipv4Addr::LOCALHOST, free_port()?);
    let members = (0..job.spec.parallelism.nodes)
        .map(|rank| run.worker_env(job, rank, &coordinator))
        .collect::<Vec<_>>();
    let p = &job.spec.parallelism;
    eprintln!(
        "moectl: running {} ({} node(s) × {} process(es)) with {}, in {}",
        job.name_any(),
        p.nodes,
        p.processes_per_node,
        worker.display(),
        run.dir.display()
    );
    // As in the cluster: the job's cpuThreads, else its CPUs per process.
    let threads = threads
        .map(i32::from)
        .or_else(|| crate::pods::cpu_threads(&job.spec.worker, p.processes_per_node))
        .filter(|&n| n > 1)
        .map(|n| n.to_string());
    let mut args = vec!["train", "--config", &run.config_path];
    if let Some(threads) = &threads {
        args.extend(["--threads", threads]);
    }
    let args: Vec<&OsStr> = args.into_iter().map(OsStr::new).collect();
    // The worker writes its termination message only where the file is.
    std::fs::write(&run.termination_log, "")
        .with_context(|| format!("cannot write {}", run.termination_log.display()))?;
    let code = gang::run(worker, &args, &members)?;
    if code != 0 {
        return Ok(code);
    }
    // Trained: the export a cluster runs next, here.
    let Some((export, out)) = run.export_command(&run.finished(job), workdir)? else {
        return Ok(0);
    };
    if out.exists() {
        eprintln!(
            "moectl: output.huggingface: {} exists, not exporting again",
            out.display()
        );
        return Ok(0);
    }
    eprintln!(
        "moectl: exporting output.huggingface: {} {}",
        worker.display(),
        export.join(" ")
    );
    let status = std::process::Command::new(worker)
        .args(&export)
        .status()
        .with_context(|| format!("cannot run {}", worker.display()))?;
    Ok(status.code().map_or(1, |c| c.clamp(0, 255) as u8))
}

/// A port nobody listens on now, for rank 0's rendezvous store. Another
/// process could take it before the worker binds it; on one machine that
/// is unlikely enough, and the run would then fail visibly, not silently.
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("cannot find a free port for the coordinator")?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use moe_crds::VolumeData;

    use super::*;

    fn job() -> MoETrainingJob {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "moe.dev/v1alpha1", "kind": "MoETrainingJob",
            "metadata": {"name": "tiny", "namespace": "team"},
            "spec": {
                "model": {"hiddenSize": 64, "layers": 2, "attentionHeads": 4, "kvHeads": 2,
                          "seqLen": 64, "moe": {"experts": 8, "topK": 2, "expertHiddenSize": 64}},
                "training": {"steps": 10, "globalBatchSize": 8},
                "parallelism": {"nodes": 2},
                "worker": {"env": [
                    {"name": "EXTRA", "value": "1"},
                    {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}
                ]}
            }
        }))
        .unwrap()
    }

    #[test]
    fn moves_every_path_into_the_run_directory() {
        let run = LocalRun::plan(&job(), Path::new("runs")).unwrap();
        assert_eq!(run.dir, Path::new("runs/tiny"));
        assert_eq!(run.config_path, "runs/tiny/config.json");
        assert_eq!(run.config.job, "local/tiny");
        assert_eq!(run.config.checkpoint.dir, "runs/tiny/checkpoints");
        assert_eq!(run.config.output_dir, "runs/tiny");
        assert_eq!(run.config.data_dir, None);
    }

    #[test]
    fn reads_volume_data_relative_to_the_current_directory() {
        let mut job = job();
        job.spec.data.builtin = None;
        job.spec.data.volume = Some(VolumeData {
            claim_name: "data".into(),
            path: "corpora/web/".into(),
        });
        // The worker joins the two: ./corpora/web/, once (the path used to
        // be the data directory too, and the worker read corpora/web/corpora/web).
        let run = LocalRun::plan(&job, Path::new("runs")).unwrap();
        assert_eq!(run.config.data_dir.as_deref(), Some("."));
        let volume = run.config.data.volume.as_ref().expect("the volume");
        assert_eq!(volume.path, "corpora/web/");
    }

    /// A Hub dataset and a pretrained model: the pods' downloads, their
    /// files kept in the work directory and their links in the run, which
    /// the worker reads.
    #[test]
    fn downloads_a_hub_dataset_and_a_pretrained_model_first_and_reads_them_through_the_runs_links()
    {
        let mut job = job();
        job.spec.data.builtin = None;
        job.spec.data.huggingface = Some(
            serde_json::from_value(serde_json::json!({"repo": "org/corpus", "path": "train"}))
                .unwrap(),
        );
        job.spec.model.init_from = Some(
            serde_json::from_value(serde_json::json!({"huggingface": {"repo": "org/base"}}))
                .unwrap(),
        );
        let run = LocalRun::plan(&job, Path::new("runs")).unwrap();
        assert_eq!(run.config.data_dir.as_deref(), Some("runs/tiny/data"));
        assert_eq!(run.config.init_dir.as_deref(), Some("runs/tiny/init"));
        let commands: Vec<(&str, String)> = run
            .download_commands(&job, Path::new("runs"))
            .unwrap()
            .into_iter()
            .map(|(field, command)| (field, command.join(" ")))
            .collect();
        assert_eq!(
            commands,
            vec![
                (
                    "data.huggingface",
                    "fetch --repo-type dataset --repo org/corpus --revision main --into \
                     runs/huggingface --link runs/tiny/data --include train"
                        .to_string()
                ),
                (
                    "model.initFrom.huggingface",
                    "fetch --repo org/base --revision main --into runs/huggingface --link \
                     runs/tiny/init"
                        .to_string()
                ),
            ]
        );
        assert!(
            LocalRun::plan(&self::job(), Path::new("runs"))
                .unwrap()
                .download_commands(&self::job(), Path::new("runs"))
                .unwrap()
                .is_empty()
        );
        // training.evaluation.path is downloaded with the training files.
        job.spec.training.evaluation = Some(
            serde_json::from_value(serde_json::json!({"intervalSteps": 10, "path": "validation"}))
                .unwrap(),
        );
        let run = LocalRun::plan(&job, Path::new("runs")).unwrap();
        let data = &run.download_commands(&job, Path::new("runs")).unwrap()[0];
        assert_eq!(data.0, "data.huggingface");
        assert!(
            data.1
                .join(" ")
                .ends_with("--include train --include validation"),
            "{:?}",
            data.1
        );
    }

    #[test]
    fn exports_the_runs_checkpoints_into_the_work_directory() {
        let mut job = job();
        assert!(
            LocalRun::plan(&job, Path::new("runs"))
                .unwrap()
                .export_command(&job, Path::new("runs"))
                .unwrap()
                .is_none()
        );
        job.spec.checkpoint.claim_name = Some("ckpt".into());
        job.spec.output = Some(moe_crds::OutputSpec {
            huggingface: Some(moe_crds::HuggingFaceOutput {
                claim_name: "models".into(),
                path: "exports".into(),
                precision: moe_crds::ExportPrecision::Bf16,
                adapter_only: false,
                resources: None,
            }),
        });
        let run = LocalRun::plan(&job, Path::new("runs")).unwrap();
        let (command, out) = run
            .export_command(&job, Path::new("runs"))
            .unwrap()
            .unwrap();
        assert_eq!(out, Path::new("runs/exports/local/tiny"));
        assert_eq!(
            command.join(" "),
            "export --model runs/tiny/checkpoints --out runs/exports/local/tiny \
             --precision bf16 --shard-size-mb 2000"
        );
        // training.evaluation.keepBest: rank 0's last report (its
        // termination message, in the run directory) names the best.
        job.spec.training.evaluation = Some(
            serde_json::from_value(serde_json::json!({"intervalSteps": 10, "keepBest": true}))
                .unwrap(),
        );
        let dir = std::env::temp_dir().join(format!("moectl-finished-{}", std::process::id()));
        let run = LocalRun::plan(&job, &dir).unwrap();
        std::fs::create_dir_all(&run.dir).unwrap();
        let export = |run: &LocalRun| {
            let (command, _) = run
                .export_command(&run.finished(&job), &dir)
                .unwrap()
                .unwrap();
            command.join(" ")
        };
        assert!(
            export(&run).ends_with("--shard-size-mb 2000"),
            "no report yet"
        );
        std::fs::write(
            &run.termination_log,
            r#"{"step":30,"totalSteps":30,"lastCheckpointStep":30,"bestCheckpointStep":20}"#,
        )
        .unwrap();
        assert!(
            export(&run).ends_with("--shard-size-mb 2000 --checkpoint-step 20"),
            "{}",
            export(&run)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `model.initFrom.fromTrainingJob` locally: that job's run in the same
    /// work directory, at the step named, else its model as its last report
    /// says, else its newest checkpoint; none there is an error saying what
    /// to run first.
    #[test]
    fn a_job_starting_from_another_reads_that_jobs_local_run() {
        let dir = std::env::temp_dir().join(format!("moectl-from-{}", std::process::id()));
        let checkpoints = dir.join("pretrain/checkpoints");
        let mut job = job();
        job.spec.model.init_from = Some(
            serde_json::from_value(serde_json::json!({"fromTrainingJob": {"name": "pretrain"}}))
                .unwrap(),
        );
        let init = |job: &MoETrainingJob| LocalRun::plan(job, &dir).map(|r| r.config.init_dir);
        let error = init(&job).unwrap_err().to_string();
        assert!(
            error.contains("run `moectl run --local` on MoETrainingJob pretrain first"),
            "{error}"
        );
        for step in [100, 200, 300] {
            std::fs::create_dir_all(checkpoints.join(format!("step-{step:08}"))).unwrap();
        }
        let at = |step: &str| Some(checkpoints.join(step).to_string_lossy().into_owned());
        assert_eq!(init(&job).unwrap(), at("step-00000300"), "the newest");
        std::fs::write(
            dir.join("pretrain/termination-log"),
            r#"{"step":300,"totalSteps":300,"lastCheckpointStep":300,"bestCheckpointStep":200}"#,
        )
        .unwrap();
        assert_eq!(
            init(&job).unwrap(),
            at("step-00000200"),
            "its model: the best"
        );
        if let Some(from) = job
            .spec
            .model
            .init_from
            .as_mut()
            .and_then(|i| i.from_training_job.as_mut())
        {
            from.checkpoint = Some(100);
        }
        assert_eq!(init(&job).unwrap(), at("step-00000100"), "the step named");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sets_the_contract_with_local_values() {
        let job = job();
        let run = LocalRun::plan(&job, Path::new("runs")).unwrap();
        let env = run.worker_env(&job, 1, "127.0.0.1:5000");
        let get = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        assert_eq!(get(env::WORLD_SIZE), Some("2"));
        assert_eq!(get(env::NODES), Some("2"));
        assert_eq!(get(env::NODE_RANK), Some("1"));
        assert_eq!(get(env::PROCS_PER_NODE), Some("1"));
        assert_eq!(get(env::COORDINATOR), Some("127.0.0.1:5000"));
        assert_eq!(get(env::ATTEMPT), Some("0"));
        assert_eq!(get(env::CONFIG), Some("runs/tiny/config.json"));
        assert_eq!(get(env::JOB), Some("local/tiny"));
        assert_eq!(get("EXTRA"), Some("1"));
        assert_eq!(get("TOKEN"), None);
        assert_eq!(unresolvable_env(&job), vec!["TOKEN"]);
    }

    /// One node of two processes: one worker, which launches the two ranks
    /// itself because it gets the gang's size and no local rank.
    #[test]
    fn a_node_of_several_processes_runs_one_launcher() {
        let mut job = job();
        job.spec.parallelism.nodes = 1;
        job.spec.parallelism.processes_per_node = 2;
        let run = LocalRun::plan(&job, Path::new("runs")).unwrap();
        let env = run.worker_env(&job, 0, "127.0.0.1:5000");
        let get = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        assert_eq!(get(env::WORLD_SIZE), Some("2"));
        assert_eq!(get(env::PROCS_PER_NODE), Some("2"));
        assert_eq!(get(env::NODE_RANK), Some("0"));
        assert_eq!(get(env::COORDINATOR), Some("127.0.0.1:5000"));
        assert_eq!(get(env::LOCAL_RANK), None, "the worker's launcher sets it");
    }
}
