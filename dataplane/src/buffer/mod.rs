//! Memory for I/O: the registered buffer pool of the data path, and aligned buffers for the
//! cold paths.

mod aligned;

pub use aligned::AlignedBuf;
