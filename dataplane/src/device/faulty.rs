use std::sync::{Arc, Mutex, MutexGuard};

use super::memory::MemoryDevice;
use super::{BlockDevice, DeviceError, IoCompletion, IoOp, IoRequest, RequestQueue};

/// An in-memory drive that fails on command, for testing every error and crash path.
///
/// It keeps two images, as a drive with a volatile write cache does: `written` (what reads
/// see) and `durable` (what survives power loss; writes reach it at the next sync). The test
/// holds a [`FaultControl`] to arm faults while a store or worker owns the device, and to take
/// the image a restart would see.
#[derive(Debug)]
pub struct FaultyDevice {
    name: String,
    len: u64,
    queue: RequestQueue,
    control: FaultControl,
}

/// The test's side of a [`FaultyDevice`]. I/Os are numbered from 0 in the order the device
/// carries them out; every fault names the I/O it hits.
#[derive(Clone, Debug)]
pub struct FaultControl {
    state: Arc<Mutex<FaultState>>,
}

#[derive(Debug, Default)]
struct FaultState {
    written: Vec<u8>,
    durable: Vec<u8>,
    executed: u64,
    /// From this I/O on, everything fails with this errno (a dead drive or a crash point).
    fail_from: Option<(u64, i32)>,
    /// Only this I/O fails.
    fail_one: Option<(u64, i32)>,
    /// This write lands partially (its first N bytes, also on the durable image), fails, and
    /// the drive dies: power lost in the middle of a write.
    tear: Option<(u64, u32)>,
    /// This read returns its data with one bit flipped (bit index within the transfer).
    flip_read: Option<(u64, usize)>,
    /// Nothing completes: queued I/Os stay in flight (a drive that stopped answering).
    stalled: bool,
    /// I/Os handed to the device so far, carried out or not.
    submitted: u64,
    dead: bool,
}

impl FaultyDevice {
    pub fn new(name: impl Into<String>, len: u64, queue_depth: usize) -> (Self, FaultControl) {
        Self::from_image(name, vec![0; len as usize], queue_depth)
    }

    /// A device that starts with `image` on both the written and the durable side (what a
    /// restart after [`FaultControl::crash_image`] sees).
    pub fn from_image(
        name: impl Into<String>,
        mut image: Vec<u8>,
        queue_depth: usize,
    ) -> (Self, FaultControl) {
        image.truncate(image.len() / super::IO_ALIGNMENT * super::IO_ALIGNMENT);
        let control = FaultControl {
            state: Arc::new(Mutex::new(FaultState {
                durable: image.clone(),
                written: image,
                ..FaultState::default()
            })),
        };
        let device = FaultyDevice {
            name: name.into(),
            len: control.lock().written.len() as u64,
            queue: RequestQueue::new(queue_depth),
            control: control.clone(),
        };
        (device, control)
    }
}

impl FaultControl {
    fn lock(&self) -> MutexGuard<'_, FaultState> {
        // A test that panicked while holding the lock has failed already; keep the state.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// I/Os carried out so far.
    pub fn executed(&self) -> u64 {
        self.lock().executed
    }

    /// I/O number `io` and every one after it fail with `errno`.
    pub fn fail_from(&self, io: u64, errno: i32) {
        self.lock().fail_from = Some((io, errno));
    }

    /// Only I/O number `io` fails with `errno`.
    pub fn fail_one(&self, io: u64, errno: i32) {
        self.lock().fail_one = Some((io, errno));
    }

    /// I/O number `io`, if a write, lands only its first `bytes` bytes (durably) and then the
    /// drive dies.
    pub fn tear_write(&self, io: u64, bytes: u32) {
        self.lock().tear = Some((io, bytes));
    }

    /// I/O number `io`, if a read, returns its data with bit `bit` of the transfer flipped.
    pub fn flip_read_bit(&self, io: u64, bit: usize) {
        self.lock().flip_read = Some((io, bit));
    }

    /// While `stalled`, no I/O completes: they stay in flight, and a wait sleeps on its wake
    /// fds as if the drive were busy; a poll that must collect some (the blocking
    /// `read_at`, `write_at`, `sync`) returns none after a millisecond, so its caller waits
    /// without spinning. Released, they complete at the owner's next poll; a worker asleep
    /// on the drive notices at its next wake.
    pub fn stall(&self, stalled: bool) {
        self.lock().stalled = stalled;
    }

    /// I/Os handed to the device so far, carried out or not (to see one is in flight).
    pub fn submitted(&self) -> u64 {
        self.lock().submitted
    }

    /// Flips one bit of the stored data, on both images: media corruption.
    pub fn corrupt(&self, offset: u64, bit: u8) {
        let mut state = self.lock();
        state.written[offset as usize] ^= 1 << (bit % 8);
        state.durable[offset as usize] ^= 1 << (bit % 8);
    }

    /// Drops every armed fault and revives the drive.
    pub fn heal(&self) {
        let mut state = self.lock();
        state.fail_from = None;
        state.fail_one = None;
        state.tear = None;
        state.flip_read = None;
        state.stalled = false;
        state.dead = false;
    }

    /// What a restart sees after power loss now: the durable image, or (`keep_unsynced`) the
    /// written one, as when the drive happened to flush its cache before losing power.
    pub fn crash_image(&self, keep_unsynced: bool) -> Vec<u8> {
        let state = self.lock();
        if keep_unsynced {
            state.written.clone()
        } else {
            state.durable.clone()
        }
    }
}

impl BlockDevice for FaultyDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "fault injection"
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn queue_depth(&self) -> usize {
        self.queue.depth()
    }

    fn in_flight(&self) -> usize {
        self.queue.len()
    }

    unsafe fn submit(&mut self, request: IoRequest) -> Result<(), DeviceError> {
        self.queue.push(&self.name, self.len, request)?;
        self.control.lock().submitted += 1;
        Ok(())
    }

    fn wait(
        &mut self,
        wake_fds: &[std::os::fd::RawFd],
        timeout: Option<std::time::Duration>,
    ) -> Result<super::Woken, DeviceError> {
        let ready = !self.control.lock().stalled && self.queue.len() > 0;
        RequestQueue::wait_unless(ready, &self.name, wake_fds, timeout)
    }

    fn poll(
        &mut self,
        completions: &mut Vec<IoCompletion>,
        min_completions: usize,
    ) -> Result<usize, DeviceError> {
        let mut state = self.control.lock();
        if state.stalled {
            drop(state);
            if min_completions > 0 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            return Ok(0);
        }
        let count = self.queue.drain(completions, |request| {
            let io = state.executed;
            state.executed += 1;
            // SAFETY (for the execute calls below): `submit`'s contract keeps the buffer
            // valid until this completion is returned.
            if state.dead {
                Err(libc::EIO)
            } else if let Some((_, errno)) = state.fail_from.filter(|(from, _)| io >= *from) {
                state.dead = true;
                Err(errno)
            } else if let Some((_, errno)) = state.fail_one.filter(|(at, _)| *at == io) {
                Err(errno)
            } else if let Some((_, bytes)) = state
                .tear
                .filter(|(at, _)| *at == io && request.op == IoOp::Write)
            {
                let torn = IoRequest {
                    len: bytes.min(request.len),
                    ..*request
                };
                // SAFETY: see above; `torn` covers a prefix of the request's buffer.
                unsafe {
                    let _ = MemoryDevice::execute(&mut state.written, &torn);
                    let _ = MemoryDevice::execute(&mut state.durable, &torn);
                }
                state.dead = true;
                Err(libc::EIO)
            } else {
                let state = &mut *state;
                // SAFETY: see above.
                let result = unsafe { MemoryDevice::execute(&mut state.written, request) };
                match request.op {
                    IoOp::Sync => state.durable.copy_from_slice(&state.written),
                    IoOp::Read => {
                        if let Some((_, bit)) = state.flip_read.filter(|(at, _)| *at == io)
                            && bit / 8 < request.len as usize
                        {
                            // SAFETY: bit / 8 is inside the transfer, checked above.
                            unsafe { *request.buffer.add(bit / 8) ^= 1 << (bit % 8) };
                        }
                    }
                    IoOp::Write => {}
                }
                result
            }
        });
        Ok(count)
    }
}
