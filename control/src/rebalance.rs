//! The rebalancer: replicates hot chunks to the nodes nearest the idle GPUs that will read
//! them, within a bandwidth budget, and records every move it plans, makes or refuses in the
//! audit log.
//!
//! A pass (on the leader, after upkeep) is a plan ([`plan`], pure: the cluster simulator runs
//! it too) and its execution ([`run`]). For every file a declared job will read, the job's
//! GPUs on each node get their best allowed home (`orchestration::home_costs`: their own node
//! when its drives feed them); each hot chunk (its reads, summed over the nodes that served
//! it, at least `min_reads`) whose replicas all cost them more is a move: copy a replica there
//! (through the data plane; chunks are immutable and a daemon acknowledges a write only once
//! all of it is stored, so no replica is named before it is whole), then add the node to the
//! chunk's replicas in one transaction checked against the record's revision, then bump the
//! file's layout version so clients refresh. Moves are decided hottest first; one that would
//! take the last hour's bytes past the budget, or its target past the high watermark, is
//! refused; in dry-run mode moves are only planned.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tier0_dataplane::store::ChunkId;

use crate::error::Result;
use crate::heat::HeatTable;
use crate::model::{self, ChunkRecord, Layout, NodeRecord};
use crate::orchestration::{GpuRef, GpuTable, home_costs};
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
    /// Audit records (the rebalancer's and the agents') older than this are removed.
    pub audit_retention: Duration,
}

impl Default for RebalanceConfig {
    fn default() -> Self {
        RebalanceConfig {
            mode: Mode::Auto,
            max_bytes_per_hour: 64 << 30,
            min_reads: 1.0,
            policies: crate::policy::Policies::default(),
            high_watermark: 0.9,
            audit_retention: Duration::from_secs(30 * 24 * 3600),
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

/// Target nodes a pass copies to at once. Copies to one node go one after another: its NIC
/// and drives are the limit there, and one stream keeps a pass from flooding it.
pub const COPY_STREAMS: usize = 256;

/// Bytes that the rolling hour's executed moves copied: in all, and per policy rule.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Spent {
    pub total: u64,
    pub by_policy: HashMap<String, u64>,
}

/// What a pass plans from.
#[derive(Debug)]
pub struct PlanInput<'a> {
    /// The files declared jobs will read or schedulers asked prestaged, with their tags.
    pub files: &'a [(Layout, BTreeMap<String, String>)],
    /// The nodes as membership sees them (capacity and free bytes from their heartbeats).
    pub nodes: &'a [NodeRecord],
    pub gpus: &'a GpuTable,
    /// Each chunk's reads, summed over the nodes that served it (`HeatTable::totals`).
    pub heat: &'a HashMap<ChunkId, f64>,
    /// Files whose pending moves an operator approved (`Mode::Approve`).
    pub approved: &'a HashSet<u64>,
    pub spent: Spent,
    /// The time the moves are stamped with (ms since the epoch).
    pub now_ms: u64,
}

/// One move of a plan: made by this pass (`execute`), or only recorded (planned in dry-run or
/// awaiting approval, refused, failed before it started).
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedMove {
    pub movement: Movement,
    pub execute: bool,
}

/// A pass's moves, in the order they are made, and the approvals it uses up.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub moves: Vec<PlannedMove>,
    pub approvals_used: Vec<u64>,
}

/// Where one group of a file's readers wants its chunks.
#[derive(Debug)]
struct Target {
    node: String,
    /// `node`'s index in the plan's node list.
    node_index: usize,
    /// The route cost to the group from `node`; `None` for a prestage request.
    cost: Option<u64>,
    /// The reading GPUs of the group, and the node they are on.
    gpus: usize,
    readers_on: String,
}

/// A move to consider: chunk `chunk` of file `file` to target `target`.
#[derive(Debug)]
struct Candidate {
    file: usize,
    chunk: usize,
    target: usize,
    reads: f64,
    /// The route cost of the chunk's best replica for the target's readers now.
    current: Option<u64>,
}

/// Why a move is refused, when the same refusal covers many chunks of a file to one node: one
/// audit record for them all, not one per chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Refusal {
    PolicyBudget,
    Budget,
    Watermark,
}

/// Plans one pass, without touching the store or any daemon: the rebalancer's whole logic of
/// what moves where, shared by the control plane's pass ([`run`]) and the cluster simulator.
///
/// For each file: its reading GPUs grouped by node, and for each group the best allowed home
/// (`orchestration::rank_homes`: the readers' own node when its drives feed its GPUs); each
/// hot chunk (at least `min_reads`) whose replicas all cost the group more than that home is
/// a candidate, and so is every chunk not yet on a node the file was asked prestaged to.
/// Candidates are decided hottest first (prestages after), so a budget that runs out refuses
/// the coldest; a target is never filled past the high watermark. Refusals by a budget or a
/// watermark are one record per file, target and cause, counting the chunks it covers. Then
/// the drops: surplus cold replicas on nodes over the high watermark.
pub fn plan(config: &RebalanceConfig, input: &PlanInput) -> Plan {
    let mut plan = Plan::default();
    if config.mode == Mode::Off && config.policies == crate::policy::Policies::default() {
        return plan;
    }
    let nodes = input.nodes;
    let index_of: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .map(|(index, node)| (node.id.as_str(), index))
        .collect();
    let up = |index: usize| nodes[index].state == model::NodeState::Up;
    let policies: Vec<crate::policy::Effective> = input
        .files
        .iter()
        .map(|(layout, tags)| config.policies.effective(&layout.path, tags, config))
        .collect();
    let mut targets: Vec<Vec<Target>> = Vec::with_capacity(input.files.len());
    let mut jobs_of: Vec<Vec<String>> = Vec::with_capacity(input.files.len());
    let mut candidates = Vec::new();
    // Per chunk, its replicas' node indexes (a replica on no listed node is left out).
    let mut holders: Vec<usize> = Vec::with_capacity(8);
    for (file, (layout, _)) in input.files.iter().enumerate() {
        let policy = &policies[file];
        let mut file_targets: Vec<Target> = Vec::new();
        // Per target: every node's cost as the group's home, by index (`None`: not up, or not
        // allowed by the file's pin), to tell what a chunk's replicas cost the group now;
        // empty for a prestage. Kept only while the file's candidates are found.
        let mut target_costs: Vec<Vec<Option<u64>>> = Vec::new();
        let (readers, jobs) = input.gpus.readers_of(&layout.path);
        jobs_of.push(jobs);
        if policy.mode != Mode::Off {
            let allowed =
                |node: &str| policy.pin.is_empty() || policy.pin.iter().any(|p| p == node);
            let mut groups: BTreeMap<&str, Vec<GpuRef>> = BTreeMap::new();
            for reader in &readers {
                groups.entry(&reader.node).or_default().push(reader.clone());
            }
            for (readers_on, group) in groups {
                let costs: Vec<Option<u64>> =
                    home_costs(nodes, &group, |id| index_of.get(id).copied())
                        .into_iter()
                        .zip(nodes)
                        .map(|(cost, node)| {
                            cost.filter(|_| allowed(&node.id)).map(|(cost, _)| cost)
                        })
                        .collect();
                // The cheapest allowed home, ties by node id (as `rank_homes` ranks them).
                let Some((best, cost)) = costs
                    .iter()
                    .enumerate()
                    .filter_map(|(index, cost)| cost.map(|cost| (index, cost)))
                    .min_by(|a, b| a.1.cmp(&b.1).then(nodes[a.0].id.cmp(&nodes[b.0].id)))
                else {
                    continue;
                };
                if file_targets.iter().any(|t| t.node_index == best) {
                    continue;
                }
                file_targets.push(Target {
                    node: nodes[best].id.clone(),
                    node_index: best,
                    cost: Some(cost),
                    gpus: group.len(),
                    readers_on: readers_on.to_string(),
                });
                target_costs.push(costs);
            }
            for node in input.gpus.prestaged_to(&layout.path) {
                let Some(&index) = index_of.get(node.as_str()) else {
                    continue;
                };
                if up(index) && allowed(&node) && !file_targets.iter().any(|t| t.node == node) {
                    file_targets.push(Target {
                        node,
                        node_index: index,
                        cost: None,
                        gpus: 0,
                        readers_on: String::new(),
                    });
                    target_costs.push(Vec::new());
                }
            }
        }
        if file_targets.is_empty() {
            targets.push(file_targets);
            continue;
        }
        for (chunk_index, chunk) in layout.chunks.iter().enumerate() {
            if chunk.len == 0 {
                continue;
            }
            holders.clear();
            holders.extend(
                chunk
                    .replicas
                    .iter()
                    .filter_map(|replica| index_of.get(replica.as_str()).copied()),
            );
            let reads = input.heat.get(&chunk.id).copied().unwrap_or(0.0);
            for (index, (target, costs)) in file_targets.iter().zip(&target_costs).enumerate() {
                if holders.contains(&target.node_index) {
                    continue;
                }
                let current = holders
                    .iter()
                    .filter_map(|&h| costs.get(h)?.as_ref())
                    .min()
                    .copied();
                if let Some(cost) = target.cost
                    && (reads < policy.min_reads || current.is_some_and(|now| now <= cost))
                {
                    continue;
                }
                candidates.push(Candidate {
                    file,
                    chunk: chunk_index,
                    target: index,
                    reads,
                    current,
                });
            }
        }
        targets.push(file_targets);
    }
    // Hottest first; prestages (asked for, hot or not) after; ties in file and chunk order.
    candidates.sort_by(|a, b| {
        let prestage = |c: &Candidate| targets[c.file][c.target].cost.is_none();
        prestage(a)
            .cmp(&prestage(b))
            .then(b.reads.total_cmp(&a.reads))
            .then((a.file, a.chunk, a.target).cmp(&(b.file, b.chunk, b.target)))
    });

    let mut spent = input.spent.clone();
    // Bytes each node holds, with this pass's copies to it.
    let mut used: Vec<u64> = nodes
        .iter()
        .map(|n| {
            let t = &n.topology;
            t.capacity_bytes.saturating_sub(t.free_bytes)
        })
        .collect();
    // Refusals recorded once per file, target and cause: the record's index, the chunks and
    // bytes it covers.
    let mut refusals: HashMap<(usize, usize, Refusal), (usize, u64, u64)> = HashMap::new();
    for candidate in &candidates {
        let (layout, _) = &input.files[candidate.file];
        let policy = &policies[candidate.file];
        let target = &targets[candidate.file][candidate.target];
        let chunk = &layout.chunks[candidate.chunk];
        let bytes = u64::from(chunk.len);
        let approved = policy.mode == Mode::Approve && input.approved.contains(&layout.file_id);
        let policy_spent = spent.by_policy.get(&policy.source).copied().unwrap_or(0);
        let capacity = nodes[target.node_index].topology.capacity_bytes;
        let target_used = used[target.node_index];
        let limit = (capacity as f64 * policy.high_watermark) as u64;
        let held = policy.never_move
            || policy.mode == Mode::DryRun
            || (policy.mode == Mode::Approve && !approved);
        let refusal = if held {
            None
        } else if policy
            .max_bytes_per_hour
            .is_some_and(|budget| policy_spent + bytes > budget)
        {
            Some(Refusal::PolicyBudget)
        } else if spent.total + bytes > config.max_bytes_per_hour {
            Some(Refusal::Budget)
        } else if capacity > 0 && target_used + bytes > limit {
            Some(Refusal::Watermark)
        } else {
            None
        };
        if let Some(refusal) = refusal
            && let Some(group) = refusals.get_mut(&(candidate.file, candidate.target, refusal))
        {
            group.1 += 1;
            group.2 += bytes;
            continue;
        }
        let reads = candidate.reads;
        let reason = match target.cost {
            Some(cost) => format!(
                "hot ({reads:.1} reads), read by {} on {} GPUs of {}; {} costs them {cost} (their nearest replica {})",
                jobs_of[candidate.file].join(", "),
                target.gpus,
                target.readers_on,
                target.node,
                candidate
                    .current
                    .map_or("none up".to_string(), |cost| cost.to_string()),
            ),
            None => format!("prestage to {} requested ({reads:.1} reads)", target.node),
        };
        let source = chunk
            .replicas
            .iter()
            .find(|replica| index_of.get(replica.as_str()).is_some_and(|&i| up(i)))
            .cloned()
            .unwrap_or_default();
        let mut movement = Movement {
            at_ms: input.now_ms,
            path: layout.path.clone(),
            file_id: layout.file_id,
            chunk: chunk.id,
            bytes,
            from: source.clone(),
            to: target.node.clone(),
            state: MoveState::Planned,
            reason,
            policy: policy.source.clone(),
            kind: MoveKind::Replicate,
        };
        let mut execute = false;
        match refusal {
            Some(refusal) => {
                movement.state = MoveState::Refused;
                movement.reason = match refusal {
                    Refusal::PolicyBudget => format!(
                        "{}; refused: {bytes} bytes would pass {}'s budget of {} bytes an hour ({policy_spent} spent)",
                        movement.reason,
                        policy.source,
                        policy.max_bytes_per_hour.unwrap_or(0)
                    ),
                    Refusal::Budget => format!(
                        "{}; refused: {} bytes would pass the budget of {} bytes an hour ({} spent)",
                        movement.reason, bytes, config.max_bytes_per_hour, spent.total
                    ),
                    Refusal::Watermark => format!(
                        "{}; refused: {} would pass its high watermark of {:.0}% ({:.0}% full)",
                        movement.reason,
                        target.node,
                        100.0 * policy.high_watermark,
                        100.0 * target_used as f64 / capacity as f64
                    ),
                };
                refusals.insert(
                    (candidate.file, candidate.target, refusal),
                    (plan.moves.len(), 1, bytes),
                );
            }
            None if policy.never_move => {
                movement.state = MoveState::Refused;
                movement.reason = format!(
                    "{}; refused: never-move ({})",
                    movement.reason, policy.source
                );
            }
            None if policy.mode == Mode::DryRun => {
                movement.reason = format!("{}; dry-run ({})", movement.reason, policy.source);
            }
            None if policy.mode == Mode::Approve && !approved => {
                movement.reason = format!(
                    "{}; awaiting approval: tier0 admin approve {} ({})",
                    movement.reason, layout.path, policy.source
                );
            }
            None if source.is_empty() => {
                movement.state = MoveState::Failed;
                movement.reason = format!("{}; failed: no replica on an up node", movement.reason);
            }
            None => {
                // Counted as spent now: a copy that then fails holds its bytes until next pass.
                execute = true;
                spent.total += bytes;
                *spent.by_policy.entry(policy.source.clone()).or_default() += bytes;
                used[target.node_index] += bytes;
            }
        }
        plan.moves.push(PlannedMove { movement, execute });
    }
    for (index, chunks, bytes) in refusals.into_values() {
        if chunks > 1 {
            let movement = &mut plan.moves[index].movement;
            movement.reason = format!(
                "{} (and {} more chunks of this file to {}, {bytes} bytes in all)",
                movement.reason,
                chunks - 1,
                movement.to
            );
        }
    }
    plan_drops(config, input, &policies, &mut plan);
    // An approval covers one pass over the file's moves, whichever were made.
    let mut approvals_used: Vec<u64> = input
        .files
        .iter()
        .zip(&policies)
        .filter(|((layout, _), policy)| {
            policy.mode == Mode::Approve && input.approved.contains(&layout.file_id)
        })
        .map(|((layout, _), _)| layout.file_id)
        .collect();
    approvals_used.sort_unstable();
    approvals_used.dedup();
    plan.approvals_used = approvals_used;
    plan
}

/// Drops surplus cold replicas from nodes over the high watermark: a replica goes only when
/// its chunk keeps at least its file's replication factor on other nodes, it is cold (fewer
/// reads than the policy's `min_reads`), and its file is not pinned there or never-move.
fn plan_drops(
    config: &RebalanceConfig,
    input: &PlanInput,
    policies: &[crate::policy::Effective],
    plan: &mut Plan,
) {
    // Replicas this pass drops already, so a chunk is never cut below its factor twice over.
    let mut dropped: HashMap<ChunkId, u32> = HashMap::new();
    for node in input.nodes {
        let capacity = node.topology.capacity_bytes;
        if capacity == 0 || node.state != model::NodeState::Up {
            continue;
        }
        let mut used = capacity.saturating_sub(node.topology.free_bytes);
        // Each file's rule may set its own watermark: past the lowest, some may go.
        let lowest = config.policies.lowest_watermark(config.high_watermark);
        let at = |mark: f64| (capacity as f64 * mark) as u64;
        for (file, (layout, _)) in input.files.iter().enumerate() {
            if used <= at(lowest) {
                break;
            }
            let policy = &policies[file];
            let limit = at(policy.high_watermark);
            if used <= limit {
                continue;
            }
            if policy.never_move || policy.mode == Mode::Off || policy.pin.contains(&node.id) {
                continue;
            }
            let factor = policy.replication.unwrap_or(layout.replication).max(1);
            for chunk in &layout.chunks {
                if used <= limit {
                    break;
                }
                let gone = dropped.get(&chunk.id).copied().unwrap_or(0);
                let left = (chunk.replicas.len() as u32).saturating_sub(gone);
                if !chunk.replicas.contains(&node.id) || left <= factor {
                    continue;
                }
                let reads = input.heat.get(&chunk.id).copied().unwrap_or(0.0);
                if reads >= policy.min_reads {
                    continue;
                }
                let mut movement = Movement {
                    at_ms: input.now_ms,
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
                        100.0 * policy.high_watermark,
                        left,
                        factor
                    ),
                    policy: policy.source.clone(),
                    kind: MoveKind::Drop,
                };
                let execute = !matches!(policy.mode, Mode::DryRun | Mode::Approve);
                if execute {
                    used = used.saturating_sub(u64::from(chunk.len));
                    *dropped.entry(chunk.id).or_default() += 1;
                } else {
                    movement.reason =
                        format!("{}; not dropped ({:?})", movement.reason, policy.mode);
                }
                plan.moves.push(PlannedMove { movement, execute });
            }
        }
    }
}

/// A move made, and what became of it.
type Made = (Movement, std::result::Result<(), String>);

/// One rebalancing pass: reads the audit log (budgets spent, last decisions) and approvals,
/// plans ([`plan`]), makes the plan's moves (drops through trash; copies through the data
/// plane, to at most [`COPY_STREAMS`] target nodes at once, one after another per target),
/// records each decision that changed, and bumps the layouts of the files it changed.
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
    let mut spent = Spent::default();
    let mut decisions = Decisions::default();
    for movement in movements(store, AUDIT_WINDOW).await? {
        if movement.state == MoveState::Executed && movement.at_ms >= since {
            spent.total += movement.bytes;
            *spent.by_policy.entry(movement.policy.clone()).or_default() += movement.bytes;
        }
        decisions
            .last
            .insert(Decisions::key(&movement), movement.state);
    }
    let mut approved = HashSet::new();
    for (layout, tags) in files {
        if config.policies.effective(&layout.path, tags, config).mode == Mode::Approve
            && store
                .get(&model::approval_key(layout.file_id))
                .await?
                .is_some()
        {
            approved.insert(layout.file_id);
        }
    }
    let totals = heat.totals();
    let plan = plan(
        config,
        &PlanInput {
            files,
            nodes,
            gpus,
            heat: &totals,
            approved: &approved,
            spent,
            now_ms: now,
        },
    );
    // Drops are metadata: made in order. Copies are grouped by target node; each group's go
    // one after another (the target's NIC and drives are the limit), COPY_STREAMS groups at
    // once.
    let mut made: Vec<Made> = Vec::new();
    let mut groups: Vec<Vec<Movement>> = Vec::new();
    let mut group_of: HashMap<String, usize> = HashMap::new();
    let mut logged_only = Vec::new();
    for PlannedMove { movement, execute } in plan.moves {
        if !execute {
            logged_only.push(movement);
        } else if movement.kind == MoveKind::Drop {
            let outcome = drop_replica(store, movement.chunk, &movement.from).await?;
            made.push((movement, outcome));
        } else {
            let group = *group_of.entry(movement.to.clone()).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[group].push(movement);
        }
    }
    let copied: Vec<Result<Vec<Made>>> = futures_util::stream::iter(groups)
        .map(|group| async move {
            let mut done = Vec::with_capacity(group.len());
            for movement in group {
                let outcome = execute_copy(store, upkeep, nodes, &movement).await?;
                done.push((movement, outcome));
            }
            Ok(done)
        })
        .buffer_unordered(COPY_STREAMS)
        .collect()
        .await;
    for group in copied {
        made.extend(group?);
    }
    let mut changed_files = HashSet::new();
    for movement in logged_only {
        match movement.state {
            MoveState::Refused => report.refused += 1,
            MoveState::Failed => report.failed += 1,
            _ => report.planned += 1,
        }
        decisions.log(store, &movement).await?;
    }
    for (mut movement, outcome) in made {
        {
            match outcome {
                Ok(()) => {
                    movement.state = MoveState::Executed;
                    report.executed += 1;
                    if movement.kind == MoveKind::Replicate {
                        report.bytes_moved += movement.bytes;
                    }
                    changed_files.insert(movement.file_id);
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
    upkeep.bump_layouts(&changed_files).await?;
    for file in plan.approvals_used {
        let mut txn = Txn::new();
        txn.delete(model::approval_key(file));
        store.commit(&txn).await?;
    }
    Ok(report)
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

/// Records of the audit log looked at to tell whether a decision changed, and the most an
/// audit log keeps (older ones go first).
pub const AUDIT_WINDOW: usize = 100_000;

/// Most deletions in one transaction (etcd takes 128 operations by default).
const TRIM_BATCH: usize = 100;

/// Trims an audit log (`prefix`: `audit/` or `agent-audit/`, keys `<prefix><at_ms:016x>/…`
/// in time order) to the records of the last `retention` and at most `keep` of them, oldest
/// removed first; returns how many went. Run by the leader after each rebalancing pass, so a
/// log never grows without bound and a pass never reads more than `keep` records.
pub async fn trim_audit(
    store: &dyn MetadataStore,
    prefix: &str,
    now_ms: u64,
    retention: Duration,
    keep: usize,
) -> Result<u64> {
    let entries = store.scan(prefix).await?;
    let since = now_ms.saturating_sub(retention.as_millis() as u64);
    let surplus = entries.len().saturating_sub(keep);
    let old: Vec<&str> = entries
        .iter()
        .enumerate()
        .filter(|(index, entry)| {
            let at = entry.key[prefix.len()..]
                .split('/')
                .next()
                .and_then(|hex| u64::from_str_radix(hex, 16).ok());
            // A key that does not parse is not ours to judge by time; the count still holds.
            *index < surplus || at.is_some_and(|at| at < since)
        })
        .map(|(_, entry)| entry.key.as_str())
        .collect();
    for batch in old.chunks(TRIM_BATCH) {
        let mut txn = Txn::new();
        for key in batch {
            txn.delete(key.to_string());
        }
        store.commit(&txn).await?;
    }
    Ok(old.len() as u64)
}

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
async fn execute_copy(
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
        // A copy given up on may still land: queue the target's replica for deletion (kept
        // by the trash if a record names it by then).
        let mut orphan = Txn::new();
        orphan.put(
            model::trash_key(movement.chunk, &movement.to),
            b"{}".to_vec(),
        );
        store.commit(&orphan).await?;
        return Ok(Err(problem));
    }
    let mut record: ChunkRecord = model::decode(&entry.key, &entry.value)?;
    if !record.replicas.contains(&movement.to) {
        record.replicas.push(movement.to.clone());
    }
    let mut txn = Txn::new();
    txn.check(Check::At(entry.key.clone(), entry.revision))
        .put(entry.key.clone(), model::encode(&record))
        // A deletion pending there (the node still had it: EEXIST) is void now.
        .delete(model::trash_key(movement.chunk, &movement.to));
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
    model::newest_records(store, model::AUDIT_PREFIX, limit).await
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

    /// One plan with nothing approved, stamped at 7 ms.
    fn plan_pass(
        config: &RebalanceConfig,
        files: &[(Layout, BTreeMap<String, String>)],
        nodes: &[NodeRecord],
        gpus: &GpuTable,
        heat: &HashMap<ChunkId, f64>,
        spent: Spent,
    ) -> Plan {
        plan(
            config,
            &PlanInput {
                files,
                nodes,
                gpus,
                heat,
                approved: &HashSet::new(),
                spent,
                now_ms: 7,
            },
        )
    }

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
        // Chunk 7 of /x is hot on "full": it stays.
        let heat = HashMap::from([(x.chunks[7].id, 10.0)]);
        let config = RebalanceConfig {
            policies: crate::policy::Policies::parse(
                "[[policy]]\nprefix = \"/w\"\nreplication = 3\n",
            )
            .unwrap(),
            ..RebalanceConfig::default()
        };
        let gpus = GpuTable::default();
        let planned = plan_pass(&config, &files, &nodes, &gpus, &heat, Spent::default());
        let mut report = RebalanceReport::default();
        let mut log = Vec::new();
        for PlannedMove {
            mut movement,
            execute,
        } in planned.moves
        {
            assert!(execute, "{movement:?}");
            assert_eq!(movement.kind, MoveKind::Drop);
            drop_replica(&store, movement.chunk, &movement.from)
                .await
                .unwrap()
                .unwrap();
            movement.state = MoveState::Executed;
            report.executed += 1;
            log.push(movement);
        }
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
        assert_eq!(log.len(), 5);
        assert!(log[0].reason.contains("95% full"), "{}", log[0].reason);
        assert!(
            log.iter().all(|m| m.file_id == 1 && m.from == "full"),
            "{log:?}"
        );
    }

    fn gpu_node(id: &str, capacity: u64, free: u64) -> NodeRecord {
        let mut record = node(id, capacity, free);
        record.topology.gpu_feeds = (0..2)
            .map(|index| crate::model::GpuFeed {
                index,
                numa_node: Some(0),
                drive_cost: 2,
                nic_cost: 2,
            })
            .collect();
        record.topology.drive_nic_cost = 2;
        record
    }

    /// A job on the GPUs of two nodes gets the hot chunks on each of them, hottest first
    /// while the budget lasts; a node near its watermark takes none; cold chunks stay.
    #[test]
    fn plan_copies_hot_chunks_to_each_reading_node_hottest_first_within_budget_and_room() {
        // r1 and r2 run the job; r3 too but is 90% full; "store" holds the data.
        let nodes = [
            gpu_node("r1", 100 << 20, 100 << 20),
            gpu_node("r2", 100 << 20, 100 << 20),
            gpu_node("r3", 100 << 20, 10 << 20),
            node("store", 100 << 20, 50 << 20),
        ];
        let store: &[&str] = &["store"];
        let data = layout("/d/train", 9, &[store; 4]);
        let gpus = GpuTable::default();
        gpus.declare(crate::orchestration::Job {
            name: "job".into(),
            paths: vec!["/d".into()],
            gpus: ["r1", "r2", "r3"]
                .iter()
                .flat_map(|node| {
                    (0..2).map(|index| GpuRef {
                        node: node.to_string(),
                        index,
                    })
                })
                .collect(),
        });
        // Chunk 3 hottest, then 1, then 0; chunk 2 cold.
        let heat = HashMap::from([
            (data.chunks[0].id, 2.0),
            (data.chunks[1].id, 5.0),
            (data.chunks[3].id, 9.0),
        ]);
        // Room in the budget for five 1 MiB copies, one spent already.
        let config = RebalanceConfig {
            max_bytes_per_hour: 6 << 20,
            ..RebalanceConfig::default()
        };
        let files = vec![(data.clone(), BTreeMap::new())];
        let spent = Spent {
            total: 1 << 20,
            by_policy: HashMap::new(),
        };
        let planned = plan_pass(&config, &files, &nodes, &gpus, &heat, spent);
        let summary: Vec<(u32, &str, bool, MoveState)> = planned
            .moves
            .iter()
            .map(|m| {
                let mv = &m.movement;
                (mv.chunk.index, mv.to.as_str(), m.execute, mv.state)
            })
            .collect();
        use MoveState::{Planned, Refused};
        assert_eq!(
            summary,
            vec![
                (3, "r1", true, Planned),
                (3, "r2", true, Planned),
                // Refused by r3's watermark: one record for chunks 3 and 1.
                (3, "r3", false, Refused),
                (1, "r1", true, Planned),
                (1, "r2", true, Planned),
                (0, "r1", true, Planned),
                // Refused by the budget.
                (0, "r2", false, Refused),
                (0, "r3", false, Refused),
            ]
        );
        let watermark = &planned.moves[2].movement.reason;
        assert!(
            watermark.contains("r3 would pass its high watermark of 90% (90% full)"),
            "{watermark}"
        );
        assert!(
            watermark.ends_with("(and 1 more chunks of this file to r3, 2097152 bytes in all)"),
            "{watermark}"
        );
        let budget = &planned.moves[6].movement.reason;
        assert!(budget.contains("would pass the budget"), "{budget}");
        let first = &planned.moves[0].movement;
        assert_eq!(
            (first.from.as_str(), first.at_ms, first.bytes),
            ("store", 7, 1 << 20)
        );
        assert!(
            first
                .reason
                .contains("read by job on 2 GPUs of r1; r1 costs them 4"),
            "{}",
            first.reason
        );
    }

    /// The log keeps the last `retention` and at most `keep` records, oldest removed first,
    /// in batches small enough for etcd; another prefix is untouched.
    #[tokio::test]
    async fn the_audit_log_is_trimmed_by_age_and_count() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("m.redb")).unwrap();
        let day = 24 * 3600 * 1000;
        let now = 100 * day;
        let mut txn = Txn::new();
        // 150 records 40 days old, 120 from the last day; one agent record 40 days old.
        for seq in 0..150 {
            txn.put(model::audit_key(now - 40 * day, seq), b"{}".to_vec());
        }
        store.commit(&txn).await.unwrap();
        let mut txn = Txn::new();
        for seq in 0..120 {
            txn.put(model::audit_key(now - day, seq), b"{}".to_vec());
        }
        txn.put(model::agent_audit_key(now - 40 * day, 0), b"{}".to_vec());
        store.commit(&txn).await.unwrap();
        let month = Duration::from_secs(30 * 24 * 3600);
        let gone = trim_audit(&store, model::AUDIT_PREFIX, now, month, 100)
            .await
            .unwrap();
        // The 150 old ones by age, and 20 of the recent ones past the count.
        assert_eq!(gone, 170);
        let left = store.scan(model::AUDIT_PREFIX).await.unwrap();
        assert_eq!(left.len(), 100);
        assert_eq!(
            left[0].key,
            model::audit_key(now - day, 20),
            "the oldest went first"
        );
        assert_eq!(
            store.scan(model::AGENT_AUDIT_PREFIX).await.unwrap().len(),
            1
        );
        // Nothing more to trim.
        assert_eq!(
            trim_audit(&store, model::AUDIT_PREFIX, now, month, 100)
                .await
                .unwrap(),
            0
        );
    }

    /// A rule's own watermark: a node 85% full is under the global 90%, but over the 80% of
    /// the `/scratch` rule, so surplus cold `/scratch` replicas go (down to 80%) and no
    /// other file's do.
    #[test]
    fn a_rule_s_watermark_sheds_its_files_first() {
        let nodes = [
            node("full", 100 << 20, 15 << 20),
            node("a", 100 << 20, 90 << 20),
            node("b", 100 << 20, 90 << 20),
        ];
        let three: &[&str] = &["full", "a", "b"];
        let scratch = layout("/scratch/x", 1, &[three; 8]);
        let other = layout("/keep/y", 2, &[three; 8]);
        let files = vec![(other, BTreeMap::new()), (scratch, BTreeMap::new())];
        let config = RebalanceConfig {
            policies: crate::policy::Policies::parse(
                "[[policy]]\nprefix = \"/scratch\"\nhigh_watermark = 0.8\n",
            )
            .unwrap(),
            ..RebalanceConfig::default()
        };
        let (gpus, heat) = (GpuTable::default(), HashMap::new());
        let planned = plan_pass(&config, &files, &nodes, &gpus, &heat, Spent::default());
        // 85 MiB used, 80 MiB allowed: five 1 MiB /scratch replicas.
        assert_eq!(planned.moves.len(), 5, "{:?}", planned.moves);
        for planned in &planned.moves {
            let movement = &planned.movement;
            assert!(planned.execute && movement.kind == MoveKind::Drop);
            assert_eq!(
                (movement.path.as_str(), movement.from.as_str()),
                ("/scratch/x", "full")
            );
            assert!(
                movement.reason.contains("(watermark 80%)"),
                "{}",
                movement.reason
            );
        }
        let bad =
            crate::policy::Policies::parse("[[policy]]\nprefix = \"/s\"\nhigh_watermark = 1.5\n")
                .unwrap_err();
        assert!(bad.contains("policy[0].high_watermark 1.5"), "{bad}");
    }
}
