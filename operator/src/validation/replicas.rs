//! A checked pod's replicas so far (pure): each finished one's result and the verdict once a
//! quorum agrees or none can, and the `darkcore.io/Validated` condition that shows them.

use darkcore_proto::agent::v1::container_status::State as ContainerState;
use darkcore_proto::agent::v1::{ContainerStatus, TaskPhase, TaskStatus};
use darkcore_statement::Standing;

use super::policy::Validation;
use super::quorum::{self, Decision, Outcome};

/// The pod condition that shows how a checked pod's results stand.
pub const CONDITION: &str = "darkcore.io/Validated";

/// What a device's digest must look like: anything else is kept as this, not as sent.
const MALFORMED: &str = "malformed-digest";

/// The result a finished replica stands for: its device's digest when well formed, else
/// what the report shows (a task that never got to its digest, say `none:Failed:Evicted`).
pub fn result_of(report: &TaskStatus) -> String {
    let digest = report.result_digest.as_str();
    if digest.is_empty() {
        let phase = TaskPhase::try_from(report.phase).unwrap_or(TaskPhase::Unspecified);
        let reason: String = report.reason.chars().take(64).collect();
        return format!("none:{}:{reason}", phase.as_str_name());
    }
    let well_formed = digest
        .strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
    match well_formed {
        true => digest.to_ascii_lowercase(),
        false => MALFORMED.into(),
    }
}

/// How a checked pod's results ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// `agreeing` devices gave `digest`; `canonical`'s output is the pod's.
    Validated {
        digest: String,
        canonical: String,
        agreeing: Vec<String>,
    },
    /// A trusted device's result, accepted alone: it was spot-checked with this probability.
    Unverified {
        digest: String,
        device: String,
        spot_check_percent: u32,
    },
    /// No digest could reach the quorum: each digest, with its devices.
    NoQuorum { digests: Vec<(String, Vec<String>)> },
}

/// A replica's report as the pod may show it before its results are decided: a container
/// that ended shows as still running. The API server refuses a container that ended (under
/// restartPolicy Never, or OnFailure with exit 0) going back to waiting, which is what the
/// next replica's container does; a running one may.
pub fn while_undecided(mut report: TaskStatus) -> TaskStatus {
    let containers = report
        .init_containers
        .iter_mut()
        .chain(&mut report.containers);
    for container in containers.filter(|c| c.state == ContainerState::Terminated as i32) {
        *container = ContainerStatus {
            name: std::mem::take(&mut container.name),
            state: ContainerState::Running as i32,
            started_at_unix_ms: container.started_at_unix_ms,
            image_id: std::mem::take(&mut container.image_id),
            restart_count: container.restart_count,
            ..Default::default()
        };
    }
    report
}

/// The finished replicas of one pod and, once decided, the verdict.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Replicas {
    /// Each finished replica's device and result, in the order they finished.
    pub results: Vec<Outcome>,
    /// Their attempt numbers: a late report of one is never taken for a new attempt.
    pub numbers: Vec<u32>,
    /// How it ended, once decided.
    pub verdict: Option<Verdict>,
}

impl Replicas {
    /// Records the result of attempt `number` on `device` and decides, the next replica
    /// starting only once this one has finished.
    pub fn record(
        &mut self,
        number: u32,
        device: &str,
        result: String,
        validation: &Validation,
    ) -> Decision {
        if !self.numbers.contains(&number) {
            self.numbers.push(number);
            self.results.push(Outcome {
                device: device.to_string(),
                digest: result,
            });
        }
        let decision = quorum::decide(&self.results, 0, validation);
        self.verdict = match decision.clone() {
            Decision::Validated {
                digest,
                canonical,
                agreeing,
            } => Some(Verdict::Validated {
                digest,
                canonical,
                agreeing,
            }),
            Decision::NoQuorum { digests } => Some(Verdict::NoQuorum { digests }),
            Decision::RunMore(_) | Decision::Wait => None,
        };
        decision
    }

    /// Accepts the only result so far, from a trusted device not drawn for a spot check.
    pub fn accept_unverified(&mut self, spot_check_percent: u32) {
        if let [only] = self.results.as_slice() {
            self.verdict = Some(Verdict::Unverified {
                digest: only.digest.clone(),
                device: only.device.clone(),
                spot_check_percent,
            });
        }
    }

    /// The devices whose results a validation judged: those that agreed, and the others.
    pub fn judged(&self) -> Option<(Vec<String>, Vec<String>)> {
        let Some(Verdict::Validated {
            digest, agreeing, ..
        }) = &self.verdict
        else {
            return None;
        };
        let disagreeing = (self.results.iter())
            .filter(|o| o.digest != *digest)
            .map(|o| o.device.clone())
            .collect();
        Some((agreeing.clone(), disagreeing))
    }

    /// Once decided, each finished replica's attempt number and how its result stands toward
    /// credit: validated if it agreed with the quorum, unverified if accepted alone, else
    /// rejected (a disagreeing result, or all of them when no quorum was reached).
    pub fn standings(&self) -> Vec<(u32, Standing)> {
        let Some(verdict) = &self.verdict else {
            return Vec::new();
        };
        let standing_of = |outcome: &Outcome| match verdict {
            Verdict::Validated { digest, .. } if outcome.digest == *digest => Standing::Validated,
            Verdict::Unverified { .. } => Standing::Unverified,
            _ => Standing::Rejected,
        };
        (self.numbers.iter().zip(&self.results))
            .map(|(number, outcome)| (*number, standing_of(outcome)))
            .collect()
    }

    /// Whether attempt `number` is a replica that has finished.
    pub fn finished(&self, number: u32) -> bool {
        self.numbers.contains(&number)
    }

    /// The devices that have run the pod: a new replica goes to none of them.
    pub fn devices(&self) -> Vec<String> {
        self.results.iter().map(|o| o.device.clone()).collect()
    }

    /// The `darkcore.io/Validated` condition: status (`True`, `False`, or `Unverified` for a
    /// trusted device's result accepted alone), reason and message. `running` is the replica
    /// on a device now (its number and device).
    pub fn condition(
        &self,
        validation: &Validation,
        running: Option<(u32, &str)>,
    ) -> (&'static str, &'static str, String) {
        let quorum = validation.quorum;
        match &self.verdict {
            Some(Verdict::Validated {
                digest,
                canonical,
                agreeing,
            }) => {
                let others: Vec<String> = self
                    .results
                    .iter()
                    .filter(|o| o.digest != *digest)
                    .map(|o| format!("{} gave {}", o.device, short(&o.digest)))
                    .collect();
                let disagreeing = match others.is_empty() {
                    true => String::new(),
                    false => format!("; disagreeing: {}", others.join(", ")),
                };
                (
                    "True",
                    "QuorumReached",
                    format!(
                        "{} of {} replicas agree (quorum {quorum}): devices {} gave {digest}; the output shown is device {canonical}'s{disagreeing}",
                        agreeing.len(),
                        self.results.len(),
                        agreeing.join(", ")
                    ),
                )
            }
            Some(Verdict::Unverified {
                digest,
                device,
                spot_check_percent,
            }) => (
                "Unverified",
                "TrustedDevice",
                format!(
                    "accepted unverified: device {device} is trusted by its record and gave {digest}; it was spot-checked with probability {spot_check_percent}% and not drawn this time"
                ),
            ),
            Some(Verdict::NoQuorum { digests }) => {
                ("False", "NoQuorum", no_quorum_message(digests, validation))
            }
            _ => {
                let so_far = match self.results.len() {
                    0 => "no results yet".to_string(),
                    n => format!(
                        "{n} result{} so far ({})",
                        if n == 1 { "" } else { "s" },
                        self.results
                            .iter()
                            .map(|o| format!("{}: {}", o.device, short(&o.digest)))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                };
                let now = match running {
                    Some((number, device)) => format!("; replica {number} runs on device {device}"),
                    None => "; waiting for a device that has not run it".into(),
                };
                (
                    "False",
                    "AwaitingQuorum",
                    format!(
                        "needs {quorum} agreeing results of at most {} replicas: {so_far}{now}",
                        validation.max_replicas
                    ),
                )
            }
        }
    }
}

/// Why no quorum was reached: each digest with the devices that gave it.
pub fn no_quorum_message(digests: &[(String, Vec<String>)], validation: &Validation) -> String {
    let listed: Vec<String> = digests
        .iter()
        .map(|(digest, devices)| format!("{digest} from {}", devices.join(", ")))
        .collect();
    format!(
        "no {} of at most {} replicas agreed: {}",
        validation.quorum,
        validation.max_replicas,
        listed.join("; ")
    )
}

/// A digest cut to what people compare by eye.
fn short(digest: &str) -> &str {
    let end = digest
        .char_indices()
        .nth("sha256:".len() + 12)
        .map_or(digest.len(), |(at, _)| at);
    &digest[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validation(quorum: u32, max_replicas: u32) -> Validation {
        Validation::quorum_of(quorum, max_replicas)
    }

    fn digest(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn a_report_stands_for_its_digest_or_for_how_it_ended() {
        let report = |digest: &str, phase: TaskPhase, reason: &str| TaskStatus {
            result_digest: digest.into(),
            phase: phase as i32,
            reason: reason.into(),
            ..Default::default()
        };
        let good = digest('a');
        assert_eq!(result_of(&report(&good, TaskPhase::Succeeded, "")), good);
        assert_eq!(
            result_of(&report(
                &good.to_uppercase().replace("SHA256", "sha256"),
                TaskPhase::Succeeded,
                ""
            )),
            good
        );
        assert_eq!(
            result_of(&report("", TaskPhase::Failed, "InitContainerFailed")),
            "none:TASK_PHASE_FAILED:InitContainerFailed"
        );
        let flood = "x".repeat(1 << 20);
        assert_eq!(
            result_of(&report(&flood, TaskPhase::Succeeded, "")),
            MALFORMED
        );
        assert_eq!(
            result_of(&report("", TaskPhase::Failed, &flood)).len(),
            "none:TASK_PHASE_FAILED:".len() + 64
        );
    }

    #[test]
    fn replicas_run_until_a_quorum_agrees_and_name_the_agreeing_devices() {
        let v = validation(2, 5);
        let mut replicas = Replicas::default();
        assert_eq!(
            replicas.record(1, "liar", digest('b'), &v),
            Decision::RunMore(1)
        );
        let (ok, reason, message) = replicas.condition(&v, Some((2, "dev-a")));
        assert_eq!((ok, reason), ("False", "AwaitingQuorum"));
        assert!(
            message.contains("liar: sha256:bbbbbbbbbbbb;")
                || message.contains("liar: sha256:bbbbbbbbbbbb)"),
            "{message}"
        );
        assert!(
            message.contains("replica 2 runs on device dev-a"),
            "{message}"
        );
        assert_eq!(
            replicas.record(2, "dev-a", digest('a'), &v),
            Decision::RunMore(1)
        );
        assert_eq!(replicas.devices(), vec!["liar", "dev-a"]);
        let decision = replicas.record(3, "dev-c", digest('a'), &v);
        assert!(
            matches!(decision, Decision::Validated { .. }),
            "{decision:?}"
        );
        let (ok, reason, message) = replicas.condition(&v, None);
        assert_eq!((ok, reason), ("True", "QuorumReached"));
        assert!(message.contains("devices dev-a, dev-c gave"), "{message}");
        assert!(message.contains("2 of 3 replicas"), "{message}");
        assert!(
            message.ends_with("disagreeing: liar gave sha256:bbbbbbbbbbbb"),
            "{message}"
        );
    }

    #[test]
    fn a_result_recorded_twice_counts_once() {
        let v = validation(2, 5);
        let mut replicas = Replicas::default();
        replicas.record(1, "dev-a", digest('a'), &v);
        assert_eq!(
            replicas.record(1, "dev-a", digest('a'), &v),
            Decision::RunMore(1)
        );
        assert!(replicas.finished(1) && !replicas.finished(2));
    }

    #[test]
    fn no_quorum_lists_every_digest_with_its_devices() {
        let v = validation(2, 2);
        let mut replicas = Replicas::default();
        replicas.record(1, "dev-a", digest('a'), &v);
        let decision = replicas.record(2, "dev-b", digest('b'), &v);
        assert!(
            matches!(decision, Decision::NoQuorum { .. }),
            "{decision:?}"
        );
        let (ok, reason, message) = replicas.condition(&v, None);
        assert_eq!((ok, reason), ("False", "NoQuorum"));
        assert_eq!(
            message,
            format!(
                "no 2 of at most 2 replicas agreed: {} from dev-a; {} from dev-b",
                digest('a'),
                digest('b')
            )
        );
    }

    #[test]
    fn an_ended_container_shows_as_running_until_the_results_are_decided() {
        let ended = ContainerStatus {
            name: "main".into(),
            state: ContainerState::Terminated as i32,
            exit_code: 0,
            reason: "Completed".into(),
            started_at_unix_ms: 1_000,
            finished_at_unix_ms: 2_000,
            ..Default::default()
        };
        let waiting = ContainerStatus {
            name: "side".into(),
            state: ContainerState::Waiting as i32,
            reason: "ContainerCreating".into(),
            ..Default::default()
        };
        let shown = while_undecided(TaskStatus {
            phase: TaskPhase::Running as i32,
            containers: vec![ended, waiting.clone()],
            ..Default::default()
        });
        let main = &shown.containers[0];
        assert_eq!(
            (
                main.name.as_str(),
                main.state,
                main.started_at_unix_ms,
                main.finished_at_unix_ms
            ),
            ("main", ContainerState::Running as i32, 1_000, 0)
        );
        assert_eq!(shown.containers[1], waiting, "others as they are");
        assert_eq!(shown.phase, TaskPhase::Running as i32);
    }
}
