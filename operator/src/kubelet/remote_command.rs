//! `kubectl exec` on an upgraded kubelet connection, as the kubelet serves it: the SPDY streams the
//! API server opens (error, stdin, stdout, stderr, resize), carried to and from the device.
//!
//! ```text
//!  API server ──SPDY──> serve: streams opened ──> device stream (gRPC OpenStream on the agent's connection)
//!     stdin / resize ───────────────────────────────> StreamDown
//!     stdout / stderr <─────────────────────────────── StreamUp, then StreamEnd ──> status on the error stream
//! ```

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use darkcore_proto::agent::v1::{
    StdinClosed, StreamDown, TerminalSize, stream_down, stream_end, stream_up,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use crate::gateway::streams::{DeviceEnd, next_up};
use crate::kubelet::spdy::{self, Frame};
use crate::kubelet::spdy_conn::{self, FrameReader, chunks};

/// The exec protocols served, in order of preference. Both carry the same streams over SPDY;
/// v5 adds only a close signal that WebSocket needs and SPDY has built in (stream FIN).
pub const PROTOCOLS: &[&str] = &["v5.channel.k8s.io", "v4.channel.k8s.io"];
/// How long the client may take to open all the streams it asked for (the kubelet's default).
pub const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);
/// A session with no traffic either way for this long is closed (the kubelet's
/// `streamingConnectionIdleTimeout` default).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(4 * 60 * 60);
/// Bytes of resize messages held while one is incomplete.
const RESIZE_BUFFER: usize = 4096;

/// Which standard streams an exec wants, from the kubelet's query (`input`, `output`, `error`,
/// `tty`, each "1" or "true").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

impl Options {
    pub fn from_query(query: &[(String, String)]) -> Result<Options, String> {
        let set = |name: &str| {
            query
                .iter()
                .any(|(n, v)| n == name && matches!(v.as_str(), "1" | "true"))
        };
        let tty = set("tty");
        let options = Options {
            stdin: set("input"),
            stdout: set("output"),
            // With a TTY, stderr goes to the terminal: the kubelet drops the stream too.
            stderr: set("error") && !tty,
            tty,
        };
        if !(options.stdin || options.stdout || options.stderr) {
            return Err("you must specify at least 1 of stdin, stdout, stderr".into());
        }
        Ok(options)
    }
}

/// The command of an exec query: its `command` values in order.
pub fn command_of(query: &[(String, String)]) -> Vec<String> {
    query
        .iter()
        .filter(|(n, _)| n == "command")
        .map(|(_, v)| v.clone())
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Error,
    Stdin,
    Stdout,
    Stderr,
    Resize,
}

/// The streams a client has opened so far, by role (pure).
#[derive(Debug, Default)]
pub struct Streams {
    ids: HashMap<Role, u32>,
}

impl Streams {
    /// A new stream of `kind` (its `streamtype` header); an unknown or repeated kind is refused.
    pub fn open(&mut self, stream: u32, kind: Option<&str>) -> Result<Role, String> {
        let role = match kind {
            Some("error") => Role::Error,
            Some("stdin") => Role::Stdin,
            Some("stdout") => Role::Stdout,
            Some("stderr") => Role::Stderr,
            Some("resize") => Role::Resize,
            other => return Err(format!("unexpected stream type {other:?}")),
        };
        if self.ids.contains_key(&role) {
            return Err(format!("a second {role:?} stream"));
        }
        self.ids.insert(role, stream);
        Ok(role)
    }

    /// Whether every stream the options call for is open.
    pub fn complete(&self, options: &Options) -> bool {
        let wanted = [
            (Role::Error, true),
            (Role::Stdin, options.stdin),
            (Role::Stdout, options.stdout),
            (Role::Stderr, options.stderr),
            (Role::Resize, options.tty),
        ];
        wanted
            .iter()
            .all(|(role, wanted)| !wanted || self.ids.contains_key(role))
    }

    pub fn id(&self, role: Role) -> Option<u32> {
        self.ids.get(&role).copied()
    }

    pub fn role(&self, stream: u32) -> Option<Role> {
        self.ids
            .iter()
            .find(|(_, id)| **id == stream)
            .map(|(role, _)| *role)
    }
}

/// How a command ended, as the error stream reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Exited(i32),
    /// It could not run, or the session broke: what the user reads.
    Failed(String),
}

impl Outcome {
    pub fn of_end(result: Option<stream_end::Result>) -> Outcome {
        match result {
            Some(stream_end::Result::ExitCode(code)) => Outcome::Exited(code),
            Some(stream_end::Result::Failure(message)) => Outcome::Failed(message),
            None => Outcome::Failed("the device ended the stream without an outcome".into()),
        }
    }
}

/// The Status the kubelet writes on the error stream (v4 and later): `kubectl` takes its exit
/// code from the `ExitCode` cause.
pub fn status(outcome: &Outcome) -> serde_json::Value {
    match outcome {
        Outcome::Exited(0) => serde_json::json!({"metadata": {}, "status": "Success"}),
        Outcome::Exited(code) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": format!("command terminated with non-zero exit code: exit status {code}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        }),
        Outcome::Failed(message) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": format!("Internal error occurred: {message}"),
            "reason": "InternalError",
            "details": {"causes": [{"message": message}]},
            "code": 500,
        }),
    }
}

/// The terminal sizes complete in `buffer` (a stream of JSON objects, as `kubectl` writes
/// them), taken off it; what is left is an incomplete one.
pub fn take_sizes(buffer: &mut Vec<u8>) -> Vec<TerminalSize> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Size {
        width: u16,
        height: u16,
    }
    let mut sizes = Vec::new();
    let mut stream = serde_json::Deserializer::from_slice(buffer).into_iter::<Size>();
    let mut used = 0;
    loop {
        match stream.next() {
            Some(Ok(size)) => {
                used = stream.byte_offset();
                sizes.push(TerminalSize {
                    width: u32::from(size.width),
                    height: u32::from(size.height),
                });
            }
            Some(Err(e)) if e.is_eof() => break,
            // Garbage: dropped, as the kubelet stops reading resizes at the first bad one.
            Some(Err(_)) => {
                used = buffer.len();
                break;
            }
            None => break,
        }
    }
    buffer.drain(..used);
    sizes
}

/// Serves one exec session on an upgraded connection: waits for the client's streams, opens
/// the device's end with `open`, carries both ways, and writes the outcome as the kubelet does.
pub async fn serve<IO, F>(io: IO, options: Options, open: F)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
    F: std::future::Future<Output = Result<DeviceEnd, String>>,
{
    let (read, write) = tokio::io::split(io);
    let mut reader = FrameReader::new(read);
    let (frames, writer) = spdy_conn::writer(write);
    let mut streams = Streams::default();
    let opened = tokio::time::timeout(STREAM_CREATION_TIMEOUT, async {
        while !streams.complete(&options) {
            match reader.next().await? {
                Frame::SynStream {
                    stream, headers, ..
                } => {
                    let reply = match streams.open(stream, spdy::header(&headers, "streamtype")) {
                        Ok(_) => Frame::SynReply {
                            stream,
                            fin: false,
                            headers: Vec::new(),
                        },
                        Err(why) => {
                            tracing::debug!(%why, "exec: stream refused");
                            Frame::RstStream {
                                stream,
                                status: spdy::REFUSED_STREAM,
                            }
                        }
                    };
                    frames.send(reply).await.ok()?;
                }
                Frame::Ping(id) => frames.send(Frame::Ping(id)).await.ok()?,
                Frame::GoAway { .. } => return None,
                _ => {}
            }
        }
        Some(())
    })
    .await;
    if !matches!(opened, Ok(Some(()))) {
        tracing::debug!("exec: the client did not open its streams");
        drop(frames);
        let _ = writer.await;
        return;
    }
    let outcome = match open.await {
        Ok(device) => carry(&mut reader, &frames, &streams, device).await,
        Err(message) => Some(Outcome::Failed(message)),
    };
    match &outcome {
        Some(outcome) => tracing::info!(?outcome, "exec session ended"),
        None => tracing::info!("exec session ended: the client went away"),
    }
    let outcome_reported = outcome.is_some();
    if let Some(outcome) = outcome {
        finish(&frames, &streams, &outcome).await;
    }
    drop(frames);
    // A client that went away may have left its side unread: the writer is not waited for.
    if outcome_reported {
        let _ = writer.await;
    }
}

/// Carries the session both ways until the device reports an end (its outcome) or the client
/// goes away (`None`: nobody is left to tell). The two directions run side by side, so output
/// waiting on a slow client never keeps its resets and pings unread.
async fn carry<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    frames: &mpsc::Sender<Frame>,
    streams: &Streams,
    device: DeviceEnd,
) -> Option<Outcome> {
    let DeviceEnd {
        mut up,
        down,
        permit: _permit,
    } = device;
    let started = tokio::time::Instant::now();
    // Milliseconds after `started` of the last traffic either way.
    let last_traffic = std::sync::atomic::AtomicU64::new(0);
    let touch = || {
        let now = started.elapsed().as_millis() as u64;
        last_traffic.store(now, std::sync::atomic::Ordering::Relaxed);
    };
    let from_client = async {
        let mut resizes = Vec::new();
        let mut stdin_open = streams.id(Role::Stdin).is_some();
        loop {
            let frame = reader.next().await?;
            touch();
            match frame {
                Frame::Data { stream, fin, data } => match streams.role(stream) {
                    Some(Role::Stdin) if stdin_open => {
                        if !data.is_empty() {
                            let body = stream_down::Body::Stdin(data.to_vec());
                            down.send(StreamDown { body: Some(body) }).await.ok()?;
                        }
                        if fin {
                            stdin_open = false;
                            let body = stream_down::Body::StdinClosed(StdinClosed {});
                            down.send(StreamDown { body: Some(body) }).await.ok()?;
                        }
                    }
                    Some(Role::Resize) => {
                        resizes.extend_from_slice(&data);
                        for size in take_sizes(&mut resizes) {
                            let body = stream_down::Body::Resize(size);
                            down.send(StreamDown { body: Some(body) }).await.ok()?;
                        }
                        resizes.truncate(RESIZE_BUFFER);
                    }
                    _ => {}
                },
                Frame::Ping(id) => frames.send(Frame::Ping(id)).await.ok()?,
                Frame::GoAway { .. } => return None,
                Frame::RstStream { stream, .. }
                    if matches!(
                        streams.role(stream),
                        Some(Role::Error | Role::Stdout | Role::Stderr)
                    ) =>
                {
                    return None;
                }
                _ => {}
            }
        }
    };
    let from_device = async {
        loop {
            let body = next_up(&mut up).await;
            touch();
            let body = match body {
                Ok(body) => body,
                Err(why) => return Some(Outcome::Failed(why)),
            };
            let (role, data) = match body {
                stream_up::Body::Stdout(data) => (Role::Stdout, data),
                stream_up::Body::Stderr(data) => (Role::Stderr, data),
                stream_up::Body::End(end) => return Some(Outcome::of_end(end.result)),
                stream_up::Body::StreamId(_) => continue,
            };
            if let Some(stream) = streams.id(role) {
                for frame in chunks(stream, Bytes::from(data)) {
                    frames.send(frame).await.ok()?;
                }
            }
        }
    };
    let idle = async {
        loop {
            let last = last_traffic.load(std::sync::atomic::Ordering::Relaxed);
            let deadline = started + Duration::from_millis(last) + IDLE_TIMEOUT;
            if tokio::time::Instant::now() >= deadline {
                return Some(Outcome::Failed(format!(
                    "no input or output for {} s: the session was idle too long",
                    IDLE_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::select! {
        outcome = from_client => outcome,
        outcome = from_device => outcome,
        outcome = idle => outcome,
    }
}

/// Ends the output streams and writes the outcome on the error stream.
async fn finish(frames: &mpsc::Sender<Frame>, streams: &Streams, outcome: &Outcome) {
    for role in [Role::Stdout, Role::Stderr] {
        if let Some(stream) = streams.id(role) {
            let end = Frame::Data {
                stream,
                fin: true,
                data: Bytes::new(),
            };
            if frames.send(end).await.is_err() {
                return;
            }
        }
    }
    if let Some(stream) = streams.id(Role::Error) {
        let status = Bytes::from(status(outcome).to_string());
        let _ = frames
            .send(Frame::Data {
                stream,
                fin: true,
                data: status,
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use darkcore_proto::agent::v1::StreamUp;
    use futures::StreamExt as _;
    use tokio::io::AsyncWriteExt as _;

    use super::*;

    fn query(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn options_and_command_come_from_the_query() {
        let q = query(&[
            ("command", "sh"),
            ("command", "-c"),
            ("command", "echo hi"),
            ("input", "1"),
            ("output", "1"),
            ("error", "1"),
        ]);
        assert_eq!(command_of(&q), ["sh", "-c", "echo hi"]);
        assert_eq!(
            Options::from_query(&q),
            Ok(Options {
                stdin: true,
                stdout: true,
                stderr: true,
                tty: false
            })
        );
        // A TTY carries stderr in the terminal.
        let tty = Options::from_query(&query(&[("output", "1"), ("error", "1"), ("tty", "1")]));
        assert_eq!(
            tty,
            Ok(Options {
                stdin: false,
                stdout: true,
                stderr: false,
                tty: true
            })
        );
        assert!(Options::from_query(&query(&[("tty", "1")])).is_err());
    }

    #[test]
    fn streams_are_complete_once_each_wanted_one_is_open() {
        let options = Options {
            stdin: true,
            stdout: true,
            stderr: false,
            tty: true,
        };
        let mut streams = Streams::default();
        assert_eq!(streams.open(1, Some("error")), Ok(Role::Error));
        assert_eq!(streams.open(3, Some("stdin")), Ok(Role::Stdin));
        assert_eq!(streams.open(5, Some("stdout")), Ok(Role::Stdout));
        assert!(!streams.complete(&options), "the resize stream is missing");
        assert!(streams.open(7, Some("stdout")).is_err(), "a second stdout");
        assert!(streams.open(9, Some("video")).is_err());
        assert!(streams.open(11, None).is_err());
        assert_eq!(streams.open(13, Some("resize")), Ok(Role::Resize));
        assert!(streams.complete(&options));
        assert_eq!(streams.role(5), Some(Role::Stdout));
        assert_eq!(streams.id(Role::Resize), Some(13));
        assert_eq!(streams.role(7), None);
    }

    #[test]
    fn the_status_carries_the_exit_code_as_kubectl_reads_it() {
        assert_eq!(
            status(&Outcome::Exited(0)),
            serde_json::json!({"metadata": {}, "status": "Success"})
        );
        let failed = status(&Outcome::Exited(3));
        assert_eq!(failed["reason"], "NonZeroExitCode");
        assert_eq!(failed["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(failed["details"]["causes"][0]["message"], "3");
        let refused = status(&Outcome::Failed("not supported by the wasm runtime".into()));
        assert_eq!(refused["reason"], "InternalError");
        assert!(
            refused["message"]
                .as_str()
                .unwrap()
                .contains("not supported by the wasm runtime")
        );
    }

    #[test]
    fn resizes_are_read_whole_and_a_partial_one_waits() {
        let mut buffer = br#"{"Width":80,"Height":24}{"Width":120,"He"#.to_vec();
        assert_eq!(
            take_sizes(&mut buffer),
            vec![TerminalSize {
                width: 80,
                height: 24
            }]
        );
        buffer.extend_from_slice(br#"ight":40}"#);
        assert_eq!(
            take_sizes(&mut buffer),
            vec![TerminalSize {
                width: 120,
                height: 40
            }]
        );
        assert!(buffer.is_empty());
        let mut junk = b"not json".to_vec();
        assert!(take_sizes(&mut junk).is_empty());
        assert!(junk.is_empty(), "garbage is dropped, not kept");
    }

    fn options(stdin: bool, stderr: bool) -> Options {
        Options {
            stdin,
            stdout: true,
            stderr,
            tty: false,
        }
    }

    fn opening(encoder: &mut spdy::Encoder, kinds: &[(u32, &str)]) -> BytesMut {
        spdy_conn::opening(encoder, kinds, &[])
    }

    /// A whole session over an in-memory connection: a client speaking SPDY as the API server
    /// does, and a device that echoes stdin to stdout and exits 3.
    #[tokio::test]
    async fn a_session_carries_stdin_out_and_reports_the_exit_code() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let options = options(true, true);
        let (down_tx, mut down_rx) = mpsc::channel(8);
        let (up_tx, up_rx) = mpsc::channel::<Result<StreamUp, tonic::Status>>(8);
        let device = DeviceEnd {
            up: tokio_stream::wrappers::ReceiverStream::new(up_rx).boxed(),
            down: down_tx,
            permit: Box::new(()),
        };
        tokio::spawn(async move {
            let mut echoed = Vec::new();
            while let Some(StreamDown { body: Some(body) }) = down_rx.recv().await {
                match body {
                    stream_down::Body::Stdin(data) => echoed.extend(data),
                    stream_down::Body::StdinClosed(_) => break,
                    stream_down::Body::Resize(_) => {}
                }
            }
            let up = |body| Ok(StreamUp { body: Some(body) });
            up_tx
                .send(up(stream_up::Body::Stdout(echoed)))
                .await
                .unwrap();
            let end = darkcore_proto::agent::v1::StreamEnd {
                result: Some(stream_end::Result::ExitCode(3)),
            };
            up_tx.send(up(stream_up::Body::End(end))).await.unwrap();
        });
        let server = tokio::spawn(serve(server, options, async { Ok(device) }));

        let (read, mut write) = tokio::io::split(client);
        let mut reader = FrameReader::new(read);
        let mut encoder = spdy::Encoder::default();
        let kinds = [(1, "error"), (3, "stdin"), (5, "stdout"), (7, "stderr")];
        let mut out = opening(&mut encoder, &kinds);
        encoder.encode(&Frame::Ping(1), &mut out);
        encoder.encode(
            &Frame::Data {
                stream: 3,
                fin: true,
                data: Bytes::from_static(b"hello"),
            },
            &mut out,
        );
        write.write_all(&out).await.unwrap();

        let (mut replies, mut pongs, mut stdout, mut status, mut fins) =
            (0, 0, Vec::new(), Vec::new(), Vec::new());
        while let Some(frame) = reader.next().await {
            match frame {
                Frame::SynReply { .. } => replies += 1,
                Frame::Ping(1) => pongs += 1,
                Frame::Data { stream, fin, data } => {
                    match stream {
                        5 => stdout.extend_from_slice(&data),
                        1 => status.extend_from_slice(&data),
                        _ => {}
                    }
                    if fin {
                        fins.push(stream);
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        server.await.unwrap();
        assert_eq!((replies, pongs), (4, 1));
        assert_eq!(stdout, b"hello");
        fins.sort();
        assert_eq!(fins, [1, 5, 7]);
        let status: serde_json::Value = serde_json::from_slice(&status).unwrap();
        assert_eq!(status["details"]["causes"][0]["message"], "3");
    }

    #[tokio::test]
    async fn a_device_that_cannot_open_is_reported_on_the_error_stream() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(serve(server, options(false, false), async {
            Err::<DeviceEnd, _>("exec is not supported by the wasm runtime".to_string())
        }));
        let (read, mut write) = tokio::io::split(client);
        let out = opening(
            &mut spdy::Encoder::default(),
            &[(1, "error"), (3, "stdout")],
        );
        write.write_all(&out).await.unwrap();
        let mut reader = FrameReader::new(read);
        let mut status = Vec::new();
        while let Some(frame) = reader.next().await {
            if let Frame::Data {
                stream: 1, data, ..
            } = frame
            {
                status.extend_from_slice(&data);
            }
        }
        server.await.unwrap();
        let status: serde_json::Value = serde_json::from_slice(&status).unwrap();
        assert!(
            status["message"]
                .as_str()
                .unwrap()
                .contains("not supported by the wasm runtime")
        );
    }

    /// Output the client does not read fills every buffer on the way; the client's reset of
    /// its stdout still ends the session (and so the command on the device).
    #[tokio::test]
    async fn a_client_reset_ends_a_session_whose_output_is_stuck() {
        let (client, server) = tokio::io::duplex(1024);
        let (down_tx, mut down_rx) = mpsc::channel::<StreamDown>(8);
        let (up_tx, up_rx) = mpsc::channel::<Result<StreamUp, tonic::Status>>(1);
        let device = DeviceEnd {
            up: tokio_stream::wrappers::ReceiverStream::new(up_rx).boxed(),
            down: down_tx,
            permit: Box::new(()),
        };
        tokio::spawn(async move {
            let chunk = || {
                Ok(StreamUp {
                    body: Some(stream_up::Body::Stdout(vec![b'y'; 32 * 1024])),
                })
            };
            while up_tx.send(chunk()).await.is_ok() {}
        });
        let server = tokio::spawn(serve(server, options(false, false), async { Ok(device) }));
        let (_read, mut write) = tokio::io::split(client);
        let mut encoder = spdy::Encoder::default();
        let mut out = opening(&mut encoder, &[(1, "error"), (3, "stdout")]);
        write.write_all(&out).await.unwrap();
        out.clear();
        encoder.encode(
            &Frame::RstStream {
                stream: 3,
                status: spdy::CANCEL,
            },
            &mut out,
        );
        write.write_all(&out).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the session ends")
            .unwrap();
        // The device's end is let go: its down stream is closed.
        assert!(down_rx.recv().await.is_none());
    }
}
