//! The `darkcore-agent` command. Joining a pool and running tasks arrive with the gateway;
//! today it shows what this device would offer, and what the owner's policy decides now.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use darkcore_agent::policy::config::DEFAULT_CONFIG_PATH;
use darkcore_agent::policy::schedule::LocalTime;
use darkcore_agent::policy::{AgentConfig, InputIdle, Observation, decide};
use darkcore_agent::{capabilities, sensors};

#[derive(Parser)]
#[command(
    name = "darkcore-agent",
    version,
    about = "Gives this device's idle cores to a darkcore pool, on its owner's terms"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show what this device would offer a pool: os, arch, cores, memory.
    Info,
    /// Show what your policy decides right now, and why.
    Policy {
        /// The agent config (TOML). Default: /etc/darkcore/agent.toml, or built-in defaults
        /// when that file does not exist.
        #[arg(long, env = "DARKCORE_AGENT_CONFIG")]
        config: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Info => {
            let caps = capabilities::detect().context("detecting this device's capabilities")?;
            println!("os:       {}", caps.os);
            println!("arch:     {}", caps.arch);
            println!("cores:    {}", caps.cores);
            println!("memory:   {} MiB", caps.memory_bytes >> 20);
            println!("runtimes: {}", runtime_names(&caps.runtimes));
            println!("protocol: {:?}", darkcore_proto::PROTOCOL_VERSION);
            Ok(())
        }
        Command::Policy { config } => {
            let explicit = config.is_some();
            let path = config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
            let config = AgentConfig::load(&path, explicit)?;
            let caps = capabilities::detect().context("detecting this device's capabilities")?;
            let observation = Observation {
                now: LocalTime::now(),
                // Keyboard and mouse idle time is not measured yet: CPU load decides alone.
                input: InputIdle::NotMeasured,
                host_cpu_busy: sensors::read_cpu_busy(Duration::from_secs(1))
                    .context("reading CPU load from /proc/stat")?,
                task_cpu_busy: 0.0,
                on_battery: sensors::on_battery(&sensors::read_power_supplies(
                    std::path::Path::new("/sys/class/power_supply"),
                )),
            };
            let decision = decide(&config.policy, &caps, &observation);
            println!(
                "config:    {}",
                if path.exists() {
                    path.display().to_string()
                } else {
                    "built-in defaults".into()
                }
            );
            println!(
                "available: {}",
                if decision.available { "yes" } else { "no" }
            );
            println!("why:       {}", decision.reason);
            println!(
                "offer:     {} CPU, {} MiB memory, {} MiB disk, runtimes: {}",
                f64::from(decision.offer.millicores) / 1000.0,
                decision.offer.memory_bytes >> 20,
                decision.offer.disk_bytes >> 20,
                runtime_names(&decision.offer.runtimes)
            );
            Ok(())
        }
    }
}

fn runtime_names(runtimes: &[i32]) -> String {
    let names: Vec<String> = runtimes
        .iter()
        .filter_map(|r| darkcore_proto::agent::v1::Runtime::try_from(*r).ok())
        .map(|r| {
            r.as_str_name()
                .trim_start_matches("RUNTIME_")
                .to_lowercase()
        })
        .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}
