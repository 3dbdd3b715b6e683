//! Striped reads: one file's chunks spread over N daemons, read concurrently into one
//! buffer, every byte checksum-verified, with failover between replicas.
//!
//! Each chunk goes to its nearest live replica (lowest distance; equally near replicas take
//! turns, so load spreads). Every daemon with work gets its own thread and connection, and
//! reads its chunks through a sliding window of requests, straight into their places in the
//! buffer. When a daemon fails (connection lost, framing error, a chunk it cannot serve), its
//! unfinished chunks move to their next replica in a new round; the failed connection is
//! fenced first, so a late RDMA WRITE from a daemon presumed dead cannot land on bytes another
//! replica delivered. A read fails when some chunk has no replica left, and then says which
//! chunk and what each replica answered; or when a daemon refuses the file's layout as stale
//! (`ESTALE`): every replica would say the same, so the read fails after that round, without
//! failing over, and the caller reopens the file.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tier0_dataplane::net::wire::LayoutRef;
use tier0_dataplane::store::ChunkId;

use crate::buffer::ReadBuffer;
use crate::daemon::{ClientError, ReadInto};
use crate::gate::Gate;
use crate::rdma::RdmaClient;
use crate::transport::{self, Transport, TransportChoice, TransportKind};

/// A daemon the file is striped over.
#[derive(Clone, Debug)]
pub struct DaemonEndpoint {
    pub addr: SocketAddr,
    /// How far it is from this client (topology distance: 0 on this host; the control plane
    /// fills it in). Lower is preferred.
    pub distance: u32,
}

/// One span of a chunk to read: which bytes of the chunk, where they go in the read buffer,
/// and which daemons hold the chunk. A whole-file read has one span per chunk, each at its
/// file offset; a batch of reads (several files, parts of chunks) has one per piece.
#[derive(Clone, Debug)]
pub struct StripedChunk {
    pub chunk: ChunkId,
    /// Where in the read buffer the bytes go (the chunk's offset in the file for a
    /// whole-file read).
    pub file_offset: u64,
    /// First byte of the chunk to read (0 for the whole chunk).
    pub chunk_offset: u64,
    pub len: u32,
    /// Indices into the reader's daemons; any order (the reader ranks them).
    pub replicas: Vec<usize>,
    /// The layout this span was planned from, when it differs from the file's
    /// ([`StripedFile::layout`]): a batch spans several files' layouts.
    pub layout: Option<LayoutRef>,
}

/// The layout of one file over the reader's daemons.
#[derive(Clone, Debug, Default)]
pub struct StripedFile {
    pub chunks: Vec<StripedChunk>,
    /// The layout this is (the file's id and the layout's version, from the control plane),
    /// stamped on every request so a daemon can refuse a stale one. `LayoutRef::default()`:
    /// chunks addressed directly, never refused as stale.
    pub layout: LayoutRef,
}

impl StripedFile {
    pub fn len(&self) -> u64 {
        self.chunks
            .iter()
            .map(|chunk| chunk.file_offset + u64::from(chunk.len))
            .max()
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StripedError {
    #[error("the buffer holds {buffer} bytes, the file {file}")]
    BufferTooSmall { buffer: usize, file: u64 },
    #[error("chunks {first} and {second} overlap in the file")]
    Overlap { first: usize, second: usize },
    #[error("chunk {index} names daemon {daemon}, but there are {daemons}")]
    NoSuchDaemon {
        index: usize,
        daemon: usize,
        daemons: usize,
    },
    #[error("chunk {index} ({chunk}) could not be read from any replica: {}", attempts.join("; "))]
    Unreadable {
        index: usize,
        chunk: ChunkId,
        attempts: Vec<String>,
    },
    #[error("registering the read buffer: {0}")]
    Register(#[from] tier0_dataplane::net::rdma::RdmaError),
    /// A daemon refused the read of chunk `index` because the file's layout (`file` at
    /// `version`) is stale: the layout changed since the file was opened. Not failed over (all
    /// replicas would refuse it too): reopen the file and read again with its new layout.
    #[error(
        "chunk {index} ({chunk}): daemon {addr} refused layout version {version} of file \
         {file:x} as stale ({message}): reopen the file and read again"
    )]
    StaleLayout {
        index: usize,
        chunk: ChunkId,
        addr: String,
        file: u64,
        version: u64,
        message: String,
    },
}

/// What a striped read did.
#[derive(Clone, Debug, Default)]
pub struct ReadReport {
    pub bytes: u64,
    /// Chunks read from a replica other than the first one chosen.
    pub failovers: usize,
    /// Rounds: 1 when nothing failed.
    pub rounds: usize,
    /// Bytes each daemon delivered, by daemon index.
    pub per_daemon: Vec<u64>,
    /// How long each chunk read took, from its request to its last byte, over every
    /// connection (requests are pipelined, `window` in flight per connection).
    pub read_latencies: Vec<Duration>,
}

struct Daemon {
    endpoint: DaemonEndpoint,
    transport: Option<Box<dyn Transport>>,
    /// Failed as a connection in this reader: skipped while other replicas remain.
    dead: bool,
}

/// Called after each chunk lands, with its index in the file's chunk list and the index of
/// the daemon that delivered it, from that daemon's reading thread.
pub type Progress = Arc<dyn Fn(usize, usize) + Send + Sync>;

/// Reads striped files from a set of daemons; keeps one connection per daemon across reads.
pub struct StripedReader {
    daemons: Vec<Daemon>,
    token: Vec<u8>,
    client: String,
    choice: TransportChoice,
    rdma: Option<Arc<RdmaClient>>,
    timeout: Duration,
    /// Requests one connection has in flight at most.
    window: usize,
    progress: Option<Progress>,
}

impl std::fmt::Debug for StripedReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripedReader")
            .field("daemons", &self.daemons.len())
            .field("choice", &self.choice)
            .finish()
    }
}

impl StripedReader {
    /// `rdma`: this host's device (`None`: TCP). `choice` may force a transport.
    pub fn new(
        daemons: Vec<DaemonEndpoint>,
        token: &[u8],
        client: &str,
        choice: TransportChoice,
        rdma: Option<Arc<RdmaClient>>,
    ) -> StripedReader {
        StripedReader {
            daemons: daemons
                .into_iter()
                .map(|endpoint| Daemon {
                    endpoint,
                    transport: None,
                    dead: false,
                })
                .collect(),
            token: token.to_vec(),
            client: client.to_string(),
            choice,
            rdma,
            timeout: Duration::from_secs(10),
            window: 16,
            progress: None,
        }
    }

    /// How long a connection may make no progress before it counts as dead.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Requests in flight per connection.
    pub fn with_window(mut self, window: usize) -> Self {
        self.window = window.max(1);
        self
    }

    /// Called after every chunk that landed (from the reading threads).
    pub fn with_progress(mut self, progress: Progress) -> Self {
        self.progress = Some(progress);
        self
    }

    /// The transport each daemon is connected with, if it is.
    pub fn transports(&self) -> Vec<Option<TransportKind>> {
        self.daemons
            .iter()
            .map(|daemon| daemon.transport.as_ref().map(|t| t.kind()))
            .collect()
    }

    /// Reads all of `file` into `buffer` (at each chunk's file offset).
    pub fn read(
        &mut self,
        file: &StripedFile,
        buffer: &mut ReadBuffer,
    ) -> Result<ReadReport, StripedError> {
        // SAFETY: `&mut` gives this call the whole buffer.
        unsafe { self.read_shared(file, buffer) }
    }

    /// As [`read`](Self::read), into a buffer others may use meanwhile: only the chunks'
    /// ranges are written, and no reference to any other byte of the buffer is made. (The
    /// C ABI's rings: the application keeps using the rest of its buffer during a batch.)
    ///
    /// # Safety
    /// Until this returns, nothing else reads or writes the bytes of `buffer` the chunks'
    /// ranges cover (`file_offset .. file_offset + len` of each).
    pub unsafe fn read_shared(
        &mut self,
        file: &StripedFile,
        buffer: &ReadBuffer,
    ) -> Result<ReadReport, StripedError> {
        self.check(file, buffer)?;
        if let Some(rdma) = &self.rdma
            && self.choice != TransportChoice::Tcp
        {
            rdma.register(buffer)?;
        }
        let chunks = &file.chunks;
        let mut report = ReadReport {
            per_daemon: vec![0; self.daemons.len()],
            ..ReadReport::default()
        };
        // Per chunk: replicas not yet tried, nearest first, and what the tried ones said.
        let mut untried: Vec<Vec<usize>> = chunks
            .iter()
            .enumerate()
            .map(|(index, chunk)| self.rank(index, &chunk.replicas))
            .collect();
        let mut attempts: Vec<Vec<String>> = vec![Vec::new(); chunks.len()];
        let mut todo: Vec<usize> = (0..chunks.len()).collect();
        let mut first_round = true;
        while !todo.is_empty() {
            report.rounds += 1;
            // Assign each chunk to its best untried replica, preferring live daemons.
            let mut plan: Vec<Vec<usize>> = vec![Vec::new(); self.daemons.len()];
            for &index in &todo {
                let candidates = &mut untried[index];
                let pick = candidates
                    .iter()
                    .position(|&daemon| !self.daemons[daemon].dead)
                    .or(if candidates.is_empty() { None } else { Some(0) });
                let Some(pick) = pick else {
                    return Err(StripedError::Unreadable {
                        index,
                        chunk: chunks[index].chunk,
                        attempts: std::mem::take(&mut attempts[index]),
                    });
                };
                let daemon = candidates.remove(pick);
                if !first_round {
                    report.failovers += 1;
                }
                plan[daemon].push(index);
            }
            first_round = false;
            // Carve the buffer into each chunk's destination, then hand each daemon its own.
            // SAFETY: the ranges lie inside the buffer and are disjoint (`check`), and are this
            // call's alone (our caller's contract); the slices die with the round.
            let mut dests: Vec<Option<&mut [u8]>> =
                unsafe { carve(buffer.allocation().base(), chunks) };
            let mut work: Vec<Share<'_>> = Vec::new();
            for (daemon_index, daemon) in self.daemons.iter_mut().enumerate() {
                let assigned = std::mem::take(&mut plan[daemon_index]);
                if assigned.is_empty() {
                    continue;
                }
                let slices = assigned
                    .into_iter()
                    .map(|index| (index, dests[index].take().expect("one owner per chunk")))
                    .collect();
                work.push(Share {
                    daemon_index,
                    daemon,
                    slices,
                });
            }
            let settings = Settings {
                token: &self.token,
                client: &self.client,
                choice: self.choice,
                rdma: self.rdma.as_ref(),
                timeout: self.timeout,
                window: self.window,
                progress: self.progress.as_ref(),
                layout: file.layout,
            };
            // The reading threads start together, once all of them exist: a caller that had
            // just used much CPU was put behind the first thread it started (and that
            // daemon's worker), so the others started 16-37 ms late in a 330 ms pass (bench
            // net, 2 cores; ARCHITECTURE 32).
            let start = Gate::default();
            let outcomes: Vec<(usize, DaemonOutcome)> = std::thread::scope(|scope| {
                let mut handles = Vec::with_capacity(work.len());
                for Share {
                    daemon_index,
                    daemon,
                    slices,
                } in work
                {
                    let (settings, start) = (&settings, &start);
                    // Named, so a profile or a stack dump tells them from the application's
                    // threads.
                    let spawned = std::thread::Builder::new()
                        .name(format!("tier0-read-{daemon_index}"))
                        .spawn_scoped(scope, move || {
                            // Opened only to go on: every thread started reads its share.
                            start.wait();
                            let results = read_from(daemon_index, daemon, slices, chunks, settings);
                            (daemon_index, results)
                        });
                    match spawned {
                        Ok(handle) => handles.push(handle),
                        Err(error) => {
                            // As scope.spawn, a failed spawn panics; the threads started
                            // finish their reads first (the scope joins them).
                            start.open(true);
                            panic!("spawning a reading thread: {error}");
                        }
                    }
                }
                start.open(true);
                handles
                    .into_iter()
                    .map(|handle| handle.join().expect("a reading thread panicked"))
                    .collect()
            });
            todo.clear();
            // The first chunk refused as stale, if any: the read then fails after this round.
            let mut stale: Option<(usize, String, String)> = None;
            for (daemon_index, (results, windows)) in outcomes {
                report.read_latencies.extend(windows);
                let daemon = &mut self.daemons[daemon_index];
                let mut failed_connection = false;
                for (index, result) in results {
                    match result {
                        Ok(()) => report.per_daemon[daemon_index] += u64::from(chunks[index].len),
                        // Not a reason to try another replica: it would refuse the same layout.
                        Err(ClientError::StaleLayout { addr, message, .. }) => {
                            if stale.as_ref().is_none_or(|(first, ..)| index < *first) {
                                stale = Some((index, addr, message));
                            }
                        }
                        Err(error) => {
                            failed_connection |= error.is_connection_failure();
                            attempts[index].push(error.to_string());
                            todo.push(index);
                        }
                    }
                }
                if failed_connection {
                    daemon.dead = true;
                    // No late write from it may land where another replica's bytes go.
                    if let Some(mut transport) = daemon.transport.take() {
                        transport.fence();
                    }
                }
            }
            if let Some((index, addr, message)) = stale {
                let layout = chunks[index].layout.unwrap_or(file.layout);
                return Err(StripedError::StaleLayout {
                    index,
                    chunk: chunks[index].chunk,
                    addr,
                    file: layout.file,
                    version: layout.version,
                    message,
                });
            }
            todo.sort_unstable();
        }
        report.bytes = file.len();
        Ok(report)
    }

    fn check(&self, file: &StripedFile, buffer: &ReadBuffer) -> Result<(), StripedError> {
        if (buffer.len() as u64) < file.len() {
            return Err(StripedError::BufferTooSmall {
                buffer: buffer.len(),
                file: file.len(),
            });
        }
        for (index, chunk) in file.chunks.iter().enumerate() {
            if let Some(&daemon) = chunk.replicas.iter().find(|&&d| d >= self.daemons.len()) {
                return Err(StripedError::NoSuchDaemon {
                    index,
                    daemon,
                    daemons: self.daemons.len(),
                });
            }
        }
        let mut order: Vec<usize> = (0..file.chunks.len()).collect();
        order.sort_by_key(|&index| file.chunks[index].file_offset);
        for pair in order.windows(2) {
            let (a, b) = (&file.chunks[pair[0]], &file.chunks[pair[1]]);
            if a.file_offset + u64::from(a.len) > b.file_offset {
                return Err(StripedError::Overlap {
                    first: pair[0],
                    second: pair[1],
                });
            }
        }
        Ok(())
    }

    /// Replicas nearest first; among equally near ones, rotated by chunk so they share load.
    fn rank(&self, index: usize, replicas: &[usize]) -> Vec<usize> {
        let mut ranked: Vec<usize> = replicas.to_vec();
        ranked.sort_unstable();
        ranked.dedup();
        let turn = index % ranked.len().max(1);
        ranked.rotate_left(turn);
        ranked.sort_by_key(|&daemon| self.daemons[daemon].endpoint.distance);
        ranked
    }
}

/// Each chunk's destination slice in the buffer at `base`: its range alone, so no
/// reference covers a byte outside the chunks.
///
/// # Safety
/// The chunks' ranges lie inside the mapping at `base` and are disjoint, and nothing else
/// touches them for `'a`.
unsafe fn carve<'a>(base: *mut u8, chunks: &[StripedChunk]) -> Vec<Option<&'a mut [u8]>> {
    chunks
        .iter()
        .map(|chunk| {
            // SAFETY: this range is inside the mapping and no other slice or party covers it
            // (the function's contract).
            Some(unsafe {
                std::slice::from_raw_parts_mut(
                    base.add(chunk.file_offset as usize),
                    chunk.len as usize,
                )
            })
        })
        .collect()
}

/// One daemon's part of a round: the chunks it reads and where they go.
struct Share<'a> {
    daemon_index: usize,
    daemon: &'a mut Daemon,
    slices: Vec<(usize, &'a mut [u8])>,
}

/// Each chunk's index and how its read went.
type ChunkResults = Vec<(usize, Result<(), ClientError>)>;

/// A daemon's results for a round, and how long each of its windows took.
type DaemonOutcome = (ChunkResults, Vec<Duration>);

struct Settings<'a> {
    token: &'a [u8],
    client: &'a str,
    choice: TransportChoice,
    rdma: Option<&'a Arc<RdmaClient>>,
    timeout: Duration,
    window: usize,
    progress: Option<&'a Progress>,
    /// Stamped on every request.
    layout: LayoutRef,
}

/// One daemon's share of a round: connect if needed, then read it through a sliding window.
fn read_from(
    daemon_index: usize,
    daemon: &mut Daemon,
    slices: Vec<(usize, &mut [u8])>,
    chunks: &[StripedChunk],
    settings: &Settings<'_>,
) -> DaemonOutcome {
    if daemon.transport.as_ref().is_none_or(|t| !t.is_healthy()) {
        daemon.transport = None;
        match transport::connect(
            daemon.endpoint.addr,
            settings.token,
            settings.client,
            settings.timeout,
            settings.choice,
            settings.rdma,
        ) {
            Ok(transport) => daemon.transport = Some(transport),
            Err(error) => {
                let addr = daemon.endpoint.addr.to_string();
                let text = error.to_string();
                let results = slices
                    .into_iter()
                    .map(|(index, _)| (index, aborted(&addr, "connecting", &text)))
                    .collect();
                return (results, Vec::new());
            }
        }
    }
    let transport = daemon.transport.as_mut().expect("connected above");
    let indices: Vec<usize> = slices.iter().map(|(index, _)| *index).collect();
    let mut reads: Vec<ReadInto<'_>> = slices
        .into_iter()
        .map(|(index, dest)| ReadInto {
            chunk: chunks[index].chunk,
            offset: chunks[index].chunk_offset,
            dest,
            layout: chunks[index].layout.unwrap_or(settings.layout),
        })
        .collect();
    let mut latencies = Vec::with_capacity(reads.len());
    // One sliding window over all of this daemon's chunks; a transport failure fails the
    // reads it left unanswered, which then go to other replicas.
    let outcome = transport.read_window(
        &mut reads,
        settings.window,
        Some(&mut |read, latency| {
            latencies.push(latency);
            if let Some(progress) = settings.progress {
                progress(indices[read], daemon_index);
            }
        }),
    );
    let results = indices.iter().copied().zip(outcome).collect();
    (results, latencies)
}

/// A chunk this daemon's connection could not read: a connection failure, so the chunk goes
/// to another replica and the daemon counts as dead.
fn aborted(addr: &str, operation: &'static str, why: &str) -> Result<(), ClientError> {
    Err(ClientError::Io {
        addr: addr.to_string(),
        operation,
        source: std::io::Error::new(std::io::ErrorKind::ConnectionAborted, why.to_string()),
    })
}
