//! Service tests of issue 4's coordinator side, over a loopback socket with a `file://`
//! object store in a temporary folder: checkpoint retention (objects and store records),
//! `from_checkpoint` at submit, and job history read back from the object store after the
//! in-memory entry is gone and after a coordinator restart.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tonic::Code;
use trainyard_objects::Objects;
use trainyard_proto::{
    job_event, rank_event, CheckpointInfo, CheckpointPolicy, Job, JobSpec, JobState,
    ListCheckpointsRequest, LogLine, MetricPoint, RankState, RankStatus, ResultRow, ResultTable,
    SubmitJobRequest,
};

use super::tests::{
    boot, boot_with, collect_watch, config, devices, get, spec, state, submit, transitions,
    wait_for, FakeWorker,
};
use crate::store::StateStore;

const WAIT: Duration = Duration::from_secs(10);

/// Polls `f` until it returns `Some`, or panics naming `what` and the last value seen.
async fn eventually<T: std::fmt::Debug>(
    what: &str,
    mut f: impl AsyncFnMut() -> (Option<T>, String),
) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        let (got, seen) = f().await;
        if let Some(v) = got {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "gave up waiting for {what}; last: {seen}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn objects_dir(dir: &Path) -> PathBuf {
    dir.join("objects")
}

fn checkpoint_dir(dir: &Path, job_id: &str, step: u64) -> PathBuf {
    objects_dir(dir)
        .join("jobs")
        .join(job_id)
        .join("checkpoints")
        .join(step.to_string())
}

/// Writes a committed checkpoint's objects as a worker would: the tensors, then the manifest.
fn write_checkpoint(dir: &Path, job_id: &str, step: u64, attempt: u32) {
    let folder = checkpoint_dir(dir, job_id, step);
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("model.safetensors"), b"tensors").unwrap();
    std::fs::write(
        folder.join("manifest.json"),
        format!(r#"{{"format_version":1,"job_id":"{job_id}","attempt":{attempt},"step":{step}}}"#),
    )
    .unwrap();
}

/// Sets a file's modification time `ago` in the past.
fn age_file(path: &Path, ago: Duration) {
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() - ago).unwrap();
}

fn checkpoint_event(job_id: &str, step: u64, acc: Option<f64>) -> rank_event::Kind {
    rank_event::Kind::Checkpoint(CheckpointInfo {
        job_id: job_id.to_string(),
        step,
        path: format!("jobs/{job_id}/checkpoints/{step}"),
        created_unix_ms: crate::state::now_unix_ms(),
        attempt: 1,
        metrics: acc
            .map(|a| [("acc".to_string(), a)].into())
            .unwrap_or_default(),
    })
}

async fn recorded_steps(c: &mut super::tests::Cluster, job_id: &str) -> Vec<u64> {
    c.jobs
        .list_checkpoints(ListCheckpointsRequest {
            job_id: job_id.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .checkpoints
        .iter()
        .map(|c| c.step)
        .collect()
}

/// The checkpoint folders of a job that hold objects (listed through the store: a local
/// folder store leaves empty directories behind when it deletes objects).
async fn folders(objects: &Objects, job_id: &str) -> BTreeSet<String> {
    let root = format!("jobs/{job_id}/checkpoints/");
    objects
        .list(&root)
        .await
        .unwrap()
        .iter()
        .filter_map(|o| {
            o.path
                .strip_prefix(&root)?
                .split('/')
                .next()
                .map(String::from)
        })
        .collect()
}

/// Writes a committed checkpoint's objects through the store: tensors, then the manifest.
async fn put_checkpoint(objects: &Objects, job_id: &str, step: u64, attempt: u32) {
    let dir = format!("jobs/{job_id}/checkpoints/{step}");
    objects
        .put(
            &format!("{dir}/model.safetensors"),
            Bytes::from_static(b"tensors"),
        )
        .await
        .unwrap();
    let manifest =
        format!(r#"{{"format_version":1,"job_id":"{job_id}","attempt":{attempt},"step":{step}}}"#);
    objects
        .put(&format!("{dir}/manifest.json"), Bytes::from(manifest))
        .await
        .unwrap();
}

/// Retention on the coordinator's object store: `objects_url` (`None`: a folder in the
/// data directory, where an old orphan folder can be faked by its file times).
async fn retention_keeps_latest_and_best(objects_url: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    let local = objects_url.is_none();
    if let Some(url) = objects_url {
        cfg.objects_url = url;
    }
    let objects = trainyard_objects::open_objects(&cfg.objects_url).unwrap();
    let mut c = boot_with(cfg).await;
    let mut w = FakeWorker::join(&c.url, "w", devices("cpu", 1), vec![]).await;
    let mut s = spec(0);
    s.checkpoints = Some(CheckpointPolicy {
        keep_latest: 2,
        keep_best: 2,
        best_metric: "acc".into(),
        higher_is_better: true,
        commit_timeout_s: 0,
    });
    let job = submit(&mut c.jobs, s).await;
    let a = w.next_assignment().await;
    let policy = a.checkpoint_policy.clone().expect("the policy is sent");
    assert_eq!((policy.keep_latest, policy.keep_best), (2, 2));
    assert_eq!(
        policy.commit_timeout_s,
        crate::validate::DEFAULT_COMMIT_TIMEOUT_S
    );
    assert!(
        w.report(&job.id, 1, 0, vec![state(RankState::Running)])
            .await
    );

    // Left-overs of uploads that never finished: no manifest, not in the index. A fresh one
    // may still be in flight and stays; an old one (2 hours, written before this attempt)
    // goes (only faked on a local folder, whose file times we can set).
    let mut want: BTreeSet<String> = ["2", "4", "7", "8", "101"].map(String::from).into();
    for step in [100, 101] {
        if step == 100 && !local {
            continue;
        }
        objects
            .put(
                &format!("jobs/{}/checkpoints/{step}/model.safetensors", job.id),
                Bytes::from_static(b"partial"),
            )
            .await
            .unwrap();
    }
    if local {
        age_file(
            &checkpoint_dir(dir.path(), &job.id, 100).join("model.safetensors"),
            Duration::from_secs(7200),
        );
    }

    let accs = [0.5, 0.9, 0.7, 0.95, 0.6, 0.8, 0.3, 0.4];
    for (i, acc) in accs.iter().enumerate() {
        let step = i as u64 + 1;
        put_checkpoint(&objects, &job.id, step, 1).await;
        assert!(
            w.report(
                &job.id,
                1,
                0,
                vec![checkpoint_event(&job.id, step, Some(*acc))]
            )
            .await
        );
    }
    // The newest two (7, 8) and the best two by acc (4: 0.95, 2: 0.9), objects and records.
    let id = job.id.clone();
    eventually("retention to keep 2, 4, 7, 8", async || {
        let steps = recorded_steps(&mut c, &id).await;
        let f = folders(&objects, &id).await;
        (
            (steps == [2, 4, 7, 8] && f == want).then_some(()),
            format!("records {steps:?}, folders {f:?}"),
        )
    })
    .await;
    for step in [2, 4, 7, 8] {
        for file in ["manifest.json", "model.safetensors"] {
            let path = format!("jobs/{}/checkpoints/{step}/{file}", job.id);
            assert!(objects.head(&path).await.unwrap().is_some(), "{path} kept");
        }
    }
    let j = get(&mut c.jobs, &job.id).await;
    assert_eq!(j.latest_checkpoint.map(|c| c.step), Some(8));

    // A better checkpoint later displaces the worst of the best; the newest are 8 and 9.
    put_checkpoint(&objects, &job.id, 9, 1).await;
    assert!(
        w.report(
            &job.id,
            1,
            0,
            vec![checkpoint_event(&job.id, 9, Some(0.99))]
        )
        .await
    );
    want = ["4", "8", "9", "101"].map(String::from).into();
    eventually("retention to keep 4, 8, 9", async || {
        let steps = recorded_steps(&mut c, &id).await;
        let f = folders(&objects, &id).await;
        (
            (steps == [4, 8, 9] && f == want).then_some(()),
            format!("records {steps:?}, folders {f:?}"),
        )
    })
    .await;
    c.handle.shutdown().await.unwrap();
    if !local {
        objects.delete_prefix("jobs").await.unwrap();
    }
}

#[tokio::test]
async fn retention_keeps_exactly_the_latest_n_and_the_best_m() {
    retention_keeps_latest_and_best(None).await;
}

#[tokio::test]
async fn retention_keeps_exactly_the_latest_n_and_the_best_m_on_s3() {
    let Some(env) = trainyard_objects::testing::s3_test_env() else {
        return;
    };
    let prefix = trainyard_objects::testing::unique_prefix("coordinator-retention");
    retention_keeps_latest_and_best(Some(env.url(&prefix))).await;
}

#[tokio::test]
async fn retention_leaves_checkpoints_being_rewritten_until_the_job_ends() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = boot(dir.path()).await;
    let mut w = FakeWorker::join(&c.url, "w", devices("cpu", 1), vec![]).await;
    let mut s = spec(0);
    s.checkpoints = Some(CheckpointPolicy {
        keep_latest: 1,
        ..Default::default()
    });
    let job = submit(&mut c.jobs, s).await;
    w.next_assignment().await;
    assert!(
        w.report(&job.id, 1, 0, vec![state(RankState::Running)])
            .await
    );
    // Step 1's record says attempt 1, but its manifest now belongs to attempt 2; step 2's
    // manifest is gone (a newer attempt removes it before uploading the step again). While
    // the job runs, neither may be deleted; step 3 may.
    for step in 1..=4 {
        write_checkpoint(dir.path(), &job.id, step, if step == 1 { 2 } else { 1 });
        if step == 2 {
            std::fs::remove_file(checkpoint_dir(dir.path(), &job.id, 2).join("manifest.json"))
                .unwrap();
        }
        assert!(
            w.report(&job.id, 1, 0, vec![checkpoint_event(&job.id, step, None)])
                .await
        );
    }
    let id = job.id.clone();
    eventually("step 3 deleted, steps 1 and 2 left alone", async || {
        let steps = recorded_steps(&mut c, &id).await;
        ((steps == [1, 2, 4]).then_some(()), format!("{steps:?}"))
    })
    .await;
    assert!(checkpoint_dir(dir.path(), &job.id, 1)
        .join("manifest.json")
        .is_file());
    assert!(checkpoint_dir(dir.path(), &job.id, 2)
        .join("model.safetensors")
        .is_file());
    // Once the job has ended, nothing writes any more: the last run takes them.
    assert!(
        w.report(&job.id, 1, 0, vec![state(RankState::Succeeded)])
            .await
    );
    eventually("only step 4 left", async || {
        let steps = recorded_steps(&mut c, &id).await;
        ((steps == [4]).then_some(()), format!("{steps:?}"))
    })
    .await;
    for step in [1, 2] {
        assert!(!checkpoint_dir(dir.path(), &job.id, step)
            .join("model.safetensors")
            .exists());
    }
    c.handle.shutdown().await.unwrap();
}

fn expect_invalid(
    r: Result<tonic::Response<trainyard_proto::SubmitJobResponse>, tonic::Status>,
) -> String {
    match r {
        Ok(_) => panic!("the submit should be rejected"),
        Err(s) => {
            assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
            s.message().to_string()
        }
    }
}

#[tokio::test]
async fn from_checkpoint_is_checked_at_submit_and_resumes_the_first_attempt() {
    let dir = tempfile::tempdir().unwrap();
    // A finished job of another type, with a checkpoint, stored before the start.
    {
        let store = crate::store::EmbeddedStore::open(&dir.path().join("state.redb")).unwrap();
        store
            .create_job(Job {
                id: "job-other".into(),
                spec: Some(JobSpec {
                    job: "other-type".into(),
                    ..Default::default()
                }),
                state: JobState::Succeeded as i32,
                ..Default::default()
            })
            .await
            .unwrap();
        store
            .record_checkpoint(CheckpointInfo {
                job_id: "job-other".into(),
                step: 3,
                path: "jobs/job-other/checkpoints/3".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    write_checkpoint(dir.path(), "job-other", 3, 1);
    let mut c = boot(dir.path()).await;
    let mut w = FakeWorker::join(&c.url, "w", devices("cpu", 1), vec![]).await;

    // A source job with a committed checkpoint at step 5.
    let source = submit(&mut c.jobs, spec(0)).await;
    w.next_assignment().await;
    write_checkpoint(dir.path(), &source.id, 5, 1);
    assert!(
        w.report(
            &source.id,
            1,
            0,
            vec![
                state(RankState::Running),
                checkpoint_event(&source.id, 5, None),
                state(RankState::Succeeded)
            ]
        )
        .await
    );
    wait_for(&mut c.jobs, &source.id, JobState::Succeeded).await;

    let with_from = |from: &str| {
        let mut s = spec(0);
        s.from_checkpoint = from.to_string();
        SubmitJobRequest { spec: Some(s) }
    };
    let m = expect_invalid(
        c.jobs
            .submit_job(with_from(&format!("{}/6", source.id)))
            .await,
    );
    assert!(
        m.starts_with("spec.from_checkpoint: ") && m.contains("committed steps: 5"),
        "{m}"
    );
    let m = expect_invalid(c.jobs.submit_job(with_from("job-nope/1")).await);
    assert_eq!(m, "spec.from_checkpoint: job job-nope not found");
    let m = expect_invalid(c.jobs.submit_job(with_from("just-words")).await);
    assert!(m.starts_with("spec.from_checkpoint: \"just-words\""), "{m}");
    let m = expect_invalid(c.jobs.submit_job(with_from("job-other/3")).await);
    assert!(
        m.starts_with("spec.from_checkpoint: job job-other is a \"other-type\" job")
            && m.contains("same type"),
        "{m}"
    );
    // A good one: stored as given; the first attempt resumes from it.
    let resumed = c
        .jobs
        .submit_job(with_from(&format!("{}/5", source.id)))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(
        resumed.spec.as_ref().map(|s| s.from_checkpoint.clone()),
        Some(format!("{}/5", source.id))
    );
    let a = w.next_assignment().await;
    assert_eq!(a.job_id, resumed.id);
    let from = a.resume_from.expect("resume_from is set");
    assert_eq!(from.job_id, source.id);
    assert_eq!(from.step, 5);
    assert_eq!(from.path, format!("jobs/{}/checkpoints/5", source.id));
    assert!(
        resumed.latest_checkpoint.is_none(),
        "its own checkpoints start empty"
    );

    // A listed checkpoint whose manifest is gone is not committed any more.
    std::fs::remove_file(checkpoint_dir(dir.path(), &source.id, 5).join("manifest.json")).unwrap();
    let m = expect_invalid(
        c.jobs
            .submit_job(with_from(&format!("{}/5", source.id)))
            .await,
    );
    assert!(m.contains("manifest") && m.contains("is gone"), "{m}");
    c.handle.shutdown().await.unwrap();
}

fn log(line: &str) -> rank_event::Kind {
    rank_event::Kind::Log(LogLine {
        rank: 0,
        stream: "stdout".into(),
        line: line.to_string(),
    })
}

fn metric(step: u64, loss: f64) -> rank_event::Kind {
    rank_event::Kind::Metric(MetricPoint {
        rank: 0,
        step,
        values: [("loss".to_string(), loss)].into(),
    })
}

fn results() -> ResultTable {
    ResultTable {
        title: "Neural ODE".into(),
        columns: vec!["Model".into(), "Test acc".into()],
        rows: vec![ResultRow {
            cells: vec!["ODE-Net".into(), "96.55%".into()],
        }],
        notes: vec!["claim HELD".into()],
        claims: vec![],
    }
}

fn log_lines(events: &[trainyard_proto::JobEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(job_event::Kind::Log(l)) => Some(l.line.clone()),
            _ => None,
        })
        .collect()
}

fn metric_steps(events: &[trainyard_proto::JobEvent]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(job_event::Kind::Metric(m)) => Some(m.step),
            _ => None,
        })
        .collect()
}

fn has_result(events: &[trainyard_proto::JobEvent]) -> bool {
    events
        .iter()
        .any(|e| matches!(&e.kind, Some(job_event::Kind::Result(r)) if *r == results()))
}

fn quick_history(dir: &Path) -> crate::CoordinatorConfig {
    let mut cfg = config(dir);
    cfg.finished_history_kept = Duration::from_millis(100);
    cfg.durable.flush_interval = Duration::from_millis(50);
    cfg
}

#[tokio::test]
async fn logs_metrics_and_results_outlive_memory_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = boot_with(quick_history(dir.path())).await;
    let mut w = FakeWorker::join(&c.url, "w", devices("cpu", 1), vec![]).await;
    let job = submit(&mut c.jobs, spec(0)).await;
    w.next_assignment().await;
    assert!(
        w.report(&job.id, 1, 0, vec![state(RankState::Running)])
            .await
    );
    let mut want_lines = Vec::new();
    for batch in 0..5u64 {
        let mut events = Vec::new();
        for i in 0..10 {
            let line = format!("batch {batch} line {i}");
            want_lines.push(line.clone());
            events.push(log(&line));
        }
        events.push(metric(batch, 1.0 / (batch as f64 + 1.0)));
        assert!(w.report(&job.id, 1, 0, events).await);
    }
    // Written in chunks while the job runs.
    let logs_dir = objects_dir(dir.path())
        .join("jobs")
        .join(&job.id)
        .join("logs");
    eventually("a log chunk while the job runs", async || {
        let n = std::fs::read_dir(&logs_dir).map(|d| d.count()).unwrap_or(0);
        ((n > 0).then_some(()), format!("{n} chunks"))
    })
    .await;
    assert!(
        w.report(
            &job.id,
            1,
            0,
            vec![
                rank_event::Kind::Result(results()),
                state(RankState::Succeeded)
            ]
        )
        .await
    );
    wait_for(&mut c.jobs, &job.id, JobState::Succeeded).await;
    // results.json is written after the last chunks.
    let results_path = objects_dir(dir.path())
        .join("jobs")
        .join(&job.id)
        .join("results.json");
    eventually("results.json", async || {
        (results_path.is_file().then_some(()), String::new())
    })
    .await;
    let from_memory = collect_watch(&mut c.jobs, &job.id, false).await;

    // The finished job's entry leaves memory once written; the watch reads the object store.
    let coord = c.handle.coordinator().clone();
    let id = job.id.clone();
    eventually("the entry to leave memory", async || {
        let kept = coord.state.lock().await.jobs.contains_key(&id);
        ((!kept).then_some(()), String::new())
    })
    .await;
    // (It holds the store open: let it go before the restart.)
    drop(coord);
    let from_store = collect_watch(&mut c.jobs, &job.id, false).await;
    assert_eq!(log_lines(&from_store), want_lines);
    assert_eq!(metric_steps(&from_store), [0, 1, 2, 3, 4]);
    assert!(has_result(&from_store));
    assert_eq!(
        transitions(&from_store),
        [
            JobState::Pending,
            JobState::Scheduled,
            JobState::Running,
            JobState::Succeeded
        ]
    );
    assert!(matches!(
        from_store.last().and_then(|e| e.kind.clone()),
        Some(job_event::Kind::Transition(t)) if t.to() == JobState::Succeeded
    ));
    let seqs: Vec<u64> = from_store.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (0..from_store.len() as u64).collect::<Vec<_>>());
    assert_eq!(log_lines(&from_memory), want_lines);

    // After a restart: the same.
    drop(w);
    c.handle.shutdown().await.unwrap();
    let mut c = boot_with(quick_history(dir.path())).await;
    let after = collect_watch(&mut c.jobs, &job.id, true).await;
    assert_eq!(log_lines(&after), want_lines);
    assert_eq!(metric_steps(&after), [0, 1, 2, 3, 4]);
    assert!(has_result(&after));
    let j = get(&mut c.jobs, &job.id).await;
    assert_eq!(j.result, Some(results()));
    assert_eq!(j.latest_metrics.get("loss"), Some(&0.2));
    c.handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_job_running_across_a_restart_shows_its_whole_history_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = boot_with(quick_history(dir.path())).await;
    let mut w = FakeWorker::join(&c.url, "w", devices("cpu", 1), vec![]).await;
    let job = submit(&mut c.jobs, spec(0)).await;
    let a = w.next_assignment().await;
    let before: Vec<String> = (0..10).map(|i| format!("before {i}")).collect();
    let mut events = vec![state(RankState::Running)];
    events.extend(before.iter().map(|l| log(l)));
    events.push(metric(1, 0.5));
    assert!(w.report(&job.id, 1, 0, events).await);
    drop(w);
    // A graceful shutdown writes what it holds.
    c.handle.shutdown().await.unwrap();

    let mut c = boot_with(quick_history(dir.path())).await;
    let running = vec![RankStatus {
        job_id: job.id.clone(),
        attempt: 1,
        rank: 0,
        state: RankState::Running as i32,
        device_index: a.device_index,
    }];
    let mut w2 = FakeWorker::join(&c.url, "w", devices("cpu", 1), running).await;
    let id = job.id.clone();
    eventually("the rank to be adopted", async || {
        let j = get(&mut c.jobs, &id).await;
        (
            j.state_reason.contains("came back").then_some(()),
            j.state_reason,
        )
    })
    .await;
    let after: Vec<String> = (0..10).map(|i| format!("after {i}")).collect();
    let mut events: Vec<rank_event::Kind> = after.iter().map(|l| log(l)).collect();
    events.push(metric(2, 0.25));
    assert!(w2.report(&job.id, 1, 0, events).await);
    // Let some of this process's records reach the object store too: they are in memory
    // as well and must not show twice.
    let logs_dir = objects_dir(dir.path())
        .join("jobs")
        .join(&job.id)
        .join("logs");
    eventually("a second log chunk", async || {
        let n = std::fs::read_dir(&logs_dir).map(|d| d.count()).unwrap_or(0);
        ((n >= 2).then_some(()), format!("{n} chunks"))
    })
    .await;
    let events = collect_watch(&mut c.jobs, &job.id, false).await;
    let mut want = before.clone();
    want.extend(after.iter().cloned());
    assert_eq!(log_lines(&events), want);
    assert_eq!(metric_steps(&events), [1, 2]);
    assert_eq!(
        transitions(&events),
        [JobState::Pending, JobState::Scheduled, JobState::Running]
    );
    // A live watcher gets the same history, then the rest.
    let mut jobs = c.jobs.clone();
    let live_id = job.id.clone();
    let live = tokio::spawn(async move { collect_watch(&mut jobs, &live_id, true).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        w2.report(
            &job.id,
            1,
            0,
            vec![log("last"), state(RankState::Succeeded)]
        )
        .await
    );
    let live = tokio::time::timeout(WAIT, live).await.unwrap().unwrap();
    want.push("last".into());
    assert_eq!(log_lines(&live), want);
    assert_eq!(transitions(&live).last(), Some(&JobState::Succeeded));
    c.handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_follower_serves_a_finished_jobs_history_from_the_stores() {
    use futures::StreamExt;

    use crate::coordinator::{Coordinator, OpError, Settings};
    use crate::durable::{DurableOptions, Record, Sink};
    use crate::leader::Leadership;
    use crate::retention::RetentionQueue;

    let dir = tempfile::tempdir().unwrap();
    let store = crate::store::EmbeddedStore::open(&dir.path().join("state.redb")).unwrap();
    let transitions_of = |states: &[JobState]| {
        states
            .iter()
            .enumerate()
            .map(|(i, s)| trainyard_proto::Transition {
                from: 0,
                to: *s as i32,
                at_unix_ms: 1000 + 100 * i as i64,
                reason: String::new(),
            })
            .collect::<Vec<_>>()
    };
    store
        .create_job(Job {
            id: "job-done".into(),
            spec: Some(spec(0)),
            state: JobState::Succeeded as i32,
            transitions: transitions_of(&[
                JobState::Pending,
                JobState::Scheduled,
                JobState::Running,
                JobState::Succeeded,
            ]),
            ..Default::default()
        })
        .await
        .unwrap();
    store
        .create_job(Job {
            id: "job-live".into(),
            spec: Some(spec(0)),
            state: JobState::Running as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    // The previous leader wrote the history: two log lines, a metric and the results.
    let objects =
        trainyard_objects::open_objects(&format!("file://{}", objects_dir(dir.path()).display()))
            .unwrap();
    let (writer, _task) = Sink::start(objects.clone(), DurableOptions::default());
    for (n, line) in ["first", "second"].iter().enumerate() {
        writer.record(
            "job-done",
            Record::log(
                "leader",
                n as u64,
                1250 + n as i64,
                &LogLine {
                    rank: 0,
                    stream: "stdout".into(),
                    line: line.to_string(),
                },
            ),
        );
    }
    writer.record(
        "job-done",
        Record::metric(
            "leader",
            2,
            1260,
            &MetricPoint {
                rank: 0,
                step: 3,
                values: [("loss".to_string(), 0.5)].into(),
            },
        ),
    );
    writer.result("job-done", "leader", results());
    writer.finished("job-done");
    assert!(writer.flush(WAIT).await);

    let (_tx, follower) = tokio::sync::watch::channel(Leadership {
        is_leader: false,
        leader_addr: Some("127.0.0.1:1".into()),
        term: 1,
        key: None,
        store_reachable: true,
    });
    let (sink, _task2) = Sink::start(objects.clone(), DurableOptions::default());
    let (queue, _rx) = RetentionQueue::new();
    let coord = Coordinator::new(std::sync::Arc::new(store), Settings::default())
        .with_leadership(follower)
        .with_objects(objects, sink, queue);
    let events: Vec<_> = coord
        .watch("job-done", true)
        .await
        .expect("a finished job's history is served by a follower")
        .map(|e| e.unwrap())
        .collect()
        .await;
    assert_eq!(log_lines(&events), ["first", "second"]);
    assert_eq!(metric_steps(&events), [3]);
    assert!(has_result(&events));
    assert_eq!(transitions(&events).last(), Some(&JobState::Succeeded));
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (0..events.len() as u64).collect::<Vec<_>>()
    );
    // results.json fills in a record without one.
    let job = coord.get_job("job-done").await.unwrap();
    assert_eq!(job.result, Some(results()));
    // Following a live job needs the leader.
    assert!(matches!(
        coord.watch("job-live", true).await,
        Err(OpError::NotLeader(Some(_)))
    ));
    assert!(coord.watch("job-live", false).await.is_ok());
    assert!(matches!(
        coord.watch("job-none", false).await,
        Err(OpError::NotFound(_))
    ));
}
