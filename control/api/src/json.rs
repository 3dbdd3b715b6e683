//! The control plane's replies as JSON, the one shape both `tier0 … --json` and the MCP
//! server (`tier0 mcp`) print.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::proto;

/// A node state's name: up, down, draining, drained (unknown for a value this build lacks).
pub fn node_state(state: i32) -> &'static str {
    match proto::NodeState::try_from(state) {
        Ok(proto::NodeState::Up) => "up",
        Ok(proto::NodeState::Down) => "down",
        Ok(proto::NodeState::Draining) => "draining",
        Ok(proto::NodeState::Drained) => "drained",
        _ => "unknown",
    }
}

/// `dir` or `file`.
pub fn entry_kind(entry: &proto::Entry) -> &'static str {
    if entry.kind == proto::EntryKind::Directory as i32 {
        "dir"
    } else {
        "file"
    }
}

/// A namespace entry at `path`.
pub fn entry(path: &str, entry: &proto::Entry) -> Value {
    let settings = entry.settings.unwrap_or_default();
    json!({
        "path": path,
        "name": entry.name,
        "id": entry.id,
        "kind": entry_kind(entry),
        "size": entry.size,
        "version": entry.version,
        "layout_version": entry.layout_version,
        "chunk_size": settings.chunk_size,
        "replication": settings.replication,
        "tags": entry.tags.iter().collect::<BTreeMap<_, _>>(),
        "created_ms": entry.created_ms,
        "modified_ms": entry.modified_ms,
    })
}

/// A `Stat` reply: the entry and the versions kept.
pub fn stat(reply: &proto::StatReply) -> Value {
    let mut value = entry(&reply.path, &reply.entry.clone().unwrap_or_default());
    value["versions"] = json!(reply.versions);
    value
}

fn chunk_id(id: Option<proto::ChunkId>) -> Value {
    let id = id.unwrap_or_default();
    json!({ "file": id.file, "index": id.index, "generation": id.generation })
}

/// A data node and its topology summary.
pub fn node(node: &proto::Node) -> Value {
    let topology = node.topology.clone().unwrap_or_default();
    json!({
        "id": node.id,
        "address": node.address,
        "state": node_state(node.state),
        "failure_domain": topology.failure_domain,
        "numa_nodes": topology.numa_nodes,
        "cores": topology.cores,
        "gpus": topology.gpus,
        "rdma_devices": topology.rdma_devices,
        "drives": topology.drives,
        "capacity_bytes": topology.capacity_bytes,
        "free_bytes": topology.free_bytes,
        "registered_ms": node.registered_ms,
        "heartbeat_ms": node.heartbeat_ms,
        "lease_expires_ms": node.lease_expires_ms,
    })
}

/// A file's layout: every chunk and its replicas, and the nodes they name.
pub fn layout(layout: &proto::Layout) -> Value {
    json!({
        "path": layout.path,
        "file_id": layout.file_id,
        "version": layout.version,
        "layout_version": layout.layout_version,
        "size": layout.size,
        "chunk_size": layout.chunk_size,
        "replication": layout.replication,
        "chunks": layout.chunks.iter().map(|chunk| json!({
            "index": chunk.index,
            "id": chunk_id(chunk.id),
            "length": chunk.length,
            "replicas": chunk.replicas,
        })).collect::<Vec<_>>(),
        "nodes": layout.nodes.iter().map(|node| json!({
            "id": node.id, "address": node.address, "state": node_state(node.state),
        })).collect::<Vec<_>>(),
    })
}

/// How hot a file's chunks are, per node.
pub fn heat(heat: &proto::HeatReply) -> Value {
    json!({
        "path": heat.path,
        "file_id": heat.file_id,
        "version": heat.version,
        "reads": heat.reads,
        "bytes": heat.bytes,
        "chunks": heat.chunks.iter().map(|chunk| json!({
            "index": chunk.index,
            "id": chunk_id(chunk.id),
            "reads": chunk.reads,
            "bytes": chunk.bytes,
            "nodes": chunk.nodes.iter().map(|node| json!({
                "node": node.node_id, "reads": node.reads, "bytes": node.bytes,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// The control plane's health.
pub fn health(health: &proto::HealthReply) -> Value {
    json!({
        "status": health.status,
        "problems": health.problems,
        "store": health.store,
        "store_location": health.store_location,
        "control_id": health.control_id,
        "leader": health.leader,
        "leader_id": health.leader_id,
        "nodes_up": health.nodes_up,
        "nodes_down": health.nodes_down,
        "nodes_draining": health.nodes_draining,
        "version": health.version,
    })
}

/// One record of the rebalancer's audit log.
pub fn movement(m: &proto::Movement) -> Value {
    json!({
        "at_ms": m.at_ms, "path": m.path, "file_id": m.file_id, "chunk": chunk_id(m.chunk),
        "bytes": m.bytes, "from": m.from_node, "to": m.to_node,
        "state": m.state, "reason": m.reason, "policy": m.policy, "kind": m.kind,
    })
}

/// `NODE/INDEX`.
pub fn gpu_ref(gpu: &proto::GpuRef) -> String {
    format!("{}/{}", gpu.node_id, gpu.index)
}

/// GPUs as reported (and measured), jobs declared, prestages asked.
pub fn gpus(gpus: &proto::GpusReply) -> Value {
    json!({
        "nodes": gpus.nodes.iter().map(|node| json!({
            "node": node.node_id,
            "reported_ms": node.reported_ms,
            "gpus": node.gpus.iter().map(|g| json!({
                "index": g.index, "busy": g.busy, "job": g.job,
                "measured": g.measured.then(|| json!({
                    "utilization_percent": g.utilization_percent,
                    "compute_processes": g.compute_processes,
                    "memory_used_bytes": g.memory_used_bytes,
                })),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "jobs": gpus.jobs.iter().map(|job| json!({
            "job": job.job,
            "paths": job.paths,
            "gpus": job.gpus.iter().map(gpu_ref).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "prestages": gpus.prestages.iter().map(|p| json!({
            "path": p.path, "nodes": p.nodes,
        })).collect::<Vec<_>>(),
    })
}

/// Where a file's data would best live for its readers, next to where it is.
pub fn explain(explained: &proto::ExplainReply) -> Value {
    json!({
        "path": explained.path,
        "file_id": explained.file_id,
        "jobs": explained.jobs,
        "readers": explained.readers.iter().map(gpu_ref).collect::<Vec<_>>(),
        "current_nodes": explained.current_nodes,
        "homes": explained.homes.iter().map(|home| json!({
            "node": home.node_id,
            "cost": home.cost,
            "local_gpus": home.local_gpus,
            "holds_file": home.holds_file,
        })).collect::<Vec<_>>(),
    })
}

/// A snapshot.
pub fn snapshot(info: &proto::SnapshotInfo) -> Value {
    json!({
        "name": info.name,
        "path": info.path,
        "created_ms": info.created_ms,
        "files": info.files,
        "directories": info.directories,
        "bytes": info.bytes,
    })
}

/// One record of the agent audit log.
pub fn agent_action(a: &proto::AgentAction) -> Value {
    json!({
        "at_ms": a.at_ms, "agent": a.agent, "rpc": a.rpc, "action": a.action, "path": a.path,
        "detail": a.detail, "outcome": a.outcome, "allowed": a.outcome != "refused",
        "reason": a.reason,
    })
}

/// What agents may change.
pub fn agent_policy(policy: &proto::AgentPolicyReply) -> Value {
    json!({
        "allow": policy.allow,
        "prefixes": if policy.prefixes.is_empty() { vec!["/".to_owned()] } else { policy.prefixes.clone() },
        "read_only": policy.allow.is_empty(),
    })
}

/// What a rollback to snapshot `name` did.
pub fn rollback(name: &str, report: &proto::RollbackReply) -> Value {
    json!({
        "name": name,
        "restored": report.restored,
        "removed": report.removed,
        "unchanged": report.unchanged,
    })
}
