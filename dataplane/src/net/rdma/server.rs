//! The RDMA transport, daemon side: per worker, the HCA nearest its NUMA node, one completion
//! queue, the worker's buffer pool registered with the device, and the queue pairs of the
//! sessions the TCP handshake set up.
//!
//! A session is a reliable-connected queue pair plus the authenticated TCP connection it was
//! negotiated on, kept open as the side channel: when it closes, the session ends. Requests
//! arrive as SENDs into small receive slots (frames of the wire protocol, no payload); a read
//! is answered with an RDMA WRITE of the chunk bytes, straight from the pool buffer the drive
//! read into, to the address and key the client named, followed by a SEND of `RdmaReadDone`
//! with their CRC32C. One completion (the SEND's) covers both. The client never has more
//! requests outstanding than the session's credits (receive slots), and this side never more
//! than two send slots per credit, so the work requests posted are bounded.

use std::collections::VecDeque;
use std::io::{self, Read as _};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::queue_pair::ExtendedQueuePair;

use super::verbs::{
    self, Completions, DEFAULT_CREDITS, MESSAGE_SLOT, RdmaDevice, RdmaError, WorkCompletion,
};
use crate::buffer::BufferLease;
use crate::fence::FenceTable;
use crate::heat::HeatMap;
use crate::net::HARVEST_EVERY;
use crate::net::tags::Tags;
use crate::net::tcp::{EventFd, locate};
use crate::net::wire::{
    self, ErrorReply, HEADER_SIZE, Header, Message, RdmaEndpoint, RdmaReadDone,
};
use crate::store::ChunkStore;
use crate::worker::{Completion, Op, Output, ReadCheck, RequestSource, Woken};

/// Sessions one worker serves at most; more are refused RDMA (and stay on TCP).
pub const MAX_SESSIONS: usize = 64;

/// The RDMA side of a daemon, per worker: what the handshake uses to set sessions up, and the
/// request source the worker polls. A worker without a usable device has neither.
#[derive(Debug)]
pub struct RdmaService {
    pub(crate) workers: Vec<Option<(Arc<RdmaAcceptor>, RdmaSource)>>,
}

impl RdmaService {
    /// Opens `devices[worker]` for each worker (the HCA nearest its node, from the worker
    /// plan; `None`: that worker serves TCP only). A device that fails to open is logged and
    /// its workers serve TCP only. Every read is checked against `fences` before it goes to a
    /// drive (a stale one is answered `ESTALE`).
    pub fn new(
        devices: &[Option<String>],
        stores: Arc<[Arc<ChunkStore>]>,
        fences: Arc<FenceTable>,
        heat: Arc<HeatMap>,
        node: &str,
        max_payload: u32,
    ) -> RdmaService {
        let mut opened: Vec<(String, Arc<RdmaDevice>)> = Vec::new();
        let mut workers = Vec::new();
        for (worker, name) in devices.iter().enumerate() {
            let Some(name) = name else {
                workers.push(None);
                continue;
            };
            let device = match opened.iter().find(|(opened, _)| opened == name) {
                Some((_, device)) => Ok(device.clone()),
                None => RdmaDevice::open(Some(name)).inspect(|device| {
                    opened.push((name.clone(), device.clone()));
                }),
            };
            let built = device.and_then(|device| {
                RdmaSource::new(
                    device,
                    stores.clone(),
                    fences.clone(),
                    heat.clone(),
                    node,
                    max_payload,
                    worker,
                )
            });
            match built {
                Ok(pair) => workers.push(Some(pair)),
                Err(error) => {
                    tracing::warn!(worker, device = name, %error, "no RDMA for this worker: TCP only");
                    workers.push(None);
                }
            }
        }
        RdmaService { workers }
    }

    /// The device each worker posts to.
    pub fn devices(&self) -> Vec<Option<String>> {
        self.workers
            .iter()
            .map(|worker| {
                worker
                    .as_ref()
                    .map(|(acceptor, _)| acceptor.device.name().to_string())
            })
            .collect()
    }
}

/// A queue pair set up by the handshake, not yet adopted by its worker.
pub(crate) struct Session {
    // Field order is drop order: the queue pair goes before the memory it points into.
    qp: ExtendedQueuePair,
    slab_mr: Arc<MemoryRegion>,
    slab: Box<[u8]>,
    credits: u32,
    stream: Option<TcpStream>,
    peer: Option<SocketAddr>,
}

/// Sets sessions up for one worker, from the handshake threads.
pub struct RdmaAcceptor {
    device: Arc<RdmaDevice>,
    recv_cq: verbs::CompletionQueueHandle,
    send_cq: verbs::CompletionQueueHandle,
    inbox: Sender<Session>,
    notify: Arc<EventFd>,
    sessions: Arc<AtomicUsize>,
}

impl std::fmt::Debug for RdmaAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaAcceptor")
            .field("device", &self.device.name())
            .finish()
    }
}

impl RdmaAcceptor {
    /// Creates this side's queue pair for the client's endpoint, posts its receives, and
    /// brings it to RTS. Returns the endpoint to send back in `Welcome`.
    pub(crate) fn accept(
        &self,
        remote: &RdmaEndpoint,
    ) -> Result<(RdmaEndpoint, Session), RdmaError> {
        if self.sessions.load(Ordering::SeqCst) >= MAX_SESSIONS {
            return Err(RdmaError::Unavailable(format!(
                "this worker already serves {MAX_SESSIONS} RDMA sessions"
            )));
        }
        if remote.credits == 0 {
            return Err(RdmaError::BadEndpoint(
                "the client offers no credits".into(),
            ));
        }
        let credits = remote.credits.min(DEFAULT_CREDITS);
        let sends = 2 * credits;
        let mut slab = vec![0u8; (credits + sends) as usize * MESSAGE_SLOT].into_boxed_slice();
        // SAFETY: the slab lives in the session next to its region and is dropped after it.
        let slab_mr = unsafe { self.device.register(slab.as_mut_ptr(), slab.len(), false)? };
        // Each reply is at most a WRITE and a SEND.
        let mut qp =
            self.device
                .queue_pair_on(&self.send_cq, &self.recv_cq, 2 * sends, credits, false)?;
        for index in 0..credits {
            let addr = slab.as_ptr() as u64 + u64::from(index) * MESSAGE_SLOT as u64;
            verbs::post_recv(
                &mut qp,
                recv_wr_id(index as u16),
                slab_mr.lkey(),
                addr,
                MESSAGE_SLOT as u32,
            )?;
        }
        let psn = verbs::random_psn();
        self.device.connect(&mut qp, psn, remote)?;
        let local = self.device.endpoint(&qp, psn, credits);
        Ok((
            local,
            Session {
                qp,
                slab_mr,
                slab,
                credits,
                stream: None,
                peer: None,
            },
        ))
    }

    /// Gives the session, with its side channel, to the worker. Called before the `Welcome`
    /// goes out, so the worker knows the queue pair before any request can arrive on it.
    pub(crate) fn hand_over(&self, mut session: Session, stream: TcpStream, peer: SocketAddr) {
        session.stream = Some(stream);
        session.peer = Some(peer);
        self.sessions.fetch_add(1, Ordering::SeqCst);
        if self.inbox.send(session).is_ok() {
            self.notify.signal();
        } else {
            self.sessions.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// A work request's id: the message slot it uses, and whether it is a receive. Completions
/// find their session by queue pair number.
const RECV_BIT: u64 = 1 << 31;

fn recv_wr_id(index: u16) -> u64 {
    RECV_BIT | u64::from(index)
}

fn send_wr_id(index: u16) -> u64 {
    u64::from(index)
}

/// A reply waiting for a free send slot.
enum Reply {
    Read {
        lease: BufferLease,
        crc: u32,
        addr: u64,
        rkey: u32,
    },
    Message(Message),
}

struct Live {
    session: Session,
    /// Tells this session from earlier ones in the same slot, so a late worker completion
    /// never reaches the wrong client.
    generation: u16,
    qp_num: u32,
    free_sends: Vec<u16>,
    /// The pool buffer each send slot's WRITE reads from, held until its SEND completes.
    send_leases: Vec<Option<BufferLease>>,
    /// Which send slots are posted. A WRITE that fails completes too, unsignaled as it is,
    /// with its SEND's id, and the SEND then completes flushed: only the first completion of
    /// a slot frees it.
    send_posted: Vec<bool>,
    sends_posted: usize,
    backlog: VecDeque<(u64, Reply)>,
    in_flight: usize,
    /// No more requests: the side channel closed or the server stops.
    closing: bool,
    /// The queue pair is in the error state (or must be put there).
    broken: Option<Instant>,
}

/// A worker's request in flight: which session, and where its bytes go.
#[derive(Clone, Copy)]
struct Pending {
    slot: usize,
    generation: u16,
    request_id: u64,
    addr: u64,
    rkey: u32,
}

/// The epoll key besides session slots.
const NOTIFY_KEY: u64 = u64::MAX;
/// How long a broken session waits for its flushed work requests before it is dropped anyway.
const FLUSH_GRACE: Duration = Duration::from_secs(1);

/// The RDMA sessions one worker serves, as a [`RequestSource`].
pub struct RdmaSource {
    device: Arc<RdmaDevice>,
    /// Every session's receives: the requests.
    completions: Completions,
    /// Every session's sends: the replies' SENDs (and a WRITE that failed). Their own queue,
    /// so that a worker with nothing waiting on a send sleeps through them (decision 27).
    send_completions: Completions,
    /// The completion queue will raise an event (on its channel, which the worker watches)
    /// at its next completion; cleared by any completion polled, since one that arrives
    /// armed raises the event and uses the arming up, and by the worker seeing the channel
    /// readable.
    armed: bool,
    /// The same for the send queue, which is armed only while something waits on a send.
    send_armed: bool,
    /// The worker saw the send queue's channel readable: its event is to be read even when
    /// the queue is not armed again, or the channel would end every sleep at once.
    send_event: bool,
    /// The worker saw the epoll set (side channels, new sessions) readable: read it at the
    /// next look.
    harvest_due: bool,
    /// What the worker watches: the epoll set, the receive queue's channel and the send
    /// queue's, in that order (the channels outside the epoll set, so that a request's wake
    /// needs no `epoll_wait` to say it was the queue).
    wake: [RawFd; 3],
    /// Arming failed last time: said once, not at every sleep.
    arming_failed: bool,
    /// Polls since the epoll set was last read.
    polls_since_harvest: u32,
    pool_mr: Option<Arc<MemoryRegion>>,
    epoll: OwnedFd,
    notify: Arc<EventFd>,
    incoming: Receiver<Session>,
    accepting: bool,
    sessions: Vec<Option<Live>>,
    session_count: Arc<AtomicUsize>,
    generations: u16,
    pending: Tags<Pending>,
    ready: VecDeque<(u64, usize, Op)>,
    stores: Arc<[Arc<ChunkStore>]>,
    fences: Arc<FenceTable>,
    heat: Arc<HeatMap>,
    node: String,
    max_payload: u32,
    wcs: Vec<WorkCompletion>,
    events: Vec<libc::epoll_event>,
}

impl std::fmt::Debug for RdmaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaSource")
            .field("device", &self.device.name())
            .field("sessions", &self.sessions.iter().flatten().count())
            .finish()
    }
}

impl RdmaSource {
    fn new(
        device: Arc<RdmaDevice>,
        stores: Arc<[Arc<ChunkStore>]>,
        fences: Arc<FenceTable>,
        heat: Arc<HeatMap>,
        node: &str,
        max_payload: u32,
        worker: usize,
    ) -> Result<(Arc<RdmaAcceptor>, RdmaSource), RdmaError> {
        let device_name = device.name().to_string();
        let io_error = |what: &'static str| {
            let device = device_name.clone();
            move |error: io::Error| RdmaError::Verbs {
                device,
                what,
                reason: error.to_string(),
            }
        };
        // Every session: its receives; and a send per send slot (the WRITEs are unsignaled),
        // twice over, since a failed WRITE completes too and its SEND then completes flushed.
        let completions = device.completion_queue((MAX_SESSIONS as u32) * DEFAULT_CREDITS)?;
        let send_completions =
            device.completion_queue((MAX_SESSIONS as u32) * 2 * 2 * DEFAULT_CREDITS)?;
        let notify = Arc::new(EventFd::new().map_err(io_error("creating an eventfd"))?);
        // SAFETY: epoll_create1 takes a flag and returns a new fd or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io_error("creating an epoll set")(io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        let wake = [epoll.as_raw_fd(), completions.fd(), send_completions.fd()];
        let (sender, receiver) = crossbeam_channel::unbounded();
        let sessions = Arc::new(AtomicUsize::new(0));
        let acceptor = Arc::new(RdmaAcceptor {
            device: device.clone(),
            recv_cq: completions.handle(),
            send_cq: send_completions.handle(),
            inbox: sender,
            notify: notify.clone(),
            sessions: sessions.clone(),
        });
        let source = RdmaSource {
            device,
            completions,
            send_completions,
            armed: false,
            send_armed: false,
            send_event: false,
            harvest_due: false,
            wake,
            arming_failed: false,
            polls_since_harvest: 0,
            pool_mr: None,
            epoll,
            notify,
            incoming: receiver,
            accepting: true,
            sessions: Vec::new(),
            session_count: sessions,
            generations: 0,
            pending: Tags::default(),
            ready: VecDeque::new(),
            stores,
            fences,
            heat,
            node: node.to_string(),
            max_payload,
            wcs: Vec::with_capacity(256),
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 64],
        };
        source
            .watch(source.notify.as_raw_fd(), NOTIFY_KEY)
            .map_err(io_error("watching an eventfd"))?;
        tracing::info!(
            worker,
            device = source.device.name(),
            gid_index = source.device.gid_index(),
            "RDMA ready"
        );
        Ok((acceptor, source))
    }

    fn watch(&self, fd: RawFd, key: u64) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: key,
        };
        // SAFETY: registers `fd` in our epoll set; `event` is read during the call only.
        let result =
            unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn adopt(&mut self, session: Session) {
        let peer = session.peer.expect("handed over with its peer");
        let slot = match self.sessions.iter().position(Option::is_none) {
            Some(slot) => slot,
            None => {
                self.sessions.push(None);
                self.sessions.len() - 1
            }
        };
        let stream = session
            .stream
            .as_ref()
            .expect("handed over with its stream");
        if let Err(error) = stream
            .set_nonblocking(true)
            .and_then(|()| self.watch(stream.as_raw_fd(), slot as u64))
        {
            tracing::warn!(%peer, %error, "cannot watch an RDMA side channel: session dropped");
            self.session_count.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        self.generations = self.generations.wrapping_add(1);
        let generation = self.generations;
        let sends = 2 * session.credits as usize;
        let qp_num = {
            use sideway::ibverbs::queue_pair::QueuePair as _;
            session.qp.qp_number()
        };
        let live = Live {
            generation,
            qp_num,
            free_sends: (0..sends as u16).rev().collect(),
            send_leases: (0..sends).map(|_| None).collect(),
            send_posted: vec![false; sends],
            sends_posted: 0,
            backlog: VecDeque::new(),
            in_flight: 0,
            closing: false,
            broken: None,
            session,
        };
        tracing::info!(%peer, slot, qp_num, credits = live.session.credits, "RDMA session started");
        self.sessions[slot] = Some(live);
    }

    /// Reads the side channels that epoll reported and clears the new-session signal.
    /// Returns how many events there were.
    fn harvest(&mut self) -> usize {
        self.polls_since_harvest = 0;
        self.harvest_due = false;
        let mut to_act_on = 0;
        loop {
            // SAFETY: epoll_wait writes at most `events.len()` entries into our vector.
            let count = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    self.events.as_mut_ptr(),
                    self.events.len() as i32,
                    0,
                )
            };
            if count <= 0 {
                return to_act_on;
            }
            for index in 0..count as usize {
                match self.events[index].u64 {
                    NOTIFY_KEY => {
                        self.notify.clear();
                        to_act_on += 1;
                    }
                    slot => {
                        if let Some(Some(live)) = self.sessions.get_mut(slot as usize) {
                            read_side_channel(live);
                            to_act_on += 1;
                        }
                    }
                }
            }
            if (count as usize) < self.events.len() {
                return to_act_on;
            }
        }
    }

    /// Handles what both completion queues hold now, up to `rounds` batches each; returns
    /// how many receives there were (the requests: sends only free slots and buffers).
    fn drain_completions(&mut self, rounds: usize) -> usize {
        let sent = self.drain(true, rounds);
        if sent > 0 {
            self.send_armed = false;
        }
        let received = self.drain(false, rounds);
        if received > 0 {
            self.armed = false;
        }
        received
    }

    /// Handles what one completion queue holds now, up to `rounds` batches.
    fn drain(&mut self, sends: bool, rounds: usize) -> usize {
        let mut wcs = std::mem::take(&mut self.wcs);
        let mut total = 0;
        for _ in 0..rounds {
            let queue = if sends {
                &mut self.send_completions
            } else {
                &mut self.completions
            };
            let got = match queue.poll(&mut wcs) {
                Ok(got) => got,
                Err(error) => {
                    tracing::error!(%error, sends, "polling an RDMA completion queue failed");
                    0
                }
            };
            for wc in wcs.drain(..) {
                self.handle(wc);
            }
            total += got;
            if got == 0 {
                break;
            }
        }
        self.wcs = wcs;
        total
    }

    /// Whether a send's completion is awaited: a reply waits for a send slot, or a session
    /// that ends waits for its last sends. Otherwise a sleeping worker leaves them to its
    /// next wake, holding their slots and pool buffers until then.
    fn waits_on_sends(&self) -> bool {
        self.sessions.iter().flatten().any(|live| {
            !live.backlog.is_empty()
                || (live.sends_posted > 0 && (live.closing || live.broken.is_some()))
        })
    }

    /// Arms the receive or the send completion queue.
    fn arm(&mut self, sends: bool) {
        let armed = if sends {
            // Arming reads the channel's event.
            self.send_event = false;
            self.send_completions.arm()
        } else {
            self.completions.arm()
        };
        match armed {
            Ok(()) => {
                if sends {
                    self.send_armed = true;
                } else {
                    self.armed = true;
                }
                if std::mem::take(&mut self.arming_failed) {
                    tracing::info!("arming the RDMA completion queues works again");
                }
            }
            // Unarmed, completions wake nobody: they wait for the worker's next wake (its
            // sleep's timeout, a drive's completion, another source's event). Spinning here
            // instead would burn the core on a broken device.
            Err(error) => {
                if !std::mem::replace(&mut self.arming_failed, true) {
                    tracing::warn!(
                        %error,
                        sends,
                        "arming an RDMA completion queue failed: until it works again, \
                         RDMA requests wait for the worker to wake for something else"
                    );
                }
            }
        }
    }

    fn session_of(&self, qp_num: u32) -> Option<usize> {
        self.sessions
            .iter()
            .position(|live| live.as_ref().is_some_and(|live| live.qp_num == qp_num))
    }

    fn adopt_new(&mut self) {
        loop {
            match self.incoming.try_recv() {
                Ok(session) => self.adopt(session),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    self.accepting = false;
                    return;
                }
            }
        }
    }

    fn handle(&mut self, wc: WorkCompletion) {
        let is_recv = wc.wr_id & RECV_BIT != 0;
        let index = (wc.wr_id & 0xFFFF) as usize;
        let mut slot = self.session_of(wc.qp_num);
        if slot.is_none() && self.accepting {
            // The session was handed over after this poll looked at the inbox, but before
            // its Welcome went out: it is there now.
            self.adopt_new();
            slot = self.session_of(wc.qp_num);
        }
        let Some(slot) = slot else {
            return; // A session that is gone (its flushed work requests).
        };
        let live = self.sessions[slot].as_mut().expect("found");
        if !is_recv
            && let Some(posted) = live.send_posted.get_mut(index)
            && std::mem::take(posted)
        {
            live.sends_posted -= 1;
            live.send_leases[index] = None;
            live.free_sends.push(index as u16);
        }
        if !wc.ok() {
            if live.broken.is_none() {
                let peer = live.session.peer.expect("adopted with its peer");
                tracing::warn!(%peer, status = wc.status_text(), "RDMA session failed");
                break_session(live);
            }
            return;
        }
        if is_recv {
            self.receive(slot, index, wc.byte_len as usize);
        } else {
            flush_backlog(live, &self.pool_mr);
        }
    }

    /// One request arrived in receive slot `index` of session `slot`.
    fn receive(&mut self, slot: usize, index: usize, len: usize) {
        let live = self.sessions[slot].as_mut().expect("checked by the caller");
        let base = live.session.slab.as_ptr() as u64 + (index * MESSAGE_SLOT) as u64;
        let parsed = parse_request(&live.session.slab[index * MESSAGE_SLOT..][..len]);
        // The slot is free again as soon as the request is parsed.
        let repost = verbs::post_recv(
            &mut live.session.qp,
            recv_wr_id(index as u16),
            live.session.slab_mr.lkey(),
            base,
            MESSAGE_SLOT as u32,
        );
        if let Err(error) = repost {
            tracing::warn!(%error, "re-posting a receive failed");
            break_session(live);
            return;
        }
        if live.closing {
            return;
        }
        let (request_id, message) = match parsed {
            Ok(parsed) => parsed,
            Err((request_id, error)) => {
                let peer = live.session.peer.expect("adopted with its peer");
                tracing::warn!(%peer, %error, "malformed RDMA request: closing the session");
                let text = format!("{}: {error}", self.node);
                reply(
                    live,
                    &self.pool_mr,
                    request_id,
                    error_reply(libc::EPROTO, text),
                );
                live.closing = true;
                return;
            }
        };
        let (op, addr, rkey) = match request(&self.fences, self.max_payload, &message) {
            Ok(request) => request,
            Err((errno, text)) => {
                let text = format!("{}: {text}", self.node);
                reply(live, &self.pool_mr, request_id, error_reply(errno, text));
                return;
            }
        };
        let drive = match &op {
            Op::Read { chunk, .. } | Op::Delete { chunk } => locate(&self.stores, *chunk),
            Op::Write { .. } => unreachable!("requests over RDMA never write"),
        };
        let drive = match drive {
            Ok(drive) => drive,
            Err((errno, text)) => {
                let text = format!("{}: {text}", self.node);
                reply(live, &self.pool_mr, request_id, error_reply(errno, text));
                return;
            }
        };
        if let Op::Read { chunk, len, .. } = &op {
            self.heat.record(*chunk, u64::from(*len));
        }
        live.in_flight += 1;
        let pending = Pending {
            slot,
            generation: live.generation,
            request_id,
            addr,
            rkey,
        };
        let tag = self.pending.insert(pending);
        self.ready.push_back((tag, drive, op));
    }
}

/// What a request frame asks, with the client's destination for a read. A read at a
/// fenced-off layout version is refused (`ESTALE`) before anything else is looked at.
fn request(
    fences: &FenceTable,
    max_payload: u32,
    message: &Message,
) -> Result<(Op, u64, u32), (i32, String)> {
    match message {
        Message::RdmaRead(read) => {
            fences
                .check(read.layout)
                .map_err(|stale| (libc::ESTALE, stale.to_string()))?;
            if read.len > max_payload {
                return Err((
                    libc::EINVAL,
                    format!(
                        "read of {} bytes exceeds the {}-byte limit",
                        read.len, max_payload
                    ),
                ));
            }
            Ok((
                Op::Read {
                    chunk: read.chunk,
                    offset: read.offset,
                    len: read.len,
                    // The client checks the bytes against RdmaReadDone's CRC (W9).
                    check: ReadCheck::Reader,
                },
                read.addr,
                read.rkey,
            ))
        }
        Message::Delete(delete) => Ok((
            Op::Delete {
                chunk: delete.chunk,
            },
            0,
            0,
        )),
        Message::Write(_) => Err((
            libc::EOPNOTSUPP,
            "writes go over TCP; an RDMA session serves reads and deletes".into(),
        )),
        Message::Replicate(_) => Err((
            libc::EOPNOTSUPP,
            "copies are ordered over TCP; an RDMA session serves reads and deletes".into(),
        )),
        other => Err((
            libc::EPROTO,
            format!("{:?} is not a request over RDMA", other.opcode()),
        )),
    }
}

impl RdmaSource {
    /// Ends sessions that are done: their queue pair goes to the error state once nothing of
    /// theirs is in the worker, and they are dropped once its sends are flushed.
    fn reap(&mut self) {
        for slot in 0..self.sessions.len() {
            let Some(live) = self.sessions[slot].as_mut() else {
                continue;
            };
            if !self.accepting {
                live.closing = true;
            }
            if live.in_flight > 0 || (!live.closing && live.broken.is_none()) {
                continue;
            }
            if live.broken.is_none() && live.sends_posted > 0 && live.closing {
                // Let the last replies go out before tearing down.
                continue;
            }
            if live.broken.is_none() {
                break_session(live);
            }
            let flushed = live.sends_posted == 0;
            let overdue = live
                .broken
                .is_some_and(|since| since.elapsed() > FLUSH_GRACE);
            if flushed || overdue {
                let live = self.sessions[slot].take().expect("checked");
                let peer = live.session.peer.expect("adopted with its peer");
                tracing::info!(%peer, "RDMA session ended");
                self.session_count.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

/// Any byte on the side channel breaks the protocol (nothing is sent there once the session
/// is set up); EOF means the client left.
fn read_side_channel(live: &mut Live) {
    let Some(stream) = live.session.stream.as_mut() else {
        return;
    };
    let mut byte = [0u8; 64];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => {
                live.closing = true;
                return;
            }
            Ok(_) => {
                let peer = live.session.peer.expect("adopted with its peer");
                tracing::warn!(%peer, "bytes on an RDMA side channel: closing the session");
                live.closing = true;
                return;
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                live.closing = true;
                return;
            }
        }
    }
}

fn break_session(live: &mut Live) {
    live.closing = true;
    if live.broken.is_none() {
        verbs::disconnect(&mut live.session.qp);
        live.broken = Some(Instant::now());
        live.backlog.clear();
    }
}

/// A request frame from a receive slot: header and body, no payload.
fn parse_request(bytes: &[u8]) -> Result<(u64, Message), (u64, wire::WireError)> {
    let truncated = || (0, wire::WireError::Truncated { len: bytes.len() });
    let head: &[u8; HEADER_SIZE] = bytes
        .get(..HEADER_SIZE)
        .and_then(|head| head.try_into().ok())
        .ok_or_else(truncated)?;
    let header = Header::decode(head, 0).map_err(|error| (0, error))?;
    let body = bytes
        .get(HEADER_SIZE..HEADER_SIZE + header.body_len as usize)
        .ok_or((
            header.request_id,
            wire::WireError::Truncated { len: bytes.len() },
        ))?;
    let message = wire::decode_body(&header, body).map_err(|error| (header.request_id, error))?;
    Ok((header.request_id, message))
}

fn error_reply(errno: i32, mut message: String) -> Reply {
    // The frame must fit one message slot.
    let limit = MESSAGE_SLOT - HEADER_SIZE - 32;
    if message.len() > limit {
        let mut cut = limit;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    Reply::Message(Message::Error(ErrorReply { errno, message }))
}

/// Sends a reply now if a send slot is free, else queues it behind the others.
fn reply(live: &mut Live, pool_mr: &Option<Arc<MemoryRegion>>, request_id: u64, reply: Reply) {
    if live.broken.is_some() {
        return;
    }
    live.backlog.push_back((request_id, reply));
    flush_backlog(live, pool_mr);
}

fn flush_backlog(live: &mut Live, pool_mr: &Option<Arc<MemoryRegion>>) {
    while live.broken.is_none() && !live.backlog.is_empty() {
        let Some(index) = live.free_sends.pop() else {
            return;
        };
        let (request_id, reply) = live.backlog.pop_front().expect("not empty");
        let credits = live.session.credits as usize;
        let offset = (credits + usize::from(index)) * MESSAGE_SLOT;
        let message_addr = live.session.slab.as_ptr() as u64 + offset as u64;
        let (message, data) = match reply {
            Reply::Read {
                lease,
                crc,
                addr,
                rkey,
            } => {
                let done = Message::RdmaReadDone(RdmaReadDone {
                    len: lease.len() as u32,
                    crc,
                });
                (done, Some((lease, addr, rkey)))
            }
            Reply::Message(message) => (message, None),
        };
        let slot = &mut live.session.slab[offset..offset + MESSAGE_SLOT];
        let frame_len = match wire::encode_into(request_id, &message, slot) {
            Ok(len) => len as u32,
            Err(error) => {
                tracing::error!(%error, "RDMA reply does not fit a message slot");
                live.free_sends.push(index);
                continue;
            }
        };
        let lkey = live.session.slab_mr.lkey();
        let wr_id = send_wr_id(index);
        let posted = match data {
            Some((lease, addr, rkey)) => {
                let Some(pool_mr) = pool_mr else {
                    tracing::error!("the buffer pool is not registered with the RDMA device");
                    live.free_sends.push(index);
                    continue;
                };
                let local = (
                    pool_mr.lkey(),
                    lease.as_slice().as_ptr() as u64,
                    lease.len() as u32,
                );
                let result = verbs::post_write_and_send(
                    &mut live.session.qp,
                    wr_id,
                    local,
                    rkey,
                    addr,
                    (lkey, message_addr, frame_len),
                );
                live.send_leases[usize::from(index)] = Some(lease);
                result
            }
            None => verbs::post_send(&mut live.session.qp, wr_id, (lkey, message_addr, frame_len)),
        };
        match posted {
            Ok(()) => {
                live.send_posted[usize::from(index)] = true;
                live.sends_posted += 1;
            }
            Err(error) => {
                tracing::warn!(%error, "posting an RDMA reply failed");
                live.send_leases[usize::from(index)] = None;
                live.free_sends.push(index);
                break_session(live);
            }
        }
    }
}

impl RequestSource for RdmaSource {
    fn poll(&mut self, max: usize, requests: &mut Vec<(u64, usize, Op)>) -> bool {
        if self.accepting {
            self.adopt_new();
        }
        // The epoll set only matters now and then while the worker keeps polling (a session
        // closing, a new one): reading it at every poll was a system call per spin. The
        // completion queue is polled in user space, and armed only before the worker sleeps.
        self.polls_since_harvest += 1;
        if self.harvest_due || self.polls_since_harvest >= HARVEST_EVERY {
            self.harvest();
        }
        self.drain_completions(8);
        let take = max.min(self.ready.len());
        requests.extend(self.ready.drain(..take));
        self.reap();
        self.accepting || self.sessions.iter().any(Option::is_some)
    }

    fn prepare_to_sleep(&mut self) -> bool {
        // Only when the worker saw events there that no poll read yet: any others keep the
        // set readable, so the sleep ends at once and says so. (Reading it before every
        // sleep was a system call per request.)
        let to_act_on = if self.harvest_due { self.harvest() } else { 0 };
        if !self.armed {
            self.arm(false);
        }
        // A send's completion wakes the worker only when something waits on one; else the
        // next request (or anything else) that wakes it reaps it: a read one at a time then
        // wakes an idle worker once, for the request, not twice.
        if !self.send_armed && self.waits_on_sends() {
            self.arm(true);
        } else if std::mem::take(&mut self.send_event) {
            self.send_completions.take_event();
        }
        // Once more after arming: a completion that landed before it raises no event.
        let completed = self.drain_completions(1);
        // What that found may have left a send awaited with its queue unarmed again (not
        // when arming fails: a broken device must not keep the worker spinning).
        let unwatched = !self.send_armed && !self.arming_failed && self.waits_on_sends();
        to_act_on == 0 && completed == 0 && self.ready.is_empty() && !unwatched
    }

    fn complete(&mut self, completion: Completion) {
        let Some(pending) = self.pending.take(completion.tag) else {
            tracing::error!(
                tag = completion.tag,
                "completion for an unknown RDMA request"
            );
            return;
        };
        let Some(live) = self.sessions[pending.slot]
            .as_mut()
            .filter(|live| live.generation == pending.generation)
        else {
            return; // The session ended; the lease goes back to the pool here.
        };
        live.in_flight -= 1;
        let answer = match completion.result {
            Ok(Output::Read { lease, crc }) => Reply::Read {
                lease,
                crc,
                addr: pending.addr,
                rkey: pending.rkey,
            },
            Ok(Output::Deleted) => Reply::Message(Message::DeleteDone),
            Ok(Output::Written) => Reply::Message(Message::WriteDone),
            Err(error) => error_reply(
                error.errno(),
                format!("{}: {}", self.node, crate::error_chain(&error)),
            ),
        };
        reply(live, &self.pool_mr, pending.request_id, answer);
    }

    fn wake_fds(&self) -> &[RawFd] {
        &self.wake
    }

    fn woke(&mut self, woken: Woken) {
        self.harvest_due |= woken.contains(0);
        // The queue raised its event, so it is armed no more.
        if woken.contains(1) {
            self.armed = false;
        }
        if woken.contains(2) {
            self.send_armed = false;
            self.send_event = true;
        }
    }

    unsafe fn register_buffers(&mut self, base: *mut u8, len: usize) -> Result<(), String> {
        // SAFETY: the worker keeps its pool mapped while its sources live.
        let region =
            unsafe { self.device.register(base, len, false) }.map_err(|error| error.to_string())?;
        self.pool_mr = Some(region);
        Ok(())
    }

    fn close(self: Box<Self>) {}
}
