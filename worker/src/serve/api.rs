//! The OpenAI-compatible request bodies, their checks, and the error body.
//!
//! Parsing is lenient where the OpenAI clients are (unknown fields, such
//! as `user`, are ignored) and strict where a silent ignore would change
//! the answer (a field this server does not implement is refused by name,
//! never dropped).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::serve::logprobs::{MAX_CHAT_TOP, MAX_COMPLETION_TOP};
use crate::serve::runner::GenerationRequest;
use crate::serve::sampler::SamplingParams;
use crate::serve::text::Tokenizer;

/// Default `max_tokens` of `/v1/completions` (OpenAI's legacy default);
/// chat completions default to the rest of the context.
pub const DEFAULT_COMPLETION_TOKENS: usize = 16;
/// OpenAI allows at most four stop strings.
const MAX_STOPS: usize = 4;
/// Choices one request may ask for (`n`), OpenAI's bound.
pub const MAX_CHOICES: usize = 128;
/// Choices one request may make in all (prompts × `n`): a batch of prompts
/// from an evaluation harness fits, and each choice still takes a place
/// in the queue.
pub const MAX_TOTAL_CHOICES: usize = 256;

/// An error as the OpenAI API reports it:
/// `{"error": {"message", "type", "param", "code"}}`.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
            retry_after: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("the model `{model}` does not exist"),
            kind: "invalid_request_error",
            param: Some("model"),
            code: Some("model_not_found"),
            retry_after: None,
        }
    }

    pub fn overloaded(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: message.into(),
            kind: "rate_limit_error",
            param: None,
            code: Some("rate_limit_exceeded"),
            retry_after: Some(1),
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
            retry_after: Some(5),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
            retry_after: None,
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = json_response(self.status, &self.body());
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// A JSON body with its content type (axum's `Json` needs a feature that
/// pulls in another crate for what is one `to_string`).
pub fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// `prompt`: a string, token ids, or a batch of either (each prompt gets
/// its own `n` choices).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<i64>),
    TokenLists(Vec<Vec<i64>>),
}

/// One prompt of a request, as given.
enum OnePrompt {
    Text(String),
    Tokens(Vec<i64>),
}

impl Prompt {
    fn split(self) -> Vec<OnePrompt> {
        match self {
            Self::Text(text) => vec![OnePrompt::Text(text)],
            Self::Texts(texts) => texts.into_iter().map(OnePrompt::Text).collect(),
            Self::Tokens(ids) => vec![OnePrompt::Tokens(ids)],
            Self::TokenLists(lists) => lists.into_iter().map(OnePrompt::Tokens).collect(),
        }
    }
}

impl OnePrompt {
    /// Its text as given (token ids: their bytes, decoded), for `echo`.
    fn text(&self, tokenizer: &Tokenizer) -> String {
        match self {
            Self::Text(text) => text.clone(),
            Self::Tokens(ids) => {
                let bytes: Vec<u8> = ids
                    .iter()
                    .filter_map(|&id| u32::try_from(id).ok())
                    .flat_map(|id| tokenizer.token_bytes(id))
                    .collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
        }
    }

    fn tokens(self, tokenizer: &Tokenizer) -> Result<Vec<u32>, ApiError> {
        match self {
            Self::Text(text) => tokenizer
                .encode(&text)
                .map_err(|e| ApiError::invalid(e, Some("prompt"))),
            Self::Tokens(ids) => ids
                .iter()
                .map(|&id| {
                    u32::try_from(id)
                        .ok()
                        .filter(|&t| (t as usize) < tokenizer.vocab())
                        .ok_or_else(|| {
                            ApiError::invalid(
                                format!("prompt: token id {id} is outside the vocabulary"),
                                Some("prompt"),
                            )
                        })
                })
                .collect(),
        }
    }
}

/// `stop`: one string or several.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// The sampling fields both endpoints share.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Sampling {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    /// The chat endpoint's newer name for `max_tokens`.
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// vLLM's extension; -1 or 0 is off.
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<i64>,
    /// Completions: how many alternatives (0–5); chat: whether to report.
    pub logprobs: Option<Value>,
    /// Chat: how many alternatives (0–20), with `logprobs: true`.
    pub top_logprobs: Option<i64>,
    pub echo: Option<bool>,
    /// Token id (as a string, OpenAI's JSON) → bias in [-100, 100].
    pub logit_bias: Option<std::collections::BTreeMap<String, f64>>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    /// vLLM's extensions, which benchmark clients send: generate through
    /// end-of-sequence tokens; generate at least this many tokens.
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<i64>,
}

/// OpenAI's `stream_options`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// A last chunk, before `[DONE]`, with no choices and the `usage`.
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    /// Text after the completion (insertion): refused, not implemented.
    pub suffix: Option<String>,
    /// The best of this many samples, chosen on the server: refused above
    /// `n` (vLLM's current engine dropped it too).
    pub best_of: Option<i64>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    /// Tool calling (and its older form, functions): refused, not implemented.
    pub tools: Option<Vec<Value>>,
    pub functions: Option<Vec<Value>>,
    /// `{"type": "text"}` only: JSON modes need constrained decoding.
    pub response_format: Option<Value>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Content,
}

/// Message content: a string, or parts of which only text is supported.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Clone, Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// Parses a request body: UTF-8 first (its own error), then JSON.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::invalid(format!("the request body is not valid UTF-8 ({e})"), None)
    })?;
    serde_json::from_str(text).map_err(|e| {
        ApiError::invalid(
            format!("the request body is not a valid request: {e}"),
            None,
        )
    })
}

/// A request checked against the served model.
#[derive(Clone, Debug)]
pub struct Checked {
    /// One per prompt (completions take a batch), each its choices' template.
    pub requests: Vec<GenerationRequest>,
    /// Choices to generate for each prompt (`n`).
    pub n: usize,
    pub stream: bool,
    /// Streaming ends with a `usage` chunk (`stream_options.include_usage`).
    pub include_usage: bool,
    /// Completions' `echo`: each prompt, as text, before its choices' text.
    pub echo: Option<Vec<String>>,
    /// The model it named: the name responses carry.
    pub model: String,
}

/// The model and generation limits a request is checked against.
#[derive(Clone, Copy, Debug)]
pub struct Served<'a> {
    pub name: &'a str,
    /// The adapters served beside the model (`serve/adapters.rs`), by
    /// name; a request naming adapter `i` runs with the engine's `i`th.
    pub adapters: &'a [String],
    pub tokenizer: &'a Tokenizer,
    pub context: usize,
}

impl Served<'_> {
    /// The name of the model `adapter` selects (`None`: the base model).
    pub fn model_name(&self, adapter: Option<usize>) -> &str {
        adapter.map_or(self.name, |a| &self.adapters[a])
    }
}

impl CompletionRequest {
    pub fn check(mut self, served: Served<'_>) -> Result<Checked, ApiError> {
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid(
                "suffix: inserting a completion before a suffix is not supported by this server",
                Some("suffix"),
            ));
        }
        let n = self.sampling.n.unwrap_or(1);
        if let Some(best_of) = self.best_of
            && best_of != 1
            && best_of != n
        {
            return Err(ApiError::invalid(
                format!(
                    "best_of: {best_of} is not supported (only best_of equal to n); ask for n \
                     choices with logprobs and choose among them"
                ),
                Some("best_of"),
            ));
        }
        let prompts = self.prompt.split();
        if prompts.is_empty() {
            return Err(ApiError::invalid(
                "prompt: at least one prompt is required",
                Some("prompt"),
            ));
        }
        let echo = self.sampling.echo.take() == Some(true);
        let echo = echo.then(|| {
            prompts
                .iter()
                .map(|p| p.text(served.tokenizer))
                .collect::<Vec<_>>()
        });
        let prompts = prompts
            .into_iter()
            .map(|p| p.tokens(served.tokenizer))
            .collect::<Result<Vec<_>, _>>()?;
        let logprobs = match &self.sampling.logprobs {
            None | Some(Value::Null) | Some(Value::Bool(false)) => None,
            Some(v) => Some(
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .filter(|&n| n <= MAX_COMPLETION_TOP)
                    .ok_or_else(|| {
                        ApiError::invalid(
                            format!(
                                "logprobs: {v} is not a number of alternatives from 0 to {MAX_COMPLETION_TOP}"
                            ),
                            Some("logprobs"),
                        )
                    })?,
            ),
        };
        // Echo with logprobs reports the prompt's log-probabilities too
        // (what evaluation harnesses score, often with max_tokens 0).
        let score = if echo.is_some() { logprobs } else { None };
        let mut checked = self.sampling.check(
            prompts,
            Some(DEFAULT_COMPLETION_TOKENS),
            served,
            logprobs,
            score,
        )?;
        checked.echo = echo;
        Ok(checked)
    }
}

/// A chat's prompt: its messages (text content only) through the model's
/// chat template.
fn chat_prompt(messages: Vec<ChatMessage>, tokenizer: &Tokenizer) -> Result<Vec<u32>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages: at least one message is required",
            Some("messages"),
        ));
    }
    let mut turns = Vec::with_capacity(messages.len());
    for message in messages {
        let content = match message.content {
            Content::Text(text) => text,
            Content::Parts(parts) => {
                let mut text = String::new();
                for part in parts {
                    match (part.kind.as_str(), part.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => {
                            return Err(ApiError::invalid(
                                format!(
                                    "messages: content parts of type {kind:?} are not supported"
                                ),
                                Some("messages"),
                            ));
                        }
                    }
                }
                text
            }
        };
        turns.push((message.role, content));
    }
    tokenizer
        .encode_chat(&turns)
        .map_err(|e| ApiError::invalid(e, Some("messages")))
}

/// vLLM's `/tokenize`: a completion's `prompt` (one string) or a chat's
/// `messages`, as the generating endpoints would tokenise them.
#[derive(Clone, Debug, Deserialize)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
}

/// vLLM's `/detokenize`: token ids back to text.
#[derive(Clone, Debug, Deserialize)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<i64>,
}

impl TokenizeRequest {
    /// The token ids (the error names the field).
    pub fn check(self, served: Served<'_>) -> Result<Vec<u32>, ApiError> {
        check_model(self.model.as_deref(), served)?;
        match (self.prompt, self.messages) {
            (Some(prompt), None) => OnePrompt::Text(prompt).tokens(served.tokenizer),
            (None, Some(messages)) => chat_prompt(messages, served.tokenizer),
            _ => Err(ApiError::invalid(
                "prompt: give either a prompt or messages",
                Some("prompt"),
            )),
        }
    }
}

impl DetokenizeRequest {
    /// The text of the ids (bytes that are not UTF-8 become U+FFFD).
    pub fn check(self, served: Served<'_>) -> Result<String, ApiError> {
        check_model(self.model.as_deref(), served)?;
        let mut bytes = Vec::new();
        for id in self.tokens {
            let token = u32::try_from(id)
                .ok()
                .filter(|&t| (t as usize) < served.tokenizer.vocab())
                .ok_or_else(|| {
                    ApiError::invalid(
                        format!("tokens: token id {id} is outside the vocabulary"),
                        Some("tokens"),
                    )
                })?;
            bytes.extend(served.tokenizer.token_bytes(token));
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// The adapter a request's `model` names (`None`: the base model, also
/// when it names none); a model served neither way is a 404.
fn check_model(model: Option<&str>, served: Served<'_>) -> Result<Option<usize>, ApiError> {
    match model {
        None => Ok(None),
        Some(model) if model == served.name => Ok(None),
        Some(model) => match served.adapters.iter().position(|a| a == model) {
            Some(adapter) => Ok(Some(adapter)),
            None => Err(ApiError::model_not_found(model)),
        },
    }
}

impl ChatRequest {
    pub fn check(self, served: Served<'_>) -> Result<Checked, ApiError> {
        for (field, given) in [("tools", &self.tools), ("functions", &self.functions)] {
            if given.as_ref().is_some_and(|list| !list.is_empty()) {
                return Err(ApiError::invalid(
                    format!("{field}: tool calling is not supported by this server"),
                    Some(field),
                ));
            }
        }
        if let Some(format) = &self.response_format
            && format["type"] != "text"
        {
            return Err(ApiError::invalid(
                format!(
                    "response_format: {} is not supported (only {{\"type\": \"text\"}}: JSON \
                     output needs constrained decoding, which this server does not do)",
                    format["type"]
                ),
                Some("response_format"),
            ));
        }
        let prompt = chat_prompt(self.messages, served.tokenizer)?;
        let logprobs = self.sampling.chat_logprobs()?;
        // No max_tokens: the rest of the context.
        self.sampling
            .check(vec![prompt], None, served, logprobs, None)
    }
}

impl Sampling {
    /// Chat's `logprobs` (a boolean) and `top_logprobs` (0–20, only with it).
    fn chat_logprobs(&self) -> Result<Option<usize>, ApiError> {
        let wanted = match &self.logprobs {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(ApiError::invalid(
                    format!("logprobs: {v} is not a boolean"),
                    Some("logprobs"),
                ));
            }
        };
        let top = match self.top_logprobs {
            None => 0,
            Some(n) => usize::try_from(n)
                .ok()
                .filter(|&n| n <= MAX_CHAT_TOP && wanted)
                .ok_or_else(|| {
                    ApiError::invalid(
                        format!(
                            "top_logprobs: {n} must be from 0 to {MAX_CHAT_TOP}, with logprobs: true"
                        ),
                        Some("top_logprobs"),
                    )
                })?,
        };
        Ok(wanted.then_some(top))
    }

    /// Checks the shared fields and makes each prompt's request.
    /// `default_max_tokens`: `None` is the rest of the context; `score`:
    /// alternatives per prompt token when the prompt's log-probabilities
    /// are wanted (then `max_tokens` may be 0: score, do not generate).
    fn check(
        self,
        prompts: Vec<Vec<u32>>,
        default_max_tokens: Option<usize>,
        served: Served<'_>,
        logprobs: Option<usize>,
        score: Option<usize>,
    ) -> Result<Checked, ApiError> {
        let adapter = check_model(self.model.as_deref(), served)?;
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            None => default_max_tokens,
            Some(n) if n >= 1 => Some(usize::try_from(n).unwrap_or(usize::MAX)),
            Some(0) if score.is_some() => Some(0),
            Some(n) => {
                return Err(ApiError::invalid(
                    format!(
                        "max_tokens: {n} is not a positive number of tokens (0 only scores the \
                         prompt: with echo and logprobs)"
                    ),
                    Some("max_tokens"),
                ));
            }
        };
        for prompt in &prompts {
            if prompt.is_empty() {
                return Err(ApiError::invalid(
                    "prompt: must not be empty",
                    Some("prompt"),
                ));
            }
            // Scoring only (max_tokens 0) may fill the context; a completion
            // needs a position left for its first token.
            if prompt.len() > served.context
                || (prompt.len() == served.context && max_tokens != Some(0))
            {
                return Err(ApiError::invalid(
                    format!(
                        "this model's context is {} tokens, and the prompt has {} (prompt and completion share the context); shorten the prompt",
                        served.context,
                        prompt.len()
                    ),
                    Some("prompt"),
                )
                .with_code("context_length_exceeded"));
            }
        }
        let n = match self.n {
            None => 1,
            Some(n) => usize::try_from(n)
                .ok()
                .filter(|n| (1..=MAX_CHOICES).contains(n))
                .ok_or_else(|| {
                    ApiError::invalid(
                        format!("n: {n} is not a number of choices from 1 to {MAX_CHOICES}"),
                        Some("n"),
                    )
                })?,
        };
        if prompts.len() * n > MAX_TOTAL_CHOICES {
            return Err(ApiError::invalid(
                format!(
                    "prompt: {} prompts with n {n} make {} choices, more than the {MAX_TOTAL_CHOICES} \
                     one request may make; send fewer prompts per request",
                    prompts.len(),
                    prompts.len() * n
                ),
                Some("prompt"),
            ));
        }
        if self.echo == Some(true) {
            return Err(ApiError::invalid(
                "echo: only /v1/completions echoes the prompt",
                Some("echo"),
            ));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                format!("temperature: {temperature} is outside [0, 2]"),
                Some("temperature"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                format!("top_p: {top_p} is outside (0, 1]"),
                Some("top_p"),
            ));
        }
        let top_k = match self.top_k.unwrap_or(0) {
            -1 | 0 => 0,
            k if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
            k => {
                return Err(ApiError::invalid(
                    format!("top_k: {k} is neither positive nor -1 (off)"),
                    Some("top_k"),
                ));
            }
        };
        let stops = match self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(list)) => list,
        };
        if stops.len() > MAX_STOPS {
            return Err(ApiError::invalid(
                format!("stop: at most {MAX_STOPS} stop strings"),
                Some("stop"),
            ));
        }
        let penalty = |value: Option<f64>, name: &'static str| match value {
            None => Ok(0.0),
            Some(p) if (-2.0..=2.0).contains(&p) => Ok(p as f32),
            Some(p) => Err(ApiError::invalid(
                format!("{name}: {p} is outside [-2, 2]"),
                Some(name),
            )),
        };
        let presence_penalty = penalty(self.presence_penalty, "presence_penalty")?;
        let frequency_penalty = penalty(self.frequency_penalty, "frequency_penalty")?;
        let mut logit_bias = Vec::new();
        for (token, bias) in self.logit_bias.unwrap_or_default() {
            let id = token
                .parse::<u32>()
                .ok()
                .filter(|&id| (id as usize) < served.tokenizer.vocab())
                .ok_or_else(|| {
                    ApiError::invalid(
                        format!("logit_bias: {token:?} is not a token id of this model"),
                        Some("logit_bias"),
                    )
                })?;
            if !(-100.0..=100.0).contains(&bias) {
                return Err(ApiError::invalid(
                    format!("logit_bias: {bias} for token {id} is outside [-100, 100]"),
                    Some("logit_bias"),
                ));
            }
            logit_bias.push((id, bias as f32));
        }
        let min_tokens = match self.min_tokens {
            None => 0,
            Some(m) => {
                let most = max_tokens.unwrap_or(usize::MAX);
                usize::try_from(m)
                    .ok()
                    .filter(|&m| m <= most)
                    .ok_or_else(|| {
                        ApiError::invalid(
                            format!("min_tokens: {m} is not from 0 to max_tokens"),
                            Some("min_tokens"),
                        )
                    })?
            }
        };
        // Without a seed each request draws differently (time and a counter).
        let seed = self.seed.map_or_else(fresh_seed, |s| s as u64);
        let sampling = SamplingParams {
            temperature,
            top_p,
            top_k,
            seed,
            logit_bias,
            presence_penalty,
            frequency_penalty,
        };
        let requests = prompts
            .into_iter()
            .map(|prompt| GenerationRequest {
                max_tokens: max_tokens
                    .unwrap_or_else(|| served.context.saturating_sub(prompt.len()).max(1)),
                prompt,
                sampling: sampling.clone(),
                stops: stops.clone(),
                logprobs,
                prompt_logprobs: score,
                ignore_eos: self.ignore_eos.unwrap_or(false),
                min_tokens,
                adapter,
            })
            .collect();
        Ok(Checked {
            requests,
            n,
            stream: self.stream,
            include_usage: self.stream_options.is_some_and(|o| o.include_usage),
            echo: None,
            model: served.model_name(adapter).to_owned(),
        })
    }
}

fn fresh_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVED: Served<'static> = Served {
        name: "tiny",
        adapters: &[],
        tokenizer: &Tokenizer::Bytes,
        context: 32,
    };

    #[test]
    fn a_request_naming_an_adapter_runs_with_it_and_answers_in_its_name() {
        let adapters = ["tiny-sql".to_owned(), "tiny-chat".to_owned()];
        let served = Served {
            adapters: &adapters,
            ..SERVED
        };
        let check = |body: &str| parse::<ChatRequest>(body.as_bytes())?.check(served);
        let chat = |model: &str| {
            format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#)
        };
        let named = check(&chat("tiny-chat")).unwrap();
        assert_eq!(
            (named.requests[0].adapter, named.model.as_str()),
            (Some(1), "tiny-chat")
        );
        let base = check(&chat("tiny")).unwrap();
        assert_eq!(
            (base.requests[0].adapter, base.model.as_str()),
            (None, "tiny")
        );
        let unnamed = check(r#"{"messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(unnamed.requests[0].adapter, None);
        let e = check(&chat("tiny-math")).unwrap_err();
        assert_eq!(e.code, Some("model_not_found"));
        // Without adapters, an adapter's name is no model.
        let e = parse::<ChatRequest>(chat("tiny-chat").as_bytes())
            .unwrap()
            .check(SERVED)
            .unwrap_err();
        assert_eq!(e.code, Some("model_not_found"));
    }

    fn completion(body: &str) -> Result<Checked, ApiError> {
        parse::<CompletionRequest>(body.as_bytes())?.check(SERVED)
    }

    #[test]
    fn a_plain_completion_gets_the_defaults() {
        let checked = completion(r#"{"model":"tiny","prompt":"ab","seed":7}"#).unwrap();
        let r = &checked.requests[0];
        assert_eq!(r.prompt, [97, 98]);
        assert_eq!(r.max_tokens, DEFAULT_COMPLETION_TOKENS);
        assert_eq!(r.sampling.seed, 7);
        assert_eq!(
            (r.sampling.temperature, r.sampling.top_p, r.sampling.top_k),
            (1.0, 1.0, 0)
        );
        assert!(!checked.stream);
        assert_eq!(checked.n, 1);
        assert_eq!(completion(r#"{"prompt":"a","n":3}"#).unwrap().n, 3);
        let biased = completion(
            r#"{"prompt":"a","logit_bias":{"97":-5.5},"presence_penalty":0.5,"frequency_penalty":-1}"#,
        )
        .unwrap()
        .requests[0]
        .sampling
        .clone();
        assert_eq!(biased.logit_bias, [(97, -5.5)]);
        let bench = completion(r#"{"prompt":"a","max_tokens":9,"ignore_eos":true,"min_tokens":9}"#)
            .unwrap();
        assert_eq!(
            (bench.requests[0].ignore_eos, bench.requests[0].min_tokens),
            (true, 9)
        );
        assert_eq!(r.min_tokens, 0);
        assert!(!r.ignore_eos);
        assert_eq!(
            (biased.presence_penalty, biased.frequency_penalty),
            (0.5, -1.0)
        );
    }

    #[test]
    fn bad_fields_name_themselves() {
        let cases = [
            (r#"{"prompt":"a","max_tokens":0}"#, "max_tokens"),
            (r#"{"prompt":"a","max_tokens":-3}"#, "max_tokens"),
            (r#"{"prompt":"a","temperature":-1}"#, "temperature"),
            (r#"{"prompt":"a","top_p":0}"#, "top_p"),
            (r#"{"prompt":"a","top_k":-2}"#, "top_k"),
            (r#"{"prompt":"a","echo":true,"max_tokens":0}"#, "max_tokens"),
            (r#"{"prompt":[]}"#, "prompt"),
            (r#"{"prompt":["a",""]}"#, "prompt"),
            (r#"{"prompt":[[1],[1000]]}"#, "prompt"),
            (r#"{"prompt":["a","b","c"],"n":100}"#, "prompt"),
            (
                r#"{"prompt":"a","max_tokens":2,"min_tokens":3}"#,
                "min_tokens",
            ),
            (r#"{"prompt":"a","min_tokens":-1}"#, "min_tokens"),
            (r#"{"prompt":"a","n":0}"#, "n"),
            (r#"{"prompt":"a","suffix":"b"}"#, "suffix"),
            (r#"{"prompt":"a","best_of":3}"#, "best_of"),
            (r#"{"prompt":"a","n":2,"best_of":3}"#, "best_of"),
            (r#"{"prompt":"a","n":129}"#, "n"),
            (r#"{"prompt":"a","logit_bias":{"97":101}}"#, "logit_bias"),
            (r#"{"prompt":"a","logit_bias":{"1000":1}}"#, "logit_bias"),
            (r#"{"prompt":"a","logit_bias":{"x":1}}"#, "logit_bias"),
            (
                r#"{"prompt":"a","presence_penalty":2.5}"#,
                "presence_penalty",
            ),
            (
                r#"{"prompt":"a","frequency_penalty":-3}"#,
                "frequency_penalty",
            ),
            (r#"{"prompt":""}"#, "prompt"),
            (r#"{"prompt":[1000]}"#, "prompt"),
            (r#"{"prompt":"a","logprobs":6}"#, "logprobs"),
            (r#"{"prompt":"a","logprobs":-1}"#, "logprobs"),
            (r#"{"prompt":"a","logprobs":true}"#, "logprobs"),
        ];
        for (body, param) in cases {
            let e = completion(body).unwrap_err();
            assert_eq!(
                (e.status, e.param),
                (StatusCode::BAD_REQUEST, Some(param)),
                "{body}"
            );
        }
        let e = completion(r#"{"model":"other","prompt":"a"}"#).unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::NOT_FOUND, Some("model_not_found"))
        );
        let long = format!(r#"{{"prompt":"{}"}}"#, "x".repeat(32));
        assert_eq!(
            completion(&long).unwrap_err().code,
            Some("context_length_exceeded")
        );
        assert!(
            completion("{")
                .unwrap_err()
                .message
                .contains("not a valid request")
        );
        let e = parse::<CompletionRequest>(b"{\"prompt\":\"\xff\"}").unwrap_err();
        assert!(e.message.contains("UTF-8"));
    }

    #[test]
    fn chat_messages_become_a_transcript() {
        let body = r#"{"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"max_completion_tokens":3,"stop":"\n"}"#;
        let checked = parse::<ChatRequest>(body.as_bytes())
            .unwrap()
            .check(SERVED)
            .unwrap();
        assert_eq!(
            checked.requests[0].prompt,
            Tokenizer::Bytes.encode("user: hi\nassistant:").unwrap()
        );
        assert_eq!(checked.requests[0].max_tokens, 3);
        assert_eq!(checked.requests[0].stops, ["\n"]);
    }

    /// Completions take a count, chat a flag and `top_logprobs`.
    #[test]
    fn logprobs_in_both_shapes() {
        let count = |body: &str| completion(body).map(|c| c.requests[0].logprobs);
        assert_eq!(count(r#"{"prompt":"a"}"#).unwrap(), None);
        assert_eq!(count(r#"{"prompt":"a","logprobs":null}"#).unwrap(), None);
        assert_eq!(count(r#"{"prompt":"a","logprobs":0}"#).unwrap(), Some(0));
        assert_eq!(count(r#"{"prompt":"a","logprobs":5}"#).unwrap(), Some(5));
        let chat = |extra: &str| {
            let body = format!(r#"{{"messages":[{{"role":"user","content":"hi"}}]{extra}}}"#);
            parse::<ChatRequest>(body.as_bytes())?
                .check(SERVED)
                .map(|c| c.requests[0].logprobs)
        };
        assert_eq!(chat("").unwrap(), None);
        assert_eq!(chat(r#","logprobs":false"#).unwrap(), None);
        assert_eq!(chat(r#","logprobs":true"#).unwrap(), Some(0));
        assert_eq!(
            chat(r#","logprobs":true,"top_logprobs":20"#).unwrap(),
            Some(20)
        );
        for bad in [
            r#","logprobs":true,"top_logprobs":21"#,
            r#","top_logprobs":2"#,
            r#","logprobs":3"#,
        ] {
            let e = chat(bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    /// A batch of prompts (strings or token lists): one request each, the
    /// shared fields copied; echo keeps each prompt's text.
    #[test]
    fn a_batch_of_prompts_makes_one_request_each() {
        let checked =
            completion(r#"{"prompt":["ab","c"],"max_tokens":2,"echo":true,"seed":3}"#).unwrap();
        let prompts: Vec<&[u32]> = checked.requests.iter().map(|r| &r.prompt[..]).collect();
        assert_eq!(prompts, [&[97, 98][..], &[99][..]]);
        assert!(
            checked
                .requests
                .iter()
                .all(|r| r.max_tokens == 2 && r.sampling.seed == 3)
        );
        assert_eq!(checked.echo.unwrap(), ["ab", "c"]);
        let lists = completion(r#"{"prompt":[[104,105],[33]]}"#).unwrap();
        assert_eq!(lists.requests.len(), 2);
        assert_eq!(lists.requests[1].prompt, [33]);
        let ids = completion(r#"{"prompt":[104,105]}"#).unwrap();
        assert_eq!(ids.requests.len(), 1);
    }

    /// Echo with logprobs scores the prompt (and max_tokens 0 only scores
    /// it); either alone does not.
    #[test]
    fn echo_with_logprobs_scores_the_prompt() {
        let scored = |body: &str| {
            completion(body).map(|c| {
                let r = &c.requests[0];
                (r.prompt_logprobs, r.logprobs, r.max_tokens)
            })
        };
        assert_eq!(
            scored(r#"{"prompt":"ab","echo":true,"logprobs":2,"max_tokens":0}"#).unwrap(),
            (Some(2), Some(2), 0)
        );
        assert_eq!(
            scored(r#"{"prompt":"ab","echo":true,"logprobs":0,"max_tokens":1}"#).unwrap(),
            (Some(0), Some(0), 1)
        );
        assert_eq!(
            scored(r#"{"prompt":"ab","echo":true}"#).unwrap(),
            (None, None, DEFAULT_COMPLETION_TOKENS)
        );
        assert_eq!(
            scored(r#"{"prompt":"ab","logprobs":1}"#).unwrap(),
            (None, Some(1), DEFAULT_COMPLETION_TOKENS)
        );
        assert_eq!(
            scored(r#"{"prompt":"ab","logprobs":1,"max_tokens":0}"#)
                .unwrap_err()
                .param,
            Some("max_tokens")
        );
    }

    /// Fields that would change the answer, which this server does not
    /// implement, are refused by name; their no-op forms pass.
    #[test]
    fn unimplemented_fields_are_refused_not_ignored() {
        let chat = |extra: &str| {
            let body = format!(r#"{{"messages":[{{"role":"user","content":"hi"}}]{extra}}}"#);
            parse::<ChatRequest>(body.as_bytes())?.check(SERVED)
        };
        for (extra, param) in [
            (
                r#","tools":[{"type":"function","function":{"name":"f"}}]"#,
                "tools",
            ),
            (r#","functions":[{"name":"f"}]"#, "functions"),
            (
                r#","response_format":{"type":"json_object"}"#,
                "response_format",
            ),
        ] {
            let e = chat(extra).unwrap_err();
            assert_eq!(
                (e.status, e.param),
                (StatusCode::BAD_REQUEST, Some(param)),
                "{extra}"
            );
        }
        for fine in [r#","tools":[]"#, r#","response_format":{"type":"text"}"#] {
            assert!(chat(fine).is_ok(), "{fine}");
        }
        assert!(completion(r#"{"prompt":"a","suffix":""}"#).is_ok());
        assert!(completion(r#"{"prompt":"a","best_of":1}"#).is_ok());
        assert_eq!(
            completion(r#"{"prompt":"a","n":3,"best_of":3}"#).unwrap().n,
            3
        );
    }
}
