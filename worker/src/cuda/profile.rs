//! Where a training step's GPU time goes, phase by phase: spans of stream
//! time between two CUDA events, summed per label. The GPU machine has no
//! profiler installed (it gets a driver and carried binaries), and its
//! sessions are short, so the step benchmark measures its own breakdown in
//! the same run as the step ([`super::train_bench`]).
//!
//! Off unless the benchmark turns it on: a span then costs one relaxed
//! atomic load. On, each span records two events (a few µs of host time,
//! which the profiled step does not report as its step time).
//!
//! Labels name the pass and the phase, `fwd.moe.experts`, so spans of one
//! phase in every layer add up to the phase's share of the step; a label is
//! never nested inside a span of another label that is reported beside it.

use super::{Gpu, Result};
use moe_kernels::cudarc::driver::CudaEvent;
use moe_kernels::cudarc::driver::sys::CUevent_flags;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Recorded spans, while profiling is on.
#[derive(Default)]
pub struct Profile {
    enabled: AtomicBool,
    spans: Mutex<Vec<(&'static str, CudaEvent, CudaEvent)>>,
}

/// A span begun by `Gpu::span_start`: nothing while profiling is off.
#[must_use = "a span is recorded when it is handed to Gpu::span_end"]
pub struct Started(Option<(&'static str, CudaEvent)>);

fn timing_event(gpu: &Gpu) -> Result<CudaEvent> {
    Ok(gpu
        .stream()
        .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?)
}

impl Gpu {
    /// Starts recording spans (and forgets any recorded before).
    pub fn profile_on(&self) {
        self.profile.spans_mut().clear();
        self.profile.enabled.store(true, Ordering::Relaxed);
    }

    /// Stops recording and returns each span's label and stream time in
    /// milliseconds, in the order they began (waits for the stream).
    pub fn profile_off(&self) -> Result<Vec<(&'static str, f64)>> {
        self.profile.enabled.store(false, Ordering::Relaxed);
        let spans = std::mem::take(&mut *self.profile.spans_mut());
        self.synchronize()?;
        spans
            .into_iter()
            .map(|(label, start, end)| Ok((label, f64::from(start.elapsed_ms(&end)?))))
            .collect()
    }

    /// Marks where the stream's span `label` begins.
    pub(crate) fn span_start(&self, label: &'static str) -> Result<Started> {
        if !self.profile.enabled.load(Ordering::Relaxed) {
            return Ok(Started(None));
        }
        Ok(Started(Some((label, timing_event(self)?))))
    }

    /// Marks where `started`'s span ends, and keeps it.
    pub(crate) fn span_end(&self, started: Started) -> Result<()> {
        if let Started(Some((label, start))) = started {
            let end = timing_event(self)?;
            self.profile.spans_mut().push((label, start, end));
        }
        Ok(())
    }

    /// `f` as the span `label`.
    pub(crate) fn span<T>(&self, label: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let started = self.span_start(label)?;
        let value = f()?;
        self.span_end(started)?;
        Ok(value)
    }
}

impl Profile {
    fn spans_mut(&self) -> std::sync::MutexGuard<'_, Vec<(&'static str, CudaEvent, CudaEvent)>> {
        self.spans.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One label's spans over a profiled run.
#[derive(Clone, Debug, PartialEq)]
pub struct Phase {
    pub label: &'static str,
    /// Milliseconds per step, summed over the label's spans.
    pub ms: f64,
    /// Spans per step.
    pub spans: f64,
}

/// The spans of `steps` profiled steps, summed per label, in the order the
/// labels first appear (the order of the pass).
pub fn phases(spans: &[(&'static str, f64)], steps: usize) -> Vec<Phase> {
    let mut phases: Vec<Phase> = Vec::new();
    for &(label, ms) in spans {
        match phases.iter_mut().find(|p| p.label == label) {
            Some(phase) => {
                phase.ms += ms;
                phase.spans += 1.0;
            }
            None => phases.push(Phase {
                label,
                ms,
                spans: 1.0,
            }),
        }
    }
    let steps = steps.max(1) as f64;
    for phase in &mut phases {
        phase.ms /= steps;
        phase.spans /= steps;
    }
    phases
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_sum_each_label_per_step_in_first_seen_order() {
        let spans = [
            ("fwd.attention", 2.0),
            ("fwd.moe", 3.0),
            ("fwd.attention", 4.0),
            ("bwd.moe", 1.0),
            ("fwd.moe", 5.0),
            ("fwd.attention", 6.0),
        ];
        let got = phases(&spans, 2);
        let want = [
            ("fwd.attention", 6.0, 1.5),
            ("fwd.moe", 4.0, 1.0),
            ("bwd.moe", 0.5, 0.5),
        ];
        assert_eq!(got.len(), want.len());
        for (phase, (label, ms, count)) in got.iter().zip(want) {
            assert_eq!((phase.label, phase.ms, phase.spans), (label, ms, count));
        }
        assert!(phases(&[], 3).is_empty());
    }
}
