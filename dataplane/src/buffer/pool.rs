use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

/// How a worker's buffer pool is sized and placed. Fixed at start-up: the data path never
/// allocates I/O memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BufferPoolConfig {
    /// Bytes per buffer: the largest single read a worker serves (default 1 MiB).
    pub buffer_size: usize,
    /// Buffers per worker: with `buffer_size`, the worker's share of pinned memory.
    pub buffer_count: usize,
    /// Bind the memory to this NUMA node (the worker's), so DMA from the drive and to the NIC
    /// never crosses the socket link.
    pub numa_node: Option<u32>,
    /// Try 2 MiB hugepages first (fewer TLB misses and IOMMU entries); fall back to normal
    /// pages with one log line.
    pub hugepages: bool,
}

impl Default for BufferPoolConfig {
    fn default() -> Self {
        BufferPoolConfig {
            buffer_size: 1 << 20,
            buffer_count: 64,
            numa_node: None,
            hugepages: true,
        }
    }
}

const HUGEPAGE_SIZE: usize = 2 << 20;

/// One mapping holding every buffer of a pool. Shared (Arc) with the leases, so the memory
/// outlives any buffer still held by a consumer after its worker stopped.
///
/// The memory is a sealed memfd mapped shared where the kernel allows, so the node-local
/// fast path can hand the pool to a client on the same node. The seals mean no holder of the
/// fd can truncate it under this process's mapping (SIGBUS) or write to it: sealed after
/// this process mapped it writable, a new mapping can only be read-only.
#[derive(Debug)]
struct Region {
    base: NonNull<u8>,
    len: usize,
    hugepages: bool,
    memfd: Option<OwnedFd>,
}

// SAFETY: the region is plain memory; who may touch which buffer is decided by the pool's
// free list and the leases, which hand each buffer to one owner at a time.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: base/len are exactly the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BufferPoolError {
    #[error("buffer pool: buffer size {0} is not a positive multiple of 4096")]
    BufferSize(usize),
    #[error("buffer pool: {0} buffers is outside 1..=16384 (io_uring's registered-buffer limit)")]
    BufferCount(usize),
    #[error("buffer pool: mapping {len} bytes failed")]
    Map {
        len: usize,
        #[source]
        source: io::Error,
    },
}

/// A sealed memfd of `len` bytes (hugetlb-backed with `hugepages`).
fn sealed_memfd(len: usize, hugepages: bool) -> Result<OwnedFd, io::Error> {
    let mut flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    if hugepages {
        flags |= libc::MFD_HUGETLB;
    }
    // SAFETY: memfd_create takes a NUL-terminated name and flags, returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"tier0-buffer-pool".as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain fd syscalls on our own descriptor.
    unsafe {
        if libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) != 0 {
            return Err(io::Error::last_os_error());
        }
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        if libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(fd)
}

/// Maps `len` bytes: a sealed memfd, shared, or (no memfd) anonymous private memory. With
/// `at`, the mapping replaces what is mapped there (`MAP_FIXED`).
fn map_at(
    len: usize,
    hugepages: bool,
    shared: bool,
    at: Option<usize>,
) -> Result<Region, io::Error> {
    let memfd = match shared.then(|| sealed_memfd(len, hugepages)) {
        None => None,
        Some(Ok(fd)) => Some(fd),
        Some(Err(error)) if hugepages => return Err(error),
        Some(Err(error)) => {
            tracing::info!(%error, "no memfd for the buffer pool: anonymous memory, no node-local sharing");
            None
        }
    };
    let mut flags = if memfd.is_some() {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS
    };
    if at.is_some() {
        flags |= libc::MAP_FIXED;
    }
    if hugepages && memfd.is_none() {
        flags |= libc::MAP_HUGETLB;
    }
    let fd = memfd.as_ref().map_or(-1, AsRawFd::as_raw_fd);
    // SAFETY: maps `len` bytes of our memfd (or anonymous memory) at an address the kernel
    // picks, or over our own reservation at `at`; checked for MAP_FAILED below.
    let pointer = unsafe {
        libc::mmap(
            at.map_or(std::ptr::null_mut(), |at| at as *mut libc::c_void),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            0,
        )
    };
    if pointer == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // Only this mapping may write: later ones (a client's) are read-only. A kernel without
    // F_SEAL_FUTURE_WRITE (before 5.1) keeps the memory but does not share it.
    let memfd = memfd.filter(|fd| {
        let seals = libc::F_SEAL_FUTURE_WRITE | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on our own descriptor.
        let sealed = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } == 0;
        if !sealed {
            tracing::info!(
                error = %io::Error::last_os_error(),
                "cannot seal the buffer pool against writes: not shared with node-local clients"
            );
        }
        sealed
    });
    Ok(Region {
        base: NonNull::new(pointer.cast()).expect("mmap returned a non-null address"),
        len,
        hugepages,
        memfd,
    })
}

fn map(len: usize, hugepages: bool, shared: bool) -> Result<Region, io::Error> {
    map_at(len, hugepages, shared, None)
}

/// Normal pages, but 2 MiB-aligned and marked for transparent hugepages: where the kernel
/// grants them, a 1 MiB buffer is one physically contiguous segment instead of 256 pages
/// (drives and NICs split requests that exceed their segment limits).
fn map_transparent(len: usize, shared: bool) -> Result<Region, io::Error> {
    let len = len.next_multiple_of(HUGEPAGE_SIZE);
    // Reserve an aligned span, then map the pool over its aligned middle.
    let reserve = len + HUGEPAGE_SIZE;
    // SAFETY: an inaccessible anonymous reservation; checked for MAP_FAILED below.
    let padded = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            reserve,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if padded == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let base = padded as usize;
    let aligned = base.next_multiple_of(HUGEPAGE_SIZE);
    let head = aligned - base;
    let tail = reserve - head - len;
    // SAFETY: head and tail are the unaligned ends of the reservation just made; the aligned
    // middle is replaced by the pool's mapping.
    unsafe {
        if head > 0 {
            libc::munmap(base as *mut libc::c_void, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
    }
    let region = match map_at(len, false, shared, Some(aligned)) {
        Ok(region) => region,
        Err(error) => {
            // SAFETY: the aligned middle of our reservation, still ours.
            unsafe { libc::munmap(aligned as *mut libc::c_void, len) };
            return Err(error);
        }
    };
    // SAFETY: advice on our own mapping.
    unsafe { libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
    Ok(region)
}

/// Binds the mapping's pages to `node` (MPOL_BIND) before they are touched.
fn bind_to_node(region: &Region, node: u32) -> Result<(), io::Error> {
    const MPOL_BIND: libc::c_int = 2;
    let bits = 8 * std::mem::size_of::<libc::c_ulong>();
    let mut mask = vec![0 as libc::c_ulong; node as usize / bits + 1];
    mask[node as usize / bits] |= 1 << (node as usize % bits);
    // SAFETY: mbind reads `mask` (maxnode bits) and changes the policy of our own mapping.
    let result = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            region.base.as_ptr(),
            region.len,
            MPOL_BIND,
            mask.as_ptr(),
            mask.len() * bits,
            0,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A worker's registered I/O buffers: `buffer_count` buffers of `buffer_size` bytes in one
/// mapping, allocated and faulted in at start-up.
///
/// The free list belongs to the worker thread; a buffer handed to a consumer travels as a
/// [`BufferLease`], which returns it over a channel when dropped. When every buffer is out,
/// [`BufferPool::take`] says so and the worker leaves requests queued: back-pressure, not
/// allocation.
#[derive(Debug)]
pub struct BufferPool {
    region: Arc<Region>,
    buffer_size: usize,
    free: Vec<u16>,
    returns_sender: Sender<u16>,
    returns: Receiver<u16>,
    count: usize,
}

/// A buffer of the pool, owned by whoever holds it.
#[derive(Debug)]
pub struct PoolBuffer {
    pub index: u16,
    pointer: NonNull<u8>,
    len: usize,
}

impl PoolBuffer {
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.pointer.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl BufferPool {
    pub fn new(config: &BufferPoolConfig) -> Result<Self, BufferPoolError> {
        Self::build(config, true)
    }

    /// As [`new`](Self::new), in anonymous memory that cannot be shared with node-local
    /// clients: for kernels whose io_uring refuses file-backed (memfd) fixed buffers.
    pub fn new_unshared(config: &BufferPoolConfig) -> Result<Self, BufferPoolError> {
        Self::build(config, false)
    }

    fn build(config: &BufferPoolConfig, shared: bool) -> Result<Self, BufferPoolError> {
        if config.buffer_size == 0
            || !config
                .buffer_size
                .is_multiple_of(crate::device::IO_ALIGNMENT)
        {
            return Err(BufferPoolError::BufferSize(config.buffer_size));
        }
        if config.buffer_count == 0 || config.buffer_count > 1 << 14 {
            return Err(BufferPoolError::BufferCount(config.buffer_count));
        }
        let len = config.buffer_size * config.buffer_count;
        let huge_len = len.next_multiple_of(HUGEPAGE_SIZE);
        let region = match config.hugepages.then(|| map(huge_len, true, shared)) {
            Some(Ok(region)) => region,
            Some(Err(error)) => {
                tracing::info!(
                    bytes = len,
                    %error,
                    "no hugetlb pages for the buffer pool (set vm.nr_hugepages): \
                     using normal pages, transparent hugepages where the kernel allows"
                );
                map_transparent(len, shared)
                    .map_err(|source| BufferPoolError::Map { len, source })?
            }
            None => {
                map(len, false, shared).map_err(|source| BufferPoolError::Map { len, source })?
            }
        };
        if let Some(node) = config.numa_node
            && let Err(error) = bind_to_node(&region, node)
        {
            tracing::warn!(node, %error, "could not bind the buffer pool to its NUMA node");
        }
        // Fault every page in now, on the bound node, so the first I/Os do not pay for it.
        for offset in (0..region.len).step_by(4096) {
            // SAFETY: offset < region.len, inside our writable mapping.
            unsafe { region.base.as_ptr().add(offset).write_volatile(0) };
        }
        let (returns_sender, returns) = crossbeam_channel::bounded(config.buffer_count);
        Ok(BufferPool {
            region: Arc::new(region),
            buffer_size: config.buffer_size,
            free: (0..config.buffer_count as u16).rev().collect(),
            returns_sender,
            returns,
            count: config.buffer_count,
        })
    }

    pub fn uses_hugepages(&self) -> bool {
        self.region.hugepages
    }

    pub fn buffer_size(&self) -> usize {
        self.buffer_size
    }

    pub fn capacity(&self) -> usize {
        self.count
    }

    /// Buffers free right now (after taking back returned leases).
    pub fn available(&mut self) -> usize {
        self.reclaim();
        self.free.len()
    }

    /// The whole pool as one span (what an RDMA device registers in one memory region): its
    /// start and length, covering every buffer.
    pub fn arena(&self) -> (*mut u8, usize) {
        (self.region.base.as_ptr(), self.count * self.buffer_size)
    }

    /// The pool's memfd (sealed against resizing), for a node-local client to map
    /// read-only; `None` when the pool is anonymous memory.
    pub fn memfd(&self) -> Option<BorrowedFd<'_>> {
        use std::os::fd::AsFd as _;
        self.region.memfd.as_ref().map(|fd| fd.as_fd())
    }

    /// Every buffer, in index order: what `BlockDevice::register_buffers` takes, so the fixed
    /// buffer index of a buffer is its pool index.
    pub fn regions(&self) -> Vec<(*mut u8, usize)> {
        (0..self.count)
            .map(|index| (self.pointer(index as u16).as_ptr(), self.buffer_size))
            .collect()
    }

    fn pointer(&self, index: u16) -> NonNull<u8> {
        let offset = usize::from(index) * self.buffer_size;
        // SAFETY: index < count, so the offset is inside the mapping.
        unsafe { NonNull::new_unchecked(self.region.base.as_ptr().add(offset)) }
    }

    fn reclaim(&mut self) {
        while let Ok(index) = self.returns.try_recv() {
            self.free.push(index);
        }
    }

    /// A free buffer, or `None` when all are in use.
    pub fn take(&mut self) -> Option<PoolBuffer> {
        if self.free.is_empty() {
            self.reclaim();
        }
        let index = self.free.pop()?;
        Some(PoolBuffer {
            index,
            pointer: self.pointer(index),
            len: self.buffer_size,
        })
    }

    /// Gives a buffer back directly (the worker's own error paths).
    pub fn put_back(&mut self, buffer: PoolBuffer) {
        debug_assert!(std::ptr::eq(
            buffer.pointer.as_ptr(),
            self.pointer(buffer.index).as_ptr()
        ));
        self.free.push(buffer.index);
    }

    /// Hands `len` bytes at `start` of a buffer to a consumer, zero-copy.
    pub fn lease(&self, buffer: PoolBuffer, start: usize, len: usize) -> BufferLease {
        assert!(start + len <= buffer.len, "lease inside the buffer");
        BufferLease {
            _region: self.region.clone(),
            index: buffer.index,
            // SAFETY: start + len <= buffer.len, checked above.
            pointer: unsafe { buffer.pointer.add(start) },
            len,
            returns: self.returns_sender.clone(),
        }
    }
}

/// Read-only bytes in a pool buffer, on their way to a consumer (a socket, an RDMA write, a
/// benchmark's check). Dropping it returns the buffer to its worker.
#[derive(Debug)]
pub struct BufferLease {
    /// Keeps the memory mapped while the lease lives, even after its pool is gone.
    _region: Arc<Region>,
    index: u16,
    pointer: NonNull<u8>,
    len: usize,
    returns: Sender<u16>,
}

// SAFETY: the lease is the only owner of its buffer until dropped; the region it points into
// is kept alive by the Arc.
unsafe impl Send for BufferLease {}

impl BufferLease {
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the lease owns these `len` initialized bytes until it is dropped.
        unsafe { std::slice::from_raw_parts(self.pointer.as_ptr(), self.len) }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pool index of the buffer: its fixed-buffer index for io_uring, and (later) the
    /// offset key of its RDMA memory region.
    pub fn buffer_index(&self) -> u16 {
        self.index
    }

    /// Where the bytes start in the pool's mapping: what a node-local client that mapped the
    /// pool's memfd adds to its own base.
    pub fn pool_offset(&self) -> u64 {
        (self.pointer.as_ptr() as usize - self._region.base.as_ptr() as usize) as u64
    }
}

impl Drop for BufferLease {
    fn drop(&mut self) {
        // The channel holds every buffer of the pool, so this never blocks; if the worker and
        // its pool are gone the region is freed with the last lease instead.
        let _ = self.returns.try_send(self.index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> BufferPoolConfig {
        BufferPoolConfig {
            buffer_size: 8192,
            buffer_count: 3,
            numa_node: Some(0),
            hugepages: true,
        }
    }

    #[test]
    fn the_pool_is_bounded_and_leases_come_back() {
        let mut pool = BufferPool::new(&small()).unwrap();
        let buffers: Vec<_> = (0..3).map(|_| pool.take().unwrap()).collect();
        assert!(
            pool.take().is_none(),
            "a fourth buffer would be an allocation"
        );
        let mut buffers = buffers.into_iter();
        let first = buffers.next().unwrap();
        // SAFETY: the buffer is ours and 8192 bytes long.
        unsafe { first.as_mut_ptr().write_bytes(0x5a, 8192) };
        let lease = pool.lease(first, 100, 50);
        assert_eq!(lease.as_slice(), &[0x5a; 50]);
        assert!(pool.take().is_none());
        drop(lease);
        assert!(pool.take().is_some());
        pool.put_back(buffers.next().unwrap());
        assert_eq!(pool.available(), 1);
    }

    #[test]
    fn buffers_are_aligned_and_distinct() {
        let pool = BufferPool::new(&small()).unwrap();
        let regions = pool.regions();
        for (i, (pointer, len)) in regions.iter().enumerate() {
            assert_eq!(*pointer as usize % 4096, 0);
            assert_eq!(*len, 8192);
            if i > 0 {
                assert_eq!(*pointer as usize - regions[i - 1].0 as usize, 8192);
            }
        }
    }

    #[test]
    fn bad_sizes_are_refused() {
        let config = BufferPoolConfig {
            buffer_size: 1000,
            ..small()
        };
        assert!(matches!(
            BufferPool::new(&config),
            Err(BufferPoolError::BufferSize(1000))
        ));
        let config = BufferPoolConfig {
            buffer_count: 0,
            ..small()
        };
        assert!(matches!(
            BufferPool::new(&config),
            Err(BufferPoolError::BufferCount(0))
        ));
    }
}
