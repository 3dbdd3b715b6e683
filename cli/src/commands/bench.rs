use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::parse_bytes;
use tier0_dataplane::worker::PollMode;
use tier0_perf::local::{LocalBenchOptions, Target};
use tier0_perf::net::{NetBenchOptions, NetTransport};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Sequential 1 MiB and random 4 KiB reads through the chunk store and the workers, next
    /// to fio on the same file.
    Local(LocalArgs),
    /// Striped reads over 3 local daemons, over TCP or RDMA, next to a socket blaster (TCP)
    /// or perftest on the same device (RDMA; run it inside ../shared/tools/softroce-vm).
    Net(NetArgs),
}

#[derive(Debug, Args)]
pub struct NetArgs {
    /// tcp, rdma, or local (the node-local shared-memory path, next to the TCP baselines).
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "rdma", "local"])]
    transport: String,
    /// Bytes of the striped file (default: 256MiB over TCP, 64MiB over RDMA).
    #[arg(long, value_parser = parse_bytes)]
    size: Option<u64>,
    /// Daemons the file is striped over.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=16))]
    daemons: u32,
    /// Chunk size (and request size).
    #[arg(long, default_value = "1MiB", value_parser = parse_bytes)]
    chunk_size: u64,
    /// Requests in flight per connection, for tier0 and the baseline alike.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=32))]
    window: u32,
    /// Runs of each side per scenario; each side's median is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    repeats: u32,
    /// 4 KiB reads per run of the latency scenario.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(10..=1_000_000))]
    small_reads: u32,
    /// Folder for the daemons' store files (default: /dev/shm, else the temp folder).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Worker poll mode of the daemons: busy, adaptive or interrupt (default: adaptive when
    /// each daemon can have a core of its own, else interrupt).
    #[arg(long)]
    poll_mode: Option<PollMode>,
    /// The daemons drive their stores (in memory, /dev/shm) through io_uring and read every
    /// chunk into a pool buffer before sending it, as from an NVMe drive; otherwise
    /// whole-block TCP reads are sent from a read-only mapping of the store and the rest
    /// copied from its pages.
    #[arg(long)]
    no_map_memory: bool,
    /// Print a JSON array, one object per scenario.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct LocalArgs {
    /// Bytes of chunk data to write and read (1GiB, 512MiB, …).
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    size: u64,
    /// File for the store (created, preallocated, removed afterwards unless --keep).
    #[arg(long, value_name = "PATH", conflicts_with = "device")]
    file: Option<PathBuf>,
    /// Block device for the store (loop device, NVMe namespace). Its contents are destroyed.
    #[arg(long, value_name = "DEV")]
    device: Option<PathBuf>,
    /// I/Os in flight, for tier0 and fio alike.
    #[arg(long, default_value_t = 32)]
    queue_depth: u32,
    /// How many times the sequential scenario reads all the data.
    #[arg(long, default_value_t = 2)]
    passes: u32,
    /// Seconds the random scenario runs, for each side.
    #[arg(long, default_value_t = 5.0)]
    random_seconds: f64,
    /// Runs of fio and tier0, alternating, per scenario; each side's median is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    repeats: u32,
    /// Worker poll mode: busy, adaptive or interrupt.
    #[arg(long, default_value = "adaptive")]
    poll_mode: PollMode,
    /// Chunk size of the store.
    #[arg(long, default_value = "4MiB", value_parser = parse_bytes)]
    chunk_size: u64,
    /// Keep the store file afterwards.
    #[arg(long)]
    keep: bool,
    /// Print a JSON array, one object per scenario.
    #[arg(long)]
    json: bool,
}

pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Local(args) => local(args),
        BenchCommand::Net(args) => net(args),
    }
}

fn net(args: NetArgs) -> anyhow::Result<()> {
    let transport = match args.transport.as_str() {
        "rdma" => NetTransport::Rdma,
        "local" => NetTransport::Local,
        _ => NetTransport::Tcp,
    };
    let chunk_size = u32::try_from(args.chunk_size)
        .ok()
        .filter(|size| *size >= 4096 && size % 4096 == 0 && *size <= 64 << 20)
        .context("--chunk-size must be a multiple of 4 KiB, at most 64 MiB")?;
    let defaults = NetBenchOptions::default();
    let size = args.size.unwrap_or(match transport {
        NetTransport::Tcp | NetTransport::Local => 256 << 20,
        // Soft-RoCE moves ~50-70 MB/s.
        NetTransport::Rdma => 64 << 20,
    });
    if size < u64::from(chunk_size) * u64::from(args.daemons) {
        anyhow::bail!("--size must hold at least one chunk per daemon");
    }
    let options = NetBenchOptions {
        transport,
        daemons: args.daemons as usize,
        size,
        chunk_size,
        window: args.window as usize,
        repeats: args.repeats,
        small_reads: args.small_reads as usize,
        dir: args.dir.unwrap_or(defaults.dir),
        poll_mode: args
            .poll_mode
            .unwrap_or_else(|| tier0_perf::net::default_poll_mode(args.daemons as usize)),
        map_memory_drives: !args.no_map_memory,
    };
    let results = tier0_perf::net::run(&options, &mut |line| eprintln!("bench: {line}"))?;
    print_results(&results, args.json)
}

fn print_results(results: &[tier0_perf::ScenarioResult], json: bool) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut stdout, results).context("writing JSON")?;
        writeln!(stdout).context("writing JSON")?;
    } else {
        stdout
            .write_all(tier0_perf::render_table(results).as_bytes())
            .context("writing the table")?;
    }
    Ok(())
}

fn local(args: LocalArgs) -> anyhow::Result<()> {
    if !(args.random_seconds > 0.0 && args.random_seconds <= 3600.0) {
        anyhow::bail!("--random-seconds must be between 0 and 3600");
    }
    let chunk_size = u32::try_from(args.chunk_size)
        .ok()
        .filter(|size| *size >= 1 << 20 && size % (1 << 20) == 0)
        .context("--chunk-size must be a whole number of MiB below 4 GiB")?;
    let target = match (args.file, args.device) {
        (_, Some(device)) => Target::Device(device),
        (Some(file), None) => Target::File(file),
        (None, None) => LocalBenchOptions::default().target,
    };
    let options = LocalBenchOptions {
        size: args.size,
        target,
        queue_depth: args.queue_depth,
        sequential_passes: args.passes.max(1),
        random_runtime: Duration::from_secs_f64(args.random_seconds),
        repeats: args.repeats,
        poll_mode: args.poll_mode,
        chunk_size,
        keep: args.keep,
    };
    let results = tier0_perf::local::run(&options, &mut |line| eprintln!("bench: {line}"))?;
    print_results(&results, args.json)
}
