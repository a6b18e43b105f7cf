//! The operator's own record of each attempt: which device held it, from when to when, what
//! it was granted, and how its result was judged. A device's usage report is checked against
//! it: the report may lower the charge, never raise it past wall time × granted, only the
//! holder may send it, and whether it earns credit is the operator's judgement, not the device's.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use darkcore_proto::agent::v1::UsageRecord;
use darkcore_statement::Standing;

use crate::domain::Demand;

/// How long an ended attempt stays on record for its device's report to come in (an agent
/// resends what is unacknowledged whenever it reattaches).
pub const RETAIN_MS: i64 = 60 * 60 * 1000;
/// Ended attempts kept at most; the oldest go first.
pub const ENDED_CAP: usize = 100_000;
const MIB: u128 = 1 << 20;

/// What the operator gave one attempt, and when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub device: String,
    pub pool: String,
    pub namespace: String,
    /// The pod's requests, which the device reserved for it.
    pub millicores: u64,
    pub memory: u64,
    /// The CPU its limits allow at once; `None`: whatever its device offers.
    pub cpu_limit: Option<u64>,
    /// When the operator sent it (or, for one adopted after a restart, when its pod was made).
    pub from_ms: i64,
    /// When the operator saw it end (or its device last heard, for a lost one).
    pub until_ms: Option<i64>,
    /// How it ended, when the operator knows: it ran to its end, or it was interrupted.
    pub completed: Option<bool>,
    /// A charge for it was counted already (the device's, or the operator's for a lost one).
    pub charged: bool,
    /// Its pod asked for a quorum: its usage earns credit once its result is judged good.
    pub checked: bool,
    /// How its result was judged, once it was.
    pub judged: Option<Standing>,
    /// Its device's report was filed pending, in the object of the day it ended then.
    pub pending_since_ms: Option<i64>,
}

impl Held {
    /// An attempt sent (or found) now: held by `device` of `pool` for a pod of `namespace`
    /// with `demand`, since `from_ms`; nothing ended or charged yet.
    pub fn begun(device: &str, pool: &str, namespace: &str, demand: Demand, from_ms: i64) -> Held {
        Held {
            device: device.to_string(),
            pool: pool.to_string(),
            namespace: namespace.to_string(),
            millicores: demand.millicores,
            memory: demand.memory,
            cpu_limit: demand.cpu_limit,
            from_ms,
            until_ms: None,
            completed: None,
            charged: false,
            checked: false,
            judged: None,
            pending_since_ms: None,
        }
    }

    /// Where a report of it counts toward credit: nowhere for an unchecked or interrupted
    /// run, else as judged, or pending until it is.
    fn standing(&self, completed: bool) -> Option<Standing> {
        (self.checked && completed).then(|| self.judged.unwrap_or(Standing::Pending))
    }
}

/// A checked attempt's result was judged after its usage was filed pending: where to move it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Judgement {
    pub device: String,
    pub pool: String,
    pub task_id: String,
    /// When the filed report said it ended: the object it is in.
    pub ended_unix_ms: i64,
    pub standing: Standing,
}

/// Why a device's report is not counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// No attempt of that id is on record (never made, or long gone).
    NeverHeld,
    /// The attempt was another device's.
    NotHolder,
    /// It was counted already.
    AlreadyCharged,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::NeverHeld => "refused_never_held",
            Refused::NotHolder => "refused_not_holder",
            Refused::AlreadyCharged => "refused_already_charged",
        }
    }
}

/// What becomes of a device's report.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Count it as given (already within bounds), or as bounded (`clipped`); toward credit
    /// as `standing` (none: it earns nothing).
    Count {
        record: UsageRecord,
        clipped: bool,
        standing: Option<Standing>,
    },
    Refuse(Refused),
    /// Not on record yet, while the operator is still learning its attempts after a start.
    Wait,
}

/// A report bounded by the operator's record of its attempt, as of `now_ms`: namespace and
/// times are the operator's, CPU is at most wall time × what it could use (its limits, within
/// the device's offer), memory at most wall time × its request.
pub fn bound(record: &UsageRecord, held: &Held, now_ms: i64, offer_millicores: u64) -> UsageRecord {
    let until = held.until_ms.unwrap_or(now_ms).max(held.from_ms);
    let wall_ms = (until - held.from_ms) as u128;
    let cores = held
        .cpu_limit
        .map_or(offer_millicores, |limit| limit.min(offer_millicores));
    let cpu_cap = clamp_u64(wall_ms * u128::from(cores) / 1000);
    // The agent charges request × seconds held, rounded its own way: one MiB-second of slack.
    let memory_cap = clamp_u64((wall_ms * u128::from(held.memory)).div_ceil(MIB * 1000) + 1);
    UsageRecord {
        sequence: record.sequence,
        task_id: record.task_id.clone(),
        namespace: held.namespace.clone(),
        pod_name: record.pod_name.clone(),
        started_unix_ms: held.from_ms,
        ended_unix_ms: until,
        cpu_milliseconds: record.cpu_milliseconds.min(cpu_cap),
        memory_mib_seconds: record.memory_mib_seconds.min(memory_cap),
        completed: record.completed && held.completed != Some(false),
    }
}

/// The charge for an attempt lost with its device, which sends no report: its reservation
/// (requests × the time until its device was last heard), as interrupted.
pub fn lost_charge(task_id: &str, held: &Held) -> UsageRecord {
    let until = held.until_ms.unwrap_or(held.from_ms).max(held.from_ms);
    let wall_ms = (until - held.from_ms) as u128;
    UsageRecord {
        sequence: 0,
        task_id: task_id.to_string(),
        namespace: held.namespace.clone(),
        pod_name: String::new(),
        started_unix_ms: held.from_ms,
        ended_unix_ms: until,
        cpu_milliseconds: clamp_u64(wall_ms * u128::from(held.millicores) / 1000),
        memory_mib_seconds: clamp_u64(wall_ms * u128::from(held.memory) / (MIB * 1000)),
        completed: false,
    }
}

fn clamp_u64(value: u128) -> u64 {
    u64::try_from(value).unwrap_or(u64::MAX)
}

/// The shared book, locked (a panic while it was held leaves it usable: each step keeps it whole).
pub fn lock(book: &Mutex<AttemptBook>) -> MutexGuard<'_, AttemptBook> {
    book.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every attempt on record, by task id.
#[derive(Debug, Default)]
pub struct AttemptBook {
    held: HashMap<String, Held>,
    /// Ended attempts in the order they ended, to forget them after `RETAIN_MS`.
    ended: VecDeque<(i64, String)>,
}

impl AttemptBook {
    /// Records an attempt the operator sent or adopted; one on record already stays as it is.
    pub fn began(&mut self, task_id: &str, held: Held) {
        self.held.entry(task_id.to_string()).or_insert(held);
    }

    /// The attempt ended at `at_ms` (the first end recorded stands).
    pub fn ended(&mut self, task_id: &str, at_ms: i64, completed: bool) {
        let Some(held) = self.held.get_mut(task_id) else {
            return;
        };
        if held.until_ms.is_some() {
            return;
        }
        held.until_ms = Some(at_ms.max(held.from_ms));
        held.completed = Some(completed);
        self.ended.push_back((at_ms, task_id.to_string()));
        self.prune(at_ms);
    }

    /// The attempt was lost with its device, last heard at `heard_ms`: the charge for it,
    /// unless its device's report was counted already (then this is only its end).
    pub fn lost(&mut self, task_id: &str, heard_ms: i64) -> Option<(Held, UsageRecord)> {
        self.ended(task_id, heard_ms, false);
        let held = self.held.get_mut(task_id)?;
        if held.charged {
            return None;
        }
        held.charged = true;
        Some((held.clone(), lost_charge(task_id, held)))
    }

    /// What to do with `device`'s report, as of `now_ms`; `warm`: the operator has had its
    /// time to learn the attempts that exist.
    pub fn vet(
        &mut self,
        device: &str,
        record: &UsageRecord,
        now_ms: i64,
        offer_millicores: u64,
        warm: bool,
    ) -> Verdict {
        let Some(held) = self.held.get_mut(&record.task_id) else {
            return match warm {
                true => Verdict::Refuse(Refused::NeverHeld),
                false => Verdict::Wait,
            };
        };
        if held.device != device {
            return Verdict::Refuse(Refused::NotHolder);
        }
        if held.charged {
            return Verdict::Refuse(Refused::AlreadyCharged);
        }
        held.charged = true;
        let bounded = bound(record, held, now_ms, offer_millicores);
        let clipped = bounded.cpu_milliseconds < record.cpu_milliseconds
            || bounded.memory_mib_seconds < record.memory_mib_seconds;
        let standing = held.standing(bounded.completed);
        if standing == Some(Standing::Pending) {
            held.pending_since_ms = Some(bounded.ended_unix_ms);
        }
        Verdict::Count {
            record: bounded,
            clipped,
            standing,
        }
    }

    /// The attempt's result was judged: a report still to come counts as `standing`, and one
    /// filed pending is to move (the returned judgement). Nothing for an attempt not on record.
    pub fn judge(&mut self, task_id: &str, standing: Standing) -> Option<Judgement> {
        let held = self.held.get_mut(task_id)?;
        held.judged = Some(standing);
        Some(Judgement {
            device: held.device.clone(),
            pool: held.pool.clone(),
            task_id: task_id.to_string(),
            ended_unix_ms: held.pending_since_ms.take()?,
            standing,
        })
    }

    /// Forgets ended attempts past `RETAIN_MS`, and the oldest beyond `ENDED_CAP`.
    fn prune(&mut self, now_ms: i64) {
        while let Some((at, task)) = self.ended.front() {
            if *at > now_ms - RETAIN_MS && self.ended.len() <= ENDED_CAP {
                break;
            }
            self.held.remove(task);
            self.ended.pop_front();
        }
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_795_000_000_000;

    fn held(device: &str) -> Held {
        let demand = Demand {
            millicores: 500,
            memory: 256 << 20,
            cpu_limit: Some(1000),
        };
        Held::begun(device, "lab", "team", demand, T0)
    }

    fn report(task: &str, cpu_ms: u64, memory_mib_s: u64) -> UsageRecord {
        UsageRecord {
            sequence: 1,
            task_id: task.into(),
            namespace: "someone-elses".into(),
            started_unix_ms: 0,
            ended_unix_ms: T0 + 365 * 86_400_000,
            cpu_milliseconds: cpu_ms,
            memory_mib_seconds: memory_mib_s,
            completed: true,
            ..Default::default()
        }
    }

    fn standing_of(verdict: Verdict) -> Option<Standing> {
        match verdict {
            Verdict::Count { standing, .. } => standing,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_checked_attempts_report_earns_as_the_operator_judged_never_as_the_device_says() {
        let mut book = AttemptBook::default();
        let checked = |device| Held {
            checked: true,
            ..held(device)
        };
        // Judged before its report came: it counts as judged, and nothing is to move.
        book.began("u.1", checked("dev-a"));
        book.ended("u.1", T0 + 10_000, true);
        assert_eq!(book.judge("u.1", Standing::Rejected), None);
        let verdict = book.vet("dev-a", &report("u.1", 100, 0), T0 + 20_000, 1000, true);
        assert_eq!(standing_of(verdict), Some(Standing::Rejected));
        // Reported first: pending, and the judgement says where it was filed.
        book.began("u.2", checked("dev-a"));
        book.ended("u.2", T0 + 10_000, true);
        let verdict = book.vet("dev-a", &report("u.2", 100, 0), T0 + 20_000, 1000, true);
        assert_eq!(standing_of(verdict), Some(Standing::Pending));
        let judged = book.judge("u.2", Standing::Validated).unwrap();
        assert_eq!(
            (
                judged.device.as_str(),
                judged.ended_unix_ms,
                judged.standing
            ),
            ("dev-a", T0 + 10_000, Standing::Validated)
        );
        assert_eq!(book.judge("u.2", Standing::Validated), None, "moved once");
        // An interrupted run, or an unchecked pod's, earns nothing whatever it claims.
        book.began("u.3", checked("dev-a"));
        book.ended("u.3", T0 + 10_000, false);
        let verdict = book.vet("dev-a", &report("u.3", 100, 0), T0 + 20_000, 1000, true);
        assert_eq!(standing_of(verdict), None);
        book.began("u.4", held("dev-a"));
        let verdict = book.vet("dev-a", &report("u.4", 100, 0), T0 + 20_000, 1000, true);
        assert_eq!(standing_of(verdict), None);
        assert_eq!(book.judge("nobody.1", Standing::Validated), None);
    }

    #[test]
    fn an_honest_report_counts_as_sent_with_the_operators_namespace_and_times() {
        let mut book = AttemptBook::default();
        book.began("u.1", held("dev-a"));
        book.ended("u.1", T0 + 10_000, true);
        // 10 s at one core at most; 256 MiB reserved for 10 s.
        let verdict = book.vet(
            "dev-a",
            &report("u.1", 9_000, 2_560),
            T0 + 20_000,
            4000,
            true,
        );
        let Verdict::Count {
            record, clipped, ..
        } = verdict
        else {
            panic!("{verdict:?}")
        };
        assert!(!clipped);
        assert_eq!(
            (record.cpu_milliseconds, record.memory_mib_seconds),
            (9_000, 2_560)
        );
        assert_eq!(record.namespace, "team", "the namespace is the operator's");
        assert_eq!(record.ended_unix_ms, T0 + 10_000, "so is the day");
        assert!(record.completed);
    }

    #[test]
    fn an_inflated_report_is_bounded_by_wall_time_and_what_was_granted() {
        let mut book = AttemptBook::default();
        book.began("u.1", held("dev-a"));
        book.ended("u.1", T0 + 10_000, true);
        let verdict = book.vet(
            "dev-a",
            &report("u.1", u64::MAX, u64::MAX),
            T0 + 99_000,
            4000,
            true,
        );
        let Verdict::Count {
            record, clipped, ..
        } = verdict
        else {
            panic!("{verdict:?}")
        };
        assert!(clipped);
        assert_eq!(record.cpu_milliseconds, 10_000, "10 s × its 1-core limit");
        assert_eq!(
            record.memory_mib_seconds, 2_561,
            "10 s × 256 MiB, plus rounding"
        );
        // Without a limit, the device's offer is the ceiling.
        let mut unlimited = held("dev-a");
        unlimited.cpu_limit = None;
        unlimited.until_ms = Some(T0 + 10_000);
        assert_eq!(
            bound(&report("u.2", u64::MAX, 0), &unlimited, T0, 2000).cpu_milliseconds,
            20_000
        );
        // Still running: bounded by now.
        let mut running = held("dev-a");
        running.until_ms = None;
        assert_eq!(
            bound(&report("u.3", u64::MAX, 0), &running, T0 + 1_000, 4000).cpu_milliseconds,
            1_000
        );
        // A clock before the start charges nothing rather than wrapping.
        assert_eq!(
            bound(
                &report("u.4", u64::MAX, u64::MAX),
                &running,
                T0 - 5_000,
                4000
            )
            .cpu_milliseconds,
            0
        );
    }

    #[test]
    fn reports_for_tasks_a_device_never_held_or_already_charged_are_refused() {
        let mut book = AttemptBook::default();
        book.began("u.1", held("dev-a"));
        assert_eq!(
            book.vet("dev-b", &report("u.1", 1, 1), T0, 1000, true),
            Verdict::Refuse(Refused::NotHolder)
        );
        assert_eq!(
            book.vet("dev-a", &report("u.9", 1, 1), T0, 1000, true),
            Verdict::Refuse(Refused::NeverHeld)
        );
        assert_eq!(
            book.vet("dev-a", &report("u.9", 1, 1), T0, 1000, false),
            Verdict::Wait,
            "not warm yet"
        );
        assert!(matches!(
            book.vet("dev-a", &report("u.1", 1, 1), T0, 1000, true),
            Verdict::Count { .. }
        ));
        assert_eq!(
            book.vet("dev-a", &report("u.1", 1, 1), T0, 1000, true),
            Verdict::Refuse(Refused::AlreadyCharged),
            "a second report of one attempt (say, under another sequence)"
        );
    }

    #[test]
    fn a_lost_attempt_is_charged_its_reservation_until_its_device_was_last_heard_once() {
        let mut book = AttemptBook::default();
        book.began("u.1", held("dev-a"));
        let (held, charge) = book.lost("u.1", T0 + 60_000).expect("a charge");
        assert_eq!(held.pool, "lab");
        assert_eq!(charge.cpu_milliseconds, 30_000, "60 s × 500m");
        assert_eq!(charge.memory_mib_seconds, 60 * 256);
        assert!(!charge.completed);
        assert_eq!(charge.ended_unix_ms, T0 + 60_000);
        // The device comes back and reports it: counted once already.
        assert_eq!(
            book.vet("dev-a", &report("u.1", 1, 1), T0, 1000, true),
            Verdict::Refuse(Refused::AlreadyCharged)
        );
        // A device whose report was counted first: the loss charges nothing more.
        book.began("u.2", self::held("dev-a"));
        assert!(matches!(
            book.vet("dev-a", &report("u.2", 1, 1), T0, 1000, true),
            Verdict::Count { .. }
        ));
        assert!(book.lost("u.2", T0 + 1).is_none());
    }

    #[test]
    fn ended_attempts_are_forgotten_after_the_retention() {
        let mut book = AttemptBook::default();
        book.began("u.1", held("dev-a"));
        book.began("u.2", held("dev-a"));
        book.ended("u.1", T0, true);
        assert_eq!(book.len(), 2);
        book.ended("u.2", T0 + RETAIN_MS + 1, true);
        assert_eq!(book.len(), 1, "u.1 is past the retention");
        assert_eq!(
            book.vet("dev-a", &report("u.1", 1, 1), T0, 1000, true),
            Verdict::Refuse(Refused::NeverHeld)
        );
    }
}
