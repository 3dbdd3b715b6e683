//! Races under optimistic concurrency: a second operation is run just before the first one
//! commits (a store wrapper with a hook in `commit`), and the namespace must come out
//! consistent: no cycle cut off from the root, no version that lists a collected chunk, no
//! file set back to a collected version. Also the edge cases of rollback, and etcd's limits
//! on one transaction answered with a clear error.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tier0_control::membership::Membership;
use tier0_control::model::{LayoutSettings, TopologySummary};
use tier0_control::namespace::{CommitChunk, SettingsOverride};
use tier0_control::store::{
    Entry, EtcdStore, Leadership, MetadataStore, Outcome, RedbStore, StoreError, Txn, Watch,
};
use tier0_control::testing::EtcdServer;
use tier0_control::upkeep::{Upkeep, UpkeepReport};
use tier0_control::{ControlError, Namespace, NsPath};

type Hook = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A store that runs a hook, once, just before the next commit.
struct Hooked {
    inner: Arc<dyn MetadataStore>,
    hook: Mutex<Option<Hook>>,
}

impl std::fmt::Debug for Hooked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hooked")
    }
}

#[async_trait::async_trait]
impl MetadataStore for Hooked {
    fn kind(&self) -> &'static str {
        "hooked"
    }
    fn location(&self) -> String {
        self.inner.location()
    }
    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        self.inner.get(key).await
    }
    async fn scan(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        self.inner.scan(prefix).await
    }
    async fn commit(&self, txn: &Txn) -> Result<Outcome, StoreError> {
        let hook = self.hook.lock().unwrap().take();
        if let Some(hook) = hook {
            hook.await;
        }
        self.inner.commit(txn).await
    }
    async fn revision(&self) -> Result<u64, StoreError> {
        self.inner.revision().await
    }
    async fn watch(&self, prefix: &str) -> Result<Watch, StoreError> {
        self.inner.watch(prefix).await
    }
    async fn campaign(&self, e: &str, c: &str, t: Duration) -> Result<Leadership, StoreError> {
        self.inner.campaign(e, c, t).await
    }
    async fn leader(&self, e: &str) -> Result<Option<String>, StoreError> {
        self.inner.leader(e).await
    }
}

fn p(path: &str) -> NsPath {
    NsPath::parse("path", path).unwrap()
}

/// One store seen two ways: `plain` commits at once, `hooked` runs the hook first.
struct World {
    _dir: tempfile::TempDir,
    inner: Arc<dyn MetadataStore>,
    plain: Arc<Namespace>,
    hooked_store: Arc<Hooked>,
    hooked: Namespace,
}

const SETTINGS: LayoutSettings = LayoutSettings {
    chunk_size: 4096,
    replication: 1,
};

async fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let inner: Arc<dyn MetadataStore> =
        Arc::new(RedbStore::open(&dir.path().join("metadata.redb")).unwrap());
    let plain = Arc::new(
        Namespace::new(inner.clone(), SETTINGS, Duration::from_secs(3600))
            .await
            .unwrap(),
    );
    let hooked_store = Arc::new(Hooked {
        inner: inner.clone(),
        hook: Mutex::new(None),
    });
    let hooked = Namespace::new(hooked_store.clone(), SETTINGS, Duration::from_secs(3600))
        .await
        .unwrap();
    Membership::new(inner.clone(), Duration::from_secs(60))
        .register("n1", "127.0.0.1:1", TopologySummary::default())
        .await
        .unwrap();
    World {
        _dir: dir,
        inner,
        plain,
        hooked_store,
        hooked,
    }
}

impl World {
    fn hook(&self, hook: Hook) {
        *self.hooked_store.hook.lock().unwrap() = Some(hook);
    }

    /// A new version of `path` with one placed chunk of 10 bytes (metadata only).
    async fn write(&self, path: &str) -> (u64, u64, CommitChunk) {
        let ns = &self.plain;
        let inode = ns
            .create(&p(path), SettingsOverride::default(), false)
            .await
            .unwrap();
        let version = inode.file().unwrap().version;
        let placed = ns.place_chunks(&p(path), inode.id, 0, 1).await.unwrap();
        let chunk = CommitChunk {
            index: 0,
            id: placed.chunks[0].id,
            len: 10,
        };
        let layout = ns
            .commit(&p(path), inode.id, version, 10, vec![chunk])
            .await
            .unwrap();
        (inode.id, layout.version, chunk)
    }

    async fn collect(&self) -> UpkeepReport {
        let mut report = UpkeepReport::default();
        Upkeep::new(self.inner.clone(), b"token".to_vec())
            .collect(&mut report)
            .await
            .unwrap();
        report
    }

    /// Every inode's parent exists (no orphan, no detached cycle): walking from the root
    /// reaches every inode in the store.
    async fn assert_tree(&self) {
        let all = self.inner.scan("inode/").await.unwrap().len();
        let mut reached = 1; // the root
        let mut queue = vec![NsPath::root()];
        while let Some(dir) = queue.pop() {
            for entry in self.plain.list(&dir).await.unwrap() {
                reached += 1;
                if entry.is_dir() {
                    queue.push(dir.join(&entry.name));
                }
            }
        }
        assert_eq!(reached, all, "inodes not reachable from the root");
    }
}

async fn names(ns: &Namespace, path: &str) -> Vec<(String, u64, u64)> {
    ns.list(&p(path))
        .await
        .unwrap()
        .iter()
        .map(|i| {
            (
                i.name.clone(),
                i.id,
                i.file().map(|f| f.version).unwrap_or(0),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crossing_renames_cannot_make_a_detached_cycle() {
    let w = world().await;
    for dir in ["/p/a/y", "/q/b/x"] {
        w.plain
            .mkdir(&p(dir), true, SettingsOverride::default())
            .await
            .unwrap();
    }
    let plain = w.plain.clone();
    w.hook(Box::pin(async move {
        plain.rename(&p("/q/b"), &p("/p/a/y/b")).await.unwrap();
    }));
    // Retried after the conflict, it finds /q/b moved away (below /p/a): refused.
    let error = w
        .hooked
        .rename(&p("/p/a"), &p("/q/b/x/a"))
        .await
        .unwrap_err();
    assert!(
        matches!(error, ControlError::NotFound(_)) && error.to_string().contains("/q/b/x"),
        "{error}"
    );
    assert_eq!(
        names(&w.plain, "/p/a/y").await.len(),
        1,
        "the other rename stands"
    );
    w.assert_tree().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_cannot_list_a_chunk_collection_removes() {
    let w = world().await;
    let (id, _, c1) = w.write("/f").await;
    let (_, v2, _) = w.write("/f").await;
    // A commit bringing back version 1's chunk while collection removes version 1 and the
    // chunk: one of the two loses, and the file's current version always opens.
    let inner = w.inner.clone();
    w.hook(Box::pin(async move {
        let mut report = UpkeepReport::default();
        Upkeep::new(inner, b"token".to_vec())
            .collect(&mut report)
            .await
            .unwrap();
    }));
    let _ = w.hooked.commit(&p("/f"), id, v2, 10, vec![c1]).await;
    let layout = w.plain.open(&p("/f"), None).await.unwrap();
    assert_eq!(layout.chunks.len(), 1);
    // Again, now that version 1 is gone: the chunk may still be committed only if it was
    // not collected; either way the current version opens.
    let _ = w
        .plain
        .commit(&p("/f"), id, layout.version, 10, vec![c1])
        .await;
    w.plain.open(&p("/f"), None).await.unwrap();
    // A chunk placed for the commit, collected (expired) while the commit is in flight.
    let dir = tempfile::tempdir().unwrap();
    let inner: Arc<dyn MetadataStore> =
        Arc::new(RedbStore::open(&dir.path().join("metadata.redb")).unwrap());
    let hooked_store = Arc::new(Hooked {
        inner: inner.clone(),
        hook: Mutex::new(None),
    });
    // Placements expire at once: collection may take them whenever no version lists them.
    let ns = Namespace::new(hooked_store.clone(), SETTINGS, Duration::ZERO)
        .await
        .unwrap();
    Membership::new(inner.clone(), Duration::from_secs(60))
        .register("n1", "127.0.0.1:1", TopologySummary::default())
        .await
        .unwrap();
    let inode = ns
        .create(&p("/g"), SettingsOverride::default(), false)
        .await
        .unwrap();
    let placed = ns.place_chunks(&p("/g"), inode.id, 0, 1).await.unwrap();
    let chunk = CommitChunk {
        index: 0,
        id: placed.chunks[0].id,
        len: 10,
    };
    let collector = inner.clone();
    *hooked_store.hook.lock().unwrap() = Some(Box::pin(async move {
        let mut report = UpkeepReport::default();
        Upkeep::new(collector, b"token".to_vec())
            .collect(&mut report)
            .await
            .unwrap();
        assert_eq!(report.chunks_collected, 1, "{report:?}");
    }));
    let committed = ns.commit(&p("/g"), inode.id, 0, 10, vec![chunk]).await;
    let error = committed.expect_err("the commit listed a collected chunk");
    assert!(
        matches!(error, ControlError::FailedPrecondition(_)),
        "{error}"
    );
    assert!(error.to_string().contains("collected"), "{error}");
    // Nothing was published: the file is still empty and opens.
    assert_eq!(ns.open(&p("/g"), None).await.unwrap().version, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_racing_its_snapshots_deletion_restores_nothing_collected() {
    let w = world().await;
    w.plain
        .mkdir(&p("/d"), true, SettingsOverride::default())
        .await
        .unwrap();
    w.write("/d/f").await;
    w.plain.create_snapshot("s", &p("/d")).await.unwrap();
    w.write("/d/f").await;
    let (inner, plain) = (w.inner.clone(), w.plain.clone());
    w.hook(Box::pin(async move {
        plain.delete_snapshot("s").await.unwrap();
        let mut report = UpkeepReport::default();
        Upkeep::new(inner, b"token".to_vec())
            .collect(&mut report)
            .await
            .unwrap();
        assert_eq!(report.versions_collected, 1, "{report:?}");
    }));
    let error = w.hooked.rollback("s").await.unwrap_err();
    assert!(matches!(error, ControlError::NotFound(_)), "{error}");
    // The file is still at version 2, which opens.
    assert_eq!(w.plain.open(&p("/d/f"), None).await.unwrap().version, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_edge_cases() {
    let w = world().await;
    let ns = &w.plain;
    // A snapshot of one file: set back, and brought back after a delete.
    let (solo, _, _) = w.write("/solo").await;
    ns.create_snapshot("file", &p("/solo")).await.unwrap();
    w.write("/solo").await;
    ns.rollback("file").await.unwrap();
    assert_eq!(names(ns, "/solo").await, [("solo".to_owned(), solo, 1)]);
    ns.delete(&p("/solo"), false).await.unwrap();
    ns.rollback("file").await.unwrap();
    let back = names(ns, "/solo").await;
    assert_eq!(back.len(), 1);
    assert_ne!(back[0].1, solo, "a deleted file comes back as a new file");
    assert_eq!(ns.open(&p("/solo"), None).await.unwrap().size, 10);

    // The top directory replaced by a file.
    ns.mkdir(&p("/t/sub"), true, SettingsOverride::default())
        .await
        .unwrap();
    w.write("/t/sub/x").await;
    ns.create_snapshot("t", &p("/t")).await.unwrap();
    ns.delete(&p("/t"), true).await.unwrap();
    w.write("/t").await;
    ns.rollback("t").await.unwrap();
    assert_eq!(names(ns, "/t/sub").await.len(), 1);
    assert!(ns.stat(&p("/t")).await.unwrap().inode.is_dir());

    // Two files swapped by renames swap back, keeping their ids.
    ns.mkdir(&p("/s"), true, SettingsOverride::default())
        .await
        .unwrap();
    let (a, _, _) = w.write("/s/a").await;
    let (b, _, _) = w.write("/s/b").await;
    ns.create_snapshot("swap", &p("/s")).await.unwrap();
    ns.rename(&p("/s/a"), &p("/s/tmp")).await.unwrap();
    ns.rename(&p("/s/b"), &p("/s/a")).await.unwrap();
    ns.rename(&p("/s/tmp"), &p("/s/b")).await.unwrap();
    ns.rollback("swap").await.unwrap();
    assert_eq!(
        names(ns, "/s").await,
        [("a".to_owned(), a, 1), ("b".to_owned(), b, 1)]
    );

    // A directory renamed, and a file moved deeper below it.
    ns.mkdir(&p("/n/d1"), true, SettingsOverride::default())
        .await
        .unwrap();
    let (f, _, _) = w.write("/n/d1/f").await;
    ns.create_snapshot("nest", &p("/n")).await.unwrap();
    ns.rename(&p("/n/d1"), &p("/n/d2")).await.unwrap();
    ns.mkdir(&p("/n/d2/deeper"), true, SettingsOverride::default())
        .await
        .unwrap();
    ns.rename(&p("/n/d2/f"), &p("/n/d2/deeper/f"))
        .await
        .unwrap();
    ns.rollback("nest").await.unwrap();
    assert_eq!(
        names(ns, "/n")
            .await
            .iter()
            .map(|n| n.0.clone())
            .collect::<Vec<_>>(),
        ["d1"]
    );
    assert_eq!(names(ns, "/n/d1").await, [("f".to_owned(), f, 1)]);

    // The root.
    ns.create_snapshot("root", &NsPath::root()).await.unwrap();
    w.write("/newfile").await;
    ns.delete(&p("/n"), true).await.unwrap();
    ns.rollback("root").await.unwrap();
    assert!(ns.stat(&p("/newfile")).await.is_err());
    assert_eq!(names(ns, "/n/d1").await.len(), 1);
    w.assert_tree().await;
    // Collection takes what the rollbacks left behind (superseded versions and their
    // chunks), never what a snapshot pins or a file's current version lists. (There is no
    // daemon at n1's address: the replicas wait in the trash, which is reported.)
    let report = w.collect().await;
    assert!(
        report.versions_collected > 0 && report.chunks_collected > 0,
        "{report:?}"
    );
    let pinned = ["/solo", "/s/a", "/s/b", "/n/d1/f", "/t/sub/x"];
    for path in pinned {
        assert_eq!(ns.open(&p(path), None).await.unwrap().size, 10, "{path}");
    }
    for snapshot in ["file", "t", "swap", "nest", "root"] {
        let snapshot = ns.snapshot("name", snapshot).await.unwrap();
        for entry in &snapshot.entries {
            if let tier0_control::model::SnapshotKind::File {
                file_id, version, ..
            } = entry.kind
            {
                let versions = ns.versions_of(file_id).await.unwrap();
                assert!(
                    versions.contains(&version),
                    "{snapshot:?} lost {file_id}@{version}"
                );
            }
        }
    }
    for name in ["file", "t", "swap", "nest", "root"] {
        ns.delete_snapshot(name).await.unwrap();
    }
    w.collect().await;
    for path in pinned {
        assert_eq!(ns.open(&p(path), None).await.unwrap().size, 10, "{path}");
    }
}

/// etcd with its default limits (128 operations per transaction) refuses a recursive
/// delete of a big tree with a clear error, and nothing is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_limits_are_a_clear_error() {
    let etcd = EtcdServer::start().await.unwrap();
    let store: Arc<dyn MetadataStore> = Arc::new(
        EtcdStore::connect(&[etcd.endpoint()], "/limits/")
            .await
            .unwrap(),
    );
    let ns = Namespace::new(store, SETTINGS, Duration::from_secs(60))
        .await
        .unwrap();
    ns.mkdir(&p("/d"), true, SettingsOverride::default())
        .await
        .unwrap();
    for i in 0..140 {
        ns.create(&p(&format!("/d/f{i}")), SettingsOverride::default(), false)
            .await
            .unwrap();
    }
    let error = ns.delete(&p("/d"), true).await.unwrap_err();
    assert!(
        matches!(error, ControlError::Store(StoreError::TooLarge { .. })),
        "{error}"
    );
    assert!(error.to_string().contains("--max-txn-ops"), "{error}");
    assert_eq!(ns.list(&p("/d")).await.unwrap().len(), 140);
}

/// A superseded version is kept for the grace period after its file changed (readers that
/// opened it can finish), then collected; a pinned or current one never is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn superseded_versions_wait_out_the_grace_period() {
    let w = world().await;
    w.write("/f").await;
    w.write("/f").await;
    let graceful = Upkeep::new(w.inner.clone(), b"token".to_vec())
        .with_version_grace(Duration::from_secs(3600));
    let mut report = UpkeepReport::default();
    graceful.collect(&mut report).await.unwrap();
    assert_eq!(
        (report.versions_collected, report.chunks_collected),
        (0, 0),
        "{report:?}"
    );
    let id = w.plain.stat(&p("/f")).await.unwrap().inode.id;
    assert_eq!(w.plain.versions_of(id).await.unwrap(), [1, 2]);
    let report = w.collect().await;
    assert_eq!(
        (report.versions_collected, report.chunks_collected),
        (1, 1),
        "{report:?}"
    );
    assert_eq!(w.plain.versions_of(id).await.unwrap(), [2]);
}

/// A rollback that expects the snapshot it checked refuses one re-made under the same name
/// (an agent's policy judged the first one's path), and makes the one it checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_of_a_checked_snapshot_refuses_one_remade_under_its_name() {
    let w = world().await;
    let ns = &w.plain;
    for dir in ["/datasets", "/other"] {
        ns.mkdir(&p(dir), true, SettingsOverride::default())
            .await
            .unwrap();
    }
    let checked = ns.create_snapshot("s", &p("/datasets")).await.unwrap();
    ns.delete_snapshot("s").await.unwrap();
    ns.create_snapshot("s", &p("/other")).await.unwrap();
    let error = ns
        .rollback_expecting("s", Some(&checked))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ControlError::FailedPrecondition(text) if text.contains("changed since it was checked")),
        "{error}"
    );
    let now = ns.snapshot("name", "s").await.unwrap();
    assert!(ns.rollback_expecting("s", Some(&now)).await.is_ok());
}
