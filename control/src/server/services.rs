//! The four services over the shared state: each call checks its request (`convert`),
//! calls the domain, and maps the answer back.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::ControlState;
use super::convert::{self, status};
use crate::agents;
use crate::model::{self, InodeKind, NodeState};
use crate::namespace::{CommitChunk, Found};
use crate::proto;
use crate::snapshot::DiffChange;
use crate::store::Change;

#[derive(Clone, Debug)]
pub(crate) struct Services {
    pub state: Arc<ControlState>,
}

type Reply<T> = Result<Response<T>, Status>;

impl Services {
    /// The current layout of the file at `path` (the request's `path` field).
    async fn current_layout(&self, path: &str) -> Result<model::Layout, Status> {
        let path = convert::path("path", path)?;
        self.state.namespace.open(&path, None).await.map_err(status)
    }

    /// An agent's call that would change something: held to the agents policy and recorded
    /// in the agent audit log (`None`: not an agent's call).
    async fn agent_call(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        call: agents::Call,
    ) -> Result<Option<agents::Ticket>, Status> {
        let Some(agent) = agents::caller(metadata) else {
            return Ok(None);
        };
        agents::admit(
            self.state.namespace.store().as_ref(),
            self.state.rebalance.policies.agents(),
            agent,
            call,
        )
        .await
        .map(Some)
    }

    /// Refuses (and records) an agent's call that would change something and is no agent
    /// action; lets every other call through.
    async fn no_agents(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        rpc: &'static str,
    ) -> Result<(), Status> {
        // `admit` refuses every call that is no agent action: a ticket never comes back.
        if let Some(ticket) = self.agent_call(metadata, agents::Call::other(rpc)).await? {
            let refused = Err::<(), _>(Status::permission_denied(format!(
                "{rpc}: not an agent action"
            )));
            ticket
                .finish(self.state.namespace.store().as_ref(), &refused)
                .await;
            return refused;
        }
        Ok(())
    }

    /// Records how an agent's call ended, if it was an agent's.
    async fn agent_done<T>(&self, ticket: Option<agents::Ticket>, result: &Result<T, Status>) {
        agents::finish(ticket, self.state.namespace.store().as_ref(), result).await;
    }
}

/// A request's path as the agents policy sees it: normalised when it is valid (an invalid one
/// fails the call after it is recorded).
fn agent_path(text: &str) -> String {
    crate::path::NsPath::parse("path", text)
        .map(|path| path.to_string())
        .unwrap_or_else(|_| text.to_owned())
}

#[tonic::async_trait]
impl proto::namespace_server::Namespace for Services {
    async fn mkdir(&self, request: Request<proto::MkdirRequest>) -> Reply<proto::EntryReply> {
        self.no_agents(request.metadata(), "Namespace.Mkdir")
            .await?;
        let request = request.into_inner();
        let path = convert::path("path", &request.path)?;
        let inode = self
            .state
            .namespace
            .mkdir(&path, request.parents, convert::settings(request.settings))
            .await
            .map_err(status)?;
        Ok(Response::new(proto::EntryReply {
            path: path.to_string(),
            entry: Some(convert::entry(&inode)),
        }))
    }

    async fn create(&self, request: Request<proto::CreateRequest>) -> Reply<proto::EntryReply> {
        self.no_agents(request.metadata(), "Namespace.Create")
            .await?;
        let request = request.into_inner();
        let path = convert::path("path", &request.path)?;
        let inode = self
            .state
            .namespace
            .create(
                &path,
                convert::settings(request.settings),
                request.exclusive,
            )
            .await
            .map_err(status)?;
        Ok(Response::new(proto::EntryReply {
            path: path.to_string(),
            entry: Some(convert::entry(&inode)),
        }))
    }

    async fn open(&self, request: Request<proto::OpenRequest>) -> Reply<proto::Layout> {
        let request = request.into_inner();
        let path = convert::path("path", &request.path)?;
        let version = (request.version != 0).then_some(request.version);
        let layout = self
            .state
            .namespace
            .open(&path, version)
            .await
            .map_err(status)?;
        Ok(Response::new(convert::layout(&layout)))
    }

    async fn place_chunks(
        &self,
        request: Request<proto::PlaceChunksRequest>,
    ) -> Reply<proto::PlaceChunksReply> {
        self.no_agents(request.metadata(), "Namespace.PlaceChunks")
            .await?;
        let request = request.into_inner();
        let path = convert::path("path", &request.path)?;
        if request.file_id == 0 {
            return Err(Status::invalid_argument("file_id: missing (0)"));
        }
        let placement = self
            .state
            .namespace
            .place_chunks(&path, request.file_id, request.first_index, request.count)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::PlaceChunksReply {
            file_id: placement.file_id,
            chunks: placement.chunks.iter().map(convert::layout_chunk).collect(),
            nodes: placement.nodes.iter().map(convert::layout_node).collect(),
        }))
    }

    async fn commit(&self, request: Request<proto::CommitRequest>) -> Reply<proto::Layout> {
        self.no_agents(request.metadata(), "Namespace.Commit")
            .await?;
        let request = request.into_inner();
        let path = convert::path("path", &request.path)?;
        if request.file_id == 0 {
            return Err(Status::invalid_argument("file_id: missing (0)"));
        }
        let mut chunks = Vec::with_capacity(request.chunks.len());
        for (position, chunk) in request.chunks.into_iter().enumerate() {
            let id = convert::chunk_id(&format!("chunks[{position}].id"), chunk.id)?;
            if id.file == 0 {
                return Err(Status::invalid_argument(format!(
                    "chunks[{position}].id.file: missing (0)"
                )));
            }
            chunks.push(CommitChunk {
                index: chunk.index,
                id,
                len: chunk.length,
            });
        }
        let layout = self
            .state
            .namespace
            .commit(
                &path,
                request.file_id,
                request.base_version,
                request.size,
                chunks,
            )
            .await
            .map_err(status)?;
        Ok(Response::new(convert::layout(&layout)))
    }

    async fn stat(&self, request: Request<proto::StatRequest>) -> Reply<proto::StatReply> {
        let path = convert::path("path", &request.into_inner().path)?;
        let stat = self.state.namespace.stat(&path).await.map_err(status)?;
        Ok(Response::new(proto::StatReply {
            path: stat.path.to_string(),
            entry: Some(convert::entry(&stat.inode)),
            versions: stat.versions,
        }))
    }

    async fn list(&self, request: Request<proto::ListRequest>) -> Reply<proto::ListReply> {
        let path = convert::path("path", &request.into_inner().path)?;
        let entries = self.state.namespace.list(&path).await.map_err(status)?;
        Ok(Response::new(proto::ListReply {
            path: path.to_string(),
            entries: entries.iter().map(convert::entry).collect(),
        }))
    }

    async fn rename(&self, request: Request<proto::RenameRequest>) -> Reply<proto::EntryReply> {
        self.no_agents(request.metadata(), "Namespace.Rename")
            .await?;
        let request = request.into_inner();
        let from = convert::path("from", &request.from)?;
        let to = convert::path("to", &request.to)?;
        let inode = self
            .state
            .namespace
            .rename(&from, &to)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::EntryReply {
            path: to.to_string(),
            entry: Some(convert::entry(&inode)),
        }))
    }

    async fn delete(&self, request: Request<proto::DeleteRequest>) -> Reply<proto::DeleteReply> {
        self.no_agents(request.metadata(), "Namespace.Delete")
            .await?;
        let request = request.into_inner();
        let path = convert::path("path", &request.path)?;
        let removed = self
            .state
            .namespace
            .delete(&path, request.recursive)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::DeleteReply {
            removed: removed as u64,
        }))
    }

    async fn tag(&self, request: Request<proto::TagRequest>) -> Reply<proto::EntryReply> {
        self.no_agents(request.metadata(), "Namespace.Tag").await?;
        let request = request.into_inner();
        let path = convert::path("path", &request.path)?;
        let set: BTreeMap<String, String> = request.set.into_iter().collect();
        let inode = self
            .state
            .namespace
            .tag(&path, &set, &request.remove)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::EntryReply {
            path: path.to_string(),
            entry: Some(convert::entry(&inode)),
        }))
    }

    type WatchLayoutsStream =
        Pin<Box<dyn Stream<Item = Result<proto::LayoutChange, Status>> + Send + 'static>>;

    async fn watch_layouts(
        &self,
        request: Request<proto::WatchLayoutsRequest>,
    ) -> Reply<Self::WatchLayoutsStream> {
        let path = convert::path("path", &request.into_inner().path)?;
        let namespace = &self.state.namespace;
        // Watch first, then read the subtree, so no change between the two is missed.
        let watch = namespace
            .store()
            .watch(model::INODES_PREFIX)
            .await
            .map_err(|error| status(error.into()))?;
        let top = namespace.resolve(&path).await.map_err(status)?;
        let watched = if top.inode.is_dir() {
            let mut tree = Tree::new(top.inode.id);
            for (_, found) in namespace.subtree(&top).await.map_err(status)? {
                tree.add(&found);
            }
            Watched::Tree(tree)
        } else {
            Watched::File(top.key.clone())
        };
        let (sender, receiver) = tokio::sync::mpsc::channel(256);
        tokio::spawn(forward_layout_changes(
            Arc::clone(&self.state),
            watch,
            watched,
            sender,
        ));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }
}

/// What a store watch that ended tells its client (redb drops a watcher that fell too far
/// behind; an etcd watch can fail): its cache may have missed changes.
const WATCH_ENDED: &str = "the watch fell behind or the store went away: watch again";

/// Turns a store watch into a client's layout changes until the client goes away (even if
/// no change of its ever comes) or the store watch ends (said, as `Unavailable`).
async fn forward_layout_changes(
    state: Arc<ControlState>,
    mut watch: crate::store::Watch,
    mut watched: Watched,
    sender: tokio::sync::mpsc::Sender<Result<proto::LayoutChange, Status>>,
) {
    loop {
        let change = tokio::select! {
            _ = sender.closed() => return,
            change = watch.recv() => change,
        };
        let message = match change {
            None => Err(Status::unavailable(WATCH_ENDED)),
            Some(Err(error)) => Err(Status::unavailable(format!("{WATCH_ENDED} ({error})"))),
            Some(Ok(change)) => match layout_change(&state, &change, &mut watched).await {
                Ok(Some(message)) => Ok(message),
                Ok(None) => continue,
                Err(status) => Err(status),
            },
        };
        let failed = message.is_err();
        // `send` fails at once if the client has gone, even while the channel is full.
        if sender.send(message).await.is_err() || failed {
            return;
        }
    }
}

/// What a watch reports on.
enum Watched {
    /// One file, by its record's key.
    File(String),
    /// The files in a directory and everything below it.
    Tree(Tree),
}

/// The directories whose entries a watch reports: the watched one and every directory below
/// it, kept up to date as directories are made, moved in, moved out and removed.
struct Tree {
    top: u64,
    /// Each directory below the top: the key its record is at, and its parent.
    below: HashMap<u64, (String, u64)>,
    /// The same, by key: which directory (if any) a deleted key was.
    keys: HashMap<String, u64>,
}

impl Tree {
    fn new(top: u64) -> Tree {
        Tree {
            top,
            below: HashMap::new(),
            keys: HashMap::new(),
        }
    }

    fn contains(&self, directory: u64) -> bool {
        directory == self.top || self.below.contains_key(&directory)
    }

    /// Adds a directory (a file is ignored); `true` if it was not in the tree before (made,
    /// or moved in: what is below it must be read).
    fn add(&mut self, found: &Found) -> bool {
        let inode = &found.inode;
        if !inode.is_dir() || inode.id == self.top {
            return false;
        }
        let old = self
            .below
            .insert(inode.id, (found.key.clone(), inode.parent));
        if let Some((old_key, _)) = &old
            && *old_key != found.key
            && self.keys.get(old_key) == Some(&inode.id)
        {
            self.keys.remove(old_key);
        }
        self.keys.insert(found.key.clone(), inode.id);
        old.is_none()
    }

    /// A record at `key` was deleted: if it was a directory of the tree (and has not been
    /// put at another key of it since, as a move within the tree does), it leaves the tree,
    /// and every directory below it with it.
    fn remove(&mut self, key: &str) {
        let Some(gone) = self.keys.remove(key) else {
            return;
        };
        let mut leaving = vec![gone];
        while let Some(directory) = leaving.pop() {
            if let Some((key, _)) = self.below.remove(&directory)
                && self.keys.get(&key) == Some(&directory)
            {
                self.keys.remove(&key);
            }
            leaving.extend(
                self.below
                    .iter()
                    .filter(|(_, (_, parent))| *parent == directory)
                    .map(|(id, _)| *id),
            );
        }
    }
}

/// The layout change a committed inode change means for a watcher, if any, keeping the
/// watched tree up to date on the way.
async fn layout_change(
    state: &ControlState,
    change: &Change,
    watched: &mut Watched,
) -> Result<Option<proto::LayoutChange>, Status> {
    let Some((parent, name)) = parse_inode_key(change.key()) else {
        return Ok(None);
    };
    let in_view = match watched {
        Watched::File(key) => key == change.key(),
        Watched::Tree(tree) => tree.contains(parent),
    };
    if !in_view {
        return Ok(None);
    }
    match change {
        Change::Put(entry) => {
            let Ok(found) = crate::namespace::found(entry.clone()) else {
                return Ok(None);
            };
            match &found.inode.kind {
                InodeKind::Directory { .. } => {
                    if let Watched::Tree(tree) = watched
                        && tree.add(&found)
                    {
                        // Made here, or moved in with whatever is below it: its
                        // subdirectories are watched too.
                        let below = state.namespace.subtree(&found).await.map_err(|error| {
                            Status::unavailable(format!("{WATCH_ENDED} ({error})"))
                        })?;
                        for (_, found) in &below {
                            tree.add(found);
                        }
                    }
                    Ok(None)
                }
                InodeKind::File(file) => Ok(Some(proto::LayoutChange {
                    file_id: found.inode.id,
                    name: name.to_owned(),
                    parent_id: parent,
                    version: file.version,
                    layout_version: file.layout_version,
                    deleted: false,
                })),
            }
        }
        Change::Delete { key, .. } => {
            if let Watched::Tree(tree) = watched {
                tree.remove(key);
            }
            Ok(Some(proto::LayoutChange {
                name: name.to_owned(),
                parent_id: parent,
                deleted: true,
                ..Default::default()
            }))
        }
    }
}

fn parse_inode_key(key: &str) -> Option<(u64, &str)> {
    let rest = key.strip_prefix(model::INODES_PREFIX)?;
    let (parent, name) = rest.split_once('/')?;
    Some((u64::from_str_radix(parent, 16).ok()?, name))
}

#[tonic::async_trait]
impl proto::cluster_server::Cluster for Services {
    async fn register(
        &self,
        request: Request<proto::RegisterRequest>,
    ) -> Reply<proto::RegisterReply> {
        self.no_agents(request.metadata(), "Cluster.Register")
            .await?;
        let request = request.into_inner();
        let node = self
            .state
            .membership
            .register(
                &request.node_id,
                &request.address,
                convert::topology(request.topology),
            )
            .await
            .map_err(status)?;
        Ok(Response::new(proto::RegisterReply {
            node: Some(convert::node(&node)),
            lease_ms: self.state.membership.lease().as_millis() as u64,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<proto::HeartbeatRequest>,
    ) -> Reply<proto::HeartbeatReply> {
        self.no_agents(request.metadata(), "Cluster.Heartbeat")
            .await?;
        let request = request.into_inner();
        let free = request.has_free_bytes.then_some(request.free_bytes);
        let (half_life, heat) = convert::heat_report(request.heat, request.heat_half_life_ms)?;
        let measured = if request.has_gpus {
            check_gpus(&request.gpus)?;
            Some(
                request
                    .gpus
                    .into_iter()
                    .map(|gpu| crate::orchestration::GpuStatus {
                        index: gpu.index,
                        busy: gpu.busy,
                        job: String::new(),
                        measured: Some(crate::orchestration::Measured {
                            utilization_percent: gpu.utilization_percent.min(100),
                            compute_processes: gpu.compute_processes,
                            memory_used_bytes: gpu.memory_used_bytes,
                        }),
                    })
                    .collect(),
            )
        } else {
            None
        };
        let reply = self
            .state
            .membership
            .heartbeat(&request.node_id, free, request.fence_revision)
            .await
            .map_err(status)?;
        // Only a node the membership knows gets here: its report replaces its last one.
        self.state.heat.report(&request.node_id, half_life, heat);
        match measured {
            Some(gpus) => self.state.gpus.measure(&request.node_id, gpus),
            None => self.state.gpus.forget_measures(&request.node_id),
        }
        Ok(Response::new(proto::HeartbeatReply {
            state: convert::node_state(reply.state) as i32,
            lease_ms: reply.lease.as_millis() as u64,
            fences: reply
                .fences
                .iter()
                .map(|&(file_id, layout_version)| proto::Fence {
                    file_id,
                    layout_version,
                })
                .collect(),
            fence_revision: reply.fence_revision,
            leader_url: self.state.other_leader_url().await.unwrap_or_default(),
        }))
    }

    async fn drain(&self, request: Request<proto::DrainRequest>) -> Reply<proto::Node> {
        self.no_agents(request.metadata(), "Cluster.Drain").await?;
        let request = request.into_inner();
        let node = self
            .state
            .membership
            .drain(&request.node_id, request.cancel)
            .await
            .map_err(status)?;
        Ok(Response::new(convert::node(&node)))
    }
}

#[tonic::async_trait]
impl proto::snapshots_server::Snapshots for Services {
    async fn create(
        &self,
        request: Request<proto::CreateSnapshotRequest>,
    ) -> Reply<proto::SnapshotInfo> {
        let (metadata, _, request) = request.into_parts();
        let call = agents::Call {
            rpc: "Snapshots.Create",
            action: Some(crate::policy::AgentAction::Snapshot),
            path: Some(agent_path(&request.path)),
            detail: format!("snapshot {}", request.name),
        };
        let ticket = self.agent_call(&metadata, call).await?;
        let result = async {
            let path = convert::path("path", &request.path)?;
            let snapshot = self
                .state
                .namespace
                .create_snapshot(&request.name, &path)
                .await
                .map_err(status)?;
            Ok(Response::new(convert::snapshot_info(&snapshot)))
        }
        .await;
        self.agent_done(ticket, &result).await;
        result
    }

    async fn list(
        &self,
        request: Request<proto::ListSnapshotsRequest>,
    ) -> Reply<proto::ListSnapshotsReply> {
        let request = request.into_inner();
        let under = if request.path.is_empty() {
            None
        } else {
            Some(convert::path("path", &request.path)?)
        };
        let snapshots = self
            .state
            .namespace
            .snapshots(under.as_ref())
            .await
            .map_err(status)?;
        Ok(Response::new(proto::ListSnapshotsReply {
            snapshots: snapshots.iter().map(convert::snapshot_info).collect(),
        }))
    }

    async fn diff(&self, request: Request<proto::DiffRequest>) -> Reply<proto::DiffReply> {
        let request = request.into_inner();
        let to = (!request.to.is_empty()).then_some(request.to.as_str());
        let diff = self
            .state
            .namespace
            .diff(&request.from, to)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::DiffReply {
            entries: diff
                .iter()
                .map(|entry| proto::DiffEntry {
                    path: entry.path.clone(),
                    change: match entry.change {
                        DiffChange::Added => proto::Change::Added,
                        DiffChange::Removed => proto::Change::Removed,
                        DiffChange::Modified => proto::Change::Modified,
                    } as i32,
                    before: entry.before.as_ref().map(convert::snapshot_entry),
                    after: entry.after.as_ref().map(convert::snapshot_entry),
                })
                .collect(),
        }))
    }

    async fn rollback(
        &self,
        request: Request<proto::RollbackRequest>,
    ) -> Reply<proto::RollbackReply> {
        let (metadata, _, request) = request.into_parts();
        let name = request.name;
        let mut ticket = None;
        let mut checked = None;
        if agents::caller(&metadata).is_some() {
            // The policy's prefixes bound the subtree the rollback restores: the snapshot's.
            let snapshot = self.state.namespace.snapshot("name", &name).await;
            let call = agents::Call {
                rpc: "Snapshots.Rollback",
                action: Some(crate::policy::AgentAction::Rollback),
                path: snapshot.as_ref().ok().map(|snapshot| snapshot.path.clone()),
                detail: format!("snapshot {name}"),
            };
            ticket = self.agent_call(&metadata, call).await?;
            match snapshot {
                Ok(snapshot) => checked = Some(snapshot),
                Err(error) => {
                    let failed = Err(status(error));
                    self.agent_done(ticket, &failed).await;
                    return failed;
                }
            }
        }
        let result = async {
            // What was checked is what is rolled back, not a snapshot re-made under its name.
            let report = self
                .state
                .namespace
                .rollback_expecting(&name, checked.as_ref())
                .await
                .map_err(status)?;
            Ok(Response::new(proto::RollbackReply {
                restored: report.restored as u64,
                removed: report.removed as u64,
                unchanged: report.unchanged as u64,
            }))
        }
        .await;
        self.agent_done(ticket, &result).await;
        result
    }

    async fn delete(
        &self,
        request: Request<proto::DeleteSnapshotRequest>,
    ) -> Reply<proto::DeleteSnapshotReply> {
        self.no_agents(request.metadata(), "Snapshots.Delete")
            .await?;
        self.state
            .namespace
            .delete_snapshot(&request.into_inner().name)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::DeleteSnapshotReply {}))
    }
}

#[tonic::async_trait]
impl proto::admin_server::Admin for Services {
    async fn health(&self, _request: Request<proto::HealthRequest>) -> Reply<proto::HealthReply> {
        let store = self.state.namespace.store();
        let mut reply = proto::HealthReply {
            store: store.kind().to_owned(),
            store_location: store.location(),
            control_id: self.state.control_id.clone(),
            leader: *self.state.leadership.borrow(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        };
        match store.leader(super::LEADER_ELECTION).await {
            Ok(leader) => {
                reply.leader_id = leader.unwrap_or_default();
                if reply.leader_id.is_empty() {
                    reply.problems.push("no control plane leads".to_owned());
                }
            }
            Err(error) => reply.problems.push(error.to_string()),
        }
        match self.state.membership.nodes().await {
            Ok(nodes) => {
                for node in &nodes {
                    match node.state {
                        NodeState::Up => reply.nodes_up += 1,
                        NodeState::Down => reply.nodes_down += 1,
                        NodeState::Draining => reply.nodes_draining += 1,
                        NodeState::Drained => {}
                    }
                }
                if reply.nodes_down > 0 {
                    reply
                        .problems
                        .push(format!("{} data nodes down", reply.nodes_down));
                }
                let now = model::now_ms();
                for node in &nodes {
                    if node.state == NodeState::Draining && node.lease_expires_ms <= now {
                        reply.problems.push(format!(
                            "draining node {} stopped heartbeating: its chunks are copied from other replicas",
                            node.id
                        ));
                    }
                }
            }
            Err(error) => reply.problems.push(error.to_string()),
        }
        reply.status = if reply.problems.is_empty() {
            "ok"
        } else {
            "degraded"
        }
        .to_owned();
        Ok(Response::new(reply))
    }

    async fn nodes(&self, _request: Request<proto::NodesRequest>) -> Reply<proto::NodesReply> {
        let nodes = self.state.membership.nodes().await.map_err(status)?;
        Ok(Response::new(proto::NodesReply {
            nodes: nodes.iter().map(convert::node).collect(),
        }))
    }

    async fn run_upkeep(
        &self,
        request: Request<proto::UpkeepRequest>,
    ) -> Reply<proto::UpkeepReply> {
        self.no_agents(request.metadata(), "Admin.RunUpkeep")
            .await?;
        let report = super::run_upkeep(&self.state).await.map_err(status)?;
        Ok(Response::new(proto::UpkeepReply {
            replicas_copied: report.replicas_copied,
            nodes_drained: report.nodes_drained,
            versions_collected: report.versions_collected,
            chunks_collected: report.chunks_collected,
            replicas_deleted: report.replicas_deleted,
            problems: report.problems,
            moves_planned: report.moves_planned,
            moves_executed: report.moves_executed,
            moves_refused: report.moves_refused,
            moves_failed: report.moves_failed,
            bytes_moved: report.bytes_moved,
        }))
    }

    async fn movements(
        &self,
        request: Request<proto::MovementsRequest>,
    ) -> Reply<proto::MovementsReply> {
        let limit = match request.into_inner().limit {
            0 => 100,
            limit => limit as usize,
        };
        let movements = crate::rebalance::movements(self.state.namespace.store().as_ref(), limit)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::MovementsReply {
            movements: movements
                .into_iter()
                .map(|movement| proto::Movement {
                    at_ms: movement.at_ms,
                    path: movement.path,
                    file_id: movement.file_id,
                    chunk: Some(convert::proto_chunk_id(movement.chunk)),
                    bytes: movement.bytes,
                    from_node: movement.from,
                    to_node: movement.to,
                    state: match movement.state {
                        crate::rebalance::MoveState::Planned => "planned",
                        crate::rebalance::MoveState::Executed => "executed",
                        crate::rebalance::MoveState::Refused => "refused",
                        crate::rebalance::MoveState::Failed => "failed",
                    }
                    .into(),
                    reason: movement.reason,
                    policy: movement.policy,
                    kind: match movement.kind {
                        crate::rebalance::MoveKind::Replicate => "replicate",
                        crate::rebalance::MoveKind::Drop => "drop",
                    }
                    .into(),
                })
                .collect(),
        }))
    }

    async fn approve(&self, request: Request<proto::ApproveRequest>) -> Reply<proto::ApproveReply> {
        self.no_agents(request.metadata(), "Admin.Approve").await?;
        let layout = self.current_layout(&request.into_inner().path).await?;
        crate::rebalance::approve(self.state.namespace.store().as_ref(), layout.file_id)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::ApproveReply {
            file_id: layout.file_id,
        }))
    }

    async fn agent_policy(
        &self,
        _request: Request<proto::AgentPolicyRequest>,
    ) -> Reply<proto::AgentPolicyReply> {
        let policy = self.state.rebalance.policies.agents();
        Ok(Response::new(proto::AgentPolicyReply {
            allow: policy.allow.iter().map(|a| a.as_str().to_owned()).collect(),
            prefixes: policy.prefixes.clone(),
        }))
    }

    async fn agent_actions(
        &self,
        request: Request<proto::AgentActionsRequest>,
    ) -> Reply<proto::AgentActionsReply> {
        let limit = match request.into_inner().limit {
            0 => 100,
            limit => limit as usize,
        };
        let records = agents::actions(self.state.namespace.store().as_ref(), limit)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::AgentActionsReply {
            actions: records
                .into_iter()
                .map(|record| proto::AgentAction {
                    at_ms: record.at_ms,
                    agent: record.agent,
                    rpc: record.rpc,
                    action: record.action,
                    path: record.path,
                    detail: record.detail,
                    outcome: record.outcome.as_str().to_owned(),
                    reason: record.reason,
                })
                .collect(),
        }))
    }

    async fn heat(&self, request: Request<proto::HeatRequest>) -> Reply<proto::HeatReply> {
        let layout = self.current_layout(&request.into_inner().path).await?;
        let chunks = layout
            .chunks
            .iter()
            .map(|chunk| self.state.heat.chunk(chunk.id))
            .collect();
        Ok(Response::new(convert::heat_reply(&layout, chunks)))
    }

    async fn layout(&self, request: Request<proto::LayoutRequest>) -> Reply<proto::Layout> {
        let request = request.into_inner();
        let path = convert::path("path", &request.path)?;
        let version = (request.version != 0).then_some(request.version);
        let layout = self
            .state
            .namespace
            .open(&path, version)
            .await
            .map_err(status)?;
        Ok(Response::new(convert::layout(&layout)))
    }
}

/// Most GPUs one node may report, and one job may name.
const MAX_GPUS: usize = 4096;

/// A node's GPU list: at most [`MAX_GPUS`], none listed twice.
fn check_gpus(gpus: &[proto::GpuStatus]) -> Result<(), Status> {
    if gpus.len() > MAX_GPUS {
        return Err(Status::invalid_argument(format!(
            "gpus: {} GPUs, at most {MAX_GPUS} per node",
            gpus.len()
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (position, gpu) in gpus.iter().enumerate() {
        if !seen.insert(gpu.index) {
            return Err(Status::invalid_argument(format!(
                "gpus[{position}]: GPU {} is listed twice",
                gpu.index
            )));
        }
    }
    Ok(())
}

fn gpu_ref(field: &str, gpu: proto::GpuRef) -> Result<crate::orchestration::GpuRef, Status> {
    crate::membership::check_node_id(&gpu.node_id)
        .map_err(|error| Status::invalid_argument(format!("{field}: {error}")))?;
    Ok(crate::orchestration::GpuRef {
        node: gpu.node_id,
        index: gpu.index,
    })
}

impl Services {
    async fn prestage_checked(
        &self,
        request: proto::PrestageRequest,
    ) -> Reply<proto::PrestageReply> {
        let path = convert::path("path", &request.path)?;
        if request.nodes.len() > MAX_GPUS {
            return Err(Status::invalid_argument(format!(
                "nodes: at most {MAX_GPUS}"
            )));
        }
        for (index, node) in request.nodes.iter().enumerate() {
            crate::membership::check_node_id(node)
                .map_err(|error| Status::invalid_argument(format!("nodes[{index}]: {error}")))?;
        }
        let path = path.to_string();
        crate::orchestration::store_prestage(self.store(), &path, &request.nodes)
            .await
            .map_err(status)?;
        self.state.gpus.prestage(&path, request.nodes);
        Ok(Response::new(proto::PrestageReply {}))
    }

    fn store(&self) -> &dyn crate::store::MetadataStore {
        self.state.namespace.store().as_ref()
    }

    /// Brings the GPU table up to what schedulers said, as the store keeps it (they may have
    /// said it to another control plane of the cluster).
    async fn refresh_intent(&self) -> Result<(), Status> {
        crate::orchestration::refresh(self.store(), &self.state.gpus)
            .await
            .map_err(status)
    }
}

#[tonic::async_trait]
impl proto::orchestration_server::Orchestration for Services {
    async fn report_gpus(
        &self,
        request: Request<proto::ReportGpusRequest>,
    ) -> Reply<proto::ReportGpusReply> {
        self.no_agents(request.metadata(), "Orchestration.ReportGpus")
            .await?;
        let request = request.into_inner();
        crate::membership::check_node_id(&request.node_id)
            .map_err(|error| Status::invalid_argument(format!("node_id: {error}")))?;
        check_gpus(&request.gpus)?;
        let gpus: Vec<crate::orchestration::GpuStatus> = request
            .gpus
            .into_iter()
            .map(|gpu| crate::orchestration::GpuStatus {
                index: gpu.index,
                busy: gpu.busy,
                job: gpu.job,
                measured: None,
            })
            .collect();
        crate::orchestration::store_report(self.store(), &request.node_id, &gpus)
            .await
            .map_err(status)?;
        self.state.gpus.report(&request.node_id, gpus);
        Ok(Response::new(proto::ReportGpusReply {}))
    }

    async fn declare_job(
        &self,
        request: Request<proto::DeclareJobRequest>,
    ) -> Reply<proto::DeclareJobReply> {
        self.no_agents(request.metadata(), "Orchestration.DeclareJob")
            .await?;
        let request = request.into_inner();
        if !crate::path::is_identifier(&request.job, 64, b"") {
            return Err(Status::invalid_argument(format!(
                "job {:?}: 1 to 64 characters of A-Z a-z 0-9 . _ -",
                request.job
            )));
        }
        if request.gpus.len() > MAX_GPUS || request.paths.len() > MAX_GPUS {
            return Err(Status::invalid_argument(format!(
                "a job names at most {MAX_GPUS} GPUs and {MAX_GPUS} paths"
            )));
        }
        let paths = request
            .paths
            .iter()
            .enumerate()
            .map(|(index, path)| {
                convert::path(&format!("paths[{index}]"), path).map(|p| p.to_string())
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let gpus = request
            .gpus
            .into_iter()
            .enumerate()
            .map(|(index, gpu)| gpu_ref(&format!("gpus[{index}]"), gpu))
            .collect::<Result<Vec<_>, Status>>()?;
        let job = crate::orchestration::Job {
            name: request.job,
            paths,
            gpus,
        };
        crate::orchestration::store_job(self.store(), &job)
            .await
            .map_err(status)?;
        self.state.gpus.declare(job);
        Ok(Response::new(proto::DeclareJobReply {}))
    }

    async fn prestage(
        &self,
        request: Request<proto::PrestageRequest>,
    ) -> Reply<proto::PrestageReply> {
        let (metadata, _, request) = request.into_parts();
        let call = agents::Call {
            rpc: "Orchestration.Prestage",
            action: Some(crate::policy::AgentAction::Prestage),
            path: Some(agent_path(&request.path)),
            detail: if request.nodes.is_empty() {
                "cancel (no nodes)".to_owned()
            } else {
                format!("to {}", request.nodes.join(", "))
            },
        };
        let ticket = self.agent_call(&metadata, call).await?;
        let result = self.prestage_checked(request).await;
        self.agent_done(ticket, &result).await;
        result
    }

    async fn gpus(&self, _request: Request<proto::GpusRequest>) -> Reply<proto::GpusReply> {
        self.refresh_intent().await?;
        let (nodes, jobs) = self.state.gpus.snapshot();
        let status = |gpu: crate::orchestration::GpuStatus| proto::GpuStatus {
            index: gpu.index,
            busy: gpu.busy,
            job: gpu.job,
            measured: gpu.measured.is_some(),
            utilization_percent: gpu.measured.as_ref().map_or(0, |m| m.utilization_percent),
            compute_processes: gpu.measured.as_ref().map_or(0, |m| m.compute_processes),
            memory_used_bytes: gpu.measured.as_ref().map_or(0, |m| m.memory_used_bytes),
        };
        Ok(Response::new(proto::GpusReply {
            nodes: nodes
                .into_iter()
                .map(|(node_id, gpus, reported_ms)| proto::NodeGpus {
                    node_id,
                    gpus: gpus.into_iter().map(status).collect(),
                    reported_ms,
                })
                .collect(),
            jobs: jobs
                .into_iter()
                .map(|job| proto::JobInfo {
                    job: job.name,
                    paths: job.paths,
                    gpus: job
                        .gpus
                        .into_iter()
                        .map(|gpu| proto::GpuRef {
                            node_id: gpu.node,
                            index: gpu.index,
                        })
                        .collect(),
                })
                .collect(),
            prestages: self
                .state
                .gpus
                .prestages()
                .into_iter()
                .map(|(path, nodes)| proto::PrestageInfo { path, nodes })
                .collect(),
        }))
    }

    async fn explain(&self, request: Request<proto::ExplainRequest>) -> Reply<proto::ExplainReply> {
        let layout = self.current_layout(&request.into_inner().path).await?;
        let nodes = self.state.membership.nodes().await.map_err(status)?;
        self.refresh_intent().await?;
        let (readers, jobs) = self.state.gpus.readers_of(&layout.path);
        let holds = |node: &str| {
            !layout.chunks.is_empty()
                && layout
                    .chunks
                    .iter()
                    .all(|chunk| chunk.replicas.iter().any(|replica| replica == node))
        };
        let mut current: Vec<String> = Vec::new();
        for chunk in &layout.chunks {
            for replica in &chunk.replicas {
                if !current.contains(replica) {
                    current.push(replica.clone());
                }
            }
        }
        let homes = crate::orchestration::rank_homes(&nodes, &readers)
            .into_iter()
            .map(|home| proto::HomeScore {
                holds_file: holds(&home.node),
                node_id: home.node,
                cost: home.cost,
                local_gpus: home.local_gpus,
            })
            .collect();
        Ok(Response::new(proto::ExplainReply {
            path: layout.path.clone(),
            file_id: layout.file_id,
            readers: readers
                .into_iter()
                .map(|gpu| proto::GpuRef {
                    node_id: gpu.node,
                    index: gpu.index,
                })
                .collect(),
            jobs,
            homes,
            current_nodes: current,
        }))
    }
}
