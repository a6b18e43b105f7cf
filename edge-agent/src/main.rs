//! The `darkcore-agent` command. Joining a pool and running tasks arrive with the gateway;
//! today it reports what this device would offer.

use anyhow::Context as _;
use clap::{Parser, Subcommand};

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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Info => {
            let caps = darkcore_agent::capabilities::detect()
                .context("detecting this device's capabilities")?;
            println!("os:      {}", caps.os);
            println!("arch:    {}", caps.arch);
            println!("cores:   {}", caps.cores);
            println!("memory:  {} MiB", caps.memory_bytes >> 20);
            println!("protocol: {:?}", darkcore_proto::PROTOCOL_VERSION);
            Ok(())
        }
    }
}
