//! The seccomp filter every `oci` container gets (pure data for the runtime spec's
//! `linux.seccomp`): the calls Docker's and containerd's default profiles refuse a container
//! without privileges, refused with EPERM. An owner cannot loosen it.
//!
//! It lists what is refused rather than what is allowed: a new kernel call is allowed until
//! it is listed here. That keeps every image working that the default profiles let run.

use serde_json::{Value, json};

/// Refused outright: kernel keyrings, BPF and perf, mounts and namespaces, tracing other
/// processes, kernel modules and kexec, the clock, swap and reboot, file handles that bypass
/// path checks, userfaultfd and io_uring (the source of many container escapes).
const REFUSED: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "init_module",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "mount_setattr",
    "move_mount",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pidfd_getfd",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "query_module",
    "quotactl",
    "quotactl_fd",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "stime",
    "swapoff",
    "swapon",
    "syslog",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "vhangup",
];

/// The namespace flags of clone(2): a container makes no namespaces of its own.
const CLONE_NAMESPACES: &[u64] = &[
    0x0002_0000, // CLONE_NEWNS
    0x0200_0000, // CLONE_NEWCGROUP
    0x0400_0000, // CLONE_NEWUTS
    0x0800_0000, // CLONE_NEWIPC
    0x1000_0000, // CLONE_NEWUSER
    0x2000_0000, // CLONE_NEWPID
    0x4000_0000, // CLONE_NEWNET
];

const EPERM: u32 = 1;
const ENOSYS: u32 = 38;

/// The architectures whose calls the filter covers on this device: the native one and the
/// 32-bit ABIs it can also run, so a container cannot step around the filter through them.
fn architectures() -> &'static [&'static str] {
    match std::env::consts::ARCH {
        "x86_64" => &["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "aarch64" => &["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
        "arm" => &["SCMP_ARCH_ARM"],
        "x86" => &["SCMP_ARCH_X86"],
        "riscv64" => &["SCMP_ARCH_RISCV64"],
        "powerpc64" => &["SCMP_ARCH_PPC64LE"],
        "s390x" => &["SCMP_ARCH_S390X", "SCMP_ARCH_S390"],
        _ => &[],
    }
}

/// `linux.seccomp` for the runtime spec.
pub fn profile() -> Value {
    let mut syscalls = vec![
        json!({ "names": REFUSED, "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM }),
        // clone3 passes its flags in memory, where a filter cannot read them: ENOSYS makes
        // the C library fall back to clone, whose flags it can (as the default profiles do).
        json!({ "names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS }),
    ];
    for flag in CLONE_NAMESPACES {
        syscalls.push(json!({
            "names": ["clone"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": EPERM,
            "args": [{ "index": clone_flags_arg(), "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ" }],
        }));
    }
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": architectures(),
        "syscalls": syscalls,
    })
}

/// Which argument of clone(2) holds the flags: the second on s390, the first elsewhere.
fn clone_flags_arg() -> u32 {
    if std::env::consts::ARCH == "s390x" {
        1
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_profile_refuses_what_the_default_profiles_refuse() {
        let profile = profile();
        assert_eq!(profile["defaultAction"], "SCMP_ACT_ALLOW");
        let refused: Vec<&str> = profile["syscalls"][0]["names"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap())
            .collect();
        for call in [
            "keyctl",
            "bpf",
            "mount",
            "unshare",
            "setns",
            "ptrace",
            "init_module",
            "kexec_load",
            "clock_settime",
            "userfaultfd",
            "open_by_handle_at",
            "io_uring_setup",
        ] {
            assert!(refused.contains(&call), "{call}");
        }
        let clone_rules = profile["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["names"][0] == "clone")
            .count();
        assert_eq!(clone_rules, CLONE_NAMESPACES.len());
        let mut sorted = REFUSED.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted, REFUSED, "kept sorted and without repeats");
        if std::env::consts::ARCH == "x86_64" {
            assert_eq!(
                profile["architectures"][1], "SCMP_ARCH_X86",
                "the 32-bit ABI too"
            );
        }
    }
}
