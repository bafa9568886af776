//! `moe-worker`: the process each training or serving pod runs.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use clap::{Parser, Subcommand};
use moe_crds::contract::{CONFIG_PATH, env};

/// `--version` output: the crate version and the compiled-in backends.
const VERSION: &str = if moe_kernels::CUDA_ENABLED {
    concat!(env!("CARGO_PKG_VERSION"), " (backends: cpu, cuda)")
} else {
    concat!(env!("CARGO_PKG_VERSION"), " (backends: cpu)")
};

#[derive(Parser)]
#[command(name = "moe-worker", version = VERSION, about = "Trains and serves Mixture-of-Experts transformers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train as the worker config says; prints a one-line JSON summary on stdout.
    Train {
        /// The worker config (JSON). Default: $MOE_CONFIG, else /etc/moe/config.json.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Threads sharing each large CPU GEMM (default 1). The results are
        /// the same to the bit with any count; each local rank of a
        /// multi-process run gets this many.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
        threads: Option<u16>,
    },
    /// Serve a model over an OpenAI-compatible HTTP API (docs/serving.md).
    Serve(Box<ServeArgs>),
    /// Download a Hugging Face Hub model into <into>/<repo>/<revision>, as
    /// a serving pod's init container does (docs/inference-services.md):
    /// one commit, only what serving reads, every file checked against the
    /// Hub's hash, resumed after an interruption. The token, for gated and
    /// private models, comes from $HF_TOKEN.
    Fetch(FetchArgs),
    /// Write a trained model as a Hugging Face model directory (config.json,
    /// safetensors, the run's tokenizer.json) for transformers, vLLM or
    /// SGLang: Mixtral, Qwen3-MoE (q/k norms per head) or OLMoE (whole);
    /// prints a one-line JSON summary on stdout (docs/training-jobs.md).
    Export(ExportArgs),
    /// Hold a pod's place: wait until stopped (SIGTERM, SIGINT), then exit
    /// 0. The spare pods of an elastic training job run it while they ask
    /// the scheduler for room (docs/training-jobs.md).
    Hold,
}

#[derive(clap::Args)]
struct FetchArgs {
    /// `organization/name` on the Hub.
    #[arg(long)]
    repo: String,
    /// A branch, tag or commit.
    #[arg(long, default_value = "main")]
    revision: String,
    /// The directory models are kept under.
    #[arg(long)]
    into: PathBuf,
    /// The Hub (default: $HF_ENDPOINT, else https://huggingface.co).
    #[arg(long)]
    endpoint: Option<String>,
    /// Files downloaded at once.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Also point this symlink at the fetched commit's directory: what the
    /// server of the same pod reads, so it loads this commit whatever the
    /// revision names later.
    #[arg(long)]
    link: Option<PathBuf>,
    /// A model (what serving reads), a dataset (the files --include names)
    /// or a PEFT LoRA adapter (adapter_config.json, adapter_model.safetensors).
    #[arg(long, value_enum, default_value = "model")]
    repo_type: RepoType,
    /// A dataset's file or directory to take (repeatable; a directory's
    /// files at any depth).
    #[arg(long)]
    include: Vec<String>,
}

#[derive(clap::Args)]
struct ExportArgs {
    /// A checkpoint, a checkpoint directory or a run directory (e.g. runs/tiny).
    #[arg(long)]
    model: PathBuf,
    /// Checkpoint step to export (default: the newest).
    #[arg(long)]
    checkpoint_step: Option<u64>,
    /// The new directory to write (refused if it exists).
    #[arg(long)]
    out: PathBuf,
    /// The weights' number type.
    #[arg(long, value_enum, default_value = "bf16")]
    precision: ExportPrecisionArg,
    /// The most tensor data per safetensors file, in MB.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    shard_size_mb: u64,
    /// A LoRA run's adapters alone, in PEFT's layout with the tokenizer,
    /// not the merged model (`output.huggingface.adapterOnly`).
    #[arg(long)]
    adapter_only: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ExportPrecisionArg {
    Bf16,
    F32,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RepoType {
    Model,
    Dataset,
    Adapter,
}

impl From<RepoType> for moe_worker::fetch::RepoKind {
    fn from(t: RepoType) -> Self {
        match t {
            RepoType::Model => Self::Model,
            RepoType::Dataset => Self::Dataset,
            RepoType::Adapter => Self::Adapter,
        }
    }
}

/// `serve`'s flags; each overrides the same setting of `--config`.
#[derive(clap::Args)]
struct ServeArgs {
    /// The server config (JSON `ServingConfig`) the operator renders. Default
    /// when --model is not given: $MOE_CONFIG, else /etc/moe/config.json.
    #[arg(long)]
    config: Option<PathBuf>,
    /// A checkpoint, a checkpoint directory or a run directory (e.g.
    /// runs/tiny); or a Hugging Face Hub model, `hf://org/name[@revision]`,
    /// downloaded first into $MOE_HF_CACHE (default
    /// ~/.cache/moe-worker/huggingface) as `moe-worker fetch` does.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The model's format; detected when not given.
    #[arg(long, value_parser = ["native", "huggingface"])]
    format: Option<String>,
    /// Checkpoint step to load (default: the newest).
    #[arg(long)]
    checkpoint_step: Option<u64>,
    /// The model id clients name (default: the run's directory name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Address to listen on (default 0.0.0.0).
    #[arg(long)]
    host: Option<std::net::IpAddr>,
    /// Port of the HTTP API (default 8000).
    #[arg(long)]
    port: Option<u16>,
    /// Tokens batched into one forward pass, over all running requests (default 8192).
    #[arg(long)]
    max_batch_tokens: Option<usize>,
    /// Requests run at once; more wait in the queue (default 64).
    #[arg(long)]
    max_concurrent_requests: Option<usize>,
    /// Requests that may wait; more get 429 (default 4 × max concurrent requests).
    #[arg(long)]
    max_queued_requests: Option<usize>,
    /// KV cache budget in MiB (default 1024).
    #[arg(long)]
    kv_cache_mib: Option<usize>,
    /// Threads computing each forward pass (default 1).
    #[arg(long)]
    threads: Option<usize>,
    /// How the linear layers' weights are stored: fp32, bf16 (half the
    /// bytes) or fp8 (E4M3 with a power-of-two scale per output: a quarter);
    /// activations stay fp32. Default: the config's, else fp32.
    #[arg(long, value_parser = ["fp32", "bf16", "fp8"])]
    precision: Option<String>,
    /// Split each MoE layer's experts over this many processes of one
    /// replica (default: the config's parallelism.expertParallel, else 1).
    /// Without the gang's environment (MOE_WORLD_SIZE, …) they are started
    /// here, on this machine.
    #[arg(long)]
    expert_parallel: Option<usize>,
    /// Expert copies per MoE layer over the replica, a multiple of
    /// --expert-parallel: each rank gets that share of slots for copies of
    /// the busiest experts, chosen again from the routed load every
    /// --rebalance-interval-seconds (default: the config's
    /// parallelism.expertLoadBalancing, else none).
    #[arg(long)]
    redundant_experts: Option<usize>,
    /// Seconds between choices of the expert copies (default 600).
    #[arg(long)]
    rebalance_interval_seconds: Option<u64>,
    /// Compute every prompt whole, never reusing the KV pages of a prefix
    /// served before (prefix caching is on by default; the config's
    /// serving.prefixCaching can turn it off too).
    #[arg(long)]
    no_prefix_caching: bool,
    /// A LoRA adapter to serve beside the model, NAME=DIR (a PEFT adapter
    /// directory, as `moe-worker export` writes under adapter/), or
    /// NAME=hf://org/name[@revision] (downloaded first, as --model's);
    /// requests naming NAME as their model run with it. Repeatable.
    #[arg(long = "lora", value_name = "NAME=DIR")]
    lora: Vec<String>,
    /// Where the model computes: cpu, or cuda (the GPU engine, in a worker
    /// built with the `cuda` feature; one process only). Default: the
    /// config's device, else cpu.
    #[arg(long, value_parser = ["cpu", "cuda"])]
    device: Option<String>,
}

fn main() -> ExitCode {
    moe_worker::memory::keep_freed_memory();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    match cli.command {
        Command::Train { config, threads } => match threads.map(usize::from) {
            Some(threads) if threads > 1 => {
                // Training runs on the pool's first thread; the GEMMs split
                // across the pool (ops::packed_gemm).
                match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
                    Ok(pool) => pool.install(|| train(config)),
                    Err(e) => fail(&format!("--threads {threads}: {e}"), 1),
                }
            }
            _ => train(config),
        },
        Command::Serve(args) => serve(*args),
        Command::Fetch(args) => fetch(args),
        Command::Export(args) => export(args),
        Command::Hold => hold(),
    }
}

fn export(args: ExportArgs) -> ExitCode {
    use moe_worker::checkpoint::CheckpointWeights;
    use moe_worker::model::hf_export::{self, ExportPrecision};
    use moe_worker::serve::load::{self, Detected};
    let path = match load::detect(
        &args.model,
        Some(moe_crds::ModelFormat::Native),
        args.checkpoint_step,
    ) {
        Ok(Detected::Native(path)) => path,
        Ok(Detected::HuggingFace(_)) => return fail("--model: not a worker checkpoint", 2),
        Err(e) => return fail(&format!("--model: {e}"), 2),
    };
    // Read one tensor at a time out of the mapped files: the export holds
    // a shard's bytes and a tensor, not the model.
    let weights = match CheckpointWeights::open(&path) {
        Ok(weights) => weights,
        Err(e) => return fail(&format!("--model: {e}"), 2),
    };
    // The checkpoint's tokenizer.json, else the byte tokenizer written as
    // one (a checkpoint of pre-tokenized ids without theirs is refused).
    if let Err(e) = load::native_tokenizer(&path, weights.manifest()) {
        return fail(&format!("--model: {e}"), 2);
    }
    let file = path.join(moe_worker::checkpoint::TOKENIZER);
    let tokenizer = if file.is_file() {
        hf_export::ExportTokenizer::File(&file)
    } else {
        hf_export::ExportTokenizer::Bytes
    };
    let precision = match args.precision {
        ExportPrecisionArg::Bf16 => ExportPrecision::Bf16,
        ExportPrecisionArg::F32 => ExportPrecision::F32,
    };
    let shard_bytes = args.shard_size_mb.saturating_mul(1_000_000);
    let contents = match args.adapter_only {
        true => hf_export::ExportContents::AdapterOnly,
        false => hf_export::ExportContents::Model,
    };
    match hf_export::export_with(
        &weights,
        tokenizer,
        &args.out,
        precision,
        shard_bytes,
        contents,
    ) {
        Ok(exported) => {
            let summary = serde_json::json!({
                "architecture": exported.architecture.class_name(),
                "checkpoint": path,
                "step": weights.manifest().step,
                "out": args.out,
                "files": exported.files,
                "tensorBytes": exported.tensor_bytes,
            });
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e @ hf_export::ExportError::Unexportable { .. }) => fail(&e.to_string(), 2),
        Err(e) => fail(&e.to_string(), 1),
    }
}

fn hold() -> ExitCode {
    let stop = Arc::new(AtomicBool::new(false));
    if let Err(e) = set_on_stop_signals(&stop) {
        return fail(&e, 1);
    }
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    ExitCode::SUCCESS
}

fn fetch(args: FetchArgs) -> ExitCode {
    use moe_worker::fetch;
    let request = fetch::FetchRequest {
        repo: args.repo,
        revision: args.revision,
        into: args.into,
        endpoint: args.endpoint.unwrap_or_else(fetch::endpoint_from_env),
        parallel: args.parallel,
        kind: args.repo_type.into(),
        include: args.include,
    };
    let token = std::env::var("HF_TOKEN").ok();
    let fetched = fetch::fetch(&request, token.as_deref()).and_then(|fetched| {
        if let Some(link) = &args.link {
            fetch::pin(&fetched, link)?;
        }
        Ok(fetched)
    });
    match fetched {
        Ok(fetched) => {
            // The operator reads the commit from the termination message.
            let report = serde_json::to_string(&moe_crds::contract::FetchReport {
                repo: request.repo,
                commit: fetched.commit,
                files: fetched.files,
                bytes: fetched.bytes,
                downloaded: fetched.downloaded,
            })
            .unwrap_or_default();
            println!("{report}");
            termination_message(&report);
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e.to_string(), e.exit_code()),
    }
}

fn serve(mut args: ServeArgs) -> ExitCode {
    use moe_worker::serve::{self, options};
    let hub = args
        .model
        .as_deref()
        .and_then(|m| m.to_str())
        .and_then(moe_worker::fetch::parse_uri);
    use moe_worker::fetch;
    // `hf://org/name[@revision]`: downloaded into the cache first.
    let from_hub = |repo: &str, revision: String, kind: fetch::RepoKind| {
        let request = fetch::FetchRequest {
            repo: repo.to_owned(),
            revision,
            into: fetch::cache_dir(),
            endpoint: fetch::endpoint_from_env(),
            parallel: 4,
            kind,
            include: Vec::new(),
        };
        fetch::fetch(&request, std::env::var("HF_TOKEN").ok().as_deref())
    };
    if let Some((repo, revision)) = hub {
        match from_hub(&repo, revision, fetch::RepoKind::Model) {
            Ok(fetched) => {
                args.model = Some(fetched.dir);
                args.format.get_or_insert_with(|| "huggingface".into());
                args.served_model_name.get_or_insert(repo);
            }
            Err(e) => return fail(&e.to_string(), e.exit_code()),
        }
    }
    for lora in &mut args.lora {
        // A malformed one is refused, named, with the other options.
        let Ok(source) = serve::adapters::AdapterSource::parse(lora) else {
            continue;
        };
        if let Some((repo, revision)) = source.dir.to_str().and_then(fetch::parse_uri) {
            match from_hub(&repo, revision, fetch::RepoKind::Adapter) {
                Ok(fetched) => *lora = format!("{}={}", source.name, fetched.dir.display()),
                Err(e) => return fail(&e.to_string(), e.exit_code()),
            }
        }
    }
    // The operator's pods pass --config; a hand-started server passes --model.
    let config_path = args.config.or_else(|| {
        args.model.is_none().then(|| {
            std::env::var_os(env::CONFIG)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(CONFIG_PATH))
        })
    });
    let config: Option<moe_crds::ServingConfig> = match &config_path {
        None => None,
        Some(path) => {
            let parsed = std::fs::read(path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()));
            match parsed {
                Ok(config) => Some(config),
                Err(e) => return fail(&format!("{}: {e}", path.display()), 2),
            }
        }
    };
    let flags = options::Flags {
        model: args.model,
        format: args.format.map(|f| match f.as_str() {
            "huggingface" => moe_crds::ModelFormat::Huggingface,
            _ => moe_crds::ModelFormat::Native,
        }),
        checkpoint_step: args.checkpoint_step,
        served_model_name: args.served_model_name,
        host: args.host,
        port: args.port,
        max_batch_tokens: args.max_batch_tokens,
        max_concurrent_requests: args.max_concurrent_requests,
        max_queued_requests: args.max_queued_requests,
        kv_cache_mib: args.kv_cache_mib,
        threads: args.threads,
        precision: args.precision.map(|p| match p.as_str() {
            "bf16" => moe_crds::ServingPrecision::Bf16,
            "fp8" => moe_crds::ServingPrecision::Fp8,
            _ => moe_crds::ServingPrecision::Fp32,
        }),
        expert_parallel: args.expert_parallel,
        redundant_experts: args.redundant_experts,
        rebalance_interval_seconds: args.rebalance_interval_seconds,
        metrics_addr: std::env::var(env::STATUS_ADDR).ok(),
        no_prefix_caching: args.no_prefix_caching,
        lora: args.lora,
        device: args.device.map(|d| match d.as_str() {
            "cuda" => moe_crds::Device::Cuda,
            _ => moe_crds::Device::Cpu,
        }),
    };
    let (options, warnings) = match options::resolve(config.as_ref(), flags) {
        Ok(resolved) => resolved,
        Err(e) => return fail(&e.to_string(), e.exit_code()),
    };
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    let (gang, timeouts) = match serve_gang(options.expert_parallel)
        .and_then(|g| Ok((g, moe_worker::dist::env::Timeouts::from_env()?)))
    {
        Ok(read) => read,
        Err(e) => return fail(&format!("environment: {e}"), 2),
    };
    if gang.world_size != options.expert_parallel {
        return fail(
            &format!(
                "{}={} but expertParallel is {}: every rank of a replica holds a share of the experts",
                env::WORLD_SIZE,
                gang.world_size,
                options.expert_parallel
            ),
            2,
        );
    }
    if gang.world_size == 1 {
        return match serve::run(&options, None) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e.to_string(), e.exit_code()),
        };
    }
    // Checked before any rank starts: a launcher refuses a bad model once.
    let checked = serve::load::summary(&options.model_dir, options.format, options.checkpoint_step)
        .map_err(serve::ServeError::Load)
        .and_then(|m| serve::replica::experts_of(0, gang.world_size, m.experts));
    if let Err(e) = checked {
        return fail(&e.to_string(), e.exit_code());
    }
    // A launcher forwards SIGTERM to its ranks; a follower waits for its
    // leader's stop instead of dying under requests in flight (the leader
    // handles the signal itself).
    let stop = Arc::new(AtomicBool::new(false));
    if (gang.launcher || gang.rank > 0)
        && let Err(e) = set_on_stop_signals(&stop)
    {
        return fail(&e, 1);
    }
    if gang.launcher {
        return launch_ranks(&gang, &timeouts, &stop);
    }
    let hash = serving_hash(&options);
    let connect_gang = gang.clone();
    let device = options.device;
    let replica = serve::replica::ReplicaSetup {
        rank: gang.rank,
        size: gang.world_size,
        local_rank: gang.local_rank,
        timeouts,
        // GPU replicas talk over NCCL, their MoE rows device to device
        // (`cuda::serve_ep::DeviceExchange`), CPU ones over TCP (as training;
        // `MOE_COLLECTIVE_BACKEND=tcp` for ranks sharing a GPU, whose rows
        // then go through host memory).
        connect: Box::new(move || connect(&connect_gang, hash, device, &timeouts)),
    };
    match serve::run(&options, Some(replica)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("rank {}: {e}", gang.rank), e.exit_code()),
    }
}

/// Where this server stands in its replica: the gang environment the
/// operator sets (and the launcher, for each local rank), or, started by
/// hand with `--expert-parallel N` and no such environment, a replica of N
/// processes on this machine. A one-node replica without
/// `MOE_COORDINATOR` rendezvouses on a free loopback port.
fn serve_gang(
    expert_parallel: usize,
) -> Result<moe_worker::dist::DistEnv, moe_worker::dist::env::EnvError> {
    use moe_worker::dist::env::EnvError;
    let var = |name: &str| std::env::var(name).ok();
    let by_hand = var(env::WORLD_SIZE).is_none() && expert_parallel > 1;
    let implied = |name: &str| -> Option<String> {
        var(name).or_else(|| {
            (by_hand && (name == env::WORLD_SIZE || name == env::PROCS_PER_NODE))
                .then(|| expert_parallel.to_string())
        })
    };
    let number = |name: &str| implied(name).and_then(|v| v.trim().parse::<usize>().ok());
    let one_node = number(env::WORLD_SIZE).unwrap_or(1) == number(env::PROCS_PER_NODE).unwrap_or(1);
    let coordinator = match var(env::COORDINATOR) {
        Some(c) => Some(c),
        None if one_node && var(moe_worker::dist::env::LOCAL_RANK).is_none() => {
            let port =
                moe_worker::dist::launch::free_local_port().map_err(|e| EnvError(e.to_string()))?;
            Some(format!("127.0.0.1:{port}"))
        }
        None => None,
    };
    moe_worker::dist::DistEnv::from_lookup(|name| {
        if name == env::COORDINATOR {
            coordinator.clone()
        } else {
            implied(name)
        }
    })
}

/// What every rank of a replica must be started with alike (compared at
/// rendezvous; ports and threads may differ).
fn serving_hash(options: &moe_worker::serve::ServeOptions) -> u64 {
    let canonical = format!(
        "{:?}|{:?}|{:?}|{}|{}|{}|{}",
        options.model_dir,
        options.format,
        options.checkpoint_step,
        options.kv_cache_bytes,
        options.page_size,
        options.expert_parallel,
        options.redundant_experts
    );
    moe_worker::dist::schedule::fnv1a(canonical.as_bytes())
}

fn train(config: Option<PathBuf>) -> ExitCode {
    use moe_worker::dist::{DistEnv, env::Timeouts};
    let path = config
        .or_else(|| std::env::var_os(env::CONFIG).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(CONFIG_PATH));
    let config = match moe_worker::settings::read_worker_config(&path) {
        Ok(config) => config,
        Err(e) => return fail(&format!("{}: {e}", path.display()), 2),
    };
    let (gang, timeouts) = match DistEnv::from_env().and_then(|g| Ok((g, Timeouts::from_env()?))) {
        Ok(read) => read,
        Err(e) => return fail(&format!("environment: {e}"), 2),
    };
    let config = moe_worker::run::sized_for_gang(config, &gang);
    // Checked before any rank starts: a launcher refuses a bad config once.
    if let Err(e) = moe_worker::run::gang_settings(&config, &gang) {
        return fail(&e.to_string(), e.exit_code());
    }
    // SIGTERM (pod deletion, preemption) and SIGINT set the flag; training
    // checkpoints at the next step boundary and exits 0 (a launcher
    // forwards it to its ranks).
    let stop = Arc::new(AtomicBool::new(false));
    if let Err(e) = set_on_stop_signals(&stop) {
        return fail(&e, 1);
    }
    if gang.launcher {
        return launch_ranks(&gang, &timeouts, &stop);
    }
    let hash = moe_worker::dist::config_hash(&config);
    let mut group = match connect(&gang, hash, config.device, &timeouts)
        .map_err(moe_worker::run::RunError::from)
    {
        Ok(group) => group,
        Err(e) => return fail(&e.to_string(), e.exit_code()),
    };
    let board = (gang.rank == 0).then(status_board).flatten();
    match moe_worker::run::train_as(&config, &stop, board.as_ref(), group.as_mut(), timeouts) {
        Ok(summary) => {
            let line = serde_json::to_string(&summary).expect("the summary always serialises");
            // One summary per run, as from a single process: rank 0's.
            if gang.rank == 0 {
                println!("{line}");
                // The operator reads the final step, checkpoint and losses
                // from here once the job succeeded: a poll of `/progress`
                // may not have come after the last steps.
                let report =
                    serde_json::to_string(&summary.report).expect("the report always serialises");
                termination_message(&report);
            } else {
                tracing::info!(rank = gang.rank, summary = %line, "rank done");
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("rank {}: {e}", gang.rank), e.exit_code()),
    }
}

/// This rank's world: over NCCL for GPU ranks and TCP for CPU ranks when
/// it has more than one rank (`dist::backend::choose_with`, which honours
/// `MOE_COLLECTIVE_BACKEND`); `config_hash` is compared at rendezvous.
/// Data-parallel training and expert-parallel serving on GPUs take the
/// NCCL arm.
fn connect(
    gang: &moe_worker::dist::DistEnv,
    config_hash: u64,
    device: moe_crds::Device,
    timeouts: &moe_worker::dist::env::Timeouts,
) -> Result<Box<dyn moe_worker::dist::Collective>, moe_worker::dist::DistError> {
    use moe_worker::dist::backend::{BACKEND, Backend, choose_with};
    use moe_worker::dist::{Solo, TcpCollective, TcpSetup};
    let requested = std::env::var(BACKEND).ok();
    let backend = choose_with(gang.world_size, device, requested.as_deref())
        .map_err(|detail| moe_worker::dist::DistError::invalid("connect", detail))?;
    if backend == Backend::Solo {
        return Ok(Box::new(Solo));
    }
    tracing::info!(
        rank = gang.rank,
        world_size = gang.world_size,
        coordinator = %gang.coordinator,
        backend = ?backend,
        "joining the gang"
    );
    #[cfg(feature = "cuda")]
    if backend == Backend::Nccl {
        let setup = moe_worker::dist::nccl::NcclSetup::from_env(
            gang,
            config_hash,
            timeouts.rendezvous,
            timeouts.collective,
        );
        return Ok(Box::new(moe_worker::dist::nccl::NcclCollective::connect(
            setup,
        )?));
    }
    let setup = TcpSetup::from_env(gang, config_hash, timeouts.rendezvous, timeouts.collective);
    Ok(Box::new(TcpCollective::connect(setup)?))
}

/// Runs this node's ranks (this same command, once per local rank) and
/// exits as the rank blamed for a failure did.
fn launch_ranks(
    gang: &moe_worker::dist::DistEnv,
    timeouts: &moe_worker::dist::env::Timeouts,
    stop: &AtomicBool,
) -> ExitCode {
    use moe_worker::dist::launch::{LocalLaunch, launch};
    let program = match std::env::current_exe() {
        Ok(program) => program,
        Err(e) => return fail(&format!("cannot find this executable: {e}"), 1),
    };
    // The ranks fail by themselves within the collective timeout once one
    // dies; a few seconds more before they are killed.
    let grace = timeouts.collective + std::time::Duration::from_secs(5);
    let args = std::env::args_os().skip(1).collect();
    let plan = LocalLaunch::from_env(gang, program, args, grace);
    tracing::info!(
        ranks = gang.procs_per_node,
        first_rank = gang.node_rank * gang.procs_per_node,
        world_size = gang.world_size,
        "launching local ranks"
    );
    match launch(&plan, stop) {
        Ok(report) => {
            if report.first_failure.is_some() {
                tracing::error!("{}", report.summary());
                eprintln!("moe-worker: {}", report.summary());
            } else {
                tracing::info!("{}", report.summary());
            }
            ExitCode::from(u8::try_from(report.exit_code()).unwrap_or(1))
        }
        Err(e) => fail(&e.to_string(), 1),
    }
}

/// Rank 0 serves `/progress` and `/metrics` (default `0.0.0.0:9400`, or
/// `MOE_STATUS_ADDR`; `off` disables it). A port already taken (e.g. two local
/// runs at once) only costs the endpoint, never the training run.
fn status_board() -> Option<moe_worker::status::Board> {
    let addr = std::env::var(env::STATUS_ADDR)
        .unwrap_or_else(|_| format!("0.0.0.0:{}", moe_crds::contract::METRICS_PORT));
    if addr == "off" {
        return None;
    }
    let board = moe_worker::status::Board::default();
    match board.serve(&addr) {
        Ok(bound) => tracing::info!(%bound, "serving /progress and /metrics"),
        Err(e) => tracing::warn!(%addr, error = %e, "status endpoint not available"),
    }
    Some(board)
}

fn fail(message: &str, code: u8) -> ExitCode {
    tracing::error!("{message}");
    eprintln!("moe-worker: {message}");
    // A rank that failed because another did leaves the message to that one.
    if i32::from(code) != moe_worker::dist::launch::PEER_FAILED_EXIT_CODE {
        termination_message(message);
    }
    ExitCode::from(code)
}

/// Writes `message` where Kubernetes reads the container's termination
/// message (only if that file is there: kubelet creates it; a local run
/// has none), within the 4096 bytes Kubernetes keeps.
fn termination_message(message: &str) {
    let path = std::env::var(env::TERMINATION_LOG)
        .unwrap_or_else(|_| moe_crds::contract::TERMINATION_LOG.to_string());
    let path = std::path::Path::new(&path);
    if path.exists() {
        let mut end = message.len().min(4096);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        if let Err(e) = std::fs::write(path, &message[..end]) {
            tracing::debug!(error = %e, "termination message not written");
        }
    }
}

/// Makes SIGTERM (pod deletion, preemption) and SIGINT set `stop`.
fn set_on_stop_signals(stop: &Arc<AtomicBool>) -> Result<(), String> {
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(stop))
            .map_err(|e| format!("cannot install the handler for signal {signal}: {e}"))?;
    }
    Ok(())
}
