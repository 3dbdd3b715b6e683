//! The control plane's gRPC API (`control/proto/`): the generated messages and stubs, and
//! [`client::ControlClient`], which sends the cluster token on every call. Its own crate, so
//! that the data daemons and the client shim talk to the control plane without depending on
//! the control plane itself (which uses the client shim to move chunks).

pub mod agent;
pub mod client;
pub mod json;

/// The generated protobuf types and gRPC stubs.
#[allow(missing_docs, missing_debug_implementations, clippy::all)]
pub mod proto {
    tonic::include_proto!("tier0.control.v1");

    /// The services' file descriptors, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("tier0_control_descriptor");
}
