//! A test-only mode in which this agent lies about results, as a broken or cheating device
//! would, so that tests and benchmarks can prove validation catches it (`[testing] fault`).
//!
//! It gives an owner no power they lack: whoever runs the device can change the agent. It
//! touches only tasks whose results are checked (those assigned with a `ResultSpec`).

use darkcore_proto::agent::v1::{
    ContainerStatus, TaskAssign, TaskPhase, TaskStatus, container_status::State,
};

use crate::digest::sha256_hex;

/// How the agent lies: `fault = "wrong-result"` or `"fake-success"` in the config's
/// `[testing]` section.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// Runs the task, then reports a wrong digest: broken hardware, or an overclocked CPU.
    /// Every faulty agent gives the same wrong digest for the same result, as colluding
    /// liars would.
    WrongResult,
    /// Reports Succeeded at once without running anything, with a made-up digest.
    FakeSuccess,
}

impl Fault {
    /// The status that claims `task` succeeded without running it, if this fault skips it.
    pub fn skipped(self, task: &TaskAssign) -> Option<TaskStatus> {
        if self != Fault::FakeSuccess || task.result.is_none() {
            return None;
        }
        let exited = |name: &String| ContainerStatus {
            name: name.clone(),
            state: State::Terminated as i32,
            reason: "Completed".into(),
            ..Default::default()
        };
        Some(TaskStatus {
            task_id: task.task_id.clone(),
            phase: TaskPhase::Succeeded as i32,
            init_containers: task
                .init_containers
                .iter()
                .map(|c| exited(&c.name))
                .collect(),
            containers: task.containers.iter().map(|c| exited(&c.name)).collect(),
            result_digest: made_up(&format!("fake {}", task.pod_uid)),
            ..Default::default()
        })
    }

    /// Corrupts the digest of a status on its way to the operator.
    pub fn corrupt(self, status: &mut TaskStatus) {
        if self == Fault::WrongResult && !status.result_digest.is_empty() {
            status.result_digest = made_up(&format!("wrong {}", status.result_digest));
        }
    }
}

fn made_up(seed: &str) -> String {
    format!("sha256:{}", sha256_hex(seed.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use darkcore_proto::agent::v1::{Container, ResultSpec};

    fn checked(uid: &str) -> TaskAssign {
        TaskAssign {
            task_id: format!("{uid}.1"),
            pod_uid: uid.into(),
            containers: vec![Container {
                name: "main".into(),
                ..Default::default()
            }],
            result: Some(ResultSpec::default()),
            ..Default::default()
        }
    }

    #[test]
    fn a_fake_success_claims_every_container_completed_for_checked_tasks_only() {
        let status = Fault::FakeSuccess.skipped(&checked("u")).unwrap();
        assert_eq!(status.phase, TaskPhase::Succeeded as i32);
        assert_eq!(status.containers[0].state, State::Terminated as i32);
        assert!(status.result_digest.starts_with("sha256:"));
        let unchecked = TaskAssign {
            result: None,
            ..checked("u")
        };
        assert_eq!(Fault::FakeSuccess.skipped(&unchecked), None);
        assert_eq!(Fault::WrongResult.skipped(&checked("u")), None);
    }

    #[test]
    fn a_wrong_result_differs_from_the_honest_one_the_same_way_on_every_liar() {
        let honest = made_up("honest");
        let lie = |fault: Fault| {
            let mut status = TaskStatus {
                result_digest: honest.clone(),
                ..Default::default()
            };
            fault.corrupt(&mut status);
            status.result_digest
        };
        assert_ne!(lie(Fault::WrongResult), honest);
        assert_eq!(lie(Fault::WrongResult), lie(Fault::WrongResult));
        assert_eq!(lie(Fault::FakeSuccess), honest);
    }
}
