//! `AgentGateway.Attach`: one long-lived stream per device, authenticated by the device
//! certificate. Reads Hello, registers the stream, then feeds heartbeats and owner states to
//! the registry until the stream ends, is replaced by a newer one, or the device is revoked.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use darkcore_proto::agent::v1::agent_gateway_server::AgentGateway;
use darkcore_proto::agent::v1::{
    AgentMessage, CertificateRenewed, HeartbeatAck, Hello, LogChunk, Offer, OperatorMessage,
    Refusal, Stats, StreamDown, StreamUp, TaskStatus, UsageRecord, Welcome, agent_message,
    operator_message, refusal::Code,
};
use darkcore_proto::{PROTOCOL_VERSION, check_version};
use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code as StatusCode, Request, Response, Status, Streaming};

use crate::devices::registry::{AgentSender, Registry, refusal, refusal_message};
use crate::enroll::ca::CaMaterial;
use crate::gateway::bounds;
use crate::gateway::streams::StreamBroker;
use crate::metrics::Metrics;
use crate::tls::{self, DeviceIdentity, identity_of};

/// How soon a renewal that could not be sent is tried again.
const RENEWAL_RETRY: Duration = Duration::from_secs(60);

/// Messages queued for one agent before the sender waits (backpressure, bounded memory).
pub const SEND_QUEUE: usize = 64;
/// How long a new stream may take to say Hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How often agents send a Heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// How often a device counts as heard while its stream waits on the operator's own side.
const PRESENT_EVERY: Duration = Duration::from_secs(1);

/// Waits for a consumer of a device's reports (the pod controller, the usage recorder) while
/// keeping the device present: while its stream waits on the operator's own slow side, its
/// heartbeats go unread, but it is not silent. Counting it present only delays a re-dispatch,
/// never hastens one.
async fn keeping_present(
    registry: &Registry,
    device: &str,
    generation: u64,
    every: Duration,
    work: impl std::future::Future<Output = ()>,
) {
    let mut work = std::pin::pin!(work);
    // Most reports are taken at once: no timer for them.
    if futures::FutureExt::now_or_never(&mut work).is_some() {
        return;
    }
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            () = &mut work => return,
            _ = tick.tick() => registry.heartbeat(device, generation),
        }
    }
}

/// Seconds between an agent's heartbeats: `HEARTBEAT_INTERVAL`, or a third of a shorter
/// fence, so that several acknowledged beats fit in it and a late one never fences.
fn heartbeat_interval(fence_seconds: u32) -> u32 {
    let usual = HEARTBEAT_INTERVAL.as_secs() as u32;
    match fence_seconds {
        0 => usual,
        fence => (fence / 3).clamp(1, usual),
    }
}

/// Which heartbeats are acknowledged: every `n`th (by sequence), so that the last one the agent
/// has heard acknowledged is never more than a third of its fence old; none without a fence.
/// An ack per heartbeat was about a third of the gateway's CPU at steady state.
fn acknowledge_every(fence_seconds: u32) -> Option<u64> {
    let interval = heartbeat_interval(fence_seconds);
    match fence_seconds {
        0 => None,
        fence => Some(u64::from((fence / 3 / interval).max(1))),
    }
}

/// Whether this operator serves a pool, and what its agents are told of it.
pub type PoolCheck = Arc<dyn Fn(&str) -> Served + Send + Sync>;

/// A pool as the gateway sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// The pool cache has not synced yet: the device is let in, with the default fence.
    NotYetKnown,
    /// Gone, or another operator's.
    No,
    /// Served here; its agents stop their tasks after `fence_seconds` cut off (0: never).
    Yes { fence_seconds: u32 },
}

impl Served {
    /// The fence its agents keep: the default until the pool is known, the safe side.
    fn fence_seconds(self) -> u32 {
        match self {
            Served::Yes { fence_seconds } => fence_seconds,
            _ => darkcore_crds::device_pool::DEFAULT_FENCE_SECONDS,
        }
    }
}

pub struct AttachService {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub pool_served: PoolCheck,
    pub tasks: Arc<dyn TaskSink>,
    /// Renews device certificates over their streams.
    pub renewer: Arc<Renewer>,
    /// Pairs users' exec streams with the agents' OpenStream calls.
    pub streams: Arc<StreamBroker>,
    /// The key statements are signed with (base64), told to every device in its Welcome.
    pub statement_key: String,
}

/// What renews device certificates: the CA, and how long a certificate lasts.
pub struct Renewer {
    pub ca: CaMaterial,
    pub validity: Duration,
}

/// Where what agents say about their tasks goes. The gateway only carries it: the operator's
/// wiring joins it to the pod controller, the log store and the usage recorder.
pub trait TaskSink: Send + Sync + 'static {
    /// A device attached, holding these tasks.
    fn hello(&self, device: &str, tasks: Vec<TaskStatus>) -> BoxFuture<'_, ()>;
    /// A task's status changed. Waiting here is backpressure on a fast reporter.
    fn status(&self, device: &str, status: TaskStatus) -> BoxFuture<'_, ()>;
    /// The device's stream ended (it may come back within its pool's threshold).
    fn detached(&self, device: &str) -> BoxFuture<'_, ()>;
    /// A chunk of a task's output; a refusal names why, for the rejected-frames metric.
    fn output(&self, device: &str, chunk: &LogChunk) -> Result<(), &'static str>;
    /// What the device's running containers use now, bounded by its `offer`; returns how
    /// many tasks' readings were refused (not the device's).
    fn stats(&self, device: &str, stats: &Stats, offer: &Offer) -> usize;
    /// Finished runs to charge; their acknowledgement goes back through `ack`.
    fn usage(
        &self,
        device: &str,
        pool: &str,
        records: Vec<UsageRecord>,
        ack: AgentSender,
    ) -> BoxFuture<'_, ()>;
}

#[tonic::async_trait]
impl AgentGateway for AttachService {
    type AttachStream = futures::stream::Map<
        ReceiverStream<Box<OperatorMessage>>,
        fn(Box<OperatorMessage>) -> Result<OperatorMessage, Status>,
    >;

    type OpenStreamStream = futures::stream::Map<
        ReceiverStream<StreamDown>,
        fn(StreamDown) -> Result<StreamDown, Status>,
    >;

    async fn attach(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let certificate = request
            .peer_certs()
            .and_then(|certs| certs.first().map(|c| c.as_ref().to_vec()))
            .unwrap_or_default();
        let identity = self.identity(&request)?;
        let address = request.remote_addr().map(|a| a.ip().to_string());
        let (sender, outbound) = mpsc::channel(SEND_QUEUE);
        let stream = AgentStream {
            address,
            tasks: self.tasks.clone(),
            identity,
            certificate,
            renewer: self.renewer.clone(),
            inbound: request.into_inner(),
            sender,
            registry: self.registry.clone(),
            metrics: self.metrics.clone(),
            pool_served: self.pool_served.clone(),
            acknowledge_every: Some(1),
            statement_key: self.statement_key.clone(),
        };
        tokio::spawn(stream.serve());
        let unboxed: fn(Box<OperatorMessage>) -> Result<OperatorMessage, Status> =
            |message| Ok(*message);
        Ok(Response::new(futures::StreamExt::map(
            ReceiverStream::new(outbound),
            unboxed,
        )))
    }

    async fn open_stream(
        &self,
        request: Request<Streaming<StreamUp>>,
    ) -> Result<Response<Self::OpenStreamStream>, Status> {
        let identity = self.identity(&request)?;
        if self.registry.revoked().contains(&identity.device_id) {
            return Err(Status::permission_denied("this device is revoked"));
        }
        let to_agent = self
            .streams
            .arrived(&identity.device_id, request.into_inner())
            .await?;
        let ok: fn(StreamDown) -> Result<StreamDown, Status> = Ok;
        Ok(Response::new(futures::StreamExt::map(
            ReceiverStream::new(to_agent),
            ok,
        )))
    }
}

impl AttachService {
    /// The device a call comes from, by its certificate (which TLS has verified).
    fn identity<T>(&self, request: &Request<T>) -> Result<DeviceIdentity, Status> {
        request
            .peer_certs()
            .and_then(|certs| certs.first().map(|c| identity_of(c.as_ref())))
            .ok_or_else(|| {
                self.metrics.refusal("no_certificate");
                Status::unauthenticated(
                    "this stream needs the device certificate that `darkcore-agent join` obtains",
                )
            })?
            .map_err(|reason| {
                self.metrics.refusal("bad_certificate");
                Status::unauthenticated(reason)
            })
    }
}

/// One agent's stream, served by its own task.
struct AgentStream {
    identity: DeviceIdentity,
    /// The certificate it presented (DER), renewed over the stream before it runs out.
    certificate: Vec<u8>,
    renewer: Arc<Renewer>,
    address: Option<String>,
    tasks: Arc<dyn TaskSink>,
    inbound: Streaming<AgentMessage>,
    sender: AgentSender,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    pool_served: PoolCheck,
    /// Heartbeats acknowledged: every `n`th (see `acknowledge_every`); set by Welcome.
    acknowledge_every: Option<u64>,
    statement_key: String,
}

/// How a stream ended, when it did not simply close.
enum Ending {
    Closed,
    Refused(Refusal, &'static str),
}

impl AgentStream {
    async fn serve(mut self) {
        let device = self.identity.device_id.clone();
        self.metrics.agent_connections.inc();
        let ending = match self.hello().await {
            Ok(hello) => self.attached(hello).await,
            Err(ending) => ending,
        };
        if let Ending::Refused(refusal, reason) = ending {
            self.metrics.refusal(reason);
            tracing::info!(%device, reason, message = %refusal.message, "agent stream refused");
            // Best effort: the agent may already be gone.
            let _ = self.sender.try_send(Box::new(refusal_message(refusal)));
        }
        self.metrics.agent_connections.dec();
    }

    /// Waits for a valid Hello from a device this operator accepts.
    async fn hello(&mut self) -> Result<Hello, Ending> {
        let first = match tokio::time::timeout(HELLO_TIMEOUT, self.next()).await {
            Err(_) => {
                return Err(Ending::Refused(
                    refusal(Code::TimedOut, "no Hello within 10 s of opening the stream"),
                    "hello_timeout",
                ));
            }
            Ok(first) => first?,
        };
        let Some(agent_message::Body::Hello(hello)) = first.body else {
            return Err(Ending::Refused(
                refusal(
                    Code::Malformed,
                    "the first message on a stream must be Hello",
                ),
                "no_hello",
            ));
        };
        if (self.pool_served)(&self.identity.pool) == Served::No {
            return Err(Ending::Refused(
                refusal(
                    Code::PoolGone,
                    &format!(
                        "this device belongs to pool {:?}, which no longer exists (or another operator serves it): join another pool with a new token",
                        self.identity.pool
                    ),
                ),
                "pool_gone",
            ));
        }
        Ok(hello)
    }

    /// Serves a stream that said Hello until it ends.
    async fn attached(&mut self, hello: Hello) -> Ending {
        let (close, mut closed) = oneshot::channel();
        let identity = self.identity.clone();
        let (device_id, pool) = (identity.device_id.clone(), identity.pool.clone());
        // Fail closed: a revoked device must not slip in while the list is still unread.
        if !self.registry.revocations_known() {
            return Ending::Refused(
                refusal(
                    Code::TimedOut,
                    "the operator has not read its revocation list yet; the agent retries",
                ),
                "revocations_unknown",
            );
        }
        let generation = match self.registry.attach(
            &identity,
            &hello,
            self.address.clone(),
            self.sender.clone(),
            close,
        ) {
            Ok(generation) => generation,
            Err(refused) => {
                return Ending::Refused(refusal(Code::Revoked, &refused.to_string()), "revoked");
            }
        };
        tracing::info!(device = %device_id, %pool, agent = %hello.agent_version, "agent attached");
        let fence_seconds = (self.pool_served)(&pool).fence_seconds();
        self.acknowledge_every = acknowledge_every(fence_seconds);
        let welcome = OperatorMessage {
            version: PROTOCOL_VERSION as i32,
            body: Some(operator_message::Body::Welcome(Welcome {
                device_id: device_id.clone(),
                pool: pool.clone(),
                heartbeat_interval_seconds: heartbeat_interval(fence_seconds),
                fence_seconds,
                statement_key: self.statement_key.clone(),
            })),
        };
        if self.sender.send(Box::new(welcome)).await.is_err() {
            self.registry.detach(&device_id, generation);
            return Ending::Closed;
        }
        let mut tasks = hello.tasks;
        for status in &mut tasks {
            self.bound(status);
        }
        let hello = self.tasks.hello(&device_id, tasks);
        keeping_present(&self.registry, &device_id, generation, PRESENT_EVERY, hello).await;
        let mut renewal = Box::pin(tokio::time::sleep(self.until_renewal()));
        let ending = loop {
            tokio::select! {
                () = &mut renewal => {
                    let wait = match self.renew(&device_id) {
                        true => self.until_renewal(),
                        false => RENEWAL_RETRY,
                    };
                    renewal.set(tokio::time::sleep(wait));
                }
                refusal = &mut closed => {
                    let reason = match refusal.as_ref().map(|r| r.code) {
                        Ok(code) if code == Code::Revoked as i32 => "revoked",
                        _ => "replaced",
                    };
                    break match refusal {
                        Ok(refusal) => Ending::Refused(refusal, reason),
                        Err(_) => Ending::Closed,
                    };
                }
                message = self.next() => match message {
                    Ok(message) => self.dispatch(&device_id, generation, message).await,
                    Err(ending) => break ending,
                },
            }
        };
        self.registry.detach(&device_id, generation);
        tracing::info!(device = %device_id, "agent stream ended");
        self.tasks.detached(&device_id).await;
        ending
    }

    /// How long until the device's certificate is to be renewed (see `tls::renewal_due`).
    fn until_renewal(&self) -> Duration {
        let now = SystemTime::now();
        let not_after = tls::not_after(&self.certificate).unwrap_or(now);
        let due = tls::renewal_due(not_after, now, self.renewer.validity);
        due.duration_since(now).unwrap_or_default()
    }

    /// Sends the device a new certificate for its key (false when it could not be sent); the
    /// next renewal is counted from it.
    fn renew(&mut self, device: &str) -> bool {
        let renewed = tls::renew_device(&self.renewer.ca, &self.certificate, self.renewer.validity)
            .map(|pem| (pem::parse(&pem).map(|p| p.into_contents()), pem));
        match renewed {
            Ok((Ok(der), pem)) => {
                let message = OperatorMessage {
                    version: PROTOCOL_VERSION as i32,
                    body: Some(operator_message::Body::CertificateRenewed(
                        CertificateRenewed {
                            certificate_pem: pem,
                        },
                    )),
                };
                // Never waits on the device: a full queue is tried again later.
                if self.sender.try_send(Box::new(message)).is_err() {
                    return false;
                }
                tracing::info!(%device, valid_for = ?self.renewer.validity, "device certificate renewed");
                self.metrics.certificates_renewed.inc();
                self.certificate = der;
                true
            }
            Ok((Err(error), _)) => {
                tracing::warn!(%device, %error, "a renewed device certificate did not parse");
                false
            }
            Err(error) => {
                tracing::warn!(%device, %error, "renewing a device certificate");
                false
            }
        }
    }

    /// Cuts a device's status to the sizes Kubernetes keeps, counting any cut.
    fn bound(&self, status: &mut TaskStatus) {
        if bounds::bound_status(status) {
            self.metrics.frame_rejected("status_too_long");
        }
    }

    async fn dispatch(&self, device: &str, generation: u64, message: AgentMessage) {
        match message.body {
            Some(agent_message::Body::Heartbeat(beat)) => {
                self.registry.heartbeat(device, generation);
                let due = self
                    .acknowledge_every
                    .is_some_and(|n| beat.sequence % n == 0);
                if !due {
                    return;
                }
                // The agent fences by these: an ack that does not fit is as if never sent,
                // which only makes the agent stop its tasks sooner. Never waits.
                let ack = OperatorMessage {
                    version: PROTOCOL_VERSION as i32,
                    body: Some(operator_message::Body::HeartbeatAck(HeartbeatAck {
                        sequence: beat.sequence,
                    })),
                };
                let _ = self.sender.try_send(Box::new(ack));
            }
            Some(agent_message::Body::OwnerState(owner)) => {
                self.registry.owner_state(device, generation, &owner)
            }
            Some(agent_message::Body::TaskStatus(mut status)) => {
                self.registry.heartbeat(device, generation);
                self.bound(&mut status);
                // Waiting here is backpressure on a fast reporter, never a lost report.
                let status = self.tasks.status(device, status);
                keeping_present(&self.registry, device, generation, PRESENT_EVERY, status).await;
            }
            Some(agent_message::Body::LogChunk(chunk)) => {
                self.registry.heartbeat(device, generation);
                if let Err(refused) = self.tasks.output(device, &chunk) {
                    tracing::debug!(%device, task = %chunk.task_id, %refused, "log chunk refused");
                    self.metrics.frame_rejected(refused);
                }
            }
            Some(agent_message::Body::UsageRecords(usage)) => {
                self.registry.heartbeat(device, generation);
                // Waiting here is backpressure; a record is never dropped unacknowledged.
                let (pool, ack) = (&self.identity.pool, self.sender.clone());
                let usage = self.tasks.usage(device, pool, usage.records, ack);
                keeping_present(&self.registry, device, generation, PRESENT_EVERY, usage).await;
            }
            Some(agent_message::Body::Stats(stats)) => {
                self.registry.heartbeat(device, generation);
                let offer = self.registry.offer(device).unwrap_or_default();
                for _ in 0..self.tasks.stats(device, &stats, &offer) {
                    self.metrics.frame_rejected("stats_not_held");
                }
            }
            Some(_) => self.registry.heartbeat(device, generation),
            None => self.metrics.frame_rejected("empty"),
        }
    }

    /// The next message, checked for its version. Errors end the stream with a reason.
    async fn next(&mut self) -> Result<AgentMessage, Ending> {
        match self.inbound.message().await {
            Ok(Some(message)) => match check_version(message.version, "operator") {
                Ok(()) => Ok(message),
                Err(unsupported) => {
                    self.metrics.frame_rejected("unsupported_version");
                    Err(Ending::Refused(
                        refusal(Code::UnsupportedVersion, &unsupported.to_string()),
                        "unsupported_version",
                    ))
                }
            },
            Ok(None) => Err(Ending::Closed),
            Err(status) => {
                let reason = match status.code() {
                    StatusCode::ResourceExhausted | StatusCode::OutOfRange => "too_large",
                    StatusCode::Internal | StatusCode::InvalidArgument | StatusCode::DataLoss => {
                        "undecodable"
                    }
                    _ => "transport",
                };
                if reason != "transport" {
                    self.metrics.frame_rejected(reason);
                    tracing::warn!(device = %self.identity.device_id, reason, error = %status.message(), "agent frame refused; closing its stream");
                    Err(Ending::Refused(
                        refusal(
                            Code::Malformed,
                            &format!("frame refused ({reason}): {}", status.message()),
                        ),
                        reason,
                    ))
                } else {
                    Err(Ending::Closed)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_device_waiting_on_a_slow_consumer_stays_present() {
        use crate::domain::Presence;
        let registry = Registry::default();
        let (sender, _receiver) = mpsc::channel(1);
        let (generation, _closed) = registry.attach_test_device("dev", sender);
        let slow = tokio::time::sleep(Duration::from_millis(600));
        keeping_present(
            &registry,
            "dev",
            generation,
            Duration::from_millis(20),
            slow,
        )
        .await;
        // Silent for 250 ms would be lost; it was heard within the last tick.
        let threshold = |_: &str| Duration::from_millis(250);
        registry.sweep(
            std::time::Instant::now() + Duration::from_millis(100),
            threshold,
        );
        assert_eq!(registry.presence("dev"), Presence::Online);
        registry.sweep(
            std::time::Instant::now() + Duration::from_secs(1),
            threshold,
        );
        assert!(matches!(registry.presence("dev"), Presence::Away { .. }));
    }

    #[test]
    fn several_heartbeats_fit_in_a_fence() {
        assert_eq!(heartbeat_interval(0), 5);
        assert_eq!(heartbeat_interval(30), 5);
        assert_eq!(heartbeat_interval(9), 3);
        assert_eq!(heartbeat_interval(5), 1);
        // The last acknowledged beat is at most a third of the fence old.
        assert_eq!(acknowledge_every(30), Some(2), "every 10 s of a 30 s fence");
        assert_eq!(acknowledge_every(5), Some(1));
        assert_eq!(acknowledge_every(9), Some(1));
        assert_eq!(acknowledge_every(300), Some(20));
        assert_eq!(
            acknowledge_every(0),
            None,
            "no fence, nothing to acknowledge"
        );
    }
}
