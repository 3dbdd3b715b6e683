//! The RDMA baseline for 4 KiB reads one at a time: the exchange tier0's RDMA read is, with
//! no storage and no protocol. A client thread SENDs a 16-byte request; a server thread, on
//! its receive, RDMA-WRITEs the next 4 KiB of a share held in memory into the client's
//! registered buffer and SENDs a 16-byte reply behind it (one post of both, as the daemon
//! posts them); the client takes the reply's completion as the end of the read. Both sides
//! wait as tier0's do: the server sleeps on its completion channel when nothing is there
//! (the daemons' interrupt poll mode, which the bench runs where daemons and client would
//! share cores), the client spins a little and then sleeps on its channel.
//!
//! It is to `ib_read_lat` what the socket ping-pong is to a loopback round trip: perftest's
//! one-sided READ involves no server software at all, so it is the floor, while this is the
//! messages tier0 sends (decision 58).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::queue_pair::ExtendedQueuePair;
use tier0_dataplane::net::rdma::RdmaDevice;
use tier0_dataplane::net::rdma::verbs::{self, Completions, WorkCompletion};

use super::{Gate, NetBenchError, Run, fill_pattern, holds_pattern};
use crate::measure::{LatencyRecorder, Who, cpu_seconds};

pub(super) const NAME: &str = "verbs ping-pong (SEND; WRITE + SEND)";

/// Bytes per read.
const READ: usize = 4096;
/// Bytes of a request and of a reply.
const MESSAGE: usize = 16;
/// Receives kept posted on each side (one read at a time needs one).
const RECEIVES: usize = 2;
/// How long either side waits for the other before calling the run off.
const PATIENCE: Duration = Duration::from_secs(10);
/// Polls before the client sleeps, as tier0's RDMA client spins.
const CLIENT_SPINS: usize = 64;
/// Work request ids of receives carry this bit and their slot.
const RECV_BIT: u64 = 1 << 31;

fn failed(reason: impl std::fmt::Display) -> NetBenchError {
    NetBenchError::Baseline {
        name: NAME.into(),
        reason: reason.to_string(),
    }
}

/// The first failure of a run, whichever side it was on, and the flag every side's wait
/// looks at, so the others stop waiting for the one that failed. What the others then
/// report ("another side failed") is not kept: the first error is the one returned.
#[derive(Default)]
struct FirstFailure {
    set: AtomicBool,
    first: Mutex<Option<NetBenchError>>,
}

impl FirstFailure {
    fn record(&self, error: NetBenchError) {
        let mut first = self
            .first
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        first.get_or_insert(error);
        self.set.store(true, Ordering::Release);
    }

    fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }

    fn take(&self) -> Option<NetBenchError> {
        self.first
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }
}

/// Records a panic of the thread holding it as the run's failure, so the client does not
/// wait out PATIENCE for a server that is gone.
struct RecordPanic<'a>(&'a FirstFailure);

impl Drop for RecordPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.record(failed("a server thread panicked"));
        }
    }
}

/// One side: its queue pair and completions, and its registered memory: `data` (the share
/// on the server, the destination on the client) and a slab of message slots, the receives'
/// first and then the one send slot.
/// Fields drop in declaration order: the queue pair and the regions go before the memory.
struct Side {
    qp: ExtendedQueuePair,
    completions: Completions,
    data_region: Arc<MemoryRegion>,
    slab_region: Arc<MemoryRegion>,
    data: Box<[u8]>,
    slab: Box<[u8]>,
    wcs: Vec<WorkCompletion>,
}

impl Side {
    fn new(
        device: &RdmaDevice,
        data: Box<[u8]>,
        remote_write: bool,
    ) -> Result<Side, NetBenchError> {
        let completions = device.completion_queue(16).map_err(failed)?;
        let qp = device
            .queue_pair(&completions.handle(), 8, RECEIVES as u32, remote_write)
            .map_err(failed)?;
        let mut data = data;
        let mut slab = vec![0u8; (RECEIVES + 1) * MESSAGE].into_boxed_slice();
        // SAFETY: the memory moves into the Side (a box: its address stays), which drops
        // its queue pair and the region before it.
        let data_region = unsafe { device.register(data.as_mut_ptr(), data.len(), remote_write) }
            .map_err(failed)?;
        // SAFETY: as for `data`.
        let slab_region =
            unsafe { device.register(slab.as_mut_ptr(), slab.len(), false) }.map_err(failed)?;
        let mut side = Side {
            qp,
            completions,
            data,
            data_region,
            slab,
            slab_region,
            wcs: Vec::with_capacity(8),
        };
        for slot in 0..RECEIVES {
            side.post_recv(slot)?;
        }
        Ok(side)
    }

    fn slot_addr(&self, slot: usize) -> u64 {
        self.slab.as_ptr() as u64 + (slot * MESSAGE) as u64
    }

    fn post_recv(&mut self, slot: usize) -> Result<(), NetBenchError> {
        let at = self.slot_addr(slot);
        verbs::post_recv(
            &mut self.qp,
            RECV_BIT | slot as u64,
            self.slab_region.lkey(),
            at,
            MESSAGE as u32,
        )
        .map_err(failed)
    }

    /// The send slot, to fill before a send.
    fn send_slot(&mut self) -> &mut [u8] {
        &mut self.slab[RECEIVES * MESSAGE..]
    }

    fn send_local(&self) -> verbs::Local {
        (
            self.slab_region.lkey(),
            self.slot_addr(RECEIVES),
            MESSAGE as u32,
        )
    }

    /// Waits for the next receive, reposting it, and returns its slot's 16 bytes; send
    /// completions on the way are consumed. Spins `spins` polls before each sleep; gives up
    /// when another side has failed, or after PATIENCE.
    fn next_message(
        &mut self,
        spins: usize,
        failure: &FirstFailure,
    ) -> Result<[u8; MESSAGE], NetBenchError> {
        let mut waited_since: Option<Instant> = None;
        loop {
            self.wcs.clear();
            let mut got = 0;
            for _ in 0..spins {
                got = self.completions.poll(&mut self.wcs).map_err(failed)?;
                if got > 0 {
                    break;
                }
                std::hint::spin_loop();
            }
            if got == 0 {
                self.completions
                    .wait(&mut self.wcs, Duration::from_millis(20))
                    .map_err(failed)?;
            }
            let mut message = None;
            for wc in std::mem::take(&mut self.wcs) {
                if !wc.ok() {
                    return Err(failed(format!("work request failed: {}", wc.status_text())));
                }
                if wc.wr_id & RECV_BIT != 0 {
                    let slot = (wc.wr_id & !RECV_BIT) as usize;
                    let at = slot * MESSAGE;
                    let bytes: [u8; MESSAGE] =
                        self.slab[at..at + MESSAGE].try_into().expect("a slot");
                    self.post_recv(slot)?;
                    if message.replace(bytes).is_some() {
                        return Err(failed("two messages where one was asked for"));
                    }
                }
            }
            if let Some(message) = message {
                return Ok(message);
            }
            if failure.is_set() {
                return Err(failed("another side failed"));
            }
            if waited_since.get_or_insert_with(Instant::now).elapsed() > PATIENCE {
                return Err(failed(format!("nothing from the peer for {PATIENCE:?}")));
            }
        }
    }
}

/// `reads` 4 KiB reads one at a time on `device` (opened by name, as the client has it),
/// going round `servers` servers as tier0's reads go round the daemons: read `i` from
/// server `i % servers`, the next 4 KiB of its share. Each server is a thread with its own
/// queue pair to the client's (one per server, as a client has one per daemon). Setup and
/// teardown are outside the clock; the bytes are checked.
pub(super) fn run(device_name: &str, reads: usize, servers: usize) -> Result<Run, NetBenchError> {
    let servers = servers.clamp(1, reads.max(1));
    let device = RdmaDevice::open(Some(device_name)).map_err(failed)?;
    // Server k serves reads k, k + servers, ...: this many.
    let share = |k: usize| (reads + servers - 1 - k) / servers;
    let mut pairs = Vec::with_capacity(servers);
    for k in 0..servers {
        let mut payload = vec![0u8; share(k) * READ].into_boxed_slice();
        fill_pattern(&mut payload);
        let mut server = Side::new(&device, payload, false)?;
        // Written once so that every page is there before the clock, as tier0's buffer is.
        let dest = vec![1u8; share(k) * READ].into_boxed_slice();
        let mut client = Side::new(&device, dest, true)?;
        let (server_psn, client_psn) = (verbs::random_psn(), verbs::random_psn());
        let server_end = device.endpoint(&server.qp, server_psn, RECEIVES as u32);
        let client_end = device.endpoint(&client.qp, client_psn, RECEIVES as u32);
        device
            .connect(&mut server.qp, server_psn, &client_end)
            .map_err(failed)?;
        device
            .connect(&mut client.qp, client_psn, &server_end)
            .map_err(failed)?;
        pairs.push((server, client));
    }
    let gate = Arc::new(Gate::default());
    let failure = Arc::new(FirstFailure::default());
    let mut clients = Vec::with_capacity(servers);
    let mut serving = Vec::with_capacity(servers);
    for (k, (mut server, client)) in pairs.into_iter().enumerate() {
        let (rkey, base) = (client.data_region.rkey(), client.data.as_ptr() as u64);
        clients.push(client);
        let (server_gate, server_failure, count) = (gate.clone(), failure.clone(), share(k));
        let spawned = std::thread::Builder::new()
            .name("verbs-pong".into())
            .spawn(move || {
                let panicking = RecordPanic(&server_failure);
                if let Err(error) = serve(
                    &mut server,
                    count,
                    rkey,
                    base,
                    &server_gate,
                    &server_failure,
                ) {
                    server_failure.record(error);
                }
                drop(panicking);
                // Dropped by the joiner, after every side has stopped.
                server
            });
        match spawned {
            Ok(thread) => serving.push(thread),
            Err(error) => {
                // Every thread started leaves at once.
                gate.open(false);
                return Err(failed(format!("starting its threads: {error}")));
            }
        }
    }

    let mut latency = LatencyRecorder::default();
    let cpu = cpu_seconds(Who::Process);
    let start = Instant::now();
    gate.open(true);
    for read in 0..reads {
        let client = &mut clients[read % servers];
        let offset = read / servers * READ;
        let began = Instant::now();
        client.send_slot()[..8].copy_from_slice(&(offset as u64).to_le_bytes());
        let message = client.send_local();
        let replied = verbs::post_send(&mut client.qp, 0, message)
            .map_err(failed)
            .and_then(|()| client.next_message(CLIENT_SPINS, &failure));
        match replied {
            Ok(reply) if reply[..8] == (offset as u64).to_le_bytes() => {}
            Ok(_) => {
                failure.record(failed("a reply for another read"));
                break;
            }
            Err(error) => {
                failure.record(error);
                break;
            }
        }
        latency.record(began.elapsed());
    }
    let seconds = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds(Who::Process) - cpu;
    // Every server is joined (the ones still waiting stop at their next look at `failure`)
    // before the clients, their queue pairs' peers, drop.
    for thread in serving {
        // A panic was recorded by the thread itself.
        let _ = thread.join();
    }
    if let Some(error) = failure.take() {
        return Err(error);
    }
    // Checked as tier0's passes are: a baseline that moved the wrong bytes measured nothing.
    if !clients.iter().all(|client| holds_pattern(&client.data)) {
        return Err(failed("the bytes written differ from those sent"));
    }
    Ok(Run::measured(seconds, cpu, latency.summary()))
}

/// A server: `count` requests, each answered with a WRITE of the asked-for 4 KiB of its
/// share into the client's region (`rkey`, `base`) and a SEND of the request's offset.
fn serve(
    server: &mut Side,
    count: usize,
    rkey: u32,
    base: u64,
    gate: &Gate,
    failure: &FirstFailure,
) -> Result<(), NetBenchError> {
    if !gate.wait() {
        return Ok(());
    }
    for _ in 0..count {
        let request = server.next_message(0, failure)?;
        let offset = u64::from_le_bytes(request[..8].try_into().expect("8 bytes"));
        if offset as usize + READ > server.data.len() {
            return Err(failed(format!("a request for offset {offset}")));
        }
        server.send_slot()[..8].copy_from_slice(&offset.to_le_bytes());
        let data = (
            server.data_region.lkey(),
            server.data.as_ptr() as u64 + offset,
            READ as u32,
        );
        let message = server.send_local();
        verbs::post_write_and_send(&mut server.qp, 0, data, rkey, base + offset, message)
            .map_err(failed)?;
    }
    Ok(())
}
