//! Striped reads over TCP against a local cluster of real daemons (real sockets, real
//! io_uring stores): spread over replicas, nearest replica first, failover when a daemon
//! stops mid-read or lacks a chunk, a clear error when no replica is left, and no failover but
//! a "reopen" error when a daemon refuses the layout as stale. The same over RDMA is in
//! hwtests/tests/verbs.rs (it needs soft-RoCE).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tier0_client::{
    ClientError, DaemonConnection, DaemonEndpoint, LayoutRef, ReadBuffer, StripedError,
    StripedReader, TransportChoice, TransportKind,
};
use tier0_perf::cluster::{ClusterConfig, LocalCluster, pattern};

const CHUNK: u32 = 64 << 10;

fn cluster(daemons: usize) -> LocalCluster {
    LocalCluster::start(&ClusterConfig::for_tests(daemons, CHUNK)).unwrap()
}

/// Daemons whose stores are on /dev/shm (tmpfs): their whole-block TCP reads are sent from a
/// mapping of the store (`net::mapped`), not read into a buffer.
fn memory_cluster(daemons: usize) -> LocalCluster {
    let shm = std::path::Path::new("/dev/shm");
    assert!(shm.is_dir(), "these tests need /dev/shm (tmpfs)");
    LocalCluster::start(&ClusterConfig {
        dir: shm.to_path_buf(),
        ..ClusterConfig::for_tests(daemons, CHUNK)
    })
    .unwrap()
}

fn reader(cluster: &LocalCluster, endpoints: Vec<DaemonEndpoint>) -> StripedReader {
    StripedReader::new(
        endpoints,
        cluster.token(),
        "test",
        TransportChoice::Auto,
        None,
    )
    .with_timeout(Duration::from_secs(5))
}

#[test]
fn reads_a_striped_file_from_every_daemon() {
    let cluster = cluster(3);
    // Not a whole number of chunks: the last one is short.
    let data = pattern(30 * CHUNK as usize + 777, 1);
    let layout = cluster.write_striped(1, &data, 2).unwrap();
    let mut buffer = ReadBuffer::new(data.len()).unwrap();
    let mut reader = reader(&cluster, cluster.endpoints());
    let report = reader.read(&layout, &mut buffer).unwrap();
    assert!(buffer[..] == data[..], "striped read differs");
    assert_eq!(report.bytes, data.len() as u64);
    assert_eq!((report.failovers, report.rounds), (0, 1));
    // Equally near replicas take turns: every daemon serves a share.
    assert!(
        report.per_daemon.iter().all(|&bytes| bytes > 0),
        "{report:?}"
    );
    assert_eq!(report.per_daemon.iter().sum::<u64>(), data.len() as u64);
    // The daemons run on this node: `Auto` takes the node-local shared-memory path.
    assert!(
        reader
            .transports()
            .iter()
            .all(|kind| *kind == Some(TransportKind::Local)),
        "{:?}",
        reader.transports()
    );
}

#[test]
fn the_nearest_replica_serves() {
    let cluster = cluster(3);
    let data = pattern(12 * CHUNK as usize, 2);
    let layout = cluster.write_striped(2, &data, 2).unwrap();
    let mut endpoints = cluster.endpoints();
    endpoints[0].distance = 0;
    endpoints[1].distance = 10;
    endpoints[2].distance = 20;
    let mut buffer = ReadBuffer::new(data.len()).unwrap();
    let report = reader(&cluster, endpoints)
        .read(&layout, &mut buffer)
        .unwrap();
    assert!(buffer[..] == data[..]);
    // Chunk i is on daemons i%3 and (i+1)%3: the nearer of the two serves it.
    let mut expected = [0u64; 3];
    for chunk in &layout.chunks {
        let nearest = *chunk.replicas.iter().min().unwrap();
        expected[nearest] += u64::from(chunk.len);
    }
    assert_eq!(report.per_daemon, expected.to_vec());
}

#[test]
fn a_daemon_stopped_mid_read_fails_over_with_no_wrong_byte() {
    stop_mid_read(cluster(3), TransportChoice::Tcp);
}

#[test]
fn a_daemon_stopped_mid_read_on_the_local_path_fails_over_with_no_wrong_byte() {
    stop_mid_read(cluster(3), TransportChoice::Local);
}

#[test]
fn a_memory_daemon_stopped_mid_mapped_read_fails_over_with_no_wrong_byte() {
    stop_mid_read(memory_cluster(3), TransportChoice::Tcp);
}

fn stop_mid_read(cluster: LocalCluster, choice: TransportChoice) {
    let cluster = Arc::new(Mutex::new(cluster));
    let data = pattern(48 * CHUNK as usize, 3);
    let (layout, endpoints) = {
        let cluster = cluster.lock().unwrap();
        (
            cluster.write_striped(3, &data, 2).unwrap(),
            cluster.endpoints(),
        )
    };
    let stopped = Arc::new(AtomicBool::new(false));
    let progress = {
        let (cluster, stopped) = (cluster.clone(), stopped.clone());
        // Runs in daemon 1's reading thread as its first chunk lands: the requests it has in
        // flight meet a stopped daemon.
        Arc::new(move |_chunk: usize, daemon: usize| {
            if daemon == 1 && !stopped.swap(true, Ordering::SeqCst) {
                cluster.lock().unwrap().stop(1);
            }
        })
    };
    let token = cluster.lock().unwrap().token().to_vec();
    let mut reader = StripedReader::new(endpoints, &token, "test", choice, None)
        .with_window(2)
        .with_timeout(Duration::from_secs(5))
        .with_progress(progress);
    let mut buffer = ReadBuffer::new(data.len()).unwrap();
    let report = reader.read(&layout, &mut buffer).unwrap();
    assert!(stopped.load(Ordering::SeqCst));
    assert!(buffer[..] == data[..], "bytes differ after failover");
    assert!(report.failovers > 0, "{report:?}");
    assert!(report.rounds >= 2, "{report:?}");
    // The stopped daemon delivered less than its share (a third).
    assert!(report.per_daemon[1] < data.len() as u64 / 3, "{report:?}");

    // A later read with daemon 1 still down goes straight to the live replicas.
    buffer.fill(0);
    let report = reader.read(&layout, &mut buffer).unwrap();
    assert!(buffer[..] == data[..]);
    assert_eq!(report.per_daemon[1], 0);
}

#[test]
fn a_replica_without_the_chunk_is_skipped_and_stays_in_use() {
    let cluster = cluster(2);
    let data = pattern(4 * CHUNK as usize, 4);
    // Written once, round-robin (chunks 0 and 2 on daemon 0, 1 and 3 on daemon 1), but the
    // layout claims both daemons hold every chunk.
    let mut layout = cluster.write_striped(4, &data, 1).unwrap();
    for chunk in &mut layout.chunks {
        chunk.replicas = vec![0, 1];
    }
    let mut endpoints = cluster.endpoints();
    endpoints[0].distance = 0;
    endpoints[1].distance = 5;
    let mut buffer = ReadBuffer::new(data.len()).unwrap();
    let mut reader = reader(&cluster, endpoints);
    let report = reader.read(&layout, &mut buffer).unwrap();
    assert!(buffer[..] == data[..]);
    // Daemon 0 is nearer: it serves 0 and 2, answers ENOENT for 1 and 3, which then come
    // from daemon 1; ENOENT is the daemon's answer, not a failed connection.
    assert_eq!(report.failovers, 2, "{report:?}");
    let chunk = u64::from(CHUNK);
    assert_eq!(report.per_daemon, vec![2 * chunk, 2 * chunk]);
    assert_eq!(reader.transports(), vec![Some(TransportKind::Local); 2]);
}

/// Flips one bit of the copy of `needle`'s first byte in daemon `daemon`'s store file.
fn damage_on_drive(cluster: &LocalCluster, daemon: usize, needle: &[u8]) {
    use std::os::unix::fs::FileExt as _;
    let path = cluster.store_path(daemon);
    let image = std::fs::read(&path).unwrap();
    let at = image
        .windows(needle.len())
        .position(|window| window == needle)
        .expect("the chunk's bytes are in the store file");
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&[image[at] ^ 0x10], at as u64).unwrap();
    file.sync_all().unwrap();
}

#[test]
fn bytes_corrupt_on_a_drive_are_caught_at_the_reader_and_read_from_another_replica() {
    corrupt_bytes_are_caught_at_the_reader(cluster(3));
}

/// On a memory-backed drive the whole-block reads are sent from the damaged mapping itself.
#[test]
fn bytes_corrupt_on_a_memory_drive_are_caught_at_the_reader_and_read_from_another_replica() {
    corrupt_bytes_are_caught_at_the_reader(memory_cluster(3));
}

fn corrupt_bytes_are_caught_at_the_reader(cluster: LocalCluster) {
    let data = pattern(9 * CHUNK as usize, 7);
    let layout = cluster.write_striped(7, &data, 2).unwrap();
    // Chunk 0 lives on daemons 0 and 1; damage daemon 0's copy inside its second 4 KiB block.
    damage_on_drive(&cluster, 0, &data[5000..5064]);

    // A whole-block read: the daemon answers with the CRC its stored checksums give, the
    // bytes fail it here, and the connection stays usable.
    let mut connection = DaemonConnection::connect(
        cluster.addr(0),
        cluster.token(),
        "test",
        Duration::from_secs(5),
    )
    .unwrap();
    let chunk0 = layout.chunks[0].chunk;
    let mut dest = vec![0u8; CHUNK as usize];
    let error = connection.read_into(chunk0, 0, &mut dest).unwrap_err();
    assert!(
        matches!(error, ClientError::Corrupt { chunk, .. } if chunk == chunk0),
        "{error}"
    );
    assert_eq!(error.errno(), libc::EBADMSG);
    assert!(!error.is_connection_failure());
    assert!(error.to_string().contains("fail their checksum"), "{error}");
    // A whole-block read of part of the chunk.
    let mut blocks = vec![0u8; 16 << 10];
    let error = connection.read_into(chunk0, 4096, &mut blocks).unwrap_err();
    assert!(
        matches!(error, ClientError::Corrupt { chunk, .. } if chunk == chunk0),
        "{error}"
    );
    // A read that covers the damaged block in part: the daemon checks that block itself.
    let mut part = vec![0u8; 100];
    let error = connection.read_into(chunk0, 4990, &mut part).unwrap_err();
    assert!(
        matches!(&error, ClientError::Remote { errno, message, .. }
            if *errno == libc::EIO && message.contains("corrupt")),
        "{error}"
    );
    // The undamaged parts of the chunk and the daemon's other chunks still read.
    connection.read_into(chunk0, 8192, &mut part).unwrap();
    assert_eq!(part[..], data[8192..8292]);
    let chunk3 = &layout.chunks[3];
    let mut other = vec![0u8; chunk3.len as usize];
    connection.read_into(chunk3.chunk, 0, &mut other).unwrap();
    assert!(other[..] == data[chunk3.file_offset as usize..][..other.len()]);

    // A striped read with daemon 0 nearest: chunk 0 comes from daemon 1, every byte right,
    // and daemon 0 keeps serving its other chunks.
    let mut endpoints = cluster.endpoints();
    endpoints[0].distance = 0;
    endpoints[1].distance = 10;
    endpoints[2].distance = 10;
    let mut buffer = ReadBuffer::new(data.len()).unwrap();
    let report = reader(&cluster, endpoints)
        .read(&layout, &mut buffer)
        .unwrap();
    assert!(buffer[..] == data[..], "a corrupt byte was delivered");
    assert_eq!(report.failovers, 1, "{report:?}");
    assert!(report.per_daemon[0] > 0, "{report:?}");
}

#[test]
fn no_replica_left_is_an_error_naming_the_chunk() {
    let mut cluster = cluster(2);
    let data = pattern(4 * CHUNK as usize, 5);
    let layout = cluster.write_striped(5, &data, 1).unwrap();
    cluster.stop(1);
    let mut buffer = ReadBuffer::new(data.len()).unwrap();
    let error = reader(&cluster, cluster.endpoints())
        .read(&layout, &mut buffer)
        .unwrap_err();
    match &error {
        StripedError::Unreadable {
            index, attempts, ..
        } => {
            assert_eq!(layout.chunks[*index].replicas, vec![1]);
            assert!(!attempts.is_empty());
        }
        other => panic!("expected Unreadable, got {other}"),
    }
    assert!(
        error
            .to_string()
            .contains("could not be read from any replica")
    );

    // A buffer too small for the file is refused before anything is read.
    let mut small = ReadBuffer::new(100).unwrap();
    let error = reader(&cluster, cluster.endpoints())
        .read(&layout, &mut small)
        .unwrap_err();
    assert!(
        matches!(error, StripedError::BufferTooSmall { .. }),
        "{error}"
    );
}

#[test]
fn forcing_rdma_without_a_device_is_a_clear_error() {
    let cluster = cluster(1);
    let error = tier0_client::transport::connect(
        cluster.addr(0),
        cluster.token(),
        "test",
        Duration::from_secs(5),
        TransportChoice::Rdma,
        None,
    )
    .unwrap_err();
    assert!(matches!(error, ClientError::Unusable { .. }), "{error}");
    assert!(error.to_string().contains("RDMA"), "{error}");
    // Auto without a device is the node-local path to a daemon on this node, else TCP.
    let transport = tier0_client::transport::connect(
        cluster.addr(0),
        cluster.token(),
        "test",
        Duration::from_secs(5),
        TransportChoice::Auto,
        None,
    )
    .unwrap();
    assert_eq!(transport.kind(), TransportKind::Local);
    // Without RDMA in the kernel, listing devices is "none", never an error.
    if !std::path::Path::new("/sys/class/infiniband").exists() {
        let devices = tier0_dataplane::net::rdma::device_names().unwrap();
        assert_eq!(devices, Vec::<String>::new());
        let error = tier0_client::RdmaClient::open(None).unwrap_err();
        assert!(error.to_string().contains("no RDMA device"), "{error}");
    }
}

/// The layout of a restored file (0x80) that reads file 8's chunks: daemons fence by the
/// layout's file. Once one daemon has a newer fence, a read at the old version fails at once,
/// naming that daemon and the file, with no failover (the other replicas have not heard yet
/// and would have served it); the reader keeps its connection, and the refreshed version
/// reads every byte. Version 0 is never fenced.
#[test]
fn a_stale_layout_fails_the_read_without_failover_and_the_refreshed_one_reads() {
    let cluster = cluster(3);
    let data = pattern(12 * CHUNK as usize + 123, 8);
    let mut layout = cluster.write_striped(8, &data, 2).unwrap();
    layout.layout = LayoutRef {
        file: 0x80,
        version: 3,
    };
    let mut reader = reader(&cluster, cluster.endpoints());
    let mut buffer = ReadBuffer::new(data.len()).unwrap();
    let report = reader.read(&layout, &mut buffer).unwrap();
    assert!(buffer[..] == data[..]);
    assert!(report.per_daemon[1] > 0, "{report:?}");

    // The file's layout moves on to version 4; daemon 1 hears of it first.
    cluster.fences(1).unwrap().raise(0x80, 4);
    buffer.fill(0);
    let error = reader.read(&layout, &mut buffer).unwrap_err();
    match &error {
        StripedError::StaleLayout {
            index,
            chunk,
            addr,
            file,
            version,
            message,
        } => {
            assert_eq!(*addr, cluster.addr(1).to_string());
            assert_eq!((*file, *version), (0x80, 3));
            assert_eq!(*chunk, layout.chunks[*index].chunk);
            assert_eq!(chunk.file, 8);
            assert!(layout.chunks[*index].replicas.contains(&1));
            assert!(
                message.contains("node-1: file 80: layout version 3 is stale (now 4)"),
                "{message}"
            );
        }
        other => panic!("expected StaleLayout, got {other}"),
    }
    assert!(error.to_string().contains("reopen the file"), "{error}");
    // A refusal is the daemon's answer: its connection is kept.
    assert_eq!(reader.transports()[1], Some(TransportKind::Local));

    // Reopened at version 4: every byte right, from every daemon, daemon 1 included.
    layout.layout.version = 4;
    buffer.fill(0);
    let report = reader.read(&layout, &mut buffer).unwrap();
    assert!(buffer[..] == data[..], "bytes differ after the refresh");
    assert_eq!((report.failovers, report.rounds), (0, 1), "{report:?}");
    assert!(
        report.per_daemon.iter().all(|&bytes| bytes > 0),
        "{report:?}"
    );

    // Fences on the chunks' own file id, or on file 0, touch neither this layout nor reads
    // not made through a layout (version 0).
    for daemon in 0..3 {
        cluster
            .fences(daemon)
            .unwrap()
            .raise_all([(8, u64::MAX), (0, u64::MAX)]);
    }
    buffer.fill(0);
    reader.read(&layout, &mut buffer).unwrap();
    assert!(buffer[..] == data[..]);
    layout.layout = LayoutRef::default();
    buffer.fill(0);
    let report = reader.read(&layout, &mut buffer).unwrap();
    assert!(buffer[..] == data[..]);
    assert_eq!(report.failovers, 0, "{report:?}");
    let mut connection = DaemonConnection::connect(
        cluster.addr(0),
        cluster.token(),
        "test",
        Duration::from_secs(5),
    )
    .unwrap();
    let mut dest = vec![0u8; 100];
    connection
        .read_into(layout.chunks[0].chunk, 0, &mut dest)
        .unwrap();
    assert_eq!(dest[..], data[..100]);
}
