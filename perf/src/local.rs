//! `tier0 bench local`: reads through the chunk store and the data-plane workers, next to fio
//! reading the same bytes of the same file with the same block size and queue depth.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tier0_dataplane::buffer::BufferPoolConfig;
use tier0_dataplane::device::{BlockDevice, UringDevice, UringOptions, preallocate_file};
use tier0_dataplane::store::format::{Superblock, entry_size_for};
use tier0_dataplane::store::{ChunkId, ChunkStore, StoreConfig};
use tier0_dataplane::worker::{
    Completion, DeviceFactory, DriveSpec, Op, Output, PollMode, ReadCheck, RequestSource,
    SourceFactory, WorkerPool, WorkerPoolConfig,
};
use tier0_topology::{WorkerPlan, WorkerPolicy, plan_workers};

use crate::fio::{self, FioJob, FioResult};
use crate::measure::{LatencyRecorder, Who, cpu_seconds};
use crate::report::ScenarioResult;

const GIB: f64 = (1u64 << 30) as f64;
const SEQUENTIAL_BLOCK: u64 = 1 << 20;
const RANDOM_BLOCK: u64 = 4096;

/// Where the benchmark's store lives.
#[derive(Clone, Debug)]
pub enum Target {
    /// A file, created and preallocated (removed afterwards unless kept).
    File(PathBuf),
    /// A block device (a loop device, an NVMe namespace): formatted, its contents lost.
    Device(PathBuf),
}

#[derive(Clone, Debug)]
pub struct LocalBenchOptions {
    /// Bytes of chunk data to write and read back.
    pub size: u64,
    pub target: Target,
    pub queue_depth: u32,
    /// How many times the sequential scenario reads the data.
    pub sequential_passes: u32,
    /// How long the random scenario runs, for each side.
    pub random_runtime: Duration,
    /// Runs of each side per scenario; the median is reported.
    pub repeats: u32,
    pub poll_mode: PollMode,
    pub chunk_size: u32,
    /// Keep the file afterwards (for another run, or to look at it).
    pub keep: bool,
}

impl Default for LocalBenchOptions {
    fn default() -> Self {
        LocalBenchOptions {
            size: 1 << 30,
            target: Target::File(std::env::temp_dir().join("tier0-bench-local.store")),
            queue_depth: 32,
            sequential_passes: 2,
            random_runtime: Duration::from_secs(5),
            repeats: 3,
            poll_mode: PollMode::Adaptive,
            chunk_size: 4 << 20,
            keep: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("bench: {0}")]
    Invalid(String),
    #[error("bench: preparing {path}: {message}")]
    Prepare { path: String, message: String },
    #[error("bench: fio baseline failed")]
    Fio(#[from] fio::FioError),
    #[error("bench: tier0 read failed: {0}")]
    Read(String),
}

/// The store written for the benchmark, and where its chunk data lies in the file.
struct Prepared {
    path: PathBuf,
    store: Arc<ChunkStore>,
    chunks: u32,
    data_offset: u64,
    data_len: u64,
}

fn prepare_error(path: &Path, error: &dyn std::error::Error) -> BenchError {
    BenchError::Prepare {
        path: path.display().to_string(),
        message: tier0_dataplane::error_chain(error),
    }
}

fn prepare(
    options: &LocalBenchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Prepared, BenchError> {
    let chunk_size = u64::from(options.chunk_size);
    if options.size < chunk_size {
        return Err(BenchError::Invalid(format!(
            "--size {} is smaller than one {} byte chunk",
            options.size, chunk_size
        )));
    }
    let chunks = u32::try_from(options.size / chunk_size)
        .map_err(|_| BenchError::Invalid("--size is too large".into()))?;
    let path = match &options.target {
        Target::File(path) => {
            let entry = u64::from(entry_size_for(options.chunk_size, 4096));
            let len = 8192 + u64::from(chunks) * (entry + chunk_size);
            preallocate_file(path, len).map_err(|error| prepare_error(path, &error))?;
            path.clone()
        }
        Target::Device(path) => path.clone(),
    };
    let mut device = UringDevice::open(&path, &UringOptions::default())
        .map_err(|error| prepare_error(&path, &error))?;
    let store = ChunkStore::format(
        &mut device,
        StoreConfig {
            chunk_size: options.chunk_size,
            checksum_block_size: 4096,
        },
    )
    .map_err(|error| prepare_error(&path, &error))?;
    if store.superblock().slot_count < u64::from(chunks) {
        return Err(BenchError::Invalid(format!(
            "{} holds {} chunks, --size needs {chunks}",
            path.display(),
            store.superblock().slot_count
        )));
    }
    progress(&format!(
        "writing {chunks} chunks of {} MiB to {}",
        chunk_size >> 20,
        path.display()
    ));
    let mut data = vec![0u8; options.chunk_size as usize];
    let mut random = fastrand::Rng::with_seed(0x7153_0000);
    for index in 0..chunks {
        random.fill(&mut data);
        store
            .put(&mut device, bench_chunk(index), &data)
            .map_err(|error| prepare_error(&path, &error))?;
    }
    // A fresh store hands out slots in order: the chunk data is one contiguous range, which
    // is what fio reads.
    let superblock: Superblock = *store.superblock();
    for index in 0..chunks {
        let slot = store.lookup(bench_chunk(index)).map(|info| info.slot);
        if slot.is_none_or(|slot| slot >= u64::from(chunks)) {
            return Err(BenchError::Invalid(format!(
                "chunk {index} is outside the data range fio reads"
            )));
        }
    }
    Ok(Prepared {
        path,
        store: Arc::new(store),
        chunks,
        data_offset: superblock.data_offset,
        data_len: u64::from(chunks) * chunk_size,
    })
}

fn bench_chunk(index: u32) -> ChunkId {
    ChunkId {
        file: 0xbe9c,
        index,
        generation: 1,
    }
}

/// One worker on the first NUMA node of the live machine's plan, like fio's one job.
fn single_worker_plan() -> Result<WorkerPlan, BenchError> {
    let machine = tier0_topology::discover_live()
        .map_err(|error| BenchError::Invalid(format!("topology: {error}")))?;
    let mut plan = plan_workers(
        &machine,
        &WorkerPolicy {
            workers_per_numa_node: Some(1),
            allowed_cpus: None,
        },
    );
    plan.numa_nodes.truncate(1);
    if plan.worker_count() == 0 {
        return Err(BenchError::Invalid(
            "the topology plan has no worker".into(),
        ));
    }
    Ok(plan)
}

/// What tier0 did in one scenario.
#[derive(Debug, Default)]
struct Measured {
    bytes: u64,
    seconds: f64,
    ops: u64,
    /// CPU seconds of the worker thread during the run (as fio reports its job thread's).
    cpu_seconds: f64,
    latency: LatencyRecorder,
    error: Option<String>,
}

type NextRead = Box<dyn FnMut() -> Option<(ChunkId, u64, u32)> + Send>;

/// The load generator, run inside the worker's loop as a request source: no thread hop per
/// request, so the benchmark measures the store and the worker, as fio measures its engine.
struct LoadSource {
    queue_depth: u32,
    in_flight: u32,
    next: NextRead,
    runtime: Option<Duration>,
    started: Option<(Instant, f64)>,
    measured: Measured,
    report: crossbeam_channel::Sender<Measured>,
}

impl RequestSource for LoadSource {
    fn poll(&mut self, max: usize, requests: &mut Vec<(u64, usize, Op)>) -> bool {
        let (started, _) = *self
            .started
            .get_or_insert_with(|| (Instant::now(), cpu_seconds(Who::Thread)));
        if self.measured.error.is_some()
            || self
                .runtime
                .is_some_and(|runtime| started.elapsed() >= runtime)
        {
            return false;
        }
        let room = (self.queue_depth - self.in_flight).min(max as u32);
        for _ in 0..room {
            let Some((chunk, offset, len)) = (self.next)() else {
                return false;
            };
            requests.push((
                0,
                0,
                Op::Read {
                    chunk,
                    offset,
                    len,
                    check: ReadCheck::Worker,
                },
            ));
            self.in_flight += 1;
        }
        true
    }

    fn complete(&mut self, completion: Completion) {
        self.in_flight -= 1;
        match completion.result {
            Ok(Output::Read { lease, .. }) => {
                self.measured.bytes += lease.len() as u64;
                self.measured.ops += 1;
                self.measured.latency.record(completion.latency);
            }
            Ok(other) => self.measured.error = Some(format!("unexpected output {other:?}")),
            Err(error) => self.measured.error = Some(tier0_dataplane::error_chain(&error)),
        }
    }

    fn close(self: Box<Self>) {
        let mut this = *self;
        if let Some((started, cpu)) = this.started {
            this.measured.seconds = started.elapsed().as_secs_f64();
            this.measured.cpu_seconds = cpu_seconds(Who::Thread) - cpu;
        }
        let _ = this.report.send(this.measured);
    }
}

/// Runs one scenario: a one-worker pool whose worker drives a [`LoadSource`].
fn drive_reads(
    prepared: &Prepared,
    plan: &WorkerPlan,
    options: &LocalBenchOptions,
    runtime: Option<Duration>,
    next: NextRead,
) -> Result<Measured, BenchError> {
    let drive = DriveSpec {
        name: prepared.path.display().to_string(),
        store: prepared.store.clone(),
        numa_node: plan.numa_nodes[0].numa_node,
        memory: None,
    };
    let path = prepared.path.clone();
    let factory: DeviceFactory = Arc::new(move |_: &DriveSpec| {
        Ok(Box::new(UringDevice::open(&path, &UringOptions::default())?) as Box<dyn BlockDevice>)
    });
    let (report, measured) = crossbeam_channel::bounded(1);
    let source = std::sync::Mutex::new(Some(LoadSource {
        queue_depth: options.queue_depth,
        in_flight: 0,
        next,
        runtime,
        started: None,
        measured: Measured::default(),
        report,
    }));
    let sources: SourceFactory = Arc::new(move |_worker| {
        source
            .lock()
            .ok()
            .and_then(|mut source| source.take())
            .map(|source| vec![Box::new(source) as Box<dyn RequestSource>])
            .unwrap_or_default()
    });
    let config = WorkerPoolConfig {
        poll_mode: options.poll_mode,
        in_flight_max: options.queue_depth as usize,
        buffers: BufferPoolConfig {
            buffer_size: SEQUENTIAL_BLOCK as usize,
            // Leases come back as soon as the source counts them; a few spare buffers keep
            // the queue full meanwhile.
            buffer_count: options.queue_depth as usize + 8,
            numa_node: None,
            hugepages: true,
        },
        pin: true,
        sources: Some(sources),
    };
    let pool = WorkerPool::start(plan, &[drive], factory, &config)
        .map_err(|error| BenchError::Invalid(tier0_dataplane::error_chain(&error)))?;
    let measured = measured
        .recv()
        .map_err(|_| BenchError::Read("the worker stopped before the run ended".into()))?;
    pool.shutdown();
    match measured.error {
        Some(error) => Err(BenchError::Read(error)),
        None => Ok(measured),
    }
}

fn result(
    scenario: &str,
    unit: &str,
    block_size: u64,
    queue_depth: u32,
    ours: &Measured,
    fio: &FioResult,
    repeats: u32,
) -> ScenarioResult {
    let per_gib = |cpu: f64, bytes: u64| {
        if bytes == 0 {
            0.0
        } else {
            cpu / (bytes as f64 / GIB)
        }
    };
    let (tier0, baseline) = match unit {
        "IOPS" => (ours.ops as f64 / ours.seconds, fio.iops),
        _ => (
            ours.bytes as f64 / GIB / ours.seconds,
            fio.bytes as f64 / GIB / fio.seconds,
        ),
    };
    ScenarioResult {
        scenario: scenario.to_string(),
        unit: unit.to_string(),
        tier0,
        baseline,
        baseline_name: format!("{} (io_uring, O_DIRECT, fixed buffers)", fio.version),
        ratio: 0.0,
        tier0_cpu_s_per_gib: per_gib(ours.cpu_seconds, ours.bytes),
        baseline_cpu_s_per_gib: Some(per_gib(fio.cpu_seconds, fio.bytes)),
        cpu_ratio: None,
        tier0_latency: ours.latency.summary(),
        baseline_latency: Some(fio.latency),
        block_size,
        queue_depth,
        bytes: ours.bytes,
        seconds: ours.seconds,
        repeats,
    }
    .with_ratios()
}

/// Runs both scenarios; `progress` gets one line per step.
pub fn run(
    options: &LocalBenchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<ScenarioResult>, BenchError> {
    if options.queue_depth == 0 || options.queue_depth > 1024 {
        return Err(BenchError::Invalid(
            "--queue-depth must be between 1 and 1024".into(),
        ));
    }
    let prepared = prepare(options, progress)?;
    let outcome = run_scenarios(options, &prepared, progress);
    if let (Target::File(path), false) = (&options.target, options.keep) {
        let _ = std::fs::remove_file(path);
    }
    outcome
}

/// The run with the median throughput (by bytes per second) of several.
fn median_by<T>(mut runs: Vec<T>, rate: impl Fn(&T) -> f64) -> T {
    runs.sort_by(|a, b| rate(a).total_cmp(&rate(b)));
    let middle = runs.len() / 2;
    runs.swap_remove(middle)
}

fn run_scenarios(
    options: &LocalBenchOptions,
    prepared: &Prepared,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<ScenarioResult>, BenchError> {
    let plan = single_worker_plan()?;
    let queue_depth = options.queue_depth;
    let repeats = options.repeats.max(1);
    let chunks = u64::from(prepared.chunks);
    let mut results = Vec::new();

    // Each scenario runs fio and tier0 alternately, `repeats` times, and keeps each side's
    // median run: on a shared machine the drive's speed wanders more than the two differ.
    let scenarios: [(&str, &str, &'static str, u64, Option<Duration>); 2] = [
        ("seq-read-1m", "GiB/s", "read", SEQUENTIAL_BLOCK, None),
        (
            "rand-read-4k",
            "IOPS",
            "randread",
            RANDOM_BLOCK,
            Some(options.random_runtime),
        ),
    ];
    for (scenario, unit, pattern, block_size, runtime) in scenarios {
        let mut fio_runs = Vec::new();
        let mut our_runs = Vec::new();
        for repeat in 1..=repeats {
            progress(&format!("{scenario}: fio ({repeat}/{repeats})"));
            fio_runs.push(fio::run(&FioJob {
                name: scenario.into(),
                file: prepared.path.clone(),
                pattern,
                block_size,
                queue_depth,
                offset: prepared.data_offset,
                size: prepared.data_len,
                runtime,
                loops: options.sequential_passes,
            })?);
            progress(&format!("{scenario}: tier0 ({repeat}/{repeats})"));
            let blocks_per_chunk = u64::from(options.chunk_size) / block_size;
            let next: NextRead = match runtime {
                None => {
                    let total =
                        u64::from(options.sequential_passes.max(1)) * chunks * blocks_per_chunk;
                    let mut issued = 0u64;
                    Box::new(move || {
                        if issued == total {
                            return None;
                        }
                        let block = issued % (chunks * blocks_per_chunk);
                        issued += 1;
                        let chunk = bench_chunk((block / blocks_per_chunk) as u32);
                        Some((
                            chunk,
                            (block % blocks_per_chunk) * block_size,
                            block_size as u32,
                        ))
                    })
                }
                Some(_) => {
                    let mut random = fastrand::Rng::with_seed(0x4b + u64::from(repeat));
                    let chunk_count = prepared.chunks;
                    Box::new(move || {
                        let chunk = bench_chunk(random.u32(..chunk_count));
                        let offset = random.u64(..blocks_per_chunk) * block_size;
                        Some((chunk, offset, block_size as u32))
                    })
                }
            };
            our_runs.push(drive_reads(prepared, &plan, options, runtime, next)?);
        }
        let fio = median_by(fio_runs, |run| run.bytes as f64 / run.seconds);
        let ours = median_by(our_runs, |run| run.bytes as f64 / run.seconds);
        results.push(result(
            scenario,
            unit,
            block_size,
            queue_depth,
            &ours,
            &fio,
            repeats,
        ));
    }
    Ok(results)
}
