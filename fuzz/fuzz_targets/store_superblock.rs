//! `Superblock::decode` on arbitrary bytes: see `tier0_dataplane::decode_checks`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tier0_dataplane::decode_checks::superblock(data));
