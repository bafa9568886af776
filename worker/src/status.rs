//! Rank 0's HTTP endpoint (port 9400 by the contract): `GET /progress` is
//! the JSON the operator reads into the MoETrainingJob's status, `GET
//! /metrics` the same figures in Prometheus text. Workers hold no API
//! credentials; the operator pulls.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::thread;

use moe_crds::{ExpertLoad, FabricMeasurement};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::train::balance::Balance;

/// What `/progress` returns (the operator's `progress::Report`).
#[derive(Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    pub step: u64,
    pub total_steps: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
    /// Wall time per step over the last logging interval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds_per_step: Option<f64>,
    /// Model FLOPs utilisation (GPU runs on a GPU with a known peak).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_checkpoint_step: Option<u64>,
    /// `training.evaluation.keepBest`: the checkpoint with the lowest
    /// held-out loss so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_checkpoint_step: Option<u64>,
    /// The last step's worst MoE layer, by load violation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expert_load: Option<ExpertLoad>,
    /// What the fabric check measured before training.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fabric: Option<FabricMeasurement>,
    /// The loss on held-out data at the last evaluation
    /// (`training.evaluation`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// The run ended before `totalSteps` because the held-out loss stopped
    /// improving (`training.evaluation.patience`); set only in the last report.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub stopped_early: bool,
}

/// One decoder layer (0-based, as in the checkpoint's tensor names).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LayerLabels {
    layer: String,
}

/// The progress board the training loop writes and the server reads.
#[derive(Clone, Default)]
pub struct Board {
    progress: Arc<Mutex<Progress>>,
    gauges: Arc<Gauges>,
}

struct Gauges {
    registry: Registry,
    step: Gauge,
    loss: Gauge<f64, AtomicU64>,
    tokens_per_second: Gauge<f64, AtomicU64>,
    last_checkpoint_step: Gauge,
    mfu: Gauge<f64, AtomicU64>,
    eval_loss: Gauge<f64, AtomicU64>,
    expert_load_max_violation: Family<LayerLabels, Gauge<f64, AtomicU64>>,
}

impl Default for Gauges {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("moe_worker");
        let step = Gauge::default();
        let loss = Gauge::<f64, AtomicU64>::default();
        let tokens_per_second = Gauge::<f64, AtomicU64>::default();
        let last_checkpoint_step = Gauge::default();
        registry.register("step", "Optimizer steps done", step.clone());
        registry.register(
            "loss",
            "Training loss of the last logged step (nats)",
            loss.clone(),
        );
        registry.register(
            "tokens_per_second",
            "Training throughput of the last logging interval",
            tokens_per_second.clone(),
        );
        registry.register(
            "last_checkpoint_step",
            "Step of the newest complete checkpoint",
            last_checkpoint_step.clone(),
        );
        let mfu = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "mfu",
            "Model FLOPs utilisation of the gang's GPUs over the last logging interval (0 to 1; GPU runs only)",
            mfu.clone(),
        );
        let eval_loss = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "eval_loss",
            "Loss on the held-out data at the last evaluation (nats; training.evaluation)",
            eval_loss.clone(),
        );
        let expert_load_max_violation = Family::<LayerLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "expert_load_max_violation",
            "Busiest expert's tokens over its fair share, minus 1, in the last step, by MoE decoder layer (0 is perfectly balanced)",
            expert_load_max_violation.clone(),
        );
        Self {
            registry,
            step,
            loss,
            tokens_per_second,
            last_checkpoint_step,
            mfu,
            eval_loss,
            expert_load_max_violation,
        }
    }
}

impl Board {
    /// Replaces the published progress.
    pub fn publish(&self, progress: Progress) {
        self.gauges.step.set(progress.step as i64);
        if let Some(l) = progress.loss {
            self.gauges.loss.set(l);
        }
        if let Some(t) = progress.tokens_per_second {
            self.gauges.tokens_per_second.set(t);
        }
        if let Some(m) = progress.mfu {
            self.gauges.mfu.set(m);
        }
        if let Some(l) = progress.eval_loss {
            self.gauges.eval_loss.set(l);
        }
        if let Some(c) = progress.last_checkpoint_step {
            self.gauges.last_checkpoint_step.set(c as i64);
        }
        *self.progress.lock().expect("not poisoned") = progress;
    }

    /// Sets every MoE layer's expert-load gauge from a step's balance
    /// (the report carries only the worst layer).
    pub fn publish_balance(&self, balance: &Balance) {
        for (layer, violation) in &balance.layers {
            self.gauges
                .expert_load_max_violation
                .get_or_create(&LayerLabels {
                    layer: layer.to_string(),
                })
                .set(*violation);
        }
    }

    pub fn progress(&self) -> Progress {
        self.progress.lock().expect("not poisoned").clone()
    }

    fn metrics_text(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.gauges.registry).expect("writing to a String cannot fail");
        out
    }

    /// Serves `/progress` and `/metrics` on `addr` from a background thread.
    /// Returns the bound address (useful with port 0).
    pub fn serve(&self, addr: &str) -> std::io::Result<std::net::SocketAddr> {
        let server = tiny_http::Server::http(addr).map_err(std::io::Error::other)?;
        let bound = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| std::io::Error::other("not an IP listener"))?;
        let board = self.clone();
        thread::Builder::new()
            .name("status-http".into())
            .spawn(move || {
                for request in server.incoming_requests() {
                    let (status, kind, body) = match request.url() {
                        "/progress" => (
                            200,
                            "application/json",
                            serde_json::to_string(&board.progress()).unwrap_or_default(),
                        ),
                        "/metrics" => (
                            200,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            board.metrics_text(),
                        ),
                        _ => (404, "text/plain", "not found\n".to_string()),
                    };
                    let header = tiny_http::Header::from_bytes("content-type", kind)
                        .expect("a valid header");
                    let response = tiny_http::Response::from_string(body)
                        .with_status_code(status)
                        .with_header(header);
                    if let Err(e) = request.respond(response) {
                        tracing::debug!(error = %e, "status request");
                    }
                }
            })?;
        Ok(bound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_progress_and_metrics() {
        let board = Board::default();
        let addr = board.serve("127.0.0.1:0").unwrap();
        board.publish(Progress {
            step: 42,
            total_steps: 300,
            loss: Some(1.5),
            tokens_per_second: Some(5000.0),
            seconds_per_step: Some(1.5),
            mfu: Some(0.375),
            last_checkpoint_step: Some(40),
            best_checkpoint_step: None,
            expert_load: Some(ExpertLoad {
                max_violation: 0.5,
                layer: 2,
            }),
            fabric: None,
            eval_loss: Some(1.75),
            stopped_early: false,
        });
        board.publish_balance(&Balance {
            layers: vec![(1, 0.25), (2, 0.5)],
        });
        let progress = get(addr, "/progress");
        assert!(
            progress.lines().next().unwrap().ends_with(" 200 OK"),
            "{progress}"
        );
        let body = progress.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"step": 42, "totalSteps": 300, "loss": 1.5, "tokensPerSecond": 5000.0, "secondsPerStep": 1.5, "mfu": 0.375, "lastCheckpointStep": 40,
                "expertLoad": {"maxViolation": 0.5, "layer": 2}, "evalLoss": 1.75})
        );
        let metrics = get(addr, "/metrics");
        assert!(metrics.contains("moe_worker_step 42"), "{metrics}");
        assert!(metrics.contains("moe_worker_eval_loss 1.75"), "{metrics}");
        assert!(
            metrics.contains("moe_worker_last_checkpoint_step 40"),
            "{metrics}"
        );
        assert!(
            metrics.contains(r#"moe_worker_expert_load_max_violation{layer="1"} 0.25"#),
            "{metrics}"
        );
        assert!(get(addr, "/nope").lines().next().unwrap().contains(" 404 "));
    }
}
