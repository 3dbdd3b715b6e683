//! `Upkeep::copy`, the one way the control plane copies a chunk (re-replication and the
//! rebalancer), against real daemons: it orders the target to pull the chunk from the
//! source (`Replicate`), so the bytes go daemon to daemon; a chunk already there is a
//! success; a failure names the chunk, both nodes and the cause, and leaves nothing behind.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tier0_client::DaemonConnection;
use tier0_control::store::{MetadataStore, RedbStore};
use tier0_control::upkeep::Upkeep;
use tier0_dataplane::store::ChunkId;
use tier0_perf::cluster::{ClusterConfig, LocalCluster, pattern};

const CHUNK: u32 = 64 << 10;

fn connect(cluster: &LocalCluster, index: usize) -> DaemonConnection {
    DaemonConnection::connect(
        cluster.addr(index),
        cluster.token(),
        "copies-test",
        Duration::from_secs(10),
    )
    .unwrap()
}

/// `daemons` real daemons, and an embedded metadata store in a folder of its own (kept
/// while the returned folder lives).
async fn cluster_and_store(
    daemons: usize,
) -> (LocalCluster, Arc<dyn MetadataStore>, tempfile::TempDir) {
    let cluster = tokio::task::spawn_blocking(move || {
        LocalCluster::start(&ClusterConfig::for_tests(daemons, CHUNK))
    })
    .await
    .unwrap()
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn MetadataStore> =
        Arc::new(RedbStore::open(&dir.path().join("metadata.redb")).unwrap());
    (cluster, store, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_go_daemon_to_daemon_and_fail_with_their_cause() {
    let (mut cluster, store, _dir) = cluster_and_store(3).await;
    let upkeep = Upkeep::new(store, cluster.token().to_vec());
    let chunk = ChunkId {
        file: 0xc0b1,
        index: 0,
        generation: 1,
    };
    let data = pattern(CHUNK as usize - 1000, 7);
    let len = data.len() as u32;
    connect(&cluster, 0).write(chunk, &data).unwrap();
    let (a, b, c) = (
        cluster.addr(0).to_string(),
        cluster.addr(1).to_string(),
        cluster.addr(2).to_string(),
    );

    // The copy lands whole on the target, and asking again is a success (EEXIST).
    upkeep.copy(chunk, len, a.clone(), b.clone()).await.unwrap();
    let mut read = vec![0u8; data.len()];
    connect(&cluster, 1).read_into(chunk, 0, &mut read).unwrap();
    assert_eq!(read, data);
    upkeep.copy(chunk, len, a.clone(), b.clone()).await.unwrap();
    // A copy of a copy: the new replica serves as a source like any.
    upkeep.copy(chunk, len, b.clone(), c.clone()).await.unwrap();
    connect(&cluster, 2).read_into(chunk, 0, &mut read).unwrap();
    assert_eq!(read, data);

    // A source without the chunk: the daemon's ENOENT, with the chunk and both nodes named.
    let missing = ChunkId { index: 9, ..chunk };
    let error = upkeep
        .copy(missing, 4096, a.clone(), c.clone())
        .await
        .unwrap_err();
    for part in [&missing.to_string(), &a, &c, "errno 2"] {
        assert!(error.contains(part), "{part:?} not in {error}");
    }
    let mut probe = vec![0u8; 4096];
    let gone = connect(&cluster, 2)
        .read_into(missing, 0, &mut probe)
        .unwrap_err();
    assert_eq!(gone.errno(), libc::ENOENT);

    // A dead source fails the copy (the target's own error), a dead target fails it here.
    cluster.stop(0);
    let fresh = ChunkId { index: 1, ..chunk };
    let started = Instant::now();
    let error = upkeep
        .copy(fresh, 4096, a.clone(), b.clone())
        .await
        .unwrap_err();
    assert!(
        error.contains(&a) && error.contains("connecting"),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    let error = upkeep
        .copy(chunk, len, b.clone(), a.clone())
        .await
        .unwrap_err();
    assert!(
        error.contains(&chunk.to_string()) && error.contains(&a),
        "{error}"
    );
}

/// A replica trashed and then named again (a copy onto a node that still had the chunk) is
/// kept by the trash: the deletion is forgotten, the bytes stay, the record stays true.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trashed_replica_named_again_is_not_deleted() {
    use tier0_control::model::{self, ChunkRecord, NodeRecord, NodeState, TopologySummary};
    use tier0_control::store::Txn;
    let (cluster, store, _dir) = cluster_and_store(1).await;
    let chunk = ChunkId {
        file: 0xc0b2,
        index: 0,
        generation: 1,
    };
    let data = pattern(CHUNK as usize, 9);
    connect(&cluster, 0).write(chunk, &data).unwrap();
    let now = model::now_ms();
    let node = NodeRecord {
        id: "d0".into(),
        address: cluster.addr(0).to_string(),
        topology: TopologySummary::default(),
        state: NodeState::Up,
        registered_ms: now,
        heartbeat_ms: now,
        lease_expires_ms: now + 3_600_000,
    };
    // A pending chunk (not collected yet) named on d0, and a deletion of it queued there.
    let record = ChunkRecord {
        replicas: vec!["d0".into()],
        expires_ms: now + 3_600_000,
    };
    let mut txn = Txn::new();
    txn.put(model::node_key("d0"), model::encode(&node))
        .put(model::chunk_key(chunk), model::encode(&record))
        .put(model::trash_key(chunk, "d0"), b"{}".to_vec());
    store.commit(&txn).await.unwrap();
    let upkeep = Upkeep::new(Arc::clone(&store), cluster.token().to_vec());
    upkeep.run().await.unwrap();
    assert!(
        store
            .get(&model::trash_key(chunk, "d0"))
            .await
            .unwrap()
            .is_none(),
        "the void deletion is forgotten"
    );
    let mut read = vec![0u8; data.len()];
    connect(&cluster, 0).read_into(chunk, 0, &mut read).unwrap();
    assert_eq!(read, data, "the named replica was deleted");
}
