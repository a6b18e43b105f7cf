//! Whether a device may join a pool: its selector (os, arch, cores, memory, labels) and a
//! runtime in common. A refusal names the first rule the device fails, for people to read.

use darkcore_crds::DevicePoolSpec;
use darkcore_proto::agent::v1::Runtime as WireRuntime;

use crate::devices::Device;
use crate::domain::quantity::parse_memory;

pub fn check(spec: &DevicePoolSpec, device: &Device) -> Result<(), String> {
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
        d.capabilities.cores = 2;
        assert!(check(&spec, &d).unwrap_err().contains("at least 4"));
        d.capabilities.cores = 4;
        d.capabilities.memory_bytes = 4 << 30;
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
