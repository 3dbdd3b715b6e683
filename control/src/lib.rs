//! The control plane: namespace and layouts, versions and snapshots, membership and
//! placement, kept in a [`store::MetadataStore`] and served over gRPC. It is never on the read
//! path: clients open a file once, cache its layout and read from the data daemons.

pub mod client;
pub mod error;
pub mod membership;
pub mod model;
pub mod namespace;
pub mod path;
pub mod placement;
pub mod server;
pub mod snapshot;
pub mod store;
pub mod testing;

/// The generated protobuf types and gRPC stubs (`control/proto/`).
#[allow(missing_docs, missing_debug_implementations, clippy::all)]
pub mod proto {
    tonic::include_proto!("tier0.control.v1");

    /// The services' file descriptors, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("tier0_control_descriptor");
}

pub use error::ControlError;
pub use namespace::Namespace;
pub use path::NsPath;
