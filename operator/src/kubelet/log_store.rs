//! Recent output of every container darkcore runs, kept in the operator for `kubectl logs`.
//!
//! Bounds: per container, the current run and the one before it (for `--previous`), each up
//! to [`RUN_BYTES`]; beyond that the oldest lines of a run are dropped first. A finished
//! container's output stays until its pod is deleted. Output written while an agent could not
//! reach the gateway beyond the agent's own queue is lost.
//!
//! Only the device an attempt was given to may write its output: the pod controller records
//! each attempt's device here, and chunks from any other device are refused.
//!
//! The output lives only here: a run this operator did not see from its start (one that ran
//! before a restart) is marked not `whole`, so that `kubectl logs` can say its output is gone
//! instead of printing part of it, or nothing, as if that were all.

use crate::domain::TaskId;
use crate::kubelet::kept_output::Kept;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use darkcore_proto::agent::v1::{LogChunk, log_chunk};
use tokio::sync::Notify;

/// Bytes kept per container run.
pub const RUN_BYTES: usize = 1 << 20;
/// What a line costs beside its bytes: its slot in the run and its allocation's header and
/// rounding. Charged so that a flood of 1-byte lines is held to the budget in real memory,
/// not at about 60 times it.
pub const LINE_OVERHEAD: usize = std::mem::size_of::<Line>() + 32;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub timestamp_unix_nanos: i64,
    pub data: Vec<u8>,
    /// Written to stderr (else stdout), as `kubectl attach` shows it.
    pub stderr: bool,
}

/// One run of a container: an attempt on a device, and the restart on that device.
#[derive(Default)]
pub struct Run {
    pub id: (u32, u32),
    /// This operator holds its output from the start.
    pub whole: bool,
    pub lines: VecDeque<Line>,
    bytes: usize,
    /// Lines ever appended, so followers can tell how far they have read.
    pub appended: u64,
    pub ended: bool,
    /// The offset in the run's output up to which it is held without a gap, from agents that
    /// number their output (they send it again on reconnecting, from the oldest they keep).
    received: Option<u64>,
    /// The offset of the first output it holds, from such agents.
    from: Option<u64>,
}

#[derive(Default)]
struct ContainerLogs {
    runs: VecDeque<Run>,
    changed: Arc<Notify>,
}

#[derive(Default)]
struct State {
    /// By pod uid, then container name.
    pods: HashMap<String, HashMap<String, ContainerLogs>>,
    /// By pod uid, then attempt number: the device holding that attempt.
    holders: HashMap<String, HashMap<u32, Holder>>,
}

/// The device an attempt was given to, and from which of its runs on this operator's watch.
struct Holder {
    device: String,
    /// Runs from this one on are seen from their start; `None`: an attempt adopted after a
    /// restart whose first run here is already under way.
    whole_from: Option<u32>,
}

impl Holder {
    /// Whether run `run` is seen from its start, when it is first heard of now.
    fn sees_whole(&mut self, run: u32) -> bool {
        let from = *self.whole_from.get_or_insert(run + 1);
        run >= from
    }
}

/// Why a chunk was not kept.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the task id is not <pod uid>.<attempt>")]
    BadTaskId,
    #[error("the task was not given to this device")]
    NotHolder,
}

#[derive(Default)]
pub struct LogStore {
    state: Mutex<State>,
}

/// What a reader gets: lines from a position on, and whether the run has ended.
pub struct Read {
    pub lines: Vec<Line>,
    pub next: u64,
    pub ended: bool,
    /// This operator holds the run's output from its start.
    pub whole: bool,
    pub changed: Arc<Notify>,
}

impl LogStore {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that the task (an attempt of a pod) was given to `device`, the only one whose
    /// output for it is kept. `adopted`: found running after a restart, so the output of its
    /// current run before now is not here.
    pub fn assign(&self, task_id: &str, device: &str, adopted: bool) {
        if let Some((uid, attempt)) = TaskId::split(task_id) {
            let holder = Holder {
                device: device.to_string(),
                whole_from: (!adopted).then_some(0),
            };
            self.lock()
                .holders
                .entry(uid.to_string())
                .or_default()
                .entry(attempt)
                .or_insert(holder);
        }
    }

    /// The device reports the container on run `run` of the attempt (its restarts there): a
    /// run with no output yet is still the current one, and the one before it the previous.
    pub fn started(&self, task_id: &str, container: &str, run: u32) {
        let Some((uid, attempt)) = TaskId::split(task_id) else {
            return;
        };
        let mut state = self.lock();
        let State { pods, holders } = &mut *state;
        let Some(holder) = holders.get_mut(uid).and_then(|h| h.get_mut(&attempt)) else {
            return;
        };
        let logs = pods
            .entry(uid.to_string())
            .or_default()
            .entry(container.to_string())
            .or_default();
        open(logs, holder, (attempt, run));
    }

    /// Whether the task (an attempt) was given to `device`.
    pub fn holds(&self, device: &str, task_id: &str) -> bool {
        let Some((uid, attempt)) = TaskId::split(task_id) else {
            return false;
        };
        let state = self.lock();
        let holder = state.holders.get(uid).and_then(|h| h.get(&attempt));
        holder.is_some_and(|h| h.device == device)
    }

    /// Adds a chunk of output from `device`; it may hold several lines.
    pub fn append(&self, device: &str, chunk: &LogChunk) -> Result<(), Refused> {
        let (uid, attempt) = TaskId::split(&chunk.task_id).ok_or(Refused::BadTaskId)?;
        let id = (attempt, chunk.run);
        let mut state = self.lock();
        let State { pods, holders } = &mut *state;
        let holder = holders.get_mut(uid).and_then(|h| h.get_mut(&attempt));
        let Some(holder) = holder.filter(|h| h.device == device) else {
            return Err(Refused::NotHolder);
        };
        let logs = pods
            .entry(uid.to_string())
            .or_default()
            .entry(chunk.container.clone())
            .or_default();
        open(logs, holder, id);
        let Some(run) = logs.runs.iter_mut().find(|r| r.id == id) else {
            return Ok(()); // a run older than the two kept
        };
        let Some(data) = fresh_part(run, chunk) else {
            return Ok(()); // held already
        };
        for piece in data.split_inclusive(|b| *b == b'\n') {
            run.bytes += piece.len() + LINE_OVERHEAD;
            run.appended += 1;
            run.lines.push_back(Line {
                timestamp_unix_nanos: chunk.timestamp_unix_nanos,
                data: piece.to_vec(),
                stderr: chunk.stream() == log_chunk::Stream::Stderr,
            });
        }
        while run.bytes > RUN_BYTES {
            match run.lines.pop_front() {
                Some(line) => run.bytes -= line.data.len() + LINE_OVERHEAD,
                None => break,
            }
        }
        logs.changed.notify_waiters();
        Ok(())
    }

    /// The container's current run ended (or the pod finished): followers stop after it.
    pub fn end(&self, uid: &str, container: &str) {
        let mut state = self.lock();
        if let Some(logs) = state.pods.get_mut(uid).and_then(|p| p.get_mut(container)) {
            if let Some(run) = logs.runs.back_mut() {
                run.ended = true;
            }
            logs.changed.notify_waiters();
        }
    }

    /// Forgets a deleted pod's output.
    pub fn forget(&self, uid: &str) {
        let mut state = self.lock();
        state.holders.remove(uid);
        if let Some(pod) = state.pods.remove(uid) {
            for logs in pod.values() {
                logs.changed.notify_waiters();
            }
        }
    }

    /// Lines of the current (or previous) run after `from` lines, and how far that reaches.
    /// A container with no output yet reads as an empty, unfinished run: whole if its attempt
    /// was dispatched by this operator.
    pub fn read(&self, uid: &str, container: &str, previous: bool, from: u64) -> Option<Read> {
        let mut state = self.lock();
        let dispatched_here = state.holders.get(uid).is_some_and(|h| {
            h.iter()
                .max_by_key(|(attempt, _)| **attempt)
                .is_some_and(|(_, holder)| holder.whole_from == Some(0))
        });
        let logs = state
            .pods
            .entry(uid.to_string())
            .or_default()
            .entry(container.to_string())
            .or_default();
        let changed = logs.changed.clone();
        let run = if previous {
            if logs.runs.len() < 2 {
                return None;
            }
            logs.runs.front()
        } else {
            logs.runs.back()
        };
        let Some(run) = run else {
            return Some(Read {
                lines: Vec::new(),
                next: 0,
                ended: false,
                whole: dispatched_here,
                changed,
            });
        };
        let first_kept = run.appended - run.lines.len() as u64;
        let skip = from.saturating_sub(first_kept) as usize;
        Some(Read {
            lines: run.lines.iter().skip(skip).cloned().collect(),
            next: run.appended,
            ended: run.ended,
            whole: run.whole,
            changed,
        })
    }
}

/// The kubelet's bounds on a termination message taken from a container's output
/// (`terminationMessagePolicy: FallbackToLogsOnError`): its last 80 lines, at most 2 KiB.
pub const TAIL_LINES: usize = 80;
pub const TAIL_BYTES: usize = 2048;

impl LogStore {
    /// What a finished pod keeps of its `containers`' current runs (see [`Kept`]): whole only
    /// when this operator holds a run's output from its start and dropped none of it.
    pub fn keep<'a>(
        &self,
        uid: &str,
        containers: impl Iterator<Item = &'a str>,
    ) -> BTreeMap<String, Kept> {
        containers
            .filter_map(|container| {
                let read = self.read(uid, container, false, 0)?;
                let whole_run = read.whole && read.next == read.lines.len() as u64;
                Some((container.to_string(), Kept::of(&read.lines, whole_run)))
            })
            .collect()
    }

    /// The end of the container's current run, as the kubelet keeps it for a termination
    /// message: the last [`TAIL_LINES`] lines, cut to the last [`TAIL_BYTES`] bytes.
    pub fn tail(&self, uid: &str, container: &str) -> Option<String> {
        let state = self.lock();
        let run = state.pods.get(uid)?.get(container)?.runs.back()?;
        let mut bytes: Vec<u8> = run
            .lines
            .iter()
            .rev()
            .take(TAIL_LINES)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .flat_map(|line| line.data.iter().copied())
            .collect();
        if bytes.len() > TAIL_BYTES {
            bytes.drain(..bytes.len() - TAIL_BYTES);
        }
        (!bytes.is_empty()).then(|| String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// The part of a chunk the run does not hold yet, going by its offset: all of it from agents
/// that do not number their output. A run first heard of from offset 0 is held from its start
/// (whole, even one adopted after a restart); a gap makes it partial.
fn fresh_part<'a>(run: &mut Run, chunk: &'a LogChunk) -> Option<&'a [u8]> {
    let Some(offset) = chunk.offset else {
        return Some(&chunk.data);
    };
    let end = offset.saturating_add(chunk.data.len() as u64);
    // A run held only from later on (new output came before all the agent sends again, from
    // the start): it starts over from here, whole, and what it held comes again after this.
    // (A follower of the partial run may miss as many lines as it had read.)
    if offset == 0 && run.from.is_some_and(|from| from > 0) {
        run.lines.clear();
        run.bytes = 0;
        run.appended = 0;
        run.received = None;
        run.from = None;
    }
    run.from.get_or_insert(offset);
    match run.received {
        None if offset == 0 && run.appended == 0 => run.whole = true,
        None => run.whole = false,
        Some(received) if end <= received => return None,
        Some(received) if offset > received => run.whole = false,
        Some(_) => {}
    }
    let skip = run
        .received
        .map_or(0, |received| received.saturating_sub(offset)) as usize;
    run.received = Some(end);
    Some(&chunk.data[skip.min(chunk.data.len())..])
}

/// Makes run `id` the container's current one if it is newer than every run kept (the one
/// before it ends; at most two are kept).
fn open(logs: &mut ContainerLogs, holder: &mut Holder, id: (u32, u32)) {
    if logs.runs.iter().any(|r| r.id >= id) {
        return;
    }
    if let Some(last) = logs.runs.back_mut() {
        last.ended = true;
    }
    logs.runs.push_back(Run {
        id,
        whole: holder.sees_whole(id.1),
        ..Default::default()
    });
    while logs.runs.len() > 2 {
        logs.runs.pop_front();
    }
    logs.changed.notify_waiters();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(task: &str, run: u32, data: &str) -> LogChunk {
        LogChunk {
            task_id: task.into(),
            container: "main".into(),
            data: data.as_bytes().to_vec(),
            run,
            ..Default::default()
        }
    }

    /// A store in which device "dev" holds these tasks.
    fn held(tasks: &[&str]) -> LogStore {
        let store = LogStore::default();
        for task in tasks {
            store.assign(task, "dev", false);
        }
        store
    }

    fn text(read: &Read) -> String {
        read.lines
            .iter()
            .map(|l| String::from_utf8_lossy(&l.data).into_owned())
            .collect()
    }

    #[test]
    fn lines_accumulate_and_followers_resume_where_they_were() {
        let store = held(&["uid.1", "uid.2"]);
        store.append("dev", &chunk("uid.1", 0, "a\nb\n")).unwrap();
        let first = store.read("uid", "main", false, 0).unwrap();
        assert_eq!(text(&first), "a\nb\n");
        store.append("dev", &chunk("uid.1", 0, "c\n")).unwrap();
        let next = store.read("uid", "main", false, first.next).unwrap();
        assert_eq!(text(&next), "c\n");
        assert!(!next.ended);
        store.end("uid", "main");
        assert!(store.read("uid", "main", false, next.next).unwrap().ended);
    }

    #[test]
    fn a_new_run_keeps_the_previous_one_for_previous() {
        let store = held(&["uid.1", "uid.2"]);
        store.append("dev", &chunk("uid.1", 0, "first\n")).unwrap();
        store.append("dev", &chunk("uid.2", 0, "second\n")).unwrap();
        assert_eq!(
            text(&store.read("uid", "main", true, 0).unwrap()),
            "first\n"
        );
        assert_eq!(
            text(&store.read("uid", "main", false, 0).unwrap()),
            "second\n"
        );
        store.append("dev", &chunk("uid.2", 1, "third\n")).unwrap();
        assert_eq!(
            text(&store.read("uid", "main", true, 0).unwrap()),
            "second\n"
        );
        assert!(store.read("other", "main", true, 0).is_none());
    }

    #[test]
    fn a_restart_with_no_output_yet_is_the_current_run_and_the_crashed_one_the_previous() {
        let store = held(&["uid.1"]);
        store
            .append("dev", &chunk("uid.1", 0, "crashed\n"))
            .unwrap();
        // The device reports the container restarted once; the new run prints nothing yet.
        store.started("uid.1", "main", 1);
        assert_eq!(
            text(&store.read("uid", "main", true, 0).unwrap()),
            "crashed\n"
        );
        let current = store.read("uid", "main", false, 0).unwrap();
        assert_eq!(text(&current), "");
        assert!(current.whole && !current.ended);
        // Reported again: nothing moves.
        store.started("uid.1", "main", 1);
        assert_eq!(
            text(&store.read("uid", "main", true, 0).unwrap()),
            "crashed\n"
        );
    }

    #[test]
    fn output_from_before_a_restart_is_known_to_be_missing() {
        let store = LogStore::default();
        // Nothing of the pod was seen: not whole.
        assert!(!store.read("uid", "main", false, 0).unwrap().whole);
        // Adopted while running: the current run is partial, later runs are whole.
        store.assign("uid.2", "dev", true);
        store
            .append("dev", &chunk("uid.2", 3, "tail of run 3\n"))
            .unwrap();
        assert!(!store.read("uid", "main", false, 0).unwrap().whole);
        store
            .append("dev", &chunk("uid.2", 4, "all of run 4\n"))
            .unwrap();
        assert!(store.read("uid", "main", false, 0).unwrap().whole);
        assert!(!store.read("uid", "main", true, 0).unwrap().whole);
        // Dispatched here: whole even before any output.
        store.assign("other.1", "dev", false);
        assert!(store.read("other", "main", false, 0).unwrap().whole);
    }

    fn at(task: &str, run: u32, offset: u64, data: &str) -> LogChunk {
        LogChunk {
            offset: Some(offset),
            ..chunk(task, run, data)
        }
    }

    #[test]
    fn an_adopted_run_its_agent_sends_again_from_offset_0_is_whole_and_nothing_is_doubled() {
        let store = LogStore::default();
        store.assign("uid.2", "dev", true);
        // New output first (written while the agent was away, sent as it reattached, before
        // it was asked), then all it kept, again, twice.
        store.append("dev", &at("uid.2", 0, 8, "three\n")).unwrap();
        assert!(!store.read("uid", "main", false, 0).unwrap().whole);
        for (offset, line) in [(0, "one\n"), (4, "two\n"), (0, "one\n"), (4, "two\n")] {
            store.append("dev", &at("uid.2", 0, offset, line)).unwrap();
        }
        store.append("dev", &at("uid.2", 0, 8, "three\n")).unwrap();
        let read = store.read("uid", "main", false, 0).unwrap();
        assert!(read.whole);
        assert_eq!(text(&read), "one\ntwo\nthree\n");
        let kept = store.keep("uid", ["main"].into_iter());
        assert!(kept["main"].whole, "{kept:?}");
    }

    #[test]
    fn a_gap_in_the_offsets_makes_a_run_partial() {
        let store = held(&["uid.1"]);
        store.append("dev", &at("uid.1", 0, 0, "a\n")).unwrap();
        store
            .append("dev", &at("uid.1", 0, 10, "lost some\n"))
            .unwrap();
        assert!(!store.read("uid", "main", false, 0).unwrap().whole);
        // The agent's oldest output went before it was sent: partial from the start.
        let late = held(&["late.1"]);
        late.append("dev", &at("late.1", 0, 500, "end\n")).unwrap();
        assert!(!late.read("late", "main", false, 0).unwrap().whole);
    }

    #[test]
    fn a_chunk_partly_held_adds_only_its_new_part() {
        let store = held(&["uid.1"]);
        store.append("dev", &at("uid.1", 0, 0, "ab")).unwrap();
        store.append("dev", &at("uid.1", 0, 0, "abc\n")).unwrap();
        let read = store.read("uid", "main", false, 0).unwrap();
        assert_eq!(text(&read), "abc\n");
        assert!(read.whole);
    }

    #[test]
    fn a_tail_is_the_last_80_lines_within_2_kib() {
        let store = held(&["uid.1"]);
        assert_eq!(store.tail("uid", "main"), None);
        let lines: String = (0..100).map(|i| format!("{i}\n")).collect();
        store.append("dev", &chunk("uid.1", 0, &lines)).unwrap();
        let tail = store.tail("uid", "main").unwrap();
        assert!(tail.starts_with("20\n") && tail.ends_with("99\n"), "{tail}");
        store
            .append("dev", &chunk("uid.1", 0, &"x".repeat(3000)))
            .unwrap();
        let tail = store.tail("uid", "main").unwrap();
        assert_eq!(tail.len(), TAIL_BYTES);
    }

    #[test]
    fn the_oldest_lines_go_first_beyond_the_bound() {
        let store = held(&["uid.1", "uid.2"]);
        let line = "x".repeat(1023) + "\n";
        for _ in 0..(RUN_BYTES / 1024 + 10) {
            store.append("dev", &chunk("uid.1", 0, &line)).unwrap();
        }
        let read = store.read("uid", "main", false, 0).unwrap();
        assert_eq!(read.lines.len(), RUN_BYTES / (1024 + LINE_OVERHEAD));
        assert_eq!(read.next, (RUN_BYTES / 1024 + 10) as u64);
    }

    #[test]
    fn a_flood_of_tiny_lines_is_charged_what_the_lines_cost() {
        let store = held(&["uid.1"]);
        let flood = "\n".repeat(64 * 1024);
        for _ in 0..8 {
            store.append("dev", &chunk("uid.1", 0, &flood)).unwrap();
        }
        let read = store.read("uid", "main", false, 0).unwrap();
        assert_eq!(read.lines.len(), RUN_BYTES / (1 + LINE_OVERHEAD));
        assert_eq!(read.next, 8 * 64 * 1024);
    }

    #[test]
    fn only_the_device_holding_an_attempt_writes_its_output() {
        let store = held(&["uid.1"]);
        store.assign("uid.2", "other-dev", false);
        assert_eq!(
            store.append("intruder", &chunk("uid.1", 0, "forged\n")),
            Err(Refused::NotHolder)
        );
        assert_eq!(
            store.append("dev", &chunk("uid.2", 0, "not mine\n")),
            Err(Refused::NotHolder)
        );
        assert_eq!(
            store.append("dev", &chunk("uid.9", 0, "never given\n")),
            Err(Refused::NotHolder)
        );
        assert_eq!(
            store.append("dev", &chunk("no-attempt", 0, "x\n")),
            Err(Refused::BadTaskId)
        );
        store.append("dev", &chunk("uid.1", 0, "mine\n")).unwrap();
        assert_eq!(
            text(&store.read("uid", "main", false, 0).unwrap()),
            "mine\n"
        );
        store.forget("uid");
        assert_eq!(
            store.append("dev", &chunk("uid.1", 0, "after\n")),
            Err(Refused::NotHolder)
        );
    }
}
