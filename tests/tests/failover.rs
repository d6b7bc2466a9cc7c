//! kill -9 of the worker running a job: the job is requeued and finishes on the other
//! worker, resuming from its latest checkpoint.

use std::time::Duration;

use trainyard_tests::{tiny_neural_ode_args, Cluster};

#[test]
fn killed_worker_job_resumes_from_checkpoint_on_other_worker() {
    let mut cluster = Cluster::start(2);
    // Checkpoint often, and train long enough to be killed mid-way.
    let args = tiny_neural_ode_args(2048, 5);
    let mut submit: Vec<&str> = args.iter().map(String::as_str).collect();
    submit.extend_from_slice(&["--max-restarts", "2"]);
    let id = cluster.submit(&submit);

    let job = cluster.wait_job(&id, "a first checkpoint", Duration::from_secs(180), |j| {
        j["state"] == "RUNNING" && j["latest_checkpoint"]["step"].as_u64().unwrap_or(0) > 0
    });
    let victim = cluster.worker_index_of(&job);
    let victim_id = job["placement"][0]["worker_id"]
        .as_str()
        .unwrap()
        .to_string();
    cluster.workers[victim].kill9();

    // Requeued once, then placed on the surviving worker and finished there.
    let job = cluster.wait_state(&id, "SUCCEEDED", Duration::from_secs(300));
    assert_eq!(job["restarts"], 1, "{job}");
    assert!(job["attempt"].as_u64().unwrap_or(0) >= 2, "{job}");
    let survivor_id = job["placement"][0]["worker_id"].as_str().unwrap();
    assert_ne!(
        survivor_id, victim_id,
        "finished on the killed worker? {job}"
    );

    let to: Vec<&str> = job["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["to"].as_str())
        .collect();
    assert!(
        to.windows(2).any(|w| w == ["RUNNING", "PENDING"]),
        "no requeue in {to:?}"
    );

    // The new attempt resumed from a checkpoint at a step > 0.
    let resumed = job["latest_metrics"]["resumed_from_step"]
        .as_f64()
        .unwrap_or(0.0);
    let logs = cluster.cli(&["logs", &id]).ok().stdout;
    let logged = logs
        .lines()
        .filter_map(|l| l.split("resumed from checkpoint at step ").nth(1))
        .filter_map(|rest| {
            rest.split_whitespace()
                .next()?
                .trim_end_matches(|c: char| !c.is_ascii_digit())
                .parse::<u64>()
                .ok()
        })
        .max()
        .unwrap_or(0);
    assert!(
        resumed > 0.0 || logged > 0,
        "the retry did not resume from a checkpoint (resumed_from_step={resumed}); logs:\n{logs}"
    );

    // The dead worker is reported dead.
    let workers = cluster.cli_json(&["workers", "--all"]);
    let dead = workers
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == victim_id.as_str())
        .cloned();
    assert_eq!(
        dead.map(|w| w["state"].clone()),
        Some("DEAD".into()),
        "{workers}"
    );
}
