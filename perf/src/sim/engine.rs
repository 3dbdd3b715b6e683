//! The event loop of one simulation (one policy).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tier0_control::heat::{Heat, HeatTable};
use tier0_control::model::{GpuFeed, Layout, LayoutChunk, NodeRecord, NodeState, TopologySummary};
use tier0_control::orchestration::{GpuRef, GpuStatus, GpuTable, Job as DeclaredJob};
use tier0_control::rebalance::{
    self, COPY_STREAMS, MoveKind, PlanInput, PlannedMove, RebalanceConfig, Spent,
};
use tier0_dataplane::heat::{DEFAULT_HALF_LIFE, HeatMap};
use tier0_dataplane::store::ChunkId;

use super::{PolicyReport, SimConfig};

/// Where data lives and who moves it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Data stays where it was placed.
    None,
    /// tier0's rebalancer moves it.
    Tier0,
    /// Every read is local, for free.
    Oracle,
}

impl Policy {
    pub fn name(self) -> &'static str {
        match self {
            Policy::None => "none",
            Policy::Tier0 => "tier0",
            Policy::Oracle => "oracle",
        }
    }
}

/// Heat a heartbeat carries per node (`HeatReport::from_map`'s cap on the daemons).
const HEARTBEAT_CHUNKS: usize = 4096;

/// A drive or one direction of a NIC: serves one transfer at a time at full bandwidth, in the
/// order they come.
#[derive(Debug)]
struct Resource {
    bytes_per_s: f64,
    free_at: f64,
}

impl Resource {
    fn new(gbps: f64) -> Resource {
        Resource {
            bytes_per_s: gbps * 1e9,
            free_at: 0.0,
        }
    }

    /// Takes the resource for `bytes` from `now` or when it frees; returns when done.
    fn reserve(&mut self, now: f64, bytes: f64) -> f64 {
        let begin = now.max(self.free_at);
        self.free_at = begin + bytes / self.bytes_per_s;
        self.free_at
    }
}

#[derive(Debug)]
struct Node {
    drive: Resource,
    send: Resource,
    receive: Resource,
    used: u64,
    heat: Arc<HeatMap>,
}

#[derive(Debug)]
struct Gpu {
    node: u32,
    job: Option<u32>,
    /// Bumped when the GPU's job ends, so its pending events are ignored.
    generation: u32,
    /// When each extent in flight or ready arrives (arrived: no later than now), earliest
    /// first; at most `prefetch`. A GPU that is computing needs no event per arrival: it
    /// looks here when it is done, so only a GPU left waiting is woken by one.
    arrivals: Vec<f64>,
    computing: bool,
    compute_started: f64,
}

#[derive(Debug)]
struct Job {
    name: String,
    nodes: Vec<u32>,
    dataset: u32,
    start: f64,
    compute: f64,
}

/// A copy a pass decided: extent `chunk` of dataset `file` from node `from` to node `to`.
#[derive(Clone, Debug)]
struct Copy {
    file: u32,
    chunk: u32,
    from: u32,
    to: u32,
    bytes: u64,
}

/// The event clock's resolution (1 ns): times within it are the same moment.
const TICK: f64 = 1e-9;

const ARRIVE: u8 = 0;
const COMPUTED: u8 = 1;
const JOB_END: u8 = 2;
const PASS: u8 = 3;
const COPIED: u8 = 4;

/// (time in ns, kind << 56 | generation << 32 | subject): the heap pops the earliest, ties
/// in a fixed order. Sixteen bytes: the heap holds a few events per GPU, and its size is what
/// the simulation's speed depends on.
type Event = Reverse<(u64, u64)>;

fn pack(kind: u8, subject: u32, generation: u32) -> u64 {
    (u64::from(kind) << 56) | (u64::from(generation & 0x00ff_ffff) << 32) | u64::from(subject)
}

struct Sim<'a> {
    config: &'a SimConfig,
    policy: Policy,
    rng: fastrand::Rng,
    now: f64,
    events: BinaryHeap<Event>,
    processed: u64,
    nodes: Vec<Node>,
    records: Vec<NodeRecord>,
    index_of: HashMap<String, u32>,
    gpus: Vec<Gpu>,
    jobs: Vec<Job>,
    /// Per dataset, per extent: the nodes holding it (the layouts say the same, as ids).
    replicas: Vec<Vec<Vec<u32>>>,
    files: Vec<(Layout, BTreeMap<String, String>)>,
    extent: u64,
    compute_s: f64,
    // The control plane's soft state and the rebalancer.
    gpu_table: GpuTable,
    heat_table: HeatTable,
    rebalance: RebalanceConfig,
    base: Instant,
    executed: VecDeque<(f64, u64, String)>,
    lanes: Vec<VecDeque<Copy>>,
    pending: VecDeque<VecDeque<Copy>>,
    next_pass: f64,
    pass_waiting: bool,
    report: PolicyReport,
    /// Per finished or running job: compute and allotted GPU-seconds.
    job_times: Vec<(f64, f64)>,
}

pub fn simulate(config: &SimConfig, policy: Policy) -> PolicyReport {
    let wall = Instant::now();
    let mut sim = Sim::new(config, policy);
    sim.run();
    sim.report.wall_seconds = wall.elapsed().as_secs_f64();
    sim.report
}

impl<'a> Sim<'a> {
    fn new(config: &'a SimConfig, policy: Policy) -> Sim<'a> {
        let capacity = config.capacity_gib << 30;
        let nodes: Vec<Node> = (0..config.nodes)
            .map(|_| Node {
                drive: Resource::new(config.nvme_gbps),
                send: Resource::new(config.nic_gbps),
                receive: Resource::new(config.nic_gbps),
                used: 0,
                heat: HeatMap::new(DEFAULT_HALF_LIFE),
            })
            .collect();
        let records = node_records(config.nodes, config.gpus, capacity);
        let index_of = records
            .iter()
            .enumerate()
            .map(|(index, record)| (record.id.clone(), index as u32))
            .collect();
        let extent = config.extent_bytes();
        let rebalance = RebalanceConfig {
            max_bytes_per_hour: config.move_budget_bytes,
            high_watermark: config.high_watermark,
            ..RebalanceConfig::default()
        };
        let mut sim = Sim {
            config,
            policy,
            rng: fastrand::Rng::with_seed(config.seed),
            now: 0.0,
            events: BinaryHeap::new(),
            processed: 0,
            nodes,
            records,
            index_of,
            gpus: Vec::new(),
            jobs: Vec::new(),
            replicas: Vec::new(),
            files: Vec::new(),
            extent,
            compute_s: extent as f64 / (config.gpu_gbps * 1e9),
            gpu_table: GpuTable::default(),
            heat_table: HeatTable::default(),
            rebalance,
            base: Instant::now(),
            executed: VecDeque::new(),
            lanes: (0..COPY_STREAMS).map(|_| VecDeque::new()).collect(),
            pending: VecDeque::new(),
            next_pass: 0.0,
            pass_waiting: false,
            report: PolicyReport {
                policy,
                au: 0.0,
                jobs_at_90: 0.0,
                jobs: 0,
                bytes_read_local: 0,
                bytes_read_remote: 0,
                bytes_moved: 0,
                copies: 0,
                drops: 0,
                passes: 0,
                plan_seconds: 0.0,
                events: 0,
                wall_seconds: 0.0,
            },
            job_times: Vec::new(),
        };
        sim.place_datasets();
        sim
    }

    /// Places every dataset with the control plane's placement, as ingest would.
    fn place_datasets(&mut self) {
        let count = self.config.extents_per_dataset();
        for dataset in 0..self.config.datasets {
            let file_id = u64::from(dataset) + 1;
            let placed = tier0_control::placement::place(
                &self.records,
                self.config.replication,
                file_id,
                0,
                count,
            )
            .expect("the replication was checked against the node count");
            let mut extents = Vec::with_capacity(count as usize);
            let mut chunks = Vec::with_capacity(count as usize);
            for (index, holders) in placed.into_iter().enumerate() {
                let nodes: Vec<u32> = holders.iter().map(|id| self.index_of[id]).collect();
                for &node in &nodes {
                    self.nodes[node as usize].used += self.extent;
                }
                chunks.push(LayoutChunk {
                    index: index as u32,
                    id: ChunkId {
                        file: file_id,
                        index: index as u32,
                        generation: 1,
                    },
                    len: self.extent as u32,
                    replicas: holders,
                });
                extents.push(nodes);
            }
            self.replicas.push(extents);
            self.files.push((
                Layout {
                    path: dataset_path(dataset),
                    file_id,
                    version: 1,
                    layout_version: 1,
                    size: u64::from(count) * self.extent,
                    chunk_size: self.extent as u32,
                    replication: self.config.replication,
                    chunks,
                    nodes: Vec::new(),
                },
                BTreeMap::new(),
            ));
        }
    }

    fn push(&mut self, at: f64, kind: u8, subject: u32, generation: u32) {
        // Rounded up, so that an event never fires before the time it stands for.
        let ns = (at.max(self.now) * 1e9).ceil() as u64;
        self.events
            .push(Reverse((ns, pack(kind, subject, generation))));
    }

    fn run(&mut self) {
        for node in 0..self.config.nodes {
            self.gpu_table.report(&node_id(node), self.idle_gpus());
        }
        // Whole nodes, shuffled, cut into jobs of 1..=job_nodes nodes.
        let mut order: Vec<u32> = (0..self.config.nodes).collect();
        self.rng.shuffle(&mut order);
        let busy = ((f64::from(self.config.nodes) * self.config.busy_share).round() as usize)
            .clamp(1, order.len());
        for node in 0..self.config.nodes {
            for _ in 0..self.config.gpus {
                self.gpus.push(Gpu {
                    node,
                    job: None,
                    generation: 0,
                    arrivals: Vec::new(),
                    computing: false,
                    compute_started: 0.0,
                });
            }
        }
        let mut taken = 0;
        while taken < busy {
            let size = (self.rng.u32(1..=self.config.job_nodes) as usize).min(busy - taken);
            let nodes = order[taken..taken + size].to_vec();
            taken += size;
            self.start_job(nodes);
        }
        if self.policy == Policy::Tier0 {
            self.push(0.0, PASS, 0, 0);
        }
        let end = (self.config.duration_s * 1e9) as u64;
        while let Some(Reverse((ns, packed))) = self.events.pop() {
            if ns > end {
                break;
            }
            let (kind, subject) = ((packed >> 56) as u8, packed as u32);
            let generation = ((packed >> 32) & 0x00ff_ffff) as u32;
            self.now = ns as f64 / 1e9;
            self.processed += 1;
            match kind {
                ARRIVE => self.arrived(subject, generation),
                COMPUTED => self.computed(subject, generation),
                JOB_END => self.end_job(subject),
                PASS => self.pass(),
                COPIED => self.copied(subject as usize),
                _ => unreachable!("no such event kind"),
            }
        }
        self.now = self.config.duration_s;
        for job in 0..self.jobs.len() as u32 {
            if self.jobs[job as usize].nodes.is_empty() {
                continue;
            }
            self.close_job(job);
        }
        let (compute, allotted) = self
            .job_times
            .iter()
            .fold((0.0, 0.0), |(c, a), (jc, ja)| (c + jc, a + ja));
        let passing: f64 = self
            .job_times
            .iter()
            .filter(|(c, a)| *a > 0.0 && c / a >= 0.9)
            .fold(0.0, |sum, (_, a)| sum + a);
        self.report.au = compute / allotted.max(1e-9);
        self.report.jobs_at_90 = passing / allotted.max(1e-9);
        self.report.jobs = self.job_times.len() as u64;
        self.report.events = self.processed;
    }

    fn idle_gpus(&self) -> Vec<GpuStatus> {
        (0..self.config.gpus)
            .map(|index| GpuStatus {
                index,
                busy: false,
                job: String::new(),
                measured: None,
            })
            .collect()
    }

    fn start_job(&mut self, nodes: Vec<u32>) {
        let job = self.jobs.len() as u32;
        let dataset = self.rng.u32(0..self.config.datasets);
        let name = format!("job-{job}");
        let (short, long) = self.config.job_minutes;
        let length = 60.0 * (short + (long - short) * self.rng.f64());
        let gpus = self.config.gpus;
        self.gpu_table.declare(DeclaredJob {
            name: name.clone(),
            paths: vec![dataset_path(dataset)],
            gpus: nodes
                .iter()
                .flat_map(|&node| {
                    (0..gpus).map(move |index| GpuRef {
                        node: node_id(node),
                        index,
                    })
                })
                .collect(),
        });
        for &node in &nodes {
            let busy = (0..gpus)
                .map(|index| GpuStatus {
                    index,
                    busy: true,
                    job: name.clone(),
                    measured: None,
                })
                .collect();
            self.gpu_table.report(&node_id(node), busy);
        }
        self.jobs.push(Job {
            name,
            nodes: nodes.clone(),
            dataset,
            start: self.now,
            compute: 0.0,
        });
        for &node in &nodes {
            for slot in 0..gpus {
                let gpu = node * gpus + slot;
                self.gpus[gpu as usize].job = Some(job);
                for _ in 0..self.config.prefetch {
                    self.fetch(gpu);
                }
            }
        }
        self.push(self.now + length, JOB_END, job, 0);
    }

    /// Counts the job's time up to now and frees its GPUs.
    fn close_job(&mut self, job: u32) {
        let gpus = self.config.gpus;
        let nodes = std::mem::take(&mut self.jobs[job as usize].nodes);
        let mut compute = self.jobs[job as usize].compute;
        for &node in &nodes {
            for slot in 0..gpus {
                let gpu = &mut self.gpus[(node * gpus + slot) as usize];
                if gpu.computing {
                    compute += self.now - gpu.compute_started;
                }
                *gpu = Gpu {
                    node,
                    job: None,
                    generation: gpu.generation + 1,
                    arrivals: Vec::new(),
                    computing: false,
                    compute_started: 0.0,
                };
            }
        }
        let allotted =
            (self.now - self.jobs[job as usize].start) * f64::from(gpus) * nodes.len() as f64;
        self.job_times.push((compute, allotted));
        let name = self.jobs[job as usize].name.clone();
        self.gpu_table.declare(DeclaredJob {
            name,
            paths: Vec::new(),
            gpus: Vec::new(),
        });
        for &node in &nodes {
            self.gpu_table.report(&node_id(node), self.idle_gpus());
        }
        self.jobs[job as usize].nodes = nodes;
    }

    /// A job ends; another starts on its nodes.
    fn end_job(&mut self, job: u32) {
        self.close_job(job);
        let nodes = std::mem::take(&mut self.jobs[job as usize].nodes);
        self.start_job(nodes);
    }

    /// Issues one read for `gpu`: a random extent of its job's dataset.
    fn fetch(&mut self, gpu: u32) {
        let Some(job) = self.gpus[gpu as usize].job else {
            return;
        };
        let node = self.gpus[gpu as usize].node;
        let dataset = self.jobs[job as usize].dataset;
        let extents = self.replicas[dataset as usize].len() as u32;
        let chunk = self.rng.u32(0..extents);
        let bytes = self.extent as f64;
        let now = self.now;
        let holders = &self.replicas[dataset as usize][chunk as usize];
        let (server, arrive) = if self.policy == Policy::Oracle || holders.contains(&node) {
            self.report.bytes_read_local += self.extent;
            (node, self.nodes[node as usize].drive.reserve(now, bytes))
        } else {
            // The replica whose drive and NIC free first.
            let server = *holders
                .iter()
                .min_by(|&&a, &&b| {
                    let free = |n: u32| {
                        let n = &self.nodes[n as usize];
                        n.drive.free_at.max(n.send.free_at)
                    };
                    free(a).total_cmp(&free(b)).then(a.cmp(&b))
                })
                .expect("every extent has a replica");
            self.report.bytes_read_remote += self.extent;
            let served = &mut self.nodes[server as usize];
            let done = served
                .drive
                .reserve(now, bytes)
                .max(served.send.reserve(now, bytes));
            let received = self.nodes[node as usize].receive.reserve(now, bytes);
            (
                server,
                done.max(received) + self.config.remote_latency_us * 1e-6,
            )
        };
        if self.policy == Policy::Tier0 {
            let at = self.base + Duration::from_secs_f64(now);
            self.nodes[server as usize].heat.record_at(
                ChunkId {
                    file: u64::from(dataset) + 1,
                    index: chunk,
                    generation: 1,
                },
                self.extent,
                at,
            );
        }
        let state = &mut self.gpus[gpu as usize];
        let at = state.arrivals.partition_point(|&t| t <= arrive);
        state.arrivals.insert(at, arrive);
        let (waiting, generation) = (!state.computing, state.generation);
        if waiting {
            self.push(arrive, ARRIVE, gpu, generation);
        }
    }

    /// Wakes a waiting GPU whose extent has arrived.
    fn arrived(&mut self, gpu: u32, generation: u32) {
        let state = &self.gpus[gpu as usize];
        if state.generation & 0x00ff_ffff != generation || state.computing {
            return;
        }
        if state
            .arrivals
            .first()
            .is_some_and(|&t| t <= self.now + TICK)
        {
            self.compute(gpu);
        }
    }

    /// Computes on the earliest arrived extent (there is one).
    fn compute(&mut self, gpu: u32) {
        let state = &mut self.gpus[gpu as usize];
        state.arrivals.remove(0);
        state.computing = true;
        state.compute_started = self.now;
        let generation = state.generation;
        // The buffer it consumed is free again: read the next extent into it.
        if state.arrivals.len() < self.config.prefetch as usize {
            self.fetch(gpu);
        }
        self.push(self.now + self.compute_s, COMPUTED, gpu, generation);
    }

    fn computed(&mut self, gpu: u32, generation: u32) {
        let now = self.now;
        let state = &mut self.gpus[gpu as usize];
        if state.generation & 0x00ff_ffff != generation {
            return;
        }
        state.computing = false;
        let job = state.job.expect("a computing GPU has a job");
        let next = state.arrivals.first().copied();
        self.jobs[job as usize].compute += self.compute_s;
        match next {
            Some(t) if t <= now + TICK => self.compute(gpu),
            // Waiting: woken when the earliest extent arrives.
            Some(t) => self.push(t, ARRIVE, gpu, generation),
            None => {}
        }
    }

    /// One rebalancer pass on the control plane's code, then its copies.
    fn pass(&mut self) {
        if self.now < self.next_pass {
            return;
        }
        if self.copying() {
            self.pass_waiting = true;
            return;
        }
        self.pass_waiting = false;
        self.next_pass = self.now + self.config.rebalance_s;
        let next = self.next_pass;
        self.push(next, PASS, 0, 0);
        self.report.passes += 1;
        let at = self.base + Duration::from_secs_f64(self.now);
        for (index, node) in self.nodes.iter().enumerate() {
            let hottest = node
                .heat
                .hottest_at(HEARTBEAT_CHUNKS, at)
                .into_iter()
                .map(|(chunk, heat)| {
                    (
                        chunk,
                        Heat {
                            reads: heat.reads,
                            bytes: heat.bytes,
                        },
                    )
                })
                .collect();
            self.heat_table
                .report_at(&self.records[index].id, node.heat.half_life(), hottest, at);
            let topology = &mut self.records[index].topology;
            topology.free_bytes = topology.capacity_bytes.saturating_sub(node.used);
        }
        let hour_ago = self.now - 3600.0;
        while self.executed.front().is_some_and(|(t, _, _)| *t < hour_ago) {
            self.executed.pop_front();
        }
        let mut spent = Spent::default();
        for (_, bytes, policy) in &self.executed {
            spent.total += bytes;
            *spent.by_policy.entry(policy.clone()).or_default() += bytes;
        }
        let planning = Instant::now();
        let totals = self.heat_table.totals_at(at);
        let approved = HashSet::new();
        let plan = rebalance::plan(
            &self.rebalance,
            &PlanInput {
                files: &self.files,
                nodes: &self.records,
                gpus: &self.gpu_table,
                heat: &totals,
                approved: &approved,
                spent,
                now_ms: (self.now * 1e3) as u64,
            },
        );
        self.report.plan_seconds += planning.elapsed().as_secs_f64();
        // Copies grouped by target, in the plan's order; drops at once (metadata only).
        let mut groups: Vec<VecDeque<Copy>> = Vec::new();
        let mut group_of: HashMap<u32, usize> = HashMap::new();
        for PlannedMove { movement, execute } in plan.moves {
            if !execute {
                continue;
            }
            let file = (movement.file_id - 1) as u32;
            let chunk = movement.chunk.index;
            match movement.kind {
                MoveKind::Drop => {
                    let from = self.index_of[&movement.from];
                    self.replicas[file as usize][chunk as usize].retain(|&n| n != from);
                    self.files[file as usize].0.chunks[chunk as usize]
                        .replicas
                        .retain(|id| *id != movement.from);
                    self.nodes[from as usize].used -= movement.bytes;
                    self.report.drops += 1;
                }
                MoveKind::Replicate => {
                    let to = self.index_of[&movement.to];
                    let copy = Copy {
                        file,
                        chunk,
                        from: self.index_of[&movement.from],
                        to,
                        bytes: movement.bytes,
                    };
                    // Counted against the budget when planned, as the control plane does.
                    self.executed
                        .push_back((self.now, movement.bytes, movement.policy));
                    let group = *group_of.entry(to).or_insert_with(|| {
                        groups.push(VecDeque::new());
                        groups.len() - 1
                    });
                    groups[group].push_back(copy);
                }
            }
        }
        self.pending.extend(groups);
        for lane in 0..self.lanes.len() {
            if self.lanes[lane].is_empty() {
                self.next_copy(lane);
            }
        }
    }

    fn copying(&self) -> bool {
        !self.pending.is_empty() || self.lanes.iter().any(|lane| !lane.is_empty())
    }

    /// Starts the lane's next copy, taking the next target's copies when its own are done.
    fn next_copy(&mut self, lane: usize) {
        if self.lanes[lane].is_empty() {
            match self.pending.pop_front() {
                Some(group) => self.lanes[lane] = group,
                None => return,
            }
        }
        let copy = self.lanes[lane]
            .front()
            .expect("the lane has copies")
            .clone();
        let bytes = copy.bytes as f64;
        let now = self.now;
        let source = &mut self.nodes[copy.from as usize];
        let read = source
            .drive
            .reserve(now, bytes)
            .max(source.send.reserve(now, bytes));
        let target = &mut self.nodes[copy.to as usize];
        let written = target
            .receive
            .reserve(now, bytes)
            .max(target.drive.reserve(now, bytes));
        self.push(read.max(written), COPIED, lane as u32, 0);
    }

    /// A copy is done: the new replica is readable.
    fn copied(&mut self, lane: usize) {
        let copy = self.lanes[lane].pop_front().expect("a copy was running");
        let holders = &mut self.replicas[copy.file as usize][copy.chunk as usize];
        if !holders.contains(&copy.to) {
            holders.push(copy.to);
            self.files[copy.file as usize].0.chunks[copy.chunk as usize]
                .replicas
                .push(node_id(copy.to));
            self.nodes[copy.to as usize].used += copy.bytes;
        }
        self.report.copies += 1;
        self.report.bytes_moved += copy.bytes;
        self.next_copy(lane);
        if self.pass_waiting && !self.copying() {
            let at = self.next_pass.max(self.now);
            self.push(at, PASS, 0, 0);
            self.pass_waiting = false;
        }
    }
}

/// Identical DGX-like nodes as the control plane sees them: each GPU shares a PCIe switch with
/// a drive and a NIC (route cost 2 to both), `capacity` bytes of drives, all free.
pub(super) fn node_records(nodes: u32, gpus: u32, capacity: u64) -> Vec<NodeRecord> {
    (0..nodes)
        .map(|index| NodeRecord {
            id: node_id(index),
            address: String::new(),
            topology: TopologySummary {
                numa_nodes: 2,
                cores: 0,
                gpus,
                rdma_devices: Vec::new(),
                drives: 8,
                capacity_bytes: capacity,
                free_bytes: capacity,
                failure_domain: String::new(),
                gpu_feeds: (0..gpus)
                    .map(|gpu| GpuFeed {
                        index: gpu,
                        numa_node: Some(gpu * 2 / gpus),
                        drive_cost: 2,
                        nic_cost: 2,
                    })
                    .collect(),
                drive_nic_cost: 2,
            },
            state: NodeState::Up,
            registered_ms: 0,
            heartbeat_ms: 0,
            lease_expires_ms: 0,
        })
        .collect()
}

fn node_id(index: u32) -> String {
    format!("n{index:05}")
}

fn dataset_path(dataset: u32) -> String {
    format!("/datasets/d{dataset:04}")
}
