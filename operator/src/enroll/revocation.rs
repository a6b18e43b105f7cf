//! Revoked devices, kept in the ConfigMap `darkcore-revoked-devices` in the operator's
//! namespace: one key per device id, the value saying when. Small (ids only), watched by
//! every operator replica, so a revocation cuts the device's stream off within seconds.

use std::collections::{BTreeMap, HashSet};

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

pub const REVOKED_CONFIGMAP: &str = "darkcore-revoked-devices";

/// A device id as `device revoke` accepts it: what `darkcore-agent join` was given.
pub fn valid_device_id(id: &str) -> bool {
    id.len() == 16
        && id.starts_with("dev-")
        && id[4..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    #[error(
        "{0:?} is not a device id: they look like dev-0123456789ab (see `darkcore-operator devices`)"
    )]
    BadId(String),
    #[error("{action}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
}

/// The revoked device ids in a ConfigMap's data.
pub fn revoked_ids(config_map: Option<&ConfigMap>) -> HashSet<String> {
    config_map
        .and_then(|cm| cm.data.as_ref())
        .map(|data| data.keys().cloned().collect())
        .unwrap_or_default()
}

/// Adds `id` to the revoked devices, creating the ConfigMap on first use.
pub async fn revoke(client: &Client, namespace: &str, id: &str) -> Result<(), RevokeError> {
    if !valid_device_id(id) {
        return Err(RevokeError::BadId(id.into()));
    }
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let when = Timestamp::now().to_string();
    let kube_err = |source| RevokeError::Kube {
        action: format!("recording the revocation of {id} in {namespace}/{REVOKED_CONFIGMAP}"),
        source,
    };
    let patch = json!({ "data": { id: when } });
    match maps
        .patch(
            REVOKED_CONFIGMAP,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => {
            let fresh = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(REVOKED_CONFIGMAP.into()),
                    namespace: Some(namespace.into()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/part-of".into(),
                        "darkcore".into(),
                    )])),
                    ..ObjectMeta::default()
                },
                data: Some(BTreeMap::from([(id.to_string(), when)])),
                ..ConfigMap::default()
            };
            match maps.create(&PostParams::default(), &fresh).await {
                Ok(_) => Ok(()),
                // Someone created it meanwhile: add to theirs.
                Err(kube::Error::Api(status)) if status.code == 409 => maps
                    .patch(
                        REVOKED_CONFIGMAP,
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await
                    .map(|_| ())
                    .map_err(kube_err),
                Err(e) => Err(kube_err(e)),
            }
        }
        Err(e) => Err(kube_err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_are_checked_before_anything_is_written() {
        assert!(valid_device_id("dev-0123456789ab"));
        for bad in [
            "",
            "dev-",
            "dev-0123456789AB",
            "0123456789abcdef",
            "dev-0123456789abc",
        ] {
            assert!(!valid_device_id(bad), "{bad}");
        }
    }

    #[test]
    fn revoked_ids_are_the_keys() {
        let cm = ConfigMap {
            data: Some(BTreeMap::from([("dev-0123456789ab".into(), "t".into())])),
            ..Default::default()
        };
        assert_eq!(
            revoked_ids(Some(&cm)),
            HashSet::from(["dev-0123456789ab".to_string()])
        );
        assert!(revoked_ids(None).is_empty());
    }
}
