//! Test support shared by the crds unit tests, `moectl`'s tests and the e2e
//! suite: the tables of objects the API must reject, one per kind
//! (`tests/fixtures/invalid-training-jobs.yaml` and
//! `tests/fixtures/invalid-inference-services.yaml`, embedded at build time),
//! and the JSON merge patch their cases are written in.

use serde::Deserialize;
use serde_json::Value;

/// One invalid spec: `object` is the table's base with the case's patch applied.
#[derive(Clone, Debug)]
pub struct InvalidCase {
    pub name: String,
    pub object: Value,
    /// Texts the rejection must contain (the field path, then the reason).
    pub expect: Vec<String>,
    /// `true` when a CEL rule rejects it; `false` for plain schema checks
    /// (minimum, enum) that only a schema walk or the apiserver catch.
    pub by_cel: bool,
}

#[derive(Deserialize)]
struct Table {
    base: Value,
    cases: Vec<RawCase>,
}

#[derive(Deserialize)]
struct RawCase {
    name: String,
    patch: Value,
    expect: Vec<String>,
    #[serde(default)]
    by: Option<String>,
}

const TRAINING_TABLE: &str = include_str!("../../tests/fixtures/invalid-training-jobs.yaml");
const INFERENCE_TABLE: &str = include_str!("../../tests/fixtures/invalid-inference-services.yaml");

fn table(text: &str) -> Table {
    serde_yaml::from_str(text).expect("the fixture table parses")
}

/// Every case of a table, patched onto its base.
fn cases(table: Table) -> Vec<InvalidCase> {
    table
        .cases
        .into_iter()
        .map(|c| {
            let mut object = table.base.clone();
            merge_patch(&mut object, &c.patch);
            InvalidCase {
                name: c.name,
                object,
                expect: c.expect,
                by_cel: c.by.as_deref().unwrap_or("cel") == "cel",
            }
        })
        .collect()
}

/// The valid base of the MoETrainingJob table.
pub fn valid_training_job() -> Value {
    table(TRAINING_TABLE).base
}

/// Every case of the MoETrainingJob table, patched onto the base.
pub fn invalid_training_jobs() -> Vec<InvalidCase> {
    cases(table(TRAINING_TABLE))
}

/// The valid base of the MoEInferenceService table.
pub fn valid_inference_service() -> Value {
    table(INFERENCE_TABLE).base
}

/// Every case of the MoEInferenceService table, patched onto the base.
pub fn invalid_inference_services() -> Vec<InvalidCase> {
    cases(table(INFERENCE_TABLE))
}

/// RFC 7386 JSON merge patch: objects merge recursively, `null` removes a key,
/// anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut doc = serde_json::json!({"a": {"b": 1, "c": 2}, "d": [1, 2]});
        merge_patch(
            &mut doc,
            &serde_json::json!({"a": {"b": null, "e": 3}, "d": [3]}),
        );
        assert_eq!(doc, serde_json::json!({"a": {"c": 2, "e": 3}, "d": [3]}));
    }
}
