//! A data node's membership agent: registers the node with the control plane, heartbeats
//! within its lease, and hands the fences each heartbeat brings to the data daemon.
//!
//! It runs on its own thread with its own small runtime, so a daemon (whose workers are
//! plain threads) needs no async code of its own. It knows one or more control planes (of one
//! cluster, on one etcd): when the one it talks to fails (unreachable, dead, hung, or its
//! store away), it registers with the next at once, and only once every one has failed does
//! it wait a heartbeat interval before going round again. One that forgot the node (a fresh
//! store) gets it registered again, with all fences sent anew.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::client::{ControlClient, Timeouts};
use crate::proto;

/// Receives `(file id, lowest valid layout version)` pairs.
pub type FenceSink = Box<dyn Fn(&[(u64, u64)]) + Send>;
/// Free bytes on the node's drives now.
pub type FreeBytes = Box<dyn Fn() -> u64 + Send>;
/// The node's hottest chunks now, for the next heartbeat.
pub type HeatSource = Box<dyn Fn() -> HeatReport + Send>;
/// The node's GPUs as NVML measures them now; `None` where there is no NVML.
pub type GpuSource = Box<dyn Fn() -> Option<Vec<proto::GpuStatus>> + Send>;

/// What a heartbeat says about read heat: decayed counts and their half-life.
#[derive(Clone, Debug, Default)]
pub struct HeatReport {
    pub half_life: Duration,
    /// At most 4096 (the control plane refuses more).
    pub chunks: Vec<proto::ExtentHeat>,
}

/// Chunks one heartbeat reports at most (the control plane refuses more).
pub const MAX_HEAT_REPORT: usize = 4096;

impl HeatReport {
    /// For a node that counts no reads.
    pub fn none() -> HeatReport {
        HeatReport::default()
    }

    /// The hottest chunks of a data daemon's heat map, now.
    pub fn from_map(heat: &tier0_dataplane::heat::HeatMap) -> HeatReport {
        HeatReport {
            half_life: heat.half_life(),
            chunks: heat
                .hottest(MAX_HEAT_REPORT)
                .into_iter()
                .map(|(chunk, heat)| proto::ExtentHeat {
                    chunk: Some(proto::ChunkId {
                        file: chunk.file,
                        index: chunk.index,
                        generation: chunk.generation,
                    }),
                    reads: heat.reads,
                    bytes: heat.bytes,
                })
                .collect(),
        }
    }
}

pub struct AgentConfig {
    /// The control planes' URLs (`http://host:port` or `host:port`), tried in this order;
    /// at least one. Several must share one store (etcd).
    pub control: Vec<String>,
    pub token: Vec<u8>,
    pub node_id: String,
    /// The data daemon's address as other hosts reach it.
    pub address: String,
    pub topology: proto::TopologySummary,
    /// Heartbeat period; by default a third of the lease the control plane grants.
    pub interval: Option<Duration>,
    pub fences: FenceSink,
    pub free_bytes: FreeBytes,
    pub heat: HeatSource,
    pub gpus: GpuSource,
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
        if config.control.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "membership agent: no control plane URL",
            ));
        }
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

/// The control planes an agent may talk to, and which one it talks to now. A failure moves
/// it to the next; once every one has failed in a row, it waits a retry period first. A
/// plane that does not lead names the leader in its heartbeat replies: the agent moves there
/// (the rebalancer plans on the leader, from the heat and GPU measures heartbeats carry), and
/// back to its list if the leader cannot be reached, ignoring such hints for a while.
struct Planes<'a> {
    urls: &'a [String],
    current: usize,
    /// Failures in a row, across the planes.
    failures: usize,
    /// The leader, as a plane of the list named it.
    leader: Option<String>,
    /// Hints are not followed before this, after a leader named could not be reached.
    hints_after: Option<std::time::Instant>,
}

/// How long an agent ignores leader hints after failing to reach a leader it was sent to.
const HINT_BACKOFF: Duration = Duration::from_secs(60);

impl Planes<'_> {
    fn url(&self) -> &str {
        self.leader.as_deref().unwrap_or(&self.urls[self.current])
    }

    /// Moves to the next plane after a failure of this one. `false` when every plane has
    /// failed since the last success: time to wait before going round again.
    fn failed(&mut self) -> bool {
        if self.leader.take().is_some() {
            // The leader we were sent to: back to the list at once, hints ignored a while.
            self.hints_after = Some(std::time::Instant::now() + HINT_BACKOFF);
            return true;
        }
        self.failures += 1;
        self.current = (self.current + 1) % self.urls.len();
        !self.failures.is_multiple_of(self.urls.len())
    }

    /// A heartbeat reply named the leader: whether to move there now.
    fn follow(&mut self, leader: &str) -> bool {
        let ignoring = self
            .hints_after
            .is_some_and(|after| std::time::Instant::now() < after);
        if leader.is_empty() || ignoring || leader == self.url() {
            return false;
        }
        self.leader = Some(leader.to_string());
        true
    }

    /// This plane works: the next failure starts a new outage.
    fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// Whether this failure is the first of the plane in this outage (worth a warning; the
    /// rounds after it are not).
    fn first_round(&self) -> bool {
        self.failures < self.urls.len()
    }
}

/// A call that failed for want of the control plane (dead, unreachable, too slow, or its
/// store away) rather than for what it asked: another control plane may serve it.
fn unreachable(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unknown
    )
}

/// How long a heartbeat may take: half the lease, so a hung control plane leaves time to
/// try another before the lease runs out; within [0.5 s, 5 s].
fn heartbeat_timeout(lease: Duration) -> Duration {
    (lease / 2).clamp(Duration::from_millis(500), Duration::from_secs(5))
}

async fn run(config: AgentConfig, stop: &AtomicBool, registered: &AtomicBool) {
    let retry = config.interval.unwrap_or(Duration::from_secs(1));
    let timeouts = Timeouts {
        // A dead host answers no SYN: give up on it soon, another plane may answer.
        connect: Duration::from_secs(2),
        request: Duration::from_secs(5),
        ..Timeouts::default()
    };
    let mut planes = Planes {
        urls: &config.control,
        current: 0,
        failures: 0,
        leader: None,
        hints_after: None,
    };
    // Whether the last attempt failed and the next needs to wait a retry period first.
    let mut wait = false;
    'connect: while !stop.load(Ordering::Acquire) {
        if wait && !pause(retry, stop).await {
            return;
        }
        wait = false;
        let url = planes.url().to_owned();
        let mut client = match ControlClient::connect_with(&url, &config.token, timeouts).await {
            Ok(client) => client,
            Err(error) => {
                if planes.first_round() {
                    tracing::warn!(%error, "membership: control plane unreachable; retrying (the next, if several)");
                }
                wait = !planes.failed();
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
                if planes.first_round() {
                    tracing::warn!(control = %url, code = ?status.code(), message = status.message(), "membership: registration refused");
                }
                wait = !planes.failed();
                continue;
            }
        };
        registered.store(true, Ordering::Release);
        tracing::info!(node = %config.node_id, control = %url, ?lease, "registered");
        let interval = config
            .interval
            .unwrap_or(lease / 3)
            .max(Duration::from_millis(10));
        let mut fence_revision = 0;
        loop {
            let heat = (config.heat)();
            let gpus = (config.gpus)();
            let mut request = tonic::Request::new(proto::HeartbeatRequest {
                node_id: config.node_id.clone(),
                free_bytes: (config.free_bytes)(),
                has_free_bytes: true,
                fence_revision,
                heat: heat.chunks,
                heat_half_life_ms: heat.half_life.as_millis() as u64,
                has_gpus: gpus.is_some(),
                gpus: gpus.unwrap_or_default(),
            });
            request.set_timeout(heartbeat_timeout(lease));
            match client.cluster.heartbeat(request).await {
                Ok(reply) => {
                    // Only a heartbeat that went through ends an outage: a plane that takes
                    // registrations but fails every heartbeat must not be retried in a loop.
                    planes.succeeded();
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
                    if planes.follow(&reply.leader_url) {
                        tracing::info!(from = %url, leader = %reply.leader_url, "membership: moving to the leading control plane");
                        registered.store(false, Ordering::Release);
                        continue 'connect;
                    }
                }
                Err(status) if status.code() == tonic::Code::NotFound => {
                    // The control plane no longer knows the node: register again.
                    registered.store(false, Ordering::Release);
                    continue 'connect;
                }
                Err(status) if unreachable(status.code()) => {
                    // This control plane is gone (or hung, or lost its store): register with
                    // the next at once, before the lease runs out; all fences come anew.
                    tracing::warn!(control = %url, code = ?status.code(), message = status.message(), "membership: heartbeat failed; registering again (with the next control plane, if several)");
                    registered.store(false, Ordering::Release);
                    wait = !planes.failed();
                    continue 'connect;
                }
                Err(status) => {
                    tracing::warn!(control = %url, code = ?status.code(), message = status.message(), "membership: heartbeat refused");
                }
            }
            if !pause(interval, stop).await {
                return;
            }
        }
    }
}
