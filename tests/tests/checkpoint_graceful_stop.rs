//! Cancelling a job while checkpoints are uploading: the rank finishes its step, saves a
//! checkpoint, waits for the pending uploads to commit within its grace period (less a
//! margin) and exits with the stopped code (143) before the worker's SIGKILL.
//!
//! Uploads are slowed with the test-only `TRAINYARD_TEST_UPLOAD_DELAY_MS` on the worker
//! (each manifest is written that long after its tensors); the objects are a local folder.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use trainyard_tests::{poll, tiny_neural_ode_args, Cluster, ClusterOptions};

fn cluster(delay_ms: u64) -> Cluster {
    Cluster::start_with(ClusterOptions {
        workers: 1,
        worker_env: vec![(
            "TRAINYARD_TEST_UPLOAD_DELAY_MS".into(),
            delay_ms.to_string(),
        )],
        ..ClusterOptions::default()
    })
}

/// `(has tensors, has manifest)` of each checkpoint folder of `job`, by step.
fn folders(objects: &Path, job: &str) -> BTreeMap<u64, (bool, bool)> {
    let dir = objects.join("jobs").join(job).join("checkpoints");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let Some(step) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let p = entry.path();
        out.insert(
            step,
            (
                p.join("model.safetensors").is_file(),
                p.join("manifest.json").is_file(),
            ),
        );
    }
    out
}

/// Waits for the worker to log the rank's end; returns the worker's log.
fn rank_finished(cluster: &Cluster, limit: Duration) -> String {
    poll(
        "the rank to finish",
        limit,
        Duration::from_millis(50),
        || {
            let log = std::fs::read_to_string(&cluster.workers[0].log_path).unwrap_or_default();
            log.contains("rank finished").then_some(log)
        },
    )
}

fn submit_long_job(cluster: &Cluster, checkpoint_every: u32, grace_s: u32) -> String {
    let args = tiny_neural_ode_args(8000, checkpoint_every);
    let grace = grace_s.to_string();
    let mut submit: Vec<&str> = args.iter().map(String::as_str).collect();
    submit.extend_from_slice(&[
        "--set",
        "models=resnet",
        "--set",
        "epochs=50",
        "--grace-period",
        &grace,
    ]);
    cluster.submit(&submit)
}

#[test]
fn a_cancelled_rank_commits_its_pending_checkpoints_before_exiting() {
    let cluster = cluster(800);
    let id = submit_long_job(&cluster, 10, 30);
    cluster.wait_job(
        &id,
        "a committed checkpoint",
        Duration::from_secs(120),
        |j| j["latest_checkpoint"]["step"].as_u64().is_some(),
    );
    // Uploads take 0.8 s each and checkpoints come every 10 steps: some are pending.
    std::thread::sleep(Duration::from_millis(500));
    let recorded = cluster.describe(&id)["latest_checkpoint"]["step"]
        .as_u64()
        .unwrap_or(0);
    let cancelled = Instant::now();
    cluster
        .cli(&["cancel", &id, "--reason", "e2e graceful"])
        .ok();
    let log = rank_finished(&cluster, Duration::from_secs(40));
    let took = cancelled.elapsed();

    assert!(
        log.contains("exit_code=143"),
        "not the stopped code:\n{log}"
    );
    assert!(
        !log.contains("SIGKILL"),
        "the rank was killed instead of stopping:\n{log}"
    );
    assert!(took < Duration::from_secs(25), "took {took:?}");
    // Every checkpoint saved, the one taken on stop included, is committed.
    let f = folders(&cluster.objects_dir(), &id);
    assert!(!f.is_empty());
    assert!(
        f.values().all(|(t, m)| *t && *m),
        "a checkpoint was left uncommitted: {f:?}"
    );
    // ... and some of them were saved or still uploading when the cancel came.
    let newest = f.keys().max().copied().unwrap_or(0);
    assert!(
        newest > recorded,
        "nothing committed after the cancel (newest {newest}, recorded before {recorded}): {f:?}"
    );
}

#[test]
fn a_short_grace_period_bounds_the_wait_for_uploads() {
    // Each manifest waits 10 s; the grace period is 2 s.
    let cluster = cluster(10_000);
    let id = submit_long_job(&cluster, 5, 2);
    cluster.wait_state(&id, "RUNNING", Duration::from_secs(120));
    poll(
        "a checkpoint upload in flight",
        Duration::from_secs(60),
        Duration::from_millis(50),
        || {
            folders(&cluster.objects_dir(), &id)
                .values()
                .any(|(t, _)| *t)
                .then_some(())
        },
    );
    let cancelled = Instant::now();
    cluster.cli(&["cancel", &id]).ok();
    let log = rank_finished(&cluster, Duration::from_secs(30));
    let took = cancelled.elapsed();
    assert!(
        log.contains("exit_code=143"),
        "not the stopped code:\n{log}"
    );
    assert!(
        !log.contains("SIGKILL"),
        "the rank outlived its grace period:\n{log}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // The uploads in flight never committed: no manifest anywhere.
    let f = folders(&cluster.objects_dir(), &id);
    assert!(f.values().all(|(_, m)| !*m), "{f:?}");
}
