//! Daemon-to-daemon copies: a daemon asked to `Replicate` a chunk fetches it from the source
//! daemon itself, on a copy thread of its own, and the worker then stores it as it stores a
//! client's `Write`. The control plane only says what to copy where; no chunk byte passes
//! through it.
//!
//! The fetch is a minimal blocking peer reader built on this crate's own wire codec (one
//! `Hello` with the cluster token, one `Read` of the whole chunk, the payload checked
//! against the CRC32C the source announced, as every client read is checked), rather than a
//! fetcher injected by whoever starts the daemon (say `tier0_client::DaemonConnection`, which
//! this crate cannot depend on: the client depends on it). *Why:* a daemon is then complete
//! by itself: every way one is started (`tier0 serve data`, `cluster up`, `quickstart`, the
//! test clusters) serves copies with no wiring, and none can come up that refuses them for
//! want of a fetcher; what a copy needs of a client (one request, one checked payload, no
//! pipelining, layouts, RDMA or shared memory) is a few dozen lines on a codec the daemon
//! already owns, not a second seam with one implementation.
//!
//! Copies are bounded per daemon ([`CopyConfig::max_in_flight`], past which a `Replicate` is
//! refused `EBUSY` at once) and each has a deadline ([`CopyConfig::timeout`], over the whole
//! fetch: connect, handshake and every byte), so a dead or stalled source fails its copy
//! cleanly (`EIO`) and never holds a copy thread, a connection or a worker for longer.

use std::collections::HashSet;
use std::io::{self, Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::wire::{self, HEADER_SIZE, Header, Hello, LayoutRef, Message, Read};
use crate::store::ChunkId;

/// Copies a daemon runs at once by default.
pub const DEFAULT_COPIES_IN_FLIGHT: usize = 4;
/// How long a copy's fetch may take by default, from connecting to the last byte. A
/// requester should wait longer than this for the answer (the local write comes after).
pub const DEFAULT_COPY_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest `Replicate.source` taken: a host name (253) and a port.
const MAX_ADDRESS: usize = 261;

/// How a daemon runs the copies it is asked for (`Replicate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyConfig {
    /// Copies fetching or storing at once, daemon-wide; one more is refused `EBUSY`.
    pub max_in_flight: usize,
    /// Deadline of one copy's fetch from its source.
    pub timeout: Duration,
}

impl Default for CopyConfig {
    fn default() -> Self {
        CopyConfig {
            max_in_flight: DEFAULT_COPIES_IN_FLIGHT,
            timeout: DEFAULT_COPY_TIMEOUT,
        }
    }
}

/// Why a copy failed: the errno its requester is answered with, and what happened.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CopyError {
    pub errno: i32,
    pub message: String,
}

/// The daemon's copies: the bound they share, and what a fetch presents to its source.
#[derive(Debug)]
pub(crate) struct Copier {
    config: CopyConfig,
    in_flight: Arc<AtomicUsize>,
    /// The chunks being copied here now: a second copy of one is refused (it could land on
    /// another drive and leave two).
    chunks: Arc<Mutex<HashSet<ChunkId>>>,
    token: Arc<[u8]>,
    /// Who this daemon says it is to the source (its logs).
    client: String,
}

/// One admitted copy: it counts against the bound, and holds its chunk, until dropped (its
/// reply is sent).
#[derive(Debug)]
pub(crate) struct CopyPermit {
    in_flight: Arc<AtomicUsize>,
    chunks: Arc<Mutex<HashSet<ChunkId>>>,
    chunk: ChunkId,
}

impl Drop for CopyPermit {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        lock(&self.chunks).remove(&self.chunk);
    }
}

fn lock(chunks: &Mutex<HashSet<ChunkId>>) -> std::sync::MutexGuard<'_, HashSet<ChunkId>> {
    chunks
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Copier {
    pub(crate) fn new(config: CopyConfig, token: &[u8], node: &str) -> Copier {
        Copier {
            config,
            in_flight: Arc::new(AtomicUsize::new(0)),
            chunks: Arc::new(Mutex::new(HashSet::new())),
            token: token.into(),
            client: format!("{node}{COPY_PEER_SUFFIX}"),
        }
    }

    /// Checks what can be checked without the network (the length against this daemon's
    /// frame limit, the address's shape) and takes a place under the bound: `EINVAL` or
    /// `EBUSY` otherwise (also `EBUSY` for a chunk already being copied here).
    pub(crate) fn admit(
        &self,
        chunk: ChunkId,
        len: u32,
        source: &str,
        max_payload: u32,
    ) -> Result<CopyPermit, (i32, String)> {
        if len == 0 || len > max_payload {
            return Err((
                libc::EINVAL,
                format!("a copy of {len} bytes: chunks here are 1 to {max_payload} bytes"),
            ));
        }
        check_address(source).map_err(|what| (libc::EINVAL, what))?;
        let max = self.config.max_in_flight.max(1);
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                (now < max).then_some(now + 1)
            })
            .map_err(|_| {
                (
                    libc::EBUSY,
                    format!("{max} copies are in flight here already: retry later"),
                )
            })?;
        if !lock(&self.chunks).insert(chunk) {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err((
                libc::EBUSY,
                "a copy of it is in flight here already: retry later".to_string(),
            ));
        }
        Ok(CopyPermit {
            in_flight: self.in_flight.clone(),
            chunks: self.chunks.clone(),
            chunk,
        })
    }

    /// Fetches `len` bytes of `chunk` from `source` on a thread of its own and hands the
    /// result to `deliver` there. Fails only when no thread can be started.
    pub(crate) fn spawn(
        &self,
        chunk: ChunkId,
        len: u32,
        source: String,
        deliver: impl FnOnce(Result<Vec<u8>, CopyError>) + Send + 'static,
    ) -> io::Result<()> {
        let token = self.token.clone();
        let client = self.client.clone();
        let timeout = self.config.timeout;
        std::thread::Builder::new()
            .name("tier0-copy".into())
            .spawn(move || {
                let started = Instant::now();
                let result = fetch_chunk(&source, &token, &client, chunk, len, timeout);
                match &result {
                    Ok(_) => tracing::debug!(%chunk, len, source, elapsed = ?started.elapsed(), "chunk fetched for a copy"),
                    Err(error) => tracing::warn!(%chunk, source, %error, "copy failed"),
                }
                deliver(result);
            })
            .map(drop)
    }
}

/// `HOST:PORT` with a non-empty host and a port in 1..=65535 (an IPv6 host in brackets).
fn check_address(source: &str) -> Result<(), String> {
    let bad = |why: &str| format!("source address {source:?}: {why}");
    if source.len() > MAX_ADDRESS {
        return Err(bad("too long"));
    }
    let Some((host, port)) = source.rsplit_once(':') else {
        return Err(bad("not HOST:PORT"));
    };
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("no host"));
    }
    match port.parse::<u16>() {
        Ok(port) if port != 0 => Ok(()),
        _ => Err(bad("no port")),
    }
}

/// Reads the whole of `chunk` (`len` bytes) from the daemon at `source`, presenting `token`,
/// within `timeout`; the bytes are returned only once their CRC32C matched the one the
/// source announced. Blocking: run it off the worker's loop.
///
/// Errors: `EINVAL` an address that does not resolve; `ENOENT` the source has not got the
/// chunk; `EIO` anything else the source or the network did (refused, closed, timed out, a
/// bad frame, bytes that fail their checksum), each named in the message.
pub fn fetch_chunk(
    source: &str,
    token: &[u8],
    client: &str,
    chunk: ChunkId,
    len: u32,
    timeout: Duration,
) -> Result<Vec<u8>, CopyError> {
    let fail = |errno: i32, what: String| CopyError {
        errno,
        message: format!("fetching chunk {chunk} from {source}: {what}"),
    };
    let deadline = Instant::now() + timeout;
    // Name resolution is the system's and not bounded by the deadline (it holds a copy
    // place meanwhile, not the worker); then every address it gave is tried, within it.
    let addrs: Vec<_> = source
        .to_socket_addrs()
        .map_err(|error| fail(libc::EINVAL, format!("resolving the address: {error}")))?
        .collect();
    if addrs.is_empty() {
        return Err(fail(libc::EINVAL, "the address resolves to nothing".into()));
    }
    let mut last = None;
    let mut connected = None;
    for addr in &addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(fail(libc::EIO, format!("timed out after {timeout:?}")));
        }
        match TcpStream::connect_timeout(addr, left) {
            Ok(stream) => {
                connected = Some(stream);
                break;
            }
            Err(error) => last = Some(format!("connecting to {addr}: {error}")),
        }
    }
    let stream = connected.ok_or_else(|| {
        fail(
            libc::EIO,
            last.unwrap_or_else(|| "connecting: no address".into()),
        )
    })?;
    let _ = stream.set_nodelay(true);
    let mut peer = Peer {
        stream,
        deadline,
        timeout,
    };
    let io = |what: &str| {
        let what = what.to_string();
        move |error: PeerError| match error {
            PeerError::Io(error) => fail(libc::EIO, format!("{what}: {error}")),
            PeerError::TimedOut(after) => {
                fail(libc::EIO, format!("{what}: timed out after {after:?}"))
            }
            PeerError::Wire(error) => fail(libc::EIO, format!("{what}: bad frame: {error}")),
        }
    };
    let hello = Message::Hello(Hello {
        token: token.to_vec(),
        client: client.to_string(),
        rdma: None,
    });
    peer.send(0, &hello).map_err(io("saying hello"))?;
    let max_payload = match peer.receive(0).map_err(io("awaiting its welcome"))? {
        (_, Message::Welcome(welcome)) => welcome.max_payload,
        (_, Message::Error(refusal)) => {
            return Err(fail(
                libc::EIO,
                format!("refused: {} (errno {})", refusal.message, refusal.errno),
            ));
        }
        (_, other) => {
            return Err(fail(
                libc::EIO,
                format!("answered its hello with {:?}", other.opcode()),
            ));
        }
    };
    if len > max_payload {
        return Err(fail(
            libc::EIO,
            format!("its frame limit ({max_payload} bytes) is below the chunk's {len}"),
        ));
    }
    let read = Message::Read(Read {
        chunk,
        offset: 0,
        len,
        layout: LayoutRef::default(),
    });
    peer.send(1, &read).map_err(io("asking for the chunk"))?;
    match peer.receive(len).map_err(io("awaiting the chunk"))? {
        (header, Message::ReadDone(done)) if header.request_id == 1 && done.len == len => {
            let mut data = vec![0u8; len as usize];
            peer.read_exact(&mut data)
                .map_err(io("receiving the chunk"))?;
            wire::check_payload(done.crc, &data).map_err(|error| {
                fail(
                    libc::EIO,
                    format!(
                        "the bytes fail their checksum ({error}): corrupt on its drive or in transit"
                    ),
                )
            })?;
            Ok(data)
        }
        (_, Message::ReadDone(done)) => Err(fail(
            libc::EIO,
            format!("answered {} bytes for a read of {len}", done.len),
        )),
        (_, Message::Error(refusal)) => Err(fail(
            // The source has not got it (or no longer): the requester may try another.
            if refusal.errno == libc::ENOENT {
                libc::ENOENT
            } else {
                libc::EIO
            },
            format!("{} (errno {})", refusal.message, refusal.errno),
        )),
        (_, other) => Err(fail(
            libc::EIO,
            format!("answered the read with {:?}", other.opcode()),
        )),
    }
}

enum PeerError {
    Io(io::Error),
    TimedOut(Duration),
    Wire(wire::WireError),
}

/// A blocking connection with one deadline over everything done on it.
struct Peer {
    stream: TcpStream,
    deadline: Instant,
    timeout: Duration,
}

impl Peer {
    fn left(&self) -> Result<Duration, PeerError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(PeerError::TimedOut(self.timeout))
        } else {
            Ok(left)
        }
    }

    fn timed_out(&self, error: io::Error) -> PeerError {
        match error.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                PeerError::TimedOut(self.timeout)
            }
            _ => PeerError::Io(error),
        }
    }

    fn send(&mut self, request_id: u64, message: &Message) -> Result<(), PeerError> {
        let mut frame = Vec::new();
        wire::encode(request_id, message, &mut frame).map_err(PeerError::Wire)?;
        let left = self.left()?;
        self.stream
            .set_write_timeout(Some(left))
            .map_err(PeerError::Io)?;
        self.stream
            .write_all(&frame)
            .map_err(|error| self.timed_out(error))
    }

    /// The next frame's header and body (a payload, if any, is left to read), taking a
    /// payload of at most `max_payload` bytes.
    fn receive(&mut self, max_payload: u32) -> Result<(Header, Message), PeerError> {
        let mut head = [0u8; HEADER_SIZE];
        self.read_exact(&mut head)?;
        let header = Header::decode(&head, max_payload).map_err(PeerError::Wire)?;
        let mut body = vec![0u8; header.body_len as usize];
        self.read_exact(&mut body)?;
        let message = wire::decode_body(&header, &body).map_err(PeerError::Wire)?;
        Ok((header, message))
    }

    /// Fills `into` before the deadline, however slowly the bytes come.
    fn read_exact(&mut self, into: &mut [u8]) -> Result<(), PeerError> {
        let mut filled = 0;
        while filled < into.len() {
            let left = self.left()?;
            self.stream
                .set_read_timeout(Some(left))
                .map_err(PeerError::Io)?;
            match self.stream.read(&mut into[filled..]) {
                Ok(0) => {
                    return Err(PeerError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the source closed the connection",
                    )));
                }
                Ok(read) => filled += read,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(self.timed_out(error)),
            }
        }
        Ok(())
    }
}

/// How a daemon pulling a copy names itself in its `Hello` (after its node id): the source
/// does not count its reads as heat.
pub(crate) const COPY_PEER_SUFFIX: &str = "/replicate";

/// Whether a peer that said `client` in its `Hello` is a daemon pulling a copy.
pub(crate) fn is_copy_peer(client: &str) -> bool {
    client.ends_with(COPY_PEER_SUFFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_host_and_port() {
        for good in [
            "127.0.0.1:7400",
            "node-3.example:1",
            "[::1]:7400",
            "a:65535",
        ] {
            assert_eq!(check_address(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "127.0.0.1",
            ":7400",
            "host:",
            "host:0",
            "host:65536",
            "host:port",
            "ho st:1",
        ] {
            assert!(check_address(bad).is_err(), "{bad:?}");
        }
        assert!(check_address(&format!("{}:1", "a".repeat(300))).is_err());
    }

    #[test]
    fn the_bound_refuses_past_it_and_frees_on_drop() {
        let copier = Copier::new(
            CopyConfig {
                max_in_flight: 2,
                timeout: Duration::from_secs(1),
            },
            b"t",
            "n",
        );
        let chunk = |index| ChunkId {
            file: 1,
            index,
            generation: 1,
        };
        let one = copier.admit(chunk(0), 10, "h:1", 100).unwrap();
        // A second copy of a chunk in flight: refused, and it takes no place.
        assert_eq!(
            copier.admit(chunk(0), 10, "h:1", 100).unwrap_err().0,
            libc::EBUSY
        );
        let _two = copier.admit(chunk(1), 10, "h:1", 100).unwrap();
        assert_eq!(
            copier.admit(chunk(2), 10, "h:1", 100).unwrap_err().0,
            libc::EBUSY
        );
        drop(one);
        assert!(copier.admit(chunk(0), 10, "h:1", 100).is_ok());
        assert_eq!(
            copier.admit(chunk(3), 0, "h:1", 100).unwrap_err().0,
            libc::EINVAL
        );
        assert_eq!(
            copier.admit(chunk(3), 101, "h:1", 100).unwrap_err().0,
            libc::EINVAL
        );
        assert_eq!(
            copier.admit(chunk(3), 10, "nope", 100).unwrap_err().0,
            libc::EINVAL
        );
    }
}
