//! The client of a tier0 cluster: files by path, through the control plane once per open and
//! straight from the data daemons for every read.
//!
//! [`Client::open`] asks the control plane for a file's layout and caches it; reads use the
//! cached layout, striped over the daemons it names. A daemon that has learned of a newer
//! layout version refuses the read as stale; the client then drops the cached layout, opens
//! the file again and reads with the new layout (a few times at most, in case the layout keeps
//! moving). Until a daemon has heard of the change, a read at the cached layout returns the
//! cached version's bytes, which are still right for that version (immutable chunks).

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tier0_control_api::client::ControlClient;
use tier0_control_api::proto;
use tier0_dataplane::net::wire::LayoutRef;
use tier0_dataplane::store::ChunkId;

use crate::buffer::ReadBuffer;
use crate::daemon::DaemonConnection;
use crate::striped::{
    DaemonEndpoint, ReadReport, StripedChunk, StripedError, StripedFile, StripedReader,
};
use crate::transport::{TransportChoice, TransportKind};

mod namespace;

/// Reads retried with a reopened layout before a stale refusal is returned.
const STALE_RETRIES: usize = 3;

/// One version of a file as the control plane laid it out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileLayout {
    pub path: String,
    pub file_id: u64,
    pub version: u64,
    pub layout_version: u64,
    pub size: u64,
    pub chunk_size: u32,
    pub chunks: Vec<LayoutChunk>,
    /// The failure domain of each daemon the chunks name.
    pub domains: HashMap<SocketAddr, String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayoutChunk {
    pub id: ChunkId,
    pub file_offset: u64,
    pub len: u32,
    /// The daemons holding a replica.
    pub replicas: Vec<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error(transparent)]
    Connect(#[from] tier0_control_api::client::ClientError),
    #[error("{what}: {status} (control plane {url})", status = .status.message())]
    Control {
        what: String,
        url: String,
        status: Box<tonic::Status>,
    },
    #[error("{path}: the control plane's layout is malformed: {message}")]
    Layout { path: String, message: String },
    #[error("{path}: {source}")]
    Read {
        path: String,
        #[source]
        source: Box<StripedError>,
    },
    #[error("cannot start the client's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{path}: writing chunk {index} to {addr}: {source}")]
    Write {
        path: String,
        index: u32,
        addr: SocketAddr,
        #[source]
        source: Box<crate::daemon::ClientError>,
    },
    #[error("{path}: {message}")]
    Writer { path: String, message: String },
    #[error("TIER0_TRANSPORT: {0}")]
    Transport(String),
}

/// The daemons this client has read from, and one striped reader over all of them (its
/// connections are kept across reads).
struct Readers {
    addresses: Vec<SocketAddr>,
    /// Each address's index in `addresses` (the reader's daemon index).
    index_of: HashMap<SocketAddr, usize>,
    /// Each address's distance, worked out once, when it was first seen.
    distances: Vec<u32>,
    reader: Option<StripedReader>,
}

pub struct Client {
    runtime: tokio::runtime::Runtime,
    control: ControlClient,
    token: Vec<u8>,
    name: String,
    choice: TransportChoice,
    /// This client's failure domain (`TIER0_FAILURE_DOMAIN`): replicas there are preferred
    /// after those on this host.
    failure_domain: Option<String>,
    layouts: Mutex<HashMap<String, Arc<FileLayout>>>,
    readers: Mutex<Readers>,
    /// Idle connections for writes, by daemon.
    writers: Mutex<HashMap<SocketAddr, Vec<DaemonConnection>>>,
    reopens: AtomicU64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("control", &self.control.url)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to the control plane at `control` with the cluster token. Reads from a
    /// daemon on this node take the node-local shared-memory path, others go over TCP
    /// (RDMA reads come through a striped reader with registered buffers);
    /// `TIER0_TRANSPORT=tcp|local|auto` overrides that. The client runs
    /// its own small runtime for control-plane calls: call it from plain threads, not from
    /// inside an async runtime.
    pub fn connect(control: &str, token: &[u8], name: &str) -> Result<Client, FileError> {
        let choice = match std::env::var("TIER0_TRANSPORT") {
            Ok(text) if !text.is_empty() => match text
                .parse::<TransportChoice>()
                .map_err(FileError::Transport)?
            {
                TransportChoice::Rdma => {
                    return Err(FileError::Transport(
                        "rdma: this client opens no RDMA device (use auto, tcp or local)".into(),
                    ));
                }
                choice => choice,
            },
            _ => TransportChoice::Auto,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(FileError::Runtime)?;
        let client = runtime.block_on(ControlClient::connect(control, token))?;
        Ok(Client {
            runtime,
            control: client,
            token: token.to_vec(),
            name: name.to_owned(),
            choice,
            failure_domain: std::env::var("TIER0_FAILURE_DOMAIN")
                .ok()
                .filter(|d| !d.is_empty()),
            layouts: Mutex::new(HashMap::new()),
            readers: Mutex::new(Readers {
                addresses: Vec::new(),
                index_of: HashMap::new(),
                distances: Vec::new(),
                reader: None,
            }),
            writers: Mutex::new(HashMap::new()),
            reopens: AtomicU64::new(0),
        })
    }

    /// Starts a new version of the file at `path` (made if missing; its directory must
    /// exist). Nothing is visible to readers until [`FileWriter::close`] commits it; a writer
    /// dropped without closing commits nothing (its chunks are collected later).
    pub fn create(&self, path: &str) -> Result<FileWriter<'_>, FileError> {
        self.create_with(path, false)
    }

    /// As [`create`](Self::create), but the file must not exist yet (`O_EXCL`): of two
    /// such creators, one gets `AlreadyExists` from the control plane.
    pub fn create_new(&self, path: &str) -> Result<FileWriter<'_>, FileError> {
        self.create_with(path, true)
    }

    fn create_with(&self, path: &str, exclusive: bool) -> Result<FileWriter<'_>, FileError> {
        let mut namespace = self.control.namespace.clone();
        let entry = self
            .runtime
            .block_on(namespace.create(proto::CreateRequest {
                path: path.to_owned(),
                exclusive,
                settings: None,
            }))
            .map_err(|status| self.control_error(format!("create {path}"), status))?
            .into_inner()
            .entry
            .ok_or_else(|| FileError::Writer {
                path: path.to_owned(),
                message: "the control plane returned no entry".to_owned(),
            })?;
        let chunk_size = entry.settings.map(|s| s.chunk_size).unwrap_or(0);
        if chunk_size == 0 {
            return Err(FileError::Writer {
                path: path.to_owned(),
                message: "the control plane returned no chunk size".to_owned(),
            });
        }
        Ok(FileWriter {
            client: self,
            path: path.to_owned(),
            file_id: entry.id,
            base_version: entry.version,
            chunk_size: chunk_size as usize,
            pending: Vec::with_capacity(chunk_size as usize),
            written: Vec::new(),
            size: 0,
        })
    }

    /// Writes `data` as the new version of `path` and commits it.
    pub fn write_file(&self, path: &str, data: &[u8]) -> Result<Arc<FileLayout>, FileError> {
        let mut writer = self.create(path)?;
        writer.write(data)?;
        writer.close()
    }

    fn control_error(&self, what: String, status: tonic::Status) -> FileError {
        FileError::Control {
            what,
            url: self.control.url.clone(),
            status: Box::new(status),
        }
    }

    fn take_writer(
        &self,
        addr: SocketAddr,
    ) -> Result<DaemonConnection, crate::daemon::ClientError> {
        let idle = self
            .writers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&addr)
            .and_then(|idle| idle.pop());
        match idle {
            Some(connection) if connection.is_healthy() => Ok(connection),
            _ => DaemonConnection::connect(addr, &self.token, &self.name, Duration::from_secs(10)),
        }
    }

    fn return_writer(&self, addr: SocketAddr, connection: DaemonConnection) {
        if connection.is_healthy() {
            self.writers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(addr)
                .or_default()
                .push(connection);
        }
    }

    /// How many times a stale refusal made this client reopen a file.
    pub fn reopens(&self) -> u64 {
        self.reopens.load(Ordering::Relaxed)
    }

    /// The transport each daemon this client has read from is connected with (`None`: not
    /// connected now), by daemon address.
    pub fn transports(&self) -> Vec<(SocketAddr, Option<TransportKind>)> {
        let readers = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        match &readers.reader {
            Some(reader) => readers
                .addresses
                .iter()
                .copied()
                .zip(reader.transports())
                .collect(),
            None => Vec::new(),
        }
    }

    /// The file's layout: cached, or asked of the control plane once.
    pub fn open(&self, path: &str) -> Result<Arc<FileLayout>, FileError> {
        if let Some(layout) = self.cache().get(path) {
            return Ok(Arc::clone(layout));
        }
        self.reopen(path)
    }

    /// Asks the control plane for the file's current layout, replacing the cached one.
    pub fn reopen(&self, path: &str) -> Result<Arc<FileLayout>, FileError> {
        let mut namespace = self.control.namespace.clone();
        let reply = self
            .runtime
            .block_on(namespace.open(proto::OpenRequest {
                path: path.to_owned(),
                version: 0,
            }))
            .map_err(|status| self.control_error(format!("open {path}"), status))?;
        let layout = Arc::new(file_layout(reply.into_inner())?);
        self.cache().insert(path.to_owned(), Arc::clone(&layout));
        Ok(layout)
    }

    /// The layout of `version` of the file at `path`, now (not cached): how a reader pinned
    /// to one version carries on after its layout version moved (a replica moved, or a
    /// newer version was committed while the pinned one is still kept).
    pub fn open_version(&self, path: &str, version: u64) -> Result<Arc<FileLayout>, FileError> {
        let mut namespace = self.control.namespace.clone();
        let reply = self
            .runtime
            .block_on(namespace.open(proto::OpenRequest {
                path: path.to_owned(),
                version,
            }))
            .map_err(|status| {
                self.control_error(format!("open {path} version {version}"), status)
            })?;
        Ok(Arc::new(file_layout(reply.into_inner())?))
    }

    /// Reads ranges of one file through exactly `layout`, as an open file handle does:
    /// every byte comes from that version. Each range is `(offset, len, buffer_offset)`;
    /// returns the bytes each got (short past the end). A stale refusal is returned as it
    /// is (`FileError::Read` with `StripedError::StaleLayout`): the caller reopens the same
    /// version ([`open_version`](Self::open_version)) or gives up, never silently moving to
    /// another version.
    pub fn read_pinned(
        &self,
        layout: &FileLayout,
        ranges: &[(u64, u64, u64)],
        buffer: &mut ReadBuffer,
    ) -> Result<Vec<u64>, FileError> {
        let mut spans = Vec::new();
        let mut got = Vec::with_capacity(ranges.len());
        let pinned = LayoutRef {
            file: layout.file_id,
            version: layout.layout_version,
        };
        for &(offset, len, buffer_offset) in ranges {
            got.push(range_spans(layout, offset, len, buffer_offset, &mut spans));
        }
        // SAFETY: `&mut` gives this call the whole buffer.
        unsafe { self.read_spans(spans, &[layout], pinned, buffer) }
            .map(|_| got)
            .map_err(|source| FileError::Read {
                path: layout.path.clone(),
                source: Box::new(source),
            })
    }

    /// Forgets a cached layout (the next open asks the control plane).
    pub fn forget(&self, path: &str) {
        self.cache().remove(path);
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<FileLayout>>> {
        self.layouts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the whole file into `buffer`, striped over its daemons; returns its layout (the
    /// version read) and what the read did. A stale layout is reopened and the read redone.
    pub fn read(
        &self,
        path: &str,
        buffer: &mut ReadBuffer,
    ) -> Result<(Arc<FileLayout>, ReadReport), FileError> {
        let mut layout = self.open(path)?;
        let mut attempt = 0;
        loop {
            match self.read_layout(&layout, buffer) {
                Err(StripedError::StaleLayout { .. }) if attempt < STALE_RETRIES => {
                    attempt += 1;
                    self.reopens.fetch_add(1, Ordering::Relaxed);
                    layout = self.reopen(path)?;
                }
                Err(source) => {
                    return Err(FileError::Read {
                        path: path.to_owned(),
                        source: Box::new(source),
                    });
                }
                Ok(report) => return Ok((layout, report)),
            }
        }
    }

    fn read_layout(
        &self,
        layout: &FileLayout,
        buffer: &mut ReadBuffer,
    ) -> Result<ReadReport, StripedError> {
        let spans = layout
            .chunks
            .iter()
            .map(|chunk| Span {
                chunk: chunk.id,
                buffer_offset: chunk.file_offset,
                chunk_offset: 0,
                len: chunk.len,
                replicas: &chunk.replicas,
                layout: None,
            })
            .collect();
        let pinned = LayoutRef {
            file: layout.file_id,
            version: layout.layout_version,
        };
        // SAFETY: `&mut` gives this call the whole buffer.
        unsafe { self.read_spans(spans, &[layout], pinned, buffer) }
    }

    /// Reads many ranges of many files into one buffer in one striped pass: each read is
    /// `len` bytes at `offset` of `path`, landing at `buffer_offset` (ranges must not
    /// overlap). Returns how many bytes each read got (fewer than `len` past the end of its
    /// file). Layouts come from the cache; a stale one is reopened and the batch read again.
    pub fn read_batch(
        &self,
        reads: &[BatchRead],
        buffer: &mut ReadBuffer,
    ) -> Result<Vec<u64>, FileError> {
        // SAFETY: `&mut` gives this call the whole buffer.
        unsafe { self.read_batch_shared(reads, buffer) }
    }

    /// As [`read_batch`](Self::read_batch), into a buffer others may use meanwhile: only
    /// the reads' ranges are written, and no reference to any other byte is made (the C
    /// ABI's rings, whose application keeps using the rest of its buffer).
    ///
    /// # Safety
    /// Until this returns, nothing else reads or writes the reads' ranges of `buffer`
    /// (`buffer_offset .. buffer_offset + len` of each).
    pub unsafe fn read_batch_shared(
        &self,
        reads: &[BatchRead],
        buffer: &ReadBuffer,
    ) -> Result<Vec<u64>, FileError> {
        let mut attempt = 0;
        loop {
            let mut layouts: HashMap<&str, Arc<FileLayout>> = HashMap::new();
            for read in reads {
                if !layouts.contains_key(read.path.as_str()) {
                    layouts.insert(&read.path, self.open(&read.path)?);
                }
            }
            let mut spans = Vec::new();
            let mut got = Vec::with_capacity(reads.len());
            for read in reads {
                let layout = &layouts[read.path.as_str()];
                got.push(range_spans(
                    layout,
                    read.offset,
                    read.len,
                    read.buffer_offset,
                    &mut spans,
                ));
            }
            let planned: Vec<&FileLayout> = layouts.values().map(|layout| &**layout).collect();
            // SAFETY: the spans lie inside the reads' ranges, which are the caller's to give.
            match unsafe { self.read_spans(spans, &planned, LayoutRef::default(), buffer) } {
                Ok(_) => return Ok(got),
                Err(StripedError::StaleLayout { file, .. }) if attempt < STALE_RETRIES => {
                    attempt += 1;
                    self.reopens.fetch_add(1, Ordering::Relaxed);
                    for (path, layout) in &layouts {
                        if layout.file_id == file {
                            self.reopen(path)?;
                        }
                    }
                }
                Err(source) => {
                    let path = reads.first().map(|r| r.path.clone()).unwrap_or_default();
                    return Err(FileError::Read {
                        path: if reads.len() > 1 {
                            format!("{path} (and {} more reads)", reads.len() - 1)
                        } else {
                            path
                        },
                        source: Box::new(source),
                    });
                }
            }
        }
    }

    /// Reads `spans` through the striped reader over every daemon this client knows.
    /// `layouts` are those the spans were planned from: they name each daemon's failure
    /// domain, looked at only when a daemon is new to this client.
    ///
    /// # Safety
    /// Until this returns, nothing else reads or writes the bytes of `buffer` the spans land
    /// in.
    unsafe fn read_spans(
        &self,
        spans: Vec<Span<'_>>,
        layouts: &[&FileLayout],
        layout: LayoutRef,
        buffer: &ReadBuffer,
    ) -> Result<ReadReport, StripedError> {
        let mut readers = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        let known = readers.addresses.len();
        let own = self.failure_domain.as_deref();
        for span in &spans {
            for addr in span.replicas {
                if !readers.index_of.contains_key(addr) {
                    let domain = layouts
                        .iter()
                        .find_map(|layout| layout.domains.get(addr))
                        .map(String::as_str);
                    let index = readers.addresses.len();
                    readers.index_of.insert(*addr, index);
                    readers.addresses.push(*addr);
                    readers.distances.push(distance(*addr, domain, own));
                }
            }
        }
        // A daemon new to this client: a reader over every daemon, ranked by distance (its
        // connections are kept across reads otherwise).
        if readers.addresses.len() > known || readers.reader.is_none() {
            let endpoints = readers
                .addresses
                .iter()
                .zip(&readers.distances)
                .map(|(&addr, &distance)| DaemonEndpoint { addr, distance })
                .collect();
            readers.reader = Some(
                StripedReader::new(endpoints, &self.token, &self.name, self.choice, None)
                    .with_timeout(Duration::from_secs(10)),
            );
        }
        let file = StripedFile {
            chunks: spans
                .into_iter()
                .map(|span| StripedChunk {
                    chunk: span.chunk,
                    file_offset: span.buffer_offset,
                    chunk_offset: span.chunk_offset,
                    len: span.len,
                    replicas: span
                        .replicas
                        .iter()
                        .map(|addr| readers.index_of[addr])
                        .collect(),
                    layout: span.layout,
                })
                .collect(),
            layout,
        };
        let reader = readers.reader.as_mut().expect("made above");
        // SAFETY: the spans' ranges are the caller's to give (this function's contract).
        unsafe { reader.read_shared(&file, buffer) }
    }
}

/// One read of a batch ([`Client::read_batch`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchRead {
    pub path: String,
    pub offset: u64,
    pub len: u64,
    /// Where in the buffer the bytes land.
    pub buffer_offset: u64,
}

/// Appends the spans that read `len` bytes at `offset` of `layout`'s file into the buffer at
/// `buffer_offset`, each stamped with the layout; returns how many bytes that is (fewer past
/// the end of the file).
fn range_spans<'a>(
    layout: &'a FileLayout,
    offset: u64,
    len: u64,
    buffer_offset: u64,
    spans: &mut Vec<Span<'a>>,
) -> u64 {
    let end = offset.saturating_add(len).min(layout.size);
    let stamp = LayoutRef {
        file: layout.file_id,
        version: layout.layout_version,
    };
    for chunk in &layout.chunks {
        let from = offset.max(chunk.file_offset);
        let to = end.min(chunk.file_offset + u64::from(chunk.len));
        if from < to {
            spans.push(Span {
                chunk: chunk.id,
                buffer_offset: buffer_offset + (from - offset),
                chunk_offset: from - chunk.file_offset,
                len: (to - from) as u32,
                replicas: &chunk.replicas,
                layout: Some(stamp),
            });
        }
    }
    end.saturating_sub(offset)
}

/// A piece of a chunk to read, and where it goes.
struct Span<'a> {
    chunk: ChunkId,
    buffer_offset: u64,
    chunk_offset: u64,
    len: u32,
    replicas: &'a [SocketAddr],
    layout: Option<LayoutRef>,
}

/// A new version of a file being written: bytes are cut into chunks, each placed by the
/// control plane and written to all its replicas as it fills; `close` commits them.
pub struct FileWriter<'a> {
    client: &'a Client,
    path: String,
    file_id: u64,
    base_version: u64,
    chunk_size: usize,
    pending: Vec<u8>,
    written: Vec<proto::CommitChunk>,
    size: u64,
}

impl std::fmt::Debug for FileWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileWriter")
            .field("path", &self.path)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl FileWriter<'_> {
    /// Appends `data`; full chunks are written to their replicas before this returns.
    pub fn write(&mut self, mut data: &[u8]) -> Result<(), FileError> {
        while !data.is_empty() {
            let room = self.chunk_size - self.pending.len();
            let take = room.min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            self.size += take as u64;
            if self.pending.len() == self.chunk_size {
                self.flush_chunk()?;
            }
        }
        Ok(())
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.size
    }

    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    fn flush_chunk(&mut self) -> Result<(), FileError> {
        let index = u32::try_from(self.written.len()).map_err(|_| FileError::Writer {
            path: self.path.clone(),
            message: "more than 2^32 chunks".to_owned(),
        })?;
        let client = self.client;
        let mut namespace = client.control.namespace.clone();
        let placed = client
            .runtime
            .block_on(namespace.place_chunks(proto::PlaceChunksRequest {
                path: self.path.clone(),
                file_id: self.file_id,
                first_index: index,
                count: 1,
            }))
            .map_err(|status| {
                client.control_error(format!("place chunk {index} of {}", self.path), status)
            })?
            .into_inner();
        let layout = placed_layout(proto::Layout {
            path: self.path.clone(),
            chunk_size: self.chunk_size as u32,
            size: self.pending.len() as u64,
            chunks: placed
                .chunks
                .iter()
                .map(|chunk| proto::LayoutChunk {
                    length: self.pending.len() as u32,
                    ..chunk.clone()
                })
                .collect(),
            nodes: placed.nodes.clone(),
            ..Default::default()
        })?;
        let chunk = layout.chunks.first().ok_or_else(|| FileError::Writer {
            path: self.path.clone(),
            message: format!("the control plane placed no chunk {index}"),
        })?;
        // Every replica is written (in parallel) before the chunk counts as written.
        let data = &self.pending;
        let path = &self.path;
        std::thread::scope(|scope| {
            let writes: Vec<_> = chunk
                .replicas
                .iter()
                .map(|&addr| {
                    let write = scope.spawn(move || {
                        let mut connection = client.take_writer(addr)?;
                        let written = connection.write(chunk.id, data);
                        client.return_writer(addr, connection);
                        written
                    });
                    (addr, write)
                })
                .collect();
            for (addr, write) in writes {
                match write.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(source)) => {
                        return Err(FileError::Write {
                            path: path.clone(),
                            index,
                            addr,
                            source: Box::new(source),
                        });
                    }
                    Err(_) => {
                        return Err(FileError::Writer {
                            path: path.clone(),
                            message: format!("the thread writing chunk {index} to {addr} panicked"),
                        });
                    }
                }
            }
            Ok(())
        })?;
        self.written.push(proto::CommitChunk {
            index,
            id: Some(proto::ChunkId {
                file: chunk.id.file,
                index: chunk.id.index,
                generation: chunk.id.generation,
            }),
            length: self.pending.len() as u32,
        });
        self.pending.clear();
        Ok(())
    }

    /// Writes the last chunk and commits the new version atomically; returns its layout.
    /// Fails (committing nothing) if another writer committed this file first.
    pub fn close(mut self) -> Result<Arc<FileLayout>, FileError> {
        if !self.pending.is_empty() {
            self.flush_chunk()?;
        }
        let client = self.client;
        let mut namespace = client.control.namespace.clone();
        let layout = client
            .runtime
            .block_on(namespace.commit(proto::CommitRequest {
                path: self.path.clone(),
                file_id: self.file_id,
                base_version: self.base_version,
                size: self.size,
                chunks: std::mem::take(&mut self.written),
            }))
            .map_err(|status| client.control_error(format!("commit {}", self.path), status))?
            .into_inner();
        let layout = Arc::new(file_layout(layout)?);
        client
            .cache()
            .insert(self.path.clone(), Arc::clone(&layout));
        Ok(layout)
    }
}

/// The layout a reply describes, checked: every replica names a node the reply lists, with
/// an address that resolves; chunks tile the file.
fn file_layout(layout: proto::Layout) -> Result<FileLayout, FileError> {
    layout_of(layout, true)
}

/// A placement's chunks as a layout (they need not start at index 0).
fn placed_layout(layout: proto::Layout) -> Result<FileLayout, FileError> {
    layout_of(layout, false)
}

fn layout_of(layout: proto::Layout, tiles: bool) -> Result<FileLayout, FileError> {
    let bad = |message: String| FileError::Layout {
        path: layout.path.clone(),
        message,
    };
    let mut addresses: HashMap<&str, SocketAddr> = HashMap::new();
    let mut domains = HashMap::new();
    for node in &layout.nodes {
        let addr = node
            .address
            .to_socket_addrs()
            .ok()
            .and_then(|mut addrs| addrs.next())
            .ok_or_else(|| bad(format!("node {} has address {:?}", node.id, node.address)))?;
        addresses.insert(node.id.as_str(), addr);
        domains.insert(addr, node.failure_domain.clone());
    }
    let mut chunks = Vec::with_capacity(layout.chunks.len());
    for chunk in &layout.chunks {
        let id = chunk
            .id
            .ok_or_else(|| bad(format!("chunk {} has no id", chunk.index)))?;
        let replicas = chunk
            .replicas
            .iter()
            .map(|node| {
                addresses
                    .get(node.as_str())
                    .copied()
                    .ok_or_else(|| bad(format!("chunk {} names unknown node {node}", chunk.index)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        chunks.push(LayoutChunk {
            id: ChunkId {
                file: id.file,
                index: id.index,
                generation: id.generation,
            },
            file_offset: u64::from(chunk.index) * u64::from(layout.chunk_size),
            len: chunk.length,
            replicas,
        });
    }
    // The chunks must tile the file: chunk k at k × chunk_size, all full but the last, and
    // together exactly the size (a gap would read as whatever the buffer held).
    let mut covered = 0u64;
    for (position, chunk) in layout.chunks.iter().enumerate().filter(|_| tiles) {
        let start = u64::from(chunk.index) * u64::from(layout.chunk_size);
        let last = position + 1 == layout.chunks.len();
        let full = u64::from(chunk.length) == u64::from(layout.chunk_size);
        if chunk.index as usize != position || start != covered || (!last && !full) {
            return Err(bad(format!(
                "chunk {} ({} bytes at index {position}) does not continue the file at byte {covered}",
                chunk.index, chunk.length
            )));
        }
        covered += u64::from(chunk.length);
    }
    if tiles && covered != layout.size {
        return Err(bad(format!(
            "chunks hold {covered} bytes, the file {}",
            layout.size
        )));
    }
    Ok(FileLayout {
        path: layout.path.clone(),
        file_id: layout.file_id,
        version: layout.version,
        layout_version: layout.layout_version,
        size: layout.size,
        chunk_size: layout.chunk_size,
        chunks,
        domains,
    })
}

/// How near a daemon is: 0 on this host (its address is one of this host's), 1 in this
/// client's failure domain, 2 elsewhere. The striped reader reads each chunk from its
/// nearest replica, equally near ones taking turns.
fn distance(addr: SocketAddr, domain: Option<&str>, own_domain: Option<&str>) -> u32 {
    // Binding a socket to an address succeeds only for addresses this host has.
    let local = addr.ip().is_loopback() || std::net::UdpSocket::bind((addr.ip(), 0)).is_ok();
    if local {
        0
    } else if own_domain.is_some() && domain == own_domain {
        1
    } else {
        2
    }
}

#[cfg(test)]
mod tests {
    use super::distance;

    #[test]
    fn replicas_on_this_host_then_in_this_domain_come_first() {
        let here = "127.0.0.1:7400".parse().unwrap();
        // TEST-NET-1: never an address of this host.
        let far = "192.0.2.7:7400".parse().unwrap();
        assert_eq!(distance(here, Some("rack-9"), Some("rack-1")), 0);
        assert_eq!(distance(far, Some("rack-1"), Some("rack-1")), 1);
        assert_eq!(distance(far, Some("rack-2"), Some("rack-1")), 2);
        assert_eq!(distance(far, Some(""), None), 2);
    }
}
