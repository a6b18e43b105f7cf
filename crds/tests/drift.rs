//! The committed CRD YAML, and the Helm chart's copy of it, must be exactly what the Rust
//! types generate.

const COMMITTED: &str = include_str!("../generated/crds.yaml");
const IN_CHART: &str = include_str!("../../charts/darkcore/crds/crds.yaml");

#[test]
fn committed_crd_yaml_matches_the_rust_types() {
    let generated = darkcore_crds::crd_yaml().expect("CRD renders");
    for (path, committed) in [
        ("crds/generated/crds.yaml", COMMITTED),
        ("charts/darkcore/crds/crds.yaml", IN_CHART),
    ] {
        assert!(
            generated == committed,
            "{path} is out of date with crds/src: run `make crds` and commit the result"
        );
    }
}
