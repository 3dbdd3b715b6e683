//! A client of the control plane's gRPC services, with the cluster token on every call: what
//! the `tier0` commands (and, later, the client shim and the data daemons) use.

use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::proto;

/// Adds `authorization: Bearer <token>` to every request.
#[derive(Clone, Debug)]
pub struct TokenInterceptor {
    header: MetadataValue<tonic::metadata::Ascii>,
}

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.header.clone());
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
}

impl ControlClient {
    /// Connects to `url` (`http://host:port`, or `host:port`).
    pub async fn connect(url: &str, token: &[u8]) -> Result<ControlClient, ClientError> {
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
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                url: url.clone(),
                source,
            })?;
        let interceptor = TokenInterceptor { header };
        let authed = || InterceptedService::new(channel.clone(), interceptor.clone());
        Ok(ControlClient {
            namespace: proto::namespace_client::NamespaceClient::new(authed()),
            cluster: proto::cluster_client::ClusterClient::new(authed()),
            snapshots: proto::snapshots_client::SnapshotsClient::new(authed()),
            admin: proto::admin_client::AdminClient::new(authed()),
            url,
        })
    }
}
