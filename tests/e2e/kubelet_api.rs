//! The kubelet API as a hostile client meets it: bounded in how long it waits and how much
//! it holds for one caller.

use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use darkcore_crds::{Arch, DevicePoolSpec, DeviceSelector};
use k8s_openapi::api::core::v1::Node;

use crate::devices::process_pool;
use crate::fleet::{self, Agent};
use crate::pods::Bench;

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

fn kubelet_port_of(node: &Node) -> i32 {
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
    let two_arches = DevicePoolSpec {
        selector: DeviceSelector {
            arch: vec![Arch::Amd64, Arch::Arm64],
            ..Default::default()
        },
        ..process_pool()
    };
    let bench = Bench::start("nodeports", 1, two_arches).await;
    let token = fleet::token(&bench.fx.pool, &["--uses", "1"]);
    let mut arm = Agent::start_as_arch(bench.fx.operator.gateway_port, &token, "arm64").await;
    let arm_node = format!("darkcore-{}-linux-arm64", bench.fx.pool);
    fleet::node_cpu_is(&bench.fx.nodes(), &arm_node, 1000, Duration::from_secs(30)).await;
    for (name, arch) in [("on-arm", "arm64"), ("on-amd", "amd64")] {
        let mut pod = bench.pod(name, "echo hello; sleep 300", "Never");
        pod.spec
            .as_mut()
            .unwrap()
            .node_selector
            .get_or_insert_with(Default::default)
            .insert("kubernetes.io/arch".into(), arch.into());
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
