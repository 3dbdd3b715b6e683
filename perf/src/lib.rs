//! Benchmarks that run tier0 next to a baseline (fio, perftest, a socket blaster) in the same
//! run, and the cluster simulator. See `docs/DEVELOPMENT.md` for what is built so far.
