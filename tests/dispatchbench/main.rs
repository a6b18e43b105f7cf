//! darkcore-dispatchbench: the dispatch ceiling with the API server out of the loop. The
//! operator's own pod controller, device registry and agent gateway (gRPC over TLS on loopback)
//! run in this process behind an in-process stand-in for the API that accepts every write;
//! a `darkcore-swarm` process is the fleet. Bursts of pods are fed in as the pod watch would
//! feed them, and the figures are how fast they are dispatched, run and recorded as Succeeded.
//!
//! darkcore-dispatchbench --agents 50 --pods 1000,10000 --out target/bench/dispatch.json

#[path = "../bench_stats.rs"]
mod bench_stats;
mod fake_api;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use darkcore_agent::identity::{DeviceRecord, Identity};
use darkcore_crds::DevicePool;
use darkcore_operator::devices::registry::Registry;
use darkcore_operator::enroll::ca::CaMaterial;
use darkcore_operator::gateway::{self, attach, join};
use darkcore_operator::kubelet::PodIndex;
use darkcore_operator::kubelet::log_store::LogStore;
use darkcore_operator::metrics::Metrics;
use darkcore_operator::pods::controller::{Controller, Input, Shared};
use darkcore_operator::pods::writer::Writer;
use darkcore_operator::pool::POOL_LABEL;
use darkcore_operator::pool::capacity::DeviceInventory as _;
use darkcore_operator::tls;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector;
use kube::runtime::watcher;
use tokio::io::AsyncBufReadExt as _;

use bench_stats::{latencies_ms, ms};
use fake_api::FakeApi;

const POOL: &str = "bench";
const NODE: &str = "darkcore-bench-linux-amd64";
const NAMESPACE: &str = "bench";

#[derive(Parser)]
struct Args {
    /// Devices in the swarm.
    #[arg(long, default_value_t = 50)]
    agents: usize,
    /// Burst sizes, run one after the other.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pods: Vec<usize>,
    /// The swarm binary (default: beside this one).
    #[arg(long)]
    swarm: Option<PathBuf>,
    /// Where the swarm's device identities are made (emptied first).
    #[arg(long, default_value = "target/bench/dispatch-devices")]
    state_dir: PathBuf,
    /// The JSON results file.
    #[arg(long, default_value = "target/bench/dispatch.json")]
    out: PathBuf,
    /// Give up on a burst after this long.
    #[arg(long, default_value_t = 600)]
    timeout_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let api = FakeApi::new();
    let client = kube::Client::new(api.clone().service(), NAMESPACE);
    let metrics = Arc::new(Metrics::default());
    let registry = Registry::new();
    // No revocation list in a benchmark: an empty one, read.
    registry.set_revoked(Default::default());
    let pool = bench_pool()?;
    let (pools, mut pool_writer) = reflector::store::<DevicePool>();
    pool_writer.apply_watcher_event(&watcher::Event::Apply(pool.clone()));
    let (nodes, mut node_writer) = reflector::store::<Node>();
    node_writer.apply_watcher_event(&watcher::Event::Apply(bench_node()?));

    let logs = Arc::new(LogStore::default());
    let (usage, mut usage_inbox) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move { while usage_inbox.recv().await.is_some() {} });
    let (rulings, mut rulings_inbox) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move { while rulings_inbox.recv().await.is_some() {} });
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "darkcore-dispatchbench".into(),
            instance: None,
        },
    );
    let shared = Arc::new(Shared {
        client: client.clone(),
        registry: registry.clone(),
        pools,
        nodes,
        logs: logs.clone(),
        stats: Default::default(),
        index: Arc::new(PodIndex::default()),
        writer: Writer::start(client.clone(), metrics.clone(), recorder),
        warmup: Arc::new(darkcore_operator::warmup::Warmup::none()),
        started: Instant::now(),
        host_ip: "127.0.0.1".into(),
        metrics: metrics.clone(),
        attempts: Default::default(),
        rulings,
        reputations: darkcore_operator::validation::reputation_store::ReputationStore::new(
            client.clone(),
        ),
    });
    let (controller, inbox) = Controller::new(shared);
    let controller_inbox = controller.inbox();
    tokio::spawn(controller.run(inbox));

    let ca = CaMaterial::generate().context("making a CA")?;
    let addr = free_loopback_addr()?;
    let gateway = gateway::serve(
        addr,
        &ca,
        tls::serving_identity(&ca, &["127.0.0.1".into()])?,
        join::JoinService {
            client: client.clone(),
            redeemer: darkcore_operator::enroll::redeem::Redeemer::new(client.clone(), NAMESPACE),
            ca: ca.clone(),
            cert_validity: tls::DEFAULT_DEVICE_CERT_VALIDITY,
            metrics: metrics.clone(),
            limiter: darkcore_operator::gateway::join_limit::JoinLimiter::new(
                darkcore_operator::gateway::join_limit::Rate::per_second(1e9),
                darkcore_operator::gateway::join_limit::Rate::per_second(1e9),
            ),
        },
        attach::AttachService {
            streams: Default::default(),
            statement_key: String::new(),
            registry: registry.clone(),
            metrics: metrics.clone(),
            pool_served: Arc::new(|pool: &str| match pool == POOL {
                true => attach::Served::Yes { fence_seconds: 30 },
                false => attach::Served::No,
            }),
            tasks: Arc::new(darkcore_operator::reports::TaskReports {
                controller: controller_inbox.clone(),
                logs,
                stats: Default::default(),
                usage,
            }),
            renewer: Arc::new(attach::Renewer {
                ca: ca.clone(),
                validity: tls::DEFAULT_DEVICE_CERT_VALIDITY,
            }),
        },
    )
    .await?;
    tokio::spawn(gateway);

    make_identities(&args.state_dir, args.agents, &ca, addr)?;
    let rss_before = rss_kib()?;
    let attaching = Instant::now();
    let swarm_binary = match &args.swarm {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("darkcore-swarm"),
    };
    let mut swarm = tokio::process::Command::new(&swarm_binary)
        .args(["--server", &addr.to_string(), "--agents"])
        .arg(args.agents.to_string())
        .arg("--state-dir")
        .arg(&args.state_dir)
        // Room for every burst, within what a pool believes of one device (deviceLimits'
        // default maxCores is 256: a device claiming more is not enlisted).
        .args(["--millicores", "200000", "--task-seconds", "0"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", swarm_binary.display()))?;
    let swarm_pid = swarm.id().context("the swarm's pid")?;
    let mut swarm_out = tokio::io::BufReader::new(swarm.stdout.take().context("swarm stdout")?);
    let mut line = String::new();
    swarm_out.read_line(&mut line).await?;
    anyhow::ensure!(
        line.starts_with("attached"),
        "the swarm did not attach its devices: {line:?}"
    );
    let survey = registry.survey(&pool);
    anyhow::ensure!(
        registry.offers(POOL, "linux", "amd64").len() == args.agents,
        "only some devices were enlisted: {survey:?}"
    );
    let attach_seconds = attaching.elapsed().as_secs_f64();
    // Streams settle (Welcome sent, first heartbeats read) before the memory is read.
    tokio::time::sleep(attach::HEARTBEAT_INTERVAL * 2).await;
    let rss_attached = rss_kib()?;
    let per_agent_kib = (rss_attached - rss_before) as f64 / args.agents as f64;
    eprintln!(
        "dispatchbench: {} devices attached and enlisted in {attach_seconds:.1} s; {per_agent_kib:.1} KiB RSS each",
        args.agents
    );

    let mut runs = Vec::new();
    for (round, &pods) in args.pods.iter().enumerate() {
        let run = burst(
            &api,
            &controller_inbox,
            &metrics,
            round,
            pods,
            swarm_pid,
            Duration::from_secs(args.timeout_seconds),
        )
        .await?;
        eprintln!("dispatchbench: {run}");
        runs.push(run);
    }
    let results = serde_json::json!({
        "agents": args.agents,
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "gateway": {
            "rss_before_kib": rss_before,
            "rss_attached_kib": rss_attached,
            "rss_per_agent_kib": (per_agent_kib * 10.0).round() / 10.0,
            "attach_seconds": attach_seconds,
        },
        "runs": runs,
    });
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&results)?)?;
    println!("{}", serde_json::to_string_pretty(&results)?);
    Ok(())
}

/// Feeds `pods` pods at once and waits until the API has seen every one Succeeded.
async fn burst(
    api: &FakeApi,
    inbox: &tokio::sync::mpsc::Sender<Input>,
    metrics: &Metrics,
    round: usize,
    count: usize,
    swarm_pid: u32,
    timeout: Duration,
) -> anyhow::Result<serde_json::Value> {
    let pods: Vec<Pod> = (0..count)
        .map(|i| bench_pod(round, i))
        .collect::<Result<_, _>>()?;
    api.reset();
    let before = Snapshot::take(metrics, swarm_pid)?;
    let started = Instant::now();
    let mut fed = HashMap::with_capacity(count);
    for pod in &pods {
        fed.insert(
            pod.metadata.name.clone().unwrap_or_default(),
            Instant::now(),
        );
        inbox.send(Input::PodApplied(pod.clone())).await?;
    }
    let fed_in = started.elapsed();
    tokio::time::timeout(timeout, api.all_succeeded(count))
        .await
        .with_context(|| {
            format!(
                "{count} pods: only {} of them Succeeded within {timeout:?}",
                api.succeeded()
            )
        })?;
    let elapsed = started.elapsed();
    let after = Snapshot::take(metrics, swarm_pid)?;
    let running = api.running_latencies(&fed);
    let writes = api.writes();
    for pod in pods {
        inbox.send(Input::PodDeleted(pod)).await?;
    }
    let per_second = count as f64 / elapsed.as_secs_f64();
    Ok(serde_json::json!({
        "pods": count,
        "fed_in_ms": ms(fed_in),
        "all_succeeded_after_ms": ms(elapsed),
        "tasks_per_second": per_second.round(),
        "running": running.len(),
        "fed_to_running_ms": latencies_ms(running),
        "placement_mean_us": after.mean_us(&before, PLACEMENT),
        "dispatch_latency_mean_ms": after.mean_us(&before, DISPATCH) / 1000.0,
        "operator_cpu_seconds": after.operator_cpu - before.operator_cpu,
        "swarm_cpu_seconds": after.swarm_cpu - before.swarm_cpu,
        "api_writes_per_pod": {
            "pod_status": writes.status as f64 / count as f64,
            "event": writes.events as f64 / count as f64,
            "other": writes.other as f64 / count as f64,
        },
    }))
}

/// The operator's histograms the bench reads.
const PLACEMENT: &str = "darkcore_operator_placement_duration_seconds";
const DISPATCH: &str = "darkcore_operator_dispatch_latency_seconds";

/// Cumulative figures at one moment: histogram sums and counts, and process CPU.
struct Snapshot {
    histograms: HashMap<&'static str, (f64, f64)>,
    operator_cpu: f64,
    swarm_cpu: f64,
}

impl Snapshot {
    fn take(metrics: &Metrics, swarm_pid: u32) -> anyhow::Result<Snapshot> {
        let text = metrics.encode();
        let read = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or(0.0)
        };
        let histograms = [PLACEMENT, DISPATCH]
            .into_iter()
            .map(|name| {
                let figures = (read(&format!("{name}_sum")), read(&format!("{name}_count")));
                (name, figures)
            })
            .collect();
        Ok(Snapshot {
            histograms,
            operator_cpu: cpu_seconds("self")?,
            swarm_cpu: cpu_seconds(&swarm_pid.to_string())?,
        })
    }

    /// The mean, in microseconds, of what histogram `name` observed between `before` and this
    /// snapshot.
    fn mean_us(&self, before: &Snapshot, name: &str) -> f64 {
        let (sum, count) = self.histograms[name];
        let (sum_before, count_before) = before.histograms[name];
        let count = count - count_before;
        if count > 0.0 {
            (sum - sum_before) / count * 1e6
        } else {
            0.0
        }
    }
}

/// User plus system CPU of a process, in seconds (`self` for this one).
fn cpu_seconds(pid: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let ticks = darkcore_agent::sensors::parse_pid_stat(&stat).context("a /proc stat line")?;
    Ok(darkcore_agent::sensors::ticks_to_duration(ticks.own).as_secs_f64())
}

/// This process's resident memory, in KiB.
fn rss_kib() -> anyhow::Result<i64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS in /proc/self/status")
}

fn free_loopback_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Device identities signed by `ca` straight away, as a join would leave them.
fn make_identities(
    dir: &Path,
    count: usize,
    ca: &CaMaterial,
    addr: SocketAddr,
) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("emptying {}", dir.display()))?;
    }
    for i in 0..count {
        let key = rcgen::KeyPair::generate()?;
        let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
        let device = tls::DeviceIdentity::unowned(&tls::new_device_id()?, POOL);
        let identity = Identity {
            device: DeviceRecord {
                device_id: device.device_id.clone(),
                pool: POOL.into(),
                server: format!("https://{addr}"),
            },
            key_pem: key.serialize_pem(),
            cert_pem: tls::sign_device(ca, csr.der(), &device, tls::DEFAULT_DEVICE_CERT_VALIDITY)?,
            ca_pem: ca.cert_pem.clone(),
        };
        identity.save(&dir.join(format!("device-{i:06}")))?;
    }
    Ok(())
}

fn bench_pool() -> anyhow::Result<DevicePool> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "darkcore.io/v1alpha1",
        "kind": "DevicePool",
        "metadata": { "name": POOL, "uid": "pool-uid" },
        "spec": { "runtimes": ["process"] },
    }))?)
}

fn bench_node() -> anyhow::Result<Node> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": NODE,
            "labels": { POOL_LABEL: POOL, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64" },
        },
    }))?)
}

/// A bound pod as the pod watch delivers it: the shape podbench creates.
fn bench_pod(round: usize, index: usize) -> serde_json::Result<Pod> {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": format!("bench-{round}-{index}"),
            "namespace": NAMESPACE,
            "uid": format!("00000000-0000-4000-8000-{round:04}{index:08}"),
            "creationTimestamp": k8s_openapi::jiff::Timestamp::now().to_string(),
        },
        "spec": {
            "nodeName": NODE,
            "runtimeClassName": "darkcore-process",
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main",
                "image": "busybox",
                "command": ["sh", "-c", "true"],
                "resources": { "requests": { "cpu": "10m", "memory": "1Mi" } }
            }]
        },
        "status": { "phase": "Pending" },
    }))
}
