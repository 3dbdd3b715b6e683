//! `tier0 bench net`: striped reads over a local cluster of 3 daemons, next to a baseline
//! from the same run that moves the same bytes with no storage and no protocol:
//! - TCP: a plain socket blaster on loopback, one connection per daemon, the same request
//!   window and size (a 16-byte request, the next bytes of that daemon's share of the file
//!   back from memory, each once per pass);
//! - RDMA: perftest `ib_write_bw` and `ib_read_bw` on the same device (soft-RoCE in the VM)
//!   for throughput; for reads one at a time, a verbs ping-pong of tier0's own messages
//!   ([`verbs_ping_pong`]) and perftest's one-sided `ib_read_lat`, the floor.
//!
//! Scenarios: `striped-read-<chunk>` (throughput, MiB/s; latency per request, with a sliding
//! window of them in flight; `-vs-read` against `ib_read_bw`) and `read-4k-qd1` (one 4 KiB
//! read at a time: latency, with reads/s as the figure; `-vs-read` against `ib_read_lat`). Every pass of tier0 checks the bytes it read against what was
//! written.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tier0_client::gate::Gate;
use tier0_client::{
    LayoutRef, RdmaClient, ReadBuffer, ReadInto, StripedFile, StripedReader, TransportChoice,
};
use tier0_dataplane::daemon::RdmaMode;
use tier0_dataplane::net::rdma::{RdmaDevice, device_names};
use tier0_dataplane::worker::PollMode;

use crate::cluster::{ClusterConfig, LocalCluster};
use crate::measure::{LatencyRecorder, Who, cpu_seconds};
use crate::report::{Latency, ScenarioResult};

mod verbs_ping_pong;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetTransport {
    Tcp,
    Rdma,
    /// The node-local shared-memory path (the daemons run on this node); its baselines are
    /// the TCP ones, the best a network path could do here.
    Local,
}

#[derive(Clone, Debug)]
pub struct NetBenchOptions {
    pub transport: NetTransport,
    pub daemons: usize,
    /// Bytes of the striped file.
    pub size: u64,
    pub chunk_size: u32,
    /// Requests in flight per connection, for tier0 and the blaster alike.
    pub window: usize,
    /// Runs of each side per scenario; each side's median is reported.
    pub repeats: u32,
    /// 4 KiB reads per run of the latency scenario.
    pub small_reads: usize,
    /// Where the daemons' store files go.
    pub dir: PathBuf,
    pub poll_mode: PollMode,
    /// Memory-backed stores send whole-block TCP reads from a mapping (`net::mapped`) and
    /// are read by copies from their pages (`device::MemoryFileDevice`), not io_uring.
    pub map_memory_drives: bool,
}

/// The poll mode for `daemons` local daemons of one worker each: adaptive (the product's
/// default) when each can have a core of its own and one is left for the client, interrupt
/// when they would share cores. Here the daemons stand in for separate nodes; on one small
/// machine a spinning worker only takes the core another daemon or the client needs (on
/// 2 cores with 3 daemons, adaptive serves 4 KiB reads one at a time 3x slower).
pub fn default_poll_mode(daemons: usize) -> PollMode {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores > daemons {
        PollMode::Adaptive
    } else {
        PollMode::Interrupt
    }
}

impl Default for NetBenchOptions {
    fn default() -> Self {
        let shm = PathBuf::from("/dev/shm");
        NetBenchOptions {
            transport: NetTransport::Tcp,
            daemons: 3,
            size: 256 << 20,
            chunk_size: 1 << 20,
            window: 16,
            repeats: 3,
            small_reads: 2000,
            dir: if shm.is_dir() {
                shm
            } else {
                std::env::temp_dir()
            },
            poll_mode: default_poll_mode(3),
            map_memory_drives: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetBenchError {
    #[error("{0}")]
    Setup(String),
    #[error("tier0 read failed: {0}")]
    Read(String),
    #[error("the bytes read differ from those written (pass {pass})")]
    Mismatch { pass: u32 },
    #[error("baseline {name}: {reason}")]
    Baseline { name: String, reason: String },
}

/// One run of one side. tier0 and the socket blaster measure all of it; perftest gives no
/// CPU of ours to count and, for bandwidth, no latency.
struct Run {
    seconds: f64,
    cpu: Option<f64>,
    latency: Option<Latency>,
}

impl Run {
    /// A run of tier0 or the blaster, which measure everything.
    fn measured(seconds: f64, cpu: f64, latency: Latency) -> Run {
        Run {
            seconds,
            cpu: Some(cpu),
            latency: Some(latency),
        }
    }
}

/// Runs both scenarios; `log` gets a line per step.
pub fn run(
    options: &NetBenchOptions,
    log: &mut dyn FnMut(String),
) -> Result<Vec<ScenarioResult>, NetBenchError> {
    if options.daemons == 0 || options.size == 0 {
        return Err(NetBenchError::Setup(
            "need at least one daemon and some bytes".into(),
        ));
    }
    let rdma = match options.transport {
        NetTransport::Tcp | NetTransport::Local => None,
        NetTransport::Rdma => Some(RdmaClient::open(None).map_err(|error| {
            NetBenchError::Setup(format!(
                "{error}: the RDMA bench needs a device (run it inside ../shared/tools/softroce-vm)"
            ))
        })?),
    };
    let per_daemon = options.size / options.daemons as u64;
    let config = ClusterConfig {
        daemons: options.daemons,
        chunk_size: options.chunk_size,
        store_size: per_daemon + 16 * u64::from(options.chunk_size) + (64 << 20),
        dir: options.dir.clone(),
        rdma: match options.transport {
            NetTransport::Tcp | NetTransport::Local => RdmaMode::Off,
            NetTransport::Rdma => RdmaMode::Auto,
        },
        poll_mode: options.poll_mode,
        buffers_per_worker: options.window.max(8) * 2,
        map_memory_drives: options.map_memory_drives,
    };
    log(format!(
        "starting {} daemons ({:?} workers), stores in {}",
        options.daemons,
        options.poll_mode,
        options.dir.display()
    ));
    let cluster = LocalCluster::start(&config).map_err(|e| NetBenchError::Setup(e.to_string()))?;
    let data: Vec<u8> = {
        let mut rng = fastrand::Rng::with_seed(7);
        (0..options.size).map(|_| rng.u8(..)).collect()
    };
    log(format!(
        "writing {} MiB striped over the daemons",
        options.size >> 20
    ));
    let layout = cluster
        .write_striped(1, &data, 1)
        .map_err(|e| NetBenchError::Setup(e.to_string()))?;
    let choice = match options.transport {
        NetTransport::Tcp => TransportChoice::Tcp,
        NetTransport::Rdma => TransportChoice::Rdma,
        NetTransport::Local => TransportChoice::Local,
    };
    let mut reader = StripedReader::new(
        cluster.endpoints(),
        cluster.token(),
        "bench-net",
        choice,
        rdma.clone(),
    )
    .with_window(options.window);
    let mut buffer = ReadBuffer::new(data.len())
        .map_err(|e| NetBenchError::Setup(format!("allocating the read buffer: {e}")))?;

    let mut results = Vec::new();
    // Throughput.
    let mut ours = Vec::new();
    let mut theirs: Vec<Vec<Run>> = Vec::new();
    for pass in 0..options.repeats.max(1) {
        buffer.fill(0);
        ours.push(striped_pass(&mut reader, &layout, &mut buffer)?);
        if buffer[..] != data[..] {
            return Err(NetBenchError::Mismatch { pass });
        }
        log(format!(
            "tier0 striped read {}: {:.1} MiB/s",
            pass + 1,
            mib_per_s(options.size, ours.last().expect("pushed").seconds)
        ));
        let baseline = match options.transport {
            NetTransport::Tcp | NetTransport::Local => {
                vec![blaster(shares(&layout), options.window)?]
            }
            NetTransport::Rdma => vec![
                perftest("ib_write_bw", options)?,
                perftest("ib_read_bw", options)?,
            ],
        };
        for (index, run) in baseline.iter().enumerate() {
            log(format!(
                "baseline {index} run {}: {:.1} MiB/s",
                pass + 1,
                mib_per_s(options.size, run.seconds)
            ));
        }
        push_runs(&mut theirs, baseline);
    }
    let names = match options.transport {
        NetTransport::Tcp | NetTransport::Local => vec!["socket blaster (loopback TCP)"],
        NetTransport::Rdma => vec!["ib_write_bw", "ib_read_bw"],
    };
    let ours = median(ours);
    for (index, runs) in theirs.into_iter().enumerate() {
        let base = median(runs);
        let scenario = match index {
            0 => format!("striped-read-{}", size_name(options.chunk_size)),
            _ => format!("striped-read-{}-vs-read", size_name(options.chunk_size)),
        };
        results.push(
            ScenarioResult {
                scenario,
                unit: "MiB/s".into(),
                tier0: mib_per_s(options.size, ours.seconds),
                baseline: mib_per_s(options.size, base.seconds),
                baseline_name: names[index].into(),
                ratio: 0.0,
                tier0_cpu_s_per_gib: per_gib(ours.cpu.unwrap_or_default(), options.size),
                baseline_cpu_s_per_gib: base.cpu.map(|cpu| per_gib(cpu, options.size)),
                cpu_ratio: None,
                tier0_latency: ours.latency.unwrap_or_default(),
                baseline_latency: base.latency,
                block_size: u64::from(options.chunk_size),
                queue_depth: options.window as u32,
                bytes: options.size,
                seconds: ours.seconds,
                repeats: options.repeats,
            }
            .with_ratios(),
        );
    }

    // Latency: one 4 KiB read at a time, round-robin over the chunks (so the daemons).
    let mut ours = Vec::new();
    let mut theirs: Vec<Vec<Run>> = Vec::new();
    for _ in 0..options.repeats.max(1) {
        ours.push(small_reads(
            &cluster,
            &layout,
            options,
            choice,
            rdma.as_ref(),
        )?);
        let baseline = match (options.transport, &rdma) {
            (NetTransport::Rdma, Some(rdma)) => vec![
                verbs_ping_pong::run(rdma.device_name(), options.small_reads, options.daemons)?,
                perftest_latency(options)?,
            ],
            _ => vec![blaster(vec![vec![4096; options.small_reads]], 1)?],
        };
        push_runs(&mut theirs, baseline);
    }
    let names = match options.transport {
        NetTransport::Tcp | NetTransport::Local => vec!["socket ping-pong (loopback TCP)"],
        NetTransport::Rdma => vec![verbs_ping_pong::NAME, "ib_read_lat"],
    };
    let ours = median(ours);
    let reads = options.small_reads as f64;
    let bytes = options.small_reads as u64 * 4096;
    for (index, runs) in theirs.into_iter().enumerate() {
        let base = median(runs);
        results.push(
            ScenarioResult {
                scenario: match index {
                    0 => "read-4k-qd1".into(),
                    _ => "read-4k-qd1-vs-read".into(),
                },
                unit: "reads/s".into(),
                tier0: reads / ours.seconds,
                baseline: reads / base.seconds,
                baseline_name: names[index].into(),
                ratio: 0.0,
                tier0_cpu_s_per_gib: per_gib(ours.cpu.unwrap_or_default(), bytes),
                baseline_cpu_s_per_gib: base.cpu.map(|cpu| per_gib(cpu, bytes)),
                cpu_ratio: None,
                tier0_latency: ours.latency.unwrap_or_default(),
                baseline_latency: base.latency,
                block_size: 4096,
                queue_depth: 1,
                bytes,
                seconds: ours.seconds,
                repeats: options.repeats,
            }
            .with_ratios(),
        );
    }
    if let Some(rdma) = &rdma {
        rdma.unregister(&buffer);
    }
    Ok(results)
}

/// Adds one repeat's runs of each baseline (in the scenario's order of baselines) to the
/// runs so far, one list per baseline.
fn push_runs(runs: &mut Vec<Vec<Run>>, repeat: Vec<Run>) {
    for (index, run) in repeat.into_iter().enumerate() {
        if runs.len() <= index {
            runs.push(Vec::new());
        }
        runs[index].push(run);
    }
}

fn striped_pass(
    reader: &mut StripedReader,
    layout: &StripedFile,
    buffer: &mut ReadBuffer,
) -> Result<Run, NetBenchError> {
    let cpu = cpu_seconds(Who::Process);
    let start = Instant::now();
    let report = reader
        .read(layout, buffer)
        .map_err(|error| NetBenchError::Read(error.to_string()))?;
    let seconds = start.elapsed().as_secs_f64();
    let mut latency = LatencyRecorder::default();
    for read in &report.read_latencies {
        latency.record(*read);
    }
    Ok(Run::measured(
        seconds,
        cpu_seconds(Who::Process) - cpu,
        latency.summary(),
    ))
}

fn small_reads(
    cluster: &LocalCluster,
    layout: &StripedFile,
    options: &NetBenchOptions,
    choice: TransportChoice,
    rdma: Option<&Arc<RdmaClient>>,
) -> Result<Run, NetBenchError> {
    let mut transports = Vec::new();
    for daemon in 0..options.daemons {
        transports.push(
            tier0_client::transport::connect(
                cluster.addr(daemon),
                cluster.token(),
                "bench-net",
                Duration::from_secs(10),
                choice,
                rdma,
            )
            .map_err(|error| NetBenchError::Read(error.to_string()))?,
        );
    }
    let mut buffer = ReadBuffer::new(4096).map_err(|e| NetBenchError::Setup(e.to_string()))?;
    if let Some(rdma) = rdma {
        rdma.register(&buffer)
            .map_err(|e| NetBenchError::Setup(e.to_string()))?;
    }
    let mut latency = LatencyRecorder::default();
    let cpu = cpu_seconds(Who::Process);
    let start = Instant::now();
    for read in 0..options.small_reads {
        let chunk = &layout.chunks[read % layout.chunks.len()];
        // write_striped with one replica: chunk i lives on daemon i % daemons.
        let transport = &mut transports[chunk.replicas[0]];
        // A different 4 KiB block of the chunk each time round.
        let blocks = u64::from(chunk.len / 4096).max(1);
        let offset = (read / layout.chunks.len()) as u64 % blocks * 4096;
        let len = (chunk.len as usize).min(4096);
        let began = Instant::now();
        let result = transport
            .read_many(&mut [ReadInto {
                chunk: chunk.chunk,
                offset,
                dest: &mut buffer[..len],
                layout: LayoutRef::default(),
            }])
            .pop()
            .expect("one result");
        latency.record(began.elapsed());
        result.map_err(|error| NetBenchError::Read(error.to_string()))?;
    }
    let seconds = start.elapsed().as_secs_f64();
    if let Some(rdma) = rdma {
        rdma.unregister(&buffer);
    }
    Ok(Run::measured(
        seconds,
        cpu_seconds(Who::Process) - cpu,
        latency.summary(),
    ))
}

/// The TCP baseline: one loopback connection per share, each served by a thread that
/// answers a 16-byte request (the length it wants) with the next bytes of its share of the
/// file, held in memory; the client keeps `window` requests in flight per connection, sending
/// the next as each reply lands, and reads each reply into its place in a buffer of that
/// share. The striped scenario's shares are the layout's chunks by the daemon tier0 reads them
/// from ([`shares`]), so it moves the bytes tier0 moves, each once per pass, from memory to
/// memory, with no storage and no protocol (a server that answered every request from one
/// buffer would send from cache, which no store of a file larger than the cache can).
/// Connections, buffers and threads are set up before the clock and freed after it; the bytes
/// are checked. Latency: per request, as for tier0.
fn blaster(shares: Vec<Vec<usize>>, window: usize) -> Result<Run, NetBenchError> {
    let error = |reason: std::io::Error| NetBenchError::Baseline {
        name: "socket blaster".into(),
        reason: reason.to_string(),
    };
    if shares.iter().flatten().any(|&len| len == 0) {
        return Err(error(std::io::Error::other("a request of no bytes")));
    }
    let window = window.max(1);
    let listener = TcpListener::bind("127.0.0.1:0").map_err(error)?;
    let addr = listener.local_addr().map_err(error)?;
    let mut pairs = Vec::with_capacity(shares.len());
    for lens in shares {
        let client = TcpStream::connect(addr).map_err(error)?;
        let (server, _) = listener.accept().map_err(error)?;
        client.set_nodelay(true).map_err(error)?;
        server.set_nodelay(true).map_err(error)?;
        let share: usize = lens.iter().sum();
        let mut payload = vec![0u8; share];
        fill_pattern(&mut payload);
        // Written once so that every page is there before the clock, as tier0's buffer is.
        let dest = vec![1u8; share];
        pairs.push((client, server, lens, payload, dest));
    }
    drop(listener);
    let gate = Arc::new(Gate::default());
    let mut servers = Vec::new();
    let mut clients = Vec::new();
    let mut spawned = Ok(());
    for (client, server, lens, payload, dest) in pairs {
        let server_gate = gate.clone();
        let sender = std::thread::Builder::new()
            .name("blaster-send".into())
            .spawn(move || {
                if server_gate.wait() {
                    send_share(server, &payload);
                }
            });
        let client_gate = gate.clone();
        let receiver = std::thread::Builder::new()
            .name("blaster-recv".into())
            .spawn(move || {
                if !client_gate.wait() {
                    return Err(std::io::Error::other("the run was called off"));
                }
                receive_share(client, &lens, window, dest)
            });
        match (sender, receiver) {
            (Ok(sender), Ok(receiver)) => {
                servers.push(sender);
                clients.push(receiver);
            }
            (sender, receiver) => {
                spawned = Err(error(std::io::Error::other(format!(
                    "starting its threads: {}",
                    sender.err().or(receiver.err()).expect("one failed")
                ))));
                break;
            }
        }
    }
    if let Err(failed) = spawned {
        // Every thread started leaves at once, its streams closing behind it.
        gate.open(false);
        return Err(failed);
    }
    let cpu = cpu_seconds(Who::Process);
    let start = Instant::now();
    gate.open(true);
    let joined: Vec<_> = clients.into_iter().map(|client| client.join()).collect();
    let seconds = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds(Who::Process) - cpu;
    let mut latency = LatencyRecorder::default();
    let mut done = Vec::new();
    let mut failed = None;
    for client in joined {
        match client {
            Ok(Ok((latencies, dest, stream))) => {
                for request in latencies {
                    latency.record(request);
                }
                done.push((dest, stream));
            }
            Ok(Err(reason)) => failed = failed.or(Some(reason)),
            Err(_) => failed = failed.or(Some(std::io::Error::other("a client thread panicked"))),
        }
    }
    // Checked as tier0's passes are: a baseline that moved the wrong bytes measured nothing.
    let wrong = done.iter().any(|(dest, _)| !holds_pattern(dest));
    drop(done);
    for server in servers {
        let _ = server.join();
    }
    if let Some(reason) = failed {
        return Err(error(reason));
    }
    if wrong {
        return Err(error(std::io::Error::other(
            "the bytes received differ from those sent",
        )));
    }
    Ok(Run::measured(seconds, cpu, latency.summary()))
}

/// The blaster's server side: each request's length of `payload`'s next bytes, until the
/// stream closes (or asks past the end).
fn send_share(mut server: TcpStream, payload: &[u8]) {
    let mut request = [0u8; 16];
    let mut next = 0usize;
    while server.read_exact(&mut request).is_ok() {
        let len = u64::from_le_bytes(request[..8].try_into().expect("8 bytes"));
        let Some(bytes) = payload.get(next..next.saturating_add(len as usize)) else {
            break;
        };
        if server.write_all(bytes).is_err() {
            break;
        }
        next += bytes.len();
    }
}

/// What a blaster client hands back: its latencies, and its buffer and stream whole, so
/// that freeing them (and the server's share, which its thread frees when the stream closes)
/// is not the pass.
type Received = (Vec<Duration>, Vec<u8>, TcpStream);

/// The blaster's client side: a sliding window, as tier0's reader keeps: `window` requests
/// out, the next sent as each reply lands, each reply into its place in `dest`; latency per
/// request, from its send to its last byte.
fn receive_share(
    mut client: TcpStream,
    lens: &[usize],
    window: usize,
    mut dest: Vec<u8>,
) -> std::io::Result<Received> {
    let mut latencies = Vec::with_capacity(lens.len());
    let mut sent = std::collections::VecDeque::with_capacity(window);
    let mut out = Vec::with_capacity(16 * window);
    let (mut requested, mut place) = (0, 0);
    while latencies.len() < lens.len() {
        out.clear();
        // Stamped before the send, as tier0 stamps its requests.
        let now = Instant::now();
        while requested < lens.len() && sent.len() < window {
            out.extend_from_slice(&(lens[requested] as u64).to_le_bytes());
            out.extend_from_slice(&[0u8; 8]);
            sent.push_back(now);
            requested += 1;
        }
        if !out.is_empty() {
            client.write_all(&out)?;
        }
        let len = lens[latencies.len()];
        client.read_exact(&mut dest[place..place + len])?;
        place += len;
        let at = sent.pop_front().expect("a request is out");
        latencies.push(at.elapsed());
    }
    Ok((latencies, dest, client))
}

/// The request lengths per daemon of a pass over `layout`: each chunk on the daemon tier0's
/// pass reads it from (its first replica; the bench writes one), in order, none for a
/// daemon without any.
fn shares(layout: &StripedFile) -> Vec<Vec<usize>> {
    let daemons = layout
        .chunks
        .iter()
        .map(|chunk| chunk.replicas[0] + 1)
        .max()
        .unwrap_or(0);
    let mut lens = vec![Vec::new(); daemons];
    for chunk in &layout.chunks {
        lens[chunk.replicas[0]].push(chunk.len as usize);
    }
    lens.retain(|lens| !lens.is_empty());
    lens
}

/// The blaster's bytes: each 8-byte word its offset, scrambled, so a reply received out of
/// place or cut short is seen.
fn pattern_word(offset: usize) -> [u8; 8] {
    ((offset as u64 ^ 0x5A5A_5A5A_5A5A_5A5A).wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_le_bytes()
}

fn fill_pattern(bytes: &mut [u8]) {
    for (index, word) in bytes.chunks_mut(8).enumerate() {
        word.copy_from_slice(&pattern_word(index * 8)[..word.len()]);
    }
}

fn holds_pattern(bytes: &[u8]) -> bool {
    bytes
        .chunks(8)
        .enumerate()
        .all(|(index, word)| word == &pattern_word(index * 8)[..word.len()])
}

/// The device and GID index perftest should use: the ones tier0 picks.
fn perftest_device() -> Result<(String, u32), NetBenchError> {
    let names = device_names().map_err(|e| NetBenchError::Setup(e.to_string()))?;
    let name = names
        .first()
        .ok_or_else(|| NetBenchError::Setup("no RDMA device".into()))?
        .clone();
    let device = RdmaDevice::open(Some(&name)).map_err(|e| NetBenchError::Setup(e.to_string()))?;
    Ok((name, device.gid_index()))
}

/// perftest's arguments for `iterations` messages of `size` bytes on tier0's device and GID.
fn perftest_args(size: u32, iterations: u64) -> Result<Vec<String>, NetBenchError> {
    let (device, gid) = perftest_device()?;
    Ok(vec![
        "-d".into(),
        device,
        "-x".into(),
        gid.to_string(),
        "-s".into(),
        size.to_string(),
        "-n".into(),
        iterations.to_string(),
        // No CPU-frequency check: the VM's and shared hosts' governors are not ours to set.
        "-F".into(),
    ])
}

/// Runs a perftest pair (server, then client on 127.0.0.1 for the out-of-band exchange) and
/// returns the client's output.
fn perftest_pair(tool: &str, args: &[String]) -> Result<String, NetBenchError> {
    let error = |reason: String| NetBenchError::Baseline {
        name: tool.into(),
        reason,
    };
    let port = {
        let probe = TcpListener::bind("127.0.0.1:0").map_err(|e| error(e.to_string()))?;
        probe.local_addr().map_err(|e| error(e.to_string()))?.port()
    };
    let port_args = ["-p".to_string(), port.to_string()];
    let mut server: Child = Command::new(tool)
        .args(args)
        .args(&port_args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| error(format!("starting it: {e} (install perftest)")))?;
    let mut output = None;
    // The server needs a moment to listen; the client retries its connection.
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let run = Command::new(tool)
            .args(args)
            .args(&port_args)
            .arg("127.0.0.1")
            .output()
            .map_err(|e| error(e.to_string()))?;
        if run.status.success() {
            output = Some(String::from_utf8_lossy(&run.stdout).into_owned());
            break;
        }
    }
    let _ = server.kill();
    let _ = server.wait();
    output.ok_or_else(|| error("the client never completed a run".into()))
}

/// The first data line after perftest's column header `header`, split into numbers.
fn perftest_numbers(output: &str, header: &str) -> Option<Vec<f64>> {
    let mut lines = output.lines().skip_while(|line| !line.contains(header));
    lines.next()?;
    lines
        .map(|line| {
            line.split_whitespace()
                .filter_map(|field| field.parse::<f64>().ok())
                .collect::<Vec<_>>()
        })
        .find(|numbers| numbers.len() >= 4)
}

/// `ib_write_bw` / `ib_read_bw` with the chunk size as message size, moving the file's bytes.
/// A run that measured nothing is tried again, twice at most: in the soft-RoCE VM
/// `ib_read_bw` now and then reports 0 MB/s for a run that moved its bytes.
fn perftest(tool: &str, options: &NetBenchOptions) -> Result<Run, NetBenchError> {
    let iterations = (options.size / u64::from(options.chunk_size)).max(5);
    let args = perftest_args(options.chunk_size, iterations)?;
    let mut attempt = 1;
    let mib_per_s = loop {
        let output = perftest_pair(tool, &args)?;
        match perftest_bandwidth(tool, &output) {
            Ok(mib_per_s) => break mib_per_s,
            Err(error) if attempt < 3 && output.contains("BW average") => {
                tracing::warn!(%error, attempt, "{tool} measured nothing: running it again");
                attempt += 1;
            }
            Err(error) => return Err(error),
        }
    };
    Ok(Run {
        seconds: (options.size as f64 / (1 << 20) as f64) / mib_per_s,
        cpu: None,
        latency: None,
    })
}

/// The average bandwidth in a `*_bw` output, in MiB/s (perftest's MB is 2^20 bytes): from
/// "#bytes #iterations BW peak[MB/sec] BW average[MB/sec] MsgRate[Mpps]". A run that
/// measured nothing (starved of CPU by busy-polling daemons, it reports 0) is an error, not
/// a baseline to divide by.
fn perftest_bandwidth(tool: &str, output: &str) -> Result<f64, NetBenchError> {
    let error = |reason: String| NetBenchError::Baseline {
        name: tool.into(),
        reason,
    };
    let numbers = perftest_numbers(output, "BW average")
        .ok_or_else(|| error(format!("no result line in its output:\n{output}")))?;
    let mib_per_s = numbers[3];
    if !(mib_per_s.is_finite() && mib_per_s > 0.0) {
        return Err(error(format!(
            "it measured no bandwidth ({mib_per_s} MB/s):\n{output}"
        )));
    }
    Ok(mib_per_s)
}

/// `ib_read_lat` with 4 KiB reads: a full round trip, like a tier0 4 KiB read.
fn perftest_latency(options: &NetBenchOptions) -> Result<Run, NetBenchError> {
    let args = perftest_args(4096, options.small_reads as u64)?;
    let output = perftest_pair("ib_read_lat", &args)?;
    let (average_us, latency) = perftest_read_latency(&output)?;
    Ok(Run {
        seconds: options.small_reads as f64 * average_us / 1e6,
        cpu: None,
        latency: Some(latency),
    })
}

/// The average and the percentiles in an `ib_read_lat` output, from "#bytes #iterations
/// t_min t_max t_typical t_avg t_stdev 99% 99.9%" (µs); a run without a positive, finite
/// average is an error.
fn perftest_read_latency(output: &str) -> Result<(f64, Latency), NetBenchError> {
    let error = |reason: String| NetBenchError::Baseline {
        name: "ib_read_lat".into(),
        reason,
    };
    let numbers = perftest_numbers(output, "t_typical")
        .ok_or_else(|| error(format!("no result line in its output:\n{output}")))?;
    let get = |index: usize| numbers.get(index).copied().unwrap_or(0.0);
    let average_us = get(5);
    if !(average_us.is_finite() && average_us > 0.0) {
        return Err(error(format!(
            "it measured no latency ({average_us} us):\n{output}"
        )));
    }
    let latency = Latency {
        p50_us: get(4),
        p99_us: get(7),
        p999_us: get(8),
    };
    Ok((average_us, latency))
}

fn median(mut runs: Vec<Run>) -> Run {
    runs.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
    let middle = runs.len() / 2;
    runs.swap_remove(middle)
}

fn mib_per_s(bytes: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        bytes as f64 / (1 << 20) as f64 / seconds
    } else {
        0.0
    }
}

fn per_gib(cpu: f64, bytes: u64) -> f64 {
    if bytes == 0 {
        0.0
    } else {
        cpu / (bytes as f64 / (1u64 << 30) as f64)
    }
}

fn size_name(bytes: u32) -> String {
    if bytes.is_multiple_of(1 << 20) {
        format!("{}m", bytes >> 20)
    } else {
        format!("{}k", bytes >> 10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tier0_client::StripedChunk;

    const BW: &str = "\
---------------------------------------------------------------------------------------
 #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]
 1048576    64               55.12              54.20                0.000054
---------------------------------------------------------------------------------------
";

    /// A layout of chunks of these lengths, chunk `i` on daemon `i % daemons`, as the bench
    /// writes its file.
    fn layout(lens: &[u32], daemons: usize) -> StripedFile {
        let mut file_offset = 0;
        let chunks = lens
            .iter()
            .enumerate()
            .map(|(index, &len)| {
                let chunk = StripedChunk {
                    chunk: tier0_dataplane::store::ChunkId {
                        file: 1,
                        index: index as u32,
                        generation: 1,
                    },
                    file_offset,
                    chunk_offset: 0,
                    len,
                    replicas: vec![index % daemons],
                    layout: None,
                };
                file_offset += u64::from(len);
                chunk
            })
            .collect();
        StripedFile {
            chunks,
            layout: LayoutRef::default(),
        }
    }

    #[test]
    fn the_blaster_moves_each_share_once_and_checks_it() {
        // A size that is no whole number of chunks: the last stripe is short, as tier0's.
        let mut lens = vec![64 << 10; 48];
        lens.push(1000);
        let streamed = blaster(shares(&layout(&lens, 3)), 4).unwrap();
        assert!(streamed.seconds > 0.0);
        assert!(streamed.latency.expect("measured").p50_us > 0.0);
        assert!(streamed.cpu.expect("measured") > 0.0);
        let ping_pong = blaster(vec![vec![4096; 50]], 1).unwrap();
        assert!(ping_pong.latency.expect("measured").p50_us > 0.0);
    }

    #[test]
    fn the_gate_sends_its_threads_on_or_home() {
        for go in [true, false] {
            let gate = Arc::new(Gate::default());
            let waiting: Vec<_> = (0..2)
                .map(|_| {
                    let gate = gate.clone();
                    std::thread::spawn(move || gate.wait())
                })
                .collect();
            gate.open(go);
            for thread in waiting {
                assert_eq!(thread.join().unwrap(), go);
            }
            assert_eq!(gate.wait(), go, "a thread that comes after the opening");
        }
    }

    #[test]
    fn the_shares_are_tier0s() {
        assert_eq!(
            shares(&layout(&[4, 4, 2], 2)),
            vec![vec![4, 2], vec![4]],
            "chunk i on daemon i % 2, the last one short"
        );
        assert_eq!(
            shares(&layout(&[4, 4], 3)),
            vec![vec![4], vec![4]],
            "no empty connection"
        );
        let lens = shares(&layout(&vec![1 << 20; 256], 3));
        assert_eq!(lens.iter().flatten().sum::<usize>(), 256 << 20);
        assert_eq!(lens.iter().map(Vec::len).collect::<Vec<_>>(), [86, 85, 85]);
    }

    #[test]
    fn the_pattern_check_sees_bytes_out_of_place() {
        let mut bytes = vec![0u8; 1000];
        assert!(!holds_pattern(&bytes), "a buffer never written");
        fill_pattern(&mut bytes);
        assert!(holds_pattern(&bytes));
        let mut moved = bytes.clone();
        moved.copy_within(0..8, 8);
        assert!(!holds_pattern(&moved), "a word received in the wrong place");
        let mut flipped = bytes.clone();
        flipped[999] ^= 1;
        assert!(!holds_pattern(&flipped), "the last, partial word");
    }

    #[test]
    fn perftest_bandwidth_is_read_and_a_zero_is_refused() {
        assert_eq!(perftest_bandwidth("ib_write_bw", BW).unwrap(), 54.20);
        let starved = BW.replace("54.20", "0.00");
        let error = perftest_bandwidth("ib_write_bw", &starved).unwrap_err();
        assert!(
            error.to_string().contains("measured no bandwidth"),
            "{error}"
        );
        let error = perftest_bandwidth("ib_write_bw", "no table").unwrap_err();
        assert!(error.to_string().contains("no result line"), "{error}");
    }

    #[test]
    fn perftest_latency_is_read_and_a_zero_is_refused() {
        let output = "\
 #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]    t_stdev[usec]   99% percentile[usec]   99.9% percentile[usec]
 4096       2000          80.10          1700.00      100.20             120.50        30.00           661.00                  1724.00
";
        let (average, latency) = perftest_read_latency(output).unwrap();
        assert_eq!(average, 120.5);
        assert_eq!(
            (latency.p50_us, latency.p99_us, latency.p999_us),
            (100.2, 661.0, 1724.0)
        );
        let starved = output.replace("120.50", "0.00");
        let error = perftest_read_latency(&starved).unwrap_err();
        assert!(error.to_string().contains("measured no latency"), "{error}");
    }
}
