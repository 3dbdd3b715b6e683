use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use io_uring::{IoUring, opcode, squeue, types};

use super::{BlockDevice, DeviceError, IO_ALIGNMENT, IoCompletion, IoOp, IoRequest, check_request};
use crate::buffer::AlignedBuf;

/// user_data of the multishot poll on the wake fd; requests never use it (the worker's
/// user_data are table indexes, the blocking helpers' u64::MAX).
/// User data of the multishot polls on wake fds: this tag in the high half, the fd in the low.
const WAKE_TAG: u64 = 0xFFFF_FFFE;

/// How to set up an [`UringDevice`].
#[derive(Clone, Debug)]
pub struct UringOptions {
    /// Most I/Os in flight (the submission queue size).
    pub queue_depth: u32,
    /// Bypass the page cache (O_DIRECT). Off only for file systems that refuse it.
    pub direct: bool,
    /// Try polled completions (IOPOLL). Needs O_DIRECT and a driver with poll queues (NVMe
    /// with `poll_queues` set); probed at open, dropped with one log line where unsupported.
    pub iopoll: bool,
    /// A kernel thread polls the submission queue (SQPOLL), idling after this many ms.
    pub sqpoll_idle_ms: Option<u32>,
}

impl Default for UringOptions {
    fn default() -> Self {
        UringOptions {
            queue_depth: 64,
            direct: true,
            iopoll: true,
            sqpoll_idle_ms: None,
        }
    }
}

/// A file or block device driven through io_uring: registered file, optional fixed buffers,
/// O_DIRECT, IOPOLL when the device supports it.
pub struct UringDevice {
    name: String,
    file: File,
    len: u64,
    ring: IoUring,
    /// With IOPOLL, the kernel refuses fsync on the polled ring: syncs go through this one.
    sync_ring: Option<IoUring>,
    queue_depth: usize,
    in_flight: usize,
    in_flight_sync: usize,
    iopoll: bool,
    defer_taskrun: bool,
    /// Fds with a multishot poll armed in the ring (the wake fds of the `wait`s so far), so
    /// that a sleeping `wait` wakes when one turns readable.
    armed_wake_fds: Vec<std::os::fd::RawFd>,
    /// Wake fds whose polls fired since the last `wait` reported them: a `poll` that reaps
    /// their completions keeps them here for the next `wait` to say.
    fired_wake_fds: Vec<std::os::fd::RawFd>,
    /// Completions collected by `wait`, handed out by the next `poll` (still counted in
    /// `in_flight` until then).
    ready: Vec<IoCompletion>,
    fixed_buffers: usize,
}

impl std::fmt::Debug for UringDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringDevice")
            .field("name", &self.name)
            .field("len", &self.len)
            .field("queue_depth", &self.queue_depth)
            .field("iopoll", &self.iopoll)
            .field("defer_taskrun", &self.defer_taskrun)
            .finish()
    }
}

/// Creates (or grows) a file of `len` bytes with its blocks allocated up front, so a store
/// never meets ENOSPC halfway through writing a chunk.
pub fn preallocate_file(path: &Path, len: u64) -> Result<(), DeviceError> {
    let name = path.display().to_string();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|source| DeviceError::Open {
            device: name.clone(),
            source,
        })?;
    let result = loop {
        // SAFETY: fallocate on an fd we own, with plain integer arguments.
        let result = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
        // A signal can interrupt a long allocation (tmpfs zeroes pages as it goes): again.
        if result != libc::EINTR {
            break result;
        }
    };
    if result != 0 {
        return Err(DeviceError::Setup {
            device: name,
            operation: "preallocate (posix_fallocate)",
            source: io::Error::from_raw_os_error(result),
        });
    }
    Ok(())
}

/// Whether the block queue under `file` polls completions (`/sys/block/X/queue/io_poll`),
/// which IOPOLL needs. A read probe alone cannot tell: reads of unwritten extents of a file
/// never reach the driver and succeed on any ring.
fn queue_polls(file: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(metadata) = file.metadata() else {
        return false;
    };
    let device = if metadata.file_type().is_block_device() {
        metadata.rdev()
    } else {
        metadata.dev()
    };
    let base = format!(
        "/sys/dev/block/{}:{}",
        libc::major(device),
        libc::minor(device)
    );
    // A partition has no queue of its own: its disk's is one level up.
    [
        format!("{base}/queue/io_poll"),
        format!("{base}/../queue/io_poll"),
    ]
    .iter()
    .find_map(|path| std::fs::read_to_string(path).ok())
    .is_some_and(|value| value.trim() == "1")
}

fn device_len(file: &File, name: &str) -> Result<u64, DeviceError> {
    let metadata = file.metadata().map_err(|source| DeviceError::Open {
        device: name.to_string(),
        source,
    })?;
    if !metadata.file_type().is_block_device() {
        return Ok(metadata.len());
    }
    let mut bytes: u64 = 0;
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    // SAFETY: the ioctl writes one u64 into `bytes`, which outlives the call.
    let result = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut bytes) };
    if result != 0 {
        return Err(DeviceError::Setup {
            device: name.to_string(),
            operation: "size query (BLKGETSIZE64)",
            source: io::Error::last_os_error(),
        });
    }
    Ok(bytes)
}

impl UringDevice {
    /// Opens a regular file or a block device (`/dev/nvme0n1`, `/dev/loop0`).
    pub fn open(path: &Path, options: &UringOptions) -> Result<Self, DeviceError> {
        let name = path.display().to_string();
        let mut open = OpenOptions::new();
        open.read(true).write(true);
        if options.direct {
            open.custom_flags(libc::O_DIRECT);
        }
        let file = match open.open(path) {
            // A file system that refuses O_DIRECT (tmpfs before Linux 6.6, some network file
            // systems): buffered I/O, said once.
            Err(error) if options.direct && error.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(device = %name, "O_DIRECT refused here: buffered I/O");
                let options = UringOptions {
                    direct: false,
                    ..options.clone()
                };
                return Self::open(path, &options);
            }
            opened => opened.map_err(|source| DeviceError::Open {
                device: name.clone(),
                source,
            })?,
        };
        let len = device_len(&file, &name)? / IO_ALIGNMENT as u64 * IO_ALIGNMENT as u64;

        if options.iopoll && options.direct && !queue_polls(&file) {
            tracing::info!(
                device = %name,
                "the block queue has no poll queues (queue/io_poll is 0): interrupt-driven completions"
            );
        } else if options.iopoll && options.direct {
            match Self::with_ring(name.clone(), &file, len, options, true) {
                Ok(mut device) => match device.probe_iopoll() {
                    Ok(()) => {
                        tracing::info!(device = %name, "io_uring with polled completions (IOPOLL)");
                        return Ok(device.finish(file_clone(&file, &name)?));
                    }
                    Err(error) => tracing::info!(
                        device = %name,
                        %error,
                        "IOPOLL not supported here, using interrupt-driven completions"
                    ),
                },
                Err(error) => tracing::info!(
                    device = %name,
                    %error,
                    "IOPOLL ring refused, using interrupt-driven completions"
                ),
            }
        }
        let device = Self::with_ring(name.clone(), &file, len, options, false)?;
        Ok(device.finish(file))
    }

    fn finish(mut self, file: File) -> Self {
        self.file = file;
        self
    }

    fn with_ring(
        name: String,
        file: &File,
        len: u64,
        options: &UringOptions,
        iopoll: bool,
    ) -> Result<Self, DeviceError> {
        let setup = |operation, source| DeviceError::Setup {
            device: name.clone(),
            operation,
            source,
        };
        let queue_depth = options.queue_depth.clamp(1, 4096);
        let mut builder = IoUring::builder();
        if iopoll {
            builder.setup_iopoll();
        }
        if let Some(idle) = options.sqpoll_idle_ms {
            builder.setup_sqpoll(idle);
        }
        builder.setup_cqsize(queue_depth * 2);
        // Completion work runs only when this thread asks (io_uring_enter with GETEVENTS), in
        // batches, instead of interrupting it per I/O. Needs Linux 6.1 and one submitting
        // thread, which a worker is; older kernels get a plain ring.
        let mut deferred = builder.clone();
        deferred
            .setup_coop_taskrun()
            .setup_single_issuer()
            .setup_defer_taskrun();
        let (ring, defer_taskrun) = match deferred.build(queue_depth) {
            Ok(ring) => (ring, true),
            Err(_) => (
                builder
                    .build(queue_depth)
                    .map_err(|source| setup("io_uring setup", source))?,
                false,
            ),
        };
        ring.submitter()
            .register_files(&[file.as_raw_fd()])
            .map_err(|source| setup("io_uring register_files", source))?;
        let sync_ring = if iopoll {
            let ring =
                IoUring::new(8).map_err(|source| setup("io_uring setup (sync ring)", source))?;
            ring.submitter()
                .register_files(&[file.as_raw_fd()])
                .map_err(|source| setup("io_uring register_files (sync ring)", source))?;
            Some(ring)
        } else {
            None
        };
        Ok(UringDevice {
            name: name.clone(),
            file: file_clone(file, &name)?,
            len,
            ring,
            sync_ring,
            queue_depth: queue_depth as usize,
            in_flight: 0,
            in_flight_sync: 0,
            iopoll,
            defer_taskrun,
            armed_wake_fds: Vec::new(),
            fired_wake_fds: Vec::new(),
            ready: Vec::new(),
            fixed_buffers: 0,
        })
    }

    /// One aligned read: fails with EOPNOTSUPP where the driver has no poll queues.
    fn probe_iopoll(&mut self) -> Result<(), DeviceError> {
        if self.len == 0 {
            return Ok(());
        }
        let mut buffer = AlignedBuf::zeroed(IO_ALIGNMENT);
        self.read_at(0, &mut buffer)
    }

    /// True when completions are polled (IOPOLL) rather than interrupt-driven.
    pub fn is_iopoll(&self) -> bool {
        self.iopoll
    }

    fn push(ring: &mut IoUring, entry: &squeue::Entry) -> Result<(), ()> {
        // SAFETY: the entry's buffer obeys `submit`'s contract (valid until completion).
        unsafe { ring.submission().push(entry).map_err(|_| ()) }
    }

    /// Appends finished I/Os to `completions`. The wake-fd polls' own completions are consumed
    /// here: their fds go to `fired`; a fd whose poll ended leaves `armed`.
    fn reap(
        ring: &mut IoUring,
        completions: &mut Vec<IoCompletion>,
        armed: &mut Vec<std::os::fd::RawFd>,
        fired: &mut Vec<std::os::fd::RawFd>,
    ) {
        for entry in ring.completion() {
            if entry.user_data() >> 32 == WAKE_TAG {
                let fd = entry.user_data() as u32 as std::os::fd::RawFd;
                if !fired.contains(&fd) {
                    fired.push(fd);
                }
                if !io_uring::cqueue::more(entry.flags()) {
                    armed.retain(|&armed| armed != fd);
                }
                continue;
            }
            let result = entry.result();
            completions.push(IoCompletion {
                user_data: entry.user_data(),
                result: if result < 0 {
                    Err(-result)
                } else {
                    Ok(result as u32)
                },
            });
        }
    }

    /// Submits what is queued and runs pending completion work, without waiting.
    fn get_events(ring: &mut IoUring, name: &str) -> Result<(), DeviceError> {
        const IORING_ENTER_GETEVENTS: u32 = 1;
        let to_submit = ring.submission().len() as u32;
        loop {
            // SAFETY: io_uring_enter on our own ring with no extra argument; submitted entries
            // obey `submit`'s contract.
            let result = unsafe {
                ring.submitter()
                    .enter::<libc::sigset_t>(to_submit, 0, IORING_ENTER_GETEVENTS, None)
            };
            match result {
                Ok(_) => return Ok(()),
                Err(error) if error.raw_os_error() == Some(libc::EINTR) => continue,
                Err(error) if error.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(source) => {
                    return Err(DeviceError::Setup {
                        device: name.to_string(),
                        operation: "io_uring_enter",
                        source,
                    });
                }
            }
        }
    }

    fn enter(ring: &IoUring, want: usize, name: &str) -> Result<(), DeviceError> {
        loop {
            match ring.submitter().submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(error) if error.raw_os_error() == Some(libc::EINTR) => continue,
                // Completion queue full: the caller reaps, then we go on.
                Err(error) if error.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(source) => {
                    return Err(DeviceError::Setup {
                        device: name.to_string(),
                        operation: "io_uring_enter",
                        source,
                    });
                }
            }
        }
    }
}

fn file_clone(file: &File, name: &str) -> Result<File, DeviceError> {
    file.try_clone().map_err(|source| DeviceError::Open {
        device: name.to_string(),
        source,
    })
}

impl BlockDevice for UringDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        // SAFETY: F_GETFL on a file this device owns reads its status flags, nothing else.
        let flags = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_GETFL) };
        let direct = flags >= 0 && flags & libc::O_DIRECT != 0;
        match (direct, self.iopoll) {
            (true, true) => "io_uring, O_DIRECT, polled completions",
            (true, false) => "io_uring, O_DIRECT",
            (false, _) => "io_uring, buffered (O_DIRECT refused)",
        }
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn queue_depth(&self) -> usize {
        self.queue_depth
    }

    fn in_flight(&self) -> usize {
        self.in_flight + self.in_flight_sync
    }

    fn wait(
        &mut self,
        wake_fds: &[std::os::fd::RawFd],
        timeout: Option<std::time::Duration>,
    ) -> Result<super::Woken, DeviceError> {
        let sleep = timeout.is_none_or(|timeout| !timeout.is_zero());
        if !sleep || self.iopoll || self.in_flight_sync > 0 {
            // Collect without sleeping. (A polled ring cannot watch an eventfd, and a sync on
            // the side ring is not seen from here: those callers spin.)
            Self::get_events(&mut self.ring, &self.name)?;
        } else {
            for &fd in wake_fds {
                if self.armed_wake_fds.contains(&fd) {
                    continue;
                }
                let entry = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
                    .multi(true)
                    .build()
                    .user_data(WAKE_TAG << 32 | u64::from(fd as u32));
                // SAFETY: a poll carries no buffer; the fds outlive the ring (the worker owns
                // the doorbell and its sources, and drops its rings first).
                if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                    self.armed_wake_fds.push(fd);
                }
            }
            let result = match timeout {
                Some(timeout) => {
                    let timespec = types::Timespec::from(timeout);
                    let args = types::SubmitArgs::new().timespec(&timespec);
                    self.ring.submitter().submit_with_args(1, &args)
                }
                None => self.ring.submitter().submit_and_wait(1),
            };
            if let Err(source) = result
                && !matches!(
                    source.raw_os_error(),
                    Some(libc::EINTR | libc::ETIME | libc::EBUSY)
                )
            {
                return Err(DeviceError::Setup {
                    device: self.name.clone(),
                    operation: "io_uring_enter (wait)",
                    source,
                });
            }
        }
        let mut ready = std::mem::take(&mut self.ready);
        Self::reap(
            &mut self.ring,
            &mut ready,
            &mut self.armed_wake_fds,
            &mut self.fired_wake_fds,
        );
        self.ready = ready;
        let mut woken = super::Woken::NONE;
        for (index, fd) in wake_fds.iter().enumerate() {
            if self.fired_wake_fds.contains(fd) {
                woken.insert(index);
            }
        }
        // Kept while no wait names them (a collecting `wait` names none).
        if !wake_fds.is_empty() {
            self.fired_wake_fds.clear();
        }
        Ok(woken)
    }

    unsafe fn register_buffers(&mut self, regions: &[(*mut u8, usize)]) -> Result<(), DeviceError> {
        let iovecs: Vec<libc::iovec> = regions
            .iter()
            .map(|&(base, len)| libc::iovec {
                iov_base: base.cast(),
                iov_len: len,
            })
            .collect();
        let submitter = self.ring.submitter();
        if self.fixed_buffers > 0 {
            let _ = submitter.unregister_buffers();
        }
        // SAFETY: the caller keeps the regions allocated while registered (our contract).
        unsafe { submitter.register_buffers(&iovecs) }.map_err(|source| DeviceError::Setup {
            device: self.name.clone(),
            operation: "io_uring register_buffers",
            source,
        })?;
        self.fixed_buffers = regions.len();
        Ok(())
    }

    unsafe fn submit(&mut self, request: IoRequest) -> Result<(), DeviceError> {
        check_request(&self.name, self.len, &request)?;
        if self.in_flight() >= self.queue_depth {
            return Err(DeviceError::QueueFull {
                device: self.name.clone(),
                queue_depth: self.queue_depth,
            });
        }
        let file = types::Fixed(0);
        let fixed = request
            .fixed_buffer
            .filter(|index| usize::from(*index) < self.fixed_buffers);
        let entry = match (request.op, fixed) {
            (IoOp::Read, Some(index)) => {
                opcode::ReadFixed::new(file, request.buffer, request.len, index)
                    .offset(request.offset)
                    .build()
            }
            (IoOp::Read, None) => opcode::Read::new(file, request.buffer, request.len)
                .offset(request.offset)
                .build(),
            (IoOp::Write, Some(index)) => {
                opcode::WriteFixed::new(file, request.buffer, request.len, index)
                    .offset(request.offset)
                    .build()
            }
            (IoOp::Write, None) => opcode::Write::new(file, request.buffer, request.len)
                .offset(request.offset)
                .build(),
            (IoOp::Sync, _) => opcode::Fsync::new(file)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
        .user_data(request.user_data);

        if let (IoOp::Sync, Some(sync_ring)) = (request.op, self.sync_ring.as_mut()) {
            Self::push(sync_ring, &entry).map_err(|()| DeviceError::QueueFull {
                device: self.name.clone(),
                queue_depth: self.queue_depth,
            })?;
            Self::enter(sync_ring, 0, &self.name)?;
            self.in_flight_sync += 1;
            return Ok(());
        }
        let ring = &mut self.ring;
        if Self::push(ring, &entry).is_err() {
            // The submission queue holds queue_depth entries and in_flight < queue_depth, so
            // it is full only of entries not yet sent: send them and retry once.
            Self::enter(ring, 0, &self.name)?;
            Self::push(ring, &entry).map_err(|()| DeviceError::QueueFull {
                device: self.name.clone(),
                queue_depth: self.queue_depth,
            })?;
        }
        self.in_flight += 1;
        Ok(())
    }

    fn poll(
        &mut self,
        completions: &mut Vec<IoCompletion>,
        min_completions: usize,
    ) -> Result<usize, DeviceError> {
        let want = min_completions.min(self.in_flight());
        let mut reaped = 0;
        loop {
            // Send what is queued; IOPOLL rings also find their completions only inside
            // io_uring_enter. Other rings post completions when this thread enters the kernel
            // (deferred task work): `wait` does that, sleeping or not.
            if self.iopoll || !self.ring.submission().is_empty() {
                Self::get_events(&mut self.ring, &self.name)?;
            }
            // What `wait` collected counts as in flight until handed out here.
            let ready = self.ready.len();
            completions.append(&mut self.ready);
            self.in_flight -= ready;
            reaped += ready;
            let before = completions.len();
            Self::reap(
                &mut self.ring,
                completions,
                &mut self.armed_wake_fds,
                &mut self.fired_wake_fds,
            );
            let main = completions.len() - before;
            self.in_flight -= main;
            reaped += main;
            if let Some(sync_ring) = self.sync_ring.as_mut() {
                let before = completions.len();
                Self::reap(sync_ring, completions, &mut Vec::new(), &mut Vec::new());
                let synced = completions.len() - before;
                self.in_flight_sync -= synced;
                reaped += synced;
            }
            if reaped >= want {
                return Ok(reaped);
            }
            if self.in_flight > 0 {
                Self::enter(&self.ring, 1, &self.name)?;
            } else if let Some(sync_ring) =
                self.sync_ring.as_ref().filter(|_| self.in_flight_sync > 0)
            {
                Self::enter(sync_ring, 1, &self.name)?;
            } else {
                return Ok(reaped);
            }
        }
    }
}
