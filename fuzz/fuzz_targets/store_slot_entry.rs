//! `SlotEntry::decode` on arbitrary bytes, under each chunk geometry: it must return an error,
//! `Free` or a committed entry, never panic, and a committed entry must survive `encode` →
//! `decode` unchanged.
//!
//! Input: byte 0 picks the geometry (bits 0–1) and two fix-ups (bits 2–3); the rest is the
//! entry. The rest is decoded as it is, then once more cut or zero-padded to the entry size,
//! with this store's id stamped in (bit 2) and the entry CRC re-sealed (bit 3), so that the
//! checks behind the CRC and the store id are reached too.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tier0_dataplane::store::format::{
    DecodedEntry, ENTRY_HEADER_SIZE, SlotEntry, Superblock, crc32c,
};

const STORE_ID: [u8; 16] = *b"tier0-fuzz-store";
const DEVICE_LEN: u64 = 1 << 30;

fn check(superblock: &Superblock, bytes: &[u8]) {
    if let Ok(DecodedEntry::Committed(entry)) = SlotEntry::decode(superblock, bytes) {
        let mut encoded = vec![0xa5; superblock.entry_size as usize];
        entry.encode(superblock, &mut encoded);
        assert_eq!(
            SlotEntry::decode(superblock, &encoded),
            Ok(DecodedEntry::Committed(entry))
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let chunk_size = if control & 1 == 0 { 64 << 10 } else { 4 << 20 };
    let checksum_block_size = if control & 2 == 0 { 4096 } else { 65536 };
    let superblock = Superblock::plan(STORE_ID, DEVICE_LEN, chunk_size, checksum_block_size)
        .expect("every geometry the target picks is valid");

    check(&superblock, rest);

    let size = superblock.entry_size as usize;
    let mut entry = rest[..rest.len().min(size)].to_vec();
    entry.resize(size, 0);
    if control & 4 != 0 {
        entry[8..24].copy_from_slice(&STORE_ID);
    }
    if control & 8 != 0 {
        let count = u32::from_le_bytes(entry[52..56].try_into().unwrap()) as usize;
        let end = ENTRY_HEADER_SIZE + 4 * count;
        if end + 4 <= size {
            let crc = crc32c(&entry[..end]);
            entry[end..end + 4].copy_from_slice(&crc.to_le_bytes());
        }
    }
    check(&superblock, &entry);
});
