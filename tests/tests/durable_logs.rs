//! Durable job history with real processes: a short job runs, then its worker is killed and
//! the coordinator is killed (SIGKILL) and restarted, and `trainyard logs` and
//! `trainyard describe` still show every log line, the metrics and the results table, read
//! back from the object store (`jobs/<id>/logs/`, `jobs/<id>/metrics/`,
//! `jobs/<id>/results.json`).
//!
//! Once on S3 (the test server of `scripts/s3.sh up`; without it that case prints a notice
//! and passes, unless `CI` or `TRAINYARD_REQUIRE_S3=1` is set), once on a local folder.

use std::time::Duration;

use trainyard_objects::testing::{s3_test_env, unique_prefix};
use trainyard_objects::Objects;
use trainyard_tests::{poll, tiny_neural_ode_args, Cluster, ClusterOptions};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// The lines of every chunk under `dir`, in chunk order.
fn chunk_lines(
    rt: &tokio::runtime::Runtime,
    objects: &Objects,
    dir: &str,
) -> Vec<serde_json::Value> {
    let listed = rt.block_on(objects.list(dir)).expect("listing chunks");
    let mut out = Vec::new();
    for o in &listed {
        assert!(
            o.path.ends_with(".jsonl"),
            "unexpected object under {dir}: {}",
            o.path
        );
        let got = rt
            .block_on(objects.get(&o.path))
            .expect("reading a chunk")
            .expect("a listed chunk exists");
        for line in String::from_utf8_lossy(&got.bytes).lines() {
            out.push(
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{}: {e}: {line}", o.path)),
            );
        }
    }
    out
}

fn history_survives_the_worker_and_a_coordinator_restart(objects_url: &str) {
    let mut cluster = Cluster::start_with_objects(
        ClusterOptions {
            workers: 1,
            ..ClusterOptions::default()
        },
        Some(objects_url),
    );
    let args = tiny_neural_ode_args(64, 4);
    let submit: Vec<&str> = args.iter().map(String::as_str).collect();
    let id = cluster.submit(&submit);
    let before = cluster.wait_state(&id, "SUCCEEDED", Duration::from_secs(300));
    let logs_before = cluster.cli(&["logs", &id]).ok().stdout;
    let log_count = logs_before.lines().count();
    assert!(log_count >= 5, "the job logs something:\n{logs_before}");
    let metrics_before = before["latest_metrics"].clone();
    assert!(
        metrics_before.as_object().is_some_and(|m| !m.is_empty()),
        "{before:#}"
    );
    let title = before["result"]["title"]
        .as_str()
        .expect("the job has a results table")
        .to_string();

    // The history is in the object store: results.json comes after the last chunks.
    let rt = runtime();
    let objects = trainyard_objects::open_objects(objects_url).expect("opening the store");
    let results_path = format!("jobs/{id}/results.json");
    poll(
        "results.json in the object store",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || rt.block_on(objects.head(&results_path)).ok().flatten(),
    );
    let logged = chunk_lines(&rt, &objects, &format!("jobs/{id}/logs"));
    let chunk_text: Vec<&str> = logged.iter().filter_map(|l| l["line"].as_str()).collect();
    assert_eq!(
        chunk_text,
        logs_before.lines().collect::<Vec<_>>(),
        "the log chunks hold every line, in order"
    );
    let metric_points = chunk_lines(&rt, &objects, &format!("jobs/{id}/metrics"));
    assert!(!metric_points.is_empty(), "metric chunks are written");
    assert!(metric_points
        .iter()
        .all(|m| m["values"].is_object() && m["step"].is_u64()));
    let results = rt
        .block_on(objects.get(&results_path))
        .expect("reading results.json")
        .expect("results.json exists");
    let results: serde_json::Value = serde_json::from_slice(&results.bytes).expect("JSON");
    assert_eq!(results["job_id"], id.as_str());
    assert_eq!(results["title"], title.as_str());
    assert!(results["rows"].as_array().is_some_and(|r| !r.is_empty()));

    // The worker that ran it and the coordinator that watched it are gone.
    cluster.workers[0].kill9();
    cluster.coordinator.kill9();
    cluster.restart_coordinator();

    let logs_after = cluster.cli(&["logs", &id]).ok().stdout;
    assert_eq!(
        logs_after, logs_before,
        "`trainyard logs` shows every line after the restart"
    );
    let after = cluster.describe(&id);
    assert_eq!(after["state"], "SUCCEEDED");
    assert_eq!(after["latest_metrics"], metrics_before);
    assert_eq!(after["result"], before["result"]);
    let text = cluster.cli(&["describe", &id]).ok().stdout;
    for needle in [title.as_str(), "Latest metrics:", "SUCCEEDED"] {
        assert!(text.contains(needle), "describe lacks {needle:?}:\n{text}");
    }
}

#[test]
fn logs_and_describe_survive_the_worker_and_a_coordinator_restart_on_s3() {
    let Some(env) = s3_test_env() else { return };
    let url = env.url(&unique_prefix("e2e-durable-logs"));
    history_survives_the_worker_and_a_coordinator_restart(&url);
    let rt = runtime();
    let objects = trainyard_objects::open_objects(&url).expect("opening the test store");
    rt.block_on(objects.delete_prefix("jobs"))
        .expect("cleaning up");
}

#[test]
fn logs_and_describe_survive_the_worker_and_a_coordinator_restart_on_a_local_folder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("file://{}", dir.path().display());
    history_survives_the_worker_and_a_coordinator_restart(&url);
}
