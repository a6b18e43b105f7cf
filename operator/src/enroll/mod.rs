//! Enrollment: how a device earns an identity. The operator keeps a CA (`ca`) and join tokens
//! (`token` is the pure format and rules, `token_store` keeps them hashed in Secrets in the
//! operator's namespace, `redeem` counts their uses as devices join).
//!
//! ```text
//!  darkcore-operator token create ──> Secret darkcore-token-<id> (sha256 of the secret only)
//!        │ prints once: dct1.<id>.<secret>.<ca-pin>
//!        v
//!  darkcore-agent join --token ... ──> checks the gateway's CA against <ca-pin> before
//!                                      sending the token, then trades it for a device cert
//! ```

pub mod ca;
pub mod redeem;
pub mod revocation;
pub mod token;
pub mod token_store;

/// Why a Secret made once (the CA, the statement key) could not be had: the API server's
/// refusal, named by what was being done, or `make`'s own error.
pub enum MadeOnce<E> {
    Kube { action: String, source: kube::Error },
    Make(E),
}

/// The Secret `name` in `namespace`: the one stored, or else the one `make` builds, created
/// now. Two callers racing to create it both end with the one that was stored.
pub async fn secret_made_once<E>(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    make: impl FnOnce() -> Result<k8s_openapi::api::core::v1::Secret, E>,
) -> Result<k8s_openapi::api::core::v1::Secret, MadeOnce<E>> {
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(client.clone(), namespace);
    let failed = |doing: &str| {
        let action = format!("{doing} the Secret {namespace}/{name}");
        move |source| MadeOnce::Kube { action, source }
    };
    if let Some(secret) = secrets.get_opt(name).await.map_err(failed("reading"))? {
        return Ok(secret);
    }
    let fresh = make().map_err(MadeOnce::Make)?;
    match secrets.create(&Default::default(), &fresh).await {
        Ok(created) => Ok(created),
        Err(kube::Error::Api(status)) if status.code == 409 => {
            secrets.get(name).await.map_err(failed("reading"))
        }
        Err(source) => Err(failed("creating")(source)),
    }
}

/// The text under `key` in a Secret's data: `Ok(None)` when the key is absent, an error naming
/// the key when its bytes are not UTF-8. Shared by the CA and token Secrets.
pub fn secret_text(
    secret: &k8s_openapi::api::core::v1::Secret,
    key: &str,
) -> Result<Option<String>, String> {
    secret
        .data
        .as_ref()
        .and_then(|data| data.get(key))
        .map(|bytes| String::from_utf8(bytes.0.clone()).map_err(|_| format!("{key} is not text")))
        .transpose()
}
