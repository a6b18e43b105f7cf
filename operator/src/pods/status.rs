//! A pod's status as darkcore reports it (pure): phase, conditions, container states with
//! restart counts across devices, and the attempt record in each containerID
//! (`darkcore://<device>/<task id>`), which is how a restarted operator knows which attempt
//! the pod is on. Written only when it differs from what the pod already shows.

use darkcore_proto::agent::v1::{
    ContainerStatus as TaskContainerStatus, TaskPhase, TaskStatus, Termination,
    container_status::State,
};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::conditions::{status_word, transition_time};
use crate::domain::{LossReason, TaskId, container_id};
use crate::kubelet::kept_output;

/// The condition that says whether darkcore has placed the pod on a device, and why not.
pub const PLACED_CONDITION: &str = "darkcore.io/Placed";
/// The Ready condition's reason while the pod's device is silent.
pub const DEVICE_SILENT: &str = "DeviceSilent";

/// An attempt that ended without the pod's own doing. Shown as the containers' `lastState`
/// (with the attempt in its containerID), which is how a restarted operator knows it: the
/// restart count goes on from it, and a lost attempt's charge is made again if need be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loss {
    pub reason: LossReason,
    pub message: String,
    /// The lost attempt and its device.
    pub task: TaskId,
    pub device: String,
    /// When it was sent, and when it ended (for a lost device: when it was last heard), in
    /// Unix ms.
    pub started_ms: i64,
    pub at_unix_ms: i64,
}

/// What the operator knows about the pod's run: everything its status is rendered from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunView {
    /// The attempt on a device: its number (1 for the first), device and task id.
    pub attempt: Option<(u32, String, String)>,
    /// When that attempt was sent (Unix ms): the Placed condition's transition time, so that a
    /// restarted operator knows it (a re-placement is a transition even when no status write
    /// showed the pod unplaced between).
    pub placed_at_ms: Option<i64>,
    /// The agent's latest report of that attempt.
    pub report: Option<TaskStatus>,
    /// How the previous attempt was lost, while this one has no restart of its own.
    pub last_loss: Option<Loss>,
    /// Not placed: why (the Placed condition's reason and message).
    pub unplaced: Option<(String, String)>,
    /// The containers cannot be created (CreateContainerConfigError), with the message.
    pub config_error: Option<String>,
    /// The pod is finished without running on: reason and message (refused, lost too often).
    pub failed: Option<(String, String)>,
    pub pod_ip: Option<String>,
    pub host_ip: Option<String>,
    /// The end of each container's output, for a container that failed without a message of
    /// its own and asks for it (`terminationMessagePolicy: FallbackToLogsOnError`).
    pub log_tails: std::collections::BTreeMap<String, String>,
    /// The finished pod's output to keep on it (see `kept_output`); once kept, it stays.
    pub kept_output: Option<String>,
    /// The attempt's device has been silent since then (Unix ms): the pod is not Ready, and
    /// its Ready condition's transition time records when, for a restarted operator.
    pub silent_since_ms: Option<i64>,
    /// A checked pod's `darkcore.io/Validated` condition: status, reason and message.
    pub validated: Option<(&'static str, &'static str, String)>,
}

/// Whether a container that ended as `reported` gets the end of its output as its termination
/// message, as the kubelet gives it: it failed, said nothing itself, and its spec asks.
pub fn wants_log_tail(
    spec: &k8s_openapi::api::core::v1::Container,
    reported: &TaskContainerStatus,
) -> bool {
    spec.termination_message_policy.as_deref() == Some("FallbackToLogsOnError")
        && State::try_from(reported.state) == Ok(State::Terminated)
        && reported.exit_code != 0
        && reported.message.is_empty()
}

pub use crate::domain::container_id::recorded_attempt;

/// The last attempt lost that a pod's status records (its containers' `lastState`, until a
/// later attempt restarts on its own).
pub fn recorded_loss(pod: &Pod) -> Option<Loss> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    statuses.iter().find_map(|s| {
        let last = s.last_state.as_ref()?.terminated.as_ref()?;
        let (task, device) = container_id::attempt(last.container_id.as_deref()?)?;
        let ms = |time: &Option<Time>| time.as_ref().map_or(0, |t| t.0.as_millisecond());
        Some(Loss {
            reason: LossReason::parse(last.reason.as_deref()?)?,
            message: last.message.clone().unwrap_or_default(),
            task: TaskId::parse(&task)?,
            device,
            started_ms: ms(&last.started_at),
            at_unix_ms: ms(&last.finished_at),
        })
    })
}

/// Since when the pod has been placed on its current attempt, as darkcore recorded it: its
/// Placed condition's transition time, in Unix milliseconds. Written by the operator itself
/// with the attempt in the same status, so a restarted operator may trust it as that attempt's
/// dispatch.
pub fn placed_since_ms(pod: &Pod) -> Option<i64> {
    let conditions = pod.status.as_ref()?.conditions.as_ref()?;
    let placed = conditions
        .iter()
        .find(|c| c.type_ == PLACED_CONDITION && c.status == "True")?;
    Some(placed.last_transition_time.as_ref()?.0.as_millisecond())
}

/// Since when the pod's device has been silent, as darkcore recorded it (its Ready condition
/// turned False for it then), in Unix ms, rounded down.
pub fn silent_since_ms(pod: &Pod) -> Option<i64> {
    silent_since(pod.status.as_ref())
}

fn silent_since(status: Option<&PodStatus>) -> Option<i64> {
    let ready = status?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready" && c.reason.as_deref() == Some(DEVICE_SILENT))?;
    Some(ready.last_transition_time.as_ref()?.0.as_millisecond())
}

/// A Unix-ms time as the API server stores it: whole seconds (so what is written compares
/// equal to what is read back).
pub fn time_ms(ms: i64) -> Option<Time> {
    (ms > 0)
        .then(|| Timestamp::from_second(ms.div_euclid(1000)).ok().map(Time))
        .flatten()
}

fn terminated(t: &Termination, container_id: Option<String>) -> ContainerState {
    ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: t.exit_code,
            reason: Some(t.reason.clone()).filter(|r| !r.is_empty()),
            message: Some(t.message.clone()).filter(|m| !m.is_empty()),
            started_at: time_ms(t.started_at_unix_ms),
            finished_at: time_ms(t.finished_at_unix_ms),
            container_id,
            signal: None,
        }),
        ..Default::default()
    }
}

fn waiting(reason: &str, message: Option<String>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.into()),
            message,
        }),
        ..Default::default()
    }
}

fn state_of(report: &TaskContainerStatus, container_id: &Option<String>) -> ContainerState {
    match State::try_from(report.state).unwrap_or(State::Unspecified) {
        State::Running => ContainerState {
            running: Some(ContainerStateRunning {
                started_at: time_ms(report.started_at_unix_ms),
            }),
            ..Default::default()
        },
        State::Terminated => terminated(
            &Termination {
                exit_code: report.exit_code,
                reason: report.reason.clone(),
                message: report.message.clone(),
                started_at_unix_ms: report.started_at_unix_ms,
                finished_at_unix_ms: report.finished_at_unix_ms,
            },
            container_id.clone(),
        ),
        _ => waiting(
            if report.reason.is_empty() {
                "ContainerCreating"
            } else {
                &report.reason
            },
            Some(report.message.clone()).filter(|m| !m.is_empty()),
        ),
    }
}

/// The status of one container list (init or regular) of the pod.
fn containers(
    specs: &[k8s_openapi::api::core::v1::Container],
    reports: &[TaskContainerStatus],
    view: &RunView,
) -> Vec<ContainerStatus> {
    let (base, container_id) = match &view.attempt {
        Some((number, device, task)) => (
            number.saturating_sub(1) as i32,
            Some(container_id::of(device, task)),
        ),
        None => (0, None),
    };
    specs
        .iter()
        .map(|spec| {
            let report = reports.iter().find(|r| r.name == spec.name);
            let state = match (report, &view.config_error, &view.failed) {
                (Some(report), _, _) => state_of(report, &container_id),
                (None, Some(message), _) => {
                    waiting("CreateContainerConfigError", Some(message.clone()))
                }
                (None, None, Some((reason, message))) => terminated(
                    &Termination {
                        exit_code: 137,
                        reason: reason.clone(),
                        message: message.clone(),
                        ..Default::default()
                    },
                    None,
                ),
                (None, None, None) => waiting("ContainerCreating", None),
            };
            let last_state = match (
                report.and_then(|r| r.last_termination.as_ref()),
                &view.last_loss,
            ) {
                (Some(own), _) => Some(terminated(own, container_id.clone())),
                (None, Some(loss)) => Some(terminated(
                    &Termination {
                        exit_code: 137,
                        reason: loss.reason.as_str().into(),
                        message: loss.message.clone(),
                        started_at_unix_ms: loss.started_ms,
                        finished_at_unix_ms: loss.at_unix_ms,
                    },
                    Some(container_id::of(&loss.device, &loss.task.to_string())),
                )),
                (None, None) => None,
            };
            let mut state = state;
            if let (Some(terminated), Some(tail)) =
                (state.terminated.as_mut(), view.log_tails.get(&spec.name))
                && terminated.message.is_none()
            {
                terminated.message = Some(tail.clone());
            }
            let running = state.running.is_some();
            ContainerStatus {
                name: spec.name.clone(),
                image: spec.image.clone().unwrap_or_default(),
                image_id: report.map(|r| r.image_id.clone()).unwrap_or_default(),
                container_id: container_id.clone(),
                ready: running,
                started: Some(running),
                restart_count: base + report.map_or(0, |r| r.restart_count as i32),
                state: Some(state),
                last_state,
                ..Default::default()
            }
        })
        .collect()
}

pub fn phase_word(view: &RunView) -> &'static str {
    if view.failed.is_some() {
        return "Failed";
    }
    match view
        .report
        .as_ref()
        .and_then(|r| TaskPhase::try_from(r.phase).ok())
    {
        Some(TaskPhase::Running) => "Running",
        Some(TaskPhase::Succeeded) => "Succeeded",
        Some(TaskPhase::Failed) => "Failed",
        _ => "Pending",
    }
}

/// The status darkcore wants the pod to show. Conditions keep their transition times while
/// their status holds; `startTime` is kept once set.
pub fn render(pod: &Pod, view: &RunView, now: &Time) -> PodStatus {
    let current = pod.status.as_ref();
    let spec = pod.spec.clone().unwrap_or_default();
    let empty = Vec::new();
    let report = view.report.as_ref();
    let init_statuses = containers(
        spec.init_containers.as_deref().unwrap_or_default(),
        report.map_or(&empty, |r| &r.init_containers),
        view,
    );
    let statuses = containers(
        &spec.containers,
        report.map_or(&empty, |r| &r.containers),
        view,
    );
    let phase = phase_word(view);
    let initialized = init_statuses.iter().all(|s| {
        s.state
            .as_ref()
            .and_then(|st| st.terminated.as_ref())
            .is_some_and(|t| t.exit_code == 0)
    }) && (view.attempt.is_some() || init_statuses.is_empty());
    let ready = phase == "Running" && statuses.iter().all(|s| s.ready);
    let previous = |type_: &str| {
        current
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == type_))
            .map(|c| (c.status.as_str(), c.last_transition_time.as_ref()))
    };
    let condition =
        |type_: &str, value: bool, reason: Option<String>, message: Option<String>| PodCondition {
            type_: type_.into(),
            status: status_word(value).into(),
            last_transition_time: Some(transition_time(previous(type_), status_word(value), now)),
            reason,
            message,
            ..Default::default()
        };
    let placed = match (&view.attempt, &view.unplaced) {
        (Some((number, device, _)), _) => PodCondition {
            // Rounded up: a restarted operator charges a lost attempt from here.
            last_transition_time: view
                .placed_at_ms
                .and_then(|ms| time_ms(ms + 999))
                .or_else(|| Some(transition_time(previous(PLACED_CONDITION), "True", now))),
            ..condition(
                PLACED_CONDITION,
                true,
                Some("Placed".into()),
                Some(format!("attempt {number} on device {device}")),
            )
        },
        (None, Some((reason, message))) => condition(
            PLACED_CONDITION,
            false,
            Some(reason.clone()),
            Some(message.clone()),
        ),
        (None, None) => condition(PLACED_CONDITION, false, Some("Placing".into()), None),
    };
    let not_ready_reason = (!ready).then(|| "ContainersNotReady".to_string());
    let pod_ready = match (view.silent_since_ms, &view.attempt) {
        (Some(since), Some((_, device, _))) if ready => PodCondition {
            // Kept while it holds, so the time does not wander with each render.
            last_transition_time: match previous("Ready") {
                Some(("False", Some(at))) if silent_since(current).is_some() => Some(at.clone()),
                _ => time_ms(since),
            },
            ..condition(
                "Ready",
                false,
                Some(DEVICE_SILENT.into()),
                Some(format!(
                    "device {device} has not been heard from since then"
                )),
            )
        },
        _ => condition("Ready", ready, not_ready_reason.clone(), None),
    };
    let mut conditions = vec![
        condition("Initialized", initialized, None, None),
        condition("ContainersReady", ready, not_ready_reason, None),
        pod_ready,
        placed,
    ];
    if let Some(scheduled) = current
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "PodScheduled"))
    {
        conditions.insert(0, scheduled.clone());
    }
    let kept = current
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == kept_output::CONDITION));
    match (kept, &view.kept_output) {
        (Some(kept), _) => conditions.push(kept.clone()),
        (None, Some(output)) => conditions.push(PodCondition {
            message: Some(output.clone()),
            ..condition(
                kept_output::CONDITION,
                true,
                Some("OutputKept".into()),
                None,
            )
        }),
        (None, None) => {}
    }
    if let Some((status, reason, message)) = &view.validated {
        let type_ = crate::validation::replicas::CONDITION;
        conditions.push(PodCondition {
            type_: type_.into(),
            status: (*status).into(),
            last_transition_time: Some(transition_time(previous(type_), status, now)),
            reason: Some((*reason).into()),
            message: Some(message.clone()),
            ..Default::default()
        });
    }
    let (reason, message) = match (&view.failed, report) {
        (Some((reason, message)), _) => (Some(reason.clone()), Some(message.clone())),
        (None, Some(r)) if phase == "Failed" && !r.reason.is_empty() => {
            (Some(r.reason.clone()), Some(r.message.clone()))
        }
        _ => (None, None),
    };
    PodStatus {
        phase: Some(phase.into()),
        conditions: Some(conditions),
        reason,
        message,
        start_time: current
            .and_then(|s| s.start_time.clone())
            .or_else(|| Some(now.clone())),
        host_ip: view.host_ip.clone(),
        host_ips: view.host_ip.clone().map(|ip| vec![HostIP { ip }]),
        pod_ip: view.pod_ip.clone(),
        pod_ips: view.pod_ip.clone().map(|ip| vec![PodIP { ip }]),
        init_container_statuses: (!init_statuses.is_empty()).then_some(init_statuses),
        container_statuses: Some(statuses),
        qos_class: current.and_then(|s| s.qos_class.clone()),
        ..Default::default()
    }
}

/// Whether `desired` would change what the pod shows (conditions compared without times).
pub fn differs(pod: &Pod, desired: &PodStatus) -> bool {
    let Some(current) = pod.status.as_ref() else {
        return true;
    };
    let strip = |s: &PodStatus| {
        let mut s = s.clone();
        for c in s.conditions.iter_mut().flatten() {
            c.last_probe_time = None;
        }
        s.conditions
            .iter_mut()
            .for_each(|cs| cs.sort_by(|a, b| a.type_.cmp(&b.type_)));
        s.nominated_node_name = None;
        s.resize = None;
        s.resource_claim_statuses = None;
        s.observed_generation = None;
        s
    };
    strip(current) != strip(desired)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, PodSpec};

    fn pod() -> Pod {
        Pod {
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "main".into(),
                    image: Some("busybox".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn now() -> Time {
        Time(Timestamp::from_second(1_000).unwrap())
    }

    fn report(phase: TaskPhase, state: State, restarts: u32) -> TaskStatus {
        TaskStatus {
            task_id: "uid.2".into(),
            phase: phase as i32,
            containers: vec![TaskContainerStatus {
                name: "main".into(),
                state: state as i32,
                restart_count: restarts,
                started_at_unix_ms: 900_000,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// Attempt 1, lost with device dev-b a minute after it was sent.
    fn lost_on_dev_b() -> Loss {
        Loss {
            reason: LossReason::DeviceLost,
            message: "device dev-b was lost".into(),
            task: TaskId::parse("uid.1").unwrap(),
            device: "dev-b".into(),
            started_ms: 1_795_000_000_000,
            at_unix_ms: 1_795_000_060_000,
        }
    }

    #[test]
    fn a_checked_pod_shows_how_its_results_stand() {
        let view = RunView {
            attempt: Some((2, "dev-b".into(), "uid.2".into())),
            report: Some(report(TaskPhase::Succeeded, State::Terminated, 0)),
            validated: Some(("True", "QuorumReached", "devices dev-a, dev-b agree".into())),
            ..Default::default()
        };
        let status = render(&pod(), &view, &Time(Timestamp::now()));
        let validated = status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "darkcore.io/Validated")
            .expect("the condition");
        assert_eq!(
            (validated.status.as_str(), validated.reason.as_deref()),
            ("True", Some("QuorumReached"))
        );
        let unchecked = render(&pod(), &RunView::default(), &Time(Timestamp::now()));
        assert!(
            !unchecked
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "darkcore.io/Validated")
        );
    }

    #[test]
    fn a_placed_pod_says_since_when() {
        let view = RunView {
            attempt: Some((1, "dev-a".into(), "uid.1".into())),
            report: Some(report(TaskPhase::Running, State::Running, 0)),
            ..Default::default()
        };
        let mut placed = pod();
        assert_eq!(placed_since_ms(&placed), None);
        placed.status = Some(render(&placed, &view, &now()));
        assert_eq!(placed_since_ms(&placed), Some(1_000_000));
        let unplaced = RunView {
            unplaced: Some(("NoDeviceFits".into(), "none".into())),
            ..Default::default()
        };
        let mut waiting = pod();
        waiting.status = Some(render(&waiting, &unplaced, &now()));
        assert_eq!(placed_since_ms(&waiting), None);
    }

    #[test]
    fn a_new_attempt_moves_the_placed_time_to_its_own_dispatch_rounded_up() {
        let first = RunView {
            attempt: Some((1, "dev-a".into(), "uid.1".into())),
            placed_at_ms: Some(1_000_000),
            ..Default::default()
        };
        let mut placed = pod();
        placed.status = Some(render(&placed, &first, &now()));
        assert_eq!(placed_since_ms(&placed), Some(1_000_000));
        // Lost, and sent again to another device before any status showed it unplaced.
        let second = RunView {
            attempt: Some((2, "dev-b".into(), "uid.2".into())),
            placed_at_ms: Some(1_234_567),
            ..Default::default()
        };
        placed.status = Some(render(&placed, &second, &now()));
        assert_eq!(placed_since_ms(&placed), Some(1_235_000));
        // Rendered again unchanged, it is not a change to write.
        assert!(!differs(&placed, &render(&placed, &second, &now())));
    }

    #[test]
    fn output_kept_on_a_finished_pod_stays_through_later_renders() {
        let done = RunView {
            attempt: Some((1, "dev-a".into(), "uid.1".into())),
            report: Some(report(TaskPhase::Succeeded, State::Terminated, 0)),
            kept_output: Some("{\"main\":{\"whole\":true,\"lines\":[]}}".into()),
            ..Default::default()
        };
        let mut finished = pod();
        finished.status = Some(render(&finished, &done, &now()));
        assert!(kept_output::present(&finished));
        let again = RunView {
            kept_output: None,
            ..done
        };
        assert!(!differs(&finished, &render(&finished, &again, &now())));
    }

    #[test]
    fn a_running_pod_whose_device_is_silent_is_not_ready_since_then() {
        let running = RunView {
            attempt: Some((1, "dev-a".into(), "uid.1".into())),
            report: Some(report(TaskPhase::Running, State::Running, 0)),
            ..Default::default()
        };
        let mut pod = pod();
        pod.status = Some(render(&pod, &running, &now()));
        assert_eq!(silent_since_ms(&pod), None);
        let silent = RunView {
            silent_since_ms: Some(1_500_400),
            ..running.clone()
        };
        pod.status = Some(render(&pod, &silent, &now()));
        let ready = pod.status.as_ref().unwrap().conditions.as_ref().unwrap();
        let ready = ready.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_deref()),
            ("False", Some(DEVICE_SILENT))
        );
        assert_eq!(silent_since_ms(&pod), Some(1_500_000));
        // Rendered again a moment later (the estimate moves by a few ms): no write.
        let later = RunView {
            silent_since_ms: Some(1_501_200),
            ..running.clone()
        };
        assert!(!differs(&pod, &render(&pod, &later, &now())));
        // Heard again: Ready again.
        pod.status = Some(render(&pod, &running, &now()));
        assert_eq!(silent_since_ms(&pod), None);
    }

    #[test]
    fn times_are_whole_seconds_as_the_api_server_stores_them() {
        assert_eq!(time_ms(1_999), time_ms(1_000));
        assert_eq!(time_ms(0), None);
    }

    #[test]
    fn a_failed_container_asking_for_it_shows_the_end_of_its_output() {
        let mut failed = report(TaskPhase::Failed, State::Terminated, 0);
        failed.containers[0].exit_code = 2;
        let mut spec = pod().spec.unwrap().containers.remove(0);
        assert!(!wants_log_tail(&spec, &failed.containers[0]), "not asked");
        spec.termination_message_policy = Some("FallbackToLogsOnError".into());
        assert!(wants_log_tail(&spec, &failed.containers[0]));
        let mut succeeded = failed.containers[0].clone();
        succeeded.exit_code = 0;
        assert!(!wants_log_tail(&spec, &succeeded), "only on failure");
        let view = RunView {
            attempt: Some((1, "dev-a".into(), "uid.1".into())),
            report: Some(failed),
            log_tails: [("main".to_string(), "panic: no input\n".to_string())].into(),
            ..Default::default()
        };
        let status = render(&pod(), &view, &now());
        let main = &status.container_statuses.as_ref().unwrap()[0];
        let terminated = main.state.as_ref().unwrap().terminated.as_ref().unwrap();
        assert_eq!(terminated.message.as_deref(), Some("panic: no input\n"));
    }

    #[test]
    fn a_running_attempt_shows_running_ready_and_records_itself() {
        let view = RunView {
            attempt: Some((2, "dev-a".into(), "uid.2".into())),
            report: Some(report(TaskPhase::Running, State::Running, 1)),
            last_loss: Some(lost_on_dev_b()),
            pod_ip: Some("10.0.0.7".into()),
            ..Default::default()
        };
        let status = render(&pod(), &view, &now());
        assert_eq!(status.phase.as_deref(), Some("Running"));
        let main = &status.container_statuses.as_ref().unwrap()[0];
        assert_eq!(
            main.restart_count, 2,
            "one loss plus one restart on the device"
        );
        assert!(main.ready);
        assert_eq!(
            main.last_state
                .as_ref()
                .unwrap()
                .terminated
                .as_ref()
                .unwrap()
                .reason
                .as_deref(),
            Some("DeviceLost")
        );
        let mut written = pod();
        written.status = Some(status.clone());
        assert_eq!(
            recorded_attempt(&written),
            Some(("uid.2".into(), "dev-a".into()))
        );
        assert!(
            !differs(
                &written,
                &render(
                    &written,
                    &view,
                    &Time(Timestamp::from_second(2_000).unwrap())
                )
            ),
            "nothing changed, nothing to write"
        );
    }

    #[test]
    fn a_lost_attempt_reads_back_from_the_status_that_shows_it() {
        let loss = lost_on_dev_b();
        // Unplaced after the loss, and then on its next attempt before that one reports.
        for attempt in [None, Some((2, "dev-a".to_string(), "uid.2".to_string()))] {
            let view = RunView {
                attempt: attempt.clone(),
                last_loss: Some(loss.clone()),
                ..Default::default()
            };
            let mut written = pod();
            written.status = Some(render(&pod(), &view, &now()));
            assert_eq!(recorded_loss(&written), Some(loss.clone()), "{attempt:?}");
            assert_eq!(
                recorded_attempt(&written),
                attempt.map(|(_, device, task)| (task, device)),
                "the lost attempt is not taken for the current one"
            );
        }
        // A restart of the attempt's own replaces it: nothing was lost since.
        let mut restarted = report(TaskPhase::Running, State::Running, 1);
        restarted.containers[0].last_termination = Some(Termination {
            exit_code: 1,
            reason: "Error".into(),
            ..Default::default()
        });
        let view = RunView {
            attempt: Some((2, "dev-a".into(), "uid.2".into())),
            report: Some(restarted),
            last_loss: Some(loss),
            ..Default::default()
        };
        let mut written = pod();
        written.status = Some(render(&pod(), &view, &now()));
        assert_eq!(recorded_loss(&written), None);
    }

    #[test]
    fn an_unplaced_pod_is_pending_and_says_why() {
        let view = RunView {
            unplaced: Some((
                "NoDeviceFits".into(),
                "no enlisted device offers 8 CPUs; the largest offers 4".into(),
            )),
            ..Default::default()
        };
        let status = render(&pod(), &view, &now());
        assert_eq!(status.phase.as_deref(), Some("Pending"));
        let placed = status
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == PLACED_CONDITION)
            .unwrap();
        assert_eq!(
            (placed.status.as_str(), placed.reason.as_deref()),
            ("False", Some("NoDeviceFits"))
        );
    }

    #[test]
    fn a_pod_lost_too_often_fails_with_the_reason() {
        let view = RunView {
            failed: Some(("DeviceLost".into(), "lost 4 times".into())),
            ..Default::default()
        };
        let status = render(&pod(), &view, &now());
        assert_eq!(
            (status.phase.as_deref(), status.reason.as_deref()),
            (Some("Failed"), Some("DeviceLost"))
        );
    }
}
