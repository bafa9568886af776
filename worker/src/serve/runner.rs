//! The scheduler thread: the one thread that runs the model. It takes new
//! requests from a channel, asks the [`Scheduler`] for each step's plan,
//! runs it on the engine ([`Backend`]: the CPU's or the GPU's), samples, and sends each request its text as
//! it is produced. A request whose receiver is gone (the client hung up)
//! is cancelled at the next step and its KV pages return to the pool.
//!
//! Back-pressure is decided on the caller's side ([`EngineHandle::submit`])
//! with a counter of requests not yet admitted, so an HTTP handler learns
//! synchronously that the queue is full and can answer 429.
//!
//! As the leader of an expert-parallel replica the thread also drives the
//! followers ([`Lockstep`]): each step's plan goes to them before the step
//! runs, a heartbeat while idle, a stop at shutdown. A failed exchange
//! breaks the replica: every request fails, [`EngineHandle::failure`] says
//! why (readiness turns 503) and [`EngineHandle::failed`] wakes the server,
//! which exits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, mpsc};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::dist::DistError;
use crate::serve::backend::Backend;
use crate::serve::engine::{Chunk, Logits, StepError};
use crate::serve::kv_cache::pages_for;
use crate::serve::lockstep::{Lockstep, Message, StepPlan};
use crate::serve::logprobs::{self, Candidate, PromptLogprobs, TokenLogprobs};
use crate::serve::metrics::Metrics;
use crate::serve::rebalance::LayerRebalance;
use crate::serve::sampler::{Sampler, SamplingParams};
use crate::serve::scheduler::{Limits, RequestId, Scheduler, Work};
use crate::serve::text::{Delta, TextAssembler, Tokenizer};

/// What a request asks of the engine, already tokenised and validated.
#[derive(Clone, Debug)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    /// At least 1, or 0 when only the prompt is scored (`prompt_logprobs`).
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stops: Vec<String>,
    /// `Some(n)`: report each generated token's log-probability and the
    /// `n` likeliest tokens at its position ([`Event::Logprobs`]).
    pub logprobs: Option<usize>,
    /// `Some(n)`: the same for every prompt token after the first
    /// ([`Event::PromptLogprobs`]); the prompt is then computed whole, not
    /// from the prefix cache.
    pub prompt_logprobs: Option<usize>,
    /// End-of-sequence tokens do not end the completion (vLLM's
    /// `ignore_eos`: fixed-length outputs for benchmarks); they add no text.
    pub ignore_eos: bool,
    /// No end-of-sequence token is drawn and no stop string ends the
    /// completion before this many tokens (vLLM's `min_tokens`; at most
    /// `max_tokens`).
    pub min_tokens: usize,
    /// The adapter the request names as its `model` (an index into the
    /// engine's, `serve/adapters.rs`); `None`: the base model.
    pub adapter: Option<usize>,
}

/// Why a completion ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop string, or an end-of-sequence token.
    Stop,
    /// `max_tokens`, or the end of the context.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// What the engine sends a request, in order: text pieces (each token's
/// `Logprobs` before its text, when asked for), then one `Done` or `Failed`.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Text(String),
    /// A generated token's log-probabilities (not for an end-of-sequence
    /// token, which is no part of the completion).
    Logprobs(TokenLogprobs),
    /// The prompt's log-probabilities, first of all events, when asked for.
    PromptLogprobs(PromptLogprobs),
    Done {
        finish: FinishReason,
        usage: Usage,
    },
    Failed(String),
}

/// A finished request's token counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
}

/// Why a request was not accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// Too many requests wait already; retry later (HTTP 429).
    QueueFull,
    /// The prompt leaves no room for a completion in the context.
    PromptTooLong { tokens: usize, context: usize },
    /// The request can never fit in the KV cache.
    TooLarge { pages: usize, total: usize },
    /// The scheduler thread has stopped.
    Stopped,
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::QueueFull => write!(f, "the server is at capacity; retry later"),
            Self::PromptTooLong { tokens, context } => write!(
                f,
                "the prompt has {tokens} tokens, but this model's context is {context} tokens \
                 (prompt and completion together); shorten the prompt"
            ),
            Self::TooLarge { pages, total } => write!(
                f,
                "the request needs {pages} KV cache pages, more than the {total} the server has; \
                 lower max_tokens or shorten the prompt"
            ),
            Self::Stopped => write!(f, "the engine has stopped"),
        }
    }
}

impl std::error::Error for SubmitError {}

/// How the scheduler thread runs.
#[derive(Clone, Copy, Debug)]
pub struct RunnerSettings {
    pub limits: Limits,
    pub kv_pages: usize,
    /// A leader whose replica holds expert copies: how often it has every
    /// rank choose them again (`serve/rebalance.rs`).
    pub rebalance_interval: Option<Duration>,
}

struct Submission {
    id: RequestId,
    request: GenerationRequest,
    events: UnboundedSender<Event>,
    accepted: Instant,
}

/// What the scheduler thread receives.
enum Inbox {
    Submit(Submission),
    /// Stop (telling the followers), then answer.
    Shutdown(mpsc::Sender<()>),
}

/// Why the engine can run no more: its replica broke (a rank died or an
/// exchange failed), or the scheduler thread panicked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub message: String,
    /// Caused by another rank's failure (exit code 3, as in training).
    pub peer: bool,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Set once, when the engine fails for good.
#[derive(Debug, Default)]
struct Health {
    failure: OnceLock<Failure>,
    notify: Notify,
}

impl Health {
    fn fail(&self, failure: Failure) {
        if self.failure.set(failure).is_ok() {
            // A stored permit: a waiter arriving later still wakes.
            self.notify.notify_one();
        }
    }
}

/// The HTTP side's way in: cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    inbox: mpsc::Sender<Inbox>,
    next_id: Arc<AtomicU64>,
    /// Requests accepted but not yet admitted into the running batch.
    queued: Arc<AtomicUsize>,
    max_queued: usize,
    context: usize,
    page_size: usize,
    kv_pages: usize,
    tokenizer: Tokenizer,
    pages_used: Arc<AtomicUsize>,
    health: Arc<Health>,
}

impl EngineHandle {
    /// Why the engine stopped for good, once it has.
    pub fn failure(&self) -> Option<Failure> {
        self.health.failure.get().cloned()
    }

    /// Resolves when the engine fails for good (never, while it works).
    pub async fn failed(&self) -> Failure {
        loop {
            if let Some(failure) = self.failure() {
                return failure;
            }
            self.health.notify.notified().await;
        }
    }

    /// Stops the scheduler thread (a leader first tells its followers to
    /// exit) and waits up to `wait` for it. Requests still running fail.
    pub fn shutdown(&self, wait: Duration) {
        let (done, stopped) = mpsc::channel();
        if self.inbox.send(Inbox::Shutdown(done)).is_ok() {
            let _ = stopped.recv_timeout(wait);
        }
    }

    /// Longest sequence (prompt and completion) a request may reach.
    pub fn context(&self) -> usize {
        self.context
    }

    pub fn tokenizer(&self) -> Tokenizer {
        self.tokenizer.clone()
    }

    /// KV pages held by sequences now (0 when nothing runs).
    pub fn kv_pages_used(&self) -> usize {
        self.pages_used.load(Ordering::Acquire)
    }

    pub fn kv_pages_total(&self) -> usize {
        self.kv_pages
    }

    /// Queues `request`; its events arrive on the receiver. Dropping the
    /// receiver cancels the request.
    pub fn submit(
        &self,
        request: GenerationRequest,
    ) -> Result<UnboundedReceiver<Event>, SubmitError> {
        // A failed engine's thread may still be draining its inbox: refuse
        // here rather than queue a request it will only fail.
        if self.failure().is_some() {
            return Err(SubmitError::Stopped);
        }
        let prompt = request.prompt.len();
        // A prompt may fill the context only to be scored (max_tokens 0).
        if prompt > self.context || (prompt == self.context && request.max_tokens > 0) {
            return Err(SubmitError::PromptTooLong {
                tokens: prompt,
                context: self.context,
            });
        }
        let max_len = (prompt + request.max_tokens).min(self.context);
        let pages = pages_for(max_len, self.page_size);
        if pages > self.kv_pages {
            return Err(SubmitError::TooLarge {
                pages,
                total: self.kv_pages,
            });
        }
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q < self.max_queued).then_some(q + 1)
            })
            .map_err(|_| SubmitError::QueueFull)?;
        let (events, receiver) = unbounded_channel();
        let submission = Submission {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            request,
            events,
            accepted: Instant::now(),
        };
        if self.inbox.send(Inbox::Submit(submission)).is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::Stopped);
        }
        Ok(receiver)
    }
}

/// Starts the scheduler thread for `engine` (with its KV cache of
/// `settings.kv_pages` pages). It runs until every handle is dropped or
/// [`EngineHandle::shutdown`]; with `lockstep`, as the leader of an
/// expert-parallel replica whose followers run every step too.
pub fn start(
    engine: Backend,
    tokenizer: Tokenizer,
    settings: RunnerSettings,
    metrics: Metrics,
    lockstep: Option<Lockstep>,
) -> std::io::Result<EngineHandle> {
    let (inbox, receiver) = mpsc::channel();
    let limits = settings.limits;
    let handle = EngineHandle {
        inbox,
        next_id: Arc::new(AtomicU64::new(1)),
        queued: Arc::new(AtomicUsize::new(0)),
        max_queued: limits.max_waiting,
        context: engine.context(),
        page_size: limits.page_size,
        kv_pages: settings.kv_pages,
        tokenizer: tokenizer.clone(),
        pages_used: Arc::new(AtomicUsize::new(0)),
        health: Arc::new(Health::default()),
    };
    debug_assert_eq!(engine.page_size(), limits.page_size);
    // The handle bounds the queue; the scheduler's own bound is only a backstop.
    let scheduler_limits = Limits {
        max_waiting: usize::MAX,
        ..limits
    };
    metrics.kv_pages_total.set(settings.kv_pages as i64);
    let mut runner = Runner {
        engine,
        tokenizer,
        scheduler: Scheduler::new(scheduler_limits, settings.kv_pages),
        active: HashMap::new(),
        metrics,
        queued: Arc::clone(&handle.queued),
        pages_used: Arc::clone(&handle.pages_used),
        rebalance: settings
            .rebalance_interval
            .filter(|_| lockstep.is_some())
            .map(|interval| Rebalance {
                interval,
                last: Instant::now(),
            }),
        lockstep,
        shutdown_ack: None,
    };
    let health = Arc::clone(&handle.health);
    std::thread::Builder::new()
        .name("moe-serve-scheduler".into())
        .spawn(move || {
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let result = runner.run(&receiver);
                if let Err(failure) = result {
                    runner.fail_everything(&failure);
                    health.fail(failure);
                }
            }));
            if ran.is_err() {
                health.fail(Failure {
                    message: "the scheduler thread panicked".into(),
                    peer: false,
                });
            }
        })?;
    Ok(handle)
}

/// A request the runner knows about.
struct Active {
    events: UnboundedSender<Event>,
    /// The prompt, then every sampled token.
    tokens: Vec<u32>,
    prompt_len: usize,
    max_tokens: usize,
    sampler: Sampler,
    text: TextAssembler,
    logprobs: Option<usize>,
    ignore_eos: bool,
    min_tokens: usize,
    /// Alternatives per scored prompt token, and those scored so far.
    prompt_logprobs: Option<usize>,
    scored: Vec<TokenLogprobs>,
    admitted: bool,
    /// Prompt tokens the prefix cache held when it was admitted.
    cached_tokens: usize,
    accepted: Instant,
    last_token: Option<Instant>,
}

impl Active {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

struct Runner {
    /// The engine and its KV cache.
    engine: Backend,
    tokenizer: Tokenizer,
    scheduler: Scheduler,
    active: HashMap<RequestId, Active>,
    metrics: Metrics,
    queued: Arc<AtomicUsize>,
    pages_used: Arc<AtomicUsize>,
    /// The followers, when this is the leader of an expert-parallel replica.
    lockstep: Option<Lockstep>,
    /// Who asked for the shutdown, answered once the followers are told.
    shutdown_ack: Option<mpsc::Sender<()>>,
    /// When the expert copies are chosen again (a leader with copies).
    rebalance: Option<Rebalance>,
}

/// The leader's clock for rebalancing the expert copies.
struct Rebalance {
    interval: Duration,
    last: Instant,
}

/// What the scheduler thread does next.
enum Flow {
    Continue,
    Stop,
}

/// `token`'s log-probability under `logits` and the `top` likeliest
/// tokens there, with their bytes.
fn token_logprobs(tokenizer: &Tokenizer, logits: &[f32], token: u32, top: usize) -> TokenLogprobs {
    let (logprob, best) = logprobs::logprobs(logits, token, top);
    let candidate = |id: u32, logprob: f32| Candidate {
        id,
        bytes: tokenizer.token_bytes(id),
        logprob,
    };
    TokenLogprobs {
        chosen: candidate(token, logprob),
        top: best.into_iter().map(|(id, lp)| candidate(id, lp)).collect(),
    }
}

/// Which of a planned chunk's rows return logits.
fn logits_of(w: &Work) -> Logits {
    if w.score {
        Logits::All
    } else {
        Logits::last_if(w.sample)
    }
}

/// Logs what a rebalance did, one line per MoE layer.
pub(crate) fn log_rebalance(report: &[LayerRebalance], took: Duration) {
    for layer in report {
        tracing::info!(
            layer = layer.layer,
            routed_rows = layer.load.iter().sum::<u64>(),
            imbalance_served = format!("{:.3}", layer.before),
            imbalance_chosen = format!("{:.3}", layer.after),
            copies_moved = layer.moved,
            weight_bytes_sent = layer.bytes_sent,
            took_ms = took.as_millis() as u64,
            "expert copies chosen again"
        );
    }
}

fn broken(error: &DistError) -> Failure {
    Failure {
        message: format!("the expert-parallel replica failed: {error}"),
        peer: error.is_peer_failure(),
    }
}

impl Runner {
    /// Runs until shut down (`Ok`) or the replica breaks.
    fn run(&mut self, inbox: &mpsc::Receiver<Inbox>) -> Result<(), Failure> {
        let flow = self.serve(inbox)?;
        debug_assert!(matches!(flow, Flow::Stop));
        if let Some(lockstep) = &mut self.lockstep {
            // Answered by a barrier: every follower has it before this
            // process may exit.
            lockstep.send(&Message::Stop).map_err(|e| broken(&e))?;
            tracing::info!("the followers were told to stop");
        }
        if let Some(ack) = self.shutdown_ack.take() {
            let _ = ack.send(());
        }
        Ok(())
    }

    fn serve(&mut self, inbox: &mpsc::Receiver<Inbox>) -> Result<Flow, Failure> {
        loop {
            if self.scheduler.is_idle() {
                // A leader wakes for its heartbeat; a single process sleeps.
                let message = match &self.lockstep {
                    Some(lockstep) => inbox.recv_timeout(lockstep.until_heartbeat()),
                    None => inbox
                        .recv()
                        .map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                };
                match message {
                    Ok(message) => {
                        if let Flow::Stop = self.receive(message) {
                            return Ok(Flow::Stop);
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.keep_alive()?;
                        continue;
                    }
                    // Every handle is gone: the server is shutting down.
                    Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(Flow::Stop),
                }
            }
            while let Ok(message) = inbox.try_recv() {
                if let Flow::Stop = self.receive(message) {
                    return Ok(Flow::Stop);
                }
            }
            self.cancel_abandoned();
            let work = self.scheduler.plan();
            self.publish_gauges();
            if work.is_empty() {
                // Nothing can run (only possible if requests wait for pages
                // that nothing will free); wait for news instead of spinning.
                match inbox.recv_timeout(Duration::from_millis(10)) {
                    Ok(message) => {
                        if let Flow::Stop = self.receive(message) {
                            return Ok(Flow::Stop);
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(Flow::Stop),
                }
                self.keep_alive()?;
                continue;
            }
            self.rebalance_if_due()?;
            self.run_step(&work)?;
        }
    }

    /// Has every rank choose its expert copies again, when the interval
    /// has passed. Only between steps that run, so the window it reads
    /// always holds the load served since the last one.
    fn rebalance_if_due(&mut self) -> Result<(), Failure> {
        let (Some(rebalance), Some(lockstep)) = (&mut self.rebalance, &mut self.lockstep) else {
            return Ok(());
        };
        if rebalance.last.elapsed() < rebalance.interval {
            return Ok(());
        }
        let started = Instant::now();
        lockstep.send(&Message::Rebalance).map_err(|e| broken(&e))?;
        let report = self.engine.rebalance_experts().map_err(|e| Failure {
            peer: matches!(e, StepError::Collective { peer: true, .. }),
            message: e.to_string(),
        })?;
        log_rebalance(&report, started.elapsed());
        self.metrics.record_rebalance(&report);
        rebalance.last = Instant::now();
        Ok(())
    }

    fn receive(&mut self, message: Inbox) -> Flow {
        match message {
            Inbox::Submit(submission) => {
                self.accept(submission);
                Flow::Continue
            }
            Inbox::Shutdown(done) => {
                // Answered once the followers are told (or when the runner
                // is dropped, if that fails).
                self.shutdown_ack = Some(done);
                Flow::Stop
            }
        }
    }

    /// A leader's heartbeat, when one is due.
    fn keep_alive(&mut self) -> Result<(), Failure> {
        match &mut self.lockstep {
            Some(lockstep) => lockstep.keep_alive().map_err(|e| broken(&e)),
            None => Ok(()),
        }
    }

    /// Fails every request (the replica is broken).
    fn fail_everything(&mut self, failure: &Failure) {
        let ids: Vec<RequestId> = self.active.keys().copied().collect();
        for id in ids {
            if let Some(active) = self.active.get(&id) {
                let _ = active.events.send(Event::Failed(failure.message.clone()));
            }
            self.finish(id);
        }
        self.publish_gauges();
    }

    fn accept(&mut self, submission: Submission) {
        let Submission {
            id,
            request,
            events,
            accepted,
        } = submission;
        let prompt_len = request.prompt.len();
        let max_len = (prompt_len + request.max_tokens).min(self.engine.context());
        let queued = if request.prompt_logprobs.is_some() {
            self.scheduler
                .enqueue_whole(id, &request.prompt, max_len, request.adapter)
        } else {
            self.scheduler
                .enqueue(id, &request.prompt, max_len, request.adapter)
        };
        if let Err(e) = queued {
            // The handle checked both limits already; this is a backstop.
            self.queued.fetch_sub(1, Ordering::AcqRel);
            let _ = events.send(Event::Failed(format!("not scheduled: {e:?}")));
            return;
        }
        self.active.insert(
            id,
            Active {
                events,
                tokens: request.prompt,
                prompt_len,
                max_tokens: request.max_tokens,
                sampler: Sampler::new(request.sampling),
                text: TextAssembler::new(request.stops),
                logprobs: request.logprobs,
                ignore_eos: request.ignore_eos,
                min_tokens: request.min_tokens,
                prompt_logprobs: request.prompt_logprobs,
                scored: Vec::new(),
                admitted: false,
                cached_tokens: 0,
                accepted,
                last_token: None,
            },
        );
    }

    /// Drops every request whose client is gone.
    fn cancel_abandoned(&mut self) {
        let gone: Vec<RequestId> = self
            .active
            .iter()
            .filter(|(_, a)| a.events.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            tracing::debug!(id, "client gone; cancelling");
            self.finish(id);
        }
    }

    /// Removes a request from the scheduler (returning its pages) and from the runner.
    fn finish(&mut self, id: RequestId) {
        if let Some(active) = self.active.remove(&id)
            && !active.admitted
        {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
        if let Err(e) = self.scheduler.remove(id) {
            // A bookkeeping bug; the pool stays consistent (the free stopped).
            tracing::error!(id, error = %e, "KV page bookkeeping");
        }
    }

    fn run_step(&mut self, work: &[Work]) -> Result<(), Failure> {
        for w in work {
            if let Some(active) = self.active.get_mut(&w.id)
                && !active.admitted
            {
                // A sequence's first chunk starts after its cached prefix.
                active.admitted = true;
                active.cached_tokens = w.start;
                self.queued.fetch_sub(1, Ordering::AcqRel);
                self.metrics.prompt_tokens.inc_by(active.prompt_len as u64);
                self.metrics.prompt_tokens_cached.inc_by(w.start as u64);
            }
        }
        let chunks: Vec<Chunk<'_>> = work
            .iter()
            .map(|w| Chunk {
                pages: &w.pages,
                start: w.start,
                tokens: self
                    .active
                    .get(&w.id)
                    .map_or(&[][..], |a| &a.tokens[w.start..w.start + w.len]),
                logits: logits_of(w),
                adapter: w.adapter,
            })
            .collect();
        self.metrics.batch_size.observe(work.len() as f64);
        self.metrics
            .batch_tokens
            .observe(work.iter().map(|w| w.len).sum::<usize>() as f64);
        if let Some(lockstep) = &mut self.lockstep {
            let plan = StepPlan::from_chunks(&chunks, self.engine.page_size());
            lockstep
                .send(&Message::Step(plan))
                .map_err(|e| broken(&e))?;
        }
        let stepped = self.engine.step(&chunks);
        drop(chunks);
        self.publish_collective_bytes();
        self.metrics
            .add_expert_rows(&self.engine.take_expert_rows());
        let logits = match stepped {
            Ok(logits) => logits,
            Err(e) if e.is_fatal() => {
                let peer = matches!(e, StepError::Collective { peer: true, .. });
                return Err(Failure {
                    message: e.to_string(),
                    peer,
                });
            }
            Err(e) => {
                tracing::error!(error = %e, "step failed; failing its requests");
                for w in work {
                    if let Some(active) = self.active.get(&w.id) {
                        let _ = active.events.send(Event::Failed(e.to_string()));
                    }
                    self.finish(w.id);
                }
                return Ok(());
            }
        };
        self.scheduler.complete(work);
        let vocab = self.engine.config().vocab;
        let mut rows = logits.chunks_exact(vocab);
        for w in work {
            let wanted = logits_of(w).rows(w.len).len();
            let mine: Vec<&[f32]> = rows.by_ref().take(wanted).collect();
            if w.score {
                self.score(w, &mine);
            }
            if w.sample
                && let Some(&last) = mine.last()
            {
                if self.active.get(&w.id).is_some_and(|a| a.max_tokens == 0) {
                    // Only scored: nothing to generate.
                    self.done(w.id, FinishReason::Length);
                } else {
                    self.take_token(w.id, last);
                }
            }
        }
        self.publish_gauges();
        Ok(())
    }

    /// Scores the prompt tokens a chunk's rows predict (row `j`, at
    /// position `w.start + j`, gives token `w.start + j + 1` its
    /// log-probability); at the prompt's end tells the client.
    fn score(&mut self, w: &Work, rows: &[&[f32]]) {
        let tokenizer = &self.tokenizer;
        let Some(active) = self.active.get_mut(&w.id) else {
            return;
        };
        let top = active.prompt_logprobs.unwrap_or(0);
        for (j, row) in rows.iter().enumerate() {
            let next = w.start + j + 1;
            if next >= active.prompt_len {
                break;
            }
            let decodable = &row[..tokenizer.vocab().min(row.len())];
            let scored = token_logprobs(tokenizer, decodable, active.tokens[next], top);
            active.scored.push(scored);
        }
        if w.start + w.len == active.prompt_len {
            self.metrics
                .prompt_tokens_scored
                .inc_by(active.scored.len() as u64);
            let prompt = PromptLogprobs {
                first: tokenizer.token_bytes(active.tokens[0]),
                scored: std::mem::take(&mut active.scored),
            };
            let _ = active.events.send(Event::PromptLogprobs(prompt));
        }
    }

    /// The collective payload counters (a leader's; zero otherwise).
    fn publish_collective_bytes(&self) {
        let Some(lockstep) = &self.lockstep else {
            return;
        };
        let (exchanged, gathered) = self.engine.expert_parallel_bytes();
        self.metrics
            .set_collective_bytes("plan", lockstep.bytes_sent());
        self.metrics
            .set_collective_bytes("expert_exchange", exchanged);
        self.metrics.set_collective_bytes("all_gather", gathered);
    }

    /// Samples request `id`'s next token from `logits` and tells the client.
    fn take_token(&mut self, id: RequestId, logits: &[f32]) {
        let context = self.engine.context();
        let tokenizer = &self.tokenizer;
        let Some(active) = self.active.get_mut(&id) else {
            return;
        };
        let decodable = &logits[..tokenizer.vocab().min(logits.len())];
        let early = active.generated() < active.min_tokens;
        let banned = if early && !active.ignore_eos {
            tokenizer.eos_ids()
        } else {
            &[]
        };
        let token = active.sampler.sample_excluding(decodable, banned);
        active.tokens.push(token);
        self.scheduler.append(id, token);
        let now = Instant::now();
        match active.last_token {
            None => self
                .metrics
                .time_to_first_token
                .observe((now - active.accepted).as_secs_f64()),
            Some(last) => self
                .metrics
                .inter_token_latency
                .observe((now - last).as_secs_f64()),
        }
        active.last_token = Some(now);
        self.metrics.generation_tokens.inc();
        // An end-of-sequence token adds no text, and ends the completion
        // unless told to ignore it.
        let special = tokenizer.is_eos(token);
        let eos = special && !active.ignore_eos;
        if let Some(top) = active.logprobs
            && !eos
        {
            let scored = token_logprobs(tokenizer, decodable, token, top);
            let _ = active.events.send(Event::Logprobs(scored));
        }
        let delta = if special {
            Delta::default()
        } else {
            // Stop strings count from min_tokens on (as vLLM checks them).
            let check_stops = active.generated() >= active.min_tokens;
            active
                .text
                .push_checked(&tokenizer.token_bytes(token), check_stops)
        };
        let finish = if delta.stopped || eos {
            Some(FinishReason::Stop)
        } else if active.generated() >= active.max_tokens || active.tokens.len() >= context {
            Some(FinishReason::Length)
        } else {
            None
        };
        let mut text = delta.text;
        if finish.is_some() && !delta.stopped {
            text.push_str(&active.text.finish());
        }
        // A failed send means the client is gone; the next step cancels it.
        if !text.is_empty() {
            let _ = active.events.send(Event::Text(text));
        }
        if let Some(finish) = finish {
            self.done(id, finish);
        }
    }

    /// Ends request `id` (`finish`, with its usage): its pages are freed and
    /// the gauges updated before the client hears it is done, so one that
    /// reads /metrics right after its response does not still count itself
    /// in flight.
    fn done(&mut self, id: RequestId, finish: FinishReason) {
        let Some(active) = self.active.get(&id) else {
            return;
        };
        let done = Event::Done {
            finish,
            usage: Usage {
                prompt_tokens: active.prompt_len,
                cached_tokens: active.cached_tokens,
                completion_tokens: active.generated(),
            },
        };
        let events = active.events.clone();
        self.finish(id);
        self.publish_gauges();
        let _ = events.send(done);
    }

    fn publish_gauges(&self) {
        let m = &self.metrics;
        let (waiting, running) = (self.scheduler.waiting(), self.scheduler.running());
        m.queue_depth.set(waiting as i64);
        m.running.set(running as i64);
        m.inflight.set((waiting + running) as i64);
        let used = self.scheduler.pages_used();
        m.kv_pages_used.set(used as i64);
        let total = m.kv_pages_total.get();
        m.kv_cache_usage.set(if total > 0 {
            used as f64 / total as f64
        } else {
            0.0
        });
        m.kv_pages_cached.set(self.scheduler.pages_cached() as i64);
        self.pages_used.store(used, Ordering::Release);
    }
}
