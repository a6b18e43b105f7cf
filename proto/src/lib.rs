//! The agent/operator gRPC contract, generated at build time from `proto/` with protox, and
//! the rules both sides apply to it: which protocol version they speak, how large a frame is.

/// `darkcore.agent.v1`: enrollment and the device stream.
pub mod agent {
    pub mod v1 {
        tonic::include_proto!("darkcore.agent.v1");
    }
}

pub mod codec;
pub mod join_token;

/// Registry credentials print without their password.
impl std::fmt::Debug for agent::v1::RegistryCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryCredential")
            .field("registry", &self.registry)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

use agent::v1::ProtocolVersion;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: ProtocolVersion = ProtocolVersion::V1;

/// The largest encoded message either side accepts (and sends). Log chunks and volume files
/// are split below it; a larger frame is refused rather than buffered.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// User streams (exec, port-forward) one device carries at once, each an `OpenStream` call on
/// the agent's connection. With [`STREAM_WINDOW`] each, a device's stuck streams hold at most
/// 128 × 256 KiB of the connection's window, which [`CONNECTION_WINDOW`] exceeds: heartbeats on
/// the same connection always have room. Both ends set both windows.
pub const MAX_STREAMS_PER_DEVICE: usize = 128;
/// HTTP/2 flow-control window of each gRPC stream: what one may have in flight unread.
pub const STREAM_WINDOW: u32 = 256 * 1024;
/// HTTP/2 flow-control window of a whole agent connection.
pub const CONNECTION_WINDOW: u32 = MAX_CALLS_PER_CONNECTION * STREAM_WINDOW;
/// Calls open at once on one agent connection (Attach, the user streams, and room for a
/// reconnect's overlap): past it the gateway refuses new ones, so a device cannot hold
/// unanswered calls without end. It sizes [`CONNECTION_WINDOW`] too.
pub const MAX_CALLS_PER_CONNECTION: u32 = MAX_STREAMS_PER_DEVICE as u32 + 16;

/// A peer wrote in a protocol version this build does not speak.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "protocol version {theirs} is not supported: this {ours_side} speaks version {ours}; upgrade the older of darkcore-agent and darkcore-operator"
)]
pub struct UnsupportedVersion {
    /// The version number the peer sent (0 when it sent none).
    pub theirs: i32,
    pub ours: i32,
    /// "agent" or "operator": the side that refuses.
    pub ours_side: &'static str,
}

/// Checks the version field of a received message.
pub fn check_version(theirs: i32, ours_side: &'static str) -> Result<(), UnsupportedVersion> {
    if theirs == PROTOCOL_VERSION as i32 {
        Ok(())
    } else {
        Err(UnsupportedVersion {
            theirs,
            ours: PROTOCOL_VERSION as i32,
            ours_side,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::agent::v1::{AgentMessage, Capabilities, Hello, Runtime, agent_message};
    use super::*;

    #[test]
    fn credentials_print_without_their_password() {
        let credential = agent::v1::RegistryCredential {
            registry: "r.example".into(),
            username: "alice".into(),
            password: "hunter2".into(),
        };
        let printed = format!("{credential:?}");
        assert!(
            printed.contains("alice") && !printed.contains("hunter2"),
            "{printed}"
        );
    }
    use prost::Message;

    fn hello() -> AgentMessage {
        AgentMessage {
            version: PROTOCOL_VERSION as i32,
            body: Some(agent_message::Body::Hello(Hello {
                agent_version: "0.1.0".into(),
                capabilities: Some(Capabilities {
                    os: "linux".into(),
                    arch: "arm64".into(),
                    cores: 4,
                    memory_bytes: 4 << 30,
                    disk_bytes: 64 << 30,
                    runtimes: vec![Runtime::Oci as i32, Runtime::Wasm as i32],
                }),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn a_hello_survives_the_wire() {
        let decoded = AgentMessage::decode(hello().encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, hello());
    }

    #[test]
    fn a_truncated_frame_is_an_error_not_a_panic() {
        let bytes = hello().encode_to_vec();
        assert!(AgentMessage::decode(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn the_same_version_is_accepted() {
        assert_eq!(check_version(1, "operator"), Ok(()));
    }

    #[test]
    fn another_version_is_refused_naming_both() {
        let err = check_version(7, "operator").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("version 7") && text.contains("speaks version 1"),
            "{text}"
        );
        assert_eq!(check_version(0, "agent").unwrap_err().theirs, 0);
    }
}
