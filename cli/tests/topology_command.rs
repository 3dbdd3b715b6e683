//! `tier0 topology` as a user runs it: the real binary, its JSON and its errors.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn tier0(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tier0"))
        .args(args)
        .output()
        .expect("run tier0")
}

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../topology/tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

fn json(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "tier0 failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("stdout is one JSON object")
}

#[test]
fn dgx2_json_reports_two_numa_nodes_and_sixteen_gpus_split_eight_eight() {
    let report = json(&tier0(&[
        "topology",
        "--xml",
        &fixture("nvidiaDGX2.xml"),
        "--json",
    ]));
    let nodes = report["numa_nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2);
    for node in nodes {
        assert!(node["os_index"].is_u64());
        assert!(!node["cpus"].as_array().unwrap().is_empty());
        assert!(node["memory_bytes"].as_u64().unwrap() > 0);
    }
    let gpus = report["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 16);
    let on = |node: u64| gpus.iter().filter(|gpu| gpu["numa_node"] == node).count();
    assert_eq!((on(0), on(1)), (8, 8));
    assert!(gpus.iter().all(|gpu| gpu["pci_address"].is_string()));
    assert!(report["rdma_devices"].is_array());
    assert!(report["block_devices"].is_array());
    assert_eq!(
        report["worker_plan"]["numa_nodes"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn device_entries_carry_name_pci_address_and_numa_node() {
    let report = json(&tier0(&[
        "topology",
        "--xml",
        &fixture("32em64t-2n8c2t-pci-normalio.xml"),
        "--json",
    ]));
    let mlx = &report["rdma_devices"][0];
    assert_eq!(mlx["name"], "mlx5_0");
    assert_eq!(mlx["pci_address"], "0000:04:00.0");
    assert_eq!(mlx["numa_node"], 1);
    let sda = &report["block_devices"][0];
    assert_eq!(sda["name"], "sda");
    assert_eq!(sda["pci_address"], "0000:00:1f.2");
    assert_eq!(sda["numa_node"], 0);
}

#[test]
fn workers_per_node_option_shapes_the_plan() {
    let report = json(&tier0(&[
        "topology",
        "--xml",
        &fixture("32em64t-2n8c2t-pci-normalio.xml"),
        "--json",
        "--workers-per-node",
        "1",
    ]));
    for node in report["worker_plan"]["numa_nodes"].as_array().unwrap() {
        assert_eq!(node["worker_cpus"].as_array().unwrap().len(), 1);
    }
    let refused = tier0(&["topology", "--workers-per-node", "0"]);
    assert!(!refused.status.success());
}

#[test]
fn text_report_names_devices_and_the_plan() {
    let output = tier0(&["topology", "--xml", &fixture("nvidiaDGX2.xml")]);
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("2 NUMA nodes, 16 GPUs"), "{text}");
    assert!(text.contains("Tesla V100-SXM3-32GB-H (nvml0)"), "{text}");
    assert!(
        text.contains("worker plan: 4 workers on 2 NUMA nodes"),
        "{text}"
    );
}

#[test]
fn live_machine_works() {
    let report = json(&tier0(&["topology", "--json"]));
    assert!(!report["numa_nodes"].as_array().unwrap().is_empty());
    assert_eq!(report["source"], "live");
    assert!(tier0(&["topology"]).status.success());
}

#[test]
fn missing_or_malformed_files_are_one_clear_line_and_a_failure() {
    let dir = std::env::temp_dir().join(format!("tier0-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let garbage = dir.join("garbage.xml");
    std::fs::write(&garbage, "<topology version=\"2.0\"><object").unwrap();
    let missing = dir.join("missing.xml");
    for path in [&missing, &garbage] {
        let path = path.display().to_string();
        let output = tier0(&["topology", "--xml", &path, "--json"]);
        assert_eq!(output.status.code(), Some(1), "{path}");
        assert!(output.stdout.is_empty(), "nothing on stdout for {path}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with("tier0: error: "), "{stderr}");
        assert!(stderr.contains(&path), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
