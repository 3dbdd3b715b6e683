//! The rebalancer: replicates hot chunks to the node nearest the idle GPUs that will read
//! them, within a bandwidth budget, and records every move it plans, makes or refuses in the
//! audit log.
//!
//! A pass (on the leader, after upkeep) looks at every file a declared job will read. The
//! best home is the first of `orchestration::rank_homes` for the file's readers; each chunk
//! of the file that the best home does not hold, and that is hot (its reads, summed over the
//! nodes that served it, at least `min_reads`), is a move: copy a replica to the best home
//! (through the data plane; chunks are immutable and a daemon acknowledges a write only once
//! all of it is stored, so no replica is named before it is whole), then add the home to the
//! chunk's replicas in one transaction checked against the record's revision, then bump the
//! file's layout version so clients refresh. A move that would take the last hour's bytes
//! past the budget is refused; in dry-run mode moves are only planned.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::heat::HeatTable;
use crate::model::{self, ChunkRecord, Layout, NodeRecord};
use crate::orchestration::{GpuTable, rank_homes};
use crate::store::{Check, MetadataStore, Outcome, Txn};
use crate::upkeep::Upkeep;

/// Whether the rebalancer moves data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Plan and execute.
    #[default]
    Auto,
    /// Plan only: every move is recorded as planned, nothing is copied.
    DryRun,
    /// Plan, and execute a file's moves once an operator approved them
    /// (`tier0 admin approve PATH`).
    Approve,
    /// Nothing at all.
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        match text {
            "auto" => Ok(Mode::Auto),
            "dry-run" => Ok(Mode::DryRun),
            "approve" => Ok(Mode::Approve),
            "off" => Ok(Mode::Off),
            other => Err(format!(
                "rebalance mode {other:?}: auto, dry-run, approve or off"
            )),
        }
    }
}

/// The rebalancer's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct RebalanceConfig {
    pub mode: Mode,
    /// Bytes copied per rolling hour at most.
    pub max_bytes_per_hour: u64,
    /// A chunk is hot with at least this many (decayed) reads.
    pub min_reads: f64,
    /// Rules by path prefix or tag (`--policy FILE`).
    pub policies: crate::policy::Policies,
    /// A node with more than this share of its capacity used sheds surplus cold replicas.
    pub high_watermark: f64,
}

impl Default for RebalanceConfig {
    fn default() -> Self {
        RebalanceConfig {
            mode: Mode::Auto,
            max_bytes_per_hour: 64 << 30,
            min_reads: 1.0,
            policies: crate::policy::Policies::default(),
            high_watermark: 0.9,
        }
    }
}

/// What became of a move.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MoveState {
    /// Planned, not made (dry-run).
    Planned,
    /// Copied and published in the layout.
    Executed,
    /// Not made, by rule (the budget).
    Refused,
    /// Tried and failed (a copy error, a record that changed meanwhile).
    Failed,
}

/// One record of the audit log (`audit/…`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Movement {
    pub at_ms: u64,
    pub path: String,
    pub file_id: u64,
    pub chunk: tier0_dataplane::store::ChunkId,
    pub bytes: u64,
    /// The replica copied from (empty when none was chosen).
    pub from: String,
    pub to: String,
    pub state: MoveState,
    /// Why it was planned, and why it was refused or failed.
    pub reason: String,
    /// The policy rule that applied (`defaults`, `policy[N]`, `+ tags …`).
    #[serde(default)]
    pub policy: String,
    /// What the move does.
    #[serde(default)]
    pub kind: MoveKind,
}

/// A replica added toward readers, or a surplus one dropped from a node over its watermark.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MoveKind {
    #[default]
    Replicate,
    Drop,
}

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RebalanceReport {
    pub planned: u64,
    pub executed: u64,
    pub refused: u64,
    pub failed: u64,
    pub bytes_moved: u64,
}

const HOUR: Duration = Duration::from_secs(3600);

/// One rebalancing pass over the files declared jobs will read (`layouts`, each with its
/// chunks' heat summed over nodes), with `nodes` as membership sees them.
pub async fn run(
    config: &RebalanceConfig,
    store: &dyn MetadataStore,
    upkeep: &Upkeep,
    gpus: &GpuTable,
    heat: &HeatTable,
    files: &[(Layout, BTreeMap<String, String>)],
    nodes: &[NodeRecord],
) -> Result<RebalanceReport> {
    let mut report = RebalanceReport::default();
    if config.mode == Mode::Off && config.policies == crate::policy::Policies::default() {
        return Ok(report);
    }
    let now = model::now_ms();
    // One read of the log: the last hour's bytes (the budgets) and the last decision on
    // each move (logged again only when it changes).
    let since = now.saturating_sub(HOUR.as_millis() as u64);
    let mut spent = 0u64;
    let mut spent_by_policy: HashMap<String, u64> = HashMap::new();
    let mut decisions = Decisions::default();
    for movement in movements(store, AUDIT_WINDOW).await? {
        if movement.state == MoveState::Executed && movement.at_ms >= since {
            spent += movement.bytes;
            *spent_by_policy.entry(movement.policy.clone()).or_default() += movement.bytes;
        }
        decisions
            .last
            .insert(Decisions::key(&movement), movement.state);
    }
    let mut moved_files = HashSet::new();
    let mut approvals_used = Vec::new();
    for (layout, tags) in files {
        let policy = config.policies.effective(&layout.path, tags, config);
        if policy.mode == Mode::Off {
            continue;
        }
        let (readers, jobs) = gpus.readers_of(&layout.path);
        let homes = rank_homes(nodes, &readers);
        let allowed = |node: &str| policy.pin.is_empty() || policy.pin.iter().any(|p| p == node);
        // Where the file's chunks should be: the best allowed home for its readers (hot
        // chunks only), and every node a scheduler asked it prestaged to (all chunks).
        let mut targets: Vec<(String, Option<u64>)> = Vec::new();
        if !readers.is_empty()
            && let Some(best) = homes.iter().find(|home| allowed(&home.node))
        {
            targets.push((best.node.clone(), Some(best.cost)));
        }
        for node in gpus.prestaged_to(&layout.path) {
            let up = nodes
                .iter()
                .any(|n| n.id == node && n.state == model::NodeState::Up);
            if up && allowed(&node) && !targets.iter().any(|(t, _)| *t == node) {
                targets.push((node, None));
            }
        }
        if targets.is_empty() {
            continue;
        }
        let approved = policy.mode == Mode::Approve
            && store
                .get(&model::approval_key(layout.file_id))
                .await?
                .is_some();
        for (target, cost) in &targets {
            for chunk in &layout.chunks {
                if chunk.replicas.contains(target) || chunk.len == 0 {
                    continue;
                }
                let reads: f64 = heat.chunk(chunk.id).iter().map(|(_, h)| h.reads).sum();
                let reason = match cost {
                    Some(cost) => {
                        if reads < policy.min_reads {
                            continue;
                        }
                        let current = homes
                            .iter()
                            .filter(|home| chunk.replicas.contains(&home.node))
                            .map(|home| home.cost)
                            .min();
                        format!(
                            "hot ({reads:.1} reads), read by {} on {} GPUs; {target} costs {cost} (its nearest replica {})",
                            jobs.join(", "),
                            readers.len(),
                            current.map_or("none up".to_string(), |cost| cost.to_string()),
                        )
                    }
                    None => format!("prestage to {target} requested ({reads:.1} reads)"),
                };
                let source = chunk
                    .replicas
                    .iter()
                    .find(|replica| {
                        nodes
                            .iter()
                            .any(|n| &n.id == *replica && n.state == model::NodeState::Up)
                    })
                    .cloned()
                    .unwrap_or_default();
                let bytes = u64::from(chunk.len);
                let mut movement = Movement {
                    at_ms: now,
                    path: layout.path.clone(),
                    file_id: layout.file_id,
                    chunk: chunk.id,
                    bytes,
                    from: source.clone(),
                    to: target.clone(),
                    state: MoveState::Planned,
                    reason,
                    policy: policy.source.clone(),
                    kind: MoveKind::Replicate,
                };
                let policy_spent = spent_by_policy.get(&policy.source).copied().unwrap_or(0);
                if policy.never_move {
                    movement.state = MoveState::Refused;
                    movement.reason = format!(
                        "{}; refused: never-move ({})",
                        movement.reason, policy.source
                    );
                    report.refused += 1;
                } else if policy.mode == Mode::DryRun {
                    movement.reason = format!("{}; dry-run ({})", movement.reason, policy.source);
                    report.planned += 1;
                } else if policy.mode == Mode::Approve && !approved {
                    movement.reason = format!(
                        "{}; awaiting approval: tier0 admin approve {} ({})",
                        movement.reason, layout.path, policy.source
                    );
                    report.planned += 1;
                } else if let Some(budget) = policy.max_bytes_per_hour
                    && policy_spent + bytes > budget
                {
                    movement.state = MoveState::Refused;
                    movement.reason = format!(
                        "{}; refused: {bytes} bytes would pass {}'s budget of {budget} bytes an hour ({policy_spent} spent)",
                        movement.reason, policy.source
                    );
                    report.refused += 1;
                } else if spent + bytes > config.max_bytes_per_hour {
                    movement.state = MoveState::Refused;
                    movement.reason = format!(
                        "{}; refused: {} bytes would pass the budget of {} bytes an hour ({} spent)",
                        movement.reason, bytes, config.max_bytes_per_hour, spent
                    );
                    report.refused += 1;
                } else if source.is_empty() {
                    movement.state = MoveState::Failed;
                    movement.reason =
                        format!("{}; failed: no replica on an up node", movement.reason);
                    report.failed += 1;
                } else {
                    match execute(store, upkeep, nodes, &movement).await? {
                        Ok(()) => {
                            movement.state = MoveState::Executed;
                            spent += bytes;
                            *spent_by_policy.entry(policy.source.clone()).or_default() += bytes;
                            report.executed += 1;
                            report.bytes_moved += bytes;
                            moved_files.insert(layout.file_id);
                        }
                        Err(problem) => {
                            movement.state = MoveState::Failed;
                            movement.reason = format!("{}; failed: {problem}", movement.reason);
                            report.failed += 1;
                        }
                    }
                }
                decisions.log(store, &movement).await?;
            }
        }
        if approved {
            approvals_used.push(layout.file_id);
        }
    }
    shed(
        config,
        store,
        heat,
        files,
        nodes,
        &mut decisions,
        &mut moved_files,
        &mut report,
    )
    .await?;
    upkeep.bump_layouts(&moved_files).await?;
    // An approval covers one pass over the file's moves.
    for file in approvals_used {
        let mut txn = Txn::new();
        txn.delete(model::approval_key(file));
        store.commit(&txn).await?;
    }
    Ok(report)
}

/// Drops surplus cold replicas from nodes over the high watermark: a replica goes only when
/// its chunk keeps at least its file's replication factor on other nodes, it is cold (fewer
/// reads than the policy's `min_reads`), and its file is not pinned there or never-move.
/// The replica leaves the chunk's record in one checked transaction and is queued in trash
/// (M3), so the daemon deletes it only after no layout names it.
#[allow(clippy::too_many_arguments)]
async fn shed(
    config: &RebalanceConfig,
    store: &dyn MetadataStore,
    heat: &HeatTable,
    files: &[(Layout, BTreeMap<String, String>)],
    nodes: &[NodeRecord],
    decisions: &mut Decisions,
    moved_files: &mut HashSet<u64>,
    report: &mut RebalanceReport,
) -> Result<()> {
    let now = model::now_ms();
    for node in nodes {
        let capacity = node.topology.capacity_bytes;
        if capacity == 0 || node.state != model::NodeState::Up {
            continue;
        }
        let mut used = capacity.saturating_sub(node.topology.free_bytes);
        let limit = (capacity as f64 * config.high_watermark) as u64;
        for (layout, tags) in files {
            if used <= limit {
                break;
            }
            let policy = config.policies.effective(&layout.path, tags, config);
            if policy.never_move || policy.mode == Mode::Off || policy.pin.contains(&node.id) {
                continue;
            }
            for chunk in &layout.chunks {
                if used <= limit {
                    break;
                }
                let factor = policy.replication.unwrap_or(layout.replication).max(1);
                if !chunk.replicas.contains(&node.id) || (chunk.replicas.len() as u32) <= factor {
                    continue;
                }
                let reads: f64 = heat.chunk(chunk.id).iter().map(|(_, h)| h.reads).sum();
                if reads >= policy.min_reads {
                    continue;
                }
                let mut movement = Movement {
                    at_ms: now,
                    path: layout.path.clone(),
                    file_id: layout.file_id,
                    chunk: chunk.id,
                    bytes: u64::from(chunk.len),
                    from: node.id.clone(),
                    to: String::new(),
                    state: MoveState::Planned,
                    reason: format!(
                        "{} is {:.0}% full (watermark {:.0}%); cold ({reads:.1} reads) and {} replicas for a replication factor of {}",
                        node.id,
                        100.0 * used as f64 / capacity as f64,
                        100.0 * config.high_watermark,
                        chunk.replicas.len(),
                        factor
                    ),
                    policy: policy.source.clone(),
                    kind: MoveKind::Drop,
                };
                if matches!(policy.mode, Mode::DryRun | Mode::Approve) {
                    movement.reason =
                        format!("{}; not dropped ({:?})", movement.reason, policy.mode);
                    report.planned += 1;
                } else {
                    match drop_replica(store, chunk.id, &node.id).await? {
                        Ok(()) => {
                            movement.state = MoveState::Executed;
                            used = used.saturating_sub(u64::from(chunk.len));
                            report.executed += 1;
                            moved_files.insert(layout.file_id);
                        }
                        Err(problem) => {
                            movement.state = MoveState::Failed;
                            movement.reason = format!("{}; failed: {problem}", movement.reason);
                            report.failed += 1;
                        }
                    }
                }
                decisions.log(store, &movement).await?;
            }
        }
    }
    Ok(())
}

async fn drop_replica(
    store: &dyn MetadataStore,
    chunk: tier0_dataplane::store::ChunkId,
    node: &str,
) -> Result<std::result::Result<(), String>> {
    let key = model::chunk_key(chunk);
    let Some(entry) = store.get(&key).await? else {
        return Ok(Err("the chunk was collected meanwhile".into()));
    };
    let mut record: ChunkRecord = model::decode(&entry.key, &entry.value)?;
    record.replicas.retain(|replica| replica != node);
    let mut txn = Txn::new();
    txn.check(Check::At(entry.key.clone(), entry.revision))
        .put(entry.key.clone(), model::encode(&record))
        .put(model::trash_key(chunk, node), b"{}".to_vec());
    match store.commit(&txn).await? {
        Outcome::Committed(_) => Ok(Ok(())),
        Outcome::Conflict => Ok(Err("the chunk's record changed meanwhile".into())),
    }
}

/// Records of the audit log looked at to tell whether a decision changed.
const AUDIT_WINDOW: usize = 100_000;

/// Approves the pending moves of file `file_id` for the next pass (`Mode::Approve`).
pub async fn approve(store: &dyn MetadataStore, file_id: u64) -> Result<()> {
    let mut txn = Txn::new();
    txn.put(
        model::approval_key(file_id),
        model::encode(&model::now_ms()),
    );
    store.commit(&txn).await?;
    Ok(())
}

/// Copies the chunk and names the new replica, or says why not.
async fn execute(
    store: &dyn MetadataStore,
    upkeep: &Upkeep,
    nodes: &[NodeRecord],
    movement: &Movement,
) -> Result<std::result::Result<(), String>> {
    let address = |id: &str| nodes.iter().find(|n| n.id == id).map(|n| n.address.clone());
    let (Some(from), Some(to)) = (address(&movement.from), address(&movement.to)) else {
        return Ok(Err("a node of the move is not registered".into()));
    };
    let key = model::chunk_key(movement.chunk);
    let Some(entry) = store.get(&key).await? else {
        return Ok(Err("the chunk was collected meanwhile".into()));
    };
    if let Err(problem) = upkeep
        .copy(movement.chunk, movement.bytes as u32, from, to)
        .await
    {
        return Ok(Err(problem));
    }
    let mut record: ChunkRecord = model::decode(&entry.key, &entry.value)?;
    if !record.replicas.contains(&movement.to) {
        record.replicas.push(movement.to.clone());
    }
    let mut txn = Txn::new();
    txn.check(Check::At(entry.key.clone(), entry.revision))
        .put(entry.key.clone(), model::encode(&record));
    match store.commit(&txn).await? {
        Outcome::Committed(_) => Ok(Ok(())),
        Outcome::Conflict => {
            // The record moved (repaired, collected): the copy is nobody's; delete it later.
            let mut orphan = Txn::new();
            orphan.put(
                model::trash_key(movement.chunk, &movement.to),
                b"{}".to_vec(),
            );
            store.commit(&orphan).await?;
            Ok(Err(
                "the chunk's record changed meanwhile; the copy goes to trash".into(),
            ))
        }
    }
}

async fn record(store: &dyn MetadataStore, movement: &Movement, seq: u32) -> Result<()> {
    let state = match movement.state {
        MoveState::Planned => "planned",
        MoveState::Executed => "executed",
        MoveState::Refused => "refused",
        MoveState::Failed => "failed",
    };
    metrics::counter!("tier0_rebalance_moves_total", "state" => state).increment(1);
    if movement.state == MoveState::Executed {
        metrics::counter!("tier0_rebalance_bytes_total").increment(movement.bytes);
    }
    let mut txn = Txn::new();
    txn.put(
        model::audit_key(movement.at_ms, seq),
        model::encode(movement),
    );
    store.commit(&txn).await?;
    Ok(())
}

/// The audit log, oldest first; at most `limit` of the newest.
pub async fn movements(store: &dyn MetadataStore, limit: usize) -> Result<Vec<Movement>> {
    let entries = store.scan(model::AUDIT_PREFIX).await?;
    let skip = entries.len().saturating_sub(limit);
    entries
        .into_iter()
        .skip(skip)
        .map(|entry| model::decode(&entry.key, &entry.value))
        .collect()
}

/// The last decision on each move, and the sequence numbers of this pass's records.
#[derive(Debug, Default)]
struct Decisions {
    last: HashMap<(tier0_dataplane::store::ChunkId, MoveKind, String), MoveState>,
    seq: u32,
}

impl Decisions {
    /// A move is its chunk, its kind and the node it changes (the target of a copy, the
    /// holder of a dropped replica).
    fn key(movement: &Movement) -> (tier0_dataplane::store::ChunkId, MoveKind, String) {
        let node = match movement.kind {
            MoveKind::Replicate => &movement.to,
            MoveKind::Drop => &movement.from,
        };
        (movement.chunk, movement.kind, node.clone())
    }

    /// Records `movement` when it was made or differs from the last decision on its move.
    async fn log(&mut self, store: &dyn MetadataStore, movement: &Movement) -> Result<()> {
        let key = Self::key(movement);
        if movement.state == MoveState::Executed || self.last.get(&key) != Some(&movement.state) {
            record(store, movement, self.seq).await?;
            self.seq += 1;
            self.last.insert(key, movement.state);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LayoutChunk, NodeState, TopologySummary};
    use crate::store::RedbStore;
    use tier0_dataplane::store::ChunkId;

    fn node(id: &str, capacity: u64, free: u64) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            address: format!("{id}:7400"),
            topology: TopologySummary {
                capacity_bytes: capacity,
                free_bytes: free,
                ..TopologySummary::default()
            },
            state: NodeState::Up,
            registered_ms: 0,
            heartbeat_ms: 0,
            lease_expires_ms: 0,
        }
    }

    fn layout(path: &str, file: u64, replicas: &[&[&str]]) -> Layout {
        Layout {
            path: path.into(),
            file_id: file,
            version: 1,
            layout_version: 1,
            size: 0,
            chunk_size: 1 << 20,
            replication: 2,
            chunks: replicas
                .iter()
                .enumerate()
                .map(|(index, nodes)| LayoutChunk {
                    index: index as u32,
                    id: ChunkId {
                        file,
                        index: index as u32,
                        generation: 1,
                    },
                    len: 1 << 20,
                    replicas: nodes.iter().map(|n| n.to_string()).collect(),
                })
                .collect(),
            nodes: Vec::new(),
        }
    }

    async fn put_records(store: &dyn MetadataStore, layout: &Layout) {
        let mut txn = Txn::new();
        for chunk in &layout.chunks {
            let record = ChunkRecord {
                replicas: chunk.replicas.clone(),
                expires_ms: 0,
            };
            txn.put(model::chunk_key(chunk.id), model::encode(&record));
        }
        store.commit(&txn).await.unwrap();
    }

    async fn replicas(store: &dyn MetadataStore, chunk: ChunkId) -> Vec<String> {
        let entry = store.get(&model::chunk_key(chunk)).await.unwrap().unwrap();
        let record: ChunkRecord = model::decode(&entry.key, &entry.value).unwrap();
        record.replicas
    }

    /// A node over its watermark drops cold surplus replicas until it is under, never below
    /// a file's replication factor, never a pinned file's, and queues each in trash.
    #[tokio::test]
    async fn a_full_node_sheds_cold_surplus_replicas_down_to_the_replication_factor() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("m.redb")).unwrap();
        // "full" holds 95 of 100 MiB: 5 MiB over a 90% watermark.
        let nodes = [
            node("full", 100 << 20, 5 << 20),
            node("a", 100 << 20, 90 << 20),
            node("b", 100 << 20, 90 << 20),
        ];
        // Surplus on "full" for every chunk of /x (3 replicas, factor 2); /y is at its
        // factor; /z is pinned to "full".
        let three: &[&str] = &["full", "a", "b"];
        let x = layout("/x", 1, &[three; 8]);
        let y = layout("/y", 2, &[&["full", "a"]]);
        let z = layout("/z", 3, &[&["full", "a", "b"]]);
        // /w's rule keeps three replicas: at its factor, though the file says two.
        let w = layout("/w", 4, &[three]);
        for file in [&w, &x, &y, &z] {
            put_records(&store, file).await;
        }
        let pinned: BTreeMap<String, String> =
            [(crate::policy::TAG_PIN.to_string(), "full".to_string())].into();
        let files = vec![
            (w.clone(), BTreeMap::new()),
            (x.clone(), BTreeMap::new()),
            (y.clone(), BTreeMap::new()),
            (z.clone(), pinned),
        ];
        let heat = HeatTable::default();
        // Chunk 7 of /x is hot on "full": it stays.
        heat.report(
            "full",
            Duration::from_secs(600),
            vec![(
                x.chunks[7].id,
                crate::heat::Heat {
                    reads: 10.0,
                    bytes: 0.0,
                },
            )],
        );
        let (mut decisions, mut moved, mut report) = (
            Decisions::default(),
            HashSet::new(),
            RebalanceReport::default(),
        );
        let config = RebalanceConfig {
            policies: crate::policy::Policies::parse(
                "[[policy]]\nprefix = \"/w\"\nreplication = 3\n",
            )
            .unwrap(),
            ..RebalanceConfig::default()
        };
        shed(
            &config,
            &store,
            &heat,
            &files,
            &nodes,
            &mut decisions,
            &mut moved,
            &mut report,
        )
        .await
        .unwrap();
        // 5 MiB over: five 1 MiB replicas go, the first cold ones of /x.
        assert_eq!(report.executed, 5, "{report:?}");
        for (index, chunk) in x.chunks.iter().enumerate() {
            let now = replicas(&store, chunk.id).await;
            assert_eq!(
                now.contains(&"full".to_string()),
                index >= 5,
                "chunk {index}: {now:?}"
            );
            if index < 5 {
                assert!(
                    store
                        .get(&model::trash_key(chunk.id, "full"))
                        .await
                        .unwrap()
                        .is_some()
                );
            }
        }
        assert_eq!(
            replicas(&store, y.chunks[0].id).await.len(),
            2,
            "below the factor"
        );
        assert_eq!(
            replicas(&store, z.chunks[0].id).await.len(),
            3,
            "pinned dropped"
        );
        assert_eq!(
            replicas(&store, w.chunks[0].id).await.len(),
            3,
            "policy factor ignored"
        );
        let log = movements(&store, 100).await.unwrap();
        assert_eq!(log.len(), 5);
        assert!(
            log.iter()
                .all(|m| m.kind == MoveKind::Drop && m.state == MoveState::Executed)
        );
        assert!(log[0].reason.contains("95% full"), "{}", log[0].reason);
        assert_eq!(moved, HashSet::from([1]));
    }
}
