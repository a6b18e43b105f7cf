//! One attached stream to the gateway: Hello, then heartbeats, owner-state changes on the
//! policy timer, and the operator's messages, until the stream ends or the agent stops.

use std::time::Duration;

use darkcore_proto::agent::v1::agent_gateway_client::AgentGatewayClient;
use darkcore_proto::agent::v1::{
    AgentMessage, Heartbeat, Hello, Offer, OwnerState, Refusal, TaskAssign, agent_message,
    operator_message, refusal::Code,
};
use darkcore_proto::{MAX_MESSAGE_BYTES, PROTOCOL_VERSION, check_version};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::observe::PolicyMonitor;
use crate::policy::{Decision, decide::to_owner_state};
use crate::status::StatusFile;
use crate::tasks::{Reports, TaskManager};

/// Messages queued towards the gateway before the agent waits (bounded memory).
pub const SEND_QUEUE: usize = 64;
/// How long the gateway may take to answer Hello.
pub const WELCOME_TIMEOUT: Duration = Duration::from_secs(15);

/// How a session ended without an error.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// The agent was asked to stop and told the gateway it is leaving.
    Stopped,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The gateway refused this device for good: retrying cannot help.
    #[error("{0}")]
    Final(String),
    /// The connection failed or ended; reconnecting may help.
    #[error("{0}")]
    Retry(String),
}

fn message(body: agent_message::Body) -> AgentMessage {
    AgentMessage {
        version: PROTOCOL_VERSION as i32,
        body: Some(body),
    }
}

/// What the refusal means for the agent: final ones stop it with the gateway's words.
pub fn classify(refusal: &Refusal) -> SessionError {
    let text = format!("the gateway refused this device: {}", refusal.message);
    match Code::try_from(refusal.code) {
        Ok(Code::Replaced) => SessionError::Retry(format!(
            "{text} (if this repeats, another agent with the same state dir is running)"
        )),
        Ok(Code::TimedOut | Code::SlowReader) => SessionError::Retry(text),
        _ => SessionError::Final(text),
    }
}

/// The parts of a decision the operator cares about; a change in these is sent.
fn offered(decision: &Decision) -> (bool, Offer) {
    (decision.available, decision.offer.clone())
}

/// Why the device cannot take `task` now, if it cannot: the owner's policy says no, or does
/// not allow its runtime.
fn refusal(decision: &Decision, task: &TaskAssign) -> Option<String> {
    if !decision.available {
        return Some(format!(
            "the owner's policy gives nothing now: {}",
            decision.reason
        ));
    }
    (!decision.offer.runtimes.contains(&task.runtime)).then(|| {
        format!(
            "the owner does not allow runtime {} on this device",
            darkcore_proto::agent::v1::Runtime::try_from(task.runtime)
                .map_or("unknown", |r| r.as_str_name())
        )
    })
}

/// One look at the owner's policy, connected or not: stops running tasks when the owner
/// takes the device back, and brings the status file up to date (tasks go on and end while
/// the gateway is away, and the owner sees what they used and that it waits to be sent).
pub fn follow_owner(
    policy: &mut PolicyMonitor,
    status: &mut StatusFile,
    tasks: &TaskManager,
) -> Decision {
    let decision = policy.check();
    status.policy(&decision, policy.core_seconds_given());
    if !decision.available {
        let grace = Duration::from_secs(u64::from(policy.config.policy.stop_grace_seconds));
        tasks.preempt_all(grace, &decision.reason);
    }
    status.tasks(tasks.running());
    status.usage(tasks.usage());
    decision
}

/// The parts of a session that outlive it: the policy, the status file and the tasks.
pub struct Agent<'a> {
    /// Where the identity lives (a renewed certificate is stored there).
    pub state_dir: &'a std::path::Path,
    pub policy: &'a mut PolicyMonitor,
    /// What the operator has acknowledged hearing, for fencing.
    pub fence: &'a crate::fence::Fence,
    pub status: &'a mut StatusFile,
    pub tasks: &'a TaskManager,
    pub reports: &'a mut Reports,
}

pub async fn attach(
    channel: Channel,
    hello: Hello,
    agent: Agent<'_>,
    stop: &mut watch::Receiver<bool>,
) -> Result<SessionEnd, SessionError> {
    let Agent {
        state_dir,
        policy,
        fence,
        status,
        tasks,
        reports,
    } = agent;
    let retry = |what: &str, e: &dyn std::fmt::Display| SessionError::Retry(format!("{what}: {e}"));
    let mut last_sent = hello
        .owner_state
        .as_ref()
        .map(|o| (o.available, o.offer.clone().unwrap_or_default()));
    let (tx, rx) = mpsc::channel(SEND_QUEUE);
    let dialled = std::time::Instant::now();
    tx.send(message(agent_message::Body::Hello(hello)))
        .await
        .map_err(|e| retry("queueing Hello", &e))?;
    let mut client = AgentGatewayClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // One deadline from dialling to Welcome: a connection the gateway dropped mid-handshake
    // (a full accept queue in a reconnect storm) would otherwise hang until TCP gives up.
    let opened = async {
        let mut inbound = client
            .attach(ReceiverStream::new(rx))
            .await
            .map_err(|status| retry("opening the stream", &status.message()))?
            .into_inner();
        let first = inbound
            .message()
            .await
            .map_err(|status| retry("waiting for Welcome", &status.message()))?
            .ok_or_else(|| {
                SessionError::Retry("the gateway closed the stream after Hello".into())
            })?;
        Ok::<_, SessionError>((inbound, first))
    };
    let (mut inbound, first) = tokio::time::timeout(WELCOME_TIMEOUT, opened)
        .await
        .map_err(|_| {
            SessionError::Retry("no Welcome from the gateway within 15 s of dialling".into())
        })??;
    let welcome = match first.body {
        Some(operator_message::Body::Welcome(welcome)) => welcome,
        Some(operator_message::Body::Refusal(refusal)) => return Err(classify(&refusal)),
        _ => {
            return Err(SessionError::Retry(
                "the gateway's first message was not Welcome".into(),
            ));
        }
    };
    check_version(first.version, "agent").map_err(|e| SessionError::Final(e.to_string()))?;
    tracing::info!(device = %welcome.device_id, pool = %welcome.pool, fence_seconds = welcome.fence_seconds, "attached to the gateway");
    fence.welcomed(dialled, welcome.fence_seconds);
    status.connection(true, "connected".into());
    status.statement_key(&welcome.statement_key);
    tasks.usage().resend();

    let beat = Duration::from_secs(u64::from(welcome.heartbeat_interval_seconds.clamp(1, 60)));
    let mut heartbeat = tokio::time::interval(beat);
    let mut check = tokio::time::interval(policy.interval());
    let mut stats = tokio::time::interval(crate::tasks::stats::STATS_EVERY);
    heartbeat.tick().await;
    check.tick().await;
    // The first stats of a stream carry every running container: the operator may be new.
    let mut all_stats = true;
    let mut sequence = 0u64;
    let mut decision = policy.check();
    loop {
        tokio::select! {
            _ = heartbeat.tick() => {
                sequence += 1;
                fence.sent(sequence, std::time::Instant::now());
                tx.send(message(agent_message::Body::Heartbeat(Heartbeat { sequence })))
                    .await
                    .map_err(|e| retry("sending a heartbeat", &e))?;
            }
            _ = stats.tick() => {
                let now = crate::tasks::supervise::unix_ms();
                if let Some(changed) = tasks.meters().changed(now, std::mem::take(&mut all_stats)) {
                    tx.send(message(agent_message::Body::Stats(changed)))
                        .await
                        .map_err(|e| retry("sending stats", &e))?;
                }
            }
            body = reports.next() => {
                tx.send(message(body))
                    .await
                    .map_err(|e| retry("sending a task report", &e))?;
            }
            _ = check.tick() => {
                decision = follow_owner(policy, status, tasks);
                if last_sent.as_ref() != Some(&offered(&decision)) {
                    tracing::info!(available = decision.available, reason = %decision.reason, "owner policy changed what this device gives");
                    last_sent = Some(offered(&decision));
                    tx.send(message(agent_message::Body::OwnerState(to_owner_state(&decision))))
                        .await
                        .map_err(|e| retry("sending the owner state", &e))?;
                }
            }
            received = inbound.message() => match received {
                Ok(Some(received)) => {
                    check_version(received.version, "agent").map_err(|e| SessionError::Final(e.to_string()))?;
                    match received.body {
                        Some(operator_message::Body::Refusal(refusal)) => return Err(classify(&refusal)),
                        Some(operator_message::Body::TaskAssign(task)) => {
                            let refused = refusal(&decision, &task);
                            tasks.assign(task, refused);
                            status.tasks(tasks.running());
                        }
                        Some(operator_message::Body::TaskCancel(cancel)) => {
                            tracing::info!(task = %cancel.task_id, reason = %cancel.reason, "task released by the operator");
                            tasks.cancel(&cancel.task_id, Duration::from_secs(u64::from(cancel.grace_seconds)));
                            status.tasks(tasks.running());
                        }
                        Some(operator_message::Body::HeartbeatAck(ack)) => fence.acknowledged(ack.sequence),
                        Some(operator_message::Body::OutputWanted(wanted)) => tasks.resend_output(&wanted.task_id),
                        Some(operator_message::Body::CreditStanding(standing)) => status.credit(&standing),
                        Some(operator_message::Body::StreamOpen(open)) => tasks.open_stream(client.clone(), open),
                        Some(operator_message::Body::CertificateRenewed(renewed)) => {
                            match crate::identity::store_renewed(state_dir, &renewed.certificate_pem) {
                                Ok(()) => tracing::info!("device certificate renewed; it is used from the next connection"),
                                Err(error) => tracing::warn!(%error, "a renewed device certificate was not stored; the current one stays"),
                            }
                        }
                        Some(operator_message::Body::UsageAck(ack)) => {
                            tasks.usage().acknowledge(ack.through_sequence);
                            status.usage(tasks.usage());
                        }
                        _ => {}
                    }
                }
                Ok(None) => return Err(SessionError::Retry("the gateway closed the stream".into())),
                Err(status) => return Err(retry("the stream failed", &status.message())),
            },
            _ = stop.changed() => {
                let leaving = OwnerState {
                    available: false,
                    reason: "the agent is stopping".into(),
                    offer: None,
                };
                let _ = tx.send(message(agent_message::Body::OwnerState(leaving))).await;
                drop(tx);
                // Give the gateway a moment to read it before the connection goes.
                let _ = tokio::time::timeout(Duration::from_secs(2), inbound.message()).await;
                return Ok(SessionEnd::Stopped);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(code: Code) -> SessionError {
        classify(&Refusal {
            code: code as i32,
            message: "words".into(),
        })
    }

    #[test]
    fn only_refusals_that_say_try_again_are_retried() {
        for code in [Code::Replaced, Code::TimedOut, Code::SlowReader] {
            assert!(matches!(refused(code), SessionError::Retry(_)), "{code:?}");
        }
        for code in [Code::Revoked, Code::PoolGone, Code::Malformed] {
            assert!(matches!(refused(code), SessionError::Final(_)), "{code:?}");
        }
    }
}
