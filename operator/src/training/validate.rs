//! Checks the operator makes before acting. The CEL rules of the CRD are
//! evaluated again here (client-side, the same rules), so an object that got
//! past admission anyway (an older CRD, CEL disabled) is reported as Stalled
//! instead of producing pods that cannot run.

use moe_crds::MoETrainingJob;

/// `Err(message naming the field)` when the spec cannot run.
pub fn validate(job: &MoETrainingJob) -> Result<(), String> {
    job.validate_cel()
        .map_err(|e| format!("spec fails validation: {e}"))?;
    crate::pods::check_worker(&job.spec.worker)
}
