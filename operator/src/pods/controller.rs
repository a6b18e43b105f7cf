//! The pod controller: one task that owns what darkcore knows about the pods on its nodes and
//! moves each along: admit -> resolve -> place -> dispatch -> follow the agent's reports ->
//! write status -> release; and on deletion, stop the task then delete the pod.
//!
//! Inputs arrive on one channel (pod watches, agent reports, resolutions, a 1 s tick). The
//! decisions use the pure modules beside this one; API calls go to the `Writer`, off the loop.
//! Durable state is the pods themselves: each status records its attempt in the containerID,
//! and agents report what they hold in Hello, so a restarted operator adopts running tasks.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use darkcore_crds::{DevicePool, NetworkMode, Runtime};
use darkcore_proto::agent::v1::{
    TaskAssign, TaskCancel, TaskPhase, TaskStatus, operator_message, task_assign::RestartPolicy,
};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, ResourceExt};
use tokio::sync::mpsc;

use crate::devices::registry::Registry;
use crate::kubelet::PodIndex;
use crate::kubelet::log_store::{LogStore, parse_task_id};
use crate::pods::admission::{self, Refusal};
use crate::pods::load::{Load, Share};
use crate::pods::outbox::Outbox;
use crate::pods::placement::{self, Candidate, Need};
use crate::pods::resolve::{self, Lookups, Placement, Resolved};
use crate::pods::status::{self, Loss, RunView};
use crate::pods::writer::Writer;
use crate::pool::POOL_LABEL;

/// How often a pod blocked on a missing ConfigMap or Secret is tried again.
pub const RESOLVE_RETRY: Duration = Duration::from_secs(10);
/// How soon messages that did not fit an agent's queue are tried again.
pub const OUTBOX_RETRY: Duration = Duration::from_millis(20);
/// How long past its grace period a stopping task may take before its pod is deleted anyway.
pub const STOP_SLACK: Duration = Duration::from_secs(10);

pub enum Input {
    PodApplied(Pod),
    PodDeleted(Pod),
    /// A node's pods as first listed (or relisted after a watch gap).
    NodeListed(String, Vec<Pod>),
    /// A device said Hello with the tasks it holds.
    Hello(String, Vec<TaskStatus>),
    Report(String, TaskStatus),
    Resolved(
        String,
        Box<(Result<Resolved, resolve::Blocked>, Vec<resolve::Warning>)>,
    ),
}

/// What the controller needs from the rest of the operator.
pub struct Shared {
    pub client: Client,
    pub registry: Arc<Registry>,
    pub pools: Store<DevicePool>,
    pub nodes: Store<Node>,
    pub logs: Arc<LogStore>,
    /// The pods as the kubelet API serves them.
    pub index: Arc<PodIndex>,
    pub writer: Arc<Writer>,
    /// Until then, agents are still reconnecting after an operator start: recorded attempts
    /// are not declared lost, and unrecorded pods are not placed (they may be running).
    pub warm_at: Instant,
    /// The address published as each node's InternalIP (the pods' hostIP).
    pub host_ip: String,
    pub metrics: Arc<crate::metrics::Metrics>,
}

struct Attempt {
    number: u32,
    task_id: String,
    device: String,
    millicores: u64,
    memory: u64,
    report: Option<TaskStatus>,
    /// Stop sent (deletion or release).
    cancelled: bool,
}

#[derive(Default)]
struct Entry {
    pod: Pod,
    runtime: Option<Runtime>,
    refused: Option<Refusal>,
    resolved: Option<Resolved>,
    resolving: bool,
    blocked: Option<String>,
    next_resolve: Option<Instant>,
    attempt: Option<Attempt>,
    /// The number the next attempt gets.
    next_number: u32,
    last_loss: Option<Loss>,
    failed: Option<(String, String)>,
    unplaced: Option<(String, String)>,
    /// Events already published, so a condition that lasts is reported once.
    announced: HashSet<String>,
    delete_by: Option<Instant>,
    deleted: bool,
    /// When this operator first saw the pod, for the dispatch latency.
    seen_at: Option<Instant>,
    /// Its create-to-Running time is counted once.
    running_counted: bool,
}

impl Entry {
    /// Whether the tick must look at this pod: something about it changes with time alone
    /// (a placement or resolution to retry, a deletion deadline, a device that went quiet or
    /// is not back yet after a restart). Anything else changes only on a watch event or an
    /// agent's report, which reconcile the pod themselves; so a tick costs little for the
    /// many pods that simply run on devices that are online.
    fn waits_on_time(&self, registry: &Registry) -> bool {
        if self.pod.metadata.deletion_timestamp.is_some() {
            return !self.deleted;
        }
        match &self.attempt {
            None => self.failed.is_none() && !pod_finished(&self.pod),
            // A finished attempt is released in the reconcile that records it, so a settled
            // pod has its attempt cancelled.
            Some(attempt) => {
                let settled = attempt.cancelled && pod_finished(&self.pod);
                !settled && registry.presence(&attempt.device) != Some(true)
            }
        }
    }
}

pub struct Controller {
    shared: Arc<Shared>,
    inbox: mpsc::Sender<Input>,
    pods: HashMap<String, Entry>,
    /// What each device carries, from the attempts in `pods`.
    load: Load,
    /// Messages to agents whose queues were full.
    outbox: Outbox,
    /// Tasks agents reported for pods not (yet) seen, until the pods are listed.
    orphans: Vec<(String, TaskStatus)>,
}

fn uid_of(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

/// An attempt's share of its device's load: counted until it ends.
fn share(attempt: &Attempt) -> Option<Share<'_>> {
    (!terminal(phase_of(attempt.report.as_ref()))).then_some(Share {
        device: &attempt.device,
        millicores: attempt.millicores,
        memory: attempt.memory,
    })
}

/// Puts `attempt` in the pod's slot and counts its share of the device's load.
fn set_attempt(load: &mut Load, slot: &mut Option<Attempt>, attempt: Attempt) {
    load.track(slot, share, |slot| *slot = Some(attempt));
}

fn cancel(
    outbox: &mut Outbox,
    registry: &Registry,
    device: &str,
    task_id: &str,
    grace: u32,
    reason: &str,
) {
    outbox.send(
        registry,
        device,
        operator_message::Body::TaskCancel(TaskCancel {
            task_id: task_id.into(),
            grace_seconds: grace,
            reason: reason.into(),
        }),
    );
}

fn phase_of(report: Option<&TaskStatus>) -> TaskPhase {
    report
        .and_then(|r| TaskPhase::try_from(r.phase).ok())
        .unwrap_or(TaskPhase::Unspecified)
}

fn terminal(phase: TaskPhase) -> bool {
    matches!(phase, TaskPhase::Succeeded | TaskPhase::Failed)
}

impl Controller {
    pub fn new(shared: Arc<Shared>) -> (Controller, mpsc::Receiver<Input>) {
        let (inbox, receiver) = mpsc::channel(4096);
        (
            Controller {
                shared,
                inbox,
                pods: HashMap::new(),
                load: Load::default(),
                outbox: Outbox::default(),
                orphans: Vec::new(),
            },
            receiver,
        )
    }

    pub fn inbox(&self) -> mpsc::Sender<Input> {
        self.inbox.clone()
    }

    pub async fn run(mut self, mut receiver: mpsc::Receiver<Input>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                input = receiver.recv() => match input {
                    Some(input) => self.handle(input),
                    None => return,
                },
                _ = tick.tick() => {
                    let registry = &self.shared.registry;
                    let uids: Vec<String> = self
                        .pods
                        .iter()
                        .filter(|(_, entry)| entry.waits_on_time(registry))
                        .map(|(uid, _)| uid.clone())
                        .collect();
                    for uid in uids {
                        self.reconcile(&uid);
                    }
                    self.settle_orphans();
                }
                // Agents' queues drain fast; messages that did not fit follow soon after.
                _ = tokio::time::sleep(OUTBOX_RETRY), if !self.outbox.is_empty() => {}
            }
            self.outbox.flush();
            #[cfg(debug_assertions)]
            self.check_load();
        }
    }

    /// The tracked load equals a fresh count over every attempt (debug builds, after each step).
    #[cfg(debug_assertions)]
    fn check_load(&self) {
        let mut counted = Load::default();
        for attempt in self.pods.values().filter_map(|e| e.attempt.as_ref()) {
            if let Some(share) = share(attempt) {
                counted.add(share);
            }
        }
        debug_assert_eq!(self.load, counted, "the tracked device load drifted");
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::PodApplied(pod) => self.applied(pod),
            Input::PodDeleted(pod) => self.deleted(&uid_of(&pod)),
            Input::NodeListed(node, pods) => {
                let listed: HashSet<String> = pods.iter().map(uid_of).collect();
                let gone: Vec<String> = self
                    .pods
                    .iter()
                    .filter(|(uid, e)| {
                        e.pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
                            == Some(node.as_str())
                            && !listed.contains(*uid)
                    })
                    .map(|(uid, _)| uid.clone())
                    .collect();
                for uid in gone {
                    self.deleted(&uid);
                }
                for pod in pods {
                    self.applied(pod);
                }
            }
            Input::Hello(device, tasks) => self.hello(&device, tasks),
            Input::Report(device, report) => self.report(&device, report),
            Input::Resolved(uid, outcome) => {
                let (result, warnings) = *outcome;
                if let Some(entry) = self.pods.get_mut(&uid) {
                    entry.resolving = false;
                    for warning in warnings {
                        if entry
                            .announced
                            .insert(format!("{}:{}", warning.reason, warning.message))
                        {
                            self.shared.writer.event(
                                &entry.pod,
                                true,
                                warning.reason,
                                warning.message,
                            );
                        }
                    }
                    match result {
                        Ok(resolved) => {
                            entry.resolved = Some(resolved);
                            entry.blocked = None;
                        }
                        Err(blocked) => {
                            entry.blocked = Some(blocked.message);
                            entry.next_resolve = Some(Instant::now() + RESOLVE_RETRY);
                        }
                    }
                    self.reconcile(&uid);
                }
            }
        }
    }

    fn applied(&mut self, pod: Pod) {
        let uid = uid_of(&pod);
        let entry = self.pods.entry(uid.clone()).or_insert_with(|| {
            let mut entry = Entry {
                next_number: 1,
                seen_at: Some(Instant::now()),
                ..Default::default()
            };
            // A pod darkcore placed before a restart: assume its attempt still runs there
            // until its device says otherwise or stays away.
            if let Some((task_id, device)) = status::recorded_attempt(&pod)
                && let Some((_, number)) = parse_task_id(&task_id)
            {
                entry.next_number = number + 1;
                self.shared.logs.assign(&task_id, &device);
                if !pod_finished(&pod) {
                    let attempt = Attempt {
                        number,
                        task_id,
                        device,
                        millicores: 0,
                        memory: 0,
                        report: None,
                        cancelled: false,
                    };
                    set_attempt(&mut self.load, &mut entry.attempt, attempt);
                }
            }
            entry
        });
        self.shared.index.set(&pod);
        entry.pod = pod;
        self.reconcile(&uid);
    }

    fn deleted(&mut self, uid: &str) {
        if let Some(mut entry) = self.pods.remove(uid) {
            self.shared.index.remove(&entry.pod);
            if let Some(attempt) = self
                .load
                .track(&mut entry.attempt, share, Option::take)
                .filter(|a| !a.cancelled || !terminal(phase_of(a.report.as_ref())))
            {
                cancel(
                    &mut self.outbox,
                    &self.shared.registry,
                    &attempt.device,
                    &attempt.task_id,
                    0,
                    "the pod was deleted",
                );
            }
            self.shared.logs.forget(uid);
        }
    }

    /// A device's Hello lists what it holds: adopt what we expect there, stop the rest, and
    /// count what it no longer has as lost.
    fn hello(&mut self, device: &str, tasks: Vec<TaskStatus>) {
        let held: HashSet<String> = tasks.iter().map(|t| t.task_id.clone()).collect();
        let expected: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, e)| {
                e.attempt
                    .as_ref()
                    .is_some_and(|a| a.device == device && !held.contains(&a.task_id))
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in expected {
            self.lose(
                &uid,
                "DeviceLost",
                format!("device {device} restarted without the task"),
            );
        }
        for task in tasks {
            self.report(device, task);
        }
    }

    fn report(&mut self, device: &str, report: TaskStatus) {
        let Some((uid, number)) = parse_task_id(&report.task_id).map(|(u, n)| (u.to_string(), n))
        else {
            cancel(
                &mut self.outbox,
                &self.shared.registry,
                device,
                &report.task_id,
                0,
                "not a task of this operator",
            );
            return;
        };
        // Only a device of the pod's own pool may claim a task this operator did not record.
        let same_pool = match (self.pool_of(&uid), self.shared.registry.pool(device)) {
            (Some(pool), Some(joined)) => pool.name_any() == joined,
            _ => false,
        };
        let Some(entry) = self.pods.get_mut(&uid) else {
            self.orphans.push((device.to_string(), report));
            return;
        };
        let current = entry
            .attempt
            .as_ref()
            .is_some_and(|a| a.task_id == report.task_id && a.device == device);
        let adoptable = entry.attempt.is_none()
            && same_pool
            && !pod_finished(&entry.pod)
            && entry.failed.is_none()
            && number + 1 >= entry.next_number;
        match (current, adoptable) {
            (true, _) => {
                self.load.track(&mut entry.attempt, share, |slot| {
                    if let Some(attempt) = slot.as_mut() {
                        attempt.report = Some(report);
                    }
                });
            }
            (false, true) => {
                // A running task this operator did not know about (it restarted before recording
                // the attempt): adopt it rather than run the pod twice.
                tracing::info!(%uid, task = %report.task_id, %device, "adopting a task its device still runs");
                self.shared.logs.assign(&report.task_id, device);
                entry.next_number = number + 1;
                let attempt = Attempt {
                    number,
                    task_id: report.task_id.clone(),
                    device: device.to_string(),
                    millicores: 0,
                    memory: 0,
                    report: Some(report),
                    cancelled: false,
                };
                set_attempt(&mut self.load, &mut entry.attempt, attempt);
            }
            (false, false) => {
                tracing::info!(%uid, task = %report.task_id, %device, "ignoring a report from an abandoned attempt; stopping it");
                cancel(
                    &mut self.outbox,
                    &self.shared.registry,
                    device,
                    &report.task_id,
                    0,
                    "this attempt was abandoned",
                );
                return;
            }
        }
        self.reconcile(&uid);
    }

    /// Orphan reports whose pods are still unknown once warm: their pods are gone.
    fn settle_orphans(&mut self) {
        if self.orphans.is_empty() {
            return;
        }
        let orphans = std::mem::take(&mut self.orphans);
        for (device, report) in orphans {
            let known =
                parse_task_id(&report.task_id).is_some_and(|(uid, _)| self.pods.contains_key(uid));
            if known {
                self.report(&device, report);
            } else if Instant::now() >= self.shared.warm_at {
                cancel(
                    &mut self.outbox,
                    &self.shared.registry,
                    &device,
                    &report.task_id,
                    0,
                    "its pod no longer exists",
                );
            } else {
                self.orphans.push((device, report));
            }
        }
    }

    /// The attempt ended without the pod's doing: run it again, or fail the pod past the
    /// pool's maximum.
    fn lose(&mut self, uid: &str, reason: &'static str, message: String) {
        let max = self
            .pool_of(uid)
            .map_or(darkcore_crds::device_pool::DEFAULT_MAX_REDISPATCHES, |p| {
                p.spec.max_redispatches
            });
        let Some(entry) = self.pods.get_mut(uid) else {
            return;
        };
        let Some(attempt) = self.load.track(&mut entry.attempt, share, Option::take) else {
            return;
        };
        cancel(
            &mut self.outbox,
            &self.shared.registry,
            &attempt.device,
            &attempt.task_id,
            0,
            "this attempt was abandoned",
        );
        tracing::info!(%uid, task = %attempt.task_id, device = %attempt.device, reason, "attempt lost; the task runs again elsewhere");
        self.shared.metrics.task_redispatched(reason);
        entry.next_number = entry.next_number.max(attempt.number + 1);
        entry.last_loss = Some(Loss {
            reason: reason.into(),
            message: message.clone(),
            at_unix_ms: now_ms(),
        });
        self.shared.writer.event(
            &entry.pod,
            true,
            reason,
            format!("{message}; attempt {} of the task ended", attempt.number),
        );
        if attempt.number > max {
            entry.failed = Some((
                reason.into(),
                format!(
                    "{message}; the task was dispatched {} times, more than the pool's maxRedispatches ({max}) allows",
                    attempt.number
                ),
            ));
        }
        self.reconcile(uid);
    }

    fn pool_of(&self, uid: &str) -> Option<Arc<DevicePool>> {
        let entry = self.pods.get(uid)?;
        let node = self.shared.nodes.get(&ObjectRef::new(
            entry.pod.spec.as_ref()?.node_name.as_deref()?,
        ))?;
        let pool = node.labels().get(POOL_LABEL)?.clone();
        self.shared.pools.get(&ObjectRef::new(&pool))
    }

    fn reconcile(&mut self, uid: &str) {
        let pool = self.pool_of(uid);
        let shared = self.shared.clone();
        let registry = &shared.registry;
        let now = Instant::now();
        let Some(entry) = self.pods.get_mut(uid) else {
            return;
        };

        // Deletion: stop the task within the grace period, then delete the pod.
        if entry.pod.metadata.deletion_timestamp.is_some() {
            if entry.deleted {
                return;
            }
            let grace = entry
                .pod
                .metadata
                .deletion_grace_period_seconds
                .unwrap_or(30)
                .max(0) as u32;
            let running = entry.attempt.as_ref().is_some_and(|a| {
                !terminal(phase_of(a.report.as_ref()))
                    && phase_of(a.report.as_ref()) != TaskPhase::Preempted
            });
            let device_online = entry
                .attempt
                .as_ref()
                .is_some_and(|a| registry.presence(&a.device) == Some(true));
            if let Some(attempt) = entry.attempt.as_mut().filter(|a| !a.cancelled) {
                cancel(
                    &mut self.outbox,
                    registry,
                    &attempt.device,
                    &attempt.task_id,
                    grace,
                    "the pod is being deleted",
                );
                attempt.cancelled = true;
                entry.delete_by = Some(now + Duration::from_secs(u64::from(grace)) + STOP_SLACK);
            }
            let stopped = !running || !device_online || entry.delete_by.is_some_and(|by| now >= by);
            // With grace 0 (force deletion, or a finished pod) the apiserver removes the pod
            // in the same request: deleting it again would only cost a 404.
            if stopped {
                entry.deleted = true;
                if grace > 0 {
                    tracing::info!(pod = %format!("{}/{}", entry.pod.namespace().unwrap_or_default(), entry.pod.name_any()), running, device_online, "the pod's task has stopped; deleting the pod");
                    shared.writer.delete(&entry.pod);
                }
            }
            return;
        }
        if pod_finished(&entry.pod) && entry.attempt.as_ref().is_none_or(|a| a.cancelled) {
            return;
        }

        // Admission, once.
        if entry.runtime.is_none() && entry.refused.is_none() {
            match pool.as_ref() {
                None => return, // its pool or node is not in the cache yet
                Some(pool) => match admission::admit(&pool.name_any(), &pool.spec, &entry.pod) {
                    Ok(runtime) => entry.runtime = Some(runtime),
                    Err(refusal) => {
                        shared.writer.event(
                            &entry.pod,
                            true,
                            refusal.reason,
                            refusal.message.clone(),
                        );
                        entry.failed = Some((refusal.reason.into(), refusal.message.clone()));
                        entry.refused = Some(refusal);
                    }
                },
            }
        }

        if entry.failed.is_none() && entry.attempt.is_none() {
            // Resolve env and volumes, again while blocked.
            if entry.resolved.is_none() {
                if !entry.resolving && entry.next_resolve.is_none_or(|at| now >= at) {
                    entry.resolving = true;
                    tokio::spawn(resolve_pod(
                        shared.clone(),
                        entry.pod.clone(),
                        self.inbox.clone(),
                    ));
                }
            } else if now >= shared.warm_at {
                let placed = place(
                    &shared,
                    pool.as_deref(),
                    entry,
                    &self.load,
                    &mut self.outbox,
                );
                match placed {
                    Ok(attempt) => {
                        if let Some(seen) = entry.seen_at.take() {
                            shared
                                .metrics
                                .dispatch_latency
                                .observe(seen.elapsed().as_secs_f64());
                        }
                        entry.unplaced = None;
                        entry.next_number = attempt.number + 1;
                        set_attempt(&mut self.load, &mut entry.attempt, attempt);
                    }
                    Err(why) => {
                        if entry.announced.insert(format!("NoDeviceFits:{why}")) {
                            shared
                                .writer
                                .event(&entry.pod, true, "NoDeviceFits", why.clone());
                        }
                        entry.unplaced = Some(("NoDeviceFits".into(), why));
                    }
                }
            }
        }
        let entry = self.pods.get_mut(uid).expect("present");

        // Follow the attempt: lost devices, preemption, the end.
        if let Some(attempt) = &entry.attempt {
            let presence = registry.presence(&attempt.device);
            let lost = match presence {
                Some(online) => !online,
                None => now >= shared.warm_at,
            };
            let phase = phase_of(attempt.report.as_ref());
            if lost && !terminal(phase) {
                let device = attempt.device.clone();
                self.lose(uid, "DeviceLost", format!("device {device} was lost (no heartbeat within the pool's deviceLostAfterSeconds)"));
                return;
            }
            if phase == TaskPhase::Preempted {
                let report = attempt.report.clone().unwrap_or_default();
                let device = attempt.device.clone();
                let words = if report.message.is_empty() {
                    report.reason.clone()
                } else {
                    report.message.clone()
                };
                self.lose(
                    uid,
                    "Preempted",
                    format!("device {device} handed the task back: {words}"),
                );
                return;
            }
        }
        let entry = self.pods.get_mut(uid).expect("present");
        // A device that evicted the task says why on the pod, as a kubelet's eviction does.
        if let Some(report) = entry.attempt.as_ref().and_then(|a| a.report.as_ref())
            && phase_of(Some(report)) == TaskPhase::Failed
            && report.reason == "Evicted"
            && entry
                .announced
                .insert(format!("Evicted:{}", report.task_id))
        {
            shared
                .writer
                .event(&entry.pod, true, "Evicted", report.message.clone());
        }
        let view = RunView {
            attempt: entry
                .attempt
                .as_ref()
                .map(|a| (a.number, a.device.clone(), a.task_id.clone())),
            report: entry.attempt.as_ref().and_then(|a| a.report.clone()),
            last_loss: entry.last_loss.clone(),
            unplaced: entry.unplaced.clone(),
            config_error: entry.blocked.clone(),
            failed: entry.failed.clone(),
            pod_ip: entry
                .attempt
                .as_ref()
                .and_then(|a| registry.address(&a.device)),
            host_ip: Some(shared.host_ip.clone()),
        };
        let desired = status::render(
            &entry.pod,
            &view,
            &Time(k8s_openapi::jiff::Timestamp::now()),
        );
        if status::differs(&entry.pod, &desired) {
            if !entry.running_counted
                && desired.phase.as_deref() == Some("Running")
                && let Some(created) = entry.pod.metadata.creation_timestamp.as_ref()
            {
                entry.running_counted = true;
                let since = k8s_openapi::jiff::Timestamp::now().duration_since(created.0);
                shared
                    .metrics
                    .pod_create_to_running
                    .observe(since.as_secs_f64().max(0.0));
            }
            shared.writer.status(&entry.pod, desired.clone());
            // Assume it lands, so the next pass compares against it (the watch confirms).
            entry.pod.status = Some(desired);
        }
        // A finished task is released on its device once its outcome is recorded.
        if let Some(attempt) = entry
            .attempt
            .as_mut()
            .filter(|a| terminal(phase_of(a.report.as_ref())) && !a.cancelled)
        {
            for container in entry.pod.spec.iter().flat_map(|s| s.containers.iter()) {
                shared.logs.end(uid, &container.name);
            }
            shared
                .metrics
                .task_completed(phase_of(attempt.report.as_ref()) == TaskPhase::Succeeded);
            cancel(
                &mut self.outbox,
                registry,
                &attempt.device,
                &attempt.task_id,
                0,
                "its outcome is recorded",
            );
            attempt.cancelled = true;
        }
    }
}

fn pod_finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn proto_runtime(runtime: Runtime) -> darkcore_proto::agent::v1::Runtime {
    use darkcore_proto::agent::v1::Runtime as P;
    match runtime {
        Runtime::Process => P::Process,
        Runtime::Oci => P::Oci,
        Runtime::Wasm => P::Wasm,
    }
}

/// The pool's network mode in the agent protocol's words.
fn proto_network(mode: NetworkMode) -> darkcore_proto::agent::v1::Network {
    use darkcore_proto::agent::v1::Network as P;
    match mode {
        NetworkMode::None => P::None,
        NetworkMode::Internet => P::Internet,
        NetworkMode::Host => P::Host,
    }
}

/// Picks a device and sends the task there.
fn place(
    shared: &Shared,
    pool: Option<&DevicePool>,
    entry: &Entry,
    load: &Load,
    outbox: &mut Outbox,
) -> Result<Attempt, String> {
    let pool = pool.ok_or("the pod's pool is not known yet")?;
    let runtime = entry.runtime.ok_or("not admitted yet")?;
    let resolved = entry.resolved.as_ref().ok_or("not resolved yet")?;
    let node_name = entry
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default();
    let node = shared
        .nodes
        .get(&ObjectRef::new(&node_name))
        .ok_or("the pod's node is not known yet")?;
    let os = node
        .labels()
        .get("kubernetes.io/os")
        .cloned()
        .unwrap_or_default();
    let arch = node
        .labels()
        .get("kubernetes.io/arch")
        .cloned()
        .unwrap_or_default();
    // A pod's request is the larger of its init containers' and the sum of its containers'.
    let sum = |f: fn(&darkcore_proto::agent::v1::Resources) -> u64| -> u64 {
        let regular: u64 = resolved
            .containers
            .iter()
            .filter_map(|c| c.resources.as_ref())
            .map(f)
            .sum();
        let init = resolved
            .init_containers
            .iter()
            .filter_map(|c| c.resources.as_ref())
            .map(f)
            .max()
            .unwrap_or(0);
        regular.max(init)
    };
    let proto = proto_runtime(runtime);
    let need = Need {
        millicores: sum(|r| u64::from(r.request_millicores)),
        memory: sum(|r| r.request_memory_bytes),
        runtime: proto as i32,
        runtime_name: runtime.as_str(),
    };
    let candidates: Vec<Candidate> = shared
        .registry
        .offers(&pool.name_any(), &os, &arch)
        .into_iter()
        .map(|(id, offer)| {
            let carried = load.of(&id);
            Candidate {
                id,
                offer_millicores: u64::from(offer.millicores),
                offer_memory: offer.memory_bytes,
                runtimes: offer.runtimes,
                used_millicores: carried.millicores,
                used_memory: carried.memory,
                tasks: carried.tasks,
            }
        })
        .collect();
    let placing = Instant::now();
    let placed = placement::place(&need, &candidates);
    shared
        .metrics
        .placement_duration
        .observe(placing.elapsed().as_secs_f64());
    let device = placed?;
    let number = entry.next_number.max(1);
    let uid = uid_of(&entry.pod);
    let task_id = format!("{uid}.{number}");
    let spec = entry.pod.spec.clone().unwrap_or_default();
    let assign = TaskAssign {
        task_id: task_id.clone(),
        namespace: entry.pod.namespace().unwrap_or_default(),
        pod_name: entry.pod.name_any(),
        pod_uid: uid.clone(),
        runtime: proto as i32,
        init_containers: resolved.init_containers.clone(),
        containers: resolved.containers.clone(),
        volumes: resolved.volumes.clone(),
        restart_policy: match spec.restart_policy.as_deref() {
            Some("Never") => RestartPolicy::Never,
            Some("OnFailure") => RestartPolicy::OnFailure,
            _ => RestartPolicy::Always,
        } as i32,
        termination_grace_seconds: spec.termination_grace_period_seconds.unwrap_or(30).max(0)
            as u32,
        pull_credentials: resolved.pull_credentials.clone(),
        network: proto_network(pool.spec.network) as i32,
    };
    tracing::info!(pod = %format!("{}/{}", assign.namespace, assign.pod_name), task = %task_id, %device, "dispatching");
    shared.logs.assign(&task_id, &device);
    outbox.send(
        &shared.registry,
        &device,
        operator_message::Body::TaskAssign(assign),
    );
    shared.metrics.task_dispatched(runtime.as_str());
    Ok(Attempt {
        number,
        task_id,
        device,
        millicores: need.millicores,
        memory: need.memory,
        report: None,
        cancelled: false,
    })
}

/// Each named object of `api`: `None` when it is not found, or cannot be read (warned).
async fn fetch_named<K>(
    api: &Api<K>,
    names: std::collections::HashSet<String>,
) -> HashMap<String, Option<K>>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut found = HashMap::new();
    for name in names {
        let object = api.get_opt(&name).await.unwrap_or_else(|error| {
            tracing::warn!(%error, %name, kind = %K::kind(&()), "reading an object a pod names");
            None
        });
        found.insert(name, object);
    }
    found
}

/// Fetches the ConfigMaps and Secrets a pod names, then resolves it (off the loop).
async fn resolve_pod(shared: Arc<Shared>, pod: Pod, inbox: mpsc::Sender<Input>) {
    let namespace = pod.namespace().unwrap_or_default();
    let (maps, secrets) = resolve::referenced(&pod);
    let lookups = Lookups {
        config_maps: fetch_named(&Api::namespaced(shared.client.clone(), &namespace), maps).await,
        secrets: fetch_named(&Api::namespaced(shared.client.clone(), &namespace), secrets).await,
    };
    let placement = Placement {
        node_name: pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default(),
        pod_ip: String::new(),
        host_ip: shared.host_ip.clone(),
    };
    let outcome = resolve::resolve(&pod, &lookups, &placement);
    let _ = inbox
        .send(Input::Resolved(uid_of(&pod), Box::new(outcome)))
        .await;
}
