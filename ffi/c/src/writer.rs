//! Streaming writes: a new version of a file written piece by piece, chunk by chunk to every
//! replica as it fills, and committed at close (nothing is visible before; a writer freed
//! without closing commits nothing).

use std::ffi::c_char;
use std::sync::{Arc, Mutex};

use ::tier0_client::Client;
use ::tier0_client::client::FileWriter;

use crate::error::{Error, entry, file_error, tier0_result};
use crate::{client_arg, out_arg, str_arg};

/// A new version of a file being written. Thread-safe (writes are serialised); keeps its
/// client alive until it is closed or freed.
pub struct tier0_writer {
    /// Declared before `client`, so it is dropped first: it borrows the client.
    writer: Mutex<Option<FileWriter<'static>>>,
    /// Owns what `writer` borrows (never read, only kept).
    #[allow(dead_code)]
    client: Arc<Client>,
}

impl std::fmt::Debug for tier0_writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("tier0_writer").finish_non_exhaustive()
    }
}

/// The writer behind a handle.
///
/// # Safety
/// `writer` is NULL or a live writer handle.
unsafe fn writer_arg<'a>(writer: *const tier0_writer) -> Result<&'a tier0_writer, Error> {
    // SAFETY: the caller promises a live handle or NULL.
    unsafe { writer.as_ref() }.ok_or_else(|| Error::invalid("writer is NULL"))
}

/// Starts a new version of the file at `path` (made if missing; its directory must exist):
/// `*out_writer` takes its bytes with [`tier0_writer_write`] and commits them with
/// [`tier0_writer_close`]; [`tier0_writer_free`] without a close commits nothing.
///
/// # Safety
/// `client` is a live handle, `path` a NUL-terminated string, `out_writer` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tier0_writer_new(
    client: *const crate::tier0_client,
    path: *const c_char,
    out_writer: *mut *mut tier0_writer,
) -> tier0_result {
    entry("tier0_writer_new", || {
        // SAFETY: the caller's handle and string, checked for NULL inside.
        let (client, path) = unsafe { (client_arg(client)?, str_arg(path, "path")?) };
        let out = out_arg(out_writer, "out_writer")?;
        let client = Arc::clone(client);
        // SAFETY: the reference points into the Arc's allocation, which `tier0_writer` keeps
        // alive in its `client` field for as long as the writer (dropped before it) exists.
        let borrowed: &'static Client = unsafe { &*Arc::as_ptr(&client) };
        let writer = borrowed.create(path).map_err(file_error)?;
        let handle = Box::new(tier0_writer {
            writer: Mutex::new(Some(writer)),
            client,
        });
        // SAFETY: checked non-NULL; the caller promises it is writable.
        unsafe { out.write(Box::into_raw(handle)) };
        Ok(())
    })
}

/// Appends `len` bytes from `src`; full chunks are on every replica before it returns. A
/// writer whose write failed is spent: its close fails and commits nothing.
///
/// # Safety
/// `writer` is a live writer handle, `src` readable for `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tier0_writer_write(
    writer: *const tier0_writer,
    src: *const u8,
    len: usize,
) -> tier0_result {
    entry("tier0_writer_write", || {
        // SAFETY: the caller's handle, checked for NULL inside.
        let writer = unsafe { writer_arg(writer) }?;
        if len == 0 {
            return Ok(());
        }
        if src.is_null() {
            return Err(Error::invalid("src is NULL"));
        }
        // SAFETY: non-NULL, and the caller promises `len` readable bytes.
        let data = unsafe { std::slice::from_raw_parts(src, len) };
        let mut slot = writer.writer.lock().unwrap_or_else(|e| e.into_inner());
        let Some(file) = slot.as_mut() else {
            return Err(Error::invalid(
                "the writer was closed, or a write of it failed",
            ));
        };
        if let Err(error) = file.write(data) {
            *slot = None;
            return Err(file_error(error));
        }
        Ok(())
    })
}

/// Commits what was written as the file's new version, atomically; `*out_size` (may be NULL)
/// is its size. Fails, committing nothing, when another writer committed the file first.
/// The handle stays to be freed with [`tier0_writer_free`].
///
/// # Safety
/// `writer` is a live writer handle; `out_size` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tier0_writer_close(
    writer: *const tier0_writer,
    out_size: *mut u64,
) -> tier0_result {
    entry("tier0_writer_close", || {
        // SAFETY: the caller's handle, checked for NULL inside.
        let writer = unsafe { writer_arg(writer) }?;
        let file = writer
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| Error::invalid("the writer was closed, or a write of it failed"))?;
        let layout = file.close().map_err(file_error)?;
        if !out_size.is_null() {
            // SAFETY: non-NULL; the caller promises it is writable.
            unsafe { out_size.write(layout.size) };
        }
        Ok(())
    })
}

/// Frees a writer; one not closed commits nothing. NULL is a no-op.
///
/// # Safety
/// `writer` is NULL or a live writer handle, not used again after this.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tier0_writer_free(writer: *mut tier0_writer) {
    crate::error::entry_value("tier0_writer_free", (), || {
        if !writer.is_null() {
            // SAFETY: the caller hands back a handle made by tier0_writer_new, once.
            drop(unsafe { Box::from_raw(writer) });
        }
    })
}
