//! The status of a pool's virtual node: capacity from its devices, conditions, addresses and
//! the kubelet endpoint (pure). Written only when it changed or its heartbeat is stale.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    DaemonEndpoint, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeStatus, NodeSystemInfo,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::conditions::{status_word, transition_time};
use crate::domain::quantity::{bytes_quantity, count_quantity, cpu_quantity};
use crate::pool::capacity::PlatformCapacity;
use crate::pool::node::Platform;

/// A node's status is rewritten at least this often, as virtual-kubelet does, even when
/// nothing changed; liveness itself travels in the Lease.
pub const NODE_STATUS_REFRESH: Duration = Duration::from_secs(60);
/// The Kubernetes release whose kubelet contract darkcore's nodes follow.
pub const KUBELET_COMPAT_VERSION: &str = "v1.33.0";
/// darkcore's own condition on its nodes: whether any device can take work.
pub const DEVICES_AVAILABLE: &str = "DevicesAvailable";

/// Where the apiserver reaches the kubelet API that the operator serves for its nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeletEndpoint {
    pub address: String,
    pub port: i32,
}

/// Opens and closes the kubelet API endpoint of each node the operator publishes: one per
/// node, so that a node's `/pods` lists that node's pods only.
pub trait KubeletEndpoints: Send + Sync {
    /// Where node `node` is served, opened now if it is not yet; the port the node publishes
    /// (`current_port`) is kept when it is free, so a restart does not move it.
    fn open(&self, node: &str, current_port: Option<i32>) -> Result<KubeletEndpoint, NoFreePort>;
    /// Stops serving node `node` (it is deleted).
    fn close(&self, node: &str);
}

/// No port of the operator's kubelet range could be bound for a node.
#[derive(Debug, thiserror::Error)]
#[error(
    "no free port for the kubelet API of node {node} in {first}-{last} (every port is taken by another node or another program): raise --kubelet-port-count or free a port"
)]
pub struct NoFreePort {
    pub node: String,
    pub first: u16,
    pub last: u16,
}

/// What the node status is derived from.
pub struct NodeStatusInput<'a> {
    pub pool: &'a str,
    pub node_name: &'a str,
    pub platform: Platform,
    pub capacity: &'a PlatformCapacity,
    pub endpoint: &'a KubeletEndpoint,
    pub now: &'a Time,
}

pub fn desired_node_status(
    input: &NodeStatusInput<'_>,
    current: Option<&NodeStatus>,
) -> NodeStatus {
    let resources = resources(input.capacity);
    NodeStatus {
        capacity: Some(resources.clone()),
        allocatable: Some(resources),
        conditions: Some(conditions(input, current)),
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: input.endpoint.address.clone(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: input.node_name.into(),
            },
        ]),
        daemon_endpoints: Some(NodeDaemonEndpoints {
            kubelet_endpoint: Some(DaemonEndpoint {
                port: input.endpoint.port,
            }),
        }),
        node_info: Some(NodeSystemInfo {
            architecture: input.platform.arch.as_str().into(),
            operating_system: input.platform.os.as_str().into(),
            kubelet_version: format!(
                "{KUBELET_COMPAT_VERSION}-darkcore-{}",
                env!("CARGO_PKG_VERSION")
            ),
            container_runtime_version: format!("darkcore://{}", env!("CARGO_PKG_VERSION")),
            os_image: format!("darkcore pool {}", input.pool),
            ..NodeSystemInfo::default()
        }),
        ..NodeStatus::default()
    }
}

fn resources(capacity: &PlatformCapacity) -> BTreeMap<String, Quantity> {
    BTreeMap::from([
        (
            "cpu".to_string(),
            Quantity(cpu_quantity(capacity.cpu_millis)),
        ),
        (
            "memory".to_string(),
            Quantity(bytes_quantity(capacity.memory_bytes)),
        ),
        (
            "ephemeral-storage".to_string(),
            Quantity(bytes_quantity(capacity.ephemeral_storage_bytes)),
        ),
        (
            "pods".to_string(),
            Quantity(count_quantity(u64::from(capacity.pods))),
        ),
    ])
}

fn conditions(input: &NodeStatusInput<'_>, current: Option<&NodeStatus>) -> Vec<NodeCondition> {
    let (devices_ok, devices_reason, devices_message) = devices_condition(input);
    let wanted = [
        (
            "Ready",
            true,
            "DarkcoreOperatorReady",
            "darkcore-operator is serving this node".to_string(),
        ),
        (
            "MemoryPressure",
            false,
            "DarkcoreNoPressure",
            "devices report their own memory; none is under pressure".into(),
        ),
        (
            "DiskPressure",
            false,
            "DarkcoreNoPressure",
            "devices report their own disk; none is under pressure".into(),
        ),
        (
            "PIDPressure",
            false,
            "DarkcoreNoPressure",
            "devices report their own process limits; none is under pressure".into(),
        ),
        (
            DEVICES_AVAILABLE,
            devices_ok,
            devices_reason,
            devices_message,
        ),
    ];
    let previous = current.and_then(|s| s.conditions.as_ref());
    wanted
        .into_iter()
        .map(|(type_, ok, reason, message)| {
            let status = status_word(ok);
            let prev = previous
                .and_then(|cs| cs.iter().find(|c| c.type_ == type_))
                .map(|c| (c.status.as_str(), c.last_transition_time.as_ref()));
            NodeCondition {
                type_: type_.into(),
                status: status.into(),
                reason: Some(reason.into()),
                message: Some(message),
                last_heartbeat_time: Some(input.now.clone()),
                last_transition_time: Some(transition_time(prev, status, input.now)),
            }
        })
        .collect()
}

fn devices_condition(input: &NodeStatusInput<'_>) -> (bool, &'static str, String) {
    let c = input.capacity;
    if c.devices == 0 {
        (
            false,
            "NoDevicesEnlisted",
            format!(
                "no {} device has joined pool {} yet, so this node accepts no pods; devices join with `darkcore-agent join`",
                input.platform, input.pool
            ),
        )
    } else if c.ready_devices == 0 {
        (
            false,
            "NoDevicesReady",
            format!(
                "{} device(s) enlisted but none may take work now (their owners are using them, or it is outside their hours)",
                c.devices
            ),
        )
    } else {
        (
            true,
            "DevicesReady",
            format!(
                "{} of {} device(s) ready, offering {} CPU and {} memory",
                c.ready_devices,
                c.devices,
                cpu_quantity(c.cpu_millis),
                bytes_quantity(c.memory_bytes)
            ),
        )
    }
}

/// Whether the node status in the cluster must be rewritten: something in it differs from
/// `desired`, or its heartbeat is older than `refresh`.
pub fn node_status_outdated(
    current: Option<&NodeStatus>,
    desired: &NodeStatus,
    now: &Time,
    refresh: Duration,
) -> bool {
    let Some(current) = current else { return true };
    let same_facts = current.capacity == desired.capacity
        && current.allocatable == desired.allocatable
        && current.addresses == desired.addresses
        && current.daemon_endpoints == desired.daemon_endpoints
        && current.node_info == desired.node_info
        && condition_facts(current) == condition_facts(desired);
    let heartbeat = current
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready")
        .and_then(|c| c.last_heartbeat_time.as_ref());
    let stale = match heartbeat {
        Some(beat) => now.0.duration_since(beat.0).unsigned_abs() >= refresh,
        None => true,
    };
    !same_facts || stale
}

fn condition_facts(status: &NodeStatus) -> Vec<(&str, &str, Option<&str>, Option<&str>)> {
    let mut facts: Vec<_> = status
        .conditions
        .iter()
        .flatten()
        .map(|c| {
            (
                c.type_.as_str(),
                c.status.as_str(),
                c.reason.as_deref(),
                c.message.as_deref(),
            )
        })
        .collect();
    facts.sort();
    facts
}

#[cfg(test)]
mod tests {
    use super::*;
    use darkcore_crds::{Arch, Os};
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(1_800_000_000 + secs).unwrap())
    }

    fn render(capacity: &PlatformCapacity, now: &Time, current: Option<&NodeStatus>) -> NodeStatus {
        let endpoint = KubeletEndpoint {
            address: "10.0.0.7".into(),
            port: 10250,
        };
        let input = NodeStatusInput {
            pool: "lab",
            node_name: "darkcore-lab-linux-amd64",
            platform: Platform {
                os: Os::Linux,
                arch: Arch::Amd64,
            },
            capacity,
            endpoint: &endpoint,
            now,
        };
        desired_node_status(&input, current)
    }

    fn condition<'a>(status: &'a NodeStatus, type_: &str) -> &'a NodeCondition {
        status
            .conditions
            .as_ref()
            .unwrap()
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap()
    }

    #[test]
    fn a_node_without_devices_is_ready_but_takes_no_pods_and_says_why() {
        let status = render(&PlatformCapacity::default(), &at(0), None);
        assert_eq!(status.allocatable.as_ref().unwrap()["pods"].0, "0");
        assert_eq!(condition(&status, "Ready").status, "True");
        let devices = condition(&status, DEVICES_AVAILABLE);
        assert_eq!(devices.status, "False");
        assert_eq!(devices.reason.as_deref(), Some("NoDevicesEnlisted"));
        assert!(devices.message.as_ref().unwrap().contains("linux/amd64"));
    }

    #[test]
    fn node_publishes_its_kubelet_endpoint_and_internal_ip() {
        let status = render(&PlatformCapacity::default(), &at(0), None);
        assert_eq!(status.addresses.as_ref().unwrap()[0].type_, "InternalIP");
        assert_eq!(status.addresses.as_ref().unwrap()[0].address, "10.0.0.7");
        assert_eq!(
            status
                .daemon_endpoints
                .unwrap()
                .kubelet_endpoint
                .unwrap()
                .port,
            10250
        );
    }

    #[test]
    fn capacity_comes_from_ready_devices() {
        let capacity = PlatformCapacity {
            devices: 2,
            ready_devices: 1,
            cpu_millis: 4000,
            memory_bytes: 8 << 30,
            ephemeral_storage_bytes: 0,
            pods: 16,
        };
        let status = render(&capacity, &at(0), None);
        let alloc = status.allocatable.as_ref().unwrap();
        assert_eq!(
            (
                alloc["cpu"].0.as_str(),
                alloc["memory"].0.as_str(),
                alloc["pods"].0.as_str()
            ),
            ("4", "8Gi", "16")
        );
        assert_eq!(condition(&status, DEVICES_AVAILABLE).status, "True");
    }

    #[test]
    fn an_unchanged_status_is_not_rewritten_until_its_heartbeat_is_stale() {
        let first = render(&PlatformCapacity::default(), &at(0), None);
        let again = render(&PlatformCapacity::default(), &at(30), Some(&first));
        assert!(!node_status_outdated(
            Some(&first),
            &again,
            &at(30),
            NODE_STATUS_REFRESH
        ));
        assert!(node_status_outdated(
            Some(&first),
            &again,
            &at(60),
            NODE_STATUS_REFRESH
        ));
        assert_eq!(condition(&again, "Ready").last_transition_time, Some(at(0)));
    }

    #[test]
    fn a_node_marked_unknown_by_kubernetes_is_rewritten_at_once() {
        let mut current = render(&PlatformCapacity::default(), &at(0), None);
        let ready = current
            .conditions
            .as_mut()
            .unwrap()
            .iter_mut()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        ready.status = "Unknown".into();
        ready.reason = Some("NodeStatusUnknown".into());
        let desired = render(&PlatformCapacity::default(), &at(5), Some(&current));
        assert!(node_status_outdated(
            Some(&current),
            &desired,
            &at(5),
            NODE_STATUS_REFRESH
        ));
        assert_eq!(
            condition(&desired, "Ready").last_transition_time,
            Some(at(5))
        );
    }
}
