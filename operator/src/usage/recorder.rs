//! Stores the usage records agents send: checked against the operator's attempt book (refused,
//! or bounded by wall time × granted), buffered per `PoolUsage` object and written at most
//! once per object per flush interval, then acknowledged to each agent once all its records
//! are stored. A record that is never acknowledged comes again, and counts once. Charges the
//! operator makes for attempts lost with their devices are stored the same way, and so are its
//! judgements of checked attempts' results, which move their usage out of pending credit. After
//! each write, the devices in it hear what they are credited with that day.
//!
//! The write budget is the number of objects that changed per interval (at most 64 per pool
//! and day), whatever the number of devices or tasks. A lost attempt's charge is written
//! within a second: a restarted operator makes it again from the pod's status, and the object
//! counts it once, but only while that status still shows the loss.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use darkcore_crds::{DevicePool, PoolUsage};
use darkcore_proto::PROTOCOL_VERSION;
use darkcore_proto::agent::v1::{OperatorMessage, UsageAck, UsageRecord, operator_message};
use darkcore_statement::Standing;
use kube::api::{ObjectMeta, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::devices::registry::{AgentSender, Registry};
use crate::metrics::Metrics;
use crate::pool::POOL_LABEL;
use crate::usage::attempts::{self, AttemptBook, Judgement, Verdict};
use crate::usage::credit;
use crate::usage::ledger::{Bucket, Charge, apply, charge_lost};
use crate::usage::statement::prices_of;
use crate::warmup::Warmup;

/// Label with the UTC day on every PoolUsage, for `usage --since`.
pub const DAY_LABEL: &str = "darkcore.io/day";
/// Batches of records waiting for the recorder before agents' streams wait.
const INBOX: usize = 1024;
/// Conflicting writes (another writer changed the object) retried before the next flush.
const CONFLICT_RETRIES: usize = 5;
/// Records of one device held unchecked at once (while a restarted operator learns its
/// attempts): far more than a device finishes in a warm-up. Beyond it a batch is not taken,
/// and so not acknowledged: its device sends it again on its next connection.
pub const WAITING_PER_DEVICE: usize = 4_096;

/// How soon a lost attempt's charge is written.
const LOST_WRITTEN_WITHIN: Duration = Duration::from_secs(1);

/// A charge for the recorder to store.
pub enum Charged {
    /// Records from one agent stream, and where its acknowledgement goes: checked against
    /// the attempt book before they count.
    Reported {
        device: String,
        pool: String,
        records: Vec<UsageRecord>,
        ack: AgentSender,
    },
    Ruled(Ruling),
}

/// What the operator itself records: its charge for an attempt lost with its device, or how a
/// checked attempt's result was judged after its usage was filed pending.
pub enum Ruling {
    Lost(LostCharge),
    Judged(Judgement),
}

/// The operator's own charge for an attempt lost with its device (no sequence: each object
/// counts a task's loss once, by its task id).
pub struct LostCharge {
    pub device: String,
    pub pool: String,
    pub record: UsageRecord,
}

/// Where the operator's rulings go. Unbounded on purpose: there is at most one of each kind
/// per attempt the operator made, and none may be dropped.
pub type Rulings = mpsc::UnboundedSender<Ruling>;

/// What the recorder reads: devices' records (bounded, so streams wait) and the operator's
/// own charges.
pub struct Inbox {
    reported: mpsc::Receiver<Charged>,
    rulings: mpsc::UnboundedReceiver<Ruling>,
}

/// Checked charges for one device in one object.
#[derive(Default)]
struct Counted {
    /// The device's own records, by sequence (each once).
    reported: BTreeMap<u64, Charge>,
    /// The operator's charges for its lost attempts.
    lost: Vec<UsageRecord>,
    /// Attempts filed pending whose results were judged since, by task id.
    judged: Vec<(String, Standing)>,
}

/// Charges received and not yet stored.
#[derive(Default)]
struct Pending {
    /// Devices' records not yet checked (or waiting for the warm-up), with their pool.
    reported: HashMap<String, (String, BTreeMap<u64, UsageRecord>)>,
    /// Checked charges, by object and device.
    buckets: BTreeMap<Bucket, BTreeMap<String, Counted>>,
    /// Per device: the highest sequence received, and the stream to acknowledge on.
    received: HashMap<String, (u64, AgentSender)>,
}

impl Pending {
    /// Takes a charge; false when a device's batch was not taken (too many of its records
    /// wait unchecked).
    fn add(&mut self, charged: Charged) -> bool {
        match charged {
            Charged::Reported {
                device,
                pool,
                records,
                ack,
            } => {
                let highest = records.iter().map(|r| r.sequence).max().unwrap_or(0);
                let waiting = &mut self
                    .reported
                    .entry(device.clone())
                    .or_insert((pool, BTreeMap::new()))
                    .1;
                if waiting.len() + records.len() > WAITING_PER_DEVICE {
                    if waiting.is_empty() {
                        self.reported.remove(&device);
                    }
                    return false;
                }
                for record in records {
                    waiting.insert(record.sequence, record);
                }
                let entry = self.received.entry(device).or_insert((0, ack.clone()));
                entry.0 = entry.0.max(highest);
                // The newest stream is the one to answer on.
                entry.1 = ack;
                true
            }
            Charged::Ruled(Ruling::Judged(judged)) => {
                self.counted(&judged.pool, &judged.device, judged.ended_unix_ms)
                    .judged
                    .push((judged.task_id, judged.standing));
                true
            }
            Charged::Ruled(Ruling::Lost(LostCharge {
                device,
                pool,
                record,
            })) => {
                if pool.is_empty() {
                    // No object can be named for it; it would be retried for ever.
                    tracing::warn!(%device, task = %record.task_id, "a lost attempt's pool is not known; its charge is dropped");
                    return true;
                }
                self.counted(&pool, &device, record.ended_unix_ms)
                    .lost
                    .push(record);
                true
            }
        }
    }

    fn counted(&mut self, pool: &str, device: &str, ended_unix_ms: i64) -> &mut Counted {
        self.buckets
            .entry(Bucket::of(pool, device, ended_unix_ms))
            .or_default()
            .entry(device.to_string())
            .or_default()
    }

    /// Checks every waiting record against the book: bounded ones go to their objects,
    /// refused ones are counted and dropped, and unknown ones wait while not `warm`.
    fn check(
        &mut self,
        book: &Mutex<AttemptBook>,
        registry: &Registry,
        metrics: &Metrics,
        warm: bool,
    ) {
        let now_ms = crate::domain::unix_ms();
        for (device, (pool, records)) in std::mem::take(&mut self.reported) {
            let offer = registry
                .offer(&device)
                .map_or(0, |o| u64::from(o.millicores));
            let mut waiting = BTreeMap::new();
            // One lock per device's batch, not per record.
            let mut book = attempts::lock(book);
            for (sequence, record) in records {
                match book.vet(&device, &record, now_ms, offer, warm) {
                    Verdict::Count {
                        record,
                        clipped,
                        standing,
                    } => {
                        if clipped {
                            tracing::info!(%device, task = %record.task_id, "a usage report past wall time × granted was bounded");
                            metrics.usage_records("clipped", 1);
                        }
                        self.counted(&pool, &device, record.ended_unix_ms)
                            .reported
                            .insert(sequence, Charge { record, standing });
                    }
                    Verdict::Refuse(refused) => {
                        tracing::info!(%device, task = %record.task_id, why = refused.as_str(), "a usage report was refused");
                        metrics.usage_records(refused.as_str(), 1);
                    }
                    Verdict::Wait => {
                        waiting.insert(sequence, record);
                    }
                }
            }
            if !waiting.is_empty() {
                self.reported.insert(device, (pool, waiting));
            }
        }
    }

    /// Devices none of whose records wait to be checked or stored any more.
    fn stored_devices(&mut self) -> Vec<(String, u64, AgentSender)> {
        let waiting: std::collections::HashSet<&String> = self
            .buckets
            .values()
            .flat_map(|d| d.keys())
            .chain(self.reported.keys())
            .collect();
        let done: Vec<String> = self
            .received
            .keys()
            .filter(|d| !waiting.contains(d))
            .cloned()
            .collect();
        done.into_iter()
            .filter_map(|d| {
                let (through, ack) = self.received.remove(&d)?;
                Some((d, through, ack))
            })
            .collect()
    }
}

pub struct Recorder {
    api: Api<PoolUsage>,
    metrics: Arc<Metrics>,
    flush_every: Duration,
    book: Arc<Mutex<AttemptBook>>,
    registry: Arc<Registry>,
    /// Until it is over, the operator is still learning the attempts that exist.
    warmup: Arc<Warmup>,
    /// The objects written in the last flush, so the next write of one needs no read.
    written: HashMap<Bucket, PoolUsage>,
    /// The pools, for their prices.
    pools: Store<DevicePool>,
}

impl Recorder {
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        flush_every: Duration,
        (book, registry, warmup): (Arc<Mutex<AttemptBook>>, Arc<Registry>, Arc<Warmup>),
        pools: Store<DevicePool>,
    ) -> (Recorder, mpsc::Sender<Charged>, Rulings, Inbox) {
        let (reported, reported_inbox) = mpsc::channel(INBOX);
        let (rulings, rulings_inbox) = mpsc::unbounded_channel();
        let recorder = Recorder {
            api: Api::all(client),
            metrics,
            flush_every,
            book,
            registry,
            warmup,
            written: HashMap::new(),
            pools,
        };
        let inbox = Inbox {
            reported: reported_inbox,
            rulings: rulings_inbox,
        };
        (recorder, reported, rulings, inbox)
    }

    pub async fn run(mut self, mut inbox: Inbox) {
        let mut pending = Pending::default();
        let mut flush_at = Instant::now() + self.flush_every;
        loop {
            tokio::select! {
                charged = inbox.reported.recv() => match charged {
                    Some(charged) => {
                        if !pending.add(charged) {
                            self.metrics.usage_records("deferred", 1);
                        }
                    }
                    None => break,
                },
                Some(ruling) = inbox.rulings.recv() => {
                    if matches!(ruling, Ruling::Lost(_)) {
                        flush_at = flush_at.min(Instant::now() + LOST_WRITTEN_WITHIN);
                    }
                    pending.add(Charged::Ruled(ruling));
                }
                _ = tokio::time::sleep_until(flush_at) => {
                    self.flush(&mut pending).await;
                    flush_at = Instant::now() + self.flush_every;
                }
            }
        }
        while let Ok(ruling) = inbox.rulings.try_recv() {
            pending.add(Charged::Ruled(ruling));
        }
        self.flush(&mut pending).await;
    }

    /// Writes every object with new records, then acknowledges the devices that are stored.
    async fn flush(&mut self, pending: &mut Pending) {
        let warm = self.warmup.is_over();
        pending.check(&self.book, &self.registry, &self.metrics, warm);
        let buckets = std::mem::take(&mut pending.buckets);
        let mut written = HashMap::new();
        for (bucket, devices) in buckets {
            match self.write(&bucket, &devices).await {
                Ok(object) => {
                    self.tell_credit(&object, devices.keys());
                    written.insert(bucket, object);
                }
                Err(error) => {
                    tracing::warn!(object = %bucket.name(), %error, "could not store usage; retrying at the next flush (agents keep their records until then)");
                    pending.buckets.insert(bucket, devices);
                }
            }
        }
        self.written = written;
        for (device, through, ack) in pending.stored_devices() {
            let message = OperatorMessage {
                version: PROTOCOL_VERSION as i32,
                body: Some(operator_message::Body::UsageAck(UsageAck {
                    through_sequence: through,
                })),
            };
            // A closed stream loses only the acknowledgement: the agent sends the records
            // again on its next stream, and they count once.
            if ack.try_send(Box::new(message)).is_err() {
                tracing::debug!(%device, "usage acknowledged, but the agent's stream is gone");
            }
        }
    }

    /// Tells each of `devices` what the stored `object` credits it with that day.
    fn tell_credit<'a>(&self, object: &PoolUsage, devices: impl Iterator<Item = &'a String>) {
        let spec = &object.spec;
        let prices = self
            .pools
            .get(&ObjectRef::new(&spec.pool))
            .and_then(|pool| prices_of(&pool).ok())
            .unwrap_or_default();
        for device in devices {
            let usage = spec.devices.get(device).filter(|u| !u.credit.is_empty());
            let (Some(usage), Some(sender)) = (usage, self.registry.sender(device)) else {
                continue;
            };
            let message = OperatorMessage {
                version: PROTOCOL_VERSION as i32,
                body: Some(operator_message::Body::CreditStanding(credit::standing(
                    &spec.day, usage, &prices,
                ))),
            };
            // Only news for its owner: a full queue drops it, and the next write says it again.
            let _ = sender.try_send(Box::new(message));
        }
    }

    /// Adds the records to one object (creating it), retrying when another writer won.
    async fn write(
        &mut self,
        bucket: &Bucket,
        devices: &BTreeMap<String, Counted>,
    ) -> Result<PoolUsage, kube::Error> {
        let name = bucket.name();
        let mut known = self.written.remove(bucket);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let current = match known.take() {
                Some(object) => Some(object),
                None => self.api.get_opt(&name).await?,
            };
            let creating = current.is_none();
            let mut object = current.unwrap_or_else(|| PoolUsage {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    labels: Some(
                        [
                            (POOL_LABEL.to_string(), bucket.pool.clone()),
                            (DAY_LABEL.to_string(), bucket.day.clone()),
                        ]
                        .into(),
                    ),
                    ..Default::default()
                },
                spec: bucket.empty_spec(),
            });
            let (mut added, mut lost, mut duplicates) = (0, 0, 0);
            let now_ms = crate::domain::unix_ms();
            for (device, counted) in devices {
                let charges: Vec<Charge> = counted.reported.values().cloned().collect();
                let applied = apply(&mut object.spec, device, &charges);
                let lost_here = (counted.lost.iter())
                    .filter(|record| charge_lost(&mut object.spec, device, record, now_ms))
                    .count();
                let judged = (counted.judged.iter())
                    .filter(|(task, standing)| {
                        credit::judge(&mut object.spec, device, task, *standing)
                    })
                    .count();
                if let Some(usage) = object.spec.devices.get_mut(device) {
                    usage.owner = self.registry.owner(device).or(usage.owner.take());
                }
                added += applied + lost_here + judged;
                lost += lost_here;
                duplicates += charges.len() - applied + counted.lost.len() - lost_here;
            }
            if added == 0 {
                self.metrics.usage_records("duplicate", duplicates);
                return Ok(object);
            }
            let result = if creating {
                self.metrics.api_write("PoolUsage", "create");
                self.api.create(&PostParams::default(), &object).await
            } else {
                self.metrics.api_write("PoolUsage", "replace");
                self.api
                    .replace(&name, &PostParams::default(), &object)
                    .await
            };
            match result {
                Ok(stored) => {
                    self.metrics.usage_records("counted", added);
                    self.metrics.usage_records("operator_charged", lost);
                    self.metrics.usage_records("duplicate", duplicates);
                    return Ok(stored);
                }
                // Another writer (a replica that has not yet noticed it lost the lease) won:
                // read again and re-apply; the sequences keep it exact.
                Err(kube::Error::Api(status))
                    if status.code == 409 && attempt < CONFLICT_RETRIES => {}
                Err(error) => return Err(error),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_attempts_charge_is_kept_only_with_a_pool_to_name_its_object() {
        let record = UsageRecord {
            task_id: "uid.1".into(),
            ended_unix_ms: 1_795_000_000_000,
            ..Default::default()
        };
        let lost = |pool: &str| {
            Charged::Ruled(Ruling::Lost(LostCharge {
                device: "dev-a".into(),
                pool: pool.into(),
                record: record.clone(),
            }))
        };
        let mut pending = Pending::default();
        pending.add(lost(""));
        assert!(
            pending.buckets.is_empty(),
            "no object is named \".<day>.<shard>\""
        );
        pending.add(lost("lab"));
        let (bucket, devices) = pending.buckets.iter().next().unwrap();
        assert_eq!(bucket.pool, "lab");
        assert_eq!(devices["dev-a"].lost.len(), 1);
    }

    #[test]
    fn a_device_flooding_records_while_they_wait_is_not_taken_nor_acknowledged_past_its_bound() {
        let (ack, _answers) = mpsc::channel(1);
        let batch = |from: u64, count: u64| Charged::Reported {
            device: "liar".into(),
            pool: "lab".into(),
            records: (from..from + count)
                .map(|sequence| UsageRecord {
                    task_id: format!("nobody.{sequence}"),
                    sequence,
                    ..Default::default()
                })
                .collect(),
            ack: ack.clone(),
        };
        let mut pending = Pending::default();
        assert!(pending.add(batch(1, WAITING_PER_DEVICE as u64)));
        assert!(!pending.add(batch(WAITING_PER_DEVICE as u64 + 1, 1)));
        assert_eq!(pending.reported["liar"].1.len(), WAITING_PER_DEVICE);
        assert_eq!(
            pending.received["liar"].0, WAITING_PER_DEVICE as u64,
            "what was not taken is not acknowledged, so an honest device sends it again"
        );
    }
}
