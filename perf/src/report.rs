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
    /// `None` (JSON `null`) where the baseline's CPU is not measured: perftest runs as other
    /// processes, whose start and connection no clock of ours can leave out.
    pub baseline_cpu_s_per_gib: Option<f64>,
    /// tier0 / baseline CPU per GiB: below 1 means tier0 is cheaper; `None` with no baseline
    /// CPU.
    pub cpu_ratio: Option<f64>,
    pub tier0_latency: Latency,
    /// `None` (JSON `null`) where the baseline reports no latency (`ib_write_bw`,
    /// `ib_read_bw`: bandwidth only).
    pub baseline_latency: Option<Latency>,
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
        self.cpu_ratio = self
            .baseline_cpu_s_per_gib
            .map(|theirs| ratio(self.tier0_cpu_s_per_gib, theirs));
        self
    }
}

fn ratio(ours: f64, theirs: f64) -> f64 {
    if theirs > 0.0 { ours / theirs } else { 0.0 }
}

/// A plain-text table, one line per scenario, then each scenario's baseline; `-` where the
/// baseline does not measure a column.
pub fn render_table(results: &[ScenarioResult]) -> String {
    let width = results
        .iter()
        .map(|result| result.scenario.len())
        .chain([8])
        .max()
        .expect("never empty");
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<width$} {:>7} {:>12} {:>12} {:>6}   {:>9} {:>9} {:>6}   {:>22} {:>22}",
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
    let latency = |latency: Option<&Latency>| match latency {
        Some(latency) => format!(
            "{:.0}/{:.0}/{:.0}",
            latency.p50_us, latency.p99_us, latency.p999_us
        ),
        None => "-".to_string(),
    };
    let number = |value: Option<f64>, precision: usize| match value {
        Some(value) => format!("{value:.precision$}"),
        None => "-".to_string(),
    };
    for result in results {
        let _ = writeln!(
            out,
            "{:<width$} {:>7} {:>12.3} {:>12.3} {:>6.3}   {:>9.4} {:>9} {:>6}   {:>22} {:>22}",
            result.scenario,
            result.unit,
            result.tier0,
            result.baseline,
            result.ratio,
            result.tier0_cpu_s_per_gib,
            number(result.baseline_cpu_s_per_gib, 4),
            number(result.cpu_ratio, 3),
            latency(Some(&result.tier0_latency)),
            latency(result.baseline_latency.as_ref()),
        );
    }
    let mut names: Vec<&str> = results
        .iter()
        .map(|result| result.baseline_name.as_str())
        .collect();
    names.dedup();
    if names.len() == 1 {
        let _ = writeln!(out, "baseline: {}", names[0]);
    } else {
        for result in results {
            let _ = writeln!(
                out,
                "baseline of {}: {}",
                result.scenario, result.baseline_name
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(scenario: &str, baseline_name: &str, measured: bool) -> ScenarioResult {
        let latency = Latency {
            p50_us: 10.0,
            p99_us: 20.0,
            p999_us: 30.0,
        };
        ScenarioResult {
            scenario: scenario.into(),
            unit: "MiB/s".into(),
            tier0: 300.0,
            baseline: 200.0,
            baseline_name: baseline_name.into(),
            ratio: 0.0,
            tier0_cpu_s_per_gib: 0.5,
            baseline_cpu_s_per_gib: measured.then_some(0.25),
            cpu_ratio: None,
            tier0_latency: latency,
            baseline_latency: measured.then_some(latency),
            block_size: 1 << 20,
            queue_depth: 16,
            bytes: 1 << 30,
            seconds: 1.0,
            repeats: 3,
        }
        .with_ratios()
    }

    #[test]
    fn ratios_are_filled_and_unmeasured_baselines_stay_unmeasured() {
        let both = result("a", "x", true);
        assert_eq!(both.ratio, 1.5);
        assert_eq!(both.cpu_ratio, Some(2.0));
        let bandwidth_only = result("b", "y", false);
        assert_eq!(bandwidth_only.ratio, 1.5);
        assert_eq!(bandwidth_only.cpu_ratio, None);
        let json = serde_json::to_value(&bandwidth_only).unwrap();
        assert!(json["baseline_latency"].is_null(), "{json}");
        assert!(json["baseline_cpu_s_per_gib"].is_null(), "{json}");
        assert!(json["cpu_ratio"].is_null(), "{json}");
    }

    #[test]
    fn the_table_marks_what_a_baseline_does_not_measure_and_names_each_baseline() {
        let table = render_table(&[
            result("striped-read-1m", "ib_write_bw", false),
            result("striped-read-1m-vs-read", "ib_read_bw", false),
            result("read-4k-qd1", "ib_read_lat", true),
        ]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 7, "{table}");
        // A scenario name longer than the column still leaves the columns lined up.
        let ratio_at = lines[0].find(" ratio").unwrap();
        for row in &lines[1..4] {
            assert_eq!(&row[ratio_at..ratio_at + 6], " 1.500", "{table}");
        }
        let fields = |row: &str| row.split_whitespace().map(String::from).collect::<Vec<_>>();
        assert_eq!(
            fields(lines[1])[6..],
            ["-", "-", "10/20/30", "-"],
            "{table}"
        );
        assert_eq!(
            fields(lines[3])[6..],
            ["0.2500", "2.000", "10/20/30", "10/20/30"],
            "{table}"
        );
        assert_eq!(lines[4], "baseline of striped-read-1m: ib_write_bw");
        assert_eq!(lines[5], "baseline of striped-read-1m-vs-read: ib_read_bw");
        assert_eq!(lines[6], "baseline of read-4k-qd1: ib_read_lat");

        let one = render_table(&[result("a", "fio", true), result("b", "fio", true)]);
        assert_eq!(one.lines().last(), Some("baseline: fio"));
    }
}
