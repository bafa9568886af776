//! The checks `moectl validate` makes on one document, in the apiserver's
//! order: the structural schema (unknown fields, types, bounds), then
//! defaults, then the CEL rules, then the operator's own checks
//! ([`crate::training::validate`]). A document that passes is one the
//! apiserver admits and the operator runs.

use anyhow::{Context, anyhow};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::schemars::generate::SchemaSettings;
use kube::{CustomResourceExt, Resource};
use moe_crds::MoETrainingJob;
use serde_json::Value;

use crate::cli::{manifest, schema};
use crate::training::validate;

/// A document that would be rejected, with every reason found.
#[derive(Debug)]
pub struct Rejection {
    /// `kind/name` of the document, as far as it can be told.
    pub object: String,
    /// The problems, each naming its field.
    pub problems: Vec<String>,
}

impl Rejection {
    /// One `SOURCE: kind/name: problem` line per problem.
    pub fn report(&self, source: &str) -> String {
        self.problems
            .iter()
            .map(|p| format!("{source}: {}: {p}", self.object))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Checks documents against the MoETrainingJob CRD generated from the same
/// types the operator uses, so it cannot drift from what is installed.
pub struct Checker {
    schema: Value,
    /// `metadata` is not in a CRD's schema; the apiserver checks it as ObjectMeta.
    metadata_schema: Value,
}

impl Checker {
    pub fn new() -> anyhow::Result<Self> {
        let crd = MoETrainingJob::crd();
        let schema = crd
            .spec
            .versions
            .into_iter()
            .find(|v| v.name == moe_crds::VERSION)
            .and_then(|v| v.schema)
            .and_then(|s| s.open_api_v3_schema)
            .context("the MoETrainingJob CRD has no openAPIV3Schema")?;
        // ObjectMeta's schema as kube renders a CRD's: OpenAPI 3, inlined.
        let metadata_schema = SchemaSettings::openapi3()
            .with(|s| {
                s.inline_subschemas = true;
                s.meta_schema = None;
            })
            .into_generator()
            .into_root_schema_for::<ObjectMeta>();
        Ok(Self {
            schema: serde_json::to_value(schema)?,
            metadata_schema: serde_json::to_value(metadata_schema)?,
        })
    }

    /// The job the document describes, with defaults applied, or why the
    /// apiserver or the operator would refuse it.
    pub fn check(&self, mut document: Value) -> Result<MoETrainingJob, Rejection> {
        let object = object_ref(&document);
        let reject = |problems| Rejection {
            object: object.clone(),
            problems,
        };
        let kind = MoETrainingJob::kind(&());
        let api_version = moe_crds::api_version();
        if document.get("kind").and_then(Value::as_str) != Some(&kind)
            || document.get("apiVersion").and_then(Value::as_str) != Some(&api_version)
        {
            return Err(reject(vec![format!(
                "not a MoETrainingJob: expected apiVersion {api_version} and kind {kind}"
            )]));
        }
        drop_nulls(&mut document);
        let mut problems = self.metadata_problems(&document);
        problems.extend(schema::problems(&self.schema, &document));
        if !problems.is_empty() {
            return Err(reject(problems));
        }
        // Deserialising applies the serde defaults, which are the schema's defaults.
        let job: MoETrainingJob = serde_json::from_value(document)
            .map_err(|e| reject(vec![format!("cannot be read as a MoETrainingJob: {e}")]))?;
        // `validate` runs these CEL rules too, but reports them as one
        // message; evaluating them first gives one line per broken rule,
        // each starting with its field path.
        if let Err(errors) = job.validate_cel() {
            return Err(reject(errors.iter().map(ToString::to_string).collect()));
        }
        validate::validate(&job).map_err(|e| reject(vec![e]))?;
        Ok(job)
    }

    /// ObjectMeta's structural problems; besides, moectl needs a name
    /// (children are named after it; `generateName` cannot be rendered).
    fn metadata_problems(&self, document: &Value) -> Vec<String> {
        let metadata = document.get("metadata").unwrap_or(&Value::Null);
        let mut out = Vec::new();
        if metadata.get("name").is_none() {
            out.push("metadata.name: Required value".into());
        }
        if !metadata.is_null() {
            out.extend(schema::problems_at(
                &self.metadata_schema,
                metadata,
                "metadata",
            ));
        }
        out
    }
}

/// The one MoETrainingJob in `source` (a path or `-`), checked: `render` and
/// `run` act on exactly one job.
pub fn load_job(source: &str) -> anyhow::Result<MoETrainingJob> {
    let documents = manifest::read(source)
        .and_then(|text| manifest::documents(&text))
        .with_context(|| source.to_string())?;
    let [document] = <[Value; 1]>::try_from(documents).map_err(|found| {
        anyhow!(
            "{source}: expected one MoETrainingJob, found {} documents",
            found.len()
        )
    })?;
    Checker::new()?
        .check(document)
        .map_err(|rejection| anyhow!("{}", rejection.report(source)))
}

fn object_ref(document: &Value) -> String {
    let kind = document.get("kind").and_then(Value::as_str);
    let name = document.pointer("/metadata/name").and_then(Value::as_str);
    format!(
        "{}/{}",
        kind.unwrap_or("<no kind>"),
        name.unwrap_or("<no name>")
    )
}

/// The apiserver drops `null` fields before defaulting (an explicit null
/// means "unset"); serde would instead reject a null for a defaulted field.
fn drop_nulls(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(drop_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn tiny() -> Value {
        json!({
            "apiVersion": "moe.dev/v1alpha1",
            "kind": "MoETrainingJob",
            "metadata": {"name": "tiny"},
            "spec": {
                "model": {
                    "hiddenSize": 64, "layers": 2, "attentionHeads": 4, "kvHeads": 2,
                    "seqLen": 64, "denseHiddenSize": null,
                    "moe": {"experts": 8, "topK": 2, "expertHiddenSize": 64}
                },
                "training": {"steps": 10, "globalBatchSize": 8},
                "worker": {"device": "cpu"}
            }
        })
    }

    #[test]
    fn accepts_a_valid_job_and_applies_defaults() {
        let job = Checker::new().unwrap().check(tiny()).unwrap();
        assert_eq!(job.spec.model.vocab_size, 256);
        assert_eq!(job.spec.model.dense_hidden_size, None);
        assert_eq!(job.spec.parallelism.nodes, 1);
    }

    #[test]
    fn reports_a_broken_cel_rule_with_its_field_path() {
        let mut doc = tiny();
        doc["spec"]["model"]["denseLayers"] = json!(2);
        let rejection = Checker::new().unwrap().check(doc).unwrap_err();
        assert_eq!(rejection.object, "MoETrainingJob/tiny");
        assert_eq!(rejection.problems.len(), 1, "{:?}", rejection.problems);
        assert!(rejection.problems[0].starts_with("spec.model.denseLayers: "));
    }

    #[test]
    fn reports_operator_checks_after_the_cel_rules() {
        let mut doc = tiny();
        doc["spec"]["worker"]["env"] = json!([{"name": "MOE_RANK", "value": "1"}]);
        let rejection = Checker::new().unwrap().check(doc).unwrap_err();
        assert!(
            rejection.problems[0].starts_with("spec.worker.env[0].name: "),
            "{:?}",
            rejection.problems
        );
    }

    #[test]
    fn refuses_other_kinds_and_checks_metadata() {
        let checker = Checker::new().unwrap();
        let rejection = checker
            .check(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}))
            .unwrap_err();
        assert_eq!(rejection.object, "ConfigMap/c");
        assert!(rejection.problems[0].starts_with("not a MoETrainingJob"));

        let mut doc = tiny();
        doc["metadata"] = json!({"lables": {"a": "b"}});
        let rejection = checker.check(doc).unwrap_err();
        assert_eq!(rejection.object, "MoETrainingJob/<no name>");
        assert_eq!(
            rejection.problems,
            vec![
                "metadata.name: Required value",
                "metadata.lables: unknown field (did you mean labels?)"
            ]
        );
    }
}
