use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// Wakes a worker that sleeps in the kernel while waiting for I/O, when a new request arrives.
///
/// A worker with reads in flight sleeps in `io_uring_enter` on a ring that also watches this
/// eventfd (a multishot poll). The submitter rings only when the worker said it is going to
/// sleep, so a busy worker costs the submitter no system call.
#[derive(Debug)]
pub(crate) struct Doorbell {
    eventfd: OwnedFd,
    sleeping: AtomicBool,
}

impl Doorbell {
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes two integers and returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Doorbell {
            // SAFETY: fd is a fresh descriptor that nothing else owns.
            eventfd: unsafe { OwnedFd::from_raw_fd(fd) },
            sleeping: AtomicBool::new(false),
        })
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Called by the submitter after queuing a request.
    pub(crate) fn ring(&self) {
        // SeqCst pairs with `prepare_to_sleep`: either the worker sees the queued request when
        // it re-checks, or we see it sleeping and write.
        if self.sleeping.load(Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from `one` to our eventfd.
            unsafe { libc::write(self.fd(), (&one as *const u64).cast(), 8) };
        }
    }

    /// The worker is about to sleep; it must re-check its queue after this.
    pub(crate) fn prepare_to_sleep(&self) {
        self.sleeping.store(true, Ordering::SeqCst);
    }

    /// The worker woke up: stop asking for rings, and clear the eventfd if it was `rung` (its
    /// ring saw the eventfd readable; reading it otherwise would be a wasted system call).
    pub(crate) fn woke(&self, rung: bool) {
        self.sleeping.store(false, Ordering::SeqCst);
        if rung {
            let mut value: u64 = 0;
            // SAFETY: reads at most 8 bytes into `value`; non-blocking.
            unsafe { libc::read(self.fd(), (&mut value as *mut u64).cast(), 8) };
        }
    }
}
