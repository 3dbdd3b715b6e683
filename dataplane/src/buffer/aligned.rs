use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use crate::device::IO_ALIGNMENT;

/// A zeroed heap buffer aligned for O_DIRECT I/O.
///
/// For the cold paths (recovery, formatting, tests, bouncing a caller's unaligned buffer);
/// the data path uses the registered [`crate::buffer::BufferPool`] instead.
pub struct AlignedBuf {
    pointer: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (rounded up to the I/O alignment internally).
    pub fn zeroed(len: usize) -> Self {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size (at least one alignment unit).
        let pointer = unsafe { alloc_zeroed(layout) };
        let pointer =
            NonNull::new(pointer).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { pointer, len }
    }

    fn layout(len: usize) -> Layout {
        let size = len.max(1).next_multiple_of(IO_ALIGNMENT);
        Layout::from_size_align(size, IO_ALIGNMENT).expect("aligned layout")
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.pointer.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with the same layout.
        unsafe { dealloc(self.pointer.as_ptr(), Self::layout(self.len)) }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the allocation holds at least `len` initialized (zeroed) bytes.
        unsafe { std::slice::from_raw_parts(self.pointer.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.pointer.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}
