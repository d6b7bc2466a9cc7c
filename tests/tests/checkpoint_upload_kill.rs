//! kill -9 of a worker in the middle of a checkpoint upload to S3: the partial checkpoint
//! (tensors written, no manifest) is never used; the job resumes on the other worker
//! from the last committed checkpoint, and its step counter continues from there.
//!
//! The upload window is made reliable with the test-only `TRAINYARD_TEST_UPLOAD_DELAY_MS`
//! on the workers: each checkpoint's manifest is written that long after its tensors.
//! Needs the S3 server of `scripts/s3.sh up` (required under `CI` /
//! `TRAINYARD_REQUIRE_S3=1`, else the test prints a notice and passes).

use std::collections::BTreeMap;
use std::time::Duration;

use trainyard_objects::testing::{s3_test_env, unique_prefix};
use trainyard_objects::Objects;
use trainyard_tests::{poll, tiny_neural_ode_args, Cluster, ClusterOptions};

/// Steps between checkpoints.
const EVERY: u64 = 8;
/// Training steps of the job: 512 images in batches of 16, one epoch.
const STEPS: u64 = 32;
/// How long each checkpoint stays partial on the workers.
const UPLOAD_DELAY_MS: &str = "1200";

/// `(has tensors, has manifest)` of every checkpoint folder of `job`, by step.
fn folders(
    rt: &tokio::runtime::Runtime,
    objects: &Objects,
    job: &str,
) -> BTreeMap<u64, (bool, bool)> {
    let prefix = format!("jobs/{job}/checkpoints");
    let mut out: BTreeMap<u64, (bool, bool)> = BTreeMap::new();
    for o in rt
        .block_on(objects.list(&prefix))
        .expect("listing checkpoints")
    {
        let Some(rest) = o.path.strip_prefix(&format!("{prefix}/")) else {
            continue;
        };
        let Some((step, file)) = rest.split_once('/') else {
            continue;
        };
        let Ok(step) = step.parse::<u64>() else {
            continue;
        };
        let entry = out.entry(step).or_default();
        match file {
            "model.safetensors" => entry.0 = true,
            "manifest.json" => entry.1 = true,
            _ => {}
        }
    }
    out
}

fn manifest(
    rt: &tokio::runtime::Runtime,
    objects: &Objects,
    job: &str,
    step: u64,
) -> serde_json::Value {
    let got = rt
        .block_on(objects.get(&format!("jobs/{job}/checkpoints/{step}/manifest.json")))
        .expect("reading a manifest")
        .unwrap_or_else(|| panic!("no manifest at step {step}"));
    serde_json::from_slice(&got.bytes).expect("manifest is JSON")
}

/// Global steps of the `resnet epoch 1/1 step N/32` lines of `logs`, in order.
fn train_steps(logs: &str) -> Vec<(usize, u64)> {
    logs.lines()
        .enumerate()
        .filter_map(|(i, l)| {
            let rest = l.split("resnet epoch 1/1 step ").nth(1)?;
            Some((i, rest.split('/').next()?.parse().ok()?))
        })
        .collect()
}

#[test]
fn worker_killed_mid_upload_resumes_from_the_last_committed_checkpoint() {
    let Some(env) = s3_test_env() else { return };
    let url = env.url(&unique_prefix("e2e-upload-kill"));
    let mut cluster = Cluster::start_with_objects(
        ClusterOptions {
            workers: 2,
            worker_env: vec![(
                "TRAINYARD_TEST_UPLOAD_DELAY_MS".into(),
                UPLOAD_DELAY_MS.into(),
            )],
            ..ClusterOptions::default()
        },
        Some(&url),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let objects = trainyard_objects::open_objects(&url).expect("opening the test store");

    let mut args = tiny_neural_ode_args(512, EVERY as u32);
    args.extend(["--set".into(), "models=resnet".into()]);
    args.extend(["--max-restarts".into(), "2".into()]);
    let submit: Vec<&str> = args.iter().map(String::as_str).collect();
    let id = cluster.submit(&submit);
    let job = cluster.wait_state(&id, "RUNNING", Duration::from_secs(120));
    let victim = cluster.worker_index_of(&job);

    // Wait for the window: the newest checkpoint folder holds its tensors but no manifest
    // yet, and the coordinator has recorded the committed one before it.
    let (committed, partial) = poll(
        "a partial checkpoint after a committed one",
        Duration::from_secs(120),
        Duration::from_millis(20),
        || {
            let f = folders(&rt, &objects, &id);
            let committed = f.iter().filter(|(_, (_, m))| *m).map(|(s, _)| *s).max()?;
            let partial = f
                .iter()
                .find(|(s, (t, m))| **s > committed && *t && !*m)
                .map(|(s, _)| *s)?;
            let recorded = cluster.describe(&id)["latest_checkpoint"]["step"].as_u64();
            (recorded == Some(committed)).then_some((committed, partial))
        },
    );
    cluster.workers[victim].kill9();
    let after = folders(&rt, &objects, &id);
    assert_eq!(
        after.get(&partial),
        Some(&(true, false)),
        "step {partial} was committed before the kill landed; rerun (the window is {UPLOAD_DELAY_MS} ms): {after:?}"
    );
    let first_attempt = manifest(&rt, &objects, &id, committed)["attempt"]
        .as_u64()
        .expect("manifest.attempt");

    let job = cluster.wait_state(&id, "SUCCEEDED", Duration::from_secs(300));
    assert_eq!(job["restarts"], 1, "{job}");

    // Resumed from the last committed checkpoint, never from the partial one.
    let logs = cluster.cli(&["logs", &id]).ok().stdout;
    eprintln!("--- job logs ---\n{logs}");
    let resumed: Vec<(usize, u64)> = logs
        .lines()
        .enumerate()
        .filter_map(|(i, l)| {
            let rest = l.split("resumed from checkpoint at step ").nth(1)?;
            Some((i, rest.trim().parse().ok()?))
        })
        .collect();
    // (The line may appear twice: as the job's log line and in the rank's own log.)
    let (resume_line, resumed_at) = *resumed
        .first()
        .unwrap_or_else(|| panic!("no resume:\n{logs}"));
    assert!(
        resumed.iter().all(|(_, s)| *s == resumed_at),
        "one resume expected:\n{logs}"
    );
    assert_eq!(
        resumed_at, committed,
        "resumed from {resumed_at}, the last committed checkpoint was {committed} (partial: {partial}):\n{logs}"
    );
    assert!(resumed_at < partial);
    assert!(
        partial - resumed_at <= EVERY,
        "lost more than one checkpoint interval: resumed at {resumed_at}, the upload in flight was {partial}"
    );
    assert!(
        !logs.contains("skipping checkpoint"),
        "the partial checkpoint was never a candidate:\n{logs}"
    );

    // The step counter continues from the checkpoint: the next step is resumed_at + 1.
    let steps = train_steps(&logs);
    let next = steps
        .iter()
        .find(|(i, _)| *i > resume_line)
        .map(|(_, s)| *s);
    assert_eq!(next, Some(resumed_at + 1), "{logs}");
    assert_eq!(steps.last().map(|(_, s)| *s), Some(STEPS));

    // The second attempt rewrote the partial folder as a committed checkpoint of its own
    // (retention keeps the newest 3 of 8, 16, 24, 32 by default, and the partial one is
    // at 16 or later).
    let rewritten = manifest(&rt, &objects, &id, partial);
    assert!(
        rewritten["attempt"].as_u64().unwrap_or(0) > first_attempt,
        "step {partial}: {rewritten}"
    );
    assert_eq!(job["latest_checkpoint"]["step"], STEPS, "{job}");

    rt.block_on(objects.delete_prefix(&format!("jobs/{id}")))
        .expect("cleaning up");
}
