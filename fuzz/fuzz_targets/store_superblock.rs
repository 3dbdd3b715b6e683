//! `Superblock::decode` on arbitrary bytes: it must return an error or a superblock, never
//! panic, and a superblock it accepts must survive `encode` → `decode` unchanged.
//!
//! Random bytes almost never carry a valid CRC32C, and short ones stop at the length check, so
//! each input is also decoded a second time cut or zero-padded to 4096 bytes with its CRC
//! re-sealed: that is what reaches the version and geometry checks.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tier0_dataplane::store::format::{SUPERBLOCK_SIZE, Superblock, crc32c};

fn check(bytes: &[u8]) {
    if let Ok(superblock) = Superblock::decode(bytes) {
        let encoded = superblock.encode();
        assert_eq!(Superblock::decode(&encoded), Ok(superblock));
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut sealed = data[..data.len().min(SUPERBLOCK_SIZE)].to_vec();
    sealed.resize(SUPERBLOCK_SIZE, 0);
    let crc = crc32c(&sealed[..SUPERBLOCK_SIZE - 4]);
    sealed[SUPERBLOCK_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
    check(&sealed);
});
