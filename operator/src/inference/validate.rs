//! Checks the operator makes before acting on a MoEInferenceService: the
//! CRD's CEL rules again (client-side) and the worker checks shared with
//! training. A spec that fails
//! gets `Stalled=True` (reason `InvalidSpec`) instead of pods that cannot run.

use moe_crds::MoEInferenceService;

/// `Err(message naming the field)` when the spec cannot run.
pub fn validate(svc: &MoEInferenceService) -> Result<(), String> {
    svc.validate_cel()
        .map_err(|e| format!("spec fails validation: {e}"))?;
    crate::pods::check_worker(&svc.spec.worker)?;
    Ok(())
}
