//! A local cluster: N data daemons in this process, each with its own store file, on
//! loopback. What `tier0 bench net` measures, and what the striped-read tests run against.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tier0_client::{DaemonConnection, DaemonEndpoint, StripedChunk, StripedFile};
use tier0_dataplane::daemon::{DataDaemon, DataDaemonConfig, DriveConfig, RdmaMode};
use tier0_dataplane::fence::FenceTable;
use tier0_dataplane::store::{ChunkId, StoreConfig};
use tier0_dataplane::worker::PollMode;
use tier0_topology::WorkerPlan;

#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub daemons: usize,
    pub chunk_size: u32,
    /// Size of each daemon's store file.
    pub store_size: u64,
    /// Where the store files go (a fresh folder inside is made and removed).
    pub dir: PathBuf,
    pub rdma: RdmaMode,
    pub poll_mode: PollMode,
    pub buffers_per_worker: usize,
    /// Memory-backed stores send whole-block TCP reads from a mapping (`net::mapped`).
    pub map_memory_drives: bool,
}

impl ClusterConfig {
    /// Small daemons for tests: stores in the system temp folder, TCP only.
    pub fn for_tests(daemons: usize, chunk_size: u32) -> ClusterConfig {
        ClusterConfig {
            daemons,
            chunk_size,
            store_size: 64 << 20,
            dir: std::env::temp_dir(),
            rdma: RdmaMode::Off,
            poll_mode: PollMode::Adaptive,
            buffers_per_worker: 16,
            map_memory_drives: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("creating {path}: {source}")]
    Dir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("daemon {index}: {source}")]
    Daemon {
        index: usize,
        #[source]
        source: tier0_dataplane::daemon::DaemonError,
    },
    #[error("writing chunk {index} to daemon {daemon}: {source}")]
    Write {
        index: usize,
        daemon: usize,
        #[source]
        source: tier0_client::ClientError,
    },
}

/// N daemons, each with one worker and one store file.
#[derive(Debug)]
pub struct LocalCluster {
    daemons: Vec<Option<DataDaemon>>,
    addrs: Vec<std::net::SocketAddr>,
    dir: PathBuf,
    token: Vec<u8>,
    chunk_size: u32,
}

impl LocalCluster {
    pub fn start(config: &ClusterConfig) -> Result<LocalCluster, ClusterError> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = config.dir.join(format!(
            "tier0-cluster-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(|source| ClusterError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
        let token = format!("local-cluster-{}", std::process::id()).into_bytes();
        let mut cluster = LocalCluster {
            daemons: Vec::new(),
            addrs: Vec::new(),
            dir,
            token,
            chunk_size: config.chunk_size,
        };
        for index in 0..config.daemons {
            let daemon_config = DataDaemonConfig {
                node: format!("node-{index}"),
                listen: "127.0.0.1:0".parse().expect("a literal address"),
                token: cluster.token.clone(),
                drives: vec![DriveConfig {
                    path: cluster.store_path(index),
                    create_size: Some(config.store_size),
                    numa_node: 0,
                }],
                store: StoreConfig {
                    chunk_size: config.chunk_size,
                    checksum_block_size: 4096,
                },
                poll_mode: config.poll_mode,
                in_flight_max: 32,
                buffers_per_worker: config.buffers_per_worker,
                hugepages: false,
                pin: false,
                rdma: config.rdma.clone(),
                local_socket: Default::default(),
                map_memory_drives: config.map_memory_drives,
            };
            // One worker per daemon, unpinned: N daemons share this machine's cores.
            let plan = WorkerPlan::single_node(0, vec![0]);
            let daemon = DataDaemon::start(&daemon_config, &plan)
                .map_err(|source| ClusterError::Daemon { index, source })?;
            cluster.addrs.push(daemon.local_addr());
            cluster.daemons.push(Some(daemon));
        }
        Ok(cluster)
    }

    pub fn token(&self) -> &[u8] {
        &self.token
    }

    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Every daemon, all at distance 0 (same host).
    pub fn endpoints(&self) -> Vec<DaemonEndpoint> {
        self.addrs
            .iter()
            .map(|&addr| DaemonEndpoint { addr, distance: 0 })
            .collect()
    }

    pub fn addr(&self, index: usize) -> std::net::SocketAddr {
        self.addrs[index]
    }

    /// The layout fences of daemon `index` (raise one to make it refuse older layouts of a
    /// file); `None` once the daemon was stopped.
    pub fn fences(&self, index: usize) -> Option<&Arc<FenceTable>> {
        self.daemons[index].as_ref().map(DataDaemon::fences)
    }

    /// Daemon `index`'s read heat, unless it was stopped.
    pub fn heat(&self, index: usize) -> Option<&Arc<tier0_dataplane::heat::HeatMap>> {
        self.daemons[index].as_ref().map(DataDaemon::heat)
    }

    /// The store file of daemon `index` (for tests that damage it).
    pub fn store_path(&self, index: usize) -> PathBuf {
        self.dir.join(format!("node-{index}.store"))
    }

    /// Writes `data` as file `file`: chunk i on daemons i, i+1, … (`replicas` of them,
    /// round-robin), over TCP.
    pub fn write_striped(
        &self,
        file: u64,
        data: &[u8],
        replicas: usize,
    ) -> Result<StripedFile, ClusterError> {
        let n = self.addrs.len();
        let mut connections: Vec<Option<DaemonConnection>> = (0..n).map(|_| None).collect();
        let mut layout = StripedFile::default();
        for (index, bytes) in data.chunks(self.chunk_size as usize).enumerate() {
            let chunk = ChunkId {
                file,
                index: index as u32,
                generation: 1,
            };
            let holders: Vec<usize> = (0..replicas.clamp(1, n)).map(|r| (index + r) % n).collect();
            for &daemon in &holders {
                let error = |source| ClusterError::Write {
                    index,
                    daemon,
                    source,
                };
                if connections[daemon].is_none() {
                    connections[daemon] = Some(
                        DaemonConnection::connect(
                            self.addrs[daemon],
                            &self.token,
                            "local-cluster",
                            Duration::from_secs(10),
                        )
                        .map_err(error)?,
                    );
                }
                let connection = connections[daemon].as_mut().expect("connected above");
                connection.write(chunk, bytes).map_err(error)?;
            }
            layout.chunks.push(StripedChunk {
                chunk,
                file_offset: (index * self.chunk_size as usize) as u64,
                chunk_offset: 0,
                len: bytes.len() as u32,
                replicas: holders,
                layout: None,
            });
        }
        Ok(layout)
    }

    /// Stops daemon `index` (its connections close; its store stays on disk).
    pub fn stop(&mut self, index: usize) {
        if let Some(daemon) = self.daemons[index].take() {
            daemon.shutdown();
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for daemon in self.daemons.iter_mut().filter_map(Option::take) {
            daemon.shutdown();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Deterministic pseudo-random bytes (xorshift), for files whose every byte is checked.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}
