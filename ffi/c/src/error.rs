//! One result enum for every entry, the thread's last error message, and the wrapper every
//! entry runs its body in (panics caught, the message kept).

use std::any::Any;
use std::cell::RefCell;
use std::ffi::{CString, c_char, c_int};
use std::panic::AssertUnwindSafe;

use ::tier0_client::FileError;
use tier0_control_api::client::ClientError;

/// What a call did. `TIER0_OK` is 0; for any other value [`tier0_last_error`] says what
/// failed and where.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum tier0_result {
    TIER0_OK = 0,
    /// A NULL pointer, a string that is not UTF-8, a malformed path or URL, a range outside
    /// the file or the buffer, a call in the wrong state.
    TIER0_INVALID_ARGUMENT = 1,
    /// No file or directory at that path.
    TIER0_NOT_FOUND = 2,
    /// Something is already at that path.
    TIER0_ALREADY_EXISTS = 3,
    /// The control plane refused the cluster token.
    TIER0_UNAUTHENTICATED = 4,
    /// The control plane did not answer (down, unreachable, or too slow).
    TIER0_UNAVAILABLE = 5,
    /// The destination is smaller than what must land in it.
    TIER0_BUFFER_TOO_SMALL = 6,
    /// Reading from or writing to the data daemons failed (every replica of a chunk).
    TIER0_IO = 7,
    /// The namespace is not in the state the call needs: a non-empty directory, a file where
    /// a directory must be (or the reverse), a commit that lost to another writer.
    TIER0_CONFLICT = 8,
    /// The ring holds as many reads (prepared, in flight or not yet reaped) as its capacity.
    TIER0_RING_FULL = 9,
    /// Memory could not be mapped.
    TIER0_OUT_OF_MEMORY = 10,
    /// A bug in tier0 (a caught panic included): the message says where.
    TIER0_INTERNAL = 11,
    /// An open file's version can no longer be read: the cluster no longer keeps it, or the
    /// path now names another file (removed and made again). Open the file again to read
    /// its current version.
    TIER0_STALE = 12,
}

/// A failed call: its result and what to say.
#[derive(Debug)]
pub(crate) struct Error {
    pub code: tier0_result,
    pub message: String,
}

impl Error {
    pub fn new(code: tier0_result, message: impl Into<String>) -> Error {
        Error {
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Error {
        Error::new(tier0_result::TIER0_INVALID_ARGUMENT, message)
    }

    pub fn too_small(message: impl Into<String>) -> Error {
        Error::new(tier0_result::TIER0_BUFFER_TOO_SMALL, message)
    }

    pub fn internal(message: impl Into<String>) -> Error {
        Error::new(tier0_result::TIER0_INTERNAL, message)
    }

    pub fn memory(error: std::io::Error) -> Error {
        Error::new(
            tier0_result::TIER0_OUT_OF_MEMORY,
            format!("mapping memory: {error}"),
        )
    }
}

/// The result a client error maps to, with its message (which names the path and the
/// control plane or daemon).
pub(crate) fn file_error(error: FileError) -> Error {
    use tier0_result::*;
    let code = match &error {
        FileError::Connect(ClientError::Connect { .. }) => TIER0_UNAVAILABLE,
        FileError::Connect(_) | FileError::Transport(_) => TIER0_INVALID_ARGUMENT,
        FileError::Control { status, .. } => match status.code() {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => TIER0_INVALID_ARGUMENT,
            tonic::Code::NotFound => TIER0_NOT_FOUND,
            tonic::Code::AlreadyExists => TIER0_ALREADY_EXISTS,
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => TIER0_UNAUTHENTICATED,
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                TIER0_UNAVAILABLE
            }
            tonic::Code::FailedPrecondition | tonic::Code::Aborted => TIER0_CONFLICT,
            _ => TIER0_INTERNAL,
        },
        FileError::Read { .. } | FileError::Write { .. } | FileError::Writer { .. } => TIER0_IO,
        FileError::Layout { .. } | FileError::Runtime(_) => TIER0_INTERNAL,
    };
    Error::new(code, error.to_string())
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

pub(crate) fn set_last_error(message: &str) {
    // Interior NULs would cut the message short; they never come from our own messages.
    let message = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|last| *last.borrow_mut() = message);
}

fn clear_last_error() {
    LAST_ERROR.with(|last| {
        let mut last = last.borrow_mut();
        if !last.as_bytes().is_empty() {
            *last = CString::default();
        }
    });
}

/// The message of the last call on this thread that failed ("" after one that succeeded):
/// the function, the path or handle, and the cause. Valid until this thread's next call into
/// the library.
#[unsafe(no_mangle)]
pub extern "C" fn tier0_last_error() -> *const c_char {
    LAST_ERROR
        .try_with(|last| last.borrow().as_ptr())
        .unwrap_or(c"(the thread is exiting)".as_ptr())
}

/// A static description of a result value (any int: unknown values say so).
#[unsafe(no_mangle)]
pub extern "C" fn tier0_strerror(result: c_int) -> *const c_char {
    let text = match result {
        0 => c"OK",
        1 => c"invalid argument",
        2 => c"not found",
        3 => c"already exists",
        4 => c"unauthenticated (wrong cluster token)",
        5 => c"control plane unavailable",
        6 => c"buffer too small",
        7 => c"I/O error on the data daemons",
        8 => c"conflict with the namespace's state",
        9 => c"ring full",
        10 => c"out of memory",
        11 => c"internal error",
        12 => c"the open file's version is no longer readable",
        _ => c"unknown tier0_result",
    };
    text.as_ptr()
}

pub(crate) fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// Runs an entry's body: clears this thread's last error, catches a panic, and on failure
/// keeps the message (prefixed with the function) and returns its result.
pub(crate) fn entry(
    function: &'static str,
    body: impl FnOnce() -> Result<(), Error>,
) -> tier0_result {
    clear_last_error();
    match std::panic::catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => tier0_result::TIER0_OK,
        Ok(Err(error)) => {
            set_last_error(&format!("{function}: {}", error.message));
            error.code
        }
        Err(panic) => {
            set_last_error(&format!(
                "{function}: internal error (a panic): {}",
                panic_message(panic.as_ref())
            ));
            tier0_result::TIER0_INTERNAL
        }
    }
}

/// As [`entry`], for entries that return a value instead of a result (`fallback` on a
/// panic).
pub(crate) fn entry_value<T>(function: &'static str, fallback: T, body: impl FnOnce() -> T) -> T {
    match std::panic::catch_unwind(AssertUnwindSafe(body)) {
        Ok(value) => value,
        Err(panic) => {
            set_last_error(&format!(
                "{function}: internal error (a panic): {}",
                panic_message(panic.as_ref())
            ));
            fallback
        }
    }
}
