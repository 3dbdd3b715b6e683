//! On-disk encoding of the chunk store: the superblock and the slot entries.
//! The byte layouts and invariants are in `docs/formats.md`; keep the two in step.
//!
//! Decoders take any bytes and return an error, never panic: they read what a crash, a bad
//! drive or another program left on the device, and they are fuzzed (`fuzz/`).

use crate::device::IO_ALIGNMENT;

pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"TIER0CS\0";
pub const SUPERBLOCK_SIZE: usize = 4096;
pub const FORMAT_VERSION: u32 = 1;
/// Two copies of the superblock, at offsets 0 and 4096; the table starts after them.
pub const SUPERBLOCK_COPIES: u64 = 2;

pub const ENTRY_MAGIC: [u8; 4] = *b"T0SE";
pub const ENTRY_VERSION: u16 = 1;
pub const ENTRY_STATE_COMMITTED: u16 = 1;
pub const ENTRY_HEADER_SIZE: usize = 64;

const _: () = assert!(SUPERBLOCK_SIZE == IO_ALIGNMENT);

/// CRC32C (Castagnoli, the iSCSI polynomial), as NVMe, ext4 and iSCSI use. `crc-fast` picks the
/// widest instructions the CPU has (VPCLMULQDQ, PCLMULQDQ, SSE4.2) at run time.
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, bytes) as u32
}
const _: () = assert!(ENTRY_HEADER_SIZE.is_multiple_of(4));

/// Names a chunk: the `index`-th chunk of file `file`, written as part of `generation`.
/// Chunks are immutable, so a rewrite of the same range is a new generation, not an update.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct ChunkId {
    pub file: u64,
    pub index: u32,
    pub generation: u32,
}

impl std::fmt::Display for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}:{}@{}", self.file, self.index, self.generation)
    }
}

/// The store's geometry, fixed at format time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub store_id: [u8; 16],
    pub device_len: u64,
    pub chunk_size: u32,
    pub checksum_block_size: u32,
    pub entry_size: u32,
    pub slot_count: u64,
    pub table_offset: u64,
    pub data_offset: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("too short: {len} bytes, need {need}")]
    TooShort { len: usize, need: usize },
    #[error("bad magic")]
    BadMagic,
    #[error("unsupported format version {0}")]
    UnsupportedVersion(u32),
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("inconsistent geometry: {0}")]
    Geometry(&'static str),
    #[error("entry belongs to another store")]
    ForeignStore,
    #[error("bad field: {0}")]
    Field(&'static str),
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// Size of one slot entry for a geometry: header, one CRC per checksum block, the entry's own
/// CRC, rounded up to whole 4 KiB blocks so every entry is written alone.
pub fn entry_size_for(chunk_size: u32, checksum_block_size: u32) -> u32 {
    let checksums = chunk_size.div_ceil(checksum_block_size) as usize;
    (ENTRY_HEADER_SIZE + 4 * checksums + 4).next_multiple_of(IO_ALIGNMENT) as u32
}

impl Superblock {
    /// Lays out a store on a device of `device_len` bytes. `None` when not even one chunk fits.
    pub fn plan(
        store_id: [u8; 16],
        device_len: u64,
        chunk_size: u32,
        checksum_block_size: u32,
    ) -> Result<Superblock, FormatError> {
        let draft = Superblock {
            store_id,
            device_len,
            chunk_size,
            checksum_block_size,
            entry_size: 0,
            slot_count: 0,
            table_offset: SUPERBLOCK_COPIES * SUPERBLOCK_SIZE as u64,
            data_offset: 0,
        };
        draft.check_sizes()?;
        let entry_size = entry_size_for(chunk_size, checksum_block_size);
        let usable = device_len.saturating_sub(draft.table_offset);
        let slot_count = usable / (u64::from(entry_size) + u64::from(chunk_size));
        if slot_count == 0 {
            return Err(FormatError::Geometry(
                "the device is too small for one chunk",
            ));
        }
        let superblock = Superblock {
            entry_size,
            slot_count,
            data_offset: draft.table_offset + slot_count * u64::from(entry_size),
            ..draft
        };
        superblock.check_geometry()?;
        Ok(superblock)
    }

    fn check_sizes(&self) -> Result<(), FormatError> {
        let align = IO_ALIGNMENT as u32;
        if self.chunk_size == 0 || !self.chunk_size.is_multiple_of(align) {
            return Err(FormatError::Geometry(
                "chunk size is not a positive multiple of 4096",
            ));
        }
        if self.checksum_block_size < align
            || !self.checksum_block_size.is_power_of_two()
            || self.checksum_block_size > self.chunk_size
            || !self.chunk_size.is_multiple_of(self.checksum_block_size)
        {
            return Err(FormatError::Geometry(
                "checksum block size must be a power of two, at least 4096, dividing the chunk size",
            ));
        }
        Ok(())
    }

    /// Invariants 1–4 of `docs/formats.md`: regions aligned, in order, inside the device.
    fn check_geometry(&self) -> Result<(), FormatError> {
        self.check_sizes()?;
        let align = IO_ALIGNMENT as u64;
        if self.entry_size != entry_size_for(self.chunk_size, self.checksum_block_size) {
            return Err(FormatError::Geometry(
                "entry size does not match the chunk geometry",
            ));
        }
        if self.table_offset != SUPERBLOCK_COPIES * SUPERBLOCK_SIZE as u64 {
            return Err(FormatError::Geometry(
                "table does not follow the superblocks",
            ));
        }
        let table_len = self
            .slot_count
            .checked_mul(u64::from(self.entry_size))
            .ok_or(FormatError::Geometry("table size overflows"))?;
        if self.slot_count == 0
            || self.table_offset.checked_add(table_len) != Some(self.data_offset)
        {
            return Err(FormatError::Geometry(
                "data region does not follow the table",
            ));
        }
        let data_len = self
            .slot_count
            .checked_mul(u64::from(self.chunk_size))
            .ok_or(FormatError::Geometry("data size overflows"))?;
        if self
            .data_offset
            .checked_add(data_len)
            .is_none_or(|end| end > self.device_len)
        {
            return Err(FormatError::Geometry("data region runs past the device"));
        }
        if !self.data_offset.is_multiple_of(align) {
            return Err(FormatError::Geometry("data region is not aligned"));
        }
        Ok(())
    }

    pub fn encode(&self) -> [u8; SUPERBLOCK_SIZE] {
        let mut bytes = [0u8; SUPERBLOCK_SIZE];
        bytes[0..8].copy_from_slice(&SUPERBLOCK_MAGIC);
        bytes[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes[16..32].copy_from_slice(&self.store_id);
        bytes[32..40].copy_from_slice(&self.device_len.to_le_bytes());
        bytes[40..44].copy_from_slice(&self.chunk_size.to_le_bytes());
        bytes[44..48].copy_from_slice(&self.checksum_block_size.to_le_bytes());
        bytes[48..52].copy_from_slice(&self.entry_size.to_le_bytes());
        bytes[56..64].copy_from_slice(&self.slot_count.to_le_bytes());
        bytes[64..72].copy_from_slice(&self.table_offset.to_le_bytes());
        bytes[72..80].copy_from_slice(&self.data_offset.to_le_bytes());
        let crc = crc32c(&bytes[..SUPERBLOCK_SIZE - 4]);
        bytes[SUPERBLOCK_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<Superblock, FormatError> {
        if bytes.len() < SUPERBLOCK_SIZE {
            return Err(FormatError::TooShort {
                len: bytes.len(),
                need: SUPERBLOCK_SIZE,
            });
        }
        let bytes = &bytes[..SUPERBLOCK_SIZE];
        if bytes[0..8] != SUPERBLOCK_MAGIC {
            return Err(FormatError::BadMagic);
        }
        let stored = u32_at(bytes, SUPERBLOCK_SIZE - 4);
        let computed = crc32c(&bytes[..SUPERBLOCK_SIZE - 4]);
        if stored != computed {
            return Err(FormatError::Checksum { stored, computed });
        }
        let version = u32_at(bytes, 8);
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let mut store_id = [0; 16];
        store_id.copy_from_slice(&bytes[16..32]);
        let superblock = Superblock {
            store_id,
            device_len: u64_at(bytes, 32),
            chunk_size: u32_at(bytes, 40),
            checksum_block_size: u32_at(bytes, 44),
            entry_size: u32_at(bytes, 48),
            slot_count: u64_at(bytes, 56),
            table_offset: u64_at(bytes, 64),
            data_offset: u64_at(bytes, 72),
        };
        superblock.check_geometry()?;
        Ok(superblock)
    }

    pub fn checksum_count(&self, len: u32) -> usize {
        len.div_ceil(self.checksum_block_size) as usize
    }

    pub fn entry_offset(&self, slot: u64) -> u64 {
        self.table_offset + slot * u64::from(self.entry_size)
    }

    pub fn data_offset_of(&self, slot: u64) -> u64 {
        self.data_offset + slot * u64::from(self.chunk_size)
    }
}

/// A committed chunk as its slot entry records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotEntry {
    pub sequence: u64,
    pub chunk: ChunkId,
    pub len: u32,
    /// CRC32C of each checksum block of the data; the last covers only the bytes up to `len`.
    pub checksums: Vec<u32>,
}

/// What a slot's entry bytes say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodedEntry {
    /// All zeros: never used, or freed.
    Free,
    Committed(SlotEntry),
}

impl SlotEntry {
    pub fn encode(&self, superblock: &Superblock, out: &mut [u8]) {
        let size = superblock.entry_size as usize;
        assert!(out.len() >= size, "entry buffer too small");
        assert_eq!(self.checksums.len(), superblock.checksum_count(self.len));
        let out = &mut out[..size];
        out.fill(0);
        out[0..4].copy_from_slice(&ENTRY_MAGIC);
        out[4..6].copy_from_slice(&ENTRY_VERSION.to_le_bytes());
        out[6..8].copy_from_slice(&ENTRY_STATE_COMMITTED.to_le_bytes());
        out[8..24].copy_from_slice(&superblock.store_id);
        out[24..32].copy_from_slice(&self.sequence.to_le_bytes());
        out[32..40].copy_from_slice(&self.chunk.file.to_le_bytes());
        out[40..44].copy_from_slice(&self.chunk.index.to_le_bytes());
        out[44..48].copy_from_slice(&self.chunk.generation.to_le_bytes());
        out[48..52].copy_from_slice(&self.len.to_le_bytes());
        out[52..56].copy_from_slice(&(self.checksums.len() as u32).to_le_bytes());
        let mut at = ENTRY_HEADER_SIZE;
        for checksum in &self.checksums {
            out[at..at + 4].copy_from_slice(&checksum.to_le_bytes());
            at += 4;
        }
        let crc = crc32c(&out[..at]);
        out[at..at + 4].copy_from_slice(&crc.to_le_bytes());
    }

    pub fn decode(superblock: &Superblock, bytes: &[u8]) -> Result<DecodedEntry, FormatError> {
        let size = superblock.entry_size as usize;
        if bytes.len() < size {
            return Err(FormatError::TooShort {
                len: bytes.len(),
                need: size,
            });
        }
        let bytes = &bytes[..size];
        if bytes.iter().all(|&byte| byte == 0) {
            return Ok(DecodedEntry::Free);
        }
        if bytes[0..4] != ENTRY_MAGIC {
            return Err(FormatError::BadMagic);
        }
        let count = u32_at(bytes, 52) as usize;
        let end = ENTRY_HEADER_SIZE
            .checked_add(
                count
                    .checked_mul(4)
                    .ok_or(FormatError::Field("checksum count"))?,
            )
            .filter(|end| end + 4 <= size)
            .ok_or(FormatError::Field("checksum count"))?;
        let stored = u32_at(bytes, end);
        let computed = crc32c(&bytes[..end]);
        if stored != computed {
            return Err(FormatError::Checksum { stored, computed });
        }
        if u16_at(bytes, 4) != ENTRY_VERSION {
            return Err(FormatError::UnsupportedVersion(u32::from(u16_at(bytes, 4))));
        }
        if u16_at(bytes, 6) != ENTRY_STATE_COMMITTED {
            return Err(FormatError::Field("state"));
        }
        if bytes[8..24] != superblock.store_id {
            return Err(FormatError::ForeignStore);
        }
        let len = u32_at(bytes, 48);
        if len == 0 || len > superblock.chunk_size {
            return Err(FormatError::Field("length"));
        }
        let sequence = u64_at(bytes, 24);
        // Sequences count commits from 1; the largest is refused so recovery can always
        // number the next commit.
        if sequence == 0 || sequence == u64::MAX {
            return Err(FormatError::Field("sequence"));
        }
        if count != superblock.checksum_count(len) {
            return Err(FormatError::Field(
                "checksum count does not match the length",
            ));
        }
        Ok(DecodedEntry::Committed(SlotEntry {
            sequence,
            chunk: ChunkId {
                file: u64_at(bytes, 32),
                index: u32_at(bytes, 40),
                generation: u32_at(bytes, 44),
            },
            len,
            checksums: (0..count)
                .map(|i| u32_at(bytes, ENTRY_HEADER_SIZE + 4 * i))
                .collect(),
        }))
    }
}

/// CRC32C of each `block_size` piece of `data` (the last one may be short).
pub fn block_checksums(data: &[u8], block_size: u32) -> Vec<u32> {
    data.chunks(block_size as usize).map(crc32c).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry() -> Superblock {
        Superblock::plan([7; 16], 64 << 20, 4 << 20, 4096).unwrap()
    }

    #[test]
    fn crc32c_is_the_castagnoli_crc() {
        // The standard check value of CRC-32C (iSCSI), so the format never depends on which
        // implementation computed it.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn superblock_round_trips_and_rejects_any_flipped_bit() {
        let superblock = geometry();
        let bytes = superblock.encode();
        assert_eq!(Superblock::decode(&bytes).unwrap(), superblock);
        for bit in (0..SUPERBLOCK_SIZE * 8).step_by(61) {
            let mut damaged = bytes;
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(
                Superblock::decode(&damaged).is_err(),
                "bit {bit} flip accepted"
            );
        }
    }

    #[test]
    fn geometry_that_overflows_is_an_error_not_a_panic() {
        // Found by the store_superblock fuzz target: slot_count * entry_size near 2^64.
        let mut superblock = Superblock::plan([7; 16], 64 << 20, 4096, 4096).unwrap();
        superblock.slot_count = (1 << 52) - 1;
        assert!(Superblock::decode(&superblock.encode()).is_err());
        superblock.slot_count = u64::MAX;
        assert!(Superblock::decode(&superblock.encode()).is_err());
    }

    #[test]
    fn plan_fits_table_and_data_inside_the_device() {
        let superblock = geometry();
        assert_eq!(
            superblock.entry_size, 8192,
            "1024 checksums need two 4 KiB blocks"
        );
        let end = superblock.data_offset + superblock.slot_count * u64::from(superblock.chunk_size);
        assert!(end <= superblock.device_len);
        assert!(Superblock::plan([0; 16], 1 << 20, 4 << 20, 4096).is_err());
        assert!(Superblock::plan([0; 16], 64 << 20, 4 << 20, 3000).is_err());
        assert!(Superblock::plan([0; 16], 64 << 20, 5000, 4096).is_err());
    }

    #[test]
    fn entry_round_trips_and_rejects_damage_and_foreign_stores() {
        let superblock = geometry();
        let data = vec![0xab; 10_000];
        let entry = SlotEntry {
            sequence: 42,
            chunk: ChunkId {
                file: 9,
                index: 3,
                generation: 1,
            },
            len: data.len() as u32,
            checksums: block_checksums(&data, superblock.checksum_block_size),
        };
        let mut bytes = vec![0; superblock.entry_size as usize];
        entry.encode(&superblock, &mut bytes);
        assert_eq!(
            SlotEntry::decode(&superblock, &bytes).unwrap(),
            DecodedEntry::Committed(entry)
        );
        let mut torn = bytes.clone();
        torn[30] ^= 0x10;
        assert!(SlotEntry::decode(&superblock, &torn).is_err());
        let other = Superblock {
            store_id: [8; 16],
            ..superblock
        };
        assert_eq!(
            SlotEntry::decode(&other, &bytes),
            Err(FormatError::ForeignStore)
        );
        let zeros = vec![0; superblock.entry_size as usize];
        assert_eq!(
            SlotEntry::decode(&superblock, &zeros),
            Ok(DecodedEntry::Free)
        );
    }
}
