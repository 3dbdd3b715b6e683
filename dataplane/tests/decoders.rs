//! Every decoder of on-disk bytes on seeded random and mutated input, each CI run: the same
//! properties the cargo-fuzz targets check (`decode_checks`), plus: any bit flipped in
//! a valid superblock or slot entry is caught by its CRC.

use tier0_dataplane::decode_checks::{self, STORE_ID};
use tier0_dataplane::net::wire::{
    self, Delete, ErrorReply, Hello, LayoutRef, LocalEndpoint, LocalPool, LocalRead, LocalReadDone,
    Message, RdmaEndpoint, RdmaRead, RdmaReadDone, Read, ReadDone, Release, Replicate, Welcome,
    WireError, Write,
};
use tier0_dataplane::store::format::{
    ChunkId, DecodedEntry, ENTRY_HEADER_SIZE, SUPERBLOCK_SIZE, SlotEntry, Superblock,
    block_checksums,
};

/// splitmix64: reproducible input without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// Overwrites 1–8 random bytes of `bytes` with random values.
    fn mutate(&mut self, bytes: &mut [u8]) {
        for _ in 0..1 + self.below(8) {
            let at = self.below(bytes.len());
            bytes[at] = self.next() as u8;
        }
    }
}

fn superblock() -> Superblock {
    Superblock::plan(STORE_ID, 1 << 30, 64 << 10, 4096).unwrap()
}

fn committed_entry(superblock: &Superblock, rng: &mut Rng) -> Vec<u8> {
    let len = 1 + rng.below(superblock.chunk_size as usize);
    let data = rng.bytes(len);
    let entry = SlotEntry {
        sequence: rng.next(),
        chunk: ChunkId {
            file: rng.next(),
            index: rng.next() as u32,
            generation: rng.next() as u32,
        },
        len: len as u32,
        checksums: block_checksums(&data, superblock.checksum_block_size),
    };
    let mut bytes = vec![0; superblock.entry_size as usize];
    entry.encode(superblock, &mut bytes);
    bytes
}

#[test]
fn superblock_decoder_survives_random_and_mutated_bytes() {
    let mut rng = Rng(1);
    for _ in 0..2000 {
        let len = rng.below(2 * SUPERBLOCK_SIZE);
        decode_checks::superblock(&rng.bytes(len));
    }
    let valid = superblock().encode();
    for _ in 0..2000 {
        let mut bytes = valid.to_vec();
        rng.mutate(&mut bytes);
        decode_checks::superblock(&bytes);
    }
}

#[test]
fn slot_entry_decoder_survives_random_and_mutated_bytes() {
    let mut rng = Rng(2);
    for _ in 0..2000 {
        let len = 1 + rng.below(4200);
        decode_checks::slot_entry(&rng.bytes(len));
    }
    let superblock = superblock();
    for _ in 0..300 {
        let valid = committed_entry(&superblock, &mut rng);
        for control in [0u8, 4, 8, 12] {
            let mut input = vec![control];
            input.extend_from_slice(&valid);
            rng.mutate(&mut input[1..]);
            decode_checks::slot_entry(&input);
        }
    }
}

#[test]
fn a_flipped_bit_in_a_superblock_or_slot_entry_is_caught() {
    let superblock = superblock();
    let valid = superblock.encode();
    assert_eq!(Superblock::decode(&valid), Ok(superblock));
    let mut rng = Rng(3);
    for _ in 0..500 {
        let mut bytes = valid;
        let bit = rng.below(SUPERBLOCK_SIZE * 8);
        bytes[bit / 8] ^= 1 << (bit % 8);
        assert!(Superblock::decode(&bytes).is_err(), "bit {bit} undetected");
    }
    for _ in 0..100 {
        let valid = committed_entry(&superblock, &mut rng);
        assert!(matches!(
            SlotEntry::decode(&superblock, &valid),
            Ok(DecodedEntry::Committed(_))
        ));
        // Flip a bit among the bytes the entry's CRC covers, or the CRC itself; the zero
        // padding after them is outside the entry.
        let count = u32::from_le_bytes(valid[52..56].try_into().unwrap()) as usize;
        let covered = ENTRY_HEADER_SIZE + 4 * count + 4;
        let mut bytes = valid.clone();
        let bit = rng.below(covered * 8);
        bytes[bit / 8] ^= 1 << (bit % 8);
        assert!(
            SlotEntry::decode(&superblock, &bytes).is_err(),
            "bit {bit} of a slot entry undetected"
        );
    }
}

fn endpoint() -> RdmaEndpoint {
    RdmaEndpoint {
        lid: 0,
        qp_number: 0x11,
        psn: 0xabcdef,
        gid: [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8],
        mtu: 1024,
        credits: 32,
    }
}

fn every_message() -> Vec<Message> {
    let chunk = ChunkId {
        file: 0x1234_5678_9abc,
        index: 7,
        generation: 3,
    };
    vec![
        Message::Hello(Hello {
            token: b"secret".to_vec(),
            client: "host-a/pid-42".into(),
            rdma: None,
        }),
        Message::Hello(Hello {
            token: b"secret".to_vec(),
            client: "host-a/pid-42".into(),
            rdma: Some(endpoint()),
        }),
        Message::Welcome(Welcome {
            node: "node-1".into(),
            max_payload: 4 << 20,
            rdma: None,
            local: None,
        }),
        Message::Welcome(Welcome {
            node: "node-1".into(),
            max_payload: 4 << 20,
            rdma: Some(endpoint()),
            local: Some(LocalEndpoint {
                socket: "@tier0-data-42-7000".into(),
                boot_id: "3f1c2d4e-0000-4000-8000-000000000001".into(),
            }),
        }),
        Message::LocalAttach,
        Message::LocalPool(LocalPool {
            len: 64 << 20,
            held_max: 32,
        }),
        Message::LocalRead(LocalRead {
            chunk,
            offset: 4096,
            len: 1 << 20,
            layout: LayoutRef {
                file: 0x77,
                version: 12,
            },
        }),
        Message::LocalReadDone(LocalReadDone {
            len: 1 << 20,
            crc: 0xdead_beef,
            offset: 3 << 20,
            lease: 7,
        }),
        Message::Release(Release {
            leases: vec![0, 7, 31],
        }),
        Message::RdmaRead(RdmaRead {
            chunk,
            offset: 8192,
            len: 1 << 20,
            addr: 0x7f00_1234_5000,
            rkey: 0x1234,
            layout: LayoutRef {
                file: 0x77,
                version: 12,
            },
        }),
        Message::RdmaRead(RdmaRead {
            chunk,
            offset: 0,
            len: 4096,
            addr: 0x7f00_1234_6000,
            rkey: 0x1234,
            layout: LayoutRef::default(),
        }),
        Message::RdmaReadDone(RdmaReadDone {
            len: 1 << 20,
            crc: 79,
        }),
        Message::Read(Read {
            chunk,
            offset: 4095,
            len: 10_000,
            layout: LayoutRef {
                file: chunk.file,
                version: 3,
            },
        }),
        Message::Read(Read {
            chunk,
            offset: 0,
            len: 1,
            layout: LayoutRef::default(),
        }),
        Message::ReadDone(ReadDone { len: 5, crc: 77 }),
        Message::Write(Write {
            chunk,
            len: 5,
            crc: 78,
        }),
        Message::WriteDone,
        Message::Delete(Delete { chunk }),
        Message::DeleteDone,
        Message::Replicate(Replicate {
            chunk,
            len: 4 << 20,
            source: "10.0.0.7:7400".into(),
        }),
        Message::Replicate(Replicate {
            chunk,
            len: 1,
            source: "[fe80::1]:7400".into(),
        }),
        Message::Error(ErrorReply {
            errno: libc::ENOENT,
            message: "node-1: chunk 7 not found".into(),
        }),
    ]
}

fn frame(request_id: u64, message: &Message) -> Vec<u8> {
    let mut bytes = Vec::new();
    wire::encode(request_id, message, &mut bytes).unwrap();
    bytes.extend(std::iter::repeat_n(0xab, message.payload_len() as usize));
    bytes
}

#[test]
fn every_wire_message_round_trips_with_its_payload() {
    for (id, message) in every_message().into_iter().enumerate() {
        let bytes = frame(id as u64, &message);
        let (header, decoded, payload) = wire::decode_frame(&bytes, 1 << 20).unwrap();
        assert_eq!(header.request_id, id as u64);
        assert_eq!(decoded, message);
        assert_eq!(payload.len(), message.payload_len() as usize);
        decode_checks::wire_frame(&bytes);
    }
}

/// The read requests' bodies are byte for byte what docs/formats.md lays out (wire version 2):
/// the layout ref goes last, file then version.
#[test]
fn read_bodies_match_the_documented_layout() {
    let chunk = ChunkId {
        file: 0x0102_0304_0506_0708,
        index: 0x1112_1314,
        generation: 0x2122_2324,
    };
    let layout = LayoutRef {
        file: 0x3132_3334_3536_3738,
        version: 0x4142_4344_4546_4748,
    };
    let mut expected = Vec::new();
    expected.extend_from_slice(&chunk.file.to_le_bytes());
    expected.extend_from_slice(&chunk.index.to_le_bytes());
    expected.extend_from_slice(&chunk.generation.to_le_bytes());
    expected.extend_from_slice(&0x5152_5354_5556_5758u64.to_le_bytes());
    expected.extend_from_slice(&0x6162_6364u32.to_le_bytes());
    let mut read = expected.clone();
    read.extend_from_slice(&layout.file.to_le_bytes());
    read.extend_from_slice(&layout.version.to_le_bytes());
    let mut rdma = expected;
    rdma.extend_from_slice(&0x7172_7374_7576_7778u64.to_le_bytes());
    rdma.extend_from_slice(&0x8182_8384u32.to_le_bytes());
    rdma.extend_from_slice(&layout.file.to_le_bytes());
    rdma.extend_from_slice(&layout.version.to_le_bytes());
    for (message, body) in [
        (
            Message::Read(Read {
                chunk,
                offset: 0x5152_5354_5556_5758,
                len: 0x6162_6364,
                layout,
            }),
            read,
        ),
        (
            Message::RdmaRead(RdmaRead {
                chunk,
                offset: 0x5152_5354_5556_5758,
                len: 0x6162_6364,
                addr: 0x7172_7374_7576_7778,
                rkey: 0x8182_8384,
                layout,
            }),
            rdma,
        ),
    ] {
        let bytes = frame(1, &message);
        assert_eq!(&bytes[4..6], &wire::VERSION.to_le_bytes());
        assert_eq!(wire::VERSION, 3);
        assert_eq!(&bytes[wire::HEADER_SIZE..], &body[..], "{message:?}");
    }
    // The local fast path's answer: len, crc, offset in the pool, lease id (docs/formats.md).
    let done = frame(
        1,
        &Message::LocalReadDone(LocalReadDone {
            len: 0x0102_0304,
            crc: 0x0506_0708,
            offset: 0x1112_1314_1516_1718,
            lease: 0x2122_2324,
        }),
    );
    let mut body = Vec::new();
    body.extend_from_slice(&0x0102_0304u32.to_le_bytes());
    body.extend_from_slice(&0x0506_0708u32.to_le_bytes());
    body.extend_from_slice(&0x1112_1314_1516_1718u64.to_le_bytes());
    body.extend_from_slice(&0x2122_2324u32.to_le_bytes());
    assert_eq!(&done[wire::HEADER_SIZE..], &body[..]);
    assert_eq!(
        frame(
            1,
            &Message::Read(Read {
                chunk,
                offset: 0,
                len: 0,
                layout,
            })
        )
        .len(),
        32 + 44
    );
    assert_eq!(
        frame(
            1,
            &Message::RdmaRead(RdmaRead {
                chunk,
                offset: 0,
                len: 0,
                addr: 0,
                rkey: 0,
                layout,
            })
        )
        .len(),
        32 + 56
    );
    // The copy order: chunk, len, then the source address as a string (docs/formats.md).
    let replicate = frame(
        1,
        &Message::Replicate(Replicate {
            chunk,
            len: 0x6162_6364,
            source: "node-7:7400".into(),
        }),
    );
    let mut body = Vec::new();
    body.extend_from_slice(&chunk.file.to_le_bytes());
    body.extend_from_slice(&chunk.index.to_le_bytes());
    body.extend_from_slice(&chunk.generation.to_le_bytes());
    body.extend_from_slice(&0x6162_6364u32.to_le_bytes());
    body.extend_from_slice(&11u64.to_le_bytes());
    body.extend_from_slice(b"node-7:7400");
    assert_eq!(&replicate[wire::HEADER_SIZE..], &body[..]);
    assert_eq!(replicate.len(), 32 + 28 + 11);
    assert_eq!(&replicate[6..8], &17u16.to_le_bytes());
    // A version 1 frame (its read bodies had no layout) is refused from its header.
    let mut old = frame(1, &Message::DeleteDone);
    old[4..6].copy_from_slice(&1u16.to_le_bytes());
    let crc = tier0_dataplane::store::format::crc32c(&old[..28]);
    old[28..32].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(
        wire::decode_frame(&old, 0).unwrap_err(),
        WireError::UnsupportedVersion(1)
    );
}

/// Encoding into a message slot (RDMA) gives the same bytes as encoding into a Vec, and a
/// frame that does not fit its slot is an error, not a cut frame.
#[test]
fn encoding_into_a_slot_matches_and_refuses_what_does_not_fit() {
    for (id, message) in every_message().into_iter().enumerate() {
        let mut vec = Vec::new();
        wire::encode(id as u64, &message, &mut vec).unwrap();
        let mut slot = [0u8; 512];
        let len = wire::encode_into(id as u64, &message, &mut slot).unwrap();
        assert_eq!(&slot[..len], &vec[..], "{message:?}");
        if len > wire::HEADER_SIZE {
            let mut short = vec![0u8; len - 1];
            assert!(wire::encode_into(id as u64, &message, &mut short).is_err());
        }
    }
}

#[test]
fn wire_decoder_survives_random_and_mutated_bytes() {
    let mut rng = Rng(4);
    for _ in 0..3000 {
        let len = rng.below(200);
        decode_checks::wire_frame(&rng.bytes(len));
    }
    let messages = every_message();
    for _ in 0..3000 {
        let mut bytes = frame(rng.next(), &messages[rng.below(messages.len())]);
        rng.mutate(&mut bytes);
        if rng.below(4) == 0 {
            bytes.truncate(rng.below(bytes.len()));
        }
        decode_checks::wire_frame(&bytes);
    }
}

#[test]
fn a_flipped_bit_in_a_frame_header_or_body_is_caught_and_limits_hold() {
    let mut rng = Rng(5);
    for message in every_message() {
        let bytes = frame(9, &message);
        let covered = bytes.len() - message.payload_len() as usize;
        for _ in 0..50 {
            let mut flipped = bytes.clone();
            let bit = rng.below(covered * 8);
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(
                wire::decode_frame(&flipped, 1 << 20).is_err(),
                "{message:?}: bit {bit} undetected"
            );
        }
    }
    // A payload over this side's cap is refused from the header, before anything is read.
    let big = frame(
        1,
        &Message::ReadDone(ReadDone {
            len: 1 << 21,
            crc: 0,
        }),
    );
    assert!(matches!(
        wire::decode_frame(&big, 1 << 20),
        Err(WireError::PayloadTooLong { .. })
    ));
    // A payload corrupted in flight fails its CRC at the reader.
    let data = b"chunk bytes".to_vec();
    let crc = tier0_dataplane::store::format::crc32c(&data);
    assert!(wire::check_payload(crc, &data).is_ok());
    let mut bad = data.clone();
    bad[3] ^= 0x10;
    assert!(matches!(
        wire::check_payload(crc, &bad),
        Err(WireError::PayloadChecksum { .. })
    ));
    // A body too large to send is an encode error, and nothing is appended.
    let mut out = vec![1, 2, 3];
    let giant = Message::Hello(Hello {
        token: vec![0; 70_000],
        client: String::new(),
        rdma: None,
    });
    assert!(matches!(
        wire::encode(1, &giant, &mut out),
        Err(WireError::BodyTooLong { .. })
    ));
    assert_eq!(out, [1, 2, 3]);
}
