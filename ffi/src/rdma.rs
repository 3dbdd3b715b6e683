//! The RDMA transport, client side: a device context whose registered buffers daemons write
//! into, and one reliable-connected queue pair per daemon.
//!
//! Setup rides on the TCP handshake: the `Hello` carries this side's queue pair, the
//! `Welcome` the daemon's; the TCP connection then stays open, silent, as the session's side
//! channel (its close is how either side learns the other left, faster than RC retries). A
//! read is a SEND of `RdmaRead` naming the destination's address and key; the daemon
//! RDMA-WRITEs the bytes there and SENDs `RdmaReadDone` with their CRC32C, which is checked
//! here before the read counts as done.

use std::cell::Cell;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::queue_pair::ExtendedQueuePair;
use tier0_dataplane::net::rdma::verbs::{
    self, Completions, DEFAULT_CREDITS, MESSAGE_SLOT, WorkCompletion,
};
use tier0_dataplane::net::rdma::{RdmaDevice, RdmaError};
use tier0_dataplane::net::wire::{
    self, Delete, HEADER_SIZE, Header, LayoutRef, Message, RdmaRead, WireError,
};
use tier0_dataplane::store::ChunkId;

use crate::buffer::{Allocation, ReadBuffer};
use crate::daemon::{ClientError, DaemonConnection, ReadInto, fail_rest};
use crate::transport::{Transport, TransportKind};

/// This host's RDMA device, and the memory registered with it for daemons to write into.
pub struct RdmaClient {
    device: Arc<RdmaDevice>,
    registrations: Mutex<Vec<Registration>>,
}

struct Registration {
    base: usize,
    len: usize,
    region: Arc<MemoryRegion>,
    /// Keeps the memory mapped while the NIC may write into it.
    _memory: Arc<Allocation>,
}

impl std::fmt::Debug for RdmaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaClient")
            .field("device", &self.device)
            .finish()
    }
}

impl RdmaClient {
    /// Opens `device`, or the first one present.
    pub fn open(device: Option<&str>) -> Result<Arc<RdmaClient>, RdmaError> {
        Ok(Arc::new(RdmaClient {
            device: RdmaDevice::open(device)?,
            registrations: Mutex::new(Vec::new()),
        }))
    }

    pub fn device_name(&self) -> &str {
        self.device.name()
    }

    /// Registers all of `buffer` for daemons' RDMA WRITEs (once: registering it again does
    /// nothing). The registration keeps the memory mapped until [`RdmaClient::unregister`].
    pub fn register(&self, buffer: &ReadBuffer) -> Result<(), RdmaError> {
        let memory = buffer.allocation();
        let base = memory.base() as usize;
        let mut registrations = self.lock();
        if registrations.iter().any(|r| r.base == base) {
            return Ok(());
        }
        // SAFETY: `_memory` below keeps the mapping alive as long as the region.
        let region = unsafe { self.device.register(memory.base(), memory.len(), true)? };
        registrations.push(Registration {
            base,
            len: memory.len(),
            region,
            _memory: memory.clone(),
        });
        Ok(())
    }

    /// Drops the registration of `buffer`. Only once no connection may still be writing into
    /// it (after the reads finished or their connections were fenced).
    pub fn unregister(&self, buffer: &ReadBuffer) {
        let base = buffer.allocation().base() as usize;
        self.lock().retain(|registration| registration.base != base);
    }

    /// The remote key covering each (address, length), if that memory is registered: one
    /// lock per batch, not per read.
    fn rkeys_for(&self, ranges: &[(u64, usize)]) -> Vec<Option<u32>> {
        let registrations = self.lock();
        ranges
            .iter()
            .map(|&(addr, len)| {
                let addr = addr as usize;
                registrations
                    .iter()
                    .find(|r| addr >= r.base && addr + len <= r.base + r.len)
                    .map(|r| r.region.rkey())
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Registration>> {
        self.registrations
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// What connecting with RDMA gave: a queue pair, or (the daemon offers none) the plain TCP
/// connection the handshake made.
#[derive(Debug)]
pub enum RdmaOrTcp {
    Rdma(Box<RdmaConnection>),
    Tcp(DaemonConnection),
}

const RECV_BIT: u64 = 1 << 31;

/// A reliable-connected queue pair to one daemon.
pub struct RdmaConnection {
    // Field order is drop order: the queue pair goes before the memory it points into.
    qp: ExtendedQueuePair,
    completions: Completions,
    slab_mr: Arc<MemoryRegion>,
    /// `credits` receive slots for replies, then `credits` send slots for requests.
    slab: Box<[u8]>,
    side: TcpStream,
    client: Arc<RdmaClient>,
    addr: String,
    node: String,
    max_payload: u32,
    /// Our receive slots; the daemon's credits bound our outstanding requests.
    credits: u32,
    remote_credits: u32,
    free_sends: Vec<u16>,
    next_id: u64,
    broken: bool,
    timeout: Duration,
    wcs: Vec<WorkCompletion>,
    /// Writes go over TCP: a connection opened on the first one.
    writer: Option<DaemonConnection>,
    token: Vec<u8>,
    client_name: String,
    peer: SocketAddr,
}

impl std::fmt::Debug for RdmaConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaConnection")
            .field("addr", &self.addr)
            .field("node", &self.node)
            .field("device", &self.client.device_name())
            .field("broken", &self.broken)
            .finish()
    }
}

impl RdmaConnection {
    /// Connects to a daemon and sets up a queue pair with it; when the daemon offers none,
    /// returns the TCP connection instead.
    pub fn connect(
        client: &Arc<RdmaClient>,
        addr: &[SocketAddr],
        token: &[u8],
        client_name: &str,
        timeout: Duration,
    ) -> Result<RdmaOrTcp, ClientError> {
        let name = addr.first().map(|a| a.to_string()).unwrap_or_default();
        let rdma_error = |source| ClientError::Rdma {
            addr: name.clone(),
            source,
        };
        let device = &client.device;
        let credits = DEFAULT_CREDITS;
        let completions = device.completion_queue(4 * credits).map_err(rdma_error)?;
        let mut qp = device
            .queue_pair(&completions.handle(), credits, credits, true)
            .map_err(rdma_error)?;
        let mut slab = vec![0u8; 2 * credits as usize * MESSAGE_SLOT].into_boxed_slice();
        // SAFETY: the slab lives in the connection next to its region and is dropped after it.
        let slab_mr =
            unsafe { device.register(slab.as_mut_ptr(), slab.len(), false) }.map_err(rdma_error)?;
        for index in 0..credits {
            let at = slab.as_ptr() as u64 + u64::from(index) * MESSAGE_SLOT as u64;
            verbs::post_recv(
                &mut qp,
                RECV_BIT | u64::from(index),
                slab_mr.lkey(),
                at,
                MESSAGE_SLOT as u32,
            )
            .map_err(rdma_error)?;
        }
        let psn = verbs::random_psn();
        let local = device.endpoint(&qp, psn, credits);
        let (tcp, remote) =
            DaemonConnection::handshake(addr, token, client_name, timeout, Some(local))?;
        let Some(remote) = remote else {
            return Ok(RdmaOrTcp::Tcp(tcp));
        };
        device.connect(&mut qp, psn, &remote).map_err(rdma_error)?;
        let node = tcp.node().to_string();
        let max_payload = tcp.max_payload();
        let side = tcp.into_stream().expect("RDMA is negotiated over TCP");
        let peer = side.peer_addr().map_err(|source| ClientError::Io {
            addr: name.clone(),
            operation: "reading the peer address",
            source,
        })?;
        Ok(RdmaOrTcp::Rdma(Box::new(RdmaConnection {
            qp,
            completions,
            slab_mr,
            slab,
            side,
            client: client.clone(),
            addr: name,
            node,
            max_payload,
            credits,
            remote_credits: remote.credits.clamp(1, credits),
            free_sends: (0..credits as u16).rev().collect(),
            next_id: 1,
            broken: false,
            timeout,
            wcs: Vec::with_capacity(64),
            writer: None,
            token: token.to_vec(),
            client_name: client_name.to_string(),
            peer,
        })))
    }

    fn broken_error(&self, what: String) -> ClientError {
        ClientError::Io {
            addr: self.addr.clone(),
            operation: "RDMA session",
            source: std::io::Error::new(std::io::ErrorKind::ConnectionAborted, what),
        }
    }

    /// Sends `count` requests (`make(index)` builds each), at most `window` and the daemon's
    /// credits outstanding, and hands each reply, an error frame included, to
    /// `done(index, reply)`. One result per request.
    fn pipeline(
        &mut self,
        count: usize,
        window: usize,
        mut make: impl FnMut(usize) -> Result<Message, ClientError>,
        mut done: impl FnMut(usize, Message) -> Result<(), ClientError>,
    ) -> Vec<Result<(), ClientError>> {
        let mut results: Vec<Option<Result<(), ClientError>>> = (0..count).map(|_| None).collect();
        if self.broken {
            let error = self.broken_error("the session failed earlier".into());
            return fail_rest(results, &error);
        }
        let base = self.next_id;
        self.next_id += count as u64;
        let mut next = 0;
        let mut outstanding = 0usize;
        // When waits began to come back empty; the clock is read only then, as where it is
        // slow (a VM on HPET) every reading costs microseconds.
        let mut stalled_since: Option<Instant> = None;
        let mut wcs = std::mem::take(&mut self.wcs);
        loop {
            // Send while credits and send slots allow.
            while next < count && outstanding < window.min(self.remote_credits as usize) {
                let Some(slot) = self.free_sends.last().copied() else {
                    break;
                };
                let message = match make(next) {
                    Ok(message) => message,
                    Err(error) => {
                        results[next] = Some(Err(error));
                        next += 1;
                        continue;
                    }
                };
                let offset = (self.credits as usize + usize::from(slot)) * MESSAGE_SLOT;
                let frame_len = wire::encode_into(
                    base + next as u64,
                    &message,
                    &mut self.slab[offset..offset + MESSAGE_SLOT],
                )
                .expect("a request frame is a few bytes");
                let at = self.slab.as_ptr() as u64 + offset as u64;
                let posted = verbs::post_send(
                    &mut self.qp,
                    u64::from(slot),
                    (self.slab_mr.lkey(), at, frame_len as u32),
                );
                if let Err(source) = posted {
                    self.broken = true;
                    self.wcs = wcs;
                    let error = ClientError::Rdma {
                        addr: self.addr.clone(),
                        source,
                    };
                    return fail_rest(results, &error);
                }
                self.free_sends.pop();
                next += 1;
                outstanding += 1;
            }
            if outstanding == 0 && next >= count {
                break;
            }
            wcs.clear();
            if let Err(what) = self.wait(&mut wcs) {
                self.broken = true;
                self.wcs = wcs;
                let error = self.broken_error(what);
                return fail_rest(results, &error);
            }
            if wcs.is_empty() {
                if stalled_since.get_or_insert_with(Instant::now).elapsed() > self.timeout {
                    self.broken = true;
                    self.wcs = wcs;
                    let error = self.broken_error(format!(
                        "no completion for {:?} with {outstanding} requests outstanding",
                        self.timeout
                    ));
                    return fail_rest(results, &error);
                }
                continue;
            }
            stalled_since = None;
            for wc in &wcs {
                if !wc.ok() {
                    self.broken = true;
                    let error =
                        self.broken_error(format!("work request failed: {}", wc.status_text()));
                    self.wcs = std::mem::take(&mut wcs);
                    return fail_rest(results, &error);
                }
                if wc.wr_id & RECV_BIT == 0 {
                    self.free_sends.push(wc.wr_id as u16);
                    continue;
                }
                let index = (wc.wr_id & 0xFFFF) as usize;
                let offset = index * MESSAGE_SLOT;
                let parsed = parse_reply(&self.slab[offset..offset + wc.byte_len as usize]);
                let at = self.slab.as_ptr() as u64 + offset as u64;
                if let Err(source) = verbs::post_recv(
                    &mut self.qp,
                    wc.wr_id,
                    self.slab_mr.lkey(),
                    at,
                    MESSAGE_SLOT as u32,
                ) {
                    self.broken = true;
                    self.wcs = std::mem::take(&mut wcs);
                    let error = ClientError::Rdma {
                        addr: self.addr.clone(),
                        source,
                    };
                    return fail_rest(results, &error);
                }
                let (request_id, message) = match parsed {
                    Ok(parsed) => parsed,
                    Err(source) => {
                        self.broken = true;
                        self.wcs = std::mem::take(&mut wcs);
                        let error = ClientError::Wire {
                            addr: self.addr.clone(),
                            source,
                        };
                        return fail_rest(results, &error);
                    }
                };
                let request = request_id.wrapping_sub(base) as usize;
                if request >= next || results[request].is_some() {
                    self.broken = true;
                    self.wcs = std::mem::take(&mut wcs);
                    let error = ClientError::Unexpected {
                        addr: self.addr.clone(),
                        request_id,
                        got: message.opcode(),
                    };
                    return fail_rest(results, &error);
                }
                outstanding -= 1;
                results[request] = Some(done(request, message));
            }
        }
        self.wcs = wcs;
        results
            .into_iter()
            .map(|result| result.expect("every request answered"))
            .collect()
    }

    /// Waits briefly for completions: spins a little, then sleeps on the completion channel
    /// and the side channel together. Err when the daemon closed the side channel.
    fn wait(&mut self, wcs: &mut Vec<WorkCompletion>) -> Result<(), String> {
        for _ in 0..64 {
            if self.completions.poll(wcs).map_err(|e| e.to_string())? > 0 {
                return Ok(());
            }
            std::hint::spin_loop();
        }
        self.completions.arm().map_err(|e| e.to_string())?;
        if self.completions.poll(wcs).map_err(|e| e.to_string())? > 0 {
            return Ok(());
        }
        let mut fds = [
            libc::pollfd {
                fd: self.completions.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.side.as_raw_fd(),
                events: libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            },
        ];
        // SAFETY: polls two pollfds we own.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, 20) };
        self.completions.poll(wcs).map_err(|e| e.to_string())?;
        if wcs.is_empty() && fds[1].revents != 0 {
            let mut byte = [0u8; 1];
            // SAFETY: peeks at most one byte into `byte`, without blocking.
            let got = unsafe {
                libc::recv(
                    self.side.as_raw_fd(),
                    byte.as_mut_ptr().cast(),
                    1,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            if got == 0
                || (got < 0
                    && std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock)
            {
                return Err(format!(
                    "daemon {} closed the session ({})",
                    self.node, self.peer
                ));
            }
        }
        Ok(())
    }
}

fn parse_reply(bytes: &[u8]) -> Result<(u64, Message), WireError> {
    let head: &[u8; HEADER_SIZE] = bytes
        .get(..HEADER_SIZE)
        .and_then(|head| head.try_into().ok())
        .ok_or(WireError::Truncated { len: bytes.len() })?;
    let header = Header::decode(head, 0)?;
    let body = bytes
        .get(HEADER_SIZE..HEADER_SIZE + header.body_len as usize)
        .ok_or(WireError::Truncated { len: bytes.len() })?;
    Ok((header.request_id, wire::decode_body(&header, body)?))
}

impl Transport for RdmaConnection {
    fn kind(&self) -> TransportKind {
        TransportKind::Rdma
    }

    fn node(&self) -> &str {
        &self.node
    }

    fn addr(&self) -> &str {
        &self.addr
    }

    fn max_payload(&self) -> u32 {
        self.max_payload
    }

    fn read_window(
        &mut self,
        reads: &mut [ReadInto<'_>],
        window: usize,
        mut landed: Option<&mut dyn FnMut(usize, Duration)>,
    ) -> Vec<Result<(), ClientError>> {
        // Timed only for a caller that wants the times (a clock reading is not free everywhere).
        let timed = landed.is_some();
        let sent_at: Vec<Cell<Option<Instant>>> = reads.iter().map(|_| Cell::new(None)).collect();
        let addr = self.addr.clone();
        let max_payload = self.max_payload;
        let client = self.client.clone();
        let targets: Vec<(u64, usize)> = reads
            .iter_mut()
            .map(|read| (read.dest.as_mut_ptr() as u64, read.dest.len()))
            .collect();
        let rkeys = client.rkeys_for(&targets);
        let requests: Vec<(ChunkId, u64, LayoutRef)> = reads
            .iter()
            .map(|read| (read.chunk, read.offset, read.layout))
            .collect();
        let make = |index: usize| {
            let (dest, len) = targets[index];
            if len > max_payload as usize {
                return Err(ClientError::TooLarge {
                    addr: addr.clone(),
                    len,
                    max: max_payload,
                });
            }
            let rkey = rkeys[index].ok_or_else(|| ClientError::Unusable {
                addr: addr.clone(),
                what: format!(
                    "destination of {len} bytes at {dest:#x} is not in memory registered with {}",
                    client.device_name()
                ),
            })?;
            let (chunk, offset, layout) = requests[index];
            sent_at[index].set(timed.then(Instant::now));
            Ok(Message::RdmaRead(RdmaRead {
                chunk,
                offset,
                len: len as u32,
                addr: dest,
                rkey,
                layout,
            }))
        };
        let reply_addr = self.addr.clone();
        let done = |index: usize, message: Message| match message {
            Message::RdmaReadDone(done) => {
                let (dest, len) = targets[index];
                if done.len as usize != len {
                    return Err(ClientError::Unexpected {
                        addr: reply_addr.clone(),
                        request_id: index as u64,
                        got: wire::Opcode::RdmaReadDone,
                    });
                }
                // SAFETY: the daemon's WRITE into this range completed before its SEND (RC
                // ordering); the range is the caller's `dest`, borrowed for this call.
                let bytes = unsafe { std::slice::from_raw_parts(dest as *const u8, len) };
                let checked =
                    ClientError::check_read(&reply_addr, requests[index].0, done.crc, bytes);
                if checked.is_ok()
                    && let (Some(sent), Some(landed)) = (sent_at[index].get(), landed.as_mut())
                {
                    landed(index, sent.elapsed());
                }
                checked
            }
            Message::Error(error) => Err(ClientError::read_refused(
                &reply_addr,
                requests[index].2,
                error,
            )),
            other => Err(ClientError::Unexpected {
                addr: reply_addr.clone(),
                request_id: index as u64,
                got: other.opcode(),
            }),
        };
        self.pipeline(reads.len(), window.max(1), make, done)
    }

    fn write(&mut self, chunk: ChunkId, data: &[u8]) -> Result<(), ClientError> {
        if self
            .writer
            .as_ref()
            .is_none_or(|writer| !writer.is_healthy())
        {
            self.writer = Some(DaemonConnection::connect(
                self.peer,
                &self.token,
                &self.client_name,
                self.timeout,
            )?);
        }
        self.writer
            .as_mut()
            .expect("just connected")
            .write(chunk, data)
    }

    fn delete(&mut self, chunk: ChunkId) -> Result<(), ClientError> {
        let addr = self.addr.clone();
        self.pipeline(
            1,
            1,
            |_| Ok(Message::Delete(Delete { chunk })),
            |_, message| match message {
                Message::DeleteDone => Ok(()),
                Message::Error(error) => Err(ClientError::Remote {
                    addr: addr.clone(),
                    errno: error.errno,
                    message: error.message,
                }),
                other => Err(ClientError::Unexpected {
                    addr: addr.clone(),
                    request_id: 0,
                    got: other.opcode(),
                }),
            },
        )
        .pop()
        .expect("one result")
    }

    fn is_healthy(&self) -> bool {
        !self.broken
    }

    fn fence(&mut self) {
        verbs::disconnect(&mut self.qp);
        self.broken = true;
    }
}

impl Drop for RdmaConnection {
    fn drop(&mut self) {
        // No WRITE may land once the caller may reuse its memory.
        verbs::disconnect(&mut self.qp);
    }
}
