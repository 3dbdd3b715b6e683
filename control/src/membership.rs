//! Membership: data nodes register, heartbeat within a lease, and are drained by operators.
//!
//! A node is `up` while it heartbeats within its lease; the leader marks a node whose lease
//! expired `down` (it takes no new chunks; repair copies its chunks elsewhere). `drain`
//! keeps a node serving reads but gives it no new chunks until repair has moved every chunk
//! off it (`drained`). A draining node keeps that state when its lease expires (the
//! operator's intent stands), but repair no longer reads from it, and health reports it. A
//! node that registers again is `up` again unless it is being drained.

use std::sync::Arc;
use std::time::Duration;

use crate::error::{ControlError, Result};
use crate::model::{self, NodeRecord, NodeState, TopologySummary};
use crate::store::{Check, MetadataStore, Outcome, Txn};

const MAX_ATTEMPTS: usize = 16;
pub const MAX_NODE_ID: usize = 64;

pub fn check_node_id(id: &str) -> Result<()> {
    if crate::path::is_identifier(id, MAX_NODE_ID, b"") {
        Ok(())
    } else {
        Err(ControlError::InvalidArgument(format!(
            "node id {id:?}: 1 to {MAX_NODE_ID} characters of A-Z a-z 0-9 . _ -"
        )))
    }
}

/// Checks a data daemon's address: `host:port` with a port.
pub fn check_address(address: &str) -> Result<()> {
    let port = address
        .rsplit_once(':')
        .and_then(|(host, port)| (!host.is_empty()).then_some(port))
        .and_then(|port| port.parse::<u16>().ok());
    match port {
        Some(port) if port != 0 => Ok(()),
        _ => Err(ControlError::InvalidArgument(format!(
            "address {address:?}: expected host:port with a port from 1 to 65535"
        ))),
    }
}

/// Longest failure domain name, and most RDMA devices a node may list.
pub const MAX_FAILURE_DOMAIN: usize = 64;
pub const MAX_RDMA_DEVICES: usize = 64;

fn check_topology(topology: &TopologySummary) -> Result<()> {
    if topology.failure_domain.len() > MAX_FAILURE_DOMAIN {
        return Err(ControlError::InvalidArgument(format!(
            "topology.failure_domain: longer than {MAX_FAILURE_DOMAIN} bytes"
        )));
    }
    if topology.rdma_devices.len() > MAX_RDMA_DEVICES
        || topology
            .rdma_devices
            .iter()
            .any(|d| d.is_empty() || d.len() > 64)
    {
        return Err(ControlError::InvalidArgument(format!(
            "topology.rdma_devices: at most {MAX_RDMA_DEVICES} names of 1 to 64 bytes"
        )));
    }
    Ok(())
}

/// What a heartbeat tells the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeartbeatReply {
    pub state: NodeState,
    pub lease: Duration,
    /// (file id, lowest valid layout version) changed since the node's last reply.
    pub fences: Vec<(u64, u64)>,
    /// What the node sends back next time.
    pub fence_revision: u64,
}

#[derive(Debug)]
pub struct Membership {
    store: Arc<dyn MetadataStore>,
    lease: Duration,
}

impl Membership {
    pub fn new(store: Arc<dyn MetadataStore>, lease: Duration) -> Membership {
        Membership { store, lease }
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    async fn read(&self, id: &str) -> Result<Option<(crate::store::Entry, NodeRecord)>> {
        let key = model::node_key(id);
        Ok(match self.store.get(&key).await? {
            Some(entry) => {
                let record = model::decode(&entry.key, &entry.value)?;
                Some((entry, record))
            }
            None => None,
        })
    }

    /// Registers (or re-registers) a data node; its lease starts now.
    pub async fn register(
        &self,
        id: &str,
        address: &str,
        topology: TopologySummary,
    ) -> Result<NodeRecord> {
        check_node_id(id)?;
        check_address(address)?;
        check_topology(&topology)?;
        for _ in 0..MAX_ATTEMPTS {
            let now = model::now_ms();
            let existing = self.read(id).await?;
            let state = match &existing {
                Some((_, node))
                    if matches!(node.state, NodeState::Draining | NodeState::Drained) =>
                {
                    node.state
                }
                _ => NodeState::Up,
            };
            let record = NodeRecord {
                id: id.to_owned(),
                address: address.to_owned(),
                topology: topology.clone(),
                state,
                registered_ms: existing
                    .as_ref()
                    .map(|(_, node)| node.registered_ms)
                    .unwrap_or(now),
                heartbeat_ms: now,
                lease_expires_ms: now + self.lease.as_millis() as u64,
            };
            let key = model::node_key(id);
            let mut txn = Txn::new();
            txn.check(Check::unchanged(&key, existing.as_ref().map(|(e, _)| e)))
                .put(key, model::encode(&record));
            if let Outcome::Committed(_) = self.store.commit(&txn).await? {
                return Ok(record);
            }
        }
        Err(ControlError::FailedPrecondition(format!(
            "register {id}: its record kept changing; try again"
        )))
    }

    /// Renews a node's lease. A node marked down by an expired lease comes back up; an
    /// unknown node must register first (`NotFound`).
    pub async fn heartbeat(
        &self,
        id: &str,
        free_bytes: Option<u64>,
        fence_revision: u64,
    ) -> Result<HeartbeatReply> {
        check_node_id(id)?;
        for _ in 0..MAX_ATTEMPTS {
            let Some((entry, mut record)) = self.read(id).await? else {
                return Err(ControlError::NotFound(format!(
                    "node {id}: not registered (register first)"
                )));
            };
            let now = model::now_ms();
            record.heartbeat_ms = now;
            record.lease_expires_ms = now + self.lease.as_millis() as u64;
            if record.state == NodeState::Down {
                record.state = NodeState::Up;
            }
            if let Some(free) = free_bytes {
                record.topology.free_bytes = free;
            }
            let mut txn = Txn::new();
            txn.check(Check::At(entry.key.clone(), entry.revision))
                .put(entry.key, model::encode(&record));
            if let Outcome::Committed(_) = self.store.commit(&txn).await? {
                let (fences, fence_revision) = self.fences_since(fence_revision).await?;
                return Ok(HeartbeatReply {
                    state: record.state,
                    lease: self.lease,
                    fences,
                    fence_revision,
                });
            }
        }
        Err(ControlError::FailedPrecondition(format!(
            "heartbeat {id}: its record kept changing; try again"
        )))
    }

    /// Starts draining a node, or with `cancel` puts it back in service.
    pub async fn drain(&self, id: &str, cancel: bool) -> Result<NodeRecord> {
        check_node_id(id)?;
        for _ in 0..MAX_ATTEMPTS {
            let Some((entry, mut record)) = self.read(id).await? else {
                return Err(ControlError::NotFound(format!("node {id}: no such node")));
            };
            record.state = match (cancel, record.state) {
                (false, NodeState::Drained) => NodeState::Drained,
                (false, _) => NodeState::Draining,
                (true, NodeState::Draining | NodeState::Drained) => {
                    if record.lease_expires_ms > model::now_ms() {
                        NodeState::Up
                    } else {
                        NodeState::Down
                    }
                }
                (true, state) => state,
            };
            let mut txn = Txn::new();
            txn.check(Check::At(entry.key.clone(), entry.revision))
                .put(entry.key, model::encode(&record));
            if let Outcome::Committed(_) = self.store.commit(&txn).await? {
                return Ok(record);
            }
        }
        Err(ControlError::FailedPrecondition(format!(
            "drain {id}: its record kept changing; try again"
        )))
    }

    /// Fences written after store revision `since`, and the revision to ask from next.
    /// Reads the revision before the fences, so a fence committed in between is sent now
    /// and again next time (raising a fence twice is harmless), never missed.
    pub async fn fences_since(&self, since: u64) -> Result<(Vec<(u64, u64)>, u64)> {
        let revision = self.store.revision().await?;
        let mut fences = Vec::new();
        for entry in self.store.scan(model::FENCES_PREFIX).await? {
            if entry.revision <= since {
                continue;
            }
            let file = entry
                .key
                .strip_prefix(model::FENCES_PREFIX)
                .and_then(|hex| u64::from_str_radix(hex, 16).ok())
                .ok_or_else(|| {
                    ControlError::Internal(format!("metadata key {:?} is not a fence", entry.key))
                })?;
            fences.push((file, model::decode(&entry.key, &entry.value)?));
        }
        Ok((fences, revision.max(since)))
    }

    pub async fn nodes(&self) -> Result<Vec<NodeRecord>> {
        let mut nodes = Vec::new();
        for entry in self.store.scan(model::NODES_PREFIX).await? {
            nodes.push(model::decode(&entry.key, &entry.value)?);
        }
        Ok(nodes)
    }

    /// Marks `down` every up node whose lease has expired (the leader's job); returns them.
    pub async fn expire_leases(&self) -> Result<Vec<String>> {
        let now = model::now_ms();
        let mut expired = Vec::new();
        for entry in self.store.scan(model::NODES_PREFIX).await? {
            let mut record: NodeRecord = model::decode(&entry.key, &entry.value)?;
            if record.state != NodeState::Up || record.lease_expires_ms > now {
                continue;
            }
            record.state = NodeState::Down;
            let mut txn = Txn::new();
            txn.check(Check::At(entry.key.clone(), entry.revision))
                .put(entry.key.clone(), model::encode(&record));
            // A conflict means the node just heartbeat (or was drained): leave it.
            if let Outcome::Committed(_) = self.store.commit(&txn).await? {
                tracing::warn!(node = %record.id, "lease expired: node marked down");
                expired.push(record.id);
            }
        }
        Ok(expired)
    }
}
