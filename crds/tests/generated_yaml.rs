//! The committed CRD YAML must be what the Rust types generate: the plain
//! manifests under `deploy/crds/` and the Helm chart's CRD templates.

use std::path::{Path, PathBuf};

#[test]
fn committed_crd_yaml_is_up_to_date() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crds/moe-crds.yaml");
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == moe_crds::crds_yaml(),
        "deploy/crds/moe-crds.yaml is stale: regenerate it with\n  cargo run --bin moectl -- crds > deploy/crds/moe-crds.yaml"
    );
}

const REGENERATE: &str = "MOE_REGENERATE=1 cargo test -p moe-crds --test generated_yaml";

fn chart_templates() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/moe-operator/templates")
}

/// The chart's template of one CRD: the generated YAML, installed only with
/// `crds.enabled`, kept on uninstall with `crds.keep`, labelled like the release.
/// (Templates rather than the chart's `crds/` folder, which Helm never upgrades.)
fn helm_crd_template(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> String {
    let name = crd.metadata.name.as_deref().expect("a CRD has a name");
    assert!(
        crd.metadata.labels.is_none() && crd.metadata.annotations.is_none(),
        "{name}: the template adds labels and annotations itself"
    );
    let yaml = serde_yaml::to_string(crd).expect("a CRD always serialises");
    assert!(
        !yaml.contains("{{") && !yaml.contains("}}"),
        "{name}: the CRD text contains template delimiters; escape them here"
    );
    let plain_metadata = format!("metadata:\n  name: {name}\n");
    assert!(
        yaml.contains(&plain_metadata),
        "{name}: unexpected metadata layout"
    );
    let metadata = format!(
        "metadata:
  name: {name}
  labels:
    {{{{- include \"moe-operator.labels\" . | nindent 4 }}}}
  {{{{- if .Values.crds.keep }}}}
  annotations:
    # Deleting a CRD deletes every object of its kind: keep it on uninstall.
    helm.sh/resource-policy: keep
  {{{{- end }}}}
"
    );
    format!(
        "# Generated from the Rust types in crds/ -- do not edit. Regenerate with\n\
         #   {REGENERATE}\n\
         {{{{- if .Values.crds.enabled }}}}\n\
         {}\
         {{{{- end }}}}\n",
        yaml.replacen(&plain_metadata, &metadata, 1)
    )
}

#[test]
fn chart_crd_templates_are_up_to_date() {
    let dir = chart_templates();
    let regenerate = std::env::var("MOE_REGENERATE").is_ok_and(|v| v == "1");
    let mut expected = Vec::new();
    for crd in moe_crds::crds() {
        let plural = crd.spec.names.plural.clone();
        let file = format!("crd-{plural}.yaml");
        let text = helm_crd_template(&crd);
        let path = dir.join(&file);
        if regenerate {
            std::fs::write(&path, &text).expect("writing the chart's CRD template");
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == text,
            "charts/moe-operator/templates/{file} is stale or missing: regenerate it with\n  {REGENERATE}"
        );
        expected.push(file);
    }
    // A CRD removed from the Rust types must not linger in the chart.
    for entry in std::fs::read_dir(&dir).expect("the chart's templates exist") {
        let file = entry
            .expect("readable")
            .file_name()
            .to_string_lossy()
            .into_owned();
        if file.starts_with("crd-") {
            assert!(
                expected.contains(&file),
                "charts/moe-operator/templates/{file} is no CRD of the Rust types: delete it"
            );
        }
    }
}
