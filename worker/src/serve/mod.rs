//! `moe-worker serve`: an OpenAI-compatible HTTP server over the worker's
//! own model, with continuous batching and a paged KV cache.
//!
//! ```text
//!  HTTP handlers (tokio, axum)            scheduler thread (one, runs the model)
//!  ─────────────────────────             ─────────────────────────────────────
//!  api: parse + check a request
//!  runner::EngineHandle::submit ──────▶  Scheduler::plan  (pure: who runs, which
//!    (429 when the queue is full)          tokens, which KV pages)
//!                                        Engine::step     (the model, KvStore)
//!  SSE / JSON  ◀── Event::Text/Done ───  Sampler + TextAssembler (stop strings)
//! ```
//!
//! - [`load`]: finds and loads a checkpoint or a Hugging Face model (format
//!   detected; [`hf`] reads the latter); [`model`]: the model as served;
//! - [`engine`]: the forward pass with a paged KV cache ([`kv_cache`]) over
//!   the weights packed for the GEMM kernel (`layers`); with `device: cuda`
//!   and the `cuda` feature, the GPU's engine instead (`crate::cuda::serve`,
//!   placed by `gpu`; [`device`]: its host-side logic), both behind [`backend`];
//! - [`scheduler`], [`sampler`], [`text`], [`logprobs`]: the pure decisions;
//! - [`runner`]: the scheduler thread tying them together;
//! - [`api`], [`http`], [`metrics`]: the HTTP side; [`options`]: flags and the operator's config;
//! - [`replica`], [`lockstep`]: one replica as several processes, each
//!   holding a slice of the experts (expert parallelism), rank 0 leading.

pub mod adapters;
pub mod api;
pub mod backend;
pub mod device;
pub mod engine;
pub mod exchange_order;
mod expert_parallel;
#[cfg(feature = "cuda")]
mod gpu;
pub mod hf;
pub mod http;
pub mod kv_cache;
mod latent;
mod layers;
pub mod load;
pub mod lockstep;
pub mod logprobs;
pub mod metrics;
pub mod model;
pub mod options;
pub mod prefix_cache;
pub mod rebalance;
pub mod replica;
pub mod runner;
pub mod sampler;
pub mod scheduler;
pub mod text;
pub mod yarn;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use moe_crds::{Device, ModelFormat, ModelSpec};

use crate::dist::env::Timeouts;
use crate::dist::{Collective, DistError};
use crate::ops::packed_linear::WeightPrecision;
use crate::serve::adapters::AdapterSource;
use crate::serve::backend::Backend;
use crate::serve::engine::Engine;
use crate::serve::http::AppState;
use crate::serve::kv_cache::KvShape;
use crate::serve::load::{LoadError, LoadedModel};
use crate::serve::lockstep::Lockstep;
use crate::serve::metrics::Metrics;
use crate::serve::replica::{JoinedBackend, ReplicaSetup};
use crate::serve::runner::{EngineHandle, Failure, RunnerSettings};
use crate::serve::scheduler::Limits;

/// Positions per KV page: small enough that a short request wastes little,
/// large enough that page-table lookups stay rare next to the arithmetic.
pub const DEFAULT_PAGE_SIZE: usize = 16;
/// KV cache budget when none is given.
pub const DEFAULT_KV_CACHE_BYTES: usize = 1 << 30;

/// Everything `moe-worker serve` needs, from flags or the operator's `ServingConfig`.
#[derive(Clone, Debug, PartialEq)]
pub struct ServeOptions {
    pub model_dir: PathBuf,
    /// `None`: detected.
    pub format: Option<ModelFormat>,
    /// `None`: the newest checkpoint.
    pub checkpoint_step: Option<u64>,
    /// The id clients name; `None`: from the model directory.
    pub model_name: Option<String>,
    pub listen: SocketAddr,
    /// Where `/metrics` is served too (the operator's metrics port); `None`: only on `listen`.
    pub metrics_listen: Option<SocketAddr>,
    pub max_batch_tokens: usize,
    pub max_concurrent_requests: usize,
    /// Requests waiting beyond the running ones before 429s.
    pub max_queued_requests: usize,
    pub kv_cache_bytes: usize,
    pub page_size: usize,
    /// Threads computing each step (1: the scheduler thread alone).
    pub threads: usize,
    /// How the linear layers' weights are stored.
    pub weights: WeightPrecision,
    /// The model the configuration expects (`spec.model`, or the training
    /// job's): a worker checkpoint of another shape is refused.
    pub expected_model: Option<ModelSpec>,
    /// Ranks (processes) of one replica, each holding `1/expert_parallel`
    /// of every MoE layer's routed experts (1: one process holds all).
    pub expert_parallel: usize,
    /// Slots per MoE layer over the replica for copies of the busiest
    /// experts (`moe/placement.rs`; 0: none), a multiple of `expert_parallel`.
    pub redundant_experts: usize,
    /// How often the copies are chosen again from the load since the last
    /// choice.
    pub rebalance_interval: std::time::Duration,
    /// Whether prompts reuse the KV pages of a prefix computed before
    /// (`serve/prefix_cache.rs`).
    pub prefix_caching: bool,
    /// Where steps run: `Cuda` uses the GPU engine when the worker is built
    /// with the `cuda` feature and the model allows it, for one process and
    /// for each rank of an expert-parallel replica alike.
    pub device: Device,
    /// LoRA adapters served beside the model (`serve/adapters.rs`), in the
    /// order the engine indexes them.
    pub adapters: Vec<AdapterSource>,
}

/// Why the server could not start.
#[derive(Debug)]
pub enum ServeError {
    Options(String),
    Load(LoadError),
    Io {
        what: String,
        error: std::io::Error,
    },
    /// Joining the replica's other ranks failed (rendezvous, a collective).
    Dist(DistError),
    /// The running replica broke (a rank died, an exchange failed).
    Replica(Failure),
    /// `device: cuda` and the GPU cannot be used (no driver, no cuBLASLt,
    /// out of memory): named, as training names it.
    Device(String),
}

impl fmt::Display for ServeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Options(message) => write!(f, "{message}"),
            Self::Load(e) => write!(f, "cannot load the model: {e}"),
            Self::Io { what, error } => write!(f, "{what}: {error}"),
            Self::Dist(e) => write!(f, "expert-parallel replica: {e}"),
            Self::Replica(failure) => failure.fmt(f),
            Self::Device(e) => write!(f, "GPU: {e}"),
        }
    }
}

impl std::error::Error for ServeError {}

impl ServeError {
    /// 2 for a bad invocation or model, 1 for the environment, 3 when
    /// another rank's failure caused this one (as `train`, so the launcher
    /// blames the rank that failed first).
    pub fn exit_code(&self) -> u8 {
        const PEER_FAILED: u8 = crate::dist::launch::PEER_FAILED_EXIT_CODE as u8;
        match self {
            Self::Options(_) | Self::Load(_) => 2,
            Self::Dist(e) if e.is_peer_failure() => PEER_FAILED,
            Self::Replica(failure) if failure.peer => PEER_FAILED,
            Self::Io { .. } | Self::Dist(_) | Self::Replica(_) | Self::Device(_) => 1,
        }
    }
}

impl ServeOptions {
    fn check(&self) -> Result<(), ServeError> {
        let positive = [
            ("max batch tokens", self.max_batch_tokens),
            ("max concurrent requests", self.max_concurrent_requests),
            ("KV page size", self.page_size),
            ("threads", self.threads),
            ("expert parallel", self.expert_parallel),
        ];
        for (what, value) in positive {
            if value == 0 {
                return Err(ServeError::Options(format!("{what} must be at least 1")));
            }
        }
        if let Some(first) = self.adapters.first()
            && self.device == Device::Cuda
        {
            return Err(ServeError::Options(format!(
                "adapter {:?}: LoRA adapters are not served on device cuda yet (the GPU \
                 engine computes no adapter updates); serve the merged model (moe-worker \
                 export writes it beside the adapter), or serve adapters on the CPU",
                first.name
            )));
        }
        if self.redundant_experts > 0 {
            let refusal = if self.expert_parallel < 2 {
                Some(
                    "needs an expert-parallel replica (expertParallel above 1): copies go to other ranks",
                )
            } else if !self.redundant_experts.is_multiple_of(self.expert_parallel) {
                Some(
                    "must be a multiple of expertParallel: every rank gets the same number of slots",
                )
            } else if self.device == moe_crds::Device::Cuda {
                Some("is not implemented on device cuda yet: the GPU engine holds no expert copies")
            } else if self.rebalance_interval.is_zero() {
                Some("needs an intervalSeconds of at least 1")
            } else {
                None
            };
            if let Some(refusal) = refusal {
                return Err(ServeError::Options(format!(
                    "parallelism.expertLoadBalancing.redundantExperts {} {refusal}",
                    self.redundant_experts
                )));
            }
        }
        Ok(())
    }

    /// The scheduler's limits. Running sequences are capped at the batch
    /// token budget, so every decoding sequence gets its token every step.
    fn limits(&self) -> Limits {
        Limits {
            max_batch_tokens: self.max_batch_tokens,
            max_running: self.max_concurrent_requests.min(self.max_batch_tokens),
            max_waiting: self.max_queued_requests,
            page_size: self.page_size,
            prefix_caching: self.prefix_caching,
        }
    }

    /// Where the weights come from, for `/v1/models`: a model `moe-worker
    /// fetch` brought, as `huggingface/<repo>@<commit>` (the commit its
    /// revision named then); else the model directory.
    pub fn model_root(&self) -> String {
        match crate::fetch::fetched(&self.model_dir) {
            Some((repo, commit)) => format!("huggingface/{repo}@{commit}"),
            None => self.model_dir.display().to_string(),
        }
    }

    /// What the HTTP handlers share, for these options.
    fn app_state(&self, metrics: Metrics) -> AppState {
        let adapters = self
            .adapters
            .iter()
            .map(|a| (a.name.clone(), a.dir.display().to_string()))
            .collect();
        AppState::new(&self.served_name(), &self.model_root(), metrics).with_adapters(adapters)
    }

    /// The id clients use: the flag, else the run's name (the directory
    /// above `checkpoints/` and `step-N/`).
    pub fn served_name(&self) -> String {
        self.model_name
            .clone()
            .unwrap_or_else(|| name_from_dir(&self.model_dir))
    }
}

fn name_from_dir(dir: &Path) -> String {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    dir.ancestors()
        .filter_map(|p| p.file_name()?.to_str())
        .find(|n| *n != "checkpoints" && !n.starts_with("step-"))
        .unwrap_or("model")
        .to_owned()
}

/// `options.adapters`, loaded for `engine`'s model and logged: one
/// process's, or every rank's of an expert-parallel replica.
fn load_adapters(
    options: &ServeOptions,
    engine: &Engine,
) -> Result<Vec<adapters::Adapter>, ServeError> {
    let adapters = adapters::load_all(
        &options.adapters,
        &options.served_name(),
        &engine.adapter_shape(),
    )
    .map_err(ServeError::Options)?;
    for adapter in &adapters {
        tracing::info!(
            adapter = %adapter.name,
            dir = %adapter.dir.display(),
            modules = ?adapter.modules(),
            kib = adapter.bytes() >> 10,
            "adapter loaded"
        );
    }
    Ok(adapters)
}

/// KV pages `options.kv_cache_bytes` affords for a cache of `shape`.
fn kv_pages(shape: KvShape, options: &ServeOptions) -> Result<usize, ServeError> {
    let kv_pages = shape.pages_within(options.kv_cache_bytes);
    if kv_pages == 0 {
        return Err(ServeError::Options(format!(
            "a KV cache of {} bytes holds no page; one page takes {} bytes",
            options.kv_cache_bytes,
            shape.page_bytes()
        )));
    }
    Ok(kv_pages)
}

/// Starts the scheduler thread for a loaded model: on the GPU with
/// `device: cuda` where the build and the model allow it (see `gpu`), else
/// on the CPU.
pub fn start_engine(
    loaded: LoadedModel,
    options: &ServeOptions,
    metrics: &Metrics,
) -> Result<EngineHandle, ServeError> {
    options.check()?;
    if let Some(expected) = &options.expected_model {
        loaded.check_spec(expected).map_err(ServeError::Load)?;
    }
    let LoadedModel {
        model,
        tokenizer,
        path,
        step,
        ..
    } = loaded;
    let model = model.into_serve_model();
    #[cfg(feature = "cuda")]
    let model = if options.device == Device::Cuda {
        match gpu::place(model, options)? {
            gpu::Placement::Gpu {
                backend,
                kv_pages,
                weight_bytes,
            } => {
                tracing::info!(
                    checkpoint = %path.display(),
                    step,
                    context = backend.context(),
                    kv_pages,
                    page_size = options.page_size,
                    weight_mib = weight_bytes >> 20,
                    "model loaded on the GPU"
                );
                return spawn_runner(backend, tokenizer, kv_pages, options, metrics, None);
            }
            gpu::Placement::Cpu(model) => *model,
        }
    } else {
        model
    };
    let engine = Engine::serve(model);
    let adapters = load_adapters(options, &engine)?;
    let engine = engine
        .with_adapters(adapters)
        .with_weights(options.weights)
        .with_threads(options.threads)
        .map_err(|error| ServeError::Io {
            what: "starting the compute threads".into(),
            error,
        })?;
    let kv_pages = kv_pages(engine.kv_shape(options.page_size), options)?;
    tracing::info!(
        checkpoint = %path.display(),
        step,
        context = engine.context(),
        kv_pages,
        page_size = options.page_size,
        weights = ?options.weights,
        weight_mib = engine.weight_bytes() >> 20,
        "model loaded"
    );
    let backend = Backend::cpu(engine, options.page_size, kv_pages);
    spawn_runner(backend, tokenizer, kv_pages, options, metrics, None)
}

fn spawn_runner(
    engine: Backend,
    tokenizer: text::Tokenizer,
    kv_pages: usize,
    options: &ServeOptions,
    metrics: &Metrics,
    lockstep: Option<Lockstep>,
) -> Result<EngineHandle, ServeError> {
    metrics.set_adapters(
        &options
            .adapters
            .iter()
            .map(|a| a.name.clone())
            .collect::<Vec<_>>(),
    );
    let settings = RunnerSettings {
        limits: options.limits(),
        kv_pages,
        rebalance_interval: (options.redundant_experts > 0).then_some(options.rebalance_interval),
    };
    runner::start(engine, tokenizer, settings, metrics.clone(), lockstep).map_err(|error| {
        ServeError::Io {
            what: "cannot start the scheduler thread".into(),
            error,
        }
    })
}

/// Rank 0 of an expert-parallel replica: joins the other ranks over
/// `world` (see [`replica::join`]; `loaded` holds this rank's experts) and
/// starts the scheduler thread that leads them.
pub fn start_leader(
    world: Box<dyn Collective>,
    loaded: LoadedModel,
    options: &ServeOptions,
    timeouts: &Timeouts,
    metrics: &Metrics,
) -> Result<EngineHandle, ServeError> {
    options.check()?;
    let JoinedBackend {
        backend,
        lockstep,
        tokenizer,
        kv_pages,
    } = replica::join_serving(world, loaded, options, timeouts)?;
    spawn_runner(
        backend,
        tokenizer,
        kv_pages,
        options,
        metrics,
        Some(lockstep),
    )
}

/// A rank other than 0 of an expert-parallel replica: joins the others over
/// `world` and runs the leader's steps until it stops them (`Ok`) or the
/// replica breaks.
pub fn follow(
    world: Box<dyn Collective>,
    loaded: LoadedModel,
    options: &ServeOptions,
    timeouts: &Timeouts,
    metrics: &Metrics,
) -> Result<(), ServeError> {
    options.check()?;
    replica::follow_backend(
        replica::join_serving(world, loaded, options, timeouts)?,
        metrics,
    )
}

/// Loads this rank's share of the experts (all of them for a replica of one).
fn load_share(options: &ServeOptions, rank: usize, size: usize) -> Result<LoadedModel, ServeError> {
    let summary = load::summary(&options.model_dir, options.format, options.checkpoint_step)
        .map_err(ServeError::Load)?;
    let experts = replica::experts_of(rank, size, summary.experts)?;
    tracing::info!(
        rank,
        ranks = size,
        model = %summary.path.display(),
        experts = ?experts,
        of = summary.experts,
        "loading this rank's experts"
    );
    // The path found, so every rank loads the same checkpoint even if a
    // newer one appears meanwhile.
    load::load_experts(&summary.path, options.format, None, Some(experts)).map_err(ServeError::Load)
}

/// A server running on its own runtime, for tests and embedding: the model
/// is already loaded, so it is ready at once. Dropping it stops the server.
pub struct Server {
    pub addr: SocketAddr,
    pub engine: EngineHandle,
    pub metrics: Metrics,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Server {
    /// Serves `loaded` on `options.listen` (port 0 picks a free one).
    pub fn start(loaded: LoadedModel, options: &ServeOptions) -> Result<Self, ServeError> {
        let metrics = Metrics::new();
        let engine = start_engine(loaded, options, &metrics)?;
        Self::serve(engine, options, metrics)
    }

    /// Serves the API of an expert-parallel replica's leader (the other
    /// ranks run [`follow`] on the same `world`); `loaded` holds this
    /// rank's experts.
    pub fn start_leader(
        world: Box<dyn Collective>,
        loaded: LoadedModel,
        options: &ServeOptions,
        timeouts: &Timeouts,
    ) -> Result<Self, ServeError> {
        let metrics = Metrics::new();
        let engine = start_leader(world, loaded, options, timeouts, &metrics)?;
        Self::serve(engine, options, metrics)
    }

    fn serve(
        engine: EngineHandle,
        options: &ServeOptions,
        metrics: Metrics,
    ) -> Result<Self, ServeError> {
        let state = options.app_state(metrics.clone());
        // Set before the first connection: this server is ready from the start.
        let _ = state.engine.set(engine.clone());
        let (runtime, listener) = runtime_listening(2, options.listen)?;
        let addr = listener.local_addr().map_err(|error| ServeError::Io {
            what: "cannot read the bound address".into(),
            error,
        })?;
        runtime.spawn(async move {
            if let Err(e) = axum::serve(no_delay(listener), http::router(state)).await {
                tracing::error!(error = %e, "the HTTP server stopped");
            }
        });
        Ok(Self {
            addr,
            engine,
            metrics,
            runtime: Some(runtime),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// `moe-worker serve`: listens at once (so the liveness probe answers while
/// the weights load), loads the model, then serves until SIGTERM or Ctrl-C.
///
/// With `replica` (more than one rank), this process is one rank of an
/// expert-parallel replica: rank 0 does the above over the whole replica
/// and tells the others to stop when it stops; the others follow it
/// ([`replica`]) and exit 0 when told, or non-zero when the replica breaks.
pub fn run(options: &ServeOptions, replica: Option<ReplicaSetup>) -> Result<(), ServeError> {
    options.check()?;
    match replica {
        Some(replica) if replica.size > 1 && replica.rank > 0 => run_follower(options, replica),
        replica => {
            let runtime = runtime(None)?;
            let replica = replica.filter(|r| r.size > 1);
            runtime.block_on(serve_until_stopped(options, replica))
        }
    }
}

/// A follower rank: the probes on the serving port (local rank 0 of its
/// pod only: the pod's other ranks share its port), then [`follow`].
fn run_follower(options: &ServeOptions, replica: ReplicaSetup) -> Result<(), ServeError> {
    let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let metrics = Metrics::new();
    let _probes = if replica.local_rank == 0 {
        let (runtime, listener) = runtime_listening(1, options.listen)?;
        let router =
            http::follower_router(replica.rank, std::sync::Arc::clone(&ready), metrics.clone());
        runtime.spawn(async move { axum::serve(listener, router).await });
        tracing::info!(addr = %options.listen, rank = replica.rank, "follower probes listening");
        if let Some(addr) = options.metrics_listen {
            // The pod's metrics port too, as the leader's pod serves it.
            let router = http::metrics_only_router(metrics.clone());
            runtime.spawn(async move {
                match tokio::net::TcpListener::bind(addr).await {
                    Ok(listener) => {
                        let _ = axum::serve(listener, router).await;
                    }
                    Err(error) => tracing::warn!(%addr, %error, "cannot serve metrics"),
                }
            });
        }
        Some(runtime)
    } else {
        None
    };
    let world = (replica.connect)().map_err(ServeError::Dist)?;
    let loaded = load_share(options, replica.rank, replica.size)?;
    let joined = replica::join_serving(world, loaded, options, &replica.timeouts)?;
    ready.store(true, std::sync::atomic::Ordering::Release);
    tracing::info!(rank = replica.rank, "ready; following rank 0");
    let followed = replica::follow_backend(joined, &metrics);
    ready.store(false, std::sync::atomic::Ordering::Release);
    if let Some(runtime) = _probes {
        runtime.shutdown_background();
    }
    followed
}

/// Streamed tokens are small writes: TCP_NODELAY sends each as soon as it
/// is written instead of letting Nagle's algorithm hold it back for the
/// client's ACK of the previous one (what serving stacks usually set).
fn no_delay(
    listener: tokio::net::TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|stream| {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
    })
}

async fn serve_until_stopped(
    options: &ServeOptions,
    replica: Option<ReplicaSetup>,
) -> Result<(), ServeError> {
    let metrics = Metrics::new();
    let state = options.app_state(metrics.clone());
    let bind = |addr: SocketAddr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|error| ServeError::Io {
                what: format!("cannot listen on {addr}"),
                error,
            })
    };
    let listener = bind(options.listen).await?;
    tracing::info!(addr = %options.listen, model = %state.model_name, "listening; loading the model");
    if let Some(addr) = options.metrics_listen {
        // A taken metrics port costs only the second endpoint (as in training).
        match bind(addr).await {
            Ok(metrics_listener) => {
                let router = http::metrics_router(state.clone());
                tokio::spawn(async move { axum::serve(metrics_listener, router).await });
            }
            Err(e) => tracing::warn!(error = %e, "metrics endpoint not available"),
        }
    }
    let router = http::router(state.clone());
    let server = tokio::spawn(async move {
        axum::serve(no_delay(listener), router)
            .with_graceful_shutdown(shutdown_signal())
            .await
    });
    let load_options = options.clone();
    let load_metrics = metrics.clone();
    // How long a shutdown may take to reach the followers.
    let stop_wait = replica
        .as_ref()
        .map_or(Duration::from_secs(1), |r| r.timeouts.collective);
    let loaded = tokio::task::spawn_blocking(move || match replica {
        None => {
            let loaded = load::load(
                &load_options.model_dir,
                load_options.format,
                load_options.checkpoint_step,
            )
            .map_err(ServeError::Load)?;
            start_engine(loaded, &load_options, &load_metrics)
        }
        Some(replica) => {
            let world = (replica.connect)().map_err(ServeError::Dist)?;
            let loaded = load_share(&load_options, replica.rank, replica.size)?;
            start_leader(
                world,
                loaded,
                &load_options,
                &replica.timeouts,
                &load_metrics,
            )
        }
    })
    .await
    .map_err(|e| ServeError::Options(format!("the model loader panicked: {e}")))?;
    let engine = loaded?;
    let _ = state.engine.set(engine.clone());
    tracing::info!("ready");
    let mut server = server;
    let served = tokio::select! {
        served = &mut server => served,
        // The replica broke: every request has failed, readiness is 503;
        // exit so the pod (or the launcher) restarts the replica.
        failure = engine.failed() => return Err(ServeError::Replica(failure)),
    };
    // Stopped by a signal: tell the followers, then exit.
    let stopping = engine.clone();
    let _ = tokio::task::spawn_blocking(move || stopping.shutdown(stop_wait)).await;
    match served {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(ServeError::Io {
            what: "the HTTP server failed".into(),
            error,
        }),
        Err(e) => Err(ServeError::Options(format!(
            "the HTTP server panicked: {e}"
        ))),
    }
}

/// Resolves on SIGTERM (pod deletion) or Ctrl-C; in-flight responses finish.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down");
}

/// A tokio runtime of `threads` workers (`None`: one per core).
fn runtime(threads: Option<usize>) -> Result<tokio::runtime::Runtime, ServeError> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = threads {
        builder.worker_threads(threads);
    }
    builder
        .enable_all()
        .build()
        .map_err(|error| ServeError::Io {
            what: "cannot start the async runtime".into(),
            error,
        })
}

/// A tokio runtime of `threads` workers and a listener bound on it.
fn runtime_listening(
    threads: usize,
    addr: SocketAddr,
) -> Result<(tokio::runtime::Runtime, tokio::net::TcpListener), ServeError> {
    let runtime = runtime(Some(threads))?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(addr))
        .map_err(|error| ServeError::Io {
            what: format!("cannot listen on {addr}"),
            error,
        })?;
    Ok((runtime, listener))
}
