//! The DevicePool reconciler: thin glue between the pure renderers in this module and the API.
//! apply: nodes -> node status -> stale nodes -> pool status; cleanup: nodes and leases.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use darkcore_crds::DevicePool;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::runtime::finalizer::{Event, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use crate::domain::quantity::cpu_millis;
use crate::metrics::Metrics;
use crate::pool::capacity::{ChangeKind, DeviceInventory, PlatformCapacity, PoolSurvey};
use crate::pool::events::summarize_changes;
use crate::pool::lease::{self, NODE_LEASE_NAMESPACE};
use crate::pool::node::{Platform, desired_node, node_name, node_spec_outdated, platforms};
use crate::pool::node_status::{
    KubeletEndpoints, NODE_STATUS_REFRESH, NoFreePort, NodeStatusInput, desired_node_status,
    node_status_outdated,
};
use crate::pool::pool_status::{PublishedNode, desired_pool_status};
use crate::pool::{FIELD_MANAGER, POOL_LABEL};
use crate::warmup::Warmup;

/// Finalizer that keeps a pool until its nodes and leases are gone.
pub const FINALIZER: &str = "darkcore.io/pool-cleanup";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action}: {source}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error("the finalizer step failed: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error(transparent)]
    Endpoint(#[from] NoFreePort),
}

impl Error {
    /// A short, bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "api",
            Error::Finalizer(_) => "finalizer",
            Error::Endpoint(_) => "kubelet_port",
        }
    }
}

fn api_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let action = action.into();
    move |source| Error::Kube { action, source }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    /// Nodes labelled `darkcore.io/pool`, fed by the same watch that triggers reconciles.
    pub nodes: Store<Node>,
    /// Whether `nodes` holds a complete listing yet; before that, a missing node may exist.
    pub nodes_synced: Arc<AtomicBool>,
    /// Each node's own kubelet API endpoint.
    pub endpoints: Arc<dyn KubeletEndpoints>,
    /// The installation's anchor, owner of every node (see [`crate::installation`]).
    pub node_owner: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>,
    pub inventory: Arc<dyn DeviceInventory>,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// Until it is over, the device registry may still be filling from reconnecting agents,
    /// so a restart does not take away capacity that devices still give.
    pub warmup: Arc<Warmup>,
}

pub async fn reconcile(pool: Arc<DevicePool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.metrics.reconciliations.inc();
    let api: Api<DevicePool> = Api::all(ctx.client.clone());
    let result = finalizer(&api, FINALIZER, pool.clone(), |event| async {
        match event {
            Event::Apply(pool) => apply(&pool, &ctx).await,
            Event::Cleanup(pool) => cleanup(&pool, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    if let Err(error) = &result {
        let event = KubeEvent {
            type_: EventType::Warning,
            reason: "ReconcileFailed".into(),
            note: Some(format!("{error}").chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &pool.object_ref(&())).await {
            tracing::warn!(error = %e, "could not record the failure as an Event");
        }
    }
    result
}

pub fn error_policy(pool: Arc<DevicePool>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(pool = %pool.name_any(), %error, "reconcile failed; retrying in 5 s");
    ctx.metrics.reconcile_failure(error.metric_label());
    Action::requeue(Duration::from_secs(5))
}

async fn apply(pool: &DevicePool, ctx: &Context) -> Result<Action, Error> {
    if !ctx.nodes_synced.load(Ordering::Relaxed) {
        // Deciding from a half-filled cache would rewrite nodes that are already current.
        return Ok(Action::requeue(Duration::from_millis(250)));
    }
    let now = Time(Timestamp::now());
    let survey = ctx.inventory.survey(pool);
    if ctx.warmup.keeps_capacity() && shrinks_published_cpu(pool, &survey, ctx) {
        // Less than the nodes publish, just after a start: the devices are probably still
        // reconnecting. Keep what the nodes say until they are back or the warm-up ends.
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let mut published = Vec::new();
    for platform in platforms(&pool.spec) {
        let capacity = survey.capacity(platform);
        published.push(publish_node(pool, platform, capacity, ctx, &now).await?);
    }
    delete_stale_nodes(pool, &published, ctx).await?;
    write_pool_status(pool, &published, &survey, ctx, &now).await?;
    record_device_changes(pool, ctx).await;
    Ok(Action::requeue(NODE_STATUS_REFRESH))
}

/// Whether `survey` offers less CPU on some platform than that platform's node publishes.
fn shrinks_published_cpu(pool: &DevicePool, survey: &PoolSurvey, ctx: &Context) -> bool {
    platforms(&pool.spec).into_iter().any(|platform| {
        let published = ctx
            .nodes
            .get(&ObjectRef::new(&node_name(&pool.name_any(), platform)))
            .and_then(|node| {
                let capacity = node.status.as_ref()?.capacity.as_ref()?;
                cpu_millis(&capacity.get("cpu")?.0)
            })
            .unwrap_or(0);
        survey.capacity(platform).cpu_millis < published
    })
}

/// Brings one platform's node, its lease and its status up to date, writing only what differs.
async fn publish_node(
    pool: &DevicePool,
    platform: Platform,
    capacity: PlatformCapacity,
    ctx: &Context,
    now: &Time,
) -> Result<PublishedNode, Error> {
    let pool_name = pool.name_any();
    let name = node_name(&pool_name, platform);
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let current = ctx.nodes.get(&ObjectRef::new(&name));

    let desired = desired_node(pool, platform, current.as_deref(), ctx.node_owner.as_ref());
    if node_spec_outdated(current.as_deref(), &desired) {
        ctx.metrics.api_write("Node", "apply");
        let applied = nodes
            .patch(&name, &apply, &Patch::Apply(&desired))
            .await
            .map_err(api_err(format!("applying node {name}")))?;
        tracing::info!(pool = %pool_name, node = %name, "applied node");
        if current.is_none() {
            // A new node gets its lease now rather than at the renewer's next tick.
            let leases = Api::namespaced(ctx.client.clone(), NODE_LEASE_NAMESPACE);
            lease::renew(&leases, &applied, &ctx.metrics)
                .await
                .map_err(api_err(format!("creating the lease of node {name}")))?;
        }
    }

    let current_status = current.as_ref().and_then(|n| n.status.as_ref());
    let published_port = current_status
        .and_then(|s| s.daemon_endpoints.as_ref()?.kubelet_endpoint.as_ref())
        .map(|e| e.port);
    let endpoint = ctx.endpoints.open(&name, published_port)?;
    let input = NodeStatusInput {
        pool: &pool_name,
        node_name: &name,
        platform,
        capacity: &capacity,
        endpoint: &endpoint,
        now,
    };
    let status = desired_node_status(&input, current_status);
    if node_status_outdated(current_status, &status, now, NODE_STATUS_REFRESH) {
        let body = json!({ "apiVersion": "v1", "kind": "Node", "status": status });
        ctx.metrics.api_write("Node", "apply-status");
        nodes
            .patch_status(&name, &apply, &Patch::Apply(&body))
            .await
            .map_err(api_err(format!("writing status of node {name}")))?;
    }
    Ok(PublishedNode { name, capacity })
}

/// Deletes nodes of the pool for platforms it no longer publishes.
async fn delete_stale_nodes(
    pool: &DevicePool,
    published: &[PublishedNode],
    ctx: &Context,
) -> Result<(), Error> {
    let pool_name = pool.name_any();
    for stale in ctx.nodes.state().iter().filter(|n| {
        n.labels().get(POOL_LABEL) == Some(&pool_name)
            && !published.iter().any(|p| p.name == n.name_any())
    }) {
        tracing::info!(pool = %pool_name, node = %stale.name_any(), "deleting a node the pool no longer publishes");
        delete_node_and_lease(ctx, &stale.name_any()).await?;
    }
    Ok(())
}

async fn write_pool_status(
    pool: &DevicePool,
    published: &[PublishedNode],
    survey: &PoolSurvey,
    ctx: &Context,
    now: &Time,
) -> Result<(), Error> {
    let status = desired_pool_status(pool, published, survey, now);
    ctx.metrics.pool_devices(
        &pool.name_any(),
        [
            status.online_devices,
            status.replicas,
            status.ready_devices,
            status.unavailable_devices,
        ]
        .map(i64::from),
    );
    if pool.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let pool_name = pool.name_any();
    let body =
        json!({ "apiVersion": "darkcore.io/v1alpha1", "kind": "DevicePool", "status": status });
    let pools: Api<DevicePool> = Api::all(ctx.client.clone());
    ctx.metrics.api_write("DevicePool", "apply-status");
    pools
        .patch_status(
            &pool_name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(api_err(format!("writing status of pool {pool_name}")))?;
    Ok(())
}

/// Records the pool's device joins, losses and revocations as Events: one per kind per
/// reconcile, naming the devices, so a thousand joins make one Event rather than a thousand.
async fn record_device_changes(pool: &DevicePool, ctx: &Context) {
    let changes = ctx.inventory.take_changes(&pool.name_any());
    for _ in changes.iter().filter(|c| c.kind == ChangeKind::Implausible) {
        ctx.metrics.refusal("implausible_device");
    }
    for summary in summarize_changes(&changes) {
        let event = KubeEvent {
            type_: summary.type_,
            reason: summary.reason.into(),
            note: Some(summary.note),
            action: "DeviceChange".into(),
            secondary: None,
        };
        if let Err(error) = ctx.recorder.publish(&event, &pool.object_ref(&())).await {
            tracing::warn!(%error, "could not record device changes as an Event");
        }
    }
}

async fn cleanup(pool: &DevicePool, ctx: &Context) -> Result<Action, Error> {
    let pool_name = pool.name_any();
    // The cache may not have seen a node created moments ago, so delete by name as well.
    let mut names: Vec<String> = platforms(&pool.spec)
        .into_iter()
        .map(|p| node_name(&pool_name, p))
        .collect();
    names.extend(
        ctx.nodes
            .state()
            .iter()
            .filter(|n| n.labels().get(POOL_LABEL) == Some(&pool_name))
            .map(|n| n.name_any()),
    );
    names.sort();
    names.dedup();
    for name in &names {
        delete_node_and_lease(ctx, name).await?;
    }
    ctx.metrics.pool_removed(&pool_name);
    tracing::info!(pool = %pool_name, nodes = ?names, "pool deleted; removed its nodes and leases");
    Ok(Action::await_change())
}

async fn delete_node_and_lease(ctx: &Context, name: &str) -> Result<(), Error> {
    ctx.endpoints.close(name);
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), NODE_LEASE_NAMESPACE);
    ctx.metrics.api_write("Node", "delete");
    ignore_not_found(nodes.delete(name, &DeleteParams::default()).await)
        .map_err(api_err(format!("deleting node {name}")))?;
    ctx.metrics.api_write("Lease", "delete");
    ignore_not_found(leases.delete(name, &DeleteParams::default()).await)
        .map_err(api_err(format!("deleting lease {name}")))?;
    Ok(())
}

fn ignore_not_found<T>(result: kube::Result<T>) -> kube::Result<()> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}
