//! `darkcore-agent run`: load the identity, then stay attached to the gateway, reconnecting
//! with jittered backoff, until SIGTERM/Ctrl-C or a final refusal (revoked, pool deleted,
//! unsupported version), which stops the agent with the gateway's reason.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use darkcore_proto::agent::v1::Hello;
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::capabilities;
use crate::gateway;
use crate::identity::Identity;
use crate::images::ImageStore;
use crate::observe::PolicyMonitor;
use crate::policy::AgentConfig;
use crate::policy::config::RuntimeName;
use crate::policy::decide::to_owner_state;
use crate::session::{self, Agent, SessionEnd, SessionError, follow_owner};
use crate::status::{AgentStatus, StatusFile};
use crate::tasks::TaskManager;
use crate::tasks::oci::OciRuntime;
use crate::tasks::process::ProcessRuntime;
use crate::tasks::runtime::Ceiling;
use crate::tasks::wasm::WasmRuntime;
use crate::usage::Ledger;
use darkcore_proto::agent::v1::Runtime as RuntimeKind;

/// Reconnect delays start here and double up to `MAX_BACKOFF`.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(500);
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A connection that lasted this long resets the backoff.
pub const STABLE_AFTER: Duration = Duration::from_secs(30);

pub async fn run(state_dir: &Path, config: AgentConfig) -> anyhow::Result<()> {
    let identity = Identity::load(state_dir)?;
    let uri = gateway::server_uri(&identity.device.server)?;
    let mut presented = identity.cert_pem.clone();
    let mut channel = gateway::channel(
        &uri,
        &identity.ca_pem,
        Some((&presented, &identity.key_pem)),
    )?;
    let mut capabilities =
        capabilities::detect().context("detecting this device's capabilities")?;
    capabilities.disk_bytes = capabilities::available_disk(state_dir).unwrap_or(0);
    config.testing.apply(&mut capabilities);
    let labels = config.labels.clone();
    let fault = config.testing.fault;
    let mut policy = PolicyMonitor::new(config, capabilities.clone());
    let mut status = StatusFile::new(
        state_dir,
        AgentStatus {
            pid: std::process::id(),
            device_id: identity.device.device_id.clone(),
            pool: identity.device.pool.clone(),
            server: identity.device.server.clone(),
            connection: "connecting".into(),
            ..Default::default()
        },
    );
    status.save();
    if let Some(address) = policy.config.metrics.address {
        crate::metrics::serve(address, status.subscribe()).await?;
    }

    let (stop_tx, mut stop) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        let _ = stop_tx.send(true);
    });

    let images = Arc::new(ImageStore::new(
        state_dir,
        policy.config.policy.max_disk.0,
        policy.config.images.insecure_registries.clone(),
    ));
    // No container gets more than the owner gives, whatever its pod asks: the offer caps
    // its limits and stands in for those it does not set.
    let offer = crate::policy::decide::offer(&policy.config.policy, &capabilities);
    let ceiling = Ceiling {
        millicores: offer.millicores,
        memory_bytes: offer.memory_bytes,
    };
    let wasm = WasmRuntime::new(images.clone(), ceiling);
    let mut runtimes: Vec<(RuntimeKind, Arc<dyn crate::tasks::runtime::Runtime>)> = vec![
        (RuntimeKind::Process, Arc::new(ProcessRuntime) as _),
        (RuntimeKind::Wasm, Arc::new(wasm) as _),
    ];
    match OciRuntime::new(
        state_dir,
        images.clone(),
        ceiling,
        policy.config.policy.network,
    ) {
        Ok(oci) => runtimes.push((RuntimeKind::Oci, Arc::new(oci) as _)),
        Err(why) if policy.config.policy.runtimes.contains(&RuntimeName::Oci) => {
            tracing::warn!(%why, "the owner allows the oci runtime, but this device cannot run it");
        }
        Err(_) => {}
    }
    let ledger = Ledger::open(state_dir).context("opening the usage ledger")?;
    if let Some(fault) = fault {
        tracing::warn!(
            ?fault,
            "TEST-ONLY fault mode: this agent lies about the results of checked tasks"
        );
    }
    let (tasks, mut reports) =
        TaskManager::new(state_dir.join("tasks"), runtimes, Arc::new(ledger), fault);
    status.usage(tasks.usage());
    tokio::spawn(tasks.watch_disk(move || images.room_left(), policy.interval()));
    crate::tasks::workdir::reap_stale(&state_dir.join("tasks"));
    let fence = Arc::new(crate::fence::Fence::default());
    tokio::spawn(tasks.watch_fence(fence.clone()));

    let seed = seed(&identity.device.device_id);
    let mut backoff = Backoff::new(INITIAL_BACKOFF, MAX_BACKOFF, seed);
    policy.prime().await;
    tracing::info!(device = %identity.device.device_id, pool = %identity.device.pool, server = %identity.device.server, "darkcore-agent running");
    loop {
        let decision = policy.check();
        status.policy(&decision, policy.core_seconds_given());
        let hello = Hello {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            capabilities: Some(capabilities.clone()),
            owner_state: Some(to_owner_state(&decision)),
            labels: labels.clone().into_iter().collect(),
            tasks: tasks.snapshot(),
        };
        // A certificate the operator renewed is presented from this connection on.
        if let Ok(current) = Identity::load(state_dir)
            && current.cert_pem != presented
        {
            presented = current.cert_pem;
            channel = gateway::channel(
                &uri,
                &identity.ca_pem,
                Some((&presented, &identity.key_pem)),
            )?;
        }
        let started = Instant::now();
        let agent = Agent {
            state_dir,
            policy: &mut policy,
            fence: &fence,
            status: &mut status,
            tasks: &tasks,
            reports: &mut reports,
        };
        let outcome = session::attach(channel.clone(), hello, agent, &mut stop).await;
        match outcome {
            Ok(SessionEnd::Stopped) => {
                stop_tasks(&tasks, &policy).await;
                status.connection(false, "stopped".into());
                tracing::info!("stopped");
                return Ok(());
            }
            Err(SessionError::Final(reason)) => {
                status.connection(false, format!("refused: {reason}"));
                bail!("{reason}");
            }
            Err(SessionError::Retry(reason)) => {
                if started.elapsed() >= STABLE_AFTER {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                tracing::warn!(%reason, retry_in = ?delay, "not connected to the gateway");
                status.connection(
                    false,
                    format!("reconnecting in {:.1} s: {reason}", delay.as_secs_f64()),
                );
                // The owner's policy is still followed while the gateway is away.
                let until = tokio::time::Instant::now() + delay;
                let mut check = tokio::time::interval(policy.interval());
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => break,
                        _ = check.tick() => {
                            follow_owner(&mut policy, &mut status, &tasks);
                        }
                        _ = stop.changed() => {
                            stop_tasks(&tasks, &policy).await;
                            status.connection(false, "stopped".into());
                            return Ok(());
                        }
                    }
                }
            }
        }
    }
}

/// The most an agent's stop waits for its tasks: systemd's TimeoutStopSec (60 s in the
/// package's unit) must leave room for the rest.
const MAX_STOP_GRACE: Duration = Duration::from_secs(45);

/// Nothing the agent started outlives it: each task gets the owner's stop grace.
async fn stop_tasks(tasks: &TaskManager, policy: &PolicyMonitor) {
    let grace =
        Duration::from_secs(u64::from(policy.config.policy.stop_grace_seconds)).min(MAX_STOP_GRACE);
    if !tasks.running().is_empty() {
        tracing::info!(?grace, "stopping every task before the agent exits");
        tasks.stop_all(grace).await;
    }
}

/// A per-device, per-start seed, so agents that lost the gateway together retry apart.
fn seed(device_id: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (device_id, std::process::id(), std::time::SystemTime::now()).hash(&mut hasher);
    hasher.finish()
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
