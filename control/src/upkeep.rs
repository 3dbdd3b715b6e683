//! The leader's upkeep: re-replication of chunks that lost a replica (a node down or being
//! drained) and garbage collection of versions and chunks nothing needs any more.
//!
//! Both read the metadata, act on the data daemons through the client (`tier0-client`, over
//! TCP with the cluster token), and record what they did in transactions that commit only if
//! what they read is unchanged, so a concurrent commit, snapshot or rollback wins and the
//! work is retried on the next pass.
//!
//! Collection never deletes too early. A version is kept while it is a file's current
//! version or a snapshot pins it; snapshots only ever pin current versions, so a version
//! that is neither can never be needed again. A chunk is kept while a kept version lists it
//! or a writer may still commit it (pending, not expired). Chunk records are read *before*
//! the versions: a chunk committed in between is then either still pending in the first
//! read (kept) or listed by a version the second read sees. A collected chunk's record moves
//! to `trash/` in the same transaction that removes it, and its replicas are deleted on the
//! daemons afterwards, retried until every node has answered, so the metadata never points
//! at deleted bytes and no deleted chunk is forgotten on a node that was down.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tier0_client::DaemonConnection;
use tier0_dataplane::store::ChunkId;

use crate::error::{ControlError, Result};
use crate::model::{
    self, ChunkRecord, ChunkState, FileVersion, Inode, InodeKind, NodeRecord, NodeState, Snapshot,
    SnapshotKind,
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
}

#[derive(Debug)]
pub struct Upkeep {
    store: Arc<dyn MetadataStore>,
    token: Vec<u8>,
    timeout: Duration,
}

fn version_of_key(key: &str) -> Option<(u64, u64)> {
    let rest = key.strip_prefix(model::VERSIONS_PREFIX)?;
    let (file, version) = rest.split_once('/')?;
    Some((
        u64::from_str_radix(file, 16).ok()?,
        u64::from_str_radix(version, 16).ok()?,
    ))
}

impl Upkeep {
    pub fn new(store: Arc<dyn MetadataStore>, token: Vec<u8>) -> Upkeep {
        Upkeep {
            store,
            token,
            timeout: Duration::from_secs(10),
        }
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

    async fn chunk_records(&self, prefix: &str) -> Result<Vec<(ChunkId, Entry, ChunkRecord)>> {
        let mut records = Vec::new();
        for entry in self.store.scan(prefix).await? {
            let id = parse_chunk_key(&entry.key)?;
            let record: ChunkRecord = model::decode(&entry.key, &entry.value)?;
            records.push((id, entry, record));
        }
        Ok(records)
    }

    /// Copies every committed chunk with a replica on a down or draining node to an up node,
    /// then marks drained the draining nodes nothing needs.
    pub async fn repair(&self, report: &mut UpkeepReport) -> Result<()> {
        let nodes = self.nodes().await?;
        let lost = |id: &str| {
            nodes
                .get(id)
                .is_none_or(|n| matches!(n.state, NodeState::Down | NodeState::Draining))
        };
        let readable = |id: &str| {
            nodes
                .get(id)
                .is_some_and(|n| matches!(n.state, NodeState::Up | NodeState::Draining))
        };
        let mut up: Vec<&NodeRecord> = nodes
            .values()
            .filter(|n| n.state == NodeState::Up)
            .collect();
        up.sort_by(|a, b| a.id.cmp(&b.id));
        let mut moved_files: HashSet<u64> = HashSet::new();
        let mut moved_chunks: HashSet<ChunkId> = HashSet::new();
        let records = self.chunk_records(model::CHUNKS_PREFIX).await?;
        for (id, entry, record) in &records {
            if record.state != ChunkState::Committed || !record.replicas.iter().any(|r| lost(r)) {
                continue;
            }
            let Some(source) = record.replicas.iter().find(|r| readable(r)) else {
                report.problems.push(format!(
                    "chunk {id}: every replica is on a down node ({}); it cannot be copied",
                    record.replicas.join(", ")
                ));
                continue;
            };
            let mut replicas: Vec<String> = record
                .replicas
                .iter()
                .filter(|r| !lost(r))
                .cloned()
                .collect();
            for _ in 0..record.replicas.len() - replicas.len() {
                let Some(target) = choose_target(&up, &replicas, &nodes, *id) else {
                    report.problems.push(format!(
                        "chunk {id}: no up node without a replica of it to copy to"
                    ));
                    break;
                };
                let from = nodes[source].address.clone();
                let to = nodes[&target].address.clone();
                match self.copy(*id, record.len, from, to).await {
                    Ok(()) => {
                        report.replicas_copied += 1;
                        replicas.push(target);
                    }
                    Err(problem) => {
                        report.problems.push(problem);
                        break;
                    }
                }
            }
            // Keep the lost replicas that were not replaced: a draining node still serves.
            let replaced = replicas.len() - record.replicas.iter().filter(|r| !lost(r)).count();
            let mut unreplaced: Vec<String> = record
                .replicas
                .iter()
                .filter(|r| lost(r))
                .skip(replaced)
                .cloned()
                .collect();
            if replaced == 0 {
                continue;
            }
            replicas.append(&mut unreplaced);
            let updated = ChunkRecord {
                replicas,
                ..record.clone()
            };
            let mut txn = Txn::new();
            txn.check(Check::At(entry.key.clone(), entry.revision))
                .put(entry.key.clone(), model::encode(&updated));
            if let Outcome::Committed(_) = self.store.commit(&txn).await? {
                moved_chunks.insert(*id);
                tracing::info!(chunk = %id, replicas = ?updated.replicas, "chunk re-replicated");
            }
        }
        if !moved_chunks.is_empty() {
            for entry in self.store.scan(model::VERSIONS_PREFIX).await? {
                let version: FileVersion = model::decode(&entry.key, &entry.value)?;
                if version.chunks.iter().any(|c| moved_chunks.contains(&c.id))
                    && let Some((file, _)) = version_of_key(&entry.key)
                {
                    moved_files.insert(file);
                }
            }
            self.bump_layouts(&moved_files).await?;
        }
        // A draining node that no chunk names any more is drained.
        let still_named: HashSet<String> = self
            .chunk_records(model::CHUNKS_PREFIX)
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
    /// old replicas are refreshed.
    async fn bump_layouts(&self, files: &HashSet<u64>) -> Result<()> {
        if files.is_empty() {
            return Ok(());
        }
        for entry in self.store.scan(model::INODES_PREFIX).await? {
            let mut inode: Inode = model::decode(&entry.key, &entry.value)?;
            if !files.contains(&inode.id) {
                continue;
            }
            let InodeKind::File(state) = &mut inode.kind else {
                continue;
            };
            state.layout_version += 1;
            let fence = model::encode(&state.layout_version);
            let mut txn = Txn::new();
            txn.check(Check::At(entry.key.clone(), entry.revision))
                .put(entry.key.clone(), model::encode(&inode))
                .put(model::fence_key(inode.id), fence);
            // A conflict means the file changed (a commit bumps the layout version itself).
            self.store.commit(&txn).await?;
        }
        Ok(())
    }

    async fn copy(&self, chunk: ChunkId, len: u32, from: String, to: String) -> Result<(), String> {
        let token = self.token.clone();
        let timeout = self.timeout;
        tokio::task::spawn_blocking(move || {
            let mut source = DaemonConnection::connect(&from, &token, "tier0-control", timeout)
                .map_err(|e| format!("chunk {chunk}: reading from {from}: {e}"))?;
            let mut data = vec![0u8; len as usize];
            source
                .read_into(chunk, 0, &mut data)
                .map_err(|e| format!("chunk {chunk}: reading from {from}: {e}"))?;
            let mut target = DaemonConnection::connect(&to, &token, "tier0-control", timeout)
                .map_err(|e| format!("chunk {chunk}: writing to {to}: {e}"))?;
            match target.write(chunk, &data) {
                Ok(()) => Ok(()),
                // Chunks are immutable and written atomically: there already means complete.
                Err(error) if error.errno() == libc::EEXIST => Ok(()),
                Err(error) => Err(format!("chunk {chunk}: writing to {to}: {error}")),
            }
        })
        .await
        .map_err(|e| format!("chunk {chunk}: copy task failed: {e}"))?
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
    /// (to the trash), then the trashed chunks' replicas on the daemons.
    pub async fn collect(&self, report: &mut UpkeepReport) -> Result<()> {
        // Ids above the counter were handed out after this point: their files are too new
        // to judge from the scan below.
        let counter: u64 = match self.store.get(model::INODE_COUNTER_KEY).await? {
            Some(entry) => model::decode(&entry.key, &entry.value)?,
            None => model::ROOT_ID,
        };
        let mut current: HashMap<u64, (Entry, u64)> = HashMap::new();
        for entry in self.store.scan(model::INODES_PREFIX).await? {
            let inode: Inode = model::decode(&entry.key, &entry.value)?;
            if let InodeKind::File(state) = &inode.kind {
                current.insert(inode.id, (entry, state.version));
            }
        }
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
            let is_current = current.get(&file).is_some_and(|(_, v)| *v == version);
            if file > counter || is_current || pinned.contains(&(file, version)) {
                continue;
            }
            doomed.entry(file).or_default().push(entry);
        }
        for (file, versions) in doomed {
            let mut txn = Txn::new();
            // The file must not have changed since it was read (a rollback may have made
            // one of these versions current again).
            if let Some((inode, _)) = current.get(&file) {
                txn.check(Check::At(inode.key.clone(), inode.revision));
            }
            for version in &versions {
                txn.check(Check::At(version.key.clone(), version.revision))
                    .delete(version.key.clone());
            }
            if let Outcome::Committed(_) = self.store.commit(&txn).await? {
                report.versions_collected += versions.len() as u64;
            }
        }

        // Chunk records before the versions that keep them (see the module comment).
        let records = self.chunk_records(model::CHUNKS_PREFIX).await?;
        let mut listed: HashSet<ChunkId> = HashSet::new();
        let mut files_with_versions: HashSet<u64> = HashSet::new();
        for entry in self.store.scan(model::VERSIONS_PREFIX).await? {
            let version: FileVersion = model::decode(&entry.key, &entry.value)?;
            listed.extend(version.chunks.iter().map(|c| c.id));
            if let Some((file, _)) = version_of_key(&entry.key) {
                files_with_versions.insert(file);
            }
        }
        let now = model::now_ms();
        for (id, entry, record) in records {
            let needed = match record.state {
                ChunkState::Pending { expires_ms } => expires_ms > now || listed.contains(&id),
                ChunkState::Committed => listed.contains(&id),
            };
            if needed {
                continue;
            }
            let mut txn = Txn::new();
            txn.check(Check::At(entry.key.clone(), entry.revision))
                .delete(entry.key.clone())
                .put(model::trash_key(id), entry.value.clone());
            if let Outcome::Committed(_) = self.store.commit(&txn).await? {
                report.chunks_collected += 1;
            }
        }

        // Fences of files that are gone entirely.
        for entry in self.store.scan(model::FENCES_PREFIX).await? {
            let file = entry
                .key
                .strip_prefix(model::FENCES_PREFIX)
                .and_then(|hex| u64::from_str_radix(hex, 16).ok());
            if let Some(file) = file
                && file <= counter
                && !current.contains_key(&file)
                && !files_with_versions.contains(&file)
            {
                let mut txn = Txn::new();
                txn.check(Check::At(entry.key.clone(), entry.revision))
                    .delete(entry.key.clone());
                self.store.commit(&txn).await?;
            }
        }

        // The trash: delete every replica, then forget the chunk.
        let nodes = self.nodes().await?;
        for (id, entry, record) in self.chunk_records(model::TRASH_PREFIX).await? {
            let mut remaining = Vec::new();
            for replica in &record.replicas {
                let Some(node) = nodes.get(replica) else {
                    // A node that is no longer registered holds nothing we can reach.
                    continue;
                };
                if node.state == NodeState::Down {
                    report.problems.push(format!(
                        "chunk {id}: replica on {replica} waits for the node to come back"
                    ));
                    remaining.push(replica.clone());
                    continue;
                }
                match self.delete_replica(id, node.address.clone()).await {
                    Ok(()) => report.replicas_deleted += 1,
                    Err(problem) => {
                        report.problems.push(problem);
                        remaining.push(replica.clone());
                    }
                }
            }
            let mut txn = Txn::new();
            txn.check(Check::At(entry.key.clone(), entry.revision));
            if remaining.is_empty() {
                txn.delete(entry.key.clone());
            } else {
                let left = ChunkRecord {
                    replicas: remaining,
                    ..record
                };
                txn.put(entry.key.clone(), model::encode(&left));
            }
            self.store.commit(&txn).await?;
        }
        Ok(())
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
