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

mod inference {
    use moe_crds::MoEInferenceService;
    use moe_crds::fixtures::{invalid_inference_services, valid_inference_service};
    use serde_json::Value;

    fn service(value: Value) -> MoEInferenceService {
        serde_json::from_value(value).expect("case deserialises")
    }

    #[test]
    fn base_spec_is_valid() {
        service(valid_inference_service())
            .validate_cel()
            .expect("the base of the table is valid");
    }

    #[test]
    fn every_cel_case_is_rejected_with_its_message() {
        let mut checked = 0;
        for case in invalid_inference_services()
            .into_iter()
            .filter(|c| c.by_cel)
        {
            let err = service(case.object)
                .validate_cel()
                .expect_err(&case.name)
                .to_string();
            let message = case.expect.last().unwrap();
            assert!(
                err.contains(message.as_str()),
                "{}: {err:?} lacks {message:?}",
                case.name
            );
            checked += 1;
        }
        assert!(checked >= 10, "only {checked} CEL cases");
    }

    #[test]
    fn defaults_fill_a_minimal_service() {
        let s = service(serde_json::json!({
            "apiVersion": "moe.dev/v1alpha1", "kind": "MoEInferenceService",
            "metadata": {"name": "m"},
            "spec": {"model": {"fromTrainingJob": {"name": "t"}}}
        }));
        assert_eq!(s.spec.replicas, 1);
        assert_eq!(s.spec.serving.port, 8000);
        assert_eq!(s.spec.rollout.max_unavailable, 1);
        assert_eq!(s.spec.rollout.max_surge, 0);
        assert_eq!(s.spec.parallelism.ranks_per_replica(), 1);
        s.validate_cel().expect("a minimal service is valid");
    }

    #[test]
    fn pods_per_replica_is_immutable_but_replicas_are_not() {
        let old = service(valid_inference_service());
        let mut scaled = old.clone();
        scaled.spec.replicas = 3;
        scaled
            .validate_cel_update(&old)
            .expect("scaling is an update");
        let mut grouped = old.clone();
        grouped.spec.parallelism.pods_per_replica = 2;
        grouped.spec.parallelism.processes_per_pod = 4;
        let err = grouped
            .validate_cel_update(&old)
            .expect_err("one-pod to multi-pod replicas")
            .to_string();
        assert!(
            err.contains("parallelism.podsPerReplica is immutable"),
            "{err}"
        );
    }

    #[test]
    fn the_crd_has_the_scale_subresource() {
        use kube::CustomResourceExt;
        let crd = MoEInferenceService::crd();
        let scale = crd.spec.versions[0]
            .subresources
            .as_ref()
            .and_then(|s| s.scale.clone())
            .expect("scale subresource");
        assert_eq!(scale.spec_replicas_path, ".spec.replicas");
        assert_eq!(scale.status_replicas_path, ".status.replicas");
        assert_eq!(
            scale.label_selector_path.as_deref(),
            Some(".status.selector")
        );
        assert_eq!(crd.spec.names.short_names, Some(vec!["mis".to_string()]));
    }
}

/// A fine-tuning job's text goes through the pretrained model's tokenizer:
/// `tokenizer: huggingface` needs no `tokenizerFile` then (and does without
/// `model.initFrom`: the table's case).
#[test]
fn a_fine_tuning_job_may_tokenize_with_the_pretrained_models_tokenizer() {
    let mut v = valid_training_job();
    moe_crds::fixtures::merge_patch(
        &mut v,
        &serde_json::json!({"spec": {
            "model": {"initFrom": {"huggingface": {"repo": "org/base"}}},
            "data": {"builtin": null, "volume": {"claimName": "corpus"}, "tokenizer": "huggingface"}
        }}),
    );
    job(v.clone())
        .validate_cel()
        .expect("the model brings its tokenizer");
    moe_crds::fixtures::merge_patch(
        &mut v,
        &serde_json::json!({"spec": {"model": {"initFrom": null}}}),
    );
    let err = job(v).validate_cel().expect_err("no tokenizer").to_string();
    assert!(err.contains("needs data.tokenizerFile"), "{err}");
}
