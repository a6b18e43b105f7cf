//! Renders the CRDs as the YAML that is committed under `crds/generated/` and shipped in the
//! Helm chart. `darkcore-operator crds` prints the same text.

use kube::CustomResourceExt;

use crate::{DevicePool, DeviceReputation, PoolUsage};

/// Failure to render a CRD as YAML.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("rendering the {kind} CRD as YAML")]
    Yaml {
        kind: &'static str,
        #[source]
        source: serde_norway::Error,
    },
}

/// Every darkcore CRD, as one multi-document YAML text.
pub fn crd_yaml() -> Result<String, Error> {
    let mut text =
        "# Generated from crds/src by `make crds` (darkcore-operator crds). Do not edit.\n"
            .to_string();
    for (kind, crd) in [
        ("DevicePool", DevicePool::crd()),
        ("PoolUsage", PoolUsage::crd()),
        ("DeviceReputation", DeviceReputation::crd()),
    ] {
        let body = serde_norway::to_string(&crd).map_err(|source| Error::Yaml { kind, source })?;
        text.push_str("---\n");
        text.push_str(&body);
    }
    Ok(text)
}
