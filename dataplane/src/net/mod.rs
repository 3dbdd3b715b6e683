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
