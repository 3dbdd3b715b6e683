//! The namespace calls of [`Client`]: stat, list, mkdir, remove (what the C ABI's and the
//! Python package's file-system views need), each one control-plane call.

use tier0_control_api::proto;

use super::{Client, FileError};

impl Client {
    /// The entry at `path` (a file or a directory).
    pub fn stat(&self, path: &str) -> Result<proto::Entry, FileError> {
        let mut namespace = self.control.namespace.clone();
        self.runtime
            .block_on(namespace.stat(proto::StatRequest {
                path: path.to_owned(),
            }))
            .map_err(|status| self.control_error(format!("stat {path}"), status))?
            .into_inner()
            .entry
            .ok_or_else(|| FileError::Writer {
                path: path.to_owned(),
                message: "the control plane returned no entry".to_owned(),
            })
    }

    /// The entries of the directory at `path`.
    pub fn list(&self, path: &str) -> Result<Vec<proto::Entry>, FileError> {
        let mut namespace = self.control.namespace.clone();
        Ok(self
            .runtime
            .block_on(namespace.list(proto::ListRequest {
                path: path.to_owned(),
            }))
            .map_err(|status| self.control_error(format!("list {path}"), status))?
            .into_inner()
            .entries)
    }

    /// Makes the directory at `path` (and missing parents with `parents`).
    pub fn mkdir(&self, path: &str, parents: bool) -> Result<(), FileError> {
        let mut namespace = self.control.namespace.clone();
        self.runtime
            .block_on(namespace.mkdir(proto::MkdirRequest {
                path: path.to_owned(),
                parents,
                settings: None,
            }))
            .map_err(|status| self.control_error(format!("mkdir {path}"), status))?;
        Ok(())
    }

    /// Removes the file or directory at `path` (a non-empty directory only with
    /// `recursive`); returns how many entries went, and forgets their cached layouts.
    pub fn remove(&self, path: &str, recursive: bool) -> Result<u64, FileError> {
        let mut namespace = self.control.namespace.clone();
        let removed = self
            .runtime
            .block_on(namespace.delete(proto::DeleteRequest {
                path: path.to_owned(),
                recursive,
            }))
            .map_err(|status| self.control_error(format!("remove {path}"), status))?
            .into_inner()
            .removed;
        let prefix = format!("{}/", path.trim_end_matches('/'));
        self.cache()
            .retain(|cached, _| cached != path && !cached.starts_with(&prefix));
        Ok(removed)
    }
}
