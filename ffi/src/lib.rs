//! The client shim linked into training jobs: the Rust API, and on top of it the C ABI and
//! the Python package. See `docs/DEVELOPMENT.md` for what is built so far.
//!
//! - [`transport`]: one session with a data daemon, over TCP ([`daemon`]) or RDMA ([`rdma`]),
//!   behind the [`Transport`] trait; reads land straight in the caller's buffers.
//! - [`striped`]: a file striped over N daemons read concurrently into one [`ReadBuffer`],
//!   with nearest-replica choice and failover.
//! - [`client`]: files by path: layouts from the control plane, cached, reopened when a
//!   daemon refuses one as stale.

pub mod buffer;
pub mod client;
pub mod daemon;
pub mod gate;
pub mod rdma;
pub mod striped;
pub mod transport;

pub use buffer::ReadBuffer;
pub use client::{BatchRead, Client, FileError, FileLayout};
pub use daemon::{ClientError, DaemonConnection, ReadInto};
pub use rdma::{RdmaClient, RdmaConnection};
pub use striped::{
    DaemonEndpoint, ReadReport, StripedChunk, StripedError, StripedFile, StripedReader,
};
pub use tier0_dataplane::net::wire::LayoutRef;
pub use transport::{Transport, TransportChoice, TransportKind};
