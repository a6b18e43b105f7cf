//! Pods on devices: real agents run `darkcore-process` pods; status, logs through the real
//! apiserver (`kubectl logs`, which reaches the operator's kubelet API), restarts, deletion,
//! devices lost and owners coming back.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use darkcore_crds::device_pool::{SecretPolicy, SecretRule};
use darkcore_crds::{Arch, DevicePoolSpec, DeviceSelector};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Pod, Secret};
use kube::api::{ListParams, PostParams};
use kube::{Api, ResourceExt};

use crate::devices::{process_pool, quick_loss_pool};
use crate::fleet::{self, Agent, token};
use crate::harness::{PoolFixture, TestNamespace, log_dir, poll_until, unique, wait_for};

/// A pool of process-runtime agents and a namespace for its pods.
pub struct Bench {
    pub fx: PoolFixture,
    pub ns: TestNamespace,
    pub agents: Vec<Agent>,
}

impl Bench {
    pub async fn start(prefix: &str, agents: usize, spec: DevicePoolSpec) -> Bench {
        Bench::start_with(prefix, agents, spec, &[]).await
    }

    /// A bench whose pool admits amd64 and arm64 devices (`spec`, with that selector): one
    /// amd64 agent, and an arm64 one, returned with its node's name once the node offers it.
    pub async fn start_two_arches(prefix: &str, spec: DevicePoolSpec) -> (Bench, Agent, String) {
        let two_arches = DevicePoolSpec {
            selector: DeviceSelector {
                arch: vec![Arch::Amd64, Arch::Arm64],
                ..Default::default()
            },
            ..spec
        };
        let bench = Bench::start(prefix, 1, two_arches).await;
        let token = token(&bench.fx.pool, &["--uses", "1"]);
        let gateway = bench.fx.operator.gateway_port;
        let arm = Agent::start_as_arch(gateway, &token, "arm64").await;
        let arm_node = format!("darkcore-{}-linux-arm64", bench.fx.pool);
        fleet::node_cpu_is(&bench.fx.nodes(), &arm_node, 1000, Duration::from_secs(30)).await;
        (bench, arm, arm_node)
    }

    /// Like [`Bench::start`], with `extra` arguments to the operator's `run`.
    pub async fn start_with(
        prefix: &str,
        agents: usize,
        spec: DevicePoolSpec,
        extra: &[&str],
    ) -> Bench {
        let fx = PoolFixture::start_with(prefix, spec, extra).await;
        Bench::on(fx, prefix, agents).await
    }

    /// A bench on a pool already made: a namespace, and `agents` devices of one core joined.
    pub async fn on(fx: PoolFixture, prefix: &str, agents: usize) -> Bench {
        let ns = TestNamespace::create(&fx.client, prefix).await;
        let token = token(&fx.pool, &["--uses", "10"]);
        let mut started = Vec::new();
        for _ in 0..agents {
            started.push(Agent::start(fx.operator.gateway_port, &token, 1.0).await);
        }
        fleet::node_cpu_is(
            &fx.nodes(),
            &fx.node,
            1000 * agents as u64,
            Duration::from_secs(30),
        )
        .await;
        Bench {
            fx,
            ns,
            agents: started,
        }
    }

    /// Joins one more agent (of one core; `testing` is more agent config, as for
    /// [`Agent::start_with`]), waits until the node counts its core, and returns its id.
    pub async fn add_agent(&mut self, testing: &str) -> String {
        let token = token(&self.fx.pool, &[]);
        self.add_agent_with(&token, testing).await
    }

    /// As [`Bench::add_agent`], joining with `token`; returns the new device's id.
    pub async fn add_agent_with(&mut self, token: &str, testing: &str) -> String {
        let agent = Agent::start_with(self.fx.operator.gateway_port, token, 1.0, testing).await;
        let device = agent.device_id.clone();
        self.agents.push(agent);
        fleet::node_cpu_is(
            &self.fx.nodes(),
            &self.fx.node,
            1000 * self.agents.len() as u64,
            Duration::from_secs(30),
        )
        .await;
        device
    }

    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.fx.client.clone(), &self.ns.name)
    }

    /// A pod for this pool in `runtime_class` with one container `main` (given as JSON without
    /// its name) and a 5 s grace period.
    pub fn pod_in(
        &self,
        runtime_class: &str,
        name: &str,
        container: serde_json::Value,
        restart: &str,
    ) -> Pod {
        let mut container = container;
        container["name"] = "main".into();
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": name },
            "spec": {
                "runtimeClassName": runtime_class,
                "nodeSelector": { "darkcore.io/pool": self.fx.pool },
                "restartPolicy": restart,
                "terminationGracePeriodSeconds": 5,
                "containers": [container]
            }
        }))
        .unwrap()
    }

    /// A `darkcore-process` pod for this pool running `script` in sh.
    pub fn pod(&self, name: &str, script: &str, restart: &str) -> Pod {
        let container = serde_json::json!({ "image": "busybox", "command": ["sh", "-c", script] });
        self.pod_in("darkcore-process", name, container, restart)
    }

    pub async fn create(&self, pod: Pod) -> Pod {
        self.pods()
            .create(&PostParams::default(), &pod)
            .await
            .unwrap()
    }

    /// Creates an indexed Job of `darkcore-process` pods on this pool running `script` in sh,
    /// with no retries, and returns the Jobs API of the namespace.
    pub async fn indexed_job(
        &self,
        name: &str,
        completions: i32,
        parallelism: i32,
        script: &str,
    ) -> Api<Job> {
        let pod = self.pod(name, script, "Never");
        self.indexed_job_of(name, completions, parallelism, pod)
            .await
    }

    /// Creates an indexed Job whose pods are like `pod` (its spec is the template), with no
    /// retries, and returns the Jobs API of the namespace.
    pub async fn indexed_job_of(
        &self,
        name: &str,
        completions: i32,
        parallelism: i32,
        pod: Pod,
    ) -> Api<Job> {
        let job: Job = serde_json::from_value(serde_json::json!({
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": { "name": name },
            "spec": {
                "completions": completions,
                "parallelism": parallelism,
                "completionMode": "Indexed",
                "backoffLimit": 0,
                "template": {
                    "metadata": { "annotations": pod.metadata.annotations },
                    "spec": pod.spec
                }
            }
        }))
        .unwrap();
        let jobs: Api<Job> = Api::namespaced(self.fx.client.clone(), &self.ns.name);
        jobs.create(&PostParams::default(), &job).await.unwrap();
        jobs
    }

    /// Waits until `ready` of the Job's pods are running.
    pub async fn job_has_ready(&self, jobs: &Api<Job>, job: &str, ready: i32) {
        wait_for(
            jobs,
            job,
            |j: Option<&Job>| j.and_then(|j| j.status.as_ref()?.ready).unwrap_or(0) >= ready,
            Duration::from_secs(60),
            "the Job's pods running",
        )
        .await;
    }

    /// Waits until the Job has `completions` succeeded, and returns its pods.
    /// Checks that each of `completions` indexes of an indexed Job's `pods` succeeded once
    /// with the logs `expected(index)`, and returns the devices they ran on.
    pub async fn indexed_outputs_are(
        &self,
        pods: &[Pod],
        completions: u64,
        expected: impl Fn(u64) -> String,
    ) -> std::collections::BTreeSet<String> {
        let mut devices = std::collections::BTreeSet::new();
        let mut seen = std::collections::BTreeSet::new();
        for pod in pods
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded"))
        {
            let index: u64 = pod.annotations()["batch.kubernetes.io/job-completion-index"]
                .parse()
                .unwrap();
            let want = expected(index);
            let logs = self
                .logs_show(&pod.name_any(), &want, Duration::from_secs(10))
                .await;
            assert_eq!(logs, want, "pod {}", pod.name_any());
            devices.insert(placed_on(pod).unwrap());
            seen.insert(index);
        }
        assert_eq!(seen.len() as u64, completions, "every index ran once");
        devices
    }

    /// Adds an emptyDir volume `name` to `pod`.
    pub fn with_empty_dir(mut pod: Pod, name: &str) -> Pod {
        let volume =
            serde_json::from_value(serde_json::json!({ "name": name, "emptyDir": {} })).unwrap();
        pod.spec
            .as_mut()
            .unwrap()
            .volumes
            .get_or_insert_with(Vec::new)
            .push(volume);
        pod
    }

    pub async fn job_succeeds(
        &self,
        jobs: &Api<Job>,
        job: &str,
        completions: i32,
        timeout: Duration,
    ) -> Vec<Pod> {
        wait_for(
            jobs,
            job,
            move |j: Option<&Job>| {
                j.and_then(|j| j.status.as_ref()?.succeeded) == Some(completions)
            },
            timeout,
            &format!("{completions} succeeded"),
        )
        .await;
        self.pods()
            .list(&ListParams::default().labels(&format!("job-name={job}")))
            .await
            .unwrap()
            .items
    }

    pub async fn phase_is(&self, name: &str, phase: &'static str, timeout: Duration) -> Pod {
        wait_for(
            &self.pods(),
            name,
            move |p: Option<&Pod>| {
                p.and_then(|p| p.status.as_ref()?.phase.as_deref()) == Some(phase)
            },
            timeout,
            &format!("phase {phase}"),
        )
        .await
        .unwrap()
    }

    pub fn kubectl(&self, args: &[&str]) -> String {
        self.ns.kubectl(args)
    }

    /// Runs kubectl in the namespace with `stdin` as its input: its exit code, stdout and stderr.
    pub async fn kubectl_with_input(&self, args: &[&str], stdin: &[u8]) -> (i32, String, String) {
        use tokio::io::AsyncWriteExt as _;
        let mut child = tokio::process::Command::new("kubectl")
            .args(["-n", &self.ns.name])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("kubectl runs");
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin).await.unwrap();
        drop(input);
        let out = child.wait_with_output().await.unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Waits until `kubectl logs` of the pod shows `text`, and returns the logs.
    pub async fn logs_show(&self, pod: &str, text: &str, timeout: Duration) -> String {
        let what = format!("{pod}'s logs show {text:?}");
        poll_until(&what, timeout, || async move {
            let logs = self.kubectl(&["logs", pod]);
            if logs.contains(text) {
                Ok(logs)
            } else {
                Err(logs)
            }
        })
        .await
    }

    /// Deletes the pod as kubectl does (its own grace period), waits until it is gone, and
    /// returns how long that took.
    pub async fn delete_and_time(&self, pod: &str) -> Duration {
        let started = Instant::now();
        self.pods().delete(pod, &Default::default()).await.unwrap();
        wait_for(
            &self.pods(),
            pod,
            |p: Option<&Pod>| p.is_none(),
            Duration::from_secs(30),
            "deletion",
        )
        .await;
        started.elapsed()
    }

    /// Kills the agent of `device` (SIGKILL), as a device that vanishes without a word.
    pub async fn kill_agent(&mut self, device: &str) {
        let agent = self.agents.iter_mut().find(|a| a.device_id == device);
        agent.expect("an agent of the bench").kill().await;
    }

    /// Starts the operator again on the same ports and scope, after a kill.
    pub async fn restart_operator(&mut self) {
        let op = &self.fx.operator;
        let (scope, http, gateway, kubelet) = (
            op.scope.clone(),
            op.http_port,
            op.gateway_port,
            op.kubelet_port,
        );
        self.fx.operator = crate::harness::Operator::start_on(&scope, http, gateway, kubelet).await;
    }

    /// Force-deletes the pod (grace 0), as `kubectl delete --force --grace-period=0` does.
    async fn force_delete(&self, pod: &str) {
        let params = kube::api::DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        };
        self.pods().delete(pod, &params).await.unwrap();
    }

    /// Waits until the pool's status counts `busy` devices running tasks.
    pub async fn busy_devices_are(&self, busy: i32) {
        poll_until(
            "the pool's busyDevices",
            Duration::from_secs(20),
            || async {
                let status = self.fx.pool_status().await;
                match status.busy_devices == busy {
                    true => Ok(()),
                    false => Err(format!("busyDevices {}", status.busy_devices)),
                }
            },
        )
        .await;
    }

    pub(crate) async fn events(&self, pod: &str) -> Vec<(String, String)> {
        let events: Api<Event> = Api::namespaced(self.fx.client.clone(), &self.ns.name);
        events
            .list(&ListParams::default().fields(&format!("involvedObject.name={pod}")))
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
            .collect()
    }

    pub async fn finish(self) {
        self.ns.delete().await;
        self.fx.finish().await;
    }
}

/// The HTTP status the operator's kubelet API answers to a direct request for the pod's logs,
/// with `bearer` as the token, if any, and no client certificate.
fn kubelet_logs_status(bench: &Bench, pod: &str, bearer: Option<&str>) -> String {
    let path = format!("/containerLogs/{}/{pod}/main", bench.ns.name);
    crate::kubelet_api::kubelet_status(bench.fx.operator.kubelet_port, &path, bearer)
}

/// Pins `pod` to nodes of `arch`.
pub fn pin_arch(pod: &mut Pod, arch: &str) {
    let spec = pod.spec.as_mut().expect("a pod spec");
    let selector = spec.node_selector.get_or_insert_with(Default::default);
    selector.insert("kubernetes.io/arch".into(), arch.into());
}

pub fn placed_on(pod: &Pod) -> Option<String> {
    let message = pod
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "darkcore.io/Placed")?
        .message
        .clone()?;
    message.split_whitespace().last().map(String::from)
}

pub fn main_status(pod: &Pod) -> k8s_openapi::api::core::v1::ContainerStatus {
    pod.status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0]
        .clone()
}

#[tokio::test]
async fn a_pod_runs_succeeds_and_kubectl_logs_shows_and_follows_its_output() {
    let bench = Bench::start("podrun", 1, process_pool()).await;
    bench
        .create(bench.pod(
            "hello",
            "echo hello from $HOSTNAME; echo to stderr >&2",
            "Never",
        ))
        .await;
    let pod = bench
        .phase_is("hello", "Succeeded", Duration::from_secs(60))
        .await;
    let main = main_status(&pod);
    let done = main.state.unwrap().terminated.unwrap();
    assert_eq!(
        (done.exit_code, done.reason.as_deref()),
        (0, Some("Completed"))
    );
    assert_eq!(
        placed_on(&pod).as_deref(),
        Some(bench.agents[0].device_id.as_str())
    );
    let logs = bench.kubectl(&["logs", "hello"]);
    assert!(
        logs.contains("hello from hello\n") && logs.contains("to stderr\n"),
        "kubectl logs: {logs}"
    );
    let stamped = bench.kubectl(&["logs", "hello", "--timestamps", "--tail", "1"]);
    assert_eq!(stamped.lines().count(), 1, "{stamped}");
    assert!(
        stamped.starts_with("20"),
        "an RFC 3339 time first: {stamped}"
    );

    // logs -f streams while the container writes, and returns when it ends.
    bench
        .create(bench.pod(
            "ticker",
            "for i in 1 2 3 4 5; do echo tick $i; sleep 1; done",
            "Never",
        ))
        .await;
    bench
        .phase_is("ticker", "Running", Duration::from_secs(60))
        .await;
    let started = Instant::now();
    let followed = bench.kubectl(&["logs", "-f", "ticker"]);
    assert!(
        followed.contains("tick 1\n") && followed.contains("tick 5\n"),
        "logs -f: {followed}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "logs -f waited for the output"
    );

    // The kubelet API refuses callers without a certificate or token (401), and callers that
    // may not read node logs (403).
    assert_eq!(kubelet_logs_status(&bench, "hello", None), "401");
    // A valid token for a ServiceAccount without nodes/proxy: authenticated, not authorized.
    bench.kubectl(&["create", "serviceaccount", "nobody"]);
    let token = bench.kubectl(&["create", "token", "nobody"]);
    assert_eq!(
        kubelet_logs_status(&bench, "hello", Some(token.trim())),
        "403"
    );
    bench.finish().await;
}

#[tokio::test]
async fn env_and_volumes_come_from_configmaps_secrets_and_fields() {
    // The pool sends its devices the Secret "creds" (as env and as files), and nothing else.
    let allow_creds = SecretRule {
        names: vec!["creds".into()],
        ..Default::default()
    };
    let spec = DevicePoolSpec {
        secrets: SecretPolicy {
            env: allow_creds.clone(),
            volumes: allow_creds,
            ..Default::default()
        },
        ..process_pool()
    };
    let bench = Bench::start("podenv", 1, spec).await;
    let maps: Api<ConfigMap> = Api::namespaced(bench.fx.client.clone(), &bench.ns.name);
    let mut settings = ConfigMap::default();
    settings.metadata.name = Some("settings".into());
    settings.data = Some(BTreeMap::from([("greeting".into(), "hola".into())]));
    maps.create(&PostParams::default(), &settings)
        .await
        .unwrap();
    let secrets: Api<Secret> = Api::namespaced(bench.fx.client.clone(), &bench.ns.name);
    let mut creds = Secret::default();
    creds.metadata.name = Some("creds".into());
    creds.string_data = Some(BTreeMap::from([("token".into(), "s3cret".into())]));
    secrets
        .create(&PostParams::default(), &creds)
        .await
        .unwrap();

    let script = "echo GREETING=$GREETING TOKEN=$TOKEN NAME=$NAME; cat $DARKCORE_TASK_ROOT/etc/settings/greeting; echo; cat $DARKCORE_TASK_ROOT/etc/creds/token";
    let mut pod = bench.pod("reader", script, "Never");
    let spec = serde_json::json!({
        "env": [
            { "name": "GREETING", "valueFrom": { "configMapKeyRef": { "name": "settings", "key": "greeting" } } },
            { "name": "TOKEN", "valueFrom": { "secretKeyRef": { "name": "creds", "key": "token" } } },
            { "name": "NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } }
        ],
        "volumeMounts": [
            { "name": "settings", "mountPath": "/etc/settings" },
            { "name": "creds", "mountPath": "/etc/creds" }
        ]
    });
    let container = &mut pod.spec.as_mut().unwrap().containers[0];
    container.env = serde_json::from_value(spec["env"].clone()).unwrap();
    container.volume_mounts = serde_json::from_value(spec["volumeMounts"].clone()).unwrap();
    pod.spec.as_mut().unwrap().volumes = serde_json::from_value(serde_json::json!([
        { "name": "settings", "configMap": { "name": "settings" } },
        { "name": "creds", "secret": { "secretName": "creds" } }
    ]))
    .unwrap();
    bench.create(pod).await;
    bench
        .phase_is("reader", "Succeeded", Duration::from_secs(60))
        .await;
    let logs = bench.kubectl(&["logs", "reader"]);
    assert!(
        logs.contains("GREETING=hola TOKEN=s3cret NAME=reader"),
        "{logs}"
    );
    assert!(logs.contains("hola\ns3cret"), "volume files: {logs}");

    // A Secret the pool does not allow never leaves the cluster: the pod does not start, and
    // its container says which rule of which pool to change.
    let mut private = Secret::default();
    private.metadata.name = Some("private".into());
    private.string_data = Some(BTreeMap::from([("key".into(), "do-not-send".into())]));
    secrets
        .create(&PostParams::default(), &private)
        .await
        .unwrap();
    let mut withheld = bench.pod("withheld", "echo $KEY", "Never");
    withheld.spec.as_mut().unwrap().containers[0].env = serde_json::from_value(serde_json::json!([
        { "name": "KEY", "valueFrom": { "secretKeyRef": { "name": "private", "key": "key" } } }
    ]))
    .unwrap();
    bench.create(withheld).await;
    let blocked = wait_for(
        &bench.pods(),
        "withheld",
        |p: Option<&Pod>| {
            p.and_then(|p| {
                p.status
                    .as_ref()?
                    .container_statuses
                    .as_ref()?
                    .first()?
                    .state
                    .clone()
            })
            .and_then(|s| s.waiting)
            .is_some_and(|w| w.reason.as_deref() == Some("CreateContainerConfigError"))
        },
        Duration::from_secs(60),
        "CreateContainerConfigError",
    )
    .await
    .unwrap();
    let state = blocked.status.unwrap().container_statuses.unwrap()[0]
        .state
        .clone()
        .unwrap();
    let message = state.waiting.unwrap().message.unwrap_or_default();
    assert!(
        message.contains(&format!(
            "secret {}/private is withheld from devices by DevicePool {:?}",
            bench.ns.name, bench.fx.pool
        )) && message.contains("spec.secrets.env.names"),
        "{message}"
    );
    let agent_log = std::fs::read_to_string(&bench.agents[0].log).unwrap_or_default();
    assert!(
        !agent_log.contains("do-not-send"),
        "the withheld value never reached the device"
    );

    // A missing mandatory ConfigMap holds the pod with an Event; creating it lets it run.
    let mut waiting = bench.pod("waiting", "echo $LATE", "Never");
    waiting.spec.as_mut().unwrap().containers[0].env = serde_json::from_value(serde_json::json!([
        { "name": "LATE", "valueFrom": { "configMapKeyRef": { "name": "late", "key": "k" } } }
    ]))
    .unwrap();
    bench.create(waiting).await;
    let pending = wait_for(
        &bench.pods(),
        "waiting",
        |p: Option<&Pod>| {
            p.and_then(|p| {
                p.status
                    .as_ref()?
                    .container_statuses
                    .as_ref()?
                    .first()?
                    .state
                    .as_ref()?
                    .waiting
                    .as_ref()?
                    .reason
                    .clone()
            })
            .as_deref()
                == Some("CreateContainerConfigError")
        },
        Duration::from_secs(60),
        "CreateContainerConfigError",
    )
    .await
    .unwrap();
    assert_eq!(pending.status.unwrap().phase.as_deref(), Some("Pending"));
    let events = bench.events("waiting").await;
    assert!(
        events
            .iter()
            .any(|(r, _)| r == "MandatoryConfigMapNotFound"),
        "{events:?}"
    );
    let mut late = ConfigMap::default();
    late.metadata.name = Some("late".into());
    late.data = Some(BTreeMap::from([("k".into(), "arrived".into())]));
    maps.create(&PostParams::default(), &late).await.unwrap();
    bench
        .phase_is("waiting", "Succeeded", Duration::from_secs(60))
        .await;
    assert!(bench.kubectl(&["logs", "waiting"]).contains("arrived"));

    // A missing optional one is a Warning, and the pod runs.
    let mut optional = bench.pod("optional", "echo ran", "Never");
    optional.spec.as_mut().unwrap().containers[0].env_from =
        serde_json::from_value(serde_json::json!([
            { "secretRef": { "name": "absent", "optional": true } }
        ]))
        .unwrap();
    bench.create(optional).await;
    bench
        .phase_is("optional", "Succeeded", Duration::from_secs(60))
        .await;
    let events = bench.events("optional").await;
    assert!(
        events.iter().any(|(r, _)| r == "OptionalSecretNotFound"),
        "{events:?}"
    );
    bench.finish().await;
}

#[tokio::test]
async fn an_indexed_job_completes_across_three_agents() {
    let bench = Bench::start("podjob", 3, process_pool()).await;
    let jobs = bench.indexed_job("squares", 20, 5, "sleep 0.5; echo index $JOB_COMPLETION_INDEX squared $((JOB_COMPLETION_INDEX * JOB_COMPLETION_INDEX))").await;
    let pods = bench
        .job_succeeds(&jobs, "squares", 20, Duration::from_secs(180))
        .await;
    let devices = bench
        .indexed_outputs_are(&pods, 20, |index| {
            format!("index {index} squared {}\n", index * index)
        })
        .await;
    assert_eq!(
        devices.len(),
        3,
        "the work spread over all three agents: {devices:?}"
    );
    // This test's operator saw exactly these 20 pods.
    let op = &bench.fx.operator;
    for (line, value) in [
        (
            "darkcore_operator_tasks_dispatched_total{runtime=\"process\"}",
            20.0,
        ),
        (
            "darkcore_operator_tasks_completed_total{result=\"succeeded\"}",
            20.0,
        ),
        ("darkcore_operator_dispatch_latency_seconds_count", 20.0),
        (
            "darkcore_operator_pod_create_to_running_seconds_count",
            20.0,
        ),
    ] {
        assert_eq!(
            crate::devices::metric(op, line).await,
            Some(value),
            "{line}"
        );
    }
    assert_eq!(
        crate::devices::metric(op, "darkcore_operator_tasks_redispatched_total").await,
        None,
        "no task was run again"
    );
    bench.finish().await;
}

#[tokio::test]
async fn exit_codes_and_restart_policies() {
    let bench = Bench::start("podlife", 1, process_pool()).await;
    bench.create(bench.pod("fails", "exit 3", "Never")).await;
    let failed = bench
        .phase_is("fails", "Failed", Duration::from_secs(60))
        .await;
    assert_eq!(
        main_status(&failed)
            .state
            .unwrap()
            .terminated
            .unwrap()
            .exit_code,
        3
    );

    // OnFailure: fails once (a marker in an emptyDir survives), then succeeds.
    let mut flaky = bench.pod("flaky", "if [ -e $DARKCORE_TASK_ROOT/scratch/once ]; then echo second; else touch $DARKCORE_TASK_ROOT/scratch/once; exit 1; fi", "OnFailure");
    flaky.spec.as_mut().unwrap().volumes =
        serde_json::from_value(serde_json::json!([{ "name": "scratch", "emptyDir": {} }])).unwrap();
    flaky.spec.as_mut().unwrap().containers[0].volume_mounts =
        serde_json::from_value(serde_json::json!([{ "name": "scratch", "mountPath": "/scratch" }]))
            .unwrap();
    bench.create(flaky).await;
    let flaky = bench
        .phase_is("flaky", "Succeeded", Duration::from_secs(60))
        .await;
    let status = main_status(&flaky);
    assert_eq!(status.restart_count, 1);
    assert_eq!(status.last_state.unwrap().terminated.unwrap().exit_code, 1);

    bench.finish().await;
}

/// The number before `what` in `text`, as in "darkcore's tasks 48%" or "12.5 core-seconds".
fn number_before(text: &str, what: &str) -> Option<f64> {
    let head = &text[..text.find(what)?];
    head.split_whitespace()
        .last()?
        .trim_end_matches('%')
        .parse()
        .ok()
}

#[tokio::test]
async fn a_busy_task_counts_as_darkcores_cpu_not_the_owners() {
    let bench = Bench::start("podcpu", 1, process_pool()).await;
    bench
        .create(bench.pod(
            "burner",
            // Burns until the shell itself has used 1.5 s of CPU (150 ticks of utime and
            // stime in its /proc stat), however long that takes beside other tests.
            "while read -r stat < /proc/$$$$/stat; set -- $$stat; [ $$(( $${14} + $${15} )) -lt 150 ]; do :; done; echo burnt",
            "Never",
        ))
        .await;
    bench
        .phase_is("burner", "Running", Duration::from_secs(60))
        .await;
    // Any share: what the burner gets of a 2-core machine depends on the tests beside it (one
    // run under load gave it 14% of the machine). It burns 1.5 core-seconds, so at least 1 is
    // counted below, however long that took.
    let agent = &bench.agents[0];
    poll_until(
        "the agent counts the busy task as its own CPU",
        Duration::from_secs(20),
        || async {
            let status = agent.status();
            let share = number_before(&status, "%)").unwrap_or(0.0);
            if status.contains("darkcore's tasks") && share > 0.0 {
                Ok(())
            } else {
                Err(status)
            }
        },
    )
    .await;
    let done = bench
        .phase_is("burner", "Succeeded", Duration::from_secs(60))
        .await;
    assert_eq!(main_status(&done).restart_count, 0);
    // The core-seconds given include the burner's, counted at the agent's next check.
    poll_until(
        "the agent counts core-seconds given",
        Duration::from_secs(10),
        || async {
            let status = agent.status();
            let given = number_before(&status, "core-seconds").unwrap_or(0.0);
            if given >= 1.0 { Ok(()) } else { Err(status) }
        },
    )
    .await;
    bench.finish().await;
}

/// Waits until the process has exited (its /proc entry is gone).
async fn process_exits(pid: u32, timeout: Duration) {
    poll_until(&format!("process {pid} exits"), timeout, || async {
        match std::path::Path::new(&format!("/proc/{pid}")).exists() {
            true => Err("still running".to_string()),
            false => Ok(()),
        }
    })
    .await
}

/// The pid that a pod printed after `ready`.
fn ready_pid(logs: &str) -> u32 {
    logs.lines()
        .find_map(|l| l.strip_prefix("ready "))
        .and_then(|pid| pid.trim().parse().ok())
        .unwrap_or_else(|| panic!("no 'ready <pid>' line in {logs}"))
}

#[tokio::test]
async fn deletion_stops_the_task_within_its_grace_period() {
    let bench = Bench::start("poddel", 1, process_pool()).await;
    // Traps SIGTERM and takes 2 s to finish: it gets that time, well inside its 5 s grace.
    bench
        .create(bench.pod(
            "polite",
            "trap 'echo stopping; sleep 2; echo stopped; exit 0' TERM; echo ready $$$$; while true; do sleep 0.1; done",
            "Never",
        ))
        .await;
    // Ignores SIGTERM: killed when its 5 s grace runs out.
    bench
        .create(bench.pod(
            "stubborn",
            "trap '' TERM; echo ready $$$$; while true; do sleep 0.1; done",
            "Never",
        ))
        .await;
    let polite = ready_pid(
        &bench
            .logs_show("polite", "ready ", Duration::from_secs(60))
            .await,
    );
    let stubborn = ready_pid(
        &bench
            .logs_show("stubborn", "ready ", Duration::from_secs(60))
            .await,
    );
    // Ignores SIGTERM, and is force-deleted: gone from the API at once, killed on the device.
    bench
        .create(bench.pod(
            "forced",
            "trap '' TERM; echo ready $$$$; while true; do sleep 0.1; done",
            "Never",
        ))
        .await;
    let forced = ready_pid(
        &bench
            .logs_show("forced", "ready ", Duration::from_secs(60))
            .await,
    );
    bench.busy_devices_are(1).await;
    let (polite_took, stubborn_took, ()) = tokio::join!(
        bench.delete_and_time("polite"),
        bench.delete_and_time("stubborn"),
        async {
            bench.force_delete("forced").await;
            process_exits(forced, Duration::from_secs(10)).await;
        }
    );
    assert!(
        polite_took >= Duration::from_secs(2) && polite_took < Duration::from_secs(15),
        "the polite pod got its 2 s handler and no more than its grace plus slack: {polite_took:?}"
    );
    assert!(
        stubborn_took >= Duration::from_secs(5) && stubborn_took < Duration::from_secs(15),
        "the stubborn pod was killed after its 5 s grace: {stubborn_took:?}"
    );
    for pid in [polite, stubborn] {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} is gone once its pod is"
        );
    }
    bench.busy_devices_are(0).await;
    bench.finish().await;
}

#[tokio::test]
async fn a_pod_force_deleted_while_the_operator_is_down_is_stopped_when_it_returns() {
    let mut bench = Bench::start("podgone", 1, process_pool()).await;
    bench
        .create(bench.pod(
            "forgotten",
            "echo ready $$$$; while true; do sleep 0.1; done",
            "Never",
        ))
        .await;
    let pid = ready_pid(
        &bench
            .logs_show("forgotten", "ready ", Duration::from_secs(60))
            .await,
    );
    bench.fx.operator.kill().await;
    bench.force_delete("forgotten").await;
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the agent keeps its task while the operator is away"
    );
    bench.restart_operator().await;
    // The restarted operator hears of the task in the agent's Hello, finds no pod for it once
    // its 10 s warm-up is over, and stops it.
    process_exits(pid, Duration::from_secs(30)).await;
    bench.finish().await;
}

#[tokio::test]
async fn a_lost_device_or_a_returning_owner_moves_the_task_elsewhere() {
    let mut bench = Bench::start("podlost", 2, quick_loss_pool()).await;
    bench
        .create(bench.pod("survivor", "sleep 4; echo finished", "Never"))
        .await;
    let running = bench
        .phase_is("survivor", "Running", Duration::from_secs(60))
        .await;
    let first = placed_on(&running).unwrap();
    bench.kill_agent(&first).await;
    let done = bench
        .phase_is("survivor", "Succeeded", Duration::from_secs(90))
        .await;
    assert_ne!(
        placed_on(&done).unwrap(),
        first,
        "it finished on the other device"
    );
    let status = main_status(&done);
    assert_eq!(status.restart_count, 1);
    assert_eq!(
        status
            .last_state
            .unwrap()
            .terminated
            .unwrap()
            .reason
            .as_deref(),
        Some("DeviceLost")
    );
    assert!(bench.kubectl(&["logs", "survivor"]).contains("finished"));

    // The owner of the device running it comes back: it is preempted and finishes elsewhere.
    let survivor = bench
        .agents
        .iter()
        .position(|a| a.device_id != first)
        .unwrap();
    bench.agents.retain(|a| a.device_id != first);
    bench.add_agent("").await;
    let _ = survivor;
    bench
        .create(bench.pod("preempted", "sleep 4; echo finished", "Never"))
        .await;
    let running = bench
        .phase_is("preempted", "Running", Duration::from_secs(60))
        .await;
    let owner = placed_on(&running).unwrap();
    bench
        .agents
        .iter()
        .find(|a| a.device_id == owner)
        .unwrap()
        .owner_active(true);
    let done = bench
        .phase_is("preempted", "Succeeded", Duration::from_secs(90))
        .await;
    assert_ne!(placed_on(&done).unwrap(), owner);
    let status = main_status(&done);
    assert_eq!(
        status
            .last_state
            .unwrap()
            .terminated
            .unwrap()
            .reason
            .as_deref(),
        Some("Preempted")
    );
    for reason in ["DeviceLost", "Preempted"] {
        let line = format!("darkcore_operator_tasks_redispatched_total{{reason=\"{reason}\"}}");
        assert_eq!(
            crate::devices::metric(&bench.fx.operator, &line).await,
            Some(1.0),
            "{line}"
        );
    }
    bench.finish().await;
}

#[tokio::test]
async fn pods_that_cannot_run_say_why_on_the_pod() {
    let fx_spec = DevicePoolSpec { ..process_pool() };
    let bench = Bench::start("podwhy", 1, fx_spec).await;
    let mut big = bench.pod("big", "true", "Never");
    big.spec.as_mut().unwrap().containers[0].resources =
        serde_json::from_value(serde_json::json!({ "requests": { "cpu": "8" } })).unwrap();
    // The node offers 1 CPU, so the scheduler would not bind it: bind it by nodeName, as a
    // controller that skips the scheduler does, to reach darkcore's own placement.
    big.spec.as_mut().unwrap().node_name = Some(bench.fx.node.clone());
    big.spec.as_mut().unwrap().tolerations =
        serde_json::from_value(serde_json::json!([{ "operator": "Exists" }])).unwrap();
    bench.create(big).await;
    wait_for(
        &bench.pods(),
        "big",
        |p: Option<&Pod>| {
            p.and_then(|p| {
                p.status
                    .as_ref()?
                    .conditions
                    .as_ref()?
                    .iter()
                    .find(|c| c.type_ == "darkcore.io/Placed")?
                    .reason
                    .clone()
            })
            .as_deref()
                == Some("NoDeviceFits")
        },
        Duration::from_secs(60),
        "NoDeviceFits",
    )
    .await;
    let described = bench.kubectl(&["describe", "pod", "big"]);
    assert!(
        described.contains("no enlisted device offers 8 CPUs; the largest offers 1"),
        "{described}"
    );

    // No RuntimeClass means oci, which this pool does not allow.
    let mut oci = bench.pod("oci", "true", "Never");
    oci.spec.as_mut().unwrap().runtime_class_name = None;
    oci.spec.as_mut().unwrap().tolerations =
        serde_json::from_value(serde_json::json!([{ "operator": "Exists" }])).unwrap();
    bench.create(oci).await;
    let refused = bench
        .phase_is("oci", "Failed", Duration::from_secs(60))
        .await;
    assert_eq!(
        refused.status.as_ref().unwrap().reason.as_deref(),
        Some("RuntimeNotAllowed")
    );
    // The Event is written apart from the status, and may land after it.
    poll_until(
        "a RuntimeNotAllowed Event on the pod",
        Duration::from_secs(30),
        || async {
            let events = bench.events("oci").await;
            match events.iter().any(|(r, _)| r == "RuntimeNotAllowed") {
                true => Ok(()),
                false => Err(format!("{events:?}")),
            }
        },
    )
    .await;

    let mut host = bench.pod("host", "true", "Never");
    host.spec.as_mut().unwrap().host_network = Some(true);
    bench.create(host).await;
    let refused = bench
        .phase_is("host", "Failed", Duration::from_secs(60))
        .await;
    assert_eq!(
        refused.status.as_ref().unwrap().reason.as_deref(),
        Some("UnsupportedPodFeature")
    );

    // A bad quorum is refused naming the annotation, not run unchecked.
    let mut asking = bench.pod("badquorum", "true", "Never");
    asking.metadata.annotations =
        Some([("darkcore.io/quorum".to_string(), "two".to_string())].into());
    bench.create(asking).await;
    let refused = bench
        .phase_is("badquorum", "Failed", Duration::from_secs(60))
        .await;
    let status = refused.status.unwrap();
    assert_eq!(status.reason.as_deref(), Some("InvalidValidation"));
    let message = status.message.unwrap_or_default();
    assert!(message.contains("darkcore.io/quorum"), "{message}");
    bench.finish().await;
}

#[tokio::test]
async fn a_job_survives_an_operator_kill_without_running_any_index_twice() {
    let mut bench = Bench::start("podcrash", 3, process_pool()).await;
    let jobs = bench
        .indexed_job("steady", 10, 5, "echo ran $JOB_COMPLETION_INDEX; sleep 3")
        .await;
    bench.job_has_ready(&jobs, "steady", 3).await;
    bench.fx.operator.kill().await;
    bench.restart_operator().await;
    let pods = bench
        .job_succeeds(&jobs, "steady", 10, Duration::from_secs(120))
        .await;
    assert_eq!(pods.len(), 10, "no pod failed and was replaced");
    for pod in &pods {
        assert_eq!(
            main_status(pod).restart_count,
            0,
            "pod {} ran once",
            pod.name_any()
        );
    }
    let log = std::fs::read_to_string(&bench.fx.operator.log).unwrap();
    let dispatches = log
        .lines()
        .filter(|l| l.contains("dispatching") && l.contains(&bench.ns.name))
        .count();
    assert_eq!(
        dispatches, 10,
        "each index was dispatched once across both operators"
    );
    assert!(
        log.contains("adopting") || log.lines().filter(|l| l.contains("dispatching")).count() == 10
    );
    // The new operator's warm-up ended because every device the pool counted online was
    // back, not at its timeout.
    let warmed = log.lines().find(|l| l.contains("warm-up over after"));
    assert!(
        warmed.is_some_and(|l| l.contains("3 of 3 devices back")),
        "{warmed:?}"
    );
    bench.finish().await;
}

/// A ValidatingAdmissionPolicy that makes the API server refuse some of the operator's
/// requests in a bench's namespace, until lifted.
struct Refusal {
    name: String,
    client: kube::Client,
}

impl Refusal {
    /// Refuses the operator's `operation` on `resource` (e.g. "pods/status") where `allowed`
    /// (a CEL expression) is false, with `message`. Dry runs are refused likewise, whoever
    /// sends them: the policy is in force once `probe`, kubectl arguments run with a
    /// server-side dry run, is refused.
    async fn start(
        bench: &Bench,
        (operation, resource): (&str, &str),
        allowed: &str,
        message: &str,
        probe: &[&str],
    ) -> Refusal {
        use k8s_openapi::api::admissionregistration::v1::{
            ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
        };
        let name = format!("darkcore-e2e-{}", bench.ns.name);
        let operator = crate::helm::service_account_user();
        let policy: ValidatingAdmissionPolicy = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name },
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": { "resourceRules": [{
                    "apiGroups": [""], "apiVersions": ["v1"],
                    "operations": [operation], "resources": [resource],
                }]},
                "validations": [{
                    "expression": format!(
                        "(request.userInfo.username != '{operator}' && !request.dryRun) || ({allowed})"
                    ),
                    "message": message,
                }],
            },
        }))
        .unwrap();
        let binding: ValidatingAdmissionPolicyBinding = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name },
            "spec": {
                "policyName": name,
                "validationActions": ["Deny"],
                "matchResources": { "namespaceSelector": { "matchLabels": {
                    "kubernetes.io/metadata.name": bench.ns.name,
                }}},
            },
        }))
        .unwrap();
        let client = bench.fx.client.clone();
        let post = kube::api::PostParams::default();
        Api::<ValidatingAdmissionPolicy>::all(client.clone())
            .create(&post, &policy)
            .await
            .unwrap();
        Api::<ValidatingAdmissionPolicyBinding>::all(client.clone())
            .create(&post, &binding)
            .await
            .unwrap();
        let mut args = probe.to_vec();
        args.push("--dry-run=server");
        poll_until(
            "the policy refuses the operator",
            Duration::from_secs(30),
            || async {
                let out = bench.kubectl(&args);
                match out.contains(message) {
                    true => Ok(()),
                    false => Err(out),
                }
            },
        )
        .await;
        Refusal { name, client }
    }

    async fn lift(self) {
        use k8s_openapi::api::admissionregistration::v1::{
            ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
        };
        Api::<ValidatingAdmissionPolicyBinding>::all(self.client.clone())
            .delete(&self.name, &Default::default())
            .await
            .unwrap();
        Api::<ValidatingAdmissionPolicy>::all(self.client)
            .delete(&self.name, &Default::default())
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_refused_final_delete_is_retried_until_it_lands() {
    let bench = Bench::start("podredel", 1, process_pool()).await;
    bench
        .create(bench.pod("sticky", "echo ready $$$$; exec sleep 600", "Never"))
        .await;
    let pid = ready_pid(
        &bench
            .logs_show("sticky", "ready ", Duration::from_secs(60))
            .await,
    );
    // The API server refuses the operator's deletes of pods in this namespace for a while.
    let refusal = Refusal::start(
        &bench,
        ("DELETE", "pods"),
        "false",
        "e2e: the operator may not delete pods here for now",
        &["delete", "pod", "sticky"],
    )
    .await;
    bench.kubectl(&["delete", "pod", "sticky", "--wait=false"]);
    process_exits(pid, Duration::from_secs(20)).await;
    // The task has stopped; the operator's delete is refused, so the pod stays Terminating.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(bench.pods().get_opt("sticky").await.unwrap().is_some());
    // Once the API server lets it, a retry lands.
    refusal.lift().await;
    let released = Instant::now();
    poll_until("the pod is deleted", Duration::from_secs(45), || async {
        match bench.pods().get_opt("sticky").await.unwrap() {
            None => Ok(()),
            Some(_) => Err("still there".to_string()),
        }
    })
    .await;
    eprintln!(
        "deleted {:?} after the API server allowed it",
        released.elapsed()
    );
    bench.finish().await;
}

#[tokio::test]
async fn a_finished_task_is_kept_on_its_device_until_its_outcome_is_stored() {
    let bench = Bench::start("podkeep", 1, process_pool()).await;
    let message = "e2e: the operator may not record an outcome here for now";
    // A pod bound to no real node, for the probe to patch.
    let mut placeholder = bench.pod("placeholder", "true", "Never");
    let spec = placeholder.spec.as_mut().unwrap();
    (spec.node_selector, spec.node_name) = (None, Some("nowhere".into()));
    bench.create(placeholder).await;
    let refusal = Refusal::start(
        &bench,
        ("UPDATE", "pods/status"),
        "!has(object.status.phase) || object.status.phase != 'Succeeded'",
        message,
        &[
            "patch",
            "pod",
            "placeholder",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"phase":"Succeeded"}}"#,
        ],
    )
    .await;
    let pod = bench
        .create(bench.pod("done", "echo finished", "Never"))
        .await;
    let task = format!("{}.1", pod.uid().unwrap());
    let agent_log = bench.agents[0].log.clone();
    let released = || {
        std::fs::read_to_string(&agent_log)
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains(&task) && l.contains("task released by the operator"))
    };
    // The task ends on the device; the operator's write of Succeeded is refused.
    poll_until(
        "the operator's status write is refused",
        Duration::from_secs(60),
        || async {
            let log = std::fs::read_to_string(&bench.fx.operator.log).unwrap_or_default();
            match log
                .lines()
                .any(|l| l.contains(message) && l.contains("done"))
            {
                true => Ok(()),
                false => Err("not yet".to_string()),
            }
        },
    )
    .await;
    let shown = bench.pods().get("done").await.unwrap();
    assert_ne!(
        shown.status.and_then(|s| s.phase).as_deref(),
        Some("Succeeded")
    );
    assert!(
        !released(),
        "the device was told to forget task {task} before its outcome was stored"
    );
    // Once the API server lets it, a retry lands, and only then is the task released.
    refusal.lift().await;
    bench
        .phase_is("done", "Succeeded", Duration::from_secs(45))
        .await;
    poll_until(
        "the device releases the task",
        Duration::from_secs(30),
        || async {
            match released() {
                true => Ok(()),
                false => Err("still held".to_string()),
            }
        },
    )
    .await;
    bench.finish().await;
}

#[tokio::test]
async fn logs_name_the_run_laststate_describes_and_outlive_an_operator_restart() {
    let mut bench = Bench::start("podlogs", 1, process_pool()).await;
    bench
        .create(bench.pod("done", "echo finished here", "Never"))
        .await;
    bench
        .create(bench.pod(
            "long",
            "for i in $(seq 1 200); do echo line $i; done",
            "Never",
        ))
        .await;
    // Runs through the operator's restart: prints, then waits for the test's word.
    let go_on = log_dir().join(unique("go-on"));
    let across = format!(
        "echo before; while [ ! -e {go_on} ]; do sleep 0.2; done; echo after",
        go_on = go_on.display()
    );
    bench.create(bench.pod("across", &across, "Never")).await;
    // Ends while the operator is down: its device reports it finished as the new operator
    // starts, and that status must not keep its output before the device has sent it again.
    let stop = log_dir().join(unique("stop"));
    let ends_while_down = format!(
        "echo ready $$$$; while [ ! -e {stop} ]; do sleep 0.2; done; echo ended",
        stop = stop.display()
    );
    bench
        .create(bench.pod("downtime", &ends_while_down, "Never"))
        .await;
    bench
        .create(bench.pod(
            "crashy",
            "echo crashed at $(date +%s%N); exit 3",
            "OnFailure",
        ))
        .await;
    let mut fallback = bench.pod("fallback", "echo first; echo last words; exit 2", "Never");
    fallback.spec.as_mut().unwrap().containers[0].termination_message_policy =
        Some("FallbackToLogsOnError".into());
    bench.create(fallback).await;
    bench
        .phase_is("done", "Succeeded", Duration::from_secs(60))
        .await;
    assert_eq!(bench.kubectl(&["logs", "done"]), "finished here\n");
    bench
        .phase_is("long", "Succeeded", Duration::from_secs(60))
        .await;
    poll_until("across has printed", Duration::from_secs(60), || async {
        match bench.kubectl(&["logs", "across"]).as_str() {
            "before\n" => Ok(()),
            other => Err(other.to_string()),
        }
    })
    .await;
    // A failed container that asks for it keeps the end of its output on the pod, where it
    // outlives the operator's memory.
    let failed = bench
        .phase_is("fallback", "Failed", Duration::from_secs(60))
        .await;
    let terminated = main_status(&failed).state.unwrap().terminated.unwrap();
    assert_eq!(terminated.message.as_deref(), Some("first\nlast words\n"));
    // Right after its first crash, waiting to restart: `--previous` is the run that crashed,
    // as `lastState` says, and so is the plain read (the kubelet's choice while it waits).
    poll_until(
        "crashy waits to restart after one crash",
        Duration::from_secs(60),
        || async {
            let pod = bench.pods().get("crashy").await.unwrap();
            let status = main_status(&pod);
            let last = status.last_state.and_then(|s| s.terminated);
            match (last, status.state.and_then(|s| s.waiting)) {
                (Some(last), Some(_)) if last.exit_code == 3 && status.restart_count == 1 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let previous = bench.kubectl(&["logs", "crashy", "--previous"]);
    assert!(previous.starts_with("crashed at "), "{previous}");
    assert_eq!(previous.lines().count(), 1, "{previous}");
    bench
        .pods()
        .delete("crashy", &Default::default())
        .await
        .unwrap();

    let downtime_pid = ready_pid(
        &bench
            .logs_show("downtime", "ready ", Duration::from_secs(60))
            .await,
    );

    // The operator restarts. A finished pod kept its output on itself as it finished
    // (before, `kubectl logs` printed nothing and exited 0, then said it was gone).
    bench.fx.operator.kill().await;
    std::fs::write(&stop, "").unwrap();
    process_exits(downtime_pid, Duration::from_secs(30)).await;
    bench.restart_operator().await;
    // (Until the new operator has listed its pods, it says it is starting, never that the
    // pod is not on a darkcore node.)
    let logs_of = |pod: &'static str| {
        let ns = bench.ns.name.clone();
        async move {
            let out = std::process::Command::new("kubectl")
                .args(["-n", &ns, "logs", pod])
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(!stderr.contains("not on a darkcore node"), "{stderr}");
            match out.status.success() {
                true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
                false => Err(stderr),
            }
        }
    };
    poll_until(
        "kubectl logs of a pod finished before the restart",
        Duration::from_secs(30),
        || async {
            match logs_of("done").await {
                Ok(out) if out == "finished here\n" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    // Output longer than the kept tail: kubectl says the rest is gone, and where the end is.
    let long = logs_of("long").await.unwrap_err();
    assert!(
        long.contains("is gone but for its last lines") && long.contains("darkcore.io/Output"),
        "{long}"
    );
    let kept = bench.kubectl(&[
        "get",
        "pod",
        "long",
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"darkcore.io/Output\")].message}",
    ]);
    assert!(
        kept.contains("line 200\\n") && !kept.contains("line 100\\n"),
        "the last 80 lines are kept: {kept}"
    );
    // A pod that ran through the restart: its device sends all it kept of the run again, so
    // the whole output reads back, once, with nothing doubled.
    std::fs::write(&go_on, "").unwrap();
    bench
        .phase_is("across", "Succeeded", Duration::from_secs(60))
        .await;
    assert_eq!(logs_of("across").await.unwrap(), "before\nafter\n");
    // Its whole output is kept on the pod, though its status came before its output did.
    bench
        .phase_is("downtime", "Succeeded", Duration::from_secs(60))
        .await;
    assert_eq!(
        logs_of("downtime").await.unwrap(),
        format!("ready {downtime_pid}\nended\n")
    );
    let kept = main_status(&bench.pods().get("fallback").await.unwrap());
    let message = kept.state.unwrap().terminated.unwrap().message;
    assert_eq!(message.as_deref(), Some("first\nlast words\n"));
    // A pod run after the restart reads as always.
    bench
        .create(bench.pod("after", "echo after the restart", "Never"))
        .await;
    bench
        .phase_is("after", "Succeeded", Duration::from_secs(60))
        .await;
    assert_eq!(bench.kubectl(&["logs", "after"]), "after the restart\n");
    bench.finish().await;
}
