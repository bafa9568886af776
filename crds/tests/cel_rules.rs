//! The CEL rules of the schema, evaluated client-side (kube's CEL evaluator)
//! on the shared table of invalid specs in tests/fixtures/. The e2e suite
//! sends the same table to a real apiserver; this tier catches rule mistakes
//! in milliseconds.

use moe_crds::MoETrainingJob;
use moe_crds::fixtures::{invalid_training_jobs, valid_training_job};
use serde_json::Value;

/// Deserialising applies the serde defaults, as the apiserver applies the schema defaults.
fn job(value: Value) -> MoETrainingJob {
    serde_json::from_value(value).expect("case deserialises")
}

#[test]
fn base_spec_is_valid() {
    job(valid_training_job())
        .validate_cel()
        .expect("the base of the table is valid");
}

#[test]
fn every_cel_case_is_rejected_with_its_message() {
    let mut checked = 0;
    for case in invalid_training_jobs().into_iter().filter(|c| c.by_cel) {
        let err = job(case.object)
            .validate_cel()
            .expect_err(&case.name)
            .to_string();
        // The apiserver prefixes the field path; client-side we check the message.
        let message = case.expect.last().unwrap();
        assert!(
            err.contains(message.as_str()),
            "{}: {err:?} lacks {message:?}",
            case.name
        );
        checked += 1;
    }
    assert!(checked >= 15, "only {checked} CEL cases");
}

#[test]
fn model_cannot_change_while_running_but_can_while_suspended() {
    let old = job(valid_training_job());
    let mut new = old.clone();
    new.spec.model.layers = 3;
    let err = new
        .validate_cel_update(&old)
        .expect_err("model change on a running job")
        .to_string();
    assert!(
        err.contains("model is immutable while the job is not suspended"),
        "{err}"
    );

    let mut suspended = old.clone();
    suspended.spec.run_policy.suspend = true;
    let mut edited = suspended.clone();
    edited.spec.model.layers = 3;
    edited
        .validate_cel_update(&suspended)
        .expect("a suspended job may be edited");
}

#[test]
fn a_status_only_update_passes_the_transition_rules() {
    // Transition rules also run on status writes; optional fields absent on both sides must pass.
    let old = job(valid_training_job());
    let mut new = old.clone();
    new.status = Some(Default::default());
    new.validate_cel_update(&old)
        .expect("status writes are not spec changes");
}
