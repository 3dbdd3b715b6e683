//! A read-only shared mapping of a file or memfd: a memory-backed drive the daemon serves
//! from, or the pool a node-local client copies its reads out of.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

#[derive(Debug)]
pub struct ReadOnlyMap {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is read-only and lives until drop; nothing writes through it (a drive's
// writes go through its file, and readers rely on the store's rule that a chunk's slot is
// rewritten only once nobody holds the chunk).
unsafe impl Send for ReadOnlyMap {}
// SAFETY: as above.
unsafe impl Sync for ReadOnlyMap {}

impl ReadOnlyMap {
    /// Maps the first `len` bytes of `fd` (`len` > 0; callers say what an empty one means).
    pub fn new(fd: BorrowedFd<'_>, len: usize) -> io::Result<ReadOnlyMap> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "nothing to map",
            ));
        }
        // SAFETY: a new read-only shared mapping of an open fd; the kernel picks the place.
        // Checked for MAP_FAILED below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(base.cast::<u8>()).expect("mmap never maps at 0");
        Ok(ReadOnlyMap { base, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where `len` bytes at `offset` start, if the mapping holds them all.
    pub fn range(&self, offset: u64, len: usize) -> Option<NonNull<u8>> {
        let start = usize::try_from(offset).ok()?;
        if start.checked_add(len)? > self.len {
            return None;
        }
        // SAFETY: `start` is inside the mapping (checked above).
        Some(unsafe { self.base.add(start) })
    }
}

impl Drop for ReadOnlyMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; nothing borrowed from it outlives
        // `self`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}
