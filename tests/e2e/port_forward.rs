//! `kubectl port-forward` to darkcore pods: bytes reach the pod's port inside its own network
//! namespace over the agent's connection, a large transfer completes, a port of the device
//! itself is never reached, and runtimes without a network of their own refuse it.

use std::io::{Read as _, Write as _};
use std::time::{Duration, Instant};

use tokio::io::AsyncBufReadExt as _;

use crate::devices::process_pool;
use crate::harness::TestNamespace;
use crate::images::push_busybox;
use crate::oci::{oci_pod, oci_pool};
use crate::pods::Bench;

/// A running `kubectl port-forward` and the local port it listens on.
pub(crate) struct Forward {
    child: tokio::process::Child,
    pub port: u16,
}

impl Forward {
    /// Starts `kubectl port-forward POD :PORT` in `namespace` and waits for its local port.
    pub async fn start(namespace: &str, pod: &str, port: u16) -> Forward {
        let mut child = tokio::process::Command::new("kubectl")
            .args(["-n", namespace, "port-forward", pod])
            .arg(format!(":{port}"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("kubectl runs");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let listening = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                // "Forwarding from 127.0.0.1:43210 -> 8080"
                let local = line
                    .strip_prefix("Forwarding from 127.0.0.1:")
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|p| p.parse::<u16>().ok());
                if let Some(local) = local {
                    return local;
                }
            }
            panic!("kubectl port-forward ended without listening");
        })
        .await
        .expect("kubectl port-forward listens");
        // Its stdout stays open: kubectl dies of a closed pipe at its next line otherwise.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Forward {
            child,
            port: listening,
        }
    }

    /// What kubectl said on stderr, once stopped.
    pub async fn stop(mut self) -> String {
        let _ = self.child.start_kill();
        let out = self.child.wait_with_output().await.unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// What kubectl said on stderr once it gave up on its own, as it does after an error on a
    /// forwarded connection.
    async fn given_up(self) -> String {
        let out = tokio::time::timeout(Duration::from_secs(30), self.child.wait_with_output())
            .await
            .expect("kubectl port-forward ends after the error")
            .unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

/// A busybox script that serves `page` at /index.html and `mib` MiB of zeros at /big on port
/// 8080, from /tmp/www.
pub(crate) fn web_server(page: &str, mib: usize) -> String {
    format!(
        "mkdir -p /tmp/www && echo {page} > /tmp/www/index.html && \
         dd if=/dev/zero of=/tmp/www/big bs=1048576 count={mib} 2>/dev/null && \
         exec httpd -f -p 8080 -h /tmp/www"
    )
}

/// Waits until `pod`'s [`web_server`] answers `page`, asked from inside the pod: kubectl
/// port-forward gives up after one failed connection.
pub(crate) async fn until_serving(ns: &TestNamespace, pod: &str, page: &str) {
    crate::harness::poll_until(
        "the pod's web server listens",
        Duration::from_secs(120),
        || async {
            let probe = "wget -q -O - http://127.0.0.1:8080/index.html";
            let out = ns.kubectl(&["exec", pod, "--", "sh", "-c", probe]);
            if out == format!("{page}\n") {
                Ok(())
            } else {
                Err(out)
            }
        },
    )
    .await;
}

/// An HTTP/1.0 GET of `path` on `port` of this machine: the whole answer.
pub(crate) fn http_get(port: u16, path: &str) -> Vec<u8> {
    let mut socket = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    write!(socket, "GET {path} HTTP/1.0\r\nHost: pod\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = socket.read_to_end(&mut answer);
    answer
}

/// The body of an HTTP answer.
pub(crate) fn body(answer: &[u8]) -> &[u8] {
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(answer.len(), |i| i + 4);
    &answer[split..]
}

const BIG_MIB: usize = 32;

/// The first file named `name` under `dir`.
fn find_file(dir: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let kind = entry.file_type().ok()?;
        if kind.is_file() && entry.file_name() == name {
            return Some(path);
        }
        if kind.is_dir()
            && let Some(found) = find_file(&path, name)
        {
            return Some(found);
        }
    }
    None
}

#[tokio::test]
async fn port_forward_reaches_the_pods_port_inside_its_network() {
    let bench = Bench::start("portfwd", 1, oci_pool()).await;
    let (image, _) = push_busybox(&format!("e2e/{}/busybox:v1", bench.ns.name)).await;
    let script = web_server("hello from the pod", BIG_MIB);
    let container = serde_json::json!({ "image": image, "command": ["sh", "-c", script] });
    bench.create(oci_pod(&bench, "web", container)).await;
    bench
        .phase_is("web", "Running", Duration::from_secs(120))
        .await;

    until_serving(&bench.ns, "web", "hello from the pod").await;
    let forward = Forward::start(&bench.ns.name, "web", 8080).await;
    let page = http_get(forward.port, "/index.html");
    assert!(page.starts_with(b"HTTP/1."), "{page:?}");
    assert_eq!(body(&page), b"hello from the pod\n");
    let started = Instant::now();
    let big = http_get(forward.port, "/big");
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(
        body(&big).len(),
        BIG_MIB << 20,
        "the whole file comes through"
    );
    assert!(body(&big).iter().all(|b| *b == 0));
    eprintln!(
        "port-forward: {BIG_MIB} MiB in {seconds:.2} s ({:.1} MiB/s)",
        BIG_MIB as f64 / seconds
    );

    // The same transfer straight into the pod's network namespace, for the record.
    if let Some(netns) = find_file(&bench.agents[0].state_dir, "netns") {
        let started = Instant::now();
        let direct = std::process::Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .args(["curl", "-s", "-o", "/dev/null", "-w", "%{size_download}"])
            .arg("http://127.0.0.1:8080/big")
            .output()
            .unwrap();
        let direct_seconds = started.elapsed().as_secs_f64();
        eprintln!(
            "direct (nsenter + curl): {} bytes in {direct_seconds:.2} s ({:.1} MiB/s)",
            String::from_utf8_lossy(&direct.stdout),
            BIG_MIB as f64 / direct_seconds
        );
    }

    // A port that only the device listens on is not reached: the pod's loopback is its own.
    let device_only = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    device_only.set_nonblocking(true).unwrap();
    let device_port = device_only.local_addr().unwrap().port();
    let probe = Forward::start(&bench.ns.name, "web", device_port).await;
    let answer = http_get(probe.port, "/");
    assert!(answer.is_empty(), "{answer:?}");
    assert!(
        device_only.accept().is_err(),
        "the device's own port was reached"
    );
    let said = probe.given_up().await;
    assert!(said.contains("connecting to port"), "{said}");
    forward.stop().await;
    bench.finish().await;
}

#[tokio::test]
async fn port_forward_into_a_process_pod_is_refused_with_the_reason() {
    let bench = Bench::start("portproc", 1, process_pool()).await;
    bench.create(bench.pod("shell", "sleep 600", "Never")).await;
    bench
        .phase_is("shell", "Running", Duration::from_secs(60))
        .await;
    let forward = Forward::start(&bench.ns.name, "shell", 8080).await;
    assert!(http_get(forward.port, "/").is_empty());
    let said = forward.given_up().await;
    assert!(said.contains("refused in the process runtime"), "{said}");
    bench.finish().await;
}
