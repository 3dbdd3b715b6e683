//! [`MetadataStore`] on etcd (the v3 API, through `etcd-client`), for clusters with several
//! control-plane replicas.
//!
//! Every key lives under a prefix (`/tier0/` say), so that several clusters can share one etcd;
//! the prefix is added on the way in and stripped on the way out. Revisions are etcd's own
//! (`mod_revision` of a key, the header revision of a response), so a [`Check::At`] is a
//! compare on `mod_revision` and a [`Check::Absent`] a compare on `create_revision == 0`.
//! Leader election is a key under `<prefix>elections/` put with a lease: whoever creates it
//! leads until its lease ends.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, KvClient,
    PutOptions, ResponseHeader, TxnOp, WatchOptions, WatchResponse, WatchStream,
};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep, sleep_until, timeout};

use super::{
    Change, Check, Entry, Leadership, MetadataStore, Outcome, StoreError, Txn, Watch, Write,
};

/// How long one request may take. tonic's own timeout does not cover the wait for a connection,
/// so without this a call to a dead etcd would hang instead of failing as unavailable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings on open streams (watches, lease keep-alives), so a silently dead connection is
/// noticed. etcd refuses pings more often than its `--grpc-keepalive-min-time` (5 s).
const PING_INTERVAL: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response taken. tonic's default, 4 MiB, would fail a scan of a large prefix; etcd
/// caps what it sends itself (`--max-send-bytes`, about 2 GiB).
const MAX_RESPONSE_BYTES: usize = i32::MAX as usize;
/// Changes a watch buffers before it stops reading from etcd.
const WATCH_BUFFER: usize = 1024;
/// Pause before campaigning again after an error.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// The etcd store. Cloning it is cheap and shares the connection.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
    /// `etcd <endpoints>`, the name errors carry.
    name: String,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("store", &self.name)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl EtcdStore {
    /// Connects to `endpoints` and keeps every key under `prefix`. It asks for the revision once,
    /// because etcd-client connects lazily and a wrong address should fail here, not later.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<EtcdStore, StoreError> {
        let name = format!("etcd {}", endpoints.join(","));
        let options = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(PING_INTERVAL, PING_TIMEOUT);
        let client = match timeout(REQUEST_TIMEOUT, Client::connect(endpoints, Some(options))).await
        {
            Ok(Ok(client)) => client,
            Ok(Err(err)) => {
                return Err(StoreError::Unavailable {
                    store: name,
                    message: err.to_string(),
                });
            }
            Err(_) => {
                return Err(StoreError::Unavailable {
                    store: name,
                    message: "connect timed out".into(),
                });
            }
        };
        let store = EtcdStore {
            client,
            prefix: prefix.to_owned(),
            name,
        };
        store.revision().await?;
        Ok(store)
    }

    /// A KV client that takes responses of any size etcd sends.
    fn kv(&self) -> KvClient {
        self.client
            .kv_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn election_key(&self, election: &str) -> String {
        format!("{}elections/{election}", self.prefix)
    }

    fn unavailable(&self, message: impl Into<String>) -> StoreError {
        StoreError::Unavailable {
            store: self.name.clone(),
            message: message.into(),
        }
    }

    fn corrupt(&self, message: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            store: self.name.clone(),
            message: message.into(),
        }
    }

    /// etcd's limits on one request come back as gRPC errors; everything else means the store
    /// cannot serve us now.
    fn error(&self, err: etcd_client::Error) -> StoreError {
        if let etcd_client::Error::GRpcStatus(status) = &err {
            let message = status.message();
            let limit = if message.contains("too many operations in txn request") {
                Some(
                    "a transaction takes at most --max-txn-ops checks and as many writes (default 128)",
                )
            } else if message.contains("request is too large")
                || status.code() == tonic::Code::ResourceExhausted
            {
                Some("a request takes at most --max-request-bytes (default 1.5 MiB)")
            } else {
                None
            };
            if let Some(limit) = limit {
                return StoreError::TooLarge {
                    store: self.name.clone(),
                    message: format!("{message}: {limit}"),
                };
            }
        }
        self.unavailable(err.to_string())
    }

    /// Runs one request under [`REQUEST_TIMEOUT`].
    async fn call<T>(
        &self,
        what: &str,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match timeout(REQUEST_TIMEOUT, request).await {
            Ok(result) => result.map_err(|err| self.error(err)),
            Err(_) => Err(self.unavailable(format!("{what}: no answer in {REQUEST_TIMEOUT:?}"))),
        }
    }

    fn header_revision(&self, header: Option<&ResponseHeader>) -> Result<u64, StoreError> {
        header
            .map(|h| revision(h.revision()))
            .ok_or_else(|| self.unavailable("response without a header"))
    }

    fn strip(&self, key: &[u8]) -> Result<String, StoreError> {
        key.strip_prefix(self.prefix.as_bytes())
            .and_then(|key| std::str::from_utf8(key).ok())
            .map(str::to_owned)
            .ok_or_else(|| {
                let key = String::from_utf8_lossy(key);
                self.corrupt(format!("key {key:?} is not UTF-8 under {:?}", self.prefix))
            })
    }

    fn entry(&self, kv: &KeyValue) -> Result<Entry, StoreError> {
        Ok(Entry {
            key: self.strip(kv.key())?,
            value: kv.value().to_vec(),
            revision: revision(kv.mod_revision()),
        })
    }

    fn change(&self, event: &etcd_client::Event) -> Result<Change, StoreError> {
        let kv = event
            .kv()
            .ok_or_else(|| self.corrupt("watch event without a key"))?;
        Ok(match event.event_type() {
            EventType::Put => Change::Put(self.entry(kv)?),
            EventType::Delete => Change::Delete {
                key: self.strip(kv.key())?,
                revision: revision(kv.mod_revision()),
            },
        })
    }

    /// Relays a watch into `changes` until the receiver goes or the watch fails (which it
    /// reports, once), then cancels it.
    async fn forward(
        self,
        mut stream: WatchStream,
        first: WatchResponse,
        changes: mpsc::Sender<Result<Change, StoreError>>,
    ) {
        let id = first.watch_id();
        let mut message = Ok(Some(first));
        loop {
            let relayed = match message {
                Ok(Some(response)) if !response.canceled() => self.relay(&response, &changes).await,
                Ok(Some(response)) => {
                    let reason = response.cancel_reason();
                    Err(Some(self.unavailable(format!("watch canceled: {reason}"))))
                }
                Ok(None) => Err(Some(self.unavailable("watch stream ended"))),
                Err(err) => Err(Some(self.error(err))),
            };
            if let Err(failure) = relayed {
                if let Some(failure) = failure {
                    let _ = changes.send(Err(failure)).await;
                }
                break;
            }
            message = tokio::select! {
                () = changes.closed() => break,
                message = stream.message() => message,
            };
        }
        // Dropping the stream ends it too; the cancel tells etcd at once.
        let _ = timeout(REQUEST_TIMEOUT, stream.cancel(id)).await;
    }

    /// Sends the changes of one watch response: `Err(None)` when the receiver is gone,
    /// `Err(Some)` for an event that is not ours to read.
    async fn relay(
        &self,
        response: &WatchResponse,
        changes: &mpsc::Sender<Result<Change, StoreError>>,
    ) -> Result<(), Option<StoreError>> {
        for event in response.events() {
            let change = self.change(event).map_err(Some)?;
            changes.send(Ok(change)).await.map_err(|_| None)?;
        }
        Ok(())
    }

    /// Campaigns until every [`Leadership`] receiver is gone.
    async fn run_campaign(
        self,
        key: String,
        candidate: String,
        ttl: i64,
        leading: watch::Sender<bool>,
    ) {
        while !leading.is_closed() {
            let pause = match self.term(&key, &candidate, ttl, &leading).await {
                Ok(()) => Duration::ZERO,
                Err(err) => {
                    tracing::warn!(%key, %candidate, "leader election: {err}");
                    RETRY_PAUSE
                }
            };
            tokio::select! {
                () = leading.closed() => break,
                () = sleep(pause) => {}
            }
        }
    }

    /// One round of the election: win and lead until the lease is lost, or wait until the
    /// current leader's key is gone.
    async fn term(
        &self,
        key: &str,
        candidate: &str,
        ttl: i64,
        leading: &watch::Sender<bool>,
    ) -> Result<(), StoreError> {
        let mut lease = self.client.lease_client();
        let granted_at = Instant::now();
        let grant = self.call("lease grant", lease.grant(ttl, None)).await?;
        let (id, ttl) = (grant.id(), seconds(grant.ttl()));
        let txn = etcd_client::Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                candidate,
                Some(PutOptions::new().with_lease(id)),
            )]);
        let mut kv = self.kv();
        let won = self.call("campaign", kv.txn(txn)).await;
        let response = match won {
            Ok(response) => response,
            Err(err) => {
                self.revoke(id).await;
                return Err(err);
            }
        };
        if !response.succeeded() {
            self.revoke(id).await;
            let seen = self.header_revision(response.header())?;
            return self.await_vacancy(key, seen + 1, leading).await;
        }
        leading.send_replace(true);
        let held = self.lead(id, granted_at + ttl, ttl, leading).await;
        // Stop leading before the lease is let go, so two never lead at once.
        leading.send_replace(false);
        self.revoke(id).await;
        held
    }

    /// Keeps lease `id` alive every `ttl / 3` while someone listens. The lease counts as lost
    /// at `ttl` after the last keep-alive that was answered was sent, which is no later than
    /// etcd itself lets it go.
    async fn lead(
        &self,
        id: i64,
        mut expiry: Instant,
        ttl: Duration,
        leading: &watch::Sender<bool>,
    ) -> Result<(), StoreError> {
        let mut lease = self.client.lease_client();
        let sent = Instant::now();
        let (mut keeper, mut answers) = self.call("lease keep-alive", lease.keep_alive(id)).await?;
        expiry = expiry.max(sent + ttl);
        // interval() takes no zero period, should etcd ever grant a zero ttl.
        let period = (ttl / 3).max(Duration::from_millis(100));
        let mut tick = tokio::time::interval_at(Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending: Option<Instant> = None;
        loop {
            tokio::select! {
                () = leading.closed() => return Ok(()),
                () = sleep_until(expiry) => {
                    return Err(self.unavailable(format!("lease {id:x}: no keep-alive in its ttl")));
                }
                _ = tick.tick(), if pending.is_none() => {
                    pending = Some(Instant::now());
                    keeper.keep_alive().await.map_err(|err| self.error(err))?;
                }
                answer = answers.message() => match answer.map_err(|err| self.error(err))? {
                    Some(answer) if answer.ttl() > 0 => {
                        if let Some(sent) = pending.take() {
                            expiry = sent + seconds(answer.ttl());
                        }
                    }
                    Some(_) => return Err(self.unavailable(format!("lease {id:x} expired"))),
                    None => return Err(self.unavailable("lease keep-alive stream ended")),
                },
            }
        }
    }

    /// Waits, from revision `from`, until `key` is deleted.
    async fn await_vacancy(
        &self,
        key: &str,
        from: u64,
        leading: &watch::Sender<bool>,
    ) -> Result<(), StoreError> {
        let mut client = self.client.watch_client();
        let options = WatchOptions::new().with_start_revision(signed(from));
        let mut stream = self
            .call("election watch", client.watch(key, Some(options)))
            .await?;
        loop {
            let message = tokio::select! {
                () = leading.closed() => return Ok(()),
                message = stream.message() => message,
            };
            match message.map_err(|err| self.error(err))? {
                Some(response) if response.canceled() => {
                    return Err(self.unavailable(format!(
                        "election watch canceled: {}",
                        response.cancel_reason()
                    )));
                }
                Some(response) => {
                    if response
                        .events()
                        .iter()
                        .any(|e| e.event_type() == EventType::Delete)
                    {
                        return Ok(());
                    }
                }
                None => return Err(self.unavailable("election watch ended")),
            }
        }
    }

    /// Best effort: a lease not revoked still ends at its ttl.
    async fn revoke(&self, id: i64) {
        let mut lease = self.client.lease_client();
        let _ = self.call("lease revoke", lease.revoke(id)).await;
    }
}

/// etcd revisions are never negative.
fn revision(revision: i64) -> u64 {
    u64::try_from(revision).unwrap_or(0)
}

fn signed(revision: u64) -> i64 {
    i64::try_from(revision).unwrap_or(i64::MAX)
}

fn seconds(ttl: i64) -> Duration {
    Duration::from_secs(u64::try_from(ttl).unwrap_or(0))
}

#[async_trait::async_trait]
impl MetadataStore for EtcdStore {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    fn location(&self) -> String {
        format!("{} under {:?}", self.name, self.prefix)
    }

    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let mut kv = self.kv();
        let response = self.call("get", kv.get(self.full(key), None)).await?;
        response.kvs().first().map(|kv| self.entry(kv)).transpose()
    }

    async fn scan(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        let mut kv = self.kv();
        let options = GetOptions::new().with_prefix();
        let response = self
            .call("scan", kv.get(self.full(prefix), Some(options)))
            .await?;
        // etcd returns a range in key order unless asked to sort otherwise.
        response.kvs().iter().map(|kv| self.entry(kv)).collect()
    }

    async fn commit(&self, txn: &Txn) -> Result<Outcome, StoreError> {
        let mut compares = Vec::with_capacity(txn.checks.len());
        for check in &txn.checks {
            compares.push(match check {
                Check::Absent(key) => Compare::create_revision(self.full(key), CompareOp::Equal, 0),
                // No key is ever at revision 0 (etcd's mod_revision of an absent key) or
                // beyond i64: such a check cannot hold.
                Check::At(key, at) => match i64::try_from(*at) {
                    Ok(at) if at > 0 => Compare::mod_revision(self.full(key), CompareOp::Equal, at),
                    _ => return Ok(Outcome::Conflict),
                },
            });
        }
        // etcd refuses a transaction that writes one key twice. Applied in order, only the last
        // write of each key would remain, so that is the one sent.
        let key = |write: &Write| match write {
            Write::Put(key, _) | Write::Delete(key) => key.clone(),
        };
        let last: HashMap<String, usize> = txn
            .writes
            .iter()
            .enumerate()
            .map(|(i, w)| (key(w), i))
            .collect();
        let ops: Vec<TxnOp> = txn
            .writes
            .iter()
            .enumerate()
            .filter(|(i, write)| last.get(&key(write)) == Some(i))
            .map(|(_, write)| match write {
                Write::Put(key, value) => TxnOp::put(self.full(key), value.clone(), None),
                Write::Delete(key) => TxnOp::delete(self.full(key), None),
            })
            .collect();
        let request = etcd_client::Txn::new().when(compares).and_then(ops);
        let mut kv = self.kv();
        let response = self.call("commit", kv.txn(request)).await?;
        if response.succeeded() {
            // A transaction that changes nothing (no writes, or deletes of absent keys) does
            // not move etcd's revision: it reports the current one.
            Ok(Outcome::Committed(self.header_revision(response.header())?))
        } else {
            Ok(Outcome::Conflict)
        }
    }

    async fn revision(&self) -> Result<u64, StoreError> {
        let mut kv = self.kv();
        // Any key does: every response's header carries the store's revision. Counting one
        // that is never written keeps it cheap (and non-empty, as etcd wants, for any prefix).
        let options = GetOptions::new().with_count_only();
        let response = self
            .call("revision", kv.get(self.full("\0"), Some(options)))
            .await?;
        self.header_revision(response.header())
    }

    async fn watch(&self, prefix: &str) -> Result<Watch, StoreError> {
        let from = self.revision().await? + 1;
        let mut client = self
            .client
            .watch_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(signed(from));
        let mut stream = self
            .call("watch", client.watch(self.full(prefix), Some(options)))
            .await?;
        // Wait for etcd to take the watch, so that a refused one fails here.
        let first = match self.call("watch", stream.message()).await? {
            Some(response) if response.canceled() => {
                return Err(
                    self.unavailable(format!("watch refused: {}", response.cancel_reason()))
                );
            }
            Some(response) => response,
            None => return Err(self.unavailable("watch stream ended")),
        };
        let (changes, receiver) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(self.clone().forward(stream, first, changes));
        Ok(receiver)
    }

    async fn campaign(
        &self,
        election: &str,
        candidate: &str,
        ttl: Duration,
    ) -> Result<Leadership, StoreError> {
        // etcd leases are whole seconds: round up, and at least one.
        let secs = ttl
            .as_secs()
            .saturating_add(u64::from(ttl.subsec_nanos() > 0))
            .max(1);
        let (leading, leadership) = watch::channel(false);
        let task = self.clone().run_campaign(
            self.election_key(election),
            candidate.to_owned(),
            signed(secs),
            leading,
        );
        tokio::spawn(task);
        Ok(leadership)
    }

    async fn leader(&self, election: &str) -> Result<Option<String>, StoreError> {
        let mut kv = self.kv();
        let response = self
            .call("leader", kv.get(self.election_key(election), None))
            .await?;
        response
            .kvs()
            .first()
            .map(|kv| {
                String::from_utf8(kv.value().to_vec())
                    .map_err(|_| self.corrupt(format!("leader of {election:?} is not UTF-8")))
            })
            .transpose()
    }
}
