use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use super::parse_bytes;
use std::sync::Arc;

use tier0_control::model::{LayoutSettings, NO_ROUTE};
use tier0_control::server::{ControlConfig, ControlServer, StoreChoice};
use tier0_control_api::agent::{Agent, AgentConfig, HeatReport};
use tier0_control_api::proto;
use tier0_dataplane::daemon::{DataDaemon, DataDaemonConfig, DriveConfig, RdmaMode};
use tier0_dataplane::net::tcp::LocalSocket;
use tier0_dataplane::store::StoreConfig;
use tier0_dataplane::worker::PollMode;
use tier0_topology::{WorkerPolicy, discover_live, plan_workers};

#[derive(Debug, Subcommand)]
pub enum ServeCommand {
    /// The data daemon of this node: serves chunk reads and writes from its drives over TCP,
    /// and reads over RDMA where there is an HCA, until SIGINT or SIGTERM.
    Data(Box<DataArgs>),
    /// The control plane: namespace, layouts, snapshots and membership over gRPC, with its
    /// metadata in an embedded store (default) or etcd, until SIGINT or SIGTERM.
    Control(Box<ControlServeArgs>),
}

#[derive(Debug, Args)]
pub struct ControlServeArgs {
    /// Address to listen on (port 0 picks one; the address is printed).
    #[arg(long, default_value = "127.0.0.1:7300")]
    listen: SocketAddr,
    /// Directory for the embedded metadata store (`metadata.redb`); made if missing.
    #[arg(long, value_name = "DIR", required_unless_present = "meta")]
    data_dir: Option<PathBuf>,
    /// Keep metadata in etcd instead: `etcd://HOST:PORT[,HOST:PORT…][/PREFIX]`. Several
    /// control planes may share it; one leads.
    #[arg(long, value_name = "URL")]
    meta: Option<String>,
    /// File holding the cluster token (else the TIER0_TOKEN environment variable).
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// This control plane's name in elections and health (default: control-ADDR).
    #[arg(long)]
    id: Option<String>,
    /// The URL data nodes reach this control plane at; the other planes on the same etcd send
    /// the nodes here while it leads (default: http:// and --listen, unless a wildcard).
    #[arg(long, value_name = "URL")]
    advertise: Option<String>,
    /// How long a data node's heartbeat keeps it up.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    node_lease: std::time::Duration,
    /// How long the leader's lease lasts unrenewed (etcd): how soon another takes over.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    leader_ttl: std::time::Duration,
    /// How often the leader re-replicates chunks off down or draining nodes and collects
    /// garbage on the data daemons.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    upkeep_interval: std::time::Duration,
    /// How long a file's superseded versions are kept after it changed, so readers that
    /// opened one just before can finish (0s: collect at the next pass).
    #[arg(long, default_value = "10m", value_parser = parse_grace)]
    version_grace: std::time::Duration,
    /// What the rebalancer does after each upkeep pass: `auto` (replicate hot chunks to the
    /// node nearest the idle GPUs that will read them), `dry-run` (plan and log only), `off`.
    #[arg(long, default_value = "auto")]
    rebalance: tier0_control::rebalance::Mode,
    /// Rebalancing rules by path prefix or tag (TOML: mode, pin, never_move,
    /// max_bytes_per_hour, min_reads, replication, high_watermark; an [agents] table; see
    /// docs/SEMANTICS.md).
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// A node with more than this share of its capacity used sheds surplus cold replicas
    /// (never below a file's replication factor).
    #[arg(long, default_value_t = 0.9, value_parser = parse_watermark)]
    high_watermark: f64,
    /// Bytes the rebalancer copies per rolling hour at most.
    #[arg(long, default_value = "64GiB", value_parser = parse_bytes)]
    move_budget: u64,
    /// How long the audit logs (`admin movements`, `admin agent-actions`) keep a record; each
    /// keeps at most the newest 100,000 too.
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    audit_retention: std::time::Duration,
    /// Serve Prometheus metrics on this address (`/metrics`): the rebalancer's moves by
    /// state (`tier0_rebalance_moves_total`) and bytes copied.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Default chunk size of the namespace's root (set once, when the store is new).
    #[arg(long, default_value = "4MiB", value_parser = parse_bytes)]
    chunk_size: u64,
    /// Default replicas per chunk of the namespace's root (set once, when the store is new).
    #[arg(long, default_value_t = 2)]
    replication: u32,
}

/// A duration that may be zero (`0s`).
fn parse_grace(text: &str) -> Result<std::time::Duration, String> {
    if text.trim_end_matches(|c: char| c.is_ascii_alphabetic()) == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    parse_duration(text)
}

/// `500ms`, `10s`, `2m`, `6h`, `30d`.
pub(crate) fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map(|at| text.split_at(at))
        .unwrap_or((text, "s"));
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a number and a unit (500ms, 10s, 2m, 6h, 30d)"))?;
    let scale: u64 = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{text:?}: unit must be ms, s, m, h or d")),
    };
    let millis = value
        .checked_mul(scale)
        .ok_or_else(|| format!("{text:?}: too long"))?;
    if millis == 0 {
        return Err(format!("{text:?}: must be more than zero"));
    }
    // Leases and periods are added to clocks in milliseconds downstream: keep them far from
    // overflowing there.
    if millis > MAX_DURATION_MS {
        return Err(format!("{text:?}: at most a year"));
    }
    Ok(std::time::Duration::from_millis(millis))
}

/// The longest `parse_duration` takes: a year.
const MAX_DURATION_MS: u64 = 365 * 24 * 3600 * 1000;

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
    /// The node-local socket clients on this machine use for the shared-memory fast path:
    /// `auto` (`@tier0-data-<pid>-<port>`, abstract namespace), `off`, `@name` or a path.
    #[arg(long, default_value = "auto")]
    local_socket: LocalSocket,
    /// Drive memory-backed drives (tmpfs, ramfs) through io_uring and read every chunk into
    /// a pool buffer before sending it, as NVMe drives are; otherwise their whole-block TCP
    /// reads are sent from a read-only mapping and the rest copied from their pages.
    #[arg(long)]
    no_map_memory: bool,
    /// Register with this control plane and heartbeat to it (fences on stale layouts come
    /// back with each heartbeat). Several, comma-separated (control planes sharing one
    /// etcd): when the one in use fails, the daemon moves to the next. Without it the
    /// daemon serves alone.
    #[arg(
        long,
        env = "TIER0_CONTROL",
        value_name = "URL[,URL…]",
        value_delimiter = ','
    )]
    control: Vec<String>,
    /// The address other hosts reach this daemon at (default: --listen, which must then
    /// not be a wildcard address).
    #[arg(long, value_name = "HOST:PORT")]
    advertise: Option<String>,
    /// Replicas of a chunk go to distinct failure domains (a rack, a power feed).
    #[arg(long, default_value = "")]
    failure_domain: String,
    /// Heartbeat period (default: a third of the lease the control plane grants).
    #[arg(long, value_parser = parse_duration)]
    heartbeat: Option<std::time::Duration>,
}

pub fn run(command: ServeCommand) -> anyhow::Result<()> {
    match command {
        ServeCommand::Data(args) => data(*args),
        ServeCommand::Control(args) => control(*args),
    }
}

fn control(args: ControlServeArgs) -> anyhow::Result<()> {
    let token = super::control::read_token(args.token_file.as_ref())?;
    let store = match (&args.meta, &args.data_dir) {
        (Some(url), _) => StoreChoice::parse_etcd(url)?,
        (None, Some(dir)) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("making the data directory {}", dir.display()))?;
            StoreChoice::Redb(dir.join("metadata.redb"))
        }
        (None, None) => bail!("pass --data-dir DIR (embedded store) or --meta etcd://…"),
    };
    let chunk_size = u32::try_from(args.chunk_size)
        .with_context(|| format!("--chunk-size {} is too large", args.chunk_size))?;
    let mut config = ControlConfig::new(args.listen, token, store);
    config.control_id = args.id.clone().unwrap_or_default();
    config.advertise = args.advertise.clone();
    config.node_lease = args.node_lease;
    config.leader_ttl = args.leader_ttl;
    config.upkeep_interval = args.upkeep_interval;
    config.version_grace = args.version_grace;
    if let Some(addr) = args.metrics {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("serving metrics on {addr}"))?;
    }
    if let Some(file) = &args.policy {
        config.rebalance.policies =
            tier0_control::policy::Policies::load(file).map_err(anyhow::Error::msg)?;
    }
    config.rebalance.mode = args.rebalance;
    config.rebalance.high_watermark = args.high_watermark;
    config.rebalance.max_bytes_per_hour = args.move_budget;
    config.rebalance.audit_retention = args.audit_retention;
    config.defaults = LayoutSettings {
        chunk_size,
        replication: args.replication,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let server = ControlServer::start(config).await?;
        let mut stdout = std::io::stdout().lock();
        writeln!(
            stdout,
            "tier0: control plane listening on {}",
            server.local_addr()
        )?;
        stdout.flush()?;
        drop(stdout);
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("watching SIGTERM")?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("stopping");
        server.shutdown().await;
        Ok(())
    })
}

fn data(args: DataArgs) -> anyhow::Result<()> {
    let token = super::control::read_token(args.token_file.as_ref())?;
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
        local_socket: args.local_socket.clone(),
        map_memory_drives: !args.no_map_memory,
    };
    let daemon = DataDaemon::start(&config, &plan)?;
    let control: Vec<String> = args
        .control
        .iter()
        .map(|url| url.trim())
        .filter(|url| !url.is_empty())
        .map(str::to_owned)
        .collect();
    let agent = if control.is_empty() {
        None
    } else {
        Some(spawn_agent(&args, control, &config, &daemon, &machine)?)
    };
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
    if let Some(agent) = agent {
        agent.stop();
    }
    daemon.shutdown();
    Ok(())
}

/// Registers the daemon with the control plane and keeps it heartbeating, raising the
/// daemon's fences with what each heartbeat brings.
fn spawn_agent(
    args: &DataArgs,
    control: Vec<String>,
    config: &DataDaemonConfig,
    daemon: &DataDaemon,
    machine: &tier0_topology::Machine,
) -> anyhow::Result<Agent> {
    let address = match &args.advertise {
        Some(address) => address.clone(),
        None if daemon.local_addr().ip().is_unspecified() => bail!(
            "--listen {} is a wildcard address: pass --advertise HOST:PORT for the control plane",
            args.listen
        ),
        None => daemon.local_addr().to_string(),
    };
    let stores = daemon.stores().to_vec();
    let capacity: u64 = stores
        .iter()
        .map(|store| store.superblock().slot_count * u64::from(store.chunk_size()))
        .sum();
    let fences = Arc::clone(daemon.fences());
    let heat = Arc::clone(daemon.heat());
    let monitor = tier0_topology::GpuMonitor::open();
    match &monitor.unavailable {
        None => tracing::info!(gpus = machine.gpus.len(), "GPU activity from NVML"),
        Some(why) => tracing::debug!(%why, "no GPU activity to report"),
    }
    let gpus = machine.gpus.clone();
    let feeds = tier0_topology::feeds(machine);
    let topology = proto::TopologySummary {
        numa_nodes: machine.numa_nodes.len() as u32,
        cores: machine
            .numa_nodes
            .iter()
            .map(|n| n.cores.len() as u32)
            .sum(),
        gpus: machine.gpus.len() as u32,
        rdma_devices: machine
            .rdma_devices
            .iter()
            .map(|d| d.name.clone())
            .collect(),
        drives: stores.len() as u32,
        capacity_bytes: capacity,
        free_bytes: 0,
        failure_domain: args.failure_domain.clone(),
        gpu_feeds: gpu_feeds(&feeds),
        drive_nic_cost: feeds
            .drive_to_nic
            .map_or(NO_ROUTE, |distance| distance.locality.cost()),
    };
    Agent::spawn(AgentConfig {
        control,
        token: config.token.clone(),
        node_id: config.node.clone(),
        address,
        topology,
        interval: args.heartbeat,
        fences: Box::new(move |pairs| fences.raise_all(pairs.iter().copied())),
        free_bytes: Box::new(move || {
            stores
                .iter()
                .map(|store| store.free_slots() * u64::from(store.chunk_size()))
                .sum()
        }),
        heat: Box::new(move || HeatReport::from_map(&heat)),
        gpus: Box::new(move || measure_gpus(&monitor, &gpus)),
    })
    .context("starting the membership agent")
}

/// The node's GPUs as NVML measures them now, by topology index; `None` without NVML.
fn measure_gpus(
    monitor: &tier0_topology::GpuMonitor,
    gpus: &[tier0_topology::Gpu],
) -> Option<Vec<proto::GpuStatus>> {
    if !monitor.available() {
        return None;
    }
    Some(
        monitor
            .activity(gpus)
            .into_iter()
            .map(|gpu| proto::GpuStatus {
                index: gpu.index,
                busy: gpu.busy,
                job: String::new(),
                measured: true,
                utilization_percent: gpu.utilization_percent,
                compute_processes: gpu.compute_processes,
                memory_used_bytes: gpu.memory_used_bytes,
            })
            .collect(),
    )
}

pub(crate) fn block_stop_signals() -> anyhow::Result<libc::sigset_t> {
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

fn gpu_feeds(feeds: &tier0_topology::MachineFeeds) -> Vec<proto::GpuFeed> {
    let cost = |distance: Option<tier0_topology::Distance>| {
        distance.map_or(NO_ROUTE, |distance| distance.locality.cost())
    };
    feeds
        .gpus
        .iter()
        .map(|gpu| proto::GpuFeed {
            index: gpu.index,
            numa_node: gpu.numa_node.unwrap_or(0),
            has_numa_node: gpu.numa_node.is_some(),
            drive_cost: cost(gpu.drive),
            nic_cost: cost(gpu.nic),
        })
        .collect()
}

fn parse_watermark(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(share) if (0.0..=1.0).contains(&share) => Ok(share),
        _ => Err(format!(
            "{text:?}: a share of capacity from 0 to 1 (0.9 is 90%)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::parse_duration;

    #[test]
    fn durations_parse_and_overflow_is_an_error() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("5h"), Ok(Duration::from_secs(5 * 3600)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        for bad in ["0s", "5w", "ms", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        // value * 1000 and value * 60000 overflow u64: an error, not a panic or a wrap.
        let huge = format!("{}s", u64::MAX / 10);
        assert!(parse_duration(&huge).unwrap_err().contains("too long"));
        let huge = format!("{}m", u64::MAX / 1000);
        assert!(parse_duration(&huge).unwrap_err().contains("too long"));
        assert!(parse_duration("366d").unwrap_err().contains("a year"));
        assert!(parse_duration("600000m").unwrap_err().contains("a year"));
    }
}
