//! The coordinator's operations, behind the gRPC services: submit, cancel, watch, worker
//! registration, heartbeats, rank reports. The scheduling pass is in [`crate::scheduler`].
//!
//! One lock ([`Coordinator::state`]) guards the in-memory state; an operation that changes a
//! job holds it across its store write, so the store and memory never disagree about the
//! order of changes. Job records are written with compare-and-set at the revision last read.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tokio::sync::{broadcast, watch, Mutex, Notify};
use tonic::Status;
use trainyard_proto::{
    job_event, rank_event, CheckpointInfo, DeviceUse, Job, JobEvent, JobState, JobType,
    ListJobsRequest, ListJobsResponse, RankReport, RankState, RegisterWorkerRequest,
    RegisterWorkerResponse, Transition, Worker, WorkerState,
};

use crate::durable::{self, Record, Sink, StoredHistory};
use crate::leader::Leadership;
use crate::rendezvous;
use crate::retention::RetentionQueue;
use crate::state::{
    self, cancel_ranks, now_unix_ms, CommandReceiver, JobEntry, SlotUse, State, WorkerEntry,
};
use crate::store::{JobQuery, StateStore, StoreError};
use crate::validate::{validate_spec, CheckpointRef};

/// Default and largest page size of `ListJobs`.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;
/// Metric updates are written to the store at most this often per job.
pub const METRIC_FLUSH: Duration = Duration::from_secs(1);

/// An operation's failure, mapped onto a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// Bad input; the message names the field.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request cannot be served in the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// No such job or worker.
    #[error("{0}")]
    NotFound(String),
    /// A limit or quota is reached; the message names it.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The coordinator is shutting down.
    #[error("{0}")]
    Unavailable(String),
    /// An invariant broke.
    #[error("internal error: {0}")]
    Internal(String),
    /// This coordinator is a follower; writes go to the leader (at this address, if known).
    #[error("not the leader; leader is {}", .0.as_deref().unwrap_or("unknown"))]
    NotLeader(Option<String>),
}

/// The gRPC metadata key naming the leader's address in a follower's `Unavailable`.
pub const LEADER_METADATA: &str = "x-trainyard-leader";

impl From<OpError> for Status {
    fn from(e: OpError) -> Self {
        match e {
            OpError::InvalidArgument(m) => Status::invalid_argument(m),
            OpError::FailedPrecondition(m) => Status::failed_precondition(m),
            OpError::NotFound(m) => Status::not_found(m),
            OpError::ResourceExhausted(m) => Status::resource_exhausted(m),
            OpError::Store(e) => Status::unavailable(e.to_string()),
            OpError::Unavailable(m) => Status::unavailable(m),
            OpError::Internal(m) => Status::internal(m),
            e @ OpError::NotLeader(_) => {
                let mut status = Status::unavailable(e.to_string());
                if let OpError::NotLeader(Some(addr)) = &e {
                    if let Ok(v) = addr.parse() {
                        status.metadata_mut().insert(LEADER_METADATA, v);
                    }
                }
                status
            }
        }
    }
}

impl From<crate::lifecycle::LifecycleError> for OpError {
    fn from(e: crate::lifecycle::LifecycleError) -> Self {
        OpError::FailedPrecondition(e.to_string())
    }
}

/// Settings the operations need.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How often workers heartbeat.
    pub heartbeat_interval: Duration,
    /// Lease TTL: a worker silent this long is dead.
    pub heartbeat_timeout: Duration,
    /// Object-store URL handed to workers.
    pub objects_url: String,
    /// A checkpoint folder without a manifest, outside the index and not of the job's
    /// current attempt, is deleted once its newest object is this old (default 1 h).
    pub orphan_checkpoint_age: Duration,
    /// A finished job's in-memory entry (and event history) is dropped this long after it
    /// ended, once its history is in the object store (default 60 s); watches then read
    /// the history back from there.
    pub finished_history_kept: Duration,
    /// Request, report and pending-job limits.
    pub limits: crate::limits::Limits,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(5),
            objects_url: String::new(),
            orphan_checkpoint_age: crate::retention::ORPHAN_CHECKPOINT_AGE,
            finished_history_kept: FINISHED_HISTORY_KEPT,
            limits: crate::limits::Limits::default(),
        }
    }
}

/// Default of [`Settings::finished_history_kept`].
pub const FINISHED_HISTORY_KEPT: Duration = Duration::from_secs(60);

/// A stream of job events for `WatchJob`.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<JobEvent, Status>> + Send>>;

/// The coordinator: store, settings, in-memory state and the scheduler's wake-up.
pub struct Coordinator {
    /// Durable state.
    pub store: Arc<dyn StateStore>,
    /// Settings.
    pub settings: Settings,
    /// In-memory state (one lock).
    pub state: Mutex<State>,
    /// Wakes the scheduler loop.
    pub wake: Notify,
    /// Who leads (see [`crate::leader`]); only the leader schedules and writes.
    pub leadership: watch::Receiver<Leadership>,
    /// Prometheus metrics (see [`crate::metrics`]).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The object store (checkpoints, durable history), when one is configured.
    pub objects: Option<trainyard_objects::Objects>,
    /// Where the leader sends job logs, metrics and results for the object store.
    durable: Option<Sink>,
    /// Where the leader queues jobs for checkpoint retention.
    retention: Option<RetentionQueue>,
    last_id_ms: AtomicI64,
    closing: AtomicBool,
    /// Set once the leader has reconciled from the store; until then it refuses writes.
    ready: AtomicBool,
    /// The term whose store fence refused a write (0: none): this coordinator does not
    /// lead in it again, even while its elector has not noticed yet.
    fenced_out: AtomicU64,
}

/// Writes a tracked job with compare-and-set at the revision it was read at.
pub async fn save(store: &dyn StateStore, entry: &mut JobEntry) -> Result<(), StoreError> {
    let expected = entry.job.revision;
    match store.update_job(entry.job.clone(), expected).await {
        Ok(stored) => {
            entry.job = stored;
            entry.dirty = false;
            entry.last_flush = Instant::now();
            Ok(())
        }
        Err(e @ StoreError::Conflict { .. }) => {
            // Someone else wrote the job: take theirs, report ours as lost.
            tracing::error!(job_id = %entry.job.id, error = %e, "job changed behind the coordinator's back; reloading");
            if let Ok(Some(job)) = store.get_job(&entry.job.id).await {
                entry.job = job;
            }
            Err(e)
        }
        Err(e) => Err(e),
    }
}

fn base36(mut v: u64, width: usize) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = vec![b'0'; width];
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(v % 36) as usize];
        v /= 36;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn rank_state_name(s: RankState) -> &'static str {
    match s {
        RankState::Unspecified => "unspecified",
        RankState::Starting => "starting",
        RankState::Running => "running",
        RankState::Succeeded => "succeeded",
        RankState::Failed => "failed",
        RankState::Cancelled => "cancelled",
    }
}

impl Coordinator {
    /// A coordinator over `store`.
    pub fn new(store: Arc<dyn StateStore>, settings: Settings) -> Self {
        Self {
            store,
            settings,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            leadership: crate::leader::single_node(""),
            metrics: Arc::new(crate::metrics::Metrics::new()),
            objects: None,
            durable: None,
            retention: None,
            last_id_ms: AtomicI64::new(0),
            closing: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            fenced_out: AtomicU64::new(0),
        }
    }

    /// The same coordinator, following `leadership` instead of always leading.
    pub fn with_leadership(mut self, leadership: watch::Receiver<Leadership>) -> Self {
        self.leadership = leadership;
        self
    }

    /// The same coordinator with an object store: `durable` receives job logs, metrics and
    /// results ([`crate::durable`]), `retention` the jobs whose checkpoints to prune
    /// ([`crate::retention::run`] serves it).
    pub fn with_objects(
        mut self,
        objects: trainyard_objects::Objects,
        durable: Sink,
        retention: RetentionQueue,
    ) -> Self {
        self.objects = Some(objects);
        self.durable = Some(durable);
        self.retention = Some(retention);
        self
    }

    /// The durable history writer, if there is an object store.
    pub fn durable(&self) -> Option<&Sink> {
        self.durable.as_ref()
    }

    /// Queues a checkpoint retention run for `job_id` (if there is an object store).
    pub fn request_retention(&self, job_id: &str) {
        if let Some(q) = &self.retention {
            q.request(job_id);
        }
    }

    /// The current term if this coordinator leads, else [`OpError::NotLeader`].
    pub fn require_leader(&self) -> Result<u64, OpError> {
        let l = self.leadership.borrow();
        if l.is_leader && self.ready.load(Ordering::SeqCst) {
            Ok(l.term)
        } else {
            Err(OpError::NotLeader(l.leader_addr.clone()))
        }
    }

    /// Whether this coordinator leads now.
    pub fn is_leader(&self) -> bool {
        self.leadership.borrow().is_leader && self.ready.load(Ordering::SeqCst)
    }

    /// Whether this coordinator reconciled as the leader and was not fenced out since.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// The term a store fence refused (see [`Coordinator::note_store_error`]); 0 if none.
    pub fn fenced_out_term(&self) -> u64 {
        self.fenced_out.load(Ordering::SeqCst)
    }

    /// Reacts to a store error: [`StoreError::NotLeader`] means another coordinator leads
    /// now, so this one stops writing at once and wakes the scheduler loop to step down.
    pub fn note_store_error(&self, e: &StoreError) {
        if let StoreError::NotLeader { term, .. } = e {
            tracing::warn!(term, "a fenced store write was refused: stepping down");
            self.fenced_out
                .store((*term).max(0) as u64, Ordering::SeqCst);
            self.ready.store(false, Ordering::SeqCst);
            self.wake.notify_one();
        }
    }

    /// [`Coordinator::note_store_error`] on an operation's result.
    fn fenced<T>(&self, r: Result<T, OpError>) -> Result<T, OpError> {
        match r {
            Err(OpError::Store(e @ StoreError::NotLeader { .. })) => {
                self.note_store_error(&e);
                let leader = self.leadership.borrow().leader_addr.clone();
                Err(OpError::NotLeader(leader))
            }
            other => other,
        }
    }

    /// Forgets the in-memory state after losing leadership: worker command streams end
    /// (their senders drop), so the workers go and find the new leader. The store keeps
    /// the fence of the term that ended, so any write still in flight from this
    /// coordinator fails instead of landing unfenced.
    pub async fn step_down(&self) {
        self.ready.store(false, Ordering::SeqCst);
        // A deposed leader writes no history either: the new leader continues it.
        if let Some(sink) = &self.durable {
            sink.discard_all();
        }
        let mut st = self.state.lock().await;
        *st = State::default();
        tracing::info!("stepped down: scheduling stopped, worker streams closed");
    }

    /// Takes over after winning an election: forgets whatever was in memory and reconciles
    /// from the store (the restart-recovery path).
    ///
    /// Before anything is written, the store is fenced on this leadership's election key
    /// and term ([`crate::store::StateStore::set_fence`]).
    pub async fn take_over(&self) -> Result<(), StoreError> {
        self.ready.store(false, Ordering::SeqCst);
        let fence = self.leadership.borrow().fence();
        if let Some(fence) = fence {
            self.store.set_fence(Some(fence));
        }
        {
            let mut st = self.state.lock().await;
            *st = State::default();
        }
        self.recover().await
    }

    /// A new job id and its creation time: `job-` + 8 base-36 digits of the creation
    /// millisecond (strictly increasing within a process, so ids sort in submit order)
    /// + 4 random hex digits (unique across restarts and coordinators).
    fn new_job_id(&self) -> (String, i64) {
        let now = now_unix_ms();
        let mut prev = self.last_id_ms.load(Ordering::SeqCst);
        let ms = loop {
            let ms = now.max(prev + 1);
            match self
                .last_id_ms
                .compare_exchange(prev, ms, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => break ms,
                Err(actual) => prev = actual,
            }
        };
        let rand = (uuid::Uuid::new_v4().as_u128() & 0xffff) as u16;
        (format!("job-{}{rand:04x}", base36(ms.max(0) as u64, 8)), ms)
    }

    /// Loads unfinished jobs after a (re)start. Jobs stored as SCHEDULED/RUNNING are
    /// orphans: their workers have a grace period to re-register with the ranks of the
    /// current attempt; otherwise the scheduler requeues them.
    pub async fn recover(&self) -> Result<(), StoreError> {
        let mut st = self.state.lock().await;
        let mut after = None;
        let mut orphans = 0;
        loop {
            let page = self
                .store
                .list_jobs(&JobQuery {
                    states: vec![JobState::Pending, JobState::Scheduled, JobState::Running],
                    limit: 500,
                    after,
                })
                .await?;
            for job in page.jobs {
                // Finish retention work a previous leader may have left undone.
                if job.latest_checkpoint.is_some() {
                    if let Some(q) = &self.retention {
                        q.request(&job.id);
                    }
                }
                let mut entry = JobEntry::new(job);
                if matches!(entry.job.state(), JobState::Scheduled | JobState::Running) {
                    entry.orphaned = true;
                    orphans += 1;
                }
                st.jobs.insert(entry.job.id.clone(), entry);
            }
            match page.next_after {
                Some(a) => after = Some(a),
                None => break,
            }
        }
        if orphans > 0 {
            st.orphan_deadline = Some(
                Instant::now() + self.settings.heartbeat_timeout + self.settings.heartbeat_interval,
            );
        }
        tracing::info!(
            jobs = st.jobs.len(),
            orphans,
            "recovered jobs from the store"
        );
        self.ready.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Validates and stores a new PENDING job of `owner` (a user name; empty without
    /// authentication), within the owner's cap on pending jobs.
    pub async fn submit(
        &self,
        spec: Option<trainyard_proto::JobSpec>,
        owner: &str,
    ) -> Result<Job, OpError> {
        let r = self.submit_unfenced(spec, owner).await;
        self.fenced(r)
    }

    async fn submit_unfenced(
        &self,
        spec: Option<trainyard_proto::JobSpec>,
        owner: &str,
    ) -> Result<Job, OpError> {
        self.require_leader()?;
        let valid =
            validate_spec(trainyard_jobs::registry(), spec).map_err(OpError::InvalidArgument)?;
        if !valid.spec.from_checkpoint.is_empty() {
            let from = CheckpointRef::parse(&valid.spec.from_checkpoint)
                .map_err(OpError::InvalidArgument)?;
            self.check_from_checkpoint(&valid.spec, &from).await?;
        }
        // The first waiting reason is what placing this job alone on the cluster as it is
        // says: usually exactly what the scheduler's next pass says, so that pass has no
        // reason to write back (see `scheduler::pass`).
        let first_reason = {
            let mut st = self.state.lock().await;
            let cluster = st.cluster_view();
            if !st.workers.is_empty() {
                crate::scheduler::placement::fits_ever(&valid.spec, &cluster)
                    .map_err(OpError::FailedPrecondition)?;
            }
            // The cap counts stored PENDING jobs and submissions of the owner still on
            // their way to the store, so concurrent submissions cannot overshoot it.
            let cap = self.settings.limits.max_pending_jobs_per_user;
            if cap > 0 {
                let pending = st.pending_of(owner);
                if pending >= cap {
                    return Err(OpError::ResourceExhausted(
                        self.settings.limits.pending_cap_error(owner, pending),
                    ));
                }
            }
            *st.submitting.entry(owner.to_string()).or_default() += 1;
            crate::scheduler::first_waiting_reason(&valid.spec, &cluster)
        };
        let stored = self
            .store_new_job(&valid, first_reason, owner)
            .await
            .map_err(OpError::from);
        let mut st = self.state.lock().await;
        if let Some(n) = st.submitting.get_mut(owner) {
            *n -= 1;
            if *n == 0 {
                st.submitting.remove(owner);
            }
        }
        let stored = stored?;
        tracing::info!(job_id = %stored.id, kind = %valid.spec.job, ranks = valid.spec.ranks, owner, "job submitted");
        st.jobs
            .insert(stored.id.clone(), JobEntry::submitted(stored.clone()));
        drop(st);
        self.wake.notify_one();
        Ok(stored)
    }

    /// Writes a new PENDING job to the store under a fresh id.
    async fn store_new_job(
        &self,
        valid: &crate::validate::ValidSpec,
        first_reason: String,
        owner: &str,
    ) -> Result<Job, StoreError> {
        // The store write runs without the state lock, so concurrent submissions reach the
        // store together (and are group-committed or pipelined to etcd).
        let mut tries = 0;
        loop {
            let (id, now) = self.new_job_id();
            let job = Job {
                id,
                spec: Some(valid.spec.clone()),
                state: JobState::Pending as i32,
                state_reason: first_reason.clone(),
                transitions: vec![Transition {
                    from: JobState::Unspecified as i32,
                    to: JobState::Pending as i32,
                    at_unix_ms: now,
                    reason: "submitted".into(),
                }],
                created_unix_ms: now,
                resolved_config_json: valid.resolved_config_json.clone(),
                owner: owner.to_string(),
                ..Default::default()
            };
            match self.store.create_job(job).await {
                Ok(j) => return Ok(j),
                Err(StoreError::AlreadyExists(_)) if tries < 5 => tries += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// `spec.from_checkpoint` must name a committed checkpoint (in the index, its manifest
    /// in the object store) of an existing job of the same type.
    async fn check_from_checkpoint(
        &self,
        spec: &trainyard_proto::JobSpec,
        from: &CheckpointRef,
    ) -> Result<(), OpError> {
        let bad = |why: String| OpError::InvalidArgument(format!("spec.from_checkpoint: {why}"));
        let source = self
            .store
            .get_job(&from.job_id)
            .await?
            .ok_or_else(|| bad(format!("job {} not found", from.job_id)))?;
        let kind = source.spec.map(|s| s.job).unwrap_or_default();
        if kind != spec.job {
            return Err(bad(format!(
                "job {} is a \"{kind}\" job and this one is \"{}\": a checkpoint restores only \
                 into a job of the same type",
                from.job_id, spec.job
            )));
        }
        let committed = self.store.list_checkpoints(&from.job_id).await?;
        let Some(record) = committed.iter().find(|c| c.step == from.step) else {
            let steps: Vec<String> = committed.iter().map(|c| c.step.to_string()).collect();
            return Err(bad(if steps.is_empty() {
                format!("job {} has no committed checkpoint", from.job_id)
            } else {
                format!(
                    "job {} has no committed checkpoint at step {} (committed steps: {})",
                    from.job_id,
                    from.step,
                    steps.join(", ")
                )
            }));
        };
        if let Some(objects) = &self.objects {
            let dir = if record.path.is_empty() {
                from.path()
            } else {
                record.path.clone()
            };
            let manifest = format!("{dir}/{}", crate::retention::MANIFEST_FILE);
            match objects.head(&manifest).await {
                Ok(Some(_)) => {}
                Ok(None) => {
                    return Err(bad(format!(
                        "checkpoint {from} is listed but its manifest {manifest} is gone from \
                         the object store (deleted by retention?)"
                    )))
                }
                Err(e) => {
                    return Err(OpError::Unavailable(format!(
                        "spec.from_checkpoint: cannot check checkpoint {from}: {e}"
                    )))
                }
            }
        }
        Ok(())
    }

    /// Makes sure a job is tracked in memory (loading it from the store).
    async fn ensure_tracked(&self, st: &mut State, id: &str) -> Result<(), OpError> {
        if !st.jobs.contains_key(id) {
            let job = self
                .store
                .get_job(id)
                .await?
                .ok_or_else(|| OpError::NotFound(format!("job {id} not found")))?;
            st.jobs.insert(id.to_string(), JobEntry::new(job));
        }
        Ok(())
    }

    /// The job, with its latest (possibly not yet flushed) metrics. A succeeded job whose
    /// record lacks its results table gets it from `results.json` in the object store.
    pub async fn get_job(&self, id: &str) -> Result<Job, OpError> {
        {
            let st = self.state.lock().await;
            if let Some(e) = st.jobs.get(id) {
                return Ok(e.job.clone());
            }
        }
        let mut job = self
            .store
            .get_job(id)
            .await?
            .ok_or_else(|| OpError::NotFound(format!("job {id} not found")))?;
        if job.result.is_none() && job.state() == JobState::Succeeded {
            if let Some(objects) = &self.objects {
                match durable::read_results(objects, id).await {
                    Ok(r) => job.result = r,
                    Err(e) => {
                        tracing::warn!(job_id = %id, error = %e, "reading results.json failed")
                    }
                }
            }
        }
        Ok(job)
    }

    /// Jobs by state, paged (the page token is the last id of the previous page).
    pub async fn list_jobs(&self, req: ListJobsRequest) -> Result<ListJobsResponse, OpError> {
        let states: Vec<JobState> = req
            .states
            .iter()
            .map(|s| JobState::try_from(*s).unwrap_or(JobState::Unspecified))
            .collect();
        if states.contains(&JobState::Unspecified) {
            return Err(OpError::InvalidArgument(
                "states: unknown or unspecified job state".into(),
            ));
        }
        let limit = match req.page_size as usize {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let mut after = (!req.page_token.is_empty()).then(|| req.page_token.clone());
        // With an owner filter, read store pages until this page is full (or the store
        // has no more): other owners' jobs are skipped, not returned short.
        let mut found = Vec::new();
        let next = loop {
            let page = self
                .store
                .list_jobs(&JobQuery {
                    states: states.clone(),
                    limit,
                    after: after.clone(),
                })
                .await?;
            let total = page.jobs.len();
            let mut last = None;
            for (i, job) in page.jobs.into_iter().enumerate() {
                if req.owner.is_empty() || job.owner == req.owner {
                    found.push(job);
                }
                if found.len() == limit {
                    let more = i + 1 < total || page.next_after.is_some();
                    last = Some(more.then(|| found[limit - 1].id.clone()));
                    break;
                }
            }
            if let Some(next) = last {
                break next;
            }
            match page.next_after {
                Some(n) => after = Some(n),
                None => break None,
            }
        };
        let st = self.state.lock().await;
        let jobs = found
            .into_iter()
            .map(|j| match st.jobs.get(&j.id) {
                Some(e) if e.job.revision >= j.revision => e.job.clone(),
                _ => j,
            })
            .collect();
        Ok(ListJobsResponse {
            jobs,
            next_page_token: next.unwrap_or_default(),
        })
    }

    /// Cancels a job: at once if PENDING; SCHEDULED/RUNNING ranks get CancelRank (their
    /// devices stay reserved until the worker reports them gone or dies).
    pub async fn cancel(&self, id: &str, reason: &str) -> Result<Job, OpError> {
        let r = self.cancel_unfenced(id, reason).await;
        self.fenced(r)
    }

    async fn cancel_unfenced(&self, id: &str, reason: &str) -> Result<Job, OpError> {
        self.require_leader()?;
        let mut guard = self.state.lock().await;
        self.ensure_tracked(&mut guard, id).await?;
        let st = &mut *guard;
        let entry = st
            .jobs
            .get_mut(id)
            .ok_or_else(|| OpError::Internal(format!("job {id} vanished")))?;
        let state = entry.job.state();
        if state.is_terminal() {
            return Err(OpError::FailedPrecondition(format!(
                "job {id} is already {}",
                state.short_name()
            )));
        }
        let reason = match reason.trim() {
            "" => "cancelled by user".to_string(),
            r if r.to_ascii_lowercase().starts_with("cancel") => r.to_string(),
            r => format!("cancelled: {r}"),
        };
        let before = entry.job.clone();
        entry.transition(JobState::Cancelled, &reason)?;
        save(self.store.as_ref(), entry).await?;
        let job = entry.job.clone();
        cancel_ranks(&st.workers, &before, &reason, None);
        tracing::info!(job_id = %id, from = state.short_name(), "job cancelled");
        Ok(job)
    }

    /// The job's history, then (if `follow`) live events until it ends.
    ///
    /// The leader serves a job's history from memory; when memory does not hold all of it
    /// (after a restart or a failover, after the entry of a finished job was dropped, or
    /// when the history was bounded) it merges the logs and metrics of the object store
    /// ([`crate::durable`]) in. A follower serves the history of the store and the object
    /// store, and sends `follow` of a live job to the leader (live events are there).
    pub async fn watch(&self, id: &str, follow: bool) -> Result<EventStream, OpError> {
        self.check_open()?;
        if !self.is_leader() {
            return self.watch_stored(id, follow).await;
        }
        let mut st = self.state.lock().await;
        self.ensure_tracked(&mut st, id).await?;
        let entry = st
            .jobs
            .get_mut(id)
            .ok_or_else(|| OpError::Internal(format!("job {id} vanished")))?;
        let (history, last_n, rx) = entry.history.snapshot();
        let follow = follow && !entry.job.state().is_terminal();
        let partial = (!entry.history.is_complete())
            .then(|| (entry.history.id().to_string(), entry.history.first_kept_n()));
        drop(st);
        let history = match (partial, &self.objects) {
            (Some((history_id, first_kept)), Some(objects)) => {
                match durable::read_history(objects, id).await {
                    Ok(stored) => merge_history(history, stored, Some((&history_id, first_kept))),
                    Err(e) => {
                        tracing::warn!(job_id = %id, error = %e, "reading the job's history from the object store failed; serving memory only");
                        history
                    }
                }
            }
            _ => history,
        };
        let history = futures::stream::iter(history.into_iter().map(Ok));
        let stream: EventStream = if follow {
            Box::pin(history.chain(live_events(rx, last_n)))
        } else {
            Box::pin(history)
        };
        Ok(numbered(stream))
    }

    /// A job's history from the state store (transitions, checkpoints, results) and the
    /// object store (logs, metrics), without the leader's memory.
    async fn watch_stored(&self, id: &str, follow: bool) -> Result<EventStream, OpError> {
        let job = self
            .store
            .get_job(id)
            .await?
            .ok_or_else(|| OpError::NotFound(format!("job {id} not found")))?;
        if follow && !job.state().is_terminal() {
            // Live events reach only the leader.
            let leader = self.leadership.borrow().leader_addr.clone();
            return Err(OpError::NotLeader(leader));
        }
        let mut base: Vec<JobEvent> = job
            .transitions
            .iter()
            .map(|t| JobEvent {
                seq: 0,
                at_unix_ms: t.at_unix_ms,
                kind: Some(job_event::Kind::Transition(t.clone())),
            })
            .collect();
        for cp in self.store.list_checkpoints(id).await? {
            base.push(JobEvent {
                seq: 0,
                at_unix_ms: cp.created_unix_ms,
                kind: Some(job_event::Kind::Checkpoint(cp)),
            });
        }
        let mut stored = StoredHistory::default();
        let mut result = job.result.clone();
        if let Some(objects) = &self.objects {
            stored = durable::read_history(objects, id).await.map_err(|e| {
                OpError::Unavailable(format!("reading the history of job {id}: {e}"))
            })?;
            if result.is_none() {
                result = durable::read_results(objects, id)
                    .await
                    .unwrap_or_else(|e| {
                        tracing::warn!(job_id = %id, error = %e, "reading results.json failed");
                        None
                    });
            }
        }
        if let Some(r) = result {
            let at = job.transitions.last().map(|t| t.at_unix_ms).unwrap_or(0);
            base.push(JobEvent {
                seq: 0,
                at_unix_ms: at,
                kind: Some(job_event::Kind::Result(r)),
            });
        }
        let events = merge_history(base, stored, None);
        Ok(numbered(Box::pin(futures::stream::iter(
            events.into_iter().map(Ok),
        ))))
    }

    /// A job's checkpoints from the store.
    pub async fn list_checkpoints(&self, job_id: &str) -> Result<Vec<CheckpointInfo>, OpError> {
        if self.store.get_job(job_id).await?.is_none() {
            return Err(OpError::NotFound(format!("job {job_id} not found")));
        }
        Ok(self.store.list_checkpoints(job_id).await?)
    }

    /// The registry's job types, with presets and config keys.
    pub fn list_job_types(&self) -> Vec<JobType> {
        crate::job_types::job_types()
    }

    /// Adds a worker; adopts ranks of orphaned jobs it still runs, cancels stale ones.
    pub async fn register_worker(
        &self,
        req: RegisterWorkerRequest,
    ) -> Result<RegisterWorkerResponse, OpError> {
        self.check_open()?;
        self.require_leader()?;
        let mut seen = BTreeSet::new();
        for d in &req.devices {
            if !seen.insert(d.index) {
                return Err(OpError::InvalidArgument(format!(
                    "devices: duplicate device index {}",
                    d.index
                )));
            }
            if d.kind.is_empty() {
                return Err(OpError::InvalidArgument(format!(
                    "devices[{}].kind: missing",
                    d.index
                )));
            }
        }
        let id = format!("w-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let now = now_unix_ms();
        let record = Worker {
            id: id.clone(),
            name: if req.name.is_empty() {
                id.clone()
            } else {
                req.name.clone()
            },
            hostname: req.hostname.clone(),
            state: WorkerState::Alive as i32,
            devices: req.devices.clone(),
            used: vec![],
            registered_unix_ms: now,
            last_heartbeat_unix_ms: now,
        };
        let mut guard = self.state.lock().await;
        self.store
            .register_worker(record.clone(), self.settings.heartbeat_timeout)
            .await?;
        let st = &mut *guard;
        let mut entry = WorkerEntry::new(record);
        let mut to_save = Vec::new();
        for rs in &req.running {
            let rank_state = rs.state();
            let alive_rank = !matches!(
                rank_state,
                RankState::Succeeded | RankState::Failed | RankState::Cancelled
            );
            let adopt = match st.jobs.get_mut(&rs.job_id) {
                Some(je)
                    if je.orphaned
                        && je.job.attempt == rs.attempt
                        && rs.rank < je.world_size()
                        && !je.adopted.contains(&rs.rank) =>
                {
                    je.adopted.insert(rs.rank);
                    je.ranks.insert(rs.rank, rank_state);
                    if let Some(p) = je.job.placement.iter_mut().find(|p| p.rank == rs.rank) {
                        p.worker_id = id.clone();
                        p.device_index = rs.device_index;
                    }
                    if je.adopted.len() as u32 == je.world_size() {
                        je.orphaned = false;
                        je.adopted.clear();
                        je.job.state_reason = format!(
                            "all {} rank(s) came back after a coordinator restart",
                            je.world_size()
                        );
                        to_save.push(rs.job_id.clone());
                        tracing::info!(job_id = %rs.job_id, "all ranks came back after restart; job kept");
                    }
                    true
                }
                _ => false,
            };
            if !alive_rank {
                // A rank that ended while no coordinator listened (its exit report is still
                // on its way): it counts for adoption, but holds no device and is not
                // cancelled.
                continue;
            }
            entry.used.insert(
                rs.device_index,
                SlotUse {
                    job_id: rs.job_id.clone(),
                    attempt: rs.attempt,
                    rank: rs.rank,
                },
            );
            if !adopt {
                entry.send(trainyard_proto::worker_command::Command::Cancel(
                    trainyard_proto::CancelRank {
                        job_id: rs.job_id.clone(),
                        attempt: rs.attempt,
                        rank: rs.rank,
                        reason: "stale attempt: the job was requeued, finished or is unknown"
                            .into(),
                        leader_term: 0,
                    },
                ));
            }
        }
        tracing::info!(worker = %id, name = %entry.record.name, devices = entry.record.devices.len(), running = req.running.len(), "worker registered");
        st.workers.insert(id.clone(), entry);
        for job_id in to_save {
            if let Some(je) = st.jobs.get_mut(&job_id) {
                if let Err(e) = save(self.store.as_ref(), je).await {
                    tracing::error!(job_id = %job_id, error = %e, "saving adopted placement failed");
                }
            }
        }
        drop(guard);
        self.wake.notify_one();
        Ok(RegisterWorkerResponse {
            worker_id: id,
            heartbeat_interval_ms: self.settings.heartbeat_interval.as_millis() as u32,
            heartbeat_timeout_ms: self.settings.heartbeat_timeout.as_millis() as u32,
            objects_url: self.settings.objects_url.clone(),
        })
    }

    /// Renews a worker's lease. False if the coordinator does not know it.
    pub async fn heartbeat(&self, worker_id: &str) -> Result<bool, OpError> {
        self.require_leader()?;
        // A worker registered with a previous leader is unknown here, even if its store
        // record lives on: it must register again, listing its ranks.
        if !self.state.lock().await.workers.contains_key(worker_id) {
            return Ok(false);
        }
        Ok(self.store.keep_alive(worker_id).await?)
    }

    /// The receiving end of a worker's command stream (commands sent before the stream
    /// opened are in it). A second stream for the same worker replaces the first.
    pub async fn stream_commands(&self, worker_id: &str) -> Result<CommandReceiver, OpError> {
        self.check_open()?;
        self.require_leader()?;
        let mut guard = self.state.lock().await;
        let st = &mut *guard;
        let w = st
            .workers
            .get_mut(worker_id)
            .ok_or_else(|| OpError::NotFound(format!("worker {worker_id} not registered")))?;
        match w.pending_rx.take() {
            Some(rx) => Ok(rx),
            None => {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                w.commands = tx;
                // A reopened stream may have missed rendezvous entries of the attempts
                // running here: send them again (ranks ignore keys they already have).
                for entry in st.jobs.values() {
                    let here = entry.job.placement.iter().any(|p| p.worker_id == worker_id);
                    if !here || entry.job.state().is_terminal() {
                        continue;
                    }
                    if let Some(update) = rendezvous::snapshot(entry) {
                        w.send(trainyard_proto::worker_command::Command::Rendezvous(update));
                    }
                }
                Ok(rx)
            }
        }
    }

    /// Applies a batch of rank events. Returns false if the report is for a stale attempt
    /// (the rank must stop); terminal rank states still free their device.
    pub async fn report_rank(&self, req: RankReport) -> Result<bool, OpError> {
        let r = self.report_rank_unfenced(req).await;
        self.fenced(r)
    }

    async fn report_rank_unfenced(&self, req: RankReport) -> Result<bool, OpError> {
        self.require_leader()?;
        let mut guard = self.state.lock().await;
        // A worker this coordinator does not know (registered with a previous leader or
        // process, or declared dead) must register again, listing its ranks, before its
        // reports mean anything: refusing them as stale here would stop ranks the
        // registration is about to adopt (the worker may see this answer before it stores
        // its new id). An error keeps the events queued; the worker resends them under
        // its new id.
        if !guard.workers.contains_key(&req.worker_id) {
            return Err(OpError::FailedPrecondition(format!(
                "worker_id: worker {} is not registered with this coordinator; register again \
                 and resend",
                req.worker_id
            )));
        }
        let tracked = match self.ensure_tracked(&mut guard, &req.job_id).await {
            Ok(()) => true,
            Err(OpError::NotFound(_)) => false,
            Err(e) => return Err(e),
        };
        if !tracked {
            // Unknown job: free whatever it held on this worker.
            for ev in &req.events {
                if let Some(rank_event::Kind::State(s)) = &ev.kind {
                    if is_rank_gone(s.state()) {
                        state::release(
                            &mut guard.workers,
                            &req.worker_id,
                            &req.job_id,
                            req.attempt,
                            req.rank,
                        );
                    }
                }
            }
            return Ok(false);
        }
        let st = &mut *guard;
        let workers = &mut st.workers;
        let entry = st
            .jobs
            .get_mut(&req.job_id)
            .ok_or_else(|| OpError::Internal("job vanished".into()))?;
        let current = !entry.job.state().is_terminal()
            && req.attempt == entry.job.attempt
            && entry
                .job
                .placement
                .iter()
                .any(|p| p.rank == req.rank && p.worker_id == req.worker_id);
        let mut need_save = false;
        let mut wake = false;
        let mut checkpointed = false;
        for ev in req.events {
            let at = if ev.at_unix_ms > 0 {
                ev.at_unix_ms
            } else {
                now_unix_ms()
            };
            let Some(kind) = ev.kind else { continue };
            if let rank_event::Kind::State(change) = &kind {
                if is_rank_gone(change.state())
                    && state::release(workers, &req.worker_id, &req.job_id, req.attempt, req.rank)
                {
                    wake = true;
                }
            }
            if !current || entry.job.state().is_terminal() || entry.job.attempt != req.attempt {
                continue;
            }
            match kind {
                rank_event::Kind::State(change) => {
                    let rs = change.state();
                    entry.ranks.insert(req.rank, rs);
                    match rs {
                        RankState::Running => {
                            if entry.job.state() == JobState::Scheduled {
                                entry.transition(
                                    JobState::Running,
                                    &format!("rank {} running on {}", req.rank, req.worker_id),
                                )?;
                                need_save = true;
                            }
                        }
                        RankState::Succeeded => {
                            let world = entry.world_size();
                            let all = (0..world)
                                .all(|r| entry.ranks.get(&r) == Some(&RankState::Succeeded));
                            if all {
                                if entry.job.state() == JobState::Scheduled {
                                    entry.transition(
                                        JobState::Running,
                                        &format!("rank {} ran", req.rank),
                                    )?;
                                }
                                entry.transition(
                                    JobState::Succeeded,
                                    &format!("all {world} rank(s) succeeded"),
                                )?;
                                need_save = true;
                            }
                        }
                        RankState::Failed | RankState::Cancelled => {
                            let mut msg = format!(
                                "rank {} {} on {}",
                                req.rank,
                                rank_state_name(rs),
                                req.worker_id
                            );
                            if !change.message.is_empty() {
                                msg.push_str(&format!(": {}", change.message));
                            }
                            if rs == RankState::Failed {
                                msg.push_str(&format!(" (exit code {})", change.exit_code));
                            }
                            let before = entry.job.clone();
                            let to = entry.requeue_or_fail(&msg)?;
                            if to == JobState::Pending {
                                self.metrics.restarted("rank_failed");
                            }
                            tracing::info!(job_id = %req.job_id, rank = req.rank, to = to.short_name(), "rank ended badly: {msg}");
                            cancel_ranks(workers, &before, &msg, Some((&req.worker_id, req.rank)));
                            need_save = true;
                            wake = true;
                        }
                        RankState::Starting | RankState::Unspecified => {}
                    }
                }
                rank_event::Kind::Log(l) => match &self.durable {
                    Some(sink) => {
                        let n = entry.history.push(at, job_event::Kind::Log(l.clone()));
                        sink.record(&req.job_id, Record::log(entry.history.id(), n, at, &l));
                        entry.durable_sent += 1;
                    }
                    None => {
                        entry.history.push(at, job_event::Kind::Log(l));
                    }
                },
                rank_event::Kind::Progress(p) => {
                    entry.history.push(at, job_event::Kind::Progress(p));
                }
                rank_event::Kind::Metric(m) => {
                    for (k, v) in &m.values {
                        entry.job.latest_metrics.insert(k.clone(), *v);
                    }
                    entry.job.latest_step = entry.job.latest_step.max(m.step);
                    entry.steps.observe(at, m.step);
                    entry.dirty = true;
                    match &self.durable {
                        Some(sink) => {
                            let n = entry.history.push(at, job_event::Kind::Metric(m.clone()));
                            sink.record(&req.job_id, Record::metric(entry.history.id(), n, at, &m));
                            entry.durable_sent += 1;
                        }
                        None => {
                            entry.history.push(at, job_event::Kind::Metric(m));
                        }
                    }
                }
                rank_event::Kind::Checkpoint(mut cp) => {
                    if cp.job_id.is_empty() {
                        cp.job_id = req.job_id.clone();
                    }
                    if cp.attempt == 0 {
                        cp.attempt = req.attempt;
                    }
                    if cp.created_unix_ms == 0 {
                        cp.created_unix_ms = at;
                    }
                    self.store.record_checkpoint(cp.clone()).await?;
                    let newer = entry
                        .job
                        .latest_checkpoint
                        .as_ref()
                        .map(|c| c.step <= cp.step)
                        .unwrap_or(true);
                    if newer {
                        entry.job.latest_checkpoint = Some(cp.clone());
                    }
                    need_save = true;
                    checkpointed = true;
                    entry.history.push(at, job_event::Kind::Checkpoint(cp));
                }
                rank_event::Kind::Rendezvous(e) => {
                    if let Err(why) = rendezvous::accept(entry, &e) {
                        tracing::warn!(job_id = %req.job_id, rank = req.rank, key = %e.key, "rendezvous entry refused: {why}");
                        continue;
                    }
                    rendezvous::fan_out(workers, entry, e);
                }
                rank_event::Kind::Artifact(mut a) => {
                    a.url = join_url(&self.settings.objects_url, &a.path);
                    if a.created_unix_ms == 0 {
                        a.created_unix_ms = at;
                    }
                    entry.job.artifacts.retain(|old| old.name != a.name);
                    entry.job.artifacts.push(a.clone());
                    need_save = true;
                    entry.history.push(at, job_event::Kind::Artifact(a));
                }
                rank_event::Kind::Result(r) => {
                    entry.job.result = Some(r.clone());
                    need_save = true;
                    if let Some(sink) = &self.durable {
                        sink.result(&req.job_id, entry.history.id(), r.clone());
                        entry.durable_sent += 1;
                    }
                    entry.history.push(at, job_event::Kind::Result(r));
                }
            }
        }
        if need_save {
            save(self.store.as_ref(), entry).await?;
        }
        drop(guard);
        if checkpointed {
            if let Some(q) = &self.retention {
                q.request(&req.job_id);
            }
        }
        if wake {
            self.wake.notify_one();
        }
        Ok(current)
    }

    /// Alive workers (and recently dead ones) with their devices and used slots.
    pub async fn list_workers(&self, include_dead: bool) -> Result<Vec<Worker>, OpError> {
        let alive = self.store.list_workers().await?;
        if !self.is_leader() {
            // A follower knows only the store's records.
            return Ok(alive);
        }
        let st = self.state.lock().await;
        let mut out: Vec<Worker> = alive
            .into_iter()
            .filter_map(|mut w| {
                let entry = st.workers.get(&w.id)?;
                w.devices = entry.record.devices.clone();
                w.used = entry
                    .used
                    .iter()
                    .map(|(i, u)| DeviceUse {
                        device_index: *i,
                        job_id: u.job_id.clone(),
                        rank: u.rank,
                    })
                    .collect();
                Some(w)
            })
            .collect();
        if include_dead {
            out.extend(st.dead_workers.iter().cloned());
        }
        Ok(out)
    }

    /// Refuses new streams and registrations once the coordinator is shutting down.
    fn check_open(&self) -> Result<(), OpError> {
        if self.closing.load(Ordering::SeqCst) {
            Err(OpError::Unavailable(
                "the coordinator is shutting down".into(),
            ))
        } else {
            Ok(())
        }
    }

    /// Ends every server stream (worker command streams, job watches) for a shutdown and
    /// refuses new ones.
    pub async fn close_streams(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let mut st = self.state.lock().await;
        st.workers.clear();
        st.jobs.clear();
    }
}

/// `base` (an objects URL such as `s3://bucket/prefix` or `file:///data/objects`) joined
/// with a relative object path.
fn join_url(base: &str, path: &str) -> String {
    if base.is_empty() {
        return path.to_string();
    }
    format!(
        "{}/{}",
        base.trim_end_matches('/'),
        path.trim_start_matches('/')
    )
}

fn is_rank_gone(s: RankState) -> bool {
    matches!(
        s,
        RankState::Succeeded | RankState::Failed | RankState::Cancelled
    )
}

fn is_terminal_transition(ev: &JobEvent) -> bool {
    match &ev.kind {
        Some(job_event::Kind::Transition(t)) => t.to().is_terminal(),
        _ => false,
    }
}

/// Numbers a watch's events from 0 (`JobEvent.seq`).
fn numbered(stream: EventStream) -> EventStream {
    let mut seq = 0u64;
    Box::pin(stream.map(move |item| {
        item.map(|mut ev| {
            ev.seq = seq;
            seq += 1;
            ev
        })
    }))
}

/// Merges events held in memory with a job's durable logs and metrics in time order,
/// keeping the order within each source (durable logs, durable metrics, memory's other
/// events, memory's transitions: each is in arrival order, which timestamps from several
/// processes need not follow); equal times take the sources in that order. Terminal
/// transitions go last. `skip` = `(history id, first n kept)`: that history's records from
/// `n` on are in memory already and are left out.
pub fn merge_history(
    memory: Vec<JobEvent>,
    stored: StoredHistory,
    skip: Option<(&str, u64)>,
) -> Vec<JobEvent> {
    use std::collections::VecDeque;
    let keep = |history: &str, n: u64| match skip {
        Some((id, first_kept)) => !(history == id && n >= first_kept),
        None => true,
    };
    let logs: VecDeque<JobEvent> = stored
        .logs
        .into_iter()
        .filter(|r| keep(&r.history, r.n))
        .map(|r| Record::Log(r).to_event())
        .collect();
    let metrics: VecDeque<JobEvent> = stored
        .metrics
        .into_iter()
        .filter(|r| keep(&r.history, r.n))
        .map(|r| Record::Metric(r).to_event())
        .collect();
    let (transitions, others): (VecDeque<JobEvent>, VecDeque<JobEvent>) = memory
        .into_iter()
        .partition(|e| matches!(e.kind, Some(job_event::Kind::Transition(_))));
    let mut sources = [logs, metrics, others, transitions];
    let mut out = Vec::with_capacity(sources.iter().map(VecDeque::len).sum());
    loop {
        let next = sources
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.front().map(|e| (e.at_unix_ms, i)))
            .min();
        let Some((_, i)) = next else { break };
        if let Some(e) = sources[i].pop_front() {
            out.push(e);
        }
    }
    let (mut rest, terminal): (Vec<JobEvent>, Vec<JobEvent>) =
        out.into_iter().partition(|e| !is_terminal_transition(e));
    rest.extend(terminal);
    rest
}

/// Live events after `last_n`, ending after the job's terminal transition.
fn live_events(
    rx: broadcast::Receiver<(u64, JobEvent)>,
    last_n: Option<u64>,
) -> impl Stream<Item = Result<JobEvent, Status>> + Send {
    futures::stream::unfold(Some(rx), move |rx| async move {
        let mut rx = rx?;
        loop {
            match rx.recv().await {
                Ok((n, _)) if last_n.is_some_and(|l| n <= l) => continue,
                Ok((_, ev)) => {
                    let done = is_terminal_transition(&ev);
                    return Some((Ok(ev), (!done).then_some(rx)));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    return Some((
                        Err(Status::resource_exhausted(format!(
                            "watcher fell {n} events behind; watch again"
                        ))),
                        None,
                    ))
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainyard_proto::LogLine;

    fn ev(at: i64, kind: job_event::Kind) -> JobEvent {
        JobEvent {
            seq: 0,
            at_unix_ms: at,
            kind: Some(kind),
        }
    }

    fn transition(at: i64, to: JobState) -> JobEvent {
        ev(
            at,
            job_event::Kind::Transition(Transition {
                from: 0,
                to: to as i32,
                at_unix_ms: at,
                reason: String::new(),
            }),
        )
    }

    fn log_record(history: &str, n: u64, at: i64, line: &str) -> durable::LogRecord {
        durable::LogRecord {
            history: history.into(),
            n,
            at_unix_ms: at,
            rank: 0,
            stream: "stdout".into(),
            line: line.into(),
        }
    }

    fn describe(events: &[JobEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e.kind.as_ref() {
                Some(job_event::Kind::Transition(t)) => format!("T:{}", t.to().short_name()),
                Some(job_event::Kind::Log(l)) => format!("L:{}", l.line),
                Some(job_event::Kind::Metric(m)) => format!("M:{}", m.step),
                Some(job_event::Kind::Result(_)) => "R".into(),
                Some(job_event::Kind::Checkpoint(c)) => format!("C:{}", c.step),
                Some(job_event::Kind::Progress(_)) => "P".into(),
                Some(job_event::Kind::Artifact(a)) => format!("A:{}", a.name),
                None => "?".into(),
            })
            .collect()
    }

    #[test]
    fn merged_history_is_in_time_order_without_duplicates_and_ends_with_the_end() {
        let stored = StoredHistory {
            logs: vec![
                log_record("old", 0, 10, "a"),
                // Out of time order within its source: kept where it is.
                log_record("old", 1, 9, "b"),
                log_record("old", 2, 30, "c"),
                // Written by the history in memory: shown from memory, not twice.
                log_record("mine", 5, 40, "d"),
                // Dropped from memory (n below the first kept): shown from the store.
                log_record("mine", 2, 35, "x"),
            ],
            metrics: vec![durable::MetricRecord {
                history: "old".into(),
                n: 3,
                at_unix_ms: 20,
                rank: 0,
                step: 7,
                values: Default::default(),
            }],
            bad_lines: 0,
        };
        let memory = vec![
            transition(1, JobState::Pending),
            transition(5, JobState::Scheduled),
            transition(50, JobState::Succeeded),
            ev(
                40,
                job_event::Kind::Log(LogLine {
                    rank: 0,
                    stream: "stdout".into(),
                    line: "d".into(),
                }),
            ),
            ev(50, job_event::Kind::Result(Default::default())),
        ];
        let merged = merge_history(memory, stored, Some(("mine", 4)));
        assert_eq!(
            describe(&merged),
            [
                "T:PENDING",
                "T:SCHEDULED",
                "L:a",
                "L:b",
                "M:7",
                "L:c",
                "L:x",
                "L:d",
                "R",
                "T:SUCCEEDED"
            ]
        );
        // Without a memory history everything stored is shown.
        let only = merge_history(
            vec![],
            StoredHistory {
                logs: vec![log_record("h", 0, 1, "a"), log_record("h", 1, 2, "b")],
                ..Default::default()
            },
            None,
        );
        assert_eq!(describe(&only), ["L:a", "L:b"]);
    }

    #[test]
    fn artifact_urls_join_the_objects_url() {
        assert_eq!(
            join_url("s3://b/pre/", "jobs/j/results/a.png"),
            "s3://b/pre/jobs/j/results/a.png"
        );
        assert_eq!(
            join_url("file:///data/objects", "jobs/j/results/a.png"),
            "file:///data/objects/jobs/j/results/a.png"
        );
        assert_eq!(join_url("", "jobs/x"), "jobs/x");
    }

    #[test]
    fn base36_is_fixed_width_and_order_preserving() {
        assert_eq!(base36(0, 4), "0000");
        assert_eq!(base36(35, 2), "0z");
        let a = base36(1_700_000_000_000, 8);
        let b = base36(1_700_000_000_001, 8);
        assert_eq!(a.len(), 8);
        assert!(a < b);
    }
}
