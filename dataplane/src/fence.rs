//! Layout fences: per file, the lowest layout version a daemon still serves reads at.
//!
//! The control plane gives each file a layout version, bumped whenever its layout changes (a
//! commit, a rollback, a replica moved). A client caches the layout it opened and stamps every
//! read with it ([`LayoutRef`]); once the control plane tells a daemon that file `f` is at
//! version `v`, the daemon refuses reads of `f` at any version below `v` with `ESTALE`, and the
//! client reopens the file (decision 2). The fence is keyed by the layout's file id, not by the
//! chunk's (a restored file reads another file's chunks), and a read at version 0 was not made
//! through a layout at all: it is never fenced.
//!
//! Reads vastly outnumber updates (fences arrive with heartbeats), so the table is a
//! read-mostly map behind a reader-writer lock. Not to be confused with fencing a connection
//! (`Transport::fence` in the client, W10), which is about memory, not layouts.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::net::wire::LayoutRef;

/// A read at a layout version the daemon has fenced off. Its text goes back to the client
/// in the `ESTALE` error reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("file {file:x}: layout version {presented} is stale (now {current}): reopen the file")]
pub struct Stale {
    /// The layout's file id.
    pub file: u64,
    /// The version the read was made at.
    pub presented: u64,
    /// The lowest version this daemon still serves for that file.
    pub current: u64,
}

/// File id → lowest layout version still valid, shared by a daemon's request sources (which
/// check every read against it) and whoever receives fences from the control plane (which
/// raises them).
#[derive(Debug, Default)]
pub struct FenceTable {
    fences: RwLock<HashMap<u64, u64>>,
}

impl FenceTable {
    pub fn new() -> Arc<FenceTable> {
        Arc::new(FenceTable::default())
    }

    /// Reads of `file` below `version` are refused from now on. Never lowers a fence: a
    /// version older than the one in place changes nothing (fences may arrive out of order).
    pub fn raise(&self, file: u64, version: u64) {
        let mut fences = self.write();
        raise_one(&mut fences, file, version);
    }

    /// [`raise`](Self::raise) for each `(file, version)`, under one lock.
    pub fn raise_all(&self, fences: impl IntoIterator<Item = (u64, u64)>) {
        let mut table = self.write();
        for (file, version) in fences {
            raise_one(&mut table, file, version);
        }
    }

    /// Whether a read made through `layout` may be served: its version is at least the
    /// file's fence. Version 0 (not read through a layout) always passes, without a lock.
    pub fn check(&self, layout: LayoutRef) -> Result<(), Stale> {
        if !layout.is_versioned() {
            return Ok(());
        }
        match self.read().get(&layout.file) {
            Some(&current) if layout.version < current => Err(Stale {
                file: layout.file,
                presented: layout.version,
                current,
            }),
            _ => Ok(()),
        }
    }

    /// The fence of `file`, if it has one.
    pub fn get(&self, file: u64) -> Option<u64> {
        self.read().get(&file).copied()
    }

    /// Files with a fence.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    // A panic while the lock was held leaves the map as it was between two whole raises (an
    // insert either happened or did not): the data is still good, so poisoning is ignored.
    fn read(&self) -> RwLockReadGuard<'_, HashMap<u64, u64>> {
        self.fences
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<u64, u64>> {
        self.fences
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn raise_one(fences: &mut HashMap<u64, u64>, file: u64, version: u64) {
    let fence = fences.entry(file).or_insert(version);
    *fence = (*fence).max(version);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(file: u64, version: u64) -> LayoutRef {
        LayoutRef { file, version }
    }

    #[test]
    fn reads_below_the_fence_are_stale_and_the_rest_pass() {
        let table = FenceTable::new();
        assert!(table.is_empty());
        // No fence for a file: every version passes.
        assert_eq!(table.check(at(0x1a, 1)), Ok(()));
        table.raise(0x1a, 5);
        assert_eq!(table.len(), 1);
        assert_eq!(table.get(0x1a), Some(5));
        let stale = table.check(at(0x1a, 3)).unwrap_err();
        assert_eq!(
            stale,
            Stale {
                file: 0x1a,
                presented: 3,
                current: 5
            }
        );
        assert_eq!(
            stale.to_string(),
            "file 1a: layout version 3 is stale (now 5): reopen the file"
        );
        assert_eq!(table.check(at(0x1a, 5)), Ok(()));
        assert_eq!(table.check(at(0x1a, 6)), Ok(()));
        // Other files are not affected.
        assert_eq!(table.check(at(0x1b, 1)), Ok(()));
    }

    #[test]
    fn version_zero_is_never_fenced() {
        let table = FenceTable::new();
        table.raise(7, u64::MAX);
        assert_eq!(table.check(at(7, 0)), Ok(()));
        assert!(table.check(at(7, 1)).is_err());
        assert_eq!(table.check(LayoutRef::default()), Ok(()));
    }

    #[test]
    fn fences_never_go_down() {
        let table = FenceTable::new();
        table.raise(1, 4);
        table.raise(1, 2);
        assert_eq!(table.get(1), Some(4));
        table.raise_all([(1, 3), (2, 9), (2, 8), (1, 6), (3, 1)]);
        assert_eq!(table.get(1), Some(6));
        assert_eq!(table.get(2), Some(9));
        assert_eq!(table.get(3), Some(1));
        assert_eq!(table.len(), 3);
        assert!(table.check(at(1, 5)).is_err());
        assert!(table.check(at(2, 8)).is_err());
        assert_eq!(table.check(at(3, 1)), Ok(()));
    }

    #[test]
    fn raises_and_checks_from_many_threads_agree() {
        let table = FenceTable::new();
        std::thread::scope(|scope| {
            for thread in 0..4u64 {
                let table = &table;
                scope.spawn(move || {
                    for version in 1..=1000 {
                        table.raise(thread % 2, version * (thread + 1));
                        let _ = table.check(at(thread % 2, version));
                    }
                });
            }
        });
        // File 0 got threads 0 and 2 (up to 1000 and 3000), file 1 threads 1 and 3.
        assert_eq!(table.get(0), Some(3000));
        assert_eq!(table.get(1), Some(4000));
    }
}
