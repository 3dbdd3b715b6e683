//! Memory for I/O: the registered buffer pool of the data path, and aligned buffers for the
//! cold paths.

mod aligned;
mod pool;

pub use aligned::AlignedBuf;
pub use pool::{BufferLease, BufferPool, BufferPoolConfig, BufferPoolError, PoolBuffer};
