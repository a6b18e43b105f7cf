//! Counting join-token uses. Joins that present the same token at once are counted together:
//! one read and one conditional write per batch, not one write each that conflicts with the rest.
//!
//! ```text
//!  join ─┐                         ┌─> get Secret ─> admit_batch ─> patch uses + k
//!  join ─┼─> queue of the token id ┤        (pure)    (resourceVersion precondition)
//!  join ─┘   (the first drains it) └─> each join gets its own answer
//! ```

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex, MutexGuard};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::oneshot;

use crate::enroll::token::{JoinToken, Rejection, TokenRecord};
use crate::enroll::token_store::{StoreError, from_secret, kube_err, secret_name};

/// Write conflicts a batch rides out (another writer: `token revoke`, another replica).
const MAX_ATTEMPTS: u32 = 20;

/// Why a presented token was not redeemed. Cheap to clone: one batch's failure is every
/// waiting join's answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RedeemError {
    #[error(
        "the join token is not known here: it may have been deleted, or be meant for another cluster; ask the pool's platform team for a new one"
    )]
    Unknown,
    #[error(transparent)]
    Rejected(#[from] Rejection),
    #[error(transparent)]
    Store(Arc<StoreError>),
    #[error("the operator stopped while counting this join: join again")]
    Interrupted,
}

impl From<StoreError> for RedeemError {
    fn from(error: StoreError) -> Self {
        RedeemError::Store(Arc::new(error))
    }
}

impl RedeemError {
    /// A short, bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            RedeemError::Unknown => "unknown",
            RedeemError::Rejected(rejection) => rejection.label(),
            RedeemError::Store(_) | RedeemError::Interrupted => "store",
        }
    }
}

/// Decides a batch of joins against one token's record, in order, each as if the ones admitted
/// before it were already counted. Returns each join's outcome and how many were admitted.
pub fn admit_batch(
    record: &TokenRecord,
    presented: &[&JoinToken],
    now: Timestamp,
) -> (Vec<Result<(), Rejection>>, u32) {
    let mut counted = record.clone();
    let outcomes = presented
        .iter()
        .map(|token| {
            let outcome = counted.verify(token, now);
            if outcome.is_ok() {
                counted.uses += 1;
            }
            outcome
        })
        .collect();
    (outcomes, counted.uses - record.uses)
}

/// Redeems join tokens kept in the operator's namespace. Clones share the queues.
#[derive(Clone)]
pub struct Redeemer {
    inner: Arc<Inner>,
}

struct Inner {
    secrets: Api<Secret>,
    /// Joins waiting to be counted, by token id. An entry exists while its queue is drained.
    queues: Mutex<HashMap<String, Vec<Waiting>>>,
}

struct Waiting {
    token: JoinToken,
    reply: oneshot::Sender<Result<TokenRecord, RedeemError>>,
}

type Decided = (TokenRecord, Vec<Result<(), Rejection>>);

impl Redeemer {
    pub fn new(client: Client, namespace: &str) -> Redeemer {
        Redeemer {
            inner: Arc::new(Inner {
                secrets: Api::namespaced(client, namespace),
                queues: Mutex::default(),
            }),
        }
    }

    /// Checks `token` and counts one use of it. Counts are written with the Secret's
    /// resourceVersion as a precondition, so joins can never exceed `--uses`, even when
    /// several operators count at once.
    pub async fn redeem(&self, token: JoinToken) -> Result<TokenRecord, RedeemError> {
        let (reply, answer) = oneshot::channel();
        let id = token.id.clone();
        let first = match self.queues().entry(id.clone()) {
            Entry::Occupied(mut queue) => {
                queue.get_mut().push(Waiting { token, reply });
                false
            }
            Entry::Vacant(slot) => {
                slot.insert(vec![Waiting { token, reply }]);
                true
            }
        };
        // Drained in its own task, so a join that gives up does not strand the others.
        if first {
            tokio::spawn(self.clone().drain(id));
        }
        answer.await.unwrap_or(Err(RedeemError::Interrupted))
    }

    fn queues(&self) -> MutexGuard<'_, HashMap<String, Vec<Waiting>>> {
        self.inner.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts batches of the token's queue until it is empty, then removes it, under the lock,
    /// so the next join starts a new drain.
    async fn drain(self, id: String) {
        loop {
            let batch = {
                let mut queues = self.queues();
                match queues.get_mut(&id) {
                    Some(queue) if !queue.is_empty() => std::mem::take(queue),
                    _ => {
                        queues.remove(&id);
                        return;
                    }
                }
            };
            let tokens: Vec<&JoinToken> = batch.iter().map(|waiting| &waiting.token).collect();
            let decided = self.count(&id, &tokens).await;
            for (index, waiting) in batch.into_iter().enumerate() {
                let answer = match &decided {
                    Ok((record, outcomes)) => outcomes[index]
                        .map(|()| record.clone())
                        .map_err(RedeemError::from),
                    Err(error) => Err(error.clone()),
                };
                // A join whose caller went away needs no answer.
                let _ = waiting.reply.send(answer);
            }
        }
    }

    async fn count(&self, id: &str, tokens: &[&JoinToken]) -> Result<Decided, RedeemError> {
        let secrets = &self.inner.secrets;
        let name = secret_name(id);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let secret = secrets
                .get_opt(&name)
                .await
                .map_err(kube_err(format!("reading join token {id}")))?
                .ok_or(RedeemError::Unknown)?;
            let record = from_secret(&secret)?;
            let (outcomes, admitted) = admit_batch(&record, tokens, Timestamp::now());
            if admitted == 0 {
                return Ok((record, outcomes));
            }
            let patch = json!({
                "metadata": { "resourceVersion": secret.metadata.resource_version },
                "data": { "uses": ByteString((record.uses + admitted).to_string().into_bytes()) },
            });
            match secrets
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => return Ok((record, outcomes)),
                Err(kube::Error::Api(status)) if status.code == 409 && attempts < MAX_ATTEMPTS => {}
                Err(source) => {
                    let action = format!("counting {admitted} use(s) of join token {id}");
                    return Err(kube_err(action)(source).into());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn token_and_record(max_uses: Option<u32>, uses: u32) -> (JoinToken, TokenRecord, Timestamp) {
        let token = crate::enroll::token::generate(b"ca").unwrap();
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let mut record = TokenRecord::new(&token, "lab", now, Duration::from_secs(60), max_uses);
        record.uses = uses;
        (token, record, now)
    }

    #[test]
    fn a_batch_admits_only_as_many_as_the_token_has_uses_left() {
        let (token, record, now) = token_and_record(Some(5), 3);
        let presented = [&token, &token, &token];
        let (outcomes, admitted) = admit_batch(&record, &presented, now);
        assert_eq!(admitted, 2);
        assert_eq!(outcomes, vec![Ok(()), Ok(()), Err(Rejection::UsedUp)]);
    }

    #[test]
    fn a_wrong_secret_in_a_batch_is_refused_without_using_up_the_token() {
        let (token, record, now) = token_and_record(Some(1), 0);
        let forged = JoinToken {
            secret: "not-the-secret".into(),
            ..token.clone()
        };
        let presented = [&forged, &token, &token];
        let (outcomes, admitted) = admit_batch(&record, &presented, now);
        assert_eq!(admitted, 1);
        assert_eq!(
            outcomes,
            vec![Err(Rejection::WrongSecret), Ok(()), Err(Rejection::UsedUp)]
        );
    }

    #[test]
    fn an_unlimited_token_admits_the_whole_batch_and_an_expired_one_none() {
        let (token, record, now) = token_and_record(None, 7);
        let presented = vec![&token; 100];
        assert_eq!(admit_batch(&record, &presented, now).1, 100);
        let later = now.checked_add(Duration::from_secs(61)).unwrap();
        let (outcomes, admitted) = admit_batch(&record, &presented[..2], later);
        assert_eq!(admitted, 0);
        assert_eq!(outcomes, vec![Err(Rejection::Expired); 2]);
    }
}
