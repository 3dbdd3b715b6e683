//! The two kinds of stream a daemon serves the wire protocol on: TCP, and the node-local
//! Unix socket of the shared-memory fast path. Everything above the socket is the same.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

#[derive(Debug)]
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Who is on the other end, for logs.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Peer {
    Tcp(SocketAddr),
    /// A process on this node: its pid and uid as the kernel reports them (SO_PEERCRED).
    Unix {
        pid: i32,
        uid: u32,
    },
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(addr) => write!(f, "{addr}"),
            Peer::Unix { pid, uid } => write!(f, "local pid {pid} uid {uid}"),
        }
    }
}

impl Stream {
    pub(crate) fn is_local(&self) -> bool {
        matches!(self, Stream::Unix(_))
    }

    pub(crate) fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(stream) => stream.set_read_timeout(timeout),
            Stream::Unix(stream) => stream.set_read_timeout(timeout),
        }
    }

    pub(crate) fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(stream) => stream.set_write_timeout(timeout),
            Stream::Unix(stream) => stream.set_write_timeout(timeout),
        }
    }

    pub(crate) fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        match self {
            Stream::Tcp(stream) => stream.set_nonblocking(nonblocking),
            Stream::Unix(stream) => stream.set_nonblocking(nonblocking),
        }
    }

    /// TCP_NODELAY on TCP; a Unix socket has no Nagle to turn off.
    pub(crate) fn set_nodelay(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(stream) => stream.set_nodelay(true),
            Stream::Unix(_) => Ok(()),
        }
    }

    pub(crate) fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Tcp(stream) => stream.shutdown(how),
            Stream::Unix(stream) => stream.shutdown(how),
        }
    }

    pub(crate) fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(stream) => Stream::Tcp(stream.try_clone()?),
            Stream::Unix(stream) => Stream::Unix(stream.try_clone()?),
        })
    }

    /// Sends `bytes` with `fd` attached (SCM_RIGHTS; Unix sockets only): the fd arrives with
    /// the first byte. Returns how many bytes the socket took.
    pub(crate) fn send_with_fd(&self, bytes: &[u8], fd: BorrowedFd<'_>) -> io::Result<usize> {
        use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
        let Stream::Unix(stream) = self else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "fds travel over Unix sockets only",
            ));
        };
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        let fds = [fd];
        control.push(SendAncillaryMessage::ScmRights(&fds));
        Ok(sendmsg(
            stream,
            &[IoSlice::new(bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        )?)
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(stream) => stream.as_raw_fd(),
            Stream::Unix(stream) => stream.as_raw_fd(),
        }
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(stream) => stream.as_fd(),
            Stream::Unix(stream) => stream.as_fd(),
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(stream) => (&*stream).read(buf),
            Stream::Unix(stream) => (&*stream).read(buf),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(stream) => (&*stream).write(buf),
            Stream::Unix(stream) => (&*stream).write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(stream) => (&*stream).write_vectored(bufs),
            Stream::Unix(stream) => (&*stream).write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (&*self).write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The peer of an accepted Unix connection, from the kernel's credentials.
pub(crate) fn unix_peer(stream: &UnixStream) -> Peer {
    match rustix::net::sockopt::socket_peercred(stream) {
        Ok(cred) => Peer::Unix {
            pid: cred.pid.as_raw_nonzero().get(),
            uid: cred.uid.as_raw(),
        },
        Err(_) => Peer::Unix { pid: 0, uid: 0 },
    }
}

/// This kernel's boot id: two processes that read the same one run on the same node.
pub fn boot_id() -> &'static str {
    static BOOT_ID: OnceLock<String> = OnceLock::new();
    BOOT_ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|id| id.trim().to_string())
            .unwrap_or_default()
    })
}

/// A Unix socket address as the protocol writes it: `@name` in the abstract namespace (no
/// file, gone with the process, scoped to the network namespace), anything else a path.
pub fn local_socket_addr(name: &str) -> io::Result<UnixAddr> {
    use std::os::linux::net::SocketAddrExt as _;
    match name.strip_prefix('@') {
        Some(abstract_name) => UnixAddr::from_abstract_name(abstract_name.as_bytes()),
        None => UnixAddr::from_pathname(name),
    }
}

/// The listening node-local socket; a filesystem socket is removed when it is dropped.
#[derive(Debug)]
pub(crate) struct LocalListener {
    pub(crate) listener: UnixListener,
    pub(crate) name: String,
    path: Option<PathBuf>,
}

impl LocalListener {
    /// Binds `name`. A filesystem socket left behind by a daemon that died is replaced; one
    /// that a live daemon still answers on is an error (`AddrInUse`).
    pub(crate) fn bind(name: &str) -> io::Result<LocalListener> {
        let addr = local_socket_addr(name)?;
        let path = addr.as_pathname().map(PathBuf::from);
        if let Some(path) = &path
            && path.exists()
        {
            if UnixStream::connect_addr(&addr).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{}: a daemon is already listening there", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind_addr(&addr)?;
        if let Some(path) = &path {
            // Any local process may connect; the cluster token is what admits it, as on TCP.
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
        }
        listener.set_nonblocking(true)?;
        Ok(LocalListener {
            listener,
            name: name.to_string(),
            path,
        })
    }
}

impl Drop for LocalListener {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}
