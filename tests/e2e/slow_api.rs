//! A slow API server must not make healthy devices look dead: the operator reaches it through a
//! TCP proxy that holds every answer for a while, and a device's heartbeats, its fence and its
//! task carry on as if nothing were wrong.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Event;
use kube::Api;
use kube::api::ListParams;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::devices::quick_loss_pool;
use crate::harness::{PoolFixture, log_dir, unique};
use crate::pods::Bench;

/// How long the proxy holds each piece of the API server's answers.
const DELAY: Duration = Duration::from_secs(2);

/// Forwards connections to `upstream`, holding everything coming back for `delay` (latency,
/// not a bandwidth limit: pieces keep their order and are not slowed by each other). It runs
/// on its own thread and runtime, so the test's blocking calls (kubectl, `darkcore-agent
/// join`) never stall it.
fn slow_proxy(upstream: SocketAddr, delay: Duration) -> SocketAddr {
    let (found, addr) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            found.send(listener.local_addr().unwrap()).unwrap();
            proxy(listener, upstream, delay).await;
        });
    });
    addr.recv().unwrap()
}

async fn proxy(listener: TcpListener, upstream: SocketAddr, delay: Duration) {
    while let Ok((client, _)) = listener.accept().await {
        tokio::spawn(relay(client, upstream, delay));
    }
}

/// One connection: what the client sends goes at once, what the server answers after `delay`.
async fn relay(client: TcpStream, upstream: SocketAddr, delay: Duration) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
        let _ = server_write.shutdown().await;
    });
    let (held, mut due) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    tokio::spawn(async move {
        while let Some((at, piece)) = due.recv().await {
            tokio::time::sleep_until(at.into()).await;
            if client_write.write_all(&piece).await.is_err() {
                return;
            }
        }
        let _ = client_write.shutdown().await;
    });
    let mut buffer = vec![0u8; 64 * 1024];
    while let Ok(read) = server_read.read(&mut buffer).await {
        let piece = (Instant::now() + delay, buffer[..read].to_vec());
        if read == 0 || held.send(piece).is_err() {
            return;
        }
    }
}

/// The operator's kubeconfig, pointed at `proxy` instead of the API server (the server's
/// certificate names 127.0.0.1, which the proxy's address is too).
fn kubeconfig_through(proxy: SocketAddr) -> (PathBuf, SocketAddr) {
    let original = crate::helm::impersonating_kubeconfig();
    let text = std::fs::read_to_string(&original).unwrap();
    let mut config: serde_norway::Value = serde_norway::from_str(&text).unwrap();
    let cluster = &mut config["clusters"][0]["cluster"];
    let server = cluster["server"].as_str().unwrap().to_string();
    let upstream: SocketAddr = server.trim_start_matches("https://").parse().unwrap();
    cluster["server"] = format!("https://{proxy}").into();
    let path = log_dir().join(format!("{}.kubeconfig", unique("slow-api")));
    std::fs::write(&path, serde_norway::to_string(&config).unwrap()).unwrap();
    (path, upstream)
}

#[tokio::test]
async fn a_slow_api_server_never_makes_a_healthy_device_look_dead() {
    // Find the API server first, then put the proxy in front of it.
    let (_, upstream) = kubeconfig_through("127.0.0.1:1".parse().unwrap());
    let proxy = slow_proxy(upstream, DELAY);
    let (kubeconfig, _) = kubeconfig_through(proxy);
    // A short fence and loss threshold: a device whose heartbeats went unanswered for 5 s
    // would stop its task, and one unheard for 5 s would be declared lost.
    let fx = PoolFixture::start_through("slowapi", quick_loss_pool(), &kubeconfig).await;
    let bench = Bench::on(fx, "slowapi", 1).await;
    // A task that outlives several fences, while every status write, Event and usage flush
    // the operator makes waits 2 s for its answer.
    bench
        .create(bench.pod("long", "echo started; sleep 20; echo done", "Never"))
        .await;
    let pod = bench
        .phase_is("long", "Succeeded", Duration::from_secs(120))
        .await;
    let status = &pod
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0];
    assert_eq!(status.restart_count, 0, "run once, on its first device");
    assert!(
        status
            .last_state
            .as_ref()
            .is_none_or(|s| s.terminated.is_none()),
        "no lost or preempted attempt: {:?}",
        status.last_state
    );
    let events: Api<Event> = Api::namespaced(bench.fx.client.clone(), &bench.ns.name);
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    assert!(
        !reasons
            .iter()
            .any(|r| r == "DeviceLost" || r == "Preempted"),
        "{reasons:?}"
    );
    let agent_log = std::fs::read_to_string(&bench.agents[0].log).unwrap_or_default();
    assert!(
        !agent_log.contains("Fenced"),
        "the agent never fenced its task: {agent_log}"
    );
    let operator_log = std::fs::read_to_string(&bench.fx.operator.log).unwrap_or_default();
    assert!(
        !operator_log.contains("device lost"),
        "the operator never declared the device lost"
    );
    assert_eq!(bench.kubectl(&["logs", "long"]), "started\ndone\n");
    bench.finish().await;
}
