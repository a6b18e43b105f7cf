//! A pod's life on darkcore as one enum and a pure step function: admitted, resolved, placed
//! on a device, followed to its end or its loss, released, or deleted. The controller feeds
//! it events and the facts of the moment, and carries out the effects it returns.

use std::time::{Duration, Instant};

use darkcore_crds::Runtime;
use darkcore_proto::agent::v1::{TaskPhase, TaskStatus};
use darkcore_statement::Standing;

pub use crate::domain::LossReason;
pub use crate::domain::Presence;
pub use crate::domain::TaskId;
use crate::pods::admission::Refusal;
use crate::pods::resolve::Resolved;
use crate::pods::status::Loss;
use crate::validation::policy::Validation;
use crate::validation::quorum::Decision;
use crate::validation::replicas::{self, Replicas};

/// How often a pod blocked on a missing ConfigMap or Secret is tried again.
pub const RESOLVE_RETRY: Duration = Duration::from_secs(10);
/// How long past its grace period a stopping task may take before its pod is deleted anyway.
pub const STOP_SLACK: Duration = Duration::from_secs(10);

/// One attempt at running the pod: a task on a device.
#[derive(Clone, Debug, PartialEq)]
pub struct Attempt {
    pub task: TaskId,
    pub device: String,
    /// What it was granted (zero for one adopted after a restart: not known).
    pub millicores: u64,
    pub memory: u64,
    /// When it was sent (Unix ms); for one adopted after a restart, as its pod's status
    /// recorded.
    pub dispatched_ms: i64,
    /// The device's latest report of it.
    pub report: Option<TaskStatus>,
    /// The device was told to stop it (deletion or release).
    pub cancelled: bool,
    /// Since when its device was silent, as its pod's status showed before this operator
    /// started (for one adopted then): lost, it is charged until then.
    pub silent_since_ms: Option<i64>,
    /// For a reissued replica under the pool's reissue deadline: by when (Unix ms) its result
    /// must be back, or it runs elsewhere.
    pub deadline_ms: Option<i64>,
}

impl Attempt {
    pub fn phase(&self) -> TaskPhase {
        phase_of(self.report.as_ref())
    }

    /// Whether its device still works on it: counted against the device's load.
    pub fn busy(&self) -> bool {
        !terminal(self.phase())
    }
}

pub fn phase_of(report: Option<&TaskStatus>) -> TaskPhase {
    report
        .and_then(|r| TaskPhase::try_from(r.phase).ok())
        .unwrap_or(TaskPhase::Unspecified)
}

pub fn terminal(phase: TaskPhase) -> bool {
    matches!(phase, TaskPhase::Succeeded | TaskPhase::Failed)
}

/// What a pod needs to run, once admitted and resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct Ready {
    pub runtime: Runtime,
    pub resolved: Box<Resolved>,
}

/// A resolution that could not finish: a ConfigMap or Secret it names is missing.
#[derive(Clone, Debug, PartialEq)]
pub struct Blocked {
    pub message: String,
    pub retry_at: Instant,
}

/// The stages of a pod on darkcore.
#[derive(Clone, Debug, PartialEq)]
pub enum Stage {
    /// Waiting for its pool and node to be known, to be checked against the pool.
    Admitting,
    /// Admitted; its env and volumes are resolved (off the loop), again while blocked.
    Resolving {
        runtime: Runtime,
        blocked: Option<Blocked>,
        in_flight: bool,
    },
    /// Ready, waiting for a device that fits (or for the operator's warm-up to end).
    Unplaced { ready: Ready, why: Option<String> },
    /// An attempt runs on a device. `ready` is `None` for one adopted after a restart.
    Dispatched {
        attempt: Attempt,
        ready: Option<Ready>,
    },
    /// Nothing more to run: its outcome is known, and its device is told to release it once
    /// the API server holds it; or the pod was finished when first seen.
    Finished { attempt: Option<Attempt> },
    /// It ends without running on: refused, or lost more often than the pool allows.
    Failed { reason: String, message: String },
    /// Being deleted: its task stops within the grace period, then the pod is deleted.
    Deleting {
        attempt: Option<Attempt>,
        delete_by: Option<Instant>,
    },
    /// Deleted (or deleting itself, with grace 0): nothing more to do.
    Deleted,
}

/// One pod's run: its stage and what outlives its attempts.
#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    pub stage: Stage,
    /// The number the next attempt gets.
    pub next_number: u32,
    /// How the previous attempt was lost, shown until a later one restarts on its own.
    pub last_loss: Option<Loss>,
    /// A checked pod's finished replicas (one after another, on distinct devices) and verdict.
    pub replicas: Replicas,
}

impl Default for Run {
    fn default() -> Self {
        Run {
            stage: Stage::Admitting,
            next_number: 1,
            last_loss: None,
            replicas: Replicas::default(),
        }
    }
}

impl Run {
    /// The attempt it holds, if any.
    pub fn attempt(&self) -> Option<&Attempt> {
        match &self.stage {
            Stage::Dispatched { attempt, .. } => Some(attempt),
            Stage::Finished { attempt } | Stage::Deleting { attempt, .. } => attempt.as_ref(),
            _ => None,
        }
    }

    fn attempt_mut(&mut self) -> Option<&mut Attempt> {
        match &mut self.stage {
            Stage::Dispatched { attempt, .. } => Some(attempt),
            Stage::Finished { attempt } | Stage::Deleting { attempt, .. } => attempt.as_mut(),
            _ => None,
        }
    }

    /// Whether time alone (a retry, a deadline, a quiet device, the warm-up) can move it: the
    /// controller's tick looks only at these.
    pub fn waits_on_time(&self, deleting: bool, presence: impl Fn(&str) -> Presence) -> bool {
        match &self.stage {
            Stage::Deleted => false,
            _ if deleting => true,
            Stage::Admitting | Stage::Resolving { .. } | Stage::Unplaced { .. } => true,
            Stage::Dispatched { attempt, .. } => {
                presence(&attempt.device) != Presence::Online || attempt.deadline_ms.is_some()
            }
            Stage::Deleting { .. } => true,
            Stage::Finished { .. } | Stage::Failed { .. } => false,
        }
    }

    /// Whether a task of attempt `number`, found running on a device of the pod's pool, is
    /// to be adopted: the pod has no attempt, is not failed or deleting, and the task is not
    /// older than the attempts already made.
    pub fn adopts(&self, number: u32) -> bool {
        matches!(
            self.stage,
            Stage::Admitting | Stage::Resolving { .. } | Stage::Unplaced { .. }
        ) && number + 1 >= self.next_number
            && !self.replicas.finished(number)
    }

    /// Whether the pod's status is darkcore's to write now (not before admission, not once
    /// deleting).
    pub fn shows_status(&self) -> bool {
        !matches!(
            self.stage,
            Stage::Admitting | Stage::Deleting { .. } | Stage::Deleted
        )
    }
}

/// What happens to a pod.
#[derive(Debug)]
pub enum Event {
    /// Look again with the facts of now: the pod changed, or time passed.
    Look,
    /// Its resolution ended: ready, or blocked with the message the container shows.
    Resolved(Result<Box<Resolved>, String>),
    /// Its device reported the current attempt.
    Report(TaskStatus),
    /// A device runs a task of this pod that the operator had not recorded (it restarted):
    /// adopt it rather than run the pod twice.
    Adopt(Attempt),
    /// The current attempt is gone with its device.
    Lost(LossReason, String),
}

/// The device a placement chose, and what it granted.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    pub device: String,
    pub millicores: u64,
    pub memory: u64,
}

/// Picks a device for a ready pod, passing over the devices named (they ran replicas of it);
/// `reissued`: a replica past the quorum, run again after a disagreement.
pub type Choose<'a> = dyn Fn(&Ready, &[String], bool) -> Result<Choice, String> + 'a;

/// The world as the controller sees it at a step.
pub struct Facts<'a> {
    /// The pod's uid, which its task ids carry.
    pub uid: &'a str,
    pub now: Instant,
    /// The wall clock, for the times a pod's status shows.
    pub unix_ms: i64,
    /// The operator's warm-up after a start is over: devices had their time to reattach.
    pub warm: bool,
    /// The pod is being deleted, with this grace period (seconds).
    pub deleting: Option<u32>,
    /// The API server holds the pod's final phase (as read back, not as last written): a
    /// finished task may be released.
    pub recorded: bool,
    /// The pool's verdict on the pod; `None` while its pool or node is not known. Asked only
    /// while admitting.
    pub admission: &'a dyn Fn() -> Option<Result<Runtime, Refusal>>,
    /// When this operator started: a device not heard of since may have been heard just
    /// before, so the fence counts from here.
    pub started: Instant,
    /// How long after a device was last heard its tasks may run elsewhere: the pool's fence
    /// (by then the device has stopped them itself) and a margin.
    pub fence_wait: Duration,
    /// Attempts past this many re-dispatches fail the pod.
    pub max_redispatches: u32,
    /// Whether a device is heard now, or since when it is silent.
    pub presence: &'a dyn Fn(&str) -> Presence,
    /// A device for a ready pod other than those named (which ran replicas of it), or why
    /// none fits.
    pub choose: &'a Choose<'a>,
    /// How the pod's results are checked, if they are: replicas until a quorum agrees.
    pub validation: Option<&'a Validation>,
    /// Whether a checked pod's first result, from this device, is accepted alone: the
    /// spot-check percentage when the device is trusted and was not drawn for a check (drawn
    /// after it reported, so it cannot know beforehand), else `None`.
    pub alone: &'a dyn Fn(&str) -> Option<u32>,
}

/// What the controller carries out after a step.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Resolve the pod's env and volumes.
    Resolve,
    /// Send the new attempt (the stage's) to its device.
    Assign,
    /// Tell a device to stop a task.
    Cancel {
        device: String,
        task: TaskId,
        grace: u32,
        reason: &'static str,
    },
    /// A Warning Event on the pod; `once`: only the first time this reason and message come.
    Warn {
        reason: String,
        message: String,
        once: bool,
    },
    /// A Normal Event on the pod.
    Inform { reason: String, message: String },
    /// A replica of a checked pod finished and its result is recorded; more may follow.
    ReplicaFinished(TaskId),
    /// A checked pod was decided: `validated`, `unverified` or `no_quorum`.
    Decided(&'static str),
    /// A checked pod was decided: how each replica's result stands toward credit (by attempt
    /// number).
    Credit(Vec<(u32, Standing)>),
    /// A checked pod was validated: the devices whose results agreed, and the others.
    Judged {
        agreeing: Vec<String>,
        disagreeing: Vec<String>,
    },
    /// An attempt was lost (the task runs again, or the pod fails past its re-dispatches);
    /// a lost device's attempt is charged until its device was last heard (`at_unix_ms`).
    Redispatched(Loss),
    /// An attempt ended and its outcome is recorded.
    Completed { succeeded: bool },
    /// Delete the pod.
    Delete,
}

/// Moves a pod's run by one event; returns the run and what to do.
pub fn step(mut run: Run, event: Event, facts: &Facts<'_>) -> (Run, Vec<Effect>) {
    let mut effects = Vec::new();
    run = apply(run, event, facts, &mut effects);
    (settle(run, facts, &mut effects), effects)
}

/// The event's own change.
fn apply(mut run: Run, event: Event, facts: &Facts<'_>, effects: &mut Vec<Effect>) -> Run {
    match event {
        Event::Look => {}
        Event::Resolved(result) => {
            if let Stage::Resolving { runtime, .. } = run.stage {
                run.stage = match result {
                    Ok(resolved) => Stage::Unplaced {
                        ready: Ready { runtime, resolved },
                        why: None,
                    },
                    Err(message) => Stage::Resolving {
                        runtime,
                        blocked: Some(Blocked {
                            message,
                            retry_at: facts.now + RESOLVE_RETRY,
                        }),
                        in_flight: false,
                    },
                };
            }
        }
        Event::Report(report) => {
            if let Stage::Finished {
                attempt: Some(attempt),
            } = &mut run.stage
            {
                // It still names a task it was told to release: that message was lost (the
                // device was away); tell it again.
                attempt.cancelled = false;
            }
            if let Some(attempt) = run.attempt_mut() {
                if terminal(attempt.phase()) && !terminal(phase_of(Some(&report))) {
                    // An older report arriving late (one held while the pod was not listed
                    // yet): the attempt has ended, and stays so.
                    return run;
                }
                let evicted = phase_of(Some(&report)) == TaskPhase::Failed
                    && report.reason == "Evicted"
                    && attempt.phase() != TaskPhase::Failed;
                if evicted {
                    // A device that evicted the task says why, as a kubelet's eviction does.
                    effects.push(Effect::Warn {
                        reason: "Evicted".into(),
                        message: report.message.clone(),
                        once: false,
                    });
                }
                attempt.report = Some(report);
            }
        }
        Event::Adopt(attempt) if run.adopts(attempt.task.number) => {
            let ready = match std::mem::replace(&mut run.stage, Stage::Admitting) {
                Stage::Unplaced { ready, .. } => Some(ready),
                _ => None,
            };
            run.next_number = run.next_number.max(attempt.task.number + 1);
            run.stage = Stage::Dispatched { attempt, ready };
        }
        Event::Adopt(_) => {}
        Event::Lost(reason, message) => match run.stage {
            Stage::Dispatched { .. } => run = lose(run, reason, message, facts, effects),
            Stage::Deleting {
                attempt: Some(attempt),
                delete_by,
            } => {
                effects.push(abandon(&attempt));
                run.stage = Stage::Deleting {
                    attempt: None,
                    delete_by,
                };
            }
            stage => run.stage = stage,
        },
    }
    run
}

fn abandon(attempt: &Attempt) -> Effect {
    Effect::Cancel {
        device: attempt.device.clone(),
        task: attempt.task.clone(),
        grace: 0,
        reason: "this attempt was abandoned",
    }
}

/// The current attempt ended without the pod's doing: run it again, or fail the pod past
/// the pool's maximum of re-dispatches.
fn lose(
    mut run: Run,
    reason: LossReason,
    message: String,
    facts: &Facts<'_>,
    effects: &mut Vec<Effect>,
) -> Run {
    let Stage::Dispatched { attempt, ready } = run.stage else {
        return run;
    };
    effects.push(abandon(&attempt));
    let since = |at: Instant| {
        let ago = facts.now.saturating_duration_since(at).as_millis();
        facts.unix_ms - i64::try_from(ago).unwrap_or(i64::MAX).min(facts.unix_ms)
    };
    let heard_ms = match (facts.presence)(&attempt.device) {
        Presence::Online => facts.unix_ms,
        Presence::Away { last_heard } => since(last_heard),
        Presence::Unknown => attempt
            .silent_since_ms
            .unwrap_or_else(|| since(facts.started)),
    };
    let loss = Loss {
        reason,
        message: message.clone(),
        task: attempt.task.clone(),
        device: attempt.device.clone(),
        started_ms: attempt.dispatched_ms,
        at_unix_ms: heard_ms,
    };
    effects.push(Effect::Redispatched(loss.clone()));
    let number = attempt.task.number;
    run.next_number = run.next_number.max(number + 1);
    run.last_loss = Some(loss);
    effects.push(Effect::Warn {
        reason: reason.as_str().into(),
        message: format!("{message}; attempt {number} of the task ended"),
        once: false,
    });
    // Replicas that finished are not re-dispatches.
    let dispatches = number.saturating_sub(run.replicas.numbers.len() as u32);
    run.stage = if dispatches > facts.max_redispatches {
        Stage::Failed {
            reason: reason.as_str().into(),
            message: format!(
                "{message}; the task was dispatched {dispatches} times, more than the pool's maxRedispatches ({}) allows",
                facts.max_redispatches
            ),
        }
    } else {
        match ready {
            Some(ready) => Stage::Unplaced { ready, why: None },
            None => Stage::Admitting,
        }
    };
    run
}

/// Moves the run as far as the facts take it.
fn settle(mut run: Run, facts: &Facts<'_>, effects: &mut Vec<Effect>) -> Run {
    loop {
        let stage = std::mem::replace(&mut run.stage, Stage::Deleted);
        let (stage, again) = match (stage, facts.deleting) {
            (Stage::Deleted, _) => (Stage::Deleted, false),
            (Stage::Deleting { attempt, delete_by }, Some(grace)) => {
                (delete(attempt, delete_by, grace, facts, effects), false)
            }
            (other, Some(_)) => {
                let attempt = match other {
                    Stage::Dispatched { attempt, .. } => Some(attempt),
                    Stage::Finished { attempt } => attempt,
                    _ => None,
                };
                let stage = Stage::Deleting {
                    attempt,
                    delete_by: None,
                };
                (stage, true)
            }
            (Stage::Admitting, None) => match (facts.admission)() {
                None => (Stage::Admitting, false),
                Some(Ok(runtime)) => (
                    Stage::Resolving {
                        runtime,
                        blocked: None,
                        in_flight: false,
                    },
                    true,
                ),
                Some(Err(refusal)) => {
                    effects.push(Effect::Warn {
                        reason: refusal.reason.into(),
                        message: refusal.message.clone(),
                        once: false,
                    });
                    let stage = Stage::Failed {
                        reason: refusal.reason.into(),
                        message: refusal.message,
                    };
                    (stage, false)
                }
            },
            (
                Stage::Resolving {
                    runtime,
                    blocked,
                    in_flight,
                },
                None,
            ) => {
                let due = blocked.as_ref().is_none_or(|b| facts.now >= b.retry_at);
                let start = !in_flight && due;
                if start {
                    effects.push(Effect::Resolve);
                }
                let stage = Stage::Resolving {
                    runtime,
                    blocked,
                    in_flight: in_flight || start,
                };
                (stage, false)
            }
            (Stage::Unplaced { ready, why: _ }, None) if facts.warm => {
                // Not on the devices that ran it, nor on one that missed its deadline.
                let mut ran = run.replicas.devices();
                let late = (run.last_loss.as_ref())
                    .filter(|loss| loss.reason == LossReason::ReplicaDeadline);
                ran.extend(late.map(|loss| loss.device.clone()));
                // A replica past the quorum is reissued after a disagreement.
                let reissued = facts
                    .validation
                    .filter(|v| run.replicas.results.len() >= v.quorum as usize);
                let deadline_ms = reissued
                    .and_then(|v| v.reissue_deadline_seconds)
                    .map(|seconds| facts.unix_ms + i64::from(seconds) * 1000);
                match (facts.choose)(&ready, &ran, reissued.is_some()) {
                    Ok(choice) => {
                        let attempt = Attempt {
                            task: TaskId {
                                uid: facts.uid.to_string(),
                                number: run.next_number.max(1),
                            },
                            device: choice.device,
                            millicores: choice.millicores,
                            memory: choice.memory,
                            dispatched_ms: facts.unix_ms,
                            report: None,
                            cancelled: false,
                            silent_since_ms: None,
                            deadline_ms,
                        };
                        run.next_number = attempt.task.number + 1;
                        effects.push(Effect::Assign);
                        let stage = Stage::Dispatched {
                            attempt,
                            ready: Some(ready),
                        };
                        (stage, false)
                    }
                    Err(why) => {
                        effects.push(Effect::Warn {
                            reason: "NoDeviceFits".into(),
                            message: why.clone(),
                            once: true,
                        });
                        let stage = Stage::Unplaced {
                            ready,
                            why: Some(why),
                        };
                        (stage, false)
                    }
                }
            }
            (Stage::Dispatched { attempt, ready }, None) => {
                let phase = attempt.phase();
                // A silent device's task runs elsewhere only once the device has stopped it
                // (fencing): its fence has passed since it was last heard, or since this
                // operator started when it has not been heard of since.
                let heard = match (facts.presence)(&attempt.device) {
                    Presence::Online => None,
                    Presence::Away { last_heard } => Some(last_heard),
                    Presence::Unknown => Some(facts.started),
                };
                let fenced = heard.is_some_and(|at| facts.now >= at + facts.fence_wait);
                if fenced && facts.warm && !terminal(phase) {
                    let message = format!(
                        "device {} was lost: not heard from for {} s, past the pool's fence, so it has stopped the task",
                        attempt.device,
                        facts.fence_wait.as_secs()
                    );
                    run.stage = Stage::Dispatched { attempt, ready };
                    run = lose(run, LossReason::DeviceLost, message, facts, effects);
                    continue;
                }
                let late = attempt.deadline_ms.is_some_and(|d| facts.unix_ms >= d);
                if late && !terminal(phase) {
                    let message = format!(
                        "device {} did not return its reissued replica's result within the pool's reissueDeadlineSeconds, so it runs on another device",
                        attempt.device
                    );
                    run.stage = Stage::Dispatched { attempt, ready };
                    run = lose(run, LossReason::ReplicaDeadline, message, facts, effects);
                    continue;
                }
                if phase == TaskPhase::Preempted {
                    let report = attempt.report.clone().unwrap_or_default();
                    let words = if report.message.is_empty() {
                        report.reason
                    } else {
                        report.message
                    };
                    let message =
                        format!("device {} handed the task back: {words}", attempt.device);
                    run.stage = Stage::Dispatched { attempt, ready };
                    run = lose(run, LossReason::Preempted, message, facts, effects);
                    continue;
                }
                if let Some(validation) = facts.validation.filter(|_| terminal(phase)) {
                    run.stage = Stage::Dispatched { attempt, ready };
                    run = replica_finished(run, validation, facts, effects);
                    continue;
                }
                if terminal(phase) {
                    effects.push(Effect::Completed {
                        succeeded: phase == TaskPhase::Succeeded,
                    });
                    // Released only once the outcome is stored (below): until then the device
                    // keeps the finished task, and names it again after any restart.
                    let stage = Stage::Finished {
                        attempt: Some(attempt),
                    };
                    (stage, true)
                } else {
                    (Stage::Dispatched { attempt, ready }, false)
                }
            }
            (
                Stage::Finished {
                    attempt: Some(mut attempt),
                },
                None,
            ) if facts.recorded && !attempt.cancelled => {
                effects.push(Effect::Cancel {
                    device: attempt.device.clone(),
                    task: attempt.task.clone(),
                    grace: 0,
                    reason: "its outcome is recorded",
                });
                attempt.cancelled = true;
                let stage = Stage::Finished {
                    attempt: Some(attempt),
                };
                (stage, false)
            }
            (stage, None) => (stage, false),
        };
        run.stage = stage;
        if !again {
            return run;
        }
    }
}

/// A replica of a checked pod finished: its result is recorded, and the pod is validated, runs
/// another replica on another device, or fails for want of a quorum.
fn replica_finished(
    mut run: Run,
    validation: &Validation,
    facts: &Facts<'_>,
    effects: &mut Vec<Effect>,
) -> Run {
    let Stage::Dispatched { attempt, ready } = run.stage else {
        return run;
    };
    let report = attempt.report.clone().unwrap_or_default();
    let result = replicas::result_of(&report);
    let number = attempt.task.number;
    let decision = run
        .replicas
        .record(number, &attempt.device, result, validation);
    let first = run.replicas.results.len() == 1;
    let unverified = match (&decision, first) {
        (Decision::RunMore(_), true) => (facts.alone)(&attempt.device),
        _ => None,
    };
    if let Some(spot_check_percent) = unverified {
        run.replicas.accept_unverified(spot_check_percent);
    }
    if matches!(decision, Decision::Validated { .. }) || unverified.is_some() {
        let (_, _, message) = run.replicas.condition(validation, None);
        let (reason, verdict) = match unverified {
            Some(_) => ("AcceptedUnverified", "unverified"),
            None => ("Validated", "validated"),
        };
        effects.push(Effect::Decided(verdict));
        effects.push(Effect::Credit(run.replicas.standings()));
        effects.push(Effect::Inform {
            reason: reason.into(),
            message,
        });
        if let Some((agreeing, disagreeing)) = run.replicas.judged() {
            effects.push(Effect::Judged {
                agreeing,
                disagreeing,
            });
        }
        effects.push(Effect::Completed {
            succeeded: attempt.phase() == TaskPhase::Succeeded,
        });
        // Released once the outcome is stored, as any finished attempt.
        run.stage = Stage::Finished {
            attempt: Some(attempt),
        };
        return run;
    }
    effects.push(Effect::Cancel {
        device: attempt.device.clone(),
        task: attempt.task.clone(),
        grace: 0,
        reason: "its result is recorded",
    });
    effects.push(Effect::ReplicaFinished(attempt.task.clone()));
    run.stage = match decision {
        Decision::NoQuorum { digests } => {
            let message = replicas::no_quorum_message(&digests, validation);
            effects.push(Effect::Warn {
                reason: "NoQuorum".into(),
                message: message.clone(),
                once: false,
            });
            effects.push(Effect::Decided("no_quorum"));
            effects.push(Effect::Credit(run.replicas.standings()));
            Stage::Failed {
                reason: "NoQuorum".into(),
                message,
            }
        }
        _ => match ready {
            Some(ready) => Stage::Unplaced { ready, why: None },
            // Adopted after a restart: resolved again before its next replica.
            None => Stage::Admitting,
        },
    };
    run
}

/// A deleting pod: its task is told to stop within `grace`; the pod is deleted once it has
/// stopped, its device is away, or the grace and a slack have passed.
fn delete(
    mut attempt: Option<Attempt>,
    mut delete_by: Option<Instant>,
    grace: u32,
    facts: &Facts<'_>,
    effects: &mut Vec<Effect>,
) -> Stage {
    if let Some(attempt) = attempt.as_mut().filter(|a| !a.cancelled) {
        effects.push(Effect::Cancel {
            device: attempt.device.clone(),
            task: attempt.task.clone(),
            grace,
            reason: "the pod is being deleted",
        });
        attempt.cancelled = true;
        delete_by = Some(facts.now + Duration::from_secs(u64::from(grace)) + STOP_SLACK);
    }
    let running = attempt
        .as_ref()
        .is_some_and(|a| a.busy() && a.phase() != TaskPhase::Preempted);
    let online = attempt
        .as_ref()
        .is_some_and(|a| (facts.presence)(&a.device) == Presence::Online);
    let stopped = !running || !online || delete_by.is_some_and(|by| facts.now >= by);
    if !stopped {
        return Stage::Deleting { attempt, delete_by };
    }
    // With grace 0 (force deletion, or a finished pod) the API server removes the pod in the
    // same request: deleting it again would only cost a 404.
    if grace > 0 {
        effects.push(Effect::Delete);
    }
    Stage::Deleted
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validation::replicas::Verdict;

    /// A pool's fence and the operator's margin, in these tests.
    const FENCE_WAIT: Duration = Duration::from_secs(40);
    /// The wall clock at every step, in these tests.
    const UNIX_MS: i64 = 1_700_000_000_000;

    /// The world a test steps a pod in.
    struct World {
        now: Instant,
        warm: bool,
        deleting: Option<u32>,
        recorded: bool,
        admission: Option<Result<Runtime, Refusal>>,
        presence: Presence,
        started: Instant,
        /// The device placement picks first; those that ran replicas are passed over for
        /// dev-b, dev-c and dev-d, in order.
        fits: Result<&'static str, &'static str>,
        validation: Option<Validation>,
        /// Every device is trusted and drawn for no spot check at this percentage.
        trusted: Option<u32>,
        unix_ms: i64,
        /// Whether the last placement asked for was of a reissued replica.
        reissued: std::cell::Cell<Option<bool>>,
    }

    impl World {
        fn new() -> World {
            World {
                now: Instant::now(),
                warm: true,
                deleting: None,
                recorded: false,
                admission: Some(Ok(Runtime::Oci)),
                presence: Presence::Online,
                started: Instant::now(),
                fits: Ok("dev-a"),
                validation: None,
                trusted: None,
                unix_ms: UNIX_MS,
                reissued: std::cell::Cell::new(None),
            }
        }

        fn step(&self, run: Run, event: Event) -> (Run, Vec<Effect>) {
            let presence = |_: &str| self.presence;
            let choose = |_: &Ready, ran: &[String], reissued: bool| {
                self.reissued.set(Some(reissued));
                let first = self.fits.map_err(String::from)?;
                let device = [first, "dev-b", "dev-c", "dev-d"]
                    .into_iter()
                    .find(|d| !ran.iter().any(|r| r == d))
                    .ok_or("every device ran it")?;
                Ok(Choice {
                    device: device.into(),
                    millicores: 500,
                    memory: 64 << 20,
                })
            };
            let admission = || self.admission.clone();
            let facts = Facts {
                uid: "pod-uid",
                now: self.now,
                unix_ms: self.unix_ms,
                warm: self.warm,
                deleting: self.deleting,
                recorded: self.recorded,
                admission: &admission,
                started: self.started,
                fence_wait: FENCE_WAIT,
                max_redispatches: 2,
                presence: &presence,
                choose: &choose,
                validation: self.validation.as_ref(),
                alone: &|_| self.trusted,
            };
            step(run, event, &facts)
        }
    }

    fn report(phase: TaskPhase, reason: &str, message: &str) -> Event {
        Event::Report(TaskStatus {
            task_id: "pod-uid.1".into(),
            phase: phase as i32,
            reason: reason.into(),
            message: message.into(),
            ..Default::default()
        })
    }

    fn ready() -> Ready {
        Ready {
            runtime: Runtime::Oci,
            resolved: Box::default(),
        }
    }

    /// A run with its first attempt dispatched to dev-a.
    fn dispatched(world: &World) -> Run {
        let (run, _) = world.step(Run::default(), Event::Look);
        let (run, effects) = world.step(run, Event::Resolved(Ok(Box::default())));
        assert_eq!(effects, [Effect::Assign]);
        run
    }

    fn attempt_of(run: &Run) -> &Attempt {
        run.attempt().expect("an attempt")
    }

    fn is_cancel(effect: &Effect, why: &str) -> bool {
        matches!(effect, Effect::Cancel { reason, .. } if *reason == why)
    }

    #[test]
    fn a_pod_is_admitted_resolved_placed_and_dispatched() {
        let mut world = World::new();
        world.admission = None;
        let (run, effects) = world.step(Run::default(), Event::Look);
        assert_eq!((&run.stage, effects.len()), (&Stage::Admitting, 0));
        assert!(!run.shows_status(), "nothing is written before admission");
        world.admission = Some(Ok(Runtime::Wasm));
        let (run, effects) = world.step(run, Event::Look);
        assert_eq!(effects, [Effect::Resolve]);
        assert!(matches!(
            run.stage,
            Stage::Resolving {
                runtime: Runtime::Wasm,
                in_flight: true,
                ..
            }
        ));
        // A second look while it resolves starts nothing more.
        let (run, effects) = world.step(run, Event::Look);
        assert!(effects.is_empty());
        let (run, effects) = world.step(run, Event::Resolved(Ok(Box::default())));
        assert_eq!(effects, [Effect::Assign]);
        let attempt = attempt_of(&run);
        assert_eq!(attempt.task.to_string(), "pod-uid.1");
        assert_eq!(
            (attempt.device.as_str(), attempt.millicores),
            ("dev-a", 500)
        );
        assert_eq!(run.next_number, 2);
    }

    #[test]
    fn a_blocked_resolution_is_tried_again_after_the_retry_time() {
        let mut world = World::new();
        let (run, _) = world.step(Run::default(), Event::Look);
        let (run, effects) = world.step(run, Event::Resolved(Err("no ConfigMap x".into())));
        assert!(effects.is_empty());
        assert!(
            matches!(&run.stage, Stage::Resolving { blocked: Some(b), in_flight: false, .. } if b.message == "no ConfigMap x")
        );
        world.now += RESOLVE_RETRY / 2;
        let (run, effects) = world.step(run, Event::Look);
        assert!(effects.is_empty());
        world.now += RESOLVE_RETRY;
        let (_, effects) = world.step(run, Event::Look);
        assert_eq!(effects, [Effect::Resolve]);
    }

    #[test]
    fn a_refused_pod_fails_with_the_pools_reason() {
        let mut world = World::new();
        world.admission = Some(Err(Refusal {
            reason: "RuntimeNotAllowed",
            message: "pool lab does not allow process".into(),
        }));
        let (run, effects) = world.step(Run::default(), Event::Look);
        assert!(
            matches!(&run.stage, Stage::Failed { reason, .. } if reason == "RuntimeNotAllowed")
        );
        assert!(
            matches!(&effects[..], [Effect::Warn { reason, once: false, .. }] if reason == "RuntimeNotAllowed")
        );
        assert!(!run.waits_on_time(false, |_| Presence::Online));
    }

    #[test]
    fn nothing_is_placed_during_the_warm_up_and_an_unfit_pod_says_why_once() {
        let mut world = World::new();
        world.warm = false;
        let (run, _) = world.step(Run::default(), Event::Look);
        let (run, effects) = world.step(run, Event::Resolved(Ok(Box::default())));
        assert!(effects.is_empty());
        assert!(matches!(run.stage, Stage::Unplaced { why: None, .. }));
        world.warm = true;
        world.fits = Err("no device offers 4 cores");
        let (run, effects) = world.step(run, Event::Look);
        assert!(
            matches!(&effects[..], [Effect::Warn { reason, once: true, .. }] if reason == "NoDeviceFits")
        );
        assert!(
            matches!(&run.stage, Stage::Unplaced { why: Some(w), .. } if w == "no device offers 4 cores")
        );
        assert!(
            run.waits_on_time(false, |_| Presence::Unknown),
            "placement is tried again"
        );
    }

    #[test]
    fn a_lost_device_abandons_the_attempt_and_the_task_runs_again_elsewhere() {
        let mut world = World::new();
        let run = dispatched(&world);
        assert!(!run.waits_on_time(false, |_| Presence::Online));
        // Silent: nothing happens until its fence has passed, when it has stopped the task.
        world.presence = Presence::Away {
            last_heard: world.now,
        };
        world.fits = Ok("dev-b");
        world.now += FENCE_WAIT - Duration::from_secs(1);
        let (run, effects) = world.step(run, Event::Look);
        assert!(effects.is_empty(), "{effects:?}");
        assert!(run.waits_on_time(false, |_| world.presence));
        world.now += Duration::from_secs(1);
        let (run, effects) = world.step(run, Event::Look);
        assert!(is_cancel(&effects[0], "this attempt was abandoned"));
        assert!(
            matches!(&effects[1], Effect::Redispatched(Loss { reason: LossReason::DeviceLost, task, device, at_unix_ms, started_ms, .. })
                if task.number == 1 && device == "dev-a" && *at_unix_ms == UNIX_MS - FENCE_WAIT.as_millis() as i64
                    && *started_ms == UNIX_MS),
            "charged until it was last heard: {:?}",
            effects[1]
        );
        assert!(matches!(&effects[2], Effect::Warn { reason, message, .. }
            if reason == "DeviceLost" && message.ends_with("attempt 1 of the task ended")));
        assert_eq!(effects[3], Effect::Assign);
        let attempt = attempt_of(&run);
        assert_eq!((attempt.task.number, attempt.device.as_str()), (2, "dev-b"));
        let loss = run.last_loss.as_ref().unwrap();
        assert_eq!(loss.reason, LossReason::DeviceLost);
        assert!(
            loss.message
                .contains("device dev-a was lost: not heard from for 40 s"),
            "{}",
            loss.message
        );
    }

    #[test]
    fn a_pod_lost_more_often_than_the_pool_allows_fails() {
        let mut world = World::new();
        let mut run = dispatched(&world);
        world.presence = Presence::Away {
            last_heard: world.now - FENCE_WAIT,
        };
        world.fits = Err("no device is online");
        // Attempts 1 and 2 are lost and placed again; losing attempt 3 passes maxRedispatches 2.
        for number in 1..=3 {
            run.stage = Stage::Dispatched {
                attempt: Attempt {
                    task: TaskId {
                        uid: "pod-uid".into(),
                        number,
                    },
                    device: "dev-a".into(),
                    millicores: 0,
                    memory: 0,
                    dispatched_ms: UNIX_MS,
                    report: None,
                    cancelled: false,
                    silent_since_ms: None,
                    deadline_ms: None,
                },
                ready: Some(ready()),
            };
            (run, _) = world.step(run, Event::Look);
        }
        assert!(
            matches!(&run.stage, Stage::Failed { reason, message }
            if reason == "DeviceLost" && message.contains("dispatched 3 times")),
            "{:?}",
            run.stage
        );
        assert_eq!(run.next_number, 4);
    }

    #[test]
    fn a_preempted_task_runs_again_with_the_devices_words() {
        let world = World::new();
        let run = dispatched(&world);
        let (run, effects) = world.step(
            run,
            report(TaskPhase::Preempted, "Preempted", "the owner is back"),
        );
        assert!(
            matches!(&effects[1], Effect::Redispatched(Loss { reason: LossReason::Preempted, at_unix_ms, .. })
            if *at_unix_ms == UNIX_MS)
        );
        assert_eq!(attempt_of(&run).task.number, 2);
        assert_eq!(
            run.last_loss.unwrap().message,
            "device dev-a handed the task back: the owner is back"
        );
    }

    #[test]
    fn a_finished_task_is_released_only_once_its_outcome_is_stored() {
        let mut world = World::new();
        let run = dispatched(&world);
        let (run, effects) = world.step(run, report(TaskPhase::Running, "", ""));
        assert!(effects.is_empty());
        let (run, effects) = world.step(run, report(TaskPhase::Succeeded, "", ""));
        assert_eq!(effects, [Effect::Completed { succeeded: true }]);
        assert!(matches!(&run.stage, Stage::Finished { attempt: Some(a) } if !a.cancelled));
        assert!(run.shows_status(), "the outcome is still to be shown");
        // The write has not landed (or failed): the device keeps the task.
        let (run, effects) = world.step(run, Event::Look);
        assert!(effects.is_empty(), "{effects:?}");
        // Its device is away meanwhile: the outcome is known, so that is no loss.
        let (run, effects) = world.step(run, Event::Lost(LossReason::DeviceLost, "gone".into()));
        assert!(effects.is_empty());
        // The API server holds the outcome: now the device may forget the task.
        world.recorded = true;
        let (run, effects) = world.step(run, Event::Look);
        assert_eq!(effects.len(), 1);
        assert!(is_cancel(&effects[0], "its outcome is recorded"));
        assert!(matches!(&run.stage, Stage::Finished { attempt: Some(a) } if a.cancelled));
        let (run, effects) = world.step(run, Event::Look);
        assert!(effects.is_empty(), "released once");
        // A Running report held back and delivered late does not reopen the ended attempt.
        let (run, effects) = world.step(run, report(TaskPhase::Running, "", ""));
        assert!(is_cancel(&effects[0], "its outcome is recorded"));
        assert_eq!(attempt_of(&run).phase(), TaskPhase::Succeeded);
        // It was away and names the task again when it reattaches: it is told again.
        let (run, effects) = world.step(run, report(TaskPhase::Succeeded, "", ""));
        assert!(is_cancel(&effects[0], "its outcome is recorded"));
        assert!(matches!(&run.stage, Stage::Finished { attempt: Some(a) } if a.cancelled));
        // The device comes back without the released task: that is no loss.
        let (run, effects) = world.step(run, Event::Lost(LossReason::DeviceLost, "gone".into()));
        assert!(effects.is_empty());
        assert!(run.last_loss.is_none());
    }

    #[test]
    fn an_evicted_task_says_so_in_an_event_and_fails() {
        let world = World::new();
        let run = dispatched(&world);
        let (run, effects) = world.step(run, report(TaskPhase::Failed, "Evicted", "over 4Mi"));
        assert!(matches!(&effects[0], Effect::Warn { reason, message, .. }
            if reason == "Evicted" && message == "over 4Mi"));
        assert_eq!(effects[1], Effect::Completed { succeeded: false });
        assert!(matches!(run.stage, Stage::Finished { .. }));
    }

    #[test]
    fn an_adopted_attempt_whose_pod_showed_its_device_silent_is_charged_until_then() {
        let mut world = World::new();
        world.presence = Presence::Unknown;
        let silent_since = UNIX_MS - 60_000;
        let adopted = Run {
            stage: Stage::Dispatched {
                attempt: Attempt {
                    task: TaskId {
                        uid: "pod-uid".into(),
                        number: 1,
                    },
                    device: "dev-a".into(),
                    millicores: 0,
                    memory: 0,
                    dispatched_ms: UNIX_MS,
                    report: None,
                    cancelled: false,
                    silent_since_ms: Some(silent_since),
                    deadline_ms: None,
                },
                ready: None,
            },
            next_number: 2,
            last_loss: None,
            replicas: Replicas::default(),
        };
        world.now = world.started + FENCE_WAIT;
        let (_, effects) = world.step(adopted, Event::Look);
        assert!(
            matches!(&effects[1], Effect::Redispatched(Loss { at_unix_ms, .. }) if *at_unix_ms == silent_since),
            "{effects:?}"
        );
    }

    #[test]
    fn after_a_restart_an_adopted_attempt_waits_for_its_device_through_the_warm_up() {
        let mut world = World::new();
        world.warm = false;
        world.presence = Presence::Unknown;
        let adopted = Run {
            stage: Stage::Dispatched {
                attempt: Attempt {
                    task: TaskId {
                        uid: "pod-uid".into(),
                        number: 2,
                    },
                    device: "dev-a".into(),
                    millicores: 0,
                    memory: 0,
                    dispatched_ms: UNIX_MS,
                    report: None,
                    cancelled: false,
                    silent_since_ms: None,
                    deadline_ms: None,
                },
                ready: None,
            },
            next_number: 3,
            last_loss: None,
            replicas: Replicas::default(),
        };
        let (run, effects) = world.step(adopted, Event::Look);
        assert!(
            effects.is_empty(),
            "not lost while its device may be reconnecting"
        );
        assert!(run.waits_on_time(false, |_| Presence::Unknown));
        // Warm, but the device may have been heard just before the restart: it keeps the
        // task until its fence has passed since the operator started.
        world.warm = true;
        let (run, effects) = world.step(run, Event::Look);
        assert!(effects.is_empty(), "{effects:?}");
        // The device never came back: lost; with nothing resolved, it starts over.
        world.now = world.started + FENCE_WAIT;
        let (run, effects) = world.step(run, Event::Look);
        assert!(
            matches!(&effects[1], Effect::Redispatched(Loss { reason: LossReason::DeviceLost, at_unix_ms, .. })
            if *at_unix_ms == UNIX_MS - FENCE_WAIT.as_millis() as i64),
            "since the operator started"
        );
        assert_eq!(effects.last(), Some(&Effect::Resolve));
        assert!(matches!(run.stage, Stage::Resolving { .. }));
        assert_eq!(run.next_number, 3);
    }

    #[test]
    fn a_task_found_running_is_adopted_only_by_a_pod_without_one() {
        let world = World::new();
        let (resolving, _) = world.step(Run::default(), Event::Look);
        assert!(resolving.adopts(1));
        let found = Attempt {
            task: TaskId {
                uid: "pod-uid".into(),
                number: 5,
            },
            device: "dev-c".into(),
            millicores: 0,
            memory: 0,
            dispatched_ms: UNIX_MS,
            report: None,
            cancelled: false,
            silent_since_ms: None,
            deadline_ms: None,
        };
        let (run, effects) = world.step(resolving, Event::Adopt(found.clone()));
        assert!(effects.is_empty());
        assert_eq!(attempt_of(&run).device, "dev-c");
        assert_eq!(run.next_number, 6);
        assert!(!run.adopts(6), "it has an attempt now");
        // Older than an attempt already made: not adopted.
        let stale = Run {
            next_number: 8,
            ..Run::default()
        };
        assert!(!stale.adopts(5));
        let failed = Run {
            stage: Stage::Failed {
                reason: "x".into(),
                message: "y".into(),
            },
            ..Run::default()
        };
        assert!(!failed.adopts(9));
    }

    #[test]
    fn a_deleted_pod_stops_its_task_within_the_grace_period_then_is_deleted() {
        let mut world = World::new();
        let run = dispatched(&world);
        let (run, _) = world.step(run, report(TaskPhase::Running, "", ""));
        world.deleting = Some(30);
        let (run, effects) = world.step(run, Event::Look);
        assert!(
            matches!(&effects[..], [Effect::Cancel { grace: 30, reason, .. }] if *reason == "the pod is being deleted")
        );
        assert!(matches!(
            run.stage,
            Stage::Deleting {
                delete_by: Some(_),
                ..
            }
        ));
        assert!(!run.shows_status());
        let (run, effects) = world.step(run, Event::Look);
        assert!(effects.is_empty(), "the stop is sent once");
        // The task ends: the pod is deleted.
        let (run, effects) = world.step(run, report(TaskPhase::Failed, "Stopped", ""));
        assert_eq!(effects, [Effect::Delete]);
        assert_eq!(run.stage, Stage::Deleted);
        assert!(!run.waits_on_time(true, |_| Presence::Unknown));
    }

    #[test]
    fn a_deleted_pod_whose_task_hangs_is_deleted_after_the_grace_and_slack() {
        let mut world = World::new();
        let run = dispatched(&world);
        let (run, _) = world.step(run, report(TaskPhase::Running, "", ""));
        world.deleting = Some(5);
        let (run, _) = world.step(run, Event::Look);
        world.now += Duration::from_secs(5) + STOP_SLACK;
        let (run, effects) = world.step(run, Event::Look);
        assert_eq!((effects, run.stage), (vec![Effect::Delete], Stage::Deleted));
    }

    #[test]
    fn deletion_during_dispatch_or_with_the_device_away_deletes_at_once() {
        let mut world = World::new();
        // Deleted (force, grace 0) right as it is dispatched: its task is stopped, and the API
        // server removes the pod by itself.
        world.deleting = Some(0);
        let (run, _) = world.step(Run::default(), Event::Look);
        assert_eq!(run.stage, Stage::Deleted, "nothing to stop before dispatch");
        let mut world = World::new();
        let run = dispatched(&world);
        world.deleting = Some(30);
        world.presence = Presence::Away {
            last_heard: world.now,
        };
        let (run, effects) = world.step(run, Event::Look);
        assert!(is_cancel(&effects[0], "the pod is being deleted"));
        assert_eq!(effects[1], Effect::Delete);
        assert_eq!(run.stage, Stage::Deleted);
        // A late report of an abandoned or deleted pod changes nothing.
        let (run, effects) = world.step(run, report(TaskPhase::Running, "", ""));
        assert!(effects.is_empty());
        assert_eq!(run.stage, Stage::Deleted);
    }

    #[test]
    fn a_device_lost_while_its_pod_is_deleted_lets_the_deletion_finish() {
        let mut world = World::new();
        let run = dispatched(&world);
        let (run, _) = world.step(run, report(TaskPhase::Running, "", ""));
        world.deleting = Some(30);
        let (run, _) = world.step(run, Event::Look);
        let (run, effects) =
            world.step(run, Event::Lost(LossReason::DeviceLost, "restarted".into()));
        assert!(is_cancel(&effects[0], "this attempt was abandoned"));
        assert_eq!(effects[1], Effect::Delete);
        assert_eq!(run.stage, Stage::Deleted);
    }

    /// A world whose pods need `quorum` agreeing results of at most `max_replicas`.
    fn checked(quorum: u32, max_replicas: u32) -> World {
        World {
            validation: Some(Validation::quorum_of(quorum, max_replicas)),
            ..World::new()
        }
    }

    /// Attempt `number` succeeded with the digest of `c` repeated.
    fn result(number: u32, c: char) -> Event {
        Event::Report(TaskStatus {
            task_id: format!("pod-uid.{number}"),
            phase: TaskPhase::Succeeded as i32,
            result_digest: format!("sha256:{}", c.to_string().repeat(64)),
            ..Default::default()
        })
    }

    fn released(effects: &[Effect], device: &str, number: u32) -> bool {
        effects.iter().any(|e| {
            matches!(e, Effect::Cancel { device: d, task, reason, .. }
                if d == device && task.number == number && *reason == "its result is recorded")
        })
    }

    /// The devices whose results validated the pod.
    fn agreeing(run: &Run) -> Vec<String> {
        match &run.replicas.verdict {
            Some(Verdict::Validated { agreeing, .. }) => agreeing.clone(),
            other => panic!("not validated: {other:?}"),
        }
    }

    #[test]
    fn a_checked_pod_runs_replicas_one_after_another_on_distinct_devices_until_they_agree() {
        let world = checked(2, 5);
        let run = dispatched(&world);
        let (run, effects) = world.step(run, result(1, 'a'));
        assert!(released(&effects, "dev-a", 1), "{effects:?}");
        assert!(effects.contains(&Effect::Assign), "{effects:?}");
        assert!(
            !effects
                .iter()
                .any(|e| matches!(e, Effect::Completed { .. }))
        );
        let second = attempt_of(&run);
        assert_eq!((second.device.as_str(), second.task.number), ("dev-b", 2));
        let (run, effects) = world.step(run, result(2, 'a'));
        assert!(
            effects.contains(&Effect::Completed { succeeded: true }),
            "{effects:?}"
        );
        assert!(
            effects
                .iter()
                .any(|e| matches!(e, Effect::Inform { reason, .. } if reason == "Validated"))
        );
        assert!(
            matches!(run.stage, Stage::Finished { .. }),
            "{:?}",
            run.stage
        );
        assert_eq!(agreeing(&run), ["dev-a", "dev-b"]);
    }

    #[test]
    fn a_liars_result_starts_another_replica_and_the_honest_ones_validate() {
        let world = checked(2, 5);
        let run = dispatched(&world);
        let (run, _) = world.step(run, result(1, 'f'));
        let (run, _) = world.step(run, result(2, 'a'));
        assert_eq!(attempt_of(&run).device, "dev-c");
        let (run, _) = world.step(run, result(3, 'a'));
        assert_eq!(agreeing(&run), ["dev-b", "dev-c"]);
    }

    #[test]
    fn replicas_that_never_agree_fail_the_pod_with_no_quorum() {
        let world = checked(2, 2);
        let run = dispatched(&world);
        let (run, _) = world.step(run, result(1, 'a'));
        let (run, effects) = world.step(run, result(2, 'b'));
        assert!(released(&effects, "dev-b", 2), "{effects:?}");
        match &run.stage {
            Stage::Failed { reason, message } => {
                assert_eq!(reason, "NoQuorum");
                assert!(
                    message.contains("from dev-a") && message.contains("from dev-b"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(
            effects
                .iter()
                .any(|e| matches!(e, Effect::Warn { reason, .. } if reason == "NoQuorum"))
        );
        // Without a quorum, no result earns.
        assert!(
            effects.contains(&Effect::Credit(vec![
                (1, Standing::Rejected),
                (2, Standing::Rejected)
            ])),
            "{effects:?}"
        );
    }

    #[test]
    fn a_late_report_of_a_finished_replica_is_never_adopted_as_a_new_attempt() {
        let world = World {
            fits: Err("nothing fits"),
            ..checked(2, 5)
        };
        let run = dispatched(&World {
            fits: Ok("dev-a"),
            ..checked(2, 5)
        });
        let (run, _) = world.step(run, result(1, 'a'));
        assert!(
            matches!(run.stage, Stage::Unplaced { .. }),
            "{:?}",
            run.stage
        );
        assert!(!run.adopts(1));
        assert!(run.adopts(2));
    }

    #[test]
    fn finished_replicas_do_not_count_as_redispatches() {
        let world = checked(3, 5);
        let mut run = dispatched(&world);
        for number in 1..=2 {
            (run, _) = world.step(run, result(number, 'a'));
        }
        assert_eq!(attempt_of(&run).task.number, 3);
        let (run, _) = world.step(run, Event::Lost(LossReason::DeviceLost, "gone".into()));
        assert!(
            matches!(run.stage, Stage::Dispatched { .. }),
            "{:?}",
            run.stage
        );
        assert_eq!(attempt_of(&run).task.number, 4);
    }

    #[test]
    fn a_trusted_devices_first_result_is_accepted_unverified_unless_spot_checked() {
        let world = World {
            trusted: Some(10),
            ..checked(2, 5)
        };
        let run = dispatched(&world);
        let (run, effects) = world.step(run, result(1, 'a'));
        assert!(
            matches!(run.stage, Stage::Finished { .. }),
            "{:?}",
            run.stage
        );
        assert!(matches!(
            run.replicas.verdict,
            Some(Verdict::Unverified {
                spot_check_percent: 10,
                ..
            })
        ));
        assert!(effects.contains(&Effect::Completed { succeeded: true }));
        assert!(effects.contains(&Effect::Credit(vec![(1, Standing::Unverified)])));
        assert!(
            effects.iter().any(
                |e| matches!(e, Effect::Inform { reason, .. } if reason == "AcceptedUnverified")
            )
        );
        assert!(
            !effects.iter().any(|e| matches!(e, Effect::Judged { .. })),
            "nothing was compared"
        );
        // Drawn for a spot check (or not trusted): replicated as any other.
        let (run, _) = checked(2, 5).step(dispatched(&world), result(1, 'a'));
        assert!(
            matches!(run.stage, Stage::Dispatched { .. }),
            "{:?}",
            run.stage
        );
    }

    #[test]
    fn a_reissued_replica_late_past_the_pools_deadline_runs_on_another_device() {
        let mut world = checked(2, 5);
        world.validation.as_mut().unwrap().reissue_deadline_seconds = Some(60);
        let run = dispatched(&world);
        let (run, _) = world.step(run, result(1, 'a'));
        assert_eq!(
            attempt_of(&run).deadline_ms,
            None,
            "the quorum's own replicas have none"
        );
        assert_eq!(world.reissued.get(), Some(false));
        // They disagree: the third replica is reissued, with a deadline.
        let (run, _) = world.step(run, result(2, 'b'));
        assert_eq!(world.reissued.get(), Some(true), "placed as reissued");
        let reissued = attempt_of(&run);
        assert_eq!(
            (reissued.device.as_str(), reissued.deadline_ms),
            ("dev-c", Some(UNIX_MS + 60_000))
        );
        assert!(run.waits_on_time(false, |_| Presence::Online));
        world.unix_ms = UNIX_MS + 59_999;
        let (run, effects) = world.step(run, Event::Look);
        assert!(effects.is_empty(), "{effects:?}");
        // Past it: stopped there, and run on a device that neither ran it nor was late.
        world.unix_ms = UNIX_MS + 60_000;
        let (run, effects) = world.step(run, Event::Look);
        assert!(
            effects
                .iter()
                .any(|e| matches!(e, Effect::Redispatched(loss)
                if loss.reason == LossReason::ReplicaDeadline && loss.device == "dev-c")),
            "{effects:?}"
        );
        assert!(
            is_cancel(&effects[0], "this attempt was abandoned"),
            "{effects:?}"
        );
        assert_eq!(attempt_of(&run).device, "dev-d");
    }

    #[test]
    fn a_validation_judges_the_agreeing_and_the_disagreeing_devices() {
        let world = checked(2, 5);
        let run = dispatched(&world);
        let (run, _) = world.step(run, result(1, 'f'));
        let (run, _) = world.step(run, result(2, 'a'));
        let (_, effects) = world.step(run, result(3, 'a'));
        assert!(
            effects.contains(&Effect::Judged {
                agreeing: vec!["dev-b".into(), "dev-c".into()],
                disagreeing: vec!["dev-a".into()],
            }),
            "{effects:?}"
        );
        // The agreeing attempts earn; the outvoted one does not.
        assert!(
            effects.contains(&Effect::Credit(vec![
                (1, Standing::Rejected),
                (2, Standing::Validated),
                (3, Standing::Validated)
            ])),
            "{effects:?}"
        );
    }
}
