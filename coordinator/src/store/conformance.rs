//! The conformance suite every [`StateStore`] backend must pass.
//!
//! A backend's tests invoke [`store_conformance_tests!`](crate::store_conformance_tests)
//! with an expression that makes a fresh store plus a context value (e.g. a temp dir),
//! and a closure that reopens the store from that context after the first one is dropped
//! (returning `None` for backends that do not persist):
//!
//! ```ignore
//! crate::store_conformance_tests!(
//!     { let dir = tempfile::tempdir()?; let p = dir.path().join("s.redb");
//!       (EmbeddedStore::open(&p)?, (dir, p)) },
//!     |ctx: &(tempfile::TempDir, PathBuf)| Some(EmbeddedStore::open(&ctx.1).unwrap())
//! );
//! ```

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use trainyard_proto::{CheckpointInfo, Job, JobSpec, JobState, Worker};

use super::{ChangeKind, JobQuery, StateStore, StoreError};

/// A minimal job record for the suite.
pub fn job(id: &str, state: JobState) -> Job {
    Job {
        id: id.to_string(),
        spec: Some(JobSpec {
            job: "neural-ode".into(),
            ranks: 1,
            ..Default::default()
        }),
        state: state as i32,
        created_unix_ms: 1,
        ..Default::default()
    }
}

/// Create, get, duplicate create, missing get.
pub async fn create_and_get<S: StateStore>(s: &S) {
    let stored = s.create_job(job("job-1", JobState::Pending)).await.unwrap();
    assert!(stored.revision > 0, "create fills in the revision");
    assert_eq!(stored.record_version, super::JOB_RECORD_VERSION);
    let got = s.get_job("job-1").await.unwrap().expect("job exists");
    assert_eq!(got, stored);
    let dup = s.create_job(job("job-1", JobState::Running)).await;
    assert_eq!(dup, Err(StoreError::AlreadyExists("job-1".into())));
    assert_eq!(
        s.get_job("job-1").await.unwrap(),
        Some(stored),
        "dup changed nothing"
    );
    assert_eq!(s.get_job("job-404").await.unwrap(), None);
}

/// Compare-and-set: success bumps the revision; a stale revision is a typed conflict.
pub async fn cas_conflict<S: StateStore>(s: &S) {
    let v1 = s.create_job(job("job-c", JobState::Pending)).await.unwrap();
    let mut next = v1.clone();
    next.state = JobState::Scheduled as i32;
    let v2 = s.update_job(next, v1.revision).await.unwrap();
    assert!(v2.revision > v1.revision);
    assert_eq!(v2.state(), JobState::Scheduled);
    let mut stale = v1.clone();
    stale.state = JobState::Cancelled as i32;
    let err = s.update_job(stale, v1.revision).await.unwrap_err();
    assert_eq!(
        err,
        StoreError::Conflict {
            id: "job-c".into(),
            expected: v1.revision,
            actual: v2.revision
        }
    );
    assert_eq!(s.get_job("job-c").await.unwrap(), Some(v2));
    let missing = s.update_job(job("job-none", JobState::Pending), 1).await;
    assert_eq!(missing, Err(StoreError::NotFound("job-none".into())));
}

/// Many tasks create jobs at once, several with the same id: every distinct id is created
/// exactly once, the others get `AlreadyExists`, and every stored job has its own revision.
pub async fn concurrent_creates_exactly_once<S: StateStore>(s: Arc<S>) {
    let mut handles = Vec::new();
    for t in 0..16u32 {
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            let mut created = Vec::new();
            for i in 0..10u32 {
                // ids 0..40: each is attempted by four tasks
                let id = format!("job-cc-{:03}", (t % 4) * 10 + i);
                match s.create_job(job(&id, JobState::Pending)).await {
                    Ok(j) => created.push(j),
                    Err(StoreError::AlreadyExists(_)) => {}
                    Err(e) => panic!("unexpected error {e}"),
                }
            }
            created
        }));
    }
    let mut created = Vec::new();
    for h in handles {
        created.extend(h.await.unwrap());
    }
    let mut ids: Vec<&str> = created.iter().map(|j| j.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(created.len(), 40, "each id created exactly once");
    assert_eq!(ids.len(), 40);
    // Concurrent creates may share a revision (etcd: one batched transaction), but every
    // create has one, and it is the stored job's.
    assert!(
        created.iter().all(|j| j.revision > 0),
        "every create has a revision"
    );
    for j in &created {
        let stored = s
            .get_job(&j.id)
            .await
            .unwrap()
            .expect("created job is stored");
        assert_eq!(stored.revision, j.revision);
    }
}

/// Several tasks increment a counter in one job with CAS retries: no update is lost.
pub async fn concurrent_cas_no_lost_update<S: StateStore>(s: Arc<S>) {
    s.create_job(job("job-n", JobState::Running)).await.unwrap();
    let tasks = 6u64;
    let per_task = 20u64;
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            let mut conflicts = 0u64;
            for _ in 0..per_task {
                loop {
                    let mut j = s.get_job("job-n").await.unwrap().unwrap();
                    let rev = j.revision;
                    j.latest_step += 1;
                    match s.update_job(j, rev).await {
                        Ok(_) => break,
                        Err(StoreError::Conflict { .. }) => conflicts += 1,
                        Err(e) => panic!("unexpected error {e}"),
                    }
                }
            }
            conflicts
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let j = s.get_job("job-n").await.unwrap().unwrap();
    assert_eq!(j.latest_step, tasks * per_task, "an update was lost");
}

/// Filter by state and page through the result in id order.
pub async fn list_filter_and_paging<S: StateStore>(s: &S) {
    for i in 0..25 {
        let state = if i % 3 == 0 {
            JobState::Running
        } else {
            JobState::Pending
        };
        s.create_job(job(&format!("job-{i:03}"), state))
            .await
            .unwrap();
    }
    // Page through everything, 10 at a time.
    let mut seen = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let page = s
            .list_jobs(&JobQuery {
                states: vec![],
                limit: 10,
                after: after.clone(),
            })
            .await
            .unwrap();
        pages += 1;
        assert!(page.jobs.len() <= 10);
        seen.extend(page.jobs.iter().map(|j| j.id.clone()));
        match page.next_after {
            Some(a) => after = Some(a),
            None => break,
        }
        assert!(pages < 10, "paging does not terminate");
    }
    let expected: Vec<String> = (0..25).map(|i| format!("job-{i:03}")).collect();
    assert_eq!(seen, expected);
    assert_eq!(pages, 3);
    // Filter.
    let running = s
        .list_jobs(&JobQuery {
            states: vec![JobState::Running],
            ..Default::default()
        })
        .await
        .unwrap();
    let ids: Vec<String> = running.jobs.iter().map(|j| j.id.clone()).collect();
    let expected: Vec<String> = (0..25)
        .filter(|i| i % 3 == 0)
        .map(|i| format!("job-{i:03}"))
        .collect();
    assert_eq!(ids, expected);
    assert_eq!(running.next_after, None);
    // Filter + paging.
    let first = s
        .list_jobs(&JobQuery {
            states: vec![JobState::Pending, JobState::Scheduled],
            limit: 4,
            after: None,
        })
        .await
        .unwrap();
    let ids: Vec<&str> = first.jobs.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, ["job-001", "job-002", "job-004", "job-005"]);
    let second = s
        .list_jobs(&JobQuery {
            states: vec![JobState::Pending],
            limit: 4,
            after: first.next_after,
        })
        .await
        .unwrap();
    let ids: Vec<&str> = second.jobs.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, ["job-007", "job-008", "job-010", "job-011"]);
}

/// A watcher sees every change in revision order, live and replayed from a past revision.
pub async fn watch_in_order<S: StateStore>(s: &S) {
    let start = s.current_revision().await.unwrap() + 1;
    let mut live = s.watch_jobs(start).await.unwrap();
    let mut j = s.create_job(job("job-w", JobState::Pending)).await.unwrap();
    for state in [JobState::Scheduled, JobState::Running, JobState::Succeeded] {
        let rev = j.revision;
        j.state = state as i32;
        j = s.update_job(j, rev).await.unwrap();
    }
    // A failed CAS is not a change.
    let _ = s.update_job(job("job-w", JobState::Failed), 1).await;
    let expected = [
        (ChangeKind::Created, JobState::Pending),
        (ChangeKind::Updated, JobState::Scheduled),
        (ChangeKind::Updated, JobState::Running),
        (ChangeKind::Updated, JobState::Succeeded),
    ];
    let mut last = 0;
    for (kind, state) in expected {
        let change = tokio::time::timeout(Duration::from_secs(5), live.next())
            .await
            .expect("watch delivered in time")
            .expect("stream open")
            .expect("no error");
        assert_eq!(change.kind, kind);
        assert_eq!(change.job.state(), state);
        assert_eq!(change.job.revision, change.revision);
        assert!(change.revision > last, "revisions increase");
        last = change.revision;
    }
    assert_eq!(last, j.revision);
    // Replay from the past.
    let mut replay = s.watch_jobs(start).await.unwrap();
    let mut states = Vec::new();
    for _ in 0..4 {
        let c = tokio::time::timeout(Duration::from_secs(5), replay.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        states.push(c.job.state());
    }
    assert_eq!(
        states,
        [
            JobState::Pending,
            JobState::Scheduled,
            JobState::Running,
            JobState::Succeeded
        ]
    );
    // Nothing more until a new change.
    assert!(
        tokio::time::timeout(Duration::from_millis(50), replay.next())
            .await
            .is_err(),
        "no phantom changes"
    );
}

fn worker(id: &str) -> Worker {
    Worker {
        id: id.to_string(),
        name: id.to_string(),
        ..Default::default()
    }
}

/// Leases: a worker that keeps alive stays; one that does not is expired exactly once.
pub async fn lease_expiry<S: StateStore>(s: &S) {
    // Generous TTL for the one that keeps alive (a loaded machine may stall a task for a
    // while); the loop below outlasts it, so only renewals keep it.
    let long = Duration::from_millis(1000);
    let short = Duration::from_millis(150);
    s.register_worker(worker("w-quiet"), short).await.unwrap();
    s.register_worker(worker("w-alive"), long).await.unwrap();
    assert_eq!(s.list_workers().await.unwrap().len(), 2);
    assert!(
        s.expire_workers().await.unwrap().is_empty(),
        "nothing expired yet"
    );
    let started = std::time::Instant::now();
    while started.elapsed() < long + Duration::from_millis(200) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(s.keep_alive("w-alive").await.unwrap());
    }
    let expired = s.expire_workers().await.unwrap();
    let ids: Vec<&str> = expired.iter().map(|w| w.id.as_str()).collect();
    assert_eq!(ids, ["w-quiet"]);
    assert!(s.expire_workers().await.unwrap().is_empty(), "expired once");
    let alive: Vec<String> = s
        .list_workers()
        .await
        .unwrap()
        .into_iter()
        .map(|w| w.id)
        .collect();
    assert_eq!(alive, ["w-alive"]);
    assert!(
        !s.keep_alive("w-quiet").await.unwrap(),
        "expired lease is gone"
    );
    assert!(!s.keep_alive("w-never").await.unwrap());
    // Re-registering brings it back.
    s.register_worker(worker("w-quiet"), short).await.unwrap();
    assert!(s.keep_alive("w-quiet").await.unwrap());
}

fn checkpoint(job_id: &str, step: u64) -> CheckpointInfo {
    CheckpointInfo {
        job_id: job_id.to_string(),
        step,
        path: format!("jobs/{job_id}/checkpoints/{step}"),
        created_unix_ms: step as i64,
        attempt: 1,
        metrics: [("loss".to_string(), 1.0 / (step as f64 + 1.0))].into(),
    }
}

/// Checkpoints are listed per job by step, idempotently, without prefix leaks.
pub async fn checkpoints<S: StateStore>(s: &S) {
    for step in [20, 10, 30] {
        s.record_checkpoint(checkpoint("job-a", step))
            .await
            .unwrap();
    }
    s.record_checkpoint(checkpoint("job-ab", 5)).await.unwrap();
    s.record_checkpoint(checkpoint("job-a", 20)).await.unwrap();
    let steps: Vec<u64> = s
        .list_checkpoints("job-a")
        .await
        .unwrap()
        .iter()
        .map(|c| c.step)
        .collect();
    assert_eq!(steps, [10, 20, 30]);
    let listed = s.list_checkpoints("job-ab").await.unwrap();
    assert_eq!(listed, vec![checkpoint("job-ab", 5)]);
    assert!(s.list_checkpoints("job-zz").await.unwrap().is_empty());
}

/// Deleting a checkpoint record removes exactly that one (not another job's same step),
/// is idempotent, and a deleted step can be recorded again.
pub async fn delete_checkpoints<S: StateStore>(s: &S) {
    for step in [10, 20, 30] {
        s.record_checkpoint(checkpoint("job-d", step))
            .await
            .unwrap();
    }
    s.record_checkpoint(checkpoint("job-dx", 20)).await.unwrap();
    s.delete_checkpoint("job-d", 20).await.unwrap();
    let steps = |cps: Vec<CheckpointInfo>| cps.iter().map(|c| c.step).collect::<Vec<_>>();
    assert_eq!(steps(s.list_checkpoints("job-d").await.unwrap()), [10, 30]);
    assert_eq!(steps(s.list_checkpoints("job-dx").await.unwrap()), [20]);
    // Again, and for records that never existed: no error, nothing else removed.
    s.delete_checkpoint("job-d", 20).await.unwrap();
    s.delete_checkpoint("job-d", 25).await.unwrap();
    s.delete_checkpoint("job-none", 1).await.unwrap();
    assert_eq!(steps(s.list_checkpoints("job-d").await.unwrap()), [10, 30]);
    s.delete_checkpoint("job-d", 10).await.unwrap();
    s.delete_checkpoint("job-d", 30).await.unwrap();
    assert!(s.list_checkpoints("job-d").await.unwrap().is_empty());
    s.record_checkpoint(checkpoint("job-d", 20)).await.unwrap();
    assert_eq!(
        s.list_checkpoints("job-d").await.unwrap(),
        vec![checkpoint("job-d", 20)]
    );
}

/// Writes a mix of records for [`reopened_keeps_everything`].
pub async fn fill_before_reopen<S: StateStore>(s: &S) -> Vec<Job> {
    let mut jobs = Vec::new();
    for i in 0..30 {
        let mut j = s
            .create_job(job(&format!("job-r{i:02}"), JobState::Pending))
            .await
            .unwrap();
        if i % 2 == 0 {
            let rev = j.revision;
            j.state = JobState::Running as i32;
            j.latest_metrics.insert("loss".into(), i as f64);
            j = s.update_job(j, rev).await.unwrap();
        }
        jobs.push(j);
    }
    s.record_checkpoint(checkpoint("job-r00", 7)).await.unwrap();
    jobs
}

/// After a reopen every job, the revision counter and the checkpoints are still there.
pub async fn reopened_keeps_everything<S: StateStore>(s: &S, before: &[Job], old_revision: i64) {
    let page = s.list_jobs(&JobQuery::default()).await.unwrap();
    assert_eq!(page.jobs, before, "every job survives, byte for byte");
    assert_eq!(s.current_revision().await.unwrap(), old_revision);
    let cps = s.list_checkpoints("job-r00").await.unwrap();
    assert_eq!(cps, vec![checkpoint("job-r00", 7)]);
    let j = s
        .create_job(job("job-new", JobState::Pending))
        .await
        .unwrap();
    assert!(j.revision > old_revision, "revisions never go backwards");
}

/// Generates the conformance tests for a backend.
///
/// `$make` evaluates to `(store, ctx)`; `$reopen` is called as `$reopen(&ctx)` after the
/// first store was dropped and returns `Option<store>` (`None`: the backend does not persist).
#[macro_export]
macro_rules! store_conformance_tests {
    ($make:expr, $reopen:expr) => {
        mod conformance {
            #[allow(unused_imports)]
            use super::*;
            use $crate::store::conformance as suite;

            #[tokio::test]
            async fn create_and_get() {
                let (s, _ctx) = $make;
                suite::create_and_get(&s).await;
            }

            #[tokio::test]
            async fn cas_conflict() {
                let (s, _ctx) = $make;
                suite::cas_conflict(&s).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_cas_no_lost_update() {
                let (s, _ctx) = $make;
                suite::concurrent_cas_no_lost_update(std::sync::Arc::new(s)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_creates_exactly_once() {
                let (s, _ctx) = $make;
                suite::concurrent_creates_exactly_once(std::sync::Arc::new(s)).await;
            }

            #[tokio::test]
            async fn list_filter_and_paging() {
                let (s, _ctx) = $make;
                suite::list_filter_and_paging(&s).await;
            }

            #[tokio::test]
            async fn watch_in_order() {
                let (s, _ctx) = $make;
                suite::watch_in_order(&s).await;
            }

            #[tokio::test]
            async fn lease_expiry() {
                let (s, _ctx) = $make;
                suite::lease_expiry(&s).await;
            }

            #[tokio::test]
            async fn checkpoints() {
                let (s, _ctx) = $make;
                suite::checkpoints(&s).await;
            }

            #[tokio::test]
            async fn delete_checkpoints() {
                let (s, _ctx) = $make;
                suite::delete_checkpoints(&s).await;
            }

            #[tokio::test]
            async fn reopen_keeps_every_job() {
                let (s, ctx) = $make;
                let before = suite::fill_before_reopen(&s).await;
                let rev = s.current_revision().await.unwrap();
                drop(s);
                let reopen = $reopen;
                match reopen(&ctx) {
                    Some(s2) => suite::reopened_keeps_everything(&s2, &before, rev).await,
                    None => eprintln!("backend does not persist; reopen skipped"),
                }
            }
        }
    };
}
