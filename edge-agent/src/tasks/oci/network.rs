//! What a task's network namespace (made in `sandbox.rs`) lets it reach: `none` has loopback
//! only; `internet` reaches public addresses through slirp4netns, behind an nftables filter
//! that refuses the device's own addresses and every loopback, private, link-local and
//! multicast range.
//!
//! Why slirp4netns: the task's packets never reach a host interface. A host process makes each
//! outbound connection on the task's behalf, so nothing is routed or NATed by the device's
//! kernel, nothing can come in, and `--disable-host-loopback` closes the gateway's way to the
//! host's 127.0.0.1. It is Podman's rootless default and runs sandboxed (its own mount
//! namespace and seccomp filter). veth plus NAT would put the task on a host bridge and lean
//! on the host's own firewall, which a home PC's owner may change at any time.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use darkcore_proto::agent::v1::Network;

use crate::policy::config::NetworkMode;

/// Where slirp4netns answers DNS inside the task's namespace (its fixed address).
pub const SLIRP_DNS: &str = "10.0.2.3";
/// How long slirp4netns may take to set up the task's interface.
const READY_WITHIN: Duration = Duration::from_secs(10);

/// IPv4 ranges a task in `internet` mode never reaches: this network, RFC 1918, CGNAT,
/// loopback, link-local (cloud metadata included), IETF protocol assignments, benchmarking,
/// multicast, reserved and broadcast.
const BLOCKED_V4: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/3",
];
/// IPv6 ranges likewise: unspecified and loopback, IPv4-mapped, ULA, link-local, multicast.
const BLOCKED_V6: &[&str] = &[
    "::/127",
    "::ffff:0:0/96",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
];

/// The mode a task gets: the narrower of its pool's (as the operator sent it) and its owner's.
/// An operator that says nothing means `internet`; a mode this agent does not know, `none`.
pub fn effective(pool: i32, owner: NetworkMode) -> NetworkMode {
    let pool = match Network::try_from(pool) {
        Ok(Network::Unspecified | Network::Internet) => NetworkMode::Internet,
        Ok(Network::Host) => NetworkMode::Host,
        Ok(Network::None) | Err(_) => NetworkMode::None,
    };
    pool.min(owner)
}

/// /etc/resolv.conf for a container in `mode`: slirp4netns' resolver, none, or the device's.
pub fn resolv_conf(mode: NetworkMode, device: &str) -> String {
    match mode {
        NetworkMode::None => String::new(),
        NetworkMode::Internet => format!("nameserver {SLIRP_DNS}\n"),
        NetworkMode::Host => device.to_string(),
    }
}

/// The nftables ruleset of an `internet` task's namespace: out to public addresses and to
/// slirp4netns' DNS only, nothing in but replies. `own` are the device's addresses, which
/// would otherwise reach every service the device listens with on all interfaces.
pub fn egress_filter(own: &[IpAddr]) -> String {
    let ranges = |blocked: &[&str], extra: Vec<String>| {
        blocked
            .iter()
            .map(|r| r.to_string())
            .chain(extra)
            .collect::<Vec<_>>()
            .join(", ")
    };
    // An interval set refuses overlapping elements: only addresses no range covers are added.
    let uncovered = |v4: bool| {
        let mut addresses: Vec<String> = own
            .iter()
            .filter(|a| a.is_ipv4() == v4 && !blocked(**a))
            .map(|a| a.to_string())
            .collect();
        addresses.sort();
        addresses.dedup();
        addresses
    };
    format!(
        "table inet darkcore {{
  set blocked4 {{ type ipv4_addr; flags interval; elements = {{ {v4} }} }}
  set blocked6 {{ type ipv6_addr; flags interval; elements = {{ {v6} }} }}
  chain output {{
    type filter hook output priority 0; policy accept;
    oif \"lo\" accept
    ip daddr {SLIRP_DNS} meta l4proto {{ tcp, udp }} th dport 53 accept
    ip daddr @blocked4 reject with icmpx type admin-prohibited
    ip6 daddr @blocked6 reject with icmpx type admin-prohibited
  }}
  chain input {{
    type filter hook input priority 0; policy drop;
    iif \"lo\" accept
    ct state established,related accept
  }}
}}
",
        v4 = ranges(BLOCKED_V4, uncovered(true)),
        v6 = ranges(BLOCKED_V6, uncovered(false)),
    )
}

/// The filter for a task on this device, whose addresses are read from /proc now.
pub(super) fn filter_for_this_device() -> String {
    let fib = std::fs::read_to_string("/proc/net/fib_trie").unwrap_or_default();
    let inet6 = std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default();
    egress_filter(&own_addresses(&fib, &inet6))
}

/// Whether `address` lies in one of the ranges `internet` mode refuses.
fn blocked(address: IpAddr) -> bool {
    let within = |range: &str| {
        let (base, bits) = range
            .split_once('/')
            .expect("ranges are written as base/bits");
        let bits: u32 = bits.parse().expect("prefix lengths are numbers");
        match (address, base.parse::<IpAddr>()) {
            (IpAddr::V4(a), Ok(IpAddr::V4(b))) => {
                let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
                u32::from(a) & mask == u32::from(b) & mask
            }
            (IpAddr::V6(a), Ok(IpAddr::V6(b))) => {
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                u128::from(a) & mask == u128::from(b) & mask
            }
            _ => false,
        }
    };
    BLOCKED_V4.iter().chain(BLOCKED_V6).any(|r| within(r))
}

/// The device's own addresses, from /proc/net/fib_trie (IPv4: each `/32 host LOCAL` leaf)
/// and /proc/net/if_inet6 (IPv6: the first field of each line, in hex).
pub fn own_addresses(fib_trie: &str, if_inet6: &str) -> Vec<IpAddr> {
    let mut addresses = Vec::new();
    let mut last: Option<Ipv4Addr> = None;
    for line in fib_trie.lines().map(str::trim) {
        if let Some(leaf) = line.strip_prefix("|-- ") {
            last = leaf.parse().ok();
        } else if line == "/32 host LOCAL"
            && let Some(address) = last
        {
            addresses.push(IpAddr::V4(address));
        }
    }
    for line in if_inet6.lines() {
        if let Some(hex) = line.split_whitespace().next()
            && let Ok(bits) = u128::from_str_radix(hex, 16)
        {
            addresses.push(IpAddr::V6(Ipv6Addr::from(bits)));
        }
    }
    addresses.sort();
    addresses.dedup();
    addresses
}

/// A running slirp4netns. It exits by itself once the agent's end of its stdin closes (its
/// `--exit-fd`), so it never outlives the agent, even one killed with SIGKILL.
pub(super) struct Slirp {
    child: Child,
    exit: Option<ChildStdin>,
}

impl Drop for Slirp {
    fn drop(&mut self) {
        self.exit.take();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Slirp {
    /// Starts slirp4netns for the namespace and waits until the task's interface is up.
    pub(super) fn start(namespace: &Path) -> Result<Slirp, String> {
        // In a mount namespace of its own whose mounts are all private: slirp4netns' sandbox
        // unmounts what it does not need, and in the device's namespace that unmount would
        // reach every peer of a shared mount. Seen: the owner's `ip netns` namespaces
        // (/run/netns is shared) vanished while a task's slirp4netns started.
        let mut child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "slirp4netns"])
            .args([
                "--configure",
                "--mtu=65520",
                "--disable-host-loopback",
                "--enable-sandbox",
                "--enable-seccomp",
                "--exit-fd=0",
                "--ready-fd=2",
                "--netns-type=path",
            ])
            .arg(namespace)
            .arg("tap0")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| missing_or("unshare", "util-linux", e))?;
        let exit = child.stdin.take();
        let mut stderr = child.stderr.take().expect("stderr is piped");
        // slirp4netns writes "1" to its ready fd (its stderr, after its own lines) once the
        // interface is configured; its stderr is drained into the agent's log after that.
        let (ready_tx, ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut said = String::new();
            let mut buffer = [0u8; 512];
            let mut ready_tx = Some(ready_tx);
            loop {
                match stderr.read(&mut buffer) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => said.push_str(&String::from_utf8_lossy(&buffer[..n])),
                }
                if ready_tx.is_some() && said.rsplit('\n').next() == Some("1") {
                    let _ = ready_tx.take().map(|tx| tx.send(Ok(())));
                    said.clear();
                }
            }
            match ready_tx {
                Some(tx) => {
                    let _ = tx.send(Err(said));
                }
                None if !said.trim().is_empty() => {
                    tracing::warn!(said = %said.trim(), "slirp4netns");
                }
                None => {}
            }
        });
        let slirp = Slirp { child, exit };
        match ready.recv_timeout(READY_WITHIN) {
            Ok(Ok(())) => Ok(slirp),
            Ok(Err(said)) => Err(format!(
                "slirp4netns could not set up the task's network: {}{}",
                said.trim(),
                install_hint(&said, "slirp4netns")
            )),
            Err(_) => {
                drop(slirp);
                Err(format!(
                    "slirp4netns did not set up the task's network within {}s",
                    READY_WITHIN.as_secs()
                ))
            }
        }
    }
}

/// Runs `argv` inside the network namespace `netns` (through util-linux's nsenter) to its
/// end, `input` on its stdin; an error names the program, its Debian `package`, and what it
/// said.
pub(super) fn inside(
    netns: &Path,
    argv: &[&str],
    input: Option<&str>,
    package: &str,
) -> Result<(), String> {
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(argv)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| missing_or("nsenter", "util-linux", e))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        let _ = stdin.write_all(text.as_bytes());
    }
    let program = argv[0];
    let output = child
        .wait_with_output()
        .map_err(|e| format!("running {program}: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&output.stderr);
    Err(format!(
        "{program} failed setting up the task's network ({}): {}{}",
        output.status,
        said.trim(),
        install_hint(&said, package)
    ))
}

/// What to install, when util-linux's wrapper said it could not execute the program.
fn install_hint(said: &str, package: &str) -> String {
    if said.contains("failed to execute") {
        format!(" (Debian: apt install {package})")
    } else {
        String::new()
    }
}

/// A spawn error, naming the Debian package to install when the program is missing.
pub(super) fn missing_or(program: &str, package: &str, error: std::io::Error) -> String {
    if error.kind() == std::io::ErrorKind::NotFound {
        format!(
            "{program} is not installed: install it (Debian: apt install {package}) to give containers a network of their own"
        )
    } else {
        format!("starting {program}: {error}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_gets_the_narrower_of_its_pools_mode_and_its_owners() {
        use NetworkMode::*;
        let pool = |n: Network| n as i32;
        assert_eq!(effective(pool(Network::Internet), Internet), Internet);
        assert_eq!(
            effective(pool(Network::Unspecified), Internet),
            Internet,
            "an older operator"
        );
        assert_eq!(
            effective(pool(Network::Host), Internet),
            Internet,
            "host needs the owner too"
        );
        assert_eq!(effective(pool(Network::Internet), Host), Internet);
        assert_eq!(effective(pool(Network::Host), Host), Host);
        assert_eq!(effective(pool(Network::Internet), None), None);
        assert_eq!(effective(pool(Network::None), Host), None);
        assert_eq!(effective(99, Host), None, "a mode this agent does not know");
    }

    #[test]
    fn the_filter_refuses_private_ranges_and_the_devices_own_addresses() {
        let own: Vec<IpAddr> = [
            "127.0.0.1",
            "192.168.1.20",
            "192.0.2.2",
            "2001:db8::7",
            "fe80::1",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        let rules = egress_filter(&own);
        for range in BLOCKED_V4.iter().chain(BLOCKED_V6) {
            assert!(rules.contains(range), "{range} is refused");
        }
        assert!(
            rules.contains("192.0.2.2"),
            "a public address of the device"
        );
        assert!(rules.contains("2001:db8::7"));
        assert!(
            !rules.contains("192.168.1.20") && !rules.contains("127.0.0.1,"),
            "covered by a range already: an interval set refuses overlaps"
        );
        assert!(rules.contains("ip daddr 10.0.2.3 meta l4proto { tcp, udp } th dport 53 accept"));
        assert!(
            rules.contains("policy drop"),
            "nothing comes in but replies"
        );
        let dns = rules.find("dport 53 accept").unwrap();
        assert!(
            dns < rules.find("@blocked4").unwrap(),
            "DNS is let through before 10/8 is refused"
        );
    }

    #[test]
    fn ranges_cover_what_they_name() {
        let is = |a: &str| blocked(a.parse().unwrap());
        for refused in [
            "10.1.2.3",
            "172.31.255.1",
            "192.168.0.1",
            "100.127.0.1",
            "169.254.169.254",
            "127.0.0.53",
            "224.0.0.251",
            "255.255.255.255",
            "fd00::1",
            "fe80::1",
            "::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(is(refused), "{refused}");
        }
        for public in [
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "198.51.100.2",
            "2001:db8::1",
        ] {
            assert!(!is(public), "{public}");
        }
    }

    #[test]
    fn the_devices_addresses_are_read_from_proc() {
        let fib = "Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        |-- 127.0.0.0
           /8 host LOCAL
        |-- 127.0.0.1
           /32 host LOCAL
     |-- 192.0.2.0
        /24 link UNICAST
     |-- 192.0.2.2
        /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 192.0.2.2
        /32 host LOCAL
";
        let inet6 = "00000000000000000000000000000001 01 80 10 80       lo
fe80000000000000000000fcfe000001 02 40 20 80     eth0
";
        let addresses: Vec<String> = own_addresses(fib, inet6)
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(
            addresses,
            ["127.0.0.1", "192.0.2.2", "::1", "fe80::fc:fe00:1"]
        );
    }

    #[test]
    fn resolv_conf_follows_the_mode() {
        let device = "nameserver 192.168.1.1\n";
        assert_eq!(resolv_conf(NetworkMode::None, device), "");
        assert_eq!(
            resolv_conf(NetworkMode::Internet, device),
            "nameserver 10.0.2.3\n"
        );
        assert_eq!(resolv_conf(NetworkMode::Host, device), device);
    }
}
