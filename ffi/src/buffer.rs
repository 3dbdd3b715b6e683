//! Client memory that reads land in: page-aligned, and registrable with an RDMA device so a
//! daemon can write into it directly.

use std::ptr::NonNull;
use std::sync::Arc;

/// The allocation behind a [`ReadBuffer`]; registrations keep it alive, so the memory a NIC
/// may write into is never unmapped under it.
#[derive(Debug)]
pub(crate) struct Allocation {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: plain memory; who writes where is decided by the owner of the ReadBuffer (and by
// the daemons it asked, into the ranges it named).
unsafe impl Send for Allocation {}
// SAFETY: as above.
unsafe impl Sync for Allocation {}

impl Drop for Allocation {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `ReadBuffer::new`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// A page-aligned, zeroed buffer for striped reads: one registration per RDMA device covers
/// all of it.
#[derive(Debug)]
pub struct ReadBuffer {
    memory: Arc<Allocation>,
    len: usize,
}

impl ReadBuffer {
    pub fn new(len: usize) -> std::io::Result<ReadBuffer> {
        let mapped = len.max(1).div_ceil(4096) * 4096;
        // SAFETY: an anonymous private mapping; checked for MAP_FAILED below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(ReadBuffer {
            memory: Arc::new(Allocation {
                base: NonNull::new(base.cast()).expect("mmap never returns null on success"),
                len: mapped,
            }),
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn allocation(&self) -> &Arc<Allocation> {
        &self.memory
    }
}

impl Allocation {
    pub(crate) fn base(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl std::ops::Deref for ReadBuffer {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: the mapping is at least `len` bytes and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.memory.base.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for ReadBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above; `&mut self` makes this the only live view.
        unsafe { std::slice::from_raw_parts_mut(self.memory.base.as_ptr(), self.len) }
    }
}
