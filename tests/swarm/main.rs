//! darkcore-swarm: a test-only load tool that joins N devices and holds N agent streams
//! speaking the real protocol (TLS, device certificates, Hello, heartbeats) from one process.
//! It stands in for a fleet when measuring the gateway and the pod path: a task assigned to
//! one of its devices is reported Running at once, then Succeeded after --task-seconds (or
//! never, with a negative value), with no process behind it.
//!
//! darkcore-swarm --server 127.0.0.1:7443 --token dct1... --agents 1000 --state-dir DIR
//!
//! Test-only lies (`--lie-usage`): once a task of its succeeds, each device also reports usage
//! no honest agent would: that task inflated past any bound, in another namespace and in a
//! year to come; the same task again under 20 more sequences, one per day back; a task it
//! never held; and each task named with `--claim` (another device's). The operator must
//! refuse or bound every one of them.
//!
//! Test-only stats (`--lie-stats`): while a task runs, each device reports its container's use
//! every second as no honest agent would: CPU growing by 1,000 core-seconds a second since a
//! start an hour ago, a petabyte of memory, and the same for a task it never held. The
//! operator must keep the CPU within the device's offered cores and the memory within its offer.
//!
//! Results: a task whose assignment asks for a result digest (a checked pod) is reported with
//! one that every honest device gives for the same pod. Test-only faults
//! (`--faulty-devices N`): the first N devices of the swarm return a wrong digest instead, each
//! its own for every attempt, as broken hardware or a liar would.
//!
//! Test-only flood (`--lie-flood`): once a task is assigned, the device reports it Running with
//! a 1 MiB reason and message, then sends its output as 1-byte lines as fast as the stream
//! takes them, and never reads another message from the operator. The operator must hold its
//! memory for the device within its bounds and cut it off.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use darkcore_agent::gateway;
use darkcore_agent::identity::Identity;
use darkcore_agent::policy::AgentConfig;
use darkcore_agent::session::WELCOME_TIMEOUT;
use darkcore_agent::tasks::supervise::unix_ms;
use darkcore_proto::PROTOCOL_VERSION;
use darkcore_proto::agent::v1::agent_gateway_client::AgentGatewayClient;
use darkcore_proto::agent::v1::{
    AgentMessage, Capabilities, ContainerStats, ContainerStatus, Heartbeat, Hello, Offer,
    OwnerState, Runtime, Stats, TaskAssign, TaskPhase, TaskStats, TaskStatus, UsageRecord,
    UsageRecords, agent_message, container_status::State, operator_message,
};
use futures::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

#[derive(Parser)]
struct Args {
    /// The gateway: host:port.
    #[arg(long)]
    server: String,
    /// A join token for the pool (needed only for devices not joined yet).
    #[arg(long, default_value = "")]
    token: String,
    /// How many devices to hold connected.
    #[arg(long)]
    agents: usize,
    /// Where the devices' identities are kept, one dir each; reused on the next run.
    #[arg(long)]
    state_dir: PathBuf,
    /// Joins in flight at once.
    #[arg(long, default_value_t = 8)]
    join_concurrency: usize,
    /// Millicores each device offers.
    #[arg(long, default_value_t = 1000)]
    millicores: u32,
    /// Stay connected this long after all are attached, then exit (0: until killed).
    #[arg(long, default_value_t = 0)]
    hold_seconds: u64,
    /// How long each assigned task runs before it succeeds; negative: until cancelled.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    task_seconds: f64,
    /// The first device to use: devices are <state-dir>/device-<index>, so two swarms can
    /// share a state dir without sharing devices.
    #[arg(long, default_value_t = 0)]
    first_device: usize,
    /// Test only: report lying usage for every task that succeeds (see above).
    #[arg(long)]
    lie_usage: bool,
    /// Test only, with --lie-usage: also charge this task (another device's) as one's own.
    #[arg(long)]
    claim: Vec<String>,
    /// Test only: flood the operator once a task is assigned (see above).
    #[arg(long)]
    lie_flood: bool,
    /// Test only: report lying stats for every running task (see above).
    #[arg(long)]
    lie_stats: bool,
    /// Test only: this many of the swarm's devices (its first) return wrong result digests.
    #[arg(long, default_value_t = 0)]
    faulty_devices: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let identities = join_all(&args).await?;
    eprintln!(
        "swarm: {} identities ready in {:.1} s",
        identities.len(),
        started.elapsed().as_secs_f64()
    );

    let attached = Arc::new(AtomicUsize::new(0));
    let attach_started = Instant::now();
    for (index, identity) in identities.into_iter().enumerate() {
        let attached = attached.clone();
        let server = args.server.clone();
        let behaviour = Behaviour {
            millicores: args.millicores,
            task_time: (args.task_seconds >= 0.0)
                .then(|| Duration::from_secs_f64(args.task_seconds)),
            lie_usage: args.lie_usage,
            claims: args.claim.clone(),
            flood: args.lie_flood,
            lie_stats: args.lie_stats,
            faulty: index < args.faulty_devices,
        };
        tokio::spawn(async move {
            let lied = AtomicU64::new(0);
            loop {
                if let Err(error) = hold(&server, &identity, &behaviour, &lied, &attached).await {
                    eprintln!(
                        "swarm: {}: {error:#}; reconnecting",
                        identity.device.device_id
                    );
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }
    while attached.load(Ordering::Relaxed) < args.agents {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // One line on stdout that scripts read: how long attaching all took.
    println!(
        "attached {} agents in {:.2} s",
        args.agents,
        attach_started.elapsed().as_secs_f64()
    );
    if args.hold_seconds > 0 {
        tokio::time::sleep(Duration::from_secs(args.hold_seconds)).await;
    } else {
        futures::future::pending::<()>().await;
    }
    Ok(())
}

/// Loads or makes the identities of `args.agents` devices.
async fn join_all(args: &Args) -> anyhow::Result<Vec<Identity>> {
    let config = AgentConfig::default();
    let results = futures::stream::iter(args.first_device..args.first_device + args.agents)
        .map(|i| {
            let dir = args.state_dir.join(format!("device-{i:06}"));
            let config = config.clone();
            async move {
                match Identity::load(&dir) {
                    Ok(identity) => Ok(identity),
                    Err(_) => darkcore_agent::join::join(&args.server, &args.token, &dir, &config)
                        .await
                        .with_context(|| format!("joining device {i}")),
                }
            }
        })
        .buffer_unordered(args.join_concurrency)
        .collect::<Vec<_>>()
        .await;
    results.into_iter().collect()
}

/// How each device of the swarm behaves.
struct Behaviour {
    millicores: u32,
    /// How long a task runs; `None`: until cancelled.
    task_time: Option<Duration>,
    lie_usage: bool,
    claims: Vec<String>,
    flood: bool,
    lie_stats: bool,
    /// Returns a wrong result digest for every checked task.
    faulty: bool,
}

/// The result digest a device reports for a checked task: the same for every replica of a pod
/// from an honest device; from a faulty one, its own for every attempt.
fn result_digest(task: &TaskAssign, faulty: bool) -> String {
    use darkcore_agent::digest::sha256_hex;
    let result = match faulty {
        true => format!("wrong {}", task.task_id),
        false => format!("{}/{}", task.namespace, task.pod_name),
    };
    format!("sha256:{}", sha256_hex(result.as_bytes()))
}

/// Reports lying stats for `task` every second (see the module's doc) until the stream goes.
async fn lie_stats(
    task: TaskAssign,
    tx: tokio::sync::mpsc::Sender<AgentMessage>,
) -> anyhow::Result<()> {
    let started = unix_ms() - 3_600_000;
    let container = task
        .containers
        .first()
        .map(|c| c.name.clone())
        .unwrap_or_default();
    let claimed = |task_id: &str, seconds: u64| TaskStats {
        task_id: task_id.into(),
        containers: vec![ContainerStats {
            name: container.clone(),
            cpu_nanoseconds_total: seconds.saturating_mul(1_000 * 1_000_000_000),
            memory_working_set_bytes: 1 << 50,
            started_unix_ms: started,
        }],
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    for second in 1u64.. {
        tick.tick().await;
        let stats = Stats {
            timestamp_unix_ms: unix_ms(),
            tasks: vec![
                claimed(&task.task_id, second),
                claimed("00000000-0000-4000-8000-000000000000.1", second),
            ],
        };
        let body = agent_message::Body::Stats(stats);
        tx.send(AgentMessage {
            version: PROTOCOL_VERSION as i32,
            body: Some(body),
        })
        .await?;
    }
    Ok(())
}

/// Floods the stream for `task` (see the module's doc) until the stream is gone.
async fn flood(
    task: TaskAssign,
    tx: tokio::sync::mpsc::Sender<AgentMessage>,
) -> anyhow::Result<()> {
    let message = |body| AgentMessage {
        version: PROTOCOL_VERSION as i32,
        body: Some(body),
    };
    let mut running = status(&task, TaskPhase::Running);
    running.reason = "R".repeat(1 << 20);
    running.message = "M".repeat(1 << 20);
    tx.send(message(agent_message::Body::TaskStatus(running)))
        .await?;
    let lines = vec![b'\n'; 16 * 1024];
    let container = task
        .containers
        .first()
        .map(|c| c.name.clone())
        .unwrap_or_default();
    loop {
        let chunk = darkcore_proto::agent::v1::LogChunk {
            task_id: task.task_id.clone(),
            container: container.clone(),
            stream: 1,
            timestamp_unix_nanos: unix_ms() * 1_000_000,
            data: lines.clone(),
            run: 0,
            offset: None,
        };
        tx.send(message(agent_message::Body::LogChunk(chunk)))
            .await?;
    }
}

/// The lying usage records for a task that succeeded on a device (see the module's doc),
/// numbered on from `sequence`, which is advanced past them.
fn lies(task: &TaskAssign, claims: &[String], sequence: &AtomicU64) -> Vec<UsageRecord> {
    const DAY_MS: i64 = 86_400_000;
    let now = unix_ms();
    let record = |task_id: &str, ended_unix_ms: i64| UsageRecord {
        sequence: sequence.fetch_add(1, Ordering::Relaxed) + 1,
        task_id: task_id.into(),
        namespace: "kube-system".into(),
        pod_name: task.pod_name.clone(),
        started_unix_ms: 0,
        ended_unix_ms,
        cpu_milliseconds: u64::MAX / 4,
        memory_mib_seconds: u64::MAX / 4,
        completed: true,
    };
    let mut records = vec![record(&task.task_id, now + 365 * DAY_MS)];
    records.extend((1..=20).map(|day| record(&task.task_id, now - day * DAY_MS)));
    records.push(record("00000000-0000-4000-8000-000000000000.1", now));
    records.extend(claims.iter().map(|claim| record(claim, now)));
    records
}

/// Holds one device's stream: Hello, then a heartbeat at the interval Welcome names.
async fn hold(
    server: &str,
    identity: &Identity,
    behaviour: &Behaviour,
    lied: &AtomicU64,
    attached: &AtomicUsize,
) -> anyhow::Result<()> {
    let (millicores, task_time) = (behaviour.millicores, behaviour.task_time);
    let uri = gateway::server_uri(server)?;
    let channel = gateway::channel(
        &uri,
        &identity.ca_pem,
        Some((&identity.cert_pem, &identity.key_pem)),
    )?;
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let message = |body| AgentMessage {
        version: PROTOCOL_VERSION as i32,
        body: Some(body),
    };
    let offer = Offer {
        millicores,
        memory_bytes: 1 << 30,
        disk_bytes: 1 << 30,
        runtimes: vec![Runtime::Process as i32],
    };
    tx.send(message(agent_message::Body::Hello(Hello {
        agent_version: "swarm".into(),
        capabilities: Some(Capabilities {
            os: "linux".into(),
            arch: "amd64".into(),
            cores: millicores.div_ceil(1000),
            memory_bytes: 2 << 30,
            disk_bytes: 10 << 30,
            runtimes: vec![Runtime::Process as i32],
        }),
        owner_state: Some(OwnerState {
            available: true,
            reason: "swarm".into(),
            offer: Some(offer),
        }),
        ..Default::default()
    })))
    .await?;
    // As the agent does: one deadline from dialling to Welcome.
    let opened = async {
        let mut inbound = AgentGatewayClient::new(channel)
            .attach(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let first = inbound.message().await?;
        anyhow::Ok((inbound, first))
    };
    let (mut inbound, first) = tokio::time::timeout(WELCOME_TIMEOUT, opened)
        .await
        .context("no Welcome within 15 s of dialling")??;
    let welcome = match first.and_then(|m| m.body) {
        Some(operator_message::Body::Welcome(welcome)) => welcome,
        other => anyhow::bail!("no Welcome: {other:?}"),
    };
    attached.fetch_add(1, Ordering::Relaxed);
    let result = async {
        let mut beat = tokio::time::interval(Duration::from_secs(u64::from(
            welcome.heartbeat_interval_seconds.max(1),
        )));
        let mut sequence = 0;
        let mut tasks: HashMap<String, tokio::task::JoinHandle<anyhow::Result<()>>> =
            HashMap::new();
        let mut flooding = false;
        loop {
            tokio::select! {
                _ = beat.tick() => {
                    sequence += 1;
                    tx.send(message(agent_message::Body::Heartbeat(Heartbeat { sequence }))).await?;
                }
                received = inbound.message(), if !flooding => match received?.and_then(|m| m.body) {
                    Some(operator_message::Body::TaskAssign(task)) if behaviour.flood => {
                        flooding = true;
                        tasks.insert(task.task_id.clone(), tokio::spawn(flood(task, tx.clone())));
                    }
                    Some(operator_message::Body::TaskAssign(task)) => {
                        if behaviour.lie_stats {
                            let id = format!("{}/stats", task.task_id);
                            tasks.insert(id, tokio::spawn(lie_stats(task.clone(), tx.clone())));
                        }
                        let statuses = tx.clone();
                        let running = status(&task, TaskPhase::Running);
                        let mut done = status(&task, TaskPhase::Succeeded);
                        if task.result.is_some() {
                            done.result_digest = result_digest(&task, behaviour.faulty);
                        }
                        let lies = behaviour
                            .lie_usage
                            .then(|| lies(&task, &behaviour.claims, lied));
                        tasks.insert(task.task_id.clone(), tokio::spawn(async move {
                            statuses.send(message(agent_message::Body::TaskStatus(running))).await?;
                            let Some(time) = task_time else {
                                return futures::future::pending().await;
                            };
                            tokio::time::sleep(time).await;
                            statuses.send(message(agent_message::Body::TaskStatus(done))).await?;
                            if let Some(records) = lies {
                                let usage = UsageRecords { records };
                                statuses.send(message(agent_message::Body::UsageRecords(usage))).await?;
                            }
                            anyhow::Ok(())
                        }));
                    }
                    Some(operator_message::Body::TaskCancel(cancel)) => {
                        if let Some(lying) = tasks.remove(&format!("{}/stats", cancel.task_id)) {
                            lying.abort();
                        }
                        if let Some(run) = tasks.remove(&cancel.task_id) && !run.is_finished() {
                            run.abort();
                            let stopped = TaskStatus {
                                task_id: cancel.task_id,
                                phase: TaskPhase::Failed as i32,
                                reason: "Stopped".into(),
                                ..Default::default()
                            };
                            tx.send(message(agent_message::Body::TaskStatus(stopped))).await?;
                        }
                    }
                    Some(_) => {}
                    None => anyhow::bail!("the gateway closed the stream"),
                },
            }
        }
    }
    .await;
    attached.fetch_sub(1, Ordering::Relaxed);
    result
}

/// A task's status in `phase`: every container running, or ended with exit code 0.
fn status(task: &TaskAssign, phase: TaskPhase) -> TaskStatus {
    let now = unix_ms();
    let container = |c: &darkcore_proto::agent::v1::Container| match phase {
        TaskPhase::Running => ContainerStatus {
            name: c.name.clone(),
            state: State::Running as i32,
            started_at_unix_ms: now,
            ..Default::default()
        },
        _ => ContainerStatus {
            name: c.name.clone(),
            state: State::Terminated as i32,
            reason: "Completed".into(),
            started_at_unix_ms: now,
            finished_at_unix_ms: now,
            ..Default::default()
        },
    };
    TaskStatus {
        task_id: task.task_id.clone(),
        phase: phase as i32,
        containers: task.containers.iter().map(container).collect(),
        ..Default::default()
    }
}
