//! The `darkcore-operator` command: `run` the controllers, or print the `crds`.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
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
    Run(darkcore_operator::run::RunArgs),
    /// Print the CustomResourceDefinitions as YAML, for `kubectl apply -f -`.
    Crds,
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
            darkcore_operator::run::run(args).await
        }
    }
}
