//! The control plane: namespace and layouts, versions and snapshots, membership and
//! placement, kept in a [`store::MetadataStore`] and served over gRPC. It is never on the read
//! path: clients open a file once, cache its layout and read from the data daemons.

pub mod agents;
pub mod error;
pub mod heat;
pub mod membership;
pub mod model;
pub mod namespace;
pub mod orchestration;
pub mod path;
pub mod placement;
pub mod policy;
pub mod rebalance;
pub mod server;
pub mod snapshot;
pub mod store;
pub mod testing;
pub mod upkeep;

pub use tier0_control_api::{client, proto};

pub use error::ControlError;
pub use namespace::Namespace;
pub use path::NsPath;
