//! `tier0 cluster up|down`, `tier0 put|get` and `tier0 quickstart` as a user runs them: real
//! processes on loopback, trees copied in and out byte for byte, clear errors, nothing left
//! running.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn tier0(env: &[(String, String)], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tier0"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("TIER0_LOG", "warn")
        .output()
        .expect("run tier0")
}

fn ok(env: &[(String, String)], args: &[&str]) -> String {
    let output = tier0(env, args);
    assert!(
        output.status.success(),
        "tier0 {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn fails(env: &[(String, String)], args: &[&str]) -> String {
    let output = tier0(env, args);
    assert!(!output.status.success(), "tier0 {args:?} should fail");
    String::from_utf8_lossy(&output.stderr).trim().to_owned()
}

/// Every file below `dir`, relative, with its bytes.
fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(at) = stack.pop() {
        for entry in std::fs::read_dir(&at).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            } else {
                let relative = entry
                    .path()
                    .strip_prefix(dir)
                    .unwrap()
                    .display()
                    .to_string();
                files.push((relative, std::fs::read(entry.path()).unwrap()));
            }
        }
    }
    files.sort();
    files
}

fn alive(pid: u64) -> bool {
    // A zombie (exited, not yet reaped by init) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| !stat.contains(") Z "))
        .unwrap_or(false)
}

#[test]
fn a_cluster_comes_up_takes_a_tree_gives_it_back_and_goes_down() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = dir.path().join("cluster");
    let cluster_arg = cluster.to_str().unwrap();
    let up = ok(
        &[],
        &[
            "cluster",
            "up",
            "--nodes",
            "3",
            "--dir",
            cluster_arg,
            "--store-size",
            "128MiB",
            "--chunk-size",
            "256KiB",
        ],
    );
    // `eval "$(tier0 cluster up …)"`: two export lines.
    let env: Vec<(String, String)> = up
        .lines()
        .map(|line| {
            let (key, value) = line
                .strip_prefix("export ")
                .unwrap()
                .split_once('=')
                .unwrap();
            (key.to_owned(), value.to_owned())
        })
        .collect();
    let keys: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["TIER0_CONTROL", "TIER0_TOKEN"]);
    let state: Value =
        serde_json::from_slice(&std::fs::read(cluster.join("cluster.json")).unwrap()).unwrap();
    let pids: Vec<u64> = state["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(pids.len(), 4, "a control plane and 3 daemons");
    let again = fails(&env, &["cluster", "up", "--dir", cluster_arg]);
    assert!(again.contains("already holds a cluster"), "{again}");

    // A tree with nested directories, an empty file and a file of many chunks.
    let local = dir.path().join("local");
    std::fs::create_dir_all(local.join("a/b")).unwrap();
    std::fs::write(local.join("top.txt"), b"hello tier0\n").unwrap();
    std::fs::write(local.join("a/empty"), b"").unwrap();
    let mut big = vec![0u8; (5 << 18) + 123];
    fastrand::Rng::with_seed(5).fill(&mut big);
    std::fs::write(local.join("a/b/big.bin"), &big).unwrap();
    let put: Value = serde_json::from_str(&ok(
        &env,
        &["put", local.to_str().unwrap(), "/in", "--json", "--quiet"],
    ))
    .unwrap();
    assert_eq!(
        (put["files"].as_u64(), put["bytes"].as_u64()),
        (Some(3), Some(12 + big.len() as u64))
    );
    let listed: Value = serde_json::from_str(&ok(&env, &["ls", "/in/a/b", "--json"])).unwrap();
    assert_eq!(listed[0]["size"], big.len() as u64);

    let back = dir.path().join("back");
    ok(&env, &["get", "/in", back.to_str().unwrap(), "--quiet"]);
    assert_eq!(
        tree(&back),
        tree(&local),
        "the tree comes back byte for byte"
    );
    // The daemons counted those reads and their heartbeats carried them to the control plane.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let heat: Value =
            serde_json::from_str(&ok(&env, &["admin", "heat", "/in/a/b/big.bin", "--json"]))
                .unwrap();
        let chunks = heat["chunks"].as_array().unwrap();
        if chunks
            .iter()
            .all(|chunk| chunk["reads"].as_f64().unwrap() > 0.9)
        {
            assert!(
                heat["bytes"].as_f64().unwrap() > 0.99 * big.len() as f64,
                "{heat}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no heat reported: {heat}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // A single file into an existing directory keeps its name, both ways.
    ok(&env, &["mkdir", "/single"]);
    ok(
        &env,
        &[
            "put",
            local.join("top.txt").to_str().unwrap(),
            "/single",
            "--quiet",
        ],
    );
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    ok(
        &env,
        &["get", "/single/top.txt", out.to_str().unwrap(), "--quiet"],
    );
    assert_eq!(
        std::fs::read(out.join("top.txt")).unwrap(),
        b"hello tier0\n"
    );

    let missing = fails(&env, &["put", "/no/such/local/file", "/x"]);
    assert!(missing.contains("/no/such/local/file"), "{missing}");
    let absent = fails(&env, &["get", "/not/there", out.to_str().unwrap()]);
    assert!(absent.contains("not found"), "{absent}");
    assert!(
        !out.join("there").exists(),
        "a failed get leaves nothing behind"
    );

    ok(&[], &["cluster", "down", "--dir", cluster_arg]);
    for pid in pids {
        assert!(!alive(pid), "process {pid} still runs after cluster down");
    }
    let down_again = fails(&[], &["cluster", "down", "--dir", cluster_arg]);
    assert!(down_again.contains("no running cluster"), "{down_again}");
}

#[test]
fn quickstart_verifies_every_byte_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("qs");
    let output = ok(
        &[],
        &[
            "quickstart",
            "--files",
            "6",
            "--file-size",
            "3MiB",
            "--dir",
            work.to_str().unwrap(),
        ],
    );
    assert!(
        output.contains("verified: 6 files, 18874368 bytes"),
        "{output}"
    );
    assert!(output.contains("plain local file read"), "{output}");
    assert!(output.contains("chunk      2"), "shows a layout: {output}");
    assert!(output.contains("quickstart passed"), "{output}");
    // With the Python package installed (scripts/setup), through the Python shim too.
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_tier0")).parent().unwrap();
    let library = [
        bin_dir.join("libtier0.so"),
        bin_dir.join("deps/libtier0.so"),
    ]
    .into_iter()
    .find(|p| p.exists());
    let python = library.is_some_and(|library| {
        Command::new("python3")
            .args(["-c", "import tier0, numpy"])
            .env("TIER0_LIB", library)
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if python {
        assert!(
            output.contains("Python shim (numpy, zero copy)"),
            "{output}"
        );
    } else {
        assert!(output.contains("Python shim: skipped"), "{output}");
    }
    // As root with /dev/fuse (CI), the files are read back through the FUSE mount too.
    // SAFETY: geteuid has no preconditions.
    let can_mount = std::path::Path::new("/dev/fuse").exists() && unsafe { libc::geteuid() } == 0;
    if can_mount {
        assert!(output.contains("FUSE mount (tier0 mount"), "{output}");
        assert!(output.contains("6 files verified, every byte"), "{output}");
    } else {
        assert!(output.contains("FUSE mount: skipped"), "{output}");
    }
    assert!(
        !work.join("cluster").exists(),
        "the cluster's directory is removed"
    );
    assert!(!work.join("dataset").exists(), "the dataset is removed");
}
