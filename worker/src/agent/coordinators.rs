//! Which coordinator the agent talks to: a list of addresses, one current. A follower's
//! `Unavailable` names the leader in `x-trainyard-leader`; the agent switches there. Any
//! other transport failure moves on to the next address in the list.

use std::sync::Mutex;
use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use trainyard_auth::client::BearerToken;
use trainyard_auth::tls::ClientTlsFiles;
use trainyard_proto::worker_service_client::WorkerServiceClient;

use crate::WorkerError;

/// The metadata key in which a follower names the leader.
pub(crate) const LEADER_METADATA: &str = "x-trainyard-leader";

/// A WorkerService client that presents the join token on every call.
pub(crate) type Client = WorkerServiceClient<InterceptedService<Channel, BearerToken>>;

/// What every connection presents: the join token, and TLS settings for `https://`.
#[derive(Clone)]
struct Credentials {
    token: BearerToken,
    tls: Option<ClientTlsConfig>,
}

/// A client and the generation of the switch it belongs to.
pub(crate) struct Current {
    /// Bumped on every switch, so that concurrent failures of the same connection move
    /// on only once.
    pub(crate) generation: u64,
    /// The address.
    pub(crate) url: String,
    /// The client.
    pub(crate) client: Client,
}

struct Inner {
    credentials: Credentials,
    urls: Vec<String>,
    index: usize,
    current: Current,
}

/// The coordinator addresses and the current one.
pub(crate) struct Coordinators {
    inner: Mutex<Inner>,
}

/// `host:port` becomes `http://host:port`.
fn normalize(url: &str) -> String {
    let url = url.trim().trim_end_matches('/');
    if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    }
}

fn connect(url: &str, credentials: &Credentials) -> Result<Client, WorkerError> {
    let bad_url = |reason: String| WorkerError::InvalidCoordinatorUrl {
        url: url.to_string(),
        reason,
    };
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| bad_url(e.to_string()))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(2))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true);
    let endpoint = trainyard_auth::tls::secure_endpoint(endpoint, url, credentials.tls.as_ref())
        .map_err(|e| bad_url(e.to_string()))?;
    Ok(WorkerServiceClient::with_interceptor(
        endpoint.connect_lazy(),
        credentials.token.clone(),
    ))
}

impl Coordinators {
    /// Parses a comma-separated list of coordinator URLs (each validated); every call
    /// presents `join_token`, and `https://` addresses use `tls`.
    pub(crate) fn new(
        spec: &str,
        join_token: Option<&str>,
        tls: &ClientTlsFiles,
    ) -> Result<Self, WorkerError> {
        let urls: Vec<String> = spec
            .split(',')
            .filter(|u| !u.trim().is_empty())
            .map(normalize)
            .collect();
        let Some(first) = urls.first().cloned() else {
            return Err(WorkerError::InvalidCoordinatorUrl {
                url: spec.to_string(),
                reason: "no address given".into(),
            });
        };
        trainyard_auth::install_crypto_provider();
        let security = |e: String| WorkerError::Security(e);
        for u in &urls {
            trainyard_auth::tls::check_scheme(u, tls).map_err(|e| security(e.to_string()))?;
        }
        let credentials = Credentials {
            token: BearerToken::new(join_token, "--join-token-file")
                .map_err(|e| security(e.to_string()))?,
            tls: if tls.any() || urls.iter().any(|u| u.starts_with("https://")) {
                Some(tls.load().map_err(|e| security(e.to_string()))?)
            } else {
                None
            },
        };
        for u in &urls[1..] {
            connect(u, &credentials)?;
        }
        let client = connect(&first, &credentials)?;
        Ok(Self {
            inner: Mutex::new(Inner {
                credentials,
                urls,
                index: 0,
                current: Current {
                    generation: 0,
                    url: first,
                    client,
                },
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The current client (cheap clone) and its generation.
    pub(crate) fn current(&self) -> (u64, Client) {
        let g = self.lock();
        (g.current.generation, g.current.client.clone())
    }

    /// After a call made at `generation` failed with `status`: follow the leader it names,
    /// or (for transport-level failures) move on to the next address.
    pub(crate) fn on_error(&self, generation: u64, status: &tonic::Status) {
        let current = self.lock().current.url.clone();
        let hint = status
            .metadata()
            .get(LEADER_METADATA)
            .and_then(|v| v.to_str().ok())
            // A TLS cluster's redirect stays on TLS.
            .map(
                |h| match h.contains("://") || !current.starts_with("https://") {
                    true => normalize(h),
                    false => format!("https://{}", h.trim().trim_end_matches('/')),
                },
            );
        match hint {
            Some(url) => self.switch_to(generation, &url),
            None if matches!(
                status.code(),
                tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::Cancelled
                    | tonic::Code::DeadlineExceeded
            ) =>
            {
                self.next(generation)
            }
            None => {}
        }
    }

    /// Moves on to the next address (a call at `generation` timed out or failed).
    pub(crate) fn next(&self, generation: u64) {
        let mut g = self.lock();
        if g.current.generation != generation || g.urls.len() < 2 {
            return;
        }
        g.index = (g.index + 1) % g.urls.len();
        let url = g.urls[g.index].clone();
        Self::install(&mut g, url);
    }

    fn switch_to(&self, generation: u64, url: &str) {
        let mut g = self.lock();
        if g.current.generation != generation || g.current.url == url {
            return;
        }
        match g.urls.iter().position(|u| u == url) {
            Some(i) => g.index = i,
            None => {
                g.urls.push(url.to_string());
                g.index = g.urls.len() - 1;
            }
        }
        Self::install(&mut g, url.to_string());
    }

    fn install(g: &mut Inner, url: String) {
        match connect(&url, &g.credentials) {
            Ok(client) => {
                tracing::info!(coordinator = %url, "switching to another coordinator");
                g.current = Current {
                    generation: g.current.generation + 1,
                    url,
                    client,
                };
            }
            Err(e) => tracing::warn!(error = %e, "cannot use the leader's address"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn follows_the_leader_hint_then_rotates() {
        let c = Coordinators::new(
            "127.0.0.1:1, http://127.0.0.1:2",
            None,
            &ClientTlsFiles::default(),
        )
        .unwrap();
        assert_eq!(c.lock().current.url, "http://127.0.0.1:1");
        let mut st = tonic::Status::unavailable("not the leader; leader is 127.0.0.1:3");
        st.metadata_mut()
            .insert(LEADER_METADATA, "127.0.0.1:3".parse().unwrap());
        c.on_error(0, &st);
        assert_eq!(c.lock().current.url, "http://127.0.0.1:3");
        // A stale failure (older generation) changes nothing.
        c.on_error(0, &tonic::Status::unavailable("down"));
        assert_eq!(c.lock().current.url, "http://127.0.0.1:3");
        c.on_error(1, &tonic::Status::unavailable("down"));
        assert_eq!(c.lock().current.url, "http://127.0.0.1:1");
        // Application errors do not move.
        c.on_error(2, &tonic::Status::not_found("x"));
        assert_eq!(c.lock().current.generation, 2);
    }
}
