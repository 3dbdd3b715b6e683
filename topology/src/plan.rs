//! Which cores run data-plane workers, and which devices each NUMA node's workers use.

use serde::{Deserialize, Serialize};

use crate::distance::{Distance, Locality};
use crate::machine::{BlockDeviceKind, Machine, NumaNode};

/// What the operator decides; the machine decides the rest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerPolicy {
    /// Workers per NUMA node; `None` runs one per physical core.
    pub workers_per_numa_node: Option<usize>,
    /// Logical CPUs the daemon may use (a cgroup or `--cpus` list); `None` allows all.
    pub allowed_cpus: Option<Vec<u32>>,
}

/// Per NUMA node with usable cores: its workers and the devices they own.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerPlan {
    pub numa_nodes: Vec<NumaWorkers>,
}

impl WorkerPlan {
    /// One NUMA node's workers on `worker_cpus`, with no devices: for tests and tools that
    /// place workers by hand.
    pub fn single_node(numa_node: u32, worker_cpus: Vec<u32>) -> WorkerPlan {
        WorkerPlan {
            numa_nodes: vec![NumaWorkers {
                numa_node,
                worker_cpus,
                ..NumaWorkers::default()
            }],
        }
    }

    pub fn worker_count(&self) -> usize {
        self.numa_nodes
            .iter()
            .map(|node| node.worker_cpus.len())
            .sum()
    }

    pub fn for_numa_node(&self, os_index: u32) -> Option<&NumaWorkers> {
        self.numa_nodes
            .iter()
            .find(|node| node.numa_node == os_index)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumaWorkers {
    pub numa_node: u32,
    /// One logical CPU per worker, each on a distinct physical core: the thread is pinned there.
    pub worker_cpus: Vec<u32>,
    /// The RDMA device these workers post to: the nearest one to the node, shared with other
    /// nodes only when there are fewer HCAs than nodes.
    pub rdma_device: Option<String>,
    /// How far that HCA is from the node (`numa_node` when local).
    pub rdma_locality: Option<Locality>,
    /// Block devices whose queues these workers own, NVMe first. Every drive belongs to
    /// exactly one node: its own, or the nearest node with workers when its own has none.
    pub block_devices: Vec<String>,
    /// GPUs attached to this node, by PCI address: the readers these workers serve best.
    pub gpus: Vec<String>,
}

/// Plans the data-plane workers of `machine` under `policy`.
///
/// Nodes without usable cores (memory-only nodes, or cores outside `allowed_cpus`) get no
/// workers; their devices go to the nearest node that has some.
pub fn plan_workers(machine: &Machine, policy: &WorkerPolicy) -> WorkerPlan {
    let mut plan = WorkerPlan {
        numa_nodes: machine
            .numa_nodes
            .iter()
            .filter_map(|node| {
                let worker_cpus = worker_cpus(node, policy);
                (!worker_cpus.is_empty()).then(|| NumaWorkers {
                    numa_node: node.os_index,
                    worker_cpus,
                    ..NumaWorkers::default()
                })
            })
            .collect(),
    };
    if plan.numa_nodes.is_empty() {
        return plan;
    }
    let node_of = |os_index: u32| {
        machine
            .numa_node(os_index)
            .expect("plan nodes come from the machine")
    };

    // RDMA: nearest HCA per node; among equally near ones, the least shared, so two nodes
    // with one local HCA each do not both pick the first.
    let mut uses = vec![0usize; machine.rdma_devices.len()];
    for workers in &mut plan.numa_nodes {
        let node = node_of(workers.numa_node);
        let best = machine
            .rdma_devices
            .iter()
            .enumerate()
            .min_by_key(|(index, device)| {
                (device.placement.distance_to_numa_node(node), uses[*index])
            });
        if let Some((index, device)) = best {
            uses[index] += 1;
            workers.rdma_device = Some(device.name.clone());
            workers.rdma_locality = Some(device.placement.distance_to_numa_node(node).locality);
        }
    }

    // Drives: each to the nearest planned node; ties go to the node with fewer drives so
    // drives of unknown locality spread evenly.
    let mut drives: Vec<_> = machine.block_devices.iter().collect();
    drives.sort_by_key(|drive| drive.kind != BlockDeviceKind::Nvme);
    for drive in drives {
        let owner = plan
            .numa_nodes
            .iter_mut()
            .min_by_key(|workers| {
                let distance: Distance = drive
                    .placement
                    .distance_to_numa_node(node_of(workers.numa_node));
                (distance.locality, workers.block_devices.len())
            })
            .expect("plan has at least one node");
        owner.block_devices.push(drive.name.clone());
    }

    for workers in &mut plan.numa_nodes {
        workers.gpus = machine
            .gpus_on_numa_node(workers.numa_node)
            .map(|gpu| gpu.pci_address.to_string())
            .collect();
    }
    plan
}

fn worker_cpus(node: &NumaNode, policy: &WorkerPolicy) -> Vec<u32> {
    let allowed = |cpu: &u32| {
        policy
            .allowed_cpus
            .as_ref()
            .is_none_or(|allowed| allowed.contains(cpu))
    };
    // One worker per physical core: two pollers on sibling hardware threads would share one
    // core's execution units and caches.
    let mut cpus: Vec<u32> = node
        .cores
        .iter()
        .filter_map(|core| core.cpus.iter().copied().find(allowed))
        .collect();
    if let Some(limit) = policy.workers_per_numa_node {
        // Keep the highest-numbered cores: the lowest ones usually take interrupts and
        // housekeeping threads.
        let skip = cpus.len().saturating_sub(limit);
        cpus.drain(..skip);
    }
    cpus
}
