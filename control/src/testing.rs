//! Test support: a real, throwaway etcd server.
//!
//! [`EtcdServer`] runs the `etcd` binary found on `PATH` (Debian's `etcd-server` package) as a
//! one-member cluster on loopback, with its data in a temporary directory that goes when the
//! server is dropped. Its output goes to `etcd.log` in that directory, so test output stays
//! clean; a server that fails to start reports the log's tail.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a starting etcd gets to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How many times to pick fresh ports when a start fails (another process took one).
const START_ATTEMPTS: usize = 3;
/// How much of the log an error carries.
const LOG_TAIL_BYTES: u64 = 4096;

/// A running etcd, killed (and its data removed) on drop.
#[derive(Debug)]
pub struct EtcdServer {
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl EtcdServer {
    /// Starts etcd on two free loopback ports and waits until it serves requests.
    pub async fn start() -> Result<EtcdServer, String> {
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("tier0-etcd-")
                .tempdir()
                .map_err(|e| format!("etcd: cannot make a temporary directory: {e}"))?;
            let (client_port, peer_port) = free_ports()?;
            let mut server = EtcdServer {
                dir,
                client_port,
                peer_port,
                child: None,
            };
            match server.launch().await {
                Ok(()) => return Ok(server),
                Err(err) => last = err,
            }
        }
        Err(last)
    }

    /// The client URL, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Kills etcd with SIGKILL, as a crash would; its data directory stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // It may have exited already; either way it must be reaped.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same data directory and ports (after [`kill`](Self::kill),
    /// or kills it first).
    pub async fn restart(&mut self) -> Result<(), String> {
        self.kill();
        self.launch().await
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    async fn launch(&mut self) -> Result<(), String> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("etcd: cannot open its log: {e}"))?;
        let stderr = log
            .try_clone()
            .map_err(|e| format!("etcd: cannot open its log: {e}"))?;
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new("etcd")
            .arg("--name=tier0-test")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=tier0-test={peer}"))
            // A lone member elects itself after one election timeout: keep it short, and with
            // it etcd's minimum lease ttl (1.5 election timeouts), so 1 s leases work.
            .arg("--heartbeat-interval=25")
            .arg("--election-timeout=250")
            .arg("--logger=zap")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("etcd: cannot run `etcd` (is etcd-server installed?): {e}"))?;
        self.child = Some(child);
        let ready = self.wait_ready().await;
        if let Err(err) = ready {
            self.kill();
            return Err(format!(
                "{err}\n--- etcd.log (tail) ---\n{}",
                self.log_tail()
            ));
        }
        Ok(())
    }

    /// Connects and reads until etcd answers, it exits, or [`READY_TIMEOUT`] passes.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let endpoint = self.endpoint();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!("etcd at {endpoint} exited at start: {status}"));
            }
            let attempt = async {
                let mut client = etcd_client::Client::connect([endpoint.as_str()], None).await?;
                client.get("ready", None).await
            };
            let error = match tokio::time::timeout(Duration::from_secs(1), attempt).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(err)) => err.to_string(),
                Err(_) => "no answer".to_owned(),
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "etcd at {endpoint} not ready in {READY_TIMEOUT:?}: {error}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_tail(&self) -> String {
        let read = || -> std::io::Result<String> {
            let mut file = File::open(self.log_path())?;
            let len = file.metadata()?.len();
            file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))?;
            let mut tail = Vec::new();
            file.read_to_end(&mut tail)?;
            Ok(String::from_utf8_lossy(&tail).into_owned())
        };
        read().unwrap_or_else(|e| format!("(cannot read the log: {e})"))
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        // The temporary directory goes after this, with the data.
        self.kill();
    }
}

/// Two ports free now: bound to port 0 together (so they differ), then let go for etcd.
fn free_ports() -> Result<(u16, u16), String> {
    let bind = || {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| Ok((listener.local_addr()?.port(), listener)))
            .map_err(|e| format!("etcd: cannot find a free port: {e}"))
    };
    let (client, _client) = bind()?;
    let (peer, _peer) = bind()?;
    Ok((client, peer))
}
