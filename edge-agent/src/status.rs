//! What `darkcore-agent status` shows: `run` keeps `status.json` in the state dir current
//! (on every change, written atomically), and `status` reads it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::credit::{self, CreditDay};
use crate::identity::{IdentityError, write_private};
use crate::policy::Decision;
use crate::usage::{Ledger, Totals};

const STATUS_FILE: &str = "status.json";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub pid: u32,
    pub updated_unix: u64,
    pub device_id: String,
    pub pool: String,
    pub server: String,
    pub connected: bool,
    /// The connection in words: "connected since ...", "reconnecting in 4 s: ...".
    pub connection: String,
    pub available: bool,
    /// Why the device is or is not giving now.
    pub policy: String,
    pub offer_millicores: u32,
    pub offer_memory_bytes: u64,
    pub running_tasks: Vec<String>,
    /// CPU the agent's tasks used since it started, as the policy's sensors measure it.
    pub core_seconds_given: f64,
    /// The usage ledger's totals since the device joined.
    #[serde(default)]
    pub usage: Totals,
    /// Ledger records the operator has not acknowledged yet.
    #[serde(default)]
    pub usage_unacknowledged: usize,
    /// What the operator credits this device with, per UTC day, as it last said.
    #[serde(default)]
    pub credit: BTreeMap<String, CreditDay>,
    /// The key the operator signs statements with (base64), as its Welcome said.
    #[serde(default)]
    pub statement_key: String,
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The status file of a running agent, rewritten whenever something in it changes.
pub struct StatusFile {
    path: PathBuf,
    pub status: AgentStatus,
    written: Option<AgentStatus>,
    /// The latest status, for the metrics endpoint.
    published: watch::Sender<AgentStatus>,
}

impl StatusFile {
    pub fn new(state_dir: &Path, status: AgentStatus) -> StatusFile {
        StatusFile {
            path: state_dir.join(STATUS_FILE),
            published: watch::Sender::new(status.clone()),
            status,
            written: None,
        }
    }

    /// Follows the status as it changes.
    pub fn subscribe(&self) -> watch::Receiver<AgentStatus> {
        self.published.subscribe()
    }

    /// Records the latest decision, and the core-seconds given so far.
    pub fn policy(&mut self, decision: &Decision, core_seconds_given: f64) {
        self.status.available = decision.available;
        self.status.core_seconds_given = core_seconds_given;
        self.status.policy = decision.reason.clone();
        self.status.offer_millicores = decision.offer.millicores;
        self.status.offer_memory_bytes = decision.offer.memory_bytes;
        self.save();
    }

    pub fn usage(&mut self, ledger: &Ledger) {
        self.status.usage = ledger.totals();
        self.status.usage_unacknowledged = ledger.pending();
        self.save();
    }

    /// The operator told what it credits this device with on a day.
    pub fn credit(&mut self, standing: &darkcore_proto::agent::v1::CreditStanding) {
        credit::record(&mut self.status.credit, standing);
        self.save();
    }

    /// The operator's statement key, from its Welcome (kept when an operator sends none).
    pub fn statement_key(&mut self, key: &str) {
        if !key.is_empty() {
            self.status.statement_key = key.to_string();
            self.save();
        }
    }

    pub fn tasks(&mut self, running: Vec<String>) {
        self.status.running_tasks = running;
        self.save();
    }

    pub fn connection(&mut self, connected: bool, words: String) {
        self.status.connected = connected;
        self.status.connection = words;
        self.save();
    }

    /// Writes the file if anything changed. A failure is logged, never fatal: the status
    /// file is for people, and a full disk must not stop the agent.
    pub fn save(&mut self) {
        if self.written.as_ref() == Some(&self.status) {
            return;
        }
        self.status.updated_unix = now_unix();
        self.published.send_replace(self.status.clone());
        let text = serde_json::to_string_pretty(&self.status).unwrap_or_default();
        match write_private(&self.path, &text) {
            Ok(()) => self.written = Some(self.status.clone()),
            Err(error) => tracing::warn!(%error, "could not write the status file"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(
        "no agent status in {0}: the agent has not run with this state dir (start it with `darkcore-agent run`, or pass the --state-dir it uses)"
    )]
    Missing(PathBuf),
    #[error("{path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
    #[error(transparent)]
    Io(#[from] IdentityError),
}

/// Reads the status, and whether the agent that wrote it is still running.
pub fn read(state_dir: &Path) -> Result<(AgentStatus, bool), StatusError> {
    let path = state_dir.join(STATUS_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(StatusError::Missing(state_dir.to_path_buf()));
        }
        Err(source) => {
            return Err(StatusError::Io(IdentityError::Io {
                action: "reading",
                path,
                source,
            }));
        }
    };
    let status: AgentStatus = serde_json::from_str(&text).map_err(|e| StatusError::Damaged {
        path,
        reason: e.to_string(),
    })?;
    let running = Path::new(&format!("/proc/{}", status.pid)).exists();
    Ok((status, running))
}

/// The status as `darkcore-agent status` prints it.
pub fn render(status: &AgentStatus, running: bool) -> String {
    let age = now_unix().saturating_sub(status.updated_unix);
    let mut out = String::new();
    let state = if running {
        format!("running (pid {})", status.pid)
    } else {
        format!("not running (last seen {age} s ago)")
    };
    out.push_str(&format!("agent:       {state}\n"));
    out.push_str(&format!(
        "device:      {} in pool {}\n",
        status.device_id, status.pool
    ));
    out.push_str(&format!(
        "gateway:     {} ({})\n",
        status.server, status.connection
    ));
    out.push_str(&format!(
        "giving:      {}\n",
        if status.available { "yes" } else { "no" }
    ));
    out.push_str(&format!("why:         {}\n", status.policy));
    out.push_str(&format!(
        "offer:       {} CPU, {} MiB memory\n",
        f64::from(status.offer_millicores) / 1000.0,
        status.offer_memory_bytes >> 20
    ));
    out.push_str(&format!(
        "tasks:       {}\n",
        if status.running_tasks.is_empty() {
            "none running".to_string()
        } else {
            status.running_tasks.join(", ")
        }
    ));
    out.push_str(&format!(
        "given:       {:.1} core-seconds since the agent started\n",
        status.core_seconds_given
    ));
    let usage = &status.usage;
    out.push_str(&format!(
        "charged:     {} tasks completed, {} interrupted; {:.1} core-seconds, {:.1} GiB-seconds of memory since joining\n",
        usage.tasks,
        usage.interrupted,
        usage.cpu_milliseconds as f64 / 1000.0,
        usage.memory_mib_seconds as f64 / 1024.0,
    ));
    if status.usage_unacknowledged > 0 {
        out.push_str(&format!(
            "             {} records wait for the operator to store them\n",
            status.usage_unacknowledged
        ));
    }
    out.push_str(&credit::render(&status.credit));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_status_reads_back_and_renders() {
        let dir = std::env::temp_dir().join(format!("darkcore-status-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut file = StatusFile::new(
            &dir,
            AgentStatus {
                pid: std::process::id(),
                device_id: "dev-0123456789ab".into(),
                pool: "lab".into(),
                ..Default::default()
            },
        );
        file.connection(true, "connected".into());
        let (status, running) = read(&dir).unwrap();
        assert!(running);
        assert!(status.connected);
        let text = render(&status, running);
        assert!(text.contains("dev-0123456789ab in pool lab"), "{text}");
        assert!(text.contains("none running"), "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_status_says_how_to_get_one() {
        let err = read(Path::new("/nonexistent/darkcore"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("darkcore-agent run"), "{err}");
    }
}
