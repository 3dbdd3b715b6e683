//! TCP replies straight from drives whose bytes are memory (tmpfs, ramfs).
//!
//! A read from an NVMe drive lands in a registered buffer by DMA, so its reply costs one CPU
//! copy, into the socket. A drive that is a file in memory has no DMA: reading it into a
//! buffer is a CPU copy of its own (`device::MemoryFileDevice`, in the worker), then the send
//! copies the bytes again. Such a drive is instead mapped read-only
//! once, and a TCP read of whole checksum blocks is answered at once, without the worker's
//! ring, by a vectored send from the mapping: one copy, into the socket, as from NVMe.
//!
//! Its CRC is joined from the stored block checksums without touching the bytes, and the
//! reader checks the bytes against it (W3), as it does for every TCP read. The reply holds
//! the chunk's info until its bytes are in the socket, and the store reuses a deleted
//! chunk's slot only once nobody holds its info, so the bytes sent are the chunk's.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;

use crate::buffer::{BufferLease, ReadOnlyMap};
use crate::device::is_memory_file;
use crate::store::{ChunkId, ChunkInfo, ChunkStore};

/// A memory-backed drive, mapped read-only and shared (its pages are the file's).
#[derive(Debug)]
pub struct MappedDrive {
    map: ReadOnlyMap,
}

impl MappedDrive {
    /// The drive at `path`, mapped, when it is a file on tmpfs or ramfs; `None` for anything
    /// else (a block device, a file on a disk's file system: its reads are the device's).
    pub fn open(path: &Path) -> io::Result<Option<Arc<MappedDrive>>> {
        if !is_memory_file(path)? {
            return Ok(None);
        }
        let file = File::open(path)?;
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "larger than memory"))?;
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an empty drive",
            ));
        }
        let map = ReadOnlyMap::new(file.as_fd(), len)?;
        Ok(Some(Arc::new(MappedDrive { map })))
    }

    /// `len` bytes at `offset` of the drive, if the drive holds them.
    fn bytes(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let start = self.map.range(offset, len)?;
        // SAFETY: inside the mapping, which lives as long as `self`; the drive is this
        // daemon's own store file, whose chunk slots change only once no reader holds them.
        Some(unsafe { std::slice::from_raw_parts(start.as_ptr(), len) })
    }
}

/// A reply's payload that is a range of a mapped drive.
#[derive(Debug)]
pub(crate) struct MappedRange {
    drive: Arc<MappedDrive>,
    offset: u64,
    len: usize,
    /// Held until the bytes are in the socket: the store frees a deleted chunk's slot only
    /// once nobody holds its info, so the slot is not rewritten under the send.
    _chunk: Arc<ChunkInfo>,
}

impl MappedRange {
    /// The range, when the drive holds it (a store's chunk always lies inside its drive).
    pub(crate) fn new(
        drive: &Arc<MappedDrive>,
        offset: u64,
        len: usize,
        chunk: Arc<ChunkInfo>,
    ) -> Option<MappedRange> {
        drive.bytes(offset, len)?;
        Some(MappedRange {
            drive: drive.clone(),
            offset,
            len,
            _chunk: chunk,
        })
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        self.drive
            .bytes(self.offset, self.len)
            .expect("checked when made")
    }
}

/// A reply's chunk bytes: a pool buffer a drive read into, or a memory-backed drive's own.
pub(crate) enum Payload {
    Lease(BufferLease),
    Mapped(MappedRange),
}

impl Payload {
    pub(crate) fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            Payload::Lease(lease) => lease.as_slice(),
            Payload::Mapped(range) => range.as_slice(),
        }
    }
}

/// Reads answered from a memory-backed drive's mapping, which no worker I/O counts.
pub(crate) struct MappedMetrics {
    pub(crate) reads: metrics::Counter,
    pub(crate) bytes: metrics::Counter,
}

impl MappedMetrics {
    pub(crate) fn new(worker: usize) -> Self {
        let labels = [("worker", worker.to_string())];
        MappedMetrics {
            reads: metrics::counter!("tier0_dataplane_mapped_reads_total", &labels),
            bytes: metrics::counter!("tier0_dataplane_mapped_bytes_total", &labels),
        }
    }
}

/// A read's bytes in a memory-backed drive's mapping and their CRC, when it covers whole
/// checksum blocks of a chunk the drive holds; `None` sends it to the worker, which reads it
/// (or answers why not).
pub(crate) fn mapped_read(
    store: &ChunkStore,
    drive: &Arc<MappedDrive>,
    chunk: ChunkId,
    offset: u64,
    len: u32,
) -> Option<(MappedRange, u32)> {
    let info = store.lookup(chunk)?;
    let (at, crc) = store
        .whole_block_span(&info, offset, u64::from(len))
        .ok()??;
    Some((MappedRange::new(drive, at, len as usize, info)?, crc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_in_memory_are_mapped_and_files_on_disk_are_not() {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            let path = shm.join(format!("tier0-mapped-{}", std::process::id()));
            std::fs::write(&path, b"0123456789").unwrap();
            let mapped = MappedDrive::open(&path).unwrap();
            std::fs::remove_file(&path).unwrap();
            let mapped = mapped.expect("/dev/shm is tmpfs");
            assert_eq!(mapped.bytes(2, 3), Some(&b"234"[..]));
            assert_eq!(mapped.bytes(8, 2), Some(&b"89"[..]));
            assert_eq!(mapped.bytes(8, 3), None, "past the end");
            assert_eq!(mapped.bytes(u64::MAX, 1), None);
        }
        // The crate's own folder is on a disk's file system in every build here.
        let on_disk = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        if !is_memory_file(&on_disk).unwrap() {
            assert!(MappedDrive::open(&on_disk).unwrap().is_none());
        }
        // Device nodes live on devtmpfs, which says it is tmpfs: never mapped.
        let null = Path::new("/dev/null");
        if null.exists() {
            assert!(MappedDrive::open(null).unwrap().is_none());
        }
        assert!(MappedDrive::open(Path::new("/nonexistent/tier0")).is_err());
    }
}
