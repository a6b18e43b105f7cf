//! Leader election on a coordination Lease: of several operator replicas exactly one acts, and
//! a standby takes over when the leader lets go (at shutdown) or stops renewing (a crash).
//!
//! Writes carry the Lease's resourceVersion, so two replicas can never both win one round. A
//! standby times the holder's silence on its own clock, from when it last saw the Lease change,
//! so clock skew between machines does not matter. A leader that cannot renew within the renew
//! deadline gives up (the process exits) before any standby may take over.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

/// How long the lease holds, and how often it is renewed and re-read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How long a standby waits, after the lease last changed, before taking it.
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it stops acting.
    pub renew_deadline: Duration,
    /// How often the leader renews and a standby looks.
    pub retry_period: Duration,
}

impl Timing {
    /// client-go's proportions (15 s, 10 s, 2 s) scaled to `lease_duration`.
    pub fn for_lease(lease_duration: Duration) -> Timing {
        Timing {
            lease_duration,
            renew_deadline: lease_duration * 2 / 3,
            retry_period: (lease_duration / 7).max(Duration::from_millis(200)),
        }
    }
}

/// What a replica may do with the lease as it reads it.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nobody holds it, it is ours already, or its holder fell silent: write ourselves in.
    Take,
    /// Someone else holds it; look again later.
    Wait { holder: String },
}

/// Judges `spec`, last seen to change at `changed_at`, for the replica `me` (pure).
pub fn judge(spec: Option<&LeaseSpec>, me: &str, changed_at: Instant, now: Instant) -> Verdict {
    let holder = spec
        .and_then(|s| s.holder_identity.as_deref())
        .unwrap_or_default();
    if holder.is_empty() || holder == me {
        return Verdict::Take;
    }
    let duration = spec
        .and_then(|s| s.lease_duration_seconds)
        .map_or(Duration::ZERO, |s| Duration::from_secs(s.max(0) as u64));
    if now.saturating_duration_since(changed_at) >= duration {
        Verdict::Take
    } else {
        Verdict::Wait {
            holder: holder.into(),
        }
    }
}

/// The spec that makes `me` the holder of a lease whose current spec is `current`.
pub fn claimed(current: Option<&LeaseSpec>, me: &str, timing: Timing, now: Timestamp) -> LeaseSpec {
    let was_mine = current.and_then(|s| s.holder_identity.as_deref()) == Some(me);
    let transitions = current.and_then(|s| s.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(me.into()),
        lease_duration_seconds: Some(timing.lease_duration.as_secs().max(1) as i32),
        acquire_time: if was_mine {
            current.and_then(|s| s.acquire_time.clone())
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if was_mine || current.is_none() {
            transitions
        } else {
            transitions + 1
        }),
        ..LeaseSpec::default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("could not renew leadership lease {lease} for {deadline:?}: {last}")]
    RenewDeadline {
        lease: String,
        deadline: Duration,
        last: String,
    },
    #[error("leadership lease {lease} was taken over by {holder}")]
    TakenOver { lease: String, holder: String },
    #[error("the task renewing the leadership lease failed: {0}")]
    Renewer(String),
}

/// One replica's handle on the election lease `namespace/name`.
#[derive(Clone)]
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    /// The installation's anchor, so that `helm uninstall` removes the Lease too.
    owner: Option<OwnerReference>,
}

impl LeaseLock {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        timing: Timing,
        owner: Option<OwnerReference>,
    ) -> LeaseLock {
        LeaseLock {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            timing,
            owner,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Waits until this replica holds the lease. API errors are logged and retried.
    pub async fn acquire(&self) -> Instant {
        let mut seen: Option<(String, Instant)> = None;
        let mut waiting_on = String::new();
        loop {
            match self.try_acquire(&mut seen).await {
                Ok(Verdict::Take) => {
                    tracing::info!(lease = %self.name, identity = %self.identity, "became the leader");
                    return Instant::now();
                }
                Ok(Verdict::Wait { holder }) => {
                    if holder != waiting_on {
                        tracing::info!(lease = %self.name, %holder, "standing by: another replica leads");
                        waiting_on = holder;
                    }
                }
                Err(error) => {
                    tracing::warn!(lease = %self.name, %error, "reading the leadership lease; retrying")
                }
            }
            tokio::time::sleep(self.timing.retry_period).await;
        }
    }

    /// One look at the lease, writing ourselves in when the verdict is Take. A write that
    /// loses a race (409) counts as Wait: the winner's write is the change we then time.
    async fn try_acquire(&self, seen: &mut Option<(String, Instant)>) -> kube::Result<Verdict> {
        let now = Instant::now();
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            let fresh = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    owner_references: self.owner.clone().map(|o| vec![o]),
                    ..ObjectMeta::default()
                },
                spec: Some(claimed(None, &self.identity, self.timing, Timestamp::now())),
            };
            return won_or_lost(self.api.create(&PostParams::default(), &fresh).await);
        };
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let changed_at = match seen {
            Some((v, at)) if *v == version => *at,
            _ => {
                *seen = Some((version, now));
                now
            }
        };
        match judge(lease.spec.as_ref(), &self.identity, changed_at, now) {
            Verdict::Take => won_or_lost(self.write(lease).await),
            wait => Ok(wait),
        }
    }

    /// Starts renewing at once, in the background, so that however long start-up takes the
    /// lease stays renewed. Dropping the returned handle stops the renewals.
    pub fn hold_in_background(&self, acquired: Instant) -> Held {
        let lock = self.clone();
        Held(tokio::spawn(async move { lock.hold(acquired).await }))
    }

    /// Renews the lease every retry period. Returns only when leadership is lost: the lease was
    /// taken over, or no renewal succeeded within the renew deadline.
    pub async fn hold(&self, acquired: Instant) -> Error {
        let mut renewed = acquired;
        let mut last_error = String::from("no attempt yet");
        loop {
            tokio::time::sleep(self.timing.retry_period).await;
            // As client-go does, one attempt may use what is left of the renew deadline: a slow
            // API server costs no leadership, and a hung request none past the deadline.
            let left = self.timing.renew_deadline.saturating_sub(renewed.elapsed());
            let attempt = tokio::time::timeout(left, self.renew()).await;
            match attempt.unwrap_or(Err(RenewError::TimedOut)) {
                Ok(()) => renewed = Instant::now(),
                Err(RenewError::TakenOver(holder)) => {
                    return Error::TakenOver {
                        lease: self.name.clone(),
                        holder,
                    };
                }
                Err(RenewError::Api(error)) => {
                    tracing::warn!(lease = %self.name, %error, "renewing the leadership lease failed");
                    last_error = error.to_string();
                }
                Err(RenewError::TimedOut) => {
                    tracing::warn!(lease = %self.name, "renewing the leadership lease timed out");
                    last_error = "the renewal timed out".into();
                }
            }
            if renewed.elapsed() >= self.timing.renew_deadline {
                return Error::RenewDeadline {
                    lease: self.name.clone(),
                    deadline: self.timing.renew_deadline,
                    last: last_error,
                };
            }
        }
    }

    async fn renew(&self) -> Result<(), RenewError> {
        let lease = self.api.get(&self.name).await?;
        let holder = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.clone())
            .unwrap_or_default();
        if holder != self.identity {
            return Err(RenewError::TakenOver(holder));
        }
        self.write(lease).await?;
        Ok(())
    }

    /// Lets go at shutdown, so a standby takes over at once instead of after the lease runs out.
    pub async fn release(&self) {
        let result = async {
            let mut lease = self.api.get(&self.name).await?;
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
                return Ok(());
            }
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(MicroTime(Timestamp::now()));
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await
                .map(drop)
        }
        .await;
        match result {
            Ok(()) => tracing::info!(lease = %self.name, "released leadership"),
            Err(error) => {
                tracing::warn!(lease = %self.name, %error, "releasing leadership; a standby takes over when the lease runs out")
            }
        }
    }

    /// Writes ourselves in as holder, guarded by the resourceVersion `lease` was read at.
    async fn write(&self, mut lease: Lease) -> kube::Result<Lease> {
        lease.spec = Some(claimed(
            lease.spec.as_ref(),
            &self.identity,
            self.timing,
            Timestamp::now(),
        ));
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
    }
}

/// A write that claims the lease: it won, or lost the race (409) to another replica's write,
/// which is then the change a standby times.
fn won_or_lost(written: kube::Result<Lease>) -> kube::Result<Verdict> {
    match written {
        Ok(_) => Ok(Verdict::Take),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(Verdict::Wait {
            holder: "another replica".into(),
        }),
        Err(e) => Err(e),
    }
}

/// The background renewals of a held lease; see [`LeaseLock::hold_in_background`].
pub struct Held(tokio::task::JoinHandle<Error>);

impl Held {
    /// Waits until leadership is lost, and says why.
    pub async fn lost(&mut self) -> Error {
        match (&mut self.0).await {
            Ok(error) => error,
            Err(join) => Error::Renewer(join.to_string()),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.abort();
    }
}

enum RenewError {
    TakenOver(String),
    Api(kube::Error),
    TimedOut,
}

impl From<kube::Error> for RenewError {
    fn from(error: kube::Error) -> Self {
        RenewError::Api(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(holder: &str, seconds: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(seconds),
            lease_transitions: Some(3),
            acquire_time: Some(MicroTime(Timestamp::UNIX_EPOCH)),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_fresh_lease_of_another_replica_is_waited_on() {
        let t0 = Instant::now();
        let spec = held_by("b", 15);
        assert_eq!(
            judge(Some(&spec), "a", t0, t0 + Duration::from_secs(14)),
            Verdict::Wait { holder: "b".into() }
        );
    }

    #[test]
    fn a_lease_silent_for_its_duration_is_taken() {
        let t0 = Instant::now();
        let spec = held_by("b", 15);
        assert_eq!(
            judge(Some(&spec), "a", t0, t0 + Duration::from_secs(15)),
            Verdict::Take
        );
    }

    #[test]
    fn a_released_missing_or_own_lease_is_taken_at_once() {
        let t0 = Instant::now();
        let released = LeaseSpec {
            holder_identity: None,
            ..held_by("", 1)
        };
        assert_eq!(judge(Some(&released), "a", t0, t0), Verdict::Take);
        assert_eq!(judge(None, "a", t0, t0), Verdict::Take);
        assert_eq!(judge(Some(&held_by("a", 15)), "a", t0, t0), Verdict::Take);
    }

    #[test]
    fn taking_over_counts_a_transition_and_renewing_does_not() {
        let timing = Timing::for_lease(Duration::from_secs(15));
        let now = Timestamp::now();
        let taken = claimed(Some(&held_by("b", 15)), "a", timing, now);
        assert_eq!(taken.holder_identity.as_deref(), Some("a"));
        assert_eq!(taken.lease_transitions, Some(4));
        assert_eq!(taken.acquire_time, Some(MicroTime(now)));
        let renewed = claimed(Some(&held_by("a", 15)), "a", timing, now);
        assert_eq!(renewed.lease_transitions, Some(3));
        assert_eq!(renewed.acquire_time, Some(MicroTime(Timestamp::UNIX_EPOCH)));
        assert_eq!(renewed.lease_duration_seconds, Some(15));
    }

    #[test]
    fn the_leader_gives_up_before_a_standby_may_take_over() {
        let timing = Timing::for_lease(Duration::from_secs(15));
        assert_eq!(timing.renew_deadline, Duration::from_secs(10));
        assert_eq!(timing.retry_period.as_millis(), 2142);
        // The last renewal attempt starts within a retry period of the deadline and is cut
        // off after one more.
        assert!(timing.renew_deadline + 2 * timing.retry_period < timing.lease_duration);
    }
}
