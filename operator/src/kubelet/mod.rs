//! The kubelet API of darkcore's nodes, served over TLS on a port of each node's own, so that
//! `kubectl logs` (through the apiserver) works as on any node.
//!
//! ```text
//!  apiserver / kubectl ──TLS──> endpoints (a port per node) ──> serve (client cert or bearer)
//!                                   ──> auth (TokenReview, SAR) ──> api: /containerLogs, /pods, /runningpods,
//!                                                                    /stats/summary, /metrics/resource,
//!                                                                    /exec ──> remote_command (SPDY) ──> device
//!  agents' LogChunks ──> LogStore (bounded per container run) ──┘
//!  agents' Stats ──> StatsStore (held tasks, bounded by the offer) ──┘
//! ```

pub mod api;
pub mod attach;
pub mod auth;
pub mod endpoints;
pub mod follow;
pub mod kept_output;
pub mod log_store;
pub mod port_forward;
pub mod remote_command;
pub mod spdy;
pub mod spdy_conn;
pub mod stats;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use anyhow::Context as _;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::{Api, Client};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::kubelet::auth::{Authorizer, User, user_of_certificate};
use crate::kubelet::log_store::LogStore;
use crate::tls::ServingIdentity;

/// The pods on darkcore's nodes by namespace and name, as the pod controller last saw them.
#[derive(Default)]
pub struct PodIndex {
    pods: RwLock<HashMap<(String, String), Pod>>,
    /// The pod controller has listed the pods of a node: a pod missing now is not on one.
    listed: std::sync::atomic::AtomicBool,
}

impl PodIndex {
    /// The pods of a node have been listed (after a start, the index was empty until then).
    pub fn mark_listed(&self) {
        self.listed
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn listed(&self) -> bool {
        self.listed.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set(&self, pod: &Pod) {
        let key = (
            pod.metadata.namespace.clone().unwrap_or_default(),
            pod.metadata.name.clone().unwrap_or_default(),
        );
        self.pods
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, pod.clone());
    }

    pub fn remove(&self, pod: &Pod) {
        let key = (
            pod.metadata.namespace.clone().unwrap_or_default(),
            pod.metadata.name.clone().unwrap_or_default(),
        );
        let mut pods = self.pods.write().unwrap_or_else(|e| e.into_inner());
        if pods.get(&key).and_then(|p| p.metadata.uid.as_ref()) == pod.metadata.uid.as_ref() {
            pods.remove(&key);
        }
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<Pod> {
        self.pods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// The pods bound to `node`, by namespace and name.
    pub fn on_node(&self, node: &str) -> Vec<Pod> {
        let mut pods: Vec<Pod> = self
            .pods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|pod| pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
            .cloned()
            .collect();
        pods.sort_by(|a, b| {
            (&a.metadata.namespace, &a.metadata.name)
                .cmp(&(&b.metadata.namespace, &b.metadata.name))
        });
        pods
    }
}

pub struct KubeletState {
    pub pods: Arc<PodIndex>,
    pub logs: Arc<LogStore>,
    /// What the containers use now, for /stats/summary and /metrics/resource.
    pub stats: Arc<stats::StatsStore>,
    /// When this operator started (Unix ms): its nodes' start time.
    pub started_unix_ms: i64,
    pub authorizer: Authorizer,
    /// Where devices are connected, and how exec streams reach them.
    pub registry: Arc<crate::devices::registry::Registry>,
    pub streams: Arc<crate::gateway::streams::StreamBroker>,
}

/// The CA that signs the cluster's client certificates (the apiserver's among them), from the
/// ConfigMap every apiserver publishes for extension servers.
pub async fn client_ca(client: &Client) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-system");
    let map = maps
        .get("extension-apiserver-authentication")
        .await
        .context("reading kube-system/extension-apiserver-authentication")?;
    let pem = map
        .data
        .and_then(|d| d.get("client-ca-file").cloned())
        .context("extension-apiserver-authentication has no client-ca-file: the apiserver runs without --client-ca-file")?;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("parsing the cluster's client CA")
}

/// Connections served at once; more are closed as they come.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long a client may take over its TLS handshake.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a client may take to send a request's headers, or idle between requests.
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The kubelet API's TLS, state and connection cap, shared by every node's endpoint.
pub struct KubeletServer {
    acceptor: TlsAcceptor,
    state: Arc<KubeletState>,
    /// Connections served at once, over all nodes' endpoints.
    connections: Arc<tokio::sync::Semaphore>,
}

impl KubeletServer {
    pub fn new(
        identity: ServingIdentity,
        client_ca: Vec<CertificateDer<'static>>,
        state: Arc<KubeletState>,
    ) -> anyhow::Result<Arc<KubeletServer>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for cert in client_ca {
            roots.add(cert).context("adding the cluster's client CA")?;
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()
                .context("building the client certificate verifier")?;
        let chain = CertificateDer::pem_slice_iter(identity.chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("parsing the kubelet API certificate")?;
        let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes())
            .context("parsing the kubelet API key")?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .context("the kubelet API certificate")?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(KubeletServer {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            state,
            connections: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
        }))
    }

    /// Serves node `node`'s kubelet API on `listener`, for as long as the future runs.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, node: Arc<str>) {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                continue;
            };
            // Past the cap a connection is closed at once: the API server retries, and a
            // flood of idle sockets cannot take the operator's memory or descriptors.
            let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "kubelet API: too many connections; closing one");
                continue;
            };
            let (server, node) = (self.clone(), node.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let Ok(Ok(tls)) =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, server.acceptor.accept(tcp)).await
                else {
                    return;
                };
                let user: Option<User> = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .and_then(|cert| user_of_certificate(cert.as_ref()));
                let app = api::router(server.state.clone(), node, user);
                let service = hyper::service::service_fn(move |request| {
                    let app = app.clone();
                    async move { tower::ServiceExt::oneshot(app, request).await }
                });
                // Headers must come within the timeout, also between requests on a kept-alive
                // connection; a `logs -f` body streams as long as it has to.
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(tls), service)
                    .with_upgrades()
                    .await;
            });
        }
    }
}
