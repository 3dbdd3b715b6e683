//! `tier0 mount`'s bad arguments: each a clear one-line error before anything is mounted.
//! (The mount itself needs root and /dev/fuse: `hwtests/tests/fuse_mount.rs`.)

use std::process::Command;

fn fails(args: &[&str], env: &[(&str, &str)]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_tier0"))
        .arg("mount")
        .args(args)
        .env_remove("TIER0_TOKEN")
        .env_remove("TIER0_CONTROL")
        .envs(env.iter().copied())
        .output()
        .expect("run tier0");
    assert!(!output.status.success(), "tier0 mount {args:?} should fail");
    String::from_utf8_lossy(&output.stderr).trim().to_owned()
}

#[test]
fn bad_mount_arguments_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let error = fails(&[missing.to_str().unwrap()], &[("TIER0_TOKEN", "t")]);
    assert!(
        error.contains("mount point") && error.contains("No such file"),
        "{error}"
    );

    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let error = fails(&[file.to_str().unwrap()], &[("TIER0_TOKEN", "t")]);
    assert!(error.contains("not a directory"), "{error}");

    let mnt = dir.path().to_str().unwrap();
    let error = fails(&[mnt], &[]);
    assert!(error.contains("no cluster token"), "{error}");

    let error = fails(
        &[mnt, "--control", "http://127.0.0.1:1"],
        &[("TIER0_TOKEN", "t")],
    );
    assert!(error.contains("127.0.0.1:1"), "{error}");
    assert_eq!(error.lines().count(), 1, "{error}");
}
