//! SHA-256 as the agent writes it: lower-case hex, of bytes or of a stream read in small
//! pieces (a layer or a result file may be larger than a small device's spare memory).

use std::io::Read;

use ring::digest::{Context, SHA256};

/// `bytes` as lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of `bytes`, in hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&SHA256, bytes).as_ref())
}

/// The SHA-256 of everything `reader` gives, in hex, read 64 KiB at a time.
pub fn sha256_read(mut reader: impl Read) -> std::io::Result<String> {
    let mut context = Context::new(&SHA256);
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        match reader.read(&mut buffer)? {
            0 => return Ok(hex(context.finish().as_ref())),
            n => context.update(&buffer[..n]),
        }
    }
}
