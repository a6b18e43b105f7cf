//! What a pool's devices offer, per platform. Devices join in a later issue; until then every
//! platform of a pool offers nothing, and its node says so.

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
        self.devices += other.devices;
        self.ready_devices += other.ready_devices;
        self.cpu_millis += other.cpu_millis;
        self.memory_bytes += other.memory_bytes;
        self.ephemeral_storage_bytes += other.ephemeral_storage_bytes;
        self.pods += other.pods;
    }
}

/// Where the operator learns what devices offer. The device gateway will implement this;
/// for now no device is ever enlisted.
pub trait DeviceInventory: Send + Sync {
    fn capacity(&self, pool: &str, platform: Platform) -> PlatformCapacity;
}

/// The inventory before any device can join: every platform is empty.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoDevices;

impl DeviceInventory for NoDevices {
    fn capacity(&self, _pool: &str, _platform: Platform) -> PlatformCapacity {
        PlatformCapacity::default()
    }
}

/// Kubernetes quantity text for CPU millicores: whole cores when exact, else `NNNm`.
pub fn cpu_quantity(millis: u64) -> String {
    if millis.is_multiple_of(1000) {
        (millis / 1000).to_string()
    } else {
        format!("{millis}m")
    }
}

/// Kubernetes quantity text for bytes, in the largest binary unit that divides it exactly.
pub fn bytes_quantity(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("Ti", 1 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ];
    if bytes == 0 {
        return "0".into();
    }
    for (suffix, size) in UNITS {
        if bytes.is_multiple_of(size) {
            return format!("{}{suffix}", bytes / size);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_quantity_prefers_whole_cores() {
        assert_eq!(cpu_quantity(0), "0");
        assert_eq!(cpu_quantity(4000), "4");
        assert_eq!(cpu_quantity(1500), "1500m");
    }

    #[test]
    fn bytes_quantity_uses_the_largest_exact_unit() {
        assert_eq!(bytes_quantity(0), "0");
        assert_eq!(bytes_quantity(16 << 30), "16Gi");
        assert_eq!(bytes_quantity(1536 << 20), "1536Mi");
        assert_eq!(bytes_quantity(1000), "1000");
    }

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
