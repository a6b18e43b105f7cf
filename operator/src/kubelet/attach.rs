//! `kubectl attach`: a running container's output from now on, on the streams the API server
//! opens. It is read from the operator's log store, where agents already send every container's
//! output, so attaching asks nothing of the device and works alike for every runtime.

use darkcore_proto::agent::v1::{StreamEnd, StreamUp, stream_end, stream_up};
use futures::StreamExt as _;
use futures::stream;
use tokio::sync::mpsc;

use crate::gateway::streams::DeviceEnd;
use crate::kubelet::follow::Follower;
use crate::kubelet::log_store::Line;

/// Output lines as the messages a device would send for them: runs of lines of one stream
/// together. With a TTY the client has no stderr stream: all of it goes to stdout, as a
/// terminal would show it.
pub fn output_of(lines: Vec<Line>, tty: bool) -> Vec<stream_up::Body> {
    let mut bodies: Vec<stream_up::Body> = Vec::new();
    for line in lines {
        let stderr = line.stderr && !tty;
        match bodies.last_mut() {
            Some(stream_up::Body::Stderr(data)) if stderr => data.extend_from_slice(&line.data),
            Some(stream_up::Body::Stdout(data)) if !stderr => data.extend_from_slice(&line.data),
            _ if stderr => bodies.push(stream_up::Body::Stderr(line.data)),
            _ => bodies.push(stream_up::Body::Stdout(line.data)),
        }
    }
    bodies
}

/// The session's far end: the followed output, then a clean end when the run ends (the kubelet
/// reports success when the container's streams close). Stdin sent by the client is read and
/// dropped, as containerd does for a container that was not started with stdin.
pub fn output_from_now(follower: Follower, tty: bool) -> DeviceEnd {
    let (down, ignored) = mpsc::channel(1);
    let output = stream::unfold(Some(follower), move |follower| async move {
        let mut follower = follower?;
        Some(match follower.next().await {
            Some(lines) => (output_of(lines, tty), Some(follower)),
            None => {
                let end = StreamEnd {
                    result: Some(stream_end::Result::ExitCode(0)),
                };
                (vec![stream_up::Body::End(end)], None)
            }
        })
    })
    .flat_map(stream::iter)
    .map(|body| Ok(StreamUp { body: Some(body) }));
    let dropped_stdin = stream::unfold(ignored, |mut ignored| async move {
        while ignored.recv().await.is_some() {}
        None
    });
    DeviceEnd {
        up: stream::select(output, dropped_stdin).boxed(),
        down,
        permit: Box::new(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(text: &str, stderr: bool) -> Line {
        Line {
            timestamp_unix_nanos: 1,
            data: text.as_bytes().to_vec(),
            stderr,
        }
    }

    #[test]
    fn lines_of_one_stream_go_together_and_a_tty_has_only_stdout() {
        let lines = vec![
            line("a\n", false),
            line("b\n", false),
            line("oops\n", true),
            line("c\n", false),
        ];
        assert_eq!(
            output_of(lines.clone(), false),
            vec![
                stream_up::Body::Stdout(b"a\nb\n".to_vec()),
                stream_up::Body::Stderr(b"oops\n".to_vec()),
                stream_up::Body::Stdout(b"c\n".to_vec()),
            ]
        );
        assert_eq!(
            output_of(lines, true),
            vec![stream_up::Body::Stdout(b"a\nb\noops\nc\n".to_vec())]
        );
        assert!(output_of(Vec::new(), false).is_empty());
    }
}
