//! What the operator knows about devices, and the pure rules over it: which devices a pool may
//! enlist (`eligibility`), which it does enlist under `spec.replicas` (`enlist`), and what the
//! enlisted ones add up to on each platform's node (`capacity`).
//!
//! Device presence is soft state: agents re-establish it when they reconnect, so none of this
//! is written to the Kubernetes API per heartbeat.

pub mod capacity;
pub mod eligibility;
pub mod enlist;
pub mod listing;
pub mod registry;

use std::collections::BTreeMap;

use darkcore_proto::agent::v1::{Capabilities, Offer};

/// One device as the operator sees it through its agent's stream.
#[derive(Clone, Debug, PartialEq)]
pub struct Device {
    pub id: String,
    pub capabilities: Capabilities,
    pub labels: BTreeMap<String, String>,
    /// Whether its agent is connected and heartbeating within the pool's threshold.
    pub online: bool,
    /// Whether the owner's policy lets it take work now, and what it offers then.
    pub available: bool,
    pub offer: Offer,
}

/// A device for tests: linux, online, available, offering all its cores and memory to `oci`.
#[cfg(test)]
pub(crate) fn test_device(id: &str, arch: &str, cores: u32, memory_gib: u64) -> Device {
    use darkcore_proto::agent::v1::Runtime;
    Device {
        id: id.into(),
        capabilities: Capabilities {
            os: "linux".into(),
            arch: arch.into(),
            cores,
            memory_bytes: memory_gib << 30,
            ..Default::default()
        },
        labels: BTreeMap::new(),
        online: true,
        available: true,
        offer: Offer {
            millicores: cores * 1000,
            memory_bytes: memory_gib << 30,
            disk_bytes: 10 << 30,
            runtimes: vec![Runtime::Oci as i32],
        },
    }
}
