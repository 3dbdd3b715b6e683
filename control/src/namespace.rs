//! The namespace: directories, files, versions and layouts, over any [`MetadataStore`].
//!
//! Every operation is read → decide → one transaction that commits only if everything it
//! read is unchanged, retried on a conflict. Two rules make that enough: a change below a
//! directory rewrites the directory (its `modified_ms`), so a concurrent delete or rename of
//! the directory conflicts instead of orphaning the child; and a file's change checks the
//! file's own record, so two commits on one version cannot both win.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tier0_dataplane::store::ChunkId;

use crate::error::{ControlError, Result};
use crate::model::{
    self, ChunkRecord, FileState, FileVersion, Inode, InodeKind, Layout, LayoutChunk, LayoutNode,
    LayoutSettings, NodeRecord, NodeState, ROOT_ID, VersionChunk,
};
use crate::path::NsPath;
use crate::placement;
use crate::store::{Check, Entry, MetadataStore, Outcome, Txn};

/// Attempts before an operation that keeps conflicting gives up (`Unavailable`).
const MAX_ATTEMPTS: usize = 64;
pub const MAX_TAG_KEY: usize = 128;
pub const MAX_TAG_VALUE: usize = 1024;
pub const MAX_TAGS: usize = 64;

/// An inode as read, with the key and revision a transaction checks it at.
#[derive(Clone, Debug)]
pub struct Found {
    pub key: String,
    pub revision: u64,
    pub inode: Inode,
}

impl Found {
    pub fn check(&self) -> Check {
        Check::At(self.key.clone(), self.revision)
    }
}

/// A path walked as far as it exists.
struct Walk<'a> {
    /// The root, then each existing component.
    found: Vec<Found>,
    /// The components that do not exist, in order.
    missing: Vec<&'a str>,
}

/// A file's stat: its inode and the versions that are still kept.
#[derive(Clone, Debug)]
pub struct Stat {
    pub path: NsPath,
    pub inode: Inode,
    pub versions: Vec<u64>,
}

/// Chunks placed for a writer: write each to every replica, then commit them.
#[derive(Clone, Debug)]
pub struct Placement {
    pub file_id: u64,
    pub chunks: Vec<LayoutChunk>,
    pub nodes: Vec<LayoutNode>,
}

/// A chunk a writer commits at `index`.
#[derive(Clone, Copy, Debug)]
pub struct CommitChunk {
    pub index: u32,
    pub id: ChunkId,
    pub len: u32,
}

/// Layout settings a request sets; the rest come from the parent directory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SettingsOverride {
    pub chunk_size: Option<u32>,
    pub replication: Option<u32>,
}

impl SettingsOverride {
    pub fn apply(&self, inherited: LayoutSettings) -> Result<LayoutSettings> {
        let settings = LayoutSettings {
            chunk_size: self.chunk_size.unwrap_or(inherited.chunk_size),
            replication: self.replication.unwrap_or(inherited.replication),
        };
        settings.check()?;
        Ok(settings)
    }

    pub fn is_empty(&self) -> bool {
        self.chunk_size.is_none() && self.replication.is_none()
    }
}

#[derive(Debug)]
pub struct Namespace {
    pub(crate) store: Arc<dyn MetadataStore>,
    /// How long a placed chunk waits for its commit before it is garbage.
    pending_ttl: Duration,
}

fn root_key() -> String {
    model::inode_key(0, "")
}

fn contended(what: &str) -> ControlError {
    ControlError::Store(crate::store::StoreError::Unavailable {
        store: "namespace".to_owned(),
        message: format!("{what}: still conflicting after {MAX_ATTEMPTS} attempts"),
    })
}

impl Namespace {
    /// The namespace over `store`, creating its root (with `defaults`) on first use.
    pub async fn new(
        store: Arc<dyn MetadataStore>,
        defaults: LayoutSettings,
        pending_ttl: Duration,
    ) -> Result<Namespace> {
        defaults.check()?;
        let namespace = Namespace { store, pending_ttl };
        if namespace.store.get(&root_key()).await?.is_none() {
            let now = model::now_ms();
            let root = Inode {
                id: ROOT_ID,
                parent: 0,
                name: String::new(),
                kind: InodeKind::Directory { settings: defaults },
                tags: BTreeMap::new(),
                created_ms: now,
                modified_ms: now,
            };
            let mut txn = Txn::new();
            txn.check(Check::Absent(root_key()))
                .put(root_key(), model::encode(&root));
            // A conflict means another control plane made the root first: also fine.
            namespace.store.commit(&txn).await?;
        }
        Ok(namespace)
    }

    pub fn store(&self) -> &Arc<dyn MetadataStore> {
        &self.store
    }

    async fn read_inode(&self, key: String) -> Result<Option<Found>> {
        Ok(match self.store.get(&key).await? {
            None => None,
            Some(entry) => Some(found(entry)?),
        })
    }

    async fn walk<'a>(&self, path: &'a NsPath) -> Result<Walk<'a>> {
        let root = self
            .read_inode(root_key())
            .await?
            .ok_or_else(|| ControlError::Internal("the namespace root is missing".to_owned()))?;
        let mut found = vec![root];
        let mut names = path.names().peekable();
        let mut so_far = NsPath::root();
        while let Some(name) = names.next() {
            let parent = found
                .last()
                .map(|f| &f.inode)
                .expect("root is always first");
            if !parent.is_dir() {
                return Err(ControlError::FailedPrecondition(format!(
                    "{so_far} is a file, not a directory"
                )));
            }
            match self.read_inode(model::inode_key(parent.id, name)).await? {
                Some(next) => found.push(next),
                None => {
                    let mut missing = vec![name];
                    missing.extend(names);
                    return Ok(Walk { found, missing });
                }
            }
            so_far = so_far.join(name);
        }
        Ok(Walk {
            found,
            missing: Vec::new(),
        })
    }

    /// The inode at `path`, or `NotFound`.
    pub async fn resolve(&self, path: &NsPath) -> Result<Found> {
        let mut walk = self.walk(path).await?;
        if !walk.missing.is_empty() {
            return Err(ControlError::NotFound(format!(
                "{path}: no such file or directory"
            )));
        }
        Ok(walk.found.pop().expect("root is always found"))
    }

    /// Reserves `count` inode ids in `txn`; returns the first.
    async fn allocate_ids(&self, txn: &mut Txn, count: u64) -> Result<u64> {
        let mut ids = self.id_allocator().await?;
        let first = ids.next();
        for _ in 1..count {
            ids.next();
        }
        ids.finish(txn);
        Ok(first)
    }

    /// Hands out inode ids one by one; `finish` adds the counter's check and update.
    pub(crate) async fn id_allocator(&self) -> Result<IdAllocator> {
        let entry = self.store.get(model::INODE_COUNTER_KEY).await?;
        let last: u64 = match &entry {
            Some(entry) => model::decode(&entry.key, &entry.value)?,
            None => ROOT_ID,
        };
        Ok(IdAllocator {
            read: entry,
            last,
            handed_out: 0,
        })
    }

    /// Makes a directory; with `parents`, its missing ancestors too, and an existing
    /// directory is not an error (`mkdir -p`). Without `settings` it takes its parent's.
    pub async fn mkdir(
        &self,
        path: &NsPath,
        parents: bool,
        settings: SettingsOverride,
    ) -> Result<Inode> {
        settings.apply(LayoutSettings::default())?;
        for _ in 0..MAX_ATTEMPTS {
            let walk = self.walk(path).await?;
            let deepest = walk.found.last().expect("root is always found");
            if walk.missing.is_empty() {
                if parents && deepest.inode.is_dir() {
                    return Ok(deepest.inode.clone());
                }
                return Err(ControlError::AlreadyExists(format!(
                    "{path}: already exists"
                )));
            }
            if walk.missing.len() > 1 && !parents {
                let (parent, _) = path.split().expect("a missing path is not the root");
                return Err(ControlError::NotFound(format!(
                    "{parent}: no such directory (make it first, or pass parents)"
                )));
            }
            let InodeKind::Directory {
                settings: inherited,
            } = deepest.inode.kind
            else {
                return Err(ControlError::FailedPrecondition(format!(
                    "{}: is a file",
                    deepest.inode.name
                )));
            };
            let mut txn = Txn::new();
            let first_id = self
                .allocate_ids(&mut txn, walk.missing.len() as u64)
                .await?;
            let now = model::now_ms();
            txn.check(deepest.check()).put(
                deepest.key.clone(),
                model::encode(&touched(&deepest.inode, now)),
            );
            let mut parent = deepest.inode.id;
            let mut made = None;
            for (offset, name) in walk.missing.iter().enumerate() {
                let last = offset + 1 == walk.missing.len();
                let inode = Inode {
                    id: first_id + offset as u64,
                    parent,
                    name: (*name).to_owned(),
                    kind: InodeKind::Directory {
                        settings: if last {
                            settings.apply(inherited)?
                        } else {
                            inherited
                        },
                    },
                    tags: BTreeMap::new(),
                    created_ms: now,
                    modified_ms: now,
                };
                let key = model::inode_key(parent, name);
                txn.check(Check::Absent(key.clone()))
                    .put(key, model::encode(&inode));
                parent = inode.id;
                made = Some(inode);
            }
            if let Outcome::Committed(_) = self.store.commit(&txn).await? {
                return Ok(made.expect("at least one directory was missing"));
            }
        }
        Err(contended(&format!("mkdir {path}")))
    }

    /// Makes an empty file (version 0). An existing file is returned as it is unless
    /// `exclusive`; the parent must exist.
    pub async fn create(
        &self,
        path: &NsPath,
        settings: SettingsOverride,
        exclusive: bool,
    ) -> Result<Inode> {
        settings.apply(LayoutSettings::default())?;
        let Some((parent_path, name)) = path.split() else {
            return Err(ControlError::AlreadyExists(
                "/: is the root directory".to_owned(),
            ));
        };
        for _ in 0..MAX_ATTEMPTS {
            let parent = self.resolve(&parent_path).await?;
            let InodeKind::Directory {
                settings: inherited,
            } = parent.inode.kind
            else {
                return Err(ControlError::FailedPrecondition(format!(
                    "{parent_path}: is a file, not a directory"
                )));
            };
            let key = model::inode_key(parent.inode.id, name);
            if let Some(existing) = self.read_inode(key.clone()).await? {
                if existing.inode.is_dir() {
                    return Err(ControlError::AlreadyExists(format!(
                        "{path}: is a directory"
                    )));
                }
                if exclusive {
                    return Err(ControlError::AlreadyExists(format!(
                        "{path}: already exists"
                    )));
                }
                return Ok(existing.inode);
            }
            let mut txn = Txn::new();
            let id = self.allocate_ids(&mut txn, 1).await?;
            let now = model::now_ms();
            let inode = Inode {
                id,
                parent: parent.inode.id,
                name: name.to_owned(),
                kind: InodeKind::File(FileState {
                    version: 0,
                    next_version: 1,
                    layout_version: 1,
                    size: 0,
                    settings: settings.apply(inherited)?,
                    next_generation: 1,
                    committed_generation: 0,
                }),
                tags: BTreeMap::new(),
                created_ms: now,
                modified_ms: now,
            };
            txn.check(parent.check())
                .put(
                    parent.key.clone(),
                    model::encode(&touched(&parent.inode, now)),
                )
                .check(Check::Absent(key.clone()))
                .put(key, model::encode(&inode));
            if let Outcome::Committed(_) = self.store.commit(&txn).await? {
                return Ok(inode);
            }
        }
        Err(contended(&format!("create {path}")))
    }

    /// A file's inode, refusing directories and, when `file_id` is given, a file that has
    /// been replaced since.
    async fn resolve_file(&self, path: &NsPath, file_id: Option<u64>) -> Result<Found> {
        let found = self.resolve(path).await?;
        if found.inode.is_dir() {
            return Err(ControlError::FailedPrecondition(format!(
                "{path}: is a directory"
            )));
        }
        if let Some(id) = file_id
            && id != found.inode.id
        {
            return Err(ControlError::FailedPrecondition(format!(
                "{path}: is now file {:x}, not {id:x} (it was replaced; reopen it)",
                found.inode.id
            )));
        }
        Ok(found)
    }

    /// The layout of `version` of the file at `path` (the current one when `None`).
    pub async fn open(&self, path: &NsPath, version: Option<u64>) -> Result<Layout> {
        let found = self.resolve_file(path, None).await?;
        let state = found.inode.file().expect("resolve_file returns files");
        let version = version.unwrap_or(state.version);
        self.layout(path, &found.inode, version).await
    }

    pub(crate) async fn read_version(&self, file: u64, version: u64) -> Result<FileVersion> {
        let key = model::version_key(file, version);
        match self.store.get(&key).await? {
            Some(entry) => model::decode(&entry.key, &entry.value),
            None => Err(ControlError::NotFound(format!(
                "file {file:x} has no version {version} (never committed, or collected)"
            ))),
        }
    }

    async fn layout(&self, path: &NsPath, inode: &Inode, version: u64) -> Result<Layout> {
        let state = inode.file().expect("layouts are of files");
        let record = if version == 0 {
            FileVersion {
                version: 0,
                size: 0,
                chunk_size: state.settings.chunk_size,
                committed_ms: inode.created_ms,
                chunks: Vec::new(),
            }
        } else {
            self.read_version(inode.id, version).await?
        };
        let placements = self.chunk_records(&record.chunks).await?;
        self.assemble(path, inode, &record, &placements).await
    }

    /// The layout of `record` (a version of `inode`) from its chunks' placement records.
    async fn assemble(
        &self,
        path: &NsPath,
        inode: &Inode,
        record: &FileVersion,
        placements: &HashMap<ChunkId, (Entry, ChunkRecord)>,
    ) -> Result<Layout> {
        let state = inode.file().expect("layouts are of files");
        let version = record.version;
        let mut chunks = Vec::with_capacity(record.chunks.len());
        let mut named = HashSet::new();
        for (index, chunk) in record.chunks.iter().enumerate() {
            let replicas = placements
                .get(&chunk.id)
                .map(|(_, record)| record.replicas.clone())
                .ok_or_else(|| {
                    ControlError::Internal(format!(
                        "{path} version {version}: chunk {} has no placement record",
                        chunk.id
                    ))
                })?;
            named.extend(replicas.iter().cloned());
            chunks.push(LayoutChunk {
                index: index as u32,
                id: chunk.id,
                len: chunk.len,
                replicas,
            });
        }
        let nodes = self.layout_nodes(&named).await?;
        Ok(Layout {
            path: path.to_string(),
            file_id: inode.id,
            version,
            layout_version: state.layout_version,
            size: record.size,
            chunk_size: record.chunk_size,
            replication: state.settings.replication,
            chunks,
            nodes,
        })
    }

    /// The placement records of `chunks`, with their revisions.
    pub(crate) async fn chunk_records(
        &self,
        chunks: &[VersionChunk],
    ) -> Result<HashMap<ChunkId, (Entry, ChunkRecord)>> {
        let files: HashSet<u64> = chunks.iter().map(|chunk| chunk.id.file).collect();
        let wanted: HashSet<ChunkId> = chunks.iter().map(|chunk| chunk.id).collect();
        let mut records = HashMap::new();
        for file in files {
            for entry in self.store.scan(&model::chunks_prefix(file)).await? {
                let id = parse_chunk_key(&entry.key)?;
                if wanted.contains(&id) {
                    let record: ChunkRecord = model::decode(&entry.key, &entry.value)?;
                    records.insert(id, (entry, record));
                }
            }
        }
        Ok(records)
    }

    pub(crate) async fn nodes(&self) -> Result<Vec<NodeRecord>> {
        let mut nodes = Vec::new();
        for entry in self.store.scan(model::NODES_PREFIX).await? {
            nodes.push(model::decode(&entry.key, &entry.value)?);
        }
        Ok(nodes)
    }

    async fn layout_nodes(&self, named: &HashSet<String>) -> Result<Vec<LayoutNode>> {
        Ok(self
            .nodes()
            .await?
            .into_iter()
            .filter(|node| named.contains(&node.id))
            .map(|node| LayoutNode {
                failure_domain: node.failure_domain().to_owned(),
                id: node.id,
                address: node.address,
                state: node.state,
            })
            .collect())
    }

    /// Places chunks `first_index ..` (`count` of them) of a file that is being written: a
    /// fresh generation, replicas on distinct up nodes (and distinct failure domains when
    /// there are enough), striped from a start that depends on the file. The chunks are
    /// pending until a commit names them.
    pub async fn place_chunks(
        &self,
        path: &NsPath,
        file_id: u64,
        first_index: u32,
        count: u32,
    ) -> Result<Placement> {
        if count == 0 || count > placement::MAX_CHUNKS_PER_PLACEMENT {
            return Err(ControlError::InvalidArgument(format!(
                "count {count}: must be 1 to {}",
                placement::MAX_CHUNKS_PER_PLACEMENT
            )));
        }
        if first_index.checked_add(count).is_none() {
            return Err(ControlError::InvalidArgument(format!(
                "first_index {first_index} + count {count} overflows the chunk index"
            )));
        }
        for _ in 0..MAX_ATTEMPTS {
            let found = self.resolve_file(path, Some(file_id)).await?;
            let mut inode = found.inode.clone();
            let InodeKind::File(state) = &mut inode.kind else {
                unreachable!("resolve_file returns files")
            };
            let generation = state.next_generation;
            state.next_generation = generation.checked_add(1).ok_or_else(|| {
                ControlError::FailedPrecondition(format!("{path}: out of chunk generations"))
            })?;
            let nodes = self.nodes().await?;
            let replicas = placement::place(
                &nodes,
                state.settings.replication,
                file_id,
                first_index,
                count,
            )?;
            let expires_ms = model::now_ms() + self.pending_ttl.as_millis() as u64;
            let mut txn = Txn::new();
            txn.check(found.check())
                .put(found.key.clone(), model::encode(&inode));
            let mut chunks = Vec::with_capacity(count as usize);
            for (offset, replicas) in replicas.into_iter().enumerate() {
                let index = first_index + offset as u32;
                let id = ChunkId {
                    file: file_id,
                    index,
                    generation,
                };
                let record = ChunkRecord {
                    replicas: replicas.clone(),
                    expires_ms,
                };
                txn.put(model::chunk_key(id), model::encode(&record));
                chunks.push(LayoutChunk {
                    index,
                    id,
                    len: 0,
                    replicas,
                });
            }
            if let Outcome::Committed(_) = self.store.commit(&txn).await? {
                let named = chunks
                    .iter()
                    .flat_map(|c| c.replicas.iter().cloned())
                    .collect();
                return Ok(Placement {
                    file_id,
                    chunks,
                    nodes: self.layout_nodes(&named).await?,
                });
            }
        }
        Err(contended(&format!("place chunks of {path}")))
    }

    /// Publishes a new version of a file atomically: `size` bytes in `chunks` (indexes
    /// `0..⌈size / chunk_size⌉`, each once), on top of `base_version`, which must still be
    /// the current one. A chunk is either the base version's chunk at that index or one
    /// placed for this file at that index.
    pub async fn commit(
        &self,
        path: &NsPath,
        file_id: u64,
        base_version: u64,
        size: u64,
        mut chunks: Vec<CommitChunk>,
    ) -> Result<Layout> {
        chunks.sort_by_key(|chunk| chunk.index);
        for _ in 0..MAX_ATTEMPTS {
            let found = self.resolve_file(path, Some(file_id)).await?;
            let mut inode = found.inode.clone();
            let InodeKind::File(state) = &mut inode.kind else {
                unreachable!("resolve_file returns files")
            };
            if state.version != base_version {
                return Err(ControlError::FailedPrecondition(format!(
                    "{path}: version {} is current, this commit was based on {base_version} \
                     (another writer committed first; reopen and retry)",
                    state.version
                )));
            }
            let chunk_size = state.settings.chunk_size;
            check_chunk_lengths(size, chunk_size, &chunks)?;
            let base = if base_version == 0 {
                Vec::new()
            } else {
                self.read_version(file_id, base_version).await?.chunks
            };
            let listed: Vec<VersionChunk> = chunks
                .iter()
                .map(|chunk| VersionChunk {
                    id: chunk.id,
                    len: chunk.len,
                })
                .collect();
            // Every chunk must have a placement record; the transaction needs no check on
            // them: collection rewrites the file's inode when it removes a chunk of the
            // file, so a commit that read a record collection then removed conflicts.
            let records = self.chunk_records(&listed).await?;
            for chunk in &chunks {
                let reused = base
                    .get(chunk.index as usize)
                    .is_some_and(|old| old.id == chunk.id && old.len == chunk.len);
                if !reused && (chunk.id.file != file_id || chunk.id.index != chunk.index) {
                    return Err(ControlError::InvalidArgument(format!(
                        "chunk {} at index {}: a commit lists the base version's chunk at that \
                         index or one placed for file {file_id:x} at that index",
                        chunk.id, chunk.index
                    )));
                }
                if !records.contains_key(&chunk.id) {
                    return Err(ControlError::FailedPrecondition(format!(
                        "{path}: chunk {} was never placed, or was collected",
                        chunk.id
                    )));
                }
            }
            let mut txn = Txn::new();
            let version = state.next_version;
            state.version = version;
            state.next_version += 1;
            state.committed_generation = state.next_generation;
            state.layout_version += 1;
            let layout_version = state.layout_version;
            state.size = size;
            inode.modified_ms = model::now_ms();
            let record = FileVersion {
                version,
                size,
                chunk_size,
                committed_ms: inode.modified_ms,
                chunks: listed,
            };
            let version_key = model::version_key(file_id, version);
            txn.check(found.check())
                .put(found.key.clone(), model::encode(&inode))
                .put(model::fence_key(file_id), model::encode(&layout_version))
                .check(Check::Absent(version_key.clone()))
                .put(version_key, model::encode(&record));
            // Built before the commit, so a committed version is never answered with an error.
            let layout = self.assemble(path, &inode, &record, &records).await?;
            if let Outcome::Committed(_) = self.store.commit(&txn).await? {
                return Ok(layout);
            }
        }
        Err(contended(&format!("commit {path}")))
    }

    /// The inode at `path` and, for a file, the versions still kept.
    pub async fn stat(&self, path: &NsPath) -> Result<Stat> {
        let found = self.resolve(path).await?;
        let versions = if found.inode.is_dir() {
            Vec::new()
        } else {
            self.versions(found.inode.id).await?
        };
        Ok(Stat {
            path: path.clone(),
            inode: found.inode,
            versions,
        })
    }

    /// The version numbers kept for file `file` (current and pinned ones).
    pub async fn versions_of(&self, file: u64) -> Result<Vec<u64>> {
        self.versions(file).await
    }

    pub(crate) async fn versions(&self, file: u64) -> Result<Vec<u64>> {
        let mut versions = Vec::new();
        for entry in self.store.scan(&model::versions_prefix(file)).await? {
            let text = entry.key.rsplit('/').next().unwrap_or_default();
            versions.push(u64::from_str_radix(text, 16).map_err(|_| {
                ControlError::Internal(format!("metadata key {:?} is not a version", entry.key))
            })?);
        }
        Ok(versions)
    }

    /// A directory's entries in name order; a file lists as itself.
    pub async fn list(&self, path: &NsPath) -> Result<Vec<Inode>> {
        let found = self.resolve(path).await?;
        if !found.inode.is_dir() {
            return Ok(vec![found.inode]);
        }
        Ok(self
            .children(found.inode.id)
            .await?
            .into_iter()
            .map(|child| child.inode)
            .collect())
    }

    pub(crate) async fn children(&self, id: u64) -> Result<Vec<Found>> {
        self.store
            .scan(&model::children_prefix(id))
            .await?
            .into_iter()
            .map(found)
            .collect()
    }

    /// Every inode below `top` (not `top` itself), each with its path relative to `top`,
    /// parents before children.
    pub(crate) async fn subtree(&self, top: &Found) -> Result<Vec<(String, Found)>> {
        let mut below = Vec::new();
        let mut queue = std::collections::VecDeque::from([(String::new(), top.inode.clone())]);
        while let Some((relative, inode)) = queue.pop_front() {
            if !inode.is_dir() {
                continue;
            }
            for child in self.children(inode.id).await? {
                let path = if relative.is_empty() {
                    child.inode.name.clone()
                } else {
                    format!("{relative}/{}", child.inode.name)
                };
                queue.push_back((path.clone(), child.inode.clone()));
                below.push((path, child));
            }
        }
        Ok(below)
    }

    /// The absolute paths of the files at or below `path`.
    pub async fn files_under(&self, path: &NsPath) -> Result<Vec<String>> {
        let found = self.resolve(path).await?;
        if !found.inode.is_dir() {
            return Ok(vec![path.to_string()]);
        }
        let base = path.as_str().trim_end_matches('/');
        Ok(self
            .subtree(&found)
            .await?
            .into_iter()
            .filter(|(_, child)| !child.inode.is_dir())
            .map(|(relative, _)| format!("{base}/{relative}"))
            .collect())
    }

    /// Renames `from` to `to`. A file replaces an existing file (its versions become
    /// garbage unless a snapshot pins them); anything else at `to` is an error. A directory
    /// cannot move below itself.
    pub async fn rename(&self, from: &NsPath, to: &NsPath) -> Result<Inode> {
        if from.is_root() || to.is_root() {
            return Err(ControlError::InvalidArgument(
                "the root directory cannot be renamed, nor replaced".to_owned(),
            ));
        }
        let (to_parent_path, to_name) = to.split().expect("not the root");
        for _ in 0..MAX_ATTEMPTS {
            let source = self.resolve(from).await?;
            let from_parent_path = from.split().expect("not the root").0;
            let from_parent = self.resolve(&from_parent_path).await?;
            let to_walk = self.walk(&to_parent_path).await?;
            if !to_walk.missing.is_empty() {
                return Err(ControlError::NotFound(format!(
                    "{to_parent_path}: no such directory"
                )));
            }
            if to_walk
                .found
                .iter()
                .any(|ancestor| ancestor.inode.id == source.inode.id)
            {
                return Err(ControlError::InvalidArgument(format!(
                    "cannot move {from} into itself ({to})"
                )));
            }
            let to_parent = to_walk.found.last().expect("root is always found").clone();
            if !to_parent.inode.is_dir() {
                return Err(ControlError::FailedPrecondition(format!(
                    "{to_parent_path}: is a file, not a directory"
                )));
            }
            let to_key = model::inode_key(to_parent.inode.id, to_name);
            if to_key == source.key {
                return Ok(source.inode);
            }
            let mut txn = Txn::new();
            // Every ancestor of the destination as read: a concurrent rename that moves one
            // of them below the source (which would close a cycle cut off from the root)
            // rewrites its parent, which is among these, and conflicts.
            for ancestor in &to_walk.found {
                txn.check(ancestor.check());
            }
            match self.read_inode(to_key.clone()).await? {
                None => {
                    txn.check(Check::Absent(to_key.clone()));
                }
                Some(existing) if !existing.inode.is_dir() && !source.inode.is_dir() => {
                    txn.check(existing.check());
                }
                Some(_) => {
                    return Err(ControlError::AlreadyExists(format!("{to}: already exists")));
                }
            }
            let now = model::now_ms();
            let mut moved = source.inode.clone();
            moved.parent = to_parent.inode.id;
            moved.name = to_name.to_owned();
            txn.check(source.check())
                .delete(source.key.clone())
                .put(to_key, model::encode(&moved))
                .check(from_parent.check())
                .put(
                    from_parent.key.clone(),
                    model::encode(&touched(&from_parent.inode, now)),
                );
            if to_parent.key != from_parent.key {
                txn.check(to_parent.check()).put(
                    to_parent.key.clone(),
                    model::encode(&touched(&to_parent.inode, now)),
                );
            }
            if let Outcome::Committed(_) = self.store.commit(&txn).await? {
                return Ok(moved);
            }
        }
        Err(contended(&format!("rename {from} to {to}")))
    }

    /// Deletes a file, an empty directory, or with `recursive` a directory and everything
    /// below it, in one transaction. Chunks stay on the daemons until garbage collection
    /// finds no version or snapshot that needs them.
    pub async fn delete(&self, path: &NsPath, recursive: bool) -> Result<usize> {
        let Some((parent_path, _)) = path.split() else {
            return Err(ControlError::InvalidArgument(
                "the root directory cannot be deleted".to_owned(),
            ));
        };
        for _ in 0..MAX_ATTEMPTS {
            let target = self.resolve(path).await?;
            let parent = self.resolve(&parent_path).await?;
            let below = self.subtree(&target).await?;
            if !below.is_empty() && !recursive {
                return Err(ControlError::FailedPrecondition(format!(
                    "{path}: directory not empty ({} entries below; delete recursively)",
                    below.len()
                )));
            }
            let mut txn = Txn::new();
            for (_, inode) in below
                .iter()
                .map(|(p, f)| (p, f))
                .chain([(&String::new(), &target)])
            {
                txn.check(inode.check()).delete(inode.key.clone());
            }
            txn.check(parent.check()).put(
                parent.key.clone(),
                model::encode(&touched(&parent.inode, model::now_ms())),
            );
            if let Outcome::Committed(_) = self.store.commit(&txn).await? {
                return Ok(below.len() + 1);
            }
        }
        Err(contended(&format!("delete {path}")))
    }

    /// Sets and removes tags on a path.
    pub async fn tag(
        &self,
        path: &NsPath,
        set: &BTreeMap<String, String>,
        remove: &[String],
    ) -> Result<Inode> {
        for (key, value) in set {
            check_tag(key, Some(value))?;
        }
        for key in remove {
            check_tag(key, None)?;
        }
        for _ in 0..MAX_ATTEMPTS {
            let found = self.resolve(path).await?;
            let mut inode = found.inode.clone();
            for key in remove {
                inode.tags.remove(key);
            }
            inode
                .tags
                .extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
            if inode.tags.len() > MAX_TAGS {
                return Err(ControlError::InvalidArgument(format!(
                    "{path}: {} tags, at most {MAX_TAGS}",
                    inode.tags.len()
                )));
            }
            inode.modified_ms = model::now_ms();
            let mut txn = Txn::new();
            txn.check(found.check())
                .put(found.key.clone(), model::encode(&inode));
            if let Outcome::Committed(_) = self.store.commit(&txn).await? {
                return Ok(inode);
            }
        }
        Err(contended(&format!("tag {path}")))
    }

    /// Nodes a layout may name, by id (for admin listings).
    pub async fn node_states(&self) -> Result<BTreeMap<String, NodeState>> {
        Ok(self
            .nodes()
            .await?
            .into_iter()
            .map(|node| (node.id, node.state))
            .collect())
    }
}

/// Inode ids taken from the counter as they are needed, within one transaction.
pub(crate) struct IdAllocator {
    read: Option<Entry>,
    last: u64,
    handed_out: u64,
}

impl IdAllocator {
    pub(crate) fn next(&mut self) -> u64 {
        self.handed_out += 1;
        self.last + self.handed_out
    }

    /// The commit must find the counter as it was read, and leaves it past every id handed out.
    pub(crate) fn finish(self, txn: &mut Txn) {
        if self.handed_out == 0 {
            return;
        }
        txn.check(Check::unchanged(
            model::INODE_COUNTER_KEY,
            self.read.as_ref(),
        ))
        .put(
            model::INODE_COUNTER_KEY,
            model::encode(&(self.last + self.handed_out)),
        );
    }
}

pub(crate) fn found(entry: Entry) -> Result<Found> {
    let inode = model::decode(&entry.key, &entry.value)?;
    Ok(Found {
        key: entry.key,
        revision: entry.revision,
        inode,
    })
}

fn touched(inode: &Inode, now: u64) -> Inode {
    let mut inode = inode.clone();
    inode.modified_ms = now;
    inode
}

pub(crate) fn parse_chunk_key(key: &str) -> Result<ChunkId> {
    let bad = || ControlError::Internal(format!("metadata key {key:?} is not a chunk"));
    let rest = key
        .strip_prefix(model::CHUNKS_PREFIX)
        .or_else(|| key.strip_prefix(model::TRASH_PREFIX))
        .ok_or_else(bad)?;
    let mut parts = rest.split('/');
    let mut next = || parts.next().ok_or_else(bad);
    let file = u64::from_str_radix(next()?, 16).map_err(|_| bad())?;
    let index = u32::from_str_radix(next()?, 16).map_err(|_| bad())?;
    let generation = u32::from_str_radix(next()?, 16).map_err(|_| bad())?;
    Ok(ChunkId {
        file,
        index,
        generation,
    })
}

/// A commit's chunks must tile `size` exactly: indexes 0..n each once, every chunk full but
/// the last.
fn check_chunk_lengths(size: u64, chunk_size: u32, chunks: &[CommitChunk]) -> Result<()> {
    let expected = size.div_ceil(chunk_size as u64);
    if chunks.len() as u64 != expected {
        return Err(ControlError::InvalidArgument(format!(
            "size {size} at chunk size {chunk_size} needs {expected} chunks, the commit lists {}",
            chunks.len()
        )));
    }
    for (position, chunk) in chunks.iter().enumerate() {
        if chunk.index as usize != position {
            return Err(ControlError::InvalidArgument(format!(
                "chunk index {} is listed twice or out of range (expected {position})",
                chunk.index
            )));
        }
        let start = position as u64 * chunk_size as u64;
        let want = (size - start).min(chunk_size as u64) as u32;
        if chunk.len != want {
            return Err(ControlError::InvalidArgument(format!(
                "chunk {} at index {position} is {} bytes, the file's size makes it {want}",
                chunk.id, chunk.len
            )));
        }
    }
    Ok(())
}

fn check_tag(key: &str, value: Option<&String>) -> Result<()> {
    if !crate::path::is_identifier(key, MAX_TAG_KEY, b"/:") {
        return Err(ControlError::InvalidArgument(format!(
            "tag key {key:?}: 1 to {MAX_TAG_KEY} characters of A-Z a-z 0-9 . _ - / :"
        )));
    }
    if let Some(value) = value
        && value.len() > MAX_TAG_VALUE
    {
        return Err(ControlError::InvalidArgument(format!(
            "tag {key:?}: value longer than {MAX_TAG_VALUE} bytes"
        )));
    }
    Ok(())
}
