//! Connection to a coordinator: one channel, the three service clients on it.

use std::time::Duration;

use anyhow::Result;
use tonic::transport::{Channel, Endpoint};
use trainyard_proto::cluster_service_client::ClusterServiceClient;
use trainyard_proto::job_service_client::JobServiceClient;

use crate::error::bad_input;

/// How long to wait for the TCP connection to the coordinator.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Clients of the coordinator's user-facing services.
#[derive(Clone)]
pub struct Client {
    /// JobService client.
    pub jobs: JobServiceClient<Channel>,
    /// ClusterService client.
    pub cluster: ClusterServiceClient<Channel>,
}

/// Normalises a coordinator address: `host:port` becomes `http://host:port`.
pub fn normalize_url(url: &str) -> String {
    let url = url.trim().trim_end_matches('/');
    if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    }
}

impl Client {
    /// Connects to the coordinator at `url`, with a clear error when nothing listens there.
    pub async fn connect(url: &str) -> Result<Client> {
        let url = normalize_url(url);
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| bad_input(format!("--coordinator: invalid URL {url:?}: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        let channel = endpoint.connect().await.map_err(|e| {
            // The transport error nests the same cause several times; show the root.
            let root = std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
                .last()
                .map(|e| e.to_string())
                .unwrap_or_default();
            anyhow::anyhow!(
                "cannot reach the coordinator at {url}: {root} (is it running? start one with \
                 `trainyard local`, or point --coordinator / TRAINYARD_COORDINATOR at it)"
            )
        })?;
        Ok(Client {
            jobs: JobServiceClient::new(channel.clone()),
            cluster: ClusterServiceClient::new(channel),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_host_port_gets_a_scheme() {
        assert_eq!(normalize_url("127.0.0.1:7800"), "http://127.0.0.1:7800");
        assert_eq!(normalize_url("http://h:1/"), "http://h:1");
    }

    #[tokio::test]
    async fn nothing_listening_is_a_clear_error() {
        // Bind then drop, so the port is (almost certainly) closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = Client::connect(&format!("http://127.0.0.1:{port}"))
            .await
            .err()
            .expect("connect must fail");
        let msg = format!("{err:#}");
        assert!(msg.contains("cannot reach the coordinator"), "{msg}");
        assert_eq!(crate::error::exit_code(&err), crate::error::EXIT_FAILURE);
    }
}
