//! darkcore's custom resources as Rust types, and the CRD YAML generated from them.
//! The YAML in `crds/generated/` is committed; a test fails when it drifts from these types.
#![deny(rust_2018_idioms)]

pub mod device_pool;
pub mod device_reputation;
pub mod generate;
pub mod pool_usage;

pub use device_pool::{
    AdaptiveReplication, Arch, CreditPrices, DevicePool, DevicePoolSpec, DevicePoolStatus,
    DeviceSelector, Homogeneous, NetworkMode, NodeTemplate, Os, PoolTaint, Runtime, TaintEffect,
    ValidationPolicy, WhenCutOff,
};
pub use device_reputation::{DeviceRecord, DeviceReputation, DeviceReputationSpec, Quarantine};
pub use generate::{Error, crd_yaml};
pub use pool_usage::{Amounts, Credit, DeviceUsage, PoolUsage, PoolUsageSpec};

/// The API group of every darkcore resource.
pub const GROUP: &str = "darkcore.io";
