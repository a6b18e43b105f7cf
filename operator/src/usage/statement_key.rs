//! The operator's statement key: an Ed25519 key made once and kept in the Secret
//! `darkcore-statement-key`, its verification key published in the ConfigMap of that name.

use std::collections::BTreeMap;

use darkcore_statement::KeyPair;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::{Api, Client};

use crate::enroll::{MadeOnce, secret_made_once};

/// The Secret with the signing key and the ConfigMap with the verification key.
pub const STATEMENT_KEY: &str = "darkcore-statement-key";
/// The Secret's key holding the PKCS#8 document.
const PRIVATE_KEY: &str = "ed25519.pk8";
/// The ConfigMap's key holding the verification key, base64.
pub const PUBLIC_KEY: &str = "ed25519.pub";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{action}: {source}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "the Secret {namespace}/{STATEMENT_KEY} does not hold a statement key: {reason}; restore it from a backup (statements it signed verify only with it), or delete it to make a new one"
    )]
    Corrupt { namespace: String, reason: String },
    #[error("{0}")]
    Generate(String),
}

/// The statement key in `namespace`, made if there is none yet (two callers racing both end
/// with the one that was stored).
pub async fn ensure(client: &Client, namespace: &str) -> Result<KeyPair, KeyError> {
    let make = || KeyPair::generate_pkcs8().map(|document| key_secret(namespace, document));
    let secret = secret_made_once(client, namespace, STATEMENT_KEY, make)
        .await
        .map_err(|failed| match failed {
            MadeOnce::Kube { action, source } => KeyError::Kube { action, source },
            MadeOnce::Make(error) => KeyError::Generate(error),
        })?;
    from_secret(&secret, namespace)
}

/// The Secret holding a new key's PKCS#8 `document`.
fn key_secret(namespace: &str, document: Vec<u8>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(STATEMENT_KEY.into()),
            namespace: Some(namespace.into()),
            labels: Some(
                [(
                    "app.kubernetes.io/part-of".to_string(),
                    "darkcore".to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            PRIVATE_KEY.to_string(),
            ByteString(document),
        )])),
        ..Default::default()
    }
}

fn from_secret(secret: &Secret, namespace: &str) -> Result<KeyPair, KeyError> {
    let corrupt = |reason: String| KeyError::Corrupt {
        namespace: namespace.into(),
        reason,
    };
    let document = secret
        .data
        .as_ref()
        .and_then(|d| d.get(PRIVATE_KEY))
        .ok_or_else(|| corrupt(format!("{PRIVATE_KEY} is missing")))?;
    KeyPair::from_pkcs8(&document.0).map_err(corrupt)
}

/// Publishes the verification key in the ConfigMap (server-side apply: made or corrected).
pub async fn publish(client: &Client, namespace: &str, key: &KeyPair) -> Result<(), KeyError> {
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let map = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": STATEMENT_KEY,
            "labels": { "app.kubernetes.io/part-of": "darkcore" },
        },
        "data": { PUBLIC_KEY: key.public_base64() },
    });
    maps.patch(
        STATEMENT_KEY,
        &PatchParams::apply("darkcore-operator").force(),
        &Patch::Apply(map),
    )
    .await
    .map(|_| ())
    .map_err(|source| KeyError::Kube {
        action: format!("publishing the ConfigMap {namespace}/{STATEMENT_KEY}"),
        source,
    })
}
