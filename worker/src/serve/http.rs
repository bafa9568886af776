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
use crate::serve::logprobs::{self, PromptLogprobs, TokenLogprobs};
use crate::serve::metrics::Metrics;
use crate::serve::runner::{EngineHandle, Event, FinishReason, SubmitError, Usage};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The id `/v1/models` lists and requests name.
    pub model_name: Arc<str>,
    /// Where the weights came from, as `/v1/models` says it (`root`, as
    /// vLLM does): a Hub model's repo and commit, else the directory.
    pub root: Arc<str>,
    /// Set once the model is loaded and the scheduler runs.
    pub engine: Arc<OnceLock<EngineHandle>>,
    pub metrics: Metrics,
    /// Unix seconds when the server started (the model's `created`).
    pub started: u64,
    /// The adapters served beside the model: the names requests use and
    /// their directories (`/v1/models` lists them with the model as
    /// their `parent`, as vLLM does).
    pub adapters: Arc<[(String, String)]>,
    adapter_names: Arc<[String]>,
}

impl AppState {
    pub fn new(model_name: &str, root: &str, metrics: Metrics) -> Self {
        Self {
            model_name: model_name.into(),
            root: root.into(),
            engine: Arc::new(OnceLock::new()),
            metrics,
            started: unix_now(),
            adapters: Arc::new([]),
            adapter_names: Arc::new([]),
        }
    }

    /// Serves `adapters` (name, directory), in the engine's order.
    pub fn with_adapters(mut self, adapters: Vec<(String, String)>) -> Self {
        self.adapter_names = adapters.iter().map(|(name, _)| name.clone()).collect();
        self.adapters = adapters.into();
        self
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
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
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
    let model = |id: &str, root: &str, parent: Option<&str>| {
        json!({
            "id": id,
            "object": "model",
            "created": state.started,
            "owned_by": "moe-operator",
            "max_model_len": context,
            "root": root,
            "parent": parent,
        })
    };
    let mut data = vec![model(&state.model_name, &state.root, None)];
    for (name, dir) in state.adapters.iter() {
        data.push(model(name, dir, Some(&state.model_name)));
    }
    let body = json!({"object": "list", "data": data});
    api::json_response(StatusCode::OK, &body)
}

/// vLLM's `/tokenize`: `{"count", "max_model_len", "tokens"}`.
async fn tokenize(State(state): State<AppState>, body: Bytes) -> Response {
    tokenizer_endpoint(&state, "/tokenize", |served| {
        let tokens = api::parse::<api::TokenizeRequest>(&body)?.check(served)?;
        Ok(json!({"count": tokens.len(), "max_model_len": served.context, "tokens": tokens}))
    })
}

/// vLLM's `/detokenize`: `{"prompt"}`.
async fn detokenize(State(state): State<AppState>, body: Bytes) -> Response {
    tokenizer_endpoint(&state, "/detokenize", |served| {
        let text = api::parse::<api::DetokenizeRequest>(&body)?.check(served)?;
        Ok(json!({ "prompt": text }))
    })
}

/// A tokenizer endpoint at `path`: `answer`'s body for the served model,
/// or its error; counted in the responses metric.
fn tokenizer_endpoint(
    state: &AppState,
    path: &'static str,
    answer: impl FnOnce(Served<'_>) -> Result<Value, ApiError>,
) -> Response {
    let response = against_served(state, answer).map_or_else(IntoResponse::into_response, |body| {
        api::json_response(StatusCode::OK, &body)
    });
    state.metrics.response(path, response.status().as_u16());
    response
}

/// `check` run against the served model (its name, tokenizer and
/// context), once it is loaded.
fn against_served<T>(
    state: &AppState,
    check: impl FnOnce(Served<'_>) -> Result<T, ApiError>,
) -> Result<T, ApiError> {
    let engine = state.engine()?;
    let tokenizer = engine.tokenizer();
    check(Served {
        name: &state.model_name,
        adapters: &state.adapter_names,
        tokenizer: &tokenizer,
        context: engine.context(),
    })
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
    match start(state, endpoint, body).await {
        Ok(started) => {
            let reply = Reply::new(
                started.model.into(),
                endpoint,
                started.logprobs,
                started.echo,
            );
            if started.stream {
                stream_reply(reply, started.choices, started.include_usage).into_response()
            } else {
                collect_reply(reply, started.choices).await
            }
        }
        Err(e) => e.into_response(),
    }
}

/// A submitted request: each choice's events, and how the reply is to be shaped.
struct Started {
    /// Prompt after prompt, each prompt's `n` choices (OpenAI's order).
    choices: Vec<Choice>,
    stream: bool,
    include_usage: bool,
    logprobs: bool,
    /// Each prompt's text, to come before its choices' (completions' `echo`).
    echo: Option<Vec<String>>,
    /// The model the request named (the base model's or an adapter's name).
    model: String,
}

/// One choice's events; the first may have been received already.
struct Choice {
    /// Which of the request's prompts it completes.
    prompt: usize,
    first: Option<Event>,
    events: UnboundedReceiver<Event>,
}

impl Choice {
    async fn next(&mut self) -> Option<Event> {
        match self.first.take() {
            Some(event) => Some(event),
            None => self.events.recv().await,
        }
    }
}

/// Checks the request and submits its choices. With `n` above 1, choice
/// `i` samples with the seed plus `i`, and the others are submitted once
/// the first has sent its first event: its prompt is in the KV cache
/// then, and with [prefix caching](crate::serve::prefix_cache) they
/// prefill only what its whole pages do not hold, not `n` times the prompt.
/// A batch of prompts submits every prompt's first choice at once.
async fn start(state: &AppState, endpoint: Endpoint, body: &[u8]) -> Result<Started, ApiError> {
    let Checked {
        requests,
        n,
        stream,
        include_usage,
        echo,
        model,
    } = against_served(state, |served| match endpoint {
        Endpoint::Completions => api::parse::<CompletionRequest>(body)?.check(served),
        Endpoint::Chat => api::parse::<ChatRequest>(body)?.check(served),
    })?;
    let engine = state.engine()?;
    state.metrics.model_request(&model);
    let logprobs = requests.iter().any(|r| r.logprobs.is_some());
    let submit = |prompt: usize, index: usize| {
        let mut choice = requests[prompt].clone();
        choice.sampling.seed = choice.sampling.seed.wrapping_add(index as u64);
        engine.submit(choice).map_err(submit_error)
    };
    // A refusal drops the choices already submitted, which cancels them.
    let mut firsts = Vec::with_capacity(requests.len());
    for prompt in 0..requests.len() {
        firsts.push(submit(prompt, 0)?);
    }
    let mut choices = Vec::with_capacity(requests.len() * n);
    for (prompt, mut events) in firsts.into_iter().enumerate() {
        let first = if n > 1 { events.recv().await } else { None };
        choices.push(Choice {
            prompt,
            first,
            events,
        });
        for index in 1..n {
            choices.push(Choice {
                prompt,
                first: None,
                events: submit(prompt, index)?,
            });
        }
    }
    Ok(Started {
        choices,
        stream,
        include_usage,
        logprobs,
        echo,
        model,
    })
}

fn submit_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::QueueFull => ApiError::overloaded(e.to_string()),
        SubmitError::PromptTooLong { .. } => {
            ApiError::invalid(e.to_string(), Some("prompt")).with_code("context_length_exceeded")
        }
        SubmitError::TooLarge { .. } => ApiError::invalid(e.to_string(), Some("max_tokens")),
        SubmitError::Stopped => ApiError::unavailable(e.to_string()),
    }
}

/// Builds the response bodies of one request.
struct Reply {
    endpoint: Endpoint,
    /// Whether the request asked for `logprobs` (else they are `null`).
    logprobs: bool,
    id: String,
    model: Arc<str>,
    created: u64,
    /// Each prompt's text before its choices' (completions' `echo`).
    echo: Option<Vec<String>>,
}

impl Reply {
    fn new(model: Arc<str>, endpoint: Endpoint, logprobs: bool, echo: Option<Vec<String>>) -> Self {
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
            model,
            created: unix_now(),
            echo,
        }
    }

    /// `tokens`' `logprobs` in the endpoint's shape (after the echoed
    /// prompt's, if any), or `null` when not asked for; `offset`: see
    /// [`logprobs::completion_object`].
    fn logprobs(
        &self,
        prompt: Option<&PromptLogprobs>,
        tokens: &[TokenLogprobs],
        offset: &mut usize,
    ) -> Value {
        match (self.logprobs, self.endpoint) {
            (false, _) => Value::Null,
            (true, Endpoint::Completions) => logprobs::completion_object(prompt, tokens, offset),
            (true, Endpoint::Chat) => logprobs::chat_object(tokens),
        }
    }

    /// The echoed text of prompt `prompt` ("" without echo).
    fn echo(&self, prompt: usize) -> &str {
        self.echo
            .as_ref()
            .and_then(|texts| texts.get(prompt))
            .map_or("", String::as_str)
    }

    /// One finished choice of a whole (non-streamed) response.
    fn choice(&self, index: usize, done: &Collected) -> Value {
        let logprobs = self.logprobs(done.prompt_logprobs.as_ref(), &done.tokens, &mut 0);
        let text = format!("{}{}", self.echo(done.prompt), done.text);
        let finish = done.finish.as_str();
        match self.endpoint {
            Endpoint::Completions => json!({
                "index": index, "text": text, "logprobs": logprobs, "finish_reason": finish,
            }),
            Endpoint::Chat => json!({
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
        }
    }

    fn full(&self, choices: Vec<Value>, usage: Usage) -> Value {
        json!({
            "id": self.id,
            "object": match self.endpoint {
                Endpoint::Completions => "text_completion",
                Endpoint::Chat => "chat.completion",
            },
            "created": self.created,
            "model": &*self.model,
            "choices": choices,
            "usage": usage_json(usage),
        })
    }

    /// The last streamed chunk when the client asked for the usage: no choices.
    fn usage_chunk(&self, usage: Usage) -> Value {
        let mut chunk = self.chunk(0, None, false, None);
        chunk["choices"] = json!([]);
        chunk["usage"] = usage_json(usage);
        chunk
    }

    /// One streamed chunk of choice `index`: a text piece, the assistant
    /// role (chat's first chunk), or the finish.
    fn chunk(
        &self,
        index: usize,
        text: Option<&str>,
        role: bool,
        finish: Option<FinishReason>,
    ) -> Value {
        self.chunk_with(index, text, role, finish, Value::Null)
    }

    /// [`Self::chunk`] carrying the `logprobs` of the tokens it completes.
    fn chunk_with(
        &self,
        index: usize,
        text: Option<&str>,
        role: bool,
        finish: Option<FinishReason>,
        logprobs: Value,
    ) -> Value {
        let finish = finish.map(FinishReason::as_str);
        let choice = match self.endpoint {
            Endpoint::Completions => json!({
                "index": index, "text": text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish,
            }),
            Endpoint::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(text) = text {
                    delta.insert("content".into(), json!(text));
                }
                json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
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

/// A choice's whole completion.
struct Collected {
    prompt: usize,
    prompt_logprobs: Option<PromptLogprobs>,
    text: String,
    tokens: Vec<TokenLogprobs>,
    finish: FinishReason,
    usage: Usage,
}

/// Waits for one choice's whole completion (its error message if it failed).
async fn collect(mut choice: Choice) -> Result<Collected, String> {
    let mut text = String::new();
    let mut tokens = Vec::new();
    let mut prompt_logprobs = None;
    while let Some(event) = choice.next().await {
        match event {
            Event::Text(piece) => text.push_str(&piece),
            Event::Logprobs(token) => tokens.push(token),
            Event::PromptLogprobs(prompt) => prompt_logprobs = Some(prompt),
            Event::Done { finish, usage } => {
                return Ok(Collected {
                    prompt: choice.prompt,
                    prompt_logprobs,
                    text,
                    tokens,
                    finish,
                    usage,
                });
            }
            Event::Failed(message) => return Err(message),
        }
    }
    Err(STOPPED.into())
}

const STOPPED: &str = "the engine stopped before the completion finished";

/// The usage of a request of several choices, `(prompt, usage)` each:
/// each prompt's tokens (and what the prefix cache held of them when its
/// first choice was admitted) once, the completions' tokens added up.
fn combined(usages: impl IntoIterator<Item = (usize, Usage)>) -> Usage {
    let mut total = Usage::default();
    let mut counted = std::collections::HashSet::new();
    for (prompt, usage) in usages {
        if counted.insert(prompt) {
            total.prompt_tokens += usage.prompt_tokens;
            total.cached_tokens += usage.cached_tokens;
        }
        total.completion_tokens += usage.completion_tokens;
    }
    total
}

/// Waits for every choice's whole completion. If the client goes away,
/// this future is dropped with the receivers, which cancels the request.
async fn collect_reply(reply: Reply, choices: Vec<Choice>) -> Response {
    let mut done = Vec::with_capacity(choices.len());
    // One at a time: the engine never waits for a reader (its channels are
    // unbounded), so the others' events simply queue meanwhile.
    for choice in choices {
        match collect(choice).await {
            Ok(collected) => done.push(collected),
            Err(message) => return ApiError::internal(message).into_response(),
        }
    }
    let bodies = done
        .iter()
        .enumerate()
        .map(|(i, c)| reply.choice(i, c))
        .collect();
    let usage = combined(done.iter().map(|c| (c.prompt, c.usage)));
    api::json_response(StatusCode::OK, &reply.full(bodies, usage))
}

/// What a stream of several choices keeps between events.
struct Streaming {
    /// Each choice's log-probabilities of the tokens since its last chunk
    /// (each token's come before its text).
    pending: Vec<Vec<TokenLogprobs>>,
    /// Each choice's completion length in characters so far (completions'
    /// `text_offset`).
    offsets: Vec<usize>,
    /// Each choice's prompt.
    prompts: Vec<usize>,
    /// The finished choices' usage.
    usages: Vec<Option<Usage>>,
    open: usize,
}

/// Choice `index`'s events, each tagged with it; `None` once if its
/// channel closes before it finished.
fn tagged(index: usize, choice: Choice) -> stream::BoxStream<'static, (usize, Option<Event>)> {
    stream::unfold(Some(choice), move |state| async move {
        let mut choice = state?;
        match choice.next().await {
            Some(event) => {
                let last = matches!(event, Event::Done { .. } | Event::Failed(_));
                Some(((index, Some(event)), (!last).then_some(choice)))
            }
            None => Some(((index, None), None)),
        }
    })
    .boxed()
}

/// Streams the choices as server-sent events, in the order their pieces
/// come, each chunk naming its choice's `index`, ending with `[DONE]`.
/// When the client disconnects the body (and with it the receivers) is
/// dropped, which cancels the request.
fn stream_reply(
    reply: Reply,
    choices: Vec<Choice>,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let n = choices.len();
    let prompts: Vec<usize> = choices.iter().map(|c| c.prompt).collect();
    // Chat's role chunks; completions' echoed prompt, a chunk per choice
    // (with logprobs it comes with the prompt's, when they are computed).
    let opening: Vec<SseEvent> = match (reply.endpoint, &reply.echo) {
        (Endpoint::Chat, _) => (0..n)
            .map(|i| SseEvent::default().data(reply.chunk(i, None, true, None).to_string()))
            .collect(),
        (Endpoint::Completions, Some(_)) if !reply.logprobs => (0..n)
            .map(|i| {
                let echo = Some(reply.echo(prompts[i]));
                SseEvent::default().data(reply.chunk(i, echo, false, None).to_string())
            })
            .collect(),
        (Endpoint::Completions, _) => Vec::new(),
    };
    let reply = Arc::new(reply);
    let events = stream::select_all(choices.into_iter().enumerate().map(|(i, c)| tagged(i, c)));
    let state = Streaming {
        pending: vec![Vec::new(); n],
        offsets: vec![0; n],
        prompts,
        usages: vec![None; n],
        open: n,
    };
    let body = stream::unfold(Some((events, state)), move |state| {
        let reply = Arc::clone(&reply);
        async move {
            let (mut events, mut state) = state?;
            let (data, more) = loop {
                let (i, event) = events.next().await?;
                let logprobs = |state: &mut Streaming| {
                    let tokens = std::mem::take(&mut state.pending[i]);
                    if tokens.is_empty() {
                        Value::Null
                    } else {
                        reply.logprobs(None, &tokens, &mut state.offsets[i])
                    }
                };
                match event {
                    Some(Event::Logprobs(token)) => state.pending[i].push(token),
                    Some(Event::PromptLogprobs(prompt)) => {
                        let logprobs = reply.logprobs(Some(&prompt), &[], &mut state.offsets[i]);
                        let echo = reply.echo(state.prompts[i]);
                        break (
                            vec![reply.chunk_with(i, Some(echo), false, None, logprobs)],
                            true,
                        );
                    }
                    Some(Event::Text(piece)) => {
                        let logprobs = logprobs(&mut state);
                        break (
                            vec![reply.chunk_with(i, Some(&piece), false, None, logprobs)],
                            true,
                        );
                    }
                    Some(Event::Done { finish, usage }) => {
                        let logprobs = logprobs(&mut state);
                        let mut last =
                            vec![reply.chunk_with(i, None, false, Some(finish), logprobs)];
                        state.usages[i] = Some(usage);
                        state.open -= 1;
                        if state.open > 0 {
                            break (last, true);
                        }
                        if include_usage {
                            let usage = combined(
                                state
                                    .prompts
                                    .iter()
                                    .zip(&state.usages)
                                    .map(|(&p, u)| (p, u.unwrap_or_default())),
                            );
                            last.push(reply.usage_chunk(usage));
                        }
                        break (last, false);
                    }
                    Some(Event::Failed(message)) => {
                        break (vec![ApiError::internal(message).body()], false);
                    }
                    None => break (vec![ApiError::internal(STOPPED).body()], false),
                }
            };
            let events_out: Vec<SseEvent> = data
                .into_iter()
                .map(|value| SseEvent::default().data(value.to_string()))
                .collect();
            Some((stream::iter(events_out), more.then_some((events, state))))
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
