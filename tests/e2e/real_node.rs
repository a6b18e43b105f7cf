//! Tests on the real node that `tests/cluster/node up` adds to the control plane (a kubelet
//! with containerd, kube-proxy, and metrics-server running on it as a pod): `kubectl top` and a
//! CPU HorizontalPodAutoscaler on darkcore pods, read by metrics-server unchanged. `make test`
//! runs them after the other tests, once the node is up (`-- real_node::`).

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;

use crate::devices::process_pool;
use crate::harness::poll_until;
use crate::kubelet_api::NodeNet;
use crate::pods::Bench;

/// The figures `kubectl top` prints for `args` (`pod NAME` or `node NAME`): millicores and
/// MiB, once metrics-server has them.
fn top(bench: &Bench, args: &[&str]) -> Result<(u64, u64), String> {
    let mut command = vec!["top"];
    command.extend_from_slice(args);
    command.push("--no-headers");
    let out = bench.kubectl(&command);
    let fields: Vec<&str> = out.split_whitespace().collect();
    let (cpu, memory) = match fields.as_slice() {
        [_, cpu, memory] | [_, cpu, _, memory, _] => (*cpu, *memory),
        _ => return Err(out),
    };
    let millicores = cpu.strip_suffix('m').and_then(|c| c.parse().ok());
    let mib = memory.strip_suffix("Mi").and_then(|m| m.parse().ok());
    match (millicores, mib) {
        (Some(c), Some(m)) => Ok((c, m)),
        _ => Err(out),
    }
}

/// A pool whose node publishes an address the metrics-server pod can reach (the host end of a
/// veth pair: pods on the real node have a route to 198.18.0.0/15 and no other way out).
async fn reachable_bench(prefix: &str, net: &NodeNet) -> Bench {
    let address = net.address.as_str();
    let extra = ["--node-address", address, "--kubelet-bind", address];
    Bench::start_with(prefix, 1, process_pool(), &extra).await
}

#[tokio::test]
async fn kubectl_top_shows_a_darkcore_pod_and_its_node_through_metrics_server() {
    let net = NodeNet::up("e2etop", 80);
    let bench = reachable_bench("top", &net).await;
    bench
        .create(bench.pod("busy", "while :; do :; done", "Never"))
        .await;
    bench
        .phase_is("busy", "Running", Duration::from_secs(60))
        .await;
    // metrics-server scrapes every 15 s and needs two readings for a rate.
    let (cpu, memory) = poll_until(
        "kubectl top pod shows the busy pod's CPU",
        Duration::from_secs(120),
        || async {
            match top(&bench, &["pod", "busy"])? {
                (cpu, memory) if cpu >= 200 => Ok((cpu, memory)),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    eprintln!("kubectl top pod busy: {cpu}m CPU, {memory}Mi memory");
    let node = bench.fx.node.clone();
    let (node_cpu, _) = poll_until(
        "kubectl top node shows the darkcore node's CPU",
        Duration::from_secs(120),
        || async {
            match top(&bench, &["node", &node])? {
                (cpu, memory) if cpu >= 200 => Ok((cpu, memory)),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    eprintln!("kubectl top node {node}: {node_cpu}m CPU");
    bench.finish().await;
    drop(net);
}

#[tokio::test]
async fn a_cpu_autoscaler_scales_a_deployment_of_darkcore_pods() {
    let net = NodeNet::up("e2ehpa", 81);
    let bench = reachable_bench("hpa", &net).await;
    // Each pod asks for 100m and spins on a whole core: ten times its request.
    let mut template: Pod = bench.pod("spinner", "while :; do :; done", "Always");
    template.spec.as_mut().unwrap().containers[0].resources = Some(
        serde_json::from_value(
            serde_json::json!({ "requests": { "cpu": "100m", "memory": "16Mi" } }),
        )
        .unwrap(),
    );
    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": "spinner" },
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": { "app": "spinner" } },
            "template": {
                "metadata": { "labels": { "app": "spinner" } },
                "spec": template.spec,
            },
        },
    }))
    .unwrap();
    let deployments: kube::Api<Deployment> =
        kube::Api::namespaced(bench.fx.client.clone(), &bench.ns.name);
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let out = bench.kubectl(&[
        "autoscale",
        "deployment",
        "spinner",
        "--cpu-percent=50",
        "--min=1",
        "--max=3",
    ]);
    assert!(out.contains("autoscaled"), "{out}");
    let replicas = poll_until(
        "the autoscaler scales the deployment past one replica",
        Duration::from_secs(180),
        || async {
            let hpa = bench.kubectl(&[
                "get",
                "hpa",
                "spinner",
                "-o",
                "jsonpath={.status.desiredReplicas} {.status.currentMetrics}",
            ]);
            let desired: i32 = hpa
                .split_whitespace()
                .next()
                .and_then(|d| d.parse().ok())
                .unwrap_or(0);
            if desired > 1 { Ok(desired) } else { Err(hpa) }
        },
    )
    .await;
    eprintln!("hpa: the autoscaler wants {replicas} replicas");
    // The new replicas run on darkcore too.
    poll_until(
        "the deployment's new replicas run",
        Duration::from_secs(120),
        || async {
            let running = bench.kubectl(&[
                "get",
                "pods",
                "-l",
                "app=spinner",
                "--field-selector=status.phase=Running",
                "-o",
                "name",
            ]);
            match running.lines().count() {
                n if n > 1 => Ok(n),
                _ => Err(running),
            }
        },
    )
    .await;
    bench.finish().await;
    drop(net);
}
