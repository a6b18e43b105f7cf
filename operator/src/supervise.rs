//! The operator's background loops, watched: when one ends or panics, the operator stops (and
//! /readyz says why) instead of staying Ready while, say, no pod is dispatched any more.

use std::future::Future;

use tokio::task::JoinHandle;

/// Loops that must run as long as the operator acts.
#[derive(Default)]
pub struct Supervisor {
    loops: Vec<(&'static str, JoinHandle<()>)>,
}

/// A loop that stopped, and how.
#[derive(Debug, thiserror::Error)]
pub enum Stopped {
    #[error("the {0} loop ended")]
    Ended(&'static str),
    #[error("the {0} loop panicked: {1}")]
    Panicked(&'static str, String),
}

impl Supervisor {
    /// Spawns `work` as the loop called `name`.
    pub fn spawn(&mut self, name: &'static str, work: impl Future<Output = ()> + Send + 'static) {
        self.watch(name, tokio::spawn(work));
    }

    /// Watches a loop already spawned.
    pub fn watch(&mut self, name: &'static str, handle: JoinHandle<()>) {
        self.loops.push((name, handle));
    }

    /// Waits until a loop stops; never returns while all run (or when there are none).
    pub async fn first_stopped(&mut self) -> Stopped {
        if self.loops.is_empty() {
            return std::future::pending().await;
        }
        let handles = self.loops.iter_mut().map(|(_, handle)| handle);
        let (result, index, _) = futures::future::select_all(handles).await;
        let (name, _) = self.loops.remove(index);
        match result {
            Ok(()) => Stopped::Ended(name),
            Err(error) if error.is_panic() => {
                let payload = error.into_panic();
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".into());
                Stopped::Panicked(name, message)
            }
            Err(_) => Stopped::Ended(name),
        }
    }

    /// Stops every loop.
    pub fn abort_all(&self) {
        for (_, handle) in &self.loops {
            handle.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_panicking_loop_is_named_with_its_message() {
        let mut loops = Supervisor::default();
        loops.spawn("steady", std::future::pending());
        loops.spawn("pod", async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            panic!("the pod loop broke");
        });
        let stopped = loops.first_stopped().await;
        assert_eq!(
            stopped.to_string(),
            "the pod loop panicked: the pod loop broke"
        );
        loops.abort_all();
    }

    #[tokio::test]
    async fn a_loop_that_returns_is_reported_too() {
        let mut loops = Supervisor::default();
        loops.spawn("steady", std::future::pending());
        loops.spawn("usage", async {});
        assert_eq!(
            loops.first_stopped().await.to_string(),
            "the usage loop ended"
        );
        // None left but the steady one: nothing more stops.
        let more = tokio::time::timeout(Duration::from_millis(50), loops.first_stopped()).await;
        assert!(more.is_err());
        loops.abort_all();
    }
}
