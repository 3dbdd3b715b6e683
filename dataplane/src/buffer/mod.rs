//! Memory for I/O: the registered buffer pool of the data path, aligned buffers for the
//! cold paths, and read-only mappings.

mod aligned;
mod mapping;
mod pool;

pub use aligned::AlignedBuf;
pub use mapping::ReadOnlyMap;
pub use pool::{BufferLease, BufferPool, BufferPoolConfig, BufferPoolError, PoolBuffer};
