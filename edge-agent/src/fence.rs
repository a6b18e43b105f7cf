//! Fencing, the agent's half: once the operator has not acknowledged a heartbeat for the
//! pool's fence time, the agent stops its tasks itself, because the operator then runs them
//! elsewhere. Time counts from when the last acknowledged heartbeat was *sent*: the operator
//! heard it after that, so it waits at least as long as the agent does.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Heartbeats remembered while unacknowledged; older ones are forgotten (an ack for one of
/// them then counts for nothing, which only fences sooner).
const REMEMBERED: usize = 64;

#[derive(Debug)]
struct State {
    /// The pool's fence; `None`: never fence (the pool keeps tasks running, or no operator
    /// has welcomed this agent yet).
    fence: Option<Duration>,
    /// The operator has heard this agent as late as this.
    heard: Instant,
    /// Heartbeats sent and not yet acknowledged: sequence and when.
    sent: VecDeque<(u64, Instant)>,
}

#[derive(Debug)]
pub struct Fence {
    state: Mutex<State>,
}

impl Default for Fence {
    fn default() -> Self {
        Fence {
            state: Mutex::new(State {
                fence: None,
                heard: Instant::now(),
                sent: VecDeque::new(),
            }),
        }
    }
}

impl Fence {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The operator welcomed a stream whose Hello was sent at `dialled`; `fence_seconds` is
    /// the pool's (0: never fence).
    pub fn welcomed(&self, dialled: Instant, fence_seconds: u32) {
        let mut state = self.lock();
        state.fence = (fence_seconds > 0).then(|| Duration::from_secs(u64::from(fence_seconds)));
        state.heard = state.heard.max(dialled);
        state.sent.clear();
    }

    /// Heartbeat `sequence` went out at `at`.
    pub fn sent(&self, sequence: u64, at: Instant) {
        let mut state = self.lock();
        if state.sent.len() == REMEMBERED {
            state.sent.pop_front();
        }
        state.sent.push_back((sequence, at));
    }

    /// The operator acknowledged heartbeat `sequence`.
    pub fn acknowledged(&self, sequence: u64) {
        let mut state = self.lock();
        let Some(position) = state.sent.iter().position(|(s, _)| *s == sequence) else {
            return;
        };
        let at = state.sent[position].1;
        state.sent.drain(..=position);
        state.heard = state.heard.max(at);
    }

    /// How long past its fence the device is at `now`: `Some` once the operator may run its
    /// tasks elsewhere.
    pub fn overdue(&self, now: Instant) -> Option<Duration> {
        let state = self.lock();
        let fence = state.fence?;
        let silent = now.saturating_duration_since(state.heard);
        (silent >= fence).then_some(silent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn without_a_welcome_or_with_fence_zero_nothing_is_fenced() {
        let fence = Fence::default();
        assert_eq!(fence.overdue(Instant::now() + 1000 * S), None);
        fence.welcomed(Instant::now(), 0);
        assert_eq!(fence.overdue(Instant::now() + 1000 * S), None);
    }

    #[test]
    fn the_fence_counts_from_when_the_last_acknowledged_heartbeat_was_sent() {
        let fence = Fence::default();
        let t0 = Instant::now();
        fence.welcomed(t0, 30);
        assert_eq!(fence.overdue(t0 + 29 * S), None);
        assert_eq!(fence.overdue(t0 + 30 * S), Some(30 * S));
        // Beats at 5 s and 10 s; only the first is acknowledged (later): it counts from 5 s.
        fence.sent(1, t0 + 5 * S);
        fence.sent(2, t0 + 10 * S);
        fence.acknowledged(1);
        assert_eq!(fence.overdue(t0 + 34 * S), None);
        assert_eq!(fence.overdue(t0 + 35 * S), Some(30 * S));
        fence.acknowledged(2);
        assert_eq!(fence.overdue(t0 + 39 * S), None);
        // An ack for a beat never sent, or already counted, changes nothing.
        fence.acknowledged(2);
        fence.acknowledged(99);
        assert!(fence.overdue(t0 + 40 * S).is_some());
    }

    #[test]
    fn a_new_stream_counts_from_its_hello() {
        let fence = Fence::default();
        let t0 = Instant::now();
        fence.welcomed(t0, 10);
        fence.sent(1, t0 + S);
        // Reconnected at 20 s: beat 1 of the old stream is forgotten.
        fence.welcomed(t0 + 20 * S, 10);
        fence.acknowledged(1);
        assert_eq!(fence.overdue(t0 + 29 * S), None);
        assert!(fence.overdue(t0 + 30 * S).is_some());
    }
}
