//! Data-parallel training over real processes: a 4-rank `neural-ode` job on 2 workers × 2
//! emulated GPUs connects its ranks through the coordinator's rendezvous into a TCP ring,
//! trains, and survives a worker killed with SIGKILL: the attempt fails at once (the ring
//! notices the dead peers), the job waits for capacity, and resumes from its checkpoint on
//! a new worker.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use trainyard_tests::{tiny_neural_ode_args, Cluster, ClusterOptions};

fn emulated_cluster(workers: usize) -> Cluster {
    Cluster::start_with(ClusterOptions {
        workers,
        devices: String::new(),
        emulate_gpus: 2,
        ..ClusterOptions::default()
    })
}

/// Worker ids of a job's placement, by rank.
fn placement_workers(job: &Value) -> Vec<String> {
    job["placement"]
        .as_array()
        .map(|p| {
            p.iter()
                .map(|r| r["worker_id"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn four_ranks_over_two_workers_resume_after_a_worker_is_killed() {
    let mut cluster = emulated_cluster(2);
    // 4 ranks × batches of 16: 64 samples a step; checkpoint every 4 steps.
    let args = tiny_neural_ode_args(6144, 4);
    let mut submit: Vec<&str> = args.iter().map(String::as_str).collect();
    submit.extend_from_slice(&[
        "--ranks",
        "4",
        "--device-kind",
        "gpu",
        "--max-restarts",
        "3",
    ]);
    let id = cluster.submit(&submit);

    let job = cluster.wait_job(&id, "a first checkpoint", Duration::from_secs(240), |j| {
        j["state"] == "RUNNING" && j["latest_checkpoint"]["step"].as_u64().unwrap_or(0) > 0
    });
    let workers = placement_workers(&job);
    assert_eq!(workers.len(), 4, "{job}");
    let distinct: BTreeSet<&String> = workers.iter().collect();
    assert_eq!(
        distinct.len(),
        2,
        "4 ranks should fill 2 workers × 2: {job}"
    );
    // Consecutive ranks share a worker (fewer ring hops across machines).
    assert_eq!(workers[0], workers[1], "{job}");
    assert_eq!(workers[2], workers[3], "{job}");
    let logs = cluster.cli(&["logs", &id]).ok().stdout;
    assert!(
        logs.contains("of 4 connected (ring)"),
        "the ranks did not report joining the ring:\n{logs}"
    );

    // Kill the worker of ranks 2 and 3.
    let victim = cluster.worker_index_of(&serde_json::json!({
        "placement": [{"worker_id": workers[2]}]
    }));
    cluster.workers[victim].kill9();

    // The attempt fails, and with 2 slots left the job waits for 4.
    let job = cluster.wait_job(&id, "requeued and waiting", Duration::from_secs(120), |j| {
        j["state"] == "PENDING" && j["restarts"].as_u64().unwrap_or(0) >= 1
    });
    assert_eq!(job["restarts"], 1, "one failure, one restart: {job}");

    // New capacity: the job resumes from its checkpoint on the survivor + the new worker.
    cluster.add_worker();
    let job = cluster.wait_state(&id, "SUCCEEDED", Duration::from_secs(300));
    assert_eq!(job["restarts"], 1, "{job}");
    let after = placement_workers(&job);
    assert!(
        !after.contains(&workers[2]),
        "the last attempt ran on the killed worker: {job}"
    );
    let resumed = job["latest_metrics"]["resumed_from_step"]
        .as_f64()
        .unwrap_or(0.0);
    let logs = cluster.cli(&["logs", &id]).ok().stdout;
    assert!(
        resumed > 0.0 || logs.contains("resumed from checkpoint at step"),
        "the retry did not resume from a checkpoint; logs:\n{logs}"
    );
    assert!(
        job["result"]["rows"]
            .as_array()
            .is_some_and(|r| !r.is_empty()),
        "no results table: {job}"
    );
}
