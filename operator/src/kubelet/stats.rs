//! What the containers on darkcore's devices use now, for `kubectl top` and autoscaling: the
//! agents' readings, kept per held task and bounded by what the device offers, and the
//! kubelet's `/stats/summary` and `/metrics/resource` rendered from them (pure).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use darkcore_proto::agent::v1::Stats;

use crate::domain::TaskId;

/// Containers read per task at most (a pod has few; a liar's list is cut).
pub const CONTAINERS_PER_TASK: usize = 32;
/// A reading older than this is not shown unless its run is live (running on a device that is
/// online): then silence means nothing changed, as agents send only what changed.
pub const FRESH_FOR_MS: i64 = 2 * 60 * 1000;
/// How often an agent reads its containers, and so how old a live run's unchanged figures may
/// be: they are shown as of this long ago at most (metrics-server needs time to move on).
pub const REPORT_EVERY_MS: i64 = 10 * 1000;
/// metrics-server drops a container or a node whose CPU total or memory reads 0 (no kubelet
/// reports one), so an idle run would never show in `kubectl top`: what is shown is at least
/// this, 1 ns of CPU and 1 byte, far below what any device measures.
pub const LEAST_SHOWN: u64 = 1;
/// Readings older than this are dropped, live or not: a run whose pod was deleted while this
/// operator did not see it, or one idle for a day (it counts afresh from its next reading).
pub const RETAIN_MS: i64 = 24 * 60 * 60 * 1000;

/// One container run's figures, as the operator keeps them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reading {
    /// When the operator received it (Unix ms): a device's clock is not trusted.
    pub at_unix_ms: i64,
    /// CPU time of the run since the operator first read it, core-nanoseconds; it only
    /// grows, at most as fast as the device offers cores.
    pub cpu_ns: u64,
    /// The run's CPU as the device last claimed it (what the next reading grows from).
    pub claimed_ns: u64,
    pub memory: u64,
    /// When the run started, as the device says (a new value is a new run).
    pub started_unix_ms: i64,
    /// CPU use since the reading before, in nanocores (a billionth of a core).
    pub nano_cores: u64,
}

/// What a device offers, which bounds what its readings may say.
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    pub millicores: u64,
    pub memory: u64,
}

/// Readings by task id and container name.
#[derive(Default)]
pub struct StatsStore {
    tasks: Mutex<HashMap<String, BTreeMap<String, Reading>>>,
    /// When old readings were last dropped (Unix ms): at most every `FRESH_FOR_MS`, not on
    /// every device's message.
    pruned_unix_ms: std::sync::atomic::AtomicI64,
    /// CPU of container runs no longer shown, by node: the node's total only grows.
    retired: Mutex<HashMap<String, NodeCpu>>,
}

#[derive(Default)]
struct NodeCpu {
    retired_ns: u64,
    /// What each run counted at the last read: (task, container, started) -> ns.
    last: HashMap<(String, String, i64), u64>,
}

impl StatsStore {
    fn tasks(&self) -> std::sync::MutexGuard<'_, HashMap<String, BTreeMap<String, Reading>>> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a device's readings at `now_unix_ms`, for the tasks `holds` says it holds; each
    /// is bounded by `bound`. Returns how many readings were refused (tasks not held).
    pub fn record(
        &self,
        stats: &Stats,
        now_unix_ms: i64,
        bound: Bound,
        holds: impl Fn(&str) -> bool,
    ) -> usize {
        let mut refused = 0;
        let mut tasks = self.tasks();
        let pruned = &self.pruned_unix_ms;
        if now_unix_ms - pruned.load(std::sync::atomic::Ordering::Relaxed) >= FRESH_FOR_MS {
            pruned.store(now_unix_ms, std::sync::atomic::Ordering::Relaxed);
            tasks.retain(|_, containers| containers.values().any(|r| retained(r, now_unix_ms)));
        }
        for task in &stats.tasks {
            if !holds(&task.task_id) {
                refused += 1;
                continue;
            }
            let containers = tasks.entry(task.task_id.clone()).or_default();
            for sent in task.containers.iter().take(CONTAINERS_PER_TASK) {
                if sent.name.len() > 253 {
                    continue;
                }
                // A run idle past the retention counts afresh, as a new one.
                let previous =
                    (containers.get(&sent.name).copied()).filter(|r| retained(r, now_unix_ms));
                let reading = bounded(previous, sent, now_unix_ms, bound);
                containers.insert(sent.name.clone(), reading);
            }
            if containers.is_empty() {
                tasks.remove(&task.task_id);
            }
        }
        refused
    }

    /// The readings of a task's containers to show: fresh ones; and when the run is `live`
    /// (its device online, its pod running), any, as of [`REPORT_EVERY_MS`] ago at most,
    /// since an agent sends nothing while nothing changes. At least [`LEAST_SHOWN`] each.
    pub fn of(&self, task_id: &str, now_unix_ms: i64, live: bool) -> BTreeMap<String, Reading> {
        let tasks = self.tasks();
        let Some(containers) = tasks.get(task_id) else {
            return BTreeMap::new();
        };
        containers
            .iter()
            .filter(|(_, r)| live || fresh(r, now_unix_ms))
            .map(|(name, r)| {
                let mut shown = *r;
                if live {
                    shown.at_unix_ms = r.at_unix_ms.max(now_unix_ms - REPORT_EVERY_MS);
                }
                shown.cpu_ns = shown.cpu_ns.max(LEAST_SHOWN);
                shown.memory = shown.memory.max(LEAST_SHOWN);
                (name.clone(), shown)
            })
            .collect()
    }

    /// Drops the readings of a deleted pod's tasks (ids `<uid>.<attempt>`).
    pub fn forget_pod(&self, uid: &str) {
        self.tasks()
            .retain(|task, _| TaskId::split(task).is_none_or(|(of, _)| of != uid));
    }

    /// A node's CPU since this operator started, core-nanoseconds, given the runs it shows
    /// now: what they used, plus what runs shown before and gone since had used. Only grows.
    pub fn node_cpu_ns(&self, node: &str, shown: &[(String, String, Reading)]) -> u64 {
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        let cpu = retired.entry(node.to_string()).or_default();
        let now: HashMap<(String, String, i64), u64> = shown
            .iter()
            .map(|(task, container, r)| {
                (
                    (task.clone(), container.clone(), r.started_unix_ms),
                    r.cpu_ns,
                )
            })
            .collect();
        for (run, ns) in &cpu.last {
            if !now.contains_key(run) {
                cpu.retired_ns = cpu.retired_ns.saturating_add(*ns);
            }
        }
        let current = now.values().fold(0u64, |sum, ns| sum.saturating_add(*ns));
        cpu.last = now;
        cpu.retired_ns.saturating_add(current)
    }
}

/// Whether a reading is recent enough to be shown whatever its run's state.
fn fresh(reading: &Reading, now_unix_ms: i64) -> bool {
    now_unix_ms - reading.at_unix_ms < FRESH_FOR_MS
}

/// Whether a reading is still kept (and continued by the run's next one).
fn retained(reading: &Reading, now_unix_ms: i64) -> bool {
    now_unix_ms - reading.at_unix_ms < RETAIN_MS
}

/// A container's new reading. CPU counts from when the operator first read the run (what it
/// used before is the device's word alone) and grows by what the device says it used since
/// its last reading, at most the offered cores over the time between the two; it never goes
/// back. Memory is at most the offer.
fn bounded(
    previous: Option<Reading>,
    sent: &darkcore_proto::agent::v1::ContainerStats,
    now_unix_ms: i64,
    bound: Bound,
) -> Reading {
    let memory = sent.memory_working_set_bytes.min(bound.memory);
    let same_run = previous.filter(|p| p.started_unix_ms == sent.started_unix_ms);
    let Some(previous) = same_run else {
        return Reading {
            at_unix_ms: now_unix_ms,
            cpu_ns: 0,
            claimed_ns: sent.cpu_nanoseconds_total,
            memory,
            started_unix_ms: sent.started_unix_ms,
            nano_cores: 0,
        };
    };
    let since_ms = u64::try_from(now_unix_ms.saturating_sub(previous.at_unix_ms)).unwrap_or(0);
    let most = since_ms
        .saturating_mul(bound.millicores)
        .saturating_mul(1_000);
    let grown = (sent
        .cpu_nanoseconds_total
        .saturating_sub(previous.claimed_ns))
    .min(most);
    let nano_cores = match since_ms {
        0 => previous.nano_cores,
        ms => grown.saturating_mul(1_000) / ms,
    };
    Reading {
        at_unix_ms: now_unix_ms,
        cpu_ns: previous.cpu_ns.saturating_add(grown),
        claimed_ns: sent.cpu_nanoseconds_total.max(previous.claimed_ns),
        memory,
        started_unix_ms: sent.started_unix_ms,
        nano_cores,
    }
}

/// A pod on the node, with the readings of its current attempt's containers.
pub struct PodReadings {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The pod's start time, as its status shows it (RFC 3339).
    pub start_time: Option<String>,
    pub task_id: String,
    pub containers: BTreeMap<String, Reading>,
}

fn rfc3339(unix_ms: i64) -> String {
    k8s_openapi::jiff::Timestamp::from_millisecond(unix_ms)
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
        .to_string()
}

fn cpu_json(at: &str, nano_cores: u64, cpu_ns: u64) -> serde_json::Value {
    serde_json::json!({ "time": at, "usageNanoCores": nano_cores, "usageCoreNanoSeconds": cpu_ns })
}

fn memory_json(at: &str, memory: u64) -> serde_json::Value {
    serde_json::json!({ "time": at, "usageBytes": memory, "workingSetBytes": memory, "rssBytes": memory })
}

/// The kubelet's `/stats/summary` (stats/v1alpha1) for `node`: the node is what its pods use.
pub fn summary(
    node: &str,
    started_unix_ms: i64,
    node_cpu_ns: u64,
    pods: &[PodReadings],
    now_unix_ms: i64,
) -> serde_json::Value {
    let now = rfc3339(now_unix_ms);
    let all = || pods.iter().flat_map(|p| p.containers.values());
    let sum = |f: fn(&Reading) -> u64| all().fold(0u64, |s, r| s.saturating_add(f(r)));
    let pods: Vec<serde_json::Value> = pods
        .iter()
        .map(|pod| {
            let containers: Vec<serde_json::Value> = pod
                .containers
                .iter()
                .map(|(name, r)| {
                    let at = rfc3339(r.at_unix_ms);
                    serde_json::json!({
                        "name": name,
                        "startTime": rfc3339(r.started_unix_ms),
                        "cpu": cpu_json(&at, r.nano_cores, r.cpu_ns),
                        "memory": memory_json(&at, r.memory),
                    })
                })
                .collect();
            let pod_sum = |f: fn(&Reading) -> u64| {
                pod.containers
                    .values()
                    .fold(0u64, |s, r| s.saturating_add(f(r)))
            };
            serde_json::json!({
                "podRef": { "name": pod.name, "namespace": pod.namespace, "uid": pod.uid },
                "startTime": pod.start_time,
                "containers": containers,
                "cpu": cpu_json(&now, pod_sum(|r| r.nano_cores), pod_sum(|r| r.cpu_ns)),
                "memory": memory_json(&now, pod_sum(|r| r.memory)),
            })
        })
        .collect();
    serde_json::json!({
        "node": {
            "nodeName": node,
            "startTime": rfc3339(started_unix_ms),
            "cpu": cpu_json(&now, sum(|r| r.nano_cores), node_cpu_ns.max(LEAST_SHOWN)),
            "memory": memory_json(&now, sum(|r| r.memory).max(LEAST_SHOWN)),
        },
        "pods": pods,
    })
}

/// One metric family: name, type, help, and its samples (labels, value, time in Unix ms).
type Family<'a> = (&'a str, &'a str, &'a str, Vec<(String, f64, i64)>);

/// The kubelet's `/metrics/resource` (Prometheus text, the names metrics-server reads).
pub fn resource_metrics(node_cpu_ns: u64, pods: &[PodReadings], now_unix_ms: i64) -> String {
    use std::fmt::Write as _;
    let seconds = |ns: u64| ns as f64 / 1e9;
    let pod_sum = |pod: &PodReadings, f: fn(&Reading) -> u64| {
        pod.containers
            .values()
            .fold(0u64, |s, r| s.saturating_add(f(r)))
    };
    let node_memory = pods
        .iter()
        .fold(0u64, |s, p| s.saturating_add(pod_sum(p, |r| r.memory)))
        .max(LEAST_SHOWN);
    let node_cpu_ns = node_cpu_ns.max(LEAST_SHOWN);
    let containers: Vec<(String, &Reading)> = pods
        .iter()
        .flat_map(|pod| {
            pod.containers.iter().map(move |(name, r)| {
                let labels = format!(
                    "container=\"{name}\",namespace=\"{}\",pod=\"{}\"",
                    pod.namespace, pod.name
                );
                (labels, r)
            })
        })
        .collect();
    let pod_labels =
        |pod: &PodReadings| format!("namespace=\"{}\",pod=\"{}\"", pod.namespace, pod.name);
    let families: [Family<'_>; 7] = [
        (
            "container_cpu_usage_seconds_total",
            "counter",
            "Cumulative cpu time consumed by the container in core-seconds",
            containers
                .iter()
                .map(|(l, r)| (l.clone(), seconds(r.cpu_ns), r.at_unix_ms))
                .collect(),
        ),
        (
            "container_memory_working_set_bytes",
            "gauge",
            "Current working set of the container in bytes",
            containers
                .iter()
                .map(|(l, r)| (l.clone(), r.memory as f64, r.at_unix_ms))
                .collect(),
        ),
        (
            "container_start_time_seconds",
            "gauge",
            "Start time of the container since unix epoch in seconds",
            (containers.iter())
                .map(|(l, r)| (l.clone(), r.started_unix_ms as f64 / 1e3, r.at_unix_ms))
                .collect(),
        ),
        (
            "node_cpu_usage_seconds_total",
            "counter",
            "Cumulative cpu time consumed by the node in core-seconds",
            vec![(String::new(), seconds(node_cpu_ns), now_unix_ms)],
        ),
        (
            "node_memory_working_set_bytes",
            "gauge",
            "Current working set of the node in bytes",
            vec![(String::new(), node_memory as f64, now_unix_ms)],
        ),
        (
            "pod_cpu_usage_seconds_total",
            "counter",
            "Cumulative cpu time consumed by the pod in core-seconds",
            (pods.iter())
                .map(|p| {
                    (
                        pod_labels(p),
                        seconds(pod_sum(p, |r| r.cpu_ns)),
                        now_unix_ms,
                    )
                })
                .collect(),
        ),
        (
            "pod_memory_working_set_bytes",
            "gauge",
            "Current working set of the pod in bytes",
            (pods.iter())
                .map(|p| (pod_labels(p), pod_sum(p, |r| r.memory) as f64, now_unix_ms))
                .collect(),
        ),
    ];
    let mut out = String::new();
    for (name, kind, help, samples) in families {
        let _ = writeln!(out, "# HELP {name} [STABLE] {help}\n# TYPE {name} {kind}");
        for (labels, value, at) in samples {
            let labels = match labels.is_empty() {
                true => String::new(),
                false => format!("{{{labels}}}"),
            };
            let _ = writeln!(out, "{name}{labels} {value} {at}");
        }
    }
    out.push_str("# HELP scrape_error [ALPHA] 1 if there was an error while getting container metrics, 0 otherwise\n# TYPE scrape_error gauge\nscrape_error 0\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use darkcore_proto::agent::v1::{ContainerStats, TaskStats};

    fn stats(task: &str, cpu_ns: u64, memory: u64) -> Stats {
        Stats {
            timestamp_unix_ms: 0,
            tasks: vec![TaskStats {
                task_id: task.into(),
                containers: vec![ContainerStats {
                    name: "main".into(),
                    cpu_nanoseconds_total: cpu_ns,
                    memory_working_set_bytes: memory,
                    started_unix_ms: 1_000,
                }],
            }],
        }
    }

    const OFFER: Bound = Bound {
        millicores: 2_000,
        memory: 1 << 30,
    };

    #[test]
    fn readings_are_kept_for_held_tasks_and_bounded_by_the_offer() {
        let store = StatsStore::default();
        let held = |task: &str| task == "uid.1";
        assert_eq!(store.record(&stats("uid.9", 1, 1), 2_000, OFFER, held), 1);
        assert!(
            store.of("uid.9", 2_000, false).is_empty(),
            "not held: not kept"
        );
        // What a run used before the operator first read it is the device's word alone.
        store.record(&stats("uid.1", 500_000_000, 64 << 20), 2_000, OFFER, held);
        assert_eq!(store.of("uid.1", 2_000, false)["main"].cpu_ns, LEAST_SHOWN);
        store.record(&stats("uid.1", 1_500_000_000, 64 << 20), 3_000, OFFER, held);
        let honest = store.of("uid.1", 3_000, false)["main"];
        assert_eq!(
            (honest.cpu_ns, honest.nano_cores),
            (1_000_000_000, 1_000_000_000)
        );
        store.record(
            &stats("uid.1", 1_000_000_000_000, 1 << 40),
            4_000,
            OFFER,
            held,
        );
        let lied = store.of("uid.1", 4_000, false)["main"];
        assert_eq!(
            lied.cpu_ns, 3_000_000_000,
            "2 cores for 1 s more, not 1,000 s"
        );
        assert_eq!(lied.memory, 1 << 30, "at most the offer");
        // CPU never goes back within a run.
        store.record(&stats("uid.1", 1, 1), 5_000, OFFER, held);
        assert_eq!(
            store.of("uid.1", 5_000, false)["main"].cpu_ns,
            3_000_000_000
        );
        let later = 5_000 + FRESH_FOR_MS;
        assert!(store.of("uid.1", later, false).is_empty(), "stale");
        // Live, a silent run's figures stand, as of one report interval ago at most.
        let live = store.of("uid.1", later, true)["main"];
        assert_eq!(live.cpu_ns, 3_000_000_000);
        assert_eq!(live.at_unix_ms, later - REPORT_EVERY_MS);
        // Its next reading continues it.
        // (From the highest figure it ever claimed: the lie of 1,000 s.)
        let claimed = 1_000_000_000_000 + 9_000_000_000;
        store.record(&stats("uid.1", claimed, 1), later, OFFER, held);
        assert_eq!(
            store.of("uid.1", later, false)["main"].cpu_ns,
            12_000_000_000
        );
        // Past the retention, a run counts afresh, from its next reading on.
        let much_later = later + RETAIN_MS;
        store.record(&stats("uid.1", 9_500_000_000, 1), much_later, OFFER, held);
        assert_eq!(
            store.of("uid.1", much_later, true)["main"].cpu_ns,
            LEAST_SHOWN
        );
        // The pod's deletion takes its readings.
        store.forget_pod("uid");
        assert!(store.of("uid.1", much_later, true).is_empty());
    }

    #[test]
    fn a_liars_long_lists_and_names_are_cut() {
        let store = StatsStore::default();
        let mut many = stats("uid.1", 1, 1);
        let one = many.tasks[0].containers[0].clone();
        let long = ContainerStats {
            name: "x".repeat(254),
            ..one.clone()
        };
        many.tasks[0].containers = std::iter::once(long)
            .chain((0..CONTAINERS_PER_TASK + 8).map(|n| ContainerStats {
                name: format!("c{n:03}"),
                ..one.clone()
            }))
            .collect();
        store.record(&many, 2_000, OFFER, |_| true);
        let kept = store.of("uid.1", 2_000, false);
        assert_eq!(
            kept.len(),
            CONTAINERS_PER_TASK - 1,
            "the first 32, less the long name"
        );
        assert!(kept.keys().all(|name| name.len() < 254));
    }

    #[test]
    fn summary_and_resource_metrics_show_each_container_and_the_node() {
        let reading = Reading {
            at_unix_ms: 1_700_000_010_000,
            cpu_ns: 1_500_000_000,
            claimed_ns: 1_500_000_000,
            memory: 64 << 20,
            started_unix_ms: 1_700_000_000_000,
            nano_cores: 150_000_000,
        };
        let pods = [PodReadings {
            namespace: "ns".into(),
            name: "busy".into(),
            uid: "uid".into(),
            start_time: Some("2023-11-14T22:13:20Z".into()),
            task_id: "uid.1".into(),
            containers: [("main".to_string(), reading)].into(),
        }];
        let summary = summary(
            "node-a",
            1_700_000_000_000,
            9_000_000_000,
            &pods,
            1_700_000_010_000,
        );
        assert_eq!(summary["node"]["nodeName"], "node-a");
        assert_eq!(
            summary["node"]["cpu"]["usageCoreNanoSeconds"],
            9_000_000_000u64
        );
        assert_eq!(summary["node"]["memory"]["workingSetBytes"], 64u64 << 20);
        let main = &summary["pods"][0]["containers"][0];
        assert_eq!(main["name"], "main");
        assert_eq!(main["cpu"]["usageNanoCores"], 150_000_000u64);
        assert_eq!(summary["pods"][0]["podRef"]["namespace"], "ns");
        let metrics = resource_metrics(9_000_000_000, &pods, 1_700_000_010_000);
        assert!(metrics.contains("container_cpu_usage_seconds_total{container=\"main\",namespace=\"ns\",pod=\"busy\"} 1.5 1700000010000\n"), "{metrics}");
        assert!(metrics.contains("container_memory_working_set_bytes{container=\"main\",namespace=\"ns\",pod=\"busy\"} 67108864 1700000010000\n"), "{metrics}");
        assert!(
            metrics.contains("node_cpu_usage_seconds_total 9 1700000010000\n"),
            "{metrics}"
        );
        assert!(
            metrics.contains("# TYPE node_memory_working_set_bytes gauge\n"),
            "{metrics}"
        );
    }

    #[test]
    fn a_nodes_cpu_only_grows_as_runs_come_and_go() {
        let store = StatsStore::default();
        let run = |task: &str, ns| {
            (
                task.to_string(),
                "main".to_string(),
                Reading {
                    cpu_ns: ns,
                    started_unix_ms: 1,
                    ..Default::default()
                },
            )
        };
        assert_eq!(store.node_cpu_ns("n", &[run("a", 5), run("b", 7)]), 12);
        assert_eq!(
            store.node_cpu_ns("n", &[run("b", 9)]),
            14,
            "a's 5 stays counted"
        );
        assert_eq!(store.node_cpu_ns("n", &[]), 14);
        assert_eq!(store.node_cpu_ns("other", &[run("c", 1)]), 1);
    }
}
