//! The agent/operator gRPC contract, generated at build time from `proto/` with protox.
//! Both binaries depend on this crate, so they can never disagree on the wire format.

/// `darkcore.agent.v1`: the device stream.
pub mod agent {
    pub mod v1 {
        tonic::include_proto!("darkcore.agent.v1");
    }
}

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: agent::v1::ProtocolVersion = agent::v1::ProtocolVersion::V1;

#[cfg(test)]
mod tests {
    use super::agent::v1::{AgentMessage, Capabilities, Hello, agent_message};
    use prost::Message;

    #[test]
    fn a_hello_survives_the_wire() {
        let hello = AgentMessage {
            version: super::PROTOCOL_VERSION as i32,
            body: Some(agent_message::Body::Hello(Hello {
                agent_version: "0.1.0".into(),
                capabilities: Some(Capabilities {
                    os: "linux".into(),
                    arch: "arm64".into(),
                    cores: 4,
                    memory_bytes: 4 << 30,
                }),
            })),
        };
        let decoded = AgentMessage::decode(hello.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, hello);
    }

    #[test]
    fn a_truncated_frame_is_an_error_not_a_panic() {
        let bytes = AgentMessage {
            version: 1,
            body: Some(agent_message::Body::Hello(Hello::default())),
        }
        .encode_to_vec();
        assert!(AgentMessage::decode(&bytes[..bytes.len() - 1]).is_err());
    }
}
