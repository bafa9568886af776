//! The server's Prometheus metrics, all under `moe_serving_`. The
//! autoscaler reads `moe_serving_inflight_requests` (the operator's
//! `CONCURRENCY_METRIC`): requests accepted and not yet answered.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::serve::rebalance::LayerRebalance;

/// One HTTP response, by route and status code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: String,
    pub status: u16,
}

/// The model a request named: the base model's name or an adapter's.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

/// The LoRA adapters a server holds, as the Gateway API Inference
/// Extension's endpoint picker reads them (its model server protocol,
/// vLLM's `lora_requests_info`): every adapter is loaded at startup and
/// stays, so all are running and none waits to load.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoraInfoLabels {
    /// Adapters one batch may mix: all of them.
    pub max_lora: String,
    /// Comma-separated.
    pub running_lora_adapters: String,
    pub waiting_lora_adapters: String,
}

/// Payload bytes of one kind of expert-parallel collective.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CollectiveLabels {
    /// `plan` (the leader's step plans), `expert_exchange` (dispatch and
    /// combine), `all_gather` (the rows after each MoE layer),
    /// `expert_weights` (expert copies moved by a rebalance).
    pub kind: String,
}

/// One routed expert of one MoE layer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExpertLabels {
    /// The decoder layer (0-based, as in `model.layers.{i}`).
    pub layer: String,
    /// The routed expert (its global index).
    pub expert: String,
}

/// How evenly one MoE layer's load fell on the ranks of a replica.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ImbalanceLabels {
    /// The decoder layer.
    pub layer: String,
    /// `served`: as the expert copies were placed while the load was
    /// routed; `chosen`: the same load under the copies chosen from it.
    pub placement: String,
}

/// Cheap to clone: every metric is a shared atomic.
#[derive(Clone)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    /// Generating requests accepted, by the model they named (the base
    /// model or a LoRA adapter: `serve/adapters.rs`).
    pub model_requests: Family<ModelLabels, Counter>,
    /// The adapters held (value: when it was set, unix seconds, so a
    /// reader takes the newest series).
    pub lora_requests_info: Family<LoraInfoLabels, Gauge>,
    pub prompt_tokens: Counter,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub prompt_tokens_cached: Counter,
    /// Prompt tokens given their log-probabilities (echo with logprobs).
    pub prompt_tokens_scored: Counter,
    pub generation_tokens: Counter,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    /// Sequences in one step.
    pub batch_size: Histogram,
    /// Tokens fed into one step (prefill chunks and decodes).
    pub batch_tokens: Histogram,
    pub queue_depth: Gauge,
    pub running: Gauge,
    pub inflight: Gauge,
    pub kv_pages_used: Gauge,
    pub kv_pages_total: Gauge,
    /// Pages no sequence holds, kept for the prefix they hold.
    pub kv_pages_cached: Gauge,
    /// Pages held by sequences over all pages (0 to 1): what an endpoint
    /// picker of the Gateway API Inference Extension reads as KV-cache use.
    pub kv_cache_usage: Gauge<f64, AtomicU64>,
    /// Expert-parallel payload bytes this rank sent to the others (the
    /// leader's plans; every rank's expert exchanges and all-gathers).
    pub collective_bytes: Family<CollectiveLabels, Counter>,
    /// Token rows each routed expert held by this process computed.
    pub expert_tokens: Family<ExpertLabels, Counter>,
    /// Times the expert copies were chosen again.
    pub expert_rebalances: Counter,
    /// The busiest rank's expected rows over the mean, per MoE layer, for
    /// the last rebalance's window.
    pub expert_load_imbalance: Family<ImbalanceLabels, Gauge<f64, AtomicU64>>,
    registry: std::sync::Arc<Registry>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("moe_serving");
        let requests = Family::<RequestLabels, Counter>::default();
        let model_requests = Family::<ModelLabels, Counter>::default();
        let lora_requests_info = Family::<LoraInfoLabels, Gauge>::default();
        let prompt_tokens = Counter::default();
        let prompt_tokens_cached = Counter::default();
        let prompt_tokens_scored = Counter::default();
        let generation_tokens = Counter::default();
        // 1 ms to about 33 s: a CPU token takes milliseconds, a long queue seconds.
        let time_to_first_token = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let inter_token_latency = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        let batch_tokens = Histogram::new(exponential_buckets(1.0, 2.0, 16));
        let [
            queue_depth,
            running,
            inflight,
            kv_pages_used,
            kv_pages_total,
            kv_pages_cached,
        ] = std::array::from_fn(|_| Gauge::default());
        registry.register(
            "requests",
            "HTTP responses by endpoint and status code",
            requests.clone(),
        );
        registry.register(
            "lora_requests_info",
            "The LoRA adapters served (labels; the value is when they were set, unix seconds), as endpoint pickers read vLLM's lora_requests_info",
            lora_requests_info.clone(),
        );
        registry.register(
            "model_requests",
            "Generating requests accepted, by the model they named (the base model or a LoRA adapter)",
            model_requests.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens of admitted requests",
            prompt_tokens.clone(),
        );
        registry.register(
            "prompt_tokens_cached",
            "Prompt tokens of admitted requests whose KV cache was reused from a prefix served before",
            prompt_tokens_cached.clone(),
        );
        registry.register(
            "prompt_tokens_scored",
            "Prompt tokens given their log-probabilities (completions with echo and logprobs: evaluation traffic)",
            prompt_tokens_scored.clone(),
        );
        registry.register(
            "generation_tokens",
            "Tokens generated",
            generation_tokens.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "From accepting a request to its first token",
            time_to_first_token.clone(),
        );
        registry.register(
            "inter_token_latency_seconds",
            "Between consecutive tokens of one request",
            inter_token_latency.clone(),
        );
        registry.register("batch_size", "Sequences per step", batch_size.clone());
        registry.register("batch_tokens", "Tokens per step", batch_tokens.clone());
        registry.register(
            "queue_depth",
            "Requests waiting for admission",
            queue_depth.clone(),
        );
        registry.register(
            "running_requests",
            "Sequences in the running batch",
            running.clone(),
        );
        registry.register(
            "inflight_requests",
            "Requests accepted and not yet answered (waiting or running)",
            inflight.clone(),
        );
        registry.register(
            "kv_cache_pages_used",
            "KV cache pages held by sequences",
            kv_pages_used.clone(),
        );
        registry.register(
            "kv_cache_pages_total",
            "KV cache pages in the pool",
            kv_pages_total.clone(),
        );
        registry.register(
            "kv_cache_pages_cached",
            "KV cache pages no sequence holds, kept for the prefix they hold (reused or evicted as needed)",
            kv_pages_cached.clone(),
        );
        let collective_bytes = Family::<CollectiveLabels, Counter>::default();
        registry.register(
            "collective_bytes",
            "Expert-parallel payload bytes this rank sent to the replica's other ranks, by kind",
            collective_bytes.clone(),
        );
        let expert_tokens = Family::<ExpertLabels, Counter>::default();
        registry.register(
            "expert_tokens",
            "Token rows each routed expert held by this process computed, by decoder layer and expert (the expert load; on an expert-parallel replica each rank counts its own experts)",
            expert_tokens.clone(),
        );
        let kv_cache_usage = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "kv_cache_usage_ratio",
            "KV cache pages held by sequences over all pages, 0 to 1 (an endpoint picker's KV-cache use)",
            kv_cache_usage.clone(),
        );
        let expert_rebalances = Counter::default();
        registry.register(
            "expert_rebalances",
            "Times an expert-parallel replica chose its redundant experts again from the routed load",
            expert_rebalances.clone(),
        );
        let expert_load_imbalance = Family::<ImbalanceLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "expert_load_imbalance",
            "The busiest rank's share of the last rebalance window's routed rows over the mean rank's, by MoE layer: as served (placement=served) and under the copies chosen from that load (placement=chosen); 1 is even",
            expert_load_imbalance.clone(),
        );
        Self {
            requests,
            model_requests,
            lora_requests_info,
            prompt_tokens,
            prompt_tokens_cached,
            prompt_tokens_scored,
            generation_tokens,
            time_to_first_token,
            inter_token_latency,
            batch_size,
            batch_tokens,
            queue_depth,
            running,
            inflight,
            kv_pages_used,
            kv_pages_total,
            kv_pages_cached,
            collective_bytes,
            expert_tokens,
            expert_rebalances,
            expert_load_imbalance,
            kv_cache_usage,
            registry: std::sync::Arc::new(registry),
        }
    }

    /// Says which adapters the server holds (none: no series).
    pub fn set_adapters(&self, names: &[String]) {
        if names.is_empty() {
            return;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.lora_requests_info
            .get_or_create(&LoraInfoLabels {
                max_lora: names.len().to_string(),
                running_lora_adapters: names.join(","),
                waiting_lora_adapters: String::new(),
            })
            .set(i64::try_from(now).unwrap_or(i64::MAX));
    }

    /// Counts one generating request for `model` (the base model's name or
    /// an adapter's).
    pub fn model_request(&self, model: &str) {
        self.model_requests
            .get_or_create(&ModelLabels {
                model: model.to_owned(),
            })
            .inc();
    }

    /// Counts one HTTP response.
    pub fn response(&self, endpoint: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                endpoint: endpoint.to_owned(),
                status,
            })
            .inc();
    }

    /// Brings the `kind` collective byte counter up to `total`, a running
    /// total kept by the exchange itself.
    pub fn set_collective_bytes(&self, kind: &str, total: u64) {
        let counter = self
            .collective_bytes
            .get_or_create(&CollectiveLabels { kind: kind.into() });
        counter.inc_by(total.saturating_sub(counter.get()));
    }

    /// Adds the rows experts computed, as [`crate::serve::engine::Engine::take_expert_rows`]
    /// gives them: `(layer, expert, rows)`.
    pub fn add_expert_rows(&self, rows: &[(usize, usize, u64)]) {
        for &(layer, expert, n) in rows {
            self.expert_tokens
                .get_or_create(&ExpertLabels {
                    layer: layer.to_string(),
                    expert: expert.to_string(),
                })
                .inc_by(n);
        }
    }

    /// Records a rebalance: the imbalance of each layer's window before and
    /// after, and the weight bytes this rank sent (`collective_bytes` of
    /// kind `expert_weights`).
    pub fn record_rebalance(&self, report: &[LayerRebalance]) {
        self.expert_rebalances.inc();
        for layer in report {
            for (placement, value) in [("served", layer.before), ("chosen", layer.after)] {
                self.expert_load_imbalance
                    .get_or_create(&ImbalanceLabels {
                        layer: layer.layer.to_string(),
                        placement: placement.into(),
                    })
                    .set(value);
            }
            self.collective_bytes
                .get_or_create(&CollectiveLabels {
                    kind: "expert_weights".into(),
                })
                .inc_by(layer.bytes_sent);
        }
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}
