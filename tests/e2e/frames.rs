//! The gateway against a misbehaving peer: a wrong protocol version, a truncated frame, an
//! oversized frame and a missing client certificate are each refused with a reason, and the
//! gateway keeps serving the well-behaved agent next to them; a flood of stream calls nobody
//! asked for is refused and bounded per connection.

use std::time::Duration;

use darkcore_agent::gateway;
use darkcore_agent::identity::Identity;
use darkcore_proto::agent::v1::agent_gateway_client::AgentGatewayClient;
use darkcore_proto::agent::v1::{
    AgentMessage, Hello, OperatorMessage, agent_message, operator_message, refusal::Code,
};
use darkcore_proto::{MAX_MESSAGE_BYTES, PROTOCOL_VERSION};
use futures::StreamExt;
use prost::Message;
use prost::bytes::{Buf, BufMut};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

use crate::devices::process_pool;
use crate::fleet::{self, Agent, node_cpu_is, token};
use crate::harness::PoolFixture;

/// Sends bytes exactly as given, so a test can put a broken frame on the wire; decodes the
/// operator's messages normally.
struct RawCodec;
struct RawEncoder;
struct MessageDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = OperatorMessage;
    type Encoder = RawEncoder;
    type Decoder = MessageDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> MessageDecoder {
        MessageDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for MessageDecoder {
    type Item = OperatorMessage;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<OperatorMessage>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        OperatorMessage::decode(bytes)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

fn hello(version: i32) -> AgentMessage {
    AgentMessage {
        version,
        body: Some(agent_message::Body::Hello(Hello {
            agent_version: "test".into(),
            ..Default::default()
        })),
    }
}

/// Sends `frames` raw on a new Attach stream; returns the refusal (code, message) the gateway
/// answered with, or the stream's error.
async fn attach_raw(channel: Channel, frames: Vec<Vec<u8>>) -> Result<(i32, String), Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    // Keep the request stream open after the frames, as a live agent would.
    let frames = futures::stream::iter(frames).chain(futures::stream::pending());
    let mut inbound = grpc
        .streaming(
            tonic::Request::new(frames),
            PathAndQuery::from_static("/darkcore.agent.v1.AgentGateway/Attach"),
            RawCodec,
        )
        .await?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(15), inbound.message())
        .await
        .expect("the gateway answers within 15 s")?;
    match first.and_then(|m| m.body) {
        Some(operator_message::Body::Refusal(r)) => Ok((r.code, r.message)),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn broken_frames_and_wrong_versions_are_refused_and_the_gateway_keeps_serving() {
    let fx = PoolFixture::start("frames", process_pool()).await;
    let port = fx.operator.gateway_port;
    let join_token = token(&fx.pool, &[]);
    let good = Agent::start(port, &join_token, 1.0).await;
    let nodes = fx.nodes();
    node_cpu_is(&nodes, &fx.node, 1000, Duration::from_secs(15)).await;

    // A second device, joined but driven by hand.
    let joined = fleet::join(port, &join_token, 1.0);
    assert!(joined.ok, "{}", joined.output);
    let identity = Identity::load(&joined.state_dir).unwrap();
    let uri = gateway::server_uri(&format!("127.0.0.1:{port}")).unwrap();
    let channel = || {
        gateway::channel(
            &uri,
            &identity.ca_pem,
            Some((&identity.cert_pem, &identity.key_pem)),
        )
        .unwrap()
    };

    let (code, message) = attach_raw(channel(), vec![hello(99).encode_to_vec()])
        .await
        .unwrap();
    assert_eq!(code, Code::UnsupportedVersion as i32);
    assert!(
        message.contains("version 99") && message.contains("speaks version 1"),
        "{message}"
    );

    let whole = hello(PROTOCOL_VERSION as i32).encode_to_vec();
    let truncated = whole[..whole.len() - 3].to_vec();
    let (code, message) = attach_raw(channel(), vec![truncated]).await.unwrap();
    assert_eq!(code, Code::Malformed as i32);
    assert!(message.contains("undecodable"), "{message}");

    let oversized = vec![0u8; MAX_MESSAGE_BYTES + 1024];
    match attach_raw(channel(), vec![oversized]).await {
        Ok((code, message)) => {
            assert_eq!(code, Code::Malformed as i32);
            assert!(message.contains("too_large"), "{message}");
        }
        Err(status) => assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}"),
    }

    // Without a device certificate there is no stream at all.
    let anonymous = gateway::channel(&uri, &identity.ca_pem, None).unwrap();
    let (_tx, rx) = tokio::sync::mpsc::channel::<AgentMessage>(1);
    let refused = AgentGatewayClient::new(anonymous)
        .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");
    assert!(
        refused.message().contains("darkcore-agent join"),
        "{refused}"
    );

    // The gateway still serves: the good agent never lost its stream, and the hand-driven
    // device attaches properly once it speaks properly.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(hello(PROTOCOL_VERSION as i32)).await.unwrap();
    let mut inbound = AgentGatewayClient::new(channel())
        .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let welcome = inbound.message().await.unwrap().unwrap();
    assert!(
        matches!(welcome.body, Some(operator_message::Body::Welcome(_))),
        "{welcome:?}"
    );
    let log = std::fs::read_to_string(&good.log).unwrap();
    assert_eq!(
        log.matches("attached to the gateway").count(),
        1,
        "the good agent kept its one stream: {log}"
    );
    let (_, metrics) = fx.operator.get("/metrics").await.unwrap();
    for reason in ["unsupported_version", "undecodable"] {
        assert!(
            metrics.contains(&format!(
                "darkcore_operator_frames_rejected_total{{reason=\"{reason}\"}} 1"
            )),
            "{reason}: {metrics}"
        );
    }
    drop(tx);
    fx.finish().await;
}

/// A device that floods the gateway with OpenStream calls nobody asked for (made-up stream ids,
/// and calls that never name one) gets each refused, holds at most `MAX_CALLS_PER_CONNECTION`
/// calls at once, and another device on the same pool keeps serving exec and its heartbeats
/// meanwhile.
#[tokio::test]
async fn a_device_flooding_open_stream_calls_is_refused_and_others_keep_serving() {
    use darkcore_proto::agent::v1::{StreamUp, stream_up};
    const MADE_UP: usize = 400;
    const SILENT: usize = 300;
    let bench = crate::pods::Bench::start("streamflood", 1, process_pool()).await;
    bench.create(bench.pod("shell", "sleep 600", "Never")).await;
    bench
        .phase_is("shell", "Running", Duration::from_secs(60))
        .await;
    let port = bench.fx.operator.gateway_port;
    let joined = fleet::join(port, &token(&bench.fx.pool, &[]), 1.0);
    assert!(joined.ok, "{}", joined.output);
    let identity = Identity::load(&joined.state_dir).unwrap();
    let uri = gateway::server_uri(&format!("127.0.0.1:{port}")).unwrap();
    let channel = gateway::channel(
        &uri,
        &identity.ca_pem,
        Some((&identity.cert_pem, &identity.key_pem)),
    )
    .unwrap();

    // Calls naming streams nobody opened, and calls that never say which stream they are.
    let made_up = (0..MADE_UP).map(|i| {
        let mut client = AgentGatewayClient::new(channel.clone());
        async move {
            let id = StreamUp {
                body: Some(stream_up::Body::StreamId(format!("made-up-{i}"))),
            };
            let up = futures::stream::iter([id]).chain(futures::stream::pending());
            match client.open_stream(up).await {
                Ok(mut down) => down.get_mut().message().await.err(),
                Err(status) => Some(status),
            }
        }
    });
    let started = std::time::Instant::now();
    let silent = (0..SILENT).map(|_| {
        let mut client = AgentGatewayClient::new(channel.clone());
        async move {
            let ended = match client.open_stream(futures::stream::pending()).await {
                Ok(mut down) => down.get_mut().message().await.err(),
                Err(status) => Some(status),
            };
            (ended, started.elapsed())
        }
    });
    let flood = tokio::spawn(futures::future::join(
        futures::future::join_all(made_up),
        futures::future::join_all(silent),
    ));

    // Meanwhile the other device serves: exec answers and its node stays Ready.
    let mut answered = 0;
    while !flood.is_finished() {
        let (code, out, err) = bench
            .kubectl_with_input(&["exec", "shell", "--", "echo", "alive"], b"")
            .await;
        assert_eq!((code, out.as_str()), (0, "alive\n"), "{err}");
        answered += 1;
        let node = bench.fx.nodes().get(&bench.fx.node).await.unwrap();
        let ready = node
            .status
            .and_then(|s| s.conditions)
            .and_then(|c| c.into_iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.status);
        assert_eq!(ready.as_deref(), Some("True"), "the other device's node");
    }
    let (made_up, silent) = flood.await.unwrap();
    eprintln!("{answered} execs answered during the flood");
    assert!(answered > 0);
    for refused in made_up {
        let refused = refused.expect("a made-up stream id is refused");
        assert_eq!(refused.code(), tonic::Code::NotFound, "{refused}");
        assert!(
            refused.message().contains("no stream with this id"),
            "{refused}"
        );
    }
    for (refused, _) in &silent {
        let refused = refused
            .as_ref()
            .expect("a call that never names its stream is ended");
        assert_eq!(refused.code(), tonic::Code::DeadlineExceeded, "{refused}");
    }
    // Each silent call holds a place on the connection for the 10 s the gateway waits, so
    // within 15 s no more can end than the connection admits at once; the rest wait their turn.
    let first_wave = silent
        .iter()
        .filter(|(_, ended)| *ended < Duration::from_secs(15))
        .count();
    eprintln!(
        "{first_wave} of {SILENT} silent calls ended within 15 s; the last after {:?}",
        silent.iter().map(|(_, ended)| *ended).max().unwrap()
    );
    assert!(
        first_wave <= darkcore_proto::MAX_CALLS_PER_CONNECTION as usize,
        "{first_wave} calls were open at once"
    );
    // The gateway carries no stream for the flooding device, and the other device still
    // carries a new exec.
    let (code, out, err) = bench
        .kubectl_with_input(&["exec", "shell", "--", "echo", "after"], b"")
        .await;
    assert_eq!((code, out.as_str()), (0, "after\n"), "{err}");
    bench.finish().await;
}
