//! Checkpoint retention with real processes: a job that commits several checkpoints with
//! `--keep-checkpoints 1` ends with exactly one, its newest, in the index and in the object
//! store (objects of the others deleted). Once on S3 (the test server of `scripts/s3.sh
//! up`; without it that case prints a notice and passes, unless `CI` or
//! `TRAINYARD_REQUIRE_S3=1` is set), once on a local folder. The exact latest-N-plus-best-M
//! rule is covered by the coordinator's service tests.

use std::collections::BTreeSet;
use std::time::Duration;

use trainyard_objects::testing::{s3_test_env, unique_prefix};
use trainyard_tests::{poll, tiny_neural_ode_args, Cluster, ClusterOptions};

/// The checkpoint folders of a job that hold a manifest, and those that hold anything.
fn folders(objects_url: &str, job_id: &str) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let objects = trainyard_objects::open_objects(objects_url).expect("opening the store");
    let root = format!("jobs/{job_id}/checkpoints/");
    let listed = rt
        .block_on(objects.list(&root))
        .expect("listing checkpoints");
    let mut committed = BTreeSet::new();
    let mut any = BTreeSet::new();
    for o in listed {
        let Some((step, file)) = o.path.strip_prefix(&root).and_then(|r| r.split_once('/')) else {
            continue;
        };
        let Ok(step) = step.parse::<u64>() else {
            continue;
        };
        any.insert(step);
        if file == "manifest.json" {
            committed.insert(step);
        }
    }
    (committed, any)
}

fn only_the_newest_checkpoint_is_kept(objects_url: &str) {
    let cluster = Cluster::start_with_objects(
        ClusterOptions {
            workers: 1,
            ..ClusterOptions::default()
        },
        Some(objects_url),
    );
    let mut args = tiny_neural_ode_args(128, 2);
    args.extend(["--keep-checkpoints".to_string(), "1".to_string()]);
    let submit: Vec<&str> = args.iter().map(String::as_str).collect();
    let id = cluster.submit(&submit);
    let job = cluster.wait_state(&id, "SUCCEEDED", Duration::from_secs(300));
    assert_eq!(job["spec"]["checkpoints"]["keep_latest"], 1, "{job:#}");
    let newest = job["latest_checkpoint"]["step"]
        .as_u64()
        .expect("the job checkpointed");
    assert!(newest >= 4, "several checkpoints were committed: {job:#}");
    let steps = poll(
        "retention to leave one checkpoint",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            let listed = cluster.cli_json(&["checkpoints", &id]);
            let steps: Vec<u64> = listed
                .as_array()
                .map(|a| a.iter().filter_map(|c| c["step"].as_u64()).collect())
                .unwrap_or_default();
            let (committed, any) = folders(objects_url, &id);
            let one = [newest].into_iter().collect::<BTreeSet<u64>>();
            (steps == [newest] && committed == one && any == one).then_some(steps)
        },
    );
    assert_eq!(steps, [newest]);
}

#[test]
fn retention_keeps_only_the_newest_checkpoint_on_s3() {
    let Some(env) = s3_test_env() else { return };
    let url = env.url(&unique_prefix("e2e-retention"));
    only_the_newest_checkpoint_is_kept(&url);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let objects = trainyard_objects::open_objects(&url).expect("opening the test store");
    rt.block_on(objects.delete_prefix("jobs"))
        .expect("cleaning up");
}

#[test]
fn retention_keeps_only_the_newest_checkpoint_on_a_local_folder() {
    let dir = tempfile::tempdir().expect("tempdir");
    only_the_newest_checkpoint_is_kept(&format!("file://{}", dir.path().display()));
}
