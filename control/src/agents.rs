//! Agents: calls marked with the `x-tier0-agent: NAME` header (`tier0 mcp` sends it). The
//! control plane holds every such call that would change anything to the agents policy (the
//! `[agents]` table of `--policy`, [`crate::policy::AgentPolicy`]; without it agents are
//! read-only) and writes each one, allowed or refused, with how it ended, to the agent audit
//! log (`agent-audit/…`, `docs/formats.md`). An allowed call is recorded before it runs, so
//! none runs unrecorded.

use serde::{Deserialize, Serialize};
use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::model;
use crate::policy::{AgentAction, AgentPolicy};
use crate::store::{Check, MetadataStore, Outcome as TxnOutcome, Txn};

pub use tier0_control_api::client::AGENT_HEADER;

/// Longest agent name.
pub const MAX_AGENT_NAME: usize = 64;

/// How an agent's call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Refused by the agents policy: nothing was done.
    Refused,
    /// Allowed and begun; the control plane stopped before it finished (or it is running).
    Started,
    Succeeded,
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Refused => "refused",
            Outcome::Started => "started",
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
        }
    }
}

/// One record of the agent audit log (`agent-audit/…`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub at_ms: u64,
    /// The agent's name, as its header gave it.
    pub agent: String,
    /// The call (`Orchestration.Prestage`, `Snapshots.Create`, …).
    pub rpc: String,
    /// The agent action it is (`prestage`, `snapshot`, `rollback`); empty for a call that is
    /// none (always refused).
    #[serde(default)]
    pub action: String,
    /// The path it touches, if any.
    #[serde(default)]
    pub path: String,
    /// The rest of the request (a prestage's nodes, a snapshot's name).
    #[serde(default)]
    pub detail: String,
    pub outcome: Outcome,
    /// Why it was refused, or how it failed.
    #[serde(default)]
    pub reason: String,
}

/// What an agent's call asks.
#[derive(Clone, Debug)]
pub struct Call {
    pub rpc: &'static str,
    /// `None`: a call that changes something but is no agent action (agents never make it).
    pub action: Option<AgentAction>,
    /// The path it touches (checked against the policy's prefixes); `None`: not known.
    pub path: Option<String>,
    pub detail: String,
}

impl Call {
    /// A call that changes something and is no agent action.
    pub fn other(rpc: &'static str) -> Call {
        Call {
            rpc,
            action: None,
            path: None,
            detail: String::new(),
        }
    }
}

/// The agent a call comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// Its name (for a bad header: what of it can be shown).
    pub name: String,
    /// Why the header is no agent name (such a call is refused).
    pub invalid: Option<String>,
}

/// The agent a call comes from (`None`: the call has no agent header).
pub fn caller(metadata: &MetadataMap) -> Option<Caller> {
    let value = metadata.get(AGENT_HEADER)?;
    let text = String::from_utf8_lossy(value.as_bytes()).into_owned();
    if crate::path::is_identifier(&text, MAX_AGENT_NAME, b"") {
        return Some(Caller {
            name: text,
            invalid: None,
        });
    }
    Some(Caller {
        invalid: Some(format!(
            "{AGENT_HEADER} {text:?}: an agent name is 1 to {MAX_AGENT_NAME} characters of \
             A-Z a-z 0-9 . _ -"
        )),
        name: text.chars().take(MAX_AGENT_NAME).collect(),
    })
}

/// An allowed agent call, recorded as started: [`Ticket::finish`] records how it ended.
#[derive(Debug)]
#[must_use = "an allowed agent call stays `started` in the audit log until it is finished"]
pub struct Ticket {
    key: String,
    record: AgentRecord,
}

/// Holds `agent`'s `call` to `policy`: refused (`PERMISSION_DENIED`, recorded as refused), or
/// recorded as started and allowed. A call that cannot be recorded is refused
/// (`UNAVAILABLE`): no agent action goes unaudited.
pub async fn admit(
    store: &dyn MetadataStore,
    policy: &AgentPolicy,
    agent: Caller,
    call: Call,
) -> Result<Ticket, Status> {
    let refusal = match (agent.invalid, call.action) {
        (Some(invalid), _) => Some(invalid),
        (None, None) => Some(format!(
            "agent {:?} may not call {}: agents take only the actions the agents policy allows \
             ([agents] allow in the control plane's --policy file: prestage, snapshot, \
             rollback)",
            agent.name, call.rpc
        )),
        (None, Some(action)) => policy
            .check(&agent.name, action, call.path.as_deref())
            .err(),
    };
    let agent = agent.name;
    let mut record = AgentRecord {
        at_ms: model::now_ms(),
        agent,
        rpc: call.rpc.to_owned(),
        action: call
            .action
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default(),
        path: call.path.unwrap_or_default(),
        detail: call.detail,
        outcome: Outcome::Started,
        reason: String::new(),
    };
    if let Some(reason) = refusal {
        record.outcome = Outcome::Refused;
        record.reason = reason.clone();
        metrics::counter!("tier0_agent_calls_total", "outcome" => "refused").increment(1);
        if let Err(error) = append(store, &record).await {
            tracing::warn!(%error, agent = %record.agent, rpc = %record.rpc,
                "agent audit log: cannot record a refused call");
        }
        return Err(Status::permission_denied(reason));
    }
    match append(store, &record).await {
        Ok(key) => Ok(Ticket { key, record }),
        Err(error) => Err(Status::unavailable(format!(
            "agent {:?}: {}: the agent audit log cannot be written ({error}); agent calls that \
             change anything wait until it can",
            record.agent, record.rpc
        ))),
    }
}

impl Ticket {
    /// Records how the call ended (a failure to record is logged: the call has happened).
    pub async fn finish<T>(mut self, store: &dyn MetadataStore, result: &Result<T, Status>) {
        match result {
            Ok(_) => self.record.outcome = Outcome::Succeeded,
            Err(status) => {
                self.record.outcome = Outcome::Failed;
                self.record.reason = status.message().to_owned();
            }
        }
        metrics::counter!("tier0_agent_calls_total", "outcome" => self.record.outcome.as_str())
            .increment(1);
        let mut txn = Txn::new();
        txn.put(self.key.clone(), model::encode(&self.record));
        if let Err(error) = store.commit(&txn).await {
            tracing::warn!(%error, key = %self.key, "agent audit log: cannot record an outcome");
        }
    }
}

/// Finishes `ticket`, if the call was an agent's.
pub async fn finish<T>(
    ticket: Option<Ticket>,
    store: &dyn MetadataStore,
    result: &Result<T, Status>,
) {
    if let Some(ticket) = ticket {
        ticket.finish(store, result).await;
    }
}

/// Writes a new record at a key of its own; returns the key.
async fn append(
    store: &dyn MetadataStore,
    record: &AgentRecord,
) -> Result<String, crate::store::StoreError> {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    loop {
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let key = model::agent_audit_key(record.at_ms, seq);
        let mut txn = Txn::new();
        // Another control plane (on the same etcd) may have written this key: take the next.
        txn.check(Check::Absent(key.clone()))
            .put(key.clone(), model::encode(record));
        if let TxnOutcome::Committed(_) = store.commit(&txn).await? {
            return Ok(key);
        }
    }
}

/// The agent audit log, oldest first; at most `limit` of the newest.
pub async fn actions(
    store: &dyn MetadataStore,
    limit: usize,
) -> crate::error::Result<Vec<AgentRecord>> {
    model::newest_records(store, model::AGENT_AUDIT_PREFIX, limit).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedbStore;

    fn agent_metadata(name: &str) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        metadata.insert(AGENT_HEADER, name.parse().unwrap());
        metadata
    }

    #[tokio::test]
    async fn agent_calls_are_held_to_the_policy_and_every_one_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("m.redb")).unwrap();
        let policy = crate::policy::Policies::parse(
            "[agents]\nallow = [\"snapshot\"]\nprefixes = [\"/datasets\"]",
        )
        .unwrap();
        let agents = policy.agents();
        assert_eq!(caller(&MetadataMap::new()), None);
        assert!(
            caller(&agent_metadata("bad name!"))
                .unwrap()
                .invalid
                .is_some()
        );
        let agent = || caller(&agent_metadata("bot")).unwrap();
        let call = |action, path: &str| Call {
            rpc: "Snapshots.Create",
            action: Some(action),
            path: Some(path.to_owned()),
            detail: "snapshot s".to_owned(),
        };

        let ticket = admit(
            &store,
            agents,
            agent(),
            call(AgentAction::Snapshot, "/datasets/a"),
        )
        .await
        .unwrap();
        let logged = actions(&store, 10).await.unwrap();
        assert_eq!(logged.len(), 1);
        assert_eq!(logged[0].outcome, Outcome::Started);
        ticket
            .finish(&store, &Err::<(), _>(Status::not_found("no such path")))
            .await;

        let outside = admit(
            &store,
            agents,
            agent(),
            call(AgentAction::Snapshot, "/other"),
        )
        .await
        .unwrap_err();
        assert_eq!(outside.code(), tonic::Code::PermissionDenied);
        let rollback = admit(
            &store,
            agents,
            agent(),
            call(AgentAction::Rollback, "/datasets"),
        )
        .await
        .unwrap_err();
        assert!(
            rollback.message().contains("[agents] allow"),
            "{rollback:?}"
        );
        let other = admit(&store, agents, agent(), Call::other("Namespace.Delete"))
            .await
            .unwrap_err();
        assert!(other.message().contains("Namespace.Delete"), "{other:?}");
        let bad = admit(
            &store,
            agents,
            caller(&agent_metadata("bad name!")).unwrap(),
            call(AgentAction::Snapshot, "/datasets"),
        )
        .await
        .unwrap_err();
        assert_eq!(bad.code(), tonic::Code::PermissionDenied);

        let logged = actions(&store, 10).await.unwrap();
        let outcomes: Vec<_> = logged
            .iter()
            .map(|r| (r.rpc.as_str(), r.outcome, r.agent.as_str()))
            .collect();
        assert_eq!(
            outcomes,
            [
                ("Snapshots.Create", Outcome::Failed, "bot"),
                ("Snapshots.Create", Outcome::Refused, "bot"),
                ("Snapshots.Create", Outcome::Refused, "bot"),
                ("Namespace.Delete", Outcome::Refused, "bot"),
                ("Snapshots.Create", Outcome::Refused, "bad name!"),
            ]
        );
        assert_eq!(logged[0].reason, "no such path");
        assert!(
            logged[1].reason.contains("[agents] prefixes"),
            "{:?}",
            logged[1]
        );
        // The newest `limit`, oldest first.
        let last = actions(&store, 2).await.unwrap();
        assert_eq!(last, logged[3..]);
    }
}
