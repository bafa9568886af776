//! Training progress, read by the operator from rank 0's HTTP endpoint
//! (`GET http://<rank-0 pod IP>:9400/progress`). Pulling keeps workers free
//! of any API credentials (they mount no ServiceAccount token) and costs one
//! small request per running job per poll interval. A poll may not come
//! after a job's last steps, so rank 0 also leaves its last report as its
//! pod's termination message, read once the attempt has completed.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use moe_crds::{ExpertLoad, FabricMeasurement, TrainingProgress};
use serde::Deserialize;

/// How often a running job's progress is read.
pub const POLL_INTERVAL: Duration = Duration::from_secs(30);
const TIMEOUT: Duration = Duration::from_secs(2);

/// What rank 0 reports (the worker's `/progress` JSON).
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub step: i64,
    pub total_steps: i64,
    #[serde(default)]
    pub loss: Option<f64>,
    #[serde(default)]
    pub tokens_per_second: Option<f64>,
    #[serde(default)]
    pub seconds_per_step: Option<f64>,
    #[serde(default)]
    pub mfu: Option<f64>,
    #[serde(default)]
    pub last_checkpoint_step: Option<i64>,
    #[serde(default)]
    pub best_checkpoint_step: Option<i64>,
    #[serde(default)]
    pub expert_load: Option<ExpertLoad>,
    #[serde(default)]
    pub fabric: Option<FabricMeasurement>,
    #[serde(default)]
    pub eval_loss: Option<f64>,
    /// Only in the last report (the termination message of a run that
    /// `training.evaluation.patience` ended).
    #[serde(default)]
    pub stopped_early: bool,
}

/// The status block for a report. Loss and throughput are rounded so that
/// noise in the last digits does not turn every poll into a status write.
pub fn to_status(report: &Report, now: Timestamp) -> TrainingProgress {
    let percent = if report.total_steps > 0 {
        report.step.saturating_mul(100) / report.total_steps
    } else {
        0
    };
    let remaining = report
        .seconds_per_step
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| ((report.total_steps - report.step).max(0) as f64 * s).round() as i64);
    let eta = match remaining {
        _ if report.stopped_early => ", stopped early".to_string(),
        Some(left) if report.step < report.total_steps => format!(", ETA {}", duration(left)),
        _ => String::new(),
    };
    TrainingProgress {
        step: report.step,
        total_steps: report.total_steps,
        display: format!("{}/{} ({percent}%{eta})", report.step, report.total_steps),
        estimated_remaining_seconds: remaining,
        mfu: rounded(report.mfu, 3),
        loss: rounded(report.loss, 4),
        tokens_per_second: rounded(report.tokens_per_second, 0),
        last_checkpoint_step: report.last_checkpoint_step,
        best_checkpoint_step: report.best_checkpoint_step,
        expert_load: report.expert_load.as_ref().and_then(|e| {
            Some(ExpertLoad {
                max_violation: rounded(Some(e.max_violation), 3)?,
                layer: e.layer,
            })
        }),
        fabric: report.fabric.clone(),
        eval_loss: rounded(report.eval_loss, 4),
        stopped_early: report.stopped_early,
        update_time: Some(Time(now)),
    }
}

/// Rank 0's last report, from the termination message of a pod whose
/// worker exited 0 (rank 0 writes it as it ends): what the operator learns
/// of a job's last steps, which no poll may have seen.
pub fn final_report(pod: &Pod) -> Option<Report> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    statuses.iter().find_map(|c| {
        let ended = c.state.as_ref()?.terminated.as_ref()?;
        if ended.exit_code != 0 {
            return None;
        }
        serde_json::from_str(ended.message.as_deref()?.trim()).ok()
    })
}

/// `value` to `places` decimals; `None` for what JSON cannot carry (NaN, ±∞).
fn rounded(value: Option<f64>, places: i32) -> Option<f64> {
    let scale = 10f64.powi(places);
    value
        .filter(|v| v.is_finite())
        .map(|v| (v * scale).round() / scale)
}

/// `seconds` as kubectl prints ages: the two largest units.
fn duration(seconds: i64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s:02}s"),
        (0, _, _) => format!("{h}h{m:02}m"),
        _ => format!("{d}d{h:02}h"),
    }
}

/// Reads rank 0's report; `None` when it does not answer (starting, or no endpoint).
pub async fn fetch(pod_ip: &str, port: u16) -> Option<Report> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let uri: http::Uri = format!("http://{pod_ip}:{port}/progress").parse().ok()?;
    let response = tokio::time::timeout(TIMEOUT, client.get(uri))
        .await
        .ok()?
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    let body = tokio::time::timeout(TIMEOUT, response.into_body().collect())
        .await
        .ok()?
        .ok()?
        .to_bytes();
    serde_json::from_slice(&body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_rounding() {
        let now: Timestamp = "2026-11-28T12:00:00Z".parse().unwrap();
        let p = to_status(
            &Report {
                step: 42,
                total_steps: 300,
                loss: Some(1.234_567_8),
                tokens_per_second: Some(5123.4),
                seconds_per_step: Some(12.5),
                mfu: Some(0.371_23),
                last_checkpoint_step: Some(0),
                best_checkpoint_step: None,
                expert_load: Some(ExpertLoad {
                    max_violation: 0.123_456,
                    layer: 3,
                }),
                fabric: None,
                eval_loss: Some(2.345_678),
                stopped_early: false,
            },
            now,
        );
        // 258 steps of 12.5 s left: 3225 s.
        assert_eq!(p.display, "42/300 (14%, ETA 53m45s)");
        assert_eq!(p.estimated_remaining_seconds, Some(3225));
        assert_eq!(p.mfu, Some(0.371));
        assert_eq!(p.loss, Some(1.2346));
        assert_eq!(p.eval_loss, Some(2.3457));
        assert_eq!(
            p.expert_load,
            Some(ExpertLoad {
                max_violation: 0.123,
                layer: 3
            })
        );
        assert_eq!(p.tokens_per_second, Some(5123.0));
        let zero = to_status(
            &Report {
                step: 0,
                total_steps: 0,
                loss: Some(f64::NAN),
                tokens_per_second: None,
                seconds_per_step: None,
                mfu: None,
                last_checkpoint_step: None,
                best_checkpoint_step: None,
                expert_load: None,
                fabric: None,
                eval_loss: None,
                stopped_early: false,
            },
            now,
        );
        assert_eq!(zero.display, "0/0 (0%)");
        assert_eq!(zero.estimated_remaining_seconds, None);
        assert_eq!(
            zero.loss, None,
            "NaN cannot go into a status (JSON has no NaN)"
        );
    }

    /// A pod whose worker container ended with `code` and `message`.
    fn ended(code: i32, message: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "train-a0-0-x"},
            "status": {"containerStatuses": [{
                "name": "worker", "image": "w", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": code, "message": message}}
            }]}
        }))
        .unwrap()
    }

    #[test]
    fn the_last_report_is_read_from_a_worker_that_exited_0() {
        let last = r#"{"step":45,"totalSteps":100,"loss":1.5,"lastCheckpointStep":45,"evalLoss":1.75,"stoppedEarly":true}"#;
        let report = final_report(&ended(0, &format!("{last}\n"))).unwrap();
        assert_eq!(
            (report.step, report.last_checkpoint_step, report.eval_loss),
            (45, Some(45), Some(1.75))
        );
        assert!(report.stopped_early);
        let now: Timestamp = "2026-11-28T12:00:00Z".parse().unwrap();
        let status = to_status(&report, now);
        assert_eq!(status.display, "45/100 (45%, stopped early)");
        assert!(status.stopped_early);
        // A failed worker's message is an error, not a report; an older
        // worker's or a fallback to logs is not JSON.
        assert_eq!(final_report(&ended(1, last)), None);
        assert_eq!(final_report(&ended(0, "step 45 done")), None);
        assert_eq!(final_report(&Pod::default()), None);
    }

    #[test]
    fn time_left_reads_like_kubectl_ages() {
        for (seconds, text) in [
            (0, "0s"),
            (59, "59s"),
            (61, "1m01s"),
            (3599, "59m59s"),
            (3600, "1h00m"),
            (86_399, "23h59m"),
            (90_061, "1d01h"),
        ] {
            assert_eq!(duration(seconds), text);
        }
    }
}
