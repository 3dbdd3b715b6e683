//! Every decoder of on-disk bytes on seeded random and mutated input, each CI run: the same
//! properties the cargo-fuzz targets check (`store::decode_checks`), plus: any bit flipped in
//! a valid superblock or slot entry is caught by its CRC.

use tier0_dataplane::store::decode_checks::{self, STORE_ID};
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
