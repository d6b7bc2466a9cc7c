//! The scheduler loop: woken on submit, worker changes, rank reports and every change the
//! store's job watch ([`crate::store::StateStore::watch_jobs`]) reports, it expires dead
//! workers, requeues their jobs, runs the pure [`placement::place`] over the queue, commits
//! placements (SCHEDULED, compare-and-set) and pushes the assignments down the workers'
//! command streams.
//!
//! Nothing is polled for placement: a full pass runs on a wake-up, and on a slow safety
//! tick ([`SAFETY_TICK`]) only in case a wake-up was missed. Between them a short
//! housekeeping tick expires workers past their heartbeat deadline, requeues orphans and
//! flushes metrics; it wakes a full pass when it changed anything.

pub mod placement;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::watch;
use trainyard_proto::{
    worker_command, JobState, RankAssignment, RankPlacement, RankState, WorkerState,
};

use crate::coordinator::{save, Coordinator, METRIC_FLUSH};
use crate::state::{cancel_ranks, JobEntry, SlotUse, State};
use crate::store::{StateStore, StoreError};
use placement::{place, Assignment, QueuedJob};

/// Default grace period of a cancelled rank, in seconds.
const DEFAULT_GRACE_S: u32 = 10;
/// A full scheduling pass runs at least this often, even without a wake-up.
pub const SAFETY_TICK: Duration = Duration::from_secs(5);
/// A full pass starts no sooner than this many times the last pass's duration after it.
const PACING_FACTOR: u32 = 8;
/// Upper bound of the pacing delay, whatever the last pass took.
const PACING_MAX: Duration = Duration::from_millis(100);
/// Longest wait before the job watch is opened again after it failed.
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Wakes the scheduler on every job change the store reports (writes of this coordinator
/// and of any other), reopening the watch with backoff when it fails (etcd down,
/// compaction, lag). Ends when `shutdown` turns true.
async fn wake_on_job_changes(coord: Arc<Coordinator>, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(200);
    while !*shutdown.borrow() {
        let opened = async {
            let from = coord.store.current_revision().await? + 1;
            coord.store.watch_jobs(from).await
        };
        let failure = tokio::select! {
            r = opened => match r {
                Ok(mut changes) => {
                    // Changes made while the watch was down are picked up by this pass.
                    coord.wake.notify_one();
                    backoff = Duration::from_millis(200);
                    loop {
                        tokio::select! {
                            item = changes.next() => match item {
                                Some(Ok(_)) => coord.wake.notify_one(),
                                Some(Err(e)) => break e.to_string(),
                                None => break "the job watch ended".to_string(),
                            },
                            _ = shutdown.changed() => return,
                        }
                    }
                }
                Err(e) => e.to_string(),
            },
            _ = shutdown.changed() => return,
        };
        tracing::debug!(error = %failure, "job watch failed; reopening in {backoff:?}");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(WATCH_BACKOFF_MAX);
    }
}

/// Runs scheduling passes until `shutdown` turns true — only while this coordinator leads.
/// `leading` says whether the caller already reconciled as the leader. On winning an
/// election it reconciles from the store ([`Coordinator::take_over`]); on losing one it
/// stops at once and forgets its in-memory state ([`Coordinator::step_down`]).
pub async fn run(coord: Arc<Coordinator>, mut shutdown: watch::Receiver<bool>, mut leading: bool) {
    let tick = (coord.settings.heartbeat_timeout / 4)
        .clamp(Duration::from_millis(50), Duration::from_millis(500));
    let mut leadership = coord.leadership.clone();
    let mut elector_gone = false;
    let mut term = leadership.borrow().term;
    let mut full_pass = true;
    let mut last_pass_started = Instant::now();
    let mut last_placement = Duration::ZERO;
    let mut housekeeping = tokio::time::interval(tick);
    housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut safety = tokio::time::interval(SAFETY_TICK);
    safety.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let watcher = tokio::spawn(wake_on_job_changes(coord.clone(), shutdown.clone()));
    loop {
        let (now_leader, now_term) = {
            let l = leadership.borrow_and_update();
            // A term whose fence refused a write is over, whatever the elector says yet.
            let fenced_out = l.term != 0 && l.term == coord.fenced_out_term();
            (l.is_leader && !fenced_out, l.term)
        };
        if leading && (!now_leader || now_term != term || !coord.is_ready()) {
            coord.step_down().await;
            leading = false;
        }
        if now_leader && !leading {
            match coord.take_over().await {
                Ok(()) => {
                    leading = true;
                    term = now_term;
                }
                Err(e) => {
                    tracing::error!(error = %e, "reconciling from the store failed; retrying")
                }
            }
        }
        if leading {
            let done = if full_pass {
                // Pacing: under a stream of wake-ups (a submission burst) a pass starts no
                // sooner than PACING_FACTOR × the last pass's placement work after that pass
                // began, so placing a long queue takes at most about a ninth of a core and
                // the wake-ups that arrive meanwhile are served by one pass. Store round
                // trips do not count (they wait, they do not compute); a short queue's
                // placement takes microseconds: no delay.
                let pace = last_placement.saturating_mul(PACING_FACTOR).min(PACING_MAX);
                let since = last_pass_started.elapsed();
                if since < pace {
                    tokio::time::sleep(pace - since).await;
                }
                last_pass_started = Instant::now();
                let r = coord.pass().await.map(|took| last_placement = took);
                coord
                    .metrics
                    .pass_duration
                    .observe(last_pass_started.elapsed().as_secs_f64());
                r
            } else {
                coord.housekeep().await
            };
            if let Err(e) = done {
                coord.note_store_error(&e);
                tracing::error!(error = %e, "scheduling pass failed");
            }
        }
        full_pass = tokio::select! {
            _ = coord.wake.notified() => true,
            _ = housekeeping.tick() => false,
            _ = safety.tick() => true,
            _ = shutdown.changed() => true,
            r = leadership.changed(), if !elector_gone => {
                elector_gone = r.is_err();
                true
            }
        };
        if *shutdown.borrow() {
            break;
        }
    }
    watcher.abort();
    tracing::debug!("scheduler stopped");
}

/// The waiting reason of a job just submitted: what [`place`] says of it alone on
/// `cluster` as it is now, or `queued` when it would be placed.
pub fn first_waiting_reason(
    spec: &trainyard_proto::JobSpec,
    cluster: &placement::ClusterView,
) -> String {
    let job = QueuedJob {
        id: String::new(),
        priority: spec.priority,
        submitted_unix_ms: 0,
        ranks: spec.ranks.max(1),
        ranks_per_worker: spec.ranks_per_worker,
        device_kind: spec.device_kind.clone(),
    };
    place(std::slice::from_ref(&job), cluster)
        .waiting
        .pop()
        .map(|w| w.reason)
        .unwrap_or_else(|| "queued".to_string())
}

fn describe_placement(a: &Assignment) -> String {
    let mut by_worker: Vec<(String, Vec<u32>, String)> = Vec::new();
    for r in &a.ranks {
        match by_worker.iter_mut().find(|(w, _, _)| *w == r.worker_id) {
            Some((_, idx, _)) => idx.push(r.device_index),
            None => by_worker.push((
                r.worker_id.clone(),
                vec![r.device_index],
                r.device_kind.clone(),
            )),
        }
    }
    let parts: Vec<String> = by_worker
        .iter()
        .map(|(w, idx, kind)| {
            let idx: Vec<String> = idx.iter().map(u32::to_string).collect();
            format!("{w} ({kind} {})", idx.join(","))
        })
        .collect();
    format!("placed on {}", parts.join(", "))
}

/// Saves every entry concurrently (see [`save`]); the first error wins, after all finished.
async fn save_all<'a>(
    store: &dyn StateStore,
    entries: impl Iterator<Item = &'a mut JobEntry>,
) -> Result<(), StoreError> {
    let results = futures::future::join_all(entries.map(|e| save(store, e))).await;
    results.into_iter().collect()
}

impl Coordinator {
    /// Housekeeping between passes: expires workers past their deadline, requeues orphans
    /// after a restart's grace period and flushes due metrics. Whatever it requeues wakes a
    /// full [`Coordinator::pass`].
    pub async fn housekeep(&self) -> Result<(), StoreError> {
        let mut guard = self.state.lock().await;
        let st = &mut *guard;
        self.expire_workers(st).await?;
        if self.requeue_orphans(st).await? {
            self.wake.notify_one();
        }
        self.flush_metrics(st).await?;
        self.tend_history(st);
        Ok(())
    }

    /// Tells the durable history writer about jobs that ended, and drops the entries of
    /// jobs that ended [`crate::coordinator::Settings::finished_history_kept`] ago once
    /// their history is written (a watch then reads it back from the object store). Without
    /// an object store, entries stay.
    fn tend_history(&self, st: &mut State) {
        // Before any entry is dropped: count the jobs that ended.
        crate::metrics::count_finished(&self.metrics, st);
        let Some(sink) = self.durable() else {
            return;
        };
        let kept = self.settings.finished_history_kept;
        let mut evict = Vec::new();
        for (id, e) in st.jobs.iter_mut() {
            let Some(since) = e.terminal_since else {
                continue;
            };
            if !e.durable_finished {
                sink.finished(id);
                e.durable_finished = true;
                // A last retention run, for what was left while the job ran.
                if e.job.latest_checkpoint.is_some() {
                    self.request_retention(id);
                }
            }
            if since.elapsed() >= kept
                && !e.dirty
                && sink.written(id, e.history.id()) >= e.durable_sent
            {
                evict.push(id.clone());
            }
        }
        for id in evict {
            st.jobs.remove(&id);
            sink.forget(&id);
            tracing::debug!(job_id = %id, "finished job's history is in the object store; entry dropped");
        }
    }

    /// One scheduling pass (see the module docs). Returns the time spent on the placement
    /// itself (building the queue, [`place`], noting waiting reasons), without store I/O.
    pub async fn pass(&self) -> Result<Duration, StoreError> {
        let mut guard = self.state.lock().await;
        let st = &mut *guard;
        self.expire_workers(st).await?;
        let _ = self.requeue_orphans(st).await?;
        let placing = Instant::now();
        let mut placement_took = Duration::ZERO;
        let queue: Vec<QueuedJob> = st
            .jobs
            .values()
            .filter(|e| e.job.state() == JobState::Pending)
            .map(|e| {
                let spec = e.job.spec.as_ref();
                QueuedJob {
                    id: e.job.id.clone(),
                    priority: spec.map_or(0, |s| s.priority),
                    submitted_unix_ms: e.job.created_unix_ms,
                    ranks: spec.map_or(1, |s| s.ranks.max(1)),
                    ranks_per_worker: spec.map_or(0, |s| s.ranks_per_worker),
                    device_kind: spec.map(|s| s.device_kind.clone()).unwrap_or_default(),
                }
            })
            .collect();
        if !queue.is_empty() {
            let result = place(&queue, &st.cluster_view());
            placement_took = placing.elapsed();
            let noting = Instant::now();
            // A waiting reason is advice the leader recomputes on every pass: it is served
            // from memory at once and written to the store with the next metric flush
            // (batched, at most once per METRIC_FLUSH per job), never a round trip per job
            // under the state lock.
            for w in result.waiting {
                if let Some(entry) = st.jobs.get_mut(&w.job_id) {
                    if entry.job.state_reason != w.reason {
                        entry.job.state_reason = w.reason;
                        entry.dirty = true;
                    }
                }
            }
            placement_took += noting.elapsed();
            self.start_all(st, result.assignments).await;
        }
        self.flush_metrics(st).await?;
        self.tend_history(st);
        Ok(placement_took)
    }

    /// Writes the jobs whose metrics changed and were last written over [`METRIC_FLUSH`] ago.
    async fn flush_metrics(&self, st: &mut State) -> Result<(), StoreError> {
        let due = st
            .jobs
            .values_mut()
            .filter(|e| e.dirty && e.last_flush.elapsed() >= METRIC_FLUSH);
        save_all(self.store.as_ref(), due).await
    }

    /// Commits this pass's placements: moves each job to SCHEDULED in memory, writes them
    /// all concurrently (the store batches them into few transactions), then pushes the
    /// assignments of every job whose write succeeded. A job whose write failed is reloaded
    /// from the store and not started.
    async fn start_all(&self, st: &mut State, assignments: Vec<Assignment>) {
        let mut placed = Vec::with_capacity(assignments.len());
        for a in assignments {
            let Some(entry) = st.jobs.get_mut(&a.job_id) else {
                continue;
            };
            let reason = describe_placement(&a);
            if let Err(e) = entry.transition(JobState::Scheduled, &reason) {
                tracing::error!(job_id = %a.job_id, error = %e, "cannot schedule");
                continue;
            }
            entry.job.placement = a
                .ranks
                .iter()
                .map(|r| RankPlacement {
                    rank: r.rank,
                    worker_id: r.worker_id.clone(),
                    device_index: r.device_index,
                })
                .collect();
            placed.push((a, reason));
        }
        let ids: HashSet<&str> = placed.iter().map(|(a, _)| a.job_id.as_str()).collect();
        let store = self.store.as_ref();
        let writes = st
            .jobs
            .values_mut()
            .filter(|e| ids.contains(e.job.id.as_str()))
            .map(|e| async move {
                let r = save(store, e).await;
                (e.job.id.clone(), r)
            });
        let failed: HashMap<String, StoreError> = futures::future::join_all(writes)
            .await
            .into_iter()
            .filter_map(|(id, r)| r.err().map(|e| (id, e)))
            .collect();
        for (a, reason) in placed {
            match failed.get(&a.job_id) {
                None => {
                    self.metrics.placements.inc();
                    self.metrics.placed_ranks.inc_by(a.ranks.len() as u64);
                    self.push_assignments(st, &a, &reason)
                }
                Some(e) => {
                    tracing::error!(job_id = %a.job_id, error = %e, "storing the placement failed; not starting");
                    if let Ok(Some(job)) = self.store.get_job(&a.job_id).await {
                        if let Some(entry) = st.jobs.get_mut(&a.job_id) {
                            entry.job = job;
                        }
                    }
                }
            }
        }
    }

    /// Sends the assignments of a job whose placement is stored down its workers' streams.
    fn push_assignments(&self, st: &mut State, a: &Assignment, reason: &str) {
        let Some(entry) = st.jobs.get_mut(&a.job_id) else {
            return;
        };
        let job = entry.job.clone();
        let spec = job.spec.clone().unwrap_or_default();
        let world_size = spec.ranks.max(1);
        for r in &a.ranks {
            entry.ranks.insert(r.rank, RankState::Starting);
        }
        tracing::info!(job_id = %job.id, attempt = job.attempt, "{reason}");
        for r in &a.ranks {
            let Some(w) = st.workers.get_mut(&r.worker_id) else {
                continue;
            };
            w.used.insert(
                r.device_index,
                SlotUse {
                    job_id: job.id.clone(),
                    attempt: job.attempt,
                    rank: r.rank,
                },
            );
            w.send(worker_command::Command::Assign(RankAssignment {
                job_id: job.id.clone(),
                attempt: job.attempt,
                rank: r.rank,
                world_size,
                job: spec.job.clone(),
                config_json: job.resolved_config_json.clone(),
                objects_url: self.settings.objects_url.clone(),
                // Its own latest checkpoint, else the one it was started from.
                resume_from: job
                    .latest_checkpoint
                    .clone()
                    .or_else(|| crate::validate::from_checkpoint(&spec).map(|r| r.info())),
                device_index: r.device_index,
                device_kind: r.device_kind.clone(),
                grace_period_s: if spec.grace_period_s == 0 {
                    DEFAULT_GRACE_S
                } else {
                    spec.grace_period_s
                },
                peers: job.placement.clone(),
                // Stamped with the leader's term when sent down the stream.
                leader_term: 0,
                checkpoint_policy: Some(crate::validate::effective_checkpoint_policy(&spec)),
            }));
        }
    }

    /// Removes workers whose lease ran out and requeues (or fails) their jobs.
    async fn expire_workers(&self, st: &mut State) -> Result<(), StoreError> {
        for dead in self.store.expire_workers().await? {
            let Some(entry) = st.workers.remove(&dead.id) else {
                continue;
            };
            self.metrics.workers_lost.inc();
            let mut record = entry.record.clone();
            record.state = WorkerState::Dead as i32;
            record.last_heartbeat_unix_ms = dead.last_heartbeat_unix_ms;
            st.remember_dead(record);
            let hit: BTreeSet<(String, u32)> = entry
                .used
                .values()
                .map(|u| (u.job_id.clone(), u.attempt))
                .collect();
            tracing::warn!(worker = %dead.id, name = %dead.name, jobs = hit.len(), "worker missed its heartbeat deadline; declared dead");
            let reason = format!("worker {} ({}) stopped heartbeating", dead.id, dead.name);
            for (job_id, attempt) in hit {
                let Some(je) = st.jobs.get_mut(&job_id) else {
                    continue;
                };
                if je.job.attempt != attempt
                    || !matches!(je.job.state(), JobState::Scheduled | JobState::Running)
                {
                    continue;
                }
                let before = je.job.clone();
                match je.requeue_or_fail(&reason) {
                    Ok(to) => {
                        if to == JobState::Pending {
                            self.metrics.restarted("worker_lost");
                        }
                        tracing::info!(job_id = %job_id, to = to.short_name(), "{reason}")
                    }
                    Err(e) => {
                        tracing::error!(job_id = %job_id, error = %e, "cannot requeue");
                        continue;
                    }
                }
                save(self.store.as_ref(), je).await?;
                cancel_ranks(&st.workers, &before, &reason, None);
            }
            self.wake.notify_one();
        }
        Ok(())
    }

    /// After a restart's grace period, requeues jobs whose ranks did not all come back.
    /// Returns whether it looked at the orphans (the deadline passed).
    async fn requeue_orphans(&self, st: &mut State) -> Result<bool, StoreError> {
        match st.orphan_deadline {
            Some(deadline) if Instant::now() >= deadline => st.orphan_deadline = None,
            _ => return Ok(false),
        }
        let reason = "coordinator restarted and the job's ranks did not all come back";
        let ids: Vec<String> = st
            .jobs
            .values()
            .filter(|e| e.orphaned)
            .map(|e| e.job.id.clone())
            .collect();
        for id in ids {
            let Some(je) = st.jobs.get_mut(&id) else {
                continue;
            };
            let before = je.job.clone();
            match je.requeue_or_fail(reason) {
                Ok(to) => {
                    if to == JobState::Pending {
                        self.metrics.restarted("coordinator_restart");
                    }
                    tracing::info!(job_id = %id, to = to.short_name(), "{reason}")
                }
                Err(e) => {
                    tracing::error!(job_id = %id, error = %e, "cannot requeue");
                    continue;
                }
            }
            save(self.store.as_ref(), je).await?;
            cancel_ranks(&st.workers, &before, reason, None);
        }
        Ok(true)
    }
}
