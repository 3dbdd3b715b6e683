//! `tier0 sim` and `tier0 sim planner` as a user runs them: a small cluster's JSON report,
//! the table, and errors that name the flag.

use std::process::{Command, Output};

use serde_json::Value;

fn tier0(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tier0"))
        .args(args)
        .output()
        .expect("run tier0")
}

const SMALL: &[&str] = &[
    "sim",
    "--nodes",
    "16",
    "--datasets",
    "4",
    "--dataset-gib",
    "64",
    "--duration",
    "300",
    "--gpu-gbps",
    "4",
];

#[test]
fn sim_json_has_the_three_utilizations_and_the_parameters() {
    let output = tier0(&[SMALL, &["--json"]].concat());
    assert!(output.status.success(), "{output:?}");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let au = |key: &str| {
        report[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key}: {report}"))
    };
    for key in ["au_none", "au_tier0", "au_oracle"] {
        assert!((0.0..=1.0).contains(&au(key)), "{key}: {report}");
    }
    assert!(au("au_oracle") >= au("au_none"), "{report}");
    assert_eq!(report["params"]["nodes"], 16);
    assert_eq!(report["params"]["gpu_gbps"], 4.0);
    let runs = report["runs"].as_array().unwrap();
    let policies: Vec<&str> = runs.iter().map(|r| r["policy"].as_str().unwrap()).collect();
    assert_eq!(policies, ["none", "tier0", "oracle"]);
    assert!(runs[1]["passes"].as_u64().unwrap() > 0, "{report}");
}

#[test]
fn sim_prints_a_table_and_names_a_bad_flag() {
    let output = tier0(SMALL);
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8_lossy(&output.stdout);
    for line in ["policy", "none", "tier0", "oracle", "AU tier0 / none"] {
        assert!(text.contains(line), "{line}: {text}");
    }
    let output = tier0(&["sim", "--nic-gbps", "0"]);
    assert!(!output.status.success());
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(error.contains("--nic-gbps 0"), "{error}");
    let output = tier0(&["sim", "--job-minutes", "30"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("LOW..HIGH"));
}

#[test]
fn sim_planner_reports_its_time_and_moves() {
    let output = tier0(&[
        "sim",
        "planner",
        "--extents",
        "50000",
        "--nodes",
        "50",
        "--files",
        "100",
        "--json",
    ]);
    assert!(output.status.success(), "{output:?}");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(report["plan_seconds"].as_f64().unwrap() >= 0.0, "{report}");
    assert!(report["executable"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["params"]["extents"], 50_000);
}
