//! Dialing the operator's gateway: its address, the TLS channel (the gateway's CA and, once
//! joined, this device's certificate), and fetching that CA at join time checked against the
//! pin in the join token, so the token is only ever sent to the real gateway.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};

use crate::digest::sha256_hex;

/// The name every gateway certificate carries; the agent verifies it whatever address it
/// dials, because trust comes from the pinned CA rather than from DNS.
pub const GATEWAY_NAME: &str = "darkcore-gateway";
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings, so a dead gateway or a NAT that dropped us is noticed within a minute.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(
        "{0:?} is not a gateway address: give host:port or https://host:port, as the platform team printed it"
    )]
    BadAddress(String),
    #[error("could not reach the gateway at {address}: {reason}")]
    Unreachable { address: String, reason: String },
    #[error(
        "the gateway at {address} is not the one this join token was made for (its CA does not match the token's pin): check the address, or ask for a token from this gateway's platform team"
    )]
    PinMismatch { address: String },
    #[error("setting up TLS: {0}")]
    Tls(String),
}

/// The gateway URL in canonical form: `https://host:port`.
pub fn server_uri(text: &str) -> Result<Uri, GatewayError> {
    let bad = || GatewayError::BadAddress(text.into());
    let with_scheme = if text.contains("://") {
        text.to_string()
    } else {
        format!("https://{text}")
    };
    let uri: Uri = with_scheme.parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("https")
        || uri.host().is_none_or(str::is_empty)
        || uri.port_u16().is_none()
    {
        return Err(bad());
    }
    Ok(uri)
}

/// A channel to the gateway that trusts only `ca_pem`, presenting `client` (cert, key PEM)
/// when given. It connects lazily, on the first call.
pub fn channel(
    uri: &Uri,
    ca_pem: &str,
    client: Option<(&str, &str)>,
) -> Result<Channel, GatewayError> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(GATEWAY_NAME);
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let endpoint = Endpoint::from(uri.clone())
        .tls_config(tls)
        .map_err(|e| GatewayError::Tls(e.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .tcp_keepalive(Some(KEEPALIVE_INTERVAL))
        // Exec streams share the connection with Attach: small stream windows under a large
        // connection window keep room for heartbeats however many streams are stuck.
        .initial_stream_window_size(darkcore_proto::STREAM_WINDOW)
        .initial_connection_window_size(darkcore_proto::CONNECTION_WINDOW);
    Ok(endpoint.connect_lazy())
}

/// Fetches the gateway's CA certificate (PEM) and checks it against `pin`, the SHA-256 of
/// the CA in the join token. Nothing secret is sent on this connection.
pub async fn fetch_pinned_ca(uri: &Uri, pin: &str) -> Result<String, GatewayError> {
    let address = format!(
        "{}:{}",
        uri.host().unwrap_or_default(),
        uri.port_u16().unwrap_or(443)
    );
    let unreachable = |reason: String| GatewayError::Unreachable {
        address: address.clone(),
        reason,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let recorder = Arc::new(ChainRecorder {
        provider: provider.clone(),
        chain: Mutex::new(Vec::new()),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| GatewayError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let handshake = async {
        let tcp = tokio::net::TcpStream::connect(&address)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let name =
            ServerName::try_from(GATEWAY_NAME).map_err(|e| GatewayError::Tls(e.to_string()))?;
        connector
            .connect(name, tcp)
            .await
            .map_err(|e| unreachable(format!("TLS handshake failed: {e}")))
    };
    let _stream = tokio::time::timeout(CONNECT_TIMEOUT, handshake)
        .await
        .map_err(|_| unreachable("no answer within 10 s".into()))??;
    let chain = recorder
        .chain
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let ca = chain
        .iter()
        .find(|cert| sha256_hex(cert.as_ref()) == pin)
        .ok_or(GatewayError::PinMismatch { address })?;
    Ok(pem::encode(&pem::Pem::new(
        "CERTIFICATE",
        ca.as_ref().to_vec(),
    )))
}

/// Accepts any server certificate but records the chain. Used only to learn the CA, which is
/// then checked against the pin; the real connection verifies the gateway against that CA.
#[derive(Debug)]
struct ChainRecorder {
    provider: Arc<CryptoProvider>,
    chain: Mutex<Vec<CertificateDer<'static>>>,
}

impl ServerCertVerifier for ChainRecorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = self.chain.lock().unwrap_or_else(|e| e.into_inner());
        chain.push(end_entity.clone().into_owned());
        chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_accepted_with_or_without_scheme() {
        assert_eq!(
            server_uri("gw.example.com:7443").unwrap().to_string(),
            "https://gw.example.com:7443/"
        );
        assert_eq!(
            server_uri("https://127.0.0.1:7443").unwrap().port_u16(),
            Some(7443)
        );
        for bad in [
            "",
            "gw.example.com",
            "http://gw:7443",
            "https://:7443",
            "a b:1",
        ] {
            let err = server_uri(bad).unwrap_err().to_string();
            assert!(err.contains("host:port"), "{bad}: {err}");
        }
    }
}
