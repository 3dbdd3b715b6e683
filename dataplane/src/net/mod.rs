//! The network side of the data plane: the wire protocol, the transports that carry it (TCP
//! everywhere, RDMA verbs where there is an HCA), and the copies daemons pull from each other
//! (`replicate`).

pub mod mapped;
pub mod rdma;
pub mod replicate;
mod stream;
mod tags;
pub mod tcp;
pub mod wire;

pub use stream::{boot_id, local_socket_addr};

/// Polls of a request source between looks at its epoll set when nothing calls for one at
/// every poll (RDMA: side channels and new sessions, its completions being polled in user
/// space; TCP: a source without connections). A worker about to sleep has each look at
/// once (`RequestSource::prepare_to_sleep`).
pub(crate) const HARVEST_EVERY: u32 = 64;
