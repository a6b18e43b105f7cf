//! The pod controller's messages to agents. Each stream's queue is bounded; what does not fit
//! waits here, in order per device, and is sent as the queue drains, so no assignment or stop
//! is lost to a burst. A message for a device without a live stream is dropped on purpose: the
//! device's Hello, when it comes back, says what it holds and the controller settles the rest.

use std::collections::{HashMap, VecDeque};

use darkcore_proto::agent::v1::{OperatorMessage, operator_message};
use tokio::sync::mpsc::error::TrySendError;

use crate::devices::registry::{AgentSender, Registry};

/// Messages held for one device beyond its stream's own queue. A device that leaves more
/// unread is cut off: it reconnects, and its Hello settles what it missed.
pub const WAITING_PER_DEVICE: usize = 1024;

#[derive(Default)]
pub struct Outbox {
    /// Per device, the stream the messages were meant for and the messages, oldest first.
    waiting: HashMap<String, (AgentSender, VecDeque<Box<OperatorMessage>>)>,
}

impl Outbox {
    /// Sends `body` to the device's current stream, after anything still waiting for it.
    pub fn send(&mut self, registry: &Registry, device: &str, body: operator_message::Body) {
        let Some(sender) = registry.sender(device) else {
            tracing::debug!(%device, "no live stream to the device; its Hello will settle the task");
            return;
        };
        let message = Box::new(OperatorMessage {
            version: darkcore_proto::PROTOCOL_VERSION as i32,
            body: Some(body),
        });
        match self.waiting.get_mut(device) {
            // The same stream: queue behind what waits. A new stream: the old one's backlog
            // went nowhere, and the device's Hello settles it.
            Some((waiting_for, queue)) if waiting_for.same_channel(&sender) => {
                if queue.len() < WAITING_PER_DEVICE {
                    queue.push_back(message);
                } else {
                    self.waiting.remove(device);
                    registry.cut_off(
                        device,
                        &format!("more than {WAITING_PER_DEVICE} messages to it were left unread"),
                    );
                }
                return;
            }
            Some(_) => {
                self.waiting.remove(device);
            }
            None => {}
        }
        match sender.try_send(message) {
            Ok(()) | Err(TrySendError::Closed(_)) => {}
            Err(TrySendError::Full(message)) => {
                self.waiting
                    .insert(device.to_string(), (sender, VecDeque::from([message])));
            }
        }
    }

    /// Moves waiting messages into their streams' queues as far as they have room.
    pub fn flush(&mut self) {
        self.waiting.retain(|_, (sender, queue)| {
            while let Some(message) = queue.pop_front() {
                match sender.try_send(message) {
                    Ok(()) => {}
                    Err(TrySendError::Closed(_)) => return false,
                    Err(TrySendError::Full(message)) => {
                        queue.push_front(message);
                        return true;
                    }
                }
            }
            false
        });
    }

    /// Whether anything waits.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Messages waiting, across devices (for tests: the controller only asks whether any wait).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.waiting.values().map(|(_, queue)| queue.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use darkcore_proto::agent::v1::TaskCancel;
    use tokio::sync::mpsc;

    use super::*;

    fn cancel(task: &str) -> operator_message::Body {
        operator_message::Body::TaskCancel(TaskCancel {
            task_id: task.into(),
            ..Default::default()
        })
    }

    fn task_of(message: Box<OperatorMessage>) -> String {
        match message.body {
            Some(operator_message::Body::TaskCancel(c)) => c.task_id,
            other => panic!("not a cancel: {other:?}"),
        }
    }

    fn connect(registry: &Registry, capacity: usize) -> mpsc::Receiver<Box<OperatorMessage>> {
        let (sender, receiver) = mpsc::channel(capacity);
        registry.attach_test_device("dev-1", sender);
        receiver
    }

    #[test]
    fn what_does_not_fit_waits_and_goes_out_in_order() {
        let registry = Registry::new();
        let mut receiver = connect(&registry, 2);
        let mut outbox = Outbox::default();
        for task in ["a", "b", "c", "d", "e"] {
            outbox.send(&registry, "dev-1", cancel(task));
        }
        assert_eq!(outbox.len(), 3);
        let mut received = Vec::new();
        while !outbox.is_empty() {
            while let Ok(message) = receiver.try_recv() {
                received.push(task_of(message));
            }
            outbox.flush();
        }
        while let Ok(message) = receiver.try_recv() {
            received.push(task_of(message));
        }
        assert_eq!(received, ["a", "b", "c", "d", "e"]);
    }

    #[test]
    fn a_new_stream_drops_the_old_streams_backlog() {
        let registry = Registry::new();
        let _old = connect(&registry, 1);
        let mut outbox = Outbox::default();
        outbox.send(&registry, "dev-1", cancel("a"));
        outbox.send(&registry, "dev-1", cancel("b"));
        assert_eq!(outbox.len(), 1);
        let mut new = connect(&registry, 4);
        outbox.send(&registry, "dev-1", cancel("c"));
        assert!(outbox.is_empty());
        assert_eq!(task_of(new.try_recv().expect("sent")), "c");
    }

    #[test]
    fn a_closed_stream_drops_its_backlog_and_nothing_goes_to_a_device_offline() {
        let registry = Registry::new();
        let receiver = connect(&registry, 1);
        let mut outbox = Outbox::default();
        outbox.send(&registry, "dev-1", cancel("a"));
        outbox.send(&registry, "dev-1", cancel("b"));
        drop(receiver);
        outbox.flush();
        assert!(outbox.is_empty());
        outbox.send(&registry, "dev-2", cancel("c"));
        assert!(outbox.is_empty());
    }

    #[test]
    fn a_device_that_reads_nothing_is_cut_off_not_buffered_without_end() {
        let registry = Registry::new();
        let (sender, _unread) = mpsc::channel(1);
        let (_, mut closed) = registry.attach_test_device("dev-1", sender);
        let mut outbox = Outbox::default();
        for n in 0..=WAITING_PER_DEVICE + 1 {
            outbox.send(&registry, "dev-1", cancel(&n.to_string()));
        }
        assert!(outbox.is_empty(), "its backlog is dropped");
        let refusal = closed.try_recv().expect("its stream is closed");
        assert_eq!(
            refusal.code,
            darkcore_proto::agent::v1::refusal::Code::SlowReader as i32
        );
    }
}
