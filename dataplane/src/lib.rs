//! The per-node data plane.
//!
//! - [`device`]: the block-device seam (io_uring, in-memory, fault-injecting).
//! - [`buffer`]: registered, NUMA-local I/O buffers.
//! - [`store`]: the chunk store: immutable checksummed chunks on a device, crash-safe.
//! - [`worker`]: pinned polled workers that own rings, buffers and in-flight requests.
//! - [`net`]: the wire protocol and the transports (TCP, RDMA) that workers drive.
//! - [`fence`]: per file, the lowest layout version the daemon still serves reads at.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod buffer;
pub mod daemon;
pub mod decode_checks;
pub mod device;
pub mod fence;
pub mod heat;
pub mod net;
pub mod store;
pub mod worker;

/// An error and its sources on one line (`outer: inner: os error`), for messages that cross a
/// thread or a process as text.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}
