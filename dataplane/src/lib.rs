//! The per-node data plane: block devices, the chunk store, registered buffers, polled NUMA
//! workers and the transports that serve striped reads. Its parts arrive in order: see
//! `docs/DEVELOPMENT.md` for what is built so far.
