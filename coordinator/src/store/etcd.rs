//! The etcd backend: the cluster state in an etcd v3 cluster (`etcd-client`), for
//! coordinators that must survive the machine they run on.
//!
//! # Keys (under a root prefix, `/trainyard` unless the store URL names another)
//!
//! ```text
//! <root>/v1/jobs/<job-id>                       -> trainyard.v1.Job (prost), record_version 1
//! <root>/v1/checkpoints/<job-id>/<step:020>     -> trainyard.v1.CheckpointInfo (prost)
//! <root>/v1/workers/<worker-id>  (lease-bound)  -> trainyard.v1.Worker (prost)
//! ```
//!
//! # How the trait maps to etcd
//!
//! - **Revisions** are etcd's: a job's [`Job::revision`] is its key's `mod_revision` (the
//!   value itself is stored with `revision = 0` and filled in from the key on every read).
//! - **Create** is a transaction `create_revision(key) == 0 → put`; a failed compare is
//!   [`StoreError::AlreadyExists`].
//! - **Compare-and-set** is a transaction `create_revision(key) > 0 && mod_revision(key) ==
//!   expected → put`, else `get(key)`: a missing key is [`StoreError::NotFound`], another
//!   revision is [`StoreError::Conflict`] carrying the key's real `mod_revision`.
//! - **Batching.** Concurrent creates and updates are packed into one transaction (every
//!   item's compares, the fence once, every item's put) by [`batch`]; a failed compare
//!   fails the batch, whose items then go alone, so the outcome of each write is exactly
//!   as described above. Writes of one batch share its revision.
//! - **current_revision** is the highest `mod_revision` under the root prefix (the last
//!   write of *this* store; other tenants of the etcd cluster do not move it), or the
//!   cluster's revision while the prefix is empty. It costs one key-only range over the
//!   prefix (etcd sorts server-side); nothing hot calls it.
//! - **Watches** are etcd prefix watches on `<root>/v1/jobs/` from `start_revision`; a
//!   `PUT` whose `create_revision == mod_revision` is [`ChangeKind::Created`], any other
//!   `PUT` [`ChangeKind::Updated`]. etcd's "compacted" answer is [`StoreError::Compacted`]
//!   with etcd's oldest available revision.
//! - **Leases.** `register_worker` grants an etcd lease of the TTL (rounded up to whole
//!   seconds; etcd also enforces its own minimum, about 2 s with default timings) and puts
//!   the worker key with it; `keep_alive` renews the lease on a keep-alive stream cached per
//!   worker. The *deadline* of a lease is tracked by this store with millisecond precision,
//!   exactly like the embedded backend; `expire_workers` returns (once) the workers **this
//!   store registered** whose deadline passed, revoking their etcd lease (which deletes the
//!   key), plus — checked at most once a second with one key-only range — the workers it
//!   registered whose key etcd already deleted (the etcd lease ran out, e.g. while etcd was
//!   unreachable, or was revoked by someone else). The etcd lease is the backstop: when this
//!   coordinator dies, nobody renews it and etcd deletes the worker keys by itself. Keys of
//!   workers registered by *another* store instance are listed by `list_workers` but never
//!   reported by this one's `expire_workers` (that is for the HA work: the leader owns the
//!   leases). `last_heartbeat_unix_ms` is refreshed in memory on every keep-alive (a put
//!   per heartbeat would cost one raft write per worker per second); the stored record
//!   keeps the registration time.
//! - **Leader fencing.** With a [`Fence`] set ([`StateStore::set_fence`]: the leader's
//!   election key and its create revision, the term), `create_job`, `update_job`,
//!   `record_checkpoint` and `delete_checkpoint` add `create_revision(election key) == term`
//!   to their transaction;
//!   their failure branch reads the election key, so a lost fence (key gone or re-created
//!   by a newer leader) is told apart from a failed compare-and-set and returned as
//!   [`StoreError::NotLeader`], with nothing written. Worker leases are not fenced.
//! - **Checkpoints** are one put each (idempotent per job and step), and one delete each
//!   when retention removes them (idempotent too). The trait records the
//!   checkpoint and the job's `latest_checkpoint` in two calls, so they are two
//!   transactions; both are idempotent.
//! - **Corrupt records.** A value that does not decode (or whose id does not match its key)
//!   is logged at `warn` with its key and skipped by every listing and watch; `get_job` on
//!   it returns [`StoreError::Corrupt`] naming the key.
//!
//! # Connection
//!
//! [`EtcdStore::connect`] retries with exponential backoff (200 ms → 10 s) while etcd is
//! unreachable, logging each attempt at `warn`, for [`EtcdConfig::startup_retry`] (forever
//! by default); bad credentials or certificates fail at once. Every request afterwards is
//! bounded by [`EtcdConfig::request_timeout`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, SortOrder, SortTarget, Txn, TxnOp,
    TxnOpResponse, WatchOptions, WatchStream,
};
use prost::Message;
use trainyard_proto::{CheckpointInfo, Job, Worker, WorkerState};

mod batch;

use super::{
    ChangeKind, Fence, JobChange, JobPage, JobQuery, JobWatch, Revision, StateStore, StoreError,
    JOB_RECORD_VERSION,
};

/// Root prefix of the keys when the store URL names none.
pub const DEFAULT_PREFIX: &str = "/trainyard";
/// Port of an endpoint given without one.
pub const DEFAULT_PORT: u16 = 2379;
/// Environment variable with the etcd password when the URL names only the user.
pub const PASSWORD_ENV: &str = "TRAINYARD_ETCD_PASSWORD";

/// Keys fetched per range request when listing jobs.
const LIST_BATCH: i64 = 256;
/// How often `expire_workers` checks etcd for worker keys it deleted by itself.
const REMOTE_EXPIRY_CHECK: Duration = Duration::from_secs(1);
/// First and longest wait between connection attempts at start.
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// TLS material for `etcd+https://` endpoints (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// CA certificate(s) that signed the etcd servers' certificates.
    pub ca: PathBuf,
    /// Client certificate and key, for etcd clusters that require client certificates.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// How to reach etcd and where the keys live.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Endpoints such as `http://10.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Root prefix of every key, without a trailing slash (e.g. `/trainyard`).
    pub prefix: String,
    /// User and password, for etcd clusters with authentication enabled.
    pub user: Option<(String, String)>,
    /// TLS for `https://` endpoints.
    pub tls: Option<EtcdTls>,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
    /// How long one request may take once connected.
    pub request_timeout: Duration,
    /// How long [`EtcdStore::connect`] keeps retrying an unreachable etcd; `None` = forever.
    pub startup_retry: Option<Duration>,
}

impl std::fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .field("tls", &self.tls)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("startup_retry", &self.startup_retry)
            .finish()
    }
}

impl EtcdConfig {
    /// A config for these endpoints with the default prefix and timeouts, no auth, no TLS.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            prefix: DEFAULT_PREFIX.to_string(),
            user: None,
            tls: None,
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            startup_retry: None,
        }
    }

    /// Parses a store URL:
    /// `etcd://[user[:password]@]host1[:port],host2[:port][/prefix]` (plain HTTP), or
    /// `etcd+https://...?ca=/path/ca.pem[&cert=/path/client.pem&key=/path/client.key]`.
    ///
    /// The port defaults to 2379 and the prefix to `/trainyard`. A user without a password
    /// takes it from `TRAINYARD_ETCD_PASSWORD`. User and password may be percent-encoded.
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        let bad = |reason: String| StoreError::BadUrl {
            url: super::redact_url(url),
            reason,
        };
        let (https, rest) = if let Some(rest) = url.strip_prefix("etcd://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("etcd+https://") {
            (true, rest)
        } else {
            return Err(bad("expected etcd:// or etcd+https://".into()));
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        if rest.contains('#') {
            return Err(bad("a fragment (#...) is not allowed".into()));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (userinfo, hosts) = match authority.rfind('@') {
            Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
            None => (None, authority),
        };
        let user = match userinfo {
            None => None,
            Some(info) => {
                let (u, p) = match info.split_once(':') {
                    Some((u, p)) => (percent_decode(u), Some(percent_decode(p))),
                    None => (percent_decode(info), None),
                };
                let u = u.map_err(|e| bad(format!("user: {e}")))?;
                if u.is_empty() {
                    return Err(bad("the user before '@' is empty".into()));
                }
                let p = match p {
                    Some(p) => p.map_err(|e| bad(format!("password: {e}")))?,
                    None => std::env::var(PASSWORD_ENV).map_err(|_| {
                        bad(format!(
                            "user {u} has no password: write user:password@ or set {PASSWORD_ENV}"
                        ))
                    })?,
                };
                Some((u, p))
            }
        };
        if hosts.is_empty() {
            return Err(bad(
                "no etcd endpoint: expected etcd://host1:2379,host2:2379".into(),
            ));
        }
        let scheme = if https { "https" } else { "http" };
        let mut endpoints = Vec::new();
        for host in hosts.split(',') {
            let endpoint = parse_host(host).map_err(&bad)?;
            endpoints.push(format!("{scheme}://{endpoint}"));
        }
        let prefix = parse_prefix(path).map_err(&bad)?;

        let (mut ca, mut cert, mut key) = (None, None, None);
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v).map_err(|e| bad(format!("{k}: {e}")))?;
            if v.is_empty() {
                return Err(bad(format!("{k}: empty value")));
            }
            let slot = match k {
                "ca" => &mut ca,
                "cert" => &mut cert,
                "key" => &mut key,
                other => {
                    return Err(bad(format!(
                        "unknown parameter {other:?} (known: ca, cert, key)"
                    )))
                }
            };
            *slot = Some(PathBuf::from(v));
        }
        let tls = if https {
            let ca = ca.ok_or_else(|| {
                bad(
                    "etcd+https needs ?ca=/path/to/ca.pem (the CA that signed etcd's certificates)"
                        .into(),
                )
            })?;
            let identity = match (cert, key) {
                (Some(c), Some(k)) => Some((c, k)),
                (None, None) => None,
                _ => return Err(bad("cert and key must be given together".into())),
            };
            Some(EtcdTls { ca, identity })
        } else {
            if ca.is_some() || cert.is_some() || key.is_some() {
                return Err(bad(
                    "ca/cert/key are TLS settings: use etcd+https:// for TLS".into(),
                ));
            }
            None
        };
        Ok(Self {
            prefix,
            user,
            tls,
            ..Self::new(endpoints)
        })
    }
}

/// `host[:port]` or `[v6]:port` → `host:port`.
fn parse_host(host: &str) -> Result<String, String> {
    if host.is_empty() {
        return Err("empty endpoint in the host list (a stray comma?)".into());
    }
    let (name, port) = if let Some(v6) = host.strip_prefix('[') {
        let (addr, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("endpoint {host}: missing ']'"))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| format!("endpoint {host}: expected ':' after ']'"))?,
            ),
        };
        (format!("[{addr}]"), port)
    } else {
        match host.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (host.to_string(), None),
        }
    };
    if name.is_empty() || name == "[]" {
        return Err(format!("endpoint {host}: empty host name"));
    }
    if name
        .chars()
        .any(|c| c.is_whitespace() || c == '/' || c == '@')
    {
        return Err(format!("endpoint {host}: invalid host name"));
    }
    let port =
        match port {
            None => DEFAULT_PORT,
            Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                format!("endpoint {host}: port {p:?} is not a number in 1..65535")
            })?,
        };
    Ok(format!("{name}:{port}"))
}

/// The URL path → the key root prefix (`/a/b`, no trailing slash).
fn parse_prefix(path: &str) -> Result<String, String> {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok(DEFAULT_PREFIX.to_string());
    }
    if trimmed.contains("//") {
        return Err(format!("prefix {path}: empty path segment"));
    }
    if trimmed.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("prefix {path}: whitespace or control characters"));
    }
    Ok(trimmed.to_string())
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-encoding at byte {i}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "not UTF-8 after percent-decoding".to_string())
}

/// The smallest key greater than every key starting with `prefix` (etcd's range end).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a few map operations; a panic cannot leave them half done.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether an etcd error means "try again later" (as opposed to bad credentials/config).
fn is_transient(e: &etcd_client::Error) -> bool {
    use tonic::Code;
    // A certificate etcd's CA did not sign does not fix itself by waiting.
    if e.to_string().contains("invalid peer certificate") {
        return false;
    }
    match e {
        etcd_client::Error::GRpcStatus(s) => !matches!(
            s.code(),
            Code::InvalidArgument
                | Code::PermissionDenied
                | Code::Unauthenticated
                | Code::Unimplemented
        ),
        etcd_client::Error::InvalidArgs(_)
        | etcd_client::Error::InvalidUri(_)
        | etcd_client::Error::InvalidMetadataValue(_) => false,
        _ => true,
    }
}

/// A keep-alive stream for one lease.
struct KeepAlive {
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
}

/// A worker this store registered.
struct Registration {
    worker: Worker,
    lease_id: i64,
    ttl: Duration,
    deadline: Instant,
    registered_at: Instant,
    keep_alive: Option<Arc<tokio::sync::Mutex<KeepAlive>>>,
}

struct Inner {
    client: Client,
    /// Queue of the job-write batcher ([`batch`]).
    batcher: tokio::sync::mpsc::UnboundedSender<batch::Queued>,
    /// Transactions sent for job creates and updates (batched or alone).
    job_write_txns: std::sync::atomic::AtomicU64,
    config: EtcdConfig,
    jobs: String,
    checkpoints: String,
    workers: String,
    root: String,
    leases: Mutex<HashMap<String, Registration>>,
    last_remote_check: Mutex<Option<Instant>>,
    fence: Mutex<Option<Fence>>,
}

/// The etcd-backed [`StateStore`]. Cheap to clone (shared handle).
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.inner.config.endpoints)
            .field("root", &self.inner.root)
            .finish()
    }
}

async fn connect_once(config: &EtcdConfig) -> Result<Client, etcd_client::Error> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(config.connect_timeout)
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(true)
        .with_require_leader(true);
    if let Some((user, password)) = &config.user {
        options = options.with_user(user.clone(), password.clone());
    }
    if let Some(tls) = &config.tls {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|e| {
                etcd_client::Error::InvalidArgs(format!("cannot read {}: {e}", p.display()))
            })
        };
        let mut t = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)?));
        if let Some((cert, key)) = &tls.identity {
            t = t.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
        }
        options = options.with_tls(t);
    }
    let mut client = Client::connect(&config.endpoints, Some(options)).await?;
    // The channel connects lazily: one cheap read proves etcd answers (and that the
    // credentials may read our prefix).
    client
        .get(
            config.prefix.as_str(),
            Some(GetOptions::new().with_count_only()),
        )
        .await?;
    Ok(client)
}

impl EtcdStore {
    /// Connects to etcd, retrying with backoff while it is unreachable (see
    /// [`EtcdConfig::startup_retry`]). Fails at once on bad credentials or TLS files.
    pub async fn connect(config: EtcdConfig) -> Result<Self, StoreError> {
        if config.endpoints.is_empty() {
            return Err(StoreError::Backend("no etcd endpoints given".into()));
        }
        let started = Instant::now();
        let mut backoff = BACKOFF_START;
        let mut attempt = 1u32;
        let endpoints = config.endpoints.join(",");
        let attempt_limit = config.connect_timeout + config.request_timeout;
        let client = loop {
            let result = match tokio::time::timeout(attempt_limit, connect_once(&config)).await {
                Ok(r) => r,
                Err(_) => Err(etcd_client::Error::Internal(format!(
                    "no answer within {attempt_limit:?}"
                ))),
            };
            let err = match result {
                Ok(client) => break client,
                Err(e) => e,
            };
            if !is_transient(&err) {
                return Err(StoreError::Backend(format!(
                    "etcd at {endpoints} refused the connection: {err}"
                )));
            }
            if let Some(limit) = config.startup_retry {
                if started.elapsed() + backoff > limit {
                    return Err(StoreError::Backend(format!(
                        "etcd at {endpoints} is unreachable (gave up after {:.1} s, {attempt} attempts): {err}",
                        started.elapsed().as_secs_f64()
                    )));
                }
            }
            tracing::warn!(
                error = %err,
                "etcd at {endpoints} is unreachable; retrying in {:.1} s (attempt {attempt}{})",
                backoff.as_secs_f64(),
                match config.startup_retry {
                    Some(limit) => format!(", giving up after {:.0} s", limit.as_secs_f64()),
                    None => ", until it answers".to_string(),
                }
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            attempt += 1;
        };
        if attempt > 1 {
            tracing::info!(endpoints = %endpoints, attempts = attempt, "connected to etcd");
        }
        let root = format!("{}/v1/", config.prefix);
        tracing::debug!(endpoints = %endpoints, root = %root, "opened etcd store");
        Ok(Self {
            inner: Arc::new_cyclic(|weak| Inner {
                batcher: batch::start(weak.clone()),
                job_write_txns: std::sync::atomic::AtomicU64::new(0),
                client,
                jobs: format!("{root}jobs/"),
                checkpoints: format!("{root}checkpoints/"),
                workers: format!("{root}workers/"),
                root,
                config,
                leases: Mutex::new(HashMap::new()),
                last_remote_check: Mutex::new(None),
                fence: Mutex::new(None),
            }),
        })
    }

    /// The root of this store's keys (e.g. `/trainyard/v1/`).
    pub fn root(&self) -> &str {
        &self.inner.root
    }

    /// How many transactions this store sent to create or update jobs: with concurrent
    /// writers far fewer than the writes (see [`batch`]).
    pub fn job_write_transactions(&self) -> u64 {
        self.inner
            .job_write_txns
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn count_job_write_txn(&self) {
        self.inner
            .job_write_txns
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The underlying etcd client (for tests and tools).
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    fn job_key(&self, id: &str) -> String {
        format!("{}{id}", self.inner.jobs)
    }

    fn checkpoint_prefix(&self, job_id: &str) -> String {
        format!("{}{job_id}/", self.inner.checkpoints)
    }

    fn worker_key(&self, id: &str) -> String {
        format!("{}{id}", self.inner.workers)
    }

    /// Runs one etcd request under the request timeout, mapping its error.
    async fn call<T, F>(&self, what: &str, fut: F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        match tokio::time::timeout(self.inner.config.request_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::Backend(format!("etcd {what}: {e}"))),
            Err(_) => Err(StoreError::Backend(format!(
                "etcd {what}: no answer within {:?} from {}",
                self.inner.config.request_timeout,
                self.inner.config.endpoints.join(",")
            ))),
        }
    }

    /// Queues a job write for the batcher and waits for its outcome: `Some(revision)` when
    /// a batch wrote it, `None` when the caller must send it alone (a compare in its batch
    /// failed, it was alone, or the batcher is gone), `Err` when etcd failed.
    async fn write_batched(
        &self,
        key: &str,
        value: &[u8],
        kind: batch::WriteKind,
    ) -> Result<Option<Revision>, StoreError> {
        let (reply, outcome) = tokio::sync::oneshot::channel();
        let queued = batch::Queued {
            key: key.to_string(),
            value: value.to_vec(),
            kind,
            reply,
        };
        if self.inner.batcher.send(queued).is_err() {
            return Ok(None);
        }
        match outcome.await {
            Ok(batch::Outcome::Written(revision)) => Ok(Some(revision)),
            Ok(batch::Outcome::Failed(e)) => Err(e),
            Ok(batch::Outcome::Alone) | Err(_) => Ok(None),
        }
    }

    /// Decodes a job value; `Err` carries the key and the reason (the caller logs or returns it).
    fn decode_job(&self, kv: &KeyValue) -> Result<Job, StoreError> {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let corrupt = |reason: String| StoreError::Corrupt {
            key: key.clone(),
            reason,
        };
        let mut job = Job::decode(kv.value()).map_err(|e| corrupt(e.to_string()))?;
        let id = key.strip_prefix(&self.inner.jobs).unwrap_or(&key);
        if job.id != id {
            return Err(corrupt(format!(
                "the record's id {:?} does not match its key",
                job.id
            )));
        }
        job.revision = kv.mod_revision();
        Ok(job)
    }

    /// Decodes a job or logs it as corrupt and returns `None`.
    fn decode_job_or_skip(&self, kv: &KeyValue) -> Option<Job> {
        match self.decode_job(kv) {
            Ok(job) => Some(job),
            Err(e) => {
                skip_corrupt(&e);
                None
            }
        }
    }

    /// Keep-alive on the worker's cached stream. `Ok(false)`: etcd no longer has the lease.
    async fn renew_lease(&self, worker_id: &str, lease_id: i64) -> Result<bool, StoreError> {
        let cached = lock(&self.inner.leases)
            .get(worker_id)
            .filter(|r| r.lease_id == lease_id)
            .and_then(|r| r.keep_alive.clone());
        let ka = match cached {
            Some(ka) => ka,
            None => {
                // Opening the stream sends the first keep-alive itself.
                let mut lease = self.inner.client.lease_client();
                let opened = tokio::time::timeout(
                    self.inner.config.request_timeout,
                    lease.keep_alive(lease_id),
                )
                .await;
                let (keeper, stream) = match opened {
                    Ok(Ok(pair)) => pair,
                    Ok(Err(etcd_client::Error::LeaseKeepAliveError(_))) => return Ok(false),
                    Ok(Err(e)) => return Err(StoreError::Backend(format!("etcd keep-alive: {e}"))),
                    Err(_) => {
                        return Err(StoreError::Backend(format!(
                            "etcd keep-alive: no answer within {:?}",
                            self.inner.config.request_timeout
                        )))
                    }
                };
                let ka = Arc::new(tokio::sync::Mutex::new(KeepAlive { keeper, stream }));
                if let Some(r) = lock(&self.inner.leases)
                    .get_mut(worker_id)
                    .filter(|r| r.lease_id == lease_id)
                {
                    r.keep_alive = Some(ka);
                }
                return Ok(true);
            }
        };
        let mut guard = ka.lock().await;
        let ka = &mut *guard;
        let answer = self
            .call("keep-alive", async {
                ka.keeper.keep_alive().await?;
                ka.stream.message().await
            })
            .await;
        match answer {
            Ok(Some(resp)) => Ok(resp.ttl() > 0),
            other => {
                // A broken stream: forget it so the next heartbeat opens a fresh one.
                if let Some(r) = lock(&self.inner.leases)
                    .get_mut(worker_id)
                    .filter(|r| r.lease_id == lease_id)
                {
                    r.keep_alive = None;
                }
                match other {
                    Err(e) => Err(e),
                    _ => Err(StoreError::Backend(
                        "etcd keep-alive: the stream ended".into(),
                    )),
                }
            }
        }
    }

    async fn revoke(&self, worker_id: &str, lease_id: i64) {
        let mut lease = self.inner.client.lease_client();
        match self.call("lease revoke", lease.revoke(lease_id)).await {
            Ok(_) => {}
            // Already gone: etcd expired it first.
            Err(e) if e.to_string().contains("requested lease not found") => {}
            Err(e) => tracing::warn!(
                worker = %worker_id,
                lease = lease_id,
                error = %e,
                "could not revoke the worker's etcd lease; etcd will expire it"
            ),
        }
    }
}

impl EtcdStore {
    /// The fence in force, if any.
    fn fence(&self) -> Option<Fence> {
        lock(&self.inner.fence).clone()
    }

    /// The compare a fenced write adds to its transaction.
    fn fence_compare(fence: &Fence) -> Compare {
        Compare::create_revision(fence.key.clone(), CompareOp::Equal, fence.create_revision)
    }

    /// The read a fenced write adds to its failure branch, to tell a lost fence from a
    /// failed compare-and-set.
    fn fence_probe(fence: &Fence) -> TxnOp {
        TxnOp::get(fence.key.clone(), Some(GetOptions::new().with_keys_only()))
    }

    /// Whether the failure branch's last answer (the [`Self::fence_probe`]) shows the fence
    /// still holds.
    fn fence_holds(fence: &Fence, responses: &[TxnOpResponse]) -> bool {
        match responses.last() {
            Some(TxnOpResponse::Get(g)) => g
                .kvs()
                .first()
                .is_some_and(|kv| kv.create_revision() == fence.create_revision),
            _ => false,
        }
    }

    /// The error of a write refused by `fence`.
    fn not_leader(fence: &Fence, what: &str) -> StoreError {
        let key = String::from_utf8_lossy(&fence.key).into_owned();
        tracing::warn!(key = %key, term = fence.create_revision, "{what} refused: this coordinator's leadership is over");
        StoreError::NotLeader {
            key,
            term: fence.create_revision,
        }
    }
}

fn skip_corrupt(e: &StoreError) {
    if let StoreError::Corrupt { key, reason } = e {
        tracing::warn!(key = %key, reason = %reason, "skipping a stored record that does not decode");
    } else {
        tracing::warn!(error = %e, "skipping a stored record");
    }
}

fn header_revision(h: Option<&etcd_client::ResponseHeader>) -> Revision {
    h.map(|h| h.revision()).unwrap_or(0)
}

#[async_trait::async_trait]
impl StateStore for EtcdStore {
    async fn create_job(&self, mut job: Job) -> Result<Job, StoreError> {
        let key = self.job_key(&job.id);
        job.revision = 0;
        job.record_version = JOB_RECORD_VERSION;
        let value = job.encode_to_vec();
        let kind = batch::WriteKind::Create;
        if let Some(revision) = self.write_batched(&key, &value, kind).await? {
            job.revision = revision;
            return Ok(job);
        }
        let fence = self.fence();
        let mut when = batch::compares(&key, kind);
        let mut or_else = Vec::new();
        if let Some(f) = &fence {
            when.push(Self::fence_compare(f));
            or_else.push(Self::fence_probe(f));
        }
        let txn = Txn::new()
            .when(when)
            .and_then([TxnOp::put(key.as_str(), value, None)])
            .or_else(or_else);
        let mut kv = self.inner.client.kv_client();
        self.count_job_write_txn();
        let resp = self.call("create job", kv.txn(txn)).await?;
        if !resp.succeeded() {
            if let Some(f) = &fence {
                if !Self::fence_holds(f, resp.op_responses().as_slice()) {
                    return Err(Self::not_leader(f, "create job"));
                }
            }
            return Err(StoreError::AlreadyExists(job.id));
        }
        job.revision = header_revision(resp.header());
        Ok(job)
    }

    async fn get_job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let key = self.job_key(id);
        let mut kv = self.inner.client.kv_client();
        let resp = self.call("get job", kv.get(key, None)).await?;
        match resp.kvs().first() {
            None => Ok(None),
            Some(kv) => match self.decode_job(kv) {
                Ok(job) => Ok(Some(job)),
                Err(e) => {
                    skip_corrupt(&e);
                    Err(e)
                }
            },
        }
    }

    async fn list_jobs(&self, query: &JobQuery) -> Result<JobPage, StoreError> {
        let end = prefix_end(&self.inner.jobs);
        let mut start: Vec<u8> = match &query.after {
            Some(after) => {
                let mut k = self.job_key(after).into_bytes();
                k.push(0);
                k
            }
            None => self.inner.jobs.clone().into_bytes(),
        };
        // Without a state filter, limit + 1 keys tell whether there is a next page.
        let batch = if query.states.is_empty() && query.limit > 0 {
            (query.limit as i64 + 1).min(LIST_BATCH * 16)
        } else {
            LIST_BATCH
        };
        let mut revision = 0;
        let mut kv = self.inner.client.kv_client();
        let mut page = JobPage::default();
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(batch);
            if revision > 0 {
                // Every batch reads the same snapshot.
                opts = opts.with_revision(revision);
            }
            let resp = self
                .call("list jobs", kv.get(start.clone(), Some(opts)))
                .await?;
            if revision == 0 {
                revision = header_revision(resp.header());
            }
            for kv in resp.kvs() {
                let Some(job) = self.decode_job_or_skip(kv) else {
                    continue;
                };
                if !query.states.is_empty() && !query.states.contains(&job.state()) {
                    continue;
                }
                if query.limit > 0 && page.jobs.len() == query.limit {
                    page.next_after = page.jobs.last().map(|j| j.id.clone());
                    return Ok(page);
                }
                page.jobs.push(job);
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => return Ok(page),
            }
        }
    }

    async fn update_job(&self, mut job: Job, expected: Revision) -> Result<Job, StoreError> {
        let key = self.job_key(&job.id);
        job.revision = 0;
        job.record_version = JOB_RECORD_VERSION;
        let value = job.encode_to_vec();
        let kind = batch::WriteKind::Update { expected };
        if let Some(revision) = self.write_batched(&key, &value, kind).await? {
            job.revision = revision;
            return Ok(job);
        }
        let fence = self.fence();
        let mut when = batch::compares(&key, kind);
        let mut or_else = vec![TxnOp::get(
            key.as_str(),
            Some(GetOptions::new().with_keys_only()),
        )];
        if let Some(f) = &fence {
            when.push(Self::fence_compare(f));
            or_else.push(Self::fence_probe(f));
        }
        let txn = Txn::new()
            .when(when)
            .and_then([TxnOp::put(key.as_str(), value, None)])
            .or_else(or_else);
        let mut kv = self.inner.client.kv_client();
        self.count_job_write_txn();
        let resp = self.call("update job", kv.txn(txn)).await?;
        if resp.succeeded() {
            job.revision = header_revision(resp.header());
            return Ok(job);
        }
        let responses = resp.op_responses();
        if let Some(f) = &fence {
            if !Self::fence_holds(f, &responses) {
                return Err(Self::not_leader(f, "update job"));
            }
        }
        let actual = responses.into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g.kvs().first().map(|kv| kv.mod_revision())),
            _ => None,
        });
        match actual {
            Some(Some(actual)) => Err(StoreError::Conflict {
                id: job.id,
                expected,
                actual,
            }),
            _ => Err(StoreError::NotFound(job.id)),
        }
    }

    async fn current_revision(&self) -> Result<Revision, StoreError> {
        let mut kv = self.inner.client.kv_client();
        let opts = GetOptions::new()
            .with_prefix()
            .with_keys_only()
            .with_sort(SortTarget::Mod, SortOrder::Descend)
            .with_limit(1);
        let resp = self
            .call(
                "current revision",
                kv.get(self.inner.root.as_str(), Some(opts)),
            )
            .await?;
        Ok(match resp.kvs().first() {
            Some(kv) => kv.mod_revision(),
            None => header_revision(resp.header()),
        })
    }

    async fn watch_jobs(&self, from: Revision) -> Result<JobWatch, StoreError> {
        let mut client = self.inner.client.watch_client();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from.max(1));
        let mut stream = self
            .call(
                "watch jobs",
                client.watch(self.inner.jobs.as_str(), Some(opts)),
            )
            .await?;
        // Wait for etcd to confirm (or refuse) the watch, so a compacted revision is an
        // error of this call.
        let mut pending = VecDeque::new();
        loop {
            let resp = self.call("watch jobs", stream.message()).await?;
            let Some(resp) = resp else {
                return Err(StoreError::Backend(
                    "etcd watch: the stream ended before the watch was created".into(),
                ));
            };
            if let Some(err) = watch_error(&resp, from) {
                return Err(err);
            }
            let created = resp.created();
            self.push_events(&resp, &mut pending);
            if created {
                if let Some(err) = self.check_compacted(&mut stream, &resp, from).await? {
                    return Err(err);
                }
                break;
            }
        }
        let state = WatchState {
            store: self.clone(),
            stream,
            pending,
            from,
        };
        let stream = futures::stream::unfold(Some(state), |state| async move {
            let mut st = state?;
            loop {
                if let Some(item) = st.pending.pop_front() {
                    let next = if item.is_ok() { Some(st) } else { None };
                    return Some((item, next));
                }
                match st.stream.message().await {
                    Ok(Some(resp)) => {
                        if let Some(err) = watch_error(&resp, st.from) {
                            st.pending.push_back(Err(err));
                            continue;
                        }
                        let store = st.store.clone();
                        store.push_events(&resp, &mut st.pending);
                    }
                    Ok(None) => {
                        let err = StoreError::Backend("etcd watch: the stream ended".into());
                        return Some((Err(err), None));
                    }
                    Err(e) => {
                        let err = StoreError::Backend(format!("etcd watch: {e}"));
                        return Some((Err(err), None));
                    }
                }
            }
        });
        Ok(Box::pin(stream))
    }

    async fn register_worker(&self, mut worker: Worker, ttl: Duration) -> Result<(), StoreError> {
        let now = now_unix_ms();
        if worker.registered_unix_ms == 0 {
            worker.registered_unix_ms = now;
        }
        worker.last_heartbeat_unix_ms = now;
        worker.state = WorkerState::Alive as i32;
        let ttl_secs = (ttl.as_millis() as i64 + 999) / 1000;
        let mut lease = self.inner.client.lease_client();
        let granted = self
            .call("lease grant", lease.grant(ttl_secs.max(1), None))
            .await?;
        let lease_id = granted.id();
        let key = self.worker_key(&worker.id);
        let mut kv = self.inner.client.kv_client();
        let put = self
            .call(
                "register worker",
                kv.put(
                    key,
                    worker.encode_to_vec(),
                    Some(PutOptions::new().with_lease(lease_id)),
                ),
            )
            .await;
        if let Err(e) = put {
            self.revoke(&worker.id, lease_id).await;
            return Err(e);
        }
        let id = worker.id.clone();
        let started = Instant::now();
        let old = lock(&self.inner.leases).insert(
            id.clone(),
            Registration {
                worker,
                lease_id,
                ttl,
                deadline: started + ttl,
                registered_at: started,
                keep_alive: None,
            },
        );
        if let Some(old) = old.filter(|o| o.lease_id != lease_id) {
            // The key moved to the new lease; the old one holds nothing any more.
            self.revoke(&id, old.lease_id).await;
        }
        Ok(())
    }

    async fn keep_alive(&self, worker_id: &str) -> Result<bool, StoreError> {
        let lease_id = {
            let leases = lock(&self.inner.leases);
            match leases.get(worker_id) {
                Some(r) if r.deadline > Instant::now() => r.lease_id,
                _ => return Ok(false),
            }
        };
        let alive = self.renew_lease(worker_id, lease_id).await?;
        let mut leases = lock(&self.inner.leases);
        let Some(r) = leases.get_mut(worker_id).filter(|r| r.lease_id == lease_id) else {
            return Ok(false);
        };
        let now = Instant::now();
        if !alive {
            tracing::warn!(worker = %worker_id, lease = lease_id, "etcd no longer has the worker's lease");
            // expire_workers reports it.
            r.deadline = now;
            return Ok(false);
        }
        r.deadline = now + r.ttl;
        r.worker.last_heartbeat_unix_ms = now_unix_ms();
        Ok(true)
    }

    async fn list_workers(&self) -> Result<Vec<Worker>, StoreError> {
        let mut kv = self.inner.client.kv_client();
        let resp = self
            .call(
                "list workers",
                kv.get(
                    self.inner.workers.as_str(),
                    Some(GetOptions::new().with_prefix()),
                ),
            )
            .await?;
        let leases = lock(&self.inner.leases);
        let now = Instant::now();
        let mut out = Vec::new();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let mut w = match Worker::decode(kv.value()) {
                Ok(w) => w,
                Err(e) => {
                    skip_corrupt(&StoreError::Corrupt {
                        key,
                        reason: e.to_string(),
                    });
                    continue;
                }
            };
            if let Some(r) = leases.get(&w.id) {
                if r.deadline <= now {
                    continue;
                }
                w.last_heartbeat_unix_ms = r.worker.last_heartbeat_unix_ms;
            }
            out.push(w);
        }
        Ok(out)
    }

    async fn expire_workers(&self) -> Result<Vec<Worker>, StoreError> {
        let now = Instant::now();
        let mut dead: Vec<Registration> = {
            let mut leases = lock(&self.inner.leases);
            let ids: Vec<String> = leases
                .iter()
                .filter(|(_, r)| r.deadline <= now)
                .map(|(id, _)| id.clone())
                .collect();
            ids.iter().filter_map(|id| leases.remove(id)).collect()
        };
        for r in &dead {
            self.revoke(&r.worker.id, r.lease_id).await;
        }
        // Workers whose key etcd deleted by itself (its lease ran out there first).
        let check_remote = {
            let mut last = lock(&self.inner.last_remote_check);
            let due = last.is_none_or(|t| t.elapsed() >= REMOTE_EXPIRY_CHECK);
            if due {
                *last = Some(now);
            }
            due && !lock(&self.inner.leases).is_empty()
        };
        if check_remote {
            let listed_at = Instant::now();
            let mut kv = self.inner.client.kv_client();
            let resp = self
                .call(
                    "list worker keys",
                    kv.get(
                        self.inner.workers.as_str(),
                        Some(GetOptions::new().with_prefix().with_keys_only()),
                    ),
                )
                .await?;
            let present: HashSet<&[u8]> = resp.kvs().iter().map(|kv| kv.key()).collect();
            let mut leases = lock(&self.inner.leases);
            let gone: Vec<String> = leases
                .iter()
                .filter(|(id, r)| {
                    r.registered_at < listed_at && !present.contains(self.worker_key(id).as_bytes())
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in gone {
                if let Some(r) = leases.remove(&id) {
                    tracing::warn!(worker = %id, lease = r.lease_id, "etcd deleted the worker's key (its lease ran out in etcd)");
                    dead.push(r);
                }
            }
        }
        let mut out: Vec<Worker> = dead
            .into_iter()
            .map(|r| {
                let mut w = r.worker;
                w.state = WorkerState::Dead as i32;
                w
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn record_checkpoint(&self, checkpoint: CheckpointInfo) -> Result<(), StoreError> {
        let key = format!(
            "{}{:020}",
            self.checkpoint_prefix(&checkpoint.job_id),
            checkpoint.step
        );
        let mut kv = self.inner.client.kv_client();
        match self.fence() {
            None => {
                self.call(
                    "record checkpoint",
                    kv.put(key, checkpoint.encode_to_vec(), None),
                )
                .await?;
            }
            Some(f) => {
                let txn = Txn::new()
                    .when([Self::fence_compare(&f)])
                    .and_then([TxnOp::put(key, checkpoint.encode_to_vec(), None)]);
                let resp = self.call("record checkpoint", kv.txn(txn)).await?;
                if !resp.succeeded() {
                    return Err(Self::not_leader(&f, "record checkpoint"));
                }
            }
        }
        Ok(())
    }

    async fn delete_checkpoint(&self, job_id: &str, step: u64) -> Result<(), StoreError> {
        let key = format!("{}{step:020}", self.checkpoint_prefix(job_id));
        let mut kv = self.inner.client.kv_client();
        match self.fence() {
            None => {
                self.call("delete checkpoint", kv.delete(key, None)).await?;
            }
            Some(f) => {
                let txn = Txn::new()
                    .when([Self::fence_compare(&f)])
                    .and_then([TxnOp::delete(key, None)]);
                let resp = self.call("delete checkpoint", kv.txn(txn)).await?;
                if !resp.succeeded() {
                    return Err(Self::not_leader(&f, "delete checkpoint"));
                }
            }
        }
        Ok(())
    }

    fn set_fence(&self, fence: Option<Fence>) {
        match &fence {
            Some(f) => {
                tracing::debug!(key = %String::from_utf8_lossy(&f.key), term = f.create_revision, "job writes fenced on leadership")
            }
            None => tracing::debug!("job writes unfenced"),
        }
        *lock(&self.inner.fence) = fence;
    }

    async fn list_checkpoints(&self, job_id: &str) -> Result<Vec<CheckpointInfo>, StoreError> {
        let prefix = self.checkpoint_prefix(job_id);
        let mut kv = self.inner.client.kv_client();
        let resp = self
            .call(
                "list checkpoints",
                kv.get(prefix, Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let mut out = Vec::new();
        for kv in resp.kvs() {
            match CheckpointInfo::decode(kv.value()) {
                Ok(cp) => out.push(cp),
                Err(e) => skip_corrupt(&StoreError::Corrupt {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    reason: e.to_string(),
                }),
            }
        }
        Ok(out)
    }
}

/// The state of a job watch between items.
struct WatchState {
    store: EtcdStore,
    stream: WatchStream,
    pending: VecDeque<Result<JobChange, StoreError>>,
    from: Revision,
}

/// A watch response that ends the watch, as a store error.
fn watch_error(resp: &etcd_client::WatchResponse, from: Revision) -> Option<StoreError> {
    if resp.compact_revision() > 0 {
        return Some(StoreError::Compacted {
            requested: from,
            oldest: resp.compact_revision(),
        });
    }
    if resp.canceled() {
        return Some(StoreError::Backend(format!(
            "etcd cancelled the watch: {}",
            resp.cancel_reason()
        )));
    }
    None
}

impl EtcdStore {
    /// etcd confirms a watch before it reports that its start revision is compacted. So
    /// that a compacted `from` is an error of `watch_jobs` itself (as with every backend),
    /// probe `from` with a count-only range; if etcd says it is compacted, the watch's
    /// next answer carries the oldest revision still available.
    async fn check_compacted(
        &self,
        stream: &mut WatchStream,
        created: &etcd_client::WatchResponse,
        from: Revision,
    ) -> Result<Option<StoreError>, StoreError> {
        let current = header_revision(created.header());
        if from <= 0 || from > current {
            return Ok(None);
        }
        let mut kv = self.inner.client.kv_client();
        let opts = GetOptions::new()
            .with_prefix()
            .with_count_only()
            .with_revision(from);
        match self
            .call("watch jobs", kv.get(self.inner.jobs.as_str(), Some(opts)))
            .await
        {
            Ok(_) => return Ok(None),
            Err(e) if e.to_string().contains("compacted") => {}
            Err(e) => return Err(e),
        }
        loop {
            match self.call("watch jobs", stream.message()).await? {
                Some(resp) => {
                    if let Some(err) = watch_error(&resp, from) {
                        return Ok(Some(err));
                    }
                }
                None => return Err(StoreError::Backend("etcd watch: the stream ended".into())),
            }
        }
    }

    fn push_events(
        &self,
        resp: &etcd_client::WatchResponse,
        out: &mut VecDeque<Result<JobChange, StoreError>>,
    ) {
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            if event.event_type() != EventType::Put {
                tracing::debug!(key = %String::from_utf8_lossy(kv.key()), "ignoring a deleted job key");
                continue;
            }
            let Some(job) = self.decode_job_or_skip(kv) else {
                continue;
            };
            let kind = if kv.create_revision() == kv.mod_revision() {
                ChangeKind::Created
            } else {
                ChangeKind::Updated
            };
            out.push_back(Ok(JobChange {
                revision: kv.mod_revision(),
                kind,
                job,
            }));
        }
    }
}

#[cfg(test)]
mod tests;
