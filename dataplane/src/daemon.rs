//! The data daemon of one node: its drives' chunk stores, the worker pool that owns their
//! rings, and the TCP listener whose connections the workers serve (`tier0 serve data`),
//! which also takes the copies the control plane orders (`Replicate`: this daemon pulls the
//! chunk from the source daemon, `net::replicate`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tier0_topology::WorkerPlan;

use crate::buffer::BufferPoolConfig;
use crate::device::{
    BlockDevice, DeviceError, MemoryDrive, MemoryFileDevice, UringDevice, UringOptions,
    preallocate_file,
};
use crate::fence::FenceTable;
use crate::heat::{DEFAULT_HALF_LIFE, HeatMap};
use crate::net::rdma::{RdmaService, device_names};
use crate::net::replicate::CopyConfig;
use crate::net::tcp::{LocalSocket, TcpServer, TcpServerConfig};
use crate::net::wire::LocalEndpoint;
use crate::store::{ChunkStore, StoreConfig, StoreError};
use crate::worker::{DeviceFactory, DriveSpec, PollMode, WorkerPool, WorkerPoolConfig};

/// One drive: a block device, or a file that is created at `create_size` when missing.
#[derive(Clone, Debug)]
pub struct DriveConfig {
    pub path: PathBuf,
    /// Size of a new store file; `None` when the path must already exist.
    pub create_size: Option<u64>,
    pub numa_node: u32,
}

#[derive(Clone, Debug)]
pub struct DataDaemonConfig {
    pub node: String,
    pub listen: SocketAddr,
    pub token: Vec<u8>,
    pub drives: Vec<DriveConfig>,
    /// Geometry of stores formatted here (existing stores keep theirs).
    pub store: StoreConfig,
    pub poll_mode: PollMode,
    /// Requests in flight per worker.
    pub in_flight_max: usize,
    /// Registered buffers per worker, each one chunk.
    pub buffers_per_worker: usize,
    pub hugepages: bool,
    pub pin: bool,
    pub rdma: RdmaMode,
    /// The node-local socket of the shared-memory fast path.
    pub local_socket: LocalSocket,
    /// A memory-backed drive (a file on tmpfs or ramfs) is read from its pages: TCP reads of
    /// whole checksum blocks are sent from a read-only mapping of it (`net::mapped`), and the
    /// worker reads the rest by copies from a mapping (`device::memory_file`). Off, every
    /// read goes through io_uring into a pool buffer, as from any drive.
    pub map_memory_drives: bool,
}

/// Whether and where a daemon serves RDMA.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum RdmaMode {
    /// Each worker posts to the HCA nearest its NUMA node (from the topology); a device the
    /// topology does not place (soft-RoCE) serves every worker; none at all: TCP only.
    #[default]
    Auto,
    /// TCP only.
    Off,
    /// This device for every worker; failing to open it is an error.
    Device(String),
}

impl std::str::FromStr for RdmaMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(RdmaMode::Auto),
            "off" | "none" => Ok(RdmaMode::Off),
            "" => Err("an RDMA device name, `auto` or `off`".into()),
            name => Ok(RdmaMode::Device(name.to_string())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("no drives configured")]
    NoDrives,
    #[error("the cluster token is empty")]
    EmptyToken,
    #[error("{path}: {source}")]
    Drive {
        path: String,
        #[source]
        source: StoreError,
    },
    #[error("drives have different chunk sizes ({first} and {other}): one daemon serves one size")]
    MixedChunkSizes { first: u32, other: u32 },
    #[error(transparent)]
    Workers(#[from] crate::worker::WorkerPoolError),
    #[error("RDMA device {device}: {reason}")]
    Rdma { device: String, reason: String },
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running data daemon.
#[derive(Debug)]
pub struct DataDaemon {
    server: Option<TcpServer>,
    pool: Option<WorkerPool>,
    stores: Vec<Arc<ChunkStore>>,
    fences: Arc<FenceTable>,
    heat: Arc<HeatMap>,
}

impl DataDaemon {
    /// Opens (or creates and formats) every drive, starts the workers of `plan` and listens;
    /// copies it is asked for (`Replicate`) run as [`CopyConfig::default`] says.
    pub fn start(config: &DataDaemonConfig, plan: &WorkerPlan) -> Result<Self, DaemonError> {
        Self::start_with_copies(config, plan, CopyConfig::default())
    }

    /// As [`start`](Self::start), with `copies` bounding the chunk copies this daemon pulls
    /// from others at once and timing each out.
    pub fn start_with_copies(
        config: &DataDaemonConfig,
        plan: &WorkerPlan,
        copies: CopyConfig,
    ) -> Result<Self, DaemonError> {
        if config.drives.is_empty() {
            return Err(DaemonError::NoDrives);
        }
        if config.token.is_empty() {
            return Err(DaemonError::EmptyToken);
        }
        let mut specs = Vec::new();
        let mut mapped = Vec::new();
        for drive in &config.drives {
            let spec = open_drive(drive, config.store, config.map_memory_drives)?;
            if let Some(first) = specs
                .first()
                .map(|first: &DriveSpec| first.store.chunk_size())
                && first != spec.store.chunk_size()
            {
                return Err(DaemonError::MixedChunkSizes {
                    first,
                    other: spec.store.chunk_size(),
                });
            }
            mapped.push(spec.memory.clone());
            specs.push(spec);
        }
        let chunk_size = specs[0].store.chunk_size();
        let stores: Vec<Arc<ChunkStore>> = specs.iter().map(|spec| spec.store.clone()).collect();
        // Empty until the control plane raises fences (`fences()`): every read passes.
        let fences = FenceTable::new();
        // Every read any source accepts is counted here; the membership agent reports it.
        let heat = HeatMap::new(DEFAULT_HALF_LIFE);
        let rdma = rdma_service(config, plan, &stores, &fences, &heat, chunk_size)?;
        let rdma_devices = rdma.as_ref().map(RdmaService::devices).unwrap_or_default();
        let (server, sources) = TcpServer::bind(
            TcpServerConfig {
                listen: config.listen,
                token: config.token.clone(),
                node: config.node.clone(),
                max_payload: chunk_size,
                handshake_timeout: Duration::from_secs(5),
                local_socket: config.local_socket.clone(),
                heat: heat.clone(),
                copies,
            },
            stores.clone(),
            mapped,
            fences.clone(),
            plan.worker_count(),
            rdma,
        )
        .map_err(|source| DaemonError::Listen {
            addr: config.listen,
            source,
        })?;
        let factory: DeviceFactory = Arc::new(drive_device);
        let pool = WorkerPool::start(
            plan,
            &specs,
            factory,
            &WorkerPoolConfig {
                poll_mode: config.poll_mode,
                in_flight_max: config.in_flight_max,
                buffers: BufferPoolConfig {
                    buffer_size: chunk_size as usize,
                    buffer_count: config.buffers_per_worker,
                    numa_node: None,
                    hugepages: config.hugepages,
                },
                pin: config.pin,
                sources: Some(sources),
            },
        )?;
        let chunks: usize = stores.iter().map(|store| store.len()).sum();
        tracing::info!(
            node = config.node,
            addr = %server.local_addr(),
            drives = stores.len(),
            chunks,
            workers = plan.worker_count(),
            rdma = ?rdma_devices,
            local = server.local_endpoint().map(|local| local.socket.as_str()),
            "data daemon serving"
        );
        Ok(DataDaemon {
            server: Some(server),
            pool: Some(pool),
            stores,
            fences,
            heat,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.server
            .as_ref()
            .map(TcpServer::local_addr)
            .expect("running until shut down")
    }

    /// The node-local socket, when the daemon has one.
    pub fn local_endpoint(&self) -> Option<&LocalEndpoint> {
        self.server.as_ref().and_then(TcpServer::local_endpoint)
    }

    /// Read heat per chunk, counted by every request source.
    pub fn heat(&self) -> &Arc<HeatMap> {
        &self.heat
    }

    pub fn stores(&self) -> &[Arc<ChunkStore>] {
        &self.stores
    }

    /// The layout fences every read is checked against (TCP and RDMA alike): raise one when
    /// the control plane says a file's layout moved on, and reads at older versions of it are
    /// answered `ESTALE` from then on.
    pub fn fences(&self) -> &Arc<FenceTable> {
        &self.fences
    }

    /// Stops accepting; the workers finish what they hold once their peers have gone.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown();
        }
        if let Some(pool) = self.pool.take() {
            pool.shutdown();
        }
    }
}

impl Drop for DataDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The RDMA device of each worker, in the worker pool's order, opened; `None` for TCP only.
fn rdma_service(
    config: &DataDaemonConfig,
    plan: &WorkerPlan,
    stores: &[Arc<ChunkStore>],
    fences: &Arc<FenceTable>,
    heat: &Arc<HeatMap>,
    max_payload: u32,
) -> Result<Option<RdmaService>, DaemonError> {
    // Workers in the pool's order: node by node, one per planned CPU.
    let planned: Vec<Option<String>> = plan
        .numa_nodes
        .iter()
        .flat_map(|node| node.worker_cpus.iter().map(|_| node.rdma_device.clone()))
        .collect();
    let devices: Vec<Option<String>> = match &config.rdma {
        RdmaMode::Off => return Ok(None),
        RdmaMode::Device(name) => vec![Some(name.clone()); planned.len()],
        RdmaMode::Auto => {
            let present = match device_names() {
                Ok(present) => present,
                Err(error) => {
                    tracing::info!(%error, "no RDMA: serving TCP only");
                    return Ok(None);
                }
            };
            if present.is_empty() {
                tracing::info!("no RDMA device: serving TCP only");
                return Ok(None);
            }
            planned
                .iter()
                .map(|device| match device {
                    Some(name) if present.contains(name) => Some(name.clone()),
                    // The topology places no HCA (a soft-RoCE device has no PCI function):
                    // every worker uses the first device present.
                    _ => Some(present[0].clone()),
                })
                .collect()
        }
    };
    let service = RdmaService::new(
        &devices,
        stores.to_vec().into(),
        fences.clone(),
        heat.clone(),
        &config.node,
        max_payload,
    );
    if let RdmaMode::Device(name) = &config.rdma
        && service.devices().iter().any(Option::is_none)
    {
        return Err(DaemonError::Rdma {
            device: name.clone(),
            reason: "cannot serve on it (see the log above)".into(),
        });
    }
    Ok(Some(service))
}

/// Opens (or formats) a drive's store and, when `map_memory` and the drive is a file in
/// memory, maps it once: its workers' devices and the TCP path's sends share that mapping.
fn open_drive(
    drive: &DriveConfig,
    geometry: StoreConfig,
    map_memory: bool,
) -> Result<DriveSpec, DaemonError> {
    let failed = |source| DaemonError::Drive {
        path: drive.path.display().to_string(),
        source,
    };
    let store = open_or_format(drive, geometry).map_err(failed)?;
    let memory = if map_memory {
        MemoryDrive::open(&drive.path).map_err(|error| failed(StoreError::Device(error)))?
    } else {
        None
    };
    Ok(DriveSpec {
        name: drive.path.display().to_string(),
        store: Arc::new(store),
        numa_node: drive.numa_node,
        memory,
    })
}

/// Opens one worker's device on a drive: by copies from the drive's shared mapping when it is
/// a file in memory the daemon maps (`DriveSpec::memory`, see `device::memory_file`), through
/// io_uring otherwise.
fn drive_device(spec: &DriveSpec) -> Result<Box<dyn BlockDevice>, DeviceError> {
    let options = UringOptions::default();
    Ok(match &spec.memory {
        Some(drive) => Box::new(MemoryFileDevice::new(
            drive.clone(),
            options.queue_depth as usize,
        )),
        None => Box::new(UringDevice::open(
            std::path::Path::new(&spec.name),
            &options,
        )?),
    })
}

/// Opens the store on a drive; formats it when the file was just created, or when the
/// device holds no store yet and is all zeros at the start (never over foreign data).
fn open_or_format(drive: &DriveConfig, geometry: StoreConfig) -> Result<ChunkStore, StoreError> {
    let created = match drive.create_size {
        Some(size) if !drive.path.exists() => {
            preallocate_file(&drive.path, size)?;
            true
        }
        _ => false,
    };
    let mut device = UringDevice::open(&drive.path, &UringOptions::default())?;
    if created {
        tracing::info!(path = %drive.path.display(), "formatting a new store");
        return ChunkStore::format(&mut device, geometry);
    }
    match ChunkStore::open(&mut device) {
        Ok((store, recovery)) => {
            tracing::info!(path = %drive.path.display(), chunks = recovery.chunks, "store opened");
            Ok(store)
        }
        Err(StoreError::NotAStore { .. }) if starts_blank(&mut device)? => {
            tracing::info!(path = %drive.path.display(), "blank device: formatting a new store");
            ChunkStore::format(&mut device, geometry)
        }
        Err(error) => Err(error),
    }
}

fn starts_blank(device: &mut UringDevice) -> Result<bool, DeviceError> {
    let mut head = crate::buffer::AlignedBuf::zeroed(crate::device::IO_ALIGNMENT * 2);
    device.read_at(0, &mut head)?;
    Ok(head.iter().all(|&byte| byte == 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ChunkId;

    /// Removes a test's drive file however the test ends.
    struct RemovedAtEnd(PathBuf);

    impl Drop for RemovedAtEnd {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn geometry() -> StoreConfig {
        StoreConfig {
            chunk_size: 64 << 10,
            checksum_block_size: 4096,
        }
    }

    fn pattern() -> Vec<u8> {
        (0..10_000u32).map(|i| (i * 13 % 251) as u8).collect()
    }

    /// Writes a chunk through a worker's device on `spec` and reads it back through another.
    fn round_trip(spec: &DriveSpec) {
        let chunk = ChunkId {
            file: 1,
            index: 0,
            generation: 1,
        };
        let data = pattern();
        spec.store
            .put(&mut *drive_device(spec).unwrap(), chunk, &data)
            .unwrap();
        let back = spec
            .store
            .get(&mut *drive_device(spec).unwrap(), chunk)
            .unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn a_drive_in_memory_is_mapped_once_and_read_by_copies_unless_told_not_to() {
        let shm = std::path::Path::new("/dev/shm");
        if !shm.is_dir() {
            return; // No tmpfs here: nothing is a memory drive.
        }
        let path = shm.join(format!("tier0-daemon-drive-{}", std::process::id()));
        let _cleanup = RemovedAtEnd(path.clone());
        let drive = DriveConfig {
            path,
            create_size: Some(4 << 20),
            numa_node: 0,
        };
        let mapped = open_drive(&drive, geometry(), true).unwrap();
        let unmapped = open_drive(&drive, geometry(), false).unwrap();
        if !crate::device::is_memory_file(&drive.path).unwrap() {
            return; // /dev/shm is a plain folder here.
        }
        let memory = mapped.memory.as_ref().expect("a file on tmpfs is mapped");
        assert_eq!(memory.len(), 4 << 20);
        let device = drive_device(&mapped).unwrap();
        assert_eq!(device.kind(), "memory file (copies from a mapping)");
        assert_eq!(device.len(), 4 << 20);
        // Every worker's device shares the spec's one mapping: no mapping of its own.
        let second = drive_device(&mapped).unwrap();
        assert_eq!(Arc::strong_count(memory), 3);
        drop((device, second));
        round_trip(&mapped);
        // What a worker wrote is in the one mapping the TCP path sends from.
        let chunk = ChunkId {
            file: 1,
            index: 0,
            generation: 1,
        };
        let info = mapped.store.lookup(chunk).expect("written");
        let (at, _) = mapped
            .store
            .whole_block_span(&info, 0, 4096)
            .unwrap()
            .expect("a whole block");
        assert_eq!(memory.bytes(at, 4096).unwrap(), &pattern()[..4096]);

        assert!(unmapped.memory.is_none());
        assert!(
            drive_device(&unmapped)
                .unwrap()
                .kind()
                .starts_with("io_uring")
        );
    }

    #[test]
    fn a_drive_on_disk_is_driven_through_io_uring_even_when_memory_drives_are_mapped() {
        let path = std::env::temp_dir().join(format!("tier0-daemon-disk-{}", std::process::id()));
        let _cleanup = RemovedAtEnd(path.clone());
        let drive = DriveConfig {
            path: path.clone(),
            create_size: Some(4 << 20),
            numa_node: 0,
        };
        let spec = open_drive(&drive, geometry(), true).unwrap();
        if crate::device::is_memory_file(&path).unwrap() {
            return; // The temp folder is tmpfs here: the first test covers it.
        }
        assert!(spec.memory.is_none());
        assert!(drive_device(&spec).unwrap().kind().starts_with("io_uring"));
        round_trip(&spec);
    }
}
