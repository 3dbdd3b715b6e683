//! The control plane with real data daemons on loopback: daemons register and heartbeat
//! through their agents, files are written to the daemons and committed, read striped with
//! their layouts; a stale layout is refused by the daemons and answered by reopening;
//! garbage is collected on the daemons only once no version or snapshot needs it; a dead
//! node's and a drained node's chunks are re-replicated to restore the replication factor.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tier0_client::striped::{DaemonEndpoint, StripedChunk, StripedFile, StripedReader};
use tier0_client::{DaemonConnection, ReadBuffer, StripedError, TransportChoice};
use tier0_control::server::{ControlConfig, ControlServer, StoreChoice};
use tier0_control_api::agent::{Agent, AgentConfig, HeatReport};
use tier0_control_api::client::ControlClient;
use tier0_control_api::proto;
use tier0_dataplane::net::wire::LayoutRef;
use tier0_dataplane::store::ChunkId;
use tier0_perf::cluster::{ClusterConfig, LocalCluster, pattern};

const CHUNK: u32 = 64 << 10;
const NODES: usize = 4;

/// One cluster at a time in this binary: four daemons, their agents and a control plane per
/// test, several at once on a two-core machine, made heartbeats miss their 2 s leases.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Cluster {
    _turn: tokio::sync::MutexGuard<'static, ()>,
    daemons: LocalCluster,
    agents: Vec<Option<Agent>>,
    control: ControlServer,
    client: ControlClient,
    _dir: tempfile::TempDir,
}

fn node_id(index: usize) -> String {
    format!("d{index}")
}

impl Cluster {
    async fn start() -> Cluster {
        Self::start_with(|_| {}).await
    }

    async fn start_with(adjust: impl FnOnce(&mut ControlConfig)) -> Cluster {
        let turn = ONE_AT_A_TIME.lock().await;
        let daemons = tokio::task::spawn_blocking(|| {
            LocalCluster::start(&ClusterConfig::for_tests(NODES, CHUNK))
        })
        .await
        .unwrap()
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let token = daemons.token().to_vec();
        let mut config = ControlConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            token.clone(),
            StoreChoice::Redb(dir.path().join("metadata.redb")),
        );
        // Long enough that four daemons' agents on a loaded two-core machine never miss it
        // (they heartbeat every 100 ms); a dead node is still marked down within ~3 s.
        config.node_lease = Duration::from_secs(2);
        // Upkeep runs when the test asks (RunUpkeep), so each step is observable.
        config.upkeep_interval = Duration::from_secs(3600);
        // Superseded versions go at the first pass here (the default keeps them 10 min).
        config.version_grace = Duration::ZERO;
        adjust(&mut config);
        config.defaults.chunk_size = CHUNK;
        let control = ControlServer::start(config).await.unwrap();
        let url = format!("http://{}", control.local_addr());
        let mut agents = Vec::new();
        for index in 0..NODES {
            let fences = Arc::clone(daemons.fences(index).unwrap());
            let heat = Arc::clone(daemons.heat(index).unwrap());
            agents.push(Some(
                Agent::spawn(AgentConfig {
                    control: vec![url.clone()],
                    token: token.clone(),
                    node_id: node_id(index),
                    address: daemons.addr(index).to_string(),
                    topology: proto::TopologySummary::default(),
                    interval: Some(Duration::from_millis(100)),
                    fences: Box::new(move |pairs| fences.raise_all(pairs.iter().copied())),
                    free_bytes: Box::new(|| 0),
                    heat: Box::new(move || HeatReport::from_map(&heat)),
                    // d0 measures its GPUs (as NVML would); the others have no NVML.
                    gpus: Box::new(move || (index == 0).then(measured_gpus)),
                })
                .unwrap(),
            ));
        }
        let client = ControlClient::connect(&url, &token).await.unwrap();
        let cluster = Cluster {
            _turn: turn,
            daemons,
            agents,
            control,
            client,
            _dir: dir,
        };
        cluster
            .wait_for(|nodes| nodes.iter().filter(|n| n.1 == "up").count() == NODES)
            .await;
        cluster
    }

    async fn nodes(&self) -> Vec<(String, &'static str)> {
        let mut admin = self.client.admin.clone();
        admin
            .nodes(proto::NodesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes
            .into_iter()
            .map(|n| {
                let state = match proto::NodeState::try_from(n.state) {
                    Ok(proto::NodeState::Up) => "up",
                    Ok(proto::NodeState::Down) => "down",
                    Ok(proto::NodeState::Draining) => "draining",
                    Ok(proto::NodeState::Drained) => "drained",
                    _ => "?",
                };
                (n.id, state)
            })
            .collect()
    }

    async fn wait_for(&self, done: impl Fn(&[(String, &'static str)]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let nodes = self.nodes().await;
            if done(&nodes) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nodes never got there: {nodes:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn daemon_index(&self, node: &str) -> usize {
        node.strip_prefix('d').unwrap().parse().unwrap()
    }

    /// Writes `data` as a new version of `path`: places chunks, writes each to all its
    /// replicas over TCP, commits.
    async fn write(&mut self, path: &str, data: &[u8]) -> proto::Layout {
        let entry = self
            .client
            .namespace
            .create(proto::CreateRequest {
                path: path.to_owned(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .entry
            .unwrap();
        let count = data.len().div_ceil(CHUNK as usize) as u32;
        let placed = self
            .client
            .namespace
            .place_chunks(proto::PlaceChunksRequest {
                path: path.to_owned(),
                file_id: entry.id,
                first_index: 0,
                count,
            })
            .await
            .unwrap()
            .into_inner();
        let token = self.daemons.token().to_vec();
        let mut commits = Vec::new();
        for chunk in &placed.chunks {
            let start = chunk.index as usize * CHUNK as usize;
            let bytes = data[start..(start + CHUNK as usize).min(data.len())].to_vec();
            let id = chunk_id(chunk.id.unwrap());
            for replica in &chunk.replicas {
                let addr = self.daemons.addr(self.daemon_index(replica));
                let token = token.clone();
                let bytes = bytes.clone();
                tokio::task::spawn_blocking(move || {
                    let mut daemon = DaemonConnection::connect(
                        addr,
                        &token,
                        "test-writer",
                        Duration::from_secs(5),
                    )
                    .unwrap();
                    daemon.write(id, &bytes).unwrap();
                })
                .await
                .unwrap();
            }
            commits.push(proto::CommitChunk {
                index: chunk.index,
                id: chunk.id,
                length: bytes.len() as u32,
            });
        }
        self.client
            .namespace
            .commit(proto::CommitRequest {
                path: path.to_owned(),
                file_id: entry.id,
                base_version: entry.version,
                size: data.len() as u64,
                chunks: commits,
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn open(&mut self, path: &str) -> proto::Layout {
        self.client
            .namespace
            .open(proto::OpenRequest {
                path: path.to_owned(),
                version: 0,
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// Reads a file striped over the daemons with `layout`.
    async fn read(&self, layout: &proto::Layout) -> Result<Vec<u8>, StripedError> {
        let endpoints: Vec<DaemonEndpoint> = self.daemons.endpoints();
        let file = StripedFile {
            chunks: layout
                .chunks
                .iter()
                .map(|chunk| StripedChunk {
                    chunk: chunk_id(chunk.id.unwrap()),
                    file_offset: u64::from(chunk.index) * u64::from(layout.chunk_size),
                    chunk_offset: 0,
                    len: chunk.length,
                    replicas: chunk
                        .replicas
                        .iter()
                        .map(|r| self.daemon_index(r))
                        .collect(),
                    layout: None,
                })
                .collect(),
            layout: LayoutRef {
                file: layout.file_id,
                version: layout.layout_version,
            },
        };
        let token = self.daemons.token().to_vec();
        let size = layout.size as usize;
        tokio::task::spawn_blocking(move || {
            let mut reader =
                StripedReader::new(endpoints, &token, "test-reader", TransportChoice::Tcp, None)
                    .with_timeout(Duration::from_secs(5));
            let mut buffer = ReadBuffer::new(size.max(1)).unwrap();
            reader.read(&file, &mut buffer)?;
            Ok(buffer[..size].to_vec())
        })
        .await
        .unwrap()
    }

    /// Whether daemon `index` still holds `chunk`.
    async fn holds(&self, index: usize, chunk: ChunkId) -> bool {
        let addr = self.daemons.addr(index);
        let token = self.daemons.token().to_vec();
        tokio::task::spawn_blocking(move || {
            let mut daemon =
                DaemonConnection::connect(addr, &token, "test-probe", Duration::from_secs(5))
                    .unwrap();
            let mut byte = [0u8; 1];
            match daemon.read_into(chunk, 0, &mut byte) {
                Ok(()) => true,
                Err(error) if error.errno() == libc::ENOENT => false,
                Err(error) => panic!("probing {chunk} on {addr}: {error}"),
            }
        })
        .await
        .unwrap()
    }

    async fn upkeep(&mut self) -> proto::UpkeepReply {
        self.client
            .admin
            .run_upkeep(proto::UpkeepRequest {})
            .await
            .unwrap()
            .into_inner()
    }
}

fn chunk_id(id: proto::ChunkId) -> ChunkId {
    ChunkId {
        file: id.file,
        index: id.index,
        generation: id.generation,
    }
}

/// Reads with `layout` until the daemons refuse it as stale (they learn the fence from
/// their next heartbeat).
async fn until_stale(cluster: &Cluster, layout: &proto::Layout) -> StripedError {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match cluster.read(layout).await {
            Err(error @ StripedError::StaleLayout { .. }) => return error,
            Ok(_) => {}
            Err(other) => panic!("expected a stale layout, got {other}"),
        }
        assert!(
            Instant::now() < deadline,
            "the old layout was never refused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_layouts_are_refused_and_garbage_waits_for_snapshots() {
    let mut cluster = Cluster::start().await;
    let v1_data = pattern(3 * CHUNK as usize + 100, 1);
    let v1 = cluster.write("/train.bin", &v1_data).await;
    assert_eq!(cluster.read(&v1).await.unwrap(), v1_data);

    cluster
        .client
        .snapshots
        .create(proto::CreateSnapshotRequest {
            name: "v1".to_owned(),
            path: "/".to_owned(),
        })
        .await
        .unwrap();
    let v2_data = pattern(2 * CHUNK as usize, 2);
    let v2 = cluster.write("/train.bin", &v2_data).await;
    // The daemons learn the new layout version from their heartbeats and refuse the old.
    let stale = until_stale(&cluster, &v1).await;
    assert!(stale.to_string().contains("reopen"), "{stale}");
    // The client answers by reopening.
    let reopened = cluster.open("/train.bin").await;
    assert_eq!(reopened, v2);
    assert_eq!(cluster.read(&reopened).await.unwrap(), v2_data);

    // The snapshot pins v1: nothing is collected.
    let report = cluster.upkeep().await;
    assert_eq!(
        (report.versions_collected, report.chunks_collected),
        (0, 0),
        "{report:?}"
    );
    let v1_chunk = chunk_id(v1.chunks[0].id.unwrap());
    let holder = cluster.daemon_index(&v1.chunks[0].replicas[0]);
    assert!(cluster.holds(holder, v1_chunk).await);
    let pinned = cluster
        .client
        .namespace
        .open(proto::OpenRequest {
            path: "/train.bin".to_owned(),
            version: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        cluster.read(&pinned).await.unwrap(),
        v1_data,
        "a pinned version reads back"
    );

    // Unpinned, v1 and its 4 chunks go, on every replica; v2 stays whole.
    cluster
        .client
        .snapshots
        .delete(proto::DeleteSnapshotRequest {
            name: "v1".to_owned(),
        })
        .await
        .unwrap();
    let report = cluster.upkeep().await;
    assert_eq!(
        (
            report.versions_collected,
            report.chunks_collected,
            report.replicas_deleted
        ),
        (1, 4, 8),
        "{report:?}"
    );
    assert!(report.problems.is_empty(), "{report:?}");
    for chunk in &v1.chunks {
        for replica in &chunk.replicas {
            let index = cluster.daemon_index(replica);
            assert!(!cluster.holds(index, chunk_id(chunk.id.unwrap())).await);
        }
    }
    assert_eq!(cluster.read(&v2).await.unwrap(), v2_data);
    // A second pass finds nothing more.
    let again = cluster.upkeep().await;
    assert_eq!((again.versions_collected, again.chunks_collected), (0, 0));

    // A deleted file's chunks are collected too.
    cluster
        .client
        .namespace
        .delete(proto::DeleteRequest {
            path: "/train.bin".to_owned(),
            recursive: false,
        })
        .await
        .unwrap();
    let report = cluster.upkeep().await;
    assert_eq!(
        (report.versions_collected, report.chunks_collected),
        (1, 2),
        "{report:?}"
    );
    cluster.control.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_or_drained_node_is_re_replicated() {
    let mut cluster = Cluster::start().await;
    let data = pattern(6 * CHUNK as usize, 7);
    let before = cluster.write("/ckpt.bin", &data).await;

    // Kill d1: its agent stops heartbeating, the daemon stops serving.
    let dead = 1;
    cluster.agents[dead].take().unwrap().stop();
    tokio::task::block_in_place(|| cluster.daemons.stop(dead));
    cluster
        .wait_for(|nodes| {
            nodes
                .iter()
                .any(|(id, state)| id == "d1" && *state == "down")
        })
        .await;
    let on_dead = before
        .chunks
        .iter()
        .filter(|c| c.replicas.contains(&node_id(dead)))
        .count() as u64;
    assert!(on_dead > 0, "placement put some chunk on every node");
    let report = cluster.upkeep().await;
    assert_eq!(report.replicas_copied, on_dead, "{report:?}");
    let after = cluster.open("/ckpt.bin").await;
    assert!(after.layout_version > before.layout_version);
    for chunk in &after.chunks {
        assert_eq!(
            chunk.replicas.len(),
            2,
            "replication factor restored: {chunk:?}"
        );
        assert!(!chunk.replicas.contains(&node_id(dead)), "{chunk:?}");
    }
    assert_eq!(cluster.read(&after).await.unwrap(), data);
    until_stale(&cluster, &before).await;

    // Drain d2: its chunks are copied off, then it is drained.
    cluster
        .client
        .cluster
        .drain(proto::DrainRequest {
            node_id: "d2".to_owned(),
            cancel: false,
        })
        .await
        .unwrap();
    let report = cluster.upkeep().await;
    assert!(
        report.replicas_copied > 0 && report.nodes_drained == 1,
        "{report:?}"
    );
    let drained = cluster.open("/ckpt.bin").await;
    for chunk in &drained.chunks {
        assert_eq!(chunk.replicas.len(), 2);
        assert!(
            !chunk.replicas.iter().any(|r| r == "d1" || r == "d2"),
            "{chunk:?}"
        );
    }
    assert_eq!(cluster.read(&drained).await.unwrap(), data);
    cluster
        .wait_for(|nodes| {
            nodes
                .iter()
                .any(|(id, state)| id == "d2" && *state == "drained")
        })
        .await;
    // With two nodes left for replication 2, nothing more can move: a clear problem, not
    // a wrong layout.
    cluster.agents[0].take().unwrap().stop();
    tokio::task::block_in_place(|| cluster.daemons.stop(0));
    cluster
        .wait_for(|nodes| {
            nodes
                .iter()
                .any(|(id, state)| id == "d0" && *state == "down")
        })
        .await;
    let report = cluster.upkeep().await;
    assert_eq!(report.replicas_copied, 0);
    assert!(
        report.problems.iter().any(|p| p.contains("no up node")),
        "{report:?}"
    );
    cluster.control.shutdown().await;
}

/// The client shim caches a layout and, when the daemons refuse it as stale, reopens the
/// file and reads the new version: every read returns exactly one version's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_caches_layouts_and_reopens_stale_ones() {
    let mut cluster = Cluster::start().await;
    let v1_data = pattern(2 * CHUNK as usize + 17, 11);
    cluster.write("/sample.bin", &v1_data).await;
    let url = format!("http://{}", cluster.control.local_addr());
    let token = cluster.daemons.token().to_vec();
    let client = tokio::task::spawn_blocking(move || {
        let client = tier0_client::Client::connect(&url, &token, "cache-test").unwrap();
        let mut buffer = ReadBuffer::new(1 << 20).unwrap();
        let (layout, _) = client.read("/sample.bin", &mut buffer).unwrap();
        assert_eq!(layout.version, 1);
        client
    })
    .await
    .unwrap();
    // Another client writes version 2 (a streaming writer, committed at close).
    let v2_data = pattern(CHUNK as usize + 5, 12);
    let url = format!("http://{}", cluster.control.local_addr());
    let token = cluster.daemons.token().to_vec();
    let written = v2_data.clone();
    let v2 = tokio::task::spawn_blocking(move || {
        let writer = tier0_client::Client::connect(&url, &token, "writer").unwrap();
        let mut file = writer.create("/sample.bin").unwrap();
        for piece in written.chunks(10_000) {
            file.write(piece).unwrap();
        }
        file.close().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        (v2.version, v2.size, v2.chunks.len()),
        (2, v2_data.len() as u64, 2)
    );
    let (versions, reopens) = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut versions = Vec::new();
        loop {
            let mut buffer = ReadBuffer::new(1 << 20).unwrap();
            let (layout, report) = client.read("/sample.bin", &mut buffer).unwrap();
            let expected = if layout.version == 1 {
                &v1_data
            } else {
                &v2_data
            };
            assert_eq!(report.bytes, expected.len() as u64);
            assert_eq!(
                &buffer[..expected.len()],
                &expected[..],
                "version {}",
                layout.version
            );
            versions.push(layout.version);
            if layout.version == 2 {
                return (versions, client.reopens());
            }
            assert!(
                Instant::now() < deadline,
                "never saw version 2: {versions:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
    // Only a stale refusal makes the client reopen: the new version came that way.
    assert_eq!(reopens, 1, "{versions:?}");
    cluster.control.shutdown().await;
}

/// Two writers on one version: the first commit wins, the second commits nothing; a writer
/// dropped without closing commits nothing either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_commit_at_close_and_conflicts_lose_cleanly() {
    let cluster = Cluster::start().await;
    let url = format!("http://{}", cluster.control.local_addr());
    let token = cluster.daemons.token().to_vec();
    tokio::task::spawn_blocking(move || {
        let client = tier0_client::Client::connect(&url, &token, "writers").unwrap();
        let first_data = pattern(CHUNK as usize * 2, 21);
        let second_data = pattern(CHUNK as usize, 22);
        let mut first = client.create("/contended").unwrap();
        let mut second = client.create("/contended").unwrap();
        first.write(&first_data).unwrap();
        second.write(&second_data).unwrap();
        assert_eq!(first.close().unwrap().version, 1);
        let lost = second.close().unwrap_err().to_string();
        assert!(lost.contains("version 1 is current"), "{lost}");
        let mut abandoned = client.create("/contended").unwrap();
        abandoned.write(&second_data).unwrap();
        drop(abandoned);
        client.forget("/contended");
        let mut buffer = ReadBuffer::new(1 << 20).unwrap();
        let (layout, _) = client.read("/contended", &mut buffer).unwrap();
        assert_eq!(layout.version, 1);
        assert_eq!(&buffer[..first_data.len()], &first_data[..]);
        let missing = client.create("/no/such/dir/file").unwrap_err().to_string();
        assert!(missing.contains("/no/such/dir"), "{missing}");
    })
    .await
    .unwrap();
}

/// One batch reads ranges of several files (parts of chunks, across chunk boundaries, past
/// the end) into one buffer, each range where it was asked to land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_reads_ranges_of_many_files_into_one_buffer() {
    let mut cluster = Cluster::start().await;
    let a = pattern(3 * CHUNK as usize + 1000, 31);
    let b = pattern(CHUNK as usize / 2, 32);
    cluster.write("/a", &a).await;
    cluster.write("/b", &b).await;
    let url = format!("http://{}", cluster.control.local_addr());
    let token = cluster.daemons.token().to_vec();
    tokio::task::spawn_blocking(move || {
        let client = tier0_client::Client::connect(&url, &token, "batch").unwrap();
        let chunk = CHUNK as u64;
        let reads = [
            // Across the boundary of chunks 0 and 1.
            ("/a", chunk - 100, 300),
            // All of b.
            ("/b", 0, b.len() as u64),
            // Inside chunk 2.
            ("/a", 2 * chunk + 7, 4096),
            // Past the end of a: clipped.
            ("/a", 3 * chunk + 900, 500),
        ];
        let mut batch = Vec::new();
        let mut at = 0;
        for (path, offset, len) in reads {
            batch.push(tier0_client::BatchRead {
                path: path.to_owned(),
                offset,
                len,
                buffer_offset: at,
            });
            at += len;
        }
        let mut buffer = ReadBuffer::new(at as usize).unwrap();
        let got = client.read_batch(&batch, &mut buffer).unwrap();
        assert_eq!(got, [300, b.len() as u64, 4096, 100]);
        for (read, got) in batch.iter().zip(&got) {
            let source = if read.path == "/a" { &a } else { &b };
            let want = &source[read.offset as usize..(read.offset + got) as usize];
            let landed = &buffer[read.buffer_offset as usize..(read.buffer_offset + got) as usize];
            assert_eq!(landed, want, "{read:?}");
        }
        let overlapping = [
            tier0_client::BatchRead {
                path: "/b".to_owned(),
                offset: 0,
                len: 100,
                buffer_offset: 0,
            },
            tier0_client::BatchRead {
                path: "/b".to_owned(),
                offset: 0,
                len: 100,
                buffer_offset: 50,
            },
        ];
        let error = client.read_batch(&overlapping, &mut buffer).unwrap_err();
        assert!(error.to_string().contains("overlap"), "{error}");
        let missing = client
            .read_batch(
                &[tier0_client::BatchRead {
                    path: "/nope".to_owned(),
                    offset: 0,
                    len: 1,
                    buffer_offset: 0,
                }],
                &mut buffer,
            )
            .unwrap_err();
        assert!(missing.to_string().contains("/nope"), "{missing}");
    })
    .await
    .unwrap();
}

/// Reads are counted on the daemons that serve them, reported with their heartbeats, and
/// shown per chunk and per node by `Admin.Heat`; an unread file is cold; bad heat reports are
/// refused with the field named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_make_heat_that_the_heartbeats_report() {
    let mut cluster = Cluster::start().await;
    let hot_data = pattern(3 * CHUNK as usize, 21);
    let layout = cluster.write("/hot.bin", &hot_data).await;
    cluster
        .write("/cold.bin", &pattern(CHUNK as usize, 22))
        .await;
    for _ in 0..5 {
        assert_eq!(cluster.read(&layout).await.unwrap(), hot_data);
    }
    let mut admin = cluster.client.admin.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    let heat = loop {
        let heat = admin
            .heat(proto::HeatRequest {
                path: "/hot.bin".into(),
            })
            .await
            .unwrap()
            .into_inner();
        // Five reads of each chunk, a little decayed (half-life 10 min).
        if heat.chunks.iter().all(|chunk| chunk.reads > 4.9) {
            break heat;
        }
        assert!(Instant::now() < deadline, "heat never reported: {heat:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (heat.path.as_str(), heat.file_id),
        ("/hot.bin", layout.file_id)
    );
    assert_eq!(heat.chunks.len(), 3);
    for (chunk, placed) in heat.chunks.iter().zip(&layout.chunks) {
        assert!(chunk.reads <= 5.0, "{chunk:?}");
        assert!(
            (chunk.bytes - 5.0 * f64::from(placed.length)).abs() < 0.01 * chunk.bytes,
            "{chunk:?}"
        );
        // Only replicas served it.
        for node in &chunk.nodes {
            assert!(
                placed.replicas.contains(&node.node_id),
                "{chunk:?} {placed:?}"
            );
        }
    }
    assert!((heat.reads - heat.chunks.iter().map(|c| c.reads).sum::<f64>()).abs() < 1e-9);
    let cold = admin
        .heat(proto::HeatRequest {
            path: "/cold.bin".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cold.chunks.len(), 1);
    assert_eq!((cold.reads, cold.chunks[0].nodes.len()), (0.0, 0));
    let missing = admin
        .heat(proto::HeatRequest {
            path: "/nothing".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");

    // A heartbeat with a bad heat report is refused, naming the field.
    let mut membership = cluster.client.cluster.clone();
    let bad = membership
        .heartbeat(proto::HeartbeatRequest {
            node_id: node_id(0),
            heat: vec![proto::ExtentHeat {
                chunk: Some(proto::ChunkId {
                    file: 1,
                    index: 0,
                    generation: 1,
                }),
                reads: f64::NAN,
                bytes: 0.0,
            }],
            heat_half_life_ms: 600_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("heat[0]"), "{}", bad.message());
    let no_half_life = membership
        .heartbeat(proto::HeartbeatRequest {
            node_id: node_id(0),
            heat: vec![proto::ExtentHeat {
                chunk: None,
                reads: 1.0,
                bytes: 1.0,
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        no_half_life.message().contains("heat_half_life_ms"),
        "{}",
        no_half_life.message()
    );
}

/// Reads `layout` `times` times and waits until every chunk's heat reached the control plane.
async fn heat_up(cluster: &Cluster, layout: &proto::Layout, times: usize) {
    for _ in 0..times {
        cluster.read(layout).await.unwrap();
    }
    let mut admin = cluster.client.admin.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let heat = admin
            .heat(proto::HeatRequest {
                path: layout.path.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if heat
            .chunks
            .iter()
            .all(|chunk| chunk.reads >= times as f64 * 0.99)
        {
            return;
        }
        assert!(Instant::now() < deadline, "heat never reported: {heat:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn mkdir(cluster: &Cluster, path: &str) {
    let mut namespace = cluster.client.namespace.clone();
    namespace
        .mkdir(proto::MkdirRequest {
            path: path.into(),
            parents: true,
            settings: None,
        })
        .await
        .unwrap();
}

async fn declare(cluster: &Cluster, job: &str, path: &str, node: &str) {
    let mut orchestration = cluster.client.orchestration.clone();
    orchestration
        .declare_job(proto::DeclareJobRequest {
            job: job.into(),
            paths: vec![path.into()],
            gpus: (0..2)
                .map(|index| proto::GpuRef {
                    node_id: node.into(),
                    index,
                })
                .collect(),
        })
        .await
        .unwrap();
}

async fn movements(cluster: &Cluster) -> Vec<proto::Movement> {
    let mut admin = cluster.client.admin.clone();
    admin
        .movements(proto::MovementsRequest { limit: 0 })
        .await
        .unwrap()
        .into_inner()
        .movements
}

/// A hot file that a job will read on node d3's GPUs gets a replica of every chunk on d3,
/// copied through the data plane and published in a new layout version; every move is in
/// the audit log with its reason; a cold file the job also declared does not move; the
/// bytes read back the same through the new layout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_file_moves_to_the_node_whose_gpus_will_read_it() {
    let mut cluster = Cluster::start().await;
    mkdir(&cluster, "/train").await;
    let data = pattern(4 * CHUNK as usize, 31);
    let layout = cluster.write("/train/hot.bin", &data).await;
    cluster
        .write("/train/cold.bin", &pattern(CHUNK as usize, 32))
        .await;
    heat_up(&cluster, &layout, 3).await;
    let missing: Vec<&proto::LayoutChunk> = layout
        .chunks
        .iter()
        .filter(|chunk| !chunk.replicas.contains(&node_id(3)))
        .collect();
    assert!(
        !missing.is_empty(),
        "d3 already holds every chunk: {layout:?}"
    );
    declare(&cluster, "train", "/train", &node_id(3)).await;
    let report = cluster.upkeep().await;
    assert_eq!(
        (
            report.moves_executed,
            report.moves_failed,
            report.moves_refused
        ),
        (missing.len() as u64, 0, 0),
        "{report:?}"
    );
    assert_eq!(report.bytes_moved, missing.len() as u64 * u64::from(CHUNK));
    let moved = cluster.open("/train/hot.bin").await;
    assert!(
        moved.layout_version > layout.layout_version,
        "layout not bumped"
    );
    for chunk in &moved.chunks {
        assert!(chunk.replicas.contains(&node_id(3)), "{chunk:?}");
        assert!(cluster.holds(3, chunk_id(chunk.id.unwrap())).await);
    }
    assert_eq!(cluster.read(&moved).await.unwrap(), data);
    let log = movements(&cluster).await;
    assert_eq!(log.len(), missing.len());
    for movement in &log {
        assert_eq!(
            (
                movement.state.as_str(),
                movement.path.as_str(),
                movement.to_node.as_str()
            ),
            ("executed", "/train/hot.bin", "d3")
        );
        assert!(
            movement.reason.contains("hot (") && movement.reason.contains("train"),
            "{}",
            movement.reason
        );
        assert!(!movement.from_node.is_empty());
    }
    // Nothing left to do: a second pass moves nothing.
    let again = cluster.upkeep().await;
    assert_eq!(again.moves_executed, 0, "{again:?}");
}

/// Dry-run plans and moves nothing; a budget smaller than the moves refuses the rest, and
/// the log says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_moves_nothing_and_the_budget_holds() {
    let mut cluster = Cluster::start_with(|config| {
        config.rebalance.mode = tier0_control::rebalance::Mode::DryRun;
    })
    .await;
    mkdir(&cluster, "/a").await;
    let layout = cluster
        .write("/a/hot.bin", &pattern(4 * CHUNK as usize, 41))
        .await;
    heat_up(&cluster, &layout, 2).await;
    declare(&cluster, "job", "/a/hot.bin", &node_id(3)).await;
    let report = cluster.upkeep().await;
    assert!(report.moves_planned > 0, "{report:?}");
    assert_eq!((report.moves_executed, report.bytes_moved), (0, 0));
    assert_eq!(
        cluster.open("/a/hot.bin").await.chunks,
        layout.chunks,
        "dry-run moved"
    );
    assert!(
        movements(&cluster)
            .await
            .iter()
            .all(|m| m.state == "planned")
    );

    // One chunk's worth of budget an hour (on a cluster of its own: one at a time).
    drop(cluster);
    let mut cluster = Cluster::start_with(|config| {
        config.rebalance.max_bytes_per_hour = u64::from(CHUNK);
    })
    .await;
    mkdir(&cluster, "/b").await;
    let layout = cluster
        .write("/b/hot.bin", &pattern(8 * CHUNK as usize, 42))
        .await;
    heat_up(&cluster, &layout, 2).await;
    declare(&cluster, "job", "/b", &node_id(0)).await;
    let report = cluster.upkeep().await;
    assert_eq!(report.moves_executed, 1, "{report:?}");
    assert!(report.moves_refused >= 1, "{report:?}");
    let log = movements(&cluster).await;
    let refused = log.iter().find(|m| m.state == "refused").unwrap();
    assert!(refused.reason.contains("budget"), "{}", refused.reason);
    // The next pass within the hour is refused too: the budget is per rolling hour.
    let again = cluster.upkeep().await;
    assert_eq!(again.moves_executed, 0, "{again:?}");
}

async fn tag(cluster: &Cluster, path: &str, key: &str, value: &str) {
    let mut namespace = cluster.client.namespace.clone();
    namespace
        .tag(proto::TagRequest {
            path: path.into(),
            set: [(key.to_string(), value.to_string())].into_iter().collect(),
            remove: Vec::new(),
        })
        .await
        .unwrap();
}

/// Policies and overrides: a never-move file stays (refused, with the reason); a file
/// pinned to d1 moves to d1, not to the readers' node; under an approve rule moves wait
/// for `Approve`, then the next pass makes them; each decision is logged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_pin_forbid_and_hold_moves_for_approval() {
    let mut cluster = Cluster::start_with(|config| {
        config.rebalance.policies = tier0_control::policy::Policies::parse(
            "[[policy]]\nprefix = \"/gated\"\nmode = \"approve\"\n",
        )
        .unwrap();
    })
    .await;
    for dir in ["/free", "/gated"] {
        mkdir(&cluster, dir).await;
    }
    let stay = cluster
        .write("/free/stay.bin", &pattern(2 * CHUNK as usize, 51))
        .await;
    let pinned = cluster
        .write("/free/pinned.bin", &pattern(2 * CHUNK as usize, 52))
        .await;
    let gated = cluster
        .write("/gated/wait.bin", &pattern(2 * CHUNK as usize, 53))
        .await;
    for layout in [&stay, &pinned, &gated] {
        heat_up(&cluster, layout, 2).await;
    }
    tag(&cluster, "/free/stay.bin", "tier0.never-move", "true").await;
    tag(&cluster, "/free/pinned.bin", "tier0.pin", "d1").await;
    declare(&cluster, "job", "/free", &node_id(3)).await;
    declare(&cluster, "gated-job", "/gated", &node_id(3)).await;
    let first = cluster.upkeep().await;
    assert_eq!(
        cluster.open("/free/stay.bin").await.chunks,
        stay.chunks,
        "never-move moved"
    );
    let moved = cluster.open("/free/pinned.bin").await;
    for chunk in &moved.chunks {
        assert!(chunk.replicas.contains(&node_id(1)), "{chunk:?}");
        assert!(
            !chunk.replicas.contains(&node_id(3))
                || pinned
                    .chunks
                    .iter()
                    .any(|c| c.index == chunk.index && c.replicas.contains(&node_id(3))),
            "moved past the pin: {chunk:?}"
        );
    }
    assert_eq!(
        cluster.open("/gated/wait.bin").await.chunks,
        gated.chunks,
        "moved before approval"
    );
    let log = movements(&cluster).await;
    let of = |path: &str, state: &str| {
        log.iter()
            .filter(|m| m.path == path && m.state == state)
            .count()
    };
    let stay_moves = stay
        .chunks
        .iter()
        .filter(|c| !c.replicas.contains(&node_id(3)))
        .count();
    assert_eq!(of("/free/stay.bin", "refused"), stay_moves, "{log:?}");
    assert!(
        log.iter()
            .filter(|m| m.path == "/free/stay.bin")
            .all(|m| m.reason.contains("never-move"))
    );
    let gated_moves = gated
        .chunks
        .iter()
        .filter(|c| !c.replicas.contains(&node_id(3)))
        .count();
    assert_eq!(of("/gated/wait.bin", "planned"), gated_moves, "{log:?}");
    assert!(
        log.iter()
            .filter(|m| m.path == "/gated/wait.bin")
            .all(|m| m.reason.contains("awaiting approval") && m.policy == "policy[0]")
    );
    assert!(first.moves_refused as usize >= stay_moves);

    // A second pass changes nothing and logs nothing new.
    cluster.upkeep().await;
    assert_eq!(
        movements(&cluster).await.len(),
        log.len(),
        "decisions logged twice"
    );

    // Approved: the next pass makes the gated moves.
    let mut admin = cluster.client.admin.clone();
    admin
        .approve(proto::ApproveRequest {
            path: "/gated/wait.bin".into(),
        })
        .await
        .unwrap();
    let approved = cluster.upkeep().await;
    assert_eq!(
        approved.moves_executed as usize, gated_moves,
        "{approved:?}"
    );
    let done = cluster.open("/gated/wait.bin").await;
    assert!(
        done.chunks
            .iter()
            .all(|chunk| chunk.replicas.contains(&node_id(3)))
    );
    let bad = admin
        .approve(proto::ApproveRequest {
            path: "/gated/none".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::NotFound);
}

/// A scheduler's prestage request copies every chunk of a path to the nodes it names, hot or
/// not, and a bad node id is refused naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prestaged_path_is_copied_to_the_nodes_asked_for() {
    let mut cluster = Cluster::start().await;
    mkdir(&cluster, "/pre").await;
    let data = pattern(3 * CHUNK as usize, 61);
    let layout = cluster.write("/pre/cold.bin", &data).await;
    let mut orchestration = cluster.client.orchestration.clone();
    orchestration
        .prestage(proto::PrestageRequest {
            path: "/pre".into(),
            nodes: vec![node_id(2)],
        })
        .await
        .unwrap();
    let missing = layout
        .chunks
        .iter()
        .filter(|chunk| !chunk.replicas.contains(&node_id(2)))
        .count();
    let report = cluster.upkeep().await;
    assert_eq!(report.moves_executed as usize, missing, "{report:?}");
    let moved = cluster.open("/pre/cold.bin").await;
    assert!(
        moved
            .chunks
            .iter()
            .all(|chunk| chunk.replicas.contains(&node_id(2)))
    );
    assert_eq!(cluster.read(&moved).await.unwrap(), data);
    assert!(
        movements(&cluster)
            .await
            .iter()
            .all(|m| m.reason.contains("prestage to d2 requested"))
    );
    let listed = orchestration
        .gpus(proto::GpusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.prestages.len(), 1);
    let bad = orchestration
        .prestage(proto::PrestageRequest {
            path: "/pre".into(),
            nodes: vec!["no such/node".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("nodes[0]"), "{}", bad.message());
    // Cancelled: nothing more is asked.
    orchestration
        .prestage(proto::PrestageRequest {
            path: "/pre".into(),
            nodes: Vec::new(),
        })
        .await
        .unwrap();
    let listed = orchestration
        .gpus(proto::GpusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.prestages.is_empty());
}

/// What d0's heartbeats say NVML measured.
fn measured_gpus() -> Vec<proto::GpuStatus> {
    vec![
        proto::GpuStatus {
            index: 0,
            busy: true,
            measured: true,
            utilization_percent: 87,
            compute_processes: 1,
            memory_used_bytes: 40 << 30,
            ..Default::default()
        },
        proto::GpuStatus {
            index: 1,
            measured: true,
            ..Default::default()
        },
    ]
}

/// GPU activity measured on a node comes with its heartbeats and is listed with its node,
/// next to what schedulers report; nodes without NVML list none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_activity_measured_on_a_node_comes_with_its_heartbeats() {
    let cluster = Cluster::start().await;
    let mut orchestration = cluster.client.orchestration.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    let listed = loop {
        let listed = orchestration
            .gpus(proto::GpusRequest {})
            .await
            .unwrap()
            .into_inner();
        if !listed.nodes.is_empty() || Instant::now() > deadline {
            break listed;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(listed.nodes.len(), 1, "{listed:?}");
    let d0 = &listed.nodes[0];
    assert_eq!(d0.node_id, node_id(0));
    assert_eq!(d0.gpus.len(), 2);
    assert!(d0.gpus[0].busy && d0.gpus[0].measured);
    assert_eq!(
        (d0.gpus[0].utilization_percent, d0.gpus[0].memory_used_bytes),
        (87, 40 << 30)
    );
    assert!(!d0.gpus[1].busy && d0.gpus[1].measured);
    assert!(d0.reported_ms > 0);
}
