//! Checks the operator makes before acting. The CEL rules of the CRD are
//! evaluated again here (client-side, the same rules), so an object that got
//! past admission anyway (an older CRD, CEL disabled) is reported as Stalled
//! instead of producing pods that cannot run.

use moe_crds::MoETrainingJob;
use moe_crds::contract::env;

/// `Err(message naming the field)` when the spec cannot run.
pub fn validate(job: &MoETrainingJob) -> Result<(), String> {
    job.validate_cel()
        .map_err(|e| format!("spec fails validation: {e}"))?;
    let worker = &job.spec.worker;
    for (i, var) in worker.env.iter().enumerate() {
        if env::RESERVED.contains(&var.name.as_str()) || var.name.starts_with("MOE_") {
            return Err(format!(
                "spec.worker.env[{i}].name: {} is reserved for the worker contract (MOE_*)",
                var.name
            ));
        }
    }
    for key in worker.nccl.env.keys() {
        if !key.starts_with("NCCL_") {
            return Err(format!(
                "spec.worker.nccl.env: {key} is not an NCCL_* variable"
            ));
        }
    }
    for key in worker
        .pod_metadata
        .labels
        .keys()
        .chain(worker.pod_metadata.annotations.keys())
    {
        if key.starts_with("moe.dev/") {
            return Err(format!(
                "spec.worker.podMetadata: {key} uses the reserved moe.dev/ prefix"
            ));
        }
    }
    Ok(())
}
