//! The RDMA transport: verbs helpers shared with the client, and the daemon's per-worker
//! request source. Connection setup rides on the TCP handshake (see `net::tcp`).

mod server;
pub mod verbs;

pub(crate) use server::Session;
pub use server::{MAX_SESSIONS, RdmaAcceptor, RdmaService, RdmaSource};
pub use verbs::{RdmaDevice, RdmaError, device_names};
