//! The Helm chart against the real control plane: lint, server-side validation of everything it
//! renders, the values schema, and a whole install, upgrade and uninstall. `make test` runs this
//! binary before the e2e one, because the uninstall takes the shared release away.

#[allow(dead_code)]
#[path = "../e2e/harness.rs"]
mod harness;
#[allow(dead_code)]
#[path = "../e2e/helm.rs"]
mod helm;

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use darkcore_crds::{DevicePool, DevicePoolSpec};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};

use harness::{OPERATOR_NAMESPACE, PoolFixture, client, poll_until};
use helm::{CLUSTER_ROLE, GATEWAY_SERVICE, RELEASE, chart_dir, helm, helm_ok, pinned};

fn chart() -> String {
    chart_dir().to_str().unwrap().to_string()
}

/// `helm template` of the chart with `sets`, CRDs included, for this cluster's version.
fn template(sets: &[&str]) -> std::process::Output {
    let (chart, version) = (chart(), pinned("K8S_VERSION"));
    let mut args = vec![
        "template",
        RELEASE,
        &chart,
        "--namespace",
        OPERATOR_NAMESPACE,
        "--kube-version",
        &version,
        "--include-crds",
    ];
    for set in sets {
        args.extend(["--set", set]);
    }
    helm(&args)
}

/// `kubectl ARGS` with `input` as its standard input (for `-f -`).
fn kubectl_fed(args: &[&str], input: &[u8]) -> std::process::Output {
    let mut kubectl = Command::new("kubectl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl");
    kubectl.stdin.take().unwrap().write_all(input).unwrap();
    kubectl.wait_with_output().unwrap()
}

/// `kubectl apply --dry-run=server -f -` of `manifest`: the API server validates every object.
fn server_dry_run(manifest: &[u8]) -> std::process::Output {
    kubectl_fed(&["apply", "--dry-run=server", "-f", "-"], manifest)
}

#[test]
fn helm_lint_is_clean() {
    let out = helm(&["lint", "--strict", &chart()]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    for finding in ["[INFO]", "[WARNING]", "[ERROR]"] {
        assert!(!text.contains(finding), "helm lint found something: {text}");
    }
}

#[tokio::test]
async fn every_object_the_chart_renders_is_accepted_by_the_api_server() {
    harness::ensure_crds(&client().await).await;
    // The namespace must exist for a dry run of namespaced objects.
    let _ = kubectl(&["create", "namespace", OPERATOR_NAMESPACE]);
    let every_option: &[&str] = &[
        "operator.replicas=3",
        "operator.priorityClassName=system-cluster-critical",
        "operator.tolerations[0].key=dedicated",
        "operator.tolerations[0].operator=Exists",
        "operator.nodeSelector.kubernetes\\.io/os=linux",
        "operator.imagePullSecrets[0].name=registry",
        "serviceAccount.annotations.example\\.com/role=darkcore",
        "gateway.service.type=LoadBalancer",
        "gateway.service.nodePort=30743",
        "gateway.service.loadBalancerSourceRanges[0]=203.0.113.0/24",
        "gateway.service.externalTrafficPolicy=Local",
        "gateway.tls.extraNames[0]=gateway.example.com",
        "gateway.publicAddress=gateway.example.com:7443",
        "kubelet.portCount=20",
        "networkPolicy.enabled=true",
        "networkPolicy.apiServerCIDRs[0]=10.0.0.1/32",
        "networkPolicy.gatewayFrom[0].ipBlock.cidr=0.0.0.0/0",
        "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.name=monitoring",
    ];
    for sets in [&[][..], every_option] {
        let rendered = template(sets);
        assert!(
            rendered.status.success(),
            "helm template {sets:?}: {}",
            String::from_utf8_lossy(&rendered.stderr)
        );
        let applied = server_dry_run(&rendered.stdout);
        assert!(
            applied.status.success(),
            "the API server refused what the chart renders with {sets:?}: {}",
            String::from_utf8_lossy(&applied.stderr)
        );
        let kinds = String::from_utf8_lossy(&applied.stdout).into_owned();
        assert!(
            kinds.contains("deployment.apps/darkcore-operator"),
            "{kinds}"
        );
    }
}

/// The operator never runs as a pod here (no kubelet), so check what the pod would be given:
/// every variable the Deployment sets is one `darkcore-operator run` reads (a misspelt name
/// would be silently ignored), and the Deployment runs `run`.
#[test]
fn the_deployment_sets_only_variables_the_operator_reads() {
    let rendered = template(&["gateway.tls.extraNames[0]=gw.example.com"]);
    assert!(rendered.status.success());
    let text = String::from_utf8_lossy(&rendered.stdout).into_owned();
    let deployment = text
        .split("\n---")
        .find(|doc| doc.contains("kind: Deployment"))
        .expect("a Deployment");
    let deployment: Deployment = serde_norway::from_str(deployment).unwrap();
    let container = &deployment.spec.unwrap().template.spec.unwrap().containers[0];
    assert_eq!(container.args.as_deref(), Some(&["run".to_string()][..]));
    let help = harness::operator_cli(&["run", "--help"]);
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let unread: Vec<&str> = container
        .env
        .iter()
        .flatten()
        .map(|e| e.name.as_str())
        .filter(|name| *name != "RUST_LOG" && !help.contains(&format!("[env: {name}=")))
        .collect();
    assert!(
        unread.is_empty(),
        "darkcore-operator run does not read {unread:?}"
    );
}

#[test]
fn bad_values_are_refused_naming_the_value() {
    let cases: &[(&str, &str)] = &[
        ("operator.replicas=two", "operator.replicas"),
        ("operator.replicas=-1", "operator.replicas"),
        ("operator.replicaCount=2", "replicaCount"),
        ("gateway.service.type=Public", "gateway.service.type"),
        ("gateway.port=70000", "gateway.port"),
        (
            "operator.leaderElection.leaseSeconds=1",
            "operator.leaderElection.leaseSeconds",
        ),
        (
            "operator.image.pullPolicy=Sometimes",
            "operator.image.pullPolicy",
        ),
        (
            "networkPolicy.apiServerCIDRs[0]=everywhere",
            "networkPolicy.apiServerCIDRs.0",
        ),
        (
            "metrics.serviceMonitor.interval=often",
            "metrics.serviceMonitor.interval",
        ),
    ];
    for (set, named) in cases {
        let out = template(&[set]);
        let error = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "--set {set} was accepted");
        assert!(
            error.contains(named),
            "the refusal of --set {set} names {named}: {error}"
        );
    }
    // Without the Prometheus Operator's CRDs, a ServiceMonitor is refused with the fix.
    let out = template(&["metrics.serviceMonitor.enabled=true"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("install the Prometheus Operator"));
}

/// Users bound to Kubernetes' built-in view and edit roles.
const VIEWER: &str = "darkcore-chart-viewer";
const EDITOR: &str = "darkcore-chart-editor";

/// `kubectl ARGS`, as the test runner's admin.
fn kubectl(args: &[&str]) -> std::process::Output {
    Command::new("kubectl")
        .args(args)
        .output()
        .expect("kubectl")
}

/// `kubectl auth can-i VERB WHAT --as USER`; WHAT may name a subresource (`kind/sub`).
fn can_i(user: &str, verb: &str, what: &str) -> bool {
    let (resource, sub) = what.split_once('/').unwrap_or((what, ""));
    let subresource = format!("--subresource={sub}");
    let mut args = vec!["auth", "can-i", verb, resource, "--as", user];
    if !sub.is_empty() {
        args.push(&subresource);
    }
    let out = kubectl(&args);
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}

/// Objects of `kind` (as `kubectl get` takes it) labelled as the release's, by name.
fn release_objects(kind: &str) -> Vec<String> {
    let out = kubectl(&[
        "get",
        kind,
        "--all-namespaces",
        "-l",
        &format!("app.kubernetes.io/instance={RELEASE}"),
        "-o",
        "name",
    ]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn install_upgrade_and_uninstall_leave_nothing_of_darkcores_behind() {
    let client = client().await;
    harness::ensure_crds(&client).await;
    // Start from no release: the e2e binary's runs leave theirs installed.
    let _ = helm(&[
        "uninstall",
        RELEASE,
        "--namespace",
        OPERATOR_NAMESPACE,
        "--wait",
    ]);
    helm_ok(&[
        "install",
        RELEASE,
        &chart(),
        "--namespace",
        OPERATOR_NAMESPACE,
        "--create-namespace",
        "--set",
        "operator.replicas=0",
        "--wait",
    ]);
    let manifest = helm_ok(&[
        "get",
        "manifest",
        RELEASE,
        "--namespace",
        OPERATOR_NAMESPACE,
    ]);
    let listed = kubectl_fed(&["get", "-f", "-"], manifest.as_bytes());
    assert!(
        listed.status.success(),
        "every object of the release exists: {}",
        String::from_utf8_lossy(&listed.stderr)
    );

    // People: Kubernetes' view role reads pools and usage, edit also scales pools, and
    // nobody but the operator writes usage.
    for (user, role) in [(VIEWER, "view"), (EDITOR, "edit")] {
        let _ = kubectl(&["delete", "clusterrolebinding", user, "--ignore-not-found"]);
        let bound = kubectl(&[
            "create",
            "clusterrolebinding",
            user,
            "--clusterrole",
            role,
            "--user",
            user,
        ]);
        assert!(
            bound.status.success(),
            "{}",
            String::from_utf8_lossy(&bound.stderr)
        );
    }
    poll_until(
        "view and edit aggregate darkcore's roles",
        Duration::from_secs(30),
        || async {
            let granted = [
                (VIEWER, "list", "poolusages"),
                (VIEWER, "watch", "devicepools"),
                (EDITOR, "patch", "devicepools/scale"),
                (EDITOR, "create", "devicepools"),
            ];
            match granted
                .iter()
                .find(|(user, verb, what)| !can_i(user, verb, what))
            {
                None => Ok(()),
                Some(missing) => Err(format!("not yet allowed: {missing:?}")),
            }
        },
    )
    .await;
    for (user, verb, what) in [
        (VIEWER, "patch", "devicepools"),
        (EDITOR, "create", "poolusages"),
        (EDITOR, "update", "poolusages"),
    ] {
        assert!(!can_i(user, verb, what), "{user} may not {verb} {what}");
    }
    for user in [VIEWER, EDITOR] {
        let _ = kubectl(&["delete", "clusterrolebinding", user]);
    }

    // The operator as the chart's Deployment runs it: elected, publishing the gateway's
    // EndpointSlice, nodes owned by the release. Its pool gets a node and a lease.
    let lease_name = format!("{RELEASE}-operator");
    let election = [
        "--leader-elect",
        "--leader-election-lease",
        &lease_name,
        "--gateway-service",
        GATEWAY_SERVICE,
        "--node-address",
        "192.0.2.10",
    ];
    let mut fx = PoolFixture::start_with("chart", DevicePoolSpec::default(), &election).await;
    fx.ready_node().await;
    let nodes = fx.nodes();
    let node_leases = fx.leases();
    let leases: Api<Lease> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let slice = format!("{GATEWAY_SERVICE}-leader");
    assert!(node_leases.get_opt(&fx.node).await.unwrap().is_some());
    assert!(leases.get_opt(&lease_name).await.unwrap().is_some());
    assert!(slices.get_opt(&slice).await.unwrap().is_some());
    let node = nodes.get(&fx.node).await.unwrap();
    assert_eq!(node.owner_references()[0].name, CLUSTER_ROLE);

    // An upgrade with changed values: applied, and the operator's nodes stay.
    let services: Api<Service> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let gateway_uid = services.get(GATEWAY_SERVICE).await.unwrap().uid();
    helm_ok(&[
        "upgrade",
        RELEASE,
        &chart(),
        "--namespace",
        OPERATOR_NAMESPACE,
        "--reuse-values",
        "--set",
        "operator.logLevel=debug",
        "--set",
        "gateway.service.type=NodePort",
        "--wait",
    ]);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let deployment = deployments.get(&lease_name).await.unwrap();
    let env = deployment.spec.unwrap().template.spec.unwrap().containers[0]
        .env
        .clone()
        .unwrap();
    assert!(
        env.iter()
            .any(|e| e.name == "RUST_LOG" && e.value.as_deref() == Some("debug"))
    );
    let gateway = services.get(GATEWAY_SERVICE).await.unwrap();
    assert_eq!(gateway.spec.unwrap().type_.as_deref(), Some("NodePort"));
    assert_eq!(
        gateway.metadata.uid, gateway_uid,
        "the upgrade kept the Service"
    );
    assert!(
        slices.get_opt(&slice).await.unwrap().is_some(),
        "and its EndpointSlice"
    );
    harness::wait_for(
        &nodes,
        &fx.node,
        harness::node_ready_is("True"),
        Duration::from_secs(30),
        "the node stays Ready through the upgrade",
    )
    .await;

    // Uninstall: the Deployment's pods stop, then Helm deletes what it made.
    fx.operator.kill().await;
    helm_ok(&[
        "uninstall",
        RELEASE,
        "--namespace",
        OPERATOR_NAMESPACE,
        "--wait",
    ]);
    let remains = |what: &str| format!("{what} remains after helm uninstall");
    poll_until(&remains("a darkcore node, lease or EndpointSlice"), Duration::from_secs(60), || async {
        let darkcore_nodes: Vec<String> = nodes
            .list(&ListParams::default().labels("darkcore.io/pool"))
            .await
            .unwrap()
            .items
            .iter()
            .map(|n: &Node| n.name_any())
            .collect();
        let node_lease = node_leases.get_opt(&fx.node).await.unwrap().map(|l| l.name_any());
        let election = leases.get_opt(&lease_name).await.unwrap().map(|l| l.name_any());
        let endpoint = slices.get_opt(&slice).await.unwrap().map(|s| s.name_any());
        if darkcore_nodes.is_empty() && node_lease.is_none() && election.is_none() && endpoint.is_none() {
            Ok(())
        } else {
            Err(format!("nodes {darkcore_nodes:?}, node lease {node_lease:?}, election lease {election:?}, slice {endpoint:?}"))
        }
    })
    .await;
    let runtime_classes: Api<RuntimeClass> = Api::all(client.clone());
    for class in ["darkcore-process", "darkcore-oci", "darkcore-wasm"] {
        assert!(
            runtime_classes.get_opt(class).await.unwrap().is_none(),
            "{}",
            remains(class)
        );
    }
    let mut left = Vec::new();
    for kind in [
        "all",
        "clusterroles",
        "clusterrolebindings",
        "roles",
        "rolebindings",
        "serviceaccounts",
        "poddisruptionbudgets",
        "networkpolicies",
        "runtimeclasses",
        "endpointslices",
    ] {
        left.extend(release_objects(kind));
    }
    assert!(
        left.is_empty(),
        "{}: {left:?}",
        remains("an object of the release")
    );

    // What stays, as documented: the CRD and the pool (now without an operator to remove its
    // finalizer, which the README says how to clear).
    let pools: Api<DevicePool> = Api::all(client.clone());
    let pool = pools.get(&fx.pool).await.expect("the pool stays");
    assert!(
        pool.finalizers()
            .iter()
            .any(|f| f == "darkcore.io/pool-cleanup")
    );
    pools
        .patch(
            &fx.pool,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "metadata": { "finalizers": null } })),
        )
        .await
        .unwrap();
    pools.delete(&fx.pool, &Default::default()).await.unwrap();
}
