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

pub struct Metrics {
    pub registry: Registry,
    pub reconciliations: Counter,
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
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("darkcore_operator");
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
        Metrics {
            registry,
            agent_connections,
            leader,
            joins,
            frames_rejected,
            refusals,
            reconciliations,
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
}
