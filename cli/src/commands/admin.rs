//! `tier0 admin health|nodes|layout|drain|…`: the operator's view of the cluster.

use std::io::Write;

use clap::Subcommand;
use serde_json::json;
use tier0_control_api::proto;

use super::control::{ControlArgs, connect, failed, print_json, runtime, timestamp};

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// The control plane's health: store, leadership, nodes; exits 1 when degraded.
    Health {
        #[command(flatten)]
        control: ControlArgs,
    },
    /// The data nodes, their state and leases.
    Nodes {
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Where each chunk of a file is.
    Layout {
        path: String,
        /// A version still kept (default: the current one).
        #[arg(long)]
        version: Option<u64>,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// How hot each chunk of a file is: decayed reads and bytes, per node that served it, as
    /// the nodes' last heartbeats reported (half-life 10 min).
    Heat {
        path: String,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// GPUs as schedulers reported them (idle or busy, and with which job) and as NVML on
    /// the node measured them (`[utilization%]`), and the jobs declared with the paths they
    /// will read.
    Gpus {
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Where a file's data would best live for the idle GPUs that will read it: up nodes
    /// ranked by route cost from the topology distance model, next to where it is now.
    Explain {
        path: String,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Approve a file's pending moves (its policy's mode is `approve`): the next rebalancing
    /// pass makes them.
    Approve {
        path: String,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Pin a file to nodes: the rebalancer moves it only to these (sets the file's
    /// `tier0.pin` tag; `--clear` removes it).
    Pin {
        path: String,
        nodes: Vec<String>,
        #[arg(long, conflicts_with = "nodes")]
        clear: bool,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// The rebalancer's audit log: every move planned, executed, refused or failed, and why.
    Movements {
        /// The newest this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// The agent audit log: every call of an agent (`tier0 mcp`) that would change anything,
    /// allowed or refused by the agents policy, and how it ended.
    AgentActions {
        /// The newest this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Run the leader's upkeep now: re-replicate chunks off down or draining nodes, then
    /// collect versions and chunks nothing needs (on the leader only).
    Upkeep {
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Stop placing chunks on a node and move its chunks elsewhere.
    Drain {
        node: String,
        /// Put the node back in service instead.
        #[arg(long)]
        cancel: bool,
        #[command(flatten)]
        control: ControlArgs,
    },
}

use tier0_control_api::json::{
    heat as heat_json, layout as layout_json, node as node_json, node_state as state_name,
};

/// A file's heat as text: the totals, then one line per chunk with its nodes' shares.
fn print_heat(out: &mut impl Write, heat: &proto::HeatReply) -> std::io::Result<()> {
    writeln!(
        out,
        "{}  file {:x}  version {}  {:.1} reads, {:.1} MiB read (decayed, half-life 10 min)",
        heat.path,
        heat.file_id,
        heat.version,
        heat.reads,
        heat.bytes / f64::from(1 << 20)
    )?;
    for chunk in &heat.chunks {
        let nodes: Vec<String> = chunk
            .nodes
            .iter()
            .map(|node| format!("{} {:.1}", node.node_id, node.reads))
            .collect();
        writeln!(
            out,
            "  chunk {:>6}  {:>10.1} reads  {:>10.1} MiB  {}",
            chunk.index,
            chunk.reads,
            chunk.bytes / f64::from(1 << 20),
            if nodes.is_empty() {
                "cold".to_string()
            } else {
                nodes.join(", ")
            }
        )?;
    }
    Ok(())
}

/// The layout as text: one line per chunk, then the nodes it names.
pub fn print_layout(out: &mut impl Write, layout: &proto::Layout) -> std::io::Result<()> {
    writeln!(
        out,
        "{}  file {:x}  version {}  layout version {}  {} bytes in {} chunks of {} bytes, {} replicas",
        layout.path,
        layout.file_id,
        layout.version,
        layout.layout_version,
        layout.size,
        layout.chunks.len(),
        layout.chunk_size,
        layout.replication
    )?;
    for chunk in &layout.chunks {
        let id = chunk.id.unwrap_or_default();
        writeln!(
            out,
            "  chunk {:>6}  {:x}:{}@{}  {:>10} bytes  on {}",
            chunk.index,
            id.file,
            id.index,
            id.generation,
            chunk.length,
            chunk.replicas.join(", ")
        )?;
    }
    for node in &layout.nodes {
        writeln!(
            out,
            "  node {}  {}  {}",
            node.id,
            node.address,
            state_name(node.state)
        )?;
    }
    Ok(())
}

pub fn run(command: AdminCommand) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        match command {
            AdminCommand::Health { control } => {
                let mut client = connect(&control).await?;
                let health = client
                    .admin
                    .health(proto::HealthRequest {})
                    .await
                    .map_err(|s| failed("admin health", &client.url, s))?
                    .into_inner();
                if control.json {
                    print_json(&tier0_control_api::json::health(&health))?;
                } else {
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "status:   {}", health.status)?;
                    for problem in &health.problems {
                        writeln!(out, "problem:  {problem}")?;
                    }
                    writeln!(
                        out,
                        "store:    {} {}",
                        health.store, health.store_location
                    )?;
                    writeln!(
                        out,
                        "control:  {} ({}; leader: {})",
                        health.control_id,
                        if health.leader { "leads" } else { "follows" },
                        if health.leader_id.is_empty() { "none" } else { &health.leader_id }
                    )?;
                    writeln!(
                        out,
                        "nodes:    {} up, {} down, {} draining",
                        health.nodes_up, health.nodes_down, health.nodes_draining
                    )?;
                }
                if health.status != "ok" {
                    anyhow::bail!("the control plane is {}: {}", health.status, health.problems.join("; "));
                }
                Ok(())
            }
            AdminCommand::Nodes { control } => {
                let mut client = connect(&control).await?;
                let nodes = client
                    .admin
                    .nodes(proto::NodesRequest {})
                    .await
                    .map_err(|s| failed("admin nodes", &client.url, s))?
                    .into_inner()
                    .nodes;
                if control.json {
                    return print_json(&json!(nodes.iter().map(node_json).collect::<Vec<_>>()));
                }
                let mut out = std::io::stdout().lock();
                for node in &nodes {
                    let topology = node.topology.clone().unwrap_or_default();
                    writeln!(
                        out,
                        "{:<20} {:<22} {:<9} {:>16} free  heartbeat {}",
                        node.id,
                        node.address,
                        state_name(node.state),
                        topology.free_bytes,
                        timestamp(node.heartbeat_ms)
                    )?;
                }
                Ok(())
            }
            AdminCommand::Layout {
                path,
                version,
                control,
            } => {
                let mut client = connect(&control).await?;
                let layout = client
                    .admin
                    .layout(proto::LayoutRequest {
                        path: path.clone(),
                        version: version.unwrap_or(0),
                    })
                    .await
                    .map_err(|s| failed(&format!("admin layout {path}"), &client.url, s))?
                    .into_inner();
                if control.json {
                    return print_json(&layout_json(&layout));
                }
                print_layout(&mut std::io::stdout().lock(), &layout)?;
                Ok(())
            }
            AdminCommand::Heat { path, control } => {
                let mut client = connect(&control).await?;
                let heat = client
                    .admin
                    .heat(proto::HeatRequest { path: path.clone() })
                    .await
                    .map_err(|s| failed(&format!("admin heat {path}"), &client.url, s))?
                    .into_inner();
                if control.json {
                    return print_json(&heat_json(&heat));
                }
                print_heat(&mut std::io::stdout().lock(), &heat)?;
                Ok(())
            }
            AdminCommand::Approve { path, control } => {
                let mut client = connect(&control).await?;
                let reply = client
                    .admin
                    .approve(proto::ApproveRequest { path: path.clone() })
                    .await
                    .map_err(|s| failed(&format!("admin approve {path}"), &client.url, s))?
                    .into_inner();
                if control.json {
                    return print_json(&json!({ "path": path, "file_id": reply.file_id }));
                }
                println!("{path}: pending moves approved for the next pass");
                Ok(())
            }
            AdminCommand::Pin {
                path,
                nodes,
                clear,
                control,
            } => {
                if nodes.is_empty() && !clear {
                    anyhow::bail!("admin pin {path}: name the nodes, or --clear");
                }
                let mut client = connect(&control).await?;
                let (set, remove) = if clear {
                    (Default::default(), vec![tier0_control::policy::TAG_PIN.to_string()])
                } else {
                    let set = [(tier0_control::policy::TAG_PIN.to_string(), nodes.join(","))]
                        .into_iter()
                        .collect();
                    (set, Vec::new())
                };
                let reply = client
                    .namespace
                    .tag(proto::TagRequest {
                        path: path.clone(),
                        set,
                        remove,
                    })
                    .await
                    .map_err(|s| failed(&format!("admin pin {path}"), &client.url, s))?
                    .into_inner();
                if control.json {
                    let tags = reply.entry.map(|entry| entry.tags).unwrap_or_default();
                    return print_json(&json!({ "path": path, "tags": tags }));
                }
                println!(
                    "{path}: {}",
                    if clear {
                        "not pinned".to_string()
                    } else {
                        format!("pinned to {}", nodes.join(", "))
                    }
                );
                Ok(())
            }
            AdminCommand::Movements { limit, control } => {
                let mut client = connect(&control).await?;
                let log = client
                    .admin
                    .movements(proto::MovementsRequest { limit })
                    .await
                    .map_err(|s| failed("admin movements", &client.url, s))?
                    .into_inner();
                if control.json {
                    return print_json(&serde_json::Value::Array(
                        log.movements.iter().map(tier0_control_api::json::movement).collect(),
                    ));
                }
                let mut out = std::io::stdout().lock();
                for m in &log.movements {
                    let id = m.chunk.unwrap_or_default();
                    writeln!(
                        out,
                        "{}  {:<9} {:<8}  {} chunk {}  {} -> {}  {} bytes  {}",
                        timestamp(m.at_ms),
                        m.kind,
                        m.state,
                        m.path,
                        id.index,
                        if m.from_node.is_empty() { "-" } else { &m.from_node },
                        if m.to_node.is_empty() { "-" } else { &m.to_node },
                        m.bytes,
                        m.reason
                    )?;
                }
                Ok(())
            }
            AdminCommand::AgentActions { limit, control } => {
                let mut client = connect(&control).await?;
                let log = client
                    .admin
                    .agent_actions(proto::AgentActionsRequest { limit })
                    .await
                    .map_err(|s| failed("admin agent-actions", &client.url, s))?
                    .into_inner();
                if control.json {
                    return print_json(&serde_json::Value::Array(
                        log.actions.iter().map(tier0_control_api::json::agent_action).collect(),
                    ));
                }
                let mut out = std::io::stdout().lock();
                for a in &log.actions {
                    writeln!(
                        out,
                        "{}  {:<12} {:<9} {} {} {}{}",
                        timestamp(a.at_ms),
                        a.agent,
                        a.outcome,
                        a.rpc,
                        if a.path.is_empty() { "-" } else { &a.path },
                        a.detail,
                        if a.reason.is_empty() { String::new() } else { format!("  ({})", a.reason) }
                    )?;
                }
                Ok(())
            }
            AdminCommand::Gpus { control } => {
                let mut client = connect(&control).await?;
                let gpus = client
                    .orchestration
                    .gpus(proto::GpusRequest {})
                    .await
                    .map_err(|s| failed("admin gpus", &client.url, s))?
                    .into_inner();
                let gpu = tier0_control_api::json::gpu_ref;
                if control.json {
                    return print_json(&tier0_control_api::json::gpus(&gpus));
                }
                let mut out = std::io::stdout().lock();
                for node in &gpus.nodes {
                    let states: Vec<String> = node
                        .gpus
                        .iter()
                        .map(|g| {
                            let state = match (g.busy, g.job.is_empty()) {
                                (false, _) => format!("{} idle", g.index),
                                (true, true) => format!("{} busy", g.index),
                                (true, false) => format!("{} busy ({})", g.index, g.job),
                            };
                            if g.measured {
                                format!("{state} [{}%]", g.utilization_percent)
                            } else {
                                state
                            }
                        })
                        .collect();
                    writeln!(out, "node {:<16} {}", node.node_id, states.join(", "))?;
                }
                for prestage in &gpus.prestages {
                    writeln!(
                        out,
                        "prestage {} to {}",
                        prestage.path,
                        prestage.nodes.join(", ")
                    )?;
                }
                for job in &gpus.jobs {
                    let on: Vec<String> = job.gpus.iter().map(gpu).collect();
                    writeln!(
                        out,
                        "job  {:<16} reads {} on {}",
                        job.job,
                        job.paths.join(", "),
                        on.join(", ")
                    )?;
                }
                Ok(())
            }
            AdminCommand::Explain { path, control } => {
                let mut client = connect(&control).await?;
                let explained = client
                    .orchestration
                    .explain(proto::ExplainRequest { path: path.clone() })
                    .await
                    .map_err(|s| failed(&format!("admin explain {path}"), &client.url, s))?
                    .into_inner();
                if control.json {
                    return print_json(&tier0_control_api::json::explain(&explained));
                }
                let readers: Vec<String> = explained
                    .readers
                    .iter()
                    .map(tier0_control_api::json::gpu_ref)
                    .collect();
                let mut out = std::io::stdout().lock();
                writeln!(
                    out,
                    "{}  file {:x}  now on {}",
                    explained.path,
                    explained.file_id,
                    explained.current_nodes.join(", ")
                )?;
                if readers.is_empty() {
                    writeln!(out, "  no job declared to read it: every home costs the same")?;
                } else {
                    writeln!(
                        out,
                        "  read by {} on {}",
                        explained.jobs.join(", "),
                        readers.join(", ")
                    )?;
                }
                for home in &explained.homes {
                    writeln!(
                        out,
                        "  home {:<16} cost {:>6}  {} local GPUs{}",
                        home.node_id,
                        home.cost,
                        home.local_gpus,
                        if home.holds_file { "  (holds it)" } else { "" }
                    )?;
                }
                Ok(())
            }
            AdminCommand::Upkeep { control } => {
                let mut client = connect(&control).await?;
                let report = client
                    .admin
                    .run_upkeep(proto::UpkeepRequest {})
                    .await
                    .map_err(|s| failed("admin upkeep", &client.url, s))?
                    .into_inner();
                if control.json {
                    return print_json(&json!({
                        "replicas_copied": report.replicas_copied,
                        "nodes_drained": report.nodes_drained,
                        "versions_collected": report.versions_collected,
                        "chunks_collected": report.chunks_collected,
                        "replicas_deleted": report.replicas_deleted,
                        "problems": report.problems,
                    }));
                }
                println!(
                    "copied {} replicas, drained {} nodes, collected {} versions and {} chunks ({} replicas deleted)",
                    report.replicas_copied,
                    report.nodes_drained,
                    report.versions_collected,
                    report.chunks_collected,
                    report.replicas_deleted
                );
                for problem in &report.problems {
                    println!("problem: {problem}");
                }
                Ok(())
            }
            AdminCommand::Drain {
                node,
                cancel,
                control,
            } => {
                let mut client = connect(&control).await?;
                let record = client
                    .cluster
                    .drain(proto::DrainRequest {
                        node_id: node.clone(),
                        cancel,
                    })
                    .await
                    .map_err(|s| failed(&format!("admin drain {node}"), &client.url, s))?
                    .into_inner();
                if control.json {
                    return print_json(&node_json(&record));
                }
                println!("node {}: {}", record.id, state_name(record.state));
                Ok(())
            }
        }
    })
}
