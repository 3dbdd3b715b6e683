//! The embedded metadata store: one redb file, for a single control plane.
//!
//! Each value is stored behind the 8-byte little-endian revision of its last write; the
//! store's revision is one more key in a second table, bumped by every commit in the same
//! redb transaction, so a key's revision and the counter can never disagree. Commits are
//! durable when they return (`Durability::Immediate`, about 0.3 ms here), so callers batch:
//! one namespace operation is one commit. redb locks its file, so a second control plane on
//! the same data directory fails to start instead of corrupting it; leadership is therefore
//! always this process's.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, watch};

use super::{Change, Check, Entry, Leadership, MetadataStore, Outcome, StoreError, Txn, Write};

const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const REVISION: &str = "revision";
/// Changes a watcher may fall behind by before its watch is closed (it must then re-read).
const WATCH_BACKLOG: usize = 1024;

pub struct RedbStore {
    path: PathBuf,
    database: Arc<Database>,
    watchers: Arc<Mutex<Vec<Watcher>>>,
    /// Held from a commit's start until its watchers are told, so they hear commits in
    /// revision order.
    commit_order: Arc<Mutex<()>>,
    leaders: Mutex<HashMap<String, (String, watch::Sender<bool>)>>,
}

struct Watcher {
    prefix: String,
    sender: mpsc::Sender<Result<Change, StoreError>>,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish()
    }
}

impl RedbStore {
    /// Opens the store at `path`, creating it if missing.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let database = Database::create(path).map_err(|error| unavailable(path, error))?;
        // Both tables exist from the first open, so readers never meet a missing table.
        let txn = database
            .begin_write()
            .map_err(|error| unavailable(path, error))?;
        txn.open_table(KEYS)
            .map_err(|error| unavailable(path, error))?;
        txn.open_table(COUNTERS)
            .map_err(|error| unavailable(path, error))?;
        txn.commit().map_err(|error| unavailable(path, error))?;
        Ok(RedbStore {
            path: path.to_owned(),
            database: Arc::new(database),
            watchers: Arc::new(Mutex::new(Vec::new())),
            commit_order: Arc::new(Mutex::new(())),
            leaders: Mutex::new(HashMap::new()),
        })
    }

    /// Runs `work` on the blocking pool: redb's calls block on the disk.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Database, &Path) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let database = Arc::clone(&self.database);
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || work(&database, &path))
            .await
            .map_err(|error| StoreError::Unavailable {
                store: store_name(&self.path),
                message: format!("store task failed: {error}"),
            })?
    }
}

fn notify(watchers: &Mutex<Vec<Watcher>>, changes: &[Change]) {
    let mut watchers = watchers.lock().unwrap_or_else(|e| e.into_inner());
    // A watcher that is gone or has fallen WATCH_BACKLOG behind is dropped; its receiver sees
    // the end of the watch and must re-read what it watches.
    watchers.retain(|watcher| {
        changes
            .iter()
            .filter(|change| change.key().starts_with(&watcher.prefix))
            .all(|change| watcher.sender.try_send(Ok(change.clone())).is_ok())
    });
}

fn store_name(path: &Path) -> String {
    format!("redb {}", path.display())
}

fn unavailable(path: &Path, error: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable {
        store: store_name(path),
        message: error.to_string(),
    }
}

fn decode(path: &Path, key: &str, stored: &[u8]) -> Result<Entry, StoreError> {
    let Some((revision, value)) = stored.split_first_chunk::<8>() else {
        return Err(StoreError::Corrupt {
            store: store_name(path),
            message: format!(
                "key {key:?}: value of {} bytes has no revision",
                stored.len()
            ),
        });
    };
    Ok(Entry {
        key: key.to_owned(),
        value: value.to_vec(),
        revision: u64::from_le_bytes(*revision),
    })
}

fn encode(revision: u64, value: &[u8]) -> Vec<u8> {
    let mut stored = Vec::with_capacity(8 + value.len());
    stored.extend_from_slice(&revision.to_le_bytes());
    stored.extend_from_slice(value);
    stored
}

#[async_trait::async_trait]
impl MetadataStore for RedbStore {
    fn kind(&self) -> &'static str {
        "redb"
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }

    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let key = key.to_owned();
        self.blocking(move |database, path| {
            let txn = database.begin_read().map_err(|e| unavailable(path, e))?;
            let table = txn.open_table(KEYS).map_err(|e| unavailable(path, e))?;
            let stored = table.get(key.as_str()).map_err(|e| unavailable(path, e))?;
            stored
                .map(|stored| decode(path, &key, stored.value()))
                .transpose()
        })
        .await
    }

    async fn scan(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        let prefix = prefix.to_owned();
        self.blocking(move |database, path| {
            let txn = database.begin_read().map_err(|e| unavailable(path, e))?;
            let table = txn.open_table(KEYS).map_err(|e| unavailable(path, e))?;
            let mut entries = Vec::new();
            for item in table
                .range(prefix.as_str()..)
                .map_err(|e| unavailable(path, e))?
            {
                let (key, stored) = item.map_err(|e| unavailable(path, e))?;
                if !key.value().starts_with(prefix.as_str()) {
                    break;
                }
                entries.push(decode(path, key.value(), stored.value())?);
            }
            Ok(entries)
        })
        .await
    }

    async fn commit(&self, txn: &Txn) -> Result<Outcome, StoreError> {
        let request = txn.clone();
        let watchers = Arc::clone(&self.watchers);
        let commit_order = Arc::clone(&self.commit_order);
        let committed = self
            .blocking(move |database, path| {
                let _order = commit_order.lock().unwrap_or_else(|e| e.into_inner());
                let write = database.begin_write().map_err(|e| unavailable(path, e))?;
                let mut changes = Vec::with_capacity(request.writes.len());
                let revision;
                {
                    let mut keys = write.open_table(KEYS).map_err(|e| unavailable(path, e))?;
                    for check in &request.checks {
                        let holds = match check {
                            Check::Absent(key) => keys
                                .get(key.as_str())
                                .map_err(|e| unavailable(path, e))?
                                .is_none(),
                            Check::At(key, at) => match keys
                                .get(key.as_str())
                                .map_err(|e| unavailable(path, e))?
                            {
                                Some(stored) => decode(path, key, stored.value())?.revision == *at,
                                None => false,
                            },
                        };
                        if !holds {
                            // Dropping the write transaction aborts it: nothing is written.
                            return Ok(None);
                        }
                    }
                    let mut counters = write
                        .open_table(COUNTERS)
                        .map_err(|e| unavailable(path, e))?;
                    let current = counters
                        .get(REVISION)
                        .map_err(|e| unavailable(path, e))?
                        .map(|guard| guard.value())
                        .unwrap_or(0);
                    if request.writes.is_empty() {
                        return Ok(Some(current));
                    }
                    revision = current + 1;
                    counters
                        .insert(REVISION, revision)
                        .map_err(|e| unavailable(path, e))?;
                    for write in &request.writes {
                        match write {
                            Write::Put(key, value) => {
                                keys.insert(key.as_str(), encode(revision, value).as_slice())
                                    .map_err(|e| unavailable(path, e))?;
                                changes.push(Change::Put(Entry {
                                    key: key.clone(),
                                    value: value.clone(),
                                    revision,
                                }));
                            }
                            Write::Delete(key) => {
                                let existed = keys
                                    .remove(key.as_str())
                                    .map_err(|e| unavailable(path, e))?
                                    .is_some();
                                if existed {
                                    changes.push(Change::Delete {
                                        key: key.clone(),
                                        revision,
                                    });
                                }
                            }
                        }
                    }
                }
                write.commit().map_err(|e| unavailable(path, e))?;
                notify(&watchers, &changes);
                Ok(Some(revision))
            })
            .await?;
        match committed {
            None => Ok(Outcome::Conflict),
            Some(revision) => Ok(Outcome::Committed(revision)),
        }
    }

    async fn revision(&self) -> Result<u64, StoreError> {
        self.blocking(|database, path| {
            let txn = database.begin_read().map_err(|e| unavailable(path, e))?;
            let counters = txn.open_table(COUNTERS).map_err(|e| unavailable(path, e))?;
            Ok(counters
                .get(REVISION)
                .map_err(|e| unavailable(path, e))?
                .map(|guard| guard.value())
                .unwrap_or(0))
        })
        .await
    }

    async fn watch(&self, prefix: &str) -> Result<super::Watch, StoreError> {
        let (sender, receiver) = mpsc::channel(WATCH_BACKLOG);
        self.watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Watcher {
                prefix: prefix.to_owned(),
                sender,
            });
        Ok(receiver)
    }

    async fn campaign(
        &self,
        election: &str,
        candidate: &str,
        _ttl: Duration,
    ) -> Result<Leadership, StoreError> {
        // One process owns the file (redb's lock), so it leads every election at once.
        let (sender, receiver) = watch::channel(true);
        self.leaders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(election.to_owned(), (candidate.to_owned(), sender));
        Ok(receiver)
    }

    async fn leader(&self, election: &str) -> Result<Option<String>, StoreError> {
        let mut leaders = self.leaders.lock().unwrap_or_else(|e| e.into_inner());
        // A leader whose every Leadership receiver is gone has stepped down.
        leaders.retain(|_, (_, sender)| !sender.is_closed());
        Ok(leaders
            .get(election)
            .map(|(candidate, _)| candidate.clone()))
    }
}
