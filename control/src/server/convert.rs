//! Between protobuf messages and the domain: requests are checked here, field by field, so
//! a malformed one is refused with `InvalidArgument` naming the field, and no proto type
//! reaches the namespace code.

use tier0_dataplane::store::ChunkId;
use tonic::Status;

use crate::error::ControlError;
use crate::model::{
    Inode, InodeKind, Layout, LayoutChunk, LayoutNode, NodeRecord, NodeState, SnapshotEntry,
    SnapshotKind, TopologySummary,
};
use crate::namespace::SettingsOverride;
use crate::path::NsPath;
use crate::proto;

pub fn status(error: ControlError) -> Status {
    use crate::store::StoreError;
    let message = error.to_string();
    match error {
        ControlError::InvalidArgument(_) => Status::invalid_argument(message),
        ControlError::NotFound(_) => Status::not_found(message),
        ControlError::AlreadyExists(_) => Status::already_exists(message),
        ControlError::FailedPrecondition(_) => Status::failed_precondition(message),
        ControlError::Store(StoreError::Unavailable { .. }) => Status::unavailable(message),
        ControlError::Store(StoreError::TooLarge { .. }) => Status::resource_exhausted(message),
        ControlError::Store(StoreError::Corrupt { .. }) | ControlError::Internal(_) => {
            Status::internal(message)
        }
    }
}

pub fn path(field: &str, text: &str) -> Result<NsPath, Status> {
    NsPath::parse(field, text).map_err(status)
}

pub fn settings(settings: Option<proto::LayoutSettings>) -> SettingsOverride {
    let settings = settings.unwrap_or_default();
    SettingsOverride {
        chunk_size: (settings.chunk_size != 0).then_some(settings.chunk_size),
        replication: (settings.replication != 0).then_some(settings.replication),
    }
}

pub fn chunk_id(field: &str, id: Option<proto::ChunkId>) -> Result<ChunkId, Status> {
    let id = id.ok_or_else(|| Status::invalid_argument(format!("{field}: missing chunk id")))?;
    Ok(ChunkId {
        file: id.file,
        index: id.index,
        generation: id.generation,
    })
}

pub fn proto_chunk_id(id: ChunkId) -> proto::ChunkId {
    proto::ChunkId {
        file: id.file,
        index: id.index,
        generation: id.generation,
    }
}

/// Most chunks one heartbeat may report heat for.
pub const MAX_HEAT_REPORT: usize = 4096;

/// A heartbeat's heat report: at most [`MAX_HEAT_REPORT`] chunks, each with finite,
/// non-negative counts, and a half-life when there is anything to decay.
pub fn heat_report(
    heat: Vec<proto::ExtentHeat>,
    half_life_ms: u64,
) -> Result<(std::time::Duration, Vec<(ChunkId, crate::heat::Heat)>), Status> {
    if heat.len() > MAX_HEAT_REPORT {
        return Err(Status::invalid_argument(format!(
            "heat: {} chunks, at most {MAX_HEAT_REPORT} per heartbeat",
            heat.len()
        )));
    }
    if !heat.is_empty() && half_life_ms == 0 {
        return Err(Status::invalid_argument(
            "heat_half_life_ms: 0 with heat to report",
        ));
    }
    let chunks = heat
        .into_iter()
        .enumerate()
        .map(|(index, extent)| {
            let field = format!("heat[{index}]");
            let good = |value: f64| value.is_finite() && value >= 0.0;
            if !good(extent.reads) || !good(extent.bytes) {
                return Err(Status::invalid_argument(format!(
                    "{field}: reads {} and bytes {} must be finite and not negative",
                    extent.reads, extent.bytes
                )));
            }
            let id = chunk_id(&format!("{field}.chunk"), extent.chunk)?;
            Ok((
                id,
                crate::heat::Heat {
                    reads: extent.reads,
                    bytes: extent.bytes,
                },
            ))
        })
        .collect::<Result<_, Status>>()?;
    Ok((std::time::Duration::from_millis(half_life_ms), chunks))
}

/// A file's heat, chunk by chunk, from each chunk's per-node heat.
pub fn heat_reply(
    layout: &Layout,
    chunks: Vec<Vec<(String, crate::heat::Heat)>>,
) -> proto::HeatReply {
    let mut reply = proto::HeatReply {
        path: layout.path.clone(),
        file_id: layout.file_id,
        version: layout.version,
        ..Default::default()
    };
    for (chunk, nodes) in layout.chunks.iter().zip(chunks) {
        let reads: f64 = nodes.iter().map(|(_, heat)| heat.reads).sum();
        let bytes: f64 = nodes.iter().map(|(_, heat)| heat.bytes).sum();
        reply.reads += reads;
        reply.bytes += bytes;
        reply.chunks.push(proto::ChunkHeat {
            index: chunk.index,
            id: Some(proto_chunk_id(chunk.id)),
            reads,
            bytes,
            nodes: nodes
                .into_iter()
                .map(|(node_id, heat)| proto::NodeHeat {
                    node_id,
                    reads: heat.reads,
                    bytes: heat.bytes,
                })
                .collect(),
        });
    }
    reply
}

pub fn node_state(state: NodeState) -> proto::NodeState {
    match state {
        NodeState::Up => proto::NodeState::Up,
        NodeState::Down => proto::NodeState::Down,
        NodeState::Draining => proto::NodeState::Draining,
        NodeState::Drained => proto::NodeState::Drained,
    }
}

pub fn entry(inode: &Inode) -> proto::Entry {
    let (kind, size, version, layout_version, settings) = match &inode.kind {
        InodeKind::Directory { settings } => (proto::EntryKind::Directory, 0, 0, 0, *settings),
        InodeKind::File(state) => (
            proto::EntryKind::File,
            state.size,
            state.version,
            state.layout_version,
            state.settings,
        ),
    };
    proto::Entry {
        name: inode.name.clone(),
        id: inode.id,
        kind: kind as i32,
        size,
        version,
        layout_version,
        settings: Some(proto::LayoutSettings {
            chunk_size: settings.chunk_size,
            replication: settings.replication,
        }),
        tags: inode.tags.clone().into_iter().collect(),
        created_ms: inode.created_ms,
        modified_ms: inode.modified_ms,
    }
}

pub fn layout_chunk(chunk: &LayoutChunk) -> proto::LayoutChunk {
    proto::LayoutChunk {
        index: chunk.index,
        id: Some(proto_chunk_id(chunk.id)),
        length: chunk.len,
        replicas: chunk.replicas.clone(),
    }
}

pub fn layout_node(node: &LayoutNode) -> proto::LayoutNode {
    proto::LayoutNode {
        id: node.id.clone(),
        address: node.address.clone(),
        state: node_state(node.state) as i32,
        failure_domain: node.failure_domain.clone(),
    }
}

pub fn layout(layout: &Layout) -> proto::Layout {
    proto::Layout {
        path: layout.path.clone(),
        file_id: layout.file_id,
        version: layout.version,
        layout_version: layout.layout_version,
        size: layout.size,
        chunk_size: layout.chunk_size,
        replication: layout.replication,
        chunks: layout.chunks.iter().map(layout_chunk).collect(),
        nodes: layout.nodes.iter().map(layout_node).collect(),
    }
}

pub fn topology(summary: Option<proto::TopologySummary>) -> TopologySummary {
    let summary = summary.unwrap_or_default();
    TopologySummary {
        numa_nodes: summary.numa_nodes,
        cores: summary.cores,
        gpus: summary.gpus,
        rdma_devices: summary.rdma_devices,
        drives: summary.drives,
        capacity_bytes: summary.capacity_bytes,
        free_bytes: summary.free_bytes,
        failure_domain: summary.failure_domain,
        gpu_feeds: summary
            .gpu_feeds
            .iter()
            .map(|feed| crate::model::GpuFeed {
                index: feed.index,
                numa_node: feed.has_numa_node.then_some(feed.numa_node),
                drive_cost: feed.drive_cost.min(crate::model::NO_ROUTE),
                nic_cost: feed.nic_cost.min(crate::model::NO_ROUTE),
            })
            .collect(),
        drive_nic_cost: summary.drive_nic_cost.min(crate::model::NO_ROUTE),
    }
}

pub fn node(node: &NodeRecord) -> proto::Node {
    let topology = &node.topology;
    proto::Node {
        id: node.id.clone(),
        address: node.address.clone(),
        state: node_state(node.state) as i32,
        topology: Some(proto::TopologySummary {
            numa_nodes: topology.numa_nodes,
            cores: topology.cores,
            gpus: topology.gpus,
            rdma_devices: topology.rdma_devices.clone(),
            drives: topology.drives,
            capacity_bytes: topology.capacity_bytes,
            free_bytes: topology.free_bytes,
            failure_domain: topology.failure_domain.clone(),
            gpu_feeds: topology
                .gpu_feeds
                .iter()
                .map(|feed| proto::GpuFeed {
                    index: feed.index,
                    numa_node: feed.numa_node.unwrap_or(0),
                    has_numa_node: feed.numa_node.is_some(),
                    drive_cost: feed.drive_cost,
                    nic_cost: feed.nic_cost,
                })
                .collect(),
            drive_nic_cost: topology.drive_nic_cost,
        }),
        registered_ms: node.registered_ms,
        heartbeat_ms: node.heartbeat_ms,
        lease_expires_ms: node.lease_expires_ms,
    }
}

pub fn snapshot_entry(entry: &SnapshotEntry) -> proto::SnapshotEntry {
    let tags = entry.tags.clone().into_iter().collect();
    match &entry.kind {
        SnapshotKind::Directory { .. } => proto::SnapshotEntry {
            kind: proto::EntryKind::Directory as i32,
            tags,
            ..Default::default()
        },
        SnapshotKind::File {
            file_id,
            version,
            size,
            ..
        } => proto::SnapshotEntry {
            kind: proto::EntryKind::File as i32,
            file_id: *file_id,
            version: *version,
            size: *size,
            tags,
        },
    }
}

pub fn snapshot_info(snapshot: &crate::model::Snapshot) -> proto::SnapshotInfo {
    let mut info = proto::SnapshotInfo {
        name: snapshot.name.clone(),
        path: snapshot.path.clone(),
        created_ms: snapshot.created_ms,
        ..Default::default()
    };
    for entry in &snapshot.entries {
        match entry.kind {
            SnapshotKind::Directory { .. } => info.directories += 1,
            SnapshotKind::File { size, .. } => {
                info.files += 1;
                info.bytes += size;
            }
        }
    }
    info
}
