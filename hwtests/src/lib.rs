//! Tests that need hardware live in `tests/`, each `#[ignore]`d with the hardware it needs.
//! `hwtests/run` runs them where that hardware exists (or on soft-RoCE in a VM).
