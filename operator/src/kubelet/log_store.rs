//! Recent output of every container darkcore runs, kept in the operator for `kubectl logs`.
//!
//! Bounds: per container, the current run and the one before it (for `--previous`), each up
//! to [`RUN_BYTES`]; beyond that the oldest lines of a run are dropped first. A finished
//! container's output stays until its pod is deleted. Output written while an agent could not
//! reach the gateway beyond the agent's own queue is lost.
//!
//! Only the device an attempt was given to may write its output: the pod controller records
//! each attempt's device here, and chunks from any other device are refused.

use crate::domain::TaskId;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use darkcore_proto::agent::v1::LogChunk;
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
}

/// One run of a container: an attempt on a device, and the restart on that device.
#[derive(Default)]
pub struct Run {
    pub id: (u32, u32),
    pub lines: VecDeque<Line>,
    bytes: usize,
    /// Lines ever appended, so followers can tell how far they have read.
    pub appended: u64,
    pub ended: bool,
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
    holders: HashMap<String, HashMap<u32, String>>,
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
    pub changed: Arc<Notify>,
}

impl LogStore {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that the task (an attempt of a pod) was given to `device`, the only one whose
    /// output for it is kept.
    pub fn assign(&self, task_id: &str, device: &str) {
        if let Some((uid, attempt)) = TaskId::split(task_id) {
            self.lock()
                .holders
                .entry(uid.to_string())
                .or_default()
                .insert(attempt, device.to_string());
        }
    }

    /// Adds a chunk of output from `device`; it may hold several lines.
    pub fn append(&self, device: &str, chunk: &LogChunk) -> Result<(), Refused> {
        let (uid, attempt) = TaskId::split(&chunk.task_id).ok_or(Refused::BadTaskId)?;
        let id = (attempt, chunk.run);
        let mut state = self.lock();
        let holder = state.holders.get(uid).and_then(|h| h.get(&attempt));
        if holder.map(String::as_str) != Some(device) {
            return Err(Refused::NotHolder);
        }
        let logs = state
            .pods
            .entry(uid.to_string())
            .or_default()
            .entry(chunk.container.clone())
            .or_default();
        if logs.runs.iter().all(|r| r.id < id) {
            if let Some(last) = logs.runs.back_mut() {
                last.ended = true;
            }
            logs.runs.push_back(Run {
                id,
                ..Default::default()
            });
            while logs.runs.len() > 2 {
                logs.runs.pop_front();
            }
        }
        let Some(run) = logs.runs.iter_mut().find(|r| r.id == id) else {
            return Ok(()); // a run older than the two kept
        };
        for piece in chunk.data.split_inclusive(|b| *b == b'\n') {
            run.bytes += piece.len() + LINE_OVERHEAD;
            run.appended += 1;
            run.lines.push_back(Line {
                timestamp_unix_nanos: chunk.timestamp_unix_nanos,
                data: piece.to_vec(),
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
    /// A container with no output yet reads as an empty, unfinished run.
    pub fn read(&self, uid: &str, container: &str, previous: bool, from: u64) -> Option<Read> {
        let mut state = self.lock();
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
                changed,
            });
        };
        let first_kept = run.appended - run.lines.len() as u64;
        let skip = from.saturating_sub(first_kept) as usize;
        Some(Read {
            lines: run.lines.iter().skip(skip).cloned().collect(),
            next: run.appended,
            ended: run.ended,
            changed,
        })
    }
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
            store.assign(task, "dev");
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
        store.assign("uid.2", "other-dev");
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
