//! `SlotEntry::decode` on arbitrary bytes under each chunk geometry: see
//! `tier0_dataplane::decode_checks` (byte 0 picks the geometry and the fix-ups).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tier0_dataplane::decode_checks::slot_entry(data));
