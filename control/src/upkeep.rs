//! The leader's upkeep: re-replication of chunks that lost a replica (a node down or being
//! drained) and garbage collection of versions and chunks nothing needs any more.
//!
//! Both read the metadata, act on the data daemons through the client (`tier0-client`, over
//! TCP with the cluster token), and record what they did in transactions that commit only if
//! what they read is unchanged, so a concurrent commit, snapshot or rollback wins and the
//! work is retried on the next pass. A copy is an order to the target daemon (`Replicate`),
//! which pulls the chunk from the source itself: the control plane never holds chunk data.
//!
//! Collection never deletes too early. A version is kept while it is a file's current
//! version or a snapshot pins it; snapshots only pin current versions, and a rollback
//! restores only versions of a snapshot that still exists when it commits (it checks the
//! snapshot), so a version that is neither current nor pinned, deleted in a transaction that
//! checks the file is unchanged, is never needed again. A chunk is kept while a version
//! lists it or its writer may still commit it (before `expires_ms`). Chunk records are read
//! *before* the versions, and each file's inodes in between: a chunk committed after the
//! inode read conflicts with the collection's transaction, which rewrites the file's inode
//! (every commit checks it), and one committed before it is listed by a version the last
//! read sees. A collected chunk's replicas go to `trash/` in the same transaction that
//! removes its record, as does a replica that re-replication replaced, and are deleted on
//! the daemons afterwards, retried until each node has answered: the metadata never points at
//! deleted bytes, and no replica is forgotten on a node that was down.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tier0_client::DaemonConnection;
use tier0_dataplane::net::replicate::DEFAULT_COPY_TIMEOUT;
use tier0_dataplane::store::ChunkId;

use crate::error::{ControlError, Result};
use crate::model::{
    self, ChunkRecord, FileVersion, Inode, InodeKind, NodeRecord, NodeState, Snapshot, SnapshotKind,
};
use crate::namespace::parse_chunk_key;
use crate::store::{Check, Entry, MetadataStore, Outcome, Txn};

/// What one pass did, and what it could not do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpkeepReport {
    /// Replicas copied to a new node to replace one on a down or draining node.
    pub replicas_copied: u64,
    /// Draining nodes that no chunk needs any more, now drained.
    pub nodes_drained: u64,
    /// Version records no file and no snapshot needs, removed.
    pub versions_collected: u64,
    /// Chunk records removed (their replicas queued for deletion).
    pub chunks_collected: u64,
    /// Replicas deleted on the daemons.
    pub replicas_deleted: u64,
    /// What could not be done now (retried next pass), one line each.
    pub problems: Vec<String>,
    /// The rebalancing pass that follows (`rebalance.rs`): moves planned (dry-run),
    /// executed, refused (budget) and failed, and the bytes copied.
    pub moves_planned: u64,
    pub moves_executed: u64,
    pub moves_refused: u64,
    pub moves_failed: u64,
    pub bytes_moved: u64,
}

pub struct Upkeep {
    store: Arc<dyn MetadataStore>,
    token: Vec<u8>,
    timeout: Duration,
    /// How long a superseded version is kept after its file last changed, for readers that
    /// opened it before (see `with_version_grace`).
    version_grace: Duration,
}

impl std::fmt::Debug for Upkeep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upkeep")
            .field("store", &self.store)
            .field("token", &"<redacted>")
            .field("timeout", &self.timeout)
            .field("version_grace", &self.version_grace)
            .finish()
    }
}

fn version_of_key(key: &str) -> Option<(u64, u64)> {
    let rest = key.strip_prefix(model::VERSIONS_PREFIX)?;
    let (file, version) = rest.split_once('/')?;
    Some((
        u64::from_str_radix(file, 16).ok()?,
        u64::from_str_radix(version, 16).ok()?,
    ))
}

/// `trash/<file>/<index>/<generation>/<node>` → the chunk and the node.
fn trash_of_key(key: &str) -> Option<(ChunkId, String)> {
    let rest = key.strip_prefix(model::TRASH_PREFIX)?;
    let mut parts = rest.splitn(4, '/');
    let file = u64::from_str_radix(parts.next()?, 16).ok()?;
    let index = u32::from_str_radix(parts.next()?, 16).ok()?;
    let generation = u32::from_str_radix(parts.next()?, 16).ok()?;
    let node = parts.next()?.to_owned();
    Some((
        ChunkId {
            file,
            index,
            generation,
        },
        node,
    ))
}

/// Chunks a collection transaction removes at most (each is three or more operations; etcd
/// takes 128 by default).
const COLLECT_BATCH: usize = 32;
/// Attempts to bump one file's layout version when it keeps changing.
const BUMP_ATTEMPTS: usize = 8;
/// Times a copy is asked again of a target that answered `EBUSY` (too many copies in
/// flight there), each pause one `COPY_BUSY_PAUSE` longer than the last.
const COPY_BUSY_RETRIES: u32 = 5;
const COPY_BUSY_PAUSE: Duration = Duration::from_millis(100);

/// Which chunks the kept versions list: their lengths, and the files whose versions list
/// them.
#[derive(Default)]
struct Listed {
    len: HashMap<ChunkId, u32>,
    files: HashMap<ChunkId, HashSet<u64>>,
}

impl Upkeep {
    /// Upkeep that collects a superseded version at its first pass (see
    /// `with_version_grace`).
    pub fn new(store: Arc<dyn MetadataStore>, token: Vec<u8>) -> Upkeep {
        Upkeep {
            store,
            token,
            timeout: Duration::from_secs(10),
            version_grace: Duration::ZERO,
        }
    }

    /// Keeps the superseded versions of a file for `grace` after the file last changed (a
    /// commit or a rollback), so that readers who opened one just before (an open file in
    /// the mount, the C ABI or Python reads the version it opened) can finish. Versions of a
    /// deleted file are not kept.
    pub fn with_version_grace(mut self, grace: Duration) -> Upkeep {
        self.version_grace = grace;
        self
    }

    /// Repair, then collection.
    pub async fn run(&self) -> Result<UpkeepReport> {
        let mut report = UpkeepReport::default();
        self.repair(&mut report).await?;
        self.collect(&mut report).await?;
        Ok(report)
    }

    async fn nodes(&self) -> Result<HashMap<String, NodeRecord>> {
        let mut nodes = HashMap::new();
        for entry in self.store.scan(model::NODES_PREFIX).await? {
            let node: NodeRecord = model::decode(&entry.key, &entry.value)?;
            nodes.insert(node.id.clone(), node);
        }
        Ok(nodes)
    }

    async fn chunk_records(&self) -> Result<Vec<(ChunkId, Entry, ChunkRecord)>> {
        let mut records = Vec::new();
        for entry in self.store.scan(model::CHUNKS_PREFIX).await? {
            let id = parse_chunk_key(&entry.key)?;
            let record: ChunkRecord = model::decode(&entry.key, &entry.value)?;
            records.push((id, entry, record));
        }
        Ok(records)
    }

    async fn listed(&self) -> Result<Listed> {
        let mut listed = Listed::default();
        for entry in self.store.scan(model::VERSIONS_PREFIX).await? {
            let version: FileVersion = model::decode(&entry.key, &entry.value)?;
            let Some((file, _)) = version_of_key(&entry.key) else {
                return Err(ControlError::Internal(format!(
                    "metadata key {:?} is not a version",
                    entry.key
                )));
            };
            for chunk in &version.chunks {
                listed.len.insert(chunk.id, chunk.len);
                listed.files.entry(chunk.id).or_default().insert(file);
            }
        }
        Ok(listed)
    }

    /// Copies every listed chunk with a replica on a down, draining or drained node to an up
    /// node, then marks drained the draining nodes nothing names.
    pub async fn repair(&self, report: &mut UpkeepReport) -> Result<()> {
        let nodes = self.nodes().await?;
        let now = model::now_ms();
        let lost = |id: &str| {
            nodes.get(id).is_none_or(|n| {
                matches!(
                    n.state,
                    NodeState::Down | NodeState::Draining | NodeState::Drained
                )
            })
        };
        // A replica can be read from a node that serves and still heartbeats.
        let serving = |id: &str| {
            nodes.get(id).is_some_and(|n| {
                matches!(n.state, NodeState::Up | NodeState::Draining) && n.lease_expires_ms > now
            })
        };
        let mut up: Vec<&NodeRecord> = nodes
            .values()
            .filter(|n| n.state == NodeState::Up && n.lease_expires_ms > now)
            .collect();
        up.sort_by(|a, b| a.id.cmp(&b.id));
        let listed = self.listed().await?;
        let mut moved_files: HashSet<u64> = HashSet::new();
        for (id, entry, record) in self.chunk_records().await? {
            let Some(&len) = listed.len.get(&id) else {
                // Not committed: its writer's to finish, or garbage.
                continue;
            };
            if !record.replicas.iter().any(|r| lost(r)) {
                continue;
            }
            // Up replicas first, then draining ones.
            let mut sources: Vec<&String> = record.replicas.iter().filter(|r| serving(r)).collect();
            sources.sort_by_key(|r| nodes[r.as_str()].state != NodeState::Up);
            if sources.is_empty() {
                report.problems.push(format!(
                    "chunk {id}: no replica is on a serving node ({}); it cannot be copied",
                    record.replicas.join(", ")
                ));
                continue;
            }
            let kept: Vec<String> = record
                .replicas
                .iter()
                .filter(|r| !lost(r))
                .cloned()
                .collect();
            let gone: Vec<String> = record
                .replicas
                .iter()
                .filter(|r| lost(r))
                .cloned()
                .collect();
            let mut copies: Vec<String> = Vec::new();
            for _ in 0..gone.len() {
                let holding: Vec<String> =
                    kept.iter().chain(&copies).chain(&gone).cloned().collect();
                let Some(target) = choose_target(&up, &holding, &nodes, id) else {
                    report.problems.push(format!(
                        "chunk {id}: no up node without a replica of it to copy to"
                    ));
                    break;
                };
                let to = nodes[&target].address.clone();
                let mut failures = Vec::new();
                for source in &sources {
                    let from = nodes[source.as_str()].address.clone();
                    match self.copy(id, len, from, to.clone()).await {
                        Ok(()) => {
                            failures.clear();
                            break;
                        }
                        Err(problem) => failures.push(problem),
                    }
                }
                if !failures.is_empty() {
                    report.problems.extend(failures);
                    // A copy given up on may still land (a slow drive, a timeout): queue the
                    // target's replica for deletion; the trash keeps it if a record names it.
                    let mut orphan = Txn::new();
                    orphan.put(model::trash_key(id, &target), b"{}".to_vec());
                    self.store.commit(&orphan).await?;
                    break;
                }
                report.replicas_copied += 1;
                copies.push(target);
            }
            if copies.is_empty() {
                continue;
            }
            // The copies replace the first lost replicas; the rest stay named (a draining
            // node still serves) until a later pass replaces them too.
            let (replaced, remaining) = gone.split_at(copies.len());
            let mut replicas = kept.clone();
            replicas.extend(copies.iter().cloned());
            replicas.extend(remaining.iter().cloned());
            let updated = ChunkRecord {
                replicas,
                ..record.clone()
            };
            let mut txn = Txn::new();
            txn.check(Check::At(entry.key.clone(), entry.revision))
                .put(entry.key.clone(), model::encode(&updated));
            for node in replaced {
                txn.put(model::trash_key(id, node), b"{}".to_vec());
            }
            // A copy onto a node that still had the chunk (EEXIST) may have a deletion
            // pending there: the record names it now, so the deletion is void.
            for node in &copies {
                txn.delete(model::trash_key(id, node));
            }
            match self.store.commit(&txn).await? {
                Outcome::Committed(_) => {
                    tracing::info!(chunk = %id, replicas = ?updated.replicas, "chunk re-replicated");
                    if let Some(files) = listed.files.get(&id) {
                        moved_files.extend(files);
                    }
                }
                Outcome::Conflict => {
                    // The record moved (collected, or repaired meanwhile): the copies are
                    // nobody's; delete them later.
                    let mut orphans = Txn::new();
                    for node in &copies {
                        orphans.put(model::trash_key(id, node), b"{}".to_vec());
                    }
                    self.store.commit(&orphans).await?;
                }
            }
        }
        self.bump_layouts(&moved_files).await?;
        // A draining node that no chunk names any more is drained.
        let still_named: HashSet<String> = self
            .chunk_records()
            .await?
            .into_iter()
            .flat_map(|(_, _, record)| record.replicas)
            .collect();
        for node in nodes.values() {
            if node.state != NodeState::Draining || still_named.contains(&node.id) {
                continue;
            }
            let key = model::node_key(&node.id);
            if let Some(entry) = self.store.get(&key).await? {
                let mut record: NodeRecord = model::decode(&entry.key, &entry.value)?;
                if record.state != NodeState::Draining {
                    continue;
                }
                record.state = NodeState::Drained;
                let mut txn = Txn::new();
                txn.check(Check::At(key.clone(), entry.revision))
                    .put(key, model::encode(&record));
                if let Outcome::Committed(_) = self.store.commit(&txn).await? {
                    tracing::info!(node = %node.id, "node drained");
                    report.nodes_drained += 1;
                }
            }
        }
        Ok(())
    }

    /// A new layout version (and fence) for each file, so cached layouts that still name the
    /// old replicas are refreshed; retried while the file keeps changing.
    pub(crate) async fn bump_layouts(&self, files: &HashSet<u64>) -> Result<()> {
        if files.is_empty() {
            return Ok(());
        }
        let mut keys: HashMap<u64, String> = HashMap::new();
        for entry in self.store.scan(model::INODES_PREFIX).await? {
            let inode: Inode = model::decode(&entry.key, &entry.value)?;
            if files.contains(&inode.id) {
                keys.insert(inode.id, entry.key);
            }
        }
        for (file, key) in keys {
            for _ in 0..BUMP_ATTEMPTS {
                // A file renamed or deleted meanwhile: a rename keeps the id, so look again.
                let entry = match self.store.get(&key).await? {
                    Some(entry) => entry,
                    None => break,
                };
                let mut inode: Inode = model::decode(&entry.key, &entry.value)?;
                let InodeKind::File(state) = &mut inode.kind else {
                    break;
                };
                if inode.id != file {
                    break;
                }
                state.layout_version += 1;
                let fence = model::encode(&state.layout_version);
                let mut txn = Txn::new();
                txn.check(Check::At(entry.key.clone(), entry.revision))
                    .put(entry.key.clone(), model::encode(&inode))
                    .put(model::fence_key(inode.id), fence);
                if let Outcome::Committed(_) = self.store.commit(&txn).await? {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Copies `chunk` (`len` bytes) from the daemon at `from` to the daemon at `to`, daemon
    /// to daemon: the target is sent a `Replicate` naming the source, pulls the bytes itself,
    /// checks and stores them, and answers once they are whole. No chunk byte passes through
    /// the control plane. A chunk already on the target counts as copied (chunks are
    /// immutable and stored atomically); a target busy with other copies (`EBUSY`) is asked
    /// again a few times, a moment apart. Errors name the chunk, the nodes and the cause.
    pub async fn copy(
        &self,
        chunk: ChunkId,
        len: u32,
        from: String,
        to: String,
    ) -> Result<(), String> {
        let token = self.token.clone();
        let timeout = self.timeout;
        // The target's answer comes after its own fetch deadline at the latest, plus the
        // write: wait longer than that, so its error (and not a timeout here) is the cause.
        let wait = timeout.max(DEFAULT_COPY_TIMEOUT) + timeout;
        let mut busy_retries = 0;
        loop {
            let (token, source, target) = (token.clone(), from.clone(), to.clone());
            let outcome = tokio::task::spawn_blocking(move || {
                let mut target =
                    DaemonConnection::connect(&target, &token, "tier0-control", timeout)?;
                target.replicate(chunk, len, &source, wait)
            })
            .await
            .map_err(|e| format!("chunk {chunk}: copy task failed: {e}"))?;
            match outcome {
                Ok(()) => return Ok(()),
                // Chunks are immutable and written atomically: there already means complete.
                Err(error) if error.errno() == libc::EEXIST => return Ok(()),
                Err(error) if error.errno() == libc::EBUSY && busy_retries < COPY_BUSY_RETRIES => {
                    busy_retries += 1;
                    tokio::time::sleep(COPY_BUSY_PAUSE * busy_retries).await;
                }
                Err(error) => {
                    return Err(format!(
                        "chunk {chunk}: copying from {from} to {to}: {error}"
                    ));
                }
            }
        }
    }

    async fn delete_replica(&self, chunk: ChunkId, address: String) -> Result<(), String> {
        let token = self.token.clone();
        let timeout = self.timeout;
        tokio::task::spawn_blocking(move || {
            let mut daemon = DaemonConnection::connect(&address, &token, "tier0-control", timeout)
                .map_err(|e| format!("chunk {chunk}: deleting on {address}: {e}"))?;
            match daemon.delete(chunk) {
                Ok(()) => Ok(()),
                Err(error) if error.errno() == libc::ENOENT => Ok(()),
                Err(error) => Err(format!("chunk {chunk}: deleting on {address}: {error}")),
            }
        })
        .await
        .map_err(|e| format!("chunk {chunk}: delete task failed: {e}"))?
    }

    /// Removes what no file, snapshot or writer needs: version records, then chunk records
    /// (their replicas to the trash), then the trashed replicas on the daemons.
    pub async fn collect(&self, report: &mut UpkeepReport) -> Result<()> {
        // Ids above the counter were handed out after this point: their files are too new
        // to judge from the scans below.
        let counter: u64 = match self.store.get(model::INODE_COUNTER_KEY).await? {
            Some(entry) => model::decode(&entry.key, &entry.value)?,
            None => model::ROOT_ID,
        };
        let current = self.file_inodes().await?;
        let now_ms = model::now_ms();
        let mut pinned: HashSet<(u64, u64)> = HashSet::new();
        for entry in self.store.scan(model::SNAPSHOTS_PREFIX).await? {
            let snapshot: Snapshot = model::decode(&entry.key, &entry.value)?;
            for pin in &snapshot.entries {
                if let SnapshotKind::File {
                    file_id, version, ..
                } = pin.kind
                {
                    pinned.insert((file_id, version));
                }
            }
        }
        let mut doomed: BTreeMap<u64, Vec<Entry>> = BTreeMap::new();
        for entry in self.store.scan(model::VERSIONS_PREFIX).await? {
            let Some((file, version)) = version_of_key(&entry.key) else {
                return Err(ControlError::Internal(format!(
                    "metadata key {:?} is not a version",
                    entry.key
                )));
            };
            let is_current = current.get(&file).is_some_and(|(_, v, _)| *v == version);
            let grace = self.version_grace.as_millis() as u64;
            let recent = current
                .get(&file)
                .is_some_and(|(_, _, modified_ms)| modified_ms.saturating_add(grace) > now_ms);
            if file > counter || is_current || recent || pinned.contains(&(file, version)) {
                continue;
            }
            doomed.entry(file).or_default().push(entry);
        }
        for (file, versions) in doomed {
            for batch in versions.chunks(COLLECT_BATCH * 2) {
                let mut txn = Txn::new();
                // The file must not have changed since it was read (a rollback may have
                // made one of these versions current again).
                if let Some((inode, _, _)) = current.get(&file) {
                    txn.check(Check::At(inode.key.clone(), inode.revision));
                }
                for version in batch {
                    txn.check(Check::At(version.key.clone(), version.revision))
                        .delete(version.key.clone());
                }
                if let Outcome::Committed(_) = self.store.commit(&txn).await? {
                    report.versions_collected += batch.len() as u64;
                }
            }
        }

        // Chunk records, then the files' inodes, then the versions (see the module comment).
        let records = self.chunk_records().await?;
        let mut inodes = self.file_states().await?;
        let listed = self.listed().await?;
        let now = model::now_ms();
        let mut garbage: BTreeMap<u64, Vec<(ChunkId, Entry, ChunkRecord)>> = BTreeMap::new();
        for (id, entry, record) in records {
            if id.file > counter || listed.len.contains_key(&id) {
                continue;
            }
            // No writer can commit it any more: its file is gone, a commit came after it was
            // placed (see `FileState::committed_generation`), or its deadline passed.
            let orphaned = match inodes.get(&id.file) {
                None => true,
                Some((_, state)) => id.generation < state.committed_generation,
            };
            if !orphaned && record.expires_ms > now {
                continue;
            }
            garbage
                .entry(id.file)
                .or_default()
                .push((id, entry, record));
        }
        for (file, chunks) in garbage {
            for batch in chunks.chunks(COLLECT_BATCH) {
                let mut txn = Txn::new();
                // Rewriting the file's inode makes a commit that read these records conflict.
                if let Some((inode, _)) = inodes.get(&file) {
                    txn.check(Check::At(inode.key.clone(), inode.revision))
                        .put(inode.key.clone(), inode.value.clone());
                }
                for (id, entry, record) in batch {
                    txn.check(Check::At(entry.key.clone(), entry.revision))
                        .delete(entry.key.clone());
                    for node in &record.replicas {
                        txn.put(model::trash_key(*id, node), b"{}".to_vec());
                    }
                }
                match self.store.commit(&txn).await? {
                    Outcome::Committed(revision) => {
                        report.chunks_collected += batch.len() as u64;
                        if let Some((inode, _)) = inodes.get_mut(&file) {
                            inode.revision = revision;
                        }
                    }
                    // The file changed: its garbage waits for the next pass.
                    Outcome::Conflict => break,
                }
            }
        }

        // Fences of files that are gone entirely.
        for entry in self.store.scan(model::FENCES_PREFIX).await? {
            let file = entry
                .key
                .strip_prefix(model::FENCES_PREFIX)
                .and_then(|hex| u64::from_str_radix(hex, 16).ok());
            let has_versions = |file: u64| listed.files.values().any(|files| files.contains(&file));
            if let Some(file) = file
                && file <= counter
                && !inodes.contains_key(&file)
                && !has_versions(file)
            {
                let mut txn = Txn::new();
                txn.check(Check::At(entry.key.clone(), entry.revision))
                    .delete(entry.key.clone());
                self.store.commit(&txn).await?;
            }
        }

        // The trash: delete each replica on its node, then forget it.
        let nodes = self.nodes().await?;
        for entry in self.store.scan(model::TRASH_PREFIX).await? {
            let Some((id, node)) = trash_of_key(&entry.key) else {
                return Err(ControlError::Internal(format!(
                    "metadata key {:?} is not a trashed replica",
                    entry.key
                )));
            };
            // A replica named again since it was trashed (a copy onto a node that still had
            // it) is live: forget the deletion, keep the bytes.
            let named = match self.store.get(&model::chunk_key(id)).await? {
                Some(chunk) => model::decode::<ChunkRecord>(&chunk.key, &chunk.value)?
                    .replicas
                    .contains(&node),
                None => false,
            };
            let done = match nodes.get(&node) {
                _ if named => true,
                // A node that is no longer registered holds nothing we can reach.
                None => true,
                Some(record)
                    if record.state == NodeState::Down || record.lease_expires_ms <= now =>
                {
                    report.problems.push(format!(
                        "chunk {id}: its replica on {node} waits for the node to come back"
                    ));
                    false
                }
                Some(record) => match self.delete_replica(id, record.address.clone()).await {
                    Ok(()) => {
                        report.replicas_deleted += 1;
                        true
                    }
                    Err(problem) => {
                        report.problems.push(problem);
                        false
                    }
                },
            };
            if done {
                let mut txn = Txn::new();
                txn.check(Check::At(entry.key.clone(), entry.revision))
                    .delete(entry.key.clone());
                self.store.commit(&txn).await?;
            }
        }
        Ok(())
    }

    /// Every file's inode entry, current version and last change, by file id.
    async fn file_inodes(&self) -> Result<HashMap<u64, (Entry, u64, u64)>> {
        let mut files = HashMap::new();
        for entry in self.store.scan(model::INODES_PREFIX).await? {
            let inode: Inode = model::decode(&entry.key, &entry.value)?;
            if let InodeKind::File(state) = &inode.kind {
                files.insert(inode.id, (entry, state.version, inode.modified_ms));
            }
        }
        Ok(files)
    }

    async fn file_states(&self) -> Result<HashMap<u64, (Entry, model::FileState)>> {
        let mut files = HashMap::new();
        for entry in self.store.scan(model::INODES_PREFIX).await? {
            let inode: Inode = model::decode(&entry.key, &entry.value)?;
            if let InodeKind::File(state) = inode.kind {
                files.insert(inode.id, (entry, state));
            }
        }
        Ok(files)
    }
}

/// An up node without a replica of `chunk`, in a failure domain the chunk does not use yet
/// when there is one; spread over the candidates by chunk.
fn choose_target(
    up: &[&NodeRecord],
    replicas: &[String],
    nodes: &HashMap<String, NodeRecord>,
    chunk: ChunkId,
) -> Option<String> {
    let used_domains: HashSet<&str> = replicas
        .iter()
        .filter_map(|r| nodes.get(r))
        .map(|n| n.failure_domain())
        .collect();
    let free: Vec<&&NodeRecord> = up.iter().filter(|n| !replicas.contains(&n.id)).collect();
    let fresh: Vec<&&NodeRecord> = free
        .iter()
        .copied()
        .filter(|n| !used_domains.contains(n.failure_domain()))
        .collect();
    let pool = if fresh.is_empty() { &free } else { &fresh };
    if pool.is_empty() {
        return None;
    }
    let spread = (chunk.file ^ u64::from(chunk.index) ^ u64::from(chunk.generation)) as usize;
    Some(pool[spread % pool.len()].id.clone())
}
