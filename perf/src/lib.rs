//! Benchmarks that run tier0 and a baseline side by side, in the same run, on the same data.
//!
//! Absolute numbers on shared machines drift; the ratio to a baseline measured minutes apart
//! on the same file does not drift much. Every scenario reports both, and the ratio.

pub mod cluster;
pub mod fio;
pub mod local;
pub mod measure;
pub mod net;
pub mod report;
pub mod sim;

pub use report::{Latency, ScenarioResult, render_table};
