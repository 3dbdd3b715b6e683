//! The wire protocol between clients and data daemons, the same over TCP and RDMA.
//!
//! A frame is a fixed 32-byte header, a bincode body of at most [`MAX_BODY`] bytes, and an
//! optional raw payload (chunk data) of `payload_len` bytes. Chunk data is never bincode: it
//! goes out straight from a registered buffer and lands straight in the reader's destination,
//! and the body that announces it carries its CRC32C. The header's CRC covers the header, the
//! body CRC covers the body: a flipped bit anywhere but the payload is a decode error, and a
//! flipped payload bit fails the payload CRC at the reader. Byte layout: `docs/formats.md`.

use serde::{Deserialize, Serialize};

use crate::store::ChunkId;
use crate::store::format::crc32c;

pub const MAGIC: [u8; 4] = *b"T0NW";
/// 2: `Read` and `RdmaRead` carry the layout they were planned from ([`LayoutRef`]).
/// 3: `Welcome` names the daemon's node-local socket; the local fast path's frames
/// (`LocalAttach`, `LocalPool`, `LocalRead`, `LocalReadDone`, `Release`).
///
/// A new opcode whose frames change no existing body does not bump the version: a peer that
/// predates it refuses the frame by its opcode (`Error(EPROTO)`, "unknown opcode", and the
/// connection closes), while every frame it knows stays readable both ways, so daemons and
/// control planes of either build keep reading and writing through a rolling upgrade.
/// `Replicate` (17) came that way, in version 3.
pub const VERSION: u16 = 3;
pub const HEADER_SIZE: usize = 32;
/// Largest body: requests and replies are small; only chunk data is large, and it is payload.
pub const MAX_BODY: u32 = 64 << 10;
/// Default cap on one frame's payload (a peer may announce a smaller one in its handshake).
pub const DEFAULT_MAX_PAYLOAD: u32 = 64 << 20;

/// What a frame is, from its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Opcode {
    Hello = 1,
    Welcome = 2,
    Read = 3,
    ReadDone = 4,
    Write = 5,
    WriteDone = 6,
    Delete = 7,
    DeleteDone = 8,
    Error = 9,
    RdmaRead = 10,
    RdmaReadDone = 11,
    LocalAttach = 12,
    LocalPool = 13,
    LocalRead = 14,
    LocalReadDone = 15,
    Release = 16,
    Replicate = 17,
}

impl Opcode {
    pub fn from_u16(value: u16) -> Option<Opcode> {
        Some(match value {
            1 => Opcode::Hello,
            2 => Opcode::Welcome,
            3 => Opcode::Read,
            4 => Opcode::ReadDone,
            5 => Opcode::Write,
            6 => Opcode::WriteDone,
            7 => Opcode::Delete,
            8 => Opcode::DeleteDone,
            9 => Opcode::Error,
            10 => Opcode::RdmaRead,
            11 => Opcode::RdmaReadDone,
            12 => Opcode::LocalAttach,
            13 => Opcode::LocalPool,
            14 => Opcode::LocalRead,
            15 => Opcode::LocalReadDone,
            16 => Opcode::Release,
            17 => Opcode::Replicate,
            _ => return None,
        })
    }

    /// Whether frames of this kind carry a payload (and must announce its CRC).
    pub fn has_payload(self) -> bool {
        matches!(self, Opcode::ReadDone | Opcode::Write)
    }
}

/// The first frame on a connection, client to daemon; nothing else is read before it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The cluster token, compared in constant time.
    pub token: Vec<u8>,
    /// Who is asking, for logs (host, process, job).
    pub client: String,
    /// Set when the client wants this session over RDMA: its queue pair. The daemon answers
    /// with its own in `Welcome`, or with none when it has no RDMA device (the session then
    /// stays on TCP, or the client gives up if it insisted on RDMA).
    pub rdma: Option<RdmaEndpoint>,
}

/// One side of a reliable-connected queue pair, as exchanged over the authenticated TCP
/// side channel before any verbs traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RdmaEndpoint {
    /// Port LID (InfiniBand; 0 on RoCE, where the GID routes).
    pub lid: u16,
    pub qp_number: u32,
    /// First packet sequence number this side sends.
    pub psn: u32,
    pub gid: [u8; 16],
    /// Path MTU this side can use, in bytes (256..4096).
    pub mtu: u32,
    /// Requests this side's receive queue holds: the peer never has more outstanding.
    pub credits: u32,
}

/// The daemon's answer to a good `Hello`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The daemon's node name.
    pub node: String,
    /// Largest payload the daemon sends or takes in one frame.
    pub max_payload: u32,
    /// The daemon's queue pair when the client asked for RDMA and the daemon has a device.
    pub rdma: Option<RdmaEndpoint>,
    /// Where a client on the daemon's own node reaches it without the network stack.
    pub local: Option<LocalEndpoint>,
}

/// A daemon's node-local socket: a client whose kernel has the same `boot_id` is on the same
/// node and may connect to `socket` for the shared-memory fast path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalEndpoint {
    /// A Unix socket: `@name` in the abstract namespace, otherwise a filesystem path.
    pub socket: String,
    /// The daemon's `/proc/sys/kernel/random/boot_id`: one per running kernel.
    pub boot_id: String,
}

/// Over the node-local socket: the daemon's answer to `LocalAttach`. The frame carries the
/// worker's buffer pool as a sealed memfd (SCM_RIGHTS), which the client maps read-only:
/// `LocalReadDone` then says where in it a read's bytes lie.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalPool {
    /// Bytes of the pool to map.
    pub len: u64,
    /// Buffers the client may hold (answered but not released) at once; a read past that
    /// is refused (`EBUSY`).
    pub held_max: u32,
}

/// Over the node-local socket: read `len` bytes at `offset` of a chunk into the daemon's
/// shared pool, through layout `layout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalRead {
    pub chunk: ChunkId,
    pub offset: u64,
    pub len: u32,
    pub layout: LayoutRef,
}

/// The bytes of a `LocalRead` lie at `offset` of the shared pool, held for the client as
/// `lease` until it sends `Release`; `crc` is their CRC32C.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalReadDone {
    pub len: u32,
    pub crc: u32,
    pub offset: u64,
    pub lease: u32,
}

/// The client has copied these leases' bytes out: the daemon may reuse the buffers. No reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub leases: Vec<u32>,
}

/// The layout a read was planned from: the file it belongs to and that layout's version.
///
/// `file` is the layout's file, which may differ from the chunk's `ChunkId::file` (a
/// restored file reuses another file's chunks); daemons fence reads by it (`fence`).
/// `LayoutRef::default()` (version 0) is a read not made through a layout (benchmarks, tools
/// that address chunks directly): it is never fenced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LayoutRef {
    pub file: u64,
    pub version: u64,
}

impl LayoutRef {
    /// Whether this read was made through a layout (and so may be fenced).
    pub fn is_versioned(&self) -> bool {
        self.version != 0
    }
}

/// Read `len` bytes at `offset` of a chunk, through layout `layout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Read {
    pub chunk: ChunkId,
    pub offset: u64,
    pub len: u32,
    pub layout: LayoutRef,
}

/// The bytes of a read follow as payload; `crc` is their CRC32C.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadDone {
    pub len: u32,
    pub crc: u32,
}

/// Store a new chunk; its bytes follow as payload, `crc` is their CRC32C.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Write {
    pub chunk: ChunkId,
    pub len: u32,
    pub crc: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delete {
    pub chunk: ChunkId,
}

/// Store chunk `chunk`, `len` bytes, fetched by this daemon from the daemon at `source`
/// (`HOST:PORT`, as nodes register): the control plane's copy order, sent to the target. The
/// target reads the chunk from the source over TCP with the cluster token, checks its
/// checksum as any reader does, stores it as a `Write` would, and answers `WriteDone`; the
/// bytes never pass through the requester. Errors: `EEXIST` the chunk is here already,
/// `ENOENT` the source has not got it, `EIO` the source failed or did not answer in time,
/// `EINVAL` a bad address or length, `EBUSY` too many copies in flight here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replicate {
    pub chunk: ChunkId,
    pub len: u32,
    pub source: String,
}

/// Over RDMA: read `len` bytes at `offset` of a chunk and RDMA-WRITE them to `addr` in the
/// client's memory region `rkey`, through layout `layout`. Sent as a SEND on the queue pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RdmaRead {
    pub chunk: ChunkId,
    pub offset: u64,
    pub len: u32,
    pub addr: u64,
    pub rkey: u32,
    pub layout: LayoutRef,
}

/// Over RDMA: the bytes of a read were written to the client's region (the reliable-connected
/// queue pair places the WRITE before this SEND arrives); `crc` is their CRC32C.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RdmaReadDone {
    pub len: u32,
    pub crc: u32,
}

/// A request failed: `errno` says how (ENOENT, EEXIST, ENOSPC, EIO, EBADMSG for a checksum,
/// EPROTO for a malformed frame, EACCES for a bad token, ESTALE for a read at a layout version
/// the daemon has fenced off: the client reopens the file), `message` says what and where.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub errno: i32,
    pub message: String,
}

/// A frame's body, by opcode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    Read(Read),
    ReadDone(ReadDone),
    Write(Write),
    WriteDone,
    Delete(Delete),
    DeleteDone,
    Error(ErrorReply),
    RdmaRead(RdmaRead),
    RdmaReadDone(RdmaReadDone),
    LocalAttach,
    LocalPool(LocalPool),
    LocalRead(LocalRead),
    LocalReadDone(LocalReadDone),
    Release(Release),
    Replicate(Replicate),
}

impl Message {
    pub fn opcode(&self) -> Opcode {
        match self {
            Message::Hello(_) => Opcode::Hello,
            Message::Welcome(_) => Opcode::Welcome,
            Message::Read(_) => Opcode::Read,
            Message::ReadDone(_) => Opcode::ReadDone,
            Message::Write(_) => Opcode::Write,
            Message::WriteDone => Opcode::WriteDone,
            Message::Delete(_) => Opcode::Delete,
            Message::DeleteDone => Opcode::DeleteDone,
            Message::Error(_) => Opcode::Error,
            Message::RdmaRead(_) => Opcode::RdmaRead,
            Message::RdmaReadDone(_) => Opcode::RdmaReadDone,
            Message::LocalAttach => Opcode::LocalAttach,
            Message::LocalPool(_) => Opcode::LocalPool,
            Message::LocalRead(_) => Opcode::LocalRead,
            Message::LocalReadDone(_) => Opcode::LocalReadDone,
            Message::Release(_) => Opcode::Release,
            Message::Replicate(_) => Opcode::Replicate,
        }
    }

    /// Payload bytes that follow this message's frame.
    pub fn payload_len(&self) -> u32 {
        match self {
            Message::ReadDone(done) => done.len,
            Message::Write(write) => write.len,
            _ => 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("not a tier0 frame (magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("unsupported protocol version {0} (this build speaks {VERSION})")]
    UnsupportedVersion(u16),
    #[error("frame header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    HeaderChecksum { stored: u32, computed: u32 },
    #[error("frame body checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BodyChecksum { stored: u32, computed: u32 },
    #[error("unknown opcode {0}")]
    UnknownOpcode(u16),
    #[error("{opcode:?} body of {len} bytes exceeds {max}")]
    BodyTooLong { opcode: Opcode, len: u32, max: u32 },
    #[error("{opcode:?} payload of {len} bytes exceeds {max}")]
    PayloadTooLong { opcode: Opcode, len: u32, max: u32 },
    #[error("{opcode:?} frames carry no payload, this one announces {len} bytes")]
    UnexpectedPayload { opcode: Opcode, len: u32 },
    #[error("{opcode:?} announces {announced} payload bytes in its header, {body} in its body")]
    PayloadMismatch {
        opcode: Opcode,
        announced: u32,
        body: u32,
    },
    #[error("malformed {opcode:?} body: {reason}")]
    Body { opcode: Opcode, reason: String },
    #[error("frame cut short after {len} bytes")]
    Truncated { len: usize },
    #[error("payload checksum mismatch (announced {announced:#010x}, computed {computed:#010x})")]
    PayloadChecksum { announced: u32, computed: u32 },
}

/// A decoded, checked frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub opcode: Opcode,
    pub request_id: u64,
    pub body_len: u32,
    pub payload_len: u32,
    pub body_crc: u32,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut bytes = [0; HEADER_SIZE];
        bytes[0..4].copy_from_slice(&MAGIC);
        bytes[4..6].copy_from_slice(&VERSION.to_le_bytes());
        bytes[6..8].copy_from_slice(&(self.opcode as u16).to_le_bytes());
        bytes[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        bytes[16..20].copy_from_slice(&self.body_len.to_le_bytes());
        bytes[20..24].copy_from_slice(&self.payload_len.to_le_bytes());
        bytes[24..28].copy_from_slice(&self.body_crc.to_le_bytes());
        let crc = crc32c(&bytes[..28]);
        bytes[28..32].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    /// Checks everything a header alone can say: magic, CRC, version, opcode, and the body and
    /// payload lengths against the limits (`max_payload` is this side's cap).
    pub fn decode(bytes: &[u8; HEADER_SIZE], max_payload: u32) -> Result<Header, WireError> {
        let magic: [u8; 4] = bytes[0..4].try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let stored = u32_at(bytes, 28);
        let computed = crc32c(&bytes[..28]);
        if stored != computed {
            return Err(WireError::HeaderChecksum { stored, computed });
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != VERSION {
            return Err(WireError::UnsupportedVersion(version));
        }
        let raw = u16::from_le_bytes([bytes[6], bytes[7]]);
        let opcode = Opcode::from_u16(raw).ok_or(WireError::UnknownOpcode(raw))?;
        let body_len = u32_at(bytes, 16);
        if body_len > MAX_BODY {
            return Err(WireError::BodyTooLong {
                opcode,
                len: body_len,
                max: MAX_BODY,
            });
        }
        let payload_len = u32_at(bytes, 20);
        if payload_len > 0 && !opcode.has_payload() {
            return Err(WireError::UnexpectedPayload {
                opcode,
                len: payload_len,
            });
        }
        if payload_len > max_payload {
            return Err(WireError::PayloadTooLong {
                opcode,
                len: payload_len,
                max: max_payload,
            });
        }
        Ok(Header {
            opcode,
            request_id: u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")),
            body_len,
            payload_len,
            body_crc: u32_at(bytes, 24),
        })
    }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
        .with_limit::<{ MAX_BODY as usize }>()
}

/// Appends the header and body of a frame to `out`; the payload, if the message announces
/// one, is sent after it by the caller, straight from where it lies. A body over
/// [`MAX_BODY`] (a giant token or message) is an error and leaves `out` as it was.
pub fn encode(request_id: u64, message: &Message, out: &mut Vec<u8>) -> Result<(), WireError> {
    let start = out.len();
    out.resize(start + HEADER_SIZE, 0);
    let body = match encode_body(message, out) {
        Ok(len) if len <= MAX_BODY as usize => len,
        _ => {
            let len = out.len() - start - HEADER_SIZE;
            out.truncate(start);
            return Err(WireError::BodyTooLong {
                opcode: message.opcode(),
                len: len as u32,
                max: MAX_BODY,
            });
        }
    };
    let header = header_for(request_id, message, &out[start + HEADER_SIZE..][..body]);
    out[start..start + HEADER_SIZE].copy_from_slice(&header.encode());
    Ok(())
}

/// Encodes a whole frame (no payload) into `slot`, a registered message slot, and returns
/// its length: nothing is allocated or copied on the way. A frame that does not fit is an
/// error, and what `slot` then holds is unspecified.
pub fn encode_into(
    request_id: u64,
    message: &Message,
    slot: &mut [u8],
) -> Result<usize, WireError> {
    let max = slot
        .len()
        .saturating_sub(HEADER_SIZE)
        .min(MAX_BODY as usize) as u32;
    let too_long = |len: usize| WireError::BodyTooLong {
        opcode: message.opcode(),
        len: len as u32,
        max,
    };
    if slot.len() < HEADER_SIZE {
        return Err(too_long(0));
    }
    let (head, body) = slot.split_at_mut(HEADER_SIZE);
    let body = &mut body[..max as usize];
    let mut cursor: &mut [u8] = body;
    let len = encode_body(message, &mut cursor).map_err(|()| too_long(max as usize + 1))?;
    let header = header_for(request_id, message, &body[..len]);
    head.copy_from_slice(&header.encode());
    Ok(HEADER_SIZE + len)
}

fn header_for(request_id: u64, message: &Message, body: &[u8]) -> Header {
    Header {
        opcode: message.opcode(),
        request_id,
        body_len: body.len() as u32,
        payload_len: message.payload_len(),
        body_crc: crc32c(body),
    }
}

/// Writes a message's bincode body; fails only when the writer is full (a slice) — the size
/// limit is checked by the caller (bincode's limit guards only decoding).
fn encode_body(message: &Message, out: &mut impl std::io::Write) -> Result<usize, ()> {
    fn body<T: Serialize>(body: &T, out: &mut impl std::io::Write) -> Result<usize, ()> {
        bincode::serde::encode_into_std_write(body, out, bincode_config()).map_err(|_| ())
    }
    match message {
        Message::Hello(message) => body(message, out),
        Message::Welcome(message) => body(message, out),
        Message::Read(message) => body(message, out),
        Message::ReadDone(message) => body(message, out),
        Message::Write(message) => body(message, out),
        Message::Delete(message) => body(message, out),
        Message::Error(message) => body(message, out),
        Message::RdmaRead(message) => body(message, out),
        Message::RdmaReadDone(message) => body(message, out),
        Message::LocalPool(message) => body(message, out),
        Message::LocalRead(message) => body(message, out),
        Message::LocalReadDone(message) => body(message, out),
        Message::Release(message) => body(message, out),
        Message::Replicate(message) => body(message, out),
        Message::WriteDone | Message::DeleteDone | Message::LocalAttach => Ok(0),
    }
}

/// Decodes and checks a body for `header` (whose body CRC is checked here).
pub fn decode_body(header: &Header, body: &[u8]) -> Result<Message, WireError> {
    let computed = crc32c(body);
    if computed != header.body_crc {
        return Err(WireError::BodyChecksum {
            stored: header.body_crc,
            computed,
        });
    }
    let opcode = header.opcode;
    let message = match opcode {
        Opcode::Hello => Message::Hello(decode_exact(opcode, body)?),
        Opcode::Welcome => Message::Welcome(decode_exact(opcode, body)?),
        Opcode::Read => Message::Read(decode_exact(opcode, body)?),
        Opcode::ReadDone => Message::ReadDone(decode_exact(opcode, body)?),
        Opcode::Write => Message::Write(decode_exact(opcode, body)?),
        Opcode::WriteDone => {
            decode_empty(opcode, body)?;
            Message::WriteDone
        }
        Opcode::Delete => Message::Delete(decode_exact(opcode, body)?),
        Opcode::DeleteDone => {
            decode_empty(opcode, body)?;
            Message::DeleteDone
        }
        Opcode::Error => Message::Error(decode_exact(opcode, body)?),
        Opcode::RdmaRead => Message::RdmaRead(decode_exact(opcode, body)?),
        Opcode::RdmaReadDone => Message::RdmaReadDone(decode_exact(opcode, body)?),
        Opcode::LocalAttach => {
            decode_empty(opcode, body)?;
            Message::LocalAttach
        }
        Opcode::LocalPool => Message::LocalPool(decode_exact(opcode, body)?),
        Opcode::LocalRead => Message::LocalRead(decode_exact(opcode, body)?),
        Opcode::LocalReadDone => Message::LocalReadDone(decode_exact(opcode, body)?),
        Opcode::Release => Message::Release(decode_exact(opcode, body)?),
        Opcode::Replicate => Message::Replicate(decode_exact(opcode, body)?),
    };
    let body_payload = message.payload_len();
    if body_payload != header.payload_len {
        return Err(WireError::PayloadMismatch {
            opcode,
            announced: header.payload_len,
            body: body_payload,
        });
    }
    Ok(message)
}

fn decode_exact<T: serde::de::DeserializeOwned>(
    opcode: Opcode,
    body: &[u8],
) -> Result<T, WireError> {
    let (value, used) =
        bincode::serde::decode_from_slice(body, bincode_config()).map_err(|error| {
            WireError::Body {
                opcode,
                reason: error.to_string(),
            }
        })?;
    if used != body.len() {
        return Err(WireError::Body {
            opcode,
            reason: format!("{} trailing bytes", body.len() - used),
        });
    }
    Ok(value)
}

fn decode_empty(opcode: Opcode, body: &[u8]) -> Result<(), WireError> {
    if body.is_empty() {
        Ok(())
    } else {
        Err(WireError::Body {
            opcode,
            reason: format!("{} bytes where none belong", body.len()),
        })
    }
}

/// Checks a received payload against the CRC its frame announced.
pub fn check_payload(announced: u32, payload: &[u8]) -> Result<(), WireError> {
    let mut check = PayloadCheck::default();
    check.update(payload);
    check.finish(announced)
}

/// [`check_payload`] for a payload that arrives in pieces: each piece is summed as it lands,
/// while its bytes are still in cache, not in a second pass over the whole payload.
#[derive(Clone, Debug)]
pub struct PayloadCheck {
    digest: crc_fast::Digest,
}

impl Default for PayloadCheck {
    fn default() -> Self {
        PayloadCheck {
            digest: crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi),
        }
    }
}

impl PayloadCheck {
    pub fn update(&mut self, piece: &[u8]) {
        self.digest.update(piece);
    }

    /// Whether the pieces summed so far have the CRC32C `announced`.
    pub fn finish(&self, announced: u32) -> Result<(), WireError> {
        let computed = self.digest.finalize() as u32;
        if computed == announced {
            Ok(())
        } else {
            Err(WireError::PayloadChecksum {
                announced,
                computed,
            })
        }
    }
}

/// Decodes one whole frame held in `bytes` (header, body, payload): for tests, fuzzing and
/// tools. Returns the message and the payload slice.
pub fn decode_frame(bytes: &[u8], max_payload: u32) -> Result<(Header, Message, &[u8]), WireError> {
    let too_short = || WireError::Truncated { len: bytes.len() };
    let head: &[u8; HEADER_SIZE] = bytes
        .get(..HEADER_SIZE)
        .and_then(|head| head.try_into().ok())
        .ok_or_else(too_short)?;
    let header = Header::decode(head, max_payload)?;
    let body_end = HEADER_SIZE + header.body_len as usize;
    let body = bytes.get(HEADER_SIZE..body_end).ok_or_else(too_short)?;
    let message = decode_body(&header, body)?;
    let payload = bytes
        .get(body_end..body_end + header.payload_len as usize)
        .ok_or_else(too_short)?;
    Ok((header, message, payload))
}
