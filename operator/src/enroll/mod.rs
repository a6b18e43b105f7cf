//! Enrollment: how a device earns an identity. The operator keeps a CA (`ca`) and join tokens
//! (`token` is the pure format and rules, `token_store` keeps them hashed in Secrets in the
//! operator's namespace).
//!
//! ```text
//!  darkcore-operator token create ──> Secret darkcore-token-<id> (sha256 of the secret only)
//!        │ prints once: dct1.<id>.<secret>.<ca-pin>
//!        v
//!  darkcore-agent join --token ... ──> checks the gateway's CA against <ca-pin> before
//!                                      sending the token, then trades it for a device cert
//! ```

pub mod ca;
pub mod token;
pub mod token_store;
