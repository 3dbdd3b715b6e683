//! `tier0 mcp` driven by a real MCP client (rmcp's, over the child's stdin/stdout) against a
//! real `tier0 serve control`: the read-only tools, the mutating ones only as the control
//! plane's agents policy allows (and refused there when called anyway), bad arguments as
//! tool errors, and every agent action in the agent audit log (`tier0 admin agent-actions`).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};

use rmcp::ServiceExt;
use rmcp::model::CallToolRequestParams;
use rmcp::service::{RoleClient, RunningService};
use rmcp::transport::{ConfigureCommandExt, TokioChildProcess};
use serde_json::{Value, json};
use tier0_control_api::client::ControlClient;
use tier0_control_api::proto;

const TOKEN: &str = "mcp-command-token";
const AGENT: &str = "test-agent";

const READ_ONLY: [&str; 7] = [
    "cluster",
    "explain",
    "gpus",
    "list",
    "movements",
    "snapshots",
    "stat",
];

/// A `tier0 serve control` process and the address it printed.
struct ControlProcess {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl ControlProcess {
    /// A control plane on the embedded store, with `policy` as its `--policy` file if given.
    fn start(policy: Option<&str>) -> ControlProcess {
        let dir = tempfile::tempdir().unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_tier0"));
        command
            .args(["serve", "control", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("control"));
        if let Some(policy) = policy {
            let file = dir.path().join("policy.toml");
            std::fs::write(&file, policy).unwrap();
            command.arg("--policy").arg(file);
        }
        let mut child = command
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
            _dir: dir,
        }
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

/// Runs a command that must succeed with `--json`, and parses what it printed.
fn cli_json(url: &str, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let output = tier0(url, &all);
    assert!(
        output.status.success(),
        "tier0 {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// `tier0 mcp` as a child process, with rmcp's client on its stdin and stdout.
async fn mcp(url: &str) -> RunningService<RoleClient, ()> {
    let command = tokio::process::Command::new(env!("CARGO_BIN_EXE_tier0")).configure(|cmd| {
        cmd.args(["mcp", "--control", url, "--agent-name", AGENT])
            .env("TIER0_TOKEN", TOKEN)
            .env("TIER0_LOG", "warn");
    });
    let (transport, _) = TokioChildProcess::builder(command)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start tier0 mcp");
    ().serve(transport).await.expect("MCP initialize")
}

/// The tools `tools/list` offers.
async fn tool_names(client: &RunningService<RoleClient, ()>) -> BTreeSet<String> {
    client
        .list_all_tools()
        .await
        .unwrap()
        .into_iter()
        .map(|tool| tool.name.to_string())
        .collect()
}

/// Calls a tool: whether it is a tool error, and its text.
async fn call(client: &RunningService<RoleClient, ()>, tool: &str, args: Value) -> (bool, String) {
    let Value::Object(args) = args else {
        panic!("arguments are an object")
    };
    let result = client
        .call_tool(CallToolRequestParams::new(tool.to_owned()).with_arguments(args))
        .await
        .unwrap_or_else(|error| panic!("{tool}: not a tool result: {error}"));
    let text = result
        .content
        .iter()
        .filter_map(|content| content.as_text())
        .map(|text| text.text.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    (result.is_error == Some(true), text)
}

/// A tool call that must succeed; its JSON.
async fn ok(client: &RunningService<RoleClient, ()>, tool: &str, args: Value) -> Value {
    let (is_error, text) = call(client, tool, args).await;
    assert!(!is_error, "{tool}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|error| panic!("{tool}: not JSON ({error}): {text}"))
}

/// A tool call that must be a tool error; its message.
async fn tool_error(client: &RunningService<RoleClient, ()>, tool: &str, args: Value) -> String {
    let (is_error, text) = call(client, tool, args).await;
    assert!(is_error, "{tool} should fail: {text}");
    text
}

/// The agent audit log, as `tier0 admin agent-actions --json` prints it.
fn agent_actions(url: &str) -> Vec<Value> {
    cli_json(url, &["admin", "agent-actions"])
        .as_array()
        .unwrap()
        .clone()
}

/// Two registered nodes (no daemons: metadata only), and a file of `size` bytes written the
/// way the client shim writes one: created, chunks placed, committed.
async fn write_file(url: &str, path: &str, size: u64) {
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
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_agents_policy_an_agent_reads_everything_and_changes_nothing() {
    let control = ControlProcess::start(None);
    let url = control.url.clone();
    cli_json(
        &url,
        &["mkdir", "-p", "/datasets/train", "--chunk-size", "1MiB"],
    );
    write_file(&url, "/datasets/train/shard-0", 3 << 19).await;

    let client = mcp(&url).await;
    let info = client.peer_info().expect("initialized");
    assert_eq!(info.server_info.as_ref().unwrap().name, "tier0");
    assert!(info.capabilities.tools.is_some());
    assert_eq!(
        tool_names(&client).await,
        READ_ONLY.iter().map(|t| t.to_string()).collect()
    );

    let listed = ok(&client, "list", json!({ "path": "/datasets/train" })).await;
    assert_eq!(listed["entries"][0]["path"], "/datasets/train/shard-0");
    assert_eq!(listed["entries"][0]["kind"], "file");
    assert_eq!(listed["entries"][0]["size"], 3 << 19);
    let root = ok(&client, "list", json!({ "path": "/" })).await;
    assert_eq!(root["entries"][0]["path"], "/datasets");
    assert_eq!(root["entries"][0]["kind"], "dir");
    let itself = ok(
        &client,
        "list",
        json!({ "path": "/datasets/train/shard-0" }),
    )
    .await;
    assert_eq!(itself["entries"].as_array().unwrap().len(), 1);
    assert_eq!(itself["entries"][0]["path"], "/datasets/train/shard-0");

    let stat = ok(
        &client,
        "stat",
        json!({ "path": "/datasets/train/shard-0" }),
    )
    .await;
    assert_eq!(
        (
            stat["kind"].as_str(),
            stat["size"].as_u64(),
            stat["chunk_size"].as_u64()
        ),
        (Some("file"), Some(3 << 19), Some(1 << 20))
    );
    assert_eq!(stat["versions"], json!([stat["version"]]));

    let explained = ok(
        &client,
        "explain",
        json!({ "path": "/datasets/train/shard-0" }),
    )
    .await;
    let chunks = explained["layout"]["chunks"].as_array().unwrap();
    assert_eq!(chunks.len(), 2, "{explained}");
    for chunk in chunks {
        let mut replicas: Vec<&str> = chunk["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap())
            .collect();
        replicas.sort();
        assert_eq!(replicas, ["node-a", "node-b"], "{explained}");
    }
    let homes: BTreeSet<&str> = explained["placement"]["homes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|home| home["node"].as_str().unwrap())
        .collect();
    assert_eq!(homes, BTreeSet::from(["node-a", "node-b"]));
    assert_eq!(explained["heat"]["chunks"].as_array().unwrap().len(), 2);
    assert_eq!(explained["heat"]["reads"], 0.0);

    let cluster = ok(&client, "cluster", json!({})).await;
    assert_eq!(cluster["health"]["nodes_up"], 2);
    assert_eq!(cluster["nodes"].as_array().unwrap().len(), 2);
    assert_eq!(cluster["agent_policy"]["read_only"], true);
    assert_eq!(cluster["agent"], AGENT);
    let movements = ok(&client, "movements", json!({ "limit": 10 })).await;
    assert_eq!(movements["movements"], json!([]));
    let gpus = ok(&client, "gpus", json!({})).await;
    assert_eq!(gpus["prestages"], json!([]));

    // Hidden tools can be called; the control plane refuses them, naming the policy.
    let refused = tool_error(
        &client,
        "snapshot_create",
        json!({ "name": "agent-snap", "path": "/datasets" }),
    )
    .await;
    assert!(
        refused.contains("refused by the agents policy"),
        "{refused}"
    );
    assert!(refused.contains("[agents] allow"), "{refused}");
    let refused = tool_error(
        &client,
        "prestage",
        json!({ "path": "/datasets", "nodes": ["node-a"] }),
    )
    .await;
    assert!(refused.contains("agents are read-only"), "{refused}");
    let snapshots = ok(&client, "snapshots", json!({})).await;
    assert_eq!(
        snapshots["snapshots"],
        json!([]),
        "a refused snapshot was made"
    );
    let gpus = ok(&client, "gpus", json!({})).await;
    assert_eq!(gpus["prestages"], json!([]), "a refused prestage was asked");

    // Bad arguments are tool errors that say what is wrong; the server stays up.
    let missing = tool_error(&client, "stat", json!({})).await;
    assert!(missing.contains("path"), "{missing}");
    let relative = tool_error(&client, "stat", json!({ "path": "datasets" })).await;
    assert!(relative.contains("not absolute"), "{relative}");
    let bad_node = tool_error(
        &client,
        "prestage",
        json!({ "path": "/datasets", "nodes": ["node a"] }),
    )
    .await;
    assert!(bad_node.contains("nodes[0]"), "{bad_node}");
    let absent = tool_error(&client, "explain", json!({ "path": "/datasets/nope" })).await;
    assert!(
        absent.contains("explain /datasets/nope: not found"),
        "{absent}"
    );
    let limit = tool_error(&client, "movements", json!({ "limit": 0 })).await;
    assert!(limit.contains("limit 0"), "{limit}");
    assert_eq!(
        ok(&client, "cluster", json!({})).await["health"]["nodes_up"],
        2
    );

    // Both refusals are in the agent audit log, and nothing else an agent did is.
    let log = agent_actions(&url);
    let seen: Vec<(&str, &str, &str, &str, bool)> = log
        .iter()
        .map(|a| {
            (
                a["agent"].as_str().unwrap(),
                a["rpc"].as_str().unwrap(),
                a["path"].as_str().unwrap(),
                a["outcome"].as_str().unwrap(),
                a["allowed"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (AGENT, "Snapshots.Create", "/datasets", "refused", false),
            (
                AGENT,
                "Orchestration.Prestage",
                "/datasets",
                "refused",
                false
            ),
        ]
    );
    assert!(
        log[0]["reason"]
            .as_str()
            .unwrap()
            .contains("[agents] allow")
    );

    // An operator (no agent header) is not held to the agents policy, nor audited there.
    cli_json(&url, &["snapshot", "create", "ops", "/datasets"]);
    assert_eq!(agent_actions(&url).len(), 2);
    client.cancel().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_agent_snapshots_rolls_back_and_prestages_within_its_prefixes() {
    let control = ControlProcess::start(Some(
        "[agents]\nallow = [\"prestage\", \"snapshot\", \"rollback\"]\nprefixes = [\"/datasets\"]\n",
    ));
    let url = control.url.clone();
    cli_json(&url, &["mkdir", "-p", "/datasets/train"]);
    cli_json(&url, &["mkdir", "-p", "/scratch"]);
    write_file(&url, "/datasets/train/shard-0", 4096).await;

    let client = mcp(&url).await;
    let mut all: BTreeSet<String> = READ_ONLY.iter().map(|t| t.to_string()).collect();
    all.extend(["prestage", "snapshot_create", "snapshot_rollback"].map(String::from));
    assert_eq!(tool_names(&client).await, all);
    let cluster = ok(&client, "cluster", json!({})).await;
    assert_eq!(
        cluster["agent_policy"],
        json!({ "allow": ["prestage", "snapshot", "rollback"], "prefixes": ["/datasets"], "read_only": false })
    );

    let made = ok(
        &client,
        "snapshot_create",
        json!({ "name": "before", "path": "/datasets" }),
    )
    .await;
    assert_eq!(
        (made["name"].as_str(), made["files"].as_u64()),
        (Some("before"), Some(1))
    );
    write_file(&url, "/datasets/train/shard-1", 4096).await;
    let rolled = ok(&client, "snapshot_rollback", json!({ "name": "before" })).await;
    assert_eq!(rolled["removed"], 1, "{rolled}");
    let listed = ok(&client, "list", json!({ "path": "/datasets/train" })).await;
    let names: Vec<&str> = listed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["/datasets/train/shard-0"]);

    let prestaged = ok(
        &client,
        "prestage",
        json!({ "path": "/datasets/train", "nodes": ["node-a"] }),
    )
    .await;
    assert_eq!(prestaged["prestaged"], true);
    let gpus = ok(&client, "gpus", json!({})).await;
    assert_eq!(
        gpus["prestages"],
        json!([{ "path": "/datasets/train", "nodes": ["node-a"] }])
    );

    // Outside the prefixes: refused, and nothing made.
    let outside = tool_error(
        &client,
        "snapshot_create",
        json!({ "name": "scratch", "path": "/scratch" }),
    )
    .await;
    assert!(outside.contains("[agents] prefixes"), "{outside}");
    let snapshots = ok(&client, "snapshots", json!({})).await;
    assert_eq!(snapshots["snapshots"].as_array().unwrap().len(), 1);
    // Allowed but failing: a name taken.
    let taken = tool_error(
        &client,
        "snapshot_create",
        json!({ "name": "before", "path": "/datasets/train" }),
    )
    .await;
    assert!(taken.contains("already exists"), "{taken}");

    let log = agent_actions(&url);
    let seen: Vec<(&str, &str, &str, &str, bool)> = log
        .iter()
        .map(|a| {
            (
                a["rpc"].as_str().unwrap(),
                a["action"].as_str().unwrap(),
                a["path"].as_str().unwrap(),
                a["outcome"].as_str().unwrap(),
                a["allowed"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (
                "Snapshots.Create",
                "snapshot",
                "/datasets",
                "succeeded",
                true
            ),
            (
                "Snapshots.Rollback",
                "rollback",
                "/datasets",
                "succeeded",
                true
            ),
            (
                "Orchestration.Prestage",
                "prestage",
                "/datasets/train",
                "succeeded",
                true
            ),
            ("Snapshots.Create", "snapshot", "/scratch", "refused", false),
            (
                "Snapshots.Create",
                "snapshot",
                "/datasets/train",
                "failed",
                true
            ),
        ]
    );
    assert!(log.iter().all(|a| a["agent"] == AGENT));
    assert_eq!(log[2]["detail"], "to node-a");
    assert!(
        log[4]["reason"]
            .as_str()
            .unwrap()
            .contains("already exists")
    );
    // The text form, one line per record.
    let text = tier0(&url, &["admin", "agent-actions", "--limit", "2"]);
    let text = String::from_utf8(text.stdout).unwrap();
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.lines().next().unwrap().contains("refused"), "{text}");
    client.cancel().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tools_offered_follow_the_actions_allowed_and_a_bad_agents_table_stops_the_control_plane()
 {
    let control = ControlProcess::start(Some("[agents]\nallow = [\"snapshot\"]\n"));
    let client = mcp(&control.url).await;
    let mut expected: BTreeSet<String> = READ_ONLY.iter().map(|t| t.to_string()).collect();
    expected.insert("snapshot_create".to_owned());
    assert_eq!(tool_names(&client).await, expected);
    let refused = tool_error(&client, "snapshot_rollback", json!({ "name": "nope" })).await;
    assert!(refused.contains("allows only snapshot"), "{refused}");
    client.cancel().await.unwrap();

    // Whatever the client: a marked call that changes anything but the actions allowed is
    // refused and recorded; a marked read is neither.
    let mut agent = ControlClient::connect_as_agent(
        &control.url,
        TOKEN.as_bytes(),
        tier0_control_api::client::Timeouts::default(),
        "raw-agent",
    )
    .await
    .unwrap();
    let mkdir = agent
        .namespace
        .mkdir(proto::MkdirRequest {
            path: "/made-by-agent".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(mkdir.code(), tonic::Code::PermissionDenied, "{mkdir:?}");
    assert!(mkdir.message().contains("Namespace.Mkdir"), "{mkdir:?}");
    let root = agent
        .namespace
        .list(proto::ListRequest {
            path: "/".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(root.entries.is_empty(), "{root:?}");
    let log = agent_actions(&control.url);
    let seen: Vec<(&str, &str, &str)> = log
        .iter()
        .map(|a| {
            (
                a["agent"].as_str().unwrap(),
                a["rpc"].as_str().unwrap(),
                a["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (AGENT, "Snapshots.Rollback", "refused"),
            ("raw-agent", "Namespace.Mkdir", "refused"),
        ]
    );

    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, "[agents]\nallow = [\"prestage\", \"delete\"]\n").unwrap();
    // Under `timeout`: a control plane that took the bad table would serve on and hang the
    // test instead of failing it.
    let output = Command::new("timeout")
        .arg("20")
        .arg(env!("CARGO_BIN_EXE_tier0"))
        .args(["serve", "control", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("control"))
        .arg("--policy")
        .arg(&policy)
        .env("TIER0_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert_ne!(output.status.code(), Some(124), "the bad table was taken");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("agents.allow[1] \"delete\": one of prestage, snapshot, rollback"),
        "{stderr}"
    );
}
