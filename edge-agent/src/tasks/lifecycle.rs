//! The kubelet's rules for a pod's containers, as pure functions: whether an exited container
//! restarts, how long the crash-loop back-off waits, and what phase the task is in.

use std::time::Duration;

use darkcore_proto::agent::v1::{TaskPhase, task_assign::RestartPolicy};

/// The first crash-loop back-off, doubled per restart up to [`MAX_BACKOFF`] (as the kubelet).
pub const INITIAL_BACKOFF: Duration = Duration::from_secs(10);
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// A run that lasted this long resets the back-off.
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(600);

/// Whether a regular container that exited with `code` runs again.
pub fn restarts(policy: RestartPolicy, code: i32) -> bool {
    match policy {
        RestartPolicy::Always | RestartPolicy::Unspecified => true,
        RestartPolicy::OnFailure => code != 0,
        RestartPolicy::Never => false,
    }
}

/// Whether a failed init container is tried again (the kubelet retries unless Never).
pub fn init_retries(policy: RestartPolicy) -> bool {
    policy != RestartPolicy::Never
}

/// The wait before restart number `streak` (1 for the first) of a crash loop.
pub fn backoff(streak: u32) -> Duration {
    let doublings = streak.saturating_sub(1).min(16);
    (INITIAL_BACKOFF * 2u32.pow(doublings)).min(MAX_BACKOFF)
}

/// One regular container's standing, for the task's phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Running, starting, or waiting to restart.
    Live,
    /// Exited for good with this code.
    Done(i32),
}

/// The task's phase once its init containers have completed.
pub fn phase(containers: &[Standing]) -> TaskPhase {
    if containers.contains(&Standing::Live) || containers.is_empty() {
        return TaskPhase::Running;
    }
    if containers.iter().all(|c| *c == Standing::Done(0)) {
        TaskPhase::Succeeded
    } else {
        TaskPhase::Failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_policy_decides_who_runs_again() {
        assert!(restarts(RestartPolicy::Always, 0));
        assert!(restarts(RestartPolicy::Always, 1));
        assert!(!restarts(RestartPolicy::OnFailure, 0));
        assert!(restarts(RestartPolicy::OnFailure, 2));
        assert!(!restarts(RestartPolicy::Never, 2));
        assert!(!init_retries(RestartPolicy::Never));
        assert!(init_retries(RestartPolicy::OnFailure));
    }

    #[test]
    fn back_off_doubles_from_ten_seconds_to_five_minutes() {
        assert_eq!(backoff(1), Duration::from_secs(10));
        assert_eq!(backoff(2), Duration::from_secs(20));
        assert_eq!(backoff(5), Duration::from_secs(160));
        assert_eq!(backoff(6), MAX_BACKOFF);
        assert_eq!(backoff(60), MAX_BACKOFF);
    }

    #[test]
    fn phase_follows_the_containers() {
        use Standing::*;
        assert_eq!(phase(&[Live, Done(0)]), TaskPhase::Running);
        assert_eq!(phase(&[Done(0), Done(0)]), TaskPhase::Succeeded);
        assert_eq!(phase(&[Done(0), Done(3)]), TaskPhase::Failed);
    }
}
