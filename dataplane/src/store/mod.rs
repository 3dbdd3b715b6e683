//! The chunk store: immutable, checksummed chunks in fixed slots on one device.
//!
//! The store is the bookkeeping (geometry, index, free slots, checksums); it does no I/O of
//! its own on the data path. A worker asks it where to read or write, does the I/O on its own
//! ring, and hands the result back to be verified or published. The blocking methods (`put`,
//! `read`, `delete`, `open`) drive the same steps on an idle device for tools and tests.
//!
//! A write is crash-safe by ordering: data → sync → slot entry → sync → publish. Until the
//! entry is durable the slot counts as free after a restart, so a crash leaves either no chunk
//! or the whole chunk, never a mix. See `docs/formats.md`.

pub mod crc;
pub mod format;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crate::buffer::AlignedBuf;
use crate::device::{BlockDevice, DeviceError, IO_ALIGNMENT};
pub use format::ChunkId;
use format::{
    DecodedEntry, FormatError, SUPERBLOCK_SIZE, SlotEntry, Superblock, block_checksums, crc32c,
};

/// Chunk geometry chosen at format time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// Largest chunk, and the size of every slot (default 4 MiB).
    pub chunk_size: u32,
    /// Bytes covered by one CRC32C (default 4 KiB): the smallest read that can be verified,
    /// so small random reads cost no extra I/O. The index keeps 4 bytes per block in memory:
    /// 0.1% of capacity at 4 KiB.
    pub checksum_block_size: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            chunk_size: 4 << 20,
            checksum_block_size: 4096,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("{device}: no chunk store here ({reason})")]
    NotAStore { device: String, reason: FormatError },
    #[error("{device}: cannot format: {reason}")]
    Format { device: String, reason: FormatError },
    #[error("{device}: store full: all {slots} chunk slots are used (ENOSPC)")]
    Full { device: String, slots: u64 },
    #[error("{device}: chunk {chunk} already exists (chunks are immutable)")]
    AlreadyExists { device: String, chunk: ChunkId },
    #[error("{device}: chunk {chunk} not found")]
    NotFound { device: String, chunk: ChunkId },
    #[error("{device}: chunk of {len} bytes does not fit a {chunk_size}-byte slot")]
    BadLength {
        device: String,
        len: usize,
        chunk_size: u32,
    },
    #[error(
        "{device}: read of {len} bytes at {offset} is outside chunk {chunk} ({chunk_len} bytes)"
    )]
    OutOfRange {
        device: String,
        chunk: ChunkId,
        offset: u64,
        len: u64,
        chunk_len: u32,
    },
    #[error(
        "{device}: chunk {chunk} is corrupt: checksum block {block} (bytes {start}..{end}) \
         has CRC32C {actual:#010x}, expected {expected:#010x}"
    )]
    Corrupt {
        device: String,
        chunk: ChunkId,
        block: usize,
        start: u64,
        end: u64,
        expected: u32,
        actual: u32,
    },
}

impl StoreError {
    /// The errno a client sees for this error (wire protocol, C ABI).
    pub fn errno(&self) -> i32 {
        match self {
            StoreError::Device(error) => error.errno().unwrap_or(libc::EIO),
            StoreError::NotAStore { .. } | StoreError::Format { .. } => libc::EINVAL,
            StoreError::Full { .. } => libc::ENOSPC,
            StoreError::AlreadyExists { .. } => libc::EEXIST,
            StoreError::NotFound { .. } => libc::ENOENT,
            StoreError::BadLength { .. } | StoreError::OutOfRange { .. } => libc::EINVAL,
            StoreError::Corrupt { .. } => libc::EIO,
        }
    }
}

/// A committed chunk: where it lives and what its checksums are.
#[derive(Debug)]
pub struct ChunkInfo {
    pub chunk: ChunkId,
    pub slot: u64,
    pub len: u32,
    pub sequence: u64,
    checksums: Box<[u32]>,
}

/// Who checks a read's bytes against the stored checksums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadCheck {
    /// The worker checks every checksum block before answering: for readers in this process
    /// that use the bytes as they are.
    Worker,
    /// The reader checks the bytes against the CRC it is given, which the worker builds from
    /// the stored checksums without a pass over the bytes (it checks only blocks the read
    /// covers in part): for network peers, whose check then covers the wire too.
    Reader,
}

/// The device range to read for a byte range of a chunk: whole checksum blocks, aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadSpan {
    pub device_offset: u64,
    pub device_len: u32,
    /// Where the requested bytes start inside the span.
    pub skip: u32,
    pub len: u32,
    first_block: usize,
}

/// A slot set aside for one chunk being written (steps 1–4 of a write).
#[derive(Debug)]
pub struct Reservation {
    pub chunk: ChunkId,
    pub slot: u64,
    pub len: u32,
    sequence: u64,
    checksums: Vec<u32>,
}

/// What [`ChunkStore::open`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    pub chunks: usize,
    pub free_slots: u64,
    /// Entries that failed their checksum or named another store: torn or stale, now free.
    pub discarded_entries: usize,
    /// Older copies of a chunk id (a crash between re-creating and freeing): dropped.
    pub duplicate_entries: usize,
    /// The primary superblock was damaged and the copy was used.
    pub used_superblock_copy: bool,
}

#[derive(Debug)]
struct Allocator {
    free: Vec<u64>,
    /// Deleted chunks whose slots may still be read by an in-flight request: reused only once
    /// no reader holds the ChunkInfo.
    draining: Vec<Arc<ChunkInfo>>,
    /// Slots whose entry write failed: their on-disk state is unknown until a restart.
    quarantined: Vec<u64>,
    reserved: HashMap<ChunkId, u64>,
    next_sequence: u64,
}

#[derive(Debug)]
pub struct ChunkStore {
    device: String,
    superblock: Superblock,
    index: RwLock<HashMap<ChunkId, Arc<ChunkInfo>>>,
    allocator: Mutex<Allocator>,
    /// Joins checksum-block CRCs into the CRC of a read's bytes.
    appender: crc::Appender,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the state consistent before anything can panic.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn random_store_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    // SAFETY: getrandom writes at most `id.len()` bytes into `id`.
    let filled = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if filled != id.len() as isize {
        // No entropy source: time and pid still make a collision with an old store unlikely.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos());
        id = (nanos ^ (u128::from(std::process::id()) << 96)).to_le_bytes();
    }
    id
}

/// True when the slot's entry is a valid committed entry of this store.
fn slot_had_entry(
    superblock: &Superblock,
    device: &mut dyn BlockDevice,
    slot: u64,
) -> Result<bool, StoreError> {
    let mut bytes = AlignedBuf::zeroed(superblock.entry_size as usize);
    device.read_at(superblock.entry_offset(slot), &mut bytes)?;
    Ok(matches!(
        SlotEntry::decode(superblock, &bytes),
        Ok(DecodedEntry::Committed(_))
    ))
}

impl ChunkStore {
    /// Writes a new, empty store on `device`, replacing whatever was there.
    ///
    /// Only the superblocks are written: slot entries left from earlier stores carry another
    /// store id and read as free, so formatting a large drive is instant.
    pub fn format(device: &mut dyn BlockDevice, config: StoreConfig) -> Result<Self, StoreError> {
        let superblock = Superblock::plan(
            random_store_id(),
            device.len(),
            config.chunk_size,
            config.checksum_block_size,
        )
        .map_err(|reason| StoreError::Format {
            device: device.name().to_string(),
            reason,
        })?;
        let mut bytes = AlignedBuf::zeroed(SUPERBLOCK_SIZE * 2);
        let encoded = superblock.encode();
        bytes[..SUPERBLOCK_SIZE].copy_from_slice(&encoded);
        bytes[SUPERBLOCK_SIZE..].copy_from_slice(&encoded);
        device.write_at(0, &bytes)?;
        device.sync()?;
        Ok(Self::empty(device.name(), superblock))
    }

    fn empty(device: &str, superblock: Superblock) -> Self {
        ChunkStore {
            device: device.to_string(),
            superblock,
            appender: crc::Appender::new(u64::from(superblock.checksum_block_size)),
            index: RwLock::new(HashMap::new()),
            allocator: Mutex::new(Allocator {
                free: (0..superblock.slot_count).rev().collect(),
                draining: Vec::new(),
                quarantined: Vec::new(),
                reserved: HashMap::new(),
                next_sequence: 1,
            }),
        }
    }

    /// Opens the store on `device` and rebuilds the index from the slot table.
    pub fn open(device: &mut dyn BlockDevice) -> Result<(Self, Recovery), StoreError> {
        let name = device.name().to_string();
        let mut recovery = Recovery::default();
        let mut bytes = AlignedBuf::zeroed(SUPERBLOCK_SIZE * 2);
        device.read_at(0, &mut bytes)?;
        let superblock = match Superblock::decode(&bytes[..SUPERBLOCK_SIZE]) {
            Ok(superblock) => superblock,
            Err(primary) => match Superblock::decode(&bytes[SUPERBLOCK_SIZE..]) {
                Ok(copy) => {
                    recovery.used_superblock_copy = true;
                    tracing::warn!(device = %name, error = %primary, "primary superblock damaged, using the copy");
                    copy
                }
                Err(_) => {
                    return Err(StoreError::NotAStore {
                        device: name,
                        reason: primary,
                    });
                }
            },
        };
        if superblock.device_len > device.len() {
            return Err(StoreError::NotAStore {
                device: name,
                reason: FormatError::Geometry("the device is smaller than the store"),
            });
        }

        let store = Self::empty(&name, superblock);
        let mut found: HashMap<ChunkId, (u64, SlotEntry)> = HashMap::new();
        let mut free = Vec::new();
        let entry_size = superblock.entry_size as usize;
        // Read the table in large pieces: one I/O per entry would make opening a big drive slow.
        let entries_per_read = ((8usize << 20) / entry_size).max(1) as u64;
        let mut table = AlignedBuf::zeroed(entries_per_read as usize * entry_size);
        let mut slot = 0;
        while slot < superblock.slot_count {
            let count = entries_per_read.min(superblock.slot_count - slot);
            let piece = &mut table[..count as usize * entry_size];
            device.read_at(superblock.entry_offset(slot), piece)?;
            for (i, bytes) in piece.chunks(entry_size).enumerate() {
                let this = slot + i as u64;
                match SlotEntry::decode(&superblock, bytes) {
                    Ok(DecodedEntry::Free) => free.push(this),
                    Ok(DecodedEntry::Committed(entry)) => match found.get(&entry.chunk) {
                        Some((_, kept)) if kept.sequence > entry.sequence => {
                            recovery.duplicate_entries += 1;
                            free.push(this);
                        }
                        Some(&(old_slot, _)) => {
                            recovery.duplicate_entries += 1;
                            free.push(old_slot);
                            found.insert(entry.chunk, (this, entry));
                        }
                        None => {
                            found.insert(entry.chunk, (this, entry));
                        }
                    },
                    Err(_) => {
                        recovery.discarded_entries += 1;
                        free.push(this);
                    }
                }
            }
            slot += count;
        }

        let mut next_sequence = 1;
        {
            let mut index = store
                .index
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for (chunk, (slot, entry)) in found {
                next_sequence = next_sequence.max(entry.sequence + 1);
                index.insert(
                    chunk,
                    Arc::new(ChunkInfo {
                        chunk,
                        slot,
                        len: entry.len,
                        sequence: entry.sequence,
                        checksums: entry.checksums.into_boxed_slice(),
                    }),
                );
            }
            recovery.chunks = index.len();
        }
        // A duplicate's entry is still on the disk: zero it now, or deleting the kept copy
        // later would bring the older one back at the next restart.
        if recovery.duplicate_entries > 0 {
            let zeros = AlignedBuf::zeroed(entry_size);
            let index = store
                .index
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let kept: std::collections::HashSet<u64> =
                index.values().map(|info| info.slot).collect();
            drop(index);
            for &slot in &free {
                if !kept.contains(&slot) && slot_had_entry(&superblock, device, slot)? {
                    device.write_at(superblock.entry_offset(slot), &zeros)?;
                }
            }
            device.sync()?;
        }
        free.sort_unstable_by(|a, b| b.cmp(a));
        recovery.free_slots = free.len() as u64;
        {
            let mut allocator = lock(&store.allocator);
            allocator.free = free;
            allocator.next_sequence = next_sequence;
        }
        Ok((store, recovery))
    }

    pub fn device_name(&self) -> &str {
        &self.device
    }

    pub fn superblock(&self) -> &Superblock {
        &self.superblock
    }

    pub fn chunk_size(&self) -> u32 {
        self.superblock.chunk_size
    }

    pub fn len(&self) -> usize {
        self.index.read().map_or(0, |index| index.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn free_slots(&self) -> u64 {
        let allocator = lock(&self.allocator);
        let drained = allocator
            .draining
            .iter()
            .filter(|info| Arc::strong_count(info) == 1)
            .count();
        (allocator.free.len() + drained) as u64
    }

    /// Committed chunk ids, in no particular order.
    pub fn chunks(&self) -> Vec<ChunkId> {
        self.index
            .read()
            .map(|index| index.keys().copied().collect())
            .unwrap_or_default()
    }

    pub fn lookup(&self, chunk: ChunkId) -> Option<Arc<ChunkInfo>> {
        self.index.read().ok()?.get(&chunk).cloned()
    }

    fn not_found(&self, chunk: ChunkId) -> StoreError {
        StoreError::NotFound {
            device: self.device.clone(),
            chunk,
        }
    }

    // ---- reads -------------------------------------------------------------------------

    /// The device range covering `len` bytes at `offset` of a chunk, in whole checksum blocks.
    pub fn read_span(
        &self,
        info: &ChunkInfo,
        offset: u64,
        len: u64,
    ) -> Result<ReadSpan, StoreError> {
        let out_of_range = || StoreError::OutOfRange {
            device: self.device.clone(),
            chunk: info.chunk,
            offset,
            len,
            chunk_len: info.len,
        };
        let end = offset.checked_add(len).ok_or_else(out_of_range)?;
        if len == 0 || end > u64::from(info.len) {
            return Err(out_of_range());
        }
        let block = u64::from(self.superblock.checksum_block_size);
        let first_block = offset / block;
        let span_start = first_block * block;
        // The span may run past `len` up to the block end: the slot is always chunk_size
        // bytes, so the device range stays inside it.
        let span_end = end.div_ceil(block) * block;
        Ok(ReadSpan {
            device_offset: self.superblock.data_offset_of(info.slot) + span_start,
            device_len: (span_end - span_start) as u32,
            skip: (offset - span_start) as u32,
            len: len as u32,
            first_block: first_block as usize,
        })
    }

    /// Where `len` bytes at `offset` of a chunk lie on the device, and their CRC32C joined
    /// from the stored block checksums, for a read that covers whole checksum blocks (the
    /// chunk's last block is whole up to the chunk's end): such a read can be answered
    /// without touching its bytes, the reader checking them against this CRC. `None` for a
    /// read that covers part of a block, whose stored checksum says nothing about the part.
    pub fn whole_block_span(
        &self,
        info: &ChunkInfo,
        offset: u64,
        len: u64,
    ) -> Result<Option<(u64, u32)>, StoreError> {
        let span = self.read_span(info, offset, len)?;
        let block = u64::from(self.superblock.checksum_block_size);
        let end = offset + len;
        if span.skip != 0 || (!end.is_multiple_of(block) && end != u64::from(info.len)) {
            return Ok(None);
        }
        let blocks = end.div_ceil(block) as usize - span.first_block;
        let mut crc = 0;
        for (i, stored) in info.checksums[span.first_block..][..blocks]
            .iter()
            .enumerate()
        {
            let start = (span.first_block + i) as u64 * block;
            let piece = (end - start).min(block);
            crc = self.appender.append(crc, *stored, piece);
        }
        Ok(Some((span.device_offset, crc)))
    }

    /// The CRC32C of the requested bytes of a completed span read (`data` is the whole span),
    /// joined from the block checksums, after checking the blocks `check` asks for: every
    /// block with [`ReadCheck::Worker`]; with [`ReadCheck::Reader`] only the blocks the request
    /// covers in part (their stored checksum says nothing about a part), the others' stored
    /// checksums standing in for their bytes, so a wrong byte fails either here or at the
    /// reader, never neither.
    pub fn check_read(
        &self,
        info: &ChunkInfo,
        span: &ReadSpan,
        data: &[u8],
        check: ReadCheck,
    ) -> Result<u32, StoreError> {
        let block = self.superblock.checksum_block_size as usize;
        let chunk_len = info.len as usize;
        let (want_start, want_end) = (span.skip as usize, (span.skip + span.len) as usize);
        let mut payload_crc = 0;
        for (i, piece) in data[..span.device_len as usize].chunks(block).enumerate() {
            let index = span.first_block + i;
            let start = index * block;
            let valid = (chunk_len - start).min(block);
            // The requested bytes inside this block, in block coordinates.
            let from = want_start.saturating_sub(i * block);
            let to = (want_end - i * block).min(valid);
            if from >= to {
                continue;
            }
            let whole = from == 0 && to == valid;
            let expected = info.checksums[index];
            let piece_crc = if check == ReadCheck::Worker || !whole {
                let actual = crc32c(&piece[..valid]);
                if actual != expected {
                    return Err(StoreError::Corrupt {
                        device: self.device.clone(),
                        chunk: info.chunk,
                        block: index,
                        start: start as u64,
                        end: (start + valid) as u64,
                        expected,
                        actual,
                    });
                }
                if whole {
                    actual
                } else {
                    crc32c(&piece[from..to])
                }
            } else {
                expected
            };
            payload_crc = self
                .appender
                .append(payload_crc, piece_crc, (to - from) as u64);
        }
        Ok(payload_crc)
    }

    /// Reads `buf.len()` bytes at `offset` of a chunk, verified, on an idle device.
    pub fn read(
        &self,
        device: &mut dyn BlockDevice,
        chunk: ChunkId,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), StoreError> {
        let info = self.lookup(chunk).ok_or_else(|| self.not_found(chunk))?;
        let span = self.read_span(&info, offset, buf.len() as u64)?;
        let mut data = AlignedBuf::zeroed(span.device_len as usize);
        device.read_at(span.device_offset, &mut data)?;
        self.check_read(&info, &span, &data, ReadCheck::Worker)?;
        buf.copy_from_slice(&data[span.skip as usize..(span.skip + span.len) as usize]);
        Ok(())
    }

    /// A whole chunk, verified.
    pub fn get(&self, device: &mut dyn BlockDevice, chunk: ChunkId) -> Result<Vec<u8>, StoreError> {
        let info = self.lookup(chunk).ok_or_else(|| self.not_found(chunk))?;
        let mut data = vec![0; info.len as usize];
        self.read(device, chunk, 0, &mut data)?;
        Ok(data)
    }

    // ---- writes ------------------------------------------------------------------------

    /// Step 1 of a write: a free slot for `chunk`, with the data's checksums taken now, before
    /// the bytes go anywhere (paired with the check after every read).
    pub fn reserve(&self, chunk: ChunkId, data: &[u8]) -> Result<Reservation, StoreError> {
        if data.is_empty() || data.len() > self.superblock.chunk_size as usize {
            return Err(StoreError::BadLength {
                device: self.device.clone(),
                len: data.len(),
                chunk_size: self.superblock.chunk_size,
            });
        }
        let already = || StoreError::AlreadyExists {
            device: self.device.clone(),
            chunk,
        };
        if self.lookup(chunk).is_some() {
            return Err(already());
        }
        let checksums = block_checksums(data, self.superblock.checksum_block_size);
        let mut allocator = lock(&self.allocator);
        if allocator.reserved.contains_key(&chunk) {
            return Err(already());
        }
        // Slots of deleted chunks come back once no reader holds them.
        let Allocator { free, draining, .. } = &mut *allocator;
        draining.retain(|info| {
            let idle = Arc::strong_count(info) == 1;
            if idle {
                free.push(info.slot);
            }
            !idle
        });
        let Some(slot) = allocator.free.pop() else {
            return Err(StoreError::Full {
                device: self.device.clone(),
                slots: self.superblock.slot_count,
            });
        };
        let sequence = allocator.next_sequence;
        allocator.next_sequence += 1;
        allocator.reserved.insert(chunk, slot);
        Ok(Reservation {
            chunk,
            slot,
            len: data.len() as u32,
            sequence,
            checksums,
        })
    }

    /// Where step 2 writes the data (padded with zeros to the alignment).
    pub fn data_offset(&self, reservation: &Reservation) -> u64 {
        self.superblock.data_offset_of(reservation.slot)
    }

    /// Where step 4 writes the entry.
    pub fn entry_offset(&self, reservation: &Reservation) -> u64 {
        self.superblock.entry_offset(reservation.slot)
    }

    pub fn entry_size(&self) -> usize {
        self.superblock.entry_size as usize
    }

    /// The slot entry to write in step 4, once the data is durable.
    pub fn encode_entry(&self, reservation: &Reservation, out: &mut [u8]) {
        SlotEntry {
            sequence: reservation.sequence,
            chunk: reservation.chunk,
            len: reservation.len,
            checksums: reservation.checksums.clone(),
        }
        .encode(&self.superblock, out);
    }

    /// Step 6: the entry is durable; the chunk becomes readable.
    pub fn publish(&self, reservation: Reservation) -> Arc<ChunkInfo> {
        let info = Arc::new(ChunkInfo {
            chunk: reservation.chunk,
            slot: reservation.slot,
            len: reservation.len,
            sequence: reservation.sequence,
            checksums: reservation.checksums.into_boxed_slice(),
        });
        let mut index = self
            .index
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        index.insert(reservation.chunk, info.clone());
        lock(&self.allocator).reserved.remove(&reservation.chunk);
        info
    }

    /// The write failed before its entry was written: the slot is free again.
    pub fn abort(&self, reservation: Reservation) {
        let mut allocator = lock(&self.allocator);
        allocator.reserved.remove(&reservation.chunk);
        allocator.free.push(reservation.slot);
    }

    /// The entry write failed or its sync did: the entry may or may not be on the disk, so
    /// the slot is not reused until a restart reads what is there.
    pub fn quarantine(&self, reservation: Reservation) {
        let mut allocator = lock(&self.allocator);
        allocator.reserved.remove(&reservation.chunk);
        allocator.quarantined.push(reservation.slot);
    }

    /// Writes a chunk on an idle device: reserve, data, sync, entry, sync, publish.
    pub fn put(
        &self,
        device: &mut dyn BlockDevice,
        chunk: ChunkId,
        data: &[u8],
    ) -> Result<(), StoreError> {
        let reservation = self.reserve(chunk, data)?;
        let padded = data.len().next_multiple_of(IO_ALIGNMENT);
        let mut buffer = AlignedBuf::zeroed(padded);
        buffer[..data.len()].copy_from_slice(data);
        let written = device
            .write_at(self.data_offset(&reservation), &buffer)
            .and_then(|()| device.sync());
        if let Err(error) = written {
            self.abort(reservation);
            return Err(error.into());
        }
        let mut entry = AlignedBuf::zeroed(self.entry_size());
        self.encode_entry(&reservation, &mut entry);
        let committed = device
            .write_at(self.entry_offset(&reservation), &entry)
            .and_then(|()| device.sync());
        if let Err(error) = committed {
            self.quarantine(reservation);
            return Err(error.into());
        }
        self.publish(reservation);
        Ok(())
    }

    /// Where a delete writes the zeroed entry of `chunk` (step 1 of 2; then sync, then
    /// [`ChunkStore::forget`]).
    pub fn delete_offset(&self, chunk: ChunkId) -> Result<u64, StoreError> {
        let info = self.lookup(chunk).ok_or_else(|| self.not_found(chunk))?;
        Ok(self.superblock.entry_offset(info.slot))
    }

    /// The zeroed entry is durable: the chunk leaves the index, and its slot is reused once
    /// no in-flight read holds it.
    pub fn forget(&self, chunk: ChunkId) {
        let mut index = self
            .index
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(info) = index.remove(&chunk) {
            lock(&self.allocator).draining.push(info);
        }
    }

    /// Deletes a chunk on an idle device (garbage collection): the entry is zeroed and synced
    /// before the chunk leaves the index; its slot is reused once no reader holds it.
    pub fn delete(&self, device: &mut dyn BlockDevice, chunk: ChunkId) -> Result<(), StoreError> {
        let offset = self.delete_offset(chunk)?;
        let zeros = AlignedBuf::zeroed(self.entry_size());
        device.write_at(offset, &zeros)?;
        device.sync()?;
        self.forget(chunk);
        Ok(())
    }
}
