//! The S3 server stops for a few seconds during training: training goes on, the failed
//! uploads are retried (with backoff, logged), they commit once the server is back, and
//! the job finishes with every checkpoint it saved committed.
//!
//! The test runs its own Garage (scripts/s3.sh on free ports) so that stopping it
//! disturbs no other test. It needs what the shared S3 test server needs (Garage and the
//! test key in the environment, from `eval "$(scripts/s3.sh up)"`): required under `CI` /
//! `TRAINYARD_REQUIRE_S3=1`, else the test prints a notice and passes.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use trainyard_objects::testing::{s3_test_env, unique_prefix};
use trainyard_tests::s3::S3Server;
use trainyard_tests::{Cluster, ClusterOptions};

/// Steps between checkpoints.
const EVERY: u64 = 32;
/// Training steps: 4,096 images in batches of 16, one epoch.
const STEPS: u64 = 256;
/// How long the server is down.
const OUTAGE: Duration = Duration::from_secs(3);

/// The last global step the job's log reports (`resnet epoch 1/1 step N/256`).
fn last_step(logs: &str) -> u64 {
    logs.lines()
        .filter_map(|l| {
            let rest = l.split("resnet epoch 1/1 step ").nth(1)?;
            rest.split('/').next()?.parse().ok()
        })
        .max()
        .unwrap_or(0)
}

/// Steps of the `checkpoint at step N committed: ...` lines, and how many of them needed
/// more than one try.
fn committed(logs: &str) -> (BTreeSet<u64>, usize) {
    let mut steps = BTreeSet::new();
    let mut retried = 0;
    for l in logs.lines() {
        let Some(rest) = l.strip_prefix("checkpoint at step ") else {
            continue;
        };
        let Some((step, tail)) = rest.split_once(" committed: ") else {
            continue;
        };
        if let Ok(step) = step.parse() {
            steps.insert(step);
            if tail.contains(" tries)") {
                retried += 1;
            }
        }
    }
    (steps, retried)
}

#[test]
fn training_goes_on_while_s3_is_down_and_every_checkpoint_commits_once_it_is_back() {
    if s3_test_env().is_none() {
        return;
    }
    let server = S3Server::start();
    // Few quick client retries, so that the uploader's own retries show.
    let url = server.url(
        "trainyard",
        &unique_prefix("e2e-outage"),
        "max_retries=1&retry_timeout=1s&connect_timeout=1s",
    );
    let cluster = Cluster::start_with_objects(
        ClusterOptions {
            workers: 1,
            ..ClusterOptions::default()
        },
        Some(&url),
    );
    let set = |kv: &str| ["--set".to_string(), kv.to_string()];
    let mut args: Vec<String> = vec!["neural-ode".into(), "--preset".into(), "quick".into()];
    for kv in [
        "models=resnet".to_string(),
        "train_samples=4096".into(),
        "test_samples=64".into(),
        "eval_batch_size=64".into(),
        "epochs=1".into(),
        "width=4".into(),
        "batch_size=16".into(),
        format!("checkpoint_every={EVERY}"),
        "log_every=1".into(),
    ] {
        args.extend(set(&kv));
    }
    let submit: Vec<&str> = args.iter().map(String::as_str).collect();
    let id = cluster.submit(&submit);

    cluster.wait_job(
        &id,
        "a first committed checkpoint",
        Duration::from_secs(180),
        |j| j["latest_checkpoint"]["step"].as_u64().is_some(),
    );
    let logs = |c: &Cluster| c.cli(&["logs", &id]).ok().stdout;

    let step_at_stop = last_step(&logs(&cluster));
    server.stop();
    let stopped_at = Instant::now();
    assert!(
        step_at_stop < STEPS - 2 * EVERY,
        "training is almost over before the outage (step {step_at_stop}); make the job longer"
    );
    // Training goes on while the store is down: at least one more checkpoint is saved
    // (and fails to upload).
    let deadline = Instant::now() + OUTAGE;
    let during = loop {
        let text = logs(&cluster);
        if last_step(&text) >= step_at_stop + EVERY
            && text.contains("checkpoint upload failed; retrying")
        {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "training did not go on during the outage (step {step_at_stop} -> {}), or no \
             failed upload was logged:\n{text}",
            last_step(&text)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let state = cluster.describe(&id)["state"].clone();
    assert_eq!(state, "RUNNING", "the job must survive the outage");
    if let Some(rest) = OUTAGE.checked_sub(stopped_at.elapsed()) {
        std::thread::sleep(rest);
    }
    let step_at_restart = last_step(&logs(&cluster));
    server.restart();

    let job = cluster.wait_state(&id, "SUCCEEDED", Duration::from_secs(300));
    assert_eq!(job["restarts"], 0, "{job}");
    let text = logs(&cluster);
    eprintln!(
        "--- outage: steps {step_at_stop} -> {step_at_restart} while S3 was down ---\n{text}"
    );
    assert!(
        step_at_restart >= step_at_stop + EVERY,
        "training stalled during the outage: step {step_at_stop} -> {step_at_restart}\n{during}"
    );

    // Nothing lost: every checkpoint saved (every EVERY steps, and the boundary one at
    // the end) was committed, some of them after retries.
    let (steps, retried) = committed(&text);
    let expected: BTreeSet<u64> = (1..=STEPS / EVERY)
        .map(|i| i * EVERY)
        .chain([STEPS])
        .collect();
    assert_eq!(steps, expected, "committed checkpoints:\n{text}");
    assert!(retried >= 1, "no checkpoint needed a retry:\n{text}");
    assert_eq!(job["latest_checkpoint"]["step"], STEPS, "{job}");

    // The newest is in the store, whole (older ones are subject to retention).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let objects = trainyard_objects::open_objects(&url).expect("opening the test store");
    let listed = rt
        .block_on(objects.list(&format!("jobs/{id}/checkpoints/{STEPS}")))
        .expect("listing checkpoints");
    for file in ["manifest.json", "model.safetensors"] {
        let path = format!("jobs/{id}/checkpoints/{STEPS}/{file}");
        assert!(
            listed.iter().any(|o| o.path == path && o.size > 0),
            "{path} is missing: {listed:?}"
        );
    }
}
