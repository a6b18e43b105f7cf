//! What every end-to-end test needs: a client for the test cluster, the CRDs installed, a
//! darkcore-operator process of its own (scoped to its pools by label), and waits on watches.

use std::collections::hash_map::DefaultHasher;
use std::fmt::Debug;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use darkcore_crds::{DevicePool, DevicePoolSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{Condition, await_condition, conditions};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

/// Label that scopes a pool to the operator of one test.
pub const TEST_LABEL: &str = "darkcore.io/e2e";

pub async fn client() -> Client {
    assert!(
        std::env::var_os("KUBECONFIG").is_some(),
        "KUBECONFIG is not set: run `make test`, or `tests/cluster/up` and export KUBECONFIG=target/cluster/kubeconfig"
    );
    Client::try_default()
        .await
        .expect("a client for the cluster in KUBECONFIG")
}

/// A short name unique to this test run, usable in Kubernetes names.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let mut h = DefaultHasher::new();
    (
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        SystemTime::now(),
    )
        .hash(&mut h);
    format!("{prefix}-{:08x}", h.finish() as u32)
}

/// Installs the committed CRD YAML (server-side apply, so parallel tests agree) and waits
/// until the API server serves it.
pub async fn ensure_crds(client: &Client) {
    let text = std::fs::read_to_string(workspace().join("crds/generated/crds.yaml")).unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for doc in text
        .split("\n---\n")
        .filter(|d| d.contains("kind: CustomResourceDefinition"))
    {
        let crd: CustomResourceDefinition =
            serde_norway::from_str(doc).expect("committed CRD parses");
        let name = crd.name_any();
        crds.patch(
            &name,
            &PatchParams::apply("darkcore-e2e").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap();
        wait_for(
            &crds,
            &name,
            conditions::is_crd_established(),
            Duration::from_secs(30),
            "CRD established",
        )
        .await;
    }
}

/// The workspace root, from the path cargo gives the running test rather than the one compiled in:
/// a target dir shared between clones must not send one clone's tests to another's files.
pub fn workspace() -> PathBuf {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest.parent().unwrap().to_path_buf()
}

/// Waits, on a watch, until `cond` holds for the object `name`; panics naming `what` on timeout.
pub async fn wait_for<K>(
    api: &Api<K>,
    name: &str,
    cond: impl Condition<K>,
    timeout: Duration,
    what: &str,
) -> Option<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    match tokio::time::timeout(timeout, await_condition(api.clone(), name, cond)).await {
        Ok(result) => result.unwrap_or_else(|e| panic!("watching {name} for {what}: {e}")),
        Err(_) => {
            let now = api.get_opt(name).await.ok().flatten();
            panic!("timed out after {timeout:?} waiting for {what} on {name}; it is now: {now:#?}")
        }
    }
}

/// Asks `probe` every 200 ms until it answers `Ok`, for things no watch can follow (logs, a
/// process, an agent's status file). Panics after `timeout` with `what` and the last answer.
pub async fn poll_until<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(last) => assert!(
                Instant::now() < deadline,
                "{what} within {timeout:?}; last seen: {last}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn node_ready_status(node: &Node) -> Option<String> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status.clone())
}

/// A condition: the node exists and its Ready condition has `status`.
pub fn node_ready_is(status: &'static str) -> impl Condition<Node> {
    move |node: Option<&Node>| node.and_then(node_ready_status).as_deref() == Some(status)
}

/// A namespace of one test's own, deleted by [`TestNamespace::delete`].
pub struct TestNamespace {
    pub name: String,
    client: Client,
}

impl TestNamespace {
    /// Creates the namespace and waits for its default ServiceAccount, without which the API
    /// server refuses pods.
    pub async fn create(client: &Client, prefix: &str) -> TestNamespace {
        let name = unique(prefix);
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let mut ns = Namespace::default();
        ns.metadata.name = Some(name.clone());
        namespaces
            .create(&PostParams::default(), &ns)
            .await
            .unwrap();
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
        wait_for(
            &accounts,
            "default",
            |sa: Option<&ServiceAccount>| sa.is_some(),
            Duration::from_secs(30),
            "default ServiceAccount",
        )
        .await;
        TestNamespace {
            name,
            client: client.clone(),
        }
    }

    /// Runs kubectl in this namespace; returns what it printed, stdout then stderr.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("kubectl")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .expect("kubectl runs");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    pub async fn delete(self) {
        let namespaces: Api<Namespace> = Api::all(self.client);
        let _ = namespaces
            .delete(&self.name, &DeleteParams::default())
            .await;
    }
}

/// A DevicePool scoped to the operator started with the same `scope`.
pub fn pool(name: &str, scope: &str, spec: DevicePoolSpec) -> DevicePool {
    let mut pool = DevicePool::new(name, spec);
    pool.metadata.labels = Some([(TEST_LABEL.to_string(), scope.to_string())].into());
    pool
}

/// The namespace e2e operators keep the device CA, tokens and revocations in: the release's,
/// created by `helm install --create-namespace`.
pub const OPERATOR_NAMESPACE: &str = "darkcore-system";

/// A running darkcore-operator serving only the pools labelled with its scope.
pub struct Operator {
    child: Option<Child>,
    pub http_port: u16,
    pub gateway_port: u16,
    pub kubelet_port: u16,
    pub scope: String,
    pub log: PathBuf,
}

impl Operator {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    pub async fn start(scope: &str) -> Operator {
        Operator::start_on(scope, free_port(), free_port(), kubelet_ports()).await
    }

    /// Starts an operator on given ports: a restarted operator takes its predecessor's, so
    /// agents find it where they left it.
    pub async fn start_on(
        scope: &str,
        port: u16,
        gateway_port: u16,
        kubelet_port: u16,
    ) -> Operator {
        Operator::start_with(scope, port, gateway_port, kubelet_port, &[]).await
    }

    /// Starts an operator with `extra` arguments to `run` and waits until it acts (it leads,
    /// when elected). Like a pod of the chart, it runs as the release's ServiceAccount
    /// (impersonated), and its nodes are owned by the release.
    pub async fn start_with(
        scope: &str,
        port: u16,
        gateway_port: u16,
        kubelet_port: u16,
        extra: &[&str],
    ) -> Operator {
        Operator::spawn(scope, port, gateway_port, kubelet_port, extra, false, None).await
    }

    /// Starts an operator that reaches the API server through `kubeconfig` (a proxy's, say),
    /// on fresh ports.
    pub async fn start_through(scope: &str, kubeconfig: &Path) -> Operator {
        let (port, gateway_port, kubelet_port) = (free_port(), free_port(), kubelet_ports());
        let config = Some(kubeconfig);
        Operator::spawn(scope, port, gateway_port, kubelet_port, &[], false, config).await
    }

    /// Starts an elected operator that is expected to stand by: waits until it is ready to
    /// serve health, leading or not.
    pub async fn start_standby(
        scope: &str,
        port: u16,
        gateway_port: u16,
        kubelet_port: u16,
        extra: &[&str],
    ) -> Operator {
        Operator::spawn(scope, port, gateway_port, kubelet_port, extra, true, None).await
    }

    async fn spawn(
        scope: &str,
        port: u16,
        gateway_port: u16,
        kubelet_port: u16,
        extra: &[&str],
        standby_ok: bool,
        kubeconfig: Option<&Path>,
    ) -> Operator {
        let bin = operator_bin();
        assert!(
            bin.exists(),
            "{} is missing: build it first with `cargo build -p darkcore-operator` (make test does)",
            bin.display()
        );
        crate::helm::ensure_release();
        let log = log_dir().join(format!("operator-{scope}-{port}.log"));
        let mut command = Command::new(&bin);
        command
            .args([
                "run",
                "--http-addr",
                &format!("127.0.0.1:{port}"),
                "--pool-selector",
                &format!("{TEST_LABEL}={scope}"),
                "--gateway-addr",
                &format!("127.0.0.1:{gateway_port}"),
                "--namespace",
                OPERATOR_NAMESPACE,
                "--kubelet-port",
                &kubelet_port.to_string(),
                "--kubelet-port-count",
                &KUBELET_PORT_COUNT.to_string(),
                "--owner-cluster-role",
                crate::helm::CLUSTER_ROLE,
            ])
            .args(extra)
            .args(match extra.contains(&"--kubelet-bind") {
                true => &[][..],
                false => &["--kubelet-bind", "127.0.0.1"][..],
            })
            .env(
                "KUBECONFIG",
                kubeconfig.map_or_else(crate::helm::impersonating_kubeconfig, Path::to_path_buf),
            )
            // Usage records are stored within a second, so tests need not wait 30 s.
            .env("DARKCORE_USAGE_FLUSH_SECONDS", "1")
            .env("RUST_LOG", "info,kube=warn");
        let child = spawn_logged(command, &log);
        let mut operator = Operator {
            child: Some(child),
            http_port: port,
            gateway_port,
            kubelet_port,
            scope: scope.into(),
            log,
        };
        operator.wait_ready(standby_ok).await;
        operator
    }

    async fn wait_ready(&mut self, standby_ok: bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "darkcore-operator exited with {status} before it was ready; log: {}\n{}",
                    self.log.display(),
                    self.log_tail()
                );
            }
            match self.get("/readyz").await {
                Ok((200, body)) if body == "ok\n" || standby_ok => return,
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "darkcore-operator not ready after 30 s; log: {}\n{}",
                self.log.display(),
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills the process outright, as a crash or a lost machine would.
    pub async fn kill(&mut self) {
        kill(&mut self.child).await;
    }

    /// SIGTERM, as Kubernetes stops a pod (a rolling `helm upgrade`), and waits for the exit.
    pub async fn stop(&mut self) -> std::process::ExitStatus {
        terminate(&mut self.child, "the operator").await
    }

    /// A plain HTTP GET against the operator's health and metrics server.
    pub async fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        http_get(self.http_port, path).await
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// A plain HTTP GET on loopback: the status code and the body.
pub async fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// Starts `command` in the background with stdout and stderr appended to `log`; the process
/// is killed if its handle is dropped (a failed test leaves nothing running).
pub fn spawn_logged(mut command: Command, log: &Path) -> Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    command
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {:?}: {e}", command.as_std().get_program()))
}

/// SIGTERM for a process started by [`spawn_logged`]; waits up to 10 s for it to exit.
pub async fn terminate(child: &mut Option<Child>, what: &str) -> std::process::ExitStatus {
    let mut child = child.take().expect("running");
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap_or_else(|_| panic!("{what} stops within 10 s of SIGTERM"))
        .unwrap()
}

/// SIGKILL, as a crash or a pulled plug, for a process started by [`spawn_logged`].
pub async fn kill(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        child.kill().await.unwrap();
    }
}

pub fn operator_bin() -> PathBuf {
    binary("DARKCORE_OPERATOR_BIN", "darkcore-operator")
}

pub fn agent_bin() -> PathBuf {
    binary("DARKCORE_AGENT_BIN", "darkcore-agent")
}

/// A workspace binary: `$VAR` when set, else the debug build in the cargo target dir.
fn binary(var: &str, name: &str) -> PathBuf {
    if let Some(bin) = std::env::var_os(var) {
        return bin.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace().join("target"), PathBuf::from);
    target.join("debug").join(name)
}

/// Where e2e logs go: `$DARKCORE_E2E_LOGS`, else target/e2e-logs.
pub fn log_dir() -> PathBuf {
    let logs = std::env::var_os("DARKCORE_E2E_LOGS")
        .map_or_else(|| workspace().join("target/e2e-logs"), PathBuf::from);
    std::fs::create_dir_all(&logs).unwrap();
    logs
}

/// Runs `darkcore-operator ARGS` as a person would, against the test cluster.
pub fn operator_cli(args: &[&str]) -> std::process::Output {
    let bin = operator_bin();
    std::process::Command::new(&bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()))
}

/// A port no other test of this process has picked and nothing listens on.
pub fn free_port() -> u16 {
    free_ports(1)
}

/// How many ports from its `--kubelet-port` a test's operator may bind: a node per platform at
/// most in a test.
pub const KUBELET_PORT_COUNT: u16 = 4;

/// The first of [`KUBELET_PORT_COUNT`] ports reserved for one operator's kubelet APIs, so that
/// its nodes never take a port picked for another operator of this process (seen: a node's
/// kubelet API took the next operator's health port, and that operator failed to bind it).
pub fn kubelet_ports() -> u16 {
    free_ports(KUBELET_PORT_COUNT)
}

/// The first of `count` consecutive ports, none picked before in this process and all free now.
fn free_ports(count: u16) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    // Below Linux's ephemeral range (32768 and up): a port the kernel hands out for a
    // connection could be taken by one between this pick and the operator's bind (seen: the
    // kubelet API's bind failed with "address in use").
    const FIRST: u32 = 21_000;
    const PORTS: u32 = 11_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id() * 7919 % PORTS;
    loop {
        let offset = (start + NEXT.fetch_add(u32::from(count), Ordering::Relaxed)) % PORTS;
        if offset + u32::from(count) > PORTS {
            continue;
        }
        let first = u16::try_from(FIRST + offset).expect("ports below 32768");
        let free = (first..first + count)
            .all(|port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok());
        if free {
            return first;
        }
    }
}

/// How long a new pool's node may take to turn Ready.
pub const NODE_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A cluster with the CRDs, an operator of this test's own, and one pool it serves, whose
/// linux/amd64 node is `node`. End a test with [`PoolFixture::finish`].
pub struct PoolFixture {
    pub client: Client,
    pub operator: Operator,
    pub pool: String,
    pub node: String,
}

impl PoolFixture {
    pub async fn start(prefix: &str, spec: DevicePoolSpec) -> PoolFixture {
        PoolFixture::start_with(prefix, spec, &[]).await
    }

    /// Like [`PoolFixture::start`], with `extra` arguments to the operator's `run`.
    pub async fn start_with(prefix: &str, spec: DevicePoolSpec, extra: &[&str]) -> PoolFixture {
        let client = client().await;
        ensure_crds(&client).await;
        let scope = unique(prefix);
        let operator =
            Operator::start_with(&scope, free_port(), free_port(), kubelet_ports(), extra).await;
        PoolFixture::with_operator(client, &scope, operator, spec).await
    }

    /// Like [`PoolFixture::start`], with an operator that reaches the API server through
    /// `kubeconfig`.
    pub async fn start_through(
        prefix: &str,
        spec: DevicePoolSpec,
        kubeconfig: &Path,
    ) -> PoolFixture {
        let client = client().await;
        ensure_crds(&client).await;
        let scope = unique(prefix);
        let operator = Operator::start_through(&scope, kubeconfig).await;
        PoolFixture::with_operator(client, &scope, operator, spec).await
    }

    /// The pool `scope`, served by `operator`.
    async fn with_operator(
        client: Client,
        scope: &str,
        operator: Operator,
        spec: DevicePoolSpec,
    ) -> PoolFixture {
        let scope = scope.to_string();
        let pools: Api<DevicePool> = Api::all(client.clone());
        pools
            .create(&PostParams::default(), &pool(&scope, &scope, spec))
            .await
            .unwrap();
        let node = format!("darkcore-{scope}-linux-amd64");
        PoolFixture {
            client,
            operator,
            pool: scope,
            node,
        }
    }

    pub fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    pub fn pools(&self) -> Api<DevicePool> {
        Api::all(self.client.clone())
    }

    pub fn leases(&self) -> Api<Lease> {
        Api::namespaced(self.client.clone(), "kube-node-lease")
    }

    pub async fn ready_node(&self) -> Node {
        wait_for(
            &self.nodes(),
            &self.node,
            node_ready_is("True"),
            NODE_READY_TIMEOUT,
            "node Ready=True",
        )
        .await
        .unwrap()
    }

    /// The node once the scheduler may use it: Ready, and without the `not-ready` taint that
    /// the API server puts on every new node and the node-lifecycle controller removes on its
    /// next pass (every 5 s) after the node turns Ready.
    pub async fn schedulable_node(&self) -> Node {
        let schedulable = |n: Option<&Node>| {
            n.is_some_and(|n| {
                let tainted = n
                    .spec
                    .as_ref()
                    .and_then(|s| s.taints.as_ref())
                    .into_iter()
                    .flatten();
                node_ready_status(n).as_deref() == Some("True")
                    && !tainted
                        .into_iter()
                        .any(|t| t.key == "node.kubernetes.io/not-ready")
            })
        };
        wait_for(
            &self.nodes(),
            &self.node,
            schedulable,
            NODE_READY_TIMEOUT,
            "node Ready without the not-ready taint",
        )
        .await
        .unwrap()
    }

    /// The pool's status, once the operator has written it.
    pub async fn pool_status(&self) -> darkcore_crds::DevicePoolStatus {
        let written = |p: Option<&DevicePool>| {
            p.and_then(|p| p.status.as_ref())
                .is_some_and(|s| !s.nodes.is_empty())
        };
        let pool = wait_for(
            &self.pools(),
            &self.pool,
            written,
            Duration::from_secs(20),
            "pool status",
        )
        .await;
        pool.unwrap().status.unwrap()
    }

    /// Waits until the pool has an Event of each of `reasons` (Events are published apart from
    /// the changes they describe), and returns the pool's Events.
    pub async fn pool_events_include(&self, reasons: &[&str]) -> Vec<String> {
        let what = format!("the pool has Events {reasons:?}");
        poll_until(&what, Duration::from_secs(30), || async move {
            let events = self.pool_events().await;
            let all = reasons
                .iter()
                .all(|r| events.iter().any(|e| e.starts_with(&format!("{r}:"))));
            if all {
                Ok(events)
            } else {
                Err(format!("{events:?}"))
            }
        })
        .await
    }

    /// The pool's Events as "Reason: note", oldest first.
    pub async fn pool_events(&self) -> Vec<String> {
        let events: Api<k8s_openapi::api::core::v1::Event> = Api::all(self.client.clone());
        let list = events
            .list(
                &kube::api::ListParams::default()
                    .fields(&format!("involvedObject.name={}", self.pool)),
            )
            .await
            .unwrap();
        list.items
            .iter()
            .map(|e| {
                format!(
                    "{}: {}",
                    e.reason.clone().unwrap_or_default(),
                    e.message.clone().unwrap_or_default()
                )
            })
            .collect()
    }

    /// The node's lease, once it exists.
    pub async fn lease(&self) -> Lease {
        let exists = |l: Option<&Lease>| l.is_some();
        wait_for(
            &self.leases(),
            &self.node,
            exists,
            Duration::from_secs(20),
            "node lease",
        )
        .await
        .unwrap()
    }

    /// Deletes the pool and waits until it is gone, which happens only once the operator's
    /// finalizer has removed its nodes and leases; only then is the operator stopped.
    pub async fn finish(self) {
        let pools = self.pools();
        if let Some(pool) = pools.get_opt(&self.pool).await.unwrap() {
            let uid = pool.uid().unwrap();
            pools
                .delete(&self.pool, &DeleteParams::default())
                .await
                .unwrap();
            wait_for(
                &pools,
                &self.pool,
                conditions::is_deleted(&uid),
                Duration::from_secs(30),
                "pool deleted (finalizer done)",
            )
            .await;
        }
        drop(self.operator);
    }
}
