//! Connection to a coordinator: one channel, the three service clients on it.
//!
//! `--coordinator` may list several coordinators (`http://a:7800,http://b:7800`): the
//! client looks for the leader (the one whose WorkerService reports SERVING on the health
//! service), and [`Client::call`] follows a follower's redirect (`Unavailable` with
//! `x-trainyard-leader`) or moves on to the next address, with backoff.
//!
//! A [`Target`] carries what every call presents: the bearer token (`TRAINYARD_TOKEN` or
//! `--token-file`) and, for `https://` addresses, the TLS settings (`--tls-ca`, and
//! `--tls-cert`/`--tls-key` for mutual TLS).

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Result;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use trainyard_auth::client::BearerToken;
use trainyard_auth::tls::ClientTlsFiles;
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

/// A channel whose calls carry the bearer token.
pub type Authed = InterceptedService<Channel, BearerToken>;

/// Where the coordinator is and what to present to it.
#[derive(Clone, Debug)]
pub struct Target {
    /// The coordinator address(es), as given (see [`split_urls`]).
    pub url: String,
    token: BearerToken,
    tls: Option<ClientTlsConfig>,
}

impl Target {
    /// A coordinator without authentication or TLS (the in-process clusters).
    pub fn plain(url: &str) -> Self {
        Target {
            url: url.to_string(),
            token: BearerToken::default(),
            tls: None,
        }
    }

    /// The coordinator at `url`, with the bearer token (`TRAINYARD_TOKEN`, or the first line
    /// of `token_file`) and the TLS files for `https://` addresses.
    pub fn new(
        url: &str,
        token_file: Option<&std::path::Path>,
        tls: &ClientTlsFiles,
    ) -> Result<Self> {
        let token =
            trainyard_auth::client::token_from(token_file, "--token-file", "TRAINYARD_TOKEN")
                .map_err(|e| bad_input(e.to_string()))?;
        let source = if token_file.is_some() {
            "--token-file"
        } else {
            "TRAINYARD_TOKEN"
        };
        let token =
            BearerToken::new(token.as_deref(), source).map_err(|e| bad_input(e.to_string()))?;
        let urls = split_urls(url);
        for u in &urls {
            trainyard_auth::tls::check_scheme(u, tls).map_err(|e| bad_input(e.to_string()))?;
        }
        let tls = if tls.any() || urls.iter().any(|u| u.starts_with("https://")) {
            trainyard_auth::install_crypto_provider();
            Some(tls.load().map_err(|e| bad_input(e.to_string()))?)
        } else {
            None
        };
        Ok(Target {
            url: url.to_string(),
            token,
            tls,
        })
    }

    /// The same credentials for another address (a leader named by a follower).
    fn with_url(&self, url: &str) -> Self {
        Target {
            url: url.to_string(),
            ..self.clone()
        }
    }
}

/// Clients of the coordinator's user-facing services.
#[derive(Clone)]
pub struct Client {
    /// JobService client.
    pub jobs: JobServiceClient<Authed>,
    /// ClusterService client.
    pub cluster: ClusterServiceClient<Authed>,
    /// What every connection presents.
    target: Target,
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

/// The leader's address as a follower names it (`host:port`), with the scheme of the
/// address the answer came from (so a TLS cluster's redirect stays on TLS).
pub fn leader_url(hint: &str, from: &str) -> String {
    if !hint.contains("://") && from.starts_with("https://") {
        format!("https://{}", hint.trim().trim_end_matches('/'))
    } else {
        normalize_url(hint)
    }
}

impl Client {
    /// Connects to the coordinator at `url` (or, for a comma-separated list, to the leader
    /// among them), with a clear error when nothing listens there.
    pub async fn connect(target: &Target) -> Result<Client> {
        let urls = split_urls(&target.url);
        match urls.as_slice() {
            [] => Err(bad_input("--coordinator: no address given")),
            [one] => Self::connect_one(target, one, &urls, CONNECT_TIMEOUT).await,
            _ => Self::find_leader(target, urls).await,
        }
    }

    /// Tries the coordinators in turn until one says it leads; after [`LEADER_DEADLINE`]
    /// settles for any reachable one (reads work on followers).
    async fn find_leader(target: &Target, urls: Vec<String>) -> Result<Client> {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(200);
        loop {
            let mut reachable = None;
            let mut last_err = None;
            for u in &urls {
                match Self::connect_one(target, u, &urls, LIST_CONNECT_TIMEOUT).await {
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

    /// Submits `spec` (through [`Client::call`], so a follower's redirect is followed) and
    /// returns the new job's record.
    pub async fn submit(&mut self, spec: trainyard_proto::JobSpec) -> Result<trainyard_proto::Job> {
        let reply = self
            .call(|mut c| {
                let spec = spec.clone();
                async move {
                    c.jobs
                        .submit_job(trainyard_proto::SubmitJobRequest { spec: Some(spec) })
                        .await
                }
            })
            .await
            .map_err(crate::error::rpc)?;
        reply.into_inner().job.ok_or_else(|| {
            anyhow::anyhow!("the coordinator accepted the job but returned no record")
        })
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
                .map(|h| leader_url(h, &self.url));
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
            let target = self.target.with_url(&next);
            if let Ok(c) = Self::connect_one(&target, &next, &self.urls, LIST_CONNECT_TIMEOUT).await
            {
                *self = c;
            }
        }
    }

    async fn connect_one(
        target: &Target,
        url: &str,
        urls: &[String],
        timeout: Duration,
    ) -> Result<Client> {
        let url = url.to_string();
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| bad_input(format!("--coordinator: invalid URL {url:?}: {e}")))?
            .connect_timeout(timeout)
            .tcp_nodelay(true);
        let endpoint = trainyard_auth::tls::secure_endpoint(endpoint, &url, target.tls.as_ref())
            .map_err(|e| bad_input(format!("--coordinator: {e}")))?;
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
            jobs: JobServiceClient::with_interceptor(channel.clone(), target.token.clone()),
            cluster: ClusterServiceClient::with_interceptor(channel.clone(), target.token.clone()),
            target: target.with_url(&url),
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
        assert_eq!(leader_url("h:1", "https://g:1"), "https://h:1");
        assert_eq!(leader_url("h:1", "http://g:1"), "http://h:1");
    }

    #[tokio::test]
    async fn nothing_listening_is_a_clear_error() {
        // Bind then drop, so the port is (almost certainly) closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = Client::connect(&Target::plain(&format!("http://127.0.0.1:{port}")))
            .await
            .err()
            .expect("connect must fail");
        let msg = format!("{err:#}");
        assert!(msg.contains("cannot reach the coordinator"), "{msg}");
        assert_eq!(crate::error::exit_code(&err), crate::error::EXIT_FAILURE);
    }
}
