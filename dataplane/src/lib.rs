//! The per-node data plane.
//!
//! - [`device`]: the block-device seam (io_uring, in-memory, fault-injecting).
//! - [`buffer`]: registered, NUMA-local I/O buffers.
//! - [`store`]: the chunk store: immutable checksummed chunks on a device, crash-safe.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod buffer;
pub mod device;
pub mod store;
