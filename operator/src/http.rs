//! The operator's small HTTP server: `/healthz` (the process runs), `/readyz` (its caches are
//! synced and it is reconciling), `/metrics` (Prometheus text) and `/devices` (JSON).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::devices::registry::Registry;
use crate::metrics::Metrics;
use crate::validation::reputation_store::ReputationStore;

/// What /readyz answers. A standby is ready: it is healthy and waiting, and the gateway Service
/// does not route to it (only the leader's address is in its EndpointSlice). A leader is ready
/// once its caches are synced, and stops being ready when one of its loops has stopped.
#[derive(Default)]
pub struct Readiness {
    state: AtomicU8,
    failure: std::sync::Mutex<String>,
}

const SYNCING: u8 = 0;
const STANDBY: u8 = 1;
const READY: u8 = 2;
const FAILED: u8 = 3;

impl Readiness {
    pub fn standby(&self) {
        self.state.store(STANDBY, Ordering::Relaxed);
    }
    pub fn syncing(&self) {
        self.state.store(SYNCING, Ordering::Relaxed);
    }
    /// Ready, unless a loop has failed already.
    pub fn ready(&self) {
        let _ = self
            .state
            .compare_exchange(SYNCING, READY, Ordering::Relaxed, Ordering::Relaxed);
    }
    /// A loop the operator needs has stopped: not ready again in this process.
    pub fn failed(&self, why: String) {
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = why;
        self.state.store(FAILED, Ordering::Relaxed);
    }

    fn answer(&self) -> (StatusCode, String) {
        match self.state.load(Ordering::Relaxed) {
            READY => (StatusCode::OK, "ok\n".into()),
            STANDBY => (StatusCode::OK, "standby: another replica leads\n".into()),
            FAILED => {
                let why = self.failure.lock().unwrap_or_else(|e| e.into_inner());
                (StatusCode::SERVICE_UNAVAILABLE, format!("failed: {why}\n"))
            }
            _ => (
                StatusCode::SERVICE_UNAVAILABLE,
                "waiting for the DevicePool and Node caches to sync\n".into(),
            ),
        }
    }
}

#[derive(Clone)]
pub struct Health {
    pub readiness: Arc<Readiness>,
    pub metrics: Arc<Metrics>,
    pub registry: Arc<Registry>,
    /// Error rates and reliability, for the device listing.
    pub reputations: Arc<ReputationStore>,
}

pub fn router(health: Health) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/devices", get(devices))
        .with_state(health)
}

async fn readyz(State(health): State<Health>) -> impl IntoResponse {
    health.readiness.answer()
}

async fn metrics(State(health): State<Health>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        health.metrics.encode(),
    )
}

/// The devices this operator knows, as JSON (`?pool=NAME` for one pool): soft state from the
/// agents' streams, so listing costs the API server nothing.
async fn devices(State(health): State<Health>, uri: Uri) -> impl IntoResponse {
    let pool = uri.query().and_then(|q| {
        q.split('&')
            .find_map(|pair| pair.strip_prefix("pool="))
            .map(str::to_string)
    });
    let devices: Vec<_> = health
        .registry
        .list()
        .into_iter()
        .filter(|d| pool.as_ref().is_none_or(|p| &d.pool == p))
        .map(|mut d| {
            d.reputation = health.reputations.view(&d.pool, &d.id);
            d
        })
        .collect();
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(&devices).unwrap_or_else(|_| "[]".into()),
    )
}

/// Binds `addr` and serves until the task is dropped. Binding happens before this returns,
/// so a port in use fails start-up with a clear error.
pub async fn serve(
    addr: SocketAddr,
    health: Health,
) -> anyhow::Result<impl std::future::Future<Output = std::io::Result<()>>> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!(
            "binding the health and metrics server to {addr} (set --http-addr to a free address)"
        )
    })?;
    tracing::info!(addr = %listener.local_addr()?, "serving /healthz, /readyz and /metrics");
    Ok(axum::serve(listener, router(health)).into_future())
}
