//! Recent output of every container darkcore runs, kept in the operator for `kubectl logs`.
//!
//! Bounds: per container, the current run and the one before it (for `--previous`), each up
//! to [`RUN_BYTES`]; beyond that the oldest lines of a run are dropped first. A finished
//! container's output stays until its pod is deleted. Output written while an agent could not
//! reach the gateway beyond the agent's own queue is lost.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use darkcore_proto::agent::v1::LogChunk;
use tokio::sync::Notify;

/// Bytes kept per container run.
pub const RUN_BYTES: usize = 1 << 20;

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

/// The attempt number and the pod uid in a task id (`<uid>.<attempt>`).
pub fn parse_task_id(task_id: &str) -> Option<(&str, u32)> {
    let (uid, attempt) = task_id.rsplit_once('.')?;
    Some((uid, attempt.parse().ok()?))
}

impl LogStore {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a chunk of output; it may hold several lines.
    pub fn append(&self, chunk: &LogChunk) {
        let Some((uid, attempt)) = parse_task_id(&chunk.task_id) else {
            return;
        };
        let id = (attempt, chunk.run);
        let mut state = self.lock();
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
            return;
        };
        for piece in chunk.data.split_inclusive(|b| *b == b'\n') {
            run.bytes += piece.len();
            run.appended += 1;
            run.lines.push_back(Line {
                timestamp_unix_nanos: chunk.timestamp_unix_nanos,
                data: piece.to_vec(),
            });
        }
        while run.bytes > RUN_BYTES {
            match run.lines.pop_front() {
                Some(line) => run.bytes -= line.data.len(),
                None => break,
            }
        }
        logs.changed.notify_waiters();
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
        if let Some(pod) = self.lock().pods.remove(uid) {
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

    fn text(read: &Read) -> String {
        read.lines
            .iter()
            .map(|l| String::from_utf8_lossy(&l.data).into_owned())
            .collect()
    }

    #[test]
    fn lines_accumulate_and_followers_resume_where_they_were() {
        let store = LogStore::default();
        store.append(&chunk("uid.1", 0, "a\nb\n"));
        let first = store.read("uid", "main", false, 0).unwrap();
        assert_eq!(text(&first), "a\nb\n");
        store.append(&chunk("uid.1", 0, "c\n"));
        let next = store.read("uid", "main", false, first.next).unwrap();
        assert_eq!(text(&next), "c\n");
        assert!(!next.ended);
        store.end("uid", "main");
        assert!(store.read("uid", "main", false, next.next).unwrap().ended);
    }

    #[test]
    fn a_new_run_keeps_the_previous_one_for_previous() {
        let store = LogStore::default();
        store.append(&chunk("uid.1", 0, "first\n"));
        store.append(&chunk("uid.2", 0, "second\n"));
        assert_eq!(
            text(&store.read("uid", "main", true, 0).unwrap()),
            "first\n"
        );
        assert_eq!(
            text(&store.read("uid", "main", false, 0).unwrap()),
            "second\n"
        );
        store.append(&chunk("uid.2", 1, "third\n"));
        assert_eq!(
            text(&store.read("uid", "main", true, 0).unwrap()),
            "second\n"
        );
        assert!(store.read("other", "main", true, 0).is_none());
    }

    #[test]
    fn the_oldest_lines_go_first_beyond_the_bound() {
        let store = LogStore::default();
        let line = "x".repeat(1023) + "\n";
        for _ in 0..(RUN_BYTES / 1024 + 10) {
            store.append(&chunk("uid.1", 0, &line));
        }
        let read = store.read("uid", "main", false, 0).unwrap();
        assert_eq!(read.lines.len(), RUN_BYTES / 1024);
        assert_eq!(read.next, (RUN_BYTES / 1024 + 10) as u64);
    }
}
