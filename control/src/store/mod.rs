//! The metadata store seam: an ordered key-value map with revisions, compare-and-commit
//! transactions, prefix watches and leader election.
//!
//! Two implementations pass one test suite (`control/tests/store_suite.rs`): [`RedbStore`],
//! embedded and the default for a single control plane, and [`EtcdStore`] for clusters with
//! several control-plane replicas. The model is etcd's, because it is the smaller of the two
//! and it maps onto a local B-tree with one counter: every key carries the store revision of
//! its last write, a transaction commits only if every key it read is still at the revision it
//! read (or still absent), and a watch sees every committed change to a prefix in order. The
//! namespace logic above it (`namespace.rs`) is written once, as read → decide → commit, and
//! retries on a conflict.

mod etcd;
mod redb;

use std::fmt;
use std::time::Duration;

pub use self::etcd::EtcdStore;
pub use self::redb::RedbStore;

/// A key and its value, at the revision of its last write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Vec<u8>,
    /// The store revision that last wrote this key (never 0).
    pub revision: u64,
}

/// A condition a transaction commits under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// The key does not exist.
    Absent(String),
    /// The key exists and was last written at this revision.
    At(String, u64),
}

impl Check {
    /// The condition that `key` is still as it was read: at its revision, or still absent.
    pub fn unchanged(key: &str, read: Option<&Entry>) -> Check {
        match read {
            Some(entry) => Check::At(key.to_owned(), entry.revision),
            None => Check::Absent(key.to_owned()),
        }
    }
}

/// One write of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    Put(String, Vec<u8>),
    Delete(String),
}

/// Checks, then writes: all writes apply, at one new revision, only if every check holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub checks: Vec<Check>,
    pub writes: Vec<Write>,
}

impl Txn {
    pub fn new() -> Txn {
        Txn::default()
    }

    /// Adds a condition (an identical one already there is not added twice).
    pub fn check(&mut self, check: Check) -> &mut Txn {
        if !self.checks.contains(&check) {
            self.checks.push(check);
        }
        self
    }

    pub fn put(&mut self, key: impl Into<String>, value: Vec<u8>) -> &mut Txn {
        self.writes.push(Write::Put(key.into(), value));
        self
    }

    pub fn delete(&mut self, key: impl Into<String>) -> &mut Txn {
        self.writes.push(Write::Delete(key.into()));
        self
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }
}

/// What a transaction did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every check held; the writes are durable at this revision.
    Committed(u64),
    /// A check failed; nothing was written.
    Conflict,
}

/// One committed change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Put(Entry),
    /// The key was deleted at this revision.
    Delete {
        key: String,
        revision: u64,
    },
}

impl Change {
    pub fn key(&self) -> &str {
        match self {
            Change::Put(entry) => &entry.key,
            Change::Delete { key, .. } => key,
        }
    }

    pub fn revision(&self) -> u64 {
        match self {
            Change::Put(entry) => entry.revision,
            Change::Delete { revision, .. } => *revision,
        }
    }
}

/// Changes under a prefix, in commit order, from the moment the watch was made. Dropping it
/// cancels the watch.
pub type Watch = tokio::sync::mpsc::Receiver<Result<Change, StoreError>>;

/// Whether this control plane leads: it runs the background work (leases, repair, garbage
/// collection) only while the value is `true`. The sender side belongs to the store.
pub type Leadership = tokio::sync::watch::Receiver<bool>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or refused the request (a dead etcd, a full disk).
    #[error("metadata store {store}: {message}")]
    Unavailable { store: String, message: String },
    /// The store's own data is damaged or not ours.
    #[error("metadata store {store}: corrupt: {message}")]
    Corrupt { store: String, message: String },
    /// A request beyond what the store takes (etcd's limits on one transaction).
    #[error("metadata store {store}: {message}")]
    TooLarge { store: String, message: String },
}

/// The ordered, revisioned key-value map the control plane keeps its metadata in.
#[async_trait::async_trait]
pub trait MetadataStore: Send + Sync + fmt::Debug {
    /// `redb` or `etcd`, for health and logs.
    fn kind(&self) -> &'static str;

    /// Where the store is (a file, endpoints), for health and logs.
    fn location(&self) -> String;

    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError>;

    /// Every key that starts with `prefix`, in key order.
    async fn scan(&self, prefix: &str) -> Result<Vec<Entry>, StoreError>;

    /// Applies `txn` atomically if its checks hold. Committed writes are durable.
    async fn commit(&self, txn: &Txn) -> Result<Outcome, StoreError>;

    /// The store's current revision (the revision of the last commit).
    async fn revision(&self) -> Result<u64, StoreError>;

    /// Changes under `prefix` committed after this call.
    async fn watch(&self, prefix: &str) -> Result<Watch, StoreError>;

    /// Campaigns, in the background, for the leadership named `election`, as `candidate`;
    /// the returned value flips to `true` while this candidate leads. A leader that loses its
    /// lease (a network partition, a stalled process) flips back to `false` before another
    /// can win, given `ttl`. `leader` tells who leads now.
    async fn campaign(
        &self,
        election: &str,
        candidate: &str,
        ttl: Duration,
    ) -> Result<Leadership, StoreError>;

    /// The candidate that leads `election` now, if any.
    async fn leader(&self, election: &str) -> Result<Option<String>, StoreError>;
}
