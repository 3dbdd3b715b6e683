//! The MCP server (`tier0 mcp`): AI agents look at the namespace and the cluster, and, as far
//! as the control plane's agents policy allows, prestage, snapshot and roll back, over the
//! Model Context Protocol on stdio (rmcp).
//!
//! It is a client of the control plane's gRPC API like any other, with one difference: every
//! call carries `x-tier0-agent: NAME`. The control plane holds the calls so marked that would
//! change anything to the `[agents]` table of its `--policy` file (read-only without one)
//! and records each in its agent audit log; this server only hides the tools the policy does
//! not allow from `tools/list`. Results are JSON text (the shapes of `tier0 … --json`);
//! failures are tool errors naming the tool and the reason, never an end of the server.
//! stdout is the MCP channel: logs go to stderr.

use std::time::Duration;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CacheScope, CallToolResult, ContentBlock, ListToolsResult, PaginatedRequestParams,
    ProtocolVersion,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler, ServiceExt, tool, tool_handler, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};
use tier0_control_api::client::{ControlClient, Timeouts};
use tier0_control_api::json as render;
use tier0_control_api::proto;

/// The tools that change something, and the agent action each one is in the policy.
pub const MUTATING_TOOLS: [(&str, &str); 3] = [
    ("prestage", "prestage"),
    ("snapshot_create", "snapshot"),
    ("snapshot_rollback", "rollback"),
];

/// Where the server finds the control plane, and who it is there.
#[derive(Clone)]
pub struct Config {
    /// The control plane (`http://host:port` or `host:port`).
    pub control: String,
    pub token: Vec<u8>,
    /// The agent name every call carries (`x-tier0-agent`), as the audit log shows it.
    pub agent: String,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("control", &self.control)
            .field("token", &"<redacted>")
            .field("agent", &self.agent)
            .finish()
    }
}

/// Connects to the control plane and serves MCP on stdin/stdout until the client goes away.
pub async fn serve_stdio(config: Config) -> anyhow::Result<()> {
    let max = tier0_control::agents::MAX_AGENT_NAME;
    if !tier0_control::path::is_identifier(&config.agent, max, b"") {
        anyhow::bail!(
            "--agent-name {:?}: 1 to {max} characters of A-Z a-z 0-9 . _ -",
            config.agent
        );
    }
    let timeouts = Timeouts {
        // A rollback of a large tree does real work; an agent waits for it, not forever.
        request: Duration::from_secs(300),
        ..Timeouts::default()
    };
    let client =
        ControlClient::connect_as_agent(&config.control, &config.token, timeouts, &config.agent)
            .await?;
    tracing::info!(control = %client.url, agent = %config.agent, "MCP server on stdio");
    let running = Tier0Mcp::new(client, config.agent)
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|error| anyhow::anyhow!("MCP initialization: {error}"))?;
    let reason = running.waiting().await?;
    tracing::info!(?reason, "MCP client gone");
    Ok(())
}

/// The MCP server over one control-plane connection.
#[derive(Clone, Debug)]
pub struct Tier0Mcp {
    client: ControlClient,
    agent: String,
    tool_router: ToolRouter<Self>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct PathArgs {
    /// An absolute path in the tier0 namespace, such as `/datasets/imagenet`.
    pub path: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct MovementsArgs {
    /// The newest this many records (default 50, at most 1000).
    pub limit: Option<u32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct SnapshotsArgs {
    /// Only snapshots of paths at or below this absolute path (default: all).
    pub path: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct PrestageArgs {
    /// The absolute path (a file or a directory) to copy.
    pub path: String,
    /// The data nodes to copy it to (their ids, as `cluster` lists them). Empty: cancel the
    /// path's prestage.
    pub nodes: Vec<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct SnapshotCreateArgs {
    /// The new snapshot's name: 1 to 128 characters of A-Z a-z 0-9 . _ -
    pub name: String,
    /// The absolute path of the subtree to pin.
    pub path: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct SnapshotRollbackArgs {
    /// The snapshot to restore its subtree to.
    pub name: String,
}

type ToolReply = Result<CallToolResult, ErrorData>;

/// A tool's answer: its JSON, as text.
fn ok(value: Value) -> ToolReply {
    let text = serde_json::to_string_pretty(&value).unwrap_or_else(|_| value.to_string());
    Ok(CallToolResult::success(vec![ContentBlock::text(text)]))
}

/// A tool's failure: a tool error (`isError`) with one line that says what failed and why.
fn failure(message: String) -> ToolReply {
    tracing::debug!(%message, "tool error");
    Ok(CallToolResult::error(vec![ContentBlock::text(message)]))
}

/// A failed gRPC call as one line: the tool, what the control plane said, and where it is.
fn rpc_failed(what: &str, url: &str, status: &tonic::Status) -> String {
    let code = match status.code() {
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::NotFound => "not found",
        tonic::Code::AlreadyExists => "already exists",
        tonic::Code::FailedPrecondition => "refused",
        tonic::Code::PermissionDenied => "refused by the agents policy",
        tonic::Code::Unauthenticated => "unauthenticated",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => "timed out",
        _ => "failed",
    };
    format!("{what}: {code}: {} (control plane {url})", status.message())
}

/// Checks an argument that names a path.
fn check_path(tool: &str, field: &str, path: &str) -> Result<(), String> {
    tier0_control::path::NsPath::parse(field, path)
        .map(|_| ())
        .map_err(|error| format!("{tool}: {error}"))
}

/// Runs one gRPC call of a tool, turning a failure into the tool's error line.
macro_rules! call {
    ($self:ident, $what:expr, |$client:ident| $call:expr) => {{
        let mut $client = $self.client.clone();
        match $call.await {
            Ok(reply) => reply.into_inner(),
            Err(status) => return failure(rpc_failed(&$what, &$self.client.url, &status)),
        }
    }};
}

fn child_path(dir: &str, name: &str) -> String {
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

#[tool_router]
impl Tier0Mcp {
    pub fn new(client: ControlClient, agent: String) -> Tier0Mcp {
        Tier0Mcp {
            client,
            agent,
            tool_router: Self::tool_router(),
        }
    }

    #[tool(
        description = "List a directory of the tier0 namespace: each entry's path, kind (dir or file), size, version, chunk size, replication and tags. A file lists as itself.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn list(&self, Parameters(args): Parameters<PathArgs>) -> ToolReply {
        let what = format!("list {}", args.path);
        if let Err(error) = check_path("list", "path", &args.path) {
            return failure(error);
        }
        let stat = call!(self, what, |client| client.namespace.stat(
            proto::StatRequest {
                path: args.path.clone()
            }
        ));
        let entry = stat.entry.unwrap_or_default();
        if entry.kind != proto::EntryKind::Directory as i32 {
            return ok(
                json!({ "path": stat.path, "entries": [render::entry(&stat.path, &entry)] }),
            );
        }
        let listed = call!(self, what, |client| client.namespace.list(
            proto::ListRequest {
                path: args.path.clone()
            }
        ));
        let entries: Vec<Value> = listed
            .entries
            .iter()
            .map(|e| render::entry(&child_path(&listed.path, &e.name), e))
            .collect();
        ok(json!({ "path": listed.path, "entries": entries }))
    }

    #[tool(
        description = "A path's metadata: kind, size, current version and the versions kept, chunk size, replication, tags, times.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn stat(&self, Parameters(args): Parameters<PathArgs>) -> ToolReply {
        if let Err(error) = check_path("stat", "path", &args.path) {
            return failure(error);
        }
        let reply = call!(self, format!("stat {}", args.path), |client| client
            .namespace
            .stat(proto::StatRequest {
                path: args.path.clone()
            }));
        ok(render::stat(&reply))
    }

    #[tool(
        description = "Explain a file's placement: the up data nodes ranked as its home for the idle GPUs of the jobs that will read it (cheapest route first, and whether each holds it), where every chunk's replicas are now, and how hot each chunk is (decayed reads and bytes per node).",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn explain(&self, Parameters(args): Parameters<PathArgs>) -> ToolReply {
        if let Err(error) = check_path("explain", "path", &args.path) {
            return failure(error);
        }
        let what = format!("explain {}", args.path);
        let path = args.path.clone();
        let placement = call!(self, what, |client| client
            .orchestration
            .explain(proto::ExplainRequest { path: path.clone() }));
        let layout = call!(self, what, |client| client.admin.layout(
            proto::LayoutRequest {
                path: path.clone(),
                version: 0
            }
        ));
        let heat = call!(self, what, |client| client
            .admin
            .heat(proto::HeatRequest { path: path.clone() }));
        ok(json!({
            "path": placement.path,
            "placement": render::explain(&placement),
            "layout": render::layout(&layout),
            "heat": render::heat(&heat),
        }))
    }

    #[tool(
        description = "The cluster: the control plane's health (store, leadership, problems), every data node with its state, lease, capacity and topology, and what the agents policy lets agents change.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn cluster(&self) -> ToolReply {
        let health = call!(self, "cluster", |client| client
            .admin
            .health(proto::HealthRequest {}));
        let nodes = call!(self, "cluster", |client| client
            .admin
            .nodes(proto::NodesRequest {}));
        let policy = call!(self, "cluster", |client| client
            .admin
            .agent_policy(proto::AgentPolicyRequest {}));
        ok(json!({
            "health": render::health(&health),
            "nodes": nodes.nodes.iter().map(render::node).collect::<Vec<_>>(),
            "agent_policy": render::agent_policy(&policy),
            "agent": self.agent,
        }))
    }

    #[tool(
        description = "GPU state as schedulers report it (idle or busy, with which job), the jobs declared with the paths they will read and their GPUs, and the paths asked prestaged to nodes.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn gpus(&self) -> ToolReply {
        let gpus = call!(self, "gpus", |client| client
            .orchestration
            .gpus(proto::GpusRequest {}));
        ok(render::gpus(&gpus))
    }

    #[tool(
        description = "Recent data movements: the rebalancer's audit log, oldest first (each move planned, executed, refused or failed, which chunk of which file, from and to which node, and why).",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn movements(&self, Parameters(args): Parameters<MovementsArgs>) -> ToolReply {
        let limit = match args.limit {
            None => 50,
            Some(limit @ 1..=1000) => limit,
            Some(limit) => return failure(format!("movements: limit {limit}: 1 to 1000")),
        };
        let log = call!(self, "movements", |client| client
            .admin
            .movements(proto::MovementsRequest { limit }));
        ok(json!({
            "movements": log.movements.iter().map(render::movement).collect::<Vec<_>>(),
        }))
    }

    #[tool(
        description = "The snapshots (of paths at or below `path`, if given): name, path, when made, files, directories and bytes pinned.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn snapshots(&self, Parameters(args): Parameters<SnapshotsArgs>) -> ToolReply {
        let path = args.path.unwrap_or_default();
        if !path.is_empty()
            && let Err(error) = check_path("snapshots", "path", &path)
        {
            return failure(error);
        }
        let list = call!(self, "snapshots", |client| client
            .snapshots
            .list(proto::ListSnapshotsRequest { path: path.clone() }));
        ok(json!({
            "snapshots": list.snapshots.iter().map(render::snapshot).collect::<Vec<_>>(),
        }))
    }

    #[tool(
        description = "Prestage a path (file or directory) to data nodes before a job reads it: the rebalancer copies every chunk there within its budget and the path's policy. Empty `nodes` cancels the path's prestage. Allowed only when the agents policy allows `prestage` (and the path is within its prefixes); every call is audited.",
        annotations(
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn prestage(&self, Parameters(args): Parameters<PrestageArgs>) -> ToolReply {
        if let Err(error) = check_path("prestage", "path", &args.path) {
            return failure(error);
        }
        for (index, node) in args.nodes.iter().enumerate() {
            if let Err(error) = tier0_control::membership::check_node_id(node) {
                return failure(format!("prestage: nodes[{index}]: {error}"));
            }
        }
        let what = format!("prestage {}", args.path);
        call!(self, what, |client| client.orchestration.prestage(
            proto::PrestageRequest {
                path: args.path.clone(),
                nodes: args.nodes.clone(),
            }
        ));
        ok(json!({
            "path": args.path,
            "nodes": args.nodes,
            "prestaged": !args.nodes.is_empty(),
            "cancelled": args.nodes.is_empty(),
        }))
    }

    #[tool(
        description = "Create a snapshot: pin the current versions of everything at and below `path` as `name` (no data is copied). Allowed only when the agents policy allows `snapshot` (and the path is within its prefixes); every call is audited.",
        annotations(
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false,
            open_world_hint = false
        )
    )]
    async fn snapshot_create(&self, Parameters(args): Parameters<SnapshotCreateArgs>) -> ToolReply {
        if let Err(error) = check_path("snapshot_create", "path", &args.path) {
            return failure(error);
        }
        if let Err(error) = tier0_control::snapshot::check_snapshot_name("name", &args.name) {
            return failure(format!("snapshot_create: {error}"));
        }
        let what = format!("snapshot_create {} {}", args.name, args.path);
        let info = call!(self, what, |client| client.snapshots.create(
            proto::CreateSnapshotRequest {
                name: args.name.clone(),
                path: args.path.clone(),
            }
        ));
        ok(render::snapshot(&info))
    }

    #[tool(
        description = "Roll back a snapshot's subtree to the versions it pinned, in one transaction: files changed since are restored, files made since are removed. Allowed only when the agents policy allows `rollback` (and the snapshot's path is within its prefixes); every call is audited.",
        annotations(
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn snapshot_rollback(
        &self,
        Parameters(args): Parameters<SnapshotRollbackArgs>,
    ) -> ToolReply {
        if let Err(error) = tier0_control::snapshot::check_snapshot_name("name", &args.name) {
            return failure(format!("snapshot_rollback: {error}"));
        }
        let what = format!("snapshot_rollback {}", args.name);
        let report = call!(self, what, |client| client.snapshots.rollback(
            proto::RollbackRequest {
                name: args.name.clone()
            }
        ));
        ok(render::rollback(&args.name, &report))
    }
}

impl Tier0Mcp {
    /// The mutating tools the control plane's agents policy allows now (none when it cannot
    /// be asked: the server then offers only what reads).
    async fn allowed_mutations(&self) -> Vec<&'static str> {
        let mut client = self.client.clone();
        match client
            .admin
            .agent_policy(proto::AgentPolicyRequest {})
            .await
        {
            Ok(reply) => {
                let allow = reply.into_inner().allow;
                MUTATING_TOOLS
                    .iter()
                    .filter(|(_, action)| allow.iter().any(|a| a == action))
                    .map(|(tool, _)| *tool)
                    .collect()
            }
            Err(status) => {
                tracing::warn!(
                    "{}: listing only the read-only tools",
                    rpc_failed("agent policy", &self.client.url, &status)
                );
                Vec::new()
            }
        }
    }
}

#[tool_handler(
    router = self.tool_router,
    name = "tier0",
    instructions = "tier0: the NVMe drives of GPU servers as one namespace. Read-only tools list and stat paths, explain a file's placement and heat, and show the cluster, GPUs, data movements and snapshots. prestage, snapshot_create and snapshot_rollback appear only when the control plane's agents policy allows them; each such call is audited there."
)]
impl ServerHandler for Tier0Mcp {
    /// Every read-only tool, and the mutating ones the agents policy allows, asked anew on
    /// each listing. A hidden tool can still be called: the control plane refuses it (and
    /// audits the refusal).
    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let allowed = self.allowed_mutations().await;
        let tools = self
            .tool_router
            .list_all()
            .into_iter()
            .filter(|tool| {
                !MUTATING_TOOLS.iter().any(|(name, _)| *name == tool.name)
                    || allowed.contains(&tool.name.as_ref())
            })
            .collect();
        let mut result = ListToolsResult::with_all_items(tools);
        if context
            .protocol_version()
            .is_some_and(|version| version >= ProtocolVersion::V_2026_07_28)
        {
            // The list follows the policy: not to be cached.
            result.ttl_ms = Some(0);
            result.cache_scope = Some(CacheScope::Public);
        }
        Ok(result)
    }
}
