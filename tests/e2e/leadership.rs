//! Leader election as the chart runs it: two operators on one Lease, one acting and one
//! standing by; the standby takes over a killed leader's agents, nodes and pods.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{Api, ResourceExt};

use crate::devices::process_pool;
use crate::harness::{OPERATOR_NAMESPACE, Operator, free_port, poll_until};
use crate::helm::GATEWAY_SERVICE;
use crate::pods::{Bench, main_status};

/// The chart's leader-election Lease (`<release>-operator`).
const LEASE: &str = "darkcore-operator";

/// Each replica's address (TEST-NET-1: the API server refuses loopback endpoints, and these
/// are never dialled here), published in the gateway's EndpointSlice and as nodes' InternalIP.
fn address(identity: &str) -> &'static str {
    match identity {
        "op-a" => "192.0.2.1",
        "op-b" => "192.0.2.2",
        _ => "192.0.2.3",
    }
}

fn election_args<'a>(lease: &'a str, identity: &'a str) -> Vec<&'a str> {
    vec![
        "--node-address",
        address(identity),
        "--leader-elect",
        "--leader-election-lease",
        lease,
        "--leader-election-lease-seconds",
        "6",
        "--identity",
        identity,
        "--gateway-service",
        GATEWAY_SERVICE,
    ]
}

async fn readyz(operator: &Operator) -> String {
    operator
        .get("/readyz")
        .await
        .map(|(_, body)| body)
        .unwrap_or_default()
}

/// Waits until `operator` has taken the lease and its caches are synced.
async fn leads_now(operator: &Operator) {
    poll_until("the replica leads", Duration::from_secs(30), || async {
        match readyz(operator).await.as_str() {
            "ok\n" => Ok(()),
            other => Err(other.to_string()),
        }
    })
    .await;
}

/// The replica the gateway Service's EndpointSlice leads to, and its address there.
async fn slice_leader(bench: &Bench) -> Option<(String, String)> {
    let slices: Api<EndpointSlice> = Api::namespaced(bench.fx.client.clone(), OPERATOR_NAMESPACE);
    let slice = slices
        .get_opt(&format!("{GATEWAY_SERVICE}-leader"))
        .await
        .unwrap()?;
    let leader = slice.annotations().get("darkcore.io/leader").cloned()?;
    Some((leader, slice.endpoints.first()?.addresses.first()?.clone()))
}

fn leads(identity: &str) -> Option<(String, String)> {
    Some((identity.into(), address(identity).into()))
}

/// The node's InternalIP: where the API server dials the kubelet API.
async fn node_address(bench: &Bench) -> Option<String> {
    let node = bench.fx.nodes().get(&bench.fx.node).await.ok()?;
    node.status?
        .addresses?
        .into_iter()
        .find(|a| a.type_ == "InternalIP")
        .map(|a| a.address)
}

#[tokio::test]
async fn one_of_two_operators_acts_and_the_standby_takes_over_when_it_dies() {
    // The chart's RBAC lets the operator use only the release's Lease; no other test elects.
    let lease = LEASE.to_string();
    let leases: Api<Lease> = Api::namespaced(crate::harness::client().await, OPERATOR_NAMESPACE);
    let _ = leases.delete(&lease, &Default::default()).await;
    let mut bench =
        Bench::start_with("leader", 2, process_pool(), &election_args(&lease, "op-a")).await;
    let op = &bench.fx.operator;
    assert_eq!(readyz(op).await, "ok\n", "the first operator leads");
    // The standby listens on the same gateway and kubelet ports, as a second pod behind the
    // Service would; it binds them only when it leads.
    let standby = Operator::start_standby(
        &op.scope.clone(),
        free_port(),
        op.gateway_port,
        op.kubelet_port,
        &election_args(&lease, "op-b"),
    )
    .await;
    assert!(
        readyz(&standby).await.starts_with("standby"),
        "the second operator stands by"
    );
    let (_, devices) = standby.get("/devices").await.unwrap();
    assert_eq!(devices, "[]", "the standby holds no agent");
    let (_, metrics) = standby.get("/metrics").await.unwrap();
    assert!(metrics.contains("darkcore_operator_leader 0"), "{metrics}");
    assert_eq!(slice_leader(&bench).await, leads("op-a"));
    assert_eq!(node_address(&bench).await.as_deref(), Some(address("op-a")));

    let jobs = bench
        .indexed_job("steady", 6, 3, "echo ran $JOB_COMPLETION_INDEX; sleep 8")
        .await;
    bench.job_has_ready(&jobs, "steady", 3).await;

    let leader_log = bench.fx.operator.log.clone();
    bench.fx.operator.kill().await;
    let killed = Instant::now();
    leads_now(&standby).await;
    let takeover = killed.elapsed();
    eprintln!("the standby led {takeover:?} after the leader was killed (lease: 6 s)");
    let held = leases.get(&lease).await.unwrap().spec.unwrap();
    assert_eq!(held.holder_identity.as_deref(), Some("op-b"));
    assert_eq!(held.lease_transitions, Some(1));
    assert_eq!(slice_leader(&bench).await, leads("op-b"));
    poll_until(
        "the node leads to the new leader",
        Duration::from_secs(30),
        || async {
            match node_address(&bench).await {
                Some(a) if a == address("op-b") => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;

    // A rolling upgrade: a third replica stands by, and the leader is stopped with SIGTERM. It
    // lets go of the lease, so the standby takes over in a retry period, not a lease duration.
    let next = Operator::start_standby(
        &standby.scope.clone(),
        free_port(),
        standby.gateway_port,
        standby.kubelet_port,
        &election_args(&lease, "op-c"),
    )
    .await;
    let mut standby = standby;
    let status = standby.stop().await;
    assert!(
        status.success(),
        "a leader stopped by SIGTERM exits 0, not {status}"
    );
    let stopped = Instant::now();
    leads_now(&next).await;
    let handover = stopped.elapsed();
    eprintln!("after SIGTERM, the next replica led in {handover:?}");
    let held = leases.get(&lease).await.unwrap().spec.unwrap();
    assert_eq!(held.holder_identity.as_deref(), Some("op-c"));
    assert_eq!(held.lease_transitions, Some(2));
    let log_b = std::fs::read_to_string(&standby.log).unwrap();
    assert!(
        log_b.contains("released leadership"),
        "the stopped leader let go of the lease rather than letting it run out"
    );

    bench.fx.operator = next;
    let pods = bench
        .job_succeeds(&jobs, "steady", 6, Duration::from_secs(120))
        .await;
    assert_eq!(pods.len(), 6, "no pod was lost or replaced");
    for pod in &pods {
        assert_eq!(
            main_status(pod).restart_count,
            0,
            "pod {} ran once",
            pod.name_any()
        );
    }
    let log_a = std::fs::read_to_string(&leader_log).unwrap();
    let log_c = std::fs::read_to_string(&bench.fx.operator.log).unwrap();
    let dispatched = |log: &str| {
        log.lines()
            .filter(|l| l.contains("dispatching") && l.contains(&bench.ns.name))
            .count()
    };
    assert_eq!(
        dispatched(&log_a) + dispatched(&log_b) + dispatched(&log_c),
        6,
        "each index was dispatched once across the three operators"
    );
    bench.finish().await;
}
