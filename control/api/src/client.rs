//! A client of the control plane's gRPC services, with the cluster token on every call: what
//! the `tier0` commands (and, later, the client shim and the data daemons) use.

use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::proto;

/// The header that marks a call as an agent's (`tier0 mcp`), naming the agent: the control
/// plane holds such calls that change anything to the agents policy and audits them.
pub const AGENT_HEADER: &str = "x-tier0-agent";

/// Adds `authorization: Bearer <token>` (and, for an agent, [`AGENT_HEADER`]) to every request.
#[derive(Clone, Debug)]
pub struct TokenInterceptor {
    header: MetadataValue<tonic::metadata::Ascii>,
    agent: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.header.clone());
        if let Some(agent) = &self.agent {
            request.metadata_mut().insert(AGENT_HEADER, agent.clone());
        }
        Ok(request)
    }
}

type Authed = InterceptedService<Channel, TokenInterceptor>;

#[derive(Clone, Debug)]
pub struct ControlClient {
    pub url: String,
    pub namespace: proto::namespace_client::NamespaceClient<Authed>,
    pub cluster: proto::cluster_client::ClusterClient<Authed>,
    pub snapshots: proto::snapshots_client::SnapshotsClient<Authed>,
    pub admin: proto::admin_client::AdminClient<Authed>,
    pub orchestration: proto::orchestration_client::OrchestrationClient<Authed>,
}

/// How long a client waits: to connect, for each call's reply, and for a keepalive ping's
/// answer on an idle connection (a dead host or a cut network answers nothing, so without
/// these a call would wait for the kernel's TCP timeouts, many minutes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Connecting to the control plane.
    pub connect: Duration,
    /// One call, until its reply (or a stream's first headers) arrives; past it the call
    /// fails with `Cancelled`.
    pub request: Duration,
    /// How often an HTTP/2 ping checks the connection, calls in flight or not.
    pub keepalive_interval: Duration,
    /// How long a ping's answer may take before the connection is dropped (every call on it
    /// then fails with `Unavailable`).
    pub keepalive_timeout: Duration,
}

impl Default for Timeouts {
    /// 5 s to connect, 30 s for a call (an upkeep pass or a rollback of a large tree does
    /// real work), a ping every 5 s answered within 5 s.
    fn default() -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(5),
            request: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("control plane {url}: {message}")]
    Address { url: String, message: String },
    #[error("control plane {url}: cannot connect: {source}")]
    Connect {
        url: String,
        source: tonic::transport::Error,
    },
    #[error("the cluster token must be printable ASCII (it travels in a header)")]
    Token,
    #[error("agent name {0:?}: printable ASCII (it travels in a header)")]
    Agent(String),
}

impl ControlClient {
    /// Connects to `url` (`http://host:port`, or `host:port`) with the default [`Timeouts`].
    pub async fn connect(url: &str, token: &[u8]) -> Result<ControlClient, ClientError> {
        ControlClient::connect_with(url, token, Timeouts::default()).await
    }

    /// Connects to `url` with `timeouts`.
    pub async fn connect_with(
        url: &str,
        token: &[u8],
        timeouts: Timeouts,
    ) -> Result<ControlClient, ClientError> {
        ControlClient::connect_inner(url, token, timeouts, None).await
    }

    /// Connects to `url` as the agent `agent`: every call carries [`AGENT_HEADER`].
    pub async fn connect_as_agent(
        url: &str,
        token: &[u8],
        timeouts: Timeouts,
        agent: &str,
    ) -> Result<ControlClient, ClientError> {
        ControlClient::connect_inner(url, token, timeouts, Some(agent)).await
    }

    async fn connect_inner(
        url: &str,
        token: &[u8],
        timeouts: Timeouts,
        agent: Option<&str>,
    ) -> Result<ControlClient, ClientError> {
        let agent = agent
            .map(|name| {
                name.parse::<MetadataValue<tonic::metadata::Ascii>>()
                    .map_err(|_| ClientError::Agent(name.to_owned()))
            })
            .transpose()?;
        let url = if url.contains("://") {
            url.to_owned()
        } else {
            format!("http://{url}")
        };
        let header = std::str::from_utf8(token)
            .ok()
            .filter(|token| !token.is_empty())
            .and_then(|token| format!("Bearer {token}").parse().ok())
            .ok_or(ClientError::Token)?;
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|error| ClientError::Address {
                url: url.clone(),
                message: error.to_string(),
            })?
            .connect_timeout(timeouts.connect)
            .timeout(timeouts.request)
            .http2_keep_alive_interval(timeouts.keepalive_interval)
            .keep_alive_timeout(timeouts.keepalive_timeout)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                url: url.clone(),
                source,
            })?;
        let interceptor = TokenInterceptor { header, agent };
        let authed = || InterceptedService::new(channel.clone(), interceptor.clone());
        Ok(ControlClient {
            namespace: proto::namespace_client::NamespaceClient::new(authed()),
            cluster: proto::cluster_client::ClusterClient::new(authed()),
            snapshots: proto::snapshots_client::SnapshotsClient::new(authed()),
            admin: proto::admin_client::AdminClient::new(authed()),
            orchestration: proto::orchestration_client::OrchestrationClient::new(authed()),
            url,
        })
    }
}
