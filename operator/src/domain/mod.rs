//! The words several parts of the operator share (the pod controller, the gateway, the
//! kubelet API, usage, devices): task ids, a pod's demand, Kubernetes quantities and the wall
//! clock, kept here so none of them depends on another.

pub mod quantity;

/// A pod's demand on the device that runs it (worked out in `pods::demand`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Demand {
    /// Requests: the larger of its init containers' and the sum of its containers'.
    pub millicores: u64,
    pub memory: u64,
    /// The most CPU its limits let it use at once; `None` when a container sets no limit
    /// (it may use all the device offers).
    pub cpu_limit: Option<u64>,
}

/// A task: attempt `number` (1 for the first) of the pod with `uid`, written `<uid>.<number>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TaskId {
    pub uid: String,
    pub number: u32,
}

impl TaskId {
    pub fn parse(text: &str) -> Option<TaskId> {
        let (uid, number) = TaskId::split(text)?;
        Some(TaskId {
            uid: uid.to_string(),
            number,
        })
    }

    /// The pod uid and attempt number in a task id's text, without copying.
    pub fn split(text: &str) -> Option<(&str, u32)> {
        let (uid, number) = text.rsplit_once('.')?;
        Some((uid, number.parse().ok()?))
    }
}

impl std::fmt::Display for TaskId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.uid, self.number)
    }
}

/// Why an attempt ended without the pod's own doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossReason {
    /// Its device went quiet, or came back without the task.
    DeviceLost,
    /// Its device handed the task back (the owner came back, the agent stopped).
    Preempted,
    /// A reissued replica did not return its result by the pool's reissue deadline.
    ReplicaDeadline,
}

impl LossReason {
    pub fn as_str(self) -> &'static str {
        match self {
            LossReason::DeviceLost => "DeviceLost",
            LossReason::Preempted => "Preempted",
            LossReason::ReplicaDeadline => "ReplicaDeadline",
        }
    }

    /// The reason a pod's status shows, read back.
    pub fn parse(text: &str) -> Option<LossReason> {
        [
            LossReason::DeviceLost,
            LossReason::Preempted,
            LossReason::ReplicaDeadline,
        ]
        .into_iter()
        .find(|reason| reason.as_str() == text)
    }
}

/// How a pod's status names the attempt its containers run as: `darkcore://<device>/<task id>`
/// in each containerID.
pub mod container_id {
    const SCHEME: &str = "darkcore://";

    pub fn of(device: &str, task: &str) -> String {
        format!("{SCHEME}{device}/{task}")
    }

    /// The task id and device a containerID darkcore wrote names.
    pub fn attempt(container_id: &str) -> Option<(String, String)> {
        let (device, task) = container_id.strip_prefix(SCHEME)?.split_once('/')?;
        Some((task.to_string(), device.to_string()))
    }

    /// The task id and device of container `name`'s run, if the pod's status shows it running.
    pub fn running_attempt(
        pod: &k8s_openapi::api::core::v1::Pod,
        name: &str,
    ) -> Option<(String, String)> {
        let status = pod.status.as_ref()?;
        status
            .init_container_statuses
            .iter()
            .flatten()
            .chain(status.container_statuses.iter().flatten())
            .filter(|s| s.name == name)
            .filter(|s| {
                s.state
                    .as_ref()
                    .is_some_and(|state| state.running.is_some())
            })
            .find_map(|s| attempt(s.container_id.as_deref()?))
    }

    /// The task id, device and container name of a running container of the pod, if any
    /// runs (all of a pod's containers run in one task).
    pub fn any_running_attempt(
        pod: &k8s_openapi::api::core::v1::Pod,
    ) -> Option<(String, String, String)> {
        let status = pod.status.as_ref()?;
        status.container_statuses.iter().flatten().find_map(|s| {
            let (task, device) = running_attempt(pod, &s.name)?;
            Some((task, device, s.name.clone()))
        })
    }

    /// The task id and device of the attempt a pod's status records, if it was ever placed.
    pub fn recorded_attempt(pod: &k8s_openapi::api::core::v1::Pod) -> Option<(String, String)> {
        let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
        statuses
            .iter()
            .find_map(|s| attempt(s.container_id.as_deref()?))
    }
}

/// Whether the operator hears a device now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Presence {
    Online,
    /// Silent past its pool's `deviceLostAfterSeconds`; last heard at that moment.
    Away {
        last_heard: std::time::Instant,
    },
    /// Not heard of since this operator started.
    Unknown,
}

/// Milliseconds since the Unix epoch, as pod statuses and usage records show times.
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_running_container_names_the_attempt_to_exec_in() {
        use k8s_openapi::api::core::v1::{
            ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStatus, Pod,
            PodStatus,
        };
        let status = |name: &str, running: bool| ContainerStatus {
            name: name.into(),
            container_id: Some(container_id::of("dev-1", "uid.2")),
            state: Some(if running {
                ContainerState {
                    running: Some(ContainerStateRunning::default()),
                    ..Default::default()
                }
            } else {
                ContainerState {
                    terminated: Some(ContainerStateTerminated::default()),
                    ..Default::default()
                }
            }),
            ..Default::default()
        };
        let pod = Pod {
            status: Some(PodStatus {
                container_statuses: Some(vec![status("app", true), status("done", false)]),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            container_id::running_attempt(&pod, "app"),
            Some(("uid.2".into(), "dev-1".into()))
        );
        assert_eq!(container_id::running_attempt(&pod, "done"), None);
        assert_eq!(
            container_id::any_running_attempt(&pod),
            Some(("uid.2".into(), "dev-1".into(), "app".into()))
        );
        assert_eq!(container_id::running_attempt(&pod, "other"), None);
    }

    #[test]
    fn task_ids_read_back_as_written() {
        let task = TaskId {
            uid: "a.b-c".into(),
            number: 12,
        };
        assert_eq!(TaskId::parse(&task.to_string()), Some(task));
        assert_eq!(TaskId::parse("no-number"), None);
        assert_eq!(TaskId::parse("uid.x"), None);
    }
}
