//! `tier0 sim`: the cluster simulator (AU with no rebalancing, tier0's rebalancer and an
//! oracle) and `tier0 sim planner`, the planner benchmark.

use clap::{Args, Subcommand};

use super::parse_bytes;
use tier0_perf::sim::{self, SimConfig, planner};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SimArgs {
    #[command(subcommand)]
    command: Option<SimCommand>,
    #[command(flatten)]
    cluster: ClusterArgs,
}

#[derive(Debug, Subcommand)]
enum SimCommand {
    /// Time one rebalancer pass planned over a large namespace (10 M extents, 1,000 nodes).
    Planner(PlannerArgs),
}

/// The simulated cluster and workload (defaults: `SimConfig::default`).
#[derive(Debug, Args)]
struct ClusterArgs {
    #[arg(long, default_value_t = SimConfig::default().nodes)]
    nodes: u32,
    /// GPUs per node.
    #[arg(long, default_value_t = SimConfig::default().gpus)]
    gpus: u32,
    /// Read bandwidth of a node's drives together, GB/s.
    #[arg(long, default_value_t = SimConfig::default().nvme_gbps)]
    nvme_gbps: f64,
    /// A node's NIC bandwidth each way, GB/s.
    #[arg(long, default_value_t = SimConfig::default().nic_gbps)]
    nic_gbps: f64,
    /// What one GPU consumes at full AU, GB/s.
    #[arg(long, default_value_t = SimConfig::default().gpu_gbps)]
    gpu_gbps: f64,
    /// Extent (chunk) size, MiB.
    #[arg(long, default_value_t = SimConfig::default().extent_mib)]
    extent_mib: u32,
    /// Extents a GPU keeps in flight or ready.
    #[arg(long, default_value_t = SimConfig::default().prefetch)]
    prefetch: u32,
    #[arg(long, default_value_t = SimConfig::default().datasets)]
    datasets: u32,
    #[arg(long, default_value_t = SimConfig::default().dataset_gib)]
    dataset_gib: u64,
    #[arg(long, default_value_t = SimConfig::default().replication)]
    replication: u32,
    /// A node's drive capacity, GiB.
    #[arg(long, default_value_t = SimConfig::default().capacity_gib)]
    capacity_gib: u64,
    /// The share of nodes running jobs.
    #[arg(long, default_value_t = SimConfig::default().busy_share)]
    busy_share: f64,
    /// Most nodes one job takes.
    #[arg(long, default_value_t = SimConfig::default().job_nodes)]
    job_nodes: u32,
    /// Shortest and longest job, minutes (`10..30`).
    #[arg(long, default_value = "10..30", value_parser = parse_range)]
    job_minutes: (f64, f64),
    /// Simulated seconds.
    #[arg(long, default_value_t = SimConfig::default().duration_s)]
    duration: f64,
    /// Seconds between rebalancer passes.
    #[arg(long, default_value_t = SimConfig::default().rebalance_s)]
    rebalance_interval: f64,
    /// Bytes the rebalancer may copy per rolling hour, cluster-wide (default: 1 TiB a node).
    #[arg(long, value_parser = parse_bytes)]
    move_budget: Option<u64>,
    #[arg(long, default_value_t = SimConfig::default().high_watermark)]
    high_watermark: f64,
    /// Added time of a read from another node, µs.
    #[arg(long, default_value_t = SimConfig::default().remote_latency_us)]
    remote_latency_us: f64,
    #[arg(long, default_value_t = SimConfig::default().seed)]
    seed: u64,
    /// Print one JSON object: au_none, au_tier0, au_oracle, params, runs.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct PlannerArgs {
    #[arg(long, default_value_t = planner::PlannerConfig::default().extents)]
    extents: u64,
    #[arg(long, default_value_t = planner::PlannerConfig::default().nodes)]
    nodes: u32,
    /// GPUs per node.
    #[arg(long, default_value_t = planner::PlannerConfig::default().gpus)]
    gpus: u32,
    #[arg(long, default_value_t = planner::PlannerConfig::default().files)]
    files: u32,
    #[arg(long, default_value_t = planner::PlannerConfig::default().replication)]
    replication: u32,
    /// The share of extents that are hot.
    #[arg(long, default_value_t = planner::PlannerConfig::default().hot_share)]
    hot_share: f64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

fn parse_range(text: &str) -> Result<(f64, f64), String> {
    let (low, high) = text
        .split_once("..")
        .ok_or_else(|| format!("{text:?}: write LOW..HIGH"))?;
    let number = |part: &str| {
        part.trim()
            .parse::<f64>()
            .map_err(|error| format!("{text:?}: {part:?}: {error}"))
    };
    Ok((number(low)?, number(high)?))
}

pub fn run(args: SimArgs) -> anyhow::Result<()> {
    match args.command {
        Some(SimCommand::Planner(planner_args)) => run_planner(planner_args),
        None => run_cluster(args.cluster),
    }
}

fn run_cluster(args: ClusterArgs) -> anyhow::Result<()> {
    let config = SimConfig {
        nodes: args.nodes,
        gpus: args.gpus,
        nvme_gbps: args.nvme_gbps,
        nic_gbps: args.nic_gbps,
        gpu_gbps: args.gpu_gbps,
        extent_mib: args.extent_mib,
        prefetch: args.prefetch,
        datasets: args.datasets,
        dataset_gib: args.dataset_gib,
        replication: args.replication,
        capacity_gib: args.capacity_gib,
        busy_share: args.busy_share,
        job_nodes: args.job_nodes,
        job_minutes: args.job_minutes,
        duration_s: args.duration,
        rebalance_s: args.rebalance_interval,
        move_budget_bytes: args
            .move_budget
            .unwrap_or(u64::from(args.nodes).saturating_mul(1 << 40)),
        high_watermark: args.high_watermark,
        remote_latency_us: args.remote_latency_us,
        seed: args.seed,
    };
    let report = sim::run(&config).map_err(|error| anyhow::anyhow!("sim: {error}"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", sim::render(&report));
    }
    Ok(())
}

fn run_planner(args: PlannerArgs) -> anyhow::Result<()> {
    let config = planner::PlannerConfig {
        extents: args.extents,
        nodes: args.nodes,
        gpus: args.gpus,
        files: args.files,
        replication: args.replication,
        hot_share: args.hot_share,
        ..planner::PlannerConfig::default()
    };
    let report = planner::run(&config).map_err(|error| anyhow::anyhow!("sim planner: {error}"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} extents in {} files on {} nodes × {} GPUs, replication {}, {} hot\n\
             heat summed in {:.2} s; pass planned in {:.2} s: {} moves ({} to make, {} refused)\n\
             (building the namespace took {:.1} s, not counted)",
            config.extents,
            config.files,
            config.nodes,
            config.gpus,
            config.replication,
            report.hot_extents,
            report.heat_seconds,
            report.plan_seconds,
            report.moves,
            report.executable,
            report.refused,
            report.build_seconds
        );
    }
    Ok(())
}
