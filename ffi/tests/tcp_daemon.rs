//! A data daemon's TCP path and node-local shared-memory path end to end, in one process:
//! real sockets, real io_uring on a file store, the client from this crate. Authentication,
//! pipelined reads into caller buffers, writes and deletes, reads at a stale layout version,
//! bad input from a peer, and the shared pool's seals and allowance.

use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use tier0_client::{ClientError, DaemonConnection, ReadInto, TransportChoice, TransportKind};
use tier0_dataplane::buffer::BufferPoolConfig;
use tier0_dataplane::device::{BlockDevice, UringDevice, UringOptions, preallocate_file};
use tier0_dataplane::fence::FenceTable;
use tier0_dataplane::net::tcp::{LocalSocket, TcpServer, TcpServerConfig};
use tier0_dataplane::net::wire::{
    self, HEADER_SIZE, Header, Hello, LayoutRef, LocalEndpoint, LocalRead, Message, Read, Release,
};
use tier0_dataplane::store::{ChunkId, ChunkStore, StoreConfig};
use tier0_dataplane::worker::{DeviceFactory, DriveSpec, PollMode, WorkerPool, WorkerPoolConfig};
use tier0_topology::WorkerPlan;

const CHUNK: u32 = 256 << 10;
const TOKEN: &[u8] = b"cluster-secret";
const TIMEOUT: Duration = Duration::from_secs(10);

struct Daemon {
    server: Option<TcpServer>,
    pool: Option<WorkerPool>,
    fences: Arc<FenceTable>,
    dir: std::path::PathBuf,
}

impl Daemon {
    fn start(what: &str, workers: usize) -> Daemon {
        Self::start_with(what, workers, LocalSocket::Auto)
    }

    fn start_with(what: &str, workers: usize, local_socket: LocalSocket) -> Daemon {
        let dir = std::env::temp_dir().join(format!("tier0-tcp-{what}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("drive");
        preallocate_file(&path, 16 << 20).unwrap();
        let mut device = UringDevice::open(&path, &UringOptions::default()).unwrap();
        let store = Arc::new(
            ChunkStore::format(
                &mut device,
                StoreConfig {
                    chunk_size: CHUNK,
                    checksum_block_size: 4096,
                },
            )
            .unwrap(),
        );
        drop(device);
        let fences = FenceTable::new();
        let (server, sources) = TcpServer::bind(
            TcpServerConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                token: TOKEN.to_vec(),
                node: format!("node-{what}"),
                max_payload: CHUNK,
                handshake_timeout: Duration::from_secs(2),
                local_socket,
                heat: tier0_dataplane::heat::HeatMap::new(Duration::from_secs(600)),
                copies: Default::default(),
            },
            vec![store.clone()],
            // The drive is in the temp folder, on disk here: every read goes to the worker.
            vec![None],
            fences.clone(),
            workers,
            None,
        )
        .unwrap();
        let factory: DeviceFactory = Arc::new(move |_: &DriveSpec| {
            Ok(
                Box::new(UringDevice::open(&path, &UringOptions::default())?)
                    as Box<dyn BlockDevice>,
            )
        });
        let plan = WorkerPlan::single_node(0, (0..workers as u32).collect());
        let config = WorkerPoolConfig {
            poll_mode: PollMode::Adaptive,
            in_flight_max: 16,
            buffers: BufferPoolConfig {
                buffer_size: CHUNK as usize,
                buffer_count: 16,
                numa_node: None,
                hugepages: false,
            },
            pin: false,
            sources: Some(sources),
        };
        let drive = DriveSpec {
            name: "drive".into(),
            store,
            numa_node: 0,
            memory: None,
        };
        let pool = WorkerPool::start(&plan, &[drive], factory, &config).unwrap();
        Daemon {
            server: Some(server),
            pool: Some(pool),
            fences,
            dir,
        }
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.server.as_ref().unwrap().local_addr()
    }

    fn local_endpoint(&self) -> LocalEndpoint {
        self.server
            .as_ref()
            .unwrap()
            .local_endpoint()
            .expect("a local socket")
            .clone()
    }

    fn connect(&self) -> DaemonConnection {
        DaemonConnection::connect(self.addr(), TOKEN, "test", TIMEOUT).unwrap()
    }

    /// Stops accepting, then the workers finish once every peer is gone.
    fn stop(mut self) {
        self.server.take().unwrap().shutdown();
        self.pool.take().unwrap().shutdown();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn chunk(index: u32) -> ChunkId {
    ChunkId {
        file: 5,
        index,
        generation: 1,
    }
}

fn pattern(seed: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(97)) as u8)
        .collect()
}

#[test]
fn writes_then_pipelined_reads_land_in_the_callers_buffers() {
    let daemon = Daemon::start("reads", 2);
    let mut client = daemon.connect();
    assert_eq!(client.node(), "node-reads");
    let lens: Vec<usize> = (0..6).map(|i| CHUNK as usize - i * 5000).collect();
    for (index, &len) in lens.iter().enumerate() {
        client
            .write(chunk(index as u32), &pattern(index as u32, len))
            .unwrap();
    }
    // Whole chunks and ranges inside checksum blocks, all in flight at once, into one buffer.
    let ranges: Vec<(u32, u64, usize)> = (0..6u32)
        .flat_map(|index| {
            let len = lens[index as usize];
            [
                (index, 0, len),
                (index, 4095, 10_000),
                (index, len as u64 - 7, 7),
            ]
        })
        .collect();
    let total: usize = ranges.iter().map(|r| r.2).sum();
    let mut buffer = vec![0u8; total];
    let mut rest = &mut buffer[..];
    let mut reads = Vec::new();
    for &(index, offset, len) in &ranges {
        let (dest, tail) = rest.split_at_mut(len);
        rest = tail;
        reads.push(ReadInto {
            chunk: chunk(index),
            offset,
            dest,
            layout: LayoutRef::default(),
        });
    }
    for result in client.read_many(&mut reads) {
        result.unwrap();
    }
    let mut at = 0;
    for &(index, offset, len) in &ranges {
        let whole = pattern(index, lens[index as usize]);
        let expected = &whole[offset as usize..offset as usize + len];
        assert!(
            buffer[at..at + len] == *expected,
            "chunk {index} at {offset}"
        );
        at += len;
    }
    // A second client, dealt to the other worker, sees the same chunks.
    let mut other = daemon.connect();
    let mut first = vec![0u8; 100];
    other.read_into(chunk(5), 1, &mut first).unwrap();
    assert_eq!(first, pattern(5, lens[5])[1..101]);
    drop(client);
    drop(other);
    daemon.stop();
}

#[test]
fn errors_are_replies_and_the_connection_stays_usable() {
    let daemon = Daemon::start("errors", 1);
    let mut client = daemon.connect();
    client.write(chunk(1), &pattern(1, 5000)).unwrap();
    let mut dest = vec![0u8; 10];
    let missing = client.read_into(chunk(9), 0, &mut dest).unwrap_err();
    assert_eq!(missing.errno(), libc::ENOENT, "{missing}");
    assert!(missing.to_string().contains("node-errors"), "{missing}");
    let mut past_end = vec![0u8; 100];
    let range = client.read_into(chunk(1), 4950, &mut past_end).unwrap_err();
    assert_eq!(range.errno(), libc::EINVAL, "{range}");
    let exists = client.write(chunk(1), b"again").unwrap_err();
    assert_eq!(exists.errno(), libc::EEXIST, "{exists}");
    client.delete(chunk(1)).unwrap();
    let gone = client.read_into(chunk(1), 0, &mut dest).unwrap_err();
    assert_eq!(gone.errno(), libc::ENOENT);
    // Too large for one frame: refused before anything is sent.
    let mut huge = vec![0u8; CHUNK as usize + 1];
    let too_large = client.read_into(chunk(1), 0, &mut huge).unwrap_err();
    assert_eq!(too_large.errno(), libc::EINVAL);
    assert!(client.is_healthy());
    client.write(chunk(2), &pattern(2, 300)).unwrap();
    let mut back = vec![0u8; 300];
    client.read_into(chunk(2), 0, &mut back).unwrap();
    assert_eq!(back, pattern(2, 300));
    drop(client);
    daemon.stop();
}

#[test]
fn a_wrong_token_is_refused_before_any_request_is_read() {
    let daemon = Daemon::start("token", 1);
    let refused =
        DaemonConnection::connect(daemon.addr(), b"guess", "intruder", TIMEOUT).unwrap_err();
    assert_eq!(refused.errno(), libc::EACCES, "{refused}");
    // A request in place of the hello is refused the same way, and not served.
    let mut stream = TcpStream::connect(daemon.addr()).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut frame = Vec::new();
    let read = Message::Read(Read {
        chunk: chunk(1),
        offset: 0,
        len: 10,
        layout: LayoutRef::default(),
    });
    wire::encode(1, &read, &mut frame).unwrap();
    std::io::Write::write_all(&mut stream, &frame).unwrap();
    let mut reply = Vec::new();
    std::io::Read::read_to_end(&mut stream, &mut reply).unwrap();
    let (_, message, _) = wire::decode_frame(&reply, 0).unwrap();
    let Message::Error(error) = message else {
        panic!("expected a refusal, got {message:?}");
    };
    assert_eq!(error.errno, libc::EACCES);
    daemon.stop();
}

/// A restored file's layout (file 0x1a) lists chunks of file 5: the daemon fences by the
/// layout's file. A raw read at a stale version gets an ESTALE error frame naming the file and
/// both versions, and the connection goes on serving the next (current) read; the client
/// turns ESTALE into `StaleLayout`; version 0 is never fenced.
#[test]
fn a_read_at_a_stale_layout_version_gets_estale_and_the_connection_stays_usable() {
    let daemon = Daemon::start("stale", 1);
    let mut client = daemon.connect();
    let data = pattern(4, 9000);
    client.write(chunk(4), &data).unwrap();
    let at = |version| LayoutRef {
        file: 0x1a,
        version,
    };
    // No fence yet: any version reads.
    let mut dest = vec![0u8; 9000];
    client.read_through(at(3), chunk(4), 0, &mut dest).unwrap();
    assert_eq!(dest, data);

    daemon.fences.raise(0x1a, 5);
    let mut frame = Vec::new();
    let read = Read {
        chunk: chunk(4),
        offset: 0,
        len: 100,
        layout: at(3),
    };
    wire::encode(41, &Message::Read(read), &mut frame).unwrap();
    client.send_raw(&frame).unwrap();
    let (header, message) = client.receive_head(CHUNK).unwrap();
    assert_eq!(header.request_id, 41);
    assert_eq!(header.payload_len, 0);
    let Message::Error(error) = message else {
        panic!("expected an error frame, got {message:?}");
    };
    assert_eq!(error.errno, libc::ESTALE, "{}", error.message);
    assert!(
        error
            .message
            .contains("node-stale: file 1a: layout version 3 is stale (now 5): reopen the file"),
        "{}",
        error.message
    );
    assert!(client.is_healthy());

    // The same connection serves the next read, at the current version (and a later one).
    dest.fill(0);
    client.read_through(at(5), chunk(4), 0, &mut dest).unwrap();
    assert_eq!(dest, data);
    let mut part = vec![0u8; 10];
    client
        .read_through(at(6), chunk(4), 4090, &mut part)
        .unwrap();
    assert_eq!(part, data[4090..4100]);

    // Through the client: ESTALE is its own error, for the layout's file, not the chunk's,
    // and it is the daemon's answer, not a failed connection. In one pipelined batch only
    // the stale read fails.
    let (stale, rest) = dest.split_at_mut(100);
    let (current, unversioned) = rest.split_at_mut(100);
    let mut reads = [
        ReadInto {
            chunk: chunk(4),
            offset: 0,
            dest: stale,
            layout: at(4),
        },
        ReadInto {
            chunk: chunk(4),
            offset: 100,
            dest: current,
            layout: at(5),
        },
        ReadInto {
            chunk: chunk(4),
            offset: 200,
            dest: &mut unversioned[..100],
            layout: LayoutRef::default(),
        },
    ];
    let mut results = client.read_many(&mut reads).into_iter();
    let error = results.next().unwrap().unwrap_err();
    assert!(
        matches!(&error, ClientError::StaleLayout { file: 0x1a, message, .. }
            if message.contains("layout version 4 is stale (now 5)")),
        "{error}"
    );
    assert_eq!(error.errno(), libc::ESTALE);
    assert!(error.is_stale_layout());
    assert!(!error.is_connection_failure());
    assert!(error.to_string().contains("reopen the file"), "{error}");
    results.next().unwrap().unwrap();
    results.next().unwrap().unwrap();
    assert_eq!(dest[100..300], data[100..300]);

    // Fences of other files do not touch this one; version 0 always reads; a fence never
    // goes down.
    daemon.fences.raise(5, 100);
    daemon.fences.raise(0x1a, 2);
    assert_eq!(daemon.fences.get(0x1a), Some(5));
    client.read_through(at(5), chunk(4), 0, &mut part).unwrap();
    client.read_into(chunk(4), 0, &mut part).unwrap();
    assert_eq!(part, data[..10]);
    assert!(client.is_healthy());
    drop(client);
    daemon.stop();
}

/// A byte inside the body of a `Read` frame (the header is 32 bytes).
const BODY_BYTE: usize = wire::HEADER_SIZE + 3;

#[test]
fn a_malformed_frame_gets_an_error_and_a_closed_connection_and_others_carry_on() {
    let daemon = Daemon::start("garbage", 1);
    let mut good = daemon.connect();
    good.write(chunk(3), &pattern(3, 1000)).unwrap();

    let mut bad = daemon.connect();
    let mut frame = Vec::new();
    let read = Message::Read(Read {
        chunk: chunk(3),
        offset: 0,
        len: 10,
        layout: LayoutRef::default(),
    });
    wire::encode(7, &read, &mut frame).unwrap();
    frame[BODY_BYTE] ^= 0x40; // the body CRC fails
    bad.send_raw(&frame).unwrap();
    let (header, message) = bad.receive_head(0).unwrap();
    assert_eq!(header.request_id, 7);
    let Message::Error(error) = message else {
        panic!("expected an error reply, got {message:?}");
    };
    assert_eq!(error.errno, libc::EPROTO, "{}", error.message);
    assert!(error.message.contains("checksum"), "{}", error.message);
    let mut dest = vec![0u8; 10];
    assert!(
        bad.read_into(chunk(3), 0, &mut dest).is_err(),
        "served after a bad frame"
    );

    // Random bytes: an error reply, then the connection closes; the daemon lives on.
    let mut noise = daemon.connect();
    noise.send_raw(&[0xff; 100]).unwrap();
    let first = noise.receive_head(0);
    assert!(
        matches!(first, Ok((_, Message::Error(ref error))) if error.errno == libc::EPROTO),
        "{first:?}"
    );
    assert!(noise.receive_head(0).is_err(), "connection left open");

    let mut back = vec![0u8; 1000];
    good.read_into(chunk(3), 0, &mut back).unwrap();
    assert_eq!(back, pattern(3, 1000));
    drop((good, bad, noise));
    daemon.stop();
}

#[test]
fn stopping_the_daemon_closes_idle_peers_instead_of_waiting_for_them() {
    let daemon = Daemon::start("stop", 1);
    let mut client = daemon.connect();
    client.write(chunk(1), &pattern(1, 100)).unwrap();
    let started = std::time::Instant::now();
    daemon.stop();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stop waited {:?} for an idle peer",
        started.elapsed()
    );
    let mut dest = vec![0u8; 100];
    assert!(client.read_into(chunk(1), 0, &mut dest).is_err());
}

/// Reads chunks `0..count` (each `len` bytes, written first) through `transport`, `rounds`
/// times, with more reads per batch than the daemon lets a local client hold.
fn read_back(transport: &mut dyn tier0_client::Transport, count: u32, len: usize, rounds: usize) {
    for _ in 0..rounds {
        let mut dests: Vec<Vec<u8>> = (0..count).map(|_| vec![0u8; len]).collect();
        let mut reads: Vec<ReadInto<'_>> = dests
            .iter_mut()
            .enumerate()
            .map(|(index, dest)| ReadInto {
                chunk: chunk(index as u32),
                offset: 0,
                dest,
                layout: LayoutRef::default(),
            })
            .collect();
        for result in transport.read_window(&mut reads, 64, None) {
            result.unwrap();
        }
        drop(reads);
        for (index, dest) in dests.iter().enumerate() {
            assert!(*dest == pattern(index as u32, len), "chunk {index} differs");
        }
    }
}

#[test]
fn a_client_on_the_daemons_node_reads_through_the_shared_pool() {
    let daemon = Daemon::start("local", 1);
    let mut writer = daemon.connect();
    let len = CHUNK as usize - 1000;
    for index in 0..24 {
        writer.write(chunk(index), &pattern(index, len)).unwrap();
    }
    let endpoint = writer.local_endpoint_here().expect("same node").clone();
    assert!(endpoint.socket.starts_with("@tier0-data-"), "{endpoint:?}");
    let connect = |choice| {
        tier0_client::transport::connect(daemon.addr(), TOKEN, "test", TIMEOUT, choice, None)
            .unwrap()
    };
    let mut local = connect(TransportChoice::Local);
    assert_eq!(local.kind(), TransportKind::Local);
    assert_eq!(connect(TransportChoice::Auto).kind(), TransportKind::Local);
    assert_eq!(connect(TransportChoice::Tcp).kind(), TransportKind::Tcp);
    // 24 reads a batch, 8 buffers held at most (half the 16-buffer pool), 20 batches: every
    // buffer goes back, or the pool would run dry.
    read_back(local.as_mut(), 24, len, 20);
    // Ranges inside a chunk, and errors, the same as over TCP.
    let mut part = vec![0u8; 5000];
    let mut reads = [ReadInto {
        chunk: chunk(3),
        offset: 4097,
        dest: &mut part,
        layout: LayoutRef::default(),
    }];
    local.read_many(&mut reads).remove(0).unwrap();
    assert_eq!(part, pattern(3, len)[4097..4097 + 5000]);
    let mut missing = vec![0u8; 10];
    let mut reads = [ReadInto {
        chunk: chunk(99),
        offset: 0,
        dest: &mut missing,
        layout: LayoutRef::default(),
    }];
    let error = local.read_many(&mut reads).remove(0).unwrap_err();
    assert_eq!(error.errno(), libc::ENOENT, "{error}");
    assert!(local.is_healthy());
    read_back(local.as_mut(), 4, len, 1);
    drop((local, writer));
    daemon.stop();
}

#[test]
fn without_a_local_socket_auto_stays_on_tcp_and_local_is_refused() {
    let daemon = Daemon::start_with("nolocal", 1, LocalSocket::Off);
    let tcp = daemon.connect();
    assert!(tcp.local_endpoint_here().is_none());
    let connect = |choice| {
        tier0_client::transport::connect(daemon.addr(), TOKEN, "test", TIMEOUT, choice, None)
    };
    assert_eq!(
        connect(TransportChoice::Auto).unwrap().kind(),
        TransportKind::Tcp
    );
    let refused = connect(TransportChoice::Local).unwrap_err();
    assert!(
        refused.to_string().contains("not on this node"),
        "{refused}"
    );
    drop(tcp);
    daemon.stop();
}

/// Connects to the local socket and says hello, by hand.
fn raw_local(endpoint: &LocalEndpoint) -> std::os::unix::net::UnixStream {
    let addr = tier0_dataplane::net::local_socket_addr(&endpoint.socket).unwrap();
    let stream = std::os::unix::net::UnixStream::connect_addr(&addr).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let hello = Message::Hello(Hello {
        token: TOKEN.to_vec(),
        client: "raw".into(),
        rdma: None,
    });
    send_frame(&stream, 0, &hello);
    let (_, welcome) = receive_frame(&stream).unwrap();
    assert!(matches!(welcome, Message::Welcome(_)), "{welcome:?}");
    stream
}

fn send_frame(mut stream: &std::os::unix::net::UnixStream, id: u64, message: &Message) {
    let mut frame = Vec::new();
    wire::encode(id, message, &mut frame).unwrap();
    std::io::Write::write_all(&mut stream, &frame).unwrap();
}

fn receive_frame(
    mut stream: &std::os::unix::net::UnixStream,
) -> std::io::Result<(Header, Message)> {
    let mut head = [0u8; HEADER_SIZE];
    std::io::Read::read_exact(&mut stream, &mut head)?;
    let header = Header::decode(&head, 0).unwrap();
    let mut body = vec![0u8; header.body_len as usize];
    std::io::Read::read_exact(&mut stream, &mut body)?;
    Ok((header, wire::decode_body(&header, &body).unwrap()))
}

/// Asks for the pool by hand: its announced length, allowance and fd.
fn attach(stream: &std::os::unix::net::UnixStream) -> (u64, u32, std::os::fd::OwnedFd) {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};
    send_frame(stream, 1, &Message::LocalAttach);
    let mut frame = vec![0u8; 256];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = recvmsg(
        stream,
        &mut [std::io::IoSliceMut::new(&mut frame)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .unwrap();
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    let (_, message, _) = wire::decode_frame(&frame[..received.bytes], 0).unwrap();
    let Message::LocalPool(pool) = message else {
        panic!("expected LocalPool, got {message:?}");
    };
    assert_eq!(fds.len(), 1, "one fd with the pool");
    (pool.len, pool.held_max, fds.pop().unwrap())
}

#[test]
fn the_shared_pool_is_read_only_and_cannot_be_resized_by_a_client() {
    use std::os::fd::AsRawFd as _;
    let daemon = Daemon::start("sealed", 1);
    let stream = raw_local(&daemon.local_endpoint());
    let (len, held_max, fd) = attach(&stream);
    assert_eq!(len, 16 * CHUNK as u64);
    assert_eq!(held_max, 8);
    let fd = fd.as_raw_fd();
    // SAFETY: plain syscalls on the fd the daemon passed, whose results are checked; the
    // mapping that succeeds is unmapped at the end.
    unsafe {
        assert_eq!(
            libc::ftruncate(fd, 0),
            -1,
            "a client shrank the daemon's pool"
        );
        assert_eq!(
            libc::ftruncate(fd, 2 * len as i64),
            -1,
            "a client grew the pool"
        );
        let writable = libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        );
        assert_eq!(
            writable,
            libc::MAP_FAILED,
            "a client mapped the pool writable"
        );
        assert_eq!(
            libc::pwrite(fd, [1u8].as_ptr().cast(), 1, 0),
            -1,
            "a client wrote the pool"
        );
        let readable = libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd,
            0,
        );
        assert_ne!(
            readable,
            libc::MAP_FAILED,
            "{}",
            std::io::Error::last_os_error()
        );
        assert_ne!(
            libc::mprotect(readable, len as usize, libc::PROT_READ | libc::PROT_WRITE),
            0,
            "a read-only mapping turned writable"
        );
        libc::munmap(readable, len as usize);
    }
    daemon.stop();
}

#[test]
fn bad_local_frames_get_clear_errors_and_the_allowance_holds() {
    let daemon = Daemon::start("localbad", 1);
    let mut writer = daemon.connect();
    writer.write(chunk(1), &pattern(1, 4096)).unwrap();
    let endpoint = daemon.local_endpoint();
    let read = |id: u64| {
        let message = Message::LocalRead(LocalRead {
            chunk: chunk(1),
            offset: 0,
            len: 4096,
            layout: LayoutRef::default(),
        });
        (id, message)
    };
    // A LocalRead before LocalAttach: refused, connection closed.
    let stream = raw_local(&endpoint);
    send_frame(&stream, 5, &read(5).1);
    let (header, message) = receive_frame(&stream).unwrap();
    assert_eq!(header.request_id, 5);
    assert!(
        matches!(&message, Message::Error(error) if error.errno == libc::EPROTO && error.message.contains("before LocalAttach")),
        "{message:?}"
    );
    assert!(receive_frame(&stream).is_err(), "connection left open");

    // Past the allowance: the extra read is refused EBUSY; releasing makes room again.
    let stream = raw_local(&endpoint);
    let (_, held_max, _fd) = attach(&stream);
    for id in 0..=held_max as u64 {
        send_frame(&stream, 10 + id, &read(10 + id).1);
    }
    let mut leases = Vec::new();
    let mut busy = 0;
    for _ in 0..=held_max {
        match receive_frame(&stream).unwrap().1 {
            Message::LocalReadDone(done) => {
                assert_eq!(done.len, 4096);
                leases.push(done.lease);
            }
            Message::Error(error) if error.errno == libc::EBUSY => busy += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((leases.len(), busy), (held_max as usize, 1));
    send_frame(
        &stream,
        0,
        &Message::Release(Release {
            leases: leases.clone(),
        }),
    );
    send_frame(&stream, 50, &read(50).1);
    let (header, message) = receive_frame(&stream).unwrap();
    assert_eq!(header.request_id, 50);
    let Message::LocalReadDone(done) = message else {
        panic!("not served after releasing: {message:?}");
    };
    // Releasing a lease twice (or one never given) is a protocol error.
    send_frame(
        &stream,
        0,
        &Message::Release(Release {
            leases: vec![done.lease, done.lease],
        }),
    );
    let (_, message) = receive_frame(&stream).unwrap();
    assert!(
        matches!(&message, Message::Error(error) if error.errno == libc::EPROTO && error.message.contains("does not hold")),
        "{message:?}"
    );
    assert!(receive_frame(&stream).is_err(), "connection left open");

    // LocalAttach over TCP is refused.
    let mut tcp = daemon.connect();
    let mut frame = Vec::new();
    wire::encode(3, &Message::LocalAttach, &mut frame).unwrap();
    tcp.send_raw(&frame).unwrap();
    let (_, message) = tcp.receive_head(0).unwrap();
    assert!(
        matches!(&message, Message::Error(error) if error.errno == libc::EPROTO),
        "{message:?}"
    );
    // The daemon serves on.
    let mut back = vec![0u8; 4096];
    writer.read_into(chunk(1), 0, &mut back).unwrap();
    assert_eq!(back, pattern(1, 4096));
    drop((writer, tcp));
    daemon.stop();
}

#[test]
fn a_worker_takes_a_quarter_of_its_pool_in_local_clients_and_the_rest_stay_on_tcp() {
    let daemon = Daemon::start("crowd", 1);
    let connect = |choice| {
        tier0_client::transport::connect(daemon.addr(), TOKEN, "test", TIMEOUT, choice, None)
    };
    // 16 buffers: 4 attached connections at most.
    let mut attached: Vec<_> = (0..4)
        .map(|_| connect(TransportChoice::Local).unwrap())
        .collect();
    let refused = connect(TransportChoice::Local).unwrap_err();
    assert_eq!(refused.errno(), libc::EBUSY, "{refused}");
    assert_eq!(
        connect(TransportChoice::Auto).unwrap().kind(),
        TransportKind::Tcp
    );
    // One leaves: its place is free again.
    drop(attached.pop());
    let deadline = std::time::Instant::now() + TIMEOUT;
    while connect(TransportChoice::Local).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the place was never freed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    daemon.stop();
}
