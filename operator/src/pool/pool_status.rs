//! A DevicePool's status: how many devices it has, what they offer, which nodes carry it, and
//! three conditions (pure). Written only when it changed.

use darkcore_crds::{DevicePool, DevicePoolStatus, NetworkMode, Runtime};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;

use crate::conditions::{status_word, transition_time};
use crate::domain::quantity::{bytes_quantity, cpu_quantity};
use crate::pool::POOL_LABEL;
use crate::pool::capacity::{PlatformCapacity, PoolSurvey};

/// The pool's nodes are published and current.
pub const READY: &str = "Ready";
/// At least one enlisted device may take work now.
pub const DEVICES_AVAILABLE: &str = "DevicesAvailable";
/// Every runtime the pool allows isolates its tasks from the devices (`process` does not).
pub const SANDBOXED: &str = "Sandboxed";

/// One published node and what its devices offer.
pub struct PublishedNode {
    pub name: String,
    pub capacity: PlatformCapacity,
}

pub fn desired_pool_status(
    pool: &DevicePool,
    nodes: &[PublishedNode],
    survey: &PoolSurvey,
    now: &Time,
) -> DevicePoolStatus {
    let mut total = PlatformCapacity::default();
    for node in nodes {
        total.add(&node.capacity);
    }
    let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    let generation = pool.metadata.generation;
    let previous = pool
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let condition = |type_: &str, ok: bool, reason: &str, message: String| {
        let status = status_word(ok);
        let prev = previous
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| (c.status.as_str(), Some(&c.last_transition_time)));
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            observed_generation: generation,
            last_transition_time: transition_time(prev, status, now),
        }
    };
    let devices = if total.devices == 0 {
        condition(
            DEVICES_AVAILABLE,
            false,
            "NoDevicesEnlisted",
            format!(
                "no device has joined pool {} yet; its nodes accept no pods until one does (devices join with `darkcore-agent join`)",
                pool.name_any()
            ),
        )
    } else if total.ready_devices == 0 {
        condition(
            DEVICES_AVAILABLE,
            false,
            "NoDevicesReady",
            format!(
                "{} device(s) enlisted but none may take work now",
                total.devices
            ),
        )
    } else {
        condition(
            DEVICES_AVAILABLE,
            true,
            "DevicesReady",
            format!(
                "{} of {} device(s) ready",
                total.ready_devices, total.devices
            ),
        )
    };
    let sandboxed = if pool.spec.runtimes.contains(&Runtime::Process) {
        condition(
            SANDBOXED,
            false,
            "ProcessRuntimeAllowed",
            "spec.runtimes allows process: its tasks run unsandboxed as the agent's user and can read and change what that user can on the device (the owner's files, the device's identity); for trusted fleets only".into(),
        )
    } else if pool.spec.network == NetworkMode::Host {
        condition(
            SANDBOXED,
            false,
            "HostNetworkAllowed",
            "spec.network is host: on devices whose owner allows host too, containers share the device's network and reach its loopback services and LAN; for trusted fleets only".into(),
        )
    } else {
        condition(
            SANDBOXED,
            true,
            "SandboxedRuntimesOnly",
            format!(
                "tasks run only in sandboxed runtimes: {}; network {}",
                pool.spec
                    .runtimes
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                pool.spec.network.as_str()
            ),
        )
    };
    DevicePoolStatus {
        replicas: total.devices as i32,
        ready_devices: total.ready_devices as i32,
        online_devices: survey.online as i32,
        busy_devices: survey.busy as i32,
        unavailable_devices: (total.devices - total.ready_devices) as i32,
        cores: Some(Quantity(cpu_quantity(total.cpu_millis))),
        memory: Some(Quantity(bytes_quantity(total.memory_bytes))),
        selector: Some(format!("{POOL_LABEL}={}", pool.name_any())),
        conditions: vec![
            condition(
                READY,
                true,
                "NodesPublished",
                format!("published {}", names.join(", ")),
            ),
            devices,
            sandboxed,
        ],
        nodes: names,
        observed_generation: generation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use darkcore_crds::DevicePoolSpec;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(1_800_000_000 + secs).unwrap())
    }

    fn pool() -> DevicePool {
        let mut pool = DevicePool::new("lab", DevicePoolSpec::default());
        pool.metadata.generation = Some(2);
        pool
    }

    fn empty_node() -> PublishedNode {
        PublishedNode {
            name: "darkcore-lab-linux-amd64".into(),
            capacity: PlatformCapacity::default(),
        }
    }

    #[test]
    fn a_pool_that_allows_process_says_it_is_not_sandboxed() {
        let sandboxed = |pool: &DevicePool| {
            let status = desired_pool_status(pool, &[empty_node()], &PoolSurvey::default(), &at(0));
            let condition = status
                .conditions
                .into_iter()
                .find(|c| c.type_ == SANDBOXED)
                .unwrap();
            (condition.status, condition.reason)
        };
        assert_eq!(
            sandboxed(&pool()),
            ("True".to_string(), "SandboxedRuntimesOnly".to_string())
        );
        let mut trusted = pool();
        trusted.spec.runtimes = vec![Runtime::Process, Runtime::Wasm];
        assert_eq!(
            sandboxed(&trusted),
            ("False".to_string(), "ProcessRuntimeAllowed".to_string())
        );
        let mut on_the_lan = pool();
        on_the_lan.spec.network = NetworkMode::Host;
        assert_eq!(
            sandboxed(&on_the_lan),
            ("False".to_string(), "HostNetworkAllowed".to_string())
        );
    }

    #[test]
    fn a_pool_without_devices_is_published_with_nothing_to_offer() {
        let status = desired_pool_status(&pool(), &[empty_node()], &PoolSurvey::default(), &at(0));
        assert_eq!((status.replicas, status.ready_devices), (0, 0));
        assert_eq!(status.cores, Some(Quantity("0".into())));
        assert_eq!(status.selector.as_deref(), Some("darkcore.io/pool=lab"));
        assert_eq!(status.nodes, ["darkcore-lab-linux-amd64"]);
        assert_eq!(status.observed_generation, Some(2));
        let devices = status
            .conditions
            .iter()
            .find(|c| c.type_ == DEVICES_AVAILABLE)
            .unwrap();
        assert_eq!(
            (devices.status.as_str(), devices.reason.as_str()),
            ("False", "NoDevicesEnlisted")
        );
    }

    #[test]
    fn recomputing_an_unchanged_pool_gives_the_same_status() {
        let mut p = pool();
        p.status = Some(desired_pool_status(
            &p,
            &[empty_node()],
            &PoolSurvey::default(),
            &at(0),
        ));
        assert_eq!(
            Some(desired_pool_status(
                &p,
                &[empty_node()],
                &PoolSurvey::default(),
                &at(90)
            )),
            p.status
        );
    }

    #[test]
    fn capacity_sums_over_nodes() {
        let node = |cpu| PublishedNode {
            name: "n".into(),
            capacity: PlatformCapacity {
                devices: 1,
                ready_devices: 1,
                cpu_millis: cpu,
                memory_bytes: 1 << 30,
                ephemeral_storage_bytes: 0,
                pods: 4,
            },
        };
        let status = desired_pool_status(
            &pool(),
            &[node(2000), node(2500)],
            &PoolSurvey::default(),
            &at(0),
        );
        assert_eq!(status.cores, Some(Quantity("4500m".into())));
        assert_eq!(status.memory, Some(Quantity("2Gi".into())));
        assert_eq!(status.replicas, 2);
    }
}
