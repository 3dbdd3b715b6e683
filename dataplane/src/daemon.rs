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
    BlockDevice, DeviceError, MemoryFileDevice, UringDevice, UringOptions, preallocate_file,
};
use crate::fence::FenceTable;
use crate::heat::{DEFAULT_HALF_LIFE, HeatMap};
use crate::net::mapped::MappedDrive;
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
        let mut paths = Vec::new();
        let mut mapped = Vec::new();
        for drive in &config.drives {
            let store =
                open_or_format(drive, config.store).map_err(|source| DaemonError::Drive {
                    path: drive.path.display().to_string(),
                    source,
                })?;
            let chunk_size = store.chunk_size();
            if let Some(first) = specs
                .first()
                .map(|spec: &DriveSpec| spec.store.chunk_size())
                && first != chunk_size
            {
                return Err(DaemonError::MixedChunkSizes {
                    first,
                    other: chunk_size,
                });
            }
            specs.push(DriveSpec {
                name: drive.path.display().to_string(),
                store: Arc::new(store),
                numa_node: drive.numa_node,
            });
            paths.push(drive.path.clone());
            mapped.push(if config.map_memory_drives {
                MappedDrive::open(&drive.path).map_err(|source| DaemonError::Drive {
                    path: drive.path.display().to_string(),
                    source: StoreError::Device(DeviceError::Open {
                        device: drive.path.display().to_string(),
                        source,
                    }),
                })?
            } else {
                None
            });
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
        let memory_files = config.map_memory_drives;
        let factory: DeviceFactory = Arc::new(move |spec: &DriveSpec| {
            let path = PathBuf::from(&spec.name);
            let options = UringOptions::default();
            // A drive in memory is read by copies from its pages, not through a ring
            // (`device::memory_file`); every other one through io_uring.
            if memory_files
                && let Some(device) = MemoryFileDevice::open(&path, options.queue_depth as usize)?
            {
                return Ok(Box::new(device) as Box<dyn BlockDevice>);
            }
            Ok(Box::new(UringDevice::open(&path, &options)?) as Box<dyn BlockDevice>)
        });
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
