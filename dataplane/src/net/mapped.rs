//! TCP replies straight from drives whose bytes are memory (tmpfs, ramfs).
//!
//! A read from an NVMe drive lands in a registered buffer by DMA, so its reply costs one CPU
//! copy, into the socket. A drive that is a file in memory has no DMA: reading it into a
//! buffer is a CPU copy of its own (`device::MemoryFileDevice`, in the worker), then the send
//! copies the bytes again. Such a drive is instead mapped read-only once
//! (`device::MemoryDrive`, the mapping its workers copy from too), and a TCP read of whole
//! checksum blocks is answered at once, without the worker's ring, by a vectored send from
//! the mapping: one copy, into the socket, as from NVMe.
//!
//! Its CRC is joined from the stored block checksums without touching the bytes, and the
//! reader checks the bytes against it (W3), as it does for every TCP read. The reply holds
//! the chunk's info until its bytes are in the socket, and the store reuses a deleted
//! chunk's slot only once nobody holds its info, so the bytes sent are the chunk's.

use std::sync::Arc;

use crate::buffer::BufferLease;
use crate::device::MemoryDrive;
use crate::store::{ChunkId, ChunkInfo, ChunkStore};

/// A reply's payload that is a range of a mapped drive.
#[derive(Debug)]
pub(crate) struct MappedRange {
    drive: Arc<MemoryDrive>,
    offset: u64,
    len: usize,
    /// Held until the bytes are in the socket: the store frees a deleted chunk's slot only
    /// once nobody holds its info, so the slot is not rewritten under the send.
    _chunk: Arc<ChunkInfo>,
}

impl MappedRange {
    /// The range, when the drive holds it (a store's chunk always lies inside its drive).
    pub(crate) fn new(
        drive: &Arc<MemoryDrive>,
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
    drive: &Arc<MemoryDrive>,
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
