//! The control plane's records, as they are kept in the metadata store (JSON values, keys
//! below), and the layouts it hands out. Byte layouts and key scheme: `docs/formats.md`.
//!
//! - `inode/<parent id>/<name>` → [`Inode`]: the namespace is a tree of inodes keyed by their
//!   parent's id, so a rename rewrites one key, whatever is below it.
//! - `version/<file id>/<version>` → [`FileVersion`]: the chunk list a commit published.
//! - `chunk/<file id>/<index>/<generation>` → [`ChunkRecord`]: where a chunk's replicas are.
//! - `trash/<file id>/<index>/<generation>/<node>` → `{}`: a replica still to delete.
//! - `fence/<file id>` → the file's current layout version (JSON number), written with every
//!   change of it, for the data daemons to refuse reads at older ones.
//! - `node/<node id>` → [`NodeRecord`]; `snapshot/<name>` → [`Snapshot`];
//!   `counter/inode` → the last inode id handed out.
//!
//! Ids and numbers in keys are fixed-width lowercase hex, so key order is numeric order.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tier0_dataplane::store::ChunkId;

use crate::error::ControlError;

pub const ROOT_ID: u64 = 1;
pub const DEFAULT_CHUNK_SIZE: u32 = 4 << 20;
pub const DEFAULT_REPLICATION: u32 = 2;
/// Largest chunk: the data daemons' default largest frame payload.
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;
pub const MIN_CHUNK_SIZE: u32 = 4096;
pub const MAX_REPLICATION: u32 = 8;

pub fn inode_key(parent: u64, name: &str) -> String {
    format!("inode/{parent:016x}/{name}")
}

pub fn children_prefix(parent: u64) -> String {
    format!("inode/{parent:016x}/")
}

pub fn version_key(file: u64, version: u64) -> String {
    format!("version/{file:016x}/{version:016x}")
}

pub fn versions_prefix(file: u64) -> String {
    format!("version/{file:016x}/")
}

pub fn chunk_key(id: ChunkId) -> String {
    format!(
        "chunk/{:016x}/{:08x}/{:08x}",
        id.file, id.index, id.generation
    )
}

pub fn chunks_prefix(file: u64) -> String {
    format!("chunk/{file:016x}/")
}

/// The lowest layout version of a file the data daemons still serve; they learn it from
/// their heartbeats.
pub fn fence_key(file: u64) -> String {
    format!("fence/{file:016x}")
}

pub fn node_key(node: &str) -> String {
    format!("node/{node}")
}

pub fn snapshot_key(name: &str) -> String {
    format!("snapshot/{name}")
}

/// A replica of a chunk on `node` that is still to be deleted there: the chunk was collected,
/// or the replica was replaced by a copy elsewhere.
pub fn trash_key(id: ChunkId, node: &str) -> String {
    format!(
        "trash/{:016x}/{:08x}/{:08x}/{node}",
        id.file, id.index, id.generation
    )
}

pub const TRASH_PREFIX: &str = "trash/";
pub const AUDIT_PREFIX: &str = "audit/";
pub const APPROVALS_PREFIX: &str = "approval/";

/// `approval/<file:016x>`: an operator approved the file's pending moves (the next pass
/// makes them, then removes this).
pub fn approval_key(file: u64) -> String {
    format!("{APPROVALS_PREFIX}{file:016x}")
}

/// `audit/<at_ms:016x>/<seq:08x>`: one record of the rebalancer's audit log, in time order.
pub fn audit_key(at_ms: u64, seq: u32) -> String {
    format!("{AUDIT_PREFIX}{at_ms:016x}/{seq:08x}")
}

pub const AGENT_AUDIT_PREFIX: &str = "agent-audit/";

/// `agent-audit/<at_ms:016x>/<seq:08x>`: one mutating call of an agent (`tier0 mcp`), allowed
/// or refused, with its outcome, in time order.
pub fn agent_audit_key(at_ms: u64, seq: u32) -> String {
    format!("{AGENT_AUDIT_PREFIX}{at_ms:016x}/{seq:08x}")
}
pub const INODE_COUNTER_KEY: &str = "counter/inode";
pub const PLANES_PREFIX: &str = "plane/";

/// `plane/<control id>`: the URL a control plane advertised, for the others to send the data
/// nodes to while it leads.
pub fn plane_key(control_id: &str) -> String {
    format!("{PLANES_PREFIX}{control_id}")
}

pub const JOBS_PREFIX: &str = "job/";
pub const PRESTAGES_PREFIX: &str = "prestage/";
pub const REPORTED_GPUS_PREFIX: &str = "gpus/";

/// `job/<name>`: a job a scheduler declared (`Orchestration.DeclareJob`).
pub fn job_key(name: &str) -> String {
    format!("{JOBS_PREFIX}{name}")
}

/// `prestage/<path>`: the nodes a scheduler asked `path` copied to.
pub fn prestage_key(path: &str) -> String {
    format!("{PRESTAGES_PREFIX}{path}")
}

/// `gpus/<node>`: a node's GPUs as its scheduler last reported them.
pub fn reported_gpus_key(node: &str) -> String {
    format!("{REPORTED_GPUS_PREFIX}{node}")
}

pub const NODES_PREFIX: &str = "node/";
pub const SNAPSHOTS_PREFIX: &str = "snapshot/";
pub const CHUNKS_PREFIX: &str = "chunk/";
pub const VERSIONS_PREFIX: &str = "version/";
pub const INODES_PREFIX: &str = "inode/";
pub const FENCES_PREFIX: &str = "fence/";

/// How a directory's new files are laid out; a directory made without settings takes its
/// parent's, and the root has the cluster's defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutSettings {
    pub chunk_size: u32,
    pub replication: u32,
}

impl Default for LayoutSettings {
    fn default() -> Self {
        LayoutSettings {
            chunk_size: DEFAULT_CHUNK_SIZE,
            replication: DEFAULT_REPLICATION,
        }
    }
}

impl LayoutSettings {
    pub fn check(&self) -> Result<(), ControlError> {
        let chunk = self.chunk_size;
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk) || !chunk.is_power_of_two() {
            return Err(ControlError::InvalidArgument(format!(
                "chunk_size {chunk}: must be a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}"
            )));
        }
        if !(1..=MAX_REPLICATION).contains(&self.replication) {
            return Err(ControlError::InvalidArgument(format!(
                "replication {}: must be 1 to {MAX_REPLICATION}",
                self.replication
            )));
        }
        Ok(())
    }
}

/// A directory or a file: the value under `inode/<parent>/<name>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inode {
    pub id: u64,
    pub parent: u64,
    pub name: String,
    pub kind: InodeKind,
    pub tags: BTreeMap<String, String>,
    pub created_ms: u64,
    pub modified_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum InodeKind {
    Directory { settings: LayoutSettings },
    File(FileState),
}

impl Inode {
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, InodeKind::Directory { .. })
    }

    pub fn file(&self) -> Option<&FileState> {
        match &self.kind {
            InodeKind::File(state) => Some(state),
            InodeKind::Directory { .. } => None,
        }
    }
}

/// A file's current state. Version 0 is the empty file before its first commit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileState {
    /// The version readers open: the last commit, or the one a rollback restored.
    pub version: u64,
    /// The number the next commit publishes (versions are never reused, so a rollback
    /// followed by a commit cannot collide with a version a snapshot still pins).
    pub next_version: u64,
    /// Bumped by every change of what the file's layout says (a commit, a rollback, a
    /// replica moved): daemons refuse reads at an older one.
    pub layout_version: u64,
    pub size: u64,
    pub settings: LayoutSettings,
    /// The generation the next batch of placed chunks gets (chunk ids are never reused).
    pub next_generation: u32,
    /// `next_generation` when the last commit published: a chunk of an older generation that
    /// no kept version lists is garbage at once, because its writer either committed it (in
    /// a version since superseded) or started from a version that is no longer current and
    /// can never commit.
    #[serde(default)]
    pub committed_generation: u32,
}

/// One chunk of a version: chunk `index` covers `[index × chunk_size, + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionChunk {
    pub id: ChunkId,
    pub len: u32,
}

/// What one commit published: `version/<file>/<version>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileVersion {
    pub version: u64,
    pub size: u64,
    pub chunk_size: u32,
    pub committed_ms: u64,
    pub chunks: Vec<VersionChunk>,
}

/// Where a chunk lives: `chunk/<file>/<index>/<generation>`. Written when the chunk is
/// placed and changed only when its replicas move: a commit does not touch it (so a commit's
/// transaction does not grow with the file), and a chunk is *committed* exactly when some
/// version lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRecord {
    pub replicas: Vec<String>,
    /// A chunk no version lists is garbage after this: its writer had until then to commit.
    pub expires_ms: u64,
}

/// A data node's health, as membership sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Heartbeating within its lease: takes new chunks and serves reads.
    Up,
    /// Its lease expired: takes no chunks; its chunks are re-replicated.
    Down,
    /// An operator asked to empty it: serves reads, takes no new chunks, its chunks are
    /// copied elsewhere.
    Draining,
    /// Drained: no chunk of any version needs it.
    Drained,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Up => "up",
            NodeState::Down => "down",
            NodeState::Draining => "draining",
            NodeState::Drained => "drained",
        }
    }
}

/// What a data node says about itself when it registers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopologySummary {
    pub numa_nodes: u32,
    pub cores: u32,
    pub gpus: u32,
    pub rdma_devices: Vec<String>,
    pub drives: u32,
    pub capacity_bytes: u64,
    pub free_bytes: u64,
    /// Replicas of a chunk go to distinct failure domains when there are enough (a rack, a
    /// power feed); empty means the node is its own.
    pub failure_domain: String,
    /// How directly each GPU is fed (nearest drive and NIC), for placement.
    #[serde(default)]
    pub gpu_feeds: Vec<GpuFeed>,
    /// Route cost from the nearest drive to the nearest NIC ([`NO_ROUTE`] without one).
    #[serde(default = "no_route")]
    pub drive_nic_cost: u32,
}

/// The route cost of a device a node does not have: beyond any real one.
pub const NO_ROUTE: u32 = 6;

fn no_route() -> u32 {
    NO_ROUTE
}

/// One GPU of a node and its route costs (`Locality::cost`: 0 same device … 5 across
/// packages, [`NO_ROUTE`] none) to the nearest drive and NIC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuFeed {
    pub index: u32,
    pub numa_node: Option<u32>,
    pub drive_cost: u32,
    pub nic_cost: u32,
}

/// `node/<id>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    /// The data daemon's address (`host:port`).
    pub address: String,
    pub topology: TopologySummary,
    pub state: NodeState,
    pub registered_ms: u64,
    pub heartbeat_ms: u64,
    pub lease_expires_ms: u64,
}

impl NodeRecord {
    pub fn failure_domain(&self) -> &str {
        if self.topology.failure_domain.is_empty() {
            &self.id
        } else {
            &self.topology.failure_domain
        }
    }
}

/// One path a snapshot pins, relative to the snapshot's root (`""` is the root itself).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotEntry {
    pub path: String,
    pub kind: SnapshotKind,
    pub tags: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SnapshotKind {
    Directory {
        settings: LayoutSettings,
    },
    File {
        file_id: u64,
        version: u64,
        size: u64,
        settings: LayoutSettings,
    },
}

/// `snapshot/<name>`: the versions of a subtree, all read at one instant (the snapshot's
/// transaction checks every inode it read). Entries are in walk order, parents first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub name: String,
    pub path: String,
    pub created_ms: u64,
    pub entries: Vec<SnapshotEntry>,
}

/// One chunk of a layout, with the nodes holding it (nearest first is the client's choice).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayoutChunk {
    pub index: u32,
    pub id: ChunkId,
    pub len: u32,
    pub replicas: Vec<String>,
}

/// A node a layout names, and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayoutNode {
    pub id: String,
    pub address: String,
    pub state: NodeState,
    pub failure_domain: String,
}

/// What a client needs to read one version of a file without the control plane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub path: String,
    pub file_id: u64,
    pub version: u64,
    pub layout_version: u64,
    pub size: u64,
    pub chunk_size: u32,
    pub replication: u32,
    pub chunks: Vec<LayoutChunk>,
    pub nodes: Vec<LayoutNode>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    // Serialising these plain structs to JSON cannot fail (no maps with non-string keys).
    serde_json::to_vec(record).unwrap_or_default()
}

/// The newest `limit` records under `prefix` (a log keyed in time order, `audit/` or
/// `agent-audit/`), oldest first.
pub async fn newest_records<T: for<'de> Deserialize<'de>>(
    store: &dyn crate::store::MetadataStore,
    prefix: &str,
    limit: usize,
) -> Result<Vec<T>, ControlError> {
    let entries = store.scan(prefix).await?;
    let skip = entries.len().saturating_sub(limit);
    entries
        .into_iter()
        .skip(skip)
        .map(|entry| decode(&entry.key, &entry.value))
        .collect()
}

pub fn decode<T: for<'de> Deserialize<'de>>(key: &str, value: &[u8]) -> Result<T, ControlError> {
    serde_json::from_slice(value)
        .map_err(|error| ControlError::Internal(format!("metadata record {key:?}: {error}")))
}
