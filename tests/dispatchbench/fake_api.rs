//! An in-process stand-in for the API server, so the dispatch bench measures the operator
//! alone: every write is accepted at once and echoed back, reads find nothing. It counts the
//! writes, and notes when each pod's status first says Running (or already Succeeded) and
//! how many say Succeeded.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use tokio::sync::Notify;

#[derive(Clone, Copy, Default)]
pub struct Writes {
    pub status: u64,
    pub events: u64,
    pub other: u64,
}

#[derive(Default)]
struct Seen {
    writes: Writes,
    running: HashMap<String, Instant>,
    succeeded: usize,
}

#[derive(Clone, Default)]
pub struct FakeApi {
    seen: Arc<Mutex<Seen>>,
    changed: Arc<Notify>,
}

impl FakeApi {
    pub fn new() -> FakeApi {
        FakeApi::default()
    }

    fn seen(&self) -> MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The service a `kube::Client` is built on.
    pub fn service(
        self,
    ) -> impl tower::Service<
        Request<kube::client::Body>,
        Response = Response<Full<Bytes>>,
        Error = Infallible,
        Future = impl Send,
    > + Send
    + Clone
    + use<> {
        let api = self;
        tower::service_fn(move |request| {
            let api = api.clone();
            async move { Ok::<_, Infallible>(api.answer(request).await) }
        })
    }

    async fn answer(&self, request: Request<kube::client::Body>) -> Response<Full<Bytes>> {
        let (parts, body) = request.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let path = parts.uri.path();
        let reply = |status: StatusCode, body: Bytes| {
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Full::new(body))
                .expect("a valid response")
        };
        if parts.method == Method::GET {
            let missing = serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": "NotFound", "code": 404, "message": format!("{path} not found"),
            });
            return reply(StatusCode::NOT_FOUND, missing.to_string().into());
        }
        let object: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        {
            let mut seen = self.seen();
            if parts.method == Method::PATCH && path.ends_with("/status") {
                seen.writes.status += 1;
                let name = path.rsplit('/').nth(1).unwrap_or_default().to_string();
                // A status written Succeeded first (the writer coalesces) ran, too.
                let phase = object["status"]["phase"].as_str();
                if matches!(phase, Some("Running" | "Succeeded")) {
                    seen.running.entry(name).or_insert_with(Instant::now);
                }
                if phase == Some("Succeeded") {
                    seen.succeeded += 1;
                }
            } else if path.contains("/events") {
                seen.writes.events += 1;
            } else {
                seen.writes.other += 1;
            }
        }
        self.changed.notify_waiters();
        if parts.method == Method::DELETE {
            let done =
                serde_json::json!({ "kind": "Status", "apiVersion": "v1", "status": "Success" });
            return reply(StatusCode::OK, done.to_string().into());
        }
        reply(StatusCode::OK, body)
    }

    /// Forgets what was seen, before a new burst.
    pub fn reset(&self) {
        *self.seen() = Seen::default();
    }

    pub fn succeeded(&self) -> usize {
        self.seen().succeeded
    }

    pub fn writes(&self) -> Writes {
        self.seen().writes
    }

    /// Waits until `count` pods have been written Succeeded.
    pub async fn all_succeeded(&self, count: usize) {
        loop {
            let changed = self.changed.notified();
            if self.succeeded() >= count {
                return;
            }
            changed.await;
        }
    }

    /// Each pod's time from being fed to its first Running (or Succeeded) status write.
    pub fn running_latencies(&self, fed: &HashMap<String, Instant>) -> Vec<Duration> {
        let seen = self.seen();
        seen.running
            .iter()
            .filter_map(|(name, at)| Some(at.saturating_duration_since(*fed.get(name)?)))
            .collect()
    }
}
