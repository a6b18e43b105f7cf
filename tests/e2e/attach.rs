//! `kubectl attach` on darkcore pods: the running container's output from the moment of
//! attaching, stdout and stderr apart, ending cleanly when the container ends; and a clear
//! refusal of stdin, which darkcore does not keep open.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _};

use crate::devices::process_pool;
use crate::pods::Bench;

/// What a reader has read so far, shared with the test that waits on it.
type Seen = std::sync::Arc<std::sync::Mutex<String>>;

fn collect(mut from: impl AsyncRead + Unpin + Send + 'static) -> Seen {
    let seen = Seen::default();
    let into = seen.clone();
    tokio::spawn(async move {
        let mut buffer = [0u8; 4096];
        while let Ok(n) = from.read(&mut buffer).await {
            if n == 0 {
                break;
            }
            into.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buffer[..n]));
        }
    });
    seen
}

/// Waits until `seen` holds `wanted`, for at most a minute.
async fn until_seen(seen: &Seen, wanted: &str, stream: &str) {
    let waited = tokio::time::timeout(Duration::from_secs(60), async {
        while !seen.lock().unwrap().contains(wanted) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "{wanted:?} never reached attach's {stream}: {:?}",
        seen.lock().unwrap()
    );
}

#[tokio::test]
async fn attach_shows_output_from_now_on_both_streams_until_the_container_ends() {
    let bench = Bench::start("attach", 1, process_pool()).await;
    // Ticks until told to stop; when told to speak, one line on each stream. The stop file
    // names the exec that wrote it, and the container ends only once that exec has: an exec
    // still running when its container ends is killed with it (exit 137), as in a kubelet's.
    let script = "echo early; \
        while [ ! -e stop ]; do echo tick; \
          if [ -e speak ] && [ ! -e spoken ]; then echo out-line; echo err-line >&2; touch spoken; fi; \
          sleep 0.2; done; while kill -0 `cat stop` 2>/dev/null; do sleep 0.05; done; echo bye";
    bench.create(bench.pod("ticker", script, "Never")).await;
    bench
        .phase_is("ticker", "Running", Duration::from_secs(60))
        .await;

    let mut attach = tokio::process::Command::new("kubectl")
        .args(["-n", &bench.ns.name, "attach", "ticker"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("kubectl runs");
    let out = collect(attach.stdout.take().unwrap());
    let err = collect(attach.stderr.take().unwrap());
    // Attached once ticks arrive; only then is the container told to speak, and to stop.
    until_seen(&out, "tick\n", "stdout").await;
    let (code, _, e) = bench
        .kubectl_with_input(&["exec", "ticker", "--", "touch", "speak"], b"")
        .await;
    assert_eq!(code, 0, "{e}");
    until_seen(&out, "out-line\n", "stdout").await;
    until_seen(&err, "err-line\n", "stderr").await;
    let (code, _, e) = bench
        .kubectl_with_input(
            &[
                "exec",
                "ticker",
                "--",
                "sh",
                "-c",
                "echo $$ > stopping; mv stopping stop",
            ],
            b"",
        )
        .await;
    assert_eq!(code, 0, "{e}");

    let status = tokio::time::timeout(Duration::from_secs(60), attach.wait())
        .await
        .expect("attach ends when the container does")
        .unwrap();
    until_seen(&out, "bye\n", "stdout").await;
    let out = out.lock().unwrap().clone();
    let err = err.lock().unwrap().clone();
    assert_eq!(status.code(), Some(0), "stdout: {out}\nstderr: {err}");
    assert!(
        !out.contains("early"),
        "attach shows output from now on, not what came before: {out}"
    );
    assert!(!out.contains("err-line"), "stderr stays apart: {out}");
}

#[tokio::test]
async fn attach_with_stdin_to_a_container_asking_for_it_is_refused_with_the_reason() {
    let bench = Bench::start("attachin", 1, process_pool()).await;
    let mut pod = bench.pod("reader", "echo ready; sleep 600", "Never");
    if let Some(spec) = pod.spec.as_mut() {
        spec.containers[0].stdin = Some(true);
    }
    bench.create(pod).await;
    bench
        .phase_is("reader", "Running", Duration::from_secs(60))
        .await;
    let (code, out, err) = bench
        .kubectl_with_input(&["attach", "-i", "reader"], b"hello\n")
        .await;
    assert_ne!(code, 0, "stdout: {out}");
    assert!(err.contains("empty stdin"), "{err}");
    assert!(err.contains("kubectl exec -i"), "{err}");
}
