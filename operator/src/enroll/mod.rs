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
