//! What the daemon tests share: a real daemon on loopback with one store file, and a bare
//! blocking client on the wire codec.
#![allow(dead_code)] // Each test binary uses its own part.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use tier0_dataplane::daemon::{DataDaemon, DataDaemonConfig, DriveConfig, RdmaMode};
use tier0_dataplane::net::replicate::CopyConfig;
use tier0_dataplane::net::tcp::LocalSocket;
use tier0_dataplane::net::wire::{
    self, ErrorReply, HEADER_SIZE, Header, Hello, LayoutRef, Message, Read, ReadDone, Replicate,
    Write,
};
use tier0_dataplane::store::format::crc32c;
use tier0_dataplane::store::{ChunkId, StoreConfig};
use tier0_dataplane::worker::PollMode;
use tier0_topology::WorkerPlan;

pub const CHUNK: u32 = 64 << 10;
pub const TOKEN: &[u8] = b"replicate-test-token";

pub struct Node {
    pub daemon: Option<DataDaemon>,
    pub dir: PathBuf,
}

impl Node {
    pub fn start(name: &str, token: &[u8], copies: CopyConfig) -> Node {
        Node::start_in(&std::env::temp_dir(), name, token, copies, true)
    }

    /// A daemon whose store file is in a new folder under `root`; `map_memory_drives` as in
    /// [`DataDaemonConfig`].
    pub fn start_in(
        root: &std::path::Path,
        name: &str,
        token: &[u8],
        copies: CopyConfig,
        map_memory_drives: bool,
    ) -> Node {
        let dir = root.join(format!(
            "tier0-replicate-{name}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let config = DataDaemonConfig {
            node: name.to_string(),
            listen: "127.0.0.1:0".parse().unwrap(),
            token: token.to_vec(),
            drives: vec![DriveConfig {
                path: dir.join("store"),
                create_size: Some(16 << 20),
                numa_node: 0,
            }],
            store: StoreConfig {
                chunk_size: CHUNK,
                checksum_block_size: 4096,
            },
            poll_mode: PollMode::Adaptive,
            in_flight_max: 16,
            buffers_per_worker: 8,
            hugepages: false,
            pin: false,
            rdma: RdmaMode::Off,
            local_socket: LocalSocket::Off,
            map_memory_drives,
        };
        let daemon =
            DataDaemon::start_with_copies(&config, &WorkerPlan::single_node(0, vec![0]), copies)
                .unwrap();
        Node {
            daemon: Some(daemon),
            dir,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.daemon.as_ref().unwrap().local_addr()
    }

    pub fn chunks(&self) -> usize {
        let daemon = self.daemon.as_ref().unwrap();
        daemon.stores().iter().map(|store| store.len()).sum()
    }

    pub fn connect(&self) -> Conn {
        Conn::connect(self.addr(), TOKEN)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(daemon) = self.daemon.take() {
            daemon.shutdown();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn copies(max_in_flight: usize, timeout: Duration) -> CopyConfig {
    CopyConfig {
        max_in_flight,
        timeout,
    }
}

/// A bare blocking client on the wire codec.
pub struct Conn {
    pub stream: TcpStream,
    pub next_id: u64,
}

impl Conn {
    pub fn connect(addr: SocketAddr, token: &[u8]) -> Conn {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut conn = Conn { stream, next_id: 1 };
        let hello = Message::Hello(Hello {
            token: token.to_vec(),
            client: "replicate-test".into(),
            rdma: None,
        });
        conn.send_frame(0, &hello, &[]);
        match conn.receive().1 {
            Message::Welcome(_) => conn,
            other => panic!("no welcome: {other:?}"),
        }
    }

    pub fn send_frame(&mut self, id: u64, message: &Message, payload: &[u8]) {
        let mut frame = Vec::new();
        wire::encode(id, message, &mut frame).unwrap();
        frame.extend_from_slice(payload);
        self.stream.write_all(&frame).unwrap();
    }

    pub fn send(&mut self, message: &Message, payload: &[u8]) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.send_frame(id, message, payload);
        id
    }

    /// The next reply: its header, message and payload.
    pub fn receive(&mut self) -> (Header, Message, Vec<u8>) {
        let mut head = [0u8; HEADER_SIZE];
        self.stream.read_exact(&mut head).unwrap();
        let header = Header::decode(&head, CHUNK).unwrap();
        let mut body = vec![0u8; header.body_len as usize];
        self.stream.read_exact(&mut body).unwrap();
        let message = wire::decode_body(&header, &body).unwrap();
        let mut payload = vec![0u8; header.payload_len as usize];
        self.stream.read_exact(&mut payload).unwrap();
        (header, message, payload)
    }

    pub fn call(&mut self, message: &Message, payload: &[u8]) -> (Message, Vec<u8>) {
        let id = self.send(message, payload);
        let (header, reply, payload) = self.receive();
        assert_eq!(header.request_id, id);
        (reply, payload)
    }

    pub fn write(&mut self, chunk: ChunkId, data: &[u8]) {
        let write = Message::Write(Write {
            chunk,
            len: data.len() as u32,
            crc: crc32c(data),
        });
        assert_eq!(self.call(&write, data).0, Message::WriteDone);
    }

    pub fn read(&mut self, chunk: ChunkId, len: u32) -> Result<Vec<u8>, ErrorReply> {
        let read = Message::Read(Read {
            chunk,
            offset: 0,
            len,
            layout: LayoutRef::default(),
        });
        match self.call(&read, &[]) {
            (Message::ReadDone(ReadDone { crc, .. }), bytes) => {
                assert_eq!(crc32c(&bytes), crc);
                Ok(bytes)
            }
            (Message::Error(error), _) => Err(error),
            (other, _) => panic!("unexpected reply {other:?}"),
        }
    }

    pub fn replicate(&mut self, chunk: ChunkId, len: u32, source: &str) -> Result<(), ErrorReply> {
        let replicate = Message::Replicate(Replicate {
            chunk,
            len,
            source: source.to_string(),
        });
        match self.call(&replicate, &[]).0 {
            Message::WriteDone => Ok(()),
            Message::Error(error) => Err(error),
            other => panic!("unexpected reply {other:?}"),
        }
    }
}

pub fn chunk(index: u32) -> ChunkId {
    ChunkId {
        file: 0x7e57,
        index,
        generation: 1,
    }
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}
