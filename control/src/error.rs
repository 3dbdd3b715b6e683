//! The control plane's one error type; the gRPC edge maps it to status codes.

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A request field is malformed or out of range (gRPC `InvalidArgument`).
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is well formed but the namespace is not in a state that allows it: a
    /// directory that is not empty, a commit on a version that is no longer current, too few
    /// nodes for the replication factor (gRPC `FailedPrecondition`).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The metadata store cannot serve, or kept conflicting (gRPC `Unavailable`).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored record that does not decode (gRPC `Internal`).
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = ControlError> = std::result::Result<T, E>;
