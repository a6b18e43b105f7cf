//! Credit in one PoolUsage object: a checked attempt's usage is filed under how its result was
//! judged, pending until then; only validated and unverified results earn (`Standing::earns`).

use darkcore_crds::pool_usage::{Credit, DeviceUsage};
use darkcore_crds::{Amounts, PoolUsageSpec};
use darkcore_proto::agent::v1::{CreditAmounts, CreditStanding};
use darkcore_statement::{Prices, Standing, credit_micros};

/// Pending attempts one device's entry keeps at most; past it, the first by task id are filed
/// rejected (a device whose results never get judged earns nothing for them).
pub const PENDING_CAP: usize = 10_000;

/// Files a checked attempt's `amounts` on `device` under `standing`; a pending one is kept by
/// its task id until it is judged.
pub fn file(
    spec: &mut PoolUsageSpec,
    device: &str,
    task_id: &str,
    amounts: &Amounts,
    standing: Standing,
) {
    let credit = &mut entry(spec, device).credit;
    match standing {
        Standing::Pending => {
            credit
                .pending
                .entry(task_id.to_string())
                .or_default()
                .add(amounts);
            while credit.pending.len() > PENDING_CAP {
                let Some((_, oldest)) = credit.pending.pop_first() else {
                    break;
                };
                credit.rejected.add(&oldest);
            }
        }
        judged => {
            if let Some(bucket) = bucket(credit, judged) {
                bucket.add(amounts);
            }
        }
    }
}

/// The pending attempt `task_id` of `device` was judged: its usage moves to `standing`.
/// False when it is not pending here (judged already, or never filed in this object).
pub fn judge(spec: &mut PoolUsageSpec, device: &str, task_id: &str, standing: Standing) -> bool {
    let Some(usage) = spec.devices.get_mut(device) else {
        return false;
    };
    let credit = &mut usage.credit;
    let Some(amounts) = credit.pending.remove(task_id) else {
        return false;
    };
    match bucket(credit, standing) {
        Some(bucket) => bucket.add(&amounts),
        None => {
            credit.pending.insert(task_id.to_string(), amounts);
            return false;
        }
    }
    true
}

/// A device's usage by standing in one object: what it filed under each, and the rest of its
/// usage (unchecked or interrupted attempts) as uncredited.
pub fn by_standing(usage: &DeviceUsage) -> Vec<(Standing, Amounts)> {
    let credit = &usage.credit;
    let mut pending = Amounts::default();
    for amounts in credit.pending.values() {
        pending.add(amounts);
    }
    let mut total = Amounts::default();
    for amounts in usage.namespaces.values() {
        total.add(amounts);
    }
    let mut filed = Amounts::default();
    let standings = [
        (Standing::Validated, credit.validated),
        (Standing::Unverified, credit.unverified),
        (Standing::Rejected, credit.rejected),
        (Standing::Pending, pending),
    ];
    for (_, amounts) in &standings {
        filed.add(amounts);
    }
    let mut rows: Vec<(Standing, Amounts)> = standings.into_iter().collect();
    rows.push((Standing::Uncredited, total.minus(&filed)));
    rows.retain(|(_, amounts)| *amounts != Amounts::default());
    rows
}

/// What a device is told of its credit on `day`: its usage by standing, and what the earning
/// part is worth at `prices`.
pub fn standing(day: &str, usage: &DeviceUsage, prices: &Prices) -> CreditStanding {
    let mut message = CreditStanding {
        day: day.to_string(),
        currency: prices.currency.clone(),
        ..Default::default()
    };
    for (standing, amounts) in by_standing(usage) {
        let wire = Some(CreditAmounts {
            attempts: amounts.tasks,
            cpu_milliseconds: amounts.cpu_milliseconds,
            memory_mib_seconds: amounts.memory_mib_seconds,
        });
        if standing.earns() {
            let worth = credit_micros(amounts.cpu_milliseconds, amounts.memory_mib_seconds, prices);
            message.credit_micros = message.credit_micros.saturating_add(worth);
        }
        match standing {
            Standing::Validated => message.validated = wire,
            Standing::Unverified => message.unverified = wire,
            Standing::Rejected => message.rejected = wire,
            Standing::Pending => message.pending = wire,
            Standing::Uncredited => {}
        }
    }
    message
}

fn entry<'a>(spec: &'a mut PoolUsageSpec, device: &str) -> &'a mut DeviceUsage {
    if !spec.devices.contains_key(device) {
        spec.devices
            .insert(device.to_string(), DeviceUsage::default());
        spec.device_count = spec.devices.len() as u32;
    }
    spec.devices.entry(device.to_string()).or_default()
}

fn bucket(credit: &mut Credit, standing: Standing) -> Option<&mut Amounts> {
    match standing {
        Standing::Validated => Some(&mut credit.validated),
        Standing::Unverified => Some(&mut credit.unverified),
        Standing::Rejected => Some(&mut credit.rejected),
        Standing::Pending | Standing::Uncredited => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::ledger::Bucket;

    fn amounts(cpu: u64) -> Amounts {
        Amounts {
            tasks: 1,
            cpu_milliseconds: cpu,
            ..Default::default()
        }
    }

    #[test]
    fn pending_usage_moves_once_to_how_it_was_judged() {
        let mut spec = Bucket::of("lab", "dev-a", 0).empty_spec();
        file(&mut spec, "dev-a", "u.1", &amounts(100), Standing::Pending);
        file(&mut spec, "dev-a", "u.2", &amounts(40), Standing::Validated);
        assert_eq!(spec.device_count, 1);
        assert!(judge(&mut spec, "dev-a", "u.1", Standing::Rejected));
        assert!(
            !judge(&mut spec, "dev-a", "u.1", Standing::Validated),
            "moved once"
        );
        assert!(!judge(&mut spec, "dev-b", "u.1", Standing::Validated));
        let credit = &spec.devices["dev-a"].credit;
        assert_eq!(credit.rejected.cpu_milliseconds, 100);
        assert_eq!(credit.validated.cpu_milliseconds, 40);
        assert!(credit.pending.is_empty());
        // Judged pending again, or not at all: it stays where it is.
        file(&mut spec, "dev-a", "u.3", &amounts(5), Standing::Pending);
        assert!(!judge(&mut spec, "dev-a", "u.3", Standing::Pending));
        assert_eq!(
            spec.devices["dev-a"].credit.pending["u.3"].cpu_milliseconds,
            5
        );
    }

    #[test]
    fn a_devices_usage_reads_by_standing_with_the_unchecked_rest_uncredited() {
        let mut usage = DeviceUsage::default();
        usage.namespaces.insert("team".into(), amounts(1000));
        usage.credit.validated = amounts(300);
        usage.credit.pending.insert("u.9".into(), amounts(200));
        let rows = by_standing(&usage);
        assert_eq!(
            rows.iter()
                .map(|(s, a)| (*s, a.cpu_milliseconds))
                .collect::<Vec<_>>(),
            [
                (Standing::Validated, 300),
                (Standing::Pending, 200),
                (Standing::Uncredited, 500)
            ]
        );
    }

    #[test]
    fn a_device_whose_results_are_never_judged_keeps_at_most_so_many_pending() {
        let mut spec = Bucket::of("lab", "dev-a", 0).empty_spec();
        for n in 0..=PENDING_CAP {
            file(
                &mut spec,
                "dev-a",
                &format!("u.{n:06}"),
                &amounts(1),
                Standing::Pending,
            );
        }
        let credit = &spec.devices["dev-a"].credit;
        assert_eq!(credit.pending.len(), PENDING_CAP);
        assert_eq!(credit.rejected.cpu_milliseconds, 1, "the first named went");
        assert!(!credit.pending.contains_key("u.000000"));
    }
}
