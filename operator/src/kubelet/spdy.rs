//! SPDY/3.1 framing as the API server speaks it to a kubelet for exec, attach and port-forward
//! (the moby/spdystream dialect): frames, and header blocks zlib-compressed with SPDY/3's dictionary.
//!
//! One [`Decoder`] and one [`Encoder`] per connection: SPDY compresses all header blocks of a
//! connection as one zlib stream each way, so each keeps its direction's zlib state.

use std::sync::LazyLock;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};

/// The protocol version in every control frame.
pub const VERSION: u16 = 3;
/// The largest frame payload read: Go's `io.Copy` writes 32 KiB data frames; control frames are
/// small. A peer sending more is refused rather than buffered.
pub const MAX_FRAME_BYTES: usize = 1 << 20;
/// The largest header block, inflated.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// RST_STREAM status: the stream is refused (too many, or an unknown type).
pub const REFUSED_STREAM: u32 = 3;
/// RST_STREAM status: the stream is cancelled.
pub const CANCEL: u32 = 5;

const FLAG_FIN: u8 = 0x01;
const CONTROL_BIT: u32 = 0x8000_0000;

/// SPDY/3's header dictionary (draft 3, section 2.6.10.1): these words, each with its length
/// as 4 big-endian bytes first, then [`DICTIONARY_TAIL`] as is.
const DICTIONARY_WORDS: &[&str] = &[
    "options",
    "head",
    "post",
    "put",
    "delete",
    "trace",
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "connection",
    "content-base",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-md5",
    "content-range",
    "content-type",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "location",
    "max-forwards",
    "pragma",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "retry-after",
    "server",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "vary",
    "via",
    "warning",
    "www-authenticate",
    "method",
    "get",
    "status",
    "200 OK",
    "version",
    "HTTP/1.1",
    "url",
    "public",
    "set-cookie",
    "keep-alive",
    "origin",
];

const DICTIONARY_TAIL: &str = concat!(
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request",
    "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented",
    "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 ",
    "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,",
    "application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=",
    "gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
);

static DICTIONARY: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let mut dictionary = Vec::with_capacity(1423);
    for word in DICTIONARY_WORDS {
        dictionary.extend_from_slice(&(word.len() as u32).to_be_bytes());
        dictionary.extend_from_slice(word.as_bytes());
    }
    dictionary.extend_from_slice(DICTIONARY_TAIL.as_bytes());
    dictionary
});

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpdyError {
    #[error("a {0}-byte frame is larger than the {MAX_FRAME_BYTES} bytes this server reads")]
    TooLarge(usize),
    #[error("SPDY version {0} is not spoken here: only SPDY/3.1")]
    Version(u16),
    #[error("malformed {frame} frame: {why}")]
    Malformed {
        frame: &'static str,
        why: &'static str,
    },
    #[error("header block: {0}")]
    Headers(String),
}

/// A header block: lower-case names, each with one value (SPDY joins several with NUL).
pub type Headers = Vec<(String, String)>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        stream: u32,
        fin: bool,
        headers: Headers,
    },
    SynReply {
        stream: u32,
        fin: bool,
        headers: Headers,
    },
    RstStream {
        stream: u32,
        status: u32,
    },
    /// Read and ignored: nothing in them changes how this server behaves.
    Settings,
    Ping(u32),
    GoAway {
        last_good: u32,
        status: u32,
    },
    Headers {
        stream: u32,
        headers: Headers,
    },
    /// Read and ignored: spdystream, the only peer, sends none and enforces no window, so
    /// flow control is TCP's.
    WindowUpdate,
    Data {
        stream: u32,
        fin: bool,
        data: Bytes,
    },
    /// A control frame of a type SPDY/3 does not define; the spec says to ignore it.
    Unknown(u16),
}

/// The value of header `name` in `headers`.
pub fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Reads one connection's frames, inflating their header blocks.
pub struct Decoder {
    inflate: Decompress,
}

/// Writes one connection's frames, deflating their header blocks.
pub struct Encoder {
    deflate: Compress,
}

fn malformed(frame: &'static str, why: &'static str) -> SpdyError {
    SpdyError::Malformed { frame, why }
}

fn stream_id(word: u32) -> u32 {
    word & 0x7fff_ffff
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            inflate: Decompress::new(true),
        }
    }
}

impl Default for Encoder {
    fn default() -> Self {
        let mut deflate = Compress::new(Compression::default(), true);
        deflate
            .set_dictionary(&DICTIONARY)
            .expect("a new zlib stream takes a dictionary");
        Encoder { deflate }
    }
}

impl Decoder {
    /// The next whole frame at the front of `buf`, taken off it; `None` until one has arrived.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, SpdyError> {
        if buf.len() < 8 {
            return Ok(None);
        }
        let first = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let flags = buf[4];
        let length = u32::from_be_bytes([0, buf[5], buf[6], buf[7]]) as usize;
        if length > MAX_FRAME_BYTES {
            return Err(SpdyError::TooLarge(length));
        }
        if buf.len() < 8 + length {
            buf.reserve(8 + length - buf.len());
            return Ok(None);
        }
        buf.advance(8);
        let mut payload = buf.split_to(length).freeze();
        let fin = flags & FLAG_FIN != 0;
        if first & CONTROL_BIT == 0 {
            let stream = stream_id(first);
            if stream == 0 {
                return Err(malformed("DATA", "stream id 0"));
            }
            return Ok(Some(Frame::Data {
                stream,
                fin,
                data: payload,
            }));
        }
        let version = ((first >> 16) & 0x7fff) as u16;
        if version != VERSION {
            return Err(SpdyError::Version(version));
        }
        let kind = (first & 0xffff) as u16;
        let need = |n: usize, frame: &'static str| {
            if payload.len() < n {
                Err(malformed(frame, "too short"))
            } else {
                Ok(())
            }
        };
        let frame = match kind {
            1 => {
                need(10, "SYN_STREAM")?;
                let stream = stream_id(payload.get_u32());
                payload.advance(6); // associated stream, priority, slot: unused here
                let headers = self.inflate_headers(&payload)?;
                Frame::SynStream {
                    stream,
                    fin,
                    headers,
                }
            }
            2 => {
                need(4, "SYN_REPLY")?;
                let stream = stream_id(payload.get_u32());
                let headers = self.inflate_headers(&payload)?;
                Frame::SynReply {
                    stream,
                    fin,
                    headers,
                }
            }
            3 => {
                need(8, "RST_STREAM")?;
                Frame::RstStream {
                    stream: stream_id(payload.get_u32()),
                    status: payload.get_u32(),
                }
            }
            4 => Frame::Settings,
            6 => {
                need(4, "PING")?;
                Frame::Ping(payload.get_u32())
            }
            7 => {
                need(8, "GOAWAY")?;
                Frame::GoAway {
                    last_good: stream_id(payload.get_u32()),
                    status: payload.get_u32(),
                }
            }
            8 => {
                need(4, "HEADERS")?;
                let stream = stream_id(payload.get_u32());
                let headers = self.inflate_headers(&payload)?;
                Frame::Headers { stream, headers }
            }
            9 => Frame::WindowUpdate,
            other => Frame::Unknown(other),
        };
        Ok(Some(frame))
    }

    fn inflate_headers(&mut self, compressed: &[u8]) -> Result<Headers, SpdyError> {
        let too_large =
            || SpdyError::Headers(format!("larger than {MAX_HEADER_BYTES} bytes inflated"));
        let mut block = Vec::with_capacity(1024);
        let mut taken = 0;
        loop {
            if block.len() > MAX_HEADER_BYTES {
                return Err(too_large());
            }
            if block.len() == block.capacity() {
                block.reserve(4096);
            }
            let (in_before, out_before) = (self.inflate.total_in(), block.len());
            let result = self.inflate.decompress_vec(
                &compressed[taken..],
                &mut block,
                FlushDecompress::Sync,
            );
            let consumed = (self.inflate.total_in() - in_before) as usize;
            taken += consumed;
            match result {
                Ok(_) => {
                    let room_left = block.len() < block.capacity();
                    if taken == compressed.len() && room_left {
                        break;
                    }
                    if consumed == 0 && block.len() == out_before && room_left {
                        return Err(SpdyError::Headers(
                            "data past the end of its zlib stream".into(),
                        ));
                    }
                }
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate
                        .set_dictionary(&DICTIONARY)
                        .map_err(|e| SpdyError::Headers(format!("the SPDY dictionary: {e}")))?;
                }
                Err(e) => return Err(SpdyError::Headers(format!("inflating: {e}"))),
            }
        }
        if block.len() > MAX_HEADER_BYTES {
            return Err(too_large());
        }
        parse_block(&block)
    }
}

impl Encoder {
    /// Appends `frame` to `out`. Data frames carry at most `MAX_FRAME_BYTES`: callers chunk.
    pub fn encode(&mut self, frame: &Frame, out: &mut BytesMut) {
        match frame {
            Frame::Data { stream, fin, data } => {
                let length = data.len().min(MAX_FRAME_BYTES);
                out.put_u32(stream_id(*stream));
                out.put_u8(if *fin { FLAG_FIN } else { 0 });
                out.put_uint(length as u64, 3);
                out.extend_from_slice(&data[..length]);
            }
            Frame::SynStream {
                stream,
                fin,
                headers,
            } => {
                // Associated stream, priority and slot: none.
                self.headers_frame(out, 1, *fin, *stream, &[0; 6], headers)
            }
            Frame::SynReply {
                stream,
                fin,
                headers,
            } => self.headers_frame(out, 2, *fin, *stream, &[], headers),
            Frame::RstStream { stream, status } => control(
                out,
                3,
                0,
                &[stream_id(*stream), *status].map(u32::to_be_bytes).concat(),
            ),
            Frame::Ping(id) => control(out, 6, 0, &id.to_be_bytes()),
            Frame::GoAway { last_good, status } => control(
                out,
                7,
                0,
                &[stream_id(*last_good), *status]
                    .map(u32::to_be_bytes)
                    .concat(),
            ),
            Frame::Headers { stream, headers } => {
                self.headers_frame(out, 8, false, *stream, &[], headers)
            }
            // Never sent by this server.
            Frame::Settings | Frame::WindowUpdate | Frame::Unknown(_) => {}
        }
    }

    /// A control frame of `kind` for `stream`: the stream id, `fields`, then the header block.
    fn headers_frame(
        &mut self,
        out: &mut BytesMut,
        kind: u16,
        fin: bool,
        stream: u32,
        fields: &[u8],
        headers: &Headers,
    ) {
        let mut body = BytesMut::new();
        body.put_u32(stream_id(stream));
        body.extend_from_slice(fields);
        body.extend_from_slice(&self.deflate_headers(headers));
        control(out, kind, u8::from(fin), &body);
    }

    fn deflate_headers(&mut self, headers: &Headers) -> Vec<u8> {
        let mut block = BytesMut::new();
        block.put_u32(headers.len() as u32);
        for (name, value) in headers {
            block.put_u32(name.len() as u32);
            block.extend_from_slice(name.to_ascii_lowercase().as_bytes());
            block.put_u32(value.len() as u32);
            block.extend_from_slice(value.as_bytes());
        }
        let mut out = Vec::with_capacity(block.len() + 64);
        let mut given = 0;
        loop {
            let before = self.deflate.total_in();
            self.deflate
                .compress_vec(&block[given..], &mut out, FlushCompress::Sync)
                .expect("deflating into memory cannot fail");
            given += (self.deflate.total_in() - before) as usize;
            if given == block.len() && out.len() < out.capacity() {
                return out;
            }
            out.reserve(256);
        }
    }
}

fn control(out: &mut BytesMut, kind: u16, flags: u8, body: &[u8]) {
    out.put_u16(0x8000 | VERSION);
    out.put_u16(kind);
    out.put_u8(flags);
    out.put_uint(body.len() as u64, 3);
    out.extend_from_slice(body);
}

fn parse_block(mut block: &[u8]) -> Result<Headers, SpdyError> {
    let bad = |why: &str| SpdyError::Headers(why.to_string());
    let take = |block: &mut &[u8]| -> Result<Vec<u8>, SpdyError> {
        if block.len() < 4 {
            return Err(bad("truncated length"));
        }
        let length = block.get_u32() as usize;
        if block.len() < length {
            return Err(bad("truncated string"));
        }
        let (value, rest) = block.split_at(length);
        *block = rest;
        Ok(value.to_vec())
    };
    if block.len() < 4 {
        return Err(bad("truncated count"));
    }
    let count = block.get_u32() as usize;
    let mut headers = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let name = String::from_utf8(take(&mut block)?).map_err(|_| bad("a name is not UTF-8"))?;
        let value =
            String::from_utf8(take(&mut block)?).map_err(|_| bad("a value is not UTF-8"))?;
        headers.push((name.to_ascii_lowercase(), value));
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    fn decode_all(codec: &mut Decoder, bytes: &[u8]) -> Vec<Frame> {
        let mut buf = BytesMut::from(bytes);
        let mut frames = Vec::new();
        while let Some(frame) = codec.decode(&mut buf).unwrap() {
            frames.push(frame);
        }
        assert!(buf.is_empty(), "bytes left over: {buf:?}");
        frames
    }

    #[test]
    fn the_dictionary_is_spdy3s() {
        assert_eq!(DICTIONARY.len(), 1423);
        // zlib names a dictionary by its Adler-32, as the peer's stream header does.
        let mut probe = Compress::new(Compression::default(), true);
        assert_eq!(probe.set_dictionary(&DICTIONARY).unwrap(), 0xe3c6_a7c2);
    }

    /// Frames written by moby/spdystream's framer (the API server's), captured once.
    const FROM_SPDYSTREAM: &str = "80030001000000290000000100000000000078f9e3c6a7c26260606004a7b392a2d4c45c6851c29a0a0a6800000000ffff800300010000001900000003000000000000c22ac5565c92925f5a02000000ffff00000003010000026869800300060000000400000001";

    #[test]
    fn frames_from_spdystream_are_read() {
        let frames = decode_all(&mut Decoder::default(), &hex(FROM_SPDYSTREAM));
        let syn = |stream, kind: &str| Frame::SynStream {
            stream,
            fin: false,
            headers: vec![("streamtype".into(), kind.into())],
        };
        assert_eq!(
            frames,
            vec![
                syn(1, "error"),
                syn(3, "stdout"),
                Frame::Data {
                    stream: 3,
                    fin: true,
                    data: Bytes::from_static(b"hi")
                },
                Frame::Ping(1),
            ]
        );
    }

    #[test]
    fn what_is_written_reads_back_over_one_compression_stream() {
        let (mut writer, mut reader) = (Encoder::default(), Decoder::default());
        let frames = vec![
            Frame::SynReply {
                stream: 1,
                fin: false,
                headers: vec![],
            },
            Frame::SynStream {
                stream: 2,
                fin: true,
                headers: vec![
                    ("streamtype".into(), "data".into()),
                    ("port".into(), "8080".into()),
                ],
            },
            Frame::Headers {
                stream: 2,
                headers: vec![("x".into(), "y".repeat(10_000))],
            },
            Frame::Data {
                stream: 5,
                fin: false,
                data: Bytes::from(vec![7u8; 40_000]),
            },
            Frame::RstStream {
                stream: 5,
                status: CANCEL,
            },
            Frame::Ping(2),
            Frame::GoAway {
                last_good: 5,
                status: 0,
            },
        ];
        let mut out = BytesMut::new();
        for frame in &frames {
            writer.encode(frame, &mut out);
        }
        assert_eq!(decode_all(&mut reader, &out), frames);
    }

    #[test]
    fn a_frame_arriving_in_pieces_is_read_once_whole() {
        let bytes = hex(FROM_SPDYSTREAM);
        let mut codec = Decoder::default();
        let mut buf = BytesMut::new();
        let mut frames = 0;
        for byte in bytes {
            buf.put_u8(byte);
            while codec.decode(&mut buf).unwrap().is_some() {
                frames += 1;
            }
        }
        assert_eq!(frames, 4);
    }

    #[test]
    fn hostile_frames_are_refused_not_buffered() {
        let mut codec = Decoder::default();
        // A data frame claiming 16 MiB.
        let mut huge = BytesMut::from(&[0, 0, 0, 1, 0, 0xff, 0xff, 0xff][..]);
        assert_eq!(codec.decode(&mut huge), Err(SpdyError::TooLarge(0xff_ffff)));
        // SPDY/2.
        let mut old = BytesMut::from(&[0x80, 2, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1][..]);
        assert_eq!(codec.decode(&mut old), Err(SpdyError::Version(2)));
        // A RST_STREAM too short to hold its fields.
        let mut short = BytesMut::from(&[0x80, 3, 0, 3, 0, 0, 0, 2, 0, 0][..]);
        assert!(matches!(
            codec.decode(&mut short),
            Err(SpdyError::Malformed { .. })
        ));
        // A header block that is not zlib at all.
        let mut junk = BytesMut::from(&[0x80, 3, 0, 2, 0, 0, 0, 8, 0, 0, 0, 1, 1, 2, 3, 4][..]);
        assert!(matches!(
            Decoder::default().decode(&mut junk),
            Err(SpdyError::Headers(_))
        ));
    }

    #[test]
    fn a_header_block_that_inflates_past_the_bound_is_refused() {
        let mut writer = Encoder::default();
        let mut out = BytesMut::new();
        writer.encode(
            &Frame::Headers {
                stream: 1,
                headers: vec![("x".into(), "a".repeat(MAX_HEADER_BYTES + 1))],
            },
            &mut out,
        );
        assert!(out.len() < 1024, "compresses well: {}", out.len());
        assert!(matches!(
            Decoder::default().decode(&mut out),
            Err(SpdyError::Headers(_))
        ));
    }

    #[test]
    fn unknown_control_frames_are_passed_over() {
        let mut buf = BytesMut::from(&[0x80, 3, 0, 0x42, 0, 0, 0, 1, 9][..]);
        assert_eq!(
            Decoder::default().decode(&mut buf),
            Ok(Some(Frame::Unknown(0x42)))
        );
    }
}
