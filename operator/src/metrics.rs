//! The operator's Prometheus metrics. Labels are bounded sets (kinds, verbs, reasons): never
//! a pool, node, device or pod name, so cardinality does not grow with the fleet.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabels {
    kind: &'static str,
    verb: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuntimeLabels {
    runtime: &'static str,
}

/// Per pool: pools are few and chosen by the platform team, so this stays bounded.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolStateLabels {
    pool: String,
    state: &'static str,
}

/// Device states a pool's status counts, as the `state` label of `pool_devices`.
pub const DEVICE_STATES: [&str; 4] = ["online", "enlisted", "ready", "unavailable"];

pub struct Metrics {
    pub registry: Registry,
    pub reconciliations: Counter,
    pub certificates_renewed: Counter,
    pub reconcile_duration: Histogram,
    pub virtual_nodes: Gauge,
    reconcile_failures: Family<ReasonLabels, Counter>,
    api_writes: Family<WriteLabels, Counter>,
    lease_renewals: Family<ResultLabels, Counter>,
    pub agent_connections: Gauge,
    pub leader: Gauge,
    joins: Family<ResultLabels, Counter>,
    frames_rejected: Family<ReasonLabels, Counter>,
    refusals: Family<ReasonLabels, Counter>,
    pool_devices: Family<PoolStateLabels, Gauge>,
    tasks_dispatched: Family<RuntimeLabels, Counter>,
    tasks_completed: Family<ResultLabels, Counter>,
    tasks_redispatched: Family<ReasonLabels, Counter>,
    verdicts: Family<ResultLabels, Counter>,
    devices_quarantined: Counter,
    pub placement_duration: Histogram,
    pub dispatch_latency: Histogram,
    pub pod_create_to_running: Histogram,
    usage_records: Family<ResultLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("darkcore_operator");
        let certificates_renewed = Counter::default();
        registry.register(
            "device_certificates_renewed",
            "Device certificates renewed over their devices' streams",
            certificates_renewed.clone(),
        );
        let reconciliations = Counter::default();
        registry.register(
            "pool_reconciliations",
            "DevicePool reconciliations run",
            reconciliations.clone(),
        );
        let reconcile_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "pool_reconcile_failures",
            "DevicePool reconciliations that failed, by reason",
            reconcile_failures.clone(),
        );
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "pool_reconcile_duration_seconds",
            "Time one DevicePool reconciliation takes",
            reconcile_duration.clone(),
        );
        let api_writes = Family::<WriteLabels, Counter>::default();
        registry.register(
            "api_writes",
            "Writes sent to the Kubernetes API, by kind and verb",
            api_writes.clone(),
        );
        let lease_renewals = Family::<ResultLabels, Counter>::default();
        registry.register(
            "node_lease_renewals",
            "Node lease renewals, by result",
            lease_renewals.clone(),
        );
        let virtual_nodes = Gauge::default();
        registry.register(
            "virtual_nodes",
            "Virtual nodes this operator keeps alive",
            virtual_nodes.clone(),
        );
        let agent_connections = Gauge::default();
        registry.register(
            "agent_connections",
            "Agent streams open now",
            agent_connections.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica acts (it leads, or leader election is off), 0 while it stands by",
            leader.clone(),
        );
        let joins = Family::<ResultLabels, Counter>::default();
        registry.register(
            "joins",
            "Join requests, by result: accepted, or why they were refused",
            joins.clone(),
        );
        let frames_rejected = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "frames_rejected",
            "Agent stream frames refused (undecodable, too large, wrong version), by reason",
            frames_rejected.clone(),
        );
        let refusals = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "stream_refusals",
            "Agent streams closed with a Refusal, by code",
            refusals.clone(),
        );
        let pool_devices = Family::<PoolStateLabels, Gauge>::default();
        registry.register(
            "pool_devices",
            "Devices of each pool, by state: online, enlisted, ready (enlisted and allowed to work now), unavailable (enlisted, withheld by the owner)",
            pool_devices.clone(),
        );
        let tasks_dispatched = Family::<RuntimeLabels, Counter>::default();
        registry.register(
            "tasks_dispatched",
            "Tasks assigned to devices, by runtime (a re-dispatch counts again)",
            tasks_dispatched.clone(),
        );
        let tasks_completed = Family::<ResultLabels, Counter>::default();
        registry.register(
            "tasks_completed",
            "Task attempts that ended on their device, by result: succeeded or failed",
            tasks_completed.clone(),
        );
        let tasks_redispatched = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "tasks_redispatched",
            "Task attempts abandoned so that the task runs again elsewhere, by reason: DeviceLost, Preempted",
            tasks_redispatched.clone(),
        );
        let verdicts = Family::<ResultLabels, Counter>::default();
        registry.register(
            "validation_verdicts",
            "Checked pods decided, by result: validated (a quorum agreed), unverified (a trusted device's result accepted alone), no_quorum",
            verdicts.clone(),
        );
        let devices_quarantined = Counter::default();
        registry.register(
            "devices_quarantined",
            "Devices quarantined because their results disagreed with validated ones too often",
            devices_quarantined.clone(),
        );
        let placement_duration = Histogram::new(exponential_buckets(0.000_01, 4.0, 10));
        registry.register(
            "placement_duration_seconds",
            "Time to choose a device for one task",
            placement_duration.clone(),
        );
        let dispatch_latency = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "dispatch_latency_seconds",
            "From the operator first seeing a pod bound to its node to the task's assignment",
            dispatch_latency.clone(),
        );
        let pod_create_to_running = Histogram::new(exponential_buckets(0.05, 2.0, 12));
        registry.register(
            "pod_create_to_running_seconds",
            "From a pod's creationTimestamp to the operator reporting it Running",
            pod_create_to_running.clone(),
        );
        let usage_records = Family::<ResultLabels, Counter>::default();
        registry.register(
            "usage_records",
            "Usage records, by result: counted; duplicate (sent again after a lost acknowledgement, counted before); clipped (bounded by wall time × granted, then counted); refused_never_held, refused_not_holder, refused_already_charged (not counted); operator_charged (the operator's charge for an attempt lost with its device); dropped (such a charge the recorder had no room for)",
            usage_records.clone(),
        );
        Metrics {
            usage_records,
            registry,
            pool_devices,
            tasks_dispatched,
            tasks_completed,
            tasks_redispatched,
            verdicts,
            devices_quarantined,
            placement_duration,
            dispatch_latency,
            pod_create_to_running,
            agent_connections,
            leader,
            joins,
            frames_rejected,
            refusals,
            reconciliations,
            certificates_renewed,
            reconcile_duration,
            virtual_nodes,
            reconcile_failures,
            api_writes,
            lease_renewals,
        }
    }
}

impl Metrics {
    pub fn api_write(&self, kind: &'static str, verb: &'static str) {
        self.api_writes
            .get_or_create(&WriteLabels { kind, verb })
            .inc();
    }

    pub fn lease_renewal(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.lease_renewals
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn join(&self, result: &'static str) {
        self.joins.get_or_create(&ResultLabels { result }).inc();
    }

    pub fn frame_rejected(&self, reason: &'static str) {
        self.frames_rejected
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn refusal(&self, reason: &'static str) {
        self.refusals.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn reconcile_failure(&self, reason: &'static str) {
        self.reconcile_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Sets a pool's device counts, in the order of [`DEVICE_STATES`].
    pub fn pool_devices(&self, pool: &str, counts: [i64; 4]) {
        for (state, count) in DEVICE_STATES.into_iter().zip(counts) {
            self.pool_devices
                .get_or_create(&PoolStateLabels {
                    pool: pool.into(),
                    state,
                })
                .set(count);
        }
    }

    /// Forgets a deleted pool's series.
    pub fn pool_removed(&self, pool: &str) {
        for state in DEVICE_STATES {
            self.pool_devices.remove(&PoolStateLabels {
                pool: pool.into(),
                state,
            });
        }
    }

    pub fn task_dispatched(&self, runtime: &'static str) {
        self.tasks_dispatched
            .get_or_create(&RuntimeLabels { runtime })
            .inc();
    }

    pub fn task_completed(&self, succeeded: bool) {
        let result = if succeeded { "succeeded" } else { "failed" };
        self.tasks_completed
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn usage_records(&self, result: &'static str, count: usize) {
        if count > 0 {
            self.usage_records
                .get_or_create(&ResultLabels { result })
                .inc_by(count as u64);
        }
    }

    /// A checked pod was decided: `validated`, `unverified` or `no_quorum`.
    pub fn verdict(&self, result: &'static str) {
        self.verdicts.get_or_create(&ResultLabels { result }).inc();
    }

    pub fn device_quarantined(&self) {
        self.devices_quarantined.inc();
    }

    pub fn task_redispatched(&self, reason: &'static str) {
        self.tasks_redispatched
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_counted_by_kind_and_verb() {
        let metrics = Metrics::default();
        metrics.api_write("Node", "apply");
        metrics.api_write("Node", "apply");
        let text = metrics.encode();
        assert!(
            text.contains(r#"darkcore_operator_api_writes_total{kind="Node",verb="apply"} 2"#),
            "{text}"
        );
    }

    #[test]
    fn a_deleted_pool_leaves_no_series_behind() {
        let metrics = Metrics::default();
        metrics.pool_devices("lab", [3, 2, 1, 1]);
        let text = metrics.encode();
        assert!(
            text.contains(r#"darkcore_operator_pool_devices{pool="lab",state="enlisted"} 2"#),
            "{text}"
        );
        metrics.pool_removed("lab");
        assert!(!metrics.encode().contains(r#"pool="lab""#));
    }
}
