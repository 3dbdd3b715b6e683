//! The result of one scenario, as JSON and as a line of a table.

use std::fmt::Write as _;

use serde::Serialize;

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
}

/// One scenario of a benchmark: tier0 and its baseline, from the same run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScenarioResult {
    /// `seq-read-1m`, `rand-read-4k`, …
    pub scenario: String,
    /// Unit of `tier0` and `baseline`: `GiB/s` or `IOPS`.
    pub unit: String,
    pub tier0: f64,
    pub baseline: f64,
    pub baseline_name: String,
    /// tier0 / baseline: above 1 means tier0 is faster.
    pub ratio: f64,
    /// CPU seconds (user + system, whole process) per GiB moved.
    pub tier0_cpu_s_per_gib: f64,
    pub baseline_cpu_s_per_gib: f64,
    /// tier0 / baseline CPU per GiB: below 1 means tier0 is cheaper.
    pub cpu_ratio: f64,
    pub tier0_latency: Latency,
    pub baseline_latency: Latency,
    pub block_size: u64,
    pub queue_depth: u32,
    /// Bytes and seconds of tier0's reported (median) run.
    pub bytes: u64,
    pub seconds: f64,
    /// Runs of each side; each side's median run is the one reported.
    pub repeats: u32,
}

impl ScenarioResult {
    /// Fills `ratio` and `cpu_ratio` from the measured values.
    pub fn with_ratios(mut self) -> Self {
        self.ratio = ratio(self.tier0, self.baseline);
        self.cpu_ratio = ratio(self.tier0_cpu_s_per_gib, self.baseline_cpu_s_per_gib);
        self
    }
}

fn ratio(ours: f64, theirs: f64) -> f64 {
    if theirs > 0.0 { ours / theirs } else { 0.0 }
}

/// A plain-text table, one line per scenario.
pub fn render_table(results: &[ScenarioResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<14} {:>6} {:>12} {:>12} {:>6}   {:>11} {:>11} {:>6}   {:>22} {:>22}",
        "scenario",
        "unit",
        "tier0",
        "baseline",
        "ratio",
        "cpu-s/GiB",
        "baseline",
        "ratio",
        "tier0 p50/p99/p999 us",
        "baseline p50/p99/p999"
    );
    for result in results {
        let latency = |latency: &Latency| {
            format!(
                "{:.0}/{:.0}/{:.0}",
                latency.p50_us, latency.p99_us, latency.p999_us
            )
        };
        let _ = writeln!(
            out,
            "{:<14} {:>6} {:>12.3} {:>12.3} {:>6.3}   {:>11.4} {:>11.4} {:>6.3}   {:>22} {:>22}",
            result.scenario,
            result.unit,
            result.tier0,
            result.baseline,
            result.ratio,
            result.tier0_cpu_s_per_gib,
            result.baseline_cpu_s_per_gib,
            result.cpu_ratio,
            latency(&result.tier0_latency),
            latency(&result.baseline_latency),
        );
    }
    if let Some(first) = results.first() {
        let _ = writeln!(out, "baseline: {}", first.baseline_name);
    }
    out
}
