//! One connection to a data daemon over TCP (the TCP [`Transport`](crate::Transport)).
//!
//! Reads are pipelined: every request of a batch goes out before the first reply is awaited,
//! and each reply's payload is received straight into its destination slice, then checked
//! against the CRC32C the daemon sent. A read whose bytes fail that check is an error; the
//! destination's contents are then unspecified, and never reported as data.
//!
//! The same connection runs over a daemon's node-local Unix socket when the client is on
//! the daemon's node (same kernel boot id): it then maps the daemon worker's buffer pool
//! read-only (a sealed memfd passed with `LocalPool`), each read's bytes are copied once
//! from the pool buffer the drive read into, and the buffer is handed back with `Release`.

use std::io::{self, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use tier0_dataplane::buffer::ReadOnlyMap;
use tier0_dataplane::net::wire::{
    self, Delete, ErrorReply, HEADER_SIZE, Header, Hello, LayoutRef, LocalEndpoint, LocalRead,
    LocalReadDone, Message, RdmaEndpoint, Read, ReadDone, Release, Replicate, WireError, Write,
};
use tier0_dataplane::store::ChunkId;
use tier0_dataplane::store::format::crc32c;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{addr}: {operation}: {source}")]
    Io {
        addr: String,
        operation: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{addr}: bad frame from the daemon: {source}")]
    Wire {
        addr: String,
        #[source]
        source: WireError,
    },
    /// The daemon answered with an error: `errno` says how, `message` what and where.
    #[error("{addr}: {message} (errno {errno})")]
    Remote {
        addr: String,
        errno: i32,
        message: String,
    },
    /// The daemon refused a read of `file` (the layout's file id) because the layout it was
    /// made through is stale (`ESTALE`): the file's layout changed since it was opened. Every
    /// replica would say the same; the file must be reopened and the read retried.
    #[error("{addr}: {message} (errno ESTALE)")]
    StaleLayout {
        addr: String,
        file: u64,
        message: String,
    },
    #[error("{addr}: unexpected {got:?} reply to request {request_id}")]
    Unexpected {
        addr: String,
        request_id: u64,
        got: wire::Opcode,
    },
    #[error("{addr}: read of {len} bytes exceeds the daemon's {max}-byte frame limit")]
    TooLarge { addr: String, len: usize, max: u32 },
    #[error(
        "{addr}: daemon {node} offers no RDMA session (no device, or setup failed: see its log)"
    )]
    NoRdma { addr: String, node: String },
    #[error("{addr}: {source}")]
    Rdma {
        addr: String,
        #[source]
        source: tier0_dataplane::net::rdma::RdmaError,
    },
    #[error("{addr}: {what}")]
    Unusable { addr: String, what: String },
    /// The bytes of a read do not have the CRC32C the daemon derived from its stored
    /// checksums: corrupt on its drive, in its memory or on the wire. Nothing wrong is kept:
    /// the read fails (or moves to another replica), the connection stays usable.
    #[error(
        "{addr}: chunk {chunk}: the bytes read fail their checksum ({source}): corrupt on the \
         daemon's drive or in transit"
    )]
    Corrupt {
        addr: String,
        chunk: ChunkId,
        #[source]
        source: WireError,
    },
}

impl ClientError {
    /// The errno that best describes the failure (the daemon's own for remote errors).
    pub fn errno(&self) -> i32 {
        match self {
            ClientError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            ClientError::Corrupt { .. } => libc::EBADMSG,
            ClientError::Wire { .. } | ClientError::Unexpected { .. } => libc::EPROTO,
            ClientError::Remote { errno, .. } => *errno,
            ClientError::StaleLayout { .. } => libc::ESTALE,
            ClientError::TooLarge { .. } => libc::EINVAL,
            ClientError::NoRdma { .. } => libc::EOPNOTSUPP,
            ClientError::Rdma { .. } => libc::EIO,
            ClientError::Unusable { .. } => libc::EINVAL,
        }
    }

    /// The daemon that failed.
    pub fn addr(&self) -> &str {
        match self {
            ClientError::Io { addr, .. }
            | ClientError::Wire { addr, .. }
            | ClientError::Remote { addr, .. }
            | ClientError::StaleLayout { addr, .. }
            | ClientError::Unexpected { addr, .. }
            | ClientError::TooLarge { addr, .. }
            | ClientError::NoRdma { addr, .. }
            | ClientError::Rdma { addr, .. }
            | ClientError::Unusable { addr, .. }
            | ClientError::Corrupt { addr, .. } => addr,
        }
    }

    /// Whether the failure is the connection's (transport, framing): another replica should
    /// be tried and this daemon left alone. A daemon's own answer (ENOENT, EBADMSG, ESTALE)
    /// is not.
    pub fn is_connection_failure(&self) -> bool {
        !matches!(
            self,
            ClientError::Remote { .. }
                | ClientError::StaleLayout { .. }
                | ClientError::TooLarge { .. }
                | ClientError::Unusable { .. }
                | ClientError::Corrupt { .. }
        )
    }

    /// Whether the read was refused for a stale layout: the file must be reopened, and no
    /// other replica is worth asking.
    pub fn is_stale_layout(&self) -> bool {
        matches!(self, ClientError::StaleLayout { .. })
    }

    /// A daemon's error reply to a read made through `layout`: `ESTALE` is
    /// [`StaleLayout`](ClientError::StaleLayout) (for the layout's file), anything else
    /// [`Remote`](ClientError::Remote).
    pub(crate) fn read_refused(addr: &str, layout: LayoutRef, error: ErrorReply) -> ClientError {
        if error.errno == libc::ESTALE {
            ClientError::StaleLayout {
                addr: addr.to_string(),
                file: layout.file,
                message: error.message,
            }
        } else {
            ClientError::Remote {
                addr: addr.to_string(),
                errno: error.errno,
                message: error.message,
            }
        }
    }

    /// Checks the bytes of a read of `chunk` against the CRC32C its reply announced.
    pub(crate) fn check_read(
        addr: &str,
        chunk: ChunkId,
        expected: u32,
        bytes: &[u8],
    ) -> Result<(), ClientError> {
        wire::check_payload(expected, bytes).map_err(|source| ClientError::Corrupt {
            addr: addr.to_string(),
            chunk,
            source,
        })
    }
}

/// One read of a batch: `dest.len()` bytes at `offset` of `chunk`, through `layout` (the
/// file's layout it was planned from, checked by the daemon; `LayoutRef::default()` for a
/// read not made through a layout, which is never refused as stale).
#[derive(Debug)]
pub struct ReadInto<'a> {
    pub chunk: ChunkId,
    pub offset: u64,
    pub dest: &'a mut [u8],
    pub layout: LayoutRef,
}

/// Bytes of the reply buffer: a 4 KiB read's whole reply fits, and a large payload loses at
/// most this much to a copy before it bypasses the buffer.
const RECEIVE_BUFFER: usize = 16 << 10;

/// The most payload bytes one receive takes before they are checked. A receive copies from the
/// socket's buffers into the destination; checked right after, a piece this size and its
/// source (512 KiB together) are still in the core's L2 (1–2 MiB on server cores), and the
/// CRC32C runs at cache speed. A whole 1 MiB reply taken at once (the socket usually holds
/// most of it) is checked from farther out: the striped bench's readers spent twice the CPU
/// on the check and served ~6% less (ARCHITECTURE 24). Smaller pieces cost more receives
/// than the cache saves (128 KiB served less than 256 KiB there).
const CHECKED_PIECE: usize = 256 << 10;

/// The socket under a connection: TCP, or a daemon's node-local Unix socket.
#[derive(Debug)]
enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl io::Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(stream) => stream.read(buf),
            Socket::Unix(stream) => stream.read(buf),
        }
    }
}

impl io::Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(stream) => stream.write(buf),
            Socket::Unix(stream) => stream.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Socket::Tcp(stream) => stream.as_fd(),
            Socket::Unix(stream) => stream.as_fd(),
        }
    }
}

/// A daemon worker's buffer pool, mapped read-only: where node-local reads' bytes lie.
#[derive(Debug)]
struct SharedPool {
    map: ReadOnlyMap,
    /// Buffers this connection may hold at once (the window is clamped to it).
    held_max: u32,
}

impl SharedPool {
    fn map(memfd: &OwnedFd, len: u64, held_max: u32) -> io::Result<SharedPool> {
        let len = usize::try_from(len).map_err(|_| io::Error::other("pool too large to map"))?;
        if len == 0 {
            return Err(io::Error::other("the daemon announced an empty pool"));
        }
        // The daemon's memfd is sealed: it cannot shrink under the mapping.
        Ok(SharedPool {
            map: ReadOnlyMap::new(memfd.as_fd(), len)?,
            held_max: held_max.max(1),
        })
    }

    /// Copies `dest.len()` bytes at `offset` of the pool into `dest`; `false` when the range
    /// is not inside the pool.
    fn copy_out(&self, offset: u64, dest: &mut [u8]) -> bool {
        let Some(start) = self.map.range(offset, dest.len()) else {
            return false;
        };
        // SAFETY: the range is inside the mapping (checked by `range`) and the daemon holds
        // the buffer for this connection until it is released; a raw copy, never a reference
        // into memory another process maps.
        unsafe { std::ptr::copy_nonoverlapping(start.as_ptr(), dest.as_mut_ptr(), dest.len()) };
        true
    }
}

/// An authenticated connection to one data daemon.
#[derive(Debug)]
pub struct DaemonConnection {
    /// Replies are read through a small buffer, so a small read's header, body and payload
    /// come in one system call; large payloads bypass it and land straight in the caller's
    /// destination (`BufReader` reads past its buffer when the request is larger).
    stream: BufReader<Socket>,
    addr: String,
    node: String,
    max_payload: u32,
    next_id: u64,
    /// Set after a framing error: nothing more can be trusted on this stream.
    broken: bool,
    /// The daemon's node-local socket, from its welcome.
    local_endpoint: Option<LocalEndpoint>,
    /// Over the node-local socket, once attached: the daemon worker's pool.
    pool: Option<SharedPool>,
    /// The lease of the last batch's last read, released with the next batch's first write.
    deferred_release: Vec<u32>,
}

/// Leases a finished batch may keep until the next one: an idle connection holds at most
/// this many of the daemon's buffers.
const DEFERRED_RELEASES: usize = 1;

impl DaemonConnection {
    /// Connects and presents `token`; fails with the daemon's refusal (EACCES) if it is wrong.
    pub fn connect(
        addr: impl ToSocketAddrs,
        token: &[u8],
        client: &str,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        Self::handshake(addr, token, client, timeout, None).map(|(connection, _)| connection)
    }

    /// Connects with a `Hello` that may ask for an RDMA session (`rdma`: this side's queue
    /// pair); returns the connection and the daemon's queue pair when it accepted.
    pub(crate) fn handshake(
        addr: impl ToSocketAddrs,
        token: &[u8],
        client: &str,
        timeout: Duration,
        rdma: Option<RdmaEndpoint>,
    ) -> Result<(Self, Option<RdmaEndpoint>), ClientError> {
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|source| ClientError::Io {
                addr: "?".into(),
                operation: "resolving the address",
                source,
            })?
            .collect();
        let name = addrs
            .first()
            .map_or_else(|| "?".to_string(), SocketAddr::to_string);
        let io = |operation: &'static str| {
            let name = name.clone();
            move |source| ClientError::Io {
                addr: name,
                operation,
                source,
            }
        };
        let first = addrs.first().ok_or_else(|| {
            io("resolving the address")(io::Error::new(io::ErrorKind::NotFound, "no address"))
        })?;
        let stream = TcpStream::connect_timeout(first, timeout).map_err(io("connecting"))?;
        stream
            .set_nodelay(true)
            .map_err(io("setting TCP_NODELAY"))?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(io("setting a timeout"))?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(io("setting a timeout"))?;
        Self::greet(Socket::Tcp(stream), name, token, client, rdma)
    }

    /// Connects to a daemon's node-local socket (`endpoint`, from its welcome over TCP),
    /// presents `token` and maps the worker's buffer pool. `addr` names the daemon in errors.
    pub fn connect_local(
        endpoint: &LocalEndpoint,
        addr: &str,
        token: &[u8],
        client: &str,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let io = |operation: &'static str| {
            let addr = format!("{addr} (local {})", endpoint.socket);
            move |source| ClientError::Io {
                addr,
                operation,
                source,
            }
        };
        let socket_addr = tier0_dataplane::net::local_socket_addr(&endpoint.socket)
            .map_err(io("naming the local socket"))?;
        let stream = UnixStream::connect_addr(&socket_addr).map_err(io("connecting"))?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(io("setting a timeout"))?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(io("setting a timeout"))?;
        let (mut connection, _) =
            Self::greet(Socket::Unix(stream), addr.to_string(), token, client, None)?;
        connection.attach()?;
        Ok(connection)
    }

    /// Asks for the worker's pool and maps it. The reply is received with `recvmsg`, as its
    /// first byte carries the fd; nothing else is in flight, so the reply buffer is empty.
    fn attach(&mut self) -> Result<(), ClientError> {
        debug_assert!(self.stream.buffer().is_empty());
        let id = self.take_id();
        self.send(id, &Message::LocalAttach, &[])?;
        let (frame, memfd) = self.receive_with_fd()?;
        let (_, message, _) = wire::decode_frame(&frame, 0).map_err(|source| {
            self.broken = true;
            ClientError::Wire {
                addr: self.addr.clone(),
                source,
            }
        })?;
        match (message, memfd) {
            (Message::LocalPool(pool), Some(memfd)) => {
                let mapped =
                    SharedPool::map(&memfd, pool.len, pool.held_max).map_err(|source| {
                        ClientError::Io {
                            addr: self.addr.clone(),
                            operation: "mapping the daemon's buffer pool",
                            source,
                        }
                    })?;
                self.pool = Some(mapped);
                Ok(())
            }
            (Message::LocalPool(_), None) => {
                self.broken = true;
                Err(ClientError::Unusable {
                    addr: self.addr.clone(),
                    what: "the daemon's LocalPool came without its memfd".into(),
                })
            }
            (other, _) => Err(self.remote_or_unexpected(id, other)),
        }
    }

    /// Receives one whole small frame straight from the socket, with the fd that came with
    /// its first byte, if any.
    fn receive_with_fd(&mut self) -> Result<(Vec<u8>, Option<OwnedFd>), ClientError> {
        use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};
        let io = |addr: &str, source: io::Error| ClientError::Io {
            addr: addr.to_string(),
            operation: "receiving the daemon's pool",
            source,
        };
        let mut frame = vec![0u8; HEADER_SIZE];
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let received = recvmsg(
            self.stream.get_ref(),
            &mut [io::IoSliceMut::new(&mut frame)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        );
        let received = match received {
            Ok(received) => received,
            Err(error) => {
                self.broken = true;
                return Err(io(&self.addr, error.into()));
            }
        };
        let mut memfd = None;
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = message {
                for fd in fds {
                    memfd.get_or_insert(fd);
                }
            }
        }
        if received.bytes == 0 {
            self.broken = true;
            return Err(io(
                &self.addr,
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the daemon closed the connection",
                ),
            ));
        }
        self.read_exact(&mut frame[received.bytes..], "receiving the daemon's pool")?;
        let head: &[u8; HEADER_SIZE] = frame[..].try_into().expect("32 bytes");
        let header = match Header::decode(head, 0) {
            Ok(header) => header,
            Err(source) => {
                self.broken = true;
                return Err(ClientError::Wire {
                    addr: self.addr.clone(),
                    source,
                });
            }
        };
        frame.resize(HEADER_SIZE + header.body_len as usize, 0);
        self.read_exact(&mut frame[HEADER_SIZE..], "receiving the daemon's pool")?;
        Ok((frame, memfd))
    }

    /// Says hello on a connected socket and takes the welcome.
    fn greet(
        socket: Socket,
        name: String,
        token: &[u8],
        client: &str,
        rdma: Option<RdmaEndpoint>,
    ) -> Result<(Self, Option<RdmaEndpoint>), ClientError> {
        let mut connection = DaemonConnection {
            stream: BufReader::with_capacity(RECEIVE_BUFFER, socket),
            addr: name,
            node: String::new(),
            max_payload: 0,
            next_id: 1,
            broken: false,
            local_endpoint: None,
            pool: None,
            deferred_release: Vec::new(),
        };
        let hello = Message::Hello(Hello {
            token: token.to_vec(),
            client: client.to_string(),
            rdma,
        });
        connection.send(0, &hello, &[])?;
        let (_, reply) = connection.receive_head(0)?;
        match reply {
            Message::Welcome(welcome) => {
                connection.node = welcome.node;
                connection.max_payload = welcome.max_payload;
                connection.local_endpoint = welcome.local;
                Ok((connection, welcome.rdma))
            }
            other => Err(connection.unexpected(0, other)),
        }
    }

    /// The daemon's node name, from its welcome.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The daemon's node-local socket, from its welcome, when it runs on this node (the
    /// same kernel boot id) and has one.
    pub fn local_endpoint_here(&self) -> Option<&LocalEndpoint> {
        self.local_endpoint
            .as_ref()
            .filter(|endpoint| endpoint.boot_id == tier0_dataplane::net::boot_id())
    }

    /// Whether reads go through the daemon's shared pool (the node-local fast path).
    pub fn is_local(&self) -> bool {
        self.pool.is_some()
    }

    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }

    /// Reads every range of `reads` straight into its destination, all requests in flight at
    /// once. One result per read, in order; a transport failure fails the reads it left
    /// unanswered.
    pub fn read_many(&mut self, reads: &mut [ReadInto<'_>]) -> Vec<Result<(), ClientError>> {
        self.read_window(reads, usize::MAX, None)
    }

    /// As [`read_many`](Self::read_many), with at most `window` requests in flight: the next
    /// request goes out as each reply lands, so the daemon never waits for a whole batch to
    /// drain. `landed`, if given, is called, as it happens, for each read whose bytes landed and passed
    /// their check, with its index and its time from request to last byte.
    pub fn read_window(
        &mut self,
        reads: &mut [ReadInto<'_>],
        window: usize,
        mut landed: Option<&mut dyn FnMut(usize, Duration)>,
    ) -> Vec<Result<(), ClientError>> {
        // Over the node-local socket, at most the buffers the daemon lets this connection hold.
        let window = match &self.pool {
            Some(pool) => window.clamp(1, pool.held_max as usize),
            None => window.max(1),
        };
        let mut releases: Vec<u32> = std::mem::take(&mut self.deferred_release);
        let mut results: Vec<Option<Result<(), ClientError>>> =
            (0..reads.len()).map(|_| None).collect();
        let mut sent_at: Vec<Option<Instant>> = vec![None; reads.len()];
        let base = self.next_id;
        self.next_id += reads.len() as u64;
        let mut next = 0;
        let mut outstanding = 0;
        let mut requests = Vec::with_capacity(window.min(reads.len()) * 64);
        loop {
            // Top the window up, in one write; while a reply is already buffered, take it
            // first, so one write carries the requests several replies made room for.
            requests.clear();
            let reply_buffered = outstanding > 0 && self.stream.buffer().len() >= HEADER_SIZE;
            // Buffers copied out go back with the next requests, first, so the daemon counts
            // them free before the reads that follow in the same write (it never sees more
            // than `window` held). At the end of the batch, one buffer waits for the next
            // batch's first write (a read at a time costs one write, not two, and the daemon
            // one wake-up); more go back now.
            let sending = !reply_buffered && next < reads.len() && outstanding < window;
            let finished = outstanding == 0 && next == reads.len();
            if finished && releases.len() <= DEFERRED_RELEASES {
                self.deferred_release = std::mem::take(&mut releases);
            }
            if !releases.is_empty() && (sending || finished) {
                let release = Message::Release(Release {
                    leases: std::mem::take(&mut releases),
                });
                wire::encode(0, &release, &mut requests).expect("a window of lease ids is small");
            }
            // Timed only for a caller that wants the times: a clock reading is not free
            // everywhere (a VM on HPET).
            let now = landed.is_some().then(Instant::now);
            while !reply_buffered && next < reads.len() && outstanding < window {
                let read = &reads[next];
                if read.dest.len() > self.max_payload as usize {
                    results[next] = Some(Err(ClientError::TooLarge {
                        addr: self.addr.clone(),
                        len: read.dest.len(),
                        max: self.max_payload,
                    }));
                } else {
                    let message = if self.pool.is_some() {
                        Message::LocalRead(LocalRead {
                            chunk: read.chunk,
                            offset: read.offset,
                            len: read.dest.len() as u32,
                            layout: read.layout,
                        })
                    } else {
                        Message::Read(Read {
                            chunk: read.chunk,
                            offset: read.offset,
                            len: read.dest.len() as u32,
                            layout: read.layout,
                        })
                    };
                    wire::encode(base + next as u64, &message, &mut requests)
                        .expect("a read request is a few bytes");
                    sent_at[next] = now;
                    outstanding += 1;
                }
                next += 1;
            }
            if !requests.is_empty()
                && let Err(error) = self.send_raw(&requests)
            {
                self.broken = true;
                return fail_rest(results, &error);
            }
            if outstanding == 0 {
                break;
            }
            let (header, message) = match self.receive_head(self.max_payload) {
                Ok(received) => received,
                Err(error) => return fail_rest(results, &error),
            };
            let index = header.request_id.wrapping_sub(base) as usize;
            if index >= next || results[index].is_some() {
                self.broken = true;
                let error = self.unexpected(header.request_id, message);
                return fail_rest(results, &error);
            }
            outstanding -= 1;
            let result = match message {
                Message::ReadDone(done) => {
                    match self.receive_payload(header.request_id, &mut reads[index], &done) {
                        Ok(result) => result,
                        Err(error) => return fail_rest(results, &error),
                    }
                }
                Message::LocalReadDone(done) if self.pool.is_some() => {
                    releases.push(done.lease);
                    match self.copy_local(header.request_id, &mut reads[index], &done) {
                        Ok(result) => result,
                        Err(error) => return fail_rest(results, &error),
                    }
                }
                Message::Error(error) => Err(ClientError::read_refused(
                    &self.addr,
                    reads[index].layout,
                    error,
                )),
                other => Err(self.unexpected(header.request_id, other)),
            };
            if result.is_ok()
                && let (Some(sent), Some(landed)) = (sent_at[index], landed.as_mut())
            {
                landed(index, sent.elapsed());
            }
            results[index] = Some(result);
        }
        results
            .into_iter()
            .map(|result| result.expect("every read answered"))
            .collect()
    }

    /// Takes a `ReadDone`'s payload into the read's destination and checks it. The outer
    /// error is the connection's (the stream is unusable); the inner one only this read's.
    fn receive_payload(
        &mut self,
        request_id: u64,
        read: &mut ReadInto<'_>,
        done: &ReadDone,
    ) -> Result<Result<(), ClientError>, ClientError> {
        if done.len as usize != read.dest.len() {
            // Framing still holds: skip the bytes, fail this read.
            self.skip(done.len as usize)?;
            return Ok(Err(ClientError::Unexpected {
                addr: self.addr.clone(),
                request_id,
                got: wire::Opcode::ReadDone,
            }));
        }
        // Each piece is checked as it lands, while it is still in cache.
        let mut check = wire::PayloadCheck::default();
        let mut landed = 0;
        while landed < read.dest.len() {
            let end = read.dest.len().min(landed + CHECKED_PIECE);
            let piece = match self.stream.read(&mut read.dest[landed..end]) {
                Ok(0) => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                Ok(piece) => Ok(piece),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => Err(error),
            }
            .map_err(|source| {
                self.broken = true;
                ClientError::Io {
                    addr: self.addr.clone(),
                    operation: "receiving chunk bytes",
                    source,
                }
            })?;
            check.update(&read.dest[landed..landed + piece]);
            landed += piece;
        }
        Ok(check
            .finish(done.crc)
            .map_err(|source| ClientError::Corrupt {
                addr: self.addr.clone(),
                chunk: read.chunk,
                source,
            }))
    }

    /// Copies a `LocalReadDone`'s bytes out of the shared pool into the read's destination
    /// and checks them. The outer error is the connection's (the daemon named a range outside
    /// its pool: nothing more it says can be trusted); the inner one only this read's.
    fn copy_local(
        &mut self,
        request_id: u64,
        read: &mut ReadInto<'_>,
        done: &LocalReadDone,
    ) -> Result<Result<(), ClientError>, ClientError> {
        let pool = self.pool.as_ref().expect("checked by the caller");
        if done.len as usize != read.dest.len() {
            return Ok(Err(ClientError::Unexpected {
                addr: self.addr.clone(),
                request_id,
                got: wire::Opcode::LocalReadDone,
            }));
        }
        if !pool.copy_out(done.offset, read.dest) {
            self.broken = true;
            return Err(ClientError::Unusable {
                addr: self.addr.clone(),
                what: format!(
                    "the daemon placed {} bytes at {} of a {}-byte pool",
                    done.len,
                    done.offset,
                    pool.map.len()
                ),
            });
        }
        Ok(ClientError::check_read(
            &self.addr, read.chunk, done.crc, read.dest,
        ))
    }

    /// Reads `dest.len()` bytes at `offset` of `chunk` into `dest`, not through a layout
    /// (never refused as stale).
    pub fn read_into(
        &mut self,
        chunk: ChunkId,
        offset: u64,
        dest: &mut [u8],
    ) -> Result<(), ClientError> {
        self.read_through(LayoutRef::default(), chunk, offset, dest)
    }

    /// As [`read_into`](Self::read_into), through `layout`: a daemon that has fenced that
    /// layout version off answers [`ClientError::StaleLayout`].
    pub fn read_through(
        &mut self,
        layout: LayoutRef,
        chunk: ChunkId,
        offset: u64,
        dest: &mut [u8],
    ) -> Result<(), ClientError> {
        let mut reads = [ReadInto {
            chunk,
            offset,
            dest,
            layout,
        }];
        self.read_many(&mut reads).remove(0)
    }

    /// Stores a new chunk (chunks are immutable: an existing id is EEXIST).
    pub fn write(&mut self, chunk: ChunkId, data: &[u8]) -> Result<(), ClientError> {
        let id = self.take_id();
        let message = Message::Write(Write {
            chunk,
            len: data.len() as u32,
            crc: crc32c(data),
        });
        self.send(id, &message, data)?;
        match self.receive_head(0)? {
            (_, Message::WriteDone) => Ok(()),
            (_, other) => Err(self.remote_or_unexpected(id, other)),
        }
    }

    /// Has the daemon copy `chunk` (`len` bytes) to itself from the daemon at `source`
    /// (`HOST:PORT`; `Replicate`): it fetches the bytes there, checks and stores them, and
    /// answers once they are whole, so no chunk byte passes through this connection. `wait`
    /// bounds the wait for the answer; make it longer than the daemon's own copy deadline
    /// (`tier0_dataplane::net::replicate::DEFAULT_COPY_TIMEOUT`), so the daemon's error
    /// (its errno and cause) arrives before this side gives up. `EEXIST`: the chunk is there
    /// already (complete: chunks are stored atomically).
    pub fn replicate(
        &mut self,
        chunk: ChunkId,
        len: u32,
        source: &str,
        wait: Duration,
    ) -> Result<(), ClientError> {
        let id = self.take_id();
        let message = Message::Replicate(Replicate {
            chunk,
            len,
            source: source.to_string(),
        });
        self.send(id, &message, &[])?;
        let before = self.set_read_timeout(Some(wait))?;
        let reply = self.receive_head(0);
        self.set_read_timeout(before)?;
        match reply? {
            (_, Message::WriteDone) => Ok(()),
            (_, other) => Err(self.remote_or_unexpected(id, other)),
        }
    }

    /// Sets the socket's read timeout; returns the one it had.
    fn set_read_timeout(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<Option<Duration>, ClientError> {
        let result = match self.stream.get_ref() {
            Socket::Tcp(stream) => stream
                .read_timeout()
                .and_then(|before| stream.set_read_timeout(timeout).map(|()| before)),
            Socket::Unix(stream) => stream
                .read_timeout()
                .and_then(|before| stream.set_read_timeout(timeout).map(|()| before)),
        };
        result.map_err(|source| ClientError::Io {
            addr: self.addr.clone(),
            operation: "setting a timeout",
            source,
        })
    }

    pub fn delete(&mut self, chunk: ChunkId) -> Result<(), ClientError> {
        let id = self.take_id();
        self.send(id, &Message::Delete(Delete { chunk }), &[])?;
        match self.receive_head(0)? {
            (_, Message::DeleteDone) => Ok(()),
            (_, other) => Err(self.remote_or_unexpected(id, other)),
        }
    }

    /// Sends raw bytes as they are: for tests of the daemon's handling of bad frames.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream
            .get_mut()
            .write_all(bytes)
            .map_err(|source| ClientError::Io {
                addr: self.addr.clone(),
                operation: "sending",
                source,
            })
    }

    /// Waits for the next reply's header and body (its payload, if any, is left unread); a
    /// payload over `max_payload` is a framing error.
    pub fn receive_head(&mut self, max_payload: u32) -> Result<(Header, Message), ClientError> {
        let mut head = [0u8; HEADER_SIZE];
        self.read_exact(&mut head, "receiving a reply")?;
        let wire_error = |source| ClientError::Wire {
            addr: self.addr.clone(),
            source,
        };
        let header = match Header::decode(&head, max_payload) {
            Ok(header) => header,
            Err(error) => {
                self.broken = true;
                return Err(wire_error(error));
            }
        };
        let mut body = vec![0u8; header.body_len as usize];
        self.read_exact(&mut body, "receiving a reply")?;
        match wire::decode_body(&header, &body) {
            Ok(message) => Ok((header, message)),
            Err(error) => {
                self.broken = true;
                Err(ClientError::Wire {
                    addr: self.addr.clone(),
                    source: error,
                })
            }
        }
    }

    fn send(&mut self, id: u64, message: &Message, payload: &[u8]) -> Result<(), ClientError> {
        let mut frame = Vec::with_capacity(64 + payload.len());
        wire::encode(id, message, &mut frame).map_err(|source| ClientError::Wire {
            addr: self.addr.clone(),
            source,
        })?;
        frame.extend_from_slice(payload);
        self.send_raw(&frame)
    }

    fn read_exact(&mut self, into: &mut [u8], operation: &'static str) -> Result<(), ClientError> {
        self.stream.read_exact(into).map_err(|source| {
            self.broken = true;
            ClientError::Io {
                addr: self.addr.clone(),
                operation,
                source,
            }
        })
    }

    fn skip(&mut self, len: usize) -> Result<(), ClientError> {
        let mut sink = vec![0u8; len.min(1 << 20)];
        let mut left = len;
        while left > 0 {
            let take = left.min(sink.len());
            self.read_exact(&mut sink[..take], "skipping a payload")?;
            left -= take;
        }
        Ok(())
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn remote_or_unexpected(&mut self, id: u64, message: Message) -> ClientError {
        match message {
            Message::Error(error) => ClientError::Remote {
                addr: self.addr.clone(),
                errno: error.errno,
                message: error.message,
            },
            other => self.unexpected(id, other),
        }
    }

    fn unexpected(&self, request_id: u64, message: Message) -> ClientError {
        match message {
            Message::Error(error) => ClientError::Remote {
                addr: self.addr.clone(),
                errno: error.errno,
                message: error.message,
            },
            other => ClientError::Unexpected {
                addr: self.addr.clone(),
                request_id,
                got: other.opcode(),
            },
        }
    }

    /// Whether the stream can still be used (no framing or transport error so far).
    pub fn is_healthy(&self) -> bool {
        !self.broken
    }

    /// The address it is connected to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The socket, for a session that uses it only as its side channel (RDMA).
    pub(crate) fn into_stream(self) -> Option<TcpStream> {
        // Nothing is read on the side channel once the session is set up: no bytes are lost.
        match self.stream.into_inner() {
            Socket::Tcp(stream) => Some(stream),
            Socket::Unix(_) => None,
        }
    }
}

/// Fails every request of a batch that has no result yet with `error`'s text.
pub(crate) fn fail_rest(
    results: Vec<Option<Result<(), ClientError>>>,
    error: &ClientError,
) -> Vec<Result<(), ClientError>> {
    results
        .into_iter()
        .map(|result| {
            result.unwrap_or_else(|| {
                Err(ClientError::Io {
                    addr: error.addr().to_string(),
                    operation: "batch failed",
                    source: io::Error::other(error.to_string()),
                })
            })
        })
        .collect()
}
