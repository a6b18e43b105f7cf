//! What the real kube-scheduler does with pods aimed at a pool's node. With no device enlisted
//! the node offers zero pods, so the scheduler must name capacity, not the taint or selector.

use std::time::Duration;

use darkcore_crds::DevicePoolSpec;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::harness::{PoolFixture, TestNamespace, wait_for};

/// How the scheduler names darkcore's taint when a pod does not tolerate it.
const DARKCORE_TAINT: &str = "untolerated taint {virtual-kubelet.io/provider: darkcore}";

/// The scheduler's verdict on a pod: the message of its PodScheduled=False condition.
fn unschedulable_message(pod: &Pod) -> Option<String> {
    let cond = pod
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "PodScheduled")?;
    (cond.status == "False").then(|| cond.message.clone().unwrap_or_default())
}

#[tokio::test]
async fn the_scheduler_matches_a_tolerating_job_to_the_pool_node_and_waits_for_capacity() {
    let t = PoolFixture::start("sched", DevicePoolSpec::default()).await;
    t.schedulable_node().await;
    let (client, scope) = (t.client.clone(), t.pool.clone());

    let ns = TestNamespace::create(&client, "sched").await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns.name);
    let job: Job = serde_json::from_value(json!({
        "metadata": { "name": "work" },
        "spec": {
            "backoffLimit": 0,
            "template": { "spec": {
                "restartPolicy": "Never",
                "nodeSelector": { "darkcore.io/pool": scope },
                "tolerations": [{ "key": "virtual-kubelet.io/provider", "operator": "Equal", "value": "darkcore", "effect": "NoSchedule" }],
                "containers": [{ "name": "main", "image": "busybox", "command": ["echo", "hello"] }],
            }},
        },
    }))
    .unwrap();
    jobs.create(&PostParams::default(), &job).await.unwrap();

    // The Job controller creates the pod; the scheduler then rules on it.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let mut created = watcher(
        pods.clone(),
        watcher::Config::default().labels("job-name=work"),
    )
    .applied_objects()
    .boxed();
    let pod_name = tokio::time::timeout(Duration::from_secs(30), created.try_next())
        .await
        .expect("the Job controller created a pod within 30 s")
        .unwrap()
        .expect("the pod watch ended early")
        .name_any();
    let pod = wait_for(
        &pods,
        &pod_name,
        |p: Option<&Pod>| p.and_then(unschedulable_message).is_some(),
        Duration::from_secs(30),
        "the scheduler's verdict",
    )
    .await
    .unwrap();
    let message = unschedulable_message(&pod).unwrap();
    // Other tests' nodes may be listed too, each failing on its own selector or taint; only
    // this pool's node can fail on capacity, and no node may fail on darkcore's taint.
    assert!(
        message.contains("1 Too many pods"),
        "the pool node should fail only on capacity: {message}"
    );
    assert!(
        !message.contains(DARKCORE_TAINT),
        "the toleration should satisfy darkcore's taint: {message}"
    );
    assert!(pod.spec.unwrap().node_name.is_none());

    // A pod that does not tolerate the taint is kept off the node by the taint itself.
    let intruder: Pod = serde_json::from_value(json!({
        "metadata": { "name": "intruder" },
        "spec": {
            "nodeSelector": { "darkcore.io/pool": scope },
            "containers": [{ "name": "main", "image": "busybox" }],
        },
    }))
    .unwrap();
    pods.create(&PostParams::default(), &intruder)
        .await
        .unwrap();
    let intruder = wait_for(
        &pods,
        "intruder",
        |p: Option<&Pod>| p.and_then(unschedulable_message).is_some(),
        Duration::from_secs(30),
        "the scheduler's verdict on the intruder",
    )
    .await
    .unwrap();
    let message = unschedulable_message(&intruder).unwrap();
    assert!(message.contains(DARKCORE_TAINT), "{message}");
    assert!(
        !message.contains("Too many pods"),
        "the taint, not capacity, must turn the intruder away: {message}"
    );

    ns.delete().await;
    t.finish().await;
}
