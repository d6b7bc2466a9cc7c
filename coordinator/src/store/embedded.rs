//! The embedded backend: one redb file (single-file, ACID, crash-safe), the default store of
//! a one-machine cluster.
//!
//! Tables mirror the etcd key layout of [`super`]: `jobs` (`id -> Job`), `checkpoints`
//! (`(job id, step) -> CheckpointInfo`) and `meta` (`"revision" -> u64`, the store-wide
//! revision counter, persisted in the same transaction as every write so it survives a
//! restart and never goes backwards).
//!
//! Worker leases are kept **in memory only**: a restarted coordinator forgets every worker;
//! workers find out on their next heartbeat (`known = false`) and register again, reporting
//! the ranks they still run. Watches are served from a tokio broadcast channel plus a
//! window of the last [`WATCH_WINDOW`] changes, so a watcher can start slightly in the past;
//! older revisions are reported as [`StoreError::Compacted`] (as etcd does after compaction).

use std::collections::{HashMap, VecDeque};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use tokio::sync::broadcast;
use trainyard_proto::{CheckpointInfo, Job, Worker, WorkerState};

use super::{
    ChangeKind, JobChange, JobPage, JobQuery, JobWatch, Revision, StateStore, StoreError,
    JOB_RECORD_VERSION,
};

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const CHECKPOINTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("checkpoints");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISION_KEY: &str = "revision";

/// How many recent changes a new watcher can replay.
pub const WATCH_WINDOW: usize = 4096;
/// Capacity of the live watch channel; a watcher further behind is cut off.
const WATCH_CHANNEL: usize = 4096;

fn backend<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn decode_job(key: &str, bytes: &[u8]) -> Result<Job, StoreError> {
    Job::decode(bytes).map_err(|e| StoreError::Corrupt {
        key: format!("jobs/{key}"),
        reason: e.to_string(),
    })
}

/// Revision counter and recent changes; its lock also serialises writers so that changes
/// are published in revision order.
struct WatchHub {
    revision: Revision,
    /// Oldest revision a watcher may start from (every job change since is in `recent`).
    oldest: Revision,
    recent: VecDeque<JobChange>,
    tx: broadcast::Sender<JobChange>,
}

struct Lease {
    worker: Worker,
    ttl: Duration,
    deadline: Instant,
}

/// Called once the batch a write belonged to is committed (or failed to commit).
type Completion = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// One queued write. Called with the batch's transaction and the revision it gets, it runs
/// and returns what to publish and how to complete it, or `Err(poisoned)` when it failed
/// (it has told its caller already); `poisoned` means it may have left the transaction
/// half-written, so the whole batch must be aborted. Called with `None`, it is told that
/// its batch failed.
type QueuedWrite = Box<
    dyn FnOnce(
            Option<(&WriteTransaction, Revision)>,
        ) -> Result<(Option<JobChange>, Completion), bool>
        + Send,
>;

struct Inner {
    db: Database,
    path: PathBuf,
    /// Held while a batch commits: serialises commits and guards the revision counter.
    hub: Mutex<WatchHub>,
    leases: Mutex<HashMap<String, Lease>>,
    /// Writes waiting for the next commit (group commit: one fsync for all of them).
    queue: Mutex<Vec<QueuedWrite>>,
}

/// The redb-backed [`StateStore`]. Cheap to clone (shared handle).
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave them logically broken (every
    // critical section is a single assignment or a redb transaction that aborts on drop).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path`, creating parent folders.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::Backend(format!("cannot create {}: {e}", parent.display()))
            })?;
        }
        let db = Database::create(path)
            .map_err(|e| StoreError::Backend(format!("cannot open {}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(backend)?;
        let revision = {
            txn.open_table(JOBS).map_err(backend)?;
            txn.open_table(CHECKPOINTS).map_err(backend)?;
            let meta = txn.open_table(META).map_err(backend)?;
            let rev = meta.get(REVISION_KEY).map_err(backend)?.map(|g| g.value());
            rev.unwrap_or(0) as Revision
        };
        txn.commit().map_err(backend)?;
        let (tx, _) = broadcast::channel(WATCH_CHANNEL);
        tracing::debug!(path = %path.display(), revision, "opened embedded store");
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                path: path.to_path_buf(),
                hub: Mutex::new(WatchHub {
                    revision,
                    oldest: revision + 1,
                    recent: VecDeque::new(),
                    tx,
                }),
                leases: Mutex::new(HashMap::new()),
                queue: Mutex::new(Vec::new()),
            }),
        })
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs one write at the next revision. `f` returns its result and the job change to
    /// publish (if any); on error nothing of it is committed and the revision stays.
    ///
    /// Writes are group-committed: concurrent writes queue up while a commit is in flight
    /// and the next commit takes them all in one redb transaction (one fsync), each at its
    /// own revision, in queue order (a later write sees the earlier ones). A write must
    /// decide a domain error (conflict, not found, exists) before it modifies the
    /// transaction, so a failed write leaves the others untouched; a backend error aborts
    /// the batch. This is what lets many clients submit concurrently.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction, Revision) -> Result<(T, Option<JobChange>), StoreError>
            + Send
            + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<T, StoreError>>();
        let queued: QueuedWrite = Box::new(move |batch| {
            let Some((txn, revision)) = batch else {
                let _ = tx.send(Err(StoreError::Backend(
                    "the write's batch could not be committed".into(),
                )));
                return Err(false);
            };
            match f(txn, revision) {
                Ok((out, change)) => {
                    let done: Completion = Box::new(move |committed| {
                        let _ = tx.send(committed.map(|()| out));
                    });
                    Ok((change, done))
                }
                Err(e) => {
                    // Domain errors (conflict, not found, exists) are decided before a write
                    // touches the transaction; a backend error may have left it half-written.
                    let poisoned = matches!(e, StoreError::Backend(_));
                    let _ = tx.send(Err(e));
                    Err(poisoned)
                }
            }
        });
        lock(&self.inner.queue).push(queued);
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || commit_queued(&inner))
            .await
            .map_err(backend)?;
        rx.await
            .map_err(|_| StoreError::Backend("write dropped before it was committed".into()))?
    }

    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&redb::ReadTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let txn = inner.db.begin_read().map_err(backend)?;
            f(&txn)
        })
        .await
        .map_err(backend)?
    }
}

/// Commits every queued write in one transaction (see [`EmbeddedStore::write`]). Returns at
/// once when another call already took the queue.
fn commit_queued(inner: &Inner) {
    let mut hub = lock(&inner.hub);
    let writes = std::mem::take(&mut *lock(&inner.queue));
    if writes.is_empty() {
        return;
    }
    let mut done: Vec<(Option<JobChange>, Completion)> = Vec::with_capacity(writes.len());
    let mut revision = hub.revision;
    let mut writes = writes.into_iter();
    let result = (|| -> Result<(), StoreError> {
        let txn = inner.db.begin_write().map_err(backend)?;
        for write in writes.by_ref() {
            match write(Some((&txn, revision + 1))) {
                Ok(ok) => {
                    revision += 1;
                    done.push(ok);
                }
                Err(false) => {}
                Err(true) => {
                    return Err(StoreError::Backend(
                        "a write failed inside the transaction; batch aborted".into(),
                    ))
                }
            }
        }
        if done.is_empty() {
            return txn.abort().map_err(backend);
        }
        {
            let mut meta = txn.open_table(META).map_err(backend)?;
            meta.insert(REVISION_KEY, revision as u64)
                .map_err(backend)?;
        }
        txn.commit().map_err(backend)
    })();
    match result {
        Ok(()) => {
            hub.revision = revision;
            for (change, completion) in done {
                if let Some(change) = change {
                    if hub.recent.len() >= WATCH_WINDOW {
                        if let Some(old) = hub.recent.pop_front() {
                            hub.oldest = old.revision + 1;
                        }
                    }
                    hub.recent.push_back(change.clone());
                    // No receivers is fine.
                    let _ = hub.tx.send(change);
                }
                completion(Ok(()));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "embedded store commit failed");
            for (_, completion) in done {
                completion(Err(e.clone()));
            }
            for write in writes {
                let _ = write(None);
            }
        }
    }
}

fn put_job(txn: &WriteTransaction, job: &Job) -> Result<(), StoreError> {
    let mut table = txn.open_table(JOBS).map_err(backend)?;
    table
        .insert(job.id.as_str(), job.encode_to_vec().as_slice())
        .map_err(backend)?;
    Ok(())
}

fn stored_revision(txn: &WriteTransaction, id: &str) -> Result<Option<Revision>, StoreError> {
    let table = txn.open_table(JOBS).map_err(backend)?;
    let guard = table.get(id).map_err(backend)?;
    match guard {
        None => Ok(None),
        Some(g) => Ok(Some(decode_job(id, g.value())?.revision)),
    }
}

#[async_trait::async_trait]
impl StateStore for EmbeddedStore {
    async fn create_job(&self, mut job: Job) -> Result<Job, StoreError> {
        self.write(move |txn, rev| {
            if stored_revision(txn, &job.id)?.is_some() {
                return Err(StoreError::AlreadyExists(job.id.clone()));
            }
            job.revision = rev;
            job.record_version = JOB_RECORD_VERSION;
            put_job(txn, &job)?;
            let change = JobChange {
                revision: rev,
                kind: ChangeKind::Created,
                job: job.clone(),
            };
            Ok((job, Some(change)))
        })
        .await
    }

    async fn get_job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let id = id.to_string();
        self.read(move |txn| {
            let table = txn.open_table(JOBS).map_err(backend)?;
            let guard = table.get(id.as_str()).map_err(backend)?;
            guard.map(|g| decode_job(&id, g.value())).transpose()
        })
        .await
    }

    async fn list_jobs(&self, query: &JobQuery) -> Result<JobPage, StoreError> {
        let query = query.clone();
        self.read(move |txn| {
            let table = txn.open_table(JOBS).map_err(backend)?;
            let start = match &query.after {
                Some(after) => Bound::Excluded(after.as_str()),
                None => Bound::Unbounded,
            };
            let range = table
                .range::<&str>((start, Bound::Unbounded))
                .map_err(backend)?;
            let mut page = JobPage::default();
            for entry in range {
                let (k, v) = entry.map_err(backend)?;
                let job = decode_job(k.value(), v.value())?;
                if !query.states.is_empty() && !query.states.contains(&job.state()) {
                    continue;
                }
                if query.limit > 0 && page.jobs.len() == query.limit {
                    page.next_after = page.jobs.last().map(|j| j.id.clone());
                    break;
                }
                page.jobs.push(job);
            }
            Ok(page)
        })
        .await
    }

    async fn update_job(&self, mut job: Job, expected: Revision) -> Result<Job, StoreError> {
        self.write(move |txn, rev| {
            match stored_revision(txn, &job.id)? {
                None => return Err(StoreError::NotFound(job.id.clone())),
                Some(actual) if actual != expected => {
                    return Err(StoreError::Conflict {
                        id: job.id.clone(),
                        expected,
                        actual,
                    })
                }
                Some(_) => {}
            }
            job.revision = rev;
            job.record_version = JOB_RECORD_VERSION;
            put_job(txn, &job)?;
            let change = JobChange {
                revision: rev,
                kind: ChangeKind::Updated,
                job: job.clone(),
            };
            Ok((job, Some(change)))
        })
        .await
    }

    async fn current_revision(&self) -> Result<Revision, StoreError> {
        Ok(lock(&self.inner.hub).revision)
    }

    async fn watch_jobs(&self, from: Revision) -> Result<JobWatch, StoreError> {
        let (backlog, rx) = {
            let hub = lock(&self.inner.hub);
            if from < hub.oldest {
                return Err(StoreError::Compacted {
                    requested: from,
                    oldest: hub.oldest,
                });
            }
            let backlog: Vec<JobChange> = hub
                .recent
                .iter()
                .filter(|c| c.revision >= from)
                .cloned()
                .collect();
            (backlog, hub.tx.subscribe())
        };
        let live = futures::stream::unfold(Some(rx), move |rx| async move {
            let mut rx = rx?;
            loop {
                match rx.recv().await {
                    Ok(change) if change.revision < from => continue,
                    Ok(change) => return Some((Ok(change), Some(rx))),
                    Err(broadcast::error::RecvError::Closed) => return None,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        return Some((Err(StoreError::WatchLagged(n)), None))
                    }
                }
            }
        });
        let stream =
            futures::StreamExt::chain(futures::stream::iter(backlog.into_iter().map(Ok)), live);
        Ok(Box::pin(stream))
    }

    async fn register_worker(&self, mut worker: Worker, ttl: Duration) -> Result<(), StoreError> {
        let now = now_unix_ms();
        if worker.registered_unix_ms == 0 {
            worker.registered_unix_ms = now;
        }
        worker.last_heartbeat_unix_ms = now;
        worker.state = WorkerState::Alive as i32;
        lock(&self.inner.leases).insert(
            worker.id.clone(),
            Lease {
                worker,
                ttl,
                deadline: Instant::now() + ttl,
            },
        );
        Ok(())
    }

    async fn keep_alive(&self, worker_id: &str) -> Result<bool, StoreError> {
        let mut leases = lock(&self.inner.leases);
        let now = Instant::now();
        match leases.get_mut(worker_id) {
            Some(lease) if lease.deadline > now => {
                lease.deadline = now + lease.ttl;
                lease.worker.last_heartbeat_unix_ms = now_unix_ms();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn list_workers(&self) -> Result<Vec<Worker>, StoreError> {
        let leases = lock(&self.inner.leases);
        let now = Instant::now();
        let mut workers: Vec<Worker> = leases
            .values()
            .filter(|l| l.deadline > now)
            .map(|l| l.worker.clone())
            .collect();
        workers.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(workers)
    }

    async fn expire_workers(&self) -> Result<Vec<Worker>, StoreError> {
        let mut leases = lock(&self.inner.leases);
        let now = Instant::now();
        let dead: Vec<String> = leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| id.clone())
            .collect();
        let mut out = Vec::with_capacity(dead.len());
        for id in dead {
            if let Some(lease) = leases.remove(&id) {
                let mut w = lease.worker;
                w.state = WorkerState::Dead as i32;
                out.push(w);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn record_checkpoint(&self, checkpoint: CheckpointInfo) -> Result<(), StoreError> {
        self.write(move |txn, _rev| {
            let mut table = txn.open_table(CHECKPOINTS).map_err(backend)?;
            table
                .insert(
                    (checkpoint.job_id.as_str(), checkpoint.step),
                    checkpoint.encode_to_vec().as_slice(),
                )
                .map_err(backend)?;
            Ok(((), None))
        })
        .await
    }

    async fn delete_checkpoint(&self, job_id: &str, step: u64) -> Result<(), StoreError> {
        let job_id = job_id.to_string();
        self.write(move |txn, _rev| {
            let mut table = txn.open_table(CHECKPOINTS).map_err(backend)?;
            table.remove((job_id.as_str(), step)).map_err(backend)?;
            Ok(((), None))
        })
        .await
    }

    async fn list_checkpoints(&self, job_id: &str) -> Result<Vec<CheckpointInfo>, StoreError> {
        let job_id = job_id.to_string();
        self.read(move |txn| {
            let table = txn.open_table(CHECKPOINTS).map_err(backend)?;
            let range = table
                .range((job_id.as_str(), 0u64)..=(job_id.as_str(), u64::MAX))
                .map_err(backend)?;
            let mut out = Vec::new();
            for entry in range {
                let (k, v) = entry.map_err(backend)?;
                let (id, step) = k.value();
                let cp = CheckpointInfo::decode(v.value()).map_err(|e| StoreError::Corrupt {
                    key: format!("checkpoints/{id}/{step:020}"),
                    reason: e.to_string(),
                })?;
                out.push(cp);
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reopen_store(path: &Path) -> EmbeddedStore {
        EmbeddedStore::open(path).expect("reopen")
    }

    crate::store_conformance_tests!(
        {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("state.redb");
            let store = EmbeddedStore::open(&path).expect("open");
            (store, (dir, path))
        },
        |ctx: &(tempfile::TempDir, PathBuf)| Some(reopen_store(&ctx.1))
    );

    #[tokio::test]
    async fn revision_counter_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let rev = {
            let store = EmbeddedStore::open(&path).unwrap();
            let job = Job {
                id: "job-a".into(),
                ..Default::default()
            };
            store.create_job(job).await.unwrap();
            store.current_revision().await.unwrap()
        };
        assert_eq!(rev, 1);
        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(store.current_revision().await.unwrap(), 1);
        let job = Job {
            id: "job-b".into(),
            ..Default::default()
        };
        let stored = store.create_job(job).await.unwrap();
        assert_eq!(stored.revision, 2);
    }

    #[test]
    fn store_url_rejects_bad_file_urls() {
        use super::super::StoreUrl;
        assert!(matches!(
            StoreUrl::parse("s3://bucket/x"),
            Err(StoreError::BadUrl { .. })
        ));
        assert!(matches!(
            StoreUrl::parse("file://relative/x.redb"),
            Err(StoreError::BadUrl { .. })
        ));
        assert_eq!(
            StoreUrl::parse("file:///var/lib/ty/state.redb"),
            Ok(StoreUrl::Embedded(PathBuf::from("/var/lib/ty/state.redb")))
        );
    }

    #[tokio::test]
    async fn open_by_url_gives_the_embedded_store() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().join("s.redb").display());
        let store = super::super::open(&url).await.unwrap();
        let job = Job {
            id: "job-u".into(),
            ..Default::default()
        };
        assert_eq!(store.create_job(job).await.unwrap().revision, 1);
    }
}
