use std::path::PathBuf;

/// Why a machine description could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("topology file {path}: not found")]
    FileNotFound { path: PathBuf },

    #[error("topology file {path}: cannot read it")]
    FileUnreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("topology {origin}: not an hwloc XML topology ({reason})")]
    Malformed { origin: String, reason: String },

    #[error("topology {origin}: hwloc {operation} failed: {message}")]
    Hwloc {
        origin: String,
        operation: &'static str,
        message: String,
    },
}
