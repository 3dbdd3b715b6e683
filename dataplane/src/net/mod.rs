//! The network side of the data plane: the wire protocol, and the transports that carry it
//! (TCP everywhere, RDMA verbs where there is an HCA).

pub mod rdma;
mod stream;
mod tags;
pub mod tcp;
pub mod wire;

pub use stream::{boot_id, local_socket_addr};
