pub mod admin;
pub mod bench;
pub mod cluster;
pub mod control;
pub mod ingest;
pub mod mcp;
pub mod mount;
pub mod namespace;
pub mod quickstart;
pub mod serve;
pub mod sim;
pub mod snapshot;
pub mod topology;

/// Parses a human size (`1GiB`, `512MiB`, `4096`) for a command-line option.
pub(crate) fn parse_bytes(text: &str) -> Result<u64, String> {
    parse_size::parse_size(text).map_err(|error| format!("{text:?}: {error}"))
}
