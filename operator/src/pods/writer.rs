//! The pod controller's writes, off its loop: status by server-side apply (coalesced per pod:
//! only the latest wanted status is written, one write per pod at a time, by a few workers,
//! retried with backoff until it lands or the pod is gone), final deletions with a UID
//! precondition (retried too), and Events.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource};
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::pool::FIELD_MANAGER;

/// Status writes in flight at once.
pub const WRITERS: usize = 8;

struct Wanted {
    namespace: String,
    name: String,
    uid: String,
    status: PodStatus,
}

/// Statuses waiting to be written, and the pods whose write is in flight. A pod is queued at
/// most once and written by one worker at a time, so writes for one pod land in order.
#[derive(Default)]
struct Pending {
    wanted: HashMap<String, Wanted>,
    writing: HashSet<String>,
    /// Pods whose last write failed, with the wait before the next try.
    failing: HashMap<String, Duration>,
}

/// The first wait before a failed write is tried again; it doubles up to the most.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// The wait after `wait` when a retry fails too.
fn backoff(wait: Duration) -> Duration {
    (wait * 2).min(RETRY_MAX)
}

pub struct Writer {
    client: Client,
    metrics: Arc<Metrics>,
    recorder: Recorder,
    pending: Mutex<Pending>,
    queue: mpsc::UnboundedSender<String>,
}

impl Writer {
    pub fn start(client: Client, metrics: Arc<Metrics>, recorder: Recorder) -> Arc<Writer> {
        let (queue, receiver) = mpsc::unbounded_channel();
        let writer = Arc::new(Writer {
            client,
            metrics,
            recorder,
            pending: Mutex::default(),
            queue,
        });
        let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
        for _ in 0..WRITERS {
            let (writer, receiver) = (writer.clone(), receiver.clone());
            tokio::spawn(async move {
                loop {
                    let Some(uid) = receiver.lock().await.recv().await else {
                        return;
                    };
                    writer.write(&uid).await;
                }
            });
        }
        writer
    }

    /// Asks for the pod's status to become `status`; a later call before the write replaces it.
    pub fn status(&self, pod: &Pod, status: PodStatus) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let wanted = Wanted {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            uid: uid.clone(),
            status,
        };
        let mut pending = self.pending();
        let queued = pending.wanted.insert(uid.clone(), wanted).is_some();
        if !queued && !pending.writing.contains(&uid) {
            let _ = self.queue.send(uid);
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the pod's latest wanted status; one that arrived meanwhile is queued again after.
    /// A failed write stays wanted (unless a newer status replaced it) and is tried again
    /// after a backoff: a pod's outcome must land before its device forgets it.
    async fn write(self: &Arc<Self>, uid: &str) {
        let wanted = {
            let mut pending = self.pending();
            let Some(wanted) = pending.wanted.remove(uid) else {
                return;
            };
            pending.writing.insert(uid.to_string());
            wanted
        };
        let failed = self.apply(&wanted).await.err();
        let mut pending = self.pending();
        pending.writing.remove(uid);
        let Some(error) = failed else {
            pending.failing.remove(uid);
            if pending.wanted.contains_key(uid) {
                let _ = self.queue.send(uid.to_string());
            }
            return;
        };
        let wait = pending
            .failing
            .get(uid)
            .map_or(RETRY_FIRST, |wait| backoff(*wait));
        pending.failing.insert(uid.to_string(), wait);
        tracing::warn!(pod = %format!("{}/{}", wanted.namespace, wanted.name), %error, retry_in = ?wait, "writing pod status");
        pending.wanted.entry(uid.to_string()).or_insert(wanted);
        drop(pending);
        let (writer, uid) = (self.clone(), uid.to_string());
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let pending = writer.pending();
            if pending.wanted.contains_key(&uid) && !pending.writing.contains(&uid) {
                let _ = writer.queue.send(uid);
            }
        });
    }

    /// One write of a wanted status. A pod that is gone (404), or replaced by another of its
    /// name (409 on the UID), needs none.
    async fn apply(&self, wanted: &Wanted) -> Result<(), kube::Error> {
        let mut status = wanted.status.clone();
        // PodScheduled belongs to the scheduler.
        if let Some(conditions) = status.conditions.as_mut() {
            conditions.retain(|c| c.type_ != "PodScheduled");
        }
        let patch = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": wanted.name, "namespace": wanted.namespace, "uid": wanted.uid },
            "status": status,
        });
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &wanted.namespace);
        self.metrics.api_write("pod_status", "apply");
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match api
            .patch_status(&wanted.name, &params, &Patch::Apply(&patch))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Deletes a pod whose task has stopped, with grace 0 and its UID as precondition, retried
    /// with backoff until it lands or the pod is gone.
    pub fn delete(&self, pod: &Pod) {
        let (client, metrics) = (self.client.clone(), self.metrics.clone());
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let uid = pod.metadata.uid.clone();
        tokio::spawn(async move {
            let api: Api<Pod> = Api::namespaced(client, &namespace);
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid,
                    resource_version: None,
                }),
                ..Default::default()
            };
            // Until it lands or the pod is gone (404) or is another pod of that name (409): a
            // delete lost to a failing API server would leave the pod Terminating for ever.
            let mut wait = RETRY_FIRST;
            loop {
                metrics.api_write("pod", "delete");
                match api.delete(&name, &params).await {
                    Ok(_) => return,
                    Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => return,
                    Err(error) => {
                        tracing::warn!(pod = %format!("{namespace}/{name}"), %error, retry_in = ?wait, "deleting a stopped pod");
                    }
                }
                tokio::time::sleep(wait).await;
                wait = backoff(wait);
            }
        });
    }

    /// Publishes an Event on the pod.
    pub fn event(&self, pod: &Pod, warning: bool, reason: &str, note: String) {
        let recorder = self.recorder.clone();
        let reference = pod.object_ref(&());
        let metrics = self.metrics.clone();
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note),
            action: reason.into(),
            secondary: None,
        };
        tokio::spawn(async move {
            metrics.api_write("event", "create");
            if let Err(error) = recorder.publish(&event, &reference).await {
                tracing::debug!(%error, "publishing a pod event");
            }
        });
    }
}
