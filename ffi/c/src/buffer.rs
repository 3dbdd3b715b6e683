//! Registered buffers: page-aligned memory that rings read into, optionally bound to a NUMA
//! node.

use std::ffi::c_int;
use std::sync::{Arc, Mutex};

use ::tier0_client::ReadBuffer;

use crate::error::{Error, entry, entry_value, tier0_result};
use crate::{numa_arg, out_arg};

/// Memory that reads land in without a copy: page-aligned, zeroed, at a fixed address for
/// its whole life. Its bytes are the caller's to read and write, except those of reads in
/// flight on a ring (submitted, completion not yet reaped: see `tier0_ring_submit`).
#[derive(Debug)]
pub struct tier0_buffer {
    pub(crate) shared: Arc<SharedBuffer>,
}

/// What a buffer handle and the rings reading into it share: the memory is unmapped when the
/// last of them goes.
#[derive(Debug)]
pub(crate) struct SharedBuffer {
    /// The mapping's address, fixed for its life (kept as a number: the C side owns access).
    pub base: usize,
    pub len: usize,
    /// Held by a ring's thread while a batch reads into the buffer, so two rings on one
    /// buffer take turns.
    pub buffer: Mutex<ReadBuffer>,
}

/// Binds the pages of `[base, base + len)` to `node` (MPOL_BIND) before they are touched.
fn bind_to_node(base: *mut u8, len: usize, node: u32) -> Result<(), std::io::Error> {
    const MPOL_BIND: c_int = 2;
    let bits = 8 * std::mem::size_of::<libc::c_ulong>();
    let mut mask = vec![0 as libc::c_ulong; node as usize / bits + 1];
    mask[node as usize / bits] |= 1 << (node as usize % bits);
    // SAFETY: mbind reads `mask` (the kernel reads maxnode - 1 bits, so one more than the
    // mask holds) and changes the policy of a mapping this library made.
    let result = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            base,
            len,
            MPOL_BIND,
            mask.as_ptr(),
            mask.len() * bits + 1,
            0,
        )
    };
    if result != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A new registered buffer of `len` bytes (more than 0), zeroed and page-aligned. With
/// `numa_node` -1 its pages come from wherever the kernel puts them; with a node number
/// they are bound to that node (`mbind`, MPOL_BIND, before any is touched), and a node the
/// machine lacks is `TIER0_INVALID_ARGUMENT`.
///
/// # Safety
/// `out_buf` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tier0_buffer_new(
    len: usize,
    numa_node: c_int,
    out_buf: *mut *mut tier0_buffer,
) -> tier0_result {
    entry("tier0_buffer_new", || {
        let out = out_arg(out_buf, "out_buf")?;
        if len == 0 {
            return Err(Error::invalid("len is 0"));
        }
        let node = numa_arg(numa_node)?;
        let mut buffer = ReadBuffer::new(len).map_err(Error::memory)?;
        let base = buffer.as_mut_ptr();
        if let Some(node) = node {
            let mapped = len.div_ceil(4096) * 4096;
            bind_to_node(base, mapped, node).map_err(|error| {
                Error::invalid(format!("binding {len} bytes to NUMA node {node}: {error}"))
            })?;
        }
        let handle = Box::new(tier0_buffer {
            shared: Arc::new(SharedBuffer {
                base: base as usize,
                len,
                buffer: Mutex::new(buffer),
            }),
        });
        // SAFETY: checked non-NULL; the caller promises it is writable.
        unsafe { out.write(Box::into_raw(handle)) };
        Ok(())
    })
}

/// The buffer's first byte (NULL for NULL). The address never changes.
///
/// # Safety
/// `buf` is NULL or a live buffer handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tier0_buffer_data(buf: *const tier0_buffer) -> *mut u8 {
    entry_value("tier0_buffer_data", std::ptr::null_mut(), || {
        // SAFETY: the caller promises a live handle or NULL.
        unsafe { buf.as_ref() }.map_or(std::ptr::null_mut(), |buf| buf.shared.base as *mut u8)
    })
}

/// The buffer's length in bytes (0 for NULL).
///
/// # Safety
/// `buf` is NULL or a live buffer handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tier0_buffer_len(buf: *const tier0_buffer) -> usize {
    entry_value("tier0_buffer_len", 0, || {
        // SAFETY: the caller promises a live handle or NULL.
        unsafe { buf.as_ref() }.map_or(0, |buf| buf.shared.len)
    })
}

/// Releases the handle (NULL: nothing). The memory stays mapped while a ring made with it
/// lives, so its in-flight reads never write into unmapped memory; the caller must not use
/// the data pointer after this call.
///
/// # Safety
/// `buf` is NULL or a buffer handle, not used again.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tier0_buffer_free(buf: *mut tier0_buffer) {
    let _ = entry("tier0_buffer_free", || {
        if !buf.is_null() {
            // SAFETY: made by Box::into_raw in tier0_buffer_new; the caller gives it up.
            drop(unsafe { Box::from_raw(buf) });
        }
        Ok(())
    });
}
