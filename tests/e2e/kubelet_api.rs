//! The kubelet API as a hostile client meets it: bounded in how long it waits and how much
//! it holds for one caller.

use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use k8s_openapi::api::core::v1::{Node, Pod};

use crate::devices::process_pool;
use crate::harness::poll_until;
use crate::pods::{Bench, pin_arch};

/// The kubelet API is the operator's only other listening port (one per node): a client that
/// opens it and says nothing is let go after the TLS handshake timeout (10 s), not held for ever.
#[tokio::test]
async fn a_silent_client_of_the_kubelet_api_is_let_go() {
    let fx = crate::harness::PoolFixture::start("silent", process_pool()).await;
    // The node's endpoint opens as the node is published.
    let port = kubelet_port_of(&fx.ready_node().await);
    let mut socket = TcpStream::connect(("127.0.0.1", port as u16))
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

/// The HTTP status a kubelet endpoint answers a GET of `path` with no client certificate, and
/// `bearer` as the token, if any.
pub fn kubelet_status(port: u16, path: &str, bearer: Option<&str>) -> String {
    let mut curl = std::process::Command::new("curl");
    curl.args(["-sk", "-o", "/dev/null", "-w", "%{http_code}"]);
    if let Some(token) = bearer {
        curl.arg("-H").arg(format!("Authorization: Bearer {token}"));
    }
    let out = curl
        .arg(format!("https://127.0.0.1:{port}{path}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A GET on a kubelet endpoint as the API server makes it: with the API server's kubelet
/// client certificate. Returns the HTTP status and body.
fn kubelet_get(port: i32, path: &str) -> (String, String) {
    let kubeconfig = std::env::var_os("KUBECONFIG").expect("KUBECONFIG");
    let pki = std::path::Path::new(&kubeconfig).with_file_name("pki");
    let out = std::process::Command::new("curl")
        .args(["-sk", "-w", "\n%{http_code}", "--cert"])
        .arg(pki.join("apiserver-kubelet-client.crt"))
        .arg("--key")
        .arg(pki.join("apiserver-kubelet-client.key"))
        .arg(format!("https://127.0.0.1:{port}{path}"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", &out));
    (code.to_string(), body.to_string())
}

pub fn kubelet_port_of(node: &Node) -> i32 {
    let endpoints = node
        .status
        .as_ref()
        .and_then(|s| s.daemon_endpoints.as_ref());
    endpoints
        .and_then(|e| e.kubelet_endpoint.as_ref())
        .map_or(0, |e| e.port)
}

/// A pool with devices of two arches has two nodes; each has its own kubelet endpoint, which
/// lists and serves that node's pods only, as a kubelet does.
#[tokio::test]
async fn each_node_has_its_own_kubelet_endpoint_with_its_own_pods() {
    let (bench, mut arm, arm_node) = Bench::start_two_arches("nodeports", process_pool()).await;
    for (name, arch) in [("on-arm", "arm64"), ("on-amd", "amd64")] {
        let mut pod = bench.pod(name, "echo hello; sleep 300", "Never");
        pin_arch(&mut pod, arch);
        bench.create(pod).await;
        bench
            .phase_is(name, "Running", Duration::from_secs(60))
            .await;
    }

    let nodes = bench.fx.nodes();
    let amd_port = kubelet_port_of(&nodes.get(&bench.fx.node).await.unwrap());
    let arm_port = kubelet_port_of(&nodes.get(&arm_node).await.unwrap());
    assert_ne!(amd_port, arm_port, "one endpoint per node");
    for (port, mine, other) in [
        (amd_port, "on-amd", "on-arm"),
        (arm_port, "on-arm", "on-amd"),
    ] {
        for path in ["/pods", "/runningpods", "/runningpods/"] {
            let (code, body) = kubelet_get(port, path);
            assert_eq!(code, "200", "{path} on {port}: {body}");
            assert!(
                body.contains(&format!("\"name\":\"{mine}\"")),
                "{path}: {body}"
            );
            assert!(
                !body.contains(&format!("\"name\":\"{other}\"")),
                "{path}: {body}"
            );
        }
        let logs = |pod: &str| {
            kubelet_get(
                port,
                &format!("/containerLogs/{}/{pod}/main", bench.ns.name),
            )
        };
        let (code, body) = logs(mine);
        assert_eq!(code, "200", "{body}");
        let (code, body) = logs(other);
        assert_eq!(code, "404", "another node's pod: {body}");
        assert!(body.contains("is not on node"), "{body}");
    }
    arm.kill().await;
    bench.finish().await;
}

/// `scripts/node-net`: an address of this machine that is not loopback, on a veth pair into a
/// network namespace; removed when dropped.
pub(crate) struct NodeNet {
    name: &'static str,
    pub address: String,
}

impl NodeNet {
    pub fn up(name: &'static str, index: u8) -> NodeNet {
        let out = std::process::Command::new(crate::harness::workspace().join("scripts/node-net"))
            .args(["up", name, &index.to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "scripts/node-net up: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let address = String::from_utf8_lossy(&out.stdout).trim().to_string();
        NodeNet { name, address }
    }
}

impl Drop for NodeNet {
    fn drop(&mut self) {
        let _ = std::process::Command::new(crate::harness::workspace().join("scripts/node-net"))
            .args(["down", self.name])
            .status();
    }
}

/// The API server refuses to proxy to a node on loopback. On an address of this machine that
/// is not loopback (as the demo publishes), node proxy calls reach the node's kubelet API.
#[tokio::test]
async fn the_api_server_proxies_to_a_node_on_an_address_of_this_machine() {
    let net = NodeNet::up("e2e", 78);
    let address = net.address.as_str();
    let extra = ["--node-address", address, "--kubelet-bind", address];
    let bench = Bench::start_with("nodeproxy", 1, process_pool(), &extra).await;
    bench
        .create(bench.pod("served", "echo hello; sleep 300", "Never"))
        .await;
    bench
        .phase_is("served", "Running", Duration::from_secs(60))
        .await;
    let node = &bench.fx.node;
    let listed = bench.kubectl(&["get", "--raw", &format!("/api/v1/nodes/{node}/proxy/pods")]);
    assert!(listed.contains("\"name\":\"served\""), "{listed}");
    let running = bench.kubectl(&[
        "get",
        "--raw",
        &format!("/api/v1/nodes/{node}/proxy/runningpods"),
    ]);
    assert!(running.contains("\"name\":\"served\""), "{running}");
    bench
        .logs_show("served", "hello", Duration::from_secs(30))
        .await;
    bench.finish().await;
    drop(net);
}

/// The value of the Prometheus sample whose line starts with `start`.
fn sample(metrics: &str, start: &str) -> Option<f64> {
    let line = metrics.lines().find(|l| l.starts_with(start))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A busy `process` pod's CPU and memory show on its node's stats.
#[tokio::test]
async fn a_busy_pods_cpu_and_memory_show_in_the_nodes_stats() {
    let bench = Bench::start("podstats", 1, process_pool()).await;
    let busy = bench.pod("busy", "while :; do :; done", "Never");
    busy_pod_shows_in_stats(&bench, busy).await;
    bench.finish().await;
}

/// Creates `pod` (named `busy`, spinning on one core) and checks that its CPU and memory show
/// on its node's /stats/summary and /metrics/resource, as metrics-server reads them for
/// `kubectl top`.
pub async fn busy_pod_shows_in_stats(bench: &Bench, pod: Pod) {
    bench.create(pod).await;
    bench
        .phase_is("busy", "Running", Duration::from_secs(60))
        .await;
    let port = kubelet_port_of(&bench.fx.nodes().get(&bench.fx.node).await.unwrap());
    let ns = bench.ns.name.clone();
    // Callers without credentials get 401; with a token that may not read node stats, 403.
    bench.kubectl(&["create", "serviceaccount", "nobody"]);
    let nobody = bench.kubectl(&["create", "token", "nobody"]);
    for path in ["/stats/summary", "/metrics/resource"] {
        assert_eq!(kubelet_status(port as u16, path, None), "401", "{path}");
        let status = kubelet_status(port as u16, path, Some(nobody.trim()));
        assert_eq!(status, "403", "{path}");
    }
    // Agents send stats every 10 s, and only what changed.
    let summary: serde_json::Value = poll_until(
        "the busy pod's CPU shows in /stats/summary",
        Duration::from_secs(60),
        || async {
            let (code, body) = kubelet_get(port, "/stats/summary");
            let summary: serde_json::Value =
                serde_json::from_str(&body).map_err(|e| format!("{code} {e}: {body}"))?;
            let pod = summary["pods"]
                .as_array()
                .and_then(|pods| pods.iter().find(|p| p["podRef"]["name"] == "busy"));
            let cpu = pod.and_then(|p| p["containers"][0]["cpu"]["usageCoreNanoSeconds"].as_u64());
            match cpu {
                Some(ns) if ns > 1_000_000_000 => Ok(summary.clone()),
                _ => Err(body),
            }
        },
    )
    .await;
    let pod = &summary["pods"][0];
    assert_eq!(pod["podRef"]["namespace"], ns.as_str());
    let main = &pod["containers"][0];
    assert_eq!(main["name"], "main");
    assert!(
        main["memory"]["workingSetBytes"].as_u64().unwrap() > 0,
        "{main}"
    );
    let cores = main["cpu"]["usageNanoCores"].as_u64().unwrap() as f64 / 1e9;
    // At most the 1 core the device offers; the loop gets less on a busy test machine.
    assert!(
        cores > 0.05 && cores <= 1.0,
        "a busy loop on a 1-core device: {cores} cores"
    );
    assert!(
        summary["node"]["cpu"]["usageCoreNanoSeconds"]
            .as_u64()
            .unwrap()
            > 0
    );

    let (code, metrics) = kubelet_get(port, "/metrics/resource");
    assert_eq!(code, "200", "{metrics}");
    let container = format!(
        "container_cpu_usage_seconds_total{{container=\"main\",namespace=\"{ns}\",pod=\"busy\"}}"
    );
    assert!(
        sample(&metrics, &container).is_some_and(|s| s > 1.0),
        "{metrics}"
    );
    let memory = format!(
        "container_memory_working_set_bytes{{container=\"main\",namespace=\"{ns}\",pod=\"busy\"}}"
    );
    assert!(
        sample(&metrics, &memory).is_some_and(|b| b > 0.0),
        "{metrics}"
    );
    assert!(
        sample(&metrics, "node_cpu_usage_seconds_total").is_some_and(|s| s > 1.0),
        "{metrics}"
    );
}

/// A device that lies about its containers' use (tests/swarm `--lie-stats`: 1,000 core-seconds
/// a second, a petabyte of memory, and a task it never held) shows no more than it offers.
#[tokio::test]
async fn a_device_lying_about_its_stats_shows_no_more_than_it_offers() {
    let bench = Bench::start("statslie", 0, process_pool()).await;
    let token = crate::fleet::token(&bench.fx.pool, &[]);
    let lies = ["--task-seconds", "-1", "--lie-stats"];
    let _liar = crate::fleet::swarm_device(bench.fx.operator.gateway_port, &token, 1000, &lies);
    let node = crate::fleet::node_cpu_is(
        &bench.fx.nodes(),
        &bench.fx.node,
        1000,
        Duration::from_secs(60),
    )
    .await;
    let offered_memory = node.status.as_ref().unwrap().capacity.as_ref().unwrap()["memory"].clone();
    bench.create(bench.pod("lied", "true", "Never")).await;
    bench
        .phase_is("lied", "Running", Duration::from_secs(60))
        .await;
    let port = kubelet_port_of(&node);
    let since = std::time::Instant::now();
    let main = poll_until(
        "three seconds of the liar's stats",
        Duration::from_secs(30),
        || async {
            let (_, body) = kubelet_get(port, "/stats/summary");
            let summary: serde_json::Value =
                serde_json::from_str(&body).map_err(|e| e.to_string())?;
            let main = summary["pods"][0]["containers"][0].clone();
            match main["cpu"]["usageCoreNanoSeconds"].as_u64() {
                Some(ns) if ns > 0 && since.elapsed() > Duration::from_secs(3) => Ok(main),
                _ => Err(body),
            }
        },
    )
    .await;
    let cpu_ns = main["cpu"]["usageCoreNanoSeconds"].as_u64().unwrap();
    let most = since.elapsed().as_nanos() as u64 + 2_000_000_000;
    assert!(
        cpu_ns <= most,
        "1 core at most since it ran: {cpu_ns} ns in {:?}",
        since.elapsed()
    );
    let cores = main["cpu"]["usageNanoCores"].as_u64().unwrap();
    assert!(
        cores <= 1_000_000_000,
        "at most the core it offers: {cores} nanocores"
    );
    let memory = main["memory"]["workingSetBytes"].as_u64().unwrap();
    let offered = darkcore_operator::domain::quantity::parse_memory(&offered_memory.0);
    assert!(
        Some(memory) <= offered,
        "{memory} bytes, offered {offered_memory:?}"
    );
    let refused = "darkcore_operator_frames_rejected_total{reason=\"stats_not_held\"}";
    let refused = crate::devices::metric(&bench.fx.operator, refused).await;
    assert!(
        refused.is_some_and(|n| n > 0.0),
        "a task it never held: {refused:?}"
    );
    bench.finish().await;
}
