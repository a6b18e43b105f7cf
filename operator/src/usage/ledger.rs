//! Pure accounting: which `PoolUsage` object a device's record belongs in, and how records
//! are added to one exactly once (each object keeps, per device, the highest sequence applied).

use darkcore_crds::pool_usage::SHARDS;
use darkcore_crds::{Amounts, PoolUsageSpec};
use darkcore_proto::agent::v1::UsageRecord;
use darkcore_statement::Standing;
use k8s_openapi::jiff::Timestamp;

use crate::usage::credit;

/// One `PoolUsage` object: a pool, a UTC day, a shard of its devices.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bucket {
    pub pool: String,
    pub day: String,
    pub shard: u32,
}

impl Bucket {
    /// Where `device`'s record that ended at `ended_unix_ms` is counted. Stable across
    /// restarts and versions, so a record sent again lands on the object that counted it.
    pub fn of(pool: &str, device: &str, ended_unix_ms: i64) -> Bucket {
        Bucket {
            pool: pool.to_string(),
            day: utc_day(ended_unix_ms),
            shard: shard_of(device),
        }
    }

    /// The object's name: `<pool>.<day>.<shard>`, e.g. `lab.2026-11-22.07`.
    pub fn name(&self) -> String {
        format!("{}.{}.{:02}", self.pool, self.day, self.shard)
    }

    pub fn empty_spec(&self) -> PoolUsageSpec {
        PoolUsageSpec {
            pool: self.pool.clone(),
            day: self.day.clone(),
            shard: self.shard,
            device_count: 0,
            total: Amounts::default(),
            devices: Default::default(),
        }
    }
}

/// The UTC day of a time, as YYYY-MM-DD.
pub fn utc_day(unix_ms: i64) -> String {
    Timestamp::from_millisecond(unix_ms)
        .unwrap_or(Timestamp::UNIX_EPOCH)
        .strftime("%Y-%m-%d")
        .to_string()
}

/// FNV-1a of the device id: a hash that never changes with the Rust version.
pub fn shard_of(device: &str) -> u32 {
    let hash = device.bytes().fold(0x811c_9dc5u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    });
    hash % SHARDS
}

/// A record's amounts.
pub fn amounts_of(record: &UsageRecord) -> Amounts {
    Amounts {
        tasks: u64::from(record.completed),
        interrupted: u64::from(!record.completed),
        cpu_milliseconds: record.cpu_milliseconds,
        memory_mib_seconds: record.memory_mib_seconds,
    }
}

/// A device's record as the operator counts it: bounded by its record of the attempt, and
/// toward credit as `standing` (none: it earns nothing).
#[derive(Clone, Debug, PartialEq)]
pub struct Charge {
    pub record: UsageRecord,
    pub standing: Option<Standing>,
}

impl From<UsageRecord> for Charge {
    /// A record that earns nothing (its pod asked for no check).
    fn from(record: UsageRecord) -> Charge {
        Charge {
            record,
            standing: None,
        }
    }
}

/// Adds `device`'s records to `spec`, skipping any it has applied already; returns how many
/// were added. Records must be in sequence order (the agent sends them so).
pub fn apply(spec: &mut PoolUsageSpec, device: &str, charges: &[Charge]) -> usize {
    let mut added = 0;
    for Charge { record, standing } in charges {
        let applied = spec.devices.get(device).map_or(0, |d| d.applied_sequence);
        if record.sequence <= applied {
            continue;
        }
        charge(spec, device, record);
        if let Some(standing) = *standing {
            let amounts = amounts_of(record);
            credit::file(spec, device, &record.task_id, &amounts, standing);
        }
        if let Some(entry) = spec.devices.get_mut(device) {
            entry.applied_sequence = record.sequence;
        }
        added += 1;
    }
    added
}

/// How long an object remembers the lost attempts it counted: longer than a restarted
/// operator goes back to charge a loss again.
pub const LOST_REMEMBERED_MS: i64 = 2 * 60 * 60 * 1000;
/// A restarted operator charges again the losses its pods' statuses show that ended within
/// this (the first charge may not have been written).
pub const LOST_CHARGED_AGAIN_MS: i64 = 60 * 60 * 1000;
// A loss charged again is always one its object still remembers.
const _: () = assert!(LOST_CHARGED_AGAIN_MS < LOST_REMEMBERED_MS);
/// Lost attempts one device's entry remembers at most; the oldest go first.
pub const LOST_REMEMBERED_CAP: usize = 1_000;

/// Adds the operator's charge for an attempt lost with `device`, unless this object counted
/// that attempt's loss already; true when it was added.
pub fn charge_lost(
    spec: &mut PoolUsageSpec,
    device: &str,
    record: &UsageRecord,
    now_ms: i64,
) -> bool {
    let remembered = &mut spec
        .devices
        .entry(device.to_string())
        .or_default()
        .lost_attempts;
    if remembered.contains_key(&record.task_id) {
        return false;
    }
    remembered.insert(record.task_id.clone(), record.ended_unix_ms);
    remembered.retain(|_, ended| *ended >= now_ms.saturating_sub(LOST_REMEMBERED_MS));
    while remembered.len() > LOST_REMEMBERED_CAP {
        let oldest = remembered
            .iter()
            .min_by_key(|(_, ended)| **ended)
            .map(|(task, _)| task.clone());
        oldest.map(|task| remembered.remove(&task));
    }
    charge(spec, device, record);
    true
}

/// Adds one record to `spec` under `device`, whatever its sequence.
pub fn charge(spec: &mut PoolUsageSpec, device: &str, record: &UsageRecord) {
    let amounts = amounts_of(record);
    let namespace = if record.namespace.is_empty() {
        "(none)"
    } else {
        &record.namespace
    };
    spec.devices
        .entry(device.to_string())
        .or_default()
        .namespaces
        .entry(namespace.to_string())
        .or_default()
        .add(&amounts);
    spec.total.add(&amounts);
    spec.device_count = spec.devices.len() as u32;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(sequence: u64, namespace: &str, cpu: u64, completed: bool) -> UsageRecord {
        UsageRecord {
            sequence,
            namespace: namespace.into(),
            cpu_milliseconds: cpu,
            memory_mib_seconds: 10,
            completed,
            ended_unix_ms: 1_795_000_000_000,
            ..Default::default()
        }
    }

    #[test]
    fn a_record_sent_again_is_counted_once() {
        let bucket = Bucket::of("lab", "dev-1", 1_795_000_000_000);
        let mut spec = bucket.empty_spec();
        let first = [record(1, "a", 100, true), record(2, "b", 50, false)].map(Charge::from);
        assert_eq!(apply(&mut spec, "dev-1", &first), 2);
        // The operator restarted before acknowledging: everything comes again, plus one more.
        let again = [
            record(1, "a", 100, true),
            record(2, "b", 50, false),
            record(3, "a", 25, true),
        ]
        .map(Charge::from);
        assert_eq!(apply(&mut spec, "dev-1", &again), 1);
        assert_eq!(
            spec.total,
            Amounts {
                tasks: 2,
                interrupted: 1,
                cpu_milliseconds: 175,
                memory_mib_seconds: 30
            }
        );
        let device = &spec.devices["dev-1"];
        assert_eq!(device.applied_sequence, 3);
        assert_eq!(device.namespaces["a"].cpu_milliseconds, 125);
        assert_eq!(device.namespaces["b"].interrupted, 1);
        assert_eq!(spec.device_count, 1);
    }

    #[test]
    fn a_lost_attempt_charged_again_after_a_restart_counts_once() {
        const NOW: i64 = 1_795_000_000_000;
        let mut spec = Bucket::of("lab", "dev-1", NOW).empty_spec();
        let lost = |task: &str, ended: i64| UsageRecord {
            task_id: task.into(),
            ended_unix_ms: ended,
            ..record(0, "a", 100, false)
        };
        assert!(charge_lost(&mut spec, "dev-1", &lost("uid.1", NOW), NOW));
        assert!(!charge_lost(
            &mut spec,
            "dev-1",
            &lost("uid.1", NOW),
            NOW + 5_000
        ));
        assert!(charge_lost(&mut spec, "dev-1", &lost("uid.2", NOW), NOW));
        assert_eq!(
            (spec.total.interrupted, spec.total.cpu_milliseconds),
            (2, 200)
        );
        // Remembered for two hours; a device's own records keep their sequence apart.
        let later = NOW + LOST_REMEMBERED_MS + 1;
        assert!(charge_lost(
            &mut spec,
            "dev-1",
            &lost("uid.3", later),
            later
        ));
        let remembered = &spec.devices["dev-1"].lost_attempts;
        assert_eq!(remembered.keys().collect::<Vec<_>>(), ["uid.3"]);
        assert_eq!(spec.devices["dev-1"].applied_sequence, 0);
        // At most so many, the oldest first out.
        for n in 0..LOST_REMEMBERED_CAP as i64 {
            charge_lost(
                &mut spec,
                "dev-1",
                &lost(&format!("x.{n}"), later + n),
                later,
            );
        }
        let remembered = &spec.devices["dev-1"].lost_attempts;
        assert_eq!(remembered.len(), LOST_REMEMBERED_CAP);
        assert!(!remembered.contains_key("uid.3"));
    }

    #[test]
    fn a_checked_record_is_filed_toward_credit_once_and_an_unchecked_one_is_not() {
        let mut spec = Bucket::of("lab", "dev-1", 0).empty_spec();
        let checked = |sequence, standing| Charge {
            record: UsageRecord {
                task_id: format!("u.{sequence}"),
                ..record(sequence, "a", 100, true)
            },
            standing: Some(standing),
        };
        let charges = [
            checked(1, Standing::Pending),
            checked(2, Standing::Validated),
            record(3, "a", 7, true).into(),
        ];
        assert_eq!(apply(&mut spec, "dev-1", &charges), 3);
        assert_eq!(apply(&mut spec, "dev-1", &charges), 0, "sent again");
        let device = &spec.devices["dev-1"];
        assert_eq!(device.credit.validated.cpu_milliseconds, 100);
        assert_eq!(device.credit.pending["u.1"].cpu_milliseconds, 100);
        assert_eq!(device.namespaces["a"].cpu_milliseconds, 207);
    }

    #[test]
    fn devices_count_apart_and_nothing_applied_leaves_no_entry() {
        let mut spec = Bucket::of("lab", "dev-1", 0).empty_spec();
        apply(&mut spec, "dev-1", &[record(7, "a", 1, true).into()]);
        apply(&mut spec, "dev-2", &[record(7, "a", 2, true).into()]);
        assert_eq!(spec.total.cpu_milliseconds, 3, "sequences are per device");
        apply(&mut spec, "dev-3", &[]);
        assert_eq!(spec.device_count, 2);
    }

    #[test]
    fn buckets_are_named_by_pool_utc_day_and_a_stable_shard() {
        // 2026-11-22T23:59:59.999Z and one millisecond later.
        let before_midnight = 1_795_391_999_999;
        let bucket = Bucket::of("lab", "dev-0123456789ab", before_midnight);
        assert_eq!(bucket.day, "2026-11-22");
        assert_eq!(
            Bucket::of("lab", "dev-0123456789ab", before_midnight + 1).day,
            "2026-11-23"
        );
        assert_eq!(shard_of("dev-0123456789ab"), shard_of("dev-0123456789ab"));
        assert!(shard_of("dev-0123456789ab") < SHARDS);
        // FNV-1a is fixed; a changed hash would move devices between objects.
        assert_eq!(shard_of(""), 0x811c_9dc5 % SHARDS);
        assert_eq!(bucket.name(), format!("lab.2026-11-22.{:02}", bucket.shard));
    }
}
