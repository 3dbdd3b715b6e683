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

use crate::model::{NO_ROUTE, NodeRecord, NodeState, now_ms};

/// The network between two nodes: beyond any route inside one, so a home next to the readers
/// beats every remote one.
pub const NETWORK_COST: u32 = 6;

/// One GPU as its scheduler sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuStatus {
    pub index: u32,
    pub busy: bool,
    /// The job it runs (empty: none).
    pub job: String,
}

/// A GPU of the cluster: its node and index.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GpuRef {
    pub node: String,
    pub index: u32,
}

/// A job that will read `paths` on `gpus`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub name: String,
    pub paths: Vec<String>,
    pub gpus: Vec<GpuRef>,
}

/// A node, its GPUs and when they were reported (ms since the epoch).
pub type NodeGpus = (String, Vec<GpuStatus>, u64);

#[derive(Debug, Default)]
struct Tables {
    /// Per node: its GPUs and when they were reported.
    nodes: BTreeMap<String, (Vec<GpuStatus>, u64)>,
    jobs: BTreeMap<String, Job>,
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

    /// Replaces `job`'s declaration; one with no paths and no GPUs ends it.
    pub fn declare(&self, job: Job) {
        let mut tables = self.lock();
        if job.paths.is_empty() && job.gpus.is_empty() {
            tables.jobs.remove(&job.name);
        } else {
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

    /// Every node's GPUs (with the report time, ms since the epoch) and every job.
    pub fn snapshot(&self) -> (Vec<NodeGpus>, Vec<Job>) {
        let tables = self.lock();
        (
            tables
                .nodes
                .iter()
                .map(|(node, (gpus, at))| (node.clone(), gpus.clone(), *at))
                .collect(),
            tables.jobs.values().cloned().collect(),
        )
    }

    /// The GPUs that will read `path`: those of every job that declared `path` or a
    /// directory above it, unless their node reports them busy with another job. Also the
    /// jobs counted.
    pub fn readers_of(&self, path: &str) -> (Vec<GpuRef>, Vec<String>) {
        let tables = self.lock();
        let mut readers = BTreeSet::new();
        let mut jobs = Vec::new();
        for job in tables.jobs.values() {
            if !job.paths.iter().any(|declared| covers(declared, path)) {
                continue;
            }
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

/// The route cost from home `home` to GPU `reader` (`node`: its node's record, if listed).
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

/// The up nodes of `nodes` as homes for data `readers` will read, cheapest first (ties by
/// node id). A reader on a node `nodes` does not list counts as remote from every home, at
/// the worst route cost.
pub fn rank_homes(nodes: &[NodeRecord], readers: &[GpuRef]) -> Vec<HomeScore> {
    // Each reader's node record, found once.
    let reading: Vec<(&GpuRef, Option<&NodeRecord>)> = readers
        .iter()
        .map(|reader| (reader, nodes.iter().find(|node| node.id == reader.node)))
        .collect();
    let mut homes: Vec<HomeScore> = nodes
        .iter()
        .filter(|node| node.state == NodeState::Up)
        .map(|home| {
            let mut cost = 0u64;
            let mut local_gpus = 0;
            for &(reader, node) in &reading {
                cost += u64::from(route_cost(home, reader, node));
                if home.id == reader.node {
                    local_gpus += 1;
                }
            }
            HomeScore {
                node: home.id.clone(),
                cost,
                local_gpus,
            }
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
                },
                GpuStatus {
                    index: 1,
                    busy: true,
                    job: "other".into(),
                },
                GpuStatus {
                    index: 2,
                    busy: true,
                    job: "train".into(),
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
}
