//! Which device runs a pod (pure): one that offers the pod's runtime and has room for its cpu
//! and memory requests beside the tasks it already runs, preferring the least loaded, so that
//! load spreads instead of filling one device while others idle. A reissued replica goes first
//! to the devices that stay online most reliably. When none fits, the reason says what is
//! missing, in the numbers the user asked for.

use crate::domain::quantity::{bytes_quantity, cpu_quantity};

/// A device the pod could go to, with what it already carries.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub id: String,
    pub offer_millicores: u64,
    pub offer_memory: u64,
    pub runtimes: Vec<i32>,
    pub used_millicores: u64,
    pub used_memory: u64,
    pub tasks: usize,
    /// How reliably it stays online, in parts per million (see `validation::reliability`).
    pub reliability_ppm: u32,
}

/// What a pod needs from a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Need {
    pub millicores: u64,
    pub memory: u64,
    pub runtime: i32,
    pub runtime_name: &'static str,
    /// A replica reissued after results disagreed: it should come back soon, so the most
    /// reliable devices come first (in bands of 5%, within which load decides).
    pub prefer_reliable: bool,
}

/// Devices within this many parts per million of reliability count as equally reliable.
const RELIABILITY_BAND_PPM: u32 = 50_000;

fn load_after(c: &Candidate, need: &Need) -> f64 {
    let share = |used: u64, add: u64, offer: u64| {
        if offer == 0 {
            1.0
        } else {
            (used + add) as f64 / offer as f64
        }
    };
    share(c.used_millicores, need.millicores, c.offer_millicores).max(share(
        c.used_memory,
        need.memory,
        c.offer_memory,
    ))
}

/// The device to use, or why none fits now.
pub fn place(need: &Need, candidates: &[Candidate]) -> Result<String, String> {
    if candidates.is_empty() {
        return Err(
            "no enlisted device of this pool is online and giving now; the pod runs when one is"
                .into(),
        );
    }
    let with_runtime: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.runtimes.contains(&need.runtime))
        .collect();
    if with_runtime.is_empty() {
        return Err(format!(
            "no enlisted device offers runtime {} now (its owners must allow it in their policy)",
            need.runtime_name
        ));
    }
    let largest_cpu = with_runtime
        .iter()
        .map(|c| c.offer_millicores)
        .max()
        .unwrap_or(0);
    if need.millicores > largest_cpu {
        return Err(format!(
            "no enlisted device offers {} CPUs; the largest offers {}",
            cpu_quantity(need.millicores),
            cpu_quantity(largest_cpu)
        ));
    }
    let largest_memory = with_runtime
        .iter()
        .map(|c| c.offer_memory)
        .max()
        .unwrap_or(0);
    if need.memory > largest_memory {
        return Err(format!(
            "no enlisted device offers {} of memory; the largest offers {}",
            bytes_quantity(need.memory),
            bytes_quantity(largest_memory)
        ));
    }
    with_runtime
        .iter()
        .filter(|c| {
            c.used_millicores + need.millicores <= c.offer_millicores && c.used_memory + need.memory <= c.offer_memory
        })
        .min_by(|a, b| {
            let band = |c: &Candidate| c.reliability_ppm / RELIABILITY_BAND_PPM;
            let steadier_first = match need.prefer_reliable {
                true => band(b).cmp(&band(a)),
                false => std::cmp::Ordering::Equal,
            };
            steadier_first
                .then(load_after(a, need).total_cmp(&load_after(b, need)))
                .then(a.tasks.cmp(&b.tasks))
                .then(a.id.cmp(&b.id))
        })
        .map(|c| c.id.clone())
        .ok_or_else(|| {
            format!(
                "every device that could run it is full ({} CPUs and {} requested); it runs as soon as one has room",
                cpu_quantity(need.millicores),
                bytes_quantity(need.memory)
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str, cores: u64, used_millicores: u64, tasks: usize) -> Candidate {
        Candidate {
            id: id.into(),
            offer_millicores: cores * 1000,
            offer_memory: 4 << 30,
            runtimes: vec![1],
            used_millicores,
            used_memory: 0,
            tasks,
            reliability_ppm: 1_000_000,
        }
    }

    fn need(millicores: u64) -> Need {
        Need {
            millicores,
            memory: 1 << 20,
            runtime: 1,
            runtime_name: "process",
            prefer_reliable: false,
        }
    }

    #[test]
    fn a_reissued_replica_goes_to_the_most_reliable_device_then_the_least_loaded() {
        let reliable = |id: &str, used: u64, ppm: u32| Candidate {
            reliability_ppm: ppm,
            ..device(id, 4, used, 1)
        };
        let devices = [
            reliable("flaky", 0, 600_000),
            reliable("steady", 3000, 990_000),
            reliable("steady-idle", 1000, 960_000),
        ];
        // A first replica: load decides.
        assert_eq!(place(&need(500), &devices).unwrap(), "flaky");
        let reissued = Need {
            prefer_reliable: true,
            ..need(500)
        };
        // Reissued: the reliable band first (95-100%), and within it the least loaded.
        assert_eq!(place(&reissued, &devices).unwrap(), "steady-idle");
        // Full reliable devices do not stop it: it goes to the next that has room.
        let full = [
            reliable("flaky", 0, 600_000),
            reliable("steady", 4000, 990_000),
        ];
        assert_eq!(place(&reissued, &full).unwrap(), "flaky");
    }

    #[test]
    fn load_spreads_to_the_least_loaded_device() {
        let devices = [
            device("a", 4, 2000, 2),
            device("b", 2, 0, 0),
            device("c", 4, 500, 1),
        ];
        assert_eq!(place(&need(500), &devices).unwrap(), "b");
        let busy_b = [
            device("a", 4, 2000, 2),
            device("b", 2, 1500, 3),
            device("c", 4, 500, 1),
        ];
        assert_eq!(place(&need(500), &busy_b).unwrap(), "c");
    }

    #[test]
    fn pods_without_requests_spread_by_task_count() {
        let devices = [device("a", 4, 0, 3), device("b", 4, 0, 1)];
        assert_eq!(place(&need(0), &devices).unwrap(), "b");
    }

    #[test]
    fn the_reason_names_what_is_missing() {
        let devices = [device("a", 4, 0, 0), device("b", 2, 0, 0)];
        assert_eq!(
            place(&need(8000), &devices).unwrap_err(),
            "no enlisted device offers 8 CPUs; the largest offers 4"
        );
        let full = [device("a", 1, 1000, 1)];
        assert!(
            place(&need(500), &full)
                .unwrap_err()
                .starts_with("every device that could run it is full")
        );
        let mut no_runtime = need(0);
        no_runtime.runtime = 2;
        no_runtime.runtime_name = "oci";
        assert!(
            place(&no_runtime, &devices)
                .unwrap_err()
                .contains("runtime oci")
        );
        assert!(
            place(&need(0), &[])
                .unwrap_err()
                .contains("no enlisted device")
        );
    }
}
