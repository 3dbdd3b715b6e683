//! Zero-copy TCP replies from drives whose bytes are memory (tmpfs, ramfs).
//!
//! A read from an NVMe drive lands in a registered buffer by DMA, so sending it costs one
//! copy, into the socket. A drive that is a file in memory has no DMA: reading it into a
//! buffer is a CPU copy of its own, and then the send copies the bytes again. For such a
//! drive the TCP source instead hands the socket the file's own pages (`sendfile(2)`): the
//! bytes are copied once, by the receiving socket, and never pass through a buffer.
//!
//! Only a read of whole checksum blocks, and of at most [`SPLICE_MAX_READ`] bytes, goes this
//! way: its CRC is joined from the stored
//! block checksums without touching the bytes, and the reader checks the bytes against it
//! (W3), as it does for every TCP read. The pages are shared with the file, so a chunk
//! deleted and its slot rewritten while its bytes are still queued in the socket reaches the
//! reader changed: its checksum check fails it and it reads another replica. No wrong byte
//! is delivered; the slot is kept from reuse until the bytes are handed to the socket.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use crate::store::ChunkInfo;

/// The largest read sent from a drive's pages; larger ones go through the worker. Measured
/// on loopback (`bench net --chunk-size`, with and without `--no-splice`): from the pages,
/// 4 KiB and 16 KiB reads went faster and took less CPU; 64 KiB and 1 MiB ones went slower,
/// as a spliced reply reaches the reader in 4 KiB page pieces, each its own copy there,
/// where a copied one comes in large pieces.
pub const SPLICE_MAX_READ: u32 = 16 << 10;

/// `statfs` magic numbers of the file systems whose files are memory.
const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// A memory-backed drive, opened for sending its pages (buffered: the store's own handle
/// is O_DIRECT, and the kernel copies through a bounce page to splice from one of those).
#[derive(Debug)]
pub struct SpliceFile {
    file: File,
}

impl SpliceFile {
    /// The drive at `path`, when it is a file on tmpfs or ramfs; `None` for anything else
    /// (a block device, a file on a disk's file system: their reads wait for the device).
    pub fn open(path: &Path) -> io::Result<Option<Arc<SpliceFile>>> {
        if !memory_backed(path)? {
            return Ok(None);
        }
        let file = File::open(path)?;
        Ok(Some(Arc::new(SpliceFile { file })))
    }

    /// Sends up to `len` bytes at `offset` of the file into `socket` (non-blocking: it may
    /// take fewer, or none with `WouldBlock`). `Ok(0)` means the file ends before `offset`.
    pub(crate) fn send(&self, socket: RawFd, offset: u64, len: usize) -> io::Result<usize> {
        let mut at = offset as libc::off_t;
        // SAFETY: both fds are open for the call; the kernel writes only `at`.
        let sent = unsafe { libc::sendfile(socket, self.file.as_raw_fd(), &mut at, len) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sent as usize)
    }
}

/// Whether the file system under `path` keeps its files in memory.
fn memory_backed(path: &Path) -> io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the path"))?;
    // SAFETY: a statfs struct is plain integers, for which all zeros is a valid value.
    let mut stats: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs fills the struct from a NUL-terminated path; both outlive the call.
    if unsafe { libc::statfs(path.as_ptr(), &mut stats) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let magic = stats.f_type as i64;
    Ok(magic == TMPFS_MAGIC || magic == RAMFS_MAGIC)
}

/// A reply's payload that is a range of a memory-backed drive.
#[derive(Debug)]
pub(crate) struct FileRange {
    pub(crate) file: Arc<SpliceFile>,
    pub(crate) offset: u64,
    pub(crate) len: usize,
    /// Held until the bytes are in the socket: the store frees a deleted chunk's slot only
    /// once nobody holds its info, so the slot is not rewritten under the send.
    pub(crate) _chunk: Arc<ChunkInfo>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_in_memory_are_told_from_files_on_disk() {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            let path = shm.join(format!("tier0-splice-{}", std::process::id()));
            std::fs::write(&path, b"bytes").unwrap();
            let found = SpliceFile::open(&path).unwrap();
            std::fs::remove_file(&path).unwrap();
            assert!(found.is_some(), "/dev/shm is tmpfs");
        }
        // The crate's own folder is on a disk's file system in every build here.
        let on_disk = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        if !memory_backed(&on_disk).unwrap() {
            assert!(SpliceFile::open(&on_disk).unwrap().is_none());
        }
        assert!(SpliceFile::open(Path::new("/nonexistent/tier0")).is_err());
    }
}
