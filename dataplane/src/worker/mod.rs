//! Polled data-plane workers: one pinned thread per planned core, grouped by NUMA node.
//!
//! A worker owns its rings (one device handle per drive of its node), its buffer pool and a
//! bounded table of in-flight requests. Requests arrive over a bounded crossbeam channel and
//! completions leave over the channel each request names. Nothing on the read path allocates
//! or takes a lock: the table slot, the pool buffer and the ring are the worker's own.

mod doorbell;
mod pool;

use std::collections::VecDeque;
use std::os::fd::{BorrowedFd, RawFd};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use doorbell::Doorbell;

pub use crate::device::Woken;
pub use crate::store::ReadCheck;
pub use pool::{DeviceFactory, DriveSpec, WorkerPool, WorkerPoolConfig, WorkerPoolError};

use crate::buffer::{AlignedBuf, BufferLease, BufferPool, BufferPoolConfig, PoolBuffer};
use crate::device::{
    BlockDevice, DeviceError, IO_ALIGNMENT, IoCompletion, IoOp, IoRequest, poll_readable,
};
use crate::store::{ChunkId, ChunkInfo, ChunkStore, ReadSpan, Reservation, StoreError};

/// What a worker does when it has nothing to do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PollMode {
    /// Spin forever: lowest latency, one core at 100% per worker.
    Busy,
    /// Spin briefly after the last work, then sleep in the kernel until a request or a
    /// completion arrives: near-busy latency under load, idle cores when idle.
    #[default]
    Adaptive,
    /// Always sleep in the kernel when idle.
    Interrupt,
}

impl FromStr for PollMode {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "busy" => Ok(PollMode::Busy),
            "adaptive" => Ok(PollMode::Adaptive),
            "interrupt" => Ok(PollMode::Interrupt),
            other => Err(format!(
                "poll_mode {other:?} is not one of busy, adaptive, interrupt"
            )),
        }
    }
}

/// How long an idle adaptive worker spins before it sleeps in its ring. It spins at all only
/// while it is loaded: events typically sooner than this, or [`ADAPTIVE_SPIN_DEPTH`] I/Os in
/// flight. Measured on the virtual disk (`tier0 bench local`, 4 KiB random reads at QD 32):
/// 50 µs reached 0.71x fio's IOPS, 250 µs about 0.9x, as busy polling does; under load the
/// drive's completions come in bursts tens of microseconds apart, and a shorter spin sleeps
/// between nearly every burst.
const ADAPTIVE_SPIN: Duration = Duration::from_micros(250);

/// With this many I/Os in flight an adaptive worker counts as loaded and spins whatever the
/// recent gaps: gaps measured while sleeping include the wake-ups and the drive's batching, so
/// they alone would keep a loaded worker asleep.
const ADAPTIVE_SPIN_DEPTH: usize = 8;

/// One operation on one chunk of one drive.
#[derive(Debug)]
pub enum Op {
    Read {
        chunk: ChunkId,
        offset: u64,
        len: u32,
        check: ReadCheck,
    },
    Write {
        chunk: ChunkId,
        data: Vec<u8>,
    },
    Delete {
        chunk: ChunkId,
    },
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::Read { .. } => "read",
            Op::Write { .. } => "write",
            Op::Delete { .. } => "delete",
        }
    }
}

#[derive(Debug)]
pub struct Request {
    /// The caller's name for this request, returned in its completion.
    pub tag: u64,
    /// Index of the drive in the pool's drive list.
    pub drive: usize,
    pub op: Op,
    pub reply: Sender<Completion>,
}

#[derive(Debug)]
pub enum Output {
    /// The bytes read, in a pool buffer (drop the lease to give it back), and the CRC32C they
    /// must have. With [`ReadCheck::Worker`] the bytes were checked; with
    /// [`ReadCheck::Reader`] the reader must check them against `crc`.
    Read {
        lease: BufferLease,
        crc: u32,
    },
    Written,
    Deleted,
}

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("read of {len} bytes exceeds the {max}-byte I/O buffer")]
    TooLarge { len: u64, max: usize },
    #[error("no drive {drive} (the pool has {drives})")]
    NoSuchDrive { drive: usize, drives: usize },
}

impl From<DeviceError> for RequestError {
    fn from(error: DeviceError) -> Self {
        RequestError::Store(StoreError::Device(error))
    }
}

impl RequestError {
    pub fn errno(&self) -> i32 {
        match self {
            RequestError::Store(error) => error.errno(),
            RequestError::TooLarge { .. } | RequestError::NoSuchDrive { .. } => libc::EINVAL,
        }
    }
}

#[derive(Debug)]
pub struct Completion {
    pub tag: u64,
    pub result: Result<Output, RequestError>,
    /// From the worker taking the request to its completion.
    pub latency: Duration,
}

/// Requests produced inside the worker's own loop, and their completions consumed there.
///
/// The cross-thread channel suits callers on other threads; a source suits whatever the
/// worker should drive itself without a thread hop per request: the network transports
/// (reads go drive → buffer → wire on one core), and load generators such as
/// `tier0 bench local`, which then measures the worker and nothing else.
pub trait RequestSource: Send {
    /// Appends at most `max` new requests as (tag, drive, op). Returns false once the source
    /// has finished: it gives no more requests, and is closed when its last one completes.
    /// `max` is 0 while a request waits for a buffer: the source then takes nothing new but
    /// moves what it holds (sends queued replies, reaps completions), which is how the
    /// buffers it holds come back.
    fn poll(&mut self, max: usize, requests: &mut Vec<(u64, usize, Op)>) -> bool;

    /// One of this source's requests completed.
    fn complete(&mut self, completion: Completion);

    /// The fds that turn readable when the source has something to do (an epoll set of
    /// sockets, an RDMA completion channel): the worker sleeps watching them. None: the
    /// source is polled continuously.
    fn wake_fds(&self) -> &[RawFd] {
        &[]
    }

    /// The worker woke from a sleep on the wake fds: which of this source's (bit `i` for
    /// `wake_fds()[i]`) it saw readable. The others had no event, so the source need not
    /// look at them (a system call per look). A hint that saves looks: a source must still
    /// serve every request when a report is missed (a wake on another drive's ring), if
    /// later.
    fn woke(&mut self, woken: Woken) {
        let _ = woken;
    }

    /// The worker is about to sleep on the wake fds. A source that only looks at its events
    /// when told they are there, not at every poll (a polled worker would make a system
    /// call per spin), arms now what must wake the worker (an RDMA completion queue).
    /// Returns false when it found work or events to act on, so the worker polls again
    /// instead of sleeping.
    fn prepare_to_sleep(&mut self) -> bool {
        true
    }

    /// Called once, before the first poll, with the worker's buffer pool (every completion's
    /// lease points into it): a source that hands buffers to a device (an RDMA HCA) registers
    /// it here.
    ///
    /// # Safety
    /// The pool stays mapped as long as the source lives.
    unsafe fn register_buffers(&mut self, base: *mut u8, len: usize) -> Result<(), String> {
        let _ = (base, len);
        Ok(())
    }

    /// Called once, after `register_buffers`, when the pool is a memfd that can be shared
    /// with clients on this node (`len` bytes, `buffers` buffers): the node-local transport
    /// keeps a duplicate of the fd to hand them.
    fn share_buffers(&mut self, memfd: BorrowedFd<'_>, len: usize, buffers: usize) {
        let _ = (memfd, len, buffers);
    }

    /// The source finished and none of its requests is in flight.
    fn close(self: Box<Self>);
}

/// Builds the request sources of a worker, given its id, when the pool starts.
pub type SourceFactory = Arc<dyn Fn(usize) -> Vec<Box<dyn RequestSource>> + Send + Sync>;

/// Where a request's completion goes.
enum Reply {
    Channel(Sender<Completion>),
    Source(usize),
}

/// A request the worker holds: from the channel or from a source.
struct Pending {
    tag: u64,
    drive: usize,
    op: Op,
    reply: Reply,
}

impl From<Request> for Pending {
    fn from(request: Request) -> Self {
        Pending {
            tag: request.tag,
            drive: request.drive,
            op: request.op,
            reply: Reply::Channel(request.reply),
        }
    }
}

struct SourceState {
    source: Box<dyn RequestSource>,
    in_flight: usize,
    finished: bool,
}

/// A worker's settings, fixed at start.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub id: usize,
    pub numa_node: u32,
    /// The CPU to pin the thread to (from the topology worker plan).
    pub cpu: Option<u32>,
    pub poll_mode: PollMode,
    /// Requests in flight at most: the size of the in-flight table.
    pub in_flight_max: usize,
    pub buffers: BufferPoolConfig,
}

enum WriteStage {
    Data,
    DataSync,
    Entry,
    EntrySync,
}

enum DeleteStage {
    Entry,
    Sync,
}

enum InFlight {
    Read {
        info: Arc<ChunkInfo>,
        span: ReadSpan,
        buffer: PoolBuffer,
        check: ReadCheck,
    },
    Write {
        stage: WriteStage,
        reservation: Option<Reservation>,
        staging: AlignedBuf,
    },
    Delete {
        stage: DeleteStage,
        chunk: ChunkId,
        _zeros: AlignedBuf,
    },
}

struct Slot {
    tag: u64,
    drive: usize,
    reply: Reply,
    started: Instant,
    op: &'static str,
    work: InFlight,
}

struct Drive {
    device: Box<dyn BlockDevice>,
    store: Arc<ChunkStore>,
}

struct Metrics {
    read_bytes: metrics::Counter,
    write_bytes: metrics::Counter,
    reads: metrics::Counter,
    writes: metrics::Counter,
    deletes: metrics::Counter,
    errors: metrics::Counter,
    read_latency: metrics::Histogram,
    write_latency: metrics::Histogram,
    in_flight: metrics::Gauge,
}

impl Metrics {
    fn new(config: &WorkerConfig) -> Self {
        let worker = config.id.to_string();
        let node = config.numa_node.to_string();
        let labels = |op: &'static str| {
            [
                ("worker", worker.clone()),
                ("numa_node", node.clone()),
                ("op", op.to_string()),
            ]
        };
        Metrics {
            read_bytes: metrics::counter!("tier0_dataplane_bytes_total", &labels("read")),
            write_bytes: metrics::counter!("tier0_dataplane_bytes_total", &labels("write")),
            reads: metrics::counter!("tier0_dataplane_ops_total", &labels("read")),
            writes: metrics::counter!("tier0_dataplane_ops_total", &labels("write")),
            deletes: metrics::counter!("tier0_dataplane_ops_total", &labels("delete")),
            errors: metrics::counter!(
                "tier0_dataplane_errors_total",
                "worker" => worker.clone(),
                "numa_node" => node.clone()
            ),
            read_latency: metrics::histogram!("tier0_dataplane_latency_seconds", &labels("read")),
            write_latency: metrics::histogram!("tier0_dataplane_latency_seconds", &labels("write")),
            in_flight: metrics::gauge!(
                "tier0_dataplane_in_flight",
                "worker" => worker,
                "numa_node" => node
            ),
        }
    }
}

/// The worker's state; lives on its own thread.
pub(crate) struct Worker {
    config: WorkerConfig,
    drives: Vec<Drive>,
    pool: BufferPool,
    slots: Vec<Option<Slot>>,
    free_slots: Vec<usize>,
    /// Requests taken from the channel or a source that wait for a buffer, in arrival
    /// order: at most one source batch (no more than the free slots) or one channel request,
    /// since nothing new is taken while any waits.
    waiting: VecDeque<Pending>,
    sources: Vec<Option<SourceState>>,
    new_requests: Vec<(u64, usize, Op)>,
    requests: Receiver<Request>,
    doorbell: Arc<Doorbell>,
    closing: bool,
    completions: Vec<IoCompletion>,
    /// The fds the worker watches while it sleeps: its doorbell, then its sources'.
    wake_fds: Vec<RawFd>,
    /// Per source with wake fds: its index and where its fds start in `wake_fds`.
    wake_owners: Vec<(usize, usize)>,
    /// The poll set of a sleep on the sources, kept for the next.
    polled: Vec<libc::pollfd>,
    retired: VecDeque<usize>,
    /// Staging buffers of finished writes, kept for the next ones: a chunk-sized buffer
    /// freed per write is an munmap, and its TLB shootdown, per write.
    spare_staging: Vec<AlignedBuf>,
    metrics: Metrics,
}

/// Staging buffers a worker keeps for reuse.
const SPARE_STAGING: usize = 4;

/// Which step of setting a drive up failed.
enum Failed {
    Opening,
    Registering,
}

impl Worker {
    /// Sets the worker up on its own thread (pinned first, so the memory it touches lands on
    /// its node): buffer pool, device handles, buffer registration.
    pub(crate) fn new(
        config: WorkerConfig,
        drives: &[DriveSpec],
        factory: &DeviceFactory,
        requests: Receiver<Request>,
        doorbell: Arc<Doorbell>,
        sources: Vec<Box<dyn RequestSource>>,
    ) -> Result<Self, String> {
        if let Some(cpu) = config.cpu {
            pin_to_cpu(cpu);
        }
        let mut pool =
            BufferPool::new(&config.buffers).map_err(|error| crate::error_chain(&error))?;
        let owned = match Self::open_drives(drives, factory, &pool) {
            Ok(owned) => owned,
            // Older kernels refuse memfd-backed fixed buffers: keep the drives' fixed
            // buffers and give up node-local sharing instead.
            Err((Failed::Registering, error)) if pool.memfd().is_some() => {
                tracing::info!(
                    worker = config.id,
                    error,
                    "the drives refuse a shared buffer pool: anonymous memory, no node-local sharing"
                );
                pool = BufferPool::new_unshared(&config.buffers)
                    .map_err(|error| crate::error_chain(&error))?;
                Self::open_drives(drives, factory, &pool).map_err(|(_, error)| error)?
            }
            Err((_, error)) => return Err(error),
        };
        let mut sources = sources;
        let (base, len) = pool.arena();
        for source in &mut sources {
            // SAFETY: the pool is a field of this worker and outlives its sources (they are
            // closed, and dropped, before the worker ends).
            unsafe { source.register_buffers(base, len) }?;
            if let Some(memfd) = pool.memfd() {
                source.share_buffers(memfd, len, pool.capacity());
            }
        }
        let in_flight_max = config.in_flight_max.max(1);
        Ok(Worker {
            metrics: Metrics::new(&config),
            drives: owned,
            pool,
            slots: (0..in_flight_max).map(|_| None).collect(),
            free_slots: (0..in_flight_max).rev().collect(),
            waiting: VecDeque::new(),
            sources: sources
                .into_iter()
                .map(|source| {
                    Some(SourceState {
                        source,
                        in_flight: 0,
                        finished: false,
                    })
                })
                .collect(),
            new_requests: Vec::with_capacity(in_flight_max),
            requests,
            doorbell,
            closing: false,
            completions: Vec::with_capacity(in_flight_max),
            wake_fds: Vec::new(),
            wake_owners: Vec::new(),
            polled: Vec::new(),
            retired: VecDeque::with_capacity(in_flight_max),
            spare_staging: Vec::new(),
            config,
        })
    }

    /// Opens every drive's device and registers the pool's buffers with it.
    fn open_drives(
        drives: &[DriveSpec],
        factory: &DeviceFactory,
        pool: &BufferPool,
    ) -> Result<Vec<Drive>, (Failed, String)> {
        let regions = pool.regions();
        let mut owned = Vec::with_capacity(drives.len());
        for spec in drives {
            let mut device =
                factory(spec).map_err(|error| (Failed::Opening, crate::error_chain(&error)))?;
            tracing::debug!(drive = spec.name, kind = device.kind(), "drive opened");
            let store = spec.store.clone();
            // SAFETY: the pool lives in this worker as long as the device does, and is dropped
            // after it (field order of Worker: drives before pool).
            unsafe { device.register_buffers(&regions) }
                .map_err(|error| (Failed::Registering, crate::error_chain(&error)))?;
            owned.push(Drive { device, store });
        }
        Ok(owned)
    }

    pub(crate) fn run(mut self) {
        let mut idle_since: Option<Instant> = None;
        // Typical wait from going idle to the next event, smoothed: spinning only pays when
        // the next completion comes sooner than a sleep and a wake-up would take.
        let mut typical_gap = Duration::ZERO;
        loop {
            let accepted = self.accept();
            let completed = self.reap();
            let in_flight = self.slots.len() - self.free_slots.len();
            self.metrics.in_flight.set(in_flight as f64);
            if self.closing
                && in_flight == 0
                && self.waiting.is_empty()
                && self.sources.iter().all(Option::is_none)
            {
                return;
            }
            if accepted + completed > 0 {
                if let Some(since) = idle_since.take() {
                    typical_gap = (typical_gap * 7 + since.elapsed()) / 8;
                }
                continue;
            }
            // Only the adaptive mode needs the time: where the clock source is slow (a VM on
            // HPET), a busy worker reading it at every spin spent more on it than on the spin.
            match self.config.poll_mode {
                PollMode::Busy => self.collect(),
                PollMode::Adaptive => {
                    let idle = idle_since.get_or_insert_with(Instant::now).elapsed();
                    if idle < ADAPTIVE_SPIN
                        && (typical_gap < ADAPTIVE_SPIN || in_flight >= ADAPTIVE_SPIN_DEPTH)
                    {
                        self.collect()
                    } else {
                        self.sleep(in_flight)
                    }
                }
                PollMode::Interrupt => self.sleep(in_flight),
            }
        }
    }

    /// One spin: has each drive with I/O in flight collect what finished, without sleeping.
    fn collect(&mut self) {
        let mut any = false;
        for drive in &mut self.drives {
            if drive.device.in_flight() > 0 {
                any = true;
                if let Err(error) = drive.device.wait(&[], Some(Duration::ZERO)) {
                    tracing::error!(worker = self.config.id, %error, "collecting completions failed");
                }
            }
        }
        if !any {
            std::hint::spin_loop();
        }
    }

    /// Sleeps in the kernel until a request or a completion arrives.
    fn sleep(&mut self, in_flight: usize) {
        if in_flight == 0 {
            if !self.waiting.is_empty() {
                // Waiting for a buffer that a caller or a source holds: nothing announces its
                // return, so look again soon (`accept` polls the sources meanwhile).
                std::thread::sleep(Duration::from_micros(50));
                return;
            }
            if self.sources.iter().any(Option::is_some) {
                self.sleep_on_sources();
                return;
            }
            match self.requests.recv() {
                Ok(request) => self.waiting.push_back(Pending::from(request)),
                Err(_) => self.closing = true,
            }
            return;
        }
        // Sleep in the ring of the drive with the most I/O in flight; its ring also watches
        // the doorbell and the sources' fds. With I/O on other drives too, only briefly, then look at them all.
        let busy = self
            .drives
            .iter()
            .filter(|drive| drive.device.in_flight() > 0)
            .count();
        self.collect_wake_fds();
        let sources_ready = self.sources_prepare_to_sleep();
        let Some(drive) = self
            .drives
            .iter_mut()
            .max_by_key(|drive| drive.device.in_flight())
        else {
            return;
        };
        // A request that came after `accept` looked is started at once, so then the ring is
        // only entered to collect (with deferred task work the kernel posts completions only
        // inside io_uring_enter, so every path through here must enter it). Queued requests
        // that cannot start (table full, or one waiting for a buffer) are no reason to stay
        // awake: only a completion or a returned buffer can make room. Work a source found
        // in `prepare_to_sleep` counts as a request that came late.
        self.doorbell.prepare_to_sleep();
        let can_accept = self.waiting.is_empty()
            && !self.free_slots.is_empty()
            && (!self.requests.is_empty() || !sources_ready);
        let timeout = if can_accept {
            Some(Duration::ZERO)
        } else {
            (busy > 1).then_some(ADAPTIVE_SPIN)
        };
        let woken = match drive.device.wait(&self.wake_fds, timeout) {
            Ok(woken) => woken,
            Err(error) => {
                tracing::error!(worker = self.config.id, %error, "waiting for completions failed");
                Woken::NONE
            }
        };
        self.woke(woken);
    }

    /// Fills `wake_fds` with the doorbell and every source's fds; returns how many sources
    /// have some.
    fn collect_wake_fds(&mut self) -> usize {
        self.wake_fds.clear();
        self.wake_owners.clear();
        self.wake_fds.push(self.doorbell.fd());
        for (index, state) in self.sources.iter().enumerate() {
            let Some(state) = state else { continue };
            let fds = state.source.wake_fds();
            if !fds.is_empty() {
                self.wake_owners.push((index, self.wake_fds.len()));
                self.wake_fds.extend_from_slice(fds);
            }
        }
        self.wake_owners.len()
    }

    /// After a sleep on `wake_fds`: clears the doorbell if it rang and tells each source
    /// which of its fds turned readable.
    fn woke(&mut self, woken: Woken) {
        self.doorbell.woke(woken.contains(0));
        for &(index, first) in &self.wake_owners {
            if let Some(state) = self.sources[index].as_mut() {
                state.source.woke(woken.from(first));
            }
        }
    }

    /// Tells every source the worker is about to sleep; false when one has work first.
    fn sources_prepare_to_sleep(&mut self) -> bool {
        let mut ready = true;
        for state in self.sources.iter_mut().flatten() {
            ready &= state.source.prepare_to_sleep();
        }
        ready
    }

    /// No I/O in flight, sources attached: sleeps until a request, a source's fd (a socket
    /// set) or the doorbell wakes it. Sources without a fd are polled again at once.
    fn sleep_on_sources(&mut self) {
        // Every source must have a fd to sleep on; otherwise it is polled again at once.
        if self.collect_wake_fds() < self.sources.iter().flatten().count() {
            std::thread::yield_now();
            return;
        }
        self.doorbell.prepare_to_sleep();
        if !self.sources_prepare_to_sleep() || !self.requests.is_empty() {
            self.doorbell.woke(false);
            return;
        }
        // The timeout bounds how late a closed request channel is noticed.
        let timeout = Some(Duration::from_millis(100));
        let woken = match poll_readable(&self.wake_fds, &mut self.polled, timeout) {
            Ok(woken) => woken,
            Err(error) => {
                tracing::error!(worker = self.config.id, %error, "waiting on request sources failed");
                Woken::NONE
            }
        };
        self.woke(woken);
        match self.requests.try_recv() {
            Ok(request) => self.waiting.push_back(Pending::from(request)),
            Err(TryRecvError::Disconnected) => self.closing = true,
            Err(TryRecvError::Empty) => {}
        }
    }

    /// Starts as many new requests as the table and the pool allow: those waiting for a
    /// buffer first, in order, then the sources', then the channel's.
    fn accept(&mut self) -> usize {
        let mut accepted = 0;
        while let Some(pending) = self.waiting.pop_front() {
            match self.start(pending) {
                Ok(()) => accepted += 1,
                Err(pending) => {
                    self.waiting.push_front(pending);
                    break;
                }
            }
        }
        for index in 0..self.sources.len() {
            let Some(state) = self.sources[index].as_mut() else {
                continue;
            };
            // While requests wait for a buffer the sources take no new ones, but are still
            // polled: the buffers they hold come back only as they move them (replies
            // waiting for room in a socket, RDMA sends whose completions are to reap). Not
            // polling them then stopped the worker for good behind one client that took no
            // replies.
            let max = if self.waiting.is_empty() {
                self.free_slots.len()
            } else {
                0
            };
            if !state.finished && (!self.free_slots.is_empty() || !self.waiting.is_empty()) {
                let mut batch = std::mem::take(&mut self.new_requests);
                state.finished = !state.source.poll(max, &mut batch);
                state.in_flight += batch.len();
                for (tag, drive, op) in batch.drain(..) {
                    let pending = Pending {
                        tag,
                        drive,
                        op,
                        reply: Reply::Source(index),
                    };
                    // Behind one that waits, the rest of the batch waits too, in order: a
                    // client pipelining deeper than the pool gets backpressure, not errors.
                    if !self.waiting.is_empty() {
                        self.waiting.push_back(pending);
                        continue;
                    }
                    match self.start(pending) {
                        Ok(()) => accepted += 1,
                        Err(pending) => self.waiting.push_back(pending),
                    }
                }
                self.new_requests = batch;
            }
            self.close_finished_source(index);
        }
        while self.waiting.is_empty() && !self.free_slots.is_empty() {
            let request = match self.requests.try_recv() {
                Ok(request) => request,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.closing = true;
                    break;
                }
            };
            match self.start(Pending::from(request)) {
                Ok(()) => accepted += 1,
                Err(pending) => self.waiting.push_back(pending),
            }
        }
        accepted
    }

    fn close_finished_source(&mut self, index: usize) {
        if self.sources[index]
            .as_ref()
            .is_some_and(|state| state.finished && state.in_flight == 0)
            && let Some(state) = self.sources[index].take()
        {
            state.source.close();
        }
    }

    /// Answers a request that took `latency` (measured once by the caller: where the clock
    /// is slow, as on a VM's HPET, every reading of it costs microseconds).
    fn finish(
        &mut self,
        tag: u64,
        reply: Reply,
        latency: Duration,
        result: Result<Output, RequestError>,
    ) {
        if result.is_err() {
            self.metrics.errors.increment(1);
        }
        let completion = Completion {
            tag,
            result,
            latency,
        };
        match reply {
            // A caller that went away no longer wants the answer; the lease in it (if any)
            // returns its buffer when dropped here.
            Reply::Channel(sender) => {
                let _ = sender.send(completion);
            }
            Reply::Source(index) => {
                if let Some(state) = self.sources[index].as_mut() {
                    state.in_flight -= 1;
                    state.source.complete(completion);
                }
                self.close_finished_source(index);
            }
        }
    }

    /// Begins a request, or hands it back when it must wait for a buffer.
    fn start(&mut self, pending: Pending) -> Result<(), Pending> {
        let started = Instant::now();
        let Pending {
            tag,
            drive,
            op,
            reply,
        } = pending;
        let drives = self.drives.len();
        if drive >= drives {
            self.finish(
                tag,
                reply,
                Duration::ZERO,
                Err(RequestError::NoSuchDrive { drive, drives }),
            );
            return Ok(());
        }
        let name = op.name();
        let store = self.drives[drive].store.clone();
        let prepared = match op {
            Op::Read {
                chunk,
                offset,
                len,
                check,
            } => {
                let span = store
                    .lookup(chunk)
                    .ok_or(StoreError::NotFound {
                        device: store.device_name().to_string(),
                        chunk,
                    })
                    .and_then(|info| {
                        let span = store.read_span(&info, offset, u64::from(len))?;
                        Ok((info, span))
                    });
                match span {
                    Err(error) => Err(RequestError::from(error)),
                    Ok((_, span)) if span.device_len as usize > self.pool.buffer_size() => {
                        Err(RequestError::TooLarge {
                            len: u64::from(len),
                            max: self.pool.buffer_size(),
                        })
                    }
                    Ok((info, span)) => match self.pool.take() {
                        Some(buffer) => Ok(InFlight::Read {
                            info,
                            span,
                            buffer,
                            check,
                        }),
                        None => {
                            return Err(Pending {
                                tag,
                                drive,
                                op: Op::Read {
                                    chunk,
                                    offset,
                                    len,
                                    check,
                                },
                                reply,
                            });
                        }
                    },
                }
            }
            Op::Write { chunk, data } => match store.reserve(chunk, &data) {
                Err(error) => Err(error.into()),
                Ok(reservation) => {
                    // Writes stage through an aligned copy: they are the cold path, and the
                    // caller's Vec is neither aligned nor registered.
                    let size = data.len().next_multiple_of(IO_ALIGNMENT);
                    // A spare of exactly this size (the write's length is the buffer's), its
                    // padding zeroed as a fresh one's is.
                    let mut staging = match self.spare_staging.iter().position(|b| b.len() == size)
                    {
                        Some(spare) => self.spare_staging.swap_remove(spare),
                        None => AlignedBuf::zeroed(size),
                    };
                    staging[..data.len()].copy_from_slice(&data);
                    staging[data.len()..].fill(0);
                    Ok(InFlight::Write {
                        stage: WriteStage::Data,
                        reservation: Some(reservation),
                        staging,
                    })
                }
            },
            Op::Delete { chunk } => match store.delete_offset(chunk) {
                Err(error) => Err(error.into()),
                Ok(_) => Ok(InFlight::Delete {
                    stage: DeleteStage::Entry,
                    chunk,
                    _zeros: AlignedBuf::zeroed(store.entry_size()),
                }),
            },
        };
        let work = match prepared {
            Ok(work) => work,
            Err(error) => {
                self.finish(tag, reply, started.elapsed(), Err(error));
                return Ok(());
            }
        };
        let index = self
            .free_slots
            .pop()
            .expect("accept checks for a free slot");
        self.slots[index] = Some(Slot {
            tag,
            drive,
            reply,
            started,
            op: name,
            work,
        });
        if let Err(error) = self.submit_next(index) {
            self.fail(index, error);
        }
        Ok(())
    }

    /// Submits the I/O the slot's current stage needs.
    fn submit_next(&mut self, index: usize) -> Result<(), RequestError> {
        let slot = self.slots[index].as_mut().expect("live slot");
        let drive = &mut self.drives[slot.drive];
        let user_data = index as u64;
        let request = match &mut slot.work {
            InFlight::Read { span, buffer, .. } => IoRequest {
                op: IoOp::Read,
                offset: span.device_offset,
                buffer: buffer.as_mut_ptr(),
                len: span.device_len,
                fixed_buffer: Some(buffer.index),
                user_data,
            },
            InFlight::Write {
                stage,
                reservation,
                staging,
            } => {
                let reservation = reservation.as_ref().expect("reservation until published");
                match stage {
                    WriteStage::Data => IoRequest {
                        op: IoOp::Write,
                        offset: drive.store.data_offset(reservation),
                        buffer: staging.as_mut_ptr(),
                        len: staging.len() as u32,
                        fixed_buffer: None,
                        user_data,
                    },
                    WriteStage::Entry => {
                        // The data is durable: the staging buffer now carries the entry.
                        let entry_size = drive.store.entry_size();
                        if staging.len() < entry_size {
                            *staging = AlignedBuf::zeroed(entry_size);
                        }
                        drive
                            .store
                            .encode_entry(reservation, &mut staging[..entry_size]);
                        IoRequest {
                            op: IoOp::Write,
                            offset: drive.store.entry_offset(reservation),
                            buffer: staging.as_mut_ptr(),
                            len: entry_size as u32,
                            fixed_buffer: None,
                            user_data,
                        }
                    }
                    WriteStage::DataSync | WriteStage::EntrySync => IoRequest::sync(user_data),
                }
            }
            InFlight::Delete {
                stage,
                chunk,
                _zeros,
            } => match stage {
                DeleteStage::Entry => IoRequest {
                    op: IoOp::Write,
                    offset: drive.store.delete_offset(*chunk)?,
                    buffer: _zeros.as_mut_ptr(),
                    len: _zeros.len() as u32,
                    fixed_buffer: None,
                    user_data,
                },
                DeleteStage::Sync => IoRequest::sync(user_data),
            },
        };
        // SAFETY: every buffer named above lives in the slot (or the pool) until the slot is
        // retired, which happens only after this request's completion is reaped.
        unsafe { drive.device.submit(request) }?;
        Ok(())
    }

    /// Polls every drive and advances the requests whose I/O completed.
    fn reap(&mut self) -> usize {
        let mut reaped = 0;
        let mut completions = std::mem::take(&mut self.completions);
        for drive in 0..self.drives.len() {
            if self.drives[drive].device.in_flight() == 0 && completions.is_empty() {
                continue;
            }
            if let Err(error) = self.drives[drive].device.poll(&mut completions, 0) {
                tracing::error!(worker = self.config.id, %error, "polling a drive failed");
            }
        }
        for completion in completions.drain(..) {
            reaped += 1;
            self.advance(completion.user_data as usize, completion.result);
        }
        self.completions = completions;
        while let Some(index) = self.retired.pop_front() {
            self.free_slots.push(index);
        }
        reaped
    }

    fn advance(&mut self, index: usize, result: Result<u32, i32>) {
        let Some(slot) = self.slots[index].as_mut() else {
            tracing::error!(
                worker = self.config.id,
                index,
                "completion for an empty slot"
            );
            return;
        };
        let store = self.drives[slot.drive].store.clone();
        if let Err(errno) = result {
            let op = match &slot.work {
                InFlight::Read { .. } => IoOp::Read,
                InFlight::Write {
                    stage: WriteStage::Data | WriteStage::Entry,
                    ..
                }
                | InFlight::Delete {
                    stage: DeleteStage::Entry,
                    ..
                } => IoOp::Write,
                _ => IoOp::Sync,
            };
            let error = DeviceError::Io {
                device: store.device_name().to_string(),
                op,
                offset: 0,
                source: std::io::Error::from_raw_os_error(errno),
            };
            self.fail(index, error.into());
            return;
        }
        let next = match &mut slot.work {
            InFlight::Read { .. } => None,
            InFlight::Write { stage, .. } => {
                *stage = match stage {
                    WriteStage::Data => WriteStage::DataSync,
                    WriteStage::DataSync => WriteStage::Entry,
                    WriteStage::Entry => WriteStage::EntrySync,
                    WriteStage::EntrySync => return self.complete(index),
                };
                Some(())
            }
            InFlight::Delete { stage, .. } => match stage {
                DeleteStage::Entry => {
                    *stage = DeleteStage::Sync;
                    Some(())
                }
                DeleteStage::Sync => None,
            },
        };
        match next {
            Some(()) => {
                if let Err(error) = self.submit_next(index) {
                    self.fail(index, error);
                }
            }
            None => self.complete(index),
        }
    }

    /// The slot's last I/O succeeded: verify, publish, and answer.
    fn complete(&mut self, index: usize) {
        let slot = self.slots[index].take().expect("live slot");
        self.retired.push_back(index);
        let store = self.drives[slot.drive].store.clone();
        let latency = slot.started.elapsed();
        let result = match slot.work {
            InFlight::Read {
                info,
                span,
                buffer,
                check,
            } => {
                // SAFETY: the read completed into this buffer, which the slot owned.
                let data = unsafe {
                    std::slice::from_raw_parts(buffer.as_mut_ptr(), span.device_len as usize)
                };
                match store.check_read(&info, &span, data, check) {
                    Ok(crc) => {
                        self.metrics.reads.increment(1);
                        self.metrics.read_bytes.increment(u64::from(span.len));
                        self.metrics.read_latency.record(latency.as_secs_f64());
                        Ok(Output::Read {
                            lease: self
                                .pool
                                .lease(buffer, span.skip as usize, span.len as usize),
                            crc,
                        })
                    }
                    Err(error) => {
                        self.pool.put_back(buffer);
                        Err(error.into())
                    }
                }
            }
            InFlight::Write {
                reservation,
                staging,
                ..
            } => {
                let reservation = reservation.expect("reservation until published");
                self.metrics.writes.increment(1);
                self.metrics
                    .write_bytes
                    .increment(u64::from(reservation.len));
                self.metrics.write_latency.record(latency.as_secs_f64());
                if self.spare_staging.len() < SPARE_STAGING {
                    self.spare_staging.push(staging);
                }
                store.publish(reservation);
                Ok(Output::Written)
            }
            InFlight::Delete { chunk, .. } => {
                store.forget(chunk);
                self.metrics.deletes.increment(1);
                Ok(Output::Deleted)
            }
        };
        self.finish(slot.tag, slot.reply, latency, result);
    }

    /// The slot failed: release what it holds, tell the caller.
    fn fail(&mut self, index: usize, error: RequestError) {
        let slot = self.slots[index].take().expect("live slot");
        self.retired.push_back(index);
        let store = self.drives[slot.drive].store.clone();
        match slot.work {
            InFlight::Read { buffer, .. } => self.pool.put_back(buffer),
            InFlight::Write {
                stage, reservation, ..
            } => {
                if let Some(reservation) = reservation {
                    match stage {
                        WriteStage::Data | WriteStage::DataSync => store.abort(reservation),
                        WriteStage::Entry | WriteStage::EntrySync => store.quarantine(reservation),
                    }
                }
            }
            InFlight::Delete { .. } => {}
        }
        tracing::debug!(worker = self.config.id, op = slot.op, %error, "request failed");
        self.finish(slot.tag, slot.reply, slot.started.elapsed(), Err(error));
    }
}

fn pin_to_cpu(cpu: u32) {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it; sched_setaffinity reads it.
    let result = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if result != 0 {
        tracing::warn!(cpu, error = %std::io::Error::last_os_error(), "could not pin worker");
    }
}
