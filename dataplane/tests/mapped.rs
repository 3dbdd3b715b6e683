//! TCP reads from a memory-backed drive (a store file on /dev/shm, tmpfs): whole-block reads
//! are sent from a mapping of the drive, the rest are read by the worker, and every byte and
//! CRC is the same either way; with mapping off every read goes through the worker. Its own
//! test binary: it counts reads through the global metrics recorder.

mod common;
use common::*;

use std::io::Write as _;
use std::path::Path;

use metrics_exporter_prometheus::PrometheusHandle;
use tier0_dataplane::net::replicate::CopyConfig;
use tier0_dataplane::net::wire::{self, LayoutRef, Message, Read, ReadDone};
use tier0_dataplane::store::format::crc32c;

/// The sum of a counter's series in the recorder's text (every worker, one label set each).
fn counter(handle: &PrometheusHandle, name: &str, with: &str) -> u64 {
    handle
        .render()
        .lines()
        .filter(|line| line.starts_with(name) && line.contains(with))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn read_message(chunk_index: u32, offset: u64, len: u32) -> Message {
    Message::Read(Read {
        chunk: chunk(chunk_index),
        offset,
        len,
        layout: LayoutRef::default(),
    })
}

/// The reply's bytes, after checking them against the CRC it announced.
fn checked(reply: (Message, Vec<u8>)) -> Vec<u8> {
    match reply {
        (Message::ReadDone(ReadDone { len, crc }), bytes) => {
            assert_eq!(len as usize, bytes.len());
            assert_eq!(crc32c(&bytes), crc, "the announced CRC is the bytes'");
            bytes
        }
        other => panic!("unexpected reply {other:?}"),
    }
}

#[test]
fn memory_backed_drives_send_whole_blocks_from_their_mapping_and_every_byte_matches() {
    let shm = Path::new("/dev/shm");
    assert!(
        shm.is_dir(),
        "this test needs /dev/shm (tmpfs), where Linux always has it"
    );
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .unwrap();
    let mapped =
        |handle: &PrometheusHandle| counter(handle, "tier0_dataplane_mapped_reads_total", "worker");
    let worker_reads =
        |handle: &PrometheusHandle| counter(handle, "tier0_dataplane_ops_total", "op=\"read\"");

    let node = Node::start_in(shm, "mapped", TOKEN, CopyConfig::default(), true);
    let mut conn = node.connect();
    // A whole chunk, and one whose last checksum block is short (10,000 = 2 × 4096 + 1808).
    let full = pattern(CHUNK as usize, 1);
    let short = pattern(10_000, 2);
    conn.write(chunk(0), &full);
    conn.write(chunk(1), &short);
    let (mapped_before, worker_before) = (mapped(&handle), worker_reads(&handle));

    // Whole blocks: from the mapping.
    let whole = [
        (0, 0u64, CHUNK),
        (0, 4096, 8192),
        (1, 0, 10_000),
        (1, 8192, 1808),
    ];
    let mut read_and_compare = |reads: &[(u32, u64, u32)]| {
        for &(index, offset, len) in reads {
            let data = if index == 0 { &full } else { &short };
            let bytes = checked(conn.call(&read_message(index, offset, len), &[]));
            assert_eq!(
                bytes,
                data[offset as usize..][..len as usize],
                "{index}:{offset}+{len}"
            );
        }
    };
    read_and_compare(&whole);
    assert_eq!(mapped(&handle) - mapped_before, whole.len() as u64);
    assert_eq!(worker_reads(&handle), worker_before);

    // Part of a block: the worker reads and checks it.
    let partial = [(0, 100u64, 50u32), (0, 4000, 200), (1, 9000, 1000)];
    read_and_compare(&partial);
    assert_eq!(worker_reads(&handle) - worker_before, partial.len() as u64);

    // Past the end, and a chunk the drive does not hold: the worker's errors, unchanged.
    for (message, errno) in [
        (read_message(1, 8192, 4096), libc::EINVAL),
        (read_message(7, 0, 4096), libc::ENOENT),
    ] {
        match conn.call(&message, &[]) {
            (Message::Error(error), _) => assert_eq!(error.errno, errno, "{}", error.message),
            other => panic!("unexpected reply {other:?}"),
        }
    }

    // Many reads sent before any reply is taken: the daemon stops taking requests while a
    // connection's replies pile up, and answers every one once they are taken.
    let mut frames = Vec::new();
    let count = 300;
    for i in 0..count {
        let id = 1_000 + i as u64;
        wire::encode(id, &read_message(0, 0, CHUNK), &mut frames).unwrap();
    }
    conn.stream.write_all(&frames).unwrap();
    let mut seen = vec![false; count];
    for _ in 0..count {
        let (header, message, payload) = conn.receive();
        let index = (header.request_id - 1_000) as usize;
        assert!(!seen[index], "request {} answered twice", header.request_id);
        seen[index] = true;
        assert_eq!(checked((message, payload)), full);
    }

    // Mapping off: the same reads, all through the worker.
    drop(conn);
    drop(node);
    let node = Node::start_in(shm, "unmapped", TOKEN, CopyConfig::default(), false);
    let mut conn = node.connect();
    conn.write(chunk(0), &full);
    let (mapped_before, worker_before) = (mapped(&handle), worker_reads(&handle));
    let bytes = checked(conn.call(&read_message(0, 0, CHUNK), &[]));
    assert_eq!(bytes, full);
    assert_eq!(mapped(&handle), mapped_before);
    assert_eq!(worker_reads(&handle) - worker_before, 1);
}
