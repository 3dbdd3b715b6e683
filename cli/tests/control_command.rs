//! `tier0 serve control` and the namespace, snapshot and admin commands as an operator runs
//! them: real processes, the embedded store and a real etcd, `--json` and clear errors, a
//! control plane killed with SIGKILL that loses nothing, a leader's death handed over, and
//! data daemons that heartbeat, also across the death of the control plane they talk to.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tier0_control::testing::EtcdServer;
use tier0_control_api::client::ControlClient;
use tier0_control_api::proto;

const TOKEN: &str = "control-command-token";

/// A `tier0 serve control` process and the address it printed.
struct ControlProcess {
    child: Child,
    url: String,
}

impl ControlProcess {
    fn start(store_args: &[&str], id: &str) -> ControlProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tier0"))
            .args(["serve", "control", "--listen", "127.0.0.1:0", "--id", id])
            .args(["--leader-ttl", "1s", "--node-lease", "2s"])
            .args(store_args)
            .env("TIER0_TOKEN", TOKEN)
            .env("TIER0_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tier0 serve control");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .rsplit(' ')
            .next()
            .filter(|addr| addr.contains(':'))
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_owned();
        ControlProcess {
            child,
            url: format!("http://{addr}"),
        }
    }

    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for ControlProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tier0(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tier0"))
        .args(args)
        .env("TIER0_CONTROL", url)
        .env("TIER0_TOKEN", TOKEN)
        .env("TIER0_LOG", "warn")
        .output()
        .expect("run tier0")
}

/// `admin health --json`, which exits 1 while the cluster is degraded (as it is while a
/// leader hands over) but prints its report either way.
fn health_report(url: &str) -> Value {
    let output = tier0(url, &["admin", "health", "--json"]);
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "admin health printed no report ({error}): {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// Runs a command that must succeed with `--json`, and parses what it printed.
fn json(url: &str, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let output = tier0(url, &all);
    assert!(
        output.status.success(),
        "tier0 {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "tier0 {args:?}: not JSON ({error}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// Runs a command that must fail, and returns its one-line error.
fn fails(url: &str, args: &[&str]) -> String {
    let output = tier0(url, args);
    assert!(!output.status.success(), "tier0 {args:?} should fail");
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    stderr
}

/// Writes a file through the gRPC API (metadata only: two registered nodes, placed and
/// committed chunks), as the client shim will.
async fn write_file(url: &str, path: &str, size: u64) -> proto::Layout {
    let mut client = ControlClient::connect(url, TOKEN.as_bytes()).await.unwrap();
    for node in ["node-a", "node-b"] {
        client
            .cluster
            .register(proto::RegisterRequest {
                node_id: node.to_owned(),
                address: "127.0.0.1:7400".to_owned(),
                topology: None,
            })
            .await
            .unwrap();
    }
    let entry = client
        .namespace
        .create(proto::CreateRequest {
            path: path.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    let chunk_size = entry.settings.unwrap().chunk_size as u64;
    let placed = client
        .namespace
        .place_chunks(proto::PlaceChunksRequest {
            path: path.to_owned(),
            file_id: entry.id,
            first_index: 0,
            count: size.div_ceil(chunk_size) as u32,
        })
        .await
        .unwrap()
        .into_inner();
    let chunks = placed
        .chunks
        .iter()
        .map(|chunk| proto::CommitChunk {
            index: chunk.index,
            id: chunk.id,
            length: (size - chunk.index as u64 * chunk_size).min(chunk_size) as u32,
        })
        .collect();
    client
        .namespace
        .commit(proto::CommitRequest {
            path: path.to_owned(),
            file_id: entry.id,
            base_version: entry.version,
            size,
            chunks,
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_round_trip_on_the_embedded_store_and_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("control");
    let data_dir = data_dir.to_str().unwrap();
    let mut control = ControlProcess::start(&["--data-dir", data_dir], "solo");
    let url = control.url.clone();

    let made = json(
        &url,
        &["mkdir", "-p", "/datasets/web", "--chunk-size", "1MiB"],
    );
    assert_eq!(
        (made["kind"].as_str(), made["chunk_size"].as_u64()),
        (Some("dir"), Some(1 << 20))
    );
    assert!(fails(&url, &["mkdir", "/datasets/web"]).contains("already exists"));
    let layout = write_file(&url, "/datasets/web/shard-0", 3 << 19).await;

    let listed = json(&url, &["ls", "/datasets/web"]);
    assert_eq!(listed[0]["path"], "/datasets/web/shard-0");
    assert_eq!(listed[0]["size"], 3 << 19);
    // A directory holding one file of its own name lists that file below it; the file
    // lists as itself.
    json(&url, &["mkdir", "-p", "/echo/y"]);
    let inner = write_file(&url, "/echo/y/y", 10).await;
    let listed = json(&url, &["ls", "/echo/y"]);
    assert_eq!(
        (listed[0]["path"].as_str(), listed[0]["id"].as_u64()),
        (Some("/echo/y/y"), Some(inner.file_id)),
        "{listed}"
    );
    let listed = json(&url, &["ls", "/echo/y/y"]);
    assert_eq!(listed[0]["path"], "/echo/y/y", "{listed}");
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let stat = json(&url, &["stat", "/datasets/web/shard-0"]);
    assert_eq!(stat["versions"], serde_json::json!([1]));
    let shown = json(&url, &["admin", "layout", "/datasets/web/shard-0"]);
    assert_eq!(shown["chunks"].as_array().unwrap().len(), 2);
    assert_eq!(shown["file_id"], layout.file_id);
    let text = tier0(&url, &["admin", "layout", "/datasets/web/shard-0"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("chunk      1"));
    // No daemon has served it: every chunk is cold.
    let heat = json(&url, &["admin", "heat", "/datasets/web/shard-0"]);
    assert_eq!(heat["chunks"].as_array().unwrap().len(), 2, "{heat}");
    assert_eq!(heat["reads"], 0.0, "{heat}");
    let text = tier0(&url, &["admin", "heat", "/datasets/web/shard-0"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("cold"));
    // Manual overrides: pin sets the file's tier0.pin tag, approve names the file.
    let pinned = json(&url, &["admin", "pin", "/datasets/web/shard-0", "n1", "n2"]);
    assert_eq!(pinned["tags"]["tier0.pin"], "n1,n2", "{pinned}");
    let approved = json(&url, &["admin", "approve", "/datasets/web/shard-0"]);
    assert_eq!(approved["file_id"], layout.file_id);
    let unpinned = json(&url, &["admin", "pin", "/datasets/web/shard-0", "--clear"]);
    assert!(unpinned["tags"].get("tier0.pin").is_none(), "{unpinned}");
    let nothing = tier0(&url, &["admin", "pin", "/datasets/web/shard-0"]);
    assert!(!nothing.status.success());
    assert!(String::from_utf8_lossy(&nothing.stderr).contains("name the nodes"));
    // No job declared: the rebalancer has moved nothing.
    assert_eq!(json(&url, &["admin", "movements"]), serde_json::json!([]));
    // No scheduler has reported: no GPUs, no jobs, and every home costs the same.
    let gpus = json(&url, &["admin", "gpus"]);
    assert_eq!(gpus["jobs"], serde_json::json!([]), "{gpus}");
    let explained = json(&url, &["admin", "explain", "/datasets/web/shard-0"]);
    assert_eq!(explained["readers"], serde_json::json!([]), "{explained}");
    assert!(
        explained["homes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|home| home["cost"] == 0),
        "{explained}"
    );

    let tags = json(&url, &["tag", "/datasets/web", "owner=vision", "tier=hot"]);
    assert_eq!(tags["tags"]["owner"], "vision");
    let tags = json(&url, &["tag", "/datasets/web", "tier-"]);
    assert_eq!(tags["tags"], serde_json::json!({"owner": "vision"}));

    let snap = json(&url, &["snapshot", "create", "nightly", "/datasets"]);
    assert_eq!(
        (snap["files"].as_u64(), snap["bytes"].as_u64()),
        (Some(1), Some(3 << 19))
    );
    json(
        &url,
        &["mv", "/datasets/web/shard-0", "/datasets/web/shard-00"],
    );
    let diff = json(&url, &["snapshot", "diff", "nightly"]);
    let changes: Vec<(&str, &str)> = diff
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["path"].as_str().unwrap(), e["change"].as_str().unwrap()))
        .collect();
    assert_eq!(
        changes,
        [
            ("/datasets/web/shard-0", "removed"),
            ("/datasets/web/shard-00", "added")
        ]
    );
    let rolled = json(&url, &["snapshot", "rollback", "nightly"]);
    assert_eq!(
        (rolled["restored"].as_u64(), rolled["removed"].as_u64()),
        (Some(1), Some(0))
    );
    assert!(
        json(&url, &["snapshot", "diff", "nightly"])
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        json(&url, &["snapshot", "list"]).as_array().unwrap().len(),
        1
    );

    let nodes = json(&url, &["admin", "nodes"]);
    assert_eq!(nodes.as_array().unwrap().len(), 2);
    let drained = json(&url, &["admin", "drain", "node-a"]);
    assert_eq!(drained["state"], "draining");
    let health = json(&url, &["admin", "health"]);
    assert_eq!(
        (health["store"].as_str(), health["leader"].as_bool()),
        (Some("redb"), Some(true))
    );

    // SIGKILL: nothing committed is lost, and the restarted plane serves the same layout.
    let before = json(&url, &["admin", "layout", "/datasets/web/shard-0"]);
    control.kill();
    let control = ControlProcess::start(&["--data-dir", data_dir], "solo");
    assert_eq!(
        json(&control.url, &["admin", "layout", "/datasets/web/shard-0"]),
        before
    );
    assert_eq!(
        json(&control.url, &["snapshot", "list"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        json(&control.url, &["tag", "/datasets/web"])["tags"],
        serde_json::json!({"owner": "vision"})
    );
    // The embedded store belongs to one control plane: a second one on it is refused.
    let second = Command::new(env!("CARGO_BIN_EXE_tier0"))
        .args([
            "serve",
            "control",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data_dir,
        ])
        .env("TIER0_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("metadata.redb"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_killing_the_leader_hands_over_and_loses_nothing() {
    let etcd = EtcdServer::start().await.unwrap();
    let meta = format!(
        "etcd://{}/cluster-a",
        etcd.endpoint().trim_start_matches("http://")
    );
    let mut first = ControlProcess::start(&["--meta", &meta], "cp-1");
    let second = ControlProcess::start(&["--meta", &meta], "cp-2");
    json(&first.url, &["mkdir", "-p", "/shared/ckpt"]);
    let layout = write_file(&second.url, "/shared/ckpt/step-100", 5000).await;
    // Both planes serve the same namespace; exactly one leads.
    assert_eq!(
        json(&first.url, &["admin", "layout", "/shared/ckpt/step-100"])["file_id"],
        layout.file_id
    );
    let wait_for_leader = |url: &str| {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let health = health_report(url);
            if !health["leader_id"].as_str().unwrap_or_default().is_empty() {
                return health;
            }
            assert!(Instant::now() < deadline, "no leader: {health}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let health = wait_for_leader(&first.url);
    let leader = health["leader_id"].as_str().unwrap().to_owned();
    assert!(["cp-1", "cp-2"].contains(&leader.as_str()), "{health}");
    assert_eq!(json(&second.url, &["admin", "health"])["leader_id"], leader);
    let (mut dead, survivor) = if leader == "cp-1" {
        (first, second)
    } else {
        (second, first)
    };
    dead.kill();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let health = health_report(&survivor.url);
        if health["leader"] == true {
            assert_ne!(health["leader_id"], leader);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the survivor never took over: {health}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        json(&survivor.url, &["admin", "layout", "/shared/ckpt/step-100"])["file_id"],
        layout.file_id
    );
    drop(survivor);
    // And a control plane killed while etcd keeps the data starts again on it.
    first = ControlProcess::start(&["--meta", &meta], "cp-3");
    assert_eq!(
        json(&first.url, &["stat", "/shared/ckpt/step-100"])["size"],
        5000
    );
}

#[test]
fn bad_input_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let control = ControlProcess::start(&["--data-dir", data_dir], "errors");
    let url = &control.url;
    let error = fails(url, &["ls", "relative/path"]);
    assert!(
        error.contains("invalid argument") && error.contains("not absolute"),
        "{error}"
    );
    let error = fails(url, &["stat", "/missing"]);
    assert!(
        error.contains("not found") && error.contains("/missing"),
        "{error}"
    );
    let error = fails(url, &["rm", "/"]);
    assert!(error.contains("root"), "{error}");
    let error = fails(url, &["tag", "/", "no-equals-sign"]);
    assert!(error.contains("KEY=VALUE"), "{error}");
    let error = fails(url, &["snapshot", "rollback", "nope"]);
    assert!(error.contains("no such snapshot"), "{error}");
    let error = fails(url, &["admin", "drain", "ghost"]);
    assert!(error.contains("no such node"), "{error}");

    let wrong_token = Command::new(env!("CARGO_BIN_EXE_tier0"))
        .args(["ls", "/"])
        .env("TIER0_CONTROL", url)
        .env("TIER0_TOKEN", "wrong")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&wrong_token.stderr).contains("unauthenticated"));
    let no_token = Command::new(env!("CARGO_BIN_EXE_tier0"))
        .args(["ls", "/"])
        .env("TIER0_CONTROL", url)
        .env_remove("TIER0_TOKEN")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&no_token.stderr).contains("no cluster token"));
    let nobody = fails("http://127.0.0.1:1", &["ls", "/"]);
    assert!(nobody.contains("cannot connect"), "{nobody}");
    let bad_meta = Command::new(env!("CARGO_BIN_EXE_tier0"))
        .args(["serve", "control", "--meta", "zookeeper://x:1"])
        .env("TIER0_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(!bad_meta.status.success());
    assert!(String::from_utf8_lossy(&bad_meta.stderr).contains("etcd://"));
    // Nothing any refused command asked for exists.
    assert!(json(url, &["ls", "/"]).as_array().unwrap().is_empty());
}

/// A `tier0 serve data` process with one small store file, killed if a test fails.
struct DataProcess {
    child: Child,
}

impl DataProcess {
    fn start(node: &str, store: &std::path::Path, extra: &[&str]) -> DataProcess {
        let child = Command::new(env!("CARGO_BIN_EXE_tier0"))
            .args(["serve", "data", "--listen", "127.0.0.1:0", "--node", node])
            .args(["--store-size", "64MiB", "--chunk-size", "1MiB", "--no-pin"])
            .args(["--workers-per-node", "1", "--buffers", "8"])
            .args(extra)
            .arg("--store")
            .arg(store)
            .env("TIER0_TOKEN", TOKEN)
            .env("TIER0_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start tier0 serve data");
        DataProcess { child }
    }

    /// SIGTERM, and a clean exit.
    fn stop(mut self) {
        // SAFETY: kill sends a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert!(self.child.wait().unwrap().success());
    }
}

impl Drop for DataProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The node `id` as `tier0 admin nodes` lists it, if it does.
fn node(url: &str, id: &str) -> Option<Value> {
    json(url, &["admin", "nodes"])
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == id)
        .cloned()
}

/// Waits (up to 15 s) until the node `id` is in `wanted` state.
fn wait_for_node(url: &str, id: &str, wanted: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let found = node(url, id);
        if let Some(node) = &found
            && node["state"] == wanted
        {
            return node.clone();
        }
        assert!(Instant::now() < deadline, "{id} never {wanted}: {found:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Checks, without waiting for it: the node `id` is up, and still heartbeating (its last
/// heartbeat moves on within a second).
fn assert_heartbeating(url: &str, id: &str) {
    let first = node(url, id).unwrap_or_else(|| panic!("{id} is not registered"));
    assert_eq!(first["state"], "up", "{first}");
    std::thread::sleep(Duration::from_secs(1));
    let second = node(url, id).unwrap();
    assert_eq!(second["state"], "up", "{second}");
    let beat = |node: &Value| node["heartbeat_ms"].as_u64().unwrap();
    assert!(
        beat(&second) > beat(&first),
        "{id} stopped heartbeating: {first} then {second}"
    );
}

/// `tier0 serve data --control` registers the daemon and keeps it up by heartbeats; once it
/// stops, its lease runs out and it is marked down.
#[test]
fn a_data_daemon_registers_and_heartbeats() {
    let dir = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(&["--data-dir", dir.path().to_str().unwrap()], "cp");
    let daemon = DataProcess::start(
        "dn-1",
        &dir.path().join("store"),
        &[
            "--heartbeat",
            "200ms",
            "--failure-domain",
            "rack-7",
            "--control",
            &control.url,
        ],
    );
    let node = wait_for_node(&control.url, "dn-1", "up");
    assert_eq!(node["failure_domain"], "rack-7");
    assert_eq!(node["drives"], 1);
    assert!(node["capacity_bytes"].as_u64().unwrap() > 0);
    assert!(node["address"].as_str().unwrap().starts_with("127.0.0.1:"));
    // Heartbeats keep it up past its 2 s lease.
    std::thread::sleep(Duration::from_millis(2500));
    assert_heartbeating(&control.url, "dn-1");
    daemon.stop();
    wait_for_node(&control.url, "dn-1", "down");
}

/// A data daemon given two control planes (on one etcd) keeps heartbeating when the one it
/// talks to is SIGKILLed: it moves to the other, and stays up past its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_daemon_moves_to_another_control_plane_when_its_own_dies() {
    let etcd = EtcdServer::start().await.unwrap();
    let meta = format!(
        "etcd://{}/cluster-ha",
        etcd.endpoint().trim_start_matches("http://")
    );
    let mut first = ControlProcess::start(&["--meta", &meta], "cp-1");
    let second = ControlProcess::start(&["--meta", &meta], "cp-2");
    let dir = tempfile::tempdir().unwrap();
    let controls = format!("{},{}", first.url, second.url);
    let daemon = DataProcess::start(
        "dn-ha",
        &dir.path().join("store"),
        &["--heartbeat", "300ms", "--control", &controls],
    );
    wait_for_node(&second.url, "dn-ha", "up");
    assert_heartbeating(&first.url, "dn-ha");
    first.kill();
    // Past its 2 s lease since the first plane died, and still up by its heartbeats.
    std::thread::sleep(Duration::from_secs(3));
    assert_heartbeating(&second.url, "dn-ha");
    assert_eq!(
        json(&second.url, &["admin", "health"])["nodes_down"],
        0,
        "nothing went down"
    );
    daemon.stop();
    drop(second);
}
