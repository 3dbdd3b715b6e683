//! The client shim linked into training jobs: the Rust API, and on top of it the C ABI and
//! the Python package. See `docs/DEVELOPMENT.md` for what is built so far.
//!
//! - [`daemon`]: one authenticated connection to a data daemon, with pipelined reads that
//!   land straight in the caller's buffers.

pub mod daemon;

pub use daemon::{ClientError, DaemonConnection, ReadInto};
