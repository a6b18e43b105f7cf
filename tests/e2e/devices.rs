//! Devices join and give capacity: real darkcore-agent processes on loopback, the real
//! operator and API server. Joins with good and bad tokens, capacity that follows agents and
//! owners, replicas, revocation, and agents and operators killed with SIGKILL.

use std::time::{Duration, Instant};

use darkcore_crds::{DevicePoolSpec, Runtime};
use kube::api::{Patch, PatchParams};

use crate::fleet::{self, Agent, node_cpu_is, pool_enlisted_is, token};
use crate::harness::{Operator, PoolFixture, operator_cli, poll_until};

/// How long capacity may take to follow a device change: the registry triggers a reconcile
/// within a second, and the agent checks its policy every second.
const FOLLOWS: Duration = Duration::from_secs(15);

pub fn process_pool() -> DevicePoolSpec {
    DevicePoolSpec {
        runtimes: vec![Runtime::Process],
        ..Default::default()
    }
}

/// A process pool that counts a device lost after 5 s of silence and fences its tasks after
/// 5 s: a lost device's task runs elsewhere within seconds (the fence plus its margin).
pub fn quick_loss_pool() -> DevicePoolSpec {
    DevicePoolSpec {
        device_lost_after_seconds: 5,
        fence_seconds: 5,
        ..process_pool()
    }
}

/// The value of the operator's first metric line that starts with `line_start`.
pub async fn metric(operator: &Operator, line_start: &str) -> Option<f64> {
    let (_, body) = operator.get("/metrics").await.ok()?;
    body.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn joins_accept_a_valid_token_and_refuse_used_up_expired_revoked_and_garbage_ones() {
    let fx = PoolFixture::start("join", process_pool()).await;
    let port = fx.operator.gateway_port;

    // A token admits one device unless it says otherwise.
    let created = operator_cli(&[
        "token",
        "create",
        "--pool",
        &fx.pool,
        "-n",
        "darkcore-system",
    ]);
    assert!(created.status.success());
    let once = String::from_utf8(created.stdout)
        .unwrap()
        .trim()
        .to_string();
    let first = fleet::join(port, &once, 1.0);
    assert!(first.ok, "a fresh token joins: {}", first.output);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(first.state_dir.join("device.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the private key is private");

    let again = fleet::join(port, &once, 1.0);
    assert!(!again.ok);
    assert!(
        again.output.contains("used as many times as it allows"),
        "{}",
        again.output
    );

    let short = token(&fx.pool, &["--ttl", "1s"]);
    // The token's expiry is a timestamp one second after creation; waiting past it is exact.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let expired = fleet::join(port, &short, 1.0);
    assert!(!expired.ok);
    assert!(expired.output.contains("has expired"), "{}", expired.output);

    let revoked = token(&fx.pool, &[]);
    let id = revoked.split('.').nth(1).unwrap();
    assert!(
        operator_cli(&["token", "revoke", id, "-n", "darkcore-system"])
            .status
            .success()
    );
    let refused = fleet::join(port, &revoked, 1.0);
    assert!(!refused.ok);
    assert!(
        refused.output.contains("has been revoked"),
        "{}",
        refused.output
    );

    let garbage = fleet::join(port, "dct1.not-a-token", 1.0);
    assert!(!garbage.ok);
    assert!(garbage.output.contains("malformed"), "{}", garbage.output);

    // Well-formed, right CA, wrong secret.
    let mut parts: Vec<String> = once.split('.').map(str::to_string).collect();
    parts[2] = "0".repeat(32);
    let forged = fleet::join(port, &parts.join("."), 1.0);
    assert!(!forged.ok);
    assert!(forged.output.contains("not valid"), "{}", forged.output);

    // Right secret, wrong CA pin: the agent refuses to send the token at all.
    let mut parts: Vec<String> = token(&fx.pool, &[])
        .split('.')
        .map(str::to_string)
        .collect();
    parts[3] = "ab".repeat(32);
    let wrong_gateway = fleet::join(port, &parts.join("."), 1.0);
    assert!(!wrong_gateway.ok);
    assert!(
        wrong_gateway
            .output
            .contains("not the one this join token was made for"),
        "{}",
        wrong_gateway.output
    );

    for (result, count) in [
        ("accepted", 1.0),
        ("used_up", 1.0),
        ("expired", 1.0),
        ("revoked", 1.0),
        ("wrong_secret", 1.0),
    ] {
        let line = format!("darkcore_operator_joins_total{{result=\"{result}\"}}");
        assert_eq!(metric(&fx.operator, &line).await, Some(count), "{line}");
    }
    let log = std::fs::read_to_string(&fx.operator.log).unwrap();
    let secret = once.split('.').nth(2).unwrap();
    assert!(
        !log.contains(secret),
        "a token's secret must never reach the log"
    );
    fx.finish().await;
}

#[tokio::test]
async fn a_flood_of_joins_from_one_address_is_throttled_before_it_costs_anything() {
    // One join per 10 s from an address (a burst of one).
    let fx = PoolFixture::start_with(
        "joinflood",
        process_pool(),
        &["--join-rate-per-source", "0.1"],
    )
    .await;
    let port = fx.operator.gateway_port;
    let valid = token(&fx.pool, &[]);
    let first = fleet::join(port, &valid, 1.0);
    assert!(first.ok, "{}", first.output);
    // A forged token (a well-formed one with another secret), then the valid one again: both
    // are refused before the operator reads them, with when to try again.
    let mut parts: Vec<&str> = valid.split('.').collect();
    parts[2] = "0123456789abcdef0123456789abcdef";
    let forged = parts.join(".");
    for attempt in [forged.as_str(), valid.as_str()] {
        let refused = fleet::join(port, attempt, 1.0);
        assert!(!refused.ok);
        assert!(
            refused.output.contains("too many joins from this address")
                && refused.output.contains("try again in"),
            "{}",
            refused.output
        );
    }
    let throttled = crate::devices::metric(
        &fx.operator,
        "darkcore_operator_joins_total{result=\"throttled\"}",
    )
    .await;
    assert_eq!(throttled, Some(2.0));
    fx.finish().await;
}

#[tokio::test]
async fn a_burst_of_joins_on_one_token_admits_exactly_as_many_as_it_allows() {
    let fx = PoolFixture::start("joinburst", process_pool()).await;
    let port = fx.operator.gateway_port;
    let three = token(&fx.pool, &["--uses", "3"]);
    // Eight devices join at once; the operator counts them together against one Secret.
    let outcomes: Vec<fleet::JoinOutcome> = std::thread::scope(|scope| {
        let joins: Vec<_> = (0..8)
            .map(|_| scope.spawn(|| fleet::join(port, &three, 1.0)))
            .collect();
        joins.into_iter().map(|join| join.join().unwrap()).collect()
    });
    let joined = outcomes.iter().filter(|outcome| outcome.ok).count();
    assert_eq!(joined, 3, "a token with --uses 3 admits three of eight");
    for refused in outcomes.iter().filter(|outcome| !outcome.ok) {
        assert!(
            refused.output.contains("used as many times as it allows"),
            "{}",
            refused.output
        );
    }
    let id = three.split('.').nth(1).unwrap();
    let listing = operator_cli(&["token", "list", "-n", crate::harness::OPERATOR_NAMESPACE]);
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing
            .lines()
            .any(|line| line.starts_with(id) && line.contains("3/3")),
        "the Secret counts exactly three uses:\n{listing}"
    );
    for (result, count) in [("accepted", 3.0), ("used_up", 5.0)] {
        let line = format!("darkcore_operator_joins_total{{result=\"{result}\"}}");
        assert_eq!(metric(&fx.operator, &line).await, Some(count), "{line}");
    }
    fx.finish().await;
}

#[tokio::test]
async fn three_agents_add_up_restart_with_the_same_identity_and_a_revoked_one_is_shut_out() {
    let fx = PoolFixture::start("three", process_pool()).await;
    let port = fx.operator.gateway_port;
    let join_token = token(&fx.pool, &[]);
    let mut agents = Vec::new();
    for cores in [0.5, 1.0, 2.0] {
        agents.push(Agent::start(port, &join_token, cores).await);
    }
    let nodes = fx.nodes();
    let node = node_cpu_is(&nodes, &fx.node, 3500, FOLLOWS).await;
    let capacity = node.status.unwrap().capacity.unwrap();
    assert_eq!(
        capacity["memory"].0, "3Gi",
        "three times the 1Gi each offers"
    );
    let pool = pool_enlisted_is(&fx.pools(), &fx.pool, 3).await;
    let status = pool.status.unwrap();
    assert_eq!((status.online_devices, status.ready_devices), (3, 3));

    // A restart keeps the identity: same device, no new join.
    let status_before = agents[1].status();
    assert!(
        status_before.contains(&agents[1].device_id),
        "{status_before}"
    );
    assert!(agents[1].stop().await.success());
    node_cpu_is(&nodes, &fx.node, 2500, FOLLOWS).await;
    agents[1].run();
    node_cpu_is(&nodes, &fx.node, 3500, FOLLOWS).await;
    let listing = operator_cli(&[
        "devices",
        "--operator",
        &format!("http://127.0.0.1:{}", fx.operator.http_port),
        "--pool",
        &fx.pool,
    ]);
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    assert_eq!(
        listing.lines().count(),
        4,
        "a header and three devices, the restarted one not doubled: {listing}"
    );
    assert!(agents[1].status().contains("connected"));

    // Revocation closes the live stream, and the agent stops with the reason.
    let victim = agents.remove(0);
    let revoke = operator_cli(&[
        "device",
        "revoke",
        &victim.device_id,
        "-n",
        "darkcore-system",
    ]);
    assert!(
        revoke.status.success(),
        "{}",
        String::from_utf8_lossy(&revoke.stderr)
    );
    let mut victim = victim;
    let (exit, log) = victim.exited().await;
    assert!(!exit.success());
    assert!(log.contains("has been revoked"), "{log}");
    node_cpu_is(&nodes, &fx.node, 3000, FOLLOWS).await;
    // Starting it again changes nothing: it is refused at once.
    victim.run();
    let (exit, _) = victim.exited().await;
    assert!(!exit.success());
    // Deleting the revocation list revokes nothing back: the operator writes it again.
    let maps: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(fx.client.clone(), crate::harness::OPERATOR_NAMESPACE);
    let _ = maps
        .delete("darkcore-revoked-devices", &Default::default())
        .await;
    crate::harness::poll_until(
        "the revocation list written again",
        Duration::from_secs(20),
        || async {
            let cm = maps.get_opt("darkcore-revoked-devices").await;
            match &cm {
                Ok(Some(cm))
                    if cm
                        .data
                        .as_ref()
                        .is_some_and(|d| d.contains_key(&victim.device_id)) =>
                {
                    Ok(())
                }
                _ => Err(format!("{cm:?}")),
            }
        },
    )
    .await;
    victim.run();
    let (exit, _) = victim.exited().await;
    assert!(!exit.success(), "still revoked");
    fx.pool_events_include(&["DevicesJoined", "DevicesRevoked"])
        .await;
    fx.finish().await;
}

#[tokio::test]
async fn an_owner_coming_back_takes_the_device_out_of_capacity_until_idle_again() {
    let fx = PoolFixture::start("owner", process_pool()).await;
    let agent = Agent::start(fx.operator.gateway_port, &token(&fx.pool, &[]), 1.0).await;
    let nodes = fx.nodes();
    node_cpu_is(&nodes, &fx.node, 1000, FOLLOWS).await;

    agent.owner_active(true);
    node_cpu_is(&nodes, &fx.node, 0, FOLLOWS).await;
    let pools = fx.pools();
    let unavailable = crate::harness::wait_for(
        &pools,
        &fx.pool,
        |p: Option<&darkcore_crds::DevicePool>| {
            p.and_then(|p| p.status.as_ref())
                .is_some_and(|s| s.unavailable_devices == 1 && s.replicas == 1)
        },
        FOLLOWS,
        "one enlisted device withheld by its owner",
    )
    .await;
    assert!(unavailable.is_some());
    let status = agent.status();
    assert!(
        status.contains("giving:      no") && status.contains("keyboard"),
        "{status}"
    );

    agent.owner_active(false);
    node_cpu_is(&nodes, &fx.node, 1000, FOLLOWS).await;
    fx.finish().await;
}

#[tokio::test]
async fn scaling_a_pool_to_two_of_three_devices_enlists_exactly_two() {
    let fx = PoolFixture::start("scale", process_pool()).await;
    let join_token = token(&fx.pool, &[]);
    let mut agents = Vec::new();
    for cores in [0.5, 1.0, 2.0] {
        agents.push(Agent::start(fx.operator.gateway_port, &join_token, cores).await);
    }
    let pools = fx.pools();
    pool_enlisted_is(&pools, &fx.pool, 3).await;
    let scaled = std::process::Command::new("kubectl")
        .args(["scale", "devicepool", &fx.pool, "--replicas=2"])
        .output()
        .expect("kubectl is on PATH (make test puts the one built with the control plane there)");
    assert!(
        scaled.status.success(),
        "{}",
        String::from_utf8_lossy(&scaled.stderr)
    );
    let pool = pool_enlisted_is(&pools, &fx.pool, 2).await;
    assert_eq!(
        pool.status.unwrap().online_devices,
        3,
        "the third stands by, still online"
    );
    node_cpu_is(&fx.nodes(), &fx.node, 3000, FOLLOWS).await;
    // The status was written from the same counts the metric shows.
    for (state, count) in [("online", 3.0), ("enlisted", 2.0)] {
        let line = format!(
            "darkcore_operator_pool_devices{{pool=\"{}\",state=\"{state}\"}}",
            fx.pool
        );
        assert_eq!(metric(&fx.operator, &line).await, Some(count), "{line}");
    }

    pools
        .patch(
            &fx.pool,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "spec": { "replicas": null } })),
        )
        .await
        .unwrap();
    pool_enlisted_is(&pools, &fx.pool, 3).await;
    fx.finish().await;
}

#[tokio::test]
async fn a_killed_agent_drops_out_of_capacity_within_the_lost_threshold() {
    let spec = DevicePoolSpec {
        device_lost_after_seconds: 5,
        ..process_pool()
    };
    let fx = PoolFixture::start("lost", spec).await;
    let join_token = token(&fx.pool, &[]);
    let mut doomed = Agent::start(fx.operator.gateway_port, &join_token, 1.0).await;
    let _survivor = Agent::start(fx.operator.gateway_port, &join_token, 0.5).await;
    let nodes = fx.nodes();
    node_cpu_is(&nodes, &fx.node, 1500, FOLLOWS).await;

    doomed.kill().await;
    let killed = Instant::now();
    node_cpu_is(&nodes, &fx.node, 500, Duration::from_secs(20)).await;
    let took = killed.elapsed();
    assert!(
        took >= Duration::from_secs(4),
        "a silent device keeps its capacity until the threshold (network blips are not losses): {took:?}"
    );
    eprintln!("capacity dropped {took:?} after kill -9 (threshold 5 s)");
    fx.pool_events_include(&["DevicesLost"]).await;
    fx.finish().await;
}

#[tokio::test]
async fn a_killed_operator_is_replaced_and_the_agents_come_back_without_a_restart() {
    let mut fx = PoolFixture::start("opkill", process_pool()).await;
    let join_token = token(&fx.pool, &[]);
    let a = Agent::start(fx.operator.gateway_port, &join_token, 1.0).await;
    let b = Agent::start(fx.operator.gateway_port, &join_token, 0.5).await;
    let pids = (a.pid(), b.pid());
    let nodes = fx.nodes();
    node_cpu_is(&nodes, &fx.node, 1500, FOLLOWS).await;

    // Watch the node's capacity through the restart: it must never drop while the devices
    // are still there.
    let lowest = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
    let watch = {
        let (nodes, name, lowest) = (nodes.clone(), fx.node.clone(), lowest.clone());
        tokio::spawn(async move {
            use futures::TryStreamExt;
            use kube::runtime::{WatchStreamExt, watcher};
            let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
            let mut stream = std::pin::pin!(watcher(nodes, config).applied_objects());
            while let Ok(Some(node)) = stream.try_next().await {
                if let Some(cpu) = fleet::node_cpu_millis(&node) {
                    lowest.fetch_min(cpu, std::sync::atomic::Ordering::Relaxed);
                }
            }
        })
    };
    fx.operator.kill().await;
    let (http, gateway) = (fx.operator.http_port, fx.operator.gateway_port);
    let killed = Instant::now();
    fx.operator = Operator::start_on(
        &fx.operator.scope.clone(),
        http,
        gateway,
        fx.operator.kubelet_port,
    )
    .await;
    // The new operator starts with an empty registry; the node must come back to the sum
    // through the agents' reconnects alone.
    let mut back = false;
    for _ in 0..150 {
        let (_, body) = fx.operator.get("/devices").await.unwrap();
        if body.matches("\"connected\":true").count() == 2 {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "both agents reconnected to the new operator");
    eprintln!(
        "agents reattached {:?} after the operator was killed",
        killed.elapsed()
    );
    node_cpu_is(&nodes, &fx.node, 1500, FOLLOWS).await;
    watch.abort();
    assert_eq!(
        lowest.load(std::sync::atomic::Ordering::Relaxed),
        1500,
        "the restart never published less capacity than the devices give"
    );
    assert_eq!((a.pid(), b.pid()), pids, "the agents were not restarted");
    fx.finish().await;
}

#[tokio::test]
async fn a_device_claiming_a_million_cores_is_not_believed() {
    let fx = PoolFixture::start("liar", process_pool()).await;
    let join_token = token(&fx.pool, &[]);
    let _honest = Agent::start(fx.operator.gateway_port, &join_token, 1.0).await;
    let liar = Agent::start_with(
        fx.operator.gateway_port,
        &join_token,
        1.0,
        "report_cores = 1000000\n",
    )
    .await;
    // Only the honest device's core counts; the liar's claim never reaches the node.
    let nodes = fx.nodes();
    node_cpu_is(&nodes, &fx.node, 1000, FOLLOWS).await;
    let events = fx.pool_events_include(&["DevicesImplausible"]).await;
    assert!(
        events.iter().any(|e| e.contains(&liar.device_id)),
        "{events:?}"
    );
    let (_, listing) = fx.operator.get("/devices").await.unwrap();
    let devices: serde_json::Value = serde_json::from_str(&listing).unwrap();
    let note = devices
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == liar.device_id.as_str())
        .map(|d| d["note"].to_string())
        .unwrap();
    assert!(
        note.contains("implausible") && note.contains("maxCores"),
        "{note}"
    );
    let cpu = nodes
        .get(&fx.node)
        .await
        .unwrap()
        .status
        .unwrap()
        .capacity
        .unwrap()["cpu"]
        .0
        .clone();
    assert_eq!(cpu, "1");
    fx.finish().await;
}

#[tokio::test]
async fn a_device_certificate_is_renewed_over_its_stream_and_outlives_its_first_validity() {
    const VALIDITY: &[&str] = &["--device-cert-validity", "1m"];
    let mut fx = PoolFixture::start_with("certrenew", process_pool(), VALIDITY).await;
    let join = token(&fx.pool, &[]);
    let agent = Agent::start(fx.operator.gateway_port, &join, 1.0).await;
    let cert_path = agent.state_dir.join("device.crt");
    let read = || std::fs::read_to_string(&cert_path).unwrap();
    let end_of = |text: &str| {
        let der = pem::parse(text).unwrap().into_contents();
        darkcore_operator::tls::not_after(&der).unwrap()
    };
    let first = read();
    let first_end = end_of(&first);
    assert!(
        first_end <= std::time::SystemTime::now() + Duration::from_secs(61),
        "a device certificate lasts the operator's --device-cert-validity"
    );
    // Halfway through its minute, the gateway sends a new one over the stream.
    let renewed = poll_until(
        "the device's certificate is renewed",
        Duration::from_secs(60),
        || async {
            let now = read();
            match now != first {
                true => Ok(now),
                false => Err("still the first".to_string()),
            }
        },
    )
    .await;
    assert!(end_of(&renewed) > first_end, "the renewed one lasts longer");
    // Once the first certificate has run out (a wall-clock instant, not an outcome), the
    // agent has to connect again: a new operator process accepts it, with the renewed one.
    let ran_out = first_end
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(ran_out + Duration::from_secs(1)).await;
    fx.operator.kill().await;
    let op = &fx.operator;
    let (scope, http, gateway, kubelet) = (
        op.scope.clone(),
        op.http_port,
        op.gateway_port,
        op.kubelet_port,
    );
    fx.operator =
        crate::harness::Operator::start_with(&scope, http, gateway, kubelet, VALIDITY).await;
    poll_until(
        "the agent attaches to the new operator",
        Duration::from_secs(60),
        || async {
            match metric(&fx.operator, "darkcore_operator_agent_connections").await {
                Some(1.0) => Ok(()),
                other => Err(format!("{other:?}; agent: {}", agent.status())),
            }
        },
    )
    .await;
    fx.finish().await;
}
