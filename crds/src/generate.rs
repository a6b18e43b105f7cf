//! Renders the CRDs as the YAML that is committed under `crds/generated/` and shipped in the
//! Helm chart. `darkcore-operator crds` prints the same text.

use kube::CustomResourceExt;

use crate::DevicePool;

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
    let body = serde_norway::to_string(&DevicePool::crd()).map_err(|source| Error::Yaml {
        kind: "DevicePool",
        source,
    })?;
    Ok(format!(
        "# Generated from crds/src by `make crds` (darkcore-operator crds). Do not edit.\n---\n{body}"
    ))
}
