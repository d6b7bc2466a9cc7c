//! The coordinator's in-memory view: alive workers (devices, which slots are in use, the
//! command channel to each) and live jobs (the last stored record, rank states of the
//! current attempt, and the event history that `WatchJob` replays).
//!
//! Everything here is rebuilt from the state store and from worker re-registration after a
//! restart, except the log/metric/progress history: logs and metrics are also written to
//! the object store ([`crate::durable`]) and read back from there when memory does not hold
//! them (progress is not kept).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Instant;

use tokio::sync::{broadcast, mpsc};
use tonic::Status;
use trainyard_proto::{
    job_event, worker_command, CancelRank, Job, JobEvent, JobState, RankState, Transition, Worker,
    WorkerCommand,
};

use crate::scheduler::placement::{ClusterView, SlotView, WorkerView};

/// Most non-transition events kept per job (oldest dropped first).
pub const HISTORY_LIMIT: usize = 20_000;
/// Capacity of a job's live event channel.
const LIVE_CHANNEL: usize = 8192;
/// How many dead workers `ListWorkers(include_dead)` remembers.
pub const DEAD_WORKERS_KEPT: usize = 100;

/// Sender half of a worker's command stream.
pub type CommandSender = mpsc::UnboundedSender<Result<WorkerCommand, Status>>;
/// Receiver half of a worker's command stream.
pub type CommandReceiver = mpsc::UnboundedReceiver<Result<WorkerCommand, Status>>;

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A rank holding a device slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotUse {
    /// Job id.
    pub job_id: String,
    /// Attempt of the rank.
    pub attempt: u32,
    /// Rank.
    pub rank: u32,
}

/// An alive worker.
#[derive(Debug)]
pub struct WorkerEntry {
    /// Its record (devices, name, ...).
    pub record: Worker,
    /// Device index -> the rank holding it.
    pub used: BTreeMap<u32, SlotUse>,
    /// Where commands for it go.
    pub commands: CommandSender,
    /// The receiver, until the worker opens its command stream.
    pub pending_rx: Option<CommandReceiver>,
}

impl WorkerEntry {
    /// A new entry with a fresh command channel (commands queue until the stream opens).
    pub fn new(record: Worker) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            record,
            used: BTreeMap::new(),
            commands: tx,
            pending_rx: Some(rx),
        }
    }

    /// Sends a command; a closed stream is logged (the worker will be expired or re-register).
    pub fn send(&self, command: worker_command::Command) {
        let msg = WorkerCommand {
            command: Some(command),
        };
        if self.commands.send(Ok(msg)).is_err() {
            tracing::debug!(worker = %self.record.id, "command stream closed");
        }
    }

    /// Frees the slot if `rank` of `attempt` of `job_id` holds it. Returns true if freed.
    pub fn release(&mut self, job_id: &str, attempt: u32, rank: u32) -> bool {
        let slot = self
            .used
            .iter()
            .find(|(_, u)| u.job_id == job_id && u.attempt == attempt && u.rank == rank)
            .map(|(i, _)| *i);
        match slot {
            Some(i) => {
                self.used.remove(&i);
                true
            }
            None => false,
        }
    }
}

/// A job's event history plus the live channel watchers subscribe to. Every event has an
/// internal sequence number `n` (increasing); transitions are never dropped.
///
/// A history is *complete* when it was started with the job (submitted to this
/// coordinator process) and has dropped nothing; otherwise (seeded from the store after a
/// restart, on a new leader, after an eviction, or bounded) the watch merges it with the
/// job's durable history in the object store. Its `id` tells the records it wrote there
/// apart from other processes' (see [`crate::durable`]).
#[derive(Debug)]
pub struct History {
    id: String,
    complete: bool,
    transitions: Vec<(u64, JobEvent)>,
    events: VecDeque<(u64, JobEvent)>,
    next_n: u64,
    /// Created by the first watcher: a channel of `LIVE_CHANNEL` slots costs about a
    /// megabyte, and most jobs are never watched while they are live.
    live: Option<broadcast::Sender<(u64, JobEvent)>>,
}

impl History {
    /// A history seeded from a stored job: its transitions and result survive restarts.
    /// It is not complete (see [`History::mark_complete`]).
    pub fn from_job(job: &Job) -> Self {
        let mut h = Self {
            id: crate::durable::new_history_id(),
            complete: false,
            transitions: Vec::new(),
            events: VecDeque::new(),
            next_n: 0,
            live: None,
        };
        for t in &job.transitions {
            h.push_transition(t.clone());
        }
        if let Some(cp) = &job.latest_checkpoint {
            h.push(cp.created_unix_ms, job_event::Kind::Checkpoint(cp.clone()));
        }
        if let Some(r) = &job.result {
            let at = job.transitions.last().map(|t| t.at_unix_ms).unwrap_or(0);
            h.push(at, job_event::Kind::Result(r.clone()));
        }
        h
    }

    /// This history's id (in the durable records it writes).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Marks the history as holding every event of its job (a job submitted to this
    /// process): watches are then served from memory alone while nothing is dropped.
    pub fn mark_complete(&mut self) {
        self.complete = true;
    }

    /// Whether memory holds every event of the job (see [`History`]).
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// The lowest `n` of the non-transition events still in memory (`next_n` when none):
    /// this history's durable records below it were dropped from memory.
    pub fn first_kept_n(&self) -> u64 {
        self.events.front().map(|(n, _)| *n).unwrap_or(self.next_n)
    }

    /// Appends a transition event.
    pub fn push_transition(&mut self, t: Transition) {
        let n = self.next_n;
        self.next_n += 1;
        let ev = JobEvent {
            seq: 0,
            at_unix_ms: t.at_unix_ms,
            kind: Some(job_event::Kind::Transition(t)),
        };
        self.publish(n, &ev);
        self.transitions.push((n, ev));
    }

    /// Appends any other event (bounded: the oldest non-transition events are dropped, and
    /// the history is no longer complete). Returns the event's `n`.
    pub fn push(&mut self, at_unix_ms: i64, kind: job_event::Kind) -> u64 {
        let n = self.next_n;
        self.next_n += 1;
        let ev = JobEvent {
            seq: 0,
            at_unix_ms,
            kind: Some(kind),
        };
        if self.events.len() >= HISTORY_LIMIT {
            self.events.pop_front();
            self.complete = false;
        }
        self.publish(n, &ev);
        self.events.push_back((n, ev));
        n
    }

    /// Sends an event to the live watchers, if there are any.
    fn publish(&mut self, n: u64, ev: &JobEvent) {
        if let Some(live) = &self.live {
            if live.receiver_count() == 0 {
                self.live = None;
            } else {
                let _ = live.send((n, ev.clone()));
            }
        }
    }

    /// The whole history in order, the last `n` in it, and a receiver of later events.
    pub fn snapshot(
        &mut self,
    ) -> (
        Vec<JobEvent>,
        Option<u64>,
        broadcast::Receiver<(u64, JobEvent)>,
    ) {
        let mut out = Vec::with_capacity(self.transitions.len() + self.events.len());
        let (mut i, mut j) = (0, 0);
        let mut last = None;
        while i < self.transitions.len() || j < self.events.len() {
            let take_t = match (self.transitions.get(i), self.events.get(j)) {
                (Some(t), Some(e)) => t.0 < e.0,
                (Some(_), None) => true,
                _ => false,
            };
            let (n, ev) = if take_t {
                i += 1;
                &self.transitions[i - 1]
            } else {
                j += 1;
                &self.events[j - 1]
            };
            last = Some(*n);
            out.push(ev.clone());
        }
        let rx = match &self.live {
            Some(live) => live.subscribe(),
            None => {
                let (live, rx) = broadcast::channel(LIVE_CHANNEL);
                self.live = Some(live);
                rx
            }
        };
        (out, last, rx)
    }
}

/// A job the coordinator tracks.
#[derive(Debug)]
pub struct JobEntry {
    /// The job as last stored, plus coalesced metric updates when `dirty`.
    pub job: Job,
    /// Metrics changed since the last store write.
    pub dirty: bool,
    /// When the job was last written.
    pub last_flush: Instant,
    /// Rank states of the current attempt.
    pub ranks: HashMap<u32, RankState>,
    /// Watchable history.
    pub history: History,
    /// Loaded as SCHEDULED/RUNNING after a coordinator restart: waiting for its workers to
    /// re-register with its ranks. Ranks found so far are in `adopted`.
    pub orphaned: bool,
    /// Ranks of an orphaned job that came back.
    pub adopted: HashSet<u32>,
    /// Since when the job is terminal (in this process), for evicting its entry.
    pub terminal_since: Option<Instant>,
    /// Records (logs, metrics, results) of this history handed to the durable writer.
    pub durable_sent: u64,
    /// Whether the durable writer was told that the job ended.
    pub durable_finished: bool,
    /// Rendezvous entries the ranks of the current attempt published (ring addresses, the
    /// NCCL id); kept in memory only: after a leader change the attempt's ranks time out
    /// in their rendezvous and the job restarts from its checkpoint.
    pub rendezvous: BTreeMap<String, Vec<u8>>,
    /// Steps per second of the current attempt, from its metric points (for
    /// `trainyard_job_steps_per_second`).
    pub steps: crate::metrics::StepRate,
    /// Whether `trainyard_jobs_finished_total` counted this job (set from the start for a
    /// job that was already terminal when loaded).
    pub counted_finished: bool,
}

impl JobEntry {
    /// Tracks a job read from the store (or just created; see [`JobEntry::submitted`]).
    pub fn new(job: Job) -> Self {
        let terminal = job.state().is_terminal();
        Self {
            history: History::from_job(&job),
            terminal_since: terminal.then(Instant::now),
            job,
            dirty: false,
            last_flush: Instant::now(),
            ranks: HashMap::new(),
            orphaned: false,
            adopted: HashSet::new(),
            durable_sent: 0,
            durable_finished: false,
            rendezvous: BTreeMap::new(),
            steps: crate::metrics::StepRate::default(),
            counted_finished: terminal,
        }
    }

    /// Tracks a job just submitted to this process: its history is complete.
    pub fn submitted(job: Job) -> Self {
        let mut entry = Self::new(job);
        entry.history.mark_complete();
        entry
    }

    /// The job's gang size.
    pub fn world_size(&self) -> u32 {
        self.job.spec.as_ref().map(|s| s.ranks.max(1)).unwrap_or(1)
    }

    /// Applies a lifecycle transition and records it in the history.
    pub fn transition(
        &mut self,
        to: JobState,
        reason: &str,
    ) -> Result<(), crate::lifecycle::LifecycleError> {
        crate::lifecycle::transition(&mut self.job, to, reason, now_unix_ms())?;
        self.after_transition();
        Ok(())
    }

    /// Requeues or fails after a failure (see [`crate::lifecycle::requeue_or_fail`]).
    pub fn requeue_or_fail(
        &mut self,
        reason: &str,
    ) -> Result<JobState, crate::lifecycle::LifecycleError> {
        let s = crate::lifecycle::requeue_or_fail(&mut self.job, reason, now_unix_ms())?;
        self.after_transition();
        Ok(s)
    }

    fn after_transition(&mut self) {
        if let Some(t) = self.job.transitions.last() {
            self.history.push_transition(t.clone());
        }
        // Rank states belong to an attempt: forget them when the attempt ends.
        let state = self.job.state();
        if state == JobState::Pending || state.is_terminal() {
            self.ranks.clear();
            self.rendezvous.clear();
            self.steps.reset();
            self.orphaned = false;
            self.adopted.clear();
        }
        if state.is_terminal() && self.terminal_since.is_none() {
            self.terminal_since = Some(Instant::now());
        }
    }
}

/// Everything mutable the coordinator holds in memory.
#[derive(Debug, Default)]
pub struct State {
    /// Alive workers by id (ordered, so placement is deterministic).
    pub workers: BTreeMap<String, WorkerEntry>,
    /// Recently dead workers (newest last).
    pub dead_workers: VecDeque<Worker>,
    /// Tracked jobs by id.
    pub jobs: HashMap<String, JobEntry>,
    /// After a restart: when orphaned jobs that did not get all their ranks back are requeued.
    pub orphan_deadline: Option<Instant>,
    /// Submissions on their way to the store, by owner (counted against the pending cap).
    pub submitting: HashMap<String, usize>,
}

impl State {
    /// PENDING jobs of `owner`, with their submissions still on the way to the store.
    pub fn pending_of(&self, owner: &str) -> usize {
        let stored = self
            .jobs
            .values()
            .filter(|e| e.job.owner == owner && e.job.state() == JobState::Pending)
            .count();
        stored + self.submitting.get(owner).copied().unwrap_or(0)
    }

    /// The alive workers as the placement function sees them.
    pub fn cluster_view(&self) -> ClusterView {
        ClusterView {
            workers: self
                .workers
                .values()
                .map(|w| WorkerView {
                    id: w.record.id.clone(),
                    slots: w
                        .record
                        .devices
                        .iter()
                        .map(|d| SlotView {
                            index: d.index,
                            kind: d.kind.clone(),
                            busy: w.used.contains_key(&d.index),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// Remembers a dead worker for `ListWorkers(include_dead)`.
    pub fn remember_dead(&mut self, worker: Worker) {
        if self.dead_workers.len() >= DEAD_WORKERS_KEPT {
            self.dead_workers.pop_front();
        }
        self.dead_workers.push_back(worker);
    }
}

/// Sends CancelRank for every rank of the job's current placement (except `except`,
/// a `(worker id, rank)`).
pub fn cancel_ranks(
    workers: &BTreeMap<String, WorkerEntry>,
    job: &Job,
    reason: &str,
    except: Option<(&str, u32)>,
) {
    for p in &job.placement {
        if except == Some((p.worker_id.as_str(), p.rank)) {
            continue;
        }
        if let Some(w) = workers.get(&p.worker_id) {
            w.send(worker_command::Command::Cancel(CancelRank {
                job_id: job.id.clone(),
                attempt: job.attempt,
                rank: p.rank,
                reason: reason.to_string(),
                leader_term: 0,
            }));
        }
    }
}

/// Frees the slot of a rank on a worker; true if it held one.
pub fn release(
    workers: &mut BTreeMap<String, WorkerEntry>,
    worker_id: &str,
    job_id: &str,
    attempt: u32,
    rank: u32,
) -> bool {
    workers
        .get_mut(worker_id)
        .map(|w| w.release(job_id, attempt, rank))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainyard_proto::LogLine;

    #[test]
    fn history_keeps_order_and_transitions_when_bounded() {
        let job = Job {
            transitions: vec![Transition {
                from: 0,
                to: JobState::Pending as i32,
                at_unix_ms: 1,
                reason: "submitted".into(),
            }],
            ..Default::default()
        };
        let mut h = History::from_job(&job);
        for i in 0..(HISTORY_LIMIT + 10) {
            h.push(
                2,
                job_event::Kind::Log(LogLine {
                    rank: 0,
                    stream: "stdout".into(),
                    line: format!("line {i}"),
                }),
            );
        }
        h.push_transition(Transition {
            from: JobState::Pending as i32,
            to: JobState::Cancelled as i32,
            at_unix_ms: 3,
            reason: "x".into(),
        });
        let (events, last, _rx) = h.snapshot();
        assert_eq!(events.len(), HISTORY_LIMIT + 2);
        assert_eq!(last, Some(HISTORY_LIMIT as u64 + 11));
        assert!(matches!(
            events[0].kind,
            Some(job_event::Kind::Transition(_))
        ));
        match &events[1].kind {
            Some(job_event::Kind::Log(l)) => assert_eq!(l.line, "line 10"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            events.last().and_then(|e| e.kind.clone()),
            Some(job_event::Kind::Transition(_))
        ));
    }
}
