//! The checks `moectl validate` makes on one document, in the apiserver's
//! order: the structural schema (unknown fields, types, bounds), then
//! defaults, then the CEL rules, then the operator's own checks
//! ([`crate::training::validate`], [`crate::inference::validate`]). A
//! document that passes is one the apiserver admits and the operator runs.
//! Both kinds go through the same walk, each against its own generated CRD.

use anyhow::{Context, anyhow};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::schemars::generate::SchemaSettings;
use kube::{CustomResourceExt, Resource};
use moe_crds::{MoEInferenceService, MoETrainingJob};
use serde_json::Value;

use crate::cli::{manifest, schema};
use crate::training::validate;

/// A checked document of either kind.
#[derive(Clone, Debug)]
pub enum Manifest {
    Training(Box<MoETrainingJob>),
    Inference(Box<MoEInferenceService>),
}

impl Manifest {
    /// `Kind/name`, as `validate` reports it.
    pub fn object(&self) -> String {
        match self {
            Manifest::Training(j) => format!(
                "MoETrainingJob/{}",
                j.metadata.name.clone().unwrap_or_default()
            ),
            Manifest::Inference(s) => format!(
                "MoEInferenceService/{}",
                s.metadata.name.clone().unwrap_or_default()
            ),
        }
    }
}

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

/// Checks documents against the CRDs generated from the same types the
/// operator uses, so it cannot drift from what is installed.
pub struct Checker {
    schema: Value,
    inference_schema: Value,
    /// `metadata` is not in a CRD's schema; the apiserver checks it as ObjectMeta.
    metadata_schema: Value,
}

impl Checker {
    pub fn new() -> anyhow::Result<Self> {
        fn schema_of(
            crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
        ) -> anyhow::Result<Value> {
            let kind = crd.spec.names.kind.clone();
            let schema = crd
                .spec
                .versions
                .into_iter()
                .find(|v| v.name == moe_crds::VERSION)
                .and_then(|v| v.schema)
                .and_then(|s| s.open_api_v3_schema)
                .with_context(|| format!("the {kind} CRD has no openAPIV3Schema"))?;
            Ok(serde_json::to_value(schema)?)
        }
        // ObjectMeta's schema as kube renders a CRD's: OpenAPI 3, inlined.
        let metadata_schema = SchemaSettings::openapi3()
            .with(|s| {
                s.inline_subschemas = true;
                s.meta_schema = None;
            })
            .into_generator()
            .into_root_schema_for::<ObjectMeta>();
        Ok(Self {
            schema: schema_of(MoETrainingJob::crd())?,
            inference_schema: schema_of(MoEInferenceService::crd())?,
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

    /// Either kind, by its `kind`: the resource with defaults applied, or why
    /// the apiserver or the operator would refuse it.
    pub fn check_any(&self, mut document: Value) -> Result<Manifest, Rejection> {
        let inference_kind = MoEInferenceService::kind(&());
        if document.get("kind").and_then(Value::as_str) != Some(&inference_kind) {
            return match self.check(document) {
                Ok(job) => Ok(Manifest::Training(Box::new(job))),
                Err(mut r) if r.problems[0].starts_with("not a MoETrainingJob") => {
                    r.problems = vec![format!(
                        "not a moe-operator resource: expected apiVersion {} and kind MoETrainingJob or {inference_kind}",
                        moe_crds::api_version()
                    )];
                    Err(r)
                }
                Err(r) => Err(r),
            };
        }
        let object = object_ref(&document);
        let reject = |problems| Rejection {
            object: object.clone(),
            problems,
        };
        let api_version = moe_crds::api_version();
        if document.get("apiVersion").and_then(Value::as_str) != Some(&api_version) {
            return Err(reject(vec![format!(
                "expected apiVersion {api_version} for {inference_kind}"
            )]));
        }
        drop_nulls(&mut document);
        let mut problems = self.metadata_problems(&document);
        problems.extend(schema::problems(&self.inference_schema, &document));
        if !problems.is_empty() {
            return Err(reject(problems));
        }
        let svc: MoEInferenceService = serde_json::from_value(document).map_err(|e| {
            reject(vec![format!(
                "cannot be read as a MoEInferenceService: {e}"
            )])
        })?;
        if let Err(errors) = svc.validate_cel() {
            return Err(reject(errors.iter().map(ToString::to_string).collect()));
        }
        crate::inference::validate::validate(&svc).map_err(|e| reject(vec![e]))?;
        Ok(Manifest::Inference(Box::new(svc)))
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

/// The one resource (either kind) in `source`, checked: `render` acts on exactly one.
pub fn load_manifest(source: &str) -> anyhow::Result<Manifest> {
    let documents = manifest::read(source)
        .and_then(|text| manifest::documents(&text))
        .with_context(|| source.to_string())?;
    let [document] = <[Value; 1]>::try_from(documents).map_err(|found| {
        anyhow!(
            "{source}: expected one resource, found {} documents",
            found.len()
        )
    })?;
    Checker::new()?
        .check_any(document)
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
    fn the_cuda_tuning_variables_may_be_set_but_no_other_moe_name() {
        let tuning = json!([
            {"name": "MOE_CUDA_GROUPED_GEMM", "value": "1"},
            {"name": "MOE_CUDA_EXPERT_STREAMS", "value": "4"},
            {"name": "MOE_CUDA_ATTENTION", "value": "flash"},
        ]);
        let mut doc = tiny();
        doc["spec"]["worker"]["env"] = tuning;
        Checker::new()
            .unwrap()
            .check(doc)
            .expect("tuning variables are allowed");
        for reserved in ["MOE_COORDINATOR", "MOE_CUDAX", "MOE_STATUS_ADDR"] {
            let mut doc = tiny();
            doc["spec"]["worker"]["env"] = json!([{"name": reserved, "value": "x"}]);
            let rejection = Checker::new().unwrap().check(doc).unwrap_err();
            assert!(
                rejection.problems[0].starts_with("spec.worker.env[0].name: ")
                    && rejection.problems[0].contains(reserved),
                "{reserved}: {:?}",
                rejection.problems
            );
        }
    }

    #[test]
    fn checks_inference_services_against_their_own_schema_and_rules() {
        let checker = Checker::new().unwrap();
        let mut doc = json!({
            "apiVersion": "moe.dev/v1alpha1", "kind": "MoEInferenceService",
            "metadata": {"name": "chat"},
            "spec": {"model": {"volume": {"claimName": "w"}}, "replicas": 2}
        });
        let ok = checker.check_any(doc.clone()).unwrap();
        assert_eq!(ok.object(), "MoEInferenceService/chat");
        let Manifest::Inference(svc) = ok else {
            panic!()
        };
        assert_eq!(svc.spec.serving.port, 8000);

        doc["spec"]["parallelism"] = json!({"processesPerPod": 2, "expertParallel": 3});
        doc["spec"]["servng"] = json!({});
        let r = checker.check_any(doc.clone()).unwrap_err();
        assert!(
            r.problems[0].starts_with("spec.servng: unknown field"),
            "{:?}",
            r.problems
        );
        doc.as_object_mut().unwrap()["spec"]
            .as_object_mut()
            .unwrap()
            .remove("servng");
        let r = checker.check_any(doc.clone()).unwrap_err();
        assert!(
            r.problems[0].starts_with("spec.parallelism.expertParallel: "),
            "{:?}",
            r.problems
        );
        doc["spec"]["parallelism"] = json!({"podsPerReplica": 2, "expertParallel": 2});
        doc["spec"]["worker"] = json!({"env": [{"name": "MOE_SERVICE", "value": "x"}]});
        let r = checker.check_any(doc).unwrap_err();
        assert!(
            r.problems[0].starts_with("spec.worker.env[0].name: "),
            "{:?}",
            r.problems
        );
        // Training jobs still go through check_any.
        assert!(matches!(
            checker.check_any(tiny()),
            Ok(Manifest::Training(_))
        ));
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
