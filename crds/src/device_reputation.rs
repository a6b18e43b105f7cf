//! `DeviceReputation`: how far one pool's devices are trusted, for one shard of its devices.
//! The operator writes it as results are judged by quorum; people read it with `kubectl get`.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The judged results of one pool's devices whose id hashes to `shard` (of
/// [`crate::pool_usage::SHARDS`], as usage is spread: about 1,600 devices an object at 100,000).
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "darkcore.io",
    version = "v1alpha1",
    kind = "DeviceReputation",
    plural = "devicereputations",
    singular = "devicereputation",
    category = "darkcore",
    derive = "PartialEq",
    doc = "How far one DevicePool's devices are trusted: each device's error rate and judged results, for the devices of one shard. Written by darkcore-operator as results are validated by quorum; read with `darkcore-operator devices`.",
    printcolumn(name = "Pool", type_ = "string", json_path = ".spec.pool"),
    printcolumn(name = "Shard", type_ = "integer", json_path = ".spec.shard"),
    printcolumn(name = "Devices", type_ = "integer", json_path = ".spec.deviceCount"),
    printcolumn(
        name = "Quarantined",
        type_ = "integer",
        json_path = ".spec.quarantinedCount"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DeviceReputationSpec {
    pub pool: String,
    pub shard: u32,
    #[serde(default)]
    pub device_count: u32,
    #[serde(default)]
    pub quarantined_count: u32,
    /// By device id.
    #[serde(default)]
    pub devices: BTreeMap<String, DeviceRecord>,
}

/// One device's judged results.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRecord {
    /// Its error rate in parts per million (an integer, as API conventions ask): 100000 is
    /// BOINC's starting 0.1.
    pub error_rate_ppm: u32,
    /// Its results that agreed with a validated one.
    #[serde(default)]
    pub validated: u64,
    /// Its results that disagreed with a validated one.
    #[serde(default)]
    pub invalid: u64,
    /// Set once its error rate passed the pool's quarantine threshold: it is not enlisted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantined: Option<Quarantine>,
    /// Milliseconds it was connected, of `observedMilliseconds` the operator watched it, each
    /// stretch halved in weight every day: its reliability is their ratio.
    #[serde(default)]
    pub online_milliseconds: u64,
    #[serde(default)]
    pub observed_milliseconds: u64,
}

/// Why and since when a device is quarantined.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Quarantine {
    /// RFC 3339.
    pub since: String,
    pub reason: String,
}
