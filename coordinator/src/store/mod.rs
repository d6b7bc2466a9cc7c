//! The coordinator's state store: a narrow, domain-level trait ([`StateStore`]) with the
//! operations the scheduler needs, designed for etcd's semantics so that an etcd backend
//! can sit behind it unchanged.
//!
//! # Semantics (what every backend guarantees; checked by [`conformance`])
//!
//! - **Revisions.** Every write (job create, job update, checkpoint record) bumps one
//!   store-wide, monotonically increasing counter — etcd's `mod_revision`. A job record
//!   carries the revision of its last write in [`Job::revision`]; it is the
//!   compare-and-set token of [`StateStore::update_job`]. Concurrent writes of different
//!   jobs may be committed together and share a revision (etcd: one transaction of a
//!   batch); two writes of one job never do.
//! - **Compare-and-set.** `update_job(job, expected)` succeeds only if the stored job's
//!   revision is still `expected` (etcd: a transaction comparing `mod_revision`), and
//!   otherwise fails with [`StoreError::Conflict`]. Concurrent updaters never lose updates.
//! - **Watches.** [`StateStore::watch_jobs`] streams every job change with a revision at or
//!   after `from_revision`, in revision order (etcd: a prefix watch with `start_revision`).
//!   A revision older than what the backend still remembers is [`StoreError::Compacted`].
//! - **Leases.** Workers are registered under a lease with a TTL; [`StateStore::keep_alive`]
//!   renews it; [`StateStore::expire_workers`] removes (and returns) the workers whose
//!   lease ran out (etcd deletes keys attached to an expired lease by itself).
//! - **Leader fencing.** [`StateStore::set_fence`] makes job writes conditional on a
//!   leadership still holding (etcd: the election key's create revision compared in the
//!   write's transaction); a write after it ended is [`StoreError::NotLeader`] and writes
//!   nothing. Single-node backends ignore the fence.
//!
//! # Backends
//!
//! [`open`] picks one from a URL: [`embedded`] (`file:///path/state.redb`, one redb file)
//! or [`etcd`] (`etcd://host1:2379,host2:2379[/prefix]`). Both pass [`conformance`].
//!
//! # Key layout (etcd; the embedded backend mirrors it in redb tables)
//!
//! ```text
//! /trainyard/v1/jobs/<job-id>                          -> trainyard.v1.Job (prost), record_version 1
//! /trainyard/v1/checkpoints/<job-id>/<step:020>        -> trainyard.v1.CheckpointInfo (prost)
//! /trainyard/v1/workers/<worker-id>  (under a lease)   -> trainyard.v1.Worker (prost)
//! ```
//!
//! Job ids are sortable by creation time, so listing the `jobs/` prefix in key order is
//! listing jobs oldest first; page tokens are the last id of the previous page.

pub mod embedded;
pub mod etcd;

#[cfg(test)]
pub mod conformance;

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use trainyard_proto::{CheckpointInfo, Job, JobState, Worker};

pub use embedded::EmbeddedStore;
pub use etcd::EtcdStore;

/// A store-wide revision (etcd's `mod_revision`). Starts at 1 with the first write.
pub type Revision = i64;

/// Format version written into every job record ([`Job::record_version`]).
pub const JOB_RECORD_VERSION: u32 = 1;

/// Errors of a [`StateStore`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StoreError {
    /// `create_job` with an id that already exists.
    #[error("job {0} already exists")]
    AlreadyExists(String),
    /// The job does not exist.
    #[error("job {0} not found")]
    NotFound(String),
    /// Compare-and-set failed: the job was changed since `expected` was read.
    #[error("job {id} was modified concurrently (expected revision {expected}, found {actual})")]
    Conflict {
        /// The job id.
        id: String,
        /// The revision the caller expected.
        expected: Revision,
        /// The revision the store has.
        actual: Revision,
    },
    /// A watch asked for a revision the store no longer remembers.
    #[error("revision {requested} is compacted (oldest available: {oldest})")]
    Compacted {
        /// The revision asked for.
        requested: Revision,
        /// The oldest revision still available.
        oldest: Revision,
    },
    /// A watcher fell too far behind and was cut off; it should re-list and watch again.
    #[error("watch fell behind by {0} changes")]
    WatchLagged(u64),
    /// A stored record could not be decoded.
    #[error("corrupt record {key}: {reason}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// What was wrong.
        reason: String,
    },
    /// The store URL is not usable (the URL is shown with its password redacted).
    #[error("bad store url {url}: {reason}")]
    BadUrl {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The backend failed (I/O, database error).
    #[error("store backend error: {0}")]
    Backend(String),
    /// A fenced write was refused: the leadership named by the store's [`Fence`] is over
    /// (the election key is gone or belongs to a newer term). Nothing was written; the
    /// writer must step down.
    #[error("not the leader any more: election key {key} no longer has create revision {term}")]
    NotLeader {
        /// The election key of the fence.
        key: String,
        /// The term (create revision) the fence expected.
        term: Revision,
    },
}

/// A leadership fence for job writes (see [`StateStore::set_fence`]): writes succeed only
/// while the election key `key` still exists with create revision `create_revision`
/// (the leader's term), checked in the same transaction as the write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The leader's election key (e.g. `/trainyard/v1/leader/694d...`).
    pub key: Vec<u8>,
    /// The election key's create revision: the term being fenced on.
    pub create_revision: Revision,
}

/// Which jobs [`StateStore::list_jobs`] returns, and which page.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobQuery {
    /// Only jobs in one of these states; empty = every state.
    pub states: Vec<JobState>,
    /// Most jobs to return; 0 = no limit.
    pub limit: usize,
    /// Start after this job id (the previous page's last id); `None` = from the start.
    pub after: Option<String>,
}

/// One page of jobs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobPage {
    /// Jobs in id (= creation) order.
    pub jobs: Vec<Job>,
    /// Id to pass as [`JobQuery::after`] for the next page; `None` on the last page.
    pub next_after: Option<String>,
}

/// What happened to a job in a [`JobChange`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// The job was created.
    Created,
    /// The job was updated.
    Updated,
}

/// One change seen by [`StateStore::watch_jobs`].
#[derive(Debug, Clone, PartialEq)]
pub struct JobChange {
    /// Revision of the write.
    pub revision: Revision,
    /// Created or updated.
    pub kind: ChangeKind,
    /// The job after the write (its `revision` equals [`JobChange::revision`]).
    pub job: Job,
}

/// A stream of job changes; ends with an error item if the watcher is cut off.
pub type JobWatch = Pin<Box<dyn Stream<Item = Result<JobChange, StoreError>> + Send>>;

/// The coordinator's durable state, at the level of the domain (not a key-value API).
#[async_trait::async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// Stores a new job; fails with [`StoreError::AlreadyExists`] if its id is taken.
    /// Returns the job as stored (with `revision` and `record_version` filled in).
    async fn create_job(&self, job: Job) -> Result<Job, StoreError>;

    /// The job with this id, if any.
    async fn get_job(&self, id: &str) -> Result<Option<Job>, StoreError>;

    /// Jobs matching `query`, in id order, one page at a time.
    async fn list_jobs(&self, query: &JobQuery) -> Result<JobPage, StoreError>;

    /// Replaces the job (same id) if its stored revision is still `expected`, else
    /// [`StoreError::Conflict`] ([`StoreError::NotFound`] if it does not exist). Returns the
    /// job as stored, with its new revision.
    async fn update_job(&self, job: Job, expected: Revision) -> Result<Job, StoreError>;

    /// The store's current revision (0 before the first write).
    async fn current_revision(&self) -> Result<Revision, StoreError>;

    /// Every job change with a revision `>= from`, in revision order, then live changes.
    async fn watch_jobs(&self, from: Revision) -> Result<JobWatch, StoreError>;

    /// Registers (or re-registers) a worker under a lease of `ttl`.
    async fn register_worker(&self, worker: Worker, ttl: Duration) -> Result<(), StoreError>;

    /// Renews a worker's lease and its `last_heartbeat_unix_ms`. Returns false if the worker
    /// is unknown (never registered, or its lease already expired).
    async fn keep_alive(&self, worker_id: &str) -> Result<bool, StoreError>;

    /// Workers whose lease is alive.
    async fn list_workers(&self) -> Result<Vec<Worker>, StoreError>;

    /// Removes the workers whose lease ran out and returns them.
    async fn expire_workers(&self) -> Result<Vec<Worker>, StoreError>;

    /// Records a committed checkpoint (idempotent per job and step).
    async fn record_checkpoint(&self, checkpoint: CheckpointInfo) -> Result<(), StoreError>;

    /// A job's checkpoints, by step ascending.
    async fn list_checkpoints(&self, job_id: &str) -> Result<Vec<CheckpointInfo>, StoreError>;

    /// Removes a job's checkpoint record (retention, after its objects are deleted).
    /// Idempotent: deleting a record that does not exist succeeds. Fenced like
    /// [`StateStore::record_checkpoint`].
    async fn delete_checkpoint(&self, job_id: &str, step: u64) -> Result<(), StoreError>;

    /// Makes job writes (`create_job`, `update_job`, `record_checkpoint`,
    /// `delete_checkpoint`) conditional on
    /// `fence` (`None` removes it): a write while the fence's leadership is over fails with
    /// [`StoreError::NotLeader`] and writes nothing. A coordinator sets it when it becomes
    /// the leader and clears it when it steps down, so a partitioned old leader cannot
    /// overwrite the new leader's records. Backends without several writers (the embedded
    /// store) ignore it, which is the default.
    fn set_fence(&self, fence: Option<Fence>) {
        let _ = fence;
    }
}

/// A parsed store URL: which backend, and how to reach it.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreUrl {
    /// `file:///abs/path/state.redb`: the embedded redb store in that file.
    Embedded(std::path::PathBuf),
    /// `etcd://host1:2379,host2:2379[/prefix]` or `etcd+https://...?ca=...`: etcd.
    Etcd(etcd::EtcdConfig),
}

impl StoreUrl {
    /// Parses a store URL (see [`open`] for the forms); a bad one is [`StoreError::BadUrl`]
    /// naming the problem.
    pub fn parse(url: &str) -> Result<Self, StoreError> {
        let bad = |reason: &str| StoreError::BadUrl {
            url: redact_url(url),
            reason: reason.to_string(),
        };
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(bad(
                    "the path must be absolute (file:///abs/path/state.redb)",
                ));
            }
            if path.ends_with('/') {
                return Err(bad(
                    "the path names a folder; name the file (file:///abs/path/state.redb)",
                ));
            }
            return Ok(Self::Embedded(std::path::PathBuf::from(path)));
        }
        if url.starts_with("etcd://") || url.starts_with("etcd+https://") {
            return Ok(Self::Etcd(etcd::EtcdConfig::from_url(url)?));
        }
        Err(bad(
            "unknown scheme: expected file:///abs/path/state.redb (embedded) or \
             etcd://host1:2379,host2:2379[/prefix] (etcd)",
        ))
    }
}

/// Opens the store a URL names — the one place that picks a backend:
///
/// - `file:///abs/path/state.redb`: the embedded redb store ([`EmbeddedStore`]);
/// - `etcd://[user[:password]@]host1[:port],host2[:port][/prefix]`: etcd over plain HTTP
///   ([`EtcdStore`]); the port defaults to 2379, the key prefix to `/trainyard`;
/// - `etcd+https://...?ca=/path/ca.pem[&cert=/path/client.pem&key=/path/client.key]`: etcd
///   over TLS.
///
/// An unreachable etcd is retried with backoff until it answers (logged at `warn`).
pub async fn open(url: &str) -> Result<std::sync::Arc<dyn StateStore>, StoreError> {
    match StoreUrl::parse(url)? {
        StoreUrl::Embedded(path) => {
            let store = tokio::task::spawn_blocking(move || EmbeddedStore::open(&path))
                .await
                .map_err(|e| StoreError::Backend(e.to_string()))??;
            Ok(std::sync::Arc::new(store))
        }
        StoreUrl::Etcd(config) => Ok(std::sync::Arc::new(EtcdStore::connect(config).await?)),
    }
}

/// The URL with any password replaced by `***`, for logs and error messages.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => {
            let user = authority[..at].split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***{}", &rest[at..])
        }
        None => url.to_string(),
    }
}
