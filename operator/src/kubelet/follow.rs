//! Following a container's current run in the log store as it grows, for `kubectl logs -f`
//! and `kubectl attach`: new lines as they come, until the run ends or the pod goes.

use std::sync::Arc;
use std::time::Duration;

use crate::kubelet::KubeletState;
use crate::kubelet::log_store::Line;

/// How often a follower re-checks that its pod still exists while no output comes.
const RECHECK: Duration = Duration::from_secs(5);

/// A reader of one container's current run, from line `from` on.
pub struct Follower {
    pub state: Arc<KubeletState>,
    pub uid: String,
    pub container: String,
    pub namespace: String,
    pub pod_name: String,
    /// Lines of the run read so far.
    pub from: u64,
}

impl Follower {
    /// A follower of what the container writes from now on.
    pub fn from_now(
        state: Arc<KubeletState>,
        uid: String,
        container: String,
        (namespace, pod_name): (String, String),
    ) -> Follower {
        let from = state
            .logs
            .read(&uid, &container, false, u64::MAX)
            .map_or(0, |read| read.next);
        Follower {
            state,
            uid,
            container,
            namespace,
            pod_name,
            from,
        }
    }

    /// The next lines, waiting for them; `None` when the run ended or the pod is gone.
    pub async fn next(&mut self) -> Option<Vec<Line>> {
        loop {
            let read = self
                .state
                .logs
                .read(&self.uid, &self.container, false, self.from)?;
            let notified = read.changed.notified();
            if !read.lines.is_empty() {
                self.from = read.next;
                return Some(read.lines);
            }
            let pod_gone = self
                .state
                .pods
                .get(&self.namespace, &self.pod_name)
                .is_none_or(|p| p.metadata.uid.as_deref() != Some(self.uid.as_str()));
            if read.ended || pod_gone {
                return None;
            }
            let _ = tokio::time::timeout(RECHECK, notified).await;
        }
    }
}
