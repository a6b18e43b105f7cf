//! Housekeeping: join tokens that can no longer admit anyone, and the PoolUsage objects of
//! pools that are gone, are deleted once their retention has passed. Only tokens of pools this
//! operator serves (or of pools that no longer exist) are touched.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use darkcore_crds::{DevicePool, PoolUsage};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::ListParams;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, ResourceExt};

use crate::enroll::token::TokenRecord;
use crate::enroll::token_store::{TOKEN_LABEL, from_secret, secret_name};
use crate::metrics::Metrics;
use crate::usage::ledger::utc_day;

/// How long what is no longer needed is kept.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    /// After a token expired, or after it was created if it is used up or revoked.
    pub tokens: Duration,
    /// After the day a PoolUsage object counts, once its pool is deleted.
    pub usage: Duration,
}

fn signed(duration: Duration) -> SignedDuration {
    SignedDuration::try_from(duration).unwrap_or(SignedDuration::MAX)
}

/// Whether a token can go: it can admit no one, and has for its retention. An expired token
/// counts from its expiry; a used-up or revoked one from its creation (when it was used up
/// is not recorded, and it can admit no one either way).
pub fn token_removable(record: &TokenRecord, now: Timestamp, retention: Duration) -> bool {
    let keep = signed(retention);
    let used_up = record.max_uses.is_some_and(|max| record.uses >= max);
    let since = match (record.expires <= now, used_up || record.revoked) {
        (true, _) => Some(record.expires),
        (false, true) => Some(record.created),
        (false, false) => None,
    };
    since.is_some_and(|since| since.checked_add(keep).is_ok_and(|until| now >= until))
}

/// Whether a PoolUsage object can go: its pool is gone, and its day ended at least the
/// retention ago (a day ends at the next midnight, UTC).
pub fn usage_removable(day: &str, pool_exists: bool, now: Timestamp, retention: Duration) -> bool {
    let back = now.as_millisecond().saturating_sub(
        i64::try_from(retention.as_millis())
            .unwrap_or(i64::MAX)
            .saturating_add(86_400_000),
    );
    !pool_exists && day <= utc_day(back).as_str()
}

pub struct Housekeeper {
    pub client: Client,
    pub namespace: String,
    /// The pools this operator serves.
    pub served: Store<DevicePool>,
    pub retention: Retention,
    pub every: Duration,
    pub metrics: Arc<Metrics>,
}

impl Housekeeper {
    pub async fn run(self) {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(error) = self.sweep().await {
                tracing::warn!(%error, "housekeeping failed; trying again at the next round");
            }
        }
    }

    async fn sweep(&self) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let pools: HashSet<String> = Api::<DevicePool>::all(self.client.clone())
            .list_metadata(&ListParams::default())
            .await?
            .items
            .iter()
            .map(|p| p.name_any())
            .collect();
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let tokens = secrets
            .list(&ListParams::default().labels(&format!("{TOKEN_LABEL}=true")))
            .await?;
        for secret in &tokens.items {
            let Ok(record) = from_secret(secret) else {
                continue;
            };
            let ours = !pools.contains(&record.pool)
                || self.served.get(&ObjectRef::new(&record.pool)).is_some();
            if ours && token_removable(&record, now, self.retention.tokens) {
                self.metrics.api_write("Secret", "delete");
                match secrets
                    .delete(&secret_name(&record.id), &Default::default())
                    .await
                {
                    Ok(_) => {
                        tracing::info!(token = %record.id, pool = %record.pool, "deleted a join token past its retention")
                    }
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(error) => return Err(error),
                }
            }
        }
        let usage: Api<PoolUsage> = Api::all(self.client.clone());
        for object in usage.list(&ListParams::default()).await?.items {
            let spec = &object.spec;
            let exists = pools.contains(&spec.pool);
            if usage_removable(&spec.day, exists, now, self.retention.usage) {
                self.metrics.api_write("PoolUsage", "delete");
                match usage.delete(&object.name_any(), &Default::default()).await {
                    Ok(_) => {
                        tracing::info!(object = %object.name_any(), "deleted the usage of a deleted pool past its retention")
                    }
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(error) => return Err(error),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(expires_in: i64, max_uses: Option<u32>, uses: u32, revoked: bool) -> TokenRecord {
        let created = Timestamp::from_second(1_795_000_000).unwrap();
        TokenRecord {
            owner: None,
            id: "0123456789ab".into(),
            pool: "lab".into(),
            secret_sha256: String::new(),
            created,
            expires: created + SignedDuration::from_secs(expires_in),
            max_uses,
            uses,
            revoked,
        }
    }

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn a_token_goes_a_retention_after_it_can_admit_no_one() {
        let created = Timestamp::from_second(1_795_000_000).unwrap();
        let at = |secs: i64| created + SignedDuration::from_secs(secs);
        let week = 7 * DAY;
        let open = record(30 * 86_400, Some(5), 1, false);
        assert!(
            !token_removable(&open, at(29 * 86_400), week),
            "still usable"
        );
        // Expired at 30 d: kept for the week after.
        assert!(!token_removable(&open, at(36 * 86_400), week));
        assert!(token_removable(&open, at(37 * 86_400), week));
        // Used up or revoked: counted from creation.
        let used_up = record(30 * 86_400, Some(1), 1, false);
        assert!(!token_removable(&used_up, at(6 * 86_400), week));
        assert!(token_removable(&used_up, at(7 * 86_400), week));
        let revoked = record(30 * 86_400, None, 0, true);
        assert!(token_removable(&revoked, at(7 * 86_400), week));
        let unlimited = record(30 * 86_400, None, 1_000, false);
        assert!(!token_removable(&unlimited, at(7 * 86_400), week));
    }

    #[test]
    fn usage_goes_only_once_its_pool_is_gone_and_its_day_is_past_the_retention() {
        // 2026-11-22T12:00Z.
        let now = Timestamp::from_second(1_795_348_800).unwrap();
        let ninety = 90 * DAY;
        assert!(
            !usage_removable("2020-01-01", true, now, ninety),
            "its pool exists"
        );
        assert!(usage_removable("2020-01-01", false, now, ninety));
        assert!(
            !usage_removable("2026-11-01", false, now, ninety),
            "too recent"
        );
        assert!(usage_removable("2026-11-20", false, now, DAY));
        assert!(
            !usage_removable("2026-11-21", false, now, DAY),
            "its day ended 12 h ago"
        );
    }
}
