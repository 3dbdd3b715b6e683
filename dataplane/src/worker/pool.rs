use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::Sender;
use tier0_topology::WorkerPlan;

use super::doorbell::Doorbell;
use super::{PollMode, Request, SourceFactory, Worker, WorkerConfig};
use crate::buffer::BufferPoolConfig;
use crate::device::{BlockDevice, DeviceError, MemoryDrive};
use crate::store::ChunkStore;

/// A drive the data plane serves: its store, and the NUMA node whose workers own it.
#[derive(Clone, Debug)]
pub struct DriveSpec {
    pub name: String,
    pub store: Arc<ChunkStore>,
    pub numa_node: u32,
    /// The drive's one mapping when it is a file in memory and the daemon reads such drives
    /// by copies (`map_memory_drives`): every worker's device shares it.
    pub memory: Option<Arc<MemoryDrive>>,
}

/// Opens one worker's own handle (ring) on a drive. Real daemons open the drive's path with
/// io_uring, or a handle on its shared mapping when it is in memory (`DriveSpec::memory`);
/// tests hand out in-memory or fault-injecting devices.
pub type DeviceFactory =
    Arc<dyn Fn(&DriveSpec) -> Result<Box<dyn BlockDevice>, DeviceError> + Send + Sync>;

#[derive(Clone)]
pub struct WorkerPoolConfig {
    pub poll_mode: PollMode,
    pub in_flight_max: usize,
    /// Buffer pool of each worker; its NUMA node is set per worker from the plan.
    pub buffers: BufferPoolConfig,
    /// Pin each worker to its planned CPU.
    pub pin: bool,
    /// Request sources each worker drives in its own loop (see `RequestSource`).
    pub sources: Option<SourceFactory>,
}

impl Default for WorkerPoolConfig {
    fn default() -> Self {
        WorkerPoolConfig {
            poll_mode: PollMode::Adaptive,
            in_flight_max: 64,
            buffers: BufferPoolConfig::default(),
            pin: true,
            sources: None,
        }
    }
}

struct NodeWorkers {
    numa_node: u32,
    senders: Vec<(Sender<Request>, Arc<Doorbell>)>,
    next: AtomicUsize,
}

/// Every worker of the node's data plane, started from the topology worker plan.
///
/// Requests for a drive go to the workers of the drive's NUMA node, round-robin; each channel
/// is bounded, so a caller that outruns the workers blocks in [`WorkerPool::submit`].
pub struct WorkerPool {
    nodes: Vec<NodeWorkers>,
    /// Drive index → index into `nodes`.
    drive_nodes: Vec<usize>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for WorkerPoolConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPoolConfig")
            .field("poll_mode", &self.poll_mode)
            .field("in_flight_max", &self.in_flight_max)
            .field("buffers", &self.buffers)
            .field("pin", &self.pin)
            .field("sources", &self.sources.is_some())
            .finish()
    }
}

impl std::fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPool")
            .field("workers", &self.workers())
            .field("drives", &self.drive_nodes.len())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerPoolError {
    #[error("the worker plan has no workers")]
    NoWorkers,
    #[error("worker {worker} (NUMA node {numa_node}) failed to start: {reason}")]
    Start {
        worker: usize,
        numa_node: u32,
        reason: String,
    },
    #[error("could not spawn worker thread")]
    Spawn(#[source] std::io::Error),
}

impl WorkerPool {
    /// Starts one worker per planned CPU. Each drive is served by the workers of its NUMA
    /// node, or of the first planned node when its own has none.
    pub fn start(
        plan: &WorkerPlan,
        drives: &[DriveSpec],
        factory: DeviceFactory,
        config: &WorkerPoolConfig,
    ) -> Result<Self, WorkerPoolError> {
        if plan.worker_count() == 0 {
            return Err(WorkerPoolError::NoWorkers);
        }
        let node_index = |numa_node: u32| {
            plan.numa_nodes
                .iter()
                .position(|node| node.numa_node == numa_node)
                .unwrap_or(0)
        };
        let drive_nodes: Vec<usize> = drives
            .iter()
            .map(|drive| node_index(drive.numa_node))
            .collect();

        let mut pool = WorkerPool {
            nodes: Vec::new(),
            drive_nodes: drive_nodes.clone(),
            threads: Vec::new(),
        };
        let mut worker_id = 0;
        for node in &plan.numa_nodes {
            let mut senders = Vec::new();
            for &cpu in &node.worker_cpus {
                let (sender, receiver) =
                    crossbeam_channel::bounded(config.in_flight_max.max(1) * 2);
                let doorbell =
                    Arc::new(Doorbell::new().map_err(|error| WorkerPoolError::Start {
                        worker: worker_id,
                        numa_node: node.numa_node,
                        reason: format!("eventfd: {error}"),
                    })?);
                let worker_doorbell = doorbell.clone();
                let sources = config
                    .sources
                    .as_ref()
                    .map(|factory| factory(worker_id))
                    .unwrap_or_default();
                let worker_config = WorkerConfig {
                    id: worker_id,
                    numa_node: node.numa_node,
                    cpu: config.pin.then_some(cpu),
                    poll_mode: config.poll_mode,
                    in_flight_max: config.in_flight_max,
                    buffers: BufferPoolConfig {
                        numa_node: Some(node.numa_node),
                        ..config.buffers.clone()
                    },
                };
                // Every worker opens its own handle (ring) on every drive, on its own thread
                // after pinning, so ring memory is local; drives of other nodes are only routed
                // here when their own node has no workers.
                let drives = drives.to_vec();
                let factory = factory.clone();
                let (ready_sender, ready) = crossbeam_channel::bounded(1);
                let thread = std::thread::Builder::new()
                    .name(format!("tier0-worker-{worker_id}"))
                    .spawn(move || {
                        match Worker::new(
                            worker_config,
                            &drives,
                            &factory,
                            receiver,
                            worker_doorbell,
                            sources,
                        ) {
                            Ok(worker) => {
                                let _ = ready_sender.send(Ok(()));
                                worker.run();
                            }
                            Err(reason) => {
                                let _ = ready_sender.send(Err(reason));
                            }
                        }
                    })
                    .map_err(WorkerPoolError::Spawn)?;
                pool.threads.push(thread);
                match ready.recv() {
                    Ok(Ok(())) => {}
                    Ok(Err(reason)) => {
                        return Err(WorkerPoolError::Start {
                            worker: worker_id,
                            numa_node: node.numa_node,
                            reason,
                        });
                    }
                    Err(_) => {
                        return Err(WorkerPoolError::Start {
                            worker: worker_id,
                            numa_node: node.numa_node,
                            reason: "the worker thread exited during start-up".to_string(),
                        });
                    }
                }
                senders.push((sender, doorbell));
                worker_id += 1;
            }
            pool.nodes.push(NodeWorkers {
                numa_node: node.numa_node,
                senders,
                next: AtomicUsize::new(0),
            });
        }
        Ok(pool)
    }

    pub fn workers(&self) -> usize {
        self.nodes.iter().map(|node| node.senders.len()).sum()
    }

    /// The NUMA node whose workers serve `drive`.
    pub fn drive_numa_node(&self, drive: usize) -> Option<u32> {
        self.drive_nodes
            .get(drive)
            .map(|&node| self.nodes[node].numa_node)
    }

    /// Queues a request on a worker of the drive's node; blocks while that worker's queue is
    /// full. A request for an unknown drive goes to any worker, which answers with an error.
    pub fn submit(&self, request: Request) -> Result<(), Request> {
        let node = &self.nodes[self.drive_nodes.get(request.drive).copied().unwrap_or(0)];
        let worker = node.next.fetch_add(1, Ordering::Relaxed) % node.senders.len();
        let (sender, doorbell) = &node.senders[worker];
        sender.send(request).map_err(|error| error.into_inner())?;
        doorbell.ring();
        Ok(())
    }

    /// Stops taking requests, lets the workers finish what they hold, and joins them.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        // Dropping the senders tells the workers to finish, but a worker asleep in its ring
        // does not notice a dropped channel (nor a stopped acceptor, with idle connections
        // open): ring each one after, so it looks, closes what is idle and exits.
        let doorbells: Vec<Arc<Doorbell>> = self
            .nodes
            .iter()
            .flat_map(|node| {
                node.senders
                    .iter()
                    .map(|(_, doorbell)| Arc::clone(doorbell))
            })
            .collect();
        self.nodes.clear();
        for doorbell in &doorbells {
            doorbell.ring();
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.stop();
    }
}
