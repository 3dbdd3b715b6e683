//! A data node's membership agent: registers the node with the control plane, heartbeats
//! within its lease, and hands the fences each heartbeat brings to the data daemon.
//!
//! It runs on its own thread with its own small runtime, so a daemon (whose workers are
//! plain threads) needs no async code of its own. A control plane that is unreachable is
//! retried every heartbeat interval; one that forgot the node (a fresh store) gets it
//! registered again, with all fences sent anew.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::client::ControlClient;
use crate::proto;

/// Receives `(file id, lowest valid layout version)` pairs.
pub type FenceSink = Box<dyn Fn(&[(u64, u64)]) + Send>;
/// Free bytes on the node's drives now.
pub type FreeBytes = Box<dyn Fn() -> u64 + Send>;

pub struct AgentConfig {
    pub control: String,
    pub token: Vec<u8>,
    pub node_id: String,
    /// The data daemon's address as other hosts reach it.
    pub address: String,
    pub topology: proto::TopologySummary,
    /// Heartbeat period; by default a third of the lease the control plane grants.
    pub interval: Option<Duration>,
    pub fences: FenceSink,
    pub free_bytes: FreeBytes,
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("control", &self.control)
            .field("node_id", &self.node_id)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

/// The running agent; `stop` (or drop) ends it.
#[derive(Debug)]
pub struct Agent {
    stop: Arc<AtomicBool>,
    registered: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Agent {
    pub fn spawn(config: AgentConfig) -> std::io::Result<Agent> {
        let stop = Arc::new(AtomicBool::new(false));
        let registered = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("tier0-agent".into())
            .spawn({
                let stop = Arc::clone(&stop);
                let registered = Arc::clone(&registered);
                move || match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime.block_on(run(config, &stop, &registered)),
                    Err(error) => eprintln!("tier0: membership agent: no runtime: {error}"),
                }
            })?;
        Ok(Agent {
            stop,
            registered,
            thread: Some(thread),
        })
    }

    /// Whether the control plane has accepted the node's registration (and not lost it).
    pub fn is_registered(&self) -> bool {
        self.registered.load(Ordering::Acquire)
    }

    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Sleeps `period` in short steps, returning early (`false`) when asked to stop.
async fn pause(period: Duration, stop: &AtomicBool) -> bool {
    let step = Duration::from_millis(20);
    let mut left = period;
    while !left.is_zero() {
        if stop.load(Ordering::Acquire) {
            return false;
        }
        let now = left.min(step);
        tokio::time::sleep(now).await;
        left -= now;
    }
    !stop.load(Ordering::Acquire)
}

async fn run(config: AgentConfig, stop: &AtomicBool, registered: &AtomicBool) {
    let retry = config.interval.unwrap_or(Duration::from_secs(1));
    let mut warned = false;
    'connect: while !stop.load(Ordering::Acquire) {
        let mut client = match ControlClient::connect(&config.control, &config.token).await {
            Ok(client) => client,
            Err(error) => {
                if !warned {
                    tracing::warn!(%error, "membership: control plane unreachable; retrying");
                    warned = true;
                }
                pause(retry, stop).await;
                continue;
            }
        };
        let lease = match client
            .cluster
            .register(proto::RegisterRequest {
                node_id: config.node_id.clone(),
                address: config.address.clone(),
                topology: Some(proto::TopologySummary {
                    free_bytes: (config.free_bytes)(),
                    ..config.topology.clone()
                }),
            })
            .await
        {
            Ok(reply) => Duration::from_millis(reply.into_inner().lease_ms),
            Err(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "membership: registration refused");
                pause(retry, stop).await;
                continue;
            }
        };
        registered.store(true, Ordering::Release);
        warned = false;
        tracing::info!(node = %config.node_id, control = %config.control, ?lease, "registered");
        let interval = config
            .interval
            .unwrap_or(lease / 3)
            .max(Duration::from_millis(10));
        let mut fence_revision = 0;
        loop {
            let reply = client
                .cluster
                .heartbeat(proto::HeartbeatRequest {
                    node_id: config.node_id.clone(),
                    free_bytes: (config.free_bytes)(),
                    has_free_bytes: true,
                    fence_revision,
                })
                .await;
            match reply {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    let fences: Vec<(u64, u64)> = reply
                        .fences
                        .iter()
                        .map(|f| (f.file_id, f.layout_version))
                        .collect();
                    if !fences.is_empty() {
                        (config.fences)(&fences);
                    }
                    fence_revision = reply.fence_revision;
                }
                Err(status) if status.code() == tonic::Code::NotFound => {
                    // The control plane no longer knows the node: register again.
                    registered.store(false, Ordering::Release);
                    continue 'connect;
                }
                Err(status) => {
                    tracing::warn!(code = ?status.code(), message = status.message(), "membership: heartbeat failed");
                    if status.code() == tonic::Code::Unavailable {
                        registered.store(false, Ordering::Release);
                        pause(retry, stop).await;
                        continue 'connect;
                    }
                }
            }
            if !pause(interval, stop).await {
                return;
            }
        }
    }
}
