//! Device reputations kept durably: judged results change the in-memory book at once, and the
//! shards that changed are written as `DeviceReputation` objects at most once per flush.
//!
//! It also keeps how reliably each device stays connected: each connection and disconnection
//! closes a stretch of the device's time, and stretches still open are folded in every
//! [`FOLD_EVERY`], so a restarted operator loses at most that much of it.
//!
//! The write budget is the number of shards that changed per flush (at most 64 per pool),
//! whatever the number of devices or results. The leader loads the book before it places a
//! pod, and its book is the truth it writes: a result judged by a previous leader in its last
//! flush interval can be lost, which costs a device at most that interval's results.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use darkcore_crds::AdaptiveReplication;
use darkcore_crds::device_reputation::{
    DeviceRecord, DeviceReputation, DeviceReputationSpec, Quarantine,
};
use kube::api::{ListParams, ObjectMeta, PostParams};
use kube::{Api, Client};

use crate::pool::POOL_LABEL;
use crate::usage::ledger::shard_of;
use crate::validation::reliability::Uptime;
use crate::validation::reputation::{Reputation, Standing};

/// How often changed shards are written.
pub const FLUSH_EVERY: Duration = Duration::from_secs(5);
/// How often stretches of connection still open are folded into the records.
pub const FOLD_EVERY: Duration = Duration::from_secs(600);
/// Conflicting writes (another writer changed the object) retried within one flush.
const CONFLICT_RETRIES: usize = 5;

/// Where a device's record lives: its pool and shard.
type Shard = (String, u32);

#[derive(Default)]
struct Book {
    /// By pool and shard, then device.
    shards: HashMap<Shard, BTreeMap<String, DeviceRecord>>,
    /// Shards changed since they were last written.
    dirty: BTreeSet<Shard>,
    /// Each device heard of since this operator started, by pool and id: connected or not,
    /// since when (the stretch not yet in its record).
    sessions: HashMap<(String, String), (bool, Instant)>,
}

impl Book {
    /// The device's record, if it has one.
    fn find(&self, pool: &str, device: &str) -> Option<&DeviceRecord> {
        self.shards
            .get(&(pool.to_string(), shard_of(device)))?
            .get(device)
    }

    /// The device's record to change (made fresh if it has none); its shard is to be written.
    fn record(&mut self, pool: &str, device: &str) -> &mut DeviceRecord {
        let shard = (pool.to_string(), shard_of(device));
        self.dirty.insert(shard.clone());
        self.shards
            .entry(shard)
            .or_default()
            .entry(device.to_string())
            .or_insert_with(fresh)
    }

    /// Adds a stretch of the device's time, connected or not, to its record.
    fn observe(&mut self, pool: &str, device: &str, ms: u64, online: bool) {
        let record = self.record(pool, device);
        let uptime = uptime_of(record).observe(ms, online);
        record.online_milliseconds = uptime.online_ms;
        record.observed_milliseconds = uptime.observed_ms;
    }

    /// The device's uptime with its open stretch up to `now`.
    fn uptime(&self, pool: &str, device: &str, now: Instant) -> Uptime {
        let uptime = self.find(pool, device).map(uptime_of).unwrap_or_default();
        match self.sessions.get(&(pool.to_string(), device.to_string())) {
            Some((online, since)) => {
                uptime.observe(now.duration_since(*since).as_millis() as u64, *online)
            }
            None => uptime,
        }
    }
}

fn uptime_of(record: &DeviceRecord) -> Uptime {
    Uptime {
        online_ms: record.online_milliseconds,
        observed_ms: record.observed_milliseconds,
    }
}

/// A device's record as people read it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReputationView {
    pub error_rate_percent: f64,
    pub validated: u64,
    pub invalid: u64,
    pub quarantined: Option<String>,
    /// The share of the time it was connected (recent time weighing most), once observed.
    #[serde(default)]
    pub reliability_percent: Option<f64>,
}

/// What judging a pod's results changed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Judged {
    /// Devices quarantined by it, with why.
    pub quarantined: Vec<(String, String)>,
}

pub struct ReputationStore {
    book: Mutex<Book>,
    api: Api<DeviceReputation>,
}

fn to_reputation(record: &DeviceRecord) -> Reputation {
    Reputation {
        error_rate: f64::from(record.error_rate_ppm) / 1e6,
        validated: record.validated,
        invalid: record.invalid,
    }
}

/// Writes judged results into a record; how reliably the device stays online is kept.
fn set_reputation(
    record: &mut DeviceRecord,
    reputation: Reputation,
    quarantined: Option<Quarantine>,
) {
    record.error_rate_ppm = reputation.error_rate_ppm();
    record.validated = reputation.validated;
    record.invalid = reputation.invalid;
    record.quarantined = quarantined;
}

fn view_of(record: &DeviceRecord, uptime: Uptime) -> ReputationView {
    ReputationView {
        error_rate_percent: f64::from(record.error_rate_ppm) / 1e4,
        validated: record.validated,
        invalid: record.invalid,
        quarantined: record.quarantined.as_ref().map(|q| q.reason.clone()),
        reliability_percent: uptime.ppm().map(|ppm| f64::from(ppm) / 1e4),
    }
}

fn fresh() -> DeviceRecord {
    let mut record = DeviceRecord::default();
    set_reputation(&mut record, Reputation::default(), None);
    record
}

/// The object a pool's shard is written to.
pub fn object_name(pool: &str, shard: u32) -> String {
    format!("{pool}.{shard:02}")
}

impl ReputationStore {
    pub fn new(client: Client) -> Arc<ReputationStore> {
        Arc::new(ReputationStore {
            book: Mutex::default(),
            api: Api::all(client),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads every stored record into the book (those of pools another operator serves too:
    /// they are few, and this one never writes them).
    pub async fn load(&self) -> Result<(), kube::Error> {
        let listed = self.api.list(&ListParams::default()).await?;
        let mut book = self.lock();
        for object in listed.items {
            let spec = object.spec;
            book.shards.insert((spec.pool, spec.shard), spec.devices);
        }
        Ok(())
    }

    /// Every device's record: its pool, id and view.
    pub fn views(&self) -> Vec<(String, String, ReputationView)> {
        let book = self.lock();
        let mut views = Vec::new();
        for ((pool, _), records) in &book.shards {
            for (device, record) in records {
                views.push((
                    pool.clone(),
                    device.clone(),
                    view_of(record, uptime_of(record)),
                ));
            }
        }
        views
    }

    /// Records a validated pod's judgement: `agreeing` devices gave the validated result,
    /// `disagreeing` another. Returns the devices this quarantines.
    pub fn judge(
        &self,
        pool: &str,
        agreeing: &[String],
        disagreeing: &[String],
        policy: &AdaptiveReplication,
    ) -> Judged {
        let mut book = self.lock();
        let mut judged = Judged::default();
        let verdicts =
            (agreeing.iter().map(|d| (d, true))).chain(disagreeing.iter().map(|d| (d, false)));
        for (device, valid) in verdicts {
            let record = book.record(pool, device);
            let before = to_reputation(record);
            let after = if valid {
                before.validated()
            } else {
                before.invalid()
            };
            let newly =
                record.quarantined.is_none() && after.standing(policy) == Standing::Quarantined;
            let quarantined = match newly {
                true => {
                    let reason = format!(
                        "error rate {:.1}% after {} invalid of {} judged results, past the pool's quarantineErrorRatePercent ({}%)",
                        after.error_rate * 100.0,
                        after.invalid,
                        after.invalid + after.validated,
                        policy.quarantine_error_rate_percent
                    );
                    judged.quarantined.push((device.clone(), reason.clone()));
                    Some(Quarantine {
                        since: k8s_openapi::jiff::Timestamp::now().to_string(),
                        reason,
                    })
                }
                false => record.quarantined.clone(),
            };
            set_reputation(record, after, quarantined);
        }
        judged
    }

    /// Where a device of `pool` stands under `policy`.
    pub fn standing(&self, pool: &str, device: &str, policy: &AdaptiveReplication) -> Standing {
        let book = self.lock();
        match book.find(pool, device) {
            Some(record) if record.quarantined.is_some() => Standing::Quarantined,
            Some(record) => to_reputation(record).standing(policy),
            None => Reputation::default().standing(policy),
        }
    }

    /// A device's record for listings, with its reliability up to now, if it has a record or
    /// was heard of since this operator started.
    pub fn view(&self, pool: &str, device: &str) -> Option<ReputationView> {
        let book = self.lock();
        let record = book.find(pool, device).cloned();
        let heard = book
            .sessions
            .contains_key(&(pool.to_string(), device.to_string()));
        if record.is_none() && !heard {
            return None;
        }
        let uptime = book.uptime(pool, device, Instant::now());
        Some(view_of(&record.unwrap_or_else(fresh), uptime))
    }

    /// A device connected (`online`) or its stream ended, at `now`: the stretch since it was
    /// last heard of goes into its record, as connected or not.
    pub fn seen(&self, pool: &str, device: &str, online: bool, now: Instant) {
        let mut book = self.lock();
        let key = (pool.to_string(), device.to_string());
        if let Some((was_online, since)) = book.sessions.insert(key, (online, now)) {
            let ms = now.saturating_duration_since(since).as_millis() as u64;
            book.observe(pool, device, ms, was_online);
        }
    }

    /// How reliably the device stays connected, in parts per million, once observed.
    pub fn reliability(&self, pool: &str, device: &str, now: Instant) -> Option<u32> {
        self.lock().uptime(pool, device, now).ppm()
    }

    /// Folds every open stretch into its record, up to `now`.
    pub fn fold(&self, now: Instant) {
        let mut book = self.lock();
        let open: Vec<((String, String), (bool, Instant))> =
            book.sessions.iter().map(|(k, v)| (k.clone(), *v)).collect();
        for ((pool, device), (online, since)) in open {
            let ms = now.saturating_duration_since(since).as_millis() as u64;
            book.observe(&pool, &device, ms, online);
            book.sessions.insert((pool, device), (online, now));
        }
    }

    /// Writes the changed shards every [`FLUSH_EVERY`], and folds open stretches in every
    /// [`FOLD_EVERY`], until the process ends.
    pub async fn run(self: Arc<Self>) {
        let mut folded = Instant::now();
        loop {
            tokio::time::sleep(FLUSH_EVERY).await;
            if folded.elapsed() >= FOLD_EVERY {
                folded = Instant::now();
                self.fold(folded);
            }
            self.flush().await;
        }
    }

    /// Writes each changed shard as its book holds it; a shard that fails stays changed.
    pub async fn flush(&self) {
        let dirty = std::mem::take(&mut self.lock().dirty);
        for shard in dirty {
            let devices = self.lock().shards.get(&shard).cloned().unwrap_or_default();
            if let Err(error) = self.write(&shard, devices).await {
                tracing::warn!(pool = %shard.0, shard = shard.1, %error, "could not store device reputations; retrying at the next flush");
                self.lock().dirty.insert(shard);
            }
        }
    }

    async fn write(
        &self,
        (pool, shard): &Shard,
        devices: BTreeMap<String, DeviceRecord>,
    ) -> Result<(), kube::Error> {
        let name = object_name(pool, *shard);
        let spec = DeviceReputationSpec {
            pool: pool.clone(),
            shard: *shard,
            device_count: devices.len() as u32,
            quarantined_count: devices.values().filter(|r| r.quarantined.is_some()).count() as u32,
            devices,
        };
        for attempt in 1.. {
            let current = self.api.get_opt(&name).await?;
            let result = match current {
                Some(mut object) => {
                    object.spec = spec.clone();
                    self.api
                        .replace(&name, &PostParams::default(), &object)
                        .await
                }
                None => {
                    let object = DeviceReputation {
                        metadata: ObjectMeta {
                            name: Some(name.clone()),
                            labels: Some([(POOL_LABEL.to_string(), pool.clone())].into()),
                            ..Default::default()
                        },
                        spec: spec.clone(),
                    };
                    self.api.create(&PostParams::default(), &object).await
                }
            };
            match result {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(status))
                    if status.code == 409 && attempt < CONFLICT_RETRIES => {}
                Err(error) => return Err(error),
            }
        }
        unreachable!("the loop returns")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Arc<ReputationStore> {
        // Never reaches an API server in these tests: only the book is used.
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        ReputationStore::new(Client::try_from(config).unwrap())
    }

    fn judge_many(
        store: &ReputationStore,
        agreeing: &[&str],
        disagreeing: &[&str],
        times: usize,
    ) -> Vec<(String, String)> {
        let policy = AdaptiveReplication::default();
        let owned = |v: &[&str]| v.iter().map(|d| d.to_string()).collect::<Vec<_>>();
        let mut quarantined = Vec::new();
        for _ in 0..times {
            let judged = store.judge("lab", &owned(agreeing), &owned(disagreeing), &policy);
            quarantined.extend(judged.quarantined);
        }
        quarantined
    }

    #[tokio::test]
    async fn a_liar_is_quarantined_once_and_honest_devices_earn_trust() {
        let store = store();
        let policy = AdaptiveReplication::default();
        let quarantined = judge_many(&store, &["dev-a", "dev-b"], &["liar"], 5);
        assert_eq!(quarantined.len(), 1, "{quarantined:?}");
        assert_eq!(quarantined[0].0, "liar");
        assert!(
            quarantined[0].1.contains("after 5 invalid of 5"),
            "{}",
            quarantined[0].1
        );
        assert_eq!(
            store.standing("lab", "liar", &policy),
            Standing::Quarantined
        );
        assert!(
            judge_many(&store, &["dev-a"], &["liar"], 3).is_empty(),
            "quarantined once"
        );
        let view = store.view("lab", "dev-a").unwrap();
        assert_eq!(
            (view.validated, view.invalid, &view.quarantined),
            (8, 0, &None)
        );
        assert!(
            (view.error_rate_percent - 10.0 * 0.95f64.powi(8)).abs() < 0.01,
            "{view:?}"
        );
        assert_eq!(store.standing("lab", "dev-a", &policy), Standing::Unproven);
        judge_many(&store, &["dev-a", "dev-b"], &[], 6);
        assert_eq!(store.standing("lab", "dev-a", &policy), Standing::Trusted);
        assert_eq!(
            store.standing("lab", "unknown", &policy),
            Standing::Unproven
        );
        assert_eq!(
            store.view("other-pool", "dev-a"),
            None,
            "pools keep their own records"
        );
    }

    #[test]
    fn records_keep_the_error_rate_to_the_millionth() {
        let reputation = Reputation::default().validated().invalid();
        let mut record = DeviceRecord::default();
        set_reputation(&mut record, reputation, None);
        let back = to_reputation(&record);
        assert!((back.error_rate - reputation.error_rate).abs() < 1e-6);
        assert_eq!((back.validated, back.invalid), (1, 1));
    }
}
