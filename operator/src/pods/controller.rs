//! The pod controller: one task that owns what darkcore knows about the pods on its nodes and
//! moves each along: admit -> resolve -> place -> dispatch -> follow the agent's reports ->
//! write status -> release once the API server holds it; and on deletion, stop the task then delete the pod.
//!
//! Inputs arrive on one channel (pod watches, agent reports, resolutions, a 1 s tick). The
//! decisions use the pure modules beside this one; API calls go to the `Writer`, off the loop.
//! Durable state is the pods themselves: each status records its attempt in the containerID,
//! and agents report what they hold in Hello, so a restarted operator adopts running tasks.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use darkcore_crds::{DevicePool, NetworkMode, Runtime};
use darkcore_proto::agent::v1::{
    OutputWanted, ResultSpec, TaskAssign, TaskCancel, TaskStatus, operator_message,
    task_assign::RestartPolicy,
};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, ResourceExt};
use tokio::sync::mpsc;

use crate::devices::registry::Registry;
use crate::kubelet::PodIndex;
use crate::kubelet::kept_output;
use crate::kubelet::log_store::LogStore;
use crate::pods::admission;
use crate::pods::demand::{demand_of, demand_of_task};
use crate::pods::lifecycle::{
    self, Attempt, Choice, Effect, Event, Facts, LossReason, Ready, Run, Stage, TaskId,
};
use crate::pods::load::{Load, Share};
use crate::pods::orphans::Orphans;
use crate::pods::outbox::Outbox;
use crate::pods::placement::{self, Candidate, Need};
use crate::pods::resolve::{self, Lookups, Placement, Resolved};
use crate::pods::status::{self, Loss, RunView};
use crate::pods::writer::Writer;
use crate::pool::POOL_LABEL;
use crate::usage::attempts::{AttemptBook, Held, lock};
use crate::usage::ledger::LOST_CHARGED_AGAIN_MS;
use crate::usage::recorder::{LostCharge, Ruling, Rulings};
use crate::validation::placement as replica_placement;
use crate::validation::policy::Validation;
use crate::validation::reliability;
use crate::validation::replicas;
use crate::validation::reputation::{self, Plan};
use crate::validation::reputation_store::ReputationStore;
use crate::warmup::Warmup;

/// How soon messages that did not fit an agent's queue are tried again.
pub const OUTBOX_RETRY: Duration = Duration::from_millis(20);

/// How long a pod whose output its device was asked to send again (after a restart or a
/// reconnect) may wait, finished, for that output before its status keeps what arrived.
const OUTPUT_RESEND_WAIT: Duration = Duration::from_secs(10);

pub enum Input {
    PodApplied(Pod),
    PodDeleted(Pod),
    /// A node's pods as first listed (or relisted after a watch gap).
    NodeListed(String, Vec<Pod>),
    /// A device said Hello with the tasks it holds.
    Hello(String, Vec<TaskStatus>),
    /// A device's stream ended: its pods show it silent.
    Detached(String),
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
    /// The containers' readings, dropped with their pods.
    pub stats: Arc<crate::kubelet::stats::StatsStore>,
    /// The pods as the kubelet API serves them.
    pub index: Arc<PodIndex>,
    pub writer: Arc<Writer>,
    /// Until it is over, agents are still reconnecting after an operator start: recorded
    /// attempts are not declared lost, and unrecorded pods are not placed (they may be running).
    pub warmup: Arc<Warmup>,
    /// When this operator started: devices not heard of since are fenced from then on.
    pub started: Instant,
    /// The address published as each node's InternalIP (the pods' hostIP).
    pub host_ip: String,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The operator's record of each attempt, which bounds what devices may charge.
    pub attempts: Arc<Mutex<AttemptBook>>,
    /// Where the charges for attempts lost with their devices, and the judgements of checked
    /// attempts' results, go.
    pub rulings: Rulings,
    /// How far each device's results are trusted, kept durably.
    pub reputations: Arc<ReputationStore>,
}

struct Entry {
    pod: Pod,
    run: Run,
    /// Events already published, so a condition that lasts is reported once.
    announced: HashSet<String>,
    /// When this operator first saw the pod, for the dispatch latency.
    seen_at: Option<Instant>,
    /// Its create-to-Running time is counted once.
    running_counted: bool,
    /// The pod as last read from the API server shows a final phase (`pod.status` may be
    /// one written but not yet confirmed), and keeps its output if it waited for it.
    recorded: bool,
    /// When its device was last asked to send all the output it keeps of the attempt.
    output_wanted: Option<Instant>,
}

impl Entry {
    /// Finished, and waiting for output its device was asked to send again before keeping
    /// it: looked at each second until it is kept.
    fn awaits_output(&self) -> bool {
        self.output_wanted.is_some()
            && self.run.attempt().is_some()
            && pod_finished(&self.pod)
            && !kept_output::present(&self.pod)
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
    orphans: Orphans,
    /// The nodes whose pods have been listed since this operator started.
    listed_nodes: HashSet<String>,
}

fn uid_of(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

/// A run's share of its device's load: its attempt, until it ends.
fn share(run: &Run) -> Option<Share<'_>> {
    run.attempt().filter(|a| a.busy()).map(|a| Share {
        device: &a.device,
        millicores: a.millicores,
        memory: a.memory,
    })
}

/// Charges an attempt lost with its device, which sends no report for it: what it reserved
/// until its device was last heard, unless a charge for it was counted already.
fn charge_loss(shared: &Shared, loss: &Loss) {
    let task = loss.task.to_string();
    let Some((held, record)) = lock(&shared.attempts).lost(&task, loss.at_unix_ms) else {
        return;
    };
    let charge = LostCharge {
        device: loss.device.clone(),
        pool: held.pool,
        record,
    };
    if shared.rulings.send(Ruling::Lost(charge)).is_err() {
        tracing::warn!(%task, "the usage recorder has stopped; a lost attempt goes uncharged");
        shared.metrics.usage_records("dropped", 1);
    }
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
                orphans: Orphans::default(),
                listed_nodes: HashSet::new(),
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
                        .filter(|(_, entry)| {
                            let deleting = entry.pod.metadata.deletion_timestamp.is_some();
                            entry.run.waits_on_time(deleting, |device| registry.presence(device))
                                || entry.awaits_output()
                        })
                        .map(|(uid, _)| uid.clone())
                        .collect();
                    for uid in uids {
                        self.advance(&uid, Event::Look);
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

    /// The tracked load equals a fresh count over every run (debug builds, after each step).
    #[cfg(debug_assertions)]
    fn check_load(&self) {
        let mut counted = Load::default();
        for share in self.pods.values().filter_map(|e| share(&e.run)) {
            counted.add(share);
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
                self.shared.index.mark_listed();
                self.listed_nodes.insert(node);
            }
            Input::Hello(device, tasks) => {
                self.connected(&device, true);
                self.hello(&device, tasks)
            }
            Input::Detached(device) => {
                self.connected(&device, false);
                let on_device: Vec<String> = self
                    .pods
                    .iter()
                    .filter(|(_, e)| e.run.attempt().is_some_and(|a| a.device == device))
                    .map(|(uid, _)| uid.clone())
                    .collect();
                for uid in on_device {
                    self.render(&uid);
                }
            }
            Input::Report(device, report) => self.report(&device, report, false),
            Input::Resolved(uid, outcome) => {
                let (result, warnings) = *outcome;
                let Some(entry) = self.pods.get_mut(&uid) else {
                    return;
                };
                for warning in warnings {
                    if entry
                        .announced
                        .insert(format!("{}:{}", warning.reason, warning.message))
                    {
                        self.shared.writer.event(
                            &entry.pod,
                            warning.warning,
                            warning.reason,
                            warning.message,
                        );
                    }
                }
                let result = result.map(Box::new).map_err(|blocked| blocked.message);
                self.advance(&uid, Event::Resolved(result));
            }
        }
    }

    fn applied(&mut self, pod: Pod) {
        let uid = uid_of(&pod);
        if !self.pods.contains_key(&uid) {
            let mut run = Run::default();
            // A pod darkcore placed before a restart: assume its attempt still runs there
            // until its device says otherwise or stays away.
            let recorded = status::recorded_attempt(&pod)
                .and_then(|(task_id, device)| Some((TaskId::parse(&task_id)?, device)));
            // Its last loss goes on showing, and counting in its restarts.
            run.last_loss = status::recorded_loss(&pod);
            if let Some(loss) = &run.last_loss {
                run.next_number = loss.task.number + 1;
                self.charge_recorded_loss(&pod, loss);
            }
            let dispatched_ms = recorded.as_ref().map(|(task, device)| {
                run.next_number = run.next_number.max(task.number + 1);
                self.book_adopted(&pod, task, device)
            });
            run.stage = match (recorded, dispatched_ms) {
                _ if pod_finished(&pod) => Stage::Finished { attempt: None },
                (Some((task, device)), Some(dispatched_ms)) => {
                    self.shared.logs.assign(&task.to_string(), &device, true);
                    Stage::Dispatched {
                        attempt: Attempt {
                            task,
                            device,
                            millicores: 0,
                            memory: 0,
                            dispatched_ms,
                            report: None,
                            cancelled: false,
                            silent_since_ms: status::silent_since_ms(&pod),
                            deadline_ms: None,
                        },
                        ready: None,
                    }
                }
                _ => Stage::Admitting,
            };
            if let Some(share) = share(&run) {
                self.load.add(share);
                let device = share.device;
                self.shared
                    .registry
                    .carrying(device, self.load.of(device).tasks);
            }
            let entry = Entry {
                pod: pod.clone(),
                run,
                announced: HashSet::new(),
                seen_at: Some(Instant::now()),
                running_counted: false,
                recorded: false,
                output_wanted: None,
            };
            self.pods.insert(uid.clone(), entry);
        }
        self.shared.index.set(&pod);
        if let Some(entry) = self.pods.get_mut(&uid) {
            entry.pod = pod;
            // Released only once the output it waits for is kept: until then the device keeps it.
            entry.recorded = pod_finished(&entry.pod) && !entry.awaits_output();
        }
        self.advance(&uid, Event::Look);
        self.replay_orphans_of(&uid);
    }

    fn book(&self) -> std::sync::MutexGuard<'_, AttemptBook> {
        lock(&self.shared.attempts)
    }

    /// Records an attempt found on a device or in a pod's status after a restart, and returns
    /// when it was sent. That is not known exactly: no later than since when the pod shows it
    /// placed (written by an operator), else its creation (stamped by the API server).
    fn book_adopted(&self, pod: &Pod, task: &TaskId, device: &str) -> i64 {
        let created = pod
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_millisecond());
        let from_ms = match (status::placed_since_ms(pod), created) {
            (Some(placed), Some(created)) => placed.max(created),
            (placed, created) => placed.or(created).unwrap_or_else(crate::domain::unix_ms),
        };
        self.book()
            .began(&task.to_string(), self.held(pod, device, from_ms));
        from_ms
    }

    /// What an attempt of `pod` on `device` since `from_ms` was given, by the operator's
    /// record of the pod.
    fn held(&self, pod: &Pod, device: &str, from_ms: i64) -> Held {
        // The pool is the pod's node's (its device may not have reattached yet).
        let pool = pool_name_of_pod(&self.shared, pod)
            .or_else(|| self.shared.registry.pool(device))
            .unwrap_or_default();
        let namespace = pod.namespace().unwrap_or_default();
        let mut held = Held::begun(device, &pool, &namespace, demand_of(pod), from_ms);
        let pool = pool_of_pod(&self.shared, pod);
        held.checked = validation_of(pod, pool.as_deref()).is_some();
        held
    }

    /// Charges again an attempt lost with its device that a pod's status shows, found after a
    /// restart: the charge made before may not have been written. Its `PoolUsage` object
    /// counts it once.
    fn charge_recorded_loss(&self, pod: &Pod, loss: &Loss) {
        let now = crate::domain::unix_ms();
        let recent = now - loss.at_unix_ms <= LOST_CHARGED_AGAIN_MS;
        if loss.reason != LossReason::DeviceLost || !recent || loss.started_ms <= 0 {
            return;
        }
        // Anyone who may write pod status could write these times: the charge stays within
        // the pod's life (since the API server stamped its creation) and now.
        let created =
            (pod.metadata.creation_timestamp.as_ref()).map_or(now, |t| t.0.as_millisecond());
        let loss = Loss {
            started_ms: loss.started_ms.max(created),
            at_unix_ms: loss.at_unix_ms.min(now),
            ..loss.clone()
        };
        let task = loss.task.to_string();
        let held = self.held(pod, &loss.device, loss.started_ms);
        self.book().began(&task, held);
        charge_loss(&self.shared, &loss);
    }

    fn deleted(&mut self, uid: &str) {
        let Some(entry) = self.pods.remove(uid) else {
            return;
        };
        if let Some(attempt) = entry.run.attempt() {
            self.book()
                .ended(&attempt.task.to_string(), crate::domain::unix_ms(), false);
        }
        self.shared.index.remove(&entry.pod);
        if let Some(share) = share(&entry.run) {
            self.load.remove(share);
            let device = share.device;
            self.shared
                .registry
                .carrying(device, self.load.of(device).tasks);
        }
        if let Some(attempt) = entry.run.attempt().filter(|a| !a.cancelled || a.busy()) {
            cancel(
                &mut self.outbox,
                &self.shared.registry,
                &attempt.device,
                &attempt.task.to_string(),
                0,
                "the pod was deleted",
            );
        }
        self.shared.logs.forget(uid);
        self.shared.stats.forget_pod(uid);
    }

    /// A device's stream began or ended: its reliability counts the stretch before.
    fn connected(&self, device: &str, online: bool) {
        if let Some(pool) = self.shared.registry.pool(device) {
            (self.shared.reputations).seen(&pool, device, online, Instant::now());
        }
    }

    /// A device's Hello lists what it holds: adopt what we expect there, stop the rest, and
    /// count what it no longer has as lost.
    fn hello(&mut self, device: &str, tasks: Vec<TaskStatus>) {
        let held: HashSet<&str> = tasks.iter().map(|t| t.task_id.as_str()).collect();
        let missing: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, e)| {
                e.run.attempt().is_some_and(|a| {
                    a.device == device && !held.contains(a.task.to_string().as_str())
                })
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in missing {
            let message = format!("device {device} restarted without the task");
            self.advance(&uid, Event::Lost(LossReason::DeviceLost, message));
        }
        for task in tasks {
            self.report(device, task, true);
        }
        // Its tasks are known now: one fewer device the warm-up waits for.
        self.shared.warmup.heard(device);
    }

    /// `resend`: the report may follow a gap in what this operator heard of the device (a
    /// restart, a reconnect), so the device is asked for all the output it keeps of the
    /// attempt, once the attempt is recorded (none of it is then refused; the log store skips
    /// by offset what it has).
    fn report(&mut self, device: &str, report: TaskStatus, resend: bool) {
        let Some(task) = TaskId::parse(&report.task_id) else {
            // Never a task of this operator: counted, not answered (a device flooding garbage
            // ids must not fill its own queue with our replies).
            tracing::debug!(%device, task = %report.task_id, "a report for a task id no operator makes");
            self.shared.metrics.frame_rejected("report_bad_task_id");
            return;
        };
        // Only a device of the pod's own pool may claim a task this operator did not record.
        let same_pool = match (self.pool_of(&task.uid), self.shared.registry.pool(device)) {
            (Some(pool), Some(joined)) => pool.name_any() == joined,
            _ => false,
        };
        let Some(entry) = self.pods.get(&task.uid) else {
            // Until warm, a report may name a pod not listed yet; once warm, its pod is gone.
            // Held within bounds: beyond, a device's reports are refused, counted.
            if !self.orphans.hold(&task.uid, device, report) {
                self.shared.metrics.frame_rejected("report_unknown_pod");
            }
            return;
        };
        let current = entry
            .run
            .attempt()
            .is_some_and(|a| a.task == task && a.device == device);
        let adoptable = same_pool && !pod_finished(&entry.pod) && entry.run.adopts(task.number);
        let uid = task.uid.clone();
        match (current, adoptable) {
            (true, _) => {
                // Restarts on the device open runs before they print, for `logs --previous`.
                for container in report.init_containers.iter().chain(&report.containers) {
                    let (name, run) = (&container.name, container.restart_count);
                    self.shared.logs.started(&report.task_id, name, run);
                }
                if resend {
                    self.want_output(&uid, device, &report.task_id);
                }
                self.advance(&uid, Event::Report(report))
            }
            (false, true) => {
                // A running task this operator did not know about (it restarted before recording
                // the attempt): adopt it rather than run the pod twice.
                tracing::info!(%uid, task = %report.task_id, %device, "adopting a task its device still runs");
                self.shared.logs.assign(&report.task_id, device, true);
                let dispatched_ms = self.book_adopted(&entry.pod.clone(), &task, device);
                let attempt = Attempt {
                    task,
                    device: device.to_string(),
                    millicores: 0,
                    memory: 0,
                    dispatched_ms,
                    report: Some(report),
                    cancelled: false,
                    silent_since_ms: None,
                    deadline_ms: None,
                };
                if resend {
                    self.want_output(&uid, device, &attempt.task.to_string());
                }
                self.advance(&uid, Event::Adopt(attempt));
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
            }
        }
    }

    /// Reports held for a pod that was not listed yet, now that it is: in the order they came,
    /// before any newer report of its task.
    fn replay_orphans_of(&mut self, uid: &str) {
        if self.orphans.is_empty() {
            return;
        }
        for (device, report) in self.orphans.take(uid) {
            self.report(&device, report, true);
        }
    }

    /// Asks `device` for all the output it keeps of `task_id`, an attempt of the pod `uid`
    /// its log store holds: what went with a restart of this operator, or was in flight when
    /// the device's connection broke. The pod, once finished, waits a while for it.
    fn want_output(&mut self, uid: &str, device: &str, task_id: &str) {
        if let Some(entry) = self.pods.get_mut(uid) {
            entry.output_wanted = Some(Instant::now());
        }
        self.outbox.send(
            &self.shared.registry,
            device,
            operator_message::Body::OutputWanted(OutputWanted {
                task_id: task_id.to_string(),
            }),
        );
    }

    /// Orphan reports whose pods are still unknown once warm and once their device's node has
    /// been listed: their pods are gone. (A warm-up can end, all devices back, before the
    /// pods are listed: those reports wait.)
    fn settle_orphans(&mut self) {
        if self.orphans.is_empty() || !self.shared.warmup.is_over() {
            return;
        }
        let (registry, listed_nodes) = (&self.shared.registry, &self.listed_nodes);
        let gone = self.orphans.settle(|device| {
            registry
                .node_of(device)
                .is_none_or(|node| listed_nodes.contains(&node))
        });
        for (device, report) in gone {
            cancel(
                &mut self.outbox,
                &self.shared.registry,
                &device,
                &report.task_id,
                0,
                "its pod no longer exists",
            );
        }
    }

    fn pool_of(&self, uid: &str) -> Option<Arc<DevicePool>> {
        pool_of_pod(&self.shared, &self.pods.get(uid)?.pod)
    }

    /// Steps the pod's run by `event` with the facts of now, carries out the effects, and
    /// writes its status when it changed.
    fn advance(&mut self, uid: &str, event: Event) {
        let pool = self.pool_of(uid);
        let shared = self.shared.clone();
        let Some(entry) = self.pods.get_mut(uid) else {
            return;
        };
        let run = std::mem::take(&mut entry.run);
        let carrier = share(&run).map(|share| share.device.to_string());
        if let Some(share) = share(&run) {
            self.load.remove(share);
        }
        let load = &self.load;
        let pod = &entry.pod;
        let presence = |device: &str| shared.registry.presence(device);
        let choose = |ready: &Ready, ran: &[String], reissued: bool| {
            let placing = Placing { ran, reissued };
            choose(&shared, pool.as_deref(), pod, ready, load, placing)
        };
        let validation = validation_of(pod, pool.as_deref());
        let alone = |device: &str| {
            let (pool, reputations) = (pool.as_deref()?, &shared.reputations);
            let policy = &pool.spec.validation.adaptive;
            let standing = reputations.standing(&pool.name_any(), device, policy);
            let plan = reputation::plan(standing, policy, percent_draw());
            (plan == Plan::Alone).then_some(policy.spot_check_percent)
        };
        let admission = || {
            let pool = pool.as_ref()?;
            Some(admission::admit(&pool.name_any(), &pool.spec, pod))
        };
        let now = Instant::now();
        let facts = Facts {
            uid,
            now,
            unix_ms: crate::domain::unix_ms(),
            warm: shared
                .warmup
                .places_unrecorded(now, fence_wait(pool.as_deref())),
            deleting: pod.metadata.deletion_timestamp.as_ref().map(|_| {
                pod.metadata
                    .deletion_grace_period_seconds
                    .unwrap_or(30)
                    .max(0) as u32
            }),
            recorded: entry.recorded,
            admission: &admission,
            started: shared.started,
            fence_wait: fence_wait(pool.as_deref()),
            max_redispatches: pool
                .as_ref()
                .map_or(darkcore_crds::device_pool::DEFAULT_MAX_REDISPATCHES, |p| {
                    p.spec.max_redispatches
                }),
            presence: &presence,
            choose: &choose,
            validation: validation.as_ref(),
            alone: &alone,
        };
        let (run, effects) = lifecycle::step(run, event, &facts);
        if let Some(share) = share(&run) {
            self.load.add(share);
        }
        // The pool shows which devices carry tasks: tell the registry when that moves.
        let now_carrier = share(&run).map(|share| share.device);
        if carrier.as_deref() != now_carrier {
            for device in carrier.as_deref().into_iter().chain(now_carrier) {
                shared.registry.carrying(device, self.load.of(device).tasks);
            }
        }
        entry.run = run;
        for effect in effects {
            self.execute(uid, pool.as_deref(), effect);
        }
        self.render(uid);
    }

    fn execute(&mut self, uid: &str, pool: Option<&DevicePool>, effect: Effect) {
        let shared = self.shared.clone();
        let Some(entry) = self.pods.get_mut(uid) else {
            return;
        };
        match effect {
            Effect::Resolve => {
                tokio::spawn(resolve_pod(
                    shared.clone(),
                    entry.pod.clone(),
                    self.inbox.clone(),
                ));
            }
            Effect::Assign => {
                let Stage::Dispatched {
                    attempt,
                    ready: Some(ready),
                } = &entry.run.stage
                else {
                    return;
                };
                let network = pool.map_or(NetworkMode::default(), |p| p.spec.network);
                let mut assign = assignment(&entry.pod, ready, attempt, network);
                assign.result = validation_of(&entry.pod, pool).map(|v| ResultSpec {
                    paths: v.result_paths,
                    stdout: v.stdout,
                });
                let demand = demand_of_task(&assign.containers, &assign.init_containers);
                let pool_name = pool.map(|p| p.name_any()).unwrap_or_default();
                let (device, namespace) = (&attempt.device, &assign.namespace);
                let mut held =
                    Held::begun(device, &pool_name, namespace, demand, attempt.dispatched_ms);
                held.checked = assign.result.is_some();
                lock(&shared.attempts).began(&assign.task_id, held);
                if let Some(seen) = entry.seen_at.take() {
                    shared
                        .metrics
                        .dispatch_latency
                        .observe(seen.elapsed().as_secs_f64());
                }
                tracing::info!(pod = %format!("{}/{}", assign.namespace, assign.pod_name), task = %assign.task_id, device = %attempt.device, "dispatching");
                shared.logs.assign(&assign.task_id, &attempt.device, false);
                shared.metrics.task_dispatched(ready.runtime.as_str());
                self.outbox.send(
                    &shared.registry,
                    &attempt.device,
                    operator_message::Body::TaskAssign(assign),
                );
            }
            Effect::Cancel {
                device,
                task,
                grace,
                reason,
            } => cancel(
                &mut self.outbox,
                &shared.registry,
                &device,
                &task.to_string(),
                grace,
                reason,
            ),
            Effect::Warn {
                reason,
                message,
                once,
            } => {
                if !once || entry.announced.insert(format!("{reason}:{message}")) {
                    shared.writer.event(&entry.pod, true, &reason, message);
                }
            }
            Effect::Inform { reason, message } => {
                shared.writer.event(&entry.pod, false, &reason, message);
            }
            Effect::Decided(verdict) => shared.metrics.verdict(verdict),
            Effect::Credit(standings) => {
                for (number, standing) in standings {
                    let task = TaskId {
                        uid: uid.to_string(),
                        number,
                    };
                    // Filed pending already: the recorder moves it.
                    let Some(judged) = lock(&shared.attempts).judge(&task.to_string(), standing)
                    else {
                        continue;
                    };
                    if shared.rulings.send(Ruling::Judged(judged)).is_err() {
                        tracing::warn!(%task, "the usage recorder has stopped; a judged result stays pending");
                    }
                }
            }
            Effect::Judged {
                agreeing,
                disagreeing,
            } => {
                let Some(pool) = pool else { return };
                let (name, policy) = (pool.name_any(), &pool.spec.validation.adaptive);
                let judged = shared
                    .reputations
                    .judge(&name, &agreeing, &disagreeing, policy);
                for (device, why) in judged.quarantined {
                    tracing::warn!(%device, pool = %name, %why, "device quarantined");
                    shared.metrics.device_quarantined();
                    shared.registry.quarantine(&device, &name, &why, true);
                }
            }
            Effect::ReplicaFinished(task) => {
                tracing::info!(%uid, task = %task, "a replica's result is recorded");
                ran_to_its_end(&shared, uid, &entry.pod, Some(&task));
            }
            Effect::Redispatched(loss) => {
                tracing::info!(%uid, reason = loss.reason.as_str(), "attempt lost; the task runs again elsewhere");
                shared.metrics.task_redispatched(loss.reason.as_str());
                if loss.reason != LossReason::DeviceLost {
                    // Its device handed it back, and charges it itself.
                    lock(&shared.attempts).ended(&loss.task.to_string(), loss.at_unix_ms, false);
                } else {
                    charge_loss(&shared, &loss);
                }
            }
            Effect::Completed { succeeded } => {
                let task = entry.run.attempt().map(|a| &a.task);
                ran_to_its_end(&shared, uid, &entry.pod, task);
                shared.metrics.task_completed(succeeded);
            }
            Effect::Delete => {
                tracing::info!(pod = %format!("{}/{}", entry.pod.namespace().unwrap_or_default(), entry.pod.name_any()), "the pod's task has stopped; deleting the pod");
                shared.writer.delete(&entry.pod);
            }
        }
    }

    /// Writes the pod's status when what darkcore knows differs from what it shows.
    fn render(&mut self, uid: &str) {
        let pool = self.pool_of(uid);
        let shared = &self.shared;
        let Some(entry) = self.pods.get_mut(uid) else {
            return;
        };
        let run = &entry.run;
        let settled = pod_finished(&entry.pod) && run.attempt().is_none_or(|a| a.cancelled);
        if !run.shows_status() || settled {
            return;
        }
        let attempt = run.attempt();
        // An attempt the status already records that its device has not reported yet (found
        // after a restart): nothing new to show, and what it shows stays as evidence.
        let unreported = attempt.is_some_and(|a| {
            a.report.is_none()
                && status::recorded_attempt(&entry.pod)
                    .is_some_and(|(task, device)| task == a.task.to_string() && device == a.device)
        });
        if unreported {
            return;
        }
        let silent_since_ms = attempt
            .and_then(|a| shared.registry.silent_since(&a.device))
            .map(|heard| {
                let ago = i64::try_from(heard.elapsed().as_millis()).unwrap_or(i64::MAX);
                crate::domain::unix_ms().saturating_sub(ago)
            });
        let validation = validation_of(&entry.pod, pool.as_deref());
        let mut report = attempt.and_then(|a| a.report.clone());
        if validation.is_some() && run.replicas.verdict.is_none() {
            report = report.map(replicas::while_undecided);
        }
        let view = RunView {
            attempt: attempt.map(|a| (a.task.number, a.device.clone(), a.task.to_string())),
            placed_at_ms: attempt.map(|a| a.dispatched_ms),
            report,
            last_loss: run.last_loss.clone(),
            unplaced: match &run.stage {
                Stage::Unplaced { why: Some(why), .. } => {
                    Some(("NoDeviceFits".into(), why.clone()))
                }
                _ => None,
            },
            config_error: match &run.stage {
                Stage::Resolving {
                    blocked: Some(blocked),
                    ..
                } => Some(blocked.message.clone()),
                _ => None,
            },
            failed: match &run.stage {
                Stage::Failed { reason, message } => Some((reason.clone(), message.clone())),
                _ => None,
            },
            kept_output: None,
            silent_since_ms,
            pod_ip: attempt.and_then(|a| shared.registry.address(&a.device)),
            host_ip: Some(shared.host_ip.clone()),
            log_tails: log_tails(
                &entry.pod,
                attempt.and_then(|a| a.report.as_ref()),
                &shared.logs,
            ),
            validated: validated(run, validation),
        };
        let desired = status::render(
            &entry.pod,
            &RunView {
                kept_output: kept_output(&entry.pod, &view, &shared.logs, entry.output_wanted),
                ..view
            },
            &Time(k8s_openapi::jiff::Timestamp::now()),
        );
        if !status::differs(&entry.pod, &desired) {
            return;
        }
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
}

/// How long after a device was last heard its tasks may run elsewhere: the pool's fence, by
/// when the device has stopped them itself, and the margin for their stop grace.
fn fence_wait(pool: Option<&DevicePool>) -> Duration {
    use darkcore_crds::device_pool::{DEFAULT_FENCE_SECONDS, FENCE_MARGIN_SECONDS};
    let fence = pool.map_or(DEFAULT_FENCE_SECONDS, |p| p.spec.fence_seconds);
    Duration::from_secs(u64::from(fence) + u64::from(FENCE_MARGIN_SECONDS))
}

/// The output a pod about to show its final phase keeps on itself (see `kept_output`), for
/// `kubectl logs` after a restart; once kept, it stays as it is. While output its device was
/// asked to send again (`wanted`, when) may still come, and some is missing, none is kept yet.
fn kept_output(
    pod: &Pod,
    view: &RunView,
    logs: &LogStore,
    wanted: Option<Instant>,
) -> Option<String> {
    let finishing = matches!(status::phase_word(view), "Succeeded" | "Failed");
    if !finishing || view.attempt.is_none() || kept_output::present(pod) {
        return None;
    }
    let names = pod.spec.iter().flat_map(|s| {
        s.init_containers
            .iter()
            .flatten()
            .chain(&s.containers)
            .map(|c| c.name.as_str())
    });
    let kept = logs.keep(&uid_of(pod), names);
    let may_come = wanted.is_some_and(|at| at.elapsed() < OUTPUT_RESEND_WAIT);
    if may_come && kept.values().any(|k| !k.whole) {
        return None;
    }
    Some(kept_output::encode(&kept))
}

/// The ends of output that failed containers asking for them get as termination messages.
fn log_tails(
    pod: &Pod,
    report: Option<&TaskStatus>,
    logs: &LogStore,
) -> std::collections::BTreeMap<String, String> {
    let (Some(spec), Some(report)) = (pod.spec.as_ref(), report) else {
        return Default::default();
    };
    let uid = uid_of(pod);
    let specs = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers);
    let reported: Vec<_> = report
        .init_containers
        .iter()
        .chain(&report.containers)
        .collect();
    specs
        .filter(|spec| {
            reported
                .iter()
                .any(|r| r.name == spec.name && status::wants_log_tail(spec, r))
        })
        .filter_map(|spec| Some((spec.name.clone(), logs.tail(&uid, &spec.name)?)))
        .collect()
}

fn pod_finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
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

/// What the lifecycle asks of a placement: the devices to pass over, and whether the replica
/// is reissued after a disagreement (it goes to reliable devices first).
struct Placing<'a> {
    ran: &'a [String],
    reissued: bool,
}

/// Picks a device for a ready pod, over the load devices carry: the device and what it grants.
fn choose(
    shared: &Shared,
    pool: Option<&DevicePool>,
    pod: &Pod,
    ready: &Ready,
    load: &Load,
    Placing { ran, reissued }: Placing<'_>,
) -> Result<Choice, String> {
    let pool = pool.ok_or("the pod's pool is not known yet")?;
    let resolved = &ready.resolved;
    let node_name = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default();
    let node = shared
        .nodes
        .get(&ObjectRef::new(&node_name))
        .ok_or("the pod's node is not known yet")?;
    let label = |key: &str| node.labels().get(key).cloned().unwrap_or_default();
    let (os, arch) = (label("kubernetes.io/os"), label("kubernetes.io/arch"));
    let demand = demand_of_task(&resolved.containers, &resolved.init_containers);
    let need = Need {
        millicores: demand.millicores,
        memory: demand.memory,
        runtime: proto_runtime(ready.runtime) as i32,
        runtime_name: ready.runtime.as_str(),
        prefer_reliable: reissued,
    };
    let now = Instant::now();
    let offers = shared.registry.offers(&pool.name_any(), &os, &arch);
    let online = offers.len();
    // A replica goes to neither a device nor an owner that ran one of this pod.
    let owners: Vec<(String, Option<String>)> = ran
        .iter()
        .map(|d| (d.clone(), shared.registry.owner(d)))
        .collect();
    let taken: Vec<_> = owners
        .iter()
        .map(|(device, owner)| replica_placement::Candidate {
            device,
            owner: owner.as_deref(),
            os: &os,
            arch: &arch,
        })
        .collect();
    let homogeneous = pool.spec.validation.homogeneous;
    let candidates: Vec<Candidate> = offers
        .into_iter()
        .filter(|(id, _)| {
            let owner = (!taken.is_empty())
                .then(|| shared.registry.owner(id))
                .flatten();
            let candidate = replica_placement::Candidate {
                device: id,
                owner: owner.as_deref(),
                os: &os,
                arch: &arch,
            };
            replica_placement::may_take(&candidate, &taken, homogeneous)
        })
        .map(|(id, offer)| {
            let carried = load.of(&id);
            let reliability = shared.reputations.reliability(&pool.name_any(), &id, now);
            Candidate {
                id,
                offer_millicores: u64::from(offer.millicores),
                offer_memory: offer.memory_bytes,
                runtimes: offer.runtimes,
                used_millicores: carried.millicores,
                used_memory: carried.memory,
                tasks: carried.tasks,
                reliability_ppm: reliability::for_placement(reliability),
            }
        })
        .collect();
    if candidates.is_empty() && online > 0 {
        let ran: Vec<String> = owners
            .iter()
            .map(|(d, o)| {
                o.as_ref()
                    .map_or(d.clone(), |o| format!("{d} of owner {o}"))
            })
            .collect();
        return Err(format!(
            "each of the {online} devices online for {os}/{arch} ran a replica of this pod or belongs to an owner who did ({}): its next replica waits for another device of another owner",
            ran.join(", ")
        ));
    }
    let placing = Instant::now();
    let placed = placement::place(&need, &candidates);
    shared
        .metrics
        .placement_duration
        .observe(placing.elapsed().as_secs_f64());
    Ok(Choice {
        device: placed?,
        millicores: need.millicores,
        memory: need.memory,
    })
}

/// The task message for an attempt of a ready pod.
fn assignment(pod: &Pod, ready: &Ready, attempt: &Attempt, network: NetworkMode) -> TaskAssign {
    let resolved = &ready.resolved;
    let spec = pod.spec.clone().unwrap_or_default();
    TaskAssign {
        task_id: attempt.task.to_string(),
        namespace: pod.namespace().unwrap_or_default(),
        pod_name: pod.name_any(),
        pod_uid: attempt.task.uid.clone(),
        runtime: proto_runtime(ready.runtime) as i32,
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
        network: proto_network(network) as i32,
        result: None,
    }
}

/// An attempt ran to its own end on its device: its record in the attempt book closes, and
/// followers of its containers' output see the end.
fn ran_to_its_end(shared: &Shared, uid: &str, pod: &Pod, task: Option<&TaskId>) {
    if let Some(task) = task {
        lock(&shared.attempts).ended(&task.to_string(), crate::domain::unix_ms(), true);
    }
    for container in pod.spec.iter().flat_map(|s| s.containers.iter()) {
        shared.logs.end(uid, &container.name);
    }
}

/// A number drawn uniformly in [0, 100) from the system's randomness, for spot checks: a
/// device cannot predict it.
fn percent_draw() -> f64 {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 4];
    // Without randomness, check: a spot check too many costs only a replica.
    match ring::rand::SystemRandom::new().fill(&mut bytes) {
        Ok(()) => f64::from(u32::from_le_bytes(bytes) % 10_000) / 100.0,
        Err(_) => 0.0,
    }
}

/// A checked pod's `darkcore.io/Validated` condition, once it is past admission.
fn validated(
    run: &Run,
    validation: Option<Validation>,
) -> Option<(&'static str, &'static str, String)> {
    let validation = validation?;
    let running = match &run.stage {
        Stage::Dispatched { attempt, .. } => Some((attempt.task.number, attempt.device.as_str())),
        Stage::Unplaced { .. } => None,
        Stage::Failed { .. } | Stage::Finished { .. } if run.replicas.verdict.is_some() => None,
        _ => return None,
    };
    Some(run.replicas.condition(&validation, running))
}

/// How the pod's results are checked, if they are (a pod whose annotations are refused is
/// failed at admission, so here it counts as unchecked).
fn validation_of(pod: &Pod, pool: Option<&DevicePool>) -> Option<Validation> {
    crate::validation::policy::of(pod, &pool?.spec.validation)
        .ok()
        .flatten()
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

/// The name of the pool whose node the pod is bound to (known even once the pool is gone).
fn pool_name_of_pod(shared: &Shared, pod: &Pod) -> Option<String> {
    let node = shared
        .nodes
        .get(&ObjectRef::new(pod.spec.as_ref()?.node_name.as_deref()?))?;
    node.labels().get(POOL_LABEL).cloned()
}

/// The pool whose node the pod is bound to.
fn pool_of_pod(shared: &Shared, pod: &Pod) -> Option<Arc<DevicePool>> {
    shared
        .pools
        .get(&ObjectRef::new(&pool_name_of_pod(shared, pod)?))
}

/// Fetches the ConfigMaps and Secrets a pod names, then resolves it (off the loop).
async fn resolve_pod(shared: Arc<Shared>, pod: Pod, inbox: mpsc::Sender<Input>) {
    let namespace = pod.namespace().unwrap_or_default();
    let (maps, secrets) = resolve::referenced(&pod);
    // The pod's pool, by its node: which Secrets its devices may have (none when unknown).
    let pool = pool_of_pod(&shared, &pod);
    let lookups = Lookups {
        config_maps: fetch_named(&Api::namespaced(shared.client.clone(), &namespace), maps).await,
        secrets: fetch_named(&Api::namespaced(shared.client.clone(), &namespace), secrets).await,
        pool: pool.as_ref().map(|p| p.name_any()).unwrap_or_default(),
        secret_policy: pool.map(|p| p.spec.secrets.clone()).unwrap_or_default(),
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
