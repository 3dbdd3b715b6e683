//! `tier0 bench local` as a user runs it: a short run next to fio (installed by
//! `scripts/setup`), its JSON report, and its errors. Numbers are not judged here: speed is
//! what the bench reports, not what a test asserts.

use std::process::{Command, Output};

use serde_json::Value;

fn tier0(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tier0"))
        .args(args)
        .output()
        .expect("run tier0")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_short_local_bench_reports_both_sides_of_every_scenario() {
    let dir = std::env::temp_dir().join(format!("tier0-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("store");
    let output = tier0(&[
        "bench",
        "local",
        "--file",
        file.to_str().unwrap(),
        "--size",
        "32MiB",
        "--chunk-size",
        "1MiB",
        "--queue-depth",
        "8",
        "--passes",
        "1",
        "--random-seconds",
        "0.3",
        "--repeats",
        "1",
        "--json",
    ]);
    assert!(output.status.success(), "bench failed: {}", stderr(&output));
    let report: Value = serde_json::from_slice(&output.stdout).expect("stdout is JSON");
    let scenarios = report.as_array().expect("one object per scenario");
    let names: Vec<&str> = scenarios
        .iter()
        .map(|s| s["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["seq-read-1m", "rand-read-4k"]);
    for scenario in scenarios {
        let name = scenario["scenario"].as_str().unwrap();
        let tier0 = scenario["tier0"].as_f64().unwrap();
        let baseline = scenario["baseline"].as_f64().unwrap();
        assert!(tier0 > 0.0 && baseline > 0.0, "{name}: {scenario}");
        let ratio = scenario["ratio"].as_f64().unwrap();
        assert!((ratio - tier0 / baseline).abs() < 1e-9 * ratio, "{name}");
        assert!(
            scenario["baseline_name"]
                .as_str()
                .unwrap()
                .starts_with("fio"),
            "{name}"
        );
        assert_eq!(scenario["queue_depth"], 8, "{name}");
        for side in ["tier0_latency", "baseline_latency"] {
            let latency = &scenario[side];
            let p50 = latency["p50_us"].as_f64().unwrap();
            let p99 = latency["p99_us"].as_f64().unwrap();
            let p999 = latency["p999_us"].as_f64().unwrap();
            assert!(
                0.0 < p50 && p50 <= p99 && p99 <= p999,
                "{name} {side}: {latency}"
            );
        }
        // fio counts CPU in whole milliseconds: a short run may report none.
        for cpu in ["tier0_cpu_s_per_gib", "baseline_cpu_s_per_gib"] {
            let seconds = scenario[cpu].as_f64().unwrap();
            assert!(seconds.is_finite() && seconds >= 0.0, "{name} {cpu}");
        }
    }
    assert!(!file.exists(), "the store file is removed without --keep");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_bench_arguments_are_one_clear_error() {
    for (args, expected) in [
        (&["--size", "0"][..], "--size 0"),
        (&["--queue-depth", "0"][..], "--queue-depth"),
        (
            &["--file", "/nonexistent/dir/store"][..],
            "/nonexistent/dir/store",
        ),
        (&["--poll-mode", "sometimes"][..], "sometimes"),
    ] {
        let mut all = vec!["bench", "local"];
        all.extend_from_slice(args);
        let output = tier0(&all);
        assert!(!output.status.success(), "{args:?} succeeded");
        let message = stderr(&output);
        assert!(message.contains(expected), "{args:?}: {message}");
        assert!(!message.contains("panicked"), "{args:?}: {message}");
    }
}

#[test]
fn a_short_net_bench_over_tcp_reports_the_striped_read_and_its_baseline() {
    let output = tier0(&[
        "bench",
        "net",
        "--transport",
        "tcp",
        "--size",
        "6MiB",
        "--chunk-size",
        "1MiB",
        "--repeats",
        "1",
        "--small-reads",
        "20",
        "--json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let results: Value = serde_json::from_slice(&output.stdout).unwrap();
    let results = results.as_array().unwrap();
    assert_eq!(results.len(), 2, "{results:?}");
    let striped = &results[0];
    assert_eq!(striped["scenario"], "striped-read-1m");
    assert_eq!(striped["unit"], "MiB/s");
    assert_eq!(striped["baseline_name"], "socket blaster (loopback TCP)");
    for result in results {
        for field in ["tier0", "baseline", "ratio"] {
            assert!(result[field].as_f64().unwrap() > 0.0, "{field}: {result}");
        }
        let ratio = result["tier0"].as_f64().unwrap() / result["baseline"].as_f64().unwrap();
        assert!((ratio - result["ratio"].as_f64().unwrap()).abs() < 1e-6);
    }
    assert_eq!(results[1]["scenario"], "read-4k-qd1");
}

#[test]
fn net_bench_arguments_are_checked() {
    let output = tier0(&["bench", "net", "--transport", "carrier-pigeon"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("carrier-pigeon"),
        "{}",
        stderr(&output)
    );
    let output = tier0(&["bench", "net", "--size", "1MiB", "--chunk-size", "1MiB"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("at least one chunk per daemon"),
        "{}",
        stderr(&output)
    );
}
