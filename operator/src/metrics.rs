//! Prometheus metrics of the operator (`/metrics`).

use std::sync::Mutex;
use std::time::Duration;

use kube::ResourceExt;
use moe_crds::{MoEInferenceService, MoETrainingJob, TrainingPhase};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    verb: String,
    resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WarningLabels {
    kind: String,
    reason: String,
}

pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    errors: Family<ErrorLabels, Counter>,
    duration: Histogram,
    api_calls: Family<CallLabels, Counter>,
    warnings: Family<WarningLabels, Counter>,
    jobs_by_phase: Family<PhaseLabels, Gauge>,
    /// Last phase seen per job, to keep `jobs_by_phase` exact.
    phases: Mutex<std::collections::HashMap<String, String>>,
    services_by_reason: Family<ReasonLabels, Gauge>,
    /// Last Ready reason seen per service, to keep `services_by_reason` exact.
    service_reasons: Mutex<std::collections::HashMap<String, String>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("moe_operator");
        let reconciles = Counter::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let api_calls = Family::<CallLabels, Counter>::default();
        let jobs_by_phase = Family::<PhaseLabels, Gauge>::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by error class",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of reconciles",
            duration.clone(),
        );
        registry.register(
            "api_writes",
            "API writes made by reconciles, by verb and resource",
            api_calls.clone(),
        );
        registry.register(
            "training_jobs",
            "MoETrainingJobs by phase",
            jobs_by_phase.clone(),
        );
        let warnings = Family::<WarningLabels, Counter>::default();
        registry.register(
            "warnings",
            "Warning Events published, by kind of resource and reason (GangRestart, ProgressDeadlineExceeded, Unschedulable, InvalidSpec, ...)",
            warnings.clone(),
        );
        let services_by_reason = Family::<ReasonLabels, Gauge>::default();
        registry.register(
            "inference_services",
            "MoEInferenceServices by the reason of their Ready condition",
            services_by_reason.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            duration,
            api_calls,
            warnings,
            jobs_by_phase,
            phases: Default::default(),
            services_by_reason,
            service_reasons: Default::default(),
        }
    }
}

impl Metrics {
    pub fn reconciled(&self, took: Duration) {
        self.reconciles.inc();
        self.duration.observe(took.as_secs_f64());
    }

    pub fn reconcile_error(&self, class: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                error: class.into(),
            })
            .inc();
    }

    pub fn api_call(&self, verb: &str, resource: &str) {
        self.api_calls
            .get_or_create(&CallLabels {
                verb: verb.into(),
                resource: resource.into(),
            })
            .inc();
    }

    /// Counts a warning Event about a resource of `kind`.
    pub fn warning(&self, kind: &str, reason: &str) {
        self.warnings
            .get_or_create(&WarningLabels {
                kind: kind.into(),
                reason: reason.into(),
            })
            .inc();
    }

    pub fn observe_phase(&self, job: &MoETrainingJob, phase: Option<TrainingPhase>) {
        let key = format!("{}/{}", job.namespace().unwrap_or_default(), job.name_any());
        let new = phase
            .map(|p| format!("{p:?}"))
            .unwrap_or_else(|| "Unknown".into());
        let mut phases = self.phases.lock().expect("not poisoned");
        let old = phases.insert(key, new.clone());
        if old.as_ref() != Some(&new) {
            if let Some(old) = old {
                self.jobs_by_phase
                    .get_or_create(&PhaseLabels { phase: old })
                    .dec();
            }
            self.jobs_by_phase
                .get_or_create(&PhaseLabels { phase: new })
                .inc();
        }
    }

    /// Counts `svc` under the reason of its Ready condition.
    pub fn observe_inference(&self, svc: &MoEInferenceService, reason: Option<&str>) {
        let key = format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any());
        let new = reason.unwrap_or("Unknown").to_string();
        let mut reasons = self.service_reasons.lock().expect("not poisoned");
        let old = reasons.insert(key, new.clone());
        if old.as_ref() != Some(&new) {
            if let Some(old) = old {
                self.services_by_reason
                    .get_or_create(&ReasonLabels { reason: old })
                    .dec();
            }
            self.services_by_reason
                .get_or_create(&ReasonLabels { reason: new })
                .inc();
        }
    }

    /// Stops counting a deleted service.
    pub fn forget_inference(&self, svc: &MoEInferenceService) {
        let key = format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any());
        if let Some(old) = self
            .service_reasons
            .lock()
            .expect("not poisoned")
            .remove(&key)
        {
            self.services_by_reason
                .get_or_create(&ReasonLabels { reason: old })
                .dec();
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_are_counted_by_kind_and_reason() {
        let m = Metrics::default();
        m.warning("MoETrainingJob", "ProgressDeadlineExceeded");
        m.warning("MoETrainingJob", "ProgressDeadlineExceeded");
        m.warning("MoEInferenceService", "GroupRestart");
        let text = m.render();
        assert!(
            text.contains(
                r#"moe_operator_warnings_total{kind="MoETrainingJob",reason="ProgressDeadlineExceeded"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"moe_operator_warnings_total{kind="MoEInferenceService",reason="GroupRestart"} 1"#
            ),
            "{text}"
        );
    }
}
