//! Submission rings, in the spirit of 3FS's USRBIO: reads are prepared one by one (path,
//! file offset, length, where in the registered buffer, a user tag), submitted as a batch,
//! and reaped as completions.
//!
//! Each ring has one thread of its own. `tier0_ring_submit` hands the prepared reads to it
//! and returns at once; the thread reads each batch in one striped pass
//! (`Client::read_batch`: many files, many daemons, straight into the buffer) and posts a
//! completion per read, which `tier0_ring_wait` reaps. Batches run one after another, in
//! submission order.
//!
//! The buffer is shared with the application: while a batch is in flight the ring's thread
//! writes the ranges of its reads, and the application must neither read nor write those
//! ranges until their completions are reaped. Bytes outside them stay the application's to
//! use: the striped reader is handed exactly the batch's ranges (`read_batch_shared`), never
//! a reference to the whole buffer.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::c_char;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use ::tier0_client::{BatchRead, Client};

use crate::buffer::{SharedBuffer, tier0_buffer};
use crate::error::{Error, entry, file_error, panic_message, set_last_error, tier0_result};
use crate::{client_arg, out_arg, str_arg, tier0_client};

/// The most reads a ring can hold.
const MAX_CAPACITY: u32 = 1 << 20;

/// A finished read: the tag it was prepared with, its result, and how many bytes landed
/// (fewer than asked at the end of the file).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct tier0_completion {
    pub user_data: u64,
    pub result: tier0_result,
    pub bytes: u64,
}

/// A submission ring over one client and one registered buffer. Thread-safe. Reads name
/// files by path and use the client's cached layouts (following a newer version when a
/// daemon refuses one as stale), so they are not pinned to a version: for that, read
/// through an open file (`tier0_file_open`).
pub struct tier0_ring {
    shared: Arc<RingShared>,
    capacity: usize,
    buffer_len: u64,
    batches: Mutex<Option<mpsc::Sender<Vec<Prepared>>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for tier0_ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("tier0_ring")
            .field("capacity", &self.capacity)
            .field("buffer_len", &self.buffer_len)
            .finish_non_exhaustive()
    }
}

struct Prepared {
    path: String,
    offset: u64,
    len: u64,
    buffer_offset: u64,
    user_data: u64,
}

struct Finished {
    completion: tier0_completion,
    message: Option<String>,
}

#[derive(Default)]
struct RingState {
    prepared: Vec<Prepared>,
    /// The buffer ranges of `prepared`: start → end.
    ranges: BTreeMap<u64, u64>,
    /// Submitted and not finished.
    in_flight: usize,
    finished: VecDeque<Finished>,
    /// The messages of failed reads reaped, newest last, at most `capacity` of them: what
    /// `tier0_ring_error` answers.
    errors: VecDeque<(u64, String)>,
}

impl RingState {
    fn held(&self) -> usize {
        self.prepared.len() + self.in_flight + self.finished.len()
    }
}

struct RingShared {
    state: Mutex<RingState>,
    done: Condvar,
}

impl RingShared {
    fn lock(&self) -> MutexGuard<'_, RingState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The ring behind a handle.
///
/// # Safety
/// `ring` is NULL or a live ring handle.
unsafe fn ring_arg<'a>(ring: *const tier0_ring) -> Result<&'a tier0_ring, Error> {
    // SAFETY: the caller promises a live handle or NULL.
    unsafe { ring.as_ref() }.ok_or_else(|| Error::invalid("ring is NULL"))
}

/// A new ring reading through `client` into `buf`, holding at most `capacity` reads
/// (prepared, in flight, or finished and not yet reaped; 1 to 2^20). The ring keeps the
/// client and the buffer's memory alive until it is freed, whatever is freed first.
///
/// # Safety
/// `client` and `buf` are live handles; `out_ring` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tier0_ring_new(
    client: *const tier0_client,
    buf: *const tier0_buffer,
    capacity: u32,
    out_ring: *mut *mut tier0_ring,
) -> tier0_result {
    entry("tier0_ring_new", || {
        // SAFETY: the caller's handle, checked for NULL inside.
        let client = Arc::clone(unsafe { client_arg(client) }?);
        // SAFETY: the caller promises a live handle or NULL.
        let buffer = unsafe { buf.as_ref() }.ok_or_else(|| Error::invalid("buf is NULL"))?;
        let out = out_arg(out_ring, "out_ring")?;
        if capacity == 0 || capacity > MAX_CAPACITY {
            return Err(Error::invalid(format!(
                "capacity {capacity}: 1 to {MAX_CAPACITY}"
            )));
        }
        let buffer = Arc::clone(&buffer.shared);
        let shared = Arc::new(RingShared {
            state: Mutex::new(RingState::default()),
            done: Condvar::new(),
        });
        let (batches, receiver) = mpsc::channel::<Vec<Prepared>>();
        let buffer_len = buffer.len as u64;
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("tier0-ring".to_owned())
                .spawn(move || {
                    for batch in receiver {
                        let count = batch.len();
                        let finished = run_batch(&client, &buffer, batch);
                        let mut state = shared.lock();
                        state.in_flight -= count;
                        state.finished.extend(finished);
                        shared.done.notify_all();
                    }
                })
                .map_err(|error| Error::internal(format!("starting the ring's thread: {error}")))?
        };
        let ring = Box::new(tier0_ring {
            shared,
            capacity: capacity as usize,
            buffer_len,
            batches: Mutex::new(Some(batches)),
            thread: Mutex::new(Some(thread)),
        });
        // SAFETY: checked non-NULL; the caller promises it is writable.
        unsafe { out.write(Box::into_raw(ring)) };
        Ok(())
    })
}

/// Reads one batch; a completion per read, in the batch's order. Reads of files that cannot
/// be opened, or that start past their file's end, fail alone; the rest are read in one
/// striped pass, which succeeds or fails as a whole.
fn run_batch(client: &Client, buffer: &SharedBuffer, batch: Vec<Prepared>) -> Vec<Finished> {
    let tags: Vec<u64> = batch.iter().map(|read| read.user_data).collect();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        read_batch(client, buffer, batch)
    })) {
        Ok(finished) => finished,
        Err(panic) => {
            let message = format!(
                "tier0_ring_wait: internal error (a panic in the ring's thread): {}",
                panic_message(panic.as_ref())
            );
            tags.into_iter()
                .map(|user_data| Finished {
                    completion: tier0_completion {
                        user_data,
                        result: tier0_result::TIER0_INTERNAL,
                        bytes: 0,
                    },
                    message: Some(message.clone()),
                })
                .collect()
        }
    }
}

fn read_batch(client: &Client, buffer: &SharedBuffer, batch: Vec<Prepared>) -> Vec<Finished> {
    let mut sizes: HashMap<&str, Result<u64, Error>> = HashMap::new();
    for read in &batch {
        sizes
            .entry(read.path.as_str())
            .or_insert_with(|| client.open(&read.path).map(|l| l.size).map_err(file_error));
    }
    let mut finished: Vec<Option<Finished>> = Vec::with_capacity(batch.len());
    let mut reads = Vec::new();
    let mut slots = Vec::new();
    for (slot, read) in batch.iter().enumerate() {
        let failed = match &sizes[read.path.as_str()] {
            Err(error) => Some((error.code, error.message.clone())),
            Ok(size) if read.offset > *size => Some((
                tier0_result::TIER0_INVALID_ARGUMENT,
                format!(
                    "offset {} is past the end of {} ({size} bytes)",
                    read.offset, read.path
                ),
            )),
            Ok(_) => None,
        };
        finished.push(failed.map(|(result, message)| Finished {
            completion: tier0_completion {
                user_data: read.user_data,
                result,
                bytes: 0,
            },
            message: Some(format!(
                "tier0_ring_wait: read {}: {message}",
                read.user_data
            )),
        }));
        if finished[slot].is_none() {
            reads.push(BatchRead {
                path: read.path.clone(),
                offset: read.offset,
                len: read.len,
                buffer_offset: read.buffer_offset,
            });
            slots.push(slot);
        }
    }
    if !reads.is_empty() {
        let memory = buffer.buffer.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the reads' ranges are the library's from submit until reaped (the C
        // contract of tier0_ring_submit), disjoint within the batch (checked at prep), and
        // only they are written: the application may use the rest of the buffer meanwhile.
        let outcome = unsafe { client.read_batch_shared(&reads, &memory) };
        drop(memory);
        match outcome {
            Ok(got) => {
                for (index, &slot) in slots.iter().enumerate() {
                    finished[slot] = Some(Finished {
                        completion: tier0_completion {
                            user_data: batch[slot].user_data,
                            result: tier0_result::TIER0_OK,
                            bytes: got.get(index).copied().unwrap_or(0),
                        },
                        message: None,
                    });
                }
            }
            Err(error) => {
                let error = file_error(error);
                for &slot in &slots {
                    finished[slot] = Some(Finished {
                        completion: tier0_completion {
                            user_data: batch[slot].user_data,
                            result: error.code,
                            bytes: 0,
                        },
                        message: Some(format!(
                            "tier0_ring_wait: read {}: {}",
                            batch[slot].user_data, error.message
                        )),
                    });
                }
            }
        }
    }
    finished.into_iter().flatten().collect()
}

/// Prepares a read of `len` bytes at `file_offset` of the file at `path`, landing at
/// `buf_offset` of the ring's buffer, tagged `user_data`; it starts at the next submit.
/// `TIER0_BUFFER_TOO_SMALL`: the range does not fit the buffer; `TIER0_INVALID_ARGUMENT`:
/// it overlaps a read prepared and not yet submitted; `TIER0_RING_FULL`: the ring holds
/// `capacity` reads (reap some). Whether the file exists and how large it is are checked
/// when the batch runs: the completion says.
///
/// # Safety
/// `ring` is a live ring handle and `path` a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tier0_ring_prep_read(
    ring: *const tier0_ring,
    path: *const c_char,
    file_offset: u64,
    len: u64,
    buf_offset: u64,
    user_data: u64,
) -> tier0_result {
    entry("tier0_ring_prep_read", || {
        // SAFETY: the caller's handle and string, checked for NULL inside.
        let (ring, path) = unsafe { (ring_arg(ring)?, str_arg(path, "path")?) };
        let end = buf_offset
            .checked_add(len)
            .filter(|&end| end <= ring.buffer_len)
            .ok_or_else(|| {
                Error::too_small(format!(
                    "{path}: {len} bytes at buf_offset {buf_offset} do not fit the buffer's {} \
                     bytes",
                    ring.buffer_len
                ))
            })?;
        file_offset
            .checked_add(len)
            .ok_or_else(|| Error::invalid(format!("{path}: file_offset + len overflows")))?;
        let mut state = ring.shared.lock();
        if state.held() >= ring.capacity {
            return Err(Error::new(
                tier0_result::TIER0_RING_FULL,
                format!(
                    "the ring holds {} reads ({} prepared, {} in flight, {} to reap)",
                    ring.capacity,
                    state.prepared.len(),
                    state.in_flight,
                    state.finished.len()
                ),
            ));
        }
        if len > 0 {
            let before = state.ranges.range(..end).next_back();
            if let Some((&start, &stop)) = before.filter(|&(_, &stop)| stop > buf_offset) {
                return Err(Error::invalid(format!(
                    "{path}: buffer range {buf_offset}..{end} overlaps {start}..{stop} of a \
                     read prepared before"
                )));
            }
            state.ranges.insert(buf_offset, end);
        }
        state.prepared.push(Prepared {
            path: path.to_owned(),
            offset: file_offset,
            len,
            buffer_offset: buf_offset,
            user_data,
        });
        Ok(())
    })
}

/// Starts the reads prepared since the last submit, as one batch, and returns at once; the
/// ring's thread reads them and posts their completions. Nothing prepared: nothing to do.
///
/// The buffer rule: from this call until a read's completion is reaped, the application
/// must neither read nor write that read's buffer range (its bytes land there in any order,
/// and a failed read may leave part of them). Bytes of the buffer outside the ranges in
/// flight stay the application's to read and write meanwhile: the library makes no
/// reference to them.
///
/// # Safety
/// `ring` is a live ring handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tier0_ring_submit(ring: *const tier0_ring) -> tier0_result {
    entry("tier0_ring_submit", || {
        // SAFETY: the caller's handle, checked for NULL inside.
        let ring = unsafe { ring_arg(ring) }?;
        let batches = ring.batches.lock().unwrap_or_else(|e| e.into_inner());
        let sender = batches
            .as_ref()
            .ok_or_else(|| Error::internal("the ring is closing"))?;
        let mut state = ring.shared.lock();
        if state.prepared.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut state.prepared);
        state.ranges.clear();
        let count = batch.len();
        state.in_flight += count;
        if let Err(mpsc::SendError(batch)) = sender.send(batch) {
            state.in_flight -= count;
            state.prepared = batch;
            return Err(Error::internal("the ring's thread is gone"));
        }
        Ok(())
    })
}

/// Waits until at least `min_complete` reads have finished (0: does not wait), then moves
/// up to `max` completions, oldest first, to `completions_out`; `*out_count` is how many.
/// `min_complete` must not exceed `max`, nor the reads submitted and not yet reaped (waiting
/// for more would never end): `TIER0_INVALID_ARGUMENT`. Several threads may wait on one
/// ring: when others reap completions this call was waiting for, so that `min_complete`
/// can no longer be reached, it returns at once with what there is (maybe nothing) rather
/// than wait forever. A read that failed has its result in its completion;
/// [`tier0_ring_error`] gives its own message, and [`tier0_last_error`] says why the last
/// such read of this call failed.
///
/// # Safety
/// `ring` is a live ring handle; `completions_out` is writable for `max` completions and
/// `out_count` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tier0_ring_wait(
    ring: *const tier0_ring,
    completions_out: *mut tier0_completion,
    max: u32,
    min_complete: u32,
    out_count: *mut u32,
) -> tier0_result {
    entry("tier0_ring_wait", || {
        // SAFETY: the caller's handle, checked for NULL inside.
        let ring = unsafe { ring_arg(ring) }?;
        let completions = out_arg(completions_out, "completions_out")?;
        let out_count = out_arg(out_count, "out_count")?;
        if min_complete > max {
            return Err(Error::invalid(format!(
                "min_complete {min_complete} is more than max {max}"
            )));
        }
        let mut state = ring.shared.lock();
        let reapable = state.in_flight + state.finished.len();
        if min_complete as usize > reapable {
            return Err(Error::invalid(format!(
                "min_complete {min_complete}, but only {reapable} submitted reads are not \
                 reaped ({} prepared, not submitted)",
                state.prepared.len()
            )));
        }
        // Checked again at every wake-up: another thread waiting on this ring may have
        // reaped completions this call counted on, and then waiting on would never end.
        while state.finished.len() < min_complete as usize
            && state.in_flight + state.finished.len() >= min_complete as usize
        {
            state = ring
                .shared
                .done
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
        let count = state.finished.len().min(max as usize);
        let mut failure = None;
        let drained: Vec<Finished> = state.finished.drain(..count).collect();
        for (index, finished) in drained.into_iter().enumerate() {
            if let Some(message) = finished.message {
                if state.errors.len() >= ring.capacity {
                    state.errors.pop_front();
                }
                state
                    .errors
                    .push_back((finished.completion.user_data, message.clone()));
                failure = Some(message);
            }
            // SAFETY: the caller promises room for `max` >= count completions.
            unsafe { completions.add(index).write(finished.completion) };
        }
        drop(state);
        if count > 0 {
            // Other waiters re-check whether what they wait for can still come.
            ring.shared.done.notify_all();
        }
        // SAFETY: checked non-NULL; the caller promises it is writable.
        unsafe { out_count.write(count as u32) };
        if let Some(message) = failure {
            set_last_error(&message);
        }
        Ok(())
    })
}

/// The message of the failed read tagged `user_data`, reaped from this ring (the latest, if
/// several had that tag; the ring keeps the messages of its last `capacity` failed reads).
/// It is copied into `dst` (`dst_len` bytes, NUL-terminated, cut short when it does not
/// fit; `dst` may be NULL when `dst_len` is 0); `*out_len`, when `out_len` is not NULL, is
/// its full length without the NUL. `TIER0_NOT_FOUND`: no failed read with that tag was
/// reaped (or its message was dropped for newer ones).
///
/// # Safety
/// `ring` is a live ring handle, `dst` writable for `dst_len` bytes, `out_len` NULL or
/// writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tier0_ring_error(
    ring: *const tier0_ring,
    user_data: u64,
    dst: *mut c_char,
    dst_len: usize,
    out_len: *mut usize,
) -> tier0_result {
    entry("tier0_ring_error", || {
        // SAFETY: the caller's handle, checked for NULL inside.
        let ring = unsafe { ring_arg(ring) }?;
        if dst.is_null() && dst_len > 0 {
            return Err(Error::invalid("dst is NULL"));
        }
        let state = ring.shared.lock();
        let message = state
            .errors
            .iter()
            .rev()
            .find(|(tag, _)| *tag == user_data)
            .map(|(_, message)| message.as_bytes())
            .ok_or_else(|| {
                Error::new(
                    tier0_result::TIER0_NOT_FOUND,
                    format!("no failed read tagged {user_data} was reaped from this ring"),
                )
            })?;
        if dst_len > 0 {
            let copied = message.len().min(dst_len - 1);
            // SAFETY: `dst` is writable for dst_len > copied bytes (caller); the message is
            // ours.
            unsafe {
                std::ptr::copy_nonoverlapping(message.as_ptr().cast::<c_char>(), dst, copied);
                dst.add(copied).write(0);
            }
        }
        if !out_len.is_null() {
            // SAFETY: non-NULL; the caller promises it is writable.
            unsafe { out_len.write(message.len()) };
        }
        Ok(())
    })
}

/// Releases the ring (NULL: nothing): reads not yet submitted are dropped, and the call
/// waits for the batches in flight to finish, so nothing writes into the buffer after it
/// returns.
///
/// # Safety
/// `ring` is NULL or a ring handle, not used again.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tier0_ring_free(ring: *mut tier0_ring) {
    let _ = entry("tier0_ring_free", || {
        if ring.is_null() {
            return Ok(());
        }
        // SAFETY: made by Box::into_raw in tier0_ring_new; the caller gives it up.
        let ring = unsafe { Box::from_raw(ring) };
        drop(
            ring.batches
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        if let Some(thread) = ring.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = thread.join();
        }
        Ok(())
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two threads wait for the same two completions on one ring: one reaps both, the other
    /// returns with none instead of waiting forever.
    #[test]
    fn two_waiters_never_wait_for_what_the_other_took() {
        let ring = tier0_ring {
            shared: Arc::new(RingShared {
                state: Mutex::new(RingState {
                    in_flight: 2,
                    ..RingState::default()
                }),
                done: Condvar::new(),
            }),
            capacity: 4,
            buffer_len: 0,
            batches: Mutex::new(None),
            thread: Mutex::new(None),
        };
        let address = &ring as *const tier0_ring as usize;
        let (sender, receiver) = mpsc::channel();
        std::thread::scope(|scope| {
            for _ in 0..2 {
                let sender = sender.clone();
                scope.spawn(move || {
                    let mut out = [tier0_completion {
                        user_data: 0,
                        result: tier0_result::TIER0_OK,
                        bytes: 0,
                    }; 2];
                    let mut count = 0;
                    // SAFETY: the ring outlives the scope; `out` has room for 2.
                    let result = unsafe {
                        tier0_ring_wait(
                            address as *const tier0_ring,
                            out.as_mut_ptr(),
                            2,
                            2,
                            &mut count,
                        )
                    };
                    sender.send((result, count)).unwrap();
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
            {
                let mut state = ring.shared.lock();
                state.in_flight = 0;
                for user_data in [1, 2] {
                    state.finished.push_back(Finished {
                        completion: tier0_completion {
                            user_data,
                            result: tier0_result::TIER0_OK,
                            bytes: 1,
                        },
                        message: None,
                    });
                }
                ring.shared.done.notify_all();
            }
            let timeout = std::time::Duration::from_secs(10);
            let mut counts = [
                receiver.recv_timeout(timeout).expect("a waiter returned"),
                receiver
                    .recv_timeout(timeout)
                    .expect("the other waiter returned"),
            ];
            counts.sort_by_key(|&(_, count)| count);
            assert_eq!(counts[0], (tier0_result::TIER0_OK, 0));
            assert_eq!(counts[1], (tier0_result::TIER0_OK, 2));
        });
    }

    /// Each failed read keeps its own message.
    #[test]
    fn each_failed_read_has_its_own_message() {
        let ring = tier0_ring {
            shared: Arc::new(RingShared {
                state: Mutex::new(RingState::default()),
                done: Condvar::new(),
            }),
            capacity: 4,
            buffer_len: 0,
            batches: Mutex::new(None),
            thread: Mutex::new(None),
        };
        {
            let mut state = ring.shared.lock();
            for (user_data, message) in [(7, Some("seven failed")), (8, None), (9, Some("nine"))] {
                state.finished.push_back(Finished {
                    completion: tier0_completion {
                        user_data,
                        result: if message.is_some() {
                            tier0_result::TIER0_IO
                        } else {
                            tier0_result::TIER0_OK
                        },
                        bytes: 0,
                    },
                    message: message.map(str::to_owned),
                });
            }
        }
        let mut out = [tier0_completion {
            user_data: 0,
            result: tier0_result::TIER0_OK,
            bytes: 0,
        }; 3];
        let mut count = 0;
        // SAFETY: a live ring; `out` has room for 3.
        let result = unsafe { tier0_ring_wait(&ring, out.as_mut_ptr(), 3, 3, &mut count) };
        assert_eq!((result, count), (tier0_result::TIER0_OK, 3));
        let mut text = [0 as c_char; 64];
        let mut len = 0;
        // SAFETY: a live ring; `text` is writable for its length.
        let result = unsafe { tier0_ring_error(&ring, 7, text.as_mut_ptr(), 64, &mut len) };
        assert_eq!(result, tier0_result::TIER0_OK);
        // SAFETY: NUL-terminated by tier0_ring_error.
        let got = unsafe { std::ffi::CStr::from_ptr(text.as_ptr()) };
        assert_eq!((got.to_str().unwrap(), len), ("seven failed", 12));
        // Cut short, NUL-terminated, full length reported.
        // SAFETY: as above, 4 bytes.
        let result = unsafe { tier0_ring_error(&ring, 9, text.as_mut_ptr(), 4, &mut len) };
        assert_eq!(result, tier0_result::TIER0_OK);
        // SAFETY: as above.
        let got = unsafe { std::ffi::CStr::from_ptr(text.as_ptr()) };
        assert_eq!((got.to_str().unwrap(), len), ("nin", 4));
        // SAFETY: a live ring; NULL dst with length 0.
        let result = unsafe { tier0_ring_error(&ring, 8, std::ptr::null_mut(), 0, &mut len) };
        assert_eq!(result, tier0_result::TIER0_NOT_FOUND);
    }
}
