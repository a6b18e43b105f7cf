//! The agent gateway: gRPC over TLS on one port. `Enrollment.Join` needs no client
//! certificate (the token is the credential); `AgentGateway.Attach` requires the device
//! certificate that Join issued, so one device cannot act as another.
//!
//! ```text
//!  agent ──TLS──> Join(token, CSR) ──> redeem::Redeemer ──> tls::sign_device
//!  agent ─mTLS──> Attach(stream) ──> attach::AgentStream ──> devices::Registry (soft state)
//!  agent ─mTLS──> OpenStream(stream) ──> streams::StreamBroker ──> the kubelet API's exec
//! ```

pub mod attach;
pub mod bounds;
pub mod endpoint;
pub mod join;
pub mod join_limit;
pub mod streams;

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

/// Pending connections the kernel queues for the gateway (capped by `net.core.somaxconn`).
/// After an operator restart every agent redials at once; the default of 128 overflowed at
/// 19,500 agents, so handshakes were reset and agents backed off for minutes.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr` and returns the server future. Binding happens first, so a port in use fails
/// start-up with a clear error.
pub async fn serve(
    addr: SocketAddr,
    ca: &CaMaterial,
    serving: crate::tls::ServingIdentity,
    join: join::JoinService,
    attach: attach::AttachService,
) -> anyhow::Result<impl Future<Output = Result<(), tonic::transport::Error>> + use<>> {
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(serving.chain_pem, serving.key_pem))
        .client_ca_root(Certificate::from_pem(&ca.cert_pem))
        // Join comes without a certificate; Attach checks for one itself.
        .client_auth_optional(true)
        .timeout(Duration::from_secs(10));
    let listener = listen(addr, LISTEN_BACKLOG).with_context(|| {
        format!("binding the agent gateway to {addr} (set --gateway-addr to a free address)")
    })?;
    tracing::info!(addr = %listener.local_addr()?, "agent gateway listening (gRPC over TLS)");
    let router = Server::builder()
        .tls_config(tls)
        .context("configuring the gateway's TLS")?
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .tcp_keepalive(Some(KEEPALIVE_INTERVAL))
        // Exec and port-forward streams share an agent's connection with its Attach stream:
        // small stream windows under a large connection window keep room for heartbeats.
        .initial_stream_window_size(Some(streams::STREAM_WINDOW))
        .initial_connection_window_size(Some(streams::CONNECTION_WINDOW))
        // tonic leaves HTTP/2 streams unlimited: a device could open OpenStream calls without
        // end, each held until its first message or 10 s.
        .max_concurrent_streams(Some(darkcore_proto::MAX_CALLS_PER_CONNECTION))
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

/// Binds `addr` like `TcpListener::bind` (address reuse on), but with a chosen backlog.
fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listen_reports_a_port_in_use() {
        let first = listen("127.0.0.1:0".parse().unwrap(), LISTEN_BACKLOG).unwrap();
        let taken = first.local_addr().unwrap();
        let second = listen(taken, LISTEN_BACKLOG).unwrap_err();
        assert_eq!(second.kind(), std::io::ErrorKind::AddrInUse);
    }
}
