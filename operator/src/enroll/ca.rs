//! The operator's CA: it signs the gateway's serving certificate and every device certificate.
//! Kept in the Secret `darkcore-ca` (type kubernetes.io/tls) in the operator's namespace and
//! created on first use, so every operator replica and restart shares it.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::ObjectMeta;

use super::{MadeOnce, secret_made_once};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

pub const CA_SECRET: &str = "darkcore-ca";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("generating the CA")]
    Generate(#[source] rcgen::Error),
    #[error(
        "the Secret {namespace}/{CA_SECRET} does not hold a CA: {reason}; delete it and it will be made again (devices will have to join again)"
    )]
    Corrupt { namespace: String, reason: String },
    #[error("{action}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
}

/// The CA certificate and its private key, both PEM.
#[derive(Clone)]
pub struct CaMaterial {
    pub cert_pem: String,
    pub key_pem: String,
}

impl CaMaterial {
    pub fn generate() -> Result<CaMaterial, CaError> {
        let key = KeyPair::generate().map_err(CaError::Generate)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(CaError::Generate)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params
            .distinguished_name
            .push(DnType::CommonName, "darkcore device CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = std::time::SystemTime::now();
        params.not_before = now.into();
        params.not_after = (now + std::time::Duration::from_secs(10 * 365 * 86_400)).into();
        let cert = params.self_signed(&key).map_err(CaError::Generate)?;
        Ok(CaMaterial {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// The certificate in DER, which token pins hash.
    pub fn cert_der(&self) -> Result<Vec<u8>, String> {
        let block = pem::parse(&self.cert_pem).map_err(|e| format!("tls.crt is not PEM: {e}"))?;
        if block.tag() != "CERTIFICATE" {
            return Err(format!(
                "tls.crt holds a {}, not a CERTIFICATE",
                block.tag()
            ));
        }
        Ok(block.contents().to_vec())
    }

    fn to_secret(&self, namespace: &str) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(CA_SECRET.into()),
                namespace: Some(namespace.into()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/part-of".into(),
                    "darkcore".into(),
                )])),
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(BTreeMap::from([
                (
                    "tls.crt".into(),
                    ByteString(self.cert_pem.clone().into_bytes()),
                ),
                (
                    "tls.key".into(),
                    ByteString(self.key_pem.clone().into_bytes()),
                ),
            ])),
            ..Secret::default()
        }
    }

    fn from_secret(secret: &Secret, namespace: &str) -> Result<CaMaterial, CaError> {
        let field = |key: &str| -> Result<String, CaError> {
            super::secret_text(secret, key)
                .and_then(|text| text.ok_or_else(|| format!("{key} is missing")))
                .map_err(|reason| CaError::Corrupt {
                    namespace: namespace.into(),
                    reason,
                })
        };
        let material = CaMaterial {
            cert_pem: field("tls.crt")?,
            key_pem: field("tls.key")?,
        };
        material.cert_der().map_err(|reason| CaError::Corrupt {
            namespace: namespace.into(),
            reason,
        })?;
        Ok(material)
    }
}

/// The CA in `namespace`, created if it does not exist yet. Two callers racing to create it
/// both end up with the one that won.
pub async fn ensure(client: &Client, namespace: &str) -> Result<CaMaterial, CaError> {
    let make = || CaMaterial::generate().map(|fresh| fresh.to_secret(namespace));
    let secret = secret_made_once(client, namespace, CA_SECRET, make)
        .await
        .map_err(|failed| match failed {
            MadeOnce::Kube { action, source } => CaError::Kube { action, source },
            MadeOnce::Make(error) => error,
        })?;
    CaMaterial::from_secret(&secret, namespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_ca_round_trips_through_its_secret() {
        let ca = CaMaterial::generate().unwrap();
        let back = CaMaterial::from_secret(&ca.to_secret("ns"), "ns").unwrap();
        assert_eq!(back.cert_der().unwrap(), ca.cert_der().unwrap());
        assert!(back.key_pem.contains("PRIVATE KEY"));
    }

    #[test]
    fn a_secret_without_a_certificate_is_reported_as_corrupt_with_the_fix() {
        let mut secret = CaMaterial::generate().unwrap().to_secret("ns");
        secret.data.as_mut().unwrap().remove("tls.crt");
        let err = CaMaterial::from_secret(&secret, "ns")
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("tls.crt is missing") && err.contains("delete it"),
            "{err}"
        );
    }
}
