//! The client shim linked into training jobs: the Rust API, and on top of it the C ABI and
//! the Python package. See `docs/DEVELOPMENT.md` for what is built so far.
