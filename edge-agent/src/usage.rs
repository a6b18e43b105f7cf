//! The device's usage ledger: each run of a task is charged once when it ends here, under a
//! sequence number, and kept on disk (`usage.json`) until the operator acknowledges it.
//!
//! After a reconnect every unacknowledged record is sent again; the operator counts a record
//! at most once (it stores the highest sequence applied), so nothing is lost or counted twice.
//! The ledger's totals are what `darkcore-agent status` shows the owner.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use darkcore_proto::agent::v1::UsageRecord;
use serde::{Deserialize, Serialize};

use crate::identity::write_private;

const LEDGER_FILE: &str = "usage.json";
/// Records per message, so one message stays small after a long time offline.
pub const RECORDS_PER_MESSAGE: usize = 256;

/// One run of a task on this device, as it ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    pub task_id: String,
    pub namespace: String,
    pub pod_name: String,
    pub started_unix_ms: i64,
    pub ended_unix_ms: i64,
    pub cpu: Duration,
    /// The memory the task reserved here (its pod's request).
    pub memory_bytes: u64,
    /// It ended on its own (Succeeded or Failed), rather than stopped or preempted.
    pub completed: bool,
}

/// What this device has given since it joined: the sums of its records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub tasks: u64,
    pub interrupted: u64,
    pub cpu_milliseconds: u64,
    pub memory_mib_seconds: u64,
}

/// A charged run, as stored until acknowledged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Record {
    sequence: u64,
    task_id: String,
    namespace: String,
    pod_name: String,
    started_unix_ms: i64,
    ended_unix_ms: i64,
    cpu_milliseconds: u64,
    memory_mib_seconds: u64,
    completed: bool,
}

impl Record {
    fn charge(sequence: u64, run: Run) -> Record {
        let held_ms =
            u128::try_from(run.ended_unix_ms.saturating_sub(run.started_unix_ms)).unwrap_or(0);
        let mib_seconds = u128::from(run.memory_bytes) * held_ms / ((1u128 << 20) * 1000);
        Record {
            sequence,
            task_id: run.task_id,
            namespace: run.namespace,
            pod_name: run.pod_name,
            started_unix_ms: run.started_unix_ms,
            ended_unix_ms: run.ended_unix_ms,
            cpu_milliseconds: u64::try_from(run.cpu.as_millis()).unwrap_or(u64::MAX),
            memory_mib_seconds: u64::try_from(mib_seconds).unwrap_or(u64::MAX),
            completed: run.completed,
        }
    }

    fn to_proto(&self) -> UsageRecord {
        UsageRecord {
            sequence: self.sequence,
            task_id: self.task_id.clone(),
            namespace: self.namespace.clone(),
            pod_name: self.pod_name.clone(),
            started_unix_ms: self.started_unix_ms,
            ended_unix_ms: self.ended_unix_ms,
            cpu_milliseconds: self.cpu_milliseconds,
            memory_mib_seconds: self.memory_mib_seconds,
            completed: self.completed,
        }
    }
}

/// The ledger file's content.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Saved {
    last_sequence: u64,
    totals: Totals,
    unacknowledged: Vec<Record>,
}

struct State {
    saved: Saved,
    /// The highest sequence sent on the current connection.
    sent_through: u64,
}

pub struct Ledger {
    path: PathBuf,
    state: Mutex<State>,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "{path} is damaged ({reason}): move it aside to start a new ledger; its unacknowledged usage is then lost"
)]
pub struct LedgerError {
    path: PathBuf,
    reason: String,
}

impl Ledger {
    /// Opens the ledger in `state_dir`, or starts an empty one.
    pub fn open(state_dir: &Path) -> Result<Ledger, LedgerError> {
        let path = state_dir.join(LEDGER_FILE);
        let saved = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| LedgerError {
                path: path.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Saved::default(),
            Err(e) => {
                return Err(LedgerError {
                    path,
                    reason: e.to_string(),
                });
            }
        };
        Ok(Ledger {
            path,
            state: Mutex::new(State {
                saved,
                sent_through: 0,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Charges a run that ended: the next sequence number, kept until acknowledged.
    pub fn charge(&self, run: Run) {
        let mut state = self.lock();
        let saved = &mut state.saved;
        saved.last_sequence += 1;
        let record = Record::charge(saved.last_sequence, run);
        if record.completed {
            saved.totals.tasks += 1;
        } else {
            saved.totals.interrupted += 1;
        }
        saved.totals.cpu_milliseconds += record.cpu_milliseconds;
        saved.totals.memory_mib_seconds += record.memory_mib_seconds;
        saved.unacknowledged.push(record);
        self.save(&state.saved);
    }

    /// The operator stored every record up to `through`.
    pub fn acknowledge(&self, through: u64) {
        let mut state = self.lock();
        let before = state.saved.unacknowledged.len();
        state.saved.unacknowledged.retain(|r| r.sequence > through);
        if state.saved.unacknowledged.len() != before {
            self.save(&state.saved);
        }
    }

    /// A new connection: every unacknowledged record is to be sent again.
    pub fn resend(&self) {
        self.lock().sent_through = 0;
    }

    /// The next records to send, in sequence order; empty when all are sent.
    pub fn unsent(&self) -> Vec<UsageRecord> {
        let mut state = self.lock();
        let sent_through = state.sent_through;
        let batch: Vec<UsageRecord> = state
            .saved
            .unacknowledged
            .iter()
            .filter(|r| r.sequence > sent_through)
            .take(RECORDS_PER_MESSAGE)
            .map(Record::to_proto)
            .collect();
        if let Some(last) = batch.last() {
            state.sent_through = last.sequence;
        }
        batch
    }

    pub fn totals(&self) -> Totals {
        self.lock().saved.totals
    }

    /// Records not yet acknowledged by the operator.
    pub fn pending(&self) -> usize {
        self.lock().saved.unacknowledged.len()
    }

    /// A failed write is logged, never fatal: the records stay in memory and are sent, and
    /// the next change writes the file again.
    fn save(&self, saved: &Saved) {
        let text = serde_json::to_string(saved).unwrap_or_default();
        if let Err(error) = write_private(&self.path, &text) {
            tracing::warn!(%error, "could not write the usage ledger; it is kept in memory");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = crate::fresh_test_dir(&format!("usage-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn run(task: &str, seconds: i64, completed: bool) -> Run {
        Run {
            task_id: task.into(),
            namespace: "team-a".into(),
            pod_name: format!("pod-{task}"),
            started_unix_ms: 1_000,
            ended_unix_ms: 1_000 + seconds * 1000,
            cpu: Duration::from_millis(1_500),
            memory_bytes: 512 << 20,
            completed,
        }
    }

    #[test]
    fn a_run_is_charged_its_cpu_and_its_reserved_memory_over_the_time_held() {
        let dir = temp_dir("charge");
        let ledger = Ledger::open(&dir).unwrap();
        ledger.charge(run("a", 10, true));
        ledger.charge(run("b", 4, false));
        let sent = ledger.unsent();
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[0].sequence, 1);
        assert_eq!(sent[0].cpu_milliseconds, 1_500);
        assert_eq!(sent[0].memory_mib_seconds, 5_120, "512 MiB for 10 s");
        assert!(!sent[1].completed);
        assert_eq!(
            ledger.totals(),
            Totals {
                tasks: 1,
                interrupted: 1,
                cpu_milliseconds: 3_000,
                memory_mib_seconds: 5_120 + 2_048,
            }
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn records_are_sent_once_per_connection_and_kept_until_acknowledged() {
        let dir = temp_dir("ack");
        let ledger = Ledger::open(&dir).unwrap();
        ledger.charge(run("a", 1, true));
        ledger.charge(run("b", 1, true));
        assert_eq!(ledger.unsent().len(), 2);
        assert!(
            ledger.unsent().is_empty(),
            "sent already on this connection"
        );
        ledger.charge(run("c", 1, true));
        assert_eq!(ledger.unsent()[0].sequence, 3);
        ledger.acknowledge(2);
        assert_eq!(ledger.pending(), 1);
        // A new connection sends what is not acknowledged, again.
        ledger.resend();
        let again: Vec<u64> = ledger.unsent().iter().map(|r| r.sequence).collect();
        assert_eq!(again, vec![3]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_ledger_outlives_the_agent_and_never_reuses_a_sequence() {
        let dir = temp_dir("reopen");
        {
            let ledger = Ledger::open(&dir).unwrap();
            ledger.charge(run("a", 1, true));
            ledger.charge(run("b", 1, true));
            ledger.acknowledge(1);
        }
        let ledger = Ledger::open(&dir).unwrap();
        assert_eq!(ledger.pending(), 1);
        assert_eq!(ledger.totals().tasks, 2);
        ledger.charge(run("c", 1, true));
        let sequences: Vec<u64> = ledger.unsent().iter().map(|r| r.sequence).collect();
        assert_eq!(sequences, vec![2, 3]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_damaged_ledger_is_named_with_the_way_out() {
        let dir = temp_dir("damaged");
        std::fs::write(dir.join(LEDGER_FILE), "{not json").unwrap();
        let error = Ledger::open(&dir).err().unwrap().to_string();
        assert!(error.contains("usage.json is damaged"), "{error}");
        assert!(error.contains("move it aside"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
