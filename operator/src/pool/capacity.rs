//! What a pool's devices offer, per platform, and the interface through which the pool
//! controller asks the device registry for it.

use std::collections::BTreeMap;

use darkcore_crds::DevicePool;

use crate::pool::node::Platform;

/// Resources offered on one platform of a pool by the devices enlisted there.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlatformCapacity {
    /// Devices enlisted on this platform.
    pub devices: u32,
    /// Enlisted devices whose owner lets them take work now.
    pub ready_devices: u32,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub ephemeral_storage_bytes: u64,
    /// Pods the ready devices accept at once.
    pub pods: u32,
}

impl PlatformCapacity {
    pub fn add(&mut self, other: &PlatformCapacity) {
        self.devices = self.devices.saturating_add(other.devices);
        self.ready_devices = self.ready_devices.saturating_add(other.ready_devices);
        self.cpu_millis = self.cpu_millis.saturating_add(other.cpu_millis);
        self.memory_bytes = self.memory_bytes.saturating_add(other.memory_bytes);
        self.ephemeral_storage_bytes = self
            .ephemeral_storage_bytes
            .saturating_add(other.ephemeral_storage_bytes);
        self.pods = self.pods.saturating_add(other.pods);
    }
}

/// What a pool's devices add up to now: capacity per (os, arch) as agents name them, and
/// counts for the pool's status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolSurvey {
    pub platforms: BTreeMap<(String, String), PlatformCapacity>,
    /// Devices of the pool whose agent is connected, enlisted or not.
    pub online: u32,
    /// Enlisted devices running at least one task.
    pub busy: u32,
}

impl PoolSurvey {
    /// What the enlisted devices of one platform offer (nothing when none is there).
    pub fn capacity(&self, platform: Platform) -> PlatformCapacity {
        self.platforms
            .get(&(
                platform.os.as_str().to_string(),
                platform.arch.as_str().to_string(),
            ))
            .cloned()
            .unwrap_or_default()
    }
}

/// Something that happened to a device of a pool, reported on the pool as an Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceChange {
    pub kind: ChangeKind,
    pub device: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ChangeKind {
    /// Its agent connected (first time, or back after being lost).
    Joined,
    /// Its agent said nothing for longer than the pool's `deviceLostAfterSeconds`.
    Lost,
    /// `darkcore-operator device revoke` shut it out for good.
    Revoked,
    /// It claims more than the pool's deviceLimits, or than its own hardware: not enlisted.
    Implausible,
    /// Its results disagreed with validated ones too often: not enlisted.
    Quarantined,
}

/// Where the pool controller learns about devices: the device registry, fed by the gateway.
pub trait DeviceInventory: Send + Sync {
    /// Enlists devices for `pool` under its spec and reports what they offer.
    fn survey(&self, pool: &DevicePool) -> PoolSurvey;
    /// Joins, departures and revocations in `pool` since the last call, for its Events.
    fn take_changes(&self, pool: &str) -> Vec<DeviceChange>;
}

/// An inventory without devices: every platform is empty. For tests of the pool logic.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoDevices;

impl DeviceInventory for NoDevices {
    fn survey(&self, _pool: &DevicePool) -> PoolSurvey {
        PoolSurvey::default()
    }
    fn take_changes(&self, _pool: &str) -> Vec<DeviceChange> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacities_add_up() {
        let mut total = PlatformCapacity::default();
        let one = PlatformCapacity {
            devices: 1,
            ready_devices: 1,
            cpu_millis: 2000,
            memory_bytes: 1 << 30,
            ephemeral_storage_bytes: 0,
            pods: 8,
        };
        total.add(&one);
        total.add(&one);
        assert_eq!(total.cpu_millis, 4000);
        assert_eq!(total.pods, 16);
        assert_eq!(total.devices, 2);
    }
}
