//! The CEL rules of the schema, evaluated client-side (kube's CEL evaluator)
//! on the shared table of invalid specs in tests/fixtures/. The e2e suite
//! sends the same table to a real apiserver; this tier catches rule mistakes
//! in milliseconds.

use moe_crds::MoETrainingJob;
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
struct Table {
    base: Value,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    patch: Value,
    expect: Vec<String>,
    #[serde(default)]
    by: Option<String>,
}

fn table() -> Table {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/invalid-training-jobs.yaml"
    );
    serde_yaml::from_str(&std::fs::read_to_string(path).expect("fixture exists"))
        .expect("fixture parses")
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// Deserialising applies the serde defaults, as the apiserver applies the schema defaults.
fn job(value: Value) -> MoETrainingJob {
    serde_json::from_value(value).expect("case deserialises")
}

#[test]
fn base_spec_is_valid() {
    job(table().base)
        .validate_cel()
        .expect("the base of the table is valid");
}

#[test]
fn every_cel_case_is_rejected_with_its_message() {
    let table = table();
    let mut checked = 0;
    for case in table
        .cases
        .iter()
        .filter(|c| c.by.as_deref().unwrap_or("cel") == "cel")
    {
        let mut value = table.base.clone();
        merge(&mut value, &case.patch);
        let err = job(value).validate_cel().expect_err(&case.name).to_string();
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
    let old = job(table().base);
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
