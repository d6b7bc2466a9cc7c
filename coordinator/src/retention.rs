//! Checkpoint retention (Determined-style): a job keeps its newest `keep_latest` committed
//! checkpoints plus its best `keep_best` by `best_metric`; the others are deleted.
//!
//! - [`plan`] is the decision, a pure function of the job's checkpoint records, its policy
//!   and the steps that must stay whatever the policy says (`pinned`).
//! - After a checkpoint is recorded, the leader queues the job ([`RetentionQueue`]); a
//!   background task ([`run`]) applies the plan off the state lock: for each checkpoint to
//!   delete, the manifest first (so a half-deleted checkpoint is never taken for a
//!   committed one), then the folder's other objects, then the store record. Every step is
//!   idempotent; a failure is logged and the job is tried again with backoff.
//! - Only records in the index are candidates, and every record is a committed checkpoint,
//!   so an upload in flight (no record yet) is never touched. The newest committed
//!   checkpoint, the one the job points to and any that an unfinished job was started from
//!   (`--from-checkpoint`) are pinned. While the job runs, a candidate whose manifest is
//!   missing or names another attempt than its record is left alone (a newer attempt may be
//!   saving that step again); the run when the job ends takes it.
//! - A checkpoint folder without a manifest that is not in the index (an upload that never
//!   finished) is deleted only when its newest object is older than the orphan age (1 h by
//!   default) and it was not written by the job's current attempt.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use trainyard_objects::{Objects, ObjectsError};
use trainyard_proto::{CheckpointInfo, CheckpointPolicy, Job, JobState};

use crate::coordinator::Coordinator;
use crate::state::now_unix_ms;
use crate::store::StoreError;
use crate::validate::{effective_checkpoint_policy, from_checkpoint};

/// Default age after which a checkpoint folder without a manifest, outside the index and
/// not of the job's current attempt, is deleted.
pub const ORPHAN_CHECKPOINT_AGE: Duration = Duration::from_secs(3600);
/// First retry delay of a failed retention run (doubles up to [`RETRY_MAX`]).
const RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest retry delay of a failed retention run.
const RETRY_MAX: Duration = Duration::from_secs(60);
/// Name of a checkpoint's manifest (written last by the worker).
pub const MANIFEST_FILE: &str = "manifest.json";

/// What [`plan`] decided, as steps in ascending order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionPlan {
    /// Steps to keep.
    pub keep: Vec<u64>,
    /// Steps to delete.
    pub delete: Vec<u64>,
}

/// Decides which of a job's committed checkpoints to keep: the newest `keep_latest` by
/// step (at least 1, so the newest is always kept), the best `keep_best` by the value of
/// `best_metric` in each checkpoint's metrics (higher or lower is better as the policy
/// says; equal values prefer the newer step; a checkpoint without the metric, or with a
/// non-finite value, is never among the best), and every `pinned` step. Zero fields of
/// `policy` are taken as given: pass [`effective_checkpoint_policy`]'s result.
pub fn plan(
    checkpoints: &[CheckpointInfo],
    policy: &CheckpointPolicy,
    pinned: &BTreeSet<u64>,
) -> RetentionPlan {
    let steps: BTreeSet<u64> = checkpoints.iter().map(|c| c.step).collect();
    let mut keep: BTreeSet<u64> = steps
        .iter()
        .rev()
        .take(policy.keep_latest.max(1) as usize)
        .copied()
        .collect();
    if policy.keep_best > 0 && !policy.best_metric.is_empty() {
        // One value per step (a step recorded twice: the last record wins).
        let mut scored: BTreeMap<u64, f64> = BTreeMap::new();
        for c in checkpoints {
            match c.metrics.get(&policy.best_metric) {
                Some(v) if v.is_finite() => {
                    scored.insert(c.step, *v);
                }
                _ => {
                    scored.remove(&c.step);
                }
            }
        }
        let mut ranked: Vec<(u64, f64)> = scored.into_iter().collect();
        ranked.sort_by(|a, b| {
            let by_value = if policy.higher_is_better {
                b.1.total_cmp(&a.1)
            } else {
                a.1.total_cmp(&b.1)
            };
            by_value.then(b.0.cmp(&a.0))
        });
        keep.extend(
            ranked
                .iter()
                .take(policy.keep_best as usize)
                .map(|(s, _)| *s),
        );
    }
    keep.extend(pinned.iter().filter(|s| steps.contains(s)));
    RetentionPlan {
        delete: steps.difference(&keep).copied().collect(),
        keep: keep.into_iter().collect(),
    }
}

/// Why a retention run failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The object store failed.
    #[error(transparent)]
    Objects(#[from] ObjectsError),
}

/// What one retention run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionOutcome {
    /// Checkpoints deleted (objects and record).
    pub deleted: Vec<u64>,
    /// Candidates left alone this time (rewritten by an attempt that still runs).
    pub skipped: Vec<u64>,
    /// Orphan folders (no manifest, not in the index) deleted.
    pub orphans_deleted: Vec<String>,
}

/// Where the leader queues jobs whose checkpoints need a retention run.
#[derive(Debug, Clone)]
pub struct RetentionQueue {
    tx: mpsc::UnboundedSender<String>,
}

impl RetentionQueue {
    /// A queue and the receiver [`run`] takes.
    pub fn new() -> (RetentionQueue, mpsc::UnboundedReceiver<String>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (RetentionQueue { tx }, rx)
    }

    /// Asks for a retention run of `job_id` (never blocks).
    pub fn request(&self, job_id: &str) {
        if self.tx.send(job_id.to_string()).is_err() {
            tracing::debug!(job_id = %job_id, "retention task stopped; run not queued");
        }
    }
}

/// The retention task: runs queued jobs one at a time, retrying failures with backoff,
/// until `shutdown` turns true or the queue closes.
pub async fn run(
    coord: Arc<Coordinator>,
    mut rx: mpsc::UnboundedReceiver<String>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Job id -> (when to run, failures so far).
    let mut due: HashMap<String, (Instant, u32)> = HashMap::new();
    loop {
        let next = due.values().map(|(t, _)| *t).min();
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(job_id) => {
                    let now = Instant::now();
                    due.entry(job_id).and_modify(|d| d.0 = now).or_insert((now, 0));
                }
                None => break,
            },
            _ = async {
                match next {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            } => {
                let now = Instant::now();
                let ready: Vec<String> = due
                    .iter()
                    .filter(|(_, (t, _))| *t <= now)
                    .map(|(id, _)| id.clone())
                    .collect();
                for job_id in ready {
                    match coord.apply_retention(&job_id).await {
                        Ok(out) => {
                            due.remove(&job_id);
                            if !out.deleted.is_empty() || !out.orphans_deleted.is_empty() {
                                tracing::info!(job_id = %job_id, deleted = ?out.deleted, orphans = ?out.orphans_deleted, "checkpoint retention");
                            }
                        }
                        Err(e) => {
                            let failures = due.get(&job_id).map(|d| d.1 + 1).unwrap_or(1);
                            let delay = RETRY_MIN
                                .saturating_mul(1 << (failures - 1).min(10))
                                .min(RETRY_MAX);
                            tracing::warn!(job_id = %job_id, error = %e, failures, "checkpoint retention failed; retrying in {delay:?}");
                            due.insert(job_id, (Instant::now() + delay, failures));
                        }
                    }
                }
            },
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    break;
                }
            }
        }
    }
    tracing::debug!("retention task stopped");
}

/// The `attempt` a manifest names, if it parses.
fn manifest_attempt(bytes: &[u8]) -> Option<u32> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    v.get("attempt")?
        .as_u64()
        .and_then(|a| u32::try_from(a).ok())
}

/// When the job's current attempt was scheduled (ms), if one runs now.
fn current_attempt_started(job: &Job) -> Option<i64> {
    if !matches!(job.state(), JobState::Scheduled | JobState::Running) {
        return None;
    }
    job.transitions
        .iter()
        .rev()
        .find(|t| t.to() == JobState::Scheduled)
        .map(|t| t.at_unix_ms)
}

impl Coordinator {
    /// One retention run for `job_id` (see the module docs). Does nothing on a coordinator
    /// that does not lead or has no object store.
    pub async fn apply_retention(&self, job_id: &str) -> Result<RetentionOutcome, RetentionError> {
        let mut out = RetentionOutcome::default();
        let Some(objects) = self.objects.as_ref() else {
            return Ok(out);
        };
        if !self.is_leader() {
            return Ok(out);
        }
        // The job as the leader sees it, and the steps unfinished jobs were started from.
        let (job, mut pinned) = {
            let st = self.state.lock().await;
            let pins: BTreeSet<u64> = st
                .jobs
                .values()
                .filter(|e| !e.job.state().is_terminal())
                .filter_map(|e| e.job.spec.as_ref().and_then(from_checkpoint))
                .filter(|r| r.job_id == job_id)
                .map(|r| r.step)
                .collect();
            (st.jobs.get(job_id).map(|e| e.job.clone()), pins)
        };
        let job = match job {
            Some(j) => j,
            None => match self.store.get_job(job_id).await? {
                Some(j) => j,
                None => return Ok(out),
            },
        };
        let policy = effective_checkpoint_policy(&job.spec.clone().unwrap_or_default());
        let records = self.store.list_checkpoints(job_id).await?;
        if let Some(cp) = &job.latest_checkpoint {
            if cp.job_id == job_id {
                pinned.insert(cp.step);
            }
        }
        let decision = plan(&records, &policy, &pinned);
        let running = !job.state().is_terminal();
        let by_step: HashMap<u64, &CheckpointInfo> = records.iter().map(|c| (c.step, c)).collect();
        for step in &decision.delete {
            let Some(record) = by_step.get(step) else {
                continue;
            };
            if !self.is_leader() {
                return Ok(out);
            }
            let dir = format!("jobs/{job_id}/checkpoints/{step}");
            if !record.path.is_empty() && record.path.trim_end_matches('/') != dir {
                tracing::warn!(job_id = %job_id, step, path = %record.path, "checkpoint record names an unexpected folder; retention leaves it alone");
                out.skipped.push(*step);
                continue;
            }
            let manifest = format!("{dir}/{MANIFEST_FILE}");
            if running {
                // A newer attempt that saves this step again first removes the old
                // manifest, then uploads, then writes its own: while the job runs, a
                // missing manifest or one of another attempt means an upload may be in
                // flight here. Left for a later run (at the latest, the one when the job
                // ends).
                let rewritten = match objects.get(&manifest).await? {
                    Some(got) => manifest_attempt(&got.bytes).is_some_and(|a| a != record.attempt),
                    None => true,
                };
                if rewritten {
                    tracing::debug!(job_id = %job_id, step, "checkpoint may be rewritten by another attempt; not deleting it now");
                    out.skipped.push(*step);
                    continue;
                }
            }
            objects.delete(&manifest).await?;
            objects.delete_prefix(&dir).await?;
            self.store.delete_checkpoint(job_id, *step).await?;
            out.deleted.push(*step);
        }
        let indexed: BTreeSet<u64> = records
            .iter()
            .map(|c| c.step)
            .filter(|s| !out.deleted.contains(s))
            .collect();
        out.orphans_deleted = self.clean_orphan_folders(objects, &job, &indexed).await?;
        Ok(out)
    }

    /// Deletes the job's checkpoint folders that have no manifest, are not in the index,
    /// are older than the orphan age and were not written by its current attempt.
    async fn clean_orphan_folders(
        &self,
        objects: &Objects,
        job: &Job,
        indexed: &BTreeSet<u64>,
    ) -> Result<Vec<String>, RetentionError> {
        let root = format!("jobs/{}/checkpoints", job.id);
        // Folder -> (has a manifest, newest object's time).
        let mut folders: BTreeMap<String, (bool, i64)> = BTreeMap::new();
        for o in objects.list(&root).await? {
            let Some(rest) = o.path.strip_prefix(&format!("{root}/")) else {
                continue;
            };
            let Some((folder, file)) = rest.split_once('/') else {
                continue;
            };
            let entry = folders
                .entry(folder.to_string())
                .or_insert((false, i64::MIN));
            entry.0 |= file == MANIFEST_FILE;
            entry.1 = entry.1.max(o.last_modified_unix_ms);
        }
        let now = now_unix_ms();
        let age =
            i64::try_from(self.settings.orphan_checkpoint_age.as_millis()).unwrap_or(i64::MAX);
        let current = current_attempt_started(job);
        let mut deleted = Vec::new();
        for (folder, (has_manifest, newest)) in folders {
            let Ok(step) = folder.parse::<u64>() else {
                continue;
            };
            if has_manifest || indexed.contains(&step) {
                continue;
            }
            let old_enough = now.saturating_sub(newest) >= age;
            let of_current_attempt = current.is_some_and(|started| newest >= started);
            if !old_enough || of_current_attempt {
                continue;
            }
            if !self.is_leader() {
                break;
            }
            let dir = format!("{root}/{folder}");
            objects.delete_prefix(&dir).await?;
            deleted.push(dir);
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp(step: u64, metric: Option<f64>) -> CheckpointInfo {
        CheckpointInfo {
            job_id: "job-1".into(),
            step,
            path: format!("jobs/job-1/checkpoints/{step}"),
            created_unix_ms: step as i64,
            attempt: 1,
            metrics: metric
                .map(|v| [("acc".to_string(), v)].into())
                .unwrap_or_default(),
        }
    }

    fn policy(keep_latest: u32, keep_best: u32, higher: bool) -> CheckpointPolicy {
        CheckpointPolicy {
            keep_latest,
            keep_best,
            best_metric: if keep_best > 0 {
                "acc".into()
            } else {
                String::new()
            },
            higher_is_better: higher,
            commit_timeout_s: 600,
        }
    }

    fn none() -> BTreeSet<u64> {
        BTreeSet::new()
    }

    #[test]
    fn keeps_exactly_the_latest_n_and_the_best_m() {
        let accs = [0.5, 0.9, 0.7, 0.95, 0.6, 0.8, 0.3, 0.4];
        let cps: Vec<CheckpointInfo> = accs
            .iter()
            .enumerate()
            .map(|(i, a)| cp(i as u64 + 1, Some(*a)))
            .collect();
        let p = plan(&cps, &policy(2, 2, true), &none());
        assert_eq!(p.keep, [2, 4, 7, 8], "latest 7, 8; best 4 (0.95), 2 (0.9)");
        assert_eq!(p.delete, [1, 3, 5, 6]);
        // Lower is better: the best are 7 (0.3) and 8 (0.4), already the latest.
        let p = plan(&cps, &policy(2, 2, false), &none());
        assert_eq!(p.keep, [7, 8]);
        assert_eq!(p.delete, [1, 2, 3, 4, 5, 6]);
        // Latest only.
        let p = plan(&cps, &policy(3, 0, true), &none());
        assert_eq!(p.keep, [6, 7, 8]);
        // More kept than there are: nothing deleted.
        let p = plan(&cps, &policy(100, 0, true), &none());
        assert!(p.delete.is_empty());
        // Records in any order give the same answer.
        let mut shuffled = cps.clone();
        shuffled.reverse();
        shuffled.swap(0, 5);
        assert_eq!(
            plan(&shuffled, &policy(2, 2, true), &none()).keep,
            [2, 4, 7, 8]
        );
    }

    #[test]
    fn the_newest_is_always_kept() {
        let cps = vec![cp(1, Some(0.9)), cp(2, Some(0.1))];
        // keep_latest 0 still keeps one; the best (step 1) too.
        let p = plan(&cps, &policy(0, 1, true), &none());
        assert_eq!(p.keep, [1, 2]);
        assert!(plan(&[], &policy(1, 1, true), &none()) == RetentionPlan::default());
    }

    #[test]
    fn ties_prefer_the_newer_checkpoint() {
        let cps = vec![
            cp(1, Some(0.8)),
            cp(2, Some(0.8)),
            cp(3, Some(0.8)),
            cp(4, Some(0.1)),
        ];
        let p = plan(&cps, &policy(1, 1, true), &none());
        assert_eq!(p.keep, [3, 4]);
        let p = plan(&cps, &policy(1, 2, true), &none());
        assert_eq!(p.keep, [2, 3, 4]);
    }

    #[test]
    fn a_missing_or_non_finite_metric_is_never_best() {
        let cps = vec![
            cp(1, None),
            cp(2, Some(f64::NAN)),
            cp(3, Some(f64::INFINITY)),
            cp(4, Some(0.2)),
            cp(5, None),
        ];
        // The best by acc among 4 only; 5 is the latest.
        let p = plan(&cps, &policy(1, 2, true), &none());
        assert_eq!(p.keep, [4, 5]);
        assert_eq!(p.delete, [1, 2, 3]);
        // Nobody has the metric: the latest only.
        let cps = vec![cp(1, None), cp(2, None), cp(3, None)];
        let p = plan(&cps, &policy(1, 2, true), &none());
        assert_eq!(p.keep, [3]);
        // A metric name no checkpoint has.
        let mut other = policy(1, 2, true);
        other.best_metric = "loss".into();
        let cps = vec![cp(1, Some(0.9)), cp(2, Some(0.1))];
        assert_eq!(plan(&cps, &other, &none()).keep, [2]);
    }

    #[test]
    fn pinned_steps_stay_and_unknown_pins_are_ignored() {
        let cps: Vec<CheckpointInfo> = (1..=5).map(|s| cp(s, None)).collect();
        let pinned: BTreeSet<u64> = [2, 99].into();
        let p = plan(&cps, &policy(1, 0, true), &pinned);
        assert_eq!(p.keep, [2, 5]);
        assert_eq!(p.delete, [1, 3, 4]);
    }

    #[test]
    fn a_step_recorded_twice_counts_once_with_its_last_metrics() {
        let cps = vec![
            cp(1, Some(0.9)),
            cp(2, Some(0.1)),
            cp(1, Some(0.0)),
            cp(3, None),
        ];
        let p = plan(&cps, &policy(1, 1, true), &none());
        assert_eq!(p.keep, [2, 3], "step 1's last record scores 0.0");
    }

    #[test]
    fn manifest_attempts_and_current_attempts() {
        assert_eq!(manifest_attempt(br#"{"attempt": 3, "step": 1}"#), Some(3));
        assert_eq!(manifest_attempt(b"{}"), None);
        assert_eq!(manifest_attempt(b"not json"), None);
        let mut job = Job {
            state: JobState::Running as i32,
            transitions: vec![
                trainyard_proto::Transition {
                    from: 0,
                    to: JobState::Scheduled as i32,
                    at_unix_ms: 10,
                    reason: String::new(),
                },
                trainyard_proto::Transition {
                    from: 0,
                    to: JobState::Scheduled as i32,
                    at_unix_ms: 20,
                    reason: String::new(),
                },
                trainyard_proto::Transition {
                    from: 0,
                    to: JobState::Running as i32,
                    at_unix_ms: 30,
                    reason: String::new(),
                },
            ],
            ..Default::default()
        };
        assert_eq!(current_attempt_started(&job), Some(20));
        job.state = JobState::Succeeded as i32;
        assert_eq!(current_attempt_started(&job), None);
    }
}
