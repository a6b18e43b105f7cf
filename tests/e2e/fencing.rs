//! Fencing: a device cut off from the operator stops its tasks itself, and the operator runs
//! them elsewhere only after the pool's fence, so no task runs on two devices at once.
//! The cut is a TCP proxy between one agent and the gateway that swallows every byte.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use darkcore_crds::DevicePoolSpec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::devices::process_pool;
use crate::fleet::{self, Agent, token};
use crate::harness::poll_until;
use crate::pods::{Bench, main_status, placed_on};

/// A TCP proxy to the gateway that can be cut: from then on it swallows everything both ways
/// and closes nothing, as a dead network path does; new connections are held the same way.
struct CutProxy {
    port: u16,
    cut: watch::Sender<bool>,
}

impl CutProxy {
    async fn start(target: u16) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cut, watching) = watch::channel(false);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let cut = watching.clone();
                tokio::spawn(async move {
                    let is_cut = *cut.borrow();
                    let server = match is_cut {
                        true => None,
                        false => TcpStream::connect(("127.0.0.1", target)).await.ok(),
                    };
                    let (from_client, to_client) = client.into_split();
                    match server {
                        Some(server) => {
                            let (from_server, to_server) = server.into_split();
                            tokio::join!(
                                pipe(from_client, Some(to_server), cut.clone()),
                                pipe(from_server, Some(to_client), cut),
                            );
                        }
                        None => {
                            let _held = to_client;
                            pipe(from_client, None, cut).await;
                        }
                    }
                });
            }
        });
        CutProxy { port, cut }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

/// Copies `from` to `to` until either closes; while cut (or with nowhere to go), reads and
/// drops.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: Option<tokio::net::tcp::OwnedWriteHalf>,
    cut: watch::Receiver<bool>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let is_cut = *cut.borrow();
        if is_cut {
            continue;
        }
        if let Some(to) = to.as_mut()
            && to.write_all(&buffer[..n]).await.is_err()
        {
            return;
        }
    }
}

async fn node_cpu(bench: &Bench, millis: u64) {
    let nodes = bench.fx.nodes();
    fleet::node_cpu_is(&nodes, &bench.fx.node, millis, Duration::from_secs(60)).await;
}

fn epoch_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// The pid and start time (epoch ms) of the run that printed `ready <pid> <ms>` last.
fn last_ready(logs: &str) -> Option<(u32, u128)> {
    let line = logs.lines().rfind(|l| l.starts_with("ready "))?;
    let mut words = line.split_whitespace().skip(1);
    Some((words.next()?.parse().ok()?, words.next()?.parse().ok()?))
}

// Multi-threaded: `darkcore-agent join` runs as a blocking child process, and the proxy's
// tasks must forward its call meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_device_stops_its_task_before_it_runs_elsewhere() {
    const FENCE: u64 = 5;
    const MARGIN: u64 = darkcore_crds::device_pool::FENCE_MARGIN_SECONDS as u64;
    let spec = DevicePoolSpec {
        device_lost_after_seconds: 5,
        fence_seconds: FENCE as u32,
        ..process_pool()
    };
    let mut bench = Bench::start("fence", 0, spec).await;
    let proxy = CutProxy::start(bench.fx.operator.gateway_port).await;
    let cut_off = Agent::start(proxy.port, &token(&bench.fx.pool, &[]), 1.0).await;
    node_cpu(&bench, 1000).await;
    bench
        .create(bench.pod(
            "long",
            "echo ready $$$$ $$(date +%s%3N); exec sleep 600",
            "Never",
        ))
        .await;
    let logs = bench
        .logs_show("long", "ready ", Duration::from_secs(60))
        .await;
    let (first_pid, _) = last_ready(&logs).unwrap();
    let running = bench
        .phase_is("long", "Running", Duration::from_secs(10))
        .await;
    assert_eq!(placed_on(&running).unwrap(), cut_off.device_id);
    bench.add_agent("").await;

    proxy.set_cut(true);
    let (cut_at, cut_at_ms) = (Instant::now(), epoch_ms());
    // The agent stops the task itself: its fence, a second's tick, and its 5 s grace at most.
    let first = format!("/proc/{first_pid}");
    poll_until(
        "the cut-off device stops its task",
        Duration::from_secs(FENCE + 1 + 5 + 3),
        || async {
            match std::path::Path::new(&first).exists() {
                true => Err(format!("{:?} after the cut", cut_at.elapsed())),
                false => Ok(()),
            }
        },
    )
    .await;
    let stopped_ms = epoch_ms();
    eprintln!(
        "the cut-off device stopped its task {:?} after the cut",
        cut_at.elapsed()
    );

    // The operator runs it on the other device once the fence and its margin have passed.
    let (second_pid, second_started_ms) = poll_until(
        "the task runs again on the other device",
        Duration::from_secs(FENCE + MARGIN + 30),
        || async {
            let logs = bench.kubectl(&["logs", "long"]);
            match last_ready(&logs) {
                Some((pid, ms)) if pid != first_pid => Ok((pid, ms)),
                _ => Err(logs),
            }
        },
    )
    .await;
    let waited = second_started_ms.saturating_sub(cut_at_ms);
    eprintln!("the second run started {waited} ms after the cut");
    assert!(
        second_started_ms > stopped_ms,
        "the second run started ({second_started_ms}) after the first had stopped ({stopped_ms})"
    );
    assert!(
        waited >= u128::from((FENCE + MARGIN - 2) * 1000),
        "the operator waited for the fence and its margin: {waited} ms"
    );
    assert!(std::path::Path::new(&format!("/proc/{second_pid}")).exists());

    // Back on the network, the cut-off device reports its stopped attempt, which changes
    // nothing: the pod runs on where it was moved.
    proxy.set_cut(false);
    node_cpu(&bench, 2000).await;
    let pod = bench
        .phase_is("long", "Running", Duration::from_secs(10))
        .await;
    assert_ne!(placed_on(&pod).unwrap(), cut_off.device_id);
    let status = main_status(&pod);
    assert_eq!(status.restart_count, 1);
    let last = status.last_state.unwrap().terminated.unwrap();
    assert_eq!(last.reason.as_deref(), Some("DeviceLost"));
    drop(cut_off);
    bench.finish().await;
}
