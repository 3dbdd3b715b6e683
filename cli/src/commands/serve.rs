use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use super::parse_bytes;
use tier0_dataplane::daemon::{DataDaemon, DataDaemonConfig, DriveConfig, RdmaMode};
use tier0_dataplane::store::StoreConfig;
use tier0_dataplane::worker::PollMode;
use tier0_topology::{WorkerPolicy, discover_live, plan_workers};

#[derive(Debug, Subcommand)]
pub enum ServeCommand {
    /// The data daemon of this node: serves chunk reads and writes from its drives over TCP,
    /// and reads over RDMA where there is an HCA, until SIGINT or SIGTERM.
    Data(DataArgs),
}

#[derive(Debug, Args)]
pub struct DataArgs {
    /// A drive: a block device or a store file (repeat for several). A missing file is
    /// created at --store-size and formatted.
    #[arg(long = "store", value_name = "PATH", required = true)]
    stores: Vec<PathBuf>,
    /// Size of store files created here.
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    store_size: u64,
    /// Chunk size of stores formatted here.
    #[arg(long, default_value = "4MiB", value_parser = parse_bytes)]
    chunk_size: u64,
    /// Address to listen on (port 0 picks one; the address is printed).
    #[arg(long, default_value = "127.0.0.1:7400")]
    listen: SocketAddr,
    /// This node's name in replies and logs (default: the host name).
    #[arg(long)]
    node: Option<String>,
    /// File holding the cluster token (else the TIER0_TOKEN environment variable).
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (`/metrics`).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Worker poll mode: busy, adaptive or interrupt.
    #[arg(long, default_value = "adaptive")]
    poll_mode: PollMode,
    /// Data-plane workers per NUMA node (default: one per physical core).
    #[arg(long)]
    workers_per_node: Option<usize>,
    /// Requests in flight per worker.
    #[arg(long, default_value_t = 32)]
    in_flight: usize,
    /// Registered chunk buffers per worker.
    #[arg(long, default_value_t = 32)]
    buffers: usize,
    /// Do not pin workers to their cores.
    #[arg(long)]
    no_pin: bool,
    /// RDMA: `auto` (each worker uses the HCA nearest its NUMA node; TCP only where there is
    /// none), `off`, or a device name for every worker.
    #[arg(long, default_value = "auto")]
    rdma: RdmaMode,
}

pub fn run(command: ServeCommand) -> anyhow::Result<()> {
    match command {
        ServeCommand::Data(args) => data(args),
    }
}

fn token(args: &DataArgs) -> anyhow::Result<Vec<u8>> {
    let token = match &args.token_file {
        Some(path) => std::fs::read(path)
            .with_context(|| format!("reading the token file {}", path.display()))?,
        None => match std::env::var_os("TIER0_TOKEN") {
            Some(token) => token.into_encoded_bytes(),
            None => bail!("no cluster token: pass --token-file or set TIER0_TOKEN"),
        },
    };
    let token = token.trim_ascii().to_vec();
    if token.is_empty() {
        bail!("the cluster token is empty");
    }
    Ok(token)
}

fn data(args: DataArgs) -> anyhow::Result<()> {
    let token = token(&args)?;
    let chunk_size = u32::try_from(args.chunk_size)
        .ok()
        .filter(|size| *size >= 4096 && size % 4096 == 0)
        .with_context(|| {
            format!(
                "--chunk-size {} must be a multiple of 4096 below 4 GiB",
                args.chunk_size
            )
        })?;
    // SIGINT and SIGTERM are taken by `sigwait` below: block them before any thread starts,
    // so every thread inherits the mask and none dies of them.
    let signals = block_stop_signals()?;
    let machine = discover_live().context("reading this machine's topology")?;
    let plan = plan_workers(
        &machine,
        &WorkerPolicy {
            workers_per_numa_node: args.workers_per_node,
            allowed_cpus: None,
        },
    );
    if let Some(addr) = args.metrics {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("serving metrics on {addr}"))?;
    }
    let node = args.node.clone().unwrap_or_else(host_name);
    let config = DataDaemonConfig {
        node: node.clone(),
        listen: args.listen,
        token,
        drives: args
            .stores
            .iter()
            .map(|path| DriveConfig {
                path: path.clone(),
                create_size: Some(args.store_size),
                numa_node: 0,
            })
            .collect(),
        store: StoreConfig {
            chunk_size,
            ..StoreConfig::default()
        },
        poll_mode: args.poll_mode,
        in_flight_max: args.in_flight,
        buffers_per_worker: args.buffers,
        hugepages: true,
        pin: !args.no_pin,
        rdma: args.rdma.clone(),
    };
    let daemon = DataDaemon::start(&config, &plan)?;
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "tier0: data daemon {node} listening on {}",
        daemon.local_addr()
    )?;
    stdout.flush()?;
    drop(stdout);
    let signal = wait_for(&signals)?;
    tracing::info!(signal, "stopping");
    daemon.shutdown();
    Ok(())
}

fn block_stop_signals() -> anyhow::Result<libc::sigset_t> {
    // SAFETY: sigset operations on a local set, then pthread_sigmask on this thread.
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let result = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if result != 0 {
            bail!(
                "blocking SIGINT and SIGTERM: {}",
                std::io::Error::from_raw_os_error(result)
            );
        }
        Ok(set)
    }
}

fn wait_for(set: &libc::sigset_t) -> anyhow::Result<i32> {
    let mut signal = 0;
    // SAFETY: sigwait reads the set and writes one int.
    let result = unsafe { libc::sigwait(set, &mut signal) };
    if result != 0 {
        bail!(
            "waiting for a signal: {}",
            std::io::Error::from_raw_os_error(result)
        );
    }
    Ok(signal)
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| "localhost".to_string())
}
