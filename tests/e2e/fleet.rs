//! Real darkcore-agent processes for tests: join with a token through the CLI, run, kill -9,
//! restart, and play the owner coming back through the agent's documented test hook.

use std::path::{Path, PathBuf};
use std::time::Duration;

use darkcore_crds::DevicePool;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use tokio::process::{Child, Command};

use crate::harness::{
    self, OPERATOR_NAMESPACE, agent_bin, log_dir, operator_cli, spawn_logged, unique, wait_for,
};

/// Creates a join token for `pool` with the real CLI; `extra` adds flags like `--uses 1`.
/// Without `--uses` in `extra`, the token admits any number of devices (`--uses 0`).
pub fn token(pool: &str, extra: &[&str]) -> String {
    token_in(OPERATOR_NAMESPACE, pool, extra)
}

/// As [`token`], for the operators whose namespace is `namespace`.
pub fn token_in(namespace: &str, pool: &str, extra: &[&str]) -> String {
    let mut args = vec!["token", "create", "--pool", pool, "-n", namespace];
    args.extend_from_slice(extra);
    if !extra.contains(&"--uses") {
        args.extend_from_slice(&["--uses", "0"]);
    }
    let out = operator_cli(&args);
    assert!(
        out.status.success(),
        "token create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// One device: its state dir, its config, and its `run` process when running.
pub struct Agent {
    pub state_dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    pub device_id: String,
    child: Option<Child>,
}

impl Drop for Agent {
    /// A test's agent ends with the test: killed, with what it left (containers, mounts, its
    /// cgroup, and the process groups of its `process` tasks, which outlive it as orphans)
    /// cleared, so no task of one test burns CPU beside the next.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            if let Some(pid) = child.id() {
                let proc = PathBuf::from(format!("/proc/{pid}"));
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                // A zombie has no cmdline: gone enough.
                while std::fs::read(proc.join("cmdline")).is_ok_and(|c| !c.is_empty())
                    && std::time::Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        darkcore_agent::tasks::oci::clear_left_by(&self.state_dir);
        darkcore_agent::tasks::workdir::reap_stale(&self.state_dir.join("tasks"));
    }
}

/// The result of `darkcore-agent join`: success, or the words it failed with.
pub struct JoinOutcome {
    pub ok: bool,
    pub output: String,
    pub state_dir: PathBuf,
    pub config: PathBuf,
}

/// Writes an agent config: `max_cores` given, the `process` and `wasm` runtimes allowed,
/// idle-only with CPU load never deciding (tests share one busy machine), checked every
/// second, and the loopback registries spoken to over plain HTTP.
/// `testing` is more of the `[testing]` section (TOML lines).
fn write_config(dir: &Path, max_cores: f64, testing: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let config = dir.join("agent.toml");
    let text = format!(
        "[policy]\nmax_cores = {max_cores}\nmax_memory = \"1Gi\"\nruntimes = [\"process\", \"wasm\", \"oci\"]\ncheck_seconds = 1\n\
         [policy.idle]\nonly_when_idle = true\ninput_idle_minutes = 1\nmax_owner_cpu_percent = 100\n\
         [images]\ninsecure_registries = [\"{}\", \"{}\"]\n\
         [testing]\nowner_active_file = \"{}\"\n{testing}",
        crate::images::registry(),
        crate::images::private_registry(),
        dir.join("owner-active").display()
    );
    std::fs::write(&config, text).unwrap();
    config
}

/// Runs `darkcore-agent join` against the gateway on `gateway_port` on loopback.
pub fn join(gateway_port: u16, token: &str, max_cores: f64) -> JoinOutcome {
    join_with(&loopback(gateway_port), token, max_cores, "")
}

fn loopback(gateway_port: u16) -> String {
    format!("127.0.0.1:{gateway_port}")
}

/// As `join`, at `server` (host:port), with more `[testing]` hooks in the agent's config.
fn join_with(server: &str, token: &str, max_cores: f64, testing: &str) -> JoinOutcome {
    let root = harness::workspace()
        .join("target/e2e-agents")
        .join(unique("agent"));
    let config = write_config(&root, max_cores, testing);
    let state_dir = root.join("state");
    let out = std::process::Command::new(agent_bin())
        .args(["join", "--server", server, "--token", token])
        .arg("--state-dir")
        .arg(&state_dir)
        .arg("--config")
        .arg(&config)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", agent_bin().display()));
    JoinOutcome {
        ok: out.status.success(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        state_dir,
        config,
    }
}

impl Agent {
    /// Joins and starts `run`.
    pub async fn start(gateway_port: u16, token: &str, max_cores: f64) -> Agent {
        Agent::start_with(gateway_port, token, max_cores, "").await
    }

    /// Joins and starts `run` as a device that reports `arch` (one machine cannot be two).
    pub async fn start_as_arch(gateway_port: u16, token: &str, arch: &str) -> Agent {
        let testing = format!("report_arch = \"{arch}\"\n");
        Agent::start_with(gateway_port, token, 1.0, &testing).await
    }

    /// Joins and starts `run` with more config: `testing` is appended to the config's
    /// `[testing]` section, and may open further sections.
    pub async fn start_with(
        gateway_port: u16,
        token: &str,
        max_cores: f64,
        testing: &str,
    ) -> Agent {
        Agent::start_at_with(&loopback(gateway_port), token, max_cores, testing).await
    }

    /// Joins the gateway at `server` (host:port, such as a Service's address) and starts `run`.
    pub async fn start_at(server: &str, token: &str, max_cores: f64) -> Agent {
        Agent::start_at_with(server, token, max_cores, "").await
    }

    async fn start_at_with(server: &str, token: &str, max_cores: f64, testing: &str) -> Agent {
        let joined = join_with(server, token, max_cores, testing);
        assert!(joined.ok, "join failed: {}", joined.output);
        let device_id = joined
            .output
            .split_whitespace()
            .find(|w| w.starts_with("dev-"))
            .expect("join prints the device id")
            .trim_end_matches(';')
            .to_string();
        let mut agent = Agent {
            log: log_dir().join(format!("agent-{device_id}.log")),
            state_dir: joined.state_dir,
            config: joined.config,
            device_id,
            child: None,
        };
        agent.run();
        agent
    }

    /// Starts `darkcore-agent run` (again).
    pub fn run(&mut self) {
        let mut command = Command::new(agent_bin());
        command
            .arg("run")
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "0");
        self.child = Some(spawn_logged(command, &self.log));
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// SIGKILL, as a crash or a pulled plug.
    pub async fn kill(&mut self) {
        harness::kill(&mut self.child).await;
    }

    /// SIGTERM, as systemd stops it, and waits for the exit.
    pub async fn stop(&mut self) -> std::process::ExitStatus {
        crate::harness::terminate(&mut self.child, "the agent").await
    }

    /// Waits for the agent to exit by itself (a final refusal) and returns its log.
    pub async fn exited(&mut self) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().expect("running");
        let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .expect("the agent exits within 20 s")
            .unwrap();
        (
            status,
            std::fs::read_to_string(&self.log).unwrap_or_default(),
        )
    }

    /// Drives the test hook: the owner is (or is no longer) at the keyboard.
    pub fn owner_active(&self, active: bool) {
        let file = self.config.parent().unwrap().join("owner-active");
        if active {
            std::fs::write(&file, "").unwrap();
        } else {
            std::fs::remove_file(&file).unwrap();
        }
    }

    /// The status file `run` keeps, as JSON.
    pub fn status_json(&self) -> serde_json::Value {
        std::fs::read_to_string(self.state_dir.join("status.json"))
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default()
    }

    /// `darkcore-agent status` as a person would run it.
    pub fn status(&self) -> String {
        let out = std::process::Command::new(agent_bin())
            .arg("status")
            .arg("--state-dir")
            .arg(&self.state_dir)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The node's CPU capacity in millicores.
pub fn node_cpu_millis(node: &Node) -> Option<u64> {
    let cpu = node
        .status
        .as_ref()?
        .capacity
        .as_ref()?
        .get("cpu")?
        .0
        .clone();
    Some(match cpu.strip_suffix('m') {
        Some(millis) => millis.parse().ok()?,
        None => cpu.parse::<u64>().ok()? * 1000,
    })
}

/// Waits until the node's CPU capacity is `millis`.
pub async fn node_cpu_is(nodes: &Api<Node>, node: &str, millis: u64, timeout: Duration) -> Node {
    wait_for(
        nodes,
        node,
        move |n: Option<&Node>| n.and_then(node_cpu_millis) == Some(millis),
        timeout,
        &format!("node cpu capacity {millis}m"),
    )
    .await
    .unwrap()
}

/// Waits until the pool's status says `enlisted` devices.
pub async fn pool_enlisted_is(pools: &Api<DevicePool>, pool: &str, enlisted: i32) -> DevicePool {
    wait_for(
        pools,
        pool,
        move |p: Option<&DevicePool>| {
            p.and_then(|p| p.status.as_ref())
                .is_some_and(|s| s.replicas == enlisted)
        },
        Duration::from_secs(20),
        &format!("pool status replicas {enlisted}"),
    )
    .await
    .unwrap()
}

/// One darkcore-swarm device joined with `token`, offering `millicores`, with `extra` flags
/// (its test-only lies: see tests/swarm); killed when the handle is dropped.
pub fn swarm_device(
    gateway_port: u16,
    token: &str,
    millicores: u32,
    extra: &[&str],
) -> tokio::process::Child {
    let state_dir = crate::harness::log_dir().join(crate::harness::unique("swarm"));
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_darkcore-swarm"));
    command
        .args(["--server", &loopback(gateway_port), "--token", token])
        .args(["--agents", "1", "--millicores", &millicores.to_string()])
        .args(extra)
        .arg("--state-dir")
        .arg(&state_dir);
    crate::harness::spawn_logged(command, &state_dir.with_extension("log"))
}
