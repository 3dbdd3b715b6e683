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
}

impl Default for RebalanceConfig {
    fn default() -> Self {
        RebalanceConfig {
            mode: Mode::Auto,
            max_bytes_per_hour: 64 << 30,
            min_reads: 1.0,
            policies: crate::policy::Policies::default(),
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
    let recent = movements_since(store, now.saturating_sub(HOUR.as_millis() as u64)).await?;
    let executed = |movement: &&Movement| movement.state == MoveState::Executed;
    let mut spent: u64 = recent.iter().filter(executed).map(|m| m.bytes).sum();
    let mut spent_by_policy: HashMap<String, u64> = HashMap::new();
    for movement in recent.iter().filter(executed) {
        *spent_by_policy.entry(movement.policy.clone()).or_default() += movement.bytes;
    }
    // The last word on each (chunk, target): a decision is logged when it changes, not on
    // every pass.
    let mut last: HashMap<(tier0_dataplane::store::ChunkId, String), MoveState> = HashMap::new();
    for movement in movements(store, AUDIT_WINDOW).await? {
        last.insert((movement.chunk, movement.to.clone()), movement.state);
    }
    let mut seq = 0u32;
    let mut moved_files = HashSet::new();
    let mut approvals_used = Vec::new();
    for (layout, tags) in files {
        let policy = config.policies.effective(&layout.path, tags, config);
        if policy.mode == Mode::Off {
            continue;
        }
        let (readers, jobs) = gpus.readers_of(&layout.path);
        if readers.is_empty() {
            continue;
        }
        let homes = rank_homes(nodes, &readers);
        let allowed = |home: &&crate::orchestration::HomeScore| {
            policy.pin.is_empty() || policy.pin.contains(&home.node)
        };
        let Some(best) = homes.iter().find(allowed) else {
            continue;
        };
        let approved = policy.mode == Mode::Approve
            && store
                .get(&model::approval_key(layout.file_id))
                .await?
                .is_some();
        for chunk in &layout.chunks {
            if chunk.replicas.contains(&best.node) || chunk.len == 0 {
                continue;
            }
            let reads: f64 = heat.chunk(chunk.id).iter().map(|(_, h)| h.reads).sum();
            if reads < policy.min_reads {
                continue;
            }
            let current = homes
                .iter()
                .filter(|home| chunk.replicas.contains(&home.node))
                .map(|home| home.cost)
                .min();
            let reason = format!(
                "hot ({reads:.1} reads), read by {} on {} GPUs; {} costs {} (its nearest replica {})",
                jobs.join(", "),
                readers.len(),
                best.node,
                best.cost,
                current.map_or("none up".to_string(), |cost| cost.to_string()),
            );
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
                to: best.node.clone(),
                state: MoveState::Planned,
                reason,
                policy: policy.source.clone(),
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
                movement.reason = format!("{}; failed: no replica on an up node", movement.reason);
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
            let key = (movement.chunk, movement.to.clone());
            if movement.state == MoveState::Executed || last.get(&key) != Some(&movement.state) {
                record(store, &movement, seq).await?;
                seq += 1;
                last.insert(key, movement.state);
            }
        }
        if approved {
            approvals_used.push(layout.file_id);
        }
    }
    upkeep.bump_layouts(&moved_files).await?;
    // An approval covers one pass over the file's moves.
    for file in approvals_used {
        let mut txn = Txn::new();
        txn.delete(model::approval_key(file));
        store.commit(&txn).await?;
    }
    Ok(report)
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

async fn movements_since(store: &dyn MetadataStore, since_ms: u64) -> Result<Vec<Movement>> {
    let from = model::audit_key(since_ms, 0);
    Ok(movements(store, usize::MAX)
        .await?
        .into_iter()
        .filter(|movement| model::audit_key(movement.at_ms, 0) >= from)
        .collect())
}
