//! The network side of the data plane: the wire protocol, and the transports that carry it.

pub mod tcp;
pub mod wire;
