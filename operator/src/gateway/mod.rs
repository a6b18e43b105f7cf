//! The agent gateway: gRPC over TLS on one port. `Enrollment.Join` needs no client
//! certificate (the token is the credential); `AgentGateway.Attach` requires the device
//! certificate that Join issued, so one device cannot act as another.
//!
//! ```text
//!  agent ──TLS──> Join(token, CSR) ──> token_store::redeem ──> tls::sign_device
//!  agent ─mTLS──> Attach(stream) ──> attach::AgentStream ──> devices::Registry (soft state)
//! ```

pub mod attach;
pub mod endpoint;
pub mod join;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use darkcore_proto::MAX_MESSAGE_BYTES;
use darkcore_proto::agent::v1::agent_gateway_server::AgentGatewayServer;
use darkcore_proto::agent::v1::enrollment_server::EnrollmentServer;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::enroll::ca::CaMaterial;

/// HTTP/2 pings on idle agent connections, so dead peers and silent NATs are noticed.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Binds `addr` and returns the server future. Binding happens first, so a port in use fails
/// start-up with a clear error.
pub async fn serve(
    addr: SocketAddr,
    ca: &CaMaterial,
    serving: tls::ServingIdentity,
    join: join::JoinService,
    attach: attach::AttachService,
) -> anyhow::Result<impl Future<Output = Result<(), tonic::transport::Error>> + use<>> {
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(serving.chain_pem, serving.key_pem))
        .client_ca_root(Certificate::from_pem(&ca.cert_pem))
        // Join comes without a certificate; Attach checks for one itself.
        .client_auth_optional(true)
        .timeout(Duration::from_secs(10));
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("binding the agent gateway to {addr} (set --gateway-addr to a free address)")
    })?;
    tracing::info!(addr = %listener.local_addr()?, "agent gateway listening (gRPC over TLS)");
    let router = Server::builder()
        .tls_config(tls)
        .context("configuring the gateway's TLS")?
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .tcp_keepalive(Some(KEEPALIVE_INTERVAL))
        .add_service(
            EnrollmentServer::new(join)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            AgentGatewayServer::new(attach)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        );
    Ok(router.serve_with_incoming(TcpListenerStream::new(listener)))
}
