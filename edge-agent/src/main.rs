//! The `darkcore-agent` command: `join` a pool once, then `run`; `status`, `policy` and `info`
//! show what the agent is doing, what the owner's policy decides now, and what the device has.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use darkcore_agent::identity::DEFAULT_STATE_DIR;
use darkcore_agent::observe::PolicyMonitor;
use darkcore_agent::policy::AgentConfig;
use darkcore_agent::policy::config::DEFAULT_CONFIG_PATH;
use darkcore_agent::{capabilities, credit, join, status};
use tracing_subscriber::EnvFilter;

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

#[derive(clap::Args)]
struct StateDir {
    /// Where the device identity and status are kept.
    #[arg(long, env = "DARKCORE_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
}

#[derive(clap::Args)]
struct ConfigFile {
    /// The agent config (TOML). Default: /etc/darkcore/agent.toml, or built-in defaults
    /// when that file does not exist.
    #[arg(long, env = "DARKCORE_AGENT_CONFIG")]
    config: Option<PathBuf>,
}

impl ConfigFile {
    fn load(&self) -> anyhow::Result<(AgentConfig, PathBuf)> {
        let path = self
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
        Ok((AgentConfig::load(&path, self.config.is_some())?, path))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Join a pool with a token from its platform team; run once per device.
    Join {
        /// The gateway address the platform team gave: host:port or https://host:port.
        #[arg(long)]
        server: String,
        /// The join token (dct1....).
        #[arg(long, env = "DARKCORE_JOIN_TOKEN", hide_env_values = true)]
        token: String,
        #[command(flatten)]
        state: StateDir,
        #[command(flatten)]
        config: ConfigFile,
    },
    /// Stay connected to the pool and give this device's capacity as the policy allows.
    Run {
        #[command(flatten)]
        state: StateDir,
        #[command(flatten)]
        config: ConfigFile,
    },
    /// Show the connection, pool, policy state, running tasks and what this device gave.
    Status {
        #[command(flatten)]
        state: StateDir,
    },
    /// Check a credit statement (`darkcore-operator usage statement`, JSON or CSV).
    #[command(subcommand)]
    Statement(StatementCommand),
    /// Show what this device would offer a pool: os, arch, cores, memory.
    Info,
    /// Show what your policy decides right now, and why.
    Policy {
        #[command(flatten)]
        config: ConfigFile,
    },
}

#[derive(Subcommand)]
enum StatementCommand {
    /// Check that the operator signed FILE as it is: exit 0 and print what it credits, or
    /// exit 1 and say why not. The key is the one the operator gave this agent, or --key.
    Verify {
        file: PathBuf,
        /// The verification key (base64), as the operator's ConfigMap darkcore-statement-key
        /// publishes it.
        #[arg(long)]
        key: Option<String>,
        #[command(flatten)]
        state: StateDir,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    // One TLS provider for every client in the process (the registry client needs a default).
    let _ = rustls::crypto::ring::default_provider().install_default();
    match Cli::parse().command {
        Command::Join {
            server,
            token,
            state,
            config,
        } => {
            let (config, _) = config.load()?;
            let identity = join::join(&server, &token, &state.state_dir, &config).await?;
            println!(
                "joined pool {} as device {}; identity kept in {}",
                identity.device.pool,
                identity.device.device_id,
                state.state_dir.display()
            );
            println!(
                "next: darkcore-agent run --state-dir {}",
                state.state_dir.display()
            );
            Ok(())
        }
        Command::Run { state, config } => {
            let (config, _) = config.load()?;
            darkcore_agent::run::run(&state.state_dir, config).await
        }
        Command::Status { state } => {
            let (status, running) = status::read(&state.state_dir)?;
            print!("{}", status::render(&status, running));
            Ok(())
        }
        Command::Statement(StatementCommand::Verify { file, key, state }) => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let operator_key = status::read(&state.state_dir)
                .map(|(status, _)| status.statement_key)
                .unwrap_or_default();
            match credit::check(&text, key.as_deref(), &operator_key) {
                Ok(statement) => {
                    println!("{}", credit::describe_valid(&statement));
                    Ok(())
                }
                Err(error) => {
                    eprintln!("invalid: {}: {error}", file.display());
                    std::process::exit(1);
                }
            }
        }
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
            let (config, path) = config.load()?;
            let caps = capabilities::detect().context("detecting this device's capabilities")?;
            let mut monitor = PolicyMonitor::new(config, caps);
            monitor.prime().await;
            let decision = monitor.check();
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
