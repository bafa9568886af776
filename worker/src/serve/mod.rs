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
//!   the weights packed for the GEMM kernel (`layers`);
//! - [`scheduler`], [`sampler`], [`text`], [`logprobs`]: the pure decisions;
//! - [`runner`]: the scheduler thread tying them together;
//! - [`api`], [`http`], [`metrics`]: the HTTP side; [`options`]: flags and the operator's config.

pub mod api;
pub mod engine;
pub mod hf;
pub mod http;
pub mod kv_cache;
mod layers;
pub mod load;
pub mod logprobs;
pub mod metrics;
pub mod model;
pub mod options;
pub mod runner;
pub mod sampler;
pub mod scheduler;
pub mod text;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use moe_crds::{ModelFormat, ModelSpec};

use crate::ops::packed_linear::WeightPrecision;
use crate::serve::engine::Engine;
use crate::serve::http::AppState;
use crate::serve::load::{LoadError, LoadedModel};
use crate::serve::metrics::Metrics;
use crate::serve::runner::{EngineHandle, RunnerSettings};
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
}

/// Why the server could not start.
#[derive(Debug)]
pub enum ServeError {
    Options(String),
    Load(LoadError),
    Io { what: String, error: std::io::Error },
}

impl fmt::Display for ServeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Options(message) => write!(f, "{message}"),
            Self::Load(e) => write!(f, "cannot load the model: {e}"),
            Self::Io { what, error } => write!(f, "{what}: {error}"),
        }
    }
}

impl std::error::Error for ServeError {}

impl ServeError {
    /// 2 for a bad invocation or model, 1 for the environment (as `train`).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Options(_) | Self::Load(_) => 2,
            Self::Io { .. } => 1,
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
        ];
        for (what, value) in positive {
            if value == 0 {
                return Err(ServeError::Options(format!("{what} must be at least 1")));
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
        }
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

/// Starts the scheduler thread for a loaded model.
pub fn start_engine(
    loaded: LoadedModel,
    options: &ServeOptions,
    metrics: &Metrics,
) -> Result<EngineHandle, ServeError> {
    options.check()?;
    if let Some(expected) = &options.expected_model {
        loaded.check_spec(expected).map_err(ServeError::Load)?;
    }
    let engine = Engine::serve(loaded.model.into_serve_model())
        .with_weights(options.weights)
        .with_threads(options.threads)
        .map_err(|error| ServeError::Io {
            what: "starting the compute threads".into(),
            error,
        })?;
    let shape = engine.kv_shape(options.page_size);
    let kv_pages = shape.pages_within(options.kv_cache_bytes);
    if kv_pages == 0 {
        return Err(ServeError::Options(format!(
            "a KV cache of {} bytes holds no page; one page takes {} bytes",
            options.kv_cache_bytes,
            shape.page_bytes()
        )));
    }
    tracing::info!(
        checkpoint = %loaded.path.display(),
        step = loaded.step,
        context = engine.context(),
        kv_pages,
        page_size = options.page_size,
        weights = ?options.weights,
        weight_mib = engine.weight_bytes() >> 20,
        "model loaded"
    );
    let settings = RunnerSettings {
        limits: options.limits(),
        kv_pages,
    };
    runner::start(engine, loaded.tokenizer, settings, metrics.clone()).map_err(|error| {
        ServeError::Io {
            what: "cannot start the scheduler thread".into(),
            error,
        }
    })
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
        let state = AppState::new(&options.served_name(), metrics.clone());
        // Set before the first connection: this server is ready from the start.
        let _ = state.engine.set(engine.clone());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|error| ServeError::Io {
                what: "cannot start the async runtime".into(),
                error,
            })?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(options.listen))
            .map_err(|error| ServeError::Io {
                what: format!("cannot listen on {}", options.listen),
                error,
            })?;
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
pub fn run(options: &ServeOptions) -> Result<(), ServeError> {
    options.check()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|error| ServeError::Io {
            what: "cannot start the async runtime".into(),
            error,
        })?;
    runtime.block_on(serve_until_stopped(options))
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

async fn serve_until_stopped(options: &ServeOptions) -> Result<(), ServeError> {
    let metrics = Metrics::new();
    let state = AppState::new(&options.served_name(), metrics.clone());
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
    let loaded = tokio::task::spawn_blocking(move || {
        let loaded = load::load(
            &load_options.model_dir,
            load_options.format,
            load_options.checkpoint_step,
        )
        .map_err(ServeError::Load)?;
        start_engine(loaded, &load_options, &load_metrics)
    })
    .await
    .map_err(|e| ServeError::Options(format!("the model loader panicked: {e}")))?;
    let engine = loaded?;
    let _ = state.engine.set(engine);
    tracing::info!("ready");
    match server.await {
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
