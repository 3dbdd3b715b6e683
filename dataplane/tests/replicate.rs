//! Daemon-to-daemon copies (`Replicate`) between real daemons on loopback: the target pulls
//! the chunk from the source and stores it byte for byte; a source without it, a dead or
//! silent source, a source whose bytes fail their checksum, a wrong token, a bad address or
//! length, a chunk already there, one copy past the bound, and malformed frames each get
//! their own answer, and nothing half-copied is ever stored.

mod common;
use common::*;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use tier0_dataplane::net::replicate::CopyConfig;
use tier0_dataplane::net::wire::{self, HEADER_SIZE, Hello, Message, ReadDone, Replicate, Welcome};
use tier0_dataplane::store::format::crc32c;

#[test]
fn a_replicated_chunk_is_byte_identical_on_the_target_and_a_second_is_eexist() {
    let source = Node::start("src", TOKEN, CopyConfig::default());
    let target = Node::start("dst", TOKEN, CopyConfig::default());
    // A whole chunk and one that ends inside a checksum block.
    for (index, len) in [(0, CHUNK as usize), (1, 10_000)] {
        let data = pattern(len, index as u8);
        source.connect().write(chunk(index), &data);
        let mut conn = target.connect();
        assert_eq!(
            conn.read(chunk(index), len as u32).unwrap_err().errno,
            libc::ENOENT
        );
        conn.replicate(chunk(index), len as u32, &source.addr().to_string())
            .unwrap();
        assert_eq!(conn.read(chunk(index), len as u32).unwrap(), data);
        // Visible to every connection, and still there after: it was stored, not relayed.
        assert_eq!(
            target.connect().read(chunk(index), len as u32).unwrap(),
            data
        );
        let again = conn
            .replicate(chunk(index), len as u32, &source.addr().to_string())
            .unwrap_err();
        assert_eq!(again.errno, libc::EEXIST, "{}", again.message);
    }
    assert_eq!(target.chunks(), 2);
    // The copies were not reads: the source counts no heat for them; the target counts the
    // reads its clients made.
    let heat = |node: &Node, index| {
        node.daemon
            .as_ref()
            .unwrap()
            .heat()
            .heat(chunk(index))
            .reads
    };
    assert_eq!((heat(&source, 0), heat(&source, 1)), (0.0, 0.0));
    assert!(heat(&target, 0) > 1.9, "{}", heat(&target, 0));
    source.connect().read(chunk(0), CHUNK).unwrap();
    assert!(heat(&source, 0) > 0.9);
}

#[test]
fn a_source_without_the_chunk_or_with_another_token_stores_nothing() {
    let source = Node::start("src", TOKEN, CopyConfig::default());
    let stranger = Node::start("other", b"another-token", CopyConfig::default());
    let target = Node::start("dst", TOKEN, CopyConfig::default());
    let mut conn = target.connect();
    let missing = conn
        .replicate(chunk(5), 4096, &source.addr().to_string())
        .unwrap_err();
    assert_eq!(missing.errno, libc::ENOENT, "{}", missing.message);
    assert!(
        missing.message.contains("dst")
            && missing.message.contains(&source.addr().to_string())
            && missing.message.contains("not found"),
        "{}",
        missing.message
    );
    let refused = conn
        .replicate(chunk(5), 4096, &stranger.addr().to_string())
        .unwrap_err();
    assert_eq!(refused.errno, libc::EIO, "{}", refused.message);
    assert!(refused.message.contains("refused"), "{}", refused.message);
    assert_eq!(conn.read(chunk(5), 4096).unwrap_err().errno, libc::ENOENT);
    assert_eq!(target.chunks(), 0);
}

#[test]
fn a_dead_or_silent_source_fails_the_copy_within_its_timeout() {
    let target = Node::start("dst", TOKEN, copies(4, Duration::from_millis(700)));
    let mut conn = target.connect();
    // Nobody listens there any more.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap().to_string();
    drop(closed);
    let error = conn.replicate(chunk(1), 4096, &dead).unwrap_err();
    assert_eq!(error.errno, libc::EIO, "{}", error.message);
    assert!(error.message.contains("connecting"), "{}", error.message);
    // It accepts, then says nothing: the deadline ends the copy.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let started = Instant::now();
    let error = conn
        .replicate(chunk(1), 4096, &silent.local_addr().unwrap().to_string())
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(error.errno, libc::EIO, "{}", error.message);
    assert!(error.message.contains("timed out"), "{}", error.message);
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // The worker kept serving meanwhile, and stored nothing.
    assert_eq!(conn.read(chunk(1), 4096).unwrap_err().errno, libc::ENOENT);
    assert_eq!(target.chunks(), 0);
}

/// A source that speaks the protocol but sends bytes that fail the CRC it announces.
fn corrupt_source() -> (SocketAddr, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let thread = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut conn = Conn { stream, next_id: 1 };
        let (_, hello, _) = conn.receive();
        assert!(matches!(hello, Message::Hello(Hello { ref token, .. }) if token == TOKEN));
        conn.send_frame(
            0,
            &Message::Welcome(Welcome {
                node: "liar".into(),
                max_payload: CHUNK,
                rdma: None,
                local: None,
            }),
            &[],
        );
        let (header, read, _) = conn.receive();
        let Message::Read(read) = read else {
            panic!("not a read: {read:?}")
        };
        let mut data = pattern(read.len as usize, 9);
        let crc = crc32c(&data);
        data[100] ^= 0x20;
        conn.send_frame(
            header.request_id,
            &Message::ReadDone(ReadDone { len: read.len, crc }),
            &data,
        );
        let _ = conn.stream.read(&mut [0u8; 1]);
    });
    (addr, thread)
}

#[test]
fn bytes_that_fail_their_checksum_are_not_stored() {
    let target = Node::start("dst", TOKEN, CopyConfig::default());
    let (liar, thread) = corrupt_source();
    let mut conn = target.connect();
    let error = conn
        .replicate(chunk(2), 8192, &liar.to_string())
        .unwrap_err();
    assert_eq!(error.errno, libc::EIO, "{}", error.message);
    assert!(error.message.contains("checksum"), "{}", error.message);
    thread.join().unwrap();
    assert_eq!(conn.read(chunk(2), 8192).unwrap_err().errno, libc::ENOENT);
    assert_eq!(target.chunks(), 0);
}

#[test]
fn bad_addresses_and_lengths_are_einval() {
    let source = Node::start("src", TOKEN, CopyConfig::default());
    let target = Node::start("dst", TOKEN, CopyConfig::default());
    let good = source.addr().to_string();
    let mut conn = target.connect();
    for (len, address) in [
        (4096, ""),
        (4096, "127.0.0.1"),
        (4096, "127.0.0.1:0"),
        (4096, "127.0.0.1:99999"),
        (4096, ":7400"),
        (0, good.as_str()),
        (CHUNK + 1, good.as_str()),
    ] {
        let error = conn.replicate(chunk(3), len, address).unwrap_err();
        assert_eq!(
            error.errno,
            libc::EINVAL,
            "{len} from {address:?}: {}",
            error.message
        );
    }
    // The connection goes on after each refusal.
    assert_eq!(conn.read(chunk(3), 4096).unwrap_err().errno, libc::ENOENT);
    assert_eq!(target.chunks(), 0);
}

#[test]
fn a_copy_past_the_bound_is_ebusy_at_once() {
    let target = Node::start("dst", TOKEN, copies(2, Duration::from_secs(2)));
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent = silent.local_addr().map(|addr| (silent, addr)).unwrap();
    let mut conn = target.connect();
    let started = Instant::now();
    let ids: Vec<u64> = (0..3)
        .map(|index| {
            conn.send(
                &Message::Replicate(Replicate {
                    chunk: chunk(10 + index),
                    len: 4096,
                    source: silent.1.to_string(),
                }),
                &[],
            )
        })
        .collect();
    // The third is refused before the other two time out.
    let (header, reply, _) = conn.receive();
    assert_eq!(header.request_id, ids[2]);
    assert!(
        matches!(&reply, Message::Error(error) if error.errno == libc::EBUSY),
        "{reply:?}"
    );
    assert!(started.elapsed() < Duration::from_millis(1500));
    let mut failed = Vec::new();
    for _ in 0..2 {
        let (header, reply, _) = conn.receive();
        let Message::Error(error) = reply else {
            panic!("{reply:?}")
        };
        assert_eq!(error.errno, libc::EIO, "{}", error.message);
        failed.push(header.request_id);
    }
    failed.sort();
    assert_eq!(failed, ids[..2]);
    // Their places are free again.
    let error = conn
        .replicate(chunk(20), 4096, &silent.1.to_string())
        .unwrap_err();
    assert_eq!(error.errno, libc::EIO, "{}", error.message);
    assert_eq!(target.chunks(), 0);
}

/// Seals a frame's body and header CRCs after its bytes were changed.
fn reseal(frame: &mut [u8]) {
    let body_len = u32::from_le_bytes(frame[16..20].try_into().unwrap()) as usize;
    let body_crc = crc32c(&frame[HEADER_SIZE..HEADER_SIZE + body_len]);
    frame[24..28].copy_from_slice(&body_crc.to_le_bytes());
    let header_crc = crc32c(&frame[..28]);
    frame[28..32].copy_from_slice(&header_crc.to_le_bytes());
}

#[test]
fn malformed_replicate_frames_are_refused_without_harm() {
    let target = Node::start("dst", TOKEN, CopyConfig::default());
    let replicate = Message::Replicate(Replicate {
        chunk: chunk(4),
        len: 4096,
        source: "127.0.0.1:7400".into(),
    });
    let mut good = Vec::new();
    wire::encode(7, &replicate, &mut good).unwrap();
    let body_len = good.len() - HEADER_SIZE;
    let mut frames = Vec::new();
    // A trailing byte.
    let mut frame = good.clone();
    frame.push(0);
    frame[16..20].copy_from_slice(&(body_len as u32 + 1).to_le_bytes());
    reseal(&mut frame);
    frames.push(frame);
    // The string cut short (its length says more than the body holds).
    let mut frame = good[..good.len() - 3].to_vec();
    frame[16..20].copy_from_slice(&(body_len as u32 - 3).to_le_bytes());
    reseal(&mut frame);
    frames.push(frame);
    // A source that is not UTF-8.
    let mut frame = good.clone();
    let last = frame.len() - 1;
    frame[last] = 0xff;
    reseal(&mut frame);
    frames.push(frame);
    // A string length of 2^63.
    let mut frame = good.clone();
    frame[HEADER_SIZE + 20..HEADER_SIZE + 28].copy_from_slice(&(1u64 << 63).to_le_bytes());
    reseal(&mut frame);
    frames.push(frame);
    // A payload announced where none belongs.
    let mut frame = good.clone();
    frame[20..24].copy_from_slice(&16u32.to_le_bytes());
    reseal(&mut frame);
    frame.extend_from_slice(&[0; 16]);
    frames.push(frame);
    // A flipped body bit (its CRC no longer matches).
    let mut frame = good.clone();
    frame[HEADER_SIZE + 2] ^= 1;
    frames.push(frame);
    for (index, frame) in frames.iter().enumerate() {
        let mut conn = target.connect();
        conn.stream.write_all(frame).unwrap();
        let mut rest = Vec::new();
        // EPROTO, then the daemon closes the connection (W4).
        conn.stream.read_to_end(&mut rest).unwrap();
        let (_, reply, _) = wire::decode_frame(&rest, 0).unwrap();
        assert!(
            matches!(&reply, Message::Error(error) if error.errno == libc::EPROTO),
            "frame {index}: {reply:?}"
        );
    }
    // The daemon lives on and serves.
    let mut conn = target.connect();
    assert_eq!(conn.read(chunk(4), 4096).unwrap_err().errno, libc::ENOENT);
    assert_eq!(target.chunks(), 0);
}
