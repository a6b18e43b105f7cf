//! The device registry: soft state built from live agent streams, never written to the API.
//! After an operator restart it is empty until agents reconnect, and fills again as they do.
//!
//! The gateway reports connections, heartbeats and owner states here; the pool controller asks
//! it to enlist devices and sum their capacity (`DeviceInventory`). Every change marks the
//! device's pool dirty, and `changed_pools` turns that into reconcile triggers at a bounded rate.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use darkcore_crds::DevicePool;
use darkcore_proto::agent::v1::{
    Hello, Offer, OperatorMessage, OwnerState, Refusal, operator_message, refusal,
};
use futures::Stream;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::devices::{Device, capacity, eligibility, enlist};
use crate::domain::Presence;
use crate::pool::capacity::{ChangeKind, DeviceChange};
use crate::pool::capacity::{DeviceInventory, PoolSurvey};
use crate::tls::DeviceIdentity;
use crate::validation::reputation_store::ReputationView;

/// What the gateway sends an agent through; bounded, so a slow agent gets backpressure.
/// Messages are boxed: the channel allocates its slots up front, once per device, so a slot
/// is a pointer rather than the largest message.
pub type AgentSender = mpsc::Sender<Box<OperatorMessage>>;

/// How long a device that went silent is remembered (for listings and re-enlisting).
pub const FORGET_AFTER: Duration = Duration::from_secs(3600);
/// Reconciles triggered by device changes start at most this often.
pub const TRIGGER_INTERVAL: Duration = Duration::from_secs(1);

/// One live stream of a device.
struct Connection {
    generation: u64,
    sender: AgentSender,
    /// Tells the stream's reader to send this refusal and hang up.
    close: oneshot::Sender<Refusal>,
}

struct Entry {
    device: Device,
    pool: String,
    /// Who it belongs to, as its certificate says; `None` when its token named nobody.
    owner: Option<String>,
    /// The address its stream came from, reported as its pods' IP.
    address: Option<String>,
    agent_version: String,
    connection: Option<Connection>,
    last_seen: Instant,
    /// Why the pool does not enlist it, when it does not.
    ineligible: Option<String>,
}

#[derive(Default)]
struct State {
    devices: HashMap<String, Entry>,
    enlisted: HashMap<String, BTreeSet<String>>,
    changes: HashMap<String, Vec<DeviceChange>>,
    revoked: HashSet<String>,
    dirty: BTreeSet<String>,
    next_generation: u64,
    /// Devices carrying at least one unfinished task, as the pod controller counts them.
    busy: HashSet<String>,
    /// The revocation list has been read once.
    revocations_known: bool,
    /// Devices whose results disagreed too often, with why: never enlisted.
    quarantined: HashMap<String, String>,
}

impl State {
    fn changed(&mut self, pool: &str, change: Option<DeviceChange>) {
        self.dirty.insert(pool.to_string());
        if let Some(change) = change {
            self.changes
                .entry(pool.to_string())
                .or_default()
                .push(change);
        }
    }
}

/// A device as a listing shows it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeviceView {
    pub id: String,
    pub pool: String,
    #[serde(default)]
    pub owner: Option<String>,
    pub os: String,
    pub arch: String,
    pub cores: u32,
    pub memory_bytes: u64,
    pub online: bool,
    pub connected: bool,
    pub enlisted: bool,
    pub available: bool,
    pub offer_millicores: u32,
    pub offer_memory_bytes: u64,
    pub agent_version: String,
    pub seconds_since_seen: u64,
    /// Why the pool does not enlist it, when it does not.
    pub note: Option<String>,
    /// Its judged results, once it has any.
    #[serde(default)]
    pub reputation: Option<ReputationView>,
}

/// Why a stream is refused at attach.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachRefused {
    #[error(
        "device {0} has been revoked: it cannot connect again; its owner must join with a new token"
    )]
    Revoked(String),
}

/// How the note of a device whose claims are not believable starts.
const IMPLAUSIBLE: &str = "not eligible: implausible";

#[derive(Default)]
pub struct Registry {
    state: Mutex<State>,
    dirty: Notify,
}

impl Registry {
    pub fn new() -> Arc<Registry> {
        Arc::new(Registry::default())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self) {
        self.dirty.notify_one();
    }

    /// The pod controller's count of the unfinished tasks a device carries changed: the
    /// device's pool shows it among its busy devices while it carries any.
    pub fn carrying(&self, device: &str, tasks: usize) {
        let mut state = self.lock();
        let changed = if tasks > 0 {
            state.busy.insert(device.to_string())
        } else {
            state.busy.remove(device)
        };
        let pool = state.devices.get(device).map(|e| e.pool.clone());
        if let (true, Some(pool)) = (changed, pool) {
            state.changed(&pool, None);
            drop(state);
            self.notify();
        }
    }

    /// A device's stream said Hello. Replaces (and closes) any older stream of the device.
    /// Returns the stream's generation, which later calls name it by.
    pub fn attach(
        &self,
        identity: &DeviceIdentity,
        hello: &Hello,
        address: Option<String>,
        sender: AgentSender,
        close: oneshot::Sender<Refusal>,
    ) -> Result<u64, AttachRefused> {
        let (id, pool) = (identity.device_id.as_str(), identity.pool.as_str());
        let owned_by = identity.owner.clone();
        let mut state = self.lock();
        if state.revoked.contains(id) {
            return Err(AttachRefused::Revoked(id.into()));
        }
        state.next_generation += 1;
        let generation = state.next_generation;
        let owner = hello.owner_state.clone().unwrap_or_default();
        let device = Device {
            id: id.into(),
            capabilities: hello.capabilities.clone().unwrap_or_default(),
            labels: hello.labels.clone().into_iter().collect(),
            online: true,
            available: owner.available,
            offer: owner.offer.unwrap_or_default(),
        };
        let connection = Connection {
            generation,
            sender,
            close,
        };
        let was_online = match state.devices.get_mut(id) {
            Some(entry) => {
                if let Some(old) = entry.connection.replace(connection) {
                    let _ = old.close.send(refusal(
                        refusal::Code::Replaced,
                        "a newer connection of this device took over",
                    ));
                }
                let was_online = entry.device.online;
                entry.device = device;
                entry.pool = pool.into();
                entry.owner = owned_by;
                entry.address = address;
                entry.agent_version = hello.agent_version.clone();
                entry.last_seen = Instant::now();
                was_online
            }
            None => {
                state.devices.insert(
                    id.into(),
                    Entry {
                        device,
                        pool: pool.into(),
                        owner: owned_by,
                        address,
                        agent_version: hello.agent_version.clone(),
                        connection: Some(connection),
                        last_seen: Instant::now(),
                        ineligible: None,
                    },
                );
                false
            }
        };
        let change = (!was_online).then(|| DeviceChange {
            kind: ChangeKind::Joined,
            device: id.into(),
        });
        state.changed(pool, change);
        drop(state);
        self.notify();
        Ok(generation)
    }

    /// Runs `f` on the entry of a device if `generation` is still its current stream.
    fn with_current(&self, id: &str, generation: u64, f: impl FnOnce(&mut Entry) -> bool) {
        let mut state = self.lock();
        let Some(entry) = state.devices.get_mut(id) else {
            return;
        };
        if entry.connection.as_ref().map(|c| c.generation) != Some(generation) {
            return;
        }
        entry.last_seen = Instant::now();
        let came_back = !entry.device.online;
        entry.device.online = true;
        let changed = f(entry) || came_back;
        if changed {
            let pool = entry.pool.clone();
            let change = came_back.then(|| DeviceChange {
                kind: ChangeKind::Joined,
                device: id.into(),
            });
            state.changed(&pool, change);
            drop(state);
            self.notify();
        }
    }

    /// The device is alive.
    pub fn heartbeat(&self, id: &str, generation: u64) {
        self.with_current(id, generation, |_| false);
    }

    /// The owner's policy changed what the device gives.
    pub fn owner_state(&self, id: &str, generation: u64, owner: &OwnerState) {
        self.with_current(id, generation, |entry| {
            let offer = owner.offer.clone().unwrap_or_default();
            let changed = entry.device.available != owner.available || entry.device.offer != offer;
            entry.device.available = owner.available;
            entry.device.offer = offer;
            changed
        });
    }

    /// The stream ended. The device stays online until it misses the pool's heartbeat
    /// threshold, so a network blip does not take its capacity or its tasks away.
    pub fn detach(&self, id: &str, generation: u64) {
        let mut state = self.lock();
        if let Some(entry) = state.devices.get_mut(id)
            && entry.connection.as_ref().map(|c| c.generation) == Some(generation)
        {
            entry.connection = None;
        }
    }

    /// Marks devices silent for longer than their pool's threshold as lost, and forgets
    /// devices silent for [`FORGET_AFTER`]. `threshold` gives a pool's threshold.
    pub fn sweep(&self, now: Instant, threshold: impl Fn(&str) -> Duration) {
        let mut state = self.lock();
        let mut lost = Vec::new();
        let mut forgotten = Vec::new();
        for (id, entry) in &mut state.devices {
            let silent = now.saturating_duration_since(entry.last_seen);
            if entry.device.online && silent > threshold(&entry.pool) {
                entry.device.online = false;
                lost.push((entry.pool.clone(), id.clone()));
            } else if !entry.device.online && entry.connection.is_none() && silent > FORGET_AFTER {
                forgotten.push(id.clone());
            }
        }
        for id in forgotten {
            state.devices.remove(&id);
        }
        let any = !lost.is_empty();
        for (pool, id) in lost {
            tracing::info!(device = %id, %pool, "device lost: no heartbeat within the pool's threshold");
            state.changed(
                &pool,
                Some(DeviceChange {
                    kind: ChangeKind::Lost,
                    device: id,
                }),
            );
        }
        drop(state);
        if any {
            self.notify();
        }
    }

    /// Closes a device's stream because it does not read what it is sent; it may reconnect,
    /// and its Hello settles what it missed.
    pub fn cut_off(&self, id: &str, why: &str) {
        let mut state = self.lock();
        if let Some(connection) = state.devices.get_mut(id).and_then(|e| e.connection.take()) {
            tracing::warn!(device = %id, %why, "closing the device's stream");
            let _ = connection
                .close
                .send(refusal(refusal::Code::SlowReader, why));
        }
    }

    /// The devices revoked, as last read.
    pub fn revoked(&self) -> HashSet<String> {
        self.lock().revoked.clone()
    }

    /// Whether the revocation list has been read since start: until then no device attaches.
    pub fn revocations_known(&self) -> bool {
        self.lock().revocations_known
    }

    /// Replaces the set of revoked devices. Newly revoked devices are cut off at once.
    pub fn set_revoked(&self, revoked: HashSet<String>) {
        let mut state = self.lock();
        let newly: Vec<String> = revoked.difference(&state.revoked).cloned().collect();
        state.revoked = revoked;
        state.revocations_known = true;
        let mut any = false;
        for id in newly {
            let Some(entry) = state.devices.get_mut(&id) else {
                continue;
            };
            if let Some(connection) = entry.connection.take() {
                let _ = connection.close.send(refusal(
                    refusal::Code::Revoked,
                    &AttachRefused::Revoked(id.clone()).to_string(),
                ));
            }
            entry.device.online = false;
            let pool = entry.pool.clone();
            tracing::info!(device = %id, %pool, "device revoked; its stream is closed");
            state.changed(
                &pool,
                Some(DeviceChange {
                    kind: ChangeKind::Revoked,
                    device: id,
                }),
            );
            any = true;
        }
        drop(state);
        if any {
            self.notify();
        }
    }

    /// Quarantines a device of `pool`: it is no longer enlisted, and the pool's Events say so
    /// once. (At start, those quarantined before are set the same way, with `announce` off.)
    pub fn quarantine(&self, device: &str, pool: &str, why: &str, announce: bool) {
        let mut state = self.lock();
        let newly = state
            .quarantined
            .insert(device.to_string(), why.to_string())
            .is_none();
        let change = (newly && announce).then(|| DeviceChange {
            kind: ChangeKind::Quarantined,
            device: device.to_string(),
        });
        state.changed(pool, change);
        drop(state);
        self.notify();
    }

    /// The sender of a device's current stream, for tasks.
    pub fn sender(&self, id: &str) -> Option<AgentSender> {
        let state = self.lock();
        let entry = state.devices.get(id)?;
        entry.connection.as_ref().map(|c| c.sender.clone())
    }

    /// The node a device's pods are bound to: its pool's node for its platform.
    pub fn node_of(&self, id: &str) -> Option<String> {
        let state = self.lock();
        let entry = state.devices.get(id)?;
        let platform = &entry.device.capabilities;
        Some(crate::pool::node::node_name_of(
            &entry.pool,
            &platform.os,
            &platform.arch,
        ))
    }

    /// Whether a device is online now, or since when it has been silent.
    pub fn presence(&self, id: &str) -> Presence {
        match self.lock().devices.get(id) {
            None => Presence::Unknown,
            Some(e) if e.device.online => Presence::Online,
            Some(e) => Presence::Away {
                last_heard: e.last_seen,
            },
        }
    }

    /// Since when the device has been silent: last heard, when its stream is down (it may
    /// still come back within its pool's threshold) or it is lost; `None` while attached.
    pub fn silent_since(&self, id: &str) -> Option<Instant> {
        let state = self.lock();
        let entry = state.devices.get(id)?;
        (entry.connection.is_none() || !entry.device.online).then_some(entry.last_seen)
    }

    /// What a device offers now, if it is known.
    pub fn offer(&self, id: &str) -> Option<Offer> {
        self.lock().devices.get(id).map(|e| e.device.offer.clone())
    }

    /// The pool a device joined.
    pub fn pool(&self, id: &str) -> Option<String> {
        self.lock().devices.get(id).map(|e| e.pool.clone())
    }

    /// Who a device belongs to, while it is remembered and if its token named anyone.
    pub fn owner(&self, id: &str) -> Option<String> {
        self.lock().devices.get(id)?.owner.clone()
    }

    /// The address a device's stream came from.
    pub fn address(&self, id: &str) -> Option<String> {
        self.lock().devices.get(id).and_then(|e| e.address.clone())
    }

    /// The devices a pool may place work on now: enlisted, online, and allowed by their owner,
    /// on the given platform.
    pub fn offers(&self, pool: &str, os: &str, arch: &str) -> Vec<(String, Offer)> {
        let state = self.lock();
        let Some(enlisted) = state.enlisted.get(pool) else {
            return Vec::new();
        };
        enlisted
            .iter()
            .filter_map(|id| state.devices.get(id).map(|e| (id, e)))
            .filter(|(_, e)| {
                e.pool == pool
                    && e.device.online
                    && e.device.available
                    && e.connection.is_some()
                    && e.device.capabilities.os == os
                    && e.device.capabilities.arch == arch
            })
            .map(|(id, e)| (id.clone(), e.device.offer.clone()))
            .collect()
    }

    /// Live streams now.
    pub fn connections(&self) -> usize {
        let state = self.lock();
        state
            .devices
            .values()
            .filter(|e| e.connection.is_some())
            .count()
    }

    /// Every known device, sorted by pool and id.
    pub fn list(&self) -> Vec<DeviceView> {
        let state = self.lock();
        let now = Instant::now();
        let mut views: Vec<DeviceView> = state
            .devices
            .iter()
            .map(|(id, e)| DeviceView {
                id: id.clone(),
                pool: e.pool.clone(),
                owner: e.owner.clone(),
                os: e.device.capabilities.os.clone(),
                arch: e.device.capabilities.arch.clone(),
                cores: e.device.capabilities.cores,
                memory_bytes: e.device.capabilities.memory_bytes,
                online: e.device.online,
                connected: e.connection.is_some(),
                enlisted: state
                    .enlisted
                    .get(&e.pool)
                    .is_some_and(|set| set.contains(id)),
                available: e.device.available,
                offer_millicores: e.device.offer.millicores,
                offer_memory_bytes: e.device.offer.memory_bytes,
                agent_version: e.agent_version.clone(),
                seconds_since_seen: now.saturating_duration_since(e.last_seen).as_secs(),
                note: e.ineligible.clone(),
                reputation: None,
            })
            .collect();
        views.sort_by(|a, b| (&a.pool, &a.id).cmp(&(&b.pool, &b.id)));
        views
    }

    /// Pools whose devices changed, at most once per [`TRIGGER_INTERVAL`] each, for
    /// `Controller::reconcile_on`.
    pub fn changed_pools(self: Arc<Self>) -> impl Stream<Item = ObjectRef<DevicePool>> + Send {
        futures::stream::unfold(
            (self, Vec::<String>::new()),
            |(registry, mut ready)| async move {
                while ready.is_empty() {
                    registry.dirty.notified().await;
                    tokio::time::sleep(TRIGGER_INTERVAL).await;
                    ready = std::mem::take(&mut registry.lock().dirty)
                        .into_iter()
                        .collect();
                }
                let pool = ready.pop().expect("not empty");
                Some((ObjectRef::new(&pool), (registry, ready)))
            },
        )
    }
}

impl DeviceInventory for Registry {
    fn survey(&self, pool: &DevicePool) -> PoolSurvey {
        let name = pool.name_any();
        let mut state = self.lock();
        let state = &mut *state;
        let mut eligible = Vec::new();
        let mut online = 0;
        let mut implausible = Vec::new();
        for entry in state.devices.values_mut().filter(|e| e.pool == name) {
            let was_implausible = entry
                .ineligible
                .as_deref()
                .is_some_and(|n| n.starts_with(IMPLAUSIBLE));
            entry.ineligible = None;
            if !entry.device.online {
                continue;
            }
            online += 1;
            if let Some(why) = state.quarantined.get(&entry.device.id) {
                entry.ineligible = Some(format!("not eligible: quarantined: {why}"));
                continue;
            }
            match eligibility::check(&pool.spec, &entry.device) {
                Ok(()) => eligible.push(&entry.device),
                Err(reason) => {
                    let note = format!("not eligible: {reason}");
                    if note.starts_with(IMPLAUSIBLE) && !was_implausible {
                        implausible.push(entry.device.id.clone());
                    }
                    entry.ineligible = Some(note);
                }
            }
        }
        // Reported once, when a device starts to claim too much.
        let changes = state.changes.entry(name.clone()).or_default();
        changes.extend(implausible.into_iter().map(|device| DeviceChange {
            kind: ChangeKind::Implausible,
            device,
        }));
        let current = state.enlisted.entry(name.clone()).or_default();
        let plan = enlist::plan(pool.spec.replicas, &eligible, current);
        *current = plan.enlisted.iter().cloned().collect();
        let enlisted: Vec<&Device> = eligible
            .iter()
            .copied()
            .filter(|d| current.contains(&d.id))
            .collect();
        if !plan.released.is_empty() {
            tracing::info!(pool = %name, released = ?plan.released, "devices released from the pool");
        }
        let busy = enlisted
            .iter()
            .filter(|d| state.busy.contains(&d.id))
            .count() as u32;
        let survey = PoolSurvey {
            platforms: capacity::by_platform(enlisted),
            online,
            busy,
        };
        for entry in state.devices.values_mut().filter(|e| {
            e.pool == name
                && e.device.online
                && e.ineligible.is_none()
                && !current.contains(&e.device.id)
        }) {
            entry.ineligible =
                Some("standing by: the pool has the devices spec.replicas asks for".into());
        }
        survey
    }

    fn take_changes(&self, pool: &str) -> Vec<DeviceChange> {
        self.lock().changes.remove(pool).unwrap_or_default()
    }
}

#[cfg(test)]
impl Registry {
    /// Attaches device `id` of pool "lab" with an empty Hello, as a test's stream: its
    /// generation, and where the refusal that closes it goes.
    pub fn attach_test_device(
        &self,
        id: &str,
        sender: AgentSender,
    ) -> (u64, oneshot::Receiver<Refusal>) {
        let (close, closed) = oneshot::channel();
        let identity = DeviceIdentity::unowned(id, "lab");
        let generation =
            (self.attach(&identity, &Hello::default(), None, sender, close)).expect("attached");
        (generation, closed)
    }
}

/// A refusal message.
pub fn refusal(code: refusal::Code, message: &str) -> Refusal {
    Refusal {
        code: code as i32,
        message: message.into(),
    }
}

/// A refusal wrapped for the stream.
pub fn refusal_message(refusal: Refusal) -> OperatorMessage {
    OperatorMessage {
        version: darkcore_proto::PROTOCOL_VERSION as i32,
        body: Some(operator_message::Body::Refusal(refusal)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use darkcore_crds::DevicePoolSpec;
    use darkcore_proto::agent::v1::{Capabilities, Runtime};

    fn hello(cores: u32, available: bool) -> Hello {
        Hello {
            agent_version: "0.1.0".into(),
            capabilities: Some(Capabilities {
                os: "linux".into(),
                arch: "amd64".into(),
                cores,
                memory_bytes: 8 << 30,
                ..Default::default()
            }),
            owner_state: Some(OwnerState {
                available,
                reason: "idle".into(),
                offer: Some(Offer {
                    millicores: cores * 1000,
                    memory_bytes: 4 << 30,
                    disk_bytes: 1 << 30,
                    runtimes: vec![Runtime::Oci as i32],
                }),
            }),
            ..Default::default()
        }
    }

    fn channel() -> (
        AgentSender,
        oneshot::Sender<Refusal>,
        oneshot::Receiver<Refusal>,
    ) {
        let (tx, _rx) = mpsc::channel(1);
        let (close, closed) = oneshot::channel();
        (tx, close, closed)
    }

    fn connect(registry: &Registry, id: &str, cores: u32) -> (u64, oneshot::Receiver<Refusal>) {
        let (tx, close, closed) = channel();
        let generation = registry
            .attach(
                &crate::tls::DeviceIdentity::unowned(id, "lab"),
                &hello(cores, true),
                None,
                tx,
                close,
            )
            .unwrap();
        (generation, closed)
    }

    fn lab(replicas: Option<i32>) -> DevicePool {
        DevicePool::new(
            "lab",
            DevicePoolSpec {
                replicas,
                ..Default::default()
            },
        )
    }

    fn cpu(survey: &PoolSurvey) -> u64 {
        survey.platforms.values().map(|c| c.cpu_millis).sum::<u64>()
    }

    #[test]
    fn connected_devices_add_up_and_their_joins_are_reported_once() {
        let registry = Registry::default();
        connect(&registry, "a", 1);
        connect(&registry, "b", 2);
        connect(&registry, "c", 4);
        let survey = registry.survey(&lab(None));
        assert_eq!(cpu(&survey), 7000);
        assert_eq!(survey.online, 3);
        let changes = registry.take_changes("lab");
        assert_eq!(changes.len(), 3);
        assert!(changes.iter().all(|c| c.kind == ChangeKind::Joined));
        assert!(registry.take_changes("lab").is_empty());
    }

    #[test]
    fn a_newer_stream_replaces_the_older_which_is_told_why() {
        let registry = Registry::default();
        let (first, mut first_closed) = connect(&registry, "a", 1);
        let (second, _) = connect(&registry, "a", 1);
        assert!(second > first);
        let refusal = first_closed.try_recv().expect("the old stream is closed");
        assert_eq!(refusal.code, refusal::Code::Replaced as i32);
        // The old stream ending later does not disconnect the new one.
        registry.detach("a", first);
        assert_eq!(registry.connections(), 1);
        assert_eq!(registry.silent_since("a"), None, "still attached");
        registry.detach("a", second);
        assert!(
            registry.silent_since("a").is_some(),
            "silent once its stream is down, while still online"
        );
        assert_eq!(registry.presence("a"), Presence::Online);
        assert_eq!(
            registry.take_changes("lab").len(),
            1,
            "a reconnect is not a second join"
        );
    }

    #[test]
    fn silent_devices_are_lost_after_the_threshold_and_come_back_on_heartbeat() {
        let registry = Registry::default();
        let (generation, _closed) = connect(&registry, "a", 2);
        registry.take_changes("lab");
        let threshold = |_: &str| Duration::from_secs(15);
        registry.sweep(Instant::now() + Duration::from_secs(10), threshold);
        assert_eq!(cpu(&registry.survey(&lab(None))), 2000);
        registry.sweep(Instant::now() + Duration::from_secs(16), threshold);
        assert_eq!(cpu(&registry.survey(&lab(None))), 0);
        assert_eq!(registry.take_changes("lab")[0].kind, ChangeKind::Lost);
        registry.heartbeat("a", generation);
        assert_eq!(cpu(&registry.survey(&lab(None))), 2000);
        assert_eq!(registry.take_changes("lab")[0].kind, ChangeKind::Joined);
    }

    #[test]
    fn a_device_claiming_too_much_is_not_enlisted_and_reported_once() {
        let registry = Registry::default();
        connect(&registry, "honest", 2);
        connect(&registry, "liar", 1_000_000);
        registry.take_changes("lab");
        let survey = registry.survey(&lab(None));
        assert_eq!(cpu(&survey), 2000, "only the honest device counts");
        let changes = registry.take_changes("lab");
        assert_eq!(changes.len(), 1);
        assert_eq!(
            (changes[0].kind, changes[0].device.as_str()),
            (ChangeKind::Implausible, "liar")
        );
        registry.survey(&lab(None));
        assert!(registry.take_changes("lab").is_empty(), "reported once");
    }

    #[test]
    fn enlisted_devices_carrying_tasks_count_as_busy() {
        let registry = Registry::default();
        connect(&registry, "a", 1);
        connect(&registry, "b", 1);
        connect(&registry, "c", 1);
        assert_eq!(registry.survey(&lab(None)).busy, 0);
        registry.carrying("a", 2);
        registry.carrying("b", 1);
        assert_eq!(registry.survey(&lab(None)).busy, 2);
        registry.carrying("b", 0);
        assert_eq!(registry.survey(&lab(None)).busy, 1);
        // Only enlisted devices count: with one replica, the pool holds a single device.
        let one = registry.survey(&lab(Some(1)));
        assert!(one.busy <= 1, "{one:?}");
    }

    #[test]
    fn a_busy_owner_takes_the_offer_away_until_idle_again() {
        let registry = Registry::default();
        let (generation, _closed) = connect(&registry, "a", 2);
        let mut busy = hello(2, false).owner_state.unwrap();
        registry.owner_state("a", generation, &busy);
        let survey = registry.survey(&lab(None));
        assert_eq!(cpu(&survey), 0);
        assert_eq!(survey.platforms.values().next().unwrap().devices, 1);
        busy.available = true;
        registry.owner_state("a", generation, &busy);
        assert_eq!(cpu(&registry.survey(&lab(None))), 2000);
    }

    #[test]
    fn replicas_enlist_that_many_and_the_rest_stand_by() {
        let registry = Registry::default();
        for (id, cores) in [("a", 1), ("b", 2), ("c", 4)] {
            connect(&registry, id, cores);
        }
        let survey = registry.survey(&lab(Some(2)));
        assert_eq!(survey.platforms.values().next().unwrap().devices, 2);
        assert_eq!(cpu(&survey), 6000, "the two most capable");
        let standing_by: Vec<String> = registry
            .list()
            .into_iter()
            .filter(|d| !d.enlisted)
            .map(|d| d.id)
            .collect();
        assert_eq!(standing_by, ["a"]);
    }

    #[test]
    fn revoked_devices_are_cut_off_and_cannot_attach_again() {
        let registry = Registry::default();
        let (_, mut closed) = connect(&registry, "a", 2);
        registry.set_revoked(HashSet::from(["a".to_string()]));
        assert_eq!(
            closed.try_recv().unwrap().code,
            refusal::Code::Revoked as i32
        );
        assert_eq!(cpu(&registry.survey(&lab(None))), 0);
        let (tx, close, _closed) = channel();
        let err = registry
            .attach(
                &crate::tls::DeviceIdentity::unowned("a", "lab"),
                &hello(2, true),
                None,
                tx,
                close,
            )
            .unwrap_err();
        assert!(err.to_string().contains("join with a new token"), "{err}");
    }

    #[test]
    fn stale_stream_messages_are_ignored() {
        let registry = Registry::default();
        let (old, _c1) = connect(&registry, "a", 2);
        let (_new, _c2) = connect(&registry, "a", 2);
        let busy = hello(2, false).owner_state.unwrap();
        registry.owner_state("a", old, &busy);
        assert_eq!(
            cpu(&registry.survey(&lab(None))),
            2000,
            "the replaced stream no longer speaks for the device"
        );
    }
}
