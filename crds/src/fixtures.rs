//! Test support shared by the crds unit tests, `moectl`'s tests and the e2e
//! suite: the table of MoETrainingJobs the API must reject
//! (`tests/fixtures/invalid-training-jobs.yaml`, embedded at build time) and
//! the JSON merge patch its cases are written in.

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

const TABLE: &str = include_str!("../../tests/fixtures/invalid-training-jobs.yaml");

/// The valid base of the table.
pub fn valid_training_job() -> Value {
    let table: Table = serde_yaml::from_str(TABLE).expect("the fixture table parses");
    table.base
}

/// Every case of the table, patched onto the base.
pub fn invalid_training_jobs() -> Vec<InvalidCase> {
    let table: Table = serde_yaml::from_str(TABLE).expect("the fixture table parses");
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
