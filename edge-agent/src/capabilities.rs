//! What this device could offer before its owner's policy limits it: os, arch (named as
//! Kubernetes names them), cores and memory.

use darkcore_proto::agent::v1::{Capabilities, Runtime};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}")]
    Read {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} has no MemTotal line; cannot tell how much memory this device has")]
    NoMemTotal { path: &'static str },
}

const MEMINFO: &str = "/proc/meminfo";

/// This device's capabilities, read from the OS.
pub fn detect() -> Result<Capabilities, Error> {
    let meminfo = std::fs::read_to_string(MEMINFO).map_err(|source| Error::Read {
        path: MEMINFO,
        source,
    })?;
    Ok(Capabilities {
        os: std::env::consts::OS.to_string(),
        arch: kubernetes_arch(std::env::consts::ARCH).to_string(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        memory_bytes: mem_total_bytes(&meminfo).ok_or(Error::NoMemTotal { path: MEMINFO })?,
        runtimes: installed_runtimes(),
        // Disk is measured with the image cache, which decides where tasks' data lives.
        disk_bytes: 0,
    })
}

/// Free space for tasks on the file system holding `path` (the state dir, where images and
/// volumes go), or `None` where it cannot be read.
pub fn available_disk(path: &std::path::Path) -> Option<u64> {
    let existing = path.ancestors().find(|p| p.exists())?;
    let stat = rustix::fs::statvfs(existing).ok()?;
    stat.f_bavail.checked_mul(stat.f_frsize)
}

/// Runtimes this device can run: `process` and `wasm` (wasmtime is built in) always; `oci`
/// where runc or crun is on PATH and the agent is root.
pub fn installed_runtimes() -> Vec<i32> {
    let mut runtimes = vec![Runtime::Process as i32, Runtime::Wasm as i32];
    if crate::tasks::oci::unavailable().is_none() {
        runtimes.push(Runtime::Oci as i32);
    }
    runtimes
}

/// Rust's name for a CPU architecture, as `kubernetes.io/arch` (Go's GOARCH) spells it.
pub fn kubernetes_arch(rust_arch: &str) -> &str {
    match rust_arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// `MemTotal` from the text of /proc/meminfo, in bytes.
pub fn mem_total_bytes(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line.split_whitespace().skip(1);
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => Some(value * 1024),
        None => Some(value),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_disk_is_read_from_the_nearest_existing_directory() {
        let free = available_disk(std::path::Path::new("/tmp/darkcore-does-not-exist/state"));
        assert!(free.is_some_and(|bytes| bytes > 0));
    }

    #[test]
    fn rust_arches_map_to_kubernetes_names() {
        assert_eq!(kubernetes_arch("x86_64"), "amd64");
        assert_eq!(kubernetes_arch("aarch64"), "arm64");
        assert_eq!(kubernetes_arch("riscv64"), "riscv64");
    }

    #[test]
    fn mem_total_is_read_in_bytes() {
        let text = "MemFree:  100 kB\nMemTotal:       16318480 kB\n";
        assert_eq!(mem_total_bytes(text), Some(16318480 * 1024));
        assert_eq!(mem_total_bytes("MemFree: 1 kB\n"), None);
        assert_eq!(mem_total_bytes("MemTotal: lots kB\n"), None);
    }

    #[test]
    fn this_machine_reports_itself() {
        let caps = detect().expect("detect works on the build machine");
        assert!(caps.cores >= 1 && caps.memory_bytes > 0);
    }
}
