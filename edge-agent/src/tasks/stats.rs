//! What each running container uses now, for `kubectl top` and autoscaling: a meter per
//! container run (its cgroup, its processes in /proc, or its wasm store), read every
//! `STATS_EVERY` and sent only where a figure changed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use darkcore_proto::agent::v1::{ContainerStats, Stats, TaskStats};

/// How often the agent reads its meters (and so sends stats at most).
pub const STATS_EVERY: Duration = Duration::from_secs(10);

/// One reading of a container run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    /// CPU time of the run so far.
    pub cpu: Duration,
    pub memory_working_set: u64,
}

/// Reads what one container run uses now; `None` when it cannot be read (the run is ending).
pub trait Meter: Send + Sync {
    fn sample(&self) -> Option<Sample>;
}

/// A running container's meter and when its run started.
struct Metered {
    meter: Arc<dyn Meter>,
    started_unix_ms: i64,
    /// What was last sent for it.
    sent: Option<Sample>,
}

/// The meters of the containers running now, by task id and container name.
#[derive(Default)]
pub struct Meters {
    running: Mutex<BTreeMap<(String, String), Metered>>,
}

impl Meters {
    /// A container run started; it replaces the container's previous run.
    pub fn started(&self, task: &str, container: &str, meter: Arc<dyn Meter>, at_unix_ms: i64) {
        let metered = Metered {
            meter,
            started_unix_ms: at_unix_ms,
            sent: None,
        };
        crate::tasks::lock(&self.running).insert((task.into(), container.into()), metered);
    }

    /// A container run ended.
    pub fn ended(&self, task: &str, container: &str) {
        crate::tasks::lock(&self.running).remove(&(task.to_string(), container.to_string()));
    }

    /// Reads every meter; the containers whose figures changed since they were last sent
    /// (all of them with `all`, as after a reconnect), or `None` when none did.
    pub fn changed(&self, now_unix_ms: i64, all: bool) -> Option<Stats> {
        let mut running = crate::tasks::lock(&self.running);
        let mut tasks: BTreeMap<&str, Vec<ContainerStats>> = BTreeMap::new();
        for ((task, container), metered) in running.iter_mut() {
            let Some(sample) = metered.meter.sample() else {
                continue;
            };
            if !all && metered.sent == Some(sample) {
                continue;
            }
            metered.sent = Some(sample);
            tasks.entry(task).or_default().push(ContainerStats {
                name: container.clone(),
                cpu_nanoseconds_total: u64::try_from(sample.cpu.as_nanos()).unwrap_or(u64::MAX),
                memory_working_set_bytes: sample.memory_working_set,
                started_unix_ms: metered.started_unix_ms,
            });
        }
        (!tasks.is_empty()).then(|| Stats {
            timestamp_unix_ms: now_unix_ms,
            tasks: tasks
                .into_iter()
                .map(|(task_id, containers)| TaskStats {
                    task_id: task_id.to_string(),
                    containers,
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Fixed(AtomicU64);

    impl Meter for Fixed {
        fn sample(&self) -> Option<Sample> {
            Some(Sample {
                cpu: Duration::from_millis(self.0.load(Ordering::Relaxed)),
                memory_working_set: 1 << 20,
            })
        }
    }

    #[test]
    fn only_changed_figures_are_sent_and_ended_runs_not_at_all() {
        let meters = Meters::default();
        let busy = Arc::new(Fixed(AtomicU64::new(5)));
        meters.started("uid.1", "main", busy.clone(), 1_000);
        meters.started("uid.1", "side", Arc::new(Fixed(AtomicU64::new(0))), 1_000);
        let first = meters.changed(2_000, false).unwrap();
        assert_eq!(first.tasks[0].containers.len(), 2);
        assert_eq!(
            first.tasks[0].containers[0].cpu_nanoseconds_total,
            5_000_000
        );
        assert_eq!(
            meters.changed(3_000, false),
            None,
            "nothing changed: nothing sent"
        );
        busy.0.store(9, Ordering::Relaxed);
        let second = meters.changed(4_000, false).unwrap();
        let names: Vec<&str> = second.tasks[0]
            .containers
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(names, ["main"]);
        assert_eq!(
            meters.changed(5_000, true).unwrap().tasks[0]
                .containers
                .len(),
            2
        );
        meters.ended("uid.1", "main");
        meters.ended("uid.1", "side");
        assert_eq!(meters.changed(6_000, true), None);
    }
}
