//! The committed CRD YAML must be exactly what the Rust types generate.

const COMMITTED: &str = include_str!("../generated/devicepools.darkcore.io.yaml");

#[test]
fn committed_crd_yaml_matches_the_rust_types() {
    let generated = darkcore_crds::crd_yaml().expect("CRD renders");
    assert!(
        generated == COMMITTED,
        "crds/generated/devicepools.darkcore.io.yaml is out of date with crds/src: run `make crds` and commit the result"
    );
}
