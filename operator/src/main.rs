//! The `darkcore-operator` command: `run` the controllers, print the `crds`, or manage join
//! `token`s.

use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use darkcore_operator::devices::listing as devices_cli;
use darkcore_operator::enroll::{revocation, token, token_store};
use darkcore_operator::usage::report as usage_report;
use darkcore_operator::usage::statement as usage_statement;
use k8s_openapi::jiff::Timestamp;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "darkcore-operator",
    version,
    about = "Turns volunteer devices into Kubernetes capacity"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controllers against the cluster in KUBECONFIG (or the in-cluster config).
    Run(Box<darkcore_operator::run::RunArgs>),
    /// Print the CustomResourceDefinitions as YAML, for `kubectl apply -f -`.
    Crds,
    /// Create, list and revoke the join tokens device owners use.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Revoke a device: its stream is closed and it can never connect again.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// List the devices a running operator knows (soft state: nothing is read from the API).
    Devices {
        /// The operator's HTTP address (its --http-addr), e.g. through `kubectl port-forward`.
        #[arg(
            long,
            env = "DARKCORE_OPERATOR_URL",
            default_value = "http://127.0.0.1:8080"
        )]
        operator: String,
        /// Only this pool's devices.
        #[arg(long)]
        pool: Option<String>,
    },
    /// What the pools' devices gave (CPU, memory, tasks), per pool and namespace, read from
    /// the PoolUsage objects.
    Usage {
        #[command(subcommand)]
        statement: Option<UsageCommand>,
        /// Only this pool.
        #[arg(long)]
        pool: Option<String>,
        /// From this UTC day on: a date (2026-11-01) or a time back from now (24h, 7d).
        #[arg(long)]
        since: Option<String>,
        /// A row per device, too.
        #[arg(long)]
        per_device: bool,
        /// table or json.
        #[arg(long, short = 'o', default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
}

#[derive(Subcommand)]
enum UsageCommand {
    /// What a device or an owner was credited over a period, signed with the operator's
    /// statement key: only validated results (or a trusted device's unverified ones) earn, at
    /// the pool's spec.credit prices. `darkcore-agent statement verify FILE` checks it.
    Statement {
        /// One device, by id.
        #[arg(long, required_unless_present = "owner", conflicts_with = "owner")]
        device: Option<String>,
        /// Every device of an owner (as its join token named it).
        #[arg(long)]
        owner: Option<String>,
        /// A day (2026-12-01), a month (2026-12), a range (2026-11-01..2026-11-30), or a time
        /// back from now to today (7d).
        #[arg(long)]
        period: String,
        /// Only this pool.
        #[arg(long)]
        pool: Option<String>,
        /// json, or csv (the rows, then the signed statement on a comment line).
        #[arg(long, short = 'o', default_value = "json", value_parser = ["json", "csv"])]
        output: String,
        #[command(flatten)]
        scope: Scope,
    },
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Revoke a device by id (see `darkcore-operator devices`).
    Revoke {
        id: String,
        #[command(flatten)]
        scope: Scope,
    },
}

#[derive(Args)]
struct Scope {
    /// The operator's namespace, where tokens and the CA are kept.
    #[arg(
        long,
        short = 'n',
        env = "DARKCORE_NAMESPACE",
        default_value = "darkcore-system"
    )]
    namespace: String,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a join token for a pool and print it (once: only its hash is kept).
    Create {
        #[arg(long)]
        pool: String,
        /// How long the token is valid: 90s, 30m, 24h, 7d.
        #[arg(long, default_value = "24h", value_parser = token::parse_ttl)]
        ttl: Duration,
        /// How many devices may join with it: one by default, so a leaked token admits at
        /// most one stranger. 0: any number until it expires.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Whose devices join with it (a person or an organisation, as you know them): the
        /// replicas of a checked pod run on devices of distinct owners. Without it, each
        /// device counts as its own owner.
        #[arg(long, value_parser = token::parse_owner)]
        owner: Option<String>,
        #[command(flatten)]
        scope: Scope,
    },
    /// List join tokens (never their secrets).
    List {
        #[command(flatten)]
        scope: Scope,
    },
    /// Revoke a join token: no device can join with it any more.
    Revoke {
        id: String,
        #[command(flatten)]
        scope: Scope,
    },
}

async fn issue_statement(command: UsageCommand) -> anyhow::Result<()> {
    let UsageCommand::Statement {
        device,
        owner,
        period,
        pool,
        output,
        scope,
    } = command;
    let subject = match (device, owner) {
        (Some(device), _) => darkcore_statement::Subject::Device(device),
        (None, Some(owner)) => darkcore_statement::Subject::Owner(owner),
        (None, None) => anyhow::bail!("say whose statement: --device ID or --owner NAME"),
    };
    let period =
        usage_statement::parse_period(&period, Timestamp::now()).map_err(anyhow::Error::msg)?;
    let client = kube::Client::try_default()
        .await
        .context("connecting to Kubernetes: set KUBECONFIG to a kubeconfig file")?;
    let signed =
        usage_statement::issue(&client, &scope.namespace, subject, &period, pool.as_deref())
            .await?;
    match output.as_str() {
        "csv" => print!("{}", signed.to_csv()?),
        _ => println!("{}", serde_json::to_string_pretty(&signed)?),
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds => {
            print!(
                "{}",
                darkcore_crds::crd_yaml().context("rendering the CRDs")?
            );
            Ok(())
        }
        Command::Run(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
                )
                .init();
            darkcore_operator::run::run(*args).await
        }
        Command::Token(command) => tokens(command).await,
        Command::Device(DeviceCommand::Revoke { id, scope }) => {
            let client = kube::Client::try_default()
                .await
                .context("connecting to Kubernetes: set KUBECONFIG to a kubeconfig file")?;
            revocation::revoke(&client, &scope.namespace, &id).await?;
            println!("revoked device {id}: its stream is closed and it cannot connect again");
            Ok(())
        }
        Command::Usage {
            statement: Some(statement),
            ..
        } => issue_statement(statement).await,
        Command::Usage {
            statement: None,
            pool,
            since,
            per_device,
            output,
        } => {
            let since = since
                .map(|text| usage_report::since_day(&text, Timestamp::now()))
                .transpose()
                .map_err(anyhow::Error::msg)?;
            let client = kube::Client::try_default()
                .await
                .context("connecting to Kubernetes: set KUBECONFIG to a kubeconfig file")?;
            let objects = usage_report::fetch(&client, pool.as_deref()).await?;
            let rows = usage_report::summarize(&objects, since.as_deref(), per_device);
            if output == "json" {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", usage_report::render(&rows, per_device));
            }
            Ok(())
        }
        Command::Devices { operator, pool } => {
            let devices = devices_cli::fetch(&operator, pool.as_deref()).await?;
            print!("{}", devices_cli::render(&devices));
            Ok(())
        }
    }
}

async fn tokens(command: TokenCommand) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to Kubernetes: set KUBECONFIG to a kubeconfig file")?;
    match command {
        TokenCommand::Create {
            pool,
            ttl,
            uses,
            owner,
            scope,
        } => {
            let uses = (uses > 0).then_some(uses);
            let token =
                token_store::create(&client, &scope.namespace, &pool, ttl, uses, owner).await?;
            println!("{token}");
            eprintln!(
                "Join token {} for pool {pool}, valid for {}{}. It is shown only now; give it to device owners:\n  darkcore-agent join --server <gateway address> --token {token}",
                token.id,
                humanize(ttl),
                uses.map_or(", for any number of devices".into(), |n| format!(
                    ", for {n} device(s)"
                )),
            );
            Ok(())
        }
        TokenCommand::List { scope } => {
            let records = token_store::list(&client, &scope.namespace).await?;
            let now = Timestamp::now();
            println!(
                "{:<14} {:<24} {:<8} {:<22} {:<8} OWNER",
                "ID", "POOL", "STATE", "EXPIRES", "USES"
            );
            for r in records {
                let uses = match r.max_uses {
                    Some(max) => format!("{}/{max}", r.uses),
                    None => r.uses.to_string(),
                };
                println!(
                    "{:<14} {:<24} {:<8} {:<22} {:<8} {}",
                    r.id,
                    r.pool,
                    r.state(now),
                    r.expires.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
                    uses,
                    r.owner.as_deref().unwrap_or("-")
                );
            }
            Ok(())
        }
        TokenCommand::Revoke { id, scope } => {
            token_store::revoke(&client, &scope.namespace, &id).await?;
            println!("revoked join token {id}");
            Ok(())
        }
    }
}

fn humanize(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}
