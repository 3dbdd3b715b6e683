//! Builds `tests/abi.c` with `cc` against the libtier0 cargo just built (flags from the
//! crate's pkg-config file, rendered for the build folder) and runs it against a real
//! cluster on loopback (3 data daemons and a control plane, in this process): once plainly,
//! once under valgrind (`--error-exitcode=1 --leak-check=full`, with
//! `tests/valgrind.supp`: one allocation of Rust's standard library, per thread), and once more linked
//! statically (only that it loads and runs).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tier0_control::server::{ControlConfig, ControlServer, StoreChoice};
use tier0_control_api::agent::{Agent, AgentConfig};
use tier0_control_api::client::ControlClient;
use tier0_control_api::proto;
use tier0_dataplane::worker::PollMode;
use tier0_perf::cluster::{ClusterConfig, LocalCluster};

const NODES: usize = 3;
const CHUNK: u32 = 64 << 10;

/// The folder holding the libtier0 this test was built with: cargo builds the library (all
/// its crate types) before the tests that depend on it, into `deps/` beside the test binary,
/// and copies it one folder up.
fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    for dir in [deps, deps.parent().unwrap()] {
        if dir.join("libtier0.so").is_file() && dir.join("libtier0.a").is_file() {
            return dir.to_path_buf();
        }
    }
    panic!(
        "libtier0.so and libtier0.a are not beside {} nor one folder up",
        exe.display()
    );
}

/// `tier0.pc.in` rendered for the build folder into `dir`.
fn pkg_config_dir(dir: &Path, libdir: &Path) -> PathBuf {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let template = std::fs::read_to_string(crate_dir.join("tier0.pc.in")).unwrap();
    let pc = template
        .replace("@PREFIX@", &libdir.display().to_string())
        .replace("@LIBDIR@", &libdir.display().to_string())
        .replace(
            "@INCLUDEDIR@",
            &crate_dir.join("include").display().to_string(),
        )
        .replace("@VERSION@", env!("CARGO_PKG_VERSION"));
    std::fs::write(dir.join("tier0.pc"), pc).unwrap();
    dir.to_path_buf()
}

fn pkg_config(pc_dir: &Path, args: &[&str]) -> Vec<String> {
    let output = Command::new("pkg-config")
        .args(args)
        .arg("tier0")
        .env("PKG_CONFIG_PATH", pc_dir)
        .output()
        .expect("pkg-config runs (scripts/setup installs it)");
    assert!(output.status.success(), "pkg-config {args:?}: {output:?}");
    String::from_utf8(output.stdout)
        .unwrap()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn compile(out: &Path, flags: &[String], extra: &[&str]) {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/abi.c");
    let output = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-g", "-O1", "-o"])
        .arg(out)
        .arg(&source)
        .args(flags)
        .args(extra)
        .output()
        .expect("cc runs");
    assert!(
        output.status.success(),
        "cc {}: {}",
        source.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn show(what: &str, output: &Output) -> String {
    format!(
        "{what}: {}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

struct Cluster {
    _agents: Vec<Agent>,
    _control: ControlServer,
    _daemons: LocalCluster,
    url: String,
    token: String,
    _dir: tempfile::TempDir,
}

async fn start_cluster() -> Cluster {
    let daemons = tokio::task::spawn_blocking(|| {
        let mut config = ClusterConfig::for_tests(NODES, CHUNK);
        // Two cores run the daemons, the C program and valgrind: workers that sleep.
        config.poll_mode = PollMode::Interrupt;
        LocalCluster::start(&config)
    })
    .await
    .unwrap()
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = String::from_utf8(daemons.token().to_vec()).unwrap();
    let mut config = ControlConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        token.clone().into_bytes(),
        StoreChoice::Redb(dir.path().join("metadata.redb")),
    );
    config.node_lease = Duration::from_secs(10);
    config.upkeep_interval = Duration::from_secs(3600);
    config.defaults.chunk_size = CHUNK;
    let control = ControlServer::start(config).await.unwrap();
    let url = format!("http://{}", control.local_addr());
    let mut agents = Vec::new();
    for index in 0..NODES {
        let fences = Arc::clone(daemons.fences(index).unwrap());
        agents.push(
            Agent::spawn(AgentConfig {
                control: vec![url.clone()],
                token: token.clone().into_bytes(),
                node_id: format!("d{index}"),
                address: daemons.addr(index).to_string(),
                topology: proto::TopologySummary::default(),
                interval: Some(Duration::from_millis(500)),
                fences: Box::new(move |pairs| fences.raise_all(pairs.iter().copied())),
                free_bytes: Box::new(|| 0),
                heat: Box::new(tier0_control_api::agent::HeatReport::none),
                gpus: Box::new(|| None),
            })
            .unwrap(),
        );
    }
    let client = ControlClient::connect(&url, token.as_bytes())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut admin = client.admin.clone();
        let nodes = admin
            .nodes(proto::NodesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes;
        let up = nodes
            .iter()
            .filter(|n| n.state == proto::NodeState::Up as i32)
            .count();
        if up == NODES {
            break;
        }
        assert!(Instant::now() < deadline, "{up} of {NODES} nodes up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Cluster {
        _agents: agents,
        _control: control,
        _daemons: daemons,
        url,
        token,
        _dir: dir,
    }
}

#[test]
fn c_programs_against_a_cluster() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let cluster = runtime.block_on(start_cluster());
    let libdir = library_dir();
    let work = tempfile::tempdir().unwrap();
    let pc_dir = pkg_config_dir(work.path(), &libdir);

    // Shared: the flags a user gets from pkg-config.
    let shared = work.path().join("abi");
    let flags = pkg_config(&pc_dir, &["--cflags", "--libs"]);
    let rpath = format!("-Wl,-rpath,{}", libdir.display());
    compile(&shared, &flags, &[&rpath]);

    let run = |program: &mut Command, dir: &str| {
        program
            // cargo puts target/debug ahead in the tests' LD_LIBRARY_PATH, where an older
            // libtier0.so from a `cargo build` may lie: this test's own comes first.
            .env("LD_LIBRARY_PATH", &libdir)
            .env("TIER0_CONTROL", &cluster.url)
            .env("TIER0_TOKEN", &cluster.token)
            .env("TIER0_TEST_DIR", dir)
            .output()
            .unwrap()
    };

    let started = Instant::now();
    let plain = run(&mut Command::new(&shared), "/c-abi");
    assert!(plain.status.success(), "{}", show("abi", &plain));
    eprintln!(
        "abi: {} ({:.1} s)",
        String::from_utf8_lossy(&plain.stdout).trim(),
        started.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    let valgrind = run(
        Command::new("valgrind")
            .args([
                "--error-exitcode=1",
                "--leak-check=full",
                "--quiet",
                "--trace-children=no",
            ])
            .arg(format!(
                "--suppressions={}",
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/valgrind.supp")
                    .display()
            ))
            .arg(&shared),
        "/c-abi-valgrind",
    );
    assert!(
        valgrind.status.success(),
        "{}",
        show(
            "valgrind abi (is valgrind installed? scripts/setup)",
            &valgrind
        )
    );
    eprintln!(
        "abi under valgrind: {} ({:.1} s)",
        String::from_utf8_lossy(&valgrind.stdout).trim(),
        started.elapsed().as_secs_f64()
    );

    // Static: the flags pkg-config gives for a static link, with the static library named
    // (the shared one sits beside it and would win for -ltier0).
    let static_exe = work.path().join("abi-static");
    let mut flags: Vec<String> = pkg_config(&pc_dir, &["--static", "--cflags", "--libs"])
        .into_iter()
        .filter(|flag| flag != "-ltier0")
        .collect();
    // After the source and before the libraries it needs.
    flags.insert(0, libdir.join("libtier0.a").display().to_string());
    compile(&static_exe, &flags, &[]);
    let smoke = Command::new(&static_exe)
        .arg("--smoke")
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    assert!(
        smoke.status.success(),
        "{}",
        show("abi-static --smoke", &smoke)
    );
    let ldd = Command::new("ldd").arg(&static_exe).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&ldd.stdout).contains("libtier0.so"),
        "the static build links libtier0.so: {}",
        String::from_utf8_lossy(&ldd.stdout)
    );
}
