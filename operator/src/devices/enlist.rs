//! Which eligible devices a pool enlists under `spec.replicas`: devices already enlisted stay
//! (no churn), the rest are filled by those whose owners offer the most. Devices that fall
//! out are released, and the caller drains them before letting go.

use std::cmp::Ordering;
use std::collections::BTreeSet;

use crate::devices::Device;

/// The outcome for one pool.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnlistPlan {
    /// Device ids the pool holds after this step, best first.
    pub enlisted: Vec<String>,
    /// Device ids that were enlisted and no longer are: drain their tasks, then let go.
    pub released: Vec<String>,
}

/// `eligible` are the online devices that pass the pool's selector; `current` the ids the
/// pool holds now. `replicas: None` enlists every eligible device.
pub fn plan(replicas: Option<i32>, eligible: &[&Device], current: &BTreeSet<String>) -> EnlistPlan {
    let mut ranked: Vec<&Device> = eligible.to_vec();
    ranked.sort_by(|a, b| {
        let held = current.contains(&b.id).cmp(&current.contains(&a.id));
        held.then_with(|| score(b).partial_cmp(&score(a)).unwrap_or(Ordering::Equal))
            .then_with(|| a.id.cmp(&b.id))
    });
    let wanted = replicas.map_or(ranked.len(), |n| (n.max(0) as usize).min(ranked.len()));
    let enlisted: Vec<String> = ranked.iter().take(wanted).map(|d| d.id.clone()).collect();
    let released = current
        .iter()
        .filter(|id| !enlisted.contains(id))
        .cloned()
        .collect();
    EnlistPlan { enlisted, released }
}

/// What the owner lets the device offer: a core, or 4 GiB of memory, counts one.
fn score(device: &Device) -> f64 {
    let cores = f64::from(device.offer.millicores) / 1000.0;
    let memory_gib = device.offer.memory_bytes as f64 / f64::from(1u32 << 30);
    cores + memory_gib / 4.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::test_device;

    fn device(id: &str, cores: u32) -> Device {
        test_device(id, "amd64", cores, 8)
    }

    fn ids(set: &[&str]) -> BTreeSet<String> {
        set.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn without_replicas_every_eligible_device_is_enlisted() {
        let (a, b) = (device("a", 2), device("b", 8));
        let plan = plan(None, &[&a, &b], &BTreeSet::new());
        assert_eq!(plan.enlisted, ["b", "a"]);
        assert!(plan.released.is_empty());
    }

    #[test]
    fn replicas_take_the_most_capable_first() {
        let (small, big, middle) = (device("small", 2), device("big", 16), device("middle", 8));
        let plan = plan(Some(2), &[&small, &big, &middle], &BTreeSet::new());
        assert_eq!(plan.enlisted, ["big", "middle"]);
        let plan2 = super::plan(Some(1), &[&small, &big, &middle], &BTreeSet::new());
        assert_eq!(plan2.enlisted, ["big"]);
    }

    #[test]
    fn what_the_owner_offers_counts_not_the_hardware() {
        let mut generous = device("generous", 4);
        let mut stingy = device("stingy", 4);
        generous.offer.millicores = 3000;
        stingy.offer.millicores = 500;
        let plan = plan(
            Some(1),
            &[&stingy, &generous],
            &ids(&["stingy", "generous"]),
        );
        assert_eq!(plan.enlisted, ["generous"]);
        assert_eq!(plan.released, ["stingy"]);
    }

    #[test]
    fn enlisted_devices_stay_when_better_ones_appear() {
        let (held, better) = (device("held", 2), device("better", 16));
        let plan = plan(Some(1), &[&held, &better], &ids(&["held"]));
        assert_eq!(plan.enlisted, ["held"]);
        assert!(plan.released.is_empty());
    }

    #[test]
    fn scaling_down_releases_the_least_valuable_and_lost_devices() {
        let (a, b, c) = (device("a", 8), device("b", 4), device("c", 2));
        let plan = plan(Some(2), &[&a, &b, &c], &ids(&["a", "b", "c", "gone"]));
        assert_eq!(plan.enlisted, ["a", "b"]);
        assert_eq!(
            plan.released,
            ["c", "gone"],
            "a device no longer eligible is released too"
        );
    }

    #[test]
    fn more_replicas_than_devices_enlists_them_all_and_zero_enlists_none() {
        let a = device("a", 2);
        assert_eq!(plan(Some(5), &[&a], &BTreeSet::new()).enlisted, ["a"]);
        assert_eq!(plan(Some(0), &[&a], &ids(&["a"])).released, ["a"]);
    }
}
