//! Reports that name a pod the controller does not know yet, held while a restarted operator
//! lists its pods: bounded per device and in all, and given back per pod in the order they came.

use std::collections::HashMap;

use darkcore_proto::agent::v1::TaskStatus;

/// Reports held at once from one device: far more tasks than any device holds.
pub const PER_DEVICE: usize = 1_000;
/// Reports held at once in all: more than a whole fleet's Hellos after a restart ever name.
pub const TOTAL: usize = 100_000;

/// Held reports, by the uid of the pod they name. A device's newer report of a task replaces its
/// older one (each report is the task's whole state), so repeating it costs nothing.
#[derive(Debug, Default)]
pub struct Orphans {
    by_pod: HashMap<String, Vec<(String, TaskStatus)>>,
    per_device: HashMap<String, usize>,
    total: usize,
}

impl Orphans {
    /// Holds `device`'s report for pod `uid`; false (and nothing held) when the device or the
    /// whole has reached its bound.
    pub fn hold(&mut self, uid: &str, device: &str, report: TaskStatus) -> bool {
        let held = self.by_pod.entry(uid.to_string()).or_default();
        if let Some(at) = held
            .iter()
            .position(|(d, r)| d == device && r.task_id == report.task_id)
        {
            held.remove(at);
            held.push((device.to_string(), report));
            return true;
        }
        let count = self.per_device.get(device).copied().unwrap_or(0);
        if count >= PER_DEVICE || self.total >= TOTAL {
            if held.is_empty() {
                self.by_pod.remove(uid);
            }
            return false;
        }
        held.push((device.to_string(), report));
        self.per_device.insert(device.to_string(), count + 1);
        self.total += 1;
        true
    }

    /// The reports held for pod `uid`, oldest first; they are no longer held.
    pub fn take(&mut self, uid: &str) -> Vec<(String, TaskStatus)> {
        let taken = self.by_pod.remove(uid).unwrap_or_default();
        for (device, _) in &taken {
            if let Some(count) = self.per_device.get_mut(device) {
                *count -= 1;
                if *count == 0 {
                    self.per_device.remove(device);
                }
            }
        }
        self.total -= taken.len();
        taken
    }

    /// The uids of the pods with reports held.
    /// Takes out the reports whose pods are gone: every one from a device whose node has been
    /// listed (`listed`), since a listed node would have shown its pod. The others stay held.
    pub fn settle(&mut self, listed: impl Fn(&str) -> bool) -> Vec<(String, TaskStatus)> {
        let mut settled = Vec::new();
        for uid in self.pods() {
            for (device, report) in self.take(&uid) {
                if listed(&device) {
                    settled.push((device, report));
                } else {
                    self.hold(&uid, &device, report);
                }
            }
        }
        settled
    }

    pub fn pods(&self) -> Vec<String> {
        self.by_pod.keys().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(task: &str, restarts: u32) -> TaskStatus {
        TaskStatus {
            task_id: task.into(),
            containers: vec![darkcore_proto::agent::v1::ContainerStatus {
                restart_count: restarts,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn reports_come_back_per_pod_in_the_order_they_came() {
        let mut orphans = Orphans::default();
        assert!(orphans.hold("u1", "dev-a", report("u1.1", 0)));
        assert!(orphans.hold("u2", "dev-a", report("u2.1", 0)));
        assert!(orphans.hold("u1", "dev-b", report("u1.2", 0)));
        let taken = orphans.take("u1");
        let order: Vec<_> = taken
            .iter()
            .map(|(d, r)| (d.as_str(), r.task_id.as_str()))
            .collect();
        assert_eq!(order, [("dev-a", "u1.1"), ("dev-b", "u1.2")]);
        assert_eq!(orphans.len(), 1);
        assert_eq!(orphans.pods(), ["u2"]);
        assert!(orphans.take("u1").is_empty());
    }

    #[test]
    fn a_repeated_report_replaces_the_older_one_and_moves_last() {
        let mut orphans = Orphans::default();
        orphans.hold("u1", "dev-a", report("u1.1", 0));
        orphans.hold("u1", "dev-b", report("u1.2", 0));
        for restarts in 1..=5 {
            assert!(orphans.hold("u1", "dev-a", report("u1.1", restarts)));
        }
        assert_eq!(orphans.len(), 2);
        let taken = orphans.take("u1");
        assert_eq!(taken[0].0, "dev-b");
        assert_eq!(taken[1].1.containers[0].restart_count, 5);
    }

    #[test]
    fn one_device_inventing_tasks_is_bounded_and_others_still_held() {
        let mut orphans = Orphans::default();
        for n in 0..PER_DEVICE {
            assert!(orphans.hold(&format!("u{n}"), "liar", report(&format!("u{n}.1"), 0)));
        }
        assert!(!orphans.hold("more", "liar", report("more.1", 0)));
        assert!(
            orphans.pods().len() == PER_DEVICE,
            "a refused report leaves no empty entry"
        );
        assert!(orphans.hold("honest", "dev-a", report("honest.1", 0)));
        assert_eq!(orphans.len(), PER_DEVICE + 1);
        orphans.take("u0");
        assert!(
            orphans.hold("more", "liar", report("more.1", 0)),
            "room again once taken"
        );
    }

    #[test]
    fn only_reports_from_devices_whose_node_was_listed_settle() {
        let mut orphans = Orphans::default();
        let report = |task: &str| TaskStatus {
            task_id: task.into(),
            ..Default::default()
        };
        orphans.hold("pod-a", "dev-listed", report("a.1"));
        orphans.hold("pod-b", "dev-waiting", report("b.1"));
        let settled = orphans.settle(|device| device == "dev-listed");
        let settled: Vec<(&str, &str)> = settled
            .iter()
            .map(|(d, r)| (d.as_str(), r.task_id.as_str()))
            .collect();
        assert_eq!(settled, [("dev-listed", "a.1")]);
        // The other waits for its node's list, still held and counted.
        assert_eq!(orphans.pods(), ["pod-b"]);
        assert_eq!(orphans.settle(|_| true).len(), 1);
        assert!(orphans.is_empty());
    }
}
