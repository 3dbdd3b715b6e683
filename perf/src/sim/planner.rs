//! The planner benchmark (`tier0 sim planner`): one rebalancer pass planned by the control
//! plane's code (`HeatTable::totals_at`, then `rebalance::plan`) over a namespace of
//! `extents` extents on `nodes` nodes, timed.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use serde::Serialize;
use tier0_control::heat::{Heat, HeatTable};
use tier0_control::model::{Layout, LayoutChunk};
use tier0_control::orchestration::{GpuRef, GpuTable, Job};
use tier0_control::rebalance::{self, PlanInput, RebalanceConfig, Spent};
use tier0_dataplane::store::ChunkId;

use super::engine::node_records;

#[derive(Clone, Debug, Serialize)]
pub struct PlannerConfig {
    pub extents: u64,
    pub nodes: u32,
    pub gpus: u32,
    pub files: u32,
    pub replication: u32,
    /// The share of extents that are hot.
    pub hot_share: f64,
    /// The share of nodes running jobs; each job reads `files / jobs` files.
    pub busy_share: f64,
    pub seed: u64,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        PlannerConfig {
            extents: 10_000_000,
            nodes: 1000,
            gpus: 8,
            files: 10_000,
            replication: 2,
            hot_share: 0.05,
            busy_share: 0.75,
            seed: 1,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct PlannerReport {
    pub params: PlannerConfig,
    /// Building the namespace (placement included), seconds: not the planner's time.
    pub build_seconds: f64,
    /// Summing the nodes' heat reports, seconds.
    pub heat_seconds: f64,
    /// Planning the pass, seconds.
    pub plan_seconds: f64,
    pub hot_extents: u64,
    pub moves: u64,
    pub executable: u64,
    pub refused: u64,
}

pub fn run(config: &PlannerConfig) -> Result<PlannerReport, String> {
    if config.nodes == 0 || config.gpus == 0 || config.files == 0 || config.extents == 0 {
        return Err("--extents, --nodes, --gpus and --files: at least 1".into());
    }
    if config.replication == 0 || config.replication > config.nodes.min(8) {
        return Err(format!(
            "--replication {}: 1 to {}",
            config.replication,
            config.nodes.min(8)
        ));
    }
    if !(0.0..=1.0).contains(&config.hot_share) || !(0.0..=1.0).contains(&config.busy_share) {
        return Err("--hot-share and --busy-share: 0 to 1".into());
    }
    let built = Instant::now();
    let mut rng = fastrand::Rng::with_seed(config.seed);
    let extent: u32 = 64 << 20;
    // Enough capacity that no node is over its watermark: the pass plans copies only.
    let records = node_records(config.nodes, config.gpus, u64::MAX / 4);
    let index_of: std::collections::HashMap<&str, usize> = records
        .iter()
        .enumerate()
        .map(|(index, record)| (record.id.as_str(), index))
        .collect();
    let per_file = config.extents.div_ceil(u64::from(config.files));
    let heat = HeatTable::default();
    let mut reports: Vec<Vec<(ChunkId, Heat)>> = vec![Vec::new(); config.nodes as usize];
    let mut files = Vec::with_capacity(config.files as usize);
    let mut hot_extents = 0;
    let mut left = config.extents;
    for file in 0..config.files {
        let count = per_file.min(left) as u32;
        left -= u64::from(count);
        let file_id = u64::from(file) + 1;
        let placed =
            tier0_control::placement::place(&records, config.replication, file_id, 0, count)
                .map_err(|error| error.to_string())?;
        let chunks = placed
            .into_iter()
            .enumerate()
            .map(|(index, replicas)| {
                let id = ChunkId {
                    file: file_id,
                    index: index as u32,
                    generation: 1,
                };
                if rng.f64() < config.hot_share {
                    hot_extents += 1;
                    let server = index_of[replicas[0].as_str()];
                    let reads = 1.0 + 99.0 * rng.f64();
                    reports[server].push((
                        id,
                        Heat {
                            reads,
                            bytes: reads * f64::from(extent),
                        },
                    ));
                }
                LayoutChunk {
                    index: index as u32,
                    id,
                    len: extent,
                    replicas,
                }
            })
            .collect();
        files.push((
            Layout {
                path: format!("/data/f{file:07}"),
                file_id,
                version: 1,
                layout_version: 1,
                size: u64::from(count) * u64::from(extent),
                chunk_size: extent,
                replication: config.replication,
                chunks,
                nodes: Vec::new(),
            },
            BTreeMap::new(),
        ));
    }
    let at = Instant::now();
    for (node, chunks) in reports.into_iter().enumerate() {
        heat.report_at(&records[node].id, Duration::from_secs(600), chunks, at);
    }
    // Jobs on whole nodes (1 to 8 each), each reading an equal share of the files.
    let gpus = GpuTable::default();
    let mut order: Vec<u32> = (0..config.nodes).collect();
    rng.shuffle(&mut order);
    let busy = (f64::from(config.nodes) * config.busy_share).round() as usize;
    let mut jobs: Vec<Vec<u32>> = Vec::new();
    let mut taken = 0;
    while taken < busy.min(order.len()) {
        let size = (rng.usize(1..=8)).min(busy - taken);
        jobs.push(order[taken..taken + size].to_vec());
        taken += size;
    }
    for (index, nodes) in jobs.iter().enumerate() {
        let paths = (0..config.files)
            .filter(|file| *file as usize % jobs.len() == index)
            .map(|file| format!("/data/f{file:07}"))
            .collect();
        gpus.declare(Job {
            name: format!("job-{index}"),
            paths,
            gpus: nodes
                .iter()
                .flat_map(|&node| {
                    let records = &records;
                    (0..config.gpus).map(move |index| GpuRef {
                        node: records[node as usize].id.clone(),
                        index,
                    })
                })
                .collect(),
        });
    }
    let build_seconds = built.elapsed().as_secs_f64();

    let summed = Instant::now();
    let totals = heat.totals_at(at);
    let heat_seconds = summed.elapsed().as_secs_f64();
    let planning = Instant::now();
    let approved = HashSet::new();
    let plan = rebalance::plan(
        &RebalanceConfig::default(),
        &PlanInput {
            files: &files,
            nodes: &records,
            gpus: &gpus,
            heat: &totals,
            approved: &approved,
            spent: Spent::default(),
            now_ms: 0,
        },
    );
    let plan_seconds = planning.elapsed().as_secs_f64();
    let executable = plan.moves.iter().filter(|m| m.execute).count() as u64;
    let refused = plan
        .moves
        .iter()
        .filter(|m| m.movement.state == rebalance::MoveState::Refused)
        .count() as u64;
    Ok(PlannerReport {
        params: config.clone(),
        build_seconds,
        heat_seconds,
        plan_seconds,
        hot_extents,
        moves: plan.moves.len() as u64,
        executable,
        refused,
    })
}
