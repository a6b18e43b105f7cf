//! Join tokens kept in Secrets: one Secret `darkcore-token-<id>` per token, labelled for
//! listing, holding the SHA-256 of the secret (never the secret) and the token's limits.

use std::collections::BTreeMap;
use std::time::Duration;

use darkcore_crds::DevicePool;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::enroll::token::{JoinToken, TokenRecord};
use crate::enroll::{ca, secret_text};

/// Label on every token Secret; its value is "true".
pub const TOKEN_LABEL: &str = "darkcore.io/join-token";
const POOL_LABEL: &str = "darkcore.io/pool";
const SECRET_TYPE: &str = "darkcore.io/join-token";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("there is no DevicePool named {0:?}: see `kubectl get devicepools`")]
    NoPool(String),
    #[error(
        "the namespace {0:?} does not exist: create it, or pass --namespace with the operator's namespace"
    )]
    NoNamespace(String),
    #[error("there is no join token with id {0:?}: see `darkcore-operator token list`")]
    UnknownToken(String),
    #[error("the Secret {name} is not a readable join token: {reason}")]
    Corrupt { name: String, reason: String },
    #[error(transparent)]
    Ca(#[from] ca::CaError),
    #[error("{0}")]
    Token(#[from] crate::enroll::token::TokenError),
    #[error("{action}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
}

/// Names what was being done when the API call failed.
pub(crate) fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> StoreError {
    let action = action.into();
    move |source| StoreError::Kube { action, source }
}

pub fn secret_name(id: &str) -> String {
    format!("darkcore-token-{id}")
}

pub fn to_secret(record: &TokenRecord, namespace: &str) -> Secret {
    let text = |s: String| ByteString(s.into_bytes());
    let mut data = BTreeMap::from([
        ("pool".to_string(), text(record.pool.clone())),
        (
            "secret-sha256".to_string(),
            text(record.secret_sha256.clone()),
        ),
        ("created".to_string(), text(record.created.to_string())),
        ("expires".to_string(), text(record.expires.to_string())),
        ("uses".to_string(), text(record.uses.to_string())),
        ("revoked".to_string(), text(record.revoked.to_string())),
    ]);
    if let Some(max) = record.max_uses {
        data.insert("max-uses".into(), text(max.to_string()));
    }
    if let Some(owner) = &record.owner {
        data.insert("owner".into(), text(owner.clone()));
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(secret_name(&record.id)),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([
                (TOKEN_LABEL.to_string(), "true".to_string()),
                (POOL_LABEL.to_string(), record.pool.clone()),
            ])),
            ..ObjectMeta::default()
        },
        type_: Some(SECRET_TYPE.into()),
        data: Some(data),
        ..Secret::default()
    }
}

pub fn from_secret(secret: &Secret) -> Result<TokenRecord, StoreError> {
    let name = secret.name_any();
    let corrupt = |reason: String| StoreError::Corrupt {
        name: name.clone(),
        reason,
    };
    if secret.data.is_none() {
        return Err(corrupt("it has no data".into()));
    }
    let field = |key: &str| secret_text(secret, key).map_err(&corrupt);
    let required = |key: &str| field(key)?.ok_or_else(|| corrupt(format!("{key} is missing")));
    let time = |key: &str| -> Result<Timestamp, StoreError> {
        required(key)?
            .parse()
            .map_err(|e| corrupt(format!("{key} is not a time: {e}")))
    };
    let number = |key: &str, text: String| -> Result<u32, StoreError> {
        text.parse()
            .map_err(|_| corrupt(format!("{key} is not a number")))
    };
    let id = name
        .strip_prefix("darkcore-token-")
        .ok_or_else(|| corrupt("its name does not start with darkcore-token-".into()))?;
    Ok(TokenRecord {
        id: id.to_string(),
        pool: required("pool")?,
        secret_sha256: required("secret-sha256")?,
        created: time("created")?,
        expires: time("expires")?,
        max_uses: field("max-uses")?
            .map(|t| number("max-uses", t))
            .transpose()?,
        uses: number("uses", required("uses")?)?,
        revoked: required("revoked")? == "true",
        owner: field("owner")?
            .map(|o| crate::enroll::token::parse_owner(&o).map_err(&corrupt))
            .transpose()?,
    })
}

/// Creates a token for `pool` (which must exist), for devices of `owner` if given, and
/// returns it; only its hash is stored.
pub async fn create(
    client: &Client,
    namespace: &str,
    pool: &str,
    ttl: Duration,
    max_uses: Option<u32>,
    owner: Option<String>,
) -> Result<JoinToken, StoreError> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    if namespaces
        .get_opt(namespace)
        .await
        .map_err(kube_err(format!("reading namespace {namespace}")))?
        .is_none()
    {
        return Err(StoreError::NoNamespace(namespace.into()));
    }
    let pools: Api<DevicePool> = Api::all(client.clone());
    if pools
        .get_opt(pool)
        .await
        .map_err(kube_err(format!("reading DevicePool {pool}")))?
        .is_none()
    {
        return Err(StoreError::NoPool(pool.into()));
    }
    let ca = ca::ensure(client, namespace).await?;
    let der = ca.cert_der().map_err(|reason| StoreError::Corrupt {
        name: ca::CA_SECRET.into(),
        reason,
    })?;
    let token = crate::enroll::token::generate(&der)?;
    let record = TokenRecord {
        owner,
        ..TokenRecord::new(&token, pool, Timestamp::now(), ttl, max_uses)
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    secrets
        .create(&PostParams::default(), &to_secret(&record, namespace))
        .await
        .map_err(kube_err(format!("storing join token {}", token.id)))?;
    Ok(token)
}

pub async fn list(client: &Client, namespace: &str) -> Result<Vec<TokenRecord>, StoreError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let found = secrets
        .list(&ListParams::default().labels(&format!("{TOKEN_LABEL}=true")))
        .await
        .map_err(kube_err(format!("listing join tokens in {namespace}")))?;
    let mut records = found
        .items
        .iter()
        .map(from_secret)
        .collect::<Result<Vec<_>, _>>()?;
    records.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.id.cmp(&b.id)));
    Ok(records)
}

/// Marks a token revoked. It stays listed, so who could have joined with it is on record.
pub async fn revoke(client: &Client, namespace: &str, id: &str) -> Result<(), StoreError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let patch = json!({ "data": { "revoked": ByteString(b"true".to_vec()) } });
    match secrets
        .patch(
            &secret_name(id),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => {
            Err(StoreError::UnknownToken(id.into()))
        }
        Err(source) => Err(StoreError::Kube {
            action: format!("revoking join token {id}"),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_through_its_secret_without_the_secret() {
        let token = crate::enroll::token::generate(b"ca").unwrap();
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let record = TokenRecord::new(&token, "lab", now, Duration::from_secs(3600), Some(3));
        let secret = to_secret(&record, "darkcore-system");
        assert_eq!(from_secret(&secret).unwrap(), record);
        let owned = TokenRecord {
            owner: Some("alice".into()),
            ..record.clone()
        };
        assert_eq!(from_secret(&to_secret(&owned, "ns")).unwrap(), owned);
        let stored: Vec<u8> = secret
            .data
            .unwrap()
            .values()
            .flat_map(|v| v.0.clone())
            .collect();
        let stored = String::from_utf8(stored).unwrap();
        assert!(
            !stored.contains(&token.secret),
            "the plain secret must never be stored"
        );
    }

    #[test]
    fn a_damaged_secret_is_reported_by_name_and_field() {
        let token = crate::enroll::token::generate(b"ca").unwrap();
        let record = TokenRecord::new(
            &token,
            "lab",
            Timestamp::now(),
            Duration::from_secs(60),
            None,
        );
        let mut secret = to_secret(&record, "ns");
        secret
            .data
            .as_mut()
            .unwrap()
            .insert("uses".into(), ByteString(b"many".to_vec()));
        let err = from_secret(&secret).unwrap_err().to_string();
        assert!(
            err.contains(&secret_name(&token.id)) && err.contains("uses is not a number"),
            "{err}"
        );
    }
}
