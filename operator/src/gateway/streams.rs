//! User streams into devices (exec, and later attach and port-forward): the kubelet API asks a
//! device for one with `StreamOpen`, and the agent answers with an `OpenStream` call on its connection.
//!
//! The broker pairs the two by a random stream id, checks the caller is the device that was
//! asked, and bounds how many streams one device carries at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use darkcore_proto::agent::v1::{
    OperatorMessage, StreamDown, StreamOpen, StreamUp, operator_message, stream_up,
};
use futures::StreamExt as _;
use futures::stream::BoxStream;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::{mpsc, oneshot};
use tonic::{Status, Streaming};

use crate::devices::registry::Registry;

pub use darkcore_proto::{CONNECTION_WINDOW, MAX_STREAMS_PER_DEVICE, STREAM_WINDOW};
/// How long a device may take to answer a `StreamOpen`.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages queued toward the device on one stream (backpressure on the user's input).
const DOWN_QUEUE: usize = 8;

/// A device's messages up one stream.
pub type DeviceUp = BoxStream<'static, Result<StreamUp, tonic::Status>>;

/// The device's end of a session: its messages up, and a sender for ours down.
pub struct DeviceEnd {
    pub up: DeviceUp,
    pub down: mpsc::Sender<StreamDown>,
    /// Held while the session lasts (the device's stream count).
    pub permit: Box<dyn Send + Sync>,
}

/// The next message body the device sends up; an `Err` (for the user) when its stream broke
/// or ended without an end.
pub async fn next_up(up: &mut DeviceUp) -> Result<stream_up::Body, String> {
    loop {
        match up.next().await {
            Some(Ok(StreamUp { body: Some(body) })) => return Ok(body),
            Some(Ok(StreamUp { body: None })) => continue,
            Some(Err(status)) => {
                return Err(format!("the device's stream broke: {}", status.message()));
            }
            None => return Err("the device's stream ended without an outcome".into()),
        }
    }
}

struct Pending {
    device: String,
    deliver: oneshot::Sender<DeviceEnd>,
}

#[derive(Default)]
struct State {
    pending: HashMap<String, Pending>,
    /// Streams open or being opened, by device.
    carried: HashMap<String, usize>,
}

#[derive(Default)]
pub struct StreamBroker {
    state: Arc<Mutex<State>>,
}

/// A device's place among its streams, given back when dropped.
struct Permit {
    state: Arc<Mutex<State>>,
    device: String,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut state = lock(&self.state);
        if let Some(count) = state.carried.get_mut(&self.device) {
            *count -= 1;
            if *count == 0 {
                state.carried.remove(&self.device);
            }
        }
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

fn new_stream_id() -> Result<String, String> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "no randomness for a stream id".to_string())?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

impl StreamBroker {
    /// Asks `device` for a stream of `request` (its id is set here) and waits for the agent to
    /// open it. The error is for the user: what went wrong, and what to do.
    pub async fn open(
        &self,
        registry: &Registry,
        device: &str,
        mut request: StreamOpen,
    ) -> Result<DeviceEnd, String> {
        let sender = registry.sender(device).ok_or_else(|| {
            format!("device {device} is not connected now; try again once it is back")
        })?;
        let permit = self.admit(device)?;
        request.stream_id = new_stream_id()?;
        let id = request.stream_id.clone();
        let (deliver, delivered) = oneshot::channel();
        lock(&self.state).pending.insert(
            id.clone(),
            Pending {
                device: device.to_string(),
                deliver,
            },
        );
        let message = OperatorMessage {
            version: darkcore_proto::PROTOCOL_VERSION.into(),
            body: Some(operator_message::Body::StreamOpen(request)),
        };
        let asked = tokio::time::timeout(OPEN_TIMEOUT, async {
            sender
                .send(Box::new(message))
                .await
                .map_err(|_| format!("device {device} went away before the stream was asked"))?;
            delivered
                .await
                .map_err(|_| format!("device {device} refused the stream"))
        })
        .await;
        lock(&self.state).pending.remove(&id);
        let mut end = asked.map_err(|_| {
            format!(
                "device {device} did not open the stream within {} s (an agent too old for exec, or a slow link)",
                OPEN_TIMEOUT.as_secs()
            )
        })??;
        end.permit = Box::new(permit);
        Ok(end)
    }

    fn admit(&self, device: &str) -> Result<Permit, String> {
        let mut state = lock(&self.state);
        let count = state.carried.entry(device.to_string()).or_default();
        if *count >= MAX_STREAMS_PER_DEVICE {
            return Err(format!(
                "device {device} already carries {MAX_STREAMS_PER_DEVICE} streams, the most one device may; close one and try again"
            ));
        }
        *count += 1;
        Ok(Permit {
            state: self.state.clone(),
            device: device.to_string(),
        })
    }

    /// The gateway's side of `OpenStream` for `device` (from its certificate): reads the stream
    /// id, hands the call to whoever asked for it, and returns what to send the agent.
    pub async fn arrived(
        &self,
        device: &str,
        mut up: Streaming<StreamUp>,
    ) -> Result<mpsc::Receiver<StreamDown>, Status> {
        let first = tokio::time::timeout(OPEN_TIMEOUT, up.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no stream id within 10 s"))??;
        let Some(StreamUp {
            body: Some(stream_up::Body::StreamId(id)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "an OpenStream call starts with the stream id its StreamOpen gave",
            ));
        };
        let deliver = self
            .claim(device, &id)
            .ok_or_else(|| Status::not_found("no stream with this id is waiting"))?;
        let (down, to_agent) = mpsc::channel(DOWN_QUEUE);
        let end = DeviceEnd {
            up: up.boxed(),
            down,
            permit: Box::new(()),
        };
        deliver
            .send(end)
            .map_err(|_| Status::cancelled("the user's request is gone"))?;
        Ok(to_agent)
    }

    /// The waiting request for stream `id`, if `device` is the one it asked. Another device's
    /// stream and no stream get the same answer, so ids cannot be probed.
    fn claim(&self, device: &str, id: &str) -> Option<oneshot::Sender<DeviceEnd>> {
        let mut state = lock(&self.state);
        match state.pending.get(id) {
            Some(pending) if pending.device == device => {
                state.pending.remove(id).map(|p| p.deliver)
            }
            _ => None,
        }
    }

    /// Streams open or being opened for `device` (for tests and metrics).
    pub fn carried(&self, device: &str) -> usize {
        lock(&self.state).carried.get(device).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_carries_a_bounded_number_of_streams_and_gets_them_back() {
        let broker = StreamBroker::default();
        let permits: Vec<Permit> = (0..MAX_STREAMS_PER_DEVICE)
            .map(|_| broker.admit("dev-a").unwrap())
            .collect();
        let refused = broker.admit("dev-a").err().unwrap();
        assert!(refused.contains("close one and try again"), "{refused}");
        assert!(
            broker.admit("dev-b").is_ok(),
            "other devices are not held back"
        );
        drop(permits);
        assert_eq!(broker.carried("dev-a"), 0);
        assert!(broker.admit("dev-a").is_ok());
    }

    #[test]
    fn only_the_device_asked_can_take_a_stream() {
        let broker = StreamBroker::default();
        let (deliver, _delivered) = oneshot::channel();
        lock(&broker.state).pending.insert(
            "s1".into(),
            Pending {
                device: "dev-a".into(),
                deliver,
            },
        );
        assert!(broker.claim("dev-b", "s1").is_none());
        assert!(broker.claim("dev-a", "nope").is_none());
        assert!(broker.claim("dev-a", "s1").is_some());
        assert!(broker.claim("dev-a", "s1").is_none(), "taken once");
    }

    #[test]
    fn stuck_streams_cannot_fill_the_connection_window() {
        assert!(
            (MAX_STREAMS_PER_DEVICE as u64) * u64::from(STREAM_WINDOW)
                < u64::from(CONNECTION_WINDOW)
        );
    }

    #[test]
    fn stream_ids_are_random_and_unguessable() {
        let (a, b) = (new_stream_id().unwrap(), new_stream_id().unwrap());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
