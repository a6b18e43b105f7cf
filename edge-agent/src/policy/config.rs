//! The agent's config file (TOML), which the device owner edits: labels for pool selection and
//! the policy. Every field has a default, so an empty or missing file is a safe policy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::policy::bytes::ByteSize;
use crate::policy::schedule::Schedule;

/// Where `darkcore-agent` looks when no `--config` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/darkcore/agent.toml";

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Labels on this device, which pools select by (`spec.selector.matchLabels`).
    pub labels: BTreeMap<String, String>,
    pub policy: OwnerPolicy,
    pub images: ImagesConfig,
    pub metrics: MetricsConfig,
    /// Hooks for tests: they stand in for sensors that a test cannot drive. Never needed in
    /// production.
    pub testing: TestHooks,
}

/// Where images come from.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImagesConfig {
    /// Registries (host:port) spoken to over plain HTTP instead of HTTPS, such as one on
    /// loopback. Credentials sent to them travel in the clear.
    pub insecure_registries: Vec<String>,
}

/// The opt-in Prometheus endpoint.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where to serve /metrics, such as "127.0.0.1:9464". Absent: no endpoint. Anyone who can
    /// reach it sees the device's policy state and usage, so keep it on loopback unless a
    /// firewall guards it.
    pub address: Option<std::net::SocketAddr>,
}

/// Sensor stand-ins for tests.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TestHooks {
    /// While this file exists, the owner counts as active at the keyboard (as if they had
    /// just typed), so the policy of an idle-only device takes its offer away.
    pub owner_active_file: Option<PathBuf>,
    /// Report this arch instead of the machine's (tests of mixed-arch pools, which one
    /// machine cannot otherwise make; only `wasm` tasks run right on such a device).
    pub report_arch: Option<String>,
    /// Report this many cores instead of the machine's: a device lying about its size, for
    /// tests of what the operator believes.
    pub report_cores: Option<u32>,
    /// Lie about the results of checked tasks (see `tasks::fault`), for tests of validation.
    pub fault: Option<crate::tasks::fault::Fault>,
}

impl TestHooks {
    /// Applies the hooks to what the device reports of itself.
    pub fn apply(&self, capabilities: &mut darkcore_proto::agent::v1::Capabilities) {
        if let Some(arch) = &self.report_arch {
            capabilities.arch = arch.clone();
        }
        if let Some(cores) = self.report_cores {
            capabilities.cores = cores;
        }
    }
}

/// When and how much this device gives.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OwnerPolicy {
    /// Cores tasks may use. Default: all but one (at least one).
    pub max_cores: Option<f64>,
    /// Memory tasks may use. Default: half of the device's memory.
    pub max_memory: Option<ByteSize>,
    /// Disk tasks may use for images and volumes.
    pub max_disk: ByteSize,
    pub idle: IdleRule,
    /// Allowed hours per weekday, in local time. Empty: any time.
    pub schedule: Schedule,
    /// Give while running on battery (where a battery can be read).
    pub run_on_battery: bool,
    /// Runtimes tasks may use. `process` runs pod commands directly on this machine, with
    /// the agent's rights, so it is off unless you list it.
    pub runtimes: Vec<RuntimeName>,
    /// When the owner comes back, running tasks get SIGTERM, then SIGKILL after this long.
    pub stop_grace_seconds: u32,
    /// How often the agent looks at the sensors and applies this policy.
    pub check_seconds: u32,
    /// What containers may reach: `internet` (public addresses only; none of this machine's
    /// own services or home network), `none`, or `host` (this machine's own network, for
    /// trusted fleets: only where the pool asks for it too). A pool may narrow it further.
    pub network: NetworkMode,
}

/// What a task's containers may reach, narrowest first: a task gets the narrower of its
/// pool's mode and its owner's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Loopback only.
    None,
    /// Public addresses, through a user-mode network and a filter.
    #[default]
    Internet,
    /// The device's own network namespace.
    Host,
}

/// "Only when idle": the owner is away and the machine is quiet.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdleRule {
    pub only_when_idle: bool,
    /// Minutes without keyboard or mouse input before the device counts as idle. Devices
    /// without input devices (boards, set-top boxes) are judged by CPU load alone.
    pub input_idle_minutes: u32,
    /// The most CPU (percent of all cores) the owner's own programs may use while tasks run.
    pub max_owner_cpu_percent: u32,
}

/// A runtime as the config names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeName {
    Process,
    Oci,
    Wasm,
}

impl Default for OwnerPolicy {
    fn default() -> Self {
        OwnerPolicy {
            max_cores: None,
            max_memory: None,
            max_disk: ByteSize(10 << 30),
            idle: IdleRule::default(),
            schedule: Schedule::any_time(),
            run_on_battery: false,
            runtimes: vec![RuntimeName::Oci, RuntimeName::Wasm],
            stop_grace_seconds: 30,
            check_seconds: 5,
            network: NetworkMode::default(),
        }
    }
}

impl Default for IdleRule {
    fn default() -> Self {
        IdleRule {
            only_when_idle: true,
            input_idle_minutes: 10,
            max_owner_cpu_percent: 30,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading the agent config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent config {path} is not valid: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl AgentConfig {
    /// Parses the text of a config file; `path` is only for messages.
    pub fn parse(text: &str, path: &Path) -> Result<AgentConfig, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let config: AgentConfig = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let policy = &config.policy;
        if let Some(cores) = policy.max_cores
            && !(cores > 0.0 && cores.is_finite())
        {
            return Err(invalid(format!(
                "policy.max_cores = {cores}: give a number of cores above 0, such as 2 or 1.5"
            )));
        }
        if policy.idle.max_owner_cpu_percent > 100 {
            return Err(invalid(format!(
                "policy.idle.max_owner_cpu_percent = {}: give a percentage from 0 to 100",
                policy.idle.max_owner_cpu_percent
            )));
        }
        if policy.stop_grace_seconds > 3600 {
            return Err(invalid(format!(
                "policy.stop_grace_seconds = {}: at most 3600, so an owner never waits more than an hour",
                policy.stop_grace_seconds
            )));
        }
        if !(1..=300).contains(&policy.check_seconds) {
            return Err(invalid(format!(
                "policy.check_seconds = {}: give 1 to 300 seconds",
                policy.check_seconds
            )));
        }
        Ok(config)
    }

    /// Reads `path`. With `explicit` false (no `--config` given), a missing file means the
    /// defaults; an explicitly named file must exist.
    pub fn load(path: &Path, explicit: bool) -> Result<AgentConfig, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => AgentConfig::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                Ok(AgentConfig::default())
            }
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(text, Path::new("agent.toml"))
    }

    #[test]
    fn an_empty_file_is_the_default_policy() {
        let config = parse("").unwrap();
        assert_eq!(config, AgentConfig::default());
        assert!(config.policy.idle.only_when_idle);
        assert!(
            !config.policy.runtimes.contains(&RuntimeName::Process),
            "process is opt-in"
        );
        assert!(!config.policy.run_on_battery);
    }

    #[test]
    fn the_documented_example_parses() {
        let example = include_str!("../../agent.example.toml");
        let config = parse(example).unwrap();
        assert_eq!(config.policy.max_memory, Some(ByteSize(4 << 30)));
        assert_eq!(config.labels.get("room").map(String::as_str), Some("lab-3"));
    }

    #[test]
    fn the_metrics_endpoint_is_off_unless_an_address_is_given() {
        assert_eq!(parse("").unwrap().metrics.address, None);
        let on = parse("[metrics]\naddress = \"127.0.0.1:9464\"\n").unwrap();
        assert_eq!(on.metrics.address, Some("127.0.0.1:9464".parse().unwrap()));
        let err = parse("[metrics]\naddress = \"localhost\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("address"), "{err}");
    }

    #[test]
    fn a_misspelt_key_is_refused_by_name() {
        let err = parse("[policy]\nmax_core = 2\n").unwrap_err().to_string();
        assert!(
            err.contains("max_core") && err.contains("agent.toml"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_are_refused_with_the_field_and_a_fix() {
        let cases = [
            ("[policy]\nmax_cores = 0\n", "policy.max_cores"),
            ("[policy]\nmax_memory = \"lots\"\n", "such as 512Mi"),
            (
                "[policy.idle]\nmax_owner_cpu_percent = 150\n",
                "max_owner_cpu_percent",
            ),
            (
                "[policy.schedule]\nfriday = [\"9-5\"]\n",
                "for example 21:00-07:00",
            ),
            ("[policy]\nruntimes = [\"java\"]\n", "java"),
        ];
        for (text, expected) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?} gave: {err}");
        }
    }

    #[test]
    fn a_missing_default_file_means_defaults_but_a_named_one_must_exist() {
        let missing = Path::new("/nonexistent/darkcore/agent.toml");
        assert_eq!(
            AgentConfig::load(missing, false).unwrap(),
            AgentConfig::default()
        );
        assert!(matches!(
            AgentConfig::load(missing, true),
            Err(ConfigError::Read { .. })
        ));
    }
}
