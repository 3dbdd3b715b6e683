use super::{BlockDevice, DeviceError, IoCompletion, IoOp, IoRequest, RequestQueue};

/// A drive in memory: the same contract as the real one (alignment, bounds, queue depth,
/// completions only through `poll`), for tests and for machines without a spare drive.
#[derive(Debug)]
pub struct MemoryDevice {
    name: String,
    data: Vec<u8>,
    queue: RequestQueue,
}

impl MemoryDevice {
    pub fn new(name: impl Into<String>, len: u64, queue_depth: usize) -> Self {
        Self::from_image(name, vec![0; len as usize], queue_depth)
    }

    /// A device whose contents are `image` (its length is rounded down to the alignment).
    pub fn from_image(name: impl Into<String>, mut image: Vec<u8>, queue_depth: usize) -> Self {
        image.truncate(image.len() / super::IO_ALIGNMENT * super::IO_ALIGNMENT);
        MemoryDevice {
            name: name.into(),
            data: image,
            queue: RequestQueue::new(queue_depth),
        }
    }

    pub fn image(&self) -> &[u8] {
        &self.data
    }

    pub fn image_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }

    /// Carries out one request against `data`.
    ///
    /// # Safety
    /// The request's buffer is valid for `len` bytes (the `submit` contract).
    pub(crate) unsafe fn execute(data: &mut [u8], request: &IoRequest) -> Result<u32, i32> {
        let start = request.offset as usize;
        let len = request.len as usize;
        if len == 0 {
            // Nothing to copy, and the buffer may be null (which a slice must never get).
            return Ok(0);
        }
        match request.op {
            IoOp::Read => {
                // SAFETY: per this function's contract.
                let target = unsafe { std::slice::from_raw_parts_mut(request.buffer, len) };
                target.copy_from_slice(&data[start..start + len]);
            }
            IoOp::Write => {
                // SAFETY: per this function's contract.
                let source = unsafe { std::slice::from_raw_parts(request.buffer, len) };
                data[start..start + len].copy_from_slice(source);
            }
            IoOp::Sync => {}
        }
        Ok(request.len)
    }
}

impl BlockDevice for MemoryDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "memory (test device)"
    }

    fn len(&self) -> u64 {
        self.data.len() as u64
    }

    fn queue_depth(&self) -> usize {
        self.queue.depth()
    }

    fn in_flight(&self) -> usize {
        self.queue.len()
    }

    unsafe fn submit(&mut self, request: IoRequest) -> Result<(), DeviceError> {
        let len = self.len();
        self.queue.push(&self.name, len, request)
    }

    fn wait(
        &mut self,
        wake_fds: &[std::os::fd::RawFd],
        timeout: Option<std::time::Duration>,
    ) -> Result<super::Woken, DeviceError> {
        self.queue.wait(&self.name, wake_fds, timeout)
    }

    fn poll(
        &mut self,
        completions: &mut Vec<IoCompletion>,
        _min_completions: usize,
    ) -> Result<usize, DeviceError> {
        let data = &mut self.data;
        // SAFETY: `submit`'s contract keeps the buffer valid until this completion.
        Ok(self.queue.drain(completions, |request| unsafe {
            Self::execute(data, request)
        }))
    }
}
