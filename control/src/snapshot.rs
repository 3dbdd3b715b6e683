//! Snapshots: the versions of a subtree pinned under a name, compared and rolled back.
//!
//! A snapshot copies no data: committed chunks are immutable, so pinning a file's version
//! number pins its bytes, and garbage collection keeps every version a snapshot names. A
//! rollback is one transaction over the subtree: entries the snapshot does not have are
//! deleted, directories it has are made again, files still there as the same file are set
//! back to the pinned version (a new layout version, so cached layouts are refused), files
//! renamed within the subtree move back under their old name, and files that are gone or
//! were replaced come back as new files whose first version lists the pinned chunks.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::error::{ControlError, Result};
use crate::model::{
    self, FileState, FileVersion, Inode, InodeKind, Snapshot, SnapshotEntry, SnapshotKind,
};
use crate::namespace::{Found, Namespace};
use crate::path::NsPath;
use crate::store::{Check, Entry, Outcome, Txn};

const MAX_ATTEMPTS: usize = 16;
pub const MAX_SNAPSHOT_NAME: usize = 128;

/// How an entry differs between two states of a subtree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiffChange {
    Added,
    Removed,
    Modified,
}

impl DiffChange {
    pub fn as_str(self) -> &'static str {
        match self {
            DiffChange::Added => "added",
            DiffChange::Removed => "removed",
            DiffChange::Modified => "modified",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiffEntry {
    /// Absolute path.
    pub path: String,
    pub change: DiffChange,
    pub before: Option<SnapshotEntry>,
    pub after: Option<SnapshotEntry>,
}

/// What a rollback changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RollbackReport {
    /// Files set back to their pinned version, and entries made again.
    pub restored: usize,
    /// Entries the snapshot does not have, deleted.
    pub removed: usize,
    pub unchanged: usize,
}

pub fn check_snapshot_name(field: &str, name: &str) -> Result<()> {
    if crate::path::is_identifier(name, MAX_SNAPSHOT_NAME, b"") {
        Ok(())
    } else {
        Err(ControlError::InvalidArgument(format!(
            "{field} {name:?}: a snapshot name is 1 to {MAX_SNAPSHOT_NAME} characters of A-Z a-z 0-9 . _ -"
        )))
    }
}

fn entry_of(relative: &str, inode: &Inode) -> SnapshotEntry {
    SnapshotEntry {
        path: relative.to_owned(),
        kind: match &inode.kind {
            InodeKind::Directory { settings } => SnapshotKind::Directory {
                settings: *settings,
            },
            InodeKind::File(state) => SnapshotKind::File {
                file_id: inode.id,
                version: state.version,
                size: state.size,
                settings: state.settings,
            },
        },
        tags: inode.tags.clone(),
    }
}

/// A live file set back to its pinned `version` (and the snapshot's tags), with a new layout
/// version whose fence `txn` writes, so cached layouts of it are refused.
fn set_back(
    live: &Inode,
    version: u64,
    size: u64,
    entry: &SnapshotEntry,
    now: u64,
    txn: &mut Txn,
) -> Inode {
    let mut inode = live.clone();
    if let InodeKind::File(state) = &mut inode.kind {
        state.version = version;
        state.size = size;
        state.layout_version += 1;
        txn.put(
            model::fence_key(inode.id),
            model::encode(&state.layout_version),
        );
    }
    inode.tags = entry.tags.clone();
    inode.modified_ms = now;
    inode
}

fn absolute(base: &str, relative: &str) -> String {
    match (base, relative) {
        (base, "") => base.to_owned(),
        ("/", relative) => format!("/{relative}"),
        (base, relative) => format!("{base}/{relative}"),
    }
}

impl Namespace {
    /// The subtree at `top` as snapshot entries, with the inodes read (for checks).
    async fn capture(&self, top: &Found) -> Result<Vec<(SnapshotEntry, Found)>> {
        let mut captured = vec![(entry_of("", &top.inode), top.clone())];
        for (relative, found) in self.subtree(top).await? {
            captured.push((entry_of(&relative, &found.inode), found));
        }
        Ok(captured)
    }

    /// Pins the versions of everything at and below `path` as snapshot `name`.
    pub async fn create_snapshot(&self, name: &str, path: &NsPath) -> Result<Snapshot> {
        check_snapshot_name("name", name)?;
        let key = model::snapshot_key(name);
        for _ in 0..MAX_ATTEMPTS {
            if self.store.get(&key).await?.is_some() {
                return Err(ControlError::AlreadyExists(format!(
                    "snapshot {name}: already exists"
                )));
            }
            let top = self.resolve(path).await?;
            let captured = self.capture(&top).await?;
            let mut txn = Txn::new();
            for (_, found) in &captured {
                txn.check(found.check());
            }
            let snapshot = Snapshot {
                name: name.to_owned(),
                path: path.to_string(),
                created_ms: model::now_ms(),
                entries: captured.into_iter().map(|(entry, _)| entry).collect(),
            };
            txn.check(Check::Absent(key.clone()))
                .put(key.clone(), model::encode(&snapshot));
            if let Outcome::Committed(_) = self.store.commit(&txn).await? {
                return Ok(snapshot);
            }
        }
        Err(ControlError::FailedPrecondition(format!(
            "snapshot {name} of {path}: the subtree kept changing; try again"
        )))
    }

    /// Snapshot `name` (`field` names the request field in errors).
    pub async fn snapshot(&self, field: &str, name: &str) -> Result<Snapshot> {
        Ok(self.snapshot_entry(field, name).await?.0)
    }

    /// The snapshot and the revision it was read at.
    async fn snapshot_entry(&self, field: &str, name: &str) -> Result<(Snapshot, Entry)> {
        check_snapshot_name(field, name)?;
        let key = model::snapshot_key(name);
        match self.store.get(&key).await? {
            Some(entry) => Ok((model::decode(&entry.key, &entry.value)?, entry)),
            None => Err(ControlError::NotFound(format!(
                "snapshot {name}: no such snapshot"
            ))),
        }
    }

    /// Every snapshot, by name; with `under`, only those of paths at or below it.
    pub async fn snapshots(&self, under: Option<&NsPath>) -> Result<Vec<Snapshot>> {
        let mut snapshots = Vec::new();
        for entry in self.store.scan(model::SNAPSHOTS_PREFIX).await? {
            let snapshot: Snapshot = model::decode(&entry.key, &entry.value)?;
            let keep = match under {
                None => true,
                Some(under) => NsPath::parse("snapshot path", &snapshot.path)
                    .is_ok_and(|path| path.starts_with(under)),
            };
            if keep {
                snapshots.push(snapshot);
            }
        }
        Ok(snapshots)
    }

    /// Unpins a snapshot: what only it kept becomes garbage.
    pub async fn delete_snapshot(&self, name: &str) -> Result<()> {
        let key = model::snapshot_key(name);
        check_snapshot_name("name", name)?;
        let Some(entry) = self.store.get(&key).await? else {
            return Err(ControlError::NotFound(format!(
                "snapshot {name}: no such snapshot"
            )));
        };
        let mut txn = Txn::new();
        txn.check(Check::At(key.clone(), entry.revision))
            .delete(key);
        match self.store.commit(&txn).await? {
            Outcome::Committed(_) => Ok(()),
            Outcome::Conflict => Err(ControlError::FailedPrecondition(format!(
                "snapshot {name}: changed while being deleted; try again"
            ))),
        }
    }

    /// How the subtree changed from snapshot `from` to snapshot `to`, or to the live
    /// namespace when `to` is `None`. Entries in path order.
    pub async fn diff(&self, from: &str, to: Option<&str>) -> Result<Vec<DiffEntry>> {
        let before = self.snapshot("from", from).await?;
        let after: Vec<SnapshotEntry> = match to {
            Some(to) => {
                let after = self.snapshot("to", to).await?;
                if after.path != before.path {
                    return Err(ControlError::InvalidArgument(format!(
                        "snapshot {from} is of {}, snapshot {to} of {}: diff needs the same path",
                        before.path, after.path
                    )));
                }
                after.entries
            }
            None => {
                let path = NsPath::parse("snapshot path", &before.path)?;
                match self.resolve(&path).await {
                    Ok(top) => self
                        .capture(&top)
                        .await?
                        .into_iter()
                        .map(|(entry, _)| entry)
                        .collect(),
                    Err(ControlError::NotFound(_)) => Vec::new(),
                    Err(error) => return Err(error),
                }
            }
        };
        let old: BTreeMap<&str, &SnapshotEntry> = before
            .entries
            .iter()
            .map(|e| (e.path.as_str(), e))
            .collect();
        let new: BTreeMap<&str, &SnapshotEntry> =
            after.iter().map(|e| (e.path.as_str(), e)).collect();
        let paths: std::collections::BTreeSet<&str> =
            old.keys().chain(new.keys()).copied().collect();
        let mut diff = Vec::new();
        for path in paths {
            let change = match (old.get(path), new.get(path)) {
                (Some(_), None) => DiffChange::Removed,
                (None, Some(_)) => DiffChange::Added,
                (Some(a), Some(b)) if a != b => DiffChange::Modified,
                _ => continue,
            };
            diff.push(DiffEntry {
                path: absolute(&before.path, path),
                change,
                before: old.get(path).map(|e| (*e).clone()),
                after: new.get(path).map(|e| (*e).clone()),
            });
        }
        Ok(diff)
    }

    /// Restores the subtree to snapshot `name`, in one transaction.
    pub async fn rollback(&self, name: &str) -> Result<RollbackReport> {
        self.rollback_expecting(name, None).await
    }

    /// [`rollback`](Self::rollback), refused (`FailedPrecondition`) unless the snapshot
    /// named `name` is still `expected` (its path and creation time): a caller that checked
    /// the snapshot's path against a policy rolls back that snapshot, not one re-created
    /// under its name meanwhile.
    pub async fn rollback_expecting(
        &self,
        name: &str,
        expected: Option<&crate::model::Snapshot>,
    ) -> Result<RollbackReport> {
        for _ in 0..MAX_ATTEMPTS {
            // Read in every attempt and checked by its transaction: a snapshot deleted
            // meanwhile no longer pins what the rollback would restore.
            let (snapshot, entry) = self.snapshot_entry("name", name).await?;
            if let Some(expected) = expected
                && (expected.path != snapshot.path || expected.created_ms != snapshot.created_ms)
            {
                return Err(ControlError::FailedPrecondition(format!(
                    "rollback to {name}: the snapshot changed since it was checked (now of {})",
                    snapshot.path
                )));
            }
            let top_path = NsPath::parse("snapshot path", &snapshot.path)?;
            if let Some(report) = self.try_rollback(&snapshot, &entry, &top_path).await? {
                return Ok(report);
            }
        }
        let snapshot = self.snapshot("name", name).await?;
        Err(ControlError::FailedPrecondition(format!(
            "rollback to {name}: {} kept changing; try again",
            snapshot.path
        )))
    }

    /// One attempt; `None` on a conflict.
    async fn try_rollback(
        &self,
        snapshot: &Snapshot,
        pinned: &Entry,
        top_path: &NsPath,
    ) -> Result<Option<RollbackReport>> {
        let now = model::now_ms();
        let mut txn = Txn::new();
        txn.check(Check::At(pinned.key.clone(), pinned.revision));
        let mut report = RollbackReport::default();
        // The live subtree, by path relative to the top.
        let mut live: HashMap<String, Found> = HashMap::new();
        let top_parent = match top_path.split() {
            Some((parent_path, _)) => {
                let parent = self
                    .resolve(&parent_path)
                    .await
                    .map_err(|error| match error {
                        ControlError::NotFound(_) => ControlError::FailedPrecondition(format!(
                            "rollback to {}: {parent_path} no longer exists; make it first",
                            snapshot.name
                        )),
                        other => other,
                    })?;
                if !parent.inode.is_dir() {
                    return Err(ControlError::FailedPrecondition(format!(
                        "rollback to {}: {parent_path} is now a file",
                        snapshot.name
                    )));
                }
                txn.check(parent.check());
                Some(parent)
            }
            None => None,
        };
        match self.resolve(top_path).await {
            Ok(top) => {
                for (relative, found) in self.subtree(&top).await? {
                    live.insert(relative, found);
                }
                live.insert(String::new(), top);
            }
            Err(ControlError::NotFound(_)) => {}
            Err(error) => return Err(error),
        }
        for found in live.values() {
            txn.check(found.check());
        }
        let wanted: HashSet<&str> = snapshot.entries.iter().map(|e| e.path.as_str()).collect();
        // Ids of the restored tree's directories, by relative path.
        let mut ids: HashMap<String, u64> = HashMap::new();
        let mut allocator = self.id_allocator().await?;
        let mut put_keys: HashSet<String> = HashSet::new();
        let mut deletes: Vec<String> = Vec::new();
        // Files of the snapshot still in the subtree under another name move back, keeping
        // their id (a rename rolled back); `claimed` are those already moved.
        let live_files: HashMap<u64, &Found> = live
            .values()
            .filter(|found| !found.inode.is_dir())
            .map(|found| (found.inode.id, found))
            .collect();
        let mut claimed: HashSet<u64> = HashSet::new();
        for entry in &snapshot.entries {
            let (parent_id, name) = if entry.path.is_empty() {
                let parent = top_parent.as_ref().map(|p| p.inode.id).unwrap_or(0);
                (parent, top_path.split().map(|(_, n)| n).unwrap_or(""))
            } else {
                let (parent_rel, name) = entry.path.rsplit_once('/').unwrap_or(("", &entry.path));
                let Some(parent) = ids.get(parent_rel) else {
                    return Err(ControlError::Internal(format!(
                        "snapshot {}: entry {:?} comes before its parent",
                        snapshot.name, entry.path
                    )));
                };
                (*parent, name)
            };
            let existing = live
                .get(&entry.path)
                .filter(|found| found.inode.parent == parent_id);
            match (&entry.kind, existing) {
                (SnapshotKind::Directory { .. }, Some(found)) if found.inode.is_dir() => {
                    ids.insert(entry.path.clone(), found.inode.id);
                    if found.inode.tags == entry.tags {
                        report.unchanged += 1;
                        continue;
                    }
                    let mut inode = found.inode.clone();
                    inode.tags = entry.tags.clone();
                    inode.modified_ms = now;
                    txn.put(found.key.clone(), model::encode(&inode));
                    put_keys.insert(found.key.clone());
                    report.restored += 1;
                }
                (
                    SnapshotKind::File {
                        file_id,
                        version,
                        size,
                        ..
                    },
                    Some(found),
                ) if found.inode.id == *file_id => {
                    let state = found.inode.file().expect("same id, so a file");
                    if state.version == *version && found.inode.tags == entry.tags {
                        report.unchanged += 1;
                        continue;
                    }
                    let inode = set_back(&found.inode, *version, *size, entry, now, &mut txn);
                    txn.put(found.key.clone(), model::encode(&inode));
                    put_keys.insert(found.key.clone());
                    report.restored += 1;
                }
                (
                    SnapshotKind::File {
                        file_id,
                        version,
                        size,
                        ..
                    },
                    _,
                ) if live_files.contains_key(file_id) && !claimed.contains(file_id) => {
                    if let Some(found) = live.get(&entry.path) {
                        deletes.push(found.key.clone());
                    }
                    let source = live_files[file_id];
                    claimed.insert(*file_id);
                    deletes.push(source.key.clone());
                    let mut inode = set_back(&source.inode, *version, *size, entry, now, &mut txn);
                    inode.parent = parent_id;
                    inode.name = name.to_owned();
                    let key = model::inode_key(parent_id, name);
                    txn.put(key.clone(), model::encode(&inode));
                    put_keys.insert(key);
                    report.restored += 1;
                }
                _ => {
                    // Gone, or something else is there now: it comes back as a new inode
                    // (a file as a new file whose version 1 lists the pinned chunks).
                    if let Some(found) = live.get(&entry.path) {
                        deletes.push(found.key.clone());
                    }
                    let id = allocator.next();
                    let kind = match &entry.kind {
                        SnapshotKind::Directory { settings } => {
                            ids.insert(entry.path.clone(), id);
                            InodeKind::Directory {
                                settings: *settings,
                            }
                        }
                        SnapshotKind::File {
                            file_id,
                            version,
                            size,
                            settings,
                        } => {
                            if *version > 0 {
                                let pinned = self.read_version(*file_id, *version).await?;
                                let copy = FileVersion {
                                    version: 1,
                                    committed_ms: now,
                                    ..pinned
                                };
                                txn.put(model::version_key(id, 1), model::encode(&copy));
                            }
                            InodeKind::File(FileState {
                                version: u64::from(*version > 0),
                                next_version: 2,
                                layout_version: 1,
                                size: *size,
                                settings: *settings,
                                next_generation: 1,
                                committed_generation: 0,
                            })
                        }
                    };
                    let inode = Inode {
                        id,
                        parent: parent_id,
                        name: name.to_owned(),
                        kind,
                        tags: entry.tags.clone(),
                        created_ms: now,
                        modified_ms: now,
                    };
                    let key = model::inode_key(parent_id, name);
                    txn.put(key.clone(), model::encode(&inode));
                    put_keys.insert(key);
                    report.restored += 1;
                }
            }
        }
        for (relative, found) in &live {
            let moved = !found.inode.is_dir() && claimed.contains(&found.inode.id);
            if !wanted.contains(relative.as_str()) && !moved {
                deletes.push(found.key.clone());
                report.removed += 1;
            }
        }
        deletes.sort();
        deletes.dedup();
        allocator.finish(&mut txn);
        for key in deletes {
            if !put_keys.contains(&key) {
                txn.delete(key);
            }
        }
        if txn.is_empty() {
            return Ok(Some(report));
        }
        if let Some(parent) = &top_parent
            && !put_keys.contains(&parent.key)
        {
            let mut touched = parent.inode.clone();
            touched.modified_ms = now;
            txn.put(parent.key.clone(), model::encode(&touched));
        }
        Ok(match self.store.commit(&txn).await? {
            Outcome::Committed(_) => Some(report),
            Outcome::Conflict => None,
        })
    }
}
