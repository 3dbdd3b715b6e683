//! `tier0`: one binary for the daemons, the client commands, benchmarks and diagnostics.

mod commands;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "tier0",
    version,
    about = "tier0: the GPU servers' NVMe drives as one fast namespace"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the machine (NUMA nodes, GPUs, RDMA devices, drives) and the data-plane worker plan.
    Topology(commands::topology::TopologyArgs),
    /// Benchmarks: tier0 next to a baseline from the same run.
    #[command(subcommand)]
    Bench(commands::bench::BenchCommand),
    #[command(subcommand)]
    Serve(commands::serve::ServeCommand),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TIER0_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let cli = Cli::parse();
    let result = match cli.command {
        Command::Topology(args) => commands::topology::run(&args),
        Command::Bench(command) => commands::bench::run(command),
        Command::Serve(command) => commands::serve::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line, outermost context first, so scripts and people both read it.
            eprintln!("tier0: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
