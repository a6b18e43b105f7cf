//! DevicePools against the real API server: validation, nodes, leases, scale, deletion, and
//! what happens to nodes when the operator dies and comes back.

use std::time::{Duration, Instant};

use darkcore_crds::{DevicePool, DevicePoolSpec, NodeTemplate, PoolTaint, TaintEffect};
use futures::TryStreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ApiResource, DeleteParams, DynamicObject, PostParams};
use kube::runtime::wait::conditions;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::harness::{
    self, NODE_READY_TIMEOUT, Operator, PoolFixture, TestNamespace, node_ready_status, wait_for,
};

#[tokio::test]
async fn the_api_server_rejects_a_bad_device_pool_naming_the_fields() {
    let client = harness::client().await;
    harness::ensure_crds(&client).await;
    let pools: Api<DynamicObject> = Api::all_with(client, &ApiResource::erase::<DevicePool>(&()));
    let reject = |spec: serde_json::Value, name: String| {
        let pools = pools.clone();
        async move {
            let obj: DynamicObject = serde_json::from_value(json!({
                "apiVersion": "darkcore.io/v1alpha1", "kind": "DevicePool",
                "metadata": { "name": name }, "spec": spec,
            }))
            .unwrap();
            match pools.create(&PostParams::default(), &obj).await {
                Err(kube::Error::Api(status)) => {
                    assert_eq!(status.code, 422, "{status:?}");
                    status.message
                }
                other => panic!("the API server accepted a bad DevicePool: {other:?}"),
            }
        }
    };

    let message = reject(
        json!({ "replicas": -1, "runtimes": ["java"] }),
        harness::unique("bad"),
    )
    .await;
    assert!(message.contains("spec.replicas"), "{message}");
    assert!(
        message.contains(r#"spec.runtimes[0]: Unsupported value: "java""#),
        "{message}"
    );

    let message = reject(
        json!({ "node": { "labels": { "kubernetes.io/os": "plan9" } } }),
        harness::unique("bad"),
    )
    .await;
    assert!(message.contains("spec.node.labels"), "{message}");

    let message = reject(
        json!({ "selector": { "minMemory": "lots" } }),
        harness::unique("bad"),
    )
    .await;
    assert!(message.contains("spec.selector.minMemory"), "{message}");

    let message = reject(
        json!({ "deviceLostAfterSeconds": 1 }),
        harness::unique("bad"),
    )
    .await;
    assert!(message.contains("spec.deviceLostAfterSeconds"), "{message}");

    let message = reject(
        json!({}),
        format!("{}-{}", harness::unique("bad"), "x".repeat(60)),
    )
    .await;
    assert!(message.contains("at most 63 characters"), "{message}");

    let message = reject(
        json!({ "validation": { "quorum": 3, "maxReplicas": 2 } }),
        harness::unique("bad"),
    )
    .await;
    assert!(
        message.contains("maxReplicas is below spec.validation.quorum"),
        "{message}"
    );
    let message = reject(
        json!({ "validation": { "homogeneous": "os" } }),
        harness::unique("bad"),
    )
    .await;
    assert!(
        message.contains(r#"spec.validation.homogeneous: Unsupported value: "os""#),
        "{message}"
    );
    let message = reject(
        json!({ "validation": { "adaptive": { "trustedErrorRatePercent": 40 } } }),
        harness::unique("bad"),
    )
    .await;
    assert!(
        message.contains("trustedErrorRatePercent must be below quarantineErrorRatePercent"),
        "{message}"
    );
}

#[tokio::test]
async fn a_pool_becomes_a_ready_node_with_labels_taint_and_a_fresh_lease() {
    let spec = DevicePoolSpec {
        node: NodeTemplate {
            labels: [("team".to_string(), "research".to_string())].into(),
            taints: vec![PoolTaint {
                key: "example.com/dedicated".into(),
                value: Some("lab".into()),
                effect: TaintEffect::NoSchedule,
            }],
        },
        ..Default::default()
    };
    let t = PoolFixture::start("ready", spec).await;
    let node = t.ready_node().await;

    let labels = node.labels();
    for (key, value) in [
        ("type", "virtual-kubelet"),
        ("kubernetes.io/role", "agent"),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", "amd64"),
        ("darkcore.io/pool", t.pool.as_str()),
        ("team", "research"),
    ] {
        assert_eq!(
            labels.get(key).map(String::as_str),
            Some(value),
            "label {key} on {labels:?}"
        );
    }
    let taints = node
        .spec
        .as_ref()
        .unwrap()
        .taints
        .clone()
        .unwrap_or_default();
    let has = |key: &str, value: &str| {
        taints
            .iter()
            .any(|x| x.key == key && x.value.as_deref() == Some(value) && x.effect == "NoSchedule")
    };
    assert!(has("virtual-kubelet.io/provider", "darkcore"), "{taints:?}");
    assert!(has("example.com/dedicated", "lab"), "{taints:?}");

    let status = node.status.as_ref().unwrap();
    assert_eq!(
        status.allocatable.as_ref().unwrap()["pods"].0,
        "0",
        "no devices, no pods"
    );
    let devices = status
        .conditions
        .as_ref()
        .unwrap()
        .iter()
        .find(|c| c.type_ == "DevicesAvailable")
        .unwrap();
    assert_eq!(
        (devices.status.as_str(), devices.reason.as_deref()),
        ("False", Some("NoDevicesEnlisted"))
    );
    assert_eq!(status.addresses.as_ref().unwrap()[0].type_, "InternalIP");
    assert_eq!(
        status
            .daemon_endpoints
            .as_ref()
            .unwrap()
            .kubelet_endpoint
            .as_ref()
            .unwrap()
            .port,
        i32::from(t.operator.kubelet_port)
    );

    let lease = t.lease().await;
    let spec = lease.spec.unwrap();
    let renewed = spec.renew_time.unwrap().0;
    let age = Timestamp::now().duration_since(renewed);
    assert!(age.as_secs() < 40, "lease renewed {age:?} ago");
    assert_eq!(spec.holder_identity.as_deref(), Some(t.node.as_str()));
    assert_eq!(
        lease.metadata.owner_references.unwrap()[0].uid,
        node.uid().unwrap()
    );

    let status = t.pool_status().await;
    assert_eq!(status.nodes, std::slice::from_ref(&t.node));
    assert_eq!(
        status.selector,
        Some(format!("darkcore.io/pool={}", t.pool))
    );

    let (code, _) = t.operator.get("/healthz").await.unwrap();
    assert_eq!(code, 200);
    let (code, metrics) = t.operator.get("/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains(r#"darkcore_operator_api_writes_total{kind="Node",verb="apply"}"#),
        "{metrics}"
    );
    t.finish().await;
}

#[tokio::test]
async fn kubectl_scale_changes_the_pool_replicas() {
    let t = PoolFixture::start(
        "scale",
        DevicePoolSpec {
            replicas: Some(1),
            ..Default::default()
        },
    )
    .await;
    t.ready_node().await;
    let out = std::process::Command::new("kubectl")
        .args(["scale", &format!("devicepool/{}", t.pool), "--replicas=4"])
        .output()
        .expect("kubectl runs");
    assert!(
        out.status.success(),
        "kubectl scale failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(t.pools().get(&t.pool).await.unwrap().spec.replicas, Some(4));

    t.pool_status().await;
    let scale = t.pools().get_scale(&t.pool).await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(4));
    assert_eq!(
        scale.status.unwrap().selector,
        Some(format!("darkcore.io/pool={}", t.pool))
    );
    t.finish().await;
}

#[tokio::test]
async fn deleting_a_pool_removes_its_node_and_lease() {
    let t = PoolFixture::start("delete", DevicePoolSpec::default()).await;
    let node = t.ready_node().await;
    let lease = t.lease().await;

    let (nodes, leases, node_name) = (t.nodes(), t.leases(), t.node.clone());
    // finish() returns once the pool is gone, i.e. once its finalizer has run.
    t.finish().await;
    let gone = Duration::from_secs(30);
    wait_for(
        &nodes,
        &node_name,
        conditions::is_deleted(&node.uid().unwrap()),
        gone,
        "node deleted",
    )
    .await;
    wait_for(
        &leases,
        &node_name,
        conditions::is_deleted(&lease.uid().unwrap()),
        gone,
        "lease deleted",
    )
    .await;
}

#[tokio::test]
async fn a_node_deleted_by_hand_comes_back() {
    let t = PoolFixture::start("recreate", DevicePoolSpec::default()).await;
    let node = t.ready_node().await;
    let old_uid = node.uid().unwrap();
    t.nodes()
        .delete(&t.node, &DeleteParams::default())
        .await
        .unwrap();
    let back = wait_for(
        &t.nodes(),
        &t.node,
        move |n: Option<&Node>| {
            n.is_some_and(|n| {
                n.uid().as_deref() != Some(old_uid.as_str())
                    && node_ready_status(n).as_deref() == Some("True")
            })
        },
        NODE_READY_TIMEOUT,
        "node recreated and Ready",
    )
    .await
    .unwrap();
    assert_eq!(back.labels().get("darkcore.io/pool"), Some(&t.pool));
    t.finish().await;
}

#[tokio::test]
async fn nodes_go_not_ready_when_the_operator_dies_and_recover_without_losing_pods() {
    let mut t = PoolFixture::start("restart", DevicePoolSpec::default()).await;
    t.ready_node().await;
    let ns = TestNamespace::create(&t.client, "restart").await;
    let pods: Api<Pod> = Api::namespaced(t.client.clone(), &ns.name);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "bound" },
        "spec": {
            "nodeName": t.node,
            "tolerations": [{ "key": "virtual-kubelet.io/provider", "operator": "Exists" }],
            "containers": [{ "name": "main", "image": "busybox", "command": ["true"] }],
        },
    }))
    .unwrap();
    let pod_uid = pods
        .create(&PostParams::default(), &pod)
        .await
        .unwrap()
        .uid()
        .unwrap();

    t.operator.kill().await;
    let killed = Instant::now();
    // Lease duration (40 s) + node-monitor-grace-period (50 s) + monitor period (5 s), with slack.
    let node = wait_for(
        &t.nodes(),
        &t.node,
        |n: Option<&Node>| n.and_then(node_ready_status).is_some_and(|s| s != "True"),
        Duration::from_secs(150),
        "node NotReady/Unknown after the operator died",
    )
    .await
    .unwrap();
    eprintln!(
        "node went {} {:?} after the operator was killed",
        node_ready_status(&node).unwrap(),
        killed.elapsed()
    );

    t.operator = Operator::start(&t.operator.scope.clone()).await;
    let restarted = Instant::now();
    t.ready_node().await;
    eprintln!(
        "node Ready again {:?} after the operator restarted",
        restarted.elapsed()
    );

    let still = pods
        .get("bound")
        .await
        .expect("the pod bound to the node survives the restart");
    assert_eq!(still.uid().as_deref(), Some(pod_uid.as_str()));
    assert!(
        still.metadata.deletion_timestamp.is_none(),
        "the pod is being deleted: {still:?}"
    );
    ns.delete().await;
    t.finish().await;
}

#[tokio::test]
async fn a_node_stays_ready_past_the_grace_period_while_the_operator_runs() {
    let t = PoolFixture::start("alive", DevicePoolSpec::default()).await;
    t.ready_node().await;
    // Without lease renewals the node-lifecycle controller would mark the node Unknown about
    // 55 s after its last heartbeat (50 s grace + 5 s monitor period). Watch for 75 s: any
    // Ready status other than True fails the test.
    let watch = watcher(
        t.nodes(),
        watcher::Config::default().fields(&format!("metadata.name={}", t.node)),
    )
    .applied_objects()
    .try_for_each(|node| async move {
        let ready = node_ready_status(&node);
        assert_eq!(
            ready.as_deref(),
            Some("True"),
            "the node left Ready while the operator ran: {:?}",
            node.status
        );
        Ok(())
    });
    match tokio::time::timeout(Duration::from_secs(75), watch).await {
        Err(_elapsed) => {}
        Ok(result) => panic!("the node watch ended early: {result:?}"),
    }
    t.finish().await;
}
