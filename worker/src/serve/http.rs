//! The HTTP API (axum): `/v1/completions`, `/v1/chat/completions` (JSON,
//! or server-sent events with `"stream": true`), `/v1/models`, the probes
//! and `/metrics`.
//!
//! Probes: `/healthz` answers 200 as soon as the process listens (liveness
//! and the operator's startup probe, which must not kill a long load);
//! `/health` and `/readyz` answer 200 only once the model is loaded.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::stream::{self, Stream, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;

use moe_crds::contract::{HEALTH_PATH, READY_PATH};

use crate::serve::api::{self, ApiError, ChatRequest, Checked, CompletionRequest, Served};
use crate::serve::logprobs::{self, TokenLogprobs};
use crate::serve::metrics::Metrics;
use crate::serve::runner::{EngineHandle, Event, FinishReason, SubmitError, Usage};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The id `/v1/models` lists and requests name.
    pub model_name: Arc<str>,
    /// Set once the model is loaded and the scheduler runs.
    pub engine: Arc<OnceLock<EngineHandle>>,
    pub metrics: Metrics,
    /// Unix seconds when the server started (the model's `created`).
    pub started: u64,
}

impl AppState {
    pub fn new(model_name: &str, metrics: Metrics) -> Self {
        Self {
            model_name: model_name.into(),
            engine: Arc::new(OnceLock::new()),
            metrics,
            started: unix_now(),
        }
    }

    fn engine(&self) -> Result<&EngineHandle, ApiError> {
        self.engine
            .get()
            .ok_or_else(|| ApiError::unavailable("the model is still loading"))
    }
}

/// The API's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(ready))
        .route(READY_PATH, get(ready))
        .route(HEALTH_PATH, get(alive))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
}

/// Only `/metrics`, for the separate metrics port the operator's Service scrapes.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// `/metrics` of `metrics` alone (a follower rank's).
pub fn metrics_only_router(metrics: Metrics) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move { render(&metrics) }
        }),
    )
}

async fn alive() -> &'static str {
    "ok"
}

async fn ready(State(state): State<AppState>) -> Response {
    match state.engine.get().map(EngineHandle::failure) {
        Some(None) => "ok".into_response(),
        Some(Some(failure)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("failed: {failure}"),
        )
            .into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "loading").into_response(),
    }
}

/// A follower rank's routes (local rank 0 of a pod of an expert-parallel
/// replica other than the leader's): the probes, `ready` once it has
/// joined the replica, its `/metrics` (steps and collective bytes);
/// anything else points at the leader.
pub fn follower_router(rank: usize, ready: Arc<AtomicBool>, metrics: Metrics) -> Router {
    let probe = move || {
        let ready = Arc::clone(&ready);
        async move {
            if ready.load(Ordering::Acquire) {
                "ok".into_response()
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, "joining the replica").into_response()
            }
        }
    };
    let message = format!(
        "this is rank {rank} of an expert-parallel replica, a follower; rank 0 serves the API"
    );
    Router::new()
        .route("/health", get(probe.clone()))
        .route(READY_PATH, get(probe))
        .route(HEALTH_PATH, get(alive))
        .merge(metrics_only_router(metrics))
        .fallback(move || {
            let message = message.clone();
            async move {
                let mut e = ApiError::invalid(message, None);
                e.status = StatusCode::NOT_FOUND;
                e.into_response()
            }
        })
}

async fn metrics(State(state): State<AppState>) -> Response {
    render(&state.metrics)
}

fn render(metrics: &Metrics) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.render(),
    )
        .into_response()
}

async fn not_found() -> Response {
    let mut e = ApiError::invalid("no such endpoint", None);
    e.status = StatusCode::NOT_FOUND;
    e.into_response()
}

async fn models(State(state): State<AppState>) -> Response {
    let context = state.engine.get().map(EngineHandle::context);
    let body = json!({
        "object": "list",
        "data": [{
            "id": &*state.model_name,
            "object": "model",
            "created": state.started,
            "owned_by": "moe-operator",
            "max_model_len": context,
        }],
    });
    api::json_response(StatusCode::OK, &body)
}

/// The two generating endpoints differ only in their bodies' shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    Completions,
    Chat,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Self::Completions => "/v1/completions",
            Self::Chat => "/v1/chat/completions",
        }
    }
}

async fn completions(State(state): State<AppState>, body: Bytes) -> Response {
    let response = generate(&state, Endpoint::Completions, &body).await;
    state
        .metrics
        .response(Endpoint::Completions.path(), response.status().as_u16());
    response
}

async fn chat_completions(State(state): State<AppState>, body: Bytes) -> Response {
    let response = generate(&state, Endpoint::Chat, &body).await;
    state
        .metrics
        .response(Endpoint::Chat.path(), response.status().as_u16());
    response
}

async fn generate(state: &AppState, endpoint: Endpoint, body: &[u8]) -> Response {
    match start(state, endpoint, body) {
        Ok(Started {
            events,
            stream,
            include_usage,
            logprobs,
        }) => {
            let reply = Reply::new(state, endpoint, logprobs);
            if stream {
                stream_reply(reply, events, include_usage).into_response()
            } else {
                collect_reply(reply, events).await
            }
        }
        Err(e) => e.into_response(),
    }
}

/// A submitted request: its events, and how the reply is to be shaped.
struct Started {
    events: UnboundedReceiver<Event>,
    stream: bool,
    include_usage: bool,
    logprobs: bool,
}

/// Checks the request and submits it.
fn start(state: &AppState, endpoint: Endpoint, body: &[u8]) -> Result<Started, ApiError> {
    let engine = state.engine()?;
    let tokenizer = engine.tokenizer();
    let served = Served {
        name: &state.model_name,
        tokenizer: &tokenizer,
        context: engine.context(),
    };
    let Checked {
        request,
        stream,
        include_usage,
    } = match endpoint {
        Endpoint::Completions => api::parse::<CompletionRequest>(body)?.check(served)?,
        Endpoint::Chat => api::parse::<ChatRequest>(body)?.check(served)?,
    };
    let logprobs = request.logprobs.is_some();
    let events = engine.submit(request).map_err(|e| match e {
        SubmitError::QueueFull => ApiError::overloaded(e.to_string()),
        SubmitError::PromptTooLong { .. } => {
            ApiError::invalid(e.to_string(), Some("prompt")).with_code("context_length_exceeded")
        }
        SubmitError::TooLarge { .. } => ApiError::invalid(e.to_string(), Some("max_tokens")),
        SubmitError::Stopped => ApiError::unavailable(e.to_string()),
    })?;
    Ok(Started {
        events,
        stream,
        include_usage,
        logprobs,
    })
}

/// Builds the response bodies of one request.
struct Reply {
    endpoint: Endpoint,
    /// Whether the request asked for `logprobs` (else they are `null`).
    logprobs: bool,
    id: String,
    model: Arc<str>,
    created: u64,
}

impl Reply {
    fn new(state: &AppState, endpoint: Endpoint, logprobs: bool) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let prefix = match endpoint {
            Endpoint::Completions => "cmpl",
            Endpoint::Chat => "chatcmpl",
        };
        Self {
            endpoint,
            logprobs,
            id: format!("{prefix}-{}", NEXT.fetch_add(1, Ordering::Relaxed)),
            model: Arc::clone(&state.model_name),
            created: unix_now(),
        }
    }

    /// `tokens`' `logprobs` in the endpoint's shape, or `null` when not
    /// asked for; `offset`: see [`logprobs::completion_object`].
    fn logprobs(&self, tokens: &[TokenLogprobs], offset: &mut usize) -> Value {
        match (self.logprobs, self.endpoint) {
            (false, _) => Value::Null,
            (true, Endpoint::Completions) => logprobs::completion_object(tokens, offset),
            (true, Endpoint::Chat) => logprobs::chat_object(tokens),
        }
    }

    fn full(
        &self,
        text: &str,
        finish: FinishReason,
        usage: Usage,
        tokens: &[TokenLogprobs],
    ) -> Value {
        let logprobs = self.logprobs(tokens, &mut 0);
        let choice = match self.endpoint {
            Endpoint::Completions => json!({
                "index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish.as_str(),
            }),
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": finish.as_str(),
            }),
        };
        json!({
            "id": self.id,
            "object": match self.endpoint {
                Endpoint::Completions => "text_completion",
                Endpoint::Chat => "chat.completion",
            },
            "created": self.created,
            "model": &*self.model,
            "choices": [choice],
            "usage": usage_json(usage),
        })
    }

    /// The last streamed chunk when the client asked for the usage: no choices.
    fn usage_chunk(&self, usage: Usage) -> Value {
        let mut chunk = self.chunk(None, false, None);
        chunk["choices"] = json!([]);
        chunk["usage"] = usage_json(usage);
        chunk
    }

    /// One streamed chunk: a text piece, the assistant role (chat's first
    /// chunk), or the finish.
    fn chunk(&self, text: Option<&str>, role: bool, finish: Option<FinishReason>) -> Value {
        self.chunk_with(text, role, finish, Value::Null)
    }

    /// [`Self::chunk`] carrying the `logprobs` of the tokens it completes.
    fn chunk_with(
        &self,
        text: Option<&str>,
        role: bool,
        finish: Option<FinishReason>,
        logprobs: Value,
    ) -> Value {
        let finish = finish.map(FinishReason::as_str);
        let choice = match self.endpoint {
            Endpoint::Completions => json!({
                "index": 0, "text": text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish,
            }),
            Endpoint::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(text) = text {
                    delta.insert("content".into(), json!(text));
                }
                json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
        };
        json!({
            "id": self.id,
            "object": match self.endpoint {
                Endpoint::Completions => "text_completion",
                Endpoint::Chat => "chat.completion.chunk",
            },
            "created": self.created,
            "model": &*self.model,
            "choices": [choice],
        })
    }
}

/// Waits for the whole completion. If the client goes away, this future is
/// dropped with the receiver, which cancels the request.
async fn collect_reply(reply: Reply, mut events: UnboundedReceiver<Event>) -> Response {
    let mut text = String::new();
    let mut tokens = Vec::new();
    while let Some(event) = events.recv().await {
        match event {
            Event::Text(piece) => text.push_str(&piece),
            Event::Logprobs(token) => tokens.push(token),
            Event::Done { finish, usage } => {
                let body = reply.full(&text, finish, usage, &tokens);
                return api::json_response(StatusCode::OK, &body);
            }
            Event::Failed(message) => return ApiError::internal(message).into_response(),
        }
    }
    ApiError::internal("the engine stopped before the completion finished").into_response()
}

/// Streams the completion as server-sent events, ending with `[DONE]`.
/// When the client disconnects the body (and with it the receiver) is
/// dropped, which cancels the request.
fn stream_reply(
    reply: Reply,
    events: UnboundedReceiver<Event>,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let opening = (reply.endpoint == Endpoint::Chat)
        .then(|| SseEvent::default().data(reply.chunk(None, true, None).to_string()));
    let reply = Arc::new(reply);
    // The state: the receiver (gone once finished) and the completion's
    // length in characters so far (completions' `text_offset`).
    let body = stream::unfold(Some((events, 0)), move |state| {
        let reply = Arc::clone(&reply);
        async move {
            let (mut events, mut offset) = state?;
            // Each token's log-probabilities come before its text; a chunk
            // carries those of the tokens since the previous chunk.
            let mut tokens = Vec::new();
            let event = loop {
                match events.recv().await {
                    Some(Event::Logprobs(token)) => tokens.push(token),
                    other => break other,
                }
            };
            let logprobs = if tokens.is_empty() {
                Value::Null
            } else {
                reply.logprobs(&tokens, &mut offset)
            };
            let (data, more) = match event {
                Some(Event::Text(piece)) => (
                    vec![reply.chunk_with(Some(&piece), false, None, logprobs)],
                    true,
                ),
                Some(Event::Logprobs(_)) => unreachable!("taken by the loop above"),
                Some(Event::Done { finish, usage }) => {
                    let mut last = vec![reply.chunk_with(None, false, Some(finish), logprobs)];
                    if include_usage {
                        last.push(reply.usage_chunk(usage));
                    }
                    (last, false)
                }
                Some(Event::Failed(message)) => (vec![ApiError::internal(message).body()], false),
                None => (
                    vec![
                        ApiError::internal("the engine stopped before the completion finished")
                            .body(),
                    ],
                    false,
                ),
            };
            let events_out = data
                .into_iter()
                .map(|value| SseEvent::default().data(value.to_string()));
            Some((stream::iter(events_out), more.then_some((events, offset))))
        }
    })
    .flatten();
    let done = stream::once(async { SseEvent::default().data("[DONE]") });
    let all = stream::iter(opening)
        .chain(body)
        .chain(done)
        .map(Ok::<_, Infallible>);
    Sse::new(all).keep_alive(KeepAlive::default())
}

/// OpenAI's usage object; `cached_tokens` as OpenAI reports prompt caching.
fn usage_json(usage: Usage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
