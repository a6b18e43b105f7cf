//! What an oci task can reach in each network mode: the device's loopback services, its own
//! addresses, a private LAN (a network namespace this test makes), and a public address (routed
//! by this test into that same namespace, so no packet leaves the machine).

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use darkcore_crds::{DevicePoolSpec, Runtime};
use kube::api::{Patch, PatchParams};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use crate::harness::poll_until;
use crate::pods::Bench;

/// The test's LAN: a network namespace behind a veth pair, serving "reached" on
/// [`LAN_PORT`] at a private address and at a public one routed to it.
struct Lan {
    name: String,
    host_side: String,
    server: Child,
}

const LAN_HOST: &str = "10.213.0.1";
const LAN_PRIVATE: &str = "10.213.0.2";
/// TEST-NET-2, routed by this test into its namespace: public to the task's filter.
const LAN_PUBLIC: &str = "198.51.100.2";
const LAN_PORT: u16 = 18090;

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().unwrap();
    assert!(status.success(), "ip {args:?}: {status}");
}

impl Lan {
    fn start() -> Lan {
        let tag = std::process::id() % 100_000;
        let mut lan = Lan {
            name: format!("dc-lan-{tag}"),
            host_side: format!("dcl{tag}h"),
            server: Command::new("true").spawn().unwrap(),
        };
        let peer = format!("dcl{tag}p");
        ip(&["netns", "add", &lan.name]);
        ip(&[
            "link",
            "add",
            &lan.host_side,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            &lan.name,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{LAN_HOST}/30"),
            "dev",
            &lan.host_side,
        ]);
        ip(&["link", "set", &lan.host_side, "up"]);
        for address in [format!("{LAN_PRIVATE}/30"), format!("{LAN_PUBLIC}/32")] {
            ip(&["-n", &lan.name, "addr", "add", &address, "dev", &peer]);
        }
        ip(&["-n", &lan.name, "link", "set", &peer, "up"]);
        ip(&["-n", &lan.name, "link", "set", "lo", "up"]);
        ip(&[
            "route",
            "add",
            &format!("{LAN_PUBLIC}/32"),
            "via",
            LAN_PRIVATE,
            "dev",
            &lan.host_side,
        ]);
        // The public address must go into the namespace, never out of the machine.
        let route = Command::new("ip")
            .args(["route", "get", LAN_PUBLIC])
            .output()
            .unwrap();
        let route = String::from_utf8_lossy(&route.stdout);
        assert!(
            route.contains(&format!("dev {}", lan.host_side)),
            "{LAN_PUBLIC} is routed to the test's namespace: {route}"
        );
        lan.server = Command::new("ip")
            .args(["netns", "exec", &lan.name, "busybox", "nc", "-ll", "-p"])
            .arg(LAN_PORT.to_string())
            .args(["-e", "echo", "reached"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        lan
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip")
            .args(["route", "del", &format!("{LAN_PUBLIC}/32")])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_side])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A TCP server on `address` that answers "reached" to every connection; its port.
async fn serve(address: &str) -> u16 {
    let listener = TcpListener::bind(address).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream.write_all(b"reached\n").await;
        }
    });
    port
}

/// Whether this machine reaches `address:port` and is told "reached" (the test's controls).
async fn host_reaches(address: &str, port: u16) -> Result<(), String> {
    use tokio::io::AsyncReadExt;
    let mut stream = tokio::net::TcpStream::connect((address, port))
        .await
        .map_err(|e| e.to_string())?;
    let mut said = String::new();
    stream
        .read_to_string(&mut said)
        .await
        .map_err(|e| e.to_string())?;
    if said.contains("reached") {
        Ok(())
    } else {
        Err(said)
    }
}

/// This machine's first global IPv4 address other than the test LAN's.
fn device_address() -> String {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .nth(3)?
                .split('/')
                .next()
                .map(str::to_string)
        })
        .find(|a| a != LAN_HOST)
        .expect("a global IPv4 address on this machine")
}

/// The probe a pod runs: `REACHED t` or `BLOCKED t` for each target, then whether its own
/// loopback works and whether DNS answers.
fn probe_script(targets: &[(String, u16)]) -> String {
    let mut script = String::from(
        "reach() { nc -w 3 $1 $2 </dev/null 2>/dev/null | grep -q reached; }\n\
         probe() { if reach $1 $2; then echo \"REACHED $1:$2\"; else echo \"BLOCKED $1:$2\"; fi; }\n",
    );
    for (address, port) in targets {
        script.push_str(&format!("probe {address} {port}\n"));
    }
    script.push_str(
        "nc -ll -p 7777 -e echo reached &\n\
         for i in $(seq 50); do reach 127.0.0.1 7777 && echo SELF-LOOPBACK && break; sleep 0.1; done\n\
         nslookup darkcore.invalid 2>&1 | grep -q NXDOMAIN && echo DNS-ANSWERED\n\
         echo tried\n",
    );
    script
}

/// Runs the probe in a new pod `name` and returns what it found: target to REACHED or
/// BLOCKED, plus SELF-LOOPBACK and DNS-ANSWERED when they held.
async fn probe(
    bench: &Bench,
    image: &str,
    name: &str,
    targets: &[(String, u16)],
) -> BTreeMap<String, &'static str> {
    let container = serde_json::json!({
        "image": image, "command": ["sh", "-c", probe_script(targets)],
    });
    bench
        .create(bench.pod_in("darkcore-oci", name, container, "Never"))
        .await;
    bench
        .phase_is(name, "Succeeded", Duration::from_secs(120))
        .await;
    let logs = bench
        .logs_show(name, "tried", Duration::from_secs(10))
        .await;
    eprintln!("{name}:\n{logs}");
    let mut found = BTreeMap::new();
    for line in logs.lines() {
        match line.split_once(' ') {
            Some(("REACHED", target)) => found.insert(target.to_string(), "REACHED"),
            Some(("BLOCKED", target)) => found.insert(target.to_string(), "BLOCKED"),
            _ if line == "SELF-LOOPBACK" || line == "DNS-ANSWERED" => {
                found.insert(line.to_string(), "yes")
            }
            _ => None,
        };
    }
    found
}

/// Sets the pool's spec.network and waits until the operator has seen it.
async fn pool_network_is(bench: &Bench, mode: &str) {
    bench
        .fx
        .pools()
        .patch(
            &bench.fx.pool,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "spec": { "network": mode } })),
        )
        .await
        .unwrap();
    poll_until(
        &format!("the operator sees network {mode}"),
        Duration::from_secs(30),
        || async {
            let status = bench.fx.pool_status().await;
            let sandboxed = status
                .conditions
                .iter()
                .find(|c| c.type_ == "Sandboxed")
                .map(|c| (c.reason.clone(), c.message.clone()))
                .unwrap_or_default();
            let seen = if mode == "host" {
                sandboxed.0 == "HostNetworkAllowed"
            } else {
                sandboxed.1.ends_with(&format!("network {mode}"))
            };
            if seen {
                Ok(())
            } else {
                Err(format!("{sandboxed:?}"))
            }
        },
    )
    .await;
}

#[tokio::test]
async fn a_task_reaches_the_internet_but_nothing_of_the_devices_own_networks() {
    let spec = DevicePoolSpec {
        runtimes: vec![Runtime::Oci],
        ..Default::default()
    };
    let mut bench = Bench::start("netmodes", 1, spec).await;
    let image = crate::hostile::busybox(&bench).await;
    let lan = Lan::start();
    let loopback_port = serve("127.0.0.1:0").await;
    let any_port = serve("0.0.0.0:0").await;
    let device = device_address();
    // The controls: this machine reaches every target, so a BLOCKED below is the task's.
    for (address, port) in [
        ("127.0.0.1", loopback_port),
        (device.as_str(), any_port),
        (LAN_PRIVATE, LAN_PORT),
        (LAN_PUBLIC, LAN_PORT),
    ] {
        poll_until(
            &format!("this machine reaches {address}:{port}"),
            Duration::from_secs(10),
            || host_reaches(address, port),
        )
        .await;
    }
    let target = |a: &str, p: u16| (a.to_string(), p);
    let key = |a: &str, p: u16| format!("{a}:{p}");
    // Every target is on this machine or in the test's namespace, so that a probe that gets
    // through (a broken sandbox, or `host` mode) never leaves the machine. slirp4netns'
    // gateway 10.0.2.2 is left out for that reason: on the host's network it is routed out.
    let targets = [
        target("127.0.0.1", loopback_port),
        target(&device, any_port),
        target(LAN_HOST, any_port),
        target(LAN_PRIVATE, LAN_PORT),
        target(LAN_PUBLIC, LAN_PORT),
    ];

    // internet, the default: public addresses and DNS, nothing of the device's.
    let found = probe(&bench, &image, "internet", &targets).await;
    assert_eq!(
        found.get(&key(LAN_PUBLIC, LAN_PORT)),
        Some(&"REACHED"),
        "{found:?}"
    );
    for (address, port) in targets.iter().filter(|(a, _)| a != LAN_PUBLIC) {
        assert_eq!(
            found.get(&key(address, *port)),
            Some(&"BLOCKED"),
            "{address}:{port}"
        );
    }
    assert_eq!(found.get("SELF-LOOPBACK"), Some(&"yes"), "{found:?}");
    assert_eq!(found.get("DNS-ANSWERED"), Some(&"yes"), "{found:?}");

    // none: the task's own loopback only.
    pool_network_is(&bench, "none").await;
    let found = probe(&bench, &image, "none", &targets).await;
    assert!(
        targets
            .iter()
            .all(|(a, p)| found.get(&key(a, *p)) == Some(&"BLOCKED")),
        "{found:?}"
    );
    assert_eq!(found.get("SELF-LOOPBACK"), Some(&"yes"), "{found:?}");
    assert_eq!(found.get("DNS-ANSWERED"), None);

    // host, asked by the pool but not allowed by the owner: narrowed to internet.
    pool_network_is(&bench, "host").await;
    let found = probe(&bench, &image, "narrowed", &targets).await;
    assert_eq!(
        found.get(&key("127.0.0.1", loopback_port)),
        Some(&"BLOCKED")
    );
    assert_eq!(found.get(&key(LAN_PRIVATE, LAN_PORT)), Some(&"BLOCKED"));
    assert_eq!(found.get(&key(LAN_PUBLIC, LAN_PORT)), Some(&"REACHED"));

    // host, allowed by both: the device's own network, loopback and LAN.
    crate::hostile::offers(&mut bench.agents[0], &[("network", "\"host\"")]).await;
    let found = probe(&bench, &image, "host", &targets).await;
    assert_eq!(
        found.get(&key("127.0.0.1", loopback_port)),
        Some(&"REACHED")
    );
    assert_eq!(found.get(&key(LAN_PRIVATE, LAN_PORT)), Some(&"REACHED"));
    // The tasks' slirp4netns left the device's named network namespaces (`ip netns`, whose
    // /run/netns is a shared mount) as they were.
    let named = Command::new("ip")
        .args(["-n", &lan.name, "link", "show", "lo"])
        .output()
        .unwrap();
    assert!(
        named.status.success(),
        "the device's namespace {} is gone: {}",
        lan.name,
        String::from_utf8_lossy(&named.stderr)
    );
    drop(lan);
    bench.finish().await;
}
