//! `kubectl port-forward` on an upgraded kubelet connection, as the kubelet serves it: for each
//! connection it forwards, the API server opens an error and a data stream with the same
//! `requestID`; each pair becomes one stream to the device, which connects inside the pod.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use darkcore_proto::agent::v1::{StdinClosed, StreamDown, stream_down, stream_end, stream_up};
use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use crate::gateway::streams::{DeviceEnd, next_up};
use crate::kubelet::spdy::{self, Frame, Headers};
use crate::kubelet::spdy_conn::{self, FrameReader, chunks};

/// The one port-forward protocol there is.
pub const PROTOCOL: &str = "portforward.k8s.io";
/// Forwarded connections waiting for their second stream, per connection: more are refused.
const MAX_WAITING: usize = 64;
/// Input frames queued for one forwarded connection.
const INPUT_QUEUE: usize = 4;
/// A connection with no traffic either way for this long is closed (the kubelet's default).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(4 * 60 * 60);

/// Opens the device's end of one forwarded connection to a port.
pub type Opener = Arc<dyn Fn(u16) -> BoxFuture<'static, Result<DeviceEnd, String>> + Send + Sync>;

/// One forwarded connection's two streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pair {
    pub port: u16,
    pub error: u32,
    pub data: u32,
}

#[derive(Debug, Default)]
struct Half {
    port: u16,
    error: Option<u32>,
    data: Option<u32>,
}

/// Streams waiting for their pair, by request id (pure).
#[derive(Debug, Default)]
pub struct Pairing {
    waiting: HashMap<String, Half>,
}

impl Pairing {
    /// A new stream; the pair once both of its streams are here. A stream without a usable
    /// `port` or `streamtype` is refused, as the kubelet refuses it.
    pub fn add(&mut self, stream: u32, headers: &Headers) -> Result<Option<Pair>, String> {
        let port = spdy::header(headers, "port").ok_or("the \"port\" header is required")?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{port:?} is not a port"))?;
        let kind = spdy::header(headers, "streamtype");
        // Without a request id, the kubelet pairs an error stream with the data stream 2 after.
        let request = match (spdy::header(headers, "requestid"), kind) {
            (Some(id), _) => id.to_string(),
            (None, Some("error")) => stream.to_string(),
            (None, Some("data")) => stream.saturating_sub(2).to_string(),
            (None, _) => String::new(),
        };
        if !self.waiting.contains_key(&request) && self.waiting.len() >= MAX_WAITING {
            return Err(format!(
                "{MAX_WAITING} forwarded connections already wait for their streams"
            ));
        }
        let half = self.waiting.entry(request.clone()).or_insert(Half {
            port,
            ..Default::default()
        });
        let slot = match kind {
            Some("error") => &mut half.error,
            Some("data") => &mut half.data,
            other => return Err(format!("invalid stream type {other:?}")),
        };
        if slot.is_some() {
            return Err(format!("request {request} already has that stream"));
        }
        *slot = Some(stream);
        match (half.error, half.data) {
            (Some(error), Some(data)) => {
                let port = half.port;
                self.waiting.remove(&request);
                Ok(Some(Pair { port, error, data }))
            }
            _ => Ok(None),
        }
    }
}

/// What the connection hands one forwarded connection from the client; the channel's close
/// says the client reset it or went away.
enum Input {
    Data(Bytes),
    End,
}

/// Serves port-forward on an upgraded connection until the client closes it: pairs the
/// client's streams and carries each pair to the device through `open`.
pub async fn serve<IO>(io: IO, open: Opener)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read, write) = tokio::io::split(io);
    let mut reader = FrameReader::new(read);
    let (frames, writer) = spdy_conn::writer(write);
    let mut pairing = Pairing::default();
    // The input of each forwarded connection, by its data stream.
    let mut inputs: HashMap<u32, mpsc::Sender<Input>> = HashMap::new();
    loop {
        let frame = match tokio::time::timeout(IDLE_TIMEOUT, reader.next()).await {
            Ok(Some(frame)) => frame,
            Ok(None) | Err(_) => break,
        };
        match frame {
            Frame::SynStream {
                stream, headers, ..
            } => {
                let reply = match pairing.add(stream, &headers) {
                    Ok(pair) => {
                        if let Some(pair) = pair {
                            let (input, inputs_rx) = mpsc::channel(INPUT_QUEUE);
                            inputs.insert(pair.data, input);
                            let device = open(pair.port);
                            tokio::spawn(forward(pair, device, inputs_rx, frames.clone()));
                        }
                        Frame::SynReply {
                            stream,
                            fin: false,
                            headers: Vec::new(),
                        }
                    }
                    Err(why) => {
                        tracing::debug!(%why, "port-forward: stream refused");
                        Frame::RstStream {
                            stream,
                            status: spdy::REFUSED_STREAM,
                        }
                    }
                };
                if frames.send(reply).await.is_err() {
                    break;
                }
            }
            Frame::Data { stream, fin, data } => {
                if let Some(input) = inputs.get(&stream) {
                    let mut delivered =
                        data.is_empty() || input.send(Input::Data(data)).await.is_ok();
                    if fin {
                        delivered = input.send(Input::End).await.is_ok();
                    }
                    // After its end the input stays: only a reset (or the connection's end)
                    // drops it, which tells the forwarded connection that the client is gone.
                    if !delivered {
                        inputs.remove(&stream);
                    }
                }
            }
            // The client gave up on a forwarded connection: dropping its input ends it.
            Frame::RstStream { stream, .. } => {
                inputs.remove(&stream);
            }
            Frame::Ping(id) if frames.send(Frame::Ping(id)).await.is_err() => break,
            Frame::GoAway { .. } => break,
            _ => {}
        }
    }
    drop(inputs);
    drop(frames);
    // A client that went away may leave its side unread: the writer is not waited for.
    writer.abort();
}

/// Carries one forwarded connection: the client's bytes down, the port's bytes up, and how
/// it ended. An error goes on the error stream as text, then both streams are reset.
async fn forward(
    pair: Pair,
    device: BoxFuture<'static, Result<DeviceEnd, String>>,
    mut input: mpsc::Receiver<Input>,
    frames: mpsc::Sender<Frame>,
) {
    let outcome = match device.await {
        Ok(device) => carry(pair, device, &mut input, &frames).await,
        Err(why) => Some(Err(why)),
    };
    let done = match outcome {
        // The client is gone: nobody is left to tell.
        None => return,
        Some(Ok(())) => vec![
            Frame::Data {
                stream: pair.data,
                fin: true,
                data: Bytes::new(),
            },
            Frame::Data {
                stream: pair.error,
                fin: true,
                data: Bytes::new(),
            },
        ],
        Some(Err(why)) => {
            let message = format!("error forwarding port {}: {why}", pair.port);
            vec![
                Frame::Data {
                    stream: pair.error,
                    fin: false,
                    data: Bytes::from(message),
                },
                Frame::RstStream {
                    stream: pair.data,
                    status: spdy::CANCEL,
                },
                Frame::RstStream {
                    stream: pair.error,
                    status: spdy::CANCEL,
                },
            ]
        }
    };
    for frame in done {
        if frames.send(frame).await.is_err() {
            return;
        }
    }
}

/// Both directions of one forwarded connection, side by side, until the port's side ends
/// (`Ok`), fails (`Err`, for the user), or the client goes (`None`).
async fn carry(
    pair: Pair,
    device: DeviceEnd,
    input: &mut mpsc::Receiver<Input>,
    frames: &mpsc::Sender<Frame>,
) -> Option<Result<(), String>> {
    let DeviceEnd {
        mut up,
        down,
        permit: _permit,
    } = device;
    let to_port = async {
        loop {
            let body = match input.recv().await {
                Some(Input::Data(data)) => stream_down::Body::Stdin(data.to_vec()),
                Some(Input::End) => stream_down::Body::StdinClosed(StdinClosed {}),
                None => return None,
            };
            down.send(StreamDown { body: Some(body) }).await.ok()?;
        }
    };
    let from_port = async {
        loop {
            let body = match next_up(&mut up).await {
                Ok(body) => body,
                Err(why) => return Some(Err(why)),
            };
            match body {
                stream_up::Body::Stdout(data) => {
                    for frame in chunks(pair.data, Bytes::from(data)) {
                        frames.send(frame).await.ok()?;
                    }
                }
                stream_up::Body::End(end) => {
                    return Some(match end.result {
                        Some(stream_end::Result::ExitCode(0)) => Ok(()),
                        Some(stream_end::Result::Failure(why)) => Err(why),
                        other => Err(format!("the device ended the stream with {other:?}")),
                    });
                }
                stream_up::Body::Stderr(_) | stream_up::Body::StreamId(_) => {}
            }
        }
    };
    tokio::select! {
        outcome = to_port => outcome,
        outcome = from_port => outcome,
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use darkcore_proto::agent::v1::StreamUp;
    use futures::StreamExt as _;
    use tokio::io::AsyncWriteExt as _;

    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> Headers {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn streams_pair_by_request_id_in_either_order() {
        let mut pairing = Pairing::default();
        let data = headers(&[("streamtype", "data"), ("port", "8080"), ("requestid", "0")]);
        let error = headers(&[
            ("streamtype", "error"),
            ("port", "8080"),
            ("requestid", "0"),
        ]);
        assert_eq!(pairing.add(3, &data), Ok(None));
        assert_eq!(
            pairing.add(1, &error),
            Ok(Some(Pair {
                port: 8080,
                error: 1,
                data: 3
            }))
        );
        // Without request ids, an error stream pairs with the data stream 2 after it.
        let data = headers(&[("streamtype", "data"), ("port", "80")]);
        let error = headers(&[("streamtype", "error"), ("port", "80")]);
        assert_eq!(pairing.add(5, &error), Ok(None));
        assert_eq!(
            pairing.add(7, &data),
            Ok(Some(Pair {
                port: 80,
                error: 5,
                data: 7
            }))
        );
    }

    #[test]
    fn bad_streams_are_refused_with_the_reason() {
        let mut pairing = Pairing::default();
        let no_port = headers(&[("streamtype", "data")]);
        assert!(pairing.add(1, &no_port).unwrap_err().contains("port"));
        let zero = headers(&[("streamtype", "data"), ("port", "0")]);
        assert!(pairing.add(1, &zero).is_err());
        let odd = headers(&[("streamtype", "video"), ("port", "80")]);
        assert!(
            pairing
                .add(1, &odd)
                .unwrap_err()
                .contains("invalid stream type")
        );
        let data = headers(&[("streamtype", "data"), ("port", "80"), ("requestid", "9")]);
        assert_eq!(pairing.add(1, &data), Ok(None));
        assert!(pairing.add(3, &data).unwrap_err().contains("already"));
    }

    #[test]
    fn unpaired_streams_are_bounded() {
        let mut pairing = Pairing::default();
        for id in 0..MAX_WAITING {
            let data = headers(&[
                ("streamtype", "data"),
                ("port", "80"),
                ("requestid", &id.to_string()),
            ]);
            assert_eq!(pairing.add(id as u32 * 2 + 1, &data), Ok(None));
        }
        let one_more = headers(&[("streamtype", "data"), ("port", "80"), ("requestid", "x")]);
        assert!(pairing.add(999, &one_more).is_err());
    }

    /// A forwarded connection over an in-memory one: the client's bytes reach the port, the
    /// port's answer comes back on the data stream, and the port's close ends it cleanly.
    #[tokio::test]
    async fn a_forwarded_connection_carries_bytes_both_ways() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (down_tx, mut down_rx) = mpsc::channel(8);
        let (up_tx, up_rx) = mpsc::channel::<Result<StreamUp, tonic::Status>>(8);
        let device = std::sync::Mutex::new(Some(DeviceEnd {
            up: tokio_stream::wrappers::ReceiverStream::new(up_rx).boxed(),
            down: down_tx,
            permit: Box::new(()),
        }));
        let opened_port = Arc::new(std::sync::Mutex::new(None));
        let seen = opened_port.clone();
        let open: Opener = Arc::new(move |port| {
            *seen.lock().unwrap() = Some(port);
            let end = device
                .lock()
                .unwrap()
                .take()
                .ok_or("opened twice".to_string());
            Box::pin(async move { end })
        });
        // The "port": answers what it was sent, reversed, once the sender is done.
        tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(StreamDown { body: Some(body) }) = down_rx.recv().await {
                match body {
                    stream_down::Body::Stdin(data) => got.extend(data),
                    stream_down::Body::StdinClosed(_) => break,
                    stream_down::Body::Resize(_) => {}
                }
            }
            got.reverse();
            let up = |body| Ok(StreamUp { body: Some(body) });
            up_tx.send(up(stream_up::Body::Stdout(got))).await.unwrap();
            let end = darkcore_proto::agent::v1::StreamEnd {
                result: Some(stream_end::Result::ExitCode(0)),
            };
            up_tx.send(up(stream_up::Body::End(end))).await.unwrap();
        });
        let server = tokio::spawn(serve(server, open));
        let (read, mut write) = tokio::io::split(client);
        let mut encoder = spdy::Encoder::default();
        let ids = [("port", "8080"), ("requestid", "0")];
        let mut out = spdy_conn::opening(&mut encoder, &[(1, "error"), (3, "data")], &ids);
        encoder.encode(
            &Frame::Data {
                stream: 3,
                fin: true,
                data: Bytes::from_static(b"ping"),
            },
            &mut out,
        );
        write.write_all(&out).await.unwrap();
        let mut reader = FrameReader::new(read);
        let (mut answer, mut fins) = (Vec::new(), Vec::new());
        while fins.len() < 2 {
            match reader.next().await.expect("the connection stays open") {
                Frame::Data { stream, fin, data } => {
                    if stream == 3 {
                        answer.extend_from_slice(&data);
                    }
                    if fin {
                        fins.push(stream);
                    }
                }
                Frame::SynReply { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(answer, b"gnip");
        assert_eq!(*opened_port.lock().unwrap(), Some(8080));
        fins.sort();
        assert_eq!(fins, [1, 3]);
        let mut closing = BytesMut::new();
        encoder.encode(
            &Frame::GoAway {
                last_good: 3,
                status: 0,
            },
            &mut closing,
        );
        write.write_all(&closing).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the connection ends")
            .unwrap();
    }
}
