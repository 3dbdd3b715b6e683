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
    /// Run a daemon: `serve data` (a node's drives) or `serve control` (the control plane).
    #[command(subcommand)]
    Serve(commands::serve::ServeCommand),
    /// List a directory of the namespace.
    Ls(commands::namespace::LsArgs),
    /// A file's or directory's metadata, and a file's kept versions.
    Stat(commands::namespace::StatArgs),
    /// Make a directory (with its own chunk size and replication, if given).
    Mkdir(commands::namespace::MkdirArgs),
    /// Remove a file or directory (chunks are collected once nothing needs them).
    Rm(commands::namespace::RmArgs),
    /// Rename or move a file or directory.
    Mv(commands::namespace::MvArgs),
    /// Show, set (`KEY=VALUE`) or remove (`KEY-`) tags on a path.
    Tag(commands::namespace::TagArgs),
    /// Snapshots of a subtree: create, list, diff, rollback, delete.
    #[command(subcommand)]
    Snapshot(commands::snapshot::SnapshotCommand),
    /// The operator's view: health, nodes, layouts, drain.
    #[command(subcommand)]
    Admin(commands::admin::AdminCommand),
    /// The MCP server for AI agents, on stdin/stdout: read-only unless the control plane's
    /// agents policy allows prestage, snapshot or rollback; every agent action is audited.
    Mcp(commands::mcp::McpArgs),
    /// Copy a local file or directory into the namespace (files in parallel).
    Put(commands::ingest::PutArgs),
    /// Copy a file or directory out of the namespace.
    Get(commands::ingest::GetArgs),
    /// Mount the namespace with FUSE (root and /dev/fuse), until SIGINT, SIGTERM or umount.
    Mount(commands::mount::MountArgs),
    /// A local cluster on loopback that keeps running: `up` and `down`.
    #[command(subcommand)]
    Cluster(commands::cluster::ClusterCommand),
    /// Simulate a GPU cluster: accelerator utilization with no rebalancing, with tier0's
    /// rebalancer and with an oracle (`sim planner`: time one planning pass at scale).
    Sim(commands::sim::SimArgs),
    /// Bring up a local cluster, ingest a dataset, read it back striped and verify every
    /// byte, compare with a plain local read, show a layout, clean up.
    Quickstart(commands::quickstart::QuickstartArgs),
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
        Command::Ls(args) => commands::namespace::ls(args),
        Command::Stat(args) => commands::namespace::stat(args),
        Command::Mkdir(args) => commands::namespace::mkdir(args),
        Command::Rm(args) => commands::namespace::rm(args),
        Command::Mv(args) => commands::namespace::mv(args),
        Command::Tag(args) => commands::namespace::tag(args),
        Command::Snapshot(command) => commands::snapshot::run(command),
        Command::Admin(command) => commands::admin::run(command),
        Command::Mcp(args) => commands::mcp::run(args),
        Command::Put(args) => commands::ingest::put(args),
        Command::Get(args) => commands::ingest::get(args),
        Command::Mount(args) => commands::mount::run(args),
        Command::Cluster(command) => commands::cluster::run(command),
        Command::Quickstart(args) => commands::quickstart::run(args),
        Command::Sim(args) => commands::sim::run(args),
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
