//! `darkcore-operator run`: connects to Kubernetes, checks the CRD is installed, serves health,
//! waits for leadership when elected, then runs the pool controller, the lease renewer, the
//! agent gateway and the kubelet API side by side until SIGTERM/Ctrl-C or lost leadership.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use darkcore_crds::{DevicePool, WhenCutOff};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::api::ListParams;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, WatchStreamExt, reflector, watcher};
use kube::{Api, Client, ResourceExt};

use crate::devices::registry::Registry;
use crate::enroll::ca;
use crate::enroll::redeem::Redeemer;
use crate::enroll::revocation::{REVOKED_CONFIGMAP, revoked_ids};
use crate::gateway;
use crate::gateway::attach::{AttachService, PoolCheck, Renewer, Served};
use crate::gateway::join::JoinService;
use crate::gateway::join_limit::{JoinLimiter, Rate};
use crate::gateway::streams::StreamBroker;
use crate::housekeeping::{Housekeeper, Retention};
use crate::http::{self, Health, Readiness};
use crate::installation;
use crate::kubelet::auth::Authorizer;
use crate::kubelet::endpoints::NodeEndpoints;
use crate::kubelet::log_store::LogStore;
use crate::kubelet::stats::StatsStore;
use crate::kubelet::{self, KubeletServer, KubeletState, PodIndex};
use crate::leader::{LeaseLock, Timing};
use crate::metrics::Metrics;
use crate::pods::controller::{Controller as PodController, Shared as PodShared};
use crate::pods::runtime_class;
use crate::pods::writer::Writer;
use crate::pool::controller::{Context, error_policy, reconcile};
use crate::pool::{FIELD_MANAGER, POOL_LABEL, lease};
use crate::reports::TaskReports;
use crate::supervise::Supervisor;
use crate::tls;
use crate::usage::attempts::AttemptBook;
use crate::usage::recorder::Recorder as UsageRecorder;
use crate::usage::statement_key;
use crate::validation::reputation_store::ReputationStore;
use crate::warmup::Warmup;

/// Options of `darkcore-operator run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, env = "DARKCORE_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    /// Address the apiserver uses to reach this operator's kubelet API; published as each
    /// node's InternalIP. In a cluster, set it to the pod IP.
    #[arg(long, env = "DARKCORE_NODE_ADDRESS", default_value = "127.0.0.1")]
    pub node_address: String,
    /// First port of the kubelet API: each node gets its own port from here on, published as
    /// its kubeletEndpoint (0: any free port the system gives).
    #[arg(long, env = "DARKCORE_KUBELET_PORT", default_value_t = 10250)]
    pub kubelet_port: u16,
    /// How many ports from --kubelet-port the nodes' kubelet APIs may take: at least as many
    /// as the nodes this operator publishes (one per pool and OS/arch).
    #[arg(long, env = "DARKCORE_KUBELET_PORT_COUNT", default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..))]
    pub kubelet_port_count: u16,
    /// The address the kubelet API listens on.
    #[arg(long, env = "DARKCORE_KUBELET_BIND", default_value = "0.0.0.0")]
    pub kubelet_bind: std::net::IpAddr,
    /// Serve only the DevicePools matching this label selector (for sharding, and for tests
    /// that run several operators on one cluster). Empty: every pool.
    #[arg(long, env = "DARKCORE_POOL_SELECTOR", default_value = "")]
    pub pool_selector: String,
    /// Address of the agent gateway (gRPC over TLS), which devices dial.
    #[arg(long, env = "DARKCORE_GATEWAY_ADDR", default_value = "0.0.0.0:7443")]
    pub gateway_addr: SocketAddr,
    /// Extra DNS names or IPs for the gateway's certificate, for clients other than
    /// darkcore-agent (which always verifies the name `darkcore-gateway`). Repeatable.
    #[arg(
        long = "gateway-name",
        env = "DARKCORE_GATEWAY_NAMES",
        value_delimiter = ','
    )]
    pub gateway_names: Vec<String>,
    /// The operator's namespace: the device CA, join tokens and revoked devices live there.
    #[arg(
        long,
        short = 'n',
        env = "DARKCORE_NAMESPACE",
        default_value = "darkcore-system"
    )]
    pub namespace: String,
    /// Elect one leader among replicas on a Lease in --namespace; the others stand by.
    #[arg(long, env = "DARKCORE_LEADER_ELECT")]
    pub leader_elect: bool,
    /// The leader-election Lease's name (one per set of replicas, e.g. per --pool-selector).
    #[arg(
        long,
        env = "DARKCORE_LEADER_ELECTION_LEASE",
        default_value = "darkcore-operator"
    )]
    pub leader_election_lease: String,
    /// How long the leader's lease holds without renewal: a standby takes over this long after
    /// a leader dies. A leader that lets go at shutdown is replaced within a few seconds.
    #[arg(long, env = "DARKCORE_LEADER_ELECTION_LEASE_SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(3..=300))]
    pub leader_election_lease_seconds: u64,
    /// This replica's name in the election (in a pod: its name). Default: host name and pid.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// The selector-less Service agents dial: the leader points its EndpointSlice at
    /// --node-address and the gateway port. Empty: agents dial the operator directly.
    #[arg(long, env = "DARKCORE_GATEWAY_SERVICE")]
    pub gateway_service: Option<String>,
    /// The chart's ClusterRole: darkcore's nodes are owned by it, so that `helm uninstall`
    /// makes Kubernetes delete them and their leases. Empty: nodes have no owner.
    #[arg(long, env = "DARKCORE_OWNER_CLUSTER_ROLE")]
    pub owner_cluster_role: Option<String>,
    /// How often usage records from agents are written to PoolUsage objects (each changed
    /// object once per interval; agents keep their records until then).
    #[arg(long, env = "DARKCORE_USAGE_FLUSH_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub usage_flush_seconds: u64,
    /// Joins per second this operator accepts from all devices together (ten seconds' worth
    /// may come at once); more are refused with when to try again, before they cost anything.
    #[arg(long, env = "DARKCORE_JOIN_RATE", default_value_t = 20.0)]
    pub join_rate: f64,
    /// Joins per second accepted from one source address (a site behind one NAT counts once).
    #[arg(long, env = "DARKCORE_JOIN_RATE_PER_SOURCE", default_value_t = 2.0)]
    pub join_rate_per_source: f64,
    /// How long a device certificate lasts (s, m, h or d; at least 1m). The gateway renews it
    /// over the device's stream halfway through, so only a device away longer than that has
    /// to join again.
    #[arg(long, env = "DARKCORE_DEVICE_CERT_VALIDITY", default_value = "7d", value_parser = parse_cert_validity)]
    pub device_cert_validity: Duration,
    /// How long a join token that can admit no one is kept: after it expired, or after it was
    /// created if it is used up or revoked (s, m, h or d).
    #[arg(long, env = "DARKCORE_TOKEN_RETENTION", default_value = "7d", value_parser = crate::enroll::token::parse_ttl)]
    pub token_retention: Duration,
    /// How long the PoolUsage objects of a deleted pool are kept after the day they count.
    #[arg(long, env = "DARKCORE_USAGE_RETENTION", default_value = "90d", value_parser = crate::enroll::token::parse_ttl)]
    pub usage_retention: Duration,
    /// How often tokens and usage past their retention are looked for.
    #[arg(long, env = "DARKCORE_HOUSEKEEPING_SECONDS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub housekeeping_seconds: u64,
}

impl RunArgs {
    fn identity(&self) -> String {
        self.identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "operator".into());
            format!("{host}-{}", std::process::id())
        })
    }
}

/// A device certificate's validity: a duration of at least a minute, since renewal comes
/// halfway through.
fn parse_cert_validity(text: &str) -> Result<Duration, String> {
    let lasting = crate::enroll::token::parse_ttl(text)?;
    match lasting >= Duration::from_secs(60) {
        true => Ok(lasting),
        false => Err(format!(
            "{text:?} is too short for a device certificate: give at least 1m (the default is 7d)"
        )),
    }
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.join_rate > 0.0 && args.join_rate_per_source > 0.0,
        "--join-rate ({}) and --join-rate-per-source ({}) are joins per second, and must be above 0",
        args.join_rate,
        args.join_rate_per_source
    );
    let client = Client::try_default().await.context(
        "connecting to Kubernetes: set KUBECONFIG to a kubeconfig file, or run inside a cluster",
    )?;
    let pools: Api<DevicePool> = Api::all(client.clone());
    ensure_crd_installed(&pools).await?;

    let ca = ca::ensure(&client, &args.namespace).await.with_context(|| {
        format!(
            "loading the device CA from namespace {:?} (create the namespace, or set --namespace to the operator's)",
            args.namespace
        )
    })?;
    // Statements are signed with one key for good: made once, its verification key published.
    let statement_key = statement_key::ensure(&client, &args.namespace)
        .await
        .context("loading the statement key")?;
    statement_key::publish(&client, &args.namespace, &statement_key)
        .await
        .context("publishing the statement verification key")?;

    let metrics = Arc::new(Metrics::default());
    let registry = Registry::new();
    let reputations = ReputationStore::new(client.clone());
    let readiness = Arc::new(Readiness::default());
    let server = http::serve(
        args.http_addr,
        Health {
            readiness: readiness.clone(),
            metrics: metrics.clone(),
            registry: registry.clone(),
            reputations: reputations.clone(),
        },
    )
    .await?;
    let server = tokio::spawn(server);

    let node_owner = match &args.owner_cluster_role {
        Some(name) => installation::anchor(&client, name).await.with_context(|| {
            format!(
                "reading the ClusterRole {name:?} that owns darkcore's nodes (--owner-cluster-role)"
            )
        })?,
        None => None,
    };
    let identity = args.identity();

    // A standby serves health only: it holds no agent, node or pod until it leads.
    let election = args.leader_elect.then(|| {
        LeaseLock::new(
            client.clone(),
            &args.namespace,
            &args.leader_election_lease,
            &identity,
            Timing::for_lease(Duration::from_secs(args.leader_election_lease_seconds)),
            node_owner.clone(),
        )
    });
    let leading_since = match &election {
        Some(lock) => {
            readiness.standby();
            tokio::select! {
                acquired = lock.acquire() => Some(acquired),
                () = shutdown_signal() => {
                    server.abort();
                    return Ok(());
                }
            }
        }
        None => None,
    };
    // Renewals start now, not after start-up: a slow start must not let the lease run out.
    let mut held = election
        .as_ref()
        .zip(leading_since)
        .map(|(lock, since)| lock.hold_in_background(since));
    readiness.syncing();
    metrics.leader.set(1);
    let started = std::time::Instant::now();

    for problem in runtime_class::check(&client).await.context(
        "reading the RuntimeClasses darkcore-process, darkcore-oci and darkcore-wasm (the operator needs get on runtimeclasses.node.k8s.io)",
    )? {
        tracing::warn!("{problem}: pods that name it cannot run; install or upgrade the darkcore Helm chart, which creates the RuntimeClasses");
    }

    // The warm-up waits for the devices the pools last counted online to say Hello again.
    let expected: i64 = pools
        .list(&ListParams::default().labels(&args.pool_selector))
        .await
        .context("listing DevicePools (the operator needs list on devicepools.darkcore.io)")?
        .items
        .iter()
        .filter_map(|pool| pool.status.as_ref())
        .map(|status| i64::from(status.online_devices.max(0)))
        .sum();
    let warmup = Arc::new(Warmup::new(started, expected as usize));

    // Both watches are built here so that their first complete listing can be observed:
    // kube-runtime's `Store::wait_until_ready` wakes only one waiter, and the controller is it.
    let pools_synced = Arc::new(AtomicBool::new(false));
    let (pool_store, pool_writer) = reflector::store();
    let pool_events = watcher(
        pools,
        watcher::Config::default().labels(&args.pool_selector),
    )
    .default_backoff()
    .inspect_ok(mark_synced(pools_synced.clone()))
    .reflect(pool_writer)
    .applied_objects();
    let nodes_synced = Arc::new(AtomicBool::new(false));
    let (nodes, node_writer) = reflector::store();
    let node_events = watcher(
        Api::<Node>::all(client.clone()),
        watcher::Config::default().labels(POOL_LABEL),
    )
    .default_backoff()
    .inspect_ok(mark_synced(nodes_synced.clone()))
    .reflect(node_writer)
    .touched_objects();
    let controller = Controller::for_stream(pool_events, pool_store.clone())
        // Nodes name their pool by label (they are owned by the installation, not the pool).
        .watches_stream(node_events, |node: Node| {
            node.labels()
                .get(POOL_LABEL)
                .map(|pool| ObjectRef::new(pool))
        })
        .reconcile_on(registry.clone().changed_pools())
        .shutdown_on_signal();

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        },
    );
    let logs = Arc::new(LogStore::default());
    let stats = Arc::new(StatsStore::default());
    let pod_index = Arc::new(PodIndex::default());
    let attempts = Arc::new(std::sync::Mutex::new(AttemptBook::default()));
    // Devices quarantined before stay out: the book is read before any pod is placed.
    reputations.load().await.context(
        "listing DeviceReputations (the operator needs list on devicereputations.darkcore.io; install or upgrade the chart, which has the CRD and the role)",
    )?;
    for (pool, device, view) in reputations.views() {
        if let Some(why) = &view.quarantined {
            registry.quarantine(&device, &pool, why, false);
        }
    }
    let (usage_recorder, usage, rulings, usage_inbox) = UsageRecorder::new(
        client.clone(),
        metrics.clone(),
        Duration::from_secs(args.usage_flush_seconds),
        (attempts.clone(), registry.clone(), warmup.clone()),
        pool_store.clone(),
    );
    let (pod_controller, pod_inbox) = PodController::new(Arc::new(PodShared {
        client: client.clone(),
        registry: registry.clone(),
        pools: pool_store.clone(),
        nodes: nodes.clone(),
        logs: logs.clone(),
        stats: stats.clone(),
        index: pod_index.clone(),
        writer: Writer::start(client.clone(), metrics.clone(), recorder.clone()),
        warmup: warmup.clone(),
        started,
        attempts,
        rulings,
        reputations: reputations.clone(),
        host_ip: args.node_address.clone(),
        metrics: metrics.clone(),
    }));
    let mut loops = Supervisor::default();
    loops.spawn("usage", usage_recorder.run(usage_inbox));
    loops.spawn("reputation", reputations.run());
    let task_reports = TaskReports {
        controller: pod_controller.inbox(),
        logs: logs.clone(),
        stats: stats.clone(),
        usage,
    };
    loops.spawn(
        "pod watch",
        crate::pods::watch::follow_nodes(
            client.clone(),
            pool_store.clone(),
            nodes.clone(),
            pod_controller.inbox(),
        ),
    );
    loops.spawn("pod", pod_controller.run(pod_inbox));
    let client_ca = kubelet::client_ca(&client).await.unwrap_or_else(|error| {
        tracing::warn!(%error, "no client CA for the kubelet API: only bearer tokens will be accepted");
        Vec::new()
    });
    let kubelet_identity = tls::serving_identity(&ca, std::slice::from_ref(&args.node_address))
        .context("issuing the kubelet API's certificate")?;
    let streams = Arc::new(StreamBroker::default());
    let kubelet_server = KubeletServer::new(
        kubelet_identity,
        client_ca,
        Arc::new(KubeletState {
            pods: pod_index,
            logs,
            stats: stats.clone(),
            started_unix_ms: crate::domain::unix_ms(),
            authorizer: Authorizer::new(client.clone()),
            registry: registry.clone(),
            streams: streams.clone(),
        }),
    )?;
    let endpoints = Arc::new(NodeEndpoints::new(
        kubelet_server,
        args.kubelet_bind,
        args.node_address.clone(),
        args.kubelet_port,
        args.kubelet_port_count,
    ));

    let pool_served: PoolCheck = {
        let (pools, synced) = (pool_store.clone(), pools_synced.clone());
        Arc::new(move |pool: &str| {
            if !synced.load(Ordering::Relaxed) {
                return Served::NotYetKnown;
            }
            match pools.get(&ObjectRef::new(pool)) {
                None => Served::No,
                Some(pool) => Served::Yes {
                    fence_seconds: match pool.spec.when_cut_off {
                        WhenCutOff::Stop => pool.spec.fence_seconds,
                        WhenCutOff::KeepRunning => 0,
                    },
                },
            }
        })
    };
    let mut names = args.gateway_names.clone();
    names.push(args.node_address.clone());
    let gateway = gateway::serve(
        args.gateway_addr,
        &ca,
        tls::serving_identity(&ca, &names).context("issuing the gateway's certificate")?,
        JoinService {
            client: client.clone(),
            redeemer: Redeemer::new(client.clone(), &args.namespace),
            ca: ca.clone(),
            cert_validity: args.device_cert_validity,
            metrics: metrics.clone(),
            limiter: JoinLimiter::new(
                Rate::per_second(args.join_rate_per_source),
                Rate::per_second(args.join_rate),
            ),
        },
        AttachService {
            registry: registry.clone(),
            metrics: metrics.clone(),
            pool_served,
            tasks: Arc::new(task_reports),
            renewer: Arc::new(Renewer {
                ca: ca.clone(),
                validity: args.device_cert_validity,
            }),
            streams,
            statement_key: statement_key.public_base64(),
        },
    )
    .await?;
    loops.spawn("agent gateway", async move {
        if let Err(error) = gateway.await {
            tracing::error!(%error, "the agent gateway stopped");
        }
    });
    if let Some(service) = &args.gateway_service {
        gateway::endpoint::publish(
            &client,
            &args.namespace,
            service,
            &args.node_address,
            args.gateway_addr.port(),
            &identity,
        )
        .await
        .with_context(|| {
            format!(
                "pointing the gateway Service {}/{service} at this replica (--gateway-service names a selector-less Service; the operator needs get on it and patch on endpointslices)",
                args.namespace
            )
        })?;
        tracing::info!(%service, address = %args.node_address, "the gateway Service now leads to this replica");
    }
    loops.spawn(
        "device sweep",
        sweep_loop(registry.clone(), pool_store.clone()),
    );
    loops.spawn(
        "revocation watch",
        watch_revocations(client.clone(), args.namespace.clone(), registry.clone()),
    );

    loops.spawn(
        "housekeeping",
        Housekeeper {
            client: client.clone(),
            namespace: args.namespace.clone(),
            served: pool_store.clone(),
            retention: Retention {
                tokens: args.token_retention,
                usage: args.usage_retention,
            },
            every: Duration::from_secs(args.housekeeping_seconds),
            metrics: metrics.clone(),
        }
        .run(),
    );
    loops.spawn(
        "node lease",
        lease::renew_loop(client.clone(), pool_store, nodes.clone(), metrics.clone()),
    );
    let readiness_state = readiness.clone();
    let readiness = {
        let nodes_synced = nodes_synced.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            while !(pools_synced.load(Ordering::Relaxed) && nodes_synced.load(Ordering::Relaxed)) {
                tick.tick().await;
            }
            readiness.ready();
            tracing::info!("DevicePool and Node caches synced; ready");
        })
    };

    let ctx = Arc::new(Context {
        warmup,
        client: client.clone(),
        nodes,
        nodes_synced,
        endpoints,
        node_owner,
        inventory: registry,
        metrics,
        recorder,
    });
    tracing::info!(selector = %args.pool_selector, node_address = %args.node_address, "darkcore-operator running");
    let controller = controller
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "reconcile did not complete");
            }
        });
    let lost = async {
        match &mut held {
            Some(held) => held.lost().await,
            None => std::future::pending().await,
        }
    };
    let outcome = tokio::select! {
        () = controller => Ok(()),
        lost = lost => Err(anyhow::Error::new(lost).context(
            "stopped acting because leadership was lost; a restart rejoins as a standby",
        )),
        stopped = loops.first_stopped() => {
            readiness_state.failed(stopped.to_string());
            Err(anyhow::Error::new(stopped).context(
                "stopped acting because a loop it needs stopped; a restart starts it afresh",
            ))
        }
    };

    tracing::info!(
        "shutting down; nodes stay until their leases expire, so no pod is evicted by a restart"
    );
    // Records not yet written were not acknowledged: agents send them to the next leader.
    loops.abort_all();
    readiness.abort();
    // No renewal may land after the release.
    drop(held);
    if outcome.is_ok()
        && let Some(lock) = &election
    {
        lock.release().await;
    }
    server.abort();
    outcome
}

/// SIGTERM (Kubernetes stopping the pod) or Ctrl-C.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Marks devices lost when they miss their pool's heartbeat threshold.
async fn sweep_loop(registry: Arc<Registry>, pools: reflector::Store<DevicePool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        registry.sweep(std::time::Instant::now(), |pool| {
            let seconds = pools.get(&ObjectRef::new(pool)).map_or(
                darkcore_crds::device_pool::DEFAULT_DEVICE_LOST_AFTER_SECONDS,
                |p| p.spec.device_lost_after_seconds,
            );
            Duration::from_secs(u64::from(seconds))
        });
    }
}

/// Follows the revoked-devices ConfigMap and cuts revoked devices off as it changes. Fails
/// closed: the gateway attaches no device before the first listing is read, and deleting the
/// ConfigMap revokes nothing back (the operator writes it again from what it knows).
async fn watch_revocations(client: Client, namespace: String, registry: Arc<Registry>) {
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={REVOKED_CONFIGMAP}"));
    let mut events = std::pin::pin!(watcher(maps, config).default_backoff());
    let mut listing = std::collections::HashSet::new();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Init) => listing.clear(),
            Ok(watcher::Event::InitApply(cm)) => listing.extend(revoked_ids(Some(&cm))),
            // A relisting adds to what is known: only an edit of the ConfigMap takes an id out.
            Ok(watcher::Event::InitDone) => {
                let mut known = registry.revoked();
                known.extend(listing.drain());
                registry.set_revoked(known);
            }
            Ok(watcher::Event::Apply(cm)) => registry.set_revoked(revoked_ids(Some(&cm))),
            Ok(watcher::Event::Delete(_)) => {
                let known = registry.revoked();
                tracing::warn!(
                    revoked = known.len(),
                    "the revoked-devices ConfigMap was deleted; writing it again: its devices stay revoked"
                );
                for id in known {
                    if let Err(error) =
                        crate::enroll::revocation::revoke(&client, &namespace, &id).await
                    {
                        tracing::warn!(%error, device = %id, "writing a revocation back");
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "watching revoked devices"),
        }
    }
}

/// Sets `flag` once the watch has delivered its first complete listing.
fn mark_synced<K>(flag: Arc<AtomicBool>) -> impl FnMut(&watcher::Event<K>) {
    move |event| {
        if matches!(event, watcher::Event::InitDone) {
            flag.store(true, Ordering::Relaxed);
        }
    }
}

async fn ensure_crd_installed(pools: &Api<DevicePool>) -> anyhow::Result<()> {
    match pools.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => bail!(
            "the DevicePool CRD is not installed in this cluster: run `darkcore-operator crds | kubectl apply -f -`"
        ),
        Err(e) => Err(e)
            .context("listing DevicePools to check that the API server and the CRD are reachable"),
    }
}
