//! The two halves of an upgraded SPDY connection: a reader of whole frames, and a writer task
//! fed through a small queue, so a slow client holds back its senders, never memory.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::mpsc;

use crate::kubelet::spdy::{self, Frame};

/// Bytes of a data frame this server writes at most (what Go's `io.Copy` reads at once).
pub const CHUNK: usize = 32 * 1024;
/// Frames queued for the client: a stuck session holds little.
const QUEUE: usize = 4;

/// The protocol to speak: the client's first offer (`X-Stream-Protocol-Version` values, each
/// perhaps a list) that is among `served`.
pub fn negotiate<'a>(
    offered: impl IntoIterator<Item = &'a str>,
    served: &[&'static str],
) -> Option<&'static str> {
    offered
        .into_iter()
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .find_map(|offer| served.iter().copied().find(|p| *p == offer))
}

/// Reads frames off a connection.
pub struct FrameReader<R> {
    io: R,
    buffer: BytesMut,
    decoder: spdy::Decoder,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(io: R) -> FrameReader<R> {
        FrameReader {
            io,
            buffer: BytesMut::with_capacity(16 * 1024),
            decoder: spdy::Decoder::default(),
        }
    }

    /// The next frame; `None` at the end of the connection or on a broken one.
    pub async fn next(&mut self) -> Option<Frame> {
        loop {
            match self.decoder.decode(&mut self.buffer) {
                Ok(Some(frame)) => return Some(frame),
                Ok(None) => {}
                Err(error) => {
                    tracing::debug!(%error, "kubelet API: a bad SPDY frame; closing the connection");
                    return None;
                }
            }
            match self.io.read_buf(&mut self.buffer).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }
}

/// A sender of frames to `io`, and the task that writes them until every sender is gone.
pub fn writer<W: AsyncWrite + Unpin + Send + 'static>(
    io: W,
) -> (mpsc::Sender<Frame>, tokio::task::JoinHandle<()>) {
    let (frames, queued) = mpsc::channel(QUEUE);
    (frames, tokio::spawn(write_frames(io, queued)))
}

/// Writes what it is sent, frame by frame, until every sender is gone.
async fn write_frames<W: AsyncWrite + Unpin>(mut io: W, mut frames: mpsc::Receiver<Frame>) {
    let mut encoder = spdy::Encoder::default();
    let mut out = BytesMut::with_capacity(CHUNK + 64);
    while let Some(frame) = frames.recv().await {
        encoder.encode(&frame, &mut out);
        // Whatever else is queued goes in the same write.
        while out.len() < CHUNK {
            match frames.try_recv() {
                Ok(frame) => encoder.encode(&frame, &mut out),
                Err(_) => break,
            }
        }
        if io.write_all(&out).await.is_err() {
            return;
        }
        out.clear();
    }
    let _ = io.flush().await;
    let _ = io.shutdown().await;
}

/// Data frames of at most `CHUNK` bytes for `data` on `stream`.
pub fn chunks(stream: u32, data: Bytes) -> impl Iterator<Item = Frame> {
    let count = data.len().div_ceil(CHUNK);
    (0..count).map(move |i| Frame::Data {
        stream,
        fin: false,
        data: data.slice(i * CHUNK..((i + 1) * CHUNK).min(data.len())),
    })
}

/// The frames a client (as the API server) sends to open streams of these kinds, with
/// `headers` on each.
#[cfg(test)]
pub fn opening(
    encoder: &mut spdy::Encoder,
    kinds: &[(u32, &str)],
    headers: &[(&str, &str)],
) -> BytesMut {
    let mut out = BytesMut::new();
    for (stream, kind) in kinds {
        let mut all = vec![("streamtype".to_string(), kind.to_string())];
        all.extend(headers.iter().map(|(n, v)| (n.to_string(), v.to_string())));
        encoder.encode(
            &Frame::SynStream {
                stream: *stream,
                fin: false,
                headers: all,
            },
            &mut out,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_offered_protocol_served_here_is_chosen() {
        const SERVED: &[&str] = &["v5.channel.k8s.io", "v4.channel.k8s.io"];
        assert_eq!(
            negotiate(["v4.channel.k8s.io", "v3.channel.k8s.io"], SERVED),
            Some("v4.channel.k8s.io")
        );
        assert_eq!(
            negotiate(["v5.channel.k8s.io, v4.channel.k8s.io"], SERVED),
            Some("v5.channel.k8s.io")
        );
        assert_eq!(negotiate(["v3.channel.k8s.io"], SERVED), None);
        assert_eq!(negotiate([], SERVED), None);
    }

    #[test]
    fn output_is_cut_into_frames_of_at_most_a_chunk() {
        let frames: Vec<Frame> = chunks(3, Bytes::from(vec![1u8; CHUNK * 2 + 5])).collect();
        let sizes: Vec<usize> = frames
            .iter()
            .map(|f| match f {
                Frame::Data { data, .. } => data.len(),
                _ => 0,
            })
            .collect();
        assert_eq!(sizes, [CHUNK, CHUNK, 5]);
        assert_eq!(chunks(3, Bytes::new()).count(), 0);
    }
}
