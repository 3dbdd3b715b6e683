//! The control plane through its real gRPC server on loopback, on both metadata stores:
//! namespace, layouts and versions, snapshots, membership, security, reflection, watches,
//! validation at the edge, and metadata that survives a restart.

use std::collections::HashMap;
use std::time::Duration;

use tier0_control::client::ControlClient;
use tier0_control::proto;
use tier0_control::server::{ControlConfig, ControlServer, StoreChoice};
use tier0_control::testing::EtcdServer;
use tonic::Code;

const TOKEN: &[u8] = b"grpc-test-token";

/// A control plane on a fresh store, and a client of it.
struct Harness {
    server: Option<ControlServer>,
    client: ControlClient,
    config: ControlConfig,
    _dir: tempfile::TempDir,
    _etcd: Option<EtcdServer>,
}

#[derive(Clone, Copy, Debug)]
enum Store {
    Redb,
    Etcd,
}

impl Harness {
    async fn start(store: Store) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let (choice, etcd) = match store {
            Store::Redb => (StoreChoice::Redb(dir.path().join("metadata.redb")), None),
            Store::Etcd => {
                let etcd = EtcdServer::start().await.unwrap();
                let choice = StoreChoice::Etcd {
                    endpoints: vec![etcd.endpoint()],
                    prefix: "/grpc-test/".to_owned(),
                };
                (choice, Some(etcd))
            }
        };
        let mut config = ControlConfig::new("127.0.0.1:0".parse().unwrap(), TOKEN.to_vec(), choice);
        config.node_lease = Duration::from_millis(1500);
        config.leader_ttl = Duration::from_secs(1);
        let server = ControlServer::start(config.clone()).await.unwrap();
        let client = ControlClient::connect(&server.local_addr().to_string(), TOKEN)
            .await
            .unwrap();
        Harness {
            server: Some(server),
            client,
            config,
            _dir: dir,
            _etcd: etcd,
        }
    }

    /// Stops the control plane and starts a new one on the same store.
    async fn restart(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
        let server = ControlServer::start(self.config.clone()).await.unwrap();
        self.client = ControlClient::connect(&server.local_addr().to_string(), TOKEN)
            .await
            .unwrap();
        self.server = Some(server);
    }

    async fn register(&mut self, id: &str, domain: &str) {
        self.client
            .cluster
            .register(proto::RegisterRequest {
                node_id: id.to_owned(),
                address: format!("127.0.0.1:{}", 7400 + id.len()),
                topology: Some(proto::TopologySummary {
                    failure_domain: domain.to_owned(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
    }

    /// Writes `size` bytes' worth of chunks (metadata only) and commits them.
    async fn write(&mut self, path: &str, size: u64) -> proto::Layout {
        let parent = path
            .rsplit_once('/')
            .map(|(p, _)| p)
            .filter(|p| !p.is_empty());
        self.client
            .namespace
            .mkdir(proto::MkdirRequest {
                path: parent.unwrap_or("/").to_owned(),
                parents: true,
                settings: None,
            })
            .await
            .unwrap();
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
        let chunk_size = entry.settings.unwrap().chunk_size as u64;
        let count = size.div_ceil(chunk_size) as u32;
        let mut chunks = Vec::new();
        if count > 0 {
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
            for chunk in placed.chunks {
                let start = chunk.index as u64 * chunk_size;
                chunks.push(proto::CommitChunk {
                    index: chunk.index,
                    id: chunk.id,
                    length: (size - start).min(chunk_size) as u32,
                });
            }
        }
        self.client
            .namespace
            .commit(proto::CommitRequest {
                path: path.to_owned(),
                file_id: entry.id,
                base_version: entry.version,
                size,
                chunks,
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn open(&mut self, path: &str) -> Result<proto::Layout, tonic::Status> {
        self.client
            .namespace
            .open(proto::OpenRequest {
                path: path.to_owned(),
                version: 0,
            })
            .await
            .map(|reply| reply.into_inner())
    }

    async fn names(&mut self, path: &str) -> Vec<String> {
        self.client
            .namespace
            .list(proto::ListRequest {
                path: path.to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
            .entries
            .into_iter()
            .map(|entry| entry.name)
            .collect()
    }
}

macro_rules! both_stores {
    ($scenario:ident, $redb:ident, $etcd:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $redb() {
            $scenario(Harness::start(Store::Redb).await).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $etcd() {
            $scenario(Harness::start(Store::Etcd).await).await;
        }
    };
}

both_stores!(
    namespace_lifecycle,
    redb_namespace_lifecycle,
    etcd_namespace_lifecycle
);
both_stores!(snapshots, redb_snapshots, etcd_snapshots);
both_stores!(membership, redb_membership, etcd_membership);
both_stores!(
    survives_restart,
    redb_survives_restart,
    etcd_survives_restart
);

fn assert_code<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err("the call should fail");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "{:?} does not say {needle:?}",
        status.message()
    );
}

async fn namespace_lifecycle(mut h: Harness) {
    for (id, domain) in [
        ("n1", "rack-a"),
        ("n2", "rack-a"),
        ("n3", "rack-b"),
        ("n4", "rack-b"),
    ] {
        h.register(id, domain).await;
    }
    h.client
        .namespace
        .mkdir(proto::MkdirRequest {
            path: "/datasets/imagenet".to_owned(),
            parents: true,
            settings: Some(proto::LayoutSettings {
                chunk_size: 1 << 20,
                replication: 0,
            }),
        })
        .await
        .unwrap();
    // A file takes its directory's chunk size; 2.5 chunks → 3 chunks, the last short.
    let layout = h.write("/datasets/imagenet/train-0.tar", 5 << 19).await;
    assert_eq!(layout.version, 1);
    assert_eq!(layout.chunk_size, 1 << 20);
    assert_eq!(layout.size, 5 << 19);
    let lengths: Vec<u32> = layout.chunks.iter().map(|c| c.length).collect();
    assert_eq!(lengths, [1 << 20, 1 << 20, 1 << 19]);
    let rack = |node: &str| {
        if node == "n1" || node == "n2" {
            'a'
        } else {
            'b'
        }
    };
    for chunk in &layout.chunks {
        assert_eq!(chunk.replicas.len(), 2, "default replication is 2");
        assert_ne!(
            rack(&chunk.replicas[0]),
            rack(&chunk.replicas[1]),
            "{chunk:?}"
        );
    }
    let mut firsts: Vec<&str> = layout
        .chunks
        .iter()
        .map(|c| c.replicas[0].as_str())
        .collect();
    firsts.dedup();
    assert_eq!(
        firsts.len(),
        3,
        "consecutive chunks start on different nodes: {firsts:?}"
    );
    let named: Vec<&str> = layout.nodes.iter().map(|n| n.id.as_str()).collect();
    for chunk in &layout.chunks {
        for replica in &chunk.replicas {
            assert!(
                named.contains(&replica.as_str()),
                "layout names every replica's node"
            );
        }
    }
    assert_eq!(
        h.open("/datasets/imagenet/train-0.tar").await.unwrap(),
        layout
    );

    // A second commit on the same base loses: versions publish atomically, once.
    let second = h.write("/datasets/imagenet/train-0.tar", 100).await;
    assert_eq!((second.version, second.chunks.len()), (2, 1));
    assert!(second.layout_version > layout.layout_version);
    let stale = h
        .client
        .namespace
        .commit(proto::CommitRequest {
            path: "/datasets/imagenet/train-0.tar".to_owned(),
            file_id: layout.file_id,
            base_version: 1,
            size: 0,
            chunks: vec![],
        })
        .await;
    assert_code(stale, Code::FailedPrecondition, "version 2 is current");
    // The old version is still readable by number until it is collected.
    let old = h
        .client
        .namespace
        .open(proto::OpenRequest {
            path: "/datasets/imagenet/train-0.tar".to_owned(),
            version: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(old.chunks, layout.chunks);
    let stat = h
        .client
        .namespace
        .stat(proto::StatRequest {
            path: "/datasets/imagenet/train-0.tar".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stat.versions, [1, 2]);
    assert_eq!(stat.entry.unwrap().size, 100);

    // A commit must name placed chunks that tile the size exactly.
    let bogus = h
        .client
        .namespace
        .commit(proto::CommitRequest {
            path: "/datasets/imagenet/train-0.tar".to_owned(),
            file_id: layout.file_id,
            base_version: 2,
            size: 10,
            chunks: vec![proto::CommitChunk {
                index: 0,
                id: Some(proto::ChunkId {
                    file: layout.file_id,
                    index: 0,
                    generation: 999,
                }),
                length: 10,
            }],
        })
        .await;
    assert_code(bogus, Code::FailedPrecondition, "never placed");
    let short = h
        .client
        .namespace
        .commit(proto::CommitRequest {
            path: "/datasets/imagenet/train-0.tar".to_owned(),
            file_id: layout.file_id,
            base_version: 2,
            size: 3 << 20,
            chunks: vec![],
        })
        .await;
    assert_code(short, Code::InvalidArgument, "needs 3 chunks");

    // list, rename, tags, delete.
    h.write("/datasets/imagenet/train-1.tar", 10).await;
    assert_eq!(
        h.names("/datasets/imagenet").await,
        ["train-0.tar", "train-1.tar"]
    );
    h.client
        .namespace
        .rename(proto::RenameRequest {
            from: "/datasets/imagenet".to_owned(),
            to: "/datasets/in1k".to_owned(),
        })
        .await
        .unwrap();
    assert_eq!(h.names("/datasets").await, ["in1k"]);
    assert_eq!(
        h.open("/datasets/in1k/train-0.tar").await.unwrap().chunks,
        second.chunks,
        "a renamed directory keeps its files' layouts"
    );
    let into_itself = h
        .client
        .namespace
        .rename(proto::RenameRequest {
            from: "/datasets".to_owned(),
            to: "/datasets/in1k/loop".to_owned(),
        })
        .await;
    assert_code(into_itself, Code::InvalidArgument, "into itself");
    let tagged = h
        .client
        .namespace
        .tag(proto::TagRequest {
            path: "/datasets/in1k".to_owned(),
            set: HashMap::from([("tier".to_owned(), "hot".to_owned())]),
            remove: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tagged.entry.unwrap().tags["tier"], "hot");
    let not_empty = h
        .client
        .namespace
        .delete(proto::DeleteRequest {
            path: "/datasets".to_owned(),
            recursive: false,
        })
        .await;
    assert_code(not_empty, Code::FailedPrecondition, "not empty");
    let removed = h
        .client
        .namespace
        .delete(proto::DeleteRequest {
            path: "/datasets".to_owned(),
            recursive: true,
        })
        .await
        .unwrap()
        .into_inner()
        .removed;
    assert_eq!(removed, 4);
    assert_code(
        h.open("/datasets/in1k/train-0.tar").await,
        Code::NotFound,
        "no such file",
    );
}

async fn snapshots(mut h: Harness) {
    for id in ["n1", "n2", "n3"] {
        h.register(id, "").await;
    }
    let a1 = h.write("/ckpt/run/a", 5000).await;
    let b1 = h.write("/ckpt/run/b", 0).await.file_id;
    let snap = h
        .client
        .snapshots
        .create(proto::CreateSnapshotRequest {
            name: "before".to_owned(),
            path: "/ckpt/run".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((snap.files, snap.directories, snap.bytes), (2, 1, 5000));
    let duplicate = h
        .client
        .snapshots
        .create(proto::CreateSnapshotRequest {
            name: "before".to_owned(),
            path: "/ckpt".to_owned(),
        })
        .await;
    assert_code(duplicate, Code::AlreadyExists, "already exists");

    // Change everything: a new version of a, b deleted, c added.
    let a2 = h.write("/ckpt/run/a", 7).await;
    h.client
        .namespace
        .delete(proto::DeleteRequest {
            path: "/ckpt/run/b".to_owned(),
            recursive: false,
        })
        .await
        .unwrap();
    h.write("/ckpt/run/c", 1).await;
    let diff = h
        .client
        .snapshots
        .diff(proto::DiffRequest {
            from: "before".to_owned(),
            to: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let changes: Vec<(String, i32)> = diff
        .entries
        .iter()
        .map(|e| (e.path.clone(), e.change))
        .collect();
    assert_eq!(
        changes,
        [
            ("/ckpt/run/a".to_owned(), proto::Change::Modified as i32),
            ("/ckpt/run/b".to_owned(), proto::Change::Removed as i32),
            ("/ckpt/run/c".to_owned(), proto::Change::Added as i32),
        ]
    );
    assert_eq!(diff.entries[0].before.as_ref().unwrap().version, 1);
    assert_eq!(diff.entries[0].after.as_ref().unwrap().version, a2.version);

    let report = h
        .client
        .snapshots
        .rollback(proto::RollbackRequest {
            name: "before".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((report.restored, report.removed), (2, 1), "{report:?}");
    assert_eq!(h.names("/ckpt/run").await, ["a", "b"]);
    let a = h.open("/ckpt/run/a").await.unwrap();
    assert_eq!((a.file_id, a.version, a.size), (a1.file_id, 1, 5000));
    assert_eq!(a.chunks, a1.chunks, "rolled back to the pinned chunks");
    assert!(
        a.layout_version > a2.layout_version,
        "cached layouts become stale"
    );
    let b = h.open("/ckpt/run/b").await.unwrap();
    assert_ne!(b.file_id, b1, "a deleted file comes back as a new file");
    assert_eq!(b.size, 0);
    let after = h
        .client
        .snapshots
        .diff(proto::DiffRequest {
            from: "before".to_owned(),
            to: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let kinds: Vec<(String, i32)> = after
        .entries
        .iter()
        .map(|e| (e.path.clone(), e.change))
        .collect();
    // Only b's identity differs: same path, same size, a new file id.
    assert_eq!(
        kinds,
        [("/ckpt/run/b".to_owned(), proto::Change::Modified as i32)]
    );
    // A commit after a rollback gets a fresh version number, never one a snapshot pins.
    let a3 = h.write("/ckpt/run/a", 9).await;
    assert_eq!(a3.version, 3);

    let listed = h
        .client
        .snapshots
        .list(proto::ListSnapshotsRequest {
            path: "/ckpt".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    assert_eq!(listed.len(), 1);
    h.client
        .snapshots
        .delete(proto::DeleteSnapshotRequest {
            name: "before".to_owned(),
        })
        .await
        .unwrap();
    let gone = h
        .client
        .snapshots
        .rollback(proto::RollbackRequest {
            name: "before".to_owned(),
        })
        .await;
    assert_code(gone, Code::NotFound, "no such snapshot");
    let bad_name = h
        .client
        .snapshots
        .create(proto::CreateSnapshotRequest {
            name: "no spaces".to_owned(),
            path: "/ckpt".to_owned(),
        })
        .await;
    assert_code(bad_name, Code::InvalidArgument, "snapshot name");
}

async fn membership(mut h: Harness) {
    h.register("n1", "").await;
    h.register("n2", "").await;
    let nodes = |h: &mut Harness| {
        let mut admin = h.client.admin.clone();
        async move {
            admin
                .nodes(proto::NodesRequest {})
                .await
                .unwrap()
                .into_inner()
                .nodes
                .into_iter()
                .map(|n| (n.id, n.state))
                .collect::<Vec<_>>()
        }
    };
    let up = proto::NodeState::Up as i32;
    let down = proto::NodeState::Down as i32;
    assert_eq!(
        nodes(&mut h).await,
        [("n1".to_owned(), up), ("n2".to_owned(), up)]
    );
    // n1 heartbeats; n2 stops: its 1.5 s lease expires and the leader marks it down. Health
    // is read right after n1's heartbeat, in the same round as the node list, so n1's lease
    // is fresh in both and n1 is up in both.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let health = loop {
        h.client
            .cluster
            .heartbeat(proto::HeartbeatRequest {
                node_id: "n1".to_owned(),
                ..Default::default()
            })
            .await
            .unwrap();
        let health = h
            .client
            .admin
            .health(proto::HealthRequest {})
            .await
            .unwrap()
            .into_inner();
        let listed = nodes(&mut h).await;
        if listed == [("n1".to_owned(), up), ("n2".to_owned(), down)] && health.nodes_down == 1 {
            break health;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "n2 was never marked down: {listed:?}, {health:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(health.status, "degraded");
    assert!(health.leader, "the only control plane leads");
    assert_eq!(health.leader_id, health.control_id);
    assert_eq!((health.nodes_up, health.nodes_down), (1, 1));
    // A down node that heartbeats again is up again.
    let reply = h
        .client
        .cluster
        .heartbeat(proto::HeartbeatRequest {
            node_id: "n2".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.state, up);
    let drained = h
        .client
        .cluster
        .drain(proto::DrainRequest {
            node_id: "n1".to_owned(),
            cancel: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(drained.state, proto::NodeState::Draining as i32);
    // A draining node takes no new chunks: with one node left up, replication 2 cannot place.
    let file = h
        .client
        .namespace
        .create(proto::CreateRequest {
            path: "/f".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    let placed = h
        .client
        .namespace
        .place_chunks(proto::PlaceChunksRequest {
            path: "/f".to_owned(),
            file_id: file.id,
            first_index: 0,
            count: 1,
        })
        .await;
    assert_code(placed, Code::FailedPrecondition, "needs 2 data nodes up");
    let unknown = h
        .client
        .cluster
        .heartbeat(proto::HeartbeatRequest {
            node_id: "ghost".to_owned(),
            ..Default::default()
        })
        .await;
    assert_code(unknown, Code::NotFound, "not registered");
    let bad = h
        .client
        .cluster
        .register(proto::RegisterRequest {
            node_id: "n3".to_owned(),
            address: "no-port".to_owned(),
            topology: None,
        })
        .await;
    assert_code(bad, Code::InvalidArgument, "address");
}

async fn survives_restart(mut h: Harness) {
    h.register("n1", "").await;
    h.register("n2", "").await;
    let layout = h.write("/keep/me", 4096).await;
    h.client
        .snapshots
        .create(proto::CreateSnapshotRequest {
            name: "s".to_owned(),
            path: "/keep".to_owned(),
        })
        .await
        .unwrap();
    // What a scheduler said survives too: jobs, prestages, GPU reports.
    declare_intent(&mut h.client).await;
    h.restart().await;
    assert_intent(&mut h.client).await;
    assert_eq!(h.open("/keep/me").await.unwrap(), layout);
    let snapshots = h
        .client
        .snapshots
        .list(proto::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    assert_eq!(snapshots.len(), 1);
    // Ids keep counting after a restart: a new file never reuses one.
    let next = h.write("/keep/next", 1).await;
    assert!(next.file_id > layout.file_id);
}

/// A job, a prestage and a GPU report, as a scheduler says them.
async fn declare_intent(client: &mut ControlClient) {
    client
        .orchestration
        .report_gpus(proto::ReportGpusRequest {
            node_id: "n1".into(),
            gpus: vec![proto::GpuStatus {
                index: 3,
                busy: true,
                job: "train".into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap();
    client
        .orchestration
        .declare_job(proto::DeclareJobRequest {
            job: "train".into(),
            paths: vec!["/keep".into()],
            gpus: vec![proto::GpuRef {
                node_id: "n1".into(),
                index: 3,
            }],
        })
        .await
        .unwrap();
    client
        .orchestration
        .prestage(proto::PrestageRequest {
            path: "/keep".into(),
            nodes: vec!["n2".into()],
        })
        .await
        .unwrap();
}

/// What `declare_intent` said, as a control plane lists it.
async fn assert_intent(client: &mut ControlClient) {
    let listed = client
        .orchestration
        .gpus(proto::GpusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.nodes.len(), 1, "{listed:?}");
    assert_eq!(listed.nodes[0].node_id, "n1");
    assert_eq!(
        (listed.nodes[0].gpus[0].index, listed.nodes[0].gpus[0].busy),
        (3, true)
    );
    assert_eq!(listed.jobs.len(), 1, "{listed:?}");
    assert_eq!(
        (listed.jobs[0].job.as_str(), listed.jobs[0].paths.clone()),
        ("train", vec!["/keep".to_string()])
    );
    assert_eq!(listed.prestages.len(), 1, "{listed:?}");
    assert_eq!(listed.prestages[0].nodes, ["n2"]);
}

/// Control planes on one etcd share what schedulers said: a job declared to one is listed,
/// and explained, by the other; ended on the other, it is gone from the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_planes_on_one_etcd_share_what_schedulers_said() {
    let mut h = Harness::start(Store::Etcd).await;
    let other = ControlServer::start(h.config.clone()).await.unwrap();
    let mut second = ControlClient::connect(&other.local_addr().to_string(), TOKEN)
        .await
        .unwrap();
    declare_intent(&mut h.client).await;
    assert_intent(&mut second).await;
    second
        .orchestration
        .declare_job(proto::DeclareJobRequest {
            job: "train".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let listed = h
        .client
        .orchestration
        .gpus(proto::GpusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.jobs.is_empty(), "{listed:?}");
    other.shutdown().await;
}

/// A data node told to heartbeat to a control plane that does not lead is sent to the one
/// that does: its GPU measures (soft state, like its heat) reach the leader, where the
/// rebalancer plans.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_heartbeating_to_a_follower_moves_to_the_leader() {
    use tier0_control_api::agent::{Agent, AgentConfig, HeatReport};
    let h = Harness::start(Store::Etcd).await;
    let other = ControlServer::start(h.config.clone()).await.unwrap();
    let first = h.server.as_ref().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while first.is_leader() == other.is_leader() {
        assert!(std::time::Instant::now() < deadline, "no single leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (leader, follower) = if first.is_leader() {
        (first, &other)
    } else {
        (&other, first)
    };
    let agent = Agent::spawn(AgentConfig {
        control: vec![format!("http://{}", follower.local_addr())],
        token: TOKEN.to_vec(),
        node_id: "n1".into(),
        address: "127.0.0.1:7401".into(),
        topology: proto::TopologySummary::default(),
        interval: Some(Duration::from_millis(100)),
        fences: Box::new(|_| {}),
        free_bytes: Box::new(|| 0),
        heat: Box::new(HeatReport::none),
        gpus: Box::new(|| {
            Some(vec![proto::GpuStatus {
                index: 0,
                busy: true,
                measured: true,
                utilization_percent: 55,
                ..Default::default()
            }])
        }),
    })
    .unwrap();
    let mut to_leader = ControlClient::connect(&leader.local_addr().to_string(), TOKEN)
        .await
        .unwrap();
    let measured_on = |listed: &proto::GpusReply| {
        listed
            .nodes
            .iter()
            .any(|node| node.node_id == "n1" && node.gpus.iter().any(|gpu| gpu.measured))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let listed = to_leader
            .orchestration
            .gpus(proto::GpusRequest {})
            .await
            .unwrap()
            .into_inner();
        if measured_on(&listed) {
            assert_eq!(listed.nodes[0].gpus[0].utilization_percent, 55);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the leader never heard from n1"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(agent);
    other.shutdown().await;
}

/// Every call, reflection included, needs the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_the_token_are_unauthenticated() {
    let h = Harness::start(Store::Redb).await;
    // The config's Debug (it ends up in logs) keeps the token out, in either spelling.
    let shown = format!("{:?}", h.config);
    assert!(shown.contains("token: \"<redacted>\""), "{shown}");
    assert!(
        !shown.contains("grpc-test-token") && !shown.contains(&format!("{:?}", TOKEN.to_vec())),
        "{shown}"
    );
    assert!(
        shown.contains("node_lease"),
        "the other fields stay: {shown}"
    );
    let addr = h.server.as_ref().unwrap().local_addr();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut anonymous = proto::admin_client::AdminClient::new(channel.clone());
    assert_code(
        anonymous.health(proto::HealthRequest {}).await,
        Code::Unauthenticated,
        "no cluster token",
    );
    let wrong = ControlClient::connect(&addr.to_string(), b"not-the-token")
        .await
        .unwrap();
    let mut namespace = wrong.namespace.clone();
    assert_code(
        namespace
            .list(proto::ListRequest {
                path: "/".to_owned(),
            })
            .await,
        Code::Unauthenticated,
        "does not match",
    );
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    let mut reflection = ServerReflectionClient::new(channel);
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let refused = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await;
    assert_code(refused, Code::Unauthenticated, "no cluster token");
}

/// A generic gRPC client with the token discovers every service by reflection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let h = Harness::start(Store::Redb).await;
    let addr = h.server.as_ref().unwrap().local_addr();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let header: tonic::metadata::MetadataValue<_> =
        format!("Bearer {}", std::str::from_utf8(TOKEN).unwrap())
            .parse()
            .unwrap();
    let mut reflection =
        ServerReflectionClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", header.clone());
            Ok(r)
        });
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection reply {reply:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in [
        "Namespace",
        "Cluster",
        "Snapshots",
        "Admin",
        "Orchestration",
    ] {
        let full = format!("tier0.control.v1.{service}");
        assert!(names.contains(&full), "{full} missing from {names:?}");
    }
}

/// Malformed fields are refused at the edge with InvalidArgument naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_fields_are_invalid_arguments() {
    let mut h = Harness::start(Store::Redb).await;
    let ns = &mut h.client.namespace;
    let cases: Vec<(
        Result<tonic::Response<proto::EntryReply>, tonic::Status>,
        &str,
    )> = vec![
        (
            ns.mkdir(proto::MkdirRequest {
                path: "relative/dir".to_owned(),
                ..Default::default()
            })
            .await,
            "path \"relative/dir\": not absolute",
        ),
        (
            ns.mkdir(proto::MkdirRequest {
                path: "/a/../b".to_owned(),
                ..Default::default()
            })
            .await,
            "component \"..\"",
        ),
        (
            ns.create(proto::CreateRequest {
                path: "/x".to_owned(),
                exclusive: false,
                settings: Some(proto::LayoutSettings {
                    chunk_size: 3000,
                    replication: 0,
                }),
            })
            .await,
            "chunk_size 3000",
        ),
        (
            ns.create(proto::CreateRequest {
                path: "/x".to_owned(),
                exclusive: false,
                settings: Some(proto::LayoutSettings {
                    chunk_size: 0,
                    replication: 99,
                }),
            })
            .await,
            "replication 99",
        ),
        (
            ns.rename(proto::RenameRequest {
                from: "/".to_owned(),
                to: "/y".to_owned(),
            })
            .await,
            "root",
        ),
        (
            ns.tag(proto::TagRequest {
                path: "/".to_owned(),
                set: HashMap::from([("bad key".to_owned(), "v".to_owned())]),
                remove: vec![],
            })
            .await,
            "tag key \"bad key\"",
        ),
    ];
    for (result, needle) in cases {
        assert_code(result, Code::InvalidArgument, needle);
    }
    let commit = ns
        .commit(proto::CommitRequest {
            path: "/x".to_owned(),
            file_id: 0,
            ..Default::default()
        })
        .await;
    assert_code(commit, Code::InvalidArgument, "file_id");
    let place = ns
        .place_chunks(proto::PlaceChunksRequest {
            path: "/x".to_owned(),
            file_id: 5,
            first_index: 0,
            count: 0,
        })
        .await;
    assert_code(place, Code::InvalidArgument, "count 0");
    // Nothing was made by any refused request.
    assert!(h.names("/").await.is_empty());
}

/// A watch on a directory sees commits and deletes of files below it, nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_pushes_layout_changes() {
    let mut h = Harness::start(Store::Redb).await;
    h.register("n1", "").await;
    h.register("n2", "").await;
    h.client
        .namespace
        .mkdir(proto::MkdirRequest {
            path: "/watched".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut changes = h
        .client
        .namespace
        .watch_layouts(proto::WatchLayoutsRequest {
            path: "/watched".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    h.write("/elsewhere", 10).await;
    let layout = h.write("/watched/sub/f", 10).await;
    // Create, placement and commit each rewrite f's record; the watch ends with the commit.
    let seen = until_version(&mut changes, 1).await;
    assert!(
        seen.iter()
            .all(|c| c.file_id == layout.file_id && c.name == "f"),
        "{seen:?}"
    );
    let last = seen.last().unwrap();
    assert_eq!(
        (last.version, last.layout_version),
        (1, layout.layout_version)
    );
    h.client
        .namespace
        .delete(proto::DeleteRequest {
            path: "/watched/sub/f".to_owned(),
            recursive: false,
        })
        .await
        .unwrap();
    let deleted = next_change(&mut changes).await;
    assert!(deleted.deleted && deleted.name == "f", "{deleted:?}");

    // A directory moved into the watched tree brings its subdirectories: a new version of a
    // file two levels below it is seen, though the watch never saw those directories made
    // (and a new version writes no directory's record: only the file's).
    let before = h.write("/outside/moved/deep/g", 10).await;
    h.client
        .namespace
        .rename(proto::RenameRequest {
            from: "/outside/moved".to_owned(),
            to: "/watched/moved".to_owned(),
        })
        .await
        .unwrap();
    let after = h.write("/watched/moved/deep/g", 20).await;
    assert_eq!((after.file_id, after.version), (before.file_id, 2));
    let seen = until_version(&mut changes, 2).await;
    assert!(
        seen.iter()
            .all(|c| c.file_id == before.file_id && c.name == "g" && !c.deleted),
        "{seen:?}"
    );
    assert_eq!(seen.last().unwrap().version, 2);

    // Moved out again, it leaves the watch, with what is below it: the next change seen is
    // the marker's, not that of the file committed out there first.
    h.client
        .namespace
        .rename(proto::RenameRequest {
            from: "/watched/moved".to_owned(),
            to: "/outside/back".to_owned(),
        })
        .await
        .unwrap();
    let gone = next_change(&mut changes).await;
    assert!(gone.deleted && gone.name == "moved", "{gone:?}");
    h.write("/outside/back/deep/h", 10).await;
    let marker = h.write("/watched/marker", 10).await;
    let seen = until_version(&mut changes, 1).await;
    assert!(
        seen.iter()
            .all(|c| c.file_id == marker.file_id && c.name == "marker"),
        "{seen:?}"
    );
}

/// The next change on a watch, within 5 s.
async fn next_change(changes: &mut tonic::Streaming<proto::LayoutChange>) -> proto::LayoutChange {
    tokio::time::timeout(Duration::from_secs(5), changes.message())
        .await
        .expect("a change within 5 s")
        .expect("the watch stays healthy")
        .expect("the watch does not end")
}

/// Changes up to and including the first at `version` (the commit of that version: until
/// then placement rewrites the record at the version before).
async fn until_version(
    changes: &mut tonic::Streaming<proto::LayoutChange>,
    version: u64,
) -> Vec<proto::LayoutChange> {
    let mut seen = Vec::new();
    while seen
        .last()
        .is_none_or(|c: &proto::LayoutChange| c.version != version)
    {
        seen.push(next_change(changes).await);
    }
    seen
}

/// A client that goes away ends its watch on the server, even if no change of its ever
/// comes: the server's forwarding task (and its store watch) does not linger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_ends_when_its_client_goes_away() {
    let mut h = Harness::start(Store::Redb).await;
    h.register("n1", "").await;
    h.register("n2", "").await;
    h.write("/quiet/before", 10).await;
    h.write("/loud/before", 10).await;
    // The server runs on this test's runtime: its tasks are counted here.
    let alive = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let baseline = alive();
    for _ in 0..3 {
        let changes = h
            .client
            .namespace
            .watch_layouts(proto::WatchLayoutsRequest {
                path: "/quiet".to_owned(),
            })
            .await
            .unwrap()
            .into_inner();
        drop(changes);
    }
    // Changes elsewhere only: a forwarding task that waited for one of its own to find the
    // client gone would wait forever.
    h.write("/loud/f", 10).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while alive() > baseline {
        assert!(
            std::time::Instant::now() < deadline,
            "watch tasks outlived their clients: {} alive, {baseline} before",
            alive()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A new watch still works.
    let mut changes = h
        .client
        .namespace
        .watch_layouts(proto::WatchLayoutsRequest {
            path: "/quiet".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    let layout = h.write("/quiet/f", 10).await;
    let seen = until_version(&mut changes, 1).await;
    assert_eq!(seen.last().unwrap().file_id, layout.file_id);
}

/// A watch whose store watch ends (here etcd dies) says so, as `Unavailable`, rather than
/// ending as if nothing more would ever change: the client's cache may have missed changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_that_loses_its_store_says_so() {
    let mut h = Harness::start(Store::Etcd).await;
    let mut changes = h
        .client
        .namespace
        .watch_layouts(proto::WatchLayoutsRequest {
            path: "/".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    h._etcd.as_mut().unwrap().kill();
    let ended = tokio::time::timeout(Duration::from_secs(10), changes.message())
        .await
        .expect("the watch ends within 10 s of its store");
    let status = ended.expect_err("an error, not a quiet end");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("watch again"), "{status:?}");
}

/// Schedulers report GPUs and declare jobs; `Explain` ranks the up nodes as homes of a
/// file for the idle GPUs that will read it, from the feeds the nodes registered; bad
/// reports are refused naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_ranks_homes_by_the_gpus_that_will_read() {
    let mut h = Harness::start(Store::Redb).await;
    // g1's two GPUs sit under its drive's PCIe switch (cost 1), g2's across the host bridge
    // (2); s1 has no GPUs, its drive and NIC on one host bridge (2).
    let feeds = |drive_cost| {
        (0..2)
            .map(|index| proto::GpuFeed {
                index,
                numa_node: 0,
                has_numa_node: true,
                drive_cost,
                nic_cost: 1,
            })
            .collect::<Vec<_>>()
    };
    for (id, gpu_feeds) in [("g1", feeds(1)), ("g2", feeds(2)), ("s1", Vec::new())] {
        h.client
            .cluster
            .register(proto::RegisterRequest {
                node_id: id.into(),
                address: format!("127.0.0.1:{}", 7500 + id.len()),
                topology: Some(proto::TopologySummary {
                    gpus: gpu_feeds.len() as u32,
                    gpu_feeds,
                    drive_nic_cost: 2,
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
    }
    h.write("/datasets/web/shard-0", 3 << 20).await;
    let mut orchestration = h.client.orchestration.clone();
    let explain = |orchestration: &mut tier0_control::client::ControlClient| {
        let mut client = orchestration.orchestration.clone();
        async move {
            client
                .explain(proto::ExplainRequest {
                    path: "/datasets/web/shard-0".into(),
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    // Nobody will read it: every up node costs nothing.
    let cold = explain(&mut h.client).await;
    assert!(cold.readers.is_empty() && cold.jobs.is_empty());
    assert_eq!(cold.homes.len(), 3);
    assert!(cold.homes.iter().all(|home| home.cost == 0));
    assert!(!cold.current_nodes.is_empty());

    // A job will read the dataset on g2's GPUs; g2/1 is busy with another job.
    orchestration
        .report_gpus(proto::ReportGpusRequest {
            node_id: "g2".into(),
            gpus: vec![
                proto::GpuStatus {
                    index: 0,
                    busy: false,
                    job: String::new(),
                    ..Default::default()
                },
                proto::GpuStatus {
                    index: 1,
                    busy: true,
                    job: "other".into(),
                    ..Default::default()
                },
            ],
        })
        .await
        .unwrap();
    orchestration
        .declare_job(proto::DeclareJobRequest {
            job: "train".into(),
            paths: vec!["/datasets/web".into()],
            gpus: vec![
                proto::GpuRef {
                    node_id: "g2".into(),
                    index: 0,
                },
                proto::GpuRef {
                    node_id: "g2".into(),
                    index: 1,
                },
            ],
        })
        .await
        .unwrap();
    let hot = explain(&mut h.client).await;
    assert_eq!(hot.jobs, vec!["train".to_string()]);
    assert_eq!(hot.readers.len(), 1, "{hot:?}");
    assert_eq!(
        (hot.readers[0].node_id.as_str(), hot.readers[0].index),
        ("g2", 0)
    );
    let ranked: Vec<(&str, u64, u32)> = hot
        .homes
        .iter()
        .map(|home| (home.node_id.as_str(), home.cost, home.local_gpus))
        .collect();
    // g2 itself (its drive across the host bridge: 2), then the remote homes: drive-NIC 2 +
    // network 6 + the GPU's NIC 1.
    assert_eq!(ranked, vec![("g2", 2, 1), ("g1", 9, 0), ("s1", 9, 0)]);
    let listed = orchestration
        .gpus(proto::GpusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((listed.nodes.len(), listed.jobs.len()), (1, 1));
    assert_eq!(listed.jobs[0].paths, vec!["/datasets/web".to_string()]);

    // Bad input: named fields, nothing recorded.
    let twice = orchestration
        .report_gpus(proto::ReportGpusRequest {
            node_id: "g1".into(),
            gpus: vec![proto::GpuStatus::default(), proto::GpuStatus::default()],
        })
        .await;
    assert_code(twice, Code::InvalidArgument, "gpus[1]");
    let bad_job = orchestration
        .declare_job(proto::DeclareJobRequest {
            job: "no spaces".into(),
            ..Default::default()
        })
        .await;
    assert_code(bad_job, Code::InvalidArgument, "job");
    let bad_path = orchestration
        .declare_job(proto::DeclareJobRequest {
            job: "eval".into(),
            paths: vec!["relative/path".into()],
            ..Default::default()
        })
        .await;
    assert_code(bad_path, Code::InvalidArgument, "paths[0]");
    let bad_node = orchestration
        .declare_job(proto::DeclareJobRequest {
            job: "eval".into(),
            paths: vec!["/datasets".into()],
            gpus: vec![proto::GpuRef {
                node_id: "bad node".into(),
                index: 0,
            }],
        })
        .await;
    assert_code(bad_node, Code::InvalidArgument, "gpus[0]");
    let missing = h
        .client
        .orchestration
        .explain(proto::ExplainRequest {
            path: "/nothing".into(),
        })
        .await;
    assert_code(missing, Code::NotFound, "");
    let listed = orchestration
        .gpus(proto::GpusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (listed.nodes.len(), listed.jobs.len()),
        (1, 1),
        "bad input recorded"
    );
}
