//! The control plane's gRPC server: the namespace, cluster, snapshot and admin services,
//! server reflection, the cluster token on every call, and the leader's background work.

mod convert;
mod services;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Status};

use crate::error::ControlError;
use crate::membership::Membership;
use crate::model::LayoutSettings;
use crate::namespace::Namespace;
use crate::proto;
use crate::store::{EtcdStore, Leadership, MetadataStore, RedbStore, StoreError};
use crate::upkeep::{Upkeep, UpkeepReport};

/// How long a stopping control plane waits for calls in flight.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// The election every control plane of a cluster campaigns in.
pub const LEADER_ELECTION: &str = "control-leader";

/// Where the metadata lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreChoice {
    /// One redb file (`<data dir>/metadata.redb`): a single control plane.
    Redb(PathBuf),
    /// An etcd cluster, every key under `prefix`: several control planes, one leader.
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
    },
}

impl StoreChoice {
    /// Parses `--meta`: `etcd://host:port,host:port[/prefix]`; anything else is an error.
    pub fn parse_etcd(url: &str) -> Result<StoreChoice, ControlError> {
        let bad = |why: &str| ControlError::InvalidArgument(format!("--meta {url:?}: {why}"));
        let rest = url
            .strip_prefix("etcd://")
            .ok_or_else(|| bad("expected etcd://HOST:PORT[,HOST:PORT…][/PREFIX]"))?;
        let (hosts, prefix) = match rest.split_once('/') {
            Some((hosts, prefix)) => (hosts, prefix.trim_matches('/')),
            None => (rest, ""),
        };
        let prefix = if prefix.is_empty() {
            "/tier0/".to_owned()
        } else {
            format!("/{prefix}/")
        };
        let mut endpoints = Vec::new();
        for host in hosts.split(',') {
            crate::membership::check_address(host)
                .map_err(|_| bad(&format!("endpoint {host:?} is not HOST:PORT")))?;
            endpoints.push(format!("http://{host}"));
        }
        Ok(StoreChoice::Etcd { endpoints, prefix })
    }

    pub async fn open(&self) -> Result<Arc<dyn MetadataStore>, StoreError> {
        Ok(match self {
            StoreChoice::Redb(path) => {
                let path = path.clone();
                Arc::new(
                    tokio::task::spawn_blocking(move || RedbStore::open(&path))
                        .await
                        .map_err(|error| StoreError::Unavailable {
                            store: "redb".to_owned(),
                            message: error.to_string(),
                        })??,
                )
            }
            StoreChoice::Etcd { endpoints, prefix } => {
                Arc::new(EtcdStore::connect(endpoints, prefix).await?)
            }
        })
    }
}

/// Debug leaves the token out (`"<redacted>"`): configs end up in logs.
#[derive(Clone)]
pub struct ControlConfig {
    pub listen: SocketAddr,
    pub token: Vec<u8>,
    pub store: StoreChoice,
    /// This control plane's name in elections and health (default: host and port).
    pub control_id: String,
    /// How long a data node's heartbeat keeps it up.
    pub node_lease: Duration,
    /// How long a leader's lease lasts without renewal: the longest a dead leader's work
    /// waits for another control plane to take it over.
    pub leader_ttl: Duration,
    /// How long a placed chunk waits for its writer's commit before it is garbage.
    pub pending_ttl: Duration,
    /// How often the leader re-replicates and collects garbage.
    pub upkeep_interval: Duration,
    /// How long a file's superseded versions are kept after it changed, for readers that
    /// opened them just before.
    pub version_grace: Duration,
    pub defaults: LayoutSettings,
    /// What the leader's rebalancing pass (after each upkeep pass) may do.
    pub rebalance: crate::rebalance::RebalanceConfig,
    /// The URL other hosts reach this control plane at, which the other planes of the
    /// cluster hand the data nodes when this one leads (default: `http://` and the listen
    /// address, unless it is a wildcard).
    pub advertise: Option<String>,
}

impl std::fmt::Debug for ControlConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Every field, so a new one is not left out by accident; the token is a secret.
        let ControlConfig {
            listen,
            token: _,
            store,
            control_id,
            node_lease,
            leader_ttl,
            pending_ttl,
            upkeep_interval,
            version_grace,
            defaults,
            rebalance,
            advertise,
        } = self;
        f.debug_struct("ControlConfig")
            .field("listen", listen)
            .field("token", &"<redacted>")
            .field("store", store)
            .field("control_id", control_id)
            .field("node_lease", node_lease)
            .field("leader_ttl", leader_ttl)
            .field("pending_ttl", pending_ttl)
            .field("upkeep_interval", upkeep_interval)
            .field("version_grace", version_grace)
            .field("defaults", defaults)
            .field("rebalance", rebalance)
            .field("advertise", advertise)
            .finish()
    }
}

impl ControlConfig {
    pub fn new(listen: SocketAddr, token: Vec<u8>, store: StoreChoice) -> ControlConfig {
        ControlConfig {
            listen,
            token,
            store,
            control_id: String::new(),
            node_lease: Duration::from_secs(10),
            leader_ttl: Duration::from_secs(5),
            pending_ttl: Duration::from_secs(3600),
            upkeep_interval: Duration::from_secs(10),
            version_grace: Duration::from_secs(600),
            defaults: LayoutSettings::default(),
            rebalance: crate::rebalance::RebalanceConfig::default(),
            advertise: None,
        }
    }
}

/// What every service shares.
#[derive(Debug)]
pub(crate) struct ControlState {
    pub namespace: Namespace,
    pub membership: Membership,
    pub upkeep: Upkeep,
    /// Serialises upkeep passes (the leader's timer and `RunUpkeep` calls).
    pub upkeep_lock: tokio::sync::Mutex<()>,
    pub upkeep_interval: Duration,
    pub control_id: String,
    pub leadership: Leadership,
    /// The data nodes' latest read-heat reports (soft state, from their heartbeats).
    pub heat: crate::heat::HeatTable,
    /// GPUs and jobs as schedulers report them (soft state).
    pub gpus: crate::orchestration::GpuTable,
    pub rebalance: crate::rebalance::RebalanceConfig,
    /// The leader's advertised URL as last looked up, and when (heartbeats ask often).
    pub leader_url: tokio::sync::Mutex<Option<(std::time::Instant, Option<String>)>>,
}

impl ControlState {
    /// The URL of the control plane that leads, when it is another one that advertised
    /// one; looked up at most once a second.
    pub async fn other_leader_url(&self) -> Option<String> {
        if *self.leadership.borrow() {
            return None;
        }
        let mut cached = self.leader_url.lock().await;
        if let Some((at, url)) = &*cached
            && at.elapsed() < Duration::from_secs(1)
        {
            return url.clone();
        }
        let store = self.namespace.store();
        let url = match store.leader(LEADER_ELECTION).await {
            Ok(Some(leader)) if leader != self.control_id => {
                match store.get(&crate::model::plane_key(&leader)).await {
                    Ok(Some(entry)) => {
                        crate::model::decode::<String>(&entry.key, &entry.value).ok()
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        *cached = Some((std::time::Instant::now(), url.clone()));
        url
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("control plane: cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("control plane: {0}")]
    Control(#[from] ControlError),
    #[error("control plane: {0}")]
    Store(#[from] StoreError),
    #[error("control plane: reflection: {0}")]
    Reflection(String),
    #[error("control plane: the empty token is not a token (set TIER0_TOKEN or --token-file)")]
    EmptyToken,
}

/// A running control plane; `shutdown` stops it, dropping it aborts it.
#[derive(Debug)]
pub struct ControlServer {
    addr: SocketAddr,
    state: Arc<ControlState>,
    stop: Option<oneshot::Sender<()>>,
    serving: JoinHandle<Result<(), tonic::transport::Error>>,
    background: JoinHandle<()>,
}

/// Checks the cluster token on every call, in constant time.
#[derive(Clone)]
pub(crate) struct TokenCheck {
    token: Arc<Vec<u8>>,
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        match presented {
            Some(token) if constant_time_eq::constant_time_eq(token.as_bytes(), &self.token) => {
                Ok(request)
            }
            Some(_) => Err(Status::unauthenticated("the cluster token does not match")),
            None => Err(Status::unauthenticated(
                "no cluster token: send `authorization: Bearer <token>`",
            )),
        }
    }
}

impl ControlServer {
    /// Opens the store, binds `config.listen` and serves until `shutdown`.
    pub async fn start(config: ControlConfig) -> Result<ControlServer, ServerError> {
        if config.token.is_empty() {
            return Err(ServerError::EmptyToken);
        }
        let store = config.store.open().await?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServerError::Listen {
                addr: config.listen,
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ServerError::Listen {
                addr: config.listen,
                source,
            })?;
        let control_id = if config.control_id.is_empty() {
            format!("control-{addr}")
        } else {
            config.control_id.clone()
        };
        let namespace =
            Namespace::new(Arc::clone(&store), config.defaults, config.pending_ttl).await?;
        // Where the others send the data nodes while this plane leads (decision 56).
        let advertise = config
            .advertise
            .clone()
            .or_else(|| (!addr.ip().is_unspecified()).then(|| format!("http://{addr}")));
        if let Some(url) = &advertise {
            let mut txn = crate::store::Txn::new();
            txn.put(
                crate::model::plane_key(&control_id),
                crate::model::encode(url),
            );
            store.commit(&txn).await?;
        }
        let leadership = store
            .campaign(LEADER_ELECTION, &control_id, config.leader_ttl)
            .await?;
        let state = Arc::new(ControlState {
            namespace,
            membership: Membership::new(Arc::clone(&store), config.node_lease),
            upkeep: Upkeep::new(Arc::clone(&store), config.token.clone())
                .with_version_grace(config.version_grace),
            upkeep_lock: tokio::sync::Mutex::new(()),
            upkeep_interval: config.upkeep_interval,
            heat: crate::heat::HeatTable::default(),
            gpus: crate::orchestration::GpuTable::default(),
            rebalance: config.rebalance.clone(),
            control_id,
            leadership,
            leader_url: tokio::sync::Mutex::new(None),
        });
        let check = TokenCheck {
            token: Arc::new(config.token.clone()),
        };
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|error| ServerError::Reflection(error.to_string()))?;
        let service = services::Services {
            state: Arc::clone(&state),
        };
        let router = tonic::transport::Server::builder()
            .add_service(InterceptedService::new(
                proto::namespace_server::NamespaceServer::new(service.clone()),
                check.clone(),
            ))
            .add_service(InterceptedService::new(
                proto::cluster_server::ClusterServer::new(service.clone()),
                check.clone(),
            ))
            .add_service(InterceptedService::new(
                proto::snapshots_server::SnapshotsServer::new(service.clone()),
                check.clone(),
            ))
            .add_service(InterceptedService::new(
                proto::orchestration_server::OrchestrationServer::new(service.clone()),
                check.clone(),
            ))
            .add_service(InterceptedService::new(
                proto::admin_server::AdminServer::new(service),
                check.clone(),
            ))
            .add_service(InterceptedService::new(reflection, check));
        let (stop, stopped) = oneshot::channel();
        let serving = tokio::spawn(router.serve_with_incoming_shutdown(
            // Replies are small: without TCP_NODELAY each one can wait out the client's
            // delayed ACK (40 ms on Linux) behind Nagle's algorithm.
            tokio_stream::StreamExt::map(TcpListenerStream::new(listener), |stream| {
                stream.inspect(|stream| {
                    let _ = stream.set_nodelay(true);
                })
            }),
            async {
                let _ = stopped.await;
            },
        ));
        let background = tokio::spawn(leader_loop(Arc::clone(&state)));
        tracing::info!(
            %addr,
            store = state.namespace.store().kind(),
            location = %state.namespace.store().location(),
            id = %state.control_id,
            "control plane serving"
        );
        Ok(ControlServer {
            addr,
            state,
            stop: Some(stop),
            serving,
            background,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn is_leader(&self) -> bool {
        *self.state.leadership.borrow()
    }

    /// Stops taking calls, finishes those in flight, and steps down.
    /// Calls in flight get [`SHUTDOWN_GRACE`] to finish; connections still open after it
    /// (clients keep their HTTP/2 connections open between calls) are closed.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.background.abort();
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut self.serving)
            .await
            .is_err()
        {
            self.serving.abort();
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.serving.abort();
        self.background.abort();
    }
}

/// While this control plane leads: expire node leases every half lease, and run upkeep
/// every upkeep interval.
async fn leader_loop(state: Arc<ControlState>) {
    let period = (state.membership.lease() / 2).max(Duration::from_millis(50));
    let mut leadership = state.leadership.clone();
    let mut last_upkeep = tokio::time::Instant::now();
    loop {
        if !*leadership.borrow_and_update() {
            if leadership.changed().await.is_err() {
                return;
            }
            continue;
        }
        if let Err(error) = state.membership.expire_leases().await {
            tracing::warn!(%error, "leader: lease expiry failed");
        }
        if last_upkeep.elapsed() >= state.upkeep_interval {
            last_upkeep = tokio::time::Instant::now();
            match run_upkeep(&state).await {
                Ok(report) => {
                    for problem in &report.problems {
                        tracing::warn!(%problem, "upkeep");
                    }
                }
                Err(error) => tracing::warn!(%error, "leader: upkeep failed"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(period.min(state.upkeep_interval)) => {}
            changed = leadership.changed() => if changed.is_err() { return },
        }
    }
}

/// One upkeep pass, if this control plane leads.
pub(crate) async fn run_upkeep(state: &ControlState) -> Result<UpkeepReport, ControlError> {
    let _pass = state.upkeep_lock.lock().await;
    if !*state.leadership.borrow() {
        let leader = state
            .namespace
            .store()
            .leader(LEADER_ELECTION)
            .await?
            .unwrap_or_else(|| "no control plane".to_owned());
        return Err(ControlError::FailedPrecondition(format!(
            "{} does not lead ({leader} does): upkeep runs on the leader",
            state.control_id
        )));
    }
    let mut report = state.upkeep.run().await?;
    let moves = rebalance(state).await?;
    let now = crate::model::now_ms();
    for prefix in [crate::model::AUDIT_PREFIX, crate::model::AGENT_AUDIT_PREFIX] {
        crate::rebalance::trim_audit(
            state.namespace.store().as_ref(),
            prefix,
            now,
            state.rebalance.audit_retention,
            crate::rebalance::AUDIT_WINDOW,
        )
        .await?;
    }
    report.moves_planned = moves.planned;
    report.moves_executed = moves.executed;
    report.moves_refused = moves.refused;
    report.moves_failed = moves.failed;
    report.bytes_moved = moves.bytes_moved;
    Ok(report)
}

/// The rebalancing pass: over every file a declared job will read.
async fn rebalance(
    state: &ControlState,
) -> Result<crate::rebalance::RebalanceReport, ControlError> {
    // What schedulers said, to whichever control plane: the store has it all.
    crate::orchestration::refresh(state.namespace.store().as_ref(), &state.gpus).await?;
    let (_, jobs) = state.gpus.snapshot();
    let nodes = state.membership.nodes().await?;
    let prestages = state.gpus.prestages();
    let mut paths: Vec<&str> = jobs
        .iter()
        .flat_map(|job| job.paths.iter().map(String::as_str))
        .chain(prestages.iter().map(|(path, _)| path.as_str()))
        .collect();
    // A node over its watermark may shed replicas of any file: look at all of them.
    let watermark = state
        .rebalance
        .policies
        .lowest_watermark(state.rebalance.high_watermark);
    if nodes.iter().any(|node| {
        let capacity = node.topology.capacity_bytes;
        capacity > 0
            && (capacity.saturating_sub(node.topology.free_bytes) as f64)
                > capacity as f64 * watermark
    }) {
        paths.push("/");
    }
    let mut layouts = Vec::new();
    let mut seen = std::collections::HashSet::new();
    {
        for declared in paths {
            let Ok(path) = crate::path::NsPath::parse("path", declared) else {
                continue;
            };
            // A path that does not exist (yet) has nothing to move.
            let Ok(files) = state.namespace.files_under(&path).await else {
                continue;
            };
            for file in files {
                let Ok(file_path) = crate::path::NsPath::parse("path", &file) else {
                    continue;
                };
                if let Ok(layout) = state.namespace.open(&file_path, None).await
                    && seen.insert(layout.file_id)
                {
                    let tags = match state.namespace.stat(&file_path).await {
                        Ok(stat) => stat.inode.tags,
                        Err(_) => Default::default(),
                    };
                    layouts.push((layout, tags));
                }
            }
        }
    }
    crate::rebalance::run(
        &state.rebalance,
        state.namespace.store().as_ref(),
        &state.upkeep,
        &state.gpus,
        &state.heat,
        &layouts,
        &nodes,
    )
    .await
}
