//! Where hot data should live: which GPUs are idle and which jobs will read which paths (as
//! schedulers report them), and the score of each node as the home of a file's data for
//! those GPUs, from the topology distance model.
//!
//! The score of home `H` for one reading GPU `g` on node `M` is the route cost a chunk takes
//! to reach it (`Locality::cost`, 0 same device … 5 across packages, 6 no such device):
//! - `H == M`: drive → GPU on one node, `g`'s drive cost;
//! - otherwise: drive → NIC on `H` (its drive–NIC cost), the network ([`NETWORK_COST`]),
//!   NIC → GPU on `M` (`g`'s NIC cost).
//!
//! A home's score is the sum over the reading GPUs; the best home has the lowest. So a node
//! whose NVMe sits under the same PCIe switch as the idle GPUs wins, then one whose GPUs reach
//! a local drive across the host bridge, and a node with no readers of its own ranks by how
//! directly its drives reach its NIC.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::store::{MetadataStore, Txn};

use crate::model::{NO_ROUTE, NodeRecord, NodeState, now_ms};

/// The network between two nodes: beyond any route inside one, so a home next to the readers
/// beats every remote one.
pub const NETWORK_COST: u32 = 6;

/// One GPU as its scheduler sees it, or as NVML on its node measured it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuStatus {
    pub index: u32,
    pub busy: bool,
    /// The job it runs (empty: none, or not known).
    pub job: String,
    /// What NVML measured on the node, if it did (never stored: measures are soft state).
    #[serde(skip)]
    pub measured: Option<Measured>,
}

/// A GPU's activity as NVML measured it on its node (`tier0_topology::GpuMonitor`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Measured {
    pub utilization_percent: u32,
    pub compute_processes: u32,
    pub memory_used_bytes: u64,
}

/// A GPU of the cluster: its node and index.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GpuRef {
    pub node: String,
    pub index: u32,
}

/// A job that will read `paths` on `gpus`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub name: String,
    pub paths: Vec<String>,
    pub gpus: Vec<GpuRef>,
}

/// A node, its GPUs and when they were reported (ms since the epoch).
pub type NodeGpus = (String, Vec<GpuStatus>, u64);

#[derive(Debug, Default)]
struct Tables {
    /// Per node: its GPUs as its scheduler reported them, and when.
    nodes: BTreeMap<String, (Vec<GpuStatus>, u64)>,
    /// Per node: its GPUs as NVML there measured them (its heartbeats), and when.
    measured: BTreeMap<String, (Vec<GpuStatus>, u64)>,
    jobs: BTreeMap<String, Job>,
    /// Per declared path (without a trailing `/`; the root is empty): the jobs that declared
    /// it, so a file's readers are found by walking its ancestors, not every job.
    by_path: BTreeMap<String, BTreeSet<String>>,
    /// Paths a scheduler asked to have on nodes before its job starts.
    prestages: BTreeMap<String, Vec<String>>,
}

/// GPU state and declared jobs: soft state, as the schedulers last reported them.
#[derive(Debug, Default)]
pub struct GpuTable {
    tables: Mutex<Tables>,
}

impl GpuTable {
    /// Replaces `node`'s GPUs.
    pub fn report(&self, node: &str, gpus: Vec<GpuStatus>) {
        self.lock().nodes.insert(node.to_string(), (gpus, now_ms()));
    }

    /// Replaces what schedulers said (reported GPUs, jobs, prestages) with `intent`, as the
    /// metadata store holds it; NVML's measures stay.
    pub fn replace_intent(&self, intent: Intent) {
        let mut tables = self.lock();
        tables.nodes = intent.reported;
        tables.prestages = intent.prestages;
        tables.jobs.clear();
        tables.by_path.clear();
        drop(tables);
        for job in intent.jobs {
            self.declare(job);
        }
    }

    /// Replaces what NVML on `node` last measured (a heartbeat's GPUs).
    pub fn measure(&self, node: &str, gpus: Vec<GpuStatus>) {
        self.lock()
            .measured
            .insert(node.to_string(), (gpus, now_ms()));
    }

    /// Forgets what `node` measured (its heartbeat says it has no NVML any more).
    pub fn forget_measures(&self, node: &str) {
        self.lock().measured.remove(node);
    }

    /// Replaces `job`'s declaration; one with no paths and no GPUs ends it.
    pub fn declare(&self, job: Job) {
        let mut tables = self.lock();
        if let Some(old) = tables.jobs.remove(&job.name) {
            for path in &old.paths {
                let key = path.trim_end_matches('/');
                if let Some(jobs) = tables.by_path.get_mut(key) {
                    jobs.remove(&old.name);
                    if jobs.is_empty() {
                        tables.by_path.remove(key);
                    }
                }
            }
        }
        if !(job.paths.is_empty() && job.gpus.is_empty()) {
            for path in &job.paths {
                tables
                    .by_path
                    .entry(path.trim_end_matches('/').to_string())
                    .or_default()
                    .insert(job.name.clone());
            }
            tables.jobs.insert(job.name.clone(), job);
        }
    }

    /// Asks that `path` (a file or a directory) be copied to `nodes`; no nodes cancels it.
    pub fn prestage(&self, path: &str, nodes: Vec<String>) {
        let mut tables = self.lock();
        if nodes.is_empty() {
            tables.prestages.remove(path);
        } else {
            tables.prestages.insert(path.to_string(), nodes);
        }
    }

    /// The nodes `path` should be prestaged to: those of every request for it or a
    /// directory above it.
    pub fn prestaged_to(&self, path: &str) -> Vec<String> {
        let tables = self.lock();
        let mut nodes: Vec<String> = tables
            .prestages
            .iter()
            .filter(|(requested, _)| covers(requested, path))
            .flat_map(|(_, nodes)| nodes.iter().cloned())
            .collect();
        nodes.sort();
        nodes.dedup();
        nodes
    }

    /// Every prestage request: path and nodes.
    pub fn prestages(&self) -> Vec<(String, Vec<String>)> {
        self.lock()
            .prestages
            .iter()
            .map(|(path, nodes)| (path.clone(), nodes.clone()))
            .collect()
    }

    /// Every node's GPUs (with the latest report time, ms since the epoch) and every job.
    /// A GPU both reported and measured is busy when either says so, with the scheduler's
    /// job and NVML's figures.
    pub fn snapshot(&self) -> (Vec<NodeGpus>, Vec<Job>) {
        let tables = self.lock();
        let names: BTreeSet<&String> = tables.nodes.keys().chain(tables.measured.keys()).collect();
        let nodes = names
            .into_iter()
            .map(|node| {
                let mut gpus: BTreeMap<u32, GpuStatus> = BTreeMap::new();
                let mut at = 0;
                if let Some((reported, reported_at)) = tables.nodes.get(node) {
                    gpus.extend(reported.iter().map(|gpu| (gpu.index, gpu.clone())));
                    at = *reported_at;
                }
                if let Some((measured, measured_at)) = tables.measured.get(node) {
                    for gpu in measured {
                        gpus.entry(gpu.index)
                            .and_modify(|known| {
                                known.busy |= gpu.busy;
                                known.measured = gpu.measured.clone();
                            })
                            .or_insert_with(|| gpu.clone());
                    }
                    at = at.max(*measured_at);
                }
                (node.clone(), gpus.into_values().collect(), at)
            })
            .collect();
        (nodes, tables.jobs.values().cloned().collect())
    }

    /// The GPUs that will read `path`: those of every job that declared `path` or a
    /// directory above it, unless their scheduler reports them busy with another job. Also
    /// the jobs counted. (NVML's busy, which names no job, does not take a GPU from the job
    /// that declared it: that job is most likely what keeps it busy.)
    pub fn readers_of(&self, path: &str) -> (Vec<GpuRef>, Vec<String>) {
        let tables = self.lock();
        let mut readers = BTreeSet::new();
        // The jobs that declared `path` or a directory above it: its ancestors, looked up.
        let mut names: BTreeSet<&String> = BTreeSet::new();
        let mut ancestor = path.trim_end_matches('/');
        loop {
            if let Some(declared) = tables.by_path.get(ancestor) {
                names.extend(declared);
            }
            match ancestor.rfind('/') {
                Some(slash) => ancestor = &ancestor[..slash],
                None => break,
            }
        }
        let mut jobs = Vec::new();
        for job in names.into_iter().filter_map(|name| tables.jobs.get(name)) {
            jobs.push(job.name.clone());
            for gpu in &job.gpus {
                let status = tables
                    .nodes
                    .get(&gpu.node)
                    .and_then(|(gpus, _)| gpus.iter().find(|status| status.index == gpu.index));
                let taken = status.is_some_and(|status| status.busy && status.job != job.name);
                if !taken {
                    readers.insert(gpu.clone());
                }
            }
        }
        (readers.into_iter().collect(), jobs)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// What schedulers said, as the metadata store keeps it (`job/`, `prestage/`, `gpus/`):
/// every control plane of a cluster reads the same, and a restart forgets none of it.
#[derive(Debug, Default)]
pub struct Intent {
    pub reported: BTreeMap<String, (Vec<GpuStatus>, u64)>,
    pub jobs: Vec<Job>,
    pub prestages: BTreeMap<String, Vec<String>>,
}

/// A node's GPUs as its scheduler reported them (`gpus/<node>`).
#[derive(Debug, Serialize, Deserialize)]
struct ReportedGpus {
    gpus: Vec<GpuStatus>,
    reported_ms: u64,
}

/// Stores a scheduler's report of `node`'s GPUs.
pub async fn store_report(store: &dyn MetadataStore, node: &str, gpus: &[GpuStatus]) -> Result<()> {
    let record = ReportedGpus {
        gpus: gpus.to_vec(),
        reported_ms: now_ms(),
    };
    let mut txn = Txn::new();
    txn.put(
        crate::model::reported_gpus_key(node),
        crate::model::encode(&record),
    );
    store.commit(&txn).await?;
    Ok(())
}

/// Stores a job's declaration; one with no paths and no GPUs removes it.
pub async fn store_job(store: &dyn MetadataStore, job: &Job) -> Result<()> {
    let mut txn = Txn::new();
    let key = crate::model::job_key(&job.name);
    if job.paths.is_empty() && job.gpus.is_empty() {
        txn.delete(key);
    } else {
        txn.put(key, crate::model::encode(job));
    }
    store.commit(&txn).await?;
    Ok(())
}

/// Stores a prestage request; no nodes removes it.
pub async fn store_prestage(store: &dyn MetadataStore, path: &str, nodes: &[String]) -> Result<()> {
    let mut txn = Txn::new();
    let key = crate::model::prestage_key(path);
    if nodes.is_empty() {
        txn.delete(key);
    } else {
        txn.put(key, crate::model::encode(&nodes));
    }
    store.commit(&txn).await?;
    Ok(())
}

/// Brings `table` up to what schedulers said, as the store keeps it (they may have said it to
/// another control plane of the cluster).
pub async fn refresh(store: &dyn MetadataStore, table: &GpuTable) -> Result<()> {
    table.replace_intent(load_intent(store).await?);
    Ok(())
}

/// Reads what schedulers said from the store.
pub async fn load_intent(store: &dyn MetadataStore) -> Result<Intent> {
    let mut intent = Intent::default();
    for entry in store.scan(crate::model::REPORTED_GPUS_PREFIX).await? {
        let node = entry.key[crate::model::REPORTED_GPUS_PREFIX.len()..].to_string();
        let record: ReportedGpus = crate::model::decode(&entry.key, &entry.value)?;
        intent
            .reported
            .insert(node, (record.gpus, record.reported_ms));
    }
    for entry in store.scan(crate::model::JOBS_PREFIX).await? {
        intent
            .jobs
            .push(crate::model::decode(&entry.key, &entry.value)?);
    }
    for entry in store.scan(crate::model::PRESTAGES_PREFIX).await? {
        let path = entry.key[crate::model::PRESTAGES_PREFIX.len()..].to_string();
        intent
            .prestages
            .insert(path, crate::model::decode(&entry.key, &entry.value)?);
    }
    Ok(intent)
}

/// Whether a job that declared `declared` reads `path`: the same path, or a directory above.
fn covers(declared: &str, path: &str) -> bool {
    let declared = declared.trim_end_matches('/');
    declared.is_empty()
        || path == declared
        || path
            .strip_prefix(declared)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// A node scored as the home of a file's data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HomeScore {
    pub node: String,
    pub cost: u64,
    /// Reading GPUs on this node.
    pub local_gpus: u32,
}

/// The route cost from home `home` to GPU `reader` (`node`: its node's record, if listed):
/// the definition [`home_costs`] sums in closed form (a test checks they agree).
#[cfg(test)]
fn route_cost(home: &NodeRecord, reader: &GpuRef, node: Option<&NodeRecord>) -> u32 {
    let feed = node.and_then(|node| {
        node.topology
            .gpu_feeds
            .iter()
            .find(|feed| feed.index == reader.index)
    });
    let (drive, nic) = feed.map_or((NO_ROUTE, NO_ROUTE), |feed| {
        (feed.drive_cost, feed.nic_cost)
    });
    if home.id == reader.node {
        drive
    } else {
        home.topology.drive_nic_cost + NETWORK_COST + nic
    }
}

/// Each of `nodes`' cost as the home of data `readers` will read, and the readers on it, in
/// `nodes`' order (`None` for a node that is not up); `index_of` finds a reader's node in
/// `nodes`. A reader on a node `nodes` does not list counts as remote from every home, at the
/// worst route cost.
///
/// The sum over readers of [`route_cost`] splits into what every home pays (each reader's
/// NIC cost, and the home's drive–NIC cost plus the network per reader) and what only a
/// reader's own node pays instead (its drive costs), so all homes cost O(nodes + readers).
pub fn home_costs(
    nodes: &[NodeRecord],
    readers: &[GpuRef],
    index_of: impl Fn(&str) -> Option<usize>,
) -> Vec<Option<(u64, u32)>> {
    let count = readers.len() as u64;
    let mut all_nic = 0u64;
    // Per node with readers: (its index, their drive costs, their NIC costs, how many).
    let mut local: Vec<(usize, u64, u64, u32)> = Vec::new();
    for reader in readers {
        let node = index_of(&reader.node);
        let feed = node.and_then(|node| {
            nodes[node]
                .topology
                .gpu_feeds
                .iter()
                .find(|feed| feed.index == reader.index)
        });
        let (drive, nic) = feed.map_or((NO_ROUTE, NO_ROUTE), |feed| {
            (feed.drive_cost, feed.nic_cost)
        });
        all_nic += u64::from(nic);
        if let Some(node) = node {
            match local.iter_mut().find(|entry| entry.0 == node) {
                Some(entry) => {
                    entry.1 += u64::from(drive);
                    entry.2 += u64::from(nic);
                    entry.3 += 1;
                }
                None => local.push((node, u64::from(drive), u64::from(nic), 1)),
            }
        }
    }
    let remote = |home: &NodeRecord, readers: u64| {
        readers * u64::from(home.topology.drive_nic_cost + NETWORK_COST)
    };
    let mut costs: Vec<Option<(u64, u32)>> = nodes
        .iter()
        .map(|home| (home.state == NodeState::Up).then(|| (remote(home, count) + all_nic, 0)))
        .collect();
    for (node, drive, nic, on_it) in local {
        if let Some(cost) = &mut costs[node] {
            let home = &nodes[node];
            *cost = (
                drive + remote(home, count - u64::from(on_it)) + (all_nic - nic),
                on_it,
            );
        }
    }
    costs
}

/// The up nodes of `nodes` as homes for data `readers` will read, cheapest first (ties by
/// node id). A reader on a node `nodes` does not list counts as remote from every home, at
/// the worst route cost.
pub fn rank_homes(nodes: &[NodeRecord], readers: &[GpuRef]) -> Vec<HomeScore> {
    let costs = home_costs(nodes, readers, |id| {
        nodes.iter().position(|node| node.id == id)
    });
    let mut homes: Vec<HomeScore> = nodes
        .iter()
        .zip(costs)
        .filter_map(|(home, cost)| {
            let (cost, local_gpus) = cost?;
            Some(HomeScore {
                node: home.id.clone(),
                cost,
                local_gpus,
            })
        })
        .collect();
    homes.sort_by(|a, b| a.cost.cmp(&b.cost).then(a.node.cmp(&b.node)));
    homes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{GpuFeed, TopologySummary};

    fn node(id: &str, gpus: &[(u32, u32)], drive_nic_cost: u32) -> NodeRecord {
        NodeRecord {
            id: id.to_string(),
            address: format!("{id}:7400"),
            topology: TopologySummary {
                gpu_feeds: gpus
                    .iter()
                    .enumerate()
                    .map(|(index, &(drive_cost, nic_cost))| GpuFeed {
                        index: index as u32,
                        numa_node: Some(0),
                        drive_cost,
                        nic_cost,
                    })
                    .collect(),
                drive_nic_cost,
                ..TopologySummary::default()
            },
            state: NodeState::Up,
            registered_ms: 0,
            heartbeat_ms: 0,
            lease_expires_ms: 0,
        }
    }

    fn gpu(node: &str, index: u32) -> GpuRef {
        GpuRef {
            node: node.to_string(),
            index,
        }
    }

    #[test]
    fn the_node_of_the_reading_gpus_is_the_best_home_and_nearer_drives_win() {
        // a: GPUs under the drive's PCIe switch; b: across the host bridge; c: no GPUs, its
        // drive and NIC on one host bridge.
        let nodes = [
            node("a", &[(1, 1), (1, 1)], 2),
            node("b", &[(2, 1), (2, 1)], 2),
            node("c", &[], 2),
        ];
        let on_b = rank_homes(&nodes, &[gpu("b", 0), gpu("b", 1)]);
        assert_eq!(
            on_b[0],
            HomeScore {
                node: "b".into(),
                cost: 4,
                local_gpus: 2
            }
        );
        // Remote homes: drive-NIC 2 + network 6 + the GPU's NIC 1, twice.
        assert_eq!((on_b[1].node.as_str(), on_b[1].cost), ("a", 18));
        assert_eq!((on_b[2].node.as_str(), on_b[2].cost), ("c", 18));
        // Readers on both: a's nearer drives make it the better home.
        let both = rank_homes(&nodes, &[gpu("a", 0), gpu("b", 0)]);
        assert_eq!(both[0].node, "a");
        assert_eq!(both[0].cost, 1 + 9);
        assert_eq!(both[1].cost, 9 + 2);
        // No readers: every home costs nothing; ties go by node id.
        let none = rank_homes(&nodes, &[]);
        assert_eq!(
            none.iter()
                .map(|home| home.node.as_str())
                .collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
    }

    #[test]
    fn down_nodes_are_no_home_and_unknown_readers_cost_the_worst_route() {
        let mut nodes = [node("a", &[(1, 1)], 2), node("b", &[(1, 1)], 5)];
        nodes[0].state = NodeState::Down;
        let homes = rank_homes(&nodes, &[gpu("a", 0), gpu("z", 3)]);
        assert_eq!(homes.len(), 1);
        // To a (down but listed): 5 + 6 + 1; to z (not listed): 5 + 6 + 6.
        assert_eq!(homes[0].cost, 12 + 17);
    }

    #[test]
    fn readers_are_the_idle_gpus_of_jobs_that_declared_the_path_or_a_directory_above() {
        let table = GpuTable::default();
        table.report(
            "a",
            vec![
                GpuStatus {
                    index: 0,
                    busy: false,
                    job: String::new(),
                    measured: None,
                },
                GpuStatus {
                    index: 1,
                    busy: true,
                    job: "other".into(),
                    measured: None,
                },
                GpuStatus {
                    index: 2,
                    busy: true,
                    job: "train".into(),
                    measured: None,
                },
            ],
        );
        table.declare(Job {
            name: "train".into(),
            paths: vec!["/datasets/web/".into()],
            gpus: vec![gpu("a", 0), gpu("a", 1), gpu("a", 2), gpu("b", 0)],
        });
        table.declare(Job {
            name: "eval".into(),
            paths: vec!["/datasets/webtext".into()],
            gpus: vec![gpu("c", 0)],
        });
        let (readers, jobs) = table.readers_of("/datasets/web/shard-0");
        // GPU a/1 runs another job; a/2 runs this one; b/0 is not reported (free to use).
        assert_eq!(readers, vec![gpu("a", 0), gpu("a", 2), gpu("b", 0)]);
        assert_eq!(jobs, vec!["train".to_string()]);
        // "/datasets/web" does not cover "/datasets/webtext".
        assert_eq!(
            table.readers_of("/datasets/webtext/x").1,
            vec!["eval".to_string()]
        );
        assert!(table.readers_of("/elsewhere").0.is_empty());
        // Declaring nothing ends the job.
        table.declare(Job {
            name: "train".into(),
            paths: vec![],
            gpus: vec![],
        });
        assert!(table.readers_of("/datasets/web/shard-0").0.is_empty());
        let (nodes, jobs) = table.snapshot();
        assert_eq!((nodes.len(), jobs.len()), (1, 1));
    }

    /// NVML's measures join the scheduler's reports: busy if either says so, the scheduler's
    /// job, NVML's figures; a GPU only NVML knows is listed too; the job that declared a GPU
    /// NVML sees busy still reads with it.
    #[test]
    fn measured_gpus_merge_with_reported_ones_and_do_not_take_readers_away() {
        let table = GpuTable::default();
        let status = |index, busy, job: &str, measured: Option<u32>| GpuStatus {
            index,
            busy,
            job: job.into(),
            measured: measured.map(|utilization_percent| Measured {
                utilization_percent,
                compute_processes: 1,
                memory_used_bytes: 1 << 30,
            }),
        };
        table.report(
            "a",
            vec![status(0, false, "", None), status(1, true, "train", None)],
        );
        table.measure(
            "a",
            vec![status(0, true, "", Some(80)), status(2, false, "", Some(0))],
        );
        table.measure("m", vec![status(0, true, "", Some(99))]);
        table.declare(Job {
            name: "train".into(),
            paths: vec!["/d".into()],
            gpus: vec![gpu("a", 0), gpu("m", 0)],
        });
        let (nodes, _) = table.snapshot();
        let a = &nodes.iter().find(|(node, _, _)| node == "a").unwrap().1;
        assert_eq!(a.len(), 3);
        assert!(a[0].busy && a[0].measured.as_ref().unwrap().utilization_percent == 80);
        assert_eq!(
            (a[1].busy, a[1].job.as_str(), a[1].measured.is_none()),
            (true, "train", true)
        );
        assert!(!a[2].busy && a[2].measured.is_some());
        assert!(
            nodes
                .iter()
                .any(|(node, gpus, _)| node == "m" && gpus[0].busy)
        );
        assert_eq!(table.readers_of("/d/x").0, vec![gpu("a", 0), gpu("m", 0)]);
        table.forget_measures("m");
        assert!(!table.snapshot().0.iter().any(|(node, _, _)| node == "m"));
    }

    /// The closed form of `home_costs` is the sum of `route_cost` over the readers, on random
    /// clusters: readers on one node, on several, on unlisted nodes, down homes.
    #[test]
    fn home_costs_are_the_sum_of_route_costs() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..200 {
            let mut nodes: Vec<NodeRecord> = (0..rng.usize(1..8))
                .map(|n| {
                    let gpus: Vec<(u32, u32)> = (0..rng.u32(0..4))
                        .map(|_| (rng.u32(0..7), rng.u32(0..7)))
                        .collect();
                    node(&format!("n{n}"), &gpus, rng.u32(0..7))
                })
                .collect();
            for node in &mut nodes {
                if rng.u8(0..5) == 0 {
                    node.state = NodeState::Down;
                }
            }
            let readers: Vec<GpuRef> = (0..rng.usize(0..10))
                .map(|_| gpu(&format!("n{}", rng.usize(0..9)), rng.u32(0..4)))
                .collect();
            let costs = home_costs(&nodes, &readers, |id| nodes.iter().position(|n| n.id == id));
            for (home, cost) in nodes.iter().zip(costs) {
                if home.state != NodeState::Up {
                    assert_eq!(cost, None);
                    continue;
                }
                let sum: u64 = readers
                    .iter()
                    .map(|r| {
                        let node = nodes.iter().find(|n| n.id == r.node);
                        u64::from(route_cost(home, r, node))
                    })
                    .sum();
                let local = readers.iter().filter(|r| r.node == home.id).count() as u32;
                assert_eq!(cost, Some((sum, local)), "{home:?} {readers:?}");
            }
        }
    }
}
