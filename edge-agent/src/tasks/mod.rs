//! Tasks on this device: the operator assigns pods' containers as tasks, the agent runs them
//! in a runtime and reports their status and output. Tasks outlive gateway connections: a
//! reconnecting agent reports them in Hello, so the operator adopts them instead of rerunning.
//!
//! `TaskManager` takes assignments, cancellations and preemptions; each task is run by its
//! own `Supervisor`; both report to the `Board`, which `Reports` drains onto the stream.

pub mod disk;
pub mod enter;
pub mod fault;
pub mod lifecycle;
pub mod mounts;
pub mod oci;
pub mod output;
pub mod process;
pub mod result;
pub mod runtime;
pub mod stats;
pub mod supervise;
pub mod wasm;
pub mod workdir;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use darkcore_proto::agent::v1::{
    LogChunk, Runtime as RuntimeKind, TaskAssign, TaskPhase, TaskStatus, UsageRecords,
    agent_message,
};
use tokio::sync::{Notify, watch};

use crate::tasks::fault::Fault;
use crate::tasks::output::OutputBook;
use crate::tasks::runtime::Runtime;
use crate::tasks::supervise::{Stop, StopCause, Supervisor};
use crate::usage::{Ledger, Run};

/// A fenced task's grace period: within the margin the operator waits past the fence.
const FENCE_GRACE: Duration = Duration::from_secs(5);

/// An evicted task's grace period: the kubelet's least, for a hard eviction threshold.
const EVICTION_GRACE: Duration = Duration::from_secs(2);

struct Entry {
    status: TaskStatus,
    stop: watch::Sender<Option<Stop>>,
    finished: bool,
    /// The operator released it: forget it once it has stopped.
    released: bool,
    /// Its emptyDirs with their `sizeLimit`s, for the disk watch.
    volume_limits: Vec<(String, u64)>,
}

impl Entry {
    /// Stops the task with `stop`, unless it is stopping already (the first reason stands).
    fn stop_unless_stopping(&self, stop: impl FnOnce() -> Stop) -> bool {
        self.stop.send_if_modified(|current| {
            let unset = current.is_none();
            if unset {
                *current = Some(stop());
            }
            unset
        })
    }
}

/// Where tasks report: the latest status of each (marked dirty until sent) and their output.
pub struct Board {
    entries: Mutex<HashMap<String, Entry>>,
    dirty: Mutex<BTreeSet<String>>,
    notify: Notify,
    /// Tasks' output, kept until they are released (see `output`).
    output: Mutex<OutputBook>,
    tasks_root: PathBuf,
    /// Where each run is charged when it ends.
    pub usage: Arc<Ledger>,
    /// What each running container uses now.
    pub meters: stats::Meters,
    /// How to exec into each running container.
    pub entrances: enter::Entrances,
    /// The lie this agent tells about results, in its test-only fault mode.
    fault: Option<Fault>,
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Board {
    /// A task's status changed.
    pub fn report(&self, status: TaskStatus) {
        let id = status.task_id.clone();
        {
            let mut entries = lock(&self.entries);
            match entries.get_mut(&id) {
                Some(entry) => entry.status = status,
                None => return,
            }
        }
        lock(&self.dirty).insert(id);
        self.notify.notify_one();
    }

    /// A task wrote output: kept, and sent when the stream has room.
    pub fn log(&self, chunk: LogChunk) {
        lock(&self.output).push(chunk);
        self.notify.notify_one();
    }

    /// The operator wants the task's output again (it adopted the task after a restart, or
    /// the device reattached): all that is kept goes again.
    pub fn resend_output(&self, task_id: &str) {
        lock(&self.output).resend(task_id);
        self.notify.notify_one();
    }

    /// A run ended: charge it, and send the record.
    pub fn charge(&self, run: Run) {
        self.usage.charge(run);
        self.notify.notify_one();
    }

    /// A task's supervisor ended. A released task is forgotten once its final status is
    /// sent, so the operator learns that it stopped. An evicted one gives its disk back now.
    pub fn finished(&self, task_id: &str) {
        let (released, evicted) = {
            let mut entries = lock(&self.entries);
            match entries.get_mut(task_id) {
                Some(entry) => {
                    entry.finished = true;
                    let evicted = matches!(
                        entry.stop.borrow().as_ref().map(|s| &s.cause),
                        Some(StopCause::Evicted(_))
                    );
                    (entry.released, evicted)
                }
                None => (false, false),
            }
        };
        if evicted {
            workdir::remove(&self.tasks_root, task_id);
        }
        if released {
            lock(&self.dirty).insert(task_id.to_string());
            self.notify.notify_one();
        }
    }

    /// Measures what every task holds on disk, against the `room` the owner's `max_disk`
    /// leaves beside the image cache, and evicts whom `disk::evictions` names.
    fn check_disk(&self, room: u64) {
        let watched: Vec<disk::Watched> = lock(&self.entries)
            .iter()
            .map(|(id, e)| disk::Watched {
                task_id: id.clone(),
                volume_limits: e.volume_limits.clone(),
                running: !e.finished,
            })
            .collect();
        let held: Vec<disk::Held> = watched
            .iter()
            .map(|task| disk::measure(task, &self.tasks_root, room.saturating_add(1)))
            .collect();
        for eviction in disk::evictions(&held, room) {
            tracing::warn!(task = %eviction.task_id, message = %eviction.message, "evicting the task");
            if let Some(entry) = lock(&self.entries).get(&eviction.task_id) {
                entry.stop_unless_stopping(|| Stop {
                    grace: EVICTION_GRACE,
                    cause: StopCause::Evicted(eviction.message.clone()),
                });
            }
        }
    }

    /// Stops every running task not stopping already within `grace`; each ends Preempted.
    fn preempt_all(&self, grace: Duration, reason: &str) {
        let entries = lock(&self.entries);
        for (id, entry) in entries.iter().filter(|(_, e)| !e.finished) {
            let stopped = entry.stop_unless_stopping(|| Stop {
                grace,
                cause: StopCause::Preempted(reason.into()),
            });
            if stopped {
                tracing::info!(task = %id, %reason, "stopping the task here: it is to run elsewhere");
            }
        }
    }

    fn forget(&self, task_id: &str) {
        lock(&self.entries).remove(task_id);
        lock(&self.output).forget(task_id);
        lock(&self.dirty).remove(task_id);
        workdir::remove(&self.tasks_root, task_id);
    }

    fn take_dirty(&self) -> Option<TaskStatus> {
        let id = lock(&self.dirty).pop_first()?;
        let (status, done) = {
            let entries = lock(&self.entries);
            let entry = entries.get(&id)?;
            (entry.status.clone(), entry.finished && entry.released)
        };
        if done {
            self.forget(&id);
        }
        let mut status = status;
        if let Some(fault) = self.fault {
            fault.corrupt(&mut status);
        }
        Some(status)
    }
}

/// What the session sends next: task statuses and log chunks as they come.
pub struct Reports {
    board: Arc<Board>,
}

impl Reports {
    /// The next message for the gateway. Output goes first, so that a container's last lines
    /// reach the operator before the status that says it ended.
    pub async fn next(&mut self) -> agent_message::Body {
        loop {
            // Taken before the wait is armed: output kept meanwhile wakes it (notify_one
            // keeps a permit).
            if let Some(chunk) = lock(&self.board.output).next_unsent() {
                return agent_message::Body::LogChunk(chunk);
            }
            if let Some(status) = self.board.take_dirty() {
                return agent_message::Body::TaskStatus(status);
            }
            let records = self.board.usage.unsent();
            if !records.is_empty() {
                return agent_message::Body::UsageRecords(UsageRecords { records });
            }
            self.board.notify.notified().await;
        }
    }
}

/// The tasks this device holds.
pub struct TaskManager {
    board: Arc<Board>,
    runtimes: Vec<(RuntimeKind, Arc<dyn Runtime>)>,
    /// Users' exec streams open now, over every session.
    streams: crate::streams::OpenStreams,
}

impl TaskManager {
    /// Tasks keep their directories under `tasks_root`; `runtimes` are the ones installed;
    /// each run is charged to `usage`. `fault` is for tests only (see `fault`).
    pub fn new(
        tasks_root: PathBuf,
        runtimes: Vec<(RuntimeKind, Arc<dyn Runtime>)>,
        usage: Arc<Ledger>,
        fault: Option<Fault>,
    ) -> (TaskManager, Reports) {
        let board = Arc::new(Board {
            entries: Mutex::default(),
            dirty: Mutex::default(),
            notify: Notify::new(),
            output: Mutex::default(),
            tasks_root,
            usage,
            meters: stats::Meters::default(),
            entrances: enter::Entrances::default(),
            fault,
        });
        (
            TaskManager {
                board: board.clone(),
                runtimes,
                streams: Default::default(),
            },
            Reports { board },
        )
    }

    /// Starts a task, unless it is already here (a re-sent assignment): then its status is
    /// reported again. `refusal` is why the device cannot take work now, if it cannot.
    pub fn assign(&self, task: TaskAssign, refusal: Option<String>) {
        let id = task.task_id.clone();
        if lock(&self.board.entries).contains_key(&id) {
            lock(&self.board.dirty).insert(id);
            self.board.notify.notify_one();
            return;
        }
        let runtime = RuntimeKind::try_from(task.runtime).unwrap_or(RuntimeKind::Unspecified);
        let found = self
            .runtimes
            .iter()
            .find(|(kind, _)| *kind == runtime)
            .map(|(_, r)| r.clone());
        let (stop_tx, stop) = watch::channel(None);
        let mut status = TaskStatus {
            task_id: id.clone(),
            phase: TaskPhase::Pending as i32,
            ..Default::default()
        };
        let refused = match (&found, refusal) {
            (_, Some(reason)) => Some(("OwnerBusy", reason)),
            (None, None) => Some((
                "RuntimeUnavailable",
                format!(
                    "runtime {} is not installed on this device",
                    runtime.as_str_name()
                ),
            )),
            _ => None,
        };
        let prepared = match refused {
            Some(_) => None,
            None => Some(workdir::prepare(&self.board.tasks_root, &id, &task.volumes)),
        };
        match (&refused, &prepared) {
            (Some((reason, message)), _) => {
                status.phase = TaskPhase::Preempted as i32;
                status.reason = (*reason).into();
                status.message = message.clone();
            }
            (None, Some(Err(workdir::WorkdirError::Invalid(message)))) => {
                status.phase = TaskPhase::Failed as i32;
                status.reason = "CreateContainerConfigError".into();
                status.message = message.clone();
            }
            (None, Some(Err(error))) => {
                status.phase = TaskPhase::Preempted as i32;
                status.reason = "DeviceError".into();
                status.message = error.to_string();
            }
            _ => {}
        }
        let skipped = self.board.fault.and_then(|fault| fault.skipped(&task));
        if let Some(lie) = skipped.filter(|_| refused.is_none()) {
            status = lie;
        }
        let startable = status.phase == TaskPhase::Pending as i32;
        lock(&self.board.entries).insert(
            id.clone(),
            Entry {
                status: status.clone(),
                stop: stop_tx,
                finished: !startable,
                released: false,
                volume_limits: task
                    .volumes
                    .iter()
                    .filter(|v| v.empty_dir)
                    .map(|v| (v.name.clone(), v.size_limit_bytes))
                    .collect(),
            },
        );
        self.board.report(status);
        if let (true, Some(runtime), Some(Ok(dir))) = (startable, found, prepared) {
            tracing::info!(task = %id, pod = %format!("{}/{}", task.namespace, task.pod_name), runtime = runtime.name(), "task started");
            let supervisor = Supervisor {
                task,
                dir,
                runtime,
                board: self.board.clone(),
                stop,
            };
            tokio::spawn(supervisor.run());
        }
    }

    /// Stops a task within `grace` and forgets it; a finished one is forgotten at once.
    pub fn cancel(&self, task_id: &str, grace: Duration) {
        let finished = {
            let mut entries = lock(&self.board.entries);
            let Some(entry) = entries.get_mut(task_id) else {
                return;
            };
            entry.released = true;
            if !entry.finished {
                entry.stop.send_replace(Some(Stop {
                    grace,
                    cause: StopCause::Released,
                }));
            }
            entry.finished
        };
        if finished {
            self.board.forget(task_id);
        }
    }

    /// The owner came back: every running task stops within `grace` and ends Preempted.
    pub fn preempt_all(&self, grace: Duration, reason: &str) {
        self.board.preempt_all(grace, reason);
    }

    /// Every second, stops the running tasks once `fence` says the operator has not heard
    /// this device for the pool's fence time: it may run them elsewhere from then on.
    pub fn watch_fence(
        &self,
        fence: Arc<crate::fence::Fence>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let board = self.board.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if let Some(silent) = fence.overdue(std::time::Instant::now()) {
                    let reason = format!(
                        "Fenced: the operator has not acknowledged this device for {} s, so it may run the task elsewhere",
                        silent.as_secs()
                    );
                    board.preempt_all(FENCE_GRACE, &reason);
                }
            }
        }
    }

    /// The agent is stopping: every task gets `grace` after SIGTERM, as on a preemption
    /// (containers included, which live outside the agent's cgroup), and this returns once
    /// all have ended, or once `grace` and a margin for the runner have passed.
    pub async fn stop_all(&self, grace: Duration) {
        const MARGIN: Duration = Duration::from_secs(5);
        self.preempt_all(grace, "the agent is stopping");
        let deadline = tokio::time::Instant::now() + grace + MARGIN;
        while !self.running().is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every `every`, measures what tasks hold on disk against `room()` (what the owner's
    /// `max_disk` leaves beside the image cache) and evicts those past their limits.
    pub fn watch_disk(
        &self,
        room: impl Fn() -> u64 + Send + Sync + 'static,
        every: Duration,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let board = self.board.clone();
        let room = Arc::new(room);
        async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let (board, room) = (board.clone(), room.clone());
                // Walking directories blocks: never on the thread that serves the session.
                let _ = tokio::task::spawn_blocking(move || board.check_disk(room())).await;
            }
        }
    }

    /// The device's usage ledger.
    pub fn usage(&self) -> &Ledger {
        &self.board.usage
    }

    /// What the running containers use now (see `stats`).
    pub fn meters(&self) -> &stats::Meters {
        &self.board.meters
    }

    /// Answers the operator's `StreamOpen` (kubectl exec) on a task of its own.
    pub fn open_stream(
        &self,
        client: darkcore_proto::agent::v1::agent_gateway_client::AgentGatewayClient<
            tonic::transport::Channel,
        >,
        open: darkcore_proto::agent::v1::StreamOpen,
    ) {
        crate::streams::open(client, open, &self.board.entrances, &self.streams);
    }

    /// The operator wants a task's output again (see `output`).
    pub fn resend_output(&self, task_id: &str) {
        self.board.resend_output(task_id);
    }

    /// The latest status of every task held, for Hello. Whatever was waiting to be sent is
    /// in it, so the queue of changes starts empty.
    pub fn snapshot(&self) -> Vec<TaskStatus> {
        let entries = lock(&self.board.entries);
        lock(&self.board.dirty).clear();
        let mut statuses: Vec<TaskStatus> = entries.values().map(|e| e.status.clone()).collect();
        statuses.sort_by(|a, b| a.task_id.cmp(&b.task_id));
        statuses
    }

    /// Ids of the tasks still running, for `darkcore-agent status`.
    pub fn running(&self) -> Vec<String> {
        let entries = lock(&self.board.entries);
        let mut ids: Vec<String> = entries
            .iter()
            .filter(|(_, e)| !e.finished)
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::process::ProcessRuntime;
    use darkcore_proto::agent::v1::{
        Container, container_status::State, task_assign::RestartPolicy,
    };

    fn manager(name: &str) -> (TaskManager, Reports) {
        let root =
            std::env::temp_dir().join(format!("darkcore-tasks-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        let _ = std::fs::remove_file(root.join("usage.json"));
        TaskManager::new(
            root.clone(),
            vec![(RuntimeKind::Process, Arc::new(ProcessRuntime) as _)],
            Arc::new(Ledger::open(&root).unwrap()),
            None,
        )
    }

    fn shell(id: &str, script: &str, policy: RestartPolicy) -> TaskAssign {
        TaskAssign {
            task_id: id.into(),
            pod_name: "p".into(),
            runtime: RuntimeKind::Process as i32,
            restart_policy: policy as i32,
            containers: vec![Container {
                name: "main".into(),
                command: vec!["sh".into(), "-c".into(), script.into()],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// Reads reports until a status in a final phase arrives; returns it and the output.
    async fn until_final(reports: &mut Reports) -> (TaskStatus, String) {
        let mut output = String::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(20), reports.next())
                .await
                .expect("a report")
            {
                agent_message::Body::LogChunk(chunk) => {
                    output.push_str(&String::from_utf8_lossy(&chunk.data))
                }
                agent_message::Body::TaskStatus(status)
                    if ![TaskPhase::Pending as i32, TaskPhase::Running as i32]
                        .contains(&status.phase) =>
                {
                    return (status, output);
                }
                _ => {}
            }
        }
    }

    /// A checked task that prints `printed` and writes `written` to /out/r on its emptyDir.
    fn checked(id: &str, printed: &str, written: &str) -> TaskAssign {
        let mut task = shell(
            id,
            &format!("echo {printed}; echo {written} > \"$DARKCORE_TASK_ROOT/out/r\""),
            RestartPolicy::Never,
        );
        task.volumes = vec![darkcore_proto::agent::v1::Volume {
            name: "out".into(),
            empty_dir: true,
            ..Default::default()
        }];
        task.containers[0].mounts = vec![darkcore_proto::agent::v1::VolumeMount {
            volume: "out".into(),
            mount_path: "/out".into(),
            ..Default::default()
        }];
        task.result = Some(darkcore_proto::agent::v1::ResultSpec {
            paths: vec!["/out/r".into()],
            stdout: true,
        });
        task
    }

    #[tokio::test]
    async fn a_checked_task_reports_the_digest_of_its_result_with_its_final_phase() {
        let (tasks, mut reports) = manager("digest");
        let mut digests = Vec::new();
        for (id, printed, written) in [
            ("d1", "42", "x"),
            ("d2", "42", "x"),
            ("d3", "41", "x"),
            ("d4", "42", "y"),
        ] {
            tasks.assign(checked(id, printed, written), None);
            let (status, _) = until_final(&mut reports).await;
            assert_eq!(status.phase, TaskPhase::Succeeded as i32, "{status:?}");
            digests.push(status.result_digest);
            tasks.cancel(id, Duration::ZERO);
        }
        assert!(digests[0].starts_with("sha256:"), "{digests:?}");
        assert_eq!(digests[0], digests[1], "the same result, the same digest");
        assert_ne!(digests[0], digests[2], "other output, another digest");
        assert_ne!(digests[0], digests[3], "another file, another digest");
        let mut unchecked = checked("d5", "42", "x");
        unchecked.result = None;
        tasks.assign(unchecked, None);
        let (status, _) = until_final(&mut reports).await;
        assert_eq!(status.result_digest, "", "unchecked tasks carry no digest");
    }

    #[tokio::test]
    async fn a_process_runs_reports_its_output_and_exit_code() {
        let (tasks, mut reports) = manager("exit");
        tasks.assign(
            shell(
                "t1",
                "echo hello; echo oops >&2; exit 3",
                RestartPolicy::Never,
            ),
            None,
        );
        let (status, output) = until_final(&mut reports).await;
        assert_eq!(status.phase, TaskPhase::Failed as i32);
        let main = &status.containers[0];
        assert_eq!(
            (main.state, main.exit_code, main.reason.as_str()),
            (State::Terminated as i32, 3, "Error")
        );
        assert!(
            output.contains("hello\n") && output.contains("oops\n"),
            "{output:?}"
        );
        tasks.cancel("t1", Duration::ZERO);
        assert!(tasks.snapshot().is_empty(), "a released task is forgotten");
    }

    /// The next usage records a session would send.
    async fn next_records(reports: &mut Reports) -> Vec<darkcore_proto::agent::v1::UsageRecord> {
        loop {
            if let agent_message::Body::UsageRecords(usage) =
                tokio::time::timeout(Duration::from_secs(20), reports.next())
                    .await
                    .expect("usage records")
            {
                return usage.records;
            }
        }
    }

    #[tokio::test]
    async fn a_run_is_charged_the_cpu_of_its_process_and_of_the_children_it_waited_for() {
        let (tasks, mut reports) = manager("charge");
        let busy = "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done";
        tasks.assign(
            shell(
                "t4",
                &format!("{busy}; sh -c '{busy}'"),
                RestartPolicy::Never,
            ),
            None,
        );
        let records = next_records(&mut reports).await;
        assert_eq!(records.len(), 1);
        let record = &records[0];
        assert_eq!((record.sequence, record.task_id.as_str()), (1, "t4"));
        assert!(record.completed);
        let held_ms = (record.ended_unix_ms - record.started_unix_ms) as u64;
        assert!(
            record.cpu_milliseconds >= 50 && record.cpu_milliseconds <= held_ms + 20,
            "two busy loops, one after the other: {} ms of CPU in {held_ms} ms",
            record.cpu_milliseconds
        );
        assert_eq!(tasks.usage().totals().tasks, 1);
    }

    #[tokio::test]
    async fn a_preempted_run_is_charged_as_interrupted() {
        let (tasks, mut reports) = manager("interrupted");
        tasks.assign(shell("t5", "sleep 30", RestartPolicy::Never), None);
        tasks.preempt_all(Duration::ZERO, "owner is back");
        let records = next_records(&mut reports).await;
        assert!(!records[0].completed);
        let totals = tasks.usage().totals();
        assert_eq!((totals.tasks, totals.interrupted), (0, 1));
    }

    #[tokio::test]
    async fn a_stopped_task_gets_sigterm_then_sigkill_after_the_grace_period() {
        let (tasks, mut reports) = manager("grace");
        tasks.assign(
            shell(
                "t2",
                "trap '' TERM; echo ready; while true; do sleep 0.1; done",
                RestartPolicy::Always,
            ),
            None,
        );
        loop {
            if let agent_message::Body::LogChunk(_) = reports.next().await {
                break;
            }
        }
        let started = std::time::Instant::now();
        tasks.preempt_all(Duration::from_millis(500), "owner is back");
        let (status, _) = until_final(&mut reports).await;
        assert_eq!(status.phase, TaskPhase::Preempted as i32);
        assert_eq!(
            status.containers[0].exit_code, 137,
            "killed after ignoring SIGTERM"
        );
        assert!(started.elapsed() >= Duration::from_millis(500));
    }

    #[tokio::test]
    async fn a_task_the_owner_cannot_take_now_is_handed_back() {
        let (tasks, mut reports) = manager("busy");
        tasks.assign(
            shell("t3", "true", RestartPolicy::Never),
            Some("owner active".into()),
        );
        let (status, _) = until_final(&mut reports).await;
        assert_eq!(
            (status.phase, status.reason.as_str()),
            (TaskPhase::Preempted as i32, "OwnerBusy")
        );
    }

    #[tokio::test]
    async fn a_task_past_its_empty_dirs_size_limit_is_evicted_and_gives_its_disk_back() {
        let (tasks, mut reports) = manager("evict");
        let fill = r#"head -c 8192 /dev/zero > "$DARKCORE_TASK_ROOT/../volumes/data/fill"; echo full; sleep 60"#;
        let mut task = shell("t-evict", fill, RestartPolicy::Never);
        task.volumes = vec![darkcore_proto::agent::v1::Volume {
            name: "data".into(),
            empty_dir: true,
            size_limit_bytes: 4096,
            ..Default::default()
        }];
        tasks.assign(task, None);
        loop {
            if let agent_message::Body::LogChunk(chunk) = reports.next().await
                && String::from_utf8_lossy(&chunk.data).contains("full")
            {
                break;
            }
        }
        let dir = tasks.board.tasks_root.join("t-evict");
        assert!(dir.join("volumes/data/fill").exists());
        tasks.board.check_disk(u64::MAX);
        let (status, _) = until_final(&mut reports).await;
        assert_eq!(
            (status.phase, status.reason.as_str()),
            (TaskPhase::Failed as i32, "Evicted")
        );
        assert_eq!(
            status.message,
            "Usage of EmptyDir volume \"data\" exceeds the limit \"4.0Ki\"."
        );
        assert!(
            !dir.exists(),
            "an evicted task's files are deleted when it ends"
        );
    }

    #[tokio::test]
    async fn tasks_together_past_the_room_lose_the_largest() {
        let (tasks, mut reports) = manager("pressure");
        let fill = r#"head -c 65536 /dev/zero > "$DARKCORE_TASK_ROOT/fill"; echo full; sleep 60"#;
        tasks.assign(shell("t-big", fill, RestartPolicy::Never), None);
        tasks.assign(
            shell("t-small", "echo full; sleep 60", RestartPolicy::Never),
            None,
        );
        let mut full = 0;
        while full < 2 {
            if let agent_message::Body::LogChunk(chunk) = reports.next().await
                && String::from_utf8_lossy(&chunk.data).contains("full")
            {
                full += 1;
            }
        }
        tasks.board.check_disk(1 << 20);
        assert_eq!(tasks.running().len(), 2, "within room, nobody goes");
        tasks.board.check_disk(32 << 10);
        let (status, _) = until_final(&mut reports).await;
        assert_eq!(
            (status.task_id.as_str(), status.reason.as_str()),
            ("t-big", "Evicted")
        );
        assert!(status.message.contains("max_disk"), "{}", status.message);
        assert_eq!(tasks.running(), ["t-small"]);
        tasks.cancel("t-small", Duration::ZERO);
    }
}
