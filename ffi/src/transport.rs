//! The client's transports behind one trait: TCP and the node-local shared-memory path
//! ([`DaemonConnection`]), and RDMA ([`RdmaConnection`]). All speak the same wire protocol
//! and deliver checksum-verified bytes into the caller's destination.

use std::net::ToSocketAddrs;
use std::sync::Arc;
use std::time::Duration;

use tier0_dataplane::store::ChunkId;

use crate::daemon::{ClientError, DaemonConnection, ReadInto};
use crate::rdma::{RdmaClient, RdmaConnection, RdmaOrTcp};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportKind {
    Tcp,
    Rdma,
    /// The daemon's node-local socket and shared buffer pool (same node only).
    Local,
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TransportKind::Tcp => "tcp",
            TransportKind::Rdma => "rdma",
            TransportKind::Local => "local",
        })
    }
}

/// What a client asks for: RDMA where both sides have it, or one transport by force.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TransportChoice {
    /// The node-local fast path when the daemon runs on this node; else RDMA when this host
    /// and the daemon both have a device; else TCP.
    #[default]
    Auto,
    Tcp,
    /// RDMA or an error.
    Rdma,
    /// The node-local fast path or an error.
    Local,
}

impl std::str::FromStr for TransportChoice {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(TransportChoice::Auto),
            "tcp" => Ok(TransportChoice::Tcp),
            "rdma" => Ok(TransportChoice::Rdma),
            "local" => Ok(TransportChoice::Local),
            other => Err(format!(
                "unknown transport {other:?} (auto, tcp, rdma, local)"
            )),
        }
    }
}

/// One session with one data daemon.
pub trait Transport: Send + std::fmt::Debug {
    fn kind(&self) -> TransportKind;

    /// The daemon's node name.
    fn node(&self) -> &str;

    /// The daemon's address.
    fn addr(&self) -> &str;

    /// Largest read in one request.
    fn max_payload(&self) -> u32;

    /// Reads every range straight into its destination, pipelined, each checked against the
    /// CRC32C the daemon computed. One result per read; a transport failure fails the reads it
    /// left unanswered. Over RDMA each destination must lie in memory registered with
    /// [`RdmaClient::register`].
    fn read_many(&mut self, reads: &mut [ReadInto<'_>]) -> Vec<Result<(), ClientError>> {
        self.read_window(reads, usize::MAX, None)
    }

    /// As [`read_many`](Self::read_many), with at most `window` requests in flight (RDMA:
    /// also at most the daemon's credits): the next goes out as each reply lands. `landed`,
    /// if given, is called, as it happens, for each read whose bytes landed and passed their check,
    /// with its index in `reads` and its time from request to last byte.
    fn read_window(
        &mut self,
        reads: &mut [ReadInto<'_>],
        window: usize,
        landed: Option<&mut dyn FnMut(usize, Duration)>,
    ) -> Vec<Result<(), ClientError>>;

    /// Stores a new chunk.
    fn write(&mut self, chunk: ChunkId, data: &[u8]) -> Result<(), ClientError>;

    fn delete(&mut self, chunk: ChunkId) -> Result<(), ClientError>;

    /// No transport or framing failure so far.
    fn is_healthy(&self) -> bool;

    /// After this returns, the daemon can no longer change the caller's memory: an RDMA
    /// queue pair is moved to the error state (a late WRITE is refused by the NIC). Used
    /// before a read is retried on another replica.
    fn fence(&mut self);
}

/// Connects to a daemon with the transport `choice` asks for. `rdma` is this host's device
/// context (`None`: TCP only; with `TransportChoice::Rdma` that is an error).
pub fn connect(
    addr: impl ToSocketAddrs,
    token: &[u8],
    client: &str,
    timeout: Duration,
    choice: TransportChoice,
    rdma: Option<&Arc<RdmaClient>>,
) -> Result<Box<dyn Transport>, ClientError> {
    let addr: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|source| ClientError::Io {
            addr: "?".into(),
            operation: "resolving the address",
            source,
        })?
        .collect();
    if matches!(choice, TransportChoice::Auto | TransportChoice::Local) {
        // A plain handshake first: its welcome says whether the daemon is on this node.
        let tcp = DaemonConnection::connect(&addr[..], token, client, timeout)?;
        match tcp.local_endpoint_here() {
            Some(endpoint) => {
                match DaemonConnection::connect_local(endpoint, tcp.addr(), token, client, timeout)
                {
                    Ok(local) => return Ok(Box::new(local)),
                    Err(error) if choice == TransportChoice::Local => return Err(error),
                    Err(error) => {
                        tracing::info!(%error, "no node-local fast path: staying on the network")
                    }
                }
            }
            None if choice == TransportChoice::Local => {
                return Err(ClientError::Unusable {
                    addr: tcp.addr().to_string(),
                    what: format!(
                        "the node-local path was asked for, but daemon {} is not on this node \
                         or has no local socket",
                        tcp.node()
                    ),
                });
            }
            None => {}
        }
        if rdma.is_none() {
            return Ok(Box::new(tcp));
        }
    }
    match (choice, rdma) {
        (TransportChoice::Rdma, None) => Err(ClientError::Unusable {
            addr: addr.first().map(|a| a.to_string()).unwrap_or_default(),
            what: "RDMA was asked for but this host has no RDMA device open".into(),
        }),
        (TransportChoice::Tcp, _) | (_, None) => Ok(Box::new(DaemonConnection::connect(
            &addr[..],
            token,
            client,
            timeout,
        )?)),
        (choice, Some(rdma)) => {
            match RdmaConnection::connect(rdma, &addr[..], token, client, timeout)? {
                RdmaOrTcp::Rdma(connection) => Ok(connection),
                RdmaOrTcp::Tcp(connection) if choice == TransportChoice::Auto => {
                    Ok(Box::new(connection))
                }
                RdmaOrTcp::Tcp(connection) => Err(ClientError::NoRdma {
                    addr: connection.addr().to_string(),
                    node: connection.node().to_string(),
                }),
            }
        }
    }
}

impl Transport for DaemonConnection {
    fn kind(&self) -> TransportKind {
        if self.is_local() {
            TransportKind::Local
        } else {
            TransportKind::Tcp
        }
    }

    fn node(&self) -> &str {
        DaemonConnection::node(self)
    }

    fn addr(&self) -> &str {
        DaemonConnection::addr(self)
    }

    fn max_payload(&self) -> u32 {
        DaemonConnection::max_payload(self)
    }

    fn read_window(
        &mut self,
        reads: &mut [ReadInto<'_>],
        window: usize,
        landed: Option<&mut dyn FnMut(usize, Duration)>,
    ) -> Vec<Result<(), ClientError>> {
        DaemonConnection::read_window(self, reads, window, landed)
    }

    fn write(&mut self, chunk: ChunkId, data: &[u8]) -> Result<(), ClientError> {
        DaemonConnection::write(self, chunk, data)
    }

    fn delete(&mut self, chunk: ChunkId) -> Result<(), ClientError> {
        DaemonConnection::delete(self, chunk)
    }

    fn is_healthy(&self) -> bool {
        DaemonConnection::is_healthy(self)
    }

    /// Bytes reach memory over TCP, or are copied out of the shared pool, only while
    /// `read_many` runs: nothing to stop.
    fn fence(&mut self) {}
}
