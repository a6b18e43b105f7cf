//! `PoolUsage`: what a pool's devices gave on one day (UTC), for one shard of its devices.
//! The operator writes it from the devices' usage records; people read it with `kubectl get`.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Devices of a pool are spread over this many objects per day (by a hash of their id), so
/// one object stays far below etcd's size limit at 100,000 devices (about 1,600 devices each).
pub const SHARDS: u32 = 64;

/// One pool's usage on one day, for the devices whose id hashes to `shard`.
// clippy reads the printcolumns' repeated `type_` as one attribute given twice.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "darkcore.io",
    version = "v1alpha1",
    kind = "PoolUsage",
    plural = "poolusages",
    singular = "poolusage",
    category = "darkcore",
    derive = "PartialEq",
    doc = "Usage of one DevicePool's devices on one day (UTC): CPU, memory and tasks, per device and namespace. Written by darkcore-operator; read with `darkcore-operator usage`.",
    printcolumn(name = "Pool", type_ = "string", json_path = ".spec.pool"),
    printcolumn(name = "Day", type_ = "string", json_path = ".spec.day"),
    printcolumn(
        name = "Shard",
        type_ = "integer",
        json_path = ".spec.shard",
        priority = 1
    ),
    printcolumn(name = "Devices", type_ = "integer", json_path = ".spec.deviceCount"),
    printcolumn(
        name = "Tasks",
        type_ = "integer",
        json_path = ".spec.total.tasks",
        description = "task runs that ended on their own"
    ),
    printcolumn(
        name = "Interrupted",
        type_ = "integer",
        json_path = ".spec.total.interrupted",
        priority = 1,
        description = "task runs stopped or preempted, to run elsewhere"
    ),
    printcolumn(
        name = "CPU-ms",
        type_ = "integer",
        json_path = ".spec.total.cpuMilliseconds",
        description = "CPU time used, in core-milliseconds"
    ),
    printcolumn(
        name = "Memory-MiB-s",
        type_ = "integer",
        json_path = ".spec.total.memoryMiBSeconds",
        description = "memory reserved times time held"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PoolUsageSpec {
    pub pool: String,
    /// The UTC day the runs ended on, as YYYY-MM-DD.
    pub day: String,
    pub shard: u32,
    /// Devices with usage in this object.
    #[serde(default)]
    pub device_count: u32,
    /// The sum over this object's devices and namespaces.
    #[serde(default)]
    pub total: Amounts,
    /// Per device: its amounts by namespace, and the highest record it has applied here.
    #[serde(default)]
    pub devices: BTreeMap<String, DeviceUsage>,
}

/// One device's usage in one object.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceUsage {
    /// The device's records up to this sequence are counted here; a record sent again is not
    /// counted twice.
    pub applied_sequence: u64,
    pub namespaces: BTreeMap<String, Amounts>,
    /// Attempts lost with the device that the operator charged here, by task id, with when
    /// each ended (Unix ms): a charge made again after an operator restart counts once.
    /// Kept two hours.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub lost_attempts: BTreeMap<String, i64>,
    /// The device's owner, as its certificate names it (statements are asked for by owner).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Its checked attempts' usage, by how their results were judged.
    #[serde(default, skip_serializing_if = "Credit::is_empty")]
    pub credit: Credit,
}

/// A device's checked attempts (pods that asked for a quorum) by how their results were
/// judged. Only validated and unverified results earn credit; the rest of the device's usage
/// (unchecked pods, interrupted runs) earns none.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Credit {
    /// Results a quorum of devices agreed with.
    #[serde(default)]
    pub validated: Amounts,
    /// A trusted device's results, accepted alone (but for spot checks).
    #[serde(default)]
    pub unverified: Amounts,
    /// Results that disagreed with the quorum, or reached none.
    #[serde(default)]
    pub rejected: Amounts,
    /// Results not judged yet, by task id.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pending: BTreeMap<String, Amounts>,
}

impl Credit {
    pub fn is_empty(&self) -> bool {
        *self == Credit::default()
    }
}

/// Counted amounts. Integers, so sums are exact.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Amounts {
    /// Task runs that ended on their own (Succeeded or Failed).
    #[serde(default)]
    pub tasks: u64,
    /// Task runs stopped or preempted here, which ran again elsewhere.
    #[serde(default)]
    pub interrupted: u64,
    /// CPU time used, in core-milliseconds.
    #[serde(default)]
    pub cpu_milliseconds: u64,
    /// Memory reserved (the pods' requests) times the seconds it was held, in MiB-seconds.
    #[serde(default, rename = "memoryMiBSeconds")]
    pub memory_mib_seconds: u64,
}

impl Amounts {
    /// Adds `other`, saturating: a sum stops at the largest amount rather than wrapping.
    pub fn add(&mut self, other: &Amounts) {
        self.tasks = self.tasks.saturating_add(other.tasks);
        self.interrupted = self.interrupted.saturating_add(other.interrupted);
        self.cpu_milliseconds = self.cpu_milliseconds.saturating_add(other.cpu_milliseconds);
        self.memory_mib_seconds = self
            .memory_mib_seconds
            .saturating_add(other.memory_mib_seconds);
    }

    /// What is left of `self` after `other`, each amount stopping at zero.
    pub fn minus(&self, other: &Amounts) -> Amounts {
        Amounts {
            tasks: self.tasks.saturating_sub(other.tasks),
            interrupted: self.interrupted.saturating_sub(other.interrupted),
            cpu_milliseconds: self.cpu_milliseconds.saturating_sub(other.cpu_milliseconds),
            memory_mib_seconds: self
                .memory_mib_seconds
                .saturating_sub(other.memory_mib_seconds),
        }
    }

    /// Core-seconds, for people.
    pub fn core_seconds(&self) -> f64 {
        self.cpu_milliseconds as f64 / 1000.0
    }

    /// GiB-seconds, for people.
    pub fn memory_gib_seconds(&self) -> f64 {
        self.memory_mib_seconds as f64 / 1024.0
    }
}
