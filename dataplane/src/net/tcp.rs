//! The TCP transport, daemon side: an acceptor thread that authenticates each peer, and one
//! [`TcpSource`] per worker that serves the peer's requests from inside the worker's loop.
//!
//! A connection belongs to one worker for its whole life. The worker reads frames from its
//! non-blocking sockets (an edge-triggered epoll set, which its ring watches while it sleeps),
//! turns them into requests on its own drives, and sends each reply as one vectored write:
//! header and body from a small buffer, chunk bytes straight from the registered pool buffer
//! the drive read into. Nothing on that path crosses a thread. A drive that is a file in
//! memory (tmpfs) has no DMA to read with; a whole-block read from it is answered at once,
//! from a read-only mapping of the drive (`mapped`), without a read into the pool.
//!
//! The same sources serve the node-local Unix socket (when the daemon has one): a client on
//! this node connects there, presents the token the same way, and may then ask for the
//! worker's buffer pool (`LocalAttach`), which comes back as a sealed memfd it maps
//! read-only. Its reads (`LocalRead`) are answered with where the bytes lie in that pool
//! (`LocalReadDone`); the buffer stays held for it until it says `Release`, at most
//! `held_max` at a time. Chunk bytes then cross no socket: the drive reads into the pool, the
//! client copies out once.
//!
//! A `Replicate` (a copy the control plane orders) is the one request a worker does not
//! start on a drive at once: its chunk is fetched from the source daemon on a copy thread
//! (`replicate`), which hands the checked bytes back through the source's eventfd; the worker
//! then stores them exactly as it stores a `Write` and answers `WriteDone`. The poll loop
//! never waits on another daemon.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd as _, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use super::HARVEST_EVERY;
use super::mapped::{MappedMetrics, Payload, mapped_read};
use super::rdma::{RdmaAcceptor, RdmaService, Session};
use super::replicate::{Copier, CopyConfig, CopyError, CopyPermit};
use super::stream::{LocalListener, Peer, Stream, boot_id, unix_peer};
use super::tags::Tags;
use super::wire::{
    self, ErrorReply, HEADER_SIZE, Header, Hello, LayoutRef, LocalEndpoint, LocalPool,
    LocalReadDone, MAX_BODY, Message, Opcode, ReadDone, Welcome,
};
use crate::buffer::BufferLease;
use crate::device::MemoryDrive;
use crate::fence::FenceTable;
use crate::heat::HeatMap;
use crate::store::{ChunkId, ChunkStore};
use crate::worker::{Completion, Op, Output, ReadCheck, RequestSource, SourceFactory, Woken};

/// How a daemon listens.
#[derive(Clone, Debug)]
pub struct TcpServerConfig {
    pub listen: SocketAddr,
    /// The cluster token every peer must present first.
    pub token: Vec<u8>,
    /// This daemon's node name, sent in `Welcome` and used in error messages.
    pub node: String,
    /// Largest payload per frame, both ways.
    pub max_payload: u32,
    /// How long a new peer has to send its `Hello`.
    pub handshake_timeout: Duration,
    /// The node-local socket of the shared-memory fast path.
    pub local_socket: LocalSocket,
    /// Where every read accepted is counted (the rebalancer's input).
    pub heat: Arc<HeatMap>,
    /// How many chunk copies (`Replicate`) run at once, and each one's deadline.
    pub copies: CopyConfig,
}

/// Whether and where a daemon listens for clients on its own node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum LocalSocket {
    /// `@tier0-data-<pid>-<port>` in the abstract namespace.
    #[default]
    Auto,
    /// No local socket: node-local clients use TCP.
    Off,
    /// `@name` (abstract) or a filesystem path.
    Named(String),
}

impl std::str::FromStr for LocalSocket {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(LocalSocket::Auto),
            "off" | "none" => Ok(LocalSocket::Off),
            "" | "@" => Err("a socket path, @name, `auto` or `off`".into()),
            name if name.len() > 100 => Err(format!(
                "{name:?}: longer than a Unix socket address holds (100 bytes)"
            )),
            name => Ok(LocalSocket::Named(name.to_string())),
        }
    }
}

/// The listening side: accepts, authenticates, and deals connections out to the workers.
#[derive(Debug)]
pub struct TcpServer {
    local_addr: SocketAddr,
    local: Option<LocalEndpoint>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

/// What the acceptor hands a worker's sources.
struct Inbox {
    connections: Sender<(Stream, Peer, bool)>,
    notify: Arc<EventFd>,
    /// Sets RDMA sessions up on this worker, when it has a device.
    rdma: Option<Arc<RdmaAcceptor>>,
}

impl TcpServer {
    /// Binds the listener and builds one source per worker (two where the worker has RDMA);
    /// give the factory to the worker pool (`WorkerPoolConfig::sources`). `stores` are the
    /// pool's drives, in its order; every read is checked against `fences` before it goes
    /// to a drive (a stale one is answered `ESTALE`). With `rdma`, a client that asks for
    /// RDMA in its `Hello` gets a queue pair on the worker its connection is dealt to.
    pub fn bind(
        config: TcpServerConfig,
        stores: Vec<Arc<ChunkStore>>,
        mapped: Vec<Option<Arc<MemoryDrive>>>,
        fences: Arc<FenceTable>,
        workers: usize,
        rdma: Option<RdmaService>,
    ) -> io::Result<(TcpServer, SourceFactory)> {
        let listener = TcpListener::bind(config.listen)?;
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;
        let local_listener = match &config.local_socket {
            LocalSocket::Off => None,
            LocalSocket::Auto => Some(LocalListener::bind(&format!(
                "@tier0-data-{}-{}",
                std::process::id(),
                local_addr.port()
            ))?),
            LocalSocket::Named(name) => Some(LocalListener::bind(name)?),
        };
        let local = local_listener.as_ref().map(|listener| LocalEndpoint {
            socket: listener.name.clone(),
            boot_id: boot_id().to_string(),
        });
        let stores: Arc<[Arc<ChunkStore>]> = stores.into();
        let mapped: Arc<[Option<Arc<MemoryDrive>>]> = mapped.into();
        if mapped.len() != stores.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "one mapping entry per store",
            ));
        }
        // One bound on copies for the whole daemon, whichever worker took the request.
        let copier = Arc::new(Copier::new(config.copies, &config.token, &config.node));
        let mut rdma = rdma.map(|service| service.workers).unwrap_or_default();
        let mut inboxes = Vec::new();
        let mut sources = Vec::new();
        for worker in 0..workers.max(1) {
            let (sender, receiver) = crossbeam_channel::unbounded();
            let notify = Arc::new(EventFd::new()?);
            let mut worker_sources: Vec<Box<dyn RequestSource>> = vec![Box::new(TcpSource::new(
                worker,
                receiver,
                notify.clone(),
                stores.clone(),
                mapped.clone(),
                fences.clone(),
                copier.clone(),
                &config,
            )?)];
            let mut acceptor = None;
            if let Some((rdma_acceptor, rdma_source)) = rdma.get_mut(worker).and_then(Option::take)
            {
                acceptor = Some(rdma_acceptor);
                worker_sources.push(Box::new(rdma_source));
            }
            sources.push(worker_sources);
            inboxes.push(Inbox {
                connections: sender,
                notify,
                rdma: acceptor,
            });
        }
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let stop = stop.clone();
            let config = config.clone();
            let local = local.clone();
            std::thread::Builder::new()
                .name("tier0-tcp-accept".into())
                .spawn(move || {
                    accept_loop(listener, local_listener, config, local, inboxes, stop)
                })?
        };
        let sources = Arc::new(Mutex::new(sources));
        let factory: SourceFactory = Arc::new(move |worker: usize| {
            let mut sources = sources
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let count = sources.len();
            std::mem::take(&mut sources[worker % count])
        });
        Ok((
            TcpServer {
                local_addr,
                local,
                stop,
                acceptor: Some(acceptor),
            },
            factory,
        ))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The node-local socket, when the daemon has one.
    pub fn local_endpoint(&self) -> Option<&LocalEndpoint> {
        self.local.as_ref()
    }

    /// Stops accepting; the sources finish once their requests are answered, which lets the
    /// worker pool shut down.
    pub fn shutdown(mut self) {
        self.stop_accepting();
    }

    fn stop_accepting(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop_accepting();
    }
}

fn accept_loop(
    listener: TcpListener,
    local_listener: Option<LocalListener>,
    config: TcpServerConfig,
    local: Option<LocalEndpoint>,
    inboxes: Vec<Inbox>,
    stop: Arc<AtomicBool>,
) {
    let inboxes = Arc::new(inboxes);
    let next = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::SeqCst) {
        let accepted = match listener.accept() {
            Ok((stream, peer)) => Ok((Stream::Tcp(stream), Peer::Tcp(peer))),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                match local_listener.as_ref().map(|local| local.listener.accept()) {
                    Some(Ok((stream, _))) => {
                        let peer = unix_peer(&stream);
                        Ok((Stream::Unix(stream), peer))
                    }
                    Some(Err(error)) if error.kind() != io::ErrorKind::WouldBlock => Err(error),
                    _ => {
                        let mut fds = [listener.as_raw_fd(), -1].map(|fd| libc::pollfd {
                            fd,
                            events: libc::POLLIN,
                            revents: 0,
                        });
                        if let Some(local) = &local_listener {
                            fds[1].fd = local.listener.as_raw_fd();
                        }
                        // SAFETY: polls two pollfds we own (a negative fd is skipped); the
                        // timeout bounds how late `stop` is seen.
                        unsafe { libc::poll(fds.as_mut_ptr(), 2, 100) };
                        continue;
                    }
                }
            }
            Err(error) => Err(error),
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accepting a connection failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        // Each handshake on its own short-lived thread, so a slow or silent peer delays
        // nobody else; it has `handshake_timeout` to present the token.
        let config = config.clone();
        let local = local.clone();
        let inboxes = inboxes.clone();
        let next = next.clone();
        let spawned = std::thread::Builder::new()
            .name("tier0-tcp-hello".into())
            .spawn(move || {
                let index = next.fetch_add(1, Ordering::Relaxed) % inboxes.len();
                let inbox = &inboxes[index];
                let kind = if stream.is_local() {
                    "the local socket"
                } else {
                    "TCP"
                };
                match handshake(stream, peer, &config, local, inbox.rdma.as_deref()) {
                    Ok((client, Some(stream))) => {
                        tracing::info!(%peer, client, worker = index, "peer connected over {kind}");
                        // Another daemon pulling a copy is not a reader: its reads are no heat.
                        let counts_heat = !crate::net::replicate::is_copy_peer(&client);
                        if inbox.connections.send((stream, peer, counts_heat)).is_ok() {
                            inbox.notify.signal();
                        }
                    }
                    Ok((client, None)) => {
                        tracing::info!(%peer, client, worker = index, "peer connected over RDMA");
                    }
                    Err(error) => tracing::warn!(%peer, %error, "peer refused"),
                }
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "no thread for a handshake: connection dropped");
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("reading its hello: {0}")]
    Io(#[from] io::Error),
    #[error("malformed hello: {0}")]
    Wire(#[from] wire::WireError),
    #[error("first frame is {0:?}, not Hello")]
    NotHello(Opcode),
    #[error("wrong cluster token")]
    Token,
}

/// Reads exactly one `Hello` (nothing else is read before its token matched) and answers it.
/// When the client asked for RDMA and this worker has a device, the queue pair is set up and
/// handed to the worker before the `Welcome` goes out, and the stream stays with the session
/// as its side channel (`Ok((client, None))`); otherwise the stream is returned for the TCP
/// source.
fn handshake(
    stream: Stream,
    peer: Peer,
    config: &TcpServerConfig,
    local: Option<LocalEndpoint>,
    rdma: Option<&RdmaAcceptor>,
) -> Result<(String, Option<Stream>), HandshakeError> {
    stream.set_read_timeout(Some(config.handshake_timeout))?;
    stream.set_write_timeout(Some(config.handshake_timeout))?;
    let result = read_hello(&stream, config);
    let mut session: Option<(wire::RdmaEndpoint, Session)> = None;
    if let Ok(Hello {
        rdma: Some(remote),
        client,
        ..
    }) = &result
    {
        // RDMA sessions are negotiated over TCP only.
        let rdma = rdma.filter(|_| !stream.is_local());
        match rdma.map(|acceptor| acceptor.accept(remote)) {
            Some(Ok(accepted)) => session = Some(accepted),
            Some(Err(error)) => {
                tracing::warn!(%peer, client, %error, "RDMA session refused: the peer may stay on TCP")
            }
            None => tracing::info!(%peer, client, "peer asked for RDMA; this worker has none"),
        }
    }
    let reply = match &result {
        Ok(_) => Message::Welcome(Welcome {
            node: config.node.clone(),
            max_payload: config.max_payload,
            rdma: session.as_ref().map(|(local, _)| *local),
            local,
        }),
        Err(error) => Message::Error(ErrorReply {
            errno: match error {
                HandshakeError::Token | HandshakeError::NotHello(_) => libc::EACCES,
                _ => libc::EPROTO,
            },
            message: format!("{}: {error}", config.node),
        }),
    };
    let mut frame = Vec::new();
    let rdma_session = match (session, rdma, &stream, peer) {
        (Some((_, session)), Some(acceptor), Stream::Tcp(tcp), Peer::Tcp(addr)) => {
            acceptor.hand_over(session, tcp.try_clone()?, addr);
            true
        }
        _ => false,
    };
    let mut stream = &stream;
    if wire::encode(0, &reply, &mut frame).is_ok() {
        stream.write_all(&frame)?;
    }
    if result.is_err() {
        // Close gently: closing with unread input would reset the connection and could
        // destroy the refusal before the peer reads it. What is drained is discarded unread.
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
        let _ = io::copy(&mut stream.take(1 << 20), &mut io::sink());
    }
    let client = result?.client;
    if rdma_session {
        return Ok((client, None));
    }
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    stream.set_nodelay()?;
    stream.set_nonblocking(true)?;
    Ok((client, Some(stream.try_clone()?)))
}

fn read_hello(mut stream: &Stream, config: &TcpServerConfig) -> Result<Hello, HandshakeError> {
    let mut head = [0; HEADER_SIZE];
    stream.read_exact(&mut head)?;
    let header = Header::decode(&head, 0)?;
    if header.opcode != Opcode::Hello {
        return Err(HandshakeError::NotHello(header.opcode));
    }
    let mut body = vec![0; header.body_len as usize];
    stream.read_exact(&mut body)?;
    let Message::Hello(hello) = wire::decode_body(&header, &body)? else {
        return Err(HandshakeError::NotHello(header.opcode));
    };
    if !constant_time_eq::constant_time_eq(&hello.token, &config.token) {
        return Err(HandshakeError::Token);
    }
    Ok(hello)
}

/// A non-blocking eventfd: the acceptor's "new connection" signal to a source.
#[derive(Debug)]
pub(crate) struct EventFd(OwnedFd);

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl EventFd {
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes two integers and returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub(crate) fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from `one` to our eventfd.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    pub(crate) fn clear(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads at most 8 bytes into `value`; non-blocking.
        unsafe { libc::read(self.0.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
    }
}

/// Epoll key of the new-connection eventfd; connections use their slot index.
const NOTIFY_KEY: u64 = u64::MAX;
/// Bytes read from one socket per poll before the others get a turn.
const READ_BUDGET: usize = 1 << 20;

/// One reply waiting to be sent: header and body, then the payload, if any.
struct Outgoing {
    head: Vec<u8>,
    payload: Option<Payload>,
    sent: usize,
    /// The worker's pool memfd goes with this reply's first byte (`LocalPool`).
    attach: Option<OwnedFd>,
}

impl Outgoing {
    fn len(&self) -> usize {
        self.head.len() + self.payload.as_ref().map_or(0, Payload::len)
    }
}

/// Replies queued on one connection at most before its next requests wait: replies from a
/// mapped drive are queued as soon as they are parsed, and a peer that sends reads without taking their
/// replies must not grow the queue without end.
const MAX_QUEUED_REPLIES: usize = 64;

struct Connection {
    stream: Stream,
    peer: Peer,
    /// Distinguishes this connection from earlier ones in the same slot, so a late completion
    /// never reaches the wrong peer.
    generation: u64,
    /// Received bytes not yet parsed into frames.
    input: Vec<u8>,
    /// The socket may hold more bytes (edge-triggered: we must read until EAGAIN).
    readable: bool,
    /// The last send found the socket full (set only on EAGAIN, so true means output is
    /// queued or the connection is broken): nothing is tried again until its EPOLLOUT edge,
    /// rather than a failed send per new reply. The edge comes because the EAGAIN itself arms
    /// the socket's write-space wake-up (TCP and Unix stream sockets alike).
    send_blocked: bool,
    output: VecDeque<Outgoing>,
    /// Header buffers of sent replies, reused so a reply allocates nothing.
    spare_heads: Vec<Vec<u8>>,
    in_flight: usize,
    /// No more requests from this peer (EOF, error, or a malformed frame): closed once its
    /// replies are sent.
    done_reading: bool,
    broken: bool,
    /// Pool buffers a node-local client holds (answered, not yet released), once it
    /// attached to the pool.
    held: Option<Held>,
    /// Its reads count as heat: false for a daemon pulling a copy (`replicate::is_copy_peer`),
    /// whose reads would otherwise make every chunk the rebalancer moves look hot.
    counts_heat: bool,
}

/// The buffers a node-local client holds, by lease id.
#[derive(Default)]
struct Held {
    leases: Vec<Option<BufferLease>>,
    free: Vec<u32>,
    /// Held plus local reads in flight: never more than the pool's `held_max`.
    count: usize,
}

impl Held {
    fn insert(&mut self, lease: BufferLease) -> u32 {
        match self.free.pop() {
            Some(id) => {
                self.leases[id as usize] = Some(lease);
                id
            }
            None => {
                self.leases.push(Some(lease));
                (self.leases.len() - 1) as u32
            }
        }
    }

    fn release(&mut self, id: u32) -> bool {
        match self.leases.get_mut(id as usize).and_then(Option::take) {
            Some(lease) => {
                drop(lease);
                self.free.push(id);
                self.count -= 1;
                true
            }
            None => false,
        }
    }
}

/// A request in the worker: which connection and which of its request ids.
struct Pending {
    connection: usize,
    generation: u64,
    request_id: u64,
    /// A `LocalRead`: answered with where its bytes lie in the shared pool.
    local: bool,
    /// A `Replicate`: its place under the daemon's bound on copies, held (never read) until
    /// its reply: dropping the request frees it.
    _copy: Option<CopyPermit>,
}

impl Pending {
    /// The connection the request came on, unless it has gone (its slot may hold a newer one).
    fn connection_in<'a>(
        &self,
        connections: &'a mut [Option<Connection>],
    ) -> Option<&'a mut Connection> {
        connections[self.connection]
            .as_mut()
            .filter(|connection| connection.generation == self.generation)
    }
}

/// A copy's fetch, done: the bytes to store under `tag` (a [`Pending`]), or why not.
struct Fetched {
    tag: u64,
    chunk: ChunkId,
    result: Result<Vec<u8>, CopyError>,
}

/// The worker's buffer pool as node-local clients get it.
struct SharedPool {
    memfd: OwnedFd,
    len: u64,
    held_max: u32,
    /// Connections attached at once at most: an idle one may keep one buffer (its last
    /// read's, until its next request), so together they never pin more than a quarter of
    /// the pool.
    attached_max: usize,
}

/// The TCP connections one worker serves, as a [`RequestSource`].
pub struct TcpSource {
    epoll: OwnedFd,
    notify: Arc<EventFd>,
    incoming: Receiver<(Stream, Peer, bool)>,
    pool: Option<SharedPool>,
    /// Connections attached to the pool now (kept as they attach and leave, not counted per
    /// poll).
    attached: usize,
    accepting: bool,
    connections: Vec<Option<Connection>>,
    generations: u64,
    pending: Tags<Pending>,
    stores: Arc<[Arc<ChunkStore>]>,
    /// Per drive, in the stores' order: its mapping, when it is memory-backed (and mapping is on).
    mapped: Arc<[Option<Arc<MemoryDrive>>]>,
    mapped_reads: MappedMetrics,
    fences: Arc<FenceTable>,
    heat: Arc<HeatMap>,
    node: String,
    max_payload: u32,
    events: Vec<libc::epoll_event>,
    /// Polls since the epoll set was last read.
    polls_since_harvest: u32,
    /// The worker saw the epoll set readable: read it at the next look.
    harvest_due: bool,
    /// The epoll set's fd, the worker's to watch.
    wake: [RawFd; 1],
    /// The daemon's copies (`Replicate`), shared by every worker's source.
    copier: Arc<Copier>,
    /// Copy threads hand their fetches back here (and ring `notify`).
    fetched_sender: Sender<Fetched>,
    fetched: Receiver<Fetched>,
    /// Fetches back, waiting for room in the worker.
    ready_copies: VecDeque<Fetched>,
}

impl std::fmt::Debug for TcpSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpSource")
            .field("connections", &self.connections.iter().flatten().count())
            .field("node", &self.node)
            .finish()
    }
}

impl TcpSource {
    #[allow(clippy::too_many_arguments)]
    fn new(
        worker: usize,
        incoming: Receiver<(Stream, Peer, bool)>,
        notify: Arc<EventFd>,
        stores: Arc<[Arc<ChunkStore>]>,
        mapped: Arc<[Option<Arc<MemoryDrive>>]>,
        fences: Arc<FenceTable>,
        copier: Arc<Copier>,
        config: &TcpServerConfig,
    ) -> io::Result<Self> {
        // SAFETY: epoll_create1 takes a flag and returns a new fd or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        let wake = [epoll.as_raw_fd()];
        let (fetched_sender, fetched) = crossbeam_channel::unbounded();
        let source = TcpSource {
            epoll,
            notify,
            incoming,
            pool: None,
            attached: 0,
            accepting: true,
            connections: Vec::new(),
            generations: 0,
            pending: Tags::default(),
            stores,
            mapped,
            mapped_reads: MappedMetrics::new(worker),
            fences,
            heat: config.heat.clone(),
            node: config.node.clone(),
            max_payload: config.max_payload,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 64],
            polls_since_harvest: 0,
            harvest_due: false,
            wake,
            copier,
            fetched_sender,
            fetched,
            ready_copies: VecDeque::new(),
        };
        source.watch(
            source.notify.0.as_raw_fd(),
            libc::EPOLLIN | libc::EPOLLET,
            NOTIFY_KEY,
        )?;
        Ok(source)
    }

    fn watch(&self, fd: RawFd, events: i32, key: u64) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: events as u32,
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

    fn adopt(&mut self, stream: Stream, peer: Peer, counts_heat: bool) {
        let slot = match self.connections.iter().position(Option::is_none) {
            Some(slot) => slot,
            None => {
                self.connections.push(None);
                self.connections.len() - 1
            }
        };
        let events = libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET;
        if let Err(error) = self.watch(stream.as_raw_fd(), events, slot as u64) {
            tracing::warn!(%peer, %error, "cannot watch a connection: dropped");
            return;
        }
        self.generations += 1;
        self.connections[slot] = Some(Connection {
            stream,
            peer,
            generation: self.generations,
            input: Vec::with_capacity(HEADER_SIZE + MAX_BODY as usize),
            readable: true,
            send_blocked: false,
            output: VecDeque::new(),
            spare_heads: Vec::new(),
            in_flight: 0,
            done_reading: false,
            broken: false,
            held: None,
            counts_heat,
        });
    }

    /// Takes what epoll has seen since the last look (edge-triggered: each readiness once).
    /// Returns how many events there were.
    fn harvest(&mut self) -> usize {
        self.polls_since_harvest = 0;
        self.harvest_due = false;
        let mut seen = 0;
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
                return seen;
            }
            seen += count as usize;
            for index in 0..count as usize {
                let event = self.events[index];
                let key = event.u64;
                if key == NOTIFY_KEY {
                    self.notify.clear();
                    continue;
                }
                if let Some(Some(connection)) = self.connections.get_mut(key as usize) {
                    if event.events
                        & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR)
                            as u32
                        != 0
                    {
                        connection.readable = true;
                    }
                    if event.events & libc::EPOLLOUT as u32 != 0 {
                        connection.send_blocked = false;
                        flush(connection);
                    }
                }
            }
            if (count as usize) < self.events.len() {
                return seen;
            }
        }
    }

    /// Reads and parses one connection's frames into requests, at most `max`.
    fn serve(&mut self, slot: usize, max: usize, requests: &mut Vec<(u64, usize, Op)>) {
        let Some(connection) = self.connections[slot].as_mut() else {
            return;
        };
        // While its replies pile up, a peer's bytes stay in its socket: its sends then block,
        // rather than its requests growing here.
        if connection.readable
            && !connection.done_reading
            && connection.output.len() < MAX_QUEUED_REPLIES
        {
            read_some(connection);
        }
        // Frames are parsed in place; the parsed bytes leave the buffer once, at the end.
        let mut parsed = 0;
        while requests.len() < max
            && !connection.broken
            && connection.output.len() < MAX_QUEUED_REPLIES
        {
            let (header, message, len) =
                match next_frame(&connection.input[parsed..], self.max_payload) {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err((request_id, error)) => {
                        tracing::warn!(peer = %connection.peer, %error, "malformed frame: closing");
                        let message = format!("{}: {error}", self.node);
                        reply_error(connection, request_id, libc::EPROTO, message);
                        connection.done_reading = true;
                        parsed = connection.input.len();
                        break;
                    }
                };
            let payload_start = parsed + len - header.payload_len as usize;
            parsed += len;
            let local =
                match local_frame(connection, self.pool.as_ref(), &mut self.attached, &message) {
                    LocalFrame::Done => continue,
                    LocalFrame::Refused(errno, text) => {
                        let message = format!("{}: {text}", self.node);
                        reply_error(connection, header.request_id, errno, message);
                        if errno == libc::EPROTO {
                            connection.done_reading = true;
                            parsed = connection.input.len();
                            break;
                        }
                        continue;
                    }
                    LocalFrame::Read => true,
                    LocalFrame::NotLocal => false,
                };
            if let Message::Replicate(replicate) = message {
                let admitted = admit_copy(&self.stores, &self.copier, self.max_payload, &replicate);
                let permit = match admitted {
                    Ok(permit) => permit,
                    Err((errno, text)) => {
                        let message = format!("{}: {text}", self.node);
                        reply_error(connection, header.request_id, errno, message);
                        continue;
                    }
                };
                let tag = self.pending.insert(Pending {
                    connection: slot,
                    generation: connection.generation,
                    request_id: header.request_id,
                    local: false,
                    _copy: Some(permit),
                });
                let sender = self.fetched_sender.clone();
                let notify = self.notify.clone();
                let chunk = replicate.chunk;
                let spawned =
                    self.copier
                        .spawn(chunk, replicate.len, replicate.source, move |result| {
                            // A source that is gone (the daemon stopping) no longer wants it.
                            if sender.send(Fetched { tag, chunk, result }).is_ok() {
                                notify.signal();
                            }
                        });
                match spawned {
                    Ok(()) => connection.in_flight += 1,
                    Err(error) => {
                        drop(self.pending.take(tag));
                        let message = format!("{}: no thread for the copy: {error}", self.node);
                        reply_error(connection, header.request_id, libc::EBUSY, message);
                    }
                }
                continue;
            }
            let payload = &connection.input[payload_start..][..header.payload_len as usize];
            match request(
                &self.stores,
                &self.fences,
                self.max_payload,
                &message,
                payload,
            ) {
                Ok((drive, op)) => {
                    if let Op::Read { chunk, len, .. } = &op
                        && connection.counts_heat
                    {
                        self.heat.record(*chunk, u64::from(*len));
                    }
                    if !local
                        && let Op::Read {
                            chunk, offset, len, ..
                        } = &op
                        && let Some(drive_map) = &self.mapped[drive]
                        && let Some((range, crc)) =
                            mapped_read(&self.stores[drive], drive_map, *chunk, *offset, *len)
                    {
                        self.mapped_reads.reads.increment(1);
                        self.mapped_reads.bytes.increment(u64::from(*len));
                        let done = Message::ReadDone(ReadDone { len: *len, crc });
                        queue(
                            connection,
                            header.request_id,
                            &done,
                            Some(Payload::Mapped(range)),
                        );
                        continue;
                    }
                    connection.in_flight += 1;
                    if local && let Some(held) = connection.held.as_mut() {
                        held.count += 1;
                    }
                    let pending = Pending {
                        connection: slot,
                        generation: connection.generation,
                        request_id: header.request_id,
                        local,
                        _copy: None,
                    };
                    let tag = self.pending.insert(pending);
                    requests.push((tag, drive, op));
                }
                Err((errno, text)) => {
                    let message = format!("{}: {text}", self.node);
                    reply_error(connection, header.request_id, errno, message);
                }
            }
        }
        connection.input.drain(..parsed);
    }

    /// Turns the copies fetched since the last poll into writes on the drives, at most
    /// `max`; a failed fetch is answered here.
    fn store_copies(&mut self, max: usize, requests: &mut Vec<(u64, usize, Op)>) {
        self.ready_copies.extend(self.fetched.try_iter());
        let start = requests.len();
        while requests.len() - start < max
            && let Some(fetched) = self.ready_copies.pop_front()
        {
            let Some(pending) = self.pending.get(fetched.tag) else {
                continue;
            };
            let request_id = pending.request_id;
            let Some(connection) = pending.connection_in(&mut self.connections) else {
                drop(self.pending.take(fetched.tag));
                continue;
            };
            if connection.broken || connection.done_reading {
                // The requester hung up (or the daemon is stopping): it cannot learn of the
                // copy, so no record would ever name it, nor trash delete it. Stored, it would
                // be an orphan; it is dropped instead, and the connection may close.
                connection.in_flight -= 1;
                drop(self.pending.take(fetched.tag));
                continue;
            }
            let written = fetched
                .result
                .map_err(|error| (error.errno, error.message))
                .and_then(|data| {
                    let drive = write_drive(&self.stores, fetched.chunk)?;
                    Ok((
                        drive,
                        Op::Write {
                            chunk: fetched.chunk,
                            data,
                        },
                    ))
                });
            match written {
                // Answered by `complete` as a client's write is: WriteDone, or the error.
                Ok((drive, op)) => requests.push((fetched.tag, drive, op)),
                Err((errno, text)) => {
                    drop(self.pending.take(fetched.tag));
                    connection.in_flight -= 1;
                    let message = format!("{}: {text}", self.node);
                    reply_error(connection, request_id, errno, message);
                }
            }
        }
    }

    /// Drops connections that are finished: nothing more to read, nothing in flight, every
    /// reply sent (or the socket broken).
    fn reap_connections(&mut self) {
        for slot in 0..self.connections.len() {
            let max_payload = self.max_payload;
            let finished = self.connections[slot].as_ref().is_some_and(|connection| {
                connection.in_flight == 0
                    && (connection.broken
                        || (connection.done_reading
                            && connection.output.is_empty()
                            && !frame_ready(&connection.input, max_payload)))
            });
            if finished {
                let connection = self.connections[slot].take().expect("checked");
                if connection.held.is_some() {
                    self.attached -= 1;
                }
                tracing::info!(peer = %connection.peer, "peer disconnected");
                // Dropping the stream closes it, which also takes it out of the epoll set.
            }
        }
    }
}

/// What a request frame asks of which drive, or the errno and text of a refusal. A read at
/// a fenced-off layout version is refused (`ESTALE`) before anything else is looked at.
fn request(
    stores: &[Arc<ChunkStore>],
    fences: &FenceTable,
    max_payload: u32,
    message: &Message,
    payload: &[u8],
) -> Result<(usize, Op), (i32, String)> {
    let read = |chunk: ChunkId, offset: u64, len: u32, layout: LayoutRef| {
        fences
            .check(layout)
            .map_err(|stale| (libc::ESTALE, stale.to_string()))?;
        if len > max_payload {
            return Err((
                libc::EINVAL,
                format!("read of {len} bytes exceeds the {max_payload}-byte frame limit"),
            ));
        }
        let drive = locate(stores, chunk)?;
        Ok((
            drive,
            Op::Read {
                chunk,
                offset,
                len,
                // The client checks the bytes against ReadDone's CRC (W3).
                check: ReadCheck::Reader,
            },
        ))
    };
    match message {
        Message::Read(r) => read(r.chunk, r.offset, r.len, r.layout),
        Message::LocalRead(r) => read(r.chunk, r.offset, r.len, r.layout),
        Message::Write(write) => {
            wire::check_payload(write.crc, payload)
                .map_err(|error| (libc::EBADMSG, error.to_string()))?;
            Ok((
                write_drive(stores, write.chunk)?,
                Op::Write {
                    chunk: write.chunk,
                    data: payload.to_vec(),
                },
            ))
        }
        Message::Delete(delete) => Ok((
            locate(stores, delete.chunk)?,
            Op::Delete {
                chunk: delete.chunk,
            },
        )),
        other => Err((
            libc::EPROTO,
            format!("{:?} is not a request", other.opcode()),
        )),
    }
}

/// The drive that takes a new chunk: the one with the most free slots; `EEXIST` when the
/// chunk is here already (chunks are immutable).
fn write_drive(stores: &[Arc<ChunkStore>], chunk: ChunkId) -> Result<usize, (i32, String)> {
    if stores.iter().any(|store| store.lookup(chunk).is_some()) {
        return Err((
            libc::EEXIST,
            format!("chunk {chunk} already exists (chunks are immutable)"),
        ));
    }
    (0..stores.len())
        .max_by_key(|&drive| stores[drive].free_slots())
        .ok_or((libc::ENOSPC, "this daemon has no drives".to_string()))
}

/// Whether a `Replicate` may start: a sane length and address, a chunk not here yet, room
/// under the daemon's bound on copies (checked last, so a refused copy takes no place).
fn admit_copy(
    stores: &[Arc<ChunkStore>],
    copier: &Copier,
    max_payload: u32,
    replicate: &wire::Replicate,
) -> Result<CopyPermit, (i32, String)> {
    if stores
        .iter()
        .any(|store| store.lookup(replicate.chunk).is_some())
    {
        return Err((
            libc::EEXIST,
            format!("chunk {} is here already", replicate.chunk),
        ));
    }
    copier
        .admit(
            replicate.chunk,
            replicate.len,
            &replicate.source,
            max_payload,
        )
        .map_err(|(errno, text)| (errno, format!("chunk {}: {text}", replicate.chunk)))
}

/// What the local fast path made of a frame.
enum LocalFrame {
    /// Not one of its frames.
    NotLocal,
    /// A `LocalRead` within the client's allowance: served as a read.
    Read,
    /// Handled (attach answered, leases released).
    Done,
    /// Refused with this errno and text; `EPROTO` also ends the connection.
    Refused(i32, String),
}

/// Handles the local fast path's frames that never reach a drive (`LocalAttach`, `Release`)
/// and checks a `LocalRead` against the client's allowance.
fn local_frame(
    connection: &mut Connection,
    pool: Option<&SharedPool>,
    attached: &mut usize,
    message: &Message,
) -> LocalFrame {
    let (held_max, held) = match (pool, connection.held.as_mut()) {
        (Some(pool), Some(held)) => (pool.held_max, Some(held)),
        _ => (0, None),
    };
    match message {
        Message::LocalAttach => {
            if !connection.stream.is_local() {
                return LocalFrame::Refused(
                    libc::EPROTO,
                    "LocalAttach over TCP: the pool is shared over the node-local socket only"
                        .into(),
                );
            }
            let Some(pool) = pool else {
                return LocalFrame::Refused(
                    libc::EOPNOTSUPP,
                    "this worker's buffer pool cannot be shared (anonymous memory)".into(),
                );
            };
            if connection.held.is_some() {
                return LocalFrame::Refused(libc::EPROTO, "LocalAttach sent twice".into());
            }
            if *attached >= pool.attached_max {
                return LocalFrame::Refused(
                    libc::EBUSY,
                    format!(
                        "{} local clients share this worker's pool already: use TCP",
                        pool.attached_max
                    ),
                );
            }
            *attached += 1;
            let memfd = match pool.memfd.try_clone() {
                Ok(fd) => fd,
                Err(error) => {
                    return LocalFrame::Refused(
                        libc::EMFILE,
                        format!("duplicating the pool fd: {error}"),
                    );
                }
            };
            connection.held = Some(Held::default());
            let reply = Message::LocalPool(LocalPool {
                len: pool.len,
                held_max: pool.held_max,
            });
            // `request_id` 0: the attach is answered before any read on this connection.
            queue_with(connection, 0, &reply, None, Some(memfd));
            LocalFrame::Done
        }
        Message::LocalRead(_) => match held {
            None => LocalFrame::Refused(
                libc::EPROTO,
                "LocalRead before LocalAttach: no shared pool on this connection".into(),
            ),
            Some(held) if held.count >= held_max as usize => LocalFrame::Refused(
                libc::EBUSY,
                format!("{held_max} buffers are held already: release some first"),
            ),
            Some(_) => LocalFrame::Read,
        },
        Message::Release(release) => {
            let Some(held) = held else {
                return LocalFrame::Refused(libc::EPROTO, "Release before LocalAttach".into());
            };
            for &id in &release.leases {
                if !held.release(id) {
                    return LocalFrame::Refused(
                        libc::EPROTO,
                        format!("Release of lease {id}, which this connection does not hold"),
                    );
                }
            }
            LocalFrame::Done
        }
        _ => LocalFrame::NotLocal,
    }
}

pub(crate) fn locate(stores: &[Arc<ChunkStore>], chunk: ChunkId) -> Result<usize, (i32, String)> {
    stores
        .iter()
        .position(|store| store.lookup(chunk).is_some())
        .ok_or_else(|| (libc::ENOENT, format!("chunk {chunk} not found")))
}

/// Reads until EAGAIN, EOF or the budget; the input buffer holds at most a few frames.
fn read_some(connection: &mut Connection) {
    let mut budget = READ_BUDGET;
    let mut chunk = [0u8; 64 << 10];
    while budget > 0 {
        match connection.stream.read(&mut chunk) {
            Ok(0) => {
                connection.done_reading = true;
                connection.readable = false;
                return;
            }
            Ok(read) => {
                connection.input.extend_from_slice(&chunk[..read]);
                budget = budget.saturating_sub(read);
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                connection.readable = false;
                return;
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => {
                tracing::warn!(peer = %connection.peer, %error, "reading from a peer failed");
                connection.done_reading = true;
                connection.broken = true;
                connection.readable = false;
                return;
            }
        }
    }
}

/// Whether `input` starts with a whole frame (or a header that does not decode: an answer
/// is owed for that too).
fn frame_ready(input: &[u8], max_payload: u32) -> bool {
    let Some(head) = input.get(..HEADER_SIZE) else {
        return false;
    };
    let head: &[u8; HEADER_SIZE] = head.try_into().expect("32 bytes");
    match Header::decode(head, max_payload) {
        Ok(header) => {
            input.len() >= HEADER_SIZE + header.body_len as usize + header.payload_len as usize
        }
        Err(_) => true,
    }
}

/// A whole frame at the start of `input`: its header, message and total length, `None` when
/// more bytes are needed, or the request id (when the header was readable) and the error.
#[allow(clippy::type_complexity)]
fn next_frame(
    input: &[u8],
    max_payload: u32,
) -> Result<Option<(Header, Message, usize)>, (u64, wire::WireError)> {
    let Some(head) = input.get(..HEADER_SIZE) else {
        return Ok(None);
    };
    let head: &[u8; HEADER_SIZE] = head.try_into().expect("32 bytes");
    let header = Header::decode(head, max_payload).map_err(|error| (0, error))?;
    let body_end = HEADER_SIZE + header.body_len as usize;
    let end = body_end + header.payload_len as usize;
    if input.len() < end {
        return Ok(None);
    }
    let message = wire::decode_body(&header, &input[HEADER_SIZE..body_end])
        .map_err(|error| (header.request_id, error))?;
    Ok(Some((header, message, end)))
}

fn reply_error(connection: &mut Connection, request_id: u64, errno: i32, mut message: String) {
    if message.len() > 4096 {
        let mut cut = 4096;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    let reply = Message::Error(ErrorReply { errno, message });
    queue(connection, request_id, &reply, None);
}

/// Queues one reply (its header and body in a reused buffer, its payload as the lease) and
/// sends what the socket takes.
fn queue(
    connection: &mut Connection,
    request_id: u64,
    message: &Message,
    payload: Option<Payload>,
) {
    queue_with(connection, request_id, message, payload, None);
}

/// As [`queue`], with an fd to pass along with the reply's first byte.
fn queue_with(
    connection: &mut Connection,
    request_id: u64,
    message: &Message,
    payload: Option<Payload>,
    attach: Option<OwnedFd>,
) {
    let mut head = connection.spare_heads.pop().unwrap_or_default();
    head.clear();
    match wire::encode(request_id, message, &mut head) {
        Ok(()) => {
            connection.output.push_back(Outgoing {
                head,
                payload,
                sent: 0,
                attach,
            });
            if !connection.send_blocked {
                flush(connection);
            }
        }
        Err(error) => tracing::error!(peer = %connection.peer, %error, "reply not encodable"),
    }
}

/// Sent replies' header buffers kept for reuse, per connection.
const SPARE_HEADS: usize = 64;

/// Sends what it can of the queued replies, several per system call.
fn flush(connection: &mut Connection) {
    flush_queued(connection);
    debug_assert!(
        !connection.send_blocked || !connection.output.is_empty() || connection.broken,
        "a connection marked blocked has nothing to send"
    );
}

/// [`flush`]'s sending.
fn flush_queued(connection: &mut Connection) {
    while !connection.output.is_empty() && !connection.broken {
        if let Some(front) = connection.output.front_mut()
            && let Some(fd) = front.attach.take()
        {
            // The fd rides on the reply's first bytes, sent on their own.
            match connection.stream.send_with_fd(&front.head, fd.as_fd()) {
                Ok(written) => {
                    front.sent = written;
                    if written == front.head.len() {
                        connection.output.pop_front();
                    }
                    continue;
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    front.attach = Some(fd);
                    connection.send_blocked = true;
                    return;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {
                    front.attach = Some(fd);
                    continue;
                }
                Err(error) => {
                    tracing::warn!(peer = %connection.peer, %error, "passing the pool to a local peer failed");
                    connection.broken = true;
                    connection.output.clear();
                    return;
                }
            }
        }
        // Up to 8 replies, each a header slice and a payload slice, in one writev.
        let mut slices = [IoSlice::new(&[]); 16];
        let mut count = 0;
        for outgoing in connection.output.iter().take(8) {
            let mut skip = outgoing.sent;
            let head = &outgoing.head[skip.min(outgoing.head.len())..];
            skip = skip.saturating_sub(outgoing.head.len());
            if !head.is_empty() {
                slices[count] = IoSlice::new(head);
                count += 1;
            }
            if let Some(payload) = &outgoing.payload {
                let payload = &payload.as_slice()[skip..];
                if !payload.is_empty() {
                    slices[count] = IoSlice::new(payload);
                    count += 1;
                }
            }
        }
        match connection.stream.write_vectored(&slices[..count]) {
            Ok(mut written) => {
                while written > 0 {
                    let front = connection.output.front_mut().expect("bytes were queued");
                    let left = front.len() - front.sent;
                    if written >= left {
                        written -= left;
                        let sent = connection.output.pop_front().expect("front exists");
                        if connection.spare_heads.len() < SPARE_HEADS {
                            connection.spare_heads.push(sent.head);
                        }
                    } else {
                        front.sent += written;
                        written = 0;
                    }
                }
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                connection.send_blocked = true;
                return;
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => {
                tracing::warn!(peer = %connection.peer, %error, "sending to a peer failed");
                connection.broken = true;
                connection.output.clear();
            }
        }
    }
}

impl RequestSource for TcpSource {
    fn poll(&mut self, max: usize, requests: &mut Vec<(u64, usize, Op)>) -> bool {
        if self.accepting {
            loop {
                match self.incoming.try_recv() {
                    Ok((stream, peer, counts_heat)) => self.adopt(stream, peer, counts_heat),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.accepting = false;
                        break;
                    }
                }
            }
        }
        // Without connections (a worker whose peers all went over to RDMA) only the notify
        // signal is in the epoll set: it is read now and then, and before the worker
        // sleeps, not at every poll (a system call per spin of a polled worker).
        self.polls_since_harvest += 1;
        if self.harvest_due
            || self.connections.iter().any(Option::is_some)
            || self.polls_since_harvest >= HARVEST_EVERY
        {
            self.harvest();
        }
        let start = requests.len();
        self.store_copies(max, requests);
        for slot in 0..self.connections.len() {
            if requests.len() - start >= max {
                break;
            }
            let budget = max - (requests.len() - start);
            self.serve(slot, start + budget, requests);
        }
        if !self.accepting {
            // The server is stopping: no new requests; each connection closes once its
            // requests in flight are answered (replies the peer does not take are dropped).
            for connection in self.connections.iter_mut().flatten() {
                connection.done_reading = true;
                if connection.in_flight == 0 {
                    connection.broken = true;
                }
            }
        }
        self.reap_connections();
        // Work left that no new event announces: a socket read up to its budget, or whole
        // frames parsed no further (this poll's budget ran out). Answered at once from a
        // mapped drive, they put nothing in the worker, which could then sleep on them.
        let max_payload = self.max_payload;
        let pending = self.connections.iter().flatten().any(|connection| {
            !connection.broken
                && connection.output.len() < MAX_QUEUED_REPLIES
                && ((connection.readable && !connection.done_reading)
                    || frame_ready(&connection.input, max_payload))
        });
        // With the budget used up by requests, the worker has work and polls again anyway;
        // with none at all (a full worker), it waits for its completions, not spinning here.
        if pending && requests.len() - start < max {
            self.notify.signal();
        }
        // Serving ends when the server stopped accepting and every peer is gone.
        self.accepting || self.connections.iter().any(Option::is_some)
    }

    fn prepare_to_sleep(&mut self) -> bool {
        // Events the worker saw and no poll read yet (the table was full): read them, and
        // poll again if there were any (a new connection, a copy fetched). Any others keep
        // the epoll set readable, so the sleep ends at once and says so: reading it before
        // every sleep was a system call per request while nothing came over TCP.
        !self.harvest_due || self.harvest() == 0
    }

    fn complete(&mut self, completion: Completion) {
        let Some(pending) = self.pending.take(completion.tag) else {
            tracing::error!(
                tag = completion.tag,
                "completion for an unknown TCP request"
            );
            return;
        };
        let Some(connection) = pending.connection_in(&mut self.connections) else {
            return; // The peer left; the lease goes back to the pool here.
        };
        connection.in_flight -= 1;
        let held = connection.held.as_mut().filter(|_| pending.local);
        let (message, payload) = match (completion.result, held) {
            (Ok(Output::Read { lease, crc }), Some(held)) => {
                let done = LocalReadDone {
                    len: lease.len() as u32,
                    crc,
                    offset: lease.pool_offset(),
                    lease: 0,
                };
                let lease = held.insert(lease);
                (
                    Message::LocalReadDone(LocalReadDone { lease, ..done }),
                    None,
                )
            }
            (result, held) => {
                if let (Err(_), Some(held)) = (&result, held) {
                    held.count -= 1;
                }
                Self::reply_for(result, &self.node)
            }
        };
        queue(
            connection,
            pending.request_id,
            &message,
            payload.map(Payload::Lease),
        );
    }

    fn close(self: Box<Self>) {}

    fn wake_fds(&self) -> &[RawFd] {
        &self.wake
    }

    fn woke(&mut self, woken: Woken) {
        self.harvest_due |= woken.contains(0);
    }

    fn share_buffers(&mut self, memfd: BorrowedFd<'_>, len: usize, buffers: usize) {
        match memfd.try_clone_to_owned() {
            Ok(memfd) => {
                self.pool = Some(SharedPool {
                    memfd,
                    len: len as u64,
                    // Half the pool: one local client can never starve the others.
                    held_max: (buffers / 2).max(1) as u32,
                    attached_max: (buffers / 4).max(1),
                })
            }
            Err(error) => {
                tracing::warn!(%error, "no node-local sharing: duplicating the pool fd failed")
            }
        }
    }
}

impl TcpSource {
    /// The reply to a request that is not a local read.
    fn reply_for(
        result: Result<Output, crate::worker::RequestError>,
        node: &str,
    ) -> (Message, Option<BufferLease>) {
        match result {
            Ok(Output::Read { lease, crc }) => (
                Message::ReadDone(ReadDone {
                    len: lease.len() as u32,
                    crc,
                }),
                Some(lease),
            ),
            Ok(Output::Written) => (Message::WriteDone, None),
            Ok(Output::Deleted) => (Message::DeleteDone, None),
            Err(error) => (
                Message::Error(ErrorReply {
                    errno: error.errno(),
                    message: format!("{node}: {}", crate::error_chain(&error)),
                }),
                None,
            ),
        }
    }
}
