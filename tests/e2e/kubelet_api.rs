//! The kubelet API as a hostile client meets it: bounded in how long it waits and how much
//! it holds for one caller.

use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::devices::process_pool;

/// The kubelet API is the operator's only other listening port: a client that opens it and
/// says nothing is let go after the TLS handshake timeout (10 s), not held for ever.
#[tokio::test]
async fn a_silent_client_of_the_kubelet_api_is_let_go() {
    let fx = crate::harness::PoolFixture::start("silent", process_pool()).await;
    let mut socket = TcpStream::connect(("127.0.0.1", fx.operator.kubelet_port))
        .await
        .unwrap();
    let opened = Instant::now();
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(20), socket.read(&mut byte)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the server closes the silent connection: {closed:?}"
    );
    let after = opened.elapsed();
    assert!(
        after >= Duration::from_secs(9),
        "not before the timeout: {after:?}"
    );
    eprintln!("a silent kubelet API client was let go after {after:?}");
    fx.finish().await;
}
