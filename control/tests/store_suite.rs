//! One suite for every `MetadataStore`: each case runs against `RedbStore` (a file in a
//! temporary directory) and `EtcdStore` (a real etcd started for the test). Leader election
//! and durability differ by nature and have a test per store.

use std::time::Duration;

use tier0_control::store::{
    Change, Check, EtcdStore, Leadership, MetadataStore, Outcome, RedbStore, Txn, Watch,
};
use tier0_control::testing::EtcdServer;

/// How long a change, or a leadership, may take to show.
const PATIENCE: Duration = Duration::from_secs(5);
const TTL: Duration = Duration::from_secs(1);

fn redb(dir: &tempfile::TempDir) -> RedbStore {
    RedbStore::open(&dir.path().join("meta.redb")).expect("open redb")
}

async fn etcd_server() -> EtcdServer {
    EtcdServer::start().await.expect("start etcd")
}

async fn etcd(server: &EtcdServer, prefix: &str) -> EtcdStore {
    EtcdStore::connect(&[server.endpoint()], prefix)
        .await
        .expect("connect to etcd")
}

/// Runs a case against both stores, as two tests with the given names.
macro_rules! both {
    ($case:ident, $redb:ident, $etcd:ident) => {
        #[tokio::test]
        async fn $redb() {
            let dir = tempfile::tempdir().expect("temporary directory");
            $case(&redb(&dir)).await;
        }

        #[tokio::test]
        async fn $etcd() {
            let server = etcd_server().await;
            $case(&etcd(&server, "/tier0-test/").await).await;
        }
    };
}

both!(
    put_get_scan,
    redb_put_get_scan_in_key_order,
    etcd_put_get_scan_in_key_order
);
both!(
    revisions,
    redb_revisions_increase_and_mark_entries,
    etcd_revisions_increase_and_mark_entries
);
both!(
    conflicts,
    redb_conflicting_txn_writes_nothing,
    etcd_conflicting_txn_writes_nothing
);
both!(
    deletes,
    redb_delete_removes_the_key,
    etcd_delete_removes_the_key
);
both!(
    watches,
    redb_watch_sees_changes_under_its_prefix_in_order,
    etcd_watch_sees_changes_under_its_prefix_in_order
);

async fn commit(store: &dyn MetadataStore, txn: &Txn) -> u64 {
    match store.commit(txn).await.expect("commit") {
        Outcome::Committed(revision) => revision,
        Outcome::Conflict => panic!("{} conflicted: {txn:?}", store.kind()),
    }
}

async fn put(store: &dyn MetadataStore, key: &str, value: &str) -> u64 {
    commit(store, Txn::new().put(key, value.as_bytes().to_vec())).await
}

async fn value(store: &dyn MetadataStore, key: &str) -> Option<Vec<u8>> {
    store.get(key).await.expect("get").map(|entry| entry.value)
}

fn keys(entries: &[tier0_control::store::Entry]) -> Vec<&str> {
    entries.iter().map(|entry| entry.key.as_str()).collect()
}

async fn put_get_scan(store: &dyn MetadataStore) {
    // Out of key order, and in two commits, to see that a scan sorts.
    commit(
        store,
        Txn::new()
            .put("ab/3", b"three".to_vec())
            .put("a/2", b"two".to_vec()),
    )
    .await;
    put(store, "a/1", "one").await;

    assert_eq!(value(store, "a/1").await.as_deref(), Some(&b"one"[..]));
    assert_eq!(value(store, "ab/3").await.as_deref(), Some(&b"three"[..]));
    assert_eq!(store.get("a/").await.expect("get"), None);
    assert_eq!(store.get("a/3").await.expect("get"), None);

    let a = store.scan("a/").await.expect("scan");
    assert_eq!(keys(&a), ["a/1", "a/2"]);
    assert_eq!(a[0].value, b"one");
    assert_eq!(a[1].value, b"two");
    assert_eq!(keys(&store.scan("ab/").await.expect("scan")), ["ab/3"]);
    assert_eq!(
        keys(&store.scan("a").await.expect("scan")),
        ["a/1", "a/2", "ab/3"]
    );
    assert!(store.scan("b/").await.expect("scan").is_empty());
}

async fn revisions(store: &dyn MetadataStore) {
    let start = store.revision().await.expect("revision");
    let first = put(store, "r/x", "1").await;
    assert!(first > start, "{first} after {start}");
    assert_eq!(store.revision().await.expect("revision"), first);

    let second = commit(
        store,
        Txn::new()
            .put("r/y", b"2".to_vec())
            .put("r/z", b"3".to_vec()),
    )
    .await;
    assert!(second > first, "{second} after {first}");
    assert_eq!(store.revision().await.expect("revision"), second);

    let entry = |key: &'static str| async move { store.get(key).await.expect("get").expect(key) };
    assert_eq!(entry("r/x").await.revision, first);
    // Every write of one transaction is at its one revision.
    assert_eq!(entry("r/y").await.revision, second);
    assert_eq!(entry("r/z").await.revision, second);
    let revisions: Vec<u64> = store
        .scan("r/")
        .await
        .expect("scan")
        .iter()
        .map(|e| e.revision)
        .collect();
    assert_eq!(revisions, [first, second, second]);

    let third = put(store, "r/x", "4").await;
    assert!(third > second, "{third} after {second}");
    assert_eq!(entry("r/x").await.revision, third);
    assert_eq!(entry("r/y").await.revision, second);
}

async fn conflicts(store: &dyn MetadataStore) {
    let written = put(store, "c/taken", "old").await;

    // Absent, but present.
    let mut txn = Txn::new();
    txn.check(Check::Absent("c/taken".into()))
        .put("c/new", b"x".to_vec())
        .put("c/taken", b"new".to_vec())
        .delete("c/other");
    assert_eq!(store.commit(&txn).await.expect("commit"), Outcome::Conflict);
    assert_eq!(store.get("c/new").await.expect("get"), None);
    let taken = store.get("c/taken").await.expect("get").expect("c/taken");
    assert_eq!(
        (taken.value.as_slice(), taken.revision),
        (&b"old"[..], written)
    );
    assert_eq!(
        store.revision().await.expect("revision"),
        written,
        "a conflict commits no revision"
    );

    // At a revision the key has moved on from.
    let read = store.get("c/taken").await.expect("get");
    let moved = put(store, "c/taken", "moved").await;
    let mut txn = Txn::new();
    txn.check(Check::Absent("c/free".into()))
        .check(Check::unchanged("c/taken", read.as_ref()))
        .put("c/new", b"x".to_vec())
        .put("c/taken", b"stale".to_vec());
    assert_eq!(store.commit(&txn).await.expect("commit"), Outcome::Conflict);
    assert_eq!(store.get("c/new").await.expect("get"), None);
    assert_eq!(
        value(store, "c/taken").await.as_deref(),
        Some(&b"moved"[..])
    );

    // At a revision of a key that is gone.
    let mut txn = Txn::new();
    txn.check(Check::At("c/free".into(), moved))
        .put("c/new", b"x".to_vec());
    assert_eq!(store.commit(&txn).await.expect("commit"), Outcome::Conflict);
    assert_eq!(store.get("c/new").await.expect("get"), None);

    // The same checks, up to date, hold.
    let read = store.get("c/taken").await.expect("get");
    let mut txn = Txn::new();
    txn.check(Check::Absent("c/free".into()))
        .check(Check::unchanged("c/taken", read.as_ref()))
        .put("c/new", b"x".to_vec())
        .put("c/taken", b"fresh".to_vec());
    let fresh = commit(store, &txn).await;
    assert!(fresh > moved);
    assert_eq!(value(store, "c/new").await.as_deref(), Some(&b"x"[..]));
    assert_eq!(
        value(store, "c/taken").await.as_deref(),
        Some(&b"fresh"[..])
    );

    // Checks alone: nothing to write, committed at the current revision.
    let mut txn = Txn::new();
    txn.check(Check::At("c/new".into(), fresh))
        .check(Check::Absent("c/free".into()));
    assert_eq!(
        store.commit(&txn).await.expect("commit"),
        Outcome::Committed(fresh)
    );
}

async fn deletes(store: &dyn MetadataStore) {
    put(store, "d/1", "one").await;
    let kept = put(store, "d/2", "two").await;
    let deleted = commit(store, Txn::new().delete("d/1")).await;
    assert!(deleted > kept);
    assert_eq!(store.get("d/1").await.expect("get"), None);
    assert_eq!(keys(&store.scan("d/").await.expect("scan")), ["d/2"]);
    assert_eq!(
        store.get("d/2").await.expect("get").expect("d/2").revision,
        kept
    );

    // Gone means absent to a check, and the key can be made again.
    let mut txn = Txn::new();
    txn.check(Check::Absent("d/1".into()))
        .put("d/1", b"again".to_vec());
    let again = commit(store, &txn).await;
    assert!(again > deleted);
    assert_eq!(
        store.get("d/1").await.expect("get").expect("d/1").revision,
        again
    );

    // A transaction that writes one key twice leaves its last write.
    let mut txn = Txn::new();
    txn.put("d/3", b"first".to_vec())
        .put("d/3", b"last".to_vec())
        .put("d/4", b"brief".to_vec())
        .delete("d/4")
        .delete("d/2")
        .put("d/2", b"back".to_vec());
    let twice = commit(store, &txn).await;
    assert_eq!(value(store, "d/3").await.as_deref(), Some(&b"last"[..]));
    assert_eq!(store.get("d/4").await.expect("get"), None);
    let back = store.get("d/2").await.expect("get").expect("d/2");
    assert_eq!(
        (back.value.as_slice(), back.revision),
        (&b"back"[..], twice)
    );
}

async fn next(watch: &mut Watch) -> Change {
    match tokio::time::timeout(PATIENCE, watch.recv()).await {
        Ok(Some(Ok(change))) => change,
        Ok(Some(Err(err))) => panic!("watch failed: {err}"),
        Ok(None) => panic!("watch ended"),
        Err(_) => panic!("no change in {PATIENCE:?}"),
    }
}

async fn watches(store: &dyn MetadataStore) {
    put(store, "w/before", "old").await;
    let mut watch = store.watch("w/").await.expect("watch");

    let one = put(store, "w/1", "one").await;
    put(store, "x/elsewhere", "no").await;
    let pair = commit(
        store,
        Txn::new()
            .put("w/2", b"two".to_vec())
            .put("w/3", b"three".to_vec()),
    )
    .await;
    put(store, "wx/close", "no").await;
    let gone = commit(store, Txn::new().delete("w/1").delete("x/elsewhere")).await;

    let put_of = |change: Change| match change {
        Change::Put(entry) => (entry.key, entry.value, entry.revision),
        other => panic!("expected a put, saw {other:?}"),
    };
    assert_eq!(
        put_of(next(&mut watch).await),
        ("w/1".into(), b"one".to_vec(), one)
    );
    let mut both = [
        put_of(next(&mut watch).await),
        put_of(next(&mut watch).await),
    ];
    both.sort();
    assert_eq!(
        both,
        [
            ("w/2".into(), b"two".to_vec(), pair),
            ("w/3".into(), b"three".to_vec(), pair)
        ]
    );
    assert_eq!(
        next(&mut watch).await,
        Change::Delete {
            key: "w/1".into(),
            revision: gone
        }
    );

    // Nothing else: not the earlier put, not the other prefixes.
    let more = tokio::time::timeout(Duration::from_millis(300), watch.recv()).await;
    assert!(more.is_err(), "unexpected change: {more:?}");
}

async fn leads_within(leadership: &mut Leadership, patience: Duration) {
    tokio::time::timeout(patience, leadership.wait_for(|leading| *leading))
        .await
        .expect("should lead in time")
        .expect("campaign ended");
}

#[tokio::test]
async fn redb_single_candidate_leads() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = redb(&dir);
    assert_eq!(store.leader("control").await.expect("leader"), None);
    let mut leadership = store
        .campaign("control", "node-a", TTL)
        .await
        .expect("campaign");
    leads_within(&mut leadership, PATIENCE).await;
    assert_eq!(
        store.leader("control").await.expect("leader").as_deref(),
        Some("node-a")
    );
    assert_eq!(store.leader("other").await.expect("leader"), None);
}

#[tokio::test]
async fn etcd_leadership_is_exclusive_and_hands_over() {
    let server = etcd_server().await;
    let (a, b) = (
        etcd(&server, "/tier0-test/").await,
        etcd(&server, "/tier0-test/").await,
    );
    assert_eq!(a.leader("control").await.expect("leader"), None);

    let mut first = a
        .campaign("control", "node-a", TTL)
        .await
        .expect("campaign");
    leads_within(&mut first, PATIENCE).await;
    assert_eq!(
        b.leader("control").await.expect("leader").as_deref(),
        Some("node-a")
    );

    // The second waits while the first holds its lease, well past the ttl.
    let mut second = b
        .campaign("control", "node-b", TTL)
        .await
        .expect("campaign");
    tokio::time::sleep(TTL * 3).await;
    assert!(*first.borrow(), "the first should still lead");
    assert!(
        !*second.borrow(),
        "the second should not lead while the first does"
    );
    assert_eq!(
        a.leader("control").await.expect("leader").as_deref(),
        Some("node-a")
    );

    // The first steps down by dropping its Leadership; the second takes over.
    drop(first);
    leads_within(&mut second, TTL + Duration::from_secs(2)).await;
    assert_eq!(
        a.leader("control").await.expect("leader").as_deref(),
        Some("node-b")
    );
}

#[tokio::test]
async fn etcd_leader_steps_down_when_etcd_dies_and_leads_again() {
    let mut server = etcd_server().await;
    let store = etcd(&server, "/tier0-test/").await;
    let mut leadership = store
        .campaign("control", "node-a", TTL)
        .await
        .expect("campaign");
    leads_within(&mut leadership, PATIENCE).await;

    // With etcd gone the lease cannot be kept: leadership must end within the ttl.
    server.kill();
    tokio::time::timeout(
        TTL + Duration::from_secs(1),
        leadership.wait_for(|leading| !*leading),
    )
    .await
    .expect("should step down in time")
    .expect("campaign ended");

    // Back up, the old lease runs out and the candidate wins again.
    server.restart().await.expect("restart etcd");
    leads_within(&mut leadership, PATIENCE).await;
    assert_eq!(
        store.leader("control").await.expect("leader").as_deref(),
        Some("node-a")
    );
}

#[tokio::test]
async fn etcd_prefixes_keep_clusters_apart() {
    let server = etcd_server().await;
    let (one, two) = (etcd(&server, "/one/").await, etcd(&server, "/two/").await);
    put(&one, "k", "from one").await;
    put(&two, "k", "from two").await;
    put(&two, "only-two", "x").await;
    assert_eq!(value(&one, "k").await.as_deref(), Some(&b"from one"[..]));
    assert_eq!(value(&two, "k").await.as_deref(), Some(&b"from two"[..]));
    assert_eq!(keys(&one.scan("").await.expect("scan")), ["k"]);
    assert_eq!(keys(&two.scan("").await.expect("scan")), ["k", "only-two"]);
}

#[tokio::test]
async fn etcd_too_many_writes_is_too_large() {
    let server = etcd_server().await;
    let store = etcd(&server, "/tier0-test/").await;
    let mut txn = Txn::new();
    for i in 0..1025 {
        txn.put(format!("big/{i:04}"), vec![0]);
    }
    match store.commit(&txn).await {
        Err(tier0_control::store::StoreError::TooLarge { message, .. }) => {
            assert!(message.contains("--max-txn-ops"), "{message}");
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(store.scan("big/").await.expect("scan").is_empty());
}

/// Writes a few keys and returns what a read should find after a restart.
async fn write_some(store: &dyn MetadataStore) -> (Vec<tier0_control::store::Entry>, u64) {
    put(store, "p/1", "one").await;
    commit(
        store,
        Txn::new()
            .put("p/2", b"two".to_vec())
            .put("p/3", b"three".to_vec()),
    )
    .await;
    let last = commit(store, Txn::new().delete("p/3")).await;
    let entries = store.scan("p/").await.expect("scan");
    assert_eq!(keys(&entries), ["p/1", "p/2"]);
    (entries, last)
}

async fn reads_back(store: &dyn MetadataStore, entries: &[tier0_control::store::Entry], last: u64) {
    assert_eq!(store.scan("p/").await.expect("scan"), entries);
    assert_eq!(store.revision().await.expect("revision"), last);
    assert!(
        put(store, "p/4", "four").await > last,
        "revisions go on from where they were"
    );
}

#[tokio::test]
async fn redb_data_survives_reopen() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (entries, last) = write_some(&redb(&dir)).await;
    reads_back(&redb(&dir), &entries, last).await;
}

#[tokio::test]
async fn etcd_data_survives_restart() {
    let mut server = etcd_server().await;
    let (entries, last) = write_some(&etcd(&server, "/tier0-test/").await).await;
    server.kill();
    server.restart().await.expect("restart etcd");
    reads_back(&etcd(&server, "/tier0-test/").await, &entries, last).await;
}

#[tokio::test]
async fn etcd_unavailable_when_down() {
    let mut server = etcd_server().await;
    let store = etcd(&server, "/tier0-test/").await;
    put(&store, "u/1", "one").await;
    server.kill();
    match store.get("u/1").await {
        Err(tier0_control::store::StoreError::Unavailable { store: name, .. }) => {
            assert!(name.contains(&server.endpoint()), "{name}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    // And it comes back with the server.
    server.restart().await.expect("restart etcd");
    assert_eq!(value(&store, "u/1").await.as_deref(), Some(&b"one"[..]));
}
