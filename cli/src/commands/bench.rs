use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::parse_bytes;
use tier0_dataplane::worker::PollMode;
use tier0_perf::local::{LocalBenchOptions, Target};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Sequential 1 MiB and random 4 KiB reads through the chunk store and the workers, next
    /// to fio on the same file.
    Local(LocalArgs),
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
    }
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
    let mut stdout = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut stdout, &results).context("writing JSON")?;
        writeln!(stdout).context("writing JSON")?;
    } else {
        stdout
            .write_all(tier0_perf::render_table(&results).as_bytes())
            .context("writing the table")?;
    }
    Ok(())
}
