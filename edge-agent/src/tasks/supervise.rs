//! One task's life on the device: init containers in order, then the containers side by side,
//! each restarted by the pod's restartPolicy with the crash-loop back-off, until they are done
//! or the task is stopped (SIGTERM, the grace period, then SIGKILL).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use darkcore_proto::agent::v1::{
    Container, ContainerStatus, LogChunk, TaskAssign, TaskPhase, TaskStatus, Termination,
    container_status::State, log_chunk, task_assign::RestartPolicy,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;

use crate::images::Image;
use crate::tasks::lifecycle::{self, BACKOFF_RESET_AFTER, Standing};
use crate::tasks::result::{self, StdoutDigests, StdoutHasher};
use crate::tasks::runtime::{Exit, Launch, Output, Runtime, Workload};
use crate::tasks::workdir;
use crate::tasks::{Board, lock};
use crate::usage::Run;

/// A log chunk ends at a newline or at this many bytes.
pub const LOG_CHUNK_BYTES: usize = 16 * 1024;
/// How long output may keep flowing after a container exits (a child holding the pipe).
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);
/// How long a failed pull shows `ErrImagePull` before `ImagePullBackOff`.
const PULL_ERROR_SHOWN: Duration = Duration::from_secs(3);

/// A task is being stopped: SIGTERM, then SIGKILL after `grace`.
#[derive(Clone, Debug, PartialEq)]
pub struct Stop {
    pub grace: Duration,
    pub cause: StopCause,
}

/// Why a task is stopped, which decides how it ends.
#[derive(Clone, Debug, PartialEq)]
pub enum StopCause {
    /// The operator released it: it ends Failed (`Stopped`).
    Released,
    /// The owner came back, or the agent is stopping: it ends Preempted, to run elsewhere.
    Preempted(String),
    /// It held more disk than it may: it ends Failed (`Evicted`), as on a kubelet.
    Evicted(String),
}

pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

#[derive(Clone, Copy)]
enum Kind {
    Init,
    Regular,
}

pub struct Supervisor {
    pub task: TaskAssign,
    pub dir: PathBuf,
    pub runtime: Arc<dyn Runtime>,
    pub board: Arc<Board>,
    pub stop: watch::Receiver<Option<Stop>>,
}

/// The task's status as its containers change it (every change is published), and the CPU
/// its container runs have used.
struct Shared {
    status: Mutex<TaskStatus>,
    board: Arc<Board>,
    cpu: Mutex<Duration>,
    /// The containers' stdout, hashed as it is read, when the task's result is checked.
    stdout: Arc<StdoutDigests>,
}

/// The memory a task reserves, as the scheduler counts a pod's request: the larger of its
/// containers' sum and its largest init container.
pub fn reserved_memory(task: &TaskAssign) -> u64 {
    let request = |c: &Container| c.resources.as_ref().map_or(0, |r| r.request_memory_bytes);
    let containers: u64 = task.containers.iter().map(request).sum();
    let init = task.init_containers.iter().map(request).max().unwrap_or(0);
    containers.max(init)
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut TaskStatus)) {
        let mut status = lock(&self.status);
        f(&mut status);
        self.board.report(status.clone());
    }

    fn container(&self, kind: Kind, index: usize, f: impl FnOnce(&mut ContainerStatus)) {
        self.update(|status| {
            let list = match kind {
                Kind::Init => &mut status.init_containers,
                Kind::Regular => &mut status.containers,
            };
            if let Some(c) = list.get_mut(index) {
                f(c);
            }
        });
    }
}

fn waiting(name: &str, reason: &str) -> ContainerStatus {
    ContainerStatus {
        name: name.into(),
        state: State::Waiting as i32,
        reason: reason.into(),
        ..Default::default()
    }
}

impl Supervisor {
    pub async fn run(self) {
        let took_unix_ms = unix_ms();
        let initial = TaskStatus {
            task_id: self.task.task_id.clone(),
            phase: TaskPhase::Pending as i32,
            init_containers: self
                .task
                .init_containers
                .iter()
                .map(|c| waiting(&c.name, "PodInitializing"))
                .collect(),
            containers: self
                .task
                .containers
                .iter()
                .map(|c| {
                    waiting(
                        &c.name,
                        if self.task.init_containers.is_empty() {
                            "ContainerCreating"
                        } else {
                            "PodInitializing"
                        },
                    )
                })
                .collect(),
            ..Default::default()
        };
        let shared = Arc::new(Shared {
            status: Mutex::new(initial.clone()),
            board: self.board.clone(),
            cpu: Mutex::new(Duration::ZERO),
            stdout: Arc::default(),
        });
        self.board.report(initial);
        self.run_task(&shared).await;
        self.charge(&shared, took_unix_ms);
        self.board.finished(&self.task.task_id);
    }

    /// Init containers, then the containers, to the task's final phase.
    async fn run_task(&self, shared: &Shared) {
        let policy =
            RestartPolicy::try_from(self.task.restart_policy).unwrap_or(RestartPolicy::Always);
        for (index, container) in self.task.init_containers.iter().enumerate() {
            let standing = self
                .run_container(shared, Kind::Init, index, container, policy)
                .await;
            if let Some(stop) = self.stopped() {
                self.finish(shared, &stop);
                return;
            }
            if standing != Standing::Done(0) {
                shared.update(|s| {
                    s.phase = TaskPhase::Failed as i32;
                    s.reason = "InitContainerFailed".into();
                    s.message = format!("init container {:?} failed", container.name);
                    for c in &mut s.containers {
                        c.reason = "PodInitializing".into();
                    }
                });
                return;
            }
        }
        // The task stays Pending (as a pod does while its images are pulled) until a
        // container runs.
        shared.update(|s| {
            for c in &mut s.containers {
                if c.state == State::Waiting as i32 {
                    c.reason = "ContainerCreating".into();
                }
            }
        });
        let runs = self
            .task
            .containers
            .iter()
            .enumerate()
            .map(|(index, container)| {
                self.run_container(shared, Kind::Regular, index, container, policy)
            });
        let standings = futures::future::join_all(runs).await;
        if let Some(stop) = self.stopped() {
            self.finish(shared, &stop);
            return;
        }
        // The digest goes with the final phase, in one report: the operator decides on it.
        let digest = match self.task.result.clone() {
            Some(spec) => {
                let exits: Vec<i32> = standings
                    .iter()
                    .map(|s| match s {
                        Standing::Done(code) => *code,
                        Standing::Live => -1,
                    })
                    .collect();
                let (containers, stdout) = (self.task.containers.clone(), shared.stdout.clone());
                let dir = self.dir.clone();
                // Result files may be large: they are read off the agent's one thread, which
                // also keeps its heartbeats going.
                let digesting = tokio::task::spawn_blocking(move || {
                    result::digest(&spec, &containers, &exits, &stdout, &dir)
                });
                match digesting.await {
                    Ok(digest) => Some(digest),
                    Err(error) => std::panic::resume_unwind(error.into_panic()),
                }
            }
            None => None,
        };
        shared.update(|s| {
            s.phase = lifecycle::phase(&standings) as i32;
            s.result_digest = digest.unwrap_or_default();
        });
    }

    /// Charges the run to the device's usage ledger: the CPU its containers used, and the
    /// memory it reserved for as long as the device held it.
    fn charge(&self, shared: &Shared, took_unix_ms: i64) {
        let phase = lock(&shared.status).phase;
        let cpu = *lock(&shared.cpu);
        self.board.charge(Run {
            task_id: self.task.task_id.clone(),
            namespace: self.task.namespace.clone(),
            pod_name: self.task.pod_name.clone(),
            started_unix_ms: took_unix_ms,
            ended_unix_ms: unix_ms(),
            cpu,
            memory_bytes: reserved_memory(&self.task),
            completed: phase == TaskPhase::Succeeded as i32 || phase == TaskPhase::Failed as i32,
        });
    }

    fn stopped(&self) -> Option<Stop> {
        self.stop.borrow().clone()
    }

    fn finish(&self, shared: &Shared, stop: &Stop) {
        let (phase, reason, message) = match &stop.cause {
            StopCause::Preempted(why) => (TaskPhase::Preempted, "Preempted", why.as_str()),
            StopCause::Released => (TaskPhase::Failed, "Stopped", "stopped by the operator"),
            StopCause::Evicted(why) => (TaskPhase::Failed, "Evicted", why.as_str()),
        };
        shared.update(|s| {
            s.phase = phase as i32;
            s.reason = reason.into();
            s.message = message.into();
        });
    }

    /// Runs one container until it is done for good (by the restart policy) or stopped.
    async fn run_container(
        &self,
        shared: &Shared,
        kind: Kind,
        index: usize,
        container: &Container,
        policy: RestartPolicy,
    ) -> Standing {
        let mut stop = self.stop.clone();
        let Some(image) = self.pull(shared, kind, index, container, &mut stop).await else {
            return Standing::Done(137);
        };
        let mut streak = 0u32;
        loop {
            if stop.borrow().is_some() {
                return Standing::Done(137);
            }
            let (exit, started_at, ran_for) = self
                .run_once(shared, kind, index, container, image.clone(), &mut stop)
                .await;
            let finished_at = unix_ms();
            let termination = Termination {
                exit_code: exit.code,
                reason: exit.reason.clone(),
                message: exit.message.clone(),
                started_at_unix_ms: started_at,
                finished_at_unix_ms: finished_at,
            };
            shared.container(kind, index, |c| {
                c.state = State::Terminated as i32;
                c.exit_code = exit.code;
                c.reason = exit.reason.clone();
                c.message = exit.message.clone();
                c.started_at_unix_ms = started_at;
                c.finished_at_unix_ms = finished_at;
            });
            let again = match kind {
                Kind::Init => exit.code != 0 && lifecycle::init_retries(policy),
                Kind::Regular => lifecycle::restarts(policy, exit.code),
            };
            if stop.borrow().is_some() || !again {
                return Standing::Done(exit.code);
            }
            streak = if ran_for >= BACKOFF_RESET_AFTER {
                1
            } else {
                streak + 1
            };
            let delay = lifecycle::backoff(streak);
            shared.container(kind, index, |c| {
                c.last_termination = Some(termination.clone());
                c.restart_count += 1;
                c.state = State::Waiting as i32;
                c.reason = "CrashLoopBackOff".into();
                c.message = format!(
                    "back-off {}s restarting failed container={} pod={}",
                    delay.as_secs(),
                    container.name,
                    self.task.pod_name
                );
                c.exit_code = 0;
            });
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.wait_for(|s| s.is_some()) => return Standing::Done(exit.code),
            }
        }
    }

    /// Pulls the container's image, if its runtime uses one, as the kubelet does: waiting in
    /// `ContainerCreating`, then `ErrImagePull` and `ImagePullBackOff` (with the registry's
    /// message) between tries, which go on until the pull works or the task is stopped. A bad
    /// name or a `Never` policy is not retried. `None` means stopped.
    async fn pull(
        &self,
        shared: &Shared,
        kind: Kind,
        index: usize,
        container: &Container,
        stop: &mut watch::Receiver<Option<Stop>>,
    ) -> Option<Option<Image>> {
        let Some(images) = self.runtime.images() else {
            return Some(None);
        };
        let set = |reason: &str, message: String| {
            shared.container(kind, index, |c| {
                c.state = State::Waiting as i32;
                c.reason = reason.into();
                c.message = message;
            })
        };
        let mut streak = 0u32;
        loop {
            set(
                "ContainerCreating",
                format!("pulling image {:?}", container.image),
            );
            let policy = container.pull_policy();
            let pulling = images.pull(&container.image, policy, &self.task.pull_credentials);
            let result = tokio::select! {
                result = pulling => result,
                _ = stop.wait_for(|s| s.is_some()) => return None,
            };
            let error = match result {
                Ok(image) => {
                    shared.container(kind, index, |c| c.image_id = image.digest.clone());
                    return Some(Some(image));
                }
                Err(error) => error,
            };
            tracing::info!(task = %self.task.task_id, container = %container.name, %error, "image pull failed");
            set(error.reason(), error.to_string());
            if !error.retryable() {
                let _ = stop.wait_for(|s| s.is_some()).await;
                return None;
            }
            streak += 1;
            let delay = lifecycle::backoff(streak);
            // ErrImagePull stands for a moment, then the back-off shows, as on a kubelet.
            let shown = PULL_ERROR_SHOWN.min(delay);
            tokio::select! {
                _ = tokio::time::sleep(shown) => {}
                _ = stop.wait_for(|s| s.is_some()) => return None,
            }
            set(
                "ImagePullBackOff",
                format!("Back-off pulling image {:?}: {error}", container.image),
            );
            tokio::select! {
                _ = tokio::time::sleep(delay - shown) => {}
                _ = stop.wait_for(|s| s.is_some()) => return None,
            }
        }
    }

    /// Starts the container once and waits for it to end or be stopped.
    async fn run_once(
        &self,
        shared: &Shared,
        kind: Kind,
        index: usize,
        container: &Container,
        image: Option<Image>,
        stop: &mut watch::Receiver<Option<Stop>>,
    ) -> (Exit, i64, Duration) {
        let started_at = unix_ms();
        let mounts = match super::mounts::mounts(&self.dir, container) {
            Ok(mounts) => mounts,
            Err(error) => {
                // The pod asked for something it may not have: its own configuration error.
                let reason = match error {
                    workdir::WorkdirError::Invalid(_) => "CreateContainerConfigError",
                    workdir::WorkdirError::Io { .. } => "CreateContainerError",
                };
                return (
                    Exit {
                        code: 128,
                        reason: reason.into(),
                        message: error.to_string(),
                    },
                    started_at,
                    Duration::ZERO,
                );
            }
        };
        let launch = Launch {
            task_id: self.task.task_id.clone(),
            pod_name: self.task.pod_name.clone(),
            container: container.clone(),
            task_dir: self.dir.clone(),
            mounts,
            image,
            pool_network: self.task.network,
        };
        let mut workload = match self.runtime.start(&launch).await {
            Ok(workload) => workload,
            Err(error) => {
                return (
                    Exit {
                        code: 128,
                        reason: error.reason.into(),
                        message: error.message,
                    },
                    started_at,
                    Duration::ZERO,
                );
            }
        };
        let run = shared
            .status
            .lock()
            .map(|s| {
                let list = match kind {
                    Kind::Init => &s.init_containers,
                    Kind::Regular => &s.containers,
                };
                list.get(index).map_or(0, |c| c.restart_count)
            })
            .unwrap_or(0);
        let (stdout, stderr) = workload.take_output();
        let spawn_pump = |stream, output, hasher| {
            let (board, task_id, name) = (
                self.board.clone(),
                self.task.task_id.clone(),
                container.name.clone(),
            );
            tokio::spawn(pump(board, task_id, name, run, stream, output, hasher))
        };
        let checked = self.task.result.as_ref().is_some_and(|r| r.stdout);
        let hasher = (checked && matches!(kind, Kind::Regular))
            .then(|| shared.stdout.start(&container.name));
        let pumps = [
            stdout.map(|out| spawn_pump(log_chunk::Stream::Stdout, out, hasher)),
            stderr.map(|err| spawn_pump(log_chunk::Stream::Stderr, err, None)),
        ];
        shared.update(|s| {
            if matches!(kind, Kind::Regular) && s.phase == TaskPhase::Pending as i32 {
                s.phase = TaskPhase::Running as i32;
            }
        });
        shared.container(kind, index, |c| {
            c.state = State::Running as i32;
            c.reason.clear();
            c.message.clear();
            c.started_at_unix_ms = started_at;
            c.finished_at_unix_ms = 0;
        });
        let meters = &self.board.meters;
        if let Some(meter) = workload.meter() {
            meters.started(&self.task.task_id, &container.name, meter, started_at);
        }
        let entrances = &self.board.entrances;
        entrances.started(&self.task.task_id, &container.name, workload.entrance());
        let began = Instant::now();
        let exit = tokio::select! {
            exit = workload.wait() => exit,
            grace = grace_when_stopped(stop) => stop_workload(workload.as_mut(), grace).await,
        };
        meters.ended(&self.task.task_id, &container.name);
        entrances.ended(&self.task.task_id, &container.name);
        *lock(&shared.cpu) += workload.cpu_used();
        for pump in pumps.into_iter().flatten() {
            let _ = tokio::time::timeout(DRAIN_AFTER_EXIT, pump).await;
        }
        (exit, started_at, began.elapsed())
    }
}

/// Waits until the task is stopped, and returns the grace period it was given.
async fn grace_when_stopped(stop: &mut watch::Receiver<Option<Stop>>) -> Duration {
    let grace = match stop.wait_for(|s| s.is_some()).await {
        Ok(stop) => stop.as_ref().map(|s| s.grace),
        Err(_) => None,
    };
    match grace {
        Some(grace) => grace,
        // The manager is gone: the agent is exiting.
        None => std::future::pending().await,
    }
}

/// SIGTERM, up to `grace` for it to end, then SIGKILL.
pub async fn stop_workload(workload: &mut dyn Workload, grace: Duration) -> Exit {
    workload.terminate();
    match tokio::time::timeout(grace, workload.wait()).await {
        Ok(exit) => exit,
        Err(_) => {
            workload.kill();
            workload.wait().await
        }
    }
}

/// Streams one output of a container to the board as log chunks that end at newlines, and
/// through `hasher` when the task's result includes it.
async fn pump(
    board: Arc<Board>,
    task_id: String,
    container: String,
    run: u32,
    stream: log_chunk::Stream,
    output: Output,
    mut hasher: Option<StdoutHasher>,
) {
    let emit = |data: Vec<u8>| {
        board.log(LogChunk {
            task_id: task_id.clone(),
            container: container.clone(),
            stream: stream as i32,
            timestamp_unix_nanos: unix_nanos(),
            data,
            run,
            offset: None, // given by the board
        })
    };
    let mut reader = BufReader::with_capacity(LOG_CHUNK_BYTES, output);
    let mut pending = Vec::new();
    loop {
        let buffer = match reader.fill_buf().await {
            Ok([]) => break,
            Err(_) => {
                // Output cut short is no result: the digest names it unread.
                hasher = None;
                break;
            }
            Ok(buffer) => buffer,
        };
        let room = LOG_CHUNK_BYTES - pending.len();
        let (take, line_end) = match buffer.iter().position(|b| *b == b'\n') {
            Some(at) if at < room => (at + 1, true),
            _ => (buffer.len().min(room), false),
        };
        pending.extend_from_slice(&buffer[..take]);
        if let Some(hasher) = hasher.as_mut() {
            hasher.update(&buffer[..take]);
        }
        reader.consume(take);
        if line_end || pending.len() >= LOG_CHUNK_BYTES {
            emit(std::mem::take(&mut pending));
        }
    }
    if !pending.is_empty() {
        emit(pending);
    }
    if let Some(hasher) = hasher {
        hasher.finish();
    }
}
