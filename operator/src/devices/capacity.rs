//! What a pool's enlisted devices add up to on each platform: the numbers its virtual nodes
//! publish as capacity. Only online devices whose owner allows work now count.

use std::collections::BTreeMap;

use crate::devices::Device;
use crate::pool::capacity::PlatformCapacity;

/// The kubelet's default pod limit; a device never takes more pods than this.
pub const MAX_PODS_PER_DEVICE: u32 = 110;
/// The smallest CPU share a pod is counted at when deciding how many pods a device takes.
pub const MIN_MILLICORES_PER_POD: u32 = 100;

/// Sums `enlisted` devices per (os, arch) as the agents name them.
pub fn by_platform<'a>(
    enlisted: impl IntoIterator<Item = &'a Device>,
) -> BTreeMap<(String, String), PlatformCapacity> {
    let mut totals: BTreeMap<(String, String), PlatformCapacity> = BTreeMap::new();
    for device in enlisted {
        let key = (
            device.capabilities.os.clone(),
            device.capabilities.arch.clone(),
        );
        let total = totals.entry(key).or_default();
        total.add(&device_capacity(device));
    }
    totals
}

/// One device's contribution: it counts as enlisted while online, and offers resources only
/// while its owner allows work.
pub fn device_capacity(device: &Device) -> PlatformCapacity {
    if !device.online {
        return PlatformCapacity::default();
    }
    let mut capacity = PlatformCapacity {
        devices: 1,
        ..Default::default()
    };
    if device.available {
        let offer = &device.offer;
        capacity.ready_devices = 1;
        capacity.cpu_millis = u64::from(offer.millicores);
        capacity.memory_bytes = offer.memory_bytes;
        capacity.ephemeral_storage_bytes = offer.disk_bytes;
        capacity.pods = (offer.millicores / MIN_MILLICORES_PER_POD).clamp(1, MAX_PODS_PER_DEVICE);
    }
    capacity
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::test_device;

    fn device(arch: &str, millicores: u32, online: bool, available: bool) -> Device {
        let mut device = test_device(&format!("{arch}-{millicores}"), arch, 8, 16);
        device.offer.millicores = millicores;
        device.offer.memory_bytes = 4 << 30;
        Device {
            online,
            available,
            ..device
        }
    }

    #[test]
    fn three_devices_sum_to_the_node_capacity() {
        let devices = [
            device("amd64", 2000, true, true),
            device("amd64", 4000, true, true),
            device("amd64", 1000, true, true),
        ];
        let totals = by_platform(&devices);
        let linux_amd64 = &totals[&("linux".to_string(), "amd64".to_string())];
        assert_eq!(linux_amd64.cpu_millis, 7000);
        assert_eq!(linux_amd64.memory_bytes, 12 << 30);
        assert_eq!((linux_amd64.devices, linux_amd64.ready_devices), (3, 3));
        assert_eq!(linux_amd64.pods, 20 + 40 + 10);
    }

    #[test]
    fn platforms_are_summed_apart() {
        let totals = by_platform(&[
            device("amd64", 2000, true, true),
            device("arm64", 4000, true, true),
        ]);
        assert_eq!(totals.len(), 2);
        assert_eq!(
            totals[&("linux".to_string(), "arm64".to_string())].cpu_millis,
            4000
        );
    }

    #[test]
    fn a_busy_owner_keeps_the_device_enlisted_but_offering_nothing() {
        let c = device_capacity(&device("amd64", 2000, true, false));
        assert_eq!(
            (c.devices, c.ready_devices, c.cpu_millis, c.pods),
            (1, 0, 0, 0)
        );
    }

    #[test]
    fn an_offline_device_counts_for_nothing() {
        assert_eq!(
            device_capacity(&device("amd64", 2000, false, true)),
            PlatformCapacity::default()
        );
    }

    #[test]
    fn pods_per_device_are_bounded() {
        assert_eq!(device_capacity(&device("amd64", 50, true, true)).pods, 1);
        assert_eq!(
            device_capacity(&device("amd64", 64_000, true, true)).pods,
            MAX_PODS_PER_DEVICE
        );
    }
}
