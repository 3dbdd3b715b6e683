//! The properties every decoder of on-disk or on-wire bytes must keep, as functions that panic when one
//! is broken. The cargo-fuzz targets (`fuzz/`) feed them coverage-guided input; the test
//! suite (`dataplane/tests/decoders.rs`) feeds them seeded random and mutated input on every
//! CI run, so a regression shows up without a fuzzing session.
//!
//! Random bytes almost never carry a valid CRC32C, so each check also decodes the input a
//! second time with the CRC (and, for slot entries, the store id) re-sealed: that is what
//! reaches the version, geometry and range checks behind them.

use crate::net::wire::{self, HEADER_SIZE, Header};
use crate::store::format::{
    DecodedEntry, ENTRY_HEADER_SIZE, SUPERBLOCK_SIZE, SlotEntry, Superblock, crc32c,
};

/// The store id that [`slot_entry`] stamps into entries when asked to.
pub const STORE_ID: [u8; 16] = *b"tier0-fuzz-store";
const DEVICE_LEN: u64 = 1 << 30;

/// `Superblock::decode` on `data` as it is and re-sealed: an error or a superblock, never a
/// panic, and an accepted superblock survives `encode` → `decode` unchanged.
pub fn superblock(data: &[u8]) {
    superblock_round_trip(data);
    let mut sealed = data[..data.len().min(SUPERBLOCK_SIZE)].to_vec();
    sealed.resize(SUPERBLOCK_SIZE, 0);
    let crc = crc32c(&sealed[..SUPERBLOCK_SIZE - 4]);
    sealed[SUPERBLOCK_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
    superblock_round_trip(&sealed);
}

fn superblock_round_trip(bytes: &[u8]) {
    if let Ok(superblock) = Superblock::decode(bytes) {
        let encoded = superblock.encode();
        assert_eq!(Superblock::decode(&encoded), Ok(superblock));
    }
}

/// `SlotEntry::decode` under one of four geometries: an error, `Free` or a committed entry,
/// never a panic, and a committed entry survives `encode` → `decode` unchanged.
///
/// Byte 0 of `data` picks the geometry (bits 0–1) and two fix-ups for the second decode:
/// stamp [`STORE_ID`] in (bit 2), re-seal the entry CRC (bit 3). The rest is the entry.
pub fn slot_entry(data: &[u8]) {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let chunk_size = if control & 1 == 0 { 64 << 10 } else { 4 << 20 };
    let checksum_block_size = if control & 2 == 0 { 4096 } else { 65536 };
    let superblock = Superblock::plan(STORE_ID, DEVICE_LEN, chunk_size, checksum_block_size)
        .expect("every geometry picked here is valid");

    entry_round_trip(&superblock, rest);

    let size = superblock.entry_size as usize;
    let mut entry = rest[..rest.len().min(size)].to_vec();
    entry.resize(size, 0);
    if control & 4 != 0 {
        entry[8..24].copy_from_slice(&STORE_ID);
    }
    if control & 8 != 0 {
        let count = u32::from_le_bytes(entry[52..56].try_into().expect("4 bytes")) as usize;
        let end = ENTRY_HEADER_SIZE + 4 * count;
        if end + 4 <= size {
            let crc = crc32c(&entry[..end]);
            entry[end..end + 4].copy_from_slice(&crc.to_le_bytes());
        }
    }
    entry_round_trip(&superblock, &entry);
}

fn entry_round_trip(superblock: &Superblock, bytes: &[u8]) {
    if let Ok(DecodedEntry::Committed(entry)) = SlotEntry::decode(superblock, bytes) {
        let mut encoded = vec![0xa5; superblock.entry_size as usize];
        entry.encode(superblock, &mut encoded);
        assert_eq!(
            SlotEntry::decode(superblock, &encoded),
            Ok(DecodedEntry::Committed(entry))
        );
    }
}

/// `wire::decode_frame` on `data` as it is and with the header and body CRCs re-sealed: an
/// error or a frame, never a panic; an accepted frame re-encodes to the same header and body,
/// and its payload is exactly what the header announced.
pub fn wire_frame(data: &[u8]) {
    frame_round_trip(data);
    if data.len() < HEADER_SIZE {
        return;
    }
    let mut sealed = data.to_vec();
    let body_len = u32::from_le_bytes(sealed[16..20].try_into().expect("4 bytes")) as usize;
    let body_end = (HEADER_SIZE + body_len).min(sealed.len());
    let body_crc = crc32c(&sealed[HEADER_SIZE..body_end]);
    sealed[24..28].copy_from_slice(&body_crc.to_le_bytes());
    let header_crc = crc32c(&sealed[..28]);
    sealed[28..32].copy_from_slice(&header_crc.to_le_bytes());
    frame_round_trip(&sealed);
}

fn frame_round_trip(bytes: &[u8]) {
    let max_payload = 1 << 20;
    if let Ok((header, message, payload)) = wire::decode_frame(bytes, max_payload) {
        assert_eq!(payload.len(), header.payload_len as usize);
        let mut encoded = Vec::new();
        wire::encode(header.request_id, &message, &mut encoded).expect("a decoded body fits");
        let head: &[u8; HEADER_SIZE] = encoded[..HEADER_SIZE].try_into().expect("a header");
        assert_eq!(Header::decode(head, max_payload), Ok(header));
        assert_eq!(&encoded[..], &bytes[..encoded.len()]);
    }
}
