//! Connection to a coordinator: one channel, the three service clients on it.
//!
//! `--coordinator` may list several coordinators (`http://a:7800,http://b:7800`): the
//! client looks for the leader (the one whose WorkerService reports SERVING on the health
//! service), and [`Client::call`] follows a follower's redirect (`Unavailable` with
//! `x-trainyard-leader`) or moves on to the next address, with backoff.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Result;
use tonic::transport::{Channel, Endpoint};
use trainyard_proto::cluster_service_client::ClusterServiceClient;
use trainyard_proto::job_service_client::JobServiceClient;

use crate::error::bad_input;

/// How long to wait for the TCP connection to the coordinator.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// With several coordinators: how long to wait for one to connect.
const LIST_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long to look for a leader (or follow redirects) before giving up.
const LEADER_DEADLINE: Duration = Duration::from_secs(15);
/// The service only the leader reports SERVING.
const WORKER_SERVICE: &str = "trainyard.v1.WorkerService";
/// The metadata key in which a follower names the leader.
const LEADER_METADATA: &str = "x-trainyard-leader";

/// Clients of the coordinator's user-facing services.
#[derive(Clone)]
pub struct Client {
    /// JobService client.
    pub jobs: JobServiceClient<Channel>,
    /// ClusterService client.
    pub cluster: ClusterServiceClient<Channel>,
    /// Every coordinator address given, normalised.
    urls: Vec<String>,
    /// The one this client talks to.
    url: String,
    /// The channel to it.
    channel: Channel,
}

/// The coordinator addresses of a comma-separated `--coordinator` value, normalised.
pub fn split_urls(spec: &str) -> Vec<String> {
    spec.split(',')
        .filter(|u| !u.trim().is_empty())
        .map(normalize_url)
        .collect()
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
    /// Connects to the coordinator at `url` (or, for a comma-separated list, to the leader
    /// among them), with a clear error when nothing listens there.
    pub async fn connect(url: &str) -> Result<Client> {
        let urls = split_urls(url);
        match urls.as_slice() {
            [] => Err(bad_input("--coordinator: no address given")),
            [one] => Self::connect_one(one, &urls, CONNECT_TIMEOUT).await,
            _ => Self::find_leader(urls).await,
        }
    }

    /// Tries the coordinators in turn until one says it leads; after [`LEADER_DEADLINE`]
    /// settles for any reachable one (reads work on followers).
    async fn find_leader(urls: Vec<String>) -> Result<Client> {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(200);
        loop {
            let mut reachable = None;
            let mut last_err = None;
            for u in &urls {
                match Self::connect_one(u, &urls, LIST_CONNECT_TIMEOUT).await {
                    Ok(c) if c.leads().await => return Ok(c),
                    Ok(c) => {
                        reachable.get_or_insert(c);
                    }
                    Err(e) => last_err = Some(e),
                }
            }
            if started.elapsed() >= LEADER_DEADLINE {
                return match (reachable, last_err) {
                    (Some(c), _) => Ok(c),
                    (None, Some(e)) => Err(e),
                    (None, None) => Err(bad_input("--coordinator: no address given")),
                };
            }
            tracing::debug!("no coordinator leads yet; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Whether this coordinator leads (its WorkerService reports SERVING).
    async fn leads(&self) -> bool {
        let mut health = tonic_health::pb::health_client::HealthClient::new(self.channel.clone());
        let service = WORKER_SERVICE;
        let request = tonic_health::pb::HealthCheckRequest {
            service: service.to_string(),
        };
        matches!(
            tokio::time::timeout(LIST_CONNECT_TIMEOUT, health.check(request)).await,
            Ok(Ok(r)) if r.get_ref().status
                == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        )
    }

    /// Runs `f` against the coordinator; when it answers `Unavailable`, switches to the
    /// leader it names (or, with several addresses, to the next one) and retries with
    /// backoff for up to [`LEADER_DEADLINE`]. Other errors are returned as they are.
    pub async fn call<T, F, Fut>(&mut self, mut f: F) -> Result<T, tonic::Status>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(200);
        loop {
            let status = match f(self.clone()).await {
                Ok(v) => return Ok(v),
                Err(s) if s.code() == tonic::Code::Unavailable => s,
                Err(s) => return Err(s),
            };
            let hint = status
                .metadata()
                .get(LEADER_METADATA)
                .and_then(|v| v.to_str().ok())
                .map(normalize_url);
            let next = match hint {
                Some(h) => h,
                None if self.urls.len() > 1 => {
                    let i = self.urls.iter().position(|u| *u == self.url).unwrap_or(0);
                    self.urls[(i + 1) % self.urls.len()].clone()
                }
                None => return Err(status),
            };
            if started.elapsed() >= LEADER_DEADLINE {
                return Err(status);
            }
            tracing::debug!(from = %self.url, to = %next, error = %status, "retrying at another coordinator");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
            if let Ok(c) = Self::connect_one(&next, &self.urls, LIST_CONNECT_TIMEOUT).await {
                *self = c;
            }
        }
    }

    async fn connect_one(url: &str, urls: &[String], timeout: Duration) -> Result<Client> {
        let url = url.to_string();
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| bad_input(format!("--coordinator: invalid URL {url:?}: {e}")))?
            .connect_timeout(timeout)
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
            cluster: ClusterServiceClient::new(channel.clone()),
            channel,
            urls: urls.to_vec(),
            url,
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
        assert_eq!(
            split_urls("a:1, http://b:2/,"),
            vec!["http://a:1".to_string(), "http://b:2".to_string()]
        );
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
