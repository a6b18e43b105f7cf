//! Tests on the real node that `tests/cluster/node up` adds to the control plane (a kubelet
//! with containerd, kube-proxy, and metrics-server running on it as a pod): `kubectl top` and a
//! CPU HorizontalPodAutoscaler on darkcore pods, read by metrics-server unchanged; and the
//! chart running the operator as two real pods. `make test` runs them after the other tests,
//! once the node is up (`-- real_node::`).

use std::time::{Duration, Instant};

use darkcore_crds::{DevicePool, DevicePoolSpec, Runtime};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::api::PostParams;

use crate::devices::process_pool;
use crate::fleet::{Agent, token_in};
use crate::harness::{
    TEST_LABEL, TestNamespace, log_dir, node_ready_is, operator_bin, poll_until, unique, wait_for,
};
use crate::helm::helm_ok;
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
    // An idle pod: its agent sends one reading, then nothing while nothing changes.
    bench.create(bench.pod("idle", "sleep 600", "Never")).await;
    bench
        .phase_is("busy", "Running", Duration::from_secs(60))
        .await;
    bench
        .phase_is("idle", "Running", Duration::from_secs(60))
        .await;
    // metrics-server scrapes every 15 s and needs two readings for a rate. How much CPU the
    // spinning pod gets depends on what else this machine runs: any is a real reading.
    let (cpu, memory) = poll_until(
        "kubectl top pod shows the busy pod's CPU",
        Duration::from_secs(120),
        || async {
            match top(&bench, &["pod", "busy"])? {
                (cpu, memory) if cpu > 0 => Ok((cpu, memory)),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    eprintln!("kubectl top pod busy: {cpu}m CPU, {memory}Mi memory");
    // metrics-server shows the idle pod too: its figures stand while its device is online.
    let idle = poll_until(
        "kubectl top pod shows the idle pod",
        Duration::from_secs(120),
        || async { top(&bench, &["pod", "idle"]) },
    )
    .await;
    eprintln!("kubectl top pod idle: {}m CPU, {}Mi memory", idle.0, idle.1);
    let node = bench.fx.node.clone();
    let (node_cpu, _) = poll_until(
        "kubectl top node shows the darkcore node's CPU",
        Duration::from_secs(120),
        || async {
            match top(&bench, &["node", &node])? {
                (cpu, memory) if cpu > 0 => Ok((cpu, memory)),
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

/// The chart's release that runs the operator as pods on the real node.
const POD_RELEASE: &str = "darkcore-pods";
const POD_NAMESPACE: &str = "darkcore-pods";

/// Pushes the operator built for these tests as an image (its debug symbols stripped, the
/// rest as built) with darkcore-push; returns the repository and the tag.
fn push_operator_image() -> (String, String) {
    let stripped = log_dir().join("operator-image").join("darkcore-operator");
    std::fs::create_dir_all(stripped.parent().unwrap()).unwrap();
    let strip = std::process::Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&stripped)
        .arg(operator_bin())
        .status()
        .expect("strip (binutils) runs");
    assert!(strip.success());
    let push = operator_bin().with_file_name("darkcore-push");
    let repository = format!("{}/darkcore/operator", crate::images::registry());
    let tag = unique("e2e");
    let out = std::process::Command::new(&push)
        .arg("program")
        .arg(&stripped)
        .arg(format!("{repository}:{tag}"))
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", push.display()));
    assert!(
        out.status.success(),
        "darkcore-push: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (repository, tag)
}

/// The operator processes of the release's pods, as this machine sees them: pid, and the
/// lines of /proc/PID/status that the securityContext sets.
fn operator_processes() -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if !cmdline.starts_with(b"/usr/local/bin/darkcore-operator\0run") {
            continue;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let wanted: Vec<&str> = status
            .lines()
            .filter(|l| {
                ["Uid:", "Gid:", "CapEff:", "NoNewPrivs:", "Seccomp:"]
                    .iter()
                    .any(|k| l.starts_with(k))
            })
            .collect();
        found.push((pid, wanted.join("\n")));
    }
    found
}

/// The holder of the release's leader-election Lease.
async fn leader(client: &kube::Client) -> Option<String> {
    let leases: kube::Api<Lease> = kube::Api::namespaced(client.clone(), POD_NAMESPACE);
    let lease = leases
        .get_opt(&format!("{POD_RELEASE}-operator"))
        .await
        .ok()??;
    lease.spec?.holder_identity
}

#[tokio::test]
async fn the_chart_runs_two_operator_pods_that_serve_logs_exec_port_forward_and_top_and_hand_over_without_rerunning()
 {
    let client = crate::harness::client().await;
    let (repository, tag) = push_operator_image();
    let selector = format!("{TEST_LABEL}=chart-pods");
    let chart = crate::helm::chart_dir();
    let started = Instant::now();
    helm_ok(&[
        "upgrade",
        "--install",
        POD_RELEASE,
        chart.to_str().unwrap(),
        "--namespace",
        POD_NAMESPACE,
        "--create-namespace",
        "--set",
        &format!("operator.image.repository={repository}"),
        "--set",
        &format!("operator.image.tag={tag}"),
        "--set",
        "runtimeClasses.create=false",
        "--set",
        &format!("operator.poolSelector={selector}"),
        "--set",
        "operator.nodeSelector.kubernetes\\.io/hostname=darkcore-real-node",
        "--set-json",
        "operator.tolerations=[{\"key\":\"darkcore.dev/real-node\",\"operator\":\"Exists\",\"effect\":\"NoSchedule\"}]",
        "--wait",
        "--timeout",
        "240s",
    ]);
    eprintln!(
        "chart: 2 operator pods Ready {:?} after helm install began",
        started.elapsed()
    );
    let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), POD_NAMESPACE);
    let names: Vec<String> = pods
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    // The securityContext holds on the machine: not root, no capabilities, no new privileges,
    // under a seccomp filter.
    let processes = operator_processes();
    assert_eq!(processes.len(), 2, "{processes:?}");
    for (pid, status) in &processes {
        assert!(
            status.contains("Uid:\t65532\t65532\t65532\t65532"),
            "{pid}: {status}"
        );
        assert!(
            status.contains("CapEff:\t0000000000000000"),
            "{pid}: {status}"
        );
        assert!(status.contains("NoNewPrivs:\t1"), "{pid}: {status}");
        assert!(status.contains("Seccomp:\t2"), "{pid}: {status}");
    }
    let first_leader = poll_until(
        "one operator pod leads",
        Duration::from_secs(60),
        || async {
            leader(&client)
                .await
                .filter(|l| names.contains(l))
                .ok_or_else(|| "no holder".to_string())
        },
    )
    .await;

    // A pool for the release, and a device that joins through the gateway Service.
    let pool_name = unique("chartpods");
    let pools: kube::Api<DevicePool> = kube::Api::all(client.clone());
    let spec = DevicePoolSpec {
        runtimes: vec![Runtime::Process, Runtime::Oci],
        ..process_pool()
    };
    let mut pool = DevicePool::new(&pool_name, spec);
    pool.metadata.labels = Some([(TEST_LABEL.to_string(), "chart-pods".to_string())].into());
    pools.create(&PostParams::default(), &pool).await.unwrap();
    let services: kube::Api<Service> = kube::Api::namespaced(client.clone(), POD_NAMESPACE);
    let gateway = services
        .get(&format!("{POD_RELEASE}-gateway"))
        .await
        .unwrap();
    let cluster_ip = gateway.spec.unwrap().cluster_ip.unwrap();
    let token = token_in(POD_NAMESPACE, &pool_name, &[]);
    let _agent = Agent::start_at(&format!("{cluster_ip}:7443"), &token, 1.0).await;
    let node = format!("darkcore-{pool_name}-linux-amd64");
    let nodes: kube::Api<Node> = kube::Api::all(client.clone());
    wait_for(
        &nodes,
        &node,
        node_ready_is("True"),
        Duration::from_secs(90),
        "node Ready=True",
    )
    .await;

    // A pod on it: logs, exec and top through the API server and the operator pod.
    let ns = TestNamespace::create(&client, "chartpods").await;
    let record = log_dir().join(format!("{}.record", unique("chartpods")));
    let script = format!(
        "echo start >> {}; echo hello; while :; do :; done",
        record.display()
    );
    let pod = pool_pod("served", "darkcore-process", &pool_name, "busybox", &script);
    let user_pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), &ns.name);
    user_pods
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
    let kubectl = |args: &[&str]| ns.kubectl(args);
    poll_until(
        "the pod's logs show hello",
        Duration::from_secs(90),
        || async {
            let logs = kubectl(&["logs", "served"]);
            if logs.contains("hello") {
                Ok(())
            } else {
                Err(logs)
            }
        },
    )
    .await;
    let exec = kubectl(&["exec", "served", "--", "echo", "through the operator pod"]);
    assert_eq!(exec, "through the operator pod\n");
    crate::exec::exec_with_a_terminal(&ns.name, "served").await;
    port_forward_to_a_container(&client, &ns, &pool_name).await;
    poll_until(
        "kubectl top pod shows it",
        Duration::from_secs(120),
        || async {
            let top = kubectl(&["top", "pod", "served", "--no-headers"]);
            if top.starts_with("served ") {
                Ok(())
            } else {
                Err(top)
            }
        },
    )
    .await;

    let operators = kubectl(&["-n", POD_NAMESPACE, "top", "pod", "--no-headers"]);
    eprintln!("chart: the operator pods as metrics-server sees them:\n{operators}");
    // The leader's pod is deleted: another takes over (the standby, or the pod that replaces
    // the deleted one: whichever asks first), and the task is not run again.
    let deleted = Instant::now();
    kubectl(&[
        "-n",
        POD_NAMESPACE,
        "delete",
        "pod",
        &first_leader,
        "--wait=false",
    ]);
    let second = poll_until(
        "another operator pod leads",
        Duration::from_secs(90),
        || async {
            match leader(&client).await {
                Some(l) if l != first_leader => Ok(l),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    eprintln!(
        "chart: {second} took over from {first_leader} {:?} after its pod was deleted",
        deleted.elapsed()
    );
    // Served by the new leader: exec reaches the same run.
    poll_until(
        "exec through the new leader",
        Duration::from_secs(90),
        || async {
            let out = kubectl(&["exec", "served", "--", "echo", "still here"]);
            if out == "still here\n" {
                Ok(())
            } else {
                Err(out)
            }
        },
    )
    .await;
    let starts = std::fs::read_to_string(&record).unwrap();
    assert_eq!(starts, "start\n", "the task ran again: {starts}");
    let phase = user_pods.get("served").await.unwrap().status.unwrap().phase;
    assert_eq!(phase.as_deref(), Some("Running"));

    // helm uninstall: the release's nodes go with it.
    helm_ok(&[
        "uninstall",
        POD_RELEASE,
        "--namespace",
        POD_NAMESPACE,
        "--wait",
        "--timeout",
        "120s",
    ]);
    let node_leases: kube::Api<Lease> = kube::Api::namespaced(client.clone(), "kube-node-lease");
    let election_leases: kube::Api<Lease> = kube::Api::namespaced(client.clone(), POD_NAMESPACE);
    poll_until(
        "the release's node, its lease and the election lease are gone",
        Duration::from_secs(120),
        || async {
            let left = (
                nodes.get_opt(&node).await.unwrap().is_some(),
                node_leases.get_opt(&node).await.unwrap().is_some(),
                election_leases
                    .get_opt(&format!("{POD_RELEASE}-operator"))
                    .await
                    .unwrap()
                    .is_some(),
            );
            match left {
                (false, false, false) => Ok(()),
                (node, lease, election) => Err(format!(
                    "node left: {node}, node lease left: {lease}, election lease left: {election}"
                )),
            }
        },
    )
    .await;
    // The operator pods end within their grace period (30 s), letting go of what they hold.
    poll_until(
        "the operator pods are gone",
        Duration::from_secs(90),
        || async {
            let left = pods.list(&Default::default()).await.unwrap().items;
            match left.len() {
                0 => Ok(()),
                n => Err(format!("{n} left")),
            }
        },
    )
    .await;
    let _ = pools.delete(&pool_name, &Default::default()).await;
    ns.delete().await;
}

/// An `oci` web server on the pool, reached by `kubectl port-forward` through the API server
/// and the operator pod: a page, and 8 MiB whole.
async fn port_forward_to_a_container(client: &kube::Client, ns: &TestNamespace, pool: &str) {
    use crate::port_forward::{Forward, body, http_get, until_serving, web_server};
    const MIB: usize = 8;
    let (image, _) = crate::images::push_busybox(&format!("e2e/{}/busybox:v1", ns.name)).await;
    let script = web_server("hello from the container", MIB);
    let pod = pool_pod("web", "darkcore-oci", pool, &image, &script);
    let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), &ns.name);
    pods.create(&PostParams::default(), &pod).await.unwrap();
    until_serving(ns, "web", "hello from the container").await;
    let forward = Forward::start(&ns.name, "web", 8080).await;
    assert_eq!(
        body(&http_get(forward.port, "/index.html")),
        b"hello from the container\n"
    );
    let started = Instant::now();
    let big = http_get(forward.port, "/big");
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(body(&big).len(), MIB << 20, "the whole file comes through");
    eprintln!(
        "chart: port-forward through the operator pod: {MIB} MiB in {seconds:.2} s ({:.1} MiB/s)",
        MIB as f64 / seconds
    );
    forward.stop().await;
}

/// A pod `name` of `runtime_class` on `pool`, running `script` in sh from `image`.
fn pool_pod(name: &str, runtime_class: &str, pool: &str, image: &str, script: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name },
        "spec": {
            "runtimeClassName": runtime_class,
            "nodeSelector": { "darkcore.io/pool": pool },
            "terminationGracePeriodSeconds": 5,
            "containers": [{ "name": "main", "image": image, "command": ["sh", "-c", script] }]
        }
    }))
    .unwrap()
}
