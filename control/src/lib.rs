//! The control plane: namespace and layouts, snapshots, membership, placement and the
//! rebalancer, served over gRPC. See `docs/DEVELOPMENT.md` for what is built so far.
