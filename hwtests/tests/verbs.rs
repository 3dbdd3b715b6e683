//! RDMA verbs on a real device: soft-RoCE (rdma_rxe) in CI, through `hwtests/run rdma`, which
//! sets one up where the kernel has rdma_rxe and otherwise runs this suite inside
//! `../shared/tools/softroce-vm`. Ignored in the plain test run: they need an RDMA device.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sideway::ibverbs::queue_pair::ExtendedQueuePair;
use tier0_client::{
    ClientError, DaemonEndpoint, LayoutRef, RdmaClient, ReadBuffer, ReadInto, StripedError,
    StripedReader, TransportChoice, TransportKind,
};
use tier0_dataplane::daemon::RdmaMode;
use tier0_dataplane::net::rdma::verbs::{self, Completions, WorkCompletion};
use tier0_dataplane::net::rdma::{RdmaDevice, device_names};
use tier0_dataplane::store::ChunkId;
use tier0_perf::cluster::{ClusterConfig, LocalCluster, pattern};

const NEEDS: &str = "needs an RDMA device (soft-RoCE): run by hwtests/run rdma";

fn wait_for(completions: &mut Completions, count: usize) -> Vec<WorkCompletion> {
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while got.len() < count {
        assert!(
            std::time::Instant::now() < deadline,
            "completions timed out: {got:?}"
        );
        completions
            .wait(&mut got, Duration::from_millis(50))
            .unwrap();
    }
    got
}

#[test]
#[ignore = "needs an RDMA device (soft-RoCE): run by hwtests/run rdma"]
fn devices_are_listed_and_open() {
    let names = device_names().unwrap();
    assert!(!names.is_empty(), "{NEEDS}");
    let device = RdmaDevice::open(Some(&names[0])).unwrap();
    assert_eq!(device.name(), names[0]);
    assert!(RdmaDevice::open(Some("no-such-device")).is_err());
}

/// Two queue pairs on one device, connected to each other: a SEND arrives, and an RDMA WRITE
/// followed by a SEND lands its bytes in the other side's registered region first.
#[test]
#[ignore = "needs an RDMA device (soft-RoCE): run by hwtests/run rdma"]
fn loopback_queue_pair_registration_and_write() {
    let device = RdmaDevice::open(None).unwrap();
    let mut cq_a = device.completion_queue(64).unwrap();
    let mut cq_b = device.completion_queue(64).unwrap();
    let mut a: ExtendedQueuePair = device.queue_pair(&cq_a.handle(), 16, 16, false).unwrap();
    let mut b: ExtendedQueuePair = device.queue_pair(&cq_b.handle(), 16, 16, true).unwrap();
    let (psn_a, psn_b) = (verbs::random_psn(), verbs::random_psn());
    let end_a = device.endpoint(&a, psn_a, 16);
    let end_b = device.endpoint(&b, psn_b, 16);
    device.connect(&mut a, psn_a, &end_b).unwrap();
    device.connect(&mut b, psn_b, &end_a).unwrap();

    // A's source memory, B's target region (remote-writable) and B's receive slot.
    let mut source = pattern(1 << 20, 1);
    let mut target = vec![0u8; 1 << 20];
    let mut message = b"write done".to_vec();
    let mut inbox = vec![0u8; 64];
    // SAFETY: each of the four buffers outlives its region (dropped explicitly at the end).
    let source_mr = unsafe { device.register(source.as_mut_ptr(), source.len(), false) }.unwrap();
    // SAFETY: as above.
    let message_mr =
        unsafe { device.register(message.as_mut_ptr(), message.len(), false) }.unwrap();
    // SAFETY: as above.
    let target_mr = unsafe { device.register(target.as_mut_ptr(), target.len(), true) }.unwrap();
    // SAFETY: as above.
    let inbox_mr = unsafe { device.register(inbox.as_mut_ptr(), inbox.len(), false) }.unwrap();

    verbs::post_recv(&mut b, 7, inbox_mr.lkey(), inbox.as_ptr() as u64, 64).unwrap();
    verbs::post_write_and_send(
        &mut a,
        42,
        (
            source_mr.lkey(),
            source.as_ptr() as u64,
            source.len() as u32,
        ),
        target_mr.rkey(),
        target.as_ptr() as u64,
        (
            message_mr.lkey(),
            message.as_ptr() as u64,
            message.len() as u32,
        ),
    )
    .unwrap();
    let sent = wait_for(&mut cq_a, 1);
    assert!(sent[0].ok(), "{}", sent[0].status_text());
    assert_eq!(sent[0].wr_id, 42);
    let received = wait_for(&mut cq_b, 1);
    assert!(received[0].ok(), "{}", received[0].status_text());
    assert_eq!(received[0].wr_id, 7);
    assert_eq!(received[0].byte_len as usize, message.len());
    assert_eq!(&inbox[..message.len()], b"write done");
    assert!(target == source, "the RDMA WRITE's bytes differ");

    // A WRITE with a wrong key fails the work request (the NIC checks, nothing lands).
    verbs::post_write_and_send(
        &mut a,
        43,
        (source_mr.lkey(), source.as_ptr() as u64, 4096),
        target_mr.rkey() ^ 0x5555,
        target.as_ptr() as u64,
        (
            message_mr.lkey(),
            message.as_ptr() as u64,
            message.len() as u32,
        ),
    )
    .unwrap();
    let failed = wait_for(&mut cq_a, 1);
    assert!(!failed[0].ok(), "a write with a bad rkey succeeded");
    drop((source_mr, message_mr, target_mr, inbox_mr));
}

fn rdma_cluster(daemons: usize, chunk: u32) -> LocalCluster {
    let mut config = ClusterConfig::for_tests(daemons, chunk);
    config.rdma = RdmaMode::Auto;
    LocalCluster::start(&config).unwrap()
}

/// As `rdma_cluster`, with the stores on /dev/shm (tmpfs), which TCP serves from a mapping
/// (`net::mapped`) and RDMA through the worker's registered pool, as from any drive.
fn rdma_memory_cluster(daemons: usize, chunk: u32) -> LocalCluster {
    let mut config = ClusterConfig::for_tests(daemons, chunk);
    config.rdma = RdmaMode::Auto;
    config.dir = "/dev/shm".into();
    LocalCluster::start(&config).unwrap()
}

/// A daemon serves reads over RDMA into a registered buffer; unregistered memory, a missing
/// chunk, an oversized read and a read at a stale layout version are clean errors, and the
/// session keeps working after them.
#[test]
#[ignore = "needs an RDMA device (soft-RoCE): run by hwtests/run rdma"]
fn daemon_reads_into_registered_memory() {
    let chunk = 256 << 10;
    reads_into_registered_memory(rdma_cluster(1, chunk), chunk);
}

#[test]
#[ignore = "needs an RDMA device (soft-RoCE): run by hwtests/run rdma"]
fn memory_backed_daemon_reads_into_registered_memory() {
    let chunk = 256 << 10;
    reads_into_registered_memory(rdma_memory_cluster(1, chunk), chunk);
}

fn reads_into_registered_memory(cluster: LocalCluster, chunk: u32) {
    let data = pattern(4 * chunk as usize + 1000, 2);
    let layout = cluster.write_striped(9, &data, 1).unwrap();
    let rdma = RdmaClient::open(None).unwrap();
    let mut transport = tier0_client::transport::connect(
        cluster.addr(0),
        cluster.token(),
        "hwtest",
        Duration::from_secs(10),
        TransportChoice::Rdma,
        Some(&rdma),
    )
    .unwrap();
    assert_eq!(transport.kind(), TransportKind::Rdma);
    let mut buffer = ReadBuffer::new(data.len()).unwrap();
    rdma.register(&buffer).unwrap();
    {
        let mut rest: &mut [u8] = &mut buffer[..];
        let mut reads = Vec::new();
        for entry in &layout.chunks {
            let (dest, tail) = std::mem::take(&mut rest).split_at_mut(entry.len as usize);
            rest = tail;
            reads.push(ReadInto {
                chunk: entry.chunk,
                offset: 0,
                dest,
                layout: LayoutRef::default(),
            });
        }
        for result in transport.read_many(&mut reads) {
            result.unwrap();
        }
    }
    assert!(buffer[..] == data[..], "bytes read over RDMA differ");

    let missing = ChunkId {
        file: 9,
        index: 999,
        generation: 1,
    };
    let dest = &mut buffer[..4096];
    let error = transport
        .read_many(&mut [ReadInto {
            chunk: missing,
            offset: 0,
            dest,
            layout: LayoutRef::default(),
        }])
        .pop()
        .unwrap()
        .unwrap_err();
    assert_eq!(error.errno(), libc::ENOENT, "{error}");

    let mut unregistered = vec![0u8; 4096];
    let error = transport
        .read_many(&mut [ReadInto {
            chunk: layout.chunks[0].chunk,
            offset: 0,
            dest: &mut unregistered,
            layout: LayoutRef::default(),
        }])
        .pop()
        .unwrap()
        .unwrap_err();
    assert!(
        error.to_string().contains("not in memory registered"),
        "{error}"
    );
    assert!(transport.is_healthy());

    // A read at a fenced-off layout version is refused (ESTALE) before the drive is read.
    cluster.fences(0).unwrap().raise(0x9a, 7);
    let dest = &mut buffer[..4096];
    let error = transport
        .read_many(&mut [ReadInto {
            chunk: layout.chunks[0].chunk,
            offset: 0,
            dest,
            layout: LayoutRef {
                file: 0x9a,
                version: 6,
            },
        }])
        .pop()
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(&error, ClientError::StaleLayout { file: 0x9a, message, .. }
            if message.contains("layout version 6 is stale (now 7)")),
        "{error}"
    );
    assert_eq!(error.errno(), libc::ESTALE);
    assert!(transport.is_healthy());

    // Still serving: a partial read at an offset, at the current layout version.
    let dest = &mut buffer[..1000];
    transport
        .read_many(&mut [ReadInto {
            chunk: layout.chunks[4].chunk,
            offset: 0,
            dest,
            layout: LayoutRef {
                file: 0x9a,
                version: 7,
            },
        }])
        .pop()
        .unwrap()
        .unwrap();
    assert_eq!(&buffer[..1000], &data[4 * chunk as usize..]);
    rdma.unregister(&buffer);
}

/// A file striped over 3 daemons with 2 replicas, read over RDMA into one registered buffer;
/// a stale layout fails the read without failover; one daemon is stopped mid-read and its
/// chunks come from their other replica.
#[test]
#[ignore = "needs an RDMA device (soft-RoCE): run by hwtests/run rdma"]
fn three_daemon_striped_read_with_failover() {
    let chunk = 128 << 10;
    let cluster = Arc::new(std::sync::Mutex::new(rdma_cluster(3, chunk)));
    let data = pattern(36 * chunk as usize, 3);
    let (mut layout, endpoints, token) = {
        let cluster = cluster.lock().unwrap();
        (
            cluster.write_striped(11, &data, 2).unwrap(),
            cluster.endpoints(),
            cluster.token().to_vec(),
        )
    };
    let rdma = RdmaClient::open(None).unwrap();
    let mut buffer = ReadBuffer::new(data.len()).unwrap();

    let mut reader = StripedReader::new(
        endpoints.clone(),
        &token,
        "hwtest",
        TransportChoice::Rdma,
        Some(rdma.clone()),
    )
    .with_window(2);
    let report = reader.read(&layout, &mut buffer).unwrap();
    assert!(buffer[..] == data[..], "striped RDMA read differs");
    assert_eq!(report.failovers, 0);
    assert!(
        report.per_daemon.iter().all(|&bytes| bytes > 0),
        "{report:?}"
    );
    assert!(
        reader
            .transports()
            .iter()
            .all(|kind| *kind == Some(TransportKind::Rdma))
    );

    // Daemon 2 fences the file's layout version 1 off: the read fails, naming it, without
    // failing over; version 2 reads every byte.
    layout.layout = LayoutRef {
        file: 11,
        version: 1,
    };
    cluster.lock().unwrap().fences(2).unwrap().raise(11, 2);
    let error = reader.read(&layout, &mut buffer).unwrap_err();
    assert!(
        matches!(&error, StripedError::StaleLayout { addr, file: 11, version: 1, .. }
            if *addr == endpoints[2].addr.to_string()),
        "{error}"
    );
    layout.layout.version = 2;
    buffer.fill(0);
    let report = reader.read(&layout, &mut buffer).unwrap();
    assert!(
        buffer[..] == data[..],
        "striped RDMA read differs after the refresh"
    );
    assert_eq!(report.failovers, 0);

    // Again, stopping daemon 1 as soon as the first chunk lands.
    buffer.fill(0);
    let stopped = Arc::new(AtomicBool::new(false));
    let progress = {
        let cluster = cluster.clone();
        let stopped = stopped.clone();
        // Runs in daemon 1's reading thread, between two of its windows: the next window
        // meets a stopped daemon.
        Arc::new(move |_chunk: usize, daemon: usize| {
            if daemon == 1 && !stopped.swap(true, Ordering::SeqCst) {
                cluster.lock().unwrap().stop(1);
            }
        })
    };
    let mut reader = StripedReader::new(
        endpoints
            .into_iter()
            .map(|endpoint| DaemonEndpoint {
                distance: 0,
                ..endpoint
            })
            .collect(),
        &token,
        "hwtest",
        TransportChoice::Rdma,
        Some(rdma),
    )
    .with_window(2)
    .with_timeout(Duration::from_secs(5))
    .with_progress(progress);
    let report = reader.read(&layout, &mut buffer).unwrap();
    assert!(stopped.load(Ordering::SeqCst));
    assert!(buffer[..] == data[..], "bytes differ after failover");
    assert!(
        report.failovers > 0,
        "daemon 1 stopped but nothing failed over: {report:?}"
    );
}

/// `tier0 bench net --transport rdma`, short: tier0's striped and one-at-a-time reads over
/// RDMA next to perftest on the same device and to the verbs ping-pong, each scenario with
/// its baseline, and `null` where perftest does not measure (its CPU; latency of the
/// bandwidth tools).
#[test]
#[ignore = "needs an RDMA device (soft-RoCE) and perftest: run by hwtests/run rdma"]
fn the_rdma_bench_reports_tier0_next_to_perftest() {
    use tier0_perf::net::{NetBenchOptions, NetTransport, run};
    let options = NetBenchOptions {
        transport: NetTransport::Rdma,
        size: 8 << 20,
        repeats: 1,
        small_reads: 100,
        ..NetBenchOptions::default()
    };
    let results = run(&options, &mut |_| {}).unwrap();
    let names: Vec<(&str, &str)> = results
        .iter()
        .map(|r| (r.scenario.as_str(), r.baseline_name.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("striped-read-1m", "ib_write_bw"),
            ("striped-read-1m-vs-read", "ib_read_bw"),
            ("read-4k-qd1", "verbs ping-pong (SEND; WRITE + SEND)"),
            ("read-4k-qd1-vs-read", "ib_read_lat"),
        ]
    );
    for result in &results {
        let name = &result.scenario;
        assert!(
            result.tier0 > 0.0 && result.baseline > 0.0,
            "{name}: {result:?}"
        );
        assert!(
            (result.ratio - result.tier0 / result.baseline).abs() < 1e-9,
            "{name}"
        );
        assert!(result.tier0_cpu_s_per_gib > 0.0, "{name}");
        if name == "read-4k-qd1" {
            // The verbs ping-pong runs in this process: its CPU is measured.
            let theirs = result.baseline_cpu_s_per_gib.expect("the ping-pong's CPU");
            assert!(theirs > 0.0, "{name}");
            assert!(result.cpu_ratio.is_some(), "{name}");
        } else {
            assert_eq!(result.baseline_cpu_s_per_gib, None, "{name}");
            assert_eq!(result.cpu_ratio, None, "{name}");
        }
        let ours = result.tier0_latency;
        assert!(0.0 < ours.p50_us && ours.p50_us <= ours.p99_us && ours.p99_us <= ours.p999_us);
    }
    assert_eq!(results[0].baseline_latency, None);
    assert_eq!(results[1].baseline_latency, None);
    for result in &results[2..] {
        let theirs = result
            .baseline_latency
            .expect("the ping-pong and ib_read_lat report latency");
        assert!(
            0.0 < theirs.p50_us && theirs.p50_us <= theirs.p999_us,
            "{}: {theirs:?}",
            result.scenario
        );
    }
}
