//! `tier0 mount MOUNTPOINT`: the global namespace as a FUSE file system (fuser, mounted
//! directly through `/dev/fuse`, which needs root; no libfuse, no `fusermount3`).
//!
//! Inode numbers are the control plane's inode ids (its root is 1, as FUSE's is); a map from
//! inode to path turns the kernel's requests into namespace calls. Reads go through the client
//! shim's striped path ([`Client::read_batch`]) with the layout fetched when the file was
//! opened; writes go through a [`FileWriter`] and are committed when the file is first closed.
//! Only sequential writes of a whole new version are possible: what and why is in
//! `docs/SEMANTICS.md` ("The FUSE mount").

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Args;
use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, Session, SessionACL, TimeOrNow, WriteFlags,
};
use tier0_client::client::FileWriter;
use tier0_client::{Client, FileError, FileLayout, ReadBuffer, StripedError};
use tier0_control_api::client::{ControlClient, Timeouts};
use tier0_control_api::proto;

use super::control::{ControlArgs, failed, read_token};

#[derive(Debug, Args)]
pub struct MountArgs {
    /// The directory to mount the namespace on (it shows the namespace's root).
    mountpoint: PathBuf,
    /// Threads answering the kernel's requests.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Let every user of this host use the mount (else only the user who mounted it).
    #[arg(long)]
    allow_other: bool,
    #[command(flatten)]
    control: ControlArgs,
}

/// How long the kernel may keep a name → inode answer, and a directory's attributes.
const ENTRY_TTL: Duration = Duration::from_secs(1);
/// How long the kernel may keep a file's attributes: not at all, so a file another client
/// committed shows its new size at once (its bytes at the next open).
const FILE_ATTR_TTL: Duration = Duration::ZERO;
/// The errno of a write the mount cannot do: at another offset than the end of what was
/// written, to an existing file opened without `O_TRUNC`, a truncate to a size other than 0.
const UNSUPPORTED: Errno = Errno::EOPNOTSUPP;

pub fn run(args: MountArgs) -> anyhow::Result<()> {
    let meta = std::fs::metadata(&args.mountpoint)
        .with_context(|| format!("mount point {}", args.mountpoint.display()))?;
    if !meta.is_dir() {
        bail!("mount point {}: not a directory", args.mountpoint.display());
    }
    let mountpoint = args
        .mountpoint
        .canonicalize()
        .with_context(|| format!("mount point {}", args.mountpoint.display()))?;
    // SIGINT and SIGTERM are taken below: blocked before any thread starts, so every thread
    // (the client's, the file system's) inherits the mask.
    let signals = super::serve::block_stop_signals()?;
    let token = read_token(args.control.token_file.as_ref())?;
    let url = &args.control.control;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let control = runtime.block_on(ControlClient::connect_with(
        url,
        &token,
        Timeouts::default(),
    ))?;
    // The control plane answers and takes the token before anything is mounted.
    runtime
        .block_on(control.namespace.clone().stat(proto::StatRequest {
            path: "/".to_owned(),
        }))
        .map_err(|status| failed("stat /", &control.url, status))?;
    // The file system's writers borrow the client for the life of the process.
    let client: &'static Client = Box::leak(Box::new(Client::connect(url, &token, "tier0-mount")?));
    // One client per request thread for reads: a client reads one batch at a time, so with
    // one the kernel's parallel reads (readahead, several readers) would queue behind it.
    let mut readers = Vec::with_capacity(args.threads);
    for _ in 0..args.threads.max(1) {
        readers.push(Client::connect(url, &token, "tier0-mount")?);
    }
    // SAFETY: getuid and getgid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let fs = Tier0Fs {
        client,
        readers: Mutex::new(readers),
        control,
        runtime,
        uid,
        gid,
        paths: Mutex::new(HashMap::from([(ROOT, "/".to_owned())])),
        handles: Mutex::new(HashMap::new()),
        next_handle: AtomicU64::new(1),
        open_reads: Mutex::new(HashMap::new()),
    };

    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("tier0".to_owned()),
        MountOption::Subtype("tier0".to_owned()),
        MountOption::NoAtime,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    if args.allow_other {
        config.acl = SessionACL::All;
    }
    config.n_threads = Some(args.threads.max(1));
    let session = Session::new(fs, &mountpoint, &config).with_context(|| {
        format!(
            "mounting on {} (needs root and /dev/fuse)",
            mountpoint.display()
        )
    })?;
    let background = session
        .spawn()
        .context("starting the file system's threads")?;
    tracing::info!(
        control = %url,
        mountpoint = %mountpoint.display(),
        "mounted; unmount with SIGINT, SIGTERM or umount"
    );

    loop {
        if background.guard.is_finished() {
            tracing::info!(mountpoint = %mountpoint.display(), "unmounted from outside");
            return match background.join() {
                Ok(()) => Ok(()),
                Err(error) => Err(error).context("the file system's session ended"),
            };
        }
        if let Some(signal) = wait_for_signal(&signals, Duration::from_millis(200))? {
            tracing::info!(signal, "unmounting");
            break;
        }
    }
    if let Err(error) = background.umount_and_join() {
        tracing::warn!(%error, "the session ended with an error");
    }
    if is_mounted(&mountpoint) {
        // Busy (a process has a file open, or its working directory, below it): detach it
        // now; the kernel finishes the unmount when the last user lets go.
        tracing::warn!(
            mountpoint = %mountpoint.display(),
            "the mount is busy: detaching it (lazy unmount)"
        );
        detach(&mountpoint)?;
    }
    Ok(())
}

/// Waits up to `timeout` for one of the blocked `signals`.
fn wait_for_signal(signals: &libc::sigset_t, timeout: Duration) -> anyhow::Result<Option<i32>> {
    let timeout = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos()),
    };
    // SAFETY: sigtimedwait reads the set and the timeout; no siginfo is asked for.
    let signal = unsafe { libc::sigtimedwait(signals, std::ptr::null_mut(), &timeout) };
    if signal >= 0 {
        return Ok(Some(signal));
    }
    let error = std::io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EAGAIN | libc::EINTR) => Ok(None),
        _ => Err(error).context("waiting for a signal"),
    }
}

/// Whether `path` is a mount point now (`/proc/self/mounts` escapes blanks as octal).
fn is_mounted(path: &Path) -> bool {
    let Some(wanted) = path.to_str() else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|mounts| {
        mounts
            .lines()
            .filter_map(|line| line.split(' ').nth(1))
            .any(|at| unescape_mount_path(at) == wanted)
    })
}

fn unescape_mount_path(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)));
        if let Some(digits) = octal {
            out.push(digits.iter().fold(0u8, |n, d| (n << 3) | (d - b'0')));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn detach(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path_c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .context("the mount point holds a NUL byte")?;
    // SAFETY: a NUL-terminated path that lives across the call.
    if unsafe { libc::umount2(path_c.as_ptr(), libc::MNT_DETACH) } != 0 {
        let error = std::io::Error::last_os_error();
        return Err(error).with_context(|| format!("detaching {}", path.display()));
    }
    Ok(())
}

const ROOT: u64 = 1;

/// The namespace as the kernel sees it.
struct Tier0Fs {
    client: &'static Client,
    /// Clients for reads, one taken per read (read handles are pinned to their layout, so any
    /// client reads any handle's bytes).
    readers: Mutex<Vec<Client>>,
    control: ControlClient,
    runtime: tokio::runtime::Runtime,
    uid: u32,
    gid: u32,
    /// Inode → path, learned from lookups, listings, creates and renames.
    paths: Mutex<HashMap<u64, String>>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_handle: AtomicU64,
    /// Paths with files open for reading, and how many: the client keeps their layouts
    /// cached while any is open, and forgets them at the last release.
    open_reads: Mutex<HashMap<String, usize>>,
}

enum Handle {
    /// Open for reading: pinned to the version current at open (its layout is replaced only
    /// by that same version's newer layout, when a replica moved).
    Read {
        path: String,
        layout: Mutex<Arc<FileLayout>>,
    },
    Write(Mutex<Writing>),
    Dir {
        entries: Vec<(u64, FileType, String)>,
    },
}

/// A file open for writing: a new version, written from offset 0 on.
struct Writing {
    path: String,
    ino: u64,
    state: WriteState,
    written: u64,
    /// A write or the commit failed, or a write was refused: nothing is committed, and
    /// every later call on the handle fails with EIO.
    failed: bool,
}

enum WriteState {
    /// A file with bytes, opened for writing without `O_TRUNC`: nothing can be written
    /// until it is truncated to 0 (`truncate -s 0`, `ftruncate(fd, 0)`).
    Untruncated,
    /// A new version being written.
    Writing(FileWriter<'static>),
    /// Committed, or given up.
    Done,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn join(dir: &str, name: &str) -> String {
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// The errno a failed control-plane call stands for.
fn errno_of(status: &tonic::Status) -> Errno {
    let message = status.message();
    match status.code() {
        tonic::Code::NotFound => Errno::ENOENT,
        tonic::Code::AlreadyExists if message.ends_with("is a directory") => Errno::EISDIR,
        tonic::Code::AlreadyExists => Errno::EEXIST,
        tonic::Code::InvalidArgument => Errno::EINVAL,
        tonic::Code::FailedPrecondition if message.contains("not empty") => Errno::ENOTEMPTY,
        tonic::Code::FailedPrecondition
            if message.contains("not a directory") || message.ends_with("is a file") =>
        {
            Errno::ENOTDIR
        }
        tonic::Code::FailedPrecondition if message.ends_with("is a directory") => Errno::EISDIR,
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => Errno::EACCES,
        _ => Errno::EIO,
    }
}

fn file_errno(error: &FileError) -> Errno {
    match error {
        FileError::Control { status, .. } => errno_of(status),
        _ => Errno::EIO,
    }
}

fn is_dir(entry: &proto::Entry) -> bool {
    entry.kind == proto::EntryKind::Directory as i32
}

impl Tier0Fs {
    fn path(&self, ino: INodeNo) -> Result<String, Errno> {
        lock(&self.paths).get(&ino.0).cloned().ok_or(Errno::ENOENT)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<String, Errno> {
        let name = name.to_str().ok_or(Errno::EINVAL)?;
        Ok(join(&self.path(parent)?, name))
    }

    fn remember(&self, ino: u64, path: &str) {
        lock(&self.paths).insert(ino, path.to_owned());
    }

    /// Logs a failed call: what the user sees is only the errno.
    fn failed(&self, what: &str, status: &tonic::Status) -> Errno {
        let errno = errno_of(status);
        if errno == Errno::EIO {
            tracing::warn!("{what}: {} ({:?})", status.message(), status.code());
        } else {
            tracing::debug!("{what}: {}", status.message());
        }
        errno
    }

    fn stat(&self, path: &str) -> Result<proto::Entry, Errno> {
        let mut namespace = self.control.namespace.clone();
        let reply = self
            .runtime
            .block_on(namespace.stat(proto::StatRequest {
                path: path.to_owned(),
            }))
            .map_err(|status| self.failed(&format!("stat {path}"), &status))?;
        reply.into_inner().entry.ok_or(Errno::EIO)
    }

    fn list(&self, path: &str) -> Result<Vec<proto::Entry>, Errno> {
        let mut namespace = self.control.namespace.clone();
        let reply = self
            .runtime
            .block_on(namespace.list(proto::ListRequest {
                path: path.to_owned(),
            }))
            .map_err(|status| self.failed(&format!("list {path}"), &status))?;
        Ok(reply.into_inner().entries)
    }

    fn delete(&self, path: &str) -> Result<(), Errno> {
        let mut namespace = self.control.namespace.clone();
        self.runtime
            .block_on(namespace.delete(proto::DeleteRequest {
                path: path.to_owned(),
                recursive: false,
            }))
            .map_err(|status| self.failed(&format!("delete {path}"), &status))?;
        Ok(())
    }

    /// The bytes written so far to `ino` through an open handle, if one is writing it.
    fn writing_size(&self, ino: u64) -> Option<u64> {
        let handles: Vec<Arc<Handle>> = lock(&self.handles).values().cloned().collect();
        handles.iter().find_map(|handle| match &**handle {
            Handle::Write(writing) => {
                let writing = lock(writing);
                (writing.ino == ino && matches!(writing.state, WriteState::Writing(_)))
                    .then_some(writing.written)
            }
            _ => None,
        })
    }

    fn attr(&self, entry: &proto::Entry) -> FileAttr {
        let dir = is_dir(entry);
        let size = if dir {
            0
        } else {
            self.writing_size(entry.id).unwrap_or(entry.size)
        };
        let modified = UNIX_EPOCH + Duration::from_millis(entry.modified_ms);
        FileAttr {
            ino: INodeNo(entry.id),
            size,
            blocks: size.div_ceil(512),
            atime: modified,
            mtime: modified,
            ctime: modified,
            crtime: UNIX_EPOCH + Duration::from_millis(entry.created_ms),
            kind: if dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: if dir { 0o755 } else { 0o644 },
            nlink: if dir { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            // The chunk size: what `cp` and friends take as the I/O size to use.
            blksize: entry
                .settings
                .map(|s| s.chunk_size)
                .filter(|&s| s > 0)
                .unwrap_or(4096),
            flags: 0,
        }
    }

    fn attr_ttl(entry: &proto::Entry) -> Duration {
        if is_dir(entry) {
            ENTRY_TTL
        } else {
            FILE_ATTR_TTL
        }
    }

    fn reply_entry(&self, path: &str, entry: &proto::Entry, reply: ReplyEntry) {
        self.remember(entry.id, path);
        reply.entry_with_ttls(
            &Self::attr_ttl(entry),
            &ENTRY_TTL,
            &self.attr(entry),
            Generation(0),
        );
    }

    /// Stats `path` and checks it is still inode `ino` (a path renamed or replaced by
    /// another client names another inode now).
    fn stat_ino(&self, ino: INodeNo) -> Result<(String, proto::Entry), Errno> {
        let path = self.path(ino)?;
        let entry = self.stat(&path)?;
        if entry.id != ino.0 {
            return Err(Errno::ENOENT);
        }
        Ok((path, entry))
    }

    fn add_handle(&self, handle: Handle) -> FileHandle {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(fh, Arc::new(handle));
        FileHandle(fh)
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<Handle>, Errno> {
        lock(&self.handles).get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    /// A new version of `path`, written from offset 0 (nothing is visible until it commits).
    fn writer(&self, path: &str) -> Result<WriteState, Errno> {
        let writer = self.client.create(path).map_err(|error| {
            tracing::warn!("create {path}: {error}");
            file_errno(&error)
        })?;
        Ok(WriteState::Writing(writer))
    }

    fn add_writing(&self, path: &str, ino: u64, state: WriteState) -> FileHandle {
        self.add_handle(Handle::Write(Mutex::new(Writing {
            path: path.to_owned(),
            ino,
            state,
            written: 0,
            failed: false,
        })))
    }

    /// Commits what was written, once; a failure is logged with its reason and is EIO.
    fn commit(writing: &mut Writing) -> Result<(), Errno> {
        let state = std::mem::replace(&mut writing.state, WriteState::Done);
        if writing.failed {
            return Err(Errno::EIO);
        }
        let WriteState::Writing(writer) = state else {
            return Ok(());
        };
        match writer.close() {
            Ok(layout) => {
                tracing::debug!(
                    path = %writing.path,
                    size = layout.size,
                    version = layout.version,
                    "committed"
                );
                Ok(())
            }
            Err(error) => {
                tracing::warn!("commit {}: {error}", writing.path);
                writing.failed = true;
                Err(Errno::EIO)
            }
        }
    }

    /// Drops the mappings of `path` and everything below it.
    fn forget_below(paths: &mut HashMap<u64, String>, path: &str) {
        let below = format!("{path}/");
        paths.retain(|&ino, p| ino == ROOT || (p != path && !p.starts_with(&below)));
    }
}

impl Filesystem for Tier0Fs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // O_TRUNC comes with the open (a truncating open starts a new version) instead of as
        // a separate truncate after it.
        if let Err(missing) = config.add_capabilities(InitFlags::FUSE_ATOMIC_O_TRUNC) {
            tracing::warn!(?missing, "the kernel lacks atomic O_TRUNC");
        }
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let path = match self.child(parent, name) {
            Ok(path) => path,
            Err(errno) => return reply.error(errno),
        };
        match self.stat(&path) {
            Ok(entry) => self.reply_entry(&path, &entry, reply),
            Err(errno) => reply.error(errno),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.stat_ino(ino) {
            Ok((_, entry)) => reply.attr(&Self::attr_ttl(&entry), &self.attr(&entry)),
            Err(errno) => reply.error(errno),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // Modes, owners and times are not kept: they are accepted and change nothing.
        let (path, entry) = match self.stat_ino(ino) {
            Ok(found) => found,
            Err(errno) => return reply.error(errno),
        };
        if let Some(size) = size {
            if is_dir(&entry) {
                return reply.error(Errno::EISDIR);
            }
            let handle = fh.and_then(|fh| self.handle(fh).ok());
            if let Some(Handle::Write(writing)) = handle.as_deref() {
                // Through a handle open for writing: to 0 starts the new version (committed
                // at close); to where the writing is, nothing.
                let mut writing = lock(writing);
                match writing.state {
                    WriteState::Untruncated if size == 0 => match self.writer(&path) {
                        Ok(state) => writing.state = state,
                        Err(errno) => return reply.error(errno),
                    },
                    WriteState::Untruncated if size == entry.size => {}
                    WriteState::Writing(_) if size == writing.written => {}
                    _ => {
                        tracing::info!(
                            "truncate {path} to {size}: only to 0 or to the end of what is \
                             written"
                        );
                        return reply.error(UNSUPPORTED);
                    }
                }
            } else if size != self.writing_size(ino.0).unwrap_or(entry.size) {
                if size != 0 || self.writing_size(ino.0).is_some() {
                    tracing::info!(
                        "truncate {path} to {size}: only to 0, and not while it is written"
                    );
                    return reply.error(UNSUPPORTED);
                }
                // Truncating to 0 by path: an empty new version, now.
                if let Err(error) = self.client.create(&path).and_then(|w| w.close()) {
                    tracing::warn!("truncate {path}: {error}");
                    return reply.error(file_errno(&error));
                }
            }
        }
        match self.stat_ino(ino) {
            Ok((_, entry)) => reply.attr(&Self::attr_ttl(&entry), &self.attr(&entry)),
            Err(errno) => reply.error(errno),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let path = match self.child(parent, name) {
            Ok(path) => path,
            Err(errno) => return reply.error(errno),
        };
        let mut namespace = self.control.namespace.clone();
        let made = self.runtime.block_on(namespace.mkdir(proto::MkdirRequest {
            path: path.clone(),
            parents: false,
            settings: None,
        }));
        match made.map(|reply| reply.into_inner().entry) {
            Ok(Some(entry)) => self.reply_entry(&path, &entry, reply),
            Ok(None) => reply.error(Errno::EIO),
            Err(status) => reply.error(self.failed(&format!("mkdir {path}"), &status)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = self.child(parent, name).and_then(|path| {
            if is_dir(&self.stat(&path)?) {
                return Err(Errno::EISDIR);
            }
            self.delete(&path)?;
            Self::forget_below(&mut lock(&self.paths), &path);
            Ok(())
        });
        match result {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = self.child(parent, name).and_then(|path| {
            if !is_dir(&self.stat(&path)?) {
                return Err(Errno::ENOTDIR);
            }
            self.delete(&path)?;
            Self::forget_below(&mut lock(&self.paths), &path);
            Ok(())
        });
        match result {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if !(flags - RenameFlags::RENAME_NOREPLACE).is_empty() {
            return reply.error(Errno::EINVAL);
        }
        let result = self.child(parent, name).and_then(|from| {
            let to = self.child(newparent, newname)?;
            if flags.contains(RenameFlags::RENAME_NOREPLACE) && self.stat(&to).is_ok() {
                return Err(Errno::EEXIST);
            }
            let mut namespace = self.control.namespace.clone();
            self.runtime
                .block_on(namespace.rename(proto::RenameRequest {
                    from: from.clone(),
                    to: to.clone(),
                }))
                .map_err(|status| self.failed(&format!("rename {from} to {to}"), &status))?;
            let mut paths = lock(&self.paths);
            Self::forget_below(&mut paths, &to);
            let below = format!("{from}/");
            for path in paths.values_mut() {
                if *path == from {
                    path.clone_from(&to);
                } else if let Some(rest) = path.strip_prefix(&below) {
                    *path = format!("{to}/{rest}");
                }
            }
            Ok(())
        });
        match result {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let path = match self.path(ino) {
            Ok(path) => path,
            Err(errno) => return reply.error(errno),
        };
        if flags.acc_mode() == OpenAccMode::O_RDONLY {
            // Close-to-open: every open asks the control plane for the current layout, and
            // the handle reads that version only.
            let layout = match self.client.reopen(&path) {
                Ok(layout) => layout,
                Err(error) => {
                    let errno = file_errno(&error);
                    if errno == Errno::EIO {
                        tracing::warn!("open {path}: {error}");
                    }
                    return reply.error(errno);
                }
            };
            if layout.file_id != ino.0 {
                // Replaced since the kernel looked it up: the kernel must look again.
                return reply.error(Errno::ESTALE);
            }
            *lock(&self.open_reads).entry(path.clone()).or_default() += 1;
            let fh = self.add_handle(Handle::Read {
                path,
                layout: Mutex::new(layout),
            });
            return reply.opened(fh, FopenFlags::empty());
        }
        // Writing makes a whole new version: of an empty file, or with O_TRUNC, or once
        // truncated to 0.
        let state = if flags.0 & libc::O_TRUNC == 0 {
            match self.stat(&path) {
                Ok(entry) if entry.size == 0 => self.writer(&path),
                Ok(_) => Ok(WriteState::Untruncated),
                Err(errno) => Err(errno),
            }
        } else {
            self.writer(&path)
        };
        match state {
            Ok(state) => reply.opened(self.add_writing(&path, ino.0, state), FopenFlags::empty()),
            Err(errno) => reply.error(errno),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let result = self.child(parent, name).and_then(|path| {
            // The writer makes the file (an empty version 0) if it is missing; with O_EXCL
            // the control plane refuses one that exists, so of two such creators one wins.
            let state = if flags & libc::O_EXCL != 0 {
                let writer = self
                    .client
                    .create_new(&path)
                    .map_err(|error| file_errno(&error))?;
                WriteState::Writing(writer)
            } else {
                self.writer(&path)?
            };
            let entry = self.stat(&path)?;
            self.remember(entry.id, &path);
            Ok((self.add_writing(&path, entry.id, state), entry))
        });
        match result {
            Ok((fh, entry)) => reply.created(
                &Self::attr_ttl(&entry),
                &self.attr(&entry),
                Generation(0),
                fh,
                FopenFlags::empty(),
            ),
            Err(errno) => reply.error(errno),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let handle = match self.handle(fh) {
            Ok(handle) => handle,
            Err(errno) => return reply.error(errno),
        };
        let Handle::Read { path, layout } = &*handle else {
            // A file open for writing has no bytes to read until it is committed.
            return reply.error(UNSUPPORTED);
        };
        thread_local! {
            static BUFFER: std::cell::RefCell<Option<ReadBuffer>> =
                const { std::cell::RefCell::new(None) };
        }
        BUFFER.with_borrow_mut(|buffer| {
            let len = size as usize;
            if buffer.as_ref().is_none_or(|b| b.len() < len) {
                match ReadBuffer::new(len.max(1 << 20)) {
                    Ok(fresh) => *buffer = Some(fresh),
                    Err(error) => {
                        tracing::warn!("read buffer of {len} bytes: {error}");
                        return reply.error(Errno::ENOMEM);
                    }
                }
            }
            let buffer = buffer.as_mut().expect("allocated above");
            let ranges = [(offset, u64::from(size), 0)];
            for _ in 0..3 {
                let pinned = Arc::clone(&lock(layout));
                let reader = lock(&self.readers).pop();
                let result = match &reader {
                    Some(reader) => reader.read_pinned(&pinned, &ranges, buffer),
                    None => self.client.read_pinned(&pinned, &ranges, buffer),
                };
                if let Some(reader) = reader {
                    lock(&self.readers).push(reader);
                }
                match result {
                    Ok(got) => return reply.data(&buffer[..got[0] as usize]),
                    Err(FileError::Read { source, .. })
                        if matches!(*source, StripedError::StaleLayout { .. }) =>
                    {
                        // The same version's newer layout (a replica moved), if the file is
                        // still the one this handle opened and the version is still kept.
                        match self.client.open_version(path, pinned.version) {
                            Ok(fresh) if fresh.file_id == pinned.file_id => {
                                *lock(layout) = fresh;
                            }
                            Ok(_) | Err(_) => {
                                tracing::warn!(
                                    "read {path} at {offset}: version {} is no longer readable",
                                    pinned.version
                                );
                                return reply.error(Errno::ESTALE);
                            }
                        }
                    }
                    Err(error) => {
                        tracing::warn!("read {path} at {offset}: {error}");
                        return reply.error(Errno::EIO);
                    }
                }
            }
            reply.error(Errno::ESTALE)
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let handle = match self.handle(fh) {
            Ok(handle) => handle,
            Err(errno) => return reply.error(errno),
        };
        let Handle::Write(writing) = &*handle else {
            return reply.error(Errno::EBADF);
        };
        let mut writing = lock(writing);
        if writing.failed {
            return reply.error(Errno::EIO);
        }
        let written = writing.written;
        let writer = match &mut writing.state {
            WriteState::Writing(writer) if offset == written => writer,
            state => {
                let expected = match state {
                    WriteState::Untruncated => "the file is not truncated".to_owned(),
                    WriteState::Writing(_) => format!("the next offset is {written}"),
                    WriteState::Done => "the file was committed at a close".to_owned(),
                };
                tracing::warn!(
                    "write {} at offset {offset}: only sequential writes of a new version are \
                     supported ({expected}); nothing of this handle will be committed",
                    writing.path
                );
                writing.failed = true;
                return reply.error(UNSUPPORTED);
            }
        };
        match writer.write(data) {
            Ok(()) => {
                writing.written += data.len() as u64;
                reply.written(data.len() as u32);
            }
            Err(error) => {
                tracing::warn!("write {}: {error}", writing.path);
                writing.failed = true;
                reply.error(Errno::EIO);
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Every close() flushes: the first one after a write commits, so close() returns its
        // error. (One before any write is a shell's `dup2` and `close` of a redirection: the
        // writes come after it. A file closed with nothing written commits at release.)
        let result = match self.handle(fh).as_deref() {
            Ok(Handle::Write(writing)) => {
                let mut writing = lock(writing);
                if writing.failed {
                    writing.state = WriteState::Done;
                    Err(Errno::EIO)
                } else if writing.written > 0 {
                    Self::commit(&mut writing)
                } else {
                    Ok(())
                }
            }
            Ok(_) => Ok(()),
            Err(errno) => Err(*errno),
        };
        match result {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Full chunks are on every replica already; the rest, and the version, at close.
        match self.handle(fh).as_deref() {
            Ok(Handle::Write(writing)) if lock(writing).failed => reply.error(Errno::EIO),
            Ok(_) => reply.ok(),
            Err(errno) => reply.error(*errno),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let handle = lock(&self.handles).remove(&fh.0);
        match handle.as_deref() {
            Some(Handle::Write(writing)) => {
                // Flush committed it, unless the kernel released without one; errors are
                // logged there (release's are not seen by anyone).
                let _ = Self::commit(&mut lock(writing));
            }
            Some(Handle::Read { path, .. }) => {
                let mut open = lock(&self.open_reads);
                if let Some(count) = open.get_mut(path) {
                    *count -= 1;
                    if *count == 0 {
                        open.remove(path);
                        self.client.forget(path);
                    }
                }
            }
            _ => {}
        }
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let result = self.path(ino).and_then(|path| {
            let listed = self.list(&path)?;
            let mut entries = vec![
                (ino.0, FileType::Directory, ".".to_owned()),
                (ROOT, FileType::Directory, "..".to_owned()),
            ];
            let mut paths = lock(&self.paths);
            for entry in listed {
                let kind = if is_dir(&entry) {
                    FileType::Directory
                } else {
                    FileType::RegularFile
                };
                paths.insert(entry.id, join(&path, &entry.name));
                entries.push((entry.id, kind, entry.name));
            }
            Ok(entries)
        });
        match result {
            Ok(entries) => reply.opened(
                self.add_handle(Handle::Dir { entries }),
                FopenFlags::empty(),
            ),
            Err(errno) => reply.error(errno),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let handle = match self.handle(fh) {
            Ok(handle) => handle,
            Err(errno) => return reply.error(errno),
        };
        let Handle::Dir { entries } = &*handle else {
            return reply.error(Errno::ENOTDIR);
        };
        for (index, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), index as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        lock(&self.handles).remove(&fh.0);
        reply.ok();
    }

    // Permissions are not kept: ENOSYS tells the kernel once that every access is allowed.
    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    // No symbolic links, hard links or special files (quietly: fuser's defaults warn).
    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::ENOSYS);
    }

    // No extended attributes: ENOSYS tells the kernel once, and it stops asking (callers
    // get EOPNOTSUPP), without fuser's warning for each.
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // The raw capacity of the data nodes in service (before replication).
        const BLOCK: u64 = 4096;
        let mut admin = self.control.admin.clone();
        let (capacity, free) = match self.runtime.block_on(admin.nodes(proto::NodesRequest {})) {
            Ok(reply) => reply
                .into_inner()
                .nodes
                .iter()
                .filter(|node| {
                    node.state == proto::NodeState::Up as i32
                        || node.state == proto::NodeState::Draining as i32
                })
                .filter_map(|node| node.topology.as_ref())
                .fold((0, 0), |(capacity, free), topology| {
                    (
                        capacity + topology.capacity_bytes,
                        free + topology.free_bytes,
                    )
                }),
            Err(status) => {
                self.failed("statfs", &status);
                (0, 0)
            }
        };
        let files = u64::from(u32::MAX);
        reply.statfs(
            capacity / BLOCK,
            free / BLOCK,
            free / BLOCK,
            files,
            files,
            BLOCK as u32,
            255,
            BLOCK as u32,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_join_below_the_root_and_below_directories() {
        assert_eq!(join("/", "a"), "/a");
        assert_eq!(join("/a/b", "c"), "/a/b/c");
    }

    #[test]
    fn control_plane_refusals_become_the_errnos_posix_gives() {
        let errno = |code, message: &str| errno_of(&tonic::Status::new(code, message));
        assert_eq!(errno(tonic::Code::NotFound, "/x: not found"), Errno::ENOENT);
        assert_eq!(
            errno(tonic::Code::AlreadyExists, "/x: already exists"),
            Errno::EEXIST
        );
        assert_eq!(
            errno(tonic::Code::AlreadyExists, "/x: is a directory"),
            Errno::EISDIR
        );
        assert_eq!(
            errno(
                tonic::Code::FailedPrecondition,
                "/d: directory not empty (2 entries below; delete recursively)"
            ),
            Errno::ENOTEMPTY
        );
        assert_eq!(
            errno(
                tonic::Code::FailedPrecondition,
                "/f is a file, not a directory"
            ),
            Errno::ENOTDIR
        );
        assert_eq!(errno(tonic::Code::Unavailable, "store down"), Errno::EIO);
    }

    #[test]
    fn mount_paths_unescape_like_proc_mounts() {
        assert_eq!(unescape_mount_path("/tmp/a\\040b"), "/tmp/a b");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
        assert_eq!(unescape_mount_path("/odd\\"), "/odd\\");
    }

    #[test]
    fn renames_and_deletes_forget_what_was_below() {
        let mut paths = HashMap::from([
            (ROOT, "/".to_owned()),
            (2, "/a".to_owned()),
            (3, "/a/b".to_owned()),
            (4, "/ab".to_owned()),
        ]);
        Tier0Fs::forget_below(&mut paths, "/a");
        let mut left: Vec<_> = paths.into_values().collect();
        left.sort();
        assert_eq!(left, ["/", "/ab"]);
    }
}
