//! The worker agent: registers with the coordinator, heartbeats, receives rank
//! assignments and cancellations, and supervises one child process per rank.
//!
//! * [`session`]: registration, heartbeats and the command stream (reconnecting and
//!   re-registering as needed).
//! * [`supervisor`]: the life of one rank process (spawn, output, cancel, exit).
//! * [`reporter`]: batches a rank's events into `ReportRank` calls.

mod coordinators;
mod reporter;
mod session;
mod supervisor;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::Instrument;
use trainyard_proto::{
    CancelRank, Device, RankAssignment, RankState, RankStatus, RendezvousEntry, RendezvousUpdate,
};

use crate::WorkerError;

/// Grace period between SIGTERM and SIGKILL when an assignment does not set one.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(10);

/// How a worker agent is set up.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Coordinator URL, e.g. `http://127.0.0.1:7800`, or a comma-separated list of them
    /// (several coordinators, one leader: the agent finds the leader by itself).
    pub coordinator_url: String,
    /// Name the worker registers under.
    pub name: String,
    /// Device slots advertised (see [`crate::parse_devices`]).
    pub devices: Vec<Device>,
    /// CUDA ordinal of each real GPU slot, by slot index (see
    /// [`crate::devices::DeviceSlots`]); a rank placed on one trains on that GPU. Empty
    /// without real GPUs.
    pub cuda_ordinals: BTreeMap<u32, u32>,
    /// Scratch space; each rank runs in a folder under `<work_dir>/ranks/`.
    pub work_dir: PathBuf,
    /// Program and arguments that start a rank process, e.g. `[current_exe, "rank"]`.
    pub rank_command: Vec<OsString>,
    /// Host name or IP address the ranks of other workers reach this worker's ranks at
    /// (their TCP ring listeners); see [`crate::collective_host_for`].
    pub collective_host: String,
    /// Where to serve Prometheus metrics (`GET /metrics`, see [`crate::metrics`]); port 0
    /// picks a free one (logged). `None`: not served.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The join token presented on every call to the coordinator (`None`: a coordinator
    /// without authentication).
    pub join_token: Option<String>,
    /// TLS files for `https://` coordinator addresses: the CA to trust and, for mutual
    /// TLS, this worker's certificate and key.
    pub tls: trainyard_auth::tls::ClientTlsFiles,
}

/// Identity of one rank process.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct RankKey {
    pub job_id: String,
    pub attempt: u32,
    pub rank: u32,
}

impl std::fmt::Display for RankKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/attempt-{}/rank-{}",
            self.job_id, self.attempt, self.rank
        )
    }
}

/// Why a rank is being stopped by the agent.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum StopReason {
    /// The coordinator sent `CancelRank`.
    Cancel(String),
    /// The coordinator rejected a report: this attempt is stale.
    Stale,
    /// A newer attempt of the same rank was assigned.
    Superseded(u32),
    /// The worker is shutting down.
    Shutdown,
}

/// A rank the agent is supervising.
struct RankEntry {
    device_index: u32,
    /// A `RankState` as i32.
    state: Arc<AtomicI32>,
    stop: watch::Sender<Option<StopReason>>,
    grace: Duration,
    /// Rendezvous entries for the rank process (written to its stdin by its supervisor).
    inbox: mpsc::UnboundedSender<RendezvousEntry>,
}

/// Assignments seen recently that have finished, so replays are ignored.
#[derive(Default)]
struct Finished {
    order: VecDeque<RankKey>,
    set: HashSet<RankKey>,
}

const FINISHED_MEMORY: usize = 4096;

/// State shared by the agent's tasks.
pub(crate) struct Agent {
    config: WorkerConfig,
    coordinators: coordinators::Coordinators,
    /// The highest leader term seen on a command (the fencing token).
    max_term: AtomicU64,
    worker_id: watch::Sender<String>,
    ranks: Mutex<HashMap<RankKey, RankEntry>>,
    finished: Mutex<Finished>,
    shutting_down: AtomicBool,
    /// What the `/metrics` endpoint shows (kept even when it is not served).
    pub(crate) metrics: Arc<crate::metrics::WorkerMetrics>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Runs a worker agent until `shutdown` completes; then stops every rank gracefully
/// (SIGTERM, SIGKILL after its grace period) and returns.
///
/// The agent registers with the coordinator (retrying with backoff until it is up),
/// heartbeats, re-registers when the coordinator no longer knows it, and keeps the command
/// stream open. A rank that crashes never takes the worker down.
pub async fn run_worker(
    config: WorkerConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), WorkerError> {
    if config.rank_command.is_empty() {
        return Err(WorkerError::InvalidConfig("rank_command is empty".into()));
    }
    if config.devices.is_empty() {
        return Err(WorkerError::InvalidConfig("no devices to advertise".into()));
    }
    std::fs::create_dir_all(config.work_dir.join("ranks"))?;
    let coordinators = coordinators::Coordinators::new(
        &config.coordinator_url,
        config.join_token.as_deref(),
        &config.tls,
    )?;
    let agent = Arc::new(Agent {
        config,
        coordinators,
        max_term: AtomicU64::new(0),
        worker_id: watch::channel(String::new()).0,
        ranks: Mutex::new(HashMap::new()),
        finished: Mutex::new(Finished::default()),
        shutting_down: AtomicBool::new(false),
        metrics: Arc::new(crate::metrics::WorkerMetrics::new()),
    });
    // The endpoint is bound before anything else, so a busy port fails the start.
    let metrics_server = match agent.config.metrics_listen {
        Some(addr) => {
            let (listener, bound) = crate::metrics::bind(addr)
                .await
                .map_err(|source| WorkerError::MetricsBind { addr, source })?;
            tracing::info!(addr = %bound, "metrics endpoint listening (GET /metrics)");
            let counting = agent.clone();
            let source = crate::metrics::Source {
                metrics: agent.metrics.clone(),
                ranks: Arc::new(move || counting.rank_counts()),
            };
            Some(tokio::spawn(crate::metrics::serve(listener, source)))
        }
        None => None,
    };
    tracing::info!(
        coordinator = %agent.config.coordinator_url,
        name = %agent.config.name,
        devices = agent.config.devices.len(),
        "worker starting"
    );
    tokio::select! {
        _ = session::run_sessions(agent.clone()) => {}
        _ = shutdown => {
            tracing::info!("worker shutting down");
        }
    }
    agent.stop_all().await;
    if let Some(server) = metrics_server {
        server.abort();
    }
    Ok(())
}

impl Agent {
    /// The coordinators (the current one, switching on failures).
    pub(crate) fn coordinators(&self) -> &coordinators::Coordinators {
        &self.coordinators
    }

    /// Fencing: false (and logged) for a command from a leader older than one already
    /// seen; otherwise remembers its term.
    fn fenced_ok(&self, term: u64, what: &str, job_id: &str, rank: u32) -> bool {
        let seen = self.max_term.fetch_max(term, Ordering::SeqCst);
        if term < seen {
            tracing::warn!(
                term,
                highest_term = seen,
                job_id,
                rank,
                "ignoring {what} from a deposed leader (stale term)"
            );
            return false;
        }
        true
    }

    /// Rank processes supervised now, by state (for the metrics endpoint).
    fn rank_counts(&self) -> crate::metrics::RankCounts {
        let mut counts = crate::metrics::RankCounts::default();
        for entry in lock(&self.ranks).values() {
            match RankState::try_from(entry.state.load(Ordering::SeqCst)) {
                Ok(RankState::Starting) => counts.starting += 1,
                Ok(RankState::Running) => counts.running += 1,
                _ => {}
            }
        }
        counts
    }

    pub(crate) fn worker_id(&self) -> String {
        self.worker_id.borrow().clone()
    }

    /// Status of every rank the agent supervises: starting or running, or ended with its
    /// exit not yet delivered to the coordinator (so that a new leader keeps its job).
    pub(crate) fn running(&self) -> Vec<RankStatus> {
        lock(&self.ranks)
            .iter()
            .filter_map(|(key, entry)| {
                let state = entry.state.load(Ordering::SeqCst);
                let known = state != RankState::Unspecified as i32;
                known.then(|| RankStatus {
                    job_id: key.job_id.clone(),
                    attempt: key.attempt,
                    rank: key.rank,
                    state,
                    device_index: entry.device_index,
                })
            })
            .collect()
    }

    /// Starts a rank for `assignment`, unless it is a duplicate or stale.
    pub(crate) fn assign(self: &Arc<Self>, assignment: RankAssignment) {
        let key = RankKey {
            job_id: assignment.job_id.clone(),
            attempt: assignment.attempt,
            rank: assignment.rank,
        };
        if !self.fenced_ok(assignment.leader_term, "assignment", &key.job_id, key.rank) {
            return;
        }
        if self.shutting_down.load(Ordering::SeqCst) {
            tracing::info!(job_id = %key.job_id, attempt = key.attempt, rank = key.rank, "ignoring assignment: worker is shutting down");
            return;
        }
        if lock(&self.finished).set.contains(&key) {
            tracing::info!(job_id = %key.job_id, attempt = key.attempt, rank = key.rank, "ignoring assignment of a rank that already ran");
            return;
        }
        let (stop_tx, stop_rx) = watch::channel(None);
        let (inbox_tx, inbox_rx) = mpsc::unbounded_channel();
        let state = Arc::new(AtomicI32::new(RankState::Starting as i32));
        {
            let mut ranks = lock(&self.ranks);
            if ranks.contains_key(&key) {
                tracing::info!(job_id = %key.job_id, attempt = key.attempt, rank = key.rank, "ignoring duplicate assignment of a running rank");
                return;
            }
            let newer = ranks
                .keys()
                .any(|k| k.job_id == key.job_id && k.rank == key.rank && k.attempt > key.attempt);
            if newer {
                tracing::info!(job_id = %key.job_id, attempt = key.attempt, rank = key.rank, "ignoring stale assignment: a newer attempt is running");
                return;
            }
            for (k, entry) in ranks.iter() {
                if k.job_id == key.job_id && k.rank == key.rank {
                    tracing::info!(old = %k, new = %key, "newer attempt assigned; stopping the old one");
                    entry
                        .stop
                        .send_replace(Some(StopReason::Superseded(key.attempt)));
                }
            }
            let grace = match assignment.grace_period_s {
                0 => DEFAULT_GRACE_PERIOD,
                s => Duration::from_secs(s as u64),
            };
            ranks.insert(
                key.clone(),
                RankEntry {
                    device_index: assignment.device_index,
                    state: state.clone(),
                    stop: stop_tx,
                    grace,
                    inbox: inbox_tx,
                },
            );
        }
        if !self
            .config
            .devices
            .iter()
            .any(|d| d.index == assignment.device_index)
        {
            tracing::warn!(job_id = %key.job_id, attempt = key.attempt, rank = key.rank, device = assignment.device_index, "assignment names a device slot this worker does not have");
        }
        tracing::info!(job_id = %key.job_id, attempt = key.attempt, rank = key.rank, job = %assignment.job, device = assignment.device_index, "rank assigned");
        let agent = self.clone();
        // Every log event about this rank carries its job id, attempt and rank (as the
        // span's fields; `--log-format json` writes them under "span").
        let span = tracing::info_span!(
            "rank",
            job_id = %key.job_id,
            attempt = key.attempt,
            rank = key.rank
        );
        tokio::spawn(
            async move {
                let channels = supervisor::Channels {
                    stop: stop_rx,
                    inbox: inbox_rx,
                };
                supervisor::supervise(agent.clone(), key.clone(), assignment, state, channels)
                    .await;
                agent.forget(&key);
            }
            .instrument(span),
        );
    }

    /// Stops the ranks a `CancelRank` names (attempt 0 = any attempt).
    pub(crate) fn cancel(&self, cancel: &CancelRank) {
        if !self.fenced_ok(cancel.leader_term, "cancel", &cancel.job_id, cancel.rank) {
            return;
        }
        let ranks = lock(&self.ranks);
        let mut found = false;
        for (k, entry) in ranks.iter() {
            if k.job_id == cancel.job_id
                && k.rank == cancel.rank
                && (cancel.attempt == 0 || k.attempt == cancel.attempt)
            {
                found = true;
                tracing::info!(job_id = %k.job_id, attempt = k.attempt, rank = k.rank, reason = %cancel.reason, "cancelling rank");
                let reason = if cancel.reason.is_empty() {
                    "cancelled".to_string()
                } else {
                    cancel.reason.clone()
                };
                entry.stop.send_replace(Some(StopReason::Cancel(reason)));
            }
        }
        if !found {
            tracing::debug!(job_id = %cancel.job_id, rank = cancel.rank, "cancel for a rank not running here");
        }
    }

    /// Hands rendezvous entries of a job attempt to its ranks of exactly that attempt on
    /// this worker (the coordinator sends them only where the attempt runs; ranks of other
    /// attempts never see them).
    pub(crate) fn rendezvous(&self, update: RendezvousUpdate) {
        if !self.fenced_ok(update.leader_term, "rendezvous", &update.job_id, 0) {
            return;
        }
        let ranks = lock(&self.ranks);
        let mut delivered = 0;
        for (k, entry) in ranks.iter() {
            if k.job_id == update.job_id && k.attempt == update.attempt {
                for e in &update.entries {
                    let _ = entry.inbox.send(e.clone());
                }
                delivered += 1;
            }
        }
        tracing::debug!(job_id = %update.job_id, attempt = update.attempt, entries = update.entries.len(), ranks = delivered, "rendezvous update");
    }

    /// Stops one rank (used when the coordinator rejects its reports).
    pub(crate) fn stop_rank(&self, key: &RankKey, reason: StopReason) {
        if let Some(entry) = lock(&self.ranks).get(key) {
            entry.stop.send_if_modified(|r| {
                if r.is_none() {
                    *r = Some(reason);
                    true
                } else {
                    false
                }
            });
        }
    }

    fn forget(&self, key: &RankKey) {
        lock(&self.ranks).remove(key);
        let mut finished = lock(&self.finished);
        if finished.set.insert(key.clone()) {
            finished.order.push_back(key.clone());
            while finished.order.len() > FINISHED_MEMORY {
                if let Some(old) = finished.order.pop_front() {
                    finished.set.remove(&old);
                }
            }
        }
    }

    /// Stops every rank gracefully and waits for them (and their last reports), bounded
    /// by the longest grace period plus a few seconds.
    async fn stop_all(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let max_grace = {
            let ranks = lock(&self.ranks);
            for entry in ranks.values() {
                entry.stop.send_if_modified(|r| {
                    if r.is_none() {
                        *r = Some(StopReason::Shutdown);
                        true
                    } else {
                        false
                    }
                });
            }
            ranks.values().map(|e| e.grace).max().unwrap_or_default()
        };
        let deadline = tokio::time::Instant::now() + max_grace + Duration::from_secs(5);
        while !lock(&self.ranks).is_empty() {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!("ranks still running at shutdown deadline");
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// This machine's host name.
pub(crate) fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests;
