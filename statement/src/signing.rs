//! The operator's statement key (Ed25519): statements are signed over the compact JSON of
//! their `statement` part, and checked against the verification key the operator publishes.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::Statement;

const ALGORITHM: &str = "Ed25519";

/// A statement with the operator's signature. The statement is kept as the JSON that was
/// signed, so that a checker needs nothing but this file and the verification key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SignedStatement {
    pub statement: serde_json::Value,
    pub signature: Signature,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    pub algorithm: String,
    /// The verification key, base64: which key signed it (it is trusted only if it is the
    /// one the operator publishes).
    pub key: String,
    /// The signature, base64.
    pub value: String,
}

/// Why a statement does not check out.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("not a signed statement: {0}")]
    Unreadable(String),
    #[error("signed with {0}; darkcore statements are signed with Ed25519")]
    Algorithm(String),
    #[error(
        "signed by key {signed_by}, not by the operator's key {trusted}: it was not issued by this operator (or the key changed; get the key the operator publishes)"
    )]
    UnknownKey { signed_by: String, trusted: String },
    #[error(
        "the signature does not match the statement: it was changed after the operator signed it"
    )]
    Mismatch,
}

/// The operator's signing key.
pub struct KeyPair {
    pair: Ed25519KeyPair,
}

impl KeyPair {
    /// A new key, as the PKCS#8 document to keep (in a Secret).
    pub fn generate_pkcs8() -> Result<Vec<u8>, String> {
        Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map(|doc| doc.as_ref().to_vec())
            .map_err(|_| "the system gave no randomness for a new key".to_string())
    }

    pub fn from_pkcs8(document: &[u8]) -> Result<KeyPair, String> {
        Ed25519KeyPair::from_pkcs8(document)
            .map(|pair| KeyPair { pair })
            .map_err(|error| format!("not an Ed25519 PKCS#8 key: {error}"))
    }

    /// The verification key, base64, as the operator publishes it.
    pub fn public_base64(&self) -> String {
        BASE64.encode(self.pair.public_key().as_ref())
    }

    pub fn sign(&self, statement: &Statement) -> SignedStatement {
        let statement = serde_json::to_value(statement).unwrap_or_default();
        let signed = self.pair.sign(&canonical(&statement));
        SignedStatement {
            statement,
            signature: Signature {
                algorithm: ALGORITHM.into(),
                key: self.public_base64(),
                value: BASE64.encode(signed.as_ref()),
            },
        }
    }
}

/// The bytes signed: the statement as compact JSON (serde_json writes a parsed document's
/// keys back in the same order, so the signer's and a checker's bytes are the same).
fn canonical(statement: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(statement).unwrap_or_default()
}

/// The line that carries the signed statement under its CSV rows.
const CSV_SIGNED: &str = "# signed: ";

impl SignedStatement {
    /// As CSV: the statement's rows, then a comment line with the whole signed statement, so
    /// that the rows can be checked against what was signed.
    pub fn to_csv(&self) -> Result<String, VerifyError> {
        let statement: Statement = serde_json::from_value(self.statement.clone())
            .map_err(|e| VerifyError::Unreadable(e.to_string()))?;
        let signed = serde_json::to_string(self).unwrap_or_default();
        Ok(format!("{}{CSV_SIGNED}{signed}\n", statement.to_csv()))
    }
}

/// Checks a statement, as JSON or as CSV, against the `trusted` verification key (base64),
/// and returns the statement it vouches for. CSV rows must be exactly the signed ones.
pub fn verify(text: &str, trusted: &str) -> Result<Statement, VerifyError> {
    if text.trim_start().starts_with('{') {
        return verify_json(text, trusted);
    }
    let mut rows = String::new();
    let mut signed = None;
    for line in text.lines() {
        match line.strip_prefix(CSV_SIGNED) {
            Some(json) => signed = Some(json),
            None => {
                rows.push_str(line);
                rows.push('\n');
            }
        }
    }
    let signed = signed.ok_or_else(|| {
        VerifyError::Unreadable(format!(
            "neither JSON nor CSV with a {CSV_SIGNED:?} line (print it with -o json or -o csv)"
        ))
    })?;
    let statement = verify_json(signed, trusted)?;
    match statement.to_csv() == rows {
        true => Ok(statement),
        false => Err(VerifyError::Mismatch),
    }
}

fn verify_json(text: &str, trusted: &str) -> Result<Statement, VerifyError> {
    let signed: SignedStatement =
        serde_json::from_str(text).map_err(|e| VerifyError::Unreadable(e.to_string()))?;
    let signature = &signed.signature;
    if signature.algorithm != ALGORITHM {
        return Err(VerifyError::Algorithm(signature.algorithm.clone()));
    }
    if signature.key.trim() != trusted.trim() {
        return Err(VerifyError::UnknownKey {
            signed_by: signature.key.clone(),
            trusted: trusted.trim().to_string(),
        });
    }
    let key = BASE64
        .decode(trusted.trim())
        .map_err(|e| VerifyError::Unreadable(format!("the verification key: {e}")))?;
    let value = BASE64
        .decode(&signature.value)
        .map_err(|e| VerifyError::Unreadable(format!("the signature: {e}")))?;
    UnparsedPublicKey::new(&ED25519, key)
        .verify(&canonical(&signed.statement), &value)
        .map_err(|_| VerifyError::Mismatch)?;
    serde_json::from_value(signed.statement).map_err(|e| VerifyError::Unreadable(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Row, Standing, Subject};

    fn statement() -> Statement {
        Statement {
            subject: Subject::Device("dev-a".into()),
            from_day: "2026-12-01".into(),
            to_day: "2026-12-01".into(),
            issued_at: "2026-12-01T12:00:00Z".into(),
            currency: "EUR".into(),
            rows: vec![Row {
                day: "2026-12-01".into(),
                pool: "lab".into(),
                device: "dev-a".into(),
                owner: Some("alice".into()),
                standing: Standing::Validated,
                attempts: 3,
                cpu_milliseconds: 7_200_000,
                memory_mib_seconds: 0,
                credit: "0.040000".into(),
            }],
            credit: "0.040000".into(),
        }
    }

    fn key() -> KeyPair {
        KeyPair::from_pkcs8(&KeyPair::generate_pkcs8().unwrap()).unwrap()
    }

    #[test]
    fn a_signed_statement_verifies_pretty_printed_and_not_once_edited() {
        let key = key();
        let text = serde_json::to_string_pretty(&key.sign(&statement())).unwrap();
        assert_eq!(verify(&text, &key.public_base64()), Ok(statement()));
        let edited = text.replace("\"0.040000\"", "\"4.000000\"");
        assert_ne!(edited, text);
        assert_eq!(
            verify(&edited, &key.public_base64()),
            Err(VerifyError::Mismatch)
        );
        let reordered = text.replace("\"attempts\": 3", "\"attempts\": 30");
        assert_eq!(
            verify(&reordered, &key.public_base64()),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn a_statement_signed_by_another_key_is_refused_even_with_its_own_key_inside() {
        let (ours, theirs) = (key(), key());
        let text = serde_json::to_string(&theirs.sign(&statement())).unwrap();
        let error = verify(&text, &ours.public_base64()).unwrap_err();
        assert!(matches!(error, VerifyError::UnknownKey { .. }), "{error}");
        // Claiming our key over their signature does not help.
        let forged = text.replace(&theirs.public_base64(), &ours.public_base64());
        assert_eq!(
            verify(&forged, &ours.public_base64()),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn csv_rows_verify_against_the_signed_line_and_not_once_edited() {
        let key = key();
        let csv = key.sign(&statement()).to_csv().unwrap();
        assert!(csv.starts_with("day,pool,device"), "{csv}");
        assert_eq!(verify(&csv, &key.public_base64()), Ok(statement()));
        let edited = csv.replacen(",0.040000", ",4.000000", 1);
        assert_ne!(edited, csv);
        assert_eq!(
            verify(&edited, &key.public_base64()),
            Err(VerifyError::Mismatch)
        );
        let unsigned = csv.lines().next().unwrap();
        assert!(matches!(
            verify(unsigned, &key.public_base64()),
            Err(VerifyError::Unreadable(_))
        ));
    }

    #[test]
    fn garbage_and_other_algorithms_are_named() {
        let key = key();
        assert!(matches!(
            verify("{\"statement\":", &key.public_base64()),
            Err(VerifyError::Unreadable(_))
        ));
        let mut signed = key.sign(&statement());
        signed.signature.algorithm = "none".into();
        let text = serde_json::to_string(&signed).unwrap();
        assert_eq!(
            verify(&text, &key.public_base64()),
            Err(VerifyError::Algorithm("none".into()))
        );
    }
}
