//! Open files: one version of a file pinned at open (its id, version, size and layout), and
//! every read of the handle served from that version, whatever is committed at the path
//! meanwhile.

use std::ffi::c_char;
use std::sync::{Arc, Mutex};

use ::tier0_client::{Client, FileError, FileLayout, ReadBuffer, StripedError};

use crate::error::{Error, entry, file_error, tier0_result};
use crate::{client_arg, out_arg, str_arg};

/// Reads of an open file redone with its version's layout asked again, after a daemon
/// refused the layout as stale.
const STALE_RETRIES: usize = 3;

/// A file opened at one version: reads through it return that version's bytes only, and its
/// size is that version's size. Thread-safe; keeps its client alive until it is closed.
#[derive(Debug)]
pub struct tier0_file {
    client: Arc<Client>,
    path: String,
    /// The pinned version's layout; replaced (same file, same version) when the layout of
    /// that version moved.
    layout: Mutex<Arc<FileLayout>>,
}

impl tier0_file {
    fn layout(&self) -> Arc<FileLayout> {
        Arc::clone(&self.layout.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The version an open file is pinned to.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct tier0_file_version {
    /// The file's id (unique in the cluster, never reused).
    pub id: u64,
    /// The version opened.
    pub version: u64,
    /// That version's size in bytes.
    pub size: u64,
}

/// The file behind a handle.
///
/// # Safety
/// `file` is NULL or a live file handle.
unsafe fn file_arg<'a>(file: *const tier0_file) -> Result<&'a tier0_file, Error> {
    // SAFETY: the caller promises a live handle or NULL.
    unsafe { file.as_ref() }.ok_or_else(|| Error::invalid("file is NULL"))
}

fn stale(message: String) -> Error {
    Error::new(tier0_result::TIER0_STALE, message)
}

/// Opens the current version of the file at `path` (asked of the control plane now, not
/// from the client's cache) and pins it: `*out_file` reads that version's bytes only, and
/// its size stays that version's, whatever is committed at the path later. Release it with
/// [`tier0_file_close`].
///
/// # Safety
/// `client` is a live handle, `path` a NUL-terminated string, `out_file` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tier0_file_open(
    client: *const crate::tier0_client,
    path: *const c_char,
    out_file: *mut *mut tier0_file,
) -> tier0_result {
    entry("tier0_file_open", || {
        // SAFETY: the caller's handle and string, checked for NULL inside.
        let (client, path) = unsafe { (client_arg(client)?, str_arg(path, "path")?) };
        let out = out_arg(out_file, "out_file")?;
        // Version 0: the current one.
        let layout = client.open_version(path, 0).map_err(file_error)?;
        let file = Box::new(tier0_file {
            client: Arc::clone(client),
            path: path.to_owned(),
            layout: Mutex::new(layout),
        });
        // SAFETY: checked non-NULL; the caller promises it is writable.
        unsafe { out.write(Box::into_raw(file)) };
        Ok(())
    })
}

/// The id, version and size the file was opened at.
///
/// # Safety
/// `file` is a live file handle, `out_version` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tier0_file_info(
    file: *const tier0_file,
    out_version: *mut tier0_file_version,
) -> tier0_result {
    entry("tier0_file_info", || {
        // SAFETY: the caller's handle, checked for NULL inside.
        let file = unsafe { file_arg(file) }?;
        let out = out_arg(out_version, "out_version")?;
        let layout = file.layout();
        // SAFETY: checked non-NULL; the caller promises it is writable.
        unsafe {
            out.write(tier0_file_version {
                id: layout.file_id,
                version: layout.version,
                size: layout.size,
            })
        };
        Ok(())
    })
}

/// Reads up to `len` bytes at `offset` of the open file's version into `dst`; `*out_read`
/// is how many (fewer at the end of that version, 0 at its end; an offset past it is
/// `TIER0_INVALID_ARGUMENT`). Every byte comes from the version opened: when its layout
/// moved (a daemon refuses it as stale), the layout of that same version is asked again and
/// the read redone; `TIER0_STALE` when that version is no longer kept or the path now names
/// another file (open it again for its current version). One copy, as `tier0_read_range`.
///
/// # Safety
/// `file` is a live file handle, `dst` writable for `len` bytes, `out_read` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tier0_file_read_at(
    file: *const tier0_file,
    offset: u64,
    dst: *mut u8,
    len: usize,
    out_read: *mut usize,
) -> tier0_result {
    entry("tier0_file_read_at", || {
        // SAFETY: the caller's handle, checked for NULL inside.
        let file = unsafe { file_arg(file) }?;
        let dst = out_arg(dst, "dst")?;
        let out = out_arg(out_read, "out_read")?;
        let mut layout = file.layout();
        let size = layout.size;
        if offset > size {
            return Err(Error::invalid(format!(
                "offset {offset} is past the end of {} (version {}, {size} bytes)",
                file.path, layout.version
            )));
        }
        let want = (size - offset).min(len as u64);
        let mut buffer = ReadBuffer::new(want as usize).map_err(Error::memory)?;
        let mut attempt = 0;
        let got = loop {
            match file
                .client
                .read_pinned(&layout, &[(offset, want, 0)], &mut buffer)
            {
                Ok(got) => break got.first().copied().unwrap_or(0).min(want) as usize,
                Err(FileError::Read { source, .. })
                    if matches!(*source, StripedError::StaleLayout { .. }) =>
                {
                    if attempt == STALE_RETRIES {
                        return Err(stale(format!(
                            "{}: version {} was refused as stale {} times after asking for \
                             its layout again: {source}",
                            file.path,
                            layout.version,
                            attempt + 1
                        )));
                    }
                    attempt += 1;
                    layout = reopen(file, &layout)?;
                }
                Err(error) => return Err(file_error(error)),
            }
        };
        // SAFETY: `dst` is writable for len >= want >= got bytes (caller); the buffer is ours.
        unsafe { std::ptr::copy_nonoverlapping(buffer.as_ptr(), dst, got) };
        // SAFETY: checked non-NULL; the caller promises it is writable.
        unsafe { out.write(got) };
        Ok(())
    })
}

/// The layout of the pinned version now, kept in the handle; `TIER0_STALE` when the version
/// is gone or the path names another file.
fn reopen(file: &tier0_file, pinned: &FileLayout) -> Result<Arc<FileLayout>, Error> {
    let fresh = match file.client.open_version(&file.path, pinned.version) {
        Ok(fresh) => fresh,
        Err(error) => {
            let error = file_error(error);
            if error.code == tier0_result::TIER0_UNAVAILABLE {
                return Err(error);
            }
            return Err(stale(format!(
                "{}: version {} is no longer readable: {}",
                file.path, pinned.version, error.message
            )));
        }
    };
    if fresh.file_id != pinned.file_id || fresh.version != pinned.version {
        return Err(stale(format!(
            "{}: the file opened (id {:x}, version {}) was replaced by another (id {:x}, \
             version {})",
            file.path, pinned.file_id, pinned.version, fresh.file_id, fresh.version
        )));
    }
    *file.layout.lock().unwrap_or_else(|e| e.into_inner()) = Arc::clone(&fresh);
    Ok(fresh)
}

/// Closes an open file (NULL: nothing).
///
/// # Safety
/// `file` is NULL or a file handle, not used again.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tier0_file_close(file: *mut tier0_file) {
    let _ = entry("tier0_file_close", || {
        if !file.is_null() {
            // SAFETY: made by Box::into_raw in tier0_file_open; the caller gives it up.
            drop(unsafe { Box::from_raw(file) });
        }
        Ok(())
    });
}
