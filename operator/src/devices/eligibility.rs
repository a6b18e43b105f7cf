//! Whether a device may join a pool: its selector (os, arch, cores, memory, labels) and a
//! runtime in common. A refusal names the first rule the device fails, for people to read.

use darkcore_crds::DevicePoolSpec;
use darkcore_proto::agent::v1::Runtime as WireRuntime;

use crate::devices::Device;
use crate::domain::quantity::parse_memory;

/// Whether what a device claims is believable: no more than the pool's `deviceLimits`, and
/// no more than the hardware it reports. Every number here is the device's own word.
pub fn plausible(spec: &DevicePoolSpec, device: &Device) -> Result<(), String> {
    use darkcore_crds::device_pool::{DEFAULT_MAX_DEVICE_CORES, DEFAULT_MAX_DEVICE_MEMORY};
    let limits = &spec.device_limits;
    let max_cores = limits.max_cores.unwrap_or(DEFAULT_MAX_DEVICE_CORES);
    let max_memory = limits
        .max_memory
        .as_ref()
        .and_then(|q| parse_memory(&q.0))
        .unwrap_or(DEFAULT_MAX_DEVICE_MEMORY);
    let (caps, offer) = (&device.capabilities, &device.offer);
    let cores = |millis: u32| f64::from(millis) / 1000.0;
    if u64::from(offer.millicores) > u64::from(max_cores) * 1000 || caps.cores > max_cores {
        return Err(format!(
            "implausible: it claims {} cores ({} offered), more than the pool's spec.deviceLimits.maxCores ({max_cores}) allows",
            caps.cores,
            cores(offer.millicores)
        ));
    }
    if offer.memory_bytes > max_memory || caps.memory_bytes > max_memory {
        return Err(format!(
            "implausible: it claims {} MiB of memory ({} MiB offered), more than the pool's spec.deviceLimits.maxMemory ({} MiB) allows",
            caps.memory_bytes >> 20,
            offer.memory_bytes >> 20,
            max_memory >> 20
        ));
    }
    if u64::from(offer.millicores) > u64::from(caps.cores) * 1000
        || offer.memory_bytes > caps.memory_bytes
    {
        return Err(format!(
            "implausible: it offers {} cores and {} MiB, more than the {} cores and {} MiB it says it has",
            cores(offer.millicores),
            offer.memory_bytes >> 20,
            caps.cores,
            caps.memory_bytes >> 20
        ));
    }
    Ok(())
}

pub fn check(spec: &DevicePoolSpec, device: &Device) -> Result<(), String> {
    plausible(spec, device)?;
    let caps = &device.capabilities;
    if !spec.admitted_os().iter().any(|os| os.as_str() == caps.os) {
        return Err(format!(
            "its os {:?} is not one the pool admits ({})",
            caps.os,
            names(spec.admitted_os().iter().map(|o| o.as_str()))
        ));
    }
    if !spec
        .admitted_arch()
        .iter()
        .any(|arch| arch.as_str() == caps.arch)
    {
        return Err(format!(
            "its arch {:?} is not one the pool admits ({})",
            caps.arch,
            names(spec.admitted_arch().iter().map(|a| a.as_str()))
        ));
    }
    if let Some(min) = spec.selector.min_cores
        && caps.cores < min
    {
        return Err(format!(
            "it has {} cores; the pool wants at least {min}",
            caps.cores
        ));
    }
    if let Some(min) = &spec.selector.min_memory {
        let wanted = parse_memory(&min.0)
            .ok_or_else(|| format!("the pool's minMemory {:?} is not a quantity", min.0))?;
        if caps.memory_bytes < wanted {
            return Err(format!(
                "it has {} MiB of memory; the pool wants at least {}",
                caps.memory_bytes >> 20,
                min.0
            ));
        }
    }
    for (key, value) in &spec.selector.match_labels {
        if device.labels.get(key) != Some(value) {
            return Err(format!("it lacks the label {key}={value}"));
        }
    }
    let pool_runtimes: Vec<i32> = spec
        .runtimes
        .iter()
        .map(|r| wire_runtime(*r) as i32)
        .collect();
    if !device
        .offer
        .runtimes
        .iter()
        .any(|r| pool_runtimes.contains(r))
    {
        return Err(format!(
            "its owner allows none of the pool's runtimes ({})",
            names(spec.runtimes.iter().map(|r| r.as_str()))
        ));
    }
    Ok(())
}

pub fn wire_runtime(runtime: darkcore_crds::Runtime) -> WireRuntime {
    match runtime {
        darkcore_crds::Runtime::Process => WireRuntime::Process,
        darkcore_crds::Runtime::Oci => WireRuntime::Oci,
        darkcore_crds::Runtime::Wasm => WireRuntime::Wasm,
    }
}

fn names<'a>(items: impl Iterator<Item = &'a str>) -> String {
    items.collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::test_device;
    use darkcore_crds::{Arch, Os, Runtime};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn device(os: &str, arch: &str, cores: u32, memory_gib: u64) -> Device {
        let mut device = test_device("d", arch, cores, memory_gib);
        device.capabilities.os = os.into();
        device
    }

    #[test]
    fn a_device_claiming_more_than_the_limits_or_its_hardware_is_implausible() {
        let spec = DevicePoolSpec::default();
        // A claimed million cores and a petabyte: over the default limits.
        let mut liar = device("linux", "amd64", 1_000_000, 1 << 20);
        let err = check(&spec, &liar).unwrap_err();
        assert!(
            err.starts_with("implausible") && err.contains("maxCores (256)"),
            "{err}"
        );
        liar.capabilities.cores = 8;
        liar.offer.millicores = 8000;
        let err = check(&spec, &liar).unwrap_err();
        assert!(err.contains("maxMemory"), "{err}");
        // Offering more than it says it has.
        let mut inflated = device("linux", "amd64", 4, 8);
        inflated.offer.millicores = 8000;
        assert!(
            check(&spec, &inflated)
                .unwrap_err()
                .contains("more than the 4 cores")
        );
        // A pool may set its own limits.
        let mut small = DevicePoolSpec::default();
        small.device_limits.max_cores = Some(2);
        small.device_limits.max_memory = Some(Quantity("4Gi".into()));
        assert!(check(&small, &device("linux", "amd64", 4, 2)).is_err());
        assert!(check(&small, &device("linux", "amd64", 2, 8)).is_err());
        assert_eq!(check(&small, &device("linux", "amd64", 2, 4)), Ok(()));
    }

    #[test]
    fn a_default_pool_takes_linux_amd64_devices_with_oci_or_wasm() {
        assert_eq!(
            check(&DevicePoolSpec::default(), &device("linux", "amd64", 4, 8)),
            Ok(())
        );
        let err = check(&DevicePoolSpec::default(), &device("linux", "arm64", 4, 8)).unwrap_err();
        assert!(
            err.contains("arch \"arm64\"") && err.contains("amd64"),
            "{err}"
        );
    }

    #[test]
    fn the_selector_minimums_and_labels_apply() {
        let mut spec = DevicePoolSpec::default();
        spec.selector.os = vec![Os::Linux];
        spec.selector.arch = vec![Arch::Amd64, Arch::Arm64];
        spec.selector.min_cores = Some(4);
        spec.selector.min_memory = Some(Quantity("6Gi".into()));
        spec.selector
            .match_labels
            .insert("room".into(), "lab-3".into());

        let mut d = device("linux", "arm64", 4, 8);
        assert_eq!(
            check(&spec, &d).unwrap_err(),
            "it lacks the label room=lab-3"
        );
        d.labels.insert("room".into(), "lab-3".into());
        assert_eq!(check(&spec, &d), Ok(()));
        (d.capabilities.cores, d.offer.millicores) = (2, 2000);
        assert!(check(&spec, &d).unwrap_err().contains("at least 4"));
        (d.capabilities.cores, d.offer.millicores) = (4, 4000);
        (d.capabilities.memory_bytes, d.offer.memory_bytes) = (4 << 30, 4 << 30);
        assert!(check(&spec, &d).unwrap_err().contains("at least 6Gi"));
    }

    #[test]
    fn a_device_needs_a_runtime_the_pool_allows() {
        let spec = DevicePoolSpec {
            runtimes: vec![Runtime::Wasm],
            ..Default::default()
        };
        let err = check(&spec, &device("linux", "amd64", 4, 8)).unwrap_err();
        assert!(err.contains("none of the pool's runtimes (wasm)"), "{err}");
    }
}
