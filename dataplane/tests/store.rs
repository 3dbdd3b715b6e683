//! The chunk store on every block-device backend, and under every fault the fault-injecting
//! device can produce: bit flips, failed and torn writes, crashes at each step, a full device.

use tier0_dataplane::device::{
    BlockDevice, FaultControl, FaultyDevice, MemoryDevice, UringDevice, UringOptions,
    preallocate_file,
};
use tier0_dataplane::store::{ChunkId, ChunkStore, ReadCheck, StoreConfig, StoreError};

const SMALL: StoreConfig = StoreConfig {
    chunk_size: 64 << 10,
    checksum_block_size: 4096,
};

fn chunk(file: u64, index: u32) -> ChunkId {
    ChunkId {
        file,
        index,
        generation: 1,
    }
}

/// Deterministic bytes that differ per chunk and per position.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn round_trip(device: &mut dyn BlockDevice) {
    let store = ChunkStore::format(device, SMALL).unwrap();
    // Full, short, one-byte and unaligned-length chunks.
    let sizes = [64 << 10, 10_000, 1, 4096, 65_535];
    for (i, &size) in sizes.iter().enumerate() {
        store
            .put(device, chunk(1, i as u32), &pattern(i as u64, size))
            .unwrap();
    }
    for (i, &size) in sizes.iter().enumerate() {
        assert_eq!(
            store.get(device, chunk(1, i as u32)).unwrap(),
            pattern(i as u64, size)
        );
    }
    // Sub-range reads that start and end inside checksum blocks.
    let whole = pattern(0, 64 << 10);
    let mut part = vec![0; 5000];
    store.read(device, chunk(1, 0), 3000, &mut part).unwrap();
    assert_eq!(part, whole[3000..8000]);
    let mut past_end = vec![0; 2];
    assert!(matches!(
        store.read(device, chunk(1, 2), 0, &mut past_end),
        Err(StoreError::OutOfRange { .. })
    ));

    // Restart: the index comes back from the slot table.
    let (reopened, recovery) = ChunkStore::open(device).unwrap();
    assert_eq!(recovery.chunks, sizes.len());
    assert_eq!(recovery.discarded_entries, 0);
    for (i, &size) in sizes.iter().enumerate() {
        assert_eq!(
            reopened.get(device, chunk(1, i as u32)).unwrap(),
            pattern(i as u64, size)
        );
    }
}

#[test]
fn round_trip_in_memory() {
    round_trip(&mut MemoryDevice::new("memory", 4 << 20, 32));
}

#[test]
fn round_trip_on_the_faulty_device_without_faults() {
    round_trip(&mut FaultyDevice::new("faulty", 4 << 20, 32).0);
}

#[test]
fn round_trip_through_io_uring_on_a_file() {
    let dir = tempdir("uring-file");
    let path = dir.join("store");
    preallocate_file(&path, 4 << 20).unwrap();
    let mut device = UringDevice::open(&path, &UringOptions::default()).unwrap();
    round_trip(&mut device);
    // The same bytes are there for a new process (a new open of the file).
    drop(device);
    let mut device = UringDevice::open(&path, &UringOptions::default()).unwrap();
    let (store, _) = ChunkStore::open(&mut device).unwrap();
    assert_eq!(
        store.get(&mut device, chunk(1, 1)).unwrap(),
        pattern(1, 10_000)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

fn tempdir(what: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tier0-store-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn chunks_are_immutable_and_bad_lengths_refused() {
    let mut device = MemoryDevice::new("memory", 4 << 20, 32);
    let store = ChunkStore::format(&mut device, SMALL).unwrap();
    store.put(&mut device, chunk(1, 0), b"first").unwrap();
    let again = store.put(&mut device, chunk(1, 0), b"second");
    assert!(
        matches!(again, Err(StoreError::AlreadyExists { .. })),
        "{again:?}"
    );
    assert!(matches!(
        store.put(&mut device, chunk(1, 1), b""),
        Err(StoreError::BadLength { .. })
    ));
    let too_big = vec![0; (64 << 10) + 1];
    assert!(matches!(
        store.put(&mut device, chunk(1, 2), &too_big),
        Err(StoreError::BadLength { .. })
    ));
    assert_eq!(store.get(&mut device, chunk(1, 0)).unwrap(), b"first");
}

fn faulty_store(len: u64) -> (FaultyDevice, FaultControl, ChunkStore) {
    let (mut device, control) = FaultyDevice::new("faulty", len, 32);
    let store = ChunkStore::format(&mut device, SMALL).unwrap();
    (device, control, store)
}

#[test]
fn every_flipped_bit_on_the_media_is_caught() {
    let (mut device, control, store) = faulty_store(1 << 20);
    let data = pattern(7, 3 * 4096 + 100);
    store.put(&mut device, chunk(2, 0), &data).unwrap();
    let info = store.lookup(chunk(2, 0)).unwrap();
    let base = store.superblock().data_offset_of(info.slot);
    // Every bit of the chunk's bytes, one at a time: each read fails with Corrupt naming the
    // block, and no read returns wrong bytes.
    for byte in 0..data.len() as u64 {
        for bit in [0u8, 3, 7] {
            control.corrupt(base + byte, bit);
            match store.get(&mut device, chunk(2, 0)) {
                Err(StoreError::Corrupt { block, .. }) => assert_eq!(block, byte as usize / 4096),
                other => panic!(
                    "flip at byte {byte} bit {bit} not caught: {:?}",
                    other.map(|d| d.len())
                ),
            }
            control.corrupt(base + byte, bit);
        }
    }
    assert_eq!(store.get(&mut device, chunk(2, 0)).unwrap(), data);
}

#[test]
fn bit_flips_in_transfer_are_caught_on_every_read_size() {
    let (mut device, control, store) = faulty_store(1 << 20);
    let data = pattern(8, 64 << 10);
    store.put(&mut device, chunk(3, 0), &data).unwrap();
    for (offset, len) in [(0u64, 64 << 10), (4096, 4096), (100, 50), (60_000, 5536)] {
        let mut out = vec![0; len];
        let span_bits = (len + (offset as usize % 4096)) * 8;
        for bit in (0..span_bits).step_by(997) {
            let next_io = control.executed();
            control.flip_read_bit(next_io, bit);
            let result = store.read(&mut device, chunk(3, 0), offset, &mut out);
            assert!(
                matches!(result, Err(StoreError::Corrupt { .. })),
                "offset {offset} len {len} bit {bit}"
            );
        }
        control.heal();
        store
            .read(&mut device, chunk(3, 0), offset, &mut out)
            .unwrap();
        assert_eq!(out, data[offset as usize..offset as usize + len]);
    }
}

/// Crash at every I/O of a put, with and without the drive's cache reaching the media, and
/// with the write at the crash point torn at several lengths: after a restart the chunk is
/// either absent or whole, and the chunk committed before is untouched.
#[test]
fn a_crash_at_any_step_of_a_write_leaves_the_old_or_the_new_chunk() {
    let old = pattern(1, 20_000);
    let new = pattern(2, 64 << 10);
    // Count the I/Os of one put: data write, sync, entry write, sync.
    let (mut device, control, store) = faulty_store(1 << 20);
    store.put(&mut device, chunk(9, 0), &old).unwrap();
    let before = control.executed();
    store.put(&mut device, chunk(9, 1), &new).unwrap();
    let ios_per_put = control.executed() - before;
    assert_eq!(ios_per_put, 4);

    let mut outcomes = (0, 0);
    for step in 0..ios_per_put {
        for keep_unsynced in [false, true] {
            for tear in [None, Some(0u32), Some(512), Some(4096), Some(6000)] {
                let (mut device, control, store) = faulty_store(1 << 20);
                store.put(&mut device, chunk(9, 0), &old).unwrap();
                let at = control.executed() + step;
                match tear {
                    Some(bytes) => control.tear_write(at, bytes),
                    None => control.fail_from(at, libc::EIO),
                }
                let result = store.put(&mut device, chunk(9, 1), &new);
                let torn_a_sync = tear.is_some() && step % 2 == 1;
                assert!(
                    result.is_err() || torn_a_sync,
                    "step {step}: the put should fail"
                );

                let image = control.crash_image(keep_unsynced);
                let (mut restarted, _) = FaultyDevice::from_image("restarted", image, 32);
                let (recovered, _) = ChunkStore::open(&mut restarted).unwrap();
                assert_eq!(recovered.get(&mut restarted, chunk(9, 0)).unwrap(), old);
                match recovered.get(&mut restarted, chunk(9, 1)) {
                    Ok(bytes) => {
                        assert_eq!(bytes, new, "step {step}: a mix of old and new");
                        outcomes.1 += 1;
                    }
                    Err(StoreError::NotFound { .. }) => outcomes.0 += 1,
                    Err(other) => panic!("step {step} tear {tear:?}: {other}"),
                }
                // The recovered store takes new writes in the slot the crash left behind.
                recovered.put(&mut restarted, chunk(9, 2), &old).unwrap();
            }
        }
    }
    assert!(
        outcomes.0 > 0 && outcomes.1 > 0,
        "both outcomes exercised: {outcomes:?}"
    );
}

#[test]
fn a_crash_during_delete_leaves_the_chunk_or_nothing() {
    let data = pattern(5, 9000);
    for step in 0..2 {
        for keep_unsynced in [false, true] {
            let (mut device, control, store) = faulty_store(1 << 20);
            store.put(&mut device, chunk(4, 0), &data).unwrap();
            control.fail_from(control.executed() + step, libc::EIO);
            assert!(store.delete(&mut device, chunk(4, 0)).is_err());
            let (mut restarted, _) =
                FaultyDevice::from_image("restarted", control.crash_image(keep_unsynced), 32);
            let (recovered, _) = ChunkStore::open(&mut restarted).unwrap();
            match recovered.get(&mut restarted, chunk(4, 0)) {
                Ok(bytes) => assert_eq!(bytes, data),
                Err(StoreError::NotFound { .. }) => {}
                Err(other) => panic!("{other}"),
            }
        }
    }
}

#[test]
fn a_full_device_is_enospc_and_loses_nothing() {
    let (mut device, _control, store) = faulty_store(1 << 20);
    let slots = store.superblock().slot_count;
    for i in 0..slots {
        store
            .put(&mut device, chunk(6, i as u32), &pattern(i, 30_000))
            .unwrap();
    }
    let error = store
        .put(&mut device, chunk(6, 999), b"one more")
        .unwrap_err();
    assert!(matches!(error, StoreError::Full { .. }), "{error}");
    assert_eq!(error.errno(), libc::ENOSPC);
    assert!(error.to_string().contains("faulty"), "{error}");
    for i in 0..slots {
        assert_eq!(
            store.get(&mut device, chunk(6, i as u32)).unwrap(),
            pattern(i, 30_000)
        );
    }
    // Deleting one makes room again, and the restart sees exactly what is committed.
    store.delete(&mut device, chunk(6, 0)).unwrap();
    store.put(&mut device, chunk(6, 999), b"one more").unwrap();
    let (reopened, recovery) = ChunkStore::open(&mut device).unwrap();
    assert_eq!(recovery.chunks as u64, slots);
    assert_eq!(recovery.free_slots, 0);
    assert!(matches!(
        reopened.get(&mut device, chunk(6, 0)),
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(
        reopened.get(&mut device, chunk(6, 999)).unwrap(),
        b"one more"
    );
}

#[test]
fn a_failed_data_write_frees_its_slot_and_a_failed_entry_write_quarantines_it() {
    let (mut device, control, store) = faulty_store(1 << 20);
    let free = store.free_slots();
    control.fail_one(control.executed(), libc::EIO);
    let error = store.put(&mut device, chunk(7, 0), b"data").unwrap_err();
    assert_eq!(error.errno(), libc::EIO);
    assert_eq!(store.free_slots(), free, "data write failed: slot reusable");
    control.fail_one(control.executed() + 2, libc::EIO);
    assert!(store.put(&mut device, chunk(7, 0), b"data").is_err());
    assert_eq!(
        store.free_slots(),
        free - 1,
        "entry write failed: slot held until restart"
    );
    assert!(store.lookup(chunk(7, 0)).is_none());
}

#[test]
fn a_damaged_primary_superblock_falls_back_to_the_copy() {
    let (mut device, control, store) = faulty_store(1 << 20);
    store.put(&mut device, chunk(8, 0), b"kept").unwrap();
    control.corrupt(100, 1);
    let (reopened, recovery) = ChunkStore::open(&mut device).unwrap();
    assert!(recovery.used_superblock_copy);
    assert_eq!(reopened.get(&mut device, chunk(8, 0)).unwrap(), b"kept");
    control.corrupt(4096 + 100, 1);
    assert!(matches!(
        ChunkStore::open(&mut device),
        Err(StoreError::NotAStore { .. })
    ));
}

#[test]
fn opening_something_that_is_not_a_store_is_a_clear_error() {
    let mut device = MemoryDevice::new("blank", 1 << 20, 8);
    let error = ChunkStore::open(&mut device).unwrap_err();
    assert!(
        error.to_string().contains("blank: no chunk store here"),
        "{error}"
    );
    let mut tiny = MemoryDevice::new("tiny", 16 << 10, 8);
    assert!(matches!(
        ChunkStore::format(&mut tiny, SMALL),
        Err(StoreError::Format { .. })
    ));
}

#[test]
fn reformatting_forgets_old_chunks_without_zeroing_the_table() {
    let mut device = MemoryDevice::new("memory", 1 << 20, 8);
    let store = ChunkStore::format(&mut device, SMALL).unwrap();
    store.put(&mut device, chunk(1, 0), b"old store").unwrap();
    ChunkStore::format(&mut device, SMALL).unwrap();
    let (store, recovery) = ChunkStore::open(&mut device).unwrap();
    assert_eq!(recovery.chunks, 0);
    assert_eq!(
        recovery.discarded_entries, 1,
        "the old entry names another store"
    );
    assert!(store.is_empty());
}

#[test]
fn the_crc_of_a_read_comes_from_the_stored_checksums_and_a_wrong_byte_fails_it() {
    use tier0_dataplane::buffer::AlignedBuf;
    use tier0_dataplane::store::format::crc32c;
    let mut device = MemoryDevice::new("memory", 1 << 20, 8);
    let store = ChunkStore::format(&mut device, SMALL).unwrap();
    // The last checksum block is short: 65,535 bytes is 15 blocks and 4095 bytes.
    let data = pattern(11, 65_535);
    store.put(&mut device, chunk(4, 0), &data).unwrap();
    let info = store.lookup(chunk(4, 0)).unwrap();
    let ranges = [
        (0u64, 65_535usize),
        (0, 4096),
        (4096, 8192),
        (61_440, 4095),
        (100, 50),
        (4000, 200),
        (3000, 60_000),
        (65_534, 1),
    ];
    for (offset, len) in ranges {
        let span = store.read_span(&info, offset, len as u64).unwrap();
        let mut raw = AlignedBuf::zeroed(span.device_len as usize);
        device.read_at(span.device_offset, &mut raw).unwrap();
        let want = crc32c(&data[offset as usize..offset as usize + len]);
        assert_eq!(
            store
                .check_read(&info, &span, &raw, ReadCheck::Worker)
                .unwrap(),
            want,
            "{offset}+{len}"
        );
        assert_eq!(
            store
                .check_read(&info, &span, &raw, ReadCheck::Reader)
                .unwrap(),
            want,
            "{offset}+{len}"
        );
        // A flipped bit anywhere in the requested bytes: checked by the worker, the read is
        // refused; left to the reader, it is refused (a block covered in part) or given a CRC
        // the damaged bytes do not have; never both silent.
        for bit in (0..len * 8).step_by(1231) {
            let mut bad = AlignedBuf::zeroed(raw.len());
            bad.copy_from_slice(&raw);
            bad[span.skip as usize + bit / 8] ^= 1 << (bit % 8);
            assert!(matches!(
                store.check_read(&info, &span, &bad, ReadCheck::Worker),
                Err(StoreError::Corrupt { .. })
            ));
            let got = &bad[span.skip as usize..span.skip as usize + len];
            match store.check_read(&info, &span, &bad, ReadCheck::Reader) {
                Err(StoreError::Corrupt { .. }) => {}
                Ok(expected) => assert_ne!(crc32c(got), expected, "{offset}+{len} bit {bit}"),
                Err(other) => panic!("{other}"),
            }
        }
    }
}

#[test]
fn a_whole_block_read_gets_its_place_and_crc_without_its_bytes_and_a_partial_one_none() {
    use tier0_dataplane::buffer::AlignedBuf;
    use tier0_dataplane::store::format::crc32c;
    let mut device = MemoryDevice::new("memory", 1 << 20, 8);
    let store = ChunkStore::format(&mut device, SMALL).unwrap();
    // 15 whole blocks and a short last one of 4095 bytes.
    let data = pattern(12, 65_535);
    store.put(&mut device, chunk(5, 0), &data).unwrap();
    let info = store.lookup(chunk(5, 0)).unwrap();
    for (offset, len) in [(0u64, 65_535usize), (0, 4096), (4096, 8192), (61_440, 4095)] {
        let (at, crc) = store
            .whole_block_span(&info, offset, len as u64)
            .unwrap()
            .unwrap_or_else(|| panic!("{offset}+{len} covers whole blocks"));
        assert_eq!(
            crc,
            crc32c(&data[offset as usize..][..len]),
            "{offset}+{len}"
        );
        // The place is where the bytes are on the device.
        let mut raw = AlignedBuf::zeroed(len.next_multiple_of(4096));
        device.read_at(at, &mut raw).unwrap();
        assert_eq!(
            &raw[..len],
            &data[offset as usize..][..len],
            "{offset}+{len}"
        );
    }
    for (offset, len) in [
        (100u64, 50u64),
        (0, 4095),
        (4096, 100),
        (3000, 60_000),
        (65_534, 1),
    ] {
        assert_eq!(
            store.whole_block_span(&info, offset, len).unwrap(),
            None,
            "{offset}+{len} covers part of a block"
        );
    }
    assert!(matches!(
        store.whole_block_span(&info, 61_440, 4096),
        Err(StoreError::OutOfRange { .. })
    ));
}
