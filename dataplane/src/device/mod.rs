//! The block-device seam: where the data plane meets a drive.
//!
//! The interface is queue-shaped (submit many, poll completions) because that is how NVMe,
//! io_uring and SPDK all work: a worker keeps dozens of I/Os in flight per drive and reaps
//! completions in batches. Blocking `read_at` / `write_at` / `sync` sit on top for cold paths
//! (formatting, recovery, tools, tests).
//!
//! Implementations: [`UringDevice`] (io_uring, O_DIRECT, registered files and buffers, IOPOLL
//! when the device supports it), [`MemoryFileDevice`] (a drive that is a file on tmpfs or
//! ramfs, read by copies from a mapping), [`MemoryDevice`], and [`FaultyDevice`] (fails, tears, flips
//! bits and loses unsynced writes on command). An SPDK backend fits the same trait: its
//! `spdk_nvme_ns_cmd_read` / `spdk_nvme_qpair_process_completions` are `submit` and `poll`.

mod faulty;
mod memory;
mod memory_file;
mod uring;

use std::io;

pub use faulty::{FaultControl, FaultyDevice};
pub use memory::MemoryDevice;
pub use memory_file::{MemoryDrive, MemoryFileDevice, is_memory_file};
pub use uring::{UringDevice, UringOptions, preallocate_file};

use crate::buffer::AlignedBuf;

/// Offsets, lengths and buffer addresses of every I/O are multiples of this: the largest
/// logical block size of NVMe drives, so O_DIRECT works on any of them.
pub const IO_ALIGNMENT: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOp {
    Read,
    Write,
    /// Makes every completed write durable (fdatasync, NVMe FLUSH).
    Sync,
}

/// One I/O to submit. The buffer is a raw pointer because the kernel (or the drive's DMA
/// engine) holds it until completion: see [`BlockDevice::submit`].
#[derive(Clone, Copy, Debug)]
pub struct IoRequest {
    pub op: IoOp,
    pub offset: u64,
    pub buffer: *mut u8,
    pub len: u32,
    /// Index of the buffer among the device's registered buffers, when it is one: the kernel
    /// then skips pinning and mapping the pages on every I/O.
    pub fixed_buffer: Option<u16>,
    /// Returned unchanged in the completion.
    pub user_data: u64,
}

// SAFETY: an IoRequest only carries the buffer's address; who may touch the memory, and
// until when, is `BlockDevice::submit`'s contract, which holds on any thread.
unsafe impl Send for IoRequest {}

impl IoRequest {
    pub fn sync(user_data: u64) -> Self {
        IoRequest {
            op: IoOp::Sync,
            offset: 0,
            buffer: std::ptr::null_mut(),
            len: 0,
            fixed_buffer: None,
            user_data,
        }
    }
}

/// The outcome of one request: bytes transferred, or the errno.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoCompletion {
    pub user_data: u64,
    pub result: Result<u32, i32>,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{device}: open failed")]
    Open {
        device: String,
        #[source]
        source: io::Error,
    },
    #[error("{device}: {operation} failed")]
    Setup {
        device: String,
        operation: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{device}: queue full ({queue_depth} I/Os in flight)")]
    QueueFull { device: String, queue_depth: usize },
    #[error("{device}: {op:?} at offset {offset} length {len} is not {IO_ALIGNMENT}-byte aligned")]
    Misaligned {
        device: String,
        op: IoOp,
        offset: u64,
        len: u64,
    },
    #[error(
        "{device}: {op:?} at offset {offset} length {len} is past the end ({device_len} bytes)"
    )]
    OutOfRange {
        device: String,
        op: IoOp,
        offset: u64,
        len: u64,
        device_len: u64,
    },
    #[error("{device}: {op:?} at offset {offset} failed")]
    Io {
        device: String,
        op: IoOp,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("{device}: {op:?} at offset {offset} transferred {done} of {len} bytes")]
    Short {
        device: String,
        op: IoOp,
        offset: u64,
        done: u32,
        len: u32,
    },
    #[error("{device}: blocking I/O needs an idle device ({in_flight} I/Os in flight)")]
    Busy { device: String, in_flight: usize },
}

impl DeviceError {
    /// The errno behind this error, for callers that map errors onto the wire or the C ABI.
    pub fn errno(&self) -> Option<i32> {
        match self {
            DeviceError::Open { source, .. }
            | DeviceError::Setup { source, .. }
            | DeviceError::Io { source, .. } => source.raw_os_error(),
            DeviceError::QueueFull { .. } | DeviceError::Busy { .. } => Some(libc::EAGAIN),
            DeviceError::Misaligned { .. } | DeviceError::OutOfRange { .. } => Some(libc::EINVAL),
            DeviceError::Short { .. } => Some(libc::EIO),
        }
    }
}

/// A drive, or something standing in for one.
pub trait BlockDevice: Send {
    /// The path or name used in error messages.
    fn name(&self) -> &str;

    /// What drives the device, as the daemon's log names it ("io_uring, O_DIRECT", "memory
    /// file (copies from a mapping)", …).
    fn kind(&self) -> &'static str;

    /// Usable size in bytes (a multiple of [`IO_ALIGNMENT`]).
    fn len(&self) -> u64;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most requests that may be in flight at once.
    fn queue_depth(&self) -> usize;

    /// Requests submitted and not yet returned by [`BlockDevice::poll`].
    fn in_flight(&self) -> usize;

    /// Sleeps until a completion is ready or one of `wake_fds` (an eventfd, an epoll fd)
    /// becomes readable, for at most `timeout` (`None`: no limit; zero: only collect finished
    /// work, never sleep). Returns which wake fds it saw readable. Completions are then
    /// returned by `poll`. Every device sleeps here when it has nothing to complete, so a
    /// worker whose requests are all waiting on something else never spins on it.
    fn wait(
        &mut self,
        wake_fds: &[std::os::fd::RawFd],
        timeout: Option<std::time::Duration>,
    ) -> Result<Woken, DeviceError>;

    /// Registers memory regions as fixed buffers (io_uring `register_buffers`): requests then
    /// name them by index in [`IoRequest::fixed_buffer`]. Replaces any earlier registration.
    ///
    /// # Safety
    /// The regions must stay allocated for as long as the device may use them: until the
    /// device is dropped or the regions are registered again.
    unsafe fn register_buffers(
        &mut self,
        _regions: &[(*mut u8, usize)],
    ) -> Result<(), DeviceError> {
        Ok(())
    }

    /// Queues a request; it reaches the device at the next [`BlockDevice::poll`].
    ///
    /// # Safety
    /// `request.buffer .. + request.len` must stay valid until the request's completion has
    /// been returned by `poll`, and must not be read or written by anyone else meanwhile for
    /// a read (nor written for a write): the kernel or the drive's DMA engine uses it.
    unsafe fn submit(&mut self, request: IoRequest) -> Result<(), DeviceError>;

    /// Sends queued requests and appends completions to `completions`, waiting until at least
    /// `min_completions` have arrived (0: only what is ready). Returns how many it appended.
    fn poll(
        &mut self,
        completions: &mut Vec<IoCompletion>,
        min_completions: usize,
    ) -> Result<usize, DeviceError>;

    /// Reads `buf.len()` bytes at `offset`, blocking. The device must be idle.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        blocking(
            self,
            IoOp::Read,
            offset,
            buf.as_mut_ptr(),
            buf.len(),
            |bounce| buf.copy_from_slice(&bounce[..buf.len()]),
        )
    }

    /// Writes `data` at `offset`, blocking; durable only after [`BlockDevice::sync`].
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        blocking_write(self, offset, data)
    }

    /// Makes every completed write durable, blocking.
    fn sync(&mut self) -> Result<(), DeviceError> {
        ensure_idle(self)?;
        // SAFETY: a sync carries no buffer.
        unsafe { self.submit(IoRequest::sync(u64::MAX))? };
        let completion = wait_one(self)?;
        completion_result(self, IoOp::Sync, 0, 0, completion).map(|_| ())
    }
}

fn ensure_idle<D: BlockDevice + ?Sized>(device: &D) -> Result<(), DeviceError> {
    match device.in_flight() {
        0 => Ok(()),
        in_flight => Err(DeviceError::Busy {
            device: device.name().to_string(),
            in_flight,
        }),
    }
}

fn wait_one<D: BlockDevice + ?Sized>(device: &mut D) -> Result<IoCompletion, DeviceError> {
    let mut completions = Vec::with_capacity(1);
    while completions.is_empty() {
        device.poll(&mut completions, 1)?;
    }
    Ok(completions[0])
}

fn completion_result<D: BlockDevice + ?Sized>(
    device: &D,
    op: IoOp,
    offset: u64,
    len: u32,
    completion: IoCompletion,
) -> Result<u32, DeviceError> {
    match completion.result {
        Err(errno) => Err(DeviceError::Io {
            device: device.name().to_string(),
            op,
            offset,
            source: io::Error::from_raw_os_error(errno),
        }),
        Ok(done) if op != IoOp::Sync && done != len => Err(DeviceError::Short {
            device: device.name().to_string(),
            op,
            offset,
            done,
            len,
        }),
        Ok(done) => Ok(done),
    }
}

/// The queue of a device that carries its requests out itself, inside `poll` (memory, a
/// file in memory, fault injection): checked and bounded at submit, taken in order.
#[derive(Debug)]
pub(crate) struct RequestQueue {
    depth: usize,
    queued: std::collections::VecDeque<IoRequest>,
}

impl RequestQueue {
    pub(crate) fn new(depth: usize) -> Self {
        RequestQueue {
            depth: depth.max(1),
            queued: std::collections::VecDeque::new(),
        }
    }

    pub(crate) fn depth(&self) -> usize {
        self.depth
    }

    pub(crate) fn len(&self) -> usize {
        self.queued.len()
    }

    /// Queues a request to the device `name` of `device_len` bytes, if it is aligned, inside
    /// the device and there is room.
    pub(crate) fn push(
        &mut self,
        name: &str,
        device_len: u64,
        request: IoRequest,
    ) -> Result<(), DeviceError> {
        check_request(name, device_len, &request)?;
        if self.queued.len() >= self.depth {
            return Err(DeviceError::QueueFull {
                device: name.to_string(),
                queue_depth: self.depth,
            });
        }
        self.queued.push_back(request);
        Ok(())
    }

    /// `BlockDevice::wait` for a device that completes inside `poll`: at once when a request
    /// is queued (the next `poll` completes it); otherwise a sleep on `wake_fds`, for at most
    /// `timeout`. With no fd and no limit nothing could ever end the sleep: it returns at once.
    pub(crate) fn wait(
        &self,
        name: &str,
        wake_fds: &[std::os::fd::RawFd],
        timeout: Option<std::time::Duration>,
    ) -> Result<Woken, DeviceError> {
        Self::wait_unless(!self.queued.is_empty(), name, wake_fds, timeout)
    }

    /// The sleep of [`RequestQueue::wait`], skipped when `ready`.
    pub(crate) fn wait_unless(
        ready: bool,
        name: &str,
        wake_fds: &[std::os::fd::RawFd],
        timeout: Option<std::time::Duration>,
    ) -> Result<Woken, DeviceError> {
        if ready
            || timeout.is_some_and(|timeout| timeout.is_zero())
            || (wake_fds.is_empty() && timeout.is_none())
        {
            return Ok(Woken::NONE);
        }
        let mut polled = Vec::new();
        let woken =
            poll_readable(wake_fds, &mut polled, timeout).map_err(|source| DeviceError::Setup {
                device: name.to_string(),
                operation: "poll on the wake fds",
                source,
            })?;
        // A wake fd that is closed or failed would be reported on every call, so the caller
        // would spin: that is an error, not a wake.
        if let Some(bad) = polled.iter().find(|fd| fd.revents & !libc::POLLIN != 0) {
            return Err(DeviceError::Setup {
                device: name.to_string(),
                operation: "poll on the wake fds",
                source: io::Error::other(format!(
                    "wake fd {} reports {:#x} (closed, hung up or failed)",
                    bad.fd, bad.revents
                )),
            });
        }
        Ok(woken)
    }

    /// Carries out every queued request with `execute`, in order, appending its completion;
    /// returns how many.
    pub(crate) fn drain(
        &mut self,
        completions: &mut Vec<IoCompletion>,
        mut execute: impl FnMut(&IoRequest) -> Result<u32, i32>,
    ) -> usize {
        let count = self.queued.len();
        while let Some(request) = self.queued.pop_front() {
            completions.push(IoCompletion {
                user_data: request.user_data,
                result: execute(&request),
            });
        }
        count
    }
}

/// Sleeps in poll(2) until one of `fds` is readable, for at most `timeout` (`None`: no limit;
/// rounded up to whole milliseconds, so a short sleep never becomes a spin); returns the fds
/// with their `revents`, all zero when the time ran out or a signal came.
pub(crate) fn poll_readable(
    fds: &[std::os::fd::RawFd],
    polled: &mut Vec<libc::pollfd>,
    timeout: Option<std::time::Duration>,
) -> io::Result<Woken> {
    polled.clear();
    polled.extend(fds.iter().map(|&fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }));
    let millis = timeout.map_or(-1, |timeout| {
        i32::try_from(timeout.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX)
    });
    // SAFETY: poll reads and writes `polled.len()` pollfd structs this function owns.
    let ready = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, millis) };
    if ready < 0 {
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
    let mut woken = Woken::NONE;
    for (index, fd) in polled.iter().enumerate() {
        if fd.revents & libc::POLLIN != 0 {
            woken.insert(index);
        }
    }
    Ok(woken)
}

/// Which wake fds a sleep saw readable (from [`BlockDevice::wait`] or a poll), by their
/// index in the list slept on. Past the first 64 every fd counts as readable: a caller that
/// is told so looks, and finds nothing, which costs a look and loses no event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Woken(u64);

impl Woken {
    pub const NONE: Woken = Woken(0);
    /// Every fd: for a sleep that cannot tell which one woke it.
    pub const ALL: Woken = Woken(u64::MAX);

    /// Whether the fd at `index` turned readable.
    pub fn contains(self, index: usize) -> bool {
        index >= 64 || self.0 & (1 << index) != 0
    }

    /// Whether any fd did.
    pub fn any(self) -> bool {
        self.0 != 0
    }

    pub fn insert(&mut self, index: usize) {
        if index < 64 {
            self.0 |= 1 << index;
        }
    }

    /// The fds from `first` on, renumbered from 0 (one source's share of a worker's list).
    pub fn from(self, first: usize) -> Woken {
        match first {
            0 => self,
            // The fds past the 64th, which count as readable, move down with the rest.
            1..64 => Woken(self.0 >> first | u64::MAX << (64 - first)),
            _ => Woken::ALL,
        }
    }
}

/// Checks that an I/O is aligned and inside the device: every implementation calls this in
/// `submit`, so the in-memory devices refuse what O_DIRECT would refuse.
pub(crate) fn check_request(
    name: &str,
    device_len: u64,
    request: &IoRequest,
) -> Result<(), DeviceError> {
    if request.op == IoOp::Sync {
        return Ok(());
    }
    let len = u64::from(request.len);
    let aligned = request.offset.is_multiple_of(IO_ALIGNMENT as u64)
        && len % IO_ALIGNMENT as u64 == 0
        && (request.buffer as usize).is_multiple_of(IO_ALIGNMENT);
    if !aligned {
        return Err(DeviceError::Misaligned {
            device: name.to_string(),
            op: request.op,
            offset: request.offset,
            len,
        });
    }
    if request
        .offset
        .checked_add(len)
        .is_none_or(|end| end > device_len)
    {
        return Err(DeviceError::OutOfRange {
            device: name.to_string(),
            op: request.op,
            offset: request.offset,
            len,
            device_len,
        });
    }
    Ok(())
}

fn blocking<D: BlockDevice + ?Sized>(
    device: &mut D,
    op: IoOp,
    offset: u64,
    pointer: *mut u8,
    len: usize,
    copy_back: impl FnOnce(&[u8]),
) -> Result<(), DeviceError> {
    ensure_idle(device)?;
    let len32 = u32::try_from(len).map_err(|_| DeviceError::OutOfRange {
        device: device.name().to_string(),
        op,
        offset,
        len: len as u64,
        device_len: device.len(),
    })?;
    // Callers' slices are rarely 4 KiB-aligned in memory; bounce those through an aligned
    // buffer rather than make every caller allocate one.
    let mut bounce = None;
    let target = if (pointer as usize).is_multiple_of(IO_ALIGNMENT) {
        pointer
    } else {
        bounce.insert(AlignedBuf::zeroed(len)).as_mut_ptr()
    };
    let request = IoRequest {
        op,
        offset,
        buffer: target,
        len: len32,
        fixed_buffer: None,
        user_data: u64::MAX,
    };
    // SAFETY: the buffer (caller's or bounce) outlives this call and we wait for the
    // completion before returning.
    unsafe { device.submit(request)? };
    let completion = wait_one(device)?;
    completion_result(device, op, offset, len32, completion)?;
    if let Some(bounce) = bounce {
        copy_back(&bounce);
    }
    Ok(())
}

fn blocking_write<D: BlockDevice + ?Sized>(
    device: &mut D,
    offset: u64,
    data: &[u8],
) -> Result<(), DeviceError> {
    if (data.as_ptr() as usize).is_multiple_of(IO_ALIGNMENT) {
        blocking(
            device,
            IoOp::Write,
            offset,
            data.as_ptr().cast_mut(),
            data.len(),
            |_| {},
        )
    } else {
        let mut bounce = AlignedBuf::zeroed(data.len());
        bounce.copy_from_slice(data);
        let pointer = bounce.as_mut_ptr();
        blocking(device, IoOp::Write, offset, pointer, data.len(), |_| {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::time::{Duration, Instant};

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe fills two fds, which are then owned here.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both fds were just opened and belong to nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    #[test]
    fn a_wake_report_renumbers_a_share_and_counts_fds_past_64_as_readable() {
        let mut woken = Woken::NONE;
        woken.insert(0);
        woken.insert(3);
        woken.insert(70); // Past the 64th: not recorded, and reported readable anyway.
        assert!(woken.contains(0) && woken.contains(3) && !woken.contains(1));
        assert!(woken.contains(64) && woken.contains(70));
        // One source's fds start at index 2: its fd 1 is the list's fd 3.
        let share = woken.from(2);
        assert!(share.contains(1) && !share.contains(0) && !share.contains(2));
        // The list's fds past the 64th stay readable in the share.
        assert!(share.contains(62) && !share.contains(60));
        assert_eq!(woken.from(64), Woken::ALL);
        assert!(!Woken::NONE.any() && woken.any());
    }

    #[test]
    fn a_device_that_completes_in_poll_sleeps_only_with_nothing_queued() {
        let mut device = MemoryDevice::new("memory", 4 * IO_ALIGNMENT as u64, 4);
        let (read, write) = pipe();
        let fds = [read.as_raw_fd()];

        // Nothing to complete and nothing rung: the whole timeout.
        let start = Instant::now();
        assert!(
            !device
                .wait(&fds, Some(Duration::from_millis(30)))
                .unwrap()
                .any()
        );
        assert!(
            start.elapsed() >= Duration::from_millis(25),
            "{:?}",
            start.elapsed()
        );
        // A timeout under a millisecond still sleeps (rounded up), never spins.
        let start = Instant::now();
        assert!(
            !device
                .wait(&fds, Some(Duration::from_micros(10)))
                .unwrap()
                .any()
        );
        assert!(
            start.elapsed() >= Duration::from_micros(900),
            "{:?}",
            start.elapsed()
        );
        // Zero: only collect, never sleep.
        let start = Instant::now();
        assert!(!device.wait(&fds, Some(Duration::ZERO)).unwrap().any());
        assert!(start.elapsed() < Duration::from_secs(5));

        // A wake fd that is readable ends it at once, and says so.
        // SAFETY: writes one byte from a live buffer to the pipe's write end.
        let written = unsafe { libc::write(write.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        assert_eq!(written, 1);
        let start = Instant::now();
        let woken = device.wait(&fds, Some(Duration::from_secs(10))).unwrap();
        assert!(woken.contains(0), "{woken:?}");
        assert!(start.elapsed() < Duration::from_secs(5));

        // A queued request is ready for the next poll: no sleep, however long the timeout.
        let (quiet, _keep) = pipe();
        let mut buffer = AlignedBuf::zeroed(IO_ALIGNMENT);
        let request = IoRequest {
            op: IoOp::Read,
            offset: 0,
            buffer: buffer.as_mut_ptr(),
            len: IO_ALIGNMENT as u32,
            fixed_buffer: None,
            user_data: 7,
        };
        // SAFETY: the buffer outlives the poll below.
        unsafe { device.submit(request).unwrap() };
        let start = Instant::now();
        let long = Some(Duration::from_secs(10));
        assert!(!device.wait(&[quiet.as_raw_fd()], long).unwrap().any());
        assert!(start.elapsed() < Duration::from_secs(5));
        let mut completions = Vec::new();
        assert_eq!(device.poll(&mut completions, 0).unwrap(), 1);

        // A hung-up wake fd is an error, not a wake the caller would spin on.
        let (hung_up, writer) = pipe();
        drop(writer);
        let failed = device.wait(&[hung_up.as_raw_fd()], long);
        assert!(
            matches!(failed, Err(DeviceError::Setup { .. })),
            "{failed:?}"
        );

        // No fd and no limit: nothing could end the sleep, so there is none. (Run on a
        // thread, so that a regression fails the test instead of hanging it.)
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let woke = device.wait(&[], None).unwrap();
            let _ = done.send(woke);
        });
        assert_eq!(
            finished.recv_timeout(Duration::from_secs(5)),
            Ok(Woken::NONE)
        );
    }
}
