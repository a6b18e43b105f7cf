//! `darkcore-agent join`: make a key pair here, check the gateway against the token's CA pin,
//! trade the token and a certificate request for a device certificate, keep it all in the
//! state dir. The private key never leaves the device.

use std::path::Path;

use darkcore_proto::PROTOCOL_VERSION;
use darkcore_proto::agent::v1::JoinRequest;
use darkcore_proto::agent::v1::enrollment_client::EnrollmentClient;
use darkcore_proto::join_token::{JoinToken, MalformedToken};
use rcgen::{CertificateParams, KeyPair};

use crate::capabilities;
use crate::gateway::{self, GatewayError};
use crate::identity::{DeviceRecord, Identity, IdentityError};
use crate::policy::AgentConfig;

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Token(#[from] MalformedToken),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error("making this device's key: {0}")]
    Key(#[source] rcgen::Error),
    #[error("detecting this device: {0}")]
    Capabilities(#[from] capabilities::Error),
    /// The gateway's own words: why it refused, and what to do.
    #[error("the gateway refused to join this device: {0}")]
    Refused(String),
    #[error("the gateway could not be reached during the join: {0}")]
    Transport(String),
}

/// Joins the pool the token is for and saves the identity in `state_dir`.
pub async fn join(
    server: &str,
    token_text: &str,
    state_dir: &Path,
    config: &AgentConfig,
) -> Result<Identity, JoinError> {
    let token: JoinToken = token_text.parse()?;
    Identity::ensure_absent(state_dir)?;
    let uri = gateway::server_uri(server)?;
    let ca_pem = gateway::fetch_pinned_ca(&uri, &token.ca_pin).await?;

    let key = KeyPair::generate().map_err(JoinError::Key)?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .map_err(JoinError::Key)?;
    let mut capabilities = capabilities::detect()?;
    capabilities.disk_bytes = capabilities::available_disk(state_dir).unwrap_or(0);
    config.testing.apply(&mut capabilities);
    let request = JoinRequest {
        version: PROTOCOL_VERSION as i32,
        token: token.to_string(),
        csr_der: csr.der().to_vec(),
        capabilities: Some(capabilities),
        labels: config.labels.clone().into_iter().collect(),
        hostname: hostname(),
    };
    let channel = gateway::channel(&uri, &ca_pem, None)?;
    let response = EnrollmentClient::new(channel)
        .join(request)
        .await
        .map_err(|status| match status.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown => {
                JoinError::Transport(status.message().to_string())
            }
            _ => JoinError::Refused(status.message().to_string()),
        })?
        .into_inner();
    let identity = Identity {
        device: DeviceRecord {
            device_id: response.device_id,
            pool: response.pool,
            server: uri.to_string().trim_end_matches('/').to_string(),
        },
        key_pem: key.serialize_pem(),
        cert_pem: response.certificate_pem,
        ca_pem: response.ca_pem,
    };
    identity.save(state_dir)?;
    Ok(identity)
}

/// This machine's host name, for people reading device listings.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}
