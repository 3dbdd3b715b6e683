//! A drive that is a file in memory (tmpfs, ramfs): its pages are the drive.
//!
//! io_uring buys such a drive nothing: there is no DMA engine to keep busy, and a read is a
//! CPU copy out of the page cache wherever it runs. Through the ring it runs in an io-wq
//! thread (tmpfs cannot read without blocking before Linux 6.6), so every read costs two
//! thread hand-offs and, on a worker that sleeps, two wake-ups. Here a read is a copy from a
//! read-only shared mapping of the file into the request's buffer, done in `poll` by the
//! worker itself; writes are `pwrite`s into the same pages (so the mapping sees them at
//! once) and a sync is `fdatasync`. Completions come only through `poll`, as from a ring.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use super::{BlockDevice, DeviceError, IO_ALIGNMENT, IoCompletion, IoOp, IoRequest, RequestQueue};
use crate::buffer::ReadOnlyMap;

/// `statfs` magic numbers of the file systems whose files are memory.
const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// Whether `path` is a regular file on a file system that keeps its files in memory. A
/// device node never is: `statfs` would name the file system its node sits in (devtmpfs,
/// which reports tmpfs).
pub fn is_memory_file(path: &Path) -> io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    if !std::fs::metadata(path)?.is_file() {
        return Ok(false);
    }
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

/// A file on tmpfs or ramfs, opened and mapped read-only once per daemon and shared: every
/// worker's [`MemoryFileDevice`] reads by copies from the mapping and writes through the
/// file, and the TCP path sends whole blocks straight from it (`net::mapped`).
#[derive(Debug)]
pub struct MemoryDrive {
    name: String,
    file: File,
    map: ReadOnlyMap,
    len: u64,
}

impl MemoryDrive {
    /// Opens and maps `path` when it is a file in memory ([`is_memory_file`]); `Ok(None)` for
    /// anything else (a block device, a file on a disk's file system), which io_uring drives.
    /// Its length is the file's, rounded down to whole blocks.
    pub fn open(path: &Path) -> Result<Option<Arc<MemoryDrive>>, DeviceError> {
        let name = path.display().to_string();
        let open_error = |source| DeviceError::Open {
            device: name.clone(),
            source,
        };
        if !is_memory_file(path).map_err(open_error)? {
            return Ok(None);
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(open_error)?;
        let bytes = file.metadata().map_err(open_error)?.len();
        let len = bytes / IO_ALIGNMENT as u64 * IO_ALIGNMENT as u64;
        if len == 0 {
            return Err(open_error(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a drive of {bytes} bytes holds no {IO_ALIGNMENT}-byte block"),
            )));
        }
        let map_len = usize::try_from(len).map_err(|_| {
            open_error(io::Error::new(
                io::ErrorKind::InvalidInput,
                "larger than the address space",
            ))
        })?;
        let map = ReadOnlyMap::new(file.as_fd(), map_len).map_err(|source| DeviceError::Setup {
            device: name.clone(),
            operation: "mmap",
            source,
        })?;
        Ok(Some(Arc::new(MemoryDrive {
            name,
            file,
            map,
            len,
        })))
    }

    /// Usable bytes: whole blocks.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `len` bytes at `offset` of the drive, if the drive holds them. Crate-only: workers
    /// `pwrite` into these pages, and only a reader that holds the chunk's info (as
    /// `net::mapped` does) knows the bytes it was pointed at stay put.
    pub(crate) fn bytes(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let start = self.map.range(offset, len)?;
        // SAFETY: inside the mapping, which lives as long as `self`. The drive is one
        // daemon's own store file; a chunk's slot is rewritten only once no reader holds the
        // chunk (the store's rule), so bytes a caller was pointed at stay the chunk's.
        Some(unsafe { std::slice::from_raw_parts(start.as_ptr(), len) })
    }

    /// Carries out one request on the drive's mapping and file.
    ///
    /// # Safety
    /// The request's buffer is valid for `len` bytes (the `submit` contract).
    unsafe fn execute(&self, request: &IoRequest) -> Result<u32, i32> {
        let len = request.len as usize;
        if len == 0 && request.op != IoOp::Sync {
            // Nothing to copy, and the buffer may be null (which the copies must never get).
            return Ok(0);
        }
        match request.op {
            IoOp::Read => {
                let source = self.map.range(request.offset, len).ok_or(libc::EINVAL)?;
                // SAFETY: `source` is `len` bytes inside the mapping; the buffer is valid
                // for `len` bytes and the request's alone (this function's contract).
                unsafe { std::ptr::copy_nonoverlapping(source.as_ptr(), request.buffer, len) };
            }
            IoOp::Write => {
                // SAFETY: per this function's contract.
                let data = unsafe { std::slice::from_raw_parts(request.buffer, len) };
                self.file
                    .write_all_at(data, request.offset)
                    .map_err(|error| error.raw_os_error().unwrap_or(libc::EIO))?;
            }
            IoOp::Sync => self
                .file
                .sync_data()
                .map_err(|error| error.raw_os_error().unwrap_or(libc::EIO))?,
        }
        Ok(request.len)
    }
}

/// One worker's handle on a [`MemoryDrive`]: its own bounded queue, the drive's mapping and
/// file. See the module docs.
#[derive(Debug)]
pub struct MemoryFileDevice {
    drive: Arc<MemoryDrive>,
    queue: RequestQueue,
}

impl MemoryFileDevice {
    /// A handle on `drive` with `queue_depth` requests in flight at most.
    pub fn new(drive: Arc<MemoryDrive>, queue_depth: usize) -> Self {
        MemoryFileDevice {
            drive,
            queue: RequestQueue::new(queue_depth),
        }
    }

    /// Opens `path` as a drive of its own when it is a file in memory; `Ok(None)` otherwise.
    pub fn open(path: &Path, queue_depth: usize) -> Result<Option<Self>, DeviceError> {
        Ok(MemoryDrive::open(path)?.map(|drive| MemoryFileDevice::new(drive, queue_depth)))
    }
}

impl BlockDevice for MemoryFileDevice {
    fn name(&self) -> &str {
        &self.drive.name
    }

    fn kind(&self) -> &'static str {
        "memory file (copies from a mapping)"
    }

    fn len(&self) -> u64 {
        self.drive.len
    }

    fn queue_depth(&self) -> usize {
        self.queue.depth()
    }

    fn in_flight(&self) -> usize {
        self.queue.len()
    }

    unsafe fn submit(&mut self, request: IoRequest) -> Result<(), DeviceError> {
        self.queue.push(&self.drive.name, self.drive.len, request)
    }

    fn wait(
        &mut self,
        wake_fds: &[std::os::fd::RawFd],
        timeout: Option<std::time::Duration>,
    ) -> Result<super::Woken, DeviceError> {
        self.queue.wait(&self.drive.name, wake_fds, timeout)
    }

    fn poll(
        &mut self,
        completions: &mut Vec<IoCompletion>,
        _min_completions: usize,
    ) -> Result<usize, DeviceError> {
        let drive = &self.drive;
        // SAFETY: `submit`'s contract keeps the buffer valid until this completion.
        Ok(self
            .queue
            .drain(completions, |request| unsafe { drive.execute(request) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::AlignedBuf;

    /// A zeroed file of `len` bytes in /dev/shm, when that is tmpfs here.
    fn shm_file(tag: &str, len: usize) -> Option<std::path::PathBuf> {
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            return None;
        }
        let path = shm.join(format!("tier0-memfile-{tag}-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; len]).unwrap();
        if is_memory_file(&path).unwrap() {
            Some(path)
        } else {
            std::fs::remove_file(&path).unwrap();
            None
        }
    }

    #[test]
    fn files_in_memory_are_memory_files_and_others_are_not() {
        // The crate's own folder is on a disk's file system in every build here.
        let on_disk = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        if !is_memory_file(&on_disk).unwrap() {
            assert!(MemoryFileDevice::open(&on_disk, 8).unwrap().is_none());
        }
        // Device nodes live on devtmpfs, which says it is tmpfs: never one.
        let null = Path::new("/dev/null");
        if null.exists() {
            assert!(!is_memory_file(null).unwrap());
            assert!(MemoryFileDevice::open(null, 8).unwrap().is_none());
        }
        assert!(is_memory_file(Path::new("/nonexistent/tier0")).is_err());
        assert!(matches!(
            MemoryFileDevice::open(Path::new("/nonexistent/tier0"), 8),
            Err(DeviceError::Open { .. })
        ));
        // Smaller than one block: a clear refusal, not a failed mapping.
        if let Some(path) = shm_file("tiny", 100) {
            let opened = MemoryFileDevice::open(&path, 8);
            std::fs::remove_file(&path).unwrap();
            match opened {
                Err(DeviceError::Open { source, .. }) => {
                    assert!(source.to_string().contains("100 bytes"), "{source}")
                }
                other => panic!("a 100-byte drive opened: {other:?}"),
            }
        }
    }

    #[test]
    fn a_drive_hands_out_only_the_bytes_it_holds() {
        let Some(path) = shm_file("bytes", IO_ALIGNMENT + 10) else {
            return; // No tmpfs at /dev/shm on this machine.
        };
        // Ten bytes past the last whole block, which the drive does not hold.
        let data: Vec<u8> = (0..IO_ALIGNMENT + 10).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let drive = MemoryDrive::open(&path).unwrap().expect("tmpfs");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(drive.len(), IO_ALIGNMENT as u64);
        assert_eq!(drive.bytes(2, 3), Some(&data[2..5]));
        let tail = IO_ALIGNMENT as u64 - 2;
        assert_eq!(
            drive.bytes(tail, 2),
            Some(&data[IO_ALIGNMENT - 2..IO_ALIGNMENT])
        );
        assert_eq!(drive.bytes(tail, 3), None, "past the last whole block");
        assert_eq!(drive.bytes(u64::MAX, 1), None);
    }

    #[test]
    fn writes_are_read_back_through_the_mapping_and_bad_requests_are_refused() {
        let Some(path) = shm_file("rw", 4 * IO_ALIGNMENT + 100) else {
            return; // No tmpfs at /dev/shm on this machine.
        };
        let mut device = MemoryFileDevice::open(&path, 2).unwrap().expect("tmpfs");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            device.len(),
            4 * IO_ALIGNMENT as u64,
            "rounded down to the alignment"
        );

        let data: Vec<u8> = (0..2 * IO_ALIGNMENT).map(|i| (i * 7 % 251) as u8).collect();
        device.write_at(IO_ALIGNMENT as u64, &data).unwrap();
        device.sync().unwrap();
        let mut back = vec![0u8; 2 * IO_ALIGNMENT];
        device.read_at(IO_ALIGNMENT as u64, &mut back).unwrap();
        assert_eq!(back, data);
        let mut first = vec![1u8; IO_ALIGNMENT];
        device.read_at(0, &mut first).unwrap();
        assert!(first.iter().all(|&b| b == 0), "untouched bytes stay zero");

        // Completions come only through poll, and the queue depth holds.
        let mut buffers = [
            AlignedBuf::zeroed(IO_ALIGNMENT),
            AlignedBuf::zeroed(IO_ALIGNMENT),
        ];
        for (tag, buffer) in buffers.iter_mut().enumerate() {
            let request = IoRequest {
                op: IoOp::Read,
                offset: IO_ALIGNMENT as u64 * (tag as u64 + 1),
                buffer: buffer.as_mut_ptr(),
                len: IO_ALIGNMENT as u32,
                fixed_buffer: None,
                user_data: tag as u64,
            };
            // SAFETY: the buffers outlive the poll below.
            unsafe { device.submit(request).unwrap() };
        }
        assert_eq!(device.in_flight(), 2);
        let mut spare = AlignedBuf::zeroed(IO_ALIGNMENT);
        let extra = IoRequest {
            op: IoOp::Read,
            offset: 0,
            buffer: spare.as_mut_ptr(),
            len: IO_ALIGNMENT as u32,
            fixed_buffer: None,
            user_data: 9,
        };
        // SAFETY: refused, so the buffer is never used.
        let refused = unsafe { device.submit(extra) };
        assert!(matches!(refused, Err(DeviceError::QueueFull { .. })));
        assert!(
            buffers[1].iter().all(|&b| b == 0),
            "nothing is copied before poll"
        );
        let mut completions = Vec::new();
        assert_eq!(device.poll(&mut completions, 0).unwrap(), 2);
        assert_eq!(
            completions,
            vec![
                IoCompletion {
                    user_data: 0,
                    result: Ok(IO_ALIGNMENT as u32)
                },
                IoCompletion {
                    user_data: 1,
                    result: Ok(IO_ALIGNMENT as u32)
                },
            ]
        );
        assert_eq!(&buffers[0][..], &data[..IO_ALIGNMENT]);
        assert_eq!(&buffers[1][..], &data[IO_ALIGNMENT..]);

        // What O_DIRECT refuses, this refuses too; past the end is out of range.
        let mut misaligned = extra;
        misaligned.offset = 100;
        // SAFETY: refused before any copy.
        let refused = unsafe { device.submit(misaligned) };
        assert!(matches!(refused, Err(DeviceError::Misaligned { .. })));
        let mut past_end = extra;
        past_end.offset = 4 * IO_ALIGNMENT as u64;
        // SAFETY: refused before any copy.
        let refused = unsafe { device.submit(past_end) };
        assert!(matches!(refused, Err(DeviceError::OutOfRange { .. })));
    }
}
