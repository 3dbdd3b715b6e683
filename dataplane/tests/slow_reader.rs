//! A client that sends many reads and takes none of the replies holds the worker's buffers
//! (its replies wait in the daemon for room in the socket). That is backpressure, not a
//! stop: once the slow client reads, its replies go out, the buffers come back, and both it
//! and a client that asked meanwhile get their answers, every byte right.

mod common;
use common::*;

use std::io::Write as _;
use std::time::Duration;

use tier0_dataplane::net::wire::{self, LayoutRef, Message, Read, ReadDone};
use tier0_dataplane::store::format::crc32c;

fn read_message(len: u32) -> Message {
    Message::Read(Read {
        chunk: chunk(0),
        offset: 0,
        len,
        layout: LayoutRef::default(),
    })
}

#[test]
fn a_client_that_takes_no_replies_does_not_stop_the_worker() {
    // Not mapped: every read goes through the worker and holds one of its 8 pool buffers
    // until its reply is in the socket.
    let node = Node::start_in(
        &std::env::temp_dir(),
        "slow-reader",
        TOKEN,
        copies(4, Duration::from_secs(5)),
        false,
    );
    let data = pattern(CHUNK as usize, 7);
    node.connect().write(chunk(0), &data);

    // Far more replies than the loopback socket buffers hold (about 10 MiB) and the pool
    // has buffers: the rest wait in the daemon.
    const READS: usize = 400;
    let mut slow = node.connect();
    let mut requests = Vec::new();
    for id in 1..=READS as u64 {
        wire::encode(id, &read_message(CHUNK), &mut requests).unwrap();
    }
    slow.stream.write_all(&requests).unwrap();
    // Until the socket is full and the pool is taken.
    std::thread::sleep(Duration::from_millis(500));

    // Asks while the pool is taken: its read waits (in its socket) for a buffer.
    let mut other = node.connect();
    let other_id = other.send(&read_message(4096), &[]);
    std::thread::sleep(Duration::from_millis(200));

    // The slow client now reads: every reply comes, once, with the chunk's bytes (reads
    // that found no buffer waited for one: backpressure, not errors).
    slow.stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answered = vec![false; READS + 1];
    for _ in 0..READS {
        let (header, reply, bytes) = slow.receive();
        let id = header.request_id;
        assert!(
            (1..=READS as u64).contains(&id)
                && !std::mem::replace(&mut answered[id as usize], true),
            "reply {id}: not a request outstanding"
        );
        match reply {
            Message::ReadDone(ReadDone { crc, .. }) => {
                assert!(bytes == data, "reply {id}: the chunk's bytes");
                assert_eq!(crc32c(&bytes), crc);
            }
            other => panic!("reply {id}: {other:?}"),
        }
    }
    // READS replies, each a distinct request: every read was answered.

    let (header, reply, bytes) = other.receive();
    assert_eq!(header.request_id, other_id);
    match reply {
        Message::ReadDone(ReadDone { crc, .. }) => {
            assert_eq!(bytes, data[..4096]);
            assert_eq!(crc32c(&bytes), crc);
        }
        other => panic!("unexpected reply {other:?}"),
    }
    // And the worker goes on serving.
    assert_eq!(other.read(chunk(0), CHUNK).unwrap(), data);
}
