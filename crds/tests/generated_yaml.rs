//! The committed CRD YAML must be what the Rust types generate.

#[test]
fn committed_crd_yaml_is_up_to_date() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crds/moe-crds.yaml");
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == moe_crds::crds_yaml(),
        "deploy/crds/moe-crds.yaml is stale: regenerate it with\n  cargo run --bin moectl -- crds > deploy/crds/moe-crds.yaml"
    );
}
